//! The chunks a document owner knows of, with running totals: the stored size (against
//! `--max-doc-size`), the memory estimate (for the evictor) and the compaction decision all
//! read the totals instead of walking the list.

use crate::storage::{ChunkKey, ChunkKind};

/// Fixed memory of one hot document's owner (document, task, queues, bookkeeping), in bytes.
/// Measured: 20,000 tiny documents all hot cost ~23 KiB each in RSS.
pub(super) const OWNER_BASE_BYTES: u64 = 24 * 1024;
/// In-memory bytes per byte of raw changes (incremental chunks). Measured on automerge 0.12:
/// a loaded document takes about twice the raw size of its changes.
pub(super) const RAW_FACTOR: u64 = 2;
/// In-memory bytes per byte of compressed save (snapshot chunks): 50–100 times, measured.
pub(super) const SNAPSHOT_FACTOR: u64 = 100;

/// Compact once this many incrementals pile up, whatever their size.
const MAX_INCREMENTALS: usize = 1024;
/// Below this many incrementals, never compact (a snapshot costs a full save).
const MIN_INCREMENTALS: usize = 32;

/// Chunks this process loaded or wrote, with their sizes: the only ones compaction may delete.
#[derive(Debug, Default)]
pub(super) struct Chunks {
    list: Vec<(ChunkKey, usize)>,
    incremental_count: usize,
    incremental_bytes: u64,
    snapshot_bytes: u64,
}

impl Chunks {
    pub(super) fn clear(&mut self) {
        *self = Self::default();
    }

    pub(super) fn add(&mut self, key: ChunkKey, len: usize) {
        self.count(&key, len, true);
        self.list.push((key, len));
    }

    /// Records a compaction: `key` replaced exactly the chunks in `replaced`.
    pub(super) fn replace(&mut self, replaced: &[ChunkKey], key: ChunkKey, len: usize) {
        let mut kept = Vec::with_capacity(self.list.len());
        for (k, l) in std::mem::take(&mut self.list) {
            if replaced.contains(&k) {
                self.count(&k, l, false);
            } else {
                kept.push((k, l));
            }
        }
        self.list = kept;
        self.add(key, len);
    }

    fn count(&mut self, key: &ChunkKey, len: usize, add: bool) {
        let len = len as u64;
        match (key.kind, add) {
            (ChunkKind::Incremental, true) => {
                self.incremental_count += 1;
                self.incremental_bytes += len;
            }
            (ChunkKind::Incremental, false) => {
                self.incremental_count = self.incremental_count.saturating_sub(1);
                self.incremental_bytes = self.incremental_bytes.saturating_sub(len);
            }
            (ChunkKind::Snapshot, true) => self.snapshot_bytes += len,
            (ChunkKind::Snapshot, false) => {
                self.snapshot_bytes = self.snapshot_bytes.saturating_sub(len)
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
            + SNAPSHOT_FACTOR * self.snapshot_bytes
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

    #[test]
    fn totals_follow_adds_and_compactions() {
        let mut c = Chunks::default();
        c.add(key(ChunkKind::Snapshot, 0), 1000);
        for i in 1..=40 {
            c.add(key(ChunkKind::Incremental, i), 10);
        }
        assert_eq!(c.stored_bytes(), 1400);
        assert!(
            !c.wants_compaction(),
            "400 bytes of incrementals < 1000 of snapshot"
        );
        for i in 41..=100 {
            c.add(key(ChunkKind::Incremental, i), 10);
        }
        assert!(
            c.wants_compaction(),
            "1000 bytes of incrementals >= the snapshot"
        );
        assert_eq!(
            c.memory_estimate(5),
            OWNER_BASE_BYTES + RAW_FACTOR * 1000 + SNAPSHOT_FACTOR * 1000 + 5
        );
        let replaced = c.keys();
        c.replace(&replaced, key(ChunkKind::Snapshot, 999), 700);
        assert_eq!(c.stored_bytes(), 700);
        assert!(!c.wants_compaction());
        assert_eq!(c.keys(), vec![key(ChunkKind::Snapshot, 999)]);
    }

    #[test]
    fn a_compaction_keeps_chunks_it_did_not_replace() {
        let mut c = Chunks::default();
        c.add(key(ChunkKind::Incremental, 1), 10);
        let replaced = c.keys();
        // Written while the snapshot was being stored: not part of it.
        c.add(key(ChunkKind::Incremental, 2), 20);
        c.replace(&replaced, key(ChunkKind::Snapshot, 3), 5);
        assert_eq!(c.stored_bytes(), 25);
        assert_eq!(c.keys().len(), 2);
    }

    #[test]
    fn many_small_incrementals_trigger_compaction() {
        let mut c = Chunks::default();
        c.add(key(ChunkKind::Snapshot, 0), 1 << 30);
        for i in 1..=1024 {
            c.add(key(ChunkKind::Incremental, i), 1);
        }
        assert!(c.wants_compaction());
    }
}
