//! `corral exec WORKFLOW -- CMD ARGS…`: run one command in a workflow's
//! sandbox and behave like that command (its output, its exit code).

use std::io::{Read, Write};
use std::path::Path;

use hyper::Method;

use super::{describe_error, EXIT_CORRAL};
use crate::api::{decode_bytes, ExecBody, ExecReply, EXEC_PATH};
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
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
        return Ok(exit_code(&reply));
    }
    std::io::stdout().write_all(&decode_bytes(&reply.stdout, reply.stdout_base64.as_deref())?)?;
    std::io::stdout().flush()?;
    std::io::stderr().write_all(&decode_bytes(&reply.stderr, reply.stderr_base64.as_deref())?)?;
    if let Some(err) = &reply.error {
        eprintln!("corral: {err}");
    }
    if let Some(hint) = &reply.sandbox_hint {
        eprintln!("corral: {hint}");
    }
    if reply.truncated {
        eprintln!("corral: output truncated at the workflow's output_max");
    }
    if reply.timed_out {
        eprintln!("corral: timed out after {:.0} ms; the command and everything it started were killed", reply.wall_ms);
    }
    Ok(exit_code(&reply))
}
