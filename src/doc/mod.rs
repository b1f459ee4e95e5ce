//! Documents: one owner task per document, found through the registry.
//!
//! Transports never touch an `Automerge` value or the store: they send commands to the
//! document's owner through [`Documents`] and await the reply.
//!
//! - `api`: commands, outcomes and preconditions;
//! - `registry`: [`Documents`], at most one owner per id; `evictor`: the memory budget;
//! - `owner`: the task loop and the document's lifecycle; `turn`: a merged turn waiting for
//!   its durable write; `durable`: the last durable state and going back to it; `merge`: the pure batch merge; `exchange` + `peer_sync`: the repo
//!   peers' sync; `chunks`: stored chunks and their totals; `listeners`: subscribers and peers;
//! - `shared`: settings and counters every owner shares, and the owners' narrow handle;
//! - `cluster`: what owners tell the other nodes sharing the store, and hear from them;
//!   `observer`: who hears of every durable change (webhooks).

mod api;
mod chunks;
mod cluster;
mod durable;
mod etag;
mod evictor;
mod exchange;
mod listeners;
mod merge;
mod observer;
mod owner;
mod peer;
mod peer_sync;
mod registry;
mod shared;
mod stats;
mod turn;

#[cfg(test)]
mod owner_tests;

pub use api::{DocEvent, Precondition, ReadOutcome, Subscription, WriteOutcome};
pub use cluster::{Cluster, Watching};
pub use etag::{etag_for, parse_heads};
pub use observer::Observer;
pub use peer::{Outgoing, PeerLink, PeerQueue, Queued};
pub use peer_sync::PeerSync;
pub use registry::Documents;
pub use shared::DocConfig;
pub use stats::StatsSnapshot;

/// Identifies a live connection, so a client is not sent a batch made only of its own changes.
pub type ConnId = u64;
