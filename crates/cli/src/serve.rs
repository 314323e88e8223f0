//! `pubrun serve`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use pubrun_api::ServeOptions;
use pubrun_broker::Broker;
use pubrun_exec::Executor;
use pubrun_jobs::{Dispatcher, Executors};

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
    /// File holding the bearer token (instead of --token, which `ps` shows),
    /// e.g. $CREDENTIALS_DIRECTORY/pubrun-token under systemd.
    #[arg(long, env = "PUBRUN_TOKEN_FILE", conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// Manifest to apply at start (same as `pubrun apply -f FILE` once serving).
    #[arg(long, env = "PUBRUN_CONFIG")]
    config: Option<PathBuf>,
    /// When a write is acknowledged: `always` after fdatasync (survives power
    /// loss), or `interval`: once written, syncing every --sync-interval
    /// (survives kill -9; a power loss can lose the last interval).
    #[arg(long, env = "PUBRUN_SYNC", value_enum, default_value = "always")]
    sync: SyncArg,
    /// How often `--sync interval` syncs.
    #[arg(long, env = "PUBRUN_SYNC_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    sync_interval: std::time::Duration,
    /// Where run working directories go (default: DATA_DIR/runs/ID/work).
    /// A memory filesystem (e.g. /dev/shm/pubrun) keeps each run's files
    /// off the disk; logs stay in --data-dir. A run's directory here is
    /// removed when the run ends. One server per directory.
    #[arg(long, env = "PUBRUN_WORK_DIR")]
    work_dir: Option<PathBuf>,
    /// Runs executing at the same time, across all jobs.
    #[arg(long, env = "PUBRUN_SLOTS", default_value_t = default_slots())]
    slots: usize,
    /// The URL clients reach this server at, when it is not the listen
    /// address (e.g. behind a proxy): https://pubrun.example.com. Its host
    /// is allowed in requests and its origin counts as the server's own.
    #[arg(long, env = "PUBRUN_PUBLIC_URL")]
    public_url: Option<String>,
    /// A host name clients may use to reach this server (repeatable).
    /// IP addresses and localhost are always allowed; other names are
    /// refused, against DNS rebinding.
    #[arg(
        long = "allowed-host",
        env = "PUBRUN_ALLOWED_HOSTS",
        value_delimiter = ','
    )]
    allowed_hosts: Vec<String>,
    /// Connections served at once; beyond it a new connection gets 503.
    /// Default: 3/4 of the open-file limit, at most 10000.
    #[arg(long, env = "PUBRUN_MAX_CONNECTIONS", value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: Option<u32>,
    /// Time a client has to send a request's headers.
    #[arg(long, env = "PUBRUN_HEADER_READ_TIMEOUT", hide = true, default_value = "30s", value_parser = humantime::parse_duration)]
    header_read_timeout: std::time::Duration,
    /// A connection with no request in flight for this long is closed.
    #[arg(long, env = "PUBRUN_IDLE_TIMEOUT", hide = true, default_value = "60s", value_parser = humantime::parse_duration)]
    idle_timeout: std::time::Duration,
    /// Cluster mode: keep the cluster's state in PostgreSQL (servers on the
    /// same store form one cluster; see README "Cluster mode"),
    /// postgres://USER[:PASS]@HOST:PORT/DB[?sslmode=disable|prefer|require|verify-full&sslrootcert=CA.pem]
    /// (password also from PGPASSWORD; TLS certificates are always verified).
    #[arg(long, env = "PUBRUN_STORE", hide_env_values = true)]
    store: Option<String>,
    /// This server's name in the cluster (default: host name + port).
    #[arg(long, env = "PUBRUN_NODE_NAME")]
    node_name: Option<String>,
    /// With --store: the host:port other servers of the cluster reach this
    /// one at, to forward calls to it while it owns the state (default: the
    /// --listen address, or host name + port when listening on 0.0.0.0).
    #[arg(long, env = "PUBRUN_ADVERTISE_ADDR")]
    advertise_addr: Option<String>,
    /// Ownership lease TTL in milliseconds with --store: a standby takes over
    /// at most this long after the owner died (tests shorten it).
    #[arg(
        long,
        env = "PUBRUN_LEASE_TTL_MS",
        hide = true,
        default_value_t = 10_000
    )]
    lease_ttl_ms: u64,
    /// Also run an agent of this `agents` pool inside this server (every
    /// server of a cluster, owner and standbys alike, so jobs of that pool
    /// spread over all of them). The pool's token comes from
    /// --agent-token / PUBRUN_AGENT_TOKEN (declare the pool with
    /// `token_env = "PUBRUN_AGENT_TOKEN"`).
    #[arg(long, env = "PUBRUN_AGENT_POOL")]
    agent_pool: Option<String>,
    /// The pool token of --agent-pool.
    #[arg(long, env = "PUBRUN_AGENT_TOKEN", hide_env_values = true)]
    agent_token: Option<String>,
    /// Runs the built-in agent executes at once (default: --slots).
    #[arg(long, env = "PUBRUN_AGENT_SLOTS", value_parser = clap::value_parser!(u32).range(1..))]
    agent_slots: Option<u32>,
    /// A read-only bearer token that opens `GET /metrics` and nothing
    /// else, for a Prometheus scraper (the server token opens it too).
    #[arg(long, env = "PUBRUN_METRICS_TOKEN", hide_env_values = true)]
    metrics_token: Option<String>,
    /// Export OpenTelemetry traces over OTLP/HTTP (protobuf) to this base
    /// URL (`/v1/traces` is appended), e.g. http://127.0.0.1:4318.
    /// Tracing is off when unset.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// The `service.name` of exported spans.
    #[arg(long, env = "OTEL_SERVICE_NAME", default_value = "pubrun")]
    otel_service_name: String,
    #[command(flatten)]
    log: LogArgs,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum SyncArg {
    Always,
    Interval,
}

