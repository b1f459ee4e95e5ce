//! Scale-out: relay nodes on one PostgreSQL store with Redis fan-out between them, driven as
//! real binaries over real sockets. Every test has a database and a channel prefix of its
//! own (`common::services`); the fault tests put a Redis of their own or a TCP proxy between
//! the nodes and the servers, never touching the shared ones.

mod common;

use std::collections::HashSet;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use automerge::{AutoCommit, Automerge, ChangeHash};
use common::services::{key_prefix, redis_url, RedisServer, TcpProxy, TestDb};
use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

/// One relay node of a test cluster, with the port its clients should use now.
struct Node {
    relay: Relay,
    _dir: tempfile::TempDir,
    port: Arc<AtomicU16>,
}

impl Node {
    fn start(store: &str, fanout: &str, prefix: &str, extra: &[&str]) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let mut args = vec![
            "--store",
            store,
            "--fanout",
            fanout,
            "--fanout-prefix",
            prefix,
        ];
        if !extra.contains(&"--heads-check-secs") {
            // Short, so that repairs of what the fan-out missed show within a test.
            args.extend_from_slice(&["--heads-check-secs", "1"]);
        }
        args.extend_from_slice(extra);
        let relay = Relay::start_with(dir.path(), &args);
        let port = Arc::new(AtomicU16::new(relay.port));
        Node {
            relay,
            _dir: dir,
            port,
        }
    }

    fn url(&self, path: &str) -> String {
        self.relay.url(path)
    }

    /// kill -9, then start again on the same store (on a new port, which its clients follow).
    fn crash_and_restart(&mut self) {
        self.relay.kill9();
        self.relay.restart();
        self.port.store(self.relay.port, Ordering::SeqCst);
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// A fresh automerge-repo document id (bs58check of 16 random bytes), so every interface,
/// the repo protocol included, reaches the document.
fn repo_doc_id() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).unwrap();
    bs58::encode(bytes).with_check().into_string()
}

/// The document a node serves now, if any.
async fn served(c: &reqwest::Client, port: u16, id: &str) -> Option<Automerge> {
    let r = c
        .get(format!("http://127.0.0.1:{port}/{id}"))
        .send()
        .await
        .ok()?;
    if r.status() != 200 {
        return None;
    }
    Automerge::load(&r.bytes().await.ok()?).ok()
}

fn sorted_heads(doc: &Automerge) -> Vec<ChangeHash> {
    let mut h = doc.get_heads();
    h.sort();
    h
}

/// How a writer reaches its node.
#[derive(Clone, Copy, Debug)]
enum Via {
    Http,
    Ws,
}

/// A writer: `count` changes to `id`, each sent with everything since its last acknowledged
/// write (so a write lost with a dying node is sent again); records the change it last saw
/// acknowledged. Retries against whatever port its node has now.
async fn writer(
    via: Via,
    port: Arc<AtomicU16>,
    id: String,
    base: Vec<u8>,
    name: String,
    count: usize,
    progress: Arc<AtomicUsize>,
) -> Option<ChangeHash> {
    let c = client();
    let mut doc = AutoCommit::load(&base).unwrap();
    let mut acked_heads = doc.get_heads();
    let mut acked: Option<ChangeHash> = None;
    let mut ws: Option<Ws> = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    for k in 0..count {
        add_item(&mut doc, &format!("{name}-{k}"));
        let mine = doc.get_heads();
        loop {
            assert!(
                Instant::now() < deadline,
                "{name} could not write for 120 s"
            );
            let body = doc.save_after(&acked_heads);
            let p = port.load(Ordering::SeqCst);
            let ok = match via {
                Via::Http => matches!(
                    c.post(format!("http://127.0.0.1:{p}/{id}")).body(body).send().await,
                    Ok(r) if r.status().is_success()
                ),
                Via::Ws => {
                    if ws.is_none() {
                        ws = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{p}/{id}"))
                            .await
                            .ok()
                            .map(|(s, _)| s);
                    }
                    match ws.as_mut() {
                        Some(s) => {
                            let acked = ws_write(s, body).await;
                            if !acked {
                                ws = None;
                            }
                            acked
                        }
                        None => false,
                    }
                }
            };
            if ok {
                acked_heads = mine.clone();
                acked = mine.first().copied();
                progress.fetch_add(1, Ordering::SeqCst);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    acked
}

/// Sends one binary upload on a per-document socket and waits for its ack (skipping the
/// document and the other writers' changes); false when the socket failed first.
async fn ws_write(ws: &mut Ws, body: Vec<u8>) -> bool {
    if ws.send(Message::Binary(body.into())).await.is_err() {
        return false;
    }
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) if t.contains("\"ack\"") => return true,
            Ok(Some(Ok(Message::Text(t)))) if t.contains("\"error\"") => return false,
            Ok(Some(Ok(_))) => continue,
            _ => return false,
        }
    }
}

