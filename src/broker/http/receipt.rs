//! The receipt of an exec call ([`crate::api::Receipt`]): the worker's
//! comparison of its workspace, the broker's reading of the cgroup, and the
//! name of the limit that ended the call.

use crate::api::Receipt;
use crate::broker::pool::metrics::limit_kind;
use crate::protocol::{ExecOutcome, Termination};

/// The receipt of `outcome`; `limit` is the broker's text of the kernel
/// limit it saw hit, `file_size_max` the workflow's `RLIMIT_FSIZE`.
pub fn receipt(outcome: &ExecOutcome, limit: Option<&str>, file_size_max: u64) -> Receipt {
    let ended_by = ended_by(outcome, limit);
    let mut reached: Vec<String> = ended_by.iter().cloned().collect();
    let mut reach = |name: &str| {
        if !reached.iter().any(|r| r == name) {
            reached.push(name.to_string());
        }
    };
    if outcome.stdout_truncated || outcome.stderr_truncated {
        reach("output_max");
    }
    if let Some(c) = &outcome.changes {
        if c.created.iter().chain(&c.modified).any(|p| p.size >= file_size_max) {
            reach("file_size_max");
        }
    }
    let (memory_peak_bytes, memory_peak_source) = match (&outcome.cgroup_peak, outcome.peak_rss_kib) {
        (Some(p), _) => (Some(p.bytes), Some(format!("cgroup:{}", p.file))),
        (None, 0) => (None, None),
        (None, kib) => (Some(kib.saturating_mul(1024)), Some("rusage:maxrss".to_string())),
    };
    Receipt {
        changes: outcome.changes.as_deref().cloned(),
        ended_by,
        limits_reached: reached,
        memory_peak_bytes,
        memory_peak_source,
        cpu_ms: (outcome.cpu_user_us + outcome.cpu_system_us) as f64 / 1000.0,
    }
}

/// The limit that ended the call: the kernel's (cgroup) first, then the
/// call's clock, then `RLIMIT_FSIZE` (the command died of `SIGXFSZ`).
/// `None` for a call that ended on its own or was cancelled.
fn ended_by(outcome: &ExecOutcome, limit: Option<&str>) -> Option<String> {
    if let Some(text) = limit {
        let kind = match limit_kind(text) {
            "other" => "limit",
            kind => kind,
        };
        return Some(kind.to_string());
    }
    if outcome.timed_out {
        return Some("timeout".into());
    }
    if outcome.termination == Termination::Signaled(libc::SIGXFSZ) {
        return Some("file_size_max".into());
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::protocol::{CgroupPeak, ChangedPath, EntryKind, WorkspaceChanges};

    fn outcome() -> ExecOutcome {
        ExecOutcome {
            id: 1,
            termination: Termination::Exited(0),
            error: None,
            stdout: Vec::new(),
            stderr: Vec::new(),
            stdout_truncated: false,
            stderr_truncated: false,
            timed_out: false,
            cancelled: false,
            wall_us: 1000,
            cpu_user_us: 1500,
            cpu_system_us: 500,
            peak_rss_kib: 2,
            changes: None,
            cgroup_peak: None,
        }
    }

    #[test]
    fn names_the_limit_that_ended_the_call() {
        let r = receipt(&outcome(), None, 100);
        assert_eq!((r.ended_by, r.limits_reached.len()), (None, 0));
        assert_eq!((r.memory_peak_bytes, r.memory_peak_source.as_deref()), (Some(2048), Some("rusage:maxrss")));
        assert!((r.cpu_ms - 2.0).abs() < 1e-9);

        let timed_out = ExecOutcome { timed_out: true, termination: Termination::Signaled(9), ..outcome() };
        assert_eq!(receipt(&timed_out, None, 100).ended_by.as_deref(), Some("timeout"));
        // A memory limit that held the call until its clock ran out is named
        // rather than the clock.
        let held = "memory_max 64M reached: the call was held at its memory limit until its time ran out";
        assert_eq!(receipt(&timed_out, Some(held), 100).ended_by.as_deref(), Some("memory_max"));
        let oom = "the tenant's memory_max ([tenant] of t) reached in s: the kernel's OOM killer ended 1 process(es)";
        assert_eq!(receipt(&outcome(), Some(oom), 100).ended_by.as_deref(), Some("tenant_memory_max"));

        let xfsz = ExecOutcome { termination: Termination::Signaled(libc::SIGXFSZ), ..outcome() };
        assert_eq!(receipt(&xfsz, None, 100).ended_by.as_deref(), Some("file_size_max"));
    }

    #[test]
    fn lists_limits_reached_without_ending_the_call() {
        let big = ChangedPath { path: "big".into(), kind: EntryKind::File, size: 100, size_before: None };
        let o = ExecOutcome {
            stdout_truncated: true,
            changes: Some(Box::new(WorkspaceChanges {
                created: vec![big],
                created_count: 1,
                ..WorkspaceChanges::default()
            })),
            cgroup_peak: Some(CgroupPeak { bytes: 7 << 20, file: "memory.peak".into() }),
            ..outcome()
        };
        let r = receipt(&o, None, 100);
        assert_eq!(r.ended_by, None);
        assert_eq!(r.limits_reached, ["output_max", "file_size_max"]);
        assert_eq!((r.memory_peak_bytes, r.memory_peak_source.as_deref()), (Some(7 << 20), Some("cgroup:memory.peak")));
    }
}
