//! `corral exec WORKFLOW -- CMD ARGS…`: run one command in a workflow's
//! sandbox and behave like that command (its output as it writes it, its
//! exit code). `--json` waits for the whole result instead.

use std::io::{Read, Write};
use std::path::Path;

use hyper::Method;

use super::{describe_error, EXIT_CORRAL};
use http_body_util::BodyExt;

use crate::api::{ExecBody, ExecEvent, ExecReply, Receipt, EXEC_PATH};
use crate::client;

/// Exit code of a timed-out command (as `timeout(1)`).
pub const EXIT_TIMEOUT: u8 = 124;

pub struct Args<'a> {
    pub socket: &'a Path,
    pub workflow: String,
    pub argv: Vec<String>,
    pub json: bool,
    pub send_stdin: bool,
    pub timeout_ms: Option<u64>,
    pub session: Option<String>,
}

/// The exit code a shell would show for this result.
pub fn exit_code(reply: &ExecReply) -> u8 {
    if reply.timed_out {
        return EXIT_TIMEOUT;
    }
    if let Some(sig) = reply.signal {
        return u8::try_from(128 + sig).unwrap_or(255);
    }
    if let Some(code) = reply.exit_code {
        return u8::try_from(code & 0xff).unwrap_or(1);
    }
    // Not started: 127 when not found, 126 when not executable (as sh does).
    match &reply.error {
        Some(e) if e.contains("No such file") => 127,
        _ => 126,
    }
}

pub async fn run(args: Args<'_>) -> anyhow::Result<u8> {
    let mut body = ExecBody {
        workflow: args.workflow,
        argv: args.argv,
        stdin: None,
        stdin_base64: None,
        timeout_ms: args.timeout_ms,
        stream: false,
        session: args.session,
    };
    if args.send_stdin {
        let mut input = Vec::new();
        std::io::stdin().read_to_end(&mut input)?;
        match String::from_utf8(input) {
            Ok(text) => body.stdin = Some(text),
            Err(e) => {
                use base64::Engine;
                body.stdin_base64 = Some(base64::engine::general_purpose::STANDARD.encode(e.into_bytes()));
            }
        }
    }
    if args.json {
        let (status, bytes) = client::request_for(
            args.socket,
            Method::POST,
            EXEC_PATH,
            Some(&body.workflow),
            Some(serde_json::to_vec(&body)?),
        )
        .await?;
        if !status.is_success() {
            eprintln!("corral: {}", describe_error(status, &bytes));
            return Ok(EXIT_CORRAL);
        }
        let reply: ExecReply = serde_json::from_slice(&bytes)?;
        println!("{}", serde_json::to_string_pretty(&reply)?);
        return Ok(exit_code(&reply));
    }
    // Live: the output as the command writes it, the result last.
    body.stream = true;
    let (status, mut answer) = client::request_streamed(
        args.socket,
        Method::POST,
        EXEC_PATH,
        Some(&body.workflow),
        Some(serde_json::to_vec(&body)?),
    )
    .await?;
    if !status.is_success() {
        let bytes = answer.collect().await?.to_bytes();
        eprintln!("corral: {}", describe_error(status, &bytes));
        return Ok(EXIT_CORRAL);
    }
    let mut pending: Vec<u8> = Vec::new();
    let mut result = None;
    while let Some(frame) = answer.frame().await {
        let Ok(data) = frame?.into_data() else { continue };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            match serde_json::from_slice::<ExecEvent>(&line)? {
                ExecEvent::Stdout(c) => {
                    std::io::stdout().write_all(&c.bytes()?)?;
                    std::io::stdout().flush()?;
                }
                ExecEvent::Stderr(c) => std::io::stderr().write_all(&c.bytes()?)?,
                ExecEvent::Result(reply) => result = Some(reply),
                ExecEvent::Error(e) => {
                    eprintln!("corral: {}", e.error.message);
                    return Ok(EXIT_CORRAL);
                }
            }
        }
    }
    let Some(reply) = result else {
        eprintln!("corral: the broker ended the answer before the call's result; see its log");
        return Ok(EXIT_CORRAL);
    };
    Ok(report(&reply))
}

