//! Whether a session is idle: the requests whose response is still streaming, and when one
//! last started or finished. The session's idle timers read it; each request's response body
//! holds its guard until it ends.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// What the idle-session timer looks at: requests whose response has not finished streaming,
/// and the last time one started or finished.
pub struct Activity {
    in_flight: AtomicUsize,
    last_ms: AtomicU64,
    epoch: Instant,
    /// The process-wide gauge of requests in flight (until their response body ends).
    metrics: Arc<super::metrics::ProxyMetrics>,
}

impl Activity {
    pub fn new(metrics: Arc<super::metrics::ProxyMetrics>) -> Activity {
        Activity {
            in_flight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            metrics,
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Marks a request in flight until the guard (moved into its response body) drops.
    pub fn begin(self: &Arc<Self>) -> ActiveGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.metrics.stream_started();
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
        ActiveGuard(self.clone())
    }

    /// Idle: nothing in flight and no request started or finished for `idle`.
    pub fn is_idle(&self, idle: Duration) -> bool {
        self.in_flight.load(Ordering::Relaxed) == 0
            && self
                .now_ms()
                .saturating_sub(self.last_ms.load(Ordering::Relaxed))
                >= idle.as_millis() as u64
    }

    /// How long until the session could be idle, if nothing happens meanwhile.
    pub fn time_to_idle(&self, idle: Duration) -> Duration {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return idle;
        }
        let quiet = self
            .now_ms()
            .saturating_sub(self.last_ms.load(Ordering::Relaxed));
        idle.saturating_sub(Duration::from_millis(quiet))
            .max(Duration::from_millis(10))
    }
}

/// One request in flight (see `Activity`).
pub struct ActiveGuard(Arc<Activity>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.last_ms.store(self.0.now_ms(), Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.stream_ended();
    }
}
