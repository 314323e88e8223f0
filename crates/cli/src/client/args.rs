//! Options shared by every client command and the value parsers behind them.

/// Where the server is, how to authenticate, which project, which output.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Connection and output")]
pub struct ConnArgs {
    /// Server address: http://HOST:PORT or just HOST:PORT.
    #[arg(long, env = "PUBRUN_ADDR", default_value = "http://127.0.0.1:8085", value_parser = parse_addr)]
    pub addr: String,
    /// Bearer token, when the server was started with --token.
    #[arg(long, env = "PUBRUN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Project that short topic and subscription ids belong to.
    #[arg(long, env = "PUBRUN_PROJECT", default_value = "demo", value_parser = parse_project)]
    pub project: String,
    /// Print the server's JSON response (pretty) instead of the human view.
    #[arg(long)]
    pub json: bool,
}

// A command that lists when it is given no subcommand (`pubrun pools` is
// `pubrun pools list`). No doc comment: each command has its own.
#[derive(clap::Args)]
#[command(
    args_conflicts_with_subcommands = true,
    subcommand_value_name = "COMMAND"
)]
pub struct ListByDefault<C: clap::Subcommand> {
    #[command(subcommand)]
    pub command: Option<C>,
    #[command(flatten)]
    pub conn: ConnArgs,
}

// The one resource a `get` or `delete` acts on. No doc comments here: each
// subcommand sets the help of `name` (`mut_arg`) and has its own about.
#[derive(clap::Args)]
pub struct NameArgs {
    pub name: String,
    #[command(flatten)]
    pub conn: ConnArgs,
}

// The rest of a message given on the command line (`publish`, `jobs
// trigger`) after its --data, which each command declares itself: the help
// differs, and `mut_arg` would move the flag in the completion scripts.
#[derive(clap::Args)]
pub struct MessageArgs {
    /// Read the message data from a file ("-" reads standard input).
    #[arg(long, value_name = "FILE")]
    pub data_file: Option<std::path::PathBuf>,
    /// Message attribute (repeatable).
    #[arg(long = "attr", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub attrs: Vec<(String, String)>,
}

/// The help of a topic, subscription or snapshot named on the command line.
pub const TOPIC_NAME: &str = "Topic id (in --project) or full name projects/P/topics/T";
pub const SUBSCRIPTION_NAME: &str =
    "Subscription id (in --project) or full name projects/P/subscriptions/S";
pub const SNAPSHOT_NAME: &str = "Snapshot id (in --project) or full name projects/P/snapshots/S";

/// Accepts `http://host:port[/prefix]` or `host:port`; returns the base URL
/// without a trailing slash.
pub fn parse_addr(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("the address is empty; expected HOST:PORT or http://HOST:PORT".into());
    }
    let full = if s.contains("://") {
        s.to_string()
    } else {
        format!("http://{s}")
    };
    let url = reqwest::Url::parse(&full).map_err(|e| {
        format!("`{s}` is not a valid address ({e}); expected HOST:PORT or http://HOST:PORT")
    })?;
    match url.scheme() {
        "http" | "https" => {}
        other => {
            return Err(format!(
                "`{s}`: unsupported scheme `{other}`; expected http://HOST:PORT"
            ))
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!(
            "`{s}` has no host; expected HOST:PORT or http://HOST:PORT"
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("`{s}` must not contain a query or fragment"));
    }
    Ok(full.trim_end_matches('/').to_string())
}

pub fn parse_project(s: &str) -> Result<String, String> {
    let id = s.strip_prefix("projects/").unwrap_or(s);
    pubrun_core::ProjectName::from_id(id).map_err(|e| e.message.to_string())?;
    Ok(id.to_string())
}

/// `KEY=VALUE` for --attr and --label. The value may contain `=` and be empty.
pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some(("", _)) => Err(format!(
            "`{s}` has an empty key; expected KEY=VALUE, e.g. color=red"
        )),
        Some((k, v)) => Ok((k.to_string(), v.to_string())),
        None => Err(format!(
            "`{s}` has no '='; expected KEY=VALUE, e.g. color=red"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addr_accepts_host_port_and_urls() {
        assert_eq!(
            parse_addr("127.0.0.1:8085").unwrap(),
            "http://127.0.0.1:8085"
        );
        assert_eq!(parse_addr("localhost:9").unwrap(), "http://localhost:9");
        assert_eq!(parse_addr("http://h:1/").unwrap(), "http://h:1");
        assert_eq!(parse_addr("http://h:1/pre/").unwrap(), "http://h:1/pre");
        assert_eq!(parse_addr("https://h:1").unwrap(), "https://h:1");
        assert!(parse_addr("ftp://h:1").is_err());
        assert!(parse_addr("").is_err());
        assert!(parse_addr("h:notaport").is_err());
    }

    #[test]
    fn key_value() {
        assert_eq!(
            parse_key_value("a=b=c").unwrap(),
            ("a".into(), "b=c".into())
        );
        assert_eq!(parse_key_value("a=").unwrap(), ("a".into(), "".into()));
        assert!(parse_key_value("nokey").unwrap_err().contains("`nokey`"));
        assert!(parse_key_value("=v").is_err());
    }

    #[test]
    fn project() {
        assert_eq!(parse_project("demo").unwrap(), "demo");
        assert_eq!(parse_project("projects/p1").unwrap(), "p1");
        assert!(parse_project("a/b").is_err());
        assert!(parse_project("").is_err());
    }
}
