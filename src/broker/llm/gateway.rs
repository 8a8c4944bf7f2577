//! The gateway proper: budget check, key, provider call, ledger row, spike
//! warning — in that order, for every completion a worker asks for.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::credentials::CredentialStore;
use super::error::GatewayError;
use super::params::ModelParams;
use super::provider::{self, Deltas, Endpoint};
use super::retry::RetryPolicy;
use super::trust::{self, Distrust, PeerCheckLayer, Route};
use crate::broker::ledger::{Ledger, ModelCall, Scope};
use crate::policy::Llm;
use crate::protocol::{CompleteRequest, Completion, Usage};
use crate::utc;

/// Whom a model call is for.
#[derive(Debug, Clone, Copy)]
pub struct CallContext<'a> {
    pub request_id: &'a str,
    pub workflow: &'a str,
    pub tenant: &'a str,
    pub llm: Option<&'a Llm>,
    /// The client whose request this is (`SO_PEERCRED`), for its usage.
    pub uid: Option<u32>,
    /// The member the call is made for (the members file): her name, for
    /// the ledger, and her `tokens_per_day`.
    pub member: Option<(&'a str, Option<u64>)>,
    /// The client's sampling parameters, for every completion.
    pub params: &'a ModelParams,
}

pub struct Gateway {
    ledger: Arc<Ledger>,
    credentials: CredentialStore,
    retry: RetryPolicy,
    /// One HTTP client (connection pool) per per-attempt timeout and route.
    clients: Mutex<BTreeMap<(Duration, Route), reqwest::Client>>,
    /// (workflow, hour) already warned about.
    spikes: Mutex<BTreeSet<(String, i64)>>,
}

impl Gateway {
    pub fn new(ledger: Arc<Ledger>, credentials: CredentialStore, retry: RetryPolicy) -> Self {
        Gateway {
            ledger,
            credentials,
            retry,
            clients: Mutex::new(BTreeMap::new()),
            spikes: Mutex::new(BTreeSet::new()),
        }
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Attempts in all for one model call.
    pub fn max_tries(&self) -> u32 {
        self.retry.max_tries
    }

    /// Worst-case time of one model call, retries and waits included.
    pub fn worst_case(&self, llm: &Llm) -> Duration {
        let tries = self.retry.max_tries;
        llm.timeout * tries + (self.retry.cap.max(self.retry.max_retry_after)) * tries
    }

    fn client(&self, timeout: Duration, route: &Route) -> Result<reqwest::Client, GatewayError> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let key = (timeout, route.clone());
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        super::install_tls_provider();
        let builder = || {
            // A completion is never redirected: a redirect could carry the
            // prompt (and a key) somewhere the policy did not name.
            let b = reqwest::Client::builder()
                .timeout(timeout)
                .connect_timeout(timeout.min(Duration::from_secs(10)))
                .redirect(reqwest::redirect::Policy::none());
            match route {
                Route::Network => b,
                // Straight to the checked listener: a proxy would be the peer.
                Route::PeerUid(uid) => {
                    b.no_proxy().connector_layer(PeerCheckLayer { uid: *uid, proc: Path::new("/proc").to_path_buf() })
                }
                Route::Unix(path) => b.no_proxy().unix_socket(path.as_path()),
            }
        };
        let client = match builder().build() {
            Ok(c) => c,
            // No CA store on this host (no ca-certificates): plain-HTTP
            // providers (a local Ollama) must still work; HTTPS ones then fail
            // certificate checks, and this says why.
            Err(e) => {
                tracing::warn!(
                    "no TLS root certificates ({e}): HTTPS providers will fail; install the ca-certificates package"
                );
                builder().tls_certs_only(Vec::<reqwest::Certificate>::new()).build().map_err(|e| {
                    GatewayError::ProviderDown {
                        base_url: "(any)".into(),
                        tries: 0,
                        detail: format!("failed to build the HTTP client: {e}"),
                    }
                })?
            }
        };
        clients.insert(key, client.clone());
        Ok(client)
    }

    /// Refuses when the workflow's or the tenant's tokens today have reached
    /// their budget. Checked before every call: the call that crosses the
    /// line completes, the next one is refused.
    pub fn check_budget(&self, ctx: &CallContext<'_>, now: i64) -> Result<(), GatewayError> {
        let Some(llm) = ctx.llm else {
            return Ok(());
        };
        let resets_at = utc::day_start(now) + utc::DAY;
        let checks = [
            (llm.daily_tokens, Scope::Workflow(ctx.workflow), "workflow", ctx.workflow),
            (llm.tenant_daily_tokens, Scope::Tenant(ctx.tenant), "tenant", ctx.tenant),
            (
                ctx.member.and_then(|(_, limit)| limit),
                Scope::Member(ctx.member.map_or("", |(name, _)| name)),
                "member",
                ctx.member.map_or("", |(name, _)| name),
            ),
        ];
        for (limit, scope, kind, name) in checks {
            let Some(limit) = limit else { continue };
            let used = self.ledger.tokens_today(scope, now)?;
            if used >= limit {
                return Err(GatewayError::BudgetExhausted { scope: format!("{kind} {name}"), used, limit, resets_at });
            }
        }
        Ok(())
    }

