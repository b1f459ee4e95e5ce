//! Typing storm: T simulated typists, each inserting `rate` characters per second (one change
//! per keystroke) into one shared text over the automerge-repo WebSocket protocol v1, plus one
//! observer. Reports keystroke-to-observer latency (p50/p90/p99/max) and server CPU.
//!
//! Every typist and the observer is a real protocol peer on its own WebSocket: `join`, wait for
//! `peer`, then the real automerge sync exchange for one document, replying to every incoming
//! sync at once and sending local changes at most once per 100 ms (the automerge-repo client's
//! throttle). The load generator targets any `ws://` URL, or starts the relay, the reference
//! Node server or the samod peer (`benches/samod-peer`, samod behind axum) itself:
//!
//! ```text
//! cargo bench --bench typing_storm -- --spawn-relay target/release/automerge-relay \
//!     --spawn-reference --spawn-samod benches/samod-peer/target/release/samod-peer \
//!     --typists 4,16,64 --seconds 20
//! cargo bench --bench typing_storm -- --url ws://127.0.0.1:5000 --server-pid 1234 --typists 16
//! ```
//!
//! Latency "typed" runs from the keystroke (the change's commit) to the moment the frame carrying
//! it reaches the observer; it includes the typist's throttle wait, as in a real client. Latency
//! "sent" runs from the moment the change left the typist. Typing starts one throttle interval
//! after every peer has the document, so no keystroke waits for a throttle that started when
//! its connection opened.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use automerge::sync::{self, SyncDoc};
use automerge::transaction::Transactable;
use automerge::{Automerge, ChangeHash, ObjId, ObjType, ReadDoc, ROOT};
use automerge_relay::PeerSync;
use automerge_relay::{PeerMetadata, RepoMessage};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

mod support;
use support::{cpu_secs, ws_config};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const USAGE: &str = "\
typing storm: T typists x RATE keystrokes/s into one shared text, plus one observer

usage: typing_storm [TARGET...] [OPTIONS]
targets (at least one; each is run for every T):
  --url ws://HOST:PORT[/]   an already running server (CPU only with --server-pid)
  --spawn-relay PATH        start this automerge-relay binary on a free port, temp data dir
  --spawn-reference         start the reference Node server (tests/js/reference-server.mjs)
  --spawn-samod PATH        start this samod-peer binary (benches/samod-peer), temp data dir
options:
  --typists LIST            comma separated, default 4,16,64
  --seconds S               typing phase per run, default 20
  --rate R                  keystrokes per second per typist, default 6
  --server-pid PID          process whose CPU is accounted in --url mode
  --throttle-ms MS          client send throttle, default 100
  --drain-seconds S         how long to wait for the observer after typing, default 10
  --setup-seconds S         bound on connect + initial sync, default 60
  --node PATH               node binary, default node
  --reference-script PATH   default <crate>/tests/js/reference-server.mjs
  --label NAME              name of the --url target in the report, default url
env TYPING_STORM_DEBUG=1 prints every incoming sync frame over 64 KiB (whole-document resends).
";

// ---------------------------------------------------------------------------------------------
// Command line

#[derive(Debug, Clone)]
enum Target {
    Url {
        url: String,
        pid: Option<u32>,
        label: String,
    },
    Relay(PathBuf),
    Reference,
    Samod(PathBuf),
}

#[derive(Debug, Clone)]
struct Config {
    targets: Vec<Target>,
    typists: Vec<usize>,
    seconds: f64,
    rate: f64,
    throttle: Duration,
    drain: Duration,
    setup: Duration,
    node: String,
    reference_script: PathBuf,
}

