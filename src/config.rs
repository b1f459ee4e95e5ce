//! Command line and environment configuration (clap). Every flag has an env equivalent.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "automerge-relay",
    version,
    about = "A relay for Automerge documents: merges every upload, pushes changes live, \
             speaks the automerge-repo protocol.",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the server (what running with no subcommand does).
    Serve(Box<ServeArgs>),
    /// Print a new random secret and the --auth-tokens entry that accepts it (starts no
    /// server).
    Token(TokenArgs),
    /// Import the documents of an automerge-repo storage directory (NodeFSStorageAdapter,
    /// automerge-repo-sync-server) into the store (starts no server).
    Import(Box<ImportArgs>),
    /// Export every document of the store into an automerge-repo storage directory (starts no
    /// server).
    Export(Box<ExportArgs>),
}

/// `automerge-relay import DIR`: the store options are the server's.
#[derive(Args, Debug, Clone)]
pub struct ImportArgs {
    /// The automerge-repo storage directory (what NodeFSStorageAdapter wrote).
    pub dir: PathBuf,
    /// Read and check everything but store nothing: the summary says what an import would
    /// store.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// `automerge-relay export DIR`: the store options are the server's.
#[derive(Args, Debug, Clone)]
pub struct ExportArgs {
    /// The automerge-repo storage directory to write (created if missing).
    pub dir: PathBuf,
    /// Also export documents whose ids are not automerge-repo ids (bs58check): they are
    /// written in the layout, but a Repo cannot `find` them.
    #[arg(long)]
    pub all_ids: bool,
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// `import` or `export`: what `crate::migrate` runs.
#[derive(Debug)]
pub enum Migration {
    Import(ImportArgs),
    Export(ExportArgs),
}

#[derive(Args, Debug, Clone)]
pub struct TokenArgs {
    /// The entry's name, shown in logs and metrics instead of the secret.
    #[arg(long, default_value = "my-device")]
    pub name: String,
}

/// What the binary was asked to do.
pub enum Run {
    Serve(Box<ServeArgs>),
    /// `automerge-relay token`.
    Token {
        name: String,
    },
    /// `automerge-relay import` or `export`.
    Migrate(Box<Migration>),
}

impl Cli {
    /// The command, with serving whether or not `serve` was spelled out.
    pub fn into_command(self) -> Run {
        match self.command {
            Some(Command::Serve(args)) => Run::Serve(args),
            Some(Command::Token(args)) => Run::Token { name: args.name },
            Some(Command::Import(args)) => Run::Migrate(Box::new(Migration::Import(*args))),
            Some(Command::Export(args)) => Run::Migrate(Box::new(Migration::Export(*args))),
            None => Run::Serve(Box::new(self.serve)),
        }
    }
}

impl Run {
    /// The serve arguments, or what runs instead of the server. (lib.rs re-exports only `Cli`
    /// and `NotServing`, so the binary cannot match on `Run` itself.)
    pub fn into_serve_args(self) -> Result<ServeArgs, NotServing> {
        match self {
            Run::Serve(args) => Ok(*args),
            Run::Token { name } => Err(NotServing::Token(TokenPrintout {
                text: crate::auth::token_printout(&name),
            })),
            Run::Migrate(job) => Err(NotServing::Migrate(job)),
        }
    }
}

/// A command that starts no server.
pub enum NotServing {
    /// `token`: what it prints.
    Token(TokenPrintout),
    /// `import` or `export`: `crate::run_migration` runs it.
    Migrate(Box<Migration>),
}

/// What `automerge-relay token` prints: the secret and its entry, or why none could be made.
pub struct TokenPrintout {
    pub text: Result<String, String>,
}

/// `--store`: which backend holds the documents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreKind {
    /// Embedded sled database in --data-dir (durable).
    Sled,
    /// In memory only: everything is lost at exit. For experiments and tests.
    Memory,
    /// PostgreSQL at this URL, shared by every node that names it.
    Postgres(String),
}

impl std::fmt::Display for StoreKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreKind::Sled => f.write_str("sled"),
            StoreKind::Memory => f.write_str("memory"),
            StoreKind::Postgres(url) => f.write_str(&crate::storage::redacted(url)),
        }
    }
}

/// Parses `--store`: `sled`, `memory`, or a `postgres://` (or `postgresql://`) URL.
pub fn parse_store(raw: &str) -> Result<StoreKind, String> {
    let s = raw.trim();
    match s {
        "sled" => Ok(StoreKind::Sled),
        "memory" => Ok(StoreKind::Memory),
        _ if s.starts_with("postgres://") || s.starts_with("postgresql://") => {
            Ok(StoreKind::Postgres(s.to_owned()))
        }
        _ => Err("expected sled, memory or a postgres://user@host:port/db URL".to_owned()),
    }
}

