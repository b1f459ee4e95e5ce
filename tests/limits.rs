//! Bounded memory and limits, against the real binary over real sockets.

mod common;

use std::time::Duration;

use automerge::AutoCommit;
use common::*;

async fn stats(c: &reqwest::Client, relay: &Relay) -> serde_json::Value {
    c.get(relay.url("/_/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn idle_documents_are_evicted_over_budget_and_reload_identically() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_with(dir.path(), &["--memory-budget", "256KiB"]);
    let c = reqwest::Client::new();
    let mut expected = Vec::new();
    for i in 0..60 {
        let mut doc = base_doc();
        add_item(&mut doc, &format!("document {i} {}", "x".repeat(2000)));
        let r = c
            .post(relay.url(&format!("/evict-{i}")))
            .body(doc.save())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        expected.push(heads_hex(&mut doc));
    }
    // The evictor brings the estimate back under the budget by itself.
    let s = wait_for(
        "the estimate back under budget",
        Duration::from_secs(20),
        || {
            let (c, relay) = (&c, &relay);
            async move {
                let s = stats(c, relay).await;
                (s["hot_bytes"].as_u64().unwrap() <= 256 * 1024).then_some(s)
            }
        },
    )
    .await;
    assert!(s["evictions"].as_u64().unwrap() > 0, "{s}");
    assert!(s["hot_documents"].as_u64().unwrap() < 60, "{s}");
    for (i, heads) in expected.iter().enumerate() {
        let bytes = c
            .get(relay.url(&format!("/evict-{i}")))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let mut doc = AutoCommit::load(&bytes).unwrap();
        assert_eq!(&heads_hex(&mut doc), heads, "document {i} changed");
    }
    let after = stats(&c, &relay).await;
    assert!(
        after["loads"].as_u64().unwrap() > 0,
        "evicted documents were reloaded: {after}"
    );
}
