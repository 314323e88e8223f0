//! Client commands: thin wrappers over the server's Pub/Sub REST v1 API.
//!
//! Every command takes the same connection options ([`ConnArgs`]: `--addr`,
//! `--token`, `--project`, `--json`), talks HTTP/JSON to `pubrun serve` and
//! prints either a human view (aligned columns, one block per message) or,
//! with `--json`, the server's JSON response for scripts.

mod api;
mod args;
mod messages;
mod names;
mod output;
mod resources;

pub use args::ConnArgs;

use args::parse_key_value;

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
    List {
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Show one topic.
    #[command(visible_alias = "describe")]
    Get {
        /// Topic id (in --project) or full name projects/P/topics/T.
        name: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Delete a topic (its subscriptions remain, detached).
    #[command(visible_alias = "rm")]
    Delete {
        /// Topic id (in --project) or full name projects/P/topics/T.
        name: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

#[derive(clap::Subcommand)]
pub enum SubscriptionsCommand {
    /// Create a pull subscription on a topic.
    Create {
        /// Subscription id (in --project) or full name projects/P/subscriptions/S.
        name: String,
        /// Topic to subscribe to: id (in --project) or full name projects/P/topics/T.
        #[arg(long)]
        topic: String,
        /// Seconds a pulled message stays leased before it is redelivered (10..=600).
        #[arg(long, value_name = "SECS")]
        ack_deadline: Option<u32>,
        /// Only deliver messages matching this filter, e.g. 'attributes.kind = "csv"'.
        #[arg(long)]
        filter: Option<String>,
        /// Deliver messages with the same ordering key in publish order.
        #[arg(long)]
        enable_message_ordering: bool,
        /// Label to set on the subscription (repeatable).
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_key_value)]
        labels: Vec<(String, String)>,
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
    Get {
        /// Subscription id (in --project) or full name projects/P/subscriptions/S.
        name: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Delete a subscription and its unacknowledged messages.
    #[command(visible_alias = "rm")]
    Delete {
        /// Subscription id (in --project) or full name projects/P/subscriptions/S.
        name: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

#[derive(clap::Args)]
pub struct PublishArgs {
    /// Topic id (in --project) or full name projects/P/topics/T.
    pub topic: String,
    /// Message data as text.
    #[arg(long, conflicts_with = "data_file")]
    pub data: Option<String>,
    /// Read the message data from a file ("-" reads standard input).
    #[arg(long, value_name = "FILE")]
    pub data_file: Option<std::path::PathBuf>,
    /// Message attribute (repeatable).
    #[arg(long = "attr", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub attrs: Vec<(String, String)>,
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
    }
}
