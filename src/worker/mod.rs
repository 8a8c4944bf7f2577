//! The worker: one sandboxed process of a workflow's pool.
//!
//! It is started by the broker as `corral worker` with its end of a socket
//! pair on descriptor 3, and never starts a thread or an async runtime:
//! Landlock and seccomp bind the calling thread, and the tool children it
//! forks may then run ordinary code between fork and exec.
//!
//! Life: read `Init` → confine itself ([`crate::sandbox::confine_worker`]) →
//! report `Ready` (or `Refused` and exit) → serve `Exec` calls and `Ask`s
//! ([`agent`]) one at a time until the broker closes the socket.

mod agent;
mod receipt;
mod tool;

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

use crate::frame::{read_frame, write_frame, FrameError};
use crate::protocol::{FromWorker, ToWorker};
use crate::sandbox::{self, process};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("failed to take the broker socket")]
    Socket(#[source] std::io::Error),
    #[error("failed to talk to the broker")]
    Frame(#[from] FrameError),
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    #[error("failed to prepare the worker")]
    Setup(#[source] std::io::Error),
    #[error("sandbox refused")]
    Refused(#[from] sandbox::SandboxError),
}

/// Runs a worker until its broker goes away.
pub fn run() -> Result<(), WorkerError> {
    let mut sock: UnixStream = process::take_worker_socket().map_err(WorkerError::Socket)?;
    // Nothing but stdio and the broker socket may cross into the sandbox.
    sandbox::sys::close_fds_from(4).map_err(WorkerError::Setup)?;
    let spec = match read_frame::<_, ToWorker>(&mut sock)? {
        Some(ToWorker::Init(spec)) => spec,
        Some(_) => return Err(WorkerError::Protocol("first message was not Init")),
        None => return Ok(()),
    };
    // Opened before Landlock, kept for the stdin of tool calls without input.
    let devnull = File::open("/dev/null").map_err(WorkerError::Setup)?;

    // INVARIANT: nothing from a client has been read yet; the sandbox is in
    // force before the first Exec frame is.
    // The per-call layer is built once; each tool child enforces a copy.
    let confined = sandbox::confine_worker(&spec, sock.as_fd()).and_then(|c| Ok((c, sandbox::tool_layer(&spec)?)));
    let (confined, layer) = match confined {
        Ok(both) => both,
        Err(e) => {
            let _ = write_frame(&mut sock, &FromWorker::Refused(e.to_string()));
            return Err(e.into());
        }
    };
    write_frame(&mut sock, &FromWorker::Ready(confined.effective))?;
    let mqueue = confined.mqueue.map(sandbox::namespace::Emptied::new);
    let shm = confined.shm.map(sandbox::namespace::Emptied::new);
    let tools =
        tool::Tools { spec: &spec, layer: &layer, devnull: &devnull, mqueue: mqueue.as_ref(), shm: shm.as_ref() };

    while let Some(msg) = read_frame::<_, ToWorker>(&mut sock)? {
        match msg {
            ToWorker::Exec(req) => {
                let span = tracing::info_span!("exec", request_id = %req.request_id, call = req.id);
                let _enter = span.enter();
                // A session call's receipt walks its session's directory.
                let root = req.session_dir.as_deref().unwrap_or(&spec.workspace);
                let before = req.receipt.then(|| receipt::Snapshot::take(root));
                let mut outcome = tool::run(&tools, &req, &sock);
                // A cancelled call's answer is not awaited: answer it at once.
                if let Some(before) = before.filter(|_| !outcome.cancelled) {
                    outcome.changes = Some(Box::new(before.diff(&receipt::Snapshot::take(root))));
                }
                tracing::debug!(termination = ?outcome.termination, wall_us = outcome.wall_us, "exec done");
                write_frame(&mut sock, &FromWorker::Done(outcome))?;
            }
            ToWorker::Ask(req) => {
                let span = tracing::info_span!("ask", request_id = %req.request_id, call = req.id);
                let _enter = span.enter();
                let outcome = agent::run(&mut sock, &tools, &req)?;
                write_frame(&mut sock, &FromWorker::Answered(outcome))?;
            }
            ToWorker::Completion(_) => return Err(WorkerError::Protocol("Completion outside an ask")),
            // A cancel that crossed the call's answer on the way.
            ToWorker::Cancel(_) => {}
            ToWorker::Init(_) => return Err(WorkerError::Protocol("Init sent twice")),
        }
    }
    Ok(())
}
