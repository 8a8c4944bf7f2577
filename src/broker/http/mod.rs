//! The front door: the Unix socket every tenant shares, and the HTTP/JSON
//! API on it.
//!
//! Parts: [`listener`] binds the socket; this file runs the accept loop,
//! which reads the caller's uid from `SO_PEERCRED` and counts its
//! connections against [`limits`] before hyper sees a byte; [`conn`] adds
//! the head and write timeouts to each connection; [`routes`] is the axum
//! router and the gate every request passes before its body is read
//! (draining, sandboxed callers, callers who are no workflow's client, an
//! early `x-corral-workflow` check); [`body`] reads JSON bodies within the
//! caller's budget; [`error`] is the one error shape; [`exec`], [`ask`],
//! [`chat`] and [`status`] are the endpoints. [`acting`] resolves the
//! member a request is made for (a delegate's `x-corral-member`, or her own
//! login), [`rates`] holds members and tenants to their limits.
//!
//! Fairness: a uid can hold at most [`limits::Limits::conns_per_uid`]
//! connections and [`limits::Limits::bodies_per_uid`] bytes of bodies;
//! beyond that it is refused at once, never queued, so a hostile local user
//! exhausts only its own share and every other uid is served as before.

pub mod acting;
mod ask;
mod audit;
mod authorize;
mod body;
pub(crate) mod calls;
mod chat;
mod conn;
pub mod error;
mod exec;
pub mod limits;
pub mod listener;
mod models;
mod ops;
pub mod proxy;
pub mod rates;
mod receipt;
mod routes;
mod sessions;
mod status;
mod stream;

use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::ServiceExt;
use tracing::Instrument;

use super::auth::Peer;
use super::Broker;
use error::{raw_response, ApiError};
use limits::{Gate, Limits, Refusal};

pub use acting::Acting;
pub use listener::BindError;

/// Shared by every connection and request.
pub(crate) struct Front {
    broker: Arc<Broker>,
    gate: Arc<Gate>,
    /// Members' and tenants' rate limits and concurrency caps.
    rates: Arc<rates::Rates>,
    /// Turns true when [`Server::shutdown`] starts.
    stop: watch::Receiver<bool>,
}

impl Front {
    /// Resolves once the server shuts down: a call still waiting for its
    /// answer then answers `stopping` at once.
    async fn stopped(&self) {
        let mut stop = self.stop.clone();
        let _ = stop.wait_for(|s| *s).await;
    }
}

type AppState = Arc<Front>;

/// Who sent a request and its id; put on every request before routing.
#[derive(Clone)]
pub(crate) struct Caller {
    peer: Peer,
    request_id: Arc<str>,
    /// Whether the peer process descends from a worker: walked once per
    /// connection, at its first request. The answer cannot change while the
    /// process lives: no process is ever moved below a worker.
    below_worker: Arc<std::sync::OnceLock<bool>>,
}

/// The running accept loop.
pub struct Server {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Serves `listener` until [`Server::shutdown`].
    pub fn start(listener: UnixListener, broker: Arc<Broker>, limits: Limits) -> Server {
        let gate = Gate::new(fit_fd_limit(limits));
        let (stop, stopped) = watch::channel(false);
        let rates = Arc::new(rates::Rates::default());
        let front = Arc::new(Front { broker, gate, rates, stop: stopped.clone() });
        tokio::spawn(trim_freed_memory(Arc::clone(&front.gate), stopped.clone()));
        let task = tokio::spawn(accept_loop(listener, front, stopped));
        Server { stop, task }
    }

    /// Stops accepting; calls still waiting for a worker's answer are
    /// answered 503 `stopping` at once; every answer in progress is written
    /// and idle connections are closed; after a few seconds the rest are
    /// dropped.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Descriptors kept for workers, their socket pairs, the ledger and the
/// journal.
const FDS_RESERVED: u64 = 256;

/// Lowers the connection cap to what `RLIMIT_NOFILE` allows, after raising
/// its soft limit as far as the cap needs (and the hard limit allows; not
/// further, since workers inherit it): a broker that runs out of
/// descriptors cannot accept at all, which would stall every uid alike.
fn fit_fd_limit(mut limits: Limits) -> Limits {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let want = (limits.conns_total as u64).saturating_add(FDS_RESERVED).min(hard);
        let soft = if soft < want && setrlimit(Resource::RLIMIT_NOFILE, want, hard).is_ok() { want } else { soft };
        let room = usize::try_from(soft.saturating_sub(FDS_RESERVED)).unwrap_or(usize::MAX).max(64);
        if room < limits.conns_total {
            tracing::warn!("RLIMIT_NOFILE {soft} allows only {room} client connections; raise LimitNOFILE= for more");
            limits.conns_total = room;
            limits.conns_per_uid = limits.conns_per_uid.min(room);
        }
    }
    limits
}

