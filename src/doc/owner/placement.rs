//! Where a turn's merge runs: on the owner's own task, or on a blocking thread.
//!
//! A blocking thread keeps a large document from stalling the async workers (one change into
//! a 500k-long text costs 230–330 ms), but the hand-over is not free: spawning the merge,
//! waking a blocking thread and waking the owner again was a third of the relay's CPU in an
//! 8-typist storm (`benches/typing-storm.sh`: 3.08 → 2.02 ms per keystroke with the merge and
//! validation inline), where every turn merges one keystroke or none and takes 20–100 µs.
//!
//! So a turn runs inline when it is known to be cheap: its input is small, it asks for no
//! whole save (a full read, a new subscriber, a snapshot), no peer in it starts a sync from
//! nothing, and the document's last turn of the same kind (with changes to apply, or without)
//! took at most [`INLINE_BUDGET`]. A document's turns cost about the same from one to the next
//! for the same kind of input, so the last one predicts the next; the first turn of each kind
//! after a load runs on a blocking thread and measures. Sans-IO: durations are passed in.

use std::time::Duration;

use super::super::exchange::RepoStates;
use super::super::merge::{Rules, Work};

/// Most a turn may have taken last time for the next of its kind to run inline: about what a
/// tokio worker may be held without delaying the other tasks noticeably.
pub(super) const INLINE_BUDGET: Duration = Duration::from_millis(1);

/// Most upload bytes an inline turn may carry (a keystroke's change is 100–600 bytes; a turn
/// under load a few of them).
pub(super) const INLINE_BYTES: usize = 16 * 1024;

/// Where one turn's merge runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Placement {
    Inline,
    Blocking,
}

/// What the document's last turns cost, by kind.
#[derive(Debug, Default)]
pub(super) struct TurnCosts {
    /// The last turn that had changes to apply.
    writes: Option<Duration>,
    /// The last turn without any.
    others: Option<Duration>,
}

impl TurnCosts {
    /// Forgets every measurement (after a load: another document in effect).
    pub(super) fn reset(&mut self) {
        *self = Self::default();
    }

    /// Where the turn about to run goes.
    pub(super) fn place(&self, work: &Work, rules: &Rules, peers: &RepoStates) -> Placement {
        let bytes: usize = work.jobs.iter().map(|j| j.upload.bytes.len()).sum();
        let whole_save = work.need_full || rules.want_snapshot;
        // A peer we never answered, or one that asks for the document, may need every change
        // the document has: automerge builds them all from its op set.
        let fresh_peer = work.repo.iter().any(|m| {
            m.request
                || peers
                    .get(&m.conn)
                    .is_none_or(|p| p.last_sent.is_none() || p.state.shared_heads.is_empty())
        });
        let last = if work.jobs.is_empty() {
            self.others
        } else {
            self.writes
        };
        let cheap_last = last.is_some_and(|t| t <= INLINE_BUDGET);
        if bytes <= INLINE_BYTES && !whole_save && !fresh_peer && cheap_last {
            Placement::Inline
        } else {
            Placement::Blocking
        }
    }

