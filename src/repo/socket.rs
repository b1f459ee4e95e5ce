//! The socket adapter for the automerge-repo protocol: `GET /` with a WebSocket upgrade.
//!
//! Thin by design: frames go into the sans-IO [`Connection`], its actions go to the socket,
//! the document owners ([`Documents::repo_sync`]) or the [`Hub`]. Validation of uploaded
//! changes happens here, off the document owner. A peer that cannot keep up with its outbound
//! queue is closed with 4008 so it reconnects and resyncs; a newer socket of the same peer
//! closes this one with 1000. Keepalive, the message rate and shutdown belong to the shared
//! socket loop; on shutdown this socket first waits (briefly) for the changes it forwarded.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::response::Response;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::forwarded::Forwarded;
use super::hub::Hub;
use super::protocol::{Action, Connection};
use super::wire::RepoMessage;
use crate::auth::{Access, Principal, Refusal};
use crate::doc::{ConnId, Documents, Outgoing, PeerLink};
use crate::id::DocId;
use crate::limits::ConnectionGuard;
use crate::state::AppState;
use crate::transport::caller::expires_at;
use crate::transport::close::{CLOSE_FELL_BEHIND, CLOSE_NORMAL};
use crate::transport::socket_loop::{Frame, Outbox, Session};
use crate::transport::upgrade::accept;
use crate::transport::validate::validate;
use crate::upload::UploadGate;

/// Messages that may wait for one repo peer.
const OUTBOUND_QUEUE: usize = 4096;
/// How long shutdown waits for this socket's forwarded changes to become durable.
const FORWARDED_WAIT: Duration = Duration::from_secs(3);

/// Upgrades an authenticated peer; each document's grant is checked per message, and the
/// socket closes (4401) when the peer's token expires.
pub fn upgrade(
    ws: WebSocketUpgrade,
    state: AppState,
    slot: ConnectionGuard,
    principal: Principal,
) -> Response {
    let expires_at = expires_at(&principal);
    let span = tracing::info_span!(
        "repo_socket",
        conn = tracing::field::Empty,
        peer = tracing::field::Empty,
        caller = %principal.name,
    );
    let session = RepoSocket::new(&state, principal);
    span.record("conn", session.conn);
    accept(ws, &state, slot, span, expires_at, session)
}

/// One repo peer's socket.
struct RepoSocket {
    hub: Arc<Hub>,
    docs: Documents,
    conn: ConnId,
    core: Connection,
    /// The owners' way back to this peer, and its receiving end.
    link: PeerLink,
    outbound: mpsc::Receiver<Outgoing>,
    /// Cancelled when a newer socket of the same peer joins.
    replaced: CancellationToken,
    /// Documents this peer synced (detached when the socket ends).
    synced: HashSet<DocId>,
    forwarded: Forwarded,
    /// The peer's grants.
    principal: Principal,
    uploads: Arc<UploadGate>,
}

/// What the server side has for a repo peer.
enum RepoEvent {
    Outgoing(Outgoing),
    Replaced,
}

impl RepoSocket {
    fn new(state: &AppState, principal: Principal) -> Self {
        let conn = state.docs.next_conn_id();
        let (tx, outbound) = mpsc::channel(OUTBOUND_QUEUE);
        Self {
            hub: state.hub.clone(),
            docs: state.docs.clone(),
            conn,
            core: Connection::new(state.hub.server_id()),
            link: PeerLink {
                conn,
                tx,
                overflow: Arc::new(AtomicBool::new(false)),
            },
            outbound,
            replaced: CancellationToken::new(),
            synced: HashSet::new(),
            forwarded: Forwarded::default(),
            principal,
            uploads: state.uploads.clone(),
        }
    }

