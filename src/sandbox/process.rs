//! Starting processes: the worker (from the broker) and tool calls (from a
//! worker), and ending a tool call's whole process tree.

use std::collections::BTreeSet;
use std::io;
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::landlock::Prepared;
use super::spec::{Requirement, ToolLimits};

/// The descriptor number a worker finds its broker socket on.
pub const WORKER_FD: RawFd = 3;

/// Arranges for `fd` to be the child's descriptor [`WORKER_FD`].
///
/// The broker is multi-threaded, so the hook may only do async-signal-safe
/// work: `dup2` and `fcntl`, no allocation.
pub fn pass_fd_as_worker_fd(cmd: &mut tokio::process::Command, fd: RawFd) {
    let hook = move || {
        if fd == WORKER_FD {
            // SAFETY: fcntl on a descriptor we own; async-signal-safe.
            if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0 {
                return Err(io::Error::last_os_error());
            }
        // SAFETY: dup2 is async-signal-safe; fd is open in the child (it was
        // open in the parent at fork) and WORKER_FD is ours to replace.
        } else if unsafe { libc::dup2(fd, WORKER_FD) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the hook is async-signal-safe (see above), as required between
    // fork and exec in a multi-threaded process.
    unsafe { cmd.pre_exec(hook) };
}

/// Installs the tool-call hook on `cmd`: rlimits, the lowest CPU priority
/// when `lowest_priority`, then the tool's own Landlock layer, in the child
/// after fork and before exec.
///
/// INVARIANT: only the worker calls this, and the worker is single-threaded
/// (it never starts a runtime or a thread), so the child of its fork may
/// allocate; the Landlock ruleset itself was prepared before the fork.
pub fn install_tool_hook(
    cmd: &mut std::process::Command,
    limits: &ToolLimits,
    layer: Prepared,
    requirement: Requirement,
    lowest_priority: bool,
) {
    let limits = limits.clone();
    let mut layer = Some(layer);
    let hook = move || {
        // A tool dies with its worker, even if the worker is killed outright.
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
        let nofile = limits.open_files_max;
        setrlimit(Resource::RLIMIT_NOFILE, nofile, nofile)?;
        setrlimit(Resource::RLIMIT_FSIZE, limits.file_size_max, limits.file_size_max)?;
        setrlimit(Resource::RLIMIT_CORE, 0, 0)?;
        if let Some(bytes) = limits.address_space_max {
            setrlimit(Resource::RLIMIT_AS, bytes, bytes)?;
        }
        if let Some(n) = limits.processes_max {
            setrlimit(Resource::RLIMIT_NPROC, n, n)?;
        }
        if lowest_priority {
            // No CPU quota bounds this call: it runs only when the CPU has
            // nothing else to do. RLIMIT_NICE 0 keeps it from lowering its
            // nice value or leaving SCHED_IDLE; where SCHED_IDLE is refused
            // (a real-time-only host, a filter), nice 19 still holds.
            setrlimit(Resource::RLIMIT_NICE, 0, 0)?;
            super::sys::set_nice(19)?;
            let _ = super::sys::sched_idle();
        }
        if let Some(layer) = layer.take() {
            layer.enforce(requirement).map_err(|e| io::Error::new(io::ErrorKind::PermissionDenied, e.to_string()))?;
        }
        Ok(())
    };
    // SAFETY: see the INVARIANT above: the forking process is single-threaded,
    // so no lock can be held by another thread across the fork.
    unsafe { cmd.pre_exec(hook) };
}

/// The direct children of `pid`, from `/proc/PID/task/*/children`.
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            out.extend(text.split_whitespace().filter_map(|s| s.parse::<u32>().ok()));
        }
    }
    out
}

/// Every descendant of the calling process.
fn descendants() -> BTreeSet<u32> {
    let mut seen = BTreeSet::new();
    let mut todo = children_of(std::process::id());
    while let Some(pid) = todo.pop() {
        if seen.insert(pid) {
            todo.extend(children_of(pid));
        }
    }
    seen
}

/// Kills every descendant of the calling process and reaps them all, also
/// those that left their process group or session (the caller is a child
/// subreaper, so orphans come back to it). Returns how many it killed, or
/// an error if some still lived after `grace`.
pub fn kill_all_descendants(grace: Duration) -> io::Result<usize> {
    let deadline = Instant::now() + grace;
    let mut killed = BTreeSet::new();
    loop {
        let pids = descendants();
        for &pid in &pids {
            if let Ok(raw) = i32::try_from(pid) {
                // ESRCH (already gone) is fine.
                let _ = kill(Pid::from_raw(raw), Signal::SIGKILL);
            }
        }
        killed.extend(pids);
        // Reap whatever has died so far.
        loop {
            match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => break,
                Ok(_) => {}
                Err(Errno::ECHILD) => return Ok(killed.len()),
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if Instant::now() >= deadline {
            return Err(io::Error::other(format!(
                "{} processes still alive {grace:?} after SIGKILL",
                descendants().len()
            )));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Takes the broker socket a worker inherited on [`WORKER_FD`].
pub fn take_worker_socket() -> io::Result<std::os::unix::net::UnixStream> {
    use std::os::fd::FromRawFd;
    let mut ty: libc::c_int = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4);
    // SAFETY: getsockopt writes at most `len` bytes into `ty`, a live local;
    // it only inspects the descriptor.
    let ret = unsafe { libc::getsockopt(WORKER_FD, libc::SOL_SOCKET, libc::SO_TYPE, (&raw mut ty).cast(), &mut len) };
    if ret < 0 || ty != libc::SOCK_STREAM {
        return Err(io::Error::other(format!(
            "descriptor {WORKER_FD} is not a stream socket: `corral worker` is started by the broker, not by hand"
        )));
    }
    // dup2 in the broker cleared close-on-exec; set it again, or every tool
    // call would inherit the broker socket and could speak for the worker.
    // SAFETY: fcntl on a descriptor we own; no pointers.
    if unsafe { libc::fcntl(WORKER_FD, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: WORKER_FD is an open stream socket (checked above) that the
    // broker handed to this process alone; nothing else in the process owns it.
    Ok(unsafe { std::os::unix::net::UnixStream::from_raw_fd(WORKER_FD) })
}