/// Parses `--fanout`: a `redis://` URL.
pub fn parse_fanout(raw: &str) -> Result<String, String> {
    let s = raw.trim();
    if s.starts_with("redis://") || s.starts_with("rediss://") {
        Ok(s.to_owned())
    } else {
        Err("expected a redis://host:port URL".to_owned())
    }
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, env = "RELAY_LISTEN", default_value = "127.0.0.1:5000")]
    pub listen: String,

    /// Directory of the embedded store.
    #[arg(long, env = "RELAY_DATA_DIR", default_value = "./relay-data")]
    pub data_dir: PathBuf,

    /// Storage backend: `sled` (embedded, in --data-dir), `memory` (lost at exit), or a
    /// PostgreSQL URL (`postgres://user@host:port/db`) that several relay nodes share.
    #[arg(long, env = "RELAY_STORE", default_value = "sled", value_parser = parse_store)]
    pub store: StoreKind,

    /// Most connections to PostgreSQL this node opens (with --store postgres://…).
    #[arg(long, env = "RELAY_STORE_POOL", default_value_t = 16)]
    pub store_pool: usize,

    /// Redis URL (`redis://host:port`) over which nodes sharing one PostgreSQL store pass
    /// each other their persisted changes, so subscribers on every node see them at once.
    #[arg(long, env = "RELAY_FANOUT", value_parser = parse_fanout)]
    pub fanout: Option<String>,

    /// Prefix of this cluster's Redis channels, so several clusters can share one Redis.
    #[arg(long, env = "RELAY_FANOUT_PREFIX", default_value = "relay:")]
    pub fanout_prefix: String,

    /// Changes larger than this are announced over Redis, not sent: the other nodes read
    /// them from the store.
    #[arg(long, env = "RELAY_FANOUT_MAX_MESSAGE", default_value = "256KiB", value_parser = parse_size)]
    pub fanout_max_message: usize,

    /// Seconds between two checks of every hot document against the store, which repair
    /// changes a node missed over Redis (0: never).
    #[arg(long, env = "RELAY_HEADS_CHECK_SECS", default_value_t = 30)]
    pub heads_check_secs: u64,

    /// Page cache of the embedded store, on top of --memory-budget. sled's real footprint is
    /// about 1.3 times this once full; the hot documents are the main cache.
    #[arg(long, env = "RELAY_STORE_CACHE", default_value = "16MiB", value_parser = parse_size)]
    pub store_cache: usize,

    /// Largest accepted upload (HTTP body or WebSocket message), e.g. 16MiB, 512KiB, 1000000.
    #[arg(long, env = "RELAY_MAX_BODY", default_value = "16MiB", value_parser = parse_size)]
    pub max_body: usize,

    /// Largest a document may grow to (stored size); a write past it gets 413 and the
    /// document stays as it was.
    #[arg(long, env = "RELAY_MAX_DOC_SIZE", default_value = "256MiB", value_parser = parse_size)]
    pub max_doc_size: usize,

    /// Most changes that may wait for missing dependencies in one document; an upload that
    /// would add more gets 409 `too_many_pending`.
    #[arg(long, env = "RELAY_MAX_PENDING_CHANGES", default_value_t = 10_000)]
    pub max_pending_changes: usize,

    /// Largest size one upload may decode to (Automerge compresses its columns, so a small
    /// body can inflate a lot); past it the upload gets 413 before it is loaded. Default:
    /// --max-doc-size.
    #[arg(long, env = "RELAY_MAX_DECODED_UPLOAD", value_parser = parse_size)]
    pub max_decoded_upload: Option<usize>,

    /// Scratch memory all uploads being validated at once may use (about twice each one's
    /// decoded size); past it validations queue.
    #[arg(long, env = "RELAY_VALIDATION_MEMORY", default_value = "256MiB", value_parser = parse_size)]
    pub validation_memory: usize,

    /// Connections the server keeps open in all: HTTP, WebSocket and SSE. Past it a few more
    /// get answers to /_/health and 503 otherwise; the rest are closed. Lowered at start to
    /// fit the file-descriptor limit (raised to the hard limit first).
    #[arg(long, env = "RELAY_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,

    /// Seconds a client has to send a request's headers; an idle keep-alive connection is
    /// closed after this long too.
    #[arg(long, env = "RELAY_HEADER_TIMEOUT_SECS", default_value_t = 30)]
    pub header_timeout_secs: u64,

    /// Live per-document WebSocket and SSE connections to one document; more get 503.
    #[arg(long, env = "RELAY_MAX_DOC_CONNECTIONS", default_value_t = 2_000)]
    pub max_doc_connections: usize,

    /// Messages per second one WebSocket may send (bursts of twice that pass); a socket
    /// that keeps exceeding it is closed with 1008.
    #[arg(long, env = "RELAY_MAX_MESSAGES_PER_SEC", default_value_t = 200)]
    pub max_messages_per_sec: u32,

    /// Allowed CORS origins, comma-separated; default: any origin.
    #[arg(long, env = "RELAY_CORS_ORIGIN", value_delimiter = ',')]
    pub cors_origin: Vec<String>,

    /// Events that may wait for one live subscriber before it is switched to catch-up mode.
    #[arg(long, env = "RELAY_SUBSCRIBER_QUEUE", default_value_t = 64)]
    pub subscriber_queue: usize,

    /// Seconds between WebSocket pings; a socket that misses two is dropped.
    #[arg(long, env = "RELAY_PING_SECS", default_value_t = 5)]
    pub ping_secs: u64,

    /// Bytes that may wait for one live connection's peer: an automerge-repo peer past it is
    /// closed with 4008 (its ephemeral messages are dropped instead); a per-document WebSocket
    /// or SSE subscriber is switched to one catch-up.
    #[arg(long, env = "RELAY_MAX_PEER_QUEUE", default_value = "4MiB", value_parser = parse_size)]
    pub max_peer_queue: usize,

    /// Seconds writing one message to a WebSocket may take; a peer that does not take it in
    /// time is closed with 4008.
    #[arg(long, env = "RELAY_SEND_TIMEOUT_SECS", default_value_t = 30)]
    pub send_timeout_secs: u64,

    /// Largest ephemeral message relayed between automerge-repo peers; larger ones are dropped.
    #[arg(long, env = "RELAY_MAX_EPHEMERAL", default_value = "64KiB", value_parser = parse_size)]
    pub max_ephemeral: usize,

    /// Estimated memory hot documents may use; past it, idle documents (no subscribers, no
    /// pending writes) are evicted least-recently-used first and reloaded on demand.
    #[arg(long, env = "RELAY_MEMORY_BUDGET", default_value = "512MiB", value_parser = parse_size)]
    pub memory_budget: usize,

    /// Longest milliseconds a push to an automerge-repo peer waits for the peer to answer the
    /// relay's previous sync message (a peer that answered gets pushes at once; answers to a
    /// peer's own changes and requests are never held back).
    #[arg(long, env = "RELAY_REPO_SYNC_INTERVAL_MS", default_value_t = 50)]
    pub repo_sync_interval_ms: u64,

    /// Seconds to wait for in-flight work at shutdown before exiting anyway.
    #[arg(long, env = "RELAY_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    pub shutdown_grace_secs: u64,

    /// Free space to keep on the data dir's file system: while less is free, writes are
    /// refused (507) and nothing is stored. A size (1GiB), a share of the file system (5%), or
    /// 0 for no check. Default: 256 MiB or 5% of the file system, whichever is smaller.
    #[arg(long, env = "RELAY_MIN_FREE_DISK", value_parser = parse_min_free)]
    pub min_free_disk: Option<MinFreeDisk>,

    /// Longest any store operation may take; one that fails or takes longer marks the store
    /// unhealthy: writes get 503 at once until a probe write succeeds.
    #[arg(long, env = "RELAY_STORE_TIMEOUT_SECS", default_value_t = 10)]
    pub store_timeout_secs: u64,

    /// Test only: inject store faults, read from this file on every store write (`ok`,
    /// `fail`, `hang`, `full`, `disk-full`).
    #[arg(long, env = "RELAY_TEST_FAULTS", hide = true)]
    pub test_faults: Option<PathBuf>,

    /// Static tokens with their grants (TOML, `[[token]]` entries; `automerge-relay token`
    /// makes one). Reloaded on SIGHUP.
    #[arg(long, env = "RELAY_AUTH_TOKENS")]
    pub auth_tokens: Option<PathBuf>,

    /// Accept HS256 JWTs signed with this file's bytes as the key (one trailing newline is
    /// ignored). Reloaded on SIGHUP.
    #[arg(long, env = "RELAY_AUTH_JWT_SECRET_FILE")]
    pub auth_jwt_secret_file: Option<PathBuf>,

    /// Accept EdDSA or ES256 JWTs verified with this PEM public key. Reloaded on SIGHUP.
    #[arg(long, env = "RELAY_AUTH_JWT_PUBLIC_KEY")]
    pub auth_jwt_public_key: Option<PathBuf>,

    /// Required JWT audience (`aud`), comma-separated for several; default: not checked.
    #[arg(long, env = "RELAY_AUTH_JWT_AUDIENCE", value_delimiter = ',')]
    pub auth_jwt_audience: Vec<String>,

    /// Serve without credentials on a non-loopback address (anyone who can reach the relay
    /// can read, overwrite and delete every document).
    #[arg(long, env = "RELAY_ALLOW_ANONYMOUS")]
    pub allow_anonymous: bool,

    /// Serve /_/metrics without a token (it never shows secrets or document contents).
    #[arg(long, env = "RELAY_METRICS_PUBLIC")]
    pub metrics_public: bool,

    /// POST a signed JSON call to this http(s) URL after a document changes (debounced) or is
    /// deleted. Needs --webhook-secret-file.
    #[arg(long, env = "RELAY_WEBHOOK")]
    pub webhook: Option<String>,

    /// The key of the webhook signature (X-Relay-Signature, HMAC-SHA256): this file's bytes,
    /// one trailing newline ignored.
    #[arg(long, env = "RELAY_WEBHOOK_SECRET_FILE")]
    pub webhook_secret_file: Option<PathBuf>,

    /// Quiet milliseconds after a document's last change before its webhook call is sent.
    #[arg(long, env = "RELAY_WEBHOOK_DEBOUNCE_MS", default_value_t = 2_000)]
    pub webhook_debounce_ms: u64,

    /// Longest a change waits for its webhook call however busy its document is.
    #[arg(long, env = "RELAY_WEBHOOK_MAX_WAIT_MS", default_value_t = 10_000)]
    pub webhook_max_wait_ms: u64,

    /// Retries of a webhook call after a network error, a timeout, a 429 or a 5xx (backoff
    /// 0.5 s, 1 s, 2 s … up to 30 s).
    #[arg(long, env = "RELAY_WEBHOOK_RETRIES", default_value_t = 5)]
    pub webhook_retries: u32,

    /// Documents whose webhook calls may wait at once; past it a new document's calls are
    /// dropped (counted in relay_webhook_dropped_total).
    #[arg(long, env = "RELAY_WEBHOOK_QUEUE", default_value_t = 10_000)]
    pub webhook_queue: usize,

    /// Seconds one webhook request may take (at least 1).
    #[arg(long, env = "RELAY_WEBHOOK_TIMEOUT_SECS", default_value_t = 10)]
    pub webhook_timeout_secs: u64,
}

