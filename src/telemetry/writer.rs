//! The log pipeline: request threads append formatted entries to a bounded queue, and one
//! log thread writes them to the sink (stderr, or the journal's socket) in batches. No
//! request thread ever makes a system call for a log line, and nothing it does waits on the
//! sink: a stalled journal or pipe stalls only the log thread.
//!
//! Why not `tracing-appender`'s `non_blocking`: its worker thread blocks on a channel and is
//! woken for every line when the service is busy but not saturated, which costs a futex wake
//! and a write per request, as much as the synchronous write it replaces. Here the first line
//! after a quiet spell wakes the log thread, which then collects lines for [`FLUSH_DELAY`]
//! and writes them at once; while lines keep coming it writes one batch per [`FLUSH_DELAY`]
//! without being woken, and while none come it sleeps without a timer.
//!
//! Nothing is lost while the sink takes what it is given: an entry is written within about
//! [`FLUSH_DELAY`], at once when the queue passes [`FLUSH_AT`], and what is queued when the
//! [`LogGuard`] drops at exit. When the sink stops taking entries (journald stopped, or its
//! socket queue full) the log thread retries with backoff, keeping what it holds, and once
//! [`MAX_PENDING`] is queued further entries are dropped: counted per sink and per kind
//! (`mcp_tunnel_log_lines_dropped_total{sink,kind}`), and reported in the log once the sink
//! takes entries again.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::Metadata;
use tracing_subscriber::fmt::MakeWriter;

use crate::proxy::body::ACCESS_TARGET;
use crate::proxy::mcp::AUDIT_TARGET;

/// How long the log thread collects entries before writing them: short enough that a line is
/// seen at once by a person or a script reading the log, long enough that a busy proxy
/// writes once per many requests.
pub const FLUSH_DELAY: Duration = Duration::from_millis(5);

/// Queued bytes that wake the log thread early.
pub const FLUSH_AT: usize = 64 * 1024;

/// Queued bytes past which new entries are dropped (the sink is not taking them).
pub const MAX_PENDING: usize = 8 * 1024 * 1024;

/// How long the guard, at exit, keeps offering a stalled sink what is queued.
pub const EXIT_GRACE: Duration = Duration::from_secs(2);

/// What a log entry is, for the drop counters: the audit trail and the access log are what
/// a security team and an operator rely on; everything else is the service's own account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Access,
    Audit,
    Other,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Access, Kind::Audit, Kind::Other];

    pub fn of(target: &str) -> Kind {
        match target {
            ACCESS_TARGET => Kind::Access,
            AUDIT_TARGET => Kind::Audit,
            _ => Kind::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Access => "access",
            Kind::Audit => "audit",
            Kind::Other => "other",
        }
    }
}

/// Where entries go: the label of the drop counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkName {
    Stderr,
    Journald,
}

impl SinkName {
    pub const ALL: [SinkName; 2] = [SinkName::Stderr, SinkName::Journald];

    pub fn as_str(self) -> &'static str {
        match self {
            SinkName::Stderr => "stderr",
            SinkName::Journald => "journald",
        }
    }
}

