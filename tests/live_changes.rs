//! What a reload does with each kind of change (issue 22): a restart-only field is named
//! and kept, a live one applied; nothing is applied when any part of the next state is bad
//! (the certificate does not cover a new route, the upstream plane cannot be built, a new
//! token file is readable by others), and cloudflared is not told about a refused reload.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::TestPki;
use mcp_tunnel::certs::issue::issue_server_at;
use mcp_tunnel::config::Config;
use mcp_tunnel::proxy::Proxy;
use mcp_tunnel::supervisor::reload::{self, ReloadError, Reloader, unix_now};
use tokio::sync::mpsc;

const BIN: &str = env!("CARGO_BIN_EXE_mcp-tunnel");

fn start(path: &Path, text: &str) -> (Arc<Reloader>, Arc<Proxy>) {
    std::fs::write(path, text).unwrap();
    let config = Config::load(path).unwrap();
    let (_, facts) = reload::load_checked(&config, unix_now()).unwrap();
    let proxy = Proxy::new(&config).unwrap();
    (Arc::new(Reloader::new(config, proxy.clone(), facts)), proxy)
}

fn text(pki: &TestPki, top: &str, routes: &str, upstream: &str) -> String {
    common::config_text(pki, top, routes, upstream)
}

#[tokio::test]
async fn a_restart_only_change_is_named_and_kept_and_a_live_one_applied() {
    let pki = TestPki::new();
    let path = pki.path("live.toml");
    let routes = "echo = \"http://10.0.0.5:9000\"";
    let (reloader, _proxy) = start(&path, &text(&pki, "", routes, ""));
    let running = reloader.config().await;
    std::fs::write(
        &path,
        text(&pki, "workers = 3", routes, "")
            .replace("127.0.0.1:0", "127.0.0.1:1")
            .replace("shutdown_timeout = \"5s\"", "shutdown_timeout = \"3s\"")
            .replace(
                "[routes]",
                "[limits]\nmax_sessions = 7\n[certs]\ncheck_interval = \"1m\"\n[routes]",
            ),
    )
    .unwrap();
    let r = reloader.reload(unix_now()).await.unwrap();
    assert_eq!(r.restart_required, ["listen_addr", "workers", "[limits]"]);
    let now = reloader.config().await;
    assert_eq!(now.listen_addr, running.listen_addr, "restart-only: kept");
    assert_eq!(now.workers, running.workers);
    assert_eq!(now.limits, running.limits);
    assert_eq!(
        now.shutdown_timeout,
        Duration::from_secs(3),
        "live: applied"
    );
    assert_eq!(now.certs.check_interval, Duration::from_secs(60));
    assert_eq!(reloader.generation(), 2);
}

#[tokio::test]
async fn a_route_the_presented_certificate_does_not_cover_is_refused_live_and_by_check() {
    let pki = TestPki::new();
    let path = pki.path("live.toml");
    let (reloader, proxy) = start(
        &path,
        &text(&pki, "", "echo = \"http://10.0.0.5:9000\"", ""),
    );
    // *.tunnel.test covers echo.tunnel.test, not deep.sub.tunnel.test.
    let wider = text(
        &pki,
        "",
        "echo = \"http://10.0.0.5:9000\"\n\"deep.sub\" = \"http://10.0.0.6:9000\"",
        "",
    );
    std::fs::write(&path, &wider).unwrap();
    let err = reloader.reload(unix_now()).await.unwrap_err();
    assert!(
        matches!(err, ReloadError::Certificate { .. })
            && err.to_string().contains("deep.sub.tunnel.test"),
        "{err}"
    );
    assert_eq!(
        proxy
            .routes()
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>(),
        ["echo"],
        "the refused route is not served"
    );
    assert_eq!(reloader.generation(), 1);
    assert_eq!(reloader.failures(), 1);
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "check accepted it: {said}");
    assert!(said.contains("deep.sub.tunnel.test"), "{said}");
}

