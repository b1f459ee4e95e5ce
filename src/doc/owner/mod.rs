//! The document owner's task: the only code that touches a document's `Automerge` value.
//!
//! The owner drains every command waiting in its queue and runs them as one turn: the pure
//! merge (`merge.rs`), on a blocking thread with the document moved in and out, so a large
//! document never stalls the async workers, or on this task when the turn is known to be
//! cheap (`placement.rs`); then **one** durable append (group commit) that
//! overlaps the next turn's merge (`turn.rs`); only then the replies, one push to every
//! subscriber and the repo peers' sync messages. This file is the loop and the document's
//! lifecycle: turns, delete, compaction, eviction and retirement; `load.rs` reads the document
//! from the store, `recovery.rs` goes back to the durable state after a failed write
//! (`durable.rs`), `refresh.rs` catches up with what other nodes stored.
//!
//! Storage faults: before merging, every write asks the store whether it would be taken
//! (`Store::admit`: the disk watermark and the store's health), so while the store refuses
//! writes they are answered at once (507/503) and cost no merge. A write that fails anyway
//! fails its turn's writes; the owner returns to the last durable state in memory and keeps
//! answering reads from it.

use std::mem;
use std::sync::Arc;

use automerge::{Automerge, ReadDoc};
use futures_util::FutureExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::api::{
    Command, DocEvent, DocInfo, Precondition, RepoSync, Source, WriteJob, WriteRequest,
};
use super::chunks::{ChunkSize, Chunks};
use super::durable::Durable;
use super::evictor::Gauge;
use super::exchange::RepoIn;
use super::listeners::{RepoLinks, Subscribers};
use super::merge::{merge, DocState, Rules, Work};
use super::shared::{store_error, Registrar, Shared};
use super::turn::{PendingRead, Persisted, Replies, Turn};
use crate::error::RelayError;
use crate::id::DocId;
use crate::storage::{ChunkKey, ChunkKind, StoreError};
use crate::upload::Hint;

mod load;
mod placement;
mod recovery;
mod refresh;

use placement::{Placement, TurnCosts};
use recovery::Failed;

/// Most commands one turn of the owner takes from its queue.
const MAX_BATCH: usize = 512;

/// A finished compaction: the snapshot's key and sizes, and the chunks it replaced.
struct Compacted {
    key: ChunkKey,
    size: ChunkSize,
    replaced: Vec<ChunkKey>,
}

type Compaction = JoinHandle<Result<Compacted, StoreError>>;
type CompactionResult = Result<Result<Compacted, StoreError>, tokio::task::JoinError>;

pub(super) struct Owner {
    id: DocId,
    generation: u64,
    shared: Arc<Shared>,
    registry: Arc<dyn Registrar>,
    /// Heads + epoch, published after every durable change for validation to use.
    hint: watch::Sender<Hint>,
    rx: mpsc::Receiver<Command>,
    state: DocState,
    chunks: Chunks,
    subscribers: Subscribers,
    links: RepoLinks,
    compaction: Option<Compaction>,
    /// The document could not be loaded: every command gets this until a load succeeds.
    load_error: Option<RelayError>,
    /// What the disk holds: where a failed write goes back to.
    durable: Durable,
    /// Went back to the durable state in memory: reload from the store before the next write.
    stale: bool,
    /// The previous turn, while its durable write runs (overlapping the next merge).
    in_flight: Option<Turn>,
    /// A snapshot was taken and its compaction has not finished yet.
    snapshot_pending: bool,
    /// When peers held back by the repo push interval are due.
    repo_flush_at: Option<tokio::time::Instant>,
    /// Shared with the registry: memory estimate, last use, pinned, for the evictor.
    gauge: Arc<Gauge>,
    evict_requested: bool,
    /// What this document's last turns took: where the next one's merge runs.
    costs: TurnCosts,
}

impl Owner {
    pub(super) fn new(
        id: DocId,
        generation: u64,
        shared: Arc<Shared>,
        registry: Arc<dyn Registrar>,
        rx: mpsc::Receiver<Command>,
        hint: watch::Sender<Hint>,
        gauge: Arc<Gauge>,
    ) -> Self {
        let subscribers = Subscribers::new(shared.config.subscriber_queue_bytes);
        Self {
            id,
            generation,
            shared,
            registry,
            hint,
            rx,
            state: DocState::default(),
            chunks: Chunks::default(),
            subscribers,
            links: RepoLinks::default(),
            compaction: None,
            load_error: None,
            durable: Durable::default(),
            stale: false,
            in_flight: None,
            snapshot_pending: false,
            repo_flush_at: None,
            gauge,
            evict_requested: false,
            costs: TurnCosts::default(),
        }
    }

