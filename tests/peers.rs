//! Peers that misbehave or fall behind, against the real binary over real sockets: close codes
//! that reach the client, acks before a close, stalled readers, ephemeral floods.

mod common;

use std::time::Duration;

use automerge::sync::SyncDoc;
use automerge::AutoCommit;
use automerge_relay::RepoMessage;
use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{connect_async, MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const DEADLINE: Duration = Duration::from_secs(30);

async fn connect(url: &str) -> Ws {
    connect_async(url).await.expect("websocket connect").0
}

async fn metrics(relay: &Relay) -> String {
    reqwest::get(relay.url("/_/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of one metric series (0 when absent), e.g. `relay_repo_peers`.
fn series(metrics: &str, name: &str) -> u64 {
    metric_value(metrics, name).map_or(0, |v| v as u64)
}

/// The value of one `relay_rejected_total` series (0 when absent).
fn rejected(metrics: &str, reason: &str) -> u64 {
    series(
        metrics,
        &format!("relay_rejected_total{{reason=\"{reason}\"}}"),
    )
}

/// The relay's resident memory, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    rss_kib(pid) * 1024
}

/// A client whose own sends fill its small TCP buffer, like any client uploading more than the
/// buffers hold.
async fn connect_small_send_buffer(url: &str, port: u16) -> Ws {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_send_buffer_size(64 * 1024).unwrap();
    let tcp = socket.connect(([127, 0, 0, 1], port).into()).await.unwrap();
    tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(tcp))
        .await
        .expect("websocket connect")
        .0
}

/// The client is still sending the message when the server refuses it: the close frame must
/// reach it before its send fails (a client like Node's `ws` gives up at the first write error
/// and reports 1006).
#[tokio::test]
async fn a_message_over_max_body_gets_close_1009_while_the_client_still_sends() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_with(dir.path(), &["--max-body", "1MiB"]);
    let ws = connect_small_send_buffer(&relay.ws_url("/too-big"), relay.port).await;
    let (mut sink, mut stream) = ws.split();
    let big = Message::Binary(vec![7u8; 17 << 20].into());
    let code = tokio::time::timeout(DEADLINE, async {
        let mut send = std::pin::pin!(sink.send(big));
        let mut sending = true;
        loop {
            tokio::select! {
                sent = &mut send, if sending => {
                    if let Err(e) = sent {
                        panic!("the send failed ({e}) before the close frame arrived");
                    }
                    sending = false;
                }
                msg = stream.next() => match msg {
                    Some(Ok(Message::Close(Some(frame)))) => return u16::from(frame.code),
                    Some(Ok(_)) => {}
                    other => panic!("expected a close frame, got {other:?}"),
                },
            }
        }
    })
    .await
    .expect("no close frame");
    assert_eq!(code, 1009);
    let m = metrics(&relay).await;
    assert_eq!(rejected(&m, "message_too_big"), 1, "{m}");
}

#[tokio::test]
async fn over_the_message_rate_every_accepted_write_is_acked_then_1008() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_with(dir.path(), &["--max-messages-per-sec", "100"]);
    let url = relay.url("/chatty");
    let mut doc = base_doc();
    let r = reqwest::Client::new()
        .post(&url)
        .body(doc.save())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let mut writes = Vec::new();
    for i in 0..600 {
        let heads = doc.get_heads();
        add_item(&mut doc, &format!("item {i}"));
        writes.push(doc.save_after(&heads));
    }
    let ws = connect(&relay.ws_url("/chatty")).await;
    let (mut sink, mut stream) = ws.split();
    let sending = tokio::spawn(async move {
        for w in writes {
            if sink.send(Message::Binary(w.into())).await.is_err() {
                break;
            }
        }
    });
    let (acks, code) = tokio::time::timeout(DEADLINE, async {
        let mut acks = 0;
        loop {
            match stream.next().await {
                Some(Ok(Message::Text(t))) => {
                    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                    assert_eq!(v["type"], "ack", "{v}");
                    acks += 1;
                }
                Some(Ok(Message::Close(Some(frame)))) => return (acks, u16::from(frame.code)),
                Some(Ok(_)) => {}
                other => {
                    panic!("expected acks then a close frame, got {other:?} after {acks} acks")
                }
            }
        }
    })
    .await
    .expect("never closed");
    let _ = sending.await;
    assert_eq!(code, 1008);
    assert!(acks >= 1, "the burst allowance passed nothing");
    let bytes = reqwest::get(&url).await.unwrap().bytes().await.unwrap();
    let stored = automerge::AutoCommit::load(&bytes).unwrap();
    assert_eq!(
        items(&stored).len(),
        1 + acks,
        "every stored write was acknowledged, and nothing refused was stored"
    );
}

