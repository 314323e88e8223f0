//! The dispatcher end to end on real parts: embedded store + broker, the
//! SQLite run store and the process executor running real `sh` commands.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use pubrun_core::run::RunStatus;
use pubrun_core::{Code, OutgoingMessage, TopicName};
use pubrun_jobs::dispatcher::now_ms;
use pubrun_jobs::{Enqueued, RunStoreEngine as _, SourceMessage};
use pubrun_store::runs::RunPage;

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// Publishes `n` messages in one batch (so the intake sees them together).
async fn publish_many(env: &Env, topic: &str, n: usize) -> Vec<String> {
    let msgs = (0..n)
        .map(|i| OutgoingMessage {
            data: format!("{i}").into_bytes().into(),
            ..Default::default()
        })
        .collect();
    env.broker
        .publish(&TopicName::parse(&topic_name(topic)).unwrap(), msgs)
        .await
        .unwrap()
}

/// Most `start` lines not yet matched by an `end` line: the peak number of
/// commands running at once (lines are appended in causal order).
fn peak_overlap(file: &Path) -> (usize, usize) {
    let text = std::fs::read_to_string(file).unwrap();
    let (mut now, mut peak, mut starts) = (0i64, 0i64, 0usize);
    for line in text.lines() {
        match line.trim() {
            "start" => {
                now += 1;
                starts += 1;
                peak = peak.max(now);
            }
            "end" => now -= 1,
            other => panic!("unexpected line {other:?} in {}", file.display()),
        }
    }
    (peak as usize, starts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_job_runs_end_to_end_with_templated_parameters() {
    let dir = tempdir();
    let env = env_in(dir.path(), 8).await;
    env.job(
        r#"name = "echo-job"
topic = "work-in"
process = { command = "sh", args = ["-c", 'echo "X is $X"; echo "$X" > out.txt; echo "arg $0"', "{{ message_id }}"], env = { X = "{{ attributes.k }}-{{ data.n }}" } }
"#,
        "work-in",
    )
    .await;
    let before = now_ms();
    let msg_id = env
        .publish("work-in", &[("k", "hello")], r#"{"n": 42}"#)
        .await;
    let run = env.first_run_end("echo-job").await;
    let log = env.log(run.id);
    assert_eq!(run.status, RunStatus::Succeeded, "{run:#?}\n{log}");
    let exit = run.exit.clone().unwrap();
    assert_eq!(exit.exit_code, Some(0));
    assert_eq!(exit.error, None);
    assert_eq!(run.attempt, 1);
    let started = run.started_at_ms.expect("started_at set");
    let ended = run.ended_at_ms.expect("ended_at set");
    assert!(started >= before && ended >= started, "{run:#?}");
    assert!(!run.machine.is_empty(), "machine set: {run:#?}");
    assert_eq!(run.message.id, msg_id);
    assert_eq!(
        run.message.attributes.get("k").map(String::as_str),
        Some("hello")
    );
    assert!(
        log.contains("X is hello-42"),
        "env templated from attributes and JSON data:\n{log}"
    );
    assert!(
        log.contains(&format!("arg {msg_id}")),
        "args templated:\n{log}"
    );
    let out = std::fs::read_to_string(
        dir.path()
            .join("runs")
            .join(run.id.to_string())
            .join("work")
            .join("out.txt"),
    )
    .unwrap();
    assert_eq!(
        out, "hello-42\n",
        "the command runs in its per-run directory"
    );
    env.wait_acked("echo-job").await;
    assert_eq!(env.runs("echo-job").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_and_retries() {
    let dir = tempdir();
    let env = env_in(dir.path(), 8).await;
    env.topic("codes").await;
    for (name, cmd, retries) in [
        ("exit-three", "exit 3", "max_attempts = 1"),
        (
            "always-fails",
            "exit 3",
            r#"max_attempts = 3, initial_backoff = "100ms", max_backoff = "200ms""#,
        ),
        (
            "second-time",
            r#"echo "attempt $PUBRUN_ATTEMPT"; [ "$PUBRUN_ATTEMPT" -ge 2 ]"#,
            r#"max_attempts = 3, initial_backoff = "100ms""#,
        ),
    ] {
        let spec = job(
            &format!("name = \"{name}\"\ntopic = \"codes\"\nprocess = {{ command = \"sh\", args = [\"-c\", {}] }}\nretries = {{ {retries} }}\n", toml_str(cmd)),
            &["codes"],
        );
        env.dispatcher.put_job(spec).await.unwrap();
    }
    env.publish("codes", &[], "x").await;

    let once = env.first_run_end("exit-three").await;
    assert_eq!(once.status, RunStatus::Failed);
    assert_eq!(once.exit.as_ref().unwrap().exit_code, Some(3));
    assert_eq!(once.attempt, 1);

    let thrice = env.first_run_end("always-fails").await;
    let log = env.log(thrice.id);
    assert_eq!(thrice.status, RunStatus::Failed, "{log}");
    assert_eq!(thrice.attempt, 3, "{log}");
    assert_eq!(thrice.exit.as_ref().unwrap().exit_code, Some(3));
    for a in 1..=3 {
        assert!(log.contains(&format!("attempt {a} of 3 starting")), "{log}");
    }
    assert!(!log.contains("attempt 4"), "{log}");
    assert_eq!(env.runs("always-fails").len(), 1, "retries keep the run id");

    let second = env.first_run_end("second-time").await;
    let log = env.log(second.id);
    assert_eq!(second.status, RunStatus::Succeeded, "{log}");
    assert_eq!(second.attempt, 2, "{log}");
    assert!(
        log.contains("attempt 1\n") && log.contains("attempt 2\n"),
        "{log}"
    );
}

fn toml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap() // a JSON string is a TOML basic string
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_stops_the_process_promptly() {
    let dir = tempdir();
    let env = env_in(dir.path(), 8).await;
    env.job(
        "name = \"sleepy\"\ntopic = \"slow\"\nprocess = { command = \"sleep\", args = [\"60\"] }\ntimeout = \"1s\"\ngrace_period = \"1s\"\n",
        "slow",
    )
    .await;
    let t0 = Instant::now();
    env.publish("slow", &[], "").await;
    let run = env.first_run_end("sleepy").await;
    let took = t0.elapsed();
    assert_eq!(
        run.status,
        RunStatus::TimedOut,
        "{run:#?}\n{}",
        env.log(run.id)
    );
    assert!(run.exit.as_ref().unwrap().timed_out());
    assert!(
        took < Duration::from_secs(20),
        "a 1 s timeout took {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_concurrency_is_never_exceeded() {
    let dir = tempdir();
    let env = env_in(dir.path(), 16).await;
    let trace = dir.path().join("trace");
    env.job(
        &format!(
            "name = \"pairs\"\ntopic = \"many\"\nconcurrency = 2\nprocess = {{ command = \"sh\", args = [\"-c\", 'echo start >> \"$F\"; sleep 0.5; echo end >> \"$F\"'], env = {{ F = {} }} }}\n",
            toml_str(trace.to_str().unwrap())
        ),
        "many",
    )
    .await;
    publish_many(&env, "many", 6).await;
    let runs = env.wait_runs("pairs", 6).await;
    for r in &runs {
        assert_eq!(env.wait_end(r.id).await.status, RunStatus::Succeeded);
    }
    let (peak, starts) = peak_overlap(&trace);
    assert_eq!(starts, 6);
    assert_eq!(peak, 2, "concurrency = 2 must allow exactly 2 at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_slots_are_never_exceeded() {
    let dir = tempdir();
    let env = env_in(dir.path(), 2).await;
    let trace = dir.path().join("trace");
    env.topic("shared").await;
    for name in ["left", "right"] {
        let spec = job(
            &format!(
                "name = \"{name}\"\ntopic = \"shared\"\nconcurrency = 4\nprocess = {{ command = \"sh\", args = [\"-c\", 'echo start >> \"$F\"; sleep 0.5; echo end >> \"$F\"'], env = {{ F = {} }} }}\n",
                toml_str(trace.to_str().unwrap())
            ),
            &["shared"],
        );
        env.dispatcher.put_job(spec).await.unwrap();
    }
    publish_many(&env, "shared", 3).await;
    for name in ["left", "right"] {
        for r in env.wait_runs(name, 3).await {
            assert_eq!(env.wait_end(r.id).await.status, RunStatus::Succeeded);
        }
    }
    let (peak, starts) = peak_overlap(&trace);
    assert_eq!(starts, 6);
    assert_eq!(peak, 2, "2 global slots must allow exactly 2 runs at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedup_key_makes_one_run_per_key() {
    let dir = tempdir();
    let env = env_in(dir.path(), 8).await;
    env.job(
        "name = \"daily\"\ntopic = \"days\"\ndedup_key = \"{{ attributes.day }}\"\nprocess = { command = \"true\" }\n",
        "days",
    )
    .await;
    env.publish("days", &[("day", "2026-01-01")], "a").await;
    env.publish("days", &[("day", "2026-01-01")], "b").await;
    env.wait_acked("daily").await;
    let runs = env.runs("daily");
    assert_eq!(runs.len(), 1, "{runs:#?}");
    assert_eq!(runs[0].dedup_key, "2026-01-01");
    assert_eq!(runs[0].message.data, b"a");
    env.publish("days", &[("day", "2026-01-02")], "c").await;
    env.wait_acked("daily").await;
    let runs = env.runs("daily");
    assert_eq!(runs.len(), 2, "{runs:#?}");
    assert_eq!(runs[1].dedup_key, "2026-01-02");
    for r in runs {
        assert_eq!(env.wait_end(r.id).await.status, RunStatus::Succeeded);
    }
}

/// PostgreSQL text cannot hold NUL, an object name can: a key rendered
/// from one is stored (by every engine) with NUL as U+FFFD.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dedup_key_never_holds_nul() {
    let dir = tempdir();
    let env = env_in(dir.path(), 8).await;
    env.job(
        "name = \"obj\"\ntopic = \"objs\"\ndedup_key = \"{{ attributes.objectId }}\"\nprocess = { command = \"true\" }\n",
        "objs",
    )
    .await;
    env.publish("objs", &[("objectId", "nul\0byte")], "a").await;
    env.wait_acked("obj").await;
    let runs = env.runs("obj");
    assert_eq!(runs.len(), 1, "{runs:#?}");
    assert_eq!(runs[0].dedup_key, "nul\u{FFFD}byte");
}

/// The dashboard's keyset paging: newest first, `before` continues below
/// the last id shown, filters apply, and runs queued meanwhile do not shift
/// the pages.
#[tokio::test]
async fn run_store_pages_newest_first() {
    let dir = tempdir();
    let store = pubrun_jobs::RunStore::open(&dir.path().join("runs.db")).unwrap();
    let a = job(
        "name = \"page-a\"\ntopic = \"t-pa\"\nprocess = { command = \"true\" }\n",
        &["t-pa"],
    );
    let b = job(
        "name = \"page-b\"\ntopic = \"t-pb\"\nprocess = { command = \"true\" }\n",
        &["t-pb"],
    );
    let mut ids_a = Vec::new();
    for i in 0..7 {
        let msg = SourceMessage {
            id: i.to_string(),
            data: b"x".to_vec(),
            ..Default::default()
        };
        let spec = if i % 3 == 2 { &b } else { &a };
        let Enqueued::New(id) = store
            .enqueue(spec, &msg, &i.to_string(), 1_000 + i)
            .await
            .unwrap()
        else {
            panic!("new run")
        };
        if spec.name == "page-a" {
            ids_a.push(id);
        }
    }
    ids_a.reverse();
    let page_a = |before, limit| RunPage {
        job: Some("page-a".to_string()),
        before,
        limit,
        ..RunPage::default()
    };
    let page1 = store.list_before(&page_a(None, 3)).unwrap();
    let got: Vec<i64> = page1.iter().map(|r| r.id).collect();
    assert_eq!(got, ids_a[..3]);
    // A new run arrives between the pages: page 2 is unchanged by it.
    let msg = SourceMessage {
        id: "late".into(),
        data: b"x".to_vec(),
        ..Default::default()
    };
    store.enqueue(&a, &msg, "late", 2_000).await.unwrap();
    let page2 = store
        .list_before(&page_a(Some(*got.last().unwrap()), 3))
        .unwrap();
    let got2: Vec<i64> = page2.iter().map(|r| r.id).collect();
    assert_eq!(got2, ids_a[3..]);
    assert!(store
        .list_before(&RunPage {
            status: Some(RunStatus::Succeeded),
            ..page_a(None, 10)
        })
        .unwrap()
        .is_empty());
    let everything = RunPage {
        limit: 100,
        ..RunPage::default()
    };
    assert_eq!(store.list_before(&everything).unwrap().len(), 8);
}

#[tokio::test]
async fn run_store_dedup_window() {
    let dir = tempdir();
    let store = pubrun_jobs::RunStore::open(&dir.path().join("runs.db")).unwrap();
    let spec = job("name = \"dedup-job\"\ntopic = \"t-dd\"\ndedup_window = \"10s\"\nprocess = { command = \"true\" }\n", &["t-dd"]);
    let msg = SourceMessage {
        id: "7".into(),
        data: b"x".to_vec(),
        ..Default::default()
    };
    let t = 1_000_000;
    // The same message delivered twice (ack lost, redelivered): one run.
    let Enqueued::New(id) = store.enqueue(&spec, &msg, "7", t).await.unwrap() else {
        panic!("first is new")
    };
    assert_eq!(
        store.enqueue(&spec, &msg, "7", t + 5).await.unwrap(),
        Enqueued::Duplicate(id)
    );
    assert_eq!(
        store.enqueue(&spec, &msg, "7", t + 9_999).await.unwrap(),
        Enqueued::Duplicate(id)
    );
    // Another job may use the same key.
    let mut other = spec.clone();
    other.name = "dedup-other".into();
    assert!(matches!(
        store.enqueue(&other, &msg, "7", t).await.unwrap(),
        Enqueued::New(_)
    ));
    // After the window the key is free again, with or without pruning.
    let Enqueued::New(id2) = store.enqueue(&spec, &msg, "7", t + 10_000).await.unwrap() else {
        panic!("window passed")
    };
    assert_ne!(id, id2);
    assert_eq!(
        store.enqueue(&spec, &msg, "7", t + 10_001).await.unwrap(),
        Enqueued::Duplicate(id2)
    );
    assert_eq!(store.prune_dedup(t + 20_000).unwrap(), 2);
    assert!(matches!(
        store.enqueue(&spec, &msg, "7", t + 20_001).await.unwrap(),
        Enqueued::New(_)
    ));
    assert_eq!(
        store
            .list_before(&RunPage {
                job: Some("dedup-job".to_string()),
                limit: 100,
                ..RunPage::default()
            })
            .unwrap()
            .len(),
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_running_queued_and_finished_runs() {
    let dir = tempdir();
    let env = env_in(dir.path(), 8).await;
    env.job(
        "name = \"sleeper\"\ntopic = \"naps\"\nconcurrency = 1\ngrace_period = \"1s\"\nprocess = { command = \"sh\", args = [\"-c\", 'echo started; exec sleep 60'] }\n",
        "naps",
    )
    .await;
    env.publish("naps", &[], "first").await;
    env.publish("naps", &[], "second").await;
    let runs = env.wait_runs("sleeper", 2).await;
    let (first, second) = (runs[0].id, runs[1].id);
    env.wait_status(first, RunStatus::Running).await;
    assert_eq!(
        env.store.get(second).unwrap().status,
        RunStatus::Queued,
        "concurrency 1 holds the second back"
    );

    // A queued run ends at once and never starts.
    let c = env.dispatcher.cancel(second).unwrap();
    assert_eq!(c.status, RunStatus::Cancelled);

    let t0 = Instant::now();
    env.dispatcher.cancel(first).unwrap();
    let first_run = env.wait_end(first).await;
    assert_eq!(first_run.status, RunStatus::Cancelled, "{}", env.log(first));
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "cancel took {:?}",
        t0.elapsed()
    );
    assert!(first_run.exit.as_ref().unwrap().cancelled());

    // The slot is free now; the cancelled second run must still not start.
    env.publish("naps", &[], "third").await;
    let third = env.wait_runs("sleeper", 3).await[2].id;
    env.wait_status(third, RunStatus::Running).await;
    let second_run = env.store.get(second).unwrap();
    assert_eq!(second_run.status, RunStatus::Cancelled);
    assert_eq!(second_run.started_at_ms, None, "{second_run:#?}");
    assert!(second_run.machine.is_empty(), "{second_run:#?}");
    assert!(
        !env.dispatcher.log_path(second).exists(),
        "a cancelled queued run has no log: {}",
        env.log(second)
    );
    env.dispatcher.cancel(third).unwrap();
    env.wait_end(third).await;

    // An ended run cannot be cancelled.
    let e = env.dispatcher.cancel(first).unwrap_err();
    assert_eq!(e.code, Code::FailedPrecondition, "{e:?}");
    let e = env.dispatcher.cancel(999_999).unwrap_err();
    assert_eq!(e.code, Code::NotFound, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_ends_are_published_to_the_result_topic() {
    let dir = tempdir();
    let env = env_in(dir.path(), 8).await;
    env.topic("results").await;
    let results = env.subscription("results-watch", "results").await;
    env.topic("jobs-in").await;
    let spec = job(
        r#"name = "reporter"
topic = "jobs-in"
result_topic = "results"
retries = { max_attempts = 2, initial_backoff = "100ms" }
process = { command = "sh", args = ["-c", 'echo "output for $MODE"; [ "$MODE" = good ] || exit 5'], env = { MODE = "{{ attributes.mode }}" } }
"#,
        &["jobs-in", "results"],
    );
    env.dispatcher.put_job(spec).await.unwrap();
    let good_id = env.publish("jobs-in", &[("mode", "good")], "").await;
    let bad_id = env.publish("jobs-in", &[("mode", "bad")], "").await;
    let runs = env.wait_runs("reporter", 2).await;
    let mut ended = Vec::new();
    for r in &runs {
        ended.push(env.wait_end(r.id).await);
    }
    // Every result is published once its flag is set; then count exactly.
    for r in &runs {
        env.wait_run(r.id, "result published", |r| r.result_published)
            .await;
    }
    assert_eq!(
        env.broker.backlog(&results).unwrap(),
        2,
        "one result per run end"
    );
    let got = env.broker.pull(&results, 10, Some(WAIT)).await.unwrap();
    assert_eq!(got.len(), 2);
    for d in &got {
        let a = &d.message.attributes;
        let run = ended
            .iter()
            .find(|r| r.id.to_string() == a["run_id"])
            .expect("run_id names a run");
        assert_eq!(a["job"], "reporter");
        assert_eq!(a["status"], run.status.as_str());
        assert_eq!(a["attempt"], run.attempt.to_string());
        let data: serde_json::Value = serde_json::from_slice(&d.message.data).unwrap();
        assert_eq!(data["status"], run.status.as_str());
        if a["source_message_id"] == good_id {
            assert_eq!(a["status"], "succeeded");
            assert_eq!(a["exit_code"], "0");
            assert_eq!(a["attempt"], "1");
            assert_eq!(data["exit_code"], 0);
            assert!(
                data["log_tail"]
                    .as_str()
                    .unwrap()
                    .contains("output for good"),
                "{data}"
            );
        } else {
            assert_eq!(a["source_message_id"], bad_id);
            assert_eq!(a["status"], "failed");
            assert_eq!(a["exit_code"], "5");
            assert_eq!(a["attempt"], "2");
            assert_eq!(data["exit_code"], 5);
            assert!(
                data["log_tail"]
                    .as_str()
                    .unwrap()
                    .contains("output for bad"),
                "{data}"
            );
        }
    }
    let acks: Vec<String> = got.iter().map(|d| d.ack_id.clone()).collect();
    env.broker.acknowledge(&results, &acks).await.unwrap();
    assert_eq!(
        env.broker.backlog(&results).unwrap(),
        0,
        "no duplicate results"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_queued_run_publishes_a_result() {
    let dir = tempdir();
    let env = env_in(dir.path(), 8).await;
    env.topic("res2").await;
    let results = env.subscription("res2-watch", "res2").await;
    env.topic("in2").await;
    let spec = job(
        "name = \"holder\"\ntopic = \"in2\"\nresult_topic = \"res2\"\nconcurrency = 1\ngrace_period = \"1s\"\nprocess = { command = \"sleep\", args = [\"60\"] }\n",
        &["in2", "res2"],
    );
    env.dispatcher.put_job(spec).await.unwrap();
    env.publish("in2", &[], "").await;
    env.publish("in2", &[], "").await;
    let runs = env.wait_runs("holder", 2).await;
    env.wait_status(runs[0].id, RunStatus::Running).await;
    env.dispatcher.cancel(runs[1].id).unwrap();
    env.dispatcher.cancel(runs[0].id).unwrap();
    for r in &runs {
        env.wait_run(r.id, "result published", |r| {
            r.status == RunStatus::Cancelled && r.result_published
        })
        .await;
    }
    let got = env.broker.pull(&results, 10, Some(WAIT)).await.unwrap();
    let mut statuses: Vec<_> = got
        .iter()
        .map(|d| {
            (
                d.message.attributes["run_id"].clone(),
                d.message.attributes["status"].clone(),
            )
        })
        .collect();
    statuses.sort();
    let mut want = vec![
        (runs[0].id.to_string(), "cancelled".to_string()),
        (runs[1].id.to_string(), "cancelled".to_string()),
    ];
    want.sort();
    assert_eq!(statuses, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_cannot_start_fails_the_run() {
    let dir = tempdir();
    let env = env_in(dir.path(), 8).await;
    env.job(
        "name = \"no-binary\"\ntopic = \"nb-in\"\nretries = { max_attempts = 2, initial_backoff = \"100ms\" }\nprocess = { command = \"/nonexistent/pubrun-test-binary\" }\n",
        "nb-in",
    )
    .await;
    env.publish("nb-in", &[], "x").await;
    let run = env.wait_runs("no-binary", 1).await.remove(0);
    // The executor fails before it reports the process running: the run
    // goes from `starting` to the retry, then to `failed`.
    let run = env.wait_end(run.id).await;
    assert_eq!(run.status, RunStatus::Failed, "{run:#?}");
    assert_eq!(run.attempt, 2);
    assert_eq!(run.started_at_ms, None, "never ran: {run:#?}");
    assert!(run.ended_at_ms.is_some());
    let err = run.exit.as_ref().unwrap().error.clone().unwrap_or_default();
    assert!(
        err.contains("pubrun-test-binary"),
        "the error names the command: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_template_at_run_time_fails_without_retry() {
    let dir = tempdir();
    let env = env_in(dir.path(), 8).await;
    env.job(
        "name = \"needs-attr\"\ntopic = \"tmpl\"\nretries = { max_attempts = 3, initial_backoff = \"100ms\" }\nprocess = { command = \"echo\", args = [\"{{ attributes.missing }}\"] }\n",
        "tmpl",
    )
    .await;
    env.publish("tmpl", &[("other", "x")], "").await;
    let run = env.first_run_end("needs-attr").await;
    assert_eq!(run.status, RunStatus::Failed);
    assert_eq!(run.attempt, 1, "a parameter error is not retried");
    let err = run.exit.as_ref().unwrap().error.clone().unwrap();
    assert!(err.starts_with("parameters:"), "{err}");
    assert!(err.contains("attributes.missing"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_job_rejects_a_missing_topic_and_filters() {
    let dir = tempdir();
    let env = env_in(dir.path(), 8).await;
    let spec = job(
        "name = \"orphan\"\ntopic = \"nowhere\"\nprocess = { command = \"true\" }\n",
        &["nowhere"],
    );
    let e = env.dispatcher.put_job(spec).await.unwrap_err();
    assert_eq!(e.code, Code::NotFound, "{e:?}");
    assert!(e.message.contains("nowhere"), "{e:?}");

    env.topic("somewhere").await;
    // A spec that did not come through the manifest parser gets its filter
    // checked too.
    let mut spec = job(
        "name = \"filtered\"\ntopic = \"somewhere\"\nprocess = { command = \"true\" }\n",
        &["somewhere"],
    );
    spec.filter = r#"attributes.x = "1" AND"#.into();
    let e = env.dispatcher.put_job(spec).await.unwrap_err();
    assert_eq!(e.code, Code::InvalidArgument, "{e:?}");
    assert!(env.dispatcher.jobs().is_empty());

    let spec = job(
        "name = \"bad-result\"\ntopic = \"somewhere\"\nresult_topic = \"gone\"\nprocess = { command = \"true\" }\n",
        &["somewhere", "gone"],
    );
    let e = env.dispatcher.put_job(spec).await.unwrap_err();
    assert_eq!(e.code, Code::NotFound, "{e:?}");
    assert!(env.dispatcher.jobs().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_a_job_keeps_its_intake_running() {
    let dir = tempdir();
    let env = env_in(dir.path(), 8).await;
    let first = env.job("name = \"changing\"\ntopic = \"ch-in\"\nprocess = { command = \"echo\", args = [\"version one\"] }\n", "ch-in").await;
    env.publish("ch-in", &[], "").await;
    let r1 = env.wait_runs("changing", 1).await.remove(0);
    env.wait_end(r1.id).await;
    assert!(env.log(r1.id).contains("version one"));

    let mut second = first.clone();
    second.executor = job("name = \"changing\"\ntopic = \"ch-in\"\nprocess = { command = \"echo\", args = [\"version two\"] }\n", &["ch-in"]).executor;
    env.dispatcher.put_job(second.clone()).await.unwrap();
    assert_eq!(env.dispatcher.job("changing").unwrap(), second);
    env.publish("ch-in", &[], "").await;
    let r2 = env.wait_runs("changing", 2).await.remove(1);
    let r2 = env.wait_end(r2.id).await;
    assert_eq!(r2.status, RunStatus::Succeeded);
    assert!(env.log(r2.id).contains("version two"), "{}", env.log(r2.id));
    env.wait_acked("changing").await;

    // Moved to another topic: the subscription follows, the intake too.
    env.topic("ch-other").await;
    let mut third = second.clone();
    third.topic = topic_name("ch-other");
    env.dispatcher.put_job(third).await.unwrap();
    env.publish("ch-other", &[], "").await;
    let r3 = env.wait_runs("changing", 3).await.remove(2);
    assert_eq!(env.wait_end(r3.id).await.status, RunStatus::Succeeded);

    // Deleted: its subscription goes, its runs stay.
    env.dispatcher.delete_job("changing").await.unwrap();
    assert_eq!(
        env.broker
            .get_subscription(&job_sub("changing"))
            .unwrap_err()
            .code,
        Code::NotFound
    );
    assert_eq!(env.runs("changing").len(), 3);
    assert_eq!(
        env.dispatcher
            .delete_job("changing")
            .await
            .unwrap_err()
            .code,
        Code::NotFound
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_result_per_run_when_runs_end_together() {
    let dir = tempdir();
    let env = env_in(dir.path(), 16).await;
    env.topic("burst-results").await;
    let results = env.subscription("burst-watch", "burst-results").await;
    env.topic("burst-in").await;
    let spec = job(
        "name = \"burst\"\ntopic = \"burst-in\"\nresult_topic = \"burst-results\"\nconcurrency = 8\nprocess = { command = \"true\" }\n",
        &["burst-in", "burst-results"],
    );
    env.dispatcher.put_job(spec).await.unwrap();
    publish_many(&env, "burst-in", 8).await;
    let runs = env.wait_runs("burst", 8).await;
    for r in &runs {
        let r = env
            .wait_run(r.id, "ended, result published", |r| {
                r.status.is_terminal() && r.result_published
            })
            .await;
        assert_eq!(r.status, RunStatus::Succeeded);
    }
    assert_eq!(
        env.broker.backlog(&results).unwrap(),
        8,
        "exactly one result per run"
    );
    let mut ids = Vec::new();
    while ids.len() < 8 {
        for d in env.broker.pull(&results, 100, Some(WAIT)).await.unwrap() {
            ids.push(d.message.attributes["run_id"].clone());
        }
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 8);
}

/// Cancels runs the moment they are queued, while the scheduler races to
/// start them. Whatever wins, a run must never execute without being
/// recorded as started, and every run must end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_races_with_the_scheduler() {
    let dir = tempdir();
    let env = env_in(dir.path(), 8).await;
    let marks = dir.path().join("marks");
    std::fs::create_dir(&marks).unwrap();
    env.job(
        &format!(
            "name = \"racer\"\ntopic = \"race-in\"\nconcurrency = 4\ngrace_period = \"1s\"\nprocess = {{ command = \"sh\", args = [\"-c\", 'touch \"$D/$PUBRUN_RUN_ID\"'], env = {{ D = {} }} }}\n",
            toml_str(marks.to_str().unwrap())
        ),
        "race-in",
    )
    .await;
    let mut ids = Vec::new();
    for i in 0..60 {
        let id = env
            .dispatcher
            .trigger("racer", format!("{i}").into_bytes(), Default::default())
            .await
            .unwrap();
        match env.dispatcher.cancel(id) {
            Ok(_) => {}
            Err(e) => assert_eq!(e.code, Code::FailedPrecondition, "{e:?}"),
        }
        ids.push(id);
    }
    let mut distinct = ids.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 60, "every trigger makes its own run");
    let mut cancelled = 0;
    for id in ids {
        let r = env.wait_end(id).await;
        let ran = marks.join(id.to_string()).exists();
        if ran {
            assert!(
                r.started_at_ms.is_some(),
                "run {id} executed but was never recorded as started: {r:#?}"
            );
        }
        if r.status == RunStatus::Cancelled && r.started_at_ms.is_none() {
            assert!(!ran, "{r:#?}");
            cancelled += 1;
        }
    }
    assert!(cancelled > 0, "some runs were cancelled while queued");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_runs_of_a_deleted_job_are_cancelled() {
    let dir = tempdir();
    let env = open_env_unstarted(dir.path(), 8, process_executors()).await;
    env.job(
        "name = \"doomed\"\ntopic = \"doomed-in\"\nprocess = { command = \"true\" }\n",
        "doomed-in",
    )
    .await;
    env.publish("doomed-in", &[], "x").await;
    let run = env.wait_runs("doomed", 1).await.remove(0);
    env.wait_acked("doomed").await;
    env.dispatcher.delete_job("doomed").await.unwrap();
    env.dispatcher.start().await.unwrap();
    let run = env.wait_end(run.id).await;
    assert_eq!(run.status, RunStatus::Cancelled);
    assert_eq!(run.started_at_ms, None);
    let err = run.exit.unwrap().error.unwrap();
    assert!(err.contains("deleted"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_data_of_any_size_reaches_the_process_as_a_file() {
    let dir = tempdir();
    let env = env_in(dir.path(), 4).await;
    env.job(
        r#"name = "big-data"
topic = "big-in"
process = { command = "sh", args = ["-c", 'wc -c < "$PUBRUN_DATA_FILE"; cat "$PUBRUN_ATTRIBUTES_FILE"'] }
"#,
        "big-in",
    )
    .await;
    // 300 KB: far above what one argv/env string may carry.
    let data = "x".repeat(300_000);
    env.publish("big-in", &[("name", "big.csv")], &data).await;
    let run = env.first_run_end("big-data").await;
    assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
    let log = env.log(run.id);
    assert!(log.contains("300000"), "{log}");
    assert!(log.contains(r#"{"name":"big.csv"}"#), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deep_queue_of_one_job_does_not_starve_another() {
    let dir = tempdir();
    let env = env_in(dir.path(), 2).await;
    env.job("name = \"slow-job\"\ntopic = \"slow-in\"\nconcurrency = 1\nprocess = { command = \"sleep\", args = [\"0.2\"] }\n", "slow-in")
        .await;
    env.job(
        "name = \"quick-job\"\ntopic = \"quick-in\"\nprocess = { command = \"true\" }\n",
        "quick-in",
    )
    .await;
    publish_many(&env, "slow-in", 200).await;
    env.wait_runs("slow-job", 200).await;
    env.publish("quick-in", &[], "go").await;
    let quick = env.first_run_end("quick-job").await;
    assert_eq!(quick.status, RunStatus::Succeeded);
    let slow_done = env
        .runs("slow-job")
        .iter()
        .filter(|r| r.status.is_terminal())
        .count();
    assert!(
        slow_done < 150,
        "quick job had to wait for the slow queue ({slow_done} slow runs ended first)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_filter_selects_its_messages() {
    let dir = tempdir();
    let env = env_in(dir.path(), 4).await;
    env.job(
        "name = \"csv-only\"\ntopic = \"files-in\"\nfilter = 'attributes.kind = \"csv\"'\nprocess = { command = \"true\" }\n",
        "files-in",
    )
    .await;
    env.publish("files-in", &[("kind", "png")], "a").await;
    env.publish("files-in", &[("kind", "csv")], "b").await;
    env.publish("files-in", &[], "c").await;
    let run = env.wait_runs("csv-only", 1).await.remove(0);
    env.wait_end(run.id).await;
    env.wait_acked("csv-only").await;
    let runs = env.runs("csv-only");
    assert_eq!(runs.len(), 1, "only the csv message makes a run: {runs:?}");
    assert_eq!(
        runs[0].message.attributes.get("kind").map(String::as_str),
        Some("csv")
    );
}

/// Seed 000's stop function needs the zone and label the machine was started
/// with: a result can carry fields of its trigger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_carry_templated_and_trigger_attributes() {
    let dir = tempdir();
    let env = env_in(dir.path(), 8).await;
    env.topic("res3").await;
    let results = env.subscription("res3-watch", "res3").await;
    env.topic("in3").await;
    let spec = job(
        r#"name = "starter"
topic = "in3"
result_topic = "res3"
result_attributes = { zone = "{{ data.zone }}", label = "vm-{{ attributes.label }}" }
result_trigger_attributes = true
process = { command = "true" }
"#,
        &["in3", "res3"],
    );
    env.dispatcher.put_job(spec).await.unwrap();
    // The trigger's own `status` must not override pubrun's.
    env.publish(
        "in3",
        &[("label", "gpu"), ("team", "vision"), ("status", "fake")],
        r#"{"zone": "europe-west4-a"}"#,
    )
    .await;
    let runs = env.wait_runs("starter", 1).await;
    env.wait_run(runs[0].id, "result published", |r| r.result_published)
        .await;
    let got = env.broker.pull(&results, 10, Some(WAIT)).await.unwrap();
    assert_eq!(got.len(), 1);
    let a = &got[0].message.attributes;
    assert_eq!(a["zone"], "europe-west4-a", "{a:?}");
    assert_eq!(a["label"], "vm-gpu", "{a:?}");
    assert_eq!(a["team"], "vision", "trigger attributes copied: {a:?}");
    assert_eq!(
        a["status"], "succeeded",
        "pubrun's own attributes win: {a:?}"
    );
}

/// Every time the dispatcher records comes from its clock: a manual clock
/// set far in the past shows in the run's timestamps exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_times_come_from_the_dispatchers_clock() {
    let dir = tempdir();
    let env = open_env_unstarted(dir.path(), 2, process_executors()).await;
    let at = 1_600_000_000_000; // 2020-09-13: no system clock reads this
    let clock = pubrun_core::clock::ManualClock::at_ms(at);
    env.dispatcher.set_clock(std::sync::Arc::new(clock));
    env.dispatcher.start().await.unwrap();
    env.job(
        "name = \"timed\"\ntopic = \"clocked\"\nprocess = { command = \"true\" }\n",
        "clocked",
    )
    .await;
    env.publish("clocked", &[], "").await;
    let run = env.first_run_end("timed").await;
    assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
    assert_eq!(run.created_at_ms, at);
    assert_eq!(run.started_at_ms, Some(at));
    assert_eq!(run.ended_at_ms, Some(at));
}
