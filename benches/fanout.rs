//! Fan-out benchmark (issue: live push). Run: `cargo bench --bench fanout`.
//!
//! One writer posts 20 changes/s for 10 s over HTTP to a document with 1,000 per-document
//! WebSocket subscribers. For every write, latency = receipt at a subscriber − the writer's
//! acknowledgement (the server pushes right after it acknowledges, so this is the fan-out time).
//! Also the server's RSS: idle per-subscriber cost and during the run.
//! Options: `--subscribers N`, `--rate R`, `--seconds S`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use automerge::transaction::Transactable;
use automerge::{AutoCommit, Change, ChangeHash, ObjType, ROOT};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

mod support;
use support::{arg, cpu_secs, rss_kib, ws_config, Relay};

fn hashes(bytes: &[u8]) -> Vec<ChangeHash> {
    automerge_relay::split_chunks(bytes)
        .map(|chunks| {
            chunks
                .into_iter()
                .filter_map(|(_, c)| Change::try_from(c).ok().map(|c| c.hash()))
                .collect()
        })
        .unwrap_or_default()
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let subscribers: usize = arg("--subscribers", "1000").parse().unwrap();
    let rate: u64 = arg("--rate", "20").parse().unwrap();
    let seconds: u64 = arg("--seconds", "10").parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let relay = Relay::start(&[]);
    let pid = relay.pid();
    let port = relay.port;
    rt.block_on(async move {
        let c = reqwest::Client::new();
        let url = format!("http://127.0.0.1:{port}/fanout");
        let mut doc = AutoCommit::new();
        let list = doc.put_object(ROOT, "items", ObjType::List).unwrap();
        doc.insert(&list, 0, "base").unwrap();
        doc.commit();
        c.post(&url).body(doc.save()).send().await.unwrap();

        let rss_before = rss_kib(pid);
        // Receipts are recorded raw and parsed after the run, so the load generator's own
        // parsing does not compete with the server for the two cores during the measurement.
        let received: Arc<Mutex<Vec<(Bytes, Instant)>>> = Arc::default();
        let mut readers = Vec::new();
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(subscribers);
        for _ in 0..subscribers {
            let (mut ws, _) = tokio_tungstenite::connect_async_with_config(
                format!("ws://127.0.0.1:{port}/fanout"),
                Some(ws_config()),
                false,
            )
            .await
            .expect("connect");
            let received = received.clone();
            let ready = ready_tx.clone();
            readers.push(tokio::spawn(async move {
                let mut first = true;
                while let Some(Ok(msg)) = ws.next().await {
                    if let Message::Binary(bytes) = msg {
                        let now = Instant::now();
                        if first {
                            first = false;
                            let _ = ready.send(()).await;
                            continue;
                        }
                        received.lock().unwrap().push((bytes, now));
                    }
                }
            }));
        }
        for _ in 0..subscribers {
            ready_rx.recv().await.unwrap();
        }
        let rss_idle = rss_kib(pid);
        println!(
            "{subscribers} idle subscribers: server RSS {} KiB -> {} KiB, {:.1} KiB per subscriber",
            rss_before,
            rss_idle,
            (rss_idle.saturating_sub(rss_before)) as f64 / subscribers as f64
        );

        let mut acked: HashMap<ChangeHash, Instant> = HashMap::new();
        let writes = rate * seconds;
        let mut tick = tokio::time::interval(Duration::from_millis(1000 / rate));
        let mut peak_rss = rss_idle;
        let (server0, client0) = (cpu_secs(pid), cpu_secs(std::process::id()));
        for i in 0..writes {
            tick.tick().await;
            let heads = doc.get_heads();
            let len = automerge::ReadDoc::length(&doc, &list);
            doc.insert(&list, len, format!("write {i}")).unwrap();
            doc.commit();
            let hash = doc.get_last_local_change().unwrap().hash();
            let r = c
                .post(&url)
                .body(doc.save_after(&heads))
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success());
            acked.insert(hash, Instant::now());
            peak_rss = peak_rss.max(rss_kib(pid));
        }
        let (server1, client1) = (cpu_secs(pid), cpu_secs(std::process::id()));
        // Wait (bounded) for every subscriber to receive every write.
        let expected = writes as usize * subscribers;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut got: Vec<(ChangeHash, Instant)> = Vec::with_capacity(expected);
        loop {
            let raw = std::mem::take(&mut *received.lock().unwrap());
            for (bytes, at) in raw {
                got.extend(hashes(&bytes).into_iter().map(|h| (h, at)));
            }
            if got.len() >= expected || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut lat: Vec<f64> = got
            .iter()
            .filter_map(|(h, at)| {
                acked.get(h).map(|ack| {
                    if at >= ack {
                        at.duration_since(*ack).as_secs_f64() * 1000.0
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        lat.sort_by(|a, b| a.total_cmp(b));
        println!(
            "{writes} writes x {subscribers} subscribers: {} of {expected} deliveries",
            got.len()
        );
        println!(
            "ack -> subscriber latency: p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
            pct(&lat, 0.5),
            pct(&lat, 0.99),
            pct(&lat, 1.0)
        );
        println!("server RSS peak during the run: {peak_rss} KiB");
        println!(
            "CPU per write: relay {:.2} ms, load generator {:.2} ms",
            (server1 - server0) * 1000.0 / writes as f64,
            (client1 - client0) * 1000.0 / writes as f64
        );
        for r in readers {
            r.abort();
        }
    });
}
