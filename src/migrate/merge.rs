//! Import's pure half: what the store holds of a document + the directory's chunk files → the
//! one chunk to store (or none). Every file is validated strictly first (`upload`, as an
//! upload would be), so a corrupt file is rejected on its own and nothing unchecked reaches
//! the store. What is stored is only what the store lacks, so importing the same directory
//! again stores nothing.

use std::collections::HashSet;

use automerge::{Change, ChangeHash, ReadDoc};
use bytes::Bytes;

use super::stored::Stored;
use crate::error::RelayError;
use crate::storage::StoredChunk;
use crate::upload::parse_upload;

/// What one file added.
#[derive(Debug, PartialEq, Eq)]
pub enum Added {
    /// Valid Automerge data with this many changes (some perhaps known already).
    Changes(usize),
    /// Valid Automerge data without changes (the save of an empty document).
    Empty,
    /// Not valid Automerge data: why.
    Rejected(String),
}

/// The chunk to store.
#[derive(Debug)]
pub enum Write {
    /// The store had nothing of the document: the whole merged document, saved (with the
    /// changes that wait), written as a snapshot.
    Snapshot(Vec<u8>),
    /// The store had some: the new changes, as change chunks, appended as one incremental.
    Incremental(Vec<u8>),
}

impl Write {
    pub fn len(&self) -> usize {
        match self {
            Write::Snapshot(b) | Write::Incremental(b) => b.len(),
        }
    }
}

/// The outcome for one document.
#[derive(Debug)]
pub struct Merged {
    pub write: Option<Write>,
    /// Changes new to the store (applied or waiting).
    pub new_changes: u64,
    /// Of them, those that wait for missing dependencies.
    pub waiting: u64,
    /// Applied changes of the merged document.
    pub changes: u64,
    /// Whether the store had any chunk of the document before.
    pub stored_before: bool,
}

pub struct Merge {
    stored: Stored,
    before: Vec<ChangeHash>,
    /// Files added so far (what [`Merge::add`] numbers them by).
    files: usize,
    /// Per file (by number), the changes that came as change chunks (or bundles): applied
    /// together in `finish`, and those still not applied then wait.
    candidates: Vec<(usize, Vec<Change>, bool)>,
}

impl Merge {
    /// Starts from what the store holds. `Err`: the stored chunks do not load.
    pub fn new(chunks: &[StoredChunk]) -> Result<Self, String> {
        let stored = Stored::load(chunks)?;
        let before = stored.doc.get_heads();
        Ok(Self {
            stored,
            before,
            files: 0,
            candidates: Vec::new(),
        })
    }

    /// Validates one file's bytes strictly and, when valid, merges them (a snapshot now;
    /// change chunks in `finish`, all in one `apply_changes`: applied one file at a time into
    /// a large document, they cost a copy of its columns each).
    pub fn add(&mut self, bytes: Vec<u8>) -> Added {
        let index = self.files;
        self.files += 1;
        let upload = match parse_upload(Bytes::from(bytes)) {
            Ok(upload) => upload,
            Err(RelayError::NoChanges) => return Added::Empty,
            Err(RelayError::EmptyBody) => return Added::Rejected("empty file".into()),
            Err(RelayError::InvalidBody(why)) => {
                return Added::Rejected(format!("not valid Automerge data: {why}"))
            }
            Err(e) => return Added::Rejected(e.to_string()),
        };
        let loaded = upload.has_doc_chunks;
        if loaded {
            if let Err(e) = self.stored.doc.load_incremental(&upload.bytes) {
                return Added::Rejected(format!("does not merge: {e}"));
            }
        }
        let count = upload.change_count();
        self.candidates.push((index, upload.changes, loaded));
        Added::Changes(count)
    }

