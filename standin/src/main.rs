//! A stand-in for `cloudflared`, for tests. The real cloudflared 2026.8.2 with fake-edge
//! (`tests/real_cloudflared.rs`, in a loopback-only netns) tests every connector behaviour it
//! can show; this stand-in stays only for what the real binary cannot show on demand, and
//! for running the supervisor's tests without root or a network namespace (plain `cargo
//! test`): an exit with a chosen code at a chosen time (the backoff sequence of a crash loop,
//! exit 255 after start), a process that ignores SIGTERM while its metrics server is wedged,
//! and the provisioning tests (`tests/provision_run.rs`). docs/CLOUDFLARED.md has the list.
//! It mimics the CLI surface, `/ready`, the JSON log events and signals, and carries TLS
//! clients from a local port over a WebSocket to `--url`, as the edge does.
//!
//! Not for packaging: only tests and system tests use it (`cargo build --bin
//! cloudflared-standin`).
//!
//! Command line (as cloudflared): `tunnel [--no-autoupdate] [--metrics ADDR] [--output
//! json|default] [--loglevel L] [--grace-period D] run [--url URL] [--token T]
//! [--token-file F]`; token also from `TUNNEL_TOKEN` / `TUNNEL_TOKEN_FILE`. `--help` anywhere
//! after `tunnel` prints a help text and exits 0 once the flags before it parsed.
//!
//! Knobs (environment), all optional:
//! - `STANDIN_EVENTS=FILE`: append one JSON line per event (`started` with pid and argv,
//!   `forward_listening` with the address, `ready`, `sigterm`, `exit` with the code).
//! - `STANDIN_FORWARD=ADDR`: accept TLS clients here and carry them to `--url`.
//! - `STANDIN_CONNECTIONS=N` (default 4), `STANDIN_CONNECT_DELAY_MS=N` (default 50): edge
//!   connections registered, one every N ms.
//! - `STANDIN_NEVER_READY=1`: never registers a connection (`/ready` stays 503).
//! - `STANDIN_REJECTED=1`: the edge refuses the token: logs `Unauthorized` registration
//!   errors over and over, never ready, never exits (as cloudflared does).
//! - `STANDIN_CRASH_AFTER_MS=N`, `STANDIN_CRASH_CODE=X` (default 1): exit X after N ms.
//! - `STANDIN_HANG_AFTER_MS=N`: after N ms the metrics server stops answering and SIGTERM
//!   is ignored (a wedged process: only SIGKILL ends it).
//! - `STANDIN_FAST_EXIT=1`: the edge DNS lookup fails: log it and exit 1 at once.

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use mcp_tunnel::proxy::edge::WsTarget;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::task::TaskTracker;

struct Args {
    metrics: Option<SocketAddr>,
    json: bool,
    grace: Duration,
    url: Option<String>,
    token: Option<String>,
}

fn usage(msg: &str) -> ! {
    eprintln!("Incorrect Usage: {msg}");
    std::process::exit(255);
}

