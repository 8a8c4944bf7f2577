//! Starting one worker process and talking to it.

use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

use super::egress::{Egress, EgressReceipt};
use super::http::proxy::Proxy;
use super::scope::{Systemd, UnitLimits};
use crate::frame::{read_frame_async, write_frame_async, FrameError};
use crate::protocol::{
    AskOutcome, AskRequest, CompleteRequest, Completion, CompletionReply, EffectiveSandbox, ExecOutcome, ExecRequest,
    FromWorker, OutputChunk, SandboxSpec, ToWorker, ToolDone,
};
use crate::sandbox::process::{spawn_worker, try_reap, watch_pidfd};

/// How long a worker has to answer a cancelled call before it is killed.
pub const CANCEL_GRACE: Duration = Duration::from_secs(2);

/// The broker's `oom_score_adj` when it runs as root: memory that no limit of
/// a tool call sees (shared memory, memfds, tmpfs pages without systemd)
/// must cost a tool, never the broker that serves every tenant.
pub const BROKER_OOM_SCORE_ADJ: i32 = -900;

/// Lowers the broker's own `oom_score_adj` to [`BROKER_OOM_SCORE_ADJ`] when
/// it is root and not already lower (the unit sets `OOMScoreAdjust=`
/// itself). Workers raise theirs to 1000 before they drop privileges.
pub fn lower_own_oom_score() {
    if !nix::unistd::Uid::effective().is_root() {
        return;
    }
    let path = "/proc/self/oom_score_adj";
    let current: i32 = std::fs::read_to_string(path).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
    if current <= BROKER_OOM_SCORE_ADJ {
        return;
    }
    if let Err(e) = std::fs::write(path, BROKER_OOM_SCORE_ADJ.to_string()) {
        tracing::warn!(
            "could not lower the broker's oom_score_adj to {BROKER_OOM_SCORE_ADJ}: {e} (it needs \
             CAP_SYS_RESOURCE; as a service, OOMScoreAdjust= sets it); tools still have 1000 and go first"
        );
    }
}

/// How long a worker may take to confine itself and say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The worker's sandbox cannot be set up as the policy requires; retrying
    /// will not help until the host or the policy changes.
    #[error("{0}")]
    Refused(String),
    #[error("failed to start worker process {exe}: {source}")]
    Spawn { exe: String, source: std::io::Error },
    #[error("worker {0} before it was ready")]
    Died(String),
    #[error("worker did not become ready within {READY_TIMEOUT:?}")]
    Timeout,
    #[error("failed to talk to the new worker: {0}")]
    Frame(#[from] FrameError),
    #[error("failed to create the worker socket pair: {0}")]
    Socket(std::io::Error),
    #[error(
        "failed to give the worker a network namespace with its egress proxy: {0}. The broker needs \
         CAP_SYS_ADMIN and CAP_NET_ADMIN; as a systemd service: net in RestrictNamespaces= and both in \
         CapabilityBoundingSet= (see units/corral.service)"
    )]
    Egress(std::io::Error),
    #[error("failed to put the worker in its scope: {0}")]
    Scope(String),
    #[error(
        "failed to start the worker in its own PID, mount and IPC namespaces: {0}. The broker needs \
         CAP_SYS_ADMIN; as a systemd service: RestrictNamespaces=ipc mnt pid and CAP_SYS_ADMIN in \
         CapabilityBoundingSet= (see units/corral.service)"
    )]
    Namespaces(std::io::Error),
}

/// The systemd scope a new worker goes into.
pub struct ScopePlan<'a> {
    pub systemd: &'a Systemd,
    pub unit: String,
    pub slice: &'a str,
    pub limits: &'a UnitLimits,
    pub description: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The worker process ended during the call.
    #[error("the worker running the call died ({0})")]
    Died(String),
    /// The worker did not answer in time even though it enforces the call's
    /// own timeout: it was killed.
    #[error("the worker did not answer within {0:?} and was killed")]
    Stuck(Duration),
}

