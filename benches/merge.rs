//! Merge benchmark (issue: core). Run: `cargo bench --bench merge` (release build).
//!
//! (a) the in-process floor: `apply_changes` of one small change into a 20k-change map-shaped
//!     and list-shaped document;
//! (b) the relay's p50 latency for an HTTP POST of that one change (incremental bytes) and of a
//!     full save of the same document;
//! (c) 32 concurrent writers posting full saves of a small document: changes merged per second
//!     and the average batch size (from `/_/stats`).
//! Ratios are against (a), measured in the same run.

use std::time::{Duration, Instant};

use automerge::transaction::Transactable;
use automerge::{AutoCommit, Automerge, Change, ObjType, ReadDoc, ROOT};

mod support;
use support::{cpu_secs, ms, small_change, stats, Relay};

const HISTORY: usize = 20_000;
const SAMPLES: usize = 200;

fn map_doc() -> AutoCommit {
    let mut doc = AutoCommit::new();
    for i in 0..HISTORY {
        doc.put(ROOT, format!("key{i}"), i as i64).unwrap();
        doc.commit();
    }
    doc
}

fn list_doc() -> AutoCommit {
    let mut doc = AutoCommit::new();
    let list = doc.put_object(ROOT, "items", ObjType::List).unwrap();
    doc.commit();
    for i in 0..HISTORY {
        doc.insert(&list, i, format!("item {i}")).unwrap();
        doc.commit();
    }
    doc
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let idx = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[idx]
}

/// (a): apply one change at a time into a server-side copy.
fn floor(base: &AutoCommit) -> Duration {
    let mut server: Automerge = Automerge::load(&base.clone().save()).unwrap();
    let mut client = base.clone();
    let mut samples = Vec::with_capacity(SAMPLES);
    for i in 0..SAMPLES {
        small_change(&mut client, i);
        let change: Change = client.get_last_local_change().unwrap().clone();
        let t = Instant::now();
        server.apply_changes([change]).unwrap();
        samples.push(t.elapsed());
    }
    percentile(&mut samples, 0.5)
}

async fn post(c: &reqwest::Client, url: &str, body: Vec<u8>) -> serde_json::Value {
    let r = c.post(url).body(body).send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    r.json().await.unwrap()
}

/// (b): POST latency of one change, as incremental bytes and as a full save.
async fn relay_latency(
    c: &reqwest::Client,
    port: u16,
    name: &str,
    base: &AutoCommit,
) -> (Duration, Duration) {
    let url = format!("http://127.0.0.1:{port}/{name}");
    let mut doc = base.clone();
    post(c, &url, doc.save()).await;
    let mut inc = Vec::with_capacity(SAMPLES);
    for i in 0..SAMPLES {
        let heads = doc.get_heads();
        small_change(&mut doc, i);
        let body = doc.save_after(&heads);
        let t = Instant::now();
        post(c, &url, body).await;
        inc.push(t.elapsed());
    }
    let mut full = Vec::with_capacity(SAMPLES / 4);
    for i in 0..SAMPLES / 4 {
        small_change(&mut doc, SAMPLES + i);
        let body = doc.save();
        let t = Instant::now();
        post(c, &url, body).await;
        full.push(t.elapsed());
    }
    (percentile(&mut inc, 0.5), percentile(&mut full, 0.5))
}

struct Contention {
    rate: f64,
    avg_batch: f64,
    apply_ms: f64,
    persist_ms: f64,
    server_cpu: f64,
    client_cpu: f64,
}

/// (c): 32 writers posting full saves of a small document for `secs` seconds.
async fn concurrent_writers(c: &reqwest::Client, port: u16, pid: u32, secs: u64) -> Contention {
    let url = format!("http://127.0.0.1:{port}/contended");
    let mut base = AutoCommit::new();
    let list = base.put_object(ROOT, "items", ObjType::List).unwrap();
    base.insert(&list, 0, "base").unwrap();
    base.commit();
    post(c, &url, base.save()).await;
    let before = stats(c, port).await;
    let (server0, client0) = (cpu_secs(pid), cpu_secs(std::process::id()));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..32 {
        let (c, url, list) = (c.clone(), url.clone(), list.clone());
        let mut doc = base.fork();
        tasks.push(tokio::spawn(async move {
            let mut applied = 0u64;
            let mut i = 0;
            while Instant::now() < deadline {
                let len = doc.length(&list);
                doc.insert(&list, len, format!("w{w}-{i}")).unwrap();
                doc.commit();
                i += 1;
                let v = post(&c, &url, doc.save()).await;
                applied += v["applied"].as_u64().unwrap();
            }
            applied
        }));
    }
    let mut applied = 0;
    for t in tasks {
        applied += t.await.unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (server1, client1) = (cpu_secs(pid), cpu_secs(std::process::id()));
    let after = stats(c, port).await;
    let d = |k: &str| (after[k].as_u64().unwrap() - before[k].as_u64().unwrap()) as f64;
    Contention {
        rate: applied as f64 / elapsed,
        avg_batch: d("batched_writes") / d("batches").max(1.0),
        apply_ms: d("apply_micros") / d("batches").max(1.0) / 1000.0,
        persist_ms: d("persist_micros") / d("persists").max(1.0) / 1000.0,
        server_cpu: (server1 - server0) / elapsed,
        client_cpu: (client1 - client0) / elapsed,
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        // `cargo bench -- --list` / `cargo test --benches` compatibility: nothing to list.
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!("building {HISTORY}-change documents…");
    let docs = [("map", map_doc()), ("list", list_doc())];
    let relay = Relay::start(&[]);
    let c = support::http_client();
    println!("\n(a) in-process floor vs (b) relay HTTP POST, p50 of {SAMPLES} samples");
    println!(
        "{:<6} {:>12} {:>16} {:>8} {:>16}",
        "doc", "(a) apply", "(b) POST incr.", "ratio", "(b) POST full"
    );
    let skip_ab = std::env::var("MERGE_ONLY_C").is_ok();
    for (name, doc) in docs.iter().filter(|_| !skip_ab) {
        let a = floor(doc);
        let (inc, full) = rt.block_on(relay_latency(&c, relay.port, name, doc));
        println!(
            "{:<6} {:>10.3}ms {:>14.3}ms {:>7.2}x {:>14.3}ms",
            name,
            ms(a),
            ms(inc),
            ms(inc) / ms(a),
            ms(full)
        );
    }
    let r = rt.block_on(concurrent_writers(&c, relay.port, relay.pid(), 10));
    println!("\n(c) 32 concurrent writers, full saves of a small document, 10 s");
    println!(
        "changes merged/s: {:.0}   average batch: {:.1} writes, {:.2} ms apply, {:.2} ms persist",
        r.rate, r.avg_batch, r.apply_ms, r.persist_ms
    );
    println!(
        "CPU (cores busy): relay {:.2}, load generator {:.2}",
        r.server_cpu, r.client_cpu
    );
}