/// A per-document WebSocket subscriber that reconnects to its node's current port whenever
/// its socket ends, merging everything it receives.
fn subscriber(port: Arc<AtomicU16>, id: String, stop: Arc<AtomicBool>) -> Arc<Mutex<Automerge>> {
    let doc = Arc::new(Mutex::new(Automerge::new()));
    let seen = doc.clone();
    tokio::spawn(async move {
        while !stop.load(Ordering::SeqCst) {
            let p = port.load(Ordering::SeqCst);
            let Ok((mut ws, _)) =
                tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{p}/{id}")).await
            else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            loop {
                let next = tokio::time::timeout(Duration::from_millis(200), ws.next()).await;
                match next {
                    Err(_) if stop.load(Ordering::SeqCst) => return,
                    Err(_) => continue,
                    Ok(Some(Ok(Message::Binary(b)))) => {
                        let _ = seen.lock().unwrap().load_incremental(&b);
                    }
                    Ok(Some(Ok(_))) => continue,
                    Ok(_) => break,
                }
            }
        }
    });
    doc
}

/// The npm automerge-repo client (tests/js/cluster-writer.mjs) making `count` changes to
/// `id` through `node`'s repo socket; returns the hash of its last change once the node
/// holds it.
fn repo_writer(node_port: u16, id: &str, count: usize) -> std::thread::JoinHandle<ChangeHash> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/js/cluster-writer.mjs");
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/js");
    let id = id.to_string();
    std::thread::spawn(move || {
        let out = Command::new("node")
            .arg(script)
            .arg(format!("ws://127.0.0.1:{node_port}"))
            .arg(format!("http://127.0.0.1:{node_port}"))
            .arg(&id)
            .arg(count.to_string())
            .current_dir(dir)
            .output()
            .expect("run node (scripts/test installs the npm packages)");
        assert!(
            out.status.success(),
            "the automerge-repo writer failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().last().unwrap_or("").trim().to_string();
        let v: serde_json::Value = serde_json::from_str(&line).expect("writer's JSON line");
        v["last"].as_str().unwrap().parse().expect("a change hash")
    })
}

