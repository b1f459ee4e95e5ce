//! The storage trait: append-only, content-addressed chunks per document.
//!
//! Layout follows automerge-repo: a document is the set of chunks under its prefix, each either
//! an `incremental` (changes appended by one batch) or a `snapshot` (a compacted save), keyed by
//! the SHA-256 of the chunk's bytes. Same content means same key, different content means a
//! different key, so two writers of one store (several relay nodes on one database later) can
//! never overwrite each other's data. Loading concatenates every chunk; compaction writes a
//! snapshot and then deletes only the keys it was told the snapshot contains.
//!
//! Backends must make `append` and `compact` durable before returning: the HTTP `2xx` and the
//! WebSocket ack are sent on the strength of it.
//!
//! Faults are a wrapper's business, not each backend's: [`GuardedStore`] (`guarded.rs`) bounds
//! every operation in time, refuses writes while the disk is under its watermark (`disk.rs`) or
//! the store is unhealthy, and probes until it recovers. [`FaultyStore`] (`faulty.rs`) injects
//! faults into any backend for tests.

mod disk;
mod faulty;
mod guarded;
mod memory;
mod postgres;
mod sled_store;

use std::future::Future;
use std::pin::Pin;

use sha2::{Digest, Sha256};

pub use disk::{DiskSpace, MinFree};
#[cfg(test)]
pub use faulty::until;
pub use faulty::{Fault, FaultSwitch, FaultyStore};
pub use guarded::{GuardedStore, Guarding, StoreHealth};
pub use memory::MemoryStore;
pub use postgres::{redacted, PgSettings, PostgresStore};
pub use sled_store::{Opened, SledStore};

use crate::id::DocId;

/// Which kind of chunk a key names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChunkKind {
    Incremental,
    Snapshot,
}

impl ChunkKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChunkKind::Incremental => "incremental",
            ChunkKind::Snapshot => "snapshot",
        }
    }
}

/// The key of one stored chunk within a document.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ChunkKey {
    pub kind: ChunkKind,
    /// Hex SHA-256 of the chunk's bytes.
    pub hash: String,
}

impl ChunkKey {
    pub fn for_bytes(kind: ChunkKind, bytes: &[u8]) -> Self {
        Self {
            kind,
            hash: hex::encode(Sha256::digest(bytes)),
        }
    }
}

/// One stored chunk.
#[derive(Clone, Debug)]
pub struct StoredChunk {
    pub key: ChunkKey,
    pub bytes: Vec<u8>,
}

/// What kind of failure a [`StoreError`] is: it decides what a client is told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreErrorKind {
    /// The backend failed: an I/O error, a task that died, an operation that did not return.
    Failed,
    /// No room on the disk: refused before anything was written (the watermark), or the disk
    /// filled up under the write.
    NoSpace,
    /// Writes are refused without trying: the store failed recently and has not recovered yet,
    /// or it is not open.
    Unavailable,
}

#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct StoreError {
    pub kind: StoreErrorKind,
    pub message: String,
}

impl StoreError {
    pub fn failed(message: impl Into<String>) -> Self {
        Self {
            kind: StoreErrorKind::Failed,
            message: message.into(),
        }
    }

    pub fn no_space(message: impl Into<String>) -> Self {
        Self {
            kind: StoreErrorKind::NoSpace,
            message: message.into(),
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            kind: StoreErrorKind::Unavailable,
            message: message.into(),
        }
    }

    /// An I/O error from a backend: `NoSpace` for ENOSPC (and EDQUOT), else `Failed`.
    pub fn io(context: &str, e: &std::io::Error) -> Self {
        let full = e.kind() == std::io::ErrorKind::StorageFull
            || e.kind() == std::io::ErrorKind::QuotaExceeded;
        let message = format!("{context}: {e}");
        if full {
            Self::no_space(message)
        } else {
            Self::failed(message)
        }
    }
}

pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A document store. Implementations must be safe to share between tasks and must not assume
/// they are the only process writing the store.
pub trait Store: Send + Sync + 'static {
    /// Every chunk stored for `doc`, snapshots first. Empty when the document is unknown.
    fn load(&self, doc: &DocId) -> StoreFuture<'_, Vec<StoredChunk>>;

    /// The keys of every chunk stored for `doc`: what a node compares with the chunks it
    /// knows to find writes it missed. By default, a load.
    fn keys(&self, doc: &DocId) -> StoreFuture<'_, Vec<ChunkKey>> {
        let doc = doc.clone();
        Box::pin(async move { Ok(self.load(&doc).await?.into_iter().map(|c| c.key).collect()) })
    }

    /// Durably appends one incremental chunk and returns its key.
    fn append(&self, doc: &DocId, bytes: Vec<u8>) -> StoreFuture<'_, ChunkKey>;

    /// Durably writes `snapshot`, then deletes the keys in `replaces` (never the new key).
    fn compact(
        &self,
        doc: &DocId,
        snapshot: Vec<u8>,
        replaces: Vec<ChunkKey>,
    ) -> StoreFuture<'_, ChunkKey>;

    /// Durably deletes every chunk of `doc`.
    fn delete(&self, doc: &DocId) -> StoreFuture<'_, ()>;

    /// Ids of stored documents in id order (byte order of the id), the first `limit` after
    /// `after`. Every backend orders alike, so a listing's `next` works on any of them.
    fn list(&self, after: Option<&DocId>, limit: usize) -> StoreFuture<'_, Vec<DocId>>;

    /// Flushes everything written so far (used at shutdown).
    fn flush(&self) -> StoreFuture<'_, ()>;

    /// A small durable write that tells whether the store works again after a failure (what
    /// [`GuardedStore`] probes with while it is unhealthy). By default, a flush.
    fn probe(&self) -> StoreFuture<'_, ()> {
        self.flush()
    }

    /// Whether a write of about `bytes` would be attempted now; `Err` says why not. Cheap (no
    /// I/O on the store): owners ask before merging, so a refused write costs no merge. Plain
    /// backends always admit; [`GuardedStore`] checks its health and the disk watermark.
    fn admit(&self, bytes: u64) -> Result<(), StoreError> {
        let _ = bytes;
        Ok(())
    }

    /// What `/_/ready` reports about the store. Plain backends are always healthy.
    fn health(&self) -> StoreHealth {
        StoreHealth::default()
    }
}

#[cfg(test)]
pub(crate) mod contract {
    //! Behaviour every backend must show; each backend's tests call [`all`].
    use super::*;

    /// Every case on one store that starts empty. The listing case needs it empty, and the
    /// first case leaves it so.
    pub async fn all(store: &dyn Store) {
        append_load_compact_delete(store).await;
        lists_in_id_order(store).await;
    }

    pub async fn append_load_compact_delete(store: &dyn Store) {
        let doc = DocId::parse("doc-a").unwrap();
        let other = DocId::parse("doc-ab").unwrap();
        assert!(store.load(&doc).await.unwrap().is_empty());
        let k1 = store.append(&doc, b"one".to_vec()).await.unwrap();
        let k2 = store.append(&doc, b"two".to_vec()).await.unwrap();
        let again = store.append(&doc, b"one".to_vec()).await.unwrap();
        assert_eq!(k1, again, "same content, same key");
        store.append(&other, b"other".to_vec()).await.unwrap();
        let loaded = store.load(&doc).await.unwrap();
        assert_eq!(loaded.len(), 2, "prefix must not leak into doc-ab");

        // A chunk written by someone else after we loaded must survive our compaction.
        let foreign = store.append(&doc, b"three".to_vec()).await.unwrap();
        let snap = store
            .compact(&doc, b"snap".to_vec(), vec![k1.clone(), k2.clone()])
            .await
            .unwrap();
        assert_eq!(snap.kind, ChunkKind::Snapshot);
        let after: Vec<_> = store.load(&doc).await.unwrap();
        let keys: Vec<_> = after.iter().map(|c| c.key.clone()).collect();
        assert_eq!(keys[0], snap, "snapshots load first");
        assert!(keys.contains(&foreign));
        assert!(!keys.contains(&k1) && !keys.contains(&k2));

        let listed = store.list(None, 10).await.unwrap();
        assert_eq!(listed, vec![doc.clone(), other.clone()]);
        let page = store.list(Some(&doc), 10).await.unwrap();
        assert_eq!(page, vec![other.clone()]);

        store.delete(&doc).await.unwrap();
        assert!(store.load(&doc).await.unwrap().is_empty());
        assert_eq!(store.load(&other).await.unwrap().len(), 1);
        store.delete(&other).await.unwrap();
        store.flush().await.unwrap();
    }

    /// Listing pages in id order even where one id extends another with `-` or `.` (which
    /// sort before `/`, the byte that ends an id in sled's keys), whatever the page size.
    pub async fn lists_in_id_order(store: &dyn Store) {
        let names: Vec<&str> = "q p-000-new p-000 p p-000.x p-0001 p0 p-000-new-2 p.a p- p-000- o~"
            .split(' ')
            .collect();
        for &n in &names {
            store
                .append(&DocId::parse(n).unwrap(), n.as_bytes().to_vec())
                .await
                .unwrap();
        }
        let mut want = names.clone();
        want.sort();
        for limit in 1..=names.len() + 1 {
            let mut got: Vec<String> = Vec::new();
            let mut after: Option<DocId> = None;
            loop {
                let page = store.list(after.as_ref(), limit).await.unwrap();
                assert!(page.len() <= limit);
                got.extend(page.iter().map(|d| d.to_string()));
                if page.len() < limit {
                    break;
                }
                after = page.last().cloned();
                assert!(got.len() <= names.len(), "limit {limit}: {got:?}");
            }
            assert_eq!(got, want, "limit {limit}");
        }
        // A cursor that is no stored id still starts right after it.
        let from = store
            .list(Some(&DocId::parse("p-00").unwrap()), 3)
            .await
            .unwrap();
        let from: Vec<String> = from.iter().map(|d| d.to_string()).collect();
        assert_eq!(from, ["p-000", "p-000-", "p-000-new"]);
    }
}
