//! `mcp-tunnel doctor`: checks the whole chain (config, certificate, each route through the
//! real inner path, cloudflared, the running service) and says for each problem what is wrong
//! and the exact fix. Checks are data ([`Check`]); text and JSON are renderings of them.
//!
//! Every rule comes from the room that enforces it: route lookup (`config::routes`), the
//! address policy (`config::ipset`, `proxy::upstream`), certificate preflight
//! (`certs::preflight`), the WebSocket + inner TLS client (`proxy::edge`), the token parser
//! and cloudflared's argv (`cloudflared`), the admin endpoint's `/status` (`telemetry`).
//! Nothing here decides differently from the data path.
//!
//! Nothing leaves loopback and the configured upstreams unless asked: the edge reachability
//! check (DNS SRV lookup, TCP 7844) and the Tunnels API check are skipped under `--offline`.

mod certificate;
mod cloudflared;
mod config;
pub mod edge;
pub mod explain;
mod probe;
mod routes;
mod service;

use std::ffi::OsString;
use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::proxy::upstream::{Resolve, SystemResolver};

/// How one check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Ok,
    Warn,
    Fail,
    /// Not applicable here, or not run (`--offline`, an earlier failure); the reason says why.
    Skip,
}

impl Verdict {
    fn label(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
            Verdict::Skip => "skip",
        }
    }
}

/// One finding: what was checked, the verdict, a one-line reason and, unless ok, the fix.
/// `facts` carries the measured values (addresses, latency, versions) for `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub verdict: Verdict,
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub facts: serde_json::Map<String, serde_json::Value>,
}

impl Check {
    fn new(name: impl Into<String>, verdict: Verdict, reason: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            verdict,
            reason: reason.into(),
            fix: None,
            facts: serde_json::Map::new(),
        }
    }

    /// Passed; the reason says what was seen.
    pub fn ok(name: impl Into<String>, reason: impl Into<String>) -> Check {
        Check::new(name, Verdict::Ok, reason)
    }

    /// Not run here; the reason says why.
    pub fn skip(name: impl Into<String>, reason: impl Into<String>) -> Check {
        Check::new(name, Verdict::Skip, reason)
    }

    /// Works, but something will bite later or is weaker than it should be.
    pub fn warn(
        name: impl Into<String>,
        reason: impl Into<String>,
        fix: impl Into<String>,
    ) -> Check {
        Check::new(name, Verdict::Warn, reason).with_fix(fix)
    }

    /// Broken: requests fail, or the service refuses to start, until the fix is applied.
    pub fn fail(
        name: impl Into<String>,
        reason: impl Into<String>,
        fix: impl Into<String>,
    ) -> Check {
        Check::new(name, Verdict::Fail, reason).with_fix(fix)
    }

    fn with_fix(mut self, fix: impl Into<String>) -> Check {
        self.fix = Some(fix.into());
        self
    }

    /// Adds a measured value.
    pub fn fact(mut self, key: &str, value: impl Into<serde_json::Value>) -> Check {
        self.facts.insert(key.to_string(), value.into());
        self
    }
}

/// Every check of one run, in report order.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub config: PathBuf,
    pub checks: Vec<Check>,
}

impl Report {
    /// Whether any check failed (exit status 1).
    pub fn failed(&self) -> bool {
        self.checks.iter().any(|c| c.verdict == Verdict::Fail)
    }

    /// The check called `name`.
    pub fn get(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }

    fn count(&self, v: Verdict) -> usize {
        self.checks.iter().filter(|c| c.verdict == v).count()
    }

    /// The human report: one line per check, the fix under anything not ok.
    pub fn text(&self) -> String {
        let mut out = format!("mcp-tunnel doctor: {}\n", self.config.display());
        let width = self.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        for c in &self.checks {
            let _ = writeln!(
                out,
                "  {:<4}  {:<width$}  {}",
                c.verdict.label(),
                c.name,
                c.reason
            );
            if let Some(fix) = &c.fix {
                let _ = writeln!(out, "  {:<4}  {:<width$}  fix: {fix}", "", "");
            }
        }
        let _ = writeln!(
            out,
            "{} ok, {} warn, {} fail, {} skipped",
            self.count(Verdict::Ok),
            self.count(Verdict::Warn),
            self.count(Verdict::Fail),
            self.count(Verdict::Skip)
        );
        out
    }

    /// The report as JSON (`--json`): `{"config", "ok", "checks": [...]}`.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "config": self.config,
            "ok": !self.failed(),
            "checks": self.checks,
        })
    }
}

/// What to check.
#[derive(Debug, Clone)]
pub struct Options {
    pub config: PathBuf,
    /// Skip everything that would leave the machine (edge reachability, Tunnels API).
    pub offline: bool,
    /// The path the MCP probe sends `initialize` to.
    pub mcp_path: String,
    /// Bound on each network step (connect, handshake, answer).
    pub timeout: Duration,
}

impl Options {
    /// The CLI's defaults: online, `/mcp`, 10 s per step.
    pub fn new(config: impl Into<PathBuf>) -> Options {
        Options {
            config: config.into(),
            offline: false,
            mcp_path: "/mcp".into(),
            timeout: Duration::from_secs(10),
        }
    }
}

/// Looks up an environment variable.
pub type VarLookup = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// The world the checks look at, injectable so that tests can play DNS and the clock.
#[derive(Clone)]
pub struct Env {
    pub resolver: Arc<dyn Resolve>,
    /// Unix seconds.
    pub now: i64,
    /// `PATH`, for finding cloudflared.
    pub path_var: Option<OsString>,
    /// systemd's `$CREDENTIALS_DIRECTORY`, for the token file.
    pub credentials_dir: Option<PathBuf>,
    /// Process environment lookups (the Tunnels API credentials of `[provision]`).
    pub var: VarLookup,
}

impl Env {
    /// The real system: getaddrinfo, the clock, this process's environment.
    pub fn system() -> Env {
        Env {
            resolver: Arc::new(SystemResolver),
            now: crate::supervisor::reload::unix_now(),
            path_var: std::env::var_os("PATH"),
            credentials_dir: std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from),
            var: Arc::new(|k| std::env::var(k).ok()),
        }
    }
}

/// Runs every check. Order: config, certificate, routes, cloudflared, service.
pub async fn run(opts: &Options, env: &Env) -> Report {
    let mut checks = Vec::new();
    let Some(config) = config::checks(&opts.config, &mut checks) else {
        return Report {
            config: opts.config.clone(),
            checks,
        };
    };
    let cert = certificate::checks(&config, opts, env, &mut checks).await;
    let service = service::fetch(&config, opts).await;
    routes::checks(&config, &cert, &service, opts, env, &mut checks).await;
    cloudflared::checks(&config, &service, opts, env, &mut checks).await;
    service::checks(&config, &service, &mut checks);
    Report {
        config: opts.config.clone(),
        checks,
    }
}

/// `path`'s permission bits, for reasons such as "mode 0600".
fn mode(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .ok()
        .map(|m| m.permissions().mode() & 0o7777)
}

/// `mcp-tunnel doctor`: prints the report; exit 0 when nothing failed, 1 otherwise.
pub fn main(opts: &Options, json: bool) -> u8 {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return 1;
        }
    };
    let report = rt.block_on(run(opts, &Env::system()));
    if json {
        println!("{:#}", report.json());
    } else {
        print!("{}", report.text());
    }
    u8::from(report.failed())
}