fn parse_args(argv: &[String]) -> Args {
    let mut args = Args {
        metrics: None,
        json: false,
        grace: Duration::from_secs(30),
        url: None,
        token: None,
    };
    let mut it = argv.iter().skip(1).peekable();
    if it.next().map(String::as_str) != Some("tunnel") {
        usage("expected the `tunnel` command");
    }
    let mut saw_run = false;
    let mut help = false;
    let mut token_file = None;
    while let Some(a) = it.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if a.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .unwrap_or_else(|| usage(&format!("flag needs an argument: {name}")))
        };
        match flag.as_str() {
            "run" if !saw_run => saw_run = true,
            "--no-autoupdate" => {}
            "--metrics" => {
                let v = value("--metrics");
                args.metrics = Some(
                    v.parse()
                        .unwrap_or_else(|_| usage(&format!("invalid --metrics {v}"))),
                );
            }
            "--output" => args.json = value("--output") == "json",
            "--loglevel" => {
                value("--loglevel");
            }
            "--grace-period" => {
                let v = value("--grace-period");
                args.grace = humantime::parse_duration(&v)
                    .unwrap_or_else(|_| usage(&format!("invalid --grace-period {v}")));
            }
            "--url" if saw_run => args.url = Some(value("--url")),
            "--token" if saw_run => args.token = Some(value("--token")),
            "--token-file" if saw_run => token_file = Some(value("--token-file")),
            "--help" | "-h" => help = true,
            other => usage(&format!("flag provided but not defined: {other}")),
        }
    }
    if help {
        // As cloudflared: every flag before it parsed, so print the help and do nothing.
        println!(
            "NAME:\n  cloudflared tunnel{} - mcp-tunnel test stand-in",
            if saw_run { " run" } else { "" }
        );
        std::process::exit(0);
    }
    if !saw_run {
        usage("expected `tunnel run`");
    }
    let token_file = token_file.or_else(|| std::env::var("TUNNEL_TOKEN_FILE").ok());
    if args.token.is_none() {
        args.token = std::env::var("TUNNEL_TOKEN").ok();
    }
    if args.token.is_none()
        && let Some(f) = token_file
    {
        args.token = std::fs::read_to_string(&f)
            .map(|t| t.trim().to_string())
            .ok();
    }
    args
}

/// cloudflared's token: base64 of `{"a": account, "t": tunnel uuid, "s": base64 secret}`.
fn tunnel_id(token: &str) -> Option<String> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(token.trim())
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&raw).ok()?;
    let a = v.get("a")?.as_str()?;
    let t = v.get("t")?.as_str()?;
    let s = v.get("s")?.as_str()?;
    let uuid_ok = t.len() == 36
        && t.char_indices().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        });
    let secret_ok = base64::engine::general_purpose::STANDARD
        .decode(s)
        .is_ok_and(|b| !b.is_empty());
    (!a.is_empty() && uuid_ok && secret_ok).then(|| t.to_string())
}

struct Logger {
    json: bool,
}

impl Logger {
    fn log(&self, level: &str, message: &str, fields: serde_json::Value) {
        let time = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        let line = if self.json {
            let mut obj = serde_json::Map::new();
            obj.insert("level".into(), level.into());
            obj.insert("time".into(), time.into());
            if let serde_json::Value::Object(f) = fields {
                obj.extend(f);
            }
            obj.insert("message".into(), message.into());
            serde_json::Value::Object(obj).to_string()
        } else {
            let lvl = &level[..3.min(level.len())].to_uppercase();
            format!("{time} {lvl} {message} {fields}")
        };
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{line}");
    }
}

fn event(name: &str, fields: serde_json::Value) {
    let Ok(path) = std::env::var("STANDIN_EVENTS") else {
        return;
    };
    let mut obj = serde_json::Map::new();
    obj.insert("event".into(), name.into());
    obj.insert("pid".into(), std::process::id().into());
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    obj.insert("unix_ms".into(), ms.into());
    if let serde_json::Value::Object(f) = fields {
        obj.extend(f);
    }
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{}", serde_json::Value::Object(obj));
    }
}

fn knob_ms(name: &str) -> Option<Duration> {
    std::env::var(name)
        .ok()?
        .parse()
        .ok()
        .map(Duration::from_millis)
}

fn exit(code: i32) -> ! {
    event("exit", serde_json::json!({ "code": code }));
    std::process::exit(code)
}

struct State {
    ready_connections: AtomicUsize,
    hung: AtomicBool,
    connector_id: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let argv: Vec<String> = std::env::args().collect();
    // As `cloudflared --version`, in its format, so that packaging/build-packages.sh
    // accepts the stand-in as the bundled binary in the system test (issue 6).
    if matches!(
        argv.get(1).map(String::as_str),
        Some("--version" | "-v" | "version")
    ) {
        println!(
            "cloudflared version 2000.1.0-standin (mcp-tunnel test stand-in, not for production)"
        );
        return;
    }
    let args = parse_args(&argv);
    event("started", serde_json::json!({ "argv": argv }));
    let log = Arc::new(Logger { json: args.json });

