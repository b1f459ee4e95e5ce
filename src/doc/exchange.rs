//! The repo side of a turn: take in each peer's sync message (its changes were already merged
//! with the batch), answer requests for a document that does not exist with `doc-unavailable`,
//! then generate sync messages.
//!
//! A peer that sent changes, asked for the document or is new is answered at once. Pushes to
//! the other peers are coalesced only while they are busy: a peer that answered our last
//! message gets a turn's changes at once (the leading edge: at low load the latency is the
//! work, not a timer); one whose last message is still unanswered waits for its answer, whose
//! turn then sends everything since in one message (natural batching, as group commit does for
//! writes), or at most the interval after our last message (the owner runs a flush turn when
//! held-back peers are due). A typing storm so still becomes few frames. Time is passed in.
//!
//! Measured with the typing storm (`benches/typing-storm.sh`): a fixed interval held every
//! push to a quiet peer for up to 50 ms (p50 59 ms at 4 typists, where samod answered in 18).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use automerge::{sync, Automerge};

use super::peer::Outgoing;
use super::peer_sync::{ChangeMetas, PeerSync, TurnMessages};
use super::ConnId;
use crate::id::DocId;

/// Sync states by connection. Kept apart from the peers' links: the states travel to the
/// merge thread, the links stay with the owner to deliver the previous turn's messages.
pub(super) type RepoStates = HashMap<ConnId, PeerSync>;

/// One received repo sync message, its changes split out.
pub(super) struct RepoIn {
    pub(super) conn: ConnId,
    /// The message without its changes.
    pub(super) message: sync::Message,
    /// It came as a `request` (the peer lacks the document).
    pub(super) request: bool,
    /// It carried changes (merged with the turn's batch).
    pub(super) had_changes: bool,
}

/// The turn's facts the exchange needs.
pub(super) struct Exchange {
    /// The document exists after this turn.
    pub(super) exists: bool,
    /// This turn applied new changes.
    pub(super) changed: bool,
    /// Least time between two pushes to a quiet peer.
    pub(super) interval: Duration,
    pub(super) now: Instant,
}

