//! cloudflared as a supervised child: spawn with an explicit environment, forward its logs,
//! poll its `/ready`, restart it with backoff when it dies, hangs or never connects, restart
//! it gracefully when the token file changes, and stop it first at shutdown so that it
//! unregisters from the edge while the proxy still serves in-flight requests.

pub mod inspect;
pub mod logs;
pub mod policy;
pub mod spawn;
pub mod token;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::CloudflaredConfig;
use policy::{
    Decision, Ending, Health, HealthLimits, HealthTracker, Probe, RestartPolicy, RestartReason,
};
use spawn::{Launcher, SpawnError, Spawner};
use token::{Token, TokenError};

/// Errors found before the first spawn; all are configuration problems (exit 78).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Binary(#[from] SpawnError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("cannot start the cloudflared spawner thread: {0}")]
    Thread(std::io::Error),
}

/// How supervision ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Stopped on request.
    Stopped,
    /// Restarting cannot help (exit 255, bad token file, binary gone): exit 78.
    Permanent(String),
}

/// What the supervisor, `/readyz`, `/metrics` and STATUS read about cloudflared.
pub struct Status {
    health: watch::Sender<Health>,
    /// Restarts since the supervisor started (not counting the first start).
    pub restarts: AtomicU64,
    /// Current child PID, 0 when none.
    pub pid: AtomicU32,
    /// Bumped on every supervision tick: evidence for the watchdog that the loop runs.
    pub beats: AtomicU64,
    pub crash_loop: AtomicBool,
    /// The last reason it was restarted or gave up, for `/readyz`.
    pub last_problem: Mutex<Option<String>>,
    /// `cloudflared --version`, read once before the first start.
    pub version: Mutex<Option<String>>,
    /// The running connector's ID, from its `/ready` answer.
    pub connector_id: Mutex<Option<String>>,
}

impl Status {
    pub fn new(initial: Health) -> Arc<Status> {
        Arc::new(Status {
            health: watch::channel(initial).0,
            restarts: AtomicU64::new(0),
            pid: AtomicU32::new(0),
            beats: AtomicU64::new(0),
            crash_loop: AtomicBool::new(false),
            last_problem: Mutex::new(None),
            version: Mutex::new(None),
            connector_id: Mutex::new(None),
        })
    }

    pub fn health(&self) -> Health {
        *self.health.borrow()
    }

    /// Resolves on every health change.
    pub fn subscribe(&self) -> watch::Receiver<Health> {
        self.health.subscribe()
    }

    fn set_health(&self, h: Health) {
        self.health.send_if_modified(|cur| {
            let changed = *cur != h;
            *cur = h;
            changed
        });
    }

    fn problem(&self, p: impl Into<String>) {
        *self.last_problem.lock().unwrap_or_else(|e| e.into_inner()) = Some(p.into());
    }

