//! `pubrun apply` and `pubrun jobs …` (pubrun's REST API under `/api/v1`).

use std::io::{IsTerminal, Read};

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine;
use reqwest::Method;
use serde_json::{json, Map, Value};

use pubrun_jobs::apply::Action;

use super::api::{Api, Body, ServerError};
use super::messages::read_data;
use super::resources::string_map;
use super::{names, output, ApplyArgs, JobsCommand, TriggerArgs};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

pub async fn apply(args: ApplyArgs) -> Result<()> {
    let conn = &args.conn;
    let (file, bytes) = if args.file.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .context("reading the manifest from standard input")?;
        ("<stdin>".to_string(), buf)
    } else {
        let file = args.file.display().to_string();
        match std::fs::read(&args.file) {
            Ok(b) => (file, b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!("cannot read manifest {file}: no such file (pass the manifest with -f FILE, e.g. -f pubrun.toml)")
            }
            Err(e) if e.kind() == std::io::ErrorKind::IsADirectory || args.file.is_dir() => {
                bail!("cannot read manifest {file}: it is a directory; pass the manifest file, e.g. -f {file}/pubrun.toml")
            }
            Err(e) => bail!("cannot read manifest {file}: {e}"),
        }
    };
    if let Err(e) = std::str::from_utf8(&bytes) {
        let upto = &bytes[..e.valid_up_to()];
        let line = upto.iter().filter(|&&b| b == b'\n').count() + 1;
        bail!("{file}:{line}: the manifest is not UTF-8 text (a manifest is TOML)");
    }

    let api = Api::new(conn)?;
    if !args.dry_run && !args.yes {
        // Show what would be lost first; the operator (or --yes) decides.
        let plan = post_manifest(&api, &file, &bytes, true).await?;
        let destructive = destructive_changes(&plan);
        if destructive > 0 {
            let interactive = args.file.as_os_str() != "-" && std::io::stdin().is_terminal();
            if !interactive {
                output::out(&render_plan_with_warnings(&plan, false))?;
                bail!(
                    "the plan deletes or replaces {destructive} resource(s) (shown above); nothing was changed: pass --yes to apply it"
                );
            }
            output::out(&render_plan_with_warnings(&plan, false))?;
            eprint!("Delete or replace {destructive} resource(s)? [y/N] ");
            let mut answer = String::new();
            std::io::stdin().read_line(&mut answer)?;
            if !matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes") {
                bail!("apply cancelled; nothing was changed");
            }
        }
    }
    let resp = post_manifest(&api, &file, &bytes, args.dry_run).await?;
    if conn.json {
        return output::json(&resp);
    }
    let applied = resp
        .get("applied")
        .and_then(Value::as_bool)
        .unwrap_or(!args.dry_run);
    output::out(&render_plan_with_warnings(&resp, applied))
}

async fn post_manifest(api: &Api, file: &str, bytes: &[u8], dry_run: bool) -> Result<Value> {
    let dry_run = if dry_run { "true" } else { "false" };
    let query = [("dry_run", dry_run), ("file", file)];
    let body = Body {
        content_type: "application/toml",
        bytes: bytes.to_vec(),
    };
    match api
        .call_raw(Method::POST, "/api/v1/apply", &query, Some(body))
        .await
    {
        Ok((_, bytes)) => serde_json::from_slice::<Value>(&bytes)
            .map_err(|e| anyhow!("server sent an apply response that is not JSON ({e})")),
        Err(e) => Err(manifest_error(e, file)),
    }
}

/// How many changes of a plan delete or replace something.
fn destructive_changes(plan: &Value) -> usize {
    plan.get("changes")
        .and_then(Value::as_array)
        .map_or(0, |cs| {
            cs.iter()
                .filter(|c| action_of(c).is_some_and(Action::is_destructive))
                .count()
        })
}

/// The plan, then one `warning:` line per server warning.
fn render_plan_with_warnings(resp: &Value, applied: bool) -> String {
    let changes = output::items(resp, "changes");
    let mut s = render_plan(changes, applied);
    for w in output::items(resp, "warnings") {
        if let Some(w) = w.as_str() {
            s.push_str(&format!("warning: {w}\n"));
        }
    }
    s
}

