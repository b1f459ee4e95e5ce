//! The `automerge-relay` binary: parse flags, set up logging, run until a signal; or, for
//! `automerge-relay token`, print a new token and exit (no runtime, no logging, no server);
//! or, for `import` and `export`, migrate from or to an automerge-repo directory (no server).

use std::future::Future;
use std::io::IsTerminal;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use automerge_relay::{Cli, NotServing};

fn main() -> std::process::ExitCode {
    let args = match Cli::parse().into_command().into_serve_args() {
        Ok(args) => args,
        Err(NotServing::Migrate(job)) => {
            // Only the store's warnings and errors by default: the progress and the summary are
            // the command's own output.
            let level = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into());
            tracing_subscriber::fmt()
                .with_env_filter(log_filter(&level))
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr)
                .init();
            return automerge_relay::run_migration(*job);
        }
        Err(NotServing::Token(token)) => {
            return match token.text {
                Ok(text) => {
                    print!("{text}");
                    std::process::ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("automerge-relay token: {e}");
                    std::process::ExitCode::FAILURE
                }
            };
        }
    };
    // Before the runtime starts its threads.
    automerge_relay::tune_allocator();
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => {
            // Nothing runs until `run` polls it, after logging is set up.
            let token = CancellationToken::new();
            let serving = automerge_relay::run(args, token.clone());
            let code = runtime.block_on(run(serving, token));
            // Blocking threads may still be stuck in the store (a wedged flush the shutdown
            // gave up on); nothing acknowledged waits on them, so do not wait for them either.
            runtime.shutdown_background();
            code
        }
        Err(e) => {
            eprintln!("automerge-relay: cannot start the async runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The relay's own events at `info` by default (or what `RUST_LOG` says), automerge quiet.
///
/// automerge logs every strict-validation rejection (e.g. "missing deps") at ERROR level;
/// those are expected client input, reported by the relay itself. Its events have targets
/// `automerge::…`: a directive for plain `automerge` would also silence `automerge_relay`,
/// whose targets share that prefix (it did: the relay logged nothing of its own).
fn log_filter(from_env: &str) -> EnvFilter {
    let mut filter = if from_env.trim().is_empty() {
        EnvFilter::new("info")
    } else {
        EnvFilter::try_new(from_env).unwrap_or_else(|e| {
            eprintln!("automerge-relay: RUST_LOG={from_env:?} is not a filter ({e}); using info");
            EnvFilter::new("info")
        })
    };
    if !from_env.contains("automerge::") && !from_env.contains("automerge=") {
        if let Ok(quiet) = "automerge::=off".parse() {
            filter = filter.add_directive(quiet);
        }
    }
    // PostgreSQL's notices ("relation … already exists, skipping" when a node starts on a
    // migrated schema) are not the relay's events; its errors reach the relay's own logs.
    if !from_env.contains("tokio_postgres") {
        if let Ok(quiet) = "tokio_postgres=warn".parse() {
            filter = filter.add_directive(quiet);
        }
    }
    filter
}

async fn run(
    serving: impl Future<Output = Result<(), automerge_relay::ServeError>>,
    token: CancellationToken,
) -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(log_filter(&std::env::var("RUST_LOG").unwrap_or_default()))
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    automerge_relay::spawn_trimmer();
    let signal_token = token.clone();
    tokio::spawn(async move {
        automerge_relay::shutdown_signal().await;
        signal_token.cancel();
    });
    match serving.await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "automerge-relay failed");
            eprintln!("automerge-relay: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
