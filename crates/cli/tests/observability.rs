//! What an operator sees of a real `pubrun serve`: `/metrics` parsed with a
//! Prometheus text parser and checked against what the test did, and JSON
//! logs with one line per run transition and no secret in them.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::ServeBuilder;
use prometheus_parse::{Scrape, Value};
use serde_json::{json, Value as Json};

const PATIENCE: Duration = Duration::from_secs(60);
const TOKEN: &str = "server-token-7f3a9c2e51";
const METRICS_TOKEN: &str = "scrape-token-0b8d4e6a19";
const SECRET: &str = "job-secret-value-5e2c81";
const DATA_CANARY: &str = "message-data-canary-94d1";

/// `watch` is a subscription nobody pulls (its backlog is what was
/// published); `work` runs a job that exits with the code in the data.
const MANIFEST: &str = include_str!("manifests/observability.toml");

/// The harness's server and one HTTP client for all requests.
type Server = common::HttpServe;

impl Server {
    fn start() -> Server {
        let serve = ServeBuilder::new()
            .config(MANIFEST)
            .args(["--log-format", "json"])
            .env("PUBRUN_TOKEN", TOKEN)
            .env("PUBRUN_METRICS_TOKEN", METRICS_TOKEN)
            .env("OBS_TEST_SECRET", SECRET)
            // Debug too: access logs must not leak either.
            .log_level("debug")
            .patience(PATIENCE)
            .start();
        Server {
            serve,
            http: reqwest::Client::new(),
            dir: None,
        }
    }

    async fn post(&self, path: &str, body: Json) -> Json {
        let req = self
            .http
            .post(self.url(path))
            .bearer_auth(TOKEN)
            .json(&body);
        common::ok_json(req, &format!("POST {path}")).await
    }

    async fn publish(&self, topic: &str, messages: Vec<Json>) {
        self.post(
            &format!("/v1/projects/demo/topics/{topic}:publish"),
            json!({ "messages": messages }),
        )
        .await;
    }

    /// Runs of `job` once `n` of them have ended.
    async fn wait_runs_ended(&self, job: &str, n: usize) -> Vec<Json> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let v: Json = common::json_reply(
                self.http
                    .get(self.url(&format!("/api/v1/runs?job={job}")))
                    .bearer_auth(TOKEN),
            )
            .await;
            let runs = v["runs"].as_array().cloned().unwrap_or_default();
            let ended = runs
                .iter()
                .filter(|r| {
                    matches!(
                        r["status"].as_str(),
                        Some("succeeded" | "failed" | "timed_out" | "cancelled")
                    ) && !r["ended_at_ms"].is_null()
                })
                .count();
            if ended >= n {
                return runs;
            }
            assert!(
                Instant::now() < deadline,
                "{ended} of {n} runs ended: {runs:?}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn scrape(&self, token: Option<&str>) -> reqwest::Response {
        let mut req = self.http.get(self.url("/metrics"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send().await.unwrap()
    }

    async fn metrics(&self) -> Metrics {
        let resp = self.scrape(Some(METRICS_TOKEN)).await;
        assert_eq!(resp.status(), 200);
        let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
        assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
        let text = resp.text().await.unwrap();
        let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
        Metrics { scrape, text }
    }
}

struct Metrics {
    scrape: Scrape,
    text: String,
}

impl Metrics {
    /// The value of the one sample of `name` whose labels include `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<f64> = self
            .scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .filter_map(|s| match &s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(*v),
                _ => None,
            })
            .collect();
        assert_eq!(
            found.len(),
            1,
            "{name}{labels:?}: {found:?} in\n{}",
            self.text
        );
        found[0]
    }

