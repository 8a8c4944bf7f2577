//! Starting a tool call's process as `posix_spawn` does:
//! `clone(CLONE_VM | CLONE_VFORK)`, then the sandbox's steps and `execve`
//! in the child.
//!
//! Why not `fork`: a fork copies the worker's page tables, and every page
//! either process writes afterwards takes a copy-on-write fault, only for
//! the child's `execve` to throw the copy away. A child that borrows the
//! worker's memory until its `execve` costs neither (`cargo bench --bench
//! overhead`, row "its part in the worker").
//!
//! The price is discipline. The child runs on a stack of its own, in memory
//! it shares with the worker, while the worker sleeps in `clone` until the
//! child has called `execve` or exited. So the child:
//! - makes system calls only, on values prepared here before the clone: it
//!   allocates nothing, takes no lock, and drops or moves no Rust value;
//! - writes one thing the worker reads afterwards: which step failed, and
//!   its `errno`, before `_exit(127)`;
//! - starts with every signal blocked (a handler of the worker's must not
//!   run on the shared memory), and unblocks them only once the worker's
//!   handlers are back to the default disposition.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};

use libc::{c_char, c_int, c_void};

use super::landlock::ChildLayer;
use super::spec::ToolLimits;

/// What a tool child reads on its standard input.
pub enum Input<'a> {
    /// This descriptor (`/dev/null` for calls without input).
    From(BorrowedFd<'a>),
    /// A pipe: [`Spawned::stdin`] is its writing end.
    Pipe,
}

/// One tool process to start.
pub struct Tool<'a> {
    pub argv: &'a [String],
    /// The whole environment of the tool (the worker's own is not passed).
    pub env: &'a [(String, String)],
    pub dir: &'a Path,
    pub input: Input<'a>,
    pub limits: &'a ToolLimits,
    pub layer: &'a ChildLayer,
    /// `SCHED_IDLE` at nice 19 (no CPU quota bounds the call).
    pub lowest_priority: bool,
}

/// A started tool: its PID (a child of the caller, to be reaped) and the
/// worker's ends of its pipes.
pub struct Spawned {
    pub pid: libc::pid_t,
    pub stdin: Option<OwnedFd>,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// The child's steps, in order; the one that failed is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
enum Step {
    Done = 0,
    Signals,
    DeathSignal,
    Stdio,
    Group,
    Dir,
    Limits,
    Priority,
    NoNewPrivs,
    Seccomp,
    Landlock,
    Exec,
}

impl Step {
    const ALL: [Step; 12] = [
        Step::Done,
        Step::Signals,
        Step::DeathSignal,
        Step::Stdio,
        Step::Group,
        Step::Dir,
        Step::Limits,
        Step::Priority,
        Step::NoNewPrivs,
        Step::Seccomp,
        Step::Landlock,
        Step::Exec,
    ];

    fn from_u32(n: u32) -> Step {
        Step::ALL.into_iter().find(|s| *s as u32 == n).unwrap_or(Step::Exec)
    }

    fn what(self) -> &'static str {
        match self {
            Step::Done | Step::Exec => "execve",
            Step::Signals => "resetting signal dispositions",
            Step::DeathSignal => "PR_SET_PDEATHSIG",
            Step::Stdio => "dup2 of the standard descriptors",
            Step::Group => "setpgid",
            Step::Dir => "chdir to the workspace",
            Step::Limits => "setrlimit",
            Step::Priority => "setpriority",
            Step::NoNewPrivs => "PR_SET_NO_NEW_PRIVS",
            Step::Seccomp => "the tool's seccomp guard",
            Step::Landlock => "the tool's Landlock layer",
        }
    }
}

/// Signals whose disposition the child sets back to the default before it
/// unblocks them: the worker's handlers (they must not run in the child),
/// Rust's own for stack overflows, and `SIGPIPE`, which Rust ignores and a
/// tool expects at its default (`yes | head` ends).
const RESET_SIGNALS: [c_int; 10] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGABRT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGPIPE,
    libc::SIGSEGV,
    libc::SIGBUS,
];

