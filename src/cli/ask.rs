//! `corral ask WORKFLOW "prompt"`: one prompt through a workflow's agent
//! loop; prints the answer (`--json`: the whole reply).

use std::path::Path;
use std::time::{Duration, Instant};

use hyper::Method;

use super::{describe_error, EXIT_CORRAL};
use crate::api::{AskBody, AskReply, ASK_PATH};
use crate::client;

/// Exit code when the loop stopped at `max_steps` without an answer.
pub const EXIT_NO_ANSWER: u8 = 1;

/// Sends one ask. `Err` is a one-line reason (connection, broker error).
pub async fn ask(
    socket: &Path,
    workflow: &str,
    prompt: &str,
    session: Option<&str>,
) -> Result<(AskReply, Duration), String> {
    let body = AskBody {
        workflow: workflow.to_string(),
        prompt: prompt.to_string(),
        conversation: Vec::new(),
        stream: false,
        session: session.map(str::to_string),
    };
    let started = Instant::now();
    let bytes = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
    let (status, reply) = client::request_for(socket, Method::POST, ASK_PATH, Some(workflow), Some(bytes))
        .await
        .map_err(|e| e.to_string())?;
    let elapsed = started.elapsed();
    if !status.is_success() {
        return Err(describe_error(status, &reply));
    }
    let reply = serde_json::from_slice(&reply).map_err(|e| format!("unreadable reply from the broker: {e}"))?;
    Ok((reply, elapsed))
}

pub async fn run(socket: &Path, workflow: &str, prompt: &str, session: Option<&str>, json: bool) -> anyhow::Result<u8> {
    let reply = match ask(socket, workflow, prompt, session).await {
        Ok((reply, _)) => reply,
        Err(why) => {
            eprintln!("corral: {why}");
            return Ok(EXIT_CORRAL);
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
    } else if let Some(answer) = &reply.answer {
        println!("{answer}");
    }
    if reply.answer.is_none() {
        if !json {
            eprintln!(
                "corral: no answer after {} model calls (llm.max_steps of {}); {} tool calls ran",
                reply.steps,
                reply.workflow,
                reply.transcript.len()
            );
        }
        return Ok(EXIT_NO_ANSWER);
    }
    Ok(0)
}
