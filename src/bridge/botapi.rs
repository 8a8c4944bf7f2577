//! A small client of the Telegram Bot API: `getUpdates` (long polling),
//! `sendMessage` and `sendChatAction`, as JSON POSTs to
//! `{api_base}/bot{token}/{method}`.
//!
//! The token is part of every URL, so no error of this module carries a
//! URL: reqwest's errors are stripped of theirs ([`reqwest::Error::without_url`])
//! before they are kept or shown.

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

/// Telegram's limit on the text of one message, in UTF-16 code units.
pub const MESSAGE_LIMIT: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BotApiError {
    /// No answer: connection refused, timeout, TLS. The error carries no URL.
    #[error("the Bot API could not be reached ({method}): {source}")]
    Transport { method: &'static str, source: reqwest::Error },
    /// The Bot API answered `ok: false` (or not JSON).
    #[error("the Bot API refused {method}: {status} {description}")]
    Refused {
        method: &'static str,
        status: u16,
        description: String,
        /// `parameters.retry_after` of a 429.
        retry_after: Option<u64>,
    },
}

impl BotApiError {
    /// Whether trying again later may succeed: no answer, 429 and 5xx (a
    /// 400 "chat not found" or a 401 bad token will not get better).
    pub fn is_transient(&self) -> bool {
        match self {
            BotApiError::Transport { .. } => true,
            BotApiError::Refused { status, .. } => *status == 429 || *status >= 500,
        }
    }

    /// The wait the Bot API asked for (429).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            BotApiError::Refused { retry_after: Some(s), .. } => Some(Duration::from_secs(*s)),
            _ => None,
        }
    }
}

/// The parts of an update the bridge reads; everything else is ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct Update {
    pub update_id: i64,
    #[serde(default)]
    pub message: Option<Message>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Message {
    pub chat: Chat,
    #[serde(default)]
    pub from: Option<User>,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Chat {
    pub id: i64,
    /// "private", "group", "supergroup" or "channel".
    #[serde(rename = "type")]
    pub kind: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct User {
    pub id: i64,
    #[serde(default)]
    pub is_bot: bool,
}

#[derive(Deserialize)]
struct Answer {
    ok: bool,
    #[serde(default)]
    result: Value,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    parameters: Option<Parameters>,
}

#[derive(Deserialize)]
struct Parameters {
    #[serde(default)]
    retry_after: Option<u64>,
}

/// The Bot API of one bot.
#[derive(Clone)]
pub struct BotApi {
    http: reqwest::Client,
    /// `{api_base}/bot{token}/`: secret, never logged.
    prefix: String,
    /// How long a `getUpdates` waits for an update (long polling).
    poll_timeout: Duration,
}

impl std::fmt::Debug for BotApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BotApi").field("poll_timeout", &self.poll_timeout).finish_non_exhaustive()
    }
}

