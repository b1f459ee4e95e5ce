//! Crash loop: writers run against the binary, which is killed with SIGKILL at random moments
//! and restarted on the same data dir; every acknowledged change must be there afterwards.
//! Ignored in the fast suite; `.ci/run` runs it with a small count (CRASH_LOOP_N, default 20):
//! `CRASH_LOOP_N=20 cargo test --release --test crash_loop -- --ignored`.

mod common;

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use automerge::{AutoCommit, ChangeHash};
use common::*;

const WRITERS: usize = 4;

/// One writer's document and the heads the server acknowledged last.
struct Writer {
    doc: AutoCommit,
    acked_heads: Vec<ChangeHash>,
}

/// Writes changes to `crash-{w}` (everything not yet acknowledged, as incremental changes)
/// until the server stops answering; returns the newly acknowledged hashes.
async fn write_until_down(
    c: reqwest::Client,
    port: u16,
    w: usize,
    wr: &mut Writer,
) -> Vec<ChangeHash> {
    let url = format!("http://127.0.0.1:{port}/crash-{w}");
    let mut acked = Vec::new();
    for i in 0.. {
        add_item(&mut wr.doc, &format!("w{w}-{i}"));
        let body = wr.doc.save_after(&wr.acked_heads);
        match c.post(&url).body(body).send().await {
            Ok(r) if r.status().is_success() => {
                // Everything since the last acknowledgement is applied (not merely pending).
                assert!(r.status() == 200 || r.status() == 201, "{}", r.status());
                acked.extend(wr.doc.get_changes(&wr.acked_heads).iter().map(|c| c.hash()));
                wr.acked_heads = wr.doc.get_heads();
            }
            _ => break,
        }
    }
    acked
}

#[tokio::test]
#[ignore = "slow; run by .ci/run with CRASH_LOOP_N"]
async fn acknowledged_changes_survive_random_kill_9() {
    let rounds: usize = std::env::var("CRASH_LOOP_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(dir.path());
    let c = reqwest::Client::new();
    let mut writers: Vec<Writer> = (0..WRITERS)
        .map(|_| Writer {
            doc: base_doc(),
            acked_heads: Vec::new(),
        })
        .collect();
    let mut acked: Vec<HashSet<ChangeHash>> = vec![HashSet::new(); WRITERS];
    let mut seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1;
    let mut total = 0;
    for round in 0..rounds {
        let mut tasks = Vec::new();
        for (w, mut wr) in writers.drain(..).enumerate() {
            let (c, port) = (c.clone(), relay.port);
            tasks.push(tokio::spawn(async move {
                let hashes = write_until_down(c, port, w, &mut wr).await;
                (wr, hashes)
            }));
        }
        // Kill at a random moment 30–330 ms in, with writes in flight.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        tokio::time::sleep(Duration::from_millis(30 + seed % 300)).await;
        relay.kill9();
        for (w, t) in tasks.into_iter().enumerate() {
            let (wr, hashes) = t.await.unwrap();
            total += hashes.len();
            acked[w].extend(hashes);
            writers.push(wr);
        }
        relay.restart();
        for (w, want) in acked.iter().enumerate() {
            let r = c
                .get(relay.url(&format!("/crash-{w}")))
                .send()
                .await
                .unwrap();
            if want.is_empty() && r.status() == 404 {
                continue;
            }
            assert_eq!(r.status(), 200, "round {round}: crash-{w} missing");
            let mut server = AutoCommit::load(&r.bytes().await.unwrap()).unwrap();
            for h in want {
                assert!(
                    server.get_change_by_hash(h).is_some(),
                    "round {round}: acknowledged change {h} of crash-{w} lost"
                );
            }
        }
    }
    eprintln!("crash loop: {rounds} kills, {total} acknowledged writes, none lost");
    assert!(
        total > 0,
        "no write was acknowledged, so nothing was tested"
    );
}
