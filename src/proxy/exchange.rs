//! The upstream exchange: one HTTP/1.1 request written to an upstream connection and its
//! response read back, by the task that serves the tunnel session, with no client
//! dispatcher and no channel between the two halves.
//!
//! Why not hyper's client: a request through it is a hand-off to the connection's
//! dispatcher (a channel, a second state machine, and a wake-up of whichever task drives
//! it) and back; BENCHMARKS.md (a) measured the two dispatchers of a forwarded request at
//! about a third of the proxy's user time. Here `send` writes the request head and body
//! itself, `httparse` reads the response head, and the response body is a [`ResponseBody`]
//! that reads the connection from inside the session's own `poll_frame`.
//!
//! **Framing is strict** (RFC 9112 section 6): an upstream answer is framed by exactly one
//! `Transfer-Encoding: chunked`, or by exactly one valid `Content-Length`, or by the end of
//! the connection; no body for HEAD, 1xx, 204 and 304. Anything else (both headers, a
//! duplicate, list or malformed `Content-Length`, another transfer coding, a malformed chunk,
//! an interim `101`, bytes after the body) fails that request with a 502, or aborts the
//! stream once it has started, and the connection is closed: it never carries another
//! request. A private-network server's framing bug must not become a desync of the pool.
//! What we accept is a subset of what hyper's client accepts (`fuzz/fuzz_targets/
//! upstream_response.rs` feeds the same bytes to both).
//!
//! A request's body goes out framed by its exact length when the body knows it (the count
//! is enforced: a body that yields more or less aborts the connection), else chunked.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWriteExt};

use super::upstream::{Connector, UpstreamIo, UpstreamSettings};
use super::workers;
use crate::config::Upstream;

/// Idle connections one worker keeps (as nginx's `keepalive 64`, doubled).
pub const MAX_IDLE: usize = 128;

/// How long an idle connection is kept.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Largest response head read (status line and headers).
pub const MAX_HEAD: usize = 64 * 1024;

/// Most response headers accepted (hyper's client default).
pub const MAX_HEADERS: usize = 100;

/// Longest chunk-size line (with any extension) or trailer line of a chunked body.
const MAX_CHUNK_LINE: usize = 4096;

/// Largest trailer section of a chunked body (read and dropped); hyper's client refuses
/// 16 KiB, and we accept strictly less than it does.
const MAX_TRAILERS: usize = 8 * 1024;

/// Most trailer fields of a chunked body (hyper's client refuses over 100).
const MAX_TRAILER_FIELDS: usize = 64;

/// Most chunk-extension bytes in one body (hyper's client refuses more, and we accept
/// strictly less than it does).
const MAX_CHUNK_EXTENSIONS: usize = 16 * 1024;

/// How much is read from the upstream at once.
const READ_CHUNK: usize = 16 * 1024;

/// Why an exchange failed: the connector's `ConnectError`, the request body's own error
/// (perhaps `LengthLimitError`), an I/O error or a [`Framing`] anomaly; callers find them
/// again by walking `source()`.
pub type SendError = Box<dyn std::error::Error + Send + Sync>;