    pub fn last_problem(&self) -> Option<String> {
        self.last_problem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn version(&self) -> Option<String> {
        self.version
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn connector_id(&self) -> Option<String> {
        self.connector_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set(slot: &Mutex<Option<String>>, value: Option<String>) {
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = value;
    }
}

/// A running supervision task.
pub struct Supervision {
    pub status: Arc<Status>,
    stop: CancellationToken,
    force: CancellationToken,
    task: tokio::task::JoinHandle<Outcome>,
}

impl Supervision {
    /// Resolves when supervision ends by itself (permanent failure).
    pub async fn finished(&mut self) -> Outcome {
        (&mut self.task)
            .await
            .unwrap_or_else(|e| Outcome::Permanent(format!("supervision task failed: {e}")))
    }

    /// Graceful stop: SIGTERM, wait up to the grace period, then SIGKILL.
    pub fn begin_stop(&self) {
        self.stop.cancel();
    }

    /// Cancelling it ends the grace period now (second signal).
    pub fn force_token(&self) -> CancellationToken {
        self.force.clone()
    }

    pub async fn stopped(self) -> Outcome {
        self.task.await.unwrap_or(Outcome::Stopped)
    }
}

/// Checks the binary and the token, then starts supervising. `origin` is the proxy's bound
/// listener address; `log_level` the supervisor's, used for `--loglevel` by default.
pub fn start(
    cfg: CloudflaredConfig,
    log_level: &str,
    origin: SocketAddr,
    launcher: Launcher,
) -> Result<Supervision, StartError> {
    let binary = spawn::resolve_binary(cfg.binary.as_deref(), std::env::var_os("PATH").as_ref())?;
    let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
    let token_path = token::token_path(cfg.token_file.as_deref(), credentials.as_deref());
    let token = token::read(&token_path)?;
    info!(binary = %binary.display(), token_file = %token_path.display(), tunnel_id = token.tunnel_id(), "cloudflared supervision starting");
    let spawner = Spawner::new(launcher).map_err(StartError::Thread)?;
    let status = Status::new(Health::Starting);
    let stop = CancellationToken::new();
    let force = CancellationToken::new();
    let run = Run {
        cfg,
        log_level: log_level.to_string(),
        origin,
        binary,
        token_path,
        spawner,
        status: status.clone(),
        stop: stop.clone(),
        force: force.clone(),
    };
    let task = tokio::spawn(run.supervise(token));
    Ok(Supervision {
        status,
        stop,
        force,
        task,
    })
}

struct Run {
    cfg: CloudflaredConfig,
    log_level: String,
    origin: SocketAddr,
    binary: PathBuf,
    token_path: PathBuf,
    spawner: Spawner,
    status: Arc<Status>,
    stop: CancellationToken,
    force: CancellationToken,
}

impl Run {
    async fn supervise(self, mut token: Token) -> Outcome {
        let policy = RestartPolicy {
            backoff_min: self.cfg.restart_backoff_min,
            backoff_max: self.cfg.restart_backoff_max,
            reset_after: self.cfg.restart_reset_after,
            crash_loop_restarts: self.cfg.crash_loop_restarts,
            crash_loop_window: self.cfg.crash_loop_window,
        };
        let limits = HealthLimits {
            startup_timeout: self.cfg.startup_timeout,
            hung_timeout: self.cfg.hung_timeout,
            disconnected_restart_after: self.cfg.disconnected_restart_after,
        };
        let (token_tx, mut token_rx) = mpsc::unbounded_channel();
        let _watcher = watch_token_file(&self.token_path, token_tx);
        let mut history = policy::RestartHistory::default();
        match inspect::version(&self.binary, Duration::from_secs(10)).await {
            Ok(v) => {
                info!(version = %v, "cloudflared binary");
                Status::set(&self.status.version, Some(v));
            }
            Err(e) => warn!(error = %e, "cannot read cloudflared's version"),
        }
        loop {
            let metrics = match self.metrics_addr().await {
                Ok(a) => a,
                Err(e) => {
                    return self.give_up(format!(
                        "cannot choose a loopback port for cloudflared's metrics: {e}"
                    ));
                }
            };
            let args = spawn::args(&self.cfg, &self.log_level, metrics, self.origin);
            let env = spawn::env(&self.cfg, &token);
            let mut child = match self.spawner.spawn(&self.binary, &args, &env).await {
                Ok(c) => c,
                Err(e) => return self.give_up(e.to_string()),
            };
            let pid = child.id().unwrap_or(0);
            self.status.pid.store(pid, Ordering::SeqCst);
            self.status.set_health(Health::Starting);
            info!(pid, metrics = %metrics, url = %args.last().map(String::as_str).unwrap_or(""), "cloudflared started");
            let rejections = Arc::new(AtomicU32::new(0));
            forward_logs(&mut child, rejections.clone());

            let mut tracker = HealthTracker::new(Instant::now());
            let mut tick = tokio::time::interval(self.cfg.health_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let ending = loop {
                tokio::select! {
                    st = child.wait() => {
                        break match st {
                            Ok(st) => match (st.code(), std::os::unix::process::ExitStatusExt::signal(&st)) {
                                (Some(c), _) => Ending::Exited(c),
                                (None, Some(s)) => Ending::Signaled(s),
                                _ => Ending::Exited(-1),
                            },
                            Err(e) => {
                                error!(error = %e, "cannot wait for cloudflared");
                                Ending::Exited(-1)
                            }
                        };
                    }
                    _ = tick.tick() => {
                        self.status.beats.fetch_add(1, Ordering::Relaxed);
                        let (probe, connector) = probe_ready_detail(metrics, self.cfg.health_interval.min(Duration::from_secs(5))).await;
                        if connector.is_some() {
                            Status::set(&self.status.connector_id, connector);
                        }
                        let restart = tracker.observe(probe, Instant::now(), &limits);
                        let before = self.status.health();
                        let now = tracker.health();
                        if before != now {
                            log_health(now);
                        }
                        self.status.set_health(now);
                        let refused = rejections.load(Ordering::Relaxed);
                        if refused >= PERSISTENT_REJECTIONS && !now.is_ready() {
                            self.terminate(&mut child, Duration::ZERO).await;
                            self.status.pid.store(0, Ordering::SeqCst);
                            return self.give_up(format!(
                                "the edge refused the tunnel token ({refused} Unauthorized registration errors, no connection): check [cloudflared] token_file holds this tunnel's current token (rotated?)"
                            ));
                        }
                        if let Some(reason) = restart {
                            warn!(pid, reason = reason.as_str(), "restarting cloudflared");
                            self.status.problem(reason.as_str());
                            let grace = if reason == RestartReason::Hung { Duration::ZERO } else { self.cfg.grace_period };
                            self.terminate(&mut child, grace).await;
                            break Ending::Replaced(reason);
                        }
                    }
                    Some(()) = token_rx.recv() => {
                        // Editors and `setup` write by rename: let the burst settle.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        while token_rx.try_recv().is_ok() {}
                        match token::read(&self.token_path) {
                            Ok(new) if new != token => {
                                info!(pid, tunnel_id = new.tunnel_id(), "tunnel token changed: restarting cloudflared gracefully");
                                self.terminate(&mut child, self.cfg.grace_period).await;
                                break Ending::TokenChanged;
                            }
                            Ok(_) => {}
                            Err(e) => warn!(error = %e, "token file changed but cannot be used; cloudflared keeps running with the previous token"),
                        }
                    }
                    _ = self.stop.cancelled() => {
                        info!(pid, grace = ?self.cfg.grace_period, "stopping cloudflared (it unregisters from the edge)");
                        self.terminate(&mut child, self.cfg.grace_period).await;
                        self.status.pid.store(0, Ordering::SeqCst);
                        self.status.set_health(Health::Stopped);
                        return Outcome::Stopped;
                    }
                }
            };
            self.status.pid.store(0, Ordering::SeqCst);
            self.status.set_health(Health::Stopped);
            let ready_for = tracker.ready_for(Instant::now());
            if let Ending::Exited(c) | Ending::Signaled(c) = ending {
                let how = if matches!(ending, Ending::Exited(_)) {
                    "exited"
                } else {
                    "killed by signal"
                };
                warn!(pid, code = c, "cloudflared {how}");
                self.status.problem(format!("cloudflared {how} {c}"));
            }
            match policy.decide(
                &mut history,
                ending,
                ready_for,
                Instant::now(),
                fastrand::f64(),
            ) {
                Decision::Permanent(why) => return self.give_up(why),
                Decision::Restart {
                    delay,
                    cap,
                    attempt,
                    crash_loop,
                } => {
                    self.status.restarts.fetch_add(1, Ordering::Relaxed);
                    self.status.crash_loop.store(crash_loop, Ordering::Relaxed);
                    if crash_loop {
                        error!(restarts_in_window = self.cfg.crash_loop_restarts, window = ?self.cfg.crash_loop_window, "cloudflared is crash-looping: check its log lines above (target cloudflared)");
                    }
                    info!(
                        attempt,
                        delay_ms = delay.as_millis() as u64,
                        backoff_cap_ms = cap.as_millis() as u64,
                        "cloudflared restart scheduled"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.stop.cancelled() => return Outcome::Stopped,
                    }
                }
            }
            // The file may have changed while nothing watched it (or without an event).
            match token::read(&self.token_path) {
                Ok(t) => token = t,
                Err(e) => return self.give_up(e.to_string()),
            }
        }
    }

    fn give_up(&self, why: String) -> Outcome {
        error!(reason = %why, "cloudflared cannot run; not restarting it");
        self.status.problem(why.clone());
        self.status.set_health(Health::Stopped);
        Outcome::Permanent(why)
    }

    async fn metrics_addr(&self) -> std::io::Result<SocketAddr> {
        if let Some(port) = self.cfg.metrics_port {
            return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
        }
        // Bind and release: cloudflared binds it a moment later. The kernel hands out
        // ephemeral ports round-robin, so a collision in between is unlikely.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        l.local_addr()
    }

    /// SIGTERM to the process group, up to `grace` (cut short by `force`), then SIGKILL.
    async fn terminate(&self, child: &mut Child, grace: Duration) {
        let Some(pid) = child.id() else {
            return;
        };
        let group = Pid::from_raw(pid as i32);
        if !grace.is_zero() {
            let _ = killpg(group, Signal::SIGTERM);
            let margin = Duration::from_secs(5);
            tokio::select! {
                r = child.wait() => {
                    if let Ok(st) = r {
                        info!(pid, status = %st, "cloudflared stopped");
                    }
                    // Anything it left in its group goes too.
                    let _ = killpg(group, Signal::SIGKILL);
                    return;
                }
                _ = tokio::time::sleep(grace + margin) => warn!(pid, "cloudflared did not stop within its grace period: killing it"),
                _ = self.force.cancelled() => warn!(pid, "second signal: killing cloudflared now"),
            }
        }
        let _ = killpg(group, Signal::SIGKILL);
        let _ = child.wait().await;
    }
}

fn log_health(h: Health) {
    match h {
        Health::Connected(n) | Health::Degraded(n) => info!(
            connections = n,
            expected = policy::EXPECTED_CONNECTIONS,
            state = h.name(),
            "cloudflared connected to the edge"
        ),
        Health::Disconnected => {
            warn!("cloudflared lost its edge connections; it keeps retrying by itself")
        }
        Health::Hung => warn!("cloudflared's metrics server stopped answering"),
        _ => info!(state = h.name(), "cloudflared state"),
    }
}

/// Edge refusals of the token, seen without any connection becoming ready, after which the
/// refusal counts as persistent (one per HA connection attempt, twice over).
const PERSISTENT_REJECTIONS: u32 = 8;

fn forward_logs(child: &mut Child, rejections: Arc<AtomicU32>) {
    if let Some(out) = child.stdout.take() {
        let rejections = rejections.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                if logs::is_token_rejection(&l) {
                    rejections.fetch_add(1, Ordering::Relaxed);
                }
                logs::emit(&l, "stdout");
            }
        });
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(async move {
            let mut lines = BufReader::new(err).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                if logs::is_token_rejection(&l) {
                    rejections.fetch_add(1, Ordering::Relaxed);
                }
                logs::emit(&l, "stderr");
            }
        });
    }
}

