//! Events that come in floods (refused peers, failed accepts): rate-limited log lines (a few
//! per window, then silence, and the next line written says how many were left out; the
//! metric beside each use counts every event) and the backoff of a failing accept loop.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most this many lines per window.
pub const LOG_BURST: u64 = 5;
pub const LOG_WINDOW: Duration = Duration::from_secs(10);

/// Lets `LOG_BURST` lines through per `LOG_WINDOW`, and counts the rest.
#[derive(Default)]
pub struct LogLimiter {
    state: Mutex<LogWindow>,
}

#[derive(Default)]
struct LogWindow {
    start: Option<Instant>,
    lines: u64,
    suppressed: u64,
}

impl LogLimiter {
    /// `Some(lines left out since the last one written)` when a line may be written now.
    pub fn permit(&self) -> Option<u64> {
        self.permit_at(Instant::now())
    }

    pub fn permit_at(&self, now: Instant) -> Option<u64> {
        let mut w = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if w.start.is_none_or(|s| now.duration_since(s) >= LOG_WINDOW) {
            w.start = Some(now);
            w.lines = 0;
        }
        if w.lines < LOG_BURST {
            w.lines += 1;
            Some(std::mem::take(&mut w.suppressed))
        } else {
            w.suppressed += 1;
            None
        }
    }
}

/// How long the accept loop waits after a failed accept: 10 ms, doubling while accepts keep
/// failing, at most 1 s, and back to the start once one succeeds. A failed accept leaves the
/// connection queued, so retrying at once would only spin a core.
#[derive(Default)]
pub struct AcceptBackoff {
    failures: u32,
}

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(10);
    const MOST: Duration = Duration::from_secs(1);

    pub fn failed(&mut self) -> Duration {
        let wait = Self::FIRST
            .saturating_mul(1 << self.failures.min(7))
            .min(Self::MOST);
        self.failures = self.failures.saturating_add(1);
        wait
    }

    pub fn accepted(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_are_rate_limited_and_the_gap_is_reported() {
        let l = LogLimiter::default();
        let t0 = Instant::now();
        for _ in 0..LOG_BURST {
            assert_eq!(l.permit_at(t0), Some(0));
        }
        assert_eq!(l.permit_at(t0 + Duration::from_secs(1)), None);
        assert_eq!(l.permit_at(t0 + Duration::from_secs(2)), None);
        assert_eq!(l.permit_at(t0 + LOG_WINDOW), Some(2));
        assert_eq!(l.permit_at(t0 + LOG_WINDOW), Some(0));
    }

    #[test]
    fn accept_backoff_doubles_to_a_second_and_resets_on_success() {
        let mut b = AcceptBackoff::default();
        let waits: Vec<u64> = (0..9).map(|_| b.failed().as_millis() as u64).collect();
        assert_eq!(waits, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.accepted();
        assert_eq!(b.failed(), Duration::from_millis(10));
    }
}
