//! Cluster benchmark (issue: scale-out). Run: `cargo bench --bench cluster` (release build).
//!
//! Several relay nodes share one PostgreSQL store and pass each other persisted changes over
//! Redis. In ONE run this starts, by pid, one relay on the default sled store ("sled") and
//! `CLUSTER_NODES` relays A, B, C… on one PostgreSQL database with Redis fan-out, and
//! compares:
//!
//! 1. **Fan-out**: one HTTP writer posts to node A; N per-document WebSocket subscribers on
//!    node B ("pg A->B"), split over B and C ("pg A->B,C"), on A itself ("pg x1", same store
//!    and cluster, no hop between nodes) and on the sled node ("sled"). Latency = receipt at a
//!    subscriber − the writer's 2xx ("ack", clamped at 0; receipts before the 2xx are counted
//!    as "early") and − the moment the POST was sent ("send"). Issue target: cross-node p99
//!    at most 100 ms above single-node.
//! 2. **P4, concurrent writers**: W writers (forks of one small document) POST one
//!    incremental change each at a time for S seconds, as `benches/merge.rs` case (c) but
//!    with incremental bodies: acknowledged changes/s, write latency p50/p99, the owners'
//!    average batch (`/_/stats`), spread round-robin over every PostgreSQL node ("pg xN")
//!    vs all on node A ("pg x1") vs the sled node. Afterwards every node must serve every
//!    writer's last change.
//! 3. **Typing storm**: T typists on per-document WebSockets (not the repo protocol of
//!    `benches/typing_storm.rs`, and no client throttle: every keystroke is sent at once),
//!    each inserting `RATE` characters/s at random positions of one text and merging what
//!    the others type; keystroke → every other typist's receipt, keystroke → own ack, and
//!    relay CPU per keystroke summed over the nodes. All on sled, all on A, round-robin over
//!    every PostgreSQL node.
//! 4. **P2, incremental upload**: p50/p99 of one change POSTed into an existing document
//!    (map- and list-shaped, `CLUSTER_HISTORY` changes; `benches/merge.rs` case (b)), sled
//!    vs PostgreSQL node A.
//!
//! CPU is utime+stime from `/proc/<pid>/stat` over each case's window: relays (the sled node
//! for sled rows, the sum over all PostgreSQL nodes for pg rows; idle nodes add ~0), this
//! load generator (all its threads, so a saturated generator shows), and every `postgres`
//! and `redis-server` process on the machine. The machine has 2 cores: these compete.
//!
//! The bench exits non-zero when a subscriber or typist misses a change, a write fails, or
//! the nodes do not converge. It creates database `relay_bench_<pid>_<micros>` and uses
//! fan-out prefix `bench-cluster:<pid>_<micros>:`; both are removed at the end.
//!
//! Environment (defaults in brackets):
//! - `BENCH_DATABASE_URL` [postgres://postgres@127.0.0.1:5432/test] a database to connect
//!   to for CREATE/DROP DATABASE; `BENCH_REDIS_URL` [redis://127.0.0.1:6379]
//! - `CLUSTER_NODES` [3] PostgreSQL nodes (at least 2); `CLUSTER_HEADS_CHECK_SECS` [30]
//!   their `--heads-check-secs` (the relay's default)
//! - `CLUSTER_SUBSCRIBERS` [200], `CLUSTER_FANOUT_WRITES` [100], `CLUSTER_FANOUT_RATE` [20]
//!   writes/s; 5 warm-up writes per case are sent and awaited first, not counted
//! - `CLUSTER_WRITERS` [32], `CLUSTER_WRITE_SECS` [5]
//! - `CLUSTER_TYPISTS` [8], `CLUSTER_TYPING_SECS` [10], `CLUSTER_TYPING_RATE` [6]
//! - `CLUSTER_UPLOAD_SAMPLES` [200], `CLUSTER_HISTORY` [20000]
//! - `CLUSTER_ONLY` [fanout,writers,typing,upload] which parts to run
//! - `CLUSTER_DEBUG` set: per typing case, where keystroke deliveries over 15 ms fall by
//!   (receiver − author) mod T and by receiver (a pattern points at a mechanism)
//! - `BENCH_RELAY_BIN`, `BENCH_RELAY_WRAP`, `BENCH_RELAY_TOKEN` as in `benches/support`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use automerge::transaction::Transactable;
use automerge::{AutoCommit, Automerge, Change, ChangeHash, ObjId, ObjType, ReadDoc, ROOT};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

mod support;
use support::{
    auth_token, cpu_by_name, cpu_secs, http_client, ms, small_change, stats, ws_config, Relay,
};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Longest any single request of the load generator may take.
const REQUEST_BOUND: Duration = Duration::from_secs(30);
/// Warm-up writes per fan-out case (connections, pools, Redis subscriptions), not counted.
const WARMUP_WRITES: usize = 5;

// ---------------------------------------------------------------------------------------------
// Configuration

struct Config {
    db_url: String,
    redis_url: String,
    nodes: usize,
    heads_check_secs: u64,
    subscribers: usize,
    fanout_writes: usize,
    fanout_rate: f64,
    writers: usize,
    write_secs: f64,
    typists: usize,
    typing_secs: f64,
    typing_rate: f64,
    samples: usize,
    history: usize,
    only: Vec<String>,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")),
        _ => default,
    }
}

impl Config {
    fn from_env() -> Config {
        let only: String = env_or("CLUSTER_ONLY", "fanout,writers,typing,upload".to_string());
        let cfg = Config {
            db_url: env_or(
                "BENCH_DATABASE_URL",
                "postgres://postgres@127.0.0.1:5432/test".to_string(),
            ),
            redis_url: env_or("BENCH_REDIS_URL", "redis://127.0.0.1:6379".to_string()),
            nodes: env_or("CLUSTER_NODES", 3),
            heads_check_secs: env_or("CLUSTER_HEADS_CHECK_SECS", 30),
            subscribers: env_or("CLUSTER_SUBSCRIBERS", 200),
            fanout_writes: env_or("CLUSTER_FANOUT_WRITES", 100),
            fanout_rate: env_or("CLUSTER_FANOUT_RATE", 20.0),
            writers: env_or("CLUSTER_WRITERS", 32),
            write_secs: env_or("CLUSTER_WRITE_SECS", 5.0),
            typists: env_or("CLUSTER_TYPISTS", 8),
            typing_secs: env_or("CLUSTER_TYPING_SECS", 10.0),
            typing_rate: env_or("CLUSTER_TYPING_RATE", 6.0),
            samples: env_or("CLUSTER_UPLOAD_SAMPLES", 200),
            history: env_or("CLUSTER_HISTORY", 20_000),
            only: only.split(',').map(|s| s.trim().to_string()).collect(),
        };
        assert!(cfg.nodes >= 2, "CLUSTER_NODES must be at least 2");
        assert!(cfg.subscribers >= 1 && cfg.fanout_writes >= 1 && cfg.fanout_rate > 0.0);
        assert!(cfg.writers >= 1 && cfg.write_secs > 0.0);
        assert!(cfg.typists >= 2, "CLUSTER_TYPISTS must be at least 2");
        assert!(cfg.typing_rate > 0.0 && cfg.typing_secs > 0.0 && cfg.samples >= 1);
        cfg
    }

    fn runs(&self, part: &str) -> bool {
        self.only.iter().any(|p| p == part)
    }
}

/// `<pid>_<microseconds since the epoch>`: unique per run on this machine.
fn unique() -> String {
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0);
    format!("{}_{}", std::process::id(), micros)
}

// ---------------------------------------------------------------------------------------------
// The benchmark's own database and Redis prefix

/// `url` naming database `name` instead (user, host, port and query kept).
fn with_database(url: &str, name: &str) -> String {
    let start = url.find("://").map(|i| i + 3).expect("a postgres:// URL");
    let (base, query) = match url.find('?') {
        Some(q) => (&url[..q], &url[q..]),
        None => (url, ""),
    };
    let authority_end = base[start..].find('/').map_or(base.len(), |i| start + i);
    format!("{}/{name}{query}", &base[..authority_end])
}

/// The URL without its password, for messages.
fn redacted(url: &str) -> String {
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let end = url[start..].find('/').map_or(url.len(), |i| start + i);
    match url[start..end].rsplit_once('@') {
        Some((user, host)) => {
            let user = user.split(':').next().unwrap_or("");
            format!("{}{user}@{host}{}", &url[..start], &url[end..])
        }
        None => url.to_string(),
    }
}

async fn pg_connect(url: &str) -> Result<tokio_postgres::Client, String> {
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|e| format!("bad PostgreSQL URL {}: {e}", redacted(url)))?;
    config.connect_timeout(Duration::from_secs(10));
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("connect to {}: {e}", redacted(url)))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

