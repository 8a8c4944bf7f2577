//! `corral status`: the broker's workflows and workers.

use std::fmt::Write as _;
use std::path::Path;

use hyper::Method;

use super::{describe_error, EXIT_CORRAL};
use crate::api::{Status, STATUS_PATH};
use crate::client;
use crate::protocol::EffectiveSandbox;

pub async fn run(socket: &Path, json: bool) -> anyhow::Result<u8> {
    let (status, bytes) = client::request(socket, Method::GET, STATUS_PATH, None).await?;
    if !status.is_success() {
        eprintln!("corral: {}", describe_error(status, &bytes));
        return Ok(EXIT_CORRAL);
    }
    if json {
        println!("{}", String::from_utf8_lossy(&bytes));
        return Ok(0);
    }
    let st: Status = serde_json::from_slice(&bytes)?;
    print!("{}", render(&st));
    Ok(0)
}

fn sandbox_summary(s: &EffectiveSandbox) -> String {
    let mut parts = vec![format!("uid {}", s.uid), format!("landlock {} (ABI {})", s.landlock, s.landlock_abi)];
    if s.landlock_tcp {
        parts.push("tcp ports".into());
    }
    if s.landlock_scopes {
        parts.push("scoped signals+abstract sockets".into());
    }
    if s.seccomp {
        parts.push("seccomp".into());
    }
    parts.push(if s.network_blocked { "no network".into() } else { "tcp allowed by policy".into() });
    if s.capabilities_cleared && s.no_new_privs && s.non_dumpable {
        parts.push("no caps, no_new_privs, non-dumpable".into());
    }
    if s.namespaces.is_empty() {
        parts.push("NO namespaces".into());
    } else {
        parts.push(format!("own {} namespaces", s.namespaces.join("+")));
    }
    if !s.noexec.is_empty() {
        parts
            .push(format!("noexec {}", s.noexec.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" ")));
    }
    if s.cpu_idle {
        parts.push("tools SCHED_IDLE".into());
    }
    if let Some(adj) = s.oom_score_adj {
        parts.push(format!("oom_score_adj {adj}"));
    }
    parts.join(", ")
}

/// The human-readable table.
pub fn render(st: &Status) -> String {
    let mut out = String::new();
    let b = &st.broker;
    let _ = writeln!(
        out,
        "broker pid {} (corral {}), up {}s; kernel: Landlock ABI {}, seccomp {}",
        b.pid,
        b.version,
        b.uptime_s,
        b.landlock_abi,
        if b.seccomp { "yes" } else { "no" }
    );
    let _ = writeln!(out, "resource control: {}", b.resource_control);
    let _ = writeln!(out);
    let _ = writeln!(out, "{:<16} {:<10} {:<16} {:>9}  WORKERS", "WORKFLOW", "TENANT", "USER", "QUEUE");
    for w in &st.workflows {
        let user = w.user.as_deref().unwrap_or("(broker's)");
        let _ = writeln!(
            out,
            "{:<16} {:<10} {:<16} {:>9}  {} (min idle {}, max {})",
            w.name,
            w.tenant,
            user,
            format!("{}/{}", w.queue_depth, w.queue_capacity),
            w.workers.len(),
            w.min_idle,
            w.max_workers
        );
        if let Some(why) = &w.unavailable {
            let _ = writeln!(out, "    UNAVAILABLE: {why}");
        }
        for r in &w.enforcement {
            let _ = writeln!(out, "    {:<10} {}", r.promise, r.by);
        }
        if let Some(d) = &w.disk {
            let mib = |b: u64| format!("{:.1}M", b as f64 / 1048576.0);
            match (d.used_bytes, d.size_bytes) {
                (Some(used), Some(size)) => {
                    let _ = writeln!(
                        out,
                        "    workspace  {} used of disk_max {} ({} for files)",
                        mib(used),
                        d.disk_max,
                        mib(size)
                    );
                }
                _ => {
                    let _ = writeln!(out, "    workspace  disk_max {}: image not mounted", d.disk_max);
                }
            }
        }
        for k in &w.workers {
            let pid = k.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
            let _ = writeln!(
                out,
                "    worker {} pid {} {} served {} restarts {}",
                k.id, pid, k.state, k.served, k.restarts
            );
            if let Some(s) = &k.sandbox {
                let _ = writeln!(out, "      sandbox: {}", sandbox_summary(s));
                for note in &s.notes {
                    let _ = writeln!(out, "      weaker than asked: {note}");
                }
            }
            if let Some(scope) = &k.scope {
                let cg = k.cgroup.clone().unwrap_or_default();
                let mib = |b: Option<u64>| b.map(|v| format!("{:.1}M", v as f64 / 1048576.0)).unwrap_or("n/a".into());
                let cpu = match cg.cpu_usage_us {
                    Some(us) => format!("{:.0} ms", us as f64 / 1000.0),
                    None => format!("{:.0} ms in calls", k.calls_cpu_ms),
                };
                let tasks = cg.tasks_current.map(|t| t.to_string()).unwrap_or("n/a".into());
                let _ = writeln!(
                    out,
                    "      scope {scope}: memory {} (peak {}), cpu {cpu}, tasks {tasks}",
                    mib(cg.memory_current),
                    mib(cg.memory_peak)
                );
                if let Some(line) = &k.systemd_run {
                    let _ = writeln!(out, "      same limits by hand: {line}");
                }
            }
            if let Some(kill) = &k.last_kill {
                let _ = writeln!(out, "      last kill: {kill}");
            }
            if let Some(e) = &k.last_exit {
                let _ = writeln!(out, "      last exit: {e}");
            }
        }
    }
    out
}
