//! `mcp-tunnel setup rotate --now [--cert] [--token] [--ca]`: the runbook's "rotate the
//! token and the certificates" after a suspected leak, at once instead of on schedule.
//!
//! While the service runs, its provisioning task alone writes the state directory's
//! certificates and token (`supervisor::provisioning`): a second writer would race it, and the
//! proxy does not watch that pair. So this command does not rotate anything itself then: it
//! leaves a request file in the state directory, sends SIGHUP, and waits for the task's
//! outcome in `/status`. The task runs the same steps as a scheduled rotation, which is what
//! makes them gapless: the new certificate is installed for new handshakes while open
//! sessions keep theirs, the new token file makes the cloudflared supervisor start a new
//! connector beside the old one, and the old CA is archived only once certificates under the
//! new one are served. With no service running nothing serves, and the command runs the
//! steps itself.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::provision::{self, ErrorClass, InstallCert, PendingRotation, ProvisionError, Settings};

/// The request's file name in the state directory.
pub const REQUEST: &str = "rotate-now";

/// What to rotate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct What {
    pub cert: bool,
    pub token: bool,
    pub ca: bool,
}

impl What {
    /// The flags as given; none of them means the issue's default, certificate and token.
    pub fn from_flags(cert: bool, token: bool, ca: bool) -> What {
        if !(cert || token || ca) {
            return What {
                cert: true,
                token: true,
                ca: false,
            };
        }
        What { cert, token, ca }
    }

    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.ca {
            parts.push("CA (and the server certificate under it)");
        } else if self.cert {
            parts.push("server key and certificate");
        }
        if self.token {
            parts.push("tunnel token");
        }
        parts.join(" and ")
    }
}

/// A request for the running service, written by the command and consumed by the task.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Request {
    /// Matches the request with its outcome in `/status`.
    pub id: String,
    pub what: What,
    /// Sent as the `reason` of `rotate_token` (the API records it).
    pub reason: String,
    /// Unix seconds.
    pub since: i64,
    pub by_uid: u32,
}

/// What a rotation did, as `/status` shows it (`rotation.last`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Outcome {
    pub id: String,
    /// Unix seconds, when it finished.
    pub at: i64,
    /// One line per step that took effect, in order.
    pub done: Vec<String>,
    /// Why it stopped; the steps in `done` stay done.
    pub error: Option<String>,
    /// `transient` errors are worth a retry; `config` ones need a person.
    pub error_class: Option<String>,
}

pub fn request_path(state_dir: &Path) -> PathBuf {
    state_dir.join(REQUEST)
}

