//! The scale-out tests' helpers (tests/common/services.rs) checked against the real servers:
//! a test database that exists and then does not, a TCP proxy that forwards, cuts and restores,
//! a Redis of the test's own that restarts on its port, key cleanup by prefix. Needs
//! RELAY_TEST_DATABASE_URL and RELAY_TEST_REDIS_URL (scripts/test provides them).

mod common;

use std::time::{Duration, Instant};

use common::services::*;

/// How long a cut connection may take to fail.
const CUT_FAILS_WITHIN: Duration = Duration::from_secs(2);
const DEADLINE: Duration = Duration::from_secs(10);

fn database_exists(name: &str) -> bool {
    let rows = pg_query(
        &database_url(),
        &format!("SELECT count(*) FROM pg_database WHERE datname = '{name}'"),
    )
    .expect("query pg_database");
    rows[0][0].as_deref() == Some("1")
}

fn ping_via(url: &str) -> Result<String, String> {
    let mut con = redis_connection(url, CUT_FAILS_WITHIN)?;
    redis::cmd("PING")
        .query::<String>(&mut con)
        .map_err(|e| e.to_string())
}

#[test]
fn with_database_replaces_only_the_database() {
    assert_eq!(
        with_database("postgres://postgres@127.0.0.1:5432/test", "x"),
        "postgres://postgres@127.0.0.1:5432/x"
    );
    assert_eq!(
        with_database(
            "postgres://u:p@h:1/db?sslmode=disable&application_name=a",
            "x"
        ),
        "postgres://u:p@h:1/x?sslmode=disable&application_name=a"
    );
    assert_eq!(with_database("postgresql://h", "x"), "postgresql://h/x");
    assert_eq!(with_database("postgres://h:5/", "x"), "postgres://h:5/x");
    assert_eq!(
        with_database("postgres://h?connect_timeout=3", "x"),
        "postgres://h/x?connect_timeout=3"
    );
    assert_eq!(
        with_database("postgres://h/a?dbname=a&user=u", "x"),
        "postgres://h/x?dbname=x&user=u"
    );
}

#[test]
fn urls_are_redacted_and_split() {
    assert_eq!(
        redact("postgres://u:secret@h:1/db"),
        "postgres://u:***@h:1/db"
    );
    assert_eq!(redact("redis://:secret@h:1"), "redis://:***@h:1");
    assert_eq!(
        redact("postgres://h/db?password=secret&user=u"),
        "postgres://h/db?password=***&user=u"
    );
    assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    assert_eq!(
        host_port("postgres://u:p@db.example:6543/x?y=1"),
        "db.example:6543"
    );
    assert_eq!(host_port("postgres://u@db.example/x"), "db.example:5432");
    assert_eq!(host_port("redis://127.0.0.1"), "127.0.0.1:6379");
    assert_eq!(host_port("127.0.0.1:7000"), "127.0.0.1:7000");
}

