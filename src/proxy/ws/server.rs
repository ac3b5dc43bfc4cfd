//! The listener's side of a tunnel session's WebSocket (RFC 6455, server role) as a byte
//! stream, with its own small frame codec.
//!
//! Why not tungstenite here: it zero-fills an 8 KiB read buffer per session, resident for
//! every idle session, and copies each write into a new message. `fastwebsockets` (0.10) and
//! `tokio-websockets` (0.13) were evaluated: both are frame/message APIs, not byte streams,
//! and both keep a per-connection read buffer (an 8 KiB `BytesMut`, a `FramedRead`). A tunnel
//! only needs binary payload bytes in order, so the codec is small:
//!
//! - Reads go straight into the caller's buffer (rustls's): frame headers are parsed out of
//!   it and payloads unmasked in place and moved down over the headers, so one read of the
//!   inner connection serves many frames and nothing is buffered between reads. A header
//!   split across reads waits in a 14-byte array; a ping's payload waits in the pong it is
//!   answered with.
//! - Each write becomes one binary frame, its header written with the payload in one
//!   vectored write (several TLS records go in one frame). An inner connection without
//!   vectored writes gets header and payload copied into a buffer, released once flushed.
//! - Nothing is held while a session is idle beyond the fixed state in [`ServerStream`].
//!
//! Text and binary frames both carry payload bytes, as with the tungstenite adapter. A text
//! message must be UTF-8 (RFC 6455 8.1), checked as it streams past across frames and reads
//! (a sequence split between two keeps its first bytes in a 3-byte tail); one that is not
//! closes the session with 1007, as tungstenite did. A close frame's code is checked, and
//! its reason must be UTF-8 too (RFC 6455 5.5.1): one that is not fails the connection with
//! 1007 instead of being echoed. The reason is then discarded.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{PongTimeout, TooBig};
use crate::proxy::keepalive::{PingAction, PingState};

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;
const FIN: u8 = 0x80;

/// Largest control frame payload (RFC 6455 5.5).
const MAX_CONTROL: usize = 125;
/// Largest frame written: rustls hands over at most a few records at a time, so frames stay
/// small for any peer's frame limit, and a big write simply takes several frames.
const MAX_OUT_FRAME: usize = 64 * 1024;
/// Caller slices taken into one vectored write (rustls passes at most 64).
const MAX_SLICES: usize = 64;

const CLOSE_NORMAL: u16 = 1000;
const CLOSE_PROTOCOL: u16 = 1002;
const CLOSE_INVALID_DATA: u16 = 1007;
const CLOSE_TOO_BIG: u16 = 1009;

/// Where the reader is in the incoming frame sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rx {
    /// Collecting a frame header in `head`.
    Header,
    /// Payload of a text, binary or continuation frame: `left` bytes to come.
    Data { left: u64 },
    /// Payload of a ping, pong or close frame.
    Control { op: u8, left: u8 },
}

/// Why processing received bytes stopped.
enum Stop {
    /// The peer's close frame arrived: end of the stream.
    Closed,
    /// A protocol violation or a limit: close with this code, fail with this error.
    Fail(u16, io::Error),
}

fn protocol(why: &str) -> Stop {
    Stop::Fail(
        CLOSE_PROTOCOL,
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("websocket protocol error: {why}"),
        ),
    )
}

/// `what` (a text message, a close reason) is not UTF-8: close with 1007.
fn not_utf8(what: &str) -> Stop {
    Stop::Fail(
        CLOSE_INVALID_DATA,
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("websocket protocol error: {what} that is not UTF-8"),
        ),
    )
}

/// Checks the next bytes of a text message. `tail` holds the first bytes of a UTF-8
/// sequence that the previous bytes ended inside; on return it holds this chunk's.
fn check_utf8(tail: &mut ([u8; 3], u8), data: &[u8]) -> bool {
    let mut data = data;
    if tail.1 > 0 {
        // Complete the split sequence first (at most 4 bytes in all).
        let mut seq = [0u8; 4];
        let have = tail.1 as usize;
        seq[..have].copy_from_slice(&tail.0[..have]);
        let take = (4 - have).min(data.len());
        seq[have..have + take].copy_from_slice(&data[..take]);
        match std::str::from_utf8(&seq[..have + take]) {
            Ok(_) => {
                tail.1 = 0;
                data = &data[take..];
            }
            Err(e) if e.valid_up_to() > 0 => {
                let used = e.valid_up_to() - have;
                tail.1 = 0;
                data = &data[used..];
            }
            Err(e) if e.error_len().is_none() => {
                // Still incomplete: all of it was taken.
                tail.0[..have + take].copy_from_slice(&seq[..have + take]);
                tail.1 = (have + take) as u8;
                return true;
            }
            Err(_) => return false,
        }
    }
    match std::str::from_utf8(data) {
        Ok(_) => true,
        Err(e) if e.error_len().is_none() => {
            let rest = &data[e.valid_up_to()..];
            tail.0[..rest.len()].copy_from_slice(rest);
            tail.1 = rest.len() as u8;
            true
        }
        Err(_) => false,
    }
}

fn too_big(why: String) -> Stop {
    Stop::Fail(
        CLOSE_TOO_BIG,
        io::Error::new(io::ErrorKind::InvalidData, TooBig(why)),
    )
}

/// Close codes a peer may send (RFC 6455 7.4; 1012-1014 registered since).
fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// XORs `data` with the masking key, `offset` bytes into the payload (RFC 6455 5.3).
fn unmask(data: &mut [u8], mask: [u8; 4], offset: usize) {
    let mut key = mask;
    key.rotate_left(offset % 4);
    let wide = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let word = u64::from_ne_bytes(chunk.try_into().expect("8 bytes")) ^ wide;
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i % 4];
    }
}

