//! What transports say to a document's owner and what they get back.
//!
//! Commands are kept small (large payloads are boxed): every owner's queue allocates its slots
//! in blocks of 32 commands, and every hot document has a queue. A `Command` is 32 bytes
//! (checked by a test), so an idle hot document's queue costs 1 KiB.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use automerge::{sync, ChangeHash};
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::peer::PeerLink;
use super::ConnId;
use crate::error::RelayError;
use crate::storage::ChunkKey;
use crate::upload::Upload;

/// Where an owner sends one request's result.
pub type Reply<T> = oneshot::Sender<Result<T, RelayError>>;

/// Opt-in compare-and-set on writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Precondition {
    None,
    /// `If-Match`: one of these ETags (or `*`) must be current.
    IfMatch(Vec<String>),
    /// `If-None-Match: *`: the document must not exist.
    IfNoneMatchAny,
}

/// One upload to merge: what the merge needs. Moved into the merge and consumed there.
pub struct WriteJob {
    pub upload: Upload,
    pub precondition: Precondition,
    /// The connection that sent it, if any (not echoed back to it).
    pub origin: Option<ConnId>,
    /// Who stored (or stores) its changes.
    pub source: Source,
}

/// Where a write's changes come from, which decides who stores them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Source {
    /// A client of this node: this node stores them, within its limits.
    #[default]
    Client,
    /// Another node stored them as the chunk `key` (`len` bytes) and published it.
    Published { key: ChunkKey, len: usize },
    /// Read back from the store (a catch-up with what other nodes stored).
    Store,
}

impl Source {
    /// The changes are stored already, by another node: applied without being stored again,
    /// past every limit (the store holds them whatever this node thinks of them).
    pub fn is_stored(&self) -> bool {
        !matches!(self, Source::Client)
    }
}

/// A write: the job, and who waits for its outcome (nobody, for a repo peer's changes unless
/// its socket asks).
pub struct WriteRequest {
    pub job: WriteJob,
    pub reply: Option<Reply<WriteOutcome>>,
}

/// The result of a durable write.
#[derive(Debug, Clone)]
pub struct WriteOutcome {
    /// This write created the document.
    pub created: bool,
    pub heads: Vec<ChangeHash>,
    pub etag: String,
    /// Changes newly applied to the document by this write.
    pub applied: usize,
    /// Changes of this write still waiting for missing dependencies.
    pub pending: usize,
    /// Changes the upload carried.
    pub total: usize,
}

/// A read: the whole document (`since = None`) or the changes not reachable from `since`.
pub struct ReadRequest {
    pub since: Option<Vec<ChangeHash>>,
    pub reply: Reply<ReadOutcome>,
}

#[derive(Debug, Clone)]
pub enum ReadOutcome {
    Missing,
    Found {
        bytes: Bytes,
        heads: Vec<ChangeHash>,
        etag: String,
    },
}

/// A subscription request from live connection `conn`, with its queue length in batches.
pub struct SubscribeRequest {
    pub conn: ConnId,
    pub queue: usize,
    pub reply: Reply<Subscription>,
}

/// A live subscription: the current document, then one event per batch.
pub struct Subscription {
    /// The document at subscription time (bytes of a full save and its heads), if it exists.
    pub initial: Option<(Bytes, Vec<ChangeHash>)>,
    pub events: mpsc::Receiver<DocEvent>,
    /// Set by the owner when an event was dropped because the queue was full; the subscriber
    /// must then catch up with a `since` read from the last heads it delivered.
    pub lagged: Arc<AtomicBool>,
}

/// The changes of one merged batch, shared by every subscriber.
#[derive(Debug)]
pub struct PushBatch {
    /// Exactly the batch's new changes, loadable by `loadIncremental`.
    pub bytes: Bytes,
    /// The document's heads after the batch.
    pub heads: Vec<ChangeHash>,
    /// Set when every change of the batch came from this one connection.
    pub sole_origin: Option<ConnId>,
}

#[derive(Debug, Clone)]
pub enum DocEvent {
    Changes(Arc<PushBatch>),
    Deleted,
}

/// An automerge-repo sync (or request) message for the owner.
pub struct RepoSync {
    pub link: PeerLink,
    /// The message without its changes.
    pub message: sync::Message,
    /// The message's changes, validated.
    pub upload: Option<Upload>,
    /// It came as a `request` (the peer lacks the document).
    pub request: bool,
    /// Told once the message's changes are durable (or failed).
    pub reply: Option<Reply<WriteOutcome>>,
}

/// A command to a document's owner.
pub enum Command {
    Write(Box<WriteRequest>),
    Read(Box<ReadRequest>),
    Delete {
        reply: Reply<bool>,
    },
    Subscribe(Box<SubscribeRequest>),
    /// An automerge-repo sync (or request) message; its changes were split out and validated.
    RepoSync(Box<RepoSync>),
    /// A repo connection closed: forget its sync state.
    RepoDetach {
        conn: ConnId,
    },
    /// The memory budget is exceeded: leave memory once idle (reloaded on demand).
    Evict,
    /// Compare the chunks known here with the store's and take in what other nodes stored
    /// (`deleted`: another node said it deleted the document).
    Refresh {
        deleted: bool,
    },
    /// What the document holds (`None` when it does not exist), for listings.
    Info {
        reply: Reply<Option<DocInfo>>,
    },
}

/// A document read as JSON.
pub enum JsonRead {
    Missing,
    /// The reader's ETag is current.
    NotModified(String),
    Found(serde_json::Value, String),
}

/// One document's figures, as its owner has them (loaded from the store if it was not hot).
#[derive(Debug, Clone)]
pub struct DocInfo {
    pub heads: Vec<ChangeHash>,
    /// Applied changes.
    pub changes: u64,
    /// Bytes of its stored chunks.
    pub stored_bytes: u64,
    /// Changes waiting for missing dependencies.
    pub pending: usize,
    /// It was in memory before it was asked (set by `Documents::info`; asking loads the
    /// others).
    pub was_hot: bool,
    /// The latest time its heads carry (seconds since the epoch, as the writers' clocks
    /// said).
    pub last_change: i64,
    /// Live per-document WebSocket and SSE subscribers, and automerge-repo peers syncing it.
    pub subscribers: usize,
    pub repo_peers: usize,
}

impl Command {
    /// Answers the command's sender with `err` (commands nobody awaits are dropped).
    pub(super) fn fail(self, err: RelayError) {
        match self {
            Command::Write(w) => {
                if let Some(reply) = w.reply {
                    let _ = reply.send(Err(err));
                }
            }
            Command::Read(r) => {
                let _ = r.reply.send(Err(err));
            }
            Command::Delete { reply } => {
                let _ = reply.send(Err(err));
            }
            Command::Info { reply } => {
                let _ = reply.send(Err(err));
            }
            Command::Subscribe(s) => {
                let _ = s.reply.send(Err(err));
            }
            Command::RepoSync(s) => {
                if let Some(reply) = s.reply {
                    let _ = reply.send(Err(err));
                }
            }
            Command::RepoDetach { .. } | Command::Evict | Command::Refresh { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_fits_in_32_bytes() {
        assert!(std::mem::size_of::<Command>() <= 32);
    }
}
