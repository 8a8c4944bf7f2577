//! `corral usage`: tokens per workflow, tenant or model, read straight from
//! the broker's ledger file (no broker needed; root, or whoever may read
//! the state directory).

use std::path::Path;

use crate::broker::ledger::{GroupBy, Ledger, FILE_NAME};
use crate::utc;

pub fn run(state_dir: &Path, since: Option<&str>, by: GroupBy, json: bool) -> anyhow::Result<u8> {
    let since_ts = match since {
        Some(d) => utc::parse_date(d)?,
        None => 0,
    };
    let path = state_dir.join(FILE_NAME);
    if !path.exists() {
        anyhow::bail!(
            "no ledger at {}: the broker has not run with this --state-dir yet, or point --state-dir at its state directory",
            path.display()
        );
    }
    let rows = Ledger::open_read_only(&path)?.usage(since_ts, by)?;
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
