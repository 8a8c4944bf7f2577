//! What one caller may hold of the front door: connections per uid and in
//! total, and bytes of request bodies in flight per uid and in total.
//!
//! Every number is a hard cap checked before the thing is taken: a
//! connection over its uid's cap is answered 429 and closed at once, a body
//! whose declared length does not fit its uid's budget is refused before a
//! byte of it is read. So one uid can only ever exhaust its own share, and
//! the broker's memory for bodies is bounded by [`Limits::bodies_total`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// The front door's numbers. [`Limits::default`] is what the broker uses;
/// the README's API section quotes them.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Open connections of one uid (root included).
    pub conns_per_uid: usize,
    /// Open connections in total (lowered to fit `RLIMIT_NOFILE`).
    pub conns_total: usize,
    /// Largest request body.
    pub body_max: u64,
    /// Bytes of request bodies one uid may have in flight (declared
    /// lengths, held from the first byte until the request ends).
    pub bodies_per_uid: u64,
    /// Bytes of request bodies in flight in total.
    pub bodies_total: u64,
    /// From a request head's first byte to its end.
    pub header_timeout: Duration,
    /// A connection with no request in progress (new, or kept alive) is
    /// closed after this long.
    pub idle_timeout: Duration,
    /// From a request head's end to its body's last byte.
    pub body_timeout: Duration,
    /// A response that the client does not read for this long is dropped
    /// with its connection.
    pub write_timeout: Duration,
    /// Largest request head (request line and headers).
    pub head_max: usize,
    /// Most headers in a request.
    pub headers_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            conns_per_uid: 128,
            conns_total: 2048,
            body_max: 8 << 20,
            bodies_per_uid: 16 << 20,
            bodies_total: 64 << 20,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
            head_max: 16 << 10,
            headers_max: 64,
        }
    }
}

/// Why a connection or a body was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The caller's uid is at its own cap: 429.
    Uid,
    /// The broker as a whole is at its cap: 503.
    Total,
}

#[derive(Default)]
struct Held {
    conns: usize,
    conns_by_uid: HashMap<u32, usize>,
    bodies: u64,
    bodies_by_uid: HashMap<u32, u64>,
}

/// The counters behind [`Limits`], shared by the accept loop and the body
/// reader.
pub struct Gate {
    pub limits: Limits,
    held: Mutex<Held>,
    /// Set when a body was released: the allocator should be trimmed.
    freed: AtomicBool,
}

impl Gate {
    pub fn new(limits: Limits) -> Arc<Gate> {
        Arc::new(Gate { limits, held: Mutex::new(Held::default()), freed: AtomicBool::new(false) })
    }

    fn held(&self) -> MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connection of `uid`, counted until the ticket drops.
    pub fn admit(self: &Arc<Self>, uid: u32) -> Result<ConnTicket, Refusal> {
        let mut h = self.held();
        let mine = h.conns_by_uid.get(&uid).copied().unwrap_or(0);
        if mine >= self.limits.conns_per_uid {
            return Err(Refusal::Uid);
        }
        if h.conns >= self.limits.conns_total {
            return Err(Refusal::Total);
        }
        h.conns += 1;
        h.conns_by_uid.insert(uid, mine + 1);
        Ok(ConnTicket { gate: Arc::clone(self), uid })
    }

    /// Room for a body of `len` bytes from `uid`, held until the hold drops.
    pub fn reserve_body(self: &Arc<Self>, uid: u32, len: u64) -> Result<BodyHold, Refusal> {
        let mut h = self.held();
        let mine = h.bodies_by_uid.get(&uid).copied().unwrap_or(0);
        if mine + len > self.limits.bodies_per_uid {
            return Err(Refusal::Uid);
        }
        if h.bodies + len > self.limits.bodies_total {
            return Err(Refusal::Total);
        }
        h.bodies += len;
        h.bodies_by_uid.insert(uid, mine + len);
        Ok(BodyHold { gate: Arc::clone(self), uid, len })
    }

    /// Open connections of `uid` (for tests and status).
    pub fn conns_of(&self, uid: u32) -> usize {
        self.held().conns_by_uid.get(&uid).copied().unwrap_or(0)
    }

    /// Whether a body was released since the last call.
    pub fn take_freed(&self) -> bool {
        self.freed.swap(false, Ordering::Relaxed)
    }
}

/// One counted connection.
pub struct ConnTicket {
    gate: Arc<Gate>,
    uid: u32,
}

impl Drop for ConnTicket {
    fn drop(&mut self) {
        let mut h = self.gate.held();
        h.conns -= 1;
        if let Some(n) = h.conns_by_uid.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                h.conns_by_uid.remove(&self.uid);
            }
        }
    }
}

/// Bytes of one body, counted against its uid and the total.
pub struct BodyHold {
    gate: Arc<Gate>,
    uid: u32,
    len: u64,
}

impl Drop for BodyHold {
    fn drop(&mut self) {
        {
            let mut h = self.gate.held();
            h.bodies -= self.len;
            if let Some(n) = h.bodies_by_uid.get_mut(&self.uid) {
                *n -= self.len;
                if *n == 0 {
                    h.bodies_by_uid.remove(&self.uid);
                }
            }
        }
        self.gate.freed.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_hold_per_uid_and_in_total_and_free_on_drop() {
        let gate = Gate::new(Limits { conns_per_uid: 2, conns_total: 3, ..Limits::default() });
        let a1 = gate.admit(1).unwrap();
        let _a2 = gate.admit(1).unwrap();
        assert_eq!(gate.admit(1).err(), Some(Refusal::Uid), "uid 1 is at its own cap");
        let _b1 = gate.admit(2).unwrap();
        assert_eq!(gate.admit(3).err(), Some(Refusal::Total), "the broker is at its cap");
        drop(a1);
        assert_eq!(gate.conns_of(1), 1);
        let _c1 = gate.admit(3).unwrap();

        let gate = Gate::new(Limits { bodies_per_uid: 10, bodies_total: 15, ..Limits::default() });
        let h = gate.reserve_body(1, 8).unwrap();
        assert_eq!(gate.reserve_body(1, 3).err(), Some(Refusal::Uid));
        let _h2 = gate.reserve_body(2, 7).unwrap();
        assert_eq!(gate.reserve_body(3, 1).err(), Some(Refusal::Total));
        assert!(!gate.take_freed());
        drop(h);
        assert!(gate.take_freed());
        let _h3 = gate.reserve_body(1, 8).unwrap();
    }
}
