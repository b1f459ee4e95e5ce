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

async fn ws(relay: &Relay, path: &str) -> Result<WsStream, u16> {
    match tokio_tungstenite::connect_async(relay.ws_url(path)).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("unexpected websocket error: {e}"),
    }
}

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

#[tokio::test]
async fn connection_limits_refuse_with_503_and_free_slots_on_close() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_with(
        dir.path(),
        &["--max-connections", "3", "--max-doc-connections", "2"],
    );
    let a = ws(&relay, "/busy").await.unwrap();
    let _b = ws(&relay, "/busy").await.unwrap();
    assert_eq!(
        ws(&relay, "/busy").await.err(),
        Some(503),
        "per-document limit"
    );
    let _c = ws(&relay, "/other").await.unwrap();
    assert_eq!(ws(&relay, "/third").await.err(), Some(503), "server limit");
    let r = reqwest::Client::new()
        .get(relay.url("/third"))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503, "SSE counts too");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "too_many_connections");

    // Closing one frees its slot.
    drop(a);
    wait_for("a free slot", Duration::from_secs(10), || {
        let relay = &relay;
        async move { ws(relay, "/busy").await.ok() }
    })
    .await;
}

#[tokio::test]
async fn a_socket_over_its_message_rate_is_closed_with_1008() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_with(dir.path(), &["--max-messages-per-sec", "5"]);
    let c = reqwest::Client::new();
    let doc = base_doc();
    c.post(relay.url("/chatty"))
        .body(doc.clone().save())
        .send()
        .await
        .unwrap();
    let before = c
        .get(relay.url("/chatty"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let mut socket = ws(&relay, "/chatty").await.unwrap();
    for _ in 0..50 {
        if socket
            .send(Message::Binary(b"junk".to_vec().into()))
            .await
            .is_err()
        {
            break;
        }
    }
    let code = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(msg) = socket.next().await {
            if let Ok(Message::Close(Some(frame))) = msg {
                return u16::from(frame.code);
            }
        }
        0
    })
    .await
    .expect("never closed");
    assert_eq!(code, 1008);
    let after = c
        .get(relay.url("/chatty"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(before, after);
}

#[tokio::test]
async fn a_write_past_the_document_size_limit_gets_413_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // Uploads may decode to more than the document may grow to (the default limit is the
    // document size): this checks the stored size.
    let relay = Relay::start_with(
        dir.path(),
        &["--max-doc-size", "8KiB", "--max-decoded-upload", "1MiB"],
    );
    let c = reqwest::Client::new();
    let url = relay.url("/bounded");
    let mut doc = base_doc();
    let r = c.post(&url).body(doc.save()).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let before = c.get(&url).send().await.unwrap().bytes().await.unwrap();
    let heads = doc.get_heads();
    // 16 KiB of text that does not compress.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let big: String = (0..16 * 1024)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            char::from(b'a' + (seed % 26) as u8)
        })
        .collect();
    add_item(&mut doc, &big);
    for body in [doc.save_after(&heads), doc.save()] {
        let r = c.post(&url).body(body).send().await.unwrap();
        assert_eq!(r.status(), 413);
        let json: serde_json::Value = r.json().await.unwrap();
        assert_eq!(json["error"], "document_too_large");
    }
    let after = c.get(&url).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(before, after, "the refused write changed the document");
    // Small writes still go through.
    let mut small = AutoCommit::load(&before).unwrap();
    let heads = small.get_heads();
    add_item(&mut small, "small");
    let r = c
        .post(&url)
        .body(small.save_after(&heads))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn prometheus_metrics_cover_batches_storage_and_rejections() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path());
    let c = reqwest::Client::new();
    let doc = base_doc();
    c.post(relay.url("/metered"))
        .body(doc.clone().save())
        .send()
        .await
        .unwrap();
    let r = c
        .post(relay.url("/metered"))
        .body("junk")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = c.get(relay.url("/_/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    for needle in [
        "relay_batch_writes_bucket",
        "relay_apply_seconds_bucket",
        "relay_persist_seconds_bucket",
        "relay_rejected_total{reason=\"invalid_automerge\"} 1",
        "relay_documents_hot 1",
        "relay_connections 0",
        "relay_subscribers 0",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    // The write took at least one owner turn (the junk was refused before the owner).
    let turns: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("relay_owner_turns_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no relay_owner_turns_total in:\n{text}"));
    assert!(turns >= 1, "{turns}");
}

