//! `mcp-tunnel run`: starts the parts in order and owns signals, sd-notify and shutdown.
//!
//! Start: with `[provision]`, provisioning of an empty state directory
//! ([`provisioning::at_start`]) -> proxy (config, certificate) -> listener -> admin endpoint -> cloudflared ->
//! `READY=1` (from the readiness registry `/readyz` answers from; after cloudflared's first
//! edge connection when `ready_requires_tunnel`).
//! Run: with `[provision]`, [`provisioning::run_loop`] owns certificate and token rotation;
//! STATUS kept current, WATCHDOG=1 while the accept loop and this loop progress,
//! SIGHUP goes to [`reload`] (the hook for hot reload), a permanent cloudflared failure ends
//! the run with exit 78. Stop (first SIGTERM/SIGINT): STOPPING=1, SIGTERM to cloudflared and
//! wait its grace period while the proxy still serves, then drain the proxy up to
//! `shutdown_timeout`, then close what is left. A second signal cuts both waits short.

pub mod notify;
pub mod provisioning;
pub mod reload;
pub mod watch;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::cloudflared::{self, Outcome, spawn::Launcher};
use crate::config::Config;
use crate::lifecycle::Shutdown;
use crate::proxy::Proxy;
use crate::telemetry::{admin, metrics};
use metrics::AppState;
use notify::Notifier;

/// Exit status for configuration errors (sysexits EX_CONFIG); the unit's
/// `RestartPreventExitStatus=78` stops systemd from looping on them.
pub const EXIT_CONFIG: u8 = 78;

/// Exit status of a severed service whose marker was lifted (sysexits EX_TEMPFAIL): not 0 and
/// not 78, so that `Restart=on-failure` starts the service afresh.
pub const EXIT_LIFTED: u8 = 75;

/// How often the supervision loop wakes up (STATUS refresh, watchdog evidence).
const TICK: Duration = Duration::from_millis(500);

/// Errors that end `run` with a non-zero exit.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Proxy(#[from] crate::proxy::ProxyError),
    #[error(
        "admin.listen_addr: cannot listen on {addr}: {source} (set [admin] listen_addr to a free port, or enabled = false)"
    )]
    Admin {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Cert(#[from] reload::CertRefused),
    #[error(transparent)]
    CloudflaredStart(#[from] cloudflared::StartError),
    #[error("cloudflared cannot run: {0}")]
    CloudflaredPermanent(String),
    #[error("provisioning: {0}")]
    Provision(#[from] crate::provision::ProvisionError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("refusing to start: {0}")]
    Severed(String),
    #[error("the sever marker was lifted: exiting so that the service starts afresh")]
    Lifted,
}

impl RunError {
    /// 78 for anything an operator must fix in config, token or installation; 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::Proxy(crate::proxy::ProxyError::Cert(_))
            | RunError::Proxy(crate::proxy::ProxyError::PeerCheck(_))
            | RunError::Cert(_)
            | RunError::CloudflaredStart(_)
            | RunError::CloudflaredPermanent(_) => EXIT_CONFIG,
            // Transient API failures are retried inside `run`; what comes out needs a person.
            RunError::Provision(_) => EXIT_CONFIG,
            RunError::Severed(_) => EXIT_CONFIG,
            RunError::Lifted => EXIT_LIFTED,
            _ => 1,
        }
    }
}

/// The signals `run` handles, registered once before READY=1.
struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
    usr1: Signal,
    usr2: Signal,
}

