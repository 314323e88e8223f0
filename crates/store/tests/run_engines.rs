//! One run-store test suite for every engine (`RunStore` trait): each
//! `async fn` below takes an engine factory and is instantiated by
//! `all_engines!` (`engine_kit`) for SQLite (a temp dir) and PostgreSQL (a throwaway
//! `TempPostgres` cluster), as the Pub/Sub engines share `engines/suite.rs`.
//! PostgreSQL-only: fencing (a write under a stale ownership token is
//! refused and writes nothing).
//!
//! PostgreSQL tests FAIL when Debian's `postgresql` package is missing:
//! they never skip.

#[macro_use]
mod engine_kit;

use std::sync::Arc;

use engine_kit::{Postgres, Sqlite};
use pubrun_core::job::JobSpec;
use pubrun_core::run::{Exit, RunStatus};
use pubrun_core::Code;
use pubrun_store::runs::{Batch, Enqueued, Requeue, RunEnd, RunStore, SourceMessage};
use pubrun_store::testing::TempPostgres;
use pubrun_store::{PostgresRunStore, SqliteRunStore};

store_engines! {
    store: RunStore,
    bound_secs: 120,
    sqlite: |dir| SqliteRunStore::open(&dir.join("runs.db")).expect("open runs.db"),
    postgres: |url| PostgresRunStore::open(&url, "node-a", None)
        .await
        .expect("open PostgreSQL run store"),
}

fn job(name: &str, extra: &str) -> JobSpec {
    let src = format!(
        "project = \"proj\"\n[[topic]]\nname = \"work\"\n[[job]]\nname = \"{name}\"\ntopic = \"work\"\n{extra}\nprocess = {{ command = \"true\" }}\n"
    );
    pubrun_core::manifest::parse("test.toml", &src)
        .unwrap_or_else(|e| panic!("bad test job: {e}"))
        .jobs
        .remove(0)
}

fn msg(id: &str) -> SourceMessage {
    SourceMessage {
        id: id.into(),
        data: format!("data of {id}").into_bytes(),
        attributes: [("k".to_string(), id.to_string())].into_iter().collect(),
        publish_time: "2026-01-01T00:00:00Z".into(),
        ordering_key: String::new(),
    }
}

async fn new_run(s: &dyn RunStore, spec: &JobSpec, id: &str, now: i64) -> i64 {
    match s.enqueue(spec, &msg(id), id, now).await.unwrap() {
        Enqueued::New(id) => id,
        other => panic!("expected a new run, got {other:?}"),
    }
}

fn failed(code: i32) -> Exit {
    Exit {
        exit_code: Some(code),
        ..Default::default()
    }
}

fn ok_exit() -> Exit {
    Exit {
        exit_code: Some(0),
        ..Default::default()
    }
}

/// An end of a run at `now_ms`, with no result topic unless `result`.
fn end(exit: &Exit, now_ms: i64, result: bool) -> RunEnd<'_> {
    RunEnd {
        exit,
        now_ms,
        has_result_topic: result,
    }
}

fn again(next_attempt: u32, not_before_ms: i64, last_exit: &Exit) -> Requeue<'_> {
    Requeue {
        next_attempt,
        not_before_ms,
        last_exit,
    }
}

// ---- the suite ----

async fn jobs_and_meta_round_trip(e: impl Engine) {
    let s = e.open().await;
    assert!(s.jobs().await.unwrap().is_empty());
    let a = job("job-a", "concurrency = 2");
    let b = job("job-b", "");
    s.put_job(&b).await.unwrap();
    s.put_job(&a).await.unwrap();
    assert_eq!(s.jobs().await.unwrap(), vec![a.clone(), b.clone()]);
    // Replacing keeps one row per name.
    let a2 = job("job-a", "concurrency = 7");
    s.put_job(&a2).await.unwrap();
    assert_eq!(s.jobs().await.unwrap(), vec![a2.clone(), b.clone()]);
    assert!(s.delete_job("job-b").await.unwrap());
    assert!(!s.delete_job("job-b").await.unwrap());

    assert_eq!(s.meta("owner").await.unwrap(), None);
    s.set_meta("owner", "one").await.unwrap();
    s.set_meta("owner", "two").await.unwrap();
    drop(s);
    // Durable: a reopened store sees the same jobs and meta.
    let s = e.open().await;
    assert_eq!(s.jobs().await.unwrap(), vec![a2]);
    assert_eq!(s.meta("owner").await.unwrap().as_deref(), Some("two"));
}

