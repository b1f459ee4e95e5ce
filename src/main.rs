//! The `automerge-relay` binary: parse flags, set up logging, run until a signal.

use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use automerge_relay::Cli;

fn main() -> std::process::ExitCode {
    // Before the runtime starts its threads.
    automerge_relay::tune_allocator();
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => {
            let code = runtime.block_on(run());
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

async fn run() -> std::process::ExitCode {
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
    let args = Cli::parse().into_serve_args();
    automerge_relay::spawn_trimmer();
    let token = CancellationToken::new();
    let signal_token = token.clone();
    tokio::spawn(async move {
        automerge_relay::shutdown_signal().await;
        signal_token.cancel();
    });
    match automerge_relay::run(args, token).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "automerge-relay failed");
            eprintln!("automerge-relay: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
