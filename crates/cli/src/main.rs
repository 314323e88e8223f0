//! `pubrun`: `serve` runs the server in this process; every other command is
//! a thin client of the server's REST API.

mod agent;
mod client;
mod cluster;
mod serve;
mod setup;
mod token_file;

use clap::{Parser, Subcommand};

/// `0.1.0 (abc1234567)`: the commit comes from build.rs.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("PUBRUN_GIT_COMMIT"),
    ")"
);

#[derive(Parser)]
#[command(
    name = "pubrun",
    version = VERSION,
    about = "Run containerized batch jobs when something happens."
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server: Pub/Sub gRPC + REST on one port, data in --data-dir.
    // Boxed: the server's many flags would make every command this large.
    Serve(Box<serve::ServeArgs>),
    /// Join a machine pool of a server and run the runs it leases here.
    Agent(agent::AgentArgs),
    /// Exit 0 when the server answers /healthz, 1 otherwise (for container
    /// HEALTHCHECKs and scripts; no curl needed).
    Healthcheck(setup::HealthcheckArgs),
    /// Print a shell completion script: bash, zsh, fish, powershell or elvish.
    Completions(setup::CompletionsArgs),
    /// Print the man page, or write one per command with --dir.
    Man(setup::ManArgs),
    #[command(flatten)]
    Client(client::ClientCommand),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new().expect("start tokio runtime");
    let result = match cli.command {
        Command::Serve(args) => rt.block_on(serve::run(*args)),
        Command::Agent(args) => rt.block_on(agent::run(args)),
        Command::Healthcheck(args) => rt.block_on(setup::healthcheck(args)),
        Command::Completions(args) => setup::completions(args),
        Command::Man(args) => setup::man(args),
        Command::Client(cmd) => rt.block_on(client::run(cmd)),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every subcommand and every argument has its own help text, and no
    /// command shows a doc comment meant for a shared options struct.
    #[test]
    fn every_command_and_argument_is_described() {
        let cmd = Cli::command();
        cmd.clone().debug_assert();
        let mut missing = Vec::new();
        walk(&cmd, "pubrun", &mut missing);
        assert!(missing.is_empty(), "undescribed:\n{}", missing.join("\n"));
    }

    #[test]
    fn apply_help_lists_every_kind_of_resource() {
        let mut cmd = Cli::command();
        let apply = cmd.find_subcommand_mut("apply").expect("apply command");
        let help = apply.render_long_help().to_string();
        for kind in pubrun_core::manifest::RESOURCE_KINDS {
            assert!(
                help.contains(&format!("[[{kind}]]")),
                "apply --help misses [[{kind}]]:\n{help}"
            );
        }
    }

    fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
        let about = cmd.get_about().map(|a| a.to_string()).unwrap_or_default();
        if about.trim().is_empty() {
            missing.push(format!("{path}: no about"));
        }
        // ConnArgs' doc comment leaks as the about of a command without one.
        if about.starts_with("Where the server is") {
            missing.push(format!("{path}: leaked doc comment {about:?}"));
        }
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if matches!(id, "help" | "version") {
                continue;
            }
            if arg
                .get_help()
                .is_none_or(|h| h.to_string().trim().is_empty())
            {
                missing.push(format!("{path}: argument `{id}` has no help"));
            }
        }
        for sub in cmd.get_subcommands() {
            if sub.get_name() == "help" {
                continue;
            }
            walk(sub, &format!("{path} {}", sub.get_name()), missing);
        }
    }
}
