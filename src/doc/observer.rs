//! Who hears of every change this node makes durable (webhooks): called by a document's owner
//! once a batch it stored is durable, and once a delete is, never for changes another node
//! stored (that node tells its own observer). Calls must return at once: an observer queues
//! what it has to do and never holds up the owner.

use automerge::ChangeHash;

use crate::id::DocId;

pub trait Observer: Send + Sync {
    /// `applied` changes were made durable in `id`, whose heads are now `heads`.
    fn changed(&self, id: &DocId, heads: &[ChangeHash], applied: usize);
    /// `id` was deleted.
    fn deleted(&self, id: &DocId);
}
