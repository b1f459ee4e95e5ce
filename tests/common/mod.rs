//! Test support: start the real binary on a free loopback port, talk to it, stop it by pid.
#![allow(dead_code)]
pub mod services;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ReadDoc, ROOT};

pub struct Relay {
    pub child: Child,
    pub port: u16,
    pub data_dir: PathBuf,
    extra: Vec<String>,
}

impl Relay {
    /// Starts the relay on a fresh data dir.
    pub fn start(dir: &Path) -> Relay {
        Self::start_with(dir, &[])
    }

    pub fn start_with(dir: &Path, extra: &[&str]) -> Relay {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let (child, port) = spawn(dir, &extra);
        Relay {
            child,
            port,
            data_dir: dir.to_path_buf(),
            extra,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://127.0.0.1:{}{}", self.port, path)
    }

    /// kill -9, as a crash would.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for exit; returns the exit status code.
    pub fn terminate(&mut self) -> Option<i32> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                self.kill9();
                panic!("relay did not exit within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts again on the same data dir (after kill9/terminate).
    pub fn restart(&mut self) {
        let (child, port) = spawn(&self.data_dir, &self.extra);
        self.child = child;
        self.port = port;
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill9();
        }
    }
}

fn spawn(dir: &Path, extra: &[String]) -> (Child, u16) {
    spawn_opts(dir, extra, &SpawnOptions::default())
}

/// A raw HTTP/1.1 request, for paths an HTTP client library would normalise.
pub fn raw_request(port: u16, request_line: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(
        s,
        "{request_line}\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// Polls `f` until it returns Some, or panics at the deadline.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A document with a list of items under "items".
pub fn base_doc() -> AutoCommit {
    let mut doc = AutoCommit::new();
    let list = doc
        .put_object(ROOT, "items", automerge::ObjType::List)
        .unwrap();
    doc.insert(&list, 0, "base").unwrap();
    doc.commit();
    doc
}

pub fn add_item(doc: &mut AutoCommit, text: &str) {
    let (_, list) = doc.get(ROOT, "items").unwrap().expect("items");
    let len = doc.length(&list);
    doc.insert(&list, len, text).unwrap();
    doc.commit();
}

pub fn items(doc: &AutoCommit) -> Vec<String> {
    let Some((_, list)) = doc.get(ROOT, "items").unwrap() else {
        return vec![];
    };
    (0..doc.length(&list))
        .filter_map(|i| doc.get(&list, i).unwrap())
        .map(|(v, _)| v.into_string().unwrap_or_default())
        .collect()
}

pub fn heads_hex(doc: &mut AutoCommit) -> Vec<String> {
    let mut h: Vec<String> = doc.get_heads().iter().map(|h| h.to_string()).collect();
    h.sort();
    h
}

pub fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

pub fn json_heads(v: &serde_json::Value) -> Vec<String> {
    sorted(
        v["heads"]
            .as_array()
            .expect("heads")
            .iter()
            .map(|h| h.as_str().unwrap().to_string())
            .collect(),
    )
}

// ---- access control ------------------------------------------------------------------------

/// How a relay is started beyond its extra arguments (see [`Relay::start_opts`]).
#[derive(Default, Clone)]
pub struct SpawnOptions {
    /// `RUST_LOG` (default `warn`, as [`Relay::start`]).
    pub rust_log: Option<String>,
    /// More environment variables.
    pub env: Vec<(String, String)>,
    /// Write the relay's stderr to this file instead of inheriting it.
    pub stderr_file: Option<PathBuf>,
}

impl Relay {
    /// Starts the relay with `opts` (a log level, environment, stderr captured to a file).
    /// `restart()` on the result starts it without those options.
    pub fn start_opts(dir: &Path, extra: &[&str], opts: &SpawnOptions) -> Relay {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let (child, port) = spawn_opts(dir, &extra, opts);
        Relay {
            child,
            port,
            data_dir: dir.to_path_buf(),
            extra,
        }
    }

    /// Sends SIGHUP (reload the token file and keys).
    pub fn sighup(&self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    }
}

fn spawn_opts(dir: &Path, extra: &[String], opts: &SpawnOptions) -> (Child, u16) {
    let stderr = match &opts.stderr_file {
        Some(path) => Stdio::from(std::fs::File::create(path).expect("create stderr file")),
        None => Stdio::inherit(),
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_automerge-relay"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .args(extra)
        .env("RUST_LOG", opts.rust_log.as_deref().unwrap_or("warn"))
        .envs(opts.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("start relay binary");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read listening line");
    let port = line.trim().rsplit(':').next().and_then(|p| p.parse().ok());
    let Some(port) = port else {
        let _ = child.kill();
        let _ = child.wait();
        let log = opts
            .stderr_file
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default();
        panic!("unexpected first line from relay: {line:?}\nstderr:\n{log}");
    };
    (child, port)
}

/// Hex SHA-256 of a secret, as a `sha256:` line in the token file holds it.
pub fn sha256_hex(secret: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(secret.as_bytes()))
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// An HS256 JWT with these claims, signed with `key`.
pub fn jwt_hs256(key: &[u8], claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(key),
    )
    .expect("encode JWT")
}

/// Base64url without padding (JWT segments).
pub fn b64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (*b as u32) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// An unsigned JWT (`alg: none`) with these claims.
pub fn jwt_alg_none(claims: &serde_json::Value) -> String {
    let header = b64url(br#"{"alg":"none","typ":"JWT"}"#);
    let body = b64url(claims.to_string().as_bytes());
    format!("{header}.{body}.")
}

/// Percent-encodes everything but the unreserved characters (for `?token=`).
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `url` with `token=<token>` added to its query.
pub fn with_query_token(url: &str, token: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}token={}", percent_encode(token))
}

/// One `[[token]]` entry of a token file; `grants` is the TOML array, e.g.
/// `[ { ids = "a-*", access = "read" } ]`.
pub fn token_entry(name: &str, token: &str, grants: &str) -> String {
    format!("[[token]]\nname = \"{name}\"\ntoken = \"{token}\"\ngrants = {grants}\n\n")
}

/// The value of one series (`name`, labels included if any, e.g. `relay_repo_peers`) on a
/// Prometheus text page, if it is there.
pub fn metric_value(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// `relay_auth_failures_total{reason="..."}` values from a Prometheus text page (absent: 0).
pub fn auth_failures(metrics: &str, reason: &str) -> u64 {
    let label = format!("reason=\"{reason}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with("relay_auth_failures_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// A client WebSocket (per-document or automerge-repo).
pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A refused WebSocket upgrade: status, headers, body.
#[derive(Debug)]
pub struct WsRefusal {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

/// Opens a WebSocket, with `Authorization: Bearer <bearer>` when given; a refused upgrade
/// comes back as a [`WsRefusal`].
pub async fn ws_connect_auth(url: &str, bearer: Option<&str>) -> Result<Ws, WsRefusal> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = url.into_client_request().expect("ws request");
    if let Some(t) = bearer {
        req.headers_mut().insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {t}").parse().expect("header value"),
        );
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let mut headers = reqwest::header::HeaderMap::new();
            for (k, v) in resp.headers() {
                headers.insert(k.clone(), v.clone());
            }
            Err(WsRefusal {
                status: resp.status().as_u16(),
                headers,
                body: resp.body().as_deref().unwrap_or(&[]).to_vec(),
            })
        }
        Err(e) => panic!("websocket connect to {url} failed: {e}"),
    }
}

/// The next frame that is not a ping or pong; `None` when the socket ended (or failed)
/// without a close frame. Panics after `timeout`.
pub async fn next_frame(
    ws: &mut Ws,
    timeout: Duration,
) -> Option<tokio_tungstenite::tungstenite::Message> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        let msg = tokio::time::timeout(timeout, ws.next())
            .await
            .expect("timed out waiting for a WebSocket message");
        match msg {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(m)) => return Some(m),
            _ => return None,
        }
    }
}

/// Waits for the close frame's code (skipping other messages) until `deadline`.
pub async fn close_code(ws: &mut Ws, deadline: Instant) -> Option<u16> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ws.next()).await {
            Err(_) => panic!("no close frame by the deadline"),
            Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| u16::from(f.code)),
            Ok(Some(Ok(_))) => continue,
            Ok(_) => return None,
        }
    }
}

