//! The bodies a request's exchange moves: the request body on its way upstream, and the
//! response body back, streamed under its route's lease, with MCP inspection, SSE keepalives
//! and the access-log line written when it is done with.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{Either, Full, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::info;

use super::activity::ActiveGuard;
use super::exchange::ResponseBody;
use super::keepalive::SseKeepalive;
use super::mcp::{self, ResponseInspector};
use crate::config::Route;

/// Response body: the upstream's, streamed under its route's lease, or a short one of the
/// proxy's own.
pub type ProxyBody = Either<LeasedBody, Full<Bytes>>;

/// An upstream response body that ends with an error (aborting the stream towards the
/// client) once its route's lease is cancelled by a reload.
pub struct LeasedBody {
    pub(super) inner: ResponseBody,
    /// The route's lease; a waiter is registered on it only once the body has to wait for
    /// the upstream (most JSON answers never do, so they never touch the lease's lock).
    pub(super) lease: CancellationToken,
    pub(super) revoked: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    /// For `text/event-stream` responses: comments while the stream is idle.
    pub(super) keepalive: Option<SseKeepalive>,
    /// On inspected routes: reads (and with a policy, filters) the body as it streams.
    pub(super) mcp: Option<Box<ResponseInspector>>,
    /// Keeps the session busy (never idle-closed) while the response streams.
    pub(super) _active: ActiveGuard,
    /// The request's access-log line, written when the body is done with.
    pub(super) access: Option<Access>,
    /// Body bytes passed on so far, and whether the body reached its end.
    pub(super) bytes: u64,
    pub(super) ended: bool,
}

/// The target of the access line (one per request): the journal can be queried for it
/// (`journalctl TARGET=mcp_tunnel::access`), and the log pipeline counts its drops apart.
pub const ACCESS_TARGET: &str = "mcp_tunnel::access";

/// What the one access-log line per request says: written when the response is done with
/// (its body ended, failed or was dropped), so an SSE stream's line carries its whole
/// duration and size.
pub struct Access {
    pub(super) route: Arc<Route>,
    pub(super) method: Method,
    pub(super) path: String,
    pub(super) caller: IpAddr,
    pub(super) status: StatusCode,
    pub(super) start: Instant,
}

impl Access {
    pub(super) fn write(&self, bytes: u64, complete: bool) {
        // Microsecond resolution: `2.669`, not `2.6690479999999996`.
        let duration_ms = self.start.elapsed().as_micros() as f64 / 1000.0;
        if complete {
            info!(target: ACCESS_TARGET, route = %self.route.name, method = %self.method, path = %self.path, caller = %self.caller, status = self.status.as_u16(), duration_ms, bytes, "request completed");
        } else {
            info!(target: ACCESS_TARGET, route = %self.route.name, method = %self.method, path = %self.path, caller = %self.caller, status = self.status.as_u16(), duration_ms, bytes, aborted = true, "request completed");
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