/// Log options shared by `serve` and `agent`.
#[derive(clap::Args)]
pub struct LogArgs {
    /// Log lines on stderr: text, or json (one object per line).
    /// The level comes from PUBRUN_LOG (default info; debug adds request logs).
    #[arg(long, env = "PUBRUN_LOG_FORMAT", default_value = "text")]
    log_format: pubrun_observability::LogFormat,
}

fn default_slots() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get() * 2)
        .unwrap_or(4)
        .max(4)
}

pub(crate) fn init_tracing(log: &LogArgs) {
    pubrun_observability::init_logging(log.log_format, None::<tracing_subscriber::layer::Identity>);
}

/// Makes `--work-dir` (absolute: containers mount run directories from it)
/// and locks it for this server; the lock lives as long as the file.
fn open_work_dir(dir: &Path) -> anyhow::Result<(PathBuf, std::fs::File)> {
    std::fs::create_dir_all(dir).with_context(|| format!("--work-dir {}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("--work-dir {}", dir.display()))?;
    match pubrun_store::embedded::lock_directory(&dir) {
        Ok(lock) => Ok((dir, lock)),
        Err(pubrun_store::StoreError::Locked(_)) => bail!(
            "--work-dir {} is in use by another pubrun server; each server needs its own",
            dir.display()
        ),
        Err(e) => Err(anyhow::Error::new(e).context("--work-dir")),
    }
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    init_tracing(&args.log);
    // Flushes the last spans when `serve` returns.
    let _traces = pubrun_observability::traces::init_traces(
        args.otlp_endpoint.as_deref(),
        &args.otel_service_name,
    )?;
    // The URL itself is not logged: it may carry credentials.
    if pubrun_observability::traces::enabled() {
        tracing::info!(
            service = args.otel_service_name,
            "exporting traces over OTLP/HTTP"
        );
    }

    let agent = AgentSpec::from_args(&args)?;
    pubrun_store::set_sync_mode(match args.sync {
        SyncArg::Always => pubrun_store::SyncMode::Always,
        SyncArg::Interval => {
            if args.sync_interval.is_zero() {
                bail!("--sync-interval must be more than 0");
            }
            pubrun_store::SyncMode::Interval(args.sync_interval)
        }
    });
    let token = crate::token_file::resolve(args.token, args.token_file.as_deref())?;
    if !args.listen.ip().is_loopback() && token.is_none() {
        bail!(
            "refusing to listen on {} without authentication: set --token, --token-file or PUBRUN_TOKEN \
             (clients then send Authorization: Bearer <token>), or listen on 127.0.0.1",
            args.listen
        );
    }
    let public_url = args.public_url.filter(|u| !u.is_empty());
    // Bad --public-url / --allowed-host values fail before anything starts.
    pubrun_api::csrf::HostPolicy::new(&args.allowed_hosts, public_url.as_deref(), None)
        .map_err(anyhow::Error::msg)?;
    // Every connection, store file and job pipe is a file handle.
    match pubrun_api::conn::raise_nofile_limit() {
        Ok(n) => tracing::debug!(open_files = n, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
    // Held until the server exits: run ids are only unique per server.
    let work_dir = args.work_dir.as_deref().map(open_work_dir).transpose()?;
    let node_name = args
        .node_name
        .clone()
        .unwrap_or_else(|| crate::cluster::default_node_name(args.listen.port()));
    // Cluster mode binds first: while another server owns the state, this
    // one forwards every connection to it (any server answers any call).
    let mut early_listener = None;
    let mut cluster_view = None;
    let store_url = args.store.as_deref().filter(|u| !u.is_empty());
    let store = match store_url {
        None => {
            crate::cluster::ServerStore::open(
                &args.data_dir,
                None,
                node_name.clone(),
                std::time::Duration::from_millis(args.lease_ttl_ms),
            )
            .await?
        }
        Some(url) => {
            let listener = bind(args.listen).await?;
            builtin_agent(&agent, listener.local_addr()?, &node_name)?;
            let advertise = match &args.advertise_addr {
                Some(a) => a.clone(),
                None => crate::cluster::default_advertise_addr(listener.local_addr()?),
            };
            let (owner, directory) =
                crate::cluster::follow_owner(url, &node_name, &advertise).await?;
            cluster_view = Some(pubrun_api::cluster::ClusterView {
                node: node_name.clone(),
                directory,
            });
            let (owned_tx, owned_rx) = tokio::sync::oneshot::channel::<()>();
            let forwarding = tokio::spawn(pubrun_api::forward::forward_until(
                listener,
                owner,
                async move {
                    let _ = owned_rx.await;
                },
            ));
            let store = crate::cluster::ServerStore::open(
                &args.data_dir,
                Some(url),
                node_name.clone(),
                std::time::Duration::from_millis(args.lease_ttl_ms),
            )
            .await?;
            let _ = owned_tx.send(());
            early_listener = Some(forwarding.await.context("forwarding task")?);
            store
        }
    };
    let store = Arc::new(store);
    let broker = Broker::open(store.as_store()).context("recovering broker state")?;
    // Read the manifest before binding so a bad file fails fast, with its line.
    let manifest = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Some(pubrun_core::manifest::parse_checked(
                &path.display().to_string(),
                &text,
                pubrun_triggers::schedule::manifest_checks(),
            )?)
        }
        None => None,
    };
    let buckets = store
        .open_buckets(&args.data_dir, args.store.as_deref(), broker.clone())
        .await?;
    let triggers = Arc::new(
        pubrun_triggers::Triggers::with_store(
            store
                .open_triggers(&args.data_dir, args.store.as_deref())
                .await?,
            broker.clone(),
            pubrun_core::clock::system(),
        )
        .await
        .context("opening schedules and webhooks")?,
    );
    let runs = store
        .open_runs(&args.data_dir, args.store.as_deref())
        .await?;
    let docker = docker_or_unavailable(
        Some("no Docker engine: docker jobs will wait until one answers (restart pubrun then)"),
        "docker engine unreachable",
    );
    let executors = Executors {
        process: Arc::new(pubrun_exec::process::ProcessExecutor::new()),
        docker,
    };
    let dispatcher = Dispatcher::new(
        broker.clone(),
        runs,
        args.data_dir.clone(),
        executors,
        args.slots,
    );
    dispatcher.set_buckets(buckets.clone());
    if let Some((dir, _)) = &work_dir {
        dispatcher.set_work_dir(dir.clone());
    }
    let pools = store
        .open_pools(&args.data_dir, args.store.as_deref())
        .await?;
    dispatcher.set_pools(Arc::new(pools.clone()));
    let listener = match early_listener {
        Some(l) => l,
        None => {
            let l = bind(args.listen).await?;
            builtin_agent(&agent, l.local_addr()?, &node_name)?;
            l
        }
    };
    let addr = listener.local_addr()?;
    dispatcher
        .start()
        .await
        .context("starting the dispatcher")?;
    triggers.spawn();
    let pools_stop = pubrun_exec::CancellationToken::new();
    // Links and upload Locations use this, never the request's Host.
    match &public_url {
        Some(u) => buckets.set_base_url(u).context("--public-url")?,
        None => buckets.set_base_url(&pubrun_buckets::listen_base_url(addr))?,
    }
    if let Some(m) = &manifest {
        let changes = pubrun_jobs::apply::apply_manifest(
            &broker,
            &dispatcher,
            Some(&triggers),
            Some(&buckets),
            Some(&pools),
            m,
            false,
        )
        .await
        .context("applying --config")?;
        let changed = changes
            .iter()
            .filter(|c| c.action != pubrun_jobs::apply::Action::Unchanged)
            .count();
        tracing::info!(changed, total = changes.len(), "applied manifest");
    }
    // Find machines a previous server started, then scale from there.
    pools.reconcile().await;
    pools.spawn(pools_stop.clone());
    tracing::info!(%addr, node = %node_name, data_dir = %args.data_dir.display(), auth = token.is_some(), "pubrun serving gRPC and HTTP");
    pubrun_api::serve(
        listener,
        broker.clone(),
        ServeOptions {
            token,
            dispatcher: Some(dispatcher.clone()),
            triggers: Some(triggers.clone()),
            buckets: Some(buckets.clone()),
            pools: Some(pools.clone()),
            public_url,
            allowed_hosts: args.allowed_hosts,
            limits: pubrun_api::ConnLimits {
                max_connections: args.max_connections.map(|n| n as usize),
                header_read_timeout: args.header_read_timeout,
                idle_timeout: args.idle_timeout,
            },
            metrics_token: args.metrics_token.filter(|t| !t.is_empty()),
            node_name: store_url.map(|_| node_name.clone()),
            cluster: cluster_view,
        },
        {
            let store = store.clone();
            async move {
                tokio::select! {
                    _ = shutdown_signal() => {}
                    _ = store.lease_lost() => {
                        // Our in-memory state is stale and every write is
                        // refused: stop at once (a graceful drain could serve
                        // stale pulls) and come back as a standby.
                        tracing::error!("lost ownership of the cluster state (taken over, or cut off from PostgreSQL for a whole lease): stopping local attempts and restarting as a standby");
                        crate::cluster::restart_as_standby();
                    }
                }
            }
        },
    )
    .await?;
    triggers.stop();
    // Machines keep running: the next server adopts them (reconcile).
    pools_stop.cancel();
    drop(dispatcher);
    drop(broker);
    store.close();
    tracing::info!("stopped");
    Ok(())
}

/// `--agent-pool`: an agent of that pool in this process, talking to this
/// server's own port (served here, or forwarded to the cluster's owner). It
/// ends with the process; its leases are then retried like any lost agent's.
struct AgentSpec {
    pool: String,
    token: String,
    slots: u32,
    data_dir: PathBuf,
}

impl AgentSpec {
    fn from_args(args: &ServeArgs) -> anyhow::Result<Option<AgentSpec>> {
        let Some(pool) = args.agent_pool.clone().filter(|p| !p.is_empty()) else {
            return Ok(None);
        };
        let Some(token) = args.agent_token.clone().filter(|t| !t.is_empty()) else {
            bail!("--agent-pool {pool} needs the pool's token: set --agent-token or PUBRUN_AGENT_TOKEN");
        };
        Ok(Some(AgentSpec {
            pool,
            token,
            slots: args.agent_slots.unwrap_or(args.slots as u32),
            data_dir: args.data_dir.join("agent"),
        }))
    }
}

fn builtin_agent(spec: &Option<AgentSpec>, addr: SocketAddr, node: &str) -> anyhow::Result<()> {
    let Some(AgentSpec {
        pool,
        token,
        slots,
        data_dir,
    }) = spec
    else {
        return Ok(());
    };
    let (pool, token, slots, data_dir) = (pool.clone(), token.clone(), *slots, data_dir.clone());
    let host = if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    };
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let docker = docker_or_unavailable(None, &format!("docker engine unreachable on {node}"));
    let cfg = pubrun_pools::agent::AgentConfig {
        server: format!("http://{host}"),
        pool: pool.clone(),
        // Agent names allow A-Z a-z 0-9 . _ - only (the default node name
        // is host:port).
        name: node
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._-".contains(c) {
                    c
                } else {
                    '-'
                }
            })
            .collect(),
        token,
        slots,
        labels: Default::default(),
        data_dir,
        process: Arc::new(pubrun_exec::process::ProcessExecutor::new()),
        docker,
    };
    tracing::info!(%pool, slots = cfg.slots, "running a built-in agent");
    tokio::spawn(async move {
        let stop = pubrun_exec::CancellationToken::new();
        if let Err(e) = pubrun_pools::agent::run(cfg, stop).await {
            tracing::error!(error = %e, "the built-in agent stopped");
        }
    });
    Ok(())
}

async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr} (is another pubrun or emulator running there?)"))
}

pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// The Docker executor; without an engine, one that fails each docker run
/// with `unreachable` and the engine's error (logging `warning` first).
pub(crate) fn docker_or_unavailable(warning: Option<&str>, unreachable: &str) -> Arc<dyn Executor> {
    match pubrun_exec::docker::DockerExecutor::connect() {
        Ok(d) => Arc::new(d),
        Err(e) => {
            if let Some(warning) = warning {
                tracing::warn!(error = %e, "{warning}");
            }
            Arc::new(pubrun_exec::Unavailable(format!("{unreachable}: {e}")))
        }
    }
}
