//! Client commands: thin wrappers over the server's REST APIs — Google's
//! Pub/Sub REST v1 (`topics`, `subscriptions`, `publish`, `pull`) and
//! pubrun's own `/api/v1` (`apply`, `jobs`, `runs`, `logs`, `schedules`).
//!
//! Every command takes the same connection options ([`ConnArgs`]: `--addr`,
//! `--token`, `--project`, `--json`), talks HTTP to `pubrun serve` and
//! prints either a human view (aligned columns, one block per message) or,
//! with `--json`, the server's JSON response for scripts.

mod api;
mod args;
mod buckets;
mod cluster;
mod jobs;
mod messages;
mod names;
mod objects;
mod output;
mod pools;
mod resources;
mod runs;
mod schedules;
mod snapshots;

pub(crate) use args::parse_addr;
pub use args::ConnArgs;

use args::{parse_key_value, MessageArgs, NameArgs, SUBSCRIPTION_NAME, TOPIC_NAME};

#[derive(clap::Subcommand)]
pub enum ClientCommand {
    /// Create, list, show and delete topics.
    #[command(subcommand, visible_alias = "topic")]
    Topics(TopicsCommand),
    /// Create, list, show and delete subscriptions.
    #[command(subcommand, visible_aliases = ["subscription", "subs"])]
    Subscriptions(SubscriptionsCommand),
    /// Publish one message to a topic and print its message id.
    Publish(PublishArgs),
    /// Pull messages from a subscription and print them (acknowledge with --ack).
    Pull(PullArgs),
    /// Declare topics, subscriptions and jobs from a manifest: print the plan, then apply it.
    ///
    /// A manifest is TOML with any of these tables: [[topic]], [[subscription]],
    /// [[job]], [[schedule]], [[webhook]], [[bucket]] (with
    /// [[bucket.notification]]), [[pool]] and [[connection]] (a Google project
    /// whose subscriptions, topics, buckets and Compute Engine jobs and pools
    /// use), plus `project = "…"`. Resources the
    /// project's last apply declared and this one does not are deleted; a plan
    /// that deletes or replaces anything asks first (or needs --yes).
    Apply(ApplyArgs),
    /// List, show and trigger jobs.
    #[command(subcommand, visible_alias = "job")]
    Jobs(JobsCommand),
    /// List runs (newest first); `runs show ID`, `runs cancel ID`.
    #[command(visible_alias = "run")]
    Runs(RunsArgs),
    /// Print a run's output (stdout and stderr); --follow until the run ends.
    Logs(LogsArgs),
    /// List schedules; pause, resume or fire one now.
    #[command(subcommand, visible_alias = "schedule")]
    Schedules(SchedulesCommand),
    /// List, create and delete buckets (Cloud Storage JSON API).
    #[command(subcommand, visible_alias = "bucket")]
    Buckets(BucketsCommand),
    /// List, copy (`cp`, gsutil-style), print (`cat`) and delete (`rm`) objects.
    #[command(subcommand, visible_alias = "object")]
    Objects(ObjectsCommand),
    /// List the webhooks (`POST /hooks/NAME`) the manifest declared.
    #[command(subcommand, visible_alias = "webhook")]
    Webhooks(WebhooksCommand),
    /// Create, list, show and delete snapshots (for `subscriptions seek`).
    #[command(subcommand, visible_alias = "snapshot")]
    Snapshots(snapshots::SnapshotsCommand),
    /// List machine pools (`pubrun pools`); `pools token NAME` prints a pool's agent token.
    #[command(visible_alias = "pool")]
    Pools(pools::PoolsArgs),
    /// List pool machines; `machines cordon|uncordon|drain NAME`.
    #[command(visible_alias = "machine")]
    Machines(pools::MachinesArgs),
    /// List the agents connected to the server's pools.
    Agents(pools::AgentsArgs),
    /// Machine time and cost per pool (per run with --runs) [--since 24h|RFC3339].
    Cost(pools::CostArgs),
    /// The servers of a cluster (`serve --store`), their addresses and which one owns the state.
    Cluster(cluster::ClusterArgs),
}

