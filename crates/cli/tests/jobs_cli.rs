//! Jobs, runs, logs and apply as a user drives them: the real `pubrun`
//! binary against a real `pubrun serve --config pubrun.toml` child process
//! running real process jobs, asserting on stdout, stderr and exit codes.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{fill, free_port, poll, ready_if, table_row, Cli, Ran, Serve, ServeBuilder};
use serde_json::Value;

/// Long enough for a slow CI machine; the happy path takes well under a second.
const PATIENCE: Duration = Duration::from_secs(60);

/// Line 4 (`bogus = 1`) is the unknown key.
const BAD_MANIFEST: &str = "project = \"demo\"\n[[topic]]\nname = \"uploads\"\nbogus = 1\n";

/// Two topics, and three process jobs: one that greets and exits with the
/// code given in the data, one that runs for a minute (to cancel), and one
/// that prints, waits two seconds and prints again (to follow).
fn manifest(hello_timeout: &str) -> String {
    fill(
        include_str!("manifests/jobs-cli.toml"),
        &[("hello_timeout", &hello_timeout)],
    )
}

/// Serves with `pubrun.toml` = [`manifest`] applied at start.
fn start() -> Serve {
    ServeBuilder::new()
        .config(manifest("30s"))
        .log_level("info")
        .patience(PATIENCE)
        .start()
}

/// Client commands and waits against the harness's server.
impl Serve {
    /// The run as `pubrun runs show ID --json` has it.
    fn run_record(&self, id: &str) -> Value {
        self.json(&["runs", "show", id])["run"].clone()
    }

    /// Writes `text` to `name` in the server's dir and applies it.
    fn write_and_apply(&self, name: &str, text: &str) {
        let path = write(&self.path(name), text);
        self.ok(&["apply", "-f", &path]);
    }

    /// Polls `pubrun runs show ID` until `pred` holds; returns that run.
    fn wait_run(&self, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let what = format!("run {id} becoming {what}");
        self.wait_json(&["runs", "show", id], &what, |v| pred(&v["run"]))["run"].clone()
    }

    fn wait_terminal(&self, id: &str) -> Value {
        self.wait_run(id, "terminal", |r| {
            matches!(
                r["status"].as_str(),
                Some("succeeded" | "failed" | "timed_out" | "cancelled")
            )
        })
    }

