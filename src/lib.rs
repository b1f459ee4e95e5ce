//! automerge-relay: a server that keeps one Automerge document per id and merges every upload.
//!
//! Layers, from the outside in (ARCHITECTURE.md has the table `tests/architecture.rs` enforces):
//! - `router`: which transport serves a request (the only module that knows them all);
//! - transports, thin adapters that never import each other: `http` (document routes),
//!   `ws_doc` (per-document WebSocket), `sse`, `repo::socket` (automerge-repo), plus `ops` (the
//!   server's `/_/` routes);
//! - `transport`: what they share (request reading, validation, write outcomes, close codes,
//!   the live-socket loop); `state`: the state every route gets; `live`: following a document;
//! - `doc`: one owner task per document (batched merge, group commit, subscribers);
//! - `storage`: the store trait and its backends;
//! - helpers: `id`, `upload` (strict validation), `error`, `config`, `limits`, `metrics`, `alloc`.
//! - `migrate`: `import`/`export` between the store and an automerge-repo directory (no server).
//!
//! Every module is private: the items below are what the binary, the tests, the benchmarks and
//! the fuzz targets use.

mod accept;
mod alloc;
mod auth;
mod cluster;
mod config;
mod doc;
mod error;
mod http;
mod id;
mod limits;
mod live;
mod metrics;
mod migrate;
mod ops;
mod repo;
mod router;
mod server;
mod sse;
mod state;
mod storage;
mod transport;
mod upload;
mod webhook;
mod ws_doc;

// The binary: flags, the allocator's tuning, running until a signal; import and export.
pub use alloc::{spawn_trimmer, tune as tune_allocator, TRIM_EVERY};
pub use config::{Cli, NotServing};
pub use migrate::run as run_migration;
pub use server::{run, shutdown_signal, ServeError};

// What parses client bytes, for the property tests, benchmarks and fuzz targets.
pub use doc::{etag_for, parse_heads, Outgoing, PeerSync};
pub use error::RelayError;
pub use id::DocId;
pub use repo::protocol::{
    Action as RepoAction, Connection as RepoConnection, EphemeralFilter, CLOSE_PROTOCOL,
};
pub use repo::wire::{PeerMetadata, RepoMessage};
pub use upload::{parse_upload, parse_upload_with, split_chunks, Hint, Upload};
