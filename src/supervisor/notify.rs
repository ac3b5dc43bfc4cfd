//! systemd notification (`sd_notify(3)`) for a `Type=notify` unit: `READY=1` once the
//! appliance can serve, `STATUS=` kept current, `WATCHDOG=1` keep-alives, `RELOADING=1` with
//! `MONOTONIC_USEC=` around reloads, `STOPPING=1` at shutdown.
//!
//! Without `NOTIFY_SOCKET` (not under systemd) every call is a no-op. The environment is only
//! read, never modified: `std::env::remove_var` is unsound once threads run, and the child
//! processes get an explicit environment anyway (see `cloudflared::spawn`).

use std::time::Duration;

use sd_notify::NotifyState;
use tracing::debug;

/// Sends notifications to the service manager. Cheap to copy; holds no socket (each message
/// is one datagram to `NOTIFY_SOCKET`, as systemd expects).
#[derive(Debug, Clone, Copy, Default)]
pub struct Notifier;

impl Notifier {
    pub fn new() -> Notifier {
        Notifier
    }

    /// `READY=1` with the current status line in the same datagram.
    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// `STATUS=...`: one human line shown by `systemctl status`.
    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }

    /// `STOPPING=1`: shutdown has begun.
    pub fn stopping(&self, status: &str) {
        self.send(&[NotifyState::Stopping, NotifyState::Status(status)]);
    }

    /// `EXTEND_TIMEOUT_USEC=`: the stop (or start) takes up to `d` more. systemd only uses
    /// it when the unit's own timeout would end sooner, so it is safe to send always.
    pub fn extend_timeout(&self, d: Duration) {
        let usec = u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
        self.send(&[NotifyState::ExtendTimeoutUsec(usec)]);
    }

    /// `WATCHDOG=1`: the keep-alive; send only when the main loops show progress.
    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    /// `RELOADING=1` + `MONOTONIC_USEC=`: a reload started (systemd >= 253 needs both for
    /// `Type=notify-reload`). Follow it with [`Notifier::reloaded`] whether or not the
    /// reload succeeded: the old configuration keeps serving after a failed reload.
    pub fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(e) => {
                debug!(error = %e, "clock_gettime failed; sending RELOADING=1 alone");
                self.send(&[NotifyState::Reloading]);
            }
        }
    }

    /// `READY=1` after a reload, with the new status line.
    pub fn reloaded(&self, status: &str) {
        self.ready(status);
    }

    fn send(&self, states: &[NotifyState]) {
        if let Err(e) = sd_notify::notify(states) {
            // A vanished socket must not take the appliance down; systemd will notice the
            // missing keep-alives if it matters.
            debug!(error = %e, "sd_notify failed");
        }
    }
}

/// The watchdog interval systemd asked for (`WATCHDOG_USEC`, honouring `WATCHDOG_PID`),
/// read once at start. Keep-alives go out at half of it.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .filter(|d| !d.is_zero())
        .map(|d| d / 2)
}
