//! What can go wrong with a model call, each case with what to do about it.

use std::time::Duration;

use crate::broker::ledger::LedgerError;
use crate::utc;

use super::credentials::CredentialError;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("workflow {workflow} has no [llm] table: add one with base_url and model to its policy")]
    NoLlm { workflow: String },
    #[error(
        "the daily token budget of {scope} is spent ({used} of {limit} tokens today); it resets at \
         {reset}; raise llm.{key} in the policy or wait",
        reset = utc::format(*.resets_at),
        key = if scope.starts_with("tenant") { "tenant_daily_tokens" } else { "daily_tokens" }
    )]
    BudgetExhausted {
        /// "workflow homework" or "tenant kid".
        scope: String,
        used: u64,
        limit: u64,
        /// Unix seconds of the next UTC midnight.
        resets_at: i64,
    },
    #[error(
        "the provider at {base_url} refused the request with {status}: {message}; {hint}",
        hint = match credential {
            Some(name) if *key_found => format!("check the key in credential {name:?} ($CREDENTIALS_DIRECTORY/{name} or the environment variable {name})"),
            Some(name) => format!("no key was found for credential {name:?}: provide $CREDENTIALS_DIRECTORY/{name} (LoadCredential=) or the environment variable {name} to the broker"),
            None => "no key was sent: name one with llm.credential in the policy".to_string(),
        }
    )]
    Unauthorized { base_url: String, status: u16, message: String, credential: Option<String>, key_found: bool },
    #[error("the provider at {base_url} does not know model {model:?} (404: {message}); check llm.model in the policy (for Ollama: `ollama pull {model}`) and that base_url ends in /v1")]
    ModelNotFound { base_url: String, model: String, message: String },
    #[error("the provider at {base_url} is rate limiting this key (429 after {tries} tries{after}); retry later or lower the request rate",
        after = retry_after.map(|d| format!(", Retry-After {}s", d.as_secs())).unwrap_or_default())]
    RateLimited { base_url: String, tries: u32, retry_after: Option<Duration> },
    #[error("the provider at {base_url} is down: {detail} (after {tries} tries); retry later, or check that the provider is running and base_url is right")]
    ProviderDown { base_url: String, tries: u32, detail: String },
    #[error("the provider at {base_url} did not answer within {} (llm.timeout); raise llm.timeout in the policy or use a faster model", crate::policy::format_duration(*.timeout))]
    Timeout { base_url: String, timeout: Duration },
    #[error("refused to call the provider at {base_url}: {detail}")]
    Untrusted { base_url: String, detail: String },
    #[error("the provider at {base_url} rejected the request with {status}: {message}")]
    Rejected { base_url: String, status: u16, message: String },
    #[error("the provider at {base_url} sent an answer that is not a chat completion: {detail}; check that base_url points at an OpenAI-compatible API (…/v1)")]
    BadResponse { base_url: String, detail: String },
    #[error(transparent)]
    Credential(#[from] CredentialError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

impl GatewayError {
    /// The stable code clients and the ledger see.
    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::NoLlm { .. } => "no_llm",
            GatewayError::BudgetExhausted { .. } => "budget_exhausted",
            GatewayError::Unauthorized { .. } => "provider_unauthorized",
            GatewayError::ModelNotFound { .. } => "model_not_found",
            GatewayError::RateLimited { .. } => "provider_rate_limited",
            GatewayError::ProviderDown { .. } => "provider_down",
            GatewayError::Timeout { .. } => "provider_timeout",
            GatewayError::Rejected { .. } => "provider_rejected",
            GatewayError::Untrusted { .. } => "provider_untrusted",
            GatewayError::BadResponse { .. } => "bad_provider_response",
            GatewayError::Credential(_) => "credential_unreadable",
            GatewayError::Ledger(_) => "internal",
        }
    }

    /// The HTTP status the API answers with.
    pub fn http_status(&self) -> u16 {
        match self {
            GatewayError::NoLlm { .. } => 400,
            GatewayError::BudgetExhausted { .. } => 429,
            GatewayError::RateLimited { .. } => 503,
            GatewayError::Timeout { .. } => 504,
            GatewayError::Credential(_) | GatewayError::Ledger(_) => 500,
            _ => 502,
        }
    }

    /// When a spent budget comes back (Unix seconds).
    pub fn resets_at(&self) -> Option<i64> {
        match self {
            GatewayError::BudgetExhausted { resets_at, .. } => Some(*resets_at),
            _ => None,
        }
    }
}
