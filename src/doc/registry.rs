//! The registry of document owners: at most one owner task per document id, and
//! [`Documents`], the entry point transports use.
//!
//! Owners are created on first use and retire themselves when their document does not exist
//! and nobody listens (so a flood of requests for unknown ids costs nothing lasting). Retiring
//! is done under the map's lock, and commands that raced with it are forwarded to the next
//! owner, so a document never has two owners at once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use automerge::ChangeHash;
use dashmap::DashMap;
use tokio::sync::{mpsc, oneshot, watch, Notify};

use super::api::{
    Command, DocInfo, JsonRead, Precondition, ReadOutcome, ReadRequest, RepoSync, Source,
    SubscribeRequest, Subscription, WriteJob, WriteOutcome, WriteRequest,
};
use super::cluster::Cluster;
use super::evictor::{self, Candidate, Gauge};
use super::history::HistoryPage;
use super::observer::Observer;
use super::owner::Owner;
use super::peer::PeerLink;
use super::shared::{store_error, DocConfig, Forwarding, Registrar, Shared, StoreReport};
use super::stats::StatsSnapshot;
use super::ConnId;
use crate::error::RelayError;
use crate::id::DocId;
use crate::storage::{ChunkKey, Store};
use crate::upload::{Hint, Upload};

/// Commands that may wait in one owner's queue before senders wait.
const OWNER_QUEUE: usize = 4096;

struct OwnerHandle {
    generation: u64,
    tx: mpsc::Sender<Command>,
    hint: watch::Receiver<Hint>,
    gauge: Arc<Gauge>,
}

struct Inner {
    shared: Arc<Shared>,
    owners: DashMap<DocId, OwnerHandle>,
    /// Wakes the evictor early: a new owner was started (documents can be loaded faster than
    /// a periodic check would evict them).
    owner_started: Arc<Notify>,
    /// Set by [`Documents::close`]: no new commands.
    closed: AtomicBool,
    /// Given to every owner (it holds the registry weakly, so owners never keep it alive).
    handle: Arc<dyn Registrar>,
}

/// What owners see of the registry.
struct RegistryHandle(Weak<Inner>);

impl Registrar for RegistryHandle {
    fn retire(&self, id: &DocId, generation: u64) -> bool {
        self.0.upgrade().is_some_and(|inner| {
            inner
                .owners
                .remove_if(id, |_, h| h.generation == generation)
                .is_some()
        })
    }

    fn forward(&self, id: DocId, cmd: Command) -> Forwarding<'_> {
        Box::pin(async move {
            match self.0.upgrade() {
                Some(inner) => inner.forward(&id, cmd).await,
                None => cmd.fail(RelayError::ShuttingDown),
            }
        })
    }
}

impl Inner {
    fn sender(self: &Arc<Self>, id: &DocId) -> mpsc::Sender<Command> {
        if let Some(h) = self.owners.get(id) {
            return h.tx.clone();
        }
        self.owners
            .entry(id.clone())
            .or_insert_with(|| self.start_owner(id))
            .tx
            .clone()
    }

    fn start_owner(&self, id: &DocId) -> OwnerHandle {
        let shared = &self.shared;
        let generation = shared.next_epoch();
        let (tx, rx) = mpsc::channel(OWNER_QUEUE);
        let (hint_tx, hint) = watch::channel(Hint {
            epoch: shared.next_epoch(),
            heads: Vec::new(),
        });
        let gauge = Arc::new(Gauge::default());
        gauge.touch();
        let owner = Owner::new(
            id.clone(),
            generation,
            shared.clone(),
            self.handle.clone(),
            rx,
            hint_tx,
            gauge.clone(),
        );
        shared.tasks.spawn(Box::new(owner).run());
        self.owner_started.notify_one();
        OwnerHandle {
            generation,
            tx,
            hint,
            gauge,
        }
    }

