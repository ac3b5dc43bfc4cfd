//! One request inside a tunnel session: route, check, forward, stream back.

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::exchange::{self, ResponseBody, SendError};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::{debug, info, warn};

use super::keepalive::SseKeepalive;
use super::mcp::{self, Exchange, Inspected, ResponseInspector};
use super::metrics::{LimitHit, Refusal, UpstreamOutcome};
use super::state::Snapshot;
use super::upstream::{ConnectError, find_connect_error};
use super::{Proxy, text_response};
use crate::config::Route;

/// The proxy's own answers that `doctor` tells apart from an upstream's.
pub const NO_ROUTE: &str = "No route configured for host\n";
pub const MISDIRECTED: &str =
    "Misdirected request: the TLS server name and the Host header name different routes\n";
pub const NOT_ALLOWED: &str =
    "Upstream address not allowed: the upstream resolved outside upstream.allowed_ips\n";
pub const CONNECT_FAILED: &str = "Upstream connection failed\n";

/// Where a request on `route` goes: the upstream's scheme and authority with the caller's
/// path and query untouched (`explain` shows it; the data path sends the path and query on
/// a connection to that authority, `exchange::send`).
pub fn upstream_uri(route: &Route, path_and_query: &str) -> Uri {
    Uri::builder()
        .scheme(route.upstream.scheme.as_str())
        .authority(route.upstream.authority().as_str())
        .path_and_query(path_and_query)
        .build()
        .expect("validated upstream and an existing path form a URI")
}

/// The `Host` sent upstream for a request that arrived for `host`: the caller's with
/// `preserve_host`, else the upstream's own `host:port` (DNS-rebinding protection in MCP
/// servers answers 421 to a foreign Host).
pub fn upstream_host(route: &Route, host: &str) -> String {
    if route.preserve_host {
        host.to_string()
    } else {
        route.upstream.authority()
    }
}

/// Response body: the upstream's, streamed under its route's lease, or a short one of the
/// proxy's own.
pub type ProxyBody = Either<LeasedBody, Full<Bytes>>;

/// An upstream response body that ends with an error (aborting the stream towards the
/// client) once its route's lease is cancelled by a reload.
pub struct LeasedBody {
    inner: ResponseBody,
    /// The route's lease; a waiter is registered on it only once the body has to wait for
    /// the upstream (most JSON answers never do, so they never touch the lease's lock).
    lease: CancellationToken,
    revoked: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    /// For `text/event-stream` responses: comments while the stream is idle.
    keepalive: Option<SseKeepalive>,
    /// On inspected routes: reads (and with a policy, filters) the body as it streams.
    mcp: Option<Box<ResponseInspector>>,
    /// Keeps the session busy (never idle-closed) while the response streams.
    _active: ActiveGuard,
    /// The request's access-log line, written when the body is done with.
    access: Option<Access>,
    /// Body bytes passed on so far, and whether the body reached its end.
    bytes: u64,
    ended: bool,
}

/// What the one access-log line per request says: written when the response is done with
/// (its body ended, failed or was dropped), so an SSE stream's line carries its whole
/// duration and size.
pub struct Access {
    route: Arc<Route>,
    method: Method,
    path: String,
    caller: IpAddr,
    status: StatusCode,
    start: Instant,
}

impl Access {
    fn write(&self, bytes: u64, complete: bool) {
        // Microsecond resolution: `2.669`, not `2.6690479999999996`.
        let duration_ms = self.start.elapsed().as_micros() as f64 / 1000.0;
        if complete {
            info!(route = %self.route.name, method = %self.method, path = %self.path, caller = %self.caller, status = self.status.as_u16(), duration_ms, bytes, "request completed");
        } else {
            info!(route = %self.route.name, method = %self.method, path = %self.path, caller = %self.caller, status = self.status.as_u16(), duration_ms, bytes, aborted = true, "request completed");
        }
    }
}

impl Drop for LeasedBody {
    fn drop(&mut self) {
        if let Some(a) = self.access.take() {
            let complete = self.ended || self.is_end_stream();
            a.write(self.bytes, complete);
        }
    }
}

/// A request body as received, or capped at `max_request_body_bytes`.
pub type RequestBody = Either<Incoming, Limited<Incoming>>;

