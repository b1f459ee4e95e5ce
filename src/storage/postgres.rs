//! The PostgreSQL store: the same append-only, content-addressed chunks as sled, in one table
//! that several relay nodes share.
//!
//! - One row per chunk, keyed by (document, kind, SHA-256 of the bytes). Inserts are
//!   `ON CONFLICT DO NOTHING`: the same bytes written twice (a retry, two nodes persisting the
//!   same merge) are one row, and different bytes never overwrite each other.
//! - Every call is one statement or one transaction, committed before it returns: an `append`
//!   that returned is a committed row, so the ack that follows it is durable.
//! - Compaction is one transaction that inserts the snapshot and deletes exactly the keys it
//!   was given (the chunks this node's snapshot contains). A chunk another node appended
//!   meanwhile is not among them and survives; two nodes compacting at once each delete only
//!   their own chunks and keep both snapshots, and a load merges them.
//! - Ids are stored with `COLLATE "C"`, so listing pages in byte order like sled does.
//! - The schema is created or migrated on start under an advisory lock, so nodes starting
//!   together do not race on `CREATE TABLE`. `relay_schema` holds the version.
//! - Connections are pooled (`deadpool-postgres`). A database that cannot be reached fails
//!   calls quickly (connect and wait timeouts) with `Unavailable`; [`GuardedStore`] then marks
//!   the store unhealthy, writes answer 503 and its probe (`SELECT 1`) finds it back.
//!
//! [`GuardedStore`]: super::GuardedStore

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use super::{ChunkKey, ChunkKind, Store, StoreError, StoreFuture, StoredChunk};
use crate::id::DocId;

/// The schema version this build writes; older schemas are migrated on start.
const SCHEMA_VERSION: i32 = 1;

/// Any constant: the advisory lock every starting node takes around the migration.
const MIGRATION_LOCK: i64 = 0x7265_6c61_7901;

const MIGRATIONS: &[&str] = &[
    // 1: chunks. Snapshots sort before incrementals (kind 0 before 1), as loads return them.
    "CREATE TABLE IF NOT EXISTS relay_chunks (
        doc TEXT COLLATE \"C\" NOT NULL,
        kind SMALLINT NOT NULL,
        hash TEXT NOT NULL,
        bytes BYTEA NOT NULL,
        created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (doc, kind, hash)
    )",
];

/// How the pool is sized and bounded.
#[derive(Clone, Copy, Debug)]
pub struct PgSettings {
    /// Most connections this node opens.
    pub max_connections: usize,
    /// Longest a connection attempt (or a wait for a free connection) may take.
    pub connect_timeout: Duration,
}

