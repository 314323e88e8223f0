//! The scheduler over a real broker and a manual clock: no test waits for
//! wall-clock minutes.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{utc, Env};
use pubrun_broker::Broker;
use pubrun_core::{Message, SubscriptionName};
use pubrun_store::EmbeddedStore;
use pubrun_triggers::db::{SqliteTriggerStore, TickClaim, TriggerStore};
use pubrun_triggers::{MissedPolicy, ScheduleSpec, Triggers};

const TOPIC: &str = "projects/demo/topics/imports";
const SUB: &str = "projects/demo/subscriptions/imports-sub";

async fn env(start: &str) -> Env {
    Env::new(TOPIC, SUB, start).await
}

impl Env {
    /// Triggers with the one schedule most tests use: "hourly", at minute 0, UTC.
    async fn hourly(&self) -> Arc<Triggers> {
        let t = self.triggers().await;
        t.set_schedules(vec![spec("hourly", "0 * * * *", "UTC")])
            .await
            .unwrap();
        t
    }

    /// Moves the clock and waits until every given scheduler has evaluated
    /// (and published) at the new time.
    async fn set(&self, t: &str, triggers: &[&Arc<Triggers>]) {
        let t = utc(t);
        self.clock.set(t);
        for tr in triggers {
            common::evaluated(tr, t).await;
        }
    }

    /// Every message published so far (and acks them).
    async fn drain(&self) -> Vec<Arc<Message>> {
        let sub = SubscriptionName::parse(SUB).unwrap();
        let mut out = Vec::new();
        loop {
            let got = self.broker.pull(&sub, 100, None).await.unwrap();
            if got.is_empty() {
                break;
            }
            let ids: Vec<String> = got.iter().map(|d| d.ack_id.clone()).collect();
            self.broker.acknowledge(&sub, &ids).await.unwrap();
            out.extend(got.into_iter().map(|d| d.message));
        }
        out.sort_by_key(|m| m.seq);
        out
    }

    async fn fired(&self) -> Vec<String> {
        self.drain()
            .await
            .iter()
            .map(|m| m.attributes["scheduledTime"].clone())
            .collect()
    }

    /// "schedule scheduledTime" of every message published so far.
    async fn fired_labels(&self) -> Vec<String> {
        self.drain()
            .await
            .iter()
            .map(|m| {
                format!(
                    "{} {}",
                    m.attributes["schedule"], m.attributes["scheduledTime"]
                )
            })
            .collect()
    }

    /// Walks the clock from `from` to `to` (inclusive) in `step_min`-minute
    /// steps, collecting what fired at each step.
    async fn walk(&self, t: &Arc<Triggers>, from: &str, to: &str, step_min: i64) -> Vec<String> {
        let mut fired = Vec::new();
        let mut now = utc(from);
        while now <= utc(to) {
            self.set(&now.to_rfc3339(), &[t]).await;
            fired.extend(self.fired_labels().await);
            now += chrono::TimeDelta::minutes(step_min);
        }
        fired
    }
}

/// A nightly 02:30 and a half-hourly schedule in Berlin, for the DST tests.
async fn berlin_night(e: &Env) -> Arc<Triggers> {
    let t = e.triggers().await;
    t.set_schedules(vec![
        spec("nightly", "30 2 * * *", "Europe/Berlin"),
        spec("half-hourly", "*/30 * * * *", "Europe/Berlin"),
    ])
    .await
    .unwrap();
    t
}

fn spec(name: &str, cron: &str, tz: &str) -> ScheduleSpec {
    let mut s = ScheduleSpec::new(name, cron, TOPIC);
    s.time_zone = tz.into();
    s.data = r#"{"full": true}"#.into();
    s.attributes.insert("kind".into(), "import".into());
    s
}