/// A request body on its way upstream: as received (perhaps capped), or through MCP
/// inspection (`proxy::mcp`) on routes that ask for it.
pub type UpstreamBody = mcp::ForwardBody<RequestBody>;

/// What the idle-session timer looks at: requests whose response has not finished streaming,
/// and the last time one started or finished.
pub struct Activity {
    in_flight: AtomicUsize,
    last_ms: AtomicU64,
    epoch: Instant,
    /// The process-wide gauge of requests in flight (until their response body ends).
    metrics: Arc<super::metrics::ProxyMetrics>,
}

impl Activity {
    pub fn new(metrics: Arc<super::metrics::ProxyMetrics>) -> Activity {
        Activity {
            in_flight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            metrics,
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Marks a request in flight until the guard (moved into its response body) drops.
    pub fn begin(self: &Arc<Self>) -> ActiveGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.metrics.stream_started();
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
        ActiveGuard(self.clone())
    }

    /// Idle: nothing in flight and no request started or finished for `idle`.
    pub fn is_idle(&self, idle: Duration) -> bool {
        self.in_flight.load(Ordering::Relaxed) == 0
            && self
                .now_ms()
                .saturating_sub(self.last_ms.load(Ordering::Relaxed))
                >= idle.as_millis() as u64
    }

    /// How long until the session could be idle, if nothing happens meanwhile.
    pub fn time_to_idle(&self, idle: Duration) -> Duration {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return idle;
        }
        let quiet = self
            .now_ms()
            .saturating_sub(self.last_ms.load(Ordering::Relaxed));
        idle.saturating_sub(Duration::from_millis(quiet))
            .max(Duration::from_millis(10))
    }
}

/// One request in flight (see `Activity`).
pub struct ActiveGuard(Arc<Activity>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.last_ms.store(self.0.now_ms(), Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.stream_ended();
    }
}

/// The stream was closed because its route was removed or is no longer allowed.
#[derive(Debug, thiserror::Error)]
#[error("stream closed: its route was removed, changed or is no longer allowed")]
pub struct RouteRevoked;

/// Why a forwarded body ended early.
type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// The inspector's view of the upstream body: what it passes on (rewritten where its policy
/// says so), frame by frame.
fn poll_inspected(
    ins: &mut ResponseInspector,
    inner: &mut ResponseBody,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
    loop {
        if let Some(data) = ins.next_ready() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if ins.finished() {
            return Poll::Ready(None);
        }
        match std::task::ready!(Pin::new(&mut *inner).poll_frame(cx)) {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    ins.on_data(data);
                    // A body of known length may not be polled to its end.
                    if inner.is_end_stream() {
                        ins.on_end();
                    }
                }
                Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
            },
            Some(Err(e)) => return Poll::Ready(Some(Err(e))),
            None => ins.on_end(),
        }
    }
}

