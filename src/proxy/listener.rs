//! The listener: accepts the connections cloudflared forwards, runs the peer check, answers
//! the WebSocket upgrade and hands the upgraded stream to its session (`proxy::session`).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tracing::{debug, info, warn};

use super::answer::text_response;
use super::{Proxy, ProxyError, keepalive, metrics, workers, ws};
use crate::config::Config;
use crate::lifecycle::Shutdown;

impl Proxy {
    /// Accepts tunnel connections until shutdown starts, giving each to the data-plane
    /// worker with the fewest open connections (`proxy::workers`); the connection is then
    /// served on that worker from its upgrade to its end.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: Shutdown) {
        let workers = match self.workers.get() {
            Some(w) => Some(w.clone()),
            None => match workers::Workers::start(self.worker_count, &shutdown) {
                Ok(w) => {
                    info!(workers = w.len(), "data-plane workers started");
                    Some(self.workers.get_or_init(|| w).clone())
                }
                Err(e) => {
                    warn!(error = %e, "cannot start the data-plane workers: serving on the control runtime");
                    None
                }
            },
        };
        let mut beat = tokio::time::interval(workers::BEAT);
        let mut backoff = crate::telemetry::limiter::AcceptBackoff::default();
        loop {
            let accepted = tokio::select! {
                _ = shutdown.started() => break,
                _ = beat.tick() => {
                    self.metrics.accept_loop_beats.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    continue;
                }
                a = listener.accept() => a,
            };
            match accepted {
                Ok((stream, peer)) => {
                    backoff.accepted();
                    let _ = stream.set_nodelay(true);
                    let proxy = self.clone();
                    let sd = shutdown.clone();
                    let Some(workers) = &workers else {
                        shutdown
                            .spawn(async move { proxy.serve_outer(stream, peer, sd, None).await });
                        continue;
                    };
                    // The socket moves to the worker's own I/O driver: deregistered here,
                    // registered there on the worker's thread.
                    let stream = match stream.into_std() {
                        Ok(s) => s,
                        Err(e) => {
                            debug!(%peer, error = %e, "cannot hand the connection to a worker");
                            continue;
                        }
                    };
                    let assigned = Arc::new(workers.assign());
                    let held = assigned.clone();
                    workers::spawn(&shutdown, assigned, async move {
                        match TcpStream::from_std(stream) {
                            Ok(stream) => proxy.serve_outer(stream, peer, sd, Some(held)).await,
                            Err(e) => {
                                debug!(%peer, error = %e, "worker cannot take the connection")
                            }
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors and similar: the connection stays in the listen
                    // backlog, so back off instead of spinning; sessions in flight go on.
                    let out_of_files = matches!(
                        e.raw_os_error().map(nix::errno::Errno::from_raw),
                        Some(nix::errno::Errno::EMFILE | nix::errno::Errno::ENFILE)
                    );
                    if out_of_files {
                        self.metrics.limit(metrics::LimitHit::OpenFiles);
                    }
                    let wait = backoff.failed();
                    if let Some(suppressed) = self.accept_log.permit() {
                        if out_of_files {
                            warn!(error = %e, suppressed, retry_in = ?wait, "accept failed: out of file descriptors (LimitNOFILE); new connections wait in the listen backlog, open sessions go on");
                        } else {
                            warn!(error = %e, suppressed, retry_in = ?wait, "accept failed");
                        }
                    }
                    tokio::select! {
                        _ = shutdown.started() => break,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
        debug!("listener stopped accepting");
    }

    /// Binds `config.listen_addr`.
    pub async fn bind(config: &Config) -> Result<TcpListener, ProxyError> {
        TcpListener::bind(config.listen_addr)
            .await
            .map_err(|source| ProxyError::Bind {
                addr: config.listen_addr,
                source,
            })
    }

    /// The plain HTTP/1.1 connection from cloudflared: expects a WebSocket upgrade. With the
    /// peer check on, nothing is read from a connection before its peer's owner is known.
    /// `held` keeps the worker's count of open connections up until the session ends.
    async fn serve_outer(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        shutdown: Shutdown,
        held: Option<Arc<workers::Assigned>>,
    ) {
        if let Some(gate) = &self.peer_gate
            && !gate.admit(&stream, peer, &self.metrics).await
        {
            return;
        }
        let proxy = self.clone();
        let sd = shutdown.clone();
        let svc = service_fn(move |req| {
            let proxy = proxy.clone();
            let sd = sd.clone();
            let held = held.clone();
            async move { Ok::<_, Infallible>(proxy.upgrade(req, peer, sd, held)) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(self.limits.upgrade_timeout)
            .max_buf_size(self.limits.max_header_bytes)
            .max_headers(self.limits.max_headers)
            .serve_connection(TokioIo::new(stream), svc)
            .with_upgrades();
        tokio::pin!(conn);
        // An outer connection lives until it upgrades (which ends this future) or for
        // upgrade_timeout at most: one that sends nothing is cut.
        let deadline = tokio::time::sleep(self.limits.upgrade_timeout);
        tokio::pin!(deadline);
        let result = tokio::select! {
            r = conn.as_mut() => r,
            _ = &mut deadline => {
                self.metrics.limit(metrics::LimitHit::UpgradeTimeout);
                info!(%peer, timeout = ?self.limits.upgrade_timeout, "closing listener connection: no WebSocket upgrade within limits.upgrade_timeout");
                return;
            }
            _ = shutdown.started() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = result {
            if e.is_timeout() {
                self.metrics.limit(metrics::LimitHit::UpgradeTimeout);
                info!(%peer, timeout = ?self.limits.upgrade_timeout, "closing listener connection: no WebSocket upgrade within limits.upgrade_timeout");
            } else if e.is_parse_too_large() {
                self.metrics.limit(metrics::LimitHit::HeaderTooLarge);
                info!(%peer, "refused upgrade request: header block over limits.max_header_bytes");
            } else {
                debug!(%peer, error = %e, "listener connection ended with an error");
            }
        }
    }

    fn upgrade(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        shutdown: Shutdown,
        held: Option<Arc<workers::Assigned>>,
    ) -> Response<Full<Bytes>> {
        let key = match websocket_key(&req) {
            Ok(key) => key,
            Err(why) => {
                debug!(%peer, method = %req.method(), path = req.uri().path(), why, "refused non-tunnel request");
                let mut resp = text_response(
                    StatusCode::UPGRADE_REQUIRED,
                    "This is the mcp-tunnel listener: it expects a WebSocket connection from cloudflared carrying TLS, not plain HTTP requests.\n",
                );
                resp.headers_mut()
                    .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
                resp.headers_mut().insert(
                    header::SEC_WEBSOCKET_VERSION,
                    HeaderValue::from_static("13"),
                );
                return resp;
            }
        };
        let client_ip = req
            .headers()
            .get("cf-connecting-ip")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<IpAddr>().ok())
            .unwrap_or(peer.ip());
        let Ok(permit) = self.session_permits.clone().try_acquire_owned() else {
            self.metrics.limit(metrics::LimitHit::Sessions);
            warn!(%peer, max = self.limits.max_sessions, "refused tunnel session: limits.max_sessions reached");
            return text_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "Too many tunnel sessions (limits.max_sessions)\n",
            );
        };
        let on_upgrade = hyper::upgrade::on(&mut req);
        let sd = shutdown.clone();
        let (max_message, max_frame) = (
            self.limits.max_ws_message_bytes,
            self.limits.max_ws_frame_bytes,
        );
        shutdown.spawn(async move {
            let _permit = permit;
            let _held = held;
            match on_upgrade.await {
                Ok(upgraded) => {
                    let ping = keepalive::PingState::new(
                        self.limits.ws_ping_interval,
                        self.limits.ws_pong_timeout,
                        self.metrics.keepalive.clone(),
                    );
                    let ws = ws::server::ServerStream::new(
                        TokioIo::new(upgraded),
                        max_message,
                        max_frame,
                    )
                    .with_pings(ping);
                    self.serve_session(Box::new(ws), client_ip, sd).await;
                }
                Err(e) => debug!(%peer, error = %e, "websocket upgrade failed"),
            }
        });
        let mut resp = Response::new(Full::new(Bytes::new()));
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = resp.headers_mut();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(
            header::SEC_WEBSOCKET_ACCEPT,
            HeaderValue::from_str(&key).expect("base64 is a valid header value"),
        );
        resp
    }
}

/// Checks the RFC 6455 upgrade request; returns the `Sec-WebSocket-Accept` value.
fn websocket_key(req: &Request<Incoming>) -> Result<String, &'static str> {
    let has_token = |name: header::HeaderName, token: &str| {
        req.headers().get_all(name).iter().any(|v| {
            v.to_str()
                .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
                .unwrap_or(false)
        })
    };
    if req.method() != http::Method::GET {
        return Err("not a GET");
    }
    if !has_token(header::UPGRADE, "websocket") || !has_token(header::CONNECTION, "upgrade") {
        return Err("no websocket upgrade");
    }
    if req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        return Err("unsupported websocket version");
    }
    let key = req
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or("no Sec-WebSocket-Key")?;
    Ok(derive_accept_key(key.as_bytes()))
}
