//! HTTP document routes, against the real binary over real sockets.

mod common;

use std::time::Duration;

use automerge::AutoCommit;
use common::*;
use reqwest::{Client, StatusCode};

fn client() -> Client {
    Client::new()
}

async fn post(c: &Client, url: &str, body: Vec<u8>) -> (StatusCode, serde_json::Value, String) {
    let r = c
        .post(url)
        .header("content-type", "application/octet-stream")
        .body(body)
        .send()
        .await
        .expect("post");
    let status = r.status();
    let etag = r
        .headers()
        .get("etag")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let json = r.json().await.unwrap_or(serde_json::Value::Null);
    (status, json, etag)
}

async fn get_bytes(c: &Client, url: &str) -> (StatusCode, Vec<u8>) {
    let r = c.get(url).send().await.expect("get");
    (r.status(), r.bytes().await.expect("body").to_vec())
}

#[tokio::test]
async fn tutorial_flow_create_merge_load() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path());
    let c = client();
    let url = relay.url("/todo");
    let mut doc = base_doc();
    let (status, body, etag) = post(&c, &url, doc.save()).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["applied"], 1);
    assert_eq!(json_heads(&body), heads_hex(&mut doc));
    assert!(etag.starts_with('"'));

    add_item(&mut doc, "second");
    let (status, body, _) = post(&c, &url, doc.save()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["applied"], 1, "only the new change is applied");

    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()["content-type"].to_str().unwrap(),
        "application/octet-stream"
    );
    assert_eq!(r.headers()["cache-control"].to_str().unwrap(), "no-cache");
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    let loaded = AutoCommit::load(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(items(&loaded), vec!["base", "second"]);

    // Conditional GET.
    let r = c
        .get(&url)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(r.headers()["etag"].to_str().unwrap(), etag);

    // HEAD carries the GET's headers and no body.
    let r = c.head(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["etag"].to_str().unwrap(), etag);
    assert!(r.bytes().await.unwrap().is_empty());
}

#[tokio::test]
async fn since_returns_only_missing_changes() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path());
    let c = client();
    let url = relay.url("/since-doc");
    let mut doc = base_doc();
    post(&c, &url, doc.save()).await;
    let old_heads = doc.get_heads();
    let mut mirror = doc.fork();
    add_item(&mut doc, "later");
    post(&c, &url, doc.save()).await;

    let since: Vec<String> = old_heads.iter().map(|h| h.to_string()).collect();
    let unknown = hex::encode([9u8; 32]);
    let r = c
        .get(format!("{url}?since={},{unknown}", since.join(",")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    let body = r.bytes().await.unwrap();
    let full = doc.save();
    assert!(body.len() < full.len(), "incremental, not the whole doc");
    mirror.load_incremental(&body).unwrap();
    assert_eq!(items(&mirror), vec!["base", "later"]);
    assert_eq!(heads_hex(&mut mirror), heads_hex(&mut doc));

    let r = c
        .get(format!("{url}?since={}", since.join(",")))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);

    let (status, _) = get_bytes(&c, &format!("{url}?since=nothex")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn concurrent_forks_all_survive() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path());
    let c = client();
    let url = relay.url("/race");
    let mut base = base_doc();
    post(&c, &url, base.save()).await;

    let mut tasks = Vec::new();
    for i in 0..32 {
        let mut fork = base.fork();
        add_item(&mut fork, &format!("edit-{i}"));
        let (c, url) = (c.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let (status, body, _) = post(&c, &url, fork.save()).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            assert_eq!(body["applied"], 1);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (_, bytes) = get_bytes(&c, &url).await;
    let merged = AutoCommit::load(&bytes).unwrap();
    let got = items(&merged);
    for i in 0..32 {
        assert!(got.contains(&format!("edit-{i}")), "edit-{i} lost: {got:?}");
    }
    assert_eq!(got.len(), 33);
}

#[tokio::test]
async fn eight_clients_twenty_five_rounds() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path());
    let c = client();
    let url = relay.url("/rounds");
    let base = base_doc();
    post(&c, &url, base.clone().save()).await;
    let mut tasks = Vec::new();
    for client_no in 0..8 {
        let mut doc = base.clone().fork();
        let (c, url) = (c.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            for round in 0..25 {
                add_item(&mut doc, &format!("c{client_no}-r{round}"));
                let (status, body, _) = post(&c, &url, doc.save()).await;
                assert!(status.is_success(), "{status} {body}");
                // Like the tutorial: load the server's state and merge it in.
                let (_, bytes) = get_bytes(&c, &url).await;
                let mut server = AutoCommit::load(&bytes).unwrap();
                doc.merge(&mut server).unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (_, bytes) = get_bytes(&c, &url).await;
    let merged = AutoCommit::load(&bytes).unwrap();
    let got = items(&merged);
    assert_eq!(got.len(), 1 + 8 * 25);
    for client_no in 0..8 {
        for round in 0..25 {
            assert!(got.contains(&format!("c{client_no}-r{round}")));
        }
    }
}

#[tokio::test]
async fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(dir.path());
    let c = client();
    let mut tasks = Vec::new();
    for i in 0..20 {
        let url = relay.url(&format!("/durable-{i}"));
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut doc = base_doc();
            add_item(&mut doc, &format!("doc {i}"));
            let (status, body, _) = post(&c, &url, doc.save()).await;
            assert_eq!(status, StatusCode::CREATED);
            (i, json_heads(&body))
        }));
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.push(t.await.unwrap());
    }
    relay.kill9();
    relay.restart();
    for (i, heads) in acked {
        let (status, bytes) = get_bytes(&c, &relay.url(&format!("/durable-{i}"))).await;
        assert_eq!(status, StatusCode::OK, "doc {i} lost");
        let mut doc = AutoCommit::load(&bytes).unwrap();
        assert_eq!(heads_hex(&mut doc), heads, "doc {i} heads differ");
        assert!(items(&doc).contains(&format!("doc {i}")));
    }
}