/// A manifest error (`FILE:LINE:COLUMN: what`) is the whole message: print it
/// as the server wrote it, without the status code in front.
fn manifest_error(e: anyhow::Error, file: &str) -> anyhow::Error {
    match e.downcast_ref::<ServerError>() {
        Some(se)
            if se.code == "INVALID_ARGUMENT" && se.message.starts_with(&format!("{file}:")) =>
        {
            anyhow!("{}", se.message)
        }
        _ => e,
    }
}

/// A change's action; `None` when missing or unknown to this build.
fn action_of(change: &Value) -> Option<Action> {
    change
        .get("action")
        .and_then(Value::as_str)
        .and_then(Action::parse)
}

/// `+ create  topic  projects/demo/topics/uploads` lines and a last line
/// saying whether anything was changed.
pub fn render_plan(changes: &[Value], applied: bool) -> String {
    let mut rows = Vec::new();
    // Keyed by the name as sent, so an action of a newer server still counts.
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for c in changes {
        let name = c.get("action").and_then(Value::as_str).unwrap_or("?");
        let sign = action_of(c).map_or("?", Action::sign);
        rows.push(vec![
            format!("{sign} {name}"),
            c.get("kind").map(output::display).unwrap_or_default(),
            c.get("name").map(output::display).unwrap_or_default(),
        ]);
        match counts.iter_mut().find(|(a, _)| *a == name) {
            Some((_, n)) => *n += 1,
            None => counts.push((name, 1)),
        }
    }
    counts.sort_by_key(|(a, _)| {
        Action::parse(a)
            .and_then(|a| Action::ALL.iter().position(|o| *o == a))
            .unwrap_or(Action::ALL.len())
    });
    let summary: Vec<String> = counts
        .iter()
        .map(|(name, n)| match (Action::parse(name), applied) {
            (Some(Action::Unchanged), _) => format!("{n} unchanged"),
            (Some(a), true) => format!("{n} {}", a.done()),
            (_, _) => format!("{n} to {name}"),
        })
        .collect();
    let mut s = output::columns(&rows);
    if changes.is_empty() {
        s.push_str("the manifest declares nothing and nothing is to be deleted\n");
    }
    let summary = if summary.is_empty() {
        String::new()
    } else {
        format!(" ({})", summary.join(", "))
    };
    if applied {
        s.push_str(&format!("applied{summary}\n"));
    } else {
        s.push_str(&format!("dry run: nothing changed{summary}\n"));
    }
    s
}

pub async fn jobs(cmd: JobsCommand) -> Result<()> {
    match cmd {
        JobsCommand::List(conn) => {
            output::get_list(
                &conn,
                "/api/v1/jobs",
                "jobs",
                Some("no jobs: declare them in a manifest and run `pubrun apply -f pubrun.toml`"),
                &["JOB", "TOPIC", "RUNS", "CONCURRENCY", "TIMEOUT", "ATTEMPTS"],
                |j| {
                    vec![
                        str_of(j, "name"),
                        names::short(&str_of(j, "topic"), &conn.project, "topics").to_string(),
                        truncate(
                            &executor_summary(j.get("executor").unwrap_or(&Value::Null)),
                            48,
                        ),
                        num_of(j, "concurrency"),
                        secs_of(j, "timeout"),
                        j.pointer("/retries/max_attempts")
                            .map(output::display)
                            .unwrap_or("-".into()),
                    ]
                },
            )
            .await
        }
        JobsCommand::Show { name, conn } => {
            let api = Api::new(&conn)?;
            let resp = api.get(&job_path(&name)).await?;
            if conn.json {
                return output::json(&resp);
            }
            output::out(&render_job(&resp))
        }
        JobsCommand::Trigger(args) => trigger(args).await,
    }
}

async fn trigger(args: TriggerArgs) -> Result<()> {
    let conn = &args.conn;
    let data = read_data(args.data.as_deref(), &args.message)?;
    let mut body = Map::new();
    if !data.is_empty() {
        match String::from_utf8(data) {
            Ok(text) => body.insert("data".into(), json!(text)),
            Err(e) => body.insert("data_base64".into(), json!(B64.encode(e.as_bytes()))),
        };
    }
    body.insert(
        "attributes".into(),
        string_map("attribute", &args.message.attrs)?,
    );
    let api = Api::new(conn)?;
    let resp = api
        .post(
            &format!("{}/trigger", job_path(&args.name)),
            &Value::Object(body),
        )
        .await?;
    if conn.json {
        return output::json(&resp);
    }
    let run = resp.get("run").unwrap_or(&Value::Null);
    let id = run.get("id").map(output::display).ok_or_else(|| {
        anyhow!(
            "server accepted the trigger of job {} but returned no run: {resp}",
            args.name
        )
    })?;
    let status = run
        .get("status")
        .map(output::display)
        .unwrap_or_else(|| "?".into());
    eprintln!(
        "run {id} of job {} is {status}; follow it with `pubrun logs {id} -f`",
        args.name
    );
    output::out(&format!("{id}\n"))
}

