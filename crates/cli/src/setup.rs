//! Commands for installing and operating pubrun rather than using it:
//! `healthcheck`, `completions`, `man`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::CommandFactory;

#[derive(clap::Args)]
pub struct HealthcheckArgs {
    /// Server address: http://HOST:PORT or just HOST:PORT.
    #[arg(long, env = "PUBRUN_ADDR", default_value = "http://127.0.0.1:8085",
          value_parser = crate::client::parse_addr)]
    addr: String,
    /// Give up after this long.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// GET /healthz (which needs no token): exit 0 on `200 ok`, else an error.
pub async fn healthcheck(args: HealthcheckArgs) -> Result<()> {
    let http = reqwest::Client::builder()
        .timeout(args.timeout)
        .no_proxy()
        .build()?;
    let url = format!("{}/healthz", args.addr);
    let resp = http
        .get(&url)
        .send()
        .await
        .with_context(|| format!("{url} did not answer"))?;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    if !status.is_success() || body.trim() != "ok" {
        bail!("{url} answered {status}: {}", body.trim());
    }
    println!("ok");
    Ok(())
}

#[derive(clap::Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    shell: clap_complete::Shell,
}

/// Prints the completion script, e.g. `pubrun completions bash > /etc/bash_completion.d/pubrun`.
pub fn completions(args: CompletionsArgs) -> Result<()> {
    let mut cmd = crate::Cli::command();
    clap_complete::generate(args.shell, &mut cmd, "pubrun", &mut std::io::stdout());
    Ok(())
}

#[derive(clap::Args)]
pub struct ManArgs {
    /// Write pubrun.1 and one pubrun-COMMAND.1 per command into this
    /// directory instead of printing pubrun(1).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

pub fn man(args: ManArgs) -> Result<()> {
    let cmd = crate::Cli::command();
    match args.dir {
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(cmd, &dir)
                .with_context(|| format!("writing man pages to {}", dir.display()))
        }
        None => {
            let mut out = Vec::new();
            clap_mangen::Man::new(cmd).render(&mut out)?;
            std::io::Write::write_all(&mut std::io::stdout(), &out)?;
            Ok(())
        }
    }
}
