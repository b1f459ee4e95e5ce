//! Live push: per-document WebSocket and SSE, against the real binary over real sockets.

mod common;

use std::time::Duration;

use automerge::{AutoCommit, Change, ChangeHash};
use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{connect_async, MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const DEADLINE: Duration = Duration::from_secs(20);

async fn connect(url: &str) -> Ws {
    connect_async(url).await.expect("websocket connect").0
}

/// Next message that is not a ping/pong, within the deadline.
async fn next_msg(ws: &mut Ws) -> Message {
    loop {
        let msg = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("timed out waiting for a message")
            .expect("socket ended")
            .expect("socket error");
        if !matches!(msg, Message::Ping(_) | Message::Pong(_)) {
            return msg;
        }
    }
}

async fn next_json(ws: &mut Ws) -> serde_json::Value {
    match next_msg(ws).await {
        Message::Text(t) => serde_json::from_str(&t).expect("json"),
        other => panic!("expected a text message, got {other:?}"),
    }
}

/// Change hashes carried by a pushed message (a concatenation of change chunks).
fn hashes_in(bytes: &[u8]) -> Vec<ChangeHash> {
    automerge_relay::split_chunks(bytes)
        .unwrap()
        .into_iter()
        .map(|(_, chunk)| Change::try_from(chunk).unwrap().hash())
        .collect()
}

async fn post(url: &str, body: Vec<u8>) -> serde_json::Value {
    let r = reqwest::Client::new()
        .post(url)
        .body(body)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    r.json().await.unwrap()
}

async fn server_heads(url: &str) -> Vec<String> {
    let bytes = reqwest::get(url).await.unwrap().bytes().await.unwrap();
    heads_hex(&mut AutoCommit::load(&bytes).unwrap())
}

async fn stats(relay: &Relay) -> serde_json::Value {
    reqwest::get(relay.url("/_/stats"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn subscriber_gets_document_then_every_change_but_not_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path());
    let url = relay.url("/live");
    let mut doc = base_doc();
    post(&url, doc.save()).await;

    let mut a = connect(&relay.ws_url("/live")).await;
    let mut b = connect(&relay.ws_url("/live")).await;
    let mut mirror_a = AutoCommit::new();
    let mut mirror_b = AutoCommit::new();
    for (ws, mirror) in [(&mut a, &mut mirror_a), (&mut b, &mut mirror_b)] {
        match next_msg(ws).await {
            Message::Binary(bytes) => {
                mirror.load_incremental(&bytes).unwrap();
            }
            other => panic!("expected the document, got {other:?}"),
        }
        assert_eq!(items(mirror), vec!["base"]);
    }

    // A change over HTTP reaches both.
    let heads = doc.get_heads();
    add_item(&mut doc, "from http");
    post(&url, doc.save_after(&heads)).await;
    for (ws, mirror) in [(&mut a, &mut mirror_a), (&mut b, &mut mirror_b)] {
        let Message::Binary(bytes) = next_msg(ws).await else {
            panic!("expected changes")
        };
        mirror.load_incremental(&bytes).unwrap();
        assert_eq!(items(mirror), vec!["base", "from http"]);
    }

    // A writes over its socket: acked, pushed to B, not echoed to A.
    let heads = mirror_a.get_heads();
    add_item(&mut mirror_a, "from a");
    let a_change = mirror_a.get_last_local_change().unwrap().hash();
    a.send(Message::Binary(mirror_a.save_after(&heads).into()))
        .await
        .unwrap();
    let ack = next_json(&mut a).await;
    assert_eq!(ack["type"], "ack");
    assert_eq!(ack["applied"], 1);
    assert_eq!(json_heads(&ack), heads_hex(&mut mirror_a));
    let Message::Binary(bytes) = next_msg(&mut b).await else {
        panic!("expected changes")
    };
    assert_eq!(hashes_in(&bytes), vec![a_change]);
    mirror_b.load_incremental(&bytes).unwrap();

    // The next thing A sees is someone else's change, not its own.
    let mut other =
        AutoCommit::load(&reqwest::get(&url).await.unwrap().bytes().await.unwrap()).unwrap();
    let heads = other.get_heads();
    add_item(&mut other, "from someone else");
    let other_change = other.get_last_local_change().unwrap().hash();
    post(&url, other.save_after(&heads)).await;
    let Message::Binary(bytes) = next_msg(&mut a).await else {
        panic!("expected changes")
    };
    assert_eq!(hashes_in(&bytes), vec![other_change]);
    mirror_a.load_incremental(&bytes).unwrap();
    let Message::Binary(bytes) = next_msg(&mut b).await else {
        panic!("expected changes")
    };
    mirror_b.load_incremental(&bytes).unwrap();

    let server = server_heads(&url).await;
    assert_eq!(heads_hex(&mut mirror_a), server);
    assert_eq!(heads_hex(&mut mirror_b), server);
}

#[tokio::test]
async fn garbage_gets_an_error_and_the_socket_stays_usable() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path());
    let url = relay.url("/ws-bad");
    let mut doc = base_doc();
    post(&url, doc.save()).await;
    let before = reqwest::get(&url).await.unwrap().bytes().await.unwrap();

    let mut ws = connect(&relay.ws_url("/ws-bad")).await;
    let _initial = next_msg(&mut ws).await;
    ws.send(Message::Binary(b"not automerge at all".to_vec().into()))
        .await
        .unwrap();
    let err = next_json(&mut ws).await;
    assert_eq!(err["type"], "error");
    assert_eq!(err["error"], "invalid_automerge");
    ws.send(Message::Text("hello".into())).await.unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "error");
    let after = reqwest::get(&url).await.unwrap().bytes().await.unwrap();
    assert_eq!(before, after, "garbage changed the document");

    // Still usable.
    let heads = doc.get_heads();
    add_item(&mut doc, "after garbage");
    ws.send(Message::Binary(doc.save_after(&heads).into()))
        .await
        .unwrap();
    let ack = next_json(&mut ws).await;
    assert_eq!(ack["type"], "ack");
    assert_eq!(json_heads(&ack), heads_hex(&mut doc));
}

