//! `mcp-tunnel sever`: stop serving now, on this host, and stay stopped.
//!
//! The decision lives in a marker file in the state directory, not in the running process:
//! a `systemctl start`, a reboot or `Restart=` all run `mcp-tunnel run` again, and `run`
//! refuses to start (exit 78, which the unit does not restart) while the marker exists. The
//! running service is told with SIGUSR1 and then reads the marker itself: a stray signal
//! without a marker severs nothing. Writing the marker first means a crash between the two
//! steps still leaves the host severed at the next start.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::config::Config;

/// The marker's file name in the state directory.
pub const MARKER: &str = "severed";

/// What the marker records: when, why and by whom. Any file at the marker's path severs,
/// even one that does not parse (fail closed); these facts are for the person reading it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Marker {
    /// Unix seconds.
    pub since: i64,
    pub reason: String,
    /// The uid that ran `mcp-tunnel sever`.
    pub by_uid: u32,
}

/// The state directory: `[provision] state_dir`, else the one systemd gives the unit
/// (`$STATE_DIRECTORY`, `StateDirectory=mcp-tunnel`), else `/var/lib/mcp-tunnel`. An operator's
/// shell has no `$STATE_DIRECTORY`; the unit's is the default, so both find the same file.
pub fn state_dir(
    config: Option<&Config>,
    state_directory_env: Option<&std::ffi::OsStr>,
) -> PathBuf {
    if let Some(p) = config.and_then(|c| c.provision.as_ref()) {
        return p.state_dir.clone();
    }
    if let Some(env) = state_directory_env
        && let Some(first) = env.to_str().and_then(|s| s.split(':').next())
        && !first.is_empty()
    {
        return PathBuf::from(first);
    }
    PathBuf::from(crate::config::provision::DEFAULT_STATE_DIR)
}

pub fn marker_path(
    config: Option<&Config>,
    state_directory_env: Option<&std::ffi::OsStr>,
) -> PathBuf {
    state_dir(config, state_directory_env).join(MARKER)
}

/// The marker at `path`: `Ok(None)` when there is none. A file that exists but cannot be
/// read or parsed still severs; its facts are then unknown.
pub fn read(path: &Path) -> Result<Option<Marker>, String> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).unwrap_or(Marker {
            since: 0,
            reason: "(the marker file does not parse)".into(),
            by_uid: u32::MAX,
        }))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        // Unreadable but present (permissions): severed, fail closed.
        Err(e) if path.exists() => Ok(Some(Marker {
            since: 0,
            reason: format!("(the marker file cannot be read: {e})"),
            by_uid: u32::MAX,
        })),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Writes the marker whole or not at all: a temporary file in the same directory, synced,
