//! Soak (issue: bounded memory and hardening). Not run in CI; run it with `scripts/soak`
//! (10 minutes) or `cargo bench --bench soak -- --minutes 2`.
//!
//! Against the release binary, for `--minutes`: `--subscribers` per-document WebSocket
//! subscribers (each keeps a mirror of its document from the pushed bytes), `--writers`
//! writers (even ones POST over HTTP, odd ones upload over the per-document WebSocket and wait
//! for the ack) and `--repo-peers` automerge-repo protocol peers that sync and edit, spread
//! over `--docs` documents. Writers and peers overwrite their own map key, so the documents'
//! visible state stays small while their history grows with every change. The default rates
//! (one change per writer and per peer every 2 s: 12 changes/s, 1,500 deliveries/s) keep that
//! legitimate growth to about a megabyte, so the 10% RSS check below measures leaks; at four
//! times the rate the documents' history alone outgrows it (measured: +5.6 MiB of estimated
//! document memory in 10 minutes, RSS +6.0 MiB).
//!
//! The warm-up is 4 minutes by default: the store's page cache fills with written data up to
//! its cap (8 MiB here) and the allocator settles in that time (measured: RSS rose from 27.6 to
//! 31.9 MiB over minutes 1-4, then stayed between 31.5 and 33.1 MiB to the end).
//!
//! Then it stops the load and checks that every subscriber's mirror and every repo peer
//! reached the server's heads, and compares the relay's RSS after the run with its RSS after
//! the warm-up (`--warmup-secs` of full load): the check is that it grew by at most 10%.
//! The relay's own estimate of its documents' memory (`hot_bytes` in `/_/stats`) is printed
//! beside it, to tell history growth from a leak. Exits 1 when a check fails.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use automerge::sync::{self, SyncDoc};
use automerge::transaction::Transactable;
use automerge::{AutoCommit, Automerge, ChangeHash, ROOT};
use automerge_relay::PeerSync;
use automerge_relay::{PeerMetadata, RepoMessage};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

mod support;
use support::{arg, rss_kib, stats, ws_config, Relay};

struct Settings {
    minutes: f64,
    subscribers: usize,
    writers: usize,
    repo_peers: usize,
    docs: usize,
    write_every: Duration,
    peer_every: Duration,
    warmup: Duration,
}

/// What the load did, and where each client's copy stands.
#[derive(Default)]
struct Progress {
    writes: AtomicU64,
    deliveries: AtomicU64,
    peer_edits: AtomicU64,
    errors: AtomicU64,
    /// Heads of each subscriber's mirror, by subscriber.
    mirrors: Mutex<Vec<(usize, Vec<ChangeHash>)>>,
    /// Heads of each repo peer's copy, by peer.
    peers: Mutex<Vec<(usize, Vec<ChangeHash>)>>,
    typing: AtomicBool,
}

/// How many clients' heads differ from their document's (client `n` follows document
/// `n % documents`).
fn behind(clients: &Mutex<Vec<(usize, Vec<ChangeHash>)>>, expected: &[Vec<ChangeHash>]) -> usize {
    clients
        .lock()
        .unwrap()
        .iter()
        .enumerate()
        .filter(|(n, (_, h))| *h != expected[n % expected.len()])
        .count()
}

impl Progress {
    fn error(&self, what: String) {
        if self.errors.fetch_add(1, Ordering::Relaxed) < 10 {
            eprintln!("  error: {what}");
        }
    }
}

fn doc_id(i: usize) -> String {
    // A real automerge-repo id (bs58check of 16 bytes), so repo peers can use it.
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    bytes[8..].copy_from_slice(b"soak-doc");
    bs58::encode(bytes).with_check().into_string()
}

async fn server_heads(c: &reqwest::Client, base: &str, id: &str) -> Option<Vec<ChangeHash>> {
    let r = c.get(format!("{base}/{id}")).send().await.ok()?;
    let bytes = r.bytes().await.ok()?;
    Automerge::load(&bytes).ok().map(|d| d.get_heads())
}

