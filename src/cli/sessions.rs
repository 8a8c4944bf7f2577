//! `corral sessions`: the caller's sessions (`GET /v1/sessions`: each user
//! their own, root everyone's), and `corral sessions rm --workflow W ID`
//! (`DELETE /v1/sessions/{workflow}/{id}`).

use std::path::Path;

use hyper::Method;

use super::{describe_error, EXIT_CORRAL};
use crate::api::{SessionInfo, SessionRemoved, SESSIONS_PATH};
use crate::client;

/// A workflow name or session id as a path segment or query value: only
/// the characters both may hold, so nothing needs escaping.
fn plain(what: &str, text: &str) -> anyhow::Result<()> {
    if text.is_empty() || !text.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        anyhow::bail!("{what} {text:?}: use letters, digits, '-', '_' and '.'");
    }
    Ok(())
}

pub async fn list(socket: &Path, workflow: Option<&str>, json: bool) -> anyhow::Result<u8> {
    let path = match workflow {
        Some(w) => {
            plain("--workflow", w)?;
            format!("{SESSIONS_PATH}?workflow={w}")
        }
        None => SESSIONS_PATH.to_string(),
    };
    let (status, bytes) = client::request(socket, Method::GET, &path, None).await?;
    if !status.is_success() {
        eprintln!("corral: {}", describe_error(status, &bytes));
        return Ok(EXIT_CORRAL);
    }
    let rows: Vec<SessionInfo> = serde_json::from_slice(&bytes)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(0);
    }
    println!(
        "{:<16}  {:<24}  {:<12}  {:<20}  {:<20}  {:>8}",
        "WORKFLOW", "SESSION", "OWNER", "LAST USED (UTC)", "EXPIRES (UTC)", "MESSAGES"
    );
    for r in &rows {
        println!(
            "{:<16}  {:<24}  {:<12}  {:<20}  {:<20}  {:>8}",
            r.workflow,
            r.id,
            r.owner,
            crate::utc::format(r.last_used),
            crate::utc::format(r.expires),
            r.messages
        );
    }
    Ok(0)
}

pub async fn remove(socket: &Path, workflow: &str, id: &str, owner: Option<&str>, json: bool) -> anyhow::Result<u8> {
    plain("--workflow", workflow)?;
    plain("session", id)?;
    let mut path = format!("{SESSIONS_PATH}/{workflow}/{id}");
    if let Some(o) = owner {
        plain("--owner", o)?;
        path.push_str(&format!("?owner={o}"));
    }
    let (status, bytes) = client::request(socket, Method::DELETE, &path, None).await?;
    if !status.is_success() {
        eprintln!("corral: {}", describe_error(status, &bytes));
        return Ok(EXIT_CORRAL);
    }
    let r: SessionRemoved = serde_json::from_slice(&bytes)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("removed session {} of {} ({} removed)", r.id, r.workflow, r.removed);
    }
    Ok(0)
}
