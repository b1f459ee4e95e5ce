//! The chunks a document owner knows of, with running totals: the stored size (against
//! `--max-doc-size`), the memory estimate (for the evictor) and the compaction decision all
//! read the totals instead of walking the list.
//!
//! Snapshots are estimated from what they decode to, not from their stored size: a compressed
//! save of a text document is 50–100 times smaller than the loaded document, but a snapshot
//! whose columns do not compress (random strings or bytes) is nearly its decoded size, and a
//! factor on stored bytes overestimated such a document 15-fold (1,413 MiB estimated, 92 MiB
//! real), so the evictor dropped every other document after each use.

use crate::storage::{ChunkKey, ChunkKind};

/// Fixed memory of one hot document's owner (document, task, queues, bookkeeping), in bytes.
/// Measured: 20,000 tiny documents all hot cost ~23 KiB each in RSS.
pub(super) const OWNER_BASE_BYTES: u64 = 24 * 1024;
/// In-memory bytes per byte of raw changes (incremental chunks). Measured on automerge 0.12:
/// a loaded document takes about twice the raw size of its changes.
pub(super) const RAW_FACTOR: u64 = 2;
/// In-memory bytes per byte a snapshot decodes to (`upload::decoded_size`: every compressed
/// column inflated). Measured with the release binary (`--memory-budget 8GiB`, sled, one
/// document stored, compacted to a snapshot, relay restarted, `GET` of the document, VmRSS
/// 12 s later so a `malloc_trim` ran): a map of 32,768 random printable 1 KiB strings (28.1 MB
/// stored, 34.7 MB decoded) grew the RSS by 103.2 MiB, of which 26.8 MiB is the cached full
/// save the `GET` keeps and ~2.4 MiB what any first `GET` costs (a 282-byte document grew it by
/// 2.4 MiB): ~2.2 bytes per decoded byte. 3 puts the estimate at 1.2× the RSS growth (the
/// former 100 × stored bytes estimated 2,703 MiB, 26×; measured with this factor: 126.2 MiB
/// for 103.1 MiB, 1.22×). Highly compressible documents whose memory is their history, not
/// their bytes, are covered by [`CHANGE_BYTES`].
pub(super) const SNAPSHOT_DECODED_FACTOR: u64 = 3;
/// In-memory bytes per change of a document loaded from the store, for documents whose memory
/// is their history rather than their bytes (automerge 0.12 keeps ops in compressed columns,
/// but every change in its change graph). Measured as above: 20,000 single-character text
/// insertions, committed one by one (20,041 changes with the document's other writes), loaded
/// from a 554-byte snapshot decoding to 20.9 KB, grew the RSS by 4.2–5.6 MiB over five runs,
/// ~2.5 MiB of it what any first `GET` costs; malloc's `uordblks + hblkhd` grew by 3.7 MB more
/// than for a 282-byte document: ~185 bytes per change. With 200 that document is estimated at
/// 3.9 MiB (0.73–0.79× its whole RSS growth; 86 KiB, 0.02×, without this term). Not per op:
/// the random-string document above is 33.6 million ops (JS strings are text objects, one op
/// per character; 160 bytes per op estimated it at 5,251 MiB) in 168 changes.
pub(super) const CHANGE_BYTES: u64 = 200;

/// Compact once this many incrementals pile up, whatever their size.
const MAX_INCREMENTALS: usize = 1024;
/// Below this many incrementals, never compact (a snapshot costs a full save).
const MIN_INCREMENTALS: usize = 32;

/// One chunk's sizes: `stored` is its length (what `--max-doc-size` and compaction count);
/// `decoded` is what it inflates to (what the memory estimate counts for snapshots; for
/// incrementals it is the stored length, they are estimated from that).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ChunkSize {
    pub(super) stored: usize,
    pub(super) decoded: u64,
}

impl ChunkSize {
    /// An incremental chunk of `len` bytes.
    pub(super) fn incremental(len: usize) -> Self {
        Self {
            stored: len,
            decoded: len as u64,
        }
    }

    /// Measures a chunk of `kind`: a snapshot's decoded size inflates every compressed column
    /// (into nothing, only counted), so call it on a blocking thread for large snapshots. A
    /// snapshot that does not parse that far counts its stored length.
    pub(super) fn measure(kind: ChunkKind, bytes: &[u8]) -> Self {
        match kind {
            ChunkKind::Incremental => Self::incremental(bytes.len()),
            ChunkKind::Snapshot => Self {
                stored: bytes.len(),
                decoded: crate::upload::decoded_size(bytes, u64::MAX).unwrap_or(bytes.len() as u64),
            },
        }
    }
}