    let Some(token) = args.token.as_deref() else {
        eprintln!(
            "\"cloudflared tunnel run\" requires the ID or name of the tunnel to run as the last command line argument or in the configuration file."
        );
        exit(255);
    };
    let Some(tunnel) = tunnel_id(token) else {
        eprintln!("Provided Tunnel token is not valid.");
        exit(255);
    };
    log.log(
        "info",
        "Starting tunnel",
        serde_json::json!({ "tunnelID": tunnel }),
    );
    if std::env::var("STANDIN_FAST_EXIT").is_ok() {
        log.log(
            "error",
            "edge discovery: error looking up Cloudflare edge IPs: the DNS query failed",
            serde_json::json!({ "error": "lookup _v2-origintunneld._tcp.argotunnel.com: no such host" }),
        );
        exit(1);
    }
    let Some(url) = args.url.clone() else {
        log.log("error", "No ingress rules were defined in provided config (if any) nor from the cli, cloudflared will return 503 for all incoming HTTP requests", serde_json::json!({}));
        exit(1);
    };

    let state = Arc::new(State {
        ready_connections: AtomicUsize::new(0),
        hung: AtomicBool::new(false),
        connector_id: format!("{:08x}-0000-4000-8000-{:012x}", std::process::id(), 42),
    });
    if let Some(addr) = args.metrics {
        let listener = match TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                log.log(
                    "error",
                    "failed to bind the metrics server",
                    serde_json::json!({ "error": e.to_string(), "address": addr.to_string() }),
                );
                exit(1);
            }
        };
        log.log(
            "info",
            &format!("Starting metrics server on {addr}/metrics"),
            serde_json::json!({}),
        );
        tokio::spawn(metrics_server(listener, state.clone()));
    }

    // cloudflared's real job: carry each local TLS client over a WebSocket to the origin.
    let carried = TaskTracker::new();
    let accepting = Arc::new(AtomicBool::new(true));
    if let Ok(fwd) = std::env::var("STANDIN_FORWARD") {
        let target = WsTarget::parse(&url.replacen("http://", "ws://", 1))
            .unwrap_or_else(|e| usage(&format!("--url {url}: {e}")));
        let listener = TcpListener::bind(&fwd)
            .await
            .unwrap_or_else(|e| usage(&format!("STANDIN_FORWARD {fwd}: {e}")));
        let local = listener.local_addr().expect("bound");
        event(
            "forward_listening",
            serde_json::json!({ "addr": local.to_string() }),
        );
        tokio::spawn(forward(
            listener,
            target,
            carried.clone(),
            accepting.clone(),
        ));
    }

    if std::env::var("STANDIN_REJECTED").is_ok() {
        // What cloudflared does when the edge refuses the token: it logs the refusal per
        // connection attempt and keeps retrying, never ready, never exiting.
        let lg = log.clone();
        tokio::spawn(async move {
            for attempt in 0u64.. {
                lg.log(
                    "error",
                    "Register tunnel error from server side",
                    serde_json::json!({ "connIndex": attempt % 4, "error": "Unauthorized: Invalid tunnel secret" }),
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    } else if std::env::var("STANDIN_NEVER_READY").is_err() {
        let n: usize = std::env::var("STANDIN_CONNECTIONS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(4);
        let delay = knob_ms("STANDIN_CONNECT_DELAY_MS").unwrap_or(Duration::from_millis(50));
        let (st, lg) = (state.clone(), log.clone());
        tokio::spawn(async move {
            for i in 0..n {
                tokio::time::sleep(delay).await;
                st.ready_connections.fetch_add(1, Ordering::SeqCst);
                lg.log(
                    "info",
                    "Registered tunnel connection",
                    serde_json::json!({
                        "connIndex": i,
                        "connection": format!("{:08x}-1111-4000-8000-{:012x}", i, std::process::id()),
                        "event": 0,
                        "ip": format!("198.41.200.{}", 13 + i),
                        "location": "standin01",
                        "protocol": "quic",
                    }),
                );
                if i == 0 {
                    event("ready", serde_json::json!({}));
                    // cloudflared notifies systemd itself when it inherits a socket.
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
                }
            }
        });
    }

    let started = Instant::now();
    let crash_after = knob_ms("STANDIN_CRASH_AFTER_MS");
    let crash_code: i32 = std::env::var("STANDIN_CRASH_CODE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let hang_after = knob_ms("STANDIN_HANG_AFTER_MS");
    let far = Duration::from_secs(365 * 86400);
    let mut term = signal(SignalKind::terminate()).expect("signal handler");
    let mut int = signal(SignalKind::interrupt()).expect("signal handler");
    let crash = tokio::time::sleep_until((started + crash_after.unwrap_or(far)).into());
    let hang = tokio::time::sleep_until((started + hang_after.unwrap_or(far)).into());
    tokio::pin!(crash, hang);
    loop {
        tokio::select! {
            _ = &mut crash => {
                log.log("error", "simulated crash", serde_json::json!({ "code": crash_code }));
                exit(crash_code);
            }
            _ = &mut hang, if !state.hung.load(Ordering::SeqCst) => {
                state.hung.store(true, Ordering::SeqCst);
                event("hung", serde_json::json!({}));
            }
            _ = term.recv() => if !state.hung.load(Ordering::SeqCst) { break },
            _ = int.recv() => if !state.hung.load(Ordering::SeqCst) { break },
        }
    }
    event("sigterm", serde_json::json!({}));
    log.log(
        "info",
        "Initiating graceful shutdown due to signal terminated ...",
        serde_json::json!({}),
    );
    state.ready_connections.store(0, Ordering::SeqCst);
    accepting.store(false, Ordering::SeqCst);
    for i in 0..4 {
        log.log(
            "info",
            "Unregistered tunnel connection",
            serde_json::json!({ "connIndex": i }),
        );
    }
    carried.close();
    tokio::select! {
        _ = carried.wait() => {}
        _ = tokio::time::sleep(args.grace) => {
            log.log("warn", "grace period expired with requests in flight", serde_json::json!({}));
        }
        _ = term.recv() => {
            event("second_sigterm", serde_json::json!({}));
            exit(0);
        }
    }
    log.log("info", "Tunnel server stopped", serde_json::json!({}));
    exit(0);
}

async fn metrics_server(listener: TcpListener, state: Arc<State>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let st = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let st = st.clone();
                async move {
                    if st.hung.load(Ordering::SeqCst) {
                        std::future::pending::<()>().await;
                    }
                    let n = st.ready_connections.load(Ordering::SeqCst);
                    let (status, body) = match req.uri().path() {
                        "/ready" => {
                            let code = if n > 0 { 200 } else { 503 };
                            (
                                code,
                                format!(
                                    r#"{{"status":{code},"readyConnections":{n},"connectorId":"{}"}}"#,
                                    st.connector_id
                                ),
                            )
                        }
                        "/healthcheck" => (200, "OK\n".to_string()),
                        "/metrics" => (
                            200,
                            format!(
                                "# HELP cloudflared_tunnel_ha_connections Number of active ha connections\n# TYPE cloudflared_tunnel_ha_connections gauge\ncloudflared_tunnel_ha_connections {n}\n"
                            ),
                        ),
                        _ => (404, "404 page not found\n".to_string()),
                    };
                    let mut resp = Response::new(Full::new(Bytes::from(body)));
                    *resp.status_mut() = StatusCode::from_u16(status).expect("valid");
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn forward(
    listener: TcpListener,
    target: WsTarget,
    carried: TaskTracker,
    accepting: Arc<AtomicBool>,
) {
    loop {
        let Ok((mut tcp, _)) = listener.accept().await else {
            continue;
        };
        if !accepting.load(Ordering::SeqCst) {
            // Unregistered from the edge: new callers are no longer routed here.
            drop(tcp);
            continue;
        }
        let target = target.clone();
        carried.spawn(async move {
            let _ = tcp.set_nodelay(true);
            if let Ok(mut ws) = target.connect().await {
                let _ = tokio::io::copy_bidirectional(&mut tcp, &mut ws).await;
            }
        });
    }
}
