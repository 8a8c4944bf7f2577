//! The client ↔ broker API: HTTP/1.1 + JSON on the broker's Unix socket.
//! These types are shared by the broker (which serves them) and the CLI
//! (which calls them), so the two cannot drift apart.
//!
//! Bytes: `stdout`/`stderr` are UTF-8 text. When a stream is not valid UTF-8,
//! `stdout` holds a lossy rendering (U+FFFD for bad bytes) and
//! `stdout_base64` holds the exact bytes; the CLI prints those. Likewise a
//! request may give `stdin` (text) or `stdin_base64` (bytes).

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::protocol::EffectiveSandbox;

pub const EXEC_PATH: &str = "/v1/exec";
pub const STATUS_PATH: &str = "/v1/status";
pub const ASK_PATH: &str = "/v1/ask";
/// OpenAI-compatible: `model` names the workflow.
pub const CHAT_PATH: &str = "/v1/chat/completions";
/// Tokens used: `GET /v1/usage?since=YYYY-MM-DD&by=workflow|tenant|model`.
pub const USAGE_PATH: &str = "/v1/usage";
pub const AUDIT_PATH: &str = "/v1/audit";
pub const AUDIT_VERIFY_PATH: &str = "/v1/audit/verify";
/// Readiness of every pool: 200, or 503 with the reasons.
pub const HEALTH_PATH: &str = "/healthz";
/// Prometheus text: root, the broker's user and `--metrics-group` only.
pub const METRICS_PATH: &str = "/metrics";
/// The workflows the caller may chat with, in the OpenAI shape.
pub const MODELS_PATH: &str = "/v1/models";
/// The OpenAPI document of this API.
pub const OPENAPI_PATH: &str = "/v1/openapi.json";
/// `DELETE /v1/calls/{request_id}`: cancels a call of the caller's.
pub const CALL_PATH: &str = "/v1/calls/{request_id}";

/// `GET /v1/models`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<Model>,
}

/// One workflow as an OpenAI model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Model {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub owned_by: String,
}
/// Header carrying the request id on every answer.
pub const REQUEST_ID_HEADER: &str = "x-corral-request-id";
/// Optional request header naming the workflow of a call (exec, ask, chat):
/// the broker then authorizes the caller for it before reading the body,
/// and the body must name the same workflow.
pub const WORKFLOW_HEADER: &str = "x-corral-workflow";

/// The session a call (exec, ask, chat) belongs to; the body's `session`
/// field says the same.
pub const SESSION_HEADER: &str = "x-corral-session";
/// `GET`: the caller's sessions (root: everyone's).
pub const SESSIONS_PATH: &str = "/v1/sessions";
/// `DELETE`: removes a session (its history and directory).
pub const SESSION_PATH: &str = "/v1/sessions/{workflow}/{id}";

/// The query of `GET /v1/sessions`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionsQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
}

/// The query of `DELETE /v1/sessions/{workflow}/{id}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionDeleteQuery {
    /// root only: the owner (`uid-1000`, `member-alice`) whose session to remove; without
    /// it root removes the id of every owner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// One session (`GET /v1/sessions`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionInfo {
    pub workflow: String,
    /// Whose it is (`uid-1000`, or `member-alice` for a member).
    pub owner: String,
    pub id: String,
    /// Unix seconds, UTC.
    pub created: i64,
    pub last_used: i64,
    /// When it expires if unused.
    pub expires: i64,
    /// Messages and bytes of history kept.
    pub messages: u64,
    pub bytes: u64,
}

/// `DELETE /v1/sessions/{workflow}/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionRemoved {
    pub workflow: String,
    pub id: String,
    /// Sessions removed (more than one only for root without `?owner=`).
    pub removed: usize,
}
/// Request header of a delegate (the members file's `[delegates]`): the
/// call is made for this member, `NAME` or `telegram:ID`.
pub const MEMBER_HEADER: &str = "x-corral-member";

/// Request header of a delegate: the kind of chat it speaks for,
/// `private` (the default) or `group`; a member's rights depend on it.
pub const CHAT_HEADER: &str = "x-corral-chat";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecBody {
    /// Empty (or absent) in a call made for a member: her first workflow.
    #[serde(default)]
    pub workflow: String,
    pub argv: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin_base64: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Answer `application/x-ndjson`: one [`ExecEvent`] a line, the
    /// output as the command writes it, the result last.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stream: bool,
    /// The session the call belongs to (or the `x-corral-session` header).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
}

/// One line of a streamed exec (`"stream": true`), tagged by `type`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ExecEvent {
    /// Bytes the command wrote to its stdout, as it wrote them.
    Stdout(Chunk),
    Stderr(Chunk),
    /// Last: the fields of the plain reply.
    Result(Box<ExecReply>),
    /// Last, instead of a result: the call failed after its answer began.
    Error(ErrorReply),
}

