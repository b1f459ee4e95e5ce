//! What every transport shares, so the transports never import each other.
//!
//! - [`caller`]: who is calling (the one credential check) and what they may do;
//! - [`request`]: the document id from the path and a request body under `--max-body`;
//! - [`validate`]: upload validation off the async workers, with the owner's hint;
//! - [`outcome`]: a write's HTTP status and its JSON (PUT responses and WebSocket acks);
//! - [`close`]: every WebSocket close code the server sends, in one list;
//! - [`upgrade`]: socket configuration and running a [`socket_loop::Session`] on an upgrade;
//! - [`keepalive`]: pings and dead-peer detection;
//! - [`socket_loop`]: the one live-socket loop behind `ws_doc` and `repo::socket`.

pub mod caller;
pub mod close;
pub mod keepalive;
pub mod outcome;
pub mod request;
pub mod socket_loop;
pub mod upgrade;
pub mod validate;