/// What a worker is asked to do.
#[derive(Debug, Clone)]
pub enum Call {
    Exec(ExecRequest),
    Ask(AskRequest),
}

impl Call {
    fn id(&self) -> u64 {
        match self {
            Call::Exec(r) => r.id,
            Call::Ask(r) => r.id,
        }
    }

    /// How long the call may take, before the backstop.
    fn timeout(&self) -> Duration {
        Duration::from_millis(match self {
            Call::Exec(r) => r.timeout_ms,
            Call::Ask(r) => r.timeout_ms,
        })
    }
}

/// What a worker answered.
#[derive(Debug, Clone)]
pub enum Answer {
    Done(ExecOutcome),
    Answered(AskOutcome),
}

/// A completion a worker asked for during an ask, handed to whoever serves
/// the ask (it holds the budget and the key, the pool does not).
pub struct CompletionJob {
    pub request: CompleteRequest,
    pub reply: oneshot::Sender<Result<Completion, String>>,
}

/// Where a call's completion requests go.
pub type Completions = mpsc::Sender<CompletionJob>;

/// What a streamed call reports while it runs.
#[derive(Debug)]
pub enum CallEvent {
    /// Bytes an exec's command wrote (within its caps).
    Output(OutputChunk),
    /// A tool call of an ask has ended.
    Tool(ToolDone),
}

/// Where a streamed call's events go. Unbounded, yet bounded by the call:
/// an exec's chunks add up to at most its two capped streams, an ask's
/// tool events to its steps × tool calls per step.
pub type Events = mpsc::UnboundedSender<CallEvent>;

/// A ready, sandboxed worker.
pub struct Worker {
    pub pid: u32,
    pub effective: EffectiveSandbox,
    child: Child,
    sock: UnixStream,
    /// With `[network]`: the proxy inside the worker's network namespace.
    proxy: Option<Proxy>,
}

/// A worker process: PID 1 of its own namespaces (when the broker is root),
/// watched through a pidfd. Killed and reaped when dropped.
struct Child {
    pid: u32,
    pidfd: AsyncFd<std::os::fd::OwnedFd>,
    status: Option<ExitStatus>,
}

impl Child {
    /// Starts `exe worker` on `sock`; in new namespaces when the broker is
    /// root. A root broker that cannot make them refuses (no silent
    /// downgrade); one that is not root has no tenants to keep apart.
    /// With `proxy_port`, in a network namespace of its own, with the
    /// listener of its egress proxy.
    fn spawn(
        exe: &Path,
        log_filter: &str,
        sock: std::os::fd::RawFd,
        proxy_port: Option<u16>,
    ) -> Result<(Child, Option<std::net::TcpListener>), StartError> {
        let namespaces = nix::unistd::Uid::effective().is_root();
        let spawn_error = |e: std::io::Error| {
            if namespaces && matches!(e.raw_os_error(), Some(libc::EPERM | libc::EINVAL | libc::ENOSPC)) {
                StartError::Namespaces(e)
            } else {
                StartError::Spawn { exe: exe.display().to_string(), source: e }
            }
        };
        let (spawned, listener) = match proxy_port {
            None => (spawn_worker(exe, log_filter, sock, namespaces).map_err(spawn_error)?, None),
            Some(_) if !namespaces => {
                return Err(StartError::Refused(
                    "[network] needs a broker running as root (a network namespace per worker)".into(),
                ))
            }
            Some(port) => {
                // The spawn's own error is kept apart from the namespace's.
                let mut spawn_failed = None;
                let made = crate::sandbox::net::spawn_in_new_netns(port, || {
                    spawn_worker(exe, log_filter, sock, namespaces).map_err(|e| {
                        let shown = std::io::Error::new(e.kind(), e.to_string());
                        spawn_failed = Some(e);
                        shown
                    })
                });
                match (made, spawn_failed) {
                    (Ok((s, l)), _) => (s, Some(l)),
                    (Err(_), Some(e)) => return Err(spawn_error(e)),
                    (Err(e), None) => return Err(StartError::Egress(e)),
                }
            }
        };
        let pidfd = watch_pidfd(spawned.pidfd).map_err(StartError::Socket)?;
        Ok((Child { pid: spawned.pid, pidfd, status: None }, listener))
    }

