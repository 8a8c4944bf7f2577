//! The HTTP layer under async-openai's client: a tower service that sends
//! each attempt with reqwest, leaves out `Authorization` when there is no
//! key, and retries per [`RetryPolicy`], keeping a log of the attempts so
//! the gateway can say what happened (and the ledger how many tries).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use async_openai::error::OpenAIError;
use async_openai::middleware::HttpRequestFactory;

use super::retry::{parse_retry_after, random_u64, retryable_status, RetryPolicy};

/// What the attempts of one call saw.
#[derive(Debug, Clone, Default)]
pub struct Attempts {
    pub tries: u32,
    /// Status of the last answer, if any came.
    pub last_status: Option<u16>,
    /// `Retry-After` of the last answer.
    pub retry_after: Option<Duration>,
}

#[derive(Clone)]
pub struct Transport {
    pub client: reqwest::Client,
    pub policy: RetryPolicy,
    /// `false`: strip the `Authorization` header async-openai always adds
    /// (an endpoint that needs no key, e.g. Ollama, gets none).
    pub send_auth: bool,
    pub request_id: String,
    pub log: Arc<Mutex<Attempts>>,
}

type Answer = Result<reqwest::Response, OpenAIError>;

impl tower::Service<HttpRequestFactory> for Transport {
    type Response = reqwest::Response;
    type Error = OpenAIError;
    type Future = Pin<Box<dyn Future<Output = Answer> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), OpenAIError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, factory: HttpRequestFactory) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.run(factory).await })
    }
}

impl Transport {
    fn note(&self, f: impl FnOnce(&mut Attempts)) {
        f(&mut self.log.lock().unwrap_or_else(|p| p.into_inner()));
    }

    async fn run(self, factory: HttpRequestFactory) -> Answer {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let mut request = factory.build().await?;
            if !self.send_auth {
                request.headers_mut().remove(reqwest::header::AUTHORIZATION);
            }
            let result = self.client.execute(request).await;
            let (retry, status, retry_after) = match &result {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let after = resp
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(parse_retry_after);
                    (retryable_status(status), Some(status), after)
                }
                // Timeouts are not retried: the provider is slow, and
                // trying again would multiply the wait.
                Err(e) => (e.is_connect(), None, None),
            };
            self.note(|a| {
                a.tries = attempt;
                a.last_status = status;
                a.retry_after = retry_after;
            });
            let too_long = retry_after.is_some_and(|d| d > self.policy.max_retry_after);
            if !retry || attempt >= self.policy.max_tries || too_long {
                return result.map_err(OpenAIError::Reqwest);
            }
            let delay = self.policy.delay(attempt, retry_after, random_u64());
            match &result {
                Ok(_) => tracing::warn!(
                    request_id = %self.request_id,
                    attempt,
                    status = ?status,
                    delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    "provider answered with a retryable status; retrying"
                ),
                Err(e) => tracing::warn!(
                    request_id = %self.request_id,
                    attempt,
                    delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    "provider unreachable ({e}); retrying"
                ),
            }
            drop(result);
            tokio::time::sleep(delay).await;
        }
    }
}
