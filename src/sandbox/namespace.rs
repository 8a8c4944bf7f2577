//! Kernel namespaces of a worker (DESIGN.md decision 8): what tenants must
//! not share beyond the file system.
//!
//! The worker, still root and single-threaded, calls [`enter`] before it
//! drops its privileges. It unshares a PID, a mount and an IPC namespace
//! and forks once:
//!
//! - the **child** is PID 1 of the new PID namespace and goes on as the
//!   worker: every tool call descends from it, and when it dies, for
//!   whatever reason, the kernel kills everything left in the namespace;
//!   there are no orphans, with or without systemd. It mounts its own
//!   `/proc` (which shows only the namespace: the worker and its call), a
//!   private `noexec` `/dev/shm`, the IPC namespace's own `/dev/mqueue`,
//!   and remounts `noexec` every path a tool may read or write that no
//!   `exec` rule covers, so neither the dynamic loader nor `mmap(PROT_EXEC)`
//!   can run code from there. Its IPC namespace is its own (SysV shared
//!   memory, semaphores, message queues, POSIX queues), with
//!   `kernel.shm_rmid_forced` set, and is emptied after every call
//!   ([`clean_ipc`]).
//! - the **parent** keeps the PID the broker knows (the one its systemd
//!   scope adopted and `corral status` shows). It drops its privileges like
//!   the worker, arms a parent-death signal, and waits: when it is killed
//!   (or the broker dies, which kills it), its child gets SIGKILL through
//!   its own parent-death signal, and with it the whole namespace. When the
//!   child ends, the parent ends the same way, so the broker reads the
//!   worker's real exit status.
//!
//! Nothing of this is a container: the root file system, the network and
//! the users are the host's.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use super::spec::SandboxSpec;
use super::sys::{self, Forked, IpcKind};
use super::{creds, seccomp, SandboxError};

/// What [`enter`] set up, for the worker's report.
#[derive(Debug, Default)]
pub struct Report {
    pub namespaces: Vec<String>,
    pub noexec: Vec<PathBuf>,
    /// `/dev/mqueue` of the worker's IPC namespace, when mounted: the
    /// worker's Landlock layer must let it list the queues there.
    pub mqueue: Option<PathBuf>,
    /// A pidfd on the stand-in parent: the worker is orphaned when it is
    /// readable (`getppid` says 0 across a PID namespace).
    pub parent: Option<OwnedFd>,
    pub notes: Vec<String>,
}

impl Report {
    /// Whether the worker's parent (the stand-in, or the broker when there
    /// are no namespaces) is still alive.
    pub fn parent_alive(&self, broker_pid: u32) -> bool {
        match &self.parent {
            Some(fd) => !sys::pidfd_exited(fd.as_fd()),
            None => nix::unistd::getppid().as_raw() == i32::try_from(broker_pid).unwrap_or(-1),
        }
    }
}

fn ns_err(what: &'static str) -> impl Fn(std::io::Error) -> SandboxError {
    move |e| SandboxError::Namespace(what, e)
}

/// Gives the calling worker its namespaces. Returns in the worker (the
/// child, PID 1 of the new PID namespace); the parent never returns.
///
/// INVARIANT: called single-threaded, as root, before the privilege drop.
/// When the worker is not root (a broker run by an ordinary user, which
/// has no tenants to keep apart) there are no namespaces, and the report
/// says so.
pub fn enter(spec: &SandboxSpec) -> Result<Report, SandboxError> {
    if !nix::unistd::Uid::effective().is_root() {
        return Ok(Report {
            notes: vec![
                "no namespaces: the broker is not root, so its workers share the host's /proc, IPC and mounts".into()
            ],
            ..Report::default()
        });
    }
    let me = sys::pidfd_open(libc::pid_t::try_from(std::process::id()).unwrap_or(-1))
        .map_err(ns_err("open a pidfd on the worker"))?;
    sys::unshare(libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWIPC).map_err(ns_err("unshare"))?;
    match sys::fork().map_err(ns_err("fork into the new PID namespace"))? {
        Forked::Parent(child) => stand_in(spec, child),
        Forked::Child => {
            // The parent may have died before the signal was armed.
            sys::set_parent_death_signal(libc::SIGKILL).map_err(ns_err("arm the parent-death signal"))?;
            if sys::pidfd_exited(me.as_fd()) {
                return Err(SandboxError::Orphaned);
            }
            let mut report = mounts(spec)?;
            report.namespaces = vec!["pid".into(), "mount".into(), "ipc".into()];
            report.parent = Some(me);
            Ok(report)
        }
    }
}