/// Clients that vanish without a close frame (TCP closed, or reset) are counted as lost
/// connections, not as bad messages.
#[tokio::test]
async fn clients_that_drop_without_a_close_frame_count_as_connection_lost() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path());
    for i in 0..10 {
        let ws = connect(&relay.ws_url(&format!("/gone-{i}"))).await;
        let MaybeTlsStream::Plain(mut tcp) = ws.into_inner() else {
            panic!("plain TCP")
        };
        if i % 2 == 0 {
            tcp.shutdown().await.unwrap();
        } else {
            // Unread data at close makes the kernel reset the connection.
            tcp.set_zero_linger().unwrap();
        }
        drop(tcp);
    }
    let m = wait_for("ten lost connections", DEADLINE, || {
        let relay = &relay;
        async move {
            let m = metrics(relay).await;
            (rejected(&m, "connection_lost") >= 10).then_some(m)
        }
    })
    .await;
    assert_eq!(rejected(&m, "connection_lost"), 10, "{m}");
    assert_eq!(rejected(&m, "message_too_big"), 0, "{m}");
}

/// Text that does not compress, so changes really fill TCP buffers.
fn noise(seed: &mut u64, len: usize) -> String {
    (0..len)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            char::from(b'a' + (*seed % 26) as u8)
        })
        .collect()
}

/// The finding: per-document WebSockets whose TCP buffers were full stayed connected for a
/// minute and more, holding their slots. A subscriber that stops reading is now closed once it
/// has missed two pings, even though the send to it is blocked, and its slot is free again.
#[tokio::test]
async fn a_subscriber_that_stops_reading_is_closed_and_frees_its_slot() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_with(dir.path(), &["--ping-secs", "1"]);
    let url = relay.url("/stalled-sub");
    let mut doc = base_doc();
    let c = reqwest::Client::new();
    c.post(&url).body(doc.save()).send().await.unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let tcp = socket
        .connect(([127, 0, 0, 1], relay.port).into())
        .await
        .unwrap();
    let (mut stalled, _) =
        tokio_tungstenite::client_async(relay.ws_url("/stalled-sub"), MaybeTlsStream::Plain(tcp))
            .await
            .unwrap();
    assert!(matches!(stalled.next().await, Some(Ok(Message::Binary(_)))));
    let connected = |m: &str| series(m, "relay_connections");
    assert_eq!(connected(&metrics(&relay).await), 1);
    // From now on the subscriber reads nothing, not even pings.
    let stalled_at = std::time::Instant::now();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut closed_after = None;
    for i in 0..2000 {
        let heads = doc.get_heads();
        add_item(&mut doc, &format!("{i}:{}", noise(&mut seed, 16 * 1024)));
        let r = c
            .post(&url)
            .body(doc.save_after(&heads))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        if i % 10 == 0 && connected(&metrics(&relay).await) == 0 {
            closed_after = Some(stalled_at.elapsed());
            break;
        }
    }
    let closed_after = closed_after.expect("the stalled subscriber was never closed");
    eprintln!("the stalled subscriber was closed after {closed_after:?}");
    // Two missed pings (1 s each) and half a second, the tick that notices, the close
    // frame's second: well within 10 s.
    assert!(closed_after < Duration::from_secs(10), "{closed_after:?}");
    let m = metrics(&relay).await;
    assert!(
        rejected(&m, "ping_timeout") + rejected(&m, "send_timeout") >= 1,
        "{m}"
    );
}