/// Everything the child needs, prepared by the worker; the child only
/// reads it, apart from `step`, `errno` and slot 1 of `sh_argv`.
struct Plan {
    /// Where to look for the program, in order (`execvp`'s search of the
    /// tool's own `PATH`, done here).
    candidates: Vec<*const c_char>,
    argv: Vec<*const c_char>,
    envp: Vec<*const c_char>,
    /// `/bin/sh CANDIDATE ARGS…`, for a file without `#!` (`ENOEXEC`), as
    /// `execvp` does: a null-terminated array the worker owns, slot 1 of
    /// which the child fills in.
    sh_argv: *mut *const c_char,
    dir: CString,
    /// Descriptors for 0, 1 and 2, each above 2.
    stdio: [RawFd; 3],
    limits: Vec<(libc::__rlimit_resource_t, libc::rlimit)>,
    lowest_priority: bool,
    guard: Option<libc::sock_fprog>,
    ruleset: RawFd,
    empty_mask: libc::sigset_t,
    step: AtomicU32,
    errno: AtomicI32,
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in argv, env or a path"))
}

/// A pipe whose ends both close on exec.
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1; 2];
    // SAFETY: `fds` is a live array of two ints, as pipe2 requires.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded: both descriptors are new and ours alone.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `fd` itself when it is above 2, else a copy above 2 (the child moves
/// its three descriptors onto 0, 1 and 2 in turn; a source among those
/// would be overwritten before it is used).
fn above_stdio(fd: BorrowedFd<'_>, keep: &mut Vec<OwnedFd>) -> io::Result<RawFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd.as_raw_fd());
    }
    let copy = fd.try_clone_to_owned()?;
    let raw = copy.as_raw_fd();
    if raw > 2 {
        keep.push(copy);
        return Ok(raw);
    }
    // SAFETY: F_DUPFD_CLOEXEC with an int argument; the result is ours.
    let moved = unsafe { libc::fcntl(raw, libc::F_DUPFD_CLOEXEC, 3) };
    if moved < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fcntl just made this descriptor for us.
    keep.push(unsafe { OwnedFd::from_raw_fd(moved) });
    Ok(moved)
}

/// Where `execvp` would look for `program`, given the tool's `PATH`.
fn candidates(program: &str, env: &[(String, String)]) -> io::Result<Vec<CString>> {
    if program.contains('/') {
        return Ok(vec![cstring(program.as_bytes())?]);
    }
    let path = env.iter().rev().find(|(k, _)| k == "PATH").map_or("/bin:/usr/bin", |(_, v)| v.as_str());
    path.split(':')
        .map(|dir| {
            let dir = if dir.is_empty() { "." } else { dir };
            cstring(format!("{dir}/{program}").as_bytes())
        })
        .collect()
}

fn pointers(strings: &[CString]) -> Vec<*const c_char> {
    strings.iter().map(|s| s.as_ptr()).chain(std::iter::once(std::ptr::null())).collect()
}

