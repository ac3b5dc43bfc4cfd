//! The listener's peer check (`[peer_check]`) with real processes of different users: the
//! real `mcp-tunnel run`, and `mcp-tunnel bridge` started as another user (setuid, as
//! `setpriv --reuid` does), each carrying a TLS client's bytes to the listener the way
//! cloudflared does. Needs root, to start processes as other users (CI runs as root).

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{DOMAIN, TestPki, echo_upstream, logged_addr, roots_from};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

const BIN: &str = env!("CARGO_BIN_EXE_mcp-tunnel");
const NOBODY: u32 = 65534;
/// A user with no passwd entry: the service account in the tests where root is a stranger.
const SERVICE_UID: u32 = 4242;

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "tests/peer_check.rs starts processes as other users: run it as root (CI does)"
    );
}

/// The binary, copied where every user may run it (a checkout under /root is not).
struct Bin {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Bin {
    fn new() -> Bin {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.path().join("mcp-tunnel");
        std::fs::copy(BIN, &path).unwrap();
        Bin { _dir: dir, path }
    }
}

/// Kills the process when the test ends, however it ends.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn as_user(cmd: &mut Command, uid: Option<u32>) -> &mut Command {
    if let Some(uid) = uid {
        // std drops the supplementary groups too when it changes user as root.
        cmd.uid(uid).gid(uid);
    }
    cmd
}

fn uid_of(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(2).unwrap().parse().unwrap()
}

struct Service {
    _proc: Proc,
    listen: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
}

impl Drop for Service {
    /// The log stays for a failed test (its path is in the failure message).
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// `mcp-tunnel run` with the peer check on (no cloudflared: the bridges play its part),
/// as `uid` (None: this test's own user, root). Ready when /readyz answers 200; nothing
/// connects to the listener before the test does, so every count below is exact.
async fn start_service(
    bin: &Bin,
    pki: &TestPki,
    name: &str,
    uid: Option<u32>,
    peer_check: &str,
) -> Service {
    let upstream = echo_upstream().await;
    // Port 0 for both: the bound addresses come from the service's log.
    let config = pki.path(&format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "listen_addr = \"127.0.0.1:0\"\ntunnel_domain = \"{DOMAIN}\"\nshutdown_timeout = \"1s\"\n\
             [tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n[routes]\necho = \"http://{upstream}\"\n\
             [upstream]\nallowed_ips = [\"127.0.0.0/8\"]\n[cloudflared]\nenabled = false\n\
             [admin]\nlisten_addr = \"127.0.0.1:0\"\n[peer_check]\n{peer_check}\n",
            pki.path("tls.crt").display(),
            pki.path("tls.key").display(),
        ),
    )
    .unwrap();
    let log = std::env::temp_dir().join(format!(
        "mcp-tunnel-peer-check-{}-{name}.log",
        std::process::id()
    ));
    let child = as_user(
        Command::new(&bin.path)
            .args(["run", "--config"])
            .arg(&config)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap()),
        uid,
    )
    .spawn()
    .unwrap();
    let pid = child.id();
    let proc = Proc(child);
    let listen = logged_addr(&log, "proxy listening", "listen").await;
    let admin = logged_addr(&log, "admin endpoint listening", "listen").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok((200, _)) = http_get(admin, "/readyz").await {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "`run` not ready within 20 s; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        uid_of(pid),
        uid.unwrap_or(0),
        "service runs as the intended user"
    );
    Service {
        _proc: proc,
        listen,
        admin,
        log,
    }
}

