//! `mcp-tunnel teardown [--stop] [--keep-tunnel] --yes`: the reference's teardown list as one
//! command. Stop the service, archive the tunnel (unless kept), then remove the secrets the
//! state directory holds, in that order: nothing is deleted before the archive succeeded, so
//! a failed API call leaves the host as it was. Says what it removed and what it did not.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::provision::{Settings, state};

/// What the state directory holds for a tunnel, secrets and their companions.
const REMOVED: [&str; 12] = [
    state::TUNNEL_TOKEN,
    state::CA_KEY,
    state::TLS_KEY,
    state::CA_NEXT_KEY,
    state::TUNNEL_ID,
    state::TUNNEL_DOMAIN,
    state::TOKEN_VERSION,
    state::CA_CRT,
    state::TLS_CRT,
    state::CA_NEXT_CRT,
    state::CA_PREVIOUS_CRT,
    "ca-previous.key",
];

/// The running service's PID, from its admin endpoint; `None` when nothing answers there.
pub fn running_pid(admin: std::net::SocketAddr) -> Option<u32> {
    let rt = crate::telemetry::status::client_runtime()?;
    let (_, body) = rt
        .block_on(crate::telemetry::status::get(admin, "/readyz"))
        .ok()?;
    let pid = crate::telemetry::status::pid_in_readyz(&body)?;
    // Only a live process counts: whatever still answers for a PID that is gone is not it.
    (kill(Pid::from_raw(pid as i32), None).is_ok() && !exited(pid as i32)).then_some(pid)
}

/// SIGTERM to `pid` and a wait for it to be gone (a clean stop: systemd does not restart a
/// service that exited 0).
pub fn stop(pid: u32, within: Duration) -> Result<(), String> {
    let pid = Pid::from_raw(pid as i32);
    kill(pid, Signal::SIGTERM).map_err(|e| {
        format!(
            "cannot stop the service (PID {pid}): {e}; run as root, or `systemctl stop mcp-tunnel`"
        )
    })?;
    let started = Instant::now();
    while started.elapsed() < within {
        if kill(pid, None).is_err() || exited(pid.as_raw()) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!(
        "the service (PID {pid}) did not stop within {within:?}"
    ))
}

/// Whether `pid` has exited and waits only to be reaped (a zombie: state `Z` or `X` in
/// `/proc/<pid>/stat`), which `kill(pid, 0)` still reports as present.
fn exited(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
        })
        .unwrap_or(true)
}

/// Removes the tunnel's files from `dir`; returns what was removed and what is left there
/// on purpose (folders of archived tunnels set aside by `setup archive --reprovision`).
pub fn remove_secrets(dir: &Path) -> std::io::Result<(Vec<&'static str>, Vec<PathBuf>)> {
    let mut removed = Vec::new();
    for name in REMOVED {
        match std::fs::remove_file(dir.join(name)) {
            Ok(()) => removed.push(name),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    if !removed.is_empty() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    let kept = std::fs::read_dir(dir)
        .map(|it| {
            it.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("archived-"))
                })
                .collect()
        })
        .unwrap_or_default();
    Ok((removed, kept))
}

/// The archive step of a teardown: `Ok(Some(line))` says what happened.
pub async fn archive(settings: &Settings, tunnel_id: &str) -> Result<String, String> {
    let a = super::archive::run(settings, tunnel_id, false)
        .await
        .map_err(|e| e.to_string())?;
    Ok(if a.already {
        format!("tunnel {} ({}) was already archived", a.tunnel_id, a.domain)
    } else {
        format!(
            "tunnel {} archived: {} retired forever, its token invalid, every connector severed",
            a.tunnel_id, a.domain
        )
    })
}