/// One GET `/ready`. 200 and 503 carry `readyConnections`; anything else, or no answer in
/// `timeout`, is `NoAnswer`.
pub async fn probe_ready(addr: SocketAddr, timeout: Duration) -> Probe {
    probe_ready_detail(addr, timeout).await.0
}

/// As `probe_ready`, with the `connectorId` the answer names (`status` and `doctor` show it).
pub async fn probe_ready_detail(addr: SocketAddr, timeout: Duration) -> (Probe, Option<String>) {
    let get = async {
        let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .ok()?;
        tokio::spawn(conn);
        let req = http::Request::get("/ready")
            .header(http::header::HOST, addr.to_string())
            .body(Empty::<bytes::Bytes>::new())
            .ok()?;
        let resp = send.send_request(req).await.ok()?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        Some((status, body))
    };
    let answer = tokio::time::timeout(timeout, get).await.ok().flatten();
    let json = |body: &[u8]| serde_json::from_slice::<serde_json::Value>(body).ok();
    let connector = |v: Option<&serde_json::Value>| {
        v.and_then(|v| v.get("connectorId")?.as_str().map(str::to_owned))
            .filter(|id| !id.is_empty())
    };
    match answer {
        Some((200, body)) => {
            let v = json(&body);
            let n = v
                .as_ref()
                .and_then(|v| v.get("readyConnections").and_then(|n| n.as_u64()))
                .unwrap_or(1);
            (Probe::Ready(n as u32), connector(v.as_ref()))
        }
        Some((503, body)) => (Probe::NotReady, connector(json(&body).as_ref())),
        _ => (Probe::NoAnswer, None),
    }
}

/// Watches the token file's directory (files are replaced by rename, which a watch on the
/// file itself would miss). Returns the watcher, which must be kept alive.
fn watch_token_file(
    path: &Path,
    tx: mpsc::UnboundedSender<()>,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let dir = path.parent()?.to_path_buf();
    let name = path.file_name()?.to_owned();
    let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res
            && ev
                .paths
                .iter()
                .any(|p| p.file_name() == Some(name.as_os_str()))
        {
            let _ = tx.send(());
        }
    })
    .map_err(|e| warn!(error = %e, "cannot watch the token file; a changed token needs a restart"))
    .ok()?;
    w.watch(&dir, notify::RecursiveMode::NonRecursive)
        .map_err(|e| warn!(dir = %dir.display(), error = %e, "cannot watch the token file's directory; a changed token needs a restart"))
        .ok()?;
    Some(w)
}
