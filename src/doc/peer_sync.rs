//! Our sync state with one automerge-repo peer of a document, and receiving its messages.
//!
//! automerge's `receive_sync_message` trims the hashes we sent the peer (`sent_hashes`) by
//! walking the **whole** history below the peer's heads on every message, so its cost grows
//! with the document's history: in a 64-typist storm it was half of the relay's CPU, more than
//! merging, saving and generating messages together. The owner has already merged a message's
//! changes with its batch (they were split out and validated before), so only the bookkeeping
//! is left, and [`PeerSync::receive`] does it as automerge 0.12 does, with one difference: the
//! trim walks only the changes the peer gained since its previous message. A per-peer clock
//! (for each actor, the highest sequence number below the peer's last heads) marks where the
//! history the peer already had begins: a change of actor `a` with `seq <= clock[a]` lies below
//! those heads, and so does everything under it.
//!
//! One deliberate difference: when some of the peer's heads are still unknown after the merge
//! (their changes wait for dependencies), automerge first advances the shared heads by the
//! heads that loading the message produced; the owner merges a whole batch at once and cannot
//! tell which peer produced which head, so the shared heads keep what both sides had before,
//! plus the peer's heads we know. That is less precise, never wrong: a smaller shared state
//! only makes the next exchange carry a little more.

use std::collections::{HashMap, HashSet};

use automerge::sync::{self, Capability, MessageFlags};
use automerge::{ActorId, Automerge, AutomergeError, ChangeHash};

/// Actor, sequence number and dependencies of changes, each looked up in the document once
/// for every peer of a turn: automerge builds every lookup from its op set, and in a storm all
/// peers acknowledge the same new changes. Valid for one state of one document; make a fresh
/// one per turn.
#[derive(Default)]
pub struct ChangeMetas(HashMap<ChangeHash, Option<(ActorId, u64, Vec<ChangeHash>)>>);

impl ChangeMetas {
    fn get(
        &mut self,
        doc: &Automerge,
        hash: &ChangeHash,
    ) -> Option<&(ActorId, u64, Vec<ChangeHash>)> {
        self.0
            .entry(*hash)
            .or_insert_with(|| {
                doc.get_change_meta_by_hash(hash)
                    .map(|m| (m.actor.into_owned(), m.seq, m.deps))
            })
            .as_ref()
    }
}

/// The sync messages of one turn, by the sync state they were generated from. Peers in the
/// same state (in a storm, every peer that acknowledged the last push and typed nothing since)
/// get the same message, and generating one costs far more than receiving: automerge rebuilds
/// each change from its op set and computes the peer's changes and a bloom filter every time.
/// A peer whose state equals an earlier one of the turn takes that message and the state it
/// left behind, exactly what generating would have produced. Valid for one state of one
/// document; make a fresh one per turn.
#[derive(Default)]
pub struct TurnMessages {
    by_state: HashMap<sync::State, (sync::State, Option<Vec<u8>>)>,
    /// Messages generated (not shared), for the tests.
    #[cfg(test)]
    generated: usize,
}

impl TurnMessages {
    /// The encoded sync message for `peer`, as `generate_sync_message` would make it.
    pub fn generate(&mut self, doc: &Automerge, peer: &mut PeerSync) -> Option<Vec<u8>> {
        use automerge::sync::SyncDoc;
        if let Some((after, data)) = self.by_state.get(&peer.state) {
            peer.state.clone_from(after);
            return data.clone();
        }
        let before = peer.state.clone();
        let data = doc
            .generate_sync_message(&mut peer.state)
            .map(|m| m.encode());
        #[cfg(test)]
        {
            self.generated += 1;
        }
        self.by_state
            .insert(before, (peer.state.clone(), data.clone()));
        data
    }
}

/// What [`PeerSync::trim_sent`] found.
struct Walk {
    /// Changes walked (those the peer gained since its previous heads); the tests check that
    /// the walk stays this short.
    #[cfg(test)]
    walked: usize,
    /// The heads we do not hold.
    unknown: HashSet<ChangeHash>,
}