/// Writes the request whole (a temporary file renamed over it).
pub fn write_request(state_dir: &Path, r: &Request) -> Result<(), String> {
    let body = serde_json::to_string_pretty(r).map_err(|e| e.to_string())?;
    provision::StateDir::open(state_dir)
        .write(REQUEST, &body)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The pending request, if any. One that does not parse is reported, not run: a rotation
/// is never guessed.
pub fn read_request(state_dir: &Path) -> Result<Option<Request>, String> {
    let path = request_path(state_dir);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("{}: not a rotation request: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

pub fn remove_request(state_dir: &Path) {
    let _ = std::fs::remove_file(request_path(state_dir));
}

/// Runs the rotations of `what`: an interrupted CA rotation's last step first (as a scheduled
/// check would), then the token, then the CA (which reissues the server certificate) or the
/// server certificate alone. The token goes before the certificate, which needs no API, so
/// that an API refusal of the default pair leaves the state directory as it was. It stops at
/// the first failure; every step is written whole, so what `done` lists took effect and the
/// rest did not.
pub async fn perform(
    settings: &Settings,
    what: What,
    reason: &str,
    installer: &dyn InstallCert,
    settle: Duration,
) -> (Vec<String>, Result<(), ProvisionError>) {
    let mut done = Vec::new();
    let result = steps(settings, what, reason, installer, settle, &mut done).await;
    (done, result)
}

async fn steps(
    settings: &Settings,
    what: What,
    reason: &str,
    installer: &dyn InstallCert,
    settle: Duration,
    done: &mut Vec<String>,
) -> Result<(), ProvisionError> {
    let output = &settings.output;
    if provision::pending_rotation(output) == PendingRotation::Archive
        && let Some(id) = provision::archive_previous_ca(settings).await?
    {
        done.push(format!(
            "finished an interrupted CA rotation: the previous CA's record {id} is archived"
        ));
    }
    if what.token {
        let id = provision::rotate_token(settings, reason).await?;
        done.push(format!(
            "tunnel token rotated (new token {id}, reason {reason:?}): the old one admits no new connector"
        ));
    }
    if what.ca {
        let fresh = provision::pending_rotation(output) != PendingRotation::Rotate;
        match provision::rotate_ca(settings, installer, settle).await {
            Ok(r) => {
                done.push(format!(
                    "new CA {}, registered on the tunnel; server key and certificate reissued under it ({}) and served to new handshakes",
                    r.registered
                        .as_deref()
                        .map_or("(already registered)".into(), |id| format!("record {id}")),
                    cert_facts(output)
                ));
                done.push(match r.archived {
                    Some(id) => format!(
                        "old CA archived (record {id}): certificates under it no longer verify"
                    ),
                    None => "old CA: no active record was left to archive".into(),
                });
            }
            Err(e) => {
                // An unregistered new CA is worth nothing, and a left `ca-next.*` would make
                // the service resume the rotation on its own: a refused rotation leaves the
                // directory as it was. A transient failure keeps it, as the registration may
                // have reached the API; the service (or a rerun) resumes with the same key.
                if fresh && e.class() != ErrorClass::Transient {
                    let dir = provision::StateDir::open(output);
                    let _ = dir.remove(provision::state::CA_NEXT_CRT);
                    let _ = dir.remove(provision::state::CA_NEXT_KEY);
                }
                return Err(e);
            }
        }
    } else if what.cert {
        provision::renew_cert(output, settings.cert_duration, Duration::ZERO)?;
        installer.install(provision::load_server(output).map_err(ProvisionError::from)?);
        done.push(format!(
            "new server key and certificate ({}), served to new handshakes; open sessions keep theirs until they close",
            cert_facts(output)
        ));
    }
    Ok(())
}

fn cert_facts(output: &Path) -> String {
    provision::StateDir::open(output)
        .read(provision::state::TLS_CRT)
        .and_then(|pem| crate::certs::issue::not_after_pem(&pem))
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .map_or_else(|| "expiry unknown".into(), |t| format!("valid until {t}"))
}

/// The error classes as `/status` spells them.
pub fn class_name(c: ErrorClass) -> &'static str {
    match c {
        ErrorClass::Transient => "transient",
        ErrorClass::Config => "config",
        ErrorClass::Permanent => "permanent",
    }
}

/// What a person must do on the other hosts of the tunnel afterwards (docs/PACKAGING.md,
/// "Scaling out"); this host cannot reach them.
pub fn other_hosts(what: What, state_dir: &Path) -> String {
    let d = state_dir.display();
    let mut o = String::from(
        "other hosts of this tunnel (docs/PACKAGING.md, \"Scaling out\"), if any: copy, then `systemctl reload mcp-tunnel` there:\n",
    );
    if what.ca || what.cert {
        o.push_str(&format!(
            "  {d}/tls.crt and {d}/tls.key (the server pair every host must present)\n"
        ));
    }
    if what.ca {
        o.push_str(&format!(
            "  {d}/ca.crt (ca.key stays on the host that issues certificates). The old CA is archived: until a host has the new pair, its inner-TLS handshakes fail\n"
        ));
    }
    if what.token {
        o.push_str(&format!(
            "  {d}/tunnel-token (each host's cloudflared is replaced on it without a gap)\n"
        ));
        o.push_str(
            "connectors that already hold the old token, on any host, stay connected until they restart or the tunnel is archived (`mcp-tunnel setup archive`): rotating the token only refuses new ones\n",
        );
    }
    o
}

/// What `mcp-tunnel setup rotate --now` was asked.
pub struct Options {
    pub config: PathBuf,
    pub section: Option<crate::config::ProvisionConfig>,
    pub admin: Option<SocketAddr>,
    pub what: What,
    pub reason: String,
    pub overrides: provision::Overrides,
}

/// Exit 0 when every step is done (and, for the token, cloudflared replaced), 1 when a step
/// failed or the service did not confirm, 78 when a person must fix the configuration.
pub fn main(opts: &Options) -> u8 {
    let state_dir = match &opts.overrides.output {
        Some(o) => match provision::parse_output(o) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("error: {e}");
                return EXIT_CONFIG;
            }
        },
        None => opts.section.as_ref().map_or_else(
            || PathBuf::from(crate::config::provision::DEFAULT_STATE_DIR),
            |s| s.state_dir.clone(),
        ),
    };
    let settle = opts
        .section
        .as_ref()
        .map_or(Duration::from_secs(300), |s| s.ca_rotation_settle);
    let Some(rt) = crate::telemetry::status::client_runtime() else {
        return 1;
    };
    let addr = crate::telemetry::status::admin_addr(opts.admin, &opts.config);
    println!("rotating now: {}", opts.what.describe());
    let code = match rt.block_on(ask_service(opts, addr, &state_dir, settle)) {
        Asked::Answered(code) => code,
        Asked::NoService(why) => {
            println!("{why}: rotating in {} from here", state_dir.display());
            crate::telemetry::init("warn");
            rt.block_on(here(opts, &state_dir))
        }
    };
    if code == 0 {
        print!("{}", other_hosts(opts.what, &state_dir));
    }
    code
}