// -------------------------------------------------------------------------------------------
// automerge-repo peers
// -------------------------------------------------------------------------------------------

/// A raw automerge-repo peer: CBOR frames over tokio-tungstenite, nothing read behind its back.
struct RepoPeer {
    id: String,
    ws: Ws,
    count: u64,
}

impl RepoPeer {
    /// Joins as `id`; `recv_buffer` shrinks the TCP receive buffer (a peer that will stall).
    async fn join(relay: &Relay, id: &str, recv_buffer: Option<u32>) -> RepoPeer {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        if let Some(size) = recv_buffer {
            socket.set_recv_buffer_size(size).unwrap();
        }
        let tcp = socket
            .connect(([127, 0, 0, 1], relay.port).into())
            .await
            .unwrap();
        let (ws, _) =
            tokio_tungstenite::client_async(relay.ws_url("/"), MaybeTlsStream::Plain(tcp))
                .await
                .expect("repo websocket");
        let mut peer = RepoPeer {
            id: id.to_owned(),
            ws,
            count: 0,
        };
        peer.send(&RepoMessage::Join {
            sender_id: id.to_owned(),
            peer_metadata: None,
            supported_protocol_versions: Some(vec!["1".into()]),
        })
        .await;
        match peer.next().await {
            RepoMessage::Peer { .. } => peer,
            other => panic!("expected peer, got {other:?}"),
        }
    }

    async fn send(&mut self, msg: &RepoMessage) {
        self.ws
            .send(Message::Binary(msg.encode().into()))
            .await
            .expect("send to the relay");
    }

    /// The next protocol message (pings are answered by tungstenite while reading).
    async fn next(&mut self) -> RepoMessage {
        loop {
            let msg = tokio::time::timeout(DEADLINE, self.ws.next())
                .await
                .expect("no message from the relay")
                .expect("socket ended")
                .expect("socket error");
            if let Message::Binary(b) = msg {
                return RepoMessage::decode(&b).expect("a repo message");
            }
        }
    }

    /// Syncs `doc` (which the relay has) until the relay has nothing more to say.
    async fn sync(&mut self, doc: &str) {
        let mut mirror = AutoCommit::new();
        let mut state = automerge::sync::State::new();
        let msg = mirror
            .sync()
            .generate_sync_message(&mut state)
            .expect("a first sync message");
        self.send(&RepoMessage::Sync {
            sender_id: self.id.clone(),
            target_id: "relay".into(),
            document_id: doc.into(),
            data: msg.encode(),
        })
        .await;
        loop {
            let RepoMessage::Sync { data, .. } = self.next().await else {
                continue;
            };
            let msg = automerge::sync::Message::decode(&data).unwrap();
            mirror.sync().receive_sync_message(&mut state, msg).unwrap();
            match mirror.sync().generate_sync_message(&mut state) {
                Some(reply) => {
                    self.send(&RepoMessage::Sync {
                        sender_id: self.id.clone(),
                        target_id: "relay".into(),
                        document_id: doc.into(),
                        data: reply.encode(),
                    })
                    .await
                }
                None => break,
            }
            if !mirror.get_heads().is_empty()
                && mirror.get_heads() == state.their_heads.clone().unwrap_or_default()
            {
                break;
            }
        }
        assert!(!items(&mirror).is_empty(), "the document arrived");
    }

    async fn ephemeral(&mut self, doc: &str, data: Vec<u8>) {
        self.count += 1;
        let msg = RepoMessage::Ephemeral {
            sender_id: self.id.clone(),
            target_id: "relay".into(),
            document_id: doc.into(),
            session_id: "session".into(),
            count: self.count,
            data,
        };
        self.send(&msg).await;
    }

