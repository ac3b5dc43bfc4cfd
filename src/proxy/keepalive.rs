//! Keepalives for quiet streams. Intermediaries cut connections that carry nothing for a
//! while (Cloudflare's proxies after about 100-125 s; load balancers and NAT often after
//! 60 s), and MCP's notification stream (the GET SSE stream) is silent for minutes. So:
//!
//! - a tunnel session that carried no bytes for `ws_ping_interval` gets a WebSocket ping; a
//!   peer that answers nothing within `ws_pong_timeout` is gone and the session is closed
//!   (state in [`PingState`], driven by `proxy::ws::server::ServerStream`);
//! - a `text/event-stream` response idle for `sse_keepalive_interval` gets an SSE comment
//!   line (`: keepalive`), which every SSE parser ignores, only at an event boundary, never
//!   inside a partial event ([`SseKeepalive`], driven by the forwarded response body).

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::{Instant, Sleep};

/// What the keepalives did, for `/metrics`.
#[derive(Debug, Default)]
pub struct KeepaliveCounters {
    pub ws_pings: AtomicU64,
    pub ws_pong_timeouts: AtomicU64,
    pub sse_comments: AtomicU64,
}

/// The comment injected into an idle event stream.
pub const SSE_COMMENT: &[u8] = b": keepalive\n\n";

/// Whether `tail` (the last bytes of an event stream so far) ends at an event boundary: the
/// stream is empty, or its last line is empty (a blank line ends an event; lines end with
/// CRLF, LF or CR). A trailing CR is not a boundary yet: an LF may follow and belong to it,
/// so a stream that ends its lines with CR alone never gets comments (none seen in practice).
pub fn at_event_boundary(tail: &[u8]) -> bool {
    let rest = match tail {
        [] => return true,
        [rest @ .., b'\r', b'\n'] | [rest @ .., b'\n'] => rest,
        _ => return false,
    };
    matches!(rest.last(), Some(b'\n' | b'\r'))
}

/// Keeps the last bytes of a stream, enough to tell an event boundary.
#[derive(Debug, Default, Clone)]
struct Tail {
    buf: [u8; 4],
    len: usize,
}