/// Runs the exchange; returns the messages to send and when the next held-back peer is due.
pub(super) fn repo_exchange(
    id: &DocId,
    doc: &mut Automerge,
    peers: &mut RepoStates,
    messages: Vec<RepoIn>,
    turn: &Exchange,
) -> (Vec<(ConnId, Outgoing)>, Option<Instant>) {
    let now = turn.now;
    let mut out = Vec::new();
    let mut urgent: HashSet<ConnId> = HashSet::new();
    let mut unavailable: HashSet<ConnId> = HashSet::new();
    let mut metas = ChangeMetas::default();
    for m in messages {
        let Some(peer) = peers.get_mut(&m.conn) else {
            continue;
        };
        let their_heads_empty = m.message.heads.is_empty();
        // Its changes were merged with the batch: only the bookkeeping is left.
        peer.receive_with(doc, m.message, m.had_changes, &mut metas);
        if m.had_changes || m.request || peer.last_sent.is_none() {
            urgent.insert(m.conn);
        } else {
            peer.due = true;
        }
        if !turn.exists && doc.get_heads().is_empty() && (m.request || their_heads_empty) {
            unavailable.insert(m.conn);
        }
    }
    let our_heads = doc.get_heads();
    let doc_empty = our_heads.is_empty();
    let mut generated = TurnMessages::default();
    let mut next_due: Option<Instant> = None;
    let mut conns: Vec<ConnId> = peers.keys().copied().collect();
    conns.sort_unstable();
    for conn in conns {
        let Some(peer) = peers.get_mut(&conn) else {
            continue;
        };
        if unavailable.contains(&conn) {
            out.push((conn, Outgoing::Unavailable { doc: id.clone() }));
            peer.due = false;
            continue;
        }
        let is_urgent = urgent.contains(&conn);
        if !(is_urgent || turn.changed || peer.due) {
            continue;
        }
        let they_have_nothing = peer.state.their_heads.as_ref().is_none_or(|h| h.is_empty());
        if doc_empty && they_have_nothing {
            peer.due = false;
            continue;
        }
        if !is_urgent && peer.state.in_flight {
            let ready_at = peer.last_sent.map(|t| t + turn.interval);
            if let Some(ready_at) = ready_at.filter(|t| *t > now) {
                peer.due = true;
                next_due = Some(next_due.map_or(ready_at, |d| d.min(ready_at)));
                continue;
            }
        }
        peer.due = false;
        if peer.has_nothing_to_hear(&our_heads) {
            continue;
        }
        if let Some(data) = generated.generate(doc, peer) {
            peer.last_sent = Some(now);
            out.push((
                conn,
                Outgoing::Sync {
                    doc: id.clone(),
                    data,
                },
            ));
        }
    }
    (out, next_due)
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::sync::SyncDoc;
    use automerge::transaction::Transactable;
    use automerge::{AutoCommit, ROOT};

    const INTERVAL: Duration = Duration::from_millis(300);

    /// A real automerge peer and its sync state with us.
    struct Client {
        doc: AutoCommit,
        state: sync::State,
    }

    impl Client {
        /// Its next message, as the owner receives it: changes merged into `server` first.
        fn send(&mut self, server: &mut Automerge) -> Option<RepoIn> {
            let mut message = self.doc.sync().generate_sync_message(&mut self.state)?;
            let had_changes = !message.changes.is_empty();
            if had_changes {
                let joined: Vec<u8> = message.changes.iter().flatten().copied().collect();
                server.load_incremental(&joined).unwrap();
                message.changes = sync::ChunkList::empty();
            }
            Some(RepoIn {
                conn: 1,
                message,
                request: false,
                had_changes,
            })
        }

        fn take(&mut self, out: &[(ConnId, Outgoing)]) -> usize {
            let mut n = 0;
            for (_, o) in out {
                if let Outgoing::Sync { data, .. } = o {
                    let msg = sync::Message::decode(data).unwrap();
                    self.doc
                        .sync()
                        .receive_sync_message(&mut self.state, msg)
                        .unwrap();
                    n += 1;
                }
            }
            n
        }
    }

    fn turn(changed: bool, now: Instant) -> Exchange {
        Exchange {
            exists: true,
            changed,
            interval: INTERVAL,
            now,
        }
    }

    /// Exchanges messages until neither side has anything to say.
    fn settle(
        client: &mut Client,
        server: &mut Automerge,
        peers: &mut RepoStates,
        now: Instant,
    ) -> usize {
        let id = DocId::parse("x").unwrap();
        let mut sent = 0;
        for _ in 0..10 {
            let incoming: Vec<RepoIn> = client.send(server).into_iter().collect();
            let quiet = incoming.is_empty();
            let (out, _) = repo_exchange(&id, server, peers, incoming, &turn(false, now));
            sent += client.take(&out);
            if quiet && out.is_empty() {
                break;
            }
        }
        sent
    }

    /// A server with one change and a client in sync with it.
    fn synced(t0: Instant) -> (Automerge, AutoCommit, Client, RepoStates) {
        let mut server = Automerge::new();
        let mut writer = AutoCommit::new();
        writer.put(ROOT, "n", 0).unwrap();
        server.load_incremental(&writer.save()).unwrap();
        let mut client = Client {
            doc: AutoCommit::new(),
            state: sync::State::new(),
        };
        let mut peers = RepoStates::new();
        peers.insert(1, PeerSync::default());
        settle(&mut client, &mut server, &mut peers, t0);
        assert_eq!(client.doc.get_heads(), server.get_heads(), "in sync");
        (server, writer, client, peers)
    }

    /// The writer's next change, merged into the server (as a turn of another writer would).
    fn write(writer: &mut AutoCommit, server: &mut Automerge, n: i64) {
        let heads = writer.get_heads();
        writer.put(ROOT, "n", n).unwrap();
        server.load_incremental(&writer.save_after(&heads)).unwrap();
    }

    #[test]
    fn a_push_to_a_peer_that_answered_goes_at_once_and_coalesces_while_unanswered() {
        let id = DocId::parse("x").unwrap();
        let t0 = Instant::now();
        let (mut server, mut writer, mut client, mut peers) = synced(t0);

        // Quiet: the first change goes out in its own turn, no timer.
        write(&mut writer, &mut server, 1);
        let now = t0 + Duration::from_millis(10);
        let (out, next) = repo_exchange(&id, &mut server, &mut peers, vec![], &turn(true, now));
        assert_eq!(client.take(&out), 1, "leading edge");
        assert_eq!(next, None);

        // Nine more while that push is unanswered: held back, a flush scheduled.
        let mut due = None;
        for i in 2..=10u64 {
            write(&mut writer, &mut server, i as i64);
            let now = t0 + Duration::from_millis(10 * i);
            let (out, next) = repo_exchange(&id, &mut server, &mut peers, vec![], &turn(true, now));
            assert_eq!(client.take(&out), 0, "unanswered: coalesced");
            due = next.or(due);
        }
        assert_eq!(due, Some(t0 + Duration::from_millis(10) + INTERVAL));

        // The peer's answer starts a turn that sends the nine in one message, before the timer.
        let answer = client.send(&mut server).expect("the client acknowledges");
        assert!(!answer.had_changes);
        let now = t0 + Duration::from_millis(120);
        let (out, next) = repo_exchange(
            &id,
            &mut server,
            &mut peers,
            vec![answer],
            &turn(false, now),
        );
        assert_eq!(client.take(&out), 1, "one message for the nine changes");
        assert_eq!(next, None);
        settle(&mut client, &mut server, &mut peers, now);
        assert_eq!(client.doc.get_heads(), server.get_heads());
    }

    #[test]
    fn a_peer_that_never_answers_gets_the_held_back_changes_after_the_interval() {
        let id = DocId::parse("x").unwrap();
        let t0 = Instant::now();
        let (mut server, mut writer, mut client, mut peers) = synced(t0);
        write(&mut writer, &mut server, 1);
        let (out, _) = repo_exchange(&id, &mut server, &mut peers, vec![], &turn(true, t0));
        assert_eq!(client.take(&out), 1);
        write(&mut writer, &mut server, 2);
        let later = t0 + Duration::from_millis(5);
        let (out, due) = repo_exchange(&id, &mut server, &mut peers, vec![], &turn(true, later));
        assert_eq!(client.take(&out), 0);
        let due = due.expect("a flush turn is scheduled");
        assert_eq!(due, t0 + INTERVAL);
        let (out, next) = repo_exchange(&id, &mut server, &mut peers, vec![], &turn(false, due));
        assert_eq!(client.take(&out), 1, "the flush turn sends it");
        assert_eq!(next, None);
        settle(&mut client, &mut server, &mut peers, due);
        assert_eq!(client.doc.get_heads(), server.get_heads());
    }

    #[test]
    fn a_peer_that_sent_changes_is_answered_at_once() {
        let id = DocId::parse("x").unwrap();
        let t0 = Instant::now();
        let mut server = Automerge::new();
        let mut client = Client {
            doc: AutoCommit::new(),
            state: sync::State::new(),
        };
        client.doc.put(ROOT, "n", 1).unwrap();
        let mut peers = RepoStates::new();
        peers.insert(1, PeerSync::default());
        settle(&mut client, &mut server, &mut peers, t0);
        client.doc.put(ROOT, "n", 2).unwrap();
        let incoming = client.send(&mut server).unwrap();
        assert!(incoming.had_changes);
        let now = t0 + Duration::from_millis(1);
        let (out, next) = repo_exchange(
            &id,
            &mut server,
            &mut peers,
            vec![incoming],
            &turn(true, now),
        );
        assert_eq!(client.take(&out), 1, "not held back by the interval");
        assert_eq!(next, None);
    }

    #[test]
    fn a_request_for_a_missing_document_is_unavailable() {
        let id = DocId::parse("x").unwrap();
        let mut server = Automerge::new();
        let mut client = Client {
            doc: AutoCommit::new(),
            state: sync::State::new(),
        };
        let mut incoming = client.send(&mut server).unwrap();
        incoming.request = true;
        let mut peers = RepoStates::new();
        peers.insert(1, PeerSync::default());
        let missing = Exchange {
            exists: false,
            changed: false,
            interval: INTERVAL,
            now: Instant::now(),
        };
        let (out, _) = repo_exchange(&id, &mut server, &mut peers, vec![incoming], &missing);
        assert_eq!(out, vec![(1, Outgoing::Unavailable { doc: id })]);
    }
}
