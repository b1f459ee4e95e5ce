//! `automerge-relay import DIR` and `export DIR` against the real automerge-repo storage:
//! an unmodified `Repo` with `NodeFSStorageAdapter` (tests/js/migrate-fixture.mjs) writes the
//! directory the relay imports, and reads the directory it exports. The real binary runs every
//! step; the relay serving the store afterwards is what checks the result.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use automerge::{Automerge, ReadDoc, ROOT};
use serde_json::Value;
use sha2::Digest;

use common::services::{pg_query, TestDb};
use common::{add_item, base_doc, heads_hex, items, sorted, Relay};

const BIN: &str = env!("CARGO_BIN_EXE_automerge-relay");

/// A document as the fixture (or the relay) reports it: id → sorted hex heads.
type Heads = BTreeMap<String, Vec<String>>;

/// Runs the fixture script (`write DIR` or `read DIR ID...`) and returns its `docs`.
fn fixture(args: &[&str]) -> Vec<Value> {
    let js = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/js");
    let out = Command::new("node")
        .arg("migrate-fixture.mjs")
        .args(args)
        .current_dir(js)
        .output()
        .expect("run node (scripts/test installs the npm packages)");
    assert!(
        out.status.success(),
        "migrate-fixture.mjs {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or("").trim().to_string();
    let v: Value = serde_json::from_str(&line).expect("the fixture's JSON line");
    v["docs"].as_array().expect("docs").clone()
}

fn heads_of(docs: &[Value]) -> Heads {
    docs.iter()
        .map(|d| {
            let heads = d["heads"].as_array().expect("heads");
            let heads = heads.iter().map(|h| h.as_str().unwrap().to_string());
            (
                d["id"].as_str().unwrap().to_string(),
                sorted(heads.collect()),
            )
        })
        .collect()
}

/// What one run of `automerge-relay import|export` did.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn relay_cmd(args: &[&str]) -> Run {
    let out = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run automerge-relay");
    let run = Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    eprintln!("$ automerge-relay {args:?}\n{}{}", run.stdout, run.stderr);
    run
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

/// Deterministic bytes that are no Automerge data (xorshift32).
fn noise(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

/// Puts a corrupt chunk into `id`'s incremental directory, named as the adapter names
/// incrementals (the SHA-256 of its bytes); returns its path relative to `dir`.
fn add_corrupt_chunk(dir: &Path, id: &str) -> String {
    let bytes = noise(300);
    let name = hex::encode(sha2::Sha256::digest(&bytes));
    let rel = format!("{}/{}/incremental/{name}", &id[..2], &id[2..]);
    std::fs::write(dir.join(&rel), bytes).expect("write the corrupt chunk");
    rel
}

/// The heads the relay serves for each id (GET /{id}, the body loaded).
async fn served_heads(relay: &Relay, ids: impl IntoIterator<Item = &String>) -> Heads {
    let client = reqwest::Client::new();
    let mut out = Heads::new();
    for id in ids {
        let res = client
            .get(relay.url(&format!("/{id}")))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "GET /{id}");
        let doc = Automerge::load(&res.bytes().await.unwrap()).expect("a loadable save");
        let heads = doc.get_heads().iter().map(|h| h.to_string()).collect();
        out.insert(id.clone(), sorted(heads));
    }
    out
}

/// `/_/docs`: every document with its heads, change count and stored size.
async fn listing(relay: &Relay) -> Vec<Value> {
    let url = relay.url("/_/docs?limit=1000");
    let v: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
    v["documents"]
        .as_array()
        .expect("documents")
        .iter()
        .map(|d| {
            let mut d = d.clone();
            // Whether an owner is hot is not the store's state.
            d.as_object_mut().unwrap().remove("loaded");
            d
        })
        .collect()
}

/// Every file under `dir` with the SHA-256 of its contents.
fn tree(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let hash = hex::encode(sha2::Sha256::digest(std::fs::read(&p).unwrap()));
                out.insert(p.strip_prefix(dir).unwrap().to_path_buf(), hash);
            }
        }
    }
    out
}

