//! On whose behalf a request is made: a member of the members file, when a
//! delegate names her (`x-corral-member`), or when her own unix login
//! calls; and the kind of chat a delegate speaks for (`x-corral-chat`).
//! The gate resolves it for every request and puts it in the request's
//! extensions as an [`Acting`].

use std::sync::Arc;

use axum::http::{HeaderMap, StatusCode};

use super::error::ApiError;
use crate::api::{CHAT_HEADER, MEMBER_HEADER};
use crate::broker::auth::{describe_uid, Peer};
use crate::policy::{Chat, Member, Members};

/// Who a request acts for.
#[derive(Debug, Clone, Default)]
pub struct Acting {
    /// The member, when there is one.
    pub member: Option<Arc<Member>>,
    /// The chat a delegate speaks for (`private` for everyone else).
    pub chat: Chat,
    /// Whether a delegate named the member: her workflow list and her
    /// rights in `chat` apply instead of the workflows' `clients`.
    pub delegated: bool,
}

impl Acting {
    /// The member's name, for the ledger and the audit trail.
    pub fn member_name(&self) -> Option<&str> {
        self.member.as_deref().map(|m| m.name.as_str())
    }

    /// The tools a delegated call may use; `None` (every tool) otherwise.
    pub fn tools(&self) -> Option<Vec<String>> {
        match &self.member {
            Some(m) if self.delegated => Some(m.tools(self.chat).to_vec()),
            _ => None,
        }
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.trim()))
            .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", format!("{name} is not text"))),
    }
}

/// Resolves the member of a request from `peer` and its headers.
pub(super) fn resolve(members: &Members, peer: &Peer, headers: &HeaderMap) -> Result<Acting, ApiError> {
    let Some(claim) = header(headers, MEMBER_HEADER)? else {
        // Her own login calling: her calls, her limits.
        return Ok(Acting { member: members.by_uid(peer.uid).cloned(), chat: Chat::Private, delegated: false });
    };
    if !members.is_delegate(peer.uid) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "uid {} may not act for a member ({MEMBER_HEADER}): only the users the members file lists in \
                 [delegates] users may; call without the header to act as yourself",
                describe_uid(peer.uid)
            ),
        ));
    }
    let chat = match header(headers, CHAT_HEADER)? {
        None | Some("private") => Chat::Private,
        Some("group") => Chat::Group,
        Some(other) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("{CHAT_HEADER} {:?}: use private or group", other.escape_debug().to_string()),
            ))
        }
    };
    let found = match claim.strip_prefix("telegram:") {
        Some(id) => id.parse::<i64>().ok().and_then(|id| members.by_telegram(id)),
        None => members.by_name(claim),
    };
    let Some(member) = found else {
        let what = if claim.starts_with("telegram:") { "no member is linked to" } else { "no member named" };
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "unknown_member",
            format!(
                "{what} {:?} in the members file: add the member (or the Telegram id to a member's telegram) and \
                 reload the broker",
                claim.escape_debug().to_string()
            ),
        ));
    };
    Ok(Acting { member: Some(Arc::clone(member)), chat, delegated: true })
}

/// Refuses an exec made for a member whose rights in this chat do not
/// include `shell`.
pub(super) fn may_exec(acting: &Acting) -> Result<(), ApiError> {
    let Some(tools) = acting.tools() else { return Ok(()) };
    if tools.iter().any(|t| t == "shell") {
        return Ok(());
    }
    let name = acting.member_name().unwrap_or("?");
    let chat = acting.chat.as_str();
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "forbidden",
        format!(
            "member {name} may not run commands from a {chat} chat: the members file's chats.{chat} of {name} does \
             not include shell (it allows: {})",
            if tools.is_empty() { "nothing".to_string() } else { tools.join(", ") }
        ),
    ))
}
