//! Server-sent events: `GET /{id}` with `Accept: text/event-stream`.
//!
//! One `change` event per merged batch, data `{"heads":[...]}` (clients fetch `?since=` for the
//! bytes); `deleted` when the document is deleted, then the stream ends. A subscriber that fell
//! behind gets one `change` event with the latest heads instead of the ones it missed.
//! A keep-alive comment goes out every `--ping-secs`, like the WebSocket pings. The stream ends
//! when the caller's token expires (the client reconnects with a fresh one).

use std::convert::Infallible;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream;
use serde_json::json;

use crate::error::RelayError;
use crate::id::DocId;
use crate::live::{Delivery, Follower};
use crate::state::AppState;
use crate::transport::caller::expiry;
use crate::transport::outcome::heads_json;

/// True when the request asks for an event stream.
pub fn wants_sse(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get_all(axum::http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/event-stream"))
}

/// Streams `id`'s changes to a caller who may read it (checked by the router), until the
/// document is deleted, the server shuts down or the caller's token expires (`expires_at`).
pub async fn stream(
    state: AppState,
    id: DocId,
    slot: crate::limits::ConnectionGuard,
    expires_at: Option<tokio::time::Instant>,
) -> Result<Response, RelayError> {
    // Subscribe before answering: once the client sees the headers, no change is missed.
    let (follower, _) = Follower::subscribe(
        &state.docs,
        &id,
        state.limits.subscriber_queue,
        &state.followers,
    )
    .await?;
    let shutdown = state.shutdown.clone();
    // The connection slot lives in the stream's state: released when the stream ends.
    let events = stream::unfold(
        (follower, false, slot),
        move |(mut follower, done, slot)| {
            let shutdown = shutdown.clone();
            async move {
                if done {
                    return None;
                }
                let next = tokio::select! {
                    n = follower.next() => n,
                    _ = shutdown.cancelled() => return None,
                    _ = expiry(expires_at) => {
                        crate::auth::Refusal::Expired.count();
                        return None;
                    }
                };
                let (event, done) = match next {
                    Ok(Some(Delivery::Changes { heads, .. })) => (
                        Event::default()
                            .event("change")
                            .data(json!({"heads": heads_json(&heads)}).to_string()),
                        false,
                    ),
                    Ok(Some(Delivery::Deleted)) => {
                        (Event::default().event("deleted").data("{}"), true)
                    }
                    Ok(None) => return None,
                    Err(e) => (
                        Event::default().event("error").data(e.body().to_string()),
                        false,
                    ),
                };
                Some((Ok::<_, Infallible>(event), (follower, done, slot)))
            }
        },
    );
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(state.limits.ping_interval))
        .into_response())
}
