//! Store health: a wrapper that keeps a failing or wedged backend from wedging the relay.
//!
//! Without it, one stuck `flush` held every writer of every document behind it, and nothing
//! told a load balancer. With it, every operation of the backend runs in a task of its own and
//! is waited for at most `timeout`; an operation that fails or does not return in time marks
//! the store **unhealthy**. While it is unhealthy, writes are refused at once (503) instead of
//! queueing behind the stuck one, and a background probe (the backend's small durable write)
//! runs every `probe_every` until one succeeds: the store is healthy again by itself. Writes
//! are also refused while the disk is under its watermark (507, `disk.rs`); that is a refusal,
//! not a fault, so it does not mark the store unhealthy. Reads are never refused: they are only
//! bounded in time.
//!
//! An operation given up on keeps running in its task (a blocked sled call cannot be
//! cancelled); it is counted as stuck until it returns. Its write may still land: it was never
//! acknowledged, and content addressing makes the client's retry harmless.
//!
//! Being a wrapper, it gives every backend (sled, memory, those to come) the same behaviour.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::disk::{DiskReport, DiskSpace};
use super::{ChunkKey, Store, StoreError, StoreErrorKind, StoreFuture, StoredChunk};
use crate::id::DocId;

/// The bounds of a [`GuardedStore`].
#[derive(Clone, Copy, Debug)]
pub struct Guarding {
    /// Longest any store operation is waited for (`--store-timeout-secs`).
    pub timeout: Duration,
    /// Time between two probes while the store is unhealthy.
    pub probe_every: Duration,
}

impl Default for Guarding {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            probe_every: Duration::from_secs(1),
        }
    }
}

/// The metric of store operations started and not yet returned, including those given up on.
const IN_FLIGHT: &str = "relay_store_operations_in_flight";

/// One store operation counted in [`IN_FLIGHT`] until it returns (or its task is dropped). A
/// value that stays up tells the operator the store has stopped answering, before the time
/// bound gives up on the operation.
struct InFlight;

impl InFlight {
    fn start() -> Self {
        metrics::gauge!(IN_FLIGHT).increment(1.0);
        InFlight
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!(IN_FLIGHT).decrement(1.0);
    }
}

/// What `/_/ready` says about the store.
#[derive(Clone, Debug, Default)]
pub struct StoreHealth {
    /// Why writes are refused now (`NoSpace` or `Unavailable`), if they are.
    pub refusing: Option<StoreError>,
    /// The disk's free space and watermark, when the store has a disk.
    pub disk: Option<DiskReport>,
    /// Operations given up on that have not returned yet.
    pub stuck: usize,
}

struct Unhealthy {
    reason: String,
    since: Instant,
}

#[derive(Default)]
struct HealthState {
    unhealthy: Option<Unhealthy>,
    probing: bool,
    /// Failures so far: a probe clears the state only if none came while it ran.
    failures: u64,
}

struct Guard {
    inner: Arc<dyn Store>,
    disk: Option<DiskSpace>,
    bounds: Guarding,
    state: Mutex<HealthState>,
    stuck: Arc<AtomicUsize>,
}

/// A [`Store`] with time bounds, a health state, a probe and the disk watermark.
#[derive(Clone)]
pub struct GuardedStore {
    g: Arc<Guard>,
}

const RUNNING: u8 = 0;
const DONE: u8 = 1;
const ABANDONED: u8 = 2;

impl GuardedStore {
    /// Guards `inner`; `disk`, when given, is the watermark of the file system it writes to.
    pub fn new(inner: Arc<dyn Store>, disk: Option<DiskSpace>, bounds: Guarding) -> Self {
        Self {
            g: Arc::new(Guard {
                inner,
                disk,
                bounds,
                state: Mutex::new(HealthState::default()),
                stuck: Arc::new(AtomicUsize::new(0)),
            }),
        }
    }

