//! The data plane's workers: one `current_thread` tokio runtime per core, each serving the
//! tunnel sessions it was given from start to end.
//!
//! Why not one work-stealing runtime: a session's request goes client -> proxy -> upstream
//! -> proxy -> client in one task (`session_conn`), and on a multi-threaded runtime every
//! wake-up of that task could be a wake-up of another core that steals it, with the task's
//! state, its timers and its connection pool following it (BENCHMARKS.md (a):
//! `TOKIO_WORKER_THREADS=1` alone cut CPU per request by 15 %, but capped the proxy at one
//! core). Here a session never leaves its worker, so its task, its timers (each runtime has
//! its own timer wheel), its upstream idle connections and its metric shard are touched by
//! one core only.
//!
//! The acceptor (on the control plane's runtime) gives each new listener connection to the
//! worker with the fewest open connections, not by SO_REUSEPORT, whose hash splits a few
//! long-lived sessions unevenly (16 sessions on 2 cores: 10/6 is common). Each worker bumps
//! a beat counter on a timer of its own, so the watchdog sees every worker make progress.

use std::cell::Cell;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::runtime::Handle;

use crate::lifecycle::Shutdown;

/// How often a worker proves it runs (the accept loop's beat has the same period).
pub const BEAT: Duration = Duration::from_millis(250);

thread_local! {
    /// This thread's worker number, 1-based; 0 off the workers (the control plane, tests).
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// The worker this code runs on (1..=N), or 0 anywhere else. Per-worker state (idle
/// upstream connections, metric shards) is indexed by it, so a worker only writes its own.
pub fn current() -> usize {
    INDEX.with(Cell::get)
}

/// One worker's counters, padded to a cache line of its own so the two cores never write
/// the same line (the acceptor's increments are once per connection).
#[repr(align(128))]
#[derive(Default)]
struct Stats {
    /// Listener connections given to this worker and not yet ended (upgrade or session).
    open: AtomicUsize,
    beats: AtomicU64,
}

struct Worker {
    handle: Handle,
    stats: Stats,
}

/// The running workers (threads named `mcp-worker-N`). They stop once shutdown has begun
/// and every task the shutdown tracks has ended (`Shutdown::drain`).
pub struct Workers {
    workers: Vec<Worker>,
}

/// Holds a worker's `open` count up for one listener connection, from its assignment
/// until the last of its tasks (the upgrade, then the session) lets go of it.
pub struct Assigned {
    workers: Arc<Workers>,
    index: usize,
}

impl Drop for Assigned {
    fn drop(&mut self) {
        self.workers.workers[self.index - 1]
            .stats
            .open
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl Assigned {
    /// The worker's handle, to spawn the connection's task on.
    pub fn handle(&self) -> &Handle {
        &self.workers.workers[self.index - 1].handle
    }
}

impl Workers {
    /// Starts `n` workers (at least one). Fails only when a thread or runtime cannot be
    /// created (out of memory or thread limits).
    pub fn start(n: usize, shutdown: &Shutdown) -> std::io::Result<Arc<Workers>> {
        let mut workers = Vec::with_capacity(n.max(1));
        for index in 1..=n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            workers.push((index, rt));
        }
        let all = Arc::new(Workers {
            workers: workers
                .iter()
                .map(|(_, rt)| Worker {
                    handle: rt.handle().clone(),
                    stats: Stats::default(),
                })
                .collect(),
        });
        for (index, rt) in workers {
            let sd = shutdown.clone();
            let me = all.clone();
            std::thread::Builder::new()
                .name(format!("mcp-worker-{index}"))
                .spawn(move || {
                    INDEX.with(|i| i.set(index));
                    rt.block_on(async move {
                        let mut beat = tokio::time::interval(BEAT);
                        let stopped = sd.stopped();
                        tokio::pin!(stopped);
                        loop {
                            tokio::select! {
                                _ = &mut stopped => break,
                                _ = beat.tick() => {
                                    me.workers[index - 1].stats.beats.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                    });
                })?;
        }
        Ok(all)
    }

    /// The worker with the fewest open connections (the lowest number on a tie), its count
    /// already raised for the connection about to be given to it.
    pub fn assign(self: &Arc<Self>) -> Assigned {
        let (at, _) = self
            .workers
            .iter()
            .enumerate()
            .min_by_key(|(_, w)| w.stats.open.load(Ordering::Relaxed))
            .expect("at least one worker");
        self.workers[at].stats.open.fetch_add(1, Ordering::Relaxed);
        Assigned {
            workers: self.clone(),
            index: at + 1,
        }
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Each worker's beat count, in worker order (for the watchdog).
    pub fn beats(&self) -> Vec<u64> {
        self.workers
            .iter()
            .map(|w| w.stats.beats.load(Ordering::Relaxed))
            .collect()
    }

    /// Each worker's open listener connections, in worker order (for `/metrics`).
    pub fn open(&self) -> Vec<usize> {
        self.workers
            .iter()
            .map(|w| w.stats.open.load(Ordering::Relaxed))
            .collect()
    }
}

/// Runs `fut` on the worker `assigned` names, tracked by `shutdown` so that a drain waits
/// for it; `assigned` is held until the future ends.
pub fn spawn<F>(shutdown: &Shutdown, assigned: Arc<Assigned>, fut: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let handle = assigned.handle().clone();
    shutdown.spawn_on(
        async move {
            let _held = assigned;
            fut.await
        },
        &handle,
    );
}

/// The number of workers `workers` (config) asks for: the available cores when unset.
pub fn count(configured: Option<usize>) -> usize {
    configured.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(std::num::NonZeroUsize::get)
            .unwrap_or(1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_go_to_the_worker_with_fewest_and_come_back() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let shutdown = Shutdown::new();
        let workers = rt.block_on(async { Workers::start(2, &shutdown).unwrap() });
        let a = workers.assign();
        let b = workers.assign();
        assert_ne!(
            a.index, b.index,
            "the second goes to the other, emptier worker"
        );
        let c = workers.assign();
        assert_eq!(workers.open().iter().sum::<usize>(), 3);
        let c_at = c.index;
        drop(c);
        let d = workers.assign();
        assert_eq!(d.index, c_at, "a freed slot is taken again");
        drop((a, b, d));
        assert_eq!(workers.open(), vec![0, 0]);
    }

    #[test]
    fn tasks_run_on_their_worker_and_every_worker_beats() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let shutdown = Shutdown::new();
            let workers = Workers::start(2, &shutdown).unwrap();
            let mut seen = Vec::new();
            let mut held = Vec::new();
            for _ in 0..2 {
                let assigned = Arc::new(workers.assign());
                // Still open while the next one is assigned: it goes to the other worker.
                held.push(assigned.clone());
                let want = assigned.index;
                let (tx, rx) = tokio::sync::oneshot::channel();
                spawn(&shutdown, assigned, async move {
                    let _ = tx.send((current(), std::thread::current().name().map(str::to_owned)));
                });
                let (ran_on, name) = rx.await.unwrap();
                assert_eq!(ran_on, want);
                assert_eq!(name.as_deref(), Some(format!("mcp-worker-{want}").as_str()));
                seen.push(ran_on);
            }
            seen.sort();
            assert_eq!(seen, vec![1, 2]);
            assert_eq!(current(), 0, "the test's own thread is no worker");
            let before = workers.beats();
            tokio::time::sleep(BEAT * 3).await;
            let after = workers.beats();
            assert!(
                before.iter().zip(&after).all(|(b, a)| a > b),
                "{before:?} -> {after:?}"
            );
            assert_eq!(shutdown.drain(Duration::from_secs(1)).await, 0);
        });
    }
}