/// What [`fixture_dir`] wrote.
struct Fixture {
    heads: Heads,
    /// The document with 200 incremental files.
    counter: String,
    /// The corrupt chunk's path relative to the directory.
    corrupt: String,
}

/// Writes the fixture into `dir`, plus one corrupt chunk in the counter document's
/// incremental directory.
fn fixture_dir(dir: &Path) -> Fixture {
    let docs = fixture(&["write", path(dir)]);
    assert_eq!(docs.len(), 5);
    let heads = heads_of(&docs);
    let counter = docs[0]["id"].as_str().unwrap();
    let incrementals = std::fs::read_dir(
        dir.join(&counter[..2])
            .join(&counter[2..])
            .join("incremental"),
    )
    .unwrap()
    .count();
    assert_eq!(
        incrementals, 200,
        "the adapter wrote one incremental per save"
    );
    let corrupt = add_corrupt_chunk(dir, counter);
    // A document under an id the relay does not take (a leading `_`): valid data, skipped.
    let small = docs[2]["id"].as_str().unwrap();
    let small_dir = dir.join(&small[..2]).join(&small[2..]).join("snapshot");
    let snapshot = std::fs::read_dir(&small_dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let odd = dir.join("_n/ot-a-relay-id/snapshot");
    std::fs::create_dir_all(&odd).unwrap();
    std::fs::copy(snapshot.path(), odd.join(snapshot.file_name())).unwrap();
    Fixture {
        heads,
        counter: counter.to_string(),
        corrupt,
    }
}

/// What the first import of the fixture directory reports.
fn assert_first_import(run: &Run, corrupt: &str) {
    assert_eq!(run.code, Some(0), "a corrupt file is no failure");
    let out = &run.stdout;
    let found = "6 found; 5 created, 0 updated, 0 unchanged, 0 empty, 1 skipped";
    assert!(out.contains(found), "{out}");
    let skipped = "1 bad chunk file, 1 sync state, 1 other file, 1 document";
    assert!(out.contains(skipped), "{out}");
    let odd = "    _not-a-relay-id: not a relay document id (document id must not start with '_'";
    assert!(out.contains(odd), "{out}");
    assert!(
        out.contains(&format!("    {corrupt}: not valid Automerge data")),
        "{out}"
    );
    assert!(
        out.contains("st/orage-adapter-id: not a document chunk"),
        "{out}"
    );
    assert!(out.contains("216 new changes stored"), "{out}");
    // Plain progress lines, stderr being no terminal.
    assert!(run.stderr.contains("import: 6 documents"), "{}", run.stderr);
    assert!(
        run.stderr.contains("import: 6/6 documents in"),
        "{}",
        run.stderr
    );
}

/// What importing the same directory again reports.
fn assert_nothing_new(run: &Run) {
    assert_eq!(run.code, Some(0));
    let out = &run.stdout;
    assert!(
        out.contains("6 found; 0 created, 0 updated, 5 unchanged"),
        "{out}"
    );
    assert!(out.contains("0 new changes stored"), "{out}");
    assert!(out.contains(", 0 B stored"), "{out}");
}

#[tokio::test]
async fn import_from_automerge_repo_into_sled_keeps_every_head_and_is_idempotent() {
    let tmp = tempfile::tempdir().unwrap();
    let (repo_dir, data) = (tmp.path().join("repo"), tmp.path().join("data"));
    let Fixture {
        heads,
        counter,
        corrupt,
    } = fixture_dir(&repo_dir);

    let import = ["import", path(&repo_dir), "--data-dir", path(&data)];
    let run = relay_cmd(&import);
    assert_first_import(&run, &corrupt);

    let mut relay = Relay::start(&data);
    assert_eq!(served_heads(&relay, heads.keys()).await, heads);
    // The counter document's 200 changes, the rich document's list.
    let client = reqwest::Client::new();
    let body = client
        .get(relay.url(&format!("/{counter}")))
        .send()
        .await
        .unwrap();
    let doc = automerge::AutoCommit::load(&body.bytes().await.unwrap()).unwrap();
    let (count, _) = doc.get(ROOT, "count").unwrap().expect("count");
    assert_eq!(count.as_i64(), Some(200));
    let before = listing(&relay).await;
    assert_eq!(before.len(), 5);

    // The data dir is the running relay's: the lock's message reaches the user.
    let refused = relay_cmd(&import);
    assert_eq!(refused.code, Some(1));
    assert!(
        refused
            .stderr
            .contains("is in use by another automerge-relay process"),
        "{}",
        refused.stderr
    );
    assert!(
        refused.stderr.contains("stop the relay first"),
        "{}",
        refused.stderr
    );
    assert!(refused.stdout.is_empty(), "nothing was done: no summary");
    assert_eq!(relay.terminate(), Some(0));

    assert_nothing_new(&relay_cmd(&import));
    let dry = relay_cmd(&[
        "import",
        path(&repo_dir),
        "--data-dir",
        path(&data),
        "--dry-run",
    ]);
    assert_eq!(dry.code, Some(0));
    assert!(
        dry.stdout.contains("(dry run: nothing stored)"),
        "{}",
        dry.stdout
    );
    relay.restart();
    assert_eq!(listing(&relay).await, before, "the store is as it was");
    assert_eq!(served_heads(&relay, heads.keys()).await, heads);
    relay.terminate();
}

#[tokio::test]
async fn import_into_postgres_keeps_every_head_and_a_second_import_stores_nothing() {
    let db = TestDb::create();
    let tmp = tempfile::tempdir().unwrap();
    let repo_dir = tmp.path().join("repo");
    let Fixture { heads, corrupt, .. } = fixture_dir(&repo_dir);
    let import = ["import", path(&repo_dir), "--store", &db.url];
    assert_first_import(&relay_cmd(&import), &corrupt);
    let chunks = || {
        pg_query(
            &db.url,
            "SELECT doc, kind, hash, length(bytes) FROM relay_chunks ORDER BY 1, 2, 3",
        )
        .unwrap()
    };
    let before = chunks();
    assert_eq!(before.len(), 5, "one chunk per document");

    let mut relay = Relay::start_with(&tmp.path().join("unused"), &["--store", &db.url]);
    assert_eq!(served_heads(&relay, heads.keys()).await, heads);
    // A shared store: importing while a node serves it is fine.
    assert_nothing_new(&relay_cmd(&import));
    assert_eq!(chunks(), before, "the store is as it was");
    relay.terminate();
}

/// A bs58check id, as automerge-repo makes them, from `seed`.
fn repo_id(seed: u8) -> String {
    bs58::encode([seed; 16]).with_check().into_string()
}

#[tokio::test]
async fn export_to_automerge_repo_keeps_every_head_and_is_idempotent() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, out) = (tmp.path().join("data"), tmp.path().join("out"));
    let mut relay = Relay::start(&data);
    let client = reqwest::Client::new();
    let mut want = Heads::new();
    let mut want_items = BTreeMap::new();
    for seed in 1..=3u8 {
        let id = repo_id(seed);
        let mut doc = base_doc();
        // Several writes: several stored chunks to export as one snapshot.
        for round in 0..(seed as usize * 3) {
            add_item(&mut doc, &format!("{seed}-{round}"));
            let url = relay.url(&format!("/{id}"));
            let res = client.post(url).body(doc.save()).send().await.unwrap();
            assert!(res.status().is_success());
        }
        want.insert(id.clone(), heads_hex(&mut doc));
        want_items.insert(id, items(&doc));
    }
    let plain = "plain-name";
    let res = client
        .put(relay.url(&format!("/{plain}")))
        .body(base_doc().save())
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success());
    assert_eq!(served_heads(&relay, want.keys()).await, want);
    assert_eq!(relay.terminate(), Some(0));

    let export = ["export", path(&out), "--data-dir", path(&data)];
    let run = relay_cmd(&export);
    assert_eq!(run.code, Some(0), "a skipped id is no failure");
    assert!(
        run.stdout
            .contains("4 in the store; 3 written, 0 up to date, 1 skipped"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("plain-name: not an automerge-repo id (bs58check)"),
        "{}",
        run.stdout
    );
    assert!(
        run.stderr.contains("export: 4/4 documents in"),
        "{}",
        run.stderr
    );

    let ids: Vec<&str> = want.keys().map(String::as_str).collect();
    let found = fixture(&[&["read", path(&out)][..], &ids].concat());
    assert_eq!(
        heads_of(&found),
        want,
        "a Repo on the directory finds the relay's heads"
    );
    for d in &found {
        let got: Vec<String> = serde_json::from_value(d["items"].clone()).unwrap();
        assert_eq!(got, want_items[d["id"].as_str().unwrap()]);
    }
    // One snapshot per document, named as automerge-repo names it; nothing else.
    let files = tree(&out);
    let snapshots = files
        .keys()
        .filter(|p| p.iter().nth(2).is_some_and(|k| k == "snapshot"));
    assert_eq!(snapshots.count(), 3, "{files:?}");

    // Again: nothing written, the directory as it was. (The Repo that read it wrote its
    // storage-adapter-id: taken into account.)
    let before = tree(&out);
    let again = relay_cmd(&export);
    assert_eq!(again.code, Some(0));
    assert!(
        again.stdout.contains("0 written, 3 up to date"),
        "{}",
        again.stdout
    );
    assert_eq!(tree(&out), before);

    // --all-ids: the other id too, in the layout.
    let all = tmp.path().join("all");
    let run = relay_cmd(&["export", path(&all), "--data-dir", path(&data), "--all-ids"]);
    assert!(run.stdout.contains("4 written"), "{}", run.stdout);
    assert!(all.join("pl/ain-name/snapshot").is_dir());
}