/// `[upstream] ca_file` is read only when the upstream plane is built, after `Config::load`
/// passed: a reload that fails there must not have replaced the connector first.
#[tokio::test]
async fn a_reload_refused_while_building_the_upstream_plane_does_not_reach_cloudflared() {
    let pki = TestPki::new();
    let path = pki.path("live.toml");
    let token = pki.path("token");
    std::fs::write(&token, "eyJhIjoiYSIsInQiOiJ0IiwicyI6InMifQ==").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cf = |extra: &str| {
        text(&pki, "", "echo = \"http://10.0.0.5:9000\"", extra).replace(
            "[cloudflared]\nenabled = false",
            &format!(
                "[cloudflared]\nenabled = true\ntoken_file = \"{}\"",
                token.display()
            ),
        )
    };
    let (reloader, _proxy) = start(&path, &cf(""));
    let (tx, mut rx) = mpsc::unbounded_channel();
    reloader.supervise_cloudflared(tx);
    let missing = pki.path("no-such-ca.pem");
    std::fs::write(
        &path,
        cf(&format!(
            "[upstream.tls]\nca_file = \"{}\"",
            missing.display()
        ))
        .replace("enabled = true", "enabled = true\ngrace_period = \"3s\""),
    )
    .unwrap();
    let err = reloader.reload(unix_now()).await.unwrap_err();
    assert!(matches!(err, ReloadError::Proxy(_)), "{err}");
    assert!(
        rx.try_recv().is_err(),
        "cloudflared was told about a refused reload"
    );
    assert_ne!(
        reloader.config().await.cloudflared.grace_period,
        Duration::from_secs(3),
        "the refused section is not the running one"
    );
    // The same section change with a good upstream goes through, and cloudflared hears it.
    std::fs::write(
        &path,
        cf("").replace("enabled = true", "enabled = true\ngrace_period = \"3s\""),
    )
    .unwrap();
    reloader.reload(unix_now()).await.unwrap();
    let replace = rx
        .try_recv()
        .expect("the connector is replaced on an applied change");
    assert_eq!(replace.cfg.unwrap().grace_period, Duration::from_secs(3));
}

#[tokio::test]
async fn a_new_token_file_readable_by_others_is_refused_on_reload() {
    let pki = TestPki::new();
    let path = pki.path("live.toml");
    let good = pki.path("token");
    let open = pki.path("token-open");
    for (f, mode) in [(&good, 0o600), (&open, 0o644)] {
        std::fs::write(f, "eyJhIjoiYSIsInQiOiJ0IiwicyI6InMifQ==").unwrap();
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let cf = |token: &Path| {
        text(&pki, "", "echo = \"http://10.0.0.5:9000\"", "").replace(
            "[cloudflared]\nenabled = false",
            &format!(
                "[cloudflared]\nenabled = true\ntoken_file = \"{}\"",
                token.display()
            ),
        )
    };
    let (reloader, _proxy) = start(&path, &cf(&good));
    let (tx, mut rx) = mpsc::unbounded_channel();
    reloader.supervise_cloudflared(tx);
    std::fs::write(&path, cf(&open)).unwrap();
    let err = reloader.reload(unix_now()).await.unwrap_err();
    assert!(
        matches!(err, ReloadError::Token(_)) && err.to_string().contains("token"),
        "{err}"
    );
    assert!(rx.try_recv().is_err());
    assert_eq!(
        reloader.config().await.cloudflared.token_file.as_deref(),
        Some(good.as_path())
    );
}

/// The real binary: `log_level` changed in the file applies without a restart. Started at
/// info, changed to warn; the next reload's info line ("config reloaded") must not appear,
/// while its warning (a restart-only field changed) does.
#[test]
fn log_level_applies_live() {
    let pki = TestPki::new();
    let path = pki.path("level.toml");
    let base = text(
        &pki,
        "log_format = \"json\"\nlog_level = \"info\"",
        "echo = \"http://10.0.0.5:9000\"",
        "",
    );
    std::fs::write(&path, &base).unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&path)
        .env_remove("RUST_LOG")
        .env_remove("JOURNAL_STREAM")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<serde_json::Value>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            let _ = tx.send(v);
        }
    });
    let wait = |what: &dyn Fn(&serde_json::Value) -> bool, seen: &mut Vec<serde_json::Value>| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let v = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("the expected log line never came");
            let hit = what(&v);
            seen.push(v);
            if hit {
                return;
            }
        }
    };
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let hup = || nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    let mut seen = Vec::new();
    wait(&|v| v["MESSAGE"] == "proxy listening", &mut seen);
    std::fs::write(
        &path,
        base.replace("log_level = \"info\"", "log_level = \"warn\""),
    )
    .unwrap();
    hup();
    wait(&|v| v["MESSAGE"] == "log level changing", &mut seen);
    // A second reload, which warns (a restart-only field) and would log "config reloaded"
    // and, at the stop, "drained cleanly" at info.
    std::fs::write(
        &path,
        base.replace("log_level = \"info\"", "log_level = \"warn\"\nworkers = 5"),
    )
    .unwrap();
    hup();
    wait(
        &|v| {
            v["PRIORITY"] == "4"
                && v["MESSAGE"]
                    .as_str()
                    .is_some_and(|m| m.contains("applied only at the next start"))
        },
        &mut seen,
    );
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
    reader.join().unwrap();
    while let Ok(v) = rx.try_recv() {
        seen.push(v);
    }
    let at = seen
        .iter()
        .position(|v| {
            v["MESSAGE"]
                .as_str()
                .is_some_and(|m| m.contains("applied only at the next start"))
        })
        .unwrap();
    let info_after: Vec<&serde_json::Value> = seen[at..]
        .iter()
        .filter(|v| v["PRIORITY"] == "5" && v["TARGET"] != "mcp_audit")
        .collect();
    assert!(
        info_after.is_empty(),
        "info lines after log_level = \"warn\" was applied: {info_after:?}"
    );
    assert!(
        seen.iter()
            .any(|v| v["MESSAGE"] == "log level changing" && v["F_TO"] == "warn"),
        "the change is logged at the level it leaves"
    );
}

