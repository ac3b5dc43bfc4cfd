//! Shutdown and drain: one signal that every long-lived task watches, and one tracker that
//! the process waits on, so that stopping is "stop accepting, let in-flight work finish up to
//! a deadline, then close what is left" everywhere.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Cheap to clone; every spawned connection task holds one.
#[derive(Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
    /// Cancelled by `close_now`: every tracked task is dropped where it stands (its sockets
    /// close), for when waiting is the wrong thing to do (`mcp-tunnel sever`).
    immediate: CancellationToken,
    tracker: TaskTracker,
}

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Spawns a task that `drain` waits for.
    pub fn spawn<F>(&self, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(abortable(fut, self.immediate.clone()));
    }

    /// As `spawn`, on the runtime `handle` names (a data-plane worker's).
    pub fn spawn_on<F>(&self, fut: F, handle: &tokio::runtime::Handle)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker
            .spawn_on(abortable(fut, self.immediate.clone()), handle);
    }

    /// Resolves once shutdown has begun and every tracked task has ended: the drain is
    /// over (a worker runtime may stop then).
    pub async fn stopped(&self) {
        self.token.cancelled().await;
        self.tracker.wait().await
    }

    /// Resolves once shutdown has begun.
    pub async fn started(&self) {
        self.token.cancelled().await
    }

    pub fn is_started(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Begins shutdown and waits up to `deadline` for tracked tasks; returns how many were
    /// still running when the deadline passed (0 means a clean drain).
    pub async fn drain(&self, deadline: Duration) -> usize {
        self.token.cancel();
        self.tracker.close();
        match tokio::time::timeout(deadline, self.tracker.wait()).await {
            Ok(()) => 0,
            Err(_) => self.tracker.len(),
        }
    }

    /// Begins shutdown and drops every tracked task now, without waiting for in-flight work;
    /// returns how many were running. Waits (briefly) until they are gone.
    pub async fn close_now(&self) -> usize {
        let running = self.tracker.len();
        self.token.cancel();
        self.immediate.cancel();
        self.tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tracker.wait()).await;
        running
    }

    /// Number of tracked tasks still running.
    pub fn active(&self) -> usize {
        self.tracker.len()
    }
}

/// `fut`, unless `immediate` is cancelled first: then it is dropped.
async fn abortable<F: Future<Output = ()>>(fut: F, immediate: CancellationToken) {
    tokio::select! {
        biased;
        _ = immediate.cancelled() => {}
        _ = fut => {}
    }
}

/// Resolves on the first SIGTERM or SIGINT.
pub async fn termination_signal() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}
