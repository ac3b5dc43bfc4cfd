//! `mcp-tunnel run` (the real supervisor process) driving the REAL cloudflared 2026.8.2,
//! registered with fake-edge (../shared/): argv and environment as shipped, registration and
//! READY=1, degraded / disconnected / recovered from the real `/ready`, refused and revoked
//! tokens, caller-controlled log text, crash and hang, token change, SIGTERM with an SSE
//! stream in flight, shutdown while reconnecting, and death with the supervisor.
//!
//! cloudflared dials public addresses by itself, so these tests refuse to run anywhere but a
//! loopback-only network namespace; `tests/real-cloudflared.sh` makes one and runs them
//! (`cargo test` alone lists them as ignored, with that reason). Every test fails loudly when
//! the shared binaries are absent: see README "The real cloudflared in tests".

mod fake_tunnels_api;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mcp_tunnel::proxy::ws::WsByteStream;
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpSocket, TcpStream, UnixDatagram};
use tokio::process::{Child, Command};

const DOMAIN: &str = "t.test";
const BIN: &str = env!("CARGO_BIN_EXE_mcp-tunnel");
/// A token cloudflared accepts as well-formed (fake-edge does not check it unless told to).
const TOKEN: &str = "eyJhIjoiMDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWYiLCJ0IjoiNmZmNDJhZTItNzY1ZC00YWRmLTgxMTItMzFjNTVjMTU1MWVmIiwicyI6ImMyVmpjbVYwYzJWamNtVjBjMlZqY21WMGMyVmpjbVYwYzJWamNtVjBNVEk9In0=";

/// `../shared/<name>` next to the checkout, or `$MCP_TUNNEL_SHARED/<name>`.
fn shared(name: &str) -> PathBuf {
    let base = std::env::var_os("MCP_TUNNEL_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    base.join(name)
}

fn cloudflared() -> PathBuf {
    shared("cloudflared/cloudflared")
}

fn fake_edge() -> PathBuf {
    shared("fake-edge/fake-edge")
}

/// Stops the test unless the binaries exist and nothing but `lo` is in this namespace.
fn preflight() {
    for p in [
        cloudflared(),
        shared("cloudflared/cloudflared-2026.8.2"),
        fake_edge(),
    ] {
        assert!(
            p.is_file(),
            "{} is missing: these tests need the real cloudflared and fake-edge (README: \"The real cloudflared in tests\" says how to obtain them); set MCP_TUNNEL_SHARED to their parent folder",
            p.display()
        );
    }
    let dev = std::fs::read_to_string("/proc/net/dev").unwrap();
    let ifaces: Vec<&str> = dev
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    assert!(
        ifaces.iter().all(|i| *i == "lo"),
        "refusing to run cloudflared: this network namespace has {ifaces:?}; run tests/real-cloudflared.sh (unshare -n)"
    );
}

/// Each test takes its own block of ports (the namespace is private, so no clashes).
fn port_block() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(21000);
    NEXT.fetch_add(50, Ordering::SeqCst)
}

struct Edge {
    _child: Child,
    base: u16,
    listeners: u16,
    log: PathBuf,
}

impl Edge {
    async fn start(dir: &Path, base: u16, listeners: u16, extra: &[&str]) -> Edge {
        let log = dir.join("edge.log");
        let child = Command::new(fake_edge())
            .arg("-pki")
            .arg(dir.join("pki"))
            .arg("-tunnel-addr")
            .arg(format!("127.0.0.1:{base}"))
            .arg("-listeners")
            .arg(listeners.to_string())
            .arg("-eyeball")
            .arg(format!("127.0.0.1:{}", base + 10))
            .arg("-control")
            .arg(format!("127.0.0.1:{}", base + 11))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let e = Edge {
            _child: child,
            base,
            listeners,
            log,
        };
        wait_until("fake-edge listening", Duration::from_secs(10), || async {
            TcpStream::connect(e.control()).await.is_ok()
        })
        .await;
        e
    }

