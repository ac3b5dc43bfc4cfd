//! Live changes: config reload, certificate swap and renewal, all without a restart.
//!
//! Config: parse -> validate -> build -> swap, or refuse and keep the running config.
//! Certificates: a new pair is used only after `certs::preflight` accepts it; otherwise the
//! last good pair keeps serving and the next change is tried again (a certificate written
//! before its key is a half-written pair, refused until the key lands).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::pki_types::CertificateDer;
use rustls::sign::CertifiedKey;
use tokio::sync::{Mutex, mpsc};
use tracing::{debug, error, info, warn};

use super::watch::{self, FileWatcher, WatchSet};
use crate::certs::preflight::{self, CertFacts, Expectations, PreflightError};
use crate::certs::{self, CertError, renew};
use crate::config::{Config, ConfigError, change};
use crate::lifecycle::Shutdown;
use crate::proxy::Proxy;
use crate::proxy::state::ApplyReport;

/// Seconds since the Unix epoch: the clock every time decision here is given.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Why a pair cannot be presented.
#[derive(Debug, thiserror::Error)]
pub enum CertRefused {
    #[error(transparent)]
    Load(#[from] CertError),
    #[error(transparent)]
    Permissions(#[from] certs::perms::TooOpen),
    #[error("{file}: {source}")]
    Preflight {
        file: String,
        source: PreflightError,
    },
}

/// Loads the server pair and runs the preflight against `config` at time `now`.
pub fn load_checked(
    config: &Config,
    now: i64,
) -> Result<(Arc<CertifiedKey>, CertFacts), CertRefused> {
    let allow = config.allow_readable_secrets;
    certs::perms::check_secret("tls.key_file", &config.tls.key_file, allow)?;
    if let Some(ca_key) = &config.certs.ca_key_file {
        certs::perms::check_secret("certs.ca_key_file", ca_key, allow)?;
    }
    let pair = certs::load_server_pair(&config.tls)?;
    let ca: Option<CertificateDer<'static>> = match &config.certs.ca_cert_file {
        Some(path) => Some(certs::load_certs("certs.ca_cert_file", path)?.remove(0)),
        None => None,
    };
    let hosts = config.route_hosts();
    let want = Expectations {
        now,
        tunnel_domain: config.tunnel_domain.as_deref(),
        route_hosts: &hosts,
        ca: ca.as_ref(),
    };
    let facts =
        preflight::check(&pair.cert[0], &want).map_err(|source| CertRefused::Preflight {
            file: config.tls.cert_file.display().to_string(),
            source,
        })?;
    Ok((pair, facts))
}

/// Why a reload was refused (the running config stays).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Proxy(#[from] crate::proxy::ProxyError),
    /// The certificate that would be presented does not cover a route of the new config.
    #[error("{file}: {source}")]
    Certificate {
        file: String,
        source: PreflightError,
    },
    /// The new `cloudflared.token_file` fails the checks start makes.
    #[error("{0}")]
    Token(String),
}

/// The next state a reload would apply, built and checked.
struct Checked {
    next: Config,
    /// The new pair and its facts, when the certificate inputs changed and it passed.
    pair: Option<(Arc<CertifiedKey>, CertFacts)>,
    bytes: (Vec<u8>, Vec<u8>),
    cert_refused: Option<String>,
    restart_required: Vec<&'static str>,
}

/// What one reload did.
#[derive(Debug, Default)]
pub struct Reloaded {
    pub routes: ApplyReport,
    /// Serial of the newly presented certificate, when it changed.
    pub new_cert_serial: Option<String>,
    /// The certificate change that was refused (the old pair keeps serving).
    pub cert_refused: Option<String>,
    /// Fields that changed in the file but apply only at the next start.
    pub restart_required: Vec<&'static str>,
}

/// Notifications around reloads (sd-notify RELOADING/READY, STATUS, metrics).
pub trait ReloadHooks: Send + Sync {
    fn reloading(&self) {}
    fn reloaded(&self, _result: &Result<Reloaded, ReloadError>) {}
    /// After every successful reload: config generation, route count, certificate expiry.
    fn applied(&self, _generation: u64, _routes: usize, _cert_not_after: i64) {}
    fn cert_expiry_warning(&self, _days_left: i64, _not_after: i64) {}
    /// A renewal from the local CA failed (it is retried at the next check).
    fn renewal_failed(&self) {}
}

/// Hooks that do nothing.
pub struct NoHooks;
impl ReloadHooks for NoHooks {}

struct Current {
    config: Config,
    /// Bytes of the presented pair, to tell a real change from a touch.
    pair_bytes: (Vec<u8>, Vec<u8>),
    /// Lowest expiry-warning threshold announced so far.
    warned_days: Option<i64>,
}