impl BotApi {
    pub fn new(api_base: &str, token: &str, poll_timeout: Duration) -> Result<BotApi, String> {
        crate::broker::llm::install_tls_provider();
        // No redirects: a redirect would carry the token's URL elsewhere.
        // The timeout covers a long poll plus a margin for the answer.
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(poll_timeout + Duration::from_secs(15))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("failed to build the HTTP client: {}", e.without_url()))?;
        Ok(BotApi { http, prefix: format!("{}/bot{token}/", api_base.trim_end_matches('/')), poll_timeout })
    }

    async fn call(&self, method: &'static str, body: &Value) -> Result<Value, BotApiError> {
        let transport = |e: reqwest::Error| BotApiError::Transport { method, source: e.without_url() };
        let resp = self
            .http
            .post(format!("{}{method}", self.prefix))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .send()
            .await
            .map_err(transport)?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(transport)?;
        match serde_json::from_slice::<Answer>(&bytes) {
            Ok(a) if a.ok => Ok(a.result),
            Ok(a) => Err(BotApiError::Refused {
                method,
                status,
                description: a.description.unwrap_or_default(),
                retry_after: a.parameters.and_then(|p| p.retry_after),
            }),
            Err(_) => Err(BotApiError::Refused {
                method,
                status,
                description: "an answer that is not the Bot API's JSON".into(),
                retry_after: None,
            }),
        }
    }

    /// Updates from `offset` on, waiting up to the poll timeout for one.
    /// Asking with `offset` confirms every update before it to Telegram,
    /// which then never sends those again.
    pub async fn get_updates(&self, offset: Option<i64>) -> Result<Vec<Update>, BotApiError> {
        let mut body = serde_json::json!({
            "timeout": self.poll_timeout.as_secs(),
            "allowed_updates": ["message"],
        });
        if let Some(o) = offset {
            body["offset"] = o.into();
        }
        let result = self.call("getUpdates", &body).await?;
        // One update the bridge cannot read must not stop the others: read
        // each on its own, keeping at least its id so the offset moves on.
        let items = result.as_array().cloned().unwrap_or_default();
        Ok(items
            .into_iter()
            .filter_map(|item| {
                serde_json::from_value::<Update>(item.clone()).ok().or_else(|| {
                    let update_id = item.get("update_id")?.as_i64()?;
                    Some(Update { update_id, message: None })
                })
            })
            .collect())
    }

    pub async fn send_message(&self, chat_id: i64, text: &str) -> Result<(), BotApiError> {
        self.call("sendMessage", &serde_json::json!({"chat_id": chat_id, "text": text})).await.map(|_| ())
    }

    /// "typing…" in the chat, for about 5 s or until the next message.
    pub async fn send_typing(&self, chat_id: i64) -> Result<(), BotApiError> {
        self.call("sendChatAction", &serde_json::json!({"chat_id": chat_id, "action": "typing"})).await.map(|_| ())
    }
}

/// Splits `text` into messages of at most `limit` UTF-16 code units (as
/// Telegram counts), at the last line break or else space of a piece when
/// it lies in the piece's second half, else between two characters.
pub fn split_message(text: &str, limit: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        // The byte index where `limit` UTF-16 units end.
        let mut units = 0;
        let mut end = rest.len();
        for (i, c) in rest.char_indices() {
            if units + c.len_utf16() > limit {
                end = i;
                break;
            }
            units += c.len_utf16();
        }
        if end < rest.len() {
            let half = end / 2;
            let cut = rest[..end]
                .rfind('\n')
                .filter(|&i| i >= half)
                .or_else(|| rest[..end].rfind(' ').filter(|&i| i >= half));
            if let Some(i) = cut {
                // The separator ends this piece: it is not lost, and the
                // next piece starts with a word.
                end = i + 1;
            }
        }
        out.push(rest[..end].to_string());
        rest = &rest[end..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_keeps_every_character_and_respects_the_limit() {
        assert_eq!(split_message("hello", 4096), vec!["hello"]);
        assert!(split_message("", 4096).is_empty());
        let long = "word ".repeat(2000);
        let parts = split_message(&long, 4096);
        assert_eq!(parts.len(), 3);
        assert_eq!(parts.concat(), long);
        assert!(parts.iter().all(|p| p.encode_utf16().count() <= 4096));
        assert!(parts[0].ends_with(' '));
        // No space at all: cut at the limit; emoji count as two units.
        let emoji = "😀".repeat(3000);
        let parts = split_message(&emoji, 4096);
        assert_eq!(parts.concat(), emoji);
        assert_eq!(parts[0].encode_utf16().count(), 4096);
        assert!(parts.iter().all(|p| p.encode_utf16().count() <= 4096));
        // A line break is preferred to a space.
        let text = format!("{}\n{}", "a b ".repeat(700), "c".repeat(3000));
        let parts = split_message(&text, 4096);
        assert!(parts[0].ends_with('\n'), "{:?}", &parts[0][parts[0].len() - 5..]);
        assert_eq!(parts.concat(), text);
    }
}