/// The parent's life: confined like the worker, it waits for the worker and
/// ends as it ended. Never returns.
fn stand_in(spec: &SandboxSpec, child: libc::pid_t) -> ! {
    // Nothing but stdio: the broker socket belongs to the worker alone.
    let _ = sys::close_fds_from(3);
    let broker = i32::try_from(spec.broker_pid).unwrap_or(-1);
    let parent_alive = || nix::unistd::getppid().as_raw() == broker;
    let confined =
        creds::drop_privileges(spec.credentials.as_ref(), &parent_alive).and_then(|_| seccomp::install(false));
    if let Err(e) = confined {
        tracing::error!("the worker's stand-in could not confine itself: {e}");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child), nix::sys::signal::Signal::SIGKILL);
        sys::exit_now(1);
    }
    match sys::wait_status(child) {
        Ok(status) if libc::WIFEXITED(status) => sys::exit_now(libc::WEXITSTATUS(status)),
        Ok(status) if libc::WIFSIGNALED(status) => sys::die_like(libc::WTERMSIG(status)),
        _ => sys::exit_now(1),
    }
}

/// Whether `path` is `base` or beneath it.
fn beneath(path: &Path, base: &Path) -> bool {
    path.starts_with(base)
}

/// The mounts of the worker's namespace (see the module docs).
fn mounts(spec: &SandboxSpec) -> Result<Report, SandboxError> {
    let mut report = Report::default();
    // Nothing mounted here may propagate back to the host.
    sys::mount(None, Path::new("/"), None, libc::MS_REC | libc::MS_PRIVATE, None)
        .map_err(ns_err("make the mount namespace private"))?;
    let hidden = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    sys::mount(Some("proc"), Path::new("/proc"), Some("proc"), hidden, None)
        .map_err(ns_err("mount /proc for the PID namespace"))?;
    // Per IPC namespace: a segment nobody has attached is removed at once.
    std::fs::write("/proc/sys/kernel/shm_rmid_forced", "1").map_err(ns_err("set kernel.shm_rmid_forced"))?;
    // The sysctls of the new /proc stay read-only, as the host's are under
    // ProtectKernelTunables=.
    let sysctl = Path::new("/proc/sys");
    sys::mount(Some("/proc/sys"), sysctl, None, libc::MS_BIND | libc::MS_REC, None)
        .and_then(|()| sys::mount_setattr(sysctl, sys::MOUNT_ATTR_RDONLY, 0))
        .map_err(ns_err("make /proc/sys read-only"))?;

    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        let size = spec.tool.address_space_max.map(|b| format!(",size={b}")).unwrap_or_default();
        sys::mount(Some("shm"), shm, Some("tmpfs"), hidden, Some(&format!("mode=1777{size}")))
            .map_err(ns_err("mount a private /dev/shm"))?;
        report.noexec.push(shm.to_path_buf());
    } else {
        report.notes.push("/dev/shm does not exist here: POSIX shared memory has no file system to live in".into());
    }
    // The IPC namespace's POSIX queues, listed after each call to remove
    // them: at /dev/mqueue, or inside the private /dev/shm where the host
    // has none (never a directory created on the host's /dev).
    let mq = if Path::new("/dev/mqueue").is_dir() {
        Some(PathBuf::from("/dev/mqueue"))
    } else if report.noexec.iter().any(|p| p == shm) {
        let dir = shm.join(".mqueue");
        std::fs::create_dir(&dir).map_err(ns_err("create a mount point for the POSIX queues"))?;
        Some(dir)
    } else {
        None
    };
    match mq {
        Some(dir) => {
            sys::mount(Some("mqueue"), &dir, Some("mqueue"), hidden, None)
                .map_err(ns_err("mount the IPC namespace's POSIX queues"))?;
            report.mqueue = Some(dir);
        }
        None => report.notes.push(
            "neither /dev/mqueue nor /dev/shm exists here: POSIX message queues a call leaves are removed only \
             when its worker ends"
                .into(),
        ),
    }
    noexec(spec, &mut report)?;
    Ok(report)
}

