//! One pool-store test suite for every engine (`PoolStore` trait): each
//! `async fn` below takes an engine factory and is instantiated by
//! `pool_suite!` for SQLite (a temp dir) and PostgreSQL (a throwaway
//! `TempPostgres` cluster), as `run_engines.rs` does for the run store.
//! PostgreSQL-only: fencing (a write under a stale ownership token is
//! refused and writes nothing), and an old `pools.db` opening on SQLite.
//!
//! PostgreSQL tests FAIL when Debian's `postgresql` package is missing:
//! they never skip.

#[macro_use]
mod engine_kit;

use std::time::Duration;

use engine_kit::{Postgres, Sqlite};
use pubrun_core::pool::{MachineState, PoolSpec, ProviderSpec};
use pubrun_core::run::Exit;
use pubrun_core::Code;
use pubrun_store::pools::{
    Bootstrap, LeaseEnd, LeaseState, MachineRow, NewLease, PoolStore, UpSpan,
};
use pubrun_store::testing::TempPostgres;
use pubrun_store::{PostgresPoolStore, SqlitePoolStore};

store_engines! {
    store: PoolStore,
    bound_secs: 120,
    sqlite: |dir| SqlitePoolStore::open(&dir.join("pools.db"))
        .await
        .expect("open pools.db"),
    postgres: |url| PostgresPoolStore::open(&url, None)
        .await
        .expect("open PostgreSQL pool store"),
}

fn pool(name: &str, max: u32) -> PoolSpec {
    PoolSpec {
        name: name.into(),
        provider: ProviderSpec::Agents,
        min_machines: 0,
        max_machines: max,
        runs_per_machine: 2,
        idle_timeout: Duration::from_secs(60),
        delete_when_idle: false,
        price_per_hour: Some(1.5),
        token_env: String::new(),
        lease_timeout: Duration::from_secs(30),
        boot_timeout: Duration::from_secs(60),
    }
}

fn machine(name: &str, pool: &str, state: MachineState, created: i64) -> MachineRow {
    MachineRow {
        name: name.into(),
        pool: pool.into(),
        provider: "docker".into(),
        provider_id: String::new(),
        state,
        state_since_ms: created,
        idle_since_ms: None,
        created_ms: created,
        cordoned: false,
        slots: 1,
        last_error: String::new(),
        needs_stop: false,
    }
}

fn lease<'a>(run_id: &'a str, machine: &'a str, now_ms: i64) -> NewLease<'a> {
    NewLease {
        run_id,
        job: "job-a",
        attempt: 1,
        pool: "p",
        machine,
        now_ms,
    }
}

fn exit(code: i32) -> Exit {
    Exit {
        exit_code: Some(code),
        ..Default::default()
    }
}

fn span(machine: &str, pool: &str, start_ms: i64, end_ms: Option<i64>) -> UpSpan {
    UpSpan {
        machine: machine.into(),
        pool: pool.into(),
        start_ms,
        end_ms,
    }
}

// ---- the suite ----

async fn pools_round_trip_and_keep_their_token(e: impl Engine) {
    let s = e.open().await;
    assert!(s.pools().await.unwrap().is_empty());
    // A new pool takes the fresh token; a later put keeps it.
    assert_eq!(
        s.put_pool(&pool("b", 1), None, "tok-b").await.unwrap(),
        "tok-b"
    );
    assert_eq!(
        s.put_pool(&pool("a", 1), None, "tok-a").await.unwrap(),
        "tok-a"
    );
    assert_eq!(
        s.put_pool(&pool("a", 5), None, "other").await.unwrap(),
        "tok-a"
    );
    // An explicit token (token_env) replaces it.
    assert_eq!(
        s.put_pool(&pool("b", 2), Some("from-env"), "other")
            .await
            .unwrap(),
        "from-env"
    );
    let want = vec![
        (pool("a", 5), "tok-a".to_string()),
        (pool("b", 2), "from-env".to_string()),
    ];
    assert_eq!(s.pools().await.unwrap(), want);
    drop(s);
    // Durable.
    let s = e.open().await;
    assert_eq!(s.pools().await.unwrap(), want);
    s.delete_pool("a").await.unwrap();
    s.delete_pool("nope").await.unwrap();
    assert_eq!(s.pools().await.unwrap(), want[1..].to_vec());
}

