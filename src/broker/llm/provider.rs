//! One chat completion at an OpenAI-compatible endpoint, with async-openai's
//! client and types: corral's messages in, a [`Completion`] or a
//! [`GatewayError`] out. A completion may be streamed: its text is then
//! handed on piece by piece as the provider sends it, and the pieces are put
//! together into the same [`Completion`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::types::chat::{
    ChatCompletionMessageToolCall, ChatCompletionMessageToolCalls, ChatCompletionRequestAssistantMessage,
    ChatCompletionRequestAssistantMessageContent, ChatCompletionRequestMessage, ChatCompletionRequestSystemMessage,
    ChatCompletionRequestSystemMessageContent, ChatCompletionRequestToolMessage,
    ChatCompletionRequestToolMessageContent, ChatCompletionRequestUserMessage, ChatCompletionRequestUserMessageContent,
    ChatCompletionResponseStream, ChatCompletionStreamOptions, ChatCompletionTool, ChatCompletionTools,
    CreateChatCompletionRequest, CreateChatCompletionResponse, FinishReason, FunctionCall, FunctionObject,
};

use super::credentials::Key;
use super::error::GatewayError;
use super::params::ModelParams;
use super::retry::RetryPolicy;
use super::transport::{Attempts, Transport};
use crate::protocol::{ChatMessage, Completion, Role, ToolCall, ToolSpec, Usage};

/// Where and as whom to call.
pub struct Endpoint<'a> {
    pub base_url: &'a str,
    pub model: &'a str,
    pub key: Option<&'a Key>,
    pub credential: Option<&'a str>,
    pub timeout: Duration,
}

fn to_openai(m: &ChatMessage) -> ChatCompletionRequestMessage {
    let text = m.content.clone().unwrap_or_default();
    match m.role {
        Role::System => ChatCompletionRequestMessage::System(ChatCompletionRequestSystemMessage {
            content: ChatCompletionRequestSystemMessageContent::Text(text),
            name: None,
        }),
        Role::User => ChatCompletionRequestMessage::User(ChatCompletionRequestUserMessage {
            content: ChatCompletionRequestUserMessageContent::Text(text),
            name: None,
        }),
        Role::Tool => ChatCompletionRequestMessage::Tool(ChatCompletionRequestToolMessage {
            content: ChatCompletionRequestToolMessageContent::Text(text),
            tool_call_id: m.tool_call_id.clone().unwrap_or_default(),
        }),
        Role::Assistant => {
            let calls: Vec<ChatCompletionMessageToolCalls> = m
                .tool_calls
                .iter()
                .map(|c| {
                    ChatCompletionMessageToolCalls::Function(ChatCompletionMessageToolCall {
                        id: c.id.clone(),
                        function: FunctionCall { name: c.name.clone(), arguments: c.arguments.clone() },
                    })
                })
                .collect();
            ChatCompletionRequestMessage::Assistant(ChatCompletionRequestAssistantMessage {
                content: m.content.clone().map(ChatCompletionRequestAssistantMessageContent::Text),
                tool_calls: (!calls.is_empty()).then_some(calls),
                ..Default::default()
            })
        }
    }
}

fn tool_to_openai(t: &ToolSpec) -> ChatCompletionTools {
    ChatCompletionTools::Function(ChatCompletionTool {
        function: FunctionObject {
            name: t.name.clone(),
            description: Some(t.description.clone()),
            parameters: serde_json::from_str(&t.parameters).ok(),
            strict: None,
        },
    })
}

/// The request body: corral's conversation and tools for `model`, with the
/// client's sampling parameters.
pub fn request(
    model: &str,
    messages: &[ChatMessage],
    tools: &[ToolSpec],
    params: &ModelParams,
) -> CreateChatCompletionRequest {
    params.request(CreateChatCompletionRequest {
        model: model.to_string(),
        messages: messages.iter().map(to_openai).collect(),
        tools: (!tools.is_empty()).then(|| tools.iter().map(tool_to_openai).collect()),
        ..Default::default()
    })
}