#[tokio::test]
async fn an_inflation_bomb_is_refused_before_it_is_loaded_or_stored() {
    use automerge::transaction::Transactable;
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_with(dir.path(), &["--max-decoded-upload", "8MiB"]);
    // A small save of 32 MiB of zeros.
    let mut doc = AutoCommit::new();
    doc.put(automerge::ROOT, "zeros", "\0".repeat(32 << 20))
        .unwrap();
    let bomb = doc.save();
    assert!(bomb.len() < 1 << 20, "{} bytes on the wire", bomb.len());
    let before = rss_kib(relay.child.id());
    let c = reqwest::Client::new();
    let sends = (0..8).map(|i| {
        let (c, url, body) = (c.clone(), relay.url(&format!("/bomb-{i}")), bomb.clone());
        async move { c.post(url).body(body).send().await.unwrap() }
    });
    for r in futures_util::future::join_all(sends).await {
        assert_eq!(r.status(), 413);
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"], "too_large", "{body}");
    }
    let after = rss_kib(relay.child.id());
    // Eight loads would have taken several hundred MiB; counting inflated bytes takes none.
    assert!(
        after < before + 64 * 1024,
        "RSS grew from {before} KiB to {after} KiB"
    );
    for i in 0..8 {
        let r = c
            .get(relay.url(&format!("/bomb-{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "nothing stored");
    }
}

#[test]
fn a_client_still_sending_an_oversize_body_reads_the_413() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_with(dir.path(), &["--max-body", "1MiB"]);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", relay.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let len = 8usize << 20;
    write!(
        s,
        "POST /big HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\n\r\n"
    )
    .unwrap();
    // Like Node's fetch: the whole body goes out before the response is read. Every write
    // must succeed (the server reads it all, then answers).
    let chunk = vec![0u8; 64 << 10];
    for _ in 0..len / chunk.len() {
        s.write_all(&chunk)
            .expect("the server keeps reading the body");
    }
    let mut response = Vec::new();
    let _ = s.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("too_large"), "{text}");
}

#[test]
fn stalled_connections_time_out_and_health_answers_throughout() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_with(
        dir.path(),
        &["--max-connections", "40", "--header-timeout-secs", "2"],
    );
    let health = || {
        let (status, body) = raw_request(relay.port, "GET /_/health HTTP/1.1");
        assert_eq!(status, 200, "{body}");
    };
    // Slowloris: 100 connections, each with half a request's headers, then nothing.
    let mut stalled: Vec<std::net::TcpStream> = (0..100)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", relay.port)).unwrap();
            let _ = s.write_all(b"GET /_/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ");
            s
        })
        .collect();
    // An idle keep-alive connection after one full request.
    let mut idle = std::net::TcpStream::connect(("127.0.0.1", relay.port)).unwrap();
    idle.write_all(b"GET /_/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    health();
    // Past the limit, a new connection takes the place of a stalled one.
    let (status, _) = raw_request(relay.port, "GET /anything HTTP/1.1");
    assert_eq!(status, 404);
    // Every stalled and idle connection is closed by the server after the header timeout.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    stalled.push(idle);
    for s in &mut stalled {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        let mut buf = Vec::new();
        // Ends with EOF (or a reset) once the server closes; a timeout means it never did.
        match s.read_to_end(&mut buf) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("a stalled connection was not closed: {e}"),
        }
    }
    // With the stalled ones gone, ordinary requests are served again.
    let (status, _) = raw_request(relay.port, "GET /anything HTTP/1.1");
    assert_eq!(status, 404);
    health();
}