/// `--min-free-disk`: bytes, or a share of the file system.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MinFreeDisk {
    Bytes(u64),
    Percent(f64),
}

/// Parses `--min-free-disk`: a size (`parse_size`), `N%` (0–100), or `0` (no check).
pub fn parse_min_free(raw: &str) -> Result<MinFreeDisk, String> {
    let s = raw.trim();
    if let Some(pct) = s.strip_suffix('%') {
        let p: f64 = pct
            .trim()
            .parse()
            .map_err(|_| format!("{raw:?} is not a share like 5%"))?;
        if !(0.0..=100.0).contains(&p) {
            return Err(format!("{raw:?} is not between 0% and 100%"));
        }
        return Ok(MinFreeDisk::Percent(p));
    }
    if s == "0" {
        return Ok(MinFreeDisk::Bytes(0));
    }
    parse_size(s).map(|b| MinFreeDisk::Bytes(b as u64))
}

impl ServeArgs {
    pub fn ping_interval(&self) -> Duration {
        Duration::from_secs(self.ping_secs.max(1))
    }

    /// The bound of every store operation (`--store-timeout-secs`, at least 1 s).
    pub fn store_timeout(&self) -> Duration {
        Duration::from_secs(self.store_timeout_secs.max(1))
    }

    pub fn send_timeout(&self) -> Duration {
        Duration::from_secs(self.send_timeout_secs.max(1))
    }

