//! Logs to journald without a request thread ever waiting on it. tracing-journald sends each
//! event with a blocking `send_to` from the thread that emitted it: when journald stops
//! reading (restarted, stalled on a slow disk, its socket queue full) every worker blocks and
//! the tunnel stops. Here the layer only formats the entry (the journal's native protocol,
//! the same fields tracing-journald writes) and queues it ([`super::writer`]); the log thread
//! sends the datagrams on a non-blocking socket and, when journald does not take them,
//! waits and offers them again while the queue fills, then drops and counts.

use std::io::{self, ErrorKind};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

use super::json::journal_name;
use super::writer::{BatchWriter, Kind, Sink, SinkName, Taken};

/// Where journald reads native-protocol datagrams (systemd.journal-fields(7)).
pub const SOCKET: &str = "/run/systemd/journal/socket";

const IDENTIFIER: &str = "mcp-tunnel";

/// The journal's PRIORITY for a level, as tracing-journald maps it by default.
fn priority(level: &Level) -> &'static [u8] {
    match *level {
        Level::ERROR => b"3",
        Level::WARN => b"4",
        Level::INFO => b"5",
        Level::DEBUG => b"6",
        Level::TRACE => b"7",
    }
}

/// Appends one field in the native protocol: `NAME=value\n`, or for a value with a newline
/// `NAME\n`, its length as 64-bit little endian, the value, `\n`.
fn put(entry: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    entry.extend_from_slice(name);
    if value.contains(&b'\n') {
        entry.push(b'\n');
        entry.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        entry.push(b'=');
    }
    entry.extend_from_slice(value);
    entry.push(b'\n');
}

struct Fields<'a>(&'a mut Vec<u8>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.field(field, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.field(field, &format!("{value:?}"));
    }
}

impl Fields<'_> {
    fn field(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            put(self.0, b"MESSAGE", value.as_bytes());
        } else {
            let name = format!("F_{}", journal_name(field.name()));
            put(self.0, name.as_bytes(), value.as_bytes());
        }
    }
}

/// The entry for one event: the fields tracing-journald writes (`PRIORITY`,
/// `SYSLOG_IDENTIFIER`, `TARGET`, `CODE_FILE`, `CODE_LINE`, `MESSAGE`, `F_<FIELD>`).
pub fn entry(event: &Event<'_>) -> Vec<u8> {
    let meta = event.metadata();
    let mut e = Vec::with_capacity(256);
    put(&mut e, b"PRIORITY", priority(meta.level()));
    put(&mut e, b"SYSLOG_IDENTIFIER", IDENTIFIER.as_bytes());
    put(&mut e, b"TARGET", meta.target().as_bytes());
    if let Some(file) = meta.file() {
        put(&mut e, b"CODE_FILE", file.as_bytes());
    }
    if let Some(line) = meta.line() {
        put(
            &mut e,
            b"CODE_LINE",
            itoa::Buffer::new().format(line).as_bytes(),
        );
    }
    event.record(&mut Fields(&mut e));
    e
}

/// Formats events as journal entries into the log queue.
pub struct JournalLayer {
    queue: BatchWriter,
}

impl JournalLayer {
    pub fn new(queue: BatchWriter) -> JournalLayer {
        JournalLayer { queue }
    }
}

impl<S: Subscriber> Layer<S> for JournalLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let kind = Kind::of(event.metadata().target());
        self.queue.append(kind, &entry(event));
    }
}

/// journald's socket, written from the log thread only.
pub struct JournalSink {
    socket: UnixDatagram,
    path: PathBuf,
}

impl JournalSink {
    /// A non-blocking socket to journald at `path` (journald need not be running yet: a
    /// send that finds nobody is retried like a full queue).
    pub fn new(path: impl Into<PathBuf>) -> io::Result<JournalSink> {
        let socket = UnixDatagram::unbound()?;
        socket.set_nonblocking(true)?;
        Ok(JournalSink {
            socket,
            path: path.into(),
        })
    }

    fn send(&self, entry: &[u8]) -> io::Result<()> {
        self.socket.send_to(entry, &self.path).map(|_| ())
    }
}

/// Whether a send failed because journald is not taking entries now (its queue is full,
/// it is restarting, or not there yet): the log thread waits and tries again.
fn is_stall(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::WouldBlock | ErrorKind::ConnectionRefused | ErrorKind::NotFound
    ) || e.raw_os_error() == Some(105) // ENOBUFS
}

impl Sink for JournalSink {
    fn name(&self) -> SinkName {
        SinkName::Journald
    }

    fn write(
        &mut self,
        bytes: &[u8],
        start: usize,
        ends: &[usize],
        lost: &mut Vec<usize>,
    ) -> Taken {
        let mut at = start;
        for (i, end) in ends.iter().enumerate() {
            match self.send(&bytes[at..*end]) {
                Ok(()) => {}
                Err(e) if is_stall(&e) => return Taken::Stalled(i),
                Err(e) => {
                    // Not a stall (an entry over the datagram size, say): this entry
                    // cannot go, the next may. Counted, and told in the journal.
                    lost.push(i);
                    let _ = self.send(&notice_entry(&format!(
                        "a log entry of {} bytes could not be sent to journald: {e}",
                        end - at
                    )));
                }
            }
            at = *end;
        }
        Taken::All
    }

