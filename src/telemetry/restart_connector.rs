//! `mcp-tunnel restart-connector`: asks the running service to replace cloudflared without a
//! gap (SIGUSR2: the new connector starts beside the old one, which is stopped once the new
//! one has registered), then waits for the outcome on the admin endpoint.
//!
//! The request is a signal, so the kernel decides who may make it (root or the service's
//! user); the admin endpoint only tells which process to signal and how it went.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::status::{admin_addr, client_runtime, get};

const OK: &str = "mcp_tunnel_cloudflared_replacements_total{result=\"ok\"}";
const FAILED: &str = "mcp_tunnel_cloudflared_replacements_total{result=\"failed\"}";

/// Exit 0 when the replacement completed, 1 when it failed or timed out, 2 when the service
/// cannot be reached or signalled.
pub fn run(admin: Option<SocketAddr>, config: &Path, timeout: Duration) -> u8 {
    let addr = admin_addr(admin, config);
    let Some(rt) = client_runtime() else {
        return 2;
    };
    match rt.block_on(replace(addr, timeout)) {
        Ok(msg) => {
            println!("{msg}");
            0
        }
        Err((code, msg)) => {
            eprintln!("error: {msg}");
            code
        }
    }
}

async fn counts(addr: SocketAddr) -> Result<(f64, f64), (u8, String)> {
    let (_, m) = get(addr, "/metrics").await.map_err(|e| (2, e))?;
    Ok((series(&m, OK), series(&m, FAILED)))
}

/// The value of one exact series (name with labels), 0 when absent.
fn series(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn replace(addr: SocketAddr, timeout: Duration) -> Result<String, (u8, String)> {
    let (_, readyz) = get(addr, "/readyz").await.map_err(|e| (2, e))?;
    let pid = super::status::pid_in_readyz(&readyz)
        .ok_or((2, format!("{addr}/readyz does not name the service's PID")))?;
    let (ok0, failed0) = counts(addr).await?;
    kill(Pid::from_raw(pid as i32), Signal::SIGUSR2).map_err(|e| {
        (
            2,
            format!(
                "cannot signal the service (PID {pid}): {e}; run as root or as the service's user"
            ),
        )
    })?;
    let started = Instant::now();
    while started.elapsed() < timeout {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let (ok, failed) = counts(addr).await?;
        if ok > ok0 {
            return Ok(format!(
                "cloudflared replaced in {:.1}s: the new connector registered, the old one is unregistering and draining",
                started.elapsed().as_secs_f64()
            ));
        }
        if failed > failed0 {
            return Err((
                1,
                "the replacement failed; the running connector stays (see `journalctl -u mcp-tunnel` and `mcp-tunnel status`)".into(),
            ));
        }
    }
    Err((
        1,
        format!("no outcome within {timeout:?}; see `mcp-tunnel status`"),
    ))
}
