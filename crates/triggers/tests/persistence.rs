//! Schedule and webhook definitions are durable and owned by a project:
//! a reopened `Triggers` (a restarted server) serves what was set, and one
//! project's replace leaves the others' definitions alone.

mod common;

use std::sync::Arc;

use common::{utc, Env};
use pubrun_core::{Code, Message};
use pubrun_triggers::{ScheduleSpec, Triggers, WebhookSpec};

const TOPIC: &str = "projects/alpha/topics/imports";
const SUB: &str = "projects/alpha/subscriptions/imports-sub";

async fn env() -> Env {
    Env::new(TOPIC, SUB, "2026-05-01T09:58:30Z").await
}

impl Env {
    async fn drain(&self) -> Vec<Arc<Message>> {
        common::pull_acked(&self.broker, SUB).await
    }
}

/// Serves the triggers' router; returns its base URL.
async fn serve(t: &Triggers) -> String {
    format!("http://{}", common::serve(t.router()).await)
}

fn names<T>(v: &[(String, T)], name: impl Fn(&T) -> &str) -> Vec<(String, String)> {
    v.iter()
        .map(|(p, s)| (p.clone(), name(s).to_string()))
        .collect()
}

#[tokio::test]
async fn definitions_survive_a_reopen_and_keep_working() {
    let e = env().await;
    let t = e.triggers().await;
    t.set_project_schedules(
        "alpha",
        vec![ScheduleSpec::new("every-minute", "* * * * *", TOPIC)],
    )
    .await
    .unwrap();
    t.set_project_webhooks("alpha", vec![WebhookSpec::new("start-import", TOPIC)])
        .await
        .unwrap();
    drop(t);

    // "Restart": nothing is set again; the stored definitions are served.
    let t = e.triggers().await;
    assert_eq!(common::schedule_names(&t).await, ["every-minute"]);
    assert_eq!(
        names(&t.webhook_definitions().await.unwrap(), |w| &w.name),
        [("alpha".to_string(), "start-import".to_string())]
    );
    let h = t.spawn();
    let tick = utc("2026-05-01T09:59:00Z");
    e.clock.set(tick);
    common::evaluated(&t, tick).await;
    let fired = e.drain().await;
    assert_eq!(fired.len(), 1, "{fired:?}");
    assert_eq!(fired[0].attributes["schedule"], "every-minute");
    assert_eq!(fired[0].attributes["scheduledTime"], "2026-05-01T09:59:00Z");

    let base = serve(&t).await;
    let r = reqwest::Client::new()
        .post(format!("{base}/hooks/start-import"))
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let got = e.drain().await;
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].data[..], b"hello");
    t.stop();
    h.await.unwrap();
}

#[tokio::test]
async fn a_project_replaces_only_its_own_definitions() {
    let e = env().await;
    let t = e.triggers().await;
    t.set_project_schedules(
        "alpha",
        vec![ScheduleSpec::new("a-nightly", "0 3 * * *", TOPIC)],
    )
    .await
    .unwrap();
    t.set_project_webhooks("alpha", vec![WebhookSpec::new("a-hook", TOPIC)])
        .await
        .unwrap();
    t.set_project_schedules(
        "beta",
        vec![ScheduleSpec::new("b-nightly", "0 4 * * *", TOPIC)],
    )
    .await
    .unwrap();
    t.set_project_webhooks("beta", vec![]).await.unwrap();
    let pair = |p: &str, n: &str| (p.to_string(), n.to_string());
    assert_eq!(
        names(&t.scheduler().definitions().await.unwrap(), |s| &s.name),
        [pair("alpha", "a-nightly"), pair("beta", "b-nightly")]
    );
    assert_eq!(
        names(&t.webhook_definitions().await.unwrap(), |w| &w.name),
        [pair("alpha", "a-hook")]
    );

    // Names are server-wide: beta cannot take alpha's, and nothing changes.
    let err = t
        .set_project_schedules(
            "beta",
            vec![ScheduleSpec::new("a-nightly", "0 5 * * *", TOPIC)],
        )
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::FailedPrecondition, "{}", err.message);
    assert!(err.message.contains("alpha"), "{}", err.message);
    let err = t
        .set_project_webhooks("beta", vec![WebhookSpec::new("a-hook", TOPIC)])
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::FailedPrecondition, "{}", err.message);
    assert_eq!(
        names(&t.scheduler().definitions().await.unwrap(), |s| &s.name),
        [pair("alpha", "a-nightly"), pair("beta", "b-nightly")]
    );
    assert_eq!(t.list_schedules().await.unwrap().len(), 2);

    // A project's empty set deletes its own, only.
    t.set_project_schedules("alpha", vec![]).await.unwrap();
    drop(t);
    let t = e.triggers().await;
    assert_eq!(
        names(&t.scheduler().definitions().await.unwrap(), |s| &s.name),
        [pair("beta", "b-nightly")]
    );
    assert_eq!(t.list_webhooks().len(), 1);
}

#[tokio::test]
async fn a_stored_hook_whose_secret_is_unset_at_start_refuses_everything() {
    let e = env().await;
    let t = e.triggers().await;
    let mut spec = WebhookSpec::new("signed", TOPIC);
    spec.bearer_secret_env = Some("PUBRUN_TEST_SECRET_NOT_SET_IN_THIS_PROCESS".into());
    t.set_webhooks_with_env(vec![spec], &|_| Some("s3cret".into()))
        .await
        .unwrap();
    drop(t);
    // The process environment does not have the variable: the hook is still
    // known (not 404) but never publishes, with or without credentials.
    let t = e.triggers().await;
    let base = serve(&t).await;
    let http = reqwest::Client::new();
    for auth in [None, Some("Bearer s3cret"), Some("Bearer ")] {
        let mut req = http.post(format!("{base}/hooks/signed")).body("x");
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 503, "{auth:?}");
        let body = r.text().await.unwrap();
        assert!(
            body.contains("PUBRUN_TEST_SECRET_NOT_SET_IN_THIS_PROCESS") && !body.contains("s3cret"),
            "{body}"
        );
    }
    assert!(e.drain().await.is_empty());
}
