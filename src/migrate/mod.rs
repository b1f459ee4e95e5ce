//! `automerge-relay import DIR` and `export DIR`: moving documents between the relay's store
//! and the automerge-repo storage layout (`NodeFSStorageAdapter`, what
//! automerge-repo-sync-server keeps its documents in). docs/migration.md is the user's guide.
//!
//! Both open the store exactly as the server does (`server::open_store`, so every `--store`
//! works and a sled data dir in use by a running relay is refused with the lock's message) and
//! start no server. One concern per file:
//!
//! - `layout.rs`: storage key ↔ path, snapshot names, which ids a Repo can use (pure);
//! - `scan.rs`: walking a directory, chunk files grouped per document;
//! - `stored.rs`: what the store holds of a document, as Automerge;
//! - `merge.rs`: import's pure half (what is new, as one chunk); `import.rs` runs it;
//! - `snapshot.rs`: export's pure half (the snapshot, what it replaces); `export.rs` runs it;
//! - `progress.rs`: the bar or plain lines on stderr; `summary.rs`: the closing lines.

mod export;
mod import;
mod layout;
mod merge;
mod progress;
mod scan;
mod snapshot;
mod stored;
mod summary;

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::config::{Migration, ServeArgs, StoreKind};
use crate::server::open_store;
use crate::storage::{Store, StoreErrorKind};

use export::{export, ExportJob};
use import::{import, ImportJob};
use summary::{Ending, ExportSummary, ImportSummary};

/// Runs `import` or `export` to the end and prints its summary on stdout; the exit status is
/// 0 when everything went (skipped files are named, not failures), 1 when the store or the
/// directory failed, 130 when interrupted.
pub fn run(job: Migration) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("automerge-relay: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async move {
        match job {
            Migration::Import(args) => {
                let store = match open("import", &args.serve, !args.dry_run).await {
                    Ok(store) => store,
                    Err(e) => return refused("import", &e),
                };
                let mut summary = ImportSummary {
                    dir: args.dir.clone(),
                    store: describe(&args.serve),
                    dry_run: args.dry_run,
                    ephemeral_store: args.serve.store == StoreKind::Memory,
                    ..Default::default()
                };
                let stop = stop_on_signal();
                let job = ImportJob {
                    dir: &args.dir,
                    dry_run: args.dry_run,
                    max_file: args.serve.max_doc_size as u64,
                    stop: &stop,
                };
                import(store, job, &mut summary).await;
                finish("import", &summary.ending, &summary)
            }
            Migration::Export(args) => {
                let store = match open("export", &args.serve, false).await {
                    Ok(store) => store,
                    Err(e) => return refused("export", &e),
                };
                let mut summary = ExportSummary {
                    dir: args.dir.clone(),
                    store: describe(&args.serve),
                    ..Default::default()
                };
                let stop = stop_on_signal();
                let job = ExportJob {
                    dir: &args.dir,
                    all_ids: args.all_ids,
                    stop: &stop,
                };
                export(store, job, &mut summary).await;
                finish("export", &summary.ending, &summary)
            }
        }
    });
    // Every store call has returned (the store itself was dropped in `block_on`, which
    // flushes sled); a task the guarded store gave up on must not hold the exit.
    runtime.shutdown_background();
    code
}

/// The store could not be opened: nothing was done, so no summary, only why.
fn refused(what: &str, why: &str) -> ExitCode {
    eprintln!("automerge-relay {what}: {why}");
    ExitCode::FAILURE
}

/// Prints the summary, and a failure once more on stderr; the exit status.
fn finish(what: &str, ending: &Ending, summary: &dyn std::fmt::Display) -> ExitCode {
    print!("{summary}");
    if let Ending::Failed(why) = ending {
        eprintln!("automerge-relay {what}: {why}");
    }
    ExitCode::from(ending.exit_code())
}

/// The store, as the summary names it.
fn describe(args: &ServeArgs) -> String {
    match &args.store {
        StoreKind::Sled => format!("sled store in {}", args.data_dir.display()),
        StoreKind::Memory => "memory store".into(),
        StoreKind::Postgres(_) => format!("PostgreSQL store {}", args.store),
    }
}

/// Opens the store as the server would. A store that cannot work now (a sled data dir another
/// process holds, a database that cannot be reached, a disk too full to open sled or, for
/// `writes`, under `--min-free-disk`) is an error with the store's own message.
async fn open(what: &str, args: &ServeArgs, writes: bool) -> Result<Arc<dyn Store>, String> {
    if what == "export" && args.store == StoreKind::Sled && !args.data_dir.exists() {
        return Err(format!(
            "there is no store in {} (--data-dir): nothing to export",
            args.data_dir.display()
        ));
    }
    let store = open_store(args).await.map_err(|e| {
        let mut message = e.to_string();
        if args.store == StoreKind::Sled && message.contains("in use") {
            message.push_str(
                ": stop the relay first (import and export open the store themselves), or \
                 work on a copy of the data dir",
            );
        }
        message
    })?;
    if let Some(refusing) = store.health().refusing {
        if writes || refusing.kind == StoreErrorKind::Unavailable {
            return Err(format!("the store cannot be used now: {refusing}"));
        }
    }
    Ok(store)
}

/// A flag set on SIGINT or SIGTERM: the run stops before its next document, keeps what it did
/// and still prints its summary. A second signal exits at once (every store write is durable
/// when it returns, and running again carries on).
fn stop_on_signal() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    tokio::spawn(async move {
        crate::server::shutdown_signal().await;
        eprintln!("automerge-relay: stopping after the current document (again to stop now)");
        flag.store(true, Ordering::Relaxed);
        crate::server::shutdown_signal().await;
        std::process::exit(130);
    });
    stop
}
