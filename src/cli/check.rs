//! `corral policy check DIR`: validate every policy and say, per workflow,
//! what this kernel will enforce of it.

use std::fmt::Write as _;
use std::path::Path;

use crate::policy::{self, format_duration, Workflow};
use crate::protocol::Requirement;
use crate::sandbox::{self, KernelSupport};

/// The broker's default `--worker-user`.
const DEFAULT_WORKER_USER: &str = "corral-worker";

/// Prints the report; returns the exit code (1 on any error). `members`:
/// a members file that must exist; without it, the default one when it
/// exists.
pub fn run(dir: &Path, members: Option<&Path>) -> u8 {
    let loaded = match policy::load_dir(dir) {
        Ok(p) => p,
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("error: {e}");
            }
            eprintln!("{} error(s) in {}", errors.0.len(), dir.display());
            return 1;
        }
    };
    let kernel = sandbox::probe();
    println!(
        "kernel: Landlock ABI {}{}, seccomp {}",
        kernel.landlock_abi,
        if kernel.landlock_abi == 0 { " (none)" } else { "" },
        if kernel.seccomp { "available" } else { "missing" }
    );
    let mut failed = 0;
    for wf in &loaded.workflows {
        match describe(wf, kernel) {
            Ok(text) => print!("\n{text}"),
            Err(e) => {
                failed += 1;
                eprintln!("\nerror: {}: workflow {} cannot start on this kernel: {e}", wf.source.display(), wf.name);
            }
        }
    }
    for w in &loaded.warnings {
        eprintln!("warning: {w}");
    }
    // Across workflows: without Landlock scopes, no two may share a user.
    let uses: Vec<sandbox::UserUse> = loaded
        .workflows
        .iter()
        .filter_map(|wf| {
            let user = wf.user.clone().unwrap_or_else(|| DEFAULT_WORKER_USER.to_string());
            let uid = nix::unistd::User::from_name(&user).ok().flatten()?.uid.as_raw();
            let required = wf.sandbox.landlock == policy::Requirement::Required;
            Some(sandbox::UserUse { workflow: wf.name.to_string(), tenant: wf.tenant.to_string(), uid, user, required })
        })
        .collect();
    for (name, refuse, message) in sandbox::shared_user_conflicts(kernel.landlock_abi, &uses) {
        if refuse {
            failed += 1;
            eprintln!("\nerror: workflow {name} cannot start on this kernel: {message}");
        } else {
            eprintln!("warning: {message}");
        }
    }
    let members_file = members.unwrap_or(Path::new(policy::members::DEFAULT_MEMBERS));
    match policy::load_members(members_file, members.is_some(), &loaded) {
        Ok(m) if m.source.is_some() => println!(
            "\nmembers {}: {} member(s), {} delegate(s), {} tenant limit(s)",
            members_file.display(),
            m.members.len(),
            m.delegates.len(),
            m.tenants.len()
        ),
        Ok(_) => {}
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("error: {e}");
            }
            failed += 1;
        }
    }
    if failed > 0 {
        return 1;
    }
    println!("\n{} workflow(s) OK", loaded.workflows.len());
    0
}

fn describe(wf: &Workflow, kernel: KernelSupport) -> Result<String, String> {
    if let (Some(max), Err(why)) = (&wf.limits.disk_max, crate::broker::quota::host_support()) {
        return Err(format!("limits.disk_max {max} is set, and {why}"));
    }
    describe_rows(wf, kernel).map_err(|e| e.to_string())
}

