//! The data path through the real listener: WebSocket + inner TLS + HTTP, as the edge sends it.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use mcp_tunnel::proxy::upstream::{BoxFuture, Resolve};
use tokio::sync::{Mutex, mpsc};

fn route_line(name: &str, addr: SocketAddr) -> String {
    format!("{name} = \"http://{addr}\"\n")
}

const LOOPBACK: &str = "allowed_ips = [\"127.0.0.0/8\"]";

#[tokio::test]
async fn routes_by_host_with_documented_matching_rules() {
    let pki = TestPki::new();
    let up = echo_upstream().await;
    let routes = format!(
        "{}\"full.example.org\" = \"http://{up}\"\n\"a.b\" = \"http://{up}\"\n",
        route_line("echo", up)
    );
    let proxy = TestProxy::start(&pki, &config_text(&pki, "", &routes, LOOPBACK)).await;

    let cases: &[(&str, &str, u16)] = &[
        ("echo.tunnel.test", "echo.tunnel.test", 200),
        ("echo.tunnel.test", "ECHO.Tunnel.TEST", 200),
        ("echo.tunnel.test", "echo.tunnel.test:443", 200),
        ("echo.tunnel.test", "echo.tunnel.test.", 200),
        ("tunnel.test", "full.example.org", 200),
        ("tunnel.test", "echo.tunnel.test", 200),
        ("tunnel.test", "a.b.tunnel.test", 200),
        ("nope.tunnel.test", "nope.tunnel.test", 502),
        ("tunnel.test", "tunnel.test", 502),
        ("tunnel.test", "echo.tunnel.test.evil.org", 502),
    ];
    for &(sni, host, want) in cases {
        let mut edge = Edge::connect(&proxy, &pki, sni, false).await;
        let (status, body) = edge.get(host, "/mcp?x=1").await;
        assert_eq!(status, want, "sni {sni} host {host}: {body}");
        if want == 502 {
            assert_eq!(body, "No route configured for host\n");
        } else {
            let json: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(
                json["uri"], "/mcp?x=1",
                "path and query forwarded untouched"
            );
        }
    }
}

#[tokio::test]
async fn sni_naming_another_route_gets_421() {
    let pki = TestPki::new();
    let up = echo_upstream().await;
    let routes = format!("{}{}", route_line("echo", up), route_line("other", up));
    let proxy = TestProxy::start(&pki, &config_text(&pki, "", &routes, LOOPBACK)).await;
    let mut edge = Edge::connect(&proxy, &pki, "echo.tunnel.test", false).await;
    let (status, body) = edge.get("other.tunnel.test", "/").await;
    assert_eq!(status, 421, "{body}");
    // Same session, its own route: still fine.
    assert_eq!(edge.get("echo.tunnel.test", "/").await.0, 200);
}

#[tokio::test]
async fn plain_http_to_listener_gets_426_with_explanation() {
    let pki = TestPki::new();
    let proxy = TestProxy::start(
        &pki,
        &config_text(&pki, "", "x = \"http://10.0.0.1:80\"", ""),
    )
    .await;
    let out = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(proxy.addr).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
    .await
    .unwrap();
    assert!(out.starts_with("HTTP/1.1 426"), "{out}");
    assert!(
        out.contains("expects a WebSocket connection from cloudflared"),
        "{out}"
    );
}

