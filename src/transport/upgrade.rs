//! Accepting a live WebSocket: the socket configuration every live socket uses, and running a
//! [`Session`] on the upgraded socket as a task that shutdown waits for.

use axum::extract::ws::WebSocketUpgrade;
use axum::response::Response;
use futures_util::StreamExt;
use tracing::Instrument;

use super::socket_loop::{self, Session, Settings};
use crate::limits::ConnectionGuard;
use crate::state::AppState;

/// Small buffers keep an idle subscriber cheap (tungstenite's default read buffer is 128 KiB);
/// no message or frame may exceed `max_message` (`--max-body`).
pub fn configure(ws: WebSocketUpgrade, max_message: usize) -> WebSocketUpgrade {
    ws.read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .max_message_size(max_message)
        .max_frame_size(max_message)
}

/// Upgrades and runs `session` until the socket ends (at the latest when the caller's token
/// expires, `expires_at`); `slot` is held until then. Log lines of
/// the socket carry `span` (at info level, so the loop's warnings name the document or peer).
pub fn accept<S>(
    ws: WebSocketUpgrade,
    state: &AppState,
    slot: ConnectionGuard,
    span: tracing::Span,
    expires_at: Option<tokio::time::Instant>,
    mut session: S,
) -> Response
where
    S: Session + 'static,
{
    let mut settings = Settings::new(state);
    settings.expires_at = expires_at;
    let tasks = state.tasks.clone();
    configure(ws, state.limits.max_body).on_upgrade(move |socket| {
        tasks.track_future(
            async move {
                let _slot = slot;
                let (sink, stream) = socket.split();
                if let Err(e) = socket_loop::run(sink, stream, &mut session, settings).await {
                    tracing::debug!(error = %e, "socket ended");
                }
            }
            .instrument(span),
        )
    })
}
