//! The embedded default backend: one sled tree in `--data-dir`.
//!
//! Keys are `<doc id>/<kind>/<sha256 hex>`; ids never contain `/`, so a document's chunks are
//! exactly the keys under `<id>/`. Every write ends with `flush()`, which sled implements with
//! `sync_file_range` + fsync of its log: once `append` returns, the batch survives a process
//! crash (`kill -9`) and, on file systems that honour fsync, power loss.
//!
//! sled's API is blocking, so every call runs on tokio's blocking pool.
//!
//! What sled 0.34 does on a full disk, measured on an 8 MiB tmpfs (docs/storage.md has the
//! details), and what this file does about it:
//! - a write that meets ENOSPC fails with `Io(Os { code: 28, kind: StorageFull, .. })`, and
//!   sled keeps that error for every later write of the process; once space is back, the next
//!   write hangs forever. So after any failed write this store is **poisoned**: writes, flushes
//!   and probes fail at once without calling sled (reads still work), until a restart;
//! - opening needs a little free space (it writes a snapshot): with none, the open fails with
//!   ENOSPC, and the zero-byte `snap.<lsn>.generating` it leaves makes every later open fail
//!   with `Corruption { at: None }` (sled picks the newest `snap.*` file, finished or not).
//!   Before opening, such leftovers are removed (only when no other process holds the lock);
//!   an open that fails for lack of space is retried on later use ([`Opened::Deferred`]);
//! - the lock is an `flock` on `<dir>/db`; a second process gets sled's raw `WouldBlock`, so
//!   the lock is tried first and a clear message given.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::{ChunkKey, ChunkKind, Store, StoreError, StoreErrorKind, StoreFuture, StoredChunk};
use crate::id::DocId;

/// The key the health probe writes; ids never start with `_`, so it is no document's.
const PROBE_KEY: &[u8] = b"_relay/probe";
/// Least time between two attempts to open a store that could not be opened.
const REOPEN_EVERY: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct SledStore {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    cache_bytes: u64,
    db: OnceLock<sled::Db>,
    /// When opening was last tried (while not open).
    last_open: Mutex<Option<Instant>>,
    /// Why writes stopped for good (until a restart).
    poisoned: OnceLock<String>,
}

/// How opening went.
pub enum Opened {
    Open(SledStore),
    /// Not open for lack of space; reads answer "unavailable" and every use (at most once a
    /// second) tries again, until it opens.
    Deferred {
        store: SledStore,
        reason: StoreError,
    },
}

fn err(e: sled::Error) -> StoreError {
    match e {
        sled::Error::Io(io) => StoreError::io("sled", &io),
        other => StoreError::failed(format!("sled: {other}")),
    }
}

fn key(doc: &DocId, k: &ChunkKey) -> Vec<u8> {
    format!("{}/{}/{}", doc, k.kind.as_str(), k.hash).into_bytes()
}

fn prefix(doc: &DocId) -> Vec<u8> {
    format!("{doc}/").into_bytes()
}

/// The first `limit` ids after `after`, in id order.
///
/// Keys sort by bytes and `/` ends the id, but `-` and `.` sort before `/`: the keys of an
/// id come after those of the ids that extend it with `-` or `.` (`p-1/…` < `p/…`), while in
/// id order `p` comes first. Everywhere else key order is id order. So the scan walks the
/// keys and, before an id, emits each stored shorter id it extends with `-` or `.`, which
/// key order would place too late; that costs one lookup per `-` or `.` in the id (none in
/// automerge-repo's bs58 ids). An id already emitted is skipped when its keys come by.
fn list_in_id_order(
    db: &sled::Db,
    after: Option<&DocId>,
    limit: usize,
) -> Result<Vec<DocId>, StoreError> {
    let mut out: Vec<DocId> = Vec::new();
    // Everything emitted sorts after this: the cursor, then the last id emitted.
    let mut last = after.map(|a| a.to_string());
    // Every id after `a` has its keys at or past `<a>-`, `-` being the smallest id byte.
    let mut start = after
        .map(|a| format!("{a}-").into_bytes())
        .unwrap_or_default();
    while out.len() < limit {
        let Some(item) = db.range(start.clone()..).next() else {
            break;
        };
        let (k, _) = item.map_err(err)?;
        let Some((doc, _)) = parse_key(&k) else {
            // Skip past a foreign key.
            start = k.to_vec();
            start.push(0);
            continue;
        };
        let doc = doc.to_owned();
        // '0' is the byte after '/', so "<id>0" is the first key past all of <id>'s chunks.
        start = format!("{doc}0").into_bytes();
        let shorter = doc
            .bytes()
            .enumerate()
            .filter(|&(i, b)| i > 0 && matches!(b, b'-' | b'.'))
            .map(|(i, _)| &doc[..i]);
        for id in shorter.chain(std::iter::once(doc.as_str())) {
            if out.len() == limit || last.as_deref().is_some_and(|l| id <= l) {
                continue;
            }
            if id != doc && !has_chunks(db, id)? {
                continue;
            }
            if let Ok(parsed) = DocId::parse(id) {
                out.push(parsed);
                last = Some(id.to_owned());
            }
        }
    }
    Ok(out)
}

