//! Reading a worker's cgroup: memory, CPU, tasks, and the kernel's kill
//! counters, on cgroup v1 (one hierarchy per controller) and v2 (unified).
//! Paths come from `/proc/PID/cgroup`; the cgroup root is a parameter so the
//! logic is testable without one.

use std::path::{Path, PathBuf};

/// The usual mount point of the cgroup file systems.
pub const ROOT: &str = "/sys/fs/cgroup";

/// Where one process's cgroups are, per controller.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Location {
    /// The unified (v2) group, when the process has one with controllers.
    pub unified: Option<PathBuf>,
    pub memory: Option<PathBuf>,
    pub cpu: Option<PathBuf>,
    pub pids: Option<PathBuf>,
}

/// Whether `/proc/PID/cgroup` text places the process in `unit` wholly: in
/// the unified (or name=systemd) hierarchy and in each v1 hierarchy whose
/// controller a scope's limits and accounting use (memory, pids, cpu,
/// devices). On cgroup v1 systemd moves a process into the controllers'
/// hierarchies after the named one, so "in one hierarchy" is not yet "under
/// its limits"; hierarchies it does not manage (freezer, cpuacct mounted
/// apart, …) are ignored.
pub fn placed_in(proc_cgroup: &str, unit: &str) -> bool {
    let suffix = format!("/{unit}");
    let mut seen = false;
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let managed = controllers.is_empty()
            || controllers == "name=systemd"
            || controllers.split(',').any(|c| matches!(c, "memory" | "pids" | "cpu" | "devices"));
        if !managed {
            continue;
        }
        if !path.ends_with(&suffix) {
            return false;
        }
        seen = true;
    }
    seen
}

/// Parses `/proc/PID/cgroup` text into directories under `root`.
pub fn locate(root: &Path, proc_cgroup: &str) -> Location {
    let mut loc = Location::default();
    let v1 = root.join("memory").is_dir() || root.join("pids").is_dir();
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), Some(c)) => (a, b, c),
            _ => continue,
        };
        let rel = path.trim_start_matches('/');
        if controllers.is_empty() {
            if !v1 {
                loc.unified = Some(root.join(rel));
            }
            continue;
        }
        // A controller at the root group does not account for the worker: on
        // some hosts (cpu and cpuacct mounted apart) systemd places a unit in
        // one and leaves the other at "/", which would report the machine.
        if rel.is_empty() {
            continue;
        }
        for c in controllers.split(',') {
            match c {
                "memory" => loc.memory = Some(root.join("memory").join(rel)),
                "cpuacct" => loc.cpu = Some(root.join("cpuacct").join(rel)),
                "pids" => loc.pids = Some(root.join("pids").join(rel)),
                _ => {}
            }
        }
    }
    loc
}

impl Location {
    /// The enclosing group of each controller: a scope's slice.
    pub fn parent(&self) -> Location {
        let up = |p: &Option<PathBuf>| p.as_ref().and_then(|p| p.parent().map(Path::to_path_buf));
        Location { unified: up(&self.unified), memory: up(&self.memory), cpu: up(&self.cpu), pids: up(&self.pids) }
    }
}

