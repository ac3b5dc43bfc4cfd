//! Pure decisions about the cloudflared child: how healthy it is, given what `/ready`
//! answered, and whether and when to restart it after it stopped. Time and randomness come
//! in as parameters so that the tables below pin the behaviour down.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// cloudflared registers this many edge connections when healthy.
pub const EXPECTED_CONNECTIONS: u32 = 4;

/// One poll of cloudflared's `/ready`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// 200 with `readyConnections`.
    Ready(u32),
    /// 503: no edge connection registered.
    NotReady,
    /// The metrics server did not answer (refused, reset, timed out).
    NoAnswer,
}

/// What the supervisor reports about cloudflared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Disabled,
    /// Spawned, no edge connection yet (within `startup_timeout`).
    Starting,
    /// All expected edge connections registered.
    Connected(u32),
    /// Ready, but fewer than the expected connections.
    Degraded(u32),
    /// Was ready, now `/ready` answers 503; cloudflared keeps retrying by itself.
    Disconnected,
    /// The metrics server stopped answering.
    Hung,
    /// Not running: between a stop and the next start.
    Stopped,
}

impl Health {
    /// Whether the tunnel can carry traffic now.
    pub fn is_ready(self) -> bool {
        matches!(
            self,
            Health::Connected(_) | Health::Degraded(_) | Health::Disabled
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            Health::Disabled => "disabled",
            Health::Starting => "starting",
            Health::Connected(_) => "connected",
            Health::Degraded(_) => "degraded",
            Health::Disconnected => "disconnected",
            Health::Hung => "hung",
            Health::Stopped => "stopped",
        }
    }

    /// Edge connections as last reported.
    pub fn connections(self) -> u32 {
        match self {
            Health::Connected(n) | Health::Degraded(n) => n,
            _ => 0,
        }
    }
}

/// Why the supervisor restarts a running child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartReason {
    StartupDeadline,
    Hung,
    Disconnected,
}

impl RestartReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RestartReason::StartupDeadline => "no edge connection within startup_timeout",
            RestartReason::Hung => "metrics server stopped answering (hung)",
            RestartReason::Disconnected => "disconnected longer than disconnected_restart_after",
        }
    }
}

/// The thresholds that turn probes into restarts.
#[derive(Debug, Clone, Copy)]
pub struct HealthLimits {
    pub startup_timeout: Duration,
    pub hung_timeout: Duration,
    pub disconnected_restart_after: Option<Duration>,
}

/// Health of one child process, from its start.
#[derive(Debug, Clone)]
pub struct HealthTracker {
    started: Instant,
    last_answer: Option<Instant>,
    ready_since: Option<Instant>,
    not_ready_since: Option<Instant>,
    ever_ready: bool,
    health: Health,
}

impl HealthTracker {
    pub fn new(started: Instant) -> HealthTracker {
        HealthTracker {
            started,
            last_answer: None,
            ready_since: None,
            not_ready_since: None,
            ever_ready: false,
            health: Health::Starting,
        }
    }

    pub fn health(&self) -> Health {
        self.health
    }

    /// How long the child has been continuously ready at `now` (zero if it is not).
    pub fn ready_for(&self, now: Instant) -> Duration {
        self.ready_since.map_or(Duration::ZERO, |t| now - t)
    }

    /// Folds one probe in; returns a restart reason when the child must be replaced.
    pub fn observe(
        &mut self,
        probe: Probe,
        now: Instant,
        limits: &HealthLimits,
    ) -> Option<RestartReason> {
        match probe {
            Probe::Ready(n) => {
                self.last_answer = Some(now);
                self.not_ready_since = None;
                self.ever_ready = true;
                self.ready_since.get_or_insert(now);
                self.health = if n >= EXPECTED_CONNECTIONS {
                    Health::Connected(n)
                } else {
                    Health::Degraded(n)
                };
                None
            }
            Probe::NotReady => {
                self.last_answer = Some(now);
                self.ready_since = None;
                if self.ever_ready {
                    let since = *self.not_ready_since.get_or_insert(now);
                    self.health = Health::Disconnected;
                    match limits.disconnected_restart_after {
                        Some(after) if now - since >= after => Some(RestartReason::Disconnected),
                        _ => None,
                    }
                } else {
                    self.health = Health::Starting;
                    self.startup_overdue(now, limits)
                }
            }
            Probe::NoAnswer => {
                self.ready_since = None;
                match self.last_answer {
                    // Its metrics server is not up yet: still starting.
                    None => {
                        self.health = Health::Starting;
                        self.startup_overdue(now, limits)
                    }
                    Some(last) if now - last >= limits.hung_timeout => {
                        self.health = Health::Hung;
                        Some(RestartReason::Hung)
                    }
                    // A missed answer or two: keep the last known state.
                    Some(_) => None,
                }
            }
        }
    }

