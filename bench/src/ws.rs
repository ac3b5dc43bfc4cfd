//! The load generator's lean WebSocket client (RFC 6455, client role) as a byte stream, for
//! ws:// targets.
//!
//! Why not tungstenite here: the load generator shares the machine's cores with the target,
//! so whatever its client spends is taken from the proxy under test. Through tungstenite each
//! write becomes a new message (a copy), and each read goes through its own read buffer and
//! message assembly; against nginx the same load costs only a TLS client. This client does
//! what a tunnel needs and no more:
//!
//! - Each write becomes one masked binary frame: the header and the payload, masked while it
//!   is copied, go into one reused buffer and out in one write. All the slices of a vectored
//!   write (rustls's TLS records) make one frame.
//! - Reads go straight into the caller's buffer (rustls's). Server frames are not masked, so
//!   payload bytes stay where they were read; only frame headers (and control frames) are
//!   taken out, by moving the payload that follows them down. Nothing is zero-filled.
//! - Pings are answered with pongs; a close frame is answered and reads as end-of-file.
//!
//! Text and binary frames both carry payload bytes (no UTF-8 check: the tunnel only sends
//! binary). Anything a server must not send (a masked frame, reserved bits, an unknown
//! opcode, a fragmented or long control frame) fails the read.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use base64::Engine as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;
const FIN: u8 = 0x80;
const MASKED: u8 = 0x80;

/// Largest control frame payload (RFC 6455 5.5).
const MAX_CONTROL: usize = 125;
/// Largest frame written: a big write takes several frames, each well under any server's
/// frame limit (the proxy's default is 4 MiB).
const MAX_OUT_FRAME: usize = 64 * 1024;
/// Largest handshake response head accepted.
const MAX_HEAD: usize = 16 * 1024;

const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Where the reader is in the server's frame sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rx {
    /// Collecting a frame header in `head`.
    Header,
    /// Payload of a data frame: `left` bytes to come.
    Data { left: u64 },
    /// Payload of a control frame: `left` bytes to come into `control`.
    Control { op: u8, left: u8 },
}

/// The client side of a WebSocket as a byte stream. See the module doc.
pub struct WsStream<S> {
    io: S,
    rx: Rx,
    head: [u8; 10],
    head_len: u8,
    control: [u8; MAX_CONTROL],
    control_len: u8,
    /// Bytes read with the handshake's response that belong to the first frames.
    ahead: Vec<u8>,
    /// The server's close frame arrived (or the connection ended): reads are at end-of-file.
    eof: bool,
    /// Our close frame is queued or sent: nothing more is written.
    close_sent: bool,
    /// Whole frames waiting to be written from `out_at`; kept allocated between writes.
    out: Vec<u8>,
    out_at: usize,
    /// Masking keys: a xorshift generator seeded from the system's randomness.
    rng: u64,
}

fn protocol(why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("websocket protocol error: {why}"),
    )
}

/// The `Sec-WebSocket-Accept` a server must answer to `key` (RFC 6455 4.2.2).
fn accept_for(key: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key.as_bytes());
    ctx.update(ACCEPT_GUID);
    base64::engine::general_purpose::STANDARD.encode(ctx.finish())
}

fn random_bytes<const N: usize>() -> io::Result<[u8; N]> {
    use ring::rand::SecureRandom as _;
    let mut out = [0u8; N];
    ring::rand::SystemRandom::new()
        .fill(&mut out)
        .map_err(|_| io::Error::other("no system randomness"))?;
    Ok(out)
}

