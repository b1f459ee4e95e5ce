//! Export's pure half: a stored document → the one snapshot file automerge-repo would write
//! for it (a full save named by its heads), and whether a file already in the directory holds
//! anything that snapshot does not (only files it wholly contains are replaced, as
//! automerge-repo's own compaction does).

use automerge::{ChangeHash, ReadDoc};
use bytes::Bytes;

use super::layout::heads_hash;
use super::stored::Stored;
use crate::error::RelayError;
use crate::storage::StoredChunk;
use crate::upload::parse_upload;

pub struct Snapshot {
    stored: Stored,
    pub heads: Vec<ChangeHash>,
    /// `save()`: every applied change, and the ones that wait (`retain_orphans`).
    pub bytes: Vec<u8>,
    /// Applied changes.
    pub changes: u64,
    /// Changes that wait for missing dependencies.
    pub waiting: u64,
}

/// What a file already in a document's directory holds, compared with the snapshot.
#[derive(Debug, PartialEq, Eq)]
pub enum Covered {
    /// Nothing the snapshot lacks: it can go.
    Yes,
    /// This many changes the snapshot does not have: it stays.
    No(usize),
    /// Not Automerge data (why): it stays; it is not ours to remove.
    Unreadable(String),
}

impl Snapshot {
    /// The snapshot of the stored chunks. `None` when they hold no applied change (the relay
    /// does not serve such a document either); `Err` when they do not load.
    pub fn of(chunks: &[StoredChunk]) -> Result<Option<Self>, String> {
        let stored = Stored::load(chunks)?;
        let heads = stored.doc.get_heads();
        if heads.is_empty() {
            return Ok(None);
        }
        Ok(Some(Self {
            bytes: stored.doc.save(),
            changes: stored.doc.stats().num_changes,
            waiting: stored.waiting.len() as u64,
            heads,
            stored,
        }))
    }

    /// The file name automerge-repo gives this snapshot.
    pub fn name(&self) -> String {
        heads_hash(&self.heads)
    }

    /// Whether the snapshot holds every change in `bytes`.
    pub fn covers(&self, bytes: Vec<u8>) -> Covered {
        let upload = match parse_upload(Bytes::from(bytes)) {
            Ok(upload) => upload,
            Err(RelayError::NoChanges) => return Covered::Yes,
            Err(RelayError::InvalidBody(why)) => return Covered::Unreadable(why),
            Err(e) => return Covered::Unreadable(e.to_string()),
        };
        let missing = upload
            .doc_hashes
            .iter()
            .copied()
            .chain(upload.changes.iter().map(|c| c.hash()))
            .filter(|h| !self.stored.has(h))
            .count();
        if missing == 0 {
            Covered::Yes
        } else {
            Covered::No(missing)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{ChunkKey, ChunkKind};
    use automerge::transaction::Transactable;
    use automerge::{AutoCommit, ROOT};

    fn chunk(bytes: Vec<u8>) -> StoredChunk {
        StoredChunk {
            key: ChunkKey::for_bytes(ChunkKind::Incremental, &bytes),
            bytes,
        }
    }

    #[test]
    fn the_snapshot_is_a_full_save_named_by_its_heads() {
        let mut doc = AutoCommit::new();
        doc.put(ROOT, "a", 1).unwrap();
        doc.commit();
        let heads = doc.get_heads();
        let first = doc.save();
        doc.put(ROOT, "b", 2).unwrap();
        doc.commit();
        let rest = doc.save_after(&heads);
        let snap = Snapshot::of(&[chunk(first.clone()), chunk(rest.clone())])
            .unwrap()
            .unwrap();
        assert_eq!(snap.heads, doc.get_heads());
        assert_eq!(snap.name(), heads_hash(&doc.get_heads()));
        assert_eq!(snap.changes, 2);
        let loaded = automerge::Automerge::load(&snap.bytes).unwrap();
        assert_eq!(loaded.get_heads(), doc.get_heads());

        assert_eq!(snap.covers(first), Covered::Yes);
        assert_eq!(snap.covers(rest), Covered::Yes);
        assert_eq!(snap.covers(snap.bytes.clone()), Covered::Yes);
        doc.put(ROOT, "c", 3).unwrap();
        doc.commit();
        assert_eq!(snap.covers(doc.save()), Covered::No(1));
        assert!(matches!(
            snap.covers(b"junk".to_vec()),
            Covered::Unreadable(_)
        ));
    }

    #[test]
    fn a_document_without_applied_changes_has_no_snapshot() {
        assert!(Snapshot::of(&[]).unwrap().is_none());
    }
}