    /// The owner's life. Every step that awaits is boxed, so the task itself stays small
    /// (under 1 KiB, down from 19 KiB): a hot document pays for its steps only while one runs.
    /// It ends when it retires or when every sender is gone (shutdown), after finishing
    /// everything queued.
    pub(super) async fn run(mut self: Box<Self>) {
        // Watch the other nodes' messages first: a batch they persist after our load is
        // then seen, not only found by the next check against the store.
        if let Some(cluster) = self.shared.cluster().cloned() {
            cluster.watch(&self.id).await;
        }
        Box::pin(self.load()).await;
        loop {
            let first = tokio::select! {
                cmd = self.rx.recv() => cmd,
                _ = wait_until(self.repo_flush_at) => {
                    // Repo peers held back by the push interval are due: a turn with no commands.
                    self.repo_flush_at = None;
                    Box::pin(self.handle(Vec::new())).await;
                    continue;
                }
                result = wait_in_flight(&mut self.in_flight) => {
                    if let Some(turn) = self.in_flight.take() {
                        if let Err(failed) = self.complete(turn, result) {
                            Box::pin(self.recover(failed)).await;
                        }
                    }
                    if Box::pin(self.try_retire()).await {
                        return;
                    }
                    continue;
                }
                result = wait_compaction(&mut self.compaction) => {
                    self.compaction = None;
                    self.finish_compaction(result);
                    if Box::pin(self.try_retire()).await {
                        return;
                    }
                    continue;
                }
            };
            let Some(first) = first else {
                Box::pin(self.drain()).await;
                return;
            };
            let mut cmds = vec![first];
            while cmds.len() < MAX_BATCH {
                match self.rx.try_recv() {
                    Ok(cmd) => cmds.push(cmd),
                    Err(_) => break,
                }
            }
            self.collect_compaction();
            if self.load_error.is_some() {
                Box::pin(self.load()).await;
            }
            Box::pin(self.handle(cmds)).await;
            if Box::pin(self.try_retire()).await {
                return;
            }
        }
    }

    /// Leaves the registry when there is no reason to stay; true when the owner must exit.
    async fn try_retire(&mut self) -> bool {
        self.update_gauge();
        if !self.should_retire() || !self.registry.retire(&self.id, self.generation) {
            return false;
        }
        if self.state.exists {
            self.shared.stats.evicted();
            tracing::debug!(doc = %self.id, "evicted from memory");
        }
        if let Some(cluster) = self.shared.cluster() {
            cluster.unwatch(&self.id);
        }
        self.hand_over_leftovers().await;
        true
    }

    /// Nobody listens and nothing is in flight: an owner may go if its document does not
    /// exist, or if the memory budget asked it to (the document is reloaded on demand).
    fn should_retire(&self) -> bool {
        self.is_idle() && (!self.state.exists || self.evict_requested)
    }

    fn is_idle(&self) -> bool {
        self.subscribers.is_empty()
            && self.links.is_empty()
            && self.in_flight.is_none()
            && self.compaction.is_none()
            && self.load_error.is_none()
    }

    fn update_gauge(&self) {
        let cached = self.state.cached_save.as_ref().map_or(0, |b| b.len());
        self.gauge
            .update(self.chunks.memory_estimate(cached), !self.is_idle());
    }

    /// After the registry dropped us, commands sent through clones taken before that are
    /// forwarded to the document's next owner: nothing is lost, nothing runs twice.
    /// Commands only a hot document needs are dropped.
    async fn hand_over_leftovers(&mut self) {
        self.rx.close();
        while let Some(cmd) = self.rx.recv().await {
            // A late `Evict` would load the document only to evict it; what another node
            // said is for hot documents only (the next owner loads the store anyway).
            let hot_only = match &cmd {
                Command::Evict | Command::Refresh { .. } => true,
                Command::Write(w) => w.job.source.is_stored(),
                _ => false,
            };
            if !hot_only {
                self.registry.forward(self.id.clone(), cmd).await;
            }
        }
    }