/// Whether `doc` has a stored chunk.
fn has_chunks(db: &sled::Db, doc: &str) -> Result<bool, StoreError> {
    for item in db.scan_prefix(format!("{doc}/")).keys() {
        if parse_key(&item.map_err(err)?).is_some() {
            return Ok(true);
        }
    }
    Ok(false)
}

fn parse_key(raw: &[u8]) -> Option<(&str, ChunkKey)> {
    let text = std::str::from_utf8(raw).ok()?;
    let mut parts = text.splitn(3, '/');
    let doc = parts.next()?;
    let kind = match parts.next()? {
        "snapshot" => ChunkKind::Snapshot,
        "incremental" => ChunkKind::Incremental,
        _ => return None,
    };
    let hash = parts.next()?.to_owned();
    Some((doc, ChunkKey { kind, hash }))
}

fn in_use(dir: &Path) -> StoreError {
    StoreError::failed(format!(
        "data dir {} is in use by another automerge-relay process (or another program holding \
         its lock)",
        dir.display()
    ))
}

/// Fails when another process holds sled's lock on `<dir>/db` (sled takes the same `flock`).
#[cfg(unix)]
fn check_lock(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::io::AsRawFd;
    let path = dir.join("db");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| StoreError::io(&format!("cannot open {}", path.display()), &e))?;
    // SAFETY: flock on a descriptor we own; closing the file (at return) releases the lock.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::WouldBlock {
            return Err(in_use(dir));
        }
        return Err(StoreError::io(
            &format!("cannot lock {}", path.display()),
            &e,
        ));
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_lock(_dir: &Path) -> Result<(), StoreError> {
    Ok(())
}

/// Removes snapshots sled began and never finished (see the module docs). Only called after
/// [`check_lock`]: no other process is writing one.
fn remove_unfinished_snapshots(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => {
                    tracing::warn!(file = %name, "removed a snapshot sled never finished (it would make the store unopenable)")
                }
                Err(e) => {
                    tracing::warn!(file = %name, error = %e, "cannot remove an unfinished sled snapshot")
                }
            }
        }
    }
}

fn open_db(dir: &Path, cache_bytes: u64) -> Result<sled::Db, StoreError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| StoreError::io(&format!("cannot create {}", dir.display()), &e))?;
    check_lock(dir)?;
    remove_unfinished_snapshots(dir);
    sled::Config::new()
        .path(dir)
        .cache_capacity(cache_bytes)
        .mode(sled::Mode::HighThroughput)
        .open()
        .map_err(|e| {
            // Lost a race for the lock with another process starting at the same time.
            if e.to_string().contains("could not acquire lock") {
                return in_use(dir);
            }
            let e = err(e);
            StoreError {
                kind: e.kind,
                message: format!("cannot open sled store in {}: {}", dir.display(), e.message),
            }
        })
}

impl SledStore {
    /// Opens (or creates) the store in `dir`, with a page cache of at most `cache_bytes`.
    pub fn open_with_cache(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let db = open_db(dir, cache_bytes)?;
        let store = Self::unopened(dir, cache_bytes);
        let _ = store.inner.db.set(db);
        Ok(store)
    }

    /// Opens the store, or, when the disk has no room for sled to open, a store that opens
    /// itself later.
    pub fn open_or_defer(dir: &Path, cache_bytes: u64) -> Result<Opened, StoreError> {
        match Self::open_with_cache(dir, cache_bytes) {
            Ok(store) => Ok(Opened::Open(store)),
            Err(reason) if reason.kind == StoreErrorKind::NoSpace => {
                let store = Self::unopened(dir, cache_bytes);
                if let Ok(mut last) = store.inner.last_open.lock() {
                    *last = Some(Instant::now());
                }
                Ok(Opened::Deferred { store, reason })
            }
            Err(e) => Err(e),
        }
    }

