//! `[provision]` in `mcp-tunnel run` (the binary), against the local Tunnels API and the
//! cloudflared stand-in: provisioning an empty state directory at start, a CA rotation near
//! expiry with continuous handshakes, and a scheduled token rotation restarting cloudflared.

mod common;
mod fake_tunnels_api;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use fake_tunnels_api::Fake;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mcp_tunnel::certs::issue;
use mcp_tunnel::provision::{self, StateDir};
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream, UnixDatagram};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_mcp-tunnel");
#[path = "common/standin.rs"]
mod standin_bin;

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

struct Env {
    dir: tempfile::TempDir,
    fake: Arc<Fake>,
    proxy: SocketAddr,
    forward: SocketAddr,
    upstream: SocketAddr,
    notify: Arc<Mutex<Vec<String>>>,
}

impl Env {
    async fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let fake = Fake::start().await;
        let assertion = fake.with(|s| s.accept_assertion("vm-1"));
        std::fs::write(dir.path().join("token.jwt"), &assertion).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = l.local_addr().unwrap();
        tokio::spawn(serve_upstream(l));
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
        Env {
            dir,
            fake: Arc::new(fake),
            proxy: free_port(),
            forward: free_port(),
            upstream,
            notify,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn state(&self, name: &str) -> PathBuf {
        self.path("state").join(name)
    }

    /// A config with `[provision]` and no [tls], tunnel_domain or token_file: they default to
    /// the state directory. `provision_extra` goes into [provision]; `cloudflared` selects the
    /// stand-in or disables supervision.
    fn config(&self, provision_extra: &str, cloudflared: bool) -> PathBuf {
        let d = self.dir.path().display();
        let (rule, org) = self
            .fake
            .with(|s| (s.federation_rule_id.clone(), s.organization_id.clone()));
        let cloudflared = if cloudflared {
            let standin = standin_bin::path();
            // The stand-in's forward port is fixed, so two stand-ins cannot overlap: these
            // tests replace cloudflared by stop-then-start (overlap is tested on the real
            // cloudflared in tests/real_cloudflared.rs).
            format!(
                "binary = \"{standin}\"\nhealth_interval = \"100ms\"\nrestart_backoff_min = \"100ms\"\ngrace_period = \"2s\"\nreplacement = \"restart\"\n[cloudflared.env]\nSTANDIN_EVENTS = \"{d}/events.jsonl\"\nSTANDIN_FORWARD = \"{}\"\n",
                self.forward
            )
        } else {
            "enabled = false\n".into()
        };
        let text = format!(
            r#"listen_addr = "{proxy}"
shutdown_timeout = "5s"
[routes]
up = "http://{up}"
[upstream]
allowed_ips = ["127.0.0.0/8"]
[admin]
enabled = false
[certs]
check_interval = "200ms"
[provision]
api_url = "{url}"
state_dir = "state"
federation_rule_id = "{rule}"
organization_id = "{org}"
identity_token_file = "token.jwt"
{provision_extra}
[cloudflared]
{cloudflared}"#,
            proxy = self.proxy,
            up = self.upstream,
            url = self.fake.url,
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
            .env_clear()
            .env("NOTIFY_SOCKET", self.path("notify.sock"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("supervisor.log")).unwrap_or_default()
    }

    fn events(&self, name: &str) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.path("events.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["event"] == name)
            .collect()
    }

    async fn wait(&self, what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
        let end = Instant::now() + within;
        while !cond() {
            assert!(
                Instant::now() < end,
                "waited {within:?} for {what}\nlog:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn tunnel_id(&self) -> String {
        std::fs::read_to_string(self.state("tunnel-id")).unwrap()
    }

    fn domain(&self) -> String {
        std::fs::read_to_string(self.state("tunnel-domain")).unwrap()
    }

    /// Client TLS trusting exactly the tunnel's active CAs, as Anthropic's backend does now.
    fn backend_tls(&self) -> Arc<rustls::ClientConfig> {
        mcp_tunnel::proxy::tls::client_config(
            roots(&self.fake.trusted_pems(&self.tunnel_id())),
            vec![b"http/1.1".to_vec()],
        )
    }

    /// A state directory as an earlier `setup init` left it, with a CA valid for `ca_days`.
    fn seed(&self, ca_days: u32) -> String {
        let day = Duration::from_secs(86400);
        let t = self.fake.with(|s| s.create_tunnel());
        let ca = issue::generate_ca(day * ca_days).unwrap();
        self.fake.with(|s| s.register(&t.id, &ca.cert_pem)).unwrap();
        let server = issue::issue_server(&ca, &t.domain, day * (ca_days - 1).min(90)).unwrap();
        let dir = StateDir::create(&self.path("state")).unwrap();
        for (name, value) in [
            ("tunnel-id", t.id.as_str()),
            ("tunnel-domain", t.domain.as_str()),
            ("tunnel-token", t.token.as_str()),
            ("ca.crt", ca.cert_pem.as_str()),
            ("ca.key", ca.key_pem.as_str()),
            ("tls.crt", server.cert_pem.as_str()),
            ("tls.key", server.key_pem.as_str()),
        ] {
            dir.write(name, value).unwrap();
        }
        ca.cert_pem
    }

    fn assert_no_secret_logged(&self) {
        let log = self.log();
        for secret in self.fake.with(|s| s.secrets()) {
            assert!(!log.contains(&secret), "a secret appears in the log");
        }
        let key = std::fs::read_to_string(self.state("ca.key")).unwrap();
        assert!(!log.contains(key.lines().nth(1).unwrap()));
    }
}

fn roots(pems: &[String]) -> rustls::RootCertStore {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut r = rustls::RootCertStore::empty();
    for p in pems {
        r.add(CertificateDer::from_pem_slice(p.as_bytes()).unwrap())
            .unwrap();
    }
    r
}

async fn serve_upstream(l: TcpListener) {
    loop {
        let (s, _) = l.accept().await.unwrap();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                    Bytes::from_static(b"hello"),
                )))
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(s), svc)
                .await;
        });
    }
}

