//! The document owner: the only code that touches a document's `Automerge` value.
//!
//! Applying one change to a large document costs about as much as applying fifty in one call
//! (automerge's cost grows with the edited sequence, not with the batch). So the owner drains
//! every command waiting in its queue, applies all pending uploads as **one** batch, persists
//! the batch with **one** durable append (group commit), and only then answers the writers,
//! the readers that queued behind them, and pushes one message to every subscriber.
//!
//! CPU-heavy work (apply, save) runs on tokio's blocking pool with the document moved in and
//! out, so a large document never stalls the async workers.

use std::collections::{HashMap, HashSet};
use std::mem;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use automerge::sync;
use automerge::{Automerge, ChangeHash, SaveOptions};
use bytes::Bytes;
use futures_util::FutureExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::etag::etag_for;
use super::peer::{Outgoing, PeerLink};
use super::peer_sync::{ChangeMetas, PeerSync, TurnMessages};
use super::registry::{Gauge, Inner, Precondition};
use super::ConnId;
use crate::error::RelayError;
use crate::id::DocId;
use crate::storage::{ChunkKey, ChunkKind, StoreError};
use crate::upload::{Hint, Upload};

/// Most commands one turn of the owner takes from its queue.
const MAX_BATCH: usize = 512;

pub type Reply<T> = oneshot::Sender<Result<T, RelayError>>;

/// One upload to merge.
pub struct WriteRequest {
    pub upload: Upload,
    pub precondition: Precondition,
    /// The connection that sent it, if any (not echoed back to it).
    pub origin: Option<ConnId>,
    /// Who waits for the outcome (nobody, for a repo peer's changes unless its socket asks).
    pub reply: Option<Reply<WriteOutcome>>,
}

/// The result of a durable write.
#[derive(Debug, Clone)]
pub struct WriteOutcome {
    /// This write created the document.
    pub created: bool,
    pub heads: Vec<ChangeHash>,
    pub etag: String,
    /// Changes newly applied to the document by this write.
    pub applied: usize,
    /// Changes of this write still waiting for missing dependencies.
    pub pending: usize,
    /// Changes the upload carried.
    pub total: usize,
}

#[derive(Debug, Clone)]
pub enum ReadOutcome {
    Missing,
    Found {
        bytes: Bytes,
        heads: Vec<ChangeHash>,
        etag: String,
    },
}

/// The changes of one merged batch, shared by every subscriber.
#[derive(Debug)]
pub struct PushBatch {
    /// Exactly the batch's new changes, loadable by `loadIncremental`.
    pub bytes: Bytes,
    /// The document's heads after the batch.
    pub heads: Vec<ChangeHash>,
    /// Set when every change of the batch came from this one connection.
    pub sole_origin: Option<ConnId>,
}

#[derive(Debug, Clone)]
pub enum DocEvent {
    Changes(Arc<PushBatch>),
    Deleted,
}

/// A live subscription: the current document, then one event per batch.
pub struct Subscription {
    /// The document at subscription time (bytes of a full save and its heads), if it exists.
    pub initial: Option<(Bytes, Vec<ChangeHash>)>,
    pub events: mpsc::Receiver<DocEvent>,
    /// Set by the owner when an event was dropped because the queue was full; the subscriber
    /// must then catch up with a `since` read from the last heads it delivered.
    pub lagged: Arc<AtomicBool>,
}

/// A command to a document's owner. Kept small (large payloads are boxed): every owner's
/// queue allocates its slots in blocks of 32 commands, and every hot document has a queue.
pub enum Command {
    Write(Box<WriteRequest>),
    Read {
        since: Option<Vec<ChangeHash>>,
        reply: Reply<ReadOutcome>,
    },
    Delete {
        reply: Reply<bool>,
    },
    Subscribe {
        conn: ConnId,
        queue: usize,
        reply: Reply<Subscription>,
    },
    /// An automerge-repo sync (or request) message; its changes were split out and validated.
    RepoSync(Box<RepoSync>),
    /// A repo connection closed: forget its sync state.
    RepoDetach {
        conn: ConnId,
    },
    /// The memory budget is exceeded: leave memory once idle (reloaded on demand).
    Evict,
}

/// An automerge-repo sync (or request) message for the owner.
pub struct RepoSync {
    pub link: PeerLink,
    /// The message without its changes.
    pub message: sync::Message,
    /// The message's changes, validated.
    pub upload: Option<Upload>,
    /// It came as a `request` (the peer lacks the document).
    pub request: bool,
    /// Told once the message's changes are durable (or failed).
    pub reply: Option<Reply<WriteOutcome>>,
}

/// One received repo sync message: (connection, message without its changes, was it a
/// `request`, did it carry changes).
type RepoIn = (ConnId, sync::Message, bool, bool);

/// Sync states by connection. Kept apart from the peers' links: the states travel to the
/// merge thread, the links stay to deliver the previous turn's messages meanwhile.
type RepoStates = HashMap<ConnId, PeerSync>;

