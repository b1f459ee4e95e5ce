//! The per-document WebSocket: `GET /{id}` with an upgrade.
//!
//! Server → client: one binary message with the whole document (if it exists), then one binary
//! message per merged batch with exactly its new changes; text `{"type":"ack",...}` after each
//! of the client's uploads is durable; `{"type":"error",...}` for bad data (the socket stays
//! usable); `{"type":"deleted"}` and close code 4404 when the document is deleted. A message over
//! the size limit closes the socket with 1009. Client → server: binary saves or changes, merged
//! exactly like a PUT. Uploads are pipelined (several in flight, acknowledged in order) so one
//! busy client batches well in the document owner.

use std::time::Duration;

use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use futures_util::stream::FuturesOrdered;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;

use crate::doc::{Documents, Precondition};
use crate::error::RelayError;
use crate::id::DocId;
use crate::limits::{ConnectionGuard, RateLimit};
use crate::live::{Delivery, Follower};
use crate::state::AppState;
use crate::transport::close::{
    close_message, CLOSE_DELETED, CLOSE_FELL_BEHIND, CLOSE_GOING_AWAY, CLOSE_INTERNAL,
    CLOSE_RATE_LIMIT, CLOSE_TOO_BIG,
};
use crate::transport::keepalive::Keepalive;
use crate::transport::outcome::ack_json;
use crate::transport::upgrade::configure;
use crate::transport::validate::validate;

/// Uploads from one socket that may be in flight at once.
const MAX_IN_FLIGHT: usize = 32;

pub fn upgrade(
    ws: WebSocketUpgrade,
    state: AppState,
    id: DocId,
    slot: ConnectionGuard,
) -> Response {
    let max = state.limits.max_body;
    let tasks = state.tasks.clone();
    configure(ws, max).on_upgrade(move |socket| {
        tasks.track_future(async move {
            let _slot = slot;
            if let Err(e) = serve(socket, state, id.clone()).await {
                tracing::debug!(doc = %id, error = %e, "document socket ended");
            }
        })
    })
}

fn text(value: serde_json::Value) -> Message {
    Message::Text(Utf8Bytes::from(value.to_string()))
}

fn error_message(e: &RelayError) -> Message {
    crate::metrics::rejected(e.code());
    text(json!({"type": "error", "error": e.code(), "message": e.to_string()}))
}

fn close(code: u16, reason: &'static str) -> Message {
    close_message(code, reason)
}

async fn write_one(
    docs: Documents,
    id: DocId,
    conn: u64,
    data: bytes::Bytes,
) -> Result<serde_json::Value, RelayError> {
    let upload = validate(&docs, &id, data).await?;
    let outcome = docs
        .write(&id, upload, Precondition::None, Some(conn))
        .await?;
    Ok(ack_json(&outcome))
}

async fn serve(socket: WebSocket, state: AppState, id: DocId) -> Result<(), axum::Error> {
    let (mut sink, mut stream) = socket.split();
    let (mut follower, initial) = match Follower::subscribe(
        &state.docs,
        &id,
        state.limits.subscriber_queue,
        &state.followers,
    )
    .await
    {
        Ok(v) => v,
        Err(e) => {
            sink.send(error_message(&e)).await?;
            return sink
                .send(close(CLOSE_INTERNAL, "subscription failed"))
                .await;
        }
    };
    if let Some(bytes) = initial {
        sink.send(Message::Binary(bytes)).await?;
    }
    let conn = follower.conn();
    let mut in_flight = FuturesOrdered::new();
    let ping_every = state.limits.ping_interval;
    let mut keepalive = Keepalive::new(ping_every);
    let mut ping = keepalive.timer();
    let shutdown = state.shutdown.clone();
    let mut following = true;
    let mut rate = RateLimit::per_second(state.limits.max_messages_per_sec);
    loop {
        tokio::select! {
            msg = stream.next(), if in_flight.len() < MAX_IN_FLIGHT => {
                keepalive.seen();
                if matches!(msg, Some(Ok(Message::Binary(_) | Message::Text(_)))) && !rate.allow() {
                    tracing::warn!(doc = %id, "closing a socket over its message rate");
                    crate::metrics::rejected("rate_limited");
                    return sink.send(close(CLOSE_RATE_LIMIT, "message rate limit exceeded")).await;
                }
                match msg {
                    Some(Ok(Message::Binary(data))) => {
                        in_flight.push_back(write_one(state.docs.clone(), id.clone(), conn, data));
                    }
                    Some(Ok(Message::Text(_))) => {
                        let e = RelayError::BadRequest(
                            "send Automerge data as binary messages".into(),
                        );
                        sink.send(error_message(&e)).await?;
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Ok(Message::Close(_))) | None => break,
                    Some(Err(e)) => {
                        tracing::info!(doc = %id, error = %e, "closing document socket");
                        crate::metrics::rejected("message_too_big");
                        let _ = sink.send(close(CLOSE_TOO_BIG, "message too big or malformed")).await;
                        return Err(e);
                    }
                }
            }
            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                let reply = match done {
                    Ok(ack) => text(ack),
                    Err(e) => error_message(&e),
                };
                sink.send(reply).await?;
            }
            delivery = follower.next(), if following => {
                match delivery {
                    Ok(Some(Delivery::Changes { bytes, .. })) => {
                        sink.send(Message::Binary(bytes)).await?;
                    }
                    Ok(Some(Delivery::Deleted)) => {
                        sink.send(text(json!({"type": "deleted"}))).await?;
                        sink.send(close(CLOSE_DELETED, "document deleted")).await?;
                        return Ok(());
                    }
                    Ok(None) => following = false,
                    Err(e) => {
                        sink.send(error_message(&e)).await?;
                    }
                }
            }
            _ = ping.tick() => {
                if keepalive.expired() {
                    tracing::debug!(doc = %id, "closing a socket that stopped answering pings");
                    let closing = sink.send(close(CLOSE_FELL_BEHIND, "no answer to pings; reconnect to resync"));
                    let _ = tokio::time::timeout(Duration::from_secs(1), closing).await;
                    return Ok(());
                }
                sink.send(Message::Ping(bytes::Bytes::new())).await?;
            }
            _ = shutdown.cancelled() => {
                // Finish what was accepted, then say goodbye.
                while let Some(done) = in_flight.next().await {
                    let reply = match done {
                        Ok(ack) => text(ack),
                        Err(e) => error_message(&e),
                    };
                    sink.send(reply).await?;
                }
                return sink.send(close(CLOSE_GOING_AWAY, "server shutting down")).await;
            }
        }
    }
    // The client closed: its accepted uploads still complete (they are owned by the owner).
    while in_flight.next().await.is_some() {}
    Ok(())
}