/// An upstream answer this proxy will not pass on: the connection it came on is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("upstream response framing refused: {0}")]
pub struct Framing(pub &'static str);

/// One upstream connection with what has been read from it and not yet used.
struct Conn {
    io: UpstreamIo,
    buf: BytesMut,
    upstream: Upstream,
    /// The idle list it goes back to (its plane's, on its worker): a connection is never
    /// used under another upstream policy.
    home: Weak<IdleConns>,
}

struct Idle {
    conn: Box<Conn>,
    since: Instant,
}

/// A worker's idle upstream connections, not polled while idle: the next request that takes
/// one first checks that the upstream has not closed it meanwhile.
#[derive(Default)]
pub struct IdleConns {
    /// Oldest first: the most recently used connection is taken first (its buffers are
    /// warm), the oldest expire first. Only its own worker takes this lock.
    list: Mutex<VecDeque<Idle>>,
}

impl IdleConns {
    fn take(&self, upstream: &Upstream) -> Option<Box<Conn>> {
        let mut list = self.list.lock().unwrap_or_else(|e| e.into_inner());
        let at = list.iter().rposition(|i| &i.conn.upstream == upstream)?;
        list.remove(at).map(|i| i.conn)
    }

    fn put(&self, mut conn: Box<Conn>) {
        // An idle connection holds no read buffer (the next request gets a new one).
        conn.buf = BytesMut::new();
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

    /// Idle connections held now (tests).
    pub fn len(&self) -> usize {
        self.list.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One idle list per data-plane worker, plus one (index 0) for sessions served anywhere
/// else (tests, the fuzz targets). Indexed by `workers::current()`, so no list's lock or
/// cache lines are shared between cores.
pub struct IdlePools(Box<[Arc<IdleConns>]>);

impl IdlePools {
    pub fn new(workers: usize) -> IdlePools {
        IdlePools((0..=workers).map(|_| Arc::default()).collect())
    }

    /// The list of the worker this runs on.
    pub fn here(&self) -> &Arc<IdleConns> {
        self.0.get(workers::current()).unwrap_or(&self.0[0])
    }
}

/// Sends `req` (origin-form URI: the path and query only) to `upstream` on an idle
/// connection of this worker, or on a new one (resolved and checked by the connector), and
/// reads the response head. The response body reads the same connection and gives it back
/// once it has ended cleanly.
pub async fn send<B>(
    settings: &Arc<UpstreamSettings>,
    idle: &Arc<IdleConns>,
    upstream: &Upstream,
    req: Request<B>,
) -> Result<Response<ResponseBody>, SendError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<SendError>,
{
    let mut conn = match take_live(idle, upstream).await {
        Some(conn) => conn,
        None => {
            let uri = upstream_origin(upstream)?;
            let io = Connector::connect(settings.clone(), uri).await?;
            Box::new(Conn {
                io,
                buf: BytesMut::new(),
                upstream: upstream.clone(),
                home: Arc::downgrade(idle),
            })
        }
    };
    let head_request = req.method() == Method::HEAD;
    write_request(&mut conn, req).await?;
    let (head, framing) = read_head(&mut conn, head_request).await?;
    let body = ResponseBody::new(conn, framing, head.reusable);
    let mut resp = Response::new(body);
    *resp.status_mut() = head.status;
    *resp.version_mut() = Version::HTTP_11;
    *resp.headers_mut() = head.headers;
    Ok(resp)
}

fn upstream_origin(upstream: &Upstream) -> Result<http::Uri, SendError> {
    let authority = upstream.authority();
    http::Uri::builder()
        .scheme(upstream.scheme.as_str())
        .authority(authority.as_str())
        .path_and_query("/")
        .build()
        .map_err(|e| Box::new(e) as SendError)
}

/// An idle connection the upstream has not closed (nor written to) while nobody read it.
async fn take_live(idle: &IdleConns, upstream: &Upstream) -> Option<Box<Conn>> {
    loop {
        let mut conn = idle.take(upstream)?;
        let alive = std::future::poll_fn(|cx| {
            let mut probe = [0u8; 1];
            let mut rb = tokio::io::ReadBuf::new(&mut probe);
            // Pending means nothing to read: still open. (The probe's registration is harmless:
            // the request is written next, on this same task.) A close, an error, or bytes
            // nobody asked for: not reusable.
            Poll::Ready(Pin::new(&mut conn.io).poll_read(cx, &mut rb).is_pending())
        })
        .await;
        if alive && conn.buf.is_empty() {
            return Some(conn);
        }
    }
}

/// Methods whose requests carry no body unless they say so: no `content-length: 0` added.
fn bodyless_by_default(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS | Method::TRACE
    )
}

/// Writes the request head and its body. The head and whatever of the body is ready at once
/// go out in one write (a tools/call is usually a single `write(2)`).
async fn write_request<B>(conn: &mut Conn, req: Request<B>) -> Result<(), SendError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<SendError>,
{
    let (parts, mut body) = req.into_parts();
    let length = body.size_hint().exact();
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(
        parts
            .uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .as_bytes(),
    );
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        // The body's framing is this hop's own (hop-by-hop headers are gone already).
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let chunked = match length {
        Some(0) if bodyless_by_default(&parts.method) => false,
        Some(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
            false
        }
        None => {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
            true
        }
    };
    out.extend_from_slice(b"\r\n");
    let mut left = length.unwrap_or(0);
    loop {
        // Take every frame that is ready now; write when the body has to wait or is done.
        let polled = std::future::poll_fn(|cx| {
            Poll::Ready(match Pin::new(&mut body).poll_frame(cx) {
                Poll::Ready(f) => Some(f),
                Poll::Pending => None,
            })
        })
        .await;
        let frame = match polled {
            Some(f) => f,
            None => {
                if !out.is_empty() {
                    conn.io.write_all(&out).await?;
                    out.clear();
                }
                std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
            }
        };
        match frame {
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue; // trailers: not forwarded
                };
                if data.is_empty() {
                    continue;
                }
                if chunked {
                    push_hex(&mut out, data.len());
                    out.extend_from_slice(b"\r\n");
                    out.extend_from_slice(&data);
                    out.extend_from_slice(b"\r\n");
                } else {
                    let n = data.len() as u64;
                    if n > left {
                        return Err("request body longer than its length".into());
                    }
                    left -= n;
                    out.extend_from_slice(&data);
                }
                if out.len() >= READ_CHUNK {
                    conn.io.write_all(&out).await?;
                    out.clear();
                }
            }
            Some(Err(e)) => return Err(e.into()),
            None => break,
        }
    }
    if !chunked && left > 0 {
        return Err("request body shorter than its length".into());
    }
    if chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    if !out.is_empty() {
        conn.io.write_all(&out).await?;
    }
    conn.io.flush().await?;
    Ok(())
}

/// `n` in lower-case hex, as a chunk-size line starts.
fn push_hex(out: &mut Vec<u8>, n: usize) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let digits = (usize::BITS - n.leading_zeros()).div_ceil(4).max(1);
    for i in (0..digits).rev() {
        out.push(DIGITS[(n >> (i * 4)) & 0xf]);
    }
}

