//! `[provision]` in `run`: provisioning at start, then one task that alone owns the state
//! directory's certificates and token while the appliance runs.
//!
//! Ownership: with `[provision]` the proxy's `[tls]` pair, the CA and the cloudflared token
//! are files of the state directory (see `config::provisioned_domain` and the defaults in
//! `Config::parse`). The [`Reloader`] neither watches, reloads nor renews that pair; every
//! change to what the proxy presents goes through [`run_loop`] -> `provision::rotate_ca` /
//! [`renew_server`] -> [`Reloader::install_owned`], so the swap happens exactly when the
//! rotation wants it (after the new CA is registered), never when a file watcher notices a
//! write. The token is written to `<state_dir>/tunnel-token`, the file cloudflared reads
//! (`cloudflared.token_file` defaults to it), and cloudflared's own watcher restarts it.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use time::OffsetDateTime;
use tracing::{error, info, warn};

use super::reload::Reloader;
use crate::config::Config;
use crate::incident::rotate;
use crate::lifecycle::Shutdown;
use crate::provision::{
    self, ErrorClass, Overrides, PendingRotation, ProvisionError, RetryPolicy, Settings,
};
use crate::telemetry::metrics::AppState;

/// API retries inside one attempt: short, because the loop retries the whole step later.
const RUN_RETRY: RetryPolicy = RetryPolicy {
    attempts: 3,
    base_delay: Duration::from_millis(500),
    max_delay: Duration::from_secs(4),
};
/// First wait after a transient failure; doubles per failure up to [`RETRY_MAX`].
const RETRY_BASE: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(300);

/// Settings for `run`: the process environment over `[provision]` (as `setup init`).
pub fn settings(config: &Config) -> Result<Option<Settings>, ProvisionError> {
    let Some(section) = &config.provision else {
        return Ok(None);
    };
    let env = |k: &str| std::env::var(k).ok();
    let mut s = Settings::resolve(&Overrides::default(), &env, Some(section))?;
    s.retry = RUN_RETRY;
    Ok(Some(s))
}

/// Delay before the next attempt after `failures` consecutive transient failures (pure):
/// 1 s doubling, capped at 5 min and at `interval` (the regular check period).
pub fn retry_delay(failures: u32, interval: Duration) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    RETRY_BASE
        .saturating_mul(factor)
        .min(RETRY_MAX)
        .min(interval)
}