/// `mcp-tunnel bridge` to the service's listener, as `uid`; returns once it listens (read
/// from its log: a probe connection would already reach the listener through it).
fn start_bridge(bin: &Bin, service: &Service, uid: Option<u32>) -> (Proc, SocketAddr) {
    let mut child = as_user(
        Command::new(&bin.path)
            .args(["bridge", "--listen", "127.0.0.1:0", "--to"])
            .arg(format!("ws://{}", service.listen))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
        uid,
    )
    .spawn()
    .unwrap();
    assert_eq!(
        uid_of(child.id()),
        uid.unwrap_or(0),
        "bridge runs as the intended user"
    );
    let stderr = child.stderr.take().unwrap();
    let proc = Proc(child);
    let mut lines = BufReader::new(stderr).lines();
    let addr: SocketAddr = loop {
        let line = lines
            .next()
            .expect("bridge exited before listening")
            .unwrap();
        // `bridge listening listen=127.0.0.1:PORT`: it bound port 0 and says which port.
        if line.contains("bridge listening") {
            let at = line.find("listen=").expect("listen= in the line") + "listen=".len();
            break line[at..].split(' ').next().unwrap().parse().unwrap();
        }
    };
    // Keep draining its log so that it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (proc, addr)
}

/// A TLS client through a bridge, as the edge's callers are: GET /who on the echo route.
async fn call_through(bridge: SocketAddr, pki: &TestPki) -> Result<u16, String> {
    let work = async {
        let tls = mcp_tunnel::proxy::tls::client_config(
            roots_from(&pki.path("ca.crt")),
            vec![b"http/1.1".to_vec()],
        );
        let tcp = tokio::net::TcpStream::connect(bridge)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let name = format!("echo.{DOMAIN}");
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(
                rustls::pki_types::ServerName::try_from(name.clone()).unwrap(),
                tcp,
            )
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = http::Request::get("/who")
            .header("host", name)
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        let body = String::from_utf8_lossy(&body.to_bytes()).into_owned();
        if status == 200 && !body.contains("\"uri\":\"/who\"") {
            return Err(format!("200 without the upstream's echo: {body}"));
        }
        Ok(status)
    };
    tokio::time::timeout(Duration::from_secs(15), work)
        .await
        .unwrap_or_else(|_| Err("no answer within 15 s".into()))
}

async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", "admin")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok((
        status,
        String::from_utf8_lossy(&body.to_bytes()).into_owned(),
    ))
}

/// The value of one sample of `/metrics`, e.g. `mcp_tunnel_peer_refusals_total{reason="other_user"}`.
async fn metric(service: &Service, sample: &str) -> u64 {
    let (_, text) = http_get(service.admin, "/metrics").await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {sample} in:\n{text}"))
}

fn log_lines(service: &Service, needle: &str) -> Vec<String> {
    std::fs::read_to_string(&service.log)
        .unwrap()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
}

