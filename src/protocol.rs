//! Messages between the broker and a worker.
//!
//! Every message travels as one frame (see [`crate::frame`]) encoded with
//! `postcard`. The broker speaks first: [`ToWorker::Init`] carries the
//! sandbox the worker must put itself in; the worker answers with
//! [`FromWorker::Ready`] (the sandbox it actually got) or
//! [`FromWorker::Refused`], and only then serves [`ToWorker::Exec`] and
//! [`ToWorker::Ask`] calls, one at a time.
//!
//! During an `Ask` the worker may send any number of
//! [`FromWorker::Complete`] frames; the broker answers each with one
//! [`ToWorker::Completion`] before the worker sends anything else, and the
//! call ends with [`FromWorker::Answered`]. The broker, not the worker, talks
//! to the model provider: the worker never sees a key, a URL or a budget.
//! These types are the worker's only view of a policy: it never reads policy
//! files itself.
//!
//! Streaming is asked for per call, so a plain call costs no extra frame:
//! an [`ExecRequest`] with `stream` set gets [`FromWorker::Output`] frames
//! with the bytes its command writes (within its caps), as they come, before
//! its `Done`; an [`AskRequest`] with `stream` set gets a
//! [`FromWorker::ToolDone`] after each tool call, before the loop goes on.

use serde::{Deserialize, Serialize};

/// The sandbox owns the spec it enforces and the report of what it got;
/// the wire only carries them.
pub use crate::sandbox::spec::{Credentials, EffectiveSandbox, Requirement, SandboxSpec, ToolLimits};

/// Broker → worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToWorker {
    /// Sent once, first. Trusted: it comes from the broker, not from a client.
    Init(Box<SandboxSpec>),
    /// Run one tool call.
    Exec(ExecRequest),
    /// Run the agent loop for one prompt.
    Ask(AskRequest),
    /// The broker's answer to a [`FromWorker::Complete`].
    Completion(CompletionReply),
    /// The client of call `id` went away or cancelled it: kill its tools
    /// and answer at once. A worker that already answered ignores it.
    Cancel(u64),
}

/// Worker → broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromWorker {
    /// The sandbox is in force; the worker is ready for calls.
    Ready(EffectiveSandbox),
    /// The sandbox could not be established as the policy requires; the
    /// worker exits after sending this.
    Refused(String),
    /// The result of an [`ExecRequest`].
    Done(ExecOutcome),
    /// During an [`AskRequest`]: ask the broker for one model completion.
    Complete(CompleteRequest),
    /// The result of an [`AskRequest`].
    Answered(AskOutcome),
    /// During a streamed [`ExecRequest`]: bytes its command wrote.
    Output(OutputChunk),
    /// During a streamed [`AskRequest`]: one tool call has ended.
    ToolDone(ToolDone),
}

/// Which output stream of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutStream {
    Stdout,
    Stderr,
}

/// Bytes a command wrote, in order; only bytes within the call's cap are
/// sent, so the chunks of a stream add up to its `Done` output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputChunk {
    pub id: u64,
    pub stream: OutStream,
    pub data: Vec<u8>,
}

/// One tool call of a streamed ask, as soon as it has ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolDone {
    /// The ask.
    pub id: u64,
    pub step: u32,
    /// The model's id of the tool call.
    pub call_id: String,
    pub record: ToolRecord,
    /// What the model is told about it (capped as the loop caps it).
    pub result: String,
}

/// One tool call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub id: u64,
    /// The API request this call belongs to, for the worker's log lines.
    pub request_id: String,
    pub argv: Vec<String>,
    pub stdin: Vec<u8>,
    pub timeout_ms: u64,
    /// Send [`FromWorker::Output`] frames as the command writes.
    pub stream: bool,
    /// Walk the workspace before and after the call and report what
    /// changed ([`ExecOutcome::changes`]).
    pub receipt: bool,
    /// A session's directory (beneath the workspace): the call runs there,
    /// under a Landlock layer that grants it instead of the workspace
    /// ([`crate::sandbox::session_layer`]), and its receipt walks it.
    pub session_dir: Option<std::path::PathBuf>,
}

/// How a tool call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Termination {
    Exited(i32),
    Signaled(i32),
    /// The command could not be started (not found, not executable, or denied
    /// by the sandbox); the message says which.
    NotStarted,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecOutcome {
    pub id: u64,
    pub termination: Termination,
    /// Set when the command could not be started.
    pub error: Option<String>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub timed_out: bool,
    /// Ended by a [`ToWorker::Cancel`] (or the broker's going away).
    pub cancelled: bool,
    pub wall_us: u64,
    pub cpu_user_us: u64,
    pub cpu_system_us: u64,
    pub peak_rss_kib: u64,
    /// What the call changed in its workspace; `None` when receipts are off
    /// for the call ([`ExecRequest::receipt`]).
    pub changes: Option<Box<WorkspaceChanges>>,
    /// The peak memory of the worker's scope during the call, in bytes,
    /// when the cgroup can tell (filled in by the broker, never trusted
    /// from the worker).
    pub cgroup_peak: Option<CgroupPeak>,
}

/// A peak memory figure of the worker's cgroup over one call, and the file
/// it came from (`memory.peak` or `memory.max_usage_in_bytes`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupPeak {
    pub bytes: u64,
    pub file: String,
}

/// What kind of directory entry a changed path is (symlinks are never
/// followed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    Other,
}