/// Provisions an empty state directory before the proxy loads its certificate. Transient
/// API failures are retried with backoff (logged, and shown in STATUS through `status`)
/// until they clear; configuration and permanent errors are returned (exit 78). Returns the
/// config with `tunnel_domain` filled in from the state directory.
pub async fn at_start(mut config: Config, status: &dyn Fn(&str)) -> Result<Config, ProvisionError> {
    let Some(settings) = settings(&config)? else {
        return Ok(config);
    };
    let dir = provision::StateDir::open(&settings.output);
    if dir.is_unprovisioned() {
        let mut failures = 0;
        loop {
            info!(state_dir = %settings.output.display(), "state directory holds no tunnel: provisioning through the Tunnels API");
            match provision::ensure(&settings).await {
                Ok(o) => {
                    info!(tunnel_id = %o.tunnel_id, domain = %o.domain, created_tunnel = o.created_tunnel, "provisioned at start");
                    break;
                }
                Err(e) if e.class() == ErrorClass::Transient => {
                    failures += 1;
                    let wait = retry_delay(failures, RETRY_MAX);
                    warn!(error = %e, retry_in = ?wait, "provisioning at start failed; retrying");
                    status(&format!(
                        "provisioning: waiting for the Tunnels API (attempt {failures} failed, retry in {}s)",
                        wait.as_secs()
                    ));
                    tokio::time::sleep(wait).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
    if config.tunnel_domain.is_none() {
        config.tunnel_domain = dir.read(provision::state::TUNNEL_DOMAIN);
    }
    Ok(config)
}

/// What the state directory says, for [`due`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub ca_not_after: Option<OffsetDateTime>,
    pub server_not_after: Option<OffsetDateTime>,
    pub token_changed_at: Option<SystemTime>,
    pub pending: PendingRotation,
}

/// When things are due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    pub ca_renew_before: Duration,
    pub server_renew_before: Duration,
    pub rotate_token_every: Option<Duration>,
}

/// What one check must do, in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Due {
    /// Finish an interrupted rotation's last step.
    pub archive: bool,
    /// Rotate (or resume rotating) the CA; it issues a new server certificate too.
    pub ca: bool,
    /// Renew the server certificate from the current CA.
    pub server: bool,
    pub token: bool,
}

/// The pure decision of one check.
pub fn due(o: &Observed, now: SystemTime, s: &Schedule) -> Due {
    let now_odt = OffsetDateTime::from(now);
    let ca = o.pending == PendingRotation::Rotate
        || o.ca_not_after
            .is_some_and(|na| provision::ca_rotation_due(na, now_odt, s.ca_renew_before));
    Due {
        archive: o.pending == PendingRotation::Archive,
        ca,
        server: !ca
            && o.server_not_after
                .is_none_or(|na| na - now_odt <= s.server_renew_before),
        token: s.rotate_token_every.is_some_and(|every| {
            o.token_changed_at
                .is_some_and(|t| provision::token_rotation_due(t, now, every))
        }),
    }
}

/// Reads what [`due`] needs from the state directory.
pub fn observe(output: &Path) -> Observed {
    let dir = provision::StateDir::open(output);
    Observed {
        ca_not_after: provision::stored_ca_not_after(output),
        server_not_after: dir
            .read(provision::state::TLS_CRT)
            .and_then(|p| crate::certs::issue::not_after_pem(&p)),
        token_changed_at: provision::token_changed_at(output),
        pending: provision::pending_rotation(output),
    }
}

/// The provisioning task's inputs.
pub struct Task {
    pub settings: Settings,
    pub schedule: Schedule,
    pub settle: Duration,
    pub interval: Duration,
    pub reloader: Arc<Reloader>,
    pub state: Arc<AppState>,
}

impl Task {
    pub fn new(
        config: &Config,
        settings: Settings,
        reloader: Arc<Reloader>,
        state: Arc<AppState>,
    ) -> Option<Task> {
        let p = config.provision.as_ref()?;
        Some(Task {
            schedule: Schedule {
                ca_renew_before: p.ca_renew_before,
                server_renew_before: config.certs.renew_before,
                rotate_token_every: p.rotate_token_every,
            },
            settle: p.ca_rotation_settle,
            interval: config.certs.check_interval,
            settings,
            reloader,
            state,
        })
    }

    fn installed(&self) {
        self.state
            .cert_not_after
            .store(self.reloader.facts().not_after, Ordering::Relaxed);
    }

    /// One check: does what is due, in order. Errors name the step.
    pub async fn check(&self, now: SystemTime) -> Result<Due, (&'static str, ProvisionError)> {
        let d = due(&observe(&self.settings.output), now, &self.schedule);
        if d.archive {
            provision::archive_previous_ca(&self.settings)
                .await
                .map_err(|e| ("archiving the previous CA", e))?;
        }
        if d.ca {
            info!(
                settle = ?self.settle,
                "CA rotation due: registering a new CA beside the current one"
            );
            let r = provision::rotate_ca(&self.settings, self.reloader.as_ref(), self.settle)
                .await
                .map_err(|e| ("CA rotation", e))?;
            self.installed();
            info!(registered = ?r.registered, archived = ?r.archived, "CA rotation complete");
        } else if d.server
            && renew_server(
                &self.settings,
                &self.reloader,
                self.schedule.server_renew_before,
            )
            .map_err(|e| ("server certificate renewal", e))?
        {
            self.installed();
        }
        if d.token {
            let id = provision::rotate_token(&self.settings, "scheduled rotation")
                .await
                .map_err(|e| ("token rotation", e))?;
            info!(token_id = %id, "tunnel token rotated on schedule; cloudflared restarts with it");
        }
        Ok(d)
    }
}

impl Task {
    /// Carries out a `setup rotate --now` request left in the state directory, if there is
    /// one (a plain SIGHUP finds none), and reports it in `/status` for the waiting command.
    /// Runs between checks, so the task stays the only writer of the state directory.
    pub async fn rotate_requested(&self) {
        let output = &self.settings.output;
        let req = match rotate::read_request(output) {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                warn!(error = %e, "rotation request ignored and removed");
                rotate::remove_request(output);
                return;
            }
        };
        info!(id = %req.id, what = %req.what.describe(), by_uid = req.by_uid, "rotating now (mcp-tunnel setup rotate --now)");
        let (done, result) = rotate::perform(
            &self.settings,
            req.what,
            &req.reason,
            self.reloader.as_ref(),
            self.settle,
        )
        .await;
        if req.what.ca || req.what.cert {
            self.installed();
        }
        let outcome = rotate::Outcome {
            id: req.id.clone(),
            at: OffsetDateTime::now_utc().unix_timestamp(),
            done,
            error: result.as_ref().err().map(|e| e.to_string()),
            error_class: result
                .as_ref()
                .err()
                .map(|e| rotate::class_name(e.class()).into()),
        };
        match &result {
            Ok(()) => {
                info!(id = %req.id, done = ?outcome.done, "rotation done");
                *self
                    .state
                    .incident_actions
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry("rotate")
                    .or_default() += 1;
            }
            Err(e) => error!(id = %req.id, done = ?outcome.done, error = %e, "rotation failed"),
        }
        rotate::remove_request(output);
        *self
            .state
            .last_rotation
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(outcome);
    }
}

/// Renews the state directory's server certificate from its CA when due and installs it.
pub fn renew_server(
    settings: &Settings,
    reloader: &Reloader,
    renew_before: Duration,
) -> Result<bool, ProvisionError> {
    if !provision::renew_cert(&settings.output, settings.cert_duration, renew_before)? {
        return Ok(false);
    }
    reloader.install_owned(provision::load_server(&settings.output)?);
    Ok(true)
}

