//! The registry of document owners: at most one owner task per document id.
//!
//! Owners are created on first use and retire themselves when their document does not exist
//! and nobody listens (so a flood of requests for unknown ids costs nothing lasting). Retiring
//! is done under the map's lock, and commands that raced with it are forwarded to the next
//! owner, so a document never has two owners at once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use automerge::ChangeHash;
use dashmap::DashMap;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

use super::owner::{
    Command, Owner, ReadOutcome, RepoSync, Subscription, WriteOutcome, WriteRequest,
};
use super::{ConnId, PeerLink};
use crate::error::RelayError;
use crate::id::DocId;
use crate::storage::Store;
use crate::upload::{Hint, Upload};

/// Least time between two runs of the evictor.
const EVICT_PAUSE: Duration = Duration::from_millis(10);

/// Commands that may wait in one owner's queue before senders wait.
const OWNER_QUEUE: usize = 4096;

/// Opt-in compare-and-set on writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Precondition {
    None,
    /// `If-Match`: one of these ETags (or `*`) must be current.
    IfMatch(Vec<String>),
    /// `If-None-Match: *`: the document must not exist.
    IfNoneMatchAny,
}

struct OwnerHandle {
    generation: u64,
    tx: mpsc::Sender<Command>,
    hint: watch::Receiver<Hint>,
    gauge: Arc<Gauge>,
}

/// Fixed memory of one hot document's owner (document, task, queues, bookkeeping), in bytes.
pub(super) const OWNER_BASE_BYTES: u64 = 24 * 1024;
/// In-memory bytes per byte of raw changes (incremental chunks).
pub(super) const RAW_FACTOR: u64 = 2;
/// In-memory bytes per byte of compressed save (snapshot chunks).
pub(super) const SNAPSHOT_FACTOR: u64 = 100;

/// What the evictor needs to know about one owner, updated by the owner after every turn.
#[derive(Default, Debug)]
pub(super) struct Gauge {
    pub(super) bytes: AtomicU64,
    /// Milliseconds since the process started, at the owner's last turn.
    pub(super) last_used: AtomicU64,
    /// Has subscribers, repo peers or work in flight: never evicted.
    pub(super) pinned: AtomicBool,
}

impl Gauge {
    pub(super) fn touch(&self) {
        self.last_used.store(uptime_ms(), Ordering::Relaxed);
    }
}

fn uptime_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// Counters for benchmarks and operators.
#[derive(Default, Debug)]
pub struct Stats {
    batches: AtomicU64,
    batched_writes: AtomicU64,
    apply_micros: AtomicU64,
    persists: AtomicU64,
    persist_micros: AtomicU64,
    loads: AtomicU64,
    compactions: AtomicU64,
    overflows: AtomicU64,
    evictions: AtomicU64,
}

#[derive(Serialize, Debug, Clone, Copy)]
pub struct StatsSnapshot {
    pub batches: u64,
    pub batched_writes: u64,
    pub apply_micros: u64,
    pub persists: u64,
    pub persist_micros: u64,
    pub loads: u64,
    pub compactions: u64,
    /// Idle documents dropped from memory to stay within the budget.
    pub evictions: u64,
    /// Estimated memory of the hot documents, in bytes.
    pub hot_bytes: u64,
    /// Events dropped for full subscriber queues (each followed by a catch-up).
    pub subscriber_overflows: u64,
    pub hot_documents: u64,
}

impl Stats {
    pub(super) fn batch(&self, writes: usize, apply: Duration) {
        if writes > 0 {
            metrics::histogram!(crate::metrics::BATCH_WRITES).record(writes as f64);
            metrics::histogram!(crate::metrics::APPLY_SECONDS).record(apply.as_secs_f64());
            self.batches.fetch_add(1, Ordering::Relaxed);
            self.batched_writes
                .fetch_add(writes as u64, Ordering::Relaxed);
            self.apply_micros
                .fetch_add(apply.as_micros() as u64, Ordering::Relaxed);
        }
    }
    pub(super) fn persisted(&self, took: Duration) {
        metrics::histogram!(crate::metrics::PERSIST_SECONDS).record(took.as_secs_f64());
        self.persists.fetch_add(1, Ordering::Relaxed);
        self.persist_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }
    pub(super) fn loaded(&self) {
        metrics::counter!(crate::metrics::LOADED).increment(1);
        self.loads.fetch_add(1, Ordering::Relaxed);
    }
    pub(super) fn evicted(&self) {
        metrics::counter!(crate::metrics::EVICTED).increment(1);
        self.evictions.fetch_add(1, Ordering::Relaxed);
    }
    pub(super) fn overflowed(&self) {
        metrics::counter!(crate::metrics::OVERFLOWS).increment(1);
        self.overflows.fetch_add(1, Ordering::Relaxed);
    }
    pub(super) fn compacted(&self) {
        metrics::counter!(crate::metrics::COMPACTIONS).increment(1);
        self.compactions.fetch_add(1, Ordering::Relaxed);
    }
}