#[derive(clap::Subcommand)]
pub enum BucketsCommand {
    /// List the buckets of the project.
    #[command(visible_alias = "ls")]
    List(ConnArgs),
    /// Create a bucket (names follow Cloud Storage's rules).
    Create {
        /// Bucket name.
        name: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Delete an empty bucket.
    Delete {
        /// Bucket name.
        name: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

#[derive(clap::Subcommand)]
pub enum ObjectsCommand {
    /// List a bucket's objects with size, time and checksum.
    #[command(visible_alias = "ls")]
    List {
        /// Bucket name, or gs://BUCKET/PREFIX.
        bucket: String,
        /// Only objects whose name starts with this.
        #[arg(long, default_value = "")]
        prefix: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    #[command(flatten)]
    Transfer(objects::ObjectsTransfer),
}

#[derive(clap::Subcommand)]
pub enum WebhooksCommand {
    /// List the webhooks and the topics they publish to.
    #[command(visible_alias = "ls")]
    List(ConnArgs),
}

#[derive(clap::Subcommand)]
pub enum SchedulesCommand {
    /// List schedules with their next and last fire times.
    #[command(visible_alias = "ls")]
    List(ConnArgs),
    /// Stop a schedule from firing until resumed (survives restarts).
    Pause {
        /// Schedule name.
        name: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Let a paused schedule fire again (ticks missed while paused are not caught up).
    Resume {
        /// Schedule name.
        name: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Publish the schedule's message now, once (also when paused).
    RunNow {
        /// Schedule name.
        name: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

#[derive(clap::Args)]
pub struct ApplyArgs {
    /// Manifest to apply, e.g. pubrun.toml ("-" reads standard input).
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: std::path::PathBuf,
    /// Only print the plan; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Apply a plan that deletes or replaces resources without asking
    /// (needed when standard input is not a terminal).
    #[arg(long, short = 'y')]
    pub yes: bool,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(clap::Subcommand)]
pub enum JobsCommand {
    /// List all jobs.
    #[command(visible_alias = "ls")]
    List(ConnArgs),
    /// Show one job: trigger, what it runs, limits, its subscription and backlog.
    #[command(visible_aliases = ["get", "describe"])]
    Show {
        /// Job name.
        name: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Run a job now for a message given here (not published to the topic); prints the run id.
    Trigger(TriggerArgs),
}

#[derive(clap::Args)]
pub struct TriggerArgs {
    /// Job name.
    pub name: String,
    /// Message data as text (templates see it as `data`).
    #[arg(long, conflicts_with = "data_file")]
    pub data: Option<String>,
    #[command(flatten)]
    pub message: MessageArgs,
    #[command(flatten)]
    pub conn: ConnArgs,
}

/// Run states a list can be filtered by.
pub const RUN_STATUSES: [&str; 7] = [
    "queued",
    "starting",
    "running",
    "succeeded",
    "failed",
    "timed_out",
    "cancelled",
];

/// `pubrun runs [--job J] [--status S] [--limit N]` lists; `runs show ID`
/// and `runs cancel ID` act on one run.
#[derive(clap::Args)]
#[command(
    args_conflicts_with_subcommands = true,
    subcommand_value_name = "COMMAND"
)]
pub struct RunsArgs {
    #[command(subcommand)]
    pub command: Option<RunsCommand>,
    #[command(flatten)]
    pub list: RunsListArgs,
}

#[derive(clap::Args)]
pub struct RunsListArgs {
    /// Only runs of this job.
    #[arg(long)]
    pub job: Option<String>,
    /// Only runs in this state.
    #[arg(long, value_parser = RUN_STATUSES)]
    pub status: Option<String>,
    /// At most this many runs (the server's default is 100).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub limit: Option<u32>,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(clap::Subcommand)]
pub enum RunsCommand {
    /// List runs (the same as `pubrun runs` with flags).
    #[command(visible_alias = "ls")]
    List(RunsListArgs),
    /// Show everything about one run: state, attempts, exit, error, message, times.
    #[command(visible_aliases = ["get", "describe"])]
    Show {
        /// Run id.
        id: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Cancel a queued or running run (a running one gets SIGTERM, then SIGKILL after the grace period).
    Cancel {
        /// Run id.
        id: String,
        /// Wait until the run has ended and print its final state.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

#[derive(clap::Args)]
#[command(
    after_help = "With --follow the command polls about three times a second and exits 0 once the run has \
ended (succeeded, failed, timed_out or cancelled) and its whole log is printed — whatever the run's result; \
the final state is reported on standard error, and `pubrun runs show ID` tells it to scripts. \
With --json the log comes as JSON objects {\"run\", \"status\", \"offset\", \"size\", \"log\"} \
(one per line when following)."
)]
pub struct LogsArgs {
    /// Run id.
    pub id: String,
    /// Keep printing new output until the run ends.
    #[arg(short = 'f', long)]
    pub follow: bool,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(clap::Subcommand)]
pub enum TopicsCommand {
    /// Create a topic.
    Create {
        /// Topic id (in --project) or full name projects/P/topics/T.
        name: String,
        /// Label to set on the topic (repeatable).
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_key_value)]
        labels: Vec<(String, String)>,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// List all topics of the project.
    #[command(visible_alias = "ls")]
    List(ConnArgs),
    /// Show one topic.
    #[command(visible_alias = "describe")]
    #[command(mut_arg("name", |a| a.help(TOPIC_NAME)))]
    Get(NameArgs),
    /// Delete a topic (its subscriptions remain, detached).
    #[command(visible_alias = "rm")]
    #[command(mut_arg("name", |a| a.help(TOPIC_NAME)))]
    Delete(NameArgs),
}

#[derive(clap::Subcommand)]
pub enum SubscriptionsCommand {
    /// Create a subscription on a topic (pull, or push with --push-endpoint).
    Create {
        /// Subscription id (in --project) or full name projects/P/subscriptions/S.
        name: String,
        /// Topic to subscribe to: id (in --project) or full name projects/P/topics/T.
        #[arg(long)]
        topic: String,
        /// How long a pulled message stays leased before it is redelivered
        /// (10s..=600s): seconds, or a duration such as "1m" or "90 seconds".
        #[arg(long, value_name = "DURATION", value_parser = parse_seconds)]
        ack_deadline: Option<u32>,
        /// Only deliver messages matching this filter, e.g. 'attributes.kind = "csv"'.
        #[arg(long)]
        filter: Option<String>,
        /// Deliver messages with the same ordering key in publish order.
        #[arg(long)]
        enable_message_ordering: bool,
        /// Push delivery: POST each message to this http:// URL instead of waiting for pulls.
        #[arg(long, value_name = "URL")]
        push_endpoint: Option<String>,
        /// Label to set on the subscription (repeatable).
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_key_value)]
        labels: Vec<(String, String)>,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Switch a subscription to push (--push-endpoint URL) or back to pull (no endpoint).
    ModifyPush {
        /// Subscription id (in --project) or full name projects/P/subscriptions/S.
        name: String,
        /// Endpoint to push to; leave it out to switch to pull.
        #[arg(long, value_name = "URL")]
        push_endpoint: Option<String>,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// List all subscriptions of the project (or of one topic with --topic).
    #[command(visible_alias = "ls")]
    List {
        /// Only list the subscriptions attached to this topic.
        #[arg(long)]
        topic: Option<String>,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Show one subscription.
    #[command(visible_alias = "describe")]
    #[command(mut_arg("name", |a| a.help(SUBSCRIPTION_NAME)))]
    Get(NameArgs),
    /// Delete a subscription and its unacknowledged messages.
    #[command(visible_alias = "rm")]
    #[command(mut_arg("name", |a| a.help(SUBSCRIPTION_NAME)))]
    Delete(NameArgs),
    /// Seek to a time or a snapshot: set which messages are acknowledged.
    Seek(snapshots::SeekArgs),
}

#[derive(clap::Args)]
pub struct PublishArgs {
    /// Topic id (in --project) or full name projects/P/topics/T.
    pub topic: String,
    /// Message data as text.
    #[arg(long, conflicts_with = "data_file")]
    pub data: Option<String>,
    #[command(flatten)]
    pub message: MessageArgs,
    /// Ordering key: messages with the same key are delivered in order to ordered subscriptions.
    #[arg(long, value_name = "KEY")]
    pub ordering_key: Option<String>,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(clap::Args)]
pub struct PullArgs {
    /// Subscription id (in --project) or full name projects/P/subscriptions/S.
    pub subscription: String,
    /// Pull at most this many messages.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max: u32,
    /// Acknowledge the printed messages so they are not delivered again.
    #[arg(long)]
    pub ack: bool,
    #[command(flatten)]
    pub conn: ConnArgs,
}

pub async fn run(cmd: ClientCommand) -> anyhow::Result<()> {
    match cmd {
        ClientCommand::Topics(cmd) => resources::topics(cmd).await,
        ClientCommand::Subscriptions(cmd) => resources::subscriptions(cmd).await,
        ClientCommand::Publish(args) => messages::publish(args).await,
        ClientCommand::Pull(args) => messages::pull(args).await,
        ClientCommand::Apply(args) => jobs::apply(args).await,
        ClientCommand::Jobs(cmd) => jobs::jobs(cmd).await,
        ClientCommand::Runs(args) => runs::runs(args).await,
        ClientCommand::Logs(args) => runs::logs(args).await,
        ClientCommand::Schedules(cmd) => schedules::schedules(cmd).await,
        ClientCommand::Buckets(cmd) => buckets::buckets(cmd).await,
        ClientCommand::Objects(cmd) => buckets::objects(cmd).await,
        ClientCommand::Webhooks(WebhooksCommand::List(conn)) => buckets::webhooks(conn).await,
        ClientCommand::Snapshots(cmd) => snapshots::snapshots(cmd).await,
        ClientCommand::Pools(args) => pools::pools(args).await,
        ClientCommand::Machines(args) => pools::machines(args).await,
        ClientCommand::Agents(args) => pools::agents(args).await,
        ClientCommand::Cost(args) => pools::cost(args).await,
        ClientCommand::Cluster(args) => cluster::cluster(args).await,
    }
}

/// Whole seconds from a bare number or a duration the manifest would accept
/// (one parser for both: humantime).
fn parse_seconds(s: &str) -> Result<u32, String> {
    if let Ok(n) = s.trim().parse::<u32>() {
        return Ok(n);
    }
    let d = humantime::parse_duration(s.trim()).map_err(|e| {
        format!("`{s}` is not a number of seconds or a duration like 30s, 1m ({e})")
    })?;
    u32::try_from(d.as_secs()).map_err(|_| format!("`{s}` is too long"))
}