/// A parsed response head.
struct Head {
    status: StatusCode,
    headers: HeaderMap,
    /// The connection may carry another request once this body has ended.
    reusable: bool,
}

/// Reads the response head (skipping interim 1xx answers) and decides the body's framing.
async fn read_head(conn: &mut Conn, head_request: bool) -> Result<(Head, BodyFraming), SendError> {
    loop {
        if let Some((head, framing)) = parse_head(&mut conn.buf, head_request)? {
            return Ok((head, framing));
        }
        if conn.buf.len() >= MAX_HEAD {
            return Err(Box::new(Framing("response head over 64 KiB")));
        }
        let n = read_more(conn).await?;
        if n == 0 {
            return Err(Box::new(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "upstream closed the connection before a complete response head",
            )));
        }
    }
}

async fn read_more(conn: &mut Conn) -> io::Result<usize> {
    std::future::poll_fn(|cx| poll_read_more(conn, cx)).await
}

fn poll_read_more(conn: &mut Conn, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
    if conn.buf.capacity() - conn.buf.len() < READ_CHUNK / 4 {
        conn.buf.reserve(READ_CHUNK);
    }
    tokio_util::io::poll_read_buf(Pin::new(&mut conn.io), cx, &mut conn.buf)
}

/// How a response body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    Empty,
    Length(u64),
    Chunked,
    /// Ends when the upstream closes the connection (which is then not reused).
    Close,
}

/// One response head from the front of `buf`, or `None` when more bytes are needed;
/// consumes the head (and any interim 1xx heads before it). Public for the fuzz target.
pub fn parse_head_for_fuzz(
    buf: &mut BytesMut,
    head_request: bool,
) -> Result<Option<(u16, HeaderMap, BodyFraming, bool)>, SendError> {
    Ok(parse_head(buf, head_request)?.map(|(h, f)| (h.status.as_u16(), h.headers, f, h.reusable)))
}

