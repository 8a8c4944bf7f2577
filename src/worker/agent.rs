//! The agent loop of an ask, inside the sandbox: send the conversation and
//! the tool definitions to the broker, run each tool call the model asks
//! for as a tool child ([`super::tool::run`], under the per-call Landlock
//! layer), feed the results back, and stop at a final answer or at
//! `max_steps`. Synchronous and single-threaded, like the rest of the
//! worker: the broker does the network.

use std::os::unix::net::UnixStream;
use std::path::{Component, Path};

use serde_json::{json, Value};

use super::{tool, WorkerError};
use crate::frame::{read_frame, write_frame};
use crate::protocol::{
    AskOutcome, AskRequest, AskStop, ChatMessage, CompleteRequest, ExecOutcome, ExecRequest, FromWorker, Role,
    Termination, ToWorker, ToolCall, ToolDone, ToolRecord, ToolSpec, Usage, MAX_TOOL_CALLS_PER_STEP,
};

/// Bytes of each output stream fed back to the model (the transcript
/// counts them all).
const RESULT_MAX: usize = 16 * 1024;

/// The tools every ask offers. Paths are relative to the workspace, the
/// working directory of every tool call.
pub fn tool_specs() -> Vec<ToolSpec> {
    let path = |what: &str| json!({"type": "string", "description": what});
    let spec = |name: &str, description: &str, parameters: Value| ToolSpec {
        name: name.to_string(),
        description: description.to_string(),
        parameters: parameters.to_string(),
    };
    vec![
        spec(
            "shell",
            "Run a shell command (sh -c) in the workspace. Returns its exit code, stdout and stderr.",
            json!({"type": "object", "properties": {"command": {"type": "string", "description": "the command line"}}, "required": ["command"]}),
        ),
        spec(
            "read_file",
            "Read a text file of the workspace.",
            json!({"type": "object", "properties": {"path": path("path relative to the workspace")}, "required": ["path"]}),
        ),
        spec(
            "write_file",
            "Create or replace a file of the workspace with the given content.",
            json!({"type": "object", "properties": {"path": path("path relative to the workspace"), "content": {"type": "string"}}, "required": ["path", "content"]}),
        ),
        spec(
            "list_dir",
            "List a directory of the workspace (ls -la).",
            json!({"type": "object", "properties": {"path": path("directory relative to the workspace; default \".\"")}}),
        ),
    ]
}

/// A path argument: relative, inside the workspace, no `..`.
fn workspace_path(args: &Value, key: &str, default: Option<&str>) -> Result<String, String> {
    let p = match args.get(key).and_then(Value::as_str).or(default) {
        Some(p) => p,
        None => return Err(format!("missing string argument {key:?}")),
    };
    let path = Path::new(p);
    let escapes = path.components().any(|c| matches!(c, Component::ParentDir | Component::RootDir));
    if p.is_empty() || p.contains('\0') || escapes {
        return Err(format!("{key} {p:?} is not a path inside the workspace: give a relative path without '..'"));
    }
    Ok(p.to_string())
}

/// The command a tool call runs: argv and stdin.
fn command(call: &ToolCall) -> Result<(Vec<String>, Vec<u8>), String> {
    let args: Value = if call.arguments.trim().is_empty() {
        json!({})
    } else {
        serde_json::from_str(&call.arguments)
            .map_err(|e| format!("the arguments are not valid JSON ({e}): {}", call.arguments))?
    };
    let s = |v: &str| v.to_string();
    match call.name.as_str() {
        "shell" => {
            let cmd = args.get("command").and_then(Value::as_str).ok_or("missing string argument \"command\"")?;
            if cmd.contains('\0') {
                return Err("the command contains a NUL byte".into());
            }
            Ok((vec![s("sh"), s("-c"), s(cmd)], Vec::new()))
        }
        "read_file" => {
            let p = workspace_path(&args, "path", None)?;
            Ok((vec![s("cat"), s("--"), p], Vec::new()))
        }
        "write_file" => {
            let p = workspace_path(&args, "path", None)?;
            let content = args.get("content").and_then(Value::as_str).ok_or("missing string argument \"content\"")?;
            Ok((vec![s("sh"), s("-c"), s("cat > \"$1\""), s("sh"), p], content.as_bytes().to_vec()))
        }
        "list_dir" => {
            let p = workspace_path(&args, "path", Some("."))?;
            Ok((vec![s("ls"), s("-la"), s("--"), p], Vec::new()))
        }
        other => Err(format!("unknown tool {other:?}: the tools are shell, read_file, write_file and list_dir")),
    }
}

/// At most [`RESULT_MAX`] bytes of `bytes`, as text, cut at a character.
fn excerpt(bytes: &[u8], truncated: bool) -> String {
    let text = String::from_utf8_lossy(bytes);
    if text.len() <= RESULT_MAX && !truncated {
        return text.into_owned();
    }
    let mut end = RESULT_MAX.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}\n[output truncated]", &text[..end])
}