#[tokio::test]
async fn h2_routes_on_authority_and_keeps_session_alive() {
    let pki = TestPki::new();
    let up = echo_upstream().await;
    let proxy = TestProxy::start(
        &pki,
        &config_text(&pki, "", &route_line("echo", up), LOOPBACK),
    )
    .await;
    let mut edge = Edge::connect(&proxy, &pki, "echo.tunnel.test", true).await;
    for i in 0..5 {
        let (status, body) = edge.get("echo.tunnel.test", &format!("/mcp/{i}")).await;
        assert_eq!(status, 200, "{body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["uri"], format!("/mcp/{i}"));
    }
    // HTTP/1.1 keep-alive: several requests over one session too.
    let mut edge = Edge::connect(&proxy, &pki, "echo.tunnel.test", false).await;
    for _ in 0..5 {
        assert_eq!(edge.get("echo.tunnel.test", "/").await.0, 200);
    }
}

#[tokio::test]
async fn forwards_headers_rewrites_host_and_strips_hop_by_hop() {
    let pki = TestPki::new();
    let up = echo_upstream().await;
    let routes = format!(
        "{}kept = {{ upstream = \"http://{up}\", preserve_host = true }}\n",
        route_line("echo", up)
    );
    let proxy = TestProxy::start(&pki, &config_text(&pki, "", &routes, LOOPBACK)).await;
    let mut edge = Edge::connect(&proxy, &pki, "echo.tunnel.test", false).await;
    let req = Request::builder()
        .method("POST")
        .uri("/mcp")
        .header("host", "echo.tunnel.test")
        .header("connection", "x-hop")
        .header("x-hop", "secret")
        .header("authorization", "Bearer abc")
        .header("mcp-session-id", "s1")
        .body(full("{\"jsonrpc\":\"2.0\"}"))
        .unwrap();
    let resp = edge.send(req).await;
    let json: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    let h = &json["headers"];
    assert_eq!(json["method"], "POST");
    assert_eq!(json["body"], "{\"jsonrpc\":\"2.0\"}");
    assert_eq!(h["host"], up.to_string());
    assert_eq!(h["x-forwarded-host"], "echo.tunnel.test");
    assert_eq!(h["x-forwarded-proto"], "https");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["authorization"], "Bearer abc");
    assert_eq!(h["mcp-session-id"], "s1");
    assert!(
        h.get("x-hop").is_none(),
        "connection-listed header forwarded: {h}"
    );

    let mut edge = Edge::connect(&proxy, &pki, "kept.tunnel.test", false).await;
    let (_, body) = edge.get("kept.tunnel.test", "/").await;
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["headers"]["host"], "kept.tunnel.test");
}

