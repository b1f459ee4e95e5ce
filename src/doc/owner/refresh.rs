//! The owner's catch-up with what other nodes sharing the store wrote (`doc/cluster.rs`):
//! a missed fan-out message, a reconnect, the periodic heads check, a delete elsewhere.

use std::collections::HashSet;

use automerge::ReadDoc;

use super::Owner;
use crate::doc::api::{Precondition, Source, WriteJob};
use crate::doc::chunks::ChunkSize;
use crate::doc::merge::Work;
use crate::doc::turn::Replies;
use crate::storage::ChunkKey;

impl Owner {
    /// Takes in what other nodes stored and this node has not seen (a message it missed,
    /// a reconnect, the periodic check; `cluster.rs`). The chunk keys known here are compared
    /// with the store's; only when the store has others is the document read back. When
    /// the store no longer holds the history served here, the document was deleted
    /// elsewhere (and maybe created anew): its subscribers are told, as for a delete here,
    /// and it is served from the store from now on.
    pub(super) async fn refresh(&mut self, deleted: bool) {
        if self.load_error.is_some() {
            return; // the next command loads it anyway
        }
        let stored: HashSet<ChunkKey> = match self.shared.store.keys(&self.id).await {
            Ok(keys) => keys.into_iter().collect(),
            Err(e) => {
                tracing::warn!(doc = %self.id, error = %e, "cannot compare the document with the store");
                return;
            }
        };
        let known: HashSet<ChunkKey> = self.chunks.keys().into_iter().collect();
        // Any difference is read back: chunks only the store has are other nodes' writes (or
        // a snapshot of theirs); chunks gone with nothing new in their place mean a delete
        // elsewhere, even when this node stored something since.
        if !deleted && stored == known && !(stored.is_empty() && self.state.exists) {
            return;
        }
        let loaded = match self.read_store().await {
            Ok(loaded) => loaded,
            Err(e) => {
                tracing::warn!(doc = %self.id, error = %e, "cannot read the document back from the store");
                return;
            }
        };
        let ours = self.state.doc.get_heads();
        let kept = ours
            .iter()
            .all(|h| loaded.doc.get_change_meta_by_hash(h).is_some());
        if !kept {
            metrics::counter!("relay_fanout_catchups_total", "found" => "deleted").increment(1);
            tracing::info!(doc = %self.id, "deleted on another node");
            let existed = self.state.exists;
            self.forget(existed);
            self.install(loaded);
            return;
        }
        metrics::counter!("relay_fanout_catchups_total", "found" => "changes").increment(1);
        let delta = loaded.doc.save_after(&ours);
        let sizes: Vec<(ChunkKey, ChunkSize)> = loaded
            .chunks
            .iter()
            .zip(&loaded.sizes)
            .filter(|(c, _)| !known.contains(&c.key))
            .map(|(c, size)| (c.key.clone(), *size))
            .collect();
        // Changes still waiting for dependencies in the store wait here too. The delta holds
        // every applied one, so the new chunks are sent along only when some wait (else a
        // snapshot another node wrote would be parsed a second time for nothing).
        let some_wait = !loaded.doc.get_missing_deps(&[]).is_empty();
        let waiting: Vec<u8> = loaded
            .chunks
            .iter()
            .filter(|c| some_wait && !known.contains(&c.key))
            .flat_map(|c| c.bytes.iter().copied())
            .collect();
        if delta.is_empty() && waiting.is_empty() {
            // The store holds nothing this node lacks (another node's snapshot of changes
            // held here, say): only the chunk keys are new. Parsing nothing would fail and
            // reload the document for nothing.
            self.recount(&stored, sizes);
            return;
        }
        let parsed = tokio::task::spawn_blocking(move || {
            let mut bytes = delta;
            bytes.extend_from_slice(&waiting);
            crate::upload::parse_upload(bytes.into())
        })
        .await;
        let upload = match parsed {
            Ok(Ok(upload)) => upload,
            Ok(Err(e)) => {
                tracing::warn!(doc = %self.id, error = %e, "what other nodes stored does not parse; reloading");
                self.reload().await;
                return;
            }
            Err(e) => {
                tracing::warn!(doc = %self.id, error = %e, "parse task failed");
                return;
            }
        };
        let work = Work {
            jobs: vec![WriteJob {
                upload,
                precondition: Precondition::None,
                origin: None,
                source: Source::Store,
            }],
            ..Work::default()
        };
        let replies = Replies {
            writes: vec![None],
            ..Replies::default()
        };
        self.run_turn(work, replies).await;
        self.drain().await;
        if self.stale || self.load_error.is_some() {
            return; // went back (or reloaded): the chunks were recounted
        }
        self.recount(&stored, sizes);
    }

    /// The chunks known here become the store's: `stored`, the new ones with their sizes.
    fn recount(&mut self, stored: &HashSet<ChunkKey>, sizes: Vec<(ChunkKey, ChunkSize)>) {
        self.chunks.keep_only(stored);
        for (key, size) in sizes {
            if !self.chunks.contains(&key) {
                self.chunks.add(key, size);
            }
        }
    }
}
