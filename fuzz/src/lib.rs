//! Shared code for the fuzz targets and the seed-corpus generator: real Automerge data built
//! from fuzzer-chosen operations, the mutations applied to it, and the invariants each target
//! checks. Every check panics on a violation, so libFuzzer reports it as a crash.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::panic::{self, AssertUnwindSafe};
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use automerge::sync::{self, SyncDoc};
use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, AutoCommit, ChangeHash, ObjType, ReadDoc, Value, ROOT};
use automerge_relay::{etag_for, parse_heads};
use automerge_relay::RelayError;
use automerge_relay::DocId;
use automerge_relay::{RepoAction as Action, RepoConnection as Connection, CLOSE_PROTOCOL};
use automerge_relay::{PeerMetadata, RepoMessage};
use automerge_relay::{parse_upload, parse_upload_with, split_chunks, Hint, Upload};
use bytes::Bytes;

// ---------------------------------------------------------------------------------------------
// Panics
// ---------------------------------------------------------------------------------------------

thread_local! {
    /// The most recent panic on this thread: where it happened and its message.
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Replaces libfuzzer-sys's panic hook, which aborts the process on every panic, even one that
/// is caught. The relay catches automerge's decoder panics on purpose (`parse_upload_with`,
/// `Connection`'s sync decoding) and answers them as invalid input, so those must not count as
/// crashes. This hook only records the panic; [`fail_on_uncaught`] prints it if nothing caught
/// it and aborts, so libFuzzer still reports a crash (and saves the input).
/// `RELAY_FUZZ_PANIC_TRACE=1` also prints every panic, caught or not, with a backtrace.
/// Call it from the `init:` block of `fuzz_target!`.
pub fn install_panic_hook() {
    let trace = std::env::var_os("RELAY_FUZZ_PANIC_TRACE").is_some();
    panic::set_hook(Box::new(move |info| {
        let what = info.to_string();
        if trace {
            eprintln!("{what}\n{}", std::backtrace::Backtrace::force_capture());
        }
        LAST_PANIC.with(|last| *last.borrow_mut() = Some(what));
    }));
}

/// Runs one fuzz input. A panic that escapes it (one the relay did not catch: a bug, or a failed
/// check) is printed and the process aborts, so libFuzzer reports the input as a crash. (A panic
/// escaping without this wrapper aborts too, at libfuzzer-sys's `extern "C"` entry point, but
/// without its message.)
pub fn fail_on_uncaught<R>(run: impl FnOnce() -> R) -> R {
    match panic::catch_unwind(AssertUnwindSafe(run)) {
        Ok(r) => r,
        Err(_) => {
            let what = LAST_PANIC
                .with(|last| last.borrow_mut().take())
                .unwrap_or_else(|| "panicked (no message recorded)".into());
            eprintln!("uncaught panic in the fuzz target: {what}");
            std::process::abort()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Uploads
// ---------------------------------------------------------------------------------------------

/// The only errors an upload may fail with: anything else would be a 5xx for a client mistake.
pub fn assert_upload_error(e: &RelayError) {
    assert!(
        matches!(
            e,
            RelayError::InvalidBody(_) | RelayError::EmptyBody | RelayError::NoChanges
        ),
        "unexpected upload error kind: {e:?}"
    );
}

/// Every change hash an upload reports (document chunks and change chunks).
pub fn upload_hashes(up: &Upload) -> BTreeSet<ChangeHash> {
    up.doc_hashes
        .iter()
        .copied()
        .chain(up.changes.iter().map(|c| c.hash()))
        .collect()
}

/// Parses `bytes` plainly and with a hint chosen by `selector`, checks every invariant that
/// holds for any input, and returns the plain result.
pub fn check_upload(bytes: &[u8], selector: u8) -> Result<Upload, RelayError> {
    let plain = parse_upload(Bytes::copy_from_slice(bytes));
    match &plain {
        Err(e) => {
            assert_upload_error(e);
            if bytes.is_empty() {
                assert!(matches!(e, RelayError::EmptyBody), "empty body gave {e:?}");
            }
        }
        Ok(up) => {
            assert!(!bytes.is_empty());
            assert_eq!(&up.bytes[..], bytes, "upload bytes differ from the input");
            assert!(up.change_count() > 0, "accepted an upload with no changes");
            if !up.doc_hashes.is_empty() {
                assert!(up.has_doc_chunks);
            }
            assert!(up.doc_delta.is_none(), "delta without a hint");
            // Accepted uploads are well-framed.
            split_chunks(bytes).expect("accepted upload does not split into chunks");
        }
    }
    check_hinted(bytes, &plain, selector);
    plain
}

/// `parse_upload_with` agrees with `parse_upload` and its delta is what the hint implies.
fn check_hinted(bytes: &[u8], plain: &Result<Upload, RelayError>, selector: u8) {
    let doc_hashes: Vec<ChangeHash> = plain
        .as_ref()
        .map(|u| u.doc_hashes.clone())
        .unwrap_or_default();
    let foreign = ChangeHash([0xab; 32]);
    let heads = match selector % 4 {
        0 => vec![],
        1 => doc_hashes.first().copied().into_iter().collect(),
        2 => doc_hashes.last().copied().into_iter().collect(),
        _ => std::iter::once(foreign)
            .chain(doc_hashes.get(doc_hashes.len() / 2).copied())
            .collect(),
    };
    let hint = Hint {
        epoch: u64::from(selector),
        heads: heads.clone(),
    };
    let hinted = parse_upload_with(Bytes::copy_from_slice(bytes), Some(&hint));
    match (plain, &hinted) {
        (Err(a), Err(b)) => assert_eq!(a.code(), b.code(), "hint changed the error"),
        (Ok(a), Ok(b)) => {
            assert_eq!(a.doc_hashes, b.doc_hashes, "hint changed doc hashes");
            assert_eq!(
                a.changes.iter().map(|c| c.hash()).collect::<Vec<_>>(),
                b.changes.iter().map(|c| c.hash()).collect::<Vec<_>>(),
                "hint changed the changes"
            );
            let (epoch, delta) = b.doc_delta.as_ref().expect("no delta with a hint");
            assert_eq!(*epoch, hint.epoch);
            let delta: BTreeSet<ChangeHash> = delta.iter().map(|c| c.hash()).collect();
            let all: BTreeSet<ChangeHash> = a.doc_hashes.iter().copied().collect();
            assert!(
                delta.is_subset(&all),
                "delta holds changes not in the upload"
            );
            let known: Vec<&ChangeHash> = heads.iter().filter(|h| all.contains(h)).collect();
            if known.is_empty() {
                assert_eq!(
                    delta, all,
                    "without known heads every change is a candidate"
                );
            }
            for h in known {
                assert!(!delta.contains(h), "delta holds a head the server has");
            }
        }
        (a, b) => panic!(
            "hint changed acceptance: plain ok={} hinted ok={}",
            a.is_ok(),
            b.is_ok()
        ),
    }
}

/// What the document owner does with accepted bytes must not panic, and a lenient load of them
/// must hold every change of their document chunks (nothing accepted is silently dropped).
pub fn check_accepted_loads(bytes: &[u8], up: &Upload) {
    let mut doc = AutoCommit::new();
    doc.load_incremental(bytes)
        .expect("accepted upload fails load_incremental");
    for h in &up.doc_hashes {
        assert!(
            doc.get_change_by_hash(h).is_some(),
            "accepted change {h} missing after load_incremental"
        );
    }
    let mut doc = AutoCommit::new();
    doc.apply_changes(up.changes.iter().cloned())
        .expect("accepted changes fail apply_changes");
}

// ---------------------------------------------------------------------------------------------
// Real Automerge data from fuzzer-chosen operations
// ---------------------------------------------------------------------------------------------

pub const MAX_OPS: usize = 48;
const MAX_PEERS: usize = 4;

#[derive(Arbitrary, Debug, Clone)]
pub enum Op {
    Put { key: u8, value: i64 },
    PutStr { key: u8, value: String },
    Delete { key: u8 },
    MakeText,
    Splice { pos: u16, del: u8, text: String },
    MakeList,
    Insert { pos: u16, value: i64 },
    Commit,
    Fork,
    Merge,
    Switch(u8),
}

/// How the document is turned into upload bytes.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum SaveKind {
    Full,
    NoCompress,
    /// `save_after` one of the heads recorded at a commit.
    After(u8),
    /// Every change as its own change chunk, concatenated.
    Changes,
    /// A bundle of the changes after one of the recorded heads.
    Bundle(u8),
}

/// A built document and the heads recorded after each explicit commit.
pub struct Built {
    pub doc: AutoCommit,
    pub snapshots: Vec<Vec<ChangeHash>>,
}

fn short(s: &str) -> String {
    s.chars().take(16).collect()
}

fn key(k: u8) -> String {
    format!("k{}", k % 16)
}

fn seal(doc: &mut AutoCommit, clock: &mut i64) {
    *clock += 1;
    doc.commit_with(CommitOptions::default().with_time(*clock));
}

fn object(doc: &AutoCommit, name: &str, want: ObjType) -> Option<automerge::ObjId> {
    match doc.get(ROOT, name).ok().flatten() {
        Some((Value::Object(t), id)) if t == want => Some(id),
        _ => None,
    }
}

/// Deterministic: fixed actors and commit times, so the fuzzer sees stable coverage.
pub fn build(ops: &[Op]) -> Built {
    let actor = |n: u8| ActorId::from(vec![n; 16]);
    let mut clock = 0i64;
    let mut peers = vec![AutoCommit::new().with_actor(actor(1))];
    // Every fork gets an actor never used before: a reused actor would author a second, different
    // change with a sequence number its merged twin already has (`DuplicateSeqNumber`).
    let mut next_actor = 2u8;
    let mut cur = 0usize;
    let mut snapshots = vec![Vec::new()];
    for op in ops.iter().take(MAX_OPS) {
        match op {
            Op::Put { key: k, value } => {
                let _ = peers[cur].put(ROOT, key(*k), *value);
            }
            Op::PutStr { key: k, value } => {
                let _ = peers[cur].put(ROOT, key(*k), short(value));
            }
            Op::Delete { key: k } => {
                let _ = peers[cur].delete(ROOT, key(*k));
            }
            Op::MakeText => {
                let _ = peers[cur].put_object(ROOT, "text", ObjType::Text);
            }
            Op::Splice { pos, del, text } => {
                let d = &mut peers[cur];
                if let Some(obj) = object(d, "text", ObjType::Text) {
                    let len = d.length(&obj);
                    let pos = usize::from(*pos) % (len + 1);
                    let del = usize::from(*del).min(len - pos);
                    let _ = d.splice_text(&obj, pos, del as isize, &short(text));
                }
            }
            Op::MakeList => {
                let _ = peers[cur].put_object(ROOT, "list", ObjType::List);
            }
            Op::Insert { pos, value } => {
                let d = &mut peers[cur];
                if let Some(obj) = object(d, "list", ObjType::List) {
                    let len = d.length(&obj);
                    let _ = d.insert(&obj, usize::from(*pos) % (len + 1), *value);
                }
            }
            Op::Commit => {
                seal(&mut peers[cur], &mut clock);
                snapshots.push(peers[cur].get_heads());
            }
            Op::Fork => {
                if peers.len() < MAX_PEERS {
                    seal(&mut peers[cur], &mut clock);
                    let fork = peers[cur].fork().with_actor(actor(next_actor));
                    next_actor += 1;
                    peers.push(fork);
                    cur = peers.len() - 1;
                }
            }
            Op::Merge => {
                if peers.len() > 1 {
                    let mut other = peers.pop().expect("more than one peer");
                    seal(&mut other, &mut clock);
                    seal(&mut peers[0], &mut clock);
                    peers[0].merge(&mut other).expect("merging forks");
                    cur = 0;
                }
            }
            Op::Switch(i) => cur = usize::from(*i) % peers.len(),
        }
    }
    while peers.len() > 1 {
        let mut other = peers.pop().expect("more than one peer");
        seal(&mut other, &mut clock);
        seal(&mut peers[0], &mut clock);
        peers[0].merge(&mut other).expect("merging forks");
    }
    let mut doc = peers.pop().expect("one peer");
    seal(&mut doc, &mut clock);
    Built { doc, snapshots }
}

/// The bytes of `kind` and the hashes of the changes they carry.
pub fn save(built: &mut Built, kind: SaveKind) -> (Vec<u8>, BTreeSet<ChangeHash>) {
    let pick = |i: u8, snaps: &[Vec<ChangeHash>]| snaps[usize::from(i) % snaps.len()].clone();
    let doc = &mut built.doc;
    match kind {
        SaveKind::Full | SaveKind::NoCompress => {
            let all = doc.get_changes(&[]).iter().map(|c| c.hash()).collect();
            let bytes = if matches!(kind, SaveKind::Full) {
                doc.save()
            } else {
                doc.save_nocompress()
            };
            (bytes, all)
        }
        SaveKind::After(i) => {
            let heads = pick(i, &built.snapshots);
            let want = doc.get_changes(&heads).iter().map(|c| c.hash()).collect();
            (doc.save_after(&heads), want)
        }
        SaveKind::Changes => {
            let changes = doc.get_changes(&[]);
            let bytes = changes
                .iter()
                .flat_map(|c| c.raw_bytes().to_vec())
                .collect();
            (bytes, changes.iter().map(|c| c.hash()).collect())
        }
        SaveKind::Bundle(i) => {
            let heads = pick(i, &built.snapshots);
            let hashes: Vec<ChangeHash> =
                doc.get_changes(&heads).iter().map(|c| c.hash()).collect();
            if hashes.is_empty() {
                return (Vec::new(), BTreeSet::new());
            }
            let bundle = doc
                .bundle(hashes.iter().copied())
                .expect("bundling own changes");
            (bundle.bytes().to_vec(), hashes.into_iter().collect())
        }
    }
}

/// An unmutated save parses to exactly the changes it carries.
pub fn check_faithful(bytes: &[u8], want: &BTreeSet<ChangeHash>, selector: u8) {
    match check_upload(bytes, selector) {
        Ok(up) => {
            assert_eq!(
                upload_hashes(&up),
                *want,
                "valid save parsed to other changes"
            );
            assert_eq!(
                up.change_count(),
                want.len(),
                "valid save: wrong change count"
            );
            check_accepted_loads(bytes, &up);
        }
        Err(e) => {
            assert!(
                want.is_empty(),
                "valid save with {} changes rejected: {e}",
                want.len()
            );
            assert!(
                matches!(e, RelayError::EmptyBody | RelayError::NoChanges),
                "{e:?}"
            );
        }
    }
}

#[derive(Arbitrary, Debug, Clone)]
pub enum Mutation {
    Truncate(u16),
    Flip { at: u16, mask: u8 },
    Append(Vec<u8>),
    Insert { at: u16, bytes: Vec<u8> },
    Remove { at: u16, len: u8 },
    Repeat,
}

/// Applies `mutations` to `bytes`, returning the result and every piece of foreign bytes
/// inserted (chunks made entirely of those may legitimately carry other changes).
pub fn mutate(bytes: &[u8], mutations: &[Mutation]) -> (Vec<u8>, Vec<Vec<u8>>) {
    let mut out = bytes.to_vec();
    let mut junk = Vec::new();
    for m in mutations.iter().take(4) {
        let at = |i: u16, len: usize| {
            if len == 0 {
                0
            } else {
                usize::from(i) % (len + 1)
            }
        };
        match m {
            Mutation::Truncate(n) => out.truncate(at(*n, out.len())),
            Mutation::Flip { at: i, mask } => {
                if !out.is_empty() && *mask != 0 {
                    let i = usize::from(*i) % out.len();
                    out[i] ^= mask;
                }
            }
            Mutation::Append(b) => {
                out.extend_from_slice(b);
                junk.push(b.clone());
            }
            Mutation::Insert { at: i, bytes: b } => {
                let i = at(*i, out.len());
                out.splice(i..i, b.iter().copied());
                junk.push(b.clone());
            }
            Mutation::Remove { at: i, len } => {
                let i = at(*i, out.len());
                let end = (i + usize::from(*len)).min(out.len());
                out.drain(i..end);
            }
            Mutation::Repeat => {
                if out.len() < 1 << 16 {
                    out.extend_from_within(..);
                }
            }
        }
    }
    (out, junk)
}

/// A mutated save is rejected, or every chunk that is not an untouched original chunk (nor
/// foreign bytes inserted whole) carries only changes the original had.
pub fn check_mutated(
    original: &[u8],
    want: &BTreeSet<ChangeHash>,
    mutated: &[u8],
    junk: &[Vec<u8>],
    selector: u8,
) {
    let Ok(up) = check_upload(mutated, selector) else {
        return;
    };
    check_accepted_loads(mutated, &up);
    let originals: Vec<&[u8]> = split_chunks(original)
        .map(|v| v.into_iter().map(|(_, c)| c).collect())
        .unwrap_or_default();
    let mut seen = BTreeSet::new();
    for (_, chunk) in split_chunks(mutated).expect("accepted bytes split") {
        let part = match parse_upload(Bytes::copy_from_slice(chunk)) {
            Ok(p) => upload_hashes(&p),
            Err(RelayError::NoChanges) => BTreeSet::new(),
            Err(e) => panic!("chunk of an accepted upload rejected alone: {e}"),
        };
        seen.extend(part.iter().copied());
        if originals.contains(&chunk) || junk.iter().any(|j| contains(j, chunk)) {
            continue;
        }
        assert!(
            part.is_subset(want),
            "a mutated chunk was accepted with changes the original did not carry: {:?}",
            part.difference(want).collect::<Vec<_>>()
        );
    }
    assert_eq!(
        seen,
        upload_hashes(&up),
        "upload hashes differ from its chunks'"
    );
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.len() <= hay.len() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Input of the structured upload target.
#[derive(Arbitrary, Debug)]
pub struct MutateInput {
    pub ops: Vec<Op>,
    pub kind: SaveKind,
    pub mutations: Vec<Mutation>,
    pub selector: u8,
}

pub fn run_mutate(input: &MutateInput) {
    let mut built = build(&input.ops);
    let (bytes, want) = save(&mut built, input.kind);
    check_faithful(&bytes, &want, input.selector);
    if !input.mutations.is_empty() {
        let (mutated, junk) = mutate(&bytes, &input.mutations);
        check_mutated(&bytes, &want, &mutated, &junk, input.selector);
    }
}

// ---------------------------------------------------------------------------------------------
// automerge-repo wire format
// ---------------------------------------------------------------------------------------------

/// Any frame: decoding never panics, and what decodes re-encodes to the same message.
pub fn check_wire(frame: &[u8]) {
    if let Ok(msg) = RepoMessage::decode(frame) {
        let again = RepoMessage::decode(&msg.encode())
            .unwrap_or_else(|e| panic!("re-encoded {msg:?} does not decode: {e}"));
        assert_eq!(again, msg, "decode(encode(decode(frame))) differs");
    }
}

/// A message built from fuzzer data; `msg()` turns it into a [`RepoMessage`].
#[derive(Arbitrary, Debug, Clone)]
pub enum MsgSpec {
    Join {
        sender: String,
        storage: Option<Option<String>>,
        ephemeral: bool,
        versions: Option<Vec<String>>,
    },
    Peer {
        sender: String,
        target: String,
        version: String,
    },
    Error {
        sender: Option<String>,
        target: Option<String>,
        message: String,
    },
    Sync {
        sender: String,
        doc: String,
        data: Vec<u8>,
        request: bool,
    },
    DocUnavailable {
        sender: String,
        doc: String,
    },
    Ephemeral {
        sender: String,
        doc: String,
        session: String,
        count: u64,
        data: Vec<u8>,
    },
    Ignored {
        kind: u8,
        sender: Option<String>,
    },
}

impl MsgSpec {
    pub fn msg(&self) -> RepoMessage {
        let target_id = "relay-server".to_string();
        match self.clone() {
            MsgSpec::Join {
                sender,
                storage,
                ephemeral,
                versions,
            } => RepoMessage::Join {
                sender_id: sender,
                peer_metadata: storage.map(|storage_id| PeerMetadata {
                    storage_id,
                    is_ephemeral: ephemeral,
                }),
                supported_protocol_versions: versions,
            },
            MsgSpec::Peer {
                sender,
                target,
                version,
            } => RepoMessage::Peer {
                sender_id: sender,
                target_id: target,
                peer_metadata: None,
                selected_protocol_version: version,
            },
            MsgSpec::Error {
                sender,
                target,
                message,
            } => RepoMessage::Error {
                sender_id: sender,
                target_id: target,
                message,
            },
            MsgSpec::Sync {
                sender,
                doc,
                data,
                request,
            } => {
                if request {
                    RepoMessage::Request {
                        sender_id: sender,
                        target_id,
                        document_id: doc,
                        data,
                    }
                } else {
                    RepoMessage::Sync {
                        sender_id: sender,
                        target_id,
                        document_id: doc,
                        data,
                    }
                }
            }
            MsgSpec::DocUnavailable { sender, doc } => RepoMessage::DocUnavailable {
                sender_id: sender,
                target_id,
                document_id: doc,
            },
            MsgSpec::Ephemeral {
                sender,
                doc,
                session,
                count,
                data,
            } => RepoMessage::Ephemeral {
                sender_id: sender,
                target_id,
                document_id: doc,
                session_id: session,
                count,
                data,
            },
            MsgSpec::Ignored { kind, sender } => RepoMessage::Ignored {
                kind: [
                    "leave",
                    "remote-heads-changed",
                    "remote-subscription-change",
                ][usize::from(kind) % 3]
                    .to_string(),
                sender_id: sender,
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// automerge-repo protocol core
// ---------------------------------------------------------------------------------------------

/// Real automerge sync messages (a full exchange between a peer with changes and an empty
/// one), so structured inputs reach past `sync::Message::decode`.
pub fn real_sync_messages() -> &'static [Vec<u8>] {
    static MSGS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    MSGS.get_or_init(|| {
        let mut a = build(&[
            Op::Put { key: 1, value: 7 },
            Op::Commit,
            Op::MakeText,
            Op::Splice {
                pos: 0,
                del: 0,
                text: "hello".into(),
            },
            Op::Commit,
        ])
        .doc;
        let mut b = AutoCommit::new().with_actor(ActorId::from(vec![9; 16]));
        let (mut sa, mut sb) = (sync::State::new(), sync::State::new());
        let mut out = Vec::new();
        for _ in 0..6 {
            if let Some(m) = a.sync().generate_sync_message(&mut sa) {
                out.push(m.clone().encode());
                b.sync().receive_sync_message(&mut sb, m).expect("sync a→b");
            }
            if let Some(m) = b.sync().generate_sync_message(&mut sb) {
                out.push(m.clone().encode());
                a.sync().receive_sync_message(&mut sa, m).expect("sync b→a");
            }
        }
        out
    })
}

pub const FIXTURE_DOC: &str = "3jBnkqtmACWf3kw8Kh3pSCFE3zVc";

/// Structured protocol input: a message sequence whose senders, document ids and sync data are
/// mostly the ones that get past the connection's first checks.
#[derive(Arbitrary, Debug)]
pub struct ProtocolScript {
    pub join_first: bool,
    pub peer: String,
    pub steps: Vec<Step>,
}

#[derive(Arbitrary, Debug)]
pub enum Step {
    /// `spec`, with sender, document id and data replaced as selected.
    Msg {
        spec: MsgSpec,
        own_sender: bool,
        good_doc: bool,
        real_data: Option<u8>,
    },
    Raw(Vec<u8>),
}

impl ProtocolScript {
    pub fn frames(&self) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        if self.join_first {
            frames.push(join_frame(&self.peer));
        }
        for step in self.steps.iter().take(32) {
            match step {
                Step::Raw(b) => frames.push(b.clone()),
                Step::Msg {
                    spec,
                    own_sender,
                    good_doc,
                    real_data,
                } => {
                    let mut m = spec.msg();
                    patch(&mut m, *own_sender, *good_doc, *real_data, &self.peer);
                    frames.push(m.encode());
                }
            }
        }
        frames
    }
}

fn patch(m: &mut RepoMessage, own: bool, good_doc: bool, real: Option<u8>, peer: &str) {
    let real = real.map(|i| {
        let all = real_sync_messages();
        all[usize::from(i) % all.len()].clone()
    });
    match m {
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
                *sender_id = peer.to_string();
            }
            if good_doc {
                *document_id = FIXTURE_DOC.to_string();
            }
            if let Some(r) = real {
                *data = r;
            }
        }
        RepoMessage::DocUnavailable { sender_id, .. } | RepoMessage::Peer { sender_id, .. } => {
            if own {
                *sender_id = peer.to_string();
            }
        }
        RepoMessage::Error { sender_id, .. } | RepoMessage::Ignored { sender_id, .. } => {
            if own {
                *sender_id = Some(peer.to_string());
            }
        }
        RepoMessage::Join { .. } => {}
    }
}

pub fn join_frame(peer: &str) -> Vec<u8> {
    RepoMessage::Join {
        sender_id: peer.to_string(),
        peer_metadata: Some(PeerMetadata {
            storage_id: None,
            is_ephemeral: true,
        }),
        supported_protocol_versions: Some(vec!["1".into()]),
    }
    .encode()
}

/// Raw protocol input: byte 0 holds flags (bit 0: send a valid join first, as the sender of the
/// first frame that names one), then frames, each a 2-byte little-endian length and its bytes.
pub fn raw_frames(data: &[u8]) -> Vec<Vec<u8>> {
    let Some((&flags, mut rest)) = data.split_first() else {
        return Vec::new();
    };
    let mut frames = Vec::new();
    while !rest.is_empty() && frames.len() < 64 {
        let len = if rest.len() >= 2 {
            let n = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
            rest = &rest[2..];
            n.min(rest.len())
        } else {
            rest.len()
        };
        frames.push(rest[..len].to_vec());
        rest = &rest[len..];
    }
    if flags & 1 == 1 {
        let sender = frames.iter().find_map(|f| match RepoMessage::decode(f) {
            Ok(RepoMessage::Sync { sender_id, .. })
            | Ok(RepoMessage::Request { sender_id, .. })
            | Ok(RepoMessage::Ephemeral { sender_id, .. })
            | Ok(RepoMessage::DocUnavailable { sender_id, .. }) => Some(sender_id),
            _ => None,
        });
        frames.insert(0, join_frame(&sender.unwrap_or_else(|| "peer".into())));
    }
    frames
}

/// Encodes frames in the raw format (for the corpus generator).
pub fn encode_raw_frames(join_first: bool, frames: &[Vec<u8>]) -> Vec<u8> {
    let mut out = vec![u8::from(join_first)];
    for f in frames {
        let len = u16::try_from(f.len()).expect("frame under 64 KiB");
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(f);
    }
    out
}

/// Feeds `frames` to one connection as the socket adapter would (stopping at a close), and
/// checks: nothing but errors and the handshake before a join, replies decode, sync work has
/// its changes split out and valid ids, ephemerals come from the joined peer.
pub fn run_connection(frames: &[Vec<u8>]) {
    let mut conn = Connection::new("relay-server");
    let mut joined: Option<String> = None;
    for frame in frames {
        let actions = conn.receive(frame);
        let mut closed = false;
        for action in &actions {
            match action {
                Action::Send(m) => {
                    let again = RepoMessage::decode(&m.encode())
                        .unwrap_or_else(|e| panic!("reply {m:?} does not decode: {e}"));
                    assert_eq!(&again, m, "reply does not round-trip");
                    if joined.is_none() {
                        assert!(
                            matches!(m, RepoMessage::Peer { .. } | RepoMessage::Error { .. }),
                            "sent {m:?} before a join"
                        );
                    }
                }
                Action::Close { code, .. } => {
                    assert_eq!(*code, CLOSE_PROTOCOL);
                    closed = true;
                }
                Action::Joined { peer_id } => {
                    assert_eq!(conn.peer_id(), Some(peer_id.as_str()));
                    joined = Some(peer_id.clone());
                }
                Action::Sync {
                    doc,
                    message,
                    changes,
                    ..
                } => {
                    assert!(joined.is_some(), "sync work before a join");
                    assert!(DocId::parse(doc.as_str()).is_ok());
                    assert!(
                        message.changes.is_empty(),
                        "changes left in the sync message"
                    );
                    if !changes.is_empty() {
                        // The socket validates these exactly like an upload.
                        let _ = check_upload(changes, changes.len() as u8);
                    }
                }
                Action::Ephemeral { doc, sender_id, .. } => {
                    assert_eq!(
                        joined.as_deref(),
                        Some(sender_id.as_str()),
                        "ephemeral relay"
                    );
                    assert!(DocId::parse(doc.as_str()).is_ok());
                }
            }
        }
        if closed {
            break;
        }
    }
    let doc = DocId::parse(FIXTURE_DOC).expect("fixture id");
    let out = conn.outgoing(automerge_relay::Outgoing::Unavailable { doc });
    assert_eq!(out.is_some(), conn.peer_id().is_some());
}

// ---------------------------------------------------------------------------------------------
// Ids and heads
// ---------------------------------------------------------------------------------------------

/// The documented id rule (docs/http-api.md): 1–128 characters of `A-Z a-z 0-9 . _ ~ -`, not starting with `_` or `.`.
pub fn id_rule(s: &str) -> bool {
    (1..=128).contains(&s.chars().count())
        && !s.starts_with(['_', '.'])
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '~' | '-'))
}

pub fn check_ids(s: &str) {
    match DocId::parse(s) {
        Ok(id) => {
            assert!(id_rule(s), "accepted bad id {s:?}");
            assert_eq!(id.as_str(), s);
        }
        Err(e) => {
            assert!(!id_rule(s), "rejected good id {s:?}: {e}");
            assert!(matches!(e, RelayError::BadId(_)), "{e:?}");
        }
    }
    let parts: Vec<&str> = s
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    let is_hash = |p: &str| p.len() == 64 && p.bytes().all(|b| b.is_ascii_hexdigit());
    match parse_heads(s) {
        Ok(heads) => {
            assert!(parts.iter().all(|p| is_hash(p)), "accepted bad heads {s:?}");
            assert_eq!(heads.len(), parts.len());
            for (h, p) in heads.iter().zip(&parts) {
                assert_eq!(h.to_string(), p.to_ascii_lowercase());
            }
            let etag = etag_for(&heads);
            assert_eq!(etag.len(), 34, "{etag}");
            assert!(etag.starts_with('"') && etag.ends_with('"'));
            let mut rev = heads.clone();
            rev.reverse();
            assert_eq!(etag_for(&rev), etag, "etag depends on head order");
        }
        Err(e) => {
            assert!(
                !parts.iter().all(|p| is_hash(p)),
                "rejected good heads {s:?}"
            );
            assert!(matches!(e, RelayError::BadSince(_)), "{e:?}");
        }
    }
}