/// Entries dropped so far, per sink and kind, for `/metrics`.
static DROPPED: [[AtomicU64; 3]; 2] = [
    [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
    [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
];

/// Entries written so far, per sink and kind: with [`dropped`], every entry the service made
/// is accounted for.
static WRITTEN: [[AtomicU64; 3]; 2] = [
    [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
    [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
];

/// Log entries dropped so far by `sink` of `kind`.
pub fn dropped(sink: SinkName, kind: Kind) -> u64 {
    DROPPED[sink as usize][kind as usize].load(Ordering::Relaxed)
}

/// Log entries the sink took so far of `kind`.
pub fn written(sink: SinkName, kind: Kind) -> u64 {
    WRITTEN[sink as usize][kind as usize].load(Ordering::Relaxed)
}

/// What a sink did with a batch.
pub enum Taken {
    /// Every entry.
    All,
    /// The first `n` entries; the sink takes nothing more for now (try again later).
    Stalled(usize),
}

/// A destination for batches of entries. Each entry is whole (one line, or one journal
/// entry); `ends` gives where each ends in `bytes`.
pub trait Sink: Send + 'static {
    fn name(&self) -> SinkName;

    /// Writes entries `ends` of `bytes` (entry `i` spans `ends[i-1]..ends[i]`, the first
    /// from `start`), as many as the sink takes now. An entry the sink can never take (over
    /// its size limit) goes into `lost` (its index in `ends`), to be counted as dropped.
    fn write(&mut self, bytes: &[u8], start: usize, ends: &[usize], lost: &mut Vec<usize>)
    -> Taken;

    /// A notice of the pipeline's own (lines were dropped), in the sink's format.
    fn notice(&mut self, text: &str);
}

/// A byte stream (stderr): the whole batch in one write. A blocking stream that stops taking
/// bytes blocks the log thread only, never a request thread.
pub struct StreamSink<W> {
    out: W,
    /// The notice as a line of the stream's format (text, or a JSON object).
    format_notice: fn(&str) -> String,
}

impl<W: Write + Send + 'static> StreamSink<W> {
    pub fn new(out: W, format_notice: fn(&str) -> String) -> StreamSink<W> {
        StreamSink { out, format_notice }
    }
}

impl<W: Write + Send + 'static> Sink for StreamSink<W> {
    fn name(&self) -> SinkName {
        SinkName::Stderr
    }

    fn write(&mut self, bytes: &[u8], start: usize, ends: &[usize], _: &mut Vec<usize>) -> Taken {
        let end = ends.last().copied().unwrap_or(start);
        let _ = self.out.write_all(&bytes[start..end]);
        let _ = self.out.flush();
        Taken::All
    }

    fn notice(&mut self, text: &str) {
        let line = (self.format_notice)(text);
        let _ = self.out.write_all(line.as_bytes());
        let _ = self.out.flush();
    }
}

/// A notice as a text line.
pub fn text_notice(text: &str) -> String {
    format!("mcp-tunnel: {text}\n")
}

#[derive(Default)]
struct State {
    pending: Vec<u8>,
    /// Where each queued entry ends in `pending`, and its kind.
    ends: Vec<usize>,
    kinds: Vec<Kind>,
    closed: bool,
    /// The log thread sleeps until woken (nothing was queued when it last looked).
    idle: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    sink: SinkName,
    /// Dropped since the last notice, per kind.
    unreported: [AtomicU64; 3],
}

/// `MakeWriter` for the fmt and JSON layers, and the journal layer's queue: each event's
/// bytes join the batch as one entry.
#[derive(Clone)]
pub struct BatchWriter {
    shared: Arc<Shared>,
}

/// Flushes what is queued and stops the log thread when dropped; hold it for the process's
/// life.
pub struct LogGuard {
    shared: Arc<Shared>,
    flusher: Option<JoinHandle<()>>,
}

impl BatchWriter {
    /// A writer to `sink` and the guard that owns its log thread.
    pub fn new<S: Sink>(sink: S) -> (BatchWriter, LogGuard) {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            sink: sink.name(),
            unreported: Default::default(),
        });
        let flusher = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("log-flusher".into())
                .spawn(move || flush_loop(&shared, sink))
                .expect("spawn the log thread")
        };
        (
            BatchWriter {
                shared: shared.clone(),
            },
            LogGuard {
                shared,
                flusher: Some(flusher),
            },
        )
    }

    /// A writer to stderr as text lines.
    pub fn stderr() -> (BatchWriter, LogGuard) {
        BatchWriter::new(StreamSink::new(io::stderr(), text_notice))
    }

    fn drop_entry(&self, kind: Kind) {
        DROPPED[self.shared.sink as usize][kind as usize].fetch_add(1, Ordering::Relaxed);
        self.shared.unreported[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Queues one whole entry.
    pub fn append(&self, kind: Kind, entry: &[u8]) {
        let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.closed {
            // After the guard dropped (the process is ending): nobody writes it any more.
            drop(st);
            self.drop_entry(kind);
            return;
        }
        if st.pending.len() + entry.len() > MAX_PENDING {
            drop(st);
            self.drop_entry(kind);
            return;
        }
        st.pending.extend_from_slice(entry);
        let end = st.pending.len();
        st.ends.push(end);
        st.kinds.push(kind);
        if st.idle || st.pending.len() >= FLUSH_AT {
            st.idle = false;
            self.shared.wake.notify_one();
        }
    }

    /// One event's writer.
    pub fn line(&self, kind: Kind) -> Line {
        Line {
            writer: self.clone(),
            kind,
            buf: Vec::new(),
        }
    }
}

/// The batch the log thread holds while the sink takes it.
#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    ends: Vec<usize>,
    kinds: Vec<Kind>,
}