#[test]
fn test_db_is_created_reachable_and_dropped() {
    let db = TestDb::create();
    let other = TestDb::create();
    assert_ne!(db.name, other.name);
    assert!(db.name.starts_with("relay_t_"), "{}", db.name);
    assert_eq!(db.url, with_database(&database_url(), &db.name));

    let rows = pg_query(&db.url, "SELECT 1, current_database()").expect("SELECT 1 on the test db");
    assert_eq!(rows, vec![vec![Some("1".into()), Some(db.name.clone())]]);
    // It starts empty: no tables of a previous test.
    let tables = pg_query(
        &db.url,
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .unwrap();
    assert_eq!(tables[0][0].as_deref(), Some("0"));
    pg_query(&db.url, "CREATE TABLE t (x int); INSERT INTO t VALUES (7)").unwrap();

    // Dropped even while someone is still connected (a node the test did not stop): hold a
    // connection open on another thread across the drop.
    let (url, name) = (db.url.clone(), db.name.clone());
    let (connected_tx, connected_rx) = std::sync::mpsc::channel();
    let holder = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .expect("connect to the test db");
                let conn = tokio::spawn(conn);
                client.simple_query("SELECT 1").await.unwrap();
                connected_tx.send(()).unwrap();
                // Ends when the server terminates the connection (the forced drop).
                let _ = conn.await;
            })
    });
    connected_rx
        .recv_timeout(DEADLINE)
        .expect("holder connected");
    assert!(database_exists(&name));
    drop(db);
    assert!(!database_exists(&name), "{name} still exists after drop");
    assert!(pg_query(&with_database(&database_url(), &name), "SELECT 1").is_err());
    let start = Instant::now();
    while !holder.is_finished() {
        assert!(
            start.elapsed() < DEADLINE,
            "the held connection was not closed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    holder.join().unwrap();

    assert!(database_exists(&other.name));
}

/// The helpers block on runtimes of their own: they must work inside an async test too.
#[tokio::test]
async fn helpers_work_inside_async_tests() {
    let db = TestDb::create();
    let rows = pg_query(&db.url, "SELECT 2").unwrap();
    assert_eq!(rows[0][0].as_deref(), Some("2"));
    let name = db.name.clone();
    drop(db);
    assert!(!database_exists(&name));

    let prefix = key_prefix();
    let mut con = redis_connection(&redis_url(), DEADLINE).unwrap();
    redis::cmd("SET")
        .arg(format!("{prefix}k"))
        .arg("v")
        .query::<()>(&mut con)
        .unwrap();
    assert_eq!(redis_cleanup(&redis_url(), &prefix).unwrap(), 1);
}

#[test]
fn redis_cleanup_deletes_only_its_prefix() {
    let (mine, theirs) = (key_prefix(), key_prefix());
    assert_ne!(mine, theirs);
    assert!(mine.ends_with(':'), "{mine}");
    let url = redis_url();
    let mut con = redis_connection(&url, DEADLINE).unwrap();
    for i in 0..2500 {
        redis::cmd("SET")
            .arg(format!("{mine}doc-{i}"))
            .arg(i)
            .query::<()>(&mut con)
            .unwrap();
    }
    redis::cmd("SET")
        .arg(format!("{theirs}doc"))
        .arg(1)
        .query::<()>(&mut con)
        .unwrap();

    assert_eq!(redis_cleanup(&url, &mine).unwrap(), 2500);
    let exists: usize = redis::cmd("EXISTS")
        .arg(format!("{mine}doc-0"))
        .arg(format!("{mine}doc-2499"))
        .arg(format!("{theirs}doc"))
        .query(&mut con)
        .unwrap();
    assert_eq!(exists, 1, "only the other prefix's key is left");
    assert_eq!(redis_cleanup(&url, &theirs).unwrap(), 1);
    assert_eq!(redis_cleanup(&url, &theirs).unwrap(), 0);
}

#[test]
fn tcp_proxy_forwards_cuts_and_restores() {
    let url = redis_url();
    let proxy = TcpProxy::start(&url);
    let via = proxy.url_for(&url);
    assert!(via.contains(&format!("127.0.0.1:{}", proxy.port)), "{via}");
    assert_eq!(proxy.live(), 0);

    // Forwards: PING → PONG through it, on a connection it counts.
    let mut con = redis_connection(&via, DEADLINE).unwrap();
    let pong: String = redis::cmd("PING").query(&mut con).unwrap();
    assert_eq!(pong, "PONG");
    assert_eq!(proxy.live(), 1);

    // Cut: the open connection's next command fails, and so does a new connection, quickly.
    proxy.cut();
    assert_eq!(proxy.live(), 0);
    let start = Instant::now();
    let after_cut = redis::cmd("PING").query::<String>(&mut con);
    assert!(
        after_cut.is_err(),
        "PING on a cut connection: {after_cut:?}"
    );
    assert!(
        start.elapsed() < CUT_FAILS_WITHIN,
        "took {:?}",
        start.elapsed()
    );
    let start = Instant::now();
    let fresh = ping_via(&via);
    assert!(fresh.is_err(), "new connection while cut: {fresh:?}");
    assert!(
        start.elapsed() < CUT_FAILS_WITHIN,
        "took {:?}",
        start.elapsed()
    );
    let raw = redis_ping(&format!("127.0.0.1:{}", proxy.port), CUT_FAILS_WITHIN);
    assert!(raw.is_err(), "raw PING while cut: {raw:?}");
    assert_eq!(proxy.live(), 0);

    // Restore: new connections work again.
    proxy.restore();
    let pong = poll_until("PING through the restored proxy", DEADLINE, || {
        ping_via(&via).ok()
    });
    assert_eq!(pong, "PONG");
    let mut con = redis_connection(&via, DEADLINE).unwrap();
    let pong: String = redis::cmd("PING").query(&mut con).unwrap();
    assert_eq!(pong, "PONG");
    assert_eq!(proxy.live(), 1);

    // Cut and restore again, with the connection idle in between.
    proxy.cut();
    proxy.restore();
    assert!(redis::cmd("PING").query::<String>(&mut con).is_err());
    assert_eq!(ping_via(&via).unwrap(), "PONG");

    // Dropped: nothing listens on its port any more.
    let port = proxy.port;
    drop(proxy);
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[test]
fn tcp_proxy_forwards_postgres() {
    let db = TestDb::create();
    let proxy = TcpProxy::start(&db.url);
    let via = proxy.url_for(&db.url);
    assert_eq!(
        via,
        with_database(&proxy.url_for(&database_url()), &db.name),
        "user, database and parameters kept"
    );
    let rows = pg_query(&via, "SELECT current_database()").unwrap();
    assert_eq!(rows[0][0].as_deref(), Some(db.name.as_str()));

    proxy.cut();
    let start = Instant::now();
    assert!(pg_query(&via, "SELECT 1").is_err());
    assert!(
        start.elapsed() < CUT_FAILS_WITHIN,
        "took {:?}",
        start.elapsed()
    );
    proxy.restore();
    let rows = poll_until("SELECT 1 through the restored proxy", DEADLINE, || {
        pg_query(&via, "SELECT 1").ok()
    });
    assert_eq!(rows[0][0].as_deref(), Some("1"));
}

#[test]
fn tcp_proxy_closes_connections_its_target_refuses() {
    let server = RedisServer::start();
    let proxy = TcpProxy::start(&server.url());
    let via = proxy.url_for(&server.url());
    assert_eq!(ping_via(&via).unwrap(), "PONG");
    let port = server.port;
    drop(server);
    let start = Instant::now();
    assert!(ping_via(&via).is_err());
    assert!(
        start.elapsed() < CUT_FAILS_WITHIN,
        "took {:?}",
        start.elapsed()
    );
    poll_until("no live connections", DEADLINE, || {
        (proxy.live() == 0).then_some(())
    });
    assert!(redis_ping(&format!("127.0.0.1:{port}"), CUT_FAILS_WITHIN).is_err());
}

#[test]
fn redis_server_restarts_on_its_port() {
    let mut server = RedisServer::start();
    let url = server.url();
    let port = server.port;
    let first_pid = server.pid().expect("running");
    assert_eq!(ping_via(&url).unwrap(), "PONG");
    let mut con = redis_connection(&url, DEADLINE).unwrap();
    redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query::<()>(&mut con)
        .unwrap();

    server.restart();
    assert_eq!(server.port, port);
    assert_eq!(server.url(), url);
    assert_ne!(server.pid(), Some(first_pid));
    // The old connection broke; a new one answers on the same port, and nothing was kept.
    assert!(redis::cmd("GET")
        .arg("k")
        .query::<String>(&mut con)
        .is_err());
    let mut con = redis_connection(&url, DEADLINE).unwrap();
    let v: Option<String> = redis::cmd("GET").arg("k").query(&mut con).unwrap();
    assert_eq!(v, None);

    // Stopped: nothing answers; restarted from stopped: it answers again.
    server.stop();
    assert!(server.pid().is_none());
    assert!(redis_ping(&format!("127.0.0.1:{port}"), CUT_FAILS_WITHIN).is_err());
    server.restart();
    assert_eq!(ping_via(&url).unwrap(), "PONG");

    // Dropped: its process is gone.
    let pid = server.pid().unwrap();
    drop(server);
    let proc_path = format!("/proc/{pid}");
    assert!(
        !std::path::Path::new(&proc_path).exists(),
        "redis-server {pid} still running"
    );
}