    /// Polls `pubrun runs --job JOB --json` until a run of the job exists; returns its id.
    fn wait_first_run_of(&self, job: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let runs = self.json(&["runs", "--job", job]);
            if let Some(run) = runs["runs"].as_array().and_then(|a| a.last()) {
                return run["id"].to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no run of job {job} appeared within {PATIENCE:?}: {runs}\n--- server log ---\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A command running in the background (`pubrun logs -f`), with its output
/// collected by threads so it never blocks on a full pipe.
struct Background {
    child: Child,
    stdout: Option<std::thread::JoinHandle<String>>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Background {
    fn spawn(mut cli: Cli) -> Background {
        let mut child = cli
            .command()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn pubrun");
        let mut out = child.stdout.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        let stdout = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        Background {
            child,
            stdout: Some(stdout),
            stderr: Some(stderr),
        }
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits up to `limit` for the command to end.
    fn finish(mut self, limit: Duration) -> Ran {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "command still running after {limit:?}; output so far:\n{}",
                    self.stdout.take().unwrap().join().unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        Ran {
            code: status.code().unwrap_or(-1),
            stdout: self.stdout.take().unwrap().join().unwrap(),
            stderr: self.stderr.take().unwrap().join().unwrap(),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write(path: &Path, text: &str) -> String {
    std::fs::write(path, text).unwrap();
    path.display().to_string()
}

#[test]
fn a_published_message_runs_the_job_and_its_log_and_exit_are_shown() {
    let server = start();

    // Jobs from --config are listed and shown.
    let out = server.ok(&["jobs", "list"]);
    assert!(out.starts_with("JOB "), "{out}");
    let hello = table_row(&out, "hello");
    assert!(
        hello.contains("uploads") && hello.contains("process: sh -c"),
        "{out}"
    );
    table_row(&out, "sleeper");
    let jobs = server.json(&["jobs", "list"]);
    assert_eq!(jobs["jobs"].as_array().map(Vec::len), Some(3), "{jobs}");
    let out = server.ok(&["jobs", "show", "hello"]);
    assert!(
        out.contains("topic:") && out.contains("projects/demo/topics/uploads"),
        "{out}"
    );
    assert!(out.contains("echo hello {{ attributes.who }}"), "{out}");
    assert!(out.contains("timeout:") && out.contains("30s"), "{out}");
    let job = server.json(&["jobs", "show", "hello"]);
    assert_eq!(job["job"]["name"], "hello", "{job}");

    // A published message becomes a run that succeeds.
    let msg_id = server
        .ok(&[
            "publish",
            "uploads",
            "--data",
            r#"{"code": 0}"#,
            "--attr",
            "who=world",
        ])
        .trim()
        .to_string();
    let id = server.wait_first_run_of("hello");
    let run = server.wait_terminal(&id);
    assert_eq!(run["status"], "succeeded", "{run:#}\n{}", server.log());
    assert_eq!(run["message"]["id"], msg_id.as_str(), "{run:#}");
    assert_eq!(run["exit"]["exit_code"], 0, "{run:#}");

    let out = server.ok(&["runs"]);
    assert!(
        out.starts_with("ID ") && out.contains("STATUS") && out.contains("DURATION"),
        "{out}"
    );
    let line = table_row(&out, &id);
    assert!(
        line.contains("hello") && line.contains("succeeded") && line.contains("1/1"),
        "{out}"
    );
    let runs = server.json(&[
        "runs",
        "--job",
        "hello",
        "--status",
        "succeeded",
        "--limit",
        "5",
    ]);
    assert_eq!(runs["runs"][0]["id"].to_string(), id, "{runs}");

    // Its log holds the job's output.
    let r = server.run(&["logs", &id]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("hello world\n"), "{}", r.stdout);
    let log = server.json(&["logs", &id]);
    assert!(
        log["log"].as_str().unwrap().contains("hello world"),
        "{log}"
    );
    assert_eq!(log["status"], "succeeded", "{log}");

    // A manual trigger creates a run; `runs show` tells its exit code.
    let out = server.ok(&[
        "jobs",
        "trigger",
        "hello",
        "--data",
        r#"{"code": 3}"#,
        "--attr",
        "who=trigger",
    ]);
    let trig = out.trim().to_string();
    assert!(
        trig.parse::<i64>().is_ok(),
        "the run id alone on stdout: {out:?}"
    );
    assert_ne!(trig, id);
    let run = server.wait_terminal(&trig);
    assert_eq!(run["status"], "failed", "{run:#}");
    assert_eq!(run["exit"]["exit_code"], 3, "{run:#}");
    let out = server.ok(&["runs", "show", &trig]);
    for want in [
        "job:",
        "hello",
        "status:",
        "failed",
        "exit code:",
        "message id:",
        "who=trigger",
        "started:",
        "duration:",
    ] {
        assert!(out.contains(want), "{want:?} missing from:\n{out}");
    }
    let exit_line = out.lines().find(|l| l.starts_with("exit code:")).unwrap();
    assert_eq!(exit_line.split_whitespace().last(), Some("3"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("started:") && l.trim_end().ends_with('Z')),
        "times are RFC 3339 UTC:\n{out}"
    );
    assert!(server.ok(&["logs", &trig]).contains("hello trigger\n"));
    let failed = server.json(&["runs", "--status", "failed"]);
    let ids: Vec<String> = common::array(&failed, "runs")
        .iter()
        .map(|r| r["id"].to_string())
        .collect();
    assert_eq!(ids, std::slice::from_ref(&trig), "{failed}");

    // Data from a file; --json gives the whole run.
    let data = server.path("data.json");
    std::fs::write(&data, r#"{"code": 0}"#).unwrap();
    let resp = server.json(&[
        "jobs",
        "trigger",
        "hello",
        "--data-file",
        data.to_str().unwrap(),
        "--attr",
        "who=file",
    ]);
    let from_file = resp["run"]["id"].to_string();
    assert_eq!(resp["run"]["job"], "hello", "{resp}");
    assert_eq!(server.wait_terminal(&from_file)["status"], "succeeded");
    assert!(server.ok(&["logs", &from_file]).contains("hello file\n"));

    // Filters that match nothing say so on stderr.
    let r = server.run(&["runs", "--job", "ticker"]);
    assert_eq!((r.code, r.stdout.as_str()), (0, ""), "{}", r.stderr);
    assert!(r.stderr.contains("no runs of job ticker"), "{}", r.stderr);
}

#[test]
fn cancel_stops_a_long_run_and_logs_follow_returns_when_a_run_ends() {
    let server = start();

    // Follow a run from its start to its natural end.
    server.ok(&["publish", "tick", "--data", "go"]);
    let tick = server.wait_first_run_of("ticker");
    let follower = Background::spawn(server.client(&["logs", &tick, "--follow"]));
    let r = follower.finish(PATIENCE);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("one\n") && r.stdout.contains("two\n"),
        "{}",
        r.stdout
    );
    assert!(
        r.stderr.contains(&format!("run {tick} succeeded")),
        "{}",
        r.stderr
    );
    let run = server.run_record(&tick);
    assert_eq!(
        run["status"], "succeeded",
        "follow returned before the end: {run:#}"
    );

    // A minute-long run: follow it, cancel it, the follower returns.
    server.ok(&["publish", "slow", "--data", "x"]);
    let long = server.wait_first_run_of("sleeper");
    server.wait_run(&long, "running", |r| r["status"] == "running");
    let mut follower = Background::spawn(server.client(&["logs", "-f", &long]));
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        follower.running(),
        "logs -f must keep following a running run"
    );

    // A second run of the job queues behind it (concurrency 1); cancel that one first.
    let queued = server
        .ok(&["jobs", "trigger", "sleeper"])
        .trim()
        .to_string();
    let out = server.ok(&["runs", "cancel", &queued]);
    assert!(out.contains(&format!("run {queued}")), "{out}");
    assert_eq!(server.wait_terminal(&queued)["status"], "cancelled");

    let started = Instant::now();
    let out = server.ok(&["runs", "cancel", &long]);
    assert!(out.contains(&format!("run {long}")), "{out}");
    let run = server.wait_terminal(&long);
    assert_eq!(run["status"], "cancelled", "{run:#}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "cancel took {:?}: the `sleep 60` child was not stopped",
        started.elapsed()
    );
    assert_eq!(run["exit"]["cancelled"], true, "{run:#}");
    let r = follower.finish(PATIENCE);
    assert_eq!(
        r.code, 0,
        "logs -f exits 0 whatever the run's end: {}",
        r.stderr
    );
    assert!(r.stdout.contains("started\n"), "{}", r.stdout);
    assert!(r.stderr.contains("was cancelled"), "{}", r.stderr);
    let out = server.ok(&["runs", "show", &long]);
    assert!(
        out.lines()
            .any(|l| l.starts_with("status:") && l.contains("cancelled")),
        "{out}"
    );

    // --wait returns once the run has ended.
    let third = server
        .ok(&["jobs", "trigger", "sleeper"])
        .trim()
        .to_string();
    server.wait_run(&third, "running", |r| r["status"] == "running");
    let done = server.json(&["runs", "cancel", &third, "--wait"]);
    assert_eq!(done["run"]["status"], "cancelled", "{done}");

    // Cancelling a run that already ended is refused.
    let r = server.run(&["runs", "cancel", &tick]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(
        r.stderr.starts_with("error: FAILED_PRECONDITION: "),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("already ended"), "{}", r.stderr);
}

#[test]
fn apply_prints_the_plan_and_changes_only_without_dry_run() {
    let server = start();
    let same = write(&server.path("same.toml"), &manifest("30s"));

    // The manifest served at start: nothing to do.
    let out = server.ok(&["apply", "-f", &same]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 7, "{out}");
    assert!(
        lines[..6].iter().all(|l| l.starts_with("= unchanged ")),
        "{out}"
    );
    assert!(
        out.contains("topic  ") && out.contains("projects/demo/topics/uploads"),
        "{out}"
    );
    assert!(lines[6].starts_with("applied"), "{out}");

    // An edited manifest: a changed job and a new topic.
    let mut edited = manifest("45s");
    edited.push_str("\n[[topic]]\nname = \"extra\"\n");
    let edited = write(&server.path("edited.toml"), &edited);

    let out = server.ok(&["apply", "-f", &edited, "--dry-run"]);
    let plan_line = |out: &str, name: &str| -> String {
        out.lines()
            .find(|l| l.split_whitespace().last() == Some(name))
            .unwrap_or_else(|| panic!("no plan line for {name}:\n{out}"))
            .to_string()
    };
    let l = plan_line(&out, "hello");
    assert!(l.starts_with("~ update") && l.contains(" job "), "{out}");
    let l = plan_line(&out, "projects/demo/topics/extra");
    assert!(l.starts_with("+ create") && l.contains(" topic "), "{out}");
    assert!(
        plan_line(&out, "sleeper").starts_with("= unchanged"),
        "{out}"
    );
    assert!(
        out.lines()
            .last()
            .unwrap()
            .starts_with("dry run: nothing changed"),
        "{out}"
    );
    // … and nothing changed.
    let job = server.json(&["jobs", "show", "hello"]);
    assert_eq!(job["job"]["timeout"].as_f64(), Some(30.0), "{job}");
    let r = server.run(&["topics", "get", "extra"]);
    assert_eq!(r.code, 1, "dry run created the topic: {}", r.stdout);

    // For real.
    let out = server.ok(&["apply", "-f", &edited]);
    assert!(plan_line(&out, "hello").starts_with("~ update"), "{out}");
    assert!(out.lines().last().unwrap().starts_with("applied"), "{out}");
    let job = server.json(&["jobs", "show", "hello"]);
    assert_eq!(job["job"]["timeout"].as_f64(), Some(45.0), "{job}");
    server.ok(&["topics", "get", "extra"]);

    // Idempotent: everything unchanged now; --json has the same plan.
    let resp = server.json(&["apply", "-f", &edited]);
    assert_eq!(resp["applied"], true, "{resp}");
    let changes = resp["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 7, "{resp}");
    assert!(changes.iter().all(|c| c["action"] == "unchanged"), "{resp}");

    // Back to the first manifest: a deleting plan needs --yes when nobody
    // can be asked (stdin is not a terminal here), and changes nothing.
    let r = server.run(&["apply", "-f", &same]);
    assert_eq!(
        r.code, 1,
        "a deleting apply ran without --yes: {}",
        r.stdout
    );
    assert!(r.stderr.contains("--yes"), "{}", r.stderr);
    assert!(
        r.stdout.contains("- delete"),
        "the plan is shown: {}",
        r.stdout
    );
    server.ok(&["topics", "get", "extra"]);
    // With --yes the topic it no longer declares is deleted.
    let out = server.ok(&["apply", "-f", &same, "--yes"]);
    let l = plan_line(&out, "projects/demo/topics/extra");
    assert!(l.starts_with("- delete") && l.contains(" topic "), "{out}");
    assert!(plan_line(&out, "hello").starts_with("~ update"), "{out}");

    // An unknown key: the error names file, line and column; nothing changes.
    let bad = write(&server.path("bad.toml"), BAD_MANIFEST);
    for extra in [&[][..], &["--dry-run"][..]] {
        let mut args = vec!["apply", "-f", bad.as_str()];
        args.extend_from_slice(extra);
        let r = server.run(&args);
        assert_eq!(r.code, 1, "{}", r.stdout);
        assert_eq!(r.stdout, "");
        assert!(r.stderr.contains(&format!("{bad}:4:")), "{}", r.stderr);
        assert!(r.stderr.contains("bogus"), "{}", r.stderr);
    }
    assert_eq!(
        server.json(&["jobs", "list"])["jobs"]
            .as_array()
            .map(Vec::len),
        Some(3)
    );

    // A file that is not there.
    let missing = server.path("nope.toml").display().to_string();
    let r = server.run(&["apply", "-f", &missing]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains(&missing) && r.stderr.contains("no such file"),
        "{}",
        r.stderr
    );
    // -f is required.
    let r = server.run(&["apply"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("--file"), "{}", r.stderr);
}

#[test]
fn unknown_runs_and_jobs_are_errors_with_exit_code_1() {
    let server = start();
    for (args, code) in [
        (&["runs", "show", "999"][..], "NOT_FOUND"),
        (&["runs", "cancel", "999"], "NOT_FOUND"),
        (&["logs", "999"], "NOT_FOUND"),
        (&["logs", "999", "-f"], "NOT_FOUND"),
        (&["jobs", "show", "nope"], "NOT_FOUND"),
        (&["jobs", "trigger", "nope"], "NOT_FOUND"),
        (&["runs", "show", "abc"], "INVALID_ARGUMENT"),
    ] {
        let r = server.run(args);
        assert_eq!(r.code, 1, "`pubrun {}`: {}", args.join(" "), r.stderr);
        assert!(
            r.stderr.starts_with(&format!("error: {code}: ")),
            "`pubrun {}`: {}",
            args.join(" "),
            r.stderr
        );
        assert_eq!(r.stdout, "", "`pubrun {}`", args.join(" "));
    }
    // Flags of the list and a subcommand do not mix; an unknown status is caught early.
    let r = server.run(&["runs", "--job", "hello", "show", "1"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    let r = server.run(&["runs", "--status", "done"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("succeeded"),
        "lists the valid states: {}",
        r.stderr
    );
    let r = server.run(&[
        "jobs",
        "trigger",
        "hello",
        "--data",
        "x",
        "--data-file",
        "f",
    ]);
    assert_eq!(r.code, 2, "{}", r.stderr);
}

#[test]
fn serve_with_an_invalid_config_exits_1_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write(&dir.path().join("bad.toml"), BAD_MANIFEST);
    // `pubrun serve` on a free port, in its own data directory, with `config`.
    let serve = |data: &str, config: &str| {
        let listen = format!("127.0.0.1:{}", free_port());
        let data = dir.path().join(data).display().to_string();
        Cli::new(&[
            "serve",
            "--listen",
            &listen,
            "--data-dir",
            &data,
            "--config",
            config,
        ])
        .env("PUBRUN_LOG", "warn")
        .env_remove("PUBRUN_CONFIG")
    };
    let r = Background::spawn(serve("data", &bad)).finish(PATIENCE);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("bad.toml:4:"), "{}", r.stderr);
    assert!(r.stderr.contains("bogus"), "{}", r.stderr);

    // A config file that does not exist is named too.
    let missing = dir.path().join("missing.toml").display().to_string();
    let r = Background::spawn(serve("data2", &missing)).finish(PATIENCE);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("missing.toml"), "{}", r.stderr);
}

#[test]
fn the_plan_warns_about_lost_messages_and_jobs_that_cannot_use_their_pool() {
    let server = start();
    server.write_and_apply("first.toml", include_str!("manifests/jobs-cli-first.toml"));
    for i in 0..3 {
        server.ok(&[
            "publish",
            "projects/warn/topics/topic-a",
            "--data",
            &format!("m{i}"),
        ]);
    }
    // The subscription moves to another topic (a replace) and a job sits on
    // a pool of four machines with the default concurrency of one.
    let second = write(
        &server.path("second.toml"),
        include_str!("manifests/jobs-cli-second.toml"),
    );
    let out = server.ok(&["apply", "-f", &second, "--dry-run"]);
    assert!(
        out.contains("warning: replacing subscription projects/warn/subscriptions/watch loses its 3 unacked message(s)"),
        "{out}"
    );
    assert!(
        out.contains("warning: job narrow has concurrency = 1: it will never use more than one of pool fleet's 4 machines"),
        "{out}"
    );
    // A replace needs --yes without a terminal; the messages are still there.
    let r = server.run(&["apply", "-f", &second]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    let resp = server.json(&["apply", "-f", &second, "--dry-run"]);
    assert_eq!(resp["warnings"].as_array().map(Vec::len), Some(2), "{resp}");
    server.ok(&["apply", "-f", &second, "--yes"]);
    let resp = server.json(&["apply", "-f", &second, "--dry-run"]);
    assert_eq!(
        resp["warnings"].as_array().map(Vec::len),
        Some(1),
        "only the pool warning is left: {resp}"
    );
}

#[test]
fn logs_end_with_a_newline_and_say_why_a_run_that_never_started_ended() {
    let server = start();
    server.write_and_apply(
        "papercuts.toml",
        include_str!("manifests/jobs-cli-papercuts.toml"),
    );
    let id = server
        .ok(&["jobs", "trigger", "printer"])
        .trim()
        .to_string();
    let out = server.ok(&["logs", &id, "--follow"]);
    assert!(
        out.ends_with('\n'),
        "the last line ends with a newline: {out:?}"
    );
    // pubrun's own notes start on their own line after unterminated output.
    assert!(out.contains("\npartial\n[pubrun] attempt ended"), "{out:?}");

    let id = server
        .ok(&["jobs", "trigger", "bad-template"])
        .trim()
        .to_string();
    let r = server.run(&["logs", &id, "--follow"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout, "", "no log was written");
    assert!(
        r.stderr.contains("left no log") && r.stderr.contains("nope"),
        "{}",
        r.stderr
    );
    // Without --follow, once ended, the same reason.
    let r = server.run(&["logs", &id]);
    assert!(r.stderr.contains("nope"), "{}", r.stderr);
}

/// `serve --work-dir`: run working directories (and the message files in
/// them) live there, logs stay in the data directory; a run's directory is
/// removed once the run ends, also by the next server when one was left
/// behind; a second server cannot share the directory.
#[test]
fn work_dir_holds_run_directories_until_their_run_ends() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    let work_arg = work.display().to_string();
    let mut server = ServeBuilder::new()
        .config(include_str!("manifests/work-dir.toml"))
        .args(["--work-dir", &work_arg])
        .patience(PATIENCE)
        .start();
    let work = work.canonicalize().unwrap();

    server.ok(&["publish", "work", "--data", "payload-7", "--attr", "k=v"]);
    let id = server.wait_first_run_of("where");
    let run = server.wait_terminal(&id);
    assert_eq!(run["status"], "succeeded", "{run:#}\n{}", server.log());
    let log = server.json(&["logs", &id])["log"]
        .as_str()
        .unwrap()
        .to_string();
    let run_dir = work.join(&id);
    assert!(
        log.contains(&format!("cwd={}\n", run_dir.display())),
        "the run did not work in {}:\n{log}",
        run_dir.display()
    );
    assert!(log.contains("data=payload-7\n"), "{log}");
    assert!(log.contains(r#""k":"v""#), "{log}");

    // The log is in the data directory; no working directory is there.
    let runs = server.data_dir().join("runs").join(&id);
    assert!(runs.join("log").is_file(), "no log in {}", runs.display());
    assert!(
        !runs.join("work").exists(),
        "a working directory in {}",
        runs.display()
    );
    poll(
        PATIENCE,
        Duration::from_millis(50),
        || ready_if(!run_dir.exists(), ()),
        |()| format!("{} was not removed after its run ended", run_dir.display()),
    );

    // Each server needs its own work directory.
    let other = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pubrun"))
        .args(["serve", "--listen", "127.0.0.1:0", "--work-dir", &work_arg])
        .arg("--data-dir")
        .arg(other.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second server shared {work_arg}");
    assert!(
        stderr.contains("is in use by another pubrun server"),
        "{stderr}"
    );

    // A directory left behind by a crash is removed by the next server.
    std::fs::create_dir_all(run_dir.join("left")).unwrap();
    server.kill();
    server.respawn();
    server.wait_healthy();
    poll(
        PATIENCE,
        Duration::from_millis(50),
        || ready_if(!run_dir.exists(), ()),
        |()| {
            format!(
                "{} (an ended run's) was not swept at start",
                run_dir.display()
            )
        },
    );
}