fn parse_head(
    buf: &mut BytesMut,
    head_request: bool,
) -> Result<Option<(Head, BodyFraming)>, SendError> {
    loop {
        let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut slots);
        let used = match parsed.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Box::new(Framing("more than 100 response headers")));
            }
            Err(_) => return Err(Box::new(Framing("malformed response head"))),
        };
        let code = parsed.code.ok_or(Framing("no status code"))?;
        let status = StatusCode::from_u16(code).map_err(|_| Framing("invalid status code"))?;
        let http10 = parsed.version == Some(0);
        let mut headers = HeaderMap::with_capacity(parsed.headers.len());
        for h in parsed.headers.iter() {
            let name = HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| Framing("invalid header name"))?;
            let value =
                HeaderValue::from_bytes(h.value).map_err(|_| Framing("invalid header value"))?;
            headers.append(name, value);
        }
        buf.advance(used);
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(Box::new(Framing("101 Switching Protocols is not proxied")));
        }
        if status.is_informational() {
            // 100 Continue, 103 Early Hints: the real answer follows.
            continue;
        }
        if http10 && headers.contains_key(header::TRANSFER_ENCODING) {
            // RFC 9112 section 6.1: a sender must not send Transfer-Encoding in an HTTP/1.0
            // message; hyper refuses it too, and this proxy accepts strictly less.
            return Err(Box::new(Framing(
                "Transfer-Encoding in an HTTP/1.0 response",
            )));
        }
        let framing = framing(&headers, status, head_request)?;
        let closes = http10 || connection_has(&headers, "close");
        let reusable = !closes && framing != BodyFraming::Close;
        return Ok(Some((
            Head {
                status,
                headers,
                reusable,
            },
            framing,
        )));
    }
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// The body's framing, or the anomaly that refuses the response (RFC 9112 section 6.3,
/// taken strictly).
fn framing(
    headers: &HeaderMap,
    status: StatusCode,
    head_request: bool,
) -> Result<BodyFraming, Framing> {
    let te: Vec<&HeaderValue> = headers.get_all(header::TRANSFER_ENCODING).iter().collect();
    let cl: Vec<&HeaderValue> = headers.get_all(header::CONTENT_LENGTH).iter().collect();
    if !te.is_empty() && !cl.is_empty() {
        return Err(Framing("both Transfer-Encoding and Content-Length"));
    }
    if cl.len() > 1 {
        return Err(Framing("more than one Content-Length"));
    }
    if te.len() > 1 {
        return Err(Framing("more than one Transfer-Encoding header"));
    }
    let length = match cl.first() {
        Some(v) => Some(parse_length(v.as_bytes()).ok_or(Framing("invalid Content-Length"))?),
        None => None,
    };
    if let Some(v) = te.first()
        && !v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked")
    {
        return Err(Framing("a transfer coding other than chunked"));
    }
    if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok(BodyFraming::Empty);
    }
    Ok(match (te.is_empty(), length) {
        (false, _) => BodyFraming::Chunked,
        (true, Some(0)) => BodyFraming::Empty,
        (true, Some(n)) => BodyFraming::Length(n),
        (true, None) => BodyFraming::Close,
    })
}

/// `v` without leading and trailing SP and HTAB.
fn trim_ows(v: &[u8]) -> &[u8] {
    let ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = v.iter().position(|b| !ows(b)).unwrap_or(v.len());
    let end = v.iter().rposition(|b| !ows(b)).map_or(start, |i| i + 1);
    &v[start..end]
}

/// `1*DIGIT` with optional surrounding whitespace, no sign, no list, at most 18 digits.
fn parse_length(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// Where a chunked body's decoder stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one; bytes of trailers seen.
    Trailers {
        bytes: usize,
        fields: usize,
    },
    Done,
}