/// Waits until every node serves the same heads, holding every change in `acked`, and every
/// subscriber has them too. Returns the heads.
async fn converged(
    nodes: &[Node],
    id: &str,
    acked: &[ChangeHash],
    subscribers: &[Arc<Mutex<Automerge>>],
) -> Vec<ChangeHash> {
    let c = client();
    let heads = wait_for(
        "every node to serve the same heads with every acknowledged change",
        Duration::from_secs(60),
        || {
            let c = c.clone();
            let ports: Vec<u16> = nodes
                .iter()
                .map(|n| n.port.load(Ordering::SeqCst))
                .collect();
            let id = id.to_string();
            let acked = acked.to_vec();
            async move {
                let mut all = Vec::new();
                for p in ports {
                    let doc = served(&c, p, &id).await?;
                    if acked
                        .iter()
                        .any(|h| doc.get_change_meta_by_hash(h).is_none())
                    {
                        return None;
                    }
                    all.push(sorted_heads(&doc));
                }
                all.windows(2).all(|w| w[0] == w[1]).then(|| all[0].clone())
            }
        },
    )
    .await;
    let want = heads.clone();
    wait_for(
        "every subscriber to hold the nodes' heads",
        Duration::from_secs(30),
        || {
            let ok = subscribers
                .iter()
                .all(|s| sorted_heads(&s.lock().unwrap()) == want);
            async move { ok.then_some(()) }
        },
    )
    .await;
    heads
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_one_killed_and_redis_restarted_lose_no_acknowledged_change() {
    let db = TestDb::create();
    let mut redis = RedisServer::start();
    let prefix = key_prefix();
    let mut nodes: Vec<Node> = (0..3)
        .map(|_| Node::start(&db.url, &redis.url(), &prefix, &[]))
        .collect();
    let rounds: usize = std::env::var("CLUSTER_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    const WRITES: usize = 12;
    for round in 0..rounds {
        let id = repo_doc_id();
        let victim = round % 3;
        let base = base_doc().save();
        let c = client();
        let r = c
            .post(nodes[0].url(&format!("/{id}")))
            .body(base.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "round {round}");

        let stop = Arc::new(AtomicBool::new(false));
        let subscribers: Vec<_> = nodes
            .iter()
            .map(|n| subscriber(n.port.clone(), id.clone(), stop.clone()))
            .collect();
        let progress = Arc::new(AtomicUsize::new(0));
        let mut writers = Vec::new();
        for (i, n) in nodes.iter().enumerate() {
            for via in [Via::Http, Via::Ws] {
                writers.push(tokio::spawn(writer(
                    via,
                    n.port.clone(),
                    id.clone(),
                    base.clone(),
                    format!("r{round}-n{i}-{via:?}"),
                    WRITES,
                    progress.clone(),
                )));
            }
        }
        // The npm automerge-repo client writes through a node that stays up.
        let repo = repo_writer(nodes[(victim + 1) % 3].relay.port, &id, WRITES);

        // Mid-run: kill -9 one node and restart it; restart Redis.
        wait_for("writers to be under way", Duration::from_secs(60), || {
            let done = progress.load(Ordering::SeqCst);
            async move { (done >= writers_len() * WRITES / 3).then_some(()) }
        })
        .await;
        nodes[victim].crash_and_restart();
        redis.restart();

        let mut acked = Vec::new();
        for w in writers {
            acked.extend(w.await.unwrap());
        }
        let repo_last = tokio::task::spawn_blocking(move || repo.join().unwrap())
            .await
            .unwrap();
        acked.push(repo_last);
        assert_eq!(acked.len(), writers_len() + 1, "every writer finished");
        let heads = converged(&nodes, &id, &acked, &subscribers).await;
        stop.store(true, Ordering::SeqCst);

        // What the cluster serves is what the store holds: a node started now loads it.
        let fresh = Node::start(&db.url, &redis.url(), &prefix, &[]);
        let doc = served(&c, fresh.relay.port, &id)
            .await
            .expect("served by a fresh node");
        assert_eq!(sorted_heads(&doc), heads, "round {round}");
        let items = items(&AutoCommit::load(&doc.save()).unwrap());
        for i in 0..3 {
            for via in ["Http", "Ws"] {
                let last = format!("r{round}-n{i}-{via}-{}", WRITES - 1);
                assert!(items.contains(&last), "round {round}: {last} missing");
            }
        }
    }
}

/// Writers per round: an HTTP and a per-document WebSocket writer on each of three nodes.
fn writers_len() -> usize {
    6
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_on_one_node_is_seen_by_every_node() {
    let db = TestDb::create();
    let prefix = key_prefix();
    let redis = redis_url();
    let nodes: Vec<Node> = (0..3)
        .map(|_| Node::start(&db.url, &redis, &prefix, &["--heads-check-secs", "3600"]))
        .collect();
    let c = client();
    let id = "doomed";
    let r = c
        .post(nodes[0].url("/doomed"))
        .body(base_doc().save())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // Subscribers on B and C: each first gets the document.
    let mut subs = Vec::new();
    for n in &nodes[1..] {
        let (mut ws, _) = tokio_tungstenite::connect_async(n.url("/doomed").replace("http", "ws"))
            .await
            .unwrap();
        match next_frame(&mut ws, Duration::from_secs(10)).await {
            Some(Message::Binary(_)) => {}
            other => panic!("expected the document first, got {other:?}"),
        }
        subs.push(ws);
    }
    let r = c.delete(nodes[0].url("/doomed")).send().await.unwrap();
    assert_eq!(r.status(), 204);
    for ws in &mut subs {
        match next_frame(ws, Duration::from_secs(10)).await {
            Some(Message::Text(t)) => assert!(t.contains("deleted"), "{t}"),
            other => panic!("expected deleted, got {other:?}"),
        }
        assert_eq!(
            close_code(ws, Instant::now() + Duration::from_secs(10)).await,
            Some(4404)
        );
    }
    for n in &nodes {
        let r = c.get(n.url(&format!("/{id}"))).send().await.unwrap();
        assert_eq!(r.status(), 404, "no node serves the deleted content");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_missed_by_the_fanout_is_repaired_from_the_store() {
    // A fan-out nobody else listens to (its own prefix per node): only the periodic heads
    // check can bring node A's writes to node B.
    let db = TestDb::create();
    let redis = redis_url();
    let a = Node::start(&db.url, &redis, &key_prefix(), &[]);
    let b = Node::start(&db.url, &redis, &key_prefix(), &[]);
    let c = client();
    let mut doc = base_doc();
    let r = c
        .post(a.url("/drift"))
        .body(doc.save())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // B holds it hot, with a subscriber.
    let stop = Arc::new(AtomicBool::new(false));
    let sub = subscriber(b.port.clone(), "drift".into(), stop.clone());
    wait_for("B to serve the document", Duration::from_secs(10), || {
        let c = c.clone();
        let p = b.relay.port;
        async move { served(&c, p, "drift").await }
    })
    .await;
    let heads = doc.get_heads();
    add_item(&mut doc, "written on A");
    let r = c
        .post(a.url("/drift"))
        .body(doc.save_after(&heads))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let want = sorted_heads(doc.document());
    wait_for(
        "B's subscriber to receive A's change",
        Duration::from_secs(20),
        || {
            let ok = sorted_heads(&sub.lock().unwrap()) == want;
            async move { ok.then_some(()) }
        },
    )
    .await;
    let served_b = served(&c, b.relay.port, "drift").await.unwrap();
    assert_eq!(sorted_heads(&served_b), want);
    stop.store(true, Ordering::SeqCst);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_cut_off_answers_503_loses_nothing_and_resumes() {
    let db = TestDb::create();
    let proxy = TcpProxy::start(&db.url);
    let node = Node::start(
        &proxy.url_for(&db.url),
        &redis_url(),
        &key_prefix(),
        &["--store-timeout-secs", "2"],
    );
    let c = client();
    let url = node.url("/cut");
    let mut doc = base_doc();
    let r = c.post(&url).body(doc.save()).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let mut acked = vec![doc.get_heads()[0]];

    proxy.cut();
    // Writes are refused (nothing acknowledged that is not committed), reads of the loaded
    // document keep working, /_/ready says not ready.
    let heads = doc.get_heads();
    add_item(&mut doc, "during the cut");
    let during = doc.save_after(&heads);
    let status = wait_for(
        "a write to be refused with 503",
        Duration::from_secs(30),
        || {
            let c = c.clone();
            let (url, body) = (url.clone(), during.clone());
            async move {
                let r = c.post(&url).body(body).send().await.ok()?;
                (r.status() == 503).then(|| r.status())
            }
        },
    )
    .await;
    assert_eq!(status, 503);
    let r = c.post(&url).body(during.clone()).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "storage_unavailable", "{body}");
    assert_eq!(
        c.get(node.url("/_/ready")).send().await.unwrap().status(),
        503
    );
    assert_eq!(c.get(&url).send().await.unwrap().status(), 200);

    proxy.restore();
    wait_for("writes to be taken again", Duration::from_secs(30), || {
        let c = c.clone();
        let (url, body) = (url.clone(), during.clone());
        async move {
            let r = c.post(&url).body(body).send().await.ok()?;
            r.status().is_success().then_some(())
        }
    })
    .await;
    acked.push(doc.get_heads()[0]);
    assert_eq!(
        c.get(node.url("/_/ready")).send().await.unwrap().status(),
        200
    );

    // Everything acknowledged is in PostgreSQL: a new node reads it directly.
    let other = Node::start(&db.url, &redis_url(), &key_prefix(), &[]);
    let served = served(&c, other.relay.port, "cut").await.unwrap();
    for h in &acked {
        assert!(served.get_change_meta_by_hash(h).is_some());
    }
    assert_eq!(sorted_heads(&served), sorted_heads(doc.document()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_compacting_one_document_at_once_keep_every_change() {
    let db = TestDb::create();
    let prefix = key_prefix();
    let redis = redis_url();
    let a = Node::start(&db.url, &redis, &prefix, &[]);
    let b = Node::start(&db.url, &redis, &prefix, &[]);
    let c = client();
    let base = base_doc().save();
    let r = c
        .post(a.url("/both"))
        .body(base.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // 100 writes through each node at once: each node compacts every 32 or so of its own.
    let progress = Arc::new(AtomicUsize::new(0));
    let wa = tokio::spawn(writer(
        Via::Http,
        a.port.clone(),
        "both".into(),
        base.clone(),
        "a".into(),
        100,
        progress.clone(),
    ));
    let wb = tokio::spawn(writer(
        Via::Http,
        b.port.clone(),
        "both".into(),
        base.clone(),
        "b".into(),
        100,
        progress.clone(),
    ));
    let acked: Vec<ChangeHash> = [wa.await.unwrap(), wb.await.unwrap()]
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(acked.len(), 2);
    let heads = converged(&[a, b], "both", &acked, &[]).await;
    let rows = common::services::pg_query(&db.url, "SELECT count(*) FROM relay_chunks").unwrap();
    let chunks: usize = rows[0][0].as_deref().unwrap().parse().unwrap();
    assert!(
        chunks < 200,
        "compaction ran ({chunks} chunks left of 200 writes)"
    );
    let fresh = Node::start(&db.url, &redis, &prefix, &[]);
    let doc = served(&c, fresh.relay.port, "both").await.unwrap();
    assert_eq!(sorted_heads(&doc), heads);
    let items = items(&AutoCommit::load(&doc.save()).unwrap());
    let set: HashSet<&String> = items.iter().collect();
    assert_eq!(set.len(), 201, "base and every write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_missed_a_delete_stops_serving_the_deleted_content() {
    // No fan-out between the two (a prefix each): B learns of A's delete only from the store,
    // after it wrote to the document itself meanwhile.
    let db = TestDb::create();
    let redis = redis_url();
    let a = Node::start(&db.url, &redis, &key_prefix(), &[]);
    let b = Node::start(&db.url, &redis, &key_prefix(), &["--heads-check-secs", "2"]);
    let c = client();
    let mut doc = base_doc();
    let r = c
        .post(a.url("/missed"))
        .body(doc.save())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert!(
        served(&c, b.relay.port, "missed").await.is_some(),
        "B holds it hot"
    );
    let r = c.delete(a.url("/missed")).send().await.unwrap();
    assert_eq!(r.status(), 204);
    // B writes on the deleted history before (or just after) its next check.
    let heads = doc.get_heads();
    add_item(&mut doc, "after the delete, on B");
    let r = c
        .post(b.url("/missed"))
        .body(doc.save_after(&heads))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    wait_for(
        "B to stop serving the deleted content",
        Duration::from_secs(20),
        || {
            let c = c.clone();
            let p = b.relay.port;
            async move { served(&c, p, "missed").await.is_none().then_some(()) }
        },
    )
    .await;
    assert!(served(&c, a.relay.port, "missed").await.is_none());
}