fn job_path(name: &str) -> String {
    format!("/api/v1/jobs/{}", names::segment(name))
}

/// `{"job": JobSpec, "subscription": .., "backlog": n}` as a block.
pub fn render_job(resp: &Value) -> String {
    let j = resp.get("job").unwrap_or(resp);
    let mut rows: Vec<(&str, String)> =
        vec![("name", str_of(j, "name")), ("topic", str_of(j, "topic"))];
    let filter = str_of(j, "filter");
    if filter != "-" {
        rows.push(("filter", filter));
    }
    if let Some(sub) = resp.get("subscription").and_then(Value::as_str) {
        rows.push(("subscription", sub.to_string()));
    }
    if let Some(b) = resp.get("backlog") {
        rows.push((
            "backlog",
            format!("{} message(s) waiting", output::display(b)),
        ));
    }
    let ex = j.get("executor").unwrap_or(&Value::Null);
    let kind = ex.get("kind").and_then(Value::as_str).unwrap_or("?");
    rows.push(("executor", kind.to_string()));
    match kind {
        "process" => {
            rows.push(("command", command_line(ex)));
            let wd = str_of(ex, "working_dir");
            rows.push((
                "working dir",
                if wd == "-" {
                    "a fresh directory per run".into()
                } else {
                    wd
                },
            ));
        }
        "docker" => {
            rows.push(("image", str_of(ex, "image")));
            let cmd = words(ex.get("command"));
            rows.push((
                "command",
                if cmd.is_empty() {
                    "the image's default".into()
                } else {
                    cmd
                },
            ));
            if let Some(m) = ex
                .get("mounts")
                .and_then(Value::as_array)
                .filter(|m| !m.is_empty())
            {
                let mounts: Vec<String> = m
                    .iter()
                    .map(|m| {
                        let ro = if m.get("read_only").and_then(Value::as_bool) == Some(true) {
                            " (read-only)"
                        } else {
                            ""
                        };
                        format!("{} -> {}{ro}", str_of(m, "source"), str_of(m, "target"))
                    })
                    .collect();
                rows.push(("mounts", mounts.join("\n")));
            }
            if let Some(c) = ex.get("cpus").filter(|v| !v.is_null()) {
                rows.push(("cpus", output::display(c)));
            }
            if let Some(m) = ex.get("memory_bytes").and_then(Value::as_u64) {
                rows.push(("memory", output::bytes(m)));
            }
            let net = str_of(ex, "network");
            rows.push(("network", if net == "-" { "default".into() } else { net }));
            rows.push(("pull", str_of(ex, "pull")));
            if let Some(a) = ex.get("auth").filter(|v| !v.is_null()) {
                let server = str_of(a, "server");
                let at = if server == "-" {
                    String::new()
                } else {
                    format!(" at {server}")
                };
                rows.push((
                    "registry auth",
                    format!(
                        "{}{at}, password from ${}",
                        str_of(a, "username"),
                        str_of(a, "password_env")
                    ),
                ));
            }
        }
        _ => rows.push(("spec", ex.to_string())),
    }
    if let Some(env) = ex
        .get("env")
        .and_then(Value::as_object)
        .filter(|e| !e.is_empty())
    {
        let mut pairs: Vec<String> = env
            .iter()
            .map(|(k, v)| format!("{k}={}", output::display(v)))
            .collect();
        pairs.sort();
        rows.push(("env", pairs.join("\n")));
    }
    rows.push(("timeout", secs_of(j, "timeout")));
    rows.push(("grace period", secs_of(j, "grace_period")));
    let r = j.get("retries").unwrap_or(&Value::Null);
    let attempts = r.get("max_attempts").and_then(Value::as_u64).unwrap_or(1);
    rows.push((
        "retries",
        if attempts <= 1 {
            "none (1 attempt)".into()
        } else {
            format!(
                "up to {attempts} attempts, backoff {} doubling to {}",
                secs_of(r, "initial_backoff"),
                secs_of(r, "max_backoff")
            )
        },
    ));
    rows.push(("concurrency", num_of(j, "concurrency")));
    let dedup = str_of(j, "dedup_key");
    rows.push((
        "dedup key",
        if dedup == "-" {
            "the message id".into()
        } else {
            dedup
        },
    ));
    rows.push(("dedup window", secs_of(j, "dedup_window")));
    let result = str_of(j, "result_topic");
    rows.push((
        "result topic",
        if result == "-" { "none".into() } else { result },
    ));
    if let Some(n) = j.get("log_limit_bytes").and_then(Value::as_u64) {
        rows.push(("log limit", output::bytes(n)));
    }
    output::block(&rows)
}