async fn machines_upsert_list_and_delete(e: impl Engine) {
    let s = e.open().await;
    assert!(s.machines().await.unwrap().is_empty());
    assert_eq!(s.machine("m1").await.unwrap(), None);
    let m2 = machine("m2", "p", MachineState::Provisioning, 20);
    let m1 = machine("m1", "p", MachineState::Provisioning, 10);
    let q1 = machine("q1", "q", MachineState::Ready, 5);
    for m in [&m2, &m1, &q1] {
        s.upsert_machine(m).await.unwrap();
    }
    // By pool, then creation time.
    assert_eq!(
        s.machines().await.unwrap(),
        vec![m1.clone(), m2.clone(), q1.clone()]
    );
    // Every field is written back, including the typed flags.
    let mut m1b = m1.clone();
    m1b.provider_id = "id-1".into();
    m1b.state = MachineState::Failed;
    m1b.state_since_ms = 99;
    m1b.idle_since_ms = Some(98);
    m1b.cordoned = true;
    m1b.slots = 7;
    m1b.last_error = "agent not heard from for 30 s".into();
    m1b.needs_stop = true;
    m1b.created_ms = 12345; // creation time is kept on update
    s.upsert_machine(&m1b).await.unwrap();
    let got = s.machine("m1").await.unwrap().unwrap();
    assert_eq!(
        got,
        MachineRow {
            created_ms: 10,
            ..m1b.clone()
        }
    );
    drop(s);
    let s = e.open().await;
    assert_eq!(s.machine("m1").await.unwrap().unwrap(), got);
    s.delete_machine("m2").await.unwrap();
    assert_eq!(s.machines().await.unwrap(), vec![got, q1]);
}

async fn machine_names_are_never_given_out_twice(e: impl Engine) {
    let s = e.open().await;
    let a = s.new_machine_name("p", "pubrun").await.unwrap();
    let b = s.new_machine_name("p", "pubrun").await.unwrap();
    assert_eq!((a.as_str(), b.as_str()), ("pubrun-p-1", "pubrun-p-2"));
    for n in [&a, &b] {
        s.upsert_machine(&machine(n, "p", MachineState::Provisioning, 0))
            .await
            .unwrap();
        s.span_open(n, "p", 10).await.unwrap();
        s.span_close(n, 20).await.unwrap();
        // Deleted by the provider: the row goes, the name stays used.
        s.delete_machine(n).await.unwrap();
    }
    assert!(s.machines().await.unwrap().is_empty());
    let c = s.new_machine_name("p", "pubrun").await.unwrap();
    let d = s.new_machine_name("p", "pubrun").await.unwrap();
    assert_eq!((c.as_str(), d.as_str()), ("pubrun-p-3", "pubrun-p-4"));
    // Other pools count on their own; a pool removed and declared again
    // does not start over.
    assert_eq!(s.new_machine_name("q", "acme").await.unwrap(), "acme-q-1");
    s.delete_pool("p").await.unwrap();
    assert_eq!(
        s.new_machine_name("p", "pubrun").await.unwrap(),
        "pubrun-p-5"
    );
    // Names some row or span carries (written before numbers were kept)
    // are skipped.
    s.upsert_machine(&machine("pubrun-r-1", "r", MachineState::Stopped, 0))
        .await
        .unwrap();
    s.span_open("pubrun-r-2", "r", 0).await.unwrap();
    assert_eq!(
        s.new_machine_name("r", "pubrun").await.unwrap(),
        "pubrun-r-3"
    );
    drop(s);
    let s = e.open().await;
    assert_eq!(
        s.new_machine_name("p", "pubrun").await.unwrap(),
        "pubrun-p-6"
    );
}

async fn bootstrap_tokens_round_trip(e: impl Engine) {
    let s = e.open().await;
    assert!(s.bootstraps().await.unwrap().is_empty());
    let b = |m: &str, t: &str| Bootstrap {
        machine: m.into(),
        pool: "p".into(),
        token: t.into(),
    };
    s.put_bootstrap(&b("m2", "t2")).await.unwrap();
    s.put_bootstrap(&b("m1", "t1")).await.unwrap();
    // A restarted machine gets a new one.
    s.put_bootstrap(&b("m1", "t1b")).await.unwrap();
    drop(s);
    let s = e.open().await;
    assert_eq!(
        s.bootstraps().await.unwrap(),
        vec![b("m1", "t1b"), b("m2", "t2")]
    );
    s.delete_bootstrap("m1").await.unwrap();
    s.delete_bootstrap("m1").await.unwrap();
    assert_eq!(s.bootstraps().await.unwrap(), vec![b("m2", "t2")]);
}

