//! The LLM gateway: the only part of corral that talks to model providers.
//!
//! A worker running an ask sends the conversation over its socket; the
//! broker ([`gateway`]) checks the workflow's and the tenant's daily token
//! budgets in the [ledger](super::ledger), adds the API key
//! ([`credentials`]), calls the provider's OpenAI-compatible
//! `/chat/completions` ([`provider`], through [`transport`], which retries
//! with [`retry`]), records the tokens the provider reported, and answers
//! with the completion or an [`GatewayError`] that says what to do. Before
//! every call, and on every new connection, [`trust`] checks that the
//! endpoint is the provider the policy trusts and not a squatter.
//! Workers have no network and never hold a key.

mod credentials;
mod error;
mod gateway;
mod params;
mod provider;
mod retry;
mod transport;
mod trust;

pub use credentials::{CredentialError, CredentialStore};
pub use error::GatewayError;
pub use gateway::{CallContext, Gateway};
pub use params::{ModelParams, ParamError};
pub use provider::Deltas;
pub use retry::RetryPolicy;
pub use trust::{check as check_endpoint, Distrust};

/// Installs the TLS crypto provider of the gateway's HTTPS clients once per
/// process: `ring`. reqwest's default, aws-lc-rs, weighs about 3 MB of the
/// binary and minutes of a cold build; `ring` offers the same TLS 1.2/1.3
/// suites to the providers. Idempotent; call before building a client.
pub(crate) fn install_tls_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err: another provider is already the process default; keep it.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