#[tokio::test]
async fn thousand_uploads_compact_and_reload() {
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(dir.path());
    let c = client();
    let url = relay.url("/big");
    let mut doc = base_doc();
    post(&c, &url, doc.save()).await;
    for i in 0..1000 {
        let heads = doc.get_heads();
        add_item(&mut doc, &format!("n{i}"));
        let (status, body, _) = post(&c, &url, doc.save_after(&heads)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let stats: serde_json::Value = c
        .get(relay.url("/_/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        stats["compactions"].as_u64().unwrap() > 0,
        "no compaction ran: {stats}"
    );
    // Resident memory (Linux): a relay that merged 1,000 uploads holds some.
    if cfg!(target_os = "linux") {
        let rss = stats["rss"].as_u64().unwrap_or(0);
        assert!(rss > 1 << 20, "rss {rss}: {stats}");
    }
    // The allocator's figures (glibc): what malloc handed out (reserved pages included, so
    // not compared with rss) and keeps free; `in_use` is the former name of `allocated`.
    if cfg!(all(target_os = "linux", target_env = "gnu")) {
        let allocated = stats["heap"]["allocated"].as_u64().unwrap_or(0);
        assert!(allocated > 1 << 20, "heap allocated {allocated}: {stats}");
        assert_eq!(stats["heap"]["in_use"].as_u64(), Some(allocated), "{stats}");
        assert!(stats["heap"]["free"].is_u64(), "{stats}");
    }
    let expected = heads_hex(&mut doc);
    relay.terminate();
    relay.restart();
    let (status, bytes) = get_bytes(&c, &relay.url("/big")).await;
    assert_eq!(status, StatusCode::OK);
    let mut loaded = AutoCommit::load(&bytes).unwrap();
    assert_eq!(heads_hex(&mut loaded), expected);
    assert_eq!(items(&loaded).len(), 1001);
}

#[tokio::test]
async fn graceful_shutdown_keeps_every_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(dir.path());
    let c = client();
    let url = relay.url("/shutdown");
    let base = base_doc();
    post(&c, &url, base.clone().save()).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let (c, url, tx) = (c.clone(), url.clone(), tx.clone());
        let mut doc = base.clone().fork();
        tasks.push(tokio::spawn(async move {
            for i in 0..200 {
                let heads = doc.get_heads();
                add_item(&mut doc, &format!("w{w}-{i}"));
                match c.post(&url).body(doc.save_after(&heads)).send().await {
                    Ok(r) if r.status().is_success() => {
                        let _ = tx.send(format!("w{w}-{i}"));
                    }
                    _ => break,
                }
            }
        }));
    }
    // Stop once writes are flowing.
    wait_for("some acknowledged writes", Duration::from_secs(20), || {
        let n = rx.len();
        async move { (n >= 50).then_some(()) }
    })
    .await;
    assert_eq!(relay.terminate(), Some(0), "graceful exit code");
    for t in tasks {
        t.await.unwrap();
    }
    drop(tx);
    let mut acked = Vec::new();
    while let Some(item) = rx.recv().await {
        acked.push(item);
    }
    relay.restart();
    let (_, bytes) = get_bytes(&c, &relay.url("/shutdown")).await;
    let got = items(&AutoCommit::load(&bytes).unwrap());
    for a in &acked {
        assert!(got.contains(a), "acknowledged {a} lost");
    }
}

#[tokio::test]
async fn bad_input_is_rejected_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_with(dir.path(), &["--max-body", "64KiB"]);
    let c = client();
    let url = relay.url("/victim");
    let mut doc = base_doc();
    post(&c, &url, doc.save()).await;
    let (_, before) = get_bytes(&c, &url).await;
    let save = doc.save();

    let mut junk_tail = save.clone();
    junk_tail.extend_from_slice(b"trailing junk");
    let cases: Vec<(&str, Vec<u8>, StatusCode, &str)> = vec![
        (
            "garbage",
            b"definitely not automerge".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_automerge",
        ),
        (
            "truncated",
            save[..save.len() - 5].to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_automerge",
        ),
        (
            "trailing junk",
            junk_tail,
            StatusCode::BAD_REQUEST,
            "invalid_automerge",
        ),
        ("empty", Vec::new(), StatusCode::BAD_REQUEST, "empty_body"),
        (
            "empty doc",
            AutoCommit::new().save(),
            StatusCode::BAD_REQUEST,
            "no_changes",
        ),
        (
            "too large",
            vec![0u8; 65 * 1024],
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
        ),
    ];
    for (name, body, status, code) in cases {
        let (got, json, _) = post(&c, &url, body).await;
        assert_eq!(got, status, "{name}: {json}");
        assert_eq!(json["error"], code, "{name}");
        assert!(json["message"].as_str().is_some_and(|m| !m.is_empty()));
        let (_, after) = get_bytes(&c, &url).await;
        assert_eq!(before, after, "{name} changed the stored document");
    }

    // Bad ids, including ones a URL library would normalise away.
    for (line, what) in [
        ("GET /.. HTTP/1.1", ".."),
        ("GET /_x HTTP/1.1", "_x"),
        ("PUT /.hidden HTTP/1.1", ".hidden"),
        ("GET /%00%ff HTTP/1.1", "percent junk"),
        ("GET /a%2Fb HTTP/1.1", "encoded slash"),
        ("GET /caf%C3%A9 HTTP/1.1", "non-ascii"),
    ] {
        let (status, body) = raw_request(relay.port, line);
        assert_eq!(status, 400, "{what}: {body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        assert_eq!(json["error"], "bad_id", "{what}: {body}");
    }
    let long = "x".repeat(129);
    let (status, json, _) = post(&c, &relay.url(&format!("/{long}")), save.clone()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(json["error"], "bad_id");
    let ok = "x".repeat(128);
    let (status, _, _) = post(&c, &relay.url(&format!("/{ok}")), save.clone()).await;
    assert_eq!(status, StatusCode::CREATED);

    // Unknown server paths and methods get JSON errors too.
    let (status, body) = raw_request(relay.port, "GET /_/nope HTTP/1.1");
    assert_eq!(status, 404, "{body}");
    let (status, body) = raw_request(relay.port, "PATCH /victim HTTP/1.1");
    assert_eq!(status, 405, "{body}");
    assert!(body.contains("method_not_allowed"));
    let (_, after) = get_bytes(&c, &url).await;
    assert_eq!(before, after);
}

#[tokio::test]
async fn missing_dependencies_wait_and_then_apply() {
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Relay::start(dir.path());
    let c = client();
    let url = relay.url("/deps");
    let mut doc = base_doc();
    post(&c, &url, doc.save()).await;
    let h0 = doc.get_heads();
    add_item(&mut doc, "middle");
    let middle_only = doc.save_after(&h0);
    let h1 = doc.get_heads();
    add_item(&mut doc, "last");
    let last = doc.save_after(&h1);

    let (_, before) = get_bytes(&c, &url).await;
    let (status, body, _) = post(&c, &url, last.clone()).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["applied"], 0);
    assert_eq!(body["pending"], 1);
    let (_, after) = get_bytes(&c, &url).await;
    assert_eq!(items(&AutoCommit::load(&after).unwrap()), vec!["base"]);
    assert_eq!(before, after);

    // The pending change is durable: restart before its dependency arrives.
    relay.kill9();
    relay.restart();
    let url = relay.url("/deps");
    let (status, body, _) = post(&c, &url, middle_only).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, bytes) = get_bytes(&c, &url).await;
    let mut merged = AutoCommit::load(&bytes).unwrap();
    assert_eq!(items(&merged), vec!["base", "middle", "last"]);
    assert_eq!(heads_hex(&mut merged), heads_hex(&mut doc));
}

