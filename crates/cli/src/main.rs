//! `pubrun`: `serve` runs the server in this process; every other command is
//! a thin client of the server's REST API.

mod agent;
mod client;
mod cluster;
mod serve;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "pubrun",
    version,
    about = "Run containerized batch jobs when something happens."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server: Pub/Sub gRPC + REST on one port, data in --data-dir.
    Serve(serve::ServeArgs),
    /// Join a machine pool of a server and run the runs it leases here.
    Agent(agent::AgentArgs),
    #[command(flatten)]
    Client(client::ClientCommand),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new().expect("start tokio runtime");
    let result = match cli.command {
        Command::Serve(args) => rt.block_on(serve::run(args)),
        Command::Agent(args) => rt.block_on(agent::run(args)),
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
            if arg.get_help().is_none_or(|h| h.to_string().trim().is_empty()) {
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