/// Chunks this process loaded or wrote, with their sizes: the only ones compaction may delete.
#[derive(Debug, Default)]
pub(super) struct Chunks {
    list: Vec<(ChunkKey, ChunkSize)>,
    incremental_count: usize,
    incremental_bytes: u64,
    snapshot_bytes: u64,
    /// What the snapshots decode to.
    snapshot_decoded_bytes: u64,
    /// Changes of the document as it was loaded from the store (later ones are counted by the
    /// chunks that bring them, until the next load).
    loaded_changes: u64,
}

impl Chunks {
    pub(super) fn clear(&mut self) {
        *self = Self::default();
    }

    /// Records the change count of the document just loaded from these chunks.
    pub(super) fn set_loaded_changes(&mut self, changes: u64) {
        self.loaded_changes = changes;
    }

    pub(super) fn add(&mut self, key: ChunkKey, size: ChunkSize) {
        self.count(&key, size, true);
        self.list.push((key, size));
    }

    /// Records a compaction: `key` replaced exactly the chunks in `replaced`.
    pub(super) fn replace(&mut self, replaced: &[ChunkKey], key: ChunkKey, size: ChunkSize) {
        let mut kept = Vec::with_capacity(self.list.len());
        for (k, s) in std::mem::take(&mut self.list) {
            if replaced.contains(&k) {
                self.count(&k, s, false);
            } else {
                kept.push((k, s));
            }
        }
        self.list = kept;
        self.add(key, size);
    }

    fn count(&mut self, key: &ChunkKey, size: ChunkSize, add: bool) {
        let len = size.stored as u64;
        match (key.kind, add) {
            (ChunkKind::Incremental, true) => {
                self.incremental_count += 1;
                self.incremental_bytes += len;
            }
            (ChunkKind::Incremental, false) => {
                self.incremental_count = self.incremental_count.saturating_sub(1);
                self.incremental_bytes = self.incremental_bytes.saturating_sub(len);
            }
            (ChunkKind::Snapshot, true) => {
                self.snapshot_bytes += len;
                self.snapshot_decoded_bytes += size.decoded;
            }
            (ChunkKind::Snapshot, false) => {
                self.snapshot_bytes = self.snapshot_bytes.saturating_sub(len);
                self.snapshot_decoded_bytes =
                    self.snapshot_decoded_bytes.saturating_sub(size.decoded);
            }
        }
    }

    pub(super) fn contains(&self, key: &ChunkKey) -> bool {
        self.list.iter().any(|(k, _)| k == key)
    }

    /// Forgets the chunks that are no longer stored (another node compacted them away).
    pub(super) fn keep_only(&mut self, stored: &std::collections::HashSet<ChunkKey>) {
        for (k, s) in std::mem::take(&mut self.list) {
            if stored.contains(&k) {
                self.list.push((k, s));
            } else {
                self.count(&k, s, false);
            }
        }
    }

    /// Every known chunk's key (what a snapshot taken now replaces).
    pub(super) fn keys(&self) -> Vec<ChunkKey> {
        self.list.iter().map(|(k, _)| k.clone()).collect()
    }

    /// The document's stored size.
    pub(super) fn stored_bytes(&self) -> u64 {
        self.incremental_bytes + self.snapshot_bytes
    }

    /// Estimated memory of the hot document, given the bytes of its cached full save.
    pub(super) fn memory_estimate(&self, cached_save: usize) -> u64 {
        OWNER_BASE_BYTES
            + RAW_FACTOR * self.incremental_bytes
            + SNAPSHOT_DECODED_FACTOR * self.snapshot_decoded_bytes
            + CHANGE_BYTES * self.loaded_changes
            + cached_save as u64
    }

