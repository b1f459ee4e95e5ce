//! What every owner of a process shares (the store, settings, counters, task tracking), the
//! narrow handle through which an owner talks to the registry (it may leave it and pass on
//! commands that reached it after it left, nothing else), and how store errors reach clients.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::task::TaskTracker;

use super::api::Command;
use super::cluster::Cluster;
use super::observer::Observer;
use super::stats::Stats;
use crate::error::RelayError;
use crate::id::DocId;
use crate::storage::{Store, StoreError, StoreErrorKind};

/// How the store is doing, for `/_/ready`.
#[derive(Debug, Clone, Default)]
pub struct StoreReport {
    /// Why writes are refused now (`insufficient_storage` or `storage_unavailable`).
    pub refusing: Option<RelayError>,
    /// Free bytes on the data dir's file system, and the watermark, when there is a disk.
    pub free_bytes: Option<u64>,
    pub min_free_bytes: Option<u64>,
    /// Store operations given up on that have not returned.
    pub stuck: usize,
}

/// What a client is told of a store error: `507` when the disk is full (nothing was stored),
/// else `503` (the store failed or is recovering; retrying later is safe).
pub(super) fn store_error(e: &StoreError) -> RelayError {
    match e.kind {
        StoreErrorKind::NoSpace => RelayError::InsufficientStorage(e.message.clone()),
        StoreErrorKind::Failed | StoreErrorKind::Unavailable => {
            RelayError::StorageUnavailable(e.message.clone())
        }
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
    /// Most changes that may wait for missing dependencies in one document.
    pub max_pending: usize,
    /// Bytes of batches that may wait for one live subscriber before it is switched to one
    /// catch-up (`--max-peer-queue`).
    pub subscriber_queue_bytes: usize,
}

impl Default for DocConfig {
    fn default() -> Self {
        Self {
            repo_sync_interval: Duration::from_millis(50),
            memory_budget: 512 << 20,
            max_doc_size: 256 << 20,
            max_pending: 10_000,
            subscriber_queue_bytes: 4 << 20,
        }
    }
}

/// Shared by the registry and every owner.
pub(super) struct Shared {
    pub(super) store: Arc<dyn Store>,
    pub(super) config: DocConfig,
    pub(super) stats: Stats,
    /// Owner tasks and the store writes they start (persists, compactions): shutdown waits
    /// for all of them before the final flush.
    pub(super) tasks: TaskTracker,
    /// The other nodes sharing the store, once the node set them up (none: single node).
    pub(super) cluster: std::sync::OnceLock<Arc<dyn Cluster>>,
    /// Who hears of every durable change of this node (webhooks), once set up.
    pub(super) observer: std::sync::OnceLock<Arc<dyn Observer>>,
    epochs: AtomicU64,
}

impl Shared {
    pub(super) fn new(store: Arc<dyn Store>, config: DocConfig) -> Self {
        Self {
            store,
            config,
            stats: Stats::default(),
            tasks: TaskTracker::new(),
            cluster: std::sync::OnceLock::new(),
            observer: std::sync::OnceLock::new(),
            epochs: AtomicU64::new(1),
        }
    }

    pub(super) fn cluster(&self) -> Option<&Arc<dyn Cluster>> {
        self.cluster.get()
    }

    pub(super) fn observer(&self) -> Option<&Arc<dyn Observer>> {
        self.observer.get()
    }

    /// A number never handed out before (owner generations and document epochs).
    pub(super) fn next_epoch(&self) -> u64 {
        self.epochs.fetch_add(1, Ordering::Relaxed)
    }
}

pub(super) type Forwarding<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// What an owner may ask of the registry.
pub(super) trait Registrar: Send + Sync {
    /// Removes the registry entry of owner `generation`; true when it was still registered
    /// (the owner must then exit once it handed over its leftovers).
    fn retire(&self, id: &DocId, generation: u64) -> bool;
    /// Sends `cmd` to the document's current owner, starting one if needed.
    fn forward(&self, id: DocId, cmd: Command) -> Forwarding<'_>;
}
