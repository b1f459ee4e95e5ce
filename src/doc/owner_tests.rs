//! The owner's failure path, driven through [`Documents`] over a memory store with injected
//! faults: a failed persist fails that turn's writes, leaves the document as of its last
//! durable turn (reads keep working from it), and sends nothing for the failed turn — no
//! reply, no push, no repo message.

use std::sync::Arc;
use std::time::{Duration, Instant};

use automerge::sync::{self, SyncDoc};
use automerge::transaction::Transactable;
use automerge::{AutoCommit, Automerge, ChangeHash, ReadDoc, ROOT};

use super::cluster::{Cluster, Watching};
use super::observer::Observer;
use super::{DocConfig, DocEvent, Documents, PeerLink, Precondition, ReadOutcome};
use crate::error::RelayError;
use crate::id::DocId;
use crate::storage::{
    until, ChunkKey, Fault, FaultSwitch, FaultyStore, GuardedStore, Guarding, MemoryStore, Store,
};
use crate::upload::parse_upload;

struct Setup {
    docs: Documents,
    switch: Arc<FaultSwitch>,
    memory: Arc<MemoryStore>,
}

fn setup() -> Setup {
    let memory = Arc::new(MemoryStore::new());
    let switch = FaultSwitch::new();
    let faulty = FaultyStore::new(memory.clone(), switch.clone());
    let guarded = GuardedStore::new(
        Arc::new(faulty),
        None,
        Guarding {
            timeout: Duration::from_millis(300),
            probe_every: Duration::from_millis(20),
        },
    );
    Setup {
        docs: Documents::with_config(Arc::new(guarded), DocConfig::default()),
        switch,
        memory,
    }
}

fn id() -> DocId {
    DocId::parse("owner-faults").unwrap()
}

/// The writer's next change, as incremental bytes.
fn edit(doc: &mut AutoCommit, key: &str) -> Vec<u8> {
    let heads = doc.get_heads();
    doc.put(ROOT, key, 1).unwrap();
    doc.save_after(&heads)
}

async fn write(docs: &Documents, bytes: Vec<u8>) -> Result<super::WriteOutcome, RelayError> {
    let upload = parse_upload(bytes.into()).unwrap();
    docs.write(&id(), upload, Precondition::None, None).await
}

/// The document as the relay serves it.
async fn served(docs: &Documents) -> (Automerge, Vec<ChangeHash>) {
    match docs.read(&id(), None).await.expect("reads keep working") {
        ReadOutcome::Found { bytes, heads, .. } => (Automerge::load(&bytes).unwrap(), heads),
        ReadOutcome::Missing => panic!("the document is missing"),
    }
}

/// What the observer (the webhook, in the server) was told.
#[derive(Default)]
struct Told(std::sync::Mutex<Vec<(Vec<ChangeHash>, usize)>>);

impl Observer for Told {
    fn changed(&self, _id: &DocId, heads: &[ChangeHash], applied: usize) {
        self.0.lock().unwrap().push((heads.to_vec(), applied));
    }
    fn deleted(&self, _id: &DocId) {}
}

fn has(doc: &Automerge, key: &str) -> bool {
    doc.get(ROOT, key).unwrap().is_some()
}

async fn until_healthy(docs: &Documents) {
    until("the store to recover", || {
        let h = docs.store_health();
        h.refusing.is_none() && h.stuck == 0
    })
    .await;
}

async fn stored(memory: &MemoryStore) -> Automerge {
    let mut doc = Automerge::new();
    for c in memory.load(&id()).await.unwrap() {
        doc.load_incremental(&c.bytes).unwrap();
    }
    doc
}