/// Streamed bytes: `data` when they are UTF-8 text, else `data_base64`.
/// A character split between two reads is held back and sent whole.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Chunk {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_base64: Option<String>,
}

impl Chunk {
    pub fn new(bytes: &[u8]) -> Chunk {
        match std::str::from_utf8(bytes) {
            Ok(s) => Chunk { data: Some(s.to_owned()), data_base64: None },
            Err(_) => Chunk { data: None, data_base64: Some(base64::engine::general_purpose::STANDARD.encode(bytes)) },
        }
    }

    /// The exact bytes.
    pub fn bytes(&self) -> Result<Vec<u8>, base64::DecodeError> {
        match (&self.data, &self.data_base64) {
            (_, Some(b)) => base64::engine::general_purpose::STANDARD.decode(b),
            (Some(t), None) => Ok(t.as_bytes().to_vec()),
            (None, None) => Ok(Vec::new()),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecReply {
    pub request_id: String,
    pub workflow: String,
    pub worker: u64,
    /// Set when the command exited.
    pub exit_code: Option<i32>,
    /// Set when the command was killed by a signal (also on timeout: 9).
    pub signal: Option<i32>,
    pub signal_name: Option<String>,
    /// Set when the command could not be started (not found, not allowed).
    pub error: Option<String>,
    pub stdout: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout_base64: Option<String>,
    pub stderr: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr_base64: Option<String>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    /// Either stream was cut at the workflow's `output_max`.
    pub truncated: bool,
    pub timed_out: bool,
    /// The call was cancelled (`DELETE /v1/calls/{request_id}`): its
    /// processes were killed; the output is what it wrote until then.
    #[serde(default)]
    pub cancelled: bool,
    /// The resource limit that ended or hampered the call, when the kernel
    /// says one did: "memory_max 256M reached …", "tasks_max 64 reached …".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<String>,
    /// When a failed call's stderr names a path the sandbox's rules do not
    /// cover, next to "Permission denied": the path and the rule. A hint
    /// (inferred from stderr), not the kernel's word.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_hint: Option<String>,
    /// With `[network]`: the destinations the call reached through the
    /// egress proxy, and those it was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<EgressReport>,
    pub wall_ms: f64,
    pub cpu_user_ms: f64,
    pub cpu_system_ms: f64,
    pub peak_rss_kib: u64,
    /// What the call changed and what it used (see [`Receipt`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipt: Option<Receipt>,
}

/// The receipt of one exec call: what it changed in its workspace, which
/// limit ended it, and its peak memory and CPU time.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Receipt {
    /// Paths created, modified and deleted in the workspace during the
    /// call; `null` when the workflow turned receipts off
    /// (`[limits].receipts = false`) and for a cancelled call.
    pub changes: Option<crate::protocol::WorkspaceChanges>,
    /// The limit that ended the call, if one did: `timeout`, `memory_max`,
    /// `tasks_max`, `tenant_memory_max`, `tenant_tasks_max`, `disk_max`,
    /// `file_size_max`.
    pub ended_by: Option<String>,
    /// Every limit the call reached, also those that did not end it
    /// (`output_max`: output was cut; `file_size_max`: a file reached it).
    pub limits_reached: Vec<String>,
    /// Peak memory in bytes; which figure it is: see `memory_peak_source`.
    pub memory_peak_bytes: Option<u64>,
    /// `cgroup:memory.peak` or `cgroup:memory.max_usage_in_bytes` (the
    /// worker's scope, worker and tool together, since the call began), or
    /// `rusage:maxrss` (the largest single process of the command's tree).
    pub memory_peak_source: Option<String>,
    /// User plus system CPU time of the command and every process it
    /// started (`rusage` of the worker's reaped children).
    pub cpu_ms: f64,
}

/// What a call did through its workflow's egress proxy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressReport {
    /// Destinations reached, in the order first reached.
    pub reached: Vec<EgressReached>,
    /// Destinations refused, with the rule that refused them.
    pub refused: Vec<EgressRefused>,
    /// The per-call cap (`connections_max`, `bytes_max`) that stopped the
    /// call's traffic, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capped: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressReached {
    pub host: String,
    pub port: u16,
    pub connections: u32,
    /// Bytes from the tool to the destination.
    pub sent: u64,
    /// Bytes from the destination to the tool.
    pub received: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressRefused {
    pub host: String,
    pub port: u16,
    pub attempts: u32,
    pub reason: String,
}

/// Text for JSON, plus base64 of the exact bytes when they are not UTF-8.
pub fn encode_bytes(bytes: &[u8]) -> (String, Option<String>) {
    match std::str::from_utf8(bytes) {
        Ok(s) => (s.to_owned(), None),
        Err(_) => {
            (String::from_utf8_lossy(bytes).into_owned(), Some(base64::engine::general_purpose::STANDARD.encode(bytes)))
        }
    }
}

/// The exact bytes of a stream from its text and optional base64 forms.
pub fn decode_bytes(text: &str, b64: Option<&str>) -> Result<Vec<u8>, base64::DecodeError> {
    match b64 {
        Some(b) => base64::engine::general_purpose::STANDARD.decode(b),
        None => Ok(text.as_bytes().to_vec()),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorReply {
    pub error: ErrorInfo,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// Stable, machine-readable: `bad_request`, `invalid_json`, `forbidden`,
    /// `unknown_workflow`, `not_found`, `method_not_allowed`, `too_large`,
    /// `length_required`, `busy`, `overloaded`, `stopping`, `unavailable`,
    /// `quarantined`, `no_worker`,
    /// `worker_died`, `timeout`, `internal`; for
    /// asks also `no_llm`, `budget_exhausted`, `provider_unauthorized`,
    /// `model_not_found`, `provider_rate_limited`, `provider_down`,
    /// `provider_timeout`, `provider_rejected`, `bad_provider_response`.
    pub code: String,
    /// What went wrong and what to do about it.
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// With `budget_exhausted`: when the budget resets (the next UTC
    /// midnight), e.g. `2025-01-31T00:00:00Z`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resets_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub broker: BrokerInfo,
    pub workflows: Vec<WorkflowStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BrokerInfo {
    pub pid: u32,
    pub version: String,
    pub uptime_s: u64,
    pub landlock_abi: u32,
    pub seccomp: bool,
    /// How worker resources are limited ("rlimits only: …" without systemd).
    pub resource_control: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkflowStatus {
    pub name: String,
    pub tenant: String,
    pub user: Option<String>,
    pub workspace: String,
    /// `None` when the workflow can serve calls; otherwise why not (also
    /// why it is quarantined, until when, and how to lift it).
    pub unavailable: Option<String>,
    /// Set while the workflow is quarantined: when one worker is tried
    /// again (UTC, e.g. `2025-01-31T12:00:00Z`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantined_until: Option<String>,
    pub queue_depth: usize,
    pub queue_capacity: usize,
    pub min_idle: u32,
    pub max_workers: u32,
    /// Which mechanism holds each promise of this workflow on this host.
    pub enforcement: Vec<crate::sandbox::Enforcement>,
    pub workers: Vec<WorkerStatus>,
    /// The workspace's usage, when the policy sets `disk_max`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskStatus>,
}

/// A workspace held to `disk_max`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskStatus {
    /// `disk_max` as the policy wrote it.
    pub disk_max: String,
    pub disk_max_bytes: u64,
    /// Bytes in use, file system metadata included; `None` while the
    /// image is not mounted.
    pub used_bytes: Option<u64>,
    /// What files can fill: the image less ext4's own metadata.
    pub size_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub id: u64,
    pub pid: Option<u32>,
    /// `starting`, `idle`, `busy`, `backoff` or `quarantined`.
    pub state: String,
    pub served: u64,
    /// CPU time of the calls this worker ran (their rusage), in ms.
    pub calls_cpu_ms: f64,
    /// How long the last start took: spawn, scope, sandbox, ready (ms).
    pub start_ms: Option<f64>,
    pub restarts: u64,
    pub last_exit: Option<String>,
    /// The last limit the kernel enforced on this worker's calls.
    pub last_kill: Option<String>,
    /// The worker's transient unit, when systemd manages it.
    pub scope: Option<String>,
    /// The `systemd-run` line that makes an equivalent scope by hand.
    pub systemd_run: Option<String>,
    /// Memory, CPU and tasks of the worker's scope (with systemd).
    pub cgroup: Option<crate::cgroup::Stats>,
    pub sandbox: Option<EffectiveSandbox>,
}

/// The query of `GET /v1/audit`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Only calls from this UTC date on, `YYYY-MM-DD`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// Only this client's calls (others than root see only their own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    /// Only calls made for this member (the members file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    /// At most this many rows, newest first (default 100, at most 10,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// One call in the audit trail (`GET /v1/audit`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditRecord {
    pub id: i64,
    /// Unix seconds, UTC.
    pub time: i64,
    pub request_id: String,
    /// `exec` or `ask`.
    pub kind: String,
    pub workflow: String,
    pub tenant: String,
    pub uid: u32,
    pub member: Option<String>,
    pub session: Option<String>,
    pub outcome: String,
    pub limit: Option<String>,
}

/// `GET /v1/audit/verify`: whether the chain holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditVerify {
    pub ok: bool,
    /// Rows checked (up to and including the first broken one).
    pub rows: u64,
    pub broken_at: Option<i64>,
    pub why: Option<String>,
}

/// The query of `GET /v1/status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusQuery {
    /// root only: the workflows this user (a name or a uid) may use,
    /// instead of the caller's (`corral doctor --as USER`).
    #[serde(default, rename = "as", skip_serializing_if = "Option::is_none")]
    pub as_user: Option<String>,
}

/// The query of `GET /v1/usage`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    /// Only calls from this UTC date on, `YYYY-MM-DD`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// `workflow` (default), `tenant` or `model`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<GroupBy>,
}

/// One row of `GET /v1/usage`: model calls and their tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRow {
    /// The workflow, tenant or model.
    pub key: String,
    pub calls: u64,
    pub failed: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

/// `POST /v1/ask`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AskBody {
    /// Empty (or absent) in a call made for a member: her first workflow.
    #[serde(default)]
    pub workflow: String,
    pub prompt: String,
    /// Earlier turns, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conversation: Vec<ConversationMessage>,
    /// Answer `application/x-ndjson`: one [`AskEvent`] a line while the
    /// loop runs, the reply last.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stream: bool,
    /// The session the ask belongs to (or the `x-corral-session` header):
    /// its history is prepended to `conversation`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
}

