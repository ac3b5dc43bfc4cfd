//! Upstream connections driven by the tunnel session's own task.
//!
//! An HTTP/1.1 tunnel session carries one request at a time, so it needs one upstream
//! connection at a time. Polling that connection from the task that serves the session lets
//! a request go client -> proxy -> upstream -> proxy -> client in one task: no hand-off to a
//! pool task and back, no wake-up of another worker thread per request (the shared pool's
//! cost, measured in BENCHMARKS.md (a)). h2 sessions, whose streams are served by tasks of
//! their own, keep using the plane's shared pool.
//!
//! A session borrows a connection from its plane's [`IdleConns`] for a request and gives it
//! back as soon as nothing is in flight, so connections are shared between sessions as a
//! pool's are, and thousands of idle sessions hold none. Every *new* connection goes through
//! [`Connector::connect`] (resolve, check every address against the allowlist, dial a
//! checked one), exactly as the pool's do, and a new upstream policy gets a new plane with
//! an empty idle list.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::Context;
use std::time::{Duration, Instant};

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1;

use super::forward::UpstreamBody;
use super::state::UpstreamPlane;
use super::upstream::{Connector, UpstreamIo};
use crate::config::Upstream;

/// Idle connections a plane keeps for sessions to take (as nginx's `keepalive 64`, doubled).
pub const MAX_IDLE: usize = 128;

/// How long an idle connection is kept (the shared pool's idle timeout).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Why a request through the session's connection failed: the connector's `ConnectError`
/// or hyper's error, found again by walking `source()` as for the shared pool's errors.
pub type SendError = Box<dyn std::error::Error + Send + Sync>;

type Driver = Pin<Box<http1::Connection<UpstreamIo, UpstreamBody>>>;

/// One upstream connection: the request half and the future that does its I/O.
struct Conn {
    /// The idle list of the plane (upstream policy) it was opened under: it is never used
    /// under another.
    home: Weak<IdleConns>,
    upstream: Upstream,
    send: http1::SendRequest<UpstreamBody>,
    driver: Driver,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// A plane's idle upstream connections, not polled while idle (the kernel keeps any close
/// from the upstream; the next request on it finds out and retries on a new connection).
#[derive(Default)]
pub struct IdleConns {
    /// Oldest first: the most recently used connection is taken first (its buffers are
    /// warm), the oldest expire first.
    list: Mutex<VecDeque<Idle>>,
}

impl IdleConns {
    fn take(&self, upstream: &Upstream) -> Option<Conn> {
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        let at = list.iter().rposition(|i| &i.conn.upstream == upstream)?;
        list.remove(at).map(|i| i.conn)
    }

    fn put(&self, conn: Conn) {
        if conn.send.is_closed() || !conn.send.is_ready() {
            return;
        }
        let now = Instant::now();
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        while list
            .front()
            .is_some_and(|i| now.duration_since(i.since) >= IDLE_TIMEOUT)
        {
            list.pop_front();
        }
        if list.len() >= MAX_IDLE {
            list.pop_front();
        }
        list.push_back(Idle { conn, since: now });
    }
}

/// A connection of the session: its request half while no request uses it, and its driver,
/// which the session task polls for as long as the connection has work.
struct Slot {
    id: u64,
    home: Weak<IdleConns>,
    upstream: Upstream,
    send: Option<http1::SendRequest<UpstreamBody>>,
    driver: Driver,
}

/// The connections a session opened or took (one, unless a request failed mid-way).
#[derive(Default)]
pub struct SessionConn {
    slots: Mutex<Vec<Slot>>,
    next_id: AtomicU64,
}

/// A connection's request half, lent to one request.
struct Lent {
    id: u64,
    send: http1::SendRequest<UpstreamBody>,
    /// It carried a request before: a failure to send may be the upstream's idle close.
    reused: bool,
}

impl SessionConn {
    /// Polls every connection's I/O; the session task calls this beside its server
    /// connection, so responses arrive in the task that writes them to the client.
    pub fn poll_drive(&self, cx: &mut Context<'_>) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if slots.is_empty() {
            return;
        }
        slots.retain_mut(|s| s.driver.as_mut().poll(cx).is_pending());
    }