    /// Waits until the process ends and reaps it. Cancel-safe.
    async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        use std::os::unix::process::ExitStatusExt;
        loop {
            if let Some(s) = self.status {
                return Ok(s);
            }
            let mut ready = self.pidfd.readable().await?;
            match try_reap(self.pid)? {
                Some(raw) => self.status = Some(ExitStatus::from_raw(raw)),
                None => ready.clear_ready(),
            }
        }
    }

    fn start_kill(&mut self) {
        if self.status.is_none() {
            // Not reaped yet, so the PID is still ours.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(self.pid).unwrap_or(-1)),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.status.is_some() {
            return;
        }
        self.start_kill();
        // Reap it off the async threads: SIGKILL is quick, but not instant.
        let pid = self.pid;
        let _ = std::thread::Builder::new().name("reap-worker".into()).spawn(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while std::time::Instant::now() < deadline {
                if !matches!(try_reap(pid), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
    }
}

/// Words for how a process ended: "exit code 3", "killed by signal 9 (SIGKILL)".
pub fn describe_exit(status: ExitStatus) -> String {
    use crate::sandbox::sys::{STOP_EXIT_BASE, STOP_SIGNALS};
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        // A worker is PID 1 of its PID namespace, which the kernel does
        // not let a signal kill: it exits with 128 + N on the signals an
        // operator stops processes with, and is described as killed by it.
        (Some(code), _) => match code.checked_sub(STOP_EXIT_BASE).filter(|s| STOP_SIGNALS.contains(s)) {
            Some(sig) => format!("killed by signal {sig} ({})", signal_name(sig)),
            None => format!("exited with code {code}"),
        },
        (None, Some(sig)) => format!("killed by signal {sig} ({})", signal_name(sig)),
        _ => "ended".to_string(),
    }
}

pub fn signal_name(sig: i32) -> String {
    nix::sys::signal::Signal::try_from(sig).map(|s| s.as_str().to_string()).unwrap_or_else(|_| format!("SIG{sig}"))
}

/// Starts `exe worker`, hands it `spec` and waits until it is confined.
pub async fn start(
    exe: &Path,
    spec: &SandboxSpec,
    log_filter: &str,
    scope: Option<ScopePlan<'_>>,
    egress: Option<&Arc<Egress>>,
) -> Result<Worker, StartError> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(StartError::Socket)?;
    if spec.egress_proxy.is_some() != egress.is_some() {
        return Err(StartError::Refused("the workflow's egress rules and its sandbox spec disagree".into()));
    }
    let (mut child, listener) = Child::spawn(exe, log_filter, theirs.as_raw_fd(), spec.egress_proxy)?;
    drop(theirs);
    let pid = child.pid;
    // INVARIANT: the listener existed before the worker did; the worker
    // blocks reading Init, so no tool runs before the proxy serves.
    let proxy = match (listener, egress) {
        (Some(l), Some(egress)) => match Proxy::start(l, egress.clone()) {
            Ok(p) => Some(p),
            Err(e) => {
                child.start_kill();
                let _ = child.wait().await;
                return Err(StartError::Egress(e));
            }
        },
        _ => None,
    };
    ours.set_nonblocking(true).map_err(StartError::Socket)?;
    let mut sock = UnixStream::from_std(ours).map_err(StartError::Socket)?;

    let mut spec = spec.clone();
    spec.broker_pid = std::process::id();
    // INVARIANT: the worker blocks reading Init, so nothing runs before it is
    // inside its scope (and it checks that it is, itself).
    if let Some(plan) = scope {
        if let Err(e) = plan.systemd.create_scope(&plan.unit, plan.slice, pid, &plan.description, plan.limits).await {
            child.start_kill();
            let _ = child.wait().await;
            return Err(StartError::Scope(e.to_string()));
        }
        spec.scope = Some(plan.unit);
    }
    write_frame_async(&mut sock, &ToWorker::Init(Box::new(spec))).await?;
    let answer = tokio::select! {
        r = tokio::time::timeout(READY_TIMEOUT, read_frame_async::<_, FromWorker>(&mut sock)) => r,
        status = child.wait() => {
            // It may have sent Refused just before exiting.
            if let Ok(Some(FromWorker::Refused(why))) = read_frame_async(&mut sock).await {
                return Err(StartError::Refused(why));
            }
            return Err(StartError::Died(status.map(describe_exit).unwrap_or_else(|e| e.to_string())));
        }
    };
    match answer {
        Err(_) => Err(StartError::Timeout),
        Ok(Ok(Some(FromWorker::Ready(effective)))) => Ok(Worker { pid, effective, child, sock, proxy }),
        Ok(Ok(Some(FromWorker::Refused(why)))) => {
            let _ = child.wait().await;
            Err(StartError::Refused(why))
        }
        Ok(Ok(Some(
            FromWorker::Done(_)
            | FromWorker::Answered(_)
            | FromWorker::Complete(_)
            | FromWorker::Output(_)
            | FromWorker::ToolDone(_),
        ))) => Err(StartError::Died("answered before it was asked".into())),
        Ok(Ok(None)) => {
            let status = child.wait().await.map(describe_exit).unwrap_or_else(|e| e.to_string());
            Err(StartError::Died(status))
        }
        Ok(Err(e)) => Err(e.into()),
    }
}

