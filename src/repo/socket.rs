//! The socket adapter for the automerge-repo protocol: `GET /` with a WebSocket upgrade.
//!
//! Thin by design: frames go into the sans-IO [`Connection`], its actions go to the socket,
//! the document owners ([`Documents::repo_sync`]) or the [`Hub`]. Validation of uploaded
//! changes happens here, off the document owner. Keepalive pings every `--ping-secs`; a peer
//! that misses two is dropped. A peer that cannot keep up with its outbound queue is closed
//! with 4008 so it reconnects and resyncs.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::hub::Hub;
use super::protocol::{Action, Connection};
use super::wire::RepoMessage;
use crate::doc::{Documents, PeerLink};
use crate::id::DocId;
use crate::limits::{ConnectionGuard, RateLimit};
use crate::state::AppState;
use crate::transport::close::{
    close_message, CLOSE_FELL_BEHIND, CLOSE_GOING_AWAY, CLOSE_NORMAL, CLOSE_RATE_LIMIT,
    CLOSE_TOO_BIG,
};
use crate::transport::keepalive::Keepalive;
use crate::transport::upgrade::configure;
use crate::transport::validate::validate;

/// Messages that may wait for one repo peer.
const OUTBOUND_QUEUE: usize = 4096;

pub fn upgrade(ws: WebSocketUpgrade, state: AppState, slot: ConnectionGuard) -> Response {
    let max = state.limits.max_body;
    let tasks = state.tasks.clone();
    configure(ws, max).on_upgrade(move |socket| {
        tasks.track_future(async move {
            let _slot = slot;
            if let Err(e) = serve(socket, state).await {
                tracing::debug!(error = %e, "repo socket ended");
            }
        })
    })
}

fn binary(msg: &RepoMessage) -> Message {
    Message::Binary(msg.encode().into())
}

fn close(code: u16, reason: String) -> Message {
    close_message(code, reason)
}

async fn serve(socket: WebSocket, state: AppState) -> Result<(), axum::Error> {
    let hub: Arc<Hub> = state.hub.clone();
    let docs: Documents = state.docs.clone();
    let conn_id = docs.next_conn_id();
    let (tx, mut rx) = mpsc::channel(OUTBOUND_QUEUE);
    let link = PeerLink {
        conn: conn_id,
        tx,
        overflow: Arc::new(AtomicBool::new(false)),
    };
    let replaced = CancellationToken::new();
    let mut core = Connection::new(hub.server_id());
    let mut synced: HashSet<DocId> = HashSet::new();
    let (mut sink, mut stream) = socket.split();
    let ping_every = state.limits.ping_interval;
    let mut keepalive = Keepalive::new(ping_every);
    let mut ping = keepalive.timer();
    let shutdown = state.shutdown.clone();
    let mut rate = RateLimit::per_second(state.limits.max_messages_per_sec);

    let result: Result<(), axum::Error> = async {
        loop {
            tokio::select! {
                frame = stream.next() => {
                    keepalive.seen();
                    if matches!(frame, Some(Ok(Message::Binary(_) | Message::Text(_)))) && !rate.allow() {
                        tracing::warn!(peer = ?core.peer_id(), "closing a repo peer over its message rate");
                        crate::metrics::rejected("rate_limited");
                        sink.send(close(CLOSE_RATE_LIMIT, "message rate limit exceeded".into())).await?;
                        return Ok(());
                    }
                    let actions = match frame {
                        Some(Ok(Message::Binary(bytes))) => core.receive(&bytes),
                        Some(Ok(Message::Text(_))) => core.receive(&[]),
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                        Some(Ok(Message::Close(_))) | None => return Ok(()),
                        Some(Err(e)) => {
                            let _ = sink.send(close(CLOSE_TOO_BIG, "message too big or malformed".into())).await;
                            return Err(e);
                        }
                    };
                    for action in actions {
                        match action {
                            Action::Send(msg) => sink.send(binary(&msg)).await?,
                            Action::Close { code, reason } => {
                                sink.send(close(code, reason)).await?;
                                return Ok(());
                            }
                            Action::Joined { peer_id } => {
                                hub.joined(&peer_id, conn_id, replaced.clone());
                            }
                            Action::Sync { doc, message, changes, request } => {
                                let upload = if changes.is_empty() {
                                    None
                                } else {
                                    match validate(&docs, &doc, changes.into()).await {
                                        Ok(u) => Some(u),
                                        Err(e) => {
                                            let reply = RepoMessage::Error {
                                                sender_id: Some(hub.server_id().to_owned()),
                                                target_id: core.peer_id().map(str::to_owned),
                                                message: format!("rejected changes for {doc}: {e}"),
                                            };
                                            sink.send(binary(&reply)).await?;
                                            continue;
                                        }
                                    }
                                };
                                hub.syncing(&doc, &link);
                                synced.insert(doc.clone());
                                docs.repo_sync(&doc, link.clone(), message, upload, request).await;
                            }
                            Action::Ephemeral { doc, sender_id, session_id, count, data } => {
                                hub.relay_ephemeral(conn_id, &doc, &sender_id, &session_id, count, &data);
                            }
                        }
                    }
                }
                Some(out) = rx.recv() => {
                    if link.overflow.load(Ordering::Acquire) {
                        sink.send(close(CLOSE_FELL_BEHIND, "fell behind; reconnect to resync".into())).await?;
                        return Ok(());
                    }
                    if let Some(msg) = core.outgoing(out) {
                        sink.send(binary(&msg)).await?;
                    }
                }
                _ = ping.tick() => {
                    if keepalive.expired() {
                        tracing::debug!(peer = ?core.peer_id(), "closing a repo peer that stopped answering pings");
                        let closing = sink.send(close(CLOSE_FELL_BEHIND, "no answer to pings; reconnect to resync".into()));
                        let _ = tokio::time::timeout(Duration::from_secs(1), closing).await;
                        return Ok(());
                    }
                    sink.send(Message::Ping(bytes::Bytes::new())).await?;
                }
                _ = replaced.cancelled() => {
                    let _ = sink.send(close(CLOSE_NORMAL, "replaced by a newer connection of this peer".into())).await;
                    return Ok(());
                }
                _ = shutdown.cancelled() => {
                    let _ = sink.send(close(CLOSE_GOING_AWAY, "server shutting down".into())).await;
                    return Ok(());
                }
            }
        }
    }
    .await;

    let synced: Vec<DocId> = synced.into_iter().collect();
    hub.left(conn_id, core.peer_id(), &synced);
    for doc in &synced {
        docs.repo_detach(doc, conn_id).await;
    }
    result
}