/// One path a call created, modified or deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangedPath {
    /// Relative to the workspace; bytes that are not UTF-8 are replaced.
    pub path: String,
    pub kind: EntryKind,
    /// The size after the call (for a deleted path: before it).
    pub size: u64,
    /// For a modified path: the size before the call.
    pub size_before: Option<u64>,
}

/// The difference between two walks of a workspace, one before and one
/// after a call: the lists are capped, the counts and byte totals are not.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceChanges {
    pub created: Vec<ChangedPath>,
    pub modified: Vec<ChangedPath>,
    pub deleted: Vec<ChangedPath>,
    pub created_count: u64,
    pub modified_count: u64,
    /// `None` when the walk after the call stopped early: a path it did
    /// not reach cannot be told from a deleted one.
    pub deleted_count: Option<u64>,
    pub created_bytes: u64,
    /// Sum of the sizes after the call minus before, over modified paths.
    pub modified_bytes_delta: i64,
    pub deleted_bytes: u64,
    /// Each list holds at most this many paths.
    pub listed_max: u32,
    /// Some list was cut at `listed_max`.
    pub truncated: bool,
    /// Entries the walk after the call saw.
    pub entries: u64,
    /// Directories neither walk could read (their contents are not
    /// compared).
    pub unreadable_dirs: u64,
    /// Why the comparison is partial, when it is: a walk hit its entry or
    /// time cap.
    pub incomplete: Option<String>,
    /// Time both walks took, in microseconds.
    pub walk_us: u64,
}

/// Tool calls the agent loop runs at most per model step; the rest of a
/// step's calls are answered "refused" without running, so an ask's time
/// stays bounded.
pub const MAX_TOOL_CALLS_PER_STEP: u32 = 8;

/// Who wrote a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

/// One message of a conversation with a model, in the shape every
/// OpenAI-compatible endpoint understands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: Option<String>,
    /// Tools the assistant asked for (assistant messages only).
    pub tool_calls: Vec<ToolCall>,
    /// The call a tool message answers (tool messages only).
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    pub fn text(role: Role, content: impl Into<String>) -> Self {
        ChatMessage { role, content: Some(content.into()), tool_calls: Vec::new(), tool_call_id: None }
    }
}

/// A function call the model asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// JSON text, as the model wrote it (it may be invalid).
    pub arguments: String,
}

/// A tool offered to the model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    /// JSON Schema of the arguments, as JSON text (postcard cannot carry a
    /// free-form JSON value).
    pub parameters: String,
}

/// Token counts, as the provider reported them to the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

impl Usage {
    pub fn add(&mut self, other: Usage) {
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
        self.total_tokens += other.total_tokens;
    }
}

/// One prompt for the agent loop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AskRequest {
    pub id: u64,
    pub request_id: String,
    pub prompt: String,
    /// Earlier messages (system, user, assistant), oldest first.
    pub conversation: Vec<ChatMessage>,
    /// Model round trips at most; the loop stops there without an answer.
    pub max_steps: u32,
    /// For the worker's log only: the broker always uses the policy's model.
    pub model: String,
    /// Wall-clock limit of each tool call.
    pub tool_timeout_ms: u64,
    /// Limit of the whole ask, enforced by the broker.
    pub timeout_ms: u64,
    /// Send a [`FromWorker::ToolDone`] after each tool call.
    pub stream: bool,
    /// Every tool call of the ask runs in this session directory
    /// ([`ExecRequest::session_dir`]).
    pub session_dir: Option<std::path::PathBuf>,
    /// The tools the model may be offered and may call (a member's rights
    /// in the chat she speaks from); `None`: every tool. A call of any other
    /// tool is refused, and the model reads why.
    #[serde(default)]
    pub tools: Option<Vec<String>>,
}

/// Worker → broker during an ask: the conversation so far and the tools.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompleteRequest {
    /// The ask this belongs to.
    pub id: u64,
    /// 1 for the first model call of the ask, then 2, …
    pub step: u32,
    pub messages: Vec<ChatMessage>,
    pub tools: Vec<ToolSpec>,
}

/// What the model answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Completion {
    pub message: ChatMessage,
    pub finish_reason: Option<String>,
    pub usage: Usage,
}

/// Broker → worker: the answer to one [`CompleteRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompletionReply {
    pub id: u64,
    pub step: u32,
    /// `Err` says what went wrong and what to do; the loop ends with it.
    pub result: Result<Completion, String>,
}

/// One tool call of an ask, as the transcript shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolRecord {
    /// `shell`, `read_file`, `write_file`, `list_dir`, or the unknown name
    /// the model used.
    pub tool: String,
    /// The command that ran (empty when the arguments were refused).
    pub argv: Vec<String>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub duration_ms: u64,
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    pub truncated: bool,
    pub timed_out: bool,
    /// Why the call did not run (bad arguments, not started).
    pub error: Option<String>,
}

/// How an ask ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AskStop {
    /// The model gave a final answer.
    Answer,
    /// `max_steps` model calls were made without a final answer.
    MaxSteps,
    /// A model call failed; the message is the broker's.
    Failed(String),
    /// The broker cancelled the ask ([`ToWorker::Cancel`]).
    Cancelled,
}

/// The result of an [`AskRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AskOutcome {
    pub id: u64,
    pub answer: Option<String>,
    pub stop: AskStop,
    /// Model calls made.
    pub steps: u32,
    pub transcript: Vec<ToolRecord>,
    /// As the worker added it up from the broker's answers; the broker
    /// reports its own count, never this one.
    pub usage: Usage,
}