fn parse_args() -> Result<Config, String> {
    let mut args = std::env::args().skip(1);
    let mut urls = Vec::new();
    let mut relay = None;
    let mut reference = false;
    let mut samod = None;
    let mut pid = None;
    let mut label = "url".to_string();
    let mut cfg = Config {
        targets: Vec::new(),
        typists: vec![4, 16, 64],
        seconds: 20.0,
        rate: 6.0,
        throttle: Duration::from_millis(100),
        drain: Duration::from_secs(10),
        setup: Duration::from_secs(60),
        node: "node".into(),
        reference_script: PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/js/reference-server.mjs"),
    };
    fn num<T: std::str::FromStr>(flag: &str, v: Option<String>) -> Result<T, String> {
        let v = v.ok_or_else(|| format!("missing value for {flag}"))?;
        v.parse().map_err(|_| format!("bad value for {flag}: {v}"))
    }
    fn secs(flag: &str, v: Option<String>) -> Result<Duration, String> {
        let s: f64 = num(flag, v)?;
        if !(0.0..=3600.0).contains(&s) {
            return Err(format!("{flag} out of range"));
        }
        Ok(Duration::from_secs_f64(s))
    }
    while let Some(arg) = args.next() {
        // `--flag=value` is accepted too.
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = || inline.clone().or_else(|| args.next());
        match flag.as_str() {
            "--url" => urls.push(value().ok_or("missing value for --url")?),
            "--spawn-relay" => relay = Some(PathBuf::from(value().ok_or("missing --spawn-relay")?)),
            "--spawn-reference" => reference = true,
            "--spawn-samod" => samod = Some(PathBuf::from(value().ok_or("missing --spawn-samod")?)),
            "--typists" => {
                let v = value().ok_or("missing value for --typists")?;
                cfg.typists = v
                    .split(',')
                    .filter(|s| !s.trim().is_empty())
                    .map(|s| s.trim().parse::<usize>())
                    .collect::<Result<_, _>>()
                    .map_err(|_| format!("bad --typists {v}"))?;
                if cfg.typists.is_empty() || cfg.typists.iter().any(|&t| t == 0 || t > 1000) {
                    return Err(format!("bad --typists {v}"));
                }
            }
            "--seconds" => cfg.seconds = secs("--seconds", value())?.as_secs_f64(),
            "--rate" => {
                cfg.rate = num("--rate", value())?;
                if !(cfg.rate > 0.0 && cfg.rate <= 1000.0) {
                    return Err("--rate out of range".into());
                }
            }
            "--server-pid" => pid = Some(num("--server-pid", value())?),
            "--throttle-ms" => {
                cfg.throttle = Duration::from_millis(num("--throttle-ms", value())?);
            }
            "--drain-seconds" => cfg.drain = secs("--drain-seconds", value())?,
            "--setup-seconds" => cfg.setup = secs("--setup-seconds", value())?,
            "--node" => cfg.node = value().ok_or("missing value for --node")?,
            "--reference-script" => {
                cfg.reference_script = PathBuf::from(value().ok_or("missing --reference-script")?)
            }
            "--label" => label = value().ok_or("missing value for --label")?,
            // `cargo bench` passes --bench to harness = false targets.
            "--bench" => {}
            "--help" | "-h" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    for url in urls {
        if !url.starts_with("ws://") && !url.starts_with("wss://") {
            return Err(format!("--url must be a ws:// URL: {url}"));
        }
        cfg.targets.push(Target::Url {
            url,
            pid,
            label: label.clone(),
        });
    }
    if let Some(p) = relay {
        cfg.targets.push(Target::Relay(p));
    }
    if reference {
        cfg.targets.push(Target::Reference);
    }
    if let Some(p) = samod {
        cfg.targets.push(Target::Samod(p));
    }
    if cfg.targets.is_empty() {
        return Err("give --url, --spawn-relay, --spawn-reference or --spawn-samod".into());
    }
    Ok(cfg)
}

// ---------------------------------------------------------------------------------------------
// Small helpers: randomness, ids, CPU accounting

/// xorshift64*: enough for positions and ids, no extra crate.
struct Rng(u64);

impl Rng {
    fn new() -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(1);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed) as u64;
        let mut seed =
            nanos ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(std::process::id());
        if seed == 0 {
            seed = 0x2545_F491_4F6C_DD1D;
        }
        let mut r = Rng(seed);
        for _ in 0..4 {
            r.next_u64();
        }
        r
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// An automerge-repo document id: bs58check of 16 random bytes.
fn new_document_id(rng: &mut Rng) -> String {
    let mut bytes = [0u8; 16];
    for chunk in bytes.chunks_mut(8) {
        chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    bs58::encode(bytes).with_check().into_string()
}

// ---------------------------------------------------------------------------------------------
// Spawned servers

struct Spawned {
    child: Child,
    url: String,
    stderr_path: PathBuf,
    _dir: tempfile::TempDir,
}

fn spawn_server(cfg: &Config, target: &Target) -> Result<Spawned, String> {
    let dir = tempfile::Builder::new()
        .prefix("typing-storm-")
        .tempdir()
        .map_err(|e| format!("temp dir: {e}"))?;
    let data = dir.path().join("data");
    let stderr_path = dir.path().join("server.stderr");
    let stderr = std::fs::File::create(&stderr_path).map_err(|e| format!("stderr file: {e}"))?;
    let mut cmd = match target {
        Target::Relay(path) => {
            let mut c = Command::new(path);
            c.arg("serve")
                .arg("--listen")
                .arg("127.0.0.1:0")
                .arg("--data-dir")
                .arg(&data);
            c
        }
        Target::Reference => {
            let mut c = Command::new(&cfg.node);
            c.arg(&cfg.reference_script)
                .arg("--port")
                .arg("0")
                .arg("--host")
                .arg("127.0.0.1")
                .arg("--data-dir")
                .arg(&data);
            c
        }
        Target::Samod(path) => {
            let mut c = Command::new(path);
            c.arg("--listen")
                .arg("127.0.0.1:0")
                .arg("--data-dir")
                .arg(&data);
            c
        }
        Target::Url { .. } => return Err("not a spawnable target".into()),
    };
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr))
        .spawn()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    // Reads the "listening on" line, then keeps draining stdout so the pipe never fills.
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let line = line.trim();
            // The relay and the reference print http://, the samod peer ws://.
            let addr = line
                .strip_prefix("listening on http://")
                .or_else(|| line.strip_prefix("listening on ws://"));
            match addr {
                Some(addr) if tx.is_some() => {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr.to_string());
                    }
                }
                _ => eprintln!("    [server stdout] {line}"),
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(addr) => Ok(Spawned {
            child,
            url: format!("ws://{addr}/"),
            stderr_path,
            _dir: dir,
        }),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
            Err(format!(
                "server did not print its address within 30 s; stderr:\n{err}"
            ))
        }
    }
}