#[tokio::test]
async fn fires_exactly_at_ticks() {
    let e = env("2026-05-01T09:58:00Z").await;
    let t = e.hourly().await;
    let _h = t.spawn();
    e.set("2026-05-01T09:58:00Z", &[&t]).await;
    e.set("2026-05-01T09:59:59Z", &[&t]).await;
    assert!(e.drain().await.is_empty());

    e.set("2026-05-01T10:00:00Z", &[&t]).await;
    let msgs = e.drain().await;
    assert_eq!(msgs.len(), 1);
    let m = &msgs[0];
    assert_eq!(&m.data[..], br#"{"full": true}"#);
    assert_eq!(m.attributes["schedule"], "hourly");
    assert_eq!(m.attributes["scheduledTime"], "2026-05-01T10:00:00Z");
    assert_eq!(m.attributes["kind"], "import");
    assert!(!m.attributes.contains_key("runNow"));

    e.set("2026-05-01T10:00:30Z", &[&t]).await;
    e.set("2026-05-01T10:59:00Z", &[&t]).await;
    assert!(e.drain().await.is_empty());
    e.set("2026-05-01T11:00:00Z", &[&t]).await;
    e.set("2026-05-01T11:00:01Z", &[&t]).await;
    assert_eq!(e.fired().await, ["2026-05-01T11:00:00Z"]);

    let list = t.list_schedules().await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(
        list[0].last_fire_time.as_deref(),
        Some("2026-05-01T11:00:00Z")
    );
    assert_eq!(
        list[0].next_fire_time.as_deref(),
        Some("2026-05-01T12:00:00Z")
    );
    assert!(list[0].last_message_id.is_some());
    assert_eq!(list[0].pending_tick, None);
    t.stop();
}

#[tokio::test]
async fn dst_spring_forward_berlin() {
    // 2026-03-29: 02:00 CET jumps to 03:00 CEST. "30 2 * * *" fires right
    // after the gap, at 03:00 CEST = 01:00 UTC; on normal days at 02:30.
    let e = env("2026-03-28T12:00:00Z").await;
    let t = berlin_night(&e).await;
    let _h = t.spawn();
    e.set("2026-03-28T12:00:00Z", &[&t]).await;
    e.drain().await;
    // Walk through the night in 10-minute steps, collecting (schedule, time).
    let fired = e
        .walk(&t, "2026-03-29T00:00:00Z", "2026-03-29T02:00:00Z", 10)
        .await;
    assert_eq!(
        fired,
        [
            // 01:00 CET
            "half-hourly 2026-03-29T00:00:00Z",
            // 01:30 CET
            "half-hourly 2026-03-29T00:30:00Z",
            // 03:00 CEST: the first instant after the gap
            "half-hourly 2026-03-29T01:00:00Z",
            "nightly 2026-03-29T01:00:00Z",
            "half-hourly 2026-03-29T01:30:00Z",
            "half-hourly 2026-03-29T02:00:00Z",
        ]
    );
    // The next night is normal again: 02:30 CEST = 00:30 UTC.
    e.set("2026-03-30T00:29:59Z", &[&t]).await;
    e.drain().await;
    e.set("2026-03-30T00:30:00Z", &[&t]).await;
    assert_eq!(
        e.fired_labels().await,
        [
            "half-hourly 2026-03-30T00:30:00Z",
            "nightly 2026-03-30T00:30:00Z"
        ]
    );
    t.stop();
}

#[tokio::test]
async fn dst_fall_back_berlin() {
    // 2026-10-25: 03:00 CEST falls back to 02:00 CET; 02:00–02:59 happens
    // twice. "30 2 * * *" fires once (first pass); "*/30" fires in both.
    let e = env("2026-10-24T12:00:00Z").await;
    let t = berlin_night(&e).await;
    let _h = t.spawn();
    e.set("2026-10-24T12:00:00Z", &[&t]).await;
    e.set("2026-10-24T23:50:00Z", &[&t]).await;
    e.drain().await;
    let fired = e
        .walk(&t, "2026-10-25T00:00:00Z", "2026-10-25T02:00:00Z", 15)
        .await;
    assert_eq!(
        fired,
        [
            "half-hourly 2026-10-25T00:00:00Z", // 02:00 CEST
            "half-hourly 2026-10-25T00:30:00Z", // 02:30 CEST
            "nightly 2026-10-25T00:30:00Z",     // 02:30 CEST, once
            "half-hourly 2026-10-25T01:00:00Z", // 02:00 CET
            "half-hourly 2026-10-25T01:30:00Z", // 02:30 CET (nightly does not fire again)
            "half-hourly 2026-10-25T02:00:00Z", // 03:00 CET
        ]
    );
    t.stop();
}

/// Runs an hourly schedule until 10:00, stops it, "is down" until 15:20,
/// restarts, and returns what fired at the restart and at 16:00.
async fn downtime(missed: MissedPolicy, restart_at: &str) -> (Vec<String>, Vec<String>) {
    let e = env("2026-05-01T09:30:00Z").await;
    let mut s = spec("hourly", "0 * * * *", "UTC");
    s.missed = missed;
    let t = e.triggers().await;
    t.set_schedules(vec![s.clone()]).await.unwrap();
    let h = t.spawn();
    e.set("2026-05-01T09:30:00Z", &[&t]).await;
    e.set("2026-05-01T10:00:00Z", &[&t]).await;
    assert_eq!(e.fired().await, ["2026-05-01T10:00:00Z"]);
    t.stop();
    h.await.unwrap();
    drop(t);

    // Down: the clock moves five hours with no scheduler.
    e.clock.set(utc(restart_at));
    let t = e.triggers().await;
    t.set_schedules(vec![s]).await.unwrap();
    let _h = t.spawn();
    e.set(restart_at, &[&t]).await;
    let at_restart = e.fired().await;
    e.set("2026-05-01T16:00:00Z", &[&t]).await;
    let later = e.fired().await;
    t.stop();
    (at_restart, later)
}

#[tokio::test]
async fn missed_run_once_fires_once_after_downtime() {
    let (at_restart, later) = downtime(MissedPolicy::default(), "2026-05-01T15:20:00Z").await;
    // 11:00 … 15:00 were missed: one message, for the latest of them.
    assert_eq!(at_restart, ["2026-05-01T15:00:00Z"]);
    assert_eq!(later, ["2026-05-01T16:00:00Z"]);
}

#[tokio::test]
async fn missed_run_once_respects_max_age() {
    let policy = MissedPolicy::RunOnce {
        max_age: Duration::from_secs(30 * 60),
    };
    let (at_restart, later) = downtime(policy, "2026-05-01T15:40:00Z").await;
    assert!(
        at_restart.is_empty(),
        "15:00 is 40 min old, max_age 30 min: {at_restart:?}"
    );
    assert_eq!(later, ["2026-05-01T16:00:00Z"]);
}

#[tokio::test]
async fn missed_skip_fires_nothing_after_downtime() {
    let (at_restart, later) = downtime(MissedPolicy::Skip, "2026-05-01T15:20:00Z").await;
    assert!(at_restart.is_empty(), "{at_restart:?}");
    assert_eq!(later, ["2026-05-01T16:00:00Z"]);
}

#[tokio::test]
async fn pause_resume_run_now() {
    let e = env("2026-05-01T09:30:00Z").await;
    let t = e.hourly().await;
    let h = t.spawn();
    e.set("2026-05-01T10:00:00Z", &[&t]).await;
    assert_eq!(e.fired().await, ["2026-05-01T10:00:00Z"]);

    let st = t.pause("hourly").await.unwrap();
    assert!(st.paused);
    assert_eq!(st.next_fire_time, None);
    e.set("2026-05-01T11:00:00Z", &[&t]).await;
    e.set("2026-05-01T12:00:00Z", &[&t]).await;
    assert!(e.drain().await.is_empty(), "paused: nothing fires");

    // Run-now publishes even while paused, marked as such.
    e.clock.set(utc("2026-05-01T12:10:00.250Z"));
    let id = t.run_now("hourly").await.unwrap();
    let msgs = e.drain().await;
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].id(), id);
    assert_eq!(msgs[0].attributes["runNow"], "true");
    assert_eq!(
        msgs[0].attributes["scheduledTime"],
        "2026-05-01T12:10:00.250Z"
    );
    assert_eq!(
        t.list_schedules().await.unwrap()[0]
            .last_message_id
            .as_deref(),
        Some(id.as_str())
    );

    // The pause survives a restart and a re-apply of the same declaration.
    t.stop();
    h.await.unwrap();
    drop(t);
    let t = e.hourly().await;
    assert!(t.list_schedules().await.unwrap()[0].paused);
    let _h = t.spawn();
    e.set("2026-05-01T12:30:00Z", &[&t]).await;

    // Resume: ticks missed while paused are not caught up.
    let st = t.resume("hourly").await.unwrap();
    assert!(!st.paused);
    assert_eq!(st.next_fire_time.as_deref(), Some("2026-05-01T13:00:00Z"));
    e.set("2026-05-01T12:30:01Z", &[&t]).await;
    assert!(e.drain().await.is_empty());
    e.set("2026-05-01T13:00:00Z", &[&t]).await;
    assert_eq!(e.fired().await, ["2026-05-01T13:00:00Z"]);

    assert_eq!(
        t.pause("nope").await.unwrap_err().code,
        pubrun_core::Code::NotFound
    );
    assert_eq!(
        t.run_now("nope").await.unwrap_err().code,
        pubrun_core::Code::NotFound
    );
    t.stop();
}

