//! Helpers around the measured runs: config/certificate churn against a running proxy, and
//! timing a start until READY=1 and until the port accepts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use mcp_tunnel::certs::issue::{self, IssuedPair};
use mcp_tunnel::certs::write_atomic;
use serde_json::json;
use tokio::net::{TcpStream, UnixDatagram};

#[derive(Debug, clap::Args)]
pub struct ChurnArgs {
    /// The running proxy's config file: a dummy route is toggled in it.
    #[arg(long)]
    config: PathBuf,
    /// Holds ca.crt and ca.key, and the tls.crt / tls.key the proxy serves.
    #[arg(long)]
    cert_dir: PathBuf,
    /// SAN of the issued server certificates.
    #[arg(long)]
    domain: String,
    #[arg(long, value_parser = crate::parse_duration, default_value = "10s")]
    duration: Duration,
    #[arg(long, value_parser = crate::parse_duration, default_value = "1s")]
    reload_every: Duration,
    #[arg(long, value_parser = crate::parse_duration, default_value = "5s")]
    rotate_every: Duration,
    /// The proxy's log, read at the end to count what it applied.
    #[arg(long)]
    log: Option<PathBuf>,
    #[arg(long, default_value = "d")]
    scenario: String,
}

const DUMMY: &str = "bench-dummy = \"http://127.0.0.1:9\"\n";

fn with_dummy(base: &str, on: bool) -> String {
    if !on {
        return base.to_owned();
    }
    let mut out = String::with_capacity(base.len() + DUMMY.len());
    let mut done = false;
    for line in base.split_inclusive('\n') {
        out.push_str(line);
        if !done && line.trim() == "[routes]" {
            out.push_str(DUMMY);
            done = true;
        }
    }
    out
}

