//! SIGTERM while per-document WebSocket writers and automerge-repo peers are mid-flight: the
//! relay exits 0, and after a restart on the same data dir every change it acknowledged is
//! there — every head of a WebSocket ack, and every head the relay told a repo peer it has.
//! (Both documents start from one shared base, so every client edits the same root map.)

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use automerge::sync::{self, SyncDoc};
use automerge::transaction::Transactable;
use automerge::{AutoCommit, Automerge, ChangeHash, ROOT};
use automerge_relay::RepoMessage;
use common::Relay;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

/// Heads the relay acknowledged (ack messages) or advertised (sync messages) to a client.
type Seen = Arc<Mutex<Vec<ChangeHash>>>;

fn hex_heads(v: &serde_json::Value) -> Vec<ChangeHash> {
    v["heads"]
        .as_array()
        .map(|a| a.iter().filter_map(|h| h.as_str()?.parse().ok()).collect())
        .unwrap_or_default()
}

/// Sends a change every few milliseconds without waiting for acks (up to the relay's
/// pipelining) and records the heads of every ack, until the socket closes.
async fn ws_writer(url: String, base: Vec<u8>, n: usize, acked: Seen, acks: Arc<Mutex<usize>>) {
    let (ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connect");
    let (mut tx, mut rx) = ws.split();
    let mut doc = AutoCommit::load(&base).expect("base");
    let writer = tokio::spawn(async move {
        for i in 0.. {
            let heads = doc.get_heads();
            doc.put(ROOT, format!("ws-{n}"), i as i64).expect("put");
            if tx
                .send(Message::binary(doc.save_after(&heads)))
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    });
    while let Some(Ok(msg)) = rx.next().await {
        if let Message::Text(t) = msg {
            let v: serde_json::Value = serde_json::from_str(&t).expect("json");
            if v["type"] == "ack" {
                acked.lock().unwrap().extend(hex_heads(&v));
                *acks.lock().unwrap() += 1;
            }
        }
    }
    writer.abort();
}

/// An automerge-repo peer editing its own key and answering every message at once; records
/// the heads of every sync message the relay sends it, until the socket closes.
async fn repo_peer(
    url: String,
    base: Vec<u8>,
    document_id: String,
    n: usize,
    seen: Seen,
    heard: Arc<Mutex<usize>>,
) {
    let (ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connect");
    let (mut tx, mut rx) = ws.split();
    let me = format!("shutdown-peer-{n}");
    let join = RepoMessage::Join {
        sender_id: me.clone(),
        peer_metadata: None,
        supported_protocol_versions: Some(vec!["1".into()]),
    };
    tx.send(Message::binary(join.encode())).await.expect("join");
    let mut server = None;
    let mut doc = Automerge::load(&base).expect("base");
    let mut state = sync::State::new();
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    let mut i = 0i64;
    loop {
        tokio::select! {
            frame = rx.next() => {
                let Some(Ok(Message::Binary(bytes))) = frame else {
                    if matches!(frame, Some(Ok(_))) { continue; }
                    return;
                };
                match RepoMessage::decode(&bytes) {
                    Ok(RepoMessage::Peer { sender_id, .. }) => server = Some(sender_id),
                    Ok(RepoMessage::Sync { data, .. }) => {
                        let message = sync::Message::decode(&data).expect("sync message");
                        seen.lock().unwrap().extend(message.heads.iter().copied());
                        *heard.lock().unwrap() += 1;
                        doc.receive_sync_message(&mut state, message).expect("receive");
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            _ = tick.tick() => {
                if server.is_some() {
                    let mut t = doc.transaction();
                    t.put(ROOT, format!("peer-{n}"), i).expect("put");
                    t.commit();
                    i += 1;
                }
            }
        }
        let Some(target) = server.clone() else {
            continue;
        };
        if let Some(msg) = doc.generate_sync_message(&mut state) {
            let frame = RepoMessage::Sync {
                sender_id: me.clone(),
                target_id: target,
                document_id: document_id.clone(),
                data: msg.encode(),
            };
            if tx.send(Message::binary(frame.encode())).await.is_err() {
                return;
            }
        }
    }
}

async fn stored(relay: &Relay, id: &str) -> Automerge {
    let body = reqwest::get(relay.url(&format!("/{id}")))
        .await
        .expect("get")
        .bytes()
        .await
        .expect("body");
    Automerge::load(&body).expect("stored document loads")
}

/// The heads `doc` does not have.
fn missing(doc: &Automerge, heads: &[ChangeHash]) -> Vec<ChangeHash> {
    heads
        .iter()
        .filter(|h| doc.get_change_meta_by_hash(h).is_none())
        .copied()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_flight_loses_no_acknowledged_change_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(dir.path());
    let ws_doc = "shutdown-ws";
    let repo_doc = bs58::encode(*b"shutdown-repo-id")
        .with_check()
        .into_string();
    let mut base = AutoCommit::new();
    base.put(ROOT, "base", 1).unwrap();
    let base = base.save();
    for id in [ws_doc, repo_doc.as_str()] {
        let posted = reqwest::Client::new()
            .post(relay.url(&format!("/{id}")))
            .body(base.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(posted.status(), 201);
    }

    let acked: Seen = Arc::default();
    let seen: Seen = Arc::default();
    let acks = Arc::new(Mutex::new(0usize));
    let heard = Arc::new(Mutex::new(0usize));
    let mut clients = Vec::new();
    for n in 0..3 {
        let url = relay.ws_url(&format!("/{ws_doc}"));
        clients.push(tokio::spawn(ws_writer(
            url,
            base.clone(),
            n,
            acked.clone(),
            acks.clone(),
        )));
    }
    for n in 0..2 {
        let url = relay.ws_url("/");
        clients.push(tokio::spawn(repo_peer(
            url,
            base.clone(),
            repo_doc.clone(),
            n,
            seen.clone(),
            heard.clone(),
        )));
    }
    // Terminate once traffic flows on both interfaces.
    let deadline = Instant::now() + Duration::from_secs(30);
    while *acks.lock().unwrap() < 30 || *heard.lock().unwrap() < 30 {
        assert!(Instant::now() < deadline, "no traffic");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let code = tokio::task::block_in_place(|| relay.terminate());
    assert_eq!(code, Some(0), "SIGTERM exits 0");
    for c in clients {
        tokio::time::timeout(Duration::from_secs(10), c)
            .await
            .expect("clients end when their sockets close")
            .expect("client task");
    }

    relay.restart();
    let ws_stored = stored(&relay, ws_doc).await;
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 30);
    let lost = missing(&ws_stored, &acked);
    assert!(
        lost.is_empty(),
        "acknowledged WebSocket changes lost: {lost:?}"
    );
    let repo_stored = stored(&relay, &repo_doc).await;
    let lost = missing(&repo_stored, &seen.lock().unwrap());
    assert!(
        lost.is_empty(),
        "changes the relay told repo peers it had were lost: {lost:?}"
    );
}