/// Our sync state with one peer of a document (fresh per connection). Also usable by any
/// automerge sync peer that merges a message's changes itself before receiving it (the
/// benchmarks' simulated clients do).
#[derive(Default)]
pub struct PeerSync {
    pub state: sync::State,
    /// For each actor, the highest `seq` of its changes below the peer's last known heads.
    their_clock: HashMap<ActorId, u64>,
    /// When we last sent this peer a sync message.
    pub(super) last_sent: Option<std::time::Instant>,
    /// The peer is owed a sync message that the push interval held back.
    pub(super) due: bool,
}

impl PeerSync {
    /// Forgets everything about the peer: the next exchange starts from nothing.
    pub fn reset(&mut self) {
        self.state = sync::State::new();
        self.their_clock.clear();
        self.due = false;
    }

    /// Takes in one sync message from the peer whose changes `doc` already holds (the message's
    /// `changes` are ignored). `had_changes` says whether it carried any.
    pub fn receive(&mut self, doc: &Automerge, message: sync::Message, had_changes: bool) {
        self.receive_with(doc, message, had_changes, &mut ChangeMetas::default());
    }

    /// [`PeerSync::receive`], sharing change lookups with the other peers of the same turn.
    pub fn receive_with(
        &mut self,
        doc: &Automerge,
        message: sync::Message,
        had_changes: bool,
        metas: &mut ChangeMetas,
    ) {
        let state = &mut self.state;
        state.in_flight = false;
        let sync::Message {
            heads,
            need,
            have,
            flags,
            ..
        } = message;
        if let Some(flags) = flags {
            // A peer that sends flags speaks the V2 message format.
            let mut caps = vec![Capability::MessageV2];
            if flags.contains(MessageFlags::SUPPORTS_SYNC_RESET) {
                caps.push(Capability::SyncReset);
            }
            state.their_capabilities = Some(caps);
            if flags.contains(MessageFlags::SYNC_RESET) {
                state.sent_hashes.clear();
            }
            state.peer_read_only = flags.contains(MessageFlags::READ_ONLY);
        }
        let walk = self.trim_sent(doc, &heads, metas);
        let known: Vec<ChangeHash> = heads
            .iter()
            .filter(|h| !walk.unknown.contains(h))
            .copied()
            .collect();
        let state = &mut self.state;
        // A heads-only message equal to our heads: the peer knows our heads (automerge's rule;
        // a message with changes leaves this alone, so the peer gets our new heads).
        if !had_changes && heads == doc.get_heads() {
            state.last_sent_heads.clone_from(&heads);
        }
        if known.len() == heads.len() {
            state.shared_heads.clone_from(&heads);
            if heads.is_empty() {
                // The peer lost all its data: resync it from the start.
                state.last_sent_heads.clear();
                state.sent_hashes.clear();
                self.their_clock.clear();
            }
        } else {
            let mut shared: Vec<ChangeHash> = state.shared_heads.clone();
            shared.extend(known.iter().copied());
            shared.sort();
            shared.dedup();
            state.shared_heads = shared;
        }
        state.their_have = Some(have);
        state.their_heads = Some(heads);
        state.their_need = Some(need);
    }

    /// For a peer that merges a message's changes itself (the owner merges them with its
    /// batch instead): merges them with one `load_incremental`, then takes in the rest.
    pub fn merge_and_receive(
        &mut self,
        doc: &mut Automerge,
        mut message: sync::Message,
    ) -> Result<(), AutomergeError> {
        let had_changes = !message.changes.is_empty();
        if had_changes {
            let joined: Vec<u8> = message.changes.iter().flatten().copied().collect();
            doc.load_incremental(&joined)?;
            message.changes = sync::ChunkList::empty();
        }
        self.receive(doc, message, had_changes);
        Ok(())
    }

    /// True when a sync message to the peer could say nothing new: it has heard our heads, and
    /// either our last message is still unanswered or it already has exactly our heads and
    /// asks for nothing. automerge's `generate_sync_message` would return `None` then (after
    /// building a bloom filter of the changes since the last sync, which this check skips):
    /// most of a typing storm's flush turns are peers acknowledging what they received.
    pub fn has_nothing_to_hear(&self, our_heads: &[ChangeHash]) -> bool {
        let s = &self.state;
        let told = s.have_responded && s.last_sent_heads == our_heads;
        let in_sync = s.their_heads.as_deref() == Some(our_heads)
            && s.their_need.as_ref().is_none_or(|n| n.is_empty());
        told && (s.in_flight || in_sync)
    }

