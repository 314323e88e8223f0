//! `pubrun runs …` and `pubrun logs`.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use reqwest::Method;
use serde_json::{json, Value};

use super::api::{Api, TransportError};
use super::args::ConnArgs;
use super::{names, output, LogsArgs, RunsArgs, RunsCommand, RunsListArgs};

/// How often `logs --follow` and `runs cancel --wait` ask the server.
const POLL: Duration = Duration::from_millis(300);
/// How long `logs --follow` keeps retrying while the server does not answer
/// (a restart takes a few seconds).
const RECONNECT_FOR: Duration = Duration::from_secs(60);

pub async fn runs(args: RunsArgs) -> Result<()> {
    match args.command {
        None => list(args.list).await,
        Some(RunsCommand::List(list_args)) => list(list_args).await,
        Some(RunsCommand::Show { id, conn }) => {
            let api = Api::new(&conn)?;
            let resp = api.get(&run_path(&id)).await?;
            if conn.json {
                return output::json(&resp);
            }
            output::out(&render_run(resp.get("run").unwrap_or(&resp), now_ms()))
        }
        Some(RunsCommand::Cancel { id, wait, conn }) => cancel(&id, wait, &conn).await,
    }
}

async fn list(args: RunsListArgs) -> Result<()> {
    let conn = &args.conn;
    let api = Api::new(conn)?;
    let limit = args.limit.map(|l| l.to_string());
    let mut query: Vec<(&str, &str)> = Vec::new();
    if let Some(j) = &args.job {
        query.push(("job", j));
    }
    if let Some(s) = &args.status {
        query.push(("status", s));
    }
    if let Some(l) = &limit {
        query.push(("limit", l));
    }
    let resp = api.call(Method::GET, "/api/v1/runs", &query, None).await?;
    let mut empty = String::from("no runs");
    if let Some(j) = &args.job {
        empty += &format!(" of job {j}");
    }
    if let Some(s) = &args.status {
        empty += &format!(" with status {s}");
    }
    let now = now_ms();
    output::list(
        conn.json,
        &resp,
        output::items(&resp, "runs"),
        Some(&empty),
        &[
            "ID", "JOB", "STATUS", "ATTEMPT", "EXIT", "STARTED", "DURATION", "MACHINE",
        ],
        |r| run_row(r, now),
    )
}

async fn cancel(id: &str, wait: bool, conn: &ConnArgs) -> Result<()> {
    let api = Api::new(conn)?;
    let resp = api
        .post(&format!("{}/cancel", run_path(id)), &json!({}))
        .await?;
    let run = resp.get("run").cloned().unwrap_or(Value::Null);
    if !wait {
        if conn.json {
            return output::json(&resp);
        }
        let status = status_of(&run);
        let msg = if is_terminal(&status) {
            format!("run {id} {}\n", ended_words(&run))
        } else {
            format!("run {id}: cancel requested (it was {status}); `pubrun runs show {id}` tells when it has stopped\n")
        };
        return output::out(&msg);
    }
    let mut run = run;
    while !is_terminal(&status_of(&run)) {
        tokio::time::sleep(POLL).await;
        let resp = api.get(&run_path(id)).await?;
        run = resp.get("run").cloned().unwrap_or(Value::Null);
    }
    if conn.json {
        return output::json(&json!({ "run": run }));
    }
    output::out(&format!("run {id} {}\n", ended_words(&run)))
}

