//! Starting processes: the worker (from the broker) and tool calls (from a
//! worker), and ending a tool call's whole process tree.

use std::collections::BTreeSet;
use std::io;
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// The descriptor number a worker finds its broker socket on.
pub const WORKER_FD: RawFd = 3;

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
    // The common end of a call: its command left nothing. No child at all
    // means no descendant (a living descendant's chain of parents always
    // ends at one of our children: we are a subreaper), so the /proc walk
    // below is spared.
    // (A child this reaps is one fewer for the loop below.)
    if let Err(Errno::ECHILD) = waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
        return Ok(0);
    }
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

/// A worker process the broker started, with a pidfd on it.
pub struct SpawnedWorker {
    pub pid: u32,
    pub pidfd: std::os::fd::OwnedFd,
    /// Whether it is PID 1 of its own PID, mount and IPC namespaces.
    pub namespaces: bool,
}

/// The namespaces every worker gets when the broker is root: PID (its own /proc, and its calls die with it), mount
/// (noexec paths, /proc, /dev/shm) and IPC (SysV and POSIX queues).
pub const WORKER_NAMESPACES: libc::c_int = libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWIPC;

fn cstr(bytes: &[u8]) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(bytes).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Starts `exe worker` from the (multi-threaded) broker: with `sock` as its
/// descriptor [`WORKER_FD`], stdin and stdout on `/dev/null`, stderr
/// inherited, its own process group, a parent-death signal, an environment
/// of `RUST_LOG` only, and — when `namespaces` — as PID 1 of new PID, mount
/// and IPC namespaces ([`WORKER_NAMESPACES`]). (A worker's own network
/// namespace comes from the thread that clones it: [`super::net`].)
///
/// Everything is prepared before the `clone`; the child makes only
/// async-signal-safe system calls (`dup2`, `fcntl`, `setpgid`, `prctl`,
/// `sigprocmask`, `execve`, `_exit`), as required in a copy of a
/// multi-threaded process.
pub fn spawn_worker(
    exe: &std::path::Path,
    log_filter: &str,
    sock: RawFd,
    namespaces: bool,
) -> io::Result<SpawnedWorker> {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;

    let exe_c = cstr(exe.as_os_str().as_bytes())?;
    let arg1 = cstr(b"worker")?;
    let env0 = cstr(format!("RUST_LOG={log_filter}").as_bytes())?;
    let argv: [*const libc::c_char; 3] = [exe_c.as_ptr(), arg1.as_ptr(), std::ptr::null()];
    let envp: [*const libc::c_char; 2] = [env0.as_ptr(), std::ptr::null()];
    let devnull = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null")?;
    let null_fd = std::os::fd::AsRawFd::as_raw_fd(&devnull);
    // SAFETY: sigset_t is plain data; sigemptyset initializes it.
    let mut empty: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer is to a live local of the right type.
    unsafe { libc::sigemptyset(&mut empty) };

    let flags = libc::CLONE_PIDFD | if namespaces { WORKER_NAMESPACES } else { 0 };
    let mut pidfd: libc::c_int = -1;
    // SAFETY: clone without CLONE_VM and with a NULL stack behaves like
    // fork: the child gets a copy of the address space and returns here on
    // its copy of the stack. With CLONE_PIDFD the kernel writes the pidfd
    // into `pidfd` (the parent_tid argument), a live local. The child below
    // only makes async-signal-safe system calls on memory prepared before
    // the clone, and never returns from this function.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone,
            libc::c_ulong::try_from(flags | libc::SIGCHLD).unwrap_or(0),
            std::ptr::null_mut::<libc::c_void>(),
            &raw mut pidfd,
            std::ptr::null_mut::<libc::c_int>(),
            0 as libc::c_ulong,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    if ret == 0 {
        // The child. SAFETY: async-signal-safe system calls on descriptors
        // and memory that exist in this copy of the process; every path
        // ends in execve or _exit.
        unsafe {
            let fail = |step: libc::c_int| -> ! { libc::_exit(120 + step) };
            if libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) < 0 {
                fail(0);
            }
            // Every disposition at its default: a signal the broker's own
            // parent ignored (a shell, a test harness) is ignored by the
            // broker too, and would be by every tool. The raw system call
            // reaches the signals libc reserves (32, 33). The zeroed struct
            // is SIG_DFL with no flags on every architecture's layout;
            // SIGKILL and SIGSTOP refuse, as they should.
            let default = [0u64; 4];
            for sig in 1..=64 {
                libc::syscall(libc::SYS_rt_sigaction, sig, default.as_ptr(), std::ptr::null_mut::<u64>(), 8);
            }
            if libc::dup2(null_fd, 0) < 0 || libc::dup2(null_fd, 1) < 0 {
                fail(1);
            }
            if sock == WORKER_FD {
                if libc::fcntl(sock, libc::F_SETFD, 0) < 0 {
                    fail(2);
                }
            } else if libc::dup2(sock, WORKER_FD) < 0 {
                fail(2);
            }
            if libc::setpgid(0, 0) < 0 {
                fail(3);
            }
            // It dies with the broker even before it arms its own.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) < 0 {
                fail(4);
            }
            libc::execve(exe_c.as_ptr(), argv.as_ptr(), envp.as_ptr());
            fail(5)
        }
    }
    drop(devnull);
    let pid = u32::try_from(ret).map_err(|_| io::Error::other("clone returned an impossible pid"))?;
    // SAFETY: the kernel created this descriptor for us (CLONE_PIDFD);
    // nothing else owns it.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    Ok(SpawnedWorker { pid, pidfd, namespaces })
}

/// The wait status of child `pid` if it has ended (reaping it), without
/// blocking.
pub fn try_reap(pid: u32) -> io::Result<Option<libc::c_int>> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: the pointer is to a live local of the right type.
        let ret = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        match ret {
            0 => return Ok(None),
            r if r > 0 => return Ok(Some(status)),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// Registers a pidfd with the tokio reactor: readable once its process has
/// ended. Must be called inside a tokio runtime.
pub fn watch_pidfd(fd: std::os::fd::OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    // SAFETY: `fd` is an open descriptor owned by the value handed to the
    // AsyncFd, which keeps it open (and unregisters it) for as long as the
    // registration lives; nothing else closes it.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

/// Whether this process may give a worker its namespaces: starts
/// `exe --version` after `unshare` of [`WORKER_NAMESPACES`] (the same
/// permission checks as the broker's clone: capabilities, a service's
/// `RestrictNamespaces=`).
pub fn probe_namespaces(exe: &std::path::Path) -> io::Result<()> {
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--version").stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null());
    let hook = || {
        // SAFETY: unshare is a plain system call, async-signal-safe.
        if unsafe { libc::unshare(WORKER_NAMESPACES) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the hook makes one async-signal-safe system call and
    // allocates nothing, as required between fork and exec.
    unsafe { cmd.pre_exec(hook) };
    let status = cmd.status()?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!("the probe ended with {status}")))
    }
}