enum Sig {
    Stop(&'static str),
    Reload,
    /// SIGUSR2 (`mcp-tunnel restart-connector`): replace cloudflared without a gap.
    RestartConnector,
    /// SIGUSR1 (`mcp-tunnel sever`): read the sever marker and act on it.
    Sever,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            usr1: signal(SignalKind::user_defined1())?,
            usr2: signal(SignalKind::user_defined2())?,
        })
    }

    async fn next(&mut self) -> Sig {
        tokio::select! {
            _ = self.term.recv() => Sig::Stop("SIGTERM"),
            _ = self.int.recv() => Sig::Stop("SIGINT"),
            _ = self.hup.recv() => Sig::Reload,
            _ = self.usr2.recv() => Sig::RestartConnector,
            _ = self.usr1.recv() => Sig::Sever,
        }
    }
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Runs the appliance until SIGTERM/SIGINT (exit 0) or a permanent cloudflared failure.
pub async fn run(config: Config) -> Result<(), RunError> {
    let notifier = Notifier::new();
    // Read once: the environment is never modified while threads run.
    let watchdog = notify::watchdog_interval();
    let mut signals = Signals::new().map_err(RunError::Signals)?;
    // A severed host stays down across restarts and reboots until the marker is lifted.
    let marker = crate::incident::sever::marker_path(
        Some(&config),
        std::env::var_os("STATE_DIRECTORY").as_deref(),
    );
    if let Some(m) = crate::incident::sever::read(&marker).map_err(RunError::Severed)? {
        return Err(RunError::Severed(crate::incident::sever::describe(
            &m, &marker,
        )));
    }

    // `[provision]` with an empty state directory: provision before the certificate loads.
    let config = if config.provision.is_some() {
        let status = |s: &str| notifier.status(s);
        let start = provisioning::at_start(config, &status);
        tokio::pin!(start);
        loop {
            tokio::select! {
                c = &mut start => break c?,
                sig = signals.next() => match sig {
                    Sig::Stop(name) => {
                        info!(signal = name, "stopping before provisioning completed");
                        return Ok(());
                    }
                    Sig::Reload | Sig::RestartConnector | Sig::Sever => info!("signal while provisioning at start: nothing to reload or replace yet"),
                },
            }
        }
    } else {
        config
    };

    let (pair, facts) = reload::load_checked(&config, reload::unix_now())?;
    let proxy = Proxy::with_pair(
        &config,
        pair,
        Arc::new(crate::proxy::upstream::SystemResolver),
    )?;
    let state = AppState::new(proxy.metrics().clone(), config.cloudflared.enabled);
    state.routes.store(config.routes.len(), Ordering::Relaxed);
    state
        .cert_not_after
        .store(facts.not_after, Ordering::Relaxed);
    state.config_generation.store(1, Ordering::Relaxed);
    let _ = state.peer_check.set(peer_check_status(&config, &proxy));
    state
        .max_sessions
        .store(config.limits.max_sessions, Ordering::Relaxed);
    *state.route_list.lock().unwrap_or_else(|e| e.into_inner()) = proxy.routes();
    let listener = Proxy::bind(&config).await?;
    let addr = listener.local_addr().map_err(RunError::Signals)?;
    state.listener_bound.store(true, Ordering::Relaxed);
    let _ = state.listen_addr.set(addr);
    state.watchdog_usec.store(
        watchdog.map_or(0, |half| (half * 2).as_micros() as u64),
        Ordering::Relaxed,
    );
    info!(listen = %addr, routes = config.routes.len(), "proxy listening");

    let admin_stop = CancellationToken::new();
    if config.admin.enabled {
        let l = admin::bind(config.admin.listen_addr)
            .await
            .map_err(|source| RunError::Admin {
                addr: config.admin.listen_addr,
                source,
            })?;
        info!(listen = %l.local_addr().map_err(RunError::Signals)?, "admin endpoint listening (/healthz, /readyz, /metrics)");
        tokio::spawn(admin::serve(l, state.clone(), admin_stop.clone()));
    }

    let shutdown = Shutdown::new();
    tokio::spawn(proxy.clone().serve(listener, shutdown.clone()));
    let reloader = Arc::new(reload::Reloader::new(config.clone(), proxy.clone(), facts));
    let reload_loop_reloader = reloader.clone();
    // SIGHUP also tells the provisioning task to look for a `setup rotate --now` request.
    let mut rotate_tx = None;
    if let Some(settings) = provisioning::settings(&config)?
        && let Some(task) =
            provisioning::Task::new(&config, settings, reloader.clone(), state.clone())
    {
        info!("provisioning task started: CA rotation, server certificate renewal, token rotation");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        rotate_tx = Some(tx);
        tokio::spawn(provisioning::run_loop(task, rx, shutdown.clone()));
    }
    let hooks = Arc::new(SupervisorHooks {
        notifier,
        state: state.clone(),
        proxy: proxy.clone(),
    });
    let (reload_tx, reload_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(reload::run_loop(
        reload_loop_reloader,
        hooks,
        reload_rx,
        shutdown.clone(),
    ));

    let mut cf = if config.cloudflared.enabled {
        let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(std::path::PathBuf::from);
        let token_path = cloudflared::token::token_path(
            config.cloudflared.token_file.as_deref(),
            credentials.as_deref(),
        );
        crate::certs::perms::check_secret(
            "cloudflared.token_file",
            &token_path,
            config.allow_readable_secrets,
        )
        .map_err(reload::CertRefused::from)?;
        let sup = cloudflared::start(
            config.cloudflared.clone(),
            config.log_level.as_str(),
            addr,
            Launcher::current(),
        )?;
        let _ = state.cloudflared.set(sup.status.clone());
        reloader.supervise_cloudflared(sup.replacer());
        Some(sup)
    } else {
        info!("cloudflared supervision disabled ([cloudflared] enabled = false)");
        None
    };

    let stop_reason: Result<&'static str, String>;
    let mut severed: Option<String> = None;
    // READY=1 comes from the readiness registry that /readyz answers from, the first time it
    // holds (without waiting for the tunnel unless `ready_requires_tunnel`).
    let wait_for_tunnel = config.cloudflared.ready_requires_tunnel && cf.is_some();
    let started = |state: &AppState| metrics::Readiness::of(state, now()).started(wait_for_tunnel);
    let mut ready_sent = false;
    if started(&state) {
        notifier.ready(&metrics::status_line(&state, now()));
        ready_sent = true;
    }
    let mut health = cf.as_ref().map(|c| c.status.subscribe());
    let mut tick = tokio::time::interval(TICK);
    let mut dog = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    let mut last_status = String::new();
    let mut accept_beats = 0;
    let mut worker_beats: Vec<u64> = Vec::new();
    loop {
        tokio::select! {
            sig = signals.next() => match sig {
                Sig::Stop(name) => { stop_reason = Ok(name); break; }
                Sig::Reload => {
                    info!("SIGHUP: reloading configuration and certificates");
                    let _ = reload_tx.send(());
                    if let Some(tx) = &rotate_tx {
                        let _ = tx.send(());
                    }
                }
                Sig::RestartConnector => match &cf {
                    Some(sup) => {
                        info!("SIGUSR2: replacing cloudflared (the new one starts beside the running one)");
                        let _ = sup.replacer().send(cloudflared::Replace { cfg: None, why: "operator request (SIGUSR2)" });
                    }
                    None => warn!("SIGUSR2: cloudflared is not supervised here ([cloudflared] enabled = false); nothing to replace"),
                },
                Sig::Sever => match crate::incident::sever::read(&marker) {
                    Ok(Some(m)) => {
                        severed = Some(crate::incident::sever::describe(&m, &marker));
                        stop_reason = Ok("SIGUSR1");
                        break;
                    }
                    Ok(None) => warn!(marker = %marker.display(), "SIGUSR1 without a sever marker: nothing to do (`mcp-tunnel sever` writes the marker, then signals)"),
                    Err(e) => warn!(error = %e, "SIGUSR1: cannot read the sever marker; nothing done"),
                },
            },
            outcome = async { cf.as_mut().expect("guarded").finished().await }, if cf.is_some() => {
                // Only a permanent failure ends supervision by itself.
                let why = match outcome { Outcome::Permanent(why) => why, Outcome::Stopped => "cloudflared supervision ended".into() };
                notifier.status(&format!("cloudflared cannot run: {why}"));
                stop_reason = Err(why);
                cf = None;
                break;
            }
            Ok(()) = async { health.as_mut().expect("guarded").changed().await }, if health.is_some() => {
                if !ready_sent && started(&state) {
                    notifier.ready(&metrics::status_line(&state, now()));
                    ready_sent = true;
                }
            }
            _ = tick.tick() => {
                let line = metrics::status_line(&state, now());
                if !ready_sent && started(&state) {
                    notifier.ready(&line);
                    ready_sent = true;
                    last_status = line;
                } else if ready_sent && line != last_status {
                    notifier.status(&line);
                    last_status = line;
                }
            }
            _ = dog.tick(), if watchdog.is_some() => {
                // This loop is evidently running; the accept loop and every data-plane
                // worker must have ticked too (a stalled worker stalls its sessions).
                let beats = state.proxy.accept_loop_beats.load(Ordering::Relaxed);
                let workers = proxy.workers().map(|w| w.beats()).unwrap_or_default();
                let stalled: Vec<usize> = workers
                    .iter()
                    .zip(worker_beats.iter().chain(std::iter::repeat(&u64::MAX)))
                    .enumerate()
                    .filter(|(_, (now, before))| now == before)
                    .map(|(i, _)| i + 1)
                    .collect();
                if beats == accept_beats {
                    warn!("accept loop shows no progress: withholding the watchdog keep-alive");
                } else if !stalled.is_empty() {
                    warn!(workers = ?stalled, "data-plane worker shows no progress: withholding the watchdog keep-alive");
                } else {
                    notifier.watchdog();
                }
                accept_beats = beats;
                worker_beats = workers;
            }
        }
    }

    if let Some(why) = severed {
        return sever(
            why, &marker, cf, &shutdown, &state, notifier, signals, admin_stop,
        )
        .await;
    }
    // Ordered stop, by the running config: `shutdown_timeout` and `[cloudflared]
    // grace_period` apply as last reloaded.
    let config = reloader.config().await;
    state.stopping.store(true, Ordering::Relaxed);
    notifier.stopping(&metrics::status_line(&state, now()));
    if let Ok(signal) = stop_reason {
        info!(
            signal,
            "shutting down: stopping cloudflared first, the proxy keeps serving in-flight requests"
        );
    }
    let forced = CancellationToken::new();
    {
        let forced = forced.clone();
        tokio::spawn(async move {
            loop {
                if let Sig::Stop(name) = signals.next().await {
                    warn!(signal = name, "second signal: stopping now");
                    forced.cancel();
                    return;
                }
            }
        });
    }
    // Tell systemd how long the stop may still take (cloudflared's grace period, then the
    // drain), in case that is longer than the unit's TimeoutStopSec allows.
    let budget = config.shutdown_timeout
        + if cf.is_some() {
            config.cloudflared.grace_period + cloudflared::policy::STOP_MARGIN
        } else {
            Duration::ZERO
        };
    let extender = tokio::spawn(extend_stop_timeout(notifier, budget));
    if let Some(sup) = cf {
        sup.begin_stop();
        let force = sup.force_token();
        let stopped = sup.stopped();
        tokio::pin!(stopped);
        tokio::select! {
            _ = &mut stopped => {}
            _ = forced.cancelled() => {
                force.cancel();
                stopped.await;
            }
        }
    }
    info!(active = shutdown.active(), timeout = ?config.shutdown_timeout, "draining in-flight requests");
    let left = tokio::select! {
        left = shutdown.drain(config.shutdown_timeout) => left,
        _ = forced.cancelled() => shutdown.active(),
    };
    if left > 0 {
        warn!(sessions = left, "closing the remaining sessions");
    } else {
        info!("drained cleanly");
    }
    extender.abort();
    admin_stop.cancel();
    match stop_reason {
        Ok(_) => Ok(()),
        Err(why) => {
            error!(reason = %why, "exiting with status 78: fix the cause, then restart the service");
            Err(RunError::CloudflaredPermanent(why))
        }
    }
}

/// Stops serving now (`mcp-tunnel sever`): cloudflared killed without its grace period, every
/// session closed, the listener closed; then stays up severed, the admin endpoint showing
/// why, until SIGTERM (exit 0) or until the marker is lifted (exit 75, so that systemd starts
/// the service afresh and every start check runs again).
#[allow(clippy::too_many_arguments)]
async fn sever(
    why: String,
    marker: &std::path::Path,
    cf: Option<cloudflared::Supervision>,
    shutdown: &Shutdown,
    state: &Arc<AppState>,
    notifier: Notifier,
    mut signals: Signals,
    admin_stop: CancellationToken,
) -> Result<(), RunError> {
    error!(reason = %why, "SEVERING: killing cloudflared and closing every session now");
    if let Some(sup) = cf {
        sup.force_token().cancel();
        sup.begin_stop();
        sup.stopped().await;
    }
    let closed = shutdown.close_now().await;
    // Shown only once it is done: `mcp-tunnel sever` waits for this to confirm.
    *state.severed.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.clone());
    *state
        .incident_actions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry("sever")
        .or_default() += 1;
    error!(connections_closed = closed, reason = %why, "severed: no tunnel on this host until the marker is lifted");
    notifier.status(&metrics::status_line(state, now()));
    let mut tick = tokio::time::interval(TICK);
    let result = loop {
        tokio::select! {
            sig = signals.next() => match sig {
                Sig::Stop(name) => {
                    info!(signal = name, "stopping a severed service");
                    break Ok(());
                }
                Sig::Sever => match crate::incident::sever::read(marker) {
                    Ok(None) => {
                        warn!(marker = %marker.display(), "sever marker lifted: exiting with status 75 so that the service starts afresh");
                        break Err(RunError::Lifted);
                    }
                    _ => info!("SIGUSR1: still severed (the marker is in place)"),
                },
                Sig::Reload | Sig::RestartConnector => warn!("severed: nothing to reload or replace until `mcp-tunnel sever --lift`"),
            },
            // The process is healthy, only severed: systemd's watchdog must not restart it.
            _ = tick.tick() => notifier.watchdog(),
        }
    };
    admin_stop.cancel();
    result
}

