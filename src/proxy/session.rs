//! One tunnel session, on the worker it was given to: inner TLS, then HTTP/1.1 or h2, each
//! request served by `forward` in the session's task.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tracing::{debug, info, warn};

use super::activity::Activity;
use super::body::ProxyBody;
use super::{Proxy, h2, inner_tls, metrics, prefixed, ws};
use crate::lifecycle::Shutdown;

impl Proxy {
    /// Serves one tunnel session on a connection whose WebSocket upgrade has already been
    /// answered: WebSocket framing, inner TLS, then HTTP. The listener reaches the same path
    /// after its upgrade; the `inner_http` fuzz target drives it over an in-memory pipe.
    pub async fn serve_websocket<S>(self: Arc<Self>, io: S, client_ip: IpAddr, shutdown: Shutdown)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let limits = crate::config::Limits::default();
        let ws = ws::server::ServerStream::new(
            io,
            limits.max_ws_message_bytes,
            limits.max_ws_frame_bytes,
        );
        self.serve_session(ws, client_ip, shutdown).await;
    }

    /// One tunnel session: inner TLS, then HTTP/1.1 or h2 with keep-alive.
    pub(super) async fn serve_session<S>(
        self: Arc<Self>,
        stream: S,
        client_ip: IpAddr,
        shutdown: Shutdown,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        // Boxed: its state is gone once the handshake is done, not kept in the task.
        let handshake = Box::pin(tokio::time::timeout(
            self.limits.tls_handshake_timeout,
            inner_tls::InnerTls::accept(stream, self.server_tls.clone()),
        ));
        let tls = match handshake.await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                if e.get_ref().is_some_and(|inner| inner.is::<ws::TooBig>()) {
                    self.metrics.limit(metrics::LimitHit::WsMessageTooLarge);
                }
                warn!(client = %client_ip, error = %e, "tls handshake failed");
                return;
            }
            Err(_) => {
                self.metrics.limit(metrics::LimitHit::TlsHandshakeTimeout);
                warn!(client = %client_ip, error = "no handshake within limits.tls_handshake_timeout", "tls handshake failed");
                return;
            }
        };
        // Boxed: a session's futures then carry a pointer, not copies of the TLS stream
        // (async fns keep their by-value arguments twice: rust-lang/rust#62958).
        let tls = Box::new(tls);
        let _open = self.metrics.session();
        let sni = tls.server_name().map(str::to_owned);
        let activity = Arc::new(Activity::new(self.metrics.clone()));
        let session = Arc::new(Session {
            proxy: self.clone(),
            sni,
            client_ip,
            client_ip_value: HeaderValue::from_str(&client_ip.to_string())
                .expect("an IP address is a valid header value"),
            activity: activity.clone(),
        });
        let svc = SessionService(session.clone());
        let alpn = tls.alpn_protocol();
        let result = if alpn == Some(b"http/1.1".as_slice()) {
            self.serve_h1(tls, svc, &activity, client_ip, &shutdown)
                .await
                .map_err(Into::into)
        } else if alpn == Some(b"h2".as_slice()) {
            // HTTP/2 only once ALPN said so: no fallback to HTTP/1.1 on other first bytes.
            // Boxed: h2 sessions are few, and their state (the preface wait included) stays
            // out of every other session's task.
            let timeout = self.limits.request_header_timeout;
            match Box::pin(tokio::time::timeout(timeout, h2::read_preface(tls))).await {
                Ok(Ok(io)) => {
                    Box::pin(self.serve_auto(io, svc, &activity, client_ip, &shutdown, true)).await
                }
                Ok(Err(e)) => Err(e.into()),
                Err(_) => {
                    self.metrics.limit(metrics::LimitHit::HeaderTimeout);
                    info!(client = %client_ip, "closed tunnel session: no HTTP/2 preface within limits.request_header_timeout");
                    return;
                }
            }
        } else {
            Box::pin(self.serve_auto(tls, svc, &activity, client_ip, &shutdown, false)).await
        };
        if let Err(e) = result {
            self.session_error(e.as_ref(), client_ip);
        }
    }

    /// An HTTP/1.1 session (the edge's usual ALPN). Between requests it keeps no HTTP state:
    /// once nothing has been in flight for [`H1_QUIET`], hyper's connection is closed
    /// without closing the stream (`poll_without_shutdown`, `into_parts`), freeing its read
    /// and write buffers (about half of what an idle session held; BENCHMARKS.md (c)), and
    /// the next bytes that arrive, with whatever hyper had read ahead, start a new one.
    async fn serve_h1<I>(
        &self,
        io: I,
        svc: SessionService,
        activity: &Activity,
        client_ip: IpAddr,
        shutdown: &Shutdown,
    ) -> Result<(), hyper::Error>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let idle = self.limits.idle_session_timeout;
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(self.limits.request_header_timeout)
            .max_buf_size(self.limits.max_header_bytes)
            .max_headers(self.limits.max_headers);
        let mut io = prefixed::Prefixed::new(io, Bytes::new());
        loop {
            // Boxed: hyper's connection and this pass's futures take room only while a
            // request may be in flight, not in every idle session's task.
            let conn = builder.serve_connection(TokioIo::new(io), svc.clone());
            let Some(rest) = Box::pin(h1_pass(conn, activity, shutdown)).await? else {
                // The client closed the stream (or sent `Connection: close`), or shutdown.
                return Ok(());
            };
            let (inner, read_ahead) = (rest.io.into_inner(), rest.read_buf);
            io = inner;
            if !read_ahead.is_empty() {
                io.set_prefix(read_ahead);
                continue;
            }
            // No HTTP state until the next bytes arrive (WebSocket pings keep running
            // inside the stream's reads). A small first read: this buffer is part of every
            // idle session's task; the rest of the request stays in the TLS layer for hyper.
            let mut first = [0u8; 128];
            let n = tokio::select! {
                r = tokio::io::AsyncReadExt::read(&mut io, &mut first) => match r {
                    Ok(n) => n,
                    Err(e) => {
                        debug!(client = %client_ip, error = %e, "tunnel session ended while idle");
                        0
                    }
                },
                _ = shutdown.started() => 0,
                _ = idle_wait(activity, idle) => {
                    self.metrics.limit(metrics::LimitHit::IdleSession);
                    debug!(client = %client_ip, timeout = ?idle, "closing idle tunnel session (limits.idle_session_timeout)");
                    0
                }
            };
            if n == 0 {
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut io).await;
                return Ok(());
            }
            io.set_prefix(Bytes::copy_from_slice(&first[..n]));
        }
    }

    /// Any other session: h2 (`h2_only`, its preface already checked), or no ALPN, where
    /// hyper-util's auto server picks the protocol from the first bytes.
    async fn serve_auto<I>(
        &self,
        io: I,
        svc: SessionService,
        activity: &Activity,
        client_ip: IpAddr,
        shutdown: &Shutdown,
        h2_only: bool,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        if h2_only {
            builder = builder.http2_only();
        }
        builder
            .http1()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(self.limits.request_header_timeout)
            .max_buf_size(self.limits.max_header_bytes)
            .max_headers(self.limits.max_headers);
        builder
            .http2()
            .timer(hyper_util::rt::TokioTimer::new())
            .max_concurrent_streams(self.limits.max_streams_per_session)
            .max_header_list_size(self.limits.max_header_bytes as u32);
        let conn = builder.serve_connection(TokioIo::new(io), svc);
        tokio::pin!(conn);
        let idle = self.limits.idle_session_timeout;
        tokio::select! {
            r = conn.as_mut() => return r,
            _ = shutdown.started() => {}
            _ = idle_wait(activity, idle) => {
                self.metrics.limit(metrics::LimitHit::IdleSession);
                debug!(client = %client_ip, timeout = ?idle, "closing idle tunnel session (limits.idle_session_timeout)");
            }
        }
        conn.as_mut().graceful_shutdown();
        conn.await
    }

    /// Counts and logs why a session ended early (a limit, or an error worth a debug line).
    fn session_error(
        &self,
        e: &(dyn std::error::Error + Send + Sync + 'static),
        client_ip: IpAddr,
    ) {
        match e.downcast_ref::<hyper::Error>() {
            Some(h) if h.is_timeout() => {
                self.metrics.limit(metrics::LimitHit::HeaderTimeout);
                info!(client = %client_ip, "closed tunnel session: request headers not received within limits.request_header_timeout");
            }
            Some(h) if h.is_parse_too_large() => {
                self.metrics.limit(metrics::LimitHit::HeaderTooLarge);
                info!(client = %client_ip, "refused request: header block over limits.max_header_bytes");
            }
            _ if std::error::Error::source(e).is_some_and(|s| s.is::<ws::TooBig>())
                || e.to_string().contains("websocket message too large") =>
            {
                self.metrics.limit(metrics::LimitHit::WsMessageTooLarge);
                info!(client = %client_ip, "closed tunnel session: WebSocket message over limits.max_ws_message_bytes (close code 1009)");
            }
            _ if matches!(
                e.downcast_ref::<h2::PrefaceError>(),
                Some(h2::PrefaceError::Invalid)
            ) =>
            {
                info!(client = %client_ip, "closed tunnel session: ALPN agreed h2 but the client did not send the HTTP/2 preface (GOAWAY PROTOCOL_ERROR sent)");
            }
            _ => debug!(client = %client_ip, error = %e, "tunnel session ended with an error"),
        }
    }
}

