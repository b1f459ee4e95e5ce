//! One turn of an owner between its merge and its replies.
//!
//! Group commit with pipelining: a turn's durable write runs while the owner already merges
//! the next turn; the turn's replies, pushes and repo messages go out only once its write has
//! succeeded. A failed write fails the turn's writes (and those of the turn merged on top of
//! it); its reads and subscriptions are answered again once the owner is back to the durable
//! state (`durable.rs`), and its pushes and repo messages are dropped.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use automerge::ChangeHash;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::api::{ReadOutcome, Reply, SubscribeRequest, Subscription, WriteOutcome};
use super::listeners::Subscriber;
use super::merge::{Effects, Work};
use super::shared::store_error;
use crate::error::RelayError;
use crate::storage::{ChunkKey, StoreError};

/// Who waits for the turn.
#[derive(Default)]
pub(super) struct Replies {
    /// One per write job, in order.
    pub(super) writes: Vec<Option<Reply<WriteOutcome>>>,
    pub(super) reads: Vec<PendingRead>,
    pub(super) subscribes: Vec<SubscribeRequest>,
}

impl Replies {
    pub(super) fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.reads.is_empty() && self.subscribes.is_empty()
    }

    pub(super) fn fail(self, err: &RelayError) {
        let rest = self.fail_writes(err);
        for r in rest.reads {
            let _ = r.reply.send(Err(err.clone()));
        }
        for s in rest.subscribes {
            let _ = s.reply.send(Err(err.clone()));
        }
    }

    /// Fails the writes with `err` and returns the rest (reads, subscriptions), to be
    /// answered again from the durable state.
    pub(super) fn fail_writes(self, err: &RelayError) -> Replies {
        for reply in self.writes.into_iter().flatten() {
            let _ = reply.send(Err(err.clone()));
        }
        Replies {
            writes: Vec::new(),
            reads: self.reads,
            subscribes: self.subscribes,
        }
    }

    /// Adds `other`'s waiting requests to these.
    pub(super) fn absorb(&mut self, other: Replies) {
        self.writes.extend(other.writes);
        self.reads.extend(other.reads);
        self.subscribes.extend(other.subscribes);
    }

    /// The work that answers these reads again (no writes).
    pub(super) fn reads_work(&self) -> Work {
        Work {
            reads: self.reads.iter().map(|r| r.since.clone()).collect(),
            ..Work::default()
        }
    }
}

/// A read waiting for the turn: of the whole document (`since = None`), or of changes since
/// some heads (kept, so the read can be answered again after a failed turn).
pub(super) struct PendingRead {
    pub(super) since: Option<Vec<ChangeHash>>,
    pub(super) reply: Reply<ReadOutcome>,
}

/// A durable write's key, size and duration.
pub(super) struct Persisted {
    pub(super) key: ChunkKey,
    pub(super) len: usize,
    pub(super) took: Duration,
    /// The chunk's bytes, kept to publish to the other nodes once durable (when there are
    /// other nodes).
    pub(super) published: Option<bytes::Bytes>,
}

pub(super) type PersistTask = JoinHandle<Result<Persisted, StoreError>>;

/// A merged turn, waiting for its durable write (if it has one).
pub(super) struct Turn {
    pub(super) persist: Option<PersistTask>,
    pub(super) replies: Replies,
    pub(super) effects: Effects,
    pub(super) heads: Vec<ChangeHash>,
    /// The document exists after this turn.
    pub(super) exists: bool,
}

/// What the owner still has to hand out after the turn's replies went.
pub(super) struct Answered {
    pub(super) push: Option<super::api::PushBatch>,
    pub(super) outgoing: Vec<(super::ConnId, super::peer::Outgoing)>,
    /// Subscribers that joined in this turn (after the push: their initial state has it).
    pub(super) joined: Vec<Subscriber>,
    pub(super) snapshot: Option<Vec<u8>>,
}

impl Turn {
    /// The result of the turn's durable write; `None` when it had nothing to write.
    pub(super) async fn persisted(&mut self) -> Result<Option<Persisted>, RelayError> {
        let Some(handle) = self.persist.as_mut() else {
            return Ok(None);
        };
        match handle.await {
            Ok(Ok(done)) => Ok(Some(done)),
            Ok(Err(e)) => Err(store_error(&e)),
            Err(e) => Err(RelayError::StorageUnavailable(format!(
                "storage task failed: {e}"
            ))),
        }
    }

    /// Answers every writer, reader and new subscriber (the write is durable).
    pub(super) fn answer(self) -> Answered {
        let Turn {
            replies,
            effects,
            heads,
            exists,
            ..
        } = self;
        let etag = &effects.etag;
        for (reply, result) in replies.writes.into_iter().zip(effects.results) {
            if let Some(reply) = reply {
                let _ = reply.send(result);
            }
        }
        let full_save = effects.full_save.unwrap_or_default();
        let mut since_reads = effects.since_reads.into_iter();
        for read in replies.reads {
            let outcome = if !exists {
                ReadOutcome::Missing
            } else {
                let bytes = if read.since.is_none() {
                    full_save.clone()
                } else {
                    since_reads.next().unwrap_or_default()
                };
                ReadOutcome::Found {
                    bytes,
                    heads: heads.clone(),
                    etag: etag.clone(),
                }
            };
            let _ = read.reply.send(Ok(outcome));
        }
        let mut joined = Vec::new();
        for s in replies.subscribes {
            let (tx, rx) = mpsc::channel(s.queue.max(1));
            let lagged = Arc::new(AtomicBool::new(false));
            let initial = exists.then(|| (full_save.clone(), heads.clone()));
            let sub = Subscription {
                initial,
                events: rx,
                lagged: lagged.clone(),
            };
            if s.reply.send(Ok(sub)).is_ok() {
                joined.push(Subscriber {
                    conn: s.conn,
                    tx,
                    lagged,
                });
            }
        }
        Answered {
            push: effects.push,
            outgoing: effects.outgoing,
            joined,
            snapshot: effects.snapshot,
        }
    }
}
