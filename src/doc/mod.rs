//! Documents: one owner task per document, found through the registry.
//!
//! Transports never touch an `Automerge` value or the store: they send commands to the
//! document's owner through [`Documents`] and await the reply.

mod etag;
mod owner;
mod peer;
mod peer_sync;
mod registry;
#[cfg(test)]
mod tests;

pub use etag::{etag_for, parse_heads};
pub use owner::{
    Command, DocEvent, PushBatch, ReadOutcome, Subscription, WriteOutcome, WriteRequest,
};
pub use peer::{Outgoing, PeerLink};
pub use peer_sync::PeerSync;
pub use registry::{DocConfig, Documents, Precondition, StatsSnapshot};

/// Identifies a live connection, so a client is not sent a batch made only of its own changes.
pub type ConnId = u64;