    /// Compact when the incrementals outgrow the snapshot.
    pub(super) fn wants_compaction(&self) -> bool {
        self.incremental_count >= MAX_INCREMENTALS
            || (self.incremental_count >= MIN_INCREMENTALS
                && self.incremental_bytes >= self.snapshot_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(kind: ChunkKind, n: u32) -> ChunkKey {
        ChunkKey::for_bytes(kind, &n.to_le_bytes())
    }

    fn snap(stored: usize, decoded: u64) -> ChunkSize {
        ChunkSize { stored, decoded }
    }

    #[test]
    fn totals_follow_adds_and_compactions() {
        let mut c = Chunks::default();
        c.add(key(ChunkKind::Snapshot, 0), snap(1000, 1000));
        for i in 1..=40 {
            c.add(key(ChunkKind::Incremental, i), ChunkSize::incremental(10));
        }
        assert_eq!(c.stored_bytes(), 1400);
        assert!(
            !c.wants_compaction(),
            "400 bytes of incrementals < 1000 of snapshot"
        );
        for i in 41..=100 {
            c.add(key(ChunkKind::Incremental, i), ChunkSize::incremental(10));
        }
        assert!(
            c.wants_compaction(),
            "1000 bytes of incrementals >= the snapshot"
        );
        assert_eq!(
            c.memory_estimate(5),
            OWNER_BASE_BYTES + RAW_FACTOR * 1000 + SNAPSHOT_DECODED_FACTOR * 1000 + 5
        );
        let replaced = c.keys();
        c.replace(&replaced, key(ChunkKind::Snapshot, 999), snap(700, 7000));
        assert_eq!(c.stored_bytes(), 700);
        assert!(!c.wants_compaction());
        assert_eq!(c.keys(), vec![key(ChunkKind::Snapshot, 999)]);
    }

    #[test]
    fn a_compaction_keeps_chunks_it_did_not_replace() {
        let mut c = Chunks::default();
        c.add(key(ChunkKind::Incremental, 1), ChunkSize::incremental(10));
        let replaced = c.keys();
        // Written while the snapshot was being stored: not part of it.
        c.add(key(ChunkKind::Incremental, 2), ChunkSize::incremental(20));
        c.replace(&replaced, key(ChunkKind::Snapshot, 3), snap(5, 50));
        assert_eq!(c.stored_bytes(), 25);
        assert_eq!(c.keys().len(), 2);
    }

    #[test]
    fn many_small_incrementals_trigger_compaction() {
        let mut c = Chunks::default();
        c.add(key(ChunkKind::Snapshot, 0), snap(1 << 30, 1 << 30));
        for i in 1..=1024 {
            c.add(key(ChunkKind::Incremental, i), ChunkSize::incremental(1));
        }
        assert!(c.wants_compaction());
    }

    #[test]
    fn snapshots_are_estimated_from_their_decoded_size_and_stored_by_their_length() {
        use automerge::transaction::Transactable;
        // A compressible document: its save is far smaller than what it decodes to.
        let mut doc = automerge::AutoCommit::new();
        doc.put(automerge::ROOT, "text", "a".repeat(200_000))
            .expect("put");
        let save = doc.save();
        let size = ChunkSize::measure(ChunkKind::Snapshot, &save);
        assert_eq!(size.stored, save.len());
        assert!(
            size.decoded > 100 * save.len() as u64,
            "decoded {} of a {}-byte save",
            size.decoded,
            save.len()
        );
        // Incrementals (and snapshots automerge cannot frame) count their length.
        assert_eq!(
            ChunkSize::measure(ChunkKind::Incremental, &save),
            ChunkSize::incremental(save.len())
        );
        assert_eq!(ChunkSize::measure(ChunkKind::Snapshot, b"junk").decoded, 4);

        let mut c = Chunks::default();
        c.add(key(ChunkKind::Snapshot, 1), size);
        c.add(key(ChunkKind::Incremental, 2), ChunkSize::incremental(100));
        assert_eq!(c.stored_bytes(), save.len() as u64 + 100);
        assert_eq!(
            c.memory_estimate(0),
            OWNER_BASE_BYTES + RAW_FACTOR * 100 + SNAPSHOT_DECODED_FACTOR * size.decoded
        );
        // A compaction takes the replaced snapshot's decoded bytes out with it.
        let replaced = c.keys();
        c.replace(&replaced, key(ChunkKind::Snapshot, 3), snap(10, 30));
        assert_eq!(c.stored_bytes(), 10);
        assert_eq!(
            c.memory_estimate(0),
            OWNER_BASE_BYTES + SNAPSHOT_DECODED_FACTOR * 30
        );
        // A document loaded with many changes counts them; a cleared one does not.
        c.set_loaded_changes(1000);
        assert_eq!(
            c.memory_estimate(0),
            OWNER_BASE_BYTES + SNAPSHOT_DECODED_FACTOR * 30 + CHANGE_BYTES * 1000
        );
        c.clear();
        assert_eq!(c.memory_estimate(0), OWNER_BASE_BYTES);
    }
}