async fn dedup_keys_are_unique_inside_their_window(e: impl Engine) {
    let s = e.open().await;
    let spec = job("job-dd", "dedup_window = \"10s\"");
    let t = 1_000_000;
    let id = new_run(&*s, &spec, "7", t).await;
    // Redelivered inside the window: no second run.
    for later in [t + 5, t + 9_999] {
        assert_eq!(
            s.enqueue(&spec, &msg("7"), "7", later).await.unwrap(),
            Enqueued::Duplicate(id)
        );
    }
    // Keys are per job.
    let other = job("dd-other", "dedup_window = \"10s\"");
    assert!(matches!(
        s.enqueue(&other, &msg("7"), "7", t).await.unwrap(),
        Enqueued::New(_)
    ));
    // After the window the key is free again, and taken by the new run.
    let id2 = new_run(&*s, &spec, "7", t + 10_000).await;
    assert_ne!(id2, id);
    assert_eq!(
        s.enqueue(&spec, &msg("7"), "7", t + 10_001).await.unwrap(),
        Enqueued::Duplicate(id2)
    );
    // One batch: later messages see the keys of earlier ones.
    let batch = vec![
        (msg("b1"), "k".to_string()),
        (msg("b2"), "k".to_string()),
        (msg("b3"), "other".to_string()),
    ];
    let out = s
        .enqueue_batch(Batch {
            job: &spec,
            messages: &batch,
            now_ms: t + 10_002,
        })
        .await
        .unwrap();
    let Enqueued::New(first) = out[0] else {
        panic!("{out:?}")
    };
    assert_eq!(out[1], Enqueued::Duplicate(first));
    assert!(matches!(out[2], Enqueued::New(_)));
    // Pruning drops only expired keys: dd's and dd-other's "7", not the
    // batch's (they expire at t + 20_002).
    assert_eq!(s.prune_dedup(t + 20_000).await.unwrap(), 2);
    assert_eq!(
        s.enqueue(&spec, &msg("b4"), "k", t + 20_001).await.unwrap(),
        Enqueued::Duplicate(first)
    );
    assert!(matches!(
        s.enqueue(&spec, &msg("7"), "7", t + 20_001).await.unwrap(),
        Enqueued::New(_)
    ));
    assert_eq!(s.list(Some("job-dd"), None, 100).await.unwrap().len(), 5);
    // The run keeps its message, data included.
    let run = s.get(id).await.unwrap();
    assert_eq!(run.message, msg("7"));
    assert_eq!(run.dedup_key, "7");
    assert_eq!(run.status, RunStatus::Queued);
    assert_eq!(
        (run.attempt, run.max_attempts),
        (1, spec.retries.max_attempts)
    );
}

