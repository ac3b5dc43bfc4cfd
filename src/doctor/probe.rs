//! The MCP probe: one HTTP request through the real inner path, as the edge sends it: a
//! WebSocket to the listener, inner TLS with the route's name as SNI, trusting only the tunnel
//! CA, then HTTP/1.1. Used for `initialize`, the session's `DELETE`, and the OAuth resource
//! metadata an upstream announces.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;

use crate::proxy::edge::WsTarget;

/// Bodies are read up to this size (an `initialize` answer is a few hundred bytes).
const MAX_BODY: usize = 1024 * 1024;

/// The MCP protocol version the probe offers.
pub(super) const PROTOCOL_VERSION: &str = "2025-06-18";

/// Where probes go: the listener and the trust for its inner TLS.
#[derive(Clone)]
pub(super) struct Target {
    pub ws: WsTarget,
    pub tls: Arc<ClientConfig>,
}

/// One answer.
pub(super) struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// WebSocket + inner TLS set-up.
    pub session: Duration,
    /// From sending the request to the end of what was read.
    pub latency: Duration,
}

/// Why no answer came.
#[derive(Debug)]
pub(super) enum Failure {
    /// The WebSocket to the listener.
    Listener(String),
    /// The inner TLS handshake (what the edge would see).
    Tls(String),
    Http(String),
    Timeout(Duration),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Listener(e) => write!(f, "cannot open a tunnel session: {e}"),
            Failure::Tls(e) => write!(f, "inner TLS handshake failed: {e}"),
            Failure::Http(e) => write!(f, "HTTP over the tunnel session failed: {e}"),
            Failure::Timeout(t) => write!(f, "no answer within {t:?}"),
        }
    }
}

/// Sends one request for `host` (SNI and `Host`) over a fresh tunnel session.
pub(super) async fn send(
    target: &Target,
    host: &str,
    req: Request<Full<Bytes>>,
    timeout: Duration,
) -> Result<Answer, Failure> {
    tokio::time::timeout(timeout, send_inner(target, host, req))
        .await
        .unwrap_or(Err(Failure::Timeout(timeout)))
}

async fn send_inner(
    target: &Target,
    host: &str,
    mut req: Request<Full<Bytes>>,
) -> Result<Answer, Failure> {
    let start = Instant::now();
    let ws = target
        .ws
        .connect()
        .await
        .map_err(|e| Failure::Listener(e.to_string()))?;
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| Failure::Tls(format!("{host:?} is not a valid server name: {e}")))?;
    let tls = tokio_rustls::TlsConnector::from(target.tls.clone())
        .connect(name, ws)
        .await
        .map_err(|e| Failure::Tls(e.to_string()))?;
    let session = start.elapsed();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| Failure::Http(e.to_string()))?;
    tokio::spawn(conn);
    if let Ok(v) = http::HeaderValue::from_str(host) {
        req.headers_mut().insert(http::header::HOST, v);
    }
    let sent = Instant::now();
    let resp = send
        .send_request(req)
        .await
        .map_err(|e| Failure::Http(e.to_string()))?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let sse = is_sse(&headers);
    let mut incoming = resp.into_body();
    let mut body = BytesMut::new();
    // An SSE answer may keep its stream open after the response event: stop at that event.
    while let Some(frame) = incoming.frame().await {
        let frame = frame.map_err(|e| Failure::Http(format!("reading the body: {e}")))?;
        if let Some(d) = frame.data_ref() {
            body.extend_from_slice(d);
        }
        if body.len() >= MAX_BODY || (sse && jsonrpc_in_sse(&body).is_some()) {
            break;
        }
    }
    Ok(Answer {
        status,
        headers,
        body: body.freeze(),
        session,
        latency: sent.elapsed(),
    })
}

fn is_sse(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("text/event-stream"))
}

/// The first JSON-RPC response (an object with `id` and `result` or `error`) among the
/// complete events of an SSE body.
fn jsonrpc_in_sse(body: &[u8]) -> Option<serde_json::Value> {
    let text = String::from_utf8_lossy(body).replace("\r\n", "\n");
    let complete = &text[..text.rfind("\n\n")?];
    complete.split("\n\n").find_map(|event| {
        let data: Vec<&str> = event
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(|d| d.strip_prefix(' ').unwrap_or(d))
            .collect();
        let v: serde_json::Value = serde_json::from_str(&data.join("\n")).ok()?;
        (v.get("id").is_some() && (v.get("result").is_some() || v.get("error").is_some()))
            .then_some(v)
    })
}

