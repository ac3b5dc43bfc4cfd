//! Counters the request path bumps: plain atomics, found without a lock (per-route counters
//! sit in a copy-on-write map that only a route's first request ever writes), so that
//! counting costs the request path nearly nothing and `/metrics` never slows it.
//!
//! The counters every request bumps are sharded by data-plane worker (`proxy::workers`):
//! each worker writes only its own shard's cache lines, and `/metrics` sums the shards.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::mcp::Outcome;

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
    RouteRevoked,
}

impl Refusal {
    pub const ALL: [Refusal; 9] = [
        Refusal::NoRoute,
        Refusal::Misdirected,
        Refusal::BadRequest,
        Refusal::IpNotAllowed,
        Refusal::ConnectFailed,
        Refusal::ConnectTimeout,
        Refusal::ResponseTimeout,
        Refusal::UpstreamError,
        Refusal::RouteRevoked,
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
            Refusal::RouteRevoked => "route_revoked",
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
    /// An accept refused because the process (or the system) is out of file descriptors:
    /// `LimitNOFILE`, not a `[limits]` bound, but a limit hit all the same.
    OpenFiles,
}

impl LimitHit {
    pub const ALL: [LimitHit; 9] = [
        LimitHit::Sessions,
        LimitHit::UpgradeTimeout,
        LimitHit::TlsHandshakeTimeout,
        LimitHit::HeaderTimeout,
        LimitHit::HeaderTooLarge,
        LimitHit::WsMessageTooLarge,
        LimitHit::IdleSession,
        LimitHit::RequestBodyTooLarge,
        LimitHit::OpenFiles,
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
            LimitHit::OpenFiles => "open_files",
        }
    }
}

/// Why a listener connection was closed by the peer check, before its upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRefusal {
    /// The peer socket belongs to a user other than the service's (and root, if allowed).
    OtherUser,
    /// The kernel could not name the peer socket's owner (gone already, not on this host).
    UnknownOwner,
}

impl PeerRefusal {
    pub const ALL: [PeerRefusal; 2] = [PeerRefusal::OtherUser, PeerRefusal::UnknownOwner];

