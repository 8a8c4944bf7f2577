//! Streamed answers: `/v1/exec` with `"stream": true` (NDJSON lines of
//! output while the command runs, the result last), `/v1/ask` (NDJSON) and
//! `/v1/chat/completions` (server-sent events) with the model's text and the
//! loop's tool calls while the loop runs; and a real OpenAI client (the
//! official `openai` Python package) through the broker's socket.
//!
//! Arrival is shown by order, never by timing: the command (or the model
//! stub) is held until the test has read the early lines, then released.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use http_body_util::BodyExt;
use serde_json::{json, Value};

/// A streamed answer read as it arrives, one line (or event) at a time.
struct Lines {
    rt: tokio::runtime::Runtime,
    body: Option<hyper::body::Incoming>,
    pending: Vec<u8>,
    /// `\n` for NDJSON, `\n\n` for server-sent events.
    sep: &'static [u8],
    pub status: u16,
}

impl Lines {
    fn post(b: &Broker, path: &str, body: &Value, sep: &'static [u8]) -> Lines {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (status, body) = rt
            .block_on(corral::client::request_streamed(
                &b.socket,
                hyper::Method::POST,
                path,
                None,
                Some(body.to_string().into_bytes()),
            ))
            .unwrap();
        Lines { rt, body: Some(body), pending: Vec::new(), sep, status: status.as_u16() }
    }

    /// The next line; `None` at the end of the answer.
    fn next(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.pending.windows(self.sep.len()).position(|w| w == self.sep) {
                let line: Vec<u8> = self.pending.drain(..end + self.sep.len()).collect();
                return Some(String::from_utf8(line[..end].to_vec()).unwrap());
            }
            let body = self.body.as_mut()?;
            let frame = self.rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(30), body.frame()).await.expect("no line within 30 s")
            });
            match frame {
                Some(f) => self.pending.extend_from_slice(&f.unwrap().into_data().unwrap_or_default()),
                None => {
                    self.body = None;
                    assert!(self.pending.is_empty(), "a partial line at the end: {:?}", self.pending);
                    return None;
                }
            }
        }
    }

    fn next_json(&mut self) -> Value {
        let line = self.next().expect("the answer ended early");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    }

    /// The next server-sent event's data as JSON; `None` for `[DONE]`.
    fn next_event(&mut self) -> Option<Value> {
        let line = self.next().expect("the stream ended before [DONE]");
        let data = line.strip_prefix("data: ").unwrap_or_else(|| panic!("not a data line: {line}"));
        (data != "[DONE]").then(|| serde_json::from_str(data).unwrap())
    }
}

fn single(name: &str, limits: &str) -> PolicyFile {
    policy(name, "t", Some("corral-test"), "", limits, "min_idle = 1\nmax_workers = 1\nqueue = 4")
}

/// The bytes of a streamed chunk line.
fn bytes(line: &Value) -> Vec<u8> {
    use base64::Engine;
    match (line["data"].as_str(), line["data_base64"].as_str()) {
        (Some(t), None) => t.as_bytes().to_vec(),
        (None, Some(b)) => base64::engine::general_purpose::STANDARD.decode(b).unwrap(),
        _ => panic!("a chunk needs exactly one of data and data_base64: {line}"),
    }
}

