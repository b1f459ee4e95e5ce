//! Reading the document from the store and making it the owner's current and durable state.

use std::collections::HashSet;

use automerge::{Automerge, ChangeHash, ReadDoc};

use super::Owner;
use crate::doc::chunks::ChunkSize;
use crate::doc::durable::Durable;
use crate::error::RelayError;
use crate::storage::StoredChunk;

/// A document read from the store, with its chunks' sizes (in the same order).
pub(super) struct Loaded {
    pub(super) doc: Automerge,
    pub(super) chunks: Vec<StoredChunk>,
    pub(super) sizes: Vec<ChunkSize>,
}

impl Owner {
    pub(super) async fn load(&mut self) {
        match self.read_store().await {
            Ok(loaded) => self.install(loaded),
            Err(e) => {
                tracing::error!(doc = %self.id, error = %e, "cannot load document");
                self.load_error = Some(e);
            }
        }
    }

    /// Reads the document from the store, touching nothing of the owner's state.
    pub(super) async fn read_store(&self) -> Result<Loaded, RelayError> {
        let chunks = self
            .shared
            .store
            .load(&self.id)
            .await
            // A read the store cannot answer is unavailable, whatever the cause (507 is for
            // writes).
            .map_err(|e| RelayError::StorageUnavailable(e.message))?;
        let all: Vec<u8> = chunks
            .iter()
            .flat_map(|c| c.bytes.iter().copied())
            .collect();
        let loaded = tokio::task::spawn_blocking(move || {
            let mut doc = Automerge::new();
            // Measured here, off the async workers: a snapshot's decoded size inflates its
            // columns (the memory estimate counts it, `chunks.rs`).
            let sizes: Vec<ChunkSize> = chunks
                .iter()
                .map(|c| ChunkSize::measure(c.key.kind, &c.bytes))
                .collect();
            doc.load_incremental(&all).map(|_| (doc, chunks, sizes))
        })
        .await;
        match loaded {
            Ok(Ok((doc, chunks, sizes))) => Ok(Loaded { doc, chunks, sizes }),
            Ok(Err(e)) => Err(RelayError::Storage(format!(
                "stored document is unreadable: {e}"
            ))),
            Err(e) => Err(RelayError::Internal(format!("load task failed: {e}"))),
        }
    }

    /// Makes a document read from the store the current and durable state.
    pub(super) fn install(&mut self, loaded: Loaded) {
        self.costs.reset();
        self.chunks.clear();
        for (c, size) in loaded.chunks.iter().zip(&loaded.sizes) {
            self.chunks.add(c.key.clone(), *size);
        }
        self.chunks
            .set_loaded_changes(loaded.doc.stats().num_changes);
        // Only applied changes make a document (stored changes may all still be waiting).
        self.state.exists = !loaded.doc.get_heads().is_empty();
        // Stored changes still waiting for dependencies count against --max-pending-changes
        // after a reload too (only looked for when automerge says some wait).
        self.state.stored_pending = if loaded.doc.get_missing_deps(&[]).is_empty() {
            HashSet::new()
        } else {
            waiting_changes(&loaded.doc, &loaded.chunks)
        };
        self.state.doc = loaded.doc;
        self.state.cached_save = None;
        self.durable = Durable {
            heads: self.state.doc.get_heads(),
            exists: self.state.exists,
        };
        self.load_error = None;
        self.stale = false;
        self.publish(true);
        if self.state.exists {
            self.shared.stats.loaded();
        }
    }
}

/// Hashes of the stored changes `doc` has not applied (they wait for dependencies).
fn waiting_changes(doc: &Automerge, chunks: &[StoredChunk]) -> HashSet<ChangeHash> {
    let mut waiting = HashSet::new();
    for stored in chunks {
        let Ok(parts) = crate::upload::split_chunks(&stored.bytes) else {
            continue;
        };
        for (_, part) in parts {
            if let Ok(change) = automerge::Change::try_from(part) {
                let hash = change.hash();
                if doc.get_change_meta_by_hash(&hash).is_none() {
                    waiting.insert(hash);
                }
            }
        }
    }
    waiting
}