/// Inner-TLS handshakes to the proxy in a loop until stopped, each trusting the tunnel's
/// active CAs at that moment (as Anthropic's backend does); records the order of the
/// presented certificates' serials.
struct Hammer {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    serials: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Hammer {
    fn start(env: &Env, tunnel_id: &str, domain: &str) -> Hammer {
        let stop = Arc::new(AtomicBool::new(false));
        let serials: Arc<Mutex<Vec<String>>> = Arc::default();
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let (fake, stop2, ok2, failed2, serials2) = (
            env.fake.clone(),
            stop.clone(),
            ok.clone(),
            failed.clone(),
            serials.clone(),
        );
        let target =
            mcp_tunnel::proxy::edge::WsTarget::parse(&format!("ws://{}", env.proxy)).unwrap();
        let (tunnel_id, name, proxy) = (tunnel_id.to_string(), format!("up.{domain}"), env.proxy);
        let task = tokio::spawn(async move {
            // Wait for the listener; connection refusals before it are not handshakes.
            while TcpStream::connect(proxy).await.is_err() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            while !stop2.load(Ordering::Relaxed) {
                let client = mcp_tunnel::proxy::tls::client_config(
                    roots(&fake.trusted_pems(&tunnel_id)),
                    vec![b"http/1.1".to_vec()],
                );
                match target.connect_tls(client, &name).await {
                    Ok(tls) => {
                        let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
                        let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
                        let serial = cert.raw_serial_as_string();
                        let mut seen = serials2.lock().unwrap();
                        if seen.last() != Some(&serial) {
                            seen.push(serial);
                        }
                        ok2.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(e) => {
                        eprintln!("handshake failed: {e}");
                        failed2.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        });
        Hammer {
            stop,
            ok,
            failed,
            serials,
            task,
        }
    }

    fn ok(&self) -> usize {
        self.ok.load(Ordering::Relaxed)
    }

    fn serials(&self) -> Vec<String> {
        self.serials.lock().unwrap().clone()
    }

    /// Stops it; (succeeded, failed).
    async fn finish(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

fn sigterm(child: &Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
}

async fn exit_code(child: &mut Child) -> Option<i32> {
    tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("supervisor exits")
        .unwrap()
        .code()
}

fn environ(pid: u64) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/environ")).unwrap()).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_provisions_an_empty_state_dir_and_serves_with_the_provisioned_cert() {
    let env = Env::new().await;
    // Two 503s first: provisioning at start waits them out instead of exiting.
    env.fake.with(|s| s.fail_next = 2);
    let cfg = env.config("token_version = \"1\"", true);
    let mut sup = env.start(&cfg);
    env.wait(
        "the stand-in's forward port",
        Duration::from_secs(20),
        || !env.events("forward_listening").is_empty() && !env.events("ready").is_empty(),
    )
    .await;

    // Every state file, owner-only where secret; one tunnel, one CA.
    for (name, mode) in [
        ("tunnel-id", 0o644),
        ("tunnel-domain", 0o644),
        ("tunnel-token", 0o600),
        ("tls.crt", 0o644),
        ("tls.key", 0o600),
        ("ca.crt", 0o644),
        ("ca.key", 0o600),
    ] {
        let m = std::fs::metadata(env.state(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .permissions()
            .mode();
        assert_eq!(m & 0o777, mode, "{name}");
    }
    env.fake.with(|s| {
        assert_eq!(s.tunnels_created, 1);
        assert_eq!(s.certs_registered, 1);
    });

    // cloudflared got the provisioned token from the state directory.
    let pid = env.events("started")[0]["pid"].as_u64().unwrap();
    let token = std::fs::read_to_string(env.state("tunnel-token")).unwrap();
    assert!(environ(pid).contains(&format!("TUNNEL_TOKEN={token}")));

    // A request through cloudflared and the proxy, verified against the registered CA.
    let host = format!("up.{}", env.domain());
    let tcp = TcpStream::connect(env.forward).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(env.backend_tls())
        .connect(ServerName::try_from(host.clone()).unwrap(), tcp)
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = send
        .send_request(
            http::Request::get("/")
                .header("host", &host)
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"hello");
    drop(send);

    let log = env.log();
    assert!(
        log.contains("provisioning at start failed; retrying"),
        "{log}"
    );
    assert!(log.contains("provisioned at start"), "{log}");
    assert!(
        env.notify
            .lock()
            .unwrap()
            .iter()
            .any(|m| m.contains("waiting for the Tunnels API")),
        "STATUS during the retries"
    );
    sigterm(&sup);
    assert_eq!(exit_code(&mut sup).await, Some(0));
    env.assert_no_secret_logged();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_rotates_a_ca_near_expiry_with_zero_failed_handshakes() {
    let env = Env::new().await;
    let old_ca = env.seed(10);
    let tunnel_id = env.tunnel_id();
    let domain = env.domain();
    // The first check fails on 503s (retried by the task, not fatal).
    env.fake.with(|s| s.fail_next = 3);
    let cfg = env.config(
        "ca_renew_before = \"30d\"\nca_rotation_settle = \"700ms\"",
        false,
    );
    let mut sup = env.start(&cfg);

    let hammer = Hammer::start(&env, &tunnel_id, &domain);
    let old_fp = provision::fingerprint(&old_ca).unwrap();
    env.wait("the old CA archived", Duration::from_secs(20), || {
        env.fake.with(|s| {
            s.certs
                .iter()
                .any(|c| c.fingerprint == old_fp && c.archived_at.is_some())
        })
    })
    .await;
    let at_archive = hammer.ok();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let serials = hammer.serials();
    let (ok, failed) = hammer.finish().await;
    eprintln!("handshakes: {ok} ok ({at_archive} by the archive), {failed} failed");
    assert_eq!(failed, 0, "{}", env.log());
    assert!(
        at_archive > 10 && ok > at_archive,
        "handshakes ran throughout"
    );
    assert_eq!(
        serials.len(),
        2,
        "the presented certificate switched exactly once, from the old CA's to the new CA's"
    );

    let new_ca = std::fs::read_to_string(env.state("ca.crt")).unwrap();
    assert_ne!(new_ca, old_ca);
    env.fake.with(|s| {
        assert_eq!(s.max_active, 2, "the new CA went into the second slot");
        let active = s.active_certs(&tunnel_id);
        assert_eq!(active.len(), 1);
        assert_eq!(
            Some(active[0].fingerprint.clone()),
            provision::fingerprint(&new_ca)
        );
    });
    for leftover in ["ca-next.crt", "ca-next.key", "ca-previous.crt"] {
        assert!(!env.state(leftover).exists(), "{leftover}");
    }
    let log = env.log();
    assert!(log.contains("provisioning step failed; retrying"), "{log}");
    assert!(log.contains("CA rotation complete"), "{log}");
    // Not due again: one rotation only.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(env.fake.with(|s| s.certs_registered), 2);
    sigterm(&sup);
    assert_eq!(exit_code(&mut sup).await, Some(0));
    env.assert_no_secret_logged();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_token_rotation_restarts_cloudflared_with_the_new_token() {
    let env = Env::new().await;
    env.seed(5 * 365);
    let old_token = std::fs::read_to_string(env.state("tunnel-token")).unwrap();
    // The token last changed two hours ago; the schedule is hourly.
    std::fs::File::options()
        .write(true)
        .open(env.state("tunnel-token"))
        .unwrap()
        .set_modified(SystemTime::now() - Duration::from_secs(7200))
        .unwrap();
    let cfg = env.config("rotate_token_every = \"1h\"", true);
    let mut sup = env.start(&cfg);
    env.wait(
        "a second cloudflared start",
        Duration::from_secs(20),
        || env.events("started").len() >= 2,
    )
    .await;
    let started = env.events("started");
    let (first, second) = (
        started[0]["pid"].as_u64().unwrap(),
        started[1]["pid"].as_u64().unwrap(),
    );
    let new_token = env.fake.with(|s| {
        assert_eq!(s.rotations, 1);
        s.tunnels[0].token.clone()
    });
    assert_ne!(new_token, old_token);
    assert_eq!(
        std::fs::read_to_string(env.state("tunnel-token")).unwrap(),
        new_token
    );
    // The new connector starts beside the old one, which is stopped (SIGTERM) once the new
    // one is ready: an overlap, not a gap.
    env.wait(
        "the old cloudflared stopped gracefully",
        Duration::from_secs(20),
        || {
            env.events("sigterm")
                .iter()
                .any(|e| e["pid"].as_u64() == Some(first))
        },
    )
    .await;
    assert!(environ(second).contains(&format!("TUNNEL_TOKEN={new_token}")));
    // Not due again (the file's mtime moved): one rotation only.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(env.fake.with(|s| s.rotations), 1);
    assert!(env.log().contains("tunnel token rotated on schedule"));
    sigterm(&sup);
    assert_eq!(exit_code(&mut sup).await, Some(0));
    env.assert_no_secret_logged();
}

async fn rotate_now(config: &Path, admin: SocketAddr, flags: &[&str]) -> (bool, String) {
    let o = Command::new(BIN)
        .args(["setup", "rotate", "--now"])
        .args(flags)
        .arg("--admin")
        .arg(admin.to_string())
        .arg("--config")
        .arg(config)
        .env_clear()
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

/// `setup rotate --now` (issue 26) with the service running and handshakes throughout: the
/// default (certificate and token), then `--ca`, then `--token` again. The service carries
/// each out; not one handshake fails, cloudflared ends up on the newest token, and the
/// presented certificate changes once per certificate rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_now_with_the_service_running_fails_no_handshake() {
    let env = Env::new().await;
    let first_ca = env.seed(5 * 365);
    let (tunnel_id, domain) = (env.tunnel_id(), env.domain());
    let cfg = env.config("ca_rotation_settle = \"700ms\"", true);
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "[admin]\nenabled = false",
        "[admin]\nlisten_addr = \"127.0.0.1:0\"",
    );
    std::fs::write(&cfg, text).unwrap();
    let mut sup = env.start(&cfg);
    let admin = common::logged_addr(
        &env.path("supervisor.log"),
        "admin endpoint listening",
        "listen",
    )
    .await;
    env.wait("cloudflared ready", Duration::from_secs(20), || {
        !env.events("ready").is_empty()
    })
    .await;
    let hammer = Hammer::start(&env, &tunnel_id, &domain);
    env.wait("handshakes", Duration::from_secs(10), || hammer.ok() > 5)
        .await;
    let first_token = std::fs::read_to_string(env.state("tunnel-token")).unwrap();

    let (ok, said) = rotate_now(&cfg, admin, &[]).await;
    assert!(ok, "{said}\n{}", env.log());
    for line in [
        "rotating now: server key and certificate and tunnel token",
        "done: tunnel token rotated",
        "done: new server key and certificate",
        "done: cloudflared replaced",
        "tunnel-token (each host's cloudflared",
        "stay connected until",
    ] {
        assert!(said.contains(line), "{line:?} in:\n{said}");
    }
    let token = env.fake.with(|s| {
        assert_eq!(s.rotations, 1);
        s.tunnels[0].token.clone()
    });
    assert_ne!(token, first_token);
    assert_eq!(
        std::fs::read_to_string(env.state("tunnel-token")).unwrap(),
        token
    );
    let last_start = |env: &Env| {
        env.events("started").last().unwrap()["pid"]
            .as_u64()
            .unwrap()
    };
    assert!(environ(last_start(&env)).contains(&format!("TUNNEL_TOKEN={token}")));
    env.wait(
        "a handshake on the new certificate",
        Duration::from_secs(10),
        || hammer.serials().len() == 2,
    )
    .await;

    let (ok, said) = rotate_now(&cfg, admin, &["--ca"]).await;
    assert!(ok, "{said}\n{}", env.log());
    assert!(said.contains("done: new CA record"), "{said}");
    assert!(said.contains("done: old CA archived"), "{said}");
    assert!(said.contains("ca.crt (ca.key stays"), "{said}");
    assert!(!said.contains("tunnel-token"), "--ca alone: {said}");
    let new_ca = std::fs::read_to_string(env.state("ca.crt")).unwrap();
    assert_ne!(new_ca, first_ca);
    env.fake.with(|s| {
        let active = s.active_certs(&tunnel_id);
        assert_eq!(active.len(), 1);
        assert_eq!(
            Some(active[0].fingerprint.clone()),
            provision::fingerprint(&new_ca)
        );
        assert_eq!(s.rotations, 1, "--ca leaves the token alone");
    });
    env.wait(
        "a handshake on the certificate under the new CA",
        Duration::from_secs(10),
        || hammer.serials().len() == 3,
    )
    .await;

    // Again: a repeat is another rotation, as safe as the first.
    let (ok, said) = rotate_now(&cfg, admin, &["--token"]).await;
    assert!(ok, "{said}\n{}", env.log());
    let token = env.fake.with(|s| {
        assert_eq!(s.rotations, 2);
        s.tunnels[0].token.clone()
    });
    assert!(environ(last_start(&env)).contains(&format!("TUNNEL_TOKEN={token}")));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let serials = hammer.serials();
    let (ok, failed) = hammer.finish().await;
    eprintln!("handshakes: {ok} ok, {failed} failed, serials {serials:?}");
    assert_eq!(failed, 0, "{}", env.log());
    assert_eq!(serials.len(), 3, "--token alone keeps the certificate");

    let (_, metrics) = mcp_tunnel::telemetry::status::get(admin, "/metrics")
        .await
        .unwrap();
    assert!(
        metrics.contains("mcp_tunnel_incident_actions_total{action=\"rotate\"} 3"),
        "{metrics}"
    );
    let (_, status) = mcp_tunnel::telemetry::status::get(admin, "/status")
        .await
        .unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert!(status["rotation"]["last"]["error"].is_null(), "{status}");
    assert!(
        status["rotation"]["last"]["done"][0]
            .as_str()
            .unwrap()
            .contains("tunnel token rotated"),
        "{status}"
    );
    assert!(!env.state("rotate-now").exists());
    sigterm(&sup);
    assert_eq!(exit_code(&mut sup).await, Some(0));
    env.assert_no_secret_logged();
    for secret in env.fake.with(|s| s.secrets()) {
        assert!(!said.contains(&secret), "a secret reached the terminal");
    }
}
