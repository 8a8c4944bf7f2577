//! Rate limits and concurrency caps of members and tenants (the members
//! file): requests per sliding minute and calls at once, checked when a
//! call's workflow is known and before it is queued.
//!
//! The minute is a sliding window: the times of the calls admitted in the
//! last 60 seconds are kept (at most `requests_per_minute` of them per
//! key), and a call is refused while that many are in the window; it may
//! be retried when the oldest leaves it. A call holds its concurrency slot
//! for as long as its [`Held`] lives: the handler, or the future that
//! writes a streamed answer, owns it, so it is released however the call
//! ends (an answer, an error, a cancel, a client that went away). Refused
//! calls take nothing, so a member over her limits never uses up another
//! member's or another tenant's.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::policy::RateLimits;

const MINUTE: Duration = Duration::from_secs(60);

/// Whose limits: a member's, or a tenant's.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    Member(String),
    Tenant(String),
}

impl Key {
    fn describe(&self) -> String {
        match self {
            Key::Member(m) => format!("member {m}"),
            Key::Tenant(t) => format!("tenant {t}"),
        }
    }
}

#[derive(Default)]
struct Counter {
    /// Admissions in the last minute (only kept under a per-minute limit).
    recent: VecDeque<Instant>,
    running: u32,
}

/// A refused call: what to tell the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    pub message: String,
    /// The limit, for the audit trail: `member kid concurrent = 1`.
    pub limit: String,
    /// Whole seconds, at least 1.
    pub retry_after: u64,
}

/// The counters of every member and tenant with calls in flight or in the
/// last minute.
#[derive(Default)]
pub struct Rates {
    counters: Mutex<HashMap<Key, Counter>>,
}

fn seconds(d: Duration) -> u64 {
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    s.max(1)
}

impl Rates {
    fn counters(&self) -> MutexGuard<'_, HashMap<Key, Counter>> {
        self.counters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a call under every limit of `checks`, or refuses it (taking
    /// nothing) with the first limit it is over.
    pub fn admit(self: &Arc<Self>, checks: &[(Key, RateLimits)], now: Instant) -> Result<Held, Limited> {
        let mut counters = self.counters();
        for (key, limits) in checks {
            let Some(c) = counters.get_mut(key) else { continue };
            while c.recent.front().is_some_and(|t| now.duration_since(*t) >= MINUTE) {
                c.recent.pop_front();
            }
            if let Some(max) = limits.concurrent {
                if c.running >= max {
                    return Err(Limited {
                        message: format!(
                            "{} has {} call(s) running, its limit (concurrent = {max}); retry when one ends",
                            key.describe(),
                            c.running
                        ),
                        retry_after: 1,
                        limit: format!("{} concurrent = {max}", key.describe()),
                    });
                }
            }
            if let Some(max) = limits.requests_per_minute {
                if c.recent.len() >= max as usize {
                    let oldest = c.recent.front().copied().unwrap_or(now);
                    let retry_after = seconds((oldest + MINUTE).saturating_duration_since(now));
                    return Err(Limited {
                        message: format!(
                            "{} made {max} call(s) in the last minute, its limit (requests_per_minute = {max}); \
                             retry in {retry_after} s",
                            key.describe()
                        ),
                        retry_after,
                        limit: format!("{} requests_per_minute = {max}", key.describe()),
                    });
                }
            }
        }
        let mut keys = Vec::new();
        for (key, limits) in checks {
            if limits.concurrent.is_none() && limits.requests_per_minute.is_none() {
                continue;
            }
            let c = counters.entry(key.clone()).or_default();
            c.running += 1;
            if limits.requests_per_minute.is_some() {
                c.recent.push_back(now);
            }
            keys.push(key.clone());
        }
        // Forget keys with nothing in flight and nothing in the window.
        counters.retain(|_, c| c.running > 0 || c.recent.back().is_some_and(|t| now.duration_since(*t) < MINUTE));
        Ok(Held { rates: Arc::clone(self), keys })
    }

    /// Calls running under `key` (tests, status).
    pub fn running(&self, key: &Key) -> u32 {
        self.counters().get(key).map_or(0, |c| c.running)
    }
}

/// The slots of one admitted call, released on drop.
pub struct Held {
    rates: Arc<Rates>,
    keys: Vec<Key>,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held").field("keys", &self.keys).finish()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut counters = self.rates.counters();
        for key in &self.keys {
            if let Some(c) = counters.get_mut(key) {
                c.running = c.running.saturating_sub(1);
            }
        }
    }
}