    /// Observations of histogram `name` (its `+Inf` bucket).
    fn histogram_count(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .find_map(|s| match &s.value {
                Value::Histogram(b) => b
                    .iter()
                    .find(|c| c.less_than.is_infinite())
                    .map(|c| c.count),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no histogram {name}{labels:?} in\n{}", self.text))
    }
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

const EVENTS: usize = 7;
const SUB: &str = "projects/demo/subscriptions/watch";

/// Publishes EVENTS messages to `events` and runs `work` three times (two
/// succeed, one fails).
async fn drive(s: &Server) {
    let events = (0..EVENTS)
        .map(|i| json!({ "data": b64(&format!("{DATA_CANARY} {i}")) }))
        .collect();
    s.publish("events", events).await;
    let work = [0, 0, 3]
        .iter()
        .map(|code| json!({ "data": b64(&format!("{{\"code\": {code}, \"note\": \"{DATA_CANARY}\"}}")) }))
        .collect();
    s.publish("work", work).await;
    s.wait_runs_ended("work", 3).await;
}

#[tokio::test]
async fn metrics_match_what_was_done() {
    let s = Server::start();
    drive(&s).await;

    // Auth: the metrics token opens /metrics and nothing else; the server
    // token opens it too; no token, nothing.
    assert_eq!(s.scrape(None).await.status(), 401);
    assert_eq!(s.scrape(Some("wrong")).await.status(), 401);
    assert_eq!(s.scrape(Some(TOKEN)).await.status(), 200);
    let jobs = s
        .http
        .get(s.url("/api/v1/jobs"))
        .bearer_auth(METRICS_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(
        jobs.status(),
        401,
        "the metrics token must not open the API"
    );

    let m = s.metrics().await;
    let topic = |t: &str| format!("projects/demo/topics/{t}");
    assert_eq!(
        m.value(
            "pubrun_messages_published_total",
            &[("topic", &topic("events"))]
        ),
        EVENTS as f64
    );
    assert_eq!(
        m.value(
            "pubrun_messages_published_total",
            &[("topic", &topic("work"))]
        ),
        3.0
    );
    let runs = |status| m.value("pubrun_runs_total", &[("job", "work"), ("status", status)]);
    assert_eq!(runs("succeeded"), 2.0);
    assert_eq!(runs("failed"), 1.0);
    assert_eq!(
        m.histogram_count("pubrun_run_duration_seconds", &[("job", "work")]),
        3.0
    );
    assert_eq!(
        m.histogram_count("pubrun_run_queue_wait_seconds", &[("job", "work")]),
        3.0
    );
    assert_eq!(
        m.value(
            "pubrun_subscription_backlog_messages",
            &[("subscription", SUB)]
        ),
        EVENTS as f64
    );
    // The job's own subscription: every message was queued and acked.
    let job_sub = "projects/demo/subscriptions/pubrun-job-work";
    assert_eq!(
        m.value(
            "pubrun_subscription_backlog_messages",
            &[("subscription", job_sub)]
        ),
        0.0
    );
    assert_eq!(
        m.value("pubrun_messages_acked_total", &[("subscription", job_sub)]),
        3.0
    );
    assert!(
        m.value(
            "pubrun_subscription_oldest_unacked_age_seconds",
            &[("subscription", SUB)]
        ) > 0.0
    );
    assert_eq!(
        m.value(
            "pubrun_subscription_oldest_unacked_age_seconds",
            &[("subscription", job_sub)]
        ),
        0.0
    );
    assert_eq!(m.value("pubrun_runs_waiting", &[("pool", "local")]), 0.0);
    // Every publish and ack was made durable by at least one sync.
    assert!(m.histogram_count("pubrun_store_sync_seconds", &[]) >= 2.0);

    // Pull and ack 3 of `watch`: the gauges follow the unacked count.
    let pulled = s
        .post(
            &format!("/v1/{SUB}:pull"),
            json!({ "maxMessages": 3, "returnImmediately": false }),
        )
        .await;
    let ack_ids: Vec<Json> = common::array(&pulled, "receivedMessages")
        .iter()
        .map(|r| r["ackId"].clone())
        .collect();
    assert!(!ack_ids.is_empty());
    s.post(
        &format!("/v1/{SUB}:acknowledge"),
        json!({ "ackIds": ack_ids }),
    )
    .await;
    let m = s.metrics().await;
    assert_eq!(
        m.value(
            "pubrun_subscription_backlog_messages",
            &[("subscription", SUB)]
        ),
        (EVENTS - ack_ids.len()) as f64
    );
    assert_eq!(
        m.value("pubrun_messages_acked_total", &[("subscription", SUB)]),
        ack_ids.len() as f64
    );
}

#[tokio::test]
async fn json_logs_show_run_transitions_and_no_secrets() {
    let s = Server::start();
    drive(&s).await;
    // A request with a wrong token is logged too (debug access log),
    // without the token it carried.
    let _ = s.scrape(Some("not-a-token-3c9e")).await;
    s.metrics().await;

    let text = s.log();
    let lines: Vec<Json> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect();
    let runs = |msg: &str| -> Vec<&Json> {
        lines
            .iter()
            .filter(|l| l["message"] == msg && l["job"] == "work")
            .collect()
    };
    let queued = runs("run queued");
    let started = runs("run started");
    let ended = runs("run ended");
    assert_eq!(queued.len(), 3, "{text}");
    assert_eq!(started.len(), 3, "{text}");
    assert_eq!(ended.len(), 3, "{text}");
    for l in queued.iter().chain(&started).chain(&ended) {
        assert!(l["run_id"].is_i64(), "{l}");
        assert_eq!(l["level"], "INFO", "{l}");
        assert!(l["status"].is_string(), "{l}");
    }
    assert!(started.iter().all(|l| l["machine"].is_string()), "{text}");
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    for l in &ended {
        *by_status
            .entry(l["status"].as_str().unwrap().into())
            .or_default() += 1;
        assert!(l["attempt"] == 1 && l["duration_s"].is_f64(), "{l}");
    }
    assert_eq!(by_status["succeeded"], 2, "{text}");
    assert_eq!(by_status["failed"], 1, "{text}");
    assert!(ended.iter().any(|l| l["exit_code"] == 3), "{text}");
    // Applying the manifest at start: one line per resource created.
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "manifest change applied"
                && l["kind"] == "job"
                && l["name"] == "work"),
        "{text}"
    );
    // Access logs at debug: path and status, never the query or a token.
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "request" && l["path"] == "/metrics" && l["status"] == 401),
        "{text}"
    );
    for secret in [
        TOKEN,
        METRICS_TOKEN,
        SECRET,
        DATA_CANARY,
        "not-a-token-3c9e",
    ] {
        assert!(
            !text.contains(secret),
            "{secret} appears in the log:\n{text}"
        );
    }
}