/// Checks the server's answer to the upgrade: 101, `Upgrade: websocket`, `Connection:
/// upgrade` and the accept value for our key.
fn check_response(head: &[u8], key: &str) -> io::Result<()> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(protocol("incomplete handshake response")),
        Err(e) => return Err(protocol(&format!("handshake response: {e}"))),
    }
    if resp.code != Some(101) {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!(
                "websocket handshake: status {} {}",
                resp.code.unwrap_or(0),
                resp.reason.unwrap_or("")
            ),
        ));
    }
    let has = |name: &str, token: &str| {
        resp.headers.iter().any(|h| {
            h.name.eq_ignore_ascii_case(name)
                && std::str::from_utf8(h.value)
                    .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if !has("upgrade", "websocket") || !has("connection", "upgrade") {
        return Err(protocol(
            "101 without Upgrade: websocket and Connection: upgrade",
        ));
    }
    let expected = accept_for(key);
    let accept = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-accept"))
        .map(|h| h.value);
    if accept != Some(expected.as_bytes()) {
        return Err(protocol("wrong or missing Sec-WebSocket-Accept"));
    }
    Ok(())
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsStream<S> {
    /// Upgrades `io` to a WebSocket: `host` is the Host header, `path` the request target.
    pub async fn handshake(mut io: S, host: &str, path: &str) -> io::Result<WsStream<S>> {
        let key = base64::engine::general_purpose::STANDARD.encode(random_bytes::<16>()?);
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        io.write_all(request.as_bytes()).await?;
        io.flush().await?;
        let mut buf = Vec::with_capacity(1024);
        let head_end = loop {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            if buf.len() > MAX_HEAD {
                return Err(protocol("handshake response head too long"));
            }
            if io.read_buf(&mut buf).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "websocket handshake: connection closed before the response",
                ));
            }
        };
        check_response(&buf[..head_end], &key)?;
        buf.drain(..head_end);
        // Thousands of idle sessions ((c)) should not each keep the handshake's buffer.
        if buf.is_empty() {
            buf = Vec::new();
        }
        let seed = u64::from_ne_bytes(random_bytes::<8>()?);
        Ok(WsStream {
            io,
            rx: Rx::Header,
            head: [0; 10],
            head_len: 0,
            control: [0; MAX_CONTROL],
            control_len: 0,
            ahead: buf,
            eof: false,
            close_sent: false,
            out: Vec::new(),
            out_at: 0,
            // xorshift must not start at zero.
            rng: seed | 1,
        })
    }
}

impl<S> WsStream<S> {
    fn next_mask(&mut self) -> [u8; 4] {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        (x as u32).to_ne_bytes()
    }

