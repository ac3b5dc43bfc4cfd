//! The embedded proxy: WebSocket listener, inner TLS, routing and forwarding to upstreams.

pub mod bridge;
pub mod edge;
mod forward;
pub mod metrics;
pub mod state;
pub mod tls;
pub mod upstream;
pub mod ws;

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
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tracing::{debug, info, warn};

use crate::certs::{self, CertError};
use crate::config::Config;
use crate::lifecycle::Shutdown;
use state::{ApplyReport, Snapshot, UpstreamPlane};
use tls::CertStore;
use upstream::{Resolve, SystemResolver};

/// Time allowed for the inner TLS handshake once the WebSocket is up.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

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
}

/// Shared proxy state. Readers on the request path load snapshots without locking.
pub struct Proxy {
    resolver: Arc<dyn Resolve>,
    snapshot: ArcSwap<Snapshot>,
    upstream: ArcSwap<UpstreamPlane>,
    certs: Arc<CertStore>,
    acceptor: TlsAcceptor,
    /// Serialises reloads so two never interleave their lease bookkeeping.
    apply_lock: tokio::sync::Mutex<()>,
    metrics: Arc<metrics::ProxyMetrics>,
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
        let certs = Arc::new(CertStore::new(pair));
        let upstream = ArcSwap::from_pointee(UpstreamPlane::new(&config.upstream, &resolver)?);
        let proxy = Proxy {
            resolver,
            snapshot: ArcSwap::from_pointee(Snapshot::new(config)),
            upstream,
            acceptor: TlsAcceptor::from(tls::server_config(certs.clone())),
            certs,
            apply_lock: tokio::sync::Mutex::new(()),
            metrics: Arc::default(),
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
            Arc::new(UpstreamPlane::new(&config.upstream, &self.resolver)?)
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

    /// Request, refusal and session counters (for `/metrics` and the watchdog).
    pub fn metrics(&self) -> &Arc<metrics::ProxyMetrics> {
        &self.metrics
    }

    /// The certificate store, for rotation.
    pub fn cert_store(&self) -> &Arc<CertStore> {
        &self.certs
    }

    /// Accepts tunnel connections until shutdown starts.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: Shutdown) {
        let mut beat = tokio::time::interval(Duration::from_millis(250));
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
                    shutdown.spawn(async move { proxy.serve_outer(stream, peer, sd).await });
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

    /// The plain HTTP/1.1 connection from cloudflared: expects a WebSocket upgrade.
    async fn serve_outer(self: Arc<Self>, stream: TcpStream, peer: SocketAddr, shutdown: Shutdown) {
        let proxy = self.clone();
        let sd = shutdown.clone();
        let svc = service_fn(move |req| {
            let proxy = proxy.clone();
            let sd = sd.clone();
            async move { Ok::<_, Infallible>(proxy.upgrade(req, peer, sd)) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(Duration::from_secs(30))
            .serve_connection(TokioIo::new(stream), svc)
            .with_upgrades();
        tokio::pin!(conn);
        let result = tokio::select! {
            r = conn.as_mut() => r,
            _ = shutdown.started() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = result {
            debug!(%peer, error = %e, "listener connection ended with an error");
        }
    }

    fn upgrade(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        shutdown: Shutdown,
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
        let on_upgrade = hyper::upgrade::on(&mut req);
        let sd = shutdown.clone();
        shutdown.spawn(async move {
            match on_upgrade.await {
                Ok(upgraded) => {
                    let ws = WebSocketStream::from_raw_socket(
                        TokioIo::new(upgraded),
                        Role::Server,
                        Some(ws::session_config()),
                    )
                    .await;
                    self.serve_session(ws::WsByteStream::new(ws), client_ip, sd)
                        .await;
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
        let ws =
            WebSocketStream::from_raw_socket(io, Role::Server, Some(ws::session_config())).await;
        self.serve_session(ws::WsByteStream::new(ws), client_ip, shutdown)
            .await;
    }

    /// One tunnel session: inner TLS, then HTTP/1.1 or h2 with keep-alive.
    async fn serve_session<S>(self: Arc<Self>, stream: S, client_ip: IpAddr, shutdown: Shutdown)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let tls =
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, self.acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    warn!(client = %client_ip, error = %e, "tls handshake failed");
                    return;
                }
                Err(_) => {
                    warn!(client = %client_ip, error = "timed out", "tls handshake failed");
                    return;
                }
            };
        let _open = self.metrics.session();
        let sni = tls.get_ref().1.server_name().map(str::to_owned);
        let session = Arc::new(forward::Session {
            proxy: self.clone(),
            sni,
            client_ip,
        });
        let svc = service_fn(move |req| session.clone().handle(req));
        let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        let conn = builder.serve_connection(TokioIo::new(tls), svc);
        tokio::pin!(conn);
        let result = tokio::select! {
            r = conn.as_mut() => r,
            _ = shutdown.started() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = result {
            debug!(client = %client_ip, error = %e, "tunnel session ended with an error");
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
