//! One tool call: a child of the worker under its own Landlock layer, in its
//! own process group, with a cleared environment, rlimits, a deadline and
//! capped output. When the call ends — the command exits or its time is up —
//! every process it left behind is killed, daemonized or not.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::resource::{getrusage, UsageWho};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::frame::{read_frame, write_frame};
use crate::protocol::{
    ExecOutcome, ExecRequest, FromWorker, OutStream, OutputChunk, SandboxSpec, Termination, ToWorker,
};
use crate::sandbox::landlock::ChildLayer;
use crate::sandbox::namespace::{self, Emptied};
use crate::sandbox::spawn::{self, Input, Spawned};
use crate::sandbox::{process, sys};

/// How long a killed tree gets to disappear before we report it.
const KILL_GRACE: Duration = Duration::from_secs(2);
const CHUNK: usize = 64 * 1024;

/// One captured output stream.
struct Capture {
    pipe: Option<OwnedFd>,
    data: Vec<u8>,
    cap: usize,
    truncated: bool,
    /// Bytes of `data` already sent to the broker (streamed calls).
    sent: usize,
}

impl Capture {
    fn new(pipe: Option<OwnedFd>, cap: u64) -> Self {
        let cap = usize::try_from(cap).unwrap_or(usize::MAX);
        Capture { pipe, data: Vec::new(), cap, truncated: false, sent: 0 }
    }

    /// Sends what was kept since the last call, when the call streams. A
    /// broker that cannot take it is gone: the next poll sees that.
    fn forward(&mut self, req: &ExecRequest, stream: OutStream, broker: &UnixStream) {
        if !req.stream || self.sent == self.data.len() {
            return;
        }
        let chunk = OutputChunk { id: req.id, stream, data: self.data[self.sent..].to_vec() };
        self.sent = self.data.len();
        let _ = write_frame(&mut &*broker, &FromWorker::Output(chunk));
    }

    /// Reads what is available; closes the pipe at end of file. Bytes past
    /// the cap are read and dropped, so the writer never blocks on us.
    fn pump(&mut self) {
        SCRATCH.with_borrow_mut(|buf| self.pump_with(buf));
    }