/// A server frame header (unmasked) for `len` payload bytes; returns its length.
fn encode_header(out: &mut [u8; 10], op: u8, len: usize) -> usize {
    out[0] = FIN | op;
    if len < 126 {
        out[1] = len as u8;
        2
    } else if len <= u16::MAX as usize {
        out[1] = 126;
        out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

/// The server side of a tunnel session's WebSocket as a byte stream. See the module doc.
pub struct ServerStream<S> {
    io: S,
    max_frame: u64,
    max_message: u64,
    /// Pings on an idle session (the listener's sessions).
    ping: Option<PingState>,

    // Read side.
    rx: Rx,
    head: [u8; 14],
    head_len: u8,
    mask: [u8; 4],
    /// Payload bytes of the current frame unmasked so far (the mask offset).
    unmasked: u64,
    /// A fragmented message is open: continuation frames are expected.
    in_message: bool,
    /// The current message is text (its bytes are checked for UTF-8), and its last frame
    /// has arrived.
    text: bool,
    text_fin: bool,
    /// A UTF-8 sequence the text read so far ended inside.
    utf8_tail: ([u8; 3], u8),
    message_len: u64,
    /// The current ping's payload goes into `ctrl` as the pong that answers it.
    collect_ping: bool,
    close_code_in: [u8; 2],
    /// The close frame's reason so far: a UTF-8 sequence it ended inside, and whether all of
    /// it was UTF-8. (Control frames interleave with a fragmented text message, so this is
    /// not `utf8_tail`.)
    close_reason_tail: ([u8; 3], u8),
    close_reason_ok: bool,
    /// An error found after data that was returned first; reported by the next read.
    failed: Option<io::Error>,
    read_eof: bool,
    /// The peer closed: our answer (its code echoed) is queued by the read that reports the
    /// end, so data read with the close can still be answered first (RFC 6455 5.5.1).
    close_answer: Option<Option<u16>>,

    // Write side. Order on the wire: a frame once started is finished before anything else.
    /// Header of the current data frame, written from `hdr_pos` (vectored path).
    hdr: [u8; 10],
    hdr_pos: u8,
    hdr_len: u8,
    /// Payload bytes of the current data frame not yet taken from the caller.
    remaining: usize,
    /// Whole frames not yet written (inner IO without vectored writes); released on flush.
    wbuf: BytesMut,
    /// A control frame (pong, ping, close) queued or being written from `ctrl_pos`.
    ctrl: [u8; 2 + MAX_CONTROL],
    ctrl_len: u8,
    ctrl_pos: u8,
    /// A close frame to send next (`None` inside: without a code), before any queued pong.
    close_queued: Option<Option<u16>>,
    /// Our close frame is in `ctrl` or sent: no data, pong or ping may follow.
    close_started: bool,
}

impl<S> ServerStream<S> {
    /// A session over `io` (upgrade already answered) with `[limits]`'s message and frame
    /// limits.
    pub fn new(io: S, max_message: usize, max_frame: usize) -> Self {
        ServerStream {
            io,
            max_frame: max_frame as u64,
            max_message: max_message as u64,
            ping: None,
            rx: Rx::Header,
            head: [0; 14],
            head_len: 0,
            mask: [0; 4],
            unmasked: 0,
            in_message: false,
            text: false,
            text_fin: false,
            utf8_tail: ([0; 3], 0),
            message_len: 0,
            collect_ping: false,
            close_code_in: [0; 2],
            close_reason_tail: ([0; 3], 0),
            close_reason_ok: true,
            failed: None,
            read_eof: false,
            close_answer: None,
            hdr: [0; 10],
            hdr_pos: 0,
            hdr_len: 0,
            remaining: 0,
            wbuf: BytesMut::new(),
            ctrl: [0; 2 + MAX_CONTROL],
            ctrl_len: 0,
            ctrl_pos: 0,
            close_queued: None,
            close_started: false,
        }
    }

    /// Pings the peer when the session is idle and fails reads once it stops answering
    /// (see `proxy::keepalive`).
    pub fn with_pings(mut self, ping: PingState) -> Self {
        self.ping = Some(ping);
        self
    }

    /// Bytes of the current header still needed, given what `head` holds.
    fn header_need(&self) -> usize {
        if self.head_len < 2 {
            return 2;
        }
        let ext = match self.head[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        2 + ext + 4
    }

    /// Checks the first two header bytes, so that a bad frame is refused before its length.
    fn check_start(&self) -> Result<(), Stop> {
        let (b0, b1) = (self.head[0], self.head[1]);
        if b0 & 0x70 != 0 {
            return Err(protocol("reserved bits set (no extension was negotiated)"));
        }
        if b1 & 0x80 == 0 {
            return Err(protocol("unmasked frame from the client"));
        }
        let op = b0 & 0x0f;
        let fin = b0 & FIN != 0;
        match op {
            OP_CLOSE | OP_PING | OP_PONG => {
                if !fin {
                    return Err(protocol("fragmented control frame"));
                }
                if (b1 & 0x7f) as usize > MAX_CONTROL {
                    return Err(protocol("control frame over 125 bytes"));
                }
            }
            OP_CONTINUATION if !self.in_message => {
                return Err(protocol("continuation frame outside a fragmented message"));
            }
            OP_TEXT | OP_BINARY if self.in_message => {
                return Err(protocol("new message inside a fragmented one"));
            }
            OP_CONTINUATION | OP_TEXT | OP_BINARY => {}
            _ => return Err(protocol("unknown opcode")),
        }
        Ok(())
    }

    /// The header is complete: checks the length against the limits and starts the payload.
    fn start_frame(&mut self) -> Result<(), Stop> {
        let h = &self.head[..self.head_len as usize];
        let (len, mask_at) = match h[1] & 0x7f {
            126 => (u16::from_be_bytes([h[2], h[3]]) as u64, 4),
            127 => {
                let len = u64::from_be_bytes(h[2..10].try_into().expect("8 bytes"));
                if len >> 63 != 0 {
                    return Err(protocol("frame length with the top bit set"));
                }
                (len, 10)
            }
            n => (n as u64, 2),
        };
        self.mask.copy_from_slice(&h[mask_at..mask_at + 4]);
        let op = h[0] & 0x0f;
        let fin = h[0] & FIN != 0;
        self.head_len = 0;
        self.unmasked = 0;
        if op >= OP_CLOSE {
            self.rx = Rx::Control {
                op,
                left: len as u8,
            };
            if op == OP_CLOSE {
                self.close_reason_tail.1 = 0;
                self.close_reason_ok = true;
            }
            if op == OP_PING {
                // Answer the newest ping: an older pong not yet started gives way to it.
                // One already on the wire is finished and this ping goes unanswered.
                self.collect_ping = self.ctrl_pos == 0 && !self.closing();
                if self.collect_ping {
                    self.ctrl_len = 0;
                }
            }
            if len == 0 {
                return self.end_control(op, 0);
            }
            return Ok(());
        }
        if len > self.max_frame {
            return Err(too_big(format!(
                "a frame of {len} bytes is over limits.max_ws_frame_bytes ({})",
                self.max_frame
            )));
        }
        if op != OP_CONTINUATION {
            self.message_len = 0;
            self.text = op == OP_TEXT;
            self.utf8_tail.1 = 0;
        }
        self.text_fin = fin;
        self.message_len += len;
        if self.message_len > self.max_message {
            return Err(too_big(format!(
                "a message of {} bytes or more is over limits.max_ws_message_bytes ({})",
                self.message_len, self.max_message
            )));
        }
        self.in_message = !fin;
        self.rx = Rx::Data { left: len };
        if len == 0 {
            self.rx = Rx::Header;
            return self.end_data();
        }
        Ok(())
    }

    /// A data frame's payload is complete: a text message must not end inside a sequence.
    fn end_data(&mut self) -> Result<(), Stop> {
        if self.text && self.text_fin && self.utf8_tail.1 > 0 {
            return Err(not_utf8("a text message"));
        }
        Ok(())
    }

    /// Payload bytes of a control frame (already unmasked).
    fn control_bytes(&mut self, op: u8, data: &[u8]) {
        let at = self.unmasked as usize;
        match op {
            // A close queued meanwhile owns `ctrl` now: the ping goes unanswered.
            OP_PING if self.collect_ping && !self.closing() => {
                self.ctrl[2 + at..2 + at + data.len()].copy_from_slice(data);
            }
            OP_CLOSE => {
                for (i, b) in data.iter().enumerate() {
                    if let Some(slot) = self.close_code_in.get_mut(at + i) {
                        *slot = *b;
                    }
                }
                // Bytes from offset 2 on are the reason.
                if let Some(reason) = data.get(2usize.saturating_sub(at)..)
                    && !reason.is_empty()
                {
                    self.close_reason_ok &= check_utf8(&mut self.close_reason_tail, reason);
                }
            }
            _ => {}
        }
    }

    /// A control frame of `len` payload bytes is complete.
    fn end_control(&mut self, op: u8, len: usize) -> Result<(), Stop> {
        self.rx = Rx::Header;
        match op {
            OP_PING if self.collect_ping && !self.closing() => {
                self.ctrl[0] = FIN | OP_PONG;
                self.ctrl[1] = len as u8;
                self.ctrl_len = 2 + len as u8;
                self.ctrl_pos = 0;
                Ok(())
            }
            OP_CLOSE => {
                let code = match len {
                    0 => None,
                    1 => return Err(protocol("close frame with a 1-byte payload")),
                    _ => {
                        let code = u16::from_be_bytes(self.close_code_in);
                        if !valid_close_code(code) {
                            return Err(protocol("invalid close code"));
                        }
                        if !self.close_reason_ok || self.close_reason_tail.1 > 0 {
                            return Err(not_utf8("a close reason"));
                        }
                        Some(code)
                    }
                };
                self.close_answer = Some(code);
                Err(Stop::Closed)
            }
            _ => Ok(()),
        }
    }

    /// Parses `data` (just read) in place: payload bytes are unmasked and moved to the front,
    /// headers and control frames taken out. Returns how many payload bytes lead `data`.
    fn process(&mut self, data: &mut [u8]) -> (usize, Result<(), Stop>) {
        let n = data.len();
        let (mut r, mut w) = (0, 0);
        while r < n {
            match self.rx {
                Rx::Header => {
                    let have = self.head_len as usize;
                    let take = (self.header_need() - have).min(n - r);
                    self.head[have..have + take].copy_from_slice(&data[r..r + take]);
                    self.head_len += take as u8;
                    r += take;
                    // The first two bytes say whether the frame is acceptable at all.
                    if have < 2
                        && self.head_len >= 2
                        && let Err(stop) = self.check_start()
                    {
                        return (w, Err(stop));
                    }
                    if (self.head_len as usize) < self.header_need() {
                        continue;
                    }
                    if let Err(stop) = self.start_frame() {
                        return (w, Err(stop));
                    }
                }
                Rx::Data { left } => {
                    let k = (left.min((n - r) as u64)) as usize;
                    unmask(&mut data[r..r + k], self.mask, self.unmasked as usize);
                    if self.text && !check_utf8(&mut self.utf8_tail, &data[r..r + k]) {
                        return (w, Err(not_utf8("a text message")));
                    }
                    data.copy_within(r..r + k, w);
                    r += k;
                    w += k;
                    self.unmasked += k as u64;
                    let left = left - k as u64;
                    if left == 0 {
                        self.rx = Rx::Header;
                        if let Err(stop) = self.end_data() {
                            return (w, Err(stop));
                        }
                    } else {
                        self.rx = Rx::Data { left };
                    }
                }
                Rx::Control { op, left } => {
                    let k = (left as usize).min(n - r);
                    unmask(&mut data[r..r + k], self.mask, self.unmasked as usize);
                    self.control_bytes(op, &data[r..r + k]);
                    r += k;
                    self.unmasked += k as u64;
                    let left = left - k as u8;
                    if left == 0 {
                        if let Err(stop) = self.end_control(op, self.unmasked as usize) {
                            return (w, Err(stop));
                        }
                    } else {
                        self.rx = Rx::Control { op, left };
                    }
                }
            }
        }
        (w, Ok(()))
    }

    /// Our close frame is queued or sent.
    fn closing(&self) -> bool {
        self.close_started || self.close_queued.is_some()
    }

    /// Queues a close frame unless one is already on its way.
    fn queue_close(&mut self, code: u16) {
        if !self.closing() {
            self.close_queued = Some(Some(code));
        }
    }
}

/// One write of the inner IO; a zero-byte write of a non-empty buffer is an error.
fn check_written(n: usize) -> io::Result<usize> {
    if n == 0 {
        Err(io::ErrorKind::WriteZero.into())
    } else {
        Ok(n)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> ServerStream<S> {
    /// Writes what this stream owes the peer on its own: the rest of a started header,
    /// buffered frames, then (between data frames only) a queued close, pong or ping. Ready
    /// once nothing of ours is left, or when the current data frame waits for caller bytes.
    fn poll_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.ctrl_pos > 0 {
                let rest = &self.ctrl[self.ctrl_pos as usize..self.ctrl_len as usize];
                let n = check_written(ready!(Pin::new(&mut self.io).poll_write(cx, rest))?)?;
                self.ctrl_pos += n as u8;
                if self.ctrl_pos == self.ctrl_len {
                    self.ctrl_pos = 0;
                    self.ctrl_len = 0;
                }
                continue;
            }
            if self.hdr_pos < self.hdr_len {
                let rest = &self.hdr[self.hdr_pos as usize..self.hdr_len as usize];
                let n = check_written(ready!(Pin::new(&mut self.io).poll_write(cx, rest))?)?;
                self.hdr_pos += n as u8;
                continue;
            }
            if !self.wbuf.is_empty() {
                let n = check_written(ready!(Pin::new(&mut self.io).poll_write(cx, &self.wbuf))?)?;
                self.wbuf.advance(n);
                continue;
            }
            if self.remaining > 0 {
                return Poll::Ready(Ok(()));
            }
            if let Some(code) = self.close_queued.take() {
                // A queued (unstarted) pong or ping gives way to the close.
                self.ctrl[0] = FIN | OP_CLOSE;
                self.ctrl_len = 2;
                if let Some(code) = code {
                    self.ctrl[1] = 2;
                    self.ctrl[2..4].copy_from_slice(&code.to_be_bytes());
                    self.ctrl_len = 4;
                } else {
                    self.ctrl[1] = 0;
                }
                self.close_started = true;
            } else if self.ctrl_len == 0 {
                return Poll::Ready(Ok(()));
            }
            let frame = &self.ctrl[..self.ctrl_len as usize];
            let n = check_written(ready!(Pin::new(&mut self.io).poll_write(cx, frame))?)?;
            self.ctrl_pos = n as u8;
            if self.ctrl_pos == self.ctrl_len {
                self.ctrl_pos = 0;
                self.ctrl_len = 0;
            }
        }
    }

    /// Best effort after a failure: the close frame goes out if the connection takes it now.
    fn try_send_close(&mut self, cx: &mut Context<'_>) {
        if let Poll::Ready(Ok(())) = self.poll_out(cx) {
            let _ = Pin::new(&mut self.io).poll_flush(cx);
        }
    }

    /// Answers the peer's close (echoing its code) unless our own close went first.
    fn answer_close(&mut self, cx: &mut Context<'_>) {
        if let Some(code) = self.close_answer.take() {
            if !self.closing() {
                self.close_queued = Some(code);
            }
            self.try_send_close(cx);
        }
    }

    /// Sends a ping if one is due; an error if the last one went unanswered.
    fn keepalive(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        // Not while a control frame waits (we owe one, or the peer owes us a pong: asked
        // again on the next poll), nor while a ping's payload is collected into `ctrl`.
        let collecting = self.collect_ping && matches!(self.rx, Rx::Control { op: OP_PING, .. });
        let can_ping = self.ctrl_len == 0 && !self.closing() && !collecting;
        let Some(ping) = self.ping.as_mut() else {
            return Ok(());
        };
        match ping.poll(cx) {
            PingAction::Nothing => Ok(()),
            PingAction::Dead => Err(io::Error::new(io::ErrorKind::TimedOut, PongTimeout)),
            PingAction::SendPing if can_ping => {
                ping.pinged();
                self.ctrl[0] = FIN | OP_PING;
                self.ctrl[1] = 0;
                self.ctrl_len = 2;
                match self.poll_out(cx) {
                    Poll::Ready(Err(e)) => Err(e),
                    _ => Ok(()),
                }
            }
            PingAction::SendPing => Ok(()),
        }
    }

    /// Starts a data frame for up to `total` caller bytes; returns how many the frame holds.
    fn start_data_frame(&mut self, bufs: &[IoSlice<'_>], total: usize) -> usize {
        let len = total.min(MAX_OUT_FRAME);
        if self.io.is_write_vectored() {
            self.hdr_len = encode_header(&mut self.hdr, OP_BINARY, len) as u8;
            self.hdr_pos = 0;
            self.remaining = len;
        } else {
            let mut hdr = [0u8; 10];
            let h = encode_header(&mut hdr, OP_BINARY, len);
            self.wbuf.reserve(h + len);
            self.wbuf.put_slice(&hdr[..h]);
            let mut left = len;
            for b in bufs {
                let take = b.len().min(left);
                self.wbuf.put_slice(&b[..take]);
                left -= take;
                if left == 0 {
                    break;
                }
            }
        }
        len
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for ServerStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.failed.take() {
            this.read_eof = true;
            return Poll::Ready(Err(e));
        }
        if this.read_eof {
            this.answer_close(cx);
            return Poll::Ready(Ok(()));
        }
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            // Pongs and closes move on whenever the session is polled.
            if let Poll::Ready(Err(e)) = this.poll_out(cx) {
                this.read_eof = true;
                return Poll::Ready(Err(e));
            }
            if let Err(e) = this.keepalive(cx) {
                this.read_eof = true;
                return Poll::Ready(Err(e));
            }
            let dst = buf.initialize_unfilled();
            let mut inner = ReadBuf::new(dst);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut inner))?;
            let n = inner.filled().len();
            if n == 0 {
                this.read_eof = true;
                if this.rx == Rx::Header && this.head_len == 0 {
                    return Poll::Ready(Ok(()));
                }
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "websocket connection ended inside a frame",
                )));
            }
            if let Some(p) = this.ping.as_mut() {
                p.received();
            }
            let (w, outcome) = this.process(&mut dst[..n]);
            match outcome {
                Ok(()) => {
                    // A pong for a ping just read goes now if the connection takes it; a
                    // write error shows on the next write.
                    if this.ctrl_len > 0 {
                        let _ = this.poll_out(cx);
                    }
                }
                Err(Stop::Closed) => {
                    this.read_eof = true;
                    if w == 0 {
                        this.answer_close(cx);
                    }
                }
                Err(Stop::Fail(code, e)) => {
                    this.queue_close(code);
                    this.try_send_close(cx);
                    if w == 0 {
                        this.read_eof = true;
                        return Poll::Ready(Err(e));
                    }
                    this.failed = Some(e);
                }
            }
            if w > 0 {
                buf.advance(w);
                return Poll::Ready(Ok(()));
            }
            if this.read_eof {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ServerStream<S> {
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
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        loop {
            if this.remaining == 0 {
                // Between frames: what we owe first (buffered frames, pong, close).
                ready!(this.poll_out(cx))?;
                if this.closing() {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "websocket is closing",
                    )));
                }
                let len = this.start_data_frame(bufs, total);
                if !this.io.is_write_vectored() {
                    if let Some(p) = this.ping.as_mut() {
                        p.sent();
                    }
                    // The frame is ours now; it goes out on this poll or the next flush.
                    if let Poll::Ready(Err(e)) = this.poll_out(cx) {
                        return Poll::Ready(Err(e));
                    }
                    return Poll::Ready(Ok(len));
                }
            }
            // The rest of the header with as much payload as the frame takes, in one write.
            let mut slices = [IoSlice::new(&[]); MAX_SLICES + 1];
            let mut count = 0;
            if this.hdr_pos < this.hdr_len {
                slices[0] = IoSlice::new(&this.hdr[this.hdr_pos as usize..this.hdr_len as usize]);
                count = 1;
            }
            let mut budget = this.remaining;
            for b in bufs {
                if budget == 0 || count == slices.len() {
                    break;
                }
                let take = b.len().min(budget);
                if take > 0 {
                    slices[count] = IoSlice::new(&b[..take]);
                    count += 1;
                    budget -= take;
                }
            }
            let n = check_written(ready!(
                Pin::new(&mut this.io).poll_write_vectored(cx, &slices[..count])
            )?)?;
            let of_header = n.min((this.hdr_len - this.hdr_pos) as usize);
            this.hdr_pos += of_header as u8;
            let payload = n - of_header;
            if payload > 0 {
                this.remaining -= payload;
                if let Some(p) = this.ping.as_mut() {
                    p.sent();
                }
                if this.remaining == 0 {
                    // The frame is complete: a pong that waited for it may go now.
                    let _ = this.poll_out(cx);
                }
                return Poll::Ready(Ok(payload));
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_out(cx))?;
        if this.wbuf.capacity() > 0 {
            this.wbuf = BytesMut::new();
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // A data frame the caller left unfinished cannot be followed by a close: the peer
        // sees the connection end inside it.
        if this.remaining == 0 {
            if let Some(code) = this.close_answer.take()
                && !this.closing()
            {
                this.close_queued = Some(code);
            }
            this.queue_close(CLOSE_NORMAL);
        }
        ready!(this.poll_out(cx))?;
        this.wbuf = BytesMut::new();
        ready!(Pin::new(&mut this.io).poll_flush(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use crate::proxy::keepalive::KeepaliveCounters;
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};

    const LIMIT: usize = 4 << 20;

    /// An inner connection with vectored writes that moves at most `chunk` bytes per read
    /// or write and is not ready every other write: partial writes, headers split across
    /// reads.
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

    fn plain(max_message: usize, max_frame: usize) -> (ServerStream<DuplexStream>, DuplexStream) {
        let (s, c) = duplex(64 * 1024);
        (ServerStream::new(s, max_message, max_frame), c)
    }

    fn trickle(chunk: usize) -> (ServerStream<Trickle>, DuplexStream) {
        let (s, c) = duplex(64 * 1024);
        let io = Trickle {
            io: s,
            chunk,
            stall: false,
        };
        (ServerStream::new(io, LIMIT, LIMIT), c)
    }

    async fn client(io: DuplexStream) -> WebSocketStream<DuplexStream> {
        WebSocketStream::from_raw_socket(io, Role::Client, None).await
    }

    /// A client frame as raw bytes, masked unless `mask` is `None`.
    fn raw_frame(b0: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut out = vec![b0];
        let m = if mask.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => out.push(m | n as u8),
            n if n <= 0xffff => {
                out.push(m | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(m | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let mut body = payload.to_vec();
        if let Some(mask) = mask {
            out.extend_from_slice(&mask);
            unmask(&mut body, mask, 0);
        }
        out.extend_from_slice(&body);
        out
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i * 31 + seed as usize) as u8).collect()
    }

    /// Reads to the end through odd-sized reads, echoing every chunk; then shuts down.
    async fn echo_server<S: AsyncRead + AsyncWrite + Unpin>(
        mut server: ServerStream<S>,
    ) -> io::Result<Vec<u8>> {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 1021];
        loop {
            let n = server.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            server.write_all(&buf[..n]).await?;
            server.flush().await?;
        }
        server.shutdown().await?;
        Ok(got)
    }

    /// Big, text and fragmented messages (with a ping inside the fragmented one) go in; the
    /// same bytes come back as binary frames, the ping is answered, the close is echoed.
    async fn data_both_ways<S>(server: ServerStream<S>, client_io: DuplexStream, big: usize)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let big = pattern(big, 7);
        let mut expected = big.clone();
        expected.extend_from_slice("héllo".as_bytes());
        expected.extend_from_slice(b"abcdefghi");
        expected.extend_from_slice(&pattern(300, 3));
        let server = tokio::spawn(echo_server(server));
        let (mut tx, mut rx) = client(client_io).await.split();
        let send = async move {
            tx.send(Message::binary(big)).await.unwrap();
            tx.send(Message::text("héllo")).await.unwrap();
            let bin = OpCode::Data(Data::Binary);
            let cont = OpCode::Data(Data::Continue);
            tx.send(Message::Frame(Frame::message(&b"abc"[..], bin, false)))
                .await
                .unwrap();
            tx.send(Message::Frame(Frame::message(&b"def"[..], cont, false)))
                .await
                .unwrap();
            tx.send(Message::Ping(bytes::Bytes::from_static(b"in between")))
                .await
                .unwrap();
            tx.send(Message::Frame(Frame::message(&b"ghi"[..], cont, true)))
                .await
                .unwrap();
            tx.send(Message::binary(pattern(300, 3))).await.unwrap();
            tx.send(Message::Close(Some(CloseFrame {
                code: CloseCode::Library(4000),
                reason: "done".into(),
            })))
            .await
            .unwrap();
        };
        let receive = async move {
            let (mut back, mut pongs, mut close) = (Vec::new(), Vec::new(), None);
            while let Some(m) = rx.next().await {
                match m.unwrap() {
                    Message::Binary(b) => back.extend_from_slice(&b),
                    Message::Pong(p) => pongs.push(p),
                    Message::Close(c) => close = c.map(|c| c.code),
                    other => panic!("unexpected {other:?}"),
                }
            }
            (back, pongs, close)
        };
        let ((), (back, pongs, close)) = tokio::join!(send, receive);
        let got = server.await.unwrap().expect("server side");
        assert_eq!(got.len(), expected.len());
        assert!(
            got == expected,
            "the server read other bytes than were sent"
        );
        assert!(
            back == expected,
            "the bytes written back changed on the way"
        );
        assert_eq!(pongs, vec![bytes::Bytes::from_static(b"in between")]);
        assert_eq!(close, Some(CloseCode::Library(4000)), "close code echoed");
    }

    #[tokio::test]
    async fn data_both_ways_over_a_plain_connection() {
        let (server, c) = plain(LIMIT, LIMIT);
        data_both_ways(server, c, 1 << 20).await;
    }

    #[tokio::test]
    async fn data_both_ways_through_partial_vectored_writes_and_split_headers() {
        for (chunk, big) in [(1, 3000), (3, 20_000), (7, 70_000), (1000, 1 << 20)] {
            let (server, c) = trickle(chunk);
            data_both_ways(server, c, big).await;
        }
    }

    #[tokio::test]
    async fn ping_is_answered_with_its_payload() {
        let (mut server, c) = plain(LIMIT, LIMIT);
        let mut ws = client(c).await;
        ws.send(Message::Ping(vec![9u8; 125].into())).await.unwrap();
        ws.send(Message::binary(&b"after"[..])).await.unwrap();
        let mut buf = [0u8; 16];
        let n = server.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"after");
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::Pong(vec![9u8; 125].into())
        );
    }

    #[tokio::test]
    async fn server_shutdown_sends_close_1000() {
        let (mut server, c) = plain(LIMIT, LIMIT);
        let mut ws = client(c).await;
        server.write_all(b"bye").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::binary(&b"bye"[..])
        );
        match ws.next().await.unwrap().unwrap() {
            Message::Close(Some(f)) => assert_eq!(f.code, CloseCode::Normal),
            other => panic!("expected a close, got {other:?}"),
        }
        // Writes after the close are refused.
        let e = server.write_all(b"more").await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    }

    #[tokio::test]
    async fn client_close_reads_as_end_and_is_echoed() {
        let (mut server, c) = plain(LIMIT, LIMIT);
        let mut ws = client(c).await;
        ws.close(Some(CloseFrame {
            code: CloseCode::Away,
            reason: "".into(),
        }))
        .await
        .unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(server.read(&mut buf).await.unwrap(), 0);
        assert_eq!(server.read(&mut buf).await.unwrap(), 0, "stays at the end");
        match ws.next().await.unwrap().unwrap() {
            Message::Close(Some(f)) => assert_eq!(f.code, CloseCode::Away),
            other => panic!("expected the close echoed, got {other:?}"),
        }
        assert!(server.write_all(b"late").await.is_err());
    }

    /// Reads what the server sent back on a raw client connection until it closes.
    async fn raw_answer(c: &mut DuplexStream) -> Vec<u8> {
        let mut back = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut back)).await;
        back
    }

    /// A close frame's reason must be UTF-8 (RFC 6455 5.5.1; 8.1: fail with 1007), however
    /// the frame is cut, and it is judged apart from a text message it interrupts.
    #[tokio::test]
    async fn a_close_reason_must_be_utf8() {
        let m = Some([9, 8, 7, 6]);
        let close = |code: u16, reason: &[u8]| {
            let mut payload = code.to_be_bytes().to_vec();
            payload.extend_from_slice(reason);
            raw_frame(0x88, &payload, m)
        };
        let text_open = raw_frame(0x01, &[b'a', 0xe2, 0x9c], m);
        type Case = (&'static str, Vec<u8>, Result<(), ()>, [u8; 4]);
        let cases: Vec<Case> = vec![
            (
                "invalid byte",
                close(1000, b"bye \xff"),
                Err(()),
                [0x88, 2, 0x03, 0xef],
            ),
            (
                "a surrogate",
                close(1001, &[0xed, 0xa0, 0x80]),
                Err(()),
                [0x88, 2, 0x03, 0xef],
            ),
            (
                "cut sequence",
                close(1001, &[b'x', 0xe2, 0x9c]),
                Err(()),
                [0x88, 2, 0x03, 0xef],
            ),
            (
                "valid",
                close(1001, "adiós ✓".as_bytes()),
                Ok(()),
                [0x88, 2, 0x03, 0xe9],
            ),
            (
                "inside a text message",
                [text_open.clone(), close(1001, b"x")].concat(),
                Ok(()),
                [0x88, 2, 0x03, 0xe9],
            ),
        ];
        for (what, bytes, expect, answer) in cases {
            let (mut server, mut c) = plain(LIMIT, LIMIT);
            // One byte at a time, so that the reason is cut at every offset.
            let writer = tokio::spawn(async move {
                for b in bytes {
                    c.write_all(&[b]).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                c
            });
            let mut buf = [0u8; 64];
            let mut result = server.read(&mut buf).await;
            while let Ok(n) = result
                && n > 0
            {
                // The text message's bytes come first.
                result = server.read(&mut buf).await;
            }
            match expect {
                Ok(()) => assert_eq!(result.unwrap(), 0, "{what}: the end"),
                Err(()) => {
                    let e = result.expect_err(what);
                    assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{what}");
                    assert!(e.to_string().contains("close reason"), "{what}: {e}");
                }
            }
            let mut c = writer.await.unwrap();
            drop(server);
            assert_eq!(raw_answer(&mut c).await, answer, "{what}");
        }
    }

    #[tokio::test]
    async fn protocol_violations_close_1002() {
        let m = Some([1, 2, 3, 4]);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("unmasked", raw_frame(0x82, b"abc", None)),
            ("reserved bit", raw_frame(0x80 | 0x40 | 0x2, b"x", m)),
            ("unknown opcode", raw_frame(0x83, b"x", m)),
            ("control over 125", raw_frame(0x89, &[0; 126], m)),
            ("fragmented ping", raw_frame(0x09, b"p", m)),
            ("stray continuation", raw_frame(0x80, b"x", m)),
            ("message inside a message", {
                let mut v = raw_frame(0x02, b"a", m);
                v.extend(raw_frame(0x82, b"b", m));
                v
            }),
            ("one-byte close", raw_frame(0x88, &[3], m)),
            (
                "close code 1005",
                raw_frame(0x88, &1005u16.to_be_bytes(), m),
            ),
            ("length top bit", {
                let mut v = vec![0x82, 0x80 | 127, 0x80, 0, 0, 0, 0, 0, 0, 1];
                v.extend_from_slice(&[1, 2, 3, 4]);
                v
            }),
        ];
        for (what, bytes) in cases {
            let (mut server, mut c) = plain(LIMIT, LIMIT);
            c.write_all(&bytes).await.unwrap();
            let mut buf = [0u8; 64];
            let mut result = server.read(&mut buf).await;
            if let Ok(n) = result
                && n > 0
            {
                // Data of a valid first frame comes first; the error follows.
                result = server.read(&mut buf).await;
            }
            let e = result.expect_err(what);
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{what}");
            assert!(e.to_string().contains("protocol error"), "{what}: {e}");
            assert_eq!(
                server.read(&mut buf).await.unwrap(),
                0,
                "{what}: then the end"
            );
            drop(server);
            assert_eq!(raw_answer(&mut c).await, [0x88, 2, 0x03, 0xea], "{what}");
        }
    }

    /// What the proxy checks to count `WsMessageTooLarge`.
    #[test]
    fn utf8_is_checked_across_any_split() {
        let text = "héllo wörld ✓ 𝄞 end".as_bytes();
        for cut1 in 0..=text.len() {
            for cut2 in cut1..=text.len() {
                let mut tail = ([0u8; 3], 0u8);
                for part in [&text[..cut1], &text[cut1..cut2], &text[cut2..]] {
                    assert!(check_utf8(&mut tail, part), "cuts {cut1} {cut2}");
                }
                assert_eq!(tail.1, 0, "cuts {cut1} {cut2}: nothing left open");
            }
        }
        let mut tail = ([0u8; 3], 0u8);
        assert!(!check_utf8(&mut tail, b"ok \xff"));
        let mut tail = ([0u8; 3], 0u8);
        assert!(check_utf8(&mut tail, &[0xe2, 0x9c]));
        assert!(
            !check_utf8(&mut tail, b"x"),
            "a sequence broken across reads"
        );
        let mut tail = ([0u8; 3], 0u8);
        assert!(!check_utf8(&mut tail, &[0xed, 0xa0, 0x80]), "a surrogate");
    }

    #[tokio::test]
    async fn text_messages_must_be_utf8_across_fragments() {
        let m = Some([9, 8, 7, 6]);
        // Valid: "✓" split between a text frame and its continuation, read byte by byte.
        let (mut server, mut c) = trickle(1);
        let mut bytes = raw_frame(0x01, &[b'a', 0xe2], m);
        bytes.extend(raw_frame(0x80, &[0x9c, 0x93], m));
        c.write_all(&bytes).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 8];
        while got.len() < 4 {
            let n = server.read(&mut buf).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, "a✓".as_bytes());

        // Invalid: a message that ends inside a sequence, and one with a bad byte.
        for bytes in [
            raw_frame(0x81, &[b'a', 0xe2, 0x9c], m),
            raw_frame(0x81, b"a\xffb", m),
        ] {
            let (mut server, mut c) = plain(LIMIT, LIMIT);
            c.write_all(&bytes).await.unwrap();
            let mut buf = [0u8; 16];
            let mut result = server.read(&mut buf).await;
            while let Ok(n) = result
                && n > 0
            {
                result = server.read(&mut buf).await;
            }
            let e = result.expect_err("not UTF-8");
            assert!(e.to_string().contains("not UTF-8"), "{e}");
            drop(server);
            // Close 1007 (0x03ef).
            assert_eq!(raw_answer(&mut c).await, [0x88, 2, 0x03, 0xef]);
        }
    }

    fn is_too_big(e: &io::Error) -> bool {
        e.get_ref().is_some_and(|inner| inner.is::<TooBig>())
            && e.to_string().contains("websocket message too large")
    }

    async fn expect_close_1009(ws: &mut WebSocketStream<DuplexStream>) {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(f))) => {
                    assert_eq!(f.map(|f| f.code), Some(CloseCode::Size));
                    return;
                }
                Some(Ok(_)) => {}
                other => panic!("expected close 1009, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn frame_over_the_limit_closes_1009() {
        let (mut server, c) = plain(1000, 64);
        let mut ws = client(c).await;
        ws.send(Message::binary(vec![1u8; 64])).await.unwrap();
        ws.send(Message::binary(vec![2u8; 65])).await.unwrap();
        let mut buf = [0u8; 256];
        assert_eq!(
            server.read(&mut buf).await.unwrap(),
            64,
            "at the limit: fine"
        );
        let e = server.read(&mut buf).await.unwrap_err();
        assert!(is_too_big(&e), "{e}");
        expect_close_1009(&mut ws).await;
    }

    #[tokio::test]
    async fn fragmented_message_over_the_limit_closes_1009() {
        let (mut server, c) = plain(100, 64);
        let mut ws = client(c).await;
        let bin = OpCode::Data(Data::Binary);
        let cont = OpCode::Data(Data::Continue);
        for (op, fin) in [(bin, false), (cont, false), (cont, true)] {
            ws.send(Message::Frame(Frame::message(vec![5u8; 40], op, fin)))
                .await
                .unwrap();
        }
        let mut got = 0;
        let mut buf = [0u8; 256];
        let e = loop {
            match server.read(&mut buf).await {
                Ok(0) => panic!("end instead of an error"),
                Ok(n) => got += n,
                Err(e) => break e,
            }
        };
        assert!(is_too_big(&e), "{e}");
        assert!(got <= 80, "no byte past the limit: {got}");
        expect_close_1009(&mut ws).await;
    }

    #[tokio::test]
    async fn pong_queued_during_a_partial_write_goes_after_the_frame() {
        let (mut server, c) = trickle(7);
        let mut ws = client(c).await;
        let data = pattern(100, 1);
        let n = std::future::poll_fn(|cx| Pin::new(&mut server).poll_write(cx, &data))
            .await
            .unwrap();
        assert!(n > 0 && n < data.len(), "a partial write: {n}");
        ws.send(Message::Ping(bytes::Bytes::from_static(b"mid")))
            .await
            .unwrap();
        ws.send(Message::binary(&b"x"[..])).await.unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(
            server.read(&mut buf).await.unwrap(),
            1,
            "the ping was taken in"
        );
        server.write_all(&data[n..]).await.unwrap();
        server.flush().await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(data));
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::Pong(bytes::Bytes::from_static(b"mid"))
        );
    }

    #[tokio::test]
    async fn end_of_connection_inside_a_frame_is_an_error() {
        let (mut server, mut c) = plain(LIMIT, LIMIT);
        let frame = raw_frame(0x82, b"hello", Some([9, 8, 7, 6]));
        c.write_all(&frame[..frame.len() - 3]).await.unwrap();
        drop(c);
        let mut buf = [0u8; 16];
        assert_eq!(server.read(&mut buf).await.unwrap(), 2);
        assert_eq!(&buf[..2], b"he");
        let e = server.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);

        // At a frame boundary it is the end.
        let (mut server, mut c) = plain(LIMIT, LIMIT);
        c.write_all(&frame).await.unwrap();
        drop(c);
        assert_eq!(server.read(&mut buf).await.unwrap(), 5);
        assert_eq!(server.read(&mut buf).await.unwrap(), 0);
    }

    fn pinging(io: DuplexStream, counters: &Arc<KeepaliveCounters>) -> ServerStream<DuplexStream> {
        let ping = PingState::new(
            Duration::from_secs(30),
            Duration::from_secs(20),
            counters.clone(),
        );
        ServerStream::new(io, LIMIT, LIMIT).with_pings(ping)
    }

    #[tokio::test(start_paused = true)]
    async fn idle_session_is_pinged_and_lives_while_the_peer_answers() {
        let counters = Arc::new(KeepaliveCounters::default());
        let (s, c) = duplex(64 * 1024);
        let mut server = pinging(s, &counters);
        let mut ws = client(c).await;
        // tungstenite answers pings while it is read.
        let peer = tokio::spawn(async move {
            let mut pings = 0;
            while let Some(Ok(m)) = ws.next().await {
                if matches!(m, Message::Ping(_)) {
                    pings += 1;
                }
            }
            pings
        });
        let mut buf = [0u8; 8];
        let r = tokio::time::timeout(Duration::from_secs(200), server.read(&mut buf)).await;
        assert!(r.is_err(), "the session stayed open: {r:?}");
        let sent = counters.ws_pings.load(Ordering::Relaxed);
        assert!(sent >= 3, "pings sent: {sent}");
        assert_eq!(counters.ws_pong_timeouts.load(Ordering::Relaxed), 0);
        server.shutdown().await.unwrap();
        assert_eq!(peer.await.unwrap() as u64, sent);
    }

    #[tokio::test(start_paused = true)]
    async fn silent_peer_gets_a_pong_timeout() {
        let counters = Arc::new(KeepaliveCounters::default());
        let (s, mut c) = duplex(64 * 1024);
        let mut server = pinging(s, &counters);
        let started = tokio::time::Instant::now();
        let mut buf = [0u8; 8];
        let e = server.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(e.get_ref().is_some_and(|i| i.is::<PongTimeout>()), "{e}");
        assert_eq!(started.elapsed(), Duration::from_secs(50));
        assert_eq!(counters.ws_pings.load(Ordering::Relaxed), 1);
        assert_eq!(counters.ws_pong_timeouts.load(Ordering::Relaxed), 1);
        // The ping went out on the wire: an empty ping frame from the server.
        let mut ping = [0u8; 2];
        c.read_exact(&mut ping).await.unwrap();
        assert_eq!(ping, [0x89, 0]);
    }

    #[test]
    fn unmask_at_any_offset() {
        let mask = [0x11, 0x22, 0x33, 0x44];
        let plain = pattern(37, 5);
        let mut masked = plain.clone();
        unmask(&mut masked, mask, 0);
        for split in 0..plain.len() {
            let mut m = masked.clone();
            let (a, b) = m.split_at_mut(split);
            unmask(a, mask, 0);
            unmask(b, mask, split);
            assert_eq!(m, plain, "split at {split}");
        }
    }
}