/// Owns the running config and applies changes to the proxy.
///
/// Who decides when the server certificate changes: without `[provision]`, this reloader
/// (file changes, SIGHUP, renewal from `[certs]`); with `[provision]`, the provisioning task
/// alone (`supervisor::provisioning`), which installs through [`Reloader::install_owned`]:
/// the reloader then neither watches, reloads nor renews the pair.
pub struct Reloader {
    path: PathBuf,
    proxy: Arc<Proxy>,
    current: Mutex<Current>,
    /// Facts of the presented certificate (a plain lock: never held across an await).
    facts: std::sync::Mutex<CertFacts>,
    provisioned: bool,
    failures: AtomicU64,
    attempts: AtomicU64,
    /// The running cloudflared supervision, which applies a changed `[cloudflared]` by
    /// replacing the connector (unset: cloudflared is not supervised).
    cloudflared: std::sync::OnceLock<mpsc::UnboundedSender<crate::cloudflared::Replace>>,
}

fn read_pair(config: &Config) -> (Vec<u8>, Vec<u8>) {
    (
        std::fs::read(&config.tls.cert_file).unwrap_or_default(),
        std::fs::read(&config.tls.key_file).unwrap_or_default(),
    )
}

impl Reloader {
    /// `facts` are those of the pair the proxy presents now (from `load_checked`).
    pub fn new(config: Config, proxy: Arc<Proxy>, facts: CertFacts) -> Reloader {
        Reloader {
            path: config.path.clone(),
            proxy,
            provisioned: config.provision.is_some(),
            facts: std::sync::Mutex::new(facts),
            current: Mutex::new(Current {
                pair_bytes: read_pair(&config),
                config,
                warned_days: None,
            }),
            failures: AtomicU64::new(0),
            attempts: AtomicU64::new(0),
            cloudflared: std::sync::OnceLock::new(),
        }
    }

    /// From now on a changed `[cloudflared]` section goes to this supervision.
    pub fn supervise_cloudflared(&self, tx: mpsc::UnboundedSender<crate::cloudflared::Replace>) {
        let _ = self.cloudflared.set(tx);
    }

    /// The proxy's generation: 1 at start, +1 per applied change.
    pub fn generation(&self) -> u64 {
        self.proxy.generation().number
    }

    /// Reloads attempted since start (applied, refused, or with nothing to do).
    pub fn attempts(&self) -> u64 {
        self.attempts.load(Ordering::Relaxed)
    }

    /// Reloads refused since start.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Facts of the presented certificate.
    pub async fn cert_facts(&self) -> CertFacts {
        self.facts()
    }

    /// Facts of the presented certificate, without waiting.
    pub fn facts(&self) -> CertFacts {
        self.facts.lock().expect("facts lock").clone()
    }

    /// Whether the provisioning task owns the certificate (see [`Reloader`]).
    pub fn provisioned(&self) -> bool {
        self.provisioned
    }

    /// For the provisioning task: presents `key` to new handshakes now and records its facts
    /// (the caller has already made sure its CA is trusted).
    pub fn install_owned(&self, key: Arc<CertifiedKey>) {
        match preflight::facts(&key.cert[0]) {
            Ok(f) => {
                info!(serial = %f.serial, not_after = f.not_after, "server certificate installed by provisioning; new sessions get it");
                *self.facts.lock().expect("facts lock") = f;
            }
            Err(e) => warn!(error = %e, "installed a certificate whose facts cannot be read"),
        }
        let generation = self.proxy.install_cert(key);
        debug!(generation, "certificate installed as a new generation");
    }

    /// The running config.
    pub async fn config(&self) -> Config {
        self.current.lock().await.config.clone()
    }

    async fn watch_set(&self) -> WatchSet {
        let cur = self.current.lock().await;
        let c = &cur.config;
        let mut files: Vec<&Path> = vec![&self.path];
        if !self.provisioned {
            files.extend([c.tls.cert_file.as_path(), c.tls.key_file.as_path()]);
        }
        if let Some(ca) = &c.certs.ca_cert_file {
            files.push(ca);
        }
        WatchSet::for_files(&files)
    }