async fn state_machine_claims_once_and_records_attempts(e: impl Engine) {
    let s = e.open().await;
    let spec = job("job-sm", "retries = { max_attempts = 3 }");
    let t = 5_000_000;
    let id = new_run(&*s, &spec, "m1", t).await;
    let startable = s.startable("job-sm", t, 10).await.unwrap();
    assert_eq!(startable.len(), 1);
    assert_eq!(
        (startable[0].id, startable[0].cancel_requested),
        (id, false)
    );

    // Claimed once: a second claim is refused.
    s.mark_starting(id).await.unwrap();
    let e2 = s.mark_starting(id).await.unwrap_err();
    assert_eq!(e2.code, Code::FailedPrecondition, "{e2}");
    assert!(s.startable("job-sm", t, 10).await.unwrap().is_empty());
    s.mark_running(id, "host-1", "pid-1", t + 10).await.unwrap();
    let run = s.get(id).await.unwrap();
    assert_eq!(run.status, RunStatus::Running);
    assert_eq!(
        (run.machine.as_str(), run.handle.as_str()),
        ("host-1", "pid-1")
    );
    assert_eq!(run.started_at_ms, Some(t + 10));

    // Attempt 1 failed: back to the queue for attempt 2, after a backoff.
    s.requeue(id, again(2, t + 5_000, &failed(1)))
        .await
        .unwrap();
    let run = s.get(id).await.unwrap();
    assert_eq!((run.status, run.attempt), (RunStatus::Queued, 2));
    assert_eq!(run.exit, Some(failed(1)));
    assert!(s.startable("job-sm", t + 100, 10).await.unwrap().is_empty());
    assert_eq!(s.next_due_ms(t + 100).await.unwrap(), Some(t + 5_000));
    assert!(s.due_queued_by_job(t + 100).await.unwrap().is_empty());
    assert_eq!(
        s.due_queued_by_job(t + 5_000).await.unwrap(),
        vec![("job-sm".to_string(), 1)]
    );
    assert_eq!(s.startable("job-sm", t + 5_000, 10).await.unwrap().len(), 1);

    // Attempt 2 succeeds; the first start time is kept.
    s.mark_starting(id).await.unwrap();
    s.mark_running(id, "host-2", "pid-2", t + 6_000)
        .await
        .unwrap();
    let status = s
        .finish(id, end(&ok_exit(), t + 7_000, true))
        .await
        .unwrap();
    assert_eq!(status, RunStatus::Succeeded);
    let run = s.get(id).await.unwrap();
    assert_eq!(run.status, RunStatus::Succeeded);
    assert_eq!(
        (run.attempt, run.started_at_ms, run.ended_at_ms),
        (2, Some(t + 10), Some(t + 7_000))
    );
    assert_eq!(run.machine, "host-2");

    // A terminal run moves no more.
    for err in [
        s.finish(id, end(&failed(2), t + 8_000, true))
            .await
            .unwrap_err(),
        s.requeue(id, again(3, t, &failed(2))).await.unwrap_err(),
        s.mark_starting(id).await.unwrap_err(),
        s.request_cancel(id).await.unwrap_err(),
    ] {
        assert_eq!(err.code, Code::FailedPrecondition, "{err}");
    }
    // Running without being claimed is refused.
    let other = new_run(&*s, &spec, "m2", t).await;
    let err = s.mark_running(other, "h", "x", t).await.unwrap_err();
    assert_eq!(err.code, Code::FailedPrecondition, "{err}");
    assert_eq!(s.get(999_999).await.unwrap_err().code, Code::NotFound);

    // Outbox: the finished run's result is pending until marked published.
    let pending = s.unpublished_results().await.unwrap();
    assert_eq!(pending.iter().map(|r| r.id).collect::<Vec<_>>(), vec![id]);
    s.mark_result_published(id).await.unwrap();
    assert!(s.unpublished_results().await.unwrap().is_empty());
}