/// Starts `tool`: see the module's documentation.
pub fn spawn(tool: &Tool<'_>) -> io::Result<Spawned> {
    let program = tool.argv.first().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty argv"))?;
    let paths = candidates(program, tool.env)?;
    let argv: Vec<CString> = tool.argv.iter().map(|a| cstring(a.as_bytes())).collect::<io::Result<_>>()?;
    let mut env: Vec<CString> = Vec::with_capacity(tool.env.len());
    for (k, v) in tool.env {
        env.push(cstring(format!("{k}={v}").as_bytes())?);
    }
    let sh = cstring(b"/bin/sh")?;
    let mut sh_argv: Vec<*const c_char> = vec![sh.as_ptr(), std::ptr::null()];
    sh_argv.extend(argv.iter().skip(1).map(|a| a.as_ptr()));
    sh_argv.push(std::ptr::null());

    let mut keep = Vec::new();
    let (stdin_read, stdin_write) = match tool.input {
        Input::From(fd) => (above_stdio(fd, &mut keep)?, None),
        Input::Pipe => {
            let (r, w) = pipe()?;
            let raw = above_stdio(r.as_fd(), &mut keep)?;
            keep.push(r);
            (raw, Some(w))
        }
    };
    let (out_read, out_write) = pipe()?;
    let (err_read, err_write) = pipe()?;
    let stdio = [stdin_read, above_stdio(out_write.as_fd(), &mut keep)?, above_stdio(err_write.as_fd(), &mut keep)?];

    let l = tool.limits;
    let mut limits =
        vec![(libc::RLIMIT_NOFILE, l.open_files_max), (libc::RLIMIT_FSIZE, l.file_size_max), (libc::RLIMIT_CORE, 0)];
    limits.extend(l.data_max.map(|b| (libc::RLIMIT_DATA, b)));
    limits.extend(l.address_space_max.map(|b| (libc::RLIMIT_AS, b)));
    limits.extend(l.processes_max.map(|n| (libc::RLIMIT_NPROC, n)));
    if tool.lowest_priority {
        // RLIMIT_NICE 0: the call may not lower its nice value or leave
        // SCHED_IDLE.
        limits.push((libc::RLIMIT_NICE, 0));
    }
    let limits = limits.into_iter().map(|(r, v)| (r, libc::rlimit { rlim_cur: v, rlim_max: v })).collect();

    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut empty_mask: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: a live sigset_t.
    unsafe { libc::sigemptyset(&mut empty_mask) };
    let plan = Plan {
        candidates: pointers(&paths),
        argv: pointers(&argv),
        envp: pointers(&env),
        sh_argv: sh_argv.as_mut_ptr(),
        dir: cstring(tool.dir.as_os_str().as_bytes())?,
        stdio,
        limits,
        lowest_priority: tool.lowest_priority,
        guard: match &tool.layer.guard {
            None => None,
            Some(g) => Some(libc::sock_fprog {
                len: u16::try_from(g.len()).map_err(|_| io::Error::other("the seccomp guard is too long"))?,
                filter: g.as_ptr().cast_mut().cast(),
            }),
        },
        ruleset: tool.layer.ruleset.as_ref().map_or(-1, AsRawFd::as_raw_fd),
        empty_mask,
        step: AtomicU32::new(Step::Done as u32),
        errno: AtomicI32::new(0),
    };

    // The child's stack: 64 KiB, 16-byte aligned at its top (it grows
    // down). Only the child's few frames and libc's wrappers use it.
    let mut stack: Vec<u128> = Vec::with_capacity(4096);
    // SAFETY: one past the end of the allocation, the top of the stack.
    let top = unsafe { stack.as_mut_ptr().add(stack.capacity()) };

    let mut all: libc::sigset_t = empty_mask;
    let mut old: libc::sigset_t = empty_mask;
    // SAFETY: live sigset_t values; blocking every signal in this thread
    // keeps the worker's handlers from running in the child before it has
    // reset them.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    // SAFETY: `child` follows the rules of the module's documentation:
    // system calls only, on `plan`, which lives until clone returns (with
    // CLONE_VFORK this thread sleeps until the child has exec'd or exited).
    // `top` is the top of a live, exclusively owned 64 KiB stack.
    let pid = unsafe {
        libc::clone(
            child,
            top.cast::<c_void>(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            std::ptr::from_ref(&plan).cast_mut().cast::<c_void>(),
        )
    };
    let clone_error = io::Error::last_os_error();
    // SAFETY: restores this thread's own mask, saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    drop(stack);
    if pid < 0 {
        return Err(clone_error);
    }
    let step = Step::from_u32(plan.step.load(Ordering::Acquire));
    if step != Step::Done {
        let errno = plan.errno.load(Ordering::Acquire);
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
        let cause = io::Error::from_raw_os_error(errno);
        return Err(match step {
            Step::Exec => cause,
            other => io::Error::new(cause.kind(), format!("{} failed in the tool's child: {cause}", other.what())),
        });
    }
    drop((out_write, err_write, keep, sh_argv));
    Ok(Spawned { pid, stdin: stdin_write, stdout: out_read, stderr: err_read })
}

/// Records the failed step and ends the child.
///
/// SAFETY (for callers): only in the child, with `plan` the live plan.
unsafe fn fail(plan: &Plan, step: Step) -> ! {
    // SAFETY: __errno_location is this thread's errno, readable here.
    let errno = unsafe { *libc::__errno_location() };
    plan.errno.store(errno, Ordering::Release);
    plan.step.store(step as u32, Ordering::Release);
    // SAFETY: _exit ends the child without running anything of the worker's.
    unsafe { libc::_exit(127) }
}

/// The tool's child, up to its `execve`: system calls only (see the
/// module's documentation).
extern "C" fn child(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the plan `spawn` passed, alive while this runs (the
    // worker sleeps in clone); it is only read, apart from the atomics and
    // slot 1 of `sh_argv`, which nothing else touches meanwhile.
    let plan = unsafe { &*(arg as *const Plan) };
    // SAFETY: each call below is a system call (or libc's thin wrapper) on
    // values prepared before the clone; `fail` ends the child.
    unsafe {
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        for sig in RESET_SIGNALS {
            if libc::sigaction(sig, &dfl, std::ptr::null_mut()) != 0 {
                fail(plan, Step::Signals);
            }
        }
        if libc::sigprocmask(libc::SIG_SETMASK, &plan.empty_mask, std::ptr::null_mut()) != 0 {
            fail(plan, Step::Signals);
        }
        // A tool dies with its worker, even if the worker is killed outright.
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
            fail(plan, Step::DeathSignal);
        }
        for (target, &fd) in [0, 1, 2].into_iter().zip(plan.stdio.iter()) {
            // Each source is above 2 (see `above_stdio`): dup2 never
            // overwrites one that is still to be moved.
            if libc::dup2(fd, target) < 0 {
                fail(plan, Step::Stdio);
            }
        }
        if libc::setpgid(0, 0) != 0 {
            fail(plan, Step::Group);
        }
        if libc::chdir(plan.dir.as_ptr()) != 0 {
            fail(plan, Step::Dir);
        }
        for (resource, limit) in &plan.limits {
            if libc::setrlimit(*resource, limit) != 0 {
                fail(plan, Step::Limits);
            }
        }
        if plan.lowest_priority {
            // No CPU quota bounds this call: it runs only when the CPU has
            // nothing else to do; where SCHED_IDLE is refused (a filter, a
            // real-time-only host), nice 19 still holds.
            if libc::setpriority(libc::PRIO_PROCESS, 0, 19) != 0 {
                fail(plan, Step::Priority);
            }
            let param = libc::sched_param { sched_priority: 0 };
            libc::sched_setscheduler(0, libc::SCHED_IDLE, &param);
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            fail(plan, Step::NoNewPrivs);
        }
        if let Some(guard) = &plan.guard {
            let guard: *const libc::sock_fprog = guard;
            if libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, 0, guard) != 0 {
                fail(plan, Step::Seccomp);
            }
        }
        if plan.ruleset >= 0 && libc::syscall(libc::SYS_landlock_restrict_self, plan.ruleset, 0) != 0 {
            fail(plan, Step::Landlock);
        }
        // execvp's search: the first candidate that runs; EACCES if one was
        // found but refused and none ran, else the last error.
        let mut denied = false;
        for &path in plan.candidates.iter().take_while(|p| !p.is_null()) {
            libc::execve(path, plan.argv.as_ptr(), plan.envp.as_ptr());
            match *libc::__errno_location() {
                libc::ENOEXEC => {
                    *plan.sh_argv.add(1) = path;
                    libc::execve(*plan.sh_argv, plan.sh_argv.cast_const(), plan.envp.as_ptr());
                    fail(plan, Step::Exec);
                }
                libc::EACCES => denied = true,
                libc::ENOENT
                | libc::ENOTDIR
                | libc::ESTALE
                | libc::ENODEV
                | libc::ETIMEDOUT
                | libc::ELOOP
                | libc::ENAMETOOLONG => {}
                _ => fail(plan, Step::Exec),
            }
        }
        if denied {
            *libc::__errno_location() = libc::EACCES;
        }
        fail(plan, Step::Exec)
    }
}