/// SIGTERM by pid, wait (bounded), then SIGKILL. Returns the server's stderr.
fn stop_server(mut s: Spawned) -> String {
    let pid = nix::unistd::Pid::from_raw(s.child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match s.child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = s.child.kill();
                let _ = s.child.wait();
                break;
            }
        }
    }
    std::fs::read_to_string(&s.stderr_path).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Shared run state

struct Keystroke {
    typed: Instant,
    sent: Option<Instant>,
}

#[derive(Default)]
struct Observed {
    seen: HashSet<ChangeHash>,
    typed_ms: Vec<f64>,
    sent_ms: Vec<f64>,
}

struct Shared {
    doc_id: String,
    keys: Mutex<HashMap<ChangeHash, Keystroke>>,
    observed: Mutex<Observed>,
    seen: AtomicUsize,
    ready: AtomicUsize,
    failed: AtomicUsize,
    errors: Mutex<Vec<String>>,
}

impl Shared {
    fn error(&self, who: &str, what: String) {
        let mut errors = self.errors.lock().unwrap();
        if errors.len() < 1000 {
            errors.push(format!("{who}: {what}"));
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Control {
    start: Option<Instant>,
    stop: bool,
}

#[derive(Default, Debug)]
struct PeerStats {
    frames_in: u64,
    frames_out: u64,
    bytes_in: u64,
    bytes_out: u64,
    keystrokes: u64,
    skipped_ticks: u64,
    max_frame_in: u64,
    /// Change chunks received in sync messages (all peers), and the observer's new changes.
    change_chunks_in: u64,
    changes_new: u64,
    /// How late each keystroke ran after its scheduled instant (load generator saturation).
    tick_lag_ms: Vec<f64>,
}

// ---------------------------------------------------------------------------------------------
// One protocol peer

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    Typist(usize),
    Observer,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Handshake,
    Uploading,
    WaitingForCreator,
    Fetching,
    Ready,
    Typing,
    Draining,
}

struct Peer {
    name: String,
    peer_id: String,
    role: Role,
    server_id: Option<String>,
    shared: Arc<Shared>,
    doc: Automerge,
    sync: PeerSync,
    text: Option<ObjId>,
    tx: SplitSink<Ws, Message>,
    rx: SplitStream<Ws>,
    rng: Rng,
    /// Local keystrokes not yet carried by a sent sync message.
    unsent: Vec<ChangeHash>,
    last_fire: Instant,
    flush_at: Option<Instant>,
    retry_at: Option<Instant>,
    closed: bool,
    stats: PeerStats,
}

impl Peer {
    async fn connect(
        url: &str,
        role: Role,
        run_tag: &str,
        shared: Arc<Shared>,
    ) -> Result<Peer, String> {
        let name = match role {
            Role::Typist(i) => format!("typist-{i}"),
            Role::Observer => "observer".to_string(),
        };
        let (ws, _) = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async_with_config(url, Some(ws_config()), true),
        )
        .await
        .map_err(|_| format!("{name}: connect timed out"))?
        .map_err(|e| format!("{name}: connect: {e}"))?;
        let (tx, rx) = ws.split();
        Ok(Peer {
            peer_id: format!("storm-{run_tag}-{name}"),
            name,
            role,
            server_id: None,
            shared,
            doc: Automerge::new(),
            sync: PeerSync::default(),
            text: None,
            tx,
            rx,
            rng: Rng::new(),
            unsent: Vec::new(),
            last_fire: Instant::now(),
            flush_at: None,
            retry_at: None,
            closed: false,
            stats: PeerStats::default(),
        })
    }

    async fn send_frame(&mut self, msg: RepoMessage) {
        let bytes = msg.encode();
        self.stats.frames_out += 1;
        self.stats.bytes_out += bytes.len() as u64;
        if let Err(e) = self.tx.send(Message::binary(bytes)).await {
            if !self.closed {
                self.shared.error(&self.name, format!("send failed: {e}"));
            }
            self.closed = true;
        }
    }

    /// Generates and sends a sync (or request) message if there is anything to say.
    async fn send_sync(&mut self, request: bool) {
        let Some(server) = self.server_id.clone() else {
            return;
        };
        let Some(message) = self.doc.generate_sync_message(&mut self.sync.state) else {
            return;
        };
        if !self.unsent.is_empty() {
            let now = Instant::now();
            let sent_hashes = &self.sync.state.sent_hashes;
            let mut keys = self.shared.keys.lock().unwrap();
            self.unsent.retain(|h| {
                if sent_hashes.contains(h) {
                    if let Some(k) = keys.get_mut(h) {
                        k.sent.get_or_insert(now);
                    }
                    false
                } else {
                    true
                }
            });
        }
        let (sender_id, target_id, document_id, data) = (
            self.peer_id.clone(),
            server,
            self.shared.doc_id.clone(),
            message.encode(),
        );
        let msg = if request {
            RepoMessage::Request {
                sender_id,
                target_id,
                document_id,
                data,
            }
        } else {
            RepoMessage::Sync {
                sender_id,
                target_id,
                document_id,
                data,
            }
        };
        self.send_frame(msg).await;
    }

    fn find_text(&mut self) {
        if self.text.is_none() {
            if let Ok(Some((automerge::Value::Object(ObjType::Text), id))) =
                self.doc.get(ROOT, "text")
            {
                self.text = Some(id);
            }
        }
    }

    async fn on_frame(&mut self, msg: Message, arrival: Instant, phase: Phase) {
        let bytes = match msg {
            Message::Binary(b) => b,
            Message::Close(frame) => {
                self.shared
                    .error(&self.name, format!("server closed the socket: {frame:?}"));
                self.closed = true;
                return;
            }
            Message::Text(t) => {
                self.shared
                    .error(&self.name, format!("unexpected text frame: {t}"));
                return;
            }
            _ => return,
        };
        self.stats.frames_in += 1;
        self.stats.bytes_in += bytes.len() as u64;
        self.stats.max_frame_in = self.stats.max_frame_in.max(bytes.len() as u64);
        let msg = match RepoMessage::decode(&bytes) {
            Ok(m) => m,
            Err(e) => {
                self.shared
                    .error(&self.name, format!("undecodable frame: {e}"));
                return;
            }
        };
        match msg {
            RepoMessage::Peer {
                sender_id,
                selected_protocol_version,
                ..
            } => {
                if selected_protocol_version != "1" {
                    self.shared.error(
                        &self.name,
                        format!("server selected protocol {selected_protocol_version:?}"),
                    );
                }
                self.server_id = Some(sender_id);
            }
            RepoMessage::Sync {
                document_id, data, ..
            } => {
                if document_id != self.shared.doc_id {
                    self.shared.error(
                        &self.name,
                        format!("sync for another document {document_id}"),
                    );
                    return;
                }
                let message = match sync::Message::decode(&data) {
                    Ok(m) => m,
                    Err(e) => {
                        self.shared
                            .error(&self.name, format!("bad sync message: {e}"));
                        return;
                    }
                };
                let chunks = message.changes.iter().count() as u64;
                if bytes.len() > 64 * 1024 && std::env::var_os("TYPING_STORM_DEBUG").is_some() {
                    eprintln!(
                        "  debug: {} got a {} byte sync in phase {phase:?}: {} chunks of {:?} \
                         bytes, {} heads, {} need, {} have",
                        self.name,
                        bytes.len(),
                        chunks,
                        message
                            .changes
                            .iter()
                            .map(|c| c.len())
                            .take(5)
                            .collect::<Vec<_>>(),
                        message.heads.len(),
                        message.need.len(),
                        message.have.len(),
                    );
                }
                let old_heads = self.doc.get_heads();
                // Merge the changes, then do the sync bookkeeping with the relay's PeerSync:
                // automerge's receive_sync_message walks the whole history on every message,
                // which for 64 simulated clients on this machine costs more CPU than the relay
                // spends serving them (real clients each have their own device).
                if let Err(e) = self.sync.merge_and_receive(&mut self.doc, message) {
                    self.shared
                        .error(&self.name, format!("load_incremental: {e}"));
                    return;
                }
                self.stats.change_chunks_in += chunks;
                // Only the observer looks for the new changes (it costs a clock computation).
                if self.role == Role::Observer && self.doc.get_heads() != old_heads {
                    let new: Vec<ChangeHash> = self
                        .doc
                        .get_changes_meta(&old_heads)
                        .into_iter()
                        .map(|m| m.hash)
                        .collect();
                    self.stats.changes_new += new.len() as u64;
                    self.observe(new, arrival);
                }
                self.find_text();
                // Reply at once, as automerge-repo does ("respond to just this peer").
                self.send_sync(false).await;
            }
            RepoMessage::DocUnavailable { .. } => {
                if phase == Phase::Fetching {
                    // Not there yet: ask again shortly with a fresh sync state.
                    self.retry_at = Some(Instant::now() + Duration::from_millis(250));
                } else {
                    self.shared
                        .error(&self.name, format!("doc-unavailable in phase {phase:?}"));
                }
            }
            RepoMessage::Error { message, .. } => {
                self.shared
                    .error(&self.name, format!("server error message: {message}"));
            }
            RepoMessage::Request { .. } => {
                self.shared
                    .error(&self.name, "server sent a request (it should never)".into());
            }
            RepoMessage::Join { .. } => {
                self.shared.error(&self.name, "server sent a join".into());
            }
            RepoMessage::Ephemeral { .. } | RepoMessage::Ignored { .. } => {}
        }
    }

    fn observe(&mut self, new: Vec<ChangeHash>, arrival: Instant) {
        let keys = self.shared.keys.lock().unwrap();
        let mut obs = self.shared.observed.lock().unwrap();
        let mut count = 0;
        for h in new {
            let Some(k) = keys.get(&h) else { continue };
            if !obs.seen.insert(h) {
                continue;
            }
            count += 1;
            obs.typed_ms
                .push(arrival.saturating_duration_since(k.typed).as_secs_f64() * 1e3);
            if let Some(sent) = k.sent {
                obs.sent_ms
                    .push(arrival.saturating_duration_since(sent).as_secs_f64() * 1e3);
            }
        }
        self.shared.seen.fetch_add(count, Ordering::Release);
    }

    fn keystroke(&mut self, throttle: Duration) {
        let Some(text) = self.text.clone() else {
            return;
        };
        let len = self.doc.length(&text);
        // A quarter of keystrokes append, the rest land anywhere.
        let pos = if self.rng.below(4) == 0 {
            len
        } else {
            self.rng.below(len as u64 + 1) as usize
        };
        let ch = char::from(b'a' + self.rng.below(26) as u8).to_string();
        let mut tx = self.doc.transaction();
        if let Err(e) = tx.splice_text(&text, pos, 0, &ch) {
            self.shared.error(&self.name, format!("splice_text: {e}"));
            return;
        }
        let (hash, _) = tx.commit();
        let Some(hash) = hash else { return };
        let now = Instant::now();
        self.shared.keys.lock().unwrap().insert(
            hash,
            Keystroke {
                typed: now,
                sent: None,
            },
        );
        self.unsent.push(hash);
        self.stats.keystrokes += 1;
        // automerge-repo's asyncThrottle: run at lastCall + delay, or now if that has passed.
        self.flush_at = Some(now.max(self.last_fire + throttle));
    }

    fn mark_ready(&self) {
        self.shared.ready.fetch_add(1, Ordering::AcqRel);
    }

    async fn run(
        mut self,
        cfg: Arc<Config>,
        mut control: watch::Receiver<Control>,
        doc_ready: watch::Sender<bool>,
        mut doc_ready_rx: watch::Receiver<bool>,
    ) -> PeerStats {
        let setup_deadline = Instant::now() + cfg.setup;
        let period = Duration::from_secs_f64(1.0 / cfg.rate);
        let typing_for = Duration::from_secs_f64(cfg.seconds);
        let far = Instant::now() + Duration::from_secs(100_000);
        let mut phase = Phase::Handshake;
        let mut next_key = far;
        let mut typing_end = far;

        self.send_frame(RepoMessage::Join {
            sender_id: self.peer_id.clone(),
            peer_metadata: Some(PeerMetadata {
                storage_id: None,
                is_ephemeral: true,
            }),
            supported_protocol_versions: Some(vec!["1".into()]),
        })
        .await;

        loop {
            let ctl = *control.borrow();
            let now = Instant::now();
            if ctl.stop || self.closed {
                break;
            }
            // Phase transitions.
            match phase {
                Phase::Handshake if self.server_id.is_some() => {
                    if self.role == Role::Typist(0) {
                        let mut tx = self.doc.transaction();
                        if let Err(e) = tx.put_object(ROOT, "text", ObjType::Text) {
                            self.shared.error(&self.name, format!("put_object: {e}"));
                            break;
                        }
                        tx.commit();
                        self.find_text();
                        self.send_sync(false).await;
                        phase = Phase::Uploading;
                    } else {
                        phase = Phase::WaitingForCreator;
                    }
                    continue;
                }
                // The server told us it has our heads: the document is uploaded.
                Phase::Uploading
                    if self.sync.state.their_heads.as_deref()
                        == Some(&self.doc.get_heads()[..]) =>
                {
                    let _ = doc_ready.send(true);
                    self.mark_ready();
                    phase = Phase::Ready;
                    continue;
                }
                Phase::WaitingForCreator if *doc_ready_rx.borrow() => {
                    self.send_sync(true).await;
                    phase = Phase::Fetching;
                    continue;
                }
                Phase::Fetching => {
                    if self.retry_at.is_some_and(|t| now >= t) {
                        self.retry_at = None;
                        self.sync.reset();
                        self.send_sync(true).await;
                        continue;
                    }
                    let have = match self.role {
                        Role::Observer => self.doc.get(ROOT, "text").ok().flatten().is_some(),
                        Role::Typist(_) => self.text.is_some(),
                    };
                    if have {
                        self.mark_ready();
                        phase = Phase::Ready;
                        continue;
                    }
                }
                Phase::Ready => {
                    if let Some(start) = ctl.start {
                        typing_end = start + typing_for;
                        if matches!(self.role, Role::Typist(_)) {
                            // Spread the typists over one keystroke period.
                            next_key = start + period.mul_f64(self.rng.unit());
                        }
                        phase = Phase::Typing;
                        continue;
                    }
                }
                Phase::Typing if now >= typing_end => {
                    next_key = far;
                    phase = Phase::Draining;
                    continue;
                }
                _ => {}
            }
            let in_setup = matches!(
                phase,
                Phase::Handshake | Phase::Uploading | Phase::WaitingForCreator | Phase::Fetching
            );
            if in_setup && now >= setup_deadline {
                self.shared
                    .error(&self.name, format!("setup timed out in phase {phase:?}"));
                self.shared.failed.fetch_add(1, Ordering::AcqRel);
                break;
            }
            let wake_setup = if in_setup { setup_deadline } else { far };
            let retry = self.retry_at.unwrap_or(far);
            let flush = self.flush_at.unwrap_or(far);
            let typing = phase == Phase::Typing;

            tokio::select! {
                frame = self.rx.next() => {
                    let arrival = Instant::now();
                    match frame {
                        Some(Ok(msg)) => self.on_frame(msg, arrival, phase).await,
                        Some(Err(e)) => {
                            self.shared.error(&self.name, format!("socket error: {e}"));
                            self.closed = true;
                        }
                        None => {
                            self.shared.error(&self.name, "socket ended".into());
                            self.closed = true;
                        }
                    }
                }
                _ = tokio::time::sleep_until(flush.into()), if self.flush_at.is_some() => {
                    self.flush_at = None;
                    self.send_sync(false).await;
                    self.last_fire = Instant::now();
                }
                _ = tokio::time::sleep_until(next_key.into()), if typing => {
                    let lag = Instant::now().saturating_duration_since(next_key);
                    self.stats.tick_lag_ms.push(lag.as_secs_f64() * 1e3);
                    self.keystroke(cfg.throttle);
                    next_key += period;
                    // Fell behind by more than a period (overloaded machine): skip, don't burst.
                    let now = Instant::now();
                    while next_key + period < now {
                        next_key += period;
                        self.stats.skipped_ticks += 1;
                    }
                }
                _ = tokio::time::sleep_until(typing_end.into()), if typing => {}
                _ = tokio::time::sleep_until(retry.into()), if self.retry_at.is_some() => {}
                _ = tokio::time::sleep_until(wake_setup.into()), if in_setup => {}
                changed = control.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                changed = doc_ready_rx.changed(), if phase == Phase::WaitingForCreator => {
                    if changed.is_err() {
                        self.shared.error(&self.name, "creator gone".into());
                        self.shared.failed.fetch_add(1, Ordering::AcqRel);
                        break;
                    }
                }
            }
        }
        if !self.closed {
            let _ = tokio::time::timeout(Duration::from_secs(2), self.tx.close()).await;
        }
        self.stats
    }
}

// ---------------------------------------------------------------------------------------------
// One run

#[derive(Debug, Default, Clone)]
struct Summary {
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    mean: f64,
}

fn summarize(v: &mut [f64]) -> Summary {
    if v.is_empty() {
        return Summary::default();
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
        v[rank.clamp(1, v.len()) - 1]
    };
    Summary {
        p50: pct(50.0),
        p90: pct(90.0),
        p99: pct(99.0),
        max: v[v.len() - 1],
        mean: v.iter().sum::<f64>() / v.len() as f64,
    }
}

#[derive(Debug, Default, Clone)]
struct RunResult {
    server: String,
    url: String,
    typists: usize,
    expected: u64,
    typed: u64,
    flushed: u64,
    seen: u64,
    lost: u64,
    typed_lat: Summary,
    sent_lat: Summary,
    tick_lag: Summary,
    window_s: f64,
    drain_s: f64,
    server_cpu_s: Option<f64>,
    loadgen_cpu_s: Option<f64>,
    skipped_ticks: u64,
    frames_in: u64,
    frames_out: u64,
    bytes_in: u64,
    bytes_out: u64,
    max_frame_in: u64,
    change_chunks_in: u64,
    changes_new: u64,
    errors: Vec<String>,
    server_stderr_lines: Option<usize>,
    failure: Option<String>,
}

impl RunResult {
    fn cpu_pct(&self) -> Option<f64> {
        self.server_cpu_s
            .filter(|_| self.window_s > 0.0)
            .map(|c| 100.0 * c / self.window_s)
    }

