//! When and how long to wait before trying a provider again: 429, 5xx and
//! connection failures are retried a bounded number of times, with
//! exponential backoff and jitter, or after the provider's `Retry-After`.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// How a provider call is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_tries: u32,
    /// Backoff before the first retry; doubles per retry.
    pub base: Duration,
    /// Longest backoff of one retry.
    pub cap: Duration,
    /// A `Retry-After` longer than this is not waited for: the call fails
    /// and says when to come back.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_tries: 4,
            base: Duration::from_millis(250),
            cap: Duration::from_secs(8),
            max_retry_after: Duration::from_secs(30),
        }
    }
}

/// Whether an HTTP status is worth another try.
pub fn retryable_status(status: u16) -> bool {
    status == 429 || (500..=599).contains(&status)
}

/// `Retry-After` in delay-seconds form. (The HTTP-date form is rare from
/// model APIs and is treated as absent: backoff applies.)
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// A random number for jitter (std's per-process random hash keys).
pub fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.finish()
}

impl RetryPolicy {
    /// The wait before retry number `retry` (1 for the first retry).
    /// With `Retry-After`: that long, plus up to 10% jitter so that many
    /// callers do not return at once. Without: "equal jitter" backoff, a
    /// random wait between half and all of `base · 2^(retry-1)`, capped.
    pub fn delay(&self, retry: u32, retry_after: Option<Duration>, random: u64) -> Duration {
        let frac = (random % 1000) as f64 / 1000.0;
        match retry_after {
            Some(after) => after + after.mul_f64(0.1 * frac),
            None => {
                let exp = self.base.saturating_mul(1u32 << retry.saturating_sub(1).min(16)).min(self.cap);
                exp / 2 + (exp / 2).mul_f64(frac)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let p = RetryPolicy::default();
        for retry in 1..=3 {
            let full = p.base * (1 << (retry - 1));
            for random in [0, 499, 999] {
                let d = p.delay(retry, None, random);
                assert!(d >= full / 2 && d <= full, "retry {retry}: {d:?}");
            }
        }
        assert!(p.delay(30, None, 999) <= p.cap);
        assert_ne!(p.delay(2, None, 0), p.delay(2, None, 900), "jitter varies");
    }

    #[test]
    fn retry_after_is_honoured_never_shortened() {
        let p = RetryPolicy::default();
        let d = p.delay(1, Some(Duration::from_secs(1)), 999);
        assert!(d >= Duration::from_secs(1) && d <= Duration::from_millis(1100), "{d:?}");
        assert_eq!(parse_retry_after(" 3 "), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert!(retryable_status(429) && retryable_status(503));
        assert!(!retryable_status(401) && !retryable_status(404) && !retryable_status(400));
    }
}
