//! A WebSocket connection seen as a byte stream (`AsyncRead + AsyncWrite`), so that a TLS
//! session can run inside it as the edge runs it.
//!
//! Text and binary messages both carry payload bytes; ping, pong and close stay in the
//! WebSocket layer (tungstenite answers pings itself). A close frame or the end of the
//! connection reads as end-of-file.
//!
//! `WsByteStream` (on tungstenite) is the client side: the bridge, tests and the benchmark's
//! load generator. The listener's sessions use [`server::ServerStream`], a lean codec of our
//! own (see its module doc), which tungstenite clients then test as an independent peer.

pub mod server;

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use super::keepalive::{PingAction, PingState};
use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// WebSocket settings for tunnel sessions: modest buffers, since thousands of sessions can
/// sit idle, and the message and frame limits from `[limits]`.
pub fn session_config_with(max_message: usize, max_frame: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0)
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_frame))
}

/// `session_config_with` at the default limits (clients: the bridge, tests, benchmarks).
pub fn session_config() -> WebSocketConfig {
    let d = crate::config::Limits::default();
    session_config_with(d.max_ws_message_bytes, d.max_ws_frame_bytes)
}

/// Byte-stream view of a WebSocket.
pub struct WsByteStream<S> {
    inner: WebSocketStream<S>,
    /// Unread rest of the last received message.
    pending: Bytes,
    eof: bool,
    /// Pings on an idle session (the listener's sessions; clients answer them).
    ping: Option<PingState>,
}

impl<S> WsByteStream<S> {
    pub fn new(inner: WebSocketStream<S>) -> Self {
        WsByteStream {
            inner,
            pending: Bytes::new(),
            eof: false,
            ping: None,
        }
    }

    /// As `new`, pinging the peer when the session is idle and failing reads once it stops
    /// answering (see `proxy::keepalive`).
    pub fn with_pings(inner: WebSocketStream<S>, ping: PingState) -> Self {
        WsByteStream {
            ping: Some(ping),
            ..WsByteStream::new(inner)
        }
    }
}

/// The peer did not answer a ping within `ws_pong_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("websocket peer did not answer a ping within ws_pong_timeout")]
pub struct PongTimeout;

fn to_io(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        WsError::ConnectionClosed | WsError::AlreadyClosed => {
            io::Error::new(io::ErrorKind::NotConnected, e)
        }
        other => io::Error::new(io::ErrorKind::InvalidData, other),
    }
}

/// A WebSocket message or frame over the configured limit.
#[derive(Debug, thiserror::Error)]
#[error("websocket message too large: {0}")]
pub struct TooBig(String);

impl<S: AsyncRead + AsyncWrite + Unpin> WsByteStream<S> {
    /// Sends a ping if one is due; an error if the last one went unanswered.
    fn keepalive(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let Some(ping) = self.ping.as_mut() else {
            return Ok(());
        };
        match ping.poll(cx) {
            PingAction::Nothing => Ok(()),
            PingAction::Dead => Err(io::Error::new(io::ErrorKind::TimedOut, PongTimeout)),
            PingAction::SendPing => {
                let mut sink = Pin::new(&mut self.inner);
                // A full write buffer means bytes are moving: no ping needed now.
                if let Poll::Ready(Ok(())) = sink.as_mut().poll_ready(cx)
                    && sink
                        .as_mut()
                        .start_send(Message::Ping(Bytes::new()))
                        .is_ok()
                {
                    let _ = sink.poll_flush(cx);
                    ping.pinged();
                }
                Ok(())
            }
        }
    }

    fn close_too_big(&mut self, cx: &mut Context<'_>) {
        use tokio_tungstenite::tungstenite::protocol::CloseFrame;
        use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
        let mut sink = Pin::new(&mut self.inner);
        if let Poll::Ready(Ok(())) = sink.as_mut().poll_ready(cx) {
            let frame = CloseFrame {
                code: CloseCode::Size,
                reason: "message too large".into(),
            };
            if sink
                .as_mut()
                .start_send(Message::Close(Some(frame)))
                .is_ok()
            {
                let _ = sink.poll_flush(cx);
            }
        }
        self.eof = true;
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsByteStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            if self.eof {
                return Poll::Ready(Ok(()));
            }
            if let Err(e) = self.keepalive(cx) {
                self.eof = true;
                return Poll::Ready(Err(e));
            }
            let next = ready!(Pin::new(&mut self.inner).poll_next(cx));
            if let Some(p) = self.ping.as_mut() {
                p.received();
            }
            match next {
                Some(Ok(Message::Binary(b))) => self.pending = b,
                Some(Ok(Message::Text(t))) => self.pending = Bytes::from(t),
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(_))) | None => self.eof = true,
                Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => self.eof = true,
                Some(Err(WsError::Capacity(e))) => {
                    // Over max_ws_message/frame size: say so with close code 1009, best effort.
                    self.close_too_big(cx);
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        TooBig(e.to_string()),
                    )));
                }
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsByteStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut sink = Pin::new(&mut self.inner);
        ready!(sink.as_mut().poll_ready(cx)).map_err(to_io)?;
        sink.start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(to_io)?;
        if let Some(p) = self.ping.as_mut() {
            p.sent();
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx).map_err(to_io)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match ready!(Pin::new(&mut self.inner).poll_close(cx)) {
            Ok(()) | Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(to_io(e))),
        }
    }
}
