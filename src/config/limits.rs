//! `[limits]`: every resource an outsider can make the proxy hold is bounded here, with
//! defaults safe for an appliance facing the internet through the edge.

use std::time::Duration;

use serde::Deserialize;

use super::{Validator, duration};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    max_sessions: Option<usize>,
    max_streams_per_session: Option<u32>,
    max_ws_message_bytes: Option<usize>,
    max_ws_frame_bytes: Option<usize>,
    max_header_bytes: Option<usize>,
    max_headers: Option<usize>,
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    upgrade_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    tls_handshake_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    request_header_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    idle_session_timeout: Option<Duration>,
    max_request_body_bytes: Option<u64>,
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    ws_ping_interval: Option<Duration>,
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    ws_pong_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    sse_keepalive_interval: Option<Duration>,
}

/// Validated `[limits]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Concurrent tunnel sessions (WebSocket connections); more are refused with 503.
    pub max_sessions: usize,
    /// Concurrent h2 streams in one session (`max_concurrent_streams`).
    pub max_streams_per_session: u32,
    /// Largest WebSocket message and frame accepted (close code 1009 beyond).
    pub max_ws_message_bytes: usize,
    pub max_ws_frame_bytes: usize,
    /// Largest request header block, outer and inner (431 / connection closed beyond).
    pub max_header_bytes: usize,
    /// Most request header fields in one HTTP/1.1 request.
    pub max_headers: usize,
    /// Time for the WebSocket upgrade request's headers to arrive.
    pub upgrade_timeout: Duration,
    /// Time for the inner TLS handshake once the WebSocket is up.
    pub tls_handshake_timeout: Duration,
    /// Time for a request's headers to arrive once its first byte has (slowloris), and for
    /// the first request after the handshake.
    pub request_header_timeout: Duration,
    /// A session with no request in flight and no traffic for this long is closed; a
    /// session with a streaming response (SSE) is never idle.
    pub idle_session_timeout: Duration,
    /// Largest request body forwarded (413 beyond); `None`: no limit (MCP uploads can be large).
    pub max_request_body_bytes: Option<u64>,
    /// A session that carried no bytes for this long gets a WebSocket ping, so that no
    /// intermediary cuts it as idle (Cloudflare's after ~100 s, many load balancers after 60 s).
    pub ws_ping_interval: Duration,
    /// No frame back within this long after a ping: the peer is gone, the session closes.
    pub ws_pong_timeout: Duration,
    /// An SSE response idle for this long gets a `: keepalive` comment at an event boundary.
    pub sse_keepalive_interval: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_sessions: 16_384,
            max_streams_per_session: 100,
            max_ws_message_bytes: 4 << 20,
            max_ws_frame_bytes: 4 << 20,
            max_header_bytes: 64 << 10,
            max_headers: 100,
            upgrade_timeout: Duration::from_secs(10),
            tls_handshake_timeout: Duration::from_secs(10),
            request_header_timeout: Duration::from_secs(30),
            idle_session_timeout: Duration::from_secs(300),
            max_request_body_bytes: None,
            ws_ping_interval: Duration::from_secs(30),
            ws_pong_timeout: Duration::from_secs(20),
            sse_keepalive_interval: Duration::from_secs(30),
        }
    }
}

pub(super) fn validate(raw: RawLimits, v: &mut Validator) -> Limits {
    let d = Limits::default();
    let mut positive = |field: &str, value: Option<usize>, default: usize| -> usize {
        match value {
            Some(0) => {
                v.push(&format!("limits.{field}"), "expected a number above zero");
                default
            }
            Some(n) => n,
            None => default,
        }
    };
    let max_sessions = positive("max_sessions", raw.max_sessions, d.max_sessions);
    let max_streams = positive(
        "max_streams_per_session",
        raw.max_streams_per_session.map(|n| n as usize),
        d.max_streams_per_session as usize,
    ) as u32;
    let max_ws_message_bytes = positive(
        "max_ws_message_bytes",
        raw.max_ws_message_bytes,
        d.max_ws_message_bytes,
    );
    let max_ws_frame_bytes = positive(
        "max_ws_frame_bytes",
        raw.max_ws_frame_bytes,
        d.max_ws_frame_bytes,
    );
    let max_header_bytes = positive("max_header_bytes", raw.max_header_bytes, d.max_header_bytes);
    let max_headers = positive("max_headers", raw.max_headers, d.max_headers);
    // TLS records are up to 16 KiB + overhead: a smaller message limit would break the session.
    if max_ws_message_bytes < 32 << 10 {
        v.push(
            "limits.max_ws_message_bytes",
            "expected at least 32768 (one TLS record must fit in a message)",
        );
    }
    if max_ws_frame_bytes > max_ws_message_bytes {
        v.push(
            "limits.max_ws_frame_bytes",
            "expected at most limits.max_ws_message_bytes",
        );
    }
    if max_header_bytes < 8192 {
        v.push(
            "limits.max_header_bytes",
            "expected at least 8192 (hyper's minimum read buffer)",
        );
    }
    let mut nonzero = |field: &str, value: Option<Duration>, default: Duration| match value {
        Some(z) if z.is_zero() => {
            v.push(
                &format!("limits.{field}"),
                "expected a duration above zero such as \"10s\"",
            );
            default
        }
        Some(t) => t,
        None => default,
    };
    let limits = Limits {
        max_sessions,
        max_streams_per_session: max_streams,
        max_ws_message_bytes,
        max_ws_frame_bytes,
        max_header_bytes,
        max_headers,
        upgrade_timeout: nonzero("upgrade_timeout", raw.upgrade_timeout, d.upgrade_timeout),
        tls_handshake_timeout: nonzero(
            "tls_handshake_timeout",
            raw.tls_handshake_timeout,
            d.tls_handshake_timeout,
        ),
        request_header_timeout: nonzero(
            "request_header_timeout",
            raw.request_header_timeout,
            d.request_header_timeout,
        ),
        idle_session_timeout: nonzero(
            "idle_session_timeout",
            raw.idle_session_timeout,
            d.idle_session_timeout,
        ),
        max_request_body_bytes: raw.max_request_body_bytes,
        ws_ping_interval: nonzero("ws_ping_interval", raw.ws_ping_interval, d.ws_ping_interval),
        ws_pong_timeout: nonzero("ws_pong_timeout", raw.ws_pong_timeout, d.ws_pong_timeout),
        sse_keepalive_interval: nonzero(
            "sse_keepalive_interval",
            raw.sse_keepalive_interval,
            d.sse_keepalive_interval,
        ),
    };
    if limits.max_request_body_bytes == Some(0) {
        v.push(
            "limits.max_request_body_bytes",
            "expected a number above zero, or remove the field for no limit",
        );
    }
    limits
}
