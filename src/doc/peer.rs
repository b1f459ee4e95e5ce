//! How a document owner talks back to an automerge-repo peer without ever waiting for it.
//!
//! The queue is bounded in bytes, not in messages: one peer's queue of 4,096 messages could
//! otherwise hold gigabytes (another peer's ephemeral messages of megabytes each) while the
//! peer does not read. Every queued message carries a [`Charge`] against the peer's budget,
//! released only once the socket has written the message, so the bound covers everything that
//! waits for the peer, from the owner to the socket.
//!
//! When a sync message does not fit, the peer has fallen behind: dropping a sync message
//! silently would desynchronise it, so the link is marked and the socket is woken at once to
//! close (4008) — the client reconnects and resyncs from a fresh sync state. An ephemeral
//! message that does not fit is only dropped (and counted): it is best-effort by nature, and
//! one peer's flood must not disconnect the others.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::ConnId;
use crate::id::DocId;

/// What a queued message costs besides its payload (ids, CBOR framing).
const OVERHEAD: usize = 128;

/// Something a repo connection must send to its peer.
#[derive(Debug, Clone, PartialEq)]
pub enum Outgoing {
    /// An encoded automerge sync message for `doc`.
    Sync { doc: DocId, data: Vec<u8> },
    /// "Neither I nor my peers have `doc`."
    Unavailable { doc: DocId },
    /// An ephemeral message from another peer, relayed unchanged but for the target. The data
    /// is shared by every recipient.
    Ephemeral {
        doc: DocId,
        sender_id: String,
        session_id: String,
        count: u64,
        data: Bytes,
    },
}

impl Outgoing {
    /// The bytes this message holds while it waits.
    fn weight(&self) -> usize {
        OVERHEAD
            + match self {
                Outgoing::Sync { data, .. } => data.len(),
                Outgoing::Unavailable { .. } => 0,
                Outgoing::Ephemeral {
                    sender_id,
                    session_id,
                    data,
                    ..
                } => sender_id.len() + session_id.len() + data.len(),
            }
    }
}

/// One peer's byte budget, shared by its link (the producers) and its queue (the socket).
#[derive(Debug)]
struct Budget {
    queued: AtomicUsize,
    limit: usize,
    /// Cancelled when a sync message did not fit.
    fell_behind: CancellationToken,
}

impl Budget {
    /// Takes `bytes` from the budget when they fit. A message larger than the whole budget
    /// fits only when nothing else waits (a big document must still be able to sync).
    fn take(self: &Arc<Self>, bytes: usize) -> Option<Charge> {
        let mut queued = self.queued.load(Ordering::Acquire);
        loop {
            if queued > 0 && queued.saturating_add(bytes) > self.limit {
                return None;
            }
            match self.queued.compare_exchange_weak(
                queued,
                queued + bytes,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    return Some(Charge {
                        budget: self.clone(),
                        bytes,
                    })
                }
                Err(now) => queued = now,
            }
        }
    }
}

/// The bytes one queued message holds against its peer's budget; given back on drop (once the
/// socket has written the message, or when the connection ends).
#[derive(Debug)]
pub struct Charge {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.queued.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// A message for the peer and what it holds of the peer's budget.
#[derive(Debug)]
pub struct Queued {
    pub out: Outgoing,
    pub charge: Charge,
}

/// A repo connection's outbound link, held by document owners and the hub.
#[derive(Debug, Clone)]
pub struct PeerLink {
    pub conn: ConnId,
    tx: mpsc::UnboundedSender<Queued>,
    budget: Arc<Budget>,
}

/// The receiving end of a [`PeerLink`], held by the connection's socket.
#[derive(Debug)]
pub struct PeerQueue {
    rx: mpsc::UnboundedReceiver<Queued>,
    budget: Arc<Budget>,
}

impl PeerLink {
    /// A link for connection `conn` whose queue may hold `limit` bytes.
    pub fn new(conn: ConnId, limit: usize) -> (PeerLink, PeerQueue) {
        let (tx, rx) = mpsc::unbounded_channel();
        let budget = Arc::new(Budget {
            queued: AtomicUsize::new(0),
            limit,
            fell_behind: CancellationToken::new(),
        });
        let queue = PeerQueue {
            rx,
            budget: budget.clone(),
        };
        (PeerLink { conn, tx, budget }, queue)
    }