#[test]
fn streamed_exec_sends_output_while_the_command_runs_and_keeps_its_caps() {
    if !full_sandbox() {
        return;
    }
    let b = Broker::start("stream-exec", &[single("w", ""), single("capped", "output_max = \"1K\"")]);
    let ws = b.workspace("t", "w");
    for f in ["go", "go2"] {
        let _ = std::fs::remove_file(ws.join(f));
    }
    // The command writes a line, then waits for a file that the test only
    // creates once it has read that line: the line came while it ran.
    let script = "echo first; while [ ! -e go ]; do sleep 0.02; done; echo second >&2; printf 'bin:\\377\\376\\n'";
    let mut s =
        Lines::post(&b, "/v1/exec", &json!({"workflow": "w", "argv": ["sh", "-c", script], "stream": true}), b"\n");
    assert_eq!(s.status, 200);
    let first = s.next_json();
    assert_eq!((first["type"].as_str(), first["data"].as_str()), (Some("stdout"), Some("first\n")), "{first}");
    std::fs::write(ws.join("go"), "").unwrap();
    let (mut out, mut err) = (b"first\n".to_vec(), Vec::new());
    let mut base64_seen = false;
    let result = loop {
        let line = s.next_json();
        match line["type"].as_str().unwrap() {
            "stdout" => {
                base64_seen |= line["data_base64"].is_string();
                out.extend(bytes(&line));
            }
            "stderr" => err.extend(bytes(&line)),
            "result" => break line,
            other => panic!("unexpected line type {other}: {line}"),
        }
    };
    assert_eq!(s.next(), None, "nothing after the result");
    assert!(base64_seen, "bytes that are not UTF-8 come as data_base64");
    assert_eq!(out, b"first\nbin:\xff\xfe\n");
    assert_eq!(err, b"second\n");
    // The result carries the fields of the plain reply, the whole output included.
    assert_eq!(result["exit_code"], 0, "{result}");
    assert_eq!(result["stderr"], "second\n");
    assert!(result["stdout_base64"].is_string() && result["wall_ms"].is_number(), "{result}");

    // Caps hold while streaming: the chunks add up to output_max, no more.
    let mut s = Lines::post(
        &b,
        "/v1/exec",
        &json!({"workflow": "capped", "argv": ["sh", "-c", "yes | head -c 100000"], "stream": true}),
        b"\n",
    );
    let mut streamed = 0;
    let result = loop {
        let line = s.next_json();
        match line["type"].as_str().unwrap() {
            "stdout" => streamed += bytes(&line).len(),
            "result" => break line,
            other => panic!("unexpected line type {other}: {line}"),
        }
    };
    assert_eq!(streamed, 1024);
    assert_eq!(
        (result["stdout_truncated"].as_bool(), result["stdout"].as_str().map(str::len)),
        (Some(true), Some(1024))
    );

    // `corral exec` prints live: its first line is out while the command waits.
    let mut cli = std::process::Command::new(BIN)
        .args(["exec", "w", "--", "sh", "-c", "echo live; while [ ! -e go2 ]; do sleep 0.02; done; echo done; exit 3"])
        .env("CORRAL_SOCKET", &b.socket)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(cli.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line, "live\n");
    std::fs::write(ws.join("go2"), "").unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert_eq!(rest, "done\n");
    assert_eq!(cli.wait().unwrap().code(), Some(3), "corral exec exits with the command's code");

    // Errors before the call starts keep their status; a plain call is unchanged.
    let (code, _) = b.exec_body(&json!({"workflow": "w", "argv": [], "stream": true}));
    assert_eq!(code, 400);
    let chat = json!({"model": "w", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let (code, reply) = b.http("POST", "/v1/chat/completions", Some(chat.to_string().as_bytes()));
    assert_eq!((code, reply["error"]["code"].as_str()), (400, Some("no_llm")), "{reply}");
    assert_eq!(stdout(&b.exec("w", &["echo", "plain"])), "plain\n");
}

#[test]
fn a_client_that_leaves_a_stream_cancels_its_call() {
    if !full_sandbox() {
        return;
    }
    let b = Broker::start("stream-cancel", &[single("w", "")]);
    let script = "echo started; sleep 20.375; touch too-far";
    let mut s =
        Lines::post(&b, "/v1/exec", &json!({"workflow": "w", "argv": ["sh", "-c", script], "stream": true}), b"\n");
    assert_eq!(s.next_json()["data"], "started\n");
    let sleeping = || host_processes().into_iter().any(|(_, c)| c == "sleep 20.375 ");
    poll(Duration::from_secs(20), || sleeping().then_some(())).expect("the command never got to its sleep");
    drop(s); // the client goes away mid-stream
    poll(Duration::from_secs(5), || (!sleeping()).then_some(()))
        .unwrap_or_else(|| panic!("the command outlived its client\nlog:\n{}", b.log_text()));
    assert_eq!(stdout(&b.exec("w", &["echo", "next"])), "next\n");
    assert!(!b.workspace("t", "w").join("too-far").exists());
    let rows = poll(Duration::from_secs(10), || {
        let rows: Vec<String> = b
            .ledger()
            .prepare("SELECT outcome FROM exec_calls WHERE workflow = 'w' ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        (rows.len() >= 2).then_some(rows)
    })
    .unwrap();
    assert_eq!(rows, ["cancelled", "ok"]);
}

/// A tool call that waits for `go` in the workspace, then the final answer,
/// whose text waits for `gate` after its first word.
fn held_script(gate: &Arc<AtomicBool>) -> Vec<Scripted> {
    vec![
        tool_call("c1", "shell", &json!({"command": "echo tool-said-hi; while [ ! -e go ]; do sleep 0.02; done"})),
        answer("the answer is 42", 3, 4).held(gate),
    ]
}

#[test]
fn streamed_chat_and_ask_send_tokens_and_tool_events_while_the_loop_runs() {
    if !full_sandbox() {
        return;
    }
    let gate = Arc::new(AtomicBool::new(false));
    let stub = Stub::start(held_script(&gate));
    let b = Broker::start("stream-chat", &[llm_policy("agent", "lab", &stub.base_url(), "")]);
    let ws = b.workspace("lab", "agent");
    let _ = std::fs::remove_file(ws.join("go"));

    // /v1/chat/completions: OpenAI's chunks.
    let body = json!({"model": "agent", "stream": true, "messages": [{"role": "user", "content": "go"}]});
    let mut s = Lines::post(&b, "/v1/chat/completions", &body, b"\n\n");
    assert_eq!(s.status, 200);
    let role = s.next_event().unwrap();
    assert_eq!(role["choices"][0]["delta"]["role"], "assistant", "{role}");
    // The tool call is announced while its tool still waits for `go`.
    let call = s.next_event().unwrap();
    assert_eq!(call["corral"]["type"], "tool_call", "{call}");
    assert_eq!(call["corral"]["name"], "shell");
    assert!(call["corral"]["arguments"].as_str().unwrap().contains("tool-said-hi"), "{call}");
    assert_eq!(call["choices"][0]["delta"], json!({}), "tool calls are never the client's delta.tool_calls");
    std::fs::write(ws.join("go"), "").unwrap();
    let result = s.next_event().unwrap();
    assert_eq!(result["corral"]["type"], "tool_result", "{result}");
    assert_eq!(result["corral"]["exit_code"], 0);
    assert!(result["corral"]["result"].as_str().unwrap().contains("tool-said-hi"), "{result}");
    // The first word comes while the model still holds the rest.
    let first = s.next_event().unwrap();
    assert_eq!(first["choices"][0]["delta"]["content"], "the ", "{first}");
    gate.store(true, Ordering::SeqCst);
    let mut text = "the ".to_string();
    let finish = loop {
        let e = s.next_event().unwrap();
        match e["choices"][0]["delta"]["content"].as_str() {
            Some(t) => text.push_str(t),
            None => break e,
        }
    };
    assert_eq!(text, "the answer is 42");
    assert_eq!(finish["choices"][0]["finish_reason"], "stop", "{finish}");
    assert_eq!(finish["usage"]["total_tokens"], 15 + 7, "{finish}");
    assert_eq!(s.next_event(), None, "[DONE] ends the stream");
    assert_eq!(s.next(), None);
    let asked = stub.received();
    assert_eq!(asked.len(), 2);
    assert!(asked.iter().all(|r| r.body["stream"] == true), "the provider was asked to stream");

    // /v1/ask: the same events as NDJSON, the reply last.
    let _ = std::fs::remove_file(ws.join("go"));
    gate.store(false, Ordering::SeqCst);
    for s in held_script(&gate) {
        stub.push(s);
    }
    let mut s = Lines::post(&b, "/v1/ask", &json!({"workflow": "agent", "prompt": "go", "stream": true}), b"\n");
    let call = s.next_json();
    assert_eq!((call["type"].as_str(), call["step"].as_u64()), (Some("tool_call"), Some(1)), "{call}");
    std::fs::write(ws.join("go"), "").unwrap();
    let result = s.next_json();
    assert_eq!((result["type"].as_str(), result["tool"].as_str()), (Some("tool_result"), Some("shell")), "{result}");
    let first = s.next_json();
    assert_eq!((first["type"].as_str(), first["step"].as_u64()), (Some("delta"), Some(2)), "{first}");
    gate.store(true, Ordering::SeqCst);
    let mut text = first["content"].as_str().unwrap().to_string();
    let last = loop {
        let e = s.next_json();
        match e["type"].as_str().unwrap() {
            "delta" => text.push_str(e["content"].as_str().unwrap()),
            _ => break e,
        }
    };
    assert_eq!(last["type"], "result", "{last}");
    assert_eq!((last["answer"].as_str(), text.as_str()), (Some("the answer is 42"), "the answer is 42"));
    assert_eq!(last["transcript"].as_array().unwrap().len(), 1);
    assert_eq!(s.next(), None);
}

/// The official `openai` Python package, in the venv that
/// scripts/setup-test-host.sh makes.
const OPENAI_CLIENT: &str = r#"
import json, sys
import openai
try:  # openai 3 is built on httpx2, httpx's successor; openai 1 and 2 on httpx
    import httpx2 as httpx
except ImportError:
    import httpx
sock, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(api_key="unused", base_url="http://corral/v1",
                       http_client=httpx.Client(transport=httpx.HTTPTransport(uds=sock)))
print(json.dumps({"models": [m.id for m in client.models.list()]}), flush=True)
stream = client.chat.completions.create(model=model, stream=True,
                                        messages=[{"role": "user", "content": "hello"}])
deltas = []
finish = None
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        deltas.append(chunk.choices[0].delta.content)
    if chunk.choices and chunk.choices[0].finish_reason:
        finish = chunk.choices[0].finish_reason
print(json.dumps({"deltas": deltas, "finish": finish}), flush=True)
"#;

#[test]
fn the_openai_python_client_lists_models_and_streams_through_the_socket() {
    if !full_sandbox() || !require(&["openai-client"]) {
        return;
    }
    let stub = Stub::start(vec![answer("hello from the sandbox", 2, 4)]);
    let b = Broker::start("stream-openai", &[llm_policy("agent", "lab", &stub.base_url(), "")]);
    let out = std::process::Command::new(openai_python())
        .args(["-c", OPENAI_CLIENT])
        .arg(&b.socket)
        .arg("agent")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let mut lines = text.lines().map(|l| serde_json::from_str::<Value>(l).unwrap());
    let models = lines.next().unwrap();
    assert_eq!(models["models"], json!(["agent"]), "{models}");
    let chat = lines.next().unwrap();
    let deltas: Vec<&str> = chat["deltas"].as_array().unwrap().iter().map(|d| d.as_str().unwrap()).collect();
    assert!(deltas.len() > 1, "the answer came in one piece: {chat}");
    assert_eq!(deltas.concat(), "hello from the sandbox");
    assert_eq!(chat["finish"], "stop");
}
