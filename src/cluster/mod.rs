//! Several relay nodes on one shared store: the fan-out that passes each node's persisted
//! changes to the others (`fanout.rs`, over Redis; the messages in `wire.rs`) and the periodic check that
//! repairs whatever the fan-out missed (`check.rs`). The store stays the source of truth;
//! the document layer's side of the contract is `doc::Cluster`.

mod check;
mod fanout;
mod wire;

pub use check::spawn as spawn_heads_check;
pub use fanout::{FanoutSettings, RedisFanout};