/// Sends `EXTEND_TIMEOUT_USEC` every few seconds while stopping: the time left of `budget`
/// plus a margin, so systemd never kills a drain that is still within its configured limits.
async fn extend_stop_timeout(notifier: Notifier, budget: Duration) {
    const EVERY: Duration = Duration::from_secs(5);
    const MARGIN: Duration = Duration::from_secs(10);
    let deadline = tokio::time::Instant::now() + budget;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        notifier.extend_timeout(left + MARGIN);
        if left.is_zero() {
            return;
        }
        tokio::time::sleep(left.min(EVERY)).await;
    }
}

/// Who may connect to the listener, logged once at start and shown by `/readyz`.
fn peer_check_status(config: &Config, proxy: &Proxy) -> metrics::PeerCheckStatus {
    use crate::config::{PeerCheck, PeerCheckOff};
    if let Some(gate) = proxy.peer_gate() {
        info!(allowed = %gate.who(), "peer check on: listener connections from other users are refused (the owner of each peer socket comes from NETLINK_SOCK_DIAG)");
        return metrics::PeerCheckStatus {
            on: true,
            state: format!("on: {}", gate.who()),
        };
    }
    // No gate means the check is off: `Proxy::with_pair` builds one whenever it is on.
    let why = match config.peer_check {
        PeerCheck::Off(why) => why,
        PeerCheck::On { .. } => PeerCheckOff::Disabled,
    };
    let who = if why == PeerCheckOff::NotLoopback {
        warn!(listen = %config.listen_addr, reason = why.reason(), "peer check off: any process or host that reaches the listener can use every route");
        "any host or local user that reaches it"
    } else {
        info!(
            reason = why.reason(),
            "peer check off: any local process that reaches the listener can use every route"
        );
        "any local user"
    };
    metrics::PeerCheckStatus {
        on: false,
        state: format!("off: {who} may connect ({})", why.reason()),
    }
}