    /// Where credentials come from.
    pub fn auth_settings(&self) -> crate::auth::AuthSettings {
        crate::auth::AuthSettings {
            tokens_file: self.auth_tokens.clone(),
            jwt_secret_file: self.auth_jwt_secret_file.clone(),
            jwt_public_key: self.auth_jwt_public_key.clone(),
            jwt_audience: self.auth_jwt_audience.clone(),
        }
    }
}

/// Parses a byte size: a plain number, or a number with K/KB/KiB, M/MB/MiB, G/GB/GiB (powers of 1024).
pub fn parse_size(raw: &str) -> Result<usize, String> {
    let s = raw.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| format!("{raw:?} is not a size like 16MiB or 1048576"))?;
    let mult: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => return Err(format!("unknown size unit {other:?} in {raw:?}")),
    };
    n.checked_mul(mult)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("{raw:?} is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("0").is_err());
        assert!(parse_size("12 parsecs").is_err());
    }

    fn serve_args(cli: Cli) -> ServeArgs {
        match cli.into_command() {
            Run::Serve(args) => *args,
            Run::Token { .. } | Run::Migrate(_) => panic!("expected serve"),
        }
    }

    #[test]
    fn min_free_disk() {
        assert_eq!(parse_min_free("1GiB"), Ok(MinFreeDisk::Bytes(1 << 30)));
        assert_eq!(parse_min_free("5%"), Ok(MinFreeDisk::Percent(5.0)));
        assert_eq!(parse_min_free("0"), Ok(MinFreeDisk::Bytes(0)));
        assert!(parse_min_free("101%").is_err());
        assert!(parse_min_free("lots").is_err());
        let args = serve_args(Cli::parse_from(["automerge-relay"]));
        assert_eq!(
            args.min_free_disk, None,
            "the default depends on the file system"
        );
        assert_eq!(args.store_timeout(), Duration::from_secs(10));
    }

    #[test]
    fn defaults_match_the_contract() {
        let cli = Cli::parse_from(["automerge-relay"]);
        let args = serve_args(cli);
        assert_eq!(args.listen, "127.0.0.1:5000");
        assert_eq!(args.data_dir, PathBuf::from("./relay-data"));
        assert_eq!(args.max_body, 16 << 20);
        assert_eq!(args.max_peer_queue, 4 << 20);
        assert_eq!(args.send_timeout(), Duration::from_secs(30));
        assert_eq!(args.max_ephemeral, 64 << 10);
        let cli = Cli::parse_from(["automerge-relay", "serve", "--listen", "127.0.0.1:0"]);
        assert_eq!(serve_args(cli).listen, "127.0.0.1:0");
    }

    #[test]
    fn the_token_subcommand_takes_a_name_and_no_serve_flags() {
        let name = |cli: Cli| match cli.into_command() {
            Run::Token { name } => name,
            Run::Serve(_) | Run::Migrate(_) => panic!("expected token"),
        };
        assert_eq!(
            name(Cli::parse_from(["automerge-relay", "token"])),
            "my-device"
        );
        let cli = Cli::parse_from(["automerge-relay", "token", "--name", "alice-laptop"]);
        assert_eq!(name(cli), "alice-laptop");
        let with_serve_flag = ["automerge-relay", "token", "--listen", "0.0.0.0:5000"];
        assert!(Cli::try_parse_from(with_serve_flag).is_err());
        let printout = Cli::parse_from(["automerge-relay", "token"])
            .into_command()
            .into_serve_args()
            .err();
        assert!(
            matches!(printout, Some(NotServing::Token(TokenPrintout { text: Ok(text) })) if text.contains("name = \"my-device\""))
        );
    }

    #[test]
    fn import_and_export_take_a_dir_and_the_store_flags() {
        let job = |args: &[&str]| match Cli::parse_from(args).into_command() {
            Run::Migrate(job) => *job,
            _ => panic!("expected a migration"),
        };
        let cli = ["automerge-relay", "import", "repo-data", "--dry-run"];
        let Migration::Import(import) = job(&cli) else {
            panic!("expected import")
        };
        assert_eq!(import.dir, PathBuf::from("repo-data"));
        assert!(import.dry_run);
        assert_eq!(import.serve.store, StoreKind::Sled);
        let cli = [
            "automerge-relay",
            "export",
            "out",
            "--store",
            "memory",
            "--all-ids",
        ];
        let Migration::Export(export) = job(&cli) else {
            panic!("expected export")
        };
        assert_eq!(export.dir, PathBuf::from("out"));
        assert!(export.all_ids);
        assert_eq!(export.serve.store, StoreKind::Memory);
        assert!(
            Cli::try_parse_from(["automerge-relay", "import"]).is_err(),
            "DIR is required"
        );
    }

    #[test]
    fn webhook_defaults() {
        let args = serve_args(Cli::parse_from(["automerge-relay"]));
        assert_eq!(args.webhook, None);
        assert_eq!(args.webhook_debounce_ms, 2_000);
        assert_eq!(args.webhook_max_wait_ms, 10_000);
        assert_eq!(args.webhook_retries, 5);
        assert_eq!(args.webhook_queue, 10_000);
        assert_eq!(args.webhook_timeout_secs, 10);
    }
}
