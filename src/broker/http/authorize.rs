//! Who may use which workflow, as the gate and the endpoints ask it. To a
//! caller who may not use a workflow, one that does not exist and one that
//! does are refused alike.
//!
//! A call a delegate makes for a member is authorized by the member's
//! `workflows` in the members file, not by the workflows' `clients`: the
//! delegate (a bot) is the one connected, and it speaks for many people;
//! listing the bot in `clients` would let it use a workflow for anyone,
//! while the members file says per person which workflows she may use.

use std::sync::Arc;

use axum::http::StatusCode;
use axum::Extension;

use super::acting::Acting;
use super::error::ApiError;
use crate::api::WORKFLOW_HEADER;
use crate::broker::auth::{describe_uid, Peer};
use crate::broker::{Broker, Workflow};

/// A workflow the gate authorized from the `x-corral-workflow` header.
#[derive(Clone)]
pub(super) struct Early(pub Arc<Workflow>);

/// Whether `peer` sees every workflow: root and the broker's own user.
pub(super) fn sees_all(peer: &Peer) -> bool {
    peer.uid == 0 || peer.uid == nix::unistd::Uid::effective().as_raw()
}

/// The workflow `name`, when `peer` may use it; records it on the request's
/// span. To a caller who may not use it, a workflow that does not exist
/// and one that does are refused alike, so the answer tells nothing about
/// other tenants' workflows; only root and the broker's user learn which
/// exist.
pub(super) fn authorize(broker: &Broker, peer: &Peer, name: &str) -> Result<Arc<Workflow>, ApiError> {
    let found = broker.workflow(name).filter(|wf| wf.clients.allows(peer));
    let Some(wf) = found else {
        if sees_all(peer) {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_workflow",
                format!("no workflow named {:?}; known workflows: {}", name, broker.workflow_names().join(", ")),
            ));
        }
        let yours = broker.workflows_of(peer);
        let yours = if yours.is_empty() { "none".to_string() } else { yours.join(", ") };
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "uid {} may not use workflow {}: no workflow of that name lists this user in its clients \
                 (workflows this user may use: {yours}); to become its client, ask the broker's operator to add \
                 the user to its clients.users (or a group of the user to clients.groups) and run \
                 `systemctl reload corral`; `corral doctor --as USER` shows what a user may call",
                describe_uid(peer.uid),
                name.escape_debug()
            ),
        ));
    };
    let span = tracing::Span::current();
    span.record("workflow", wf.name.as_str());
    span.record("tenant", wf.policy.tenant.as_str());
    Ok(wf)
}

/// The workflow `name` for `acting`: by the member's list for a delegated
/// call, by the workflow's clients otherwise.
pub(super) fn authorize_for(
    broker: &Broker,
    peer: &Peer,
    acting: &Acting,
    name: &str,
) -> Result<Arc<Workflow>, ApiError> {
    let member = match &acting.member {
        Some(m) if acting.delegated => m,
        _ => return authorize(broker, peer, name),
    };
    let found = member.workflows.iter().any(|w| w == name).then(|| broker.workflow(name)).flatten();
    let Some(wf) = found else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "member {} may not use workflow {:?}: the members file lists for her only: {}",
                member.name,
                name.escape_debug().to_string(),
                member.workflows.join(", ")
            ),
        ));
    };
    let span = tracing::Span::current();
    span.record("workflow", wf.name.as_str());
    span.record("tenant", wf.policy.tenant.as_str());
    Ok(wf)
}

/// The workflow of a call: the one the gate authorized from the header,
/// which the body must then name too, or the body's; a call for a member
/// that names none gets her first workflow.
pub(super) fn resolve(
    broker: &Broker,
    peer: &Peer,
    acting: &Acting,
    early: Option<Extension<Early>>,
    named: &str,
) -> Result<Arc<Workflow>, ApiError> {
    let named: String = match (&acting.member, named, &early) {
        (Some(m), "", None) => m.workflows.first().cloned().unwrap_or_default(),
        (_, "", Some(Extension(Early(wf)))) => wf.name.clone(),
        _ => named.to_string(),
    };
    let named = named.as_str();
    match early {
        Some(Extension(Early(wf))) if wf.name == named => Ok(wf),
        Some(Extension(Early(wf))) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!(
                "{WORKFLOW_HEADER} names {} but the body names {}: send one workflow",
                wf.name,
                named.escape_debug()
            ),
        )),
        None => authorize_for(broker, peer, acting, named),
    }
}
