//! The `[cloudflared]` section: how the supervisor runs and watches cloudflared.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{Validator, duration};

/// How a planned replacement of cloudflared runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Replacement {
    /// Start the new connector beside the old one, stop the old one once the new one has
    /// registered: no gap in service (the edge allows several connectors per tunnel).
    Overlap,
    /// Stop the old connector, then start the new one (the tunnel is down in between).
    Restart,
}

/// cloudflared supervision settings. Durations are validated (non-zero where zero would
/// make no sense, min <= max for the backoff).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudflaredConfig {
    /// `false` runs the proxy alone (cloudflared runs as its own service, or in tests).
    pub enabled: bool,
    /// Explicit binary; `None` means the bundled `/usr/lib/mcp-tunnel/cloudflared`, then PATH.
    pub binary: Option<PathBuf>,
    /// Explicit token file; `None` means `$CREDENTIALS_DIRECTORY/tunnel-token` (systemd
    /// `LoadCredential=`), then the state directory's `tunnel-token`.
    pub token_file: Option<PathBuf>,
    /// Loopback port for cloudflared's metrics server; `None`: the supervisor picks a free one.
    pub metrics_port: Option<u16>,
    /// `--loglevel`; `None` follows the top-level `log_level`.
    pub loglevel: Option<String>,
    /// `--grace-period`: how long cloudflared drains after SIGTERM before it exits.
    pub grace_period: Duration,
    /// Readiness must come within this long after a start, else the child is restarted.
    pub startup_timeout: Duration,
    /// How often `/ready` is polled.
    pub health_interval: Duration,
    /// A metrics server silent for this long means a hung child: restart it.
    pub hung_timeout: Duration,
    /// `Some(d)`: restart when `/ready` stays 503 for `d` after having been ready. `None`
    /// (default) leaves reconnection to cloudflared's own retries and only reports it.
    pub disconnected_restart_after: Option<Duration>,
    /// Hold `READY=1` back until cloudflared has an edge connection.
    pub ready_requires_tunnel: bool,
    pub restart_backoff_min: Duration,
    pub restart_backoff_max: Duration,
    /// Ready for this long resets the backoff.
    pub restart_reset_after: Duration,
    /// This many restarts inside `crash_loop_window` is reported as a crash loop.
    pub crash_loop_restarts: u32,
    pub crash_loop_window: Duration,
    /// The edge refusing the token for this long, with no registration accepted in between
    /// and no connection up, is given up on (exit 78). cloudflared itself retries refusals
    /// forever: a new token can take minutes to reach the edge.
    pub token_refused_timeout: Duration,
    /// How a planned replacement (token or section changed, operator request) runs.
    pub replacement: Replacement,
    /// Edge connections the new connector must register before the old one is stopped
    /// (at most as many as the old one has).
    pub replace_connections: u32,
    /// The new connector not registered within this long: it is stopped, the old one stays.
    pub replace_timeout: Duration,
    /// Extra environment for cloudflared (e.g. `HTTPS_PROXY`); everything else is cleared.
    pub env: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCloudflared {
    enabled: Option<bool>,
    binary: Option<PathBuf>,
    token_file: Option<PathBuf>,
    metrics_port: Option<u16>,
    loglevel: Option<String>,
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    grace_period: Option<Duration>,
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    startup_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    health_interval: Option<Duration>,
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    hung_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    disconnected_restart_after: Option<Duration>,
    ready_requires_tunnel: Option<bool>,
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    restart_backoff_min: Option<Duration>,
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    restart_backoff_max: Option<Duration>,
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    restart_reset_after: Option<Duration>,
    crash_loop_restarts: Option<u32>,
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    crash_loop_window: Option<Duration>,
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    token_refused_timeout: Option<Duration>,
    replacement: Option<Replacement>,
    replace_connections: Option<u32>,
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    replace_timeout: Option<Duration>,
    #[serde(default)]
    env: BTreeMap<String, String>,
}

/// Variables the supervisor sets itself or must never hand down.
const RESERVED_ENV: [&str; 6] = [
    "TUNNEL_TOKEN",
    "TUNNEL_TOKEN_FILE",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "CREDENTIALS_DIRECTORY",
];

