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

/// A limit from `[limits]` that was hit (each one also logs its reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitHit {
    Sessions,
    UpgradeTimeout,
    TlsHandshakeTimeout,
    HeaderTimeout,
    HeaderTooLarge,
    WsMessageTooLarge,
    IdleSession,
    RequestBodyTooLarge,
}

impl LimitHit {
    pub const ALL: [LimitHit; 8] = [
        LimitHit::Sessions,
        LimitHit::UpgradeTimeout,
        LimitHit::TlsHandshakeTimeout,
        LimitHit::HeaderTimeout,
        LimitHit::HeaderTooLarge,
        LimitHit::WsMessageTooLarge,
        LimitHit::IdleSession,
        LimitHit::RequestBodyTooLarge,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LimitHit::Sessions => "max_sessions",
            LimitHit::UpgradeTimeout => "upgrade_timeout",
            LimitHit::TlsHandshakeTimeout => "tls_handshake_timeout",
            LimitHit::HeaderTimeout => "request_header_timeout",
            LimitHit::HeaderTooLarge => "max_header_bytes",
            LimitHit::WsMessageTooLarge => "max_ws_message_bytes",
            LimitHit::IdleSession => "idle_session_timeout",
            LimitHit::RequestBodyTooLarge => "max_request_body_bytes",
        }
    }
}

/// What a route's upstream did with the last request forwarded to it (the status page's
/// "upstream verdict": an operator sees at a glance which upstream refuses or times out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamOutcome {
    /// The upstream answered with this status.
    Answered(u16),
    /// The proxy could not get an answer (not allowed, refused, timed out).
    Failed(Refusal),
}

/// The last upstream outcome of a route, and when (Unix seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamVerdict {
    pub outcome: UpstreamOutcome,
    pub at: i64,
}

/// The proxy's counters and gauges.
#[derive(Default)]
pub struct ProxyMetrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    upstreams: Mutex<BTreeMap<String, UpstreamVerdict>>,
    refusals: [AtomicU64; 8],
    limits: [AtomicU64; 8],
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

    /// What the upstream of `route` did with a forwarded request.
    pub fn upstream(&self, route: &str, outcome: UpstreamOutcome) {
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let mut m = self.upstreams.lock().unwrap_or_else(|e| e.into_inner());
        let verdict = UpstreamVerdict { outcome, at };
        match m.get_mut(route) {
            Some(v) => *v = verdict,
            None => {
                m.insert(route.to_string(), verdict);
            }
        }
    }

    /// The last upstream outcome per route (routes never forwarded to are absent).
    pub fn upstreams_snapshot(&self) -> BTreeMap<String, UpstreamVerdict> {
        self.upstreams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn limit(&self, l: LimitHit) {
        self.limits[l as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn limits_snapshot(&self) -> Vec<(LimitHit, u64)> {
        LimitHit::ALL
            .iter()
            .map(|l| (*l, self.limits[*l as usize].load(Ordering::Relaxed)))
            .collect()
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

    /// A request is in flight from its arrival until its response body has ended (an SSE
    /// stream counts for as long as it streams).
    pub fn stream_started(&self) {
        self.requests_in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub fn stream_ended(&self) {
        self.requests_in_flight.fetch_sub(1, Ordering::Relaxed);
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