    /// The next ephemeral message relayed to this peer: its sender and count.
    async fn next_ephemeral(&mut self) -> (String, u64, usize) {
        loop {
            if let RepoMessage::Ephemeral {
                sender_id,
                count,
                data,
                ..
            } = self.next().await
            {
                return (sender_id, count, data.len());
            }
        }
    }
}

/// A document the relay has, under `id`.
async fn create(relay: &Relay, id: &str) {
    let r = reqwest::Client::new()
        .post(relay.url(&format!("/{id}")))
        .body(base_doc().save())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
}

#[tokio::test]
async fn ephemeral_messages_from_a_peer_that_does_not_sync_the_document_are_not_relayed() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path());
    create(&relay, "presence").await;
    let mut alice = RepoPeer::join(&relay, "alice", None).await;
    alice.sync("presence").await;
    let mut mallory = RepoPeer::join(&relay, "mallory", None).await;
    // Mallory never synced the document: dropped.
    mallory.ephemeral("presence", b"not yours".to_vec()).await;
    // Once it syncs, its messages pass: the first one alice hears is the second.
    mallory.sync("presence").await;
    mallory.ephemeral("presence", b"hello".to_vec()).await;
    assert_eq!(alice.next_ephemeral().await, ("mallory".into(), 2, 5));
    let m = metrics(&relay).await;
    assert_eq!(rejected(&m, "ephemeral_not_syncing"), 1, "{m}");
}

#[tokio::test]
async fn an_ephemeral_message_over_max_ephemeral_is_not_relayed() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path());
    create(&relay, "cursors").await;
    let mut alice = RepoPeer::join(&relay, "alice", None).await;
    alice.sync("cursors").await;
    let mut bob = RepoPeer::join(&relay, "bob", None).await;
    bob.sync("cursors").await;
    // The default limit is 64 KiB.
    bob.ephemeral("cursors", vec![1; (64 << 10) + 1]).await;
    bob.ephemeral("cursors", vec![2; 64 << 10]).await;
    assert_eq!(alice.next_ephemeral().await, ("bob".into(), 2, 64 << 10));
    let m = metrics(&relay).await;
    assert_eq!(rejected(&m, "ephemeral_too_large"), 1, "{m}");
}

