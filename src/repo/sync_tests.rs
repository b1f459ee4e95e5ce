//! The document owners' repo-sync side, driven without sockets: a real automerge peer
//! exchanges sync messages with the owner through the sans-IO protocol core. (Push
//! coalescing is tested with time passed in, in `exchange.rs`.)

use std::sync::Arc;
use std::time::Duration;

use automerge::sync::{self, SyncDoc};
use automerge::transaction::Transactable;
use automerge::{AutoCommit, ReadDoc, ROOT};

use super::protocol::{Action, Connection};
use super::wire::RepoMessage;
use crate::doc::{DocConfig, Documents, Outgoing, PeerLink, PeerQueue, Precondition, ReadOutcome};
use crate::id::DocId;
use crate::storage::MemoryStore;
use crate::upload::parse_upload;

struct Peer {
    doc: AutoCommit,
    state: sync::State,
    conn: Connection,
    link: PeerLink,
    rx: PeerQueue,
}

impl Peer {
    fn new(docs: &Documents, name: &str) -> Self {
        let (link, rx) = PeerLink::new(docs.next_conn_id(), 1 << 20);
        let mut conn = Connection::new("server");
        conn.receive(
            &RepoMessage::Join {
                sender_id: name.into(),
                peer_metadata: None,
                supported_protocol_versions: Some(vec!["1".into()]),
            }
            .encode(),
        );
        Peer {
            doc: AutoCommit::new(),
            state: sync::State::new(),
            conn,
            link,
            rx,
        }
    }

    /// Sends our next sync message (if any) the way the socket adapter would.
    async fn send(&mut self, docs: &Documents, id: &DocId, request: bool) -> bool {
        let Some(msg) = self.doc.sync().generate_sync_message(&mut self.state) else {
            return false;
        };
        let peer = self.conn.peer_id().unwrap().to_owned();
        let frame = if request {
            RepoMessage::Request {
                sender_id: peer,
                target_id: "server".into(),
                document_id: id.to_string(),
                data: msg.encode(),
            }
        } else {
            RepoMessage::Sync {
                sender_id: peer,
                target_id: "server".into(),
                document_id: id.to_string(),
                data: msg.encode(),
            }
        };
        for action in self.conn.receive(&frame.encode()) {
            if let Action::Sync {
                doc,
                message,
                changes,
                request,
            } = action
            {
                let upload = (!changes.is_empty()).then(|| parse_upload(changes.into()).unwrap());
                docs.repo_sync(&doc, self.link.clone(), message, upload, request)
                    .await;
            }
        }
        true
    }

    async fn next(&mut self) -> Outgoing {
        tokio::time::timeout(Duration::from_secs(5), self.rx.recv())
            .await
            .expect("no message from the owner")
            .expect("link closed")
            .out
    }

    /// Runs the exchange until neither side has anything more to say.
    async fn sync_with(&mut self, docs: &Documents, id: &DocId) {
        self.send(docs, id, false).await;
        loop {
            let out = match tokio::time::timeout(Duration::from_millis(300), self.rx.recv()).await {
                Ok(Some(queued)) => queued.out,
                _ => break,
            };
            if let Outgoing::Sync { data, .. } = out {
                let msg = sync::Message::decode(&data).unwrap();
                self.doc
                    .sync()
                    .receive_sync_message(&mut self.state, msg)
                    .unwrap();
                self.send(docs, id, false).await;
            }
        }
    }
}

fn docs() -> Documents {
    Documents::with_config(Arc::new(MemoryStore::new()), DocConfig::default())
}

async fn server_heads(docs: &Documents, id: &DocId) -> Vec<automerge::ChangeHash> {
    match docs.read(id, None).await.unwrap() {
        ReadOutcome::Found { mut heads, .. } => {
            heads.sort();
            heads
        }
        ReadOutcome::Missing => vec![],
    }
}

#[tokio::test]
async fn a_peer_creates_a_document_through_sync() {
    let docs = docs();
    let id = DocId::parse("3jBnkqtmACWf3kw8Kh3pSCFE3zVc").unwrap();
    let mut a = Peer::new(&docs, "a");
    a.doc.put(ROOT, "title", "from a").unwrap();
    a.sync_with(&docs, &id).await;
    let mut want = a.doc.get_heads();
    want.sort();
    assert_eq!(server_heads(&docs, &id).await, want);
    // The peer was told the server has everything (the acknowledgement).
    assert_eq!(
        a.state.their_heads.clone().map(|mut h| {
            h.sort();
            h
        }),
        Some(want)
    );
}

#[tokio::test]
async fn request_for_an_unknown_document_is_unavailable_then_served_when_it_appears() {
    let docs = docs();
    let id = DocId::parse("unknown-doc").unwrap();
    let mut b = Peer::new(&docs, "b");
    assert!(b.send(&docs, &id, true).await);
    assert_eq!(b.next().await, Outgoing::Unavailable { doc: id.clone() });
    assert!(matches!(
        docs.read(&id, None).await.unwrap(),
        ReadOutcome::Missing
    ));

    // Someone uploads it over HTTP: the peer that asked gets it pushed.
    let mut other = AutoCommit::new();
    other.put(ROOT, "late", 1).unwrap();
    let upload = parse_upload(other.save().into()).unwrap();
    docs.write(&id, upload, Precondition::None, None)
        .await
        .unwrap();
    let Outgoing::Sync { data, .. } = b.next().await else {
        panic!("expected a sync push")
    };
    b.doc
        .sync()
        .receive_sync_message(&mut b.state, sync::Message::decode(&data).unwrap())
        .unwrap();
    b.sync_with(&docs, &id).await;
    assert_eq!(
        b.doc.get(ROOT, "late").unwrap().map(|(v, _)| v.as_i64()),
        Some(Some(1))
    );
}

#[tokio::test]
async fn changes_from_one_peer_reach_the_others() {
    let docs = docs();
    let id = DocId::parse("shared").unwrap();
    let mut a = Peer::new(&docs, "a");
    let mut b = Peer::new(&docs, "b");
    a.doc.put(ROOT, "n", 1).unwrap();
    a.sync_with(&docs, &id).await;
    b.sync_with(&docs, &id).await;
    assert_eq!(b.doc.get_heads(), a.doc.get_heads());

    b.doc.put(ROOT, "n", 2).unwrap();
    b.sync_with(&docs, &id).await;
    // A hears about it without asking.
    let Outgoing::Sync { data, .. } = a.next().await else {
        panic!("expected a push")
    };
    a.doc
        .sync()
        .receive_sync_message(&mut a.state, sync::Message::decode(&data).unwrap())
        .unwrap();
    a.sync_with(&docs, &id).await;
    assert_eq!(a.doc.get_heads(), b.doc.get_heads());
    let v = a.doc.get(ROOT, "n").unwrap().map(|(v, _)| v.as_i64());
    assert_eq!(v, Some(Some(2)));
}