    /// Advances the peer's clock to `heads`, walking only the changes that are not already
    /// below its previous heads, then removes from `sent_hashes` every change the clock says
    /// the peer has.
    fn trim_sent(
        &mut self,
        doc: &Automerge,
        heads: &[ChangeHash],
        metas: &mut ChangeMetas,
    ) -> Walk {
        let mut gained: Vec<(ActorId, u64)> = Vec::new();
        let mut seen: HashSet<ChangeHash> = HashSet::new();
        let mut unknown: HashSet<ChangeHash> = HashSet::new();
        let mut stack: Vec<ChangeHash> = heads.to_vec();
        while let Some(hash) = stack.pop() {
            if !seen.insert(hash) {
                continue;
            }
            let Some((actor, seq, deps)) = metas.get(doc, &hash) else {
                // The dependencies of a change we hold are held too: this is one of `heads`.
                unknown.insert(hash);
                continue;
            };
            if self.has(actor, *seq) {
                // Below the peer's previous heads, with everything under it.
                continue;
            }
            gained.push((actor.clone(), *seq));
            stack.extend_from_slice(deps);
        }
        #[cfg(test)]
        let walked = gained.len();
        for (actor, seq) in gained {
            let max = self.their_clock.entry(actor).or_insert(0);
            *max = (*max).max(seq);
        }
        if !self.state.sent_hashes.is_empty() {
            let below: Vec<ChangeHash> = self
                .state
                .sent_hashes
                .iter()
                .filter(|h| {
                    metas
                        .get(doc, h)
                        .is_some_and(|(actor, seq, _)| self.has(actor, *seq))
                })
                .copied()
                .collect();
            for h in below {
                self.state.sent_hashes.remove(&h);
            }
        }
        Walk {
            #[cfg(test)]
            walked,
            unknown,
        }
    }

