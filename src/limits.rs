//! Connection limits and per-connection message rate, shared by the live transports.
//!
//! A [`ConnectionGuard`] is taken before a WebSocket upgrade or an SSE stream starts and
//! released when the connection ends, so the counts are exact. Refusals are 503 with
//! `too_many_connections`; a socket over its message rate is closed with 1008 (by the socket
//! loop). The rate uses Tokio's clock, so tests on paused time are deterministic.

use dashmap::DashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::time::Instant;

use crate::error::RelayError;
use crate::id::DocId;

#[derive(Debug)]
pub struct ConnectionLimits {
    max_total: usize,
    max_per_doc: usize,
    total: AtomicUsize,
    per_doc: DashMap<DocId, usize>,
    /// Slots of upgraded sockets: connections the HTTP accept loop no longer counts.
    sockets: AtomicUsize,
}

/// Holds one connection slot; released on drop.
#[derive(Debug)]
pub struct ConnectionGuard {
    limits: Arc<ConnectionLimits>,
    doc: Option<DocId>,
    socket: bool,
}

impl ConnectionLimits {
    pub fn new(max_total: usize, max_per_doc: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_doc,
            total: AtomicUsize::new(0),
            per_doc: DashMap::new(),
            sockets: AtomicUsize::new(0),
        })
    }

    /// Live WebSockets (upgraded: no longer HTTP connections).
    pub fn sockets(&self) -> usize {
        self.sockets.load(Ordering::Acquire)
    }

    /// Takes a slot for a connection (to `doc`, for per-document connections).
    pub fn acquire(self: &Arc<Self>, doc: Option<&DocId>) -> Result<ConnectionGuard, RelayError> {
        let previous = self.total.fetch_add(1, Ordering::AcqRel);
        if previous >= self.max_total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(RelayError::TooManyConnections("server limit"));
        }
        if let Some(doc) = doc {
            let mut count = self.per_doc.entry(doc.clone()).or_insert(0);
            if *count >= self.max_per_doc {
                drop(count);
                self.total.fetch_sub(1, Ordering::AcqRel);
                return Err(RelayError::TooManyConnections("document limit"));
            }
            *count += 1;
        }
        Ok(ConnectionGuard {
            limits: self.clone(),
            doc: doc.cloned(),
            socket: false,
        })
    }

    /// Live connections.
    pub fn live(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

impl ConnectionGuard {
    /// Marks the slot as a WebSocket's: once upgraded, the connection is counted here only.
    pub fn socket(mut self) -> Self {
        if !self.socket {
            self.socket = true;
            self.limits.sockets.fetch_add(1, Ordering::AcqRel);
        }
        self
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.limits.total.fetch_sub(1, Ordering::AcqRel);
        if self.socket {
            self.limits.sockets.fetch_sub(1, Ordering::AcqRel);
        }
        if let Some(doc) = &self.doc {
            self.limits.per_doc.remove_if_mut(doc, |_, count| {
                *count = count.saturating_sub(1);
                *count == 0
            });
        }
    }
}

/// A token bucket: `rate` messages per second, bursts of `2 × rate`.
#[derive(Debug)]
pub struct RateLimit {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    pub fn per_second(rate: u32) -> Self {
        let rate = f64::from(rate.max(1));
        Self {
            rate,
            tokens: rate * 2.0,
            last: Instant::now(),
        }
    }

    /// Takes one token; false when the connection is over its rate.
    pub fn allow(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate * 2.0);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_and_released() {
        let limits = ConnectionLimits::new(3, 2);
        let doc = DocId::parse("d").unwrap();
        let a = limits.acquire(Some(&doc)).unwrap();
        let _b = limits.acquire(Some(&doc)).unwrap();
        assert!(matches!(
            limits.acquire(Some(&doc)),
            Err(RelayError::TooManyConnections(_))
        ));
        let _c = limits.acquire(None).unwrap();
        assert!(limits.acquire(None).is_err(), "server limit");
        drop(a);
        assert_eq!(limits.live(), 2);
        assert!(limits.acquire(Some(&doc)).is_ok());
    }

    #[test]
    fn rate_limit_allows_bursts_then_refuses() {
        let mut r = RateLimit::per_second(5);
        let allowed = (0..50).filter(|_| r.allow()).count();
        assert_eq!(allowed, 10, "a burst of twice the rate");
    }
}