#[tokio::test]
async fn compare_and_set_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path());
    let c = client();
    let url = relay.url("/cas");
    let mut doc = base_doc();

    // An If-Match that is not text is a bad request, not an unconditional write.
    let r = c
        .put(&url)
        .header(
            "if-match",
            reqwest::header::HeaderValue::from_bytes(b"\"\xff\xfe\"").unwrap(),
        )
        .body(doc.save())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        c.get(&url).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );

    // If-Match on a missing document fails.
    let r = c
        .put(&url)
        .header("if-match", "\"nope\"")
        .body(doc.save())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);
    assert_eq!(
        c.get(&url).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );

    // If-None-Match: * creates once.
    let r = c
        .put(&url)
        .header("if-none-match", "*")
        .body(doc.save())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    let r = c
        .put(&url)
        .header("if-none-match", "*")
        .body(doc.save())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);
    let json: serde_json::Value = r.json().await.unwrap();
    assert_eq!(json["error"], "precondition_failed");

    add_item(&mut doc, "cas");
    let (_, before) = get_bytes(&c, &url).await;
    let r = c
        .put(&url)
        .header("if-match", "\"stale\"")
        .body(doc.save())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);
    let (_, after) = get_bytes(&c, &url).await;
    assert_eq!(before, after, "a failed precondition stores nothing");
    let r = c
        .put(&url)
        .header("if-match", &etag)
        .body(doc.save())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_ne!(r.headers()["etag"].to_str().unwrap(), etag);

    let r = c.delete(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        c.get(&url).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        c.delete(&url).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    // It can be created again.
    let (status, _, _) = post(&c, &url, doc.save()).await;
    assert_eq!(status, StatusCode::CREATED);
}

