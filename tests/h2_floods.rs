//! HTTP/2 floods on the inner server (issue 23, item 3), each sent as raw frames on a real
//! tunnel session (WebSocket + inner TLS, ALPN h2): rapid reset (CVE-2023-44487), a
//! CONTINUATION flood and an endless header block, a SETTINGS flood, a PING flood. For each:
//! the flood is bounded (the offending session is closed, or the frames cost nothing and the
//! session still answers), and another session on the same proxy is served throughout.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use http::{Request, Response};
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const HOST: &str = "echo.tunnel.test";

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const CONTINUATION: u8 = 9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

/// A GET / for HOST as an HPACK block: static-table `:method GET`, `:scheme https`,
/// `:path /`, and `:authority` as a literal without indexing.
fn get_block() -> Vec<u8> {
    let mut b = vec![0x82, 0x87, 0x84, 0x01, HOST.len() as u8];
    b.extend_from_slice(HOST.as_bytes());
    b
}

/// A raw h2 session: the preface and an empty SETTINGS sent.
async fn raw_session(
    proxy: &TestProxy,
    pki: &TestPki,
) -> impl AsyncRead + AsyncWrite + Unpin + Send + 'static {
    let tls = mcp_tunnel::proxy::tls::client_config(pki.roots(), vec![b"h2".to_vec()]);
    let mut s = proxy.target().connect_tls(tls, HOST).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    s.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    s
}

/// Reads frames until the connection ends or `deadline`; returns the GOAWAY error code if
/// one came, and whether the connection ended.
async fn read_until_closed<S: AsyncRead + Unpin>(
    s: &mut S,
    within: Duration,
) -> (Option<u32>, bool) {
    let deadline = Instant::now() + within;
    let mut goaway = None;
    let mut head = [0u8; 9];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read_exact(&mut head)).await {
            Err(_) => return (goaway, false),
            Ok(Err(_)) => return (goaway, true),
            Ok(Ok(_)) => {}
        }
        let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
        let mut payload = vec![0u8; len];
        match tokio::time::timeout(left, s.read_exact(&mut payload)).await {
            Err(_) => return (goaway, false),
            Ok(Err(_)) => return (goaway, true),
            Ok(Ok(_)) => {}
        }
        if head[3] == GOAWAY && payload.len() >= 8 {
            goaway = Some(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
        }
    }
}

/// A proxy with a counting upstream; a well-behaved h2 session that keeps calling it while
/// the flood runs, reporting how many of its requests failed.
struct Bystander {
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Edge>,
}