/// One line of a streamed ask (`"stream": true`), tagged by `type`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AskEvent {
    /// Text of the model's message of step `step`, as the provider
    /// streams it (a step that calls tools may say something first).
    Delta { step: u32, content: String },
    /// The model asked for a tool (before it runs).
    ToolCall(ToolCallEvent),
    /// A tool call ended; `result` is what the model is told.
    ToolResult(ToolResultEvent),
    /// Last: the fields of the plain reply.
    Result(Box<AskReply>),
    /// Last, instead of a result.
    Error(ErrorReply),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ToolCallEvent {
    pub step: u32,
    /// The model's id of the call.
    pub id: String,
    pub name: String,
    /// JSON text, as the model wrote it.
    pub arguments: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ToolResultEvent {
    pub step: u32,
    pub id: String,
    #[serde(flatten)]
    pub report: ToolCallReport,
    pub result: String,
}

/// One earlier turn of a conversation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConversationMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AskReply {
    pub request_id: String,
    pub workflow: String,
    pub model: String,
    /// The model's final answer; `None` when the loop stopped without one.
    pub answer: Option<String>,
    /// `answer` or `max_steps`.
    pub stopped: String,
    /// Model calls made.
    pub steps: u32,
    /// Every tool call, in order.
    pub transcript: Vec<ToolCallReport>,
    /// As the providers reported them to the broker.
    pub usage: UsageReport,
    /// With `[network]`: what the ask's tool calls reached and were refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<EgressReport>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ToolCallReport {
    pub tool: String,
    pub argv: Vec<String>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub duration_ms: u64,
    pub truncated: bool,
    pub timed_out: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UsageReport {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub model_calls: u32,
}

/// `POST /v1/chat/completions`, as OpenAI clients send it. The other
/// fields (`temperature`, `max_tokens`, …) are in `params`: passed to the
/// model, or refused by name.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatBody {
    /// The workflow; empty (or absent) in a call made for a member: her
    /// first workflow.
    #[serde(default)]
    pub model: String,
    pub messages: Vec<ChatBodyMessage>,
    #[serde(default)]
    pub stream: bool,
    #[serde(flatten)]
    pub params: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatBodyMessage {
    pub role: String,
    /// A string, or an array of `{"type": "text", "text": …}` parts.
    #[serde(default)]
    pub content: serde_json::Value,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatReply {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: ChatUsage,
    /// corral's extras: the request id and the tool transcript.
    pub corral: ChatExtras,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatChoice {
    pub index: u32,
    pub message: ChatReplyMessage,
    /// `stop`, or `length` when the agent ran out of steps.
    pub finish_reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatReplyMessage {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatUsage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatExtras {
    pub request_id: String,
    pub transcript: Vec<ToolCallReport>,
}

/// One server-sent event of a streamed chat completion.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatChunk {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<ChatUsage>,
    /// corral's extra on a chunk that carries no text: a tool call of the
    /// agent loop, or its result (an [`AskEvent`] `tool_call` or
    /// `tool_result`). OpenAI clients ignore it; the tools are the
    /// workflow's, not the client's, so they are never `delta.tool_calls`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub corral: Option<AskEvent>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatChunkChoice {
    pub index: u32,
    pub delta: ChatDelta,
    pub finish_reason: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChatDelta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// What `GET /v1/usage` (and `corral usage`) groups model calls by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    Workflow,
    Tenant,
    Model,
}
