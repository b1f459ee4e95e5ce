//! Injected store faults, for tests: a wrapper around any backend whose writes fail, hang or
//! run out of space on demand.
//!
//! Unit tests flip a [`FaultSwitch`] directly. The binary's tests cannot reach into the
//! process, so the hidden, test-only `RELAY_TEST_FAULTS=FILE` makes the relay wrap its store in
//! a `FaultyStore` whose switch reads the mode from `FILE` on every operation (`ok`, `fail`,
//! `hang`, `full`, `disk-full`; a missing or empty file is `ok`). Reads always pass: the faults
//! are the ones a full or wedged disk shows to writes.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{ChunkKey, Store, StoreError, StoreFuture, StoredChunk};
use crate::id::DocId;

/// How often a hanging write looks whether it may go on.
const HANG_POLL: Duration = Duration::from_millis(10);

/// What the writes of a [`FaultyStore`] do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Pass through.
    None,
    /// Fail with an I/O error.
    Fail,
    /// Wait until the mode changes, then carry on (a flush that is stuck, then returns).
    Hang,
    /// Fail with ENOSPC.
    Full,
    /// The watermark reads no free space (see `DiskSpace::with_faults`): a disk under
    /// `--min-free-disk` but not yet out of space, so writes that get through still work.
    DiskFull,
}

impl Fault {
    fn code(self) -> u8 {
        match self {
            Fault::None => 0,
            Fault::Fail => 1,
            Fault::Hang => 2,
            Fault::Full => 3,
            Fault::DiskFull => 4,
        }
    }

    fn from_code(code: u8) -> Self {
        match code {
            1 => Fault::Fail,
            2 => Fault::Hang,
            3 => Fault::Full,
            4 => Fault::DiskFull,
            _ => Fault::None,
        }
    }

    fn parse(text: &str) -> Option<Self> {
        Some(match text.trim() {
            "" | "ok" => Fault::None,
            "fail" => Fault::Fail,
            "hang" => Fault::Hang,
            "full" => Fault::Full,
            "disk-full" => Fault::DiskFull,
            _ => return None,
        })
    }
}

/// The current fault: set by a test, or read from a file.
#[derive(Debug)]
pub struct FaultSwitch {
    mode: AtomicU8,
    file: Option<PathBuf>,
    /// Appends that have started waiting out a hang (so a test knows one is in flight).
    hung_appends: AtomicUsize,
}

impl FaultSwitch {
    /// A switch set by a unit test.
    #[cfg(test)]
    pub fn new() -> Arc<Self> {
        Self::reading(None)
    }

    /// A switch that reads its mode from `file` each time it is asked.
    pub fn from_file(file: PathBuf) -> Arc<Self> {
        Self::reading(Some(file))
    }

    fn reading(file: Option<PathBuf>) -> Arc<Self> {
        Arc::new(Self {
            mode: AtomicU8::new(Fault::None.code()),
            file,
            hung_appends: AtomicUsize::new(0),
        })
    }

    #[cfg(test)]
    pub fn set(&self, fault: Fault) {
        self.mode.store(fault.code(), Ordering::Release);
    }

    /// How many appends have started waiting out a hang.
    #[cfg(test)]
    pub fn hung_appends(&self) -> usize {
        self.hung_appends.load(Ordering::Acquire)
    }

    pub fn current(&self) -> Fault {
        if let Some(file) = &self.file {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            match Fault::parse(&text) {
                Some(f) => return f,
                None => {
                    tracing::warn!(file = %file.display(), mode = %text.trim(), "unknown injected fault; ignored")
                }
            }
            return Fault::None;
        }
        Fault::from_code(self.mode.load(Ordering::Acquire))
    }

    /// Waits out `hang`, then says whether the write must fail.
    async fn before_write(&self, op: &str) -> Result<(), StoreError> {
        let mut hanging = false;
        loop {
            match self.current() {
                Fault::None | Fault::DiskFull => return Ok(()),
                Fault::Hang => {
                    if !hanging && op == "append" {
                        self.hung_appends.fetch_add(1, Ordering::AcqRel);
                    }
                    hanging = true;
                    tokio::time::sleep(HANG_POLL).await
                }
                Fault::Fail => {
                    return Err(StoreError::failed(format!(
                        "{op}: injected fault: input/output error"
                    )))
                }
                Fault::Full => {
                    return Err(StoreError::no_space(format!(
                        "{op}: injected fault: No space left on device (os error 28)"
                    )))
                }
            }
        }
    }
}