#[tokio::test]
async fn a_failed_persist_keeps_the_durable_state_and_pushes_nothing() {
    let Setup {
        docs,
        switch,
        memory,
    } = setup();
    let mut writer = AutoCommit::new();
    write(&docs, edit(&mut writer, "a")).await.unwrap();
    let mut sub = docs.subscribe(&id(), 1, 16).await.unwrap();
    let durable_heads = served(&docs).await.1;

    switch.set(Fault::Fail);
    let err = write(&docs, edit(&mut writer, "b")).await.unwrap_err();
    assert!(
        matches!(err, RelayError::StorageUnavailable(_)),
        "503: {err:?}"
    );
    // Reads are served from the last durable state, without the failed change.
    let (doc, heads) = served(&docs).await;
    assert_eq!(heads, durable_heads);
    assert!(has(&doc, "a") && !has(&doc, "b"));
    // Now the store is unhealthy: the next write is refused at once, before any merge.
    let t = Instant::now();
    let err = write(&docs, edit(&mut writer, "c")).await.unwrap_err();
    assert!(matches!(err, RelayError::StorageUnavailable(_)), "{err:?}");
    assert!(
        t.elapsed() < Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );
    assert!(served(&docs).await.1 == durable_heads);
    // Nothing is queued for the failed turns; that nothing comes later either is checked
    // below: the first event after recovery is the retried batch.
    assert!(
        sub.events.try_recv().is_err(),
        "nothing pushed for the failed turns"
    );
    assert!(!has(&stored(&memory).await, "b"), "and nothing stored");

    // The fault clears: the store recovers by itself and the client's retry is taken whole.
    switch.set(Fault::None);
    until_healthy(&docs).await;
    let out = write(&docs, writer.save()).await.unwrap();
    assert_eq!(out.applied, 2, "b and c");
    let (doc, heads) = served(&docs).await;
    assert!(has(&doc, "a") && has(&doc, "b") && has(&doc, "c"));
    assert_eq!(heads, writer.get_heads());
    match tokio::time::timeout(Duration::from_secs(5), sub.events.recv()).await {
        Ok(Some(DocEvent::Changes(batch))) => assert_eq!(batch.heads, writer.get_heads()),
        other => panic!("expected the retried batch, got {other:?}"),
    }
    assert!(has(&stored(&memory).await, "c"));
}

#[tokio::test]
async fn a_full_disk_answers_507_then_503_until_it_recovers() {
    let Setup { docs, switch, .. } = setup();
    let mut writer = AutoCommit::new();
    write(&docs, edit(&mut writer, "a")).await.unwrap();
    switch.set(Fault::Full);
    let err = write(&docs, edit(&mut writer, "b")).await.unwrap_err();
    assert!(matches!(err, RelayError::InsufficientStorage(_)), "{err:?}");
    assert_eq!(err.status(), axum::http::StatusCode::INSUFFICIENT_STORAGE);
    let err = write(&docs, edit(&mut writer, "c")).await.unwrap_err();
    assert!(matches!(err, RelayError::StorageUnavailable(_)), "{err:?}");
    assert!(docs.store_health().refusing.is_some());
    switch.set(Fault::None);
    until_healthy(&docs).await;
    write(&docs, writer.save()).await.unwrap();
}

/// A write that hangs is given up on; the turn merged on top of it fails with it; after the
/// fault the document is reloaded from the store (the hung write landed after all) before the
/// next write.
#[tokio::test]
async fn a_wedged_write_fails_the_turn_merged_on_top_and_the_late_write_is_picked_up() {
    let (told, x, z) = a_write_lands_after_it_was_given_up_on(false).await;
    assert_eq!(told, vec![(x, 1), (z, 1)], "x when reloaded, then z");
}

/// With other nodes on the store, the reload's changes may be theirs: the subscriber still gets
/// x, the observer (which reports this node's own changes) only z.
#[tokio::test]
async fn with_other_nodes_the_late_write_is_pushed_but_not_reported() {
    let (told, _, z) = a_write_lands_after_it_was_given_up_on(true).await;
    assert_eq!(told, vec![(z, 1)]);
}

/// Other nodes, as far as the owner can tell: it acts as it does in a cluster, and nothing
/// arrives from them.
struct NoOtherNodes;

impl Cluster for NoOtherNodes {
    fn published(&self, _id: &DocId, _key: &ChunkKey, _bytes: bytes::Bytes) {}
    fn deleted(&self, _id: &DocId) {}
    fn watch(&self, _id: &DocId) -> Watching<'_> {
        Box::pin(std::future::ready(()))
    }
    fn unwatch(&self, _id: &DocId) {}
}

