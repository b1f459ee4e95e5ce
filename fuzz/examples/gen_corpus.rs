//! Writes the seed corpus: `cargo run --example gen_corpus -- <corpus dir> <fixtures dir>`.
//! Run through `fuzz/seed-corpus`, which also copies the captured protocol frames in.

use std::path::{Path, PathBuf};

use automerge_relay::RepoMessage;
use relay_fuzz::{build, encode_raw_frames, join_frame, save, Op, SaveKind, FIXTURE_DOC};

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).expect("corpus dir");
    std::fs::write(dir.join(name), bytes).expect("write seed");
}

fn docs() -> Vec<(&'static str, Vec<Op>)> {
    let text = |s: &str| Op::Splice {
        pos: 0,
        del: 0,
        text: s.into(),
    };
    vec![
        ("empty", vec![]),
        ("one-put", vec![Op::Put { key: 1, value: 42 }, Op::Commit]),
        (
            "text",
            vec![
                Op::MakeText,
                Op::Commit,
                text("hello"),
                Op::Commit,
                text("world "),
                Op::Commit,
            ],
        ),
        (
            "forked",
            vec![
                Op::MakeList,
                Op::Commit,
                Op::Fork,
                Op::Insert { pos: 0, value: 1 },
                Op::Commit,
                Op::Switch(0),
                Op::PutStr {
                    key: 3,
                    value: "x".into(),
                },
                Op::Commit,
                Op::Merge,
                Op::Delete { key: 3 },
                Op::Commit,
            ],
        ),
    ]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let corpus = PathBuf::from(args.next().expect("usage: gen_corpus <corpus> <fixtures>"));
    let fixtures = PathBuf::from(args.next().expect("usage: gen_corpus <corpus> <fixtures>"));

    // upload: every save kind of a few real documents.
    let kinds = [
        ("full", SaveKind::Full),
        ("nocompress", SaveKind::NoCompress),
        ("after1", SaveKind::After(1)),
        ("changes", SaveKind::Changes),
        ("bundle", SaveKind::Bundle(1)),
    ];
    for (name, ops) in docs() {
        for (kind_name, kind) in kinds {
            let mut built = build(&ops);
            let (bytes, _) = save(&mut built, kind);
            if !bytes.is_empty() {
                write(
                    &corpus.join("upload"),
                    &format!("{name}-{kind_name}"),
                    &bytes,
                );
            }
        }
    }

    // repo_protocol: each captured/synthetic frame after a join as its sender, and the whole
    // captured client→server conversation in order.
    let mut files: Vec<PathBuf> = std::fs::read_dir(&fixtures)
        .expect("fixtures dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cbor"))
        .collect();
    files.sort();
    let mut session = Vec::new();
    for path in &files {
        let frame = std::fs::read(path).expect("read fixture");
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        write(
            &corpus.join("repo_protocol"),
            &name,
            &encode_raw_frames(true, std::slice::from_ref(&frame)),
        );
        if name.starts_with("captured-") {
            session.push(frame);
        }
    }
    write(
        &corpus.join("repo_protocol"),
        "captured-session",
        &encode_raw_frames(false, &session),
    );
    let sync = RepoMessage::Sync {
        sender_id: "peer".into(),
        target_id: "relay-server".into(),
        document_id: FIXTURE_DOC.into(),
        data: relay_fuzz::real_sync_messages()[0].clone(),
    };
    write(
        &corpus.join("repo_protocol"),
        "join-then-sync",
        &encode_raw_frames(false, &[join_frame("peer"), sync.encode()]),
    );
    write(&corpus.join("repo_wire"), "generated-sync", &sync.encode());

    // ids: ids and ?since= lists.
    let hash = "a".repeat(64);
    for (i, s) in [
        FIXTURE_DOC.to_string(),
        "todo-list_1.v2~x".into(),
        "_x".into(),
        "x".repeat(128),
        format!("{hash},{}", "B".repeat(64)),
        format!(" {hash} ,, "),
    ]
    .iter()
    .enumerate()
    {
        write(&corpus.join("ids"), &format!("seed-{i}"), s.as_bytes());
    }
}
