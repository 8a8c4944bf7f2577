//! The sampling parameters an OpenAI client sends with a chat request
//! (`temperature`, `max_tokens`, `response_format`, …): those a model can
//! honour go to the provider with every completion of the ask; those corral
//! cannot honour are refused with the reason, never dropped in silence.

use async_openai::types::chat::CreateChatCompletionRequest;
use serde_json::{Map, Value};

/// Passed to the provider as the client sent them.
pub const PASSED: [&str; 11] = [
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "seed",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "response_format",
    "reasoning_effort",
    "user",
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParamError {
    #[error("parameter {name} is not supported: {why}")]
    Unsupported { name: String, why: &'static str },
    #[error("parameter {name} is not valid: {detail}")]
    Invalid { name: String, detail: String },
}

/// Why corral refuses a parameter it knows.
fn refusal(name: &str, value: &Value) -> Option<&'static str> {
    const TOOLS: &str = "a workflow's tools are its own (its policy's tools); remove it from the request";
    match name {
        "tools" | "tool_choice" | "functions" | "function_call" | "parallel_tool_calls" => Some(TOOLS),
        "n" if value.as_u64() == Some(1) => None,
        "n" => Some("corral answers with one choice; remove n or set it to 1"),
        // Usage is always in the last chunk of a stream.
        "stream_options" => value
            .as_object()
            .is_some_and(|o| o.keys().any(|k| k != "include_usage"))
            .then_some("only include_usage is understood (usage is always sent)"),
        "logprobs" | "top_logprobs" | "logit_bias" | "audio" | "modalities" | "prediction" | "web_search_options"
        | "service_tier" | "store" | "metadata" | "verbosity" | "prompt_cache_key" | "safety_identifier" => {
            Some("corral does not pass it to the model; remove it from the request")
        }
        _ if PASSED.contains(&name) => None,
        _ => Some("unknown parameter; see GET /v1/openapi.json for what /v1/chat/completions accepts"),
    }
}

/// The parameters of one chat request, ready to go into every completion
/// request of its ask.
#[derive(Debug, Clone, Default)]
pub struct ModelParams {
    /// A request with only the passed parameters set.
    template: CreateChatCompletionRequest,
}

impl ModelParams {
    /// From the request's fields other than `model`, `messages` and
    /// `stream`.
    pub fn from_request(extra: &Map<String, Value>) -> Result<ModelParams, ParamError> {
        let mut passed = Map::new();
        for (name, value) in extra {
            if let Some(why) = refusal(name, value) {
                return Err(ParamError::Unsupported { name: name.clone(), why });
            }
            if !PASSED.contains(&name.as_str()) || value.is_null() {
                continue;
            }
            // One at a time, so that the error names the parameter.
            parse(Map::from_iter([(name.clone(), value.clone())]))
                .map_err(|detail| ParamError::Invalid { name: name.clone(), detail })?;
            passed.insert(name.clone(), value.clone());
        }
        let template = parse(passed).map_err(|detail| ParamError::Invalid { name: "parameters".into(), detail })?;
        Ok(ModelParams { template })
    }

    /// The request for `model` with these parameters.
    pub fn request(&self, base: CreateChatCompletionRequest) -> CreateChatCompletionRequest {
        CreateChatCompletionRequest {
            model: base.model,
            messages: base.messages,
            tools: base.tools,
            ..self.template.clone()
        }
    }
}

fn parse(mut fields: Map<String, Value>) -> Result<CreateChatCompletionRequest, String> {
    fields.insert("model".into(), Value::String(String::new()));
    fields.insert("messages".into(), Value::Array(Vec::new()));
    serde_json::from_value(Value::Object(fields)).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params(v: Value) -> Result<ModelParams, ParamError> {
        ModelParams::from_request(v.as_object().unwrap())
    }

    #[test]
    fn passed_parameters_reach_the_request_and_others_are_refused_by_name() {
        let p = params(json!({"temperature": 0.25, "max_tokens": 50, "seed": 7, "n": 1,
                              "response_format": {"type": "json_object"}, "stream_options": {"include_usage": true}}))
        .unwrap();
        let base = CreateChatCompletionRequest { model: "m".into(), ..Default::default() };
        let sent = serde_json::to_value(p.request(base)).unwrap();
        assert_eq!(sent["model"], "m");
        assert_eq!(sent["temperature"], 0.25);
        assert_eq!(sent["max_tokens"], 50);
        assert_eq!(sent["seed"], 7);
        assert_eq!(sent["response_format"]["type"], "json_object");
        assert!(sent.get("stream").is_none_or(Value::is_null), "{sent}");

        let refused = |v: Value| match params(v) {
            Err(ParamError::Unsupported { name, .. }) => name,
            other => panic!("{other:?}"),
        };
        assert_eq!(refused(json!({"tools": []})), "tools");
        assert_eq!(refused(json!({"n": 2})), "n");
        assert_eq!(refused(json!({"logprobs": true})), "logprobs");
        assert_eq!(refused(json!({"temprature": 1})), "temprature");
        match params(json!({"temperature": "hot"})) {
            Err(ParamError::Invalid { name, .. }) => assert_eq!(name, "temperature"),
            other => panic!("{other:?}"),
        }
    }
}
