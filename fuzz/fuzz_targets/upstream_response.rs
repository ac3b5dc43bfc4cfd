//! The upstream exchange's response framing (`proxy::exchange`) against hyper's HTTP/1.1
//! client on the same bytes. First input byte: bit 0 makes the request a HEAD; the rest is
//! what the upstream sends.
//!
//! The invariant is "strictly less than hyper": every response this proxy accepts
//! completely (head and whole body), hyper's client must accept too, with the same status
//! and the same body bytes. This proxy may refuse what hyper accepts (it refuses both
//! framing headers, duplicate lengths, other transfer codings), never the reverse, and never
//! frame a body differently: a difference is how a response desynchronises a connection.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use bytes::BytesMut;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use libfuzzer_sys::fuzz_target;
use mcp_tunnel::proxy::exchange::{BodyFraming, decode_chunked_for_fuzz, parse_head_for_fuzz};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;

fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    })
}

/// What this proxy makes of `bytes`: `Some((status, body))` when it accepts a complete
/// response.
fn ours(bytes: &[u8], head_request: bool) -> Option<(u16, Vec<u8>)> {
    let mut buf = BytesMut::from(bytes);
    let (status, _headers, framing, _reusable) = parse_head_for_fuzz(&mut buf, head_request).ok()??;
    let body = match framing {
        BodyFraming::Empty => Vec::new(),
        BodyFraming::Length(n) => {
            let n = usize::try_from(n).ok()?;
            if buf.len() < n {
                return None;
            }
            buf[..n].to_vec()
        }
        BodyFraming::Chunked => decode_chunked_for_fuzz(&mut buf).ok()??,
        BodyFraming::Close => buf.to_vec(),
    };
    Some((status, body))
}

/// What hyper's client makes of the same bytes (then the end of the connection).
fn hyper(bytes: &[u8], head_request: bool) -> Result<(u16, Vec<u8>), String> {
    let bytes = bytes.to_vec();
    runtime().block_on(async move {
        let (client, mut server) = tokio::io::duplex(bytes.len() + 4096);
        let (mut send, conn) = hyper::client::conn::http1::handshake::<_, Empty<bytes::Bytes>>(TokioIo::new(client))
            .await
            .map_err(|e| e.to_string())?;
        let driver = tokio::spawn(conn);
        // The upstream answers once it has read the request head, as a server does: bytes
        // that arrive before any request is sent are an unsolicited response to hyper, which
        // then closes the connection whatever the bytes are.
        let upstream = tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut chunk = [0u8; 1024];
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                match server.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => seen.extend_from_slice(&chunk[..n]),
                }
            }
            let _ = server.write_all(&bytes).await;
            let _ = server.shutdown().await;
            // Keep the stream open until hyper is done with it.
            let _ = server.read(&mut chunk).await;
        });
        let req = http::Request::builder()
            .method(if head_request { "HEAD" } else { "GET" })
            .uri("/")
            .header("host", "upstream")
            .body(Empty::new())
            .unwrap();
        let work = async {
            let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.map_err(|e| e.to_string())?;
            Ok::<_, String>((status, body.to_bytes().to_vec()))
        };
        let out = tokio::time::timeout(Duration::from_secs(2), work)
            .await
            .map_err(|_| "hyper timed out".to_string())?;
        driver.abort();
        upstream.abort();
        out
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, bytes)) = data.split_first() else {
        return;
    };
    let head_request = flags & 1 == 1;
    let Some(accepted) = ours(bytes, head_request) else {
        return;
    };
    match hyper(bytes, head_request) {
        Ok(theirs) => assert_eq!(
            accepted, theirs,
            "framed differently from hyper: {:?}",
            String::from_utf8_lossy(bytes)
        ),
        Err(e) => panic!(
            "accepted what hyper refuses ({e}): {:?}",
            String::from_utf8_lossy(bytes)
        ),
    }
});
