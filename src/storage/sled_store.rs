//! The embedded default backend: one sled tree in `--data-dir`.
//!
//! Keys are `<doc id>/<kind>/<sha256 hex>`; ids never contain `/`, so a document's chunks are
//! exactly the keys under `<id>/`. Every write ends with `flush()`, which sled implements with
//! `sync_file_range` + fsync of its log: once `append` returns, the batch survives a process
//! crash (`kill -9`) and, on file systems that honour fsync, power loss.
//!
//! sled's API is blocking, so every call runs on tokio's blocking pool.

use std::path::Path;

use super::{ChunkKey, ChunkKind, Store, StoreError, StoreFuture, StoredChunk};
use crate::id::DocId;

#[derive(Clone)]
pub struct SledStore {
    db: sled::Db,
}

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

fn key(doc: &DocId, k: &ChunkKey) -> Vec<u8> {
    format!("{}/{}/{}", doc, k.kind.as_str(), k.hash).into_bytes()
}

fn prefix(doc: &DocId) -> Vec<u8> {
    format!("{doc}/").into_bytes()
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

impl SledStore {
    /// Opens (or creates) the store in `dir`, with a page cache of at most `cache_bytes`.
    pub fn open_with_cache(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(|e| StoreError(format!("cannot open sled store in {}: {e}", dir.display())))?;
        Ok(Self { db })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(sled::Db) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(db))
            .await
            .map_err(|e| StoreError(format!("storage task failed: {e}")))?
    }
}

impl Store for SledStore {
    fn load(&self, doc: &DocId) -> StoreFuture<'_, Vec<StoredChunk>> {
        let doc = doc.clone();
        Box::pin(self.blocking(move |db| {
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
        Box::pin(self.blocking(move |db| {
            let k = ChunkKey::for_bytes(ChunkKind::Incremental, &bytes);
            db.insert(key(&doc, &k), bytes).map_err(err)?;
            db.flush().map_err(err)?;
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
        Box::pin(self.blocking(move |db| {
            let k = ChunkKey::for_bytes(ChunkKind::Snapshot, &snapshot);
            db.insert(key(&doc, &k), snapshot).map_err(err)?;
            // The snapshot must be durable before anything it replaces disappears.
            db.flush().map_err(err)?;
            let mut batch = sled::Batch::default();
            for old in replaces.iter().filter(|old| **old != k) {
                batch.remove(key(&doc, old));
            }
            db.apply_batch(batch).map_err(err)?;
            db.flush().map_err(err)?;
            Ok(k)
        }))
    }

    fn delete(&self, doc: &DocId) -> StoreFuture<'_, ()> {
        let doc = doc.clone();
        Box::pin(self.blocking(move |db| {
            let mut batch = sled::Batch::default();
            for item in db.scan_prefix(prefix(&doc)).keys() {
                batch.remove(item.map_err(err)?);
            }
            db.apply_batch(batch).map_err(err)?;
            db.flush().map_err(err)?;
            Ok(())
        }))
    }

    fn list(&self, after: Option<&DocId>, limit: usize) -> StoreFuture<'_, Vec<DocId>> {
        let after = after.cloned();
        Box::pin(self.blocking(move |db| {
            let mut out = Vec::new();
            // '0' is the byte after '/', so "<id>0" is the first key past all of <id>'s chunks.
            let mut start = after
                .map(|a| format!("{a}0").into_bytes())
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
                start = format!("{doc}0").into_bytes();
                if let Ok(id) = DocId::parse(doc) {
                    out.push(id);
                }
            }
            Ok(out)
        }))
    }

    fn flush(&self) -> StoreFuture<'_, ()> {
        Box::pin(self.blocking(|db| db.flush().map(|_| ()).map_err(err)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn follows_the_store_contract() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open_with_cache(dir.path(), 16 << 20).unwrap();
        super::super::contract::append_load_compact_delete(&store).await;
    }

    #[tokio::test]
    async fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let doc = DocId::parse("persist").unwrap();
        {
            let store = SledStore::open_with_cache(dir.path(), 16 << 20).unwrap();
            store.append(&doc, b"abc".to_vec()).await.unwrap();
        }
        let store = SledStore::open_with_cache(dir.path(), 16 << 20).unwrap();
        let chunks = store.load(&doc).await.unwrap();
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].bytes, b"abc");
    }
}
