//! Answers written while their call runs: NDJSON lines (`/v1/exec`,
//! `/v1/ask`) or server-sent events (`/v1/chat/completions`).
//!
//! A [`Streamed`] body writes each event of the call as it comes, and the
//! call's own answer last. It drives the call itself: when the client goes
//! away, hyper drops the body, and with it the call's future, which cancels
//! the call exactly as a plain request's dropped handler does.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use hyper::body::{Bytes, Frame};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::api::Chunk;

pub const NDJSON: &str = "application/x-ndjson";
pub const SSE: &str = "text/event-stream";

/// Turns one event into bytes; `None`: the call is over, flush.
pub type Render<T> = Box<dyn FnMut(Option<T>) -> Vec<u8> + Send>;

pub struct Streamed<T, F> {
    /// Written first, at once.
    head: Option<Vec<u8>>,
    events: UnboundedReceiver<T>,
    render: Render<T>,
    work: Option<Pin<Box<F>>>,
}

/// A 200 answer of `content_type` that writes `head`, then `events` as
/// they come, then what `work` ends with.
pub fn response<T, F>(
    content_type: &'static str,
    head: Vec<u8>,
    events: UnboundedReceiver<T>,
    render: Render<T>,
    work: F,
) -> Response
where
    T: Send + 'static,
    F: Future<Output = Vec<u8>> + Send + 'static,
{
    let head = (!head.is_empty()).then_some(head);
    let body = Streamed { head, events, render, work: Some(Box::pin(work)) };
    let mut resp = Response::new(axum::body::Body::new(body));
    *resp.status_mut() = StatusCode::OK;
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

impl<T, F> hyper::body::Body for Streamed<T, F>
where
    F: Future<Output = Vec<u8>>,
{
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(head) = this.head.take() {
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(head)))));
        }
        let Some(work) = this.work.as_mut() else {
            return Poll::Ready(None);
        };
        // Events first: a call's events are all queued before its answer.
        if let Poll::Ready(Some(event)) = this.events.poll_recv(cx) {
            let bytes = (this.render)(Some(event));
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(bytes)))));
        }
        let Poll::Ready(last) = work.as_mut().poll(cx) else {
            return Poll::Pending;
        };
        this.work = None;
        let mut bytes = Vec::new();
        while let Ok(event) = this.events.try_recv() {
            bytes.extend((this.render)(Some(event)));
        }
        bytes.extend((this.render)(None));
        bytes.extend(last);
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(bytes)))))
    }

    fn is_end_stream(&self) -> bool {
        self.work.is_none()
    }
}

/// One JSON line.
pub fn line<T: serde::Serialize>(value: &T) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(value).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

/// One server-sent event.
pub fn sse<T: serde::Serialize>(value: &T) -> Vec<u8> {
    let mut bytes = b"data: ".to_vec();
    bytes.extend(serde_json::to_vec(value).unwrap_or_default());
    bytes.extend(b"\n\n");
    bytes
}

/// Splits a byte stream into [`Chunk`]s without cutting a character: the
/// start of a character whose rest has not come yet waits for it.
#[derive(Default)]
pub struct Utf8Splitter {
    pending: Vec<u8>,
}

impl Utf8Splitter {
    /// The chunk to send for `data`, if any.
    pub fn push(&mut self, data: &[u8]) -> Option<Chunk> {
        self.pending.extend_from_slice(data);
        let keep = match std::str::from_utf8(&self.pending) {
            Ok(_) => 0,
            // An incomplete character at the end, and nothing bad before.
            Err(e) if e.error_len().is_none() => self.pending.len() - e.valid_up_to(),
            Err(_) => 0,
        };
        let tail = self.pending.split_off(self.pending.len() - keep);
        let head = std::mem::replace(&mut self.pending, tail);
        (!head.is_empty()).then(|| Chunk::new(&head))
    }

    /// What is left at the end (bytes that never became a character).
    pub fn finish(&mut self) -> Option<Chunk> {
        let rest = std::mem::take(&mut self.pending);
        (!rest.is_empty()).then(|| Chunk::new(&rest))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn characters_are_never_cut() {
        let mut s = Utf8Splitter::default();
        let check = "é✓".as_bytes(); // 2 + 3 bytes
        assert_eq!(s.push(&check[..1]).map(|c| c.data), None);
        let c = s.push(&check[1..3]).unwrap();
        assert_eq!((c.data.as_deref(), c.data_base64), (Some("é"), None));
        let c = s.push(&check[3..]).unwrap();
        assert_eq!(c.data.as_deref(), Some("✓"));
        assert!(s.finish().is_none());
        // Bytes that are not UTF-8 go as base64, exactly.
        let c = s.push(b"a\xffb").unwrap();
        assert_eq!((c.data.clone(), c.bytes().unwrap()), (None, b"a\xffb".to_vec()));
        // A lone lead byte at the end is flushed as base64.
        assert!(s.push(b"\xe2").is_none());
        assert_eq!(s.finish().unwrap().bytes().unwrap(), b"\xe2");
    }
}
