//! The automerge-repo WebSocket protocol (version "1") on `GET /`, so unmodified
//! `@automerge/automerge-repo` clients sync through the relay.
//!
//! - [`wire`]: CBOR message encoding, tolerant of the JS encoder;
//! - [`protocol`]: the sans-IO connection core (handshake, routing, ephemeral dedupe);
//! - [`hub`]: state shared by connections (peer ids, who syncs which document);
//! - [`socket`]: the thin WebSocket adapter (a session of the shared socket loop), with
//!   `forwarded`: the changes it handed to owners, awaited before it closes on shutdown.
//!
//! Sync state per (peer, document) lives in the document owner, which runs
//! `receive_sync_message`/`generate_sync_message` in the same batch as every other upload.

mod forwarded;
pub mod hub;
pub mod protocol;
pub mod socket;
#[cfg(test)]
mod sync_tests;
pub mod wire;