    /// `None` when the document has no applied changes (it does not exist).
    fn info(&self) -> Option<DocInfo> {
        self.state.exists.then(|| DocInfo {
            heads: self.state.doc.get_heads(),
            changes: self.state.doc.stats().num_changes,
            stored_bytes: self.chunks.stored_bytes(),
            pending: self.state.stored_pending.len(),
            was_hot: true, // Documents::info says whether it was before it asked
            last_change: self
                .state
                .doc
                .get_heads()
                .iter()
                .filter_map(|h| self.state.doc.get_change_meta_by_hash(h))
                .map(|m| m.timestamp)
                .max()
                .unwrap_or(0),
            subscribers: self.subscribers.live(),
            repo_peers: self.links.len(),
        })
    }

    fn epoch(&self) -> u64 {
        self.hint.borrow().epoch
    }

    /// Publishes the current heads; `new_epoch` when history may have shrunk (delete, reload),
    /// which invalidates deltas computed against older hints.
    fn publish(&self, new_epoch: bool) {
        let epoch = if new_epoch {
            self.shared.next_epoch()
        } else {
            self.epoch()
        };
        let heads = self.state.doc.get_heads();
        self.hint.send_replace(Hint { epoch, heads });
    }

    /// Sorts a batch of commands into turns: everything up to a delete is one turn.
    async fn handle(&mut self, cmds: Vec<Command>) {
        if let Some(err) = &self.load_error {
            // Writes are told why the store refuses them, if it does (a full disk is what
            // the client and the operator can act on); everything else why it cannot load.
            let refusal = self.shared.store.admit(0).err().map(|e| store_error(&e));
            for cmd in cmds {
                let is_write = matches!(&cmd, Command::Write(_) | Command::RepoSync(_));
                match (&refusal, is_write) {
                    (Some(refused), true) => cmd.fail(refused.clone()),
                    _ => cmd.fail(err.clone()),
                }
            }
            return;
        }
        let mut gate = Gate {
            refusal: self.prepare_writes(&cmds).await.err(),
            admitted: 0,
        };
        let mut work = Work::default();
        let mut replies = Replies::default();
        for cmd in cmds {
            match cmd {
                Command::Write(w) => {
                    let WriteRequest { job, reply } = *w;
                    // Another node stored it: nothing to admit.
                    let admitted = match job.source {
                        Source::Client => self.admit(&job, &mut gate),
                        _ => Ok(()),
                    };
                    if let Err(err) = admitted {
                        if let Some(reply) = reply {
                            let _ = reply.send(Err(err));
                        }
                        continue;
                    }
                    work.jobs.push(job);
                    replies.writes.push(reply);
                }
                Command::Read(r) => {
                    work.reads.push(r.since.clone());
                    replies.reads.push(PendingRead {
                        since: r.since,
                        reply: r.reply,
                    });
                }
                Command::Subscribe(s) => replies.subscribes.push(*s),
                Command::Delete { reply } => {
                    self.run_turn(mem::take(&mut work), mem::take(&mut replies))
                        .await;
                    self.drain().await;
                    let _ = reply.send(self.delete().await);
                }
                Command::RepoSync(sync) => {
                    self.take_repo_sync(*sync, &mut work, &mut replies, &mut gate)
                }
                Command::RepoDetach { conn } => {
                    self.links.detach(conn);
                    self.state.peers.remove(&conn);
                }
                Command::Evict => self.evict_requested = true,
                Command::Refresh { deleted } => {
                    self.run_turn(mem::take(&mut work), mem::take(&mut replies))
                        .await;
                    self.drain().await;
                    Box::pin(self.refresh(deleted)).await;
                }
                // Answered at once, from the state before this batch's writes: a listing
                // needs no barrier against writes in flight.
                Command::Info { reply } => {
                    let _ = reply.send(Ok(self.info()));
                }
            }
        }
        // An empty turn still runs when repo peers are due (a flush turn).
        if !replies.is_empty() || !work.repo.is_empty() || self.state.peers.values().any(|p| p.due)
        {
            self.run_turn(work, replies).await;
        }
    }

    /// Whether the store would take this write now (asked before merging it, so a refused
    /// write costs no merge and no rollback). Counts it against the batch's admitted bytes.
    fn admit(&self, job: &WriteJob, gate: &mut Gate) -> Result<(), RelayError> {
        if let Some(err) = &gate.refusal {
            return Err(err.clone());
        }
        let total = gate
            .admitted
            .saturating_add(job.upload.growth_bound(self.epoch()));
        self.shared
            .store
            .admit(total)
            .map_err(|e| store_error(&e))?;
        gate.admitted = total;
        Ok(())
    }

