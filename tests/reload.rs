//! Live changes: routes and config reloaded from disk under load, certificates swapped under
//! continuous handshakes, renewal with time under the test's control.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use mcp_tunnel::certs::issue::issue_server_at;
use mcp_tunnel::config::Config;
use mcp_tunnel::lifecycle::Shutdown;
use mcp_tunnel::proxy::Proxy;
use mcp_tunnel::supervisor::reload::{self, NoHooks, ReloadHooks, Reloader, unix_now};
use tokio::sync::mpsc;

const LOOPBACK: &str = "allowed_ips = [\"127.0.0.0/8\"]";

/// A proxy running from a config file, with the reload loop (watcher + SIGHUP) attached.
struct Live {
    proxy: TestProxy,
    reloader: Arc<Reloader>,
}

impl Live {
    async fn start(pki: &TestPki, path: &Path, text: &str) -> Live {
        std::fs::write(path, text).unwrap();
        Self::start_existing(pki, path).await
    }

    async fn start_existing(_pki: &TestPki, path: &Path) -> Live {
        mcp_tunnel::telemetry::init("info");
        let config = Config::load(path).unwrap();
        let (_, facts) = reload::load_checked(&config, unix_now()).unwrap();
        let proxy = Proxy::new(&config).unwrap();
        let listener = Proxy::bind(&config).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = Shutdown::new();
        tokio::spawn(proxy.clone().serve(listener, shutdown.clone()));
        let reloader = Arc::new(Reloader::new(config.clone(), proxy.clone(), facts));
        let (reloader_for_loop, shutdown_for_loop) = (reloader.clone(), shutdown.clone());
        // No SIGHUP in tests: the request channel stays open but unused.
        let (requests, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            reload::run_loop(reloader_for_loop, Arc::new(NoHooks), rx, shutdown_for_loop).await;
            drop(requests);
        });
        // Let the watcher arm before the test starts changing files.
        tokio::time::sleep(Duration::from_millis(300)).await;
        Live {
            proxy: TestProxy {
                addr,
                shutdown,
                proxy,
                config,
            },
            reloader,
        }
    }
}

/// Polls `f` until it returns true, or fails after 15 s (a deadlock guard, not a threshold).
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..300 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// Which upstream answered: the echo upstream reports the Host it received (its own address).
async fn who_answers(proxy: &TestProxy, pki: &TestPki, route: &str) -> (u16, String) {
    let host = format!("{route}.tunnel.test");
    let mut edge = Edge::connect(proxy, pki, &host, false).await;
    let (status, body) = edge.get(&host, "/").await;
    if status != 200 {
        return (status, body);
    }
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    (
        status,
        json["headers"]["host"].as_str().unwrap().to_string(),
    )
}