    fn startup_overdue(&self, now: Instant, limits: &HealthLimits) -> Option<RestartReason> {
        (now - self.started >= limits.startup_timeout).then_some(RestartReason::StartupDeadline)
    }
}

/// Token refusals by the edge since the last accepted registration.
///
/// The real cloudflared retries a refused registration forever, with a growing backoff
/// (0.3 s, 1 s, 3 s, ... up to about a minute), because a new tunnel's token can take time to
/// reach the edge and a rotation is briefly in flux. So a refusal is only given up on when it
/// has lasted `token_refused_timeout` (minutes) with at least [`MIN_REFUSALS`] refused
/// registrations and no accepted one in between. Each refused registration counts once,
/// whatever number of log lines cloudflared writes about it.
#[derive(Debug, Clone, Default)]
pub struct Refusals {
    first: Option<Instant>,
    count: u32,
}

/// Refused registrations needed, besides the time window, before a refusal is persistent.
pub const MIN_REFUSALS: u32 = 3;

impl Refusals {
    pub fn refused(&mut self, now: Instant) {
        self.first.get_or_insert(now);
        self.count = self.count.saturating_add(1);
    }

    /// A registration was accepted (or a connection is up): the token works.
    pub fn accepted(&mut self) {
        *self = Refusals::default();
    }

    pub fn count(&self) -> u32 {
        self.count
    }

    /// `Some((refusals, for how long))` once the refusal counts as persistent.
    pub fn persistent(&self, now: Instant, timeout: Duration) -> Option<(u32, Duration)> {
        let since = now.saturating_duration_since(self.first?);
        (self.count >= MIN_REFUSALS && since >= timeout).then_some((self.count, since))
    }
}

/// How long to wait for cloudflared after SIGTERM before SIGKILL. With a registered
/// connection it unregisters and drains its requests within `grace` (plus a margin for the
/// process to exit). Without one there is nothing to drain, but cloudflared still sits out
/// its whole grace period while it is reconnecting: a short wait, then it is killed.
pub fn stop_wait(probe: Probe, grace: Duration) -> Duration {
    match probe {
        Probe::Ready(_) if !grace.is_zero() => grace + STOP_MARGIN,
        _ => NOT_CONNECTED_STOP_WAIT,
    }
}

/// Time for cloudflared to exit after its grace period ends.
pub const STOP_MARGIN: Duration = Duration::from_secs(5);

/// Time for an unconnected cloudflared to log its shutdown and exit (it takes ~10 ms).
pub const NOT_CONNECTED_STOP_WAIT: Duration = Duration::from_secs(1);

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Exited by itself with this code.
    Exited(i32),
    /// Killed by a signal nobody in the supervisor sent.
    Signaled(i32),
    /// The supervisor replaced it (health); restart after the usual backoff.
    Replaced(RestartReason),
    /// A planned restart (token or section changed, operator request) without overlap:
    /// restart at once, it is not a failure.
    Planned,
}

/// cloudflared's exit status for a usage error, including an invalid token.
pub const EXIT_USAGE: i32 = 255;

/// What to do after an ending.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Start again after `delay` (drawn from `[0, cap]`: full jitter).
    Restart {
        delay: Duration,
        cap: Duration,
        attempt: u32,
        /// At least `crash_loop_restarts` restarts inside `crash_loop_window`.
        crash_loop: bool,
    },
    /// Restarting cannot help (bad token, usage error): stop and report.
    Permanent(String),
}

/// Restart tuning, from `[cloudflared]`.
#[derive(Debug, Clone, Copy)]
pub struct RestartPolicy {
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub reset_after: Duration,
    pub crash_loop_restarts: u32,
    pub crash_loop_window: Duration,
}

/// The policy's memory across restarts.
#[derive(Debug, Clone, Default)]
pub struct RestartHistory {
    /// Consecutive failed runs since the last stable one.
    pub attempt: u32,
    recent: VecDeque<Instant>,
}

