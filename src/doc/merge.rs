//! The pure half of an owner's turn: (document, pending work, `now`) → effects to perform.
//!
//! Applying one change to a large document costs about as much as applying fifty in one call
//! (automerge 0.12's cost grows with the edited sequence, not with the batch), so every upload
//! of a turn goes through one `apply_changes` (one `load_incremental` for full saves validated
//! without a current hint); a conditional write splits the run, because its precondition must
//! see the writes before it. No I/O, no clock: the owner runs this on a blocking thread and
//! performs the effects (persist, then reply and push) itself, so the rules are unit-tested here.

use std::collections::HashSet;
use std::mem;
use std::time::{Duration, Instant};

use automerge::{Automerge, ChangeHash, SaveOptions};
use bytes::Bytes;

use super::api::{Precondition, PushBatch, WriteJob, WriteOutcome};
use super::etag::etag_for;
use super::exchange::{repo_exchange, Exchange, RepoIn, RepoStates};
use super::peer::Outgoing;
use super::ConnId;
use crate::error::RelayError;
use crate::id::DocId;

/// The document and what the owner knows about it, moved into a merge and back.
#[derive(Default)]
pub(super) struct DocState {
    pub(super) doc: Automerge,
    /// The document exists (includes the turn still being persisted: if that write fails,
    /// the turn merged on top of it fails with it).
    pub(super) exists: bool,
    /// Changes stored while waiting for dependencies, so they are stored once.
    pub(super) stored_pending: HashSet<ChangeHash>,
    /// A full save of the current document, when one was made and nothing changed since.
    pub(super) cached_save: Option<Bytes>,
    pub(super) peers: RepoStates,
}

/// The work of one turn.
#[derive(Default)]
pub(super) struct Work {
    pub(super) jobs: Vec<WriteJob>,
    /// One entry per read: `None` for the whole document, else the heads the reader has.
    pub(super) reads: Vec<Option<Vec<ChangeHash>>>,
    /// Someone needs a full save (a whole-document read or a new subscriber).
    pub(super) need_full: bool,
    pub(super) repo: Vec<RepoIn>,
}

/// The owner's settings for one turn.
#[derive(Debug, Clone)]
pub(super) struct Rules {
    /// The hint epoch uploads were validated against (see `Upload::doc_delta`).
    pub(super) epoch: u64,
    /// Bytes the document may still grow by (stored size against `--max-doc-size`).
    pub(super) size_room: u64,
    pub(super) max_doc_size: u64,
    /// Most changes that may wait for dependencies in one document (`--max-pending-changes`).
    pub(super) max_pending: usize,
    /// Take a snapshot for compaction if this turn changes the document.
    pub(super) want_snapshot: bool,
    pub(super) repo_interval: Duration,
}

/// What the owner must do once the turn's bytes are durable (and before: persist them).
#[derive(Default)]
pub(super) struct Effects {
    /// One per job, in order.
    pub(super) results: Vec<Result<WriteOutcome, RelayError>>,
    /// Bytes for one durable append: the new changes and changes that still wait.
    pub(super) persist: Vec<u8>,
    /// For subscribers, when the document changed.
    pub(super) push: Option<PushBatch>,
    pub(super) full_save: Option<Bytes>,
    /// One per `since` read, in order.
    pub(super) since_reads: Vec<Bytes>,
    pub(super) snapshot: Option<Vec<u8>>,
    pub(super) outgoing: Vec<(ConnId, Outgoing)>,
    /// When the next repo peer held back by the push interval is due.
    pub(super) repo_due: Option<Instant>,
    /// The ETag after the turn, for its writers and readers; empty when it has neither.
    pub(super) etag: String,
}

