//! Inner TLS with no buffer of its own while idle: rustls' unbuffered server connection,
//! driven over the session's WebSocket byte stream.
//!
//! Why not tokio-rustls: its buffered rustls connection keeps a 4 KiB read buffer for the
//! life of the session, resized but never released while idle (rustls 0.23,
//! `DeframerVecBuffer::prepare_read`), and each of 10,000 idle sessions holds one. Here the
//! ciphertext is read into, and decrypted in, a buffer of the worker thread, and plaintext is
//! encrypted into another. A session keeps bytes only while they are in flight: a record
//! split across reads, plaintext its reader has not taken yet, ciphertext the connection has
//! not taken yet. Each is released once empty, so an idle session is its state only.
//!
//! rustls 0.23 gives the unbuffered server no `server_name()`. The certificate resolver
//! sees the SNI in the ClientHello, synchronously inside `process_tls_records`, and leaves
//! it in a thread-local ([`super::tls::take_hello_sni`]) that is taken right after the call.

use std::cell::RefCell;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::thread::LocalKey;

use rustls::ServerConfig;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::tls;

/// The worker's read buffer: one read of the connection, many records.
const READ_BUF: usize = 32 * 1024;
/// Plaintext per record written (TLS's maximum fragment).
const MAX_PLAIN: usize = 16 * 1024;
/// A record of `MAX_PLAIN` with its header and AEAD tag fits.
const CIPHER_BUF: usize = MAX_PLAIN + 1024;
/// Ciphertext a session may hold unprocessed: a handshake message may span records up to
/// 64 KiB (rustls' own limit), plus one record.
const MAX_HELD: usize = 0xffff + CIPHER_BUF + 2048;

thread_local! {
    static READ: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static PLAIN: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static CIPHER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's buffer `key`, at least `min` bytes long. A nested use (never
/// expected) gets a buffer of its own rather than a panic.
fn with_buf<R>(
    key: &'static LocalKey<RefCell<Vec<u8>>>,
    min: usize,
    f: impl FnOnce(&mut Vec<u8>) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < min {
                buf.resize(min, 0);
            }
            f(&mut buf)
        }
        Err(_) => f(&mut vec![0; min]),
    })
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Whether `e` is rustls' (made by [`tls_error`]) rather than the connection's below.
fn is_tls_error(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|i| i.is::<rustls::Error>())
}

/// Where rustls stands once every complete record held has been processed.
enum Pumped {
    /// More ciphertext is needed (mid-record, or the handshake waits for the peer).
    NeedData,
    /// Application data may be encrypted.
    Writable,
    /// Both sides sent close_notify.
    Closed,
}

/// The connection state and what is in flight; split from the stream so that a worker
/// buffer and the stream can be borrowed beside it.
struct Tls {
    conn: UnbufferedServerConnection,
    /// Ciphertext rustls produced on its own (handshake, alerts, key updates, tickets) and
    /// encrypted records the connection did not take whole; sent before anything new.
    out: Vec<u8>,
    out_pos: usize,
    /// Decrypted bytes the reader has not taken yet.
    plain: Vec<u8>,
    plain_pos: usize,
    peer_closed: bool,
    close_sent: bool,
    /// rustls failed: it is not called again (a call would parse the bad bytes again).
    broken: bool,
    sni: Option<Box<str>>,
}