    fn eyeball(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.base + 10))
    }

    fn control(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.base + 11))
    }

    fn addrs(&self) -> String {
        (0..self.listeners)
            .map(|i| format!("127.0.0.1:{}", self.base + i))
            .collect::<Vec<_>>()
            .join(",")
    }

    async fn post(&self, path: &str, body: &str) {
        let (status, text) = http(self.control(), "POST", path, body).await;
        assert_eq!(status, 200, "fake-edge {path}: {text}");
    }

    async fn registered(&self) -> u64 {
        let (_, body) = http(self.control(), "GET", "/status", "").await;
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["registered"]
            .as_u64()
            .unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

struct Env {
    dir: tempfile::TempDir,
    base: u16,
    notify: Arc<Mutex<Vec<String>>>,
    upstream: SocketAddr,
    edge: Arc<Edge>,
    /// With `[provision]`: callers trust the tunnel's active CAs at each request, as
    /// Anthropic's backend does, instead of the `ca.crt` file.
    api_roots: std::sync::OnceLock<(Arc<fake_tunnels_api::Fake>, String)>,
}

impl Env {
    /// A PKI, token, upstream, sd-notify socket and a fake-edge with `listeners` addresses.
    async fn new(listeners: u16, edge_args: &[&str]) -> Env {
        preflight();
        let dir = tempfile::tempdir().unwrap();
        let base = port_block();
        let edge = Arc::new(Edge::start(dir.path(), base, listeners, edge_args).await);
        Env::with_edge(dir, base, edge).await
    }

    /// Another appliance host registered with `other`'s edge (a connector of the same
    /// tunnel), with a copy of its CA, certificate and token.
    async fn host_of(other: &Env) -> Env {
        let dir = tempfile::tempdir().unwrap();
        for f in ["ca.crt", "ca.key", "tls.crt", "tls.key", "tunnel-token"] {
            std::fs::copy(other.path(f), dir.path().join(f)).unwrap();
        }
        std::fs::create_dir(dir.path().join("pki")).unwrap();
        std::fs::copy(other.path("pki/ca.crt"), dir.path().join("pki/ca.crt")).unwrap();
        Env::with_edge(dir, port_block(), other.edge.clone()).await
    }

    async fn with_edge(dir: tempfile::TempDir, base: u16, edge: Arc<Edge>) -> Env {
        if !dir.path().join("tls.crt").exists() {
            mcp_tunnel::certs::issue::generate(
                DOMAIN,
                mcp_tunnel::certs::issue::CA_VALIDITY,
                Duration::from_secs(90 * 86400),
            )
            .unwrap()
            .write_to(dir.path())
            .unwrap();
            write_secret(&dir.path().join("tunnel-token"), TOKEN);
        }
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
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = l.local_addr().unwrap();
        tokio::spawn(serve_upstream(l));
        Env {
            dir,
            base,
            notify,
            upstream,
            edge,
            api_roots: std::sync::OnceLock::new(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn listen(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.base + 20))
    }

    fn admin(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.base + 21))
    }

    /// The config an operator would write, pointed at fake-edge through `[cloudflared.env]`;
    /// `extra` goes into `[cloudflared]`.
    fn config(&self, extra: &str) -> PathBuf {
        let d = self.dir.path().display();
        let text = format!(
            r#"listen_addr = "{listen}"
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
listen_addr = "{admin}"
[cloudflared]
binary = "{bin}"
token_file = "{d}/tunnel-token"
health_interval = "200ms"
restart_backoff_min = "200ms"
restart_backoff_max = "2s"
{extra}
[cloudflared.env]
TUNNEL_TRANSPORT_PROTOCOL = "http2"
TUNNEL_EDGE = "{edge}"
TUNNEL_CACERT = "{d}/pki/ca.crt"
"#,
            listen = self.listen(),
            up = self.upstream,
            admin = self.admin(),
            bin = cloudflared().display(),
            edge = self.edge.addrs(),
        );
        let p = self.path("mcp-tunnel.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    fn start(&self, config: &Path) -> Child {
        let log = std::fs::File::create(self.path("supervisor.log")).unwrap();
        Command::new(BIN)
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("NOTIFY_SOCKET", self.path("notify.sock"))
            .env("RUST_LOG", "info,cloudflared=debug")
            .env_remove("JOURNAL_STREAM")
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("supervisor.log")).unwrap_or_default()
    }

    /// The ends of both logs for a failure message; the supervisor's without its access
    /// lines, which under load would fill the tail and hide the lifecycle lines.
    fn logs(&self) -> String {
        let log = self.log();
        let access = count(&log, "request completed");
        let rest: String = log
            .lines()
            .filter(|l| !l.contains("request completed"))
            .map(|l| format!("{l}\n"))
            .collect();
        format!(
            "--- supervisor log ({access} access lines left out):\n{}\n--- fake-edge log:\n{}",
            tail(&rest, 80),
            tail(&self.edge.log(), 30)
        )
    }

    async fn readyz(&self) -> serde_json::Value {
        let (_, body) = http(self.admin(), "GET", "/readyz", "").await;
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null)
    }

    /// cloudflared's state in `/readyz`, e.g. "connected 4/4".
    async fn cloudflared_state(&self) -> String {
        let r = self.readyz().await;
        r["components"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["name"] == "cloudflared"))
            .map(|c| c["state"].as_str().unwrap_or("").to_string())
            .unwrap_or_default()
    }

    async fn wait_state(&self, want: &str, within: Duration) {
        let end = Instant::now() + within;
        loop {
            let s = self.cloudflared_state().await;
            if s == want {
                return;
            }
            assert!(
                Instant::now() < end,
                "cloudflared state {s:?}, waited {within:?} for {want:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_notify(&self, want: &str, within: Duration) -> String {
        let end = Instant::now() + within;
        loop {
            if let Some(m) = self
                .notify
                .lock()
                .unwrap()
                .iter()
                .find(|m| m.contains(want))
            {
                return m.clone();
            }
            assert!(
                Instant::now() < end,
                "no sd-notify message with {want:?}; got {:?}\n{}",
                self.notify.lock().unwrap(),
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn tls(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        if let Some((fake, tunnel)) = self.api_roots.get() {
            use rustls::pki_types::CertificateDer;
            use rustls::pki_types::pem::PemObject;
            for pem in fake.trusted_pems(tunnel) {
                roots
                    .add(CertificateDer::from_pem_slice(pem.as_bytes()).unwrap())
                    .unwrap();
            }
        } else {
            let ca = mcp_tunnel::certs::load_certs("ca", &self.path("ca.crt")).unwrap();
            roots.add(ca[0].clone()).unwrap();
        }
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

    /// One HTTP/1.1 request as Claude sends it: a WebSocket to the edge's eyeball port (from
    /// `from`, which the edge reports as `Cf-Connecting-Ip`), relayed by the real cloudflared
    /// to the proxy, with TLS inside it.
    async fn request(
        &self,
        from: [u8; 4],
        ws_path: &str,
        path: &str,
    ) -> http::Response<hyper::body::Incoming> {
        self.try_request(from, ws_path, "GET", path)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()))
    }

    /// As `request`, reporting any failure on the way instead of panicking.
    async fn try_request(
        &self,
        from: [u8; 4],
        ws_path: &str,
        method: &str,
        path: &str,
    ) -> Result<http::Response<hyper::body::Incoming>, String> {
        let sock = TcpSocket::new_v4().map_err(|e| e.to_string())?;
        sock.bind(SocketAddr::from((from, 0)))
            .map_err(|e| e.to_string())?;
        let tcp = sock
            .connect(self.edge.eyeball())
            .await
            .map_err(|e| format!("connect to the edge: {e}"))?;
        let url = format!("ws://{}{ws_path}", self.edge.eyeball());
        let (ws, resp) = tokio_tungstenite::client_async(url, tcp)
            .await
            .map_err(|e| format!("websocket through the edge: {e}"))?;
        if resp.status() != 101 {
            return Err(format!("websocket upgrade answered {}", resp.status()));
        }
        let name = ServerName::try_from(format!("up.{DOMAIN}")).unwrap();
        let tls = tokio_rustls::TlsConnector::from(self.tls())
            .connect(name, WsByteStream::new(ws))
            .await
            .map_err(|e| format!("inner TLS: {e}"))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP handshake: {e}"))?;
        tokio::spawn(conn);
        let body = if method == "POST" {
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"x"}}}"#
        } else {
            ""
        };
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", format!("up.{DOMAIN}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        send.send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))
    }

    /// The cloudflared process the supervisor runs (its only child).
    fn cloudflared_pid(&self, supervisor: &Child) -> Option<i32> {
        let sup = supervisor.id()?;
        let tasks = std::fs::read_dir(format!("/proc/{sup}/task")).ok()?;
        tasks
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("children")).ok())
            .flat_map(|c| {
                c.split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok())
                    .collect::<Vec<_>>()
            })
            .find(|p| {
                std::fs::read(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| c.windows(6).any(|w| w == b"tunnel"))
            })
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn write_secret(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

async fn wait_until<F, Fut>(what: &str, within: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + within;
    while !f().await {
        assert!(Instant::now() < end, "waited {within:?} for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let Ok(tcp) = TcpStream::connect(addr).await else {
        return (0, String::new());
    };
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let Ok(resp) = send.send_request(req).await else {
        return (0, String::new());
    };
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

type EventStream = StreamBody<
    futures_util::stream::PollFn<
        Box<
            dyn FnMut(
                    &mut std::task::Context<'_>,
                )
                    -> std::task::Poll<Option<Result<Frame<Bytes>, std::io::Error>>>
                + Send,
        >,
    >,
>;

/// An SSE body: each event after its delay (ms).
fn events(plan: &'static [(u64, &'static str)]) -> EventStream {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(8);
    tokio::spawn(async move {
        for (delay, ev) in plan {
            tokio::time::sleep(Duration::from_millis(*delay)).await;
            let _ = tx
                .send(Ok(Frame::data(Bytes::from_static(ev.as_bytes()))))
                .await;
        }
    });
    StreamBody::new(futures_util::stream::poll_fn(Box::new(move |cx| {
        rx.poll_recv(cx)
    })))
}

/// Upstream: `/sse` streams 6 events 250 ms apart, `/quiet` one event, 4 s of silence and
/// one more; `/headers` answers the request headers; anything else `hello`.
async fn serve_upstream(l: TcpListener) {
    loop {
        let (s, _) = l.accept().await.unwrap();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(
                |req: http::Request<hyper::body::Incoming>| async move {
                    let plan: &[(u64, &str)] = match req.uri().path() {
                        // 6 events 250 ms apart.
                        "/sse" => &[
                            (0, "data: event 0\n\n"),
                            (250, "data: event 1\n\n"),
                            (250, "data: event 2\n\n"),
                            (250, "data: event 3\n\n"),
                            (250, "data: event 4\n\n"),
                            (250, "data: event 5\n\n"),
                        ],
                        // One event, 4 s of silence, one more.
                        "/quiet" => &[(0, "data: first\n\n"), (4000, "data: last\n\n")],
                        _ => &[],
                    };
                    let body = if !plan.is_empty() {
                        let resp = http::Response::builder()
                            .header("content-type", "text/event-stream; charset=utf-8")
                            .body(http_body_util::Either::Left(events(plan)))
                            .unwrap();
                        return Ok::<_, std::convert::Infallible>(resp);
                    } else if req.uri().path() == "/headers" {
                        let mut text = String::new();
                        for (k, v) in req.headers() {
                            text.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
                        }
                        text
                    } else {
                        "hello".to_string()
                    };
                    Ok(http::Response::new(http_body_util::Either::Right(
                        Full::new(Bytes::from(body)),
                    )))
                },
            );
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(s), svc)
                .await;
        });
    }
}

fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).unwrap();
}

async fn exit_code(child: &mut Child, within: Duration, env: &Env) -> i32 {
    match tokio::time::timeout(within, child.wait()).await {
        Ok(st) => st.unwrap().code().unwrap_or(-1),
        Err(_) => panic!("supervisor did not exit within {within:?}\n{}", env.logs()),
    }
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

/// cloudflared splices JSON events written at the same instant (four connections dropped at
/// once). No piece of one may come out as a plain line that lost its level: every line with
/// JSON in it is either a parsed event or marked `spliced=true`.
fn assert_no_lost_json(log: &str) {
    let lost: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("stream=\"stderr\"") && l.contains("\"level\":\""))
        .filter(|l| !l.contains("spliced=true"))
        .collect();
    assert_eq!(
        lost,
        Vec::<&str>::new(),
        "JSON fragments passed on as plain lines"
    );
}

/// Lines the supervisor re-emitted from cloudflared at ERROR level with this message.
fn error_lines(log: &str, message: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains(" ERROR ") && l.contains(message))
        .map(String::from)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs the real cloudflared: only inside a loopback-only netns, via tests/real-cloudflared.sh"]
async fn registers_serves_the_caller_and_stops_after_the_stream_drains() {
    let env = Env::new(4, &[]).await;
    let cfg = env.config("ready_requires_tunnel = true\ngrace_period = \"5s\"");
    let mut sup = env.start(&cfg);

    // READY=1 waits for a registered edge connection.
    env.wait_notify("READY=1", Duration::from_secs(30)).await;
    assert!(
        env.edge.registered().await >= 1,
        "READY=1 before any registration"
    );
    env.wait_state("connected 4/4", Duration::from_secs(20))
        .await;
    assert_eq!(env.edge.registered().await, 4);
    env.wait_notify("STATUS=tunnel 4/4 connections", Duration::from_secs(5))
        .await;
    assert_eq!(count(&env.log(), "Registered tunnel connection"), 4);

    // argv and environment as shipped: no token on the command line, nothing inherited.
    let pid = env.cloudflared_pid(&sup).expect("cloudflared child");
    let argv: Vec<String> = std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap()
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let metrics = argv[argv.iter().position(|a| a == "--metrics").unwrap() + 1].clone();
    assert_eq!(
        argv[1..],
        [
            "tunnel",
            "--no-autoupdate",
            "--metrics",
            &metrics,
            "--output",
            "json",
            "--loglevel",
            "info",
            "--grace-period",
            "5s",
            "run",
            "--url",
            &format!("http://{}", env.listen()),
        ],
        "{argv:?}"
    );
    assert!(!argv.iter().any(|a| a.contains(TOKEN)));
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let mut vars: Vec<String> = environ
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| {
            String::from_utf8_lossy(a)
                .split('=')
                .next()
                .unwrap()
                .to_string()
        })
        // The guard script in front of the binary is a shell, which exports PWD.
        .filter(|k| k != "PWD")
        .collect();
    vars.sort();
    assert_eq!(
        vars,
        [
            "PATH",
            "TUNNEL_CACERT",
            "TUNNEL_EDGE",
            "TUNNEL_TOKEN",
            "TUNNEL_TRANSPORT_PROTOCOL"
        ]
    );
    // cloudflared's own readiness agrees.
    let (status, ready) = http(metrics.parse().unwrap(), "GET", "/ready", "").await;
    assert_eq!(status, 200, "{ready}");
    assert!(ready.contains("\"readyConnections\":4"), "{ready}");

    // A request from 127.0.0.5: cloudflared's upgrade request (lower-cased Sec-Websocket-*,
    // Cf-* headers, Accept-Encoding: gzip) is accepted, and the caller is Cf-Connecting-Ip.
    let resp = env.request([127, 0, 0, 5], "/", "/headers").await;
    assert_eq!(resp.status(), 200);
    let headers = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(
        headers.contains("x-forwarded-for: 127.0.0.5\n"),
        "{headers}"
    );
    assert!(
        headers.contains(&format!("host: {}\n", env.upstream)),
        "{headers}"
    );
    assert!(
        env.edge.log().contains("eyeball GET"),
        "the edge relayed no upgrade: {}",
        env.edge.log()
    );
    wait_until("access log line", Duration::from_secs(2), || async {
        env.log()
            .lines()
            .any(|l| l.contains("request completed") && l.contains("caller=127.0.0.5"))
    })
    .await;

    // SIGTERM with an SSE stream in flight: cloudflared unregisters, the edge lets the
    // stream finish, cloudflared exits, then the proxy drains; every event arrives.
    let resp = env.request([127, 0, 0, 1], "/", "/sse").await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "data: event 0\n\n");
    signal(sup.id().unwrap() as i32, nix::sys::signal::Signal::SIGTERM);
    let mut rest = Vec::new();
    while let Some(f) = body.frame().await {
        if let Ok(d) = f.unwrap().into_data() {
            rest.extend_from_slice(&d);
        }
    }
    drop(body);
    let rest = String::from_utf8(rest).unwrap();
    assert_eq!(
        count(&rest, "data: event"),
        5,
        "events after SIGTERM: {rest:?}\n{}",
        env.logs()
    );
    assert_eq!(exit_code(&mut sup, Duration::from_secs(20), &env).await, 0);
    let log = env.log();
    assert_eq!(
        count(&log, "Unregistered tunnel connection"),
        4,
        "{}",
        env.logs()
    );
    assert_eq!(count(&env.edge.log(), "UnregisterConnection"), 4);
    let order = |s: &str| log.find(s).unwrap_or_else(|| panic!("no {s:?}\n{log}"));
    assert!(order("Unregistered tunnel connection") < order("cloudflared stopped"));
    assert!(order("cloudflared stopped") < order("drained"));
    // A graceful shutdown is routine: nothing of it is reported as an error.
    for m in [
        "Connection terminated",
        "no more connections active and exiting",
    ] {
        assert_eq!(error_lines(&log, m), Vec::<String>::new(), "{m}");
    }
    assert_no_lost_json(&log);
    assert!(!log.contains(TOKEN), "token in the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs the real cloudflared: only inside a loopback-only netns, via tests/real-cloudflared.sh"]
