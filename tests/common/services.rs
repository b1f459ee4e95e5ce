//! PostgreSQL and Redis for the scale-out tests (several relay nodes on one PostgreSQL store,
//! Redis fan-out between them).
//!
//! The servers come from the environment: `scripts/test` exports `RELAY_TEST_DATABASE_URL` and
//! `RELAY_TEST_REDIS_URL` (in CI the machine's services, elsewhere throwaway instances that
//! `scripts/services.sh` starts). Tests run in parallel against those shared servers, so each
//! test takes its own database ([`TestDb`]) and its own Redis key and channel prefix
//! ([`key_prefix`], for `--fanout-prefix`): nothing one test writes is seen by another.
//!
//! For fault tests: [`TcpProxy`] stands between a node and its store or fan-out and can cut the
//! connection and restore it; [`RedisServer`] is a Redis of the test's own that can be killed
//! and restarted (the shared one must never be).
//!
//! Everything here is synchronous and runs its async work on a thread of its own with its own
//! current-thread tokio runtime, so it works the same in `#[test]` and `#[tokio::test]`
//! functions (blocking on a runtime from inside another one would panic).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long connecting to and asking the shared servers may take before a helper gives up.
const SERVICE_TIMEOUT: Duration = Duration::from_secs(30);

static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// `<pid>_<counter>_<microseconds since the epoch>`: unique across the parallel test processes
/// on one machine and across runs (a run killed before it cleaned up leaves names no later run
/// takes).
fn unique_suffix() -> String {
    let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_micros();
    format!("{}_{}_{}", std::process::id(), n, micros)
}

/// Runs `f`'s future to completion on a new thread with its own current-thread runtime and
/// returns its output. Works whether or not the caller is inside a tokio runtime.
fn on_own_runtime<T, Fut>(f: impl FnOnce() -> Fut + Send + 'static) -> T
where
    Fut: std::future::Future<Output = T> + 'static,
    T: Send + 'static,
{
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime for a test helper")
            .block_on(f())
    })
    .join()
    .expect("test helper thread panicked")
}

/// Polls `f` every 10 ms until it returns Some, or panics at the deadline. The synchronous
/// twin of [`super::wait_for`].
pub fn poll_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The parts of `scheme://authority/path?query#fragment`: (`scheme://`, authority, the rest).
/// None when there is no `://`.
fn split_url(url: &str) -> Option<(&str, &str, &str)> {
    let start = url.find("://")? + 3;
    let end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| start + i);
    Some((&url[..start], &url[start..end], &url[end..]))
}

/// The URL with any password replaced by `***`, for messages.
pub fn redact(url: &str) -> String {
    let Some((scheme, authority, rest)) = split_url(url) else {
        return url.to_string();
    };
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => authority.to_string(),
        },
        None => authority.to_string(),
    };
    let rest: Vec<String> = rest
        .split('&')
        .map(|p| match p.find("password=") {
            Some(i) if i == 0 || p[..i].ends_with('?') => format!("{}password=***", &p[..i]),
            _ => p.to_string(),
        })
        .collect();
    format!("{scheme}{authority}{}", rest.join("&"))
}

// ---- PostgreSQL ------------------------------------------------------------------------------

/// The PostgreSQL server the tests share (`RELAY_TEST_DATABASE_URL`). Tests should not write to
/// its database: each takes its own with [`TestDb::create`].
pub fn database_url() -> String {
    match std::env::var("RELAY_TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "RELAY_TEST_DATABASE_URL is not set: run the tests with scripts/test, which starts \
             PostgreSQL and Redis (or set it to a PostgreSQL URL, e.g. \
             postgres://postgres@127.0.0.1:5432/test)"
        ),
    }
}

/// `url` (a `postgres://` or `postgresql://` URL) naming database `name` instead: the path is
/// replaced (or added), and so is a `dbname=` in the query string, which would win over it.
/// The user, password, host, port and other parameters stay.
pub fn with_database(url: &str, name: &str) -> String {
    let Some((scheme, authority, rest)) = split_url(url) else {
        panic!("not a PostgreSQL URL (scheme://host/db): {}", redact(url));
    };
    let (before_fragment, fragment) = match rest.find('#') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let query = match before_fragment.find('?') {
        Some(i) => &before_fragment[i + 1..],
        None => "",
    };
    let query: Vec<String> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            if p.starts_with("dbname=") {
                format!("dbname={name}")
            } else {
                p.to_string()
            }
        })
        .collect();
    let query = if query.is_empty() {
        String::new()
    } else {
        format!("?{}", query.join("&"))
    };
    format!("{scheme}{authority}/{name}{query}{fragment}")
}

