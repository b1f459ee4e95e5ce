//! Which webhook calls are due, and when the next one will be. Sans-IO: fed the owners'
//! events and `now`, it hands out calls; the dispatcher (`mod.rs`) sleeps until
//! [`Debouncer::next_due`] and delivers what [`Debouncer::take_due`] returns.
//!
//! One entry per document with something to send or a call in flight:
//! - changes coalesce into one *burst*, due `debounce` after its last change but at most
//!   `max_wait` after its first, so a steady stream still gets a call every `max_wait`;
//! - a delete drops the burst waiting before it (its changes are gone) and is due at once;
//! - at most one call per document is in flight, so a document's calls arrive in the order
//!   they happened (a delete after the changes before it, changes made after a delete after
//!   the delete). What happens meanwhile waits in the entry, coalesced, until
//!   [`Debouncer::finished`];
//! - the entries are bounded (`capacity`): a change or delete of a document that has no entry
//!   when all are taken is refused ([`Admission::Dropped`]); documents already queued always
//!   take more changes, so the bound is on documents, never on changes.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant, SystemTime};

use automerge::ChangeHash;

use crate::id::DocId;

/// How long changes are held back.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Quiet time after the last change of a burst before its call is due.
    pub debounce: Duration,
    /// Longest a burst's first change waits for its call, however busy the document.
    pub max_wait: Duration,
}

/// Whether an event found room.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// Queued; `sooner` when it made the earliest due time earlier (the dispatcher must wake
    /// up before the time it is sleeping to).
    Queued { sooner: bool },
    /// The document had no entry and every entry is taken: nothing will be sent for it.
    Dropped,
}

/// One call to make.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    pub id: DocId,
    pub kind: CallKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallKind {
    /// `changes` changes were made durable since the previous call, leaving `heads`; the last
    /// of them at `at`.
    Changed {
        heads: Vec<ChangeHash>,
        changes: u64,
        at: SystemTime,
    },
    /// The document was deleted at `at`.
    Deleted { at: SystemTime },
}

/// Changes not yet handed out.
struct Burst {
    heads: Vec<ChangeHash>,
    changes: u64,
    first: Instant,
    last: Instant,
    at: SystemTime,
}

#[derive(Default)]
struct Entry {
    /// A delete not yet handed out; goes before `burst`, whose changes came after it.
    deleted: Option<SystemTime>,
    burst: Option<Burst>,
    in_flight: bool,
    /// Its key in `timers` while something waits and no call is in flight.
    timer: Option<TimerKey>,
}

/// Due time, then a sequence number: unique, and first come first served among equals.
type TimerKey = (Instant, u64);

pub struct Debouncer {
    timing: Timing,
    capacity: usize,
    docs: HashMap<DocId, Entry>,
    timers: BTreeMap<TimerKey, DocId>,
    seq: u64,
    /// Shutting down: everything waiting is due now, whatever its timing.
    closing: bool,
}

impl Debouncer {
    pub fn new(timing: Timing, capacity: usize) -> Self {
        Self {
            timing,
            capacity: capacity.max(1),
            docs: HashMap::new(),
            timers: BTreeMap::new(),
            seq: 0,
            closing: false,
        }
    }

    /// `applied` changes of `id` were made durable at `now` (`at` on the wall clock), leaving
    /// `heads`.
    pub fn changed(
        &mut self,
        id: &DocId,
        heads: &[ChangeHash],
        applied: usize,
        now: Instant,
        at: SystemTime,
    ) -> Admission {
        let Some(entry) = self.entry(id) else {
            return Admission::Dropped;
        };
        match &mut entry.burst {
            Some(burst) => {
                burst.heads = heads.to_vec();
                burst.changes += applied as u64;
                burst.last = now;
                burst.at = at;
            }
            None => {
                entry.burst = Some(Burst {
                    heads: heads.to_vec(),
                    changes: applied as u64,
                    first: now,
                    last: now,
                    at,
                })
            }
        }
        self.schedule(id, now)
    }

    /// `id` was deleted at `now` (`at` on the wall clock).
    pub fn deleted(&mut self, id: &DocId, now: Instant, at: SystemTime) -> Admission {
        let Some(entry) = self.entry(id) else {
            return Admission::Dropped;
        };
        entry.burst = None;
        entry.deleted = Some(at);
        self.schedule(id, now)
    }

    /// Hands out up to `limit` calls due at `now` (all waiting ones when closing), the
    /// earliest due first; their documents are in flight until [`Self::finished`].
    pub fn take_due(&mut self, now: Instant, limit: usize) -> Vec<Call> {
        let mut calls = Vec::new();
        while calls.len() < limit {
            let Some(entry) = self.timers.first_entry() else {
                break;
            };
            if entry.key().0 > now && !self.closing {
                break;
            }
            let id = entry.remove();
            let Some(doc) = self.docs.get_mut(&id) else {
                continue;
            };
            doc.timer = None;
            let kind = if let Some(at) = doc.deleted.take() {
                CallKind::Deleted { at }
            } else if let Some(burst) = doc.burst.take() {
                CallKind::Changed {
                    heads: burst.heads,
                    changes: burst.changes,
                    at: burst.at,
                }
            } else {
                continue;
            };
            doc.in_flight = true;
            calls.push(Call { id, kind });
        }
        calls
    }