/// Tuning of the document layer.
#[derive(Debug, Clone)]
pub struct DocConfig {
    /// Least time between two sync messages to one automerge-repo peer, except for answers to
    /// its own changes and requests (those go at once).
    pub repo_sync_interval: Duration,
    /// Estimated memory the hot documents may use before idle ones are evicted.
    pub memory_budget: u64,
    /// Largest stored size a document may grow to; writes past it are refused (413).
    pub max_doc_size: u64,
}

impl Default for DocConfig {
    fn default() -> Self {
        Self {
            repo_sync_interval: Duration::from_millis(50),
            memory_budget: 512 << 20,
            max_doc_size: 256 << 20,
        }
    }
}

pub(super) struct Inner {
    pub(super) store: Arc<dyn Store>,
    pub(super) config: DocConfig,
    pub(super) stats: Stats,
    owners: DashMap<DocId, OwnerHandle>,
    generations: AtomicU64,
    /// Wakes the evictor early: a new owner was started (documents can be loaded faster than
    /// a periodic check would evict them).
    owner_started: Arc<tokio::sync::Notify>,
}

impl Inner {
    fn sender(self: &Arc<Self>, id: &DocId) -> mpsc::Sender<Command> {
        if let Some(h) = self.owners.get(id) {
            return h.tx.clone();
        }
        self.owners
            .entry(id.clone())
            .or_insert_with(|| {
                let generation = self.generations.fetch_add(1, Ordering::Relaxed);
                let (tx, rx) = mpsc::channel(OWNER_QUEUE);
                let (hint_tx, hint) = watch::channel(Hint {
                    epoch: self.next_epoch(),
                    heads: Vec::new(),
                });
                let gauge = Arc::new(Gauge::default());
                gauge.touch();
                let owner = Owner::new(
                    id.clone(),
                    generation,
                    self.clone(),
                    rx,
                    hint_tx,
                    gauge.clone(),
                );
                tokio::spawn(Box::new(owner).run());
                self.owner_started.notify_one();
                OwnerHandle {
                    generation,
                    tx,
                    hint,
                    gauge,
                }
            })
            .tx
            .clone()
    }

    /// Sends `cmd` to the document's owner, starting one if needed.
    pub(super) async fn forward(self: &Arc<Self>, id: &DocId, cmd: Command) {
        let mut cmd = cmd;
        for _ in 0..3 {
            let tx = self.sender(id);
            match tx.send(cmd).await {
                Ok(()) => return,
                Err(mpsc::error::SendError(back)) => {
                    // That owner retired between lookup and send; drop its stale entry.
                    self.owners.remove_if(id, |_, h| h.tx.same_channel(&tx));
                    cmd = back;
                }
            }
        }
        cmd.fail(RelayError::Internal("document owner unavailable".into()));
    }

    /// Estimated memory of all hot documents.
    fn hot_bytes(&self) -> u64 {
        self.owners
            .iter()
            .map(|h| h.gauge.bytes.load(Ordering::Relaxed))
            .sum()
    }

    /// Asks the least recently used idle owners to leave until the estimate is back under
    /// 90% of the budget. Owners decide for themselves (they may have become busy).
    fn evict_over_budget(&self) {
        let budget = self.config.memory_budget;
        let total = self.hot_bytes();
        if total <= budget {
            return;
        }
        let mut idle: Vec<(u64, u64, mpsc::Sender<Command>)> = self
            .owners
            .iter()
            .filter(|h| !h.gauge.pinned.load(Ordering::Relaxed))
            .map(|h| {
                (
                    h.gauge.last_used.load(Ordering::Relaxed),
                    h.gauge.bytes.load(Ordering::Relaxed),
                    h.tx.clone(),
                )
            })
            .collect();
        idle.sort_unstable_by_key(|(used, _, _)| *used);
        let target = budget / 10 * 9;
        let mut projected = total;
        for (_, bytes, tx) in idle {
            if projected <= target {
                break;
            }
            if tx.try_send(Command::Evict).is_ok() {
                projected = projected.saturating_sub(bytes);
            }
        }
        tracing::debug!(total, budget, projected, "evicting idle documents");
    }

    /// A number never handed out before (owner generations and document epochs).
    pub(super) fn next_epoch(&self) -> u64 {
        self.generations.fetch_add(1, Ordering::Relaxed)
    }

    /// Removes the registry entry of owner `generation`; true when it was still registered.
    pub(super) fn retire(&self, id: &DocId, generation: u64) -> bool {
        self.owners
            .remove_if(id, |_, h| h.generation == generation)
            .is_some()
    }
}

/// Entry point for transports: every document operation goes through here.
#[derive(Clone)]
pub struct Documents {
    inner: Arc<Inner>,
    conn_ids: Arc<AtomicU64>,
}

