//! The last durable state of a document, and the way back to it when a persist fails.
//!
//! An owner merges a turn before its bytes are durable (and merges the next turn on top while
//! the write runs), so when a write fails, memory holds changes the disk does not. Nothing of
//! them was acknowledged or pushed (answers wait for the write), but they must leave memory
//! too: reads would serve them, and the next persist (`save_after` the current heads) would
//! never store them.
//!
//! Going back is done from memory, not from the store — the store is what just failed, and
//! reloading from it made every read of the document fail while it was down. The choices:
//! - keep a copy of the durable document (`fork()` after every durable turn): exact, but it
//!   doubles every hot document's memory and costs a clone per turn, all to serve a rare event;
//! - keep the durable bytes in memory and reload from them: the same memory, plus a load;
//! - remember only the durable **heads** and `fork_at` them when a write fails: nothing in
//!   the common path (one `Vec` of heads per turn), and the cost of a load — copying the
//!   changes reachable from those heads — only on failure, once per fault (owners refuse
//!   writes before merging while the store refuses them, so a fault does not fork per write).
//!
//! The third is what this does. `fork_at` keeps only applied changes: changes waiting for
//! missing dependencies (stored earlier, durable) are not carried over, so the owner marks the
//! document stale and reloads it from the store before its next write once the store works
//! again (a reload also picks up a write that landed after it was given up on). When the heads
//! did not move (the failed turn only held changes that still wait), nothing needs forking:
//! waiting changes are invisible to reads, and a later turn that applies them persists them.

use automerge::{AutomergeError, ChangeHash};

use super::merge::DocState;

/// What the disk holds of the document, as of its last durable turn.
#[derive(Clone, Debug, Default)]
pub(super) struct Durable {
    /// The heads after the last durable turn (or the load).
    pub(super) heads: Vec<ChangeHash>,
    /// The document existed then.
    pub(super) exists: bool,
}

/// Returns `state` to `durable` (see the module docs); true when the document was forked.
pub(super) fn roll_back(state: &mut DocState, durable: &Durable) -> Result<bool, AutomergeError> {
    let forked = state.doc.get_heads() != durable.heads;
    if forked {
        state.doc = state.doc.fork_at(&durable.heads)?;
    }
    state.exists = durable.exists;
    // Some of these were stored by the failed turn: forget them all, so a change sent again is
    // stored again (a duplicate chunk is harmless, a missing one is not).
    state.stored_pending.clear();
    state.cached_save = None;
    Ok(forked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::{AutoCommit, Automerge, ReadDoc, ROOT};

    fn durable(doc: &Automerge, exists: bool) -> Durable {
        Durable {
            heads: doc.get_heads(),
            exists,
        }
    }

    #[test]
    fn changes_after_the_durable_heads_leave_memory() {
        let mut writer = AutoCommit::new();
        writer.put(ROOT, "kept", 1).unwrap();
        let mut state = DocState::default();
        state.doc.load_incremental(&writer.save()).unwrap();
        state.exists = true;
        let at = durable(&state.doc, true);
        let heads = writer.get_heads();
        writer.put(ROOT, "lost", 2).unwrap();
        state
            .doc
            .load_incremental(&writer.save_after(&heads))
            .unwrap();
        state.cached_save = Some(Vec::new().into());

        assert!(roll_back(&mut state, &at).unwrap());
        assert_eq!(state.doc.get_heads(), at.heads);
        assert!(state.doc.get(ROOT, "kept").unwrap().is_some());
        assert!(state.doc.get(ROOT, "lost").unwrap().is_none());
        assert!(
            state.cached_save.is_none(),
            "the cached save showed the lost change"
        );
    }

    #[test]
    fn a_document_created_by_the_failed_turn_does_not_exist_after_it() {
        let mut writer = AutoCommit::new();
        writer.put(ROOT, "x", 1).unwrap();
        let mut state = DocState::default();
        let at = durable(&state.doc, false);
        state.doc.load_incremental(&writer.save()).unwrap();
        state.exists = true;
        roll_back(&mut state, &at).unwrap();
        assert!(!state.exists);
        assert!(state.doc.get_heads().is_empty());
    }

    #[test]
    fn unmoved_heads_need_no_fork() {
        let mut writer = AutoCommit::new();
        writer.put(ROOT, "x", 1).unwrap();
        let mut state = DocState::default();
        state.doc.load_incremental(&writer.save()).unwrap();
        state.stored_pending.insert(writer.get_heads()[0]);
        let at = durable(&state.doc, true);
        assert!(!roll_back(&mut state, &at).unwrap());
        assert!(state.stored_pending.is_empty());
    }
}