async fn subscriber(n: usize, url: String, progress: Arc<Progress>) {
    let Ok((mut ws, _)) =
        tokio_tungstenite::connect_async_with_config(url, Some(ws_config()), false).await
    else {
        progress.error(format!("subscriber {n}: connect failed"));
        return;
    };
    let mut mirror = Automerge::new();
    while let Some(msg) = ws.next().await {
        match msg {
            Ok(Message::Binary(bytes)) => {
                if let Err(e) = mirror.load_incremental(&bytes) {
                    progress.error(format!("subscriber {n}: pushed bytes do not load: {e}"));
                }
                progress.deliveries.fetch_add(1, Ordering::Relaxed);
                progress.mirrors.lock().unwrap()[n] = (n, mirror.get_heads());
            }
            Ok(Message::Close(frame)) => {
                progress.error(format!("subscriber {n}: closed by the server: {frame:?}"));
                return;
            }
            Ok(_) => {}
            Err(e) => {
                progress.error(format!("subscriber {n}: {e}"));
                return;
            }
        }
    }
}

/// One writer's document: each call makes one change to its own key and returns it.
struct Edits {
    key: String,
    doc: AutoCommit,
    count: i64,
}

impl Edits {
    fn next(&mut self) -> Vec<u8> {
        let heads = self.doc.get_heads();
        self.doc.put(ROOT, self.key.as_str(), self.count).unwrap();
        self.doc.commit();
        self.count += 1;
        self.doc.save_after(&heads)
    }
}

async fn http_writer(
    w: usize,
    c: reqwest::Client,
    url: String,
    mut edits: Edits,
    s: Arc<Settings>,
    p: Arc<Progress>,
) {
    let mut tick = tokio::time::interval(s.write_every);
    while p.typing.load(Ordering::Relaxed) {
        tick.tick().await;
        match c.post(&url).body(edits.next()).send().await {
            Ok(r) if r.status().is_success() => {
                p.writes.fetch_add(1, Ordering::Relaxed);
            }
            Ok(r) => p.error(format!("writer {w}: status {}", r.status())),
            Err(e) => p.error(format!("writer {w}: {e}")),
        }
    }
}

async fn ws_writer(w: usize, url: String, mut edits: Edits, s: Arc<Settings>, p: Arc<Progress>) {
    let Ok((mut ws, _)) =
        tokio_tungstenite::connect_async_with_config(url, Some(ws_config()), false).await
    else {
        p.error(format!("ws writer {w}: connect failed"));
        return;
    };
    let mut tick = tokio::time::interval(s.write_every);
    while p.typing.load(Ordering::Relaxed) {
        tick.tick().await;
        if ws.send(Message::binary(edits.next())).await.is_err() {
            p.error(format!("ws writer {w}: send failed"));
            return;
        }
        // Skip the other writers' pushed changes until our ack arrives.
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) if t.contains("\"ack\"") => {
                    p.writes.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Some(Ok(Message::Text(t))) => {
                    p.error(format!("ws writer {w}: {t}"));
                    break;
                }
                Some(Ok(_)) => {}
                _ => {
                    p.error(format!("ws writer {w}: socket ended"));
                    return;
                }
            }
        }
    }
}