#[tokio::test]
async fn import_then_export_round_trips_into_the_original_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let (repo_dir, data) = (tmp.path().join("repo"), tmp.path().join("data"));
    let Fixture {
        heads,
        counter,
        corrupt,
    } = fixture_dir(&repo_dir);
    assert_eq!(
        relay_cmd(&["import", path(&repo_dir), "--data-dir", path(&data)]).code,
        Some(0)
    );

    // Into a fresh directory: what a Repo finds there is what it wrote.
    let fresh = tmp.path().join("fresh");
    let run = relay_cmd(&["export", path(&fresh), "--data-dir", path(&data)]);
    assert!(run.stdout.contains("5 written"), "{}", run.stdout);
    let ids: Vec<&str> = heads.keys().map(String::as_str).collect();
    let found = fixture(&[&["read", path(&fresh)][..], &ids].concat());
    assert_eq!(heads_of(&found), heads);

    // Into the directory it came from: automerge-repo's own chunks are contained in the new
    // snapshots and replaced; the corrupt file and the sync state stay.
    let run = relay_cmd(&["export", path(&repo_dir), "--data-dir", path(&data)]);
    assert_eq!(run.code, Some(0));
    assert!(
        run.stdout
            .contains(&format!("    {corrupt}: not Automerge data, left in place")),
        "{}",
        run.stdout
    );
    let counter_dir = repo_dir.join(&counter[..2]).join(&counter[2..]);
    let incrementals = std::fs::read_dir(counter_dir.join("incremental")).unwrap();
    let left: Vec<_> = incrementals.map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 1, "only the corrupt file: {left:?}");
    let found = fixture(&[&["read", path(&repo_dir)][..], &ids].concat());
    assert_eq!(heads_of(&found), heads);
    let sync_states = tree(&repo_dir)
        .keys()
        .filter(|p| p.iter().nth(2).is_some_and(|k| k == "sync-state"))
        .count();
    assert_eq!(sync_states, 1);
}
