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

/// Close code after a protocol violation (WebSocket 1002, "protocol error": bad handshake,
/// unsupported version).
pub const CLOSE_PROTOCOL: u16 = 1002;

/// The only protocol version spoken.
pub const PROTOCOL_VERSION: &str = "1";

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
            tracing::debug!(
                peer,
                ?sender,
                kind = msg.kind(),
                "dropping a message from another sender id"
            );
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
        // Guarded like upload validation: automerge's decoder can panic on malformed input.
        let decoded = std::panic::catch_unwind(|| sync::Message::decode(data));
        let mut message = match decoded {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => return self.reject(format!("invalid sync message for {doc}: {e}")),
            Err(_) => return self.reject(format!("malformed sync message for {doc}")),
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
                data: data.to_vec(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::wire::RepoMessage;

    fn fixture(name: &str) -> Vec<u8> {
        let p = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/repo-protocol")
            .join(name);
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    fn join(conn: &mut Connection, peer: &str) {
        let frame = RepoMessage::Join {
            sender_id: peer.into(),
            peer_metadata: None,
            supported_protocol_versions: Some(vec!["1".into()]),
        }
        .encode();
        conn.receive(&frame);
    }

    fn sync_frame(sender: &str, doc: &str, data: Vec<u8>, request: bool) -> Vec<u8> {
        let (sender_id, target_id, document_id) = (sender.into(), "server".into(), doc.into());
        if request {
            RepoMessage::Request {
                sender_id,
                target_id,
                document_id,
                data,
            }
        } else {
            RepoMessage::Sync {
                sender_id,
                target_id,
                document_id,
                data,
            }
        }
        .encode()
    }

    #[test]
    fn a_real_join_is_answered_with_peer_at_once() {
        let mut conn = Connection::new("server");
        let actions = conn.receive(&fixture("captured-join-1.cbor"));
        let RepoMessage::Join { sender_id, .. } =
            RepoMessage::decode(&fixture("captured-join-1.cbor")).unwrap()
        else {
            unreachable!()
        };
        match &actions[..] {
            [Action::Send(RepoMessage::Peer {
                sender_id: server,
                target_id,
                selected_protocol_version,
                ..
            }), Action::Joined { peer_id }] => {
                assert_eq!(server, "server");
                assert_eq!(target_id, &sender_id);
                assert_eq!(peer_id, &sender_id);
                assert_eq!(selected_protocol_version, "1");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(conn.peer_id(), Some(sender_id.as_str()));
    }

    #[test]
    fn join_without_versions_means_version_one() {
        let mut conn = Connection::new("server");
        let frame = RepoMessage::Join {
            sender_id: "p".into(),
            peer_metadata: None,
            supported_protocol_versions: None,
        }
        .encode();
        assert!(matches!(
            conn.receive(&frame)[0],
            Action::Send(RepoMessage::Peer { .. })
        ));
    }

    #[test]
    fn unsupported_version_gets_error_and_close() {
        let mut conn = Connection::new("server");
        let frame = RepoMessage::Join {
            sender_id: "p".into(),
            peer_metadata: None,
            supported_protocol_versions: Some(vec!["2".into()]),
        }
        .encode();
        let actions = conn.receive(&frame);
        assert!(
            matches!(&actions[0], Action::Send(RepoMessage::Error { message, .. }) if message.contains("unsupported"))
        );
        assert!(matches!(
            actions[1],
            Action::Close {
                code: CLOSE_PROTOCOL,
                ..
            }
        ));
        assert_eq!(conn.peer_id(), None);
    }

    #[test]
    fn messages_before_join_are_refused() {
        let mut conn = Connection::new("server");
        let actions = conn.receive(&fixture("captured-sync-1.cbor"));
        assert!(matches!(
            actions[0],
            Action::Send(RepoMessage::Error { .. })
        ));
        assert!(matches!(actions[1], Action::Close { .. }));
    }

    #[test]
    fn garbage_after_join_gets_an_error_and_keeps_the_connection() {
        let mut conn = Connection::new("server");
        join(&mut conn, "p");
        let actions = conn.receive(b"\x00\x01 not cbor");
        assert_eq!(actions.len(), 1);
        assert!(matches!(
            actions[0],
            Action::Send(RepoMessage::Error { .. })
        ));
        // A sync whose data is not a sync message, and a bad document id.
        let actions = conn.receive(&sync_frame(
            "p",
            "3jBnkqtmACWf3kw8Kh3pSCFE3zVc",
            vec![1, 2, 3],
            false,
        ));
        assert!(matches!(
            actions[..],
            [Action::Send(RepoMessage::Error { .. })]
        ));
        let actions = conn.receive(&sync_frame("p", "../etc", vec![0x42], false));
        assert!(matches!(
            actions[..],
            [Action::Send(RepoMessage::Error { .. })]
        ));
    }

    #[test]
    fn sync_splits_out_the_changes() {
        let mut conn = Connection::new("server");
        let RepoMessage::Sync {
            sender_id,
            document_id,
            data,
            ..
        } = RepoMessage::decode(&fixture("captured-sync-3.cbor")).unwrap()
        else {
            panic!("captured-sync-3 is a sync")
        };
        join(&mut conn, &sender_id);
        let actions = conn.receive(&sync_frame(&sender_id, &document_id, data, false));
        let [Action::Sync {
            doc,
            message,
            changes,
            request: false,
        }] = &actions[..]
        else {
            panic!("{actions:?}")
        };
        assert_eq!(doc.as_str(), document_id);
        assert!(message.changes.is_empty());
        assert!(
            !changes.is_empty(),
            "the captured upload carries a document"
        );
        let upload = crate::upload::parse_upload(changes.clone().into()).unwrap();
        assert!(upload.change_count() > 0);
    }

    #[test]
    fn request_and_ignored_types() {
        let mut conn = Connection::new("server");
        let RepoMessage::Request {
            sender_id,
            document_id,
            data,
            ..
        } = RepoMessage::decode(&fixture("captured-request-2.cbor")).unwrap()
        else {
            panic!("captured-request-2 is a request")
        };
        join(&mut conn, &sender_id);
        let actions = conn.receive(&sync_frame(&sender_id, &document_id, data, true));
        assert!(matches!(actions[..], [Action::Sync { request: true, .. }]));
        for name in [
            "synthetic-leave.cbor",
            "synthetic-remote-heads-changed.cbor",
            "synthetic-remote-subscription-change.cbor",
        ] {
            let mut c = Connection::new("server");
            let sender = match RepoMessage::decode(&fixture(name)).unwrap() {
                RepoMessage::Ignored { sender_id, .. } => sender_id.unwrap_or_default(),
                other => panic!("{name}: {other:?}"),
            };
            join(&mut c, &sender);
            assert!(c.receive(&fixture(name)).is_empty(), "{name}");
        }
    }

    #[test]
    fn messages_from_another_sender_are_dropped() {
        let mut conn = Connection::new("server");
        join(&mut conn, "alice");
        let frame = sync_frame("mallory", "3jBnkqtmACWf3kw8Kh3pSCFE3zVc", vec![0x42], false);
        assert!(conn.receive(&frame).is_empty());
    }

    #[test]
    fn ephemeral_is_relayed_and_retargeted() {
        let mut conn = Connection::new("server");
        let RepoMessage::Ephemeral {
            sender_id,
            session_id,
            count,
            data,
            document_id,
            ..
        } = RepoMessage::decode(&fixture("captured-ephemeral-1.cbor")).unwrap()
        else {
            panic!("captured-ephemeral-1 is ephemeral")
        };
        join(&mut conn, &sender_id);
        let actions = conn.receive(&fixture("captured-ephemeral-1.cbor"));
        let [Action::Ephemeral { doc, .. }] = &actions[..] else {
            panic!("{actions:?}")
        };
        assert_eq!(doc.as_str(), document_id);

        // What another connection sends on: same sender, session, count and data; its own target.
        let mut other = Connection::new("server");
        join(&mut other, "bob");
        let out = other
            .outgoing(Outgoing::Ephemeral {
                doc: doc.clone(),
                sender_id: sender_id.clone(),
                session_id: session_id.clone(),
                count,
                data: data.clone().into(),
            })
            .unwrap();
        assert_eq!(
            out,
            RepoMessage::Ephemeral {
                sender_id,
                target_id: "bob".into(),
                document_id,
                session_id,
                count,
                data,
            }
        );
    }

    #[test]
    fn ephemeral_filter_drops_repeats_and_forgets() {
        let mut f = EphemeralFilter::default();
        assert!(f.admit("a", "s", 1));
        assert!(!f.admit("a", "s", 1), "echo of the same message");
        assert!(!f.admit("a", "s", 0));
        assert!(f.admit("a", "s", 2));
        assert!(f.admit("a", "t", 1), "another session");
        assert!(f.admit("b", "s", 1), "another sender");
        f.forget("a");
        assert_eq!(f.len(), 1);
    }

    #[test]
    fn outgoing_needs_a_joined_peer() {
        let conn = Connection::new("server");
        let doc = DocId::parse("d").unwrap();
        assert!(conn.outgoing(Outgoing::Unavailable { doc }).is_none());
    }
}