/// A resolver that plays DNS: fixed answers per name, counting lookups.
struct FakeDns {
    answers: Vec<(&'static str, Vec<IpAddr>)>,
    lookups: AtomicUsize,
}

impl Resolve for FakeDns {
    fn resolve(&self, host: &str, port: u16) -> BoxFuture<std::io::Result<Vec<SocketAddr>>> {
        let n = self.lookups.fetch_add(1, Ordering::SeqCst);
        let answer = self
            .answers
            .iter()
            .filter(|(h, _)| *h == host)
            .nth(
                n % self
                    .answers
                    .iter()
                    .filter(|(h, _)| *h == host)
                    .count()
                    .max(1),
            )
            .map(|(_, ips)| ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect());
        Box::pin(async move {
            answer.ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no such host"))
        })
    }
}

#[tokio::test]
async fn ip_validation_allows_denies_and_fails_closed() {
    let pki = TestPki::new();
    let up = echo_upstream().await;
    let port = up.port();
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let dns = Arc::new(FakeDns {
        answers: vec![
            ("good.internal", vec![ip("127.0.0.1")]),
            ("public.internal", vec![ip("8.8.8.8")]),
            ("mixed.internal", vec![ip("127.0.0.1"), ip("93.184.216.34")]),
        ],
        lookups: AtomicUsize::new(0),
    });
    let routes = format!(
        "literal = \"http://127.0.0.1:{port}\"\n\
         good = \"http://good.internal:{port}\"\n\
         public = \"http://public.internal:{port}\"\n\
         mixed = \"http://mixed.internal:{port}\"\n\
         mapped = \"http://[::ffff:127.0.0.1]:{port}\"\n\
         v6 = \"http://[::1]:{port}\"\n"
    );
    let allowed = TestProxy::start_with(
        &pki,
        &config_text(&pki, "", &routes, LOOPBACK),
        Some(dns.clone()),
    )
    .await;
    let cases = [
        ("literal", 200),
        ("good", 200),
        ("public", 502),
        ("mixed", 502),
        ("mapped", 200),
        ("v6", 502),
    ];
    for (route, want) in cases {
        let host = format!("{route}.tunnel.test");
        let mut edge = Edge::connect(&allowed, &pki, &host, false).await;
        let (status, body) = edge.get(&host, "/").await;
        assert_eq!(status, want, "{route}: {body}");
        if want == 502 {
            assert!(body.contains("not allowed"), "{route}: {body}");
        }
    }

    // Default policy (RFC 1918 only): loopback upstreams are refused, mapped ones too.
    let default = TestProxy::start_with(&pki, &config_text(&pki, "", &routes, ""), Some(dns)).await;
    for route in ["literal", "good", "mapped"] {
        let host = format!("{route}.tunnel.test");
        let mut edge = Edge::connect(&default, &pki, &host, false).await;
        let (status, body) = edge.get(&host, "/").await;
        assert_eq!(
            (status, body.contains("not allowed")),
            (502, true),
            "{route}: {body}"
        );
    }
}

#[tokio::test]
async fn dials_the_checked_address_without_resolving_again() {
    // A rebinding resolver: the first answer is allowed, every later one is not. One
    // connection must cost exactly one lookup, and dial what that lookup returned.
    struct Rebinding(AtomicUsize, u16);
    impl Resolve for Rebinding {
        fn resolve(&self, _host: &str, port: u16) -> BoxFuture<std::io::Result<Vec<SocketAddr>>> {
            let n = self.0.fetch_add(1, Ordering::SeqCst);
            let ip: IpAddr = if n == 0 {
                "127.0.0.1".parse().unwrap()
            } else {
                "8.8.8.8".parse().unwrap()
            };
            assert_eq!(port, self.1);
            Box::pin(async move { Ok(vec![SocketAddr::new(ip, port)]) })
        }
    }
    let pki = TestPki::new();
    let up = echo_upstream().await;
    let dns = Arc::new(Rebinding(AtomicUsize::new(0), up.port()));
    let routes = format!("r = \"http://rebind.internal:{}\"\n", up.port());
    let proxy = TestProxy::start_with(
        &pki,
        &config_text(&pki, "", &routes, LOOPBACK),
        Some(dns.clone()),
    )
    .await;
    let mut edge = Edge::connect(&proxy, &pki, "r.tunnel.test", false).await;
    assert_eq!(edge.get("r.tunnel.test", "/").await.0, 200);
    assert_eq!(
        dns.0.load(Ordering::SeqCst),
        1,
        "exactly one lookup per new connection"
    );
    // The pooled connection is reused: no new lookup while it lives.
    assert_eq!(edge.get("r.tunnel.test", "/").await.0, 200);
    assert_eq!(dns.0.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn upstream_failures_map_to_502_and_504() {
    let pki = TestPki::new();
    // A port with nothing listening.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let silent = upstream(|_req: Request<Incoming>| async move {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Response::new(full(""))
    })
    .await;
    let routes = format!(
        "{}{}",
        route_line("closed", closed),
        route_line("silent", silent)
    );
    let upstream_cfg = format!("{LOOPBACK}\nresponse_header_timeout = \"1s\"");
    let proxy = TestProxy::start(&pki, &config_text(&pki, "", &routes, &upstream_cfg)).await;
    let mut edge = Edge::connect(&proxy, &pki, "closed.tunnel.test", false).await;
    let (status, body) = edge.get("closed.tunnel.test", "/").await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("connection failed"), "{body}");
    let mut edge = Edge::connect(&proxy, &pki, "silent.tunnel.test", false).await;
    assert_eq!(edge.get("silent.tunnel.test", "/").await.0, 504);
}