/// Reload notifications for systemd and the admin endpoint: `RELOADING=1` +
/// `MONOTONIC_USEC=` before, `READY=1` with a fresh STATUS after (what `Type=notify-reload`
/// expects), and the generation, failure and certificate gauges.
struct SupervisorHooks {
    notifier: Notifier,
    state: Arc<AppState>,
    proxy: Arc<Proxy>,
}

impl reload::ReloadHooks for SupervisorHooks {
    fn reloading(&self) {
        self.notifier.reloading();
    }

    fn reloaded(&self, result: &Result<reload::Reloaded, reload::ReloadError>) {
        if let Ok(r) = result {
            *self
                .state
                .restart_required
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = r.restart_required.clone();
        }
        let last_error = match result {
            Ok(r) => r
                .cert_refused
                .as_ref()
                .map(|why| format!("certificate change refused: {why}")),
            Err(e) => {
                self.state.reload_failures.fetch_add(1, Ordering::Relaxed);
                Some(e.to_string())
            }
        };
        *self
            .state
            .last_reload_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = last_error.clone();
        let last_error_for_page = result.as_ref().err().map(|e| e.to_string());
        *self
            .state
            .last_reload
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(metrics::LastReload {
            at: now(),
            error: last_error_for_page,
        });
        self.notifier
            .reloaded(&metrics::status_line(&self.state, now()));
    }