const EXIT_CONFIG: u8 = 78;

enum Asked {
    Answered(u8),
    /// Nothing serves here (no answer, or severed): the command may write the files.
    NoService(String),
}

async fn ask_service(
    opts: &Options,
    addr: SocketAddr,
    state_dir: &Path,
    settle: Duration,
) -> Asked {
    use crate::telemetry::status::{get, pid_in_readyz};
    let readyz = match get(addr, "/readyz").await {
        Ok((_, body)) => body,
        Err(_) => {
            return Asked::NoService(format!(
                "no service answers at {addr} (if it runs with [admin] disabled, restart it afterwards: `systemctl restart mcp-tunnel`)"
            ));
        }
    };
    let status = match get(addr, "/status").await {
        Ok((_, body)) => serde_json::from_str::<serde_json::Value>(&body).unwrap_or_default(),
        Err(e) => {
            eprintln!("error: {addr}/status: {e}");
            return Asked::Answered(1);
        }
    };
    if !status["severed"].is_null() {
        return Asked::NoService(format!(
            "the service at {addr} is severed (it serves nothing and rotates nothing)"
        ));
    }
    if status["rotation"]["enabled"] != serde_json::Value::Bool(true) {
        eprintln!(
            "error: the service at {addr} runs without [provision]: it holds no Tunnels API credentials, so nothing on this host can rotate the token or the CA. Rotate the token in the Console (Tunnels -> your tunnel -> Rotate token) and write it to cloudflared.token_file; renew the certificate with `mcp-tunnel setup renew-cert`"
        );
        return Asked::Answered(EXIT_CONFIG);
    }
    let Some(pid) = pid_in_readyz(&readyz) else {
        eprintln!("error: {addr}/readyz does not name the service's PID");
        return Asked::Answered(1);
    };
    // Replacement on the new token shows as a new cloudflared PID that serves (an overlap
    // or, with `replacement = "restart"`, a restart).
    let count = |s: &serde_json::Value, k: &str| s["cloudflared"][k].as_u64().unwrap_or(0);
    let (pid_before, failed_before) =
        (count(&status, "pid"), count(&status, "replacements_failed"));
    let req = Request {
        id: format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ),
        what: opts.what,
        reason: opts.reason.clone(),
        since: time::OffsetDateTime::now_utc().unix_timestamp(),
        by_uid: nix::unistd::getuid().as_raw(),
    };
    if let Err(e) = write_request(state_dir, &req) {
        eprintln!(
            "error: cannot write the request {}: {e} (run as root or as the service's user); nothing was rotated",
            request_path(state_dir).display()
        );
        return Asked::Answered(1);
    }
    if let Err(e) = kill(Pid::from_raw(pid as i32), Signal::SIGHUP) {
        remove_request(state_dir);
        eprintln!(
            "error: cannot signal the service (PID {pid}): {e}; run as root or as the service's user. Nothing was rotated"
        );
        return Asked::Answered(1);
    }
    // A CA rotation waits `settle` twice; everything else takes seconds.
    let timeout = if opts.what.ca {
        settle * 2
    } else {
        Duration::ZERO
    } + Duration::from_secs(120);
    println!(
        "asked the service (PID {pid}); waiting up to {}s for it",
        timeout.as_secs()
    );
    let started = Instant::now();
    let outcome = loop {
        if started.elapsed() > timeout {
            if read_request(state_dir)
                .ok()
                .flatten()
                .is_some_and(|r| r.id == req.id)
            {
                remove_request(state_dir);
            }
            eprintln!(
                "error: the service did not report the rotation within {}s; see `journalctl -u mcp-tunnel` and `mcp-tunnel status`",
                timeout.as_secs()
            );
            return Asked::Answered(1);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Ok((_, body)) = get(addr, "/status").await else {
            continue;
        };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        if let Ok(o) = serde_json::from_value::<Outcome>(v["rotation"]["last"].clone())
            && o.id == req.id
        {
            break o;
        }
    };
    for line in &outcome.done {
        println!("done: {line}");
    }
    if let Some(e) = &outcome.error {
        eprintln!("error: {e}");
        eprintln!(
            "nothing after the steps marked done took effect; it is safe to rerun the command"
        );
        return Asked::Answered(if outcome.error_class.as_deref() == Some("config") {
            EXIT_CONFIG
        } else {
            1
        });
    }
    if !(opts.what.token && status["cloudflared"]["enabled"] == serde_json::Value::Bool(true)) {
        return Asked::Answered(0);
    }
    // The new token file makes the supervisor start a connector on it beside the old one.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Ok((_, body)) = get(addr, "/status").await else {
            continue;
        };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let serving = matches!(
            v["cloudflared"]["state"].as_str(),
            Some("connected" | "degraded")
        );
        if serving && count(&v, "pid") != pid_before {
            println!(
                "done: cloudflared replaced: a connector on the new token serves (PID {}, {} edge connections), the old one unregisters and drains",
                count(&v, "pid"),
                count(&v, "connections")
            );
            return Asked::Answered(0);
        }
        if count(&v, "replacements_failed") > failed_before {
            eprintln!(
                "error: the new connector did not come up on the new token; the old one keeps serving. See `mcp-tunnel status` and `journalctl -u mcp-tunnel`"
            );
            return Asked::Answered(1);
        }
    }
    eprintln!(
        "error: cloudflared was not replaced on the new token within 120s; see `journalctl -u mcp-tunnel`"
    );
    Asked::Answered(1)
}