    fn notice(&mut self, text: &str) {
        let _ = self.send(&notice_entry(text));
    }
}

fn notice_entry(text: &str) -> Vec<u8> {
    let mut e = Vec::with_capacity(128 + text.len());
    put(&mut e, b"PRIORITY", b"4");
    put(&mut e, b"SYSLOG_IDENTIFIER", IDENTIFIER.as_bytes());
    put(&mut e, b"TARGET", b"mcp_tunnel::telemetry");
    put(&mut e, b"MESSAGE", text.as_bytes());
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::prelude::*;

    /// Parses native-protocol entries back into (name, value) pairs.
    fn parse(mut e: &[u8]) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        while !e.is_empty() {
            let nl = e.iter().position(|b| *b == b'\n').unwrap();
            let line = &e[..nl];
            if let Some(eq) = line.iter().position(|b| *b == b'=') {
                out.push((
                    String::from_utf8(line[..eq].to_vec()).unwrap(),
                    line[eq + 1..].to_vec(),
                ));
                e = &e[nl + 1..];
            } else {
                let name = String::from_utf8(line.to_vec()).unwrap();
                let len = u64::from_le_bytes(e[nl + 1..nl + 9].try_into().unwrap()) as usize;
                let value = e[nl + 9..nl + 9 + len].to_vec();
                assert_eq!(e[nl + 9 + len], b'\n');
                out.push((name, value));
                e = &e[nl + 10 + len..];
            }
        }
        out
    }

    #[test]
    fn entries_carry_the_fields_tracing_journald_writes() {
        let got: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let sink = got.clone();
        struct Grab(Arc<Mutex<Vec<Vec<u8>>>>);
        impl<S: Subscriber> Layer<S> for Grab {
            fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
                self.0.lock().unwrap().push(entry(event));
            }
        }
        let sub = tracing_subscriber::registry().with(Grab(sink));
        tracing::subscriber::with_default(sub, || {
            tracing::info!(route = "echo", status = 502u16, "two\nlines");
            tracing::warn!(target: "mcp_audit", peer = %"127.0.0.1:8080", "audit");
        });
        let got = got.lock().unwrap();
        let a = parse(&got[0]);
        let get = |f: &[(String, Vec<u8>)], k: &str| {
            f.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| String::from_utf8(v.clone()).unwrap())
        };
        assert_eq!(get(&a, "MESSAGE").as_deref(), Some("two\nlines"));
        assert_eq!(get(&a, "PRIORITY").as_deref(), Some("5"));
        assert_eq!(get(&a, "F_ROUTE").as_deref(), Some("echo"));
        assert_eq!(get(&a, "F_STATUS").as_deref(), Some("502"));
        assert_eq!(get(&a, "SYSLOG_IDENTIFIER").as_deref(), Some("mcp-tunnel"));
        assert!(get(&a, "CODE_FILE").unwrap().ends_with("journal.rs"));
        let b = parse(&got[1]);
        assert_eq!(get(&b, "TARGET").as_deref(), Some("mcp_audit"));
        assert_eq!(get(&b, "PRIORITY").as_deref(), Some("4"));
        assert_eq!(get(&b, "F_PEER").as_deref(), Some("127.0.0.1:8080"));
    }

    /// A journal socket nobody reads fills up; the sink reports a stall instead of blocking,
    /// and takes the rest once the journal reads again.
    #[test]
    fn a_full_journal_socket_stalls_without_blocking_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("socket");
        let journal = UnixDatagram::bind(&path).unwrap();
        let mut sink = JournalSink::new(&path).unwrap();
        let entry = vec![b'x'; 512];
        let mut bytes = Vec::new();
        let mut ends = Vec::new();
        for _ in 0..100_000 {
            bytes.extend_from_slice(&entry);
            ends.push(bytes.len());
        }
        let started = std::time::Instant::now();
        let Taken::Stalled(n) = sink.write(&bytes, 0, &ends, &mut Vec::new()) else {
            panic!("a socket nobody reads took 100,000 datagrams");
        };
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        assert!(n > 0 && n < ends.len(), "{n}");
        let mut buf = vec![0u8; 1024];
        let mut read = 0;
        journal.set_nonblocking(true).unwrap();
        while let Ok(len) = journal.recv(&mut buf) {
            assert_eq!(len, 512);
            read += 1;
        }
        assert_eq!(read, n);
        assert!(matches!(
            sink.write(&bytes, ends[n - 1], &ends[n..n + 1], &mut Vec::new()),
            Taken::All
        ));
        assert_eq!(journal.recv(&mut buf).unwrap(), 512);
    }
}