impl Tls {
    /// Processes every complete record in `buf`: handshake messages answered into `out`,
    /// application data copied to `dst` while it has room (only when nothing is held in
    /// `plain`) and to `plain` after, a close_notify noted. Returns how many bytes of
    /// `buf` were consumed (the rest is a partial record) and where rustls stands. On an
    /// error the alert for the peer, if any, is left in `out`.
    fn pump(
        &mut self,
        buf: &mut [u8],
        mut dst: Option<&mut ReadBuf<'_>>,
    ) -> (usize, Result<Pumped, rustls::Error>) {
        if self.broken {
            return (
                0,
                Err(rustls::Error::General("the TLS connection failed".into())),
            );
        }
        let mut used = 0;
        loop {
            tls::take_hello_sni();
            let UnbufferedStatus { mut discard, state } =
                self.conn.process_tls_records(&mut buf[used..]);
            if let Some(sni) = tls::take_hello_sni() {
                self.sni = Some(sni);
            }
            let state = match state {
                Ok(state) => state,
                Err(e) => {
                    self.take_alert(&mut buf[used + discard..]);
                    return (used + discard, Err(e));
                }
            };
            let done = match state {
                ConnectionState::ReadTraffic(mut read) => {
                    while let Some(record) = read.next_record() {
                        match record {
                            Ok(record) => {
                                discard += record.discard;
                                let mut payload = record.payload;
                                if let Some(dst) = dst.as_deref_mut() {
                                    let n = payload.len().min(dst.remaining());
                                    dst.put_slice(&payload[..n]);
                                    payload = &payload[n..];
                                }
                                if payload.is_empty() {
                                    continue;
                                }
                                dst = None;
                                if self.plain_pos == self.plain.len() {
                                    self.plain.clear();
                                    self.plain_pos = 0;
                                }
                                self.plain.extend_from_slice(payload);
                            }
                            Err(e) => {
                                drop(read);
                                self.take_alert(&mut buf[used + discard..]);
                                return (used + discard, Err(e));
                            }
                        }
                    }
                    None
                }
                ConnectionState::EncodeTlsData(mut encode) => {
                    if let Err(e) = encode_into(&mut self.out, |b| encode.encode(b)) {
                        self.broken = true;
                        return (used + discard, Err(rustls::Error::General(e.to_string())));
                    }
                    None
                }
                // `out` carries it from here, before any later record.
                ConnectionState::TransmitTlsData(transmit) => {
                    transmit.done();
                    None
                }
                ConnectionState::PeerClosed => {
                    self.peer_closed = true;
                    None
                }
                ConnectionState::Closed => Some(Pumped::Closed),
                ConnectionState::BlockedHandshake => Some(Pumped::NeedData),
                ConnectionState::WriteTraffic(_) => Some(Pumped::Writable),
                // Early data is off (`max_early_data_size` 0); anything else is new.
                other => {
                    let what = format!("unexpected TLS state {other:?}");
                    self.broken = true;
                    return (used + discard, Err(rustls::Error::General(what)));
                }
            };
            used += discard;
            if let Some(pumped) = done {
                return (used, Ok(pumped));
            }
        }
    }

    /// After an error rustls has queued the alert for the peer; it comes out as one more
    /// record to encode. `buf` is what the failed call left (after its discard): rustls
    /// keeps offsets into it for a handshake message it is joining, so even the call that
    /// only fetches the alert must see the same bytes.
    fn take_alert(&mut self, buf: &mut [u8]) {
        self.broken = true;
        // One call only: rustls offers queued records before it reads `buf` again, and a
        // second call would parse the bad bytes again (and alert twice).
        if let Ok(ConnectionState::EncodeTlsData(mut encode)) =
            self.conn.process_tls_records(buf).state
        {
            let _ = encode_into(&mut self.out, |b| encode.encode(b));
        }
    }

    /// Copies held plaintext into `buf`; true when there was some.
    fn take_plain(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        let held = &self.plain[self.plain_pos..];
        if held.is_empty() {
            return false;
        }
        let n = held.len().min(buf.remaining());
        buf.put_slice(&held[..n]);
        self.plain_pos += n;
        if self.plain_pos == self.plain.len() {
            self.plain = Vec::new();
            self.plain_pos = 0;
        }
        true
    }
}

/// rustls' "buffer too small" errors, which say the size it needs.
trait NeedsRoom {
    fn required(&self) -> Option<usize>;
}

impl NeedsRoom for EncodeError {
    fn required(&self) -> Option<usize> {
        match self {
            EncodeError::InsufficientSize(InsufficientSizeError { required_size }) => {
                Some(*required_size)
            }
            _ => None,
        }
    }
}