/// The JSON-RPC message of an answer, JSON or SSE.
pub(super) fn jsonrpc(answer: &Answer) -> Option<serde_json::Value> {
    if is_sse(&answer.headers) {
        jsonrpc_in_sse(&answer.body)
    } else {
        serde_json::from_slice(&answer.body).ok()
    }
}

/// The `initialize` request; `Err` for a path that is no request target.
pub(super) fn initialize(path: &str) -> Result<Request<Full<Bytes>>, String> {
    let body = serde_json::json!({
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": PROTOCOL_VERSION,
            "capabilities": {},
            "clientInfo": { "name": "mcp-tunnel-doctor", "version": env!("CARGO_PKG_VERSION") },
        },
    });
    Request::post(path)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::ACCEPT, "application/json, text/event-stream")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| format!("{path:?} is not a request path: {e}"))
}

/// The MCP revision `discover` asks for: the first without a handshake.
pub(super) const MODERN_PROTOCOL_VERSION: &str = crate::mcp::headers::MODERN_REVISION;

/// The `server/discover` request of MCP 2026-07-28, with the standard headers that revision
/// requires (a server of it refuses a request without them); `Err` for a path that is no
/// request target.
pub(super) fn discover(path: &str) -> Result<Request<Full<Bytes>>, String> {
    let body = serde_json::json!({
        "jsonrpc": "2.0",
        "id": 1,
        "method": "server/discover",
        "params": {
            "_meta": {
                "io.modelcontextprotocol/protocolVersion": MODERN_PROTOCOL_VERSION,
                "io.modelcontextprotocol/clientCapabilities": {},
                "io.modelcontextprotocol/clientInfo": { "name": "mcp-tunnel-doctor", "version": env!("CARGO_PKG_VERSION") },
            },
        },
    });
    Request::post(path)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::ACCEPT, "application/json, text/event-stream")
        .header("mcp-protocol-version", MODERN_PROTOCOL_VERSION)
        .header("mcp-method", "server/discover")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| format!("{path:?} is not a request path: {e}"))
}

/// Ends the session `initialize` opened (MCP servers keep state per `Mcp-Session-Id`).
pub(super) fn delete_session(
    path: &str,
    id: &http::HeaderValue,
) -> Result<Request<Full<Bytes>>, String> {
    Request::delete(path)
        .header("mcp-session-id", id.clone())
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())
}

/// A plain GET (resource metadata).
pub(super) fn get(path: &str) -> Result<Request<Full<Bytes>>, String> {
    Request::get(path)
        .header(http::header::ACCEPT, "application/json")
        .body(Full::new(Bytes::new()))
        .map_err(|e| format!("{path:?} is not a request path: {e}"))
}

/// The `resource_metadata` parameter of a `WWW-Authenticate` challenge (RFC 9728).
pub(super) fn resource_metadata(challenge: &str) -> Option<String> {
    let lower = challenge.to_ascii_lowercase();
    let at = lower.find("resource_metadata")?;
    let rest = challenge[at + "resource_metadata".len()..].trim_start();
    let rest = rest.strip_prefix('=')?.trim_start();
    let value = match rest.strip_prefix('"') {
        Some(q) => q.split('"').next()?,
        None => rest.split([',', ' ']).next()?,
    };
    (!value.is_empty()).then(|| value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_response_is_found_in_complete_events_only() {
        let body = b"event: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/x\"}\n\nid: 7\ndata: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"ok\":true}}\n\n";
        assert_eq!(jsonrpc_in_sse(body).unwrap()["result"]["ok"], true);
        assert!(jsonrpc_in_sse(b"data: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}\n").is_none());
        assert!(
            jsonrpc_in_sse(b"data: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}\r\n\r\n").is_some()
        );
    }

    #[test]
    fn resource_metadata_parameter() {
        assert_eq!(
            resource_metadata(
                r#"Bearer error="invalid_token", resource_metadata="https://echo.t.example/.well-known/oauth-protected-resource""#
            )
            .as_deref(),
            Some("https://echo.t.example/.well-known/oauth-protected-resource")
        );
        assert_eq!(
            resource_metadata("Bearer Resource_Metadata=http://x/y, realm=z").as_deref(),
            Some("http://x/y")
        );
        assert_eq!(resource_metadata("Bearer realm=\"x\""), None);
    }
}
