//! One client connection's byte stream, with the time limits hyper does not
//! keep itself and the one answer it cannot shape.
//!
//! hyper serves the connection (request parsing, keep-alive, the idle
//! timeout through its header-read timer, head size and header count caps).
//! This wrapper adds:
//! - a **head timeout** from a request head's first byte to its end: a
//!   client that stalls halfway through a head is answered 408 with the
//!   JSON error and dropped;
//! - a **write timeout**: a response the client does not read for
//!   [`Limits::write_timeout`] drops the connection, so a client cannot
//!   make the broker hold an answer forever;
//! - **JSON for hyper's automatic answers**: for a head that does not parse
//!   (bad header, head too large, URI too long) hyper writes a bare status
//!   line with an empty body and closes. Every answer the broker writes
//!   itself carries `x-corral-request-id`; an error status line without it
//!   can only be hyper's, and is replaced by the same status with the JSON
//!   error body.
//!
//! [`Limits::write_timeout`]: super::limits::Limits::write_timeout

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{sleep, Sleep};

use super::error::{raw_response, ApiError};
use crate::api::REQUEST_ID_HEADER;

/// What the request side tells the byte side: whether a request is being
/// served, and how many were.
#[derive(Default)]
pub struct ConnState {
    busy: AtomicBool,
    requests: AtomicU64,
}

impl ConnState {
    /// A request's head is complete and its handler runs until the guard
    /// drops.
    pub fn serving(self: &Arc<Self>) -> Serving {
        self.requests.fetch_add(1, Ordering::SeqCst);
        self.busy.store(true, Ordering::SeqCst);
        Serving(Arc::clone(self))
    }
}

pub struct Serving(Arc<ConnState>);

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.busy.store(false, Ordering::SeqCst);
    }
}

/// Makes request ids for the answers written here.
pub type IdSource = Arc<dyn Fn() -> String + Send + Sync>;

pub struct Guarded<S> {
    inner: S,
    state: Arc<ConnState>,
    head_timeout: Duration,
    write_timeout: Duration,
    ids: IdSource,
    /// Running while a request head is partly received: (requests served
    /// when it started, its deadline).
    head: Option<(u64, Pin<Box<Sleep>>)>,
    /// Running while a write makes no progress.
    stalled: Option<Pin<Box<Sleep>>>,
    /// Our replacement of one of hyper's automatic answers, and how much
    /// of it is written.
    replacement: Option<(Vec<u8>, usize)>,
}

impl<S> Guarded<S> {
    pub fn new(
        inner: S,
        state: Arc<ConnState>,
        head_timeout: Duration,
        write_timeout: Duration,
        ids: IdSource,
    ) -> Self {
        Guarded { inner, state, head_timeout, write_timeout, ids, head: None, stalled: None, replacement: None }
    }
}

/// The status of an automatic answer of hyper's in `buf`: an error status
/// line whose head lacks our request-id header.
fn automatic_error(buf: &[u8]) -> Option<StatusCode> {
    let rest = buf.strip_prefix(b"HTTP/1.1 ").or_else(|| buf.strip_prefix(b"HTTP/1.0 "))?;
    let code = std::str::from_utf8(rest.get(..3)?).ok()?.parse::<u16>().ok()?;
    let status = StatusCode::from_u16(code).ok()?;
    if !(status.is_client_error() || status.is_server_error()) {
        return None;
    }
    let window = &buf[..buf.len().min(1024)];
    let end = window.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&window[..end]).to_ascii_lowercase();
    (!head.contains(&format!("\r\n{REQUEST_ID_HEADER}:"))).then_some(status)
}

fn malformed(status: StatusCode) -> ApiError {
    let (code, message) = match status {
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => {
            ("too_large", "the request head (request line and headers) is too large".to_string())
        }
        StatusCode::URI_TOO_LONG => ("too_large", "the request URI is too long".to_string()),
        _ => {
            ("bad_request", format!("the request is not valid HTTP/1.1 ({status}): check its request line and headers"))
        }
    };
    ApiError::new(status, code, message)
}

impl<S: AsyncWrite + Unpin> Guarded<S> {
    /// Writes what is left of the replacement answer.
    fn poll_replacement(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, done)) = &mut self.replacement {
            if *done == bytes.len() {
                break;
            }
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &bytes[*done..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *done += n;
        }
        Poll::Ready(Ok(()))
    }

    /// `poll` of a write: a pending write starts the stall timer, progress
    /// stops it.
    fn stall_check<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let timeout = self.write_timeout;
        let timer = self.stalled.get_or_insert_with(|| Box::pin(sleep(timeout)));
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "the client did not read its answer")));
        }
        Poll::Pending
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let served = this.state.requests.load(Ordering::SeqCst);
        let busy = this.state.busy.load(Ordering::SeqCst);
        // A head that became a request is no longer a partial head.
        if busy || this.head.as_ref().is_some_and(|(at, _)| *at != served) {
            this.head = None;
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before && !busy && this.head.is_none() {
                    this.head = Some((served, Box::pin(sleep(this.head_timeout))));
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let Some((_, timer)) = &mut this.head else {
                    return Poll::Pending;
                };
                if timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                // Best effort: nothing else is being written on this
                // connection, so the answer fits the socket's buffer.
                let e = ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "timeout",
                    format!("the request head did not arrive within {:?}", this.head_timeout),
                );
                let answer = raw_response(&e, &(this.ids)());
                let _ = Pin::new(&mut this.inner).poll_write(cx, &answer);
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "request head timed out")))
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.replacement.is_some() {
            // hyper closes after its automatic answer; swallow anything more.
            let p = this.poll_replacement(cx);
            return this.stall_check(cx, p).map_ok(|()| buf.len());
        }
        if let Some(status) = automatic_error(buf) {
            let answer = raw_response(&malformed(status), &(this.ids)());
            this.replacement = Some((answer, 0));
            let p = this.poll_replacement(cx);
            // hyper's bytes count as written whatever happens to ours.
            return this.stall_check(cx, p).map_ok(|()| buf.len());
        }
        let p = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.stall_check(cx, p)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let p = match this.poll_replacement(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.inner).poll_flush(cx),
            other => other,
        };
        this.stall_check(cx, p)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let p = match this.poll_replacement(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.inner).poll_shutdown(cx),
            other => other,
        };
        this.stall_check(cx, p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bare_error_answers_are_hypers() {
        let hyper400 = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        assert_eq!(automatic_error(hyper400), Some(StatusCode::BAD_REQUEST));
        let hyper431 = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(automatic_error(hyper431), Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE));
        let ours = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nx-corral-request-id: 1-1\r\n\r\n{}";
        assert_eq!(automatic_error(ours), None);
        assert_eq!(automatic_error(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"), None);
        assert_eq!(automatic_error(b"HTTP/1.1 100 Continue\r\n\r\n"), None);
        // Body bytes of a JSON answer never hold a raw CRLF CRLF.
        assert_eq!(automatic_error(b"HTTP/1.1 400 in a \\r\\n\\r\\n string"), None);
    }
}