/// The first choice of a response as corral's [`Completion`].
pub fn completion(resp: CreateChatCompletionResponse) -> Result<Completion, String> {
    let choice = resp.choices.into_iter().next().ok_or("the answer has no choices")?;
    let tool_calls = choice
        .message
        .tool_calls
        .unwrap_or_default()
        .into_iter()
        .filter_map(|c| match c {
            ChatCompletionMessageToolCalls::Function(f) => {
                Some(ToolCall { id: f.id, name: f.function.name, arguments: f.function.arguments })
            }
            ChatCompletionMessageToolCalls::Custom(_) => None,
        })
        .collect();
    let usage = resp
        .usage
        .map(|u| Usage {
            prompt_tokens: u64::from(u.prompt_tokens),
            completion_tokens: u64::from(u.completion_tokens),
            total_tokens: u64::from(u.total_tokens),
        })
        .unwrap_or_default();
    let finish_reason = choice.finish_reason.map(|r| finish_name(r).to_string());
    Ok(Completion {
        message: ChatMessage { role: Role::Assistant, content: choice.message.content, tool_calls, tool_call_id: None },
        finish_reason,
        usage,
    })
}

/// Calls the endpoint. Returns the outcome and how many HTTP attempts it
/// took.
#[allow(clippy::too_many_arguments)]
pub async fn complete(
    http: &reqwest::Client,
    policy: RetryPolicy,
    ep: &Endpoint<'_>,
    messages: &[ChatMessage],
    tools: &[ToolSpec],
    params: &ModelParams,
    request_id: &str,
    deltas: Option<&Deltas<'_>>,
) -> (Result<Completion, GatewayError>, u32) {
    let log = Arc::new(Mutex::new(Attempts::default()));
    let transport = Transport {
        client: http.clone(),
        policy,
        send_auth: ep.key.is_some(),
        request_id: request_id.to_string(),
        log: Arc::clone(&log),
    };
    // Every field set explicitly: OpenAIConfig::new() would pick up
    // OPENAI_* variables from the broker's environment.
    let config = OpenAIConfig::new()
        .with_api_base(ep.base_url.trim_end_matches('/'))
        .with_api_key(ep.key.map(Key::expose).unwrap_or_default())
        .with_org_id("")
        .with_project_id("");
    let client = async_openai::Client::build(http.clone(), config).with_http_service(transport);
    let bad = |detail| GatewayError::BadResponse { base_url: ep.base_url.to_string(), detail };
    let result = match deltas {
        None => {
            client.chat().create(request(ep.model, messages, tools, params)).await.map(|r| completion(r).map_err(bad))
        }
        Some(deltas) => {
            let mut req = request(ep.model, messages, tools, params);
            req.stream_options =
                Some(ChatCompletionStreamOptions { include_usage: Some(true), include_obfuscation: None });
            match client.chat().create_stream(req).await {
                Ok(stream) => gather(stream, deltas).await.map(|r| r.map_err(bad)),
                Err(e) => Err(e),
            }
        }
    };
    let attempts = log.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let tries = attempts.tries.max(1);
    let outcome = match result {
        Ok(done) => done,
        Err(e) => Err(classify(e, ep, &attempts)),
    };
    (outcome, tries)
}

/// Told each piece of a streamed completion's text as it arrives.
pub type Deltas<'a> = dyn Fn(&str) + Send + Sync + 'a;

/// Bytes of text and arguments a streamed completion may add up to: what
/// one frame to the worker can carry, with room to spare.
const STREAMED_MAX: usize = crate::frame::MAX_FRAME / 2;
/// Tool calls a streamed completion may announce.
const STREAMED_CALLS_MAX: usize = 64;