    /// One completion for a worker of `ctx.workflow`; streamed from the
    /// provider when `deltas` wants its text as it comes.
    pub async fn complete(
        &self,
        ctx: &CallContext<'_>,
        req: &CompleteRequest,
        deltas: Option<&Deltas<'_>>,
    ) -> Result<Completion, GatewayError> {
        let llm = ctx.llm.ok_or_else(|| GatewayError::NoLlm { workflow: ctx.workflow.to_string() })?;
        let now = utc::now();
        let record = |usage: Usage, latency_ms: u64, tries: u32, outcome: &str| {
            let row = ModelCall {
                time: now,
                request_id: ctx.request_id,
                workflow: ctx.workflow,
                tenant: ctx.tenant,
                uid: ctx.uid,
                member: ctx.member.map(|(name, _)| name),
                model: &llm.model,
                usage,
                latency_ms,
                tries,
                outcome,
            };
            if let Err(e) = self.ledger.record_model_call(&row) {
                tracing::error!(request_id = %ctx.request_id, "{e}");
            }
        };
        if let Err(e) = self.check_budget(ctx, now) {
            record(Usage::default(), 0, 0, e.code());
            return Err(e);
        }
        let key = match &llm.credential {
            Some(name) => {
                let key = self.credentials.lookup(name)?;
                if key.is_none() {
                    tracing::warn!(request_id = %ctx.request_id, workflow = %ctx.workflow,
                        "credential {name:?} is not in {}; calling without a key", self.credentials);
                }
                key
            }
            None => None,
        };
        let endpoint = Endpoint {
            base_url: &llm.base_url,
            model: &llm.model,
            key: key.as_ref(),
            credential: llm.credential.as_deref(),
            timeout: llm.timeout,
        };
        // The port may have been taken since the policy loaded: check now,
        // before anything (the key included) is sent.
        let route = match trust::check(&llm.endpoint, Path::new("/proc")) {
            Ok(route) => route,
            Err(d) => {
                let base_url = llm.base_url.clone();
                let e = match d {
                    Distrust::Untrusted(detail) => GatewayError::Untrusted { base_url, detail },
                    Distrust::Absent(detail) => GatewayError::ProviderDown { base_url, tries: 0, detail },
                };
                record(Usage::default(), 0, 0, e.code());
                tracing::error!(request_id = %ctx.request_id, workflow = %ctx.workflow, code = e.code(), "{e}");
                return Err(e);
            }
        };
        let http = self.client(llm.timeout, &route)?;
        let started = Instant::now();
        let (result, tries) = provider::complete(
            &http,
            self.retry,
            &endpoint,
            &req.messages,
            &req.tools,
            ctx.params,
            ctx.request_id,
            deltas,
        )
        .await;
        let latency_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        match &result {
            Ok(c) => {
                record(c.usage, latency_ms, tries, "ok");
                tracing::info!(
                    request_id = %ctx.request_id,
                    workflow = %ctx.workflow,
                    model = %llm.model,
                    step = req.step,
                    tries,
                    latency_ms,
                    prompt_tokens = c.usage.prompt_tokens,
                    completion_tokens = c.usage.completion_tokens,
                    tool_calls = c.message.tool_calls.len(),
                    "model call"
                );
                self.spike_check(ctx.workflow, llm.spike_factor);
            }
            Err(e) => {
                record(Usage::default(), latency_ms, tries, e.code());
                tracing::warn!(request_id = %ctx.request_id, workflow = %ctx.workflow,
                    model = %llm.model, tries, latency_ms, code = e.code(), "model call failed: {e}");
            }
        }
        result
    }

    /// Warns, once per workflow and hour, when the hour's tokens exceed
    /// `factor` × the trailing 24 h hourly average.
    fn spike_check(&self, workflow: &str, factor: f64) {
        let now = utc::now();
        match self.ledger.spike(workflow, now, factor) {
            Ok(Some(spike)) => {
                let first = self
                    .spikes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert((workflow.to_string(), utc::hour_start(now)));
                if first {
                    tracing::warn!(
                        workflow,
                        hour_tokens = spike.hour_tokens,
                        hourly_average = spike.hourly_average,
                        "token spike: {} tokens this hour, more than {factor} × the trailing 24 h \
                         average of {:.0}/h; a runaway loop? budgets will stop it at daily_tokens",
                        spike.hour_tokens,
                        spike.hourly_average
                    );
                }
            }
            Ok(None) => {}
            Err(e) => tracing::error!("{e}"),
        }
    }
}