    /// Sends `cmd` to the document's owner, starting one if needed.
    async fn forward(self: &Arc<Self>, id: &DocId, cmd: Command) {
        let mut cmd = cmd;
        for _ in 0..3 {
            if self.closed.load(Ordering::Acquire) {
                break;
            }
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
        if self.closed.load(Ordering::Acquire) {
            cmd.fail(RelayError::ShuttingDown);
        } else {
            cmd.fail(RelayError::Internal("document owner unavailable".into()));
        }
    }

    /// Estimated memory of all hot documents.
    fn hot_bytes(&self) -> u64 {
        self.owners
            .iter()
            .map(|h| h.gauge.bytes.load(Ordering::Relaxed))
            .sum()
    }
}

/// Entry point for transports: every document operation goes through here.
#[derive(Clone)]
pub struct Documents {
    inner: Arc<Inner>,
    conn_ids: Arc<AtomicU64>,
}

impl Documents {
    pub fn with_config(store: Arc<dyn Store>, config: DocConfig) -> Self {
        let budget = config.memory_budget;
        let inner = Arc::new_cyclic(|weak: &Weak<Inner>| Inner {
            shared: Arc::new(Shared::new(store, config)),
            owners: DashMap::new(),
            owner_started: Arc::new(Notify::new()),
            closed: AtomicBool::new(false),
            handle: Arc::new(RegistryHandle(weak.clone())),
        });
        let weak = Arc::downgrade(&inner);
        evictor::spawn(inner.owner_started.clone(), budget, move || {
            let inner = weak.upgrade()?;
            let owners = inner
                .owners
                .iter()
                .map(|h| Candidate {
                    gauge: h.gauge.clone(),
                    tx: h.tx.clone(),
                })
                .collect();
            Some(owners)
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
                job: WriteJob {
                    upload,
                    precondition,
                    origin,
                    source: Source::Client,
                },
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
        self.call(id, |reply| {
            Command::Read(Box::new(ReadRequest { since, reply }))
        })
        .await
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
        self.call(id, |reply| {
            Command::Subscribe(Box::new(SubscribeRequest { conn, queue, reply }))
        })
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

    /// Sets up the other nodes sharing the store (once, before serving).
    pub fn join_cluster(&self, cluster: Arc<dyn Cluster>) {
        let _ = self.inner.shared.cluster.set(cluster);
    }

    /// The document as JSON (`json.rs`) with its ETag; `NotModified` when `not_if` accepts
    /// the current ETag (no conversion then).
    pub async fn read_json(
        &self,
        id: &DocId,
        not_if: impl Fn(&str) -> bool,
    ) -> Result<JsonRead, RelayError> {
        let ReadOutcome::Found { bytes, etag, .. } = self.read(id, None).await? else {
            return Ok(JsonRead::Missing);
        };
        if not_if(&etag) {
            return Ok(JsonRead::NotModified(etag));
        }
        let json = from_save(bytes, super::json::to_json).await?;
        Ok(JsonRead::Found(json, etag))
    }

    /// A page of the document's changes, newest first (`history.rs`); `None` when it does
    /// not exist. A `before` that is not one of its changes is a bad request.
    pub async fn history(
        &self,
        id: &DocId,
        limit: usize,
        before: Option<ChangeHash>,
    ) -> Result<Option<HistoryPage>, RelayError> {
        let ReadOutcome::Found { bytes, .. } = self.read(id, None).await? else {
            return Ok(None);
        };
        let page = from_save(bytes, move |doc| {
            super::history::history(doc, limit, before.as_ref())
        })
        .await?;
        match page {
            Some(page) => Ok(Some(page)),
            None => Err(RelayError::BadRequest(
                "before is not a change of this document".into(),
            )),
        }
    }

    /// Sets up who hears of every durable change of this node (once, before serving).
    pub fn observe(&self, observer: Arc<dyn Observer>) {
        let _ = self.inner.shared.observer.set(observer);
    }

    /// The documents in memory now.
    pub fn hot_ids(&self) -> Vec<DocId> {
        self.inner.owners.iter().map(|h| h.key().clone()).collect()
    }

    /// Changes another node stored as chunk `key`, for the document's owner if it is hot
    /// (a document not in memory reads them from the store when it loads).
    pub async fn published_elsewhere(&self, id: &DocId, upload: Upload, key: ChunkKey) {
        let len = upload.bytes.len();
        self.send_if_hot(
            id,
            Command::Write(Box::new(WriteRequest {
                job: WriteJob {
                    upload,
                    precondition: Precondition::None,
                    origin: None,
                    source: Source::Published { key, len },
                },
                reply: None,
            })),
        )
        .await;
    }

    /// Another node deleted the document (or said something too large to send): if it is
    /// hot, its owner compares it with the store.
    pub async fn refresh(&self, id: &DocId, deleted: bool) {
        self.send_if_hot(id, Command::Refresh { deleted }).await;
    }

    async fn send_if_hot(&self, id: &DocId, cmd: Command) {
        let tx = self.inner.owners.get(id).map(|h| h.tx.clone());
        if let Some(tx) = tx {
            // An owner that retired meanwhile drops it: its successor loads the store.
            let _ = tx.send(cmd).await;
        }
    }

    /// Whether the store answers a listing (what `/_/ready` asks).
    pub async fn store_answers(&self) -> Result<(), RelayError> {
        self.inner
            .shared
            .store
            .list(None, 1)
            .await
            .map(|_| ())
            .map_err(|e| store_error(&e))
    }

    /// What the document holds; `None` when it does not exist (no applied changes). Asking
    /// loads it if it was not in memory (`was_hot` says which).
    pub async fn info(&self, id: &DocId) -> Result<Option<DocInfo>, RelayError> {
        let was_hot = self.inner.owners.contains_key(id);
        let info = self.call(id, |reply| Command::Info { reply }).await?;
        Ok(info.map(|info| DocInfo { was_hot, ..info }))
    }

    /// Lists existing documents (paged by id), with their figures. The store lists every id
    /// with stored chunks; an id whose stored changes all wait for missing dependencies is no
    /// document and is skipped, so each candidate is asked of its owner (which loads it).
    /// Only ids starting with `prefix` are listed (ids before it are skipped on the way).
    /// Paging by id is stable while documents are written: every document that exists
    /// throughout comes exactly once, in id order.
    pub async fn list(
        &self,
        after: Option<&DocId>,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<(DocId, DocInfo)>, RelayError> {
        let mut out = Vec::new();
        let mut cursor = after.cloned();
        loop {
            let ids = self
                .inner
                .shared
                .store
                .list(cursor.as_ref(), limit)
                .await
                .map_err(|e| store_error(&e))?;
            let exhausted = ids.len() < limit;
            for id in ids {
                cursor = Some(id.clone());
                if !id.as_str().starts_with(prefix) {
                    if id.as_str() > prefix {
                        return Ok(out); // past every id with the prefix
                    }
                    continue;
                }
                if let Some(info) = self.info(&id).await? {
                    out.push((id, info));
                    if out.len() == limit {
                        return Ok(out);
                    }
                }
            }
            if exhausted {
                return Ok(out);
            }
        }
    }

    /// How the store is doing: whether it takes writes, and the disk's free space.
    pub fn store_health(&self) -> StoreReport {
        let h = self.inner.shared.store.health();
        StoreReport {
            refusing: h.refusing.as_ref().map(store_error),
            free_bytes: h.disk.map(|d| d.free),
            min_free_bytes: h.disk.map(|d| d.min_free),
            stuck: h.stuck,
        }
    }

    /// Shutdown: refuses new commands, lets every owner finish what is queued (merge,
    /// persist, reply), waits for them and for the store writes they started, then flushes
    /// the store — all within `grace`, whatever the store does. An error says the flush
    /// failed or was abandoned; nothing acknowledged depends on it (each acknowledged write
    /// was flushed before its answer).
    pub async fn close(&self, grace: Duration) -> Result<(), RelayError> {
        let deadline = tokio::time::Instant::now() + grace;
        let inner = &self.inner;
        inner.closed.store(true, Ordering::Release);
        // Dropping the registry's senders ends each owner once its queue is empty.
        inner.owners.clear();
        let tasks = &inner.shared.tasks;
        tasks.close();
        if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
            tracing::warn!(
                ?grace,
                pending = tasks.len(),
                "document owners did not finish within the grace period"
            );
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return Err(RelayError::StorageUnavailable(
                "no time was left for the final flush".into(),
            ));
        }
        match tokio::time::timeout(left, inner.shared.store.flush()).await {
            Ok(flushed) => flushed.map_err(|e| store_error(&e)),
            Err(_) => Err(RelayError::StorageUnavailable(format!(
                "the final flush did not return within the {left:.1?} left of the grace period"
            ))),
        }
    }

    pub fn stats(&self) -> StatsSnapshot {
        let inner = &self.inner;
        inner
            .shared
            .stats
            .snapshot(inner.owners.len() as u64, inner.hot_bytes())
    }
}

/// Runs `f` on the document a full save holds, loaded on a blocking thread: inspection reads
/// work from what the owner hands out, never on the owner or the async workers.
async fn from_save<T: Send + 'static>(
    bytes: bytes::Bytes,
    f: impl FnOnce(&automerge::Automerge) -> T + Send + 'static,
) -> Result<T, RelayError> {
    tokio::task::spawn_blocking(move || automerge::Automerge::load(&bytes).map(|doc| f(&doc)))
        .await
        .map_err(|e| RelayError::Internal(format!("inspection task failed: {e}")))?
        .map_err(|e| RelayError::Internal(format!("stored document does not load: {e}")))
}
