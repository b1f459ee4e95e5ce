//! Who hears about a document: live subscribers (per-document WebSocket, SSE) and
//! automerge-repo peers. The owner never waits for either.
//!
//! A subscriber's queue is bounded twice: in batches (`--subscriber-queue`) and in bytes
//! (`--max-peer-queue`). Batches are shared by every subscriber, but one batch can weigh as
//! much as everything merged in one turn (up to 512 uploads of `--max-body` each), so a
//! subscriber that stopped reading could otherwise keep 64 of them alive. The owner cannot see
//! what the subscriber has taken, except through the channel's free capacity: since the queue
//! is first in, first out, the sizes of the events still queued are the last ones it pushed.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

use super::api::DocEvent;
use super::peer::{Outgoing, PeerLink};
use super::stats::Stats;
use super::ConnId;

pub(super) struct Subscriber {
    pub(super) conn: ConnId,
    pub(super) tx: mpsc::Sender<DocEvent>,
    pub(super) lagged: Arc<AtomicBool>,
}

/// The sizes of the events still in one subscriber's queue, oldest first.
#[derive(Default)]
struct Backlog {
    sizes: VecDeque<usize>,
    bytes: usize,
}

impl Backlog {
    /// Forgets the events the subscriber took: `queued` are still in the channel.
    fn taken_down_to(&mut self, queued: usize) {
        while self.sizes.len() > queued {
            if let Some(size) = self.sizes.pop_front() {
                self.bytes -= size;
            }
        }
    }

    fn pushed(&mut self, size: usize) {
        self.sizes.push_back(size);
        self.bytes += size;
    }
}

pub(super) struct Subscribers {
    list: Vec<(Subscriber, Backlog)>,
    /// Bytes that may wait for one subscriber.
    budget: usize,
}

impl Subscribers {
    pub(super) fn new(budget: usize) -> Self {
        Self {
            list: Vec::new(),
            budget,
        }
    }

    pub(super) fn add(&mut self, s: Subscriber) {
        self.list.push((s, Backlog::default()));
    }

    pub(super) fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Subscribers still listening (one that went away is dropped at the next push).
    pub(super) fn live(&self) -> usize {
        self.list.iter().filter(|(s, _)| !s.tx.is_closed()).count()
    }

    /// Drops every subscriber: their subscriptions end after their queued events.
    pub(super) fn clear(&mut self) {
        self.list.clear();
    }