/// Merges a turn's work into `state` and works out its effects.
pub(super) fn merge(
    id: &DocId,
    state: &mut DocState,
    work: Work,
    rules: &Rules,
    now: Instant,
) -> Effects {
    let Work {
        jobs,
        reads,
        need_full,
        repo,
    } = work;
    let exists_before = state.exists;
    let old_heads = state.doc.get_heads();
    let waiting = state.stored_pending.len();
    let outcomes = apply(&mut state.doc, &jobs, exists_before, waiting, rules);
    let heads = state.doc.get_heads();
    // Computed once, for writers and readers. A turn with neither (most turns in a typing
    // storm only take acknowledgements) skips it: a SHA-256 and a format, it was 1.8% of the
    // relay's CPU there.
    let etag = if jobs.is_empty() && reads.is_empty() {
        String::new()
    } else {
        etag_for(&heads)
    };
    let new: HashSet<ChangeHash> = if heads == old_heads {
        HashSet::new()
    } else {
        state
            .doc
            .get_changes_meta(&old_heads)
            .into_iter()
            .map(|m| m.hash)
            .collect()
    };
    // Only this node's writes are stored by it: a turn of changes other nodes stored (and
    // published) changes the document in memory and is pushed, but writes nothing.
    let stores_any = jobs
        .iter()
        .zip(&outcomes)
        .any(|(job, outcome)| !job.source.is_stored() && outcome.is_none());
    let account = account(state, &jobs, outcomes, &new, &heads, &etag);

    let new_bytes = if new.is_empty() {
        Vec::new()
    } else {
        state.doc.save_after(&old_heads)
    };
    state.stored_pending.retain(|h| !new.contains(h));
    state.stored_pending.extend(account.new_pending);
    let push = (!new.is_empty()).then(|| PushBatch {
        bytes: Bytes::from(new_bytes.clone()),
        heads: heads.clone(),
        sole_origin: account.sole_origin,
    });
    let mut persist = new_bytes;
    persist.extend_from_slice(&account.persist_pending);
    let changed = !persist.is_empty();
    if !stores_any {
        persist.clear();
    }
    // A document exists once it has an applied change: changes that only wait for
    // dependencies are stored (and applied when those arrive) but make nothing to read.
    state.exists = !heads.is_empty();

    let cached = state.cached_save.take();
    let full_save = if need_full {
        match cached {
            Some(c) if !changed => Some(c),
            // Only applied changes: the ETag (from the heads) must name exactly these bytes.
            _ => Some(Bytes::from(state.doc.save_with_options(SaveOptions {
                deflate: true,
                retain_orphans: false,
            }))),
        }
    } else if changed {
        None
    } else {
        cached
    };
    state.cached_save = full_save.clone();
    let since_reads = reads
        .iter()
        .flatten()
        .map(|have| changes_since(&state.doc, have))
        .collect();
    let (outgoing, repo_due) = repo_exchange(
        id,
        &mut state.doc,
        &mut state.peers,
        repo,
        &Exchange {
            exists: state.exists,
            changed: !new.is_empty(),
            interval: rules.repo_interval,
            now,
        },
    );
    let snapshot = (rules.want_snapshot && changed).then(|| {
        state.doc.save_with_options(SaveOptions {
            deflate: true,
            retain_orphans: true,
        })
    });
    Effects {
        results: account.results,
        persist,
        push,
        full_save,
        since_reads,
        snapshot,
        outgoing,
        repo_due,
        etag,
    }
}

/// The changes not reachable from `have`; unknown hashes are ignored (the reply may then
/// repeat changes the reader has — harmless).
fn changes_since(doc: &Automerge, have: &[ChangeHash]) -> Bytes {
    let known: Vec<ChangeHash> = have
        .iter()
        .filter(|h| doc.get_change_meta_by_hash(h).is_some())
        .copied()
        .collect();
    Bytes::from(doc.save_after(&known))
}

