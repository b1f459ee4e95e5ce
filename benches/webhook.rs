//! Webhook benchmark: does a webhook receiver slow writers down? Run: `cargo bench --bench
//! webhook`.
//!
//! The same writes against three relays, one after the other, in one run: no webhook; a
//! webhook to a fast receiver (answers 204 at once); a webhook to a hanging receiver (takes
//! each request and never answers). Each relay gets `--samples` sequential HTTP `POST`s of one
//! small change, round-robin over `--docs` documents, and reports their p50/p99 latency. The
//! webhook runs with `--webhook-debounce-ms 0`, so every write makes a call at once: the most
//! webhook work writes can cause. The receivers run in this process, on loopback.
//! Options: `--samples N` (2000), `--docs N` (64), `--store sled|memory` (sled).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ROOT};

mod support;
use support::{arg, Relay};

#[derive(Clone, Copy)]
enum Receiver {
    Fast,
    Hanging,
}

/// Starts a receiver on a free loopback port: its URL and the count of requests it got.
async fn receiver(kind: Receiver) -> (String, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the receiver");
    let port = listener.local_addr().expect("receiver address").port();
    let got = Arc::new(AtomicU64::new(0));
    let counted = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::Relaxed);
                if let Receiver::Hanging = kind {
                    std::future::pending::<()>().await;
                }
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://127.0.0.1:{port}/hook"), got)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `samples` sequential POSTs of one change, round-robin over `docs` documents (each written
/// once first, not timed): the sorted latencies.
async fn write_latencies(relay: &Relay, docs: usize, samples: usize) -> Vec<Duration> {
    let c = support::http_client();
    let mut local: Vec<AutoCommit> = (0..docs).map(|_| AutoCommit::new()).collect();
    let mut post = |i: usize, n: usize| {
        let doc = &mut local[i % docs];
        let heads = doc.get_heads();
        doc.put(ROOT, "n", n as i64).expect("put");
        doc.commit();
        let body = doc.save_after(&heads);
        let url = relay.url(&format!("/bench-{}", i % docs));
        let c = c.clone();
        async move {
            let t = Instant::now();
            let r = c.post(url).body(body).send().await.expect("post");
            assert!(r.status().is_success(), "write: {}", r.status());
            t.elapsed()
        }
    };
    for i in 0..docs {
        post(i, 0).await;
    }
    let mut took = Vec::with_capacity(samples);
    for n in 0..samples {
        took.push(post(n, n + 1).await);
    }
    took.sort();
    took
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        // `cargo bench -- --list` / `cargo test --benches` compatibility: nothing to list.
        return;
    }
    let samples: usize = arg("--samples", "2000").parse().expect("--samples N");
    let docs: usize = arg("--docs", "64").parse().expect("--docs N");
    let store = arg("--store", "sled");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let secret_dir = tempfile::tempdir().expect("temp dir");
    let secret = secret_dir.path().join("webhook-secret");
    std::fs::write(&secret, "bench-secret\n").expect("write the secret");
    let secret = secret.to_str().expect("a UTF-8 path").to_owned();
    println!(
        "{samples} sequential POSTs of one change over {docs} documents, --store {store}, \
         webhook with --webhook-debounce-ms 0"
    );
    println!(
        "{:<18} {:>9} {:>9} {:>9}  webhook requests received",
        "receiver", "p50", "p99", "max"
    );
    for (name, kind) in [
        ("no webhook", None),
        ("fast receiver", Some(Receiver::Fast)),
        ("hanging receiver", Some(Receiver::Hanging)),
    ] {
        let (url, got) = match kind {
            Some(kind) => {
                let (url, got) = rt.block_on(receiver(kind));
                (Some(url), Some(got))
            }
            None => (None, None),
        };
        let mut flags = vec!["--store", store.as_str()];
        if let Some(url) = &url {
            flags.extend([
                "--webhook",
                url.as_str(),
                "--webhook-secret-file",
                secret.as_str(),
                "--webhook-debounce-ms",
                "0",
            ]);
        }
        let relay = Relay::start(&flags);
        let took = rt.block_on(write_latencies(&relay, docs, samples));
        let received = got
            .map(|g| g.load(Ordering::Relaxed).to_string())
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<18} {:>7.3}ms {:>7.3}ms {:>7.3}ms  {received}",
            name,
            ms(percentile(&took, 0.5)),
            ms(percentile(&took, 0.99)),
            ms(percentile(&took, 1.0)),
        );
        drop(relay);
    }
}