impl Bystander {
    async fn start(proxy: &TestProxy, pki: &TestPki) -> Bystander {
        let mut edge = Edge::connect(proxy, pki, HOST, true).await;
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let (o, f) = (ok.clone(), failed.clone());
        let task = tokio::spawn(async move {
            while !*stopped.borrow_and_update() {
                let (status, _) = edge.get(HOST, "/").await;
                if status == 200 { &o } else { &f }.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            edge
        });
        Bystander {
            ok,
            failed,
            stop,
            task,
        }
    }

    async fn finish(self, what: &str) {
        let _ = self.stop.send(true);
        let mut edge = self
            .task
            .await
            .expect("the bystander session's requests never failed hard");
        // And after the flood, on the same session.
        assert_eq!(
            edge.get(HOST, "/").await.0,
            200,
            "{what}: the other session after it"
        );
        let (ok, failed) = (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        );
        eprintln!("{what}: the other session made {ok} requests, {failed} failed");
        assert!(ok > 0, "{what}: the other session was not served");
        assert_eq!(failed, 0, "{what}: the other session saw failures");
    }
}

async fn setup() -> (TestPki, TestProxy, Arc<AtomicU64>) {
    let pki = TestPki::new();
    let hits = Arc::new(AtomicU64::new(0));
    let h = hits.clone();
    let up = upstream(move |_req: Request<Incoming>| {
        let h = h.clone();
        async move {
            h.fetch_add(1, Ordering::Relaxed);
            Response::new(full("ok"))
        }
    })
    .await;
    let text = config_text(
        &pki,
        "",
        &format!("echo = \"http://{up}\""),
        "allowed_ips = [\"127.0.0.0/8\"]",
    );
    let proxy = TestProxy::start(&pki, &text).await;
    (pki, proxy, hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_flood_closes_the_session_and_reaches_few_upstream_requests() {
    let (pki, proxy, hits) = setup().await;
    let bystander = Bystander::start(&proxy, &pki).await;
    let before = hits.load(Ordering::Relaxed);
    let mut s = raw_session(&proxy, &pki).await;
    const STREAMS: u32 = 20_000;
    let block = get_block();
    let mut batch = Vec::new();
    let mut written = 0u32;
    for i in 0..STREAMS {
        let id = 2 * i + 1;
        batch.extend(frame(HEADERS, END_STREAM | END_HEADERS, id, &block));
        batch.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes())); // CANCEL
        if batch.len() > 16 * 1024 {
            if s.write_all(&batch).await.is_err() {
                break;
            }
            batch.clear();
        }
        written = i + 1;
    }
    let _ = s.write_all(&batch).await;
    let (goaway, closed) = read_until_closed(&mut s, Duration::from_secs(20)).await;
    let reached = hits.load(Ordering::Relaxed) - before;
    eprintln!(
        "rapid reset: {written} streams opened and reset, GOAWAY {goaway:?}, closed {closed}, {reached} reached the upstream"
    );
    assert!(
        closed || goaway.is_some(),
        "the flooding session was neither told GOAWAY nor closed"
    );
    bystander.finish("rapid reset").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuation_flood_and_endless_header_block_close_the_session() {
    let (pki, proxy, _hits) = setup().await;
    let bystander = Bystander::start(&proxy, &pki).await;
    let mut s = raw_session(&proxy, &pki).await;
    // HEADERS without END_HEADERS, then CONTINUATION frames of a literal header that never
    // ends the block: far more than limits.max_header_bytes.
    s.write_all(&frame(HEADERS, END_STREAM, 1, &get_block()))
        .await
        .unwrap();
    let mut filler = Vec::new();
    // Literal header field without indexing, new name "x-a", a 4000-byte value.
    filler.extend_from_slice(&[0x00, 0x03, b'x', b'-', b'a', 0x7f]);
    let mut n = 4000 - 127;
    while n >= 128 {
        filler.push((n % 128) as u8 | 0x80);
        n /= 128;
    }
    filler.push(n as u8);
    filler.extend(std::iter::repeat_n(b'v', 4000));
    let cont = frame(CONTINUATION, 0, 1, &filler);
    let mut sent = 0usize;
    let limit = 64 * 1024 * 1024;
    while sent < limit {
        match tokio::time::timeout(Duration::from_secs(5), s.write_all(&cont)).await {
            Ok(Ok(())) => sent += cont.len(),
            _ => break,
        }
    }
    let (goaway, closed) = read_until_closed(&mut s, Duration::from_secs(10)).await;
    eprintln!(
        "CONTINUATION flood: {sent} bytes taken before the session stopped reading; GOAWAY {goaway:?}, closed {closed}"
    );
    assert!(
        sent < limit,
        "the proxy read {limit} bytes of one header block"
    );
    assert!(closed || goaway.is_some(), "the session was not ended");
    bystander.finish("CONTINUATION flood").await;
}

/// SETTINGS and PING frames the client never reads the answers to: the server must not
/// queue answers without bound. Either the frames are answered in bounded memory (the session
/// still serves a request after) or the session is closed; the other session is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_and_ping_floods_are_bounded() {
    let (pki, proxy, _hits) = setup().await;
    let bystander = Bystander::start(&proxy, &pki).await;
    for (name, f) in [
        ("SETTINGS", frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100])),
        ("PING", frame(PING, 0, 0, &[7u8; 8])),
    ] {
        let mut s = raw_session(&proxy, &pki).await;
        let mut batch = Vec::new();
        for _ in 0..1024 {
            batch.extend_from_slice(&f);
        }
        // Up to 100,000 frames, without reading a byte of what the server answers.
        let mut sent = 0usize;
        let started = Instant::now();
        while sent < 100_000 {
            match tokio::time::timeout(Duration::from_secs(3), s.write_all(&batch)).await {
                Ok(Ok(())) => sent += 1024,
                _ => break,
            }
        }
        eprintln!(
            "{name} flood: {sent} frames written in {:?} before the server stopped reading or the flood ended",
            started.elapsed()
        );
        // Now read: the session is either closed, or still serves a request.
        let block = get_block();
        let wrote = s
            .write_all(&frame(HEADERS, END_STREAM | END_HEADERS, 1, &block))
            .await;
        let mut answered = false;
        let mut closed = wrote.is_err();
        let mut head = [0u8; 9];
        let deadline = Instant::now() + Duration::from_secs(10);
        while !closed && !answered && Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut head)).await {
                Ok(Ok(_)) => {
                    let len = (usize::from(head[0]) << 16)
                        | (usize::from(head[1]) << 8)
                        | usize::from(head[2]);
                    let mut payload = vec![0u8; len];
                    if s.read_exact(&mut payload).await.is_err() {
                        closed = true;
                    }
                    let stream = u32::from_be_bytes(head[5..9].try_into().unwrap()) & 0x7fff_ffff;
                    if head[3] == HEADERS && stream == 1 {
                        answered = true;
                    }
                    if head[3] == GOAWAY {
                        closed = true;
                    }
                }
                _ => closed = true,
            }
        }
        eprintln!("{name} flood: afterwards the session answered {answered}, closed {closed}");
        assert!(
            answered || closed,
            "{name} flood: the session neither answered nor closed"
        );
    }
    bystander.finish("SETTINGS and PING floods").await;
}