struct BenchDb {
    admin_url: String,
    name: String,
    url: String,
}

impl BenchDb {
    async fn create(admin_url: &str) -> Result<BenchDb, String> {
        let name = format!("relay_bench_{}", unique());
        let admin = pg_connect(admin_url).await?;
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .map_err(|e| format!("CREATE DATABASE {name}: {e}"))?;
        Ok(BenchDb {
            admin_url: admin_url.to_string(),
            url: with_database(admin_url, &name),
            name,
        })
    }

    async fn drop_db(&self) -> Result<(), String> {
        let admin = pg_connect(&self.admin_url).await?;
        admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            ))
            .await
            .map_err(|e| format!("DROP DATABASE {}: {e}", self.name))?;
        let left = admin
            .query(
                "SELECT 1 FROM pg_database WHERE datname = $1",
                &[&self.name],
            )
            .await
            .map_err(|e| e.to_string())?;
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("database {} still exists", self.name))
        }
    }
}

async fn redis_conn(url: &str) -> Result<redis::aio::MultiplexedConnection, String> {
    let client = redis::Client::open(url).map_err(|e| format!("bad Redis URL: {e}"))?;
    let mut conn = tokio::time::timeout(
        Duration::from_secs(10),
        client.get_multiplexed_async_connection(),
    )
    .await
    .map_err(|_| "connecting to Redis timed out".to_string())?
    .map_err(|e| format!("connect to Redis: {e}"))?;
    let pong: String = redis::cmd("PING")
        .query_async(&mut conn)
        .await
        .map_err(|e| format!("Redis PING: {e}"))?;
    if pong != "PONG" {
        return Err(format!("Redis answered {pong:?} to PING"));
    }
    Ok(conn)
}

/// Deletes every Redis key under `prefix` (the relay should leave none: its fan-out is
/// pub/sub only) and reports (keys deleted, channels under the prefix still subscribed).
async fn redis_cleanup(url: &str, prefix: &str) -> Result<(usize, usize), String> {
    let mut conn = redis_conn(url).await?;
    let pattern = format!("{prefix}*");
    let mut cursor: u64 = 0;
    let mut keys = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .map_err(|e| format!("SCAN: {e}"))?;
        keys.extend(batch);
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    for key in &keys {
        let _: i64 = redis::cmd("DEL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .map_err(|e| format!("DEL: {e}"))?;
    }
    let channels: Vec<String> = redis::cmd("PUBSUB")
        .arg("CHANNELS")
        .arg(&pattern)
        .query_async(&mut conn)
        .await
        .map_err(|e| format!("PUBSUB CHANNELS: {e}"))?;
    Ok((keys.len(), channels.len()))
}

// ---------------------------------------------------------------------------------------------
// Measuring

#[derive(Clone, Copy, Default)]
struct Lat {
    p50: f64,
    p99: f64,
    max: f64,
    /// How many samples fall under each of [`BUCKETS`] (and over the last).
    hist: [usize; BUCKETS.len() + 1],
}

/// Upper bounds (ms) of the latency histogram printed beside the tables.
const BUCKETS: [f64; 7] = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0];

impl Lat {
    fn histogram(&self) -> String {
        let mut parts: Vec<String> = BUCKETS
            .iter()
            .zip(&self.hist)
            .map(|(b, n)| format!("<{b}:{n}"))
            .collect();
        parts.push(format!(">=100:{}", self.hist[BUCKETS.len()]));
        parts.join(" ")
    }
}

/// Nearest-rank percentiles (ms values in, ms out).
fn lat(v: &mut [f64]) -> Lat {
    if v.is_empty() {
        return Lat {
            p50: f64::NAN,
            p99: f64::NAN,
            max: f64::NAN,
            hist: [0; BUCKETS.len() + 1],
        };
    }
    let mut hist = [0; BUCKETS.len() + 1];
    for x in v.iter() {
        hist[BUCKETS.iter().position(|b| x < b).unwrap_or(BUCKETS.len())] += 1;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        let rank = (p * v.len() as f64).ceil() as usize;
        v[rank.clamp(1, v.len()) - 1]
    };
    Lat {
        p50: pct(0.50),
        p99: pct(0.99),
        max: v[v.len() - 1],
        hist,
    }
}

/// CPU seconds at one instant: the relays given, this process, PostgreSQL and Redis.
struct CpuMark {
    relays: f64,
    generator: f64,
    services: HashMap<u32, (String, f64)>,
    at: Instant,
}

#[derive(Clone, Copy, Default)]
struct CpuUse {
    secs: f64,
    relays: f64,
    generator: f64,
    postgres: f64,
    redis: f64,
}

impl CpuUse {
    fn cores(&self, cpu: f64) -> f64 {
        cpu / self.secs.max(1e-9)
    }
}

fn cpu_mark(relays: &[u32]) -> CpuMark {
    CpuMark {
        relays: relays.iter().map(|&p| cpu_secs(p)).sum(),
        generator: cpu_secs(std::process::id()),
        services: cpu_by_name(&["postgres", "redis-server"]),
        at: Instant::now(),
    }
}

fn cpu_since(before: &CpuMark, relays: &[u32]) -> CpuUse {
    let after = cpu_mark(relays);
    let (mut postgres, mut redis) = (0.0, 0.0);
    for (pid, (comm, secs)) in &after.services {
        let was = before.services.get(pid).map_or(0.0, |(_, s)| *s);
        let d = (secs - was).max(0.0);
        if comm == "postgres" {
            postgres += d;
        } else {
            redis += d;
        }
    }
    CpuUse {
        secs: (after.at - before.at).as_secs_f64(),
        relays: after.relays - before.relays,
        generator: after.generator - before.generator,
        postgres,
        redis,
    }
}

/// The hashes of the changes in a message the relay pushed: change chunks, or every change
/// of a document chunk (a catch-up).
fn hashes_in(bytes: &[u8]) -> Vec<ChangeHash> {
    let Ok(chunks) = automerge_relay::split_chunks(bytes) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (kind, chunk) in chunks {
        if kind == 0 {
            if let Ok(doc) = Automerge::load(chunk) {
                out.extend(doc.get_changes(&[]).iter().map(|c| c.hash()));
            }
        } else if let Ok(c) = Change::try_from(chunk) {
            out.push(c.hash());
        }
    }
    out
}

/// The relay's fan-out counters (Prometheus text), summed by series.
async fn fanout_metrics(c: &reqwest::Client, port: u16) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    let Ok(Ok(r)) = tokio::time::timeout(
        REQUEST_BOUND,
        c.get(format!("http://127.0.0.1:{port}/_/metrics")).send(),
    )
    .await
    else {
        return out;
    };
    let text = r.text().await.unwrap_or_default();
    for line in text.lines() {
        if line.starts_with('#') || !line.starts_with("relay_") {
            continue;
        }
        if let Some((series, value)) = line.rsplit_once(' ') {
            if let Ok(v) = value.parse::<f64>() {
                out.insert(series.to_string(), v);
            }
        }
    }
    out
}

/// What passed between the nodes during one case (deltas summed over the nodes).
#[derive(Clone, Copy, Default)]
struct FanoutCounters {
    published: f64,
    publish_failures: f64,
    received: f64,
    applied: f64,
    /// Read-backs from the store (`relay_fanout_catchups_total`), by what they found.
    catchups_changes: f64,
    catchups_deleted: f64,
    /// From `/_/stats`: snapshots written, documents loaded from the store.
    compactions: f64,
    loads: f64,
}

async fn counters_of(c: &reqwest::Client, ports: &[u16]) -> Vec<HashMap<String, f64>> {
    let mut out = Vec::new();
    for &p in ports {
        let mut m = fanout_metrics(c, p).await;
        // And the owners' counters of compactions and loads from the store.
        let s = stats(c, p).await;
        for k in ["compactions", "loads"] {
            m.insert(format!("stats:{k}"), s[k].as_u64().unwrap_or(0) as f64);
        }
        out.push(m);
    }
    out
}

fn counters_delta(
    before: &[HashMap<String, f64>],
    after: &[HashMap<String, f64>],
) -> FanoutCounters {
    let mut d = FanoutCounters::default();
    for (b, a) in before.iter().zip(after) {
        for (series, v) in a {
            let x = v - b.get(series).copied().unwrap_or(0.0);
            let name = series.split('{').next().unwrap_or("");
            match name {
                "relay_fanout_published_total" => d.published += x,
                "relay_fanout_publish_failures_total" => d.publish_failures += x,
                "relay_fanout_received_total" => d.received += x,
                "relay_fanout_applied_total" => d.applied += x,
                "relay_fanout_catchups_total" if series.contains("deleted") => {
                    d.catchups_deleted += x
                }
                "relay_fanout_catchups_total" => d.catchups_changes += x,
                "stats:compactions" => d.compactions += x,
                "stats:loads" => d.loads += x,
                _ => {}
            }
        }
    }
    d
}