pub async fn churn(args: ChurnArgs) -> anyhow::Result<()> {
    let base = std::fs::read_to_string(&args.config)?;
    anyhow::ensure!(
        base.lines().any(|l| l.trim() == "[routes]"),
        "{} has no [routes] table to toggle a route in",
        args.config.display()
    );
    let ca = IssuedPair {
        cert_pem: std::fs::read_to_string(args.cert_dir.join("ca.crt"))?,
        key_pem: std::fs::read_to_string(args.cert_dir.join("ca.key"))?,
    };
    let start = Instant::now();
    let end = start + args.duration;
    let mut reload =
        tokio::time::interval_at((start + args.reload_every).into(), args.reload_every);
    let mut rotate =
        tokio::time::interval_at((start + args.rotate_every).into(), args.rotate_every);
    let (mut rewrites, mut rotations, mut on) = (0u64, 0u64, false);
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(end.into()) => break,
            _ = reload.tick() => {
                on = !on;
                write_atomic(&args.config, with_dummy(&base, on).as_bytes(), 0o644)?;
                rewrites += 1;
            }
            _ = rotate.tick() => {
                let domain = args.domain.clone();
                let ca = ca.clone();
                let pair = tokio::task::spawn_blocking(move || {
                    issue::issue_server(&ca, &domain, issue::SERVER_VALIDITY)
                })
                .await??;
                // As renew-cert does: the key first, then the certificate.
                write_atomic(&args.cert_dir.join("tls.key"), pair.key_pem.as_bytes(), 0o600)?;
                write_atomic(&args.cert_dir.join("tls.crt"), pair.cert_pem.as_bytes(), 0o644)?;
                rotations += 1;
            }
        }
    }
    // Leave the file as it was, and give the watcher time to apply the last change.
    write_atomic(&args.config, base.as_bytes(), 0o644)?;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let log = args
        .log
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default();
    let count = |needle: &str| log.lines().filter(|l| l.contains(needle)).count();
    println!(
        "{}",
        json!({
            "scenario": args.scenario,
            "target": "proxy",
            "mode": "churn",
            "config_rewrites": rewrites,
            "cert_rotations": rotations,
            "log_reloads": count("config reloaded"),
            "log_cert_swaps": count("server certificate swapped"),
            "log_cert_refused": count("new certificate refused"),
            "log_reload_refused": count("config reload refused"),
        })
    );
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct ReadyArgs {
    /// Label in the results.
    #[arg(long)]
    name: String,
    /// Address that accepts connections once the program listens.
    #[arg(long)]
    probe: SocketAddr,
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Pass NOTIFY_SOCKET and wait for READY=1 too.
    #[arg(long)]
    notify: bool,
    #[arg(long, default_value = "e")]
    scenario: String,
    /// The command to start.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

/// SIGTERM (through kill(1): this crate has no unsafe code), then SIGKILL after 5 s.
async fn stop(child: &mut std::process::Child) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    for _ in 0..500 {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
}

pub async fn ready(args: ReadyArgs) -> anyhow::Result<()> {
    let (mut listen_ms, mut ready_ms) = (Vec::new(), Vec::new());
    let mut ready_missing = 0usize;
    for run in 0..args.runs {
        anyhow::ensure!(
            TcpStream::connect(args.probe).await.is_err(),
            "{} already accepts connections before the start",
            args.probe
        );
        let sock_path =
            std::env::temp_dir().join(format!("mcp-bench-notify-{}-{run}", std::process::id()));
        let _ = std::fs::remove_file(&sock_path);
        let sock = UnixDatagram::bind(&sock_path)?;
        let mut cmd = std::process::Command::new(&args.command[0]);
        cmd.args(&args.command[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if args.notify {
            cmd.env("NOTIFY_SOCKET", &sock_path);
        }
        let t0 = Instant::now();
        let mut child = cmd.spawn()?;
        let probe = async {
            loop {
                if TcpStream::connect(args.probe).await.is_ok() {
                    return t0.elapsed();
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        let notified = async {
            if !args.notify {
                return None;
            }
            let mut buf = [0u8; 4096];
            loop {
                let n = sock.recv(&mut buf).await.ok()?;
                let msg = String::from_utf8_lossy(&buf[..n]);
                if msg.lines().any(|l| l == "READY=1") {
                    return Some(t0.elapsed());
                }
            }
        };
        let deadline = Duration::from_secs(5);
        let (listened, readied) = tokio::join!(
            tokio::time::timeout(deadline, probe),
            tokio::time::timeout(deadline, notified)
        );
        stop(&mut child).await;
        let _ = std::fs::remove_file(&sock_path);
        let listened = listened
            .map_err(|_| anyhow::anyhow!("{} did not listen within {deadline:?}", args.name))?;
        listen_ms.push(listened.as_secs_f64() * 1000.0);
        match readied {
            Ok(Some(t)) => ready_ms.push(t.as_secs_f64() * 1000.0),
            _ if args.notify => ready_missing += 1,
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let max = |v: &[f64]| {
        v.iter()
            .copied()
            .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))))
    };
    println!(
        "{}",
        json!({
            "scenario": args.scenario,
            "target": args.name,
            "mode": "ready",
            "runs": args.runs,
            "listen_ms_median": median(&mut listen_ms.clone()),
            "listen_ms_max": max(&listen_ms),
            "ready_ms_median": median(&mut ready_ms.clone()),
            "ready_ms_max": max(&ready_ms),
            "ready_missing": if args.notify { Some(ready_missing) } else { None },
        })
    );
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct PeerLookupArgs {
    /// Lookups to time.
    #[arg(long, default_value_t = 20_000)]
    count: u32,
    #[arg(long, default_value = "f")]
    scenario: String,
}

/// Times the peer check's kernel lookup alone (`proxy::sockdiag::socket_owner`, as the
/// listener runs it for each new connection) on a loopback connection of this process.
pub async fn peer_lookup(args: PeerLookupArgs) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let _client = TcpStream::connect(listener.local_addr()?).await?;
    let (server, peer) = listener.accept().await?;
    let local = server.local_addr()?;
    // This process's effective UID: the owner of /proc/self.
    let uid = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self")?);
    let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 10_000_000, 3)?;
    let start = Instant::now();
    for _ in 0..args.count {
        let t0 = Instant::now();
        let owner = mcp_tunnel::proxy::sockdiag::socket_owner(peer, local).await?;
        hist.saturating_record(t0.elapsed().as_nanos() as u64);
        anyhow::ensure!(
            owner.uid == uid,
            "lookup named uid {}, expected {uid}",
            owner.uid
        );
    }
    let total = start.elapsed();
    println!(
        "{}",
        json!({
            "scenario": args.scenario,
            "mode": "lookup",
            "target": "sock_diag",
            "count": args.count,
            "mean_ns": total.as_nanos() as f64 / f64::from(args.count.max(1)),
            "p50_ns": hist.value_at_quantile(0.5),
            "p99_ns": hist.value_at_quantile(0.99),
            "max_ns": hist.max(),
        })
    );
    Ok(())
}
