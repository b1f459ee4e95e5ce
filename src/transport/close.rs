//! Every WebSocket close code the server sends, in one list (docs/live-push.md documents them).
//! The automerge-repo protocol core decides its own protocol violations (1002, bad handshake) as
//! `repo::protocol::CLOSE_PROTOCOL`; the socket loop sends the same code for a malformed frame.

/// Normal closure: a newer connection of the same automerge-repo peer replaced this one.
pub const CLOSE_NORMAL: u16 = 1000;
/// The server is shutting down (after finishing the socket's accepted work).
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// A frame that breaks the WebSocket protocol (bad opcode or bits, invalid UTF-8 text).
pub const CLOSE_MALFORMED: u16 = 1002;
/// The socket exceeded its message rate (policy violation).
pub const CLOSE_RATE_LIMIT: u16 = 1008;
/// A message over `--max-body`.
pub const CLOSE_TOO_BIG: u16 = 1009;
/// The server could not serve the socket (the subscription failed).
pub const CLOSE_INTERNAL: u16 = 1011;
/// The client fell behind (its queue overflowed, a send to it timed out) or stopped answering
/// pings: "reconnect to resync".
pub const CLOSE_FELL_BEHIND: u16 = 4008;
/// The token expired during the connection: reconnect with a fresh one.
pub const CLOSE_TOKEN_EXPIRED: u16 = 4401;
/// The document was deleted.
pub const CLOSE_DELETED: u16 = 4404;