async fn cost_spans_open_close_and_since(e: impl Engine) {
    let s = e.open().await;
    s.span_open("m1", "p", 100).await.unwrap();
    // Already open: no second span.
    s.span_open("m1", "p", 150).await.unwrap();
    s.span_open("m2", "q", 120).await.unwrap();
    assert_eq!(
        s.spans(0).await.unwrap(),
        vec![span("m1", "p", 100, None), span("m2", "q", 120, None)]
    );
    s.span_close("m1", 200).await.unwrap();
    // Closing again changes nothing; a clock behind the start never makes
    // a negative span.
    s.span_close("m1", 300).await.unwrap();
    s.span_close("m2", 50).await.unwrap();
    s.span_open("m1", "p", 400).await.unwrap();
    drop(s);
    let s = e.open().await;
    assert_eq!(
        s.spans(0).await.unwrap(),
        vec![
            span("m1", "p", 100, Some(200)),
            span("m1", "p", 400, None),
            span("m2", "q", 120, Some(120)),
        ]
    );
    // Only spans still open or ended after `since`.
    assert_eq!(
        s.spans(150).await.unwrap(),
        vec![span("m1", "p", 100, Some(200)), span("m1", "p", 400, None)]
    );
    assert_eq!(
        s.spans(200).await.unwrap(),
        vec![span("m1", "p", 400, None)]
    );
}

async fn lease_lifecycle(e: impl Engine) {
    let s = e.open().await;
    let t1 = s.new_lease(&lease("run-1", "m1", 10)).await.unwrap();
    let t2 = s.new_lease(&lease("run-2", "m1", 11)).await.unwrap();
    assert!(t2 > t1, "tokens go up");
    let l1 = s.lease(t1).await.unwrap().unwrap();
    assert_eq!(
        (l1.state, l1.run_id.as_str(), l1.job.as_str(), l1.attempt),
        (LeaseState::Assigned, "run-1", "job-a", 1)
    );
    assert_eq!((l1.pool.as_str(), l1.machine.as_str()), ("p", "m1"));
    assert_eq!(
        (l1.assigned_ms, l1.started_ms, l1.ended_ms),
        (10, None, None)
    );
    assert_eq!(s.lease(t2 + 100).await.unwrap(), None);
    // assigned -> running, once.
    assert!(s.lease_started(t1, 20).await.unwrap());
    assert!(!s.lease_started(t1, 21).await.unwrap());
    let active: Vec<_> = s
        .active_leases()
        .await
        .unwrap()
        .into_iter()
        .map(|l| (l.token, l.state))
        .collect();
    assert_eq!(
        active,
        vec![(t1, LeaseState::Running), (t2, LeaseState::Assigned)]
    );
    // The result and the expiry sweep race: exactly one wins.
    assert!(s.lease_end(t1, LeaseEnd::Done(&exit(3)), 30).await.unwrap());
    assert!(!s
        .lease_end(t1, LeaseEnd::Revoked("late sweep"), 31)
        .await
        .unwrap());
    let l1 = s.lease(t1).await.unwrap().unwrap();
    assert_eq!(l1.state, LeaseState::Done);
    assert_eq!(l1.exit, Some(exit(3)));
    assert_eq!((l1.started_ms, l1.ended_ms), (Some(20), Some(30)));
    // Revoked before it started: started_ms becomes the end.
    assert!(s
        .lease_end(t2, LeaseEnd::Revoked("machine m1 not heard from"), 40)
        .await
        .unwrap());
    assert!(!s.lease_end(t2, LeaseEnd::Done(&exit(0)), 41).await.unwrap());
    assert!(!s.lease_started(t2, 42).await.unwrap());
    let l2 = s.lease(t2).await.unwrap().unwrap();
    assert_eq!(
        (l2.state, l2.exit.clone(), l2.reason.as_str()),
        (LeaseState::Revoked, None, "machine m1 not heard from")
    );
    assert_eq!((l2.started_ms, l2.ended_ms), (Some(40), Some(40)));
    assert!(s.active_leases().await.unwrap().is_empty());

    // The newest lease of a run is its current attempt's.
    let mut again = lease("run-2", "m2", 50);
    again.attempt = 2;
    let t3 = s.new_lease(&again).await.unwrap();
    drop(s);
    let s = e.open().await;
    let cur = s.lease_of_run("run-2").await.unwrap().unwrap();
    assert_eq!(
        (cur.token, cur.attempt, cur.machine.as_str()),
        (t3, 2, "m2")
    );
    assert_eq!(s.lease_of_run("run-9").await.unwrap(), None);
    // Leases since: not ended before `since` (active ones always).
    let since =
        |v: Vec<pubrun_store::pools::LeaseRow>| v.into_iter().map(|l| l.token).collect::<Vec<_>>();
    assert_eq!(since(s.leases_since(0).await.unwrap()), vec![t1, t2, t3]);
    assert_eq!(since(s.leases_since(35).await.unwrap()), vec![t2, t3]);
    assert_eq!(since(s.leases_since(40).await.unwrap()), vec![t3]);
}

