//! The upstream exchange (`proxy::exchange`) against a raw upstream that writes exactly the
//! bytes each test gives it: framing the proxy accepts arrives intact and the connection is
//! reused; every framing anomaly is a 502 (or an aborted stream once it has begun) and the
//! connection it came on is closed, never carrying another request.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const LOOPBACK: &str = "allowed_ips = [\"127.0.0.0/8\"]";

/// What the raw upstream saw.
#[derive(Default)]
struct Seen {
    /// Connections accepted.
    connections: usize,
    /// Connections the proxy closed (EOF while the upstream waited for a next request).
    closed_by_proxy: usize,
    /// Every request received: head and body bytes as they came on the wire.
    requests: Vec<(String, Vec<u8>)>,
}

/// An upstream that answers every request with `answer(path)`'s bytes, as they are.
async fn raw_upstream(answer: fn(&str) -> Vec<u8>) -> (SocketAddr, Arc<Mutex<Seen>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            s.lock().unwrap().connections += 1;
            tokio::spawn(serve_raw(stream, answer, s.clone()));
        }
    });
    (addr, seen)
}

async fn serve_raw(mut stream: TcpStream, answer: fn(&str) -> Vec<u8>, seen: Arc<Mutex<Seen>>) {
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => {
                    if buf.is_empty() {
                        seen.lock().unwrap().closed_by_proxy += 1;
                    }
                    return;
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let lower = head.to_ascii_lowercase();
        // The body, as framed by the proxy: Content-Length or chunked (read to its end).
        let mut body_end = head_end;
        if let Some(cl) = lower
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
        {
            body_end += cl.trim().parse::<usize>().unwrap();
        } else if lower.contains("transfer-encoding: chunked") {
            loop {
                if let Some(at) = buf[head_end..].windows(5).position(|w| w == b"0\r\n\r\n") {
                    body_end = head_end + at + 5;
                    break;
                }
                let mut chunk = [0u8; 4096];
                let n = stream.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
        }
        while buf.len() < body_end {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                return;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let body = buf[head_end..body_end].to_vec();
        buf.drain(..body_end);
        let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
        seen.lock().unwrap().requests.push((head, body));
        let out = answer(&path);
        if stream.write_all(&out).await.is_err() {
            // Only the proxy closing the connection mid-answer makes a write fail here (an
            // answer it refuses to read to the end, such as an endless head).
            seen.lock().unwrap().closed_by_proxy += 1;
            return;
        }
        if path.contains("close") {
            return;
        }
    }
}

fn answers(path: &str) -> Vec<u8> {
    let r: &str = match path {
        "/length" => "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
        "/chunked" => {
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;x=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: 1\r\n\r\n"
        }
        "/close-delimited" => "HTTP/1.1 200 OK\r\n\r\nuntil the end",
        "/continue" => {
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok"
        }
        "/no-content" => "HTTP/1.1 204 No Content\r\n\r\n",
        "/both" => {
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        }
        "/dup-length" => "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\nhello",
        "/list-length" => "HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\nhello",
        "/bad-length" => "HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\nhello",
        "/gzip" => {
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        }
        "/bad-chunk" => "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
        "/bare-lf-chunk" => {
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n"
        }
        "/switching" => "HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n",
        "/garbage" => "HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        // A response followed by a second one nobody asked for (a desync attempt).
        "/smuggle" => {
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhelloHTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nsmuggled"
        }
        // Less than it announced, then the connection closes ("close" in the path).
        "/short-body-close" => "HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\nonly this",
        // A head that never ends: header lines, about 1 MB of them, and no blank line.
        "/endless-head" => {
            return [
                b"HTTP/1.1 200 OK\r\n".to_vec(),
                b"x-filler: 0123456789abcdef\r\n".repeat(40_000),
            ]
            .concat();
        }
        _ => "HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nnext",
    };
    r.as_bytes().to_vec()
}

/// One data-plane worker: each worker keeps its own idle connections, so connection counts
/// are exact only with one.
async fn start(pki: &TestPki, upstream: SocketAddr) -> TestProxy {
    let text = config_text(
        pki,
        "workers = 1",
        &format!("echo = \"http://{upstream}\""),
        LOOPBACK,
    );
    TestProxy::start(pki, &text).await
}

async fn get(edge: &mut Edge, path: &str) -> (u16, Result<Bytes, String>) {
    let resp = edge
        .send(request("GET", "echo.tunnel.test", path, full(""), false))
        .await;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| e.to_string());
    (status, body)
}

async fn wait_for(seen: &Mutex<Seen>, what: impl Fn(&Seen) -> bool) -> bool {
    for _ in 0..200 {
        if what(&seen.lock().unwrap()) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn well_framed_answers_arrive_intact_on_one_reused_connection() {
    let pki = TestPki::new();
    let (addr, seen) = raw_upstream(answers).await;
    let proxy = start(&pki, addr).await;
    for h2 in [false, true] {
        let mut edge = Edge::connect(&proxy, &pki, "echo.tunnel.test", h2).await;
        for (path, status, body) in [
            ("/length", 200, &b"hello"[..]),
            ("/chunked", 200, b"hello world"),
            ("/continue", 201, b"ok"),
            ("/no-content", 204, b""),
            ("/length", 200, b"hello"),
        ] {
            let resp = edge
                .send(request("GET", "echo.tunnel.test", path, full(""), h2))
                .await;
            assert_eq!(resp.status().as_u16(), status, "{path} (h2 {h2})");
            let got = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&got[..], body, "{path} (h2 {h2})");
        }
    }
    let s = seen.lock().unwrap();
    assert_eq!(s.requests.len(), 10);
    assert_eq!(
        s.connections, 1,
        "every answer was framed: one connection carried all ten requests"
    );
    assert_eq!(s.closed_by_proxy, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_delimited_answer_is_passed_on_and_its_connection_not_reused() {
    let pki = TestPki::new();
    // The raw upstream closes the connection after answering a path with "close" in it.
    let (addr, seen) = raw_upstream(answers).await;
    let proxy = start(&pki, addr).await;
    let mut edge = Edge::connect(&proxy, &pki, "echo.tunnel.test", false).await;
    for _ in 0..2 {
        let (status, body) = get(&mut edge, "/close-delimited").await;
        assert_eq!((status, body.unwrap()), (200, Bytes::from("until the end")));
    }
    assert_eq!(
        seen.lock().unwrap().connections,
        2,
        "a close-delimited answer ends its connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_anomalies_are_502_and_close_the_upstream_connection() {
    let pki = TestPki::new();
    let (addr, seen) = raw_upstream(answers).await;
    let proxy = start(&pki, addr).await;
    let mut edge = Edge::connect(&proxy, &pki, "echo.tunnel.test", false).await;
    for (i, path) in [
        "/both",
        "/dup-length",
        "/list-length",
        "/bad-length",
        "/gzip",
        "/switching",
        "/garbage",
    ]
    .into_iter()
    .enumerate()
    {
        let (status, body) = get(&mut edge, path).await;
        assert_eq!(status, 502, "{path}: {body:?}");
        assert!(
            wait_for(&seen, |s| s.closed_by_proxy == i + 1).await,
            "{path}: the proxy must close the connection the anomaly came on"
        );
        // The session goes on, on a new upstream connection.
        let (status, body) = get(&mut edge, "/next").await;
        assert_eq!(
            (status, body.unwrap()),
            (200, Bytes::from("next")),
            "after {path}"
        );
        assert_eq!(seen.lock().unwrap().connections, i + 2, "after {path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_chunk_aborts_the_stream_and_closes_the_connection() {
    let pki = TestPki::new();
    let (addr, seen) = raw_upstream(answers).await;
    let proxy = start(&pki, addr).await;
    for (n, path) in ["/bad-chunk", "/bare-lf-chunk"].into_iter().enumerate() {
        let Edge::H1(mut send) = Edge::connect(&proxy, &pki, "echo.tunnel.test", false).await
        else {
            unreachable!("asked for HTTP/1.1")
        };
        // The head may or may not reach the client before the abort; a clean end must not.
        let req = request("GET", "echo.tunnel.test", path, full(""), false);
        let ended_cleanly = match send.send_request(req).await {
            Ok(resp) => resp.into_body().collect().await.is_ok(),
            Err(_) => false,
        };
        assert!(!ended_cleanly, "{path}: the body must not end cleanly");
        assert!(
            wait_for(&seen, |s| s.closed_by_proxy == n + 1).await,
            "{path}: connection closed"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_after_a_body_never_reach_the_next_request() {
    let pki = TestPki::new();
    let (addr, seen) = raw_upstream(answers).await;
    let proxy = start(&pki, addr).await;
    let mut edge = Edge::connect(&proxy, &pki, "echo.tunnel.test", false).await;
    let (status, body) = get(&mut edge, "/smuggle").await;
    assert_eq!((status, body.unwrap()), (200, Bytes::from("hello")));
    let (status, body) = get(&mut edge, "/next").await;
    assert_eq!(
        (status, body.unwrap()),
        (200, Bytes::from("next")),
        "the smuggled answer must not be served"
    );
    assert!(wait_for(&seen, |s| s.connections == 2 && s.closed_by_proxy == 1).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_go_out_framed_by_length_or_chunked() {
    let pki = TestPki::new();
    let (addr, seen) = raw_upstream(answers).await;
    let proxy = start(&pki, addr).await;
    let mut edge = Edge::connect(&proxy, &pki, "echo.tunnel.test", false).await;
    // A body of known length.
    let req = request("POST", "echo.tunnel.test", "/a", full("{\"x\":1}"), false);
    assert_eq!(edge.send(req).await.status(), 200);
    // A streamed body of unknown length (chunked from the client).
    let chunks: Vec<Result<Frame<Bytes>, hyper::Error>> = vec![
        Ok(Frame::data(Bytes::from("part one,"))),
        Ok(Frame::data(Bytes::from(" part two"))),
    ];
    let body = BodyExt::boxed(StreamBody::new(futures_util::stream::iter(chunks)));
    let req = http::Request::builder()
        .method("POST")
        .uri("/b")
        .header("host", "echo.tunnel.test")
        .body(body)
        .unwrap();
    assert_eq!(edge.send(req).await.status(), 200);
    let s = seen.lock().unwrap();
    let (head, body) = &s.requests[0];
    let lower = head.to_ascii_lowercase();
    assert!(head.starts_with("POST /a HTTP/1.1\r\n"), "{head}");
    assert!(lower.contains("content-length: 7\r\n"), "{head}");
    assert!(!lower.contains("transfer-encoding"), "{head}");
    assert!(lower.contains("host: 127.0.0.1:"), "{head}");
    assert!(
        lower.contains("x-forwarded-host: echo.tunnel.test\r\n"),
        "{head}"
    );
    assert_eq!(body, b"{\"x\":1}");
    let (head, body) = &s.requests[1];
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("transfer-encoding: chunked\r\n"), "{head}");
    assert!(!lower.contains("content-length"), "{head}");
    let text = String::from_utf8_lossy(body);
    let decoded: String = text
        .split("\r\n")
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, s)| s)
        .collect();
    assert_eq!(decoded, "part one, part two", "{text:?}");
    assert!(text.ends_with("0\r\n\r\n"), "{text:?}");
}

/// Faults of the upstream (issue 23, item 4): a head that never ends, and a body cut short by
/// a close. Each fails only its own request, within bounds, and the session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_head_or_a_body_cut_short_fails_only_that_request() {
    let pki = TestPki::new();
    let (addr, seen) = raw_upstream(answers).await;
    let proxy = start(&pki, addr).await;
    let mut edge = Edge::connect(&proxy, &pki, "echo.tunnel.test", false).await;
    let t0 = std::time::Instant::now();
    let (status, body) = get(&mut edge, "/endless-head").await;
    assert_eq!(status, 502, "{body:?}");
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    assert!(
        wait_for(&seen, |s| s.closed_by_proxy >= 1).await,
        "the proxy must close the connection the endless head came on"
    );
    let (status, body) = get(&mut edge, "/next").await;
    assert_eq!((status, body.unwrap()), (200, Bytes::from("next")));

    let Edge::H1(mut send) = Edge::connect(&proxy, &pki, "echo.tunnel.test", false).await else {
        unreachable!("asked for HTTP/1.1")
    };
    let req = request(
        "GET",
        "echo.tunnel.test",
        "/short-body-close",
        full(""),
        false,
    );
    let ended_cleanly = match send.send_request(req).await {
        Ok(resp) => resp.into_body().collect().await.is_ok(),
        Err(_) => false,
    };
    assert!(
        !ended_cleanly,
        "a body cut short must not end cleanly for the client"
    );
    let mut edge = Edge::connect(&proxy, &pki, "echo.tunnel.test", false).await;
    let (status, body) = get(&mut edge, "/next").await;
    assert_eq!((status, body.unwrap()), (200, Bytes::from("next")));
}