    /// Marks the store unhealthy from the outside (a store that could not be opened yet) and
    /// starts probing. Must be called inside a tokio runtime.
    pub fn mark_unhealthy(&self, reason: &str) {
        self.g.fail(reason);
    }

    /// Runs one backend operation in its own task, waiting for it at most the timeout.
    async fn bounded<T, F>(&self, op: &'static str, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: for<'a> FnOnce(&'a dyn Store) -> StoreFuture<'a, T> + Send + 'static,
    {
        let inner = self.g.inner.clone();
        let state = Arc::new(AtomicU8::new(RUNNING));
        let stuck = self.g.stuck.clone();
        let started = Instant::now();
        let task_state = state.clone();
        let counted = InFlight::start();
        let mut task = tokio::spawn(async move {
            let _counted = counted;
            let result = f(&*inner).await;
            if task_state
                .compare_exchange(RUNNING, DONE, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                stuck.fetch_sub(1, Ordering::AcqRel);
                tracing::warn!(
                    op,
                    took = ?started.elapsed(),
                    ok = result.is_ok(),
                    "a store operation given up on has returned"
                );
            }
            result
        });
        let timeout = self.g.bounds.timeout;
        let joined = match tokio::time::timeout(timeout, &mut task).await {
            Ok(joined) => joined,
            Err(_) => {
                if state
                    .compare_exchange(RUNNING, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    self.g.stuck.fetch_add(1, Ordering::AcqRel);
                    return Err(StoreError::failed(format!(
                        "{op} did not return within {timeout:?} (--store-timeout-secs)"
                    )));
                }
                // It finished as the time ran out.
                task.await
            }
        };
        joined.unwrap_or_else(|e| {
            Err(StoreError::failed(format!(
                "{op}: storage task failed: {e}"
            )))
        })
    }

    /// A bounded operation whose failure marks the store unhealthy.
    async fn checked<T, F>(&self, op: &'static str, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: for<'a> FnOnce(&'a dyn Store) -> StoreFuture<'a, T> + Send + 'static,
    {
        let result = self.bounded(op, f).await;
        if let Err(e) = &result {
            metrics::counter!("relay_store_errors_total", "op" => op).increment(1);
            if e.kind == StoreErrorKind::NoSpace {
                if let Some(d) = &self.g.disk {
                    d.invalidate();
                }
            }
            self.g.fail(&e.message);
        }
        result
    }

    /// A write: refused while unhealthy or under the watermark, else bounded and checked.
    async fn write<T, F>(&self, op: &'static str, bytes: u64, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: for<'a> FnOnce(&'a dyn Store) -> StoreFuture<'a, T> + Send + 'static,
    {
        self.g.refusal(bytes, true)?;
        self.checked(op, f).await
    }
}

impl Guard {
    /// Why a write of `bytes` is refused now, if it is. Space first: it is what the operator
    /// can act on, and a disk that is full also makes the store fail.
    fn refusal(&self, bytes: u64, count: bool) -> Result<(), StoreError> {
        if let Some(d) = &self.disk {
            if count {
                d.admit(bytes)?;
            } else {
                d.check(bytes)?;
            }
        }
        let state = self.state.lock().map_err(|_| poisoned())?;
        if let Some(u) = &state.unhealthy {
            return Err(StoreError::unavailable(format!(
                "the store failed {:.0?} ago and refuses writes until it works again ({}); \
                 nothing was stored",
                u.since.elapsed(),
                u.reason
            )));
        }
        Ok(())
    }

    /// Records a failure; the first one of a spell logs and starts the probe.
    fn fail(self: &Arc<Self>, reason: &str) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        state.failures += 1;
        match &mut state.unhealthy {
            Some(u) => u.reason = reason.to_owned(),
            None => {
                tracing::error!(
                    reason,
                    "the store failed: writes are refused (503) until a probe succeeds"
                );
                state.unhealthy = Some(Unhealthy {
                    reason: reason.to_owned(),
                    since: Instant::now(),
                });
            }
        }
        if !state.probing {
            state.probing = true;
            tokio::spawn(probe(self.clone()));
        }
    }

    fn note(&self, reason: String) {
        if let Ok(mut state) = self.state.lock() {
            if let Some(u) = &mut state.unhealthy {
                u.reason = reason;
            }
        }
    }

    fn failures(&self) -> u64 {
        self.state.lock().map_or(0, |s| s.failures)
    }

    /// Clears the state after a successful probe, unless a failure came while it ran.
    fn recovered(&self, failures_before: u64) -> bool {
        let Ok(mut state) = self.state.lock() else {
            return false;
        };
        if state.failures != failures_before {
            return false;
        }
        if let Some(u) = state.unhealthy.take() {
            tracing::info!(down_for = ?u.since.elapsed(), "the store works again: writes accepted");
        }
        state.probing = false;
        true
    }
}

/// Probes until the store works again. One probe at a time: one that does not return is
/// waited for (and reported) instead of piling up new ones behind it.
async fn probe(g: Arc<Guard>) {
    loop {
        tokio::time::sleep(g.bounds.probe_every).await;
        // A probe is a write: never one that could run a nearly full disk out of space.
        if g.disk
            .as_ref()
            .and_then(|d| d.report())
            .is_some_and(|r| r.is_low())
        {
            continue;
        }
        let before = g.failures();
        let started = Instant::now();
        let probe = g.inner.probe();
        tokio::pin!(probe);
        let result = loop {
            match tokio::time::timeout(g.bounds.timeout, &mut probe).await {
                Ok(result) => break result,
                Err(_) => g.note(format!(
                    "a probe write has not returned for {:.0?}",
                    started.elapsed()
                )),
            }
        };
        match result {
            Ok(()) if g.recovered(before) => return,
            Ok(()) => {}
            Err(e) => g.note(e.message),
        }
    }
}

fn poisoned() -> StoreError {
    StoreError::failed("store health lock poisoned")
}

impl Store for GuardedStore {
    fn load(&self, doc: &DocId) -> StoreFuture<'_, Vec<StoredChunk>> {
        let doc = doc.clone();
        Box::pin(self.checked("load", move |s| s.load(&doc)))
    }

    fn keys(&self, doc: &DocId) -> StoreFuture<'_, Vec<ChunkKey>> {
        let doc = doc.clone();
        Box::pin(self.checked("keys", move |s| s.keys(&doc)))
    }

    fn append(&self, doc: &DocId, bytes: Vec<u8>) -> StoreFuture<'_, ChunkKey> {
        let doc = doc.clone();
        let len = bytes.len() as u64;
        Box::pin(self.write("append", len, move |s| s.append(&doc, bytes)))
    }

    fn compact(
        &self,
        doc: &DocId,
        snapshot: Vec<u8>,
        replaces: Vec<ChunkKey>,
    ) -> StoreFuture<'_, ChunkKey> {
        let doc = doc.clone();
        let len = snapshot.len() as u64;
        Box::pin(self.write("compact", len, move |s| s.compact(&doc, snapshot, replaces)))
    }

    fn delete(&self, doc: &DocId) -> StoreFuture<'_, ()> {
        let doc = doc.clone();
        Box::pin(self.write("delete", 0, move |s| s.delete(&doc)))
    }