/// Waits until the service's log has a line with every one of `needles` (the refusal is
/// logged by the connection's task, maybe just after the client saw the close).
async fn wait_log_line(service: &Service, needles: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = log_lines(service, needles[0])
            .into_iter()
            .find(|l| needles.iter().all(|n| l.contains(n)));
        if let Some(line) = found {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "no log line with {needles:?} in {}:\n{}",
            service.log.display(),
            std::fs::read_to_string(&service.log).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const REFUSED: &str = "refused listener connection: its socket belongs to another user";
const OTHER_USER: &str = "mcp_tunnel_peer_refusals_total{reason=\"other_user\"}";
const UNKNOWN_OWNER: &str = "mcp_tunnel_peer_refusals_total{reason=\"unknown_owner\"}";
const SERVED: &str = "mcp_tunnel_requests_total{route=\"echo\",status=\"200\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_user_is_refused_before_the_upgrade_and_the_own_user_is_served() {
    require_root();
    let (bin, pki) = (Bin::new(), TestPki::new());
    let service = start_service(&bin, &pki, "root-service", None, "enabled = true").await;
    let (_readyz_code, readyz) = http_get(service.admin, "/readyz").await.unwrap();
    assert!(
        readyz.contains(r#"{"name":"peer_check","ready":true,"state":"on: uid 0 (root) only"}"#),
        "{readyz}"
    );
    assert_eq!(metric(&service, "mcp_tunnel_peer_check_enabled").await, 1);

    // nobody: closed before the upgrade, so its TLS client never gets a handshake.
    let (_nobody_bridge, via_nobody) = start_bridge(&bin, &service, Some(NOBODY));
    let refused = call_through(via_nobody, &pki).await;
    assert!(
        matches!(&refused, Err(e) if e.starts_with("TLS handshake")),
        "a client of nobody's bridge got {refused:?}"
    );
    let line = wait_log_line(&service, &[REFUSED, "peer_uid=65534"]).await;
    assert!(line.contains("allowed=uid 0 (root) only"), "{line}");
    assert!(line.contains("peer_inode="), "{line}");
    assert_eq!(metric(&service, OTHER_USER).await, 1);
    assert_eq!(metric(&service, UNKNOWN_OWNER).await, 0);
    assert_eq!(metric(&service, "mcp_tunnel_sessions_total").await, 0);

    // The service's own user (root here) is served, before and after the refusals.
    let (_own_bridge, via_own) = start_bridge(&bin, &service, None);
    assert_eq!(call_through(via_own, &pki).await, Ok(200));

    // A burst of refusals: every one counted, the log rate limited.
    for _ in 0..12 {
        assert!(call_through(via_nobody, &pki).await.is_err());
    }
    assert_eq!(call_through(via_own, &pki).await, Ok(200));
    assert_eq!(metric(&service, OTHER_USER).await, 13);
    assert_eq!(metric(&service, SERVED).await, 2);
    assert_eq!(metric(&service, "mcp_tunnel_sessions_total").await, 2);
    let lines = log_lines(&service, REFUSED).len();
    assert!(
        (5..13).contains(&lines),
        "13 refusals within a second should log 5 lines (the burst), logged {lines}"
    );

    // `status` says who may connect and how many were refused.
    let out = Command::new(BIN)
        .args(["status", "--admin", &service.admin.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("peer_check   ready     on: uid 0 (root) only"),
        "{text}"
    );
    assert!(
        text.contains("refused by the peer check: 13 from other users, 0 of unknown owner"),
        "{text}"
    );
}

/// Gives the test PKI and its directory to `uid`, so that a service of that user reads it.
fn give_to(dir: &Path, uid: u32) {
    std::os::unix::fs::chown(dir, Some(uid), Some(uid)).unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        std::os::unix::fs::chown(entry.unwrap().path(), Some(uid), Some(uid)).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_user_other_than_root_refuses_root_unless_allowed() {
    require_root();
    let (bin, pki) = (Bin::new(), TestPki::new());
    give_to(pki.dir.path(), SERVICE_UID);
    let strict = start_service(&bin, &pki, "strict", Some(SERVICE_UID), "enabled = true").await;
    let lenient = start_service(
        &bin,
        &pki,
        "lenient",
        Some(SERVICE_UID),
        "enabled = true\nallow_root = true",
    )
    .await;
    let (_readyz_code, readyz) = http_get(lenient.admin, "/readyz").await.unwrap();
    assert!(
        readyz.contains(r#""state":"on: uid 4242 and root""#),
        "{readyz}"
    );

    // Root is a stranger to the strict service...
    let (_root_bridge, via_root) = start_bridge(&bin, &strict, None);
    assert!(call_through(via_root, &pki).await.is_err());
    wait_log_line(&strict, &[REFUSED, "peer_uid=0 "]).await;
    assert_eq!(metric(&strict, OTHER_USER).await, 1);
    // ...its own user is served...
    let (_own_bridge, via_own) = start_bridge(&bin, &strict, Some(SERVICE_UID));
    assert_eq!(call_through(via_own, &pki).await, Ok(200));
    // ...and with allow_root, root is served while nobody is still refused.
    let (_root_bridge2, via_root2) = start_bridge(&bin, &lenient, None);
    assert_eq!(call_through(via_root2, &pki).await, Ok(200));
    let (_nobody_bridge, via_nobody) = start_bridge(&bin, &lenient, Some(NOBODY));
    assert!(call_through(via_nobody, &pki).await.is_err());
    wait_log_line(&lenient, &[REFUSED, "peer_uid=65534"]).await;
    assert_eq!(metric(&lenient, OTHER_USER).await, 1);
    assert_eq!(metric(&lenient, SERVED).await, 1);
    assert_eq!(metric(&strict, SERVED).await, 1);
}