#[tokio::test]
async fn cors_and_server_routes() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path());
    let c = client();
    let mut doc = base_doc();
    post(&c, &relay.url("/cors"), doc.save()).await;
    let r = c
        .get(relay.url("/cors"))
        .header("origin", "http://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    assert!(r.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .contains("etag"));
    let r = c
        .request(reqwest::Method::OPTIONS, relay.url("/cors"))
        .header("origin", "http://app.example")
        .header("access-control-request-method", "PUT")
        .header("access-control-request-headers", "if-match,content-type")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let allowed = r.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap();
    assert!(allowed.contains("if-match") && allowed.contains("content-type"));

    for path in ["/_/health", "/_/ready"] {
        assert_eq!(
            c.get(relay.url(path)).send().await.unwrap().status(),
            StatusCode::OK
        );
    }
    let text = c
        .get(relay.url("/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("automerge-relay"));
    let list: serde_json::Value = c
        .get(relay.url("/_/docs"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["documents"][0]["id"], "cors", "{list}");
    assert_eq!(list["documents"].as_array().unwrap().len(), 1, "{list}");
    assert!(
        list["documents"][0]["changes"].as_u64().unwrap() >= 1,
        "{list}"
    );
    assert!(list["documents"][0]["size"].as_u64().unwrap() > 0, "{list}");
    assert_eq!(list["documents"][0]["heads"].as_array().unwrap().len(), 1);
    assert_eq!(list["next"], serde_json::Value::Null);
}

#[tokio::test]
async fn cors_origin_can_be_restricted() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_with(dir.path(), &["--cors-origin", "http://good.example"]);
    let c = client();
    let r = c
        .get(relay.url("/_/health"))
        .header("origin", "http://good.example")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "http://good.example"
    );
    let r = c
        .get(relay.url("/_/health"))
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());

    // A simple POST (no preflight) from another origin is refused and stores nothing; from
    // the allowed origin, or without an Origin, it goes through.
    let doc = base_doc().save();
    let url = relay.url("/origin-doc");
    let post_from = |origin: Option<&'static str>| {
        let mut req = c.post(&url).body(doc.clone());
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        req.send()
    };
    let r = post_from(Some("http://evil.example")).await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "forbidden");
    assert_eq!(
        c.get(&url).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    let r = post_from(Some("http://good.example")).await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = post_from(None).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // So is a WebSocket upgrade from another origin.
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = relay.ws_url("/origin-doc").into_client_request().unwrap();
    req.headers_mut()
        .insert("origin", "http://evil.example".parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), StatusCode::FORBIDDEN)
        }
        other => panic!("upgrade from another origin: {other:?}"),
    }
}