/// glibc keeps freed memory for reuse; after request bodies were released,
/// hand the free pages back (at most once a second).
async fn trim_freed_memory(gate: Arc<Gate>, mut stopped: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = stopped.changed() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        if gate.take_freed() {
            let _ = tokio::task::spawn_blocking(crate::sandbox::memory::trim).await;
        }
    }
}

async fn accept_loop(listener: UnixListener, front: Arc<Front>, mut stopped: watch::Receiver<bool>) {
    let router = routes::router(Arc::clone(&front));
    let graceful = GracefulShutdown::new();
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = stopped.changed() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, typically: back off instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let peer = match stream.peer_cred() {
            Ok(c) => Peer { uid: c.uid(), gid: c.gid(), pid: c.pid() },
            Err(e) => {
                tracing::warn!("failed to read peer credentials, dropping connection: {e}");
                continue;
            }
        };
        let ticket = match front.gate.admit(peer.uid) {
            Ok(t) => t,
            Err(r) => {
                refuse(&front, &stream, peer, r);
                continue;
            }
        };
        let watched = serve(&front, &router, &graceful, stream, peer);
        conns.spawn(async move {
            if let Err(e) = watched.await {
                tracing::debug!(uid = peer.uid, "connection ended: {e}");
            }
            drop(ticket);
        });
    }
    drop(listener);
    // Idle connections close now, busy ones after their answer.
    let grace = front.gate.limits.write_timeout.min(Duration::from_secs(5));
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!("{} connection(s) still open after {grace:?}; closing them", conns.len());
    }
    conns.abort_all();
    while conns.join_next().await.is_some() {}
}

/// Answers a connection over its cap and closes it, without reading.
fn refuse(front: &Front, stream: &UnixStream, peer: Peer, r: Refusal) {
    let limits = &front.gate.limits;
    let e = match r {
        Refusal::Uid => ApiError::new(
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            "busy",
            format!(
                "this user has {} connections open to the broker, its share: close some, or reuse one (keep-alive)",
                limits.conns_per_uid
            ),
        ),
        Refusal::Total => ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            format!("the broker has {} connections open, its limit: retry in a moment", limits.conns_total),
        ),
    };
    let id = front.broker.next_request_id();
    tracing::debug!(uid = peer.uid, code = e.code, request_id = %id, "connection refused");
    // A fresh socket's buffer takes the whole answer; never wait for it.
    let _ = stream.try_write(&raw_response(&e, &id));
}

/// The HTTP connection of `peer`, ready to run, watched by `graceful`.
fn serve(
    front: &Arc<Front>,
    router: &axum::Router,
    graceful: &GracefulShutdown,
    stream: UnixStream,
    peer: Peer,
) -> impl std::future::Future<Output = Result<(), hyper::Error>> + Send + 'static {
    let limits = &front.gate.limits;
    let state = Arc::new(conn::ConnState::default());
    let ids_broker = Arc::clone(&front.broker);
    let ids: conn::IdSource = Arc::new(move || ids_broker.next_request_id());
    let io = conn::Guarded::new(stream, Arc::clone(&state), limits.header_timeout, limits.write_timeout, ids);
    let router = router.clone();
    let broker = Arc::clone(&front.broker);
    let below_worker = Arc::new(std::sync::OnceLock::new());
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        let serving = state.serving();
        let router = router.clone();
        let request_id: Arc<str> = broker.next_request_id().into();
        // Field names become journal fields CORRAL_REQUEST_ID, CORRAL_WORKFLOW, …
        let span = tracing::info_span!(
            "request",
            request_id = %request_id,
            workflow = tracing::field::Empty,
            tenant = tracing::field::Empty,
            member = tracing::field::Empty,
            uid = peer.uid,
            pid = ?peer.pid,
            method = %req.method(),
            path = %super::log::Escaped(req.uri().path()),
        );
        req.extensions_mut().insert(Caller { peer, request_id, below_worker: Arc::clone(&below_worker) });
        async move {
            let resp = router.oneshot(req.map(axum::body::Body::new)).await;
            drop(serving);
            resp
        }
        .instrument(span)
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.idle_timeout)
        .max_buf_size(limits.head_max.max(8192))
        .max_headers(limits.headers_max)
        .keep_alive(true);
    graceful.watch(builder.serve_connection(TokioIo::new(io), service))
}