    /// Gives the connections no request is using to `idle`, the current plane's (nothing
    /// is in flight on the session, or it ended); one opened under an older policy is
    /// closed, one still in use is left to finish.
    pub fn release(&self, idle: &Arc<IdleConns>) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if slots.is_empty() {
            return;
        }
        let current = Arc::downgrade(idle);
        let mut i = 0;
        while i < slots.len() {
            if slots[i].send.is_some() {
                let s = slots.swap_remove(i);
                if let Some(send) = s.send
                    && Weak::ptr_eq(&s.home, &current)
                {
                    idle.put(Conn {
                        home: s.home,
                        upstream: s.upstream,
                        send,
                        driver: s.driver,
                    });
                }
            } else {
                i += 1;
            }
        }
    }

    fn lend_own(&self, home: &Weak<IdleConns>, upstream: &Upstream) -> Option<Lent> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let slot = slots
            .iter_mut()
            .find(|s| s.send.is_some() && Weak::ptr_eq(&s.home, home) && &s.upstream == upstream)?;
        Some(Lent {
            id: slot.id,
            send: slot.send.take()?,
            reused: true,
        })
    }

    fn adopt(&self, conn: Conn, reused: bool) -> Lent {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Slot {
                id,
                home: conn.home,
                upstream: conn.upstream,
                send: None,
                driver: conn.driver,
            });
        Lent {
            id,
            send: conn.send,
            reused,
        }
    }

    fn give_back(&self, lent: Lent) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = slots.iter_mut().find(|s| s.id == lent.id) {
            s.send = Some(lent.send);
        }
    }
}

async fn connect(plane: &UpstreamPlane, upstream: &Upstream, uri: &Uri) -> Result<Conn, SendError> {
    let io = Connector::connect(plane.settings.clone(), uri.clone()).await?;
    let (send, driver) = http1::Builder::new().handshake(io).await?;
    Ok(Conn {
        home: Arc::downgrade(&plane.idle),
        upstream: upstream.clone(),
        send,
        driver: Box::pin(driver),
    })
}

/// An idle connection of `idle` that has not been closed while nobody polled it: polling its
/// driver once reads what arrived meanwhile (an upstream's close ends it here).
async fn take_live(idle: &IdleConns, upstream: &Upstream) -> Option<Conn> {
    loop {
        let mut conn = idle.take(upstream)?;
        let closed = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(conn.driver.as_mut().poll(cx).is_ready())
        })
        .await;
        if !closed && !conn.send.is_closed() {
            return Some(conn);
        }
    }
}

/// Sends `req` (absolute URI, as routing built it) to `upstream` on the session's own
/// connection, one idle in `plane`, or a new one (resolved and checked by the connector). A
/// reused connection that turns out closed before the request went out is replaced once.
pub async fn send(
    session: &SessionConn,
    plane: &UpstreamPlane,
    upstream: &Upstream,
    mut req: Request<UpstreamBody>,
) -> Result<Response<Incoming>, SendError> {
    let uri = req.uri().clone();
    *req.uri_mut() = origin_form(&uri);
    let home = Arc::downgrade(&plane.idle);
    let mut fresh_only = false;
    loop {
        let found = if fresh_only {
            None
        } else {
            match session.lend_own(&home, upstream) {
                Some(lent) => Some(lent),
                None => take_live(&plane.idle, upstream)
                    .await
                    .map(|conn| session.adopt(conn, true)),
            }
        };
        let mut lent = match found {
            Some(l) => l,
            None => session.adopt(connect(plane, upstream, &uri).await?, false),
        };
        if lent.send.ready().await.is_err() {
            // Closed while idle (the upstream's keep-alive ran out): its driver ends by
            // itself; try a new connection.
            if lent.reused {
                fresh_only = true;
                continue;
            }
            return Err("upstream connection closed before the request was sent".into());
        }
        match lent.send.try_send_request(req).await {
            Ok(resp) => {
                session.give_back(lent);
                return Ok(resp);
            }
            Err(mut e) => match e.take_message() {
                Some(unsent) if lent.reused => {
                    req = unsent;
                    fresh_only = true;
                }
                _ => return Err(e.into_error().into()),
            },
        }
    }
}

/// `/path?query` of an absolute URI: what an HTTP/1.1 request line to an origin carries.
fn origin_form(uri: &Uri) -> Uri {
    uri.path_and_query()
        .map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()))
}
