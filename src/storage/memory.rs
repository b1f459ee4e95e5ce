//! An in-memory store for tests and for running without a disk. Not durable.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::{ChunkKey, ChunkKind, Store, StoreError, StoreFuture, StoredChunk};
use crate::id::DocId;

type Key = (String, u8, String);

#[derive(Default)]
pub struct MemoryStore {
    chunks: Mutex<BTreeMap<Key, Vec<u8>>>,
}

fn key(doc: &DocId, k: &ChunkKey) -> Key {
    let kind = match k.kind {
        ChunkKind::Snapshot => 0,
        ChunkKind::Incremental => 1,
    };
    (doc.as_str().to_owned(), kind, k.hash.clone())
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, BTreeMap<Key, Vec<u8>>>, StoreError> {
        self.chunks
            .lock()
            .map_err(|_| StoreError::failed("memory store lock poisoned"))
    }
}

impl Store for MemoryStore {
    fn load(&self, doc: &DocId) -> StoreFuture<'_, Vec<StoredChunk>> {
        let doc = doc.clone();
        Box::pin(async move {
            let map = self.lock()?;
            Ok(map
                .iter()
                .filter(|((d, _, _), _)| d == doc.as_str())
                .map(|((_, kind, hash), bytes)| StoredChunk {
                    key: ChunkKey {
                        kind: if *kind == 0 {
                            ChunkKind::Snapshot
                        } else {
                            ChunkKind::Incremental
                        },
                        hash: hash.clone(),
                    },
                    bytes: bytes.clone(),
                })
                .collect())
        })
    }

    fn append(&self, doc: &DocId, bytes: Vec<u8>) -> StoreFuture<'_, ChunkKey> {
        let doc = doc.clone();
        Box::pin(async move {
            let k = ChunkKey::for_bytes(ChunkKind::Incremental, &bytes);
            self.lock()?.insert(key(&doc, &k), bytes);
            Ok(k)
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
            let k = ChunkKey::for_bytes(ChunkKind::Snapshot, &snapshot);
            let mut map = self.lock()?;
            map.insert(key(&doc, &k), snapshot);
            for old in replaces.iter().filter(|old| **old != k) {
                map.remove(&key(&doc, old));
            }
            Ok(k)
        })
    }

    fn delete(&self, doc: &DocId) -> StoreFuture<'_, ()> {
        let doc = doc.clone();
        Box::pin(async move {
            self.lock()?.retain(|(d, _, _), _| d != doc.as_str());
            Ok(())
        })
    }

    fn list(&self, after: Option<&DocId>, limit: usize) -> StoreFuture<'_, Vec<DocId>> {
        let after = after.map(|a| a.as_str().to_owned());
        Box::pin(async move {
            let map = self.lock()?;
            let mut out: Vec<DocId> = Vec::new();
            for (d, _, _) in map.keys() {
                if after.as_deref().is_some_and(|a| d.as_str() <= a) {
                    continue;
                }
                if out.last().map(|l| l.as_str()) != Some(d.as_str()) {
                    if out.len() == limit {
                        break;
                    }
                    if let Ok(id) = DocId::parse(d) {
                        out.push(id);
                    }
                }
            }
            Ok(out)
        })
    }

    fn flush(&self) -> StoreFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn follows_the_store_contract() {
        super::super::contract::all(&super::MemoryStore::new()).await;
    }
}