/// The owners' batch counters from `/_/stats`, summed over nodes.
#[derive(Clone, Copy, Default)]
struct Batches {
    batches: f64,
    writes: f64,
    persists: f64,
    persist_micros: f64,
}

async fn batches_of(c: &reqwest::Client, ports: &[u16]) -> Batches {
    let mut b = Batches::default();
    for &p in ports {
        let s = stats(c, p).await;
        let g = |k: &str| s[k].as_u64().unwrap_or(0) as f64;
        b.batches += g("batches");
        b.writes += g("batched_writes");
        b.persists += g("persists");
        b.persist_micros += g("persist_micros");
    }
    b
}

// ---------------------------------------------------------------------------------------------
// Clients

async fn ws_connect(port: u16, id: &str) -> Result<Ws, String> {
    let mut request = format!("ws://127.0.0.1:{port}/{id}")
        .into_client_request()
        .map_err(|e| e.to_string())?;
    if let Some(token) = auth_token() {
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {token}")
                .parse()
                .expect("a token usable in a header"),
        );
    }
    // Nagle off, as browsers do: the latency measured is the relay's, not the client's.
    let (ws, _) = tokio::time::timeout(
        REQUEST_BOUND,
        tokio_tungstenite::connect_async_with_config(request, Some(ws_config()), true),
    )
    .await
    .map_err(|_| format!("WebSocket connect to port {port} timed out"))?
    .map_err(|e| format!("WebSocket connect to port {port}: {e}"))?;
    Ok(ws)
}

/// POSTs `body`; the response JSON, or why not 2xx.
async fn post(
    c: &reqwest::Client,
    port: u16,
    id: &str,
    body: Vec<u8>,
) -> Result<serde_json::Value, String> {
    let send = c
        .post(format!("http://127.0.0.1:{port}/{id}"))
        .body(body)
        .send();
    let r = tokio::time::timeout(REQUEST_BOUND, send)
        .await
        .map_err(|_| format!("POST /{id} on port {port} timed out"))?
        .map_err(|e| format!("POST /{id} on port {port}: {e}"))?;
    let status = r.status();
    let text = r.text().await.unwrap_or_default();
    if !status.is_success() {
        return Err(format!("POST /{id} on port {port}: {status} {text}"));
    }
    serde_json::from_str(&text).map_err(|e| format!("POST /{id}: bad JSON {text:?}: {e}"))
}

/// The document's heads as node `port` serves it, sorted (None if it cannot be read).
async fn served_heads(c: &reqwest::Client, port: u16, id: &str) -> Option<Vec<ChangeHash>> {
    let get = c.get(format!("http://127.0.0.1:{port}/{id}")).send();
    let r = tokio::time::timeout(REQUEST_BOUND, get).await.ok()?.ok()?;
    if !r.status().is_success() {
        return None;
    }
    let bytes = r.bytes().await.ok()?;
    let mut heads = Automerge::load(&bytes).ok()?.get_heads();
    heads.sort();
    Some(heads)
}

/// Waits (bounded) until every node serves `expected` heads; how long that took, or the
/// nodes that did not.
async fn converge(
    c: &reqwest::Client,
    ports: &[u16],
    id: &str,
    expected: &[ChangeHash],
    bound: Duration,
) -> Result<Duration, String> {
    let mut expected = expected.to_vec();
    expected.sort();
    let start = Instant::now();
    loop {
        let mut behind = Vec::new();
        for &p in ports {
            if served_heads(c, p, id).await.as_deref() != Some(&expected[..]) {
                behind.push(p);
            }
        }
        if behind.is_empty() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > bound {
            return Err(format!(
                "nodes on ports {behind:?} do not serve the expected heads of {id} after {bound:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn list_doc(first: &str) -> (AutoCommit, ObjId) {
    let mut doc = AutoCommit::new();
    let list = doc.put_object(ROOT, "items", ObjType::List).unwrap();
    doc.insert(&list, 0, first).unwrap();
    doc.commit();
    (doc, list)
}

// ---------------------------------------------------------------------------------------------
// The nodes

struct Node {
    name: String,
    relay: Relay,
}

struct Nodes {
    sled: Node,
    pg: Vec<Node>,
}

impl Nodes {
    fn pg_pids(&self) -> Vec<u32> {
        self.pg.iter().map(|n| n.relay.pid()).collect()
    }

    fn pg_ports(&self) -> Vec<u16> {
        self.pg.iter().map(|n| n.relay.port).collect()
    }

    fn name_of(&self, port: u16) -> String {
        std::iter::once(&self.sled)
            .chain(&self.pg)
            .find(|n| n.relay.port == port)
            .map_or_else(|| port.to_string(), |n| n.name.clone())
    }
}

fn start_nodes(cfg: &Config, store: &str, prefix: &str) -> Nodes {
    let sled = Node {
        name: "S".into(),
        relay: Relay::start(&[]),
    };
    let heads = cfg.heads_check_secs.to_string();
    let args = [
        "--store",
        store,
        "--fanout",
        &cfg.redis_url,
        "--fanout-prefix",
        prefix,
        "--heads-check-secs",
        &heads,
    ];
    let pg = (0..cfg.nodes)
        .map(|i| Node {
            name: ((b'A' + i as u8) as char).to_string(),
            relay: Relay::start(&args),
        })
        .collect();
    Nodes { sled, pg }
}

/// Waits (bounded) until every PostgreSQL node's fan-out works: a subscriber on each node
/// receives a change written on the next node (a document watched before a node's Redis
/// connection is up would miss what is published until the next heads check). A change is
/// written every second until one arrives. Returns notes on what the nodes' metrics said
/// meanwhile (`relay_fanout_connected`).
async fn wait_fanout_working(c: &reqwest::Client, nodes: &Nodes) -> Result<Vec<String>, String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let ports = nodes.pg_ports();
    let mut notes = Vec::new();
    for (i, n) in nodes.pg.iter().enumerate() {
        let writer = ports[(i + 1) % ports.len()];
        let id = format!("probe-{}-{}", n.name, unique());
        let (mut doc, list) = list_doc("probe");
        post(c, writer, &id, doc.save()).await?;
        let mut ws = ws_connect(n.relay.port, &id).await?;
        // The whole document first.
        let first = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
        if !matches!(first, Ok(Some(Ok(Message::Binary(_))))) {
            return Err(format!(
                "probe: node {} sent no document: {first:?}",
                n.name
            ));
        }
        let started = Instant::now();
        let mut k = 0;
        'probe: loop {
            let heads = doc.get_heads();
            doc.insert(&list, 0, format!("probe {k}")).unwrap();
            doc.commit();
            k += 1;
            post(c, writer, &id, doc.save_after(&heads)).await?;
            let next_try = Instant::now() + Duration::from_secs(1);
            while Instant::now() < next_try {
                let left = next_try.saturating_duration_since(Instant::now());
                if let Ok(Some(Ok(Message::Binary(_)))) =
                    tokio::time::timeout(left, ws.next()).await
                {
                    break 'probe;
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "node {}: a subscriber got nothing written on node {} within 20 s",
                    n.name,
                    nodes.name_of(writer)
                ));
            }
        }
        let _ = ws.close(None).await;
        if k > 1 {
            notes.push(format!(
                "node {}: the first {} probe changes were not delivered ({:.0} ms until one was)",
                n.name,
                k - 1,
                ms(started.elapsed())
            ));
        }
        let m = fanout_metrics(c, n.relay.port).await;
        if m.get("relay_fanout_connected") != Some(&1.0) {
            notes.push(format!(
                "node {}: fan-out works but /_/metrics has relay_fanout_connected = {:?}",
                n.name,
                m.get("relay_fanout_connected")
            ));
        }
    }
    Ok(notes)
}

// ---------------------------------------------------------------------------------------------
// Cases

/// What every case reads: the configuration, the HTTP client, the nodes.
struct Ctx<'a> {
    cfg: &'a Config,
    c: reqwest::Client,
    nodes: &'a Nodes,
}

/// One row of a part: where its clients go and whose CPU counts.
struct Case {
    label: String,
    /// The fan-out writer's node.
    writer: u16,
    /// The nodes the clients use, round-robin (for fan-out: the subscribers').
    ports: Vec<u16>,
    /// The relays whose CPU counts: the sled node, or every PostgreSQL node.
    pids: Vec<u32>,
    /// A PostgreSQL case: fan-out counters are read, every node must converge.
    pg: bool,
}

// ---------------------------------------------------------------------------------------------
// (1) Fan-out