    fn pump_with(&mut self, buf: &mut [u8]) {
        while let Some(fd) = &self.pipe {
            match nix::unistd::read(fd.as_fd(), buf) {
                Ok(0) => self.pipe = None,
                Ok(n) => {
                    let keep = n.min(self.cap.saturating_sub(self.data.len()));
                    self.data.extend_from_slice(&buf[..keep]);
                    self.truncated |= keep < n;
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(nix::errno::Errno::EAGAIN) => return,
                Err(_) => self.pipe = None,
            }
        }
    }
}

thread_local! {
    /// The read buffer of every pump: the worker is single-threaded, and a
    /// fresh 64 KiB buffer per read cost a `memset` each time.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; CHUNK]);
}

/// Makes a pipe end the worker just made non-blocking: one `F_SETFL` (its
/// other status flags are all clear; the access mode is not changed by it).
fn nonblocking(fd: BorrowedFd<'_>) {
    let _ = fcntl(fd, FcntlArg::F_SETFL(OFlag::O_NONBLOCK));
}

fn children_cpu_us() -> (u64, u64) {
    getrusage(UsageWho::RUSAGE_CHILDREN)
        .map(|u| {
            let us = |t: nix::sys::time::TimeVal| {
                u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000 + u64::try_from(t.tv_usec()).unwrap_or(0)
            };
            (us(u.user_time()), us(u.system_time()))
        })
        .unwrap_or((0, 0))
}

fn not_started(req: &ExecRequest, start: Instant, message: String) -> ExecOutcome {
    ExecOutcome {
        id: req.id,
        termination: Termination::NotStarted,
        error: Some(message),
        stdout: Vec::new(),
        stderr: Vec::new(),
        stdout_truncated: false,
        stderr_truncated: false,
        timed_out: false,
        cancelled: false,
        wall_us: elapsed_us(start),
        cpu_user_us: 0,
        cpu_system_us: 0,
        peak_rss_kib: 0,
        changes: None,
        cgroup_peak: None,
    }
}

fn elapsed_us(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// What every tool call of a worker needs.
pub struct Tools<'a> {
    pub spec: &'a SandboxSpec,
    /// The per-call Landlock layer, built once per worker
    /// ([`crate::sandbox::tool_layer`]) and enforced anew in every tool child.
    pub layer: &'a ChildLayer,
    /// stdin of calls without input.
    pub devnull: &'a File,
    /// The worker's POSIX queue directory, emptied after each call.
    pub mqueue: Option<&'a Emptied>,
    /// The worker's private `/dev/shm`, emptied after each call.
    pub shm: Option<&'a Emptied>,
}

fn start_tool(ctx: &Tools<'_>, req: &ExecRequest) -> io::Result<Spawned> {
    let spec = ctx.spec;
    // A session call: its own layer (the workspace narrowed to the
    // session's directory), enforced as required, in that directory.
    let session = match &req.session_dir {
        Some(dir) => {
            let s = crate::sandbox::session::session_layer(spec, dir)
                .map_err(|e| io::Error::new(io::ErrorKind::PermissionDenied, e.to_string()))?;
            let env = crate::sandbox::session::session_env(spec, &s.dir);
            Some((s, env))
        }
        None => None,
    };
    let (layer, dir, env) = match &session {
        Some((s, env)) => (&s.layer, s.dir.as_path(), env.as_slice()),
        None => (ctx.layer, spec.workspace.as_path(), spec.env.as_slice()),
    };
    let input = if req.stdin.is_empty() { Input::From(ctx.devnull.as_fd()) } else { Input::Pipe };
    spawn::spawn(&spawn::Tool {
        argv: &req.argv,
        env,
        dir,
        input,
        limits: &spec.tool,
        layer,
        lowest_priority: crate::sandbox::lowest_priority(spec),
    })
}

/// Runs one call to completion, then empties the worker's IPC namespace
/// and its private `/dev/shm`: nothing the call made outlives it. Never panics on the command's
/// behaviour.
pub fn run(ctx: &Tools<'_>, req: &ExecRequest, broker: &UnixStream) -> ExecOutcome {
    let outcome = run_call(ctx, req, broker);
    let (removed, failed) = namespace::clean_ipc(ctx.mqueue);
    if removed > 0 {
        tracing::debug!(removed, "IPC objects the call left were removed");
    }
    if !failed.is_empty() {
        tracing::warn!(?failed, "IPC objects the call left could not be removed");
    }
    if let Some(shm) = ctx.shm {
        let (removed, failed) = namespace::clean_shm(shm, ctx.mqueue.map(Emptied::path));
        if removed > 0 {
            tracing::debug!(removed, "files the call left in /dev/shm were removed");
        }
        if !failed.is_empty() {
            tracing::warn!(?failed, "files the call left in /dev/shm could not be removed");
        }
    }
    outcome
}

/// Whether the broker cancelled call `id`: it sent [`ToWorker::Cancel`],
/// or closed the socket (it is gone). Called when the socket is readable.
fn cancelled(broker: &UnixStream, id: u64) -> bool {
    match read_frame::<_, ToWorker>(&mut &*broker) {
        Ok(Some(ToWorker::Cancel(c))) => c == id,
        Ok(Some(_)) => {
            tracing::warn!("unexpected frame during a tool call; cancelling it");
            true
        }
        Ok(None) | Err(_) => true,
    }
}

fn run_call(ctx: &Tools<'_>, req: &ExecRequest, broker: &UnixStream) -> ExecOutcome {
    let spec = ctx.spec;
    let start = Instant::now();
    let (cpu_user0, cpu_sys0) = children_cpu_us();
    let child = match start_tool(ctx, req) {
        Ok(c) => c,
        Err(e) => {
            let argv0 = req.argv.first().map(String::as_str).unwrap_or("");
            return not_started(req, start, format!("cannot execute `{argv0}`: {e}"));
        }
    };
    let pid_t = child.pid;
    let mut stdin: Option<File> = child.stdin.map(File::from);
    let mut out = Capture::new(Some(child.stdout), spec.tool.output_max);
    let mut err = Capture::new(Some(child.stderr), spec.tool.output_max);
    for fd in [&out.pipe, &err.pipe].into_iter().flatten() {
        nonblocking(fd.as_fd());
    }
    if let Some(s) = &stdin {
        nonblocking(s.as_fd());
    }
    let pidfd = sys::pidfd_open(pid_t).ok();
    let deadline = start + Duration::from_millis(req.timeout_ms);
    let mut written = 0usize;
    let mut timed_out = false;
    let mut cancel = false;

    // Phase 1: feed stdin and collect output until the command exits or the
    // deadline passes.
    loop {
        let now = Instant::now();
        if now >= deadline {
            timed_out = true;
            break;
        }
        // With a pidfd, its readiness comes with the poll below: no poll
        // of its own before each.
        if pidfd.is_none() && exited(pid_t) {
            break;
        }
        let remaining = deadline - now;
        let wait_ms = if pidfd.is_some() { remaining.as_millis() } else { remaining.as_millis().min(10) };
        let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(5);
        let mut slots = [usize::MAX; 5]; // out, err, stdin, pidfd, broker
        if let Some(fd) = &out.pipe {
            slots[0] = fds.len();
            fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
        }
        if let Some(fd) = &err.pipe {
            slots[1] = fds.len();
            fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
        }
        if let Some(s) = &stdin {
            slots[2] = fds.len();
            fds.push(PollFd::new(s.as_fd(), PollFlags::POLLOUT));
        }
        if let Some(p) = &pidfd {
            slots[3] = fds.len();
            fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
        }
        slots[4] = fds.len();
        fds.push(PollFd::new(broker.as_fd(), PollFlags::POLLIN));
        let timeout = PollTimeout::from(u16::try_from(wait_ms).unwrap_or(u16::MAX));
        if poll(&mut fds, timeout).is_err() {
            continue; // EINTR
        }
        let ready = |slot: usize| fds.get(slot).and_then(|f| f.revents()).is_some_and(|r| !r.is_empty());
        let (o, e, i, b) = (ready(slots[0]), ready(slots[1]), ready(slots[2]), ready(slots[4]));
        let done = ready(slots[3]);
        drop(fds);
        if b && cancelled(broker, req.id) {
            cancel = true;
            break;
        }
        if o {
            out.pump();
            out.forward(req, OutStream::Stdout, broker);
        }
        if e {
            err.pump();
            err.forward(req, OutStream::Stderr, broker);
        }
        if i {
            if let Some(s) = stdin.as_mut() {
                match s.write(&req.stdin[written..]) {
                    Ok(n) => written += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => written = req.stdin.len(), // reader gone (EPIPE): stop feeding
                }
                if written >= req.stdin.len() {
                    stdin = None; // close: the command sees end of input
                }
            }
        }
        // The command has exited: what its pipes still hold is read below.
        if done {
            break;
        }
    }
    drop(stdin);

    // Phase 2: end the call. On timeout the whole group first, then whatever
    // escaped it (setsid); on a normal exit, whatever the command left behind.
    if timed_out || cancel {
        let _ = killpg(Pid::from_raw(pid_t), Signal::SIGKILL);
        let _ = nix::sys::signal::kill(Pid::from_raw(pid_t), Signal::SIGKILL);
    }
    let (status, usage) = sys::wait4(pid_t).unwrap_or((0, sys::Rusage::default()));
    if let Err(e) = process::kill_all_descendants(KILL_GRACE) {
        tracing::warn!(error = %e, "tool tree did not die");
    }
    // Every writer is gone now: read the pipes to their end.
    out.pump_to_end();
    err.pump_to_end();
    out.forward(req, OutStream::Stdout, broker);
    err.forward(req, OutStream::Stderr, broker);

    let (cpu_user1, cpu_sys1) = children_cpu_us();
    let termination = if libc::WIFEXITED(status) {
        Termination::Exited(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        Termination::Signaled(libc::WTERMSIG(status))
    } else {
        Termination::Exited(-1)
    };
    ExecOutcome {
        id: req.id,
        termination,
        error: None,
        stdout: out.data,
        stderr: err.data,
        stdout_truncated: out.truncated,
        stderr_truncated: err.truncated,
        timed_out,
        cancelled: cancel,
        wall_us: elapsed_us(start),
        cpu_user_us: cpu_user1.saturating_sub(cpu_user0).max(usage.user_us),
        cpu_system_us: cpu_sys1.saturating_sub(cpu_sys0).max(usage.system_us),
        peak_rss_kib: usage.max_rss_kib,
        changes: None,
        cgroup_peak: None,
    }
}

/// Whether the command has exited (without reaping it), where the kernel
/// has no pidfd to poll.
fn exited(pid: libc::pid_t) -> bool {
    use nix::sys::wait::{waitid, Id, WaitPidFlag};
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    matches!(waitid(Id::Pid(Pid::from_raw(pid)), flags), Ok(s) if s.pid().is_some())
}

impl Capture {
    /// After every writer is dead: read until end of file.
    fn pump_to_end(&mut self) {
        // Still non-blocking: every writer is dead, so what is left is read
        // at once, then end of file; a writer that somehow survived cannot
        // hang the worker.
        self.pump();
        self.pipe = None;
    }
}
