//! The per-document WebSocket: `GET /{id}` with an upgrade.
//!
//! Server → client: one binary message with the whole document (if it exists), then one binary
//! message per merged batch with exactly its new changes; text `{"type":"ack",...}` after each
//! of the client's uploads is durable; `{"type":"error",...}` for bad data (the socket stays
//! usable); `{"type":"deleted"}` and close code 4404 when the document is deleted. A message over
//! the size limit closes the socket with 1009. Client → server: binary saves or changes, merged
//! exactly like a PUT. Uploads are pipelined (several in flight, acknowledged in order) so one
//! busy client batches well in the document owner.
//!
//! Only that behaviour is here, as a [`Session`]; keepalive, the message rate, shutdown and the
//! order of acks belong to the shared socket loop.

use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::response::Response;
use bytes::Bytes;
use serde_json::json;

use crate::auth::{Access, Principal};
use crate::doc::{ConnId, Precondition};
use crate::error::RelayError;
use crate::id::DocId;
use crate::limits::ConnectionGuard;
use crate::live::{Delivery, Follower};
use crate::state::AppState;
use crate::transport::caller::{expires_at, forbidden};
use crate::transport::close::{CLOSE_DELETED, CLOSE_INTERNAL};
use crate::transport::outcome::ack_json;
use crate::transport::socket_loop::{Frame, Outbox, Session};
use crate::transport::upgrade::accept;
use crate::transport::validate::validate;

/// Upgrades a caller who may read `id` (checked by the router); it may upload only with a
/// write grant, and the socket closes (4401) when its token expires.
pub fn upgrade(
    ws: WebSocketUpgrade,
    state: AppState,
    id: DocId,
    slot: ConnectionGuard,
    principal: Principal,
) -> Response {
    let span = tracing::info_span!("doc_socket", doc = %id, caller = %principal.name);
    let expires_at = expires_at(&principal);
    let session = DocSocket {
        state: state.clone(),
        may_write: principal.may(id.as_str(), Access::Write),
        id,
        follower: None,
    };
    accept(ws, &state, slot, span, expires_at, session)
}

struct DocSocket {
    state: AppState,
    id: DocId,
    /// The caller's token has a write grant for this document.
    may_write: bool,
    /// Set once subscribed (in `open`).
    follower: Option<Follower>,
}

impl Session for DocSocket {
    /// What the follower delivers next (an error is reported and the socket stays open).
    type Event = Result<Delivery, RelayError>;

    async fn open(&mut self, out: &mut Outbox) {
        let state = &self.state;
        match Follower::subscribe(
            &state.docs,
            &self.id,
            state.limits.subscriber_queue,
            &state.followers,
        )
        .await
        {
            Ok((follower, initial)) => {
                if let Some(bytes) = initial {
                    out.send(Message::Binary(bytes));
                }
                self.follower = Some(follower);
            }
            Err(e) => {
                out.send(error_message(&e));
                out.close(CLOSE_INTERNAL, "subscription failed");
            }
        }
    }

    async fn next_event(&mut self) -> Option<Self::Event> {
        self.follower.as_mut()?.next().await.transpose()
    }

    fn on_event(&mut self, event: Self::Event, out: &mut Outbox) {
        match event {
            Ok(Delivery::Changes { bytes, .. }) => out.send(Message::Binary(bytes)),
            Ok(Delivery::Deleted) => {
                out.send(text(json!({"type": "deleted"})));
                out.close(CLOSE_DELETED, "document deleted");
            }
            Err(e) => out.send(error_message(&e)),
        }
    }

    async fn on_frame(&mut self, frame: Frame, out: &mut Outbox) {
        match frame {
            Frame::Binary(_) if !self.may_write => {
                // Nothing is stored; the socket stays open for reading.
                out.send(error_message(&forbidden(
                    "this token may only read this document; the upload was not stored",
                )));
            }
            Frame::Binary(data) => {
                let origin = self.follower.as_ref().map(Follower::conn);
                let write = write_one(self.state.clone(), self.id.clone(), origin, data);
                out.reply_later(write);
            }
            Frame::Text => {
                let e = RelayError::BadRequest("send Automerge data as binary messages".into());
                out.send(error_message(&e));
            }
        }
    }
}

/// Validates and merges one upload; its ack, or the error (the socket stays usable).
async fn write_one(state: AppState, id: DocId, origin: Option<ConnId>, data: Bytes) -> Message {
    let written = async {
        let upload = validate(&state.uploads, &state.docs, &id, data).await?;
        state
            .docs
            .write(&id, upload, Precondition::None, origin)
            .await
    };
    match written.await {
        Ok(outcome) => text(ack_json(&outcome)),
        Err(e) => error_message(&e),
    }
}

fn text(value: serde_json::Value) -> Message {
    Message::Text(value.to_string().into())
}

fn error_message(e: &RelayError) -> Message {
    crate::metrics::rejected(e.code());
    let mut body = e.body();
    body["type"] = json!("error");
    text(body)
}
