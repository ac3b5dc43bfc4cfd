//! The appliance's shared operational state, and the pure functions that turn it into
//! `/readyz` JSON, Prometheus text and the sd-notify STATUS line.

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use crate::cloudflared::Status as CloudflaredStatus;
use crate::cloudflared::policy::{EXPECTED_CONNECTIONS, Health};
use crate::proxy::metrics::ProxyMetrics;

/// Everything `/readyz`, `/metrics` and STATUS report. The supervisor owns it; the hot
/// reload path bumps `config_generation` / `reload_failures` and `cert_not_after`.
pub struct AppState {
    pub proxy: Arc<ProxyMetrics>,
    /// Set when cloudflared supervision starts; unset means disabled.
    pub cloudflared: OnceLock<Arc<CloudflaredStatus>>,
    pub cloudflared_enabled: bool,
    pub routes: AtomicUsize,
    /// Unix seconds; 0 when unknown.
    pub cert_not_after: AtomicI64,
    pub config_generation: AtomicU64,
    pub reload_failures: AtomicU64,
    pub listener_bound: AtomicBool,
    pub stopping: AtomicBool,
    /// The provisioning task's last problem (`[provision]`), shown in STATUS until it clears.
    pub provisioning: std::sync::Mutex<Option<String>>,
    /// Failed provisioning checks (rotations, renewals) since start.
    pub provision_failures: AtomicU64,
    /// Why the last reload was refused; cleared by the next one that applies (`/status`).
    pub last_reload_error: std::sync::Mutex<Option<String>>,
    /// `WATCHDOG_USEC` the service runs with; 0 without a watchdog.
    pub watchdog_usec: AtomicU64,
    /// The address the listener is bound to (`listen_addr` with its port resolved).
    pub listen_addr: OnceLock<std::net::SocketAddr>,
    /// Who may connect to the listener (`[peer_check]`), set once at start.
    pub peer_check: OnceLock<PeerCheckStatus>,
    /// `limits.max_sessions` (fixed at start), so that alerts can compare `sessions_open`.
    pub max_sessions: AtomicUsize,
    /// Failed renewals of the server certificate from the local CA (`[certs] ca_key_file`).
    pub cert_renewal_failures: AtomicU64,
    /// The last reload attempt; `None` until the first one.
    pub last_reload: std::sync::Mutex<Option<LastReload>>,
    /// The routes served now, for the status page.
    pub route_list: std::sync::Mutex<Vec<Arc<crate::config::Route>>>,
    /// Fields the last reload found changed in the file that apply only at the next start.
    pub restart_required: std::sync::Mutex<Vec<&'static str>>,
    /// Set once `mcp-tunnel sever` took effect: what the marker says (`incident::sever`).
    pub severed: std::sync::Mutex<Option<String>>,
    /// Whether this process runs the provisioning task, which carries out
    /// `mcp-tunnel setup rotate --now` requests.
    pub rotation_enabled: AtomicBool,
    /// The last `setup rotate --now` request this process carried out.
    pub last_rotation: std::sync::Mutex<Option<crate::incident::rotate::Outcome>>,
    /// Incident actions this process carried out, by action (`sever`, `rotate`).
    pub incident_actions: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
}

/// The listener's peer check as `/readyz` and `/metrics` show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCheckStatus {
    pub on: bool,
    /// E.g. `on: uid 998 (mcp-tunnel) only`, or `off: ...` with the reason.
    pub state: String,
}

/// When the last reload happened and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastReload {
    /// Unix seconds.
    pub at: i64,
    /// `None` when applied; the refusal otherwise (the running config stayed).
    pub error: Option<String>,
}