    /// What to store: the changes that are new, applied ones first in causal order; and the
    /// files (numbered as added) whose changes do not merge after all, with why.
    pub fn finish(self) -> (Merged, Vec<(usize, String)>) {
        let Merge {
            mut stored,
            before,
            files: _,
            mut candidates,
        } = self;
        let mut late = Vec::new();
        let batch = candidates
            .iter()
            .filter(|(_, _, loaded)| !loaded)
            .flat_map(|(_, changes, _)| changes.iter().cloned());
        if stored.doc.apply_changes(batch.collect::<Vec<_>>()).is_err() {
            // Well-formed but contradicting what is there (a change number reused): find the
            // files at fault, one at a time, and leave them out.
            candidates.retain(|(index, changes, loaded)| {
                if *loaded {
                    return true;
                }
                match stored.doc.apply_changes(changes.iter().cloned()) {
                    Ok(()) => true,
                    Err(e) => {
                        late.push((*index, format!("does not merge: {e}")));
                        false
                    }
                }
            });
        }
        let candidates: Vec<&Change> = candidates.iter().flat_map(|(_, c, _)| c).collect();
        let doc = &stored.doc;
        // Not reachable from the stored heads: new, or stored ones that waited until now.
        let applied: Vec<Change> = doc
            .get_changes(&before)
            .into_iter()
            .filter(|c| !stored.waiting.contains(&c.hash()))
            .collect();
        let mut seen = HashSet::new();
        let waiting: Vec<&Change> = candidates
            .into_iter()
            .filter(|c| {
                let h = c.hash();
                doc.get_change_meta_by_hash(&h).is_none()
                    && !stored.waiting.contains(&h)
                    && seen.insert(h)
            })
            .collect();
        let write = if applied.is_empty() && waiting.is_empty() {
            None
        } else if stored.empty && !applied.is_empty() {
            // `save` keeps the changes that wait (automerge's `retain_orphans`).
            Some(Write::Snapshot(doc.save()))
        } else {
            let mut bytes = Vec::new();
            for c in &applied {
                bytes.extend_from_slice(c.raw_bytes());
            }
            for c in &waiting {
                bytes.extend_from_slice(c.raw_bytes());
            }
            Some(Write::Incremental(bytes))
        };
        let merged = Merged {
            write,
            new_changes: (applied.len() + waiting.len()) as u64,
            waiting: waiting.len() as u64,
            changes: doc.stats().num_changes,
            stored_before: !stored.empty,
        };
        (merged, late)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{ChunkKey, ChunkKind};
    use automerge::transaction::Transactable;
    use automerge::{AutoCommit, ROOT};

    fn doc_with(n: usize) -> AutoCommit {
        let mut doc = AutoCommit::new();
        for i in 0..n {
            doc.put(ROOT, format!("k{i}"), i as i64).unwrap();
            doc.commit();
        }
        doc
    }

    fn stored(kind: ChunkKind, bytes: Vec<u8>) -> StoredChunk {
        StoredChunk {
            key: ChunkKey::for_bytes(kind, &bytes),
            bytes,
        }
    }

    /// The heads of the store after `merged` was written to it.
    fn heads_after(chunks: &[StoredChunk], merged: &Merged) -> Vec<ChangeHash> {
        let mut doc = automerge::Automerge::new();
        for c in chunks {
            doc.load_incremental(&c.bytes).unwrap();
        }
        match &merged.write {
            Some(Write::Snapshot(b) | Write::Incremental(b)) => {
                doc.load_incremental(b).unwrap();
            }
            None => {}
        }
        doc.get_heads()
    }

    /// Merges `files` into `chunks` and returns the outcome and what each file added.
    fn merge(chunks: &[StoredChunk], files: Vec<Vec<u8>>) -> (Merged, Vec<Added>) {
        let mut m = Merge::new(chunks).unwrap();
        let added = files.into_iter().map(|f| m.add(f)).collect();
        let (merged, late) = m.finish();
        assert!(late.is_empty(), "{late:?}");
        (merged, added)
    }

    #[test]
    fn into_an_empty_store_the_whole_document_is_one_snapshot() {
        let mut doc = doc_with(3);
        let heads = doc.get_heads();
        let snapshot = doc.save();
        doc.put(ROOT, "more", 1).unwrap();
        doc.commit();
        let incremental = doc.save_after(&heads);
        let (merged, added) = merge(&[], vec![snapshot, incremental]);
        assert_eq!(added, vec![Added::Changes(3), Added::Changes(1)]);
        assert_eq!(merged.new_changes, 4);
        assert_eq!(heads_after(&[], &merged), doc.get_heads());
        assert!(!merged.stored_before);
        let Some(Write::Snapshot(bytes)) = merged.write else {
            panic!("expected a snapshot");
        };
        let loaded = automerge::Automerge::load(&bytes).unwrap();
        assert_eq!(loaded.get_heads(), doc.get_heads());
    }

    #[test]
    fn only_what_the_store_lacks_is_appended_and_a_second_import_stores_nothing() {
        let mut doc = doc_with(2);
        let first = stored(ChunkKind::Snapshot, doc.save());
        doc.put(ROOT, "new", 1).unwrap();
        doc.commit();
        let (merged, _) = merge(std::slice::from_ref(&first), vec![doc.save()]);
        assert_eq!(merged.new_changes, 1);
        let Some(Write::Incremental(bytes)) = merged.write else {
            panic!("expected an incremental");
        };
        let mut again = automerge::Automerge::load(&first.bytes).unwrap();
        again.load_incremental(&bytes).unwrap();
        assert_eq!(again.get_heads(), doc.get_heads());

        let both = [first, stored(ChunkKind::Incremental, bytes)];
        let (merged, added) = merge(&both, vec![doc.save()]);
        assert_eq!(added, vec![Added::Changes(3)]);
        assert!(merged.write.is_none(), "nothing new");
        assert_eq!(merged.new_changes, 0);
    }

    #[test]
    fn corrupt_files_are_rejected_alone_and_empty_saves_are_not_corrupt() {
        let mut doc = doc_with(2);
        let mut truncated = doc.save();
        truncated.truncate(truncated.len() - 3);
        let files = vec![
            b"random bytes, not automerge".to_vec(),
            truncated,
            Vec::new(),
            AutoCommit::new().save(),
            doc.save(),
        ];
        let (merged, added) = merge(&[], files);
        assert!(matches!(&added[0], Added::Rejected(why) if why.contains("not valid Automerge")));
        assert!(matches!(&added[1], Added::Rejected(_)));
        assert_eq!(added[2], Added::Rejected("empty file".into()));
        assert_eq!(added[3], Added::Empty);
        assert_eq!(added[4], Added::Changes(2));
        assert_eq!(heads_after(&[], &merged), doc.get_heads());
    }

    #[test]
    fn changes_that_wait_are_stored_once_and_counted() {
        let mut doc = doc_with(3);
        let all = automerge::Automerge::load(&doc.save()).unwrap();
        let changes = all.get_changes(&[]);
        let (a, b, c) = (&changes[0], &changes[1], &changes[2]);
        let mut only_a = automerge::Automerge::new();
        only_a.apply_changes([a.clone()]).unwrap();
        let base = stored(ChunkKind::Snapshot, only_a.save());

        // Without b, c waits: stored, counted as waiting.
        let (merged, _) = merge(std::slice::from_ref(&base), vec![c.raw_bytes().to_vec()]);
        assert_eq!((merged.new_changes, merged.waiting), (1, 1));
        assert_eq!(
            heads_after(std::slice::from_ref(&base), &merged),
            vec![a.hash()]
        );
        let Some(Write::Incremental(waiting)) = merged.write else {
            panic!("expected an incremental");
        };
        assert_eq!(waiting, c.raw_bytes());

        // Stored, it is not new a second time.
        let both = [base, stored(ChunkKind::Incremental, waiting)];
        let (merged, _) = merge(&both, vec![c.raw_bytes().to_vec()]);
        assert!(merged.write.is_none());
        assert_eq!(merged.new_changes, 0);

        // b arrives: only b is new, and c is applied at last.
        let (merged, _) = merge(&both, vec![b.raw_bytes().to_vec()]);
        assert_eq!((merged.new_changes, merged.waiting), (1, 0));
        assert_eq!(heads_after(&both, &merged), doc.get_heads());
        let Some(Write::Incremental(bytes)) = merged.write else {
            panic!("expected an incremental");
        };
        assert_eq!(bytes, b.raw_bytes());
    }

    #[test]
    fn a_file_that_contradicts_another_is_left_out_and_named() {
        let actor = automerge::ActorId::from(b"one actor".to_vec());
        let mut one = AutoCommit::new().with_actor(actor.clone());
        one.put(ROOT, "a", 1).unwrap();
        one.commit();
        // The same actor's first change again, with other content.
        let mut two = AutoCommit::new().with_actor(actor);
        two.put(ROOT, "a", 2).unwrap();
        two.commit();
        let mut m = Merge::new(&[]).unwrap();
        assert_eq!(m.add(one.save_after(&[])), Added::Changes(1));
        assert_eq!(m.add(two.save_after(&[])), Added::Changes(1));
        let (merged, late) = m.finish();
        assert_eq!(late.len(), 1, "{late:?}");
        assert_eq!(late[0].0, 1, "the second file");
        assert_eq!(merged.new_changes, 1);
        assert_eq!(heads_after(&[], &merged), one.get_heads());
    }
}
