//! Property tests for everything that parses client bytes (the fuzz targets in fuzz/ explore the
//! same ground with coverage guidance; these run in CI). Case counts are modest so the file
//! runs in seconds in a debug build.

use std::collections::{BTreeSet, HashMap, HashSet};

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, AutoCommit, ChangeHash, ObjType, ReadDoc, Value, ROOT};
use automerge_relay::DocId;
use automerge_relay::RelayError;
use automerge_relay::{etag_for, parse_heads};
use automerge_relay::{parse_upload, split_chunks, Upload};
use automerge_relay::{EphemeralFilter, RepoAction as Action, RepoConnection as Connection};
use automerge_relay::{PeerMetadata, RepoMessage};
use bytes::Bytes;
use proptest::prelude::*;

const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];

fn cfg(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

fn parse(bytes: &[u8]) -> Result<Upload, RelayError> {
    parse_upload(Bytes::copy_from_slice(bytes))
}

fn hashes(up: &Upload) -> BTreeSet<ChangeHash> {
    up.doc_hashes
        .iter()
        .copied()
        .chain(up.changes.iter().map(|c| c.hash()))
        .collect()
}

fn assert_upload_error(e: &RelayError) {
    assert!(
        matches!(
            e,
            RelayError::InvalidBody(_) | RelayError::EmptyBody | RelayError::NoChanges
        ),
        "unexpected error kind {e:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Documents built from random operations
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Put(u8, i64),
    PutStr(u8, String),
    Delete(u8),
    MakeText,
    Splice(u16, u8, String),
    MakeList,
    Insert(u16, i64),
    Commit,
    Fork,
    Merge,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => (any::<u8>(), any::<i64>()).prop_map(|(k, v)| Op::Put(k, v)),
        1 => (any::<u8>(), "[a-zé ]{0,6}").prop_map(|(k, s)| Op::PutStr(k, s)),
        1 => any::<u8>().prop_map(Op::Delete),
        1 => Just(Op::MakeText),
        1 => (any::<u16>(), any::<u8>(), "[a-z😀 ]{0,6}").prop_map(|(p, d, s)| Op::Splice(p, d, s)),
        1 => Just(Op::MakeList),
        1 => (any::<u16>(), any::<i64>()).prop_map(|(p, v)| Op::Insert(p, v)),
        3 => Just(Op::Commit),
        1 => Just(Op::Fork),
        1 => Just(Op::Merge),
    ]
}

struct Built {
    doc: AutoCommit,
    /// Heads after every commit of the final document's history (split points).
    snapshots: Vec<Vec<ChangeHash>>,
}

fn object(doc: &AutoCommit, name: &str, want: ObjType) -> Option<automerge::ObjId> {
    match doc.get(ROOT, name).ok().flatten() {
        Some((Value::Object(t), id)) if t == want => Some(id),
        _ => None,
    }
}

fn build(ops: &[Op]) -> Built {
    let actor = |n: u8| ActorId::from(vec![n; 16]);
    let mut clock = 0;
    let mut seal = |d: &mut AutoCommit| {
        clock += 1;
        d.commit_with(CommitOptions::default().with_time(clock));
    };
    let mut peers = vec![AutoCommit::new().with_actor(actor(1))];
    let mut snapshots = vec![Vec::new()];
    let key = |k: &u8| format!("k{}", k % 8);
    for op in ops {
        let count = peers.len();
        let d = &mut peers[count - 1];
        match op {
            Op::Put(k, v) => d.put(ROOT, key(k), *v).unwrap(),
            Op::PutStr(k, s) => d.put(ROOT, key(k), s.as_str()).unwrap(),
            Op::Delete(k) => d.delete(ROOT, key(k)).unwrap(),
            Op::MakeText => {
                d.put_object(ROOT, "text", ObjType::Text).unwrap();
            }
            Op::Splice(pos, del, s) => {
                if let Some(obj) = object(d, "text", ObjType::Text) {
                    let len = d.length(&obj);
                    let pos = usize::from(*pos) % (len + 1);
                    let del = usize::from(*del).min(len - pos);
                    d.splice_text(&obj, pos, del as isize, s).unwrap();
                }
            }
            Op::MakeList => {
                d.put_object(ROOT, "list", ObjType::List).unwrap();
            }
            Op::Insert(pos, v) => {
                if let Some(obj) = object(d, "list", ObjType::List) {
                    let len = d.length(&obj);
                    d.insert(&obj, usize::from(*pos) % (len + 1), *v).unwrap();
                }
            }
            Op::Commit => {
                seal(d);
                snapshots.push(d.get_heads());
            }
            Op::Fork if count < 3 => {
                seal(d);
                let n = count as u8 + 1;
                let fork = d.fork().with_actor(actor(n));
                peers.push(fork);
            }
            Op::Merge | Op::Fork => {
                if peers.len() > 1 {
                    let mut other = peers.pop().unwrap();
                    seal(&mut other);
                    let last = peers.len() - 1;
                    seal(&mut peers[last]);
                    peers[last].merge(&mut other).unwrap();
                }
            }
        }
    }
    while peers.len() > 1 {
        let mut other = peers.pop().unwrap();
        seal(&mut other);
        let last = peers.len() - 1;
        seal(&mut peers[last]);
        peers[last].merge(&mut other).unwrap();
    }
    let mut doc = peers.pop().unwrap();
    seal(&mut doc);
    Built { doc, snapshots }
}

fn change_hashes(doc: &mut AutoCommit, since: &[ChangeHash]) -> BTreeSet<ChangeHash> {
    doc.get_changes(since).iter().map(|c| c.hash()).collect()
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(op(), 0..24)
}

/// A save that is not Automerge data with changes: `want` empty.
fn assert_faithful(bytes: &[u8], want: &BTreeSet<ChangeHash>) {
    match parse(bytes) {
        Ok(up) => {
            assert_eq!(hashes(&up), *want);
            assert_eq!(up.change_count(), want.len());
        }
        Err(e) => {
            assert!(want.is_empty(), "rejected a valid save: {e}");
            assert!(matches!(e, RelayError::EmptyBody | RelayError::NoChanges));
        }
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Truncate(prop::sample::Index),
    Flip(prop::sample::Index, u8),
    Append(Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<prop::sample::Index>().prop_map(Mutation::Truncate),
        (any::<prop::sample::Index>(), 1..=255u8).prop_map(|(i, m)| Mutation::Flip(i, m)),
        prop::collection::vec(any::<u8>(), 1..32).prop_map(Mutation::Append),
        // Junk that starts like a chunk, so it is judged by more than the magic bytes.
        prop::collection::vec(any::<u8>(), 1..32).prop_map(|tail| {
            let mut junk = MAGIC.to_vec();
            junk.extend(tail);
            Mutation::Append(junk)
        }),
    ]
}

proptest! {
    #![proptest_config(cfg(256))]

    #[test]
    fn arbitrary_bytes_never_panic_and_fail_as_bad_uploads(
        body in prop::collection::vec(any::<u8>(), 0..256),
        magic in any::<bool>(),
    ) {
        let mut bytes = if magic { MAGIC.to_vec() } else { Vec::new() };
        bytes.extend(body);
        match parse(&bytes) {
            Ok(up) => prop_assert!(up.change_count() > 0),
            Err(e) => assert_upload_error(&e),
        }
    }
}

proptest! {
    #![proptest_config(cfg(256))]

    #[test]
    fn saves_and_save_after_splits_parse_with_the_right_changes(
        ops in ops(),
        split in any::<prop::sample::Index>(),
    ) {
        let Built { mut doc, snapshots } = build(&ops);
        let all = change_hashes(&mut doc, &[]);
        assert_faithful(&doc.save(), &all);
        assert_faithful(&doc.save_nocompress(), &all);
        // Any split point: the changes after it, and the document up to it plus those changes.
        let heads = split.get(&snapshots).clone();
        let after = change_hashes(&mut doc, &heads);
        let tail = doc.save_after(&heads);
        assert_faithful(&tail, &after);
        let mut head = doc.fork_at(&heads).unwrap();
        let mut both = head.save();
        both.extend_from_slice(&tail);
        assert_faithful(&both, &all);
        // Every change as its own chunk.
        let chunks: Vec<u8> =
            doc.get_changes(&[]).iter().flat_map(|c| c.raw_bytes().to_vec()).collect();
        assert_faithful(&chunks, &all);
    }

    #[test]
    fn mutated_saves_are_rejected_or_carry_only_the_original_changes(
        ops in ops(),
        incremental in any::<bool>(),
        split in any::<prop::sample::Index>(),
        m in mutation(),
    ) {
        let Built { mut doc, snapshots } = build(&ops);
        let (bytes, want) = if incremental {
            let heads = split.get(&snapshots).clone();
            (doc.save_after(&heads), change_hashes(&mut doc, &heads))
        } else {
            (doc.save(), change_hashes(&mut doc, &[]))
        };
        prop_assume!(!bytes.is_empty());
        let single_chunk = split_chunks(&bytes).unwrap().len() == 1;
        let mutated = match &m {
            Mutation::Truncate(i) => bytes[..i.index(bytes.len())].to_vec(),
            Mutation::Flip(i, mask) => {
                let mut b = bytes.clone();
                b[i.index(bytes.len())] ^= mask;
                b
            }
            Mutation::Append(junk) => [&bytes[..], junk].concat(),
        };
        match parse(&mutated) {
            Err(e) => assert_upload_error(&e),
            Ok(up) => {
                let got = hashes(&up);
                prop_assert!(got.is_subset(&want), "accepted changes the original did not carry");
                match m {
                    // A truncated single chunk is never a valid upload.
                    Mutation::Truncate(_) => prop_assert!(!single_chunk, "accepted a truncated save"),
                    Mutation::Flip(..) => prop_assert_eq!(got, want),
                    // Junk after a complete upload is another chunk: it must be valid by itself.
                    Mutation::Append(junk) => prop_assert!(parse(&junk).is_ok(), "accepted trailing junk"),
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// automerge-repo wire format and protocol core
// ---------------------------------------------------------------------------------------------

const DOC: &str = "3jBnkqtmACWf3kw8Kh3pSCFE3zVc";

fn text() -> impl Strategy<Value = String> {
    prop_oneof!["[a-zA-Z0-9-]{0,12}", any::<String>()]
}

fn data() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..48)
}

fn metadata() -> impl Strategy<Value = Option<PeerMetadata>> {
    proptest::option::of((proptest::option::of(text()), any::<bool>()).prop_map(
        |(storage_id, is_ephemeral)| PeerMetadata {
            storage_id,
            is_ephemeral,
        },
    ))
}

fn message() -> impl Strategy<Value = RepoMessage> {
    prop_oneof![
        (
            text(),
            metadata(),
            proptest::option::of(prop::collection::vec(text(), 0..3))
        )
            .prop_map(|(sender_id, peer_metadata, versions)| RepoMessage::Join {
                sender_id,
                peer_metadata,
                supported_protocol_versions: versions,
            }),
        (text(), text(), metadata(), text()).prop_map(|(s, t, peer_metadata, v)| {
            RepoMessage::Peer {
                sender_id: s,
                target_id: t,
                peer_metadata,
                selected_protocol_version: v,
            }
        }),
        (
            proptest::option::of(text()),
            proptest::option::of(text()),
            text()
        )
            .prop_map(|(sender_id, target_id, message)| RepoMessage::Error {
                sender_id,
                target_id,
                message,
            }),
        (text(), text(), text(), data(), any::<bool>()).prop_map(|(s, t, d, data, req)| {
            if req {
                RepoMessage::Request {
                    sender_id: s,
                    target_id: t,
                    document_id: d,
                    data,
                }
            } else {
                RepoMessage::Sync {
                    sender_id: s,
                    target_id: t,
                    document_id: d,
                    data,
                }
            }
        }),
        (text(), text(), text()).prop_map(|(s, t, d)| RepoMessage::DocUnavailable {
            sender_id: s,
            target_id: t,
            document_id: d,
        }),
        (text(), text(), text(), text(), any::<u64>(), data()).prop_map(
            |(s, t, d, session_id, count, data)| RepoMessage::Ephemeral {
                sender_id: s,
                target_id: t,
                document_id: d,
                session_id,
                count,
                data,
            }
        ),
        (
            prop::sample::select(vec![
                "leave",
                "remote-heads-changed",
                "remote-subscription-change"
            ]),
            proptest::option::of(text())
        )
            .prop_map(|(kind, sender_id)| RepoMessage::Ignored {
                kind: kind.to_string(),
                sender_id,
            }),
    ]
}

/// A real automerge sync message (one that carries a change), so frames get past decoding.
fn real_sync_data() -> Vec<u8> {
    use automerge::sync::{self, SyncDoc};
    let mut doc = build(&[Op::Put(1, 1), Op::Commit]).doc;
    let mut state = sync::State::new();
    let mut empty = AutoCommit::new();
    let mut their = sync::State::new();
    let first = doc.sync().generate_sync_message(&mut state).unwrap();
    empty
        .sync()
        .receive_sync_message(&mut their, first)
        .unwrap();
    let reply = empty.sync().generate_sync_message(&mut their).unwrap();
    doc.sync().receive_sync_message(&mut state, reply).unwrap();
    let message = doc.sync().generate_sync_message(&mut state).unwrap();
    message.encode()
}

/// Frames a client might send: garbage, or messages from the joined peer or someone else, for a
/// valid or invalid document, with real or garbage sync data.
fn frame(real: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let patched = (message(), any::<bool>(), any::<bool>(), any::<bool>()).prop_map(
        move |(mut m, own, good_doc, real_data)| {
            match &mut m {
                RepoMessage::Sync {
                    sender_id,
                    document_id,
                    data,
                    ..
                }
                | RepoMessage::Request {
                    sender_id,
                    document_id,
                    data,
                    ..
                }
                | RepoMessage::Ephemeral {
                    sender_id,
                    document_id,
                    data,
                    ..
                } => {
                    if own {
                        *sender_id = "peer".into();
                    }
                    if good_doc {
                        *document_id = DOC.into();
                    }
                    if real_data {
                        *data = real.clone();
                    }
                }
                _ => {}
            }
            m.encode()
        },
    );
    prop_oneof![3 => patched, 1 => data()]
}

fn join(peer: &str) -> Vec<u8> {
    RepoMessage::Join {
        sender_id: peer.into(),
        peer_metadata: None,
        supported_protocol_versions: Some(vec!["1".into()]),
    }
    .encode()
}

proptest! {
    #![proptest_config(cfg(256))]

    #[test]
    fn repo_messages_round_trip(m in message()) {
        let back = RepoMessage::decode(&m.encode()).unwrap();
        prop_assert_eq!(back, m);
    }

    #[test]
    fn arbitrary_frames_decode_or_fail_and_decoded_frames_round_trip(
        frame in prop::collection::vec(any::<u8>(), 0..128),
    ) {
        if let Ok(m) = RepoMessage::decode(&frame) {
            prop_assert_eq!(RepoMessage::decode(&m.encode()).unwrap(), m);
        }
    }

    #[test]
    fn ephemeral_filter_admits_each_message_once_and_only_increasing_counts(
        steps in prop::collection::vec((0..3u8, 0..3u8, 0..6u64, any::<bool>()), 0..64),
    ) {
        let mut filter = EphemeralFilter::default();
        let mut last: HashMap<(u8, u8), u64> = HashMap::new();
        let mut admitted: HashSet<(u8, u8, u64)> = HashSet::new();
        for (sender, session, count, forget) in steps {
            let (s, t) = (format!("peer{sender}"), format!("session{session}"));
            if forget {
                filter.forget(&s);
                last.retain(|(p, _), _| *p != sender);
                admitted.retain(|(p, _, _)| *p != sender);
                continue;
            }
            let expect = last.get(&(sender, session)).is_none_or(|&seen| count > seen);
            prop_assert_eq!(filter.admit(&s, &t, count), expect);
            if expect {
                prop_assert!(admitted.insert((sender, session, count)), "admitted twice");
                last.insert((sender, session), count);
            }
            prop_assert_eq!(filter.len(), last.len());
        }
    }
}

proptest! {
    #![proptest_config(cfg(512))]

    #[test]
    fn connection_never_panics_and_never_syncs_before_a_join(
        join_first in any::<bool>(),
        frames in prop::collection::vec(frame(real_sync_data()), 0..8),
    ) {
        let mut conn = Connection::new("relay-server");
        let mut joined = false;
        let all = join_first.then(|| join("peer")).into_iter().chain(frames);
        for frame in all {
            let actions = conn.receive(&frame);
            let mut closed = false;
            for action in &actions {
                match action {
                    Action::Joined { .. } => joined = true,
                    Action::Sync { message, .. } => {
                        prop_assert!(joined, "sync before join");
                        prop_assert!(message.changes.is_empty());
                    }
                    Action::Ephemeral { sender_id, .. } => {
                        prop_assert!(joined, "ephemeral before join");
                        prop_assert_eq!(Some(sender_id.as_str()), conn.peer_id());
                    }
                    Action::Send(m) => {
                        let handshake = matches!(m, RepoMessage::Error { .. } | RepoMessage::Peer { .. });
                        prop_assert!(joined || handshake, "sent {:?} before a join", m);
                    }
                    Action::Close { .. } => closed = true,
                }
            }
            if closed {
                break;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Ids and ?since= heads
// ---------------------------------------------------------------------------------------------

/// The documented id rule (docs/http-api.md): 1–128 characters of `A-Z a-z 0-9 . _ ~ -`, not starting with `_` or `.`.
fn id_rule(s: &str) -> bool {
    (1..=128).contains(&s.chars().count())
        && !s.starts_with(['_', '.'])
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '~' | '-'))
}

proptest! {
    #![proptest_config(cfg(512))]

    #[test]
    fn doc_ids_follow_the_documented_rule(
        s in prop_oneof![
            "[A-Za-z0-9._~-]{0,140}",
            "[A-Za-z0-9._~/%é ;:\\\\\u{0}-]{0,12}",
            any::<String>(),
        ],
    ) {
        match DocId::parse(&s) {
            Ok(id) => {
                prop_assert!(id_rule(&s), "accepted {:?}", s);
                prop_assert_eq!(id.as_str(), s.as_str());
            }
            Err(e) => {
                prop_assert!(!id_rule(&s), "rejected {:?}", s);
                prop_assert!(matches!(e, RelayError::BadId(_)));
            }
        }
    }

    #[test]
    fn valid_doc_ids_are_always_accepted(s in "[A-Za-z0-9~-][A-Za-z0-9._~-]{0,127}") {
        prop_assert!(DocId::parse(&s).is_ok());
    }

    #[test]
    fn since_lists_parse_exactly_hex_hashes_and_etags_ignore_order(
        hashes in prop::collection::vec(any::<[u8; 32]>(), 0..4),
        upper in any::<bool>(),
        junk in proptest::option::of("[0-9a-fA-Fg-z]{1,70}"),
    ) {
        let mut parts: Vec<String> = hashes.iter().map(hex::encode).collect();
        if upper {
            parts = parts.iter().map(|p| p.to_uppercase()).collect();
        }
        let raw = parts.join(" , ");
        let heads = parse_heads(&raw).unwrap();
        prop_assert_eq!(heads.iter().map(|h| h.0).collect::<Vec<_>>(), hashes.clone());
        let mut rev = heads.clone();
        rev.reverse();
        prop_assert_eq!(etag_for(&rev), etag_for(&heads));
        if let Some(j) = junk {
            let is_hash = j.len() == 64 && j.bytes().all(|b| b.is_ascii_hexdigit());
            let r = parse_heads(&format!("{raw},{j}"));
            prop_assert_eq!(r.is_ok(), is_hash);
            if let Err(e) = r {
                prop_assert!(matches!(e, RelayError::BadSince(_)));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Crashes found by fuzzing (fuzz/README.md); each stays here as a regression test.
// ---------------------------------------------------------------------------------------------

/// `fuzz/artifacts/upload/crash-6f7f7c2c…`: a 180-byte bundle chunk (type 3) whose delta column
/// is cut short. automerge 0.12 panics while loading it (hexane `unwrap` on `UnexpectedEof`);
/// `parse_upload` catches that and answers `InvalidBody`.
#[test]
fn malformed_bundle_chunk_is_rejected_not_a_panic() {
    let bytes = hex::decode(concat!(
        "856f4a838cba54a903a90101e643dc8c96378c02b490bd5c95f5434efff4158586af5b4da6fe6f78",
        "d4bfd2980110010101010101010101010101010101010901020303130323023303450250025303600202",
        "007e02017e020502067e0201000202017e027e02000b010203041108130a2102340242025602570b70",
        "02b301080b007f010a0000010500000104007e000704017e750203010b00000b0b010b16776f726c64",
        "2068656c6c6f0b007f06feffff7d0501",
    ))
    .unwrap();
    assert!(matches!(parse(&bytes), Err(RelayError::InvalidBody(_))));
}

/// Every input in `tests/fixtures/fuzz-regressions/` (`upload-<n>.bin`, crash inputs of the
/// `upload` fuzz target: automerge decoder panics, and `upload-13.bin`, a bundle chunk whose
/// op-id column declares ~1.6 billion values and made automerge allocate gigabytes) is answered
/// as invalid input. A new crash input only needs to be added to that directory.
#[test]
fn fuzz_regression_inputs_are_rejected() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz-regressions");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !(name.starts_with("upload-") && name.ends_with(".bin")) {
            continue;
        }
        let result = parse(&std::fs::read(&path).unwrap());
        assert!(
            matches!(result, Err(RelayError::InvalidBody(_))),
            "{name}: {:?}",
            result.map(|up| up.change_count())
        );
        seen += 1;
    }
    assert!(
        seen >= 13,
        "only {seen} regression inputs in {}",
        dir.display()
    );
}

/// The bundle column limit (`MAX_BUNDLE_COLUMN_VALUES`) leaves real bundles alone, including
/// ones whose columns are long runs.
#[test]
fn real_bundles_with_long_runs_are_accepted() {
    let mut doc = AutoCommit::new().with_actor(ActorId::from(vec![7u8; 16]));
    let list = doc.put_object(ROOT, "list", ObjType::List).unwrap();
    for i in 0..3000 {
        doc.insert(&list, i, 1).unwrap();
    }
    doc.commit();
    for i in 0..20 {
        doc.put(ROOT, "k", i).unwrap();
        doc.commit();
    }
    let all: Vec<ChangeHash> = doc.get_changes(&[]).iter().map(|c| c.hash()).collect();
    let bundle = doc.bundle(all.iter().copied()).unwrap();
    let up = parse(bundle.bytes()).expect("a real bundle is accepted");
    assert_eq!(hashes(&up), all.into_iter().collect::<BTreeSet<_>>());
}