async fn cancel_wins_over_a_claim(e: impl Engine) {
    let s = e.open().await;
    let spec = job("job-cx", "");
    let t = 9_000_000;
    let id = new_run(&*s, &spec, "c1", t).await;
    let run = s.request_cancel(id).await.unwrap();
    assert!(run.cancel_requested);
    // Flagged: the scheduler cannot claim it.
    let err = s.mark_starting(id).await.unwrap_err();
    assert_eq!(err.code, Code::FailedPrecondition, "{err}");
    assert!(s.startable("job-cx", t, 10).await.unwrap()[0].cancel_requested);
    let exit = Exit {
        cause: pubrun_core::run::EndCause::Cancelled,
        ..Default::default()
    };
    assert!(s
        .cancel_if_queued(id, end(&exit, t + 1, false))
        .await
        .unwrap());
    assert!(!s
        .cancel_if_queued(id, end(&exit, t + 2, false))
        .await
        .unwrap());
    let run = s.get(id).await.unwrap();
    assert_eq!(
        (run.status, run.ended_at_ms),
        (RunStatus::Cancelled, Some(t + 1))
    );
    assert!(run.result_published, "no result topic: nothing pending");
    // A claimed run is not ended by cancel_if_queued (its executor is).
    let id2 = new_run(&*s, &spec, "c2", t).await;
    s.mark_starting(id2).await.unwrap();
    assert!(!s.cancel_if_queued(id2, end(&exit, t, false)).await.unwrap());
    assert_eq!(s.get(id2).await.unwrap().status, RunStatus::Starting);
}

async fn list_pages_newest_first_with_filters(e: impl Engine) {
    let s = e.open().await;
    let a = job("job-la", "");
    let b = job("job-lb", "");
    let t = 20_000_000;
    let mut ids = Vec::new();
    for i in 0..30 {
        let spec = if i % 3 == 0 { &b } else { &a };
        ids.push((
            spec.name.clone(),
            new_run(&*s, spec, &format!("m{i}"), t + i).await,
        ));
    }
    // Some end, so that status filters have something to filter.
    let ended: Vec<i64> = ids.iter().take(6).map(|(_, id)| *id).collect();
    for id in &ended {
        s.mark_starting(*id).await.unwrap();
        s.finish(*id, end(&failed(3), t + 100, false))
            .await
            .unwrap();
    }
    let all = s.list(None, None, 10_000).await.unwrap();
    assert_eq!(all.len(), 30);
    let newest: Vec<i64> = ids.iter().rev().map(|(_, id)| *id).collect();
    assert_eq!(all.iter().map(|r| r.id).collect::<Vec<_>>(), newest);
    // A page is the newest `limit`.
    let page = s.list(None, None, 7).await.unwrap();
    assert_eq!(page.iter().map(|r| r.id).collect::<Vec<_>>(), newest[..7]);
    let of_b = s.list(Some("job-lb"), None, 100).await.unwrap();
    assert_eq!(of_b.len(), 10);
    assert!(of_b.iter().all(|r| r.job == "job-lb"));
    assert!(of_b.windows(2).all(|w| w[0].id > w[1].id));
    let failed_runs = s.list(None, Some(RunStatus::Failed), 100).await.unwrap();
    assert_eq!(failed_runs.len(), 6);
    let failed_a = s
        .list(Some("job-la"), Some(RunStatus::Failed), 2)
        .await
        .unwrap();
    assert_eq!(failed_a.len(), 2);
    assert!(failed_a
        .iter()
        .all(|r| r.job == "job-la" && r.status == RunStatus::Failed));
    assert!(s.list(Some("nope"), None, 100).await.unwrap().is_empty());
    // Recovery reads by status, oldest first.
    let fs = s.with_status(&[RunStatus::Failed]).await.unwrap();
    assert_eq!(fs.iter().map(|r| r.id).collect::<Vec<_>>(), ended);
    // Queued runs of jobs that are gone.
    let orphans = s.queued_orphans(&["job-la".to_string()]).await.unwrap();
    assert_eq!(orphans.len(), 8);
    assert!(orphans.iter().all(|q| q.job == "job-lb"));
    let mut due = s.due_queued_by_job(t + 1_000).await.unwrap();
    due.sort();
    assert_eq!(
        due,
        vec![("job-la".to_string(), 16), ("job-lb".to_string(), 8)]
    );
}

async fn run_logs_round_trip(e: impl Engine) {
    let s = e.open().await;
    let spec = job("job-lg", "");
    let id = new_run(&*s, &spec, "l1", 1).await;
    assert_eq!(s.log(id).await.unwrap(), None);
    s.put_log(id, b"attempt 1\n").await.unwrap();
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    s.put_log(id, &big).await.unwrap();
    drop(s);
    let s = e.open().await;
    assert_eq!(
        s.log(id).await.unwrap(),
        Some(big),
        "the latest log replaces the previous one"
    );
}

