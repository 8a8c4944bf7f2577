//! A pool's health: how fast to restart a lost worker, and when to stop
//! trying (quarantine).
//!
//! Two kinds of loss are told apart:
//!
//! - A worker **killed from outside while idle** (SIGKILL, SIGTERM, …: an
//!   operator, the OOM killer, a fault injector) is not the workflow's
//!   fault: it is replaced at once. Only a burst of such losses is slowed
//!   down, to a fixed pace, so a kill loop cannot make the broker spin; the
//!   pace never grows, and the pool skips it when a call is waiting, so
//!   callers are never locked out.
//! - A worker that **cannot start**, or that **crashes** on its own (an exit
//!   code, SIGSEGV, SIGABRT, …), is the workflow's fault. Consecutive
//!   failures back off briefly (100 ms doubling, at most
//!   [`FAILURE_BACKOFF_MAX`]); [`FAILURES_TO_QUARANTINE`] of them within
//!   [`FAILURE_WINDOW`] quarantine the workflow: calls fail at once with the
//!   reason, and after the quarantine one worker is tried again (a single
//!   failure then quarantines it again, twice as long, up to
//!   [`QUARANTINE_MAX`]). A reload (SIGHUP) lifts a quarantine at once.
//!
//! The type is plain data driven by the caller's clock, so the rules are
//! tested without processes.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Failures (start failures, crashes) within [`FAILURE_WINDOW`] that
/// quarantine a workflow.
pub const FAILURES_TO_QUARANTINE: usize = 5;
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// First restart delay after a failure; doubles per consecutive failure.
const FAILURE_BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const FAILURE_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// The first quarantine; each one in a row doubles it, up to
/// [`QUARANTINE_MAX`].
pub const QUARANTINE_FIRST: Duration = Duration::from_secs(60);
pub const QUARANTINE_MAX: Duration = Duration::from_secs(15 * 60);
/// Outside kills replaced at once within [`KILL_BURST_WINDOW`]; beyond
/// that, one replacement per [`KILL_PACE`].
pub const KILL_BURST: usize = 10;
pub const KILL_BURST_WINDOW: Duration = Duration::from_secs(10);
pub const KILL_PACE: Duration = Duration::from_secs(1);

/// Why the pool stopped starting workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuarantineKind {
    /// The workers kept failing or crashing.
    Crashing,
    /// A worker refused to start: its sandbox cannot be set up as the
    /// policy requires on this host (retrying rarely helps).
    Refused,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantine {
    pub kind: QuarantineKind,
    /// What the last failure was.
    pub reason: String,
    /// Failures that led to it (within the window).
    pub failures: usize,
    pub since: Instant,
    /// When one worker is tried again.
    pub until: Instant,
}

#[derive(Debug, Default)]
pub struct Health {
    /// Times of recent failures (pruned to [`FAILURE_WINDOW`]).
    failures: VecDeque<Instant>,
    /// Failures since the last proven worker.
    consecutive: u32,
    /// Quarantines in a row without a proven worker between them.
    level: u32,
    /// After a quarantine ends: the next failure quarantines again.
    probation: bool,
    /// Times of recent outside kills (pruned to [`KILL_BURST_WINDOW`]).
    kills: VecDeque<Instant>,
    quarantine: Option<Quarantine>,
    /// The last failure, for status.
    pub last_failure: Option<String>,
}

impl Health {
    /// The quarantine in force at `now`. An expired one ends here and puts
    /// the pool on probation.
    pub fn quarantine(&mut self, now: Instant) -> Option<&Quarantine> {
        if self.quarantine.as_ref().is_some_and(|q| now >= q.until) {
            self.quarantine = None;
            self.probation = true;
        }
        self.quarantine.as_ref()
    }

    /// The quarantine as last set, without ending an expired one.
    pub fn current(&self) -> Option<&Quarantine> {
        self.quarantine.as_ref()
    }

    /// A worker served a call, or lived long: the workflow works.
    pub fn proven(&mut self) {
        self.consecutive = 0;
        self.level = 0;
        self.probation = false;
        self.failures.clear();
    }

    /// A worker failed to start or crashed. Returns how long to wait before
    /// the next start; quarantines the workflow when failures pile up.
    pub fn failed(&mut self, now: Instant, why: &str, kind: QuarantineKind) -> Duration {
        self.last_failure = Some(why.to_string());
        while self.failures.front().is_some_and(|t| now.duration_since(*t) > FAILURE_WINDOW) {
            self.failures.pop_front();
        }
        self.failures.push_back(now);
        self.consecutive = self.consecutive.saturating_add(1);
        let refused = kind == QuarantineKind::Refused;
        if refused || self.probation || self.failures.len() >= FAILURES_TO_QUARANTINE {
            let length = QUARANTINE_FIRST.saturating_mul(1 << self.level.min(8)).min(QUARANTINE_MAX);
            self.level = self.level.saturating_add(1);
            self.probation = false;
            self.quarantine = Some(Quarantine {
                kind,
                reason: why.to_string(),
                failures: self.failures.len(),
                since: now,
                until: now + length,
            });
            return length;
        }
        FAILURE_BACKOFF_MIN.saturating_mul(1 << (self.consecutive - 1).min(8)).min(FAILURE_BACKOFF_MAX)
    }