/// renamed over the marker, then the directory synced.
pub fn write(path: &Path, marker: &Marker) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{MARKER}.{}.tmp", std::process::id()));
    let body = serde_json::to_vec_pretty(marker).map_err(std::io::Error::other)?;
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(&body)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Removes the marker; `Ok(false)` when there was none.
pub fn remove(path: &Path) -> std::io::Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => {
            if let Some(dir) = path.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// One line for logs, `status`, `/readyz` and the refusal to start.
pub fn describe(marker: &Marker, path: &Path) -> String {
    let since = if marker.since > 0 {
        time::OffsetDateTime::from_unix_timestamp(marker.since)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_else(|| marker.since.to_string())
    } else {
        "an unknown time".into()
    };
    format!(
        "severed since {since} ({}): marker {}; lift with `mcp-tunnel sever --lift`",
        marker.reason,
        path.display()
    )
}

/// What `mcp-tunnel sever` was asked.
pub struct Options {
    pub config: PathBuf,
    pub admin: Option<SocketAddr>,
    pub reason: Option<String>,
    pub lift: bool,
    pub timeout: Duration,
}

/// Exit 0 when done (and the running service, if any, confirmed), 1 when the marker is in
/// place but the service could not be told or did not confirm, 2 when the marker could not
/// be written or removed.
pub fn main(opts: &Options) -> u8 {
    // Severing must work with a broken config file too: only the state directory and the
    // admin address come from it, and both have defaults.
    let config = Config::load(&opts.config).ok();
    let path = marker_path(
        config.as_ref(),
        std::env::var_os("STATE_DIRECTORY").as_deref(),
    );
    if opts.lift {
        return lift(opts, &path);
    }
    let marker = match read(&path) {
        Ok(Some(m)) => {
            println!("already severed: {}", describe(&m, &path));
            m
        }
        Ok(None) => {
            let m = Marker {
                since: time::OffsetDateTime::now_utc().unix_timestamp(),
                reason: opts
                    .reason
                    .clone()
                    .unwrap_or_else(|| "mcp-tunnel sever".into()),
                by_uid: nix::unistd::getuid().as_raw(),
            };
            if let Err(e) = write(&path, &m) {
                eprintln!(
                    "error: cannot write the marker {}: {e} (run as root or as the service's user)",
                    path.display()
                );
                return 2;
            }
            println!(
                "marker written: {} (the service will not start while it exists)",
                path.display()
            );
            m
        }
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    let _ = marker;
    let code = match tell_service(opts, true) {
        Told::Confirmed(msg) => {
            println!("{msg}");
            0
        }
        Told::NotRunning(msg) => {
            println!("{msg}");
            0
        }
        Told::Failed(msg) => {
            eprintln!("error: {msg}");
            1
        }
    };
    println!(
        "left for a person: this host only is severed. Connectors of the same tunnel on other hosts keep serving, and the tunnel token still admits new ones: `mcp-tunnel setup archive` (or the Console) severs the whole tunnel, `mcp-tunnel setup rotate --now --token` replaces the token."
    );
    code
}

fn lift(opts: &Options, path: &Path) -> u8 {
    match remove(path) {
        Ok(true) => println!("marker removed: {}", path.display()),
        Ok(false) => println!("not severed: no marker at {}", path.display()),
        Err(e) => {
            eprintln!("error: cannot remove the marker {}: {e}", path.display());
            return 2;
        }
    }
    match tell_service(opts, false) {
        Told::Confirmed(msg) | Told::NotRunning(msg) => {
            println!("{msg}");
            0
        }
        Told::Failed(msg) => {
            eprintln!("error: {msg}");
            1
        }
    }
}

enum Told {
    Confirmed(String),
    NotRunning(String),
    Failed(String),
}

/// SIGUSR1 to the running service (found through its admin endpoint), then its answer:
/// `/readyz` shows it severed, or (lifting) the severed process has exited so that systemd
/// starts a fresh one.
fn tell_service(opts: &Options, sever: bool) -> Told {
    use crate::telemetry::status::{admin_addr, client_runtime, get};
    let addr = admin_addr(opts.admin, &opts.config);
    let Some(rt) = client_runtime() else {
        return Told::Failed("cannot start a client runtime".into());
    };
    rt.block_on(async {
        let readyz = match get(addr, "/readyz").await {
            Ok((_, body)) => body,
            Err(_) if !sever => {
                return Told::NotRunning(format!(
                    "no service answers at {addr}: start it (`systemctl start mcp-tunnel`)"
                ));
            }
            Err(e) => {
                return Told::NotRunning(format!(
                    "no service answers at {addr} ({e}): nothing runs to stop, and `mcp-tunnel run` refuses to start while the marker exists. If the service runs with [admin] disabled, stop it: `systemctl stop mcp-tunnel`"
                ));
            }
        };
        let v: serde_json::Value = serde_json::from_str(&readyz).unwrap_or_default();
        let Some(pid) = crate::telemetry::status::pid_in_readyz(&readyz) else {
            return Told::Failed(format!("{addr}/readyz does not name the service's PID"));
        };
        if !sever && v["severed"].is_null() {
            return Told::Confirmed(format!("the service (PID {pid}) was not severed; nothing to resume"));
        }
        if let Err(e) = kill(Pid::from_raw(pid as i32), Signal::SIGUSR1) {
            return Told::Failed(format!(
                "cannot signal the service (PID {pid}): {e}; run as root or as the service's user, or `systemctl stop mcp-tunnel`"
            ));
        }
        let started = Instant::now();
        while started.elapsed() < opts.timeout {
            tokio::time::sleep(Duration::from_millis(100)).await;
            match get(addr, "/readyz").await {
                Ok((_, body)) => {
                    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                    if sever && !v["severed"].is_null() {
                        return Told::Confirmed(format!(
                            "the service (PID {pid}) severed in {:.1}s: cloudflared killed, sessions closed, the listener refuses new ones",
                            started.elapsed().as_secs_f64()
                        ));
                    }
                }
                Err(_) if !sever => {
                    return Told::Confirmed(format!(
                        "the severed service (PID {pid}) exited so that it starts afresh: under systemd it restarts within RestartSec; otherwise start it"
                    ));
                }
                Err(_) => {}
            }
        }
        Told::Failed(format!(
            "the service (PID {pid}) did not confirm within {:?}; see `journalctl -u mcp-tunnel`",
            opts.timeout
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_is_written_whole_read_back_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(MARKER);
        assert_eq!(read(&path), Ok(None));
        let m = Marker {
            since: 1_800_000_000,
            reason: "token leaked".into(),
            by_uid: 0,
        };
        write(&path, &m).unwrap();
        assert_eq!(read(&path), Ok(Some(m.clone())));
        // No temporary file is left beside it.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        assert!(describe(&m, &path).contains("(token leaked): marker "));
        assert!(remove(&path).unwrap());
        assert!(!remove(&path).unwrap());
        assert_eq!(read(&path), Ok(None));
    }

    #[test]
    fn any_file_at_the_path_severs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(MARKER);
        std::fs::write(&path, "not json").unwrap();
        let m = read(&path).unwrap().expect("a garbled marker still severs");
        assert!(m.reason.contains("does not parse"));
    }

    #[test]
    fn the_state_directory_comes_from_provision_then_systemd_then_the_default() {
        let env = std::ffi::OsString::from("/run/state-a:/run/state-b");
        assert_eq!(state_dir(None, Some(&env)), PathBuf::from("/run/state-a"));
        assert_eq!(state_dir(None, None), PathBuf::from("/var/lib/mcp-tunnel"));
    }
}
