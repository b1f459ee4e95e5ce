//! Who hears about a document: live subscribers (per-document WebSocket, SSE) and
//! automerge-repo peers. The owner never waits for either.

use std::collections::HashMap;
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

#[derive(Default)]
pub(super) struct Subscribers(Vec<Subscriber>);

impl Subscribers {
    pub(super) fn add(&mut self, s: Subscriber) {
        self.0.push(s);
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Drops every subscriber: their subscriptions end after their queued events.
    pub(super) fn clear(&mut self) {
        self.0.clear();
    }

    /// Hands one event to every subscriber without ever waiting: a full queue marks the
    /// subscriber as lagged (it catches up by itself), a closed one is dropped. A subscriber
    /// is not sent a batch made only of its own changes.
    pub(super) fn push(&mut self, event: DocEvent, stats: &Stats) {
        self.0.retain(|s| {
            if let DocEvent::Changes(b) = &event {
                if b.sole_origin == Some(s.conn) {
                    return !s.tx.is_closed();
                }
            }
            match s.tx.try_send(event.clone()) {
                Ok(()) => true,
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
        let mut subs = Subscribers::default();
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
        assert_eq!(subs.0.len(), 1, "a closed subscriber is dropped");
    }
}
