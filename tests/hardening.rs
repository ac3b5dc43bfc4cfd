//! Hostile input: every limit enforced with its documented refusal, and the proxy still
//! serving other sessions afterwards.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use mcp_tunnel::proxy::metrics::LimitHit;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const LOOPBACK: &str = "allowed_ips = [\"127.0.0.0/8\"]";

fn limit_hits(proxy: &TestProxy, which: LimitHit) -> u64 {
    proxy
        .proxy
        .metrics()
        .limits_snapshot()
        .into_iter()
        .find(|(l, _)| *l == which)
        .map_or(0, |(_, n)| n)
}

/// The count of `which` once it reaches `at_least`, or what it is after 5 s. A session
/// counts its limit when its task unwinds, which can be just after the peer has already
/// seen the answer (a close frame, a 431), so a test reads the counter only once it settles.
async fn limit_hits_reaching(proxy: &TestProxy, which: LimitHit, at_least: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let n = limit_hits(proxy, which);
        if n >= at_least || tokio::time::Instant::now() >= deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn still_serving(proxy: &TestProxy, pki: &TestPki) {
    let mut edge = Edge::connect(proxy, pki, "echo.tunnel.test", false).await;
    assert_eq!(
        edge.get("echo.tunnel.test", "/").await.0,
        200,
        "the proxy must keep serving"
    );
}

async fn start(pki: &TestPki, limits: &str, upstream: SocketAddr) -> TestProxy {
    let text = config_text(
        pki,
        &format!("[limits]\n{limits}"),
        &format!("echo = \"http://{upstream}\""),
        LOOPBACK,
    );
    TestProxy::start(pki, &text).await
}

/// Reads until the peer closes (EOF or reset); fails the test after 15 s.
async fn closed_by_peer(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(15), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("connection still open after 15 s"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_silent_connections_are_cut_and_others_served() {
    let pki = TestPki::new();
    let up = echo_upstream().await;
    let proxy = start(&pki, "upgrade_timeout = \"1s\"", up).await;
    let mut silent = Vec::new();
    for _ in 0..1000 {
        silent.push(TcpStream::connect(proxy.addr).await.unwrap());
    }
    still_serving(&proxy, &pki).await;
    let cut = futures_util::future::join_all(silent.iter_mut().map(closed_by_peer)).await;
    assert_eq!(cut.len(), 1000);
    assert!(
        cut.iter().all(|bytes| bytes.is_empty()),
        "silent connections get no answer, only a close"
    );
    assert!(limit_hits_reaching(&proxy, LimitHit::UpgradeTimeout, 1000).await >= 1000);
    still_serving(&proxy, &pki).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_trickling_request_headers_is_cut() {
    let pki = TestPki::new();
    let up = echo_upstream().await;
    let proxy = start(&pki, "request_header_timeout = \"1s\"", up).await;
    let tls = mcp_tunnel::proxy::tls::client_config(pki.roots(), vec![b"http/1.1".to_vec()]);
    let mut stream = proxy
        .target()
        .connect_tls(tls, "echo.tunnel.test")
        .await
        .unwrap();
    let request = b"GET / HTTP/1.1\r\nHost: echo.tunnel.test\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut sent = 0;
    let started = std::time::Instant::now();
    for b in request {
        if stream.write_all(&[*b]).await.is_err() || stream.flush().await.is_err() {
            break;
        }
        sent += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The session is closed long before the headers could complete (8+ s at this pace).
        let mut probe = [0u8; 512];
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(1), stream.read(&mut probe)).await
        {
            match r {
                Ok(0) | Err(_) => break,
                Ok(n) => assert!(
                    !String::from_utf8_lossy(&probe[..n]).starts_with("HTTP/1.1 200"),
                    "slow request was served"
                ),
            }
        }
    }
    assert!(
        sent < request.len(),
        "the whole slow request was accepted ({:?})",
        started.elapsed()
    );
    assert!(limit_hits_reaching(&proxy, LimitHit::HeaderTimeout, 1).await >= 1);
    still_serving(&proxy, &pki).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_header_blocks_get_431() {
    let pki = TestPki::new();
    let up = echo_upstream().await;
    let proxy = start(&pki, "max_header_bytes = 16384", up).await;
    let big = "x".repeat(40_000);
    // Inside the tunnel.
    let mut edge = Edge::connect(&proxy, &pki, "echo.tunnel.test", false).await;
    let req = Request::get("/")
        .header("host", "echo.tunnel.test")
        .header("x-big", &big)
        .body(full(""))
        .unwrap();
    let status = match &mut edge {
        Edge::H1(s) => s
            .send_request(req)
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0),
        Edge::H2(_) => unreachable!(),
    };
    assert!(
        status == 431 || status == 0,
        "inner oversized headers answered {status}"
    );
    // On the listener (the upgrade request itself).
    let mut tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n");
    let _ = tcp.write_all(head.as_bytes()).await;
    let answer = String::from_utf8_lossy(&closed_by_peer(&mut tcp).await).into_owned();
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );
    assert!(limit_hits_reaching(&proxy, LimitHit::HeaderTooLarge, 1).await >= 1);
    still_serving(&proxy, &pki).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_websocket_message_gets_close_1009() {
    let pki = TestPki::new();
    let up = echo_upstream().await;
    let proxy = start(
        &pki,
        "max_ws_message_bytes = 65536\nmax_ws_frame_bytes = 65536",
        up,
    )
    .await;
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{}/", proxy.addr), tcp)
        .await
        .unwrap();
    ws.send(Message::Binary(Bytes::from(vec![0x16; 200_000])))
        .await
        .unwrap();
    let mut close_code = None;
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(15), ws.next())
        .await
        .map(|m| m.and_then(Result::ok))
    {
        if let Message::Close(frame) = msg {
            close_code = frame.map(|f| f.code);
            break;
        }
    }
    assert_eq!(close_code, Some(CloseCode::Size));
    assert!(limit_hits_reaching(&proxy, LimitHit::WsMessageTooLarge, 1).await >= 1);
    still_serving(&proxy, &pki).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_garbage_after_the_upgrade_is_refused() {
    let pki = TestPki::new();
    let up = echo_upstream().await;
    let proxy = start(&pki, "", up).await;
    for garbage in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &[0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3][..],
        &[0u8; 3000][..],
    ] {
        let mut ws = proxy.target().connect().await.unwrap();
        ws.write_all(garbage).await.unwrap();
        ws.flush().await.unwrap();
        let mut buf = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(15), ws.read_to_end(&mut buf))
            .await
            .expect("closed in time");
        // A TLS alert at most, then the end of the session.
        assert!(r.is_err() || buf.len() < 64, "{r:?} {buf:?}");
    }
    still_serving(&proxy, &pki).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_opened_without_reading_are_bounded() {
    // An upstream that streams a lot, counting how many responses are open at once.
    let open = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let up = {
        let (open, peak) = (open.clone(), peak.clone());
        upstream(move |req: Request<Incoming>| {
            let (open, peak) = (open.clone(), peak.clone());
            async move {
                if req.uri().path() != "/flood" {
                    return Response::new(full("ok"));
                }
                let now = open.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                let chunk = Bytes::from(vec![b'z'; 16 * 1024]);
                let guard = scopeguard(open);
                let stream = futures_util::stream::iter((0..10_000).map(move |_| {
                    let _ = &guard;
                    Ok::<_, hyper::Error>(Frame::data(chunk.clone()))
                }));
                Response::new(BodyExt::boxed(StreamBody::new(stream)))
            }
        })
        .await
    };
    let pki = TestPki::new();
    let proxy = start(&pki, "max_streams_per_session = 20", up).await;
    let mut edge = Edge::connect(&proxy, &pki, "echo.tunnel.test", true).await;
    let Edge::H2(send) = &mut edge else {
        unreachable!()
    };
    let mut held = Vec::new();
    let mut pending = Vec::new();
    for _ in 0..60 {
        let mut s = send.clone();
        pending.push(tokio::spawn(async move {
            let req = request("GET", "echo.tunnel.test", "/flood", full(""), true);
            s.send_request(req).await.map(|r| r.into_body())
        }));
    }
    // Responses are opened but their bodies are never read.
    tokio::time::sleep(Duration::from_millis(800)).await;
    for p in pending {
        if p.is_finished() {
            if let Ok(Ok(body)) = p.await {
                held.push(body);
            }
        } else {
            p.abort();
        }
    }
    let peak = peak.load(Ordering::SeqCst);
    assert!(
        peak <= 20,
        "{peak} upstream responses open at once beyond max_streams_per_session = 20"
    );
    assert!(!held.is_empty());
    // Other sessions are unaffected.
    let mut other = Edge::connect(&proxy, &pki, "echo.tunnel.test", false).await;
    let t = std::time::Instant::now();
    assert_eq!(other.get("echo.tunnel.test", "/").await.0, 200);
    println!(
        "other session answered in {:?} while {} unread streams were held",
        t.elapsed(),
        held.len()
    );
}

/// Decrements the counter when the response body is dropped.
fn scopeguard(c: Arc<AtomicUsize>) -> impl Send + Sync {
    struct G(Arc<AtomicUsize>);
    impl Drop for G {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    G(c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_limit_refuses_with_503() {
    let pki = TestPki::new();
    let up = echo_upstream().await;
    let proxy = start(&pki, "max_sessions = 3", up).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(Edge::connect(&proxy, &pki, "echo.tunnel.test", false).await);
    }
    let err = proxy
        .target()
        .connect()
        .await
        .err()
        .expect("a fourth session must be refused");
    assert!(err.to_string().contains("503"), "{err}");
    assert_eq!(limit_hits_reaching(&proxy, LimitHit::Sessions, 1).await, 1);
    // The held sessions still work; closing one frees a slot.
    assert_eq!(held[0].get("echo.tunnel.test", "/").await.0, 200);
    held.pop();
    let mut ok = false;
    for _ in 0..100 {
        if proxy.target().connect().await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "slot not freed after a session closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_close_but_streaming_ones_do_not() {
    let pki = TestPki::new();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let rx = Arc::new(tokio::sync::Mutex::new(Some(rx)));
    let up = upstream(move |req: Request<Incoming>| {
        let rx = rx.clone();
        async move {
            if req.uri().path() != "/sse" {
                return Response::new(full("ok"));
            }
            let mut rx = rx.lock().await.take().unwrap();
            let stream = futures_util::stream::poll_fn(move |cx| {
                rx.poll_recv(cx).map(|o| {
                    o.map(|()| {
                        Ok::<_, hyper::Error>(Frame::data(Bytes::from_static(b"data: tick\n\n")))
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
    let proxy = start(&pki, "idle_session_timeout = \"1s\"", up).await;
    // An h2 session that does nothing is closed after the idle timeout.
    let mut idle = Edge::connect(&proxy, &pki, "echo.tunnel.test", true).await;
    assert_eq!(idle.get("echo.tunnel.test", "/").await.0, 200);
    let Edge::H2(send) = &mut idle else {
        unreachable!()
    };
    let mut closed = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if send.is_closed() {
            closed = true;
            break;
        }
    }
    assert!(closed, "idle session still open");
    assert!(limit_hits_reaching(&proxy, LimitHit::IdleSession, 1).await >= 1);
    // A session with an SSE response streaming for longer than the idle timeout stays up.
    let mut streaming = Edge::connect(&proxy, &pki, "echo.tunnel.test", true).await;
    let mut body = streaming
        .send(request("GET", "echo.tunnel.test", "/sse", full(""), true))
        .await
        .into_body();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        tx.send(()).unwrap();
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .unwrap();
        assert!(matches!(frame, Some(Ok(_))), "SSE stream cut: {frame:?}");
    }
    // The open stream counts as in flight for as long as it streams, then no longer.
    assert_eq!(proxy.proxy.metrics().requests_in_flight(), 1);
    drop(body);
    drop(streaming);
    let mut gone = false;
    for _ in 0..100 {
        if proxy.proxy.metrics().requests_in_flight() == 0 {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "in-flight gauge not released after the stream closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_body_limit_answers_413() {
    let pki = TestPki::new();
    let up = echo_upstream().await;
    let proxy = start(&pki, "max_request_body_bytes = 1000", up).await;
    let mut edge = Edge::connect(&proxy, &pki, "echo.tunnel.test", false).await;
    let small = Request::post("/")
        .header("host", "echo.tunnel.test")
        .body(full(vec![b'a'; 500]))
        .unwrap();
    let r = edge.send(small).await;
    assert_eq!(r.status(), 200);
    r.into_body().collect().await.unwrap();
    let big = Request::post("/")
        .header("host", "echo.tunnel.test")
        .body(full(vec![b'a'; 5000]))
        .unwrap();
    assert_eq!(edge.send(big).await.status(), 413);
    // Chunked (no Content-Length): cut while streaming.
    let mut edge = Edge::connect(&proxy, &pki, "echo.tunnel.test", false).await;
    let chunks = futures_util::stream::iter(
        (0..10).map(|_| Ok::<_, hyper::Error>(Frame::data(Bytes::from(vec![b'b'; 500])))),
    );
    let chunked = Request::post("/")
        .header("host", "echo.tunnel.test")
        .body(BodyExt::boxed(StreamBody::new(chunks)))
        .unwrap();
    assert_eq!(edge.send(chunked).await.status(), 413);
    assert!(limit_hits_reaching(&proxy, LimitHit::RequestBodyTooLarge, 2).await >= 2);
    still_serving(&proxy, &pki).await;
}

#[tokio::test]
async fn metadata_and_special_addresses_refused_inside_a_catch_all() {
    let pki = TestPki::new();
    let up = echo_upstream().await;
    let routes = format!(
        "echo = \"http://{up}\"\nmeta = \"http://169.254.169.254:80\"\nzero = \"http://0.0.0.0:{}\"\nbcast = \"http://255.255.255.255:80\"\nmcast = \"http://224.0.0.1:80\"",
        up.port()
    );
    let proxy = TestProxy::start(
        &pki,
        &config_text(&pki, "", &routes, "allowed_ips = [\"0.0.0.0/0\"]"),
    )
    .await;
    for route in ["meta", "zero", "bcast", "mcast"] {
        let host = format!("{route}.tunnel.test");
        let mut edge = Edge::connect(&proxy, &pki, &host, false).await;
        let (status, body) = edge.get(&host, "/").await;
        assert_eq!(status, 502, "{route}: {body}");
        assert!(body.contains("not allowed"), "{route}: {body}");
    }
    assert_eq!(
        Edge::connect(&proxy, &pki, "echo.tunnel.test", false)
            .await
            .get("echo.tunnel.test", "/")
            .await
            .0,
        200
    );
}

#[tokio::test]
async fn redirects_are_passed_to_the_caller_not_followed() {
    let pki = TestPki::new();
    let followed = Arc::new(AtomicUsize::new(0));
    let target = {
        let followed = followed.clone();
        upstream(move |_req: Request<Incoming>| {
            let followed = followed.clone();
            async move {
                followed.fetch_add(1, Ordering::SeqCst);
                Response::new(full("private"))
            }
        })
        .await
    };
    let up = upstream(move |_req: Request<Incoming>| async move {
        Response::builder()
            .status(302)
            .header("location", format!("http://{target}/secret"))
            .body(full(""))
            .unwrap()
    })
    .await;
    let proxy = TestProxy::start(
        &pki,
        &config_text(&pki, "", &format!("r = \"http://{up}\""), LOOPBACK),
    )
    .await;
    let mut edge = Edge::connect(&proxy, &pki, "r.tunnel.test", false).await;
    let resp = edge
        .send(request("GET", "r.tunnel.test", "/", full(""), false))
        .await;
    assert_eq!(resp.status(), 302);
    assert!(
        resp.headers()["location"]
            .to_str()
            .unwrap()
            .ends_with("/secret")
    );
    assert_eq!(
        followed.load(Ordering::SeqCst),
        0,
        "the proxy followed a redirect"
    );
}

/// Once ALPN agreed h2 the session speaks HTTP/2 only (RFC 9113 sections 3.3 and 3.4): an
/// HTTP/1.1 request in its place is a connection error, never served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_session_without_the_preface_gets_goaway_not_http1() {
    let pki = TestPki::new();
    let up = echo_upstream().await;
    let proxy = start(&pki, "", up).await;
    let tls = mcp_tunnel::proxy::tls::client_config(pki.roots(), vec![b"h2".to_vec()]);
    let mut stream = proxy
        .target()
        .connect_tls(tls, "echo.tunnel.test")
        .await
        .unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: echo.tunnel.test\r\n\r\n")
        .await
        .unwrap();
    stream.flush().await.unwrap();
    let mut back = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut back)).await;
    assert!(
        !back.windows(8).any(|w| w == b"HTTP/1.1"),
        "served as HTTP/1.1: {:?}",
        String::from_utf8_lossy(&back)
    );
    // The server's SETTINGS, then GOAWAY (type 7) on stream 0 with PROTOCOL_ERROR (1).
    assert!(back.len() >= 9 + 9 + 8, "no GOAWAY: {back:?}");
    assert_eq!(back[3], 4, "SETTINGS first");
    let goaway = &back[9..];
    assert_eq!(goaway[3], 7, "then GOAWAY");
    assert_eq!(goaway[13..17], [0, 0, 0, 1], "PROTOCOL_ERROR");
    // A proper h2 session on the same proxy is served.
    let mut edge = Edge::connect(&proxy, &pki, "echo.tunnel.test", true).await;
    assert_eq!(edge.get("echo.tunnel.test", "/").await.0, 200);
}