all_engines!(
    pools_round_trip_and_keep_their_token,
    machines_upsert_list_and_delete,
    machine_names_are_never_given_out_twice,
    bootstrap_tokens_round_trip,
    cost_spans_open_close_and_since,
    lease_lifecycle,
);

/// A pool store opened under an ownership token writes while the token is
/// current; once another server took the lease over, every write is
/// refused with UNAVAILABLE naming the takeover, and writes nothing: the
/// autoscaler of the ex-owner therefore never gets to ask a provider.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_writes_under_a_stale_token_are_refused() {
    bounded(async {
        let pg = TempPostgres::start();
        let fence = |token| Some(engine_kit::fence(token));
        let lease_a = engine_kit::lease(&pg, "a").await;
        let a = PostgresPoolStore::open(&pg.url(), fence(lease_a.token()))
            .await
            .unwrap();
        a.put_pool(&pool("p", 1), None, "tok").await.unwrap();
        let m = machine("m1", "p", MachineState::Ready, 1);
        a.upsert_machine(&m).await.unwrap();
        a.span_open("m1", "p", 1).await.unwrap();
        let t = a.new_lease(&lease("run-1", "m1", 2)).await.unwrap();
        assert!(!a.is_fenced());

        // "a" stops renewing (cut off); "b" takes over with a higher token.
        lease_a.stop_renewing();
        let lease_b = engine_kit::lease(&pg, "b").await;
        assert!(lease_b.token() > lease_a.token());
        let b = PostgresPoolStore::open(&pg.url(), fence(lease_b.token()))
            .await
            .unwrap();

        let mut stopping = m.clone();
        stopping.state = MachineState::Stopping;
        let boot = Bootstrap {
            machine: "m2".into(),
            pool: "p".into(),
            token: "b".into(),
        };
        let refused = [
            a.put_pool(&pool("p", 9), None, "x").await.map(|_| ()),
            a.delete_pool("p").await,
            a.upsert_machine(&stopping).await,
            a.new_machine_name("p", "pubrun").await.map(|_| ()),
            a.delete_machine("m1").await,
            a.put_bootstrap(&boot).await,
            a.span_close("m1", 5).await,
            a.span_open("m9", "p", 5).await,
            a.new_lease(&lease("run-2", "m1", 5)).await.map(|_| ()),
            a.lease_started(t, 5).await.map(|_| ()),
            a.lease_end(t, LeaseEnd::Revoked("late"), 5)
                .await
                .map(|_| ()),
        ];
        engine_kit::assert_fenced(refused);
        assert!(a.is_fenced());
        // Nothing of it was written; reads still work on the ex-owner.
        assert_eq!(
            b.pools().await.unwrap(),
            vec![(pool("p", 1), "tok".to_string())]
        );
        assert_eq!(b.machines().await.unwrap(), vec![m.clone()]);
        assert_eq!(a.machine("m1").await.unwrap(), Some(m));
        assert!(b.bootstraps().await.unwrap().is_empty());
        assert_eq!(b.spans(0).await.unwrap(), vec![span("m1", "p", 1, None)]);
        let l = b.lease(t).await.unwrap().unwrap();
        assert_eq!(l.state, LeaseState::Assigned);
        assert_eq!(b.active_leases().await.unwrap().len(), 1);
        // The new owner carries on.
        assert_eq!(
            b.new_machine_name("p", "pubrun").await.unwrap(),
            "pubrun-p-1"
        );
        assert!(b
            .lease_end(t, LeaseEnd::Revoked("owner changed"), 6)
            .await
            .unwrap());
        drop(lease_b);
    })
    .await
}