/// How long an HTTP/1.1 session keeps hyper's connection (and its buffers) after its last
/// response: long enough that a burst of requests (an MCP client's initialize, list,
/// calls) runs on one, short enough that a session waiting for the next tool call holds
/// only its TLS and WebSocket state.
pub const H1_QUIET: Duration = Duration::from_secs(1);

/// The session's requests as a hyper service. Its futures are boxed: `serve_h1` starts a
/// new connection per burst, and `poll_without_shutdown` wants an `Unpin` future.
#[derive(Clone)]
struct SessionService(Arc<Session>);

impl hyper::service::Service<Request<Incoming>> for SessionService {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>,
    >;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        Box::pin(self.0.clone().handle(req))
    }
}

/// Resolves once the session has been idle for `idle` (no request in flight or started).
async fn idle_wait(activity: &Activity, idle: Duration) {
    loop {
        tokio::time::sleep(activity.time_to_idle(idle)).await;
        if activity.is_idle(idle) {
            return;
        }
    }
}

/// One HTTP/1.1 connection of a session, until the client closes the stream (`None`),
/// shutdown (`None`, after in-flight requests), or [`H1_QUIET`] without a request: then
/// hyper lets go of the stream (`Some`, with what it had read ahead). The upstream
/// exchange runs inside this connection's service and body polls (`proxy::exchange`), so
/// a request is served start to end in the session's task.
async fn h1_pass<I>(
    mut conn: hyper::server::conn::http1::Connection<TokioIo<I>, SessionService>,
    activity: &Activity,
    shutdown: &Shutdown,
) -> Result<Option<hyper::server::conn::http1::Parts<TokioIo<I>, SessionService>>, hyper::Error>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::select! {
        r = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)) => r.map(|()| None),
        _ = shutdown.started() => {
            std::pin::Pin::new(&mut conn).graceful_shutdown();
            std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)).await.map(|()| None)
        }
        _ = idle_wait(activity, H1_QUIET) => {
            std::pin::Pin::new(&mut conn).graceful_shutdown();
            std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)).await?;
            Ok(Some(conn.into_parts()))
        }
    }
}

/// Per-session facts every request of the session shares.
pub struct Session {
    pub proxy: Arc<Proxy>,
    /// Server name the client asked for in the inner TLS handshake.
    pub sni: Option<String>,
    /// The caller as cloudflared reports it (`Cf-Connecting-Ip`), else the TCP peer.
    pub client_ip: IpAddr,
    /// `client_ip` as an `X-Forwarded-For` value, formatted once per session.
    pub client_ip_value: HeaderValue,
    pub activity: Arc<Activity>,
}