impl Tail {
    fn push(&mut self, data: &[u8]) {
        for &b in &data[data.len().saturating_sub(4)..] {
            if self.len == 4 {
                self.buf.copy_within(1.., 0);
                self.len = 3;
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Comment injection for one `text/event-stream` response body.
pub struct SseKeepalive {
    interval: Duration,
    timer: Pin<Box<Sleep>>,
    tail: Tail,
    counters: std::sync::Arc<KeepaliveCounters>,
}

impl SseKeepalive {
    pub fn new(interval: Duration, counters: std::sync::Arc<KeepaliveCounters>) -> SseKeepalive {
        SseKeepalive {
            interval,
            timer: Box::pin(tokio::time::sleep(interval)),
            tail: Tail::default(),
            counters,
        }
    }

    /// Data passed on to the client: the stream is not idle.
    pub fn observe(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        self.tail.push(data);
        self.timer.as_mut().reset(Instant::now() + self.interval);
    }

    /// Called when the upstream has nothing to send: a comment once the stream has been
    /// idle for the interval and sits at an event boundary. Inside a partial event nothing
    /// is injected (the timer is not armed again until data arrives).
    pub fn poll_comment(&mut self, cx: &mut Context<'_>) -> Poll<Bytes> {
        if !at_event_boundary(self.tail.bytes()) {
            return Poll::Pending;
        }
        if self.timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.timer.as_mut().reset(Instant::now() + self.interval);
        self.counters.sse_comments.fetch_add(1, Ordering::Relaxed);
        Poll::Ready(Bytes::from_static(SSE_COMMENT))
    }
}

/// Ping state of one tunnel session.
pub struct PingState {
    interval: Duration,
    timeout: Duration,
    timer: Pin<Box<Sleep>>,
    /// A ping went out and no frame came back since.
    awaiting: bool,
    /// Bytes moved since the timer was last armed (re-armed lazily when it fires).
    active: bool,
    counters: std::sync::Arc<KeepaliveCounters>,
}

/// What the session must do now.
#[derive(Debug, PartialEq, Eq)]
pub enum PingAction {
    Nothing,
    SendPing,
    /// No answer to the last ping within the timeout: close the session.
    Dead,
}

impl PingState {
    pub fn new(
        interval: Duration,
        timeout: Duration,
        counters: std::sync::Arc<KeepaliveCounters>,
    ) -> PingState {
        PingState {
            interval,
            timeout,
            timer: Box::pin(tokio::time::sleep(interval)),
            awaiting: false,
            active: false,
            counters,
        }
    }

    /// A frame arrived from the peer (data, pong or anything): it is alive.
    pub fn received(&mut self) {
        self.awaiting = false;
        self.active = true;
    }

    /// Bytes went out to the peer.
    pub fn sent(&mut self) {
        self.active = true;
    }

    /// Polls the timer; cheap when nothing is due.
    pub fn poll(&mut self, cx: &mut Context<'_>) -> PingAction {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return PingAction::Nothing;
            }
            if self.active && !self.awaiting {
                // Bytes moved during the interval: not idle; look again one interval later.
                self.active = false;
                self.timer.as_mut().reset(Instant::now() + self.interval);
                continue;
            }
            if self.awaiting {
                self.counters
                    .ws_pong_timeouts
                    .fetch_add(1, Ordering::Relaxed);
                return PingAction::Dead;
            }
            return PingAction::SendPing;
        }
    }

    /// The ping went out: wait `timeout` for any frame back.
    pub fn pinged(&mut self) {
        self.awaiting = true;
        self.active = false;
        self.counters.ws_pings.fetch_add(1, Ordering::Relaxed);
        self.timer.as_mut().reset(Instant::now() + self.timeout);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_boundaries() {
        for (s, want) in [
            ("", true),
            ("data: x\n\n", true),
            ("data: x\r\n\r\n", true),
            // A trailing CR could be the first half of a CRLF: not yet.
            ("data: x\r\r", false),
            ("data: x\r\r\n", true),
            ("data: x\n\r\n", true),
            ("data: x\n", false),
            ("data: x\r\n", false),
            ("data: x", false),
            // A lone CR may be the first half of CRLF: wait for the next byte.
            ("data: x\n\r", false),
            (": keepalive\n\n", true),
        ] {
            let mut t = Tail::default();
            t.push(s.as_bytes());
            assert_eq!(at_event_boundary(t.bytes()), want, "{s:?}");
        }
        // Split across frames, byte by byte.
        let mut t = Tail::default();
        for b in b"event: tick\ndata: {}\n\n" {
            t.push(&[*b]);
        }
        assert!(at_event_boundary(t.bytes()));
        t.push(b"data: part");
        assert!(!at_event_boundary(t.bytes()));
    }

    #[tokio::test(start_paused = true)]
    async fn sse_comments_only_when_idle_at_a_boundary() {
        let counters = std::sync::Arc::new(KeepaliveCounters::default());
        let mut k = SseKeepalive::new(Duration::from_secs(15), counters.clone());
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(k.poll_comment(&mut cx).is_pending());
        tokio::time::advance(Duration::from_secs(15)).await;
        assert_eq!(
            k.poll_comment(&mut cx),
            Poll::Ready(Bytes::from_static(SSE_COMMENT))
        );
        assert!(k.poll_comment(&mut cx).is_pending(), "re-armed");
        // A partial event: never a comment inside it, however long it waits.
        k.observe(b"data: half");
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(k.poll_comment(&mut cx).is_pending());
        k.observe(b" done\n\n");
        tokio::time::advance(Duration::from_secs(14)).await;
        assert!(k.poll_comment(&mut cx).is_pending(), "data reset the timer");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(k.poll_comment(&mut cx).is_ready());
        assert_eq!(counters.sse_comments.load(Ordering::Relaxed), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn pings_when_idle_and_dead_without_an_answer() {
        let counters = std::sync::Arc::new(KeepaliveCounters::default());
        let mut p = PingState::new(
            Duration::from_secs(30),
            Duration::from_secs(20),
            counters.clone(),
        );
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert_eq!(p.poll(&mut cx), PingAction::Nothing);
        // Traffic during the interval: no ping at its end.
        tokio::time::advance(Duration::from_secs(10)).await;
        p.sent();
        tokio::time::advance(Duration::from_secs(20)).await;
        assert_eq!(p.poll(&mut cx), PingAction::Nothing);
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(p.poll(&mut cx), PingAction::SendPing);
        p.pinged();
        // The pong (any frame) arrives: alive; the next ping one interval later.
        tokio::time::advance(Duration::from_secs(1)).await;
        p.received();
        tokio::time::advance(Duration::from_secs(19)).await;
        assert_eq!(p.poll(&mut cx), PingAction::Nothing);
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(p.poll(&mut cx), PingAction::SendPing);
        p.pinged();
        // No answer within the timeout: dead.
        tokio::time::advance(Duration::from_secs(20)).await;
        assert_eq!(p.poll(&mut cx), PingAction::Dead);
        assert_eq!(counters.ws_pings.load(Ordering::Relaxed), 2);
        assert_eq!(counters.ws_pong_timeouts.load(Ordering::Relaxed), 1);
    }
}
