//! What a pool counts for `GET /metrics`: calls by outcome, a histogram of
//! their durations (queue wait included), kills by limit, restarts. The
//! pool's own types; the HTTP layer renders them as Prometheus text.

use std::collections::BTreeMap;
use std::time::Duration;

/// Upper bounds (seconds) of the call-duration histogram's buckets; the
/// `+Inf` bucket is the count.
pub const DURATION_BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5, 10.0, 60.0];

/// How a call ended, for counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// The command exited 0, or the ask answered.
    Ok,
    /// The command exited non-zero, was killed, or could not start.
    Failed,
    /// Its own timeout ended it.
    Timeout,
    /// A limit (memory, tasks, disk) ended it.
    Limit,
    /// Its worker died or hung under it.
    WorkerLost,
    /// Refused at once: queue full, quarantined, unavailable.
    Refused,
    /// Waited in the queue until it was out of time.
    QueueTimeout,
    /// Cut short by the broker's stop.
    Stopped,
    /// Its client went away, or cancelled it.
    Cancelled,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Failed => "failed",
            Outcome::Timeout => "timeout",
            Outcome::Limit => "limit",
            Outcome::WorkerLost => "worker_lost",
            Outcome::Refused => "refused",
            Outcome::QueueTimeout => "queue_timeout",
            Outcome::Stopped => "stopped",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// Which limit a kill text names: `memory_max`, `tasks_max`, `disk_max`,
/// or the tenant's; `call_timeout` is counted by the caller.
pub fn limit_kind(text: &str) -> &'static str {
    let tenant = text.starts_with("the tenant's");
    if text.contains("memory_max") {
        if tenant {
            "tenant_memory_max"
        } else {
            "memory_max"
        }
    } else if text.contains("tasks_max") {
        if tenant {
            "tenant_tasks_max"
        } else {
            "tasks_max"
        }
    } else if text.contains("disk_max") {
        "disk_max"
    } else {
        "other"
    }
}

/// A pool's counters since the broker started (a reload keeps them for
/// workflows that stay).
#[derive(Debug, Clone, Default)]
pub struct Counters {
    pub calls: BTreeMap<Outcome, u64>,
    /// Calls per bucket of [`DURATION_BUCKETS`] (not cumulative).
    pub duration_buckets: [u64; DURATION_BUCKETS.len()],
    pub duration_count: u64,
    pub duration_sum_s: f64,
    pub kills: BTreeMap<&'static str, u64>,
    /// Worker starts after the first of each slot.
    pub restarts: u64,
}

impl Counters {
    /// Counts a call that ended `outcome` after `took` (from its arrival).
    pub fn call(&mut self, outcome: Outcome, took: Duration) {
        *self.calls.entry(outcome).or_default() += 1;
        let s = took.as_secs_f64();
        if let Some(i) = DURATION_BUCKETS.iter().position(|b| s <= *b) {
            self.duration_buckets[i] += 1;
        }
        self.duration_count += 1;
        self.duration_sum_s += s;
    }

    pub fn kill(&mut self, kind: &'static str) {
        *self.kills.entry(kind).or_default() += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_fall_in_the_first_bucket_that_holds_them() {
        let mut c = Counters::default();
        c.call(Outcome::Ok, Duration::from_micros(800));
        c.call(Outcome::Ok, Duration::from_millis(3));
        c.call(Outcome::Timeout, Duration::from_secs(120));
        assert_eq!(c.duration_buckets[0], 1);
        assert_eq!(c.duration_buckets[2], 1);
        assert_eq!(c.duration_buckets.iter().sum::<u64>(), 2, "beyond the last bucket: only +Inf");
        assert_eq!(c.duration_count, 3);
        assert_eq!(c.calls[&Outcome::Ok], 2);
    }

    #[test]
    fn kill_texts_name_their_limit() {
        assert_eq!(limit_kind("memory_max 128M reached: the kernel's OOM killer ended 1 process(es)"), "memory_max");
        assert_eq!(
            limit_kind("the tenant's tasks_max reached in corral-kid.slice: 3 fork(s) refused"),
            "tenant_tasks_max"
        );
        assert_eq!(limit_kind("disk_max 10M of workflow w was reached: the workspace is full"), "disk_max");
    }
}
