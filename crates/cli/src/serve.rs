//! `pubrun serve`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use pubrun_api::ServeOptions;
use pubrun_broker::Broker;
use pubrun_store::EmbeddedStore;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Where topics, subscriptions and messages are kept.
    #[arg(long, default_value = "./pubrun-data", env = "PUBRUN_DATA_DIR")]
    data_dir: PathBuf,
    /// Address for gRPC and HTTP (one port). 8085 is the Pub/Sub emulator's usual port.
    #[arg(long, default_value = "127.0.0.1:8085", env = "PUBRUN_LISTEN")]
    listen: SocketAddr,
    /// Bearer token every request must carry. Required to listen beyond loopback.
    #[arg(long, env = "PUBRUN_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PUBRUN_LOG").unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let token = args.token.filter(|t| !t.is_empty());
    if !args.listen.ip().is_loopback() && token.is_none() {
        bail!(
            "refusing to listen on {} without authentication: set --token or PUBRUN_TOKEN \
             (clients then send Authorization: Bearer <token>), or listen on 127.0.0.1",
            args.listen
        );
    }
    let store = EmbeddedStore::open(&args.data_dir)
        .with_context(|| format!("opening data directory {}", args.data_dir.display()))?;
    let store = Arc::new(store);
    let broker = Broker::open(store.clone()).context("recovering broker state")?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {} (is another pubrun or emulator running there?)", args.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, data_dir = %args.data_dir.display(), auth = token.is_some(), "pubrun serving gRPC and HTTP");
    pubrun_api::serve(listener, broker.clone(), ServeOptions { token }, shutdown_signal()).await?;
    drop(broker);
    store.close();
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