/// A `pools.db` written by an older pubrun (no `user_version`, the
/// " [not stopped]" suffix in `last_error`) opens: its rows are kept and
/// the suffix becomes the `needs_stop` flag.
#[tokio::test]
async fn sqlite_opens_a_pools_db_of_an_older_pubrun() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pools.db");
    engine_kit::run_sql(
        &path,
        "CREATE TABLE pools (name TEXT PRIMARY KEY, spec TEXT NOT NULL, token TEXT NOT NULL);
             CREATE TABLE machines (name TEXT PRIMARY KEY, pool TEXT NOT NULL, provider TEXT NOT NULL,
                 provider_id TEXT NOT NULL DEFAULT '', state TEXT NOT NULL, state_since_ms INTEGER NOT NULL,
                 idle_since_ms INTEGER, created_ms INTEGER NOT NULL, cordoned INTEGER NOT NULL DEFAULT 0,
                 slots INTEGER NOT NULL DEFAULT 0, last_error TEXT NOT NULL DEFAULT '');
             CREATE TABLE machine_spans (id INTEGER PRIMARY KEY AUTOINCREMENT, machine TEXT NOT NULL,
                 pool TEXT NOT NULL, start_ms INTEGER NOT NULL, end_ms INTEGER);
             CREATE TABLE leases (token INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL,
                 job TEXT NOT NULL, attempt INTEGER NOT NULL, pool TEXT NOT NULL, machine TEXT NOT NULL,
                 state TEXT NOT NULL, assigned_ms INTEGER NOT NULL, started_ms INTEGER, ended_ms INTEGER,
                 exit TEXT, reason TEXT NOT NULL DEFAULT '');
             INSERT INTO machines (name, pool, provider, state, state_since_ms, created_ms, slots, last_error)
                 VALUES ('m1', 'p', 'docker', 'failed', 5, 1, 2, 'agent not heard from for 30 s [not stopped]'),
                        ('m2', 'p', 'docker', 'idle', 5, 1, 2, '');
             INSERT INTO leases (run_id, job, attempt, pool, machine, state, assigned_ms)
                 VALUES ('run-1', 'j', 1, 'p', 'm2', 'assigned', 3);",
    );
    let s = SqlitePoolStore::open(&path).await.unwrap();
    let m1 = s.machine("m1").await.unwrap().unwrap();
    assert_eq!(m1.last_error, "agent not heard from for 30 s");
    assert!(m1.needs_stop);
    assert_eq!(m1.state, MachineState::Failed);
    let m2 = s.machine("m2").await.unwrap().unwrap();
    assert!(!m2.needs_stop);
    assert_eq!(s.active_leases().await.unwrap().len(), 1);
    // Tables the old file lacked were created.
    assert!(s.bootstraps().await.unwrap().is_empty());
    assert_eq!(
        s.new_machine_name("p", "pubrun").await.unwrap(),
        "pubrun-p-1"
    );
}

/// A row the engine cannot read is an error, never a default.
#[tokio::test]
async fn sqlite_corrupt_rows_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pools.db");
    let s = SqlitePoolStore::open(&path).await.unwrap();
    s.upsert_machine(&machine("m1", "p", MachineState::Idle, 1))
        .await
        .unwrap();
    let t = s.new_lease(&lease("run-1", "m1", 2)).await.unwrap();
    drop(s);
    engine_kit::run_sql(
        &path,
        "UPDATE machines SET state = 'melted'; UPDATE leases SET state = 'lost';",
    );
    let s = SqlitePoolStore::open(&path).await.unwrap();
    let e = s.machines().await.unwrap_err();
    assert_eq!(e.code, Code::Internal, "{e}");
    let e = s.lease(t).await.unwrap_err();
    assert_eq!(e.code, Code::Internal, "{e}");
}
