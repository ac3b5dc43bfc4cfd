//! Counters the request path bumps: plain atomics (and one short-held map lock per finished
//! request) so that `/metrics` costs the request path nearly nothing.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Why the proxy answered a request itself instead of forwarding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NoRoute,
    Misdirected,
    BadRequest,
    IpNotAllowed,
    ConnectFailed,
    ConnectTimeout,
    ResponseTimeout,
    UpstreamError,
}

impl Refusal {
    pub const ALL: [Refusal; 8] = [
        Refusal::NoRoute,
        Refusal::Misdirected,
        Refusal::BadRequest,
        Refusal::IpNotAllowed,
        Refusal::ConnectFailed,
        Refusal::ConnectTimeout,
        Refusal::ResponseTimeout,
        Refusal::UpstreamError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::NoRoute => "no_route",
            Refusal::Misdirected => "misdirected",
            Refusal::BadRequest => "bad_request",
            Refusal::IpNotAllowed => "ip_not_allowed",
            Refusal::ConnectFailed => "connect_failed",
            Refusal::ConnectTimeout => "connect_timeout",
            Refusal::ResponseTimeout => "response_timeout",
            Refusal::UpstreamError => "upstream_error",
        }
    }
}

/// The proxy's counters and gauges.
#[derive(Default)]
pub struct ProxyMetrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    refusals: [AtomicU64; 8],
    sessions_open: AtomicI64,
    sessions_total: AtomicU64,
    requests_in_flight: AtomicI64,
    /// Bumped by the accept loop on a timer: proof for the watchdog that it runs.
    pub accept_loop_beats: AtomicU64,
}

/// Decrements a gauge when dropped.
pub struct GaugeGuard<'a>(&'a AtomicI64);

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ProxyMetrics {
    /// A finished request (forwarded or answered by the proxy); `route` is `""` when no
    /// route matched.
    pub fn request(&self, route: &str, status: u16) {
        let mut m = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((route.to_string(), status)).or_default() += 1;
    }

    pub fn refusal(&self, r: Refusal) {
        self.refusals[r as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// A tunnel session (one WebSocket carrying one inner TLS session) is open while held.
    pub fn session(&self) -> GaugeGuard<'_> {
        self.sessions_total.fetch_add(1, Ordering::Relaxed);
        self.sessions_open.fetch_add(1, Ordering::Relaxed);
        GaugeGuard(&self.sessions_open)
    }

    /// A request is being handled (until its response headers are sent) while held.
    pub fn in_flight(&self) -> GaugeGuard<'_> {
        self.requests_in_flight.fetch_add(1, Ordering::Relaxed);
        GaugeGuard(&self.requests_in_flight)
    }

    pub fn requests_snapshot(&self) -> Vec<((String, u16), u64)> {
        let m = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        m.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    pub fn refusals_snapshot(&self) -> Vec<(Refusal, u64)> {
        Refusal::ALL
            .iter()
            .map(|r| (*r, self.refusals[*r as usize].load(Ordering::Relaxed)))
            .collect()
    }

    pub fn sessions_open(&self) -> i64 {
        self.sessions_open.load(Ordering::Relaxed)
    }

    pub fn sessions_total(&self) -> u64 {
        self.sessions_total.load(Ordering::Relaxed)
    }

    pub fn requests_in_flight(&self) -> i64 {
        self.requests_in_flight.load(Ordering::Relaxed)
    }
}
