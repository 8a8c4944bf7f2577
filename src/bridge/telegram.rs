//! `corral bridge telegram`: long-polls the Bot API and turns each text
//! message into an ask of the broker, on behalf of the member linked to
//! the sender's Telegram id, in the session of its chat.
//!
//! - Chats run concurrently; the messages of one chat are handled one at a
//!   time, in order (a queue and a task per chat with work).
//! - One failing update never stops the loop: a broker error becomes a
//!   short reply, a panic ends only that update.
//! - Updates are confirmed to Telegram by the next `getUpdates` (its
//!   `offset`), which the loop makes as soon as it has queued a batch: an
//!   update is handed over at most once. After a crash, the updates whose
//!   asks were running are not answered (they were confirmed); a batch
//!   received in the moment before the next poll may come again. SIGTERM
//!   stops polling and waits for the asks in flight (up to
//!   [`DRAIN_TIMEOUT`]).
//! - Bot API failures are retried after a backoff that doubles up to
//!   [`BACKOFF_MAX`] (or the `retry_after` Telegram gives); a refused token
//!   ends the bridge.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::{Method, StatusCode};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::botapi::{split_message, BotApi, BotApiError, Message, MESSAGE_LIMIT};
use crate::api::{
    AskBody, AskReply, ErrorReply, ASK_PATH, CHAT_HEADER, MEMBER_HEADER, REQUEST_ID_HEADER, SESSION_HEADER,
    WORKFLOW_HEADER,
};

/// The replies the bridge gives instead of an answer. Short, and the same
/// whatever the broker said: its messages are for the operator (the
/// bridge's log), not for whoever writes to the bot.
pub const NOT_A_MEMBER: &str = "Sorry, you are not a member.";
pub const NOT_ALLOWED: &str = "Sorry, that is not allowed here.";
pub const BUSY: &str = "Busy: please retry in a moment.";
pub const NO_ANSWER: &str = "Sorry, I found no answer in time.";
pub const FAILED: &str = "Sorry, something went wrong; please try again later.";

/// "typing…" lasts about 5 s in Telegram: renewed this often while an ask runs.
pub const TYPING_EVERY: Duration = Duration::from_secs(4);
/// Longest wait between two tries of a failing Bot API.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// How long SIGTERM waits for asks in flight.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);
/// Tries of one `sendMessage` before it is given up (and logged).
const SEND_TRIES: u32 = 4;

pub struct Options {
    pub api_base: String,
    pub socket: PathBuf,
    pub token: String,
    /// Sent as the ask's workflow; `None`: "" (the member's first workflow).
    pub workflow: Option<String>,
    pub poll_timeout: Duration,
}

/// What the broker's answer means for the chat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Answer(String),
    NoAnswer,
    /// 403 `unknown_member`: the sender is linked to no member.
    NotMember,
    /// Any other 403: the member (or the bridge) may not do this here.
    NotAllowed,
    /// 429: with `Retry-After` in seconds when the broker gave one.
    SlowDown(Option<u64>),
    Failed,
}

impl Outcome {
    /// The text sent to the chat.
    pub fn reply(&self) -> String {
        match self {
            Outcome::Answer(a) => a.clone(),
            Outcome::NoAnswer => NO_ANSWER.into(),
            Outcome::NotMember => NOT_A_MEMBER.into(),
            Outcome::NotAllowed => NOT_ALLOWED.into(),
            Outcome::SlowDown(Some(s)) => slow_down(*s),
            Outcome::SlowDown(None) => BUSY.into(),
            Outcome::Failed => FAILED.into(),
        }
    }
}

/// The reply to a 429 with `Retry-After: secs`.
pub fn slow_down(secs: u64) -> String {
    format!("Slow down: retry in {secs} s.")
}

/// The session of a chat: `tg-ID`, `tg-mID` for the negative ids of groups.
pub fn session_id(chat_id: i64) -> String {
    if chat_id < 0 {
        format!("tg-m{}", chat_id.unsigned_abs())
    } else {
        format!("tg-{chat_id}")
    }
}

