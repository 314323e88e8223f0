//! One trigger-store test suite for every engine (`TriggerStore` trait):
//! each `async fn` below takes an engine factory and is instantiated by
//! `all_engines!` (`engine_kit`) for SQLite (`triggers.db` in a temp dir) and PostgreSQL (a
//! throwaway `TempPostgres` cluster). Every `open` is a separate handle on
//! the same durable state, as two schedulers (or two servers) would have.
//! PostgreSQL-only: fencing (a write under a stale ownership token is
//! refused and writes nothing).
//!
//! PostgreSQL tests FAIL when Debian's `postgresql` package is missing:
//! they never skip.

#[macro_use]
mod engine_kit;

use chrono::{DateTime, Utc};
use engine_kit::{Postgres, Sqlite};
use pubrun_core::Code;
use pubrun_store::testing::TempPostgres;
use pubrun_store::triggers::{
    Claim, DefKind, Definition, Replacement, Scope, TickClaim, TriggerStore,
};
use pubrun_store::{PostgresTriggerStore, SqliteTriggerStore};

store_engines! {
    store: TriggerStore,
    bound_secs: 120,
    sqlite: |dir| SqliteTriggerStore::open(&dir.join("triggers.db")).expect("open triggers.db"),
    postgres: |url| PostgresTriggerStore::open(&url, None)
        .await
        .expect("open PostgreSQL trigger store"),
}

fn t(s: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_780_000_000 + s, 0).unwrap()
}

/// `owner`'s claim of `tick` on schedule `name` at `now`.
fn by<'a>(name: &'a str, tick: DateTime<Utc>, owner: &'a str, now: DateTime<Utc>) -> TickClaim<'a> {
    TickClaim {
        name,
        tick,
        owner,
        now,
    }
}

fn def(name: &str, project: &str) -> Definition {
    Definition {
        name: name.into(),
        project: project.into(),
        spec: format!("{{\"name\":\"{name}\"}}"),
    }
}

/// `project`'s apply declaring one definition of `kind`, `name`, unpaused.
async fn declare(
    s: &dyn TriggerStore,
    kind: DefKind,
    project: &str,
    name: &str,
    now: DateTime<Utc>,
) -> pubrun_core::Result<Vec<Definition>> {
    let defs = [(def(name, project), false)];
    s.replace_definitions(Replacement {
        kind,
        scope: Scope::Project(project),
        defs: &defs,
        now,
    })
    .await
}

fn names(defs: &[Definition]) -> Vec<(String, String)> {
    defs.iter()
        .map(|d| (d.name.clone(), d.project.clone()))
        .collect()
}

async fn claim_is_compare_and_set(e: impl Engine) {
    let a = e.open().await;
    let b = e.open().await;
    a.reconcile(&[("s".into(), false)], t(0)).await.unwrap();
    let st = b.get("s").await.unwrap().unwrap();
    assert_eq!(st.cursor, t(0));
    assert!(a
        .claim(by("s", t(60), "a", t(60)), st.cursor)
        .await
        .unwrap());
    assert!(!b
        .claim(by("s", t(60), "b", t(60)), st.cursor)
        .await
        .unwrap());
    let st = b.get("s").await.unwrap().unwrap();
    assert_eq!(
        st.pending,
        Some(Claim {
            tick: t(60),
            owner: "a".into(),
            claimed_at: t(60)
        })
    );
    assert_eq!(st.cursor, t(60));
    // Only the owner clears the claim; the tick shows as fired either way.
    assert!(!b.complete(by("s", t(60), "b", t(61)), "7").await.unwrap());
    assert!(a.complete(by("s", t(60), "a", t(61)), "7").await.unwrap());
    let st = a.get("s").await.unwrap().unwrap();
    assert_eq!(st.pending, None);
    assert_eq!(st.last_fired, Some(t(60)));
    assert_eq!(st.last_message_id.as_deref(), Some("7"));
    assert_eq!(st.last_error, None);
}

/// Two schedulers on one store race for the same ticks, concurrently: every
/// tick is won by exactly one of them.
async fn racing_schedulers_claim_each_tick_once(e: impl Engine) {
    let a = e.open().await;
    let b = e.open().await;
    a.reconcile(&[("race".into(), false)], t(0)).await.unwrap();
    for round in 1..=30i64 {
        let (sa, sb) = tokio::join!(a.get("race"), b.get("race"));
        let (sa, sb) = (sa.unwrap().unwrap(), sb.unwrap().unwrap());
        let tick = t(round * 60);
        let (ca, cb) = tokio::join!(
            a.claim(by("race", tick, "a", tick), sa.cursor),
            b.claim(by("race", tick, "b", tick), sb.cursor)
        );
        let won = [ca.unwrap(), cb.unwrap()];
        assert_eq!(
            won.iter().filter(|w| **w).count(),
            1,
            "round {round}: one winner, got {won:?}"
        );
        let owner = if won[0] { "a" } else { "b" };
        let st = a.get("race").await.unwrap().unwrap();
        assert_eq!(st.pending.as_ref().map(|c| c.owner.as_str()), Some(owner));
        assert_eq!(st.cursor, tick);
        let store = if won[0] { &a } else { &b };
        assert!(store
            .complete(by("race", tick, owner, tick), &round.to_string())
            .await
            .unwrap());
    }
    assert_eq!(
        a.get("race").await.unwrap().unwrap().last_fired,
        Some(t(30 * 60))
    );
}