/// A minimal automerge-repo peer over the relay's repo socket.
pub struct RepoPeer {
    pub ws: Ws,
    pub me: String,
    pub server: String,
}

impl RepoPeer {
    /// Connects (with `bearer` in the header when given: put `?token=` in `url` otherwise),
    /// joins and waits for the relay's `peer`.
    pub async fn connect(url: &str, bearer: Option<&str>) -> Result<RepoPeer, WsRefusal> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let ws = ws_connect_auth(url, bearer).await?;
        let me = format!(
            "test-peer-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let mut peer = RepoPeer {
            ws,
            me: me.clone(),
            server: String::new(),
        };
        peer.send(automerge_relay::RepoMessage::Join {
            sender_id: me,
            peer_metadata: None,
            supported_protocol_versions: Some(vec!["1".into()]),
        })
        .await;
        match peer.recv().await {
            automerge_relay::RepoMessage::Peer { sender_id, .. } => peer.server = sender_id,
            other => panic!("expected peer, got {other:?}"),
        }
        Ok(peer)
    }

    /// The next repo message (panics on a close, after 10 s, or on a frame that is not one).
    pub async fn recv(&mut self) -> automerge_relay::RepoMessage {
        use tokio_tungstenite::tungstenite::Message;
        match next_frame(&mut self.ws, Duration::from_secs(10)).await {
            Some(Message::Binary(b)) => {
                automerge_relay::RepoMessage::decode(&b).expect("repo message decodes")
            }
            other => panic!("expected a repo message, got {other:?}"),
        }
    }

    pub async fn send(&mut self, msg: automerge_relay::RepoMessage) {
        use futures_util::SinkExt;
        self.ws
            .send(tokio_tungstenite::tungstenite::Message::binary(
                msg.encode(),
            ))
            .await
            .expect("send repo message");
    }

    pub async fn sync(&mut self, doc: &str, data: Vec<u8>) {
        let msg = automerge_relay::RepoMessage::Sync {
            sender_id: self.me.clone(),
            target_id: self.server.clone(),
            document_id: doc.into(),
            data,
        };
        self.send(msg).await;
    }

    /// A `request` for `doc`: the first sync message of `local` with `state`.
    pub async fn request(
        &mut self,
        doc: &str,
        local: &mut automerge::Automerge,
        state: &mut automerge::sync::State,
    ) {
        use automerge::sync::SyncDoc;
        let first = local
            .generate_sync_message(state)
            .expect("a first sync message");
        let msg = automerge_relay::RepoMessage::Request {
            sender_id: self.me.clone(),
            target_id: self.server.clone(),
            document_id: doc.into(),
            data: first.encode(),
        };
        self.send(msg).await;
    }
}