/// What the CLI says about a call after its output; the exit code.
fn report(reply: &ExecReply) -> u8 {
    if let Some(err) = &reply.error {
        eprintln!("corral: {err}");
    }
    if let Some(hint) = &reply.sandbox_hint {
        eprintln!("corral: {hint}");
    }
    if reply.truncated {
        eprintln!("corral: output truncated at the workflow's output_max");
    }
    if let Some(line) = reply.receipt.as_ref().and_then(receipt_line) {
        eprintln!("{line}");
    }
    if let Some(egress) = &reply.egress {
        for r in &egress.refused {
            eprintln!("corral: egress refused {}:{} ({}x): {}", r.host, r.port, r.attempts, r.reason);
        }
        if let Some(cap) = &egress.capped {
            eprintln!("corral: egress stopped: {cap}");
        }
    }
    if reply.timed_out {
        eprintln!("corral: timed out after {:.0} ms; the command and everything it started were killed", reply.wall_ms);
    }
    exit_code(reply)
}

/// `1536` → `1.5 KiB`.
fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// The receipt in one line, when there is something to say: the call
/// changed the workspace or reached a limit. A call that changed nothing
/// and hit nothing prints no line, so `corral exec` still behaves like the
/// command.
pub fn receipt_line(r: &Receipt) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(c) = &r.changes {
        let changed = c.created_count + c.modified_count + c.deleted_count.unwrap_or(0);
        if changed > 0 || c.incomplete.is_some() {
            let deleted = c.deleted_count.map_or("? deleted".to_string(), |n| format!("{n} deleted"));
            parts.push(format!("{} created, {} modified, {deleted}", c.created_count, c.modified_count));
        }
        if let Some(why) = &c.incomplete {
            parts.push(format!("partial: {why}"));
        }
    }
    if let Some(limit) = &r.ended_by {
        parts.push(format!("ended by {limit}"));
    }
    let also: Vec<&str> =
        r.limits_reached.iter().map(String::as_str).filter(|l| r.ended_by.as_deref() != Some(*l)).collect();
    if !also.is_empty() {
        parts.push(format!("reached {}", also.join(", ")));
    }
    if parts.is_empty() {
        return None;
    }
    if let (Some(peak), Some(source)) = (r.memory_peak_bytes, &r.memory_peak_source) {
        parts.push(format!("peak memory {} ({source})", size(peak)));
    }
    parts.push(format!("cpu {:.0} ms", r.cpu_ms));
    Some(format!("corral: receipt: {}", parts.join("; ")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::protocol::WorkspaceChanges;

    #[test]
    fn the_receipt_line_appears_only_when_there_is_news() {
        let quiet = Receipt {
            changes: Some(WorkspaceChanges { deleted_count: Some(0), ..WorkspaceChanges::default() }),
            ended_by: None,
            limits_reached: Vec::new(),
            memory_peak_bytes: Some(3 << 20),
            memory_peak_source: Some("rusage:maxrss".into()),
            cpu_ms: 1.0,
        };
        assert_eq!(receipt_line(&quiet), None);
        let busy = Receipt {
            changes: Some(WorkspaceChanges {
                created_count: 2,
                modified_count: 1,
                deleted_count: Some(0),
                ..WorkspaceChanges::default()
            }),
            ended_by: Some("timeout".into()),
            limits_reached: vec!["timeout".into(), "output_max".into()],
            ..quiet
        };
        assert_eq!(
            receipt_line(&busy).unwrap(),
            "corral: receipt: 2 created, 1 modified, 0 deleted; ended by timeout; reached output_max; \
             peak memory 3.0 MiB (rusage:maxrss); cpu 1 ms"
        );
    }
}