impl RestartPolicy {
    /// Decides what follows `ending`. `ready_for` is how long the child had been
    /// continuously ready when it ended; `jitter` is a sample from `[0, 1)`.
    pub fn decide(
        &self,
        history: &mut RestartHistory,
        ending: Ending,
        ready_for: Duration,
        now: Instant,
        jitter: f64,
    ) -> Decision {
        if ending == Ending::Exited(EXIT_USAGE) {
            return Decision::Permanent(
                "cloudflared exited 255 (usage error: the tunnel token is not valid or an argument was refused); restarting cannot fix it".into(),
            );
        }
        if ready_for >= self.reset_after {
            history.attempt = 0;
        }
        while history
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.crash_loop_window)
        {
            history.recent.pop_front();
        }
        history.recent.push_back(now);
        let crash_loop = history.recent.len() as u32 >= self.crash_loop_restarts.max(1);
        if ending == Ending::Planned {
            return Decision::Restart {
                delay: Duration::ZERO,
                cap: Duration::ZERO,
                attempt: history.attempt,
                crash_loop,
            };
        }
        let cap = self
            .backoff_min
            .saturating_mul(1u32 << history.attempt.min(20))
            .min(self.backoff_max);
        let attempt = history.attempt;
        history.attempt = history.attempt.saturating_add(1);
        Decision::Restart {
            delay: cap.mul_f64(jitter.clamp(0.0, 1.0)),
            cap,
            attempt,
            crash_loop,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> HealthLimits {
        HealthLimits {
            startup_timeout: Duration::from_secs(60),
            hung_timeout: Duration::from_secs(15),
            disconnected_restart_after: None,
        }
    }

    #[test]
    fn health_table() {
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        use Health::*;
        use Probe::*;
        // (probes with times, expected final health, expected restart on the last probe)
        type Case = (Vec<(Probe, u64)>, Health, Option<RestartReason>);
        let cases: Vec<Case> = vec![
            (vec![(NoAnswer, 1)], Starting, None),
            (vec![(NotReady, 1)], Starting, None),
            (
                vec![(NotReady, 61)],
                Starting,
                Some(RestartReason::StartupDeadline),
            ),
            (
                vec![(NoAnswer, 61)],
                Starting,
                Some(RestartReason::StartupDeadline),
            ),
            (vec![(Ready(4), 2)], Connected(4), None),
            (vec![(Ready(2), 2)], Degraded(2), None),
            (vec![(Ready(4), 2), (NotReady, 100)], Disconnected, None),
            (vec![(Ready(4), 2), (NoAnswer, 10)], Connected(4), None),
            (
                vec![(Ready(4), 2), (NoAnswer, 17)],
                Hung,
                Some(RestartReason::Hung),
            ),
            (
                vec![(NotReady, 2), (NoAnswer, 17)],
                Hung,
                Some(RestartReason::Hung),
            ),
            // Ready late but before the deadline: never a startup restart afterwards.
            (vec![(Ready(1), 59), (Ready(4), 70)], Connected(4), None),
        ];
        for (i, (probes, health, restart)) in cases.into_iter().enumerate() {
            let mut t = HealthTracker::new(t0);
            let mut last = None;
            for (p, at) in probes {
                last = t.observe(p, s(at), &limits());
            }
            assert_eq!((t.health(), last), (health, restart), "case {i}");
        }
    }

    #[test]
    fn disconnected_restart_is_opt_in() {
        let t0 = Instant::now();
        let mut l = limits();
        l.disconnected_restart_after = Some(Duration::from_secs(30));
        let mut t = HealthTracker::new(t0);
        t.observe(Probe::Ready(4), t0, &l);
        assert_eq!(
            t.observe(Probe::NotReady, t0 + Duration::from_secs(5), &l),
            None
        );
        assert_eq!(
            t.observe(Probe::NotReady, t0 + Duration::from_secs(36), &l),
            Some(RestartReason::Disconnected)
        );
    }

    #[test]
    fn refusals_are_persistent_only_after_the_window_and_reset_on_acceptance() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let window = Duration::from_secs(600);
        let mut r = Refusals::default();
        // cloudflared's backoff: many refusals in the first seconds are not persistent.
        for s in [0, 1, 2, 5, 9, 20, 40] {
            r.refused(at(s));
        }
        assert_eq!(r.persistent(at(60), window), None);
        assert_eq!(r.persistent(at(599), window), None);
        assert_eq!(
            r.persistent(at(600), window),
            Some((7, Duration::from_secs(600)))
        );
        // An accepted registration starts over.
        r.accepted();
        assert_eq!(r.persistent(at(2000), window), None);
        // Fewer than MIN_REFUSALS, however long ago, is not persistent either.
        r.refused(at(2000));
        r.refused(at(2100));
        assert_eq!(r.persistent(at(9000), window), None);
        r.refused(at(2200));
        assert_eq!(r.persistent(at(2599), window), None);
        assert_eq!(r.persistent(at(2600), window).map(|p| p.0), Some(3));
    }

