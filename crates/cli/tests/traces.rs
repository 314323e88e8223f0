//! OpenTelemetry traces of a real `pubrun serve`, received by an OTLP/HTTP
//! receiver in the test: a message published with a `googclient_traceparent`
//! attribute continues that trace through publish, delivery, run and
//! attempt; the job sees `TRACEPARENT` of its attempt; the result message
//! carries the run's context. Without an endpoint nothing is exported.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use common::{fill, ServeBuilder};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use serde_json::{json, Value as Json};

const PATIENCE: Duration = Duration::from_secs(60);
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN: &str = "00f067aa0ba902b7";
const SECRET: &str = "trace-test-secret-value-71c3";

#[derive(Default)]
struct Received {
    requests: usize,
    spans: Vec<(String, Span)>,
}

/// An OTLP/HTTP trace receiver on a free port: every span with the
/// `service.name` of its resource.
async fn receiver() -> (u16, Arc<Mutex<Received>>) {
    let got = Arc::new(Mutex::new(Received::default()));
    async fn traces(State(got): State<Arc<Mutex<Received>>>, body: Bytes) -> Vec<u8> {
        let req = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf body");
        let mut g = got.lock().unwrap();
        g.requests += 1;
        for rs in req.resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref())
                .map(|v| format!("{:?}", v.value))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    g.spans.push((service.clone(), s));
                }
            }
        }
        // An empty ExportTraceServiceResponse.
        Vec::new()
    }
    let app = axum::Router::new()
        .route("/v1/traces", post(traces))
        .with_state(got.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (port, got)
}

fn manifest(dir: &Path) -> String {
    let out = dir.join("traceparent.txt");
    fill(
        include_str!("manifests/traces.toml"),
        &[("out", &out.display())],
    )
}

/// The harness's server (its dir is this test's: the manifest names files
/// in it) and one HTTP client for all requests.
type Server = common::HttpServe;

