//! The owner's way back after a failed write (the module docs of `mod.rs` say when): back to
//! the last durable state in memory (`durable.rs`), the failed turn's reads answered from it,
//! and, before the next write, the document read again from the store, where a write given up
//! on may have landed after all; or, when the state in memory was lost, a reload.

use std::mem;
use std::sync::Arc;

use automerge::ChangeHash;

use super::Owner;
use crate::doc::api::{Command, DocEvent, PushBatch};
use crate::doc::durable;
use crate::doc::shared::store_error;
use crate::doc::turn::Replies;
use crate::error::RelayError;

/// A turn whose write failed: the error its writes got, and its reads and subscriptions, to
/// be answered again from the durable state.
pub(super) struct Failed {
    pub(super) err: RelayError,
    pub(super) retry: Replies,
}

impl Owner {
    /// Before a batch with writes: a document that went back to its durable state in memory
    /// is read again from the store, once the store takes writes. `Err` refuses the batch's
    /// writes (the document stays as it is; reads are served from it).
    pub(super) async fn prepare_writes(&mut self, cmds: &[Command]) -> Result<(), RelayError> {
        let writes = cmds.iter().any(|c| match c {
            Command::Write(_) => true,
            Command::RepoSync(s) => s.upload.is_some(),
            _ => false,
        });
        if !self.stale || !writes {
            return Ok(());
        }
        self.shared.store.admit(0).map_err(|e| store_error(&e))?;
        self.drain().await;
        if let Some(c) = self.compaction.take() {
            let result = c.await;
            self.finish_compaction(result);
        }
        let loaded = self.read_store().await?;
        let served = self.durable.heads.clone();
        self.install(loaded);
        self.tell_reloaded(&served);
        self.reset_repo_states();
        tracing::info!(doc = %self.id, "reloaded from the store after a failed write");
        Ok(())
    }

    /// After a reload, subscribers (and, on a single node, the observer) hear of what the
    /// store held beyond `served` (the durable heads they were told of): a write given up on
    /// as failed that landed after all, and other nodes' changes. Nothing is said when
    /// `served` is not all in the store's document (a delete elsewhere says that itself).
    fn tell_reloaded(&mut self, served: &[ChangeHash]) {
        let heads = self.state.doc.get_heads();
        let kept = served
            .iter()
            .all(|h| self.state.doc.get_change_meta_by_hash(h).is_some());
        if !self.state.exists || heads == served || !kept {
            return;
        }
        tracing::info!(doc = %self.id, "the store held changes beyond the durable state; pushing them");
        // The observer hears of the changes this node stored. With other nodes on the store,
        // what is new may be theirs too (each reports its own), and there is no telling which.
        if let (Some(observer), None) = (self.shared.observer(), self.shared.cluster()) {
            let applied = self.state.doc.get_changes(served).len();
            observer.changed(&self.id, &heads, applied);
        }
        if self.subscribers.is_empty() {
            return;
        }
        let batch = PushBatch {
            bytes: self.state.doc.save_after(served).into(),
            heads,
            sole_origin: None,
        };
        self.subscribers
            .push(DocEvent::Changes(Arc::new(batch)), &self.shared.stats);
    }

    /// After a failed write: back to the durable state, then the failed turns' reads and
    /// subscriptions are answered from it.
    pub(super) async fn recover(&mut self, failed: Failed) {
        self.roll_back().await;
        let Failed { err, retry } = failed;
        if retry.is_empty() || self.load_error.is_some() {
            retry.fail(self.load_error.as_ref().unwrap_or(&err));
            return;
        }
        let work = retry.reads_work();
        Box::pin(self.run_turn(work, retry)).await;
    }

    /// Returns the document to its last durable state from memory (`durable.rs` says why
    /// and how), on a blocking thread: forking a large document costs about a load.
    async fn roll_back(&mut self) {
        let to = self.durable.clone();
        let mut state = mem::take(&mut self.state);
        let result = tokio::task::spawn_blocking(move || {
            let r = durable::roll_back(&mut state, &to);
            (state, r)
        })
        .await;
        self.snapshot_pending = false;
        match result {
            Ok((state, Ok(forked))) => {
                self.state = state;
                self.stale = true;
                self.reset_repo_states();
                self.publish(true);
                tracing::warn!(doc = %self.id, forked, "back to the last durable state after a failed write; serving reads from it");
            }
            Ok((state, Err(e))) => {
                self.state = state;
                tracing::error!(doc = %self.id, error = %e, "cannot go back to the durable state in memory; reloading");
                self.reload().await;
            }
            Err(e) => {
                tracing::error!(doc = %self.id, error = %e, "rollback task failed; reloading");
                self.reload().await;
            }
        }
    }

    /// Reloads the document from the store when its state in memory was lost (a merge task
    /// that panicked, a rollback that could not be done) and restarts every repo peer's sync.
    /// If the store cannot be read, every command fails until it can.
    pub(super) async fn reload(&mut self) {
        self.state.stored_pending.clear();
        self.state.cached_save = None;
        self.snapshot_pending = false;
        let served = self.durable.heads.clone();
        self.load().await;
        if self.load_error.is_none() {
            self.tell_reloaded(&served);
        }
        self.reset_repo_states();
    }

    pub(super) fn reset_repo_states(&mut self) {
        for peer in self.state.peers.values_mut() {
            peer.reset();
        }
    }
}