    /// Appends one masked frame of `op` carrying the bytes of `parts` (`len` in all).
    fn queue_frame(&mut self, op: u8, parts: &[&[u8]], len: usize) {
        let mask = self.next_mask();
        self.out.reserve(14 + len);
        self.out.push(FIN | op);
        if len < 126 {
            self.out.push(MASKED | len as u8);
        } else if len <= u16::MAX as usize {
            self.out.push(MASKED | 126);
            self.out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            self.out.push(MASKED | 127);
            self.out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        self.out.extend_from_slice(&mask);
        let mut offset = 0;
        for part in parts {
            mask_into(&mut self.out, part, mask, offset);
            offset += part.len();
        }
    }

    /// Takes the next bytes of a frame header; returns true once the header is whole.
    fn take_header(&mut self, data: &[u8], r: &mut usize) -> io::Result<bool> {
        let need = |head: &[u8]| -> usize {
            if head.len() < 2 {
                return 2;
            }
            match head[1] & 0x7F {
                126 => 4,
                127 => 10,
                _ => 2,
            }
        };
        loop {
            let have = self.head_len as usize;
            let want = need(&self.head[..have]);
            if have == want {
                return Ok(true);
            }
            if *r == data.len() {
                return Ok(false);
            }
            let take = (want - have).min(data.len() - *r);
            self.head[have..have + take].copy_from_slice(&data[*r..*r + take]);
            self.head_len += take as u8;
            *r += take;
        }
    }

    /// Starts the frame whose header is in `head`.
    fn start_frame(&mut self) -> io::Result<()> {
        let (b0, b1) = (self.head[0], self.head[1]);
        let len = match b1 & 0x7F {
            126 => u16::from_be_bytes([self.head[2], self.head[3]]) as u64,
            127 => u64::from_be_bytes(self.head[2..10].try_into().expect("8 bytes")),
            n => n as u64,
        };
        self.head_len = 0;
        if b1 & MASKED != 0 {
            return Err(protocol("a masked frame from the server"));
        }
        if b0 & 0x70 != 0 {
            return Err(protocol("reserved bits set"));
        }
        let op = b0 & 0x0F;
        match op {
            OP_CONTINUATION | OP_TEXT | OP_BINARY => {
                self.rx = if len == 0 {
                    Rx::Header
                } else {
                    Rx::Data { left: len }
                };
            }
            OP_CLOSE | OP_PING | OP_PONG => {
                if b0 & FIN == 0 || len > MAX_CONTROL as u64 {
                    return Err(protocol("a fragmented or long control frame"));
                }
                self.control_len = 0;
                self.rx = Rx::Control {
                    op,
                    left: len as u8,
                };
            }
            _ => return Err(protocol("unknown opcode")),
        }
        Ok(())
    }

    /// A whole control frame arrived in `control`.
    fn end_control(&mut self, op: u8) {
        let n = self.control_len as usize;
        match op {
            OP_PING if !self.close_sent => {
                let payload = self.control;
                self.queue_frame(OP_PONG, &[&payload[..n]], n);
            }
            OP_CLOSE => {
                self.eof = true;
                if !self.close_sent {
                    // Echo the status code (RFC 6455 5.5.1); the reason is not needed.
                    let code = self.control;
                    let echo = n.min(2);
                    self.queue_frame(OP_CLOSE, &[&code[..echo]], echo);
                    self.close_sent = true;
                }
            }
            _ => {}
        }
        self.rx = Rx::Header;
    }

    /// Takes frame headers and control frames out of `data`, freshly read, moving the data
    /// frames' payload down over them; returns how many payload bytes remain at its start.
    fn unframe(&mut self, data: &mut [u8]) -> io::Result<usize> {
        let (mut r, mut w) = (0, 0);
        while r < data.len() && !self.eof {
            match self.rx {
                Rx::Header => {
                    if self.take_header(data, &mut r)? {
                        self.start_frame()?;
                    }
                }
                Rx::Data { left } => {
                    let take = (data.len() - r).min(usize::try_from(left).unwrap_or(usize::MAX));
                    if r != w {
                        data.copy_within(r..r + take, w);
                    }
                    r += take;
                    w += take;
                    let left = left - take as u64;
                    self.rx = if left == 0 {
                        Rx::Header
                    } else {
                        Rx::Data { left }
                    };
                }
                Rx::Control { op, left } => {
                    let take = (data.len() - r).min(left as usize);
                    let at = self.control_len as usize;
                    self.control[at..at + take].copy_from_slice(&data[r..r + take]);
                    self.control_len += take as u8;
                    r += take;
                    let left = left - take as u8;
                    if left == 0 {
                        self.end_control(op);
                    } else {
                        self.rx = Rx::Control { op, left };
                    }
                }
            }
        }
        // A control frame of no payload ends with its header.
        if let Rx::Control { op, left: 0 } = self.rx {
            self.end_control(op);
        }
        Ok(w)
    }
}

impl<S: AsyncWrite + Unpin> WsStream<S> {
    /// Writes out the queued frames.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_at < self.out.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out[self.out_at..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_at += n;
        }
        self.out.clear();
        self.out_at = 0;
        Poll::Ready(Ok(()))
    }
}