#[test]
fn when_every_connection_is_busy_health_still_answers_from_the_reserve() {
    use std::io::{BufRead, BufReader, Write};
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_with(dir.path(), &["--max-connections", "20"]);
    // Twenty event streams: each is a request in progress, none can be shed.
    let streams: Vec<_> = (0..20)
        .map(|i| {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", relay.port)).unwrap();
            write!(
                s,
                "GET /busy-{i} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"
            )
            .unwrap();
            let mut r = BufReader::new(s);
            let mut status = String::new();
            r.read_line(&mut status).unwrap();
            assert!(status.starts_with("HTTP/1.1 200"), "{status}");
            r
        })
        .collect();
    let (status, body) = raw_request(relay.port, "GET /_/health HTTP/1.1");
    assert_eq!(status, 200, "{body}");
    let (status, body) = raw_request(relay.port, "GET /anything HTTP/1.1");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("too_many_connections"), "{body}");
    drop(streams);
}

/// VmRSS of a process, in bytes.
#[cfg(target_os = "linux")]
fn rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// A document that does not compress is estimated from what its snapshot decodes to, not from
/// a factor meant for compressed saves (which put it at 26 times its memory): once it is loaded
/// from a snapshot, `hot_bytes` and the RSS growth are within twice each other.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn an_incompressible_document_is_estimated_near_its_memory() {
    use automerge::transaction::Transactable;
    let dir = tempfile::tempdir().unwrap();
    let mut relay = Relay::start_with(
        dir.path(),
        &["--memory-budget", "8GiB", "--max-body", "64MiB"],
    );
    let c = reqwest::Client::new();
    let url = relay.url("/random");
    // 8 MiB of random printable characters (xorshift): 8,192 strings of 1 KiB.
    let mut doc = AutoCommit::new();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for batch in 0..32 {
        for k in 0..256 {
            let s: String = (0..1024)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    char::from(33 + (x % 94) as u8)
                })
                .collect();
            doc.put(automerge::ROOT, format!("k{batch}-{k}"), s)
                .unwrap();
        }
        doc.commit();
    }
    let r = c.post(&url).body(doc.save()).send().await.unwrap();
    assert_eq!(r.status(), 201);
    // Enough small writes after it that the owner compacts into one snapshot.
    for i in 0..40 {
        let heads = doc.get_heads();
        doc.put(automerge::ROOT, format!("tail{i}"), i as i64)
            .unwrap();
        doc.commit();
        let r = c
            .post(&url)
            .body(doc.save_after(&heads))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    wait_for("a compaction", Duration::from_secs(60), || {
        let (c, relay) = (&c, &relay);
        async move { (stats(c, relay).await["compactions"].as_u64() > Some(0)).then_some(()) }
    })
    .await;

    // Loaded from the store by a fresh process.
    relay.terminate();
    relay.restart();
    let c = reqwest::Client::new();
    let pid = relay.child.id();
    let before = stats(&c, &relay).await;
    assert_eq!(before["hot_bytes"], 0, "{before}");
    let baseline = rss_of(pid);
    let r = c.get(relay.url("/random")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await.unwrap();
    let hot = stats(&c, &relay).await["hot_bytes"].as_u64().unwrap();
    // The load's scratch memory (right after the GET the growth is ~1.8 times the estimate)
    // goes back to the kernel at the next trim, every 10 s: wait for the growth to settle
    // under 1.5 times the estimate, then check it is not under half of it either.
    let growth = wait_for(
        "the RSS growth under 1.5 times the estimate",
        Duration::from_secs(60),
        || {
            let growth = rss_of(pid).saturating_sub(baseline);
            let settled = 2 * growth <= 3 * hot;
            async move { settled.then_some(growth) }
        },
    )
    .await;
    println!("estimate {hot} bytes, RSS growth {growth} bytes (from {baseline})");
    assert!(
        hot <= 2 * growth,
        "estimate {hot} bytes, RSS grew by {growth} bytes (from {baseline})"
    );
}
