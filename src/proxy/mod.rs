//! The embedded proxy: WebSocket listener, inner TLS, routing and forwarding to upstreams.

pub mod bridge;
pub mod edge;
pub mod exchange;
mod forward;
pub mod h2;
pub mod inner_tls;
pub mod keepalive;
pub mod mcp;
pub mod metrics;
pub mod peer;
mod prefixed;
pub mod sockdiag;
pub mod state;
pub mod tls;
pub mod upstream;
pub mod workers;
pub mod ws;

/// What the data path sends upstream and answers itself, for `explain` and `doctor`.
pub use forward::{
    CONNECT_FAILED, MISDIRECTED, NO_ROUTE, NOT_ALLOWED, upstream_host, upstream_uri,
};

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tracing::{debug, info, warn};

use crate::certs::{self, CertError};
use crate::config::{Config, Limits, PeerCheck};
use crate::lifecycle::Shutdown;
use state::{ApplyReport, Snapshot, UpstreamPlane};
use tls::CertStore;
use upstream::{Resolve, SystemResolver};

/// Errors that stop the proxy from starting.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error("cannot listen on {addr} (listen_addr): {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    PeerCheck(#[from] peer::PeerCheckUnavailable),
}

/// Shared proxy state. Readers on the request path load snapshots without locking.
pub struct Proxy {
    resolver: Arc<dyn Resolve>,
    snapshot: ArcSwap<Snapshot>,
    upstream: ArcSwap<UpstreamPlane>,
    certs: Arc<CertStore>,
    /// Inner TLS: the certificate comes from `certs` at each handshake.
    server_tls: Arc<rustls::ServerConfig>,
    /// Serialises reloads so two never interleave their lease bookkeeping.
    apply_lock: tokio::sync::Mutex<()>,
    /// `[limits]`, fixed at start (changing them needs a restart).
    limits: Limits,
    /// One permit per open tunnel connection (`limits.max_sessions`).
    session_permits: Arc<tokio::sync::Semaphore>,
    metrics: Arc<metrics::ProxyMetrics>,
    /// `[peer_check]` on: who may connect to the listener (fixed at start).
    peer_gate: Option<peer::PeerGate>,
    /// How many data-plane workers `serve` starts (`workers`, fixed at start).
    worker_count: usize,
    /// The data-plane workers, once `serve` has started them.
    workers: std::sync::OnceLock<Arc<workers::Workers>>,
}

impl Proxy {
    /// Builds the proxy from a validated config: loads the server pair and upstream trust.
    pub fn new(config: &Config) -> Result<Arc<Proxy>, ProxyError> {
        Proxy::with_resolver(config, Arc::new(SystemResolver))
    }

    /// As `new`, with a chosen resolver (tests use it to play DNS).
    pub fn with_resolver(
        config: &Config,
        resolver: Arc<dyn Resolve>,
    ) -> Result<Arc<Proxy>, ProxyError> {
        let pair = certs::load_server_pair(&config.tls)?;
        Proxy::with_pair(config, pair, resolver)
    }

    /// As `with_resolver`, presenting a pair the caller already loaded and checked (`run`
    /// preflights it), so the file is read once and what is presented is what was checked.
    pub fn with_pair(
        config: &Config,
        pair: Arc<rustls::sign::CertifiedKey>,
        resolver: Arc<dyn Resolve>,
    ) -> Result<Arc<Proxy>, ProxyError> {
        let peer_gate = match config.peer_check {
            PeerCheck::On { allow_root } => {
                Some(peer::PeerGate::new(allow_root, config.listen_addr.ip())?)
            }
            PeerCheck::Off(_) => None,
        };
        let certs = Arc::new(CertStore::new(pair));
        let worker_count = workers::count(config.workers);
        let upstream = ArcSwap::from_pointee(UpstreamPlane::new(
            &config.upstream,
            &resolver,
            worker_count,
        )?);
        let proxy = Proxy {
            resolver,
            snapshot: ArcSwap::from_pointee(Snapshot::new(config)),
            upstream,
            server_tls: tls::server_config(certs.clone()),
            certs,
            apply_lock: tokio::sync::Mutex::new(()),
            limits: config.limits.clone(),
            session_permits: Arc::new(tokio::sync::Semaphore::new(config.limits.max_sessions)),
            metrics: Arc::default(),
            peer_gate,
            worker_count,
            workers: std::sync::OnceLock::new(),
        };
        for route in config.route_table().iter() {
            info!(route = %route.name, upstream = %route.upstream, preserve_host = route.preserve_host, "route configured");
        }
        Ok(Arc::new(proxy))
    }

    /// Replaces routes and upstream policy with those of `config`. Requests in flight keep
    /// what they started with; streams on routes that were removed, changed, or are no longer
    /// allowed are closed, each logged; every other stream is untouched.
    pub async fn apply(&self, config: &Config) -> Result<ApplyReport, ProxyError> {
        let _serial = self.apply_lock.lock().await;
        let old_plane = self.upstream.load_full();
        let policy_changed = old_plane.config != config.upstream;
        let plane = if policy_changed {
            Arc::new(UpstreamPlane::new(
                &config.upstream,
                &self.resolver,
                self.worker_count,
            )?)
        } else {
            old_plane
        };
        let old = self.snapshot.load_full();
        let (next, cancel, report) =
            state::next_snapshot(&old, config, &plane, policy_changed).await;
        self.upstream.store(plane);
        self.snapshot.store(Arc::new(next));
        for closed in &report.closed {
            warn!(route = %closed.route, reason = %closed.reason, "closing the route's open streams");
        }
        for lease in cancel {
            lease.cancel();
        }
        for name in &report.added {
            info!(route = %name, "route configured");
        }
        for name in &report.removed {
            info!(route = %name, "route removed");
        }
        Ok(report)
    }

    /// The routes served now (after the last applied reload), for the status page.
    pub fn routes(&self) -> Vec<Arc<crate::config::Route>> {
        let mut routes: Vec<_> = self.snapshot.load().routes.iter().cloned().collect();
        routes.sort_by(|a, b| a.name.cmp(&b.name));
        routes
    }

    /// Request, refusal and session counters (for `/metrics` and the watchdog).
    pub fn metrics(&self) -> &Arc<metrics::ProxyMetrics> {
        &self.metrics
    }

    /// The peer check, when `[peer_check]` is on: who may connect to the listener.
    pub fn peer_gate(&self) -> Option<&peer::PeerGate> {
        self.peer_gate.as_ref()
    }

    /// The certificate store, for rotation.
    pub fn cert_store(&self) -> &Arc<CertStore> {
        &self.certs
    }

    /// The data-plane workers, once serving (for the watchdog and `/metrics`).
    pub fn workers(&self) -> Option<&Arc<workers::Workers>> {
        self.workers.get()
    }

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
                    // Out of file descriptors and similar: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
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
    async fn serve_session<S>(self: Arc<Self>, stream: S, client_ip: IpAddr, shutdown: Shutdown)
    where
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
        let activity = Arc::new(forward::Activity::new(self.metrics.clone()));
        let session = Arc::new(forward::Session {
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
        activity: &forward::Activity,
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
        activity: &forward::Activity,
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
struct SessionService(Arc<forward::Session>);

impl hyper::service::Service<Request<Incoming>> for SessionService {
    type Response = Response<forward::ProxyBody>;
    type Error = Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>,
    >;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        Box::pin(self.0.clone().handle(req))
    }
}

/// Resolves once the session has been idle for `idle` (no request in flight or started).
async fn idle_wait(activity: &forward::Activity, idle: Duration) {
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
    activity: &forward::Activity,
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

pub(crate) fn text_response(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
