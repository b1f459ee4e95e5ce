//! What the store holds of one document, as Automerge: the document, and the changes of its
//! chunks that still wait for dependencies (automerge queues those without saying which they
//! are, and both directions must neither lose them nor count them as new).

use std::collections::HashSet;

use automerge::{Automerge, Change, ChangeHash, ReadDoc};

use crate::storage::StoredChunk;

pub struct Stored {
    pub doc: Automerge,
    /// Changes in the stored chunks that are not applied (missing dependencies).
    pub waiting: HashSet<ChangeHash>,
    /// Whether the store held no chunk of the document.
    pub empty: bool,
}

impl Stored {
    /// Loads the chunks as the relay does (trusted: they were validated when stored). `Err`
    /// says why they do not load.
    pub fn load(chunks: &[StoredChunk]) -> Result<Self, String> {
        let mut doc = Automerge::new();
        for chunk in chunks {
            doc.load_incremental(&chunk.bytes)
                .map_err(|e| format!("the stored document does not load: {e}"))?;
        }
        // Only looked for when automerge says some wait.
        let waiting = if doc.get_missing_deps(&[]).is_empty() {
            HashSet::new()
        } else {
            chunks
                .iter()
                .flat_map(|c| change_chunks(&c.bytes))
                .map(|c| c.hash())
                .filter(|h| doc.get_change_meta_by_hash(h).is_none())
                .collect()
        };
        Ok(Self {
            doc,
            waiting,
            empty: chunks.is_empty(),
        })
    }

    /// Whether the change is here, applied or waiting.
    pub fn has(&self, hash: &ChangeHash) -> bool {
        self.waiting.contains(hash) || self.doc.get_change_meta_by_hash(hash).is_some()
    }
}

/// The change chunks in `bytes` (where waiting changes are: the relay and automerge store them
/// as change chunks after any document chunk).
fn change_chunks(bytes: &[u8]) -> Vec<Change> {
    let Ok(parts) = crate::upload::split_chunks(bytes) else {
        return Vec::new();
    };
    parts
        .into_iter()
        .filter_map(|(_, part)| Change::try_from(part).ok())
        .collect()
}
