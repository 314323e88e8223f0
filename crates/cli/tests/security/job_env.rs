//! A job's environment: nothing of the server's own (its token, webhook
//! secrets) reaches a job; `pass_env` variables and declared secrets do, and
//! secret values are masked in the run's log and record.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::common::ServeBuilder;

const BIN: &str = env!("CARGO_BIN_EXE_pubrun");
const PATIENCE: Duration = Duration::from_secs(60);

const TOKEN: &str = "server-token-T-3f9a1c";
const HOOK_SECRET: &str = "hook-secret-S-77d0e2";
const DB_PASSWORD: &str = "db-pa55-w0rd-91b4";

const MANIFEST: &str = include_str!("../manifests/security-job-env.toml");

fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .env("PUBRUN_ADDR", format!("http://127.0.0.1:{port}"))
        .env("PUBRUN_TOKEN", TOKEN)
        .env_remove("PUBRUN_PROJECT")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "`pubrun {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn a_process_job_sees_only_its_declared_environment_and_secrets_are_masked() {
    let server = ServeBuilder::new()
        .config(MANIFEST)
        .token(TOKEN)
        .env("PUBRUN_TOKEN", TOKEN)
        .env("IMPORT_HOOK_SECRET", HOOK_SECRET)
        .env("PROD_DB_PASSWORD", DB_PASSWORD)
        .env("HTTP_PROXY", "http://proxy.test:3128")
        .env_remove("NOT_SET_ON_THE_SERVER")
        .log_level("info")
        .patience(PATIENCE)
        .start();
    let port = server.port();
    let server_log = || server.log();

    let id = cli(port, &["jobs", "trigger", "show-env"])
        .trim()
        .to_string();
    let run = super::common::poll(
        PATIENCE,
        Duration::from_millis(100),
        || {
            let out = cli(port, &["runs", "show", &id, "--json"]);
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            let ended = matches!(
                v["run"]["status"].as_str(),
                Some("succeeded" | "failed" | "timed_out" | "cancelled")
            );
            super::common::ready_if(ended, out)
        },
        |out| format!("run {id} did not end: {out}\n{}", server_log()),
    );
    let log = cli(port, &["logs", &id]);
    let v: serde_json::Value = serde_json::from_str(&run).unwrap();
    assert_eq!(v["run"]["status"], "succeeded", "{run}\n{log}");

    // The server's token and webhook secret never reach the job.
    for leaked in [TOKEN, HOOK_SECRET, "IMPORT_HOOK_SECRET", "PROD_DB_PASSWORD"] {
        assert!(
            !log.contains(leaked),
            "{leaked} leaked into the run log:\n{log}"
        );
        assert!(!run.contains(leaked), "{leaked} in `runs show`:\n{run}");
    }
    // pass_env: a set variable arrives, an unset one stays unset.
    assert!(log.contains("HTTP_PROXY=http://proxy.test:3128\n"), "{log}");
    assert!(!log.contains("NOT_SET_ON_THE_SERVER"), "{log}");
    // The secret reached the job, and is masked wherever it was printed.
    assert!(log.contains("secret-received\n"), "{log}");
    assert!(
        log.contains("DB_PASSWORD=***\n") && log.contains("again: ***\n"),
        "{log}"
    );
    assert!(!log.contains(DB_PASSWORD), "{log}");
    assert!(!run.contains(DB_PASSWORD), "{run}");
    // `jobs show` names the variable, never the value.
    let job = cli(port, &["jobs", "show", "show-env", "--json"]);
    assert!(
        job.contains("PROD_DB_PASSWORD") && !job.contains(DB_PASSWORD),
        "{job}"
    );
}

#[test]
fn a_secret_missing_on_the_server_fails_the_run_with_a_clear_cause() {
    let server = ServeBuilder::new()
        .config(MANIFEST)
        .token(TOKEN)
        .env_remove("PROD_DB_PASSWORD")
        .log_level("info")
        .patience(PATIENCE)
        .start();
    let port = server.port();
    let id = cli(port, &["jobs", "trigger", "show-env"])
        .trim()
        .to_string();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let out = cli(port, &["runs", "show", &id, "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        if v["run"]["status"] == "failed" {
            let err = v["run"]["exit"]["error"].as_str().unwrap_or_default();
            assert!(
                err.contains("secret DB_PASSWORD") && err.contains("PROD_DB_PASSWORD is not set"),
                "{out}"
            );
            assert_eq!(v["run"]["attempt"], 1);
            break;
        }
        assert!(Instant::now() < deadline, "run {id} did not fail: {out}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