/// Resource figures of one cgroup.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    pub memory_current: Option<u64>,
    pub memory_peak: Option<u64>,
    pub cpu_usage_us: Option<u64>,
    pub tasks_current: Option<u64>,
    /// Processes the kernel's OOM killer ended in this group.
    pub oom_kills: Option<u64>,
    /// Times a fork was refused because of the task limit.
    pub tasks_refused: Option<u64>,
    /// Times the group's memory hit its limit (v2 `memory.events` max, v1
    /// `memory.failcnt`): the kernel reclaimed instead of allocating.
    #[serde(default)]
    pub memory_max_hits: Option<u64>,
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The value of `key` in flat-keyed text (`memory.events`, `cpu.stat`).
fn keyed_in(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// The value of `key` in a flat-keyed file.
fn keyed(path: &Path, key: &str) -> Option<u64> {
    keyed_in(&std::fs::read_to_string(path).ok()?, key)
}

/// The kernel's counters of a limit enforced on one group: what the broker
/// reads before and after every call to name the limit that ended it. Two
/// files on cgroup v2, three on v1, against seven for [`Stats`]: each is
/// an open, a read and a close on a path of five or six levels, twice per
/// group and per call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitCounts {
    /// Processes the kernel's OOM killer ended in this group.
    pub oom_kills: Option<u64>,
    /// Times a fork was refused because of the task limit.
    pub tasks_refused: Option<u64>,
    /// Times the group's memory hit its limit (v2 `memory.events` max, v1
    /// `memory.failcnt`).
    pub memory_max_hits: Option<u64>,
}

/// The limit counters of the group at `loc`.
pub fn limit_counts(loc: &Location) -> LimitCounts {
    if let Some(g) = &loc.unified {
        let memory = std::fs::read_to_string(g.join("memory.events")).ok();
        return LimitCounts {
            oom_kills: memory.as_deref().and_then(|t| keyed_in(t, "oom_kill")),
            tasks_refused: keyed(&g.join("pids.events"), "max"),
            memory_max_hits: memory.as_deref().and_then(|t| keyed_in(t, "max")),
        };
    }
    LimitCounts {
        oom_kills: loc.memory.as_ref().and_then(|g| keyed(&g.join("memory.oom_control"), "oom_kill")),
        tasks_refused: loc.pids.as_ref().and_then(|g| keyed(&g.join("pids.events"), "max")),
        memory_max_hits: loc.memory.as_ref().and_then(|g| read_u64(&g.join("memory.failcnt"))),
    }
}

pub fn stats(loc: &Location) -> Stats {
    let LimitCounts { oom_kills, tasks_refused, memory_max_hits } = limit_counts(loc);
    if let Some(g) = &loc.unified {
        return Stats {
            memory_current: read_u64(&g.join("memory.current")),
            memory_peak: read_u64(&g.join("memory.peak")),
            cpu_usage_us: keyed(&g.join("cpu.stat"), "usage_usec"),
            tasks_current: read_u64(&g.join("pids.current")),
            oom_kills,
            tasks_refused,
            memory_max_hits,
        };
    }
    Stats {
        memory_current: loc.memory.as_ref().and_then(|g| read_u64(&g.join("memory.usage_in_bytes"))),
        memory_peak: loc.memory.as_ref().and_then(|g| read_u64(&g.join("memory.max_usage_in_bytes"))),
        cpu_usage_us: loc.cpu.as_ref().and_then(|g| read_u64(&g.join("cpuacct.usage"))).map(|ns| ns / 1000),
        tasks_current: loc.pids.as_ref().and_then(|g| read_u64(&g.join("pids.current"))),
        oom_kills,
        tasks_refused,
        memory_max_hits,
    }
}

/// The peak memory of one group over a span of time: a call.
#[derive(Debug)]
pub enum PeakWatch {
    /// cgroup v2 `memory.peak`, reset through this descriptor (kernel
    /// 6.12+); reads through it see the peak since the reset.
    Reset(std::fs::File),
    /// cgroup v1 `memory.max_usage_in_bytes`, reset to the current usage.
    ResetV1(PathBuf),
    /// A peak that cannot be reset (an older kernel, a read-only cgroup
    /// file system as under `ProtectControlGroups=`): the group's peak
    /// before the call. A higher peak after it was reached during the call.
    Since { path: PathBuf, before: u64 },
}