impl Default for PgSettings {
    fn default() -> Self {
        Self {
            max_connections: 16,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

pub struct PostgresStore {
    pool: Pool,
}

fn kind_code(kind: ChunkKind) -> i16 {
    match kind {
        ChunkKind::Snapshot => 0,
        ChunkKind::Incremental => 1,
    }
}

fn kind_of(code: i16) -> ChunkKind {
    if code == 0 {
        ChunkKind::Snapshot
    } else {
        ChunkKind::Incremental
    }
}

/// A failure to reach the database is `Unavailable` (503, retried by the probe); an error the
/// database answered with is `Failed`. Neither message carries the URL (it may hold a password).
fn pg_error(context: &str, e: &tokio_postgres::Error) -> StoreError {
    if e.as_db_error().is_some() {
        StoreError::failed(format!("postgres {context}: {e}"))
    } else {
        StoreError::unavailable(format!("postgres {context}: {e}"))
    }
}

fn pool_error(context: &str, e: PoolError) -> StoreError {
    match e {
        PoolError::Backend(e) => pg_error(context, &e),
        other => StoreError::unavailable(format!("postgres {context}: {other}")),
    }
}

/// The URL as logs may show it: without its password.
pub fn redacted(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((user, host)) => {
                let user = user.split(':').next().unwrap_or("");
                format!("{scheme}://{user}@{host}")
            }
            None => url.to_owned(),
        },
        None => "postgres://…".to_owned(),
    }
}

impl PostgresStore {
    /// Connects, creates or migrates the schema, and returns the store. Fails when the URL is
    /// malformed or the database cannot be reached within the connect timeout.
    pub async fn connect(url: &str, settings: PgSettings) -> Result<Self, StoreError> {
        let mut config = tokio_postgres::Config::from_str(url)
            .map_err(|e| StoreError::failed(format!("bad postgres URL: {e}")))?;
        config.connect_timeout(settings.connect_timeout);
        if config.get_application_name().is_none() {
            config.application_name("automerge-relay");
        }
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(settings.max_connections.max(1))
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(settings.connect_timeout))
            .wait_timeout(Some(settings.connect_timeout))
            .recycle_timeout(Some(settings.connect_timeout))
            .build()
            .map_err(|e| StoreError::failed(format!("postgres pool: {e}")))?;
        let store = Self { pool };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self
            .pool
            .get()
            .await
            .map_err(|e| pool_error("connect", e))?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| pg_error("migrate", &e))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(|e| pg_error("migrate", &e))?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS relay_schema (version INT NOT NULL)")
            .await
            .map_err(|e| pg_error("migrate", &e))?;
        let row = tx
            .query_opt("SELECT max(version) FROM relay_schema", &[])
            .await
            .map_err(|e| pg_error("migrate", &e))?;
        let current: i32 = row.and_then(|r| r.get::<_, Option<i32>>(0)).unwrap_or(0);
        if current > SCHEMA_VERSION {
            return Err(StoreError::failed(format!(
                "the database's schema is version {current}, newer than this build's \
                 {SCHEMA_VERSION}: upgrade automerge-relay"
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
            tx.batch_execute(sql)
                .await
                .map_err(|e| pg_error("migrate", &e))?;
            let version = i as i32 + 1;
            tx.execute(
                "INSERT INTO relay_schema (version) VALUES ($1)",
                &[&version],
            )
            .await
            .map_err(|e| pg_error("migrate", &e))?;
            tracing::info!(version, "postgres schema migrated");
        }
        tx.commit().await.map_err(|e| pg_error("migrate", &e))
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        let client = self.pool.get().await.map_err(|e| pool_error("connect", e));
        let s = self.pool.status();
        metrics::gauge!("relay_store_pool_connections").set(s.size as f64);
        metrics::gauge!("relay_store_pool_waiting").set(s.waiting as f64);
        client
    }
}

impl Store for PostgresStore {
    fn load(&self, doc: &DocId) -> StoreFuture<'_, Vec<StoredChunk>> {
        let doc = doc.clone();
        Box::pin(async move {
            let client = self.client().await?;
            let rows = client
                .query(
                    "SELECT kind, hash, bytes FROM relay_chunks WHERE doc = $1 \
                     ORDER BY kind, hash",
                    &[&doc.as_str()],
                )
                .await
                .map_err(|e| pg_error("load", &e))?;
            Ok(rows
                .into_iter()
                .map(|r| StoredChunk {
                    key: ChunkKey {
                        kind: kind_of(r.get(0)),
                        hash: r.get(1),
                    },
                    bytes: r.get(2),
                })
                .collect())
        })
    }

    fn keys(&self, doc: &DocId) -> StoreFuture<'_, Vec<ChunkKey>> {
        let doc = doc.clone();
        Box::pin(async move {
            let client = self.client().await?;
            let rows = client
                .query(
                    "SELECT kind, hash FROM relay_chunks WHERE doc = $1",
                    &[&doc.as_str()],
                )
                .await
                .map_err(|e| pg_error("keys", &e))?;
            Ok(rows
                .into_iter()
                .map(|r| ChunkKey {
                    kind: kind_of(r.get(0)),
                    hash: r.get(1),
                })
                .collect())
        })
    }