/// Runs [`Task::check`] at start and every `interval` until shutdown. A failed check never
/// ends the task: transient errors are retried with backoff, others at the next interval;
/// both are logged, counted and shown in STATUS until a check succeeds. Stopping mid-way is
/// safe: `rotate_ca` resumes from its `ca-next.*` / `ca-previous.crt` files.
pub async fn run_loop(
    task: Task,
    mut requests: tokio::sync::mpsc::UnboundedReceiver<()>,
    shutdown: Shutdown,
) {
    task.state.rotation_enabled.store(true, Ordering::Relaxed);
    // A request from before this start has no one waiting for it any more: running it
    // later, unannounced, would surprise whoever gave up on it.
    if let Ok(Some(r)) = rotate::read_request(&task.settings.output) {
        warn!(id = %r.id, since = r.since, "a `setup rotate --now` request from before this start was discarded; rerun the command");
        rotate::remove_request(&task.settings.output);
    }
    let mut failures = 0u32;
    let mut next = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.started() => return,
            _ = tokio::time::sleep_until(next) => {}
            Some(()) = requests.recv() => {
                tokio::select! {
                    _ = shutdown.started() => return,
                    _ = task.rotate_requested() => {}
                }
                continue;
            }
        }
        let result = tokio::select! {
            _ = shutdown.started() => return,
            r = task.check(SystemTime::now()) => r,
        };
        let wait = match result {
            Ok(_) => {
                failures = 0;
                if let Ok(mut p) = task.state.provisioning.lock() {
                    *p = None;
                }
                task.interval
            }
            Err((step, e)) => {
                failures += 1;
                task.state
                    .provision_failures
                    .fetch_add(1, Ordering::Relaxed);
                let class = e.class();
                let wait = if class == ErrorClass::Transient {
                    retry_delay(failures, task.interval)
                } else {
                    task.interval
                };
                if class == ErrorClass::Transient {
                    warn!(step, error = %e, retry_in = ?wait, "provisioning step failed; retrying");
                } else {
                    error!(step, error = %e, retry_in = ?wait, "provisioning step failed; fix the cause, it is retried");
                }
                if let Ok(mut p) = task.state.provisioning.lock() {
                    *p = Some(format!(
                        "{step} failed ({class:?}), retry in {}s",
                        wait.as_secs()
                    ));
                }
                wait
            }
        };
        next = tokio::time::Instant::now() + wait;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays() {
        let hour = Duration::from_secs(3600);
        let table = [(1, 1), (2, 2), (3, 4), (9, 256), (10, 300), (40, 300)];
        for (failures, secs) in table {
            assert_eq!(
                retry_delay(failures, hour),
                Duration::from_secs(secs),
                "{failures}"
            );
        }
        assert_eq!(
            retry_delay(5, Duration::from_millis(200)),
            Duration::from_millis(200)
        );
    }

    #[test]
    fn what_is_due() {
        let day = Duration::from_secs(86400);
        let now = SystemTime::UNIX_EPOCH + 20_000 * day;
        let at = |d: i64| Some(OffsetDateTime::from(now) + time::Duration::days(d));
        let s = Schedule {
            ca_renew_before: 180 * day,
            server_renew_before: 30 * day,
            rotate_token_every: Some(30 * day),
        };
        let fresh = Observed {
            ca_not_after: at(1000),
            server_not_after: at(80),
            token_changed_at: Some(now - day),
            pending: PendingRotation::None,
        };
        let none = Due::default();
        let cases: Vec<(&str, Observed, Due)> = vec![
            ("nothing due", fresh.clone(), none),
            (
                "CA near expiry: rotate (which issues the server cert)",
                Observed {
                    ca_not_after: at(100),
                    server_not_after: at(10),
                    ..fresh.clone()
                },
                Due { ca: true, ..none },
            ),
            (
                "interrupted rotation resumes",
                Observed {
                    pending: PendingRotation::Rotate,
                    ..fresh.clone()
                },
                Due { ca: true, ..none },
            ),
            (
                "interrupted archive finishes",
                Observed {
                    pending: PendingRotation::Archive,
                    ..fresh.clone()
                },
                Due {
                    archive: true,
                    ..none
                },
            ),
            (
                "server cert near expiry",
                Observed {
                    server_not_after: at(30),
                    ..fresh.clone()
                },
                Due {
                    server: true,
                    ..none
                },
            ),
            (
                "server cert unreadable",
                Observed {
                    server_not_after: None,
                    ..fresh.clone()
                },
                Due {
                    server: true,
                    ..none
                },
            ),
            (
                "token old",
                Observed {
                    token_changed_at: Some(now - 31 * day),
                    ..fresh.clone()
                },
                Due {
                    token: true,
                    ..none
                },
            ),
        ];
        for (name, o, want) in cases {
            assert_eq!(due(&o, now, &s), want, "{name}");
        }
        let no_schedule = Schedule {
            rotate_token_every: None,
            ..s
        };
        let old_token = Observed {
            token_changed_at: Some(now - 365 * day),
            ..fresh
        };
        assert_eq!(due(&old_token, now, &no_schedule), none);
    }
}