/// x's persist hangs, y merges on top of it, both fail; x lands once the store recovers, and
/// z is written after it. Returns what the observer was told, x's heads and the final heads.
async fn a_write_lands_after_it_was_given_up_on(
    other_nodes: bool,
) -> (
    Vec<(Vec<ChangeHash>, usize)>,
    Vec<ChangeHash>,
    Vec<ChangeHash>,
) {
    let Setup {
        docs,
        switch,
        memory,
    } = setup();
    if other_nodes {
        docs.join_cluster(Arc::new(NoOtherNodes));
    }
    let mut writer = AutoCommit::new();
    write(&docs, edit(&mut writer, "a")).await.unwrap();
    let durable_heads = served(&docs).await.1;
    let mut sub = docs.subscribe(&id(), 1, 16).await.unwrap();
    let told = Arc::new(Told::default());
    docs.observe(told.clone());

    switch.set(Fault::Hang);
    let mut x_writer = writer.fork();
    let x = edit(&mut x_writer, "x");
    let first = tokio::spawn({
        let docs = docs.clone();
        async move { write(&docs, x).await }
    });
    // Once its persist hangs, merge another write on top of it.
    until("the persist to hang", || switch.hung_appends() > 0).await;
    let mut y_writer = writer.fork();
    let second = write(&docs, edit(&mut y_writer, "y")).await;
    let first = first.await.unwrap();
    assert!(
        matches!(first, Err(RelayError::StorageUnavailable(_))),
        "{first:?}"
    );
    assert!(
        matches!(second, Err(RelayError::StorageUnavailable(_))),
        "{second:?}"
    );
    let (doc, heads) = served(&docs).await;
    assert_eq!(heads, durable_heads, "neither x nor y is served");
    assert!(!has(&doc, "x") && !has(&doc, "y"));
    assert_eq!(docs.store_health().stuck, 1);

    switch.set(Fault::None);
    until_healthy(&docs).await;
    assert!(has(&stored(&memory).await, "x"), "the hung write landed");
    write(&docs, edit(&mut writer, "z")).await.unwrap();
    let (doc, heads) = served(&docs).await;
    assert!(has(&doc, "a") && has(&doc, "x") && has(&doc, "z"));
    assert!(!has(&doc, "y"), "y was never stored");

    // The subscriber was pushed x when the reload found it, not only z: what it was sent
    // adds up to the document served.
    let (initial, _) = sub.initial.take().expect("the document existed");
    let mut seen = Automerge::load(&initial).unwrap();
    while seen.get_heads() != heads {
        match tokio::time::timeout(Duration::from_secs(5), sub.events.recv()).await {
            Ok(Some(DocEvent::Changes(batch))) => {
                seen.load_incremental(&batch.bytes).unwrap();
            }
            other => panic!(
                "the subscriber stopped at {:?} (x: {}), got {other:?}",
                seen.get_heads(),
                has(&seen, "x")
            ),
        }
    }
    assert!(seen.get_missing_deps(&[]).is_empty());
    let told = told.0.lock().unwrap().clone();
    (told, x_writer.get_heads(), heads)
}

#[tokio::test]
async fn a_repo_peer_gets_no_message_for_a_failed_turn() {
    let Setup { docs, switch, .. } = setup();
    let mut writer = AutoCommit::new();
    write(&docs, edit(&mut writer, "a")).await.unwrap();
    let (link, mut queue) = PeerLink::new(docs.next_conn_id(), 1 << 20);
    let mut peer = writer.fork();
    peer.put(ROOT, "from-peer", 1).unwrap();
    let mut state = sync::State::new();
    let message = peer
        .sync()
        .generate_sync_message(&mut state)
        .expect("a first message");
    let upload = parse_upload(peer.save().into()).unwrap();

    switch.set(Fault::Fail);
    let durable = docs
        .repo_sync(&id(), link, message, Some(upload), false)
        .await
        .expect("a receiver for changes");
    let result = tokio::time::timeout(Duration::from_secs(5), durable)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(result, Err(RelayError::StorageUnavailable(_))),
        "{result:?}"
    );
    // The turn has failed (its write was answered): anything for the peer is queued by now.
    let queued = tokio::time::timeout(Duration::from_millis(100), queue.recv()).await;
    assert!(
        queued.is_err(),
        "no sync message may claim changes that are not stored"
    );
    assert!(!has(&served(&docs).await.0, "from-peer"));
}