const LOGLEVELS: [&str; 5] = ["debug", "info", "warn", "error", "fatal"];

pub(super) fn validate(raw: RawCloudflared, base: &Path, v: &mut Validator) -> CloudflaredConfig {
    let positive = |v: &mut Validator, field: &str, d: Option<Duration>, default: Duration| {
        let d = d.unwrap_or(default);
        if d.is_zero() {
            v.push(
                &format!("cloudflared.{field}"),
                "expected a positive duration such as \"5s\"",
            );
            return default;
        }
        d
    };
    let c = CloudflaredConfig {
        enabled: raw.enabled.unwrap_or(true),
        binary: raw.binary.map(|p| {
            // A bare name ("cloudflared") is looked up on PATH, not next to the config.
            if p.components().count() == 1 {
                p
            } else {
                base.join(p)
            }
        }),
        token_file: raw.token_file.map(|p| base.join(p)),
        metrics_port: raw.metrics_port,
        loglevel: raw.loglevel,
        grace_period: raw.grace_period.unwrap_or(Duration::from_secs(30)),
        startup_timeout: positive(
            v,
            "startup_timeout",
            raw.startup_timeout,
            Duration::from_secs(60),
        ),
        health_interval: positive(
            v,
            "health_interval",
            raw.health_interval,
            Duration::from_secs(2),
        ),
        hung_timeout: positive(v, "hung_timeout", raw.hung_timeout, Duration::from_secs(15)),
        disconnected_restart_after: raw.disconnected_restart_after,
        ready_requires_tunnel: raw.ready_requires_tunnel.unwrap_or(false),
        restart_backoff_min: positive(
            v,
            "restart_backoff_min",
            raw.restart_backoff_min,
            Duration::from_secs(1),
        ),
        restart_backoff_max: positive(
            v,
            "restart_backoff_max",
            raw.restart_backoff_max,
            Duration::from_secs(60),
        ),
        restart_reset_after: raw.restart_reset_after.unwrap_or(Duration::from_secs(120)),
        crash_loop_restarts: raw.crash_loop_restarts.unwrap_or(5),
        crash_loop_window: raw.crash_loop_window.unwrap_or(Duration::from_secs(300)),
        token_refused_timeout: positive(
            v,
            "token_refused_timeout",
            raw.token_refused_timeout,
            Duration::from_secs(600),
        ),
        replacement: raw.replacement.unwrap_or(Replacement::Overlap),
        replace_connections: raw
            .replace_connections
            .unwrap_or(crate::cloudflared::policy::EXPECTED_CONNECTIONS),
        replace_timeout: positive(
            v,
            "replace_timeout",
            raw.replace_timeout,
            Duration::from_secs(60),
        ),
        env: raw.env,
    };
    if c.restart_backoff_min > c.restart_backoff_max {
        v.push(
            "cloudflared.restart_backoff_min",
            "expected restart_backoff_min <= restart_backoff_max",
        );
    }
    if !(1..=crate::cloudflared::policy::EXPECTED_CONNECTIONS).contains(&c.replace_connections) {
        v.push(
            "cloudflared.replace_connections",
            format!(
                "expected 1 to {} (edge connections the new connector must register)",
                crate::cloudflared::policy::EXPECTED_CONNECTIONS
            ),
        );
    }
    if c.metrics_port == Some(0) {
        v.push(
            "cloudflared.metrics_port",
            "expected a port number 1-65535, or remove the field to let the supervisor pick one",
        );
    }
    if let Some(l) = &c.loglevel
        && !LOGLEVELS.contains(&l.as_str())
    {
        v.push(
            "cloudflared.loglevel",
            format!("expected one of {LOGLEVELS:?}, found {l:?}"),
        );
    }
    for key in c.env.keys() {
        if RESERVED_ENV.contains(&key.as_str()) {
            v.push(
                &format!("cloudflared.env.{key}"),
                "set by the supervisor: the token comes from cloudflared.token_file, and systemd variables are never passed to cloudflared",
            );
        }
    }
    c
}