    /// A repo peer's message joins the turn: its changes as a write like any other. When the
    /// store refuses them, the whole message is dropped and the peer's sync state reset: its
    /// next message starts a fresh exchange, in which it sends the changes again.
    fn take_repo_sync(
        &mut self,
        sync: RepoSync,
        work: &mut Work,
        replies: &mut Replies,
        gate: &mut Gate,
    ) {
        let RepoSync {
            link,
            message,
            upload,
            request,
            reply,
        } = sync;
        let conn = link.conn;
        self.links.attach(link);
        self.state.peers.entry(conn).or_default();
        let had_changes = upload.is_some();
        if let Some(upload) = upload {
            let job = WriteJob {
                upload,
                precondition: Precondition::None,
                origin: Some(conn),
                source: Source::Client,
            };
            if let Err(err) = self.admit(&job, gate) {
                if let Some(reply) = reply {
                    let _ = reply.send(Err(err));
                }
                if let Some(peer) = self.state.peers.get_mut(&conn) {
                    peer.reset();
                }
                return;
            }
            work.jobs.push(job);
            replies.writes.push(reply);
        }
        work.repo.push(RepoIn {
            conn,
            message,
            request,
            had_changes,
        });
    }

    /// Merges one turn, starts its durable write and leaves it in flight (finishing the
    /// previous turn while the merge runs).
    async fn run_turn(&mut self, mut work: Work, replies: Replies) {
        metrics::counter!(crate::metrics::OWNER_TURNS).increment(1);
        let config = &self.shared.config;
        work.need_full =
            replies.reads.iter().any(|r| r.since.is_none()) || !replies.subscribes.is_empty();
        let rules = Rules {
            epoch: self.epoch(),
            size_room: config
                .max_doc_size
                .saturating_sub(self.chunks.stored_bytes()),
            max_doc_size: config.max_doc_size,
            max_pending: config.max_pending,
            // A snapshot is at most the stored size; near the disk watermark it would be
            // refused after a full save, turn after turn, so it is not taken then.
            // Only a node that writes compacts: one holding the document for its subscribers
            // would write a snapshot of other nodes' chunks to the shared store (and make them
            // read it back), once per node.
            want_snapshot: work.jobs.iter().any(|j| !j.source.is_stored())
                && !self.snapshot_pending
                && self.chunks.wants_compaction()
                && self.shared.store.admit(self.chunks.stored_bytes()).is_ok(),
            repo_interval: config.repo_sync_interval,
        };
        // Chunks other nodes published whose changes this turn takes in: known once merged
        // (a compaction may delete only chunks whose changes the document holds).
        let published: Vec<(usize, ChunkKey, usize)> = work
            .jobs
            .iter()
            .enumerate()
            .filter_map(|(i, j)| match &j.source {
                Source::Published { key, len } => Some((i, key.clone(), *len)),
                _ => None,
            })
            .collect();
        let placement = self.costs.place(&work, &rules, &self.state.peers);
        let had_jobs = !work.jobs.is_empty();
        let mut failure = None;
        let merged = match placement {
            Placement::Inline => {
                let state = &mut self.state;
                let id = &self.id;
                // A panic leaves the state half-merged: it is dropped and reloaded below, as
                // when a blocking merge task panics.
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    timed_merge(id, state, work, &rules)
                }))
                .map_err(|_| "panicked".to_string())
            }
            Placement::Blocking => {
                let mut state = mem::take(&mut self.state);
                let id = self.id.clone();
                let merging = tokio::task::spawn_blocking(move || {
                    let (effects, took) = timed_merge(&id, &mut state, work, &rules);
                    (state, effects, took)
                });
                // While this turn merges, finish the previous one (its write overlaps this
                // merge).
                failure = self.finish_in_flight().await;
                merging
                    .await
                    .map(|(state, effects, took)| {
                        self.state = state;
                        (effects, took)
                    })
                    .map_err(|e| e.to_string())
            }
        };
        // Inline, the previous turn's write overlapped the merge all the same (it runs on
        // its own task).
        let finished_now = self.finish_in_flight().await;
        let failure = failure.or(finished_now);
        let (mut effects, took) = match merged {
            Ok(v) => v,
            Err(e) => {
                // The document went with the panicked merge: reload it from the store.
                self.state = DocState::default();
                let err = RelayError::Internal(format!("merge task failed: {e}"));
                tracing::error!(doc = %self.id, error = %err, "merge failed; reloading");
                replies.fail(&err);
                self.reload().await;
                return;
            }
        };
        for (i, key, len) in published {
            let merged = effects.results.get(i).is_some_and(|r| r.is_ok());
            if merged {
                metrics::counter!("relay_fanout_applied_total").increment(1);
                if !self.chunks.contains(&key) {
                    self.chunks.add(key, ChunkSize::incremental(len));
                }
            }
        }
        // Peers whose links went while the states were away have no state to keep.
        let links = &self.links;
        self.state.peers.retain(|conn, _| links.has(*conn));
        self.repo_flush_at = effects.repo_due.map(tokio::time::Instant::from_std);
        if let Some(Failed { err, retry }) = failure {
            // This turn was merged on top of a batch that never became durable: its writes
            // fail with it, its reads are answered again after going back.
            let mut rest = replies.fail_writes(&err);
            rest.absorb(retry);
            Box::pin(self.recover(Failed { err, retry: rest })).await;
            return;
        }
        self.costs.record(had_jobs, took);
        let accepted = effects.results.iter().filter(|r| r.is_ok()).count();
        self.shared.stats.batch(accepted, took);
        if effects.push.is_some() {
            self.publish(false);
        }
        if effects.snapshot.is_some() {
            self.snapshot_pending = true;
        }
        let bytes = mem::take(&mut effects.persist);
        let persist = (!bytes.is_empty()).then(|| {
            let store = self.shared.store.clone();
            let id = self.id.clone();
            let published = self
                .shared
                .cluster()
                .map(|_| bytes::Bytes::copy_from_slice(&bytes));
            self.shared.tasks.spawn(async move {
                let len = bytes.len();
                let t = std::time::Instant::now();
                let key = store.append(&id, bytes).await?;
                Ok(Persisted {
                    key,
                    len,
                    took: t.elapsed(),
                    published,
                })
            })
        });
        let turn = Turn {
            persist,
            replies,
            effects,
            heads: self.state.doc.get_heads(),
            exists: self.state.exists,
        };
        if turn.persist.is_some() {
            self.in_flight = Some(turn);
        } else if let Err(failed) = self.complete(turn, Ok(None)) {
            // Nothing to write cannot fail; kept for completeness.
            Box::pin(self.recover(failed)).await;
        }
    }

    /// Finishes the turn in flight, if any; a failed write is returned to the caller (whose
    /// own turn, if any, was merged on top of it).
    async fn finish_in_flight(&mut self) -> Option<Failed> {
        let mut prev = self.in_flight.take()?;
        let result = prev.persisted().await;
        self.complete(prev, result).err()
    }

    /// Waits for the turn in flight, if any, and finishes it.
    async fn drain(&mut self) {
        if let Some(failed) = self.finish_in_flight().await {
            Box::pin(self.recover(failed)).await;
        }
    }

    /// Sends everything a merged turn owes once its write is durable; on a failed write,
    /// fails the turn's writes and returns the rest, sending nothing else: no push, no repo
    /// message, no compaction.
    fn complete(
        &mut self,
        turn: Turn,
        persisted: Result<Option<Persisted>, RelayError>,
    ) -> Result<(), Failed> {
        let stored_here = matches!(persisted, Ok(Some(_)));
        match persisted {
            Ok(Some(p)) => {
                self.shared.stats.persisted(p.took);
                if let (Some(cluster), Some(bytes)) = (self.shared.cluster(), p.published) {
                    cluster.published(&self.id, &p.key, bytes);
                }
                if !self.chunks.contains(&p.key) {
                    self.chunks.add(p.key, ChunkSize::incremental(p.len));
                }
            }
            Ok(None) => {}
            Err(err) => {
                tracing::error!(doc = %self.id, error = %err, "persisting a batch failed");
                let retry = turn.replies.fail_writes(&err);
                self.snapshot_pending = false;
                return Err(Failed { err, retry });
            }
        }
        self.durable = Durable {
            heads: turn.heads.clone(),
            exists: turn.exists,
        };
        if let (true, Some(observer), Some(push)) = (
            stored_here,
            self.shared.observer(),
            turn.effects.push.as_ref(),
        ) {
            let applied = turn
                .effects
                .results
                .iter()
                .filter_map(|r| r.as_ref().ok())
                .map(|o| o.applied)
                .sum();
            observer.changed(&self.id, &push.heads, applied);
        }
        let answered = turn.answer();
        if let Some(batch) = answered.push {
            self.subscribers
                .push(DocEvent::Changes(Arc::new(batch)), &self.shared.stats);
        }
        for conn in self.links.deliver(answered.outgoing) {
            self.state.peers.remove(&conn);
        }
        for s in answered.joined {
            self.subscribers.add(s);
        }
        if let Some(snapshot) = answered.snapshot {
            self.start_compaction(snapshot);
        }
        Ok(())
    }

    async fn delete(&mut self) -> Result<bool, RelayError> {
        if let Some(c) = self.compaction.take() {
            // A snapshot written after the delete would resurrect the document.
            let _ = c.await;
            self.snapshot_pending = false;
        }
        let existed = self.state.exists;
        if !existed && self.chunks.keys().is_empty() {
            return Ok(false);
        }
        // Also when only waiting changes are stored: they go with the document.
        self.shared
            .store
            .delete(&self.id)
            .await
            .map_err(|e| store_error(&e))?;
        if let Some(cluster) = self.shared.cluster() {
            cluster.deleted(&self.id);
        }
        if let (true, Some(observer)) = (existed, self.shared.observer()) {
            observer.deleted(&self.id);
        }
        self.forget(existed);
        Ok(existed)
    }

    /// The document is gone from the store: drop it from memory, tell its subscribers.
    fn forget(&mut self, existed: bool) {
        self.state.doc = Automerge::new();
        self.state.exists = false;
        self.durable = Durable::default();
        self.stale = false;
        self.state.stored_pending.clear();
        self.state.cached_save = None;
        self.chunks.clear();
        self.publish(true);
        if existed {
            self.subscribers.push(DocEvent::Deleted, &self.shared.stats);
            // Dropping the senders ends every subscription after its queued events.
            self.subscribers.clear();
        }
        // Repo peers keep their copies; their next sync starts from nothing (and re-creates
        // the document if they still have it).
        self.reset_repo_states();
    }

    fn start_compaction(&mut self, snapshot: Vec<u8>) {
        // The snapshot holds every change of every chunk we know of, including this turn's.
        let replaced = self.chunks.keys();
        let store = self.shared.store.clone();
        let id = self.id.clone();
        self.compaction = Some(self.shared.tasks.spawn(async move {
            // What the snapshot decodes to (the memory estimate counts it), off the async
            // workers: it inflates every compressed column.
            let (snapshot, size) = tokio::task::spawn_blocking(move || {
                let size = ChunkSize::measure(ChunkKind::Snapshot, &snapshot);
                (snapshot, size)
            })
            .await
            .map_err(|e| StoreError::failed(format!("measuring the snapshot failed: {e}")))?;
            let key = store.compact(&id, snapshot, replaced.clone()).await?;
            Ok(Compacted {
                key,
                size,
                replaced,
            })
        }));
    }

    fn collect_compaction(&mut self) {
        let finished = self.compaction.as_ref().is_some_and(|h| h.is_finished());
        if let Some(result) = finished
            .then(|| self.compaction.take())
            .flatten()
            .and_then(|h| h.now_or_never())
        {
            self.finish_compaction(result);
        }
    }

    fn finish_compaction(&mut self, result: CompactionResult) {
        self.snapshot_pending = false;
        match result {
            Ok(Ok(c)) => {
                self.chunks.replace(&c.replaced, c.key, c.size);
                self.shared.stats.compacted();
            }
            Ok(Err(e)) => tracing::warn!(doc = %self.id, error = %e, "compaction failed"),
            Err(e) => tracing::warn!(doc = %self.id, error = %e, "compaction task failed"),
        }
    }
}

/// The writes of one batch, as the store admits them.
struct Gate {
    /// Set when the batch's writes are all refused (a stale document could not be reloaded).
    refusal: Option<RelayError>,
    /// Upper bound of the bytes the batch's admitted writes add.
    admitted: u64,
}

/// One merge and what it took (what `placement.rs` learns from).
fn timed_merge(
    id: &DocId,
    state: &mut DocState,
    work: Work,
    rules: &Rules,
) -> (super::merge::Effects, std::time::Duration) {
    let started = std::time::Instant::now();
    let effects = merge(id, state, work, rules, started);
    (effects, started.elapsed())
}

/// The running compaction's result; never resolves when there is none.
async fn wait_compaction(compaction: &mut Option<Compaction>) -> CompactionResult {
    match compaction {
        Some(handle) => handle.await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `at`; never resolves for `None`.
async fn wait_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Resolves when the turn in flight has been persisted; never, when there is none.
async fn wait_in_flight(in_flight: &mut Option<Turn>) -> Result<Option<Persisted>, RelayError> {
    match in_flight {
        Some(turn) => turn.persisted().await,
        None => std::future::pending().await,
    }
}
