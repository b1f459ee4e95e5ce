//! Inspection routes over real sockets: the document listing (prefix, paging that stays
//! exact while documents are written), one document's info with its live subscribers, and
//! its history newest first.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{AutoCommit, ROOT};
use common::*;

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

async fn json(c: &reqwest::Client, url: String) -> (u16, serde_json::Value) {
    let r = c.get(url).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_by_prefix_returns_every_document_once_while_others_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path());
    let c = client();
    let base = base_doc().save();
    let mut existing = Vec::new();
    for i in 0..40 {
        let id = format!("p-{i:03}");
        let r = c
            .post(relay.url(&format!("/{id}")))
            .body(base.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        existing.push(id);
    }
    for i in 0..5 {
        let r = c
            .post(relay.url(&format!("/q-{i}")))
            .body(base.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    // Meanwhile, new documents keep arriving, some inside the prefix, some before and after.
    let writer = {
        let (c, base, port) = (c.clone(), base.clone(), relay.port);
        tokio::spawn(async move {
            for i in 0..60 {
                let id = match i % 3 {
                    0 => format!("p-{i:03}-new"),
                    1 => format!("a-{i}"),
                    _ => format!("z-{i}"),
                };
                let url = format!("http://127.0.0.1:{port}/{id}");
                assert!(c
                    .post(url)
                    .body(base.clone())
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .is_success());
            }
        })
    };
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline);
        let mut url = relay.url("/_/docs?prefix=p-&limit=7");
        if let Some(a) = &after {
            url.push_str(&format!("&after={a}"));
        }
        let (status, page) = json(&c, url).await;
        assert_eq!(status, 200, "{page}");
        for d in page["documents"].as_array().unwrap() {
            let id = d["id"].as_str().unwrap().to_string();
            assert!(id.starts_with("p-"), "{id} is outside the prefix");
            assert!(d["changes"].as_u64().unwrap() >= 1);
            // base_doc's change carries no time (Rust's commit() leaves it 0): none shown.
            assert!(d["last_change"].is_null(), "{d}");
            seen.push(id);
        }
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => break,
        }
    }
    writer.await.unwrap();
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no document twice: {seen:?}");
    for id in &existing {
        assert!(unique.contains(id), "{id} missing from the listing");
    }
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(sorted, seen, "in id order");
    // A bad cursor or limit is a clear error.
    assert_eq!(json(&c, relay.url("/_/docs?after=_x")).await.0, 400);
    assert_eq!(json(&c, relay.url("/_/docs?limit=ten")).await.0, 400);
}

#[tokio::test]
async fn one_documents_info_and_history() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path());
    let c = client();
    let mut doc = AutoCommit::new();
    let mut heads = Vec::new();
    let mut sent = 0;
    for i in 0..5_i64 {
        doc.put(ROOT, "n", i).unwrap();
        doc.commit_with(
            CommitOptions::default()
                .with_message(format!("edit {i}"))
                .with_time(1_700_000_000 + i),
        );
        let r = c
            .post(relay.url("/hist"))
            .body(doc.save_after(&heads))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        heads = doc.get_heads();
        sent += 1;
    }
    assert_eq!(sent, 5);
    let (_ws, _) = tokio_tungstenite::connect_async(relay.ws_url("/hist"))
        .await
        .unwrap();
    let info = wait_for(
        "the subscriber to be counted",
        Duration::from_secs(10),
        || {
            let c = c.clone();
            let url = relay.url("/_/docs/hist");
            async move {
                let (status, info) = json(&c, url).await;
                (status == 200 && info["subscribers"] == 1).then_some(info)
            }
        },
    )
    .await;
    assert_eq!(info["changes"], 5);
    assert_eq!(info["repo_peers"], 0);
    assert_eq!(info["loaded"], true);
    assert_eq!(info["last_change"], "2023-11-14T22:13:24.000Z");
    assert_eq!(json_heads(&info), heads_hex(&mut doc));

    let mut messages = Vec::new();
    let mut before: Option<String> = None;
    loop {
        let mut url = relay.url("/_/docs/hist/history?limit=2");
        if let Some(b) = &before {
            url.push_str(&format!("&before={b}"));
        }
        let (status, page) = json(&c, url).await;
        assert_eq!(status, 200, "{page}");
        for ch in page["changes"].as_array().unwrap() {
            assert_eq!(ch["ops"], 1);
            assert_eq!(ch["actor"].as_str().unwrap().len(), 32);
            messages.push(ch["message"].as_str().unwrap().to_string());
        }
        match page["next"].as_str() {
            Some(n) => before = Some(n.to_string()),
            None => break,
        }
    }
    assert_eq!(messages, ["edit 4", "edit 3", "edit 2", "edit 1", "edit 0"]);
    let bad = format!("/_/docs/hist/history?before={}", "ab".repeat(32));
    assert_eq!(json(&c, relay.url(&bad)).await.0, 400);
    assert_eq!(
        json(&c, relay.url("/_/docs/hist/history?before=xyz"))
            .await
            .0,
        400
    );
    assert_eq!(json(&c, relay.url("/_/docs/nope")).await.0, 404);
    assert_eq!(json(&c, relay.url("/_/docs/nope/history")).await.0, 404);
}