/// No service serves from this state directory: the steps run here, and the next start
/// serves what they wrote.
async fn here(opts: &Options, state_dir: &Path) -> u8 {
    let env = |k: &str| std::env::var(k).ok();
    let mut flags = opts.overrides.clone();
    flags.output = Some(format!("dir:{}", state_dir.display()));
    let settings = match Settings::resolve(&flags, &env, opts.section.as_ref()) {
        Ok(s) => s,
        // The certificate alone needs no API: only the state directory and the validity.
        Err(_) if !(opts.what.token || opts.what.ca) => {
            let validity = opts
                .section
                .as_ref()
                .map_or(crate::config::provision::DEFAULT_CERT_DURATION, |s| {
                    s.cert_duration
                });
            return match provision::renew_cert(state_dir, validity, Duration::ZERO) {
                Ok(_) => {
                    println!(
                        "done: new server key and certificate ({}); the next start serves it",
                        cert_facts(state_dir)
                    );
                    0
                }
                Err(e) => failed(&e),
            };
        }
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_CONFIG;
        }
    };
    let installer = |_: std::sync::Arc<rustls::sign::CertifiedKey>| {};
    let (done, result) = perform(
        &settings,
        opts.what,
        &opts.reason,
        &installer,
        Duration::ZERO,
    )
    .await;
    for line in &done {
        println!("done: {line}");
    }
    match result {
        Ok(()) => {
            println!("the next start of the service serves what was rotated");
            0
        }
        Err(e) => failed(&e),
    }
}

fn failed(e: &ProvisionError) -> u8 {
    eprintln!("error: {e}");
    eprintln!("nothing after the steps marked done took effect; it is safe to rerun the command");
    if e.class() == ErrorClass::Config {
        EXIT_CONFIG
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_flag_means_certificate_and_token() {
        assert_eq!(
            What::from_flags(false, false, false),
            What {
                cert: true,
                token: true,
                ca: false
            }
        );
        assert_eq!(
            What::from_flags(false, false, true),
            What {
                cert: false,
                token: false,
                ca: true
            }
        );
        assert_eq!(
            What::from_flags(false, false, false).describe(),
            "server key and certificate and tunnel token"
        );
    }

    #[test]
    fn request_round_trips_and_a_broken_one_is_not_run() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_request(dir.path()), Ok(None));
        let r = Request {
            id: "r1".into(),
            what: What::from_flags(false, true, false),
            reason: "leak".into(),
            since: 1,
            by_uid: 0,
        };
        write_request(dir.path(), &r).unwrap();
        assert_eq!(read_request(dir.path()), Ok(Some(r)));
        std::fs::write(request_path(dir.path()), "{").unwrap();
        assert!(
            read_request(dir.path())
                .unwrap_err()
                .contains("not a rotation request")
        );
        remove_request(dir.path());
        assert_eq!(read_request(dir.path()), Ok(None));
    }

    #[test]
    fn the_other_hosts_note_names_what_was_rotated() {
        let t = other_hosts(What::from_flags(false, true, false), Path::new("/s"));
        assert!(t.contains("/s/tunnel-token"));
        assert!(!t.contains("tls.key"));
        assert!(t.contains("stay connected until"));
        let c = other_hosts(What::from_flags(false, false, true), Path::new("/s"));
        assert!(c.contains("/s/ca.crt") && c.contains("/s/tls.key"));
    }
}