impl PeakWatch {
    /// Resets the group's peak to its current usage where it can, or
    /// notes the peak so far; `None` when the group has no peak file.
    pub fn start(loc: &Location) -> Option<PeakWatch> {
        use std::io::Write;
        let path = match (&loc.unified, &loc.memory) {
            (Some(g), _) => g.join("memory.peak"),
            (None, Some(g)) => g.join("memory.max_usage_in_bytes"),
            (None, None) => return None,
        };
        if loc.unified.is_some() {
            let reset = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .and_then(|mut f| f.write_all(b"reset\n").map(|()| f));
            if let Ok(f) = reset {
                return Some(PeakWatch::Reset(f));
            }
        } else if std::fs::write(&path, "0\n").is_ok() {
            return Some(PeakWatch::ResetV1(path));
        }
        Some(PeakWatch::Since { before: read_u64(&path)?, path })
    }

    /// The peak in bytes since [`PeakWatch::start`], and the file it is
    /// from; `None` when the group's peak did not rise during the call and
    /// could not be reset (the call's own peak is then not known from here).
    pub fn read(&self) -> Option<(u64, &'static str)> {
        let name = |p: &Path| if p.ends_with("memory.peak") { "memory.peak" } else { "memory.max_usage_in_bytes" };
        match self {
            PeakWatch::Reset(f) => {
                use std::os::unix::fs::FileExt;
                let mut buf = [0u8; 32];
                let n = f.read_at(&mut buf, 0).ok()?;
                let v = std::str::from_utf8(buf.get(..n)?).ok()?.trim().parse().ok()?;
                Some((v, "memory.peak"))
            }
            PeakWatch::ResetV1(path) => Some((read_u64(path)?, "memory.max_usage_in_bytes")),
            PeakWatch::Since { path, before } => {
                let after = read_u64(path)?;
                (after > *before).then_some((after, name(path)))
            }
        }
    }
}

/// Stats of the cgroups `pid` is in.
pub fn stats_of(pid: u32) -> Option<Stats> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    Some(stats(&locate(Path::new(ROOT), &text)))
}