    #[test]
    fn stop_waits_for_the_grace_period_only_when_connected() {
        let g = Duration::from_secs(30);
        assert_eq!(stop_wait(Probe::Ready(4), g), g + STOP_MARGIN);
        assert_eq!(stop_wait(Probe::Ready(1), g), g + STOP_MARGIN);
        assert_eq!(stop_wait(Probe::NotReady, g), NOT_CONNECTED_STOP_WAIT);
        assert_eq!(stop_wait(Probe::NoAnswer, g), NOT_CONNECTED_STOP_WAIT);
        assert_eq!(
            stop_wait(Probe::Ready(4), Duration::ZERO),
            NOT_CONNECTED_STOP_WAIT
        );
    }

    fn policy() -> RestartPolicy {
        RestartPolicy {
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            reset_after: Duration::from_secs(120),
            crash_loop_restarts: 5,
            crash_loop_window: Duration::from_secs(300),
        }
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_full_jitter() {
        let p = policy();
        let mut h = RestartHistory::default();
        let t0 = Instant::now();
        let mut caps = Vec::new();
        for i in 0..9u64 {
            let at = t0 + Duration::from_secs(i * 100);
            match p.decide(&mut h, Ending::Exited(1), Duration::ZERO, at, 0.5) {
                Decision::Restart { delay, cap, .. } => {
                    assert_eq!(delay, cap / 2, "full jitter scales the cap");
                    caps.push(cap.as_secs());
                }
                d => panic!("{d:?}"),
            }
        }
        assert_eq!(caps, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        // jitter 0 may restart at once; jitter near 1 stays within the cap
        let mut h = RestartHistory::default();
        let d = p.decide(&mut h, Ending::Signaled(9), Duration::ZERO, t0, 0.0);
        assert!(matches!(d, Decision::Restart { delay, .. } if delay.is_zero()));
    }

    #[test]
    fn stable_run_resets_backoff() {
        let p = policy();
        let mut h = RestartHistory::default();
        let t0 = Instant::now();
        for _ in 0..4 {
            p.decide(&mut h, Ending::Exited(1), Duration::ZERO, t0, 1.0);
        }
        let d = p.decide(&mut h, Ending::Exited(1), Duration::from_secs(121), t0, 1.0);
        assert!(
            matches!(d, Decision::Restart { cap, attempt: 0, .. } if cap == Duration::from_secs(1)),
            "{d:?}"
        );
        let d = p.decide(
            &mut h,
            Ending::Replaced(RestartReason::Hung),
            Duration::from_secs(5),
            t0,
            1.0,
        );
        assert!(matches!(d, Decision::Restart { attempt: 1, .. }), "{d:?}");
    }

    #[test]
    fn exit_255_is_permanent_and_token_change_is_immediate() {
        let p = policy();
        let mut h = RestartHistory::default();
        let t0 = Instant::now();
        assert!(matches!(
            p.decide(&mut h, Ending::Exited(255), Duration::ZERO, t0, 0.5),
            Decision::Permanent(_)
        ));
        h.attempt = 5;
        let d = p.decide(&mut h, Ending::Planned, Duration::ZERO, t0, 0.9);
        assert!(
            matches!(d, Decision::Restart { delay, .. } if delay.is_zero()),
            "{d:?}"
        );
        assert_eq!(h.attempt, 5, "a token change is not a failure");
    }

    #[test]
    fn crash_loop_counts_restarts_inside_the_window() {
        let p = policy();
        let mut h = RestartHistory::default();
        let t0 = Instant::now();
        let loops: Vec<bool> = (0..6u64)
            .map(|i| {
                let d = p.decide(
                    &mut h,
                    Ending::Exited(1),
                    Duration::ZERO,
                    t0 + Duration::from_secs(i),
                    0.1,
                );
                matches!(
                    d,
                    Decision::Restart {
                        crash_loop: true,
                        ..
                    }
                )
            })
            .collect();
        assert_eq!(loops, [false, false, false, false, true, true]);
        // much later, the window has emptied
        let d = p.decide(
            &mut h,
            Ending::Exited(1),
            Duration::ZERO,
            t0 + Duration::from_secs(1000),
            0.1,
        );
        assert!(matches!(
            d,
            Decision::Restart {
                crash_loop: false,
                ..
            }
        ));
    }
}
