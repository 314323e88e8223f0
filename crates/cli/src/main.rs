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