impl NeedsRoom for EncryptError {
    fn required(&self) -> Option<usize> {
        match self {
            EncryptError::InsufficientSize(InsufficientSizeError { required_size }) => {
                Some(*required_size)
            }
            _ => None,
        }
    }
}

/// Appends what `encode` writes to `out`, growing it to the size rustls asks for.
fn encode_into<E: NeedsRoom>(
    out: &mut Vec<u8>,
    mut encode: impl FnMut(&mut [u8]) -> Result<usize, E>,
) -> Result<(), E> {
    let start = out.len();
    let mut room = 2048;
    loop {
        out.resize(start + room, 0);
        match encode(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(e) => match e.required() {
                Some(required) => room = required,
                None => {
                    out.truncate(start);
                    return Err(e);
                }
            },
        }
    }
}

/// A tunnel session's inner TLS stream (server side).
pub struct InnerTls<S> {
    io: S,
    tls: Tls,
    /// A record split across reads waits here; empty (unallocated) otherwise.
    held: Vec<u8>,
    /// A fatal error is reported once, then reads end.
    failed: bool,
    /// An error met after plaintext was read, for the next read.
    deferred: Option<io::Error>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> InnerTls<S> {
    /// Completes the handshake on `io`. Application data the client sent with its Finished
    /// is kept for the first read.
    pub async fn accept(io: S, config: Arc<ServerConfig>) -> io::Result<InnerTls<S>> {
        let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
        let mut stream = InnerTls {
            io,
            tls: Tls {
                conn,
                out: Vec::new(),
                out_pos: 0,
                plain: Vec::new(),
                plain_pos: 0,
                peer_closed: false,
                close_sent: false,
                broken: false,
                sni: None,
            },
            held: Vec::new(),
            failed: false,
            deferred: None,
        };
        std::future::poll_fn(|cx| stream.poll_handshake(cx)).await?;
        Ok(stream)
    }

    /// The server name the client asked for (SNI), if any.
    pub fn server_name(&self) -> Option<&str> {
        self.tls.sni.as_deref()
    }

    /// The protocol agreed by ALPN, if any.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.tls.conn.alpn_protocol()
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match ready!(self.poll_out(cx)) {
                Err(e) if self.deferred.is_none() => return Poll::Ready(Err(e)),
                _ => {}
            }
            if !self.tls.conn.is_handshaking() {
                return Poll::Ready(Ok(()));
            }
            let result = ready!(self.poll_records(cx, None));
            if !self.tls.conn.is_handshaking() && result.as_ref().err().is_none_or(is_tls_error) {
                // The client's Finished was good; a bad record or the end after it is the
                // first read's to report, after the alert goes out. A failure of the
                // connection below (a WebSocket limit) still fails the handshake.
                if let Err(e) = result {
                    self.deferred = Some(e);
                }
                continue;
            }
            match result {
                Err(e) => return Poll::Ready(Err(e)),
                Ok(Some(Pumped::Closed) | None) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the client closed the connection during the TLS handshake",
                    )));
                }
                Ok(Some(_)) => {}
            }
        }
    }

    /// Reads once from the connection and processes every complete record held. `None`:
    /// the connection ended cleanly at a record boundary.
    fn poll_records(
        &mut self,
        cx: &mut Context<'_>,
        dst: Option<&mut ReadBuf<'_>>,
    ) -> Poll<io::Result<Option<Pumped>>> {
        let held = self.held.len();
        if held >= MAX_HELD {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "TLS message over 64 KiB",
            )));
        }
        let Self {
            io,
            tls,
            held: kept,
            ..
        } = self;
        let step = with_buf(&READ, READ_BUF.max(held + 4096), |buf| {
            buf[..held].copy_from_slice(kept);
            let mut read = ReadBuf::new(&mut buf[held..]);
            ready!(Pin::new(&mut *io).poll_read(cx, &mut read))?;
            let n = read.filled().len();
            if n == 0 {
                return Poll::Ready(Ok(None));
            }
            let (used, pumped) = tls.pump(&mut buf[..held + n], dst);
            let rest = &buf[used..held + n];
            if rest.is_empty() {
                *kept = Vec::new();
            } else {
                kept.clear();
                kept.extend_from_slice(rest);
            }
            Poll::Ready(pumped.map(Some).map_err(tls_error))
        });
        match step {
            Poll::Ready(Ok(None)) if !self.held.is_empty() => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the connection ended inside a TLS record",
            ))),
            Poll::Ready(Err(e)) if is_tls_error(&e) => {
                // The alert goes out if the connection takes it now.
                let _ = self.poll_out(cx);
                Poll::Ready(Err(e))
            }
            other => other,
        }
    }

    /// Writes what is queued in `out`; ready once it is all gone.
    fn poll_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let tls = &mut self.tls;
        while tls.out_pos < tls.out.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &tls.out[tls.out_pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            tls.out_pos += n;
        }
        if tls.out.capacity() > 0 {
            tls.out = Vec::new();
            tls.out_pos = 0;
        }
        Poll::Ready(Ok(()))
    }

    /// Brings rustls to the state where application data may be encrypted, processing
    /// whatever it holds first (nothing, as a rule: reads process every complete record).
    fn poll_writable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.poll_out(cx))?;
            let (used, pumped) = self.tls.pump(&mut self.held, None);
            self.held.drain(..used);
            match pumped.map_err(tls_error)? {
                Pumped::Writable if self.tls.out_pos == self.tls.out.len() => {
                    return Poll::Ready(Ok(()));
                }
                Pumped::Writable => {}
                Pumped::Closed => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "the TLS connection is closed",
                    )));
                }
                Pumped::NeedData => {
                    return Poll::Ready(Err(io::Error::other(
                        "the TLS connection cannot send yet",
                    )));
                }
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for InnerTls<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.tls.take_plain(buf) || this.tls.peer_closed || this.failed {
                return Poll::Ready(Ok(()));
            }
            if let Some(e) = this.deferred.take() {
                this.failed = true;
                return Poll::Ready(Err(e));
            }
            // Answers rustls gave on its own (a key update) go as the session is polled.
            if let Poll::Ready(Err(e)) = this.poll_out(cx) {
                this.failed = true;
                return Poll::Ready(Err(e));
            }
            let before = buf.filled().len();
            let result = ready!(this.poll_records(cx, Some(buf)));
            let read = buf.filled().len() > before;
            match result {
                Ok(Some(Pumped::Closed)) => this.tls.peer_closed = true,
                Ok(Some(_)) => {}
                // Reported on the next read, after the data before it.
                Ok(None) if read => {}
                Ok(None) => {
                    this.failed = true;
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "peer closed connection without sending TLS close_notify",
                    )));
                }
                Err(e) if read => this.deferred = Some(e),
                Err(e) => {
                    this.failed = true;
                    return Poll::Ready(Err(e));
                }
            }
            if read {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for InnerTls<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    /// One record per call, from as many slices as fit in it, encrypted into the worker's
    /// buffer and written from there; what the connection does not take is kept in `out`.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if bufs.iter().all(|b| b.is_empty()) {
            return Poll::Ready(Ok(0));
        }
        if this.tls.close_sent {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the TLS connection is closing",
            )));
        }
        ready!(this.poll_writable(cx))?;
        let Self { io, tls, held, .. } = this;
        let single = bufs.iter().filter(|b| !b.is_empty()).count() == 1;
        let mut encrypted = |plain: &[u8]| {
            with_buf(&CIPHER, CIPHER_BUF, |cipher| {
                let ConnectionState::WriteTraffic(mut write) = tls
                    .conn
                    .process_tls_records(held)
                    .state
                    .map_err(tls_error)?
                else {
                    return Err(io::Error::other("the TLS connection cannot send now"));
                };
                let n = loop {
                    match write.encrypt(plain, cipher) {
                        Ok(n) => break n,
                        Err(e) => match e.required() {
                            Some(required) => cipher.resize(required, 0),
                            None => return Err(io::Error::other(e.to_string())),
                        },
                    }
                };
                let cipher = &cipher[..n];
                if tls.conn.wants_write() {
                    // Near its record limit rustls queued a key update, encrypted under the
                    // old keys: it goes before this record.
                    let (used, pumped) = tls.pump(held, None);
                    held.drain(..used);
                    pumped.map_err(tls_error)?;
                    tls.out.extend_from_slice(cipher);
                } else {
                    // Sent whatever the connection takes now; the rest waits in `out`.
                    let mut sent = 0;
                    while sent < cipher.len() {
                        match Pin::new(&mut *io).poll_write(cx, &cipher[sent..]) {
                            Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                            Poll::Ready(Ok(w)) => sent += w,
                            Poll::Ready(Err(e)) => return Err(e),
                            Poll::Pending => break,
                        }
                    }
                    tls.out.extend_from_slice(&cipher[sent..]);
                }
                Ok(plain.len())
            })
        };
        let result = if single {
            let b = bufs
                .iter()
                .find(|b| !b.is_empty())
                .expect("one non-empty slice");
            encrypted(&b[..b.len().min(MAX_PLAIN)])
        } else {
            with_buf(&PLAIN, MAX_PLAIN, |gather| {
                let mut len = 0;
                for b in bufs {
                    let take = b.len().min(MAX_PLAIN - len);
                    gather[len..len + take].copy_from_slice(&b[..take]);
                    len += take;
                    if len == MAX_PLAIN {
                        break;
                    }
                }
                encrypted(&gather[..len])
            })
        };
        Poll::Ready(result)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_out(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    /// Sends close_notify (once), then shuts the connection down.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.tls.close_sent && !this.failed && !this.tls.broken {
            ready!(this.poll_out(cx))?;
            this.tls.close_sent = true;
            if let Ok(ConnectionState::WriteTraffic(mut write)) =
                this.tls.conn.process_tls_records(&mut this.held).state
            {
                let _ = encode_into(&mut this.tls.out, |b| write.queue_close_notify(b));
            }
        }
        ready!(this.poll_out(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::issue;
    use crate::proxy::tls::{CertStore, client_config, server_config};
    use rustls::RootCertStore;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// A connection that reads and writes at most `max` bytes per call, so records arrive
    /// split and writes are taken in parts.
    struct Chunky {
        io: DuplexStream,
        max: usize,
    }

    impl AsyncRead for Chunky {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let max = self.max.min(buf.remaining());
            let mut part = ReadBuf::new(buf.initialize_unfilled_to(max));
            ready!(Pin::new(&mut self.io).poll_read(cx, &mut part))?;
            let n = part.filled().len();
            buf.advance(n);
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Chunky {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let max = self.max.min(buf.len());
            Pin::new(&mut self.io).poll_write(cx, &buf[..max])
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    struct Pair {
        server: Arc<ServerConfig>,
        client: Arc<rustls::ClientConfig>,
    }

    fn pair(alpn: &[&[u8]]) -> Pair {
        let pki = issue::generate(
            "tunnel.test",
            Duration::from_secs(3600),
            Duration::from_secs(600),
        )
        .unwrap();
        let store = Arc::new(CertStore::new(issue::certified_key(&pki.server).unwrap()));
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(pki.ca.cert_pem.as_bytes()).unwrap())
            .unwrap();
        Pair {
            server: server_config(store),
            client: client_config(roots, alpn.iter().map(|p| p.to_vec()).collect()),
        }
    }

    async fn connect(
        p: &Pair,
        io: DuplexStream,
        sni: &str,
    ) -> tokio_rustls::client::TlsStream<DuplexStream> {
        tokio_rustls::TlsConnector::from(p.client.clone())
            .connect(ServerName::try_from(sni.to_string()).unwrap(), io)
            .await
            .unwrap()
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// The server echoes `total` bytes through a `read_size` buffer, then shows what it
    /// holds.
    async fn echo(mut s: InnerTls<Chunky>, total: usize, read_size: usize) -> InnerTls<Chunky> {
        let mut buf = vec![0u8; read_size];
        let mut done = 0;
        while done < total {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "early end after {done} of {total}");
            s.write_all(&buf[..n]).await.unwrap();
            done += n;
        }
        s.flush().await.unwrap();
        s
    }

    #[tokio::test]
    async fn data_both_ways_in_any_cut_and_nothing_held_after() {
        let p = pair(&[b"http/1.1"]);
        for (max, read_size, total) in [
            (usize::MAX, 8192, 200_000),
            (1, 128, 40_000),
            (7, 16384, 60_000),
            (1000, 100, 70_000),
        ] {
            let (a, b) = tokio::io::duplex(64 * 1024);
            let config = p.server.clone();
            let server = tokio::spawn(async move {
                let s = InnerTls::accept(Chunky { io: a, max }, config)
                    .await
                    .unwrap();
                assert_eq!(s.server_name(), Some("a.tunnel.test"));
                assert_eq!(s.alpn_protocol(), Some(b"http/1.1".as_slice()));
                echo(s, total, read_size).await
            });
            let mut c = connect(&p, b, "a.tunnel.test").await;
            let data = pattern(total);
            let (mut r, mut w) = tokio::io::split(&mut c);
            let send = async {
                for part in data.chunks(33_333) {
                    w.write_all(part).await.unwrap();
                }
                w.flush().await.unwrap();
            };
            let mut back = vec![0u8; total];
            tokio::join!(send, async { r.read_exact(&mut back).await.unwrap() });
            assert!(
                back == data,
                "echo differs (cut {max}, reads of {read_size})"
            );
            let s = server.await.unwrap();
            assert_eq!(
                (
                    s.held.capacity(),
                    s.tls.plain.capacity(),
                    s.tls.out.capacity()
                ),
                (0, 0, 0),
                "an idle session holds no buffer (cut {max})"
            );
        }
    }

    #[tokio::test]
    async fn close_notify_both_ways() {
        let p = pair(&[b"h2", b"http/1.1"]);
        let (a, b) = tokio::io::duplex(16 * 1024);
        let config = p.server.clone();
        let server = tokio::spawn(async move {
            let mut s = InnerTls::accept(
                Chunky {
                    io: a,
                    max: usize::MAX,
                },
                config,
            )
            .await
            .unwrap();
            assert_eq!(s.alpn_protocol(), Some(b"h2".as_slice()));
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).await.unwrap();
            s.write_all(b"bye").await.unwrap();
            s.shutdown().await.unwrap();
            rest
        });
        let mut c = connect(&p, b, "tunnel.test").await;
        c.write_all(b"last words").await.unwrap();
        c.get_mut().1.send_close_notify();
        c.flush().await.unwrap();
        assert_eq!(server.await.unwrap(), b"last words");
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"bye", "ends cleanly, with our close_notify");
    }

    #[tokio::test]
    async fn an_end_without_close_notify_is_an_error() {
        let p = pair(&[b"http/1.1"]);
        let (a, b) = tokio::io::duplex(16 * 1024);
        let config = p.server.clone();
        let server = tokio::spawn(async move {
            let mut s = InnerTls::accept(
                Chunky {
                    io: a,
                    max: usize::MAX,
                },
                config,
            )
            .await
            .unwrap();
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], b"x");
            s.write_all(b"k").await.unwrap();
            s.flush().await.unwrap();
            s.read(&mut buf).await
        });
        let mut c = connect(&p, b, "tunnel.test").await;
        c.write_all(b"x").await.unwrap();
        c.flush().await.unwrap();
        let mut k = [0u8; 1];
        c.read_exact(&mut k).await.unwrap();
        drop(c);
        let e = server.await.unwrap().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
    }

    #[tokio::test]
    async fn a_client_key_update_is_followed() {
        let p = pair(&[b"http/1.1"]);
        let (a, b) = tokio::io::duplex(16 * 1024);
        let config = p.server.clone();
        let server = tokio::spawn(async move {
            let s = InnerTls::accept(Chunky { io: a, max: 5 }, config)
                .await
                .unwrap();
            echo(s, 6, 64).await
        });
        let mut c = connect(&p, b, "tunnel.test").await;
        c.write_all(b"abc").await.unwrap();
        c.flush().await.unwrap();
        let mut back = [0u8; 3];
        c.read_exact(&mut back).await.unwrap();
        // The server must answer with its own key update before it writes again.
        c.get_mut().1.refresh_traffic_keys().unwrap();
        c.write_all(b"def").await.unwrap();
        c.flush().await.unwrap();
        c.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"def");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn not_tls_fails_the_handshake_with_an_alert() {
        let p = pair(&[b"http/1.1"]);
        let (a, mut b) = tokio::io::duplex(16 * 1024);
        let config = p.server.clone();
        let server = tokio::spawn(async move {
            InnerTls::accept(
                Chunky {
                    io: a,
                    max: usize::MAX,
                },
                config,
            )
            .await
            .err()
        });
        b.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .unwrap();
        let e = server.await.unwrap().expect("the handshake fails");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        assert!(e.get_ref().is_some_and(|i| i.is::<rustls::Error>()), "{e}");
        let mut back = Vec::new();
        b.read_to_end(&mut back).await.unwrap();
        assert_eq!(back.first(), Some(&0x15), "an alert record: {back:?}");
    }

    /// Found by the `inner_tls` fuzz target: a bad record read together with the client's
    /// Finished failed the handshake, although the handshake was complete.
    #[tokio::test]
    async fn a_bad_record_after_the_finished_is_the_first_reads_error() {
        let p = pair(&[b"http/1.1"]);
        for max in [17, usize::MAX] {
            let (a, b) = tokio::io::duplex(16 * 1024);
            let config = p.server.clone();
            let server = tokio::spawn(async move {
                let mut s = InnerTls::accept(Chunky { io: a, max }, config)
                    .await
                    .expect("the handshake itself was good");
                let mut buf = [0u8; 64];
                s.read(&mut buf).await
            });
            let mut raw = connect(&p, b, "tunnel.test").await.into_inner().0;
            raw.write_all(b"\x17\x03\x3a\x9a\xca\x00ello")
                .await
                .unwrap();
            let e = server.await.unwrap().unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        }
    }

    /// Found by the `inner_tls` fuzz target: after an error inside a handshake message
    /// rustls was joining, fetching the alert with an empty buffer panicked in rustls (it
    /// keeps offsets into the caller's buffer).
    #[tokio::test]
    async fn an_error_inside_a_joined_handshake_message_is_an_error_not_a_panic() {
        let p = pair(&[b"http/1.1"]);
        for wire in [
            &b"\x16\x03\x01\x00\x02\x41\x01\x00"[..],
            b"\x16\x03\x01\x00\x02\x01\x00\x16\x03\x01\x00\x01\x00",
        ] {
            let (a, mut b) = tokio::io::duplex(16 * 1024);
            let config = p.server.clone();
            let server = tokio::spawn(async move {
                InnerTls::accept(
                    Chunky {
                        io: a,
                        max: usize::MAX,
                    },
                    config,
                )
                .await
                .err()
            });
            b.write_all(wire).await.unwrap();
            b.shutdown().await.unwrap();
            let e = server
                .await
                .expect("no panic")
                .expect("the handshake fails");
            assert!(
                matches!(
                    e.kind(),
                    io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof
                ),
                "{e}"
            );
        }
    }
}