#[tokio::test]
async fn after_a_delete_changes_on_the_old_history_wait_but_make_no_document() {
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Relay::start_with(dir.path(), &["--max-pending-changes", "3"]);
    let c = client();
    let url = relay.url("/gone");
    let mut doc = base_doc();
    let (status, _, _) = post(&c, &url, doc.save()).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(
        c.delete(&url).send().await.unwrap().status(),
        StatusCode::NO_CONTENT
    );
    // A client that missed the delete keeps sending changes on the deleted history.
    for i in 0..3 {
        let heads = doc.get_heads();
        add_item(&mut doc, &format!("late {i}"));
        let (status, body, _) = post(&c, &url, doc.save_after(&heads)).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        assert_eq!(
            c.get(&url).send().await.unwrap().status(),
            StatusCode::NOT_FOUND,
            "changes that only wait make no document"
        );
    }
    // Nor are they listed: not while the document is hot, nor after a restart loads it anew.
    let listed = |relay_url: String| {
        let c = c.clone();
        async move {
            let v: serde_json::Value = c.get(relay_url).send().await.unwrap().json().await.unwrap();
            v["documents"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["id"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        }
    };
    let (status, _, _) = post(&c, &relay.url("/kept"), base_doc().save()).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(listed(relay.url("/_/docs")).await, vec!["kept"]);
    relay.kill9();
    relay.restart();
    assert_eq!(listed(relay.url("/_/docs")).await, vec!["kept"]);
    assert_eq!(listed(relay.url("/_/docs?limit=1")).await, vec!["kept"]);
    let url = relay.url("/gone");
    // Past --max-pending-changes they are refused, nothing more is stored.
    let heads = doc.get_heads();
    add_item(&mut doc, "one too many");
    let (status, body, _) = post(&c, &url, doc.save_after(&heads)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"], "too_many_pending");
    // A full save brings the document back, with everything.
    let (status, body, _) = post(&c, &url, doc.save()).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (_, bytes) = get_bytes(&c, &url).await;
    assert_eq!(
        heads_hex(&mut AutoCommit::load(&bytes).unwrap()),
        heads_hex(&mut doc)
    );
}