/// A turn whose merge is done and whose durable write may still be running. Its replies,
/// pushes and repo messages go out only once that write has succeeded.
struct Turn {
    persist: Option<JoinHandle<Result<Persisted, StoreError>>>,
    writes: Vec<WriteRequest>,
    reads: Vec<(Option<Vec<ChangeHash>>, Reply<ReadOutcome>)>,
    subscribes: Vec<(ConnId, usize, Reply<Subscription>)>,
    results: Vec<Result<WriteOutcome, RelayError>>,
    push: Option<PushBatch>,
    outgoing: Vec<(ConnId, Outgoing)>,
    full_save: Option<Bytes>,
    since_reads: Vec<Bytes>,
    snapshot: Option<Vec<u8>>,
    heads: Vec<ChangeHash>,
    exists: bool,
}

/// A durable write's key, size and duration.
type Persisted = (ChunkKey, usize, std::time::Duration);

struct Subscriber {
    conn: ConnId,
    tx: mpsc::Sender<DocEvent>,
    lagged: Arc<AtomicBool>,
}

type Compaction = JoinHandle<Result<(ChunkKey, usize, Vec<ChunkKey>), StoreError>>;

pub(super) struct Owner {
    id: DocId,
    generation: u64,
    inner: Arc<Inner>,
    /// Heads + epoch, published after every durable change for validation to use.
    hint: watch::Sender<Hint>,
    rx: mpsc::Receiver<Command>,
    doc: Automerge,
    exists: bool,
    /// Chunks this process loaded or wrote, with their sizes: the only ones compaction may delete.
    chunks: Vec<(ChunkKey, usize)>,
    /// Changes stored while waiting for dependencies, so they are stored once.
    stored_pending: HashSet<ChangeHash>,
    cached_save: Option<Bytes>,
    subscribers: Vec<Subscriber>,
    compaction: Option<Compaction>,
    load_error: Option<String>,
    repo_links: HashMap<ConnId, PeerLink>,
    repo_states: RepoStates,
    /// The previous turn, while its durable write runs (overlapping the next merge).
    in_flight: Option<Turn>,
    /// A snapshot was taken and its compaction has not finished yet.
    snapshot_pending: bool,
    /// When peers held back by the repo push interval are due.
    repo_flush_at: Option<tokio::time::Instant>,
    /// Shared with the registry: memory estimate, last use, pinned, for the evictor.
    gauge: Arc<Gauge>,
    evict_requested: bool,
}

/// What the blocking half of a turn hands back.
struct Applied {
    doc: Automerge,
    results: Vec<Result<WriteOutcome, RelayError>>,
    persist: Vec<u8>,
    push: Option<PushBatch>,
    new_pending: Vec<ChangeHash>,
    cleared_pending: Vec<ChangeHash>,
    full_save: Option<Bytes>,
    since_reads: Vec<Bytes>,
    snapshot: Option<Vec<u8>>,
    repo_states: RepoStates,
    outgoing: Vec<(ConnId, Outgoing)>,
    /// When the next held-back repo peer is due.
    repo_due: Option<std::time::Instant>,
}

#[derive(Default)]
struct Segment {
    writes: Vec<WriteRequest>,
    reads: Vec<(Option<Vec<ChangeHash>>, Reply<ReadOutcome>)>,
    subscribes: Vec<(ConnId, usize, Reply<Subscription>)>,
    repo: Vec<RepoIn>,
}

impl Segment {
    fn is_empty(&self) -> bool {
        self.writes.is_empty()
            && self.reads.is_empty()
            && self.subscribes.is_empty()
            && self.repo.is_empty()
    }
}

impl Owner {
    pub(super) fn new(
        id: DocId,
        generation: u64,
        inner: Arc<Inner>,
        rx: mpsc::Receiver<Command>,
        hint: watch::Sender<Hint>,
        gauge: Arc<Gauge>,
    ) -> Self {
        Self {
            id,
            generation,
            inner,
            hint,
            rx,
            doc: Automerge::new(),
            exists: false,
            chunks: Vec::new(),
            stored_pending: HashSet::new(),
            cached_save: None,
            subscribers: Vec::new(),
            compaction: None,
            load_error: None,
            repo_links: HashMap::new(),
            repo_states: HashMap::new(),
            in_flight: None,
            snapshot_pending: false,
            repo_flush_at: None,
            gauge,
            evict_requested: false,
        }
    }

