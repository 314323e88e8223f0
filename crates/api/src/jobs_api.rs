//! pubrun's own REST API for jobs, runs, logs and apply (`/api/v1/...`).
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/api/v1/jobs` | `{"jobs": [JobSpec]}` |
//! | GET | `/api/v1/jobs/{name}` | `{"job": JobSpec, "subscription": .., "backlog": n}` |
//! | POST | `/api/v1/jobs/{name}/trigger` | body `{"data": "text"}` or `{"data_base64": ".."}`, `"attributes"` → `{"run": Run}`; always a new run (an explicit trigger bypasses `dedup_key`) |
//! | GET | `/api/v1/runs?job=&status=&limit=` | `{"runs": [Run]}`, newest first |
//! | GET | `/api/v1/runs/{id}` | `{"run": Run}` |
//! | POST | `/api/v1/runs/{id}/cancel` | `{"run": Run}` |
//! | GET | `/api/v1/runs/{id}/log?offset=N` | up to 4 MiB of log from `offset`; headers `x-pubrun-log-size`, `x-pubrun-run-status` |
//! | POST | `/api/v1/apply?dry_run=true&file=NAME` | body: manifest TOML → `{"changes": [..], "applied": bool}` |

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use pubrun_broker::Broker;
use pubrun_core::manifest::job_subscription;
use pubrun_core::run::RunStatus;
use pubrun_core::{Error, SubscriptionName, TopicName};
use pubrun_jobs::Dispatcher;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::status::HttpError;

#[derive(Clone)]
struct Api {
    broker: Arc<Broker>,
    dispatcher: Arc<Dispatcher>,
    triggers: Option<Arc<pubrun_triggers::Triggers>>,
    buckets: Option<pubrun_buckets::Buckets>,
    pools: Option<pubrun_pools::Pools>,
}

type ApiResult = Result<Response, HttpError>;

pub fn router(
    broker: Arc<Broker>,
    dispatcher: Arc<Dispatcher>,
    triggers: Option<Arc<pubrun_triggers::Triggers>>,
    buckets: Option<pubrun_buckets::Buckets>,
    pools: Option<pubrun_pools::Pools>,
) -> Router {
    Router::new()
        .route("/api/v1/jobs", get(list_jobs))
        .route("/api/v1/jobs/{name}", get(get_job))
        .route("/api/v1/jobs/{name}/trigger", post(trigger))
        .route("/api/v1/runs", get(list_runs))
        .route("/api/v1/runs/{id}", get(get_run))
        .route("/api/v1/runs/{id}/cancel", post(cancel_run))
        .route("/api/v1/runs/{id}/log", get(run_log))
        .route("/api/v1/apply", post(apply))
        .route("/api/v1/webhooks", get(list_webhooks))
        .method_not_allowed_fallback(|req: axum::extract::Request| async move {
            let msg = format!(
                "HTTP method {} is not allowed on {}",
                req.method(),
                req.uri().path()
            );
            crate::status::with_status(StatusCode::METHOD_NOT_ALLOWED, &Error::unimplemented(msg))
        })
        .with_state(Api {
            broker,
            dispatcher,
            triggers,
            buckets,
            pools,
        })
}

fn ok(v: serde_json::Value) -> ApiResult {
    Ok((StatusCode::OK, Json(v)).into_response())
}

fn parse_id(id: &str) -> Result<i64, HttpError> {
    id.parse().map_err(|_| {
        HttpError(Error::invalid(format!(
            "\"{id}\" is not a run id (run ids are numbers)"
        )))
    })
}

async fn list_jobs(State(api): State<Api>) -> ApiResult {
    ok(json!({ "jobs": api.dispatcher.jobs() }))
}

async fn get_job(State(api): State<Api>, Path(name): Path<String>) -> ApiResult {
    let spec = api.dispatcher.job(&name)?;
    if spec.connection.is_some() {
        // Its subscription and backlog live on the connection's side.
        let sub = spec.subscription.clone();
        return ok(json!({ "job": spec, "subscription": sub }));
    }
    let topic = TopicName::parse(&spec.topic)?;
    let sub = job_subscription(topic.project().id(), &name);
    let backlog = SubscriptionName::parse(&sub)
        .and_then(|s| api.broker.backlog(&s))
        .unwrap_or(0);
    ok(json!({ "job": spec, "subscription": sub, "backlog": backlog }))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TriggerBody {
    #[serde(default)]
    data: Option<String>,
    #[serde(default)]
    data_base64: Option<String>,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
}

fn json_body<T: serde::de::DeserializeOwned + Default>(body: &Bytes) -> Result<T, HttpError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| HttpError(Error::invalid(format!("invalid JSON body: {e}"))))
}

async fn trigger(State(api): State<Api>, Path(name): Path<String>, body: Bytes) -> ApiResult {
    let b: TriggerBody = json_body(&body)?;
    let data = match (b.data, b.data_base64) {
        (Some(_), Some(_)) => {
            return Err(HttpError(Error::invalid(
                "give either data or data_base64, not both",
            )))
        }
        (Some(t), None) => t.into_bytes(),
        (None, Some(b64)) => base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|e| HttpError(Error::invalid(format!("data_base64 is not base64: {e}"))))?,
        (None, None) => Vec::new(),
    };
    let id = api.dispatcher.trigger(&name, data, b.attributes).await?;
    let run = api.dispatcher.store().get(id).await?;
    ok(json!({ "run": run }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunsQuery {
    job: Option<String>,
    status: Option<String>,
    limit: Option<usize>,
}

async fn list_runs(
    State(api): State<Api>,
    q: Result<Query<RunsQuery>, QueryRejection>,
) -> ApiResult {
    let q = query(q)?;
    let status = q.status.as_deref().map(RunStatus::parse).transpose()?;
    let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
    let runs = api
        .dispatcher
        .store()
        .list(q.job.as_deref(), status, limit)
        .await?;
    let runs: Vec<Value> = runs.iter().map(|r| run_view(&api, r)).collect();
    ok(json!({ "runs": runs }))
}

async fn get_run(State(api): State<Api>, Path(id): Path<String>) -> ApiResult {
    let id = parse_id(&id)?;
    let run = api.dispatcher.store().get(id).await?;
    ok(json!({ "run": run_view(&api, &run) }))
}

/// A run as the API shows it: the record, plus `waiting_for_machine` (the
/// pool) while a starting run waits for a pool machine to take it.
fn run_view(api: &Api, run: &pubrun_jobs::RunRecord) -> Value {
    let mut v = serde_json::to_value(run).unwrap_or(Value::Null);
    if run.status == RunStatus::Starting {
        if let Some(pool) = api
            .pools
            .as_ref()
            .and_then(|p| p.waiting_pool(&run.id.to_string()))
        {
            v["waiting_for_machine"] = Value::String(pool);
        }
    }
    v
}

async fn cancel_run(State(api): State<Api>, Path(id): Path<String>) -> ApiResult {
    let id = parse_id(&id)?;
    let run = api.dispatcher.cancel_run(id).await?;
    ok(json!({ "run": run }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogQuery {
    offset: Option<u64>,
}

/// Query strings with errors in Google's JSON shape, not axum's plain text.
fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, HttpError> {
    q.map(|Query(v)| v).map_err(|e| {
        HttpError(Error::invalid(format!(
            "bad query string: {}",
            e.body_text()
        )))
    })
}

/// Most bytes one log request returns; followers come back for the rest.
const LOG_CHUNK: u64 = 4 << 20;

async fn run_log(
    State(api): State<Api>,
    Path(id): Path<String>,
    q: Result<Query<LogQuery>, QueryRejection>,
) -> ApiResult {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let q = query(q)?;
    let id = parse_id(&id)?;
    let run = api.dispatcher.store().get(id).await?;
    let path = api.dispatcher.log_path(id);
    let read_err = |e: std::io::Error| HttpError(Error::internal(format!("reading log: {e}")));
    // Seek to the offset: followers poll often and logs can be large.
    let (size, chunk) = match tokio::fs::File::open(&path).await {
        Ok(mut f) => {
            let size = f.metadata().await.map_err(read_err)?.len();
            let from = q.offset.unwrap_or(0).min(size);
            f.seek(std::io::SeekFrom::Start(from))
                .await
                .map_err(read_err)?;
            let mut buf = Vec::new();
            f.take(LOG_CHUNK)
                .read_to_end(&mut buf)
                .await
                .map_err(read_err)?;
            (size, buf)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Executed by another server of a cluster: its stored copy.
            match api.dispatcher.run_log(id).await? {
                Some(log) => {
                    let size = log.len() as u64;
                    let from = q.offset.unwrap_or(0).min(size) as usize;
                    let to = (from as u64 + LOG_CHUNK).min(size) as usize;
                    (size, log[from..to].to_vec())
                }
                None => (0, Vec::new()),
            }
        }
        Err(e) => return Err(read_err(e)),
    };
    let mut resp = (StatusCode::OK, chunk).into_response();
    let h = resp.headers_mut();
    h.insert(
        "content-type",
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert("x-pubrun-log-size", HeaderValue::from(size));
    h.insert(
        "x-pubrun-run-status",
        HeaderValue::from_static(run.status.as_str()),
    );
    Ok(resp)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApplyQuery {
    dry_run: Option<bool>,
    file: Option<String>,
}

async fn apply(
    State(api): State<Api>,
    q: Result<Query<ApplyQuery>, QueryRejection>,
    body: Bytes,
) -> ApiResult {
    let q = query(q)?;
    let text = std::str::from_utf8(&body)
        .map_err(|_| HttpError(Error::invalid("the manifest must be UTF-8 text")))?;
    let file = q.file.unwrap_or_else(|| "pubrun.toml".to_string());
    let manifest = pubrun_core::manifest::parse_checked(
        &file,
        text,
        pubrun_triggers::schedule::manifest_checks(),
    )
    .map_err(|e| HttpError(Error::invalid(e.to_string())))?;
    let dry_run = q.dry_run.unwrap_or(false);
    // Counted before applying: a replaced subscription starts empty.
    let backlog_before: std::collections::HashMap<String, usize> = api
        .broker
        .subscription_stats()
        .into_iter()
        .map(|s| (s.name, s.backlog))
        .collect();
    let changes = pubrun_jobs::apply::apply_manifest(
        &api.broker,
        &api.dispatcher,
        api.triggers.as_deref(),
        api.buckets.as_ref(),
        api.pools.as_ref(),
        &manifest,
        dry_run,
    )
    .await?;
    let warnings = plan_warnings(&api, &manifest, &changes, &backlog_before);
    ok(json!({ "changes": changes, "applied": !dry_run, "warnings": warnings }))
}

/// What a careful operator wants to know before saying yes: messages a
/// replaced or deleted subscription takes with it, and jobs that cannot use
/// the machines their pool may start.
fn plan_warnings(
    api: &Api,
    m: &pubrun_core::manifest::Manifest,
    changes: &[pubrun_jobs::apply::Change],
    backlog_before: &std::collections::HashMap<String, usize>,
) -> Vec<String> {
    use pubrun_jobs::apply::Action;
    let mut out = Vec::new();
    for c in changes {
        if c.kind != "subscription" || !c.action.is_destructive() {
            continue;
        }
        if let Some(&n) = backlog_before.get(&c.name).filter(|&&n| n > 0) {
            let verb = if c.action == Action::Replace {
                "replacing"
            } else {
                "deleting"
            };
            out.push(format!(
                "{verb} subscription {} loses its {n} unacked message(s)",
                c.name
            ));
        }
    }
    let declared = m.pools.iter().map(|p| (p.name.as_str(), p.max_machines));
    let current = api.pools.as_ref().map(|p| p.specs()).unwrap_or_default();
    for job in &m.jobs {
        let max = declared
            .clone()
            .find(|(n, _)| *n == job.pool)
            .map(|(_, max)| max)
            .or_else(|| {
                current
                    .iter()
                    .find(|p| p.name == job.pool)
                    .map(|p| p.max_machines)
            });
        if let Some(max) = max.filter(|&max| max > 1 && job.concurrency == 1) {
            out.push(format!(
                "job {} has concurrency = 1: it will never use more than one of pool {}'s {max} machines (set concurrency to run more at once)",
                job.name, job.pool
            ));
        }
    }
    out
}

/// The declared webhooks, with how each authenticates (never the secret).
async fn list_webhooks(State(api): State<Api>) -> ApiResult {
    let hooks = api
        .triggers
        .as_ref()
        .map(|t| t.list_webhooks())
        .unwrap_or_default();
    let list: Vec<serde_json::Value> = hooks
        .iter()
        .map(|w| {
            let auth = match (&w.secret_env, &w.bearer_secret_env) {
                (Some(_), Some(_)) => "hmac-sha256 or bearer",
                (Some(_), None) => "hmac-sha256",
                (None, Some(_)) => "bearer",
                (None, None) => "none",
            };
            json!({
                "name": w.name,
                "topic": w.topic,
                "auth": auth,
                "headersAsAttributes": w.headers_as_attributes,
                "queryAsAttributes": w.query_as_attributes,
                "maxBodyBytes": w.max_body_bytes,
            })
        })
        .collect();
    ok(json!({ "webhooks": list }))
}