    pub fn as_str(self) -> &'static str {
        match self {
            PeerRefusal::OtherUser => "other_user",
            PeerRefusal::UnknownOwner => "unknown_owner",
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

/// Lowest and highest status code `http::StatusCode` admits.
const STATUS_MIN: u16 = 100;
const STATUS_SLOTS: usize = 900;

/// Shards of the per-request counters: worker `i` writes shard `i % SHARDS` (0 is
/// everything off the workers), so up to `SHARDS - 1` workers never share a line.
const SHARDS: usize = 8;

fn shard() -> usize {
    super::workers::current() % SHARDS
}

/// A counter on a cache line of its own.
#[repr(align(128))]
#[derive(Default)]
struct Padded<T>(T);

/// One route's counters: a slot per status code and shard, and the last upstream verdict,
/// packed in one word (Unix seconds above, outcome below; 0 while there is none).
struct RouteCounters {
    /// `SHARDS` runs of `STATUS_SLOTS` (7 KiB apart: no line is shared between shards).
    by_status: Box<[AtomicU64]>,
    /// Written only when it changes (at most once a second while the outcome holds), so
    /// requests on two workers do not keep moving its line between cores.
    verdict: AtomicU64,
}

impl RouteCounters {
    fn new() -> RouteCounters {
        RouteCounters {
            by_status: (0..STATUS_SLOTS * SHARDS)
                .map(|_| AtomicU64::new(0))
                .collect(),
            verdict: AtomicU64::new(0),
        }
    }

    fn status_count(&self, slot: usize) -> u64 {
        (0..SHARDS)
            .map(|s| self.by_status[s * STATUS_SLOTS + slot].load(Ordering::Relaxed))
            .sum()
    }
}

/// Outcome codes in a packed verdict: an answer is its status; a failure is 1000 plus its
/// place in `Refusal::ALL`.
fn pack_outcome(o: UpstreamOutcome) -> u64 {
    match o {
        UpstreamOutcome::Answered(s) => u64::from(s),
        UpstreamOutcome::Failed(r) => 1000 + r as u64,
    }
}

fn unpack_verdict(word: u64) -> Option<UpstreamVerdict> {
    if word == 0 {
        return None;
    }
    let code = word & 0xffff_ffff;
    let outcome = if code >= 1000 {
        UpstreamOutcome::Failed(*Refusal::ALL.get((code - 1000) as usize)?)
    } else {
        UpstreamOutcome::Answered(code as u16)
    };
    Some(UpstreamVerdict {
        outcome,
        at: (word >> 32) as i64,
    })
}

/// Per-route counters by route name (`""`: requests that matched no route).
#[derive(Default)]
struct RouteTable {
    by_name: ArcSwap<HashMap<Box<str>, Arc<RouteCounters>>>,
    /// Serialises the rare insertions (a route's first request).
    insert: Mutex<()>,
}

impl RouteTable {
    /// Runs `f` on the route's counters without taking a reference count (the map's guard
    /// holds them), creating them on the route's first request.
    fn with(&self, route: &str, f: impl FnOnce(&RouteCounters)) {
        if let Some(c) = self.by_name.load().get(route) {
            return f(c);
        }
        f(&self.get(route))
    }

    fn get(&self, route: &str) -> Arc<RouteCounters> {
        if let Some(c) = self.by_name.load().get(route) {
            return c.clone();
        }
        let _one = self.insert.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.by_name.load_full();
        if let Some(c) = current.get(route) {
            return c.clone();
        }
        let mut next = HashMap::clone(&current);
        let c = Arc::new(RouteCounters::new());
        next.insert(route.into(), c.clone());
        self.by_name.store(Arc::new(next));
        c
    }

    fn sorted(&self) -> Vec<(Box<str>, Arc<RouteCounters>)> {
        let mut all: Vec<_> = self
            .by_name
            .load()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

/// The proxy's counters and gauges.
#[derive(Default)]
pub struct ProxyMetrics {
    routes: RouteTable,
    refusals: [AtomicU64; Refusal::ALL.len()],
    limits: [AtomicU64; LimitHit::ALL.len()],
    peer_refusals: [AtomicU64; 2],
    sessions_open: AtomicI64,
    sessions_total: AtomicU64,
    /// Per shard: a request's start and end are counted on the same worker, but the sum of
    /// one shard alone may be negative (an h2 stream's body can end on another task).
    requests_in_flight: [Padded<AtomicI64>; SHARDS],
    /// Bumped by the accept loop on a timer: proof for the watchdog that it runs.
    pub accept_loop_beats: AtomicU64,
    /// WebSocket pings, pong timeouts and SSE keepalive comments.
    pub keepalive: std::sync::Arc<super::keepalive::KeepaliveCounters>,
    /// MCP messages, tool calls and latencies of inspected routes.
    pub mcp: McpMetrics,
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
        let slot = usize::from(status.saturating_sub(STATUS_MIN)).min(STATUS_SLOTS - 1);
        let at = shard() * STATUS_SLOTS + slot;
        self.routes.with(route, |c| {
            _ = c.by_status[at].fetch_add(1, Ordering::Relaxed)
        });
    }

    /// What the upstream of `route` did with a forwarded request.
    pub fn upstream(&self, route: &str, outcome: UpstreamOutcome) {
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as u32);
        let word = (u64::from(at) << 32) | pack_outcome(outcome);
        self.routes.with(route, |c| {
            if c.verdict.load(Ordering::Relaxed) != word {
                c.verdict.store(word, Ordering::Relaxed);
            }
        });
    }

    /// The last upstream outcome per route (routes never forwarded to are absent).
    pub fn upstreams_snapshot(&self) -> BTreeMap<String, UpstreamVerdict> {
        self.routes
            .sorted()
            .into_iter()
            .filter_map(|(name, c)| {
                unpack_verdict(c.verdict.load(Ordering::Relaxed)).map(|v| (name.into(), v))
            })
            .collect()
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

    pub fn peer_refusal(&self, r: PeerRefusal) {
        self.peer_refusals[r as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn peer_refusals_snapshot(&self) -> Vec<(PeerRefusal, u64)> {
        PeerRefusal::ALL
            .iter()
            .map(|r| (*r, self.peer_refusals[*r as usize].load(Ordering::Relaxed)))
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
        self.requests_in_flight[shard()]
            .0
            .fetch_add(1, Ordering::Relaxed);
    }

    pub fn stream_ended(&self) {
        self.requests_in_flight[shard()]
            .0
            .fetch_sub(1, Ordering::Relaxed);
    }

    /// Requests by (route, status), sorted, only pairs seen at least once.
    pub fn requests_snapshot(&self) -> Vec<((String, u16), u64)> {
        let mut out = Vec::new();
        for (name, c) in self.routes.sorted() {
            for slot in 0..STATUS_SLOTS {
                let n = c.status_count(slot);
                if n > 0 {
                    out.push(((name.to_string(), STATUS_MIN + slot as u16), n));
                }
            }
        }
        out
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
        self.requests_in_flight
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .sum()
    }
}

/// Upper bounds (seconds) of the MCP latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Longest tool name given a label of its own.
pub const MAX_TOOL_LABEL_LEN: usize = 128;

/// A latency histogram: count per bucket (not cumulative; the last slot is +Inf), sum, count.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    pub buckets: [u64; LATENCY_BUCKETS.len() + 1],
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    pub fn observe(&mut self, seconds: f64) {
        let i = LATENCY_BUCKETS
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i] += 1;
        self.sum += seconds;
        self.count += 1;
    }
}

/// One route's MCP counters. Every label set is bounded: methods by `mcp::KNOWN_METHODS`,
/// outcomes by `mcp::Outcome`, tools by `max_tool_labels`.
#[derive(Debug, Clone, Default)]
pub struct RouteMcpStats {
    /// Client messages by (method label, outcome).
    pub messages: BTreeMap<(&'static str, Outcome), u64>,
    /// `tools/call` by tool label, then outcome (indexed by `Outcome as usize`).
    pub tools: BTreeMap<String, [u64; Outcome::ALL.len()]>,
    /// Latency of requests by method label (from the request's arrival to its answer).
    pub latency: BTreeMap<&'static str, Histogram>,
    /// Bodies or events passed on without being read, by reason.
    pub uninspected: BTreeMap<&'static str, u64>,
    /// Client messages the proxy refused, by reason (policy denial, header mismatch, a body
    /// that could not be judged).
    pub refused: BTreeMap<&'static str, u64>,
    /// Tools taken out of `tools/list` results by the policy.
    pub tools_hidden: u64,
    /// Tool names that have a label of their own.
    tool_labels: HashSet<String>,
}

impl RouteMcpStats {
    /// A tool name earns a label when the server knows it (it listed it, or a call ran it)
    /// while there is room; names a caller makes up stay `other`.
    fn tool_label<'a>(&mut self, tool: &'a str, known: bool, cap: usize) -> &'a str {
        if self.tool_labels.contains(tool) {
            return tool;
        }
        if known && self.tool_labels.len() < cap && tool.len() <= MAX_TOOL_LABEL_LEN {
            self.tool_labels.insert(tool.to_owned());
            return tool;
        }
        "other"
    }

    fn count_tool(&mut self, tool: &str, outcome: Outcome, cap: usize) {
        let label = self.tool_label(tool, outcome.tool_known(), cap);
        match self.tools.get_mut(label) {
            Some(counts) => counts[outcome as usize] += 1,
            None => {
                let mut counts = [0; Outcome::ALL.len()];
                counts[outcome as usize] = 1;
                self.tools.insert(label.to_owned(), counts);
            }
        }
    }
}

/// MCP counters of every inspected route, behind one short-held lock (taken once per MCP
/// message, never on routes without inspection).
#[derive(Default)]
pub struct McpMetrics {
    routes: Mutex<BTreeMap<String, RouteMcpStats>>,
}

impl McpMetrics {
    fn with<R>(&self, route: &str, f: impl FnOnce(&mut RouteMcpStats) -> R) -> R {
        let mut m = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(stats) = m.get_mut(route) {
            return f(stats);
        }
        f(m.entry(route.to_owned()).or_default())
    }

    /// One client message with its outcome; `seconds` for requests (latency), `tool` for
    /// `tools/call`.
    pub fn message(
        &self,
        route: &str,
        method: &'static str,
        outcome: Outcome,
        tool: Option<&str>,
        seconds: Option<f64>,
        max_tool_labels: usize,
    ) {
        self.with(route, |s| {
            *s.messages.entry((method, outcome)).or_default() += 1;
            if let Some(secs) = seconds {
                s.latency.entry(method).or_default().observe(secs);
            }
            if let Some(tool) = tool {
                s.count_tool(tool, outcome, max_tool_labels);
            }
        });
    }

    /// Tools the upstream listed: they get labels (up to the cap) before any caller's guess.
    pub fn listed_tools<'a>(
        &self,
        route: &str,
        names: impl Iterator<Item = &'a str>,
        max_tool_labels: usize,
    ) {
        self.with(route, |s| {
            for n in names {
                if s.tool_labels.len() >= max_tool_labels {
                    break;
                }
                s.tool_label(n, true, max_tool_labels);
            }
        });
    }

    pub fn uninspected(&self, route: &str, reason: &'static str) {
        self.with(route, |s| *s.uninspected.entry(reason).or_default() += 1);
    }

    pub fn refused(&self, route: &str, reason: &'static str) {
        self.with(route, |s| *s.refused.entry(reason).or_default() += 1);
    }

    pub fn hidden(&self, route: &str, n: usize) {
        self.with(route, |s| s.tools_hidden += n as u64);
    }

    /// A copy of every route's counters, for `/metrics`.
    pub fn snapshot(&self) -> Vec<(String, RouteMcpStats)> {
        let m = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_route_counts_and_verdicts_from_many_threads() {
        let m = Arc::new(ProxyMetrics::default());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        let route = ["a", "b", ""][i % 3];
                        m.request(route, if t % 2 == 0 { 200 } else { 502 });
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let snap = m.requests_snapshot();
        let get = |r: &str, s: u16| {
            snap.iter()
                .find(|((rr, ss), _)| rr == r && *ss == s)
                .map(|x| x.1)
        };
        assert_eq!(get("a", 200), Some(2 * 334));
        assert_eq!(get("b", 502), Some(2 * 333));
        assert_eq!(get("", 200), Some(2 * 333));
        assert_eq!(snap.iter().map(|x| x.1).sum::<u64>(), 4000);
        assert!(snap.windows(2).all(|w| w[0].0 < w[1].0), "sorted: {snap:?}");

        m.upstream("a", UpstreamOutcome::Answered(503));
        m.upstream("b", UpstreamOutcome::Failed(Refusal::ConnectTimeout));
        let v = m.upstreams_snapshot();
        assert_eq!(v["a"].outcome, UpstreamOutcome::Answered(503));
        assert_eq!(
            v["b"].outcome,
            UpstreamOutcome::Failed(Refusal::ConnectTimeout)
        );
        assert!(v["a"].at > 1_700_000_000);
        assert!(
            !v.contains_key(""),
            "a route never forwarded to has no verdict"
        );
    }

    #[test]
    fn tool_labels_are_capped_and_earned() {
        let m = McpMetrics::default();
        m.listed_tools("r", ["echo", "add"].into_iter(), 3);
        // A hostile caller's thousands of made-up names never get labels.
        for i in 0..5000 {
            let name = format!("made-up-{i}");
            m.message(
                "r",
                "tools/call",
                Outcome::Error,
                Some(&name),
                Some(0.001),
                3,
            );
        }
        m.message("r", "tools/call", Outcome::Ok, Some("echo"), Some(0.001), 3);
        m.message(
            "r",
            "tools/call",
            Outcome::Ok,
            Some("ran-once"),
            Some(0.001),
            3,
        );
        m.message(
            "r",
            "tools/call",
            Outcome::Ok,
            Some("over-cap"),
            Some(0.001),
            3,
        );
        let snap = m.snapshot();
        let stats = &snap[0].1;
        let labels: HashSet<&str> = stats.tools.keys().map(String::as_str).collect();
        assert_eq!(labels, HashSet::from(["echo", "ran-once", "other"]));
        assert_eq!(stats.tools["other"][Outcome::Error as usize], 5000);
        assert_eq!(stats.tools["other"][Outcome::Ok as usize], 1);
        assert_eq!(stats.messages[&("tools/call", Outcome::Error)], 5000);
        assert_eq!(stats.latency["tools/call"].count, 5003);
    }

    #[test]
    fn histogram_buckets() {
        let mut h = Histogram::default();
        for s in [0.001, 0.005, 0.3, 1000.0] {
            h.observe(s);
        }
        assert_eq!(h.buckets[0], 2);
        assert_eq!(h.buckets[6], 1);
        assert_eq!(h.buckets[LATENCY_BUCKETS.len()], 1);
        assert_eq!(h.count, 4);
    }
}
