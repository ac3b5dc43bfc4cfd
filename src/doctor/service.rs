//! The running service, as its admin endpoint's `/status` describes it: readiness per
//! component, the config generation and the last refused reload, the watchdog.

use std::net::SocketAddr;

use super::{Check, Options};
use crate::config::Config;

/// What the admin endpoint said.
pub(super) enum Service {
    /// `[admin] enabled = false`: nothing to ask.
    AdminDisabled,
    /// No answer: the service is not running (or its admin endpoint is elsewhere).
    Unreachable { addr: SocketAddr, error: String },
    Running {
        addr: SocketAddr,
        status: serde_json::Value,
    },
}

impl Service {
    /// The `/status` document, when the service answered.
    pub fn status(&self) -> Option<&serde_json::Value> {
        match self {
            Service::Running { status, .. } => Some(status),
            _ => None,
        }
    }

    /// The running listener's bound address.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.status()?["listen_addr"].as_str()?.parse().ok()
    }
}

pub(super) async fn fetch(config: &Config, opts: &Options) -> Service {
    if !config.admin.enabled {
        return Service::AdminDisabled;
    }
    let addr = config.admin.listen_addr;
    let got = tokio::time::timeout(opts.timeout, crate::telemetry::status::get(addr, "/status"))
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {:?}", opts.timeout)));
    match got {
        Ok((_, body)) => match serde_json::from_str::<serde_json::Value>(&body) {
            Ok(status) if status.get("components").is_some() => Service::Running { addr, status },
            _ => Service::Unreachable {
                addr,
                error: "it answers, but /status is not an mcp-tunnel status document (another program on that port, or an older mcp-tunnel?)".into(),
            },
        },
        Err(error) => Service::Unreachable { addr, error },
    }
}

pub(super) fn checks(config: &Config, service: &Service, out: &mut Vec<Check>) {
    let (addr, status) = match service {
        Service::AdminDisabled => {
            out.push(Check::skip(
                "service",
                "[admin] enabled = false: the running service cannot be inspected",
            ));
            return;
        }
        Service::Unreachable { addr, error } => {
            out.push(Check::warn(
                "service.admin",
                format!(
                    "no answer from the admin endpoint at {addr}: {error}; the service does not seem to run (routes were probed through an in-process proxy)"
                ),
                "start it (`systemctl start mcp-tunnel`) and read why it stopped (`journalctl -u mcp-tunnel`)",
            ));
            return;
        }
        Service::Running { addr, status } => (addr, status),
    };
    out.push(
        Check::ok(
            "service.admin",
            format!(
                "the admin endpoint at {addr} answers; listener on {}",
                status["listen_addr"].as_str().unwrap_or("?")
            ),
        )
        .fact("admin", addr.to_string()),
    );
    for c in status["components"].as_array().into_iter().flatten() {
        let name = c["name"].as_str().unwrap_or("?");
        let state = c["state"].as_str().unwrap_or("");
        let check = format!("service.{name}");
        out.push(if c["ready"].as_bool() == Some(true) {
            Check::ok(check, format!("ready: {state}"))
        } else {
            let fix = match name {
                "listener" => format!(
                    "the proxy could not bind listen_addr {}: `journalctl -u mcp-tunnel`",
                    config.listen_addr
                ),
                "certificate" => "see the certificate checks above; the service swaps a renewed pair in without a restart".into(),
                "cloudflared" => "see the cloudflared checks above, and its log lines: `journalctl -u mcp-tunnel` (target cloudflared)".into(),
                _ => "`journalctl -u mcp-tunnel`".into(),
            };
            Check::fail(
                check,
                format!(
                    "not ready: {state}{}",
                    c["reason"]
                        .as_str()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default()
                ),
                fix,
            )
        });
    }
    let cfg = &status["config"];
    let generation = cfg["generation"].as_u64().unwrap_or(0);
    out.push(match cfg["last_reload_error"].as_str() {
        None => Check::ok(
            "service.config",
            format!(
                "config generation {generation}; the last reload applied ({} refused since start)",
                cfg["reload_failures"].as_u64().unwrap_or(0)
            ),
        ),
        Some(e) => Check::warn(
            "service.config",
            format!("the last reload was refused, generation {generation} keeps serving: {e}"),
            format!(
                "fix the file (`mcp-tunnel check --config {}`); the service applies it when it is saved",
                config.path.display()
            ),
        ),
    }
    .fact("generation", generation));
    out.push(match status["watchdog_usec"].as_u64() {
        Some(us) => Check::ok(
            "service.watchdog",
            format!(
                "systemd watchdog WatchdogSec={}s, keep-alives while the accept and supervision loops progress",
                us / 1_000_000
            ),
        ),
        None => Check::warn(
            "service.watchdog",
            "the service runs without a systemd watchdog (no WATCHDOG_USEC): a wedged process would not be restarted",
            "run it as the packaged unit (mcp-tunnel.service sets WatchdogSec=)",
        ),
    });
}
