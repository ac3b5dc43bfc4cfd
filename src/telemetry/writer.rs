//! The log writer for stderr: request threads append formatted lines to a buffer and a
//! flusher thread writes the buffer out in one `write(2)` per batch.
//!
//! Why not `tracing-appender`'s `non_blocking`: its worker thread blocks on a channel and is
//! woken for every line when the service is busy but not saturated, which costs a futex wake
//! and a write per request, as much as the synchronous write it replaces. Here the first line
//! after a quiet spell wakes the flusher, which then collects lines for [`FLUSH_DELAY`] and
//! writes them at once; while lines keep coming it writes one batch per [`FLUSH_DELAY`]
//! without being woken, and while none come it sleeps without a timer. No request thread
//! ever waits for stderr (a stalled journal or pipe stalls only the flusher).
//!
//! Nothing is lost while the process runs normally: a line is written within about
//! [`FLUSH_DELAY`], at once when the queue passes [`FLUSH_AT`], and what is queued when the
//! [`LogGuard`] drops at exit. Only when stderr stops taking bytes and [`MAX_PENDING`] is
//! queued are further lines dropped, counted, and the count reported once stderr moves
//! again.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How long the flusher collects lines before writing them: short enough that a line is
/// seen at once by a person or a script reading the log, long enough that a busy proxy
/// writes once per many requests.
pub const FLUSH_DELAY: Duration = Duration::from_millis(5);

/// Queued bytes that wake the flusher early.
pub const FLUSH_AT: usize = 64 * 1024;

/// Queued bytes past which new lines are dropped (stderr is not taking them).
pub const MAX_PENDING: usize = 8 * 1024 * 1024;

#[derive(Default)]
struct State {
    pending: Vec<u8>,
    closed: bool,
    /// The flusher sleeps until woken (nothing was queued when it last looked).
    idle: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    dropped: AtomicU64,
}

/// `MakeWriter` for the fmt and JSON layers: each event's bytes join the batch.
#[derive(Clone)]
pub struct BatchWriter {
    shared: Arc<Shared>,
}

/// Flushes what is queued and stops the flusher when dropped; hold it for the process's life.
pub struct LogGuard {
    shared: Arc<Shared>,
    flusher: Option<JoinHandle<()>>,
}

/// Lines dropped because stderr did not take them (see [`MAX_PENDING`]).
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Log lines dropped so far, for `/metrics`.
pub fn dropped_lines() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

impl BatchWriter {
    /// A writer to `out` (stderr in the service) and the guard that owns its flusher thread.
    pub fn new<W: Write + Send + 'static>(out: W) -> (BatchWriter, LogGuard) {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            dropped: AtomicU64::new(0),
        });
        let flusher = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("log-flusher".into())
                .spawn(move || flush_loop(&shared, out))
                .expect("spawn the log flusher thread")
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

    fn append(&self, line: &[u8]) {
        let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.closed {
            // After the guard dropped (the process is ending): write through.
            drop(st);
            let _ = io::stderr().write_all(line);
            return;
        }
        if st.pending.len() + line.len() > MAX_PENDING {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            DROPPED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        st.pending.extend_from_slice(line);
        if st.idle || st.pending.len() >= FLUSH_AT {
            st.idle = false;
            self.shared.wake.notify_one();
        }
    }
}

fn flush_loop<W: Write>(shared: &Shared, mut out: W) {
    let mut batch = Vec::new();
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
            // Swap buffers: the next lines go into the one just written, no reallocation.
            std::mem::swap(&mut st.pending, &mut batch);
            st.closed
        };
        if !batch.is_empty() {
            let _ = out.write_all(&batch);
            let _ = out.flush();
            // A burst should not pin a large buffer for the rest of the process's life.
            batch.clear();
            if batch.capacity() > 4 * FLUSH_AT {
                batch.shrink_to(FLUSH_AT);
            }
        }
        let dropped = shared.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            let _ = writeln!(
                out,
                "mcp-tunnel: {dropped} log lines dropped: stderr did not take them in time"
            );
        }
        if closed {
            return;
        }
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

/// One event's bytes; joins the batch when the layer is done writing the event.
pub struct Line {
    writer: BatchWriter,
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
            self.writer.append(&self.buf);
        }
    }
}

impl BatchWriter {
    /// One event's writer (what the JSON layer asks for per event).
    pub fn line(&self) -> Line {
        Line {
            writer: self.clone(),
            buf: Vec::new(),
        }
    }
}

impl<'a> MakeWriter<'a> for BatchWriter {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        self.line()
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

    #[test]
    fn lines_arrive_whole_in_order_in_few_writes_and_all_by_the_guard() {
        let sink = Sink::default();
        let (w, guard) = BatchWriter::new(sink.clone());
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
        let (w, _guard) = BatchWriter::new(sink.clone());
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
        let (w, guard) = BatchWriter::new(Stalled(gate.clone()));
        let line = vec![b'x'; 1024];
        for _ in 0..(3 * MAX_PENDING / 1024) {
            w.make_writer().write_all(&line).unwrap();
        }
        let pending = w.shared.state.lock().unwrap().pending.len();
        assert!(pending <= MAX_PENDING, "queue bounded: {pending}");
        assert!(w.shared.dropped.load(Ordering::Relaxed) > 0);
        drop(held);
        drop(guard);
    }
}