#[tokio::test]
async fn https_upstream_is_verified_against_ca_file() {
    use hyper_util::rt::TokioIo;
    let pki = TestPki::new();
    // An upstream TLS server for "localhost" issued by its own CA.
    let up_dir = tempfile::tempdir().unwrap();
    mcp_tunnel::certs::issue::generate(
        "localhost",
        Duration::from_secs(86400),
        Duration::from_secs(86400),
    )
    .unwrap()
    .write_to(up_dir.path())
    .unwrap();
    let pair = mcp_tunnel::certs::load_server_pair(&mcp_tunnel::config::TlsFiles {
        cert_file: up_dir.path().join("tls.crt"),
        key_file: up_dir.path().join("tls.key"),
    })
    .unwrap();
    let store = Arc::new(mcp_tunnel::proxy::tls::CertStore::new(pair));
    let acceptor = tokio_rustls::TlsAcceptor::from(mcp_tunnel::proxy::tls::server_config(store));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else {
                    return;
                };
                let svc = hyper::service::service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, std::convert::Infallible>(Response::new(full("secure hello")))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    let routes = format!("sec = \"https://localhost:{port}\"\n");
    // Trusting the upstream's CA: works. ("localhost" resolves to loopback only, v4 and v6.)
    let good = format!(
        "allowed_ips = [\"127.0.0.0/8\", \"::1\"]\n[upstream.tls]\nca_file = \"{}\"",
        up_dir.path().join("ca.crt").display()
    );
    let proxy = TestProxy::start(&pki, &config_text(&pki, "", &routes, &good)).await;
    let mut edge = Edge::connect(&proxy, &pki, "sec.tunnel.test", false).await;
    assert_eq!(
        edge.get("sec.tunnel.test", "/").await,
        (200, "secure hello".to_string())
    );
    // Trusting another CA (the tunnel's): verification fails, 502.
    let bad = format!(
        "allowed_ips = [\"127.0.0.0/8\", \"::1\"]\n[upstream.tls]\nca_file = \"{}\"",
        pki.path("ca.crt").display()
    );
    let proxy = TestProxy::start(&pki, &config_text(&pki, "", &routes, &bad)).await;
    let mut edge = Edge::connect(&proxy, &pki, "sec.tunnel.test", false).await;
    assert_eq!(edge.get("sec.tunnel.test", "/").await.0, 502);
}

#[tokio::test]
async fn wrong_ca_fails_the_inner_handshake() {
    let pki = TestPki::new();
    let other = TestPki::new();
    let proxy = TestProxy::start(
        &pki,
        &config_text(&pki, "", "x = \"http://10.0.0.1:80\"", ""),
    )
    .await;
    let err = Edge::try_connect(&proxy, other.roots(), "x.tunnel.test", false)
        .await
        .err();
    assert!(err.is_some(), "handshake must fail against an unknown CA");
}

#[tokio::test]
async fn sse_events_arrive_one_by_one_before_the_upstream_finishes() {
    // The upstream writes event k only after the test has received event k-1 through the
    // proxy. Any buffering in the proxy would deadlock this exchange (caught by the timeout).
    let pki = TestPki::new();
    let (release_tx, release_rx) = mpsc::unbounded_channel::<()>();
    let release_rx = Arc::new(Mutex::new(Some(release_rx)));
    let produced = Arc::new(AtomicUsize::new(0));
    const EVENTS: usize = 5;
    let up = {
        let produced = produced.clone();
        upstream(move |_req: Request<Incoming>| {
            let release_rx = release_rx.clone();
            let produced = produced.clone();
            async move {
                let mut rx = release_rx.lock().await.take().expect("one SSE request");
                let (tx, body_rx) = mpsc::channel::<Result<Frame<Bytes>, hyper::Error>>(1);
                tokio::spawn(async move {
                    for k in 0..EVENTS {
                        if k > 0 && rx.recv().await.is_none() {
                            return;
                        }
                        produced.store(k + 1, Ordering::SeqCst);
                        let ev = format!("event: message\ndata: {{\"progress\":{k}}}\n\n");
                        if tx.send(Ok(Frame::data(Bytes::from(ev)))).await.is_err() {
                            return;
                        }
                    }
                });
                let stream = tokio_stream_from(body_rx);
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(BodyExt::boxed(StreamBody::new(stream)))
                    .unwrap()
            }
        })
        .await
    };
    let proxy = TestProxy::start(
        &pki,
        &config_text(&pki, "", &route_line("sse", up), LOOPBACK),
    )
    .await;
    let mut edge = Edge::connect(&proxy, &pki, "sse.tunnel.test", false).await;
    let resp = edge
        .send(request("GET", "sse.tunnel.test", "/mcp", full(""), false))
        .await;
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let mut seen = Vec::new();
    let mut buf = String::new();
    tokio::time::timeout(Duration::from_secs(20), async {
        while seen.len() < EVENTS {
            let frame = body.frame().await.expect("stream ended early").unwrap();
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.push_str(std::str::from_utf8(&data).unwrap());
            while let Some(end) = buf.find("\n\n") {
                let event: String = buf.drain(..end + 2).collect();
                let k: usize = event
                    .split("\"progress\":")
                    .nth(1)
                    .and_then(|s| s.trim_end_matches(['}', '\n']).parse().ok())
                    .unwrap();
                // The upstream has produced exactly this event and no later one.
                assert_eq!(
                    produced.load(Ordering::SeqCst),
                    k + 1,
                    "event {k} arrived after upstream moved on"
                );
                seen.push(k);
                let _ = release_tx.send(());
            }
        }
    })
    .await
    .expect("SSE events were held back by the proxy");
    assert_eq!(seen, (0..EVENTS).collect::<Vec<_>>());
    assert!(
        body.frame().await.is_none(),
        "stream ends after the last event"
    );
}