async fn stale_claim_is_taken_over_once(e: impl Engine) {
    let a = e.open().await;
    let b = e.open().await;
    a.reconcile(&[("s".into(), false)], t(0)).await.unwrap();
    assert!(a.claim(by("s", t(60), "a", t(60)), t(0)).await.unwrap());
    let claim = b.get("s").await.unwrap().unwrap().pending.unwrap();
    let (x, y) = tokio::join!(
        b.take_over(by("s", claim.tick, "b", t(200)), &claim),
        a.take_over(by("s", claim.tick, "c", t(200)), &claim)
    );
    assert_eq!(
        [x.unwrap(), y.unwrap()].iter().filter(|w| **w).count(),
        1,
        "one takes over"
    );
    let now = a.get("s").await.unwrap().unwrap().pending.unwrap();
    assert!(now.owner == "b" || now.owner == "c");
    assert_eq!(now.tick, t(60));
    assert_eq!(now.claimed_at, t(200));
    // The old owner can no longer clear it; the new one can.
    assert!(!a.complete(by("s", t(60), "a", t(201)), "1").await.unwrap());
    assert!(a.get("s").await.unwrap().unwrap().pending.is_some());
    assert!(b
        .complete(by("s", t(60), &now.owner, t(202)), "2")
        .await
        .unwrap());
    let st = a.get("s").await.unwrap().unwrap();
    assert_eq!(st.pending, None);
    assert_eq!(st.last_message_id.as_deref(), Some("2"));
}

async fn errors_and_run_now_are_recorded(e: impl Engine) {
    let s = e.open().await;
    s.reconcile(&[("s".into(), false)], t(0)).await.unwrap();
    assert!(s.claim(by("s", t(60), "a", t(60)), t(0)).await.unwrap());
    s.record_error("s", "topic not found", t(61)).await.unwrap();
    let st = s.get("s").await.unwrap().unwrap();
    assert_eq!(st.last_error.as_deref(), Some("topic not found"));
    assert!(st.pending.is_some(), "a failed publish keeps its claim");
    s.record_run_now("s", "42", t(70)).await.unwrap();
    let st = s.get("s").await.unwrap().unwrap();
    assert_eq!(st.last_message_id.as_deref(), Some("42"));
    assert_eq!(st.cursor, t(60), "run now does not move the cursor");
    assert!(s.complete(by("s", t(60), "a", t(80)), "43").await.unwrap());
    assert_eq!(s.get("s").await.unwrap().unwrap().last_error, None);
    // Unknown names change nothing and are no error.
    s.record_error("nope", "x", t(1)).await.unwrap();
    assert!(s.get("nope").await.unwrap().is_none());
}

async fn pause_resume_and_reconcile(e: impl Engine) {
    let db = e.open().await;
    db.reconcile(&[("s".into(), false), ("gone".into(), false)], t(0))
        .await
        .unwrap();
    assert_eq!(db.list().await.unwrap().len(), 2);
    assert!(db.set_paused("s", true, t(10)).await.unwrap());
    assert!(
        !db.claim(by("s", t(60), "a", t(60)), t(0)).await.unwrap(),
        "no claim while paused"
    );
    // Re-applying the same declaration keeps the run-time pause.
    db.reconcile(&[("s".into(), false)], t(20)).await.unwrap();
    let st = db.get("s").await.unwrap().unwrap();
    assert!(st.paused);
    assert!(db.get("gone").await.unwrap().is_none());
    // Resume moves the cursor past the pause.
    assert!(db.set_paused("s", false, t(500)).await.unwrap());
    assert_eq!(db.get("s").await.unwrap().unwrap().cursor, t(500));
    // Resuming a running schedule leaves its cursor alone.
    assert!(db.set_paused("s", false, t(900)).await.unwrap());
    assert_eq!(db.get("s").await.unwrap().unwrap().cursor, t(500));
    // Declaring paused = true pauses; declaring false again resumes.
    db.reconcile(&[("s".into(), true)], t(600)).await.unwrap();
    let st = db.get("s").await.unwrap().unwrap();
    assert!(st.paused && st.config_paused);
    db.reconcile(&[("s".into(), false)], t(700)).await.unwrap();
    let st = db.get("s").await.unwrap().unwrap();
    assert!(!st.paused);
    assert_eq!(st.cursor, t(700));
    assert!(!db.set_paused("nope", true, t(0)).await.unwrap());
    let list = db.list().await.unwrap();
    assert_eq!(
        list.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["s"]
    );
}