#[tokio::test]
async fn oversize_message_closes_with_1009_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_with(dir.path(), &["--max-body", "8KiB"]);
    let url = relay.url("/ws-big");
    let doc = base_doc();
    post(&url, doc.clone().save()).await;
    let before = reqwest::get(&url).await.unwrap().bytes().await.unwrap();
    let mut ws = connect(&relay.ws_url("/ws-big")).await;
    let _initial = next_msg(&mut ws).await;
    let _ = ws.send(Message::Binary(vec![7u8; 64 * 1024].into())).await;
    let code = loop {
        match tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("no close")
        {
            Some(Ok(Message::Close(Some(frame)))) => break u16::from(frame.code),
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(code, 1009);
    let after = reqwest::get(&url).await.unwrap().bytes().await.unwrap();
    assert_eq!(before, after);
}

#[tokio::test]
async fn subscribing_before_the_document_exists_and_deletion() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path());
    let url = relay.url("/later");
    let mut ws = connect(&relay.ws_url("/later")).await;
    // Nothing is sent for a missing document; the first upload arrives as changes.
    let mut doc = base_doc();
    post(&url, doc.save()).await;
    let Message::Binary(bytes) = next_msg(&mut ws).await else {
        panic!("expected changes")
    };
    let mut mirror = AutoCommit::new();
    mirror.load_incremental(&bytes).unwrap();
    assert_eq!(heads_hex(&mut mirror), heads_hex(&mut doc));

    let r = reqwest::Client::new().delete(&url).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(next_json(&mut ws).await["type"], "deleted");
    match next_msg(&mut ws).await {
        Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 4404),
        other => panic!("expected close 4404, got {other:?}"),
    }
}

