//! Bounded memory with many documents (issue: hardening). Run: `cargo bench --bench many_docs`.
//!
//! Writes N small documents once each (default 100,000) to a release relay started with
//! `--memory-budget 64MiB`, sampling the relay's RSS, then reads every document back and checks
//! its heads. Reports peak RSS against budget + store cache, the relay's own estimate of hot
//! memory, evictions, and RSS beside the allocator's bytes in use after every tenth of the
//! writes (so a run shows whether memory levels off as documents accumulate). Options:
//! `--docs N`, `--budget 64MiB`, `--store-cache 16MiB`, `--concurrency 64`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ReadDoc, ROOT};
use futures_util::stream::{self, StreamExt};

mod support;
use support::{arg, rss_kib, stats, Relay};

fn doc_for(i: u64) -> AutoCommit {
    let mut doc = AutoCommit::new();
    doc.put(ROOT, "title", format!("document {i}")).unwrap();
    doc.put(ROOT, "n", i as i64).unwrap();
    doc.commit();
    doc
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let docs: u64 = arg("--docs", "100000").parse().unwrap();
    let budget = arg("--budget", "64MiB");
    let concurrency: usize = arg("--concurrency", "64").parse().unwrap();
    let store_cache = arg("--store-cache", "16MiB");
    let relay = Relay::start(&["--memory-budget", &budget, "--store-cache", &store_cache]);
    let port = relay.port;
    let pid = relay.pid();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let peak = Arc::new(AtomicU64::new(rss_kib(pid)));
    let baseline = rss_kib(pid);
    rt.block_on(async {
        let sampler = {
            let peak = peak.clone();
            tokio::spawn(async move {
                loop {
                    peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        let c = reqwest::Client::new();
        let t = Instant::now();
        let done = Arc::new(AtomicU64::new(0));
        let tenth = (docs / 10).max(1);
        let milestones = Arc::new(std::sync::Mutex::new(Vec::new()));
        stream::iter(0..docs)
            .for_each_concurrent(concurrency, |i| {
                let (c, done, milestones) = (c.clone(), done.clone(), milestones.clone());
                async move {
                    let body = doc_for(i).save();
                    let r = c
                        .post(format!("http://127.0.0.1:{port}/doc-{i}"))
                        .body(body)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 201, "doc-{i}");
                    let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                    if n % tenth == 0 {
                        let s = stats(&c, port).await;
                        let in_use = s["heap"]["in_use"].as_u64().unwrap_or(0);
                        milestones.lock().unwrap().push((n, rss_kib(pid), in_use));
                    }
                }
            })
            .await;
        let write_secs = t.elapsed().as_secs_f64();
        let after_writes = rss_kib(pid);
        let written = stats(&c, port).await;
        let t = Instant::now();
        let bad = Arc::new(AtomicU64::new(0));
        stream::iter(0..docs)
            .for_each_concurrent(concurrency, |i| {
                let (c, bad) = (c.clone(), bad.clone());
                async move {
                    let bytes = c
                        .get(format!("http://127.0.0.1:{port}/doc-{i}"))
                        .send()
                        .await
                        .unwrap()
                        .bytes()
                        .await
                        .unwrap();
                    let ok = AutoCommit::load(&bytes)
                        .map(|mut d| {
                            let n = d.get(ROOT, "n").ok().flatten().and_then(|(v, _)| v.as_i64());
                            n == Some(i as i64) && d.get_heads().len() == 1
                        })
                        .unwrap_or(false);
                    if !ok {
                        bad.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
            .await;
        let read_secs = t.elapsed().as_secs_f64();
        sampler.abort();
        let end = stats(&c, port).await;
        let mib = |kib: u64| kib as f64 / 1024.0;
        println!("{docs} documents, --memory-budget {budget}, --store-cache {store_cache}");
        let mut milestones = milestones.lock().unwrap().clone();
        milestones.sort_unstable();
        println!("while writing: documents written, RSS MiB, allocator in use MiB");
        for (n, rss, in_use) in milestones {
            println!("  {n:>8} {:>8.1} {:>8.1}", mib(rss), in_use as f64 / 1048576.0);
        }
        println!("writes: {:.1} s ({:.0}/s); reads: {:.1} s ({:.0}/s)", write_secs, docs as f64 / write_secs, read_secs, docs as f64 / read_secs);
        println!(
            "RSS: start {:.1} MiB, after writes {:.1} MiB, peak {:.1} MiB, end {:.1} MiB",
            mib(baseline),
            mib(after_writes),
            mib(peak.load(Ordering::Relaxed)),
            mib(rss_kib(pid))
        );
        println!(
            "relay's estimate after writes: {} hot documents, {:.1} MiB; evictions {}, loads {} (end: {} evictions, {} loads)",
            written["hot_documents"],
            written["hot_bytes"].as_u64().unwrap_or(0) as f64 / 1048576.0,
            written["evictions"],
            written["loads"],
            end["evictions"],
            end["loads"]
        );
        println!("documents read back wrong: {}", bad.load(Ordering::Relaxed));
    });
    drop(relay);
}