async fn definitions_are_scoped_by_project(e: impl Engine) {
    let a = e.open().await;
    let b = e.open().await;
    let all = a
        .replace_definitions(Replacement {
            kind: DefKind::Schedule,
            scope: Scope::Project("alpha"),
            defs: &[
                (def("nightly", "alpha"), false),
                (def("hourly", "alpha"), true),
            ],
            now: t(0),
        })
        .await
        .unwrap();
    assert_eq!(
        names(&all),
        [
            ("hourly".into(), "alpha".into()),
            ("nightly".into(), "alpha".into())
        ]
    );
    // Schedule state rows follow, with the declared pause state.
    let st = b.get("hourly").await.unwrap().unwrap();
    assert!(st.paused);
    assert_eq!(st.cursor, t(0));
    assert!(!b.get("nightly").await.unwrap().unwrap().paused);
    // Webhooks are a separate kind with the same names allowed.
    declare(&*b, DefKind::Webhook, "beta", "nightly", t(1))
        .await
        .unwrap();
    declare(&*b, DefKind::Schedule, "beta", "weekly", t(2))
        .await
        .unwrap();
    // Another project's name is refused, and nothing changes.
    let err = declare(&*b, DefKind::Schedule, "beta", "nightly", t(3))
        .await
        .expect_err("name held by alpha");
    assert_eq!(err.code, Code::FailedPrecondition, "{err}");
    assert!(err.message.contains("\"alpha\""), "{err}");
    assert_eq!(
        names(&a.definitions(DefKind::Schedule).await.unwrap()),
        [
            ("hourly".into(), "alpha".into()),
            ("nightly".into(), "alpha".into()),
            ("weekly".into(), "beta".into())
        ]
    );
    // A project's apply replaces only its own definitions (and states).
    let all = declare(&*a, DefKind::Schedule, "alpha", "nightly", t(4))
        .await
        .unwrap();
    assert_eq!(
        names(&all),
        [
            ("nightly".into(), "alpha".into()),
            ("weekly".into(), "beta".into())
        ]
    );
    assert!(a.get("hourly").await.unwrap().is_none());
    assert_eq!(a.get("weekly").await.unwrap().unwrap().cursor, t(2));
    assert_eq!(
        a.get("nightly").await.unwrap().unwrap().cursor,
        t(0),
        "an existing schedule keeps its cursor"
    );
    assert_eq!(
        names(&a.definitions(DefKind::Webhook).await.unwrap()),
        [("nightly".into(), "beta".into())]
    );
    assert_eq!(
        a.definitions(DefKind::Webhook).await.unwrap()[0].spec,
        def("nightly", "beta").spec
    );
    // Scope::All replaces every project's.
    let all = a
        .replace_definitions(Replacement {
            kind: DefKind::Schedule,
            scope: Scope::All,
            defs: &[(def("only", "gamma"), false)],
            now: t(5),
        })
        .await
        .unwrap();
    assert_eq!(names(&all), [("only".into(), "gamma".into())]);
    assert_eq!(
        b.list()
            .await
            .unwrap()
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        ["only"]
    );
    assert_eq!(b.definitions(DefKind::Webhook).await.unwrap().len(), 1);
}

/// State survives closing every handle and opening again.
async fn state_survives_reopen(e: impl Engine) {
    {
        let s = e.open().await;
        declare(&*s, DefKind::Webhook, "p", "hook", t(0))
            .await
            .unwrap();
        s.reconcile(&[("s".into(), false)], t(0)).await.unwrap();
        assert!(s.claim(by("s", t(60), "a", t(60)), t(0)).await.unwrap());
    }
    let s = e.open().await;
    assert_eq!(
        names(&s.definitions(DefKind::Webhook).await.unwrap()),
        [("hook".into(), "p".into())]
    );
    let st = s.get("s").await.unwrap().unwrap();
    assert_eq!(st.pending.unwrap().tick, t(60));
}

all_engines!(
    claim_is_compare_and_set,
    racing_schedulers_claim_each_tick_once,
    stale_claim_is_taken_over_once,
    errors_and_run_now_are_recorded,
    pause_resume_and_reconcile,
    definitions_are_scoped_by_project,
    state_survives_reopen,
);