/// `process: echo hi` / `docker: image:tag`.
fn executor_summary(ex: &Value) -> String {
    match ex.get("kind").and_then(Value::as_str) {
        Some("process") => format!("process: {}", command_line(ex)),
        Some("docker") => format!("docker: {}", str_of(ex, "image")),
        Some(other) => other.to_string(),
        None => "-".into(),
    }
}

fn command_line(ex: &Value) -> String {
    let mut w = vec![output::shell_word(
        ex.get("command").and_then(Value::as_str).unwrap_or(""),
    )];
    if let Some(args) = ex.get("args").and_then(Value::as_array) {
        w.extend(args.iter().map(|a| output::shell_word(&output::display(a))));
    }
    w.join(" ")
}

fn words(v: Option<&Value>) -> String {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|w| output::shell_word(&output::display(w)))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(max - 1).collect::<String>())
    }
}

fn str_of(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(Value::String(_)) => "-".into(),
        Some(other) => output::display(other),
    }
}

fn num_of(v: &Value, key: &str) -> String {
    v.get(key)
        .filter(|v| !v.is_null())
        .map(output::display)
        .unwrap_or_else(|| "-".into())
}

/// A duration field the server sends as seconds.
fn secs_of(v: &Value, key: &str) -> String {
    match v.get(key).and_then(Value::as_f64) {
        Some(secs) => output::config_duration(secs),
        None => "-".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_lines_and_summary() {
        let changes = vec![
            json!({"kind": "topic", "name": "projects/demo/topics/uploads", "action": "create"}),
            json!({"kind": "job", "name": "fit", "action": "update"}),
            json!({"kind": "subscription", "name": "projects/demo/subscriptions/s", "action": "unchanged"}),
            json!({"kind": "topic", "name": "projects/demo/topics/old", "action": "delete"}),
        ];
        let s = render_plan(&changes, true);
        assert_eq!(
            s,
            "+ create     topic         projects/demo/topics/uploads\n\
             ~ update     job           fit\n\
             = unchanged  subscription  projects/demo/subscriptions/s\n\
             - delete     topic         projects/demo/topics/old\n\
             applied (1 created, 1 updated, 1 deleted, 1 unchanged)\n"
        );
        let s = render_plan(&changes[..1], false);
        assert!(
            s.ends_with("dry run: nothing changed (1 to create)\n"),
            "{s}"
        );
    }

    #[test]
    fn job_block() {
        let resp = json!({
            "job": {
                "name": "echo", "topic": "projects/demo/topics/in", "filter": "",
                "executor": {"kind": "process", "command": "sh", "args": ["-c", "echo {{ data }}"], "env": {"A": "1"}, "working_dir": ""},
                "timeout": 1800.0, "grace_period": 10.0,
                "retries": {"max_attempts": 3, "initial_backoff": 10.0, "max_backoff": 300.0},
                "concurrency": 2, "dedup_key": "", "dedup_window": 86400.0, "result_topic": "",
                "log_limit_bytes": 10485760u64
            },
            "subscription": "projects/demo/subscriptions/pubrun-job-echo",
            "backlog": 0
        });
        let s = render_job(&resp);
        assert!(s.contains("command:      sh -c 'echo {{ data }}'\n"), "{s}");
        assert!(s.contains("timeout:      30m\n"), "{s}");
        assert!(
            s.contains("retries:      up to 3 attempts, backoff 10s doubling to 5m\n"),
            "{s}"
        );
        assert!(s.contains("dedup key:    the message id\n"), "{s}");
        assert!(s.contains("log limit:    10 MiB\n"), "{s}");
        assert!(s.contains("env:          A=1\n"), "{s}");
        assert!(!s.contains("filter:"), "{s}");
        assert_eq!(
            executor_summary(&resp["job"]["executor"]),
            "process: sh -c 'echo {{ data }}'"
        );
    }
}