/// Remounts `noexec` every path a tool may read or write that no `exec` rule
/// covers, then gives exec back to the `exec` paths beneath them.
fn noexec(spec: &SandboxSpec, report: &mut Report) -> Result<(), SandboxError> {
    let real = |paths: &[PathBuf]| -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = paths.iter().filter_map(|p| std::fs::canonicalize(p).ok()).collect();
        v.sort();
        v.dedup();
        v
    };
    let exec = real(&spec.exec);
    let mut visible = real(&spec.read);
    visible.extend(real(&spec.write));
    visible.sort();
    visible.dedup();
    // Already noexec as mounted here: /proc (ours), devices are not code.
    let skip = |p: &Path| beneath(p, Path::new("/proc")) || beneath(p, Path::new("/dev"));
    // Was each exec path executable before we touched anything?
    let exec_before: Vec<(PathBuf, bool)> = exec.iter().map(|e| (e.clone(), !sys::is_noexec(e))).collect();
    let mut done: Vec<PathBuf> = Vec::new();
    for p in &visible {
        if skip(p) || exec.iter().any(|e| beneath(p, e)) || done.iter().any(|d| beneath(p, d)) {
            continue;
        }
        bind_with(p, sys::MOUNT_ATTR_NOEXEC | sys::MOUNT_ATTR_NOSUID, 0)?;
        done.push(p.clone());
    }
    for (e, was_exec) in &exec_before {
        if *was_exec && done.iter().any(|d| beneath(e, d)) {
            bind_with(e, 0, sys::MOUNT_ATTR_NOEXEC)?;
        }
    }
    report.noexec.extend(done);
    Ok(())
}

/// Bind-mounts `path` onto itself (with what is mounted below it) and sets
/// and clears mount attributes on the new mounts only.
fn bind_with(path: &Path, set: u64, clear: u64) -> Result<(), SandboxError> {
    let src = path.to_str().ok_or(SandboxError::Namespace(
        "bind a path that is not UTF-8",
        std::io::Error::from_raw_os_error(libc::EINVAL),
    ))?;
    sys::mount(Some(src), path, None, libc::MS_BIND | libc::MS_REC, None)
        .and_then(|()| sys::mount_setattr(path, set, clear))
        .map_err(|e| SandboxError::NoExec(path.to_path_buf(), e))
}

/// Empties the worker's IPC namespace after a call: every System V shared
/// memory segment, message queue and semaphore set, and every POSIX
/// message queue. Returns how many objects were removed, and the ones
/// that could not be.
pub fn clean_ipc(mqueue: Option<&Path>) -> (usize, Vec<String>) {
    let mut removed = 0;
    let mut failed = Vec::new();
    for (file, kind) in [("shm", IpcKind::Shm), ("msg", IpcKind::Msg), ("sem", IpcKind::Sem)] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/sysvipc/{file}")) else {
            continue;
        };
        // "key id perms …", one header line.
        for id in text.lines().skip(1).filter_map(|l| l.split_whitespace().nth(1)?.parse::<libc::c_int>().ok()) {
            match sys::ipc_remove(kind, id) {
                Ok(()) => removed += 1,
                Err(e) => failed.push(format!("{file} {id}: {e}")),
            }
        }
    }
    if let Some(dir) = mqueue {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for name in entries.flatten().filter_map(|e| e.file_name().into_string().ok()) {
                match sys::mq_unlink(&name) {
                    Ok(()) => removed += 1,
                    Err(e) => failed.push(format!("mqueue /{name}: {e}")),
                }
            }
        }
    }
    (removed, failed)
}
