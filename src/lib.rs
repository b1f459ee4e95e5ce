//! automerge-relay: a server that keeps one Automerge document per id and merges every upload.
//!
//! Layers, from the outside in (see ARCHITECTURE.md):
//! - transports: [`http`] (document routes) — thin adapters;
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
pub mod repo;
pub mod server;
pub mod sse;
pub mod state;
pub mod storage;
pub mod upload;
pub mod ws_doc;