/// What the model reads about a finished tool call.
fn result_text(o: &ExecOutcome, timeout_ms: u64) -> String {
    let status = if o.timed_out {
        format!("timed out after {timeout_ms} ms and was killed")
    } else {
        match o.termination {
            Termination::Exited(c) => format!("exit code {c}"),
            Termination::Signaled(s) => format!("killed by signal {s}"),
            Termination::NotStarted => format!("not started: {}", o.error.as_deref().unwrap_or("unknown reason")),
        }
    };
    format!(
        "{status}\nstdout:\n{}\nstderr:\n{}",
        excerpt(&o.stdout, o.stdout_truncated),
        excerpt(&o.stderr, o.stderr_truncated)
    )
}

fn refused(tool: &str, why: String) -> (ToolRecord, String) {
    let record = ToolRecord {
        tool: tool.to_string(),
        argv: Vec::new(),
        exit_code: None,
        signal: None,
        duration_ms: 0,
        stdout_bytes: 0,
        stderr_bytes: 0,
        truncated: false,
        timed_out: false,
        error: Some(why.clone()),
    };
    (record, format!("error: {why}"))
}

/// The tools `req` offers: all, or those its `tools` allows.
fn offered(req: &AskRequest) -> Vec<ToolSpec> {
    let mut specs = tool_specs();
    if let Some(allowed) = &req.tools {
        specs.retain(|t| allowed.contains(&t.name));
    }
    specs
}

/// Why a tool the ask does not allow is refused; `None` when allowed.
fn not_allowed(req: &AskRequest, name: &str) -> Option<String> {
    let allowed = req.tools.as_ref()?;
    if allowed.iter().any(|t| t == name) {
        return None;
    }
    let list = if allowed.is_empty() { "none".to_string() } else { allowed.join(", ") };
    Some(format!(
        "tool {name:?} is not allowed in this chat (the member's rights here allow: {list}); answer without it"
    ))
}

/// Runs one tool call of the model; returns its record and the text fed
/// back.
fn run_tool(ctx: &tool::Tools<'_>, req: &AskRequest, call: &ToolCall, sock: &UnixStream) -> (ToolRecord, String, bool) {
    if let Some(why) = not_allowed(req, &call.name) {
        let (record, text) = refused(&call.name, why);
        return (record, text, false);
    }
    let (argv, stdin) = match command(call) {
        Ok(c) => c,
        Err(why) => {
            let (record, text) = refused(&call.name, why);
            return (record, text, false);
        }
    };
    let exec = ExecRequest {
        id: req.id,
        request_id: req.request_id.clone(),
        argv: argv.clone(),
        stdin,
        timeout_ms: req.tool_timeout_ms,
        stream: false,
        receipt: false,
        session_dir: req.session_dir.clone(),
    };
    let o = tool::run(ctx, &exec, sock);
    let (exit_code, signal) = match o.termination {
        Termination::Exited(c) => (Some(c), None),
        Termination::Signaled(s) => (None, Some(s)),
        Termination::NotStarted => (None, None),
    };
    let record = ToolRecord {
        tool: call.name.clone(),
        argv,
        exit_code,
        signal,
        duration_ms: o.wall_us / 1000,
        stdout_bytes: o.stdout.len() as u64,
        stderr_bytes: o.stderr.len() as u64,
        truncated: o.stdout_truncated || o.stderr_truncated,
        timed_out: o.timed_out,
        error: o.error.clone(),
    };
    (record, result_text(&o, req.tool_timeout_ms), o.cancelled)
}