/// Applies the jobs in runs (see the module docs); returns each job's refusal, if any.
fn apply(
    doc: &mut Automerge,
    jobs: &[WriteJob],
    exists_before: bool,
    waiting: usize,
    rules: &Rules,
) -> Vec<Option<RelayError>> {
    let mut outcomes: Vec<Option<RelayError>> = Vec::with_capacity(jobs.len());
    let mut group = Group::default();
    let mut accepted_any = false;
    let mut size_room = rules.size_room;
    let unresolved = unresolved_changes(doc, jobs);
    let mut waiting = waiting;
    for (i, job) in jobs.iter().enumerate() {
        outcomes.push(None);
        // Changes another node stored are the store's truth: no limit of ours applies.
        if job.source.is_stored() {
            group.add(i, job, rules.epoch);
            accepted_any = true;
            continue;
        }
        // Changes that will wait for dependencies are bounded per document: a client sending
        // changes whose history was deleted (or never sent) must not grow them forever.
        let would_wait = job
            .upload
            .changes
            .iter()
            .filter(|c| unresolved.contains(&c.hash()))
            .count();
        if would_wait > 0 && waiting + would_wait > rules.max_pending {
            outcomes[i] = Some(RelayError::TooManyPending {
                limit: rules.max_pending,
            });
            continue;
        }
        waiting += would_wait;
        // The stored size grows by at most the bytes of the changes this upload can add.
        let growth = job.upload.growth_bound(rules.epoch);
        if growth > size_room {
            outcomes[i] = Some(RelayError::DocTooLarge {
                limit: rules.max_doc_size,
            });
            continue;
        }
        size_room -= growth;
        if job.precondition == Precondition::None {
            group.add(i, job, rules.epoch);
            accepted_any = true;
            continue;
        }
        group.flush(doc, &mut outcomes);
        let exists_now = exists_before || accepted_any;
        let current = etag_for(&doc.get_heads());
        let holds = match &job.precondition {
            Precondition::IfMatch(tags) => {
                exists_now && tags.iter().any(|t| t == "*" || *t == current)
            }
            Precondition::IfNoneMatchAny => !exists_now,
            Precondition::None => true,
        };
        if holds {
            group.add(i, job, rules.epoch);
            group.flush(doc, &mut outcomes);
            accepted_any = true;
        } else {
            outcomes[i] = Some(RelayError::PreconditionFailed);
        }
    }
    group.flush(doc, &mut outcomes);
    outcomes
}

/// The turn's changes that will still miss a dependency after the turn: neither in the
/// document nor resolved by other changes of the turn (full saves count as resolved). Uploads
/// come in causal order, so one pass settles almost everything; a few more passes cover
/// reordered ones, and what is left after them counts as waiting (an over-count only makes
/// the bound stricter).
fn unresolved_changes(doc: &Automerge, jobs: &[WriteJob]) -> HashSet<ChangeHash> {
    const PASSES: usize = 4;
    // The document's heads first: most changes depend on them, and looking a hash up in
    // automerge walks its change graph (measured as a hot spot before: `peer_sync.rs`).
    let mut known: HashSet<ChangeHash> = jobs
        .iter()
        .flat_map(|j| j.upload.doc_hashes.iter().copied())
        .chain(doc.get_heads())
        .collect();
    let mut open: Vec<&automerge::Change> =
        jobs.iter().flat_map(|j| j.upload.changes.iter()).collect();
    for _ in 0..PASSES {
        let before = open.len();
        open.retain(|c| {
            let ready = c
                .deps()
                .iter()
                .all(|d| known.contains(d) || doc.get_change_meta_by_hash(d).is_some());
            if ready {
                known.insert(c.hash());
            }
            !ready
        });
        if open.len() == before {
            break;
        }
    }
    open.iter().map(|c| c.hash()).collect()
}

/// What each write did, worked out after the merge.
struct Account {
    results: Vec<Result<WriteOutcome, RelayError>>,
    /// Raw bytes of changes that wait for dependencies and are not stored yet.
    persist_pending: Vec<u8>,
    new_pending: Vec<ChangeHash>,
    /// Set when every new change came from this one connection.
    sole_origin: Option<ConnId>,
}

/// Credits each new change to the first write that carried it (`applied`), counts the
/// changes still waiting for dependencies (`pending`), and collects the waiting changes that
/// must be stored.
fn account(
    state: &DocState,
    jobs: &[WriteJob],
    outcomes: Vec<Option<RelayError>>,
    new: &HashSet<ChangeHash>,
    heads: &[ChangeHash],
    etag: &str,
) -> Account {
    let doc = &state.doc;
    let mut credited: HashSet<ChangeHash> = HashSet::new();
    let mut origins: HashSet<Option<ConnId>> = HashSet::new();
    let mut persist_pending: Vec<u8> = Vec::new();
    let mut new_pending = Vec::new();
    let mut created_given = state.exists;
    let mut results = Vec::with_capacity(jobs.len());
    for (job, outcome) in jobs.iter().zip(outcomes) {
        if let Some(err) = outcome {
            results.push(Err(err));
            continue;
        }
        let upload = &job.upload;
        let hashes = upload
            .doc_hashes
            .iter()
            .copied()
            .chain(upload.changes.iter().map(|c| c.hash()));
        let applied = hashes
            .filter(|h| new.contains(h) && credited.insert(*h))
            .count();
        let mut pending = 0;
        for change in &upload.changes {
            let h = change.hash();
            if new.contains(&h) || doc.get_change_meta_by_hash(&h).is_some() {
                continue;
            }
            pending += 1;
            if !state.stored_pending.contains(&h) && !new_pending.contains(&h) {
                persist_pending.extend_from_slice(change.raw_bytes());
                new_pending.push(h);
            }
        }
        if applied > 0 {
            origins.insert(job.origin);
        }
        let created = !created_given && applied > 0;
        created_given |= created;
        results.push(Ok(WriteOutcome {
            created,
            heads: heads.to_vec(),
            etag: etag.to_owned(),
            applied,
            pending,
            total: upload.change_count(),
        }));
    }
    let sole_origin = match (origins.len(), origins.iter().next()) {
        (1, Some(Some(conn))) if credited.len() == new.len() => Some(*conn),
        _ => None,
    };
    Account {
        results,
        persist_pending,
        new_pending,
        sole_origin,
    }
}

