//! The socket adapter for the automerge-repo protocol: `GET /` with a WebSocket upgrade.
//!
//! Thin by design: frames go into the sans-IO [`Connection`], its actions go to the socket,
//! the document owners ([`Documents::repo_sync`]) or the [`Hub`]. Validation of uploaded
//! changes happens here, off the document owner. The peer's outbound queue is bounded in bytes
//! (`--max-peer-queue`, counted until the socket has written each message): a peer whose sync
//! messages no longer fit is closed with 4008 at once, so it reconnects and resyncs; a newer
//! socket of the same peer closes this one with 1000. Ephemeral messages are relayed only from a
//! peer that syncs the document on this connection, and only up to `--max-ephemeral`: anyone
//! else's, or larger ones, would let one client flood every peer of any document it can name.
//! Keepalive, the message rate, slow sends and shutdown belong to the shared socket loop; on
//! shutdown this socket first waits (briefly) for the changes it forwarded.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::response::Response;
use tokio_util::sync::CancellationToken;

use super::forwarded::Forwarded;
use super::hub::Hub;
use super::protocol::{Action, Connection};
use super::wire::RepoMessage;
use crate::auth::{Access, Principal, Refusal};
use crate::doc::{ConnId, Documents, Outgoing, PeerLink, PeerQueue, Queued};
use crate::id::DocId;
use crate::limits::ConnectionGuard;
use crate::state::AppState;
use crate::transport::caller::expires_at;
use crate::transport::close::{CLOSE_FELL_BEHIND, CLOSE_NORMAL};
use crate::transport::socket_loop::{Frame, Outbox, Session};
use crate::transport::upgrade::accept;
use crate::transport::validate::validate;
use crate::upload::UploadGate;

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
    outbound: PeerQueue,
    /// Largest ephemeral message relayed (`--max-ephemeral`).
    max_ephemeral: usize,
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
    Outgoing(Queued),
    /// A sync message did not fit in the peer's queue.
    FellBehind,
    Replaced,
}

impl RepoSocket {
    fn new(state: &AppState, principal: Principal) -> Self {
        let conn = state.docs.next_conn_id();
        let (link, outbound) = PeerLink::new(conn, state.limits.max_peer_queue);
        Self {
            hub: state.hub.clone(),
            docs: state.docs.clone(),
            conn,
            core: Connection::new(state.hub.server_id()),
            link,
            outbound,
            max_ephemeral: state.limits.max_ephemeral,
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
                Action::Ephemeral { doc, .. } if !self.synced.contains(&doc) => {
                    // Not a peer of the document: it could flood anyone's peers.
                    tracing::debug!(doc = %doc, "dropped an ephemeral message from a peer that does not sync the document");
                    crate::metrics::rejected("ephemeral_not_syncing");
                }
                Action::Ephemeral { doc, data, .. } if data.len() > self.max_ephemeral => {
                    tracing::debug!(doc = %doc, len = data.len(), "dropped an oversize ephemeral message");
                    crate::metrics::rejected("ephemeral_too_large");
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
                        data.into(),
                    );
                }
            }
        }
    }
}

impl Session for RepoSocket {
    type Event = RepoEvent;

    async fn next_event(&mut self, room: bool) -> Option<RepoEvent> {
        // Falling behind and being replaced are noticed even while a send is blocked.
        let fell_behind = self.outbound.fell_behind();
        tokio::select! {
            Some(queued) = self.outbound.recv(), if room => Some(RepoEvent::Outgoing(queued)),
            _ = fell_behind => Some(RepoEvent::FellBehind),
            _ = self.replaced.cancelled() => Some(RepoEvent::Replaced),
        }
    }

    fn on_event(&mut self, event: RepoEvent, out: &mut Outbox) {
        match event {
            RepoEvent::Outgoing(Queued { out: next, charge }) => {
                if let Some(msg) = self.core.outgoing(next) {
                    // The charge keeps the message counted until it is written.
                    out.send_holding(binary(&msg), charge);
                }
            }
            RepoEvent::FellBehind => {
                tracing::info!("closing a repo peer whose outbound queue overflowed");
                crate::metrics::rejected("fell_behind");
                // What still waits is of no use to a peer that will resync.
                out.close_now(CLOSE_FELL_BEHIND, "fell behind; reconnect to resync");
            }
            RepoEvent::Replaced => {
                // The peer syncs afresh on its new socket; what waits here is of no use (and
                // an old socket is often a dead one).
                out.close_now(CLOSE_NORMAL, "replaced by a newer connection of this peer");
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
