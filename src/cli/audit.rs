//! `corral audit`: recent exec and ask calls from the broker's audit trail
//! (`GET /v1/audit`: each user their own, root everyone's), and `corral
//! audit verify` (`GET /v1/audit/verify`, root): does the hash chain hold.

use std::path::Path;

use hyper::Method;

use super::{describe_error, EXIT_CORRAL};
use crate::api::{AuditRecord, AuditVerify, AUDIT_PATH, AUDIT_VERIFY_PATH};
use crate::client;

/// Exit code of `corral audit verify` when the chain is broken.
pub const EXIT_BROKEN: u8 = 1;

pub struct Filter<'a> {
    pub uid: Option<u32>,
    pub workflow: Option<&'a str>,
    pub member: Option<&'a str>,
    pub since: Option<&'a str>,
    pub limit: Option<u32>,
}

pub async fn list(socket: &Path, f: &Filter<'_>, json: bool) -> anyhow::Result<u8> {
    let mut query: Vec<String> = Vec::new();
    if let Some(d) = f.since {
        // Checked here, so it is plain digits and dashes in the query.
        crate::utc::parse_date(d)?;
        query.push(format!("since={}", d.trim()));
    }
    if let Some(u) = f.uid {
        query.push(format!("uid={u}"));
    }
    if let Some(w) = f.workflow {
        if !w.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            anyhow::bail!("--workflow {w:?}: a workflow name is letters, digits, '-', '_' and '.'");
        }
        query.push(format!("workflow={w}"));
    }
    if let Some(m) = f.member {
        if !m.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_".contains(c)) {
            anyhow::bail!("--member {m:?}: a member name is a-z, 0-9, '-' and '_'");
        }
        query.push(format!("member={m}"));
    }
    if let Some(n) = f.limit {
        query.push(format!("limit={n}"));
    }
    let path = if query.is_empty() { AUDIT_PATH.to_string() } else { format!("{AUDIT_PATH}?{}", query.join("&")) };
    let (status, bytes) = client::request(socket, Method::GET, &path, None).await?;
    if !status.is_success() {
        eprintln!("corral: {}", describe_error(status, &bytes));
        return Ok(EXIT_CORRAL);
    }
    let rows: Vec<AuditRecord> = serde_json::from_slice(&bytes)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(0);
    }
    println!(
        "{:>6}  {:<20}  {:<4}  {:<16}  {:>6}  {:<12}  {:<12}  LIMIT",
        "ID", "TIME (UTC)", "KIND", "WORKFLOW", "UID", "MEMBER", "OUTCOME"
    );
    for r in &rows {
        println!(
            "{:>6}  {:<20}  {:<4}  {:<16}  {:>6}  {:<12}  {:<12}  {}",
            r.id,
            crate::utc::format(r.time),
            r.kind,
            r.workflow,
            r.uid,
            r.member.as_deref().unwrap_or("-"),
            r.outcome,
            r.limit.as_deref().unwrap_or("-")
        );
    }
    Ok(0)
}

pub async fn verify(socket: &Path, json: bool) -> anyhow::Result<u8> {
    let (status, bytes) = client::request(socket, Method::GET, AUDIT_VERIFY_PATH, None).await?;
    if !status.is_success() {
        eprintln!("corral: {}", describe_error(status, &bytes));
        return Ok(EXIT_CORRAL);
    }
    let v: AuditVerify = serde_json::from_slice(&bytes)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if v.ok {
        println!("audit trail intact: {} row(s), each linked to the one before", v.rows);
    } else {
        println!(
            "audit trail BROKEN at row {}: {}",
            v.broken_at.unwrap_or_default(),
            v.why.as_deref().unwrap_or("the chain does not hold")
        );
    }
    Ok(if v.ok { 0 } else { EXIT_BROKEN })
}
