//! automerge-relay: a server that keeps one Automerge document per id and merges every upload.
//!
//! Layers, from the outside in (see ARCHITECTURE.md):
//! - [`router`]: which transport serves a request (the only module that knows them all);
//! - transports, thin adapters that never import each other: [`http`] (document routes),
//!   [`ws_doc`] (per-document WebSocket), [`sse`], [`repo::socket`] (automerge-repo), plus
//!   [`ops`] (the server's `/_/` routes);
//! - [`transport`]: what they share (request reading, validation, write outcomes, close codes,
//!   the live-socket loop); [`state`]: the state every route gets; [`live`]: following a
//!   document;
//! - [`doc`]: one owner task per document (batched merge, group commit, subscribers);
//! - [`storage`]: the store trait and its backends;
//! - helpers: [`id`], [`upload`] (strict validation), [`error`], [`config`].

pub mod alloc;
pub mod config;
pub mod doc;
pub mod error;
pub mod http;
pub mod id;
pub mod limits;
pub mod live;
pub mod metrics;
pub mod ops;
pub mod repo;
pub mod router;
pub mod server;
pub mod sse;
pub mod state;
pub mod storage;
pub mod transport;
pub mod upload;
pub mod ws_doc;