/// A sync message that carries one new change on top of `stored` (the peer already knows the
/// relay has `stored`, so its first message holds the change): (the message, the change's hash).
/// With `stored` empty, a new document: the message creates it.
pub fn sync_edit(stored: &[u8], key: &str) -> (Vec<u8>, automerge::ChangeHash) {
    use automerge::sync::{BloomFilter, Have, SyncDoc};
    let mut local = if stored.is_empty() {
        automerge::Automerge::new()
    } else {
        automerge::Automerge::load(stored).expect("stored document loads")
    };
    let relay_heads = local.get_heads();
    let mut tx = local.transaction();
    tx.put(ROOT, key, "edited over the repo protocol")
        .expect("put");
    tx.commit();
    let ours = local.get_heads()[0];
    let mut state = automerge::sync::State::new();
    state.their_heads = Some(relay_heads.clone());
    state.their_need = Some(vec![]);
    state.their_have = Some(vec![Have {
        last_sync: relay_heads,
        bloom: BloomFilter::default(),
    }]);
    let msg = local
        .generate_sync_message(&mut state)
        .expect("sync message");
    assert!(
        !msg.changes.is_empty(),
        "the sync message carries the change"
    );
    (msg.encode(), ours)
}

/// Resident memory of a process, in KiB (0 when it cannot be read).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
