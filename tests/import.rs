//! `mcp-tunnel import --from DIR` on reference deployment folders written from the documented
//! examples (spec sections 3 and 6: the openssl recipe, `config/mcp-proxy.yaml`, `data/`,
//! `.env`): the result passes `check` and `run` serves a request through it (the cloudflared
//! stand-in on PATH as `cloudflared`); the documented mistakes are refused with the reference
//! proxy's messages and nothing written; nothing is overwritten without `--force`.

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::Duration;

use common::{Body, echo_upstream, full, roots_from};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use mcp_tunnel::proxy::edge::WsTarget;

const BIN: &str = env!("CARGO_BIN_EXE_mcp-tunnel");
#[path = "common/standin.rs"]
mod standin_bin;
const DOMAIN: &str = "abcd1234.tunnel.anthropic.com";
const TUNNEL: &str = "2f1e8a4c-1111-4222-8333-944455556666";

/// A cloudflared token (base64 of {"a","t","s"}), as the Console shows it (`eyJ...`).
fn token() -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!(
        "{{\"a\":\"0123456789abcdef\",\"t\":\"{TUNNEL}\",\"s\":\"c2VjcmV0c2VjcmV0\"}}"
    ))
}

fn sh(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {out:?}");
}

/// The quickstart's openssl recipe (spec section 3), verbatim but for the paths.
fn openssl_recipe(data: &Path) {
    let d = |n: &str| data.join(n);
    sh(Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout"])
        .arg(d("ca.key"))
        .arg("-out")
        .arg(d("ca.crt"))
        .args(["-days", "3650", "-subj", "/CN=mcp-tunnel-ca"])
        .args(["-addext", "basicConstraints=critical,CA:TRUE"])
        .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        .args(["-addext", "subjectKeyIdentifier=hash"]));
    std::fs::write(
        d("tls.ext"),
        format!("subjectAltName = DNS:{DOMAIN},DNS:*.{DOMAIN}\nauthorityKeyIdentifier = keyid,issuer\nextendedKeyUsage = serverAuth\n"),
    )
    .unwrap();
    sh(Command::new("openssl")
        .args(["req", "-newkey", "rsa:2048", "-nodes", "-keyout"])
        .arg(d("tls.key"))
        .arg("-out")
        .arg(d("server.csr"))
        .args(["-subj", &format!("/CN={DOMAIN}")]));
    sh(Command::new("openssl")
        .args(["x509", "-req", "-in"])
        .arg(d("server.csr"))
        .arg("-CA")
        .arg(d("ca.crt"))
        .arg("-CAkey")
        .arg(d("ca.key"))
        .arg("-CAcreateserial")
        .arg("-out")
        .arg(d("tls.crt"))
        .args(["-days", "90", "-extfile"])
        .arg(d("tls.ext")));
    // "chmod 644 data/tls.key" (so that the container's UID 65532 can read it).
    std::fs::set_permissions(d("tls.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
}

/// A reference deployment folder: `config/mcp-proxy.yaml` (the documented config, with a
/// loopback upstream as the troubleshooting page's local-testing allowlist permits), `data/`
/// from the openssl recipe, and either the manual flow's `.env` (token, domain) or the
/// programmatic flow's `data/tunnel-*` files from `setup`.
struct Reference {
    dir: tempfile::TempDir,
}

impl Reference {
    fn new(upstream: SocketAddr, programmatic: bool) -> Reference {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("config")).unwrap();
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        openssl_recipe(&dir.path().join("data"));
        let yaml = format!(
            r#"listen_addr: ":8080"
log_level: info
shutdown_timeout: 30s
tunnel_domain: ${{TUNNEL_DOMAIN}}
tls:
  cert_file: /data/tls.crt
  key_file: /data/tls.key
routes:
  echo: http://{upstream}
  hello: http://hello-mcp:9000
upstream:
  allowed_ips:
    - 10.0.0.0/8
    - 172.16.0.0/12
    - 192.168.0.0/16
    - 127.0.0.0/8       # loopback, local testing only
"#
        );
        std::fs::write(dir.path().join("config/mcp-proxy.yaml"), yaml).unwrap();
        let data = dir.path().join("data");
        if programmatic {
            std::fs::write(data.join("tunnel-token"), token() + "\n").unwrap();
            std::fs::write(data.join("tunnel-id"), "tnl_01ABCDEF\n").unwrap();
            std::fs::write(data.join("tunnel-domain"), format!("{DOMAIN}\n")).unwrap();
        } else {
            std::fs::write(
                dir.path().join(".env"),
                format!("TUNNEL_DOMAIN={DOMAIN}\nTUNNEL_TOKEN='{}'\n", token()),
            )
            .unwrap();
        }
        Reference { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn yaml(&self) -> PathBuf {
        self.path().join("config/mcp-proxy.yaml")
    }
}

/// A PATH whose `cloudflared` is the stand-in, as an operator's host has the real one.
fn path_with_cloudflared(dir: &Path) -> std::ffi::OsString {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let link = bin.join("cloudflared");
    if !link.exists() {
        std::os::unix::fs::symlink(standin_bin::path(), &link).unwrap();
    }
    let mut paths = vec![bin];
    paths.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    std::env::join_paths(paths).unwrap()
}

fn current_user() -> String {
    nix::unistd::User::from_uid(nix::unistd::Uid::effective())
        .unwrap()
        .unwrap()
        .name
}

struct Target {
    root: tempfile::TempDir,
}

impl Target {
    fn new() -> Target {
        Target {
            root: tempfile::tempdir().unwrap(),
        }
    }
    fn config(&self) -> PathBuf {
        self.root.path().join("etc/mcp-tunnel/mcp-tunnel.toml")
    }
    fn state(&self) -> PathBuf {
        self.root.path().join("var/lib/mcp-tunnel")
    }
    fn import(&self, from: &Path, extra: &[&str]) -> (i32, String, String) {
        let out: Output = Command::new(BIN)
            .arg("import")
            .arg("--from")
            .arg(from)
            .arg("--config-out")
            .arg(self.config())
            .arg("--state-dir")
            .arg(self.state())
            .args(["--owner", &current_user()])
            .args(extra)
            .env("PATH", path_with_cloudflared(self.root.path()))
            .env_remove("TUNNEL_TOKEN")
            .env_remove("TUNNEL_DOMAIN")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
    fn mode(&self, name: &str) -> u32 {
        std::fs::metadata(self.state().join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    }
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .ok()?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", addr.to_string())
        .body(full(""))
        .unwrap();
    let resp = send.send_request(req).await.ok()?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manual_flow_folder_becomes_a_config_that_check_accepts_and_run_serves() {
    let upstream = echo_upstream().await;
    let reference = Reference::new(upstream, false);
    let target = Target::new();
    let (code, out, err) = target.import(reference.path(), &[]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");

    // Every decision is printed; the token never is.
    for want in [
        "listen_addr: \":8080\" -> \"127.0.0.1:8080\"",
        &format!("tunnel_domain: ${{TUNNEL_DOMAIN}} = \"{DOMAIN}\" (from .env)"),
        "it was 0644 so that the container's UID 65532 could read it",
        &format!("tunnel token (tunnel {TUNNEL}) from .env"),
        "\"hello-mcp\" looks like a Compose service name",
        "the Host header is rewritten to each upstream's host:port",
        "the service renews the server certificate itself",
        &format!("owner: {}", current_user()),
        "ok (2 routes, listen_addr 127.0.0.1:8080)",
    ] {
        assert!(out.contains(want), "{want:?} not in:\n{out}\n{err}");
    }
    assert!(
        !out.contains(&token()) && !err.contains(&token()),
        "token printed"
    );

    // State directory: owner-only directory and secrets, owned as asked.
    assert_eq!(target.mode(""), 0o700);
    for (name, mode) in [
        ("tls.crt", 0o644),
        ("tls.key", 0o600),
        ("ca.crt", 0o644),
        ("ca.key", 0o600),
        ("tunnel-token", 0o600),
    ] {
        assert_eq!(target.mode(name), mode, "{name}");
        let uid = std::fs::metadata(target.state().join(name)).unwrap().uid();
        assert_eq!(uid, nix::unistd::Uid::effective().as_raw(), "{name}");
    }
    assert_eq!(
        std::fs::read(target.state().join("tls.key")).unwrap(),
        std::fs::read(reference.path().join("data/tls.key")).unwrap()
    );
    let config = std::fs::read_to_string(target.config()).unwrap();
    assert!(
        config.contains(&format!("tunnel_domain = \"{DOMAIN}\"")),
        "{config}"
    );
    assert!(
        config.contains(&format!("echo = \"http://{upstream}\"")),
        "{config}"
    );

    // `check` on its own agrees.
    let check = Command::new(BIN)
        .args(["check", "--config"])
        .arg(target.config())
        .env("PATH", path_with_cloudflared(target.root.path()))
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");

    // `run` serves a request through it, cloudflared (the stand-in) supervised. Only the two
    // fixed ports change, to port 0, so that parallel tests do not collide; the bound
    // addresses come from the service's log.
    let config = config.replace("127.0.0.1:8080", "127.0.0.1:0")
        + "\n[admin]\nlisten_addr = \"127.0.0.1:0\"\n";
    std::fs::write(target.config(), config).unwrap();
    let log = target.root.path().join("run.log");
    let child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(target.config())
        .env("PATH", path_with_cloudflared(target.root.path()))
        .env_remove("RUST_LOG")
        .env_remove("JOURNAL_STREAM")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _running = Running(child);
    let listen = common::logged_addr(&log, "proxy listening", "listen")
        .await
        .port();
    let admin = common::logged_addr(&log, "admin endpoint listening", "listen").await;
    let mut ready = None;
    for _ in 0..200 {
        ready = get(admin, "/readyz").await;
        if ready.as_ref().is_some_and(|(s, _)| *s == 200) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = ready.expect("admin endpoint");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("connected 4/4"), "{body}");

    let tls = mcp_tunnel::proxy::tls::client_config(
        roots_from(&reference.path().join("data/ca.crt")),
        vec![b"http/1.1".to_vec()],
    );
    let host = format!("echo.{DOMAIN}");
    let stream = WsTarget::parse(&format!("ws://127.0.0.1:{listen}"))
        .unwrap()
        .connect_tls(tls, &host)
        .await
        .expect("inner TLS with the imported certificate, signed by the reference CA");
    let (mut send, conn) = hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("/mcp")
        .header("host", &host)
        .body(full(""))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let echoed: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echoed["uri"], "/mcp");
    assert_eq!(echoed["headers"]["host"], upstream.to_string());
}

#[test]
fn the_programmatic_flow_folder_uses_the_files_setup_wrote() {
    let reference = Reference::new("10.0.0.5:9000".parse().unwrap(), true);
    let target = Target::new();
    let (code, out, err) = target.import(reference.path(), &[]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    for want in [
        &format!("tunnel_domain: ${{TUNNEL_DOMAIN}} = \"{DOMAIN}\" (from data/tunnel-domain)"),
        &format!("tunnel token (tunnel {TUNNEL}) from data/tunnel-token"),
        "data/tunnel-id ->",
    ] {
        assert!(out.contains(want), "{want:?} not in:\n{out}");
    }
    assert_eq!(
        std::fs::read_to_string(target.state().join("tunnel-id")).unwrap(),
        "tnl_01ABCDEF\n"
    );

    // Importing the same folder again changes nothing and needs no --force.
    let (code, out, err) = target.import(reference.path(), &[]);
    assert_eq!(code, 0, "{out}\n{err}");

    // A changed file is not replaced without --force; with it, the old one is kept.
    std::fs::write(target.state().join("tunnel-id"), "tnl_OTHER\n").unwrap();
    let before = std::fs::read_to_string(target.config()).unwrap();
    let (code, _, err) = target.import(reference.path(), &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("refusing to overwrite")
            && err.contains("tunnel-id")
            && err.contains("--force"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(target.state().join("tunnel-id")).unwrap(),
        "tnl_OTHER\n"
    );
    assert_eq!(std::fs::read_to_string(target.config()).unwrap(), before);
    let (code, out, err) = target.import(reference.path(), &["--force"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("--force: kept the previous"), "{out}");
    let kept: Vec<_> = std::fs::read_dir(target.state())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("tunnel-id.before-import-"))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(
        std::fs::read_to_string(target.state().join(&kept[0])).unwrap(),
        "tnl_OTHER\n"
    );
}

#[test]
fn the_documented_mistakes_are_refused_with_the_reference_messages() {
    let reference = Reference::new("10.0.0.5:9000".parse().unwrap(), false);
    let good = std::fs::read_to_string(reference.yaml()).unwrap();
    let yaml = reference.yaml().display().to_string();
    let cases = [
        (
            good.replace(
                "  echo: http://10.0.0.5:9000\n  hello:",
                "  - echo: http://10.0.0.5:9000\n  - hello:",
            ),
            "line 9: routes: cannot unmarshal !!seq into map[string]string (routes is a map, not a list",
        ),
        (
            good.replace("http://10.0.0.5:9000", "http://10.0.0.5:9000/mcp"),
            "line 9: routes.echo: invalid upstream (must be scheme://host:port) : \"http://10.0.0.5:9000/mcp\" has a path",
        ),
        (
            good.replace("http://10.0.0.5:9000", "http://10.0.0.5"),
            "line 9: routes.echo: invalid upstream (must be scheme://host:port) : \"http://10.0.0.5\" has no port",
        ),
        (
            good.replace("  key_file: /data/tls.key\n", "  keyfile: /data/tls.key\n"),
            "line 7: tls.keyfile: unknown field",
        ),
        (
            good.replace("/data/tls.crt", "/data/server.crt"),
            "tls.cert_file: /data/server.crt: not found",
        ),
        (
            good.replace("${TUNNEL_DOMAIN}", "${TUNNEL_DOMIAN}"),
            "tunnel_domain: \"${TUNNEL_DOMIAN}\" uses ${TUNNEL_DOMIAN}, which neither .env, data/ nor the environment defines",
        ),
    ];
    for (text, want) in cases {
        std::fs::write(reference.yaml(), &text).unwrap();
        let target = Target::new();
        let (code, out, err) = target.import(reference.path(), &[]);
        assert_eq!(code, 78, "{want}: {out}\n{err}");
        assert!(
            err.contains(&format!("{yaml}: {want}")),
            "expected {yaml}: {want:?} in:\n{err}"
        );
        assert!(
            !target.config().exists() && !target.state().exists(),
            "{want}: something was written"
        );
    }
    // A malformed token is refused without showing it.
    std::fs::write(reference.yaml(), &good).unwrap();
    std::fs::write(
        reference.path().join(".env"),
        format!("TUNNEL_DOMAIN={DOMAIN}\nTUNNEL_TOKEN=not-a-token-secret\n"),
    )
    .unwrap();
    let (code, _, err) = Target::new().import(reference.path(), &[]);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("tunnel token from .env: not base64"), "{err}");
    assert!(!err.contains("not-a-token-secret"), "{err}");

    // Not a reference folder at all.
    let empty = tempfile::tempdir().unwrap();
    let (code, _, err) = Target::new().import(empty.path(), &[]);
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains("config/mcp-proxy.yaml: cannot read")
            && err.contains("expected a reference deployment folder"),
        "{err}"
    );
}