    fn unopened(dir: &Path, cache_bytes: u64) -> Self {
        Self {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                cache_bytes,
                db: OnceLock::new(),
                last_open: Mutex::new(None),
                poisoned: OnceLock::new(),
            }),
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StoreError::failed(format!("storage task failed: {e}")))?
    }
}

impl Inner {
    /// The open database, opening it now if that failed before (at most once a second).
    fn db(&self) -> Result<&sled::Db, StoreError> {
        if let Some(db) = self.db.get() {
            return Ok(db);
        }
        let mut last = self
            .last_open
            .lock()
            .map_err(|_| StoreError::failed("sled open lock poisoned"))?;
        if let Some(db) = self.db.get() {
            return Ok(db);
        }
        if last.is_some_and(|t| t.elapsed() < REOPEN_EVERY) {
            return Err(StoreError::unavailable(format!(
                "the store in {} is not open yet: there was no room on the disk to open it",
                self.dir.display()
            )));
        }
        *last = Some(Instant::now());
        let db = open_db(&self.dir, self.cache_bytes)?;
        tracing::info!(dir = %self.dir.display(), "sled store opened");
        Ok(self.db.get_or_init(|| db))
    }

    /// The database, for a write: refused once a write failed (see the module docs).
    fn writable(&self) -> Result<&sled::Db, StoreError> {
        if let Some(why) = self.poisoned.get() {
            return Err(StoreError::failed(why.clone()));
        }
        self.db()
    }

    /// A failed write: sled will fail (or hang) on every later one, so stop writing.
    fn write_failed(&self, e: sled::Error) -> StoreError {
        let e = err(e);
        let why = format!(
            "sled stopped writing after: {}. sled 0.34 keeps failing (and hangs once space is \
             back) after a failed write, so writes are refused until the relay is restarted; \
             everything acknowledged is on disk",
            e.message
        );
        if self.poisoned.set(why.clone()).is_ok() {
            tracing::error!(error = %e.message, "sled write failed: writes are refused until the relay is restarted");
        }
        StoreError {
            kind: e.kind,
            message: why,
        }
    }
}