    /// When the earliest waiting call is due (maybe already past); `None` when nothing waits
    /// but calls in flight.
    pub fn next_due(&self) -> Option<Instant> {
        self.timers.keys().next().map(|(due, _)| *due)
    }

    /// The call in flight for `id` was delivered or given up on at `now`: what came meanwhile
    /// is scheduled, or the entry goes.
    pub fn finished(&mut self, id: &DocId, now: Instant) {
        let Some(entry) = self.docs.get_mut(id) else {
            return;
        };
        entry.in_flight = false;
        if entry.deleted.is_none() && entry.burst.is_none() {
            self.docs.remove(id);
        } else {
            self.schedule(id, now);
        }
    }

    /// From now on every waiting call is due at once (shutdown).
    pub fn close(&mut self) {
        self.closing = true;
    }

    /// Documents with a call waiting or in flight.
    pub fn len(&self) -> usize {
        self.docs.len()
    }

    /// The entry of `id`, made if there is room.
    fn entry(&mut self, id: &DocId) -> Option<&mut Entry> {
        if !self.docs.contains_key(id) && self.docs.len() >= self.capacity {
            return None;
        }
        Some(self.docs.entry(id.clone()).or_default())
    }

    /// Puts `id`'s waiting call at its due time (none while a call is in flight).
    fn schedule(&mut self, id: &DocId, now: Instant) -> Admission {
        let Some(entry) = self.docs.get_mut(id) else {
            return Admission::Queued { sooner: false };
        };
        if let Some(old) = entry.timer.take() {
            self.timers.remove(&old);
        }
        if entry.in_flight {
            return Admission::Queued { sooner: false };
        }
        let due = match (&entry.deleted, &entry.burst) {
            (Some(_), _) => now,
            (None, Some(b)) => (b.last + self.timing.debounce).min(b.first + self.timing.max_wait),
            (None, None) => return Admission::Queued { sooner: false },
        };
        self.seq += 1;
        let key = (due, self.seq);
        entry.timer = Some(key);
        self.timers.insert(key, id.clone());
        Admission::Queued {
            sooner: self.timers.keys().next() == Some(&key),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEBOUNCE: Duration = Duration::from_millis(300);
    const MAX_WAIT: Duration = Duration::from_millis(1500);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn id(s: &str) -> DocId {
        DocId::parse(s).expect("id")
    }

    fn heads(n: u8) -> Vec<ChangeHash> {
        vec![ChangeHash([n; 32])]
    }

    fn debouncer(capacity: usize) -> Debouncer {
        Debouncer::new(
            Timing {
                debounce: DEBOUNCE,
                max_wait: MAX_WAIT,
            },
            capacity,
        )
    }

    fn changed(d: &mut Debouncer, doc: &str, n: u8, now: Instant) -> Admission {
        d.changed(&id(doc), &heads(n), 1, now, SystemTime::UNIX_EPOCH)
    }

    fn changes_of(call: &Call) -> (Vec<ChangeHash>, u64) {
        match &call.kind {
            CallKind::Changed { heads, changes, .. } => (heads.clone(), *changes),
            CallKind::Deleted { .. } => panic!("expected changes, got {call:?}"),
        }
    }

    #[test]
    fn a_burst_is_one_call_with_the_last_heads_after_the_quiet_time() {
        let t0 = Instant::now();
        let mut d = debouncer(10);
        for i in 0..50u8 {
            changed(&mut d, "a", i, t0 + ms(10 * i as u64));
        }
        let last = t0 + ms(490);
        assert_eq!(d.next_due(), Some(last + DEBOUNCE));
        assert!(d.take_due(last + DEBOUNCE - ms(1), 10).is_empty());
        let calls = d.take_due(last + DEBOUNCE, 10);
        assert_eq!(calls.len(), 1);
        assert_eq!(changes_of(&calls[0]), (heads(49), 50));
        assert_eq!(d.next_due(), None, "in flight: nothing waits");
        d.finished(&id("a"), last + DEBOUNCE);
        assert_eq!(d.len(), 0);
    }

    #[test]
    fn a_steady_stream_gets_a_call_every_max_wait() {
        let t0 = Instant::now();
        let mut d = debouncer(10);
        let mut calls = Vec::new();
        // A change every 100 ms for 4 s; the call is delivered as soon as it is taken.
        for step in 0..=40u64 {
            let now = t0 + ms(100 * step);
            for c in d.take_due(now, 10) {
                calls.push((now, c));
                d.finished(&id("a"), now);
            }
            if step < 40 {
                changed(&mut d, "a", step as u8, now);
            }
        }
        let end = t0 + ms(3900) + DEBOUNCE;
        for c in d.take_due(end, 10) {
            calls.push((end, c));
        }
        let at: Vec<Duration> = calls.iter().map(|(t, _)| *t - t0).collect();
        assert_eq!(at, [ms(1500), ms(3000), ms(4200)]);
        let total: u64 = calls.iter().map(|(_, c)| changes_of(c).1).sum();
        assert_eq!(total, 40, "every change counted once");
        assert_eq!(changes_of(&calls[2].1).0, heads(39));
    }

    #[test]
    fn a_delete_drops_the_waiting_changes_and_is_due_at_once() {
        let t0 = Instant::now();
        let mut d = debouncer(10);
        changed(&mut d, "a", 1, t0);
        let at = SystemTime::UNIX_EPOCH + ms(5);
        assert_eq!(
            d.deleted(&id("a"), t0 + ms(10), at),
            Admission::Queued { sooner: true }
        );
        let calls = d.take_due(t0 + ms(10), 10);
        assert_eq!(
            calls,
            [Call {
                id: id("a"),
                kind: CallKind::Deleted { at }
            }]
        );
        d.finished(&id("a"), t0 + ms(20));
        assert_eq!(d.len(), 0);
    }

    #[test]
    fn one_call_per_document_in_flight_and_order_kept() {
        let t0 = Instant::now();
        let mut d = debouncer(10);
        changed(&mut d, "a", 1, t0);
        let first = d.take_due(t0 + DEBOUNCE, 10);
        assert_eq!(first.len(), 1);
        // While it is in flight: more changes, a delete, changes after the delete.
        changed(&mut d, "a", 2, t0 + ms(400));
        assert!(d
            .deleted(&id("a"), t0 + ms(500), SystemTime::UNIX_EPOCH)
            .eq(&Admission::Queued { sooner: false }));
        changed(&mut d, "a", 3, t0 + ms(600));
        assert!(d.take_due(t0 + ms(5000), 10).is_empty(), "one in flight");
        d.finished(&id("a"), t0 + ms(700));
        let second = d.take_due(t0 + ms(700), 10);
        assert!(matches!(
            second[..],
            [Call {
                kind: CallKind::Deleted { .. },
                ..
            }]
        ));
        d.finished(&id("a"), t0 + ms(710));
        assert_eq!(d.next_due(), Some(t0 + ms(600) + DEBOUNCE));
        let third = d.take_due(t0 + ms(900), 10);
        assert_eq!(
            changes_of(&third[0]),
            (heads(3), 1),
            "only the change after the delete"
        );
        d.finished(&id("a"), t0 + ms(910));
        assert_eq!(d.len(), 0);
    }

    #[test]
    fn documents_past_the_capacity_are_dropped_but_queued_ones_take_more() {
        let t0 = Instant::now();
        let mut d = debouncer(2);
        assert_eq!(
            changed(&mut d, "a", 1, t0),
            Admission::Queued { sooner: true }
        );
        assert_eq!(
            changed(&mut d, "b", 1, t0 + ms(1)),
            Admission::Queued { sooner: false }
        );
        assert_eq!(changed(&mut d, "c", 1, t0 + ms(2)), Admission::Dropped);
        assert_eq!(
            d.deleted(&id("c"), t0 + ms(3), SystemTime::UNIX_EPOCH),
            Admission::Dropped
        );
        assert!(matches!(
            changed(&mut d, "a", 2, t0 + ms(4)),
            Admission::Queued { .. }
        ));
        assert_eq!(d.len(), 2);
        // In flight still counts: room comes back only when a call finishes.
        assert_eq!(d.take_due(t0 + ms(2000), 10).len(), 2);
        assert_eq!(changed(&mut d, "c", 1, t0 + ms(2001)), Admission::Dropped);
        d.finished(&id("a"), t0 + ms(2002));
        assert!(matches!(
            changed(&mut d, "c", 1, t0 + ms(2003)),
            Admission::Queued { .. }
        ));
    }

    #[test]
    fn the_earliest_due_go_first_up_to_the_limit() {
        let t0 = Instant::now();
        let mut d = debouncer(10);
        changed(&mut d, "late", 1, t0 + ms(100));
        assert_eq!(
            changed(&mut d, "early", 1, t0),
            Admission::Queued { sooner: true }
        );
        let calls = d.take_due(t0 + ms(1000), 1);
        assert_eq!(calls[0].id, id("early"));
        assert_eq!(d.take_due(t0 + ms(1000), 0), []);
        assert_eq!(d.take_due(t0 + ms(1000), 5)[0].id, id("late"));
    }

    #[test]
    fn closing_makes_everything_due_at_once() {
        let t0 = Instant::now();
        let mut d = debouncer(10);
        changed(&mut d, "a", 1, t0);
        changed(&mut d, "b", 1, t0);
        assert!(d.take_due(t0, 10).is_empty());
        d.close();
        assert_eq!(d.take_due(t0, 10).len(), 2);
    }
}