pub async fn logs(args: LogsArgs) -> Result<()> {
    let conn = &args.conn;
    let id = &args.id;
    let api = Api::new(conn)?;
    let path = format!("{}/log", run_path(id));
    let mut offset: u64 = 0;
    // JSON mode prints text: an incomplete UTF-8 sequence at the end of a
    // chunk waits for the rest.
    let mut pending: Vec<u8> = Vec::new();
    let mut unreachable_since: Option<Instant> = None;
    let mut ends_in_newline = true;
    loop {
        let off = offset.to_string();
        let result = api
            .call_raw(Method::GET, &path, &[("offset", &off)], None)
            .await;
        let (headers, body) = match result {
            Ok(r) => {
                unreachable_since = None;
                r
            }
            Err(e) if args.follow && e.downcast_ref::<TransportError>().is_some() => {
                let since = *unreachable_since.get_or_insert_with(|| {
                    eprintln!("{e:#}; retrying for up to {}s", RECONNECT_FOR.as_secs());
                    Instant::now()
                });
                if since.elapsed() >= RECONNECT_FOR {
                    return Err(e.context(format!(
                        "stopped following run {id}: the server did not answer for {}s",
                        RECONNECT_FOR.as_secs()
                    )));
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let status = match headers
            .get("x-pubrun-run-status")
            .and_then(|v| v.to_str().ok())
        {
            Some(s) => s.to_string(),
            None => {
                // A server without the header: ask for the run.
                let resp = api.get(&run_path(id)).await?;
                status_of(resp.get("run").unwrap_or(&Value::Null))
            }
        };
        let size = headers
            .get("x-pubrun-log-size")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let chunk_at = offset;
        offset += body.len() as u64;
        // The server sends logs in chunks: without --follow, read up to the
        // size it reported; with it, until the run ended and nothing is left.
        let done = if args.follow {
            is_terminal(&status) && body.is_empty()
        } else {
            body.is_empty() || size.is_none_or(|s| offset >= s)
        };

        if conn.json {
            pending.extend_from_slice(&body);
            let text = take_utf8(&mut pending, done);
            if !args.follow || !text.is_empty() || done {
                let obj = json!({
                    "run": id_value(id),
                    "status": status,
                    "offset": chunk_at,
                    "size": size.unwrap_or(offset),
                    "log": text,
                });
                let line = if args.follow {
                    format!("{}\n", serde_json::to_string(&obj)?)
                } else {
                    format!("{}\n", serde_json::to_string_pretty(&obj)?)
                };
                if !output::out_bytes(line.as_bytes())? {
                    return Ok(());
                }
            }
        } else if !body.is_empty() {
            ends_in_newline = body.last() == Some(&b'\n');
            if !output::out_bytes(&body)? {
                // The reader went away (`pubrun logs 7 -f | head`).
                return Ok(());
            }
        }

        if done {
            if !conn.json {
                // The prompt (or the next tool) starts on its own line.
                if args.follow && !ends_in_newline && offset > 0 {
                    output::out_bytes(b"\n")?;
                }
                if offset == 0 && is_terminal(&status) && status != "succeeded" {
                    // Nothing ran (a template, an input or a machine failed
                    // first): the reason is the whole story.
                    let how = ended(&api, id, "reading why the run ended").await?;
                    eprintln!("(run {id} left no log: it {how})");
                    return Ok(());
                }
                if !args.follow && !is_terminal(&status) {
                    eprintln!("(run {id} is {status}; `pubrun logs {id} --follow` prints the rest as it comes)");
                } else if args.follow {
                    let how = ended(&api, id, "reading the run's final state").await?;
                    eprintln!("run {id} {how}");
                }
            }
            return Ok(());
        }
        // More may be waiting right away when the server sent a big chunk.
        if body.len() < 256 * 1024 {
            tokio::time::sleep(POLL).await;
        }
    }
}

/// The longest valid UTF-8 prefix of `buf` as text (removed from `buf`); the
/// rest stays unless `flush`, when invalid bytes become U+FFFD.
fn take_utf8(buf: &mut Vec<u8>, flush: bool) -> String {
    if flush {
        let s = String::from_utf8_lossy(buf).into_owned();
        buf.clear();
        return s;
    }
    let mut out = String::new();
    loop {
        match std::str::from_utf8(buf) {
            Ok(s) => {
                out.push_str(s);
                buf.clear();
                return out;
            }
            Err(e) => {
                let valid = e.valid_up_to();
                out.push_str(std::str::from_utf8(&buf[..valid]).expect("valid prefix"));
                match e.error_len() {
                    // Incomplete sequence at the end: wait for more bytes.
                    None => {
                        buf.drain(..valid);
                        return out;
                    }
                    Some(n) => {
                        out.push('\u{FFFD}');
                        buf.drain(..valid + n);
                    }
                }
            }
        }
    }
}

fn run_path(id: &str) -> String {
    format!("/api/v1/runs/{}", names::segment(id.trim()))
}

/// The run id as a JSON number when it is one.
fn id_value(id: &str) -> Value {
    id.trim()
        .parse::<i64>()
        .map_or_else(|_| json!(id), |n| json!(n))
}

use super::output::now_ms;

fn status_of(run: &Value) -> String {
    run.get("status")
        .and_then(Value::as_str)
        .unwrap_or("unknown")
        .to_string()
}

fn is_terminal(status: &str) -> bool {
    matches!(status, "succeeded" | "failed" | "timed_out" | "cancelled")
}

fn ms(run: &Value, key: &str) -> Option<i64> {
    run.get(key).and_then(Value::as_i64)
}

/// One row of `pubrun runs`.
fn run_row(r: &Value, now: i64) -> Vec<String> {
    let started = ms(r, "started_at_ms");
    let ended = ms(r, "ended_at_ms");
    let duration = match (started, ended) {
        (Some(s), Some(e)) => output::duration_ms(e - s),
        (Some(s), None) if !is_terminal(&status_of(r)) => output::duration_ms(now - s),
        _ => "-".into(),
    };
    vec![
        r.get("id")
            .map(output::display)
            .unwrap_or_else(|| "?".into()),
        r.get("job")
            .map(output::display)
            .unwrap_or_else(|| "?".into()),
        match r.get("waiting_for_machine").and_then(Value::as_str) {
            Some(_) => "waiting-for-machine".to_string(),
            None => status_of(r),
        },
        attempt(r),
        exit_short(r),
        started.map_or_else(|| "-".into(), |t| output::rfc3339_ms(t, false)),
        duration,
        r.get("machine")
            .and_then(Value::as_str)
            .filter(|m| !m.is_empty())
            .unwrap_or("-")
            .to_string(),
    ]
}

fn attempt(r: &Value) -> String {
    let a = r
        .get("attempt")
        .map(output::display)
        .unwrap_or_else(|| "?".into());
    match r.get("max_attempts") {
        Some(m) if !m.is_null() => format!("{a}/{}", output::display(m)),
        _ => a,
    }
}

/// The EXIT column: the code, else how it was killed, else `-`.
fn exit_short(r: &Value) -> String {
    let Some(exit) = r.get("exit").filter(|e| e.is_object()) else {
        return "-".into();
    };
    if let Some(c) = exit.get("exit_code").and_then(Value::as_i64) {
        return c.to_string();
    }
    if exit.get("oom_killed").and_then(Value::as_bool) == Some(true) {
        return "oom".into();
    }
    if let Some(s) = exit.get("signal").and_then(Value::as_i64) {
        return signal_name(s);
    }
    if exit.get("error").is_some_and(|e| !e.is_null()) {
        return "error".into();
    }
    "-".into()
}

fn signal_name(sig: i64) -> String {
    let name = match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        6 => "SIGABRT",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        _ => return format!("signal {sig}"),
    };
    name.to_string()
}

/// How run `id` ended, in words, as the server has it now (`what` says
/// what the read was for when it fails).
async fn ended(api: &Api, id: &str, what: &'static str) -> Result<String> {
    let resp = api.get(&run_path(id)).await.context(what)?;
    Ok(ended_words(resp.get("run").unwrap_or(&Value::Null)))
}

/// "succeeded (exit code 0)", "failed: exit code 3", "was cancelled", … for
/// a run that ended; "is running" otherwise.
fn ended_words(run: &Value) -> String {
    let status = status_of(run);
    let detail = exit_detail(run);
    match status.as_str() {
        "succeeded" => "succeeded".to_string(),
        "cancelled" => match detail {
            Some(d) => format!("was cancelled ({d})"),
            None => "was cancelled".to_string(),
        },
        "timed_out" => match detail {
            Some(d) => format!("timed out ({d})"),
            None => "timed out".to_string(),
        },
        "failed" => match detail {
            Some(d) => format!("failed: {d}"),
            None => "failed".to_string(),
        },
        other => format!("is {other}"),
    }
}

/// How the last attempt ended, in words, e.g. "exit code 3",
/// "killed by SIGKILL", "out of memory", plus the error if any.
fn exit_detail(run: &Value) -> Option<String> {
    let exit = run.get("exit").filter(|e| e.is_object())?;
    let mut parts = Vec::new();
    if let Some(c) = exit.get("exit_code").and_then(Value::as_i64) {
        parts.push(format!("exit code {c}"));
    }
    if let Some(s) = exit.get("signal").and_then(Value::as_i64) {
        parts.push(format!("killed by {}", signal_name(s)));
    }
    if exit.get("oom_killed").and_then(Value::as_bool) == Some(true) {
        parts.push("out of memory".into());
    }
    if let Some(e) = exit
        .get("error")
        .and_then(Value::as_str)
        .filter(|e| !e.is_empty())
    {
        parts.push(e.to_string());
    }
    (!parts.is_empty()).then(|| parts.join(", "))
}

fn yes(v: &Value, key: &str) -> bool {
    v.get(key).and_then(Value::as_bool) == Some(true)
}

/// Everything about one run as a block.
pub fn render_run(r: &Value, now: i64) -> String {
    let status = status_of(r);
    let mut rows: Vec<(&str, String)> = Vec::new();
    rows.push((
        "run",
        r.get("id")
            .map(output::display)
            .unwrap_or_else(|| "?".into()),
    ));
    rows.push((
        "job",
        r.get("job")
            .map(output::display)
            .unwrap_or_else(|| "?".into()),
    ));
    let mut status_text = status.clone();
    if status == "queued" {
        if let Some(nb) = ms(r, "not_before_ms").filter(|&nb| nb > now) {
            status_text += &format!(" (next attempt in {})", output::duration_ms(nb - now));
        }
    }
    if let Some(pool) = r.get("waiting_for_machine").and_then(Value::as_str) {
        status_text = format!("waiting for a machine in pool {pool}");
    }
    if yes(r, "cancel_requested") && !is_terminal(&status) {
        status_text += " (cancel requested)";
    }
    rows.push(("status", status_text));
    rows.push(("attempt", attempt(r).replace('/', " of ")));

    if let Some(exit) = r.get("exit").filter(|e| e.is_object()) {
        let label = if is_terminal(&status) {
            ""
        } else {
            "last attempt "
        };
        let code = exit
            .get("exit_code")
            .and_then(Value::as_i64)
            .map_or_else(|| "-".into(), |c| c.to_string());
        rows.push((
            if label.is_empty() {
                "exit code"
            } else {
                "last exit code"
            },
            code,
        ));
        if let Some(s) = exit.get("signal").and_then(Value::as_i64) {
            rows.push(("signal", format!("{s} ({})", signal_name(s))));
        }
        let mut flags = Vec::new();
        if yes(exit, "oom_killed") {
            flags.push("killed: out of memory");
        }
        if yes(exit, "timed_out") {
            flags.push("timed out");
        }
        if yes(exit, "cancelled") {
            flags.push("cancelled");
        }
        if yes(exit, "infra_error") {
            flags.push("infrastructure error (retried without using an attempt)");
        }
        if !flags.is_empty() {
            rows.push(("end reason", flags.join(", ")));
        }
        if let Some(e) = exit
            .get("error")
            .and_then(Value::as_str)
            .filter(|e| !e.is_empty())
        {
            rows.push(("error", e.to_string()));
        }
    } else {
        rows.push(("exit code", "-".into()));
    }

    let msg = r.get("message").unwrap_or(&Value::Null);
    let get = |k: &str| {
        msg.get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    rows.push(("message id", get("id").unwrap_or_else(|| "-".into())));
    rows.push((
        "published",
        get("publish_time").unwrap_or_else(|| "-".into()),
    ));
    rows.push((
        "attributes",
        output::map_pairs(msg.get("attributes").unwrap_or(&Value::Null)),
    ));
    if let Some(k) = get("ordering_key") {
        rows.push(("ordering key", k));
    }
    if let Some(k) = r
        .get("dedup_key")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
    {
        rows.push(("dedup key", k.to_string()));
    }

    let created = ms(r, "created_at_ms");
    let started = ms(r, "started_at_ms");
    let ended = ms(r, "ended_at_ms");
    let time = |t: Option<i64>| t.map_or_else(|| "-".into(), |t| output::rfc3339_ms(t, true));
    rows.push(("created", time(created)));
    rows.push(("started", time(started)));
    rows.push(("ended", time(ended)));
    if let (Some(c), Some(s)) = (created, started) {
        rows.push(("waited", output::duration_ms(s - c)));
    }
    match (started, ended) {
        (Some(s), Some(e)) => rows.push(("duration", output::duration_ms(e - s))),
        (Some(s), None) if !is_terminal(&status) => rows.push((
            "duration",
            format!("{} so far", output::duration_ms(now - s)),
        )),
        _ => {}
    }
    let machine = r
        .get("machine")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty());
    rows.push(("machine", machine.unwrap_or("-").to_string()));
    if let Some(h) = r
        .get("handle")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
    {
        rows.push(("handle", h.to_string()));
    }
    if is_terminal(&status) && r.get("result_published").and_then(Value::as_bool) == Some(false) {
        rows.push(("result", "not yet published to the result topic".into()));
    }
    output::block(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Value {
        json!({
            "id": 7, "job": "echo", "status": "failed", "attempt": 2, "max_attempts": 3,
            "message": {"id": "42", "attributes": {"who": "world"}, "publish_time": "2024-05-01T12:00:00.000000000Z", "ordering_key": ""},
            "dedup_key": "42",
            "exit": {"exit_code": 3, "signal": null, "oom_killed": false, "timed_out": false, "cancelled": false, "error": null, "infra_error": false},
            "created_at_ms": 1_714_564_800_000i64, "started_at_ms": 1_714_564_801_000i64, "ended_at_ms": 1_714_564_803_500i64,
            "not_before_ms": 0, "machine": "local", "handle": "pid 99", "cancel_requested": false, "result_published": true
        })
    }

    #[test]
    fn row_and_block() {
        let r = sample();
        assert_eq!(
            run_row(&r, 0),
            [
                "7",
                "echo",
                "failed",
                "2/3",
                "3",
                "2024-05-01T12:00:01Z",
                "2.5s",
                "local"
            ]
        );
        let b = render_run(&r, 0);
        assert!(b.contains("exit code:  3\n"), "{b}");
        assert!(b.contains("attempt:    2 of 3\n"), "{b}");
        assert!(b.contains("message id: 42\n"), "{b}");
        assert!(b.contains("attributes: who=world\n"), "{b}");
        assert!(b.contains("started:    2024-05-01T12:00:01.000Z\n"), "{b}");
        assert!(b.contains("duration:   2.5s\n"), "{b}");
        assert_eq!(ended_words(&r), "failed: exit code 3");
    }

    #[test]
    fn killed_and_errors() {
        let mut r = sample();
        r["status"] = json!("cancelled");
        r["exit"] = json!({"exit_code": null, "signal": 15, "cancelled": true, "error": null});
        assert_eq!(exit_short(&r), "SIGTERM");
        assert_eq!(ended_words(&r), "was cancelled (killed by SIGTERM)");
        let b = render_run(&r, 0);
        assert!(b.contains("signal:     15 (SIGTERM)\n"), "{b}");
        assert!(b.contains("end reason: cancelled\n"), "{b}");
        assert!(b.contains("ended:      2024-05-01T12:00:03.500Z\n"), "{b}");
        r["exit"] = Value::Null;
        r["status"] = json!("running");
        r["ended_at_ms"] = Value::Null;
        assert_eq!(run_row(&r, 1_714_564_812_000)[6], "11s");
    }

    #[test]
    fn utf8_split_across_chunks() {
        let mut buf = "hé".as_bytes()[..2].to_vec();
        assert_eq!(take_utf8(&mut buf, false), "h");
        buf.extend_from_slice(&"é!".as_bytes()[1..]);
        assert_eq!(take_utf8(&mut buf, false), "é!");
        let mut bad = vec![b'a', 0xff, b'b'];
        assert_eq!(take_utf8(&mut bad, false), "a\u{FFFD}b");
    }
}