    /// Re-reads the config file and the certificate pair and applies what changed. Every
    /// part of the next state is built and checked first (the certificate to present and
    /// that it covers every route, a new token file, the upstream plane); only when all of
    /// it is good is anything applied, so a refused reload leaves everything as it was.
    pub async fn reload(&self, now: i64) -> Result<Reloaded, ReloadError> {
        self.attempts.fetch_add(1, Ordering::Relaxed);
        let mut cur = self.current.lock().await;
        let checked = match self.check_next(&cur, now) {
            Ok(c) => c,
            Err(e) => return Err(self.refused(e)),
        };
        let Checked {
            next,
            pair,
            bytes,
            cert_refused,
            restart_required,
        } = checked;
        let new_cert = pair.as_ref().is_some_and(|(_, facts)| {
            facts.serial != self.facts().serial || bytes != cur.pair_bytes
        });
        let changed = new_cert || next != cur.config;
        // One store: the routes, the upstream plane and the certificate land together.
        let cert = pair.as_ref().map(|(key, _)| key.clone());
        let routes = match self.proxy.apply(&next, cert, changed).await {
            Ok(r) => r,
            Err(e) => return Err(self.refused(e.into())),
        };
        let mut out = Reloaded {
            routes,
            cert_refused,
            restart_required,
            ..Reloaded::default()
        };
        if let Some((_, facts)) = pair {
            if new_cert {
                info!(serial = %facts.serial, not_after = facts.not_after, "server certificate swapped; new sessions get it");
                out.new_cert_serial = Some(facts.serial.clone());
            }
            cur.pair_bytes = bytes;
            *self.facts.lock().expect("facts lock") = facts;
            cur.warned_days = None;
        }
        if next.cloudflared != cur.config.cloudflared
            && let Some(tx) = self.cloudflared.get()
        {
            info!("[cloudflared] changed: replacing the connector");
            let _ = tx.send(crate::cloudflared::Replace {
                cfg: Some(next.cloudflared.clone()),
                why: "[cloudflared] changed",
            });
        }
        if next.log_level != cur.config.log_level {
            // Said before it applies, so that a quieter level still shows the change.
            info!(
                from = cur.config.log_level.as_str(),
                to = next.log_level.as_str(),
                "log level changing"
            );
            match crate::telemetry::set_level(next.log_level.as_str()) {
                Ok(()) => {}
                Err(crate::telemetry::LevelNotApplied::RustLog) => warn!(
                    log_level = next.log_level.as_str(),
                    "log_level changed, but RUST_LOG is set and decides the level: unset it (and restart) for log_level to apply"
                ),
            }
        }
        cur.config = next;
        if changed {
            let g = self.generation();
            info!(generation = g, added = ?out.routes.added, removed = ?out.routes.removed, changed = ?out.routes.changed, "config reloaded");
        }
        Ok(out)
    }

    /// Counts and logs a refused reload.
    fn refused(&self, e: ReloadError) -> ReloadError {
        self.failures.fetch_add(1, Ordering::Relaxed);
        error!(error = %e, "config reload refused; the running config stays");
        e
    }

    /// The next config and certificate, checked, with nothing applied yet.
    fn check_next(&self, cur: &Current, now: i64) -> Result<Checked, ReloadError> {
        let file = Config::load(&self.path)?;
        let restart_required = change::restart_required(&cur.config, &file);
        if !restart_required.is_empty() {
            warn!(
                fields = %restart_required.join(", "),
                "changed in the file, applied only at the next start: restart the service to apply them; the running values stay"
            );
        }
        let next = change::live_part(&cur.config, file);
        let bytes = read_pair(&next);
        let cert_inputs_changed = !self.provisioned
            && (bytes != cur.pair_bytes
                || next.tls != cur.config.tls
                || next.tunnel_domain != cur.config.tunnel_domain
                || next.certs.ca_cert_file != cur.config.certs.ca_cert_file);
        let (mut pair, mut cert_refused) = (None, None);
        if cert_inputs_changed {
            match load_checked(&next, now) {
                Ok(p) => pair = Some(p),
                Err(e) => {
                    warn!(error = %e, "new certificate refused; the last good pair keeps serving");
                    cert_refused = Some(e.to_string());
                }
            }
        }
        // The certificate that will be presented must cover every route of the new config,
        // or clients of a new route would fail the handshake.
        if pair.is_none() {
            let facts = self.facts();
            preflight::check_names(&facts, next.tunnel_domain.as_deref(), &next.route_hosts())
                .map_err(|e| ReloadError::Certificate {
                    file: next.tls.cert_file.display().to_string(),
                    source: e,
                })?;
        }
        // A token file the connector is to read next passes the checks start makes.
        if self.cloudflared.get().is_some() && next.cloudflared.enabled {
            let credentials =
                std::env::var_os("CREDENTIALS_DIRECTORY").map(std::path::PathBuf::from);
            let path = crate::cloudflared::token::token_path(
                next.cloudflared.token_file.as_deref(),
                credentials.as_deref(),
            );
            let running = crate::cloudflared::token::token_path(
                cur.config.cloudflared.token_file.as_deref(),
                credentials.as_deref(),
            );
            if path != running {
                certs::perms::check_secret(
                    "cloudflared.token_file",
                    &path,
                    next.allow_readable_secrets,
                )
                .map_err(|e| ReloadError::Token(e.to_string()))?;
                crate::cloudflared::token::read(&path)
                    .map_err(|e| ReloadError::Token(e.to_string()))?;
            }
        }
        Ok(Checked {
            next,
            pair,
            bytes,
            cert_refused,
            restart_required,
        })
    }