all_engines!(
    jobs_and_meta_round_trip,
    dedup_keys_are_unique_inside_their_window,
    state_machine_claims_once_and_records_attempts,
    cancel_wins_over_a_claim,
    list_pages_newest_first_with_filters,
    run_logs_round_trip,
);

/// Two servers racing on one dedup key create one run (the key is the
/// primary key; the loser waits for the winner's commit, then sees it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_dedup_key_is_unique_across_servers() {
    bounded(async {
        let pg = TempPostgres::start();
        let a = Arc::new(PostgresRunStore::open(&pg.url(), "a", None).await.unwrap());
        let b = Arc::new(PostgresRunStore::open(&pg.url(), "b", None).await.unwrap());
        let spec = job("race", "dedup_window = \"1h\"");
        for round in 0..20 {
            let key = format!("k{round}");
            let m = msg(&key);
            let (ra, rb) = tokio::join!(
                a.enqueue(&spec, &m, &key, 1_000),
                b.enqueue(&spec, &m, &key, 1_000)
            );
            let mut new = 0;
            for r in [ra.unwrap(), rb.unwrap()] {
                if matches!(r, Enqueued::New(_)) {
                    new += 1;
                }
            }
            assert_eq!(new, 1, "round {round}: exactly one run per key");
        }
        assert_eq!(a.list(Some("race"), None, 100).await.unwrap().len(), 20);
    })
    .await
}

/// A run store opened under an ownership token writes while the token is
/// current; once another server took the lease (the token went up), every
/// write is refused with UNAVAILABLE, names the takeover, and writes
/// nothing; reads still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_writes_under_a_stale_token_are_refused() {
    bounded(async {
        let pg = TempPostgres::start();
        // The lease as `PostgresStore` takes it: acquired by "a" (token 1).
        let lease = engine_kit::lease(&pg, "a").await;
        let a = PostgresRunStore::open(&pg.url(), "a", Some(engine_kit::fence(lease.token())))
            .await
            .unwrap();
        let spec = job("fenced", "");
        let id = new_run(&a, &spec, "before", 1).await;
        a.mark_starting(id).await.unwrap();
        assert!(!a.is_fenced());

        // "a" stops renewing (cut off); "b" takes over with a higher token.
        lease.stop_renewing();
        let b_lease = engine_kit::lease(&pg, "b").await;
        assert!(b_lease.token() > lease.token());
        let b = PostgresRunStore::open(&pg.url(), "b", Some(engine_kit::fence(b_lease.token())))
            .await
            .unwrap();

        let refused = [
            a.enqueue(&spec, &msg("late"), "late", 2).await.map(|_| ()),
            a.mark_running(id, "h", "x", 3).await,
            a.finish(id, end(&ok_exit(), 4, false)).await.map(|_| ()),
            a.put_job(&spec).await,
            a.set_meta("k", "v").await,
            a.put_log(id, b"late").await,
        ];
        engine_kit::assert_fenced(refused);
        assert!(a.is_fenced());
        // Nothing of it was written; the new owner carries on.
        assert_eq!(b.list(None, None, 100).await.unwrap().len(), 1);
        assert!(b.jobs().await.unwrap().is_empty());
        assert_eq!(b.meta("k").await.unwrap(), None);
        assert_eq!(b.log(id).await.unwrap(), None);
        let run = a.get(id).await.unwrap();
        assert_eq!(run.status, RunStatus::Starting, "reads still work");
        b.mark_running(id, "h", "y", 5).await.unwrap();
        b.finish(id, end(&ok_exit(), 6, false)).await.unwrap();
        assert_eq!(b.get(id).await.unwrap().status, RunStatus::Succeeded);
        drop(b_lease);
    })
    .await
}
