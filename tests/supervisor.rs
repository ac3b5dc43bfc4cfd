//! The real supervisor (`mcp-tunnel run`, as a process) with the cloudflared stand-in:
//! argv and environment, sd-notify datagrams, restart policy, hung child, permanent failure,
//! stop order with an in-flight SSE request, `/readyz` and `/metrics`, and no secrets in logs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mcp_tunnel::lifecycle::Shutdown;
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream, UnixDatagram};
use tokio::process::{Child, Command};

const DOMAIN: &str = "t.test";
const BIN: &str = env!("CARGO_BIN_EXE_mcp-tunnel");
mod common;
#[path = "common/standin.rs"]
mod standin_bin;
const SECRET: &str = "c3VwZXItc2VjcmV0LXR1bm5lbC1zZWNyZXQ=";

/// Writes a secret the way an operator must: owner-only (the supervisor refuses 0644).
fn write_secret(path: impl AsRef<std::path::Path>, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn token(tunnel: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!(
        r#"{{"a":"acct-1234","t":"{tunnel}","s":"{SECRET}"}}"#
    ))
}
const GOOD_TUNNEL: &str = "0c5f3c51-3c1b-4a9a-9a43-7e4f8b8e9a01";

struct Env {
    dir: tempfile::TempDir,
    notify: Arc<Mutex<Vec<String>>>,
    upstream: SocketAddr,
    _shutdown: Shutdown,
}

