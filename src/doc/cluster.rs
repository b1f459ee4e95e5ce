//! Other relay nodes sharing this node's store: what an owner tells them, and the promise
//! the owner keeps about what they tell it.
//!
//! The store is the source of truth; telling the other nodes is an accelerator. An owner
//! publishes every batch it made durable (the chunk's bytes, which the others apply without
//! storing them again) and every delete; it watches its document's channel before it loads
//! (so nothing persisted after its load can pass unseen) and stops watching when it retires.
//! What a node misses (a message dropped, a disconnect) it finds by comparing the chunk keys
//! it knows with the store's (`Command::Refresh`): a missed message delays a change, never
//! loses it. The implementation (Redis) lives outside the document layer, in `cluster/`.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;

use crate::id::DocId;
use crate::storage::ChunkKey;

pub type Watching<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// The other nodes, as a document owner sees them. Calls never block on the network: what
/// cannot be sent now is dropped and counted (the other nodes repair it from the store).
pub trait Cluster: Send + Sync {
    /// The chunk stored under `key` holds `bytes`: changes of `id` that are now durable.
    fn published(&self, id: &DocId, key: &ChunkKey, bytes: Bytes);
    /// `id` was deleted from the store.
    fn deleted(&self, id: &DocId);
    /// Resolves once messages about `id` reach this node (or once that was given up on).
    fn watch(&self, id: &DocId) -> Watching<'_>;
    /// This node no longer holds `id`.
    fn unwatch(&self, id: &DocId);
}
