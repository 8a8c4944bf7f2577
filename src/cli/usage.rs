//! `corral usage`: tokens per workflow, tenant or model, from the broker
//! (`GET /v1/usage`): each user sees the calls they made, root sees all.

use std::path::Path;

use hyper::Method;

use super::{describe_error, EXIT_CORRAL};
use crate::api::GroupBy;
use crate::api::{UsageRow, USAGE_PATH};
use crate::client;

pub async fn run(socket: &Path, since: Option<&str>, by: GroupBy, json: bool) -> anyhow::Result<u8> {
    let by_name = match by {
        GroupBy::Workflow => "workflow",
        GroupBy::Tenant => "tenant",
        GroupBy::Model => "model",
    };
    let mut path = format!("{USAGE_PATH}?by={by_name}");
    if let Some(d) = since {
        // Checked here, so it is plain digits and dashes in the query.
        crate::utc::parse_date(d)?;
        path.push_str(&format!("&since={}", d.trim()));
    }
    let (status, bytes) = client::request(socket, Method::GET, &path, None).await?;
    if !status.is_success() {
        eprintln!("corral: {}", describe_error(status, &bytes));
        return Ok(EXIT_CORRAL);
    }
    let rows: Vec<UsageRow> = serde_json::from_slice(&bytes)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(0);
    }
    let head = match by {
        GroupBy::Workflow => "WORKFLOW",
        GroupBy::Tenant => "TENANT",
        GroupBy::Model => "MODEL",
    };
    let width = rows.iter().map(|r| r.key.chars().count()).max().unwrap_or(0).max(head.len());
    println!(
        "{head:<width$}  {:>7}  {:>6}  {:>12}  {:>12}  {:>12}",
        "CALLS", "FAILED", "PROMPT", "COMPLETION", "TOTAL"
    );
    let mut total = [0u64; 5];
    for r in &rows {
        println!(
            "{:<width$}  {:>7}  {:>6}  {:>12}  {:>12}  {:>12}",
            r.key, r.calls, r.failed, r.prompt_tokens, r.completion_tokens, r.total_tokens
        );
        for (t, v) in total.iter_mut().zip([r.calls, r.failed, r.prompt_tokens, r.completion_tokens, r.total_tokens]) {
            *t += v;
        }
    }
    println!(
        "{:<width$}  {:>7}  {:>6}  {:>12}  {:>12}  {:>12}",
        "(all)", total[0], total[1], total[2], total[3], total[4]
    );
    Ok(0)
}