/// Waits until `done` holds, checking every 10 ms; fails the test after 5 s.
#[cfg(test)]
pub async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A store whose writes (append, compact, delete, flush, probe) obey a [`FaultSwitch`].
pub struct FaultyStore {
    inner: Arc<dyn Store>,
    switch: Arc<FaultSwitch>,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn Store>, switch: Arc<FaultSwitch>) -> Self {
        Self { inner, switch }
    }
}

impl Store for FaultyStore {
    fn load(&self, doc: &DocId) -> StoreFuture<'_, Vec<StoredChunk>> {
        self.inner.load(doc)
    }

    fn append(&self, doc: &DocId, bytes: Vec<u8>) -> StoreFuture<'_, ChunkKey> {
        let doc = doc.clone();
        Box::pin(async move {
            self.switch.before_write("append").await?;
            self.inner.append(&doc, bytes).await
        })
    }

    fn compact(
        &self,
        doc: &DocId,
        snapshot: Vec<u8>,
        replaces: Vec<ChunkKey>,
    ) -> StoreFuture<'_, ChunkKey> {
        let doc = doc.clone();
        Box::pin(async move {
            self.switch.before_write("compact").await?;
            self.inner.compact(&doc, snapshot, replaces).await
        })
    }

    fn delete(&self, doc: &DocId) -> StoreFuture<'_, ()> {
        let doc = doc.clone();
        Box::pin(async move {
            self.switch.before_write("delete").await?;
            self.inner.delete(&doc).await
        })
    }

    fn list(&self, after: Option<&DocId>, limit: usize) -> StoreFuture<'_, Vec<DocId>> {
        self.inner.list(after, limit)
    }

    fn keys(&self, doc: &DocId) -> StoreFuture<'_, Vec<ChunkKey>> {
        self.inner.keys(doc)
    }

    fn flush(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            self.switch.before_write("flush").await?;
            self.inner.flush().await
        })
    }

    fn probe(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            self.switch.before_write("probe").await?;
            self.inner.probe().await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{MemoryStore, StoreErrorKind};

    #[tokio::test]
    async fn writes_obey_the_switch_and_reads_pass() {
        let switch = FaultSwitch::new();
        let store = FaultyStore::new(Arc::new(MemoryStore::new()), switch.clone());
        let doc = DocId::parse("faulty").unwrap();
        store.append(&doc, b"one".to_vec()).await.unwrap();
        switch.set(Fault::Fail);
        let e = store.append(&doc, b"two".to_vec()).await.unwrap_err();
        assert_eq!(e.kind, StoreErrorKind::Failed);
        switch.set(Fault::Full);
        let e = store.flush().await.unwrap_err();
        assert_eq!(e.kind, StoreErrorKind::NoSpace);
        assert_eq!(store.load(&doc).await.unwrap().len(), 1, "reads pass");
        switch.set(Fault::Hang);
        let hung = tokio::spawn({
            let store = Arc::new(store);
            let doc = doc.clone();
            async move { store.append(&doc, b"three".to_vec()).await }
        });
        until("the append to hang", || switch.hung_appends() > 0).await;
        assert!(!hung.is_finished(), "a hanging write waits");
        switch.set(Fault::None);
        hung.await.unwrap().unwrap();
    }

    #[test]
    fn the_file_names_the_mode() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("faults");
        let switch = FaultSwitch::from_file(file.clone());
        assert_eq!(switch.current(), Fault::None, "no file: no fault");
        for (text, fault) in [
            ("hang\n", Fault::Hang),
            ("fail", Fault::Fail),
            ("full", Fault::Full),
            ("disk-full", Fault::DiskFull),
            ("ok", Fault::None),
            ("nonsense", Fault::None),
        ] {
            std::fs::write(&file, text).unwrap();
            assert_eq!(switch.current(), fault, "{text:?}");
        }
    }
}
