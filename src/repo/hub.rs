//! State shared by all automerge-repo connections: which socket belongs to which peer id
//! (a reconnect replaces the old socket), which connections sync which document (ephemeral
//! relay), and the ephemeral dedupe table.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;
use dashmap::DashMap;
use tokio_util::sync::CancellationToken;

use super::protocol::EphemeralFilter;
use crate::doc::{ConnId, Outgoing, PeerLink};
use crate::id::DocId;

pub struct Hub {
    server_id: String,
    peers: DashMap<String, (ConnId, CancellationToken)>,
    doc_peers: DashMap<DocId, HashMap<ConnId, PeerLink>>,
    ephemeral: Mutex<EphemeralFilter>,
}

impl Hub {
    pub fn new(server_id: impl Into<String>) -> Self {
        Self {
            server_id: server_id.into(),
            peers: DashMap::new(),
            doc_peers: DashMap::new(),
            ephemeral: Mutex::new(EphemeralFilter::default()),
        }
    }

    pub fn server_id(&self) -> &str {
        &self.server_id
    }

    /// Registers `conn` as `peer_id`'s socket, closing an older socket of the same peer.
    pub fn joined(&self, peer_id: &str, conn: ConnId, close: CancellationToken) {
        if let Some((old, token)) = self.peers.insert(peer_id.to_owned(), (conn, close)) {
            if old != conn {
                tracing::debug!(
                    peer_id,
                    old,
                    conn,
                    "peer reconnected; closing its old socket"
                );
                token.cancel();
            }
        }
    }

    /// Records that `link` syncs `doc` (it then receives the document's ephemeral messages).
    pub fn syncing(&self, doc: &DocId, link: &PeerLink) {
        self.doc_peers
            .entry(doc.clone())
            .or_default()
            .entry(link.conn)
            .or_insert_with(|| link.clone());
    }

    /// Relays an ephemeral message to the document's other peers (a repeat is dropped). The
    /// data is shared by every recipient's queue, not copied into each.
    pub fn relay_ephemeral(
        &self,
        from: ConnId,
        doc: &DocId,
        sender_id: &str,
        session_id: &str,
        count: u64,
        data: Bytes,
    ) {
        let fresh = match self.ephemeral.lock() {
            Ok(mut f) => f.admit(sender_id, session_id, count),
            Err(_) => false,
        };
        if !fresh {
            return;
        }
        if let Some(peers) = self.doc_peers.get(doc) {
            for (conn, link) in peers.iter() {
                if *conn != from {
                    link.offer(Outgoing::Ephemeral {
                        doc: doc.clone(),
                        sender_id: sender_id.to_owned(),
                        session_id: session_id.to_owned(),
                        count,
                        data: data.clone(),
                    });
                }
            }
        }
    }

    /// Forgets a closed connection.
    pub fn left(&self, conn: ConnId, peer_id: Option<&str>, docs: &[DocId]) {
        for doc in docs {
            let empty = self
                .doc_peers
                .get_mut(doc)
                .map(|mut peers| {
                    peers.remove(&conn);
                    peers.is_empty()
                })
                .unwrap_or(false);
            if empty {
                self.doc_peers.remove_if(doc, |_, peers| peers.is_empty());
            }
        }
        if let Some(peer_id) = peer_id {
            let removed = self.peers.remove_if(peer_id, |_, (c, _)| *c == conn);
            if removed.is_some() {
                if let Ok(mut f) = self.ephemeral.lock() {
                    f.forget(peer_id);
                }
            }
        }
    }

    /// Connected repo peers.
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }
}