impl Documents {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self::with_config(store, DocConfig::default())
    }

    pub fn with_config(store: Arc<dyn Store>, config: DocConfig) -> Self {
        let inner = Arc::new(Inner {
            store,
            config,
            stats: Stats::default(),
            owners: DashMap::new(),
            generations: AtomicU64::new(1),
            owner_started: Arc::new(tokio::sync::Notify::new()),
        });
        // The evictor: checks the budget a few times a second, and soon after owners start
        // (at most every EVICT_PAUSE, so a burst of new documents costs a few checks, not one
        // per document); stops with the registry.
        let weak = Arc::downgrade(&inner);
        let owner_started = inner.owner_started.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = owner_started.notified() => {}
                }
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                inner.evict_over_budget();
                drop(inner);
                tokio::time::sleep(EVICT_PAUSE).await;
            }
        });
        Self {
            inner,
            conn_ids: Arc::new(AtomicU64::new(1)),
        }
    }

    /// A fresh id for a live connection.
    pub fn next_conn_id(&self) -> ConnId {
        self.conn_ids.fetch_add(1, Ordering::Relaxed)
    }

    async fn call<T>(
        &self,
        id: &DocId,
        make: impl FnOnce(oneshot::Sender<Result<T, RelayError>>) -> Command,
    ) -> Result<T, RelayError> {
        let (reply, rx) = oneshot::channel();
        self.inner.forward(id, make(reply)).await;
        rx.await
            .map_err(|_| RelayError::Internal("document owner stopped".into()))?
    }

    /// What the document's owner last published, if it is running (see [`Hint`]).
    pub fn hint(&self, id: &DocId) -> Option<Hint> {
        self.inner.owners.get(id).map(|h| h.hint.borrow().clone())
    }

    /// Merges an upload; returns once the merged state is durable.
    pub async fn write(
        &self,
        id: &DocId,
        upload: Upload,
        precondition: Precondition,
        origin: Option<ConnId>,
    ) -> Result<WriteOutcome, RelayError> {
        self.call(id, |reply| {
            Command::Write(Box::new(WriteRequest {
                upload,
                precondition,
                origin,
                reply: Some(reply),
            }))
        })
        .await
    }

    /// The whole document (`since = None`) or the changes not reachable from `since`.
    pub async fn read(
        &self,
        id: &DocId,
        since: Option<Vec<ChangeHash>>,
    ) -> Result<ReadOutcome, RelayError> {
        self.call(id, |reply| Command::Read { since, reply }).await
    }

    /// Deletes the document; false when it did not exist.
    pub async fn delete(&self, id: &DocId) -> Result<bool, RelayError> {
        self.call(id, |reply| Command::Delete { reply }).await
    }

    /// Subscribes connection `conn` to the document's merged batches.
    pub async fn subscribe(
        &self,
        id: &DocId,
        conn: ConnId,
        queue: usize,
    ) -> Result<Subscription, RelayError> {
        self.call(id, |reply| Command::Subscribe { conn, queue, reply })
            .await
    }

    /// Hands an automerge-repo sync message to the document's owner (replies go to `link`).
    /// When it carries changes, the receiver tells once they are durable (or failed), so a
    /// socket can wait for what it forwarded before it closes.
    pub async fn repo_sync(
        &self,
        id: &DocId,
        link: PeerLink,
        message: automerge::sync::Message,
        upload: Option<Upload>,
        request: bool,
    ) -> Option<oneshot::Receiver<Result<WriteOutcome, RelayError>>> {
        let (reply, done) = match upload {
            Some(_) => {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        let cmd = Command::RepoSync(Box::new(RepoSync {
            link,
            message,
            upload,
            request,
            reply,
        }));
        self.inner.forward(id, cmd).await;
        done
    }

    /// Tells the document's owner that a repo connection is gone.
    pub async fn repo_detach(&self, id: &DocId, conn: ConnId) {
        self.inner.forward(id, Command::RepoDetach { conn }).await;
    }

    /// Lists stored documents (paged by id).
    pub async fn list(
        &self,
        after: Option<&DocId>,
        limit: usize,
    ) -> Result<Vec<DocId>, RelayError> {
        self.inner
            .store
            .list(after, limit)
            .await
            .map_err(|e| RelayError::Storage(e.to_string()))
    }

    /// Flushes the store (shutdown).
    pub async fn flush(&self) -> Result<(), RelayError> {
        self.inner
            .store
            .flush()
            .await
            .map_err(|e| RelayError::Storage(e.to_string()))
    }

    pub fn stats(&self) -> StatsSnapshot {
        let s = &self.inner.stats;
        StatsSnapshot {
            batches: s.batches.load(Ordering::Relaxed),
            batched_writes: s.batched_writes.load(Ordering::Relaxed),
            apply_micros: s.apply_micros.load(Ordering::Relaxed),
            persists: s.persists.load(Ordering::Relaxed),
            persist_micros: s.persist_micros.load(Ordering::Relaxed),
            loads: s.loads.load(Ordering::Relaxed),
            compactions: s.compactions.load(Ordering::Relaxed),
            evictions: s.evictions.load(Ordering::Relaxed),
            hot_bytes: self.inner.hot_bytes(),
            subscriber_overflows: s.overflows.load(Ordering::Relaxed),
            hot_documents: self.inner.owners.len() as u64,
        }
    }
}
