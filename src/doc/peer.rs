//! How a document owner talks back to an automerge-repo peer without ever waiting for it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

use super::ConnId;
use crate::id::DocId;

/// Something a repo connection must send to its peer.
#[derive(Debug, Clone, PartialEq)]
pub enum Outgoing {
    /// An encoded automerge sync message for `doc`.
    Sync { doc: DocId, data: Vec<u8> },
    /// "Neither I nor my peers have `doc`."
    Unavailable { doc: DocId },
    /// An ephemeral message from another peer, relayed unchanged but for the target.
    Ephemeral {
        doc: DocId,
        sender_id: String,
        session_id: String,
        count: u64,
        data: Vec<u8>,
    },
}

/// A repo connection's outbound queue. Bounded: when a peer cannot keep up, the link is marked
/// overflowed and the connection closes (code 4008) so the client reconnects and resyncs from
/// a fresh sync state — dropping a sync message silently would desynchronise it.
#[derive(Debug, Clone)]
pub struct PeerLink {
    pub conn: ConnId,
    pub tx: mpsc::Sender<Outgoing>,
    pub overflow: Arc<AtomicBool>,
}

impl PeerLink {
    /// Queues `out`; false when the connection is gone.
    pub fn offer(&self, out: Outgoing) -> bool {
        match self.tx.try_send(out) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.overflow.store(true, Ordering::Release);
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}