async fn pg_connect(url: &str) -> Result<tokio_postgres::Client, String> {
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|e| format!("bad PostgreSQL URL {}: {e}", redact(url)))?;
    config.connect_timeout(Duration::from_secs(10));
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("connect to {}: {e}", redact(url)))?;
    // The connection future does the I/O; it ends once the client is dropped.
    tokio::spawn(connection);
    Ok(client)
}

/// Runs `sql` (one or more statements, simple query protocol) on the database `url` names and
/// returns the rows of its results as text (`None` for NULL). For checks in tests: what a node
/// stored, whether a database exists.
pub fn pg_query(url: &str, sql: &str) -> Result<Vec<Vec<Option<String>>>, String> {
    let (url, sql) = (url.to_string(), sql.to_string());
    on_own_runtime(move || async move {
        let work = async {
            let client = pg_connect(&url).await?;
            let messages = client
                .simple_query(&sql)
                .await
                .map_err(|e| format!("{sql:?} on {}: {e}", redact(&url)))?;
            let mut rows = Vec::new();
            for m in messages {
                if let tokio_postgres::SimpleQueryMessage::Row(row) = m {
                    rows.push(
                        (0..row.len())
                            .map(|i| row.get(i).map(str::to_string))
                            .collect(),
                    );
                }
            }
            Ok(rows)
        };
        match tokio::time::timeout(SERVICE_TIMEOUT, work).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "{sql:?} on {} took over {SERVICE_TIMEOUT:?}",
                redact(&url)
            )),
        }
    })
}

/// A database of one test's own on the shared PostgreSQL server, dropped with it. Give `url` to
/// the relay nodes as `--store`; every node of one test shares it.
pub struct TestDb {
    /// `database_url()` with the database replaced by `name`.
    pub url: String,
    /// `relay_t_<pid>_<counter>_<microseconds>`.
    pub name: String,
}

impl TestDb {
    /// Creates a new, empty database (`CREATE DATABASE`); panics when the server cannot be
    /// reached.
    pub fn create() -> TestDb {
        let admin = database_url();
        let name = format!("relay_t_{}", unique_suffix());
        if let Err(e) = pg_query(&admin, &format!("CREATE DATABASE \"{name}\"")) {
            panic!("could not create test database {name}: {e}");
        }
        TestDb {
            url: with_database(&admin, &name),
            name,
        }
    }
}

impl Drop for TestDb {
    /// Drops the database, disconnecting whoever is still connected (`WITH (FORCE)`: a node the
    /// test did not stop, a pool). Errors are ignored: a test that failed already said why, and
    /// a database left behind only takes space.
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
        if let Ok(admin) = std::env::var("RELAY_TEST_DATABASE_URL") {
            let _ = pg_query(&admin, &sql);
        }
    }
}

// ---- Redis ----------------------------------------------------------------------------------

/// The Redis server the tests share (`RELAY_TEST_REDIS_URL`). Each test keeps to its own
/// [`key_prefix`]; none may flush, kill or reconfigure it (use a [`RedisServer`] for that).
pub fn redis_url() -> String {
    match std::env::var("RELAY_TEST_REDIS_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "RELAY_TEST_REDIS_URL is not set: run the tests with scripts/test, which starts \
             PostgreSQL and Redis (or set it to a Redis URL, e.g. redis://127.0.0.1:6379)"
        ),
    }
}

/// A key and channel prefix no other call returns, `t<pid>_<counter>_<microseconds>:`, for a
/// test's `--fanout-prefix`: tests that share one Redis do not hear each other.
pub fn key_prefix() -> String {
    format!("t{}:", unique_suffix())
}

/// A synchronous connection to `url` whose connect, reads and writes time out.
pub fn redis_connection(url: &str, timeout: Duration) -> Result<redis::Connection, String> {
    let client =
        redis::Client::open(url).map_err(|e| format!("bad Redis URL {}: {e}", redact(url)))?;
    let con = client
        .get_connection_with_timeout(timeout)
        .map_err(|e| format!("connect to {}: {e}", redact(url)))?;
    con.set_read_timeout(Some(timeout))
        .and_then(|_| con.set_write_timeout(Some(timeout)))
        .map_err(|e| format!("set timeouts on {}: {e}", redact(url)))?;
    Ok(con)
}