impl Store for SledStore {
    fn load(&self, doc: &DocId) -> StoreFuture<'_, Vec<StoredChunk>> {
        let doc = doc.clone();
        Box::pin(self.blocking(move |inner| {
            let db = inner.db()?;
            let mut snapshots = Vec::new();
            let mut incrementals = Vec::new();
            for item in db.scan_prefix(prefix(&doc)) {
                let (k, v) = item.map_err(err)?;
                let Some((_, key)) = parse_key(&k) else {
                    tracing::warn!(key = %String::from_utf8_lossy(&k), "skipping unknown key");
                    continue;
                };
                let chunk = StoredChunk {
                    key,
                    bytes: v.to_vec(),
                };
                match chunk.key.kind {
                    ChunkKind::Snapshot => snapshots.push(chunk),
                    ChunkKind::Incremental => incrementals.push(chunk),
                }
            }
            snapshots.extend(incrementals);
            Ok(snapshots)
        }))
    }

    fn append(&self, doc: &DocId, bytes: Vec<u8>) -> StoreFuture<'_, ChunkKey> {
        let doc = doc.clone();
        Box::pin(self.blocking(move |inner| {
            let db = inner.writable()?;
            let k = ChunkKey::for_bytes(ChunkKind::Incremental, &bytes);
            db.insert(key(&doc, &k), bytes)
                .and_then(|_| db.flush())
                .map_err(|e| inner.write_failed(e))?;
            Ok(k)
        }))
    }

    fn compact(
        &self,
        doc: &DocId,
        snapshot: Vec<u8>,
        replaces: Vec<ChunkKey>,
    ) -> StoreFuture<'_, ChunkKey> {
        let doc = doc.clone();
        Box::pin(self.blocking(move |inner| {
            let db = inner.writable()?;
            let k = ChunkKey::for_bytes(ChunkKind::Snapshot, &snapshot);
            // The snapshot must be durable before anything it replaces disappears.
            db.insert(key(&doc, &k), snapshot)
                .and_then(|_| db.flush())
                .map_err(|e| inner.write_failed(e))?;
            let mut batch = sled::Batch::default();
            for old in replaces.iter().filter(|old| **old != k) {
                batch.remove(key(&doc, old));
            }
            db.apply_batch(batch)
                .and_then(|_| db.flush())
                .map_err(|e| inner.write_failed(e))?;
            Ok(k)
        }))
    }

    fn delete(&self, doc: &DocId) -> StoreFuture<'_, ()> {
        let doc = doc.clone();
        Box::pin(self.blocking(move |inner| {
            let db = inner.writable()?;
            let mut batch = sled::Batch::default();
            for item in db.scan_prefix(prefix(&doc)).keys() {
                batch.remove(item.map_err(err)?);
            }
            db.apply_batch(batch)
                .and_then(|_| db.flush())
                .map_err(|e| inner.write_failed(e))?;
            Ok(())
        }))
    }

    fn list(&self, after: Option<&DocId>, limit: usize) -> StoreFuture<'_, Vec<DocId>> {
        let after = after.cloned();
        Box::pin(self.blocking(move |inner| list_in_id_order(inner.db()?, after.as_ref(), limit)))
    }

    fn flush(&self) -> StoreFuture<'_, ()> {
        Box::pin(self.blocking(|inner| {
            // A store that never opened has nothing to flush.
            if inner.db.get().is_none() && inner.poisoned.get().is_none() {
                return Ok(());
            }
            let db = inner.writable()?;
            db.flush().map(|_| ()).map_err(|e| inner.write_failed(e))
        }))
    }

    /// Overwrites [`PROBE_KEY`] and flushes: sled writes again.
    fn probe(&self) -> StoreFuture<'_, ()> {
        Box::pin(self.blocking(|inner| {
            let db = inner.writable()?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            db.insert(PROBE_KEY, &now.to_be_bytes())
                .and_then(|_| db.flush())
                .map(|_| ())
                .map_err(|e| inner.write_failed(e))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opens `dir` again after a store on it was dropped. sled's background threads keep its
    /// file, and with it the lock, open for a moment after the last handle goes, so the
    /// reopen waits (up to a deadline) for the lock to be released.
    fn reopen(dir: &Path) -> SledStore {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            match SledStore::open_with_cache(dir, 16 << 20) {
                Ok(store) => return store,
                Err(e)
                    if e.message.contains("is in use") && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => panic!("reopen failed: {e}"),
            }
        }
    }

    #[tokio::test]
    async fn follows_the_store_contract() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open_with_cache(dir.path(), 16 << 20).unwrap();
        super::super::contract::all(&store).await;
    }

    #[tokio::test]
    async fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let doc = DocId::parse("persist").unwrap();
        {
            let store = SledStore::open_with_cache(dir.path(), 16 << 20).unwrap();
            store.append(&doc, b"abc".to_vec()).await.unwrap();
        }
        let store = reopen(dir.path());
        let chunks = store.load(&doc).await.unwrap();
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].bytes, b"abc");
    }

    #[tokio::test]
    async fn a_second_open_says_the_dir_is_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let _first = SledStore::open_with_cache(dir.path(), 16 << 20).unwrap();
        let e = SledStore::open_with_cache(dir.path(), 16 << 20)
            .err()
            .expect("the second open fails");
        assert!(
            e.message
                .contains("is in use by another automerge-relay process"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn an_unfinished_snapshot_does_not_stop_an_open() {
        let dir = tempfile::tempdir().unwrap();
        let doc = DocId::parse("snap").unwrap();
        {
            let store = SledStore::open_with_cache(dir.path(), 16 << 20).unwrap();
            store.append(&doc, b"abc".to_vec()).await.unwrap();
        }
        // What a snapshot write that met ENOSPC leaves behind; sled alone then reports
        // `Corruption { at: None }` on every open.
        std::fs::write(dir.path().join("snap.7FFFFFFFFFFFFFFF.generating"), b"").unwrap();
        let store = reopen(dir.path());
        assert_eq!(store.load(&doc).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn the_probe_key_is_no_document() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open_with_cache(dir.path(), 16 << 20).unwrap();
        store.probe().await.unwrap();
        let doc = DocId::parse("after").unwrap();
        store.append(&doc, b"x".to_vec()).await.unwrap();
        assert_eq!(store.list(None, 10).await.unwrap(), vec![doc]);
    }
}