/// Appends `src` XORed with the masking key, `offset` bytes into the payload (RFC 6455 5.3).
fn mask_into(out: &mut Vec<u8>, src: &[u8], mask: [u8; 4], offset: usize) {
    let mut key = mask;
    key.rotate_left(offset % 4);
    let wide = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut chunks = src.chunks_exact(8);
    for chunk in &mut chunks {
        let word = u64::from_ne_bytes(chunk.try_into().expect("8 bytes")) ^ wide;
        out.extend_from_slice(&word.to_ne_bytes());
    }
    for (i, b) in chunks.remainder().iter().enumerate() {
        out.push(b ^ key[i % 4]);
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            // Pongs and the close reply go out as soon as they can; a write error shows on
            // the next write.
            if this.out_at < this.out.len() {
                let _ = this.poll_drain(cx);
            }
            if this.eof || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            let start = buf.filled().len();
            if this.ahead.is_empty() {
                ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
                if buf.filled().len() == start {
                    // The connection ended without a close frame.
                    this.eof = true;
                    return Poll::Ready(Ok(()));
                }
            } else {
                let take = this.ahead.len().min(buf.remaining());
                buf.put_slice(&this.ahead[..take]);
                this.ahead.drain(..take);
                if this.ahead.is_empty() {
                    this.ahead = Vec::new();
                }
            }
            let kept = this.unframe(&mut buf.filled_mut()[start..])?;
            buf.set_filled(start + kept);
            if kept > 0 {
                if this.out_at < this.out.len() {
                    let _ = this.poll_drain(cx);
                }
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // Frames queue up until a flush (or until much is queued): the TLS records of one
        // request (hyper writes the head and the body apart) leave in one write, one
        // segment, as through a buffered WebSocket writer; a frame per record cost the
        // proxy a wake-up per record (measured: twice its CPU per request at 1 session).
        if this.out.len() - this.out_at >= MAX_OUT_FRAME {
            ready!(this.poll_drain(cx))?;
        }
        if this.close_sent {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let mut parts: [&[u8]; 64] = [&[]; 64];
        let (mut n, mut len) = (0, 0);
        for b in bufs.iter().filter(|b| !b.is_empty()) {
            if n == parts.len() || len == MAX_OUT_FRAME {
                break;
            }
            let take = b.len().min(MAX_OUT_FRAME - len);
            parts[n] = &b[..take];
            n += 1;
            len += take;
        }
        if len == 0 {
            return Poll::Ready(Ok(0));
        }
        this.queue_frame(OP_BINARY, &parts[..n], len);
        // The frame is ours now: it goes with the next flush.
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_sent {
            ready!(this.poll_drain(cx))?;
            let code = 1000u16.to_be_bytes();
            this.queue_frame(OP_CLOSE, &[&code], 2);
            this.close_sent = true;
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    /// Frame lengths around every boundary of the length encoding, and past one write's
    /// largest frame.
    const SIZES: [usize; 9] = [1, 125, 126, 127, 65535, 65536, 65537, 200_000, 3];

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
            .collect()
    }

    fn all(seed: u8) -> Vec<u8> {
        SIZES
            .iter()
            .enumerate()
            .flat_map(|(i, n)| pattern(*n, seed.wrapping_add(i as u8)))
            .collect()
    }

    #[test]
    fn accept_value_is_rfc_6455s_example() {
        assert_eq!(
            accept_for("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    /// tungstenite's server checks what a server must (masked client frames, valid headers):
    /// bytes both ways arrive whole and in order, a ping is answered with its payload, and
    /// the server's close reads as end-of-file and is echoed.
    #[tokio::test]
    async fn round_trip_with_a_tungstenite_server() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
            ws.send(Message::Ping(b"are you there".to_vec().into()))
                .await
                .unwrap();
            // Server to client: a frame per size, an empty one, and a text frame.
            ws.send(Message::binary(Vec::new())).await.unwrap();
            for (i, n) in SIZES.iter().enumerate() {
                ws.send(Message::binary(pattern(*n, 7u8.wrapping_add(i as u8))))
                    .await
                    .unwrap();
            }
            ws.send(Message::text("tail")).await.unwrap();
            // Client to server: everything the client writes, then the pong.
            let want = all(100);
            let (mut got, mut pong) = (Vec::new(), None);
            while got.len() < want.len() || pong.is_none() {
                match ws
                    .next()
                    .await
                    .expect("more messages")
                    .expect("valid frames")
                {
                    Message::Binary(b) => got.extend_from_slice(&b),
                    Message::Pong(p) => pong = Some(p.to_vec()),
                    other => panic!("unexpected message {other:?}"),
                }
            }
            assert!(got == want, "the client's bytes arrived changed");
            assert_eq!(pong.as_deref(), Some(&b"are you there"[..]));
            ws.close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            }))
            .await
            .unwrap();
            // The client echoes the close.
            match ws.next().await {
                Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Normal),
                other => panic!("expected the close echoed, got {other:?}"),
            }
        });

        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut ws = WsStream::handshake(tcp, &addr.to_string(), "/")
            .await
            .unwrap();
        // Read with small buffers first, so that headers split across reads.
        let mut want = all(7);
        want.extend_from_slice(b"tail");
        let mut got = Vec::new();
        let sizes = [1, 2, 3, 5, 8, 13, 4096, 70_000];
        let mut i = 0;
        while got.len() < want.len() {
            let mut buf = vec![0u8; sizes[i.min(sizes.len() - 1)]];
            i += 1;
            let n = ws.read(&mut buf).await.unwrap();
            assert!(n > 0, "end of stream after {} bytes", got.len());
            got.extend_from_slice(&buf[..n]);
        }
        assert!(got == want, "the server's bytes arrived changed");
        // Client to server: plain writes and vectored writes of several slices.
        let data = all(100);
        let (first, rest) = data.split_at(SIZES[..4].iter().sum());
        ws.write_all(first).await.unwrap();
        let mut rest = rest;
        while !rest.is_empty() {
            let a = rest.len().min(1001);
            let b = (rest.len() - a).min(3001);
            let slices = [
                IoSlice::new(&rest[..a]),
                IoSlice::new(&rest[a..a + b]),
                IoSlice::new(&rest[a + b..]),
            ];
            let n = ws.write_vectored(&slices).await.unwrap();
            assert!(n > 0);
            rest = &rest[n..];
        }
        ws.flush().await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(
            ws.read(&mut buf).await.unwrap(),
            0,
            "the close reads as EOF"
        );
        ws.flush().await.unwrap();
        server.await.unwrap();
    }

    /// A server that answers 101 without the right accept value is not a WebSocket server.
    #[tokio::test]
    async fn handshake_checks_the_accept_value() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                assert!(tcp.read_buf(&mut head).await.unwrap() > 0);
            }
            tcp.write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                  Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGJRzPxOo4Ywo=\r\n\r\n",
            )
            .await
            .unwrap();
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let err = WsStream::handshake(tcp, "x", "/")
            .await
            .err()
            .expect("refused");
        assert!(err.to_string().contains("Sec-WebSocket-Accept"), "{err}");
        server.await.unwrap();
    }

    /// Answers the upgrade correctly, with `then` in the same write.
    async fn raw_server(listener: TcpListener, then: &'static [u8]) {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            assert!(tcp.read_buf(&mut head).await.unwrap() > 0);
        }
        let text = String::from_utf8(head).unwrap();
        let key = text
            .lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
            .unwrap();
        let mut answer = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
            accept_for(key)
        )
        .into_bytes();
        answer.extend_from_slice(then);
        tcp.write_all(&answer).await.unwrap();
        let mut sink = Vec::new();
        let _ = tcp.read_to_end(&mut sink).await;
    }

    /// Frames that arrive in the same read as the handshake's answer are not lost.
    #[tokio::test]
    async fn frames_read_with_the_handshake_answer_are_kept() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(raw_server(
            listener,
            &[
                FIN | OP_BINARY,
                3,
                b'a',
                b'b',
                b'c',
                FIN | OP_BINARY,
                1,
                b'd',
            ],
        ));
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut ws = WsStream::handshake(tcp, "x", "/").await.unwrap();
        let mut got = Vec::new();
        while got.len() < 4 {
            let mut buf = [0u8; 16];
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), ws.read(&mut buf))
                .await
                .expect("the frames sent with the answer")
                .unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"abcd");
        drop(ws);
        server.await.unwrap();
    }

    /// Server frames are never masked (RFC 6455 5.1): one that is fails the read.
    #[tokio::test]
    async fn a_masked_server_frame_fails_the_read() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(raw_server(
            listener,
            &[FIN | OP_BINARY, MASKED | 1, 1, 2, 3, 4, 0x55],
        ));
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut ws = WsStream::handshake(tcp, "x", "/").await.unwrap();
        let mut buf = [0u8; 16];
        let err = ws.read(&mut buf).await.expect_err("a masked frame");
        assert!(err.to_string().contains("masked"), "{err}");
        drop(ws);
        server.await.unwrap();
    }
}