/// The `x-corral-chat` of a Telegram chat type; `None`: not served (channels).
pub fn chat_kind(telegram_type: &str) -> Option<&'static str> {
    match telegram_type {
        "private" => Some("private"),
        "group" | "supergroup" => Some("group"),
        _ => None,
    }
}

/// Reads the broker's answer to an ask. Logs what the chat is not told.
pub fn classify(status: StatusCode, headers: &hyper::HeaderMap, body: &[u8], who: &str) -> Outcome {
    let header_id = headers.get(REQUEST_ID_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("-");
    if status.is_success() {
        return match serde_json::from_slice::<AskReply>(body) {
            Ok(r) => match r.answer {
                Some(a) if !a.trim().is_empty() => Outcome::Answer(a),
                _ => {
                    tracing::warn!(request_id = %r.request_id, "{who}: no answer after {} model calls", r.steps);
                    Outcome::NoAnswer
                }
            },
            Err(e) => {
                tracing::error!(request_id = %header_id, "{who}: unreadable answer from the broker: {e}");
                Outcome::Failed
            }
        };
    }
    let (code, message, request_id) = match serde_json::from_slice::<ErrorReply>(body) {
        Ok(e) => (e.error.code, e.error.message, e.error.request_id.unwrap_or_else(|| header_id.to_string())),
        Err(_) => ("-".to_string(), String::from_utf8_lossy(body).into_owned(), header_id.to_string()),
    };
    let outcome = match (status, code.as_str()) {
        (StatusCode::FORBIDDEN, "unknown_member") => Outcome::NotMember,
        (StatusCode::FORBIDDEN, _) => Outcome::NotAllowed,
        (StatusCode::TOO_MANY_REQUESTS, _) => Outcome::SlowDown(
            headers.get(hyper::header::RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok()),
        ),
        _ => Outcome::Failed,
    };
    match outcome {
        Outcome::NotMember => tracing::info!(request_id = %request_id, code = %code, "{who}: refused, not a member"),
        Outcome::SlowDown(_) => tracing::info!(request_id = %request_id, code = %code, "{who}: {message}"),
        _ => tracing::warn!(request_id = %request_id, code = %code, "{who}: the broker answered {status}: {message}"),
    }
    outcome
}

/// What every chat's task shares.
struct Ctx {
    api: BotApi,
    socket: PathBuf,
    workflow: Option<String>,
}

impl Ctx {
    /// One ask for `msg`'s sender, in its chat's session.
    async fn ask(&self, chat: i64, kind: &str, from: i64, text: &str) -> Outcome {
        let who = format!("telegram user {from} in chat {chat}");
        let body = AskBody {
            workflow: self.workflow.clone().unwrap_or_default(),
            prompt: text.to_string(),
            conversation: Vec::new(),
            stream: false,
            session: None, // in the header below
        };
        let Ok(body) = serde_json::to_vec(&body) else {
            return Outcome::Failed;
        };
        let member = format!("telegram:{from}");
        let session = session_id(chat);
        let mut headers =
            vec![(MEMBER_HEADER, member.as_str()), (CHAT_HEADER, kind), (SESSION_HEADER, session.as_str())];
        if let Some(w) = self.workflow.as_deref() {
            headers.push((WORKFLOW_HEADER, w));
        }
        match crate::client::request_with_headers(&self.socket, Method::POST, ASK_PATH, &headers, body).await {
            Ok((status, headers, body)) => classify(status, &headers, &body, &who),
            Err(e) => {
                tracing::error!("{who}: {e}");
                Outcome::Failed
            }
        }
    }

    /// Answers one message: "typing…" until the ask ends, then the reply.
    async fn handle(self: Arc<Self>, msg: Message) {
        let chat = msg.chat.id;
        let (Some(kind), Some(from), Some(text)) = (chat_kind(&msg.chat.kind), msg.from, msg.text) else {
            tracing::debug!("chat {chat}: not a text message of a person in a private chat or group; ignored");
            return;
        };
        if from.is_bot {
            return;
        }
        let typing = {
            let api = self.api.clone();
            tokio::spawn(async move {
                loop {
                    if let Err(e) = api.send_typing(chat).await {
                        tracing::debug!("chat {chat}: typing: {e}");
                    }
                    tokio::time::sleep(TYPING_EVERY).await;
                }
            })
        };
        let outcome = self.ask(chat, kind, from.id, &text).await;
        typing.abort();
        for part in split_message(&outcome.reply(), MESSAGE_LIMIT) {
            self.send(chat, &part).await;
        }
    }

    /// `sendMessage`, tried again after transient failures.
    async fn send(&self, chat: i64, text: &str) {
        let mut wait = Duration::from_secs(1);
        for attempt in 1..=SEND_TRIES {
            match self.api.send_message(chat, text).await {
                Ok(()) => return,
                Err(e) if e.is_transient() && attempt < SEND_TRIES => {
                    let d = e.retry_after().unwrap_or(wait).min(BACKOFF_MAX);
                    tracing::warn!("chat {chat}: {e}; try {attempt} of {SEND_TRIES}, again in {}s", d.as_secs());
                    tokio::time::sleep(d).await;
                    wait *= 2;
                }
                Err(e) => {
                    tracing::error!("chat {chat}: {e}; the reply is lost");
                    return;
                }
            }
        }
    }
}

/// The queue of one chat, while it has work.
struct ChatQueue {
    tx: mpsc::UnboundedSender<Message>,
    /// Messages queued and not yet answered.
    pending: Arc<AtomicUsize>,
}

struct Dispatcher {
    ctx: Arc<Ctx>,
    chats: HashMap<i64, ChatQueue>,
    tasks: JoinSet<()>,
}

impl Dispatcher {
    fn spawn_chat(&mut self) -> ChatQueue {
        let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
        let pending = Arc::new(AtomicUsize::new(0));
        let ctx = Arc::clone(&self.ctx);
        let left = Arc::clone(&pending);
        self.tasks.spawn(async move {
            while let Some(msg) = rx.recv().await {
                // Its own task: a panic ends this message only.
                if let Err(e) = tokio::spawn(Arc::clone(&ctx).handle(msg)).await {
                    tracing::error!("a message's handler failed: {e}");
                }
                left.fetch_sub(1, Ordering::SeqCst);
            }
        });
        ChatQueue { tx, pending }
    }

    /// Queues `msg` behind the earlier messages of its chat.
    fn dispatch(&mut self, msg: Message) {
        // Chats with nothing left: drop their queue, which ends their task
        // (only this loop queues, so nothing can arrive in between).
        self.chats.retain(|_, q| q.pending.load(Ordering::SeqCst) > 0);
        while self.tasks.try_join_next().is_some() {}
        let chat = msg.chat.id;
        if !self.chats.contains_key(&chat) {
            let q = self.spawn_chat();
            self.chats.insert(chat, q);
        }
        if let Some(q) = self.chats.get(&chat) {
            q.pending.fetch_add(1, Ordering::SeqCst);
            if let Err(mpsc::error::SendError(msg)) = q.tx.send(msg) {
                // The chat's task is gone (it cannot be, short of an abort):
                // a new one takes the message.
                let q = self.spawn_chat();
                q.pending.fetch_add(1, Ordering::SeqCst);
                let _ = q.tx.send(msg);
                self.chats.insert(chat, q);
            }
        }
    }

    /// Waits for the messages already queued, up to `limit`.
    async fn drain(mut self, limit: Duration) {
        self.chats.clear();
        let left = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(limit, left).await.is_err() {
            tracing::warn!("stopping with asks still in flight after {}s: they are not answered", limit.as_secs());
        }
    }
}

/// Whether the Bot API refuses the token itself: retrying cannot help.
fn token_refused(e: &BotApiError) -> bool {
    matches!(e, BotApiError::Refused { status: 401 | 404, .. })
}

/// Runs the bridge until SIGTERM or SIGINT (then `Ok`), or until the Bot
/// API refuses the token.
pub async fn run(opts: Options) -> anyhow::Result<()> {
    let api = BotApi::new(&opts.api_base, &opts.token, opts.poll_timeout).map_err(anyhow::Error::msg)?;
    let ctx = Arc::new(Ctx { api: api.clone(), socket: opts.socket.clone(), workflow: opts.workflow.clone() });
    let mut dispatcher = Dispatcher { ctx, chats: HashMap::new(), tasks: JoinSet::new() };
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut offset: Option<i64> = None;
    let mut wait = Duration::from_secs(1);
    tracing::info!(
        "telegram bridge: polling {} for the broker on {} (workflow: {})",
        opts.api_base,
        opts.socket.display(),
        opts.workflow.as_deref().unwrap_or("each member's first")
    );
    loop {
        let polled = tokio::select! {
            r = api.get_updates(offset) => r,
            _ = sigterm.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        };
        match polled {
            Ok(updates) => {
                wait = Duration::from_secs(1);
                for u in updates {
                    // An update before the offset was confirmed already (and
                    // handed over): never a second time.
                    if offset.is_some_and(|o| u.update_id < o) {
                        continue;
                    }
                    offset = Some(u.update_id + 1);
                    if let Some(msg) = u.message {
                        dispatcher.dispatch(msg);
                    }
                }
            }
            Err(e) if token_refused(&e) => {
                anyhow::bail!("{e}: the bot token is refused; put BotFather's token into the token file and restart");
            }
            Err(e) => {
                let d = e.retry_after().unwrap_or(wait).min(BACKOFF_MAX);
                tracing::warn!("{e}; polling again in {}s", d.as_secs());
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = sigterm.recv() => break,
                    _ = tokio::signal::ctrl_c() => break,
                }
                wait = (wait * 2).min(BACKOFF_MAX);
            }
        }
    }
    tracing::info!("telegram bridge: stopping; waiting for the asks in flight");
    dispatcher.drain(DRAIN_TIMEOUT).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> hyper::HeaderMap {
        let mut h = hyper::HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap_or_else(|_| hyper::header::HeaderValue::from_static("")));
        }
        h
    }

    fn error(code: &str, message: &str) -> Vec<u8> {
        serde_json::json!({"error": {"code": code, "message": message, "request_id": "r-1"}}).to_string().into_bytes()
    }

    #[test]
    fn broker_errors_become_short_replies_without_detail() {
        let none = hyper::HeaderMap::new();
        let secret = "member alice of tenant fam has no workflow helper";
        let out = classify(StatusCode::FORBIDDEN, &none, &error("unknown_member", secret), "t");
        assert_eq!(out.reply(), NOT_A_MEMBER);
        let out = classify(StatusCode::FORBIDDEN, &none, &error("forbidden", secret), "t");
        assert_eq!(out.reply(), NOT_ALLOWED);
        let h = headers(&[("retry-after", "7")]);
        let out = classify(StatusCode::TOO_MANY_REQUESTS, &h, &error("rate_limited", secret), "t");
        assert_eq!(out.reply(), "Slow down: retry in 7 s.");
        let out = classify(StatusCode::TOO_MANY_REQUESTS, &none, &error("busy", secret), "t");
        assert_eq!(out.reply(), BUSY);
        let out = classify(StatusCode::INTERNAL_SERVER_ERROR, &none, &error("internal", secret), "t");
        assert_eq!(out.reply(), FAILED);
        let out = classify(StatusCode::BAD_GATEWAY, &none, b"not json", "t");
        assert_eq!(out, Outcome::Failed);
    }

    #[test]
    fn chats_and_sessions() {
        assert_eq!(session_id(42), "tg-42");
        assert_eq!(session_id(-100123), "tg-m100123");
        assert_eq!(session_id(i64::MIN), "tg-m9223372036854775808");
        assert_eq!(chat_kind("private"), Some("private"));
        assert_eq!(chat_kind("supergroup"), Some("group"));
        assert_eq!(chat_kind("group"), Some("group"));
        assert_eq!(chat_kind("channel"), None);
    }
}
