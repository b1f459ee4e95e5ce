//! Every WebSocket close code the server sends, in one list (docs/live-push.md documents them),
//! but for 1002 (an automerge-repo protocol violation), which the sans-IO protocol core decides
//! on its own: `repo::protocol::CLOSE_PROTOCOL`.

/// Normal closure: a newer connection of the same automerge-repo peer replaced this one.
pub const CLOSE_NORMAL: u16 = 1000;
/// The server is shutting down (after finishing the socket's accepted work).
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// The socket exceeded its message rate (policy violation).
pub const CLOSE_RATE_LIMIT: u16 = 1008;
/// A message over `--max-body`, or a frame that does not parse.
pub const CLOSE_TOO_BIG: u16 = 1009;
/// The server could not serve the socket (the subscription failed).
pub const CLOSE_INTERNAL: u16 = 1011;
/// The client fell behind or stopped answering pings: "reconnect to resync".
pub const CLOSE_FELL_BEHIND: u16 = 4008;
/// The token expired during the connection: reconnect with a fresh one.
pub const CLOSE_TOKEN_EXPIRED: u16 = 4401;
/// The document was deleted.
pub const CLOSE_DELETED: u16 = 4404;