/// The finding: a peer that stops reading while another floods the document with ephemeral
/// messages held up to 4,096 messages of any size (RSS 1.2 GB) and was never closed. Now its
/// queue holds at most `--max-peer-queue` bytes, the rest is dropped, and it is closed once it
/// has missed two pings.
#[tokio::test]
async fn a_stalled_repo_peer_under_an_ephemeral_flood_is_closed_and_memory_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_with(
        dir.path(),
        &["--ping-secs", "2", "--max-messages-per-sec", "5000"],
    );
    let pid = relay.child.id();
    create(&relay, "flooded").await;
    let mut stalled = RepoPeer::join(&relay, "stalled", Some(16 * 1024)).await;
    stalled.sync("flooded").await;
    let mut flooder = RepoPeer::join(&relay, "flooder", None).await;
    flooder.sync("flooded").await;
    let before = rss_bytes(pid);
    let stalled_at = std::time::Instant::now();

    // 2,000 messages of 60 KiB (117 MiB) that do not compress, from a peer that keeps reading.
    let (mut sink, mut stream) = flooder.ws.split();
    let reader = tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
    let flood = tokio::spawn(async move {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for count in 1..=2000u64 {
            let data: Vec<u8> = (0..60 * 1024)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let msg = RepoMessage::Ephemeral {
                sender_id: "flooder".into(),
                target_id: "relay".into(),
                document_id: "flooded".into(),
                session_id: "s".into(),
                count,
                data,
            };
            if sink
                .send(Message::Binary(msg.encode().into()))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let mut peak = before;
    let mut closed_after = None;
    while !flood.is_finished() || closed_after.is_none() {
        peak = peak.max(rss_bytes(pid));
        if closed_after.is_none() && series(&metrics(&relay).await, "relay_repo_peers") == 1 {
            closed_after = Some(stalled_at.elapsed());
        }
        assert!(
            stalled_at.elapsed() < DEADLINE * 2,
            "the flood or the close took too long"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    flood.await.unwrap();
    reader.abort();
    let closed_after = closed_after.unwrap();
    eprintln!(
        "RSS before the flood {} MiB, peak {} MiB; the stalled peer was closed after {closed_after:?}",
        before >> 20,
        peak >> 20
    );
    assert!(
        peak < before + (64 << 20),
        "RSS grew from {} MiB to {} MiB",
        before >> 20,
        peak >> 20
    );
    // Two missed pings (2 s each) and half a second, the tick that notices (6 s), the close
    // frame's second: 7 s, with room for a loaded machine.
    assert!(closed_after < Duration::from_secs(15), "{closed_after:?}");
    let m = metrics(&relay).await;
    assert!(
        rejected(&m, "ping_timeout") + rejected(&m, "send_timeout") >= 1,
        "{m}"
    );
    assert!(
        rejected(&m, "ephemeral_queue_full") > 0,
        "the queue never filled: {m}"
    );
    // The stalled client finds its connection gone once it reads again.
    let ended = tokio::time::timeout(DEADLINE, async {
        loop {
            match stalled.ws.next().await {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the stalled peer is still connected");
}

/// A peer that never reads, with pings and the send timeout far away: only its queue can tell.
/// It asks for a large document (the answer, bigger than the budget, passes alone and blocks
/// the socket), then, while that answer is under way, for documents the relay does not have;
/// the first answer that does not fit closes it at once, not at its send timeout.
#[tokio::test]
async fn a_repo_peer_whose_queue_overflows_is_closed_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start_with(
        dir.path(),
        &["--max-peer-queue", "64KiB", "--ping-secs", "60"],
    );
    // 8 MiB that do not compress well: a sync message of 5 MiB, more than the TCP buffers hold.
    let mut doc = base_doc();
    add_item(&mut doc, &noise(&mut 0x2545_f491_4f6c_dd1d, 8 << 20));
    let r = reqwest::Client::new()
        .post(relay.url("/big"))
        .body(doc.save())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let mut greedy = RepoPeer::join(&relay, "greedy", Some(16 * 1024)).await;
    let data = AutoCommit::new()
        .sync()
        .generate_sync_message(&mut automerge::sync::State::new())
        .expect("a first sync message")
        .encode();
    let ask = |document_id: String| RepoMessage::Request {
        sender_id: "greedy".into(),
        target_id: "relay".into(),
        document_id,
        data: data.clone(),
    };
    let began = std::time::Instant::now();
    greedy.send(&ask("big".into())).await;
    // Until the big answer is being written, a small one fits; then the next one does not.
    let mut asked = 0;
    let closed_after = loop {
        if series(&metrics(&relay).await, "relay_repo_peers") == 0 {
            break began.elapsed();
        }
        assert!(
            began.elapsed() < DEADLINE,
            "the greedy peer was never closed"
        );
        asked += 1;
        let msg = Message::Binary(ask(format!("nowhere-{asked}")).encode().into());
        // Fails once the relay has closed the socket; the next check sees it.
        let _ = greedy.ws.send(msg).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("the peer whose queue overflowed was closed after {closed_after:?} ({asked} asks)");
    // Far sooner than the 30 s send timeout.
    assert!(closed_after < Duration::from_secs(15), "{closed_after:?}");
    let m = metrics(&relay).await;
    assert_eq!(rejected(&m, "fell_behind"), 1, "{m}");
    assert_eq!(rejected(&m, "send_timeout"), 0, "{m}");
}