    /// Hands one event to every subscriber without ever waiting: a full queue (in batches or
    /// in bytes) marks the subscriber as lagged (it catches up by itself), a closed one is
    /// dropped. A subscriber is not sent a batch made only of its own changes. A batch larger
    /// than the whole byte budget still reaches a subscriber whose queue is empty.
    pub(super) fn push(&mut self, event: DocEvent, stats: &Stats) {
        let budget = self.budget;
        self.list.retain_mut(|(s, backlog)| {
            let size = match &event {
                DocEvent::Changes(b) if b.sole_origin == Some(s.conn) => {
                    return !s.tx.is_closed();
                }
                DocEvent::Changes(b) => b.bytes.len(),
                DocEvent::Deleted => 0,
            };
            backlog.taken_down_to(s.tx.max_capacity() - s.tx.capacity());
            let too_heavy = !backlog.sizes.is_empty() && backlog.bytes + size > budget;
            if too_heavy && matches!(event, DocEvent::Changes(_)) {
                stats.overflowed();
                s.lagged.store(true, Ordering::Release);
                return true;
            }
            match s.tx.try_send(event.clone()) {
                Ok(()) => {
                    backlog.pushed(size);
                    true
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    stats.overflowed();
                    s.lagged.store(true, Ordering::Release);
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
    }
}

/// The document's repo peers' outbound queues, by connection.
#[derive(Default)]
pub(super) struct RepoLinks(HashMap<ConnId, PeerLink>);

impl RepoLinks {
    pub(super) fn attach(&mut self, link: PeerLink) {
        self.0.entry(link.conn).or_insert(link);
    }

    pub(super) fn detach(&mut self, conn: ConnId) {
        self.0.remove(&conn);
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }

    pub(super) fn has(&self, conn: ConnId) -> bool {
        self.0.contains_key(&conn)
    }

    /// Queues every message; returns the connections found gone.
    pub(super) fn deliver(&mut self, outgoing: Vec<(ConnId, Outgoing)>) -> Vec<ConnId> {
        let mut gone = Vec::new();
        for (conn, out) in outgoing {
            if self.0.get(&conn).is_some_and(|link| !link.offer(out)) {
                self.0.remove(&conn);
                gone.push(conn);
            }
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doc::api::PushBatch;

    fn subscriber(conn: ConnId, queue: usize) -> (Subscriber, mpsc::Receiver<DocEvent>) {
        let (tx, rx) = mpsc::channel(queue);
        let lagged = Arc::new(AtomicBool::new(false));
        (Subscriber { conn, tx, lagged }, rx)
    }

    fn batch(sole_origin: Option<ConnId>) -> DocEvent {
        DocEvent::Changes(Arc::new(PushBatch {
            bytes: bytes::Bytes::from_static(b"x"),
            heads: Vec::new(),
            sole_origin,
        }))
    }

    #[test]
    fn a_writer_is_never_sent_its_own_batch_and_a_full_queue_lags() {
        let stats = Stats::default();
        let mut subs = Subscribers::new(usize::MAX);
        let (writer, mut writer_rx) = subscriber(1, 4);
        let (slow, mut slow_rx) = subscriber(2, 1);
        let slow_lagged = slow.lagged.clone();
        subs.add(writer);
        subs.add(slow);
        subs.push(batch(Some(1)), &stats);
        assert!(writer_rx.try_recv().is_err(), "its own batch");
        assert!(slow_rx.try_recv().is_ok());
        subs.push(batch(None), &stats);
        subs.push(batch(None), &stats);
        assert!(
            writer_rx.try_recv().is_ok(),
            "a mixed batch reaches everyone"
        );
        assert!(
            slow_lagged.load(Ordering::Acquire),
            "the second did not fit"
        );
        drop(slow_rx);
        subs.push(batch(None), &stats);
        assert_eq!(subs.list.len(), 1, "a closed subscriber is dropped");
    }

    fn batch_of(len: usize) -> DocEvent {
        DocEvent::Changes(Arc::new(PushBatch {
            bytes: bytes::Bytes::from(vec![0; len]),
            heads: Vec::new(),
            sole_origin: None,
        }))
    }

    #[test]
    fn a_queue_is_bounded_in_bytes_by_what_the_subscriber_has_not_taken() {
        let stats = Stats::default();
        let mut subs = Subscribers::new(10_000);
        let (s, mut rx) = subscriber(1, 64);
        let lagged = s.lagged.clone();
        subs.add(s);
        subs.push(batch_of(20_000), &stats);
        assert!(!lagged.load(Ordering::Acquire), "alone, a big batch passes");
        subs.push(batch_of(100), &stats);
        assert!(lagged.swap(false, Ordering::AcqRel), "past the byte budget");
        assert!(rx.try_recv().is_ok());
        // Taken: its bytes no longer count.
        for _ in 0..2 {
            subs.push(batch_of(4_000), &stats);
        }
        assert!(!lagged.load(Ordering::Acquire));
        subs.push(batch_of(4_000), &stats);
        assert!(lagged.load(Ordering::Acquire), "12,000 bytes would wait");
        // A deletion is never held back by the byte budget.
        subs.push(DocEvent::Deleted, &stats);
        let mut got = Vec::new();
        while let Ok(e) = rx.try_recv() {
            got.push(matches!(e, DocEvent::Deleted));
        }
        assert_eq!(got, vec![false, false, true]);
    }
}