impl Body for LeasedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let revoked = match this.revoked.as_mut() {
            Some(waiter) => waiter.as_mut().poll(cx).is_ready(),
            None => this.lease.is_cancelled(),
        };
        if revoked {
            return Poll::Ready(Some(Err(Box::new(RouteRevoked))));
        }
        let polled = match this.mcp.as_deref_mut() {
            None => Pin::new(&mut this.inner).poll_frame(cx).map_err(Into::into),
            Some(ins) => poll_inspected(ins, &mut this.inner, cx),
        };
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                    if let Some(k) = this.keepalive.as_mut() {
                        k.observe(data);
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(other) => Poll::Ready(other),
            Poll::Pending => {
                if this.revoked.is_none() {
                    let mut waiter = Box::pin(this.lease.clone().cancelled_owned());
                    if waiter.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Some(Err(Box::new(RouteRevoked))));
                    }
                    this.revoked = Some(waiter);
                }
                match this.keepalive.as_mut() {
                    Some(k) => k.poll_comment(cx).map(|c| Some(Ok(Frame::data(c)))),
                    None => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.mcp {
            None => self.inner.is_end_stream(),
            Some(ins) => ins.is_drained(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.mcp {
            _ if self.keepalive.is_some() => SizeHint::default(),
            Some(ins) if ins.rewrites() => SizeHint::default(),
            _ => self.inner.size_hint(),
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

/// Whether a response is an SSE stream (`text/event-stream`, parameters ignored) of open
/// length, so that keepalive comments may be added to it.
fn is_event_stream(h: &http::HeaderMap) -> bool {
    !h.contains_key(http::header::CONTENT_LENGTH)
        && h.get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("text/event-stream"))
}

/// Bound of `Session::handle`'s future in the test (debug) build: 4232 bytes when it was
/// set; a guard against growth, not yet the small future issue 21 asks for.
#[cfg(test)]
const HANDLE_FUTURE_MAX: usize = 4608;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Headers that describe one hop and must not be forwarded (RFC 9110 section 7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn own(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    text_response(status, body).map(Either::Right)
}

/// The proxy's own answer to a request it will not forward, sent after reading what is left
/// of a small request body: answering while the client is still uploading makes the h2 stream
/// end with RST_STREAM, which curl and others report as an error instead of the answer.
async fn refuse(
    req: Request<Incoming>,
    status: StatusCode,
    body: &'static str,
) -> Response<ProxyBody> {
    const MAX_DRAIN: usize = 64 * 1024;
    let mut incoming = req.into_body();
    let mut seen = 0usize;
    let drain = async {
        while let Some(Ok(frame)) = incoming.frame().await {
            seen += frame.data_ref().map_or(0, |d| d.len());
            if seen > MAX_DRAIN {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
    own(status, body)
}

impl Session {
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let start = Instant::now();
        let active = self.activity.begin();
        let metrics = self.proxy.metrics.clone();
        let Some(host) = request_host(&req) else {
            metrics.refusal(Refusal::BadRequest);
            metrics.request("", 400);
            return Ok(refuse(req, StatusCode::BAD_REQUEST, "Missing Host header\n").await);
        };
        let snapshot = self.proxy.snapshot.load_full();
        let Some(route) = snapshot.routes.lookup(&host).cloned() else {
            info!(%host, method = %req.method(), path = req.uri().path(), "no route for host");
            metrics.refusal(Refusal::NoRoute);
            metrics.request("", 502);
            return Ok(refuse(req, StatusCode::BAD_GATEWAY, NO_ROUTE).await);
        };
        // SNI that names another route is a misdirected request (the session was set up
        // for a different upstream); SNI naming no route (the bare domain) does not pin one.
        if let Some(sni) = &self.sni
            && let Some(sni_route) = snapshot.routes.lookup(sni)
            && sni_route.name != route.name
        {
            info!(%host, %sni, "misdirected request: TLS server name and Host select different routes");
            metrics.refusal(Refusal::Misdirected);
            metrics.request(&route.name, 421);
            return Ok(refuse(req, StatusCode::MISDIRECTED_REQUEST, MISDIRECTED).await);
        }
        if req.method() == Method::CONNECT {
            metrics.refusal(Refusal::BadRequest);
            metrics.request(&route.name, 405);
            return Ok(refuse(
                req,
                StatusCode::METHOD_NOT_ALLOWED,
                "CONNECT is not supported\n",
            )
            .await);
        }
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        if let Some(max) = self.proxy.limits.max_request_body_bytes
            && req.body().size_hint().lower() > max
        {
            metrics.limit(LimitHit::RequestBodyTooLarge);
            metrics.request(&route.name, 413);
            info!(route = %route.name, %method, %path, max, "refused request: body over limits.max_request_body_bytes");
            return Ok(own(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Request body too large (limits.max_request_body_bytes)\n",
            ));
        }
        debug!(route = %route.name, %method, %path, "request started");

        let upstream_req = self.upstream_request(req, &route, &host);
        let resp = if route.mcp.active() {
            let scope = mcp::Scope {
                route: &route,
                config: &snapshot.mcp,
                metrics: &metrics,
                caller: self.client_ip,
            };
            match mcp::request(scope, upstream_req).await {
                Inspected::Forward(req, exchange) => {
                    let resp = self
                        .forward(req, &route, &snapshot, active, exchange.clone())
                        .await;
                    if let Some(ex) = &exchange {
                        ex.set_status(resp.status());
                    }
                    resp
                }
                Inspected::Refused(resp) => resp.map(Either::Right),
            }
        } else {
            self.forward(
                upstream_req.map(Either::Left),
                &route,
                &snapshot,
                active,
                None,
            )
            .await
        };
        metrics.request(&route.name, resp.status().as_u16());
        let access = Access {
            route,
            method,
            path,
            caller: self.client_ip,
            status: resp.status(),
            start,
        };
        Ok(resp.map(|body| match body {
            Either::Left(mut leased) => {
                leased.access = Some(access);
                Either::Left(leased)
            }
            Either::Right(own) => {
                access.write(own.size_hint().exact().unwrap_or(0), true);
                Either::Right(own)
            }
        }))
    }

    /// Sends the request upstream and turns the answer (or the failure) into the response.
    async fn forward(
        &self,
        upstream_req: Request<UpstreamBody>,
        route: &Arc<Route>,
        snapshot: &Snapshot,
        active: ActiveGuard,
        exchange: Option<Arc<Exchange>>,
    ) -> Response<ProxyBody> {
        let metrics = &self.proxy.metrics;
        let (method, path) = (
            upstream_req.method().clone(),
            upstream_req.uri().path().to_owned(),
        );
        let lease = snapshot
            .leases
            .get(&route.name)
            .cloned()
            .unwrap_or_default();
        let plane = self.proxy.upstream.load_full();
        let request = exchange::send(&plane, &route.upstream, upstream_req);
        let sent = tokio::select! {
            r = tokio::time::timeout(snapshot.response_header_timeout, request) => Some(r),
            _ = lease.cancelled() => None,
        };
        match sent {
            None => own(
                StatusCode::BAD_GATEWAY,
                "Route removed or no longer allowed\n",
            ),
            Some(Ok(Ok(mut resp))) => {
                metrics.upstream(
                    &route.name,
                    UpstreamOutcome::Answered(resp.status().as_u16()),
                );
                strip_hop_by_hop(resp.headers_mut());
                let status = resp.status();
                let inspector = exchange.and_then(|ex| {
                    ResponseInspector::new(ex, status, resp.headers_mut()).map(Box::new)
                });
                let keepalive = is_event_stream(resp.headers()).then(|| {
                    SseKeepalive::new(
                        self.proxy.limits.sse_keepalive_interval,
                        metrics.keepalive.clone(),
                    )
                });
                resp.map(|inner| {
                    Either::Left(LeasedBody {
                        inner,
                        lease,
                        revoked: None,
                        mcp: inspector,
                        keepalive,
                        _active: active,
                        access: None,
                        bytes: 0,
                        ended: false,
                    })
                })
            }
            Some(Ok(Err(e))) if body_over_limit(&e) => {
                metrics.limit(LimitHit::RequestBodyTooLarge);
                info!(route = %route.name, %method, %path, "refused request: body over limits.max_request_body_bytes");
                own(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "Request body too large (limits.max_request_body_bytes)\n",
                )
            }
            Some(Ok(Err(e))) => {
                let (resp, why) = error_response(route, &e);
                metrics.refusal(why);
                metrics.upstream(&route.name, UpstreamOutcome::Failed(why));
                resp
            }
            Some(Err(_)) => {
                metrics.refusal(Refusal::ResponseTimeout);
                metrics.upstream(
                    &route.name,
                    UpstreamOutcome::Failed(Refusal::ResponseTimeout),
                );
                warn!(route = %route.name, upstream = %route.upstream, after = ?snapshot.response_header_timeout, "upstream response header timeout");
                own(
                    StatusCode::GATEWAY_TIMEOUT,
                    "Upstream did not answer in time\n",
                )
            }
        }
    }

    fn upstream_request(
        &self,
        req: Request<Incoming>,
        route: &Route,
        host: &str,
    ) -> Request<RequestBody> {
        let (mut parts, body) = req.into_parts();
        let body = match self.proxy.limits.max_request_body_bytes {
            Some(max) => Either::Right(Limited::new(body, max as usize)),
            None => Either::Left(body),
        };
        // Origin form (`/path?query`), what the request line to the upstream carries: h2
        // and absolute-form requests bring an authority, which goes to `Host` instead.
        if parts.uri.authority().is_some() {
            parts.uri = parts
                .uri
                .path_and_query()
                .map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
        }
        parts.version = Version::HTTP_11;
        let headers = &mut parts.headers;
        strip_hop_by_hop(headers);
        if let Ok(v) = HeaderValue::from_str(&upstream_host(route, host)) {
            headers.insert(header::HOST, v);
        }
        let xff = match headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
            Some(prev) => HeaderValue::from_str(&format!("{prev}, {}", self.client_ip)).ok(),
            None => Some(self.client_ip_value.clone()),
        };
        if let Some(v) = xff {
            headers.insert(X_FORWARDED_FOR, v);
        }
        if let Ok(v) = HeaderValue::from_str(host) {
            headers.insert(HeaderName::from_static("x-forwarded-host"), v);
        }
        headers.insert(
            HeaderName::from_static("x-forwarded-proto"),
            HeaderValue::from_static("https"),
        );
        Request::from_parts(parts, body)
    }
}

/// Whether a failed upstream request failed because its body went over the limit.
fn body_over_limit(err: &SendError) -> bool {
    let mut e: Option<&(dyn std::error::Error + 'static)> = Some(err.as_ref());
    while let Some(cur) = e {
        if cur.is::<LengthLimitError>() {
            return true;
        }
        e = cur.source();
    }
    false
}

/// The name the request is for: `:authority` (h2, absolute-form) or `Host` (HTTP/1.1).
fn request_host(req: &Request<Incoming>) -> Option<String> {
    if let Some(a) = req.uri().authority() {
        return Some(a.as_str().to_owned());
    }
    req.headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Removes hop-by-hop headers and those `Connection` names. Most requests and answers carry
/// none: one pass over the names finds that, instead of eight removals that find nothing.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if !headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        return;
    }
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

fn error_response(route: &Route, err: &SendError) -> (Response<ProxyBody>, Refusal) {
    let err: &(dyn std::error::Error + 'static) = err.as_ref();
    let why = match find_connect_error(err) {
        Some(ConnectError::NotAllowed { .. }) => Refusal::IpNotAllowed,
        Some(ConnectError::Timeout { .. }) => Refusal::ConnectTimeout,
        Some(_) => Refusal::ConnectFailed,
        None => Refusal::UpstreamError,
    };
    let resp = match find_connect_error(err) {
        Some(e @ ConnectError::NotAllowed { host, .. }) => {
            warn!(route = %route.name, upstream_host = %host, "{e}");
            own(StatusCode::BAD_GATEWAY, NOT_ALLOWED)
        }
        Some(e @ ConnectError::Timeout { .. }) => {
            warn!(route = %route.name, upstream = %route.upstream, error = %e, "upstream connect timeout");
            own(
                StatusCode::GATEWAY_TIMEOUT,
                "Upstream connection timed out\n",
            )
        }
        Some(e) => {
            warn!(route = %route.name, upstream = %route.upstream, error = %e, "upstream connection failed");
            own(StatusCode::BAD_GATEWAY, CONNECT_FAILED)
        }
        None => {
            warn!(route = %route.name, upstream = %route.upstream, error = %err, source = ?std::error::Error::source(err), "upstream request failed");
            own(StatusCode::BAD_GATEWAY, "Upstream request failed\n")
        }
    };
    (resp, why)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size_of_future<A, B, R, F: Fn(A, B) -> R>(_: F) -> usize {
        std::mem::size_of::<R>()
    }

    /// The request future is allocated once per request (`SessionService::call`): what it
    /// holds across its awaits is copied to the heap each time. Grew past the bound: box
    /// the part that grew, or keep it out of the future.
    #[test]
    fn the_request_future_stays_small() {
        let handle = size_of_future(Session::handle);
        eprintln!("Session::handle future: {handle} bytes");
        assert!(handle <= HANDLE_FUTURE_MAX, "{handle} bytes");
    }

    #[test]
    fn hop_by_hop_and_connection_listed_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("mcp-session-id", HeaderValue::from_static("abc"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(h.contains_key("mcp-session-id") && h.contains_key(header::AUTHORIZATION));
    }
}