fn flush_loop<S: Sink>(shared: &Shared, mut sink: S) {
    let mut batch = Batch::default();
    loop {
        let closed = {
            let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            while st.pending.is_empty() && !st.closed {
                st.idle = true;
                st = shared.wake.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            st.idle = false;
            if st.pending.len() < FLUSH_AT && !st.closed {
                // Collect what else comes in the next few milliseconds: one write for all.
                st = shared
                    .wake
                    .wait_timeout(st, FLUSH_DELAY)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            // Swap buffers: the next entries go into the ones just written, no reallocation.
            std::mem::swap(&mut st.pending, &mut batch.bytes);
            std::mem::swap(&mut st.ends, &mut batch.ends);
            std::mem::swap(&mut st.kinds, &mut batch.kinds);
            st.closed
        };
        deliver(shared, &mut sink, &batch, closed);
        // A burst should not pin a large buffer for the rest of the process's life.
        batch.bytes.clear();
        batch.ends.clear();
        batch.kinds.clear();
        if batch.bytes.capacity() > 4 * FLUSH_AT {
            batch.bytes.shrink_to(FLUSH_AT);
            batch.ends.shrink_to(1024);
            batch.kinds.shrink_to(1024);
        }
        let dropped: Vec<(Kind, u64)> = Kind::ALL
            .iter()
            .map(|k| {
                (
                    *k,
                    shared.unreported[*k as usize].swap(0, Ordering::Relaxed),
                )
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        if !dropped.is_empty() {
            let what: Vec<String> = dropped
                .iter()
                .map(|(k, n)| format!("{n} {}", k.as_str()))
                .collect();
            sink.notice(&format!(
                "log lines dropped: {} ({} did not take them in time; counted in mcp_tunnel_log_lines_dropped_total)",
                what.join(", "),
                shared.sink.as_str()
            ));
        }
        if closed {
            return;
        }
    }
}

/// Offers the batch to the sink until it has taken all of it. While the sink is stalled the
/// log thread waits (1 ms, doubling to 100 ms) and offers the rest again; new entries queue
/// meanwhile, up to [`MAX_PENDING`]. At exit it gives up after [`EXIT_GRACE`], counting
/// what is left as dropped.
fn deliver<S: Sink>(shared: &Shared, sink: &mut S, batch: &Batch, closing: bool) {
    let mut from = 0;
    let mut pause = Duration::from_millis(1);
    let mut stalled_since: Option<Instant> = None;
    let mut lost = Vec::new();
    while from < batch.ends.len() {
        let start = if from == 0 { 0 } else { batch.ends[from - 1] };
        lost.clear();
        let taken = match sink.write(&batch.bytes, start, &batch.ends[from..], &mut lost) {
            Taken::All => batch.ends.len() - from,
            Taken::Stalled(n) => n,
        };
        for (i, kind) in batch.kinds[from..from + taken].iter().enumerate() {
            let counter = if lost.contains(&i) {
                &DROPPED
            } else {
                &WRITTEN
            };
            counter[shared.sink as usize][*kind as usize].fetch_add(1, Ordering::Relaxed);
        }
        from += taken;
        if from == batch.ends.len() {
            return;
        }
        if taken > 0 {
            pause = Duration::from_millis(1);
            stalled_since = None;
        }
        let since = *stalled_since.get_or_insert_with(Instant::now);
        let giving_up = (closing
            || shared
                .state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .closed)
            && since.elapsed() >= EXIT_GRACE;
        if giving_up {
            for kind in &batch.kinds[from..] {
                DROPPED[shared.sink as usize][*kind as usize].fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        {
            let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
            st.closed = true;
        }
        self.shared.wake.notify_one();
        if let Some(f) = self.flusher.take() {
            let _ = f.join();
        }
    }
}

/// One event's bytes; joins the batch as one entry when the layer is done writing the event.
pub struct Line {
    writer: BatchWriter,
    kind: Kind,
    buf: Vec<u8>,
}

impl Write for Line {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            self.writer.append(self.kind, &self.buf);
        }
    }
}

impl<'a> MakeWriter<'a> for BatchWriter {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        self.line(Kind::Other)
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Line {
        self.line(Kind::of(meta.target()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let mut s = self.0.lock().unwrap();
            s.0.extend_from_slice(b);
            s.1 += 1;
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn to(sink: &Sink) -> (BatchWriter, LogGuard) {
        BatchWriter::new(StreamSink::new(sink.clone(), text_notice))
    }

    #[test]
    fn lines_arrive_whole_in_order_in_few_writes_and_all_by_the_guard() {
        let sink = Sink::default();
        let (w, guard) = to(&sink);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let w = w.clone();
                std::thread::spawn(move || {
                    for i in 0..2000 {
                        let mut line = w.make_writer();
                        write!(line, "t{t} ").unwrap();
                        writeln!(line, "line {i}").unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(guard);
        let (bytes, writes) = sink.0.lock().unwrap().clone();
        let text = String::from_utf8(bytes).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines.len(),
            8000,
            "every line written by the time the guard drops"
        );
        for t in 0..4 {
            let mine: Vec<usize> = lines
                .iter()
                .filter_map(|l| l.strip_prefix(&format!("t{t} line ")))
                .map(|n| n.parse().unwrap())
                .collect();
            assert_eq!(
                mine,
                (0..2000).collect::<Vec<_>>(),
                "thread {t}: whole, in order"
            );
        }
        assert!(writes < 8000 / 4, "batched: {writes} writes for 8000 lines");
    }

    #[test]
    fn a_line_waits_at_most_about_one_flush_interval() {
        let sink = Sink::default();
        let (w, _guard) = to(&sink);
        writeln!(w.make_writer(), "hello").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while sink.0.lock().unwrap().0.is_empty() {
            assert!(std::time::Instant::now() < deadline, "never flushed");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(sink.0.lock().unwrap().0, b"hello\n");
    }

    #[test]
    fn a_stalled_output_drops_and_counts_instead_of_growing() {
        struct Stalled(Arc<Mutex<()>>);
        impl Write for Stalled {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                drop(self.0.lock().unwrap());
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let gate = Arc::new(Mutex::new(()));
        let held = gate.lock().unwrap();
        let (w, guard) = BatchWriter::new(StreamSink::new(Stalled(gate.clone()), text_notice));
        let line = vec![b'x'; 1024];
        let before = dropped(SinkName::Stderr, Kind::Audit);
        for _ in 0..(3 * MAX_PENDING / 1024) {
            w.line(Kind::Audit).write_all(&line).unwrap();
        }
        let pending = w.shared.state.lock().unwrap().pending.len();
        assert!(pending <= MAX_PENDING, "queue bounded: {pending}");
        assert!(dropped(SinkName::Stderr, Kind::Audit) > before);
        drop(held);
        drop(guard);
    }

    /// A sink that takes `budget` entries and then stalls until given more, like a journal
    /// whose socket queue is full.
    struct Metered {
        budget: Arc<Mutex<usize>>,
        got: Arc<Mutex<Vec<Vec<u8>>>>,
        notices: Arc<Mutex<Vec<String>>>,
    }

    impl super::Sink for Metered {
        fn name(&self) -> SinkName {
            SinkName::Journald
        }
        fn write(
            &mut self,
            bytes: &[u8],
            start: usize,
            ends: &[usize],
            _: &mut Vec<usize>,
        ) -> Taken {
            let mut budget = self.budget.lock().unwrap();
            let mut at = start;
            for (i, end) in ends.iter().enumerate() {
                if *budget == 0 {
                    return Taken::Stalled(i);
                }
                *budget -= 1;
                self.got.lock().unwrap().push(bytes[at..*end].to_vec());
                at = *end;
            }
            Taken::All
        }
        fn notice(&mut self, text: &str) {
            self.notices.lock().unwrap().push(text.to_string());
        }
    }

    #[test]
    fn a_stalled_sink_keeps_what_it_holds_counts_what_it_drops_and_picks_up_again() {
        let budget = Arc::new(Mutex::new(10usize));
        let got = Arc::new(Mutex::new(Vec::new()));
        let notices = Arc::new(Mutex::new(Vec::new()));
        let (w, guard) = BatchWriter::new(Metered {
            budget: budget.clone(),
            got: got.clone(),
            notices: notices.clone(),
        });
        let before: Vec<u64> = Kind::ALL
            .iter()
            .map(|k| dropped(SinkName::Journald, *k) + written(SinkName::Journald, *k))
            .collect();
        // Far more than the queue holds while the sink takes nothing: the writers never wait.
        let entry = vec![b'a'; 4096];
        let n = 3 * MAX_PENDING / entry.len();
        let started = Instant::now();
        for i in 0..n {
            let kind = Kind::ALL[i % 3];
            w.append(kind, &entry);
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "appending never waits on the sink: {:?}",
            started.elapsed()
        );
        assert!(dropped(SinkName::Journald, Kind::Audit) > 0);
        // The journal reads again: what was held and queued arrives, and the drops are told.
        *budget.lock().unwrap() = usize::MAX;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !w.shared.state.lock().unwrap().pending.is_empty() {
            assert!(Instant::now() < deadline, "the queue never drained");
            std::thread::sleep(Duration::from_millis(5));
        }
        w.append(Kind::Other, b"after\n");
        while !got.lock().unwrap().iter().any(|e| e == b"after\n") {
            assert!(
                Instant::now() < deadline,
                "the sink never got the entry after the stall"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(guard);
        assert!(
            notices.lock().unwrap().iter().any(|n| n.contains("audit")),
            "{:?}",
            notices.lock().unwrap()
        );
        // Every entry is either written or counted as dropped (other tests of this process
        // use the stderr sink only).
        let total: u64 = Kind::ALL
            .iter()
            .zip(&before)
            .map(|(k, b)| dropped(SinkName::Journald, *k) + written(SinkName::Journald, *k) - b)
            .sum();
        assert_eq!(total, n as u64 + 1);
        assert_eq!(got.lock().unwrap().len() as u64, {
            Kind::ALL
                .iter()
                .map(|k| written(SinkName::Journald, *k))
                .sum::<u64>()
        });
    }
}
