//! What every transport shares, so the transports never import each other.
//!
//! - [`request`]: the document id from the path and a request body under `--max-body`;
//! - [`validate`]: upload validation off the async workers, with the owner's hint;
//! - [`outcome`]: a write's HTTP status and its JSON (PUT responses and WebSocket acks);
//! - [`close`]: every WebSocket close code the server sends, in one list;
//! - [`upgrade`]: the configuration of every live WebSocket;
//! - [`keepalive`]: pings and dead-peer detection.

pub mod close;
pub mod keepalive;
pub mod outcome;
pub mod request;
pub mod upgrade;
pub mod validate;