    /// The owner's life. Every step that awaits is boxed, so the task itself stays small
    /// (under 1 KiB, down from 19 KiB): a hot document pays for its steps only while one runs.
    pub(super) async fn run(mut self: Box<Self>) {
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
                        if self.complete(turn, result).is_err() {
                            Box::pin(self.reload()).await;
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
        if !self.should_retire() || !self.inner.retire(&self.id, self.generation) {
            return false;
        }
        if self.exists {
            self.inner.stats.evicted();
            tracing::debug!(doc = %self.id, "evicted from memory");
        }
        self.hand_over_leftovers().await;
        true
    }

    /// Nobody listens and nothing is in flight: an owner may go if its document does not
    /// exist, or if the memory budget asked it to (the document is reloaded on demand).
    fn should_retire(&self) -> bool {
        self.is_idle() && (!self.exists || self.evict_requested)
    }

    fn is_idle(&self) -> bool {
        self.subscribers.is_empty()
            && self.repo_links.is_empty()
            && self.in_flight.is_none()
            && self.compaction.is_none()
            && self.load_error.is_none()
    }

    /// Estimated memory of the hot document. Measured on automerge 0.12: a loaded document
    /// takes about twice the raw size of its changes (what incremental chunks hold) and about
    /// 50–100 times the size of a compressed save (what snapshots hold), plus a fixed cost per
    /// owner (an empty document alone is about 10 KiB).
    fn memory_estimate(&self) -> u64 {
        use super::registry::{OWNER_BASE_BYTES, RAW_FACTOR, SNAPSHOT_FACTOR};
        let (mut incremental, mut snapshot) = (0u64, 0u64);
        for (key, len) in &self.chunks {
            match key.kind {
                ChunkKind::Incremental => incremental += *len as u64,
                ChunkKind::Snapshot => snapshot += *len as u64,
            }
        }
        let cached = self.cached_save.as_ref().map_or(0, |b| b.len() as u64);
        OWNER_BASE_BYTES + RAW_FACTOR * incremental + SNAPSHOT_FACTOR * snapshot + cached
    }

    fn update_gauge(&self) {
        self.gauge
            .bytes
            .store(self.memory_estimate(), Ordering::Relaxed);
        self.gauge.touch();
        self.gauge.pinned.store(!self.is_idle(), Ordering::Relaxed);
    }

    /// After the registry dropped us, commands sent through clones taken before that are
    /// forwarded to the document's next owner: nothing is lost, nothing runs twice.
    /// A late `Evict` is dropped: forwarding it would load the document only to evict it.
    async fn hand_over_leftovers(&mut self) {
        self.rx.close();
        while let Some(cmd) = self.rx.recv().await {
            if !matches!(cmd, Command::Evict) {
                self.inner.forward(&self.id, cmd).await;
            }
        }
    }

    async fn load(&mut self) {
        match self.inner.store.load(&self.id).await {
            Ok(chunks) => {
                let mut all = Vec::new();
                self.chunks.clear();
                for c in &chunks {
                    all.extend_from_slice(&c.bytes);
                    self.chunks.push((c.key.clone(), c.bytes.len()));
                }
                self.exists = !chunks.is_empty();
                let loaded = tokio::task::spawn_blocking(move || {
                    let mut doc = Automerge::new();
                    doc.load_incremental(&all).map(|_| doc)
                })
                .await;
                match loaded {
                    Ok(Ok(doc)) => {
                        self.doc = doc;
                        self.cached_save = None;
                        self.load_error = None;
                        self.publish(true);
                        if self.exists {
                            self.inner.stats.loaded();
                        }
                    }
                    Ok(Err(e)) => self.fail_load(format!("stored document is unreadable: {e}")),
                    Err(e) => self.fail_load(format!("load task failed: {e}")),
                }
            }
            Err(e) => self.fail_load(e.to_string()),
        }
    }

    fn epoch(&self) -> u64 {
        self.hint.borrow().epoch
    }

    /// Publishes the current heads; `new_epoch` when history may have shrunk (delete, reload),
    /// which invalidates deltas computed against older hints.
    fn publish(&self, new_epoch: bool) {
        let epoch = if new_epoch {
            self.inner.next_epoch()
        } else {
            self.epoch()
        };
        let heads = self.doc.get_heads();
        self.hint.send_replace(Hint { epoch, heads });
    }

    fn fail_load(&mut self, msg: String) {
        tracing::error!(doc = %self.id, error = %msg, "cannot load document");
        self.load_error = Some(msg);
    }

    async fn handle(&mut self, cmds: Vec<Command>) {
        if let Some(err) = &self.load_error {
            let err = RelayError::Storage(err.clone());
            for cmd in cmds {
                cmd.fail(err.clone());
            }
            return;
        }
        let mut segment = Segment::default();
        for cmd in cmds {
            match cmd {
                Command::Write(w) => segment.writes.push(*w),
                Command::Read { since, reply } => segment.reads.push((since, reply)),
                Command::Subscribe { conn, queue, reply } => {
                    segment.subscribes.push((conn, queue, reply))
                }
                Command::Delete { reply } => {
                    self.run_segment(mem::take(&mut segment)).await;
                    self.drain().await;
                    let _ = reply.send(self.delete().await);
                }
                Command::RepoSync(sync) => {
                    let RepoSync {
                        link,
                        message,
                        upload,
                        request,
                        reply,
                    } = *sync;
                    let conn = link.conn;
                    self.repo_links.entry(conn).or_insert(link);
                    self.repo_states.entry(conn).or_default();
                    let had_changes = upload.is_some();
                    if let Some(upload) = upload {
                        // Merged in the same batch as every other upload.
                        segment.writes.push(WriteRequest {
                            upload,
                            precondition: Precondition::None,
                            origin: Some(conn),
                            reply,
                        });
                    }
                    segment.repo.push((conn, message, request, had_changes));
                }
                Command::RepoDetach { conn } => {
                    self.repo_links.remove(&conn);
                    self.repo_states.remove(&conn);
                }
                Command::Evict => self.evict_requested = true,
            }
        }
        // An empty segment still runs when repo peers are due (a flush turn).
        if !segment.is_empty() || self.repo_states.values().any(|p| p.due) {
            self.run_segment(segment).await;
        }
    }

    async fn run_segment(&mut self, segment: Segment) {
        let Segment {
            writes,
            reads,
            subscribes,
            repo,
        } = segment;
        // `exists` already includes the turn still being persisted: if that write fails, this
        // turn fails with it.
        let exists_before = self.exists;
        let want_snapshot = !writes.is_empty() && !self.snapshot_pending && self.wants_compaction();
        let jobs: Vec<WriteJob> = writes
            .iter()
            .map(|w| WriteJob {
                upload: w.upload.clone(),
                precondition: w.precondition.clone(),
                origin: w.origin,
            })
            .collect();
        let since: Vec<Option<Vec<ChangeHash>>> = reads.iter().map(|(s, _)| s.clone()).collect();
        let need_full = reads.iter().any(|(s, _)| s.is_none()) || !subscribes.is_empty();
        let doc = mem::take(&mut self.doc);
        let cached = self.cached_save.take();
        let stored_pending = mem::take(&mut self.stored_pending);
        let repo_states = mem::take(&mut self.repo_states);
        let id = self.id.clone();
        let epoch = self.epoch();
        let repo_interval = self.inner.config.repo_sync_interval;
        let size_room = self
            .inner
            .config
            .max_doc_size
            .saturating_sub(self.chunks.iter().map(|(_, len)| *len as u64).sum::<u64>());
        let max_doc_size = self.inner.config.max_doc_size;
        let started = std::time::Instant::now();
        let work = tokio::task::spawn_blocking(move || {
            let applied = apply_segment(SegmentInput {
                id,
                epoch,
                doc,
                exists_before,
                jobs,
                stored_pending: &stored_pending,
                need_full,
                cached,
                since: &since,
                want_snapshot,
                repo_states,
                repo,
                repo_interval,
                size_room,
                max_doc_size,
            });
            (applied, stored_pending)
        });
        // While this turn merges, finish the previous one (its write overlaps this merge).
        let mut failure = None;
        if let Some(mut prev) = self.in_flight.take() {
            let result = wait_persist(&mut prev).await;
            if let Err(e) = self.complete(prev, result) {
                failure = Some(e);
            }
        }
        let (applied, stored_pending) = match work.await {
            Ok(v) => v,
            Err(e) => {
                // The document went with the panicked task: reload it from the store.
                let err = RelayError::Internal(format!("merge task failed: {e}"));
                tracing::error!(doc = %self.id, error = %err, "merge failed; reloading");
                fail_all(writes, reads, subscribes, &err);
                self.reload().await;
                return;
            }
        };
        let Applied {
            doc,
            results,
            persist,
            push,
            new_pending,
            cleared_pending,
            full_save,
            since_reads,
            snapshot,
            repo_states,
            outgoing,
            repo_due,
        } = applied;
        self.doc = doc;
        self.repo_states = repo_states;
        self.repo_flush_at = repo_due.map(tokio::time::Instant::from_std);
        if let Some(err) = failure {
            // This turn was merged on top of a batch that never became durable.
            fail_all(writes, reads, subscribes, &err);
            self.reload().await;
            return;
        }
        self.stored_pending = stored_pending;
        for h in cleared_pending {
            self.stored_pending.remove(&h);
        }
        self.stored_pending.extend(new_pending);
        let accepted = results.iter().filter(|r| r.is_ok()).count();
        self.inner.stats.batch(accepted, started.elapsed());
        let changed = !persist.is_empty();
        self.exists |= changed;
        self.cached_save = full_save.clone();
        if push.is_some() {
            self.publish(false);
        }
        if snapshot.is_some() {
            self.snapshot_pending = true;
        }
        let persist = changed.then(|| {
            let store = self.inner.store.clone();
            let id = self.id.clone();
            tokio::spawn(async move {
                let len = persist.len();
                let t = std::time::Instant::now();
                let key = store.append(&id, persist).await?;
                Ok((key, len, t.elapsed()))
            })
        });
        let turn = Turn {
            persist,
            writes,
            reads,
            subscribes,
            results,
            push,
            outgoing,
            full_save,
            since_reads,
            snapshot,
            heads: self.doc.get_heads(),
            exists: self.exists,
        };
        if turn.persist.is_some() {
            self.in_flight = Some(turn);
        } else if let Err(e) = self.complete(turn, Ok(None)) {
            tracing::error!(doc = %self.id, error = %e, "turn failed");
        }
    }

    /// Waits for the turn in flight, if any, and finishes it.
    async fn drain(&mut self) {
        if let Some(mut turn) = self.in_flight.take() {
            let result = wait_persist(&mut turn).await;
            if self.complete(turn, result).is_err() {
                self.reload().await;
            }
        }
    }

    /// Reloads the durable state after a failure and restarts every repo peer's sync.
    async fn reload(&mut self) {
        self.stored_pending.clear();
        self.cached_save = None;
        self.snapshot_pending = false;
        self.load().await;
        self.reset_repo_states();
    }

    fn reset_repo_states(&mut self) {
        for peer in self.repo_states.values_mut() {
            peer.reset();
        }
    }

    /// Sends everything a merged turn owes once its write is durable; on a failed write,
    /// fails the turn's requests and returns the error.
    fn complete(
        &mut self,
        turn: Turn,
        persisted: Result<Option<Persisted>, RelayError>,
    ) -> Result<(), RelayError> {
        let Turn {
            writes,
            reads,
            subscribes,
            results,
            push,
            outgoing,
            full_save,
            since_reads,
            snapshot,
            heads,
            exists,
            ..
        } = turn;
        match persisted {
            Ok(Some((key, len, took))) => {
                self.inner.stats.persisted(took);
                self.chunks.push((key, len));
            }
            Ok(None) => {}
            Err(err) => {
                tracing::error!(doc = %self.id, error = %err, "persisting a batch failed");
                fail_all(writes, reads, subscribes, &err);
                self.snapshot_pending = false;
                return Err(err);
            }
        }
        let etag = etag_for(&heads);
        for (w, result) in writes.into_iter().zip(results) {
            if let Some(reply) = w.reply {
                let _ = reply.send(result);
            }
        }
        if let Some(batch) = push {
            self.push(DocEvent::Changes(Arc::new(batch)));
        }
        for (conn, out) in outgoing {
            let gone = self
                .repo_links
                .get(&conn)
                .is_some_and(|link| !link.offer(out));
            if gone {
                self.repo_links.remove(&conn);
                self.repo_states.remove(&conn);
            }
        }
        let mut since_reads = since_reads.into_iter();
        for (since, reply) in reads {
            let outcome = if !exists {
                ReadOutcome::Missing
            } else {
                let bytes = match since {
                    None => full_save.clone().unwrap_or_default(),
                    Some(_) => since_reads.next().unwrap_or_default(),
                };
                ReadOutcome::Found {
                    bytes,
                    heads: heads.clone(),
                    etag: etag.clone(),
                }
            };
            let _ = reply.send(Ok(outcome));
        }
        for (conn, queue, reply) in subscribes {
            let (tx, rx) = mpsc::channel(queue.max(1));
            let lagged = Arc::new(AtomicBool::new(false));
            let initial = exists.then(|| (full_save.clone().unwrap_or_default(), heads.clone()));
            let sub = Subscription {
                initial,
                events: rx,
                lagged: lagged.clone(),
            };
            if reply.send(Ok(sub)).is_ok() {
                self.subscribers.push(Subscriber { conn, tx, lagged });
            }
        }
        if let Some(snapshot) = snapshot {
            self.start_compaction(snapshot);
        }
        Ok(())
    }

    /// Hands one event to every subscriber without ever waiting: a full queue marks the
    /// subscriber as lagged (it catches up by itself), a closed one is dropped.
    fn push(&mut self, event: DocEvent) {
        let stats = &self.inner.stats;
        self.subscribers.retain(|s| {
            if let DocEvent::Changes(b) = &event {
                if b.sole_origin == Some(s.conn) {
                    return !s.tx.is_closed();
                }
            }
            match s.tx.try_send(event.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    stats.overflowed();
                    s.lagged.store(true, Ordering::Release);
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
    }

    async fn delete(&mut self) -> Result<bool, RelayError> {
        if let Some(c) = self.compaction.take() {
            // A snapshot written after the delete would resurrect the document.
            let _ = c.await;
        }
        if !self.exists {
            return Ok(false);
        }
        self.inner
            .store
            .delete(&self.id)
            .await
            .map_err(|e| RelayError::Storage(e.to_string()))?;
        self.doc = Automerge::new();
        self.exists = false;
        self.chunks.clear();
        self.stored_pending.clear();
        self.cached_save = None;
        self.publish(true);
        self.push(DocEvent::Deleted);
        // Dropping the senders ends every subscription after its queued events.
        self.subscribers.clear();
        // Repo peers keep their copies; their next sync starts from nothing (and re-creates
        // the document if they still have it).
        self.reset_repo_states();
        Ok(true)
    }

    /// Compact when the incrementals outgrow the snapshot.
    fn wants_compaction(&self) -> bool {
        let (mut inc_count, mut inc_bytes, mut snap_bytes) = (0usize, 0usize, 0usize);
        for (k, len) in &self.chunks {
            match k.kind {
                ChunkKind::Incremental => {
                    inc_count += 1;
                    inc_bytes += len;
                }
                ChunkKind::Snapshot => snap_bytes += len,
            }
        }
        inc_count >= 1024 || (inc_count >= 32 && inc_bytes >= snap_bytes)
    }

    fn start_compaction(&mut self, snapshot: Vec<u8>) {
        // The snapshot holds every change of every chunk we know of, including this turn's.
        let replaces: Vec<ChunkKey> = self.chunks.iter().map(|(k, _)| k.clone()).collect();
        let store = self.inner.store.clone();
        let id = self.id.clone();
        let len = snapshot.len();
        self.compaction = Some(tokio::spawn(async move {
            let key = store.compact(&id, snapshot, replaces.clone()).await?;
            Ok((key, len, replaces))
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
            Ok(Ok((key, len, replaced))) => {
                self.chunks.retain(|(k, _)| !replaced.contains(k));
                self.chunks.push((key, len));
                self.inner.stats.compacted();
            }
            Ok(Err(e)) => tracing::warn!(doc = %self.id, error = %e, "compaction failed"),
            Err(e) => tracing::warn!(doc = %self.id, error = %e, "compaction task failed"),
        }
    }
}

/// The result of a turn's durable write.
async fn wait_persist(turn: &mut Turn) -> Result<Option<Persisted>, RelayError> {
    let Some(handle) = turn.persist.as_mut() else {
        return Ok(None);
    };
    match handle.await {
        Ok(Ok(done)) => Ok(Some(done)),
        Ok(Err(e)) => Err(RelayError::Storage(e.to_string())),
        Err(e) => Err(RelayError::Storage(format!("storage task failed: {e}"))),
    }
}

type CompactionResult =
    Result<Result<(ChunkKey, usize, Vec<ChunkKey>), StoreError>, tokio::task::JoinError>;

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
        Some(turn) => wait_persist(turn).await,
        None => std::future::pending().await,
    }
}

impl Command {
    pub(super) fn fail(self, err: RelayError) {
        match self {
            Command::Write(w) => {
                if let Some(reply) = w.reply {
                    let _ = reply.send(Err(err));
                }
            }
            Command::Read { reply, .. } => {
                let _ = reply.send(Err(err));
            }
            Command::Delete { reply } => {
                let _ = reply.send(Err(err));
            }
            Command::Subscribe { reply, .. } => {
                let _ = reply.send(Err(err));
            }
            Command::RepoSync(_) | Command::RepoDetach { .. } | Command::Evict => {}
        }
    }
}

fn fail_all(
    writes: Vec<WriteRequest>,
    reads: Vec<(Option<Vec<ChangeHash>>, Reply<ReadOutcome>)>,
    subscribes: Vec<(ConnId, usize, Reply<Subscription>)>,
    err: &RelayError,
) {
    for reply in writes.into_iter().filter_map(|w| w.reply) {
        let _ = reply.send(Err(err.clone()));
    }
    for (_, r) in reads {
        let _ = r.send(Err(err.clone()));
    }
    for (_, _, r) in subscribes {
        let _ = r.send(Err(err.clone()));
    }
}

struct WriteJob {
    upload: Upload,
    precondition: Precondition,
    origin: Option<ConnId>,
}

struct SegmentInput<'a> {
    id: DocId,
    epoch: u64,
    doc: Automerge,
    exists_before: bool,
    jobs: Vec<WriteJob>,
    stored_pending: &'a HashSet<ChangeHash>,
    need_full: bool,
    cached: Option<Bytes>,
    since: &'a [Option<Vec<ChangeHash>>],
    want_snapshot: bool,
    repo_states: RepoStates,
    repo: Vec<RepoIn>,
    repo_interval: std::time::Duration,
    /// Bytes the document may still grow by (stored size against `--max-doc-size`).
    size_room: u64,
    max_doc_size: u64,
}

/// The CPU half of a turn: apply every write (one `load_incremental` per run of unconditional
/// writes), work out what each write did, run the repo peers' sync exchanges, and prepare the
/// bytes to persist, push and read.
fn apply_segment(input: SegmentInput<'_>) -> Applied {
    let SegmentInput {
        id,
        epoch,
        mut doc,
        exists_before,
        jobs,
        stored_pending,
        need_full,
        cached,
        since,
        want_snapshot,
        mut repo_states,
        repo,
        repo_interval,
        mut size_room,
        max_doc_size,
    } = input;
    let old_heads = doc.get_heads();
    let mut outcomes: Vec<Option<RelayError>> = Vec::with_capacity(jobs.len());
    let mut group = Group::default();
    let mut accepted_any = false;

    for (i, job) in jobs.iter().enumerate() {
        outcomes.push(None);
        // The stored size grows by at most the bytes of the changes this upload can add.
        let growth = job.upload.growth_bound(epoch);
        if growth > size_room {
            outcomes[i] = Some(RelayError::DocTooLarge {
                limit: max_doc_size,
            });
            continue;
        }
        size_room -= growth;
        match &job.precondition {
            Precondition::None => {
                group.add(i, &job.upload, epoch);
                accepted_any = true;
            }
            cond => {
                group.flush(&mut doc, &mut outcomes);
                let exists_now = exists_before || accepted_any;
                let current = etag_for(&doc.get_heads());
                let ok = match cond {
                    Precondition::IfMatch(tags) => {
                        exists_now && tags.iter().any(|t| t == "*" || *t == current)
                    }
                    Precondition::IfNoneMatchAny => !exists_now,
                    Precondition::None => true,
                };
                if ok {
                    group.add(i, &job.upload, epoch);
                    group.flush(&mut doc, &mut outcomes);
                    accepted_any = true;
                } else {
                    outcomes[i] = Some(RelayError::PreconditionFailed);
                }
            }
        }
    }
    group.flush(&mut doc, &mut outcomes);

    let heads = doc.get_heads();
    let new: HashSet<ChangeHash> = if heads == old_heads {
        HashSet::new()
    } else {
        doc.get_changes_meta(&old_heads)
            .into_iter()
            .map(|m| m.hash)
            .collect()
    };
    let etag = etag_for(&heads);
    let mut credited: HashSet<ChangeHash> = HashSet::new();
    let mut origins: HashSet<Option<ConnId>> = HashSet::new();
    let mut persist_pending: Vec<u8> = Vec::new();
    let mut new_pending = Vec::new();
    let mut created_given = exists_before;
    let mut results = Vec::with_capacity(jobs.len());
    for (job, outcome) in jobs.iter().zip(outcomes) {
        if let Some(err) = outcome {
            results.push(Err(err));
            continue;
        }
        let mut applied = 0;
        let mut pending = 0;
        let hashes = job
            .upload
            .doc_hashes
            .iter()
            .copied()
            .chain(job.upload.changes.iter().map(|c| c.hash()));
        for h in hashes {
            if new.contains(&h) && credited.insert(h) {
                applied += 1;
            }
        }
        for change in &job.upload.changes {
            let h = change.hash();
            if new.contains(&h) || doc.get_change_meta_by_hash(&h).is_some() {
                continue;
            }
            pending += 1;
            if !stored_pending.contains(&h) && !new_pending.contains(&h) {
                persist_pending.extend_from_slice(change.raw_bytes());
                new_pending.push(h);
            }
        }
        if applied > 0 {
            origins.insert(job.origin);
        }
        let created = !created_given && (applied > 0 || pending > 0);
        created_given |= created;
        results.push(Ok(WriteOutcome {
            created,
            heads: heads.clone(),
            etag: etag.clone(),
            applied,
            pending,
            total: job.upload.change_count(),
        }));
    }

    let new_bytes = if new.is_empty() {
        Vec::new()
    } else {
        doc.save_after(&old_heads)
    };
    let cleared_pending: Vec<ChangeHash> = stored_pending
        .iter()
        .filter(|h| new.contains(h))
        .copied()
        .collect();
    let sole_origin = match (origins.len(), origins.iter().next()) {
        (1, Some(Some(conn))) if credited.len() == new.len() => Some(*conn),
        _ => None,
    };
    let push = (!new.is_empty()).then(|| PushBatch {
        bytes: Bytes::from(new_bytes.clone()),
        heads: heads.clone(),
        sole_origin,
    });
    let mut persist = new_bytes;
    persist.extend_from_slice(&persist_pending);

    let changed = !persist.is_empty();
    let full_save = if need_full {
        match cached {
            Some(c) if !changed => Some(c),
            // Only applied changes: the ETag (from the heads) must name exactly these bytes.
            _ => Some(Bytes::from(doc.save_with_options(SaveOptions {
                deflate: true,
                retain_orphans: false,
            }))),
        }
    } else if changed {
        None
    } else {
        cached
    };
    let since_reads = since
        .iter()
        .flatten()
        .map(|have| {
            let known: Vec<ChangeHash> = have
                .iter()
                .filter(|h| doc.get_change_meta_by_hash(h).is_some())
                .copied()
                .collect();
            Bytes::from(doc.save_after(&known))
        })
        .collect();
    let (outgoing, repo_due) = repo_exchange(
        &id,
        &mut doc,
        &mut repo_states,
        repo,
        exists_before || changed,
        !new.is_empty(),
        repo_interval,
    );
    let snapshot = (want_snapshot && changed).then(|| {
        doc.save_with_options(SaveOptions {
            deflate: true,
            retain_orphans: true,
        })
    });
    Applied {
        doc,
        results,
        persist,
        push,
        new_pending,
        cleared_pending,
        full_save,
        since_reads,
        snapshot,
        repo_states,
        outgoing,
        repo_due,
    }
}

/// Uploads merged together: parsed changes go through one `apply_changes`, uploads that
/// still need parsing (full saves validated without a current hint) through one
/// `load_incremental`.
#[derive(Default)]
struct Group {
    changes: Vec<automerge::Change>,
    bytes: Vec<u8>,
    members: Vec<usize>,
}

impl Group {
    fn add(&mut self, member: usize, upload: &Upload, epoch: u64) {
        self.members.push(member);
        match &upload.doc_delta {
            _ if !upload.has_doc_chunks => self.changes.extend(upload.changes.iter().cloned()),
            Some((e, delta)) if *e == epoch => {
                self.changes.extend(delta.iter().cloned());
                self.changes.extend(upload.changes.iter().cloned());
            }
            _ => self.bytes.extend_from_slice(&upload.bytes),
        }
    }

    fn flush(&mut self, doc: &mut Automerge, outcomes: &mut [Option<RelayError>]) {
        let changes = mem::take(&mut self.changes);
        let mut result = Ok(());
        if !changes.is_empty() {
            result = doc.apply_changes(changes);
        }
        if result.is_ok() && !self.bytes.is_empty() {
            result = doc.load_incremental(&self.bytes).map(|_| ());
        }
        if let Err(e) = result {
            let err = RelayError::InvalidBody(format!("merge failed: {e}"));
            for &m in &self.members {
                outcomes[m] = Some(err.clone());
            }
        }
        self.bytes.clear();
        self.members.clear();
    }
}

/// The repo side of a turn: receive each peer's sync message (its changes were already merged
/// with the batch), answer requests for a document that does not exist with `doc-unavailable`,
/// then generate sync messages. A peer that sent changes, asked for the document or is new is
/// answered at once; every other peer gets at most one message per `interval` (the owner runs
/// a flush turn when held-back peers are due), which coalesces a typing storm into few frames.
/// A peer whose sync is in flight gets nothing until it answers (automerge's flow control).
fn repo_exchange(
    id: &DocId,
    doc: &mut Automerge,
    peers: &mut RepoStates,
    messages: Vec<RepoIn>,
    exists: bool,
    changed: bool,
    interval: std::time::Duration,
) -> (Vec<(ConnId, Outgoing)>, Option<std::time::Instant>) {
    let now = std::time::Instant::now();
    let mut out = Vec::new();
    let mut urgent: HashSet<ConnId> = HashSet::new();
    let mut unavailable: HashSet<ConnId> = HashSet::new();
    let mut metas = ChangeMetas::default();
    for (conn, message, request, had_changes) in messages {
        let Some(peer) = peers.get_mut(&conn) else {
            continue;
        };
        let their_heads_empty = message.heads.is_empty();
        // Its changes were merged with the batch: only the bookkeeping is left.
        peer.receive_with(doc, message, had_changes, &mut metas);
        if had_changes || request || peer.last_sent.is_none() {
            urgent.insert(conn);
        } else {
            peer.due = true;
        }
        if !exists && doc.get_heads().is_empty() && (request || their_heads_empty) {
            unavailable.insert(conn);
        }
    }
    let our_heads = doc.get_heads();
    let doc_empty = our_heads.is_empty();
    let mut messages = TurnMessages::default();
    let mut next_due: Option<std::time::Instant> = None;
    let mut conns: Vec<ConnId> = peers.keys().copied().collect();
    conns.sort_unstable();
    for conn in conns {
        let Some(peer) = peers.get_mut(&conn) else {
            continue;
        };
        if unavailable.contains(&conn) {
            out.push((conn, Outgoing::Unavailable { doc: id.clone() }));
            peer.due = false;
            continue;
        }
        let is_urgent = urgent.contains(&conn);
        if !(is_urgent || changed || peer.due) {
            continue;
        }
        let they_have_nothing = peer.state.their_heads.as_ref().is_none_or(|h| h.is_empty());
        if doc_empty && they_have_nothing {
            peer.due = false;
            continue;
        }
        if !is_urgent {
            if let Some(ready_at) = peer.last_sent.map(|t| t + interval).filter(|t| *t > now) {
                peer.due = true;
                next_due = Some(next_due.map_or(ready_at, |d| d.min(ready_at)));
                continue;
            }
        }
        peer.due = false;
        if peer.has_nothing_to_hear(&our_heads) {
            continue;
        }
        if let Some(data) = messages.generate(doc, peer) {
            peer.last_sent = Some(now);
            out.push((
                conn,
                Outgoing::Sync {
                    doc: id.clone(),
                    data,
                },
            ));
        }
    }
    (out, next_due)
}