    fn append(&self, doc: &DocId, bytes: Vec<u8>) -> StoreFuture<'_, ChunkKey> {
        let doc = doc.clone();
        Box::pin(async move {
            let key = ChunkKey::for_bytes(ChunkKind::Incremental, &bytes);
            let client = self.client().await?;
            client
                .execute(
                    "INSERT INTO relay_chunks (doc, kind, hash, bytes) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT DO NOTHING",
                    &[&doc.as_str(), &kind_code(key.kind), &key.hash, &bytes],
                )
                .await
                .map_err(|e| pg_error("append", &e))?;
            Ok(key)
        })
    }

    fn compact(
        &self,
        doc: &DocId,
        snapshot: Vec<u8>,
        replaces: Vec<ChunkKey>,
    ) -> StoreFuture<'_, ChunkKey> {
        let doc = doc.clone();
        Box::pin(async move {
            let key = ChunkKey::for_bytes(ChunkKind::Snapshot, &snapshot);
            let (mut incrementals, mut snapshots) = (Vec::new(), Vec::new());
            for old in replaces.into_iter().filter(|old| *old != key) {
                match old.kind {
                    ChunkKind::Incremental => incrementals.push(old.hash),
                    ChunkKind::Snapshot => snapshots.push(old.hash),
                }
            }
            let mut client = self.client().await?;
            let tx = client
                .transaction()
                .await
                .map_err(|e| pg_error("compact", &e))?;
            tx.execute(
                "INSERT INTO relay_chunks (doc, kind, hash, bytes) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT DO NOTHING",
                &[&doc.as_str(), &kind_code(key.kind), &key.hash, &snapshot],
            )
            .await
            .map_err(|e| pg_error("compact", &e))?;
            for (kind, hashes) in [
                (ChunkKind::Incremental, &incrementals),
                (ChunkKind::Snapshot, &snapshots),
            ] {
                if hashes.is_empty() {
                    continue;
                }
                tx.execute(
                    "DELETE FROM relay_chunks WHERE doc = $1 AND kind = $2 AND hash = ANY($3)",
                    &[&doc.as_str(), &kind_code(kind), hashes],
                )
                .await
                .map_err(|e| pg_error("compact", &e))?;
            }
            tx.commit().await.map_err(|e| pg_error("compact", &e))?;
            Ok(key)
        })
    }

    fn delete(&self, doc: &DocId) -> StoreFuture<'_, ()> {
        let doc = doc.clone();
        Box::pin(async move {
            let client = self.client().await?;
            client
                .execute("DELETE FROM relay_chunks WHERE doc = $1", &[&doc.as_str()])
                .await
                .map_err(|e| pg_error("delete", &e))?;
            Ok(())
        })
    }

    fn list(&self, after: Option<&DocId>, limit: usize) -> StoreFuture<'_, Vec<DocId>> {
        let after = after.map(|a| a.as_str().to_owned()).unwrap_or_default();
        Box::pin(async move {
            let client = self.client().await?;
            let limit = limit.min(i64::MAX as usize) as i64;
            // A loose index scan: one index probe per id, not a pass over every chunk.
            let rows = client
                .query(
                    "WITH RECURSIVE ids(doc) AS (
                        (SELECT doc FROM relay_chunks WHERE doc > $1 ORDER BY doc LIMIT 1)
                        UNION ALL
                        SELECT (SELECT c.doc FROM relay_chunks c WHERE c.doc > ids.doc
                                ORDER BY c.doc LIMIT 1)
                        FROM ids WHERE ids.doc IS NOT NULL
                     )
                     SELECT doc FROM ids WHERE doc IS NOT NULL LIMIT $2",
                    &[&after, &limit],
                )
                .await
                .map_err(|e| pg_error("list", &e))?;
            Ok(rows
                .into_iter()
                .filter_map(|r| DocId::parse(r.get::<_, &str>(0)).ok())
                .collect())
        })
    }

    /// Every call commits before it returns; there is nothing left to flush.
    fn flush(&self) -> StoreFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    /// The database answers again.
    fn probe(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let client = self.client().await?;
            client
                .simple_query("SELECT 1")
                .await
                .map_err(|e| pg_error("probe", &e))?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database of its own on the server `RELAY_TEST_DATABASE_URL` names (scripts/test sets
    /// it), dropped at the end.
    struct Scratch {
        admin: String,
        name: String,
    }

    fn with_db(url: &str, db: &str) -> String {
        let (base, query) = match url.split_once('?') {
            Some((b, q)) => (b, format!("?{q}")),
            None => (url, String::new()),
        };
        let scheme_end = base.find("://").map_or(0, |i| i + 3);
        let host_end = base[scheme_end..]
            .find('/')
            .map_or(base.len(), |i| scheme_end + i);
        format!("{}/{db}{query}", &base[..host_end])
    }

    async fn admin_client(url: &str) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(url, NoTls)
            .await
            .expect("RELAY_TEST_DATABASE_URL reachable");
        tokio::spawn(conn);
        client
    }

    impl Scratch {
        async fn create(tag: &str) -> (Scratch, String) {
            let admin = std::env::var("RELAY_TEST_DATABASE_URL").expect(
                "RELAY_TEST_DATABASE_URL is not set: run the tests with scripts/test, which \
                 starts PostgreSQL and Redis",
            );
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let name = format!("relay_u_{tag}_{}_{nanos}", std::process::id());
            admin_client(&admin)
                .await
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await
                .unwrap();
            let url = with_db(&admin, &name);
            (Scratch { admin, name }, url)
        }

        async fn drop_db(self) {
            admin_client(&self.admin)
                .await
                .batch_execute(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    self.name
                ))
                .await
                .unwrap();
        }
    }

    #[test]
    fn urls_are_redacted_and_rebased() {
        assert_eq!(
            redacted("postgres://relay:s3cret@db:5432/docs"),
            "postgres://relay@db:5432/docs"
        );
        assert_eq!(redacted("postgres://db/docs"), "postgres://db/docs");
        assert_eq!(
            with_db("postgres://u@h:1/test?sslmode=disable", "x"),
            "postgres://u@h:1/x?sslmode=disable"
        );
        assert_eq!(with_db("postgres://u@h:1", "x"), "postgres://u@h:1/x");
    }

    #[tokio::test]
    async fn follows_the_store_contract() {
        let (scratch, url) = Scratch::create("contract").await;
        let store = PostgresStore::connect(&url, PgSettings::default())
            .await
            .unwrap();
        super::super::contract::all(&store).await;
        drop(store);
        scratch.drop_db().await;
    }

    #[tokio::test]
    async fn schema_is_created_once_by_nodes_starting_together_and_survives_a_restart() {
        let (scratch, url) = Scratch::create("schema").await;
        let starts = (0..4).map(|_| PostgresStore::connect(&url, PgSettings::default()));
        let stores: Vec<_> = futures_util::future::join_all(starts).await;
        let stores: Vec<PostgresStore> = stores.into_iter().map(|s| s.unwrap()).collect();
        let doc = DocId::parse("kept").unwrap();
        stores[0].append(&doc, b"abc".to_vec()).await.unwrap();
        let again = PostgresStore::connect(&url, PgSettings::default())
            .await
            .unwrap();
        let chunks = again.load(&doc).await.unwrap();
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].bytes, b"abc");
        let versions = admin_client(&url)
            .await
            .query("SELECT version FROM relay_schema", &[])
            .await
            .unwrap();
        assert_eq!(versions.len(), MIGRATIONS.len(), "each migration ran once");
        drop((stores, again));
        scratch.drop_db().await;
    }

    #[tokio::test]
    async fn two_nodes_compacting_at_once_lose_nothing() {
        let (scratch, url) = Scratch::create("compact").await;
        let a = PostgresStore::connect(&url, PgSettings::default())
            .await
            .unwrap();
        let b = PostgresStore::connect(&url, PgSettings::default())
            .await
            .unwrap();
        let doc = DocId::parse("both").unwrap();
        let ka = a.append(&doc, b"from a".to_vec()).await.unwrap();
        let kb = b.append(&doc, b"from b".to_vec()).await.unwrap();
        // Each node compacts what it wrote, concurrently.
        let (sa, sb) = tokio::join!(
            a.compact(&doc, b"snap a".to_vec(), vec![ka]),
            b.compact(&doc, b"snap b".to_vec(), vec![kb])
        );
        let (sa, sb) = (sa.unwrap(), sb.unwrap());
        let mut keys = a.keys(&doc).await.unwrap();
        keys.sort_by(|x, y| x.hash.cmp(&y.hash));
        let mut want = vec![sa, sb];
        want.sort_by(|x, y| x.hash.cmp(&y.hash));
        assert_eq!(
            keys, want,
            "both snapshots kept, both incrementals replaced"
        );
        drop((a, b));
        scratch.drop_db().await;
    }

    #[tokio::test]
    async fn an_unreachable_database_is_unavailable_quickly() {
        // A port nothing listens on (bound, then released).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = PostgresStore::connect(
            &format!("postgres://postgres@127.0.0.1:{port}/none"),
            PgSettings {
                max_connections: 2,
                connect_timeout: Duration::from_secs(2),
            },
        )
        .await
        .err()
        .expect("no database there");
        assert_eq!(err.kind, super::super::StoreErrorKind::Unavailable, "{err}");
    }
}