impl Worker {
    /// A call starts: the proxy's connections from now on count for it.
    pub fn begin_egress(&self) {
        if let Some(p) = &self.proxy {
            p.begin_call();
        }
    }

    /// The call ended: its proxied connections are cut, and this is what it
    /// reached and was refused.
    pub fn end_egress(&self) -> Option<EgressReceipt> {
        self.proxy.as_ref().and_then(Proxy::end_call)
    }

    /// Runs one call. `backstop` is how long past the call's own timeout we
    /// wait before declaring the worker stuck. During an ask, every
    /// completion the worker asks for goes to `completions` and its answer
    /// back to the worker; a worker that asks without an ask in flight
    /// breaks the protocol and is killed. A streamed call's output and tool
    /// events go to `events` as they come. When `cancel` completes (the
    /// client went away, or cancelled), the worker is told to end the call
    /// and gets [`CANCEL_GRACE`] to answer.
    pub async fn call(
        &mut self,
        call: Call,
        backstop: Duration,
        completions: Option<&Completions>,
        events: Option<&Events>,
        cancel: impl std::future::Future<Output = ()>,
    ) -> Result<Answer, CallError> {
        let id = call.id();
        let limit = call.timeout() + backstop;
        let mut deadline = tokio::time::Instant::now() + limit;
        let is_ask = matches!(call, Call::Ask(_));
        let frame = match call {
            Call::Exec(r) => ToWorker::Exec(r),
            Call::Ask(r) => ToWorker::Ask(r),
        };
        if write_frame_async(&mut self.sock, &frame).await.is_err() {
            return Err(CallError::Died(self.reap().await));
        }
        tokio::pin!(cancel);
        let mut cancelled = false;
        loop {
            // Wait for the socket to be readable rather than select on a
            // frame read: a read dropped half-way would lose the framing.
            tokio::select! {
                ready = self.sock.readable() => {
                    if ready.is_err() {
                        return Err(CallError::Died(self.reap().await));
                    }
                    // Readiness may be stale (the last read took a whole
                    // frame without reaching WouldBlock): look, and clear it
                    // if nothing is there.
                    let fd = self.sock.as_fd();
                    match self.sock.try_io(tokio::io::Interest::READABLE, || crate::sandbox::sys::peek(fd)) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                        Err(_) => return Err(CallError::Died(self.reap().await)),
                    }
                }
                () = &mut cancel, if !cancelled => {
                    cancelled = true;
                    self.cancel(id, &mut deadline).await?;
                    continue;
                }
                () = tokio::time::sleep_until(deadline) => {
                    self.kill().await;
                    return Err(CallError::Stuck(limit));
                }
            }
            let answer = tokio::time::timeout_at(deadline, read_frame_async::<_, FromWorker>(&mut self.sock)).await;
            let msg = match answer {
                Ok(Ok(Some(msg))) => msg,
                Ok(Ok(None)) | Ok(Err(_)) => return Err(CallError::Died(self.reap().await)),
                Err(_) => {
                    self.kill().await;
                    return Err(CallError::Stuck(limit));
                }
            };
            match msg {
                FromWorker::Done(outcome) if !is_ask && outcome.id == id => return Ok(Answer::Done(outcome)),
                FromWorker::Answered(outcome) if is_ask && outcome.id == id => return Ok(Answer::Answered(outcome)),
                // A client that went away no longer reads: dropped.
                FromWorker::Output(chunk) if !is_ask && chunk.id == id => {
                    if let Some(tx) = events {
                        let _ = tx.send(CallEvent::Output(chunk));
                    }
                }
                FromWorker::ToolDone(done) if is_ask && done.id == id => {
                    if let Some(tx) = events {
                        let _ = tx.send(CallEvent::Tool(done));
                    }
                }
                FromWorker::Complete(request) if is_ask && request.id == id => {
                    let step = request.step;
                    let result = match completions {
                        _ if cancelled => Err("the ask was cancelled".to_string()),
                        Some(tx) => {
                            let (reply, rx) = oneshot::channel();
                            if tx.send(CompletionJob { request, reply }).await.is_err() {
                                Err("the request was abandoned by its client".to_string())
                            } else {
                                tokio::select! {
                                    r = tokio::time::timeout_at(deadline, rx) => match r {
                                        Ok(Ok(r)) => r,
                                        Ok(Err(_)) => Err("the request was abandoned by its client".to_string()),
                                        Err(_) => {
                                            self.kill().await;
                                            return Err(CallError::Stuck(limit));
                                        }
                                    },
                                    // The model's answer is not awaited: the
                                    // worker gets the cancel instead.
                                    () = &mut cancel, if !cancelled => {
                                        cancelled = true;
                                        self.cancel(id, &mut deadline).await?;
                                        continue;
                                    }
                                }
                            }
                        }
                        None => Err("no model is available for this call".to_string()),
                    };
                    let reply = ToWorker::Completion(CompletionReply { id, step, result });
                    if write_frame_async(&mut self.sock, &reply).await.is_err() {
                        return Err(CallError::Died(self.reap().await));
                    }
                }
                _ => {
                    self.kill().await;
                    return Err(CallError::Died("protocol violation: unexpected answer; worker killed".into()));
                }
            }
        }
    }

    /// Tells the worker to end call `id`, and gives it [`CANCEL_GRACE`] to
    /// answer from now.
    async fn cancel(&mut self, id: u64, deadline: &mut tokio::time::Instant) -> Result<(), CallError> {
        *deadline = (*deadline).min(tokio::time::Instant::now() + CANCEL_GRACE);
        if write_frame_async(&mut self.sock, &ToWorker::Cancel(id)).await.is_err() {
            return Err(CallError::Died(self.reap().await));
        }
        Ok(())
    }

    /// Waits (briefly) for a worker whose socket closed, and says how it ended.
    async fn reap(&mut self) -> String {
        match tokio::time::timeout(Duration::from_secs(2), self.child.wait()).await {
            Ok(Ok(status)) => describe_exit(status),
            Ok(Err(e)) => format!("could not be waited for: {e}"),
            Err(_) => {
                self.kill().await;
                "closed its socket and was killed".into()
            }
        }
    }

    /// Resolves when the worker process ends on its own; says how.
    pub async fn exited(&mut self) -> String {
        match self.child.wait().await {
            Ok(status) => describe_exit(status),
            Err(e) => format!("could not be waited for: {e}"),
        }
    }

    pub async fn kill(&mut self) {
        self.child.start_kill();
        let _ = self.child.wait().await;
    }
}