/// Uploads merged together: parsed changes go through one `apply_changes`, uploads that
/// still need parsing (full saves validated without a current hint) through one
/// `load_incremental`.
#[derive(Default)]
struct Group {
    changes: Vec<automerge::Change>,
    bytes: Vec<u8>,
    members: Vec<usize>,
}

impl Group {
    fn add(&mut self, member: usize, job: &WriteJob, epoch: u64) {
        let upload = &job.upload;
        self.members.push(member);
        match &upload.doc_delta {
            _ if !upload.has_doc_chunks => self.changes.extend(upload.changes.iter().cloned()),
            Some((e, delta)) if *e == epoch => {
                self.changes.extend(delta.iter().cloned());
                self.changes.extend(upload.changes.iter().cloned());
            }
            _ => self.bytes.extend_from_slice(&upload.bytes),
        }
    }

    fn flush(&mut self, doc: &mut Automerge, outcomes: &mut [Option<RelayError>]) {
        let changes = mem::take(&mut self.changes);
        let mut result = Ok(());
        if !changes.is_empty() {
            result = doc.apply_changes(changes);
        }
        if result.is_ok() && !self.bytes.is_empty() {
            result = doc.load_incremental(&self.bytes).map(|_| ());
        }
        if let Err(e) = result {
            let err = RelayError::InvalidBody(format!("merge failed: {e}"));
            for &m in &self.members {
                outcomes[m] = Some(err.clone());
            }
        }
        self.bytes.clear();
        self.members.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::super::api::Source;
    use super::*;
    use crate::upload::parse_upload;
    use automerge::transaction::Transactable;
    use automerge::{AutoCommit, ReadDoc, ROOT};

    fn id() -> DocId {
        DocId::parse("merge-test").unwrap()
    }

    fn rules() -> Rules {
        Rules {
            epoch: 0,
            size_room: u64::MAX,
            max_doc_size: u64::MAX,
            max_pending: 1000,
            want_snapshot: false,
            repo_interval: Duration::from_millis(50),
        }
    }

    fn job(bytes: Vec<u8>, origin: Option<ConnId>) -> WriteJob {
        WriteJob {
            upload: parse_upload(bytes.into()).unwrap(),
            precondition: Precondition::None,
            origin,
            source: Source::Client,
        }
    }

    /// A writer's next change as incremental bytes.
    fn edit(doc: &mut AutoCommit, key: &str, value: i64) -> Vec<u8> {
        let heads = doc.get_heads();
        doc.put(ROOT, key, value).unwrap();
        doc.save_after(&heads)
    }

    fn run(state: &mut DocState, jobs: Vec<WriteJob>) -> Effects {
        let work = Work {
            jobs,
            ..Work::default()
        };
        merge(&id(), state, work, &rules(), Instant::now())
    }

    fn ok(e: &Effects, i: usize) -> &WriteOutcome {
        e.results[i].as_ref().unwrap()
    }

    #[test]
    fn one_turn_merges_every_write_and_persists_once() {
        let mut state = DocState::default();
        let (mut a, mut b) = (AutoCommit::new(), AutoCommit::new());
        let jobs = vec![
            job(edit(&mut a, "a", 1), Some(1)),
            job(edit(&mut b, "b", 2), Some(2)),
        ];
        let e = run(&mut state, jobs);
        assert!(
            ok(&e, 0).created && !ok(&e, 1).created,
            "the first write created it"
        );
        assert_eq!((ok(&e, 0).applied, ok(&e, 1).applied), (1, 1));
        assert_eq!(ok(&e, 0).heads.len(), 2, "both changes are heads");
        assert_eq!(ok(&e, 0).heads, ok(&e, 1).heads);
        let push = e.push.as_ref().unwrap();
        assert_eq!(push.sole_origin, None, "a mixed batch goes to everyone");
        assert!(state.exists);
        // One append holds both changes.
        let mut reloaded = Automerge::new();
        reloaded.load_incremental(&e.persist).unwrap();
        assert_eq!(reloaded.get_heads(), state.doc.get_heads());
    }

    fn remote(bytes: Vec<u8>) -> WriteJob {
        let key =
            crate::storage::ChunkKey::for_bytes(crate::storage::ChunkKind::Incremental, &bytes);
        let len = bytes.len();
        WriteJob {
            source: Source::Published { key, len },
            ..job(bytes, None)
        }
    }

    #[test]
    fn changes_another_node_stored_are_applied_and_pushed_but_not_stored_again() {
        let mut state = DocState::default();
        let mut a = AutoCommit::new();
        let e = run(&mut state, vec![remote(edit(&mut a, "x", 1))]);
        assert!(state.exists);
        assert_eq!(state.doc.get_heads(), a.get_heads());
        assert!(e.persist.is_empty(), "the other node stored it");
        assert_eq!(
            e.push.as_ref().unwrap().sole_origin,
            None,
            "pushed to everyone"
        );
        // Past every limit of this node: the store holds them anyway.
        let tight = Rules {
            size_room: 0,
            max_pending: 0,
            ..rules()
        };
        let first = edit(&mut a, "x", 2);
        let second = edit(&mut a, "x", 3);
        let work = Work {
            jobs: vec![remote(second)],
            ..Work::default()
        };
        let e = merge(&id(), &mut state, work, &tight, Instant::now());
        assert!(e.results[0].is_ok());
        assert!(
            e.persist.is_empty(),
            "a waiting remote change is not stored either"
        );
        assert_eq!(state.stored_pending.len(), 1);
        // With a local write in the same turn, the turn stores what it applied.
        let mut b = AutoCommit::new();
        let e = run(
            &mut state,
            vec![remote(first), job(edit(&mut b, "y", 1), Some(3))],
        );
        assert_eq!(state.doc.get_heads().len(), 2);
        assert_eq!(state.doc.get_heads(), {
            let mut both = a.clone();
            both.merge(&mut b).unwrap();
            both.get_heads()
        });
        assert!(!e.persist.is_empty());
    }

    #[test]
    fn a_batch_made_only_of_one_writers_changes_names_that_writer() {
        let mut state = DocState::default();
        let mut a = AutoCommit::new();
        let first = edit(&mut a, "x", 1);
        let second = edit(&mut a, "x", 2);
        let e = run(
            &mut state,
            vec![job(first, Some(7)), job(second.clone(), Some(7))],
        );
        assert_eq!(e.push.unwrap().sole_origin, Some(7));
        // The same changes again: nothing new, nothing to persist or push.
        let e = run(&mut state, vec![job(second, Some(8))]);
        assert_eq!(ok(&e, 0).applied, 0);
        assert!(e.push.is_none() && e.persist.is_empty());
    }

    #[test]
    fn changes_with_missing_dependencies_wait_and_apply_later() {
        let mut state = DocState::default();
        let mut a = AutoCommit::new();
        let first = edit(&mut a, "x", 1);
        let second = edit(&mut a, "x", 2);
        let e = run(&mut state, vec![job(second.clone(), None)]);
        let out = ok(&e, 0);
        assert_eq!((out.applied, out.pending), (0, 1));
        assert!(!out.created, "only applied changes make a document");
        assert!(
            !state.exists,
            "a document of waiting changes does not exist"
        );
        assert!(e.push.is_none(), "nothing applied, nothing pushed");
        assert!(!e.persist.is_empty(), "the waiting change is stored");
        assert_eq!(state.stored_pending.len(), 1);
        // Sent again while still waiting: counted, not stored twice.
        let e = run(&mut state, vec![job(second, None)]);
        assert_eq!(ok(&e, 0).pending, 1);
        assert!(e.persist.is_empty());
        // The dependency arrives: both apply, credited to this write.
        let e = run(&mut state, vec![job(first, None)]);
        assert_eq!(ok(&e, 0).applied, 1);
        assert!(ok(&e, 0).created && state.exists);
        assert_eq!(state.doc.get_heads(), a.get_heads());
        assert!(state.stored_pending.is_empty());
        assert_eq!(e.push.unwrap().heads, a.get_heads());
    }

    #[test]
    fn changes_waiting_for_dependencies_are_bounded_per_document() {
        let mut state = DocState::default();
        let mut a = AutoCommit::new();
        let _never_sent = edit(&mut a, "x", 0);
        let waiting: Vec<Vec<u8>> = (1..=1001).map(|i| edit(&mut a, "x", i)).collect();
        let mut jobs: Vec<WriteJob> = waiting.iter().map(|c| job(c.clone(), None)).collect();
        let last = jobs.pop().unwrap();
        // 1000 wait (the limit in these rules): a chain whose root was never sent.
        let e = run(&mut state, jobs);
        assert!(e.results.iter().all(|r| r.is_ok()));
        assert_eq!(state.stored_pending.len(), 1000);
        let e = run(&mut state, vec![last]);
        assert!(matches!(
            e.results[0],
            Err(RelayError::TooManyPending { limit: 1000 })
        ));
        assert!(e.persist.is_empty(), "nothing more is stored");
        // A change that applies is never refused for it.
        let mut b = AutoCommit::new();
        let e = run(&mut state, vec![job(edit(&mut b, "y", 1), None)]);
        assert_eq!(ok(&e, 0).applied, 1);
    }

    #[test]
    fn preconditions_see_the_writes_before_them() {
        let mut state = DocState::default();
        let mut a = AutoCommit::new();
        let mut guarded = job(edit(&mut a, "x", 1), None);
        guarded.precondition = Precondition::IfNoneMatchAny;
        let mut second = job(edit(&mut a, "x", 2), None);
        second.precondition = Precondition::IfNoneMatchAny;
        let e = run(&mut state, vec![guarded, second]);
        assert_eq!(ok(&e, 0).applied, 1);
        assert!(matches!(e.results[1], Err(RelayError::PreconditionFailed)));
        let stale = etag_for(&[]);
        let mut cas = job(edit(&mut a, "x", 3), None);
        cas.precondition = Precondition::IfMatch(vec![stale]);
        let e = run(&mut state, vec![cas]);
        assert!(matches!(e.results[0], Err(RelayError::PreconditionFailed)));
        assert!(e.persist.is_empty(), "a refused write stores nothing");
    }

    #[test]
    fn a_write_past_the_size_limit_is_refused_alone() {
        let mut state = DocState::default();
        let mut a = AutoCommit::new();
        let small = edit(&mut a, "x", 1);
        a.put(ROOT, "big", "y".repeat(10_000)).unwrap();
        let big = a.save_after(&[]);
        let mut r = rules();
        r.size_room = 5_000;
        r.max_doc_size = 5_000;
        let work = Work {
            jobs: vec![job(small, None), job(big, None)],
            ..Work::default()
        };
        let e = merge(&id(), &mut state, work, &r, Instant::now());
        assert_eq!(ok(&e, 0).applied, 1);
        assert!(matches!(
            e.results[1],
            Err(RelayError::DocTooLarge { limit: 5_000 })
        ));
        assert!(state.doc.get(ROOT, "big").unwrap().is_none());
    }

    #[test]
    fn reads_in_the_turn_see_its_writes() {
        let mut state = DocState::default();
        let mut a = AutoCommit::new();
        let first = edit(&mut a, "x", 1);
        run(&mut state, vec![job(first, None)]);
        let have = state.doc.get_heads();
        let second = edit(&mut a, "x", 2);
        let work = Work {
            jobs: vec![job(second, None)],
            reads: vec![None, Some(have)],
            need_full: true,
            repo: Vec::new(),
        };
        let e = merge(&id(), &mut state, work, &rules(), Instant::now());
        let full = Automerge::load(e.full_save.as_ref().unwrap()).unwrap();
        assert_eq!(full.get_heads(), a.get_heads());
        assert_eq!(e.since_reads.len(), 1);
        let mut since = Automerge::load(&a.save_after(&[])).unwrap();
        since.load_incremental(&e.since_reads[0]).unwrap();
        assert_eq!(since.get_heads(), a.get_heads());
        assert!(e.since_reads[0].len() < full.save().len());
        assert_eq!(state.cached_save, e.full_save, "kept for the next read");
    }
}