    /// Renews the server certificate from the local CA when it is due at `now`, or warns
    /// about its expiry when there is no CA key. Returns the new serial when it renewed.
    pub async fn renew_if_due(&self, now: i64, hooks: &dyn ReloadHooks) -> Option<String> {
        if self.provisioned {
            return None;
        }
        let (config, facts) = (self.config().await, self.facts());
        let certs_cfg = &config.certs;
        if !renew::due(facts.not_after, now, certs_cfg.renew_before) {
            return None;
        }
        let (Some(ca_cert), Some(ca_key)) = (&certs_cfg.ca_cert_file, &certs_cfg.ca_key_file)
        else {
            let threshold = renew::warning_threshold(facts.not_after, now)?;
            let mut cur = self.current.lock().await;
            if cur.warned_days.is_none_or(|w| threshold < w) {
                cur.warned_days = Some(threshold);
                let days_left = (facts.not_after - now).div_euclid(86400);
                warn!(days_left, serial = %facts.serial, "server certificate expires soon and no certs.ca_key_file is set to renew it");
                hooks.cert_expiry_warning(days_left, facts.not_after);
            }
            return None;
        };
        let Some(domain) = config.tunnel_domain.clone() else {
            warn!("certificate renewal needs tunnel_domain (the SAN of the new certificate)");
            return None;
        };
        let files = renew::RenewFiles {
            ca_cert,
            ca_key,
            cert_file: &config.tls.cert_file,
            key_file: &config.tls.key_file,
        };
        let issued = renew::renew_files(
            &files,
            &domain,
            certs_cfg.cert_duration,
            certs_cfg.key_type,
            now,
        );
        if let Err(e) = issued {
            error!(error = %e, "certificate renewal failed; will retry at the next check");
            hooks.renewal_failed();
            return None;
        }
        let reloaded = self.reload_notified(now, hooks).await.ok()?;
        if reloaded.cert_refused.is_some() {
            // Written, but refused by the preflight: the old pair still serves.
            hooks.renewal_failed();
        }
        reloaded.new_cert_serial
    }

    /// `reload`, bracketed by the hooks: `reloading`, then `applied` (on success) and
    /// `reloaded`, so systemd and the metrics see every reload the same way.
    pub async fn reload_notified(
        &self,
        now: i64,
        hooks: &dyn ReloadHooks,
    ) -> Result<Reloaded, ReloadError> {
        hooks.reloading();
        let result = self.reload(now).await;
        if result.is_ok() {
            let routes = self.current.lock().await.config.routes.len();
            hooks.applied(self.generation(), routes, self.facts().not_after);
        }
        hooks.reloaded(&result);
        result
    }
}

impl crate::provision::InstallCert for Reloader {
    fn install(&self, key: Arc<CertifiedKey>) {
        self.install_owned(key);
    }
}

/// Serves reload triggers until shutdown: `requests` (the supervisor forwards SIGHUP there),
/// file changes, and the renewal timer.
pub async fn run_loop(
    reloader: Arc<Reloader>,
    hooks: Arc<dyn ReloadHooks>,
    mut requests: mpsc::UnboundedReceiver<()>,
    shutdown: Shutdown,
) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut watcher: Option<FileWatcher> = start_watcher(reloader.watch_set().await, tx.clone());
    let mut interval = reloader.config().await.certs.check_interval;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let trigger = tokio::select! {
            _ = shutdown.started() => return,
            Some(()) = requests.recv() => "reload request",
            Some(()) = rx.recv() => "file change",
            _ = ticker.tick() => {
                reloader.renew_if_due(unix_now(), hooks.as_ref()).await;
                continue;
            }
        };
        while rx.try_recv().is_ok() {}
        info!(trigger, "reloading");
        let _ = reloader.reload_notified(unix_now(), hooks.as_ref()).await;
        let every = reloader.config().await.certs.check_interval;
        if every != interval {
            interval = every;
            ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            info!(check_interval = ?every, "certs.check_interval changed");
        }
        let set = reloader.watch_set().await;
        if watcher.as_ref().is_none_or(|w| w.set != set) {
            watcher = start_watcher(set, tx.clone());
            // Events the old watcher had not yet delivered (inside its debounce window) died
            // with it: look once more. A reload with nothing changed is a no-op.
            let _ = tx.send(());
        }
    }
}

fn start_watcher(set: WatchSet, tx: mpsc::UnboundedSender<()>) -> Option<FileWatcher> {
    match watch::watch(set, tx) {
        Ok(w) => Some(w),
        Err(e) => {
            error!(error = %e, "cannot start the file watcher; SIGHUP still reloads");
            None
        }
    }
}