    fn list(&self, after: Option<&DocId>, limit: usize) -> StoreFuture<'_, Vec<DocId>> {
        let after = after.cloned();
        Box::pin(self.checked("list", move |s| s.list(after.as_ref(), limit)))
    }

    fn flush(&self) -> StoreFuture<'_, ()> {
        Box::pin(self.checked("flush", |s| s.flush()))
    }

    fn probe(&self) -> StoreFuture<'_, ()> {
        Box::pin(self.checked("probe", |s| s.probe()))
    }

    fn admit(&self, bytes: u64) -> Result<(), StoreError> {
        self.g.refusal(bytes, false)
    }

    fn health(&self) -> StoreHealth {
        let disk = self.g.disk.as_ref().and_then(|d| d.report());
        StoreHealth {
            refusing: self.g.refusal(0, false).err(),
            disk,
            stuck: self.g.stuck.load(Ordering::Acquire),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{until, Fault, FaultSwitch, FaultyStore, MemoryStore, MinFree};

    fn guarded(switch: &Arc<FaultSwitch>) -> GuardedStore {
        let inner = Arc::new(FaultyStore::new(
            Arc::new(MemoryStore::new()),
            switch.clone(),
        ));
        GuardedStore::new(
            inner,
            None,
            Guarding {
                timeout: Duration::from_millis(200),
                probe_every: Duration::from_millis(20),
            },
        )
    }

    async fn until_healthy(store: &GuardedStore) {
        until("the store to recover", || store.health().refusing.is_none()).await;
    }

    #[tokio::test]
    async fn a_failed_write_marks_it_unhealthy_until_a_probe_succeeds() {
        let switch = FaultSwitch::new();
        let store = guarded(&switch);
        let doc = DocId::parse("guarded").unwrap();
        store.append(&doc, b"one".to_vec()).await.unwrap();
        switch.set(Fault::Fail);
        let e = store.append(&doc, b"two".to_vec()).await.unwrap_err();
        assert_eq!(e.kind, StoreErrorKind::Failed);
        // Refused without trying, and reported.
        let e = store.append(&doc, b"three".to_vec()).await.unwrap_err();
        assert_eq!(e.kind, StoreErrorKind::Unavailable, "{e}");
        assert!(store.admit(1).is_err());
        assert_eq!(
            store.health().refusing.map(|e| e.kind),
            Some(StoreErrorKind::Unavailable)
        );
        assert_eq!(store.load(&doc).await.unwrap().len(), 1, "reads still work");
        switch.set(Fault::None);
        until_healthy(&store).await;
        store.append(&doc, b"four".to_vec()).await.unwrap();
    }

    #[tokio::test]
    async fn a_write_that_hangs_is_given_up_on_and_counted_until_it_returns() {
        let switch = FaultSwitch::new();
        let store = guarded(&switch);
        let doc = DocId::parse("wedged").unwrap();
        switch.set(Fault::Hang);
        let t = Instant::now();
        let e = store.append(&doc, b"one".to_vec()).await.unwrap_err();
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "bounded: {:?}",
            t.elapsed()
        );
        assert!(e.message.contains("did not return"), "{e}");
        assert_eq!(store.health().stuck, 1);
        let t = Instant::now();
        let e = store.append(&doc, b"two".to_vec()).await.unwrap_err();
        assert_eq!(e.kind, StoreErrorKind::Unavailable);
        assert!(t.elapsed() < Duration::from_millis(50), "refused at once");
        switch.set(Fault::None);
        until_healthy(&store).await;
        assert_eq!(store.health().stuck, 0, "the stuck write returned");
        // It landed after all: never acknowledged, harmless.
        assert_eq!(store.load(&doc).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn under_the_watermark_writes_are_refused_but_the_store_stays_healthy() {
        let dir = tempfile::tempdir().unwrap();
        let store = GuardedStore::new(
            Arc::new(MemoryStore::new()),
            Some(DiskSpace::new(dir.path(), MinFree::Bytes(u64::MAX / 4))),
            Guarding::default(),
        );
        let doc = DocId::parse("full").unwrap();
        let e = store.append(&doc, b"one".to_vec()).await.unwrap_err();
        assert_eq!(e.kind, StoreErrorKind::NoSpace);
        assert!(e.message.contains("--min-free-disk"), "{e}");
        assert!(store.load(&doc).await.unwrap().is_empty(), "nothing stored");
        let health = store.health();
        assert_eq!(
            health.refusing.map(|e| e.kind),
            Some(StoreErrorKind::NoSpace)
        );
        assert!(health.disk.unwrap().is_low());
        assert!(store.g.state.lock().unwrap().unhealthy.is_none());
    }
}