/// Deletes every key that starts with `prefix` (SCAN with MATCH, then DEL); returns how many
/// were deleted. Tests call it at the end so the shared Redis does not fill up. Errors are
/// returned rather than panicking: a test that tidies up after a fault may ignore them.
pub fn redis_cleanup(url: &str, prefix: &str) -> Result<usize, String> {
    let mut con = redis_connection(url, SERVICE_TIMEOUT)?;
    // MATCH is a glob: escape its special characters so the prefix matches literally.
    let mut pattern = String::new();
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('*');
    let mut cursor: u64 = 0;
    let mut deleted = 0;
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query(&mut con)
            .map_err(|e| format!("SCAN on {}: {e}", redact(url)))?;
        if !keys.is_empty() {
            let n: usize = redis::cmd("DEL")
                .arg(&keys)
                .query(&mut con)
                .map_err(|e| format!("DEL on {}: {e}", redact(url)))?;
            deleted += n;
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}

/// Sends `PING` to the Redis at `addr` (`host:port`, no password) over a raw socket and
/// expects `+PONG`, all within `timeout`.
pub fn redis_ping(addr: &str, timeout: Duration) -> Result<(), String> {
    let sock = std::net::ToSocketAddrs::to_socket_addrs(addr)
        .map_err(|e| format!("resolve {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr} resolves to nothing"))?;
    let mut s = TcpStream::connect_timeout(&sock, timeout).map_err(|e| format!("{addr}: {e}"))?;
    s.set_read_timeout(Some(timeout)).ok();
    s.set_write_timeout(Some(timeout)).ok();
    s.write_all(b"*1\r\n$4\r\nPING\r\n")
        .map_err(|e| format!("{addr}: {e}"))?;
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).map_err(|e| format!("{addr}: {e}"))?;
    if &buf == b"+PONG\r\n" {
        Ok(())
    } else {
        Err(format!(
            "{addr} answered {:?}",
            String::from_utf8_lossy(&buf)
        ))
    }
}

// ---- TCP proxy ------------------------------------------------------------------------------

/// `host:port` of a URL (`scheme://[user[:password]@]host[:port]/...`), the scheme's default port
/// (PostgreSQL 5432, Redis 6379) when it names none; a `host:port` is returned as it is.
pub fn host_port(url_or_addr: &str) -> String {
    let Some((scheme, authority, _)) = split_url(url_or_addr) else {
        return url_or_addr.to_string();
    };
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let has_port = match host.rfind(']') {
        Some(i) => host[i..].contains(':'),
        None => host.contains(':'),
    };
    if has_port {
        return host.to_string();
    }
    let port = match scheme {
        "postgres://" | "postgresql://" => 5432,
        "redis://" | "rediss://" => 6379,
        _ => panic!(
            "no port in {} and no default for its scheme",
            redact(url_or_addr)
        ),
    };
    format!("{host}:{port}")
}

struct ProxyShared {
    /// While set, new connections are accepted and closed at once.
    cut: AtomicBool,
    /// Connections accepted and not yet closed.
    live: AtomicUsize,
    /// Bumped by every cut: a connection accepted under an older value closes.
    epoch: tokio::sync::watch::Sender<u64>,
}

