//! The listener's WebSocket-to-byte-stream adapter (`proxy::ws::server::ServerStream`, our
//! own codec), against tungstenite's client as the peer, two ways (first input byte, even
//! or odd):
//!
//! - raw: the rest of the input is what a client sent on the socket (any bytes, so broken
//!   frames, bad masks, oversized lengths, control frames anywhere). The adapter must end
//!   with data, end-of-file or an error, never panic or hang.
//! - messages: the rest of the input describes WebSocket messages (text, binary, ping, pong)
//!   that a real client sends; the adapter must yield exactly the data payloads in order,
//!   and the bytes it writes back must reach the client unchanged.
//!
//! The first byte's second bit picks the connection under the adapter: an in-memory pipe
//! without vectored writes (frames copied into the adapter's buffer), or one with vectored
//! writes that takes a few bytes per read and write and is not ready every other write
//! (partial headers, partial frames, pongs queued behind them).
#![no_main]

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use libfuzzer_sys::fuzz_target;
use mcp_tunnel::config::Limits;
use mcp_tunnel::proxy::ws::server::ServerStream;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::runtime::Runtime;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

/// A hang is a bug here: every path ends once the client side is closed.
const DEADLINE: Duration = Duration::from_secs(10);

fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

/// A connection with vectored writes that moves at most `chunk` bytes per read or write
/// and is not ready every other write.
struct Trickle {
    io: DuplexStream,
    chunk: usize,
    stall: bool,
}

impl AsyncRead for Trickle {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut tmp = vec![0u8; buf.remaining().min(self.chunk)];
        let mut small = ReadBuf::new(&mut tmp);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut small))?;
        buf.put_slice(small.filled());
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Trickle {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.stall = !self.stall;
        if self.stall {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let mut tmp = Vec::new();
        for b in bufs {
            tmp.extend_from_slice(&b[..b.len().min(self.chunk - tmp.len())]);
        }
        Pin::new(&mut self.io).poll_write(cx, &tmp)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The adapter as the listener builds it (default limits), over `io`.
fn adapter<S>(io: S) -> ServerStream<S> {
    let l = Limits::default();
    ServerStream::new(io, l.max_ws_message_bytes, l.max_ws_frame_bytes)
}

/// Serves the server end of a pipe, directly or through a `Trickle` of `trickle` bytes.
async fn serve_pipe(server: DuplexStream, chunk: usize, trickle: Option<usize>) -> Vec<u8> {
    match trickle {
        None => serve(adapter(server), chunk).await,
        Some(n) => {
            let io = Trickle {
                io: server,
                chunk: n,
                stall: false,
            };
            serve(adapter(io), chunk).await
        }
    }
}

/// Server side: read everything, echoing each chunk back; returns what was read.
async fn serve<S>(mut stream: ServerStream<S>, chunk: usize) -> Vec<u8>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut got = Vec::new();
    let mut buf = vec![0u8; chunk.max(1)];
    let mut echo = true;
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if echo
                    && (stream.write_all(&buf[..n]).await.is_err() || stream.flush().await.is_err())
                {
                    echo = false;
                }
            }
        }
    }
    let _ = stream.shutdown().await;
    got
}

async fn raw(input: &[u8], chunk: usize, trickle: Option<usize>) {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let (mut rx, mut tx) = tokio::io::split(client);
    let feed = async move {
        let _ = tx.write_all(input).await;
        let _ = tx.shutdown().await;
    };
    let drain = async move {
        let mut sink = Vec::new();
        let _ = rx.read_to_end(&mut sink).await;
    };
    let server = async move {
        serve_pipe(server, chunk, trickle).await;
    };
    tokio::join!(feed, drain, server);
}

async fn messages(input: &[u8], chunk: usize, trickle: Option<usize>) {
    // Each message: a kind byte, a length byte, then that many payload bytes.
    let mut msgs = Vec::new();
    let mut expected = Vec::new();
    let mut rest = input;
    while let [kind, len, tail @ ..] = rest {
        let n = (*len as usize).min(tail.len());
        let (payload, next) = tail.split_at(n);
        rest = next;
        match kind % 4 {
            0 => {
                expected.extend_from_slice(payload);
                msgs.push(Message::binary(payload.to_vec()));
            }
            1 => {
                let text = String::from_utf8_lossy(payload).into_owned();
                expected.extend_from_slice(text.as_bytes());
                msgs.push(Message::text(text));
            }
            2 => msgs.push(Message::Ping(payload[..n.min(125)].to_vec().into())),
            _ => msgs.push(Message::Pong(payload[..n.min(125)].to_vec().into())),
        }
    }
    let (client, server) = tokio::io::duplex(64 * 1024);
    let client = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
    let (mut sink, mut stream) = client.split();
    let send = async move {
        for m in msgs {
            sink.send(m).await.expect("client send");
        }
        sink.close().await.expect("client close");
    };
    let receive = async move {
        let mut back = Vec::new();
        while let Some(m) = stream.next().await {
            match m {
                Ok(Message::Binary(b)) => back.extend_from_slice(&b),
                Ok(Message::Text(t)) => back.extend_from_slice(t.as_bytes()),
                Ok(Message::Close(_)) => break,
                Ok(_) => {}
                Err(e) => panic!("client saw an error: {e}"),
            }
        }
        back
    };
    let server = serve_pipe(server, chunk, trickle);
    let ((), back, got) = tokio::join!(send, receive, server);
    assert_eq!(
        got, expected,
        "adapter read other bytes than the messages carried"
    );
    assert_eq!(
        back, expected,
        "bytes written through the adapter changed on the way"
    );
}

fuzz_target!(|data: &[u8]| {
    let [mode, size, input @ ..] = data else {
        return;
    };
    let chunk = 1 + (*size as usize) * 67;
    // Bit 1 of the mode: the trickling connection, moving 1 to 32 bytes at a time.
    let trickle = (mode & 2 != 0).then_some(1 + (*mode as usize >> 3));
    runtime().block_on(async {
        let run = async {
            if mode % 2 == 0 {
                raw(input, chunk, trickle).await
            } else {
                messages(input, chunk, trickle).await
            }
        };
        tokio::time::timeout(DEADLINE, run)
            .await
            .expect("adapter hung");
    });
});