struct FanoutRow {
    label: String,
    subs_on: String,
    expected: usize,
    delivered: usize,
    duplicates: usize,
    early: usize,
    ack: Lat,
    send: Lat,
    post: Lat,
    cpu: CpuUse,
    writes: usize,
    counters: Option<FanoutCounters>,
    setup_ms: f64,
}

type Receipts = Arc<Mutex<Vec<(usize, Bytes, Instant)>>>;

/// Per subscriber, the first receipt of each change hash; and how many receipts repeated one.
fn sort_receipts(
    raw: Vec<(usize, Bytes, Instant)>,
    subs: usize,
) -> (Vec<HashMap<ChangeHash, Instant>>, usize) {
    let mut got = vec![HashMap::new(); subs];
    let mut dups = 0;
    for (i, bytes, at) in raw {
        for h in hashes_in(&bytes) {
            if got[i].insert(h, at).is_some() {
                dups += 1;
            }
        }
    }
    (got, dups)
}

/// Waits (bounded) until every subscriber has received every hash in `wanted` (parsing only
/// once the raw message count says it may be so). Returns the sorted receipts.
async fn await_deliveries(
    received: &Receipts,
    count: &AtomicUsize,
    subs: usize,
    wanted: &[ChangeHash],
    bound: Duration,
    mark: Option<(&CpuMark, &[u32])>,
) -> (Vec<HashMap<ChangeHash, Instant>>, usize, Option<CpuUse>) {
    let deadline = Instant::now() + bound;
    let target = wanted.len() * subs;
    let mut got = vec![HashMap::new(); subs];
    let mut dups = 0;
    let mut cpu = None;
    loop {
        let complete_enough = count.load(Ordering::Acquire) >= target;
        let late = Instant::now() >= deadline;
        if complete_enough || late {
            if cpu.is_none() {
                cpu = mark.map(|(m, pids)| cpu_since(m, pids));
            }
            let raw = std::mem::take(&mut *received.lock().unwrap());
            let (more, d) = sort_receipts(raw, subs);
            dups += d;
            for (i, m) in more.into_iter().enumerate() {
                for (h, at) in m {
                    if got[i].insert(h, at).is_some() {
                        dups += 1;
                    }
                }
            }
            let all = got.iter().all(|m| wanted.iter().all(|h| m.contains_key(h)));
            if all || late {
                return (got, dups, cpu);
            }
            // Batched or repeated messages: wait for more, with the CPU window closed.
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One writer on `case.writer`, `cfg.subscribers` subscribers round-robin over `case.ports`.
async fn fanout_case(ctx: &Ctx<'_>, case: &Case, failures: &mut Vec<String>) -> Option<FanoutRow> {
    let (cfg, c, nodes) = (ctx.cfg, &ctx.c, ctx.nodes);
    let (label, writer, subs_on, pids, pg) = (
        case.label.as_str(),
        case.writer,
        &case.ports[..],
        &case.pids[..],
        case.pg,
    );
    let id = format!(
        "fanout-{}-{}",
        label.replace([' ', '>', ','], "_"),
        unique()
    );
    let (mut doc, list) = list_doc("base");
    if let Err(e) = post(c, writer, &id, doc.save()).await {
        failures.push(format!("fan-out {label}: creating the document: {e}"));
        return None;
    }
    let subs = cfg.subscribers;
    let received: Receipts = Arc::default();
    let count = Arc::new(AtomicUsize::new(0));
    let texts: Arc<Mutex<Vec<String>>> = Arc::default();
    let closed = Arc::new(AtomicUsize::new(0));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(subs);
    let mut readers: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    let setup = Instant::now();
    for i in 0..subs {
        let port = subs_on[i % subs_on.len()];
        let mut ws = match ws_connect(port, &id).await {
            Ok(ws) => ws,
            Err(e) => {
                failures.push(format!("fan-out {label}: subscriber {i}: {e}"));
                for r in readers {
                    r.abort();
                }
                return None;
            }
        };
        let (received, count, texts, closed, ready) = (
            received.clone(),
            count.clone(),
            texts.clone(),
            closed.clone(),
            ready_tx.clone(),
        );
        readers.push(tokio::spawn(async move {
            let mut first = true;
            while let Some(msg) = ws.next().await {
                match msg {
                    Ok(Message::Binary(bytes)) => {
                        let now = Instant::now();
                        if first {
                            // The whole document, sent on subscribing.
                            first = false;
                            let _ = ready.send(()).await;
                            continue;
                        }
                        received.lock().unwrap().push((i, bytes, now));
                        count.fetch_add(1, Ordering::AcqRel);
                    }
                    Ok(Message::Text(t)) => texts.lock().unwrap().push(t.to_string()),
                    Ok(Message::Close(_)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            closed.fetch_add(1, Ordering::AcqRel);
        }));
    }
    drop(ready_tx);
    let ready_by = Instant::now() + Duration::from_secs(30);
    for n in 0..subs {
        let left = ready_by.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, ready_rx.recv())
            .await
            .ok()
            .flatten()
            .is_none()
        {
            failures.push(format!(
                "fan-out {label}: only {n} of {subs} subscribers got the document"
            ));
            for r in &readers {
                r.abort();
            }
            return None;
        }
    }
    let setup_ms = ms(setup.elapsed());
    let period = Duration::from_secs_f64(1.0 / cfg.fanout_rate);

    // One write: its hash, when it was sent and when it was acknowledged.
    async fn write(
        c: &reqwest::Client,
        port: u16,
        id: &str,
        doc: &mut AutoCommit,
        list: &ObjId,
        i: usize,
    ) -> Result<(ChangeHash, Instant, Instant), String> {
        let heads = doc.get_heads();
        let len = doc.length(list);
        doc.insert(list, len, format!("write {i}")).unwrap();
        doc.commit();
        let hash = doc.get_last_local_change().unwrap().hash();
        let body = doc.save_after(&heads);
        let sent = Instant::now();
        post(c, port, id, body).await?;
        Ok((hash, sent, Instant::now()))
    }

    // Warm-up, awaited and discarded.
    let mut tick = tokio::time::interval(period);
    let mut warm = Vec::new();
    for i in 0..WARMUP_WRITES {
        tick.tick().await;
        match write(c, writer, &id, &mut doc, &list, i).await {
            Ok((h, _, _)) => warm.push(h),
            Err(e) => {
                failures.push(format!("fan-out {label}: warm-up write: {e}"));
                return None;
            }
        }
    }
    let (got, _, _) = await_deliveries(
        &received,
        &count,
        subs,
        &warm,
        Duration::from_secs(20),
        None,
    )
    .await;
    let warm_missing: usize = got
        .iter()
        .map(|m| warm.iter().filter(|h| !m.contains_key(h)).count())
        .sum();
    if warm_missing > 0 {
        failures.push(format!(
            "fan-out {label}: {warm_missing} warm-up deliveries missing after 20 s"
        ));
    }
    received.lock().unwrap().clear();
    count.store(0, Ordering::Release);

    let ports: Vec<u16> = nodes.pg_ports();
    let counters0 = if pg {
        Some(counters_of(c, &ports).await)
    } else {
        None
    };
    let mark = cpu_mark(pids);
    let mut writes = Vec::with_capacity(cfg.fanout_writes);
    let mut tick = tokio::time::interval(period);
    for i in 0..cfg.fanout_writes {
        tick.tick().await;
        match write(c, writer, &id, &mut doc, &list, WARMUP_WRITES + i).await {
            Ok(w) => writes.push(w),
            Err(e) => {
                failures.push(format!("fan-out {label}: write {i}: {e}"));
                break;
            }
        }
    }
    let wanted: Vec<ChangeHash> = writes.iter().map(|w| w.0).collect();
    let (got, duplicates, cpu) = await_deliveries(
        &received,
        &count,
        subs,
        &wanted,
        Duration::from_secs(30),
        Some((&mark, pids)),
    )
    .await;
    let cpu = cpu.unwrap_or_default();
    let counters = match counters0 {
        Some(before) => Some(counters_delta(&before, &counters_of(c, &ports).await)),
        None => None,
    };
    for r in &readers {
        r.abort();
    }
    let (mut ack, mut send, mut post_ms) = (Vec::new(), Vec::new(), Vec::new());
    let mut early = 0;
    let mut delivered = 0;
    for (hash, sent, acked) in &writes {
        post_ms.push(ms(*acked - *sent));
        for m in &got {
            if let Some(at) = m.get(hash) {
                delivered += 1;
                send.push(ms(at.saturating_duration_since(*sent)));
                if at < acked {
                    early += 1;
                }
                ack.push(ms(at.saturating_duration_since(*acked)));
            }
        }
    }
    let expected = writes.len() * subs;
    if delivered < expected {
        let short: Vec<usize> = got
            .iter()
            .enumerate()
            .filter(|(_, m)| wanted.iter().any(|h| !m.contains_key(h)))
            .map(|(i, _)| i)
            .collect();
        failures.push(format!(
            "fan-out {label}: {} of {expected} deliveries missing after 30 s; {} subscribers \
             short (first: {:?}); {} sockets closed",
            expected - delivered,
            short.len(),
            &short[..short.len().min(10)],
            closed.load(Ordering::Acquire)
        ));
    }
    let texts = texts.lock().unwrap();
    if !texts.is_empty() {
        failures.push(format!(
            "fan-out {label}: {} text messages to subscribers, first {:?}",
            texts.len(),
            texts.first()
        ));
    }
    let subs_names: Vec<String> = subs_on.iter().map(|&p| nodes.name_of(p)).collect();
    Some(FanoutRow {
        label: label.to_string(),
        subs_on: subs_names.join(","),
        expected,
        delivered,
        duplicates,
        early,
        ack: lat(&mut ack),
        send: lat(&mut send),
        post: lat(&mut post_ms),
        cpu,
        writes: writes.len(),
        counters,
        setup_ms,
    })
}

// ---------------------------------------------------------------------------------------------
// (2) Concurrent writers (P4)

struct WritersRow {
    label: String,
    nodes: usize,
    acked: usize,
    applied: u64,
    elapsed: f64,
    write: Lat,
    batches: Batches,
    cpu: CpuUse,
    converged: Option<Duration>,
    counters: Option<FanoutCounters>,
}

async fn writers_case(
    ctx: &Ctx<'_>,
    case: &Case,
    failures: &mut Vec<String>,
) -> Option<WritersRow> {
    let (cfg, c, nodes) = (ctx.cfg, &ctx.c, ctx.nodes);
    let (label, ports, pids, pg) = (
        case.label.as_str(),
        &case.ports[..],
        &case.pids[..],
        case.pg,
    );
    let id = format!("writers-{}-{}", label.replace(' ', "_"), unique());
    let (mut base, list) = list_doc("base");
    if let Err(e) = post(c, ports[0], &id, base.save()).await {
        failures.push(format!("writers {label}: creating the document: {e}"));
        return None;
    }
    // Every node serving a writer loads the document before the clock starts.
    for &p in ports {
        if served_heads(c, p, &id).await.is_none() {
            failures.push(format!(
                "writers {label}: node {} cannot serve it",
                nodes.name_of(p)
            ));
            return None;
        }
    }
    let all_pg = nodes.pg_ports();
    let counters0 = if pg {
        Some(counters_of(c, &all_pg).await)
    } else {
        None
    };
    let batches0 = batches_of(c, ports).await;
    let mark = cpu_mark(pids);
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(cfg.write_secs);
    let mut tasks = Vec::new();
    for w in 0..cfg.writers {
        let (c, id, list) = (c.clone(), id.clone(), list.clone());
        let port = ports[w % ports.len()];
        let mut doc = base.fork();
        tasks.push(tokio::spawn(async move {
            let mut lat_ms = Vec::new();
            let mut applied = 0u64;
            let mut err = None;
            let mut last = None;
            let mut i = 0;
            while Instant::now() < deadline {
                let heads = doc.get_heads();
                let len = doc.length(&list);
                doc.insert(&list, len, format!("w{w}-{i}")).unwrap();
                doc.commit();
                i += 1;
                let body = doc.save_after(&heads);
                let t = Instant::now();
                match post(&c, port, &id, body).await {
                    Ok(v) => {
                        lat_ms.push(ms(t.elapsed()));
                        applied += v["applied"].as_u64().unwrap_or(0);
                        last = doc.get_heads().first().copied();
                    }
                    Err(e) => {
                        err = Some(e);
                        break;
                    }
                }
            }
            (lat_ms, applied, last, err)
        }));
    }
    let mut all_lat = Vec::new();
    let mut applied = 0;
    let mut heads = Vec::new();
    for t in tasks {
        let (l, a, last, err) = t.await.expect("writer task");
        all_lat.extend(l);
        applied += a;
        heads.extend(last);
        if let Some(e) = err {
            failures.push(format!("writers {label}: {e}"));
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = cpu_since(&mark, pids);
    let batches1 = batches_of(c, ports).await;
    if heads.is_empty() {
        // Nobody wrote: the document is still the base.
        heads = base.get_heads();
    }
    // Every node holding the document (all PostgreSQL nodes for pg rows) must serve it all.
    let check: Vec<u16> = if pg { all_pg.clone() } else { ports.to_vec() };
    let converged = match converge(c, &check, &id, &heads, Duration::from_secs(15)).await {
        Ok(d) => Some(d),
        Err(e) => {
            failures.push(format!("writers {label}: {e}"));
            None
        }
    };
    let counters = match counters0 {
        Some(before) => Some(counters_delta(&before, &counters_of(c, &all_pg).await)),
        None => None,
    };
    Some(WritersRow {
        label: label.to_string(),
        nodes: ports.len(),
        acked: all_lat.len(),
        applied,
        elapsed,
        write: lat(&mut all_lat),
        batches: Batches {
            batches: batches1.batches - batches0.batches,
            writes: batches1.writes - batches0.writes,
            persists: batches1.persists - batches0.persists,
            persist_micros: batches1.persist_micros - batches0.persist_micros,
        },
        cpu,
        converged,
        counters,
    })
}

// ---------------------------------------------------------------------------------------------
// (3) Typing storm over per-document WebSockets

struct TypingRow {
    label: String,
    nodes: usize,
    typed: usize,
    expected: usize,
    delivered: usize,
    peer: Lat,
    ack: Lat,
    lag: Lat,
    cpu: CpuUse,
    errors: usize,
    counters: Option<FanoutCounters>,
}

#[derive(Default)]
struct TypistOut {
    sent: Vec<(ChangeHash, Instant)>,
    got: Vec<(ChangeHash, Instant)>,
    ack_ms: Vec<f64>,
    lag_ms: Vec<f64>,
    errors: Vec<String>,
    heads: Vec<ChangeHash>,
}

/// xorshift64*, seeded per typist: positions are reproducible run to run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1) as u64) as usize
    }
}

/// What one typist needs besides its socket and document.
struct TypistSetup {
    me: usize,
    typists: usize,
    rate: f64,
    typing: Duration,
    /// The instant typing starts, once set.
    control: watch::Receiver<Option<Instant>>,
    stop: watch::Receiver<bool>,
    typed_total: Arc<AtomicUsize>,
    delivered: Arc<AtomicUsize>,
}

async fn typist(setup: TypistSetup, ws: Ws, mut doc: AutoCommit, text: ObjId) -> TypistOut {
    let TypistSetup {
        me,
        typists,
        rate,
        typing,
        mut control,
        mut stop,
        typed_total,
        delivered,
    } = setup;
    let (mut tx, mut rx) = ws.split();
    let mut out = TypistOut::default();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((me as u64 + 1) * 0x1000_0001));
    let mut own: HashSet<ChangeHash> = HashSet::new();
    let mut seen: HashSet<ChangeHash> = HashSet::new();
    let mut unacked: VecDeque<Instant> = VecDeque::new();
    let period = Duration::from_secs_f64(1.0 / rate);
    let far = Instant::now() + Duration::from_secs(3600);
    let mut next_key = far;
    let mut end = far;
    loop {
        let typing_now = next_key < end;
        tokio::select! {
            msg = rx.next() => match msg {
                Some(Ok(Message::Binary(bytes))) => {
                    let now = Instant::now();
                    if let Err(e) = doc.load_incremental(&bytes) {
                        out.errors.push(format!("typist {me}: cannot merge a push: {e}"));
                    }
                    for h in hashes_in(&bytes) {
                        if !own.contains(&h) && seen.insert(h) {
                            out.got.push((h, now));
                            delivered.fetch_add(1, Ordering::AcqRel);
                        }
                    }
                }
                Some(Ok(Message::Text(t))) => {
                    let v: serde_json::Value = serde_json::from_str(&t).unwrap_or_default();
                    if v["type"] == "ack" {
                        if let Some(sent) = unacked.pop_front() {
                            out.ack_ms.push(ms(sent.elapsed()));
                        }
                    } else {
                        out.errors.push(format!("typist {me}: {t}"));
                    }
                }
                Some(Ok(Message::Close(f))) => {
                    out.errors.push(format!("typist {me}: closed by the relay: {f:?}"));
                    break;
                }
                Some(Err(e)) => {
                    out.errors.push(format!("typist {me}: {e}"));
                    break;
                }
                None => {
                    out.errors.push(format!("typist {me}: socket ended"));
                    break;
                }
                Some(Ok(_)) => {}
            },
            _ = tokio::time::sleep_until(next_key.into()), if typing_now => {
                out.lag_ms.push(ms(next_key.elapsed()));
                let heads = doc.get_heads();
                let len = doc.length(&text);
                let pos = rng.below(len + 1);
                doc.splice_text(&text, pos, 0, "x").unwrap();
                doc.commit();
                let hash = doc.get_last_local_change().unwrap().hash();
                let body = doc.save_after(&heads);
                let now = Instant::now();
                own.insert(hash);
                out.sent.push((hash, now));
                unacked.push_back(now);
                typed_total.fetch_add(1, Ordering::AcqRel);
                if let Err(e) = tx.send(Message::Binary(body.into())).await {
                    out.errors.push(format!("typist {me}: send: {e}"));
                    break;
                }
                next_key += period;
            },
            changed = control.changed() => {
                if changed.is_err() {
                    break;
                }
                if let Some(start) = *control.borrow() {
                    // Staggered, so the typists do not all type at the same instant.
                    next_key = start + period.mul_f64(me as f64 / typists as f64);
                    end = start + typing;
                }
            },
            _ = stop.changed() => break,
        }
    }
    if !unacked.is_empty() {
        out.errors.push(format!(
            "typist {me}: {} keystrokes never acknowledged",
            unacked.len()
        ));
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), tx.close()).await;
    out.heads = doc.get_heads();
    out.heads.sort();
    out
}

async fn typing_case(ctx: &Ctx<'_>, case: &Case, failures: &mut Vec<String>) -> Option<TypingRow> {
    let (cfg, c, nodes) = (ctx.cfg, &ctx.c, ctx.nodes);
    let (label, ports, pids, pg) = (
        case.label.as_str(),
        &case.ports[..],
        &case.pids[..],
        case.pg,
    );
    let id = format!("typing-{}-{}", label.replace(' ', "_"), unique());
    let mut base = AutoCommit::new();
    let text = base.put_object(ROOT, "text", ObjType::Text).unwrap();
    base.splice_text(&text, 0, 0, "hello").unwrap();
    base.commit();
    if let Err(e) = post(c, ports[0], &id, base.save()).await {
        failures.push(format!("typing {label}: creating the document: {e}"));
        return None;
    }
    let t = cfg.typists;
    let (control_tx, control_rx) = watch::channel(None);
    let (stop_tx, stop_rx) = watch::channel(false);
    let typed_total = Arc::new(AtomicUsize::new(0));
    let delivered = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..t {
        let port = ports[i % ports.len()];
        let mut ws = match ws_connect(port, &id).await {
            Ok(ws) => ws,
            Err(e) => {
                failures.push(format!("typing {label}: typist {i}: {e}"));
                return None;
            }
        };
        // The whole document comes first.
        let initial = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(Ok(m)) = ws.next().await {
                if let Message::Binary(b) = m {
                    return Some(b);
                }
            }
            None
        })
        .await
        .ok()
        .flatten();
        let Some(doc) = initial.and_then(|b| AutoCommit::load(&b).ok()) else {
            failures.push(format!("typing {label}: typist {i} got no document"));
            return None;
        };
        let text = match doc.get(ROOT, "text") {
            Ok(Some((_, obj))) => obj,
            _ => {
                failures.push(format!(
                    "typing {label}: typist {i}: no text in the document"
                ));
                return None;
            }
        };
        let setup = TypistSetup {
            me: i,
            typists: t,
            rate: cfg.typing_rate,
            typing: Duration::from_secs_f64(cfg.typing_secs),
            control: control_rx.clone(),
            stop: stop_rx.clone(),
            typed_total: typed_total.clone(),
            delivered: delivered.clone(),
        };
        tasks.push(tokio::spawn(typist(setup, ws, doc, text)));
    }
    let all_pg = nodes.pg_ports();
    let counters0 = if pg {
        Some(counters_of(c, &all_pg).await)
    } else {
        None
    };
    let mark = cpu_mark(pids);
    let start = Instant::now() + Duration::from_millis(20);
    control_tx.send_replace(Some(start));
    tokio::time::sleep_until((start + Duration::from_secs_f64(cfg.typing_secs)).into()).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let drain_by = Instant::now() + Duration::from_secs(15);
    while delivered.load(Ordering::Acquire) < typed_total.load(Ordering::Acquire) * (t - 1)
        && Instant::now() < drain_by
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let cpu = cpu_since(&mark, pids);
    // Acks of the last keystrokes may still be on their way.
    let acks_by = Instant::now() + Duration::from_secs(5);
    while Instant::now() < acks_by {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if delivered.load(Ordering::Acquire) >= typed_total.load(Ordering::Acquire) * (t - 1) {
            break;
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop_tx.send_replace(true);
    let mut outs = Vec::new();
    for task in tasks {
        match tokio::time::timeout(Duration::from_secs(10), task).await {
            Ok(Ok(o)) => outs.push(o),
            _ => failures.push(format!("typing {label}: a typist did not stop")),
        }
    }
    let counters = match counters0 {
        Some(before) => Some(counters_delta(&before, &counters_of(c, &all_pg).await)),
        None => None,
    };
    let typed_at: HashMap<ChangeHash, (usize, Instant)> = outs
        .iter()
        .enumerate()
        .flat_map(|(i, o)| o.sent.iter().map(move |(h, at)| (*h, (i, *at))))
        .collect();
    let typed = typed_at.len();
    let expected = typed * (t - 1);
    let (mut peer, mut ack, mut lag) = (Vec::new(), Vec::new(), Vec::new());
    let mut delivered = 0;
    let mut errors = 0;
    let mut slow_by_offset: std::collections::BTreeMap<usize, usize> = Default::default();
    let mut slow_by_recv: std::collections::BTreeMap<usize, usize> = Default::default();
    for (j, o) in outs.iter().enumerate() {
        for (h, at) in &o.got {
            if let Some((author, typed)) = typed_at.get(h) {
                if *author != j {
                    delivered += 1;
                    let l = ms(at.saturating_duration_since(*typed));
                    peer.push(l);
                    if std::env::var("CLUSTER_DEBUG").is_ok() && l > 15.0 {
                        let off = (j + t - author) % t;
                        *slow_by_offset.entry(off).or_insert(0usize) += 1;
                        *slow_by_recv.entry(j).or_insert(0usize) += 1;
                    }
                }
            }
        }
        ack.extend_from_slice(&o.ack_ms);
        lag.extend_from_slice(&o.lag_ms);
        errors += o.errors.len();
        for e in o.errors.iter().take(3) {
            failures.push(format!("typing {label}: {e}"));
        }
    }
    if std::env::var("CLUSTER_DEBUG").is_ok() {
        eprintln!("debug {label}: slow (>15ms) by receiver-author offset {slow_by_offset:?}, by receiver {slow_by_recv:?}");
    }
    if delivered < expected {
        failures.push(format!(
            "typing {label}: {} of {expected} keystroke deliveries missing",
            expected - delivered
        ));
    }
    if outs.windows(2).any(|w| w[0].heads != w[1].heads) {
        failures.push(format!(
            "typing {label}: the typists' documents differ at the end"
        ));
    }
    Some(TypingRow {
        label: label.to_string(),
        nodes: ports.len(),
        typed,
        expected,
        delivered,
        peer: lat(&mut peer),
        ack: lat(&mut ack),
        lag: lat(&mut lag),
        cpu,
        errors,
        counters,
    })
}

// ---------------------------------------------------------------------------------------------
// (4) Incremental upload into an existing document (P2)

fn history_doc(list_shaped: bool, n: usize) -> AutoCommit {
    let mut doc = AutoCommit::new();
    if list_shaped {
        let list = doc.put_object(ROOT, "items", ObjType::List).unwrap();
        doc.commit();
        for i in 0..n {
            doc.insert(&list, i, format!("item {i}")).unwrap();
            doc.commit();
        }
    } else {
        for i in 0..n {
            doc.put(ROOT, format!("key{i}"), i as i64).unwrap();
            doc.commit();
        }
    }
    doc
}

async fn upload_case(
    cfg: &Config,
    c: &reqwest::Client,
    port: u16,
    name: &str,
    base: &AutoCommit,
    failures: &mut Vec<String>,
) -> Option<Lat> {
    let id = format!("upload-{name}-{}", unique());
    let mut doc = base.clone();
    if let Err(e) = post(c, port, &id, doc.save()).await {
        failures.push(format!("upload {name}: {e}"));
        return None;
    }
    let mut samples = Vec::with_capacity(cfg.samples);
    for i in 0..cfg.samples {
        let heads = doc.get_heads();
        small_change(&mut doc, i);
        let body = doc.save_after(&heads);
        let t = Instant::now();
        if let Err(e) = post(c, port, &id, body).await {
            failures.push(format!("upload {name}: {e}"));
            return None;
        }
        samples.push(ms(t.elapsed()));
    }
    Some(lat(&mut samples))
}

// ---------------------------------------------------------------------------------------------
// Report

fn f(v: f64, d: usize) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{v:.d$}")
    }
}

fn print_counters(rows: &[(&str, Option<FanoutCounters>)]) {
    let rows: Vec<_> = rows
        .iter()
        .filter_map(|(l, c)| c.map(|c| (*l, c)))
        .collect();
    if rows.is_empty() {
        return;
    }
    println!(
        "  between the PostgreSQL nodes during each case (metrics deltas, summed over nodes):"
    );
    println!(
        "  {:<11} {:>9} {:>9} {:>9} {:>9} {:>11} {:>11} {:>11} {:>6}",
        "case",
        "published",
        "pub.fail",
        "received",
        "applied",
        "readback.ch",
        "readback.del",
        "compactions",
        "loads"
    );
    for (l, c) in rows {
        println!(
            "  {:<11} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>11.0} {:>11.0} {:>11.0} {:>6.0}",
            l,
            c.published,
            c.publish_failures,
            c.received,
            c.applied,
            c.catchups_changes,
            c.catchups_deleted,
            c.compactions,
            c.loads
        );
    }
    println!(
        "  (readback = relay_fanout_catchups_total: a heads check or reconnect found the store's \
         chunks differ and read the document back; .del = concluded it was deleted elsewhere; \
         compactions and loads from /_/stats; all hot documents count, not only the case's)"
    );
}

fn print_fanout(cfg: &Config, rows: &[FanoutRow]) {
    println!(
        "\n(1) fan-out: 1 HTTP writer on node A (S for sled), {} writes at {}/s, {} per-document \
         WebSocket subscribers",
        cfg.fanout_writes, cfg.fanout_rate, cfg.subscribers
    );
    println!(
        "{:<11} {:>5} {:>13} {:>5} | {:>7} {:>7} {:>7} | {:>7} {:>7} | {:>7} {:>7} | {:>7} {:>7} {:>7} {:>7}",
        "case", "subs", "delivered", "early", "ack p50", "p99", "max", "snd p50", "p99", "POST50",
        "POST99", "relay", "gen", "pg", "redis"
    );
    println!("{}", "-".repeat(128));
    for r in rows {
        let per = |cpu: f64| f(cpu * 1000.0 / r.writes.max(1) as f64, 2);
        println!(
            "{:<11} {:>5} {:>13} {:>5} | {:>7} {:>7} {:>7} | {:>7} {:>7} | {:>7} {:>7} | {:>7} {:>7} {:>7} {:>7}",
            r.label,
            r.subs_on,
            format!("{}/{}", r.delivered, r.expected),
            r.early,
            f(r.ack.p50, 2),
            f(r.ack.p99, 2),
            f(r.ack.max, 2),
            f(r.send.p50, 2),
            f(r.send.p99, 2),
            f(r.post.p50, 2),
            f(r.post.p99, 2),
            per(r.cpu.relays),
            per(r.cpu.generator),
            per(r.cpu.postgres),
            per(r.cpu.redis),
        );
    }
    println!(
        "  latency in ms from the writer's 2xx (ack; 'early' = receipts before it, counted as 0) \
         and from sending the POST (snd); POST = the writer's own request time; CPU in ms per \
         write over writes + delivery (relay = sum over that store's nodes, gen = this load \
         generator); duplicates: {}; subscriber setup: {}",
        rows.iter().map(|r| r.duplicates).sum::<usize>(),
        rows.iter()
            .map(|r| format!("{} {:.0} ms", r.label, r.setup_ms))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for r in rows {
        println!(
            "  {:<10} send->sub ms histogram: {}",
            r.label,
            r.send.histogram()
        );
    }
    let row = |l: &str| rows.iter().find(|r| r.label == l);
    if let (Some(single), Some(cross)) = (row("pg x1"), row("pg A->B")) {
        for (base, one, two) in [
            ("ack", single.ack.p99, cross.ack.p99),
            ("send", single.send.p99, cross.send.p99),
        ] {
            println!(
                "  cross-node p99 - single-node p99 (same store), from {base}: {:+.2} ms \
                 (target: at most +100 ms) -> {}",
                two - one,
                if two - one <= 100.0 { "met" } else { "NOT met" }
            );
        }
    }
    if let (Some(sled), Some(single)) = (row("sled"), row("pg x1")) {
        println!(
            "  pg x1 - sled, p99 from send: {:+.2} ms",
            single.send.p99 - sled.send.p99
        );
    }
    let counters: Vec<(&str, Option<FanoutCounters>)> = rows
        .iter()
        .map(|r| (r.label.as_str(), r.counters))
        .collect();
    print_counters(&counters);
}

fn print_writers(cfg: &Config, rows: &[WritersRow]) {
    println!(
        "\n(2) P4: {} concurrent HTTP writers, one incremental change per POST, {} s",
        cfg.writers, cfg.write_secs
    );
    println!(
        "{:<8} {:>5} {:>8} {:>8} | {:>7} {:>7} {:>7} | {:>6} {:>8} | {:>6} {:>6} {:>6} {:>6} | {:>7} {:>7} | {:>9}",
        "case", "nodes", "acked", "chg/s", "p50 ms", "p99", "max", "batch", "persist", "relay",
        "gen", "pg", "redis", "relay", "gen", "converged"
    );
    println!("{}", "-".repeat(134));
    for r in rows {
        let per = |cpu: f64| f(cpu * 1000.0 / r.acked.max(1) as f64, 2);
        println!(
            "{:<8} {:>5} {:>8} {:>8.0} | {:>7} {:>7} {:>7} | {:>6} {:>8} | {:>6} {:>6} {:>6} {:>6} | {:>7} {:>7} | {:>9}",
            r.label,
            r.nodes,
            r.acked,
            r.acked as f64 / r.elapsed,
            f(r.write.p50, 2),
            f(r.write.p99, 2),
            f(r.write.max, 1),
            f(r.batches.writes / r.batches.batches.max(1.0), 1),
            f(r.batches.persist_micros / r.batches.persists.max(1.0) / 1000.0, 2),
            f(r.cpu.cores(r.cpu.relays), 2),
            f(r.cpu.cores(r.cpu.generator), 2),
            f(r.cpu.cores(r.cpu.postgres), 2),
            f(r.cpu.cores(r.cpu.redis), 2),
            per(r.cpu.relays),
            per(r.cpu.generator),
            r.converged.map_or("NO".into(), |d| format!("{:.0} ms", ms(d))),
        );
    }
    println!(
        "  chg/s = acknowledged changes per second ({} applied in all); batch = writes per owner \
         batch, persist = ms per persist (summed over the nodes written to); cores busy for \
         relay (sum over that store's nodes), gen, pg, redis, then relay and gen CPU ms per \
         change; converged = until every node serves every writer's last change",
        rows.iter().map(|r| r.applied).sum::<u64>()
    );
    let rate = |l: &str| {
        rows.iter()
            .find(|r| r.label == l)
            .map(|r| r.acked as f64 / r.elapsed)
    };
    let spread = format!("pg x{}", cfg.nodes);
    if let (Some(sled), Some(one), Some(many)) = (rate("sled"), rate("pg x1"), rate(&spread)) {
        println!(
            "  throughput: pg x1 / sled = {:.2}x, {spread} / pg x1 = {:.2}x, {spread} / sled = {:.2}x",
            one / sled,
            many / one,
            many / sled
        );
    }
    let counters: Vec<(&str, Option<FanoutCounters>)> = rows
        .iter()
        .map(|r| (r.label.as_str(), r.counters))
        .collect();
    print_counters(&counters);
}

fn print_typing(cfg: &Config, rows: &[TypingRow]) {
    println!(
        "\n(3) typing storm: {} typists x {}/s keystrokes for {} s on per-document WebSockets \
         (each merges the others' changes; no client throttle)",
        cfg.typists, cfg.typing_rate, cfg.typing_secs
    );
    println!(
        "{:<8} {:>5} {:>6} {:>11} | {:>7} {:>7} {:>7} | {:>7} {:>7} | {:>7} {:>6} {:>6} {:>6} {:>6} | {:>6} {:>4}",
        "case", "nodes", "typed", "delivered", "p50 ms", "p99", "max", "ack p50", "p99",
        "ms/key", "%core", "gen s", "pg s", "rds s", "lag99", "errs"
    );
    println!("{}", "-".repeat(130));
    for r in rows {
        println!(
            "{:<8} {:>5} {:>6} {:>11} | {:>7} {:>7} {:>7} | {:>7} {:>7} | {:>7} {:>6} {:>6} {:>6} {:>6} | {:>6} {:>4}",
            r.label,
            r.nodes,
            r.typed,
            format!("{}/{}", r.delivered, r.expected),
            f(r.peer.p50, 1),
            f(r.peer.p99, 1),
            f(r.peer.max, 1),
            f(r.ack.p50, 1),
            f(r.ack.p99, 1),
            f(r.cpu.relays * 1000.0 / r.typed.max(1) as f64, 2),
            f(100.0 * r.cpu.cores(r.cpu.relays), 0),
            f(r.cpu.generator, 2),
            f(r.cpu.postgres, 2),
            f(r.cpu.redis, 2),
            f(r.lag.p99, 1),
            r.errors,
        );
    }
    println!(
        "  latency in ms from the keystroke (sent at once) to each other typist's receipt, and to \
         its own ack (durable); ms/key = relay CPU per keystroke summed over that store's nodes, \
         %core = the same per second of typing + drain; gen/pg/rds = CPU-seconds of this load \
         generator, PostgreSQL, Redis; lag99 = p99 ms by which keystrokes ran late"
    );
    for r in rows {
        println!(
            "  {:<8} keystroke->peer ms histogram: {}",
            r.label,
            r.peer.histogram()
        );
        println!(
            "  {:<8} keystroke->ack  ms histogram: {}",
            "",
            r.ack.histogram()
        );
    }
    let counters: Vec<(&str, Option<FanoutCounters>)> = rows
        .iter()
        .map(|r| (r.label.as_str(), r.counters))
        .collect();
    print_counters(&counters);
}

fn print_upload(cfg: &Config, rows: &[(String, Lat, Lat)]) {
    println!(
        "\n(4) P2: one change POSTed into an existing {}-change document, {} samples",
        cfg.history, cfg.samples
    );
    println!(
        "{:<6} {:>10} {:>10} {:>7} | {:>10} {:>10}",
        "doc", "sled p50", "pg p50", "pg/sled", "sled p99", "pg p99"
    );
    println!("{}", "-".repeat(62));
    for (name, sled, pg) in rows {
        println!(
            "{:<6} {:>8}ms {:>8}ms {:>6}x | {:>8}ms {:>8}ms",
            name,
            f(sled.p50, 3),
            f(pg.p50, 3),
            f(pg.p50 / sled.p50, 2),
            f(sled.p99, 3),
            f(pg.p99, 3)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The run

async fn run(cfg: &Config, store: &str, prefix: &str) -> Vec<String> {
    let mut failures = Vec::new();
    let upload_docs = if cfg.runs("upload") {
        let t = Instant::now();
        let docs = vec![
            ("map", history_doc(false, cfg.history)),
            ("list", history_doc(true, cfg.history)),
        ];
        eprintln!(
            "built two {}-change documents in {:.1} s",
            cfg.history,
            t.elapsed().as_secs_f64()
        );
        docs
    } else {
        Vec::new()
    };
    let nodes = start_nodes(cfg, store, prefix);
    let c = http_client();
    eprintln!(
        "nodes: S (sled) pid {} port {}; {}",
        nodes.sled.relay.pid(),
        nodes.sled.relay.port,
        nodes
            .pg
            .iter()
            .map(|n| format!(
                "{} (postgres) pid {} port {}",
                n.name,
                n.relay.pid(),
                n.relay.port
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
    let notes = match wait_fanout_working(&c, &nodes).await {
        Ok(notes) => notes,
        Err(e) => {
            failures.push(e);
            return failures;
        }
    };
    for n in &notes {
        eprintln!("note: {n}");
    }
    let s = nodes.sled.relay.port;
    let sled_pid = [nodes.sled.relay.pid()];
    let pg_ports = nodes.pg_ports();
    let pg_pids = nodes.pg_pids();
    let a = pg_ports[0];
    let spread = format!("pg x{}", cfg.nodes);

    let ctx = Ctx {
        cfg,
        c: c.clone(),
        nodes: &nodes,
    };
    let case = |label: &str, writer: u16, ports: Vec<u16>, pg: bool| Case {
        label: label.to_string(),
        writer,
        ports,
        pids: if pg {
            pg_pids.clone()
        } else {
            sled_pid.to_vec()
        },
        pg,
    };

    let mut fanout_rows = Vec::new();
    if cfg.runs("fanout") {
        let mut cases = vec![
            case("sled", s, vec![s], false),
            case("pg x1", a, vec![a], true),
            case("pg A->B", a, vec![pg_ports[1]], true),
        ];
        if cfg.nodes >= 3 {
            cases.push(case("pg A->B,C", a, pg_ports[1..3].to_vec(), true));
        }
        for k in &cases {
            eprintln!("(1) fan-out {}…", k.label);
            fanout_rows.extend(fanout_case(&ctx, k, &mut failures).await);
        }
    }
    // Writers and typists: all on sled, all on A, round-robin over every PostgreSQL node.
    let spread_cases = [
        case("sled", s, vec![s], false),
        case("pg x1", a, vec![a], true),
        case(&spread, a, pg_ports.clone(), true),
    ];

    let mut writer_rows = Vec::new();
    if cfg.runs("writers") {
        for k in &spread_cases {
            eprintln!("(2) writers {}…", k.label);
            writer_rows.extend(writers_case(&ctx, k, &mut failures).await);
        }
    }

    let mut typing_rows = Vec::new();
    if cfg.runs("typing") {
        for k in &spread_cases {
            eprintln!("(3) typing {}…", k.label);
            typing_rows.extend(typing_case(&ctx, k, &mut failures).await);
        }
    }

    let mut upload_rows = Vec::new();
    for (name, doc) in &upload_docs {
        eprintln!("(4) upload {name}…");
        let sled = upload_case(cfg, &c, s, &format!("{name}-sled"), doc, &mut failures).await;
        let pg = upload_case(cfg, &c, a, &format!("{name}-pg"), doc, &mut failures).await;
        if let (Some(sled), Some(pg)) = (sled, pg) {
            upload_rows.push((name.to_string(), sled, pg));
        }
    }

    println!(
        "\ncluster bench: {} PostgreSQL nodes (A..) on one database + Redis fan-out \
         (--heads-check-secs {}), 1 sled node (S); {} cores",
        cfg.nodes,
        cfg.heads_check_secs,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for n in &notes {
        println!("  note at start: {n}");
    }
    if !fanout_rows.is_empty() {
        print_fanout(cfg, &fanout_rows);
    }
    if !writer_rows.is_empty() {
        print_writers(cfg, &writer_rows);
    }
    if !typing_rows.is_empty() {
        print_typing(cfg, &typing_rows);
    }
    if !upload_rows.is_empty() {
        print_upload(cfg, &upload_rows);
    }

    // Stop the nodes by pid (SIGTERM, bounded), and say how they ended.
    let Nodes { sled, pg } = nodes;
    for n in std::iter::once(sled).chain(pg) {
        let pid = n.relay.pid();
        match n.relay.stop(Duration::from_secs(10)) {
            Some(status) if status.success() => {}
            Some(status) => eprintln!("node {} (pid {pid}) exited with {status}", n.name),
            None => eprintln!(
                "node {} (pid {pid}) did not stop within 10 s: killed",
                n.name
            ),
        }
    }
    failures
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        // `cargo bench -- --list` / `cargo test --benches` compatibility: nothing to list.
        return;
    }
    let cfg = Config::from_env();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let prefix = format!("bench-cluster:{}:", unique());
    let db = match rt.block_on(async {
        redis_conn(&cfg.redis_url).await?;
        BenchDb::create(&cfg.db_url).await
    }) {
        Ok(db) => db,
        Err(e) => {
            eprintln!("cluster bench: {e}");
            std::process::exit(2);
        }
    };
    eprintln!("database {}, fan-out prefix {prefix}", db.name);
    // The nodes are dropped (killed by pid) when `run` returns or unwinds.
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
        rt.block_on(run(&cfg, &db.url, &prefix))
    }));
    let mut failures = match outcome {
        Ok(f) => f,
        Err(_) => vec!["the benchmark panicked (see above)".to_string()],
    };
    match rt.block_on(db.drop_db()) {
        Ok(()) => eprintln!("database {} dropped", db.name),
        Err(e) => failures.push(format!("cleanup: {e}")),
    }
    match rt.block_on(redis_cleanup(&cfg.redis_url, &prefix)) {
        Ok((0, 0)) => eprintln!("Redis: no keys or subscribed channels left under {prefix}"),
        Ok((keys, channels)) => failures.push(format!(
            "Redis: {keys} keys under {prefix} (deleted), {channels} channels still subscribed"
        )),
        Err(e) => failures.push(format!("cleanup: {e}")),
    }
    if !failures.is_empty() {
        eprintln!("\nFAILED:");
        for f in &failures {
            eprintln!("  {f}");
        }
        std::process::exit(1);
    }
}
