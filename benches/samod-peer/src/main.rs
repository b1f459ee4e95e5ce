//! samod behind axum: an automerge-repo sync server that only answers (it never announces
//! documents), with nodefs-layout filesystem storage.
//!
//! usage: samod-peer --listen 127.0.0.1:PORT --data-dir DIR

use axum::Router;
use axum::extract::{State, WebSocketUpgrade};
use axum::response::Response;
use samod::storage::TokioFilesystemStorage;
use samod::{AcceptorHandle, Repo, ShareConfig, Url};
use tokio::signal::unix::{SignalKind, signal};

fn parse_args() -> Result<(String, String), String> {
    let (mut listen, mut data_dir) = ("127.0.0.1:0".to_string(), None);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("missing value for {flag}"))?;
        match flag.as_str() {
            "--listen" => listen = value,
            "--data-dir" => data_dir = Some(value),
            _ => return Err(format!("unknown argument {flag}")),
        }
    }
    Ok((listen, data_dir.ok_or("--data-dir is required")?))
}

async fn upgrade(State(acceptor): State<AcceptorHandle>, ws: WebSocketUpgrade) -> Response {
    ws.on_upgrade(move |socket| async move {
        if let Err(e) = acceptor.accept_axum(socket, None) {
            eprintln!("samod-peer: cannot accept connection: {e:?}");
        }
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (listen, data_dir) = parse_args()
        .map_err(|e| format!("{e}\nusage: samod-peer --listen 127.0.0.1:PORT --data-dir DIR"))?;
    let repo = Repo::build_tokio()
        .with_storage(TokioFilesystemStorage::new(&data_dir))
        .with_share_policy(ShareConfig::read_write().with_announce(false))
        .load()
        .await;

    let listener = tokio::net::TcpListener::bind(&listen).await?;
    let addr = listener.local_addr()?;
    let acceptor = repo.make_acceptor(Url::parse(&format!("ws://{addr}/"))?)?;
    // Any path upgrades, like the reference server.
    let app = Router::new().fallback(upgrade).with_state(acceptor);
    println!("listening on ws://{addr}");

    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        served = axum::serve(listener, app) => served?,
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    repo.stop().await;
    Ok(())
}