/// The cgroup version in use here: "v2", "v1" or "hybrid".
pub fn version(root: &Path) -> &'static str {
    let unified = root.join("cgroup.controllers").is_file();
    let v1 = root.join("memory").join("memory.limit_in_bytes").is_file() || root.join("pids").is_dir();
    match (unified, v1) {
        (true, _) => "v2",
        (false, true) => "v1",
        (false, false) => "none",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placed_only_when_every_managed_hierarchy_has_moved() {
        let unit = "corral-homework-1.scope";
        let scope = "/corral.slice/corral-kid.slice/corral-homework-1.scope";
        let text = |memory: &str, cpu: &str| {
            format!(
                "13:hugetlb:/\n10:perf_event:/\n9:name=systemd:{scope}\n8:pids:{scope}\n6:freezer:/\n\
                 5:devices:{scope}\n4:memory:{memory}\n2:cpuacct:/\n1:cpu:{cpu}\n0::{scope}\n"
            )
        };
        assert!(placed_in(&text(scope, scope), unit));
        // systemd has moved it in the named hierarchy, not yet in memory's:
        // its memory limit is not around it yet.
        assert!(!placed_in(&text("/system.slice/corral.service", scope), unit));
        assert!(!placed_in(&text(scope, "/system.slice"), unit));
        // cgroup v2 alone.
        assert!(placed_in(&format!("0::{scope}\n"), unit));
        assert!(!placed_in("0::/system.slice/corral.service\n", unit));
        assert!(!placed_in("", unit));
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("corral-cg-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn v1_hybrid_layout() {
        let root = tmp("v1");
        let scope = "corral.slice/corral-kid.slice/corral-homework-1.scope";
        for (ctl, files) in [
            (
                "memory",
                vec![
                    ("memory.usage_in_bytes", "1000\n"),
                    ("memory.max_usage_in_bytes", "5000\n"),
                    ("memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n"),
                ],
            ),
            ("cpuacct", vec![("cpuacct.usage", "3000000\n")]),
            ("pids", vec![("pids.current", "4\n"), ("pids.events", "max 7\n")]),
        ] {
            let d = root.join(ctl).join(scope);
            std::fs::create_dir_all(&d).unwrap();
            for (f, v) in files {
                std::fs::write(d.join(f), v).unwrap();
            }
        }
        let proc = format!(
            "12:pids:/{scope}\n9:memory:/{scope}\n4:cpu,cpuacct:/{scope}\n1:name=systemd:/{scope}\n0::/{scope}\n"
        );
        let loc = locate(&root, &proc);
        assert!(loc.unified.is_none(), "hybrid: the unified line has no controllers");
        let s = stats(&loc);
        assert_eq!(s.memory_current, Some(1000));
        assert_eq!(s.memory_peak, Some(5000));
        assert_eq!(s.cpu_usage_us, Some(3000));
        assert_eq!(s.tasks_current, Some(4));
        assert_eq!(s.oom_kills, Some(2));
        assert_eq!(s.tasks_refused, Some(7));
        assert_eq!(
            limit_counts(&loc),
            LimitCounts { oom_kills: Some(2), tasks_refused: Some(7), memory_max_hits: None },
            "no memory.failcnt here"
        );
        std::fs::write(root.join("memory").join(scope).join("memory.failcnt"), "3\n").unwrap();
        assert_eq!(limit_counts(&loc).memory_max_hits, Some(3));
        // cpuacct left at the root group (cpu and cpuacct mounted apart):
        // no CPU figure rather than the whole machine's.
        let apart = locate(&root, &format!("2:cpuacct:/\n1:cpu:/{scope}\n4:memory:/{scope}\n"));
        assert_eq!(apart.cpu, None);
        assert!(apart.memory.is_some());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_peak_that_cannot_be_reset_counts_only_when_it_rose() {
        let root = tmp("peak");
        let d = root.join("memory/scope");
        std::fs::create_dir_all(&d).unwrap();
        let file = d.join("memory.max_usage_in_bytes");
        std::fs::write(&file, "5000\n").unwrap();
        let loc = Location { memory: Some(d.clone()), ..Location::default() };
        // A plain file takes the reset; pretend it did not.
        let watch = PeakWatch::Since { path: file.clone(), before: 5000 };
        assert_eq!(watch.read(), None, "an unchanged peak may be an earlier call's");
        std::fs::write(&file, "9000\n").unwrap();
        assert_eq!(watch.read(), Some((9000, "memory.max_usage_in_bytes")));
        assert!(matches!(PeakWatch::start(&loc), Some(PeakWatch::ResetV1(_))));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn v2_layout() {
        let root = tmp("v2");
        let scope = "corral.slice/corral-kid.slice/corral-homework-1.scope";
        let d = root.join(scope);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(root.join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        for (f, v) in [
            ("memory.current", "2000\n"),
            ("memory.peak", "9000\n"),
            ("cpu.stat", "usage_usec 4242\nuser_usec 1\n"),
            ("pids.current", "3\n"),
            ("memory.events", "low 0\nhigh 0\nmax 5\noom 1\noom_kill 1\n"),
            ("pids.events", "max 0\n"),
        ] {
            std::fs::write(d.join(f), v).unwrap();
        }
        let loc = locate(&root, &format!("0::/{scope}\n"));
        // Both memory counters from one read of memory.events.
        assert_eq!(
            limit_counts(&loc),
            LimitCounts { oom_kills: Some(1), tasks_refused: Some(0), memory_max_hits: Some(5) }
        );
        let s = stats(&loc);
        assert_eq!(version(&root), "v2");
        assert_eq!(
            s,
            Stats {
                memory_current: Some(2000),
                memory_peak: Some(9000),
                cpu_usage_us: Some(4242),
                tasks_current: Some(3),
                oom_kills: Some(1),
                tasks_refused: Some(0),
                memory_max_hits: Some(5),
            }
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