/// An automerge-repo protocol peer: join, then the sync exchange for one document, editing
/// its own key every `peer_every` while the load runs, and answering every message at once.
async fn repo_peer(n: usize, url: String, document_id: String, s: Arc<Settings>, p: Arc<Progress>) {
    let Ok((ws, _)) =
        tokio_tungstenite::connect_async_with_config(url, Some(ws_config()), false).await
    else {
        p.error(format!("repo peer {n}: connect failed"));
        return;
    };
    let (mut tx, mut rx) = ws.split();
    let me = format!("soak-peer-{n}");
    let join = RepoMessage::Join {
        sender_id: me.clone(),
        peer_metadata: Some(PeerMetadata {
            storage_id: None,
            is_ephemeral: true,
        }),
        supported_protocol_versions: Some(vec!["1".into()]),
    };
    if tx.send(Message::binary(join.encode())).await.is_err() {
        p.error(format!("repo peer {n}: join failed"));
        return;
    }
    let mut server: Option<String> = None;
    let mut doc = Automerge::new();
    let mut sync = PeerSync::default();
    let mut tick = tokio::time::interval(s.peer_every);
    let mut i = 0u64;
    loop {
        let mut send_now = false;
        tokio::select! {
            frame = rx.next() => {
                let bytes = match frame {
                    Some(Ok(Message::Binary(b))) => b,
                    Some(Ok(_)) => continue,
                    _ => {
                        p.error(format!("repo peer {n}: socket ended"));
                        return;
                    }
                };
                match RepoMessage::decode(&bytes) {
                    Ok(RepoMessage::Peer { sender_id, .. }) => {
                        server = Some(sender_id);
                        send_now = true;
                    }
                    Ok(RepoMessage::Sync { data, .. }) => {
                        let Ok(message) = sync::Message::decode(&data) else {
                            p.error(format!("repo peer {n}: bad sync message"));
                            continue;
                        };
                        if let Err(e) = sync.merge_and_receive(&mut doc, message) {
                            p.error(format!("repo peer {n}: {e}"));
                        }
                        p.peers.lock().unwrap()[n] = (n, doc.get_heads());
                        send_now = true;
                    }
                    Ok(other) => p.error(format!("repo peer {n}: unexpected {other:?}")),
                    Err(e) => p.error(format!("repo peer {n}: {e}")),
                }
            }
            _ = tick.tick() => {
                // Edit only once the document arrived (its root map is shared then).
                if p.typing.load(Ordering::Relaxed) && !doc.get_heads().is_empty() {
                    let mut tx = doc.transaction();
                    tx.put(ROOT, format!("peer-{n}"), i as i64).unwrap();
                    tx.commit();
                    i += 1;
                    p.peer_edits.fetch_add(1, Ordering::Relaxed);
                    send_now = true;
                }
            }
        }
        let Some(target) = server.clone().filter(|_| send_now) else {
            continue;
        };
        if let Some(msg) = doc.generate_sync_message(&mut sync.state) {
            let frame = RepoMessage::Sync {
                sender_id: me.clone(),
                target_id: target,
                document_id: document_id.clone(),
                data: msg.encode(),
            };
            if tx.send(Message::binary(frame.encode())).await.is_err() {
                p.error(format!("repo peer {n}: send failed"));
                return;
            }
        }
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let s = Arc::new(Settings {
        minutes: arg("--minutes", "10").parse().expect("--minutes"),
        subscribers: arg("--subscribers", "1000").parse().expect("--subscribers"),
        writers: arg("--writers", "16").parse().expect("--writers"),
        repo_peers: arg("--repo-peers", "8").parse().expect("--repo-peers"),
        docs: arg("--docs", "8").parse().expect("--docs"),
        write_every: Duration::from_millis(arg("--write-ms", "2000").parse().expect("--write-ms")),
        peer_every: Duration::from_millis(arg("--peer-ms", "2000").parse().expect("--peer-ms")),
        warmup: Duration::from_secs(arg("--warmup-secs", "240").parse().expect("--warmup-secs")),
    });
    // The store's page cache fills with written data up to its cap; a small cap lets the
    // warm-up reach it, so growth after the warm-up is not the cache filling.
    let cache = arg("--store-cache", "8MiB");
    let relay = Relay::start(&["--store-cache", &cache]);
    let pid = relay.pid();
    let base = relay.url("");
    let ws_base = format!("ws://127.0.0.1:{}", relay.port);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let progress = Arc::new(Progress {
        mirrors: Mutex::new(vec![(0, Vec::new()); s.subscribers]),
        peers: Mutex::new(vec![(0, Vec::new()); s.repo_peers]),
        typing: AtomicBool::new(true),
        ..Default::default()
    });
    let ids: Vec<String> = (0..s.docs).map(doc_id).collect();
    println!(
        "soak: {} subscribers, {} writers, {} repo peers on {} documents for {} min (warm-up {} s, store cache {cache})",
        s.subscribers,
        s.writers,
        s.repo_peers,
        s.docs,
        s.minutes,
        s.warmup.as_secs()
    );
    let ok = rt.block_on(async {
        let c = reqwest::Client::new();
        let mut bases = Vec::new();
        for id in &ids {
            let mut doc = AutoCommit::new();
            doc.put(ROOT, "created", true).unwrap();
            doc.commit();
            let r = c.post(format!("{base}/{id}")).body(doc.save()).send().await;
            assert!(r.is_ok_and(|r| r.status().is_success()), "create {id}");
            bases.push(doc);
        }
        let mut tasks = Vec::new();
        for n in 0..s.subscribers {
            let url = format!("{ws_base}/{}", ids[n % s.docs]);
            tasks.push(tokio::spawn(subscriber(n, url, progress.clone())));
        }
        for w in 0..s.writers {
            let d = w % s.docs;
            let edits = Edits {
                key: format!("writer-{w}"),
                doc: bases[d].fork(),
                count: 0,
            };
            let url = format!("{base}/{}", ids[d]);
            let (st, p) = (s.clone(), progress.clone());
            tasks.push(if w % 2 == 0 {
                tokio::spawn(http_writer(w, c.clone(), url, edits, st, p))
            } else {
                let url = format!("{ws_base}/{}", ids[d]);
                tokio::spawn(ws_writer(w, url, edits, st, p))
            });
        }
        for n in 0..s.repo_peers {
            let id = ids[n % s.docs].clone();
            let (st, p) = (s.clone(), progress.clone());
            tasks.push(tokio::spawn(repo_peer(n, format!("{ws_base}/"), id, st, p)));
        }

        let start = Instant::now();
        let total = Duration::from_secs_f64(s.minutes * 60.0);
        let mut warm: Option<(u64, u64)> = None;
        let mut report = tokio::time::interval(Duration::from_secs(30));
        while start.elapsed() < total {
            report.tick().await;
            let st = stats(&c, relay.port).await;
            let rss = rss_kib(pid);
            let hot = st["hot_bytes"].as_u64().unwrap_or(0);
            if warm.is_none() && start.elapsed() >= s.warmup {
                warm = Some((rss, hot));
            }
            println!(
                "  {:>5.0} s  RSS {rss} KiB  documents ~{} KiB  writes {}  peer edits {}  deliveries {}  errors {}",
                start.elapsed().as_secs_f64(),
                hot / 1024,
                progress.writes.load(Ordering::Relaxed),
                progress.peer_edits.load(Ordering::Relaxed),
                progress.deliveries.load(Ordering::Relaxed),
                progress.errors.load(Ordering::Relaxed),
            );
        }
        progress.typing.store(false, Ordering::Relaxed);
        let rss_stop = rss_kib(pid);

        // Every subscriber and repo peer must reach the server's heads.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut expected = Vec::new();
        let (mut behind_subs, mut behind_peers) = (usize::MAX, usize::MAX);
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(500)).await;
            expected.clear();
            for id in &ids {
                expected.push(server_heads(&c, &base, id).await.unwrap_or_default());
            }
            behind_subs = behind(&progress.mirrors, &expected);
            behind_peers = behind(&progress.peers, &expected);
            if behind_subs == 0 && behind_peers == 0 {
                break;
            }
        }
        let rss_converged = rss_kib(pid);
        // Let the relay settle (its allocator trim runs every 10 s) before the final reading.
        tokio::time::sleep(automerge_relay::TRIM_EVERY + Duration::from_secs(5)).await;
        let st = stats(&c, relay.port).await;
        let (rss_end, hot_end) = (rss_kib(pid), st["hot_bytes"].as_u64().unwrap_or(0));
        println!("RSS when the load stopped {rss_stop} KiB, once converged {rss_converged} KiB");
        let (rss_warm, hot_warm) = warm.unwrap_or((rss_end, hot_end));
        let growth = rss_end as f64 / rss_warm.max(1) as f64 - 1.0;
        println!(
            "writes acknowledged: {}, repo peer edits: {}, deliveries: {}, errors: {}",
            progress.writes.load(Ordering::Relaxed),
            progress.peer_edits.load(Ordering::Relaxed),
            progress.deliveries.load(Ordering::Relaxed),
            progress.errors.load(Ordering::Relaxed)
        );
        println!(
            "converged: {} of {} subscribers, {} of {} repo peers",
            s.subscribers - behind_subs.min(s.subscribers),
            s.subscribers,
            s.repo_peers - behind_peers.min(s.repo_peers),
            s.repo_peers
        );
        println!(
            "RSS after warm-up {rss_warm} KiB, after the run {rss_end} KiB: {:+.1}% (limit +10%); \
             documents' estimate {} KiB -> {} KiB",
            growth * 100.0,
            hot_warm / 1024,
            hot_end / 1024
        );
        for t in tasks {
            t.abort();
        }
        behind_subs == 0
            && behind_peers == 0
            && growth <= 0.10
            && progress.errors.load(Ordering::Relaxed) == 0
    });
    println!("soak: {}", if ok { "PASS" } else { "FAIL" });
    drop(relay);
    if !ok {
        std::process::exit(1);
    }
}