/// The serial of a certificate in PEM.
fn serial_of(pem: &str) -> String {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    mcp_tunnel::certs::preflight::facts(&der).unwrap().serial
}

fn serial_presented(proxy: &Proxy) -> String {
    mcp_tunnel::certs::preflight::facts(&proxy.generation().cert.cert[0])
        .unwrap()
        .serial
}

/// One reload swaps the routes, the upstream plane and the certificate as one generation
/// (issue 22 item 3): a request and a handshake each load one value, so neither can see the
/// routes of one reload beside the upstream plane or certificate of another. A certificate
/// that provisioning installs is a generation of its own, and a later reload that brings no
/// certificate keeps it rather than putting back the one it loaded before.
#[tokio::test]
async fn routes_upstream_plane_and_certificate_land_as_one_generation() {
    let pki = TestPki::new();
    let path = pki.path("live.toml");
    let (reloader, proxy) = start(
        &path,
        &text(&pki, "", "echo = \"http://10.0.0.5:9000\"", ""),
    );
    let first = proxy.generation();
    assert_eq!(first.number, 1);
    let first_serial = serial_presented(&proxy);

    let issue = || {
        issue_server_at(
            &pki.ca(),
            common::DOMAIN,
            Duration::from_secs(86400 * 30),
            Default::default(),
            unix_now(),
        )
        .unwrap()
    };
    let next = issue();
    std::fs::write(pki.path("tls.crt"), &next.cert_pem).unwrap();
    std::fs::write(pki.path("tls.key"), &next.key_pem).unwrap();
    std::fs::write(
        &path,
        text(
            &pki,
            "",
            "echo = \"http://10.0.0.5:9000\"\nother = \"http://10.0.0.6:9000\"",
            "connect_timeout = \"2s\"",
        ),
    )
    .unwrap();
    let r = reloader.reload(unix_now()).await.unwrap();
    assert_eq!(r.routes.added, ["other"]);
    assert!(r.routes.upstream_policy_changed, "{r:?}");
    let second = proxy.generation();
    assert_eq!(second.number, 2);
    assert_eq!(reloader.generation(), 2);
    assert_eq!(second.snapshot.routes.iter().count(), 2);
    assert!(!Arc::ptr_eq(&second.plane, &first.plane), "a new plane");
    assert_eq!(serial_presented(&proxy), serial_of(&next.cert_pem));
    // What a request that started before the reload holds is the first generation, whole.
    assert_eq!(first.snapshot.routes.iter().count(), 1);
    assert_eq!(
        mcp_tunnel::certs::preflight::facts(&first.cert.cert[0])
            .unwrap()
            .serial,
        first_serial
    );

    // Provisioning installs a certificate: a generation of its own, same routes and plane.
    let installed = issue();
    let key = mcp_tunnel::certs::issue::certified_key(&installed).unwrap();
    assert_eq!(proxy.install_cert(key), 3);
    let third = proxy.generation();
    assert!(Arc::ptr_eq(&third.snapshot, &second.snapshot));
    assert!(Arc::ptr_eq(&third.plane, &second.plane));
    // A reload that changes a route but brings no new certificate keeps the installed one.
    std::fs::write(
        &path,
        text(
            &pki,
            "",
            "echo = \"http://10.0.0.5:9000\"",
            "connect_timeout = \"2s\"",
        ),
    )
    .unwrap();
    let r = reloader.reload(unix_now()).await.unwrap();
    assert_eq!(r.routes.removed, ["other"]);
    assert_eq!(proxy.generation().number, 4);
    assert_eq!(serial_presented(&proxy), serial_of(&installed.cert_pem));
}