async fn degraded_disconnected_recovered_and_a_fast_stop_while_reconnecting() {
    // Two edge addresses: cloudflared can only open two connections.
    let env = Env::new(2, &[]).await;
    let cfg = env.config("loglevel = \"debug\"\ngrace_period = \"30s\"");
    let mut sup = env.start(&cfg);
    env.wait_state("degraded 2/4", Duration::from_secs(30))
        .await;
    assert_eq!(env.readyz().await["ready"], true);

    // Caller-controlled text in cloudflared's debug log must not count as a refusal.
    for _ in 0..8 {
        let resp = env
            .request([127, 0, 0, 1], "/admin/unauthorized", "/")
            .await;
        assert_eq!(resp.status(), 200);
    }
    wait_until(
        "debug lines with the path",
        Duration::from_secs(5),
        || async { env.log().contains("/admin/unauthorized") },
    )
    .await;

    // The edge drops every connection: disconnected, then cloudflared reconnects by itself.
    env.edge.post("/drop", "").await;
    env.wait_state("disconnected", Duration::from_secs(5)).await;
    let r = env.readyz().await;
    assert_eq!(r["ready"], false, "{r}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        sup.try_wait().unwrap().is_none(),
        "the supervisor exited on a drop after requests to /admin/unauthorized\n{}",
        env.logs()
    );
    env.wait_state("degraded 2/4", Duration::from_secs(40))
        .await;
    let log = env.log();
    assert!(count(&log, "Connection terminated") >= 2, "{}", env.logs());
    assert_eq!(
        error_lines(&log, "Connection terminated"),
        Vec::<String>::new(),
        "a lost connection that cloudflared re-establishes is a warning"
    );
    assert_no_lost_json(&log);

    // Revoked while connected: the edge refuses and drops. While cloudflared reconnects it
    // would sit out its whole 30 s grace period on SIGTERM: the supervisor does not wait.
    env.edge
        .post("/refuse", "Unauthorized: Failed to get tunnel")
        .await;
    env.edge.post("/drop", "").await;
    env.wait_state("disconnected", Duration::from_secs(5)).await;
    let t0 = Instant::now();
    signal(sup.id().unwrap() as i32, nix::sys::signal::Signal::SIGTERM);
    assert_eq!(exit_code(&mut sup, Duration::from_secs(20), &env).await, 0);
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "stop took {:?} with nothing to drain\n{}",
        t0.elapsed(),
        env.logs()
    );
    assert!(env.log().contains("nothing to drain"), "{}", env.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs the real cloudflared: only inside a loopback-only netns, via tests/real-cloudflared.sh"]
async fn refused_token_is_retried_then_given_up_and_revocation_after_the_window() {
    let env = Env::new(4, &["-refuse", "Unauthorized: Failed to get tunnel"]).await;
    // Long enough that the edge accepting again, after cloudflared's random backoff (up to
    // 16 s here), always comes inside the window.
    let cfg = env.config("token_refused_timeout = \"45s\"\ngrace_period = \"2s\"");
    let mut sup = env.start(&cfg);

    // cloudflared retries refusals; many lines in the first seconds are not a verdict.
    wait_until("3 refusals", Duration::from_secs(30), || async {
        count(&env.edge.log(), "registration refused") >= 3
    })
    .await;
    assert!(
        sup.try_wait().unwrap().is_none(),
        "gave up after {} refusals, inside token_refused_timeout\n{}",
        count(&env.edge.log(), "registration refused"),
        env.logs()
    );
    let r = env.readyz().await;
    assert!(
        r.to_string().contains("the edge refused the tunnel token"),
        "{r}"
    );

    // The edge accepts again (the token reached it): the refusals are forgotten.
    env.edge.post("/accept", "").await;
    env.wait_state("connected 4/4", Duration::from_secs(60))
        .await;

    // Revoked while connected: refused and dropped. Given up only after the window.
    env.edge
        .post("/refuse", "Unauthorized: Failed to get tunnel")
        .await;
    env.edge.post("/drop", "").await;
    let revoked = Instant::now();
    assert_eq!(
        exit_code(&mut sup, Duration::from_secs(120), &env).await,
        78
    );
    assert!(
        revoked.elapsed() >= Duration::from_secs(45),
        "gave up {:?} after the revocation, before token_refused_timeout",
        revoked.elapsed()
    );
    let log = env.log();
    let give_up = log
        .lines()
        .find(|l| l.contains("cloudflared cannot run"))
        .unwrap_or_else(|| panic!("{log}"));
    // Each refused registration counted once, though cloudflared writes two lines for it.
    let before: &str = &log[..log.find(give_up).unwrap()];
    let events = count(before, "Register tunnel error from server side")
        - count(
            &before[..before.find("connected to the edge").unwrap_or(0)],
            "Register tunnel error from server side",
        );
    let n: usize = give_up
        .split(" refused registrations")
        .next()
        .and_then(|s| s.rsplit('(').next())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no count in {give_up}"));
    assert!(n >= 3, "{give_up}");
    assert!(
        n <= events,
        "{n} counted, {events} refusal events logged after the revocation: {give_up}"
    );
    env.wait_notify(
        "STATUS=cloudflared cannot run: the edge refused the tunnel token",
        Duration::from_secs(1),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs the real cloudflared: only inside a loopback-only netns, via tests/real-cloudflared.sh"]
async fn crash_and_hang_are_restarted_with_backoff() {
    let env = Env::new(4, &[]).await;
    let cfg = env.config("hung_timeout = \"2s\"\ngrace_period = \"2s\"");
    let mut sup = env.start(&cfg);
    env.wait_state("connected 4/4", Duration::from_secs(30))
        .await;
    let first = env.cloudflared_pid(&sup).unwrap();

    // Crash: SIGKILL.
    signal(first, nix::sys::signal::Signal::SIGKILL);
    wait_until("a new cloudflared", Duration::from_secs(15), || async {
        env.cloudflared_pid(&sup).is_some_and(|p| p != first)
    })
    .await;
    env.wait_state("connected 4/4", Duration::from_secs(40))
        .await;
    assert!(
        env.log().contains("cloudflared killed by signal"),
        "{}",
        env.logs()
    );
    let second = env.cloudflared_pid(&sup).unwrap();

    // Hang: SIGSTOP. Its metrics server stops answering; it is killed and replaced.
    signal(second, nix::sys::signal::Signal::SIGSTOP);
    wait_until("a third cloudflared", Duration::from_secs(20), || async {
        env.cloudflared_pid(&sup).is_some_and(|p| p != second)
    })
    .await;
    assert!(
        env.log().contains("metrics server stopped answering"),
        "{}",
        env.logs()
    );
    env.wait_state("connected 4/4", Duration::from_secs(40))
        .await;
    let (_, metrics) = http(env.admin(), "GET", "/metrics", "").await;
    assert!(
        metrics.contains("mcp_tunnel_cloudflared_restarts_total 2"),
        "{metrics}"
    );
    // The backoff grew between the two restarts.
    let attempts: Vec<&str> = env
        .log()
        .lines()
        .filter(|l| l.contains("cloudflared restart scheduled"))
        .map(|l| {
            if l.contains("attempt=0") {
                "0"
            } else if l.contains("attempt=1") {
                "1"
            } else {
                "?"
            }
        })
        .collect();
    assert_eq!(attempts, ["0", "1"], "{}", env.logs());
    signal(sup.id().unwrap() as i32, nix::sys::signal::Signal::SIGTERM);
    assert_eq!(exit_code(&mut sup, Duration::from_secs(20), &env).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs the real cloudflared: only inside a loopback-only netns, via tests/real-cloudflared.sh"]
async fn token_change_restarts_gracefully_and_cloudflared_dies_with_the_supervisor() {
    let env = Env::new(4, &[]).await;
    let cfg = env.config("grace_period = \"5s\"");
    let mut sup = env.start(&cfg);
    env.wait_state("connected 4/4", Duration::from_secs(30))
        .await;
    let first = env.cloudflared_pid(&sup).unwrap();

    // A rotated token, written by rename as `setup` and configuration managers do.
    let other = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        r#"{"a":"0123456789abcdef0123456789abcdef","t":"11111111-2222-4333-8444-555555555555","s":"c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI="}"#,
    );
    write_secret(&env.path("tunnel-token.new"), &other);
    std::fs::rename(env.path("tunnel-token.new"), env.path("tunnel-token")).unwrap();
    wait_until("a new cloudflared", Duration::from_secs(20), || async {
        env.cloudflared_pid(&sup).is_some_and(|p| p != first)
    })
    .await;
    env.wait_state("connected 4/4", Duration::from_secs(40))
        .await;
    let edge = env.edge.log();
    assert_eq!(count(&edge, "UnregisterConnection"), 4, "{}", env.logs());
    assert_eq!(
        count(&edge, "tunnel=11111111-2222-4333-8444-555555555555"),
        4,
        "{}",
        env.logs()
    );
    assert!(env.log().contains("tunnel token changed"));
    assert!(!env.log().contains(&other), "token in the log");

    // SIGKILL of the supervisor takes cloudflared with it (parent-death signal).
    let cf = env.cloudflared_pid(&sup).unwrap();
    sup.kill().await.unwrap();
    wait_until("cloudflared gone", Duration::from_secs(5), || async {
        !Path::new(&format!("/proc/{cf}")).exists()
            || std::fs::read_to_string(format!("/proc/{cf}/stat")).is_ok_and(|s| s.contains(") Z "))
    })
    .await;
}

/// One request of a load run: when it started and ended, and why it failed.
struct Sample {
    start: Instant,
    end: Instant,
    error: Option<String>,
}

/// Continuous load until `stop`: `sessions` clients each sending tools/call POSTs, one
/// WebSocket (one tunnel session through the edge) per request, and `sse` clients each
/// reading SSE streams (`/quiet`: an event, 4 s of silence, an event) one after another.
fn start_load(
    env: Arc<Env>,
    sessions: usize,
    sse: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Sample>> {
    async fn one(env: &Env, path: &str) -> Result<(), String> {
        let method = if path == "/mcp" { "POST" } else { "GET" };
        let resp = env.try_request([127, 0, 0, 1], "/", method, path).await?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        let ok = match path {
            "/mcp" => body == "hello",
            _ => body.ends_with(b"data: last\n\n"),
        };
        if status == 200 && ok {
            Ok(())
        } else {
            Err(format!(
                "{path} {status}: {}",
                String::from_utf8_lossy(&body)
            ))
        }
    }
    tokio::spawn(async move {
        let mut tasks = Vec::new();
        for i in 0..sessions + sse {
            let (env, stop) = (env.clone(), stop.clone());
            let (path, limit) = if i < sessions {
                ("/mcp", Duration::from_secs(10))
            } else {
                ("/quiet", Duration::from_secs(15))
            };
            tasks.push(tokio::spawn(async move {
                let mut samples = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let start = Instant::now();
                    let r = tokio::time::timeout(limit, one(&env, path))
                        .await
                        .unwrap_or_else(|_| Err(format!("{path}: timed out")));
                    samples.push(Sample {
                        start,
                        end: Instant::now(),
                        error: r.err(),
                    });
                }
                samples
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all
    })
}

fn failures(samples: &[Sample]) -> Vec<String> {
    samples.iter().filter_map(|s| s.error.clone()).collect()
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(-1.0)
}

const REPLACED: &str = "mcp_tunnel_cloudflared_replacements_total{result=\"ok\"}";

/// Writes a new token by rename, as `setup` does.
fn rotate_token(env: &Env, tunnel: &str) -> String {
    let t = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        format!(
            r#"{{"a":"0123456789abcdef0123456789abcdef","t":"{tunnel}","s":"c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI="}}"#
        ),
    );
    write_secret(&env.path("tunnel-token.new"), &t);
    std::fs::rename(env.path("tunnel-token.new"), env.path("tunnel-token")).unwrap();
    t
}

/// Waits for `n` completed replacements and the old connector gone; meanwhile records
/// whether /readyz and /metrics showed both connectors.
async fn wait_replaced(env: &Env, n: f64, within: Duration) -> (bool, bool) {
    let (mut seen_state, mut seen_two) = (false, false);
    let end = Instant::now() + within;
    loop {
        let (_, m) = http(env.admin(), "GET", "/metrics", "").await;
        seen_two |= metric(&m, "mcp_tunnel_cloudflared_connectors") == 2.0;
        seen_state |= env
            .cloudflared_state()
            .await
            .contains("replacing: new connector");
        if metric(&m, REPLACED) >= n && count(&env.log(), "cloudflared stopped") >= n as usize {
            return (seen_state, seen_two);
        }
        // None of these replacements may fail: say so now rather than time out.
        assert_eq!(
            metric(
                &m,
                "mcp_tunnel_cloudflared_replacements_total{result=\"failed\"}"
            ),
            0.0,
            "replacement {n} failed\n{}",
            env.logs()
        );
        assert!(
            Instant::now() < end,
            "replacement {n} not done within {within:?}\n{}",
            env.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "runs the real cloudflared: only inside a loopback-only netns, via tests/real-cloudflared.sh"]
async fn planned_replacements_under_load_fail_nothing_and_restarts_did() {
    let env = Arc::new(Env::new(4, &["-quiet"]).await);
    let cfg = env.config("grace_period = \"3s\"");
    let mut sup = env.start(&cfg);
    env.wait_state("connected 4/4", Duration::from_secs(30))
        .await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = start_load(env.clone(), 16, 0, stop.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;

    // (1) Token rotation: the new connector starts beside the old one.
    rotate_token(&env, "11111111-2222-4333-8444-555555555555");
    let (state1, two1) = wait_replaced(&env, 1.0, Duration::from_secs(60)).await;
    env.wait_state("connected 4/4", Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // (2) A changed [cloudflared] section, applied by the file watch.
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "grace_period = \"3s\"",
        "grace_period = \"3s\"\nloglevel = \"warn\"",
    );
    std::fs::write(env.path("next.toml"), text).unwrap();
    std::fs::rename(env.path("next.toml"), &cfg).unwrap();
    let (state2, two2) = wait_replaced(&env, 2.0, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // (3) An operator's request.
    let out = Command::new(BIN)
        .args([
            "restart-connector",
            "--admin",
            &env.admin().to_string(),
            "--timeout",
            "60s",
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    wait_replaced(&env, 3.0, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let samples = load.await.unwrap();
    let (sent, failed) = (samples.len(), failures(&samples));
    let pid_args = std::fs::read(format!(
        "/proc/{}/cmdline",
        env.cloudflared_pid(&sup).unwrap()
    ))
    .unwrap();
    assert!(
        String::from_utf8_lossy(&pid_args).contains("warn"),
        "the new section is running"
    );
    assert!(state1 && state2, "/readyz never showed the overlap");
    assert!(two1 && two2, "/metrics never showed two connectors");
    signal(sup.id().unwrap() as i32, nix::sys::signal::Signal::SIGTERM);
    assert_eq!(exit_code(&mut sup, Duration::from_secs(30), &env).await, 0);
    env.wait_notify("EXTEND_TIMEOUT_USEC=", Duration::from_secs(1))
        .await;
    assert_no_lost_json(&env.log());

    // The same token rotation with replacement = "restart" (stop, then start).
    let env2 = Arc::new(Env::new(4, &["-quiet"]).await);
    let cfg2 = env2.config("grace_period = \"3s\"\nreplacement = \"restart\"");
    let mut sup2 = env2.start(&cfg2);
    env2.wait_state("connected 4/4", Duration::from_secs(30))
        .await;
    let stop2 = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load2 = start_load(env2.clone(), 16, 0, stop2.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let first = env2.cloudflared_pid(&sup2).unwrap();
    rotate_token(&env2, "11111111-2222-4333-8444-555555555555");
    wait_until("a new cloudflared", Duration::from_secs(20), || async {
        env2.cloudflared_pid(&sup2).is_some_and(|p| p != first)
    })
    .await;
    env2.wait_state("connected 4/4", Duration::from_secs(40))
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop2.store(true, Ordering::Relaxed);
    let samples2 = load2.await.unwrap();
    let (sent2, failed2) = (samples2.len(), failures(&samples2));
    signal(sup2.id().unwrap() as i32, nix::sys::signal::Signal::SIGTERM);
    assert_eq!(
        exit_code(&mut sup2, Duration::from_secs(30), &env2).await,
        0
    );

    let sample = |f: &[String]| f.iter().take(3).cloned().collect::<Vec<_>>();
    println!(
        "16 sessions under load, one tunnel session per request:\n  \
         replacement = \"overlap\": token rotation + [cloudflared] change + restart-connector: {sent} requests, {} failed {:?}\n  \
         replacement = \"restart\": token rotation: {sent2} requests, {} failed {:?}",
        failed.len(),
        sample(&failed),
        failed2.len(),
        sample(&failed2)
    );
    assert_eq!(failed, Vec::<String>::new(), "{sent} sent");
    assert!(
        !failed2.is_empty(),
        "stop-then-start lost nothing ({sent2} sent): the comparison shows nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs the real cloudflared: only inside a loopback-only netns, via tests/real-cloudflared.sh"]
async fn keepalives_cross_the_real_connector_and_a_silent_peer_is_closed() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let env = Env::new(4, &["-quiet"]).await;
    let mut cfg = std::fs::read_to_string(env.config("grace_period = \"2s\"")).unwrap();
    cfg = cfg.replace(
        "[admin]",
        "[limits]\nws_ping_interval = \"1s\"\nws_pong_timeout = \"1s\"\nsse_keepalive_interval = \"1s\"\n[admin]",
    );
    std::fs::write(env.path("mcp-tunnel.toml"), cfg).unwrap();
    let mut sup = env.start(&env.path("mcp-tunnel.toml"));
    env.wait_state("connected 4/4", Duration::from_secs(30))
        .await;

    // An idle SSE stream gets a comment each second of silence, between whole events.
    let resp = env.request([127, 0, 0, 1], "/", "/quiet").await;
    assert_eq!(resp.status(), 200);
    let t0 = Instant::now();
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while let Some(f) = body.frame().await {
        if let Ok(d) = f.unwrap().into_data() {
            got.push((t0.elapsed(), String::from_utf8_lossy(&d).into_owned()));
        }
    }
    let text: String = got.iter().map(|(_, s)| s.as_str()).collect();
    assert!(
        text.starts_with("data: first\n\n") && text.ends_with("data: last\n\n"),
        "{got:?}"
    );
    let comments: Vec<Duration> = got
        .iter()
        .filter(|(_, s)| s.contains(": keepalive"))
        .map(|(t, _)| *t)
        .collect();
    assert!(
        (3..=4).contains(&comments.len()),
        "comments at {comments:?} in 4 s of silence at a 1 s interval: {got:?}"
    );
    for w in comments.windows(2) {
        let gap = w[1] - w[0];
        assert!(
            gap >= Duration::from_millis(900) && gap <= Duration::from_millis(1600),
            "comment spacing {gap:?}: {comments:?}"
        );
    }
    assert_eq!(
        text.replace(": keepalive\n\n", ""),
        "data: first\n\ndata: last\n\n",
        "nothing but whole comments was added"
    );

    // An idle tunnel session gets pings, relayed by cloudflared and the edge to the client.
    let url = format!("ws://{}/", env.edge.eyeball());
    let (mut ws, _) = tokio_tungstenite::connect_async(url.clone()).await.unwrap();
    let mut pings = 0;
    let read = tokio::time::timeout(Duration::from_millis(3500), async {
        while let Some(m) = ws.next().await {
            match m {
                Ok(Message::Ping(_)) => pings += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await;
    assert!(read.is_err(), "the session ended while the client answered");
    assert!((2..=4).contains(&pings), "{pings} pings in 3.5 s at 1 s");

    // A client that stops answering (never reads, so never sends a pong) is closed.
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let ended = tokio::time::timeout(Duration::from_secs(3), async {
        while let Some(m) = ws.next().await {
            match m {
                Ok(Message::Ping(_)) => {}
                _ => break,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the silent session was not closed");
    let (_, m) = http(env.admin(), "GET", "/metrics", "").await;
    assert!(metric(&m, "mcp_tunnel_ws_pings_total") >= 3.0, "{m}");
    assert!(
        metric(&m, "mcp_tunnel_ws_pong_timeouts_total") >= 1.0,
        "{m}"
    );
    assert!(metric(&m, "mcp_tunnel_sse_keepalives_total") >= 3.0, "{m}");
    signal(sup.id().unwrap() as i32, nix::sys::signal::Signal::SIGTERM);
    assert_eq!(exit_code(&mut sup, Duration::from_secs(20), &env).await, 0);
}

/// Milliseconds to hold steady between the steps of the three-host run (longer in bench).
fn hold() -> Duration {
    Duration::from_millis(
        std::env::var("MCP_TUNNEL_MULTIHOST_HOLD_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(500),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "runs the real cloudflared: only inside a loopback-only netns, via tests/real-cloudflared.sh"]
async fn three_hosts_one_tunnel_roll_changes_and_survive_a_killed_host() {
    let first = Arc::new(Env::new(4, &["-quiet"]).await);
    let hosts = [
        first.clone(),
        Arc::new(Env::host_of(&first).await),
        Arc::new(Env::host_of(&first).await),
    ];
    let mut sups = Vec::new();
    for h in &hosts {
        let cfg = h.config("grace_period = \"2s\"");
        sups.push(h.start(&cfg));
    }
    for h in &hosts {
        h.wait_state("connected 4/4", Duration::from_secs(40)).await;
    }
    wait_until(
        "12 registered connections",
        Duration::from_secs(10),
        || async { first.edge.registered().await == 12 },
    )
    .await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = start_load(first.clone(), 16, 2, stop.clone());
    let mut steps: Vec<(&str, Instant, Instant)> = Vec::new();
    tokio::time::sleep(hold()).await;

    // (a) The server certificate renewed on one host, then the next.
    let t = Instant::now();
    for h in &hosts {
        let (_, m) = http(h.admin(), "GET", "/metrics", "").await;
        let before = metric(&m, "mcp_tunnel_cert_not_after_seconds");
        tokio::time::sleep(Duration::from_millis(1100)).await; // a later notAfter second
        std::fs::write(h.path("tunnel-domain"), DOMAIN).unwrap();
        let out = Command::new(BIN)
            .args(["renew-cert", "--dir"])
            .arg(h.dir.path())
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        wait_until(
            "the renewed certificate in use",
            Duration::from_secs(10),
            || async {
                let (_, m) = http(h.admin(), "GET", "/metrics", "").await;
                metric(&m, "mcp_tunnel_cert_not_after_seconds") > before
            },
        )
        .await;
        tokio::time::sleep(hold()).await;
    }
    steps.push(("(a) certificate renewed host by host", t, Instant::now()));

    // (b) A token rotation rolled host by host (overlapping connector replacement).
    let t = Instant::now();
    for h in &hosts {
        rotate_token(h, "11111111-2222-4333-8444-555555555555");
        wait_replaced(h, 1.0, Duration::from_secs(60)).await;
        tokio::time::sleep(hold()).await;
    }
    steps.push(("(b) token rotation rolled host by host", t, Instant::now()));

    // (c) One host killed outright (supervisor and cloudflared), then brought back.
    let t = Instant::now();
    tokio::time::sleep(hold()).await;
    let victim = &hosts[1];
    let cf = victim.cloudflared_pid(&sups[1]).unwrap();
    let killed = Instant::now();
    signal(cf, nix::sys::signal::Signal::SIGKILL);
    sups[1].kill().await.unwrap();
    // Requests the edge routed to the dead host before it saw the host's connections close
    // were in flight there; afterwards the edge uses the other hosts' connections only.
    wait_until(
        "the edge to drop the host",
        Duration::from_secs(10),
        || async { first.edge.registered().await <= 8 },
    )
    .await;
    let gone = Instant::now();
    tokio::time::sleep(Duration::from_secs(2).max(hold())).await;
    let cfg = victim.path("mcp-tunnel.toml");
    sups[1] = victim.start(&cfg);
    victim
        .wait_state("connected 4/4", Duration::from_secs(40))
        .await;
    tokio::time::sleep(hold()).await;
    steps.push((
        "(c) one host killed (SIGKILL) and brought back",
        t,
        Instant::now(),
    ));

    // (d) A config change (a new route) rolled out host by host.
    let t = Instant::now();
    for h in &hosts {
        let cfg = h.path("mcp-tunnel.toml");
        let text = std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("[routes]\n", "[routes]\nextra = \"http://127.0.0.1:9\"\n");
        std::fs::write(h.path("next.toml"), text).unwrap();
        std::fs::rename(h.path("next.toml"), &cfg).unwrap();
        wait_until("the new route live", Duration::from_secs(10), || async {
            let (_, m) = http(h.admin(), "GET", "/metrics", "").await;
            metric(&m, "mcp_tunnel_config_generation") >= 2.0
        })
        .await;
        tokio::time::sleep(hold()).await;
    }
    steps.push(("(d) config change rolled host by host", t, Instant::now()));
    stop.store(true, Ordering::Relaxed);
    let samples = load.await.unwrap();

    println!("three hosts, one tunnel, 16 tools/call sessions + 2 SSE readers:");
    println!("| step | requests | failed | failed, in flight on the killed host |");
    println!("|---|---|---|---|");
    let mut unexplained = Vec::new();
    for (name, from, to) in &steps {
        let in_step: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.end >= *from && s.end <= *to)
            .collect();
        let failed: Vec<&&Sample> = in_step.iter().filter(|s| s.error.is_some()).collect();
        let in_flight = failed
            .iter()
            .filter(|s| name.starts_with("(c)") && s.start <= gone)
            .count();
        println!(
            "| {name} | {} | {} | {in_flight} |",
            in_step.len(),
            failed.len()
        );
        for f in &failed {
            if !(name.starts_with("(c)") && f.start <= gone) {
                unexplained.push(format!("{name}: {:?}", f.error));
            }
        }
    }
    let outside = samples
        .iter()
        .filter(|s| s.error.is_some())
        .filter(|s| !steps.iter().any(|(_, a, b)| s.end >= *a && s.end <= *b))
        .count();
    println!(
        "requests in all: {}, failed outside the steps: {outside}; the edge dropped the killed host's connections {:?} after the kill",
        samples.len(),
        gone - killed
    );
    assert_eq!(outside, 0);
    assert_eq!(
        unexplained,
        Vec::<String>::new(),
        "only requests in flight on the killed host may fail"
    );
    for (h, mut s) in hosts.iter().zip(sups) {
        signal(s.id().unwrap() as i32, nix::sys::signal::Signal::SIGTERM);
        assert_eq!(exit_code(&mut s, Duration::from_secs(30), h).await, 0);
    }
}

/// In front of the real cloudflared: at its `take`-th run (counting runs with `--metrics`,
/// not `--version`), something else binds the metrics port the supervisor chose before
/// cloudflared can, as an outgoing connection or another program may in that moment.
fn port_taking_wrapper(env: &Env, take: u32) -> PathBuf {
    let path = env.path("cloudflared-wrapper");
    let d = env.dir.path().display();
    let script = format!(
        r#"#!/bin/bash
port=""; prev=""
for a in "$@"; do [[ "$prev" == --metrics ]] && port="${{a##*:}}"; prev="$a"; done
if [[ -n "$port" ]]; then
  n=$(( $(cat {d}/runs 2>/dev/null || echo 0) + 1 )); echo "$n" > {d}/runs
  if (( n == {take} )); then
    /usr/bin/python3 -c 'import socket,sys,time
s = socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
open(sys.argv[2], "w").close(); time.sleep(20)' "$port" {d}/taken </dev/null >/dev/null 2>&1 &
    until [[ -e {d}/taken ]]; do sleep 0.05; done
  fi
fi
exec {guard} "$@"
"#,
        guard = cloudflared().display()
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    path
}

/// A config whose connector is `port_taking_wrapper(env, take)`.
fn config_with_port_taker(env: &Env, take: u32) -> PathBuf {
    let cfg = env.config("grace_period = \"2s\"");
    let wrapper = port_taking_wrapper(env, take);
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        &format!("binary = \"{}\"", cloudflared().display()),
        &format!("binary = \"{}\"", wrapper.display()),
    );
    std::fs::write(&cfg, text).unwrap();
    cfg
}

/// The real cloudflared said why it could not start (and exited), and the supervisor
/// started it again once; returns the supervisor's log.
fn assert_one_port_relaunch(env: &Env) -> String {
    let log = env.log();
    assert!(
        log.contains("Error opening metrics server listener")
            && log.contains("address already in use"),
        "{}",
        env.logs()
    );
    assert_eq!(
        count(&log, "metrics port was taken before it could bind it"),
        1,
        "{}",
        env.logs()
    );
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs the real cloudflared: only inside a loopback-only netns, via tests/real-cloudflared.sh"]
async fn a_first_connector_whose_metrics_port_was_taken_is_started_again_at_once_not_as_a_crash() {
    let env = Env::new(4, &["-quiet"]).await;
    let cfg = config_with_port_taker(&env, 1);
    let mut sup = env.start(&cfg);
    env.wait_state("connected 4/4", Duration::from_secs(30))
        .await;
    let log = assert_one_port_relaunch(&env);
    assert!(
        !log.contains("cloudflared restart scheduled"),
        "{}",
        env.logs()
    );
    let (_, m) = http(env.admin(), "GET", "/metrics", "").await;
    assert_eq!(metric(&m, "mcp_tunnel_cloudflared_restarts_total"), 0.0);
    assert_eq!(
        std::fs::read_to_string(env.path("runs")).unwrap().trim(),
        "2"
    );
    signal(sup.id().unwrap() as i32, nix::sys::signal::Signal::SIGTERM);
    assert_eq!(exit_code(&mut sup, Duration::from_secs(20), &env).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs the real cloudflared: only inside a loopback-only netns, via tests/real-cloudflared.sh"]
async fn a_new_connector_whose_metrics_port_was_taken_is_started_again_and_the_replacement_completes()
 {
    let env = Env::new(4, &["-quiet"]).await;
    let cfg = config_with_port_taker(&env, 2);
    let mut sup = env.start(&cfg);
    env.wait_state("connected 4/4", Duration::from_secs(30))
        .await;
    let old = env.cloudflared_pid(&sup).unwrap();
    rotate_token(&env, "11111111-2222-4333-8444-555555555555");
    wait_replaced(&env, 1.0, Duration::from_secs(40)).await;
    let log = assert_one_port_relaunch(&env);
    assert_eq!(
        count(&log, "starting a new cloudflared beside the running one"),
        1
    );
    assert!(
        !log.contains("cloudflared replacement failed"),
        "{}",
        env.logs()
    );
    let (_, m) = http(env.admin(), "GET", "/metrics", "").await;
    assert_eq!(
        metric(
            &m,
            "mcp_tunnel_cloudflared_replacements_total{result=\"failed\"}"
        ),
        0.0
    );
    assert_ne!(env.cloudflared_pid(&sup), Some(old));
    assert_eq!(
        std::fs::read_to_string(env.path("runs")).unwrap().trim(),
        "3"
    );
    env.wait_state("connected 4/4", Duration::from_secs(10))
        .await;
    signal(sup.id().unwrap() as i32, nix::sys::signal::Signal::SIGTERM);
    assert_eq!(exit_code(&mut sup, Duration::from_secs(20), &env).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs the real cloudflared: only inside a loopback-only netns, via tests/real-cloudflared.sh"]
async fn a_replacement_that_cannot_register_keeps_the_old_connector_and_is_not_retried_in_a_loop() {
    let env = Env::new(4, &["-quiet"]).await;
    let cfg = env.config("grace_period = \"2s\"\nreplace_timeout = \"3s\"");
    let mut sup = env.start(&cfg);
    env.wait_state("connected 4/4", Duration::from_secs(30))
        .await;
    let old = env.cloudflared_pid(&sup).unwrap();
    // The edge refuses new registrations: the new connector never registers.
    env.edge
        .post("/refuse", "Unauthorized: Failed to get tunnel")
        .await;
    rotate_token(&env, "11111111-2222-4333-8444-555555555555");
    wait_until(
        "the replacement to fail",
        Duration::from_secs(20),
        || async {
            let (_, m) = http(env.admin(), "GET", "/metrics", "").await;
            metric(
                &m,
                "mcp_tunnel_cloudflared_replacements_total{result=\"failed\"}",
            ) >= 1.0
        },
    )
    .await;
    // Reading the token (ours and cloudflared's) is not a change: no retry loop.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let log = env.log();
    assert_eq!(
        count(&log, "starting a new cloudflared beside the running one"),
        1,
        "{}",
        env.logs()
    );
    assert!(log.contains("did not register 4 edge connection(s) within replace_timeout"));
    assert_eq!(
        env.cloudflared_pid(&sup),
        Some(old),
        "the old connector stays"
    );
    env.wait_state("connected 4/4", Duration::from_secs(5))
        .await;
    signal(sup.id().unwrap() as i32, nix::sys::signal::Signal::SIGTERM);
    assert_eq!(exit_code(&mut sup, Duration::from_secs(20), &env).await, 0);
}

/// `setup rotate --now` (issue 26) against the running service with `[provision]` (the local
/// Tunnels API), under load through fake-edge and the real cloudflared: the certificate and
/// token (the connector replaced on the new token), then the CA. Not one request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs the real cloudflared: only inside a loopback-only netns, via tests/real-cloudflared.sh"]
async fn rotate_now_under_load_through_the_real_connector_fails_nothing() {
    let env = Arc::new(Env::new(4, &["-quiet"]).await);
    let fake = Arc::new(fake_tunnels_api::Fake::start().await);
    let assertion = fake.with(|s| s.accept_assertion("vm-1"));
    std::fs::write(env.path("token.jwt"), &assertion).unwrap();
    // The state directory is the test's directory: the tunnel, its token, its CA registered.
    let tunnel = fake.with(|s| {
        let mut t = s.create_tunnel();
        t.domain = DOMAIN.into();
        s.tunnels.last_mut().unwrap().domain = DOMAIN.into();
        t
    });
    let first_ca = std::fs::read_to_string(env.path("ca.crt")).unwrap();
    fake.with(|s| s.register(&tunnel.id, &first_ca)).unwrap();
    std::fs::write(env.path("tunnel-id"), &tunnel.id).unwrap();
    std::fs::write(env.path("tunnel-domain"), DOMAIN).unwrap();
    write_secret(&env.path("tunnel-token"), &tunnel.token);
    let _ = env.api_roots.set((fake.clone(), tunnel.id.clone()));
    let (rule, org) = fake.with(|s| (s.federation_rule_id.clone(), s.organization_id.clone()));
    let cfg = env.config("grace_period = \"3s\"");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(&format!(
        "[provision]\napi_url = \"{}\"\nstate_dir = \"{}\"\nfederation_rule_id = \"{rule}\"\norganization_id = \"{org}\"\nidentity_token_file = \"{}\"\nca_rotation_settle = \"1s\"\n",
        fake.url,
        env.dir.path().display(),
        env.path("token.jwt").display()
    ));
    std::fs::write(&cfg, text).unwrap();
    let mut sup = env.start(&cfg);
    env.wait_state("connected 4/4", Duration::from_secs(30))
        .await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = start_load(env.clone(), 16, 0, stop.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;

    let rotate = |flags: &'static [&'static str]| {
        let (cfg, admin) = (cfg.clone(), env.admin());
        async move {
            let o = Command::new(BIN)
                .args(["setup", "rotate", "--now"])
                .args(flags)
                .arg("--admin")
                .arg(admin.to_string())
                .arg("--config")
                .arg(&cfg)
                .output()
                .await
                .unwrap();
            (
                o.status.success(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ),
            )
        }
    };
    let first_connector = env.cloudflared_pid(&sup).unwrap();
    let (ok, said) = rotate(&[]).await;
    assert!(ok, "{said}\n{}", env.logs());
    assert!(said.contains("done: cloudflared replaced"), "{said}");
    let token = fake.with(|s| {
        assert_eq!(s.rotations, 1);
        s.tunnels.last().unwrap().token.clone()
    });
    // The command names the connector that serves now; the old one may still be draining
    // (grace_period) as a second child, so the children list alone does not say which is new.
    let connector: i32 = said
        .split("serves (PID ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no PID in {said}"));
    assert_ne!(connector, first_connector);
    let retired = tokio::time::Instant::now() + Duration::from_secs(20);
    while env.cloudflared_pid(&sup) != Some(connector) {
        assert!(
            tokio::time::Instant::now() < retired,
            "the old connector {first_connector} was not retired\n{}",
            env.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let environ = std::fs::read(format!("/proc/{connector}/environ")).unwrap();
    assert!(
        String::from_utf8_lossy(&environ).contains(&format!("TUNNEL_TOKEN={token}")),
        "the connector runs on the new token"
    );
    env.wait_state("connected 4/4", Duration::from_secs(20))
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let (ok, said) = rotate(&["--ca"]).await;
    assert!(ok, "{said}\n{}", env.logs());
    assert!(said.contains("done: old CA archived"), "{said}");
    let new_ca = std::fs::read_to_string(env.path("ca.crt")).unwrap();
    assert_ne!(new_ca, first_ca);
    assert_eq!(fake.trusted_pems(&tunnel.id), vec![new_ca]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let samples = load.await.unwrap();
    let (sent, failed) = (samples.len(), failures(&samples));
    println!(
        "setup rotate --now (certificate + token, then CA) under 16 sessions through the real connector: {sent} requests, {} failed {:?}",
        failed.len(),
        failed.iter().take(3).collect::<Vec<_>>()
    );
    assert_eq!(failed, Vec::<String>::new(), "{sent} sent\n{}", env.logs());
    assert!(sent > 100, "load ran throughout: {sent}");
    signal(sup.id().unwrap() as i32, nix::sys::signal::Signal::SIGTERM);
    assert_eq!(exit_code(&mut sup, Duration::from_secs(30), &env).await, 0);
}
