//! The sans-IO core of one automerge-repo connection: fed decoded frames, it returns what to
//! send and what to ask of the documents. No sockets, no tasks — tested directly.
//!
//! It owns the handshake (join → peer, or error + close for unsupported versions), checks that
//! messages come from the peer that joined, turns `sync`/`request` into work for the document
//! owner (with the sync message's changes split out so they are validated off the owner and
//! merged in its batch), and turns `ephemeral` into relay work. Per-document sync states live
//! with the document owner, because generating a sync message needs the document.

use automerge::sync;

use super::wire::{PeerMetadata, RepoMessage};
use crate::doc::Outgoing;
use crate::id::DocId;

/// The only protocol version spoken.
pub const PROTOCOL_VERSION: &str = "1";
/// Close code after a protocol violation (WebSocket 1002, "protocol error").
pub const CLOSE_PROTOCOL: u16 = 1002;

/// What the adapter must do.
#[derive(Debug)]
pub enum Action {
    /// Send this message.
    Send(RepoMessage),
    /// Close the socket with this code after sending what came before.
    Close { code: u16, reason: String },
    /// The peer completed the handshake (a reconnect replaces an older socket of this peer).
    Joined { peer_id: String },
    /// Sync work for a document: `changes` (joined chunks, possibly empty) were split out of
    /// `message` and still need validating.
    Sync {
        doc: DocId,
        message: sync::Message,
        changes: Vec<u8>,
        request: bool,
    },
    /// Relay this ephemeral message to the document's other peers.
    Ephemeral {
        doc: DocId,
        sender_id: String,
        session_id: String,
        count: u64,
        data: Vec<u8>,
    },
}

/// One connection's protocol state.
#[derive(Debug)]
pub struct Connection {
    server_id: String,
    peer: Option<String>,
}

impl Connection {
    pub fn new(server_id: impl Into<String>) -> Self {
        Self {
            server_id: server_id.into(),
            peer: None,
        }
    }

    /// The peer id, once joined.
    pub fn peer_id(&self) -> Option<&str> {
        self.peer.as_deref()
    }

    fn error(&self, message: impl Into<String>) -> RepoMessage {
        RepoMessage::Error {
            sender_id: Some(self.server_id.clone()),
            target_id: self.peer.clone(),
            message: message.into(),
        }
    }

    /// Handles one binary frame.
    pub fn receive(&mut self, frame: &[u8]) -> Vec<Action> {
        let msg = match RepoMessage::decode(frame) {
            Ok(m) => m,
            Err(e) => return self.reject(format!("cannot decode message: {e}")),
        };
        if let RepoMessage::Join {
            sender_id,
            supported_protocol_versions,
            ..
        } = &msg
        {
            let speaks_ours = supported_protocol_versions
                .as_ref()
                .is_none_or(|v| v.iter().any(|v| v == PROTOCOL_VERSION));
            if !speaks_ours {
                return vec![
                    Action::Send(self.error("unsupported protocol version")),
                    Action::Close {
                        code: CLOSE_PROTOCOL,
                        reason: "unsupported protocol version".into(),
                    },
                ];
            }
            self.peer = Some(sender_id.clone());
            return vec![
                Action::Send(RepoMessage::Peer {
                    sender_id: self.server_id.clone(),
                    target_id: sender_id.clone(),
                    peer_metadata: Some(PeerMetadata {
                        storage_id: None,
                        is_ephemeral: false,
                    }),
                    selected_protocol_version: PROTOCOL_VERSION.into(),
                }),
                Action::Joined {
                    peer_id: sender_id.clone(),
                },
            ];
        }
        let Some(peer) = self.peer.as_deref() else {
            return vec![
                Action::Send(self.error("send join first")),
                Action::Close {
                    code: CLOSE_PROTOCOL,
                    reason: "message before join".into(),
                },
            ];
        };
        let sender = match &msg {
            RepoMessage::Sync { sender_id, .. }
            | RepoMessage::Request { sender_id, .. }
            | RepoMessage::DocUnavailable { sender_id, .. }
            | RepoMessage::Ephemeral { sender_id, .. }
            | RepoMessage::Peer { sender_id, .. } => Some(sender_id.as_str()),
            RepoMessage::Ignored { sender_id, .. } | RepoMessage::Error { sender_id, .. } => {
                sender_id.as_deref()
            }
            RepoMessage::Join { .. } => None,
        };
        // Like the reference server: only the peer that joined on this socket speaks on it.
        // (Clients re-forward relayed ephemerals under the original sender's id; those echoes
        // end here.)
        if sender.is_some_and(|s| s != peer) {
            tracing::debug!(peer, ?sender, kind = msg.kind(), "dropping a message from another sender id");
            return Vec::new();
        }
        match msg {
            RepoMessage::Sync {
                document_id, data, ..
            } => self.sync(document_id, &data, false),
            RepoMessage::Request {
                document_id, data, ..
            } => self.sync(document_id, &data, true),
            RepoMessage::Ephemeral {
                sender_id,
                document_id,
                session_id,
                count,
                data,
                ..
            } => match DocId::parse(&document_id) {
                Ok(doc) => vec![Action::Ephemeral {
                    doc,
                    sender_id,
                    session_id,
                    count,
                    data,
                }],
                Err(e) => vec![Action::Send(self.error(e.to_string()))],
            },
            // We never request documents, so there is nothing to learn from these.
            RepoMessage::DocUnavailable { .. }
            | RepoMessage::Ignored { .. }
            | RepoMessage::Peer { .. }
            | RepoMessage::Error { .. }
            | RepoMessage::Join { .. } => Vec::new(),
        }
    }