/// A TCP forwarder on a free `127.0.0.1` port in front of one server, for tests that cut a
/// relay node off its PostgreSQL store or its Redis fan-out and give the connection back.
/// Start the node with `proxy.url_for(&db.url)` (or the Redis URL) instead of the server's URL.
///
/// It runs on a thread of its own with its own tokio runtime; dropping it stops the thread and
/// closes every connection.
pub struct TcpProxy {
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    /// What it forwards to (`host:port`).
    pub target: String,
    shared: Arc<ProxyShared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl TcpProxy {
    /// Listens on a free port and forwards each connection to `target`: a `host:port`, or a URL
    /// whose host and port are taken (see [`host_port`]). A connection whose target refuses it
    /// is closed.
    pub fn start(target: &str) -> TcpProxy {
        let target = host_port(target);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy port");
        let port = listener.local_addr().expect("proxy address").port();
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let (epoch, _) = tokio::sync::watch::channel(0u64);
        let shared = Arc::new(ProxyShared {
            cut: AtomicBool::new(false),
            live: AtomicUsize::new(0),
            epoch,
        });
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let thread = {
            let (shared, target) = (shared.clone(), target.clone());
            std::thread::Builder::new()
                .name(format!("tcp-proxy-{port}"))
                .spawn(move || {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("proxy runtime")
                        .block_on(proxy_accept_loop(listener, target, shared, stopped));
                    // Dropping the runtime here drops every connection task: all sockets close.
                })
                .expect("spawn proxy thread")
        };
        TcpProxy {
            port,
            target,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `url` with its host and port replaced by the proxy's (`127.0.0.1:<port>`); user,
    /// password, path and query stay.
    pub fn url_for(&self, url: &str) -> String {
        let Some((scheme, authority, rest)) = split_url(url) else {
            panic!("not a URL (scheme://host:port/...): {}", redact(url));
        };
        let userinfo = authority
            .rsplit_once('@')
            .map_or(String::new(), |(u, _)| format!("{u}@"));
        format!("{scheme}{userinfo}127.0.0.1:{}{rest}", self.port)
    }

    /// Cuts the line: closes every live connection and, until [`restore`](Self::restore),
    /// closes each new one as soon as it is accepted (clients see the connection end at once;
    /// they do not hang). Returns once every connection is closed.
    pub fn cut(&self) {
        self.shared.cut.store(true, Ordering::SeqCst);
        self.shared.epoch.send_modify(|e| *e += 1);
        poll_until(
            "the proxy's connections to close after cut()",
            Duration::from_secs(5),
            || (self.live() == 0).then_some(()),
        );
    }

    /// Forwards new connections again (the ones cut stay closed).
    pub fn restore(&self) {
        self.shared.cut.store(false, Ordering::SeqCst);
    }

    /// Connections forwarded now (accepted and not yet closed).
    pub fn live(&self) -> usize {
        self.shared.live.load(Ordering::SeqCst)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Decrements the live count when a connection task ends, however it ends.
struct LiveGuard(Arc<ProxyShared>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn proxy_accept_loop(
    listener: std::net::TcpListener,
    target: String,
    shared: Arc<ProxyShared>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    loop {
        let accepted = tokio::select! {
            _ = &mut stopped => return,
            a = listener.accept() => a,
        };
        let client = match accepted {
            Ok((client, _)) => client,
            Err(_) => {
                // Out of descriptors or similar: try again shortly.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // The epoch first, then the flag: a cut() that this check misses bumps the epoch after
        // it was read, so the connection still closes.
        let mut epoch = shared.epoch.subscribe();
        let accepted_in = *epoch.borrow_and_update();
        if shared.cut.load(Ordering::SeqCst) {
            drop(client);
            continue;
        }
        shared.live.fetch_add(1, Ordering::SeqCst);
        let guard = LiveGuard(shared.clone());
        let target = target.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let mut client = client;
            let cut = async {
                let _ = epoch.wait_for(|e| *e != accepted_in).await;
            };
            tokio::select! {
                _ = cut => {}
                _ = async {
                    let connect = tokio::net::TcpStream::connect(&target);
                    let Ok(Ok(mut upstream)) =
                        tokio::time::timeout(Duration::from_secs(10), connect).await
                    else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = upstream.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                } => {}
            }
            // Both sockets close here (client dropped with the task, upstream in the future).
        });
    }
}

// ---- a Redis of the test's own --------------------------------------------------------------

/// `redis-server` from PATH; panics naming the package when it is missing.
fn redis_server_binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("redis-server"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "redis-server is not on PATH; install it (apt-get install redis-server) or run \
                 the tests with scripts/test, which does"
            )
        })
}

/// A `redis-server` child process of one test (no persistence, loopback only), for fault
/// tests that kill and restart Redis. Killed by pid when dropped.
pub struct RedisServer {
    /// The port it listens on (127.0.0.1); the same after [`restart`](Self::restart).
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts it on a free port and waits until it answers PING.
    pub fn start() -> RedisServer {
        let mut server = RedisServer {
            port: 0,
            child: None,
            dir: tempfile::tempdir().expect("temp dir for redis-server"),
        };
        let mut last_error = String::new();
        // A free port can be taken by another process before redis-server binds it: try again.
        for _ in 0..5 {
            server.port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port();
            match server.spawn_and_wait() {
                Ok(()) => return server,
                Err(e) => last_error = e,
            }
        }
        panic!("redis-server did not start: {last_error}");
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills it (SIGKILL by pid, as a crash would) and reaps it; connections to it break.
    /// Everything it held is gone (it keeps nothing on disk).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills it (when running) and starts it again on the same port, waiting until PING
    /// answers. Panics when it does not within 10 s.
    pub fn restart(&mut self) {
        self.stop();
        // The port was ours a moment ago; another process taking it in between is unlikely
        // but possible, so retry a few times within the deadline.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => {
                    panic!("redis-server did not restart on port {}: {e}", self.port)
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Spawns redis-server on `self.port` and waits (10 s at most) for PING to answer; on
    /// failure the process is gone and the log is in the error.
    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log_path = self.dir.path().join("redis.log");
        let log = std::fs::File::create(&log_path).map_err(|e| format!("redis log: {e}"))?;
        let log2 = log.try_clone().map_err(|e| format!("redis log: {e}"))?;
        let child = Command::new(redis_server_binary())
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| format!("spawn redis-server: {e}"))?;
        self.child = Some(child);
        let addr = format!("127.0.0.1:{}", self.port);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            let failure = if let Some(status) = exited {
                Some(format!("exited at start ({status})"))
            } else if redis_ping(&addr, Duration::from_secs(1)).is_ok() {
                return Ok(());
            } else if Instant::now() > deadline {
                Some("no PONG within 10 s".to_string())
            } else {
                None
            };
            if let Some(failure) = failure {
                self.stop();
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(format!("{failure} on port {}; its log:\n{log}", self.port));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