    fn cpu_ms_per_key(&self) -> Option<f64> {
        self.server_cpu_s
            .filter(|_| self.typed > 0)
            .map(|c| 1e3 * c / self.typed as f64)
    }

    fn json(&self) -> serde_json::Value {
        let lat = |s: &Summary| {
            serde_json::json!({
                "p50": round(s.p50), "p90": round(s.p90), "p99": round(s.p99),
                "max": round(s.max), "mean": round(s.mean),
            })
        };
        serde_json::json!({
            "bench": "typing_storm",
            "server": self.server,
            "url": self.url,
            "typists": self.typists,
            "keystrokes_expected": self.expected,
            "keystrokes_sent": self.typed,
            "keystrokes_flushed": self.flushed,
            "keystrokes_seen": self.seen,
            "keystrokes_lost": self.lost,
            "latency_typed_ms": lat(&self.typed_lat),
            "latency_sent_ms": lat(&self.sent_lat),
            "loadgen_tick_lag_ms": lat(&self.tick_lag),
            "window_s": round3(self.window_s),
            "drain_s": round3(self.drain_s),
            "server_cpu_s": self.server_cpu_s.map(round3),
            "server_cpu_pct_of_core": self.cpu_pct().map(round),
            "server_cpu_ms_per_keystroke": self.cpu_ms_per_key().map(round3),
            "loadgen_cpu_s": self.loadgen_cpu_s.map(round3),
            "skipped_ticks": self.skipped_ticks,
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "max_frame_in": self.max_frame_in,
            "change_chunks_in": self.change_chunks_in,
            "observer_changes_new": self.changes_new,
            "errors": self.errors.len(),
            "first_errors": self.errors.iter().take(5).collect::<Vec<_>>(),
            "server_stderr_lines": self.server_stderr_lines,
            "failure": self.failure,
        })
    }
}

fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

async fn storm(
    cfg: Arc<Config>,
    server: &str,
    url: &str,
    pid: Option<u32>,
    typists: usize,
) -> RunResult {
    let mut rng = Rng::new();
    let run_tag = format!("{:08x}", rng.next_u64() as u32);
    let shared = Arc::new(Shared {
        doc_id: new_document_id(&mut rng),
        keys: Mutex::new(HashMap::new()),
        observed: Mutex::new(Observed::default()),
        seen: AtomicUsize::new(0),
        ready: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        errors: Mutex::new(Vec::new()),
    });
    let mut result = RunResult {
        server: server.to_string(),
        url: url.to_string(),
        typists,
        expected: (typists as f64 * cfg.rate * cfg.seconds).round() as u64,
        ..RunResult::default()
    };

    // Connect everyone (observer last, so it is peer number T).
    let roles: Vec<Role> = (0..typists)
        .map(Role::Typist)
        .chain(std::iter::once(Role::Observer))
        .collect();
    let connects = roles
        .iter()
        .map(|&role| Peer::connect(url, role, &run_tag, shared.clone()));
    let mut peers = Vec::new();
    for p in futures_util::future::join_all(connects).await {
        match p {
            Ok(p) => peers.push(p),
            Err(e) => {
                result.failure = Some(e);
                return result;
            }
        }
    }
    let n = peers.len();
    let (control_tx, control_rx) = watch::channel(Control::default());
    let (doc_ready_tx, doc_ready_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    for p in peers {
        tasks.push(tokio::spawn(p.run(
            cfg.clone(),
            control_rx.clone(),
            doc_ready_tx.clone(),
            doc_ready_rx.clone(),
        )));
    }
    drop(doc_ready_tx);

    // Wait until every peer has the document.
    let setup_deadline = Instant::now() + cfg.setup + Duration::from_secs(1);
    let setup_started = Instant::now();
    while shared.ready.load(Ordering::Acquire) < n
        && shared.failed.load(Ordering::Acquire) == 0
        && Instant::now() < setup_deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ready = shared.ready.load(Ordering::Acquire);
    if ready < n {
        result.failure = Some(format!(
            "setup: only {ready} of {n} peers got the document within {:.0} s",
            setup_started.elapsed().as_secs_f64()
        ));
    } else {
        eprintln!(
            "  [{server} T={typists}] {n} peers synced in {:.0} ms; typing for {} s",
            setup_started.elapsed().as_secs_f64() * 1e3,
            cfg.seconds
        );
        // A typist's throttle counts from its creation, as automerge-repo's does (its
        // `throttle` starts with `lastCall = Date.now()`), so a keystroke within one throttle
        // interval of the connection waits for the rest of it. A person types long after
        // opening a document: without this pause the first keystroke of every typist (4 of 240
        // at T=4) waited up to 100 ms on the client, and those were the p99 from the keystroke.
        tokio::time::sleep(cfg.throttle).await;
        let cpu0 = pid.map(cpu_secs);
        let self_cpu0 = Some(cpu_secs(std::process::id()));
        let start = Instant::now();
        control_tx.send_modify(|c| c.start = Some(start));
        let typing_end = start + Duration::from_secs_f64(cfg.seconds);
        tokio::time::sleep_until((typing_end + Duration::from_millis(50)).into()).await;
        // Drain: bounded wait until the observer has seen every keystroke.
        let drain_deadline = Instant::now() + cfg.drain;
        loop {
            let typed = shared.keys.lock().unwrap().len();
            let seen = shared.seen.load(Ordering::Acquire);
            if seen >= typed || Instant::now() >= drain_deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let end = Instant::now();
        let cpu1 = pid.map(cpu_secs);
        let self_cpu1 = Some(cpu_secs(std::process::id()));
        result.window_s = (end - start).as_secs_f64();
        result.drain_s = end.saturating_duration_since(typing_end).as_secs_f64();
        result.server_cpu_s = cpu0.zip(cpu1).map(|(a, b)| b - a);
        result.loadgen_cpu_s = self_cpu0.zip(self_cpu1).map(|(a, b)| b - a);
    }

    control_tx.send_modify(|c| c.stop = true);
    let mut tick_lags = Vec::new();
    for t in tasks {
        let abort = t.abort_handle();
        match tokio::time::timeout(Duration::from_secs(5), t).await {
            Ok(Ok(mut s)) => {
                tick_lags.append(&mut s.tick_lag_ms);
                result.skipped_ticks += s.skipped_ticks;
                result.frames_in += s.frames_in;
                result.frames_out += s.frames_out;
                result.bytes_in += s.bytes_in;
                result.bytes_out += s.bytes_out;
                result.max_frame_in = result.max_frame_in.max(s.max_frame_in);
                result.change_chunks_in += s.change_chunks_in;
                result.changes_new += s.changes_new;
            }
            Ok(Err(e)) => shared.error("task", format!("peer task failed: {e}")),
            Err(_) => {
                abort.abort();
                shared.error("task", "peer task did not stop within 5 s".into());
            }
        }
    }

    let keys = shared.keys.lock().unwrap();
    let mut obs = shared.observed.lock().unwrap();
    result.typed = keys.len() as u64;
    result.flushed = keys.values().filter(|k| k.sent.is_some()).count() as u64;
    result.seen = obs.seen.len() as u64;
    result.lost = result.typed.saturating_sub(result.seen);
    result.typed_lat = summarize(&mut obs.typed_ms);
    result.sent_lat = summarize(&mut obs.sent_ms);
    result.tick_lag = summarize(&mut tick_lags);
    result.errors = shared.errors.lock().unwrap().clone();
    result
}

// ---------------------------------------------------------------------------------------------
// Report

fn fmt_opt(v: Option<f64>, decimals: usize) -> String {
    v.map(|x| format!("{x:.decimals$}"))
        .unwrap_or_else(|| "-".into())
}

fn print_table(results: &[RunResult]) {
    println!();
    println!(
        "{:<10} {:>3} {:>6} {:>6} {:>6} {:>5} | {:>7} {:>7} {:>7} {:>7} | {:>7} {:>7} | {:>7} {:>6} {:>7} {:>6} {:>6} | {:>4}",
        "server", "T", "exp", "sent", "seen", "lost", "p50", "p90", "p99", "max", "s.p50", "s.p99",
        "cpu s", "%core", "ms/key", "gen s", "lag99", "errs"
    );
    println!("{}", "-".repeat(147));
    for r in results {
        if let Some(f) = &r.failure {
            println!("{:<10} {:>3} FAILED: {f}", r.server, r.typists);
            continue;
        }
        println!(
            "{:<10} {:>3} {:>6} {:>6} {:>6} {:>5} | {:>7.1} {:>7.1} {:>7.1} {:>7.1} | {:>7.1} {:>7.1} | {:>7} {:>6} {:>7} {:>6} {:>6.0} | {:>4}",
            r.server,
            r.typists,
            r.expected,
            r.typed,
            r.seen,
            r.lost,
            r.typed_lat.p50,
            r.typed_lat.p90,
            r.typed_lat.p99,
            r.typed_lat.max,
            r.sent_lat.p50,
            r.sent_lat.p99,
            fmt_opt(r.server_cpu_s, 2),
            fmt_opt(r.cpu_pct(), 0),
            fmt_opt(r.cpu_ms_per_key(), 2),
            fmt_opt(r.loadgen_cpu_s, 1),
            r.tick_lag.p99,
            r.errors.len(),
        );
    }
    println!(
        "exp = T x rate x seconds; sent < exp or a large lag99 (p99 ms by which keystrokes ran late) \
         means the load generator fell behind (gen s = its CPU-seconds). Latency in ms, keystroke -> observer (p50..max, includes the 100 ms \
         client throttle) and sent -> observer (s.p50, s.p99). cpu = server utime+stime over \
         typing + drain"
    );
}

#[tokio::main]
async fn main() {
    let cfg = match parse_args() {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("typing_storm: {e}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    let mut results = Vec::new();
    for target in &cfg.targets {
        for &t in &cfg.typists {
            let result = match target {
                Target::Url { url, pid, label } => storm(cfg.clone(), label, url, *pid, t).await,
                Target::Relay(_) | Target::Reference | Target::Samod(_) => {
                    let name = match target {
                        Target::Relay(_) => "relay",
                        Target::Samod(_) => "samod",
                        _ => "reference",
                    };
                    match spawn_server(&cfg, target) {
                        Err(e) => RunResult {
                            server: name.into(),
                            typists: t,
                            failure: Some(e),
                            ..RunResult::default()
                        },
                        Ok(spawned) => {
                            let url = spawned.url.clone();
                            let pid = spawned.child.id();
                            eprintln!("  [{name} T={t}] started pid {pid} at {url}");
                            let mut r = storm(cfg.clone(), name, &url, Some(pid), t).await;
                            let stderr = stop_server(spawned);
                            let lines: Vec<&str> = stderr.lines().collect();
                            r.server_stderr_lines = Some(lines.len());
                            if !lines.is_empty() {
                                eprintln!(
                                    "  [{name} T={t}] server stderr: {} lines, last ones:",
                                    lines.len()
                                );
                                for l in &lines[lines.len().saturating_sub(15)..] {
                                    eprintln!("    | {l}");
                                }
                            }
                            r
                        }
                    }
                }
            };
            if !result.errors.is_empty() {
                eprintln!(
                    "  [{} T={}] {} client-side errors, first ones:",
                    result.server,
                    t,
                    result.errors.len()
                );
                for e in result.errors.iter().take(10) {
                    eprintln!("    ! {e}");
                }
            }
            println!("{}", result.json());
            results.push(result);
        }
    }
    print_table(&results);
}