/// `triggers.db` files written before the seam (schema 2, same tables) open
/// unchanged, their rows intact.
#[tokio::test]
async fn sqlite_opens_an_existing_triggers_db() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("triggers.db");
    engine_kit::run_sql(
        &path,
        "CREATE TABLE schedules (name TEXT PRIMARY KEY, cursor_ms INTEGER NOT NULL,
                paused INTEGER NOT NULL DEFAULT 0, config_paused INTEGER NOT NULL DEFAULT 0,
                pending_tick_ms INTEGER, claimed_by TEXT, claimed_at_ms INTEGER,
                last_fired_ms INTEGER, last_message_id TEXT, last_error TEXT,
                updated_ms INTEGER NOT NULL);
             CREATE TABLE definitions (kind TEXT NOT NULL, name TEXT NOT NULL,
                project TEXT NOT NULL, spec TEXT NOT NULL, PRIMARY KEY (kind, name));
             INSERT INTO schedules (name, cursor_ms, paused, updated_ms) VALUES ('old', 1780000000000, 1, 0);
             INSERT INTO definitions VALUES ('schedule', 'old', 'demo', '{}');
             PRAGMA user_version = 2;",
    );
    let s = SqliteTriggerStore::open(&path).unwrap();
    let st = s.get("old").await.unwrap().unwrap();
    assert_eq!(st.cursor, t(0));
    assert!(st.paused);
    assert_eq!(
        names(&s.definitions(DefKind::Schedule).await.unwrap()),
        [("old".into(), "demo".into())]
    );
}

/// A corrupt row is an error, never a default.
#[tokio::test]
async fn sqlite_corrupt_claim_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("triggers.db");
    let s = SqliteTriggerStore::open(&path).unwrap();
    s.reconcile(&[("s".into(), false)], t(0)).await.unwrap();
    engine_kit::run_sql(&path, "UPDATE schedules SET pending_tick_ms = 5");
    let err = s.get("s").await.expect_err("claim without owner");
    assert_eq!(err.code, Code::Internal, "{err}");
}

/// A trigger store opened under an ownership token writes while the token
/// is current; once another server took the lease, every write is refused
/// with UNAVAILABLE ("taken over") and writes nothing; reads still work, and
/// the new owner carries on (takes over the stale claim, fires the tick).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_writes_under_a_stale_token_are_refused() {
    bounded(async {
        let pg = TempPostgres::start();
        let lease = engine_kit::lease(&pg, "a").await;
        let a = PostgresTriggerStore::open(&pg.url(), Some(engine_kit::fence(lease.token())))
            .await
            .unwrap();
        declare(&a, DefKind::Schedule, "p", "s", t(0))
            .await
            .unwrap();
        assert!(a.claim(by("s", t(60), "a", t(60)), t(0)).await.unwrap());
        assert!(!a.is_fenced());

        // "a" is cut off; "b" takes over with a higher token.
        lease.stop_renewing();
        let b_lease = engine_kit::lease(&pg, "b").await;
        assert!(b_lease.token() > lease.token());
        let b = PostgresTriggerStore::open(&pg.url(), Some(engine_kit::fence(b_lease.token())))
            .await
            .unwrap();

        let claim = a.get("s").await.unwrap().unwrap().pending.unwrap();
        let refused = [
            a.claim(by("s", t(120), "a", t(120)), t(60))
                .await
                .map(|_| ()),
            a.take_over(by("s", claim.tick, "a", t(200)), &claim)
                .await
                .map(|_| ()),
            a.complete(by("s", t(60), "a", t(61)), "late")
                .await
                .map(|_| ()),
            a.record_error("s", "late", t(61)).await,
            a.record_run_now("s", "late", t(61)).await,
            a.set_paused("s", true, t(61)).await.map(|_| ()),
            a.reconcile(&[], t(61)).await,
            a.replace_definitions(Replacement {
                kind: DefKind::Webhook,
                scope: Scope::All,
                defs: &[],
                now: t(61),
            })
            .await
            .map(|_| ()),
        ];
        engine_kit::assert_fenced(refused);
        assert!(a.is_fenced());
        // Nothing of it was written; reads still work.
        let st = a.get("s").await.unwrap().unwrap();
        assert_eq!(st.pending.as_ref(), Some(&claim));
        assert_eq!(st.cursor, t(60));
        assert!(!st.paused);
        assert_eq!(st.last_message_id, None);
        assert_eq!(st.last_error, None);
        // The new owner takes the stale claim over and completes it.
        assert!(b
            .take_over(by("s", claim.tick, "b", t(200)), &claim)
            .await
            .unwrap());
        assert!(b.complete(by("s", t(60), "b", t(201)), "1").await.unwrap());
        assert!(b.claim(by("s", t(120), "b", t(220)), t(60)).await.unwrap());
        assert_eq!(b.definitions(DefKind::Schedule).await.unwrap().len(), 1);
        drop(b_lease);
    })
    .await
}