/// Continuous requests on one route over a few sessions; counts failures until stopped.
fn load(
    proxy: &TestProxy,
    pki: &TestPki,
    route: &'static str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(u64, u64)> {
    let target = proxy.target();
    let roots = pki.roots();
    tokio::spawn(async move {
        let (mut ok, mut failed) = (0u64, 0u64);
        let host = format!("{route}.tunnel.test");
        while !stop.load(Ordering::Relaxed) {
            let tls =
                mcp_tunnel::proxy::tls::client_config(roots.clone(), vec![b"http/1.1".to_vec()]);
            let Ok(stream) = target.connect_tls(tls, &host).await else {
                failed += 1;
                continue;
            };
            let (mut send, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            for _ in 0..20 {
                if send.ready().await.is_err() {
                    failed += 1;
                    break;
                }
                let req = Request::get("/")
                    .header("host", &host)
                    .body(full(""))
                    .unwrap();
                match send.send_request(req).await {
                    Ok(r) if r.status() == 200 => {
                        let _ = r.into_body().collect().await;
                        ok += 1;
                    }
                    _ => failed += 1,
                }
            }
        }
        (ok, failed)
    })
}

/// An SSE upstream that sends one event per `()` received on the returned channel.
async fn sse_upstream() -> (SocketAddr, mpsc::UnboundedSender<()>) {
    let (tx, rx) = mpsc::unbounded_channel::<()>();
    let rx = Arc::new(tokio::sync::Mutex::new(Some(rx)));
    let addr = upstream(move |_req: Request<Incoming>| {
        let rx = rx.clone();
        async move {
            let mut rx = rx.lock().await.take().expect("one SSE stream");
            let mut n = 0;
            let stream = futures_util::stream::poll_fn(move |cx| {
                rx.poll_recv(cx).map(|o| {
                    o.map(|()| {
                        n += 1;
                        Ok::<_, hyper::Error>(Frame::data(Bytes::from(format!("data: {n}\n\n"))))
                    })
                })
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(BodyExt::boxed(StreamBody::new(stream)))
                .unwrap()
        }
    })
    .await;
    (addr, tx)
}

async fn next_event(body: &mut Incoming) -> String {
    let frame = tokio::time::timeout(Duration::from_secs(15), body.frame())
        .await
        .expect("event in time")
        .expect("stream still open")
        .expect("no stream error");
    String::from_utf8(frame.into_data().unwrap().to_vec()).unwrap()
}

fn base(pki: &TestPki, stable: SocketAddr, sse: SocketAddr, extra_routes: &str) -> String {
    config_text(
        pki,
        "",
        &format!("stable = \"http://{stable}\"\nsse = \"http://{sse}\"\n{extra_routes}"),
        LOOPBACK,
    )
}

/// Replaces the config file in one of the ways operators and tools do.
fn replace(path: &Path, text: &str, how: &str) {
    match how {
        "in-place" => std::fs::write(path, text).unwrap(),
        "rename" => {
            let tmp = path.with_extension("toml.tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, path).unwrap();
        }
        "delete-recreate" => {
            std::fs::remove_file(path).unwrap();
            std::thread::sleep(Duration::from_millis(20));
            std::fs::write(path, text).unwrap();
        }
        "symlink-swap" => {
            // Kubernetes ConfigMap layout: file -> ..data/file, ..data -> ..<version>.
            let dir = path.parent().unwrap();
            let version = dir.join(format!(
                "..v{}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos()
            ));
            std::fs::create_dir(&version).unwrap();
            std::fs::write(version.join(path.file_name().unwrap()), text).unwrap();
            let tmp = dir.join("..data_tmp");
            std::os::unix::fs::symlink(version.file_name().unwrap(), &tmp).unwrap();
            std::fs::rename(&tmp, dir.join("..data")).unwrap();
        }
        other => panic!("unknown replacement {other}"),
    }
}

async fn routes_follow_file_changes(how: &'static str) {
    let pki = TestPki::new();
    let stable = echo_upstream().await;
    let (sse, sse_tx) = sse_upstream().await;
    let a = echo_upstream().await;
    let b = echo_upstream().await;
    let cfg_dir = tempfile::tempdir().unwrap();
    let path = cfg_dir.path().join("mcp-tunnel.toml");
    let live = if how == "symlink-swap" {
        replace(&path, &base(&pki, stable, sse, ""), how);
        std::os::unix::fs::symlink("..data/mcp-tunnel.toml", &path).unwrap();
        Live::start_existing(&pki, &path).await
    } else {
        Live::start(&pki, &path, &base(&pki, stable, sse, "")).await
    };
    let proxy = &live.proxy;

    // An SSE stream opened before any reload.
    let mut sse_edge = Edge::connect(proxy, &pki, "sse.tunnel.test", false).await;
    let mut sse_body = sse_edge
        .send(request("GET", "sse.tunnel.test", "/", full(""), false))
        .await
        .into_body();
    sse_tx.send(()).unwrap();
    assert_eq!(next_event(&mut sse_body).await, "data: 1\n\n");

    let stop = Arc::new(AtomicBool::new(false));
    let loader = load(proxy, &pki, "stable", stop.clone());

    // Added.
    replace(
        &path,
        &base(&pki, stable, sse, &format!("dyn = \"http://{a}\"\n")),
        how,
    );
    eventually("route dyn added", || async {
        who_answers(proxy, &pki, "dyn").await == (200, a.to_string())
    })
    .await;
    // Changed.
    replace(
        &path,
        &base(&pki, stable, sse, &format!("dyn = \"http://{b}\"\n")),
        how,
    );
    eventually("route dyn changed", || async {
        who_answers(proxy, &pki, "dyn").await == (200, b.to_string())
    })
    .await;
    // Removed.
    replace(&path, &base(&pki, stable, sse, ""), how);
    eventually("route dyn removed", || async {
        who_answers(proxy, &pki, "dyn").await.0 == 502
    })
    .await;

    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = loader.await.unwrap();
    println!("{how}: {ok} requests on the unaffected route during 3 reloads, {failed} failed");
    assert!(ok > 0, "the load generator made no requests");
    assert_eq!(
        failed, 0,
        "requests failed on an unaffected route during reloads ({how})"
    );
    // The SSE stream opened before the reloads still receives events.
    sse_tx.send(()).unwrap();
    assert_eq!(next_event(&mut sse_body).await, "data: 2\n\n");
    assert!(
        live.reloader.generation() >= 4,
        "generation {}",
        live.reloader.generation()
    );
    assert_eq!(live.reloader.failures(), 0);

    // Quiet now: reading the files (as every reload does) triggers no further reloads.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let settled = live.reloader.attempts();
    for _ in 0..5 {
        let _ = std::fs::read(&path).unwrap();
        let _ = std::fs::read(pki.path("tls.crt")).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        live.reloader.attempts(),
        settled,
        "reads of watched files caused reloads ({how})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_follow_in_place_writes() {
    routes_follow_file_changes("in-place").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_follow_rename_over() {
    routes_follow_file_changes("rename").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_follow_delete_and_recreate() {
    routes_follow_file_changes("delete-recreate").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_follow_symlink_swaps() {
    routes_follow_file_changes("symlink-swap").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_route_and_narrowed_allowlist_close_their_streams_only() {
    let pki = TestPki::new();
    let stable = echo_upstream().await;
    let (sse, sse_tx) = sse_upstream().await;
    let (sse2, sse2_tx) = sse_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mcp-tunnel.toml");
    let text = base(&pki, stable, sse, &format!("gone = \"http://{sse2}\"\n"));
    let live = Live::start(&pki, &path, &text).await;
    let proxy = &live.proxy;
    let open = |route: &'static str| {
        let pki = &pki;
        async move {
            let host = format!("{route}.tunnel.test");
            let mut edge = Edge::connect(proxy, pki, &host, true).await;
            let body = edge
                .send(request("GET", &host, "/", full(""), true))
                .await
                .into_body();
            (edge, body)
        }
    };
    let (_e1, mut kept) = open("sse").await;
    let (_e2, mut gone) = open("gone").await;
    sse_tx.send(()).unwrap();
    sse2_tx.send(()).unwrap();
    assert_eq!(next_event(&mut kept).await, "data: 1\n\n");
    assert_eq!(next_event(&mut gone).await, "data: 1\n\n");

    // Remove "gone": its stream ends with an error; "sse" is untouched.
    std::fs::write(&path, base(&pki, stable, sse, "")).unwrap();
    let end = tokio::time::timeout(Duration::from_secs(15), gone.frame())
        .await
        .expect("stream closed in time");
    assert!(
        !matches!(end, Some(Ok(_))),
        "removed route's stream kept streaming: {end:?}"
    );
    sse_tx.send(()).unwrap();
    assert_eq!(next_event(&mut kept).await, "data: 2\n\n");

    // Narrow allowed_ips so that loopback is no longer allowed: security wins.
    std::fs::write(
        &path,
        base(&pki, stable, sse, "").replace(LOOPBACK, "allowed_ips = [\"10.0.0.0/8\"]"),
    )
    .unwrap();
    let end = tokio::time::timeout(Duration::from_secs(15), kept.frame())
        .await
        .expect("stream closed in time");
    assert!(
        !matches!(end, Some(Ok(_))),
        "stream to a no-longer-allowed address kept streaming: {end:?}"
    );
    // New requests are refused under the new policy, with no pooled connection reused.
    assert_eq!(who_answers(proxy, &pki, "stable").await.0, 502);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_config_is_refused_and_old_routes_keep_serving() {
    let pki = TestPki::new();
    let stable = echo_upstream().await;
    let (sse, _tx) = sse_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mcp-tunnel.toml");
    let good = base(&pki, stable, sse, "");
    let live = Live::start(&pki, &path, &good).await;
    let file = path.display().to_string();
    let cases = [
        (good.replace("[routes]", "[routes"), "line "),
        (
            good.replace("[upstream]\n", "[upstream]\nallowed_ipz = []\n"),
            "unknown field `allowed_ipz`",
        ),
        (
            good.replace(
                &format!("stable = \"http://{stable}\""),
                "stable = \"http://x:1/mcp\"",
            ),
            "routes.stable: invalid upstream (must be scheme://host:port)",
        ),
        (
            good.replace("[upstream]\n", "[upstream]\ndisable_ip_validation = true\n"),
            "upstream.allowed_ips: allowed_ips and disable_ip_validation are mutually exclusive",
        ),
    ];
    for (text, want) in cases {
        std::fs::write(&path, &text).unwrap();
        let err = live
            .reloader
            .reload(unix_now())
            .await
            .expect_err("invalid config accepted")
            .to_string();
        assert!(
            err.contains(&file) && err.contains(want),
            "expected file and {want:?} in {err}"
        );
        assert_eq!(
            who_answers(&live.proxy, &pki, "stable").await,
            (200, stable.to_string()),
            "old routes must keep serving"
        );
    }
    assert!(live.reloader.failures() >= 4);
    // listen_addr cannot change live: the old value stays and the reload still applies.
    std::fs::write(&path, good.replace("127.0.0.1:0", "127.0.0.1:1")).unwrap();
    live.reloader.reload(unix_now()).await.unwrap();
    assert_eq!(
        live.reloader.config().await.listen_addr,
        live.proxy.config.listen_addr
    );
    // Nor can [peer_check]: turning it on in the file keeps the running (off) value.
    std::fs::write(&path, format!("{good}[peer_check]\nenabled = true\n")).unwrap();
    live.reloader.reload(unix_now()).await.unwrap();
    assert_eq!(
        live.reloader.config().await.peer_check,
        live.proxy.config.peer_check
    );
    assert!(live.proxy.proxy.peer_gate().is_none());
}

/// Serial of the certificate a new session is shown.
async fn presented_serial(proxy: &TestProxy, pki: &TestPki) -> Result<String, String> {
    let tls = mcp_tunnel::proxy::tls::client_config(pki.roots(), vec![b"http/1.1".to_vec()]);
    let stream = proxy
        .target()
        .connect_tls(tls, "stable.tunnel.test")
        .await
        .map_err(|e| e.to_string())?;
    let der = stream.get_ref().1.peer_certificates().unwrap()[0].clone();
    Ok(mcp_tunnel::certs::preflight::facts(&der).unwrap().serial)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_rotation_under_continuous_handshakes() {
    let pki = TestPki::new();
    let stable = echo_upstream().await;
    let (sse, _tx) = sse_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mcp-tunnel.toml");
    let text = base(&pki, stable, sse, "")
        + &format!(
            "[certs]\nca_cert_file = \"{}\"\n",
            pki.path("ca.crt").display()
        );
    let live = Live::start(&pki, &path, &text).await;
    let proxy = &live.proxy;
    let old_serial = presented_serial(proxy, &pki).await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let hammer = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let target = proxy.target();
        let roots = pki.roots();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let tls = mcp_tunnel::proxy::tls::client_config(
                    roots.clone(),
                    vec![b"http/1.1".to_vec()],
                );
                match target.connect_tls(tls, "stable.tunnel.test").await {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };

    // A new pair from the same CA, written the bad way round: certificate first, then the key.
    let next = issue_server_at(
        &pki.ca(),
        DOMAIN,
        Duration::from_secs(86400 * 90),
        Default::default(),
        unix_now(),
    )
    .unwrap();
    let next_serial = mcp_tunnel::certs::preflight::facts(
        &<rustls::pki_types::CertificateDer as rustls::pki_types::pem::PemObject>::from_pem_slice(
            next.cert_pem.as_bytes(),
        )
        .unwrap(),
    )
    .unwrap()
    .serial;
    std::fs::write(pki.path("tls.crt"), &next.cert_pem).unwrap();
    // The half-written pair is refused: the old certificate keeps being presented.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(presented_serial(proxy, &pki).await.unwrap(), old_serial);
    std::fs::write(pki.path("tls.key"), &next.key_pem).unwrap();
    eventually("new serial presented", || async {
        presented_serial(proxy, &pki).await.as_deref() == Ok(next_serial.as_str())
    })
    .await;

    // A mismatched pair (a key from elsewhere) and an expired pair are refused.
    let other = issue_server_at(
        &pki.ca(),
        DOMAIN,
        Duration::from_secs(86400),
        Default::default(),
        unix_now(),
    )
    .unwrap();
    std::fs::write(pki.path("tls.key"), &other.key_pem).unwrap();
    let r = live.reloader.reload(unix_now()).await.unwrap();
    assert!(
        r.cert_refused
            .as_deref()
            .unwrap_or("")
            .contains("does not match"),
        "{r:?}"
    );
    let expired = issue_server_at(
        &pki.ca(),
        DOMAIN,
        Duration::from_secs(3600),
        Default::default(),
        unix_now() - 7200,
    )
    .unwrap();
    std::fs::write(pki.path("tls.crt"), &expired.cert_pem).unwrap();
    std::fs::write(pki.path("tls.key"), &expired.key_pem).unwrap();
    let r = live.reloader.reload(unix_now()).await.unwrap();
    assert!(
        r.cert_refused.as_deref().unwrap_or("").contains("expired"),
        "{r:?}"
    );
    // A certificate from another CA is refused (it would fail at the edge).
    let foreign = TestPki::new();
    std::fs::copy(foreign.path("tls.crt"), pki.path("tls.crt")).unwrap();
    std::fs::copy(foreign.path("tls.key"), pki.path("tls.key")).unwrap();
    let r = live.reloader.reload(unix_now()).await.unwrap();
    assert!(
        r.cert_refused
            .as_deref()
            .unwrap_or("")
            .contains("not signed by the configured CA"),
        "{r:?}"
    );
    assert_eq!(
        presented_serial(proxy, &pki).await.unwrap(),
        next_serial,
        "last good pair keeps serving"
    );

    stop.store(true, Ordering::Relaxed);
    hammer.await.unwrap();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!("handshakes during rotation: {ok} ok, {failed} failed");
    assert!(ok > 10, "too few handshakes to mean anything: {ok}");
    assert_eq!(failed, 0);
}

#[derive(Default)]
struct Recorder(std::sync::Mutex<Vec<i64>>);
impl ReloadHooks for Recorder {
    fn cert_expiry_warning(&self, days_left: i64, _not_after: i64) {
        self.0.lock().unwrap().push(days_left);
    }
}

fn openssl(args: &[&str]) -> String {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The extensions the edge requires (spec 9.4), as openssl prints them.
fn assert_server_cert_shape(cert: &Path, ca: &Path, attime: i64) {
    let verified = openssl(&[
        "verify",
        "-attime",
        &attime.to_string(),
        "-CAfile",
        ca.to_str().unwrap(),
        cert.to_str().unwrap(),
    ]);
    assert!(verified.contains(": OK"), "{verified}");
    let text = openssl(&["x509", "-in", cert.to_str().unwrap(), "-noout", "-text"]);
    for want in [
        "DNS:tunnel.test, DNS:*.tunnel.test",
        "X509v3 Authority Key Identifier",
        "TLS Web Server Authentication",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
    let ca_text = openssl(&["x509", "-in", ca.to_str().unwrap(), "-noout", "-text"]);
    let ski = ca_text
        .split("X509v3 Subject Key Identifier:")
        .nth(1)
        .unwrap()
        .lines()
        .nth(1)
        .unwrap()
        .trim();
    let aki = text
        .split("X509v3 Authority Key Identifier:")
        .nth(1)
        .unwrap()
        .lines()
        .nth(1)
        .unwrap()
        .trim();
    assert_eq!(
        aki.trim_start_matches("keyid:"),
        ski,
        "AKI must equal the CA's SKI"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_with_injected_time() {
    let pki = TestPki::new();
    let stable = echo_upstream().await;
    let (sse, _tx) = sse_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mcp-tunnel.toml");
    let certs = format!(
        "[certs]\nca_cert_file = \"{}\"\nca_key_file = \"{}\"\nrenew_before = \"30d\"\n",
        pki.path("ca.crt").display(),
        pki.path("ca.key").display()
    );
    let live = Live::start(&pki, &path, &(base(&pki, stable, sse, "") + &certs)).await;
    let first = live.reloader.cert_facts().await;
    let now = unix_now();
    // 90-day certificate: not due today, nor after 59 days; due after 61.
    assert_eq!(live.reloader.renew_if_due(now, &NoHooks).await, None);
    assert_eq!(
        live.reloader.renew_if_due(now + 59 * 86400, &NoHooks).await,
        None
    );
    let later = now + 61 * 86400;
    let serial = live
        .reloader
        .renew_if_due(later, &NoHooks)
        .await
        .expect("renewed when due");
    assert_ne!(serial, first.serial);
    let facts = live.reloader.cert_facts().await;
    assert_eq!(facts.serial, serial);
    assert!(
        facts.not_after >= later + 89 * 86400,
        "new certificate valid from the injected time"
    );
    let key_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(pki.path("tls.key"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(key_mode & 0o777, 0o600);
    // The proxy presents the renewed certificate.
    let presented = live.proxy.proxy.generation().cert.clone();
    assert_eq!(
        mcp_tunnel::certs::preflight::facts(&presented.cert[0])
            .unwrap()
            .serial,
        serial
    );
    assert_server_cert_shape(&pki.path("tls.crt"), &pki.path("ca.crt"), later + 3600);

    // Without a CA key: warnings at 30/14/7/1 days, each once.
    std::fs::write(&path, base(&pki, stable, sse, "")).unwrap();
    live.reloader.reload(later).await.unwrap();
    let na = facts.not_after;
    let rec = Recorder::default();
    for left in [40, 29, 28, 13, 6, 5, 0] {
        live.reloader
            .renew_if_due(na - left * 86400 - 60, &rec)
            .await;
    }
    assert_eq!(*rec.0.lock().unwrap(), vec![29, 13, 6, 0]);
}

#[test]
fn certs_init_and_renew_cert_cli_output_passes_openssl() {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_mcp-tunnel");
    let out = std::process::Command::new(bin)
        .args(["certs", "init", "--tunnel-domain", DOMAIN, "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("Add certificate") && stdout.contains("ca.crt"),
        "{stdout}"
    );
    let (crt, ca) = (dir.path().join("tls.crt"), dir.path().join("ca.crt"));
    assert_server_cert_shape(&crt, &ca, unix_now());
    let ca_text = openssl(&["x509", "-in", ca.to_str().unwrap(), "-noout", "-text"]);
    for want in [
        "X509v3 Basic Constraints: critical",
        "CA:TRUE",
        "X509v3 Key Usage: critical",
        "Certificate Sign, CRL Sign",
        "X509v3 Subject Key Identifier",
    ] {
        assert!(ca_text.contains(want), "CA lacks {want:?}:\n{ca_text}");
    }
    let days = openssl(&[
        "x509",
        "-in",
        crt.to_str().unwrap(),
        "-noout",
        "-checkend",
        &(89 * 86400).to_string(),
    ]);
    assert!(days.contains("will not expire"), "{days}");

    // renew-cert: a no-op while more than --renew-before remains, then a new serial.
    let serial = |p: &Path| openssl(&["x509", "-in", p.to_str().unwrap(), "-noout", "-serial"]);
    let before = serial(&crt);
    let run = |renew_before: &str| {
        let out = std::process::Command::new(bin)
            .args(["renew-cert", "--renew-before", renew_before, "--dir"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(run("720h").contains("nothing to do"));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("tunnel-domain")).unwrap(),
        DOMAIN
    );
    assert_eq!(serial(&crt), before);
    assert!(run("0s").contains("issued a new server certificate"));
    assert_ne!(serial(&crt), before);
    assert_server_cert_shape(&crt, &ca, unix_now());
}

#[test]
fn rsa_4096_server_certificates_when_asked() {
    let pki = TestPki::new();
    let now = unix_now();
    let pair = issue_server_at(
        &pki.ca(),
        DOMAIN,
        Duration::from_secs(86400),
        mcp_tunnel::certs::issue::KeyType::Rsa4096,
        now,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    mcp_tunnel::certs::renew::write_pair(
        &pair,
        &dir.path().join("tls.crt"),
        &dir.path().join("tls.key"),
    )
    .unwrap();
    let text = openssl(&[
        "x509",
        "-in",
        dir.path().join("tls.crt").to_str().unwrap(),
        "-noout",
        "-text",
    ]);
    assert!(text.contains("Public-Key: (4096 bit)"), "{text}");
    assert!(
        text.contains("sha256WithRSAEncryption") || text.contains("ecdsa-with-SHA256"),
        "{text}"
    );
    assert_server_cert_shape(&dir.path().join("tls.crt"), &pki.path("ca.crt"), now + 60);
    // The proxy can present it: key and certificate load and match.
    mcp_tunnel::certs::load_server_pair(&mcp_tunnel::config::TlsFiles {
        cert_file: dir.path().join("tls.crt"),
        key_file: dir.path().join("tls.key"),
    })
    .unwrap();
}