    /// Records what a turn took.
    pub(super) fn record(&mut self, had_jobs: bool, took: Duration) {
        if had_jobs {
            self.writes = Some(took);
        } else {
            self.others = Some(took);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doc::api::{Precondition, Source, WriteJob};
    use crate::doc::exchange::RepoIn;
    use crate::doc::peer_sync::PeerSync;
    use automerge::sync;
    use std::time::Instant;

    fn rules() -> Rules {
        Rules {
            epoch: 0,
            size_room: u64::MAX,
            max_doc_size: u64::MAX,
            max_pending: 100,
            want_snapshot: false,
            repo_interval: Duration::from_millis(50),
        }
    }

    fn job(len: usize) -> WriteJob {
        let upload = crate::upload::Upload {
            bytes: bytes::Bytes::from(vec![0u8; len]),
            doc_hashes: Vec::new(),
            changes: Vec::new(),
            has_doc_chunks: false,
            doc_delta: None,
        };
        WriteJob {
            upload,
            precondition: Precondition::None,
            origin: None,
            source: Source::Client,
        }
    }

    fn ack(conn: u64) -> RepoIn {
        RepoIn {
            conn,
            message: sync::Message {
                heads: Vec::new(),
                need: Vec::new(),
                have: Vec::new(),
                changes: sync::ChunkList::empty(),
                flags: None,
                version: sync::MessageVersion::V1,
            },
            request: false,
            had_changes: false,
        }
    }

    /// A peer that has been answered and shares some history with us.
    fn settled_peer() -> PeerSync {
        let mut peer = PeerSync::default();
        peer.last_sent = Some(Instant::now());
        peer.state.shared_heads = vec![automerge::ChangeHash([1; 32])];
        peer
    }

    fn costs(writes: u64, others: u64) -> TurnCosts {
        let mut c = TurnCosts::default();
        c.record(true, Duration::from_micros(writes));
        c.record(false, Duration::from_micros(others));
        c
    }

    #[test]
    fn the_first_turn_of_each_kind_runs_on_a_blocking_thread() {
        let mut c = TurnCosts::default();
        let peers = RepoStates::new();
        let writes = Work {
            jobs: vec![job(100)],
            ..Work::default()
        };
        assert_eq!(c.place(&writes, &rules(), &peers), Placement::Blocking);
        c.record(true, Duration::from_micros(80));
        assert_eq!(c.place(&writes, &rules(), &peers), Placement::Inline);
        // A turn without changes has not been measured yet.
        assert_eq!(
            c.place(&Work::default(), &rules(), &peers),
            Placement::Blocking
        );
        c.record(false, Duration::from_micros(30));
        assert_eq!(
            c.place(&Work::default(), &rules(), &peers),
            Placement::Inline
        );
        c.reset();
        assert_eq!(c.place(&writes, &rules(), &peers), Placement::Blocking);
    }

    #[test]
    fn an_expensive_last_turn_sends_the_next_of_its_kind_to_a_blocking_thread() {
        let peers = RepoStates::new();
        let writes = Work {
            jobs: vec![job(100)],
            ..Work::default()
        };
        // Cheap acknowledgements say nothing about applying a change to a large document.
        let c = costs(5_000, 20);
        assert_eq!(c.place(&writes, &rules(), &peers), Placement::Blocking);
        assert_eq!(
            c.place(&Work::default(), &rules(), &peers),
            Placement::Inline
        );
        let at_budget = costs(INLINE_BUDGET.as_micros() as u64, 20);
        assert_eq!(
            at_budget.place(&writes, &rules(), &peers),
            Placement::Inline
        );
    }

    #[test]
    fn large_inputs_and_whole_saves_run_on_a_blocking_thread() {
        let c = costs(50, 20);
        let peers = RepoStates::new();
        let big = Work {
            jobs: vec![job(INLINE_BYTES / 2), job(INLINE_BYTES / 2 + 1)],
            ..Work::default()
        };
        assert_eq!(c.place(&big, &rules(), &peers), Placement::Blocking);
        let full_read = Work {
            need_full: true,
            ..Work::default()
        };
        assert_eq!(c.place(&full_read, &rules(), &peers), Placement::Blocking);
        let snapshot = Rules {
            want_snapshot: true,
            ..rules()
        };
        assert_eq!(
            c.place(&Work::default(), &snapshot, &peers),
            Placement::Blocking
        );
    }

    #[test]
    fn a_peer_starting_from_nothing_runs_on_a_blocking_thread() {
        let c = costs(50, 20);
        let mut peers = RepoStates::new();
        peers.insert(1, settled_peer());
        peers.insert(2, PeerSync::default());
        let settled = Work {
            repo: vec![ack(1)],
            ..Work::default()
        };
        assert_eq!(c.place(&settled, &rules(), &peers), Placement::Inline);
        let fresh = Work {
            repo: vec![ack(1), ack(2)],
            ..Work::default()
        };
        assert_eq!(c.place(&fresh, &rules(), &peers), Placement::Blocking);
        let unknown = Work {
            repo: vec![ack(3)],
            ..Work::default()
        };
        assert_eq!(c.place(&unknown, &rules(), &peers), Placement::Blocking);
        let mut request = ack(1);
        request.request = true;
        let asks = Work {
            repo: vec![request],
            ..Work::default()
        };
        assert_eq!(c.place(&asks, &rules(), &peers), Placement::Blocking);
    }
}