#[tokio::test]
async fn hundred_subscribers_five_writers_converge() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path());
    let url = relay.url("/fanout");
    let base = base_doc();
    post(&url, base.clone().save()).await;

    let mut subs = Vec::new();
    for _ in 0..100 {
        let mut ws = connect(&relay.ws_url("/fanout")).await;
        let Message::Binary(bytes) = next_msg(&mut ws).await else {
            panic!("expected the document")
        };
        let mut mirror = AutoCommit::new();
        mirror.load_incremental(&bytes).unwrap();
        subs.push((ws, mirror));
    }
    let mut writers = Vec::new();
    for w in 0..5 {
        let mut doc = base.clone().fork();
        let ws_url = relay.ws_url("/fanout");
        writers.push(tokio::spawn(async move {
            let mut ws = connect(&ws_url).await;
            let _ = next_msg(&mut ws).await; // the initial document
            for i in 0..20 {
                let heads = doc.get_heads();
                add_item(&mut doc, &format!("w{w}-{i}"));
                ws.send(Message::Binary(doc.save_after(&heads).into()))
                    .await
                    .unwrap();
            }
            let mut acks = 0;
            while acks < 20 {
                if let Message::Text(t) = next_msg(&mut ws).await {
                    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                    if v["type"] == "ack" {
                        acks += 1;
                    }
                }
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let server = server_heads(&url).await;
    let mut readers = Vec::new();
    for (mut ws, mut mirror) in subs {
        let server = server.clone();
        readers.push(tokio::spawn(async move {
            while heads_hex(&mut mirror) != server {
                if let Message::Binary(bytes) = next_msg(&mut ws).await {
                    mirror.load_incremental(&bytes).unwrap();
                }
            }
            items(&mirror).len()
        }));
    }
    for r in readers {
        assert_eq!(r.await.unwrap(), 1 + 5 * 20);
    }
}

#[tokio::test]
async fn a_subscriber_that_stops_reading_catches_up_and_stalls_nobody() {
    let dir = tempfile::tempdir().unwrap();
    // Long ping interval and send timeout: this client stops reading and answering pings on
    // purpose; keepalive and slow sends are not under test (tests/peers.rs has them).
    let relay = Relay::start_with(
        dir.path(),
        &[
            "--subscriber-queue",
            "4",
            "--ping-secs",
            "120",
            "--send-timeout-secs",
            "120",
        ],
    );
    let url = relay.url("/slow");
    let mut doc = base_doc();
    post(&url, doc.save()).await;

    // A small receive buffer turns off the kernel's autotuning (up to 32 MiB on loopback),
    // so a client that stops reading really backs up into the server.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let stream = socket
        .connect(([127, 0, 0, 1], relay.port).into())
        .await
        .unwrap();
    let (mut slow, _) =
        tokio_tungstenite::client_async(relay.ws_url("/slow"), MaybeTlsStream::Plain(stream))
            .await
            .unwrap();
    let mut slow_mirror = AutoCommit::new();
    let Message::Binary(bytes) = next_msg(&mut slow).await else {
        panic!("expected the document")
    };
    slow_mirror.load_incremental(&bytes).unwrap();
    let mut fast = connect(&relay.ws_url("/slow")).await;
    let mut fast_mirror = AutoCommit::new();
    let Message::Binary(bytes) = next_msg(&mut fast).await else {
        panic!("expected the document")
    };
    fast_mirror.load_incremental(&bytes).unwrap();

    // The fast subscriber reads continuously; the slow one does not read at all.
    let fast_task = tokio::spawn(async move {
        let mut count = 0usize;
        loop {
            let Message::Binary(bytes) = next_msg(&mut fast).await else {
                continue;
            };
            fast_mirror.load_incremental(&bytes).unwrap();
            count += 1;
            if items(&fast_mirror).len() == 2001 {
                return count;
            }
        }
    });
    // 2,000 changes, each carrying 4 KiB that does not compress, so the slow socket's
    // buffers (several MiB on loopback) fill up and its queue overflows.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for i in 0..2000 {
        let padding: String = (0..4096)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                char::from(b'a' + (seed % 26) as u8)
            })
            .collect();
        let heads = doc.get_heads();
        add_item(&mut doc, &format!("{i}:{padding}"));
        post(&url, doc.save_after(&heads)).await;
    }
    let delivered = tokio::time::timeout(DEADLINE * 3, fast_task)
        .await
        .expect("the fast subscriber fell behind")
        .unwrap();
    assert!(delivered > 0);
    let s = stats(&relay).await;
    assert!(
        s["subscriber_overflows"].as_u64().unwrap() > 0,
        "the slow subscriber never overflowed, so this test proved nothing: {s}"
    );

    // The slow one resumes and converges.
    let server = server_heads(&url).await;
    while heads_hex(&mut slow_mirror) != server {
        match next_msg(&mut slow).await {
            Message::Binary(bytes) => {
                slow_mirror.load_incremental(&bytes).unwrap();
            }
            Message::Close(frame) => panic!("slow subscriber closed: {frame:?}"),
            _ => {}
        }
    }
    assert_eq!(items(&slow_mirror).len(), 2001);
}

#[tokio::test]
async fn sse_reports_heads_of_each_change() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path());
    let url = relay.url("/sse-doc");
    let mut doc = base_doc();
    post(&url, doc.save()).await;

    let mut tcp = TcpStream::connect(("127.0.0.1", relay.port)).await.unwrap();
    tcp.write_all(
        b"GET /sse-doc HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\nOrigin: http://app.example\r\n\r\n",
    )
    .await
    .unwrap();
    let mut reader = BufReader::new(tcp);
    let mut headers = String::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        if line == "\r\n" {
            break;
        }
        headers.push_str(&line.to_ascii_lowercase());
    }
    assert!(headers.starts_with("http/1.1 200"), "{headers}");
    assert!(headers.contains("content-type: text/event-stream"));
    assert!(headers.contains("access-control-allow-origin: *"));

    let heads = doc.get_heads();
    add_item(&mut doc, "sse");
    let reply = post(&url, doc.save_after(&heads)).await;
    let (event, data) = tokio::time::timeout(DEADLINE, async {
        let (mut event, mut data) = (String::new(), String::new());
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).await.unwrap();
            let line = line.trim_end();
            if let Some(e) = line.strip_prefix("event: ").or(line.strip_prefix("event:")) {
                event = e.trim().to_string();
            } else if let Some(d) = line.strip_prefix("data: ").or(line.strip_prefix("data:")) {
                data = d.trim().to_string();
            } else if line.is_empty() && !event.is_empty() {
                return (event, data);
            }
        }
    })
    .await
    .expect("no SSE event");
    assert_eq!(event, "change");
    let data: serde_json::Value = serde_json::from_str(&data).unwrap();
    assert_eq!(json_heads(&data), json_heads(&reply));
    assert_eq!(json_heads(&data), heads_hex(&mut doc));
}