/// A call [`admit`] refused: the answer, and the limit it was over (none
/// when the ledger could not be read).
pub(super) struct Refused {
    pub error: super::error::ApiError,
    pub limit: Option<String>,
}

impl From<super::error::ApiError> for Refused {
    fn from(error: super::error::ApiError) -> Self {
        Refused { error, limit: None }
    }
}

/// Admits a call of `acting` to `wf` under the member's and the tenant's
/// limits, and, for an ask (`tokens`), the member's `tokens_per_day`. The
/// returned [`Held`] must live as long as the call.
pub(super) fn admit(
    front: &super::Front,
    acting: &super::Acting,
    wf: &crate::broker::Workflow,
    tokens: bool,
) -> Result<Held, Refused> {
    use super::error::ApiError;
    let tenant = wf.policy.tenant.as_str();
    let members = front.broker.members();
    let mut checks = vec![(Key::Tenant(tenant.to_string()), members.tenant_limits(tenant))];
    if let Some(m) = &acting.member {
        checks.insert(0, (Key::Member(m.name.clone()), m.limits));
        if let (true, Some(limit)) = (tokens, m.tokens_per_day) {
            let now = crate::utc::now();
            let scope = crate::broker::ledger::Scope::Member(&m.name);
            let used =
                front.broker.gateway.ledger().tokens_today(scope, now).map_err(|e| {
                    ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
                })?;
            if used >= limit {
                let midnight = crate::utc::day_start(now) + crate::utc::DAY;
                let retry_after = u64::try_from(midnight - now).unwrap_or(1);
                return Err(Refused {
                    error: ApiError::rate_limited(
                        format!(
                            "member {} used {used} tokens today, her limit (tokens_per_day = {limit}); retry after \
                             midnight UTC, in {retry_after} s",
                            m.name
                        ),
                        retry_after,
                    ),
                    limit: Some(format!("member {} tokens_per_day = {limit}", m.name)),
                });
            }
        }
    }
    front
        .rates
        .admit(&checks, Instant::now())
        .map_err(|l| Refused { error: ApiError::rate_limited(l.message, l.retry_after), limit: Some(l.limit) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rpm: Option<u32>, concurrent: Option<u32>) -> RateLimits {
        RateLimits { requests_per_minute: rpm, concurrent }
    }

    #[test]
    fn a_sliding_minute_and_concurrent_calls_per_key() {
        let rates = Arc::new(Rates::default());
        let kid = (Key::Member("kid".into()), limits(Some(2), None));
        let alice = (Key::Member("alice".into()), limits(Some(2), None));
        let t0 = Instant::now();
        let a = rates.admit(std::slice::from_ref(&kid), t0).unwrap();
        let _b = rates.admit(std::slice::from_ref(&kid), t0 + Duration::from_secs(20)).unwrap();
        drop(a);
        let e = rates.admit(std::slice::from_ref(&kid), t0 + Duration::from_millis(30_500)).unwrap_err();
        assert_eq!(e.retry_after, 30, "the oldest leaves the window 29.5 s later: rounded up");
        assert!(e.message.contains("member kid") && e.message.contains("requests_per_minute = 2"), "{e:?}");
        rates.admit(&[alice], t0 + Duration::from_secs(31)).expect("alice has her own minute");
        rates.admit(std::slice::from_ref(&kid), t0 + Duration::from_secs(60)).expect("the first call left the window");

        let tenant = (Key::Tenant("fam".into()), limits(None, Some(1)));
        let held = rates.admit(&[kid.clone(), tenant.clone()], t0 + Duration::from_secs(200)).unwrap();
        let e = rates.admit(std::slice::from_ref(&tenant), t0 + Duration::from_secs(200)).unwrap_err();
        assert_eq!(e.retry_after, 1);
        assert!(e.message.contains("tenant fam") && e.message.contains("concurrent = 1"), "{e:?}");
        assert_eq!(rates.running(&tenant.0), 1, "a refused call takes nothing");
        drop(held);
        assert_eq!(rates.running(&tenant.0), 0);
        let _again = rates.admit(&[tenant], t0 + Duration::from_secs(200)).unwrap();
    }
}