fn describe_rows(wf: &Workflow, kernel: KernelSupport) -> Result<String, sandbox::SandboxError> {
    let req = match wf.sandbox.landlock {
        policy::Requirement::Required => Requirement::Required,
        policy::Requirement::BestEffort => Requirement::BestEffort,
    };
    let sb = &wf.sandbox;
    let tcp = !sb.tcp_connect.is_empty() || !sb.tcp_bind.is_empty();
    let rows = sandbox::enforcement(req, tcp, kernel.landlock_abi)?;
    let l = &wf.limits;
    let mut out = String::new();
    let _ = writeln!(out, "{} ({})", wf.name, wf.source.display());
    let _ = writeln!(
        out,
        "  tenant {}, runs as {}, clients: users {:?} groups {:?}",
        wf.tenant,
        wf.user.as_deref().unwrap_or("the broker's default worker user"),
        wf.clients.users,
        wf.clients.groups
    );
    let paths = |v: &[policy::PathTemplate]| v.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(" ");
    let _ = writeln!(out, "  read   {}", paths(&sb.read));
    let _ = writeln!(out, "  write  {}", paths(&sb.write));
    let _ = writeln!(out, "  exec   {}", paths(&sb.exec));
    // Placeholders such as {workspace} have no interpreter in them.
    let exec_dirs: Vec<std::path::PathBuf> = sb.exec.iter().map(|p| std::path::PathBuf::from(p.as_str())).collect();
    let interpreters = sandbox::interpreters(&exec_dirs);
    if !interpreters.is_empty() {
        let _ = writeln!(
            out,
            "  interpreters allowed by exec: {} (each runs whatever script it is given: exec rules bind \
             binaries, not what an interpreter reads)",
            interpreters.join(", ")
        );
    }
    let wrote: Vec<&str> = sb
        .write
        .iter()
        .filter(|w| exec_dirs.iter().any(|e| std::path::Path::new(w.as_str()).starts_with(e)))
        .map(|w| w.as_str())
        .collect();
    if !wrote.is_empty() {
        let _ = writeln!(
            out,
            "  RUNS CODE IT WROTE: {} is writable and in exec: tools may build programs there and run them \
             (compilers, venvs, npm scripts); what runs is still bound by this sandbox",
            wrote.join(" ")
        );
    }
    let _ = writeln!(out, "  tcp    connect {:?} bind {:?}", sb.tcp_connect, sb.tcp_bind);
    let cpu = l.cpu_quota.as_ref().map_or("none".to_string(), ToString::to_string);
    let _ = writeln!(
        out,
        "  limits memory {}, tasks {}, cpu {cpu}, {} per call, output {} per stream, files up to {}, {} open files, disk {}",
        l.memory_max,
        l.tasks_max,
        format_duration(l.call_timeout),
        l.output_max,
        l.file_size_max,
        l.open_files_max,
        l.disk_max.map_or("unlimited".to_string(), |d| d.to_string())
    );
    let _ = writeln!(out, "  promise    held by (Landlock ABI {}, {})", kernel.landlock_abi, resources_here().1);
    let disk = crate::broker::setup::disk_row(wf);
    for r in rows.iter().chain(&sandbox::resource_rows(resources_here().0)).chain([&disk]) {
        let _ = writeln!(out, "  {:<10} {}", r.promise, r.by);
    }
    let _ = writeln!(
        out,
        "  {:<10} min_idle {}, max_workers {}, queue {}",
        "pool", wf.pool.min_idle, wf.pool.max_workers, wf.pool.queue
    );
    if let Some(llm) = &wf.llm {
        let _ = writeln!(out, "  llm        {} ({}): {}", llm.base_url, llm.model, llm.endpoint.describe());
        let _ = writeln!(out, "             now: {}", endpoint_now(&llm.endpoint));
    }
    Ok(out)
}

/// What the broker's check of a model endpoint would say right now.
pub(crate) fn endpoint_now(endpoint: &policy::Endpoint) -> String {
    use crate::broker::llm::{check_endpoint, Distrust};
    match check_endpoint(endpoint, Path::new("/proc")) {
        Ok(_) => "trusted".into(),
        Err(Distrust::Absent(why)) => format!("not running ({why})"),
        Err(Distrust::Untrusted(why)) => format!("REFUSED: {why}"),
    }
}

/// Whether a broker here would get cgroups (systemd booted) and which version.
fn resources_here() -> (Option<&'static str>, String) {
    let cg = crate::cgroup::version(Path::new(crate::cgroup::ROOT));
    if Path::new("/run/systemd/system").is_dir() {
        (Some(cg), format!("systemd scopes on cgroup {cg}"))
    } else {
        (None, "no systemd here: rlimits".to_string())
    }
}
