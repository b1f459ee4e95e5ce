//! The `automerge-relay` binary: parse flags, set up logging, run until a signal; or, for
//! `automerge-relay token`, print a new token and exit (no runtime, no logging, no server).

use std::future::Future;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use automerge_relay::Cli;

fn main() -> std::process::ExitCode {
    let args = match Cli::parse().into_command().into_serve_args() {
        Ok(args) => args,
        Err(token) => {
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
            runtime.block_on(run(serving, token))
        }
        Err(e) => {
            eprintln!("automerge-relay: cannot start the async runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(
    serving: impl Future<Output = Result<(), automerge_relay::ServeError>>,
    token: CancellationToken,
) -> std::process::ExitCode {
    let from_env = std::env::var("RUST_LOG").unwrap_or_default();
    let mut filter = EnvFilter::try_new(&from_env).unwrap_or_else(|_| EnvFilter::new("info"));
    if from_env.is_empty() {
        filter = EnvFilter::new("info");
    }
    if !from_env.contains("automerge=") {
        // automerge logs every strict-validation rejection (e.g. "missing deps") at ERROR
        // level; those are expected client input, reported by the relay itself.
        if let Ok(d) = "automerge=off".parse() {
            filter = filter.add_directive(d);
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
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