    /// Queues `out` when it fits; false when the connection is gone. A sync message that does
    /// not fit marks the peer as fallen behind; an ephemeral one is dropped.
    pub fn offer(&self, out: Outgoing) -> bool {
        if self.tx.is_closed() {
            return false;
        }
        if self.budget.fell_behind.is_cancelled() {
            // It is closing and will resync: nothing queued now would be of use.
            return true;
        }
        let Some(charge) = self.budget.take(out.weight()) else {
            if matches!(out, Outgoing::Ephemeral { .. }) {
                crate::metrics::rejected("ephemeral_queue_full");
            } else {
                self.budget.fell_behind.cancel();
            }
            return true;
        };
        self.tx.send(Queued { out, charge }).is_ok()
    }
}

impl PeerQueue {
    /// The next message; `None` once every link is gone. Cancel-safe.
    pub async fn recv(&mut self) -> Option<Queued> {
        self.rx.recv().await
    }

    /// Resolves once a sync message did not fit: the peer must be closed. Cancel-safe, and
    /// borrows nothing, so it can be awaited together with [`recv`](Self::recv).
    pub fn fell_behind(&self) -> impl Future<Output = ()> + Send + 'static {
        self.budget.fell_behind.clone().cancelled_owned()
    }

    /// Bytes queued or being written.
    #[cfg(test)]
    pub fn queued_bytes(&self) -> usize {
        self.budget.queued.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> DocId {
        DocId::parse("d").unwrap()
    }

    fn sync(len: usize) -> Outgoing {
        Outgoing::Sync {
            doc: doc(),
            data: vec![0; len],
        }
    }

    fn ephemeral(len: usize) -> Outgoing {
        Outgoing::Ephemeral {
            doc: doc(),
            sender_id: "a".into(),
            session_id: "s".into(),
            count: 1,
            data: Bytes::from(vec![0; len]),
        }
    }

    #[tokio::test]
    async fn the_queue_is_bounded_in_bytes_until_written() {
        let (link, mut queue) = PeerLink::new(1, 10_000);
        assert!(link.offer(sync(4_000)));
        assert!(link.offer(sync(4_000)));
        // A third would pass 10,000 bytes: ephemeral messages are dropped, the peer stays.
        assert!(link.offer(ephemeral(4_000)));
        assert_eq!(queue.queued_bytes(), 2 * (4_000 + OVERHEAD));
        let first = queue.recv().await.unwrap();
        assert_eq!(first.out, sync(4_000));
        // Received is not written: the message still holds its bytes until the charge drops.
        assert!(link.offer(ephemeral(4_000)));
        assert_eq!(queue.queued_bytes(), 2 * (4_000 + OVERHEAD));
        drop(first);
        assert!(link.offer(ephemeral(4_000)));
        assert!(matches!(
            queue.recv().await.unwrap().out,
            Outgoing::Sync { .. }
        ));
        assert!(matches!(
            queue.recv().await.unwrap().out,
            Outgoing::Ephemeral { .. }
        ));
        assert_eq!(queue.queued_bytes(), 0, "every charge given back");
    }

    #[tokio::test(start_paused = true)]
    async fn a_sync_message_that_does_not_fit_wakes_the_socket_to_close() {
        let (link, queue) = PeerLink::new(1, 10_000);
        assert!(link.offer(sync(8_000)));
        let waiting = tokio::spawn(async move {
            queue.fell_behind().await;
            queue
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        assert!(link.offer(sync(8_000)), "the connection is still there");
        let mut queue = waiting.await.unwrap();
        // Nothing more is queued for a peer that is closing.
        assert!(link.offer(sync(10)));
        assert!(queue.recv().await.is_some());
        assert!(queue.rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_message_larger_than_the_budget_passes_alone() {
        let (link, mut queue) = PeerLink::new(1, 1_000);
        assert!(link.offer(sync(50_000)), "a big document still syncs");
        assert!(queue.recv().await.is_some());
        assert!(!queue.budget.fell_behind.is_cancelled());
    }

    #[tokio::test]
    async fn offers_to_a_closed_connection_say_so() {
        let (link, queue) = PeerLink::new(1, 1_000);
        drop(queue);
        assert!(!link.offer(sync(1)));
    }
}