impl AppState {
    pub fn new(proxy: Arc<ProxyMetrics>, cloudflared_enabled: bool) -> Arc<AppState> {
        Arc::new(AppState {
            proxy,
            cloudflared: OnceLock::new(),
            cloudflared_enabled,
            routes: AtomicUsize::new(0),
            cert_not_after: AtomicI64::new(0),
            config_generation: AtomicU64::new(1),
            reload_failures: AtomicU64::new(0),
            listener_bound: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            severed: std::sync::Mutex::new(None),
            rotation_enabled: AtomicBool::new(false),
            last_rotation: std::sync::Mutex::new(None),
            incident_actions: std::sync::Mutex::new(std::collections::BTreeMap::new()),
            provisioning: std::sync::Mutex::new(None),
            provision_failures: AtomicU64::new(0),
            last_reload_error: std::sync::Mutex::new(None),
            watchdog_usec: AtomicU64::new(0),
            listen_addr: OnceLock::new(),
            peer_check: OnceLock::new(),
            max_sessions: AtomicUsize::new(0),
            cert_renewal_failures: AtomicU64::new(0),
            last_reload: std::sync::Mutex::new(None),
            restart_required: std::sync::Mutex::new(Vec::new()),
            route_list: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// The last reload attempt, if any.
    pub fn last_reload(&self) -> Option<LastReload> {
        self.last_reload
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// What the sever marker says, once this process has severed.
    pub fn severed(&self) -> Option<String> {
        self.severed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn cloudflared_health(&self) -> Health {
        match self.cloudflared.get() {
            Some(s) => s.health(),
            None if self.cloudflared_enabled => Health::Stopped,
            None => Health::Disabled,
        }
    }
}

/// One line of `/readyz`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Component {
    pub name: &'static str,
    pub ready: bool,
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Readiness of each component at `now` (unix seconds).
pub fn readiness(s: &AppState, now: i64) -> Vec<Component> {
    let mut out = Vec::new();
    let bound = s.listener_bound.load(Ordering::Relaxed);
    out.push(Component {
        name: "listener",
        ready: bound,
        state: if bound { "listening" } else { "not bound" }.into(),
        reason: (!bound).then(|| "the proxy listener is not bound yet".into()),
    });
    let na = s.cert_not_after.load(Ordering::Relaxed);
    let (ready, state, reason) = if na == 0 {
        (
            false,
            "unknown".to_string(),
            Some("certificate not loaded".to_string()),
        )
    } else if na <= now {
        (
            false,
            "expired".into(),
            Some("the server certificate has expired: run `mcp-tunnel renew-cert`".into()),
        )
    } else {
        (true, format!("expires in {}d", (na - now) / 86400), None)
    };
    out.push(Component {
        name: "certificate",
        ready,
        state,
        reason,
    });
    let h = s.cloudflared_health();
    let problem = s.cloudflared.get().and_then(|c| c.last_problem());
    let refused = s.cloudflared.get().and_then(|c| c.refused());
    let reason = match h {
        _ if h.is_ready() => None,
        Health::Starting | Health::Disconnected if refused.is_some() => refused,
        Health::Starting => Some("waiting for the first edge connection".to_string()),
        Health::Disconnected => Some("no edge connection; cloudflared is retrying".to_string()),
        Health::Hung => Some("cloudflared's metrics server does not answer".to_string()),
        _ => Some(
            problem
                .clone()
                .unwrap_or_else(|| "cloudflared is not running".into()),
        ),
    };
    let mut state = match h {
        Health::Connected(n) | Health::Degraded(n) => {
            format!("{} {n}/{EXPECTED_CONNECTIONS}", h.name())
        }
        _ => h.name().to_string(),
    };
    if let Some(incoming) = incoming_text(s) {
        state.push_str(&format!(" ({incoming})"));
    }
    out.push(Component {
        name: "cloudflared",
        ready: h.is_ready(),
        state,
        reason,
    });
    if let Some(p) = s.peer_check.get() {
        // Informational: a check that cannot work stops the start, so it is always ready.
        out.push(Component {
            name: "peer_check",
            ready: true,
            state: p.state.clone(),
            reason: None,
        });
    }
    let stopping = s.stopping.load(Ordering::Relaxed);
    let severed = s.severed();
    out.push(Component {
        name: "supervisor",
        ready: !stopping && severed.is_none(),
        state: match (&severed, stopping) {
            (Some(_), _) => "severed",
            (None, true) => "stopping",
            (None, false) => "running",
        }
        .into(),
        reason: severed.or_else(|| stopping.then(|| "shutting down".into())),
    });
    out
}

/// The one readiness rule, read by `/readyz`, by the supervisor for `READY=1` and by every
/// `STATUS=` line, so that what a probe sees and what systemd was told cannot differ.
pub struct Readiness {
    pub components: Vec<Component>,
}

impl Readiness {
    pub fn of(s: &AppState, now: i64) -> Readiness {
        Readiness {
            components: readiness(s, now),
        }
    }

    /// Every component is ready: `/readyz` answers 200.
    pub fn ready(&self) -> bool {
        self.components.iter().all(|c| c.ready)
    }

    /// The start has finished (`READY=1`): every component is ready, except that with
    /// `ready_requires_tunnel = false` the start does not wait for the tunnel. It is the same
    /// registry, with one component named as not waited for, not a second rule.
    pub fn started(&self, wait_for_tunnel: bool) -> bool {
        self.components
            .iter()
            .filter(|c| wait_for_tunnel || c.name != "cloudflared")
            .all(|c| c.ready)
    }

    /// `NOT READY (certificate, cloudflared)`, or `None` when ready.
    pub fn lacking(&self) -> Option<String> {
        let names: Vec<&str> = self
            .components
            .iter()
            .filter(|c| !c.ready)
            .map(|c| c.name)
            .collect();
        (!names.is_empty()).then(|| format!("NOT READY ({})", names.join(", ")))
    }
}

/// The `/readyz` body and whether every component is ready.
pub fn readyz(s: &AppState, now: i64) -> (bool, String) {
    let r = Readiness::of(s, now);
    let ready = r.ready();
    let comps = r.components;
    // The PID lets `mcp-tunnel restart-connector` signal the service (the kernel checks it
    // may: only root or the service's user can).
    let body = serde_json::json!({
        "ready": ready,
        "pid": std::process::id(),
        "severed": s.severed(),
        "components": comps,
    });
    (ready, format!("{body}\n"))
}

/// During a connector replacement: `replacing: new connector 2/4`.
fn incoming_text(s: &AppState) -> Option<String> {
    let (_, h) = s.cloudflared.get()?.incoming()?;
    Some(format!(
        "replacing: new connector {}/{EXPECTED_CONNECTIONS}",
        h.connections()
    ))
}

/// `STATUS=` for systemd, e.g. `tunnel 4/4 connections; 3 routes; cert expires in 61d`,
/// led by `NOT READY (...)` whenever `/readyz` would answer 503 (a certificate that expired
/// while running, the tunnel lost): `READY=1` cannot be taken back, so this line is where
/// systemd hears it.
pub fn status_line(s: &AppState, now: i64) -> String {
    let tunnel = match s.cloudflared_health() {
        Health::Disabled => "cloudflared disabled".to_string(),
        Health::Connected(n) | Health::Degraded(n) => {
            format!("tunnel {n}/{EXPECTED_CONNECTIONS} connections")
        }
        h => format!("tunnel {}", h.name()),
    };
    let tunnel = match incoming_text(s) {
        Some(i) => format!("{tunnel} ({i})"),
        None => tunnel,
    };
    let routes = s.routes.load(Ordering::Relaxed);
    let na = s.cert_not_after.load(Ordering::Relaxed);
    let cert = if na == 0 {
        "cert expiry unknown".to_string()
    } else if na <= now {
        "CERT EXPIRED".to_string()
    } else {
        format!("cert expires in {}d", (na - now) / 86400)
    };
    let stopping = if s.severed().is_some() {
        "SEVERED (mcp-tunnel sever --lift); "
    } else if s.stopping.load(Ordering::Relaxed) {
        "stopping; "
    } else {
        ""
    };
    let provisioning = s
        .provisioning
        .lock()
        .ok()
        .and_then(|p| p.clone())
        .map(|p| format!("; provisioning: {p}"))
        .unwrap_or_default();
    let lacking = match Readiness::of(s, now).lacking() {
        // Stopping and severed say so themselves.
        Some(l) if stopping.is_empty() => format!("{l}; "),
        _ => String::new(),
    };
    format!(
        "{lacking}{stopping}{tunnel}; {routes} route{}; {cert}{provisioning}",
        if routes == 1 { "" } else { "s" }
    )
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Prometheus text exposition (version 0.0.4).
pub fn render(s: &AppState, now: i64) -> String {
    let mut o = String::new();
    let head = |o: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    // A metric with one unlabelled value: its HELP/TYPE lines and the sample.
    let scalar =
        |o: &mut String, name: &str, kind: &str, help: &str, value: &dyn std::fmt::Display| {
            head(o, name, kind, help);
            let _ = writeln!(o, "{name} {value}");
        };
    head(
        &mut o,
        "mcp_tunnel_requests_total",
        "counter",
        "Requests finished, by route (empty: no route matched) and status.",
    );
    for ((route, status), n) in s.proxy.requests_snapshot() {
        let _ = writeln!(
            o,
            "mcp_tunnel_requests_total{{route=\"{}\",status=\"{status}\"}} {n}",
            label(&route)
        );
    }
    head(
        &mut o,
        "mcp_tunnel_refusals_total",
        "counter",
        "Requests the proxy answered itself, by reason.",
    );
    for (r, n) in s.proxy.refusals_snapshot() {
        let _ = writeln!(
            o,
            "mcp_tunnel_refusals_total{{reason=\"{}\"}} {n}",
            r.as_str()
        );
    }
    {
        use super::writer::{Kind, SinkName, dropped, written};
        head(
            &mut o,
            "mcp_tunnel_log_lines_dropped_total",
            "counter",
            "Log entries dropped because their sink (stderr or journald) did not take them in time (more than 8 MiB queued), by sink and kind (access, audit, other).",
        );
        for sink in SinkName::ALL {
            for kind in Kind::ALL {
                let _ = writeln!(
                    o,
                    "mcp_tunnel_log_lines_dropped_total{{sink=\"{}\",kind=\"{}\"}} {}",
                    sink.as_str(),
                    kind.as_str(),
                    dropped(sink, kind)
                );
            }
        }
        head(
            &mut o,
            "mcp_tunnel_log_lines_written_total",
            "counter",
            "Log entries their sink took, by sink and kind.",
        );
        for sink in SinkName::ALL {
            for kind in Kind::ALL {
                let _ = writeln!(
                    o,
                    "mcp_tunnel_log_lines_written_total{{sink=\"{}\",kind=\"{}\"}} {}",
                    sink.as_str(),
                    kind.as_str(),
                    written(sink, kind)
                );
            }
        }
    }
    scalar(
        &mut o,
        "mcp_tunnel_audit_records_total",
        "counter",
        "MCP audit records made; each is then written or counted as dropped by its sink (mcp_tunnel_log_lines_*_total{kind=\"audit\"}).",
        &crate::proxy::mcp::audit_records(),
    );
    scalar(
        &mut o,
        "mcp_tunnel_peer_check_enabled",
        "gauge",
        "1 when listener connections from users other than the service's own (and root, if allowed) are refused ([peer_check]).",
        &(u8::from(s.peer_check.get().is_some_and(|p| p.on))),
    );
    head(
        &mut o,
        "mcp_tunnel_peer_refusals_total",
        "counter",
        "Listener connections closed before the upgrade by the peer check: the peer socket belongs to another user (other_user), or its owner cannot be identified (unknown_owner).",
    );
    for (r, n) in s.proxy.peer_refusals_snapshot() {
        let _ = writeln!(
            o,
            "mcp_tunnel_peer_refusals_total{{reason=\"{}\"}} {n}",
            r.as_str()
        );
    }
    head(
        &mut o,
        "mcp_tunnel_limit_hits_total",
        "counter",
        "Times a [limits] bound refused or closed something, by limit; open_files counts accepts refused for want of file descriptors (LimitNOFILE).",
    );
    for (l, n) in s.proxy.limits_snapshot() {
        let _ = writeln!(
            o,
            "mcp_tunnel_limit_hits_total{{limit=\"{}\"}} {n}",
            l.as_str()
        );
    }
    scalar(
        &mut o,
        "mcp_tunnel_sessions_open",
        "gauge",
        "Open tunnel sessions (WebSocket + inner TLS).",
        &(s.proxy.sessions_open()),
    );
    head(
        &mut o,
        "mcp_tunnel_sessions_total",
        "counter",
        "Tunnel sessions accepted.",
    );
    let _ = writeln!(o, "mcp_tunnel_sessions_total {}", s.proxy.sessions_total());
    let k = &s.proxy.keepalive;
    for (name, help, v) in [
        (
            "mcp_tunnel_ws_pings_total",
            "WebSocket pings sent on idle tunnel sessions (limits.ws_ping_interval).",
            &k.ws_pings,
        ),
        (
            "mcp_tunnel_ws_pong_timeouts_total",
            "Tunnel sessions closed because the peer answered no ping (limits.ws_pong_timeout).",
            &k.ws_pong_timeouts,
        ),
        (
            "mcp_tunnel_sse_keepalives_total",
            "Keepalive comments injected into idle SSE responses (limits.sse_keepalive_interval).",
            &k.sse_comments,
        ),
    ] {
        scalar(&mut o, name, "counter", help, &(v.load(Ordering::Relaxed)));
    }
    scalar(
        &mut o,
        "mcp_tunnel_requests_in_flight",
        "gauge",
        "Requests in flight, until their response body ends (open streams, SSE included).",
        &(s.proxy.requests_in_flight()),
    );
    let h = s.cloudflared_health();
    let cf = s.cloudflared.get();
    scalar(
        &mut o,
        "mcp_tunnel_cloudflared_up",
        "gauge",
        "1 while cloudflared has at least one edge connection.",
        &(u8::from(h.is_ready() && h != Health::Disabled)),
    );
    scalar(
        &mut o,
        "mcp_tunnel_cloudflared_ready_connections",
        "gauge",
        "Edge connections cloudflared reports on /ready.",
        &(h.connections()),
    );
    scalar(
        &mut o,
        "mcp_tunnel_cloudflared_restarts_total",
        "counter",
        "cloudflared restarts by the supervisor.",
        &(cf.map_or(0, |c| c.restarts.load(Ordering::Relaxed))),
    );
    let incoming = cf.and_then(|c| c.incoming());
    scalar(
        &mut o,
        "mcp_tunnel_cloudflared_connectors",
        "gauge",
        "cloudflared processes serving the tunnel: 2 while a replacement overlaps the old one.",
        &(match (cf.map(|c| c.pid.load(Ordering::Relaxed)), incoming) {
            (Some(0) | None, None) => 0,
            (Some(0) | None, Some(_)) | (Some(_), None) => 1,
            (Some(_), Some(_)) => 2,
        }),
    );
    scalar(
        &mut o,
        "mcp_tunnel_cloudflared_incoming_ready_connections",
        "gauge",
        "Edge connections of the connector starting beside the running one (0 when none).",
        &(incoming.map_or(0, |(_, h)| h.connections())),
    );
    o.push_str("# HELP mcp_tunnel_cloudflared_replacements_total Planned connector replacements (new connector started beside the old one), by result.\n# TYPE mcp_tunnel_cloudflared_replacements_total counter\n");
    o.push_str(&format!(
        "mcp_tunnel_cloudflared_replacements_total{{result=\"ok\"}} {}\nmcp_tunnel_cloudflared_replacements_total{{result=\"failed\"}} {}\n",
        cf.map_or(0, |c| c.replacements.load(Ordering::Relaxed)),
        cf.map_or(0, |c| c.replacements_failed.load(Ordering::Relaxed)),
    ));
    scalar(
        &mut o,
        "mcp_tunnel_cloudflared_crash_loop",
        "gauge",
        "1 when cloudflared restarted too often inside the window.",
        &(cf.map_or(0, |c| u8::from(c.crash_loop.load(Ordering::Relaxed)))),
    );
    scalar(
        &mut o,
        "mcp_tunnel_cert_not_after_seconds",
        "gauge",
        "Server certificate notAfter, Unix seconds.",
        &(s.cert_not_after.load(Ordering::Relaxed)),
    );
    let na = s.cert_not_after.load(Ordering::Relaxed);
    scalar(
        &mut o,
        "mcp_tunnel_cert_expires_in_seconds",
        "gauge",
        "Seconds until the server certificate expires.",
        &(if na == 0 { 0 } else { na - now }),
    );
    scalar(
        &mut o,
        "mcp_tunnel_config_generation",
        "gauge",
        "Configuration generation (1 at start, +1 per applied reload).",
        &(s.config_generation.load(Ordering::Relaxed)),
    );
    scalar(
        &mut o,
        "mcp_tunnel_config_reload_failures_total",
        "counter",
        "Reloads refused (the previous config kept serving).",
        &(s.reload_failures.load(Ordering::Relaxed)),
    );
    scalar(
        &mut o,
        "mcp_tunnel_provision_failures_total",
        "counter",
        "Failed provisioning checks ([provision]: CA rotation, server certificate renewal, token rotation); each is retried.",
        &(s.provision_failures.load(Ordering::Relaxed)),
    );
    scalar(
        &mut o,
        "mcp_tunnel_cloudflared_enabled",
        "gauge",
        "1 when the appliance supervises cloudflared ([cloudflared] enabled).",
        &(u8::from(s.cloudflared_enabled)),
    );
    scalar(
        &mut o,
        "mcp_tunnel_max_sessions",
        "gauge",
        "limits.max_sessions: tunnel sessions beyond it are refused with 503.",
        &(s.max_sessions.load(Ordering::Relaxed)),
    );
    scalar(
        &mut o,
        "mcp_tunnel_cert_renewal_failures_total",
        "counter",
        "Failed renewals of the server certificate from the local CA ([certs] ca_key_file); each is retried at the next check.",
        &(s.cert_renewal_failures.load(Ordering::Relaxed)),
    );
    let last = s.last_reload();
    scalar(
        &mut o,
        "mcp_tunnel_config_last_reload_timestamp_seconds",
        "gauge",
        "When the last reload was attempted, Unix seconds (0: none since start).",
        &(last.as_ref().map_or(0, |l| l.at)),
    );
    scalar(
        &mut o,
        "mcp_tunnel_config_last_reload_success",
        "gauge",
        "0 when the last reload was refused (the running config is older than the file), else 1.",
        &(u8::from(last.is_none_or(|l| l.error.is_none()))),
    );
    scalar(
        &mut o,
        "mcp_tunnel_ready",
        "gauge",
        "1 when every component is ready (as /readyz).",
        &(u8::from(readiness(s, now).iter().all(|c| c.ready))),
    );
    scalar(
        &mut o,
        "mcp_tunnel_severed",
        "gauge",
        "1 once `mcp-tunnel sever` took effect: no tunnel on this host until `mcp-tunnel sever --lift`.",
        &u8::from(s.severed().is_some()),
    );
    head(
        &mut o,
        "mcp_tunnel_incident_actions_total",
        "counter",
        "Incident actions this process carried out (mcp-tunnel sever, setup rotate --now), by action.",
    );
    for (action, n) in s
        .incident_actions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
    {
        let _ = writeln!(
            o,
            "mcp_tunnel_incident_actions_total{{action=\"{action}\"}} {n}"
        );
    }
    render_mcp(&mut o, &s.proxy.mcp);
    o
}

/// The MCP metrics of inspected routes (`inspect = true` or a tool policy).
fn render_mcp(o: &mut String, mcp: &crate::proxy::metrics::McpMetrics) {
    use crate::proxy::metrics::LATENCY_BUCKETS;
    let snap = mcp.snapshot();
    let head = |o: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    head(
        o,
        "mcp_tunnel_mcp_messages_total",
        "counter",
        "MCP client messages (requests, notifications, responses) on inspected routes, by route, method (unknown methods: other) and outcome.",
    );
    for (route, st) in &snap {
        for ((method, outcome), n) in &st.messages {
            let _ = writeln!(
                o,
                "mcp_tunnel_mcp_messages_total{{route=\"{}\",method=\"{method}\",outcome=\"{}\"}} {n}",
                label(route),
                outcome.as_str()
            );
        }
    }
    head(
        o,
        "mcp_tunnel_mcp_tool_calls_total",
        "counter",
        "tools/call by route, tool (a name the server does not know, or beyond [mcp] max_tool_labels: other) and outcome.",
    );
    for (route, st) in &snap {
        for (tool, counts) in &st.tools {
            for (outcome, n) in crate::mcp::Outcome::ALL.iter().zip(counts) {
                if *n > 0 {
                    let _ = writeln!(
                        o,
                        "mcp_tunnel_mcp_tool_calls_total{{route=\"{}\",tool=\"{}\",outcome=\"{}\"}} {n}",
                        label(route),
                        label(tool),
                        outcome.as_str()
                    );
                }
            }
        }
    }
    head(
        o,
        "mcp_tunnel_mcp_request_duration_seconds",
        "histogram",
        "Time from an MCP request's arrival to its answer (refused ones excluded), by route and method.",
    );
    for (route, st) in &snap {
        for (method, h) in &st.latency {
            let route = label(route);
            let mut cumulative = 0;
            for (i, n) in h.buckets.iter().enumerate() {
                cumulative += n;
                let le = LATENCY_BUCKETS
                    .get(i)
                    .map_or("+Inf".to_string(), |b| b.to_string());
                let _ = writeln!(
                    o,
                    "mcp_tunnel_mcp_request_duration_seconds_bucket{{route=\"{route}\",method=\"{method}\",le=\"{le}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                o,
                "mcp_tunnel_mcp_request_duration_seconds_sum{{route=\"{route}\",method=\"{method}\"}} {}\nmcp_tunnel_mcp_request_duration_seconds_count{{route=\"{route}\",method=\"{method}\"}} {}",
                h.sum, h.count
            );
        }
    }
    head(
        o,
        "mcp_tunnel_mcp_uninspected_total",
        "counter",
        "Bodies or SSE events on inspected routes that were not read (too large, not JSON, compressed), by route and reason.",
    );
    for (route, st) in &snap {
        for (reason, n) in &st.uninspected {
            let _ = writeln!(
                o,
                "mcp_tunnel_mcp_uninspected_total{{route=\"{}\",reason=\"{reason}\"}} {n}",
                label(route)
            );
        }
    }
    head(
        o,
        "mcp_tunnel_mcp_refused_total",
        "counter",
        "Client messages the proxy answered itself instead of forwarding, by route and reason (policy denials, header_mismatch, bodies that could not be judged).",
    );
    for (route, st) in &snap {
        for (reason, n) in &st.refused {
            let _ = writeln!(
                o,
                "mcp_tunnel_mcp_refused_total{{route=\"{}\",reason=\"{reason}\"}} {n}",
                label(route)
            );
        }
    }
    head(
        o,
        "mcp_tunnel_mcp_tools_hidden_total",
        "counter",
        "Tools taken out of tools/list results by the route's policy.",
    );
    for (route, st) in &snap {
        let _ = writeln!(
            o,
            "mcp_tunnel_mcp_tools_hidden_total{{route=\"{}\"}} {}",
            label(route),
            st.tools_hidden
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_readiness_without_cloudflared() {
        let s = AppState::new(Arc::default(), false);
        s.routes.store(3, Ordering::Relaxed);
        s.cert_not_after
            .store(1000 + 61 * 86400 + 5, Ordering::Relaxed);
        assert_eq!(
            status_line(&s, 1000),
            "NOT READY (listener); cloudflared disabled; 3 routes; cert expires in 61d"
        );
        let (ready, _) = readyz(&s, 1000);
        assert!(!ready, "listener not bound yet");
        s.listener_bound.store(true, Ordering::Relaxed);
        let (ready, body) = readyz(&s, 1000);
        assert!(ready, "{body}");
        assert_eq!(
            status_line(&s, 1000),
            "cloudflared disabled; 3 routes; cert expires in 61d"
        );
        let (ready, body) = readyz(&s, 1000 + 62 * 86400);
        assert!(!ready && body.contains("expired"), "{body}");
        assert_eq!(
            status_line(&s, 1000 + 62 * 86400),
            "NOT READY (certificate); cloudflared disabled; 3 routes; CERT EXPIRED"
        );
        s.proxy.request("echo", 200);
        s.proxy.request("", 502);
        let m = render(&s, 1000);
        assert!(
            m.contains("mcp_tunnel_requests_total{route=\"echo\",status=\"200\"} 1"),
            "{m}"
        );
        assert!(
            m.contains("mcp_tunnel_requests_total{route=\"\",status=\"502\"} 1"),
            "{m}"
        );
    }

    #[test]
    fn peer_check_in_readyz_metrics_and_status() {
        use crate::proxy::metrics::PeerRefusal;
        let s = AppState::new(Arc::default(), true);
        let m = render(&s, 0);
        assert!(m.contains("mcp_tunnel_peer_check_enabled 0\n"), "{m}");
        assert!(readiness(&s, 0).iter().all(|c| c.name != "peer_check"));
        s.peer_check
            .set(PeerCheckStatus {
                on: true,
                state: "on: uid 998 (mcp-tunnel) only".into(),
            })
            .unwrap();
        s.proxy.peer_refusal(PeerRefusal::OtherUser);
        s.proxy.peer_refusal(PeerRefusal::OtherUser);
        s.proxy.peer_refusal(PeerRefusal::UnknownOwner);
        let c = readiness(&s, 0);
        let p = c.iter().find(|c| c.name == "peer_check").unwrap();
        assert!(p.ready);
        assert_eq!(p.state, "on: uid 998 (mcp-tunnel) only");
        let m = render(&s, 0);
        for line in [
            "mcp_tunnel_peer_check_enabled 1\n",
            "mcp_tunnel_peer_refusals_total{reason=\"other_user\"} 2\n",
            "mcp_tunnel_peer_refusals_total{reason=\"unknown_owner\"} 1\n",
        ] {
            assert!(m.contains(line), "{line} in {m}");
        }
        let body = super::super::admin::status_json(&s, 0).to_string();
        let text = super::super::status::summary("127.0.0.1:9180".parse().unwrap(), &body);
        assert!(
            text.contains("  peer_check   ready     on: uid 998 (mcp-tunnel) only\n"),
            "{text}"
        );
        assert!(
            text.contains("refused by the peer check: 2 from other users, 1 of unknown owner"),
            "{text}"
        );
    }

    #[test]
    fn enabled_but_not_started_is_not_ready() {
        let s = AppState::new(Arc::default(), true);
        s.listener_bound.store(true, Ordering::Relaxed);
        s.cert_not_after.store(i64::MAX, Ordering::Relaxed);
        let c = readiness(&s, 0);
        let cf = c.iter().find(|c| c.name == "cloudflared").unwrap();
        assert!(!cf.ready);
    }
}