/// Adapts an mpsc receiver into a `Stream` without pulling in tokio-stream.
fn tokio_stream_from<T: Send + 'static>(
    mut rx: mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test]
async fn graceful_shutdown_lets_in_flight_request_finish() {
    let pki = TestPki::new();
    let (go_tx, go_rx) = mpsc::channel::<()>(1);
    let go_rx = Arc::new(Mutex::new(go_rx));
    let started = Arc::new(tokio::sync::Notify::new());
    let up = {
        let started = started.clone();
        upstream(move |_req: Request<Incoming>| {
            let go_rx = go_rx.clone();
            let started = started.clone();
            async move {
                started.notify_one();
                go_rx.lock().await.recv().await;
                Response::new(full("finished"))
            }
        })
        .await
    };
    let proxy = TestProxy::start(
        &pki,
        &config_text(&pki, "", &route_line("slow", up), LOOPBACK),
    )
    .await;
    let mut edge = Edge::connect(&proxy, &pki, "slow.tunnel.test", false).await;
    let in_flight = tokio::spawn(async move { edge.get("slow.tunnel.test", "/").await });
    started.notified().await;

    let sd = proxy.shutdown.clone();
    let drain = tokio::spawn(async move { sd.drain(Duration::from_secs(10)).await });
    // New sessions are refused once shutdown has begun.
    let target = proxy.target();
    let mut refused = false;
    for _ in 0..100 {
        if target.connect().await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "listener still accepting after shutdown started");
    assert!(
        !drain.is_finished(),
        "drain must wait for the in-flight request"
    );
    go_tx.send(()).await.unwrap();
    assert_eq!(in_flight.await.unwrap(), (200, "finished".to_string()));
    assert_eq!(
        drain.await.unwrap(),
        0,
        "every session drained before the deadline"
    );
}

/// An upstream that counts the connections it accepts and drops each one `lifetime` after
/// accepting it (an upstream's keep-alive timeout); answers with the connection's number.
async fn counting_upstream(lifetime: Duration) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let accepted = count.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let n = accepted.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| async move {
                    Ok::<_, std::convert::Infallible>(Response::new(full(format!("conn {n}"))))
                });
                let serve = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
                let _ = tokio::time::timeout(lifetime, serve).await;
            });
        }
    });
    (addr, count)
}

#[tokio::test]
async fn sessions_reuse_upstream_connections_and_replace_ones_the_upstream_closed() {
    let pki = TestPki::new();
    let (long, long_count) = counting_upstream(Duration::from_secs(60)).await;
    let (short, short_count) = counting_upstream(Duration::from_millis(1600)).await;
    let routes = format!("{}{}", route_line("long", long), route_line("short", short));
    // One data-plane worker: idle connections are kept per worker, and a second session
    // opened while the first is still open goes to the other worker when there are two.
    let text = config_text(&pki, "workers = 1", &routes, LOOPBACK);
    let proxy = TestProxy::start(&pki, &text).await;
    let (l, s) = ("long.tunnel.test", "short.tunnel.test");

    // One HTTP/1.1 session, requests one after another: one upstream connection.
    let mut a = Edge::connect(&proxy, &pki, l, false).await;
    for _ in 0..5 {
        assert_eq!(a.get(l, "/").await, (200, "conn 1".into()));
    }
    // Between requests the connection waits in the idle list, and another session takes
    // it instead of dialling.
    let mut b = Edge::connect(&proxy, &pki, l, false).await;
    assert_eq!(b.get(l, "/").await, (200, "conn 1".into()));
    assert_eq!(long_count.load(Ordering::SeqCst), 1);

    // The upstream closes a connection while it sits in the idle list, where nothing polls
    // it: the next session's request still succeeds, on a new connection.
    let mut c = Edge::connect(&proxy, &pki, s, false).await;
    assert_eq!(c.get(s, "/").await, (200, "conn 1".into()));
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let mut d = Edge::connect(&proxy, &pki, s, false).await;
    assert_eq!(d.get(s, "/").await, (200, "conn 2".into()));
    assert_eq!(short_count.load(Ordering::SeqCst), 2);

    // Concurrent sessions each get a connection of their own (none waits for another's).
    let mut sessions = Vec::new();
    for _ in 0..4 {
        sessions.push(Edge::connect(&proxy, &pki, l, false).await);
    }
    let answers = futures_util::future::join_all(sessions.iter_mut().map(|e| e.get(l, "/"))).await;
    assert!(
        answers.iter().all(|(status, _)| *status == 200),
        "{answers:?}"
    );
    assert!(long_count.load(Ordering::SeqCst) >= 4);
}