    fn applied(&self, generation: u64, routes: usize, cert_not_after: i64) {
        self.state
            .config_generation
            .store(generation, Ordering::Relaxed);
        self.state.routes.store(routes, Ordering::Relaxed);
        *self
            .state
            .route_list
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = self.proxy.routes();
        self.state
            .cert_not_after
            .store(cert_not_after, Ordering::Relaxed);
    }

    fn renewal_failed(&self) {
        self.state
            .cert_renewal_failures
            .fetch_add(1, Ordering::Relaxed);
    }

    fn cert_expiry_warning(&self, days_left: i64, _not_after: i64) {
        self.notifier.status(&format!(
            "{}; WARNING: server certificate expires in {days_left}d and cannot be renewed here (no certs.ca_key_file)",
            metrics::status_line(&self.state, now())
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_check_that_cannot_work_is_a_configuration_exit() {
        let e = RunError::Proxy(crate::proxy::ProxyError::PeerCheck(
            crate::proxy::peer::PeerCheckUnavailable {
                reason: "Address family not supported by protocol (os error 97)".into(),
            },
        ));
        assert_eq!(e.exit_code(), EXIT_CONFIG);
        let text = e.to_string();
        assert!(
            text.starts_with("peer_check: cannot identify the owner of listener connections through the kernel (NETLINK_SOCK_DIAG): Address family not supported"),
            "{text}"
        );
        assert!(
            text.contains("AF_NETLINK in RestrictAddressFamilies="),
            "{text}"
        );
    }
}