    fn reject(&self, why: String) -> Vec<Action> {
        tracing::debug!(peer = ?self.peer, %why, "bad repo message");
        let mut out = vec![Action::Send(self.error(why))];
        if self.peer.is_none() {
            out.push(Action::Close {
                code: CLOSE_PROTOCOL,
                reason: "bad handshake".into(),
            });
        }
        out
    }

    fn sync(&self, document_id: String, data: &[u8], request: bool) -> Vec<Action> {
        let doc = match DocId::parse(&document_id) {
            Ok(d) => d,
            Err(e) => return self.reject(e.to_string()),
        };
        let mut message = match sync::Message::decode(data) {
            Ok(m) => m,
            Err(e) => return self.reject(format!("invalid sync message for {doc}: {e}")),
        };
        let mut changes = Vec::new();
        for chunk in message.changes.iter() {
            changes.extend_from_slice(chunk);
        }
        message.changes = sync::ChunkList::empty();
        vec![Action::Sync {
            doc,
            message,
            changes,
            request,
        }]
    }

    /// The frame for something the documents want this peer to have (`None` before join).
    pub fn outgoing(&self, out: Outgoing) -> Option<RepoMessage> {
        let target_id = self.peer.clone()?;
        let sender_id = self.server_id.clone();
        Some(match out {
            Outgoing::Sync { doc, data } => RepoMessage::Sync {
                sender_id,
                target_id,
                document_id: doc.to_string(),
                data,
            },
            Outgoing::Unavailable { doc } => RepoMessage::DocUnavailable {
                sender_id,
                target_id,
                document_id: doc.to_string(),
            },
            Outgoing::Ephemeral {
                doc,
                sender_id,
                session_id,
                count,
                data,
            } => RepoMessage::Ephemeral {
                sender_id,
                target_id,
                document_id: doc.to_string(),
                session_id,
                count,
                data,
            },
        })
    }
}

/// Drops repeated ephemeral messages: per (sender, session) only a strictly higher `count`
/// passes. Without it, every relayed message would bounce between clients forever (clients
/// re-forward what they receive).
#[derive(Debug, Default)]
pub struct EphemeralFilter {
    last: std::collections::HashMap<(String, String), u64>,
}

impl EphemeralFilter {
    pub fn admit(&mut self, sender: &str, session: &str, count: u64) -> bool {
        let key = (sender.to_owned(), session.to_owned());
        match self.last.get(&key) {
            Some(&seen) if count <= seen => false,
            _ => {
                self.last.insert(key, count);
                true
            }
        }
    }

    /// Forget a peer's sessions when it disconnects (keeps the table bounded).
    pub fn forget(&mut self, sender: &str) {
        self.last.retain(|(s, _), _| s != sender);
    }

    pub fn len(&self) -> usize {
        self.last.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }
}