#[tokio::test]
async fn a_new_upstream_policy_never_reuses_a_connection_checked_under_the_old_one() {
    let pki = TestPki::new();
    let (up, accepted) = counting_upstream(Duration::from_secs(60)).await;
    let routes = route_line("echo", up);
    let proxy = TestProxy::start(&pki, &config_text(&pki, "", &routes, LOOPBACK)).await;
    let host = "echo.tunnel.test";
    let mut a = Edge::connect(&proxy, &pki, host, false).await;
    assert_eq!(a.get(host, "/").await, (200, "conn 1".into()));

    // Same routes, another [upstream] policy (still allowing the upstream): the session's
    // next request is made on a connection resolved and checked under the new policy.
    let text = config_text(
        &pki,
        "",
        &routes,
        &format!("{LOOPBACK}\nconnect_timeout = \"3s\""),
    );
    let next = mcp_tunnel::config::Config::parse(&pki.path("mcp-tunnel.toml"), &text).unwrap();
    proxy.proxy.apply(&next, None, true).await.unwrap();
    assert_eq!(a.get(host, "/").await, (200, "conn 2".into()));
    assert_eq!(a.get(host, "/").await, (200, "conn 2".into()));
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_http1_session_serves_requests_after_a_quiet_spell_and_slow_streams_are_never_cut() {
    // Past proxy::H1_QUIET without a request, the session drops hyper's connection state;
    // the next request on the same session starts a new one. A response that streams with
    // gaps longer than H1_QUIET keeps the session busy, so it is never cut.
    let pki = TestPki::new();
    let quiet = mcp_tunnel::proxy::session::H1_QUIET;
    let gap = quiet + Duration::from_millis(300);
    let up = upstream(move |req: Request<Incoming>| async move {
        if req.uri().path() != "/slow" {
            return Response::new(full(format!("hello {}", req.uri().path())));
        }
        let (tx, body_rx) = mpsc::channel::<Result<Frame<Bytes>, hyper::Error>>(1);
        tokio::spawn(async move {
            for k in 0..3 {
                let _ = tx
                    .send(Ok(Frame::data(Bytes::from(format!("data: {k}\n\n")))))
                    .await;
                tokio::time::sleep(gap).await;
            }
        });
        Response::builder()
            .header("content-type", "text/event-stream")
            .body(BodyExt::boxed(StreamBody::new(tokio_stream_from(body_rx))))
            .unwrap()
    })
    .await;
    let proxy =
        TestProxy::start(&pki, &config_text(&pki, "", &route_line("q", up), LOOPBACK)).await;
    let host = "q.tunnel.test";
    let mut edge = Edge::connect(&proxy, &pki, host, false).await;
    assert_eq!(edge.get(host, "/one").await, (200, "hello /one".into()));
    tokio::time::sleep(quiet + Duration::from_millis(500)).await;
    assert_eq!(edge.get(host, "/two").await, (200, "hello /two".into()));
    let (status, body) = edge.get(host, "/slow").await;
    assert_eq!(status, 200);
    assert_eq!(body, "data: 0\n\ndata: 1\n\ndata: 2\n\n");
    tokio::time::sleep(quiet + Duration::from_millis(500)).await;
    // After the stream, another quiet spell, then requests again.
    assert_eq!(edge.get(host, "/three").await, (200, "hello /three".into()));
    assert_eq!(edge.get(host, "/four").await, (200, "hello /four".into()));
}