/// Reads a streamed completion to its end, telling `deltas` its text as it
/// comes, and puts the pieces together as one [`Completion`].
async fn gather(
    mut stream: ChatCompletionResponseStream,
    deltas: &Deltas<'_>,
) -> Result<Result<Completion, String>, OpenAIError> {
    let mut content: Option<String> = None;
    let mut calls: Vec<ToolCall> = Vec::new();
    let mut finish: Option<FinishReason> = None;
    let mut usage = Usage::default();
    let mut size = 0usize;
    while let Some(item) = std::future::poll_fn(|cx| stream.as_mut().poll_next(cx)).await {
        let chunk = item?;
        if let Some(u) = chunk.usage {
            usage = Usage {
                prompt_tokens: u64::from(u.prompt_tokens),
                completion_tokens: u64::from(u.completion_tokens),
                total_tokens: u64::from(u.total_tokens),
            };
        }
        for choice in chunk.choices.into_iter().filter(|c| c.index == 0) {
            if let Some(text) = choice.delta.content.filter(|t| !t.is_empty()) {
                size += text.len();
                deltas(&text);
                content.get_or_insert_with(String::new).push_str(&text);
            }
            for piece in choice.delta.tool_calls.unwrap_or_default() {
                let i = usize::try_from(piece.index).unwrap_or(usize::MAX);
                if i >= STREAMED_CALLS_MAX {
                    return Ok(Err(format!(
                        "a streamed answer announced tool call {i}, more than {STREAMED_CALLS_MAX}"
                    )));
                }
                if calls.len() <= i {
                    calls.resize(i + 1, ToolCall { id: String::new(), name: String::new(), arguments: String::new() });
                }
                let call = &mut calls[i];
                if let Some(id) = piece.id {
                    size += id.len();
                    call.id = id;
                }
                if let Some(f) = piece.function {
                    let (name, args) = (f.name.unwrap_or_default(), f.arguments.unwrap_or_default());
                    size += name.len() + args.len();
                    call.name.push_str(&name);
                    call.arguments.push_str(&args);
                }
            }
            if choice.finish_reason.is_some() {
                finish = choice.finish_reason;
            }
        }
        if size > STREAMED_MAX {
            return Ok(Err(format!("a streamed answer exceeded {STREAMED_MAX} bytes")));
        }
    }
    Ok(Ok(Completion {
        message: ChatMessage { role: Role::Assistant, content, tool_calls: calls, tool_call_id: None },
        finish_reason: finish.map(|r| finish_name(r).to_string()),
        usage,
    }))
}

fn finish_name(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::ToolCalls => "tool_calls",
        FinishReason::ContentFilter => "content_filter",
        FinishReason::FunctionCall => "function_call",
    }
}

fn snippet(text: &str) -> String {
    let t: String = text.chars().take(200).collect();
    if t.len() < text.len() {
        format!("{t}…")
    } else {
        t
    }
}

/// Maps async-openai's error, and what the transport saw, to a typed error.
fn classify(e: OpenAIError, ep: &Endpoint<'_>, attempts: &Attempts) -> GatewayError {
    let base_url = ep.base_url.to_string();
    let by_status = |status: u16, message: String| match status {
        401 | 403 => GatewayError::Unauthorized {
            base_url: base_url.clone(),
            status,
            message,
            credential: ep.credential.map(str::to_string),
            key_found: ep.key.is_some(),
        },
        404 => GatewayError::ModelNotFound { base_url: base_url.clone(), model: ep.model.to_string(), message },
        429 => GatewayError::RateLimited {
            base_url: base_url.clone(),
            tries: attempts.tries,
            retry_after: attempts.retry_after,
        },
        s if s >= 500 => GatewayError::ProviderDown {
            base_url: base_url.clone(),
            tries: attempts.tries,
            detail: format!("it answered {s}: {message}"),
        },
        s => GatewayError::Rejected { base_url: base_url.clone(), status: s, message },
    };
    match e {
        OpenAIError::ApiError(api) => by_status(api.status_code.as_u16(), snippet(&api.api_error.message)),
        OpenAIError::Reqwest(err) if err.is_timeout() => GatewayError::Timeout { base_url, timeout: ep.timeout },
        OpenAIError::Reqwest(err) if err.is_connect() => GatewayError::ProviderDown {
            base_url,
            tries: attempts.tries,
            detail: format!("cannot connect: {}", crate::error_chain(&err)),
        },
        OpenAIError::Reqwest(err) => {
            GatewayError::ProviderDown { base_url, tries: attempts.tries, detail: crate::error_chain(&err) }
        }
        OpenAIError::JSONDeserialize(err, content) => match attempts.last_status {
            // An error status with a body that is not OpenAI's error JSON.
            Some(status) if status >= 400 => by_status(status, snippet(&content)),
            _ => GatewayError::BadResponse { base_url, detail: format!("{err} in {:?}", snippet(&content)) },
        },
        other => GatewayError::BadResponse { base_url, detail: other.to_string() },
    }
}
