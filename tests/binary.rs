//! The `mcp-tunnel` binary as an operator runs it: `check` messages, streaming large bodies
//! in bounded memory, and SIGTERM draining.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use mcp_tunnel::proxy::edge::WsTarget;

const BIN: &str = env!("CARGO_BIN_EXE_mcp-tunnel");

fn check(pki: &TestPki, text: &str) -> (i32, String) {
    let path = pki.path("check.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let mut all = String::from_utf8_lossy(&out.stderr).into_owned();
    all.push_str(&String::from_utf8_lossy(&out.stdout));
    (out.status.code().unwrap_or(-1), all)
}

#[test]
fn check_accepts_a_good_config_and_names_each_problem() {
    let pki = TestPki::new();
    let good = config_text(&pki, "", "echo = \"http://10.0.0.5:9000\"", "");
    let (code, out) = check(&pki, &good);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok (1 route"), "{out}");
    // No cloudflared here: the peer check is off by default, and `check` says so; turned on,
    // `check` proves the kernel lookup works (the self-test `run` makes) and says who may connect.
    assert!(
        out.contains(
            "peer check: off (cloudflared is not supervised here: [cloudflared] enabled = false)"
        ),
        "{out}"
    );
    let (code, out) = check(&pki, &format!("{good}[peer_check]\nenabled = true\n"));
    assert_eq!(code, 0, "{out}");
    let uid = nix::unistd::geteuid().as_raw();
    assert!(
        out.contains(&format!("peer check: on, the listener serves uid {uid} ")),
        "{out}"
    );

    let file = pki.path("check.toml").display().to_string();
    let cases: Vec<(String, &str)> = vec![
        (
            format!(
                "routes = [\"http://10.0.0.5:9000\"]\n{}",
                good.replace("[routes]\necho = \"http://10.0.0.5:9000\"", "")
            ),
            "routes: expected a table of name = \"scheme://host:port\" entries, found an array (routes is a map, not a list)",
        ),
        (
            good.replace("http://10.0.0.5:9000", "http://10.0.0.5:9000/mcp"),
            "routes.echo: invalid upstream (must be scheme://host:port)",
        ),
        (
            good.replace("http://10.0.0.5:9000", "http://10.0.0.5"),
            "has no port",
        ),
        (
            good.replace(
                "[upstream]\n",
                "[upstream]\nallowed_ips = [\"10.0.0.0/8\"]\ndisable_ip_validation = true\n",
            ),
            "upstream.allowed_ips: allowed_ips and disable_ip_validation are mutually exclusive",
        ),
        (good.replace("tls.key", "missing.key"), "tls.key_file ("),
        (
            good.replace("tls.key", "ca.key"),
            "does not match the certificate in tls.cert_file",
        ),
        (
            good.replace("[upstream]\n", "[upstream]\nallowed_ipz = []\n"),
            "unknown field `allowed_ipz`",
        ),
        (
            good.replace("shutdown_timeout = \"5s\"", "shutdown_timeout = \"5\""),
            "expected a duration",
        ),
        (
            good.replace("http://10.0.0.5:9000", "https://10.0.0.5:9000"),
            "routes.echo: an https upstream needs a trust anchor",
        ),
    ];
    for (text, want) in cases {
        let (code, out) = check(&pki, &text);
        assert_eq!(code, 78, "expected EX_CONFIG for {want:?}: {out}");
        assert!(out.contains(want), "expected {want:?} in:\n{out}");
        assert!(out.contains(&file), "error must name the file: {out}");
    }
    // A missing key names the path and the OS reason.
    let (_, out) = check(&pki, &good.replace("tls.key", "missing.key"));
    assert!(
        out.contains("missing.key") && out.contains("No such file"),
        "{out}"
    );
}

struct Running {
    child: Child,
    addr: SocketAddr,
}

impl Running {
    async fn start(pki: &TestPki, routes: &str) -> Running {
        // Port 0: the address it bound comes from its log.
        let text = config_text(pki, "", routes, "allowed_ips = [\"127.0.0.0/8\"]");
        let path = pki.path("run.toml");
        std::fs::write(&path, text).unwrap();
        let log = pki.path("run.log");
        let child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(&path)
            .env_remove("RUST_LOG")
            .env_remove("JOURNAL_STREAM")
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        // Owned by `Running` from here on, so that its Drop reaps the child on any failure.
        let mut running = Running {
            child,
            addr: "127.0.0.1:0".parse().unwrap(),
        };
        running.addr = common::logged_addr(&log, "proxy listening", "listen").await;
        let addr = running.addr;
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return running;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("mcp-tunnel run did not start listening");
    }

    fn target(&self) -> WsTarget {
        WsTarget::parse(&format!("ws://{}", self.addr)).unwrap()
    }

    /// Peak resident set of the proxy process, in KiB.
    fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    }

    async fn edge(
        &self,
        pki: &TestPki,
        sni: &str,
    ) -> hyper::client::conn::http1::SendRequest<Body> {
        let tls = mcp_tunnel::proxy::tls::client_config(pki.roots(), vec![b"http/1.1".to_vec()]);
        let stream = self.target().connect_tls(tls, sni).await.unwrap();
        let (send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        send
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const CHUNK: usize = 64 * 1024;
const TOTAL: u64 = 100 * 1024 * 1024;

fn generated_body(total: u64) -> Body {
    let chunk = Bytes::from(vec![b'x'; CHUNK]);
    let n = total.div_ceil(CHUNK as u64);
    let stream = futures_util::stream::iter(
        (0..n).map(move |_| Ok::<_, hyper::Error>(Frame::data(chunk.clone()))),
    );
    StreamBody::new(stream).boxed()
}

async fn count_body(mut body: Incoming) -> u64 {
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            n += data.len() as u64;
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_100_mb_each_way_without_growing_memory() {
    let pki = TestPki::new();
    let received = Arc::new(AtomicU64::new(0));
    let up = {
        let received = received.clone();
        upstream(move |req: Request<Incoming>| {
            let received = received.clone();
            async move {
                if req.uri().path() == "/download" {
                    return Response::new(generated_body(TOTAL));
                }
                let n = count_body(req.into_body()).await;
                received.store(n, Ordering::SeqCst);
                Response::new(full(n.to_string()))
            }
        })
        .await
    };
    let proxy = Running::start(&pki, &format!("big = \"http://{up}\"")).await;
    let mut edge = proxy.edge(&pki, "big.tunnel.test").await;
    // Warm up: one small request, then take the baseline.
    let warm = Request::post("/upload")
        .header("host", "big.tunnel.test")
        .body(full("hi"))
        .unwrap();
    let resp = edge.send_request(warm).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
    let before = proxy.peak_rss_kib();

    edge.ready().await.unwrap();
    let up_req = Request::post("/upload")
        .header("host", "big.tunnel.test")
        .body(generated_body(TOTAL))
        .unwrap();
    let resp = edge.send_request(up_req).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(String::from_utf8_lossy(&body), TOTAL.to_string());
    assert_eq!(received.load(Ordering::SeqCst), TOTAL);

    edge.ready().await.unwrap();
    let down_req = Request::get("/download")
        .header("host", "big.tunnel.test")
        .body(full(""))
        .unwrap();
    let resp = edge.send_request(down_req).await.unwrap();
    assert_eq!(count_body(resp.into_body()).await, TOTAL);

    let after = proxy.peak_rss_kib();
    let growth_mib = after.saturating_sub(before) / 1024;
    println!(
        "proxy peak RSS: {before} KiB before, {after} KiB after 2 x 100 MiB (growth {growth_mib} MiB)"
    );
    assert!(
        growth_mib < 24,
        "peak RSS grew by {growth_mib} MiB while streaming 100 MiB each way"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_request_then_exits_zero() {
    let pki = TestPki::new();
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);
    let (started_tx, mut started_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let up = upstream(move |_req: Request<Incoming>| {
        let mut go = go_rx.clone();
        let started = started_tx.clone();
        async move {
            let _ = started.send(());
            let _ = go.wait_for(|g| *g).await;
            Response::new(full("finished after SIGTERM"))
        }
    })
    .await;
    let mut proxy = Running::start(&pki, &format!("slow = \"http://{up}\"")).await;
    let mut edge = proxy.edge(&pki, "slow.tunnel.test").await;
    let req = Request::get("/")
        .header("host", "slow.tunnel.test")
        .body(full(""))
        .unwrap();
    let in_flight = tokio::spawn(async move {
        let resp = edge.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.into_body().collect().await.unwrap().to_bytes())
    });
    started_rx.recv().await.unwrap();

    let status = Command::new("kill")
        .args(["-TERM", &proxy.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // The listener closes while the request is still in flight.
    let mut closed = false;
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(proxy.addr).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(closed, "listener still accepting after SIGTERM");
    assert!(
        proxy.child.try_wait().unwrap().is_none(),
        "exited before the in-flight request finished"
    );
    go_tx.send(true).unwrap();
    let (code, body) = in_flight.await.unwrap();
    assert_eq!((code, &body[..]), (200, &b"finished after SIGTERM"[..]));
    let exit = tokio::task::spawn_blocking(move || {
        let s = proxy.child.wait().unwrap();
        std::mem::forget(proxy);
        s
    })
    .await
    .unwrap();
    assert_eq!(exit.code(), Some(0));
}

#[test]
fn the_documented_example_config_parses() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/mcp-tunnel.toml");
    let config = mcp_tunnel::config::Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.listen_addr.to_string(), "127.0.0.1:8080");
    assert!(!config.allow_readable_secrets);
    assert_eq!(
        config.limits,
        mcp_tunnel::config::Limits::default(),
        "documented limits are the defaults"
    );
    // Every value the example sets is the default: copying it changes nothing.
    let minimal = mcp_tunnel::config::Config::parse(
        &path,
        "tunnel_domain = \"abcd1234.tunnel.anthropic.com\"\n[tls]\ncert_file = \"/var/lib/mcp-tunnel/tls.crt\"\nkey_file = \"/var/lib/mcp-tunnel/tls.key\"\n[routes]\necho = \"http://10.0.12.7:9000\"\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        config.cloudflared, minimal.cloudflared,
        "documented [cloudflared] values are the defaults"
    );
    assert_eq!(
        config.admin, minimal.admin,
        "documented [admin] values are the defaults"
    );
    assert_eq!(
        config.certs, minimal.certs,
        "documented [certs] values are the defaults"
    );
    assert_eq!(
        config.upstream, minimal.upstream,
        "documented [upstream] values are the defaults"
    );
    assert_eq!(
        config.peer_check, minimal.peer_check,
        "documented [peer_check] values are the defaults"
    );
    assert_eq!(
        config.mcp, minimal.mcp,
        "documented [mcp] values are the defaults"
    );
    assert_eq!(
        (config.shutdown_timeout, config.log_level),
        (minimal.shutdown_timeout, minimal.log_level)
    );
    assert_eq!(
        config.log_format, minimal.log_format,
        "documented log_format is the default"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_serves_hello_through_the_bridge_as_printed() {
    use std::io::BufRead;
    // Port 0: the demo prints the port it bound in the curl command.
    let mut child = Command::new(BIN)
        .args(["demo", "--port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let printed = tokio::task::spawn_blocking(move || {
        let mut lines = Vec::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.unwrap();
            let done = line.contains("Press Ctrl-C");
            lines.push(line);
            if done {
                break;
            }
        }
        lines.join("\n")
    })
    .await
    .unwrap();
    let ca = printed
        .split("--cacert ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("curl command printed");
    let port: u16 = printed
        .split("--resolve hello.demo.mcp-tunnel.test:")
        .nth(1)
        .and_then(|s| s.split(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no --resolve with the bridge's port: {printed}"));
    assert_ne!(port, 0, "{printed}");
    assert!(
        printed.contains(&format!(
            "bridge (TLS clients connect here) 127.0.0.1:{port}"
        )),
        "{printed}"
    );
    // What the printed curl does: TLS to the bridge with the demo CA, then the tools/call.
    let roots = roots_from(std::path::Path::new(ca));
    let tls = mcp_tunnel::proxy::tls::client_config(roots, vec![b"http/1.1".to_vec()]);
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("hello.demo.mcp-tunnel.test").unwrap();
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .unwrap();
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::post("/mcp")
        .header("host", format!("hello.demo.mcp-tunnel.test:{port}"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(full(mcp_tunnel::demo::HELLO_CALL))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(
        json["result"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .starts_with("Hello, tunnel!"),
        "{json}"
    );
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
}