    /// Carries out the protocol's actions for one frame, in order, until one closes.
    async fn act(&mut self, actions: Vec<Action>, out: &mut Outbox) {
        for action in actions {
            match action {
                Action::Send(msg) => out.send(binary(&msg)),
                Action::Close { code, reason } => return out.close(code, reason),
                Action::Joined { peer_id } => {
                    tracing::Span::current().record("peer", peer_id.as_str());
                    self.hub.joined(&peer_id, self.conn, self.replaced.clone());
                }
                Action::Sync {
                    doc,
                    message,
                    mut changes,
                    request,
                } => {
                    match self.principal.access(doc.as_str()) {
                        None => {
                            // Outside its read grants: as if the document did not exist.
                            Refusal::Forbidden.count();
                            if let Some(msg) = self.core.outgoing(Outgoing::Unavailable { doc }) {
                                out.send(binary(&msg));
                            }
                            continue;
                        }
                        Some(Access::Read) if !changes.is_empty() => {
                            // A read-only peer keeps syncing, but its changes are never applied.
                            Refusal::Forbidden.count();
                            tracing::debug!(doc = %doc, "dropped changes from a read-only peer");
                            changes.clear();
                        }
                        Some(_) => {}
                    }
                    let upload = if changes.is_empty() {
                        None
                    } else {
                        match validate(&self.uploads, &self.docs, &doc, changes.into()).await {
                            Ok(upload) => Some(upload),
                            Err(e) => {
                                let reply = RepoMessage::Error {
                                    sender_id: Some(self.hub.server_id().to_owned()),
                                    target_id: self.core.peer_id().map(str::to_owned),
                                    message: format!("rejected changes for {doc}: {e}"),
                                };
                                out.send(binary(&reply));
                                continue;
                            }
                        }
                    };
                    self.hub.syncing(&doc, &self.link);
                    self.synced.insert(doc.clone());
                    let link = self.link.clone();
                    let sent = self.docs.repo_sync(&doc, link, message, upload, request);
                    if let Some(durable) = sent.await {
                        self.forwarded.push(durable);
                    }
                }
                Action::Ephemeral { doc, .. }
                    if !self.principal.may(doc.as_str(), Access::Read) =>
                {
                    Refusal::Forbidden.count();
                }
                Action::Ephemeral {
                    doc,
                    sender_id,
                    session_id,
                    count,
                    data,
                } => {
                    self.hub.relay_ephemeral(
                        self.conn,
                        &doc,
                        &sender_id,
                        &session_id,
                        count,
                        &data,
                    );
                }
            }
        }
    }
}

impl Session for RepoSocket {
    type Event = RepoEvent;

    async fn next_event(&mut self) -> Option<RepoEvent> {
        tokio::select! {
            Some(out) = self.outbound.recv() => Some(RepoEvent::Outgoing(out)),
            _ = self.replaced.cancelled() => Some(RepoEvent::Replaced),
        }
    }

    fn on_event(&mut self, event: RepoEvent, out: &mut Outbox) {
        match event {
            RepoEvent::Outgoing(_) if self.link.overflow.load(Ordering::Acquire) => {
                out.close(CLOSE_FELL_BEHIND, "fell behind; reconnect to resync");
            }
            RepoEvent::Outgoing(next) => {
                if let Some(msg) = self.core.outgoing(next) {
                    out.send(binary(&msg));
                }
            }
            RepoEvent::Replaced => {
                out.close(CLOSE_NORMAL, "replaced by a newer connection of this peer");
            }
        }
    }

    async fn on_frame(&mut self, frame: Frame, out: &mut Outbox) {
        let actions = match frame {
            Frame::Binary(bytes) => self.core.receive(&bytes),
            Frame::Text => self.core.receive(&[]),
        };
        self.act(actions, out).await;
    }

    async fn drain(&mut self) {
        self.forwarded.wait(FORWARDED_WAIT).await;
    }

    async fn finish(&mut self) {
        let synced: Vec<DocId> = self.synced.drain().collect();
        self.hub.left(self.conn, self.core.peer_id(), &synced);
        for doc in &synced {
            self.docs.repo_detach(doc, self.conn).await;
        }
    }
}

fn binary(msg: &RepoMessage) -> Message {
    Message::Binary(msg.encode().into())
}