    /// An idle worker was killed from outside. Returns how long to wait
    /// before replacing it: nothing, unless kills come in a burst.
    pub fn killed(&mut self, now: Instant) -> Duration {
        while self.kills.front().is_some_and(|t| now.duration_since(*t) > KILL_BURST_WINDOW) {
            self.kills.pop_front();
        }
        self.kills.push_back(now);
        if self.kills.len() > KILL_BURST {
            KILL_PACE
        } else {
            Duration::ZERO
        }
    }

    /// Ends a quarantine now (reload) and forgets past failures.
    pub fn lift(&mut self) -> bool {
        let was = self.quarantine.take().is_some();
        self.failures.clear();
        self.consecutive = 0;
        self.level = 0;
        self.probation = false;
        was
    }
}

/// How a worker's end counts: killed from outside while idle, or its own
/// crash. `signal` is the signal that ended it, if one did.
pub fn outside_kill(signal: Option<i32>) -> bool {
    // Signals a worker never sends itself: someone (an operator, systemd,
    // the OOM killer) ended it. SIGSEGV, SIGABRT, SIGBUS, … and exit codes
    // are its own failure.
    matches!(signal, Some(libc::SIGKILL | libc::SIGTERM | libc::SIGINT | libc::SIGHUP | libc::SIGQUIT))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn outside_kills_are_replaced_at_once_and_only_a_burst_is_paced() {
        let mut h = Health::default();
        let t0 = Instant::now();
        for i in 0..KILL_BURST {
            assert_eq!(h.killed(t0 + Duration::from_millis(i as u64 * 50)), Duration::ZERO, "kill {i}");
        }
        // The burst is paced at a fixed rate: 20 kills never grow the wait.
        for i in KILL_BURST..20 {
            assert_eq!(h.killed(t0 + Duration::from_millis(i as u64 * 50)), KILL_PACE, "kill {i}");
        }
        assert!(h.quarantine(t0 + Duration::from_secs(1)).is_none(), "outside kills never quarantine");
        // Once the burst is over, replacement is immediate again.
        assert_eq!(h.killed(t0 + Duration::from_secs(30)), Duration::ZERO);
    }

    #[test]
    fn failures_back_off_briefly_then_quarantine_and_probation_requarantines() {
        let mut h = Health::default();
        let t0 = Instant::now();
        let mut waits = Vec::new();
        for i in 0..FAILURES_TO_QUARANTINE - 1 {
            waits.push(h.failed(t0 + Duration::from_secs(i as u64), "exited with code 1", QuarantineKind::Crashing));
        }
        assert_eq!(waits[0], Duration::from_millis(100));
        assert!(waits.iter().all(|w| *w <= FAILURE_BACKOFF_MAX), "{waits:?}");
        assert!(h.quarantine(t0 + Duration::from_secs(4)).is_none());
        let t5 = t0 + Duration::from_secs(5);
        assert_eq!(h.failed(t5, "exited with code 1", QuarantineKind::Crashing), QUARANTINE_FIRST);
        let q = h.quarantine(t5).unwrap().clone();
        assert_eq!((q.kind, q.failures, q.until), (QuarantineKind::Crashing, 5, t5 + QUARANTINE_FIRST));
        // It ends by itself; one more failure quarantines again, twice as long.
        let t_end = t5 + QUARANTINE_FIRST;
        assert!(h.quarantine(t_end).is_none());
        assert_eq!(h.failed(t_end, "exited with code 1", QuarantineKind::Crashing), QUARANTINE_FIRST * 2);
        // A reload lifts it and forgets.
        assert!(h.lift());
        assert!(h.quarantine(t_end).is_none());
        assert_eq!(h.failed(t_end, "x", QuarantineKind::Crashing), Duration::from_millis(100));
    }

    #[test]
    fn failures_outside_the_window_do_not_add_up_and_a_proven_worker_resets() {
        let mut h = Health::default();
        let t0 = Instant::now();
        for i in 0..20u64 {
            // One failure every 20 s: never 5 within a minute.
            let wait = h.failed(t0 + Duration::from_secs(20 * i), "x", QuarantineKind::Crashing);
            assert!(wait <= FAILURE_BACKOFF_MAX, "{wait:?}");
        }
        assert!(h.quarantine(t0 + Duration::from_secs(400)).is_none());
        let mut h = Health::default();
        for i in 0..4u64 {
            h.failed(t0 + Duration::from_millis(i), "x", QuarantineKind::Crashing);
        }
        h.proven();
        h.failed(t0 + Duration::from_millis(10), "x", QuarantineKind::Crashing);
        assert!(h.quarantine(t0 + Duration::from_millis(10)).is_none());
    }

    #[test]
    fn a_refusal_quarantines_at_once() {
        let mut h = Health::default();
        let t0 = Instant::now();
        assert_eq!(h.failed(t0, "Landlock is not available", QuarantineKind::Refused), QUARANTINE_FIRST);
        assert_eq!(h.quarantine(t0).unwrap().kind, QuarantineKind::Refused);
    }

    #[test]
    fn signals_that_mean_an_outside_kill() {
        assert!(outside_kill(Some(libc::SIGKILL)));
        assert!(outside_kill(Some(libc::SIGTERM)));
        assert!(!outside_kill(Some(libc::SIGSEGV)));
        assert!(!outside_kill(Some(libc::SIGABRT)));
        assert!(!outside_kill(None));
    }
}