/// A response body read from the upstream connection by whoever polls it (the session's
/// task): no channel, no other task. The connection goes back to its worker's idle list
/// once the body has ended cleanly and nothing else arrived; dropped earlier, it closes.
pub struct ResponseBody {
    conn: Option<Box<Conn>>,
    state: State,
    reusable: bool,
    /// Chunk-extension bytes seen so far (bounded by [`MAX_CHUNK_EXTENSIONS`]).
    extensions: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length(u64),
    Chunked(Chunk),
    Close,
    Done,
}

impl ResponseBody {
    fn new(conn: Box<Conn>, framing: BodyFraming, reusable: bool) -> ResponseBody {
        let state = match framing {
            BodyFraming::Empty => State::Done,
            BodyFraming::Length(n) => State::Length(n),
            BodyFraming::Chunked => State::Chunked(Chunk::Size),
            BodyFraming::Close => State::Close,
        };
        let mut body = ResponseBody {
            conn: Some(conn),
            state,
            reusable,
            extensions: 0,
        };
        if state == State::Done {
            body.finish();
        }
        body
    }

    /// The body ended cleanly: the connection goes back for the next request if it may.
    fn finish(&mut self) {
        self.state = State::Done;
        let Some(conn) = self.conn.take() else { return };
        if self.reusable
            && conn.buf.is_empty()
            && let Some(home) = conn.home.upgrade()
        {
            home.put(conn);
        }
    }