impl Env {
    async fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        mcp_tunnel::certs::issue::generate(
            DOMAIN,
            mcp_tunnel::certs::issue::CA_VALIDITY,
            Duration::from_secs(90 * 86400),
        )
        .unwrap()
        .write_to(dir.path())
        .unwrap();
        write_secret(dir.path().join("tunnel-token"), &token(GOOD_TUNNEL));
        let sock = UnixDatagram::bind(dir.path().join("notify.sock")).unwrap();
        let notify = Arc::new(Mutex::new(Vec::new()));
        let n = notify.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok(len) = sock.recv(&mut buf).await {
                n.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..len]).into_owned());
            }
        });
        let shutdown = Shutdown::new();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = l.local_addr().unwrap();
        tokio::spawn(serve_upstream(l));
        Env {
            dir,
            notify,
            upstream,
            _shutdown: shutdown,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Config with the stand-in; `extra` goes into [cloudflared], `knobs` into its env.
    fn config(&self, admin: Option<SocketAddr>, extra: &str, knobs: &[(&str, &str)]) -> PathBuf {
        let d = self.dir.path().display();
        let mut env = format!("STANDIN_EVENTS = \"{d}/events.jsonl\"\n");
        for (k, v) in knobs {
            env.push_str(&format!("{k} = \"{v}\"\n"));
        }
        let admin = match admin {
            Some(a) => format!("listen_addr = \"{a}\""),
            None => "enabled = false".into(),
        };
        let text = format!(
            r#"listen_addr = "127.0.0.1:0"
tunnel_domain = "{DOMAIN}"
shutdown_timeout = "10s"
[tls]
cert_file = "{d}/tls.crt"
key_file = "{d}/tls.key"
[routes]
up = "http://{up}"
[upstream]
allowed_ips = ["127.0.0.0/8"]
[admin]
{admin}
[cloudflared]
binary = "{standin}"
token_file = "{d}/tunnel-token"
health_interval = "100ms"
restart_backoff_min = "100ms"
restart_backoff_max = "2s"
{extra}
[cloudflared.env]
{env}"#,
            up = self.upstream,
            standin = standin_bin::path()
        );
        let p = self.path("mcp-tunnel.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    fn start(&self, config: &Path, watchdog: bool) -> Child {
        let log = std::fs::File::create(self.path("supervisor.log")).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("run")
            .arg("--config")
            .arg(config)
            .env("NOTIFY_SOCKET", self.path("notify.sock"))
            .env("RUST_LOG", "info")
            .env_remove("JOURNAL_STREAM")
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        if watchdog {
            cmd.env("WATCHDOG_USEC", "1000000");
        }
        cmd.spawn().unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("supervisor.log")).unwrap_or_default()
    }

    fn events(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.path("events.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn events_named(&self, name: &str) -> Vec<serde_json::Value> {
        self.events()
            .into_iter()
            .filter(|e| e["event"] == name)
            .collect()
    }

    async fn wait_events(&self, name: &str, n: usize, within: Duration) -> Vec<serde_json::Value> {
        let end = Instant::now() + within;
        loop {
            let e = self.events_named(name);
            if e.len() >= n {
                return e;
            }
            assert!(
                Instant::now() < end,
                "waited {within:?} for {n} {name} events; have {:?}\nlog:\n{}",
                self.events(),
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_notify(&self, pred: impl Fn(&str) -> bool, within: Duration) -> String {
        let end = Instant::now() + within;
        loop {
            if let Some(m) = self.notify.lock().unwrap().iter().find(|m| pred(m)) {
                return m.clone();
            }
            assert!(
                Instant::now() < end,
                "no matching sd-notify message; got {:?}\nlog:\n{}",
                self.notify.lock().unwrap(),
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn tls(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        let ca = mcp_tunnel::certs::load_certs("ca", &self.path("ca.crt")).unwrap();
        roots.add(ca[0].clone()).unwrap();
        Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
        )
    }
}

/// Upstream: `/sse` streams 6 events 250 ms apart; anything else answers `hello`.
async fn serve_upstream(l: TcpListener) {
    loop {
        let (s, _) = l.accept().await.unwrap();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(
                |req: http::Request<hyper::body::Incoming>| async move {
                    if req.uri().path() == "/sse" {
                        let (tx, rx) =
                            tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(8);
                        tokio::spawn(async move {
                            for i in 0..6 {
                                let _ = tx
                                    .send(Ok(Frame::data(Bytes::from(format!(
                                        "data: event {i}\n\n"
                                    )))))
                                    .await;
                                tokio::time::sleep(Duration::from_millis(250)).await;
                            }
                        });
                        let body = StreamBody::new(tokio_stream_from(rx));
                        let resp = http::Response::builder()
                            .header("content-type", "text/event-stream")
                            .body(http_body_util::Either::Left(body))
                            .unwrap();
                        Ok::<_, std::convert::Infallible>(resp)
                    } else {
                        Ok(http::Response::new(http_body_util::Either::Right(
                            Full::new(Bytes::from_static(b"hello")),
                        )))
                    }
                },
            );
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(s), svc)
                .await;
        });
    }
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// One request through the stand-in's forward port (TLS inside the WebSocket it opens).
async fn request(env: &Env, fwd: SocketAddr, path: &str) -> http::Response<hyper::body::Incoming> {
    let tcp = TcpStream::connect(fwd).await.unwrap();
    let name = ServerName::try_from(format!("up.{DOMAIN}")).unwrap();
    let tls = tokio_rustls::TlsConnector::from(env.tls())
        .connect(name, tcp)
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", format!("up.{DOMAIN}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    send.send_request(req).await.unwrap()
}

async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", "admin")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn sigterm(child: &Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
}

async fn exit_code(child: &mut Child, within: Duration) -> i32 {
    tokio::time::timeout(within, child.wait())
        .await
        .expect("supervisor did not exit in time")
        .unwrap()
        .code()
        .unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_path_notify_argv_env_admin_and_stop_order() {
    let env = Env::new().await;
    let cfg = env.config(
        Some("127.0.0.1:0".parse().unwrap()),
        "ready_requires_tunnel = true\ngrace_period = \"5s\"",
        &[("STANDIN_FORWARD", "127.0.0.1:0")],
    );
    let mut sup = env.start(&cfg, true);
    // Port 0: the address the admin endpoint bound comes from the service's log.
    let admin = logged_addr(&env, "supervisor.log", "admin endpoint listening", "listen").await;

    // READY=1 only once the tunnel has an edge connection, with the STATUS line.
    let ready = env
        .wait_notify(|m| m.starts_with("READY=1\n"), Duration::from_secs(15))
        .await;
    assert!(
        ready.contains("STATUS=tunnel ")
            && ready.contains(" connections; 1 route; cert expires in "),
        "{ready:?}"
    );
    let started = env.wait_events("started", 1, Duration::from_secs(5)).await;
    let pid = started[0]["pid"].as_u64().unwrap();
    let fwd: SocketAddr = env
        .wait_events("forward_listening", 1, Duration::from_secs(5))
        .await[0]["addr"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();

    // argv: the token is not on it; the URL is the proxy's bound listener.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let argv: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    assert_eq!(
        &argv[1..4],
        ["tunnel", "--no-autoupdate", "--metrics"],
        "{argv:?}"
    );
    assert!(
        argv.iter().any(|a| a.starts_with("http://127.0.0.1:")),
        "{argv:?}"
    );
    assert!(
        !String::from_utf8_lossy(&cmdline).contains(SECRET)
            && !String::from_utf8_lossy(&cmdline).contains(&token(GOOD_TUNNEL))
    );
    // environment: exactly what the supervisor chose.
    let environ = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/environ")).unwrap())
        .into_owned();
    let vars: Vec<&str> = environ.split('\0').filter(|v| !v.is_empty()).collect();
    assert!(
        vars.contains(&format!("TUNNEL_TOKEN={}", token(GOOD_TUNNEL)).as_str()),
        "{vars:?}"
    );
    for banned in ["NOTIFY_SOCKET=", "WATCHDOG_USEC=", "RUST_LOG=", "HOME="] {
        assert!(
            !vars.iter().any(|v| v.starts_with(banned)),
            "{banned} leaked: {vars:?}"
        );
    }
    // The proxy path: client -> stand-in -> WebSocket -> proxy -> upstream.
    let resp = request(&env, fwd, "/hello").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.into_body().collect().await.unwrap().to_bytes(),
        "hello"
    );

    // Admin: /healthz, /readyz with all four connections, /metrics.
    let end = Instant::now() + Duration::from_secs(5);
    let readyz = loop {
        let (code, body) = http_get(admin, "/readyz").await;
        if code == 200 && body.contains("connected 4/4") {
            break body;
        }
        assert!(Instant::now() < end, "readyz: {code} {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let v: serde_json::Value = serde_json::from_str(&readyz).unwrap();
    let names: Vec<&str> = v["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "listener",
            "certificate",
            "cloudflared",
            "peer_check",
            "supervisor"
        ]
    );
    // Supervised cloudflared on a loopback listener: the peer check is on by default, and
    // the supervisor's own cloudflared (the stand-in) got through it.
    let uid = nix::unistd::geteuid().as_raw();
    assert!(
        v["components"][3]["state"]
            .as_str()
            .unwrap()
            .starts_with(&format!("on: uid {uid} ")),
        "{readyz}"
    );
    assert_eq!(http_get(admin, "/healthz").await, (200, "ok\n".into()));
    let (_, metrics) = http_get(admin, "/metrics").await;
    for want in [
        "mcp_tunnel_requests_total{route=\"up\",status=\"200\"} 1",
        "mcp_tunnel_cloudflared_ready_connections 4",
        "mcp_tunnel_cloudflared_restarts_total 0",
        "mcp_tunnel_refusals_total{reason=\"no_route\"} 0",
        "mcp_tunnel_config_generation 1",
        "mcp_tunnel_ready 1",
        "mcp_tunnel_peer_check_enabled 1",
        "mcp_tunnel_peer_refusals_total{reason=\"other_user\"} 0",
        "mcp_tunnel_peer_refusals_total{reason=\"unknown_owner\"} 0",
    ] {
        assert!(metrics.contains(want), "missing {want:?} in\n{metrics}");
    }
    assert!(
        metrics.contains("mcp_tunnel_cert_not_after_seconds 1")
            || metrics.contains("mcp_tunnel_cert_not_after_seconds 2"),
        "{metrics}"
    );
    // `mcp-tunnel status` reads the same endpoint.
    let out = Command::new(BIN)
        .args(["status", "--admin", &admin.to_string()])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("READY") && text.contains("connected 4/4"),
        "{text}"
    );

    // Watchdog keep-alives while both loops run.
    env.wait_notify(|m| m == "WATCHDOG=1\n", Duration::from_secs(5))
        .await;

    // Stop order: an SSE stream in flight completes while cloudflared drains.
    let resp = request(&env, fwd, "/sse").await;
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "data: event 0\n\n");
    sigterm(&sup);
    env.wait_events("sigterm", 1, Duration::from_secs(5)).await;
    let rest = body.collect().await.unwrap().to_bytes();
    assert!(
        rest.ends_with(b"data: event 5\n\n"),
        "SSE cut short: {rest:?}"
    );
    assert_eq!(exit_code(&mut sup, Duration::from_secs(15)).await, 0);
    let exits = env.events_named("exit");
    assert_eq!(exits.len(), 1);
    assert_eq!(
        exits[0]["code"], 0,
        "stand-in exits 0 after a graceful stop"
    );
    env.wait_notify(|m| m.starts_with("STOPPING=1\n"), Duration::from_secs(1))
        .await;

    // The exact sd-notify vocabulary: nothing from the child (it had no NOTIFY_SOCKET).
    for m in env.notify.lock().unwrap().iter() {
        assert!(
            m == "WATCHDOG=1\n"
                || m.starts_with("EXTEND_TIMEOUT_USEC=")
                || m.starts_with("READY=1\nSTATUS=")
                || m.starts_with("STATUS=")
                || m.starts_with("STOPPING=1\nSTATUS="),
            "unexpected sd-notify message {m:?}"
        );
    }
    assert_eq!(
        env.notify
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m.starts_with("READY=1"))
            .count(),
        1
    );

    // Logs: cloudflared's lines re-emitted; no secrets anywhere.
    let log = env.log();
    assert_eq!(
        log.matches("Registered tunnel connection").count(),
        4,
        "{log}"
    );
    let key = std::fs::read_to_string(env.path("tls.key")).unwrap();
    let key_body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
    for secret in [
        SECRET,
        token(GOOD_TUNNEL).as_str(),
        "PRIVATE KEY",
        &key_body[..40],
    ] {
        assert!(
            !log.contains(secret),
            "secret material in the log: {secret}"
        );
    }
    let order: Vec<usize> = [
        "stopping cloudflared",
        "cloudflared stopped",
        "draining in-flight requests",
    ]
    .iter()
    .map(|s| {
        log.find(s)
            .unwrap_or_else(|| panic!("{s:?} not logged:\n{log}"))
    })
    .collect();
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "stop order {order:?}\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_restarts_with_growing_backoff() {
    let env = Env::new().await;
    let cfg = env.config(
        None,
        "",
        &[
            ("STANDIN_CRASH_AFTER_MS", "150"),
            ("STANDIN_CRASH_CODE", "3"),
        ],
    );
    let mut sup = env.start(&cfg, false);
    let started = env.wait_events("started", 4, Duration::from_secs(15)).await;
    let pids: std::collections::HashSet<u64> =
        started.iter().map(|e| e["pid"].as_u64().unwrap()).collect();
    assert_eq!(pids.len(), started.len(), "each start is a new process");
    // Gaps between a crash and the next start stay within each growing cap.
    let log = env.log();
    let caps: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("cloudflared restart scheduled"))
        .filter_map(|l| {
            l.split("backoff_cap_ms=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert!(
        caps.len() >= 3 && caps[..3] == [100, 200, 400],
        "{caps:?}\n{log}"
    );
    let exits = env.events_named("exit");
    for (i, cap) in caps.iter().take(3).enumerate() {
        let gap =
            started[i + 1]["unix_ms"].as_u64().unwrap() - exits[i]["unix_ms"].as_u64().unwrap();
        assert!(
            gap <= cap + 1000,
            "restart {i}: gap {gap} ms over cap {cap} ms"
        );
        assert_eq!(exits[i]["code"], 3);
    }
    sigterm(&sup);
    assert_eq!(exit_code(&mut sup, Duration::from_secs(10)).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_255_is_permanent_and_the_supervisor_exits_78() {
    let env = Env::new().await;
    // Passes the supervisor's format check, but cloudflared refuses it (not a UUID).
    write_secret(env.path("tunnel-token"), &token("not-a-uuid"));
    let cfg = env.config(None, "", &[]);
    let mut sup = env.start(&cfg, false);
    assert_eq!(exit_code(&mut sup, Duration::from_secs(10)).await, 78);
    assert_eq!(
        env.events_named("started").len(),
        1,
        "no restart after exit 255"
    );
    assert_eq!(env.events_named("exit")[0]["code"], 255);
    env.wait_notify(
        |m| m.contains("STATUS=cloudflared cannot run: cloudflared exited 255"),
        Duration::from_secs(1),
    )
    .await;
    assert!(
        env.log().contains("exiting with status 78"),
        "{}",
        env.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_token_rejection_is_permanent_and_the_supervisor_exits_78() {
    // cloudflared never exits when the edge refuses its token: it logs and retries. The
    // supervisor notices the refusals and stops instead of waiting forever.
    let env = Env::new().await;
    let cfg = env.config(
        None,
        "token_refused_timeout = \"2s\"",
        &[("STANDIN_REJECTED", "1")],
    );
    let mut sup = env.start(&cfg, false);
    assert_eq!(exit_code(&mut sup, Duration::from_secs(15)).await, 78);
    assert_eq!(
        env.events_named("started").len(),
        1,
        "no restart loop on a refused token"
    );
    env.wait_notify(
        |m| m.contains("STATUS=cloudflared cannot run: the edge refused the tunnel token"),
        Duration::from_secs(1),
    )
    .await;
    assert!(
        !env.log().contains(&token(GOOD_TUNNEL)),
        "token leaked into the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_and_never_ready_children_are_replaced() {
    let env = Env::new().await;
    let cfg = env.config(
        None,
        "hung_timeout = \"400ms\"\ngrace_period = \"1s\"",
        &[("STANDIN_HANG_AFTER_MS", "300")],
    );
    let mut sup = env.start(&cfg, false);
    let started = env.wait_events("started", 2, Duration::from_secs(10)).await;
    let first = started[0]["pid"].as_u64().unwrap();
    assert!(
        !Path::new(&format!("/proc/{first}")).exists()
            || std::fs::read_to_string(format!("/proc/{first}/stat"))
                .unwrap()
                .contains(") Z"),
        "hung child still alive"
    );
    assert!(
        env.events_named("exit")
            .iter()
            .all(|e| e["pid"].as_u64() != Some(first)),
        "a hung child is killed, it does not exit by itself"
    );
    assert!(
        env.log().contains("metrics server stopped answering"),
        "{}",
        env.log()
    );
    sigterm(&sup);
    assert_eq!(exit_code(&mut sup, Duration::from_secs(10)).await, 0);

    let env = Env::new().await;
    let cfg = env.config(
        None,
        "startup_timeout = \"500ms\"",
        &[("STANDIN_NEVER_READY", "1")],
    );
    let mut sup = env.start(&cfg, false);
    env.wait_events("started", 2, Duration::from_secs(10)).await;
    assert!(
        env.log()
            .contains("no edge connection within startup_timeout"),
        "{}",
        env.log()
    );
    sigterm(&sup);
    assert_eq!(exit_code(&mut sup, Duration::from_secs(10)).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_change_restarts_cloudflared_gracefully() {
    let env = Env::new().await;
    let cfg = env.config(None, "", &[]);
    let mut sup = env.start(&cfg, false);
    let first = env.wait_events("ready", 1, Duration::from_secs(10)).await[0]["pid"]
        .as_u64()
        .unwrap();
    let other = "11111111-2222-4333-8444-555555555555";
    let tmp = env.path("tunnel-token.tmp");
    write_secret(&tmp, &token(other));
    std::fs::rename(&tmp, env.path("tunnel-token")).unwrap();
    let started = env.wait_events("started", 2, Duration::from_secs(10)).await;
    // The new child starts beside the old one, which is stopped (SIGTERM) once the new one
    // is ready: an overlap, not a gap.
    let sigterms = env.wait_events("sigterm", 1, Duration::from_secs(10)).await;
    assert_eq!(
        sigterms[0]["pid"].as_u64(),
        Some(first),
        "old child stopped gracefully"
    );
    assert!(
        env.events_named("ready")
            .iter()
            .any(|e| e["pid"] == started[1]["pid"]),
        "the old child was stopped before the new one was ready"
    );
    let pid = started[1]["pid"].as_u64().unwrap();
    let environ = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/environ")).unwrap())
        .into_owned();
    assert!(environ.contains(&format!("TUNNEL_TOKEN={}", token(other))));
    sigterm(&sup);
    assert_eq!(exit_code(&mut sup, Duration::from_secs(10)).await, 0);
}

#[tokio::test]
async fn missing_binary_is_a_config_error() {
    let env = Env::new().await;
    let cfg = env.config(None, "", &[]);
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(standin_bin::path(), "/nonexistent/cloudflared");
    std::fs::write(&cfg, text).unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("cloudflared.binary: /nonexistent/cloudflared")
    );
    let mut sup = env.start(&cfg, false);
    assert_eq!(exit_code(&mut sup, Duration::from_secs(10)).await, 78);
    assert!(
        env.log().contains("not found or not executable"),
        "{}",
        env.log()
    );
}

#[tokio::test]
async fn cloudflared_dies_with_the_supervisor() {
    let env = Env::new().await;
    let cfg = env.config(None, "", &[]);
    let mut sup = env.start(&cfg, false);
    let pid = env.wait_events("ready", 1, Duration::from_secs(10)).await[0]["pid"]
        .as_u64()
        .unwrap();
    sup.start_kill().unwrap();
    let _ = sup.wait().await;
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Gone, or a zombie waiting for its new parent to reap it.
        if stat.is_empty() || stat.contains(") Z ") {
            break;
        }
        assert!(
            Instant::now() < end,
            "cloudflared outlived a SIGKILLed supervisor: {stat}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Issue 25 item 6: a package upgrade replaces the binary under a running supervisor. Every
/// later cloudflared start must go through the running image's trampoline, never through
/// whatever file now sits at the path the supervisor was started from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudflared_restarts_through_the_running_image_after_the_binary_is_replaced() {
    let env = Env::new().await;
    std::fs::create_dir(env.path("bin")).unwrap();
    let installed = env.path("bin/mcp-tunnel");
    std::fs::copy(BIN, &installed).unwrap();
    let cfg = env.config(None, "", &[("STANDIN_CRASH_AFTER_MS", "300")]);
    let log = std::fs::File::create(env.path("supervisor.log")).unwrap();
    let mut sup = Command::new(&installed)
        .arg("run")
        .arg("--config")
        .arg(&cfg)
        .env("NOTIFY_SOCKET", env.path("notify.sock"))
        .env("RUST_LOG", "info")
        .env_remove("JOURNAL_STREAM")
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    env.wait_events("started", 1, Duration::from_secs(10)).await;
    // The "new version": a file that records being run, renamed over the old one as dpkg
    // and rpm do.
    let ran = env.path("new-version-ran");
    let next = env.path("bin/mcp-tunnel.dpkg-new");
    std::fs::write(
        &next,
        format!("#!/bin/sh\necho \"$@\" >> {}\nexit 1\n", ran.display()),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&next, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&next, &installed).unwrap();
    // The stand-in crashes every 300 ms: each restart is a new trampoline.
    let started = env.wait_events("started", 4, Duration::from_secs(20)).await;
    assert!(
        !ran.exists(),
        "a restart ran the replaced file: {}\n{}",
        std::fs::read_to_string(&ran).unwrap_or_default(),
        env.log()
    );
    let pids: std::collections::HashSet<u64> =
        started.iter().map(|e| e["pid"].as_u64().unwrap()).collect();
    assert_eq!(pids.len(), started.len(), "each start is a new cloudflared");
    sigterm(&sup);
    assert_eq!(exit_code(&mut sup, Duration::from_secs(10)).await, 0);
}

/// `mcp-tunnel run` with its state directory in the test's folder and its log in `log`.
fn start_with_state(env: &Env, config: &Path, log: &str) -> Child {
    let file = std::fs::File::create(env.path(log)).unwrap();
    Command::new(BIN)
        .arg("run")
        .arg("--config")
        .arg(config)
        .env("NOTIFY_SOCKET", env.path("notify.sock"))
        .env("STATE_DIRECTORY", env.path("state"))
        .env("RUST_LOG", "info")
        .env_remove("JOURNAL_STREAM")
        .stdout(Stdio::null())
        .stderr(file)
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// The address the service logged in `field` of its `message` line, in the log file `log`.
async fn logged_addr(env: &Env, log: &str, message: &str, field: &str) -> SocketAddr {
    common::logged_addr(&env.path(log), message, field).await
}

/// `mcp-tunnel sever` as an operator runs it: its exit status and what it printed.
async fn sever(env: &Env, config: &Path, admin: SocketAddr, args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN)
        .arg("sever")
        .arg("--config")
        .arg(config)
        .arg("--admin")
        .arg(admin.to_string())
        .args(args)
        .env("STATE_DIRECTORY", env.path("state"))
        .output()
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sever_stops_serving_at_once_and_the_host_stays_down_until_lifted() {
    use futures_util::StreamExt;
    let env = Env::new().await;
    std::fs::create_dir(env.path("state")).unwrap();
    let cfg = env.config(
        Some("127.0.0.1:0".parse().unwrap()),
        "grace_period = \"30s\"",
        &[("STANDIN_FORWARD", "127.0.0.1:0")],
    );
    let mut sup = start_with_state(&env, &cfg, "run-1.log");
    env.wait_notify(|m| m.starts_with("READY=1\n"), Duration::from_secs(15))
        .await;
    let admin = logged_addr(&env, "run-1.log", "admin endpoint listening", "listen").await;
    let listen = logged_addr(&env, "run-1.log", "proxy listening", "listen").await;
    let pid = env.wait_events("started", 1, Duration::from_secs(5)).await[0]["pid"]
        .as_u64()
        .unwrap();

    // An open tunnel session straight to the listener: it stays open until severed.
    let tcp = TcpStream::connect(listen).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{listen}/"), tcp)
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), ws.next())
            .await
            .is_err(),
        "the session is open and quiet before the sever"
    );

    let t0 = Instant::now();
    let (code, out) = sever(&env, &cfg, admin, &["--reason", "token leaked"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("marker written"), "{out}");
    assert!(out.contains("severed in"), "{out}");
    assert!(out.contains("other hosts keep serving"), "{out}");
    // cloudflared got no grace period (30 s configured): it is gone at once.
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "cloudflared still runs after the sever"
    );
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    // The open session was closed, and the listener takes no new ones.
    let closed = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("the session is closed by the sever");
    assert!(
        !matches!(
            closed,
            Some(Ok(tokio_tungstenite::tungstenite::Message::Binary(_)))
        ),
        "{closed:?}"
    );
    assert!(
        TcpStream::connect(listen).await.is_err(),
        "the listener still accepts"
    );
    // Shown by /readyz, /metrics and the journal; the process is still up, only severed.
    let (status, readyz) = http_get(admin, "/readyz").await;
    assert_eq!(status, 503, "{readyz}");
    let v: serde_json::Value = serde_json::from_str(&readyz).unwrap();
    assert!(
        v["severed"]
            .as_str()
            .unwrap()
            .contains("(token leaked): marker "),
        "{readyz}"
    );
    let (_, metrics) = http_get(admin, "/metrics").await;
    assert!(metrics.contains("\nmcp_tunnel_severed 1\n"), "{metrics}");
    assert!(
        metrics.contains("mcp_tunnel_incident_actions_total{action=\"sever\"} 1"),
        "{metrics}"
    );
    let log = std::fs::read_to_string(env.path("run-1.log")).unwrap();
    assert!(log.contains("SEVERING"), "{log}");
    assert!(
        sup.try_wait().unwrap().is_none(),
        "a severed service stays up to show why"
    );

    // Twice is the same as once.
    let (code, out) = sever(&env, &cfg, admin, &[]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("already severed"), "{out}");
    assert!(out.contains("(token leaked)"), "{out}");

    // A start (systemctl start, a reboot, Restart=) refuses while the marker is there.
    let mut again = start_with_state(&env, &cfg, "run-2.log");
    let code = exit_code(&mut again, Duration::from_secs(20)).await;
    let log = std::fs::read_to_string(env.path("run-2.log")).unwrap();
    assert_eq!(code, 78, "{log}");
    assert!(
        log.contains("refusing to start: severed since") && log.contains("mcp-tunnel sever --lift"),
        "{log}"
    );

    // Lifted: the severed process exits 75 (systemd's Restart=on-failure starts it afresh),
    // and the next start serves again.
    let (code, out) = sever(&env, &cfg, admin, &["--lift"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("marker removed"), "{out}");
    assert_eq!(exit_code(&mut sup, Duration::from_secs(10)).await, 75);
    let (code, out) = sever(&env, &cfg, admin, &["--lift"]).await;
    assert_eq!(code, 0, "lifting twice is fine: {out}");
    assert!(out.contains("not severed"), "{out}");
    let mut back = start_with_state(&env, &cfg, "run-3.log");
    let admin = logged_addr(&env, "run-3.log", "admin endpoint listening", "listen").await;
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let ok =
            TcpStream::connect(admin).await.is_ok() && http_get(admin, "/readyz").await.0 == 200;
        if ok {
            break;
        }
        assert!(
            Instant::now() < end,
            "the lifted service did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sigterm(&back);
    assert_eq!(exit_code(&mut back, Duration::from_secs(40)).await, 0);
}

/// `READY=1` and `/readyz` come from one readiness registry (issue 22): READY=1 waits for
/// what `/readyz` waits for, and a server certificate that expires while the service runs
/// turns `/readyz` to 503 and leads every later `STATUS=` with `NOT READY (certificate)`.
/// `READY=1` cannot be taken back, so `STATUS=` is where systemd hears it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_expires_while_running_is_not_ready_for_systemd_and_readyz_alike() {
    let env = Env::new().await;
    let ca = mcp_tunnel::certs::issue::IssuedPair {
        cert_pem: std::fs::read_to_string(env.path("ca.crt")).unwrap(),
        key_pem: std::fs::read_to_string(env.path("ca.key")).unwrap(),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let short = mcp_tunnel::certs::issue::issue_server_at(
        &ca,
        DOMAIN,
        Duration::from_secs(6),
        Default::default(),
        now,
    )
    .unwrap();
    std::fs::write(env.path("tls.crt"), &short.cert_pem).unwrap();
    std::fs::write(env.path("tls.key"), &short.key_pem).unwrap();
    let cfg = env.config(
        Some("127.0.0.1:0".parse().unwrap()),
        "ready_requires_tunnel = true",
        &[("STANDIN_FORWARD", "127.0.0.1:0")],
    );
    let mut sup = env.start(&cfg, false);
    let admin = logged_addr(&env, "supervisor.log", "admin endpoint listening", "listen").await;
    let ready = env
        .wait_notify(|m| m.starts_with("READY=1\n"), Duration::from_secs(15))
        .await;
    assert!(!ready.contains("NOT READY"), "{ready:?}");
    assert_eq!(
        http_get(admin, "/readyz").await.0,
        200,
        "ready when READY=1 was sent"
    );

    let status = env
        .wait_notify(
            |m| m.starts_with("STATUS=NOT READY (certificate); "),
            Duration::from_secs(15),
        )
        .await;
    assert!(status.contains("CERT EXPIRED"), "{status:?}");
    let (code, body) = http_get(admin, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let cert = v["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "certificate")
        .unwrap();
    assert_eq!(cert["ready"], false, "{body}");
    assert_eq!(cert["state"], "expired", "{body}");
    sigterm(&sup);
    assert_eq!(exit_code(&mut sup, Duration::from_secs(20)).await, 0);
}

/// One tunnel session straight to the proxy's listener (as cloudflared opens them), HTTP/1.1.
async fn session(
    env: &Env,
    listener: SocketAddr,
) -> std::io::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let target = mcp_tunnel::proxy::edge::WsTarget::parse(&format!("ws://{listener}")).unwrap();
    let stream = target
        .connect_tls(env.tls(), &format!("up.{DOMAIN}"))
        .await?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    Ok(send)
}

async fn get_up(send: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>) -> u16 {
    send.ready().await.unwrap();
    let req = http::Request::get("/")
        .header("host", format!("up.{DOMAIN}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    resp.into_body().collect().await.unwrap();
    status
}

/// Out of file descriptors (issue 23 item 4, a low `LimitNOFILE`): the accept loop backs off
/// without flooding the log (a few lines per 10 s, the rest counted as `suppressed`), every
/// refused accept is counted (`mcp_tunnel_limit_hits_total{limit="open_files"}`), the open
/// session keeps serving, and the connection queued in the backlog is served once
/// descriptors free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_accept_backs_off_open_sessions_go_on_and_accepting_resumes() {
    let env = Env::new().await;
    let d = env.dir.path().display();
    let cfg = env.path("nofile.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen_addr = \"127.0.0.1:0\"\ntunnel_domain = \"{DOMAIN}\"\nshutdown_timeout = \"2s\"\n[tls]\ncert_file = \"{d}/tls.crt\"\nkey_file = \"{d}/tls.key\"\n[routes]\nup = \"http://{}\"\n[upstream]\nallowed_ips = [\"127.0.0.0/8\"]\n[admin]\nlisten_addr = \"127.0.0.1:0\"\n[cloudflared]\nenabled = false\n",
            env.upstream
        ),
    )
    .unwrap();
    let log = std::fs::File::create(env.path("supervisor.log")).unwrap();
    let mut sup = Command::new("prlimit")
        .args(["--nofile=64:64", "--"])
        .arg(BIN)
        .args(["run", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .env_remove("JOURNAL_STREAM")
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let listener = logged_addr(&env, "supervisor.log", "proxy listening", "listen").await;
    let admin = logged_addr(&env, "supervisor.log", "admin endpoint listening", "listen").await;

    // A session in use before the descriptors run out.
    let mut first = session(&env, listener).await.unwrap();
    assert_eq!(get_up(&mut first).await, 200);
    // More sessions until one is not answered: its connection waits in the backlog.
    let mut held = Vec::new();
    let queued = loop {
        let attempt = tokio::spawn({
            let tls_env = env.tls();
            async move {
                let target =
                    mcp_tunnel::proxy::edge::WsTarget::parse(&format!("ws://{listener}")).unwrap();
                target.connect_tls(tls_env, &format!("up.{DOMAIN}")).await
            }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Not answered yet: queued for want of descriptors only if the service says so (a
        // busy machine may just be slow).
        if !attempt.is_finished() && env.log().contains("accept failed: out of file descriptors") {
            break attempt;
        }
        held.push(
            attempt
                .await
                .unwrap()
                .expect("a session while descriptors last"),
        );
        assert!(held.len() < 100, "the descriptor limit was never reached");
    };
    let opened = held.len();
    // Three seconds out of descriptors: with a fixed 50 ms retry and a line per failure the
    // log would take some 60 lines.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let text = env.log();
    let lines = text
        .lines()
        .filter(|l| l.contains("accept failed: out of file descriptors"))
        .count();
    assert!(
        (1..=5).contains(&lines),
        "{lines} accept lines in 3 s (at most 5 per 10 s)\n{text}"
    );
    // The session in flight goes on (its upstream connection is pooled).
    assert_eq!(get_up(&mut first).await, 200);

    // Descriptors free: the queued connection is served.
    held.truncate(opened.saturating_sub(8));
    let stream = tokio::time::timeout(Duration::from_secs(5), queued)
        .await
        .expect("the queued connection was accepted once descriptors freed")
        .unwrap()
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    assert_eq!(get_up(&mut send).await, 200);
    let (code, metrics) = http_get(admin, "/metrics").await;
    assert_eq!(code, 200);
    let hits: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("mcp_tunnel_limit_hits_total{limit=\"open_files\"} "))
        .unwrap_or_else(|| panic!("no open_files limit hits\n{metrics}"))
        .parse()
        .unwrap();
    assert!(hits >= 3.0, "{hits} refused accepts counted");
    println!(
        "{opened} sessions opened before the limit; {lines} log lines; {hits} refused accepts counted"
    );
    sigterm(&sup);
    assert_eq!(exit_code(&mut sup, Duration::from_secs(20)).await, 0);
}
