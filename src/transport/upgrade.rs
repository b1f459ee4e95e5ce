//! The configuration every live WebSocket uses.

use axum::extract::ws::WebSocketUpgrade;

/// Small buffers keep an idle subscriber cheap (tungstenite's default read buffer is 128 KiB);
/// no message or frame may exceed `max_message` (`--max-body`).
pub fn configure(ws: WebSocketUpgrade, max_message: usize) -> WebSocketUpgrade {
    ws.read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .max_message_size(max_message)
        .max_frame_size(max_message)
}