    fn fail(&mut self, why: Framing) -> Poll<Option<Result<Frame<Bytes>, SendError>>> {
        self.conn = None;
        self.state = State::Done;
        Poll::Ready(Some(Err(Box::new(why))))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = SendError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, SendError>>> {
        let this = &mut *self;
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match this.state {
                State::Done => return Poll::Ready(None),
                State::Length(left) => {
                    if !conn.buf.is_empty() {
                        let n = (conn.buf.len() as u64).min(left) as usize;
                        let data = conn.buf.split_to(n).freeze();
                        let left = left - n as u64;
                        this.state = State::Length(left);
                        if left == 0 {
                            this.finish();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    if ready!(poll_read_more(conn, cx))? == 0 {
                        return this
                            .fail(Framing("upstream closed before the end of Content-Length"));
                    }
                }
                State::Close => {
                    if !conn.buf.is_empty() {
                        let data = conn.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    if ready!(poll_read_more(conn, cx))? == 0 {
                        this.reusable = false;
                        this.finish();
                        return Poll::Ready(None);
                    }
                }
                State::Chunked(chunk) => {
                    match decode_chunked(&mut conn.buf, chunk, &mut this.extensions) {
                        Err(why) => return this.fail(why),
                        Ok((next, data)) => {
                            this.state = State::Chunked(next);
                            if next == Chunk::Done {
                                this.finish();
                                return Poll::Ready(data.map(|d| Ok(Frame::data(d))));
                            }
                            if let Some(data) = data {
                                return Poll::Ready(Some(Ok(Frame::data(data))));
                            }
                            // Read only when the decoder could not move on what it holds.
                            if next == chunk && ready!(poll_read_more(conn, cx))? == 0 {
                                return this.fail(Framing("upstream closed inside a chunked body"));
                            }
                        }
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state == State::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(n) => SizeHint::with_exact(n),
            State::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// One step of the chunked decoder over what `buf` holds: the next state and any data it
/// yields; `(same state, None)` when it needs more bytes. Public for the fuzz target.
pub fn decode_chunked_for_fuzz(buf: &mut BytesMut) -> Result<Option<Vec<u8>>, Framing> {
    let mut state = Chunk::Size;
    let mut out = Vec::new();
    let mut extensions = 0;
    loop {
        let before = buf.len();
        let (next, data) = decode_chunked(buf, state, &mut extensions)?;
        if let Some(d) = data {
            out.extend_from_slice(&d);
        }
        if next == Chunk::Done {
            return Ok(Some(out));
        }
        if next == state && buf.len() == before {
            return Ok(None);
        }
        state = next;
    }
}

fn decode_chunked(
    buf: &mut BytesMut,
    state: Chunk,
    extensions: &mut usize,
) -> Result<(Chunk, Option<Bytes>), Framing> {
    match state {
        Chunk::Size => {
            let Some(line) = take_line(buf, MAX_CHUNK_LINE)? else {
                return Ok((state, None));
            };
            let size_part = match line.iter().position(|b| *b == b';') {
                Some(at) => &line[..at],
                None => &line[..],
            };
            // No whitespace around the size (hyper tolerates some; we need not).
            if size_part.is_empty() || size_part.len() > 15 {
                return Err(Framing("invalid chunk size"));
            }
            let mut size: u64 = 0;
            for b in size_part {
                let d = (*b as char)
                    .to_digit(16)
                    .ok_or(Framing("invalid chunk size"))?;
                size = size * 16 + u64::from(d);
            }
            let ext = &line[size_part.len()..];
            if ext.iter().any(|b| *b != b'\t' && (*b < 0x20 || *b == 0x7f)) {
                return Err(Framing("control character in a chunk extension"));
            }
            *extensions += ext.len();
            if *extensions > MAX_CHUNK_EXTENSIONS {
                return Err(Framing("chunk extensions over 16 KiB"));
            }
            Ok((
                if size == 0 {
                    Chunk::Trailers {
                        bytes: 0,
                        fields: 0,
                    }
                } else {
                    Chunk::Data(size)
                },
                None,
            ))
        }
        Chunk::Data(left) => {
            if buf.is_empty() {
                return Ok((state, None));
            }
            let n = (buf.len() as u64).min(left) as usize;
            let data = buf.split_to(n).freeze();
            let left = left - n as u64;
            Ok((
                if left == 0 {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(left)
                },
                Some(data),
            ))
        }
        Chunk::DataEnd => {
            if buf.len() < 2 {
                return Ok((state, None));
            }
            if &buf[..2] != b"\r\n" {
                return Err(Framing("chunk data not followed by CRLF"));
            }
            buf.advance(2);
            Ok((Chunk::Size, None))
        }
        Chunk::Trailers { bytes, fields } => {
            let Some(line) = take_line(buf, MAX_CHUNK_LINE)? else {
                return Ok((state, None));
            };
            if line.is_empty() {
                return Ok((Chunk::Done, None));
            }
            let (bytes, fields) = (bytes + line.len() + 2, fields + 1);
            let colon = line.iter().position(|b| *b == b':');
            // Only SP and HTAB are optional whitespace (RFC 9110 section 5.6.3): a form feed
            // or any other control byte is not trimmed, it makes the value invalid.
            let valid = colon.is_some_and(|at| {
                HeaderName::from_bytes(&line[..at]).is_ok()
                    && HeaderValue::from_bytes(trim_ows(&line[at + 1..])).is_ok()
            });
            if bytes > MAX_TRAILERS || fields > MAX_TRAILER_FIELDS || !valid {
                return Err(Framing("invalid trailer section"));
            }
            Ok((Chunk::Trailers { bytes, fields }, None))
        }
        Chunk::Done => Ok((state, None)),
    }
}

/// A CRLF-terminated line from the front of `buf` (without its CRLF), `None` when it is not
/// complete yet; a bare CR or LF, or a line over `max`, is an anomaly.
fn take_line(buf: &mut BytesMut, max: usize) -> Result<Option<BytesMut>, Framing> {
    let Some(lf) = buf.iter().position(|b| *b == b'\n') else {
        if buf.len() > max {
            return Err(Framing("line too long in a chunked body"));
        }
        if buf
            .iter()
            .position(|b| *b == b'\r')
            .is_some_and(|cr| cr + 1 < buf.len())
        {
            return Err(Framing("bare CR in a chunked body"));
        }
        return Ok(None);
    };
    if lf == 0 || buf[lf - 1] != b'\r' {
        return Err(Framing("bare LF in a chunked body"));
    }
    if lf > max || buf[..lf - 1].contains(&b'\r') {
        return Err(Framing("bare CR or over-long line in a chunked body"));
    }
    let mut line = buf.split_to(lf + 1);
    line.truncate(lf - 1);
    Ok(Some(line))
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody")
            .field("state", &self.state)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(bytes: &str, head_request: bool) -> Result<Option<(u16, BodyFraming, bool)>, String> {
        let mut buf = BytesMut::from(bytes.as_bytes());
        parse_head_for_fuzz(&mut buf, head_request)
            .map(|o| o.map(|(s, _, f, r)| (s, f, r)))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn framing_is_taken_from_exactly_one_header() {
        assert_eq!(
            head("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", false),
            Ok(Some((200, BodyFraming::Length(5), true)))
        );
        assert_eq!(
            head(
                "HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\n\r\n",
                false
            ),
            Ok(Some((200, BodyFraming::Chunked, true)))
        );
        assert_eq!(
            head("HTTP/1.1 200 OK\r\n\r\n", false),
            Ok(Some((200, BodyFraming::Close, false)))
        );
        assert_eq!(
            head(
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\n",
                false
            ),
            Ok(Some((200, BodyFraming::Length(5), false)))
        );
        assert_eq!(
            head("HTTP/1.0 200 OK\r\ncontent-length: 5\r\n\r\n", false),
            Ok(Some((200, BodyFraming::Length(5), false)))
        );
        assert_eq!(
            head("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", true),
            Ok(Some((200, BodyFraming::Empty, true)))
        );
        assert_eq!(
            head("HTTP/1.1 204 No Content\r\n\r\n", false),
            Ok(Some((204, BodyFraming::Empty, true)))
        );
        assert_eq!(
            head(
                "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
                false
            ),
            Ok(Some((200, BodyFraming::Empty, true)))
        );
        assert_eq!(
            head("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n", false),
            Ok(None)
        );
    }

    #[test]
    fn framing_anomalies_are_refused() {
        for bad in [
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 0x5\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: identity\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n",
            "HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
            "HTTP/1.1 200 OK\r\nx: a\r\n b\r\n\r\n",
            "HTTP/1.1 999999 OK\r\n\r\n",
            "HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
        ] {
            assert!(head(bad, false).is_err(), "accepted: {bad:?}");
        }
    }

    fn chunked(bytes: &[u8]) -> Result<Option<Vec<u8>>, Framing> {
        decode_chunked_for_fuzz(&mut BytesMut::from(bytes))
    }

    #[test]
    fn chunked_bodies_decode_strictly() {
        assert_eq!(
            chunked(b"5\r\nhello\r\n0\r\n\r\n"),
            Ok(Some(b"hello".to_vec()))
        );
        assert_eq!(
            chunked(b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-t: 1\r\n\r\n"),
            Ok(Some(b"hello world".to_vec()))
        );
        assert_eq!(chunked(b"5\r\nhel"), Ok(None));
        for bad in [
            &b"5\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhelloX\r\n0\r\n\r\n",
            b"-5\r\nhello\r\n0\r\n\r\n",
            b" 5\r\nhello\r\n0\r\n\r\n",
            b"5 \r\nhello\r\n0\r\n\r\n",
            b"\r\nhello\r\n0\r\n\r\n",
            b"fffffffffffffffff\r\n",
            b"5\rhello\r\n",
            b"0\r\nbad trailer\r\n\r\n",
            b"0\r\nx:\x0cvalue\r\n\r\n",
            b"5;a\rb\r\nhello\r\n0\r\n\r\n",
        ] {
            assert!(
                chunked(bad).is_err(),
                "accepted: {:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn chunk_sizes_are_hex() {
        for n in [0usize, 1, 15, 16, 255, 4096, 0xabcdef] {
            let mut out = Vec::new();
            push_hex(&mut out, n);
            assert_eq!(String::from_utf8(out).unwrap(), format!("{n:x}"));
        }
    }

    #[test]
    fn lengths_parse_as_plain_decimals() {
        assert_eq!(parse_length(b" 42 "), Some(42));
        assert_eq!(parse_length(b"0"), Some(0));
        for bad in [&b""[..], b"4 2", b"-1", b"1e3", b"1,1"] {
            assert_eq!(parse_length(bad), None, "{bad:?}");
        }
    }
}