/// A client that never answers pings: read raw frames (a WebSocket library would answer them).
#[tokio::test]
async fn a_peer_that_ignores_pings_is_closed_with_4008() {
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_with(dir.path(), &["--ping-secs", "1"]);
    let mut tcp = TcpStream::connect(("127.0.0.1", relay.port)).await.unwrap();
    tcp.write_all(
        b"GET /quiet HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    let code = tokio::time::timeout(DEADLINE, async {
        let mut pings = 0;
        loop {
            let mut chunk = [0u8; 1024];
            let n = tcp.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection ended without a close frame");
            buf.extend_from_slice(&chunk[..n]);
            // Skip the HTTP response, then parse frames.
            let Some(start) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            assert!(buf.starts_with(b"HTTP/1.1 101"));
            let mut frames = &buf[start + 4..];
            while frames.len() >= 2 {
                let (opcode, len) = (frames[0] & 0x0f, (frames[1] & 0x7f) as usize);
                if frames.len() < 2 + len {
                    break;
                }
                let payload = &frames[2..2 + len];
                match opcode {
                    0x9 => pings += 1,
                    0x8 => {
                        assert!(pings >= 1, "closed before pinging");
                        return u16::from_be_bytes([payload[0], payload[1]]);
                    }
                    _ => {}
                }
                frames = &frames[2 + len..];
            }
        }
    })
    .await
    .expect("the silent peer was never closed");
    assert_eq!(code, 4008);
}
