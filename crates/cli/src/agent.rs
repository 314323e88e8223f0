//! `pubrun agent`: join a pool of a remote server and run its leased runs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};

#[derive(clap::Args)]
pub struct AgentArgs {
    /// The server's base URL, e.g. http://10.0.0.2:8085.
    #[arg(long, env = "PUBRUN_SERVER")]
    server: String,
    /// The pool to join (declared on the server with [[pool]]).
    #[arg(long, env = "PUBRUN_POOL")]
    pool: String,
    /// The pool's agent token (`pubrun pools` shows where it comes from).
    #[arg(
        long,
        env = "PUBRUN_TOKEN",
        hide_env_values = true,
        required_unless_present = "token_file"
    )]
    token: Option<String>,
    /// File holding the agent token (instead of --token, which `ps` shows),
    /// e.g. $CREDENTIALS_DIRECTORY/pubrun-agent-token under systemd.
    #[arg(long, env = "PUBRUN_TOKEN_FILE", conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// This machine's name in the pool; default: the host name.
    #[arg(long, env = "PUBRUN_AGENT_NAME")]
    name: Option<String>,
    /// Runs this machine executes at the same time.
    #[arg(long, default_value_t = 1)]
    slots: u32,
    /// A label (key=value) shown with the agent; repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// Where leased runs' files and logs are kept; default: a directory
    /// named after the agent in the system's temporary directory.
    #[arg(long, env = "PUBRUN_AGENT_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[command(flatten)]
    log: crate::serve::LogArgs,
}

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    crate::serve::init_tracing(&args.log);
    let Some(token) = crate::token_file::resolve(args.token, args.token_file.as_deref())? else {
        bail!("the agent token is empty: pass --token or --token-file");
    };
    if args.slots == 0 {
        bail!("--slots must be at least 1");
    }
    if !args.server.starts_with("http://") && !args.server.starts_with("https://") {
        bail!(
            "--server must be an http:// or https:// URL, got {}",
            args.server
        );
    }
    let mut labels = BTreeMap::new();
    for l in &args.labels {
        let Some((k, v)) = l.split_once('=') else {
            bail!("--label {l:?}: expected KEY=VALUE");
        };
        labels.insert(k.to_string(), v.to_string());
    }
    let name = match args.name {
        Some(n) => n,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .context("reading the host name; pass --name")?,
    };
    let data_dir = args
        .data_dir
        .unwrap_or_else(|| std::env::temp_dir().join(format!("pubrun-agent-{name}")));
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let docker = crate::serve::docker_or_unavailable(
        Some("no Docker engine here: docker jobs leased to this agent fail"),
        &format!("docker engine unreachable on agent {name}"),
    );
    let shutdown = pubrun_exec::CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        crate::serve::shutdown_signal().await;
        tracing::info!("stopping agent");
        stop.cancel();
    });
    pubrun_pools::agent::run(
        pubrun_pools::agent::AgentConfig {
            server: args.server.trim_end_matches('/').to_string(),
            pool: args.pool,
            name,
            token,
            slots: args.slots,
            labels,
            data_dir,
            process: Arc::new(pubrun_exec::process::ProcessExecutor::new()),
            docker,
        },
        shutdown,
    )
    .await
}
