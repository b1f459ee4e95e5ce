//! Following one document's merged batches, for any live transport.
//!
//! The owner never waits for a subscriber: each has a bounded queue, and when it is full the
//! owner drops the event and raises the subscriber's `lagged` flag. A [`Follower`] first
//! delivers what is queued (older events), then, seeing the flag, replaces everything it missed
//! with **one** catch-up read of the changes since the last heads it delivered. A slow client
//! therefore costs a bounded amount of memory and never silently misses a change.
//!
//! Live followers are counted by a [`Followers`] gauge owned by the server state (not a
//! process-wide static), so two servers in one process, or tests, keep their own counts.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use automerge::ChangeHash;
use bytes::Bytes;
use tokio::sync::mpsc::error::TryRecvError;

use crate::doc::{ConnId, DocEvent, Documents, ReadOutcome, Subscription};
use crate::error::RelayError;
use crate::id::DocId;

/// What a live transport must deliver next.
#[derive(Debug, Clone)]
pub enum Delivery {
    /// New changes (loadable by `loadIncremental`) and the document's heads after them.
    Changes {
        bytes: Bytes,
        heads: Vec<ChangeHash>,
    },
    /// The document was deleted; the subscription has ended.
    Deleted,
}

/// Counts live followers (per-document WebSocket and SSE subscriptions), for metrics.
#[derive(Debug, Clone, Default)]
pub struct Followers(Arc<AtomicUsize>);

impl Followers {
    pub fn new() -> Self {
        Self::default()
    }

    /// Current number of live followers.
    pub fn count(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// One follower's place in its [`Followers`] gauge, given back on drop.
#[derive(Debug)]
struct Counted(Followers);

impl Counted {
    fn new(gauge: &Followers) -> Self {
        gauge.0.fetch_add(1, Ordering::Relaxed);
        Self(gauge.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct Follower {
    docs: Documents,
    id: DocId,
    conn: ConnId,
    sub: Subscription,
    last_heads: Vec<ChangeHash>,
    _counted: Counted,
}

impl Follower {
    /// Subscribes and returns the follower with the document as it is now (if it exists).
    /// The follower counts itself in `gauge` while it lives.
    pub async fn subscribe(
        docs: &Documents,
        id: &DocId,
        queue: usize,
        gauge: &Followers,
    ) -> Result<(Self, Option<Bytes>), RelayError> {
        let conn = docs.next_conn_id();
        let mut sub = docs.subscribe(id, conn, queue).await?;
        let initial = sub.initial.take();
        let last_heads = initial.as_ref().map(|(_, h)| h.clone()).unwrap_or_default();
        let follower = Self {
            docs: docs.clone(),
            id: id.clone(),
            conn,
            sub,
            last_heads,
            _counted: Counted::new(gauge),
        };
        Ok((follower, initial.map(|(bytes, _)| bytes)))
    }

    /// This subscriber's connection id (its own writes are not echoed to it).
    pub fn conn(&self) -> ConnId {
        self.conn
    }

    /// The next thing to deliver; `None` once the subscription has ended.
    pub async fn next(&mut self) -> Result<Option<Delivery>, RelayError> {
        loop {
            let event = match self.sub.events.try_recv() {
                Ok(event) => Some(event),
                Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected)
                    if self.sub.lagged.swap(false, Ordering::AcqRel) =>
                {
                    if let Some(d) = self.catch_up().await? {
                        return Ok(Some(d));
                    }
                    continue;
                }
                Err(TryRecvError::Empty) => self.sub.events.recv().await,
                Err(TryRecvError::Disconnected) => None,
            };
            return Ok(match event {
                Some(DocEvent::Changes(batch)) => {
                    self.last_heads = batch.heads.clone();
                    Some(Delivery::Changes {
                        bytes: batch.bytes.clone(),
                        heads: batch.heads.clone(),
                    })
                }
                Some(DocEvent::Deleted) => Some(Delivery::Deleted),
                None if self.sub.lagged.load(Ordering::Acquire) => continue,
                None => None,
            });
        }
    }

    async fn catch_up(&mut self) -> Result<Option<Delivery>, RelayError> {
        let since = Some(self.last_heads.clone());
        match self.docs.read(&self.id, since).await? {
            ReadOutcome::Missing => Ok(Some(Delivery::Deleted)),
            ReadOutcome::Found { bytes, heads, .. } => {
                if heads == self.last_heads {
                    return Ok(None);
                }
                self.last_heads = heads.clone();
                Ok(Some(Delivery::Changes { bytes, heads }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn followers_are_counted_per_gauge_while_they_live() {
        let gauge = Followers::new();
        let a = Counted::new(&gauge);
        let _b = Counted::new(&gauge);
        assert_eq!(gauge.count(), 2);
        drop(a);
        assert_eq!(gauge.count(), 1);
        assert_eq!(Followers::new().count(), 0, "another server's gauge");
    }
}
