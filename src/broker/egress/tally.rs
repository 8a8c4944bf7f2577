//! One call's egress: the destinations it reached and was refused, with
//! bytes each way, and the per-call caps (`connections_max`, `bytes_max`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::Refusal;

/// Bytes of one proxied connection. `sent`: from the tool to the
/// destination; `received`: back.
#[derive(Debug, Default)]
pub struct ConnBytes {
    pub sent: AtomicU64,
    pub received: AtomicU64,
}

/// What a call did through the proxy, as its reply and the ledger show it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressReceipt {
    /// Destinations the proxy connected to, in the order first reached.
    pub reached: Vec<Reached>,
    /// Destinations the proxy refused, with the rule that refused them.
    pub refused: Vec<Refused>,
    /// The per-call cap that stopped the call's traffic, if one did.
    pub capped: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reached {
    pub host: String,
    pub port: u16,
    pub connections: u32,
    /// Bytes from the tool to the destination.
    pub sent: u64,
    /// Bytes from the destination to the tool.
    pub received: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub host: String,
    pub port: u16,
    pub attempts: u32,
    pub reason: String,
}

impl EgressReceipt {
    pub fn is_empty(&self) -> bool {
        self.reached.is_empty() && self.refused.is_empty() && self.capped.is_none()
    }
}

/// The tally of one call, shared by the proxy's connection tasks. Ended
/// ([`CallTally::finish`]) when the call's answer is in: its connections are
/// aborted then, so nothing a tool started outlives its call.
pub struct CallTally {
    connections_max: u32,
    bytes_max: u64,
    /// Bytes of the whole call, both ways, for `bytes_max`.
    bytes: AtomicU64,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    ended: bool,
    connections: u32,
    order: Vec<(String, u16)>,
    reached: BTreeMap<(String, u16), Vec<Arc<ConnBytes>>>,
    refused: BTreeMap<(String, u16), (u32, String)>,
    capped: Option<String>,
    tasks: Vec<tokio::task::AbortHandle>,
}

impl CallTally {
    pub fn new(connections_max: u32, bytes_max: u64) -> Arc<CallTally> {
        Arc::new(CallTally {
            connections_max,
            bytes_max,
            bytes: AtomicU64::new(0),
            inner: Mutex::new(Inner::default()),
        })
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a refusal of `host:port`.
    pub fn refuse(&self, host: &str, port: u16, why: &Refusal) {
        let mut inner = self.inner();
        let entry = inner.refused.entry((host.to_string(), port)).or_insert_with(|| (0, why.0.clone()));
        entry.0 += 1;
    }

    /// Counts a new connection to `host:port` against `connections_max`;
    /// its byte counters when admitted.
    pub fn admit(&self, host: &str, port: u16) -> Result<Arc<ConnBytes>, Refusal> {
        let mut inner = self.inner();
        if inner.ended {
            return Err(Refusal("the call this connection belonged to has ended".into()));
        }
        if inner.connections >= self.connections_max {
            let why = format!("the call reached [network] connections_max = {}", self.connections_max);
            inner.capped.get_or_insert_with(|| why.clone());
            drop(inner);
            let refusal = Refusal(why);
            self.refuse(host, port, &refusal);
            return Err(refusal);
        }
        inner.connections += 1;
        let key = (host.to_string(), port);
        let bytes = Arc::new(ConnBytes::default());
        if !inner.reached.contains_key(&key) {
            inner.order.push(key.clone());
        }
        inner.reached.entry(key).or_default().push(bytes.clone());
        Ok(bytes)
    }

    /// Adds `n` bytes to the call's total; `Err` with the cap's words once
    /// the total is above `bytes_max`.
    pub fn add_bytes(&self, n: u64) -> Result<(), String> {
        let total = self.bytes.fetch_add(n, Ordering::Relaxed) + n;
        if total > self.bytes_max {
            let why = format!("the call reached [network] bytes_max = {} bytes", self.bytes_max);
            self.inner().capped.get_or_insert_with(|| why.clone());
            return Err(why);
        }
        Ok(())
    }

    /// Bytes the call may still move; `Err` with the cap's words at none.
    pub fn remaining(&self) -> Result<u64, String> {
        let left = self.bytes_max.saturating_sub(self.bytes.load(Ordering::Relaxed));
        if left == 0 {
            let why = format!("the call reached [network] bytes_max = {} bytes", self.bytes_max);
            self.inner().capped.get_or_insert_with(|| why.clone());
            return Err(why);
        }
        Ok(left)
    }

    /// Keeps `task` to abort when the call ends (or aborts it now if it has).
    pub fn track(&self, task: tokio::task::AbortHandle) {
        let mut inner = self.inner();
        if inner.ended {
            task.abort();
        } else {
            inner.tasks.push(task);
        }
    }

    /// Ends the call: aborts its connections and says what it did.
    pub fn finish(&self) -> EgressReceipt {
        let mut inner = self.inner();
        inner.ended = true;
        for t in inner.tasks.drain(..) {
            t.abort();
        }
        let reached = inner
            .order
            .iter()
            .map(|key| {
                let conns = &inner.reached[key];
                Reached {
                    host: key.0.clone(),
                    port: key.1,
                    connections: u32::try_from(conns.len()).unwrap_or(u32::MAX),
                    sent: conns.iter().map(|c| c.sent.load(Ordering::Relaxed)).sum(),
                    received: conns.iter().map(|c| c.received.load(Ordering::Relaxed)).sum(),
                }
            })
            .collect();
        let refused = inner
            .refused
            .iter()
            .map(|((host, port), (attempts, reason))| Refused {
                host: host.clone(),
                port: *port,
                attempts: *attempts,
                reason: reason.clone(),
            })
            .collect();
        EgressReceipt { reached, refused, capped: inner.capped.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_hold_and_the_receipt_adds_up() {
        let t = CallTally::new(2, 100);
        let a = t.admit("a.test", 443).unwrap();
        a.sent.fetch_add(10, Ordering::Relaxed);
        a.received.fetch_add(20, Ordering::Relaxed);
        let b = t.admit("a.test", 443).unwrap();
        b.received.fetch_add(5, Ordering::Relaxed);
        assert!(t.admit("b.test", 80).unwrap_err().0.contains("connections_max = 2"));
        t.refuse("evil.test", 443, &Refusal("evil.test is not in [network] allow".into()));
        assert!(t.add_bytes(60).is_ok());
        assert!(t.add_bytes(60).unwrap_err().contains("bytes_max = 100"));
        let r = t.finish();
        assert_eq!(
            r.reached,
            vec![Reached { host: "a.test".into(), port: 443, connections: 2, sent: 10, received: 25 }]
        );
        assert_eq!(r.refused.len(), 2);
        assert_eq!(r.refused[0].host, "b.test");
        assert_eq!(r.refused[1].reason, "evil.test is not in [network] allow");
        assert!(r.capped.unwrap().contains("connections_max"));
        assert!(t.admit("a.test", 443).is_err(), "an ended call admits nothing");
    }
}
