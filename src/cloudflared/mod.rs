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
use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};
use tokio::process::Child;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{CloudflaredConfig, Replacement};
use policy::{
    Decision, Ending, Health, HealthLimits, HealthTracker, Probe, Refusals, RestartPolicy,
    RestartReason,
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
    /// Set while the edge refuses the token (cleared by an accepted registration): why an
    /// unconnected cloudflared is not coming up.
    refused: Mutex<Option<String>>,
    /// The connector starting beside the running one during a replacement: PID and health.
    incoming: Mutex<Option<(u32, Health)>>,
    /// Planned replacements completed (the new connector registered, the old one retired).
    pub replacements: AtomicU64,
    /// Planned replacements given up (the running connector stayed).
    pub replacements_failed: AtomicU64,
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
            refused: Mutex::new(None),
            incoming: Mutex::new(None),
            replacements: AtomicU64::new(0),
            replacements_failed: AtomicU64::new(0),
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

    fn set_incoming(&self, c: Option<(u32, Health)>) {
        *self.incoming.lock().unwrap_or_else(|e| e.into_inner()) = c;
    }

    /// During a replacement: the new connector's PID and health.
    pub fn incoming(&self) -> Option<(u32, Health)> {
        *self.incoming.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_refused(&self, why: Option<String>) {
        *self.refused.lock().unwrap_or_else(|e| e.into_inner()) = why;
    }

    /// The edge's current refusal of the token, if any.
    pub fn refused(&self) -> Option<String> {
        self.refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn last_problem(&self) -> Option<String> {
        self.last_problem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// For `/status`: which cloudflared runs (a package may bundle another than PATH's).
    pub fn version(&self) -> Option<String> {
        self.version
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// For `/status`: the ID the edge and the Console know this connector by.
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
    replace: mpsc::UnboundedSender<Replace>,
    task: tokio::task::JoinHandle<Outcome>,
}

/// A planned replacement of the running connector.
#[derive(Debug)]
pub struct Replace {
    /// The `[cloudflared]` section to run from now on; `None` keeps the running one.
    pub cfg: Option<CloudflaredConfig>,
    /// Why, for the log.
    pub why: &'static str,
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

    /// A handle that asks for planned replacements (operator request, changed section).
    pub fn replacer(&self) -> mpsc::UnboundedSender<Replace> {
        self.replace.clone()
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
    let token_path = token_path_of(&cfg);
    let token = token::read(&token_path)?;
    info!(binary = %binary.display(), token_file = %token_path.display(), tunnel_id = token.tunnel_id(), "cloudflared supervision starting");
    let spawner = Spawner::new(launcher).map_err(StartError::Thread)?;
    let status = Status::new(Health::Starting);
    let stop = CancellationToken::new();
    let force = CancellationToken::new();
    let (replace, replace_rx) = mpsc::unbounded_channel();
    let run = Run {
        log_level: log_level.to_string(),
        origin,
        spawner,
        status: status.clone(),
        stop: stop.clone(),
        force: force.clone(),
    };
    let task = tokio::spawn(run.supervise(cfg, binary, token, replace_rx));
    Ok(Supervision {
        status,
        stop,
        force,
        replace,
        task,
    })
}

fn token_path_of(cfg: &CloudflaredConfig) -> PathBuf {
    let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
    token::token_path(cfg.token_file.as_deref(), credentials.as_deref())
}

struct Run {
    log_level: String,
    origin: SocketAddr,
    spawner: Spawner,
    status: Arc<Status>,
    stop: CancellationToken,
    force: CancellationToken,
}

/// One running cloudflared process and what the supervisor knows about it.
struct Connector {
    child: Child,
    pid: u32,
    metrics: SocketAddr,
    events: mpsc::Receiver<logs::Event>,
    tracker: HealthTracker,
    refusals: Refusals,
    /// It said its metrics port was taken (it exits then): starting it again is the cure.
    metrics_port_taken: bool,
}

impl Connector {
    /// Grace period wait for stopping it now, from a fresh `/ready` probe.
    async fn stop_wait(&self, grace: Duration) -> Duration {
        policy::stop_wait(probe_ready(self.metrics, STOP_PROBE_TIMEOUT).await, grace)
    }
}

fn ending_of(st: std::io::Result<std::process::ExitStatus>) -> Ending {
    match st {
        Ok(st) => match (
            st.code(),
            std::os::unix::process::ExitStatusExt::signal(&st),
        ) {
            (Some(c), _) => Ending::Exited(c),
            (None, Some(s)) => Ending::Signaled(s),
            _ => Ending::Exited(-1),
        },
        Err(e) => {
            error!(error = %e, "cannot wait for cloudflared");
            Ending::Exited(-1)
        }
    }
}

impl Run {
    async fn supervise(
        self,
        mut cfg: CloudflaredConfig,
        mut binary: PathBuf,
        mut token: Token,
        mut replace_rx: mpsc::UnboundedReceiver<Replace>,
    ) -> Outcome {
        let mut token_path = token_path_of(&cfg);
        let (token_tx, mut token_rx) = mpsc::unbounded_channel();
        let mut _watcher = watch_token_file(&token_path, token_tx.clone());
        let mut history = policy::RestartHistory::default();
        // Connectors replaced by a newer one, still unregistering and draining.
        let mut retiring: Vec<tokio::task::JoinHandle<()>> = Vec::new();
        // Starts again at once because the metrics port was taken; reset once connected.
        let mut port_relaunches = 0;
        loop {
            let mut cur = match self.launch(&cfg, &binary, &token).await {
                Ok(c) => c,
                Err(why) => return self.give_up(why),
            };
            self.status.pid.store(cur.pid, Ordering::SeqCst);
            self.status.set_health(Health::Starting);
            let mut tick = tokio::time::interval(cfg.health_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let ending = loop {
                retiring.retain(|t| !t.is_finished());
                // A planned replacement: a new token, a new section, or a request.
                let planned: Option<(CloudflaredConfig, Token, &'static str)> = tokio::select! {
                    st = cur.child.wait() => break ending_of(st),
                    _ = tick.tick() => {
                        self.status.beats.fetch_add(1, Ordering::Relaxed);
                        let (probe, connector) = probe_ready_detail(cur.metrics, cfg.health_interval.min(Duration::from_secs(5))).await;
                        if connector.is_some() {
                            Status::set(&self.status.connector_id, connector);
                        }
                        let restart = cur.tracker.observe(probe, Instant::now(), &limits_of(&cfg));
                        let now = cur.tracker.health();
                        if self.status.health() != now {
                            log_health(now);
                        }
                        self.status.set_health(now);
                        if now.is_ready() {
                            port_relaunches = 0;
                            cur.refusals.accepted();
                            self.status.set_refused(None);
                        } else if let Some((n, since)) = cur.refusals.persistent(Instant::now(), cfg.token_refused_timeout) {
                            self.terminate(&mut cur.child, policy::NOT_CONNECTED_STOP_WAIT).await;
                            self.status.pid.store(0, Ordering::SeqCst);
                            return self.give_up(format!(
                                "the edge refused the tunnel token for {} ({n} refused registrations, none accepted, no connection; token_refused_timeout = {}): check [cloudflared] token_file holds this tunnel's current token (rotated or revoked?)",
                                humantime::format_duration(Duration::from_secs(since.as_secs())),
                                humantime::format_duration(cfg.token_refused_timeout),
                            ));
                        }
                        if let Some(reason) = restart {
                            warn!(pid = cur.pid, reason = reason.as_str(), "restarting cloudflared");
                            self.status.problem(reason.as_str());
                            let wait = if reason == RestartReason::Hung {
                                Duration::ZERO
                            } else {
                                policy::stop_wait(probe, cfg.grace_period)
                            };
                            self.terminate(&mut cur.child, wait).await;
                            break Ending::Replaced(reason);
                        }
                        None
                    }
                    Some(ev) = cur.events.recv() => {
                        self.on_event(&mut cur, ev, &cfg);
                        None
                    }
                    Some(()) = token_rx.recv() => {
                        // Editors and `setup` write by rename: let the burst settle.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        while token_rx.try_recv().is_ok() {}
                        match token::read(&token_path) {
                            Ok(new) if new != token => {
                                info!(pid = cur.pid, tunnel_id = new.tunnel_id(), "tunnel token changed: replacing cloudflared");
                                Some((cfg.clone(), new, "tunnel token changed"))
                            }
                            Ok(_) => None,
                            Err(e) => {
                                warn!(error = %e, "token file changed but cannot be used; cloudflared keeps running with the previous token");
                                None
                            }
                        }
                    }
                    Some(req) = replace_rx.recv() => {
                        let next = req.cfg.unwrap_or_else(|| cfg.clone());
                        let path = token_path_of(&next);
                        match token::read(&path) {
                            Ok(t) => Some((next, t, req.why)),
                            Err(e) => {
                                warn!(error = %e, why = req.why, "cannot replace cloudflared: the token cannot be read; the running connector stays");
                                self.status.replacements_failed.fetch_add(1, Ordering::Relaxed);
                                None
                            }
                        }
                    }
                    _ = self.stop.cancelled() => {
                        let wait = cur.stop_wait(cfg.grace_period).await;
                        if wait > policy::NOT_CONNECTED_STOP_WAIT {
                            info!(pid = cur.pid, grace = ?cfg.grace_period, "stopping cloudflared (it unregisters from the edge)");
                        } else {
                            info!(pid = cur.pid, wait = ?wait, "stopping cloudflared; it has no edge connection, so there is nothing to drain and its grace period is not waited for");
                        }
                        self.terminate(&mut cur.child, wait).await;
                        self.status.pid.store(0, Ordering::SeqCst);
                        self.status.set_health(Health::Stopped);
                        for t in retiring {
                            let _ = t.await;
                        }
                        return Outcome::Stopped;
                    }
                };
                let Some((next_cfg, next_token, why)) = planned else {
                    continue;
                };
                let next_binary = match spawn::resolve_binary(
                    next_cfg.binary.as_deref(),
                    std::env::var_os("PATH").as_ref(),
                ) {
                    Ok(b) => b,
                    Err(e) => {
                        error!(error = %e, why, "cannot replace cloudflared; the running connector stays");
                        self.status
                            .replacements_failed
                            .fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                };
                if next_cfg.replacement == Replacement::Restart {
                    // Stop, then start: the tunnel is down in between (no overlap).
                    info!(
                        pid = cur.pid,
                        why, "restarting cloudflared (replacement = \"restart\")"
                    );
                    let wait = cur.stop_wait(cfg.grace_period).await;
                    self.terminate(&mut cur.child, wait).await;
                    // The token is read again before the restart.
                    drop(next_token);
                    (cfg, binary) = (next_cfg, next_binary);
                    follow_token_file(&cfg, &mut token_path, &mut _watcher, &token_tx);
                    break Ending::Planned;
                }
                match self
                    .overlap(&mut cur, &next_cfg, &next_binary, &next_token, why)
                    .await
                {
                    Ok(next) => {
                        let old = std::mem::replace(&mut cur, next);
                        let wait = old.stop_wait(cfg.grace_period).await;
                        info!(
                            old = old.pid,
                            new = cur.pid,
                            ?wait,
                            why,
                            "new cloudflared registered; stopping the old one (it unregisters and drains)"
                        );
                        retiring.push(tokio::spawn(retire(old, wait, self.force.clone())));
                        self.status.pid.store(cur.pid, Ordering::SeqCst);
                        self.status.replacements.fetch_add(1, Ordering::Relaxed);
                        if next_cfg.health_interval != cfg.health_interval {
                            tick = tokio::time::interval(next_cfg.health_interval);
                        }
                        (cfg, binary, token) = (next_cfg, next_binary, next_token);
                        follow_token_file(&cfg, &mut token_path, &mut _watcher, &token_tx);
                    }
                    Err(e) => {
                        error!(pid = cur.pid, why, error = %e, "cloudflared replacement failed; the running connector stays");
                        self.status
                            .problem(format!("replacement failed ({why}): {e}"));
                        self.status
                            .replacements_failed
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
            };
            self.status.pid.store(0, Ordering::SeqCst);
            self.status.set_health(Health::Stopped);
            // Not a crash: the port was taken in the moment before cloudflared bound it.
            if let Ending::Exited(_) = ending
                && self
                    .relaunch_for_port(&mut cur, &mut port_relaunches, &cfg)
                    .await
            {
                continue;
            }
            let ready_for = cur.tracker.ready_for(Instant::now());
            if let Ending::Exited(c) | Ending::Signaled(c) = ending {
                let how = if matches!(ending, Ending::Exited(_)) {
                    "exited"
                } else {
                    "killed by signal"
                };
                warn!(pid = cur.pid, code = c, "cloudflared {how}");
                self.status.problem(format!("cloudflared {how} {c}"));
            }
            let policy = policy_of(&cfg);
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
                        error!(restarts_in_window = cfg.crash_loop_restarts, window = ?cfg.crash_loop_window, "cloudflared is crash-looping: check its log lines above (target cloudflared)");
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
            match token::read(&token_path) {
                Ok(t) => token = t,
                Err(e) => return self.give_up(e.to_string()),
            }
        }
    }

    /// Spawns one cloudflared with `cfg` and `token`, its logs forwarded.
    async fn launch(
        &self,
        cfg: &CloudflaredConfig,
        binary: &Path,
        token: &Token,
    ) -> Result<Connector, String> {
        let metrics = metrics_addr(cfg)
            .await
            .map_err(|e| format!("cannot choose a loopback port for cloudflared's metrics: {e}"))?;
        // Read at every start: a package upgrade may have replaced the binary.
        match inspect::version(binary, Duration::from_secs(10)).await {
            Ok(v) => {
                info!(version = %v, "cloudflared binary");
                Status::set(&self.status.version, Some(v));
            }
            Err(e) => warn!(error = %e, "cannot read cloudflared's version"),
        }
        let args = spawn::args(cfg, &self.log_level, metrics, self.origin);
        let env = spawn::env(cfg, token);
        let mut child = self
            .spawner
            .spawn(binary, &args, &env)
            .await
            .map_err(|e| e.to_string())?;
        let pid = child.id().unwrap_or(0);
        info!(pid, metrics = %metrics, url = %args.last().map(String::as_str).unwrap_or(""), "cloudflared started");
        let (events_tx, events) = mpsc::channel(64);
        forward_logs(&mut child, events_tx);
        Ok(Connector {
            child,
            pid,
            metrics,
            events,
            tracker: HealthTracker::new(Instant::now()),
            refusals: Refusals::default(),
            metrics_port_taken: false,
        })
    }

    fn on_event(&self, c: &mut Connector, ev: logs::Event, cfg: &CloudflaredConfig) {
        match ev {
            logs::Event::Registered => {
                c.refusals.accepted();
                self.status.set_refused(None);
            }
            logs::Event::RegistrationRefused(err) => {
                c.refusals.refused(Instant::now());
                let n = c.refusals.count();
                if n == 1 || n.is_power_of_two() {
                    warn!(pid = c.pid, refusals = n, error = %err, give_up_after = %humantime::format_duration(cfg.token_refused_timeout), "the edge refused the tunnel token; cloudflared retries (a new or rotated token can take minutes to reach the edge)");
                }
                self.status.set_refused(Some(format!("the edge refused the tunnel token ({n} refused registrations, none accepted; cloudflared retries, the supervisor gives up after token_refused_timeout): {err}")));
            }
            logs::Event::MetricsPortTaken => c.metrics_port_taken = true,
        }
    }

    /// Starts the next connector beside `cur` and waits until it has registered
    /// `replace_connections` edge connections (no more than `cur` has, at least one), within
    /// `replace_timeout`. `cur` keeps serving meanwhile; if it ends, the wait goes on and
    /// the new connector takes over when ready. On failure the new one is stopped.
    async fn overlap(
        &self,
        cur: &mut Connector,
        cfg: &CloudflaredConfig,
        binary: &Path,
        token: &Token,
        why: &'static str,
    ) -> Result<Connector, String> {
        // The running connector's PID stays current until the swap.
        let mut next = self.launch(cfg, binary, token).await?;
        let want = cfg
            .replace_connections
            .min(self.status.health().connections())
            .max(1);
        info!(old = cur.pid, new = next.pid, want, timeout = ?cfg.replace_timeout, why, "starting a new cloudflared beside the running one");
        self.status.set_incoming(Some((next.pid, Health::Starting)));
        let deadline = tokio::time::sleep(cfg.replace_timeout);
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(cfg.health_interval);
        let mut cur_alive = true;
        let mut relaunches = 0;
        let result = loop {
            tokio::select! {
                st = cur.child.wait(), if cur_alive => {
                    warn!(pid = cur.pid, ending = ?ending_of(st), "the running cloudflared ended during its replacement");
                    cur_alive = false;
                    self.status.set_health(Health::Stopped);
                }
                st = next.child.wait() => {
                    let ending = ending_of(st);
                    if self.relaunch_for_port(&mut next, &mut relaunches, cfg).await {
                        match self.launch(cfg, binary, token).await {
                            Ok(again) => {
                                next = again;
                                self.status.set_incoming(Some((next.pid, Health::Starting)));
                                continue;
                            }
                            Err(e) => break Err(e),
                        }
                    }
                    break Err(format!("the new cloudflared ended before it registered ({ending:?})"));
                }
                Some(ev) = next.events.recv() => self.on_event(&mut next, ev, cfg),
                Some(ev) = cur.events.recv(), if cur_alive => self.on_event(cur, ev, cfg),
                _ = tick.tick() => {
                    self.status.beats.fetch_add(1, Ordering::Relaxed);
                    if cur_alive {
                        let p = probe_ready(cur.metrics, STOP_PROBE_TIMEOUT).await;
                        cur.tracker.observe(p, Instant::now(), &limits_of(cfg));
                        self.status.set_health(cur.tracker.health());
                    }
                    let p = probe_ready(next.metrics, STOP_PROBE_TIMEOUT).await;
                    next.tracker.observe(p, Instant::now(), &limits_of(cfg));
                    self.status.set_incoming(Some((next.pid, next.tracker.health())));
                    if let Probe::Ready(n) = p && n >= want {
                        break Ok(());
                    }
                }
                _ = &mut deadline => {
                    break Err(format!(
                        "the new cloudflared did not register {want} edge connection(s) within replace_timeout ({})",
                        humantime::format_duration(cfg.replace_timeout)
                    ));
                }
                _ = self.stop.cancelled() => break Err("stopping".into()),
            }
        };
        self.status.set_incoming(None);
        match result {
            Ok(()) => {
                self.status.set_health(next.tracker.health());
                Ok(next)
            }
            Err(e) => {
                let wait = next.stop_wait(cfg.grace_period).await;
                self.terminate(&mut next.child, wait).await;
                if !cur_alive {
                    // Nothing runs now: the next loop turn restarts as after a crash.
                    return Err(format!("{e}; the running one had ended too"));
                }
                Err(e)
            }
        }
    }

    /// Whether `c`, which has exited, should be started again at once on another port: it
    /// said its metrics port was taken, and fewer than [`METRICS_PORT_RELAUNCHES`] such
    /// starts (`tries`) came before. What it still had in its log pipes (they close soon
    /// after it exits) is handled first, so its last words count.
    async fn relaunch_for_port(
        &self,
        c: &mut Connector,
        tries: &mut u32,
        cfg: &CloudflaredConfig,
    ) -> bool {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while let Some(ev) = c.events.recv().await {
                self.on_event(c, ev, cfg);
            }
        })
        .await;
        if !c.metrics_port_taken || *tries >= METRICS_PORT_RELAUNCHES {
            return false;
        }
        *tries += 1;
        warn!(pid = c.pid, metrics = %c.metrics, "cloudflared's metrics port was taken before it could bind it: starting it again on another port");
        true
    }

    fn give_up(&self, why: String) -> Outcome {
        error!(reason = %why, "cloudflared cannot run; not restarting it");
        self.status.problem(why.clone());
        self.status.set_health(Health::Stopped);
        Outcome::Permanent(why)
    }

    /// SIGTERM to the process group, up to `wait` (cut short by `force`), then SIGKILL;
    /// a zero `wait` kills at once (a hung child ignores SIGTERM).
    async fn terminate(&self, child: &mut Child, wait: Duration) {
        terminate(child, wait, &self.force).await
    }
}

/// Stops a replaced connector in the background: it unregisters and drains.
async fn retire(mut old: Connector, wait: Duration, force: CancellationToken) {
    terminate(&mut old.child, wait, &force).await;
}

/// SIGTERM to the process group, up to `wait` (cut short by `force`), then SIGKILL; a zero
/// `wait` kills at once.
async fn terminate(child: &mut Child, wait: Duration, force: &CancellationToken) {
    let Some(pid) = child.id() else {
        return;
    };
    let group = Pid::from_raw(pid as i32);
    if !wait.is_zero() {
        let _ = killpg(group, Signal::SIGTERM);
        tokio::select! {
            r = child.wait() => {
                if let Ok(st) = r {
                    info!(pid, status = %st, "cloudflared stopped");
                }
                // Anything it left in its group goes too.
                let _ = killpg(group, Signal::SIGKILL);
                return;
            }
            _ = tokio::time::sleep(wait) => warn!(pid, ?wait, "cloudflared did not stop in time: killing it"),
            _ = force.cancelled() => warn!(pid, "second signal: killing cloudflared now"),
        }
    }
    let _ = killpg(group, Signal::SIGKILL);
    let _ = child.wait().await;
}

/// Watches the token file `cfg` names, if it is not the one watched already.
fn follow_token_file(
    cfg: &CloudflaredConfig,
    watched: &mut PathBuf,
    watcher: &mut Option<notify::RecommendedWatcher>,
    tx: &mpsc::UnboundedSender<()>,
) {
    let path = token_path_of(cfg);
    if path != *watched {
        *watcher = watch_token_file(&path, tx.clone());
        *watched = path;
    }
}

fn policy_of(cfg: &CloudflaredConfig) -> RestartPolicy {
    RestartPolicy {
        backoff_min: cfg.restart_backoff_min,
        backoff_max: cfg.restart_backoff_max,
        reset_after: cfg.restart_reset_after,
        crash_loop_restarts: cfg.crash_loop_restarts,
        crash_loop_window: cfg.crash_loop_window,
    }
}

fn limits_of(cfg: &CloudflaredConfig) -> HealthLimits {
    HealthLimits {
        startup_timeout: cfg.startup_timeout,
        hung_timeout: cfg.hung_timeout,
        disconnected_restart_after: cfg.disconnected_restart_after,
    }
}

async fn metrics_addr(cfg: &CloudflaredConfig) -> std::io::Result<SocketAddr> {
    if let Some(port) = cfg.metrics_port {
        let fixed = SocketAddr::from(([127, 0, 0, 1], port));
        // Busy while the connector being replaced still holds it: a free port meanwhile.
        if tokio::net::TcpListener::bind(fixed).await.is_ok() {
            return Ok(fixed);
        }
        warn!(
            port,
            "cloudflared.metrics_port is in use (by the connector being replaced?): this connector gets a free port"
        );
    }
    // Bind and release: cloudflared binds it a moment later. Something else can take the
    // port in between (an outgoing connection, another bind): cloudflared then says so and
    // exits, and the connector is started again at once on another port
    // (`Run::relaunch_for_port`).
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    l.local_addr()
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

/// Connectors started again at once (within one replacement, or in a row before one
/// connects) after their metrics port was taken in the moment between choosing it and
/// cloudflared binding it.
const METRICS_PORT_RELAUNCHES: u32 = 3;

/// How long the stop path waits for `/ready` before treating cloudflared as unconnected.
const STOP_PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// Re-emits both output streams; classified events go to the supervision loop. A full
/// channel drops events (they are rare: one per registration attempt).
fn forward_logs(child: &mut Child, events: mpsc::Sender<logs::Event>) {
    fn pump<R: tokio::io::AsyncRead + Unpin + Send + 'static>(
        r: R,
        stream: &'static str,
        events: mpsc::Sender<logs::Event>,
    ) {
        tokio::spawn(async move {
            let mut r = BufReader::new(r);
            let mut buf = Vec::new();
            // Never stop reading (a full pipe would block cloudflared): invalid UTF-8 is
            // replaced and an overlong line is cut at MAX_LOG_LINE.
            while let Ok(true) = read_line_capped(&mut r, &mut buf).await {
                if let Some(ev) = logs::emit(&String::from_utf8_lossy(&buf), stream) {
                    let _ = events.try_send(ev);
                }
            }
        });
    }
    if let Some(out) = child.stdout.take() {
        pump(out, "stdout", events.clone());
    }
    if let Some(err) = child.stderr.take() {
        pump(err, "stderr", events);
    }
}

/// Longest cloudflared log line kept; the rest of a longer line is dropped.
const MAX_LOG_LINE: usize = 64 * 1024;

/// Reads up to and including the next newline into `buf` (at most `MAX_LOG_LINE` bytes
/// kept); `false` at end of stream.
async fn read_line_capped<R: AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> std::io::Result<bool> {
    buf.clear();
    loop {
        let chunk = r.fill_buf().await?;
        if chunk.is_empty() {
            return Ok(!buf.is_empty());
        }
        let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        let room = MAX_LOG_LINE.saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..take.min(room)]);
        r.consume(take);
        if done {
            return Ok(true);
        }
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
        // Only content changes: the supervisor's own reads of the token must not look like
        // a new token (a failed replacement would be retried in a loop).
        if let Ok(ev) = res
            && crate::supervisor::watch::is_content_change(&ev.kind)
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