impl Server {
    /// With `--otlp-endpoint` to the receiver on `otlp` when `flag`, else
    /// only the signal-specific variable, which the exporter would honour if
    /// one were built: none must be.
    fn start(flag: bool, otlp: u16) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let mut b = ServeBuilder::new()
            .dir(dir.path())
            .config(manifest(dir.path()))
            .env("TRACE_TEST_SECRET", SECRET)
            // Info, the default: the log must not say it exports traces.
            .log_level("info")
            // Export every 100 ms: the test polls the receiver.
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .env_remove("OTEL_SERVICE_NAME")
            .patience(PATIENCE);
        if flag {
            b = b.args(["--otlp-endpoint", &format!("http://127.0.0.1:{otlp}")]);
        } else {
            b = b.env(
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                format!("http://127.0.0.1:{otlp}/v1/traces"),
            );
        }
        Server {
            serve: b.start(),
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
            dir: Some(dir),
        }
    }

    async fn post(&self, path: &str, body: Json) -> Json {
        let req = self.http.post(self.url(path)).json(&body);
        common::ok_json(req, &format!("POST {path}")).await
    }

    async fn publish(&self, attributes: Json) {
        self.post(
            "/v1/projects/demo/topics/work:publish",
            json!({ "messages": [{ "data": "aGk=", "attributes": attributes }] }),
        )
        .await;
    }

    /// The result message of the run (pulled and acked).
    async fn result(&self) -> Json {
        let deadline = Instant::now() + PATIENCE;
        loop {
            assert!(Instant::now() < deadline, "no result\n{}", self.log());
            let r = self
                .post(
                    "/v1/projects/demo/subscriptions/done-sub:pull",
                    json!({ "maxMessages": 1 }),
                )
                .await;
            if let Some(m) = r["receivedMessages"].as_array().and_then(|a| a.first()) {
                self.post(
                    "/v1/projects/demo/subscriptions/done-sub:acknowledge",
                    json!({ "ackIds": [m["ackId"].clone()] }),
                )
                .await;
                return m["message"].clone();
            }
        }
    }

    fn traceparent_seen_by_job(&self) -> String {
        std::fs::read_to_string(self.path("traceparent.txt"))
            .expect("the job wrote its TRACEPARENT")
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The first span of `trace` named `name`, waiting for it to be exported.
async fn await_span(
    got: &Mutex<Received>,
    trace: &str,
    name: &str,
    log: impl Fn() -> String,
) -> Span {
    common::poll_async(
        PATIENCE,
        Duration::from_millis(50),
        || {
            let got = got.lock().unwrap();
            let found = got
                .spans
                .iter()
                .find(|(_, s)| s.name == name && hex(&s.trace_id) == trace)
                .map(|(_, s)| s.clone());
            std::future::ready(found.ok_or_else(|| {
                got.spans
                    .iter()
                    .map(|(_, s)| format!("{} {}", s.name, hex(&s.trace_id)))
                    .collect::<Vec<String>>()
            }))
        },
        |names| format!("no {name} span in trace {trace}; got {names:?}\n{}", log()),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_continues_from_message_through_run_to_job_and_result() {
    let (otlp, got) = receiver().await;
    let server = Server::start(true, otlp);
    let given = format!("00-{TRACE_ID}-{PARENT_SPAN}-01");
    server
        .publish(json!({ "googclient_traceparent": given, "kind": "traced" }))
        .await;
    let result = server.result().await;
    let log = || server.log();

    let publish = await_span(&got, TRACE_ID, "publish", log).await;
    let deliver = await_span(&got, TRACE_ID, "deliver", log).await;
    let run = await_span(&got, TRACE_ID, "run", log).await;
    let attempt = await_span(&got, TRACE_ID, "attempt", log).await;
    // The publisher's span is the parent of the server's publish and of
    // the delivery; the run descends from the delivery, the attempt from
    // the run.
    assert_eq!(hex(&publish.parent_span_id), PARENT_SPAN);
    assert_eq!(hex(&deliver.parent_span_id), PARENT_SPAN);
    assert_eq!(run.parent_span_id, deliver.span_id);
    assert_eq!(attempt.parent_span_id, run.span_id);
    for name in ["stage inputs", "upload outputs"] {
        let s = await_span(&got, TRACE_ID, name, log).await;
        assert_eq!(s.parent_span_id, attempt.span_id, "{name}");
    }
    // Kinds as the messaging conventions have them.
    assert_eq!(publish.kind, 4, "PRODUCER");
    assert_eq!(deliver.kind, 5, "CONSUMER");
    // The run span covers queued → ended.
    assert!(run.start_time_unix_nano <= attempt.start_time_unix_nano);
    assert!(run.end_time_unix_nano >= attempt.end_time_unix_nano);

    // The job continues the trace from its attempt.
    assert_eq!(
        server.traceparent_seen_by_job(),
        format!("00-{TRACE_ID}-{}-01", hex(&attempt.span_id))
    );
    // Downstream continues from the run.
    assert_eq!(
        result["attributes"]["googclient_traceparent"],
        format!("00-{TRACE_ID}-{}-01", hex(&run.span_id))
    );
    // … and the result's own publish span is the run's child.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let n = got
            .lock()
            .unwrap()
            .spans
            .iter()
            .filter(|(_, s)| {
                s.name == "publish"
                    && hex(&s.trace_id) == TRACE_ID
                    && s.parent_span_id == run.span_id
            })
            .count();
        if n == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "no publish span of the result");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let g = got.lock().unwrap();
    for (service, s) in &g.spans {
        assert!(service.contains("pubrun"), "service.name {service}");
        // Nothing secret, nor the message's attribute values, in spans.
        let text = format!("{s:?}");
        assert!(!text.contains(SECRET), "{text}");
        assert!(!text.contains("traced\""), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_without_context_starts_a_trace_of_its_own() {
    let (otlp, got) = receiver().await;
    let server = Server::start(true, otlp);
    server.publish(json!({ "kind": "untraced" })).await;
    let result = server.result().await;
    let tp = result["attributes"]["googclient_traceparent"]
        .as_str()
        .expect("result carries the run's context")
        .to_string();
    let trace = tp.split('-').nth(1).unwrap().to_string();
    let log = || server.log();
    let deliver = await_span(&got, &trace, "deliver", log).await;
    let run = await_span(&got, &trace, "run", log).await;
    let attempt = await_span(&got, &trace, "attempt", log).await;
    assert!(deliver.parent_span_id.is_empty(), "a root span");
    assert_eq!(run.parent_span_id, deliver.span_id);
    assert_eq!(attempt.parent_span_id, run.span_id);
    assert_eq!(
        server.traceparent_seen_by_job(),
        format!("00-{trace}-{}-01", hex(&attempt.span_id))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_endpoint_nothing_is_exported_and_nothing_is_added() {
    let (otlp, got) = receiver().await;
    let server = Server::start(false, otlp);
    server
        .publish(json!({ "googclient_traceparent": format!("00-{TRACE_ID}-{PARENT_SPAN}-01") }))
        .await;
    let result = server.result().await;
    // No TRACEPARENT for the job, the result carries no context of pubrun's.
    assert_eq!(server.traceparent_seen_by_job(), "");
    assert!(
        result["attributes"].get("googclient_traceparent").is_none(),
        "{result}"
    );
    assert_eq!(got.lock().unwrap().requests, 0);
    assert!(!server.log().contains("exporting traces"));
}