/// Runs the loop of `req`, talking to the broker on `sock`.
pub fn run(sock: &mut UnixStream, ctx: &tool::Tools<'_>, req: &AskRequest) -> Result<AskOutcome, WorkerError> {
    let tools = offered(req);
    let mut messages = req.conversation.clone();
    messages.push(ChatMessage::text(Role::User, req.prompt.clone()));
    let mut transcript = Vec::new();
    let mut usage = Usage::default();
    let outcome =
        |answer, stop, steps, transcript, usage| AskOutcome { id: req.id, answer, stop, steps, transcript, usage };
    tracing::info!(model = %req.model, max_steps = req.max_steps, "ask started");
    for step in 1..=req.max_steps {
        let ask = CompleteRequest { id: req.id, step, messages: messages.clone(), tools: tools.clone() };
        write_frame(sock, &FromWorker::Complete(ask))?;
        let reply = match read_frame::<_, ToWorker>(sock)? {
            Some(ToWorker::Completion(r)) if r.id == req.id && r.step == step => r,
            Some(ToWorker::Cancel(id)) if id == req.id => {
                tracing::info!(step, "ask cancelled");
                return Ok(outcome(None, AskStop::Cancelled, step, transcript, usage));
            }
            Some(_) => return Err(WorkerError::Protocol("expected the Completion of this step")),
            None => return Err(WorkerError::Protocol("the broker closed the socket during an ask")),
        };
        let completion = match reply.result {
            Ok(c) => c,
            Err(why) => {
                tracing::warn!(step, "model call failed: {why}");
                return Ok(outcome(None, AskStop::Failed(why), step, transcript, usage));
            }
        };
        usage.add(completion.usage);
        let message = completion.message;
        if message.tool_calls.is_empty() {
            tracing::info!(step, tool_calls = transcript.len(), "final answer");
            let answer = message.content.unwrap_or_default();
            return Ok(outcome(Some(answer), AskStop::Answer, step, transcript, usage));
        }
        let calls = message.tool_calls.clone();
        messages.push(message);
        for (i, call) in calls.iter().enumerate() {
            let (record, text, cancelled) = if u32::try_from(i).unwrap_or(u32::MAX) < MAX_TOOL_CALLS_PER_STEP {
                run_tool(ctx, req, call, sock)
            } else {
                let why = format!("more than {MAX_TOOL_CALLS_PER_STEP} tool calls in one step; not run");
                let (record, text) = refused(&call.name, why);
                (record, text, false)
            };
            if cancelled {
                tracing::info!(step, tool = %record.tool, "ask cancelled during a tool call");
                transcript.push(record);
                return Ok(outcome(None, AskStop::Cancelled, step, transcript, usage));
            }
            tracing::info!(step, tool = %record.tool, argv = ?record.argv, exit_code = ?record.exit_code,
                duration_ms = record.duration_ms, timed_out = record.timed_out, "tool call");
            if req.stream {
                let done = ToolDone {
                    id: req.id,
                    step,
                    call_id: call.id.clone(),
                    record: record.clone(),
                    result: text.clone(),
                };
                write_frame(sock, &FromWorker::ToolDone(done))?;
            }
            transcript.push(record);
            messages.push(ChatMessage {
                role: Role::Tool,
                content: Some(text),
                tool_calls: Vec::new(),
                tool_call_id: Some(call.id.clone()),
            });
        }
    }
    tracing::info!(steps = req.max_steps, "max_steps reached without a final answer");
    Ok(outcome(None, AskStop::MaxSteps, req.max_steps, transcript, usage))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, arguments: &str) -> ToolCall {
        ToolCall { id: "c1".into(), name: name.into(), arguments: arguments.into() }
    }

    #[test]
    fn tool_calls_become_commands() {
        let (argv, stdin) = command(&call("write_file", r#"{"path":"a/b.txt","content":"hé ✓"}"#)).unwrap();
        assert_eq!(argv, ["sh", "-c", "cat > \"$1\"", "sh", "a/b.txt"]);
        assert_eq!(stdin, "hé ✓".as_bytes());
        let (argv, _) = command(&call("list_dir", "{}")).unwrap();
        assert_eq!(argv, ["ls", "-la", "--", "."]);
        let (argv, _) = command(&call("read_file", r#"{"path":"-n"}"#)).unwrap();
        assert_eq!(argv, ["cat", "--", "-n"], "an option-like name stays a path");
        assert!(command(&call("read_file", r#"{"path":"/etc/shadow"}"#)).is_err());
        assert!(command(&call("read_file", r#"{"path":"x/../../y"}"#)).is_err());
        assert!(command(&call("shell", "not json")).unwrap_err().contains("not valid JSON"));
        assert!(command(&call("rm_rf", "{}")).unwrap_err().contains("unknown tool"));
        for t in tool_specs() {
            serde_json::from_str::<Value>(&t.parameters).unwrap();
        }
    }

    #[test]
    fn a_chat_offers_and_runs_only_its_tools() {
        let mut req = AskRequest {
            id: 1,
            request_id: "r".into(),
            prompt: String::new(),
            conversation: Vec::new(),
            max_steps: 1,
            model: "m".into(),
            tool_timeout_ms: 1,
            timeout_ms: 1,
            stream: false,
            tools: None,
            session_dir: None,
        };
        assert_eq!(offered(&req).len(), 4);
        assert_eq!(not_allowed(&req, "shell"), None);
        req.tools = Some(vec!["read_file".into()]);
        assert_eq!(offered(&req).iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["read_file"]);
        assert_eq!(not_allowed(&req, "read_file"), None);
        let why = not_allowed(&req, "shell").unwrap();
        assert!(why.contains("\"shell\" is not allowed") && why.contains("allow: read_file"), "{why}");
    }

    #[test]
    fn excerpts_cut_at_characters() {
        let text = "✓".repeat(RESULT_MAX); // 3 bytes each
        let e = excerpt(text.as_bytes(), false);
        assert!(e.ends_with("[output truncated]"));
        assert!(e.len() <= RESULT_MAX + 20);
        assert_eq!(excerpt(b"ok", false), "ok");
    }
}