#[tokio::test]
async fn declared_paused_starts_paused_and_wins_when_changed() {
    let e = env("2026-05-01T09:30:00Z").await;
    let t = e.triggers().await;
    let mut s = spec("hourly", "0 * * * *", "UTC");
    s.paused = true;
    t.set_schedules(vec![s.clone()]).await.unwrap();
    let _h = t.spawn();
    e.set("2026-05-01T10:00:00Z", &[&t]).await;
    assert!(e.drain().await.is_empty());
    s.paused = false;
    t.set_schedules(vec![s]).await.unwrap();
    e.set("2026-05-01T10:00:01Z", &[&t]).await;
    assert!(
        e.drain().await.is_empty(),
        "the 10:00 tick passed while paused"
    );
    e.set("2026-05-01T11:00:00Z", &[&t]).await;
    assert_eq!(e.fired().await, ["2026-05-01T11:00:00Z"]);
    // A removed schedule stops.
    t.set_schedules(vec![]).await.unwrap();
    e.set("2026-05-01T12:00:00Z", &[&t]).await;
    assert!(e.drain().await.is_empty());
    assert!(t.list_schedules().await.unwrap().is_empty());
    t.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_schedulers_on_one_database_fire_each_tick_once() {
    let e = env("2026-05-01T09:30:00Z").await;
    let (a, b) = (e.triggers().await, e.triggers().await);
    for t in [&a, &b] {
        t.set_schedules(vec![spec("every-minute", "* * * * *", "UTC")])
            .await
            .unwrap();
    }
    let _ha = a.spawn();
    let _hb = b.spawn();
    let mut now = utc("2026-05-01T09:30:00Z");
    let mut expected = Vec::new();
    for _ in 0..30 {
        now += chrono::TimeDelta::minutes(1);
        expected.push(pubrun_triggers::format_time(now));
        e.set(&now.to_rfc3339(), &[&a, &b]).await;
    }
    assert_eq!(e.fired().await, expected);
    a.stop();
    b.stop();
}

#[tokio::test]
async fn failed_publish_stays_claimed_and_is_retried() {
    // The topic does not exist yet: the claimed tick stays pending.
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(Arc::new(
        EmbeddedStore::open(dir.path().join("broker")).unwrap(),
    ))
    .unwrap();
    let e = Env::with(dir, broker, "2026-05-01T09:30:00Z");
    let t = e.hourly().await;
    let _h = t.spawn();
    e.set("2026-05-01T10:00:00Z", &[&t]).await;
    let st = &t.list_schedules().await.unwrap()[0];
    assert_eq!(st.pending_tick.as_deref(), Some("2026-05-01T10:00:00Z"));
    assert!(
        st.last_error.as_deref().unwrap().contains("not found"),
        "{st:?}"
    );

    common::create_topic(&e.broker, TOPIC, SUB).await;
    // Within the claim lease nothing is retried…
    e.set("2026-05-01T10:00:30Z", &[&t]).await;
    assert!(e.drain().await.is_empty());
    // …after it, the tick is published with its original scheduled time.
    e.set("2026-05-01T10:01:00Z", &[&t]).await;
    assert_eq!(e.fired().await, ["2026-05-01T10:00:00Z"]);
    let st = &t.list_schedules().await.unwrap()[0];
    assert_eq!(st.pending_tick, None);
    assert_eq!(st.last_error, None);
    assert_eq!(st.last_fire_time.as_deref(), Some("2026-05-01T10:00:00Z"));
    t.stop();
}

#[tokio::test]
async fn crash_between_claim_and_publish_publishes_once_after_the_lease() {
    let e = env("2026-05-01T09:30:00Z").await;
    drop(e.hourly().await);
    // Another server claimed 10:00 and died before publishing.
    let db = SqliteTriggerStore::open(&e.data.join("triggers.db")).unwrap();
    let cursor = db.get("hourly").await.unwrap().unwrap().cursor;
    let dead = TickClaim {
        name: "hourly",
        tick: utc("2026-05-01T10:00:00Z"),
        owner: "dead-server",
        now: utc("2026-05-01T10:00:00Z"),
    };
    assert!(db.claim(dead, cursor).await.unwrap());

    let t = e.hourly().await;
    let _h = t.spawn();
    e.set("2026-05-01T10:00:20Z", &[&t]).await;
    assert!(
        e.drain().await.is_empty(),
        "the claim is still within its lease"
    );
    e.set("2026-05-01T10:01:00Z", &[&t]).await;
    assert_eq!(e.fired().await, ["2026-05-01T10:00:00Z"]);
    e.set("2026-05-01T10:05:00Z", &[&t]).await;
    assert!(e.drain().await.is_empty());
    t.stop();
}

#[tokio::test]
async fn bad_specs_are_rejected_whole() {
    let e = env("2026-05-01T09:30:00Z").await;
    let t = e.triggers().await;
    t.set_schedules(vec![spec("ok", "0 * * * *", "UTC")])
        .await
        .unwrap();
    let err = t
        .set_schedules(vec![
            spec("ok", "0 * * * *", "UTC"),
            spec("bad", "0 3 * *", "UTC"),
        ])
        .await
        .unwrap_err();
    assert!(
        err.message.contains("schedule \"bad\"") && err.message.contains("cron"),
        "{}",
        err.message
    );
    let err = t
        .set_schedules(vec![spec("tz", "0 3 * * *", "Europe/Berln")])
        .await
        .unwrap_err();
    assert!(err.message.contains("Europe/Berln"), "{}", err.message);
    let err = t
        .set_schedules(vec![
            spec("d", "0 3 * * *", "UTC"),
            spec("d", "0 4 * * *", "UTC"),
        ])
        .await
        .unwrap_err();
    assert!(err.message.contains("declared twice"));
    assert_eq!(common::schedule_names(&t).await, ["ok"]);
}

#[tokio::test]
async fn schedules_rest_api() {
    let e = env("2026-05-01T09:30:00Z").await;
    let t = e.triggers().await;
    t.set_schedules(vec![spec("hourly", "0 * * * *", "Europe/Berlin")])
        .await
        .unwrap();
    let base = format!("http://{}", common::serve(t.router()).await);
    let http = reqwest::Client::new();
    // One request to `{base}/api/v1/schedules{path}`: its status and JSON body.
    let call = |method: reqwest::Method, path: &str| {
        let req = http.request(method, format!("{base}/api/v1/schedules{path}"));
        async move {
            let r = req.send().await.unwrap();
            let status = r.status();
            let v: serde_json::Value = r.json().await.unwrap();
            (status, v)
        }
    };
    let (get, post) = (reqwest::Method::GET, reqwest::Method::POST);

    let (_, v) = call(get.clone(), "").await;
    let s = &v["schedules"][0];
    assert_eq!(s["name"], "hourly");
    assert_eq!(s["cron"], "0 * * * *");
    assert_eq!(s["timeZone"], "Europe/Berlin");
    assert_eq!(s["topic"], TOPIC);
    assert_eq!(s["paused"], false);
    assert_eq!(s["missed"], "run_once");
    assert_eq!(s["missedMaxAge"], "1day");
    assert_eq!(s["nextFireTime"], "2026-05-01T10:00:00Z");

    let (status, v) = call(post.clone(), "/hourly/pause").await;
    assert_eq!(status, 200);
    assert_eq!(v["schedule"]["paused"], true);
    assert!(v["schedule"].get("nextFireTime").is_none());

    let (status, v) = call(post.clone(), "/hourly/run-now").await;
    assert_eq!(status, 200);
    let id = v["messageId"].as_str().unwrap().to_string();
    let msgs = e.drain().await;
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].id(), id);

    let (_, v) = call(post.clone(), "/hourly/resume").await;
    assert_eq!(v["schedule"]["paused"], false);

    let (status, _) = call(get, "/hourly").await;
    assert_eq!(status, 200);

    let (status, v) = call(post, "/nope/pause").await;
    assert_eq!(status, 404);
    assert_eq!(v["error"]["code"], 404);
    assert_eq!(v["error"]["status"], "NOT_FOUND");
    assert!(v["error"]["message"].as_str().unwrap().contains("nope"));
}