    /// Whether the peer's clock covers change `seq` of `actor` (an actor's change lies below
    /// each of its later ones).
    fn has(&self, actor: &ActorId, seq: u64) -> bool {
        self.their_clock.get(actor).is_some_and(|max| seq <= *max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::sync::SyncDoc;
    use automerge::transaction::CommitOptions;
    use automerge::transaction::Transactable;
    use automerge::{AutoCommit, ObjType, ROOT};

    fn type_into(doc: &mut AutoCommit, text: &automerge::ObjId, s: &str) {
        for ch in s.chars() {
            let len = automerge::ReadDoc::length(doc, text);
            doc.splice_text(text, len, 0, &ch.to_string()).unwrap();
            doc.commit_with(CommitOptions::default().with_time(0));
        }
    }

    /// Two servers holding the same document: `reference` receives with automerge's
    /// `receive_sync_message`, `ours` merges the changes first and then calls
    /// [`PeerSync::receive`], as the owner does.
    struct Twin {
        reference: Automerge,
        ref_states: Vec<sync::State>,
        ours: Automerge,
        peers: Vec<PeerSync>,
        /// Times `has_nothing_to_hear` held (and automerge agreed).
        quiet: usize,
    }

    impl Twin {
        fn receive(&mut self, i: usize, msg: sync::Message) {
            self.reference
                .receive_sync_message(&mut self.ref_states[i], msg.clone())
                .unwrap();
            self.peers[i]
                .merge_and_receive(&mut self.ours, msg)
                .unwrap();
            assert_eq!(self.reference.get_heads(), self.ours.get_heads());
            let (r, o) = (&self.ref_states[i], &self.peers[i].state);
            assert_eq!(r.sent_hashes, o.sent_hashes);
            assert_eq!(r.shared_heads, o.shared_heads);
            assert_eq!(r.last_sent_heads, o.last_sent_heads);
            assert_eq!(r.their_heads, o.their_heads);
            assert_eq!(r.their_need, o.their_need);
            assert_eq!(r.in_flight, o.in_flight);
        }

        fn generate(&mut self, i: usize) -> Option<sync::Message> {
            let quiet = self.peers[i].has_nothing_to_hear(&self.ours.get_heads());
            let r = self
                .reference
                .generate_sync_message(&mut self.ref_states[i]);
            if quiet {
                assert!(
                    r.is_none(),
                    "has_nothing_to_hear, yet automerge had something"
                );
                self.quiet += 1;
            }
            let o = self.ours.generate_sync_message(&mut self.peers[i].state);
            assert_eq!(
                r.as_ref().map(|m| m.clone().encode()),
                o.map(|m| m.encode())
            );
            r
        }
    }

    /// Three typists whose messages arrive late (crossing the server's answers, so sent
    /// hashes pile up unacknowledged): both servers keep identical states and send identical
    /// messages, and everyone converges.
    #[test]
    fn receive_matches_automerge() {
        let mut base = AutoCommit::new();
        // Fixed actors and times make every hash, and so every bloom filter, the same on every
        // run (a random actor made a bloom false positive, and a change waiting for its
        // dependencies, an occasional outcome).
        base.set_actor(ActorId::from(vec![0u8; 16]));
        let text = base.put_object(ROOT, "text", ObjType::Text).unwrap();
        base.commit_with(CommitOptions::default().with_time(0));
        let mut twin = Twin {
            reference: base.document().clone(),
            ref_states: (0..3).map(|_| sync::State::new()).collect(),
            ours: base.document().clone(),
            peers: (0..3).map(|_| PeerSync::default()).collect(),
            quiet: 0,
        };
        let mut clients: Vec<(AutoCommit, sync::State, Vec<sync::Message>)> = (0..3)
            .map(|i| {
                let mut c = base.fork();
                c.set_actor(ActorId::from(vec![i as u8 + 1; 16]));
                (c, sync::State::new(), Vec::new())
            })
            .collect();
        for round in 0..80 {
            let typing = round < 60;
            for (i, (client, state, outbox)) in clients.iter_mut().enumerate() {
                if typing && (round + i) % 3 != 0 {
                    type_into(client, &text, &format!("{i}{round}"));
                }
                outbox.extend(client.sync().generate_sync_message(state));
                if typing && (round + i) % 4 != 0 {
                    continue;
                }
                for msg in outbox.drain(..) {
                    twin.receive(i, msg);
                }
            }
            for (i, (client, state, _)) in clients.iter_mut().enumerate() {
                if let Some(m) = twin.generate(i) {
                    client.sync().receive_sync_message(state, m).unwrap();
                }
            }
        }
        for (client, _, _) in &mut clients {
            assert_eq!(client.get_heads(), twin.reference.get_heads());
        }
        assert!(
            twin.quiet > 10,
            "the shortcut held only {} times",
            twin.quiet
        );
    }

    /// A sync message that carries only `heads` (an acknowledgement).
    fn heads_only(heads: Vec<ChangeHash>) -> sync::Message {
        sync::Message {
            heads,
            need: vec![],
            have: vec![],
            changes: sync::ChunkList::empty(),
            flags: None,
            version: sync::MessageVersion::V1,
        }
    }

    #[test]
    fn the_walk_stops_at_what_the_peer_already_had() {
        let mut doc = AutoCommit::new();
        let text = doc.put_object(ROOT, "text", ObjType::Text).unwrap();
        doc.commit();
        type_into(&mut doc, &text, &"x".repeat(500));
        let mut peer = PeerSync::default();
        let old_heads = doc.get_heads();
        let fresh = &mut ChangeMetas::default();
        assert_eq!(
            peer.trim_sent(doc.document(), &old_heads, fresh).walked,
            501
        );
        assert_eq!(peer.their_clock.values().copied().max(), Some(501));
        type_into(&mut doc, &text, "abc");
        let last = doc.get_heads()[0];
        peer.state.sent_hashes.insert(last);
        // Pretend the peer also had a change that it does not: its hash stays.
        let unseen = ChangeHash([7; 32]);
        peer.state.sent_hashes.insert(unseen);
        let heads = doc.get_heads();
        let fresh = &mut ChangeMetas::default();
        assert_eq!(peer.trim_sent(doc.document(), &heads, fresh).walked, 3);
        peer.receive(doc.document(), heads_only(heads), false);
        assert!(!peer.state.sent_hashes.contains(&last));
        assert!(peer.state.sent_hashes.contains(&unseen));
        assert_eq!(peer.their_clock.values().copied().max(), Some(504));
    }

    /// Peers of one turn share their change lookups: the states come out as with lookups of
    /// their own, and each change is looked up once.
    #[test]
    fn peers_of_a_turn_share_change_lookups() {
        let mut doc = AutoCommit::new();
        let text = doc.put_object(ROOT, "text", ObjType::Text).unwrap();
        doc.commit();
        type_into(&mut doc, &text, "hello");
        let start = doc.get_heads();
        type_into(&mut doc, &text, " world");
        let sent: Vec<ChangeHash> = doc.get_changes(&start).iter().map(|c| c.hash()).collect();
        let heads = doc.get_heads();
        let mut shared = ChangeMetas::default();
        let mut alone: Vec<PeerSync> = Vec::new();
        let mut together: Vec<PeerSync> = Vec::new();
        for _ in 0..3 {
            for (peers, metas) in [(&mut alone, None), (&mut together, Some(&mut shared))] {
                let mut peer = PeerSync::default();
                peer.receive(doc.document(), heads_only(start.clone()), false);
                peer.state.sent_hashes.extend(sent.iter().copied());
                match metas {
                    Some(m) => {
                        peer.receive_with(doc.document(), heads_only(heads.clone()), false, m)
                    }
                    None => peer.receive(doc.document(), heads_only(heads.clone()), false),
                }
                peers.push(peer);
            }
        }
        for (a, b) in alone.iter().zip(&together) {
            assert!(
                b.state.sent_hashes.is_empty(),
                "the peer has every sent change"
            );
            assert_eq!(a.state.sent_hashes, b.state.sent_hashes);
            assert_eq!(a.state.shared_heads, b.state.shared_heads);
            assert_eq!(a.their_clock, b.their_clock);
        }
        // Every change (the six new ones, "hello" and the text object's) at most once.
        assert!(shared.0.len() <= 12, "{} lookups", shared.0.len());
    }

    /// Peers in equal states share one generated message and end in the same state as if
    /// each had generated its own; a peer in another state gets its own message.
    #[test]
    fn peers_in_the_same_state_share_a_message() {
        let mut doc = AutoCommit::new();
        let text = doc.put_object(ROOT, "text", ObjType::Text).unwrap();
        doc.commit();
        type_into(&mut doc, &text, "shared");
        let base = doc.get_heads();
        let first = doc.get_changes(&[])[0].hash();
        let now = doc.document().clone();
        let message = |heads: Vec<ChangeHash>| sync::Message {
            have: vec![sync::Have::default()],
            ..heads_only(heads)
        };
        let make = |heads: &[ChangeHash]| {
            let mut peer = PeerSync::default();
            peer.receive(&now, message(heads.to_vec()), false);
            peer
        };
        let mut turn = TurnMessages::default();
        let mut shared = [make(&[]), make(&[]), make(&[first]), make(&[])];
        let mut alone = [make(&[]), make(&[]), make(&[first]), make(&[])];
        for (a, b) in shared.iter_mut().zip(alone.iter_mut()) {
            let got = turn.generate(doc.document(), a);
            let want = doc
                .document()
                .generate_sync_message(&mut b.state)
                .map(|m| m.encode());
            assert!(got.is_some());
            assert_eq!(got, want);
            assert_eq!(a.state, b.state);
        }
        // Three peers with nothing, one with the first change: two messages generated.
        assert_eq!(turn.generated, 2);
        // The next turn, after the document moved on, starts afresh.
        type_into(&mut doc, &text, "!");
        assert_ne!(doc.get_heads(), base);
        let now = doc.document().clone();
        let mut turn = TurnMessages::default();
        for (a, b) in shared.iter_mut().zip(alone.iter_mut()) {
            a.receive(&now, message(base.clone()), false);
            b.receive(&now, message(base.clone()), false);
            let got = turn.generate(&now, a);
            let want = now.generate_sync_message(&mut b.state).map(|m| m.encode());
            assert_eq!(got, want);
            assert_eq!(a.state, b.state);
        }
        assert_eq!(turn.generated, 1);
    }
}
