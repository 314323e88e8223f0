//! HTTP: `POST /hooks/{name}` and the schedules REST API.
//!
//! | method | path | answer |
//! |---|---|---|
//! | POST | `/hooks/{name}` | `{"messageId": "…"}`; 404 unknown hook, 401 bad or missing secret (nothing published), 413 body over `max_body_bytes`, 503 the hook's secret variable is not set on this server |
//! | GET | `/api/v1/schedules` | `{"schedules": [ScheduleStatus]}` |
//! | GET | `/api/v1/schedules/{name}` | `{"schedule": ScheduleStatus}` |
//! | POST | `/api/v1/schedules/{name}/pause` | `{"schedule": ScheduleStatus}` |
//! | POST | `/api/v1/schedules/{name}/resume` | `{"schedule": ScheduleStatus}` |
//! | POST | `/api/v1/schedules/{name}/run-now` | `{"messageId": "…", "schedule": ScheduleStatus}` |
//!
//! Errors use Google's JSON shape
//! `{"error": {"code": 404, "message": "…", "status": "NOT_FOUND"}}`.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use pubrun_broker::Broker;
use pubrun_core::{Code, Error, OutgoingMessage, Result};
use serde_json::json;

use crate::scheduler::Scheduler;
use crate::webhook::{Hook, WebhookSpec, SIGNATURE_HEADER};

/// The webhooks being served. Cheap to clone (a handle); [`Webhooks::set`]
/// takes effect for the next request.
#[derive(Clone)]
pub struct Webhooks {
    inner: Arc<WebhooksInner>,
}

struct WebhooksInner {
    broker: Arc<Broker>,
    hooks: RwLock<BTreeMap<String, Arc<Hook>>>,
}

impl Webhooks {
    pub fn new(broker: Arc<Broker>) -> Self {
        Webhooks {
            inner: Arc::new(WebhooksInner {
                broker,
                hooks: RwLock::new(BTreeMap::new()),
            }),
        }
    }

    /// Replaces the hooks being served (in memory only: [`crate::Triggers`]
    /// stores definitions), reading secrets from the process environment.
    pub fn set_from_env(&self, specs: Vec<WebhookSpec>) -> Result<()> {
        self.set(specs, &|k| std::env::var(k).ok())
    }

    /// Replaces the hooks, reading secrets through `env`. All are validated
    /// first; nothing changes on an error.
    pub fn set(&self, specs: Vec<WebhookSpec>, env: &dyn Fn(&str) -> Option<String>) -> Result<()> {
        let mut hooks = BTreeMap::new();
        for spec in specs {
            let name = spec.name.clone();
            let hook = Hook::resolve(spec, env)?;
            if hooks.insert(name.clone(), Arc::new(hook)).is_some() {
                return Err(Error::invalid(format!(
                    "webhook \"{name}\" is declared twice"
                )));
            }
        }
        self.install(hooks);
        Ok(())
    }

    /// Replaces the hooks by resolved ones.
    pub(crate) fn install(&self, hooks: BTreeMap<String, Arc<Hook>>) {
        *self.inner.hooks.write().unwrap_or_else(|p| p.into_inner()) = hooks;
    }

    pub fn get(&self, name: &str) -> Option<Arc<Hook>> {
        self.inner
            .hooks
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// The declared specs (no secrets: only the names of their variables).
    pub fn specs(&self) -> Vec<WebhookSpec> {
        self.inner
            .hooks
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|h| h.spec.clone())
            .collect()
    }
}

/// An error response in Google's JSON shape.
/// `status` may differ from `code`'s own (401 and 413 carry their own).
fn error(status: StatusCode, code: Code, message: impl Into<String>) -> Response {
    let body = pubrun_core::error::json_body(status.as_u16(), Some(code), &message.into());
    (status, Json(body)).into_response()
}

fn from_error(e: Error) -> Response {
    let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(e.json_body())).into_response()
}

fn unauthenticated(hook: &Hook, message: &str) -> Response {
    let mut r = error(
        StatusCode::UNAUTHORIZED,
        Code::Unauthenticated,
        format!("webhook \"{}\": {message}", hook.spec.name),
    );
    if !hook.accepts_bearer() {
        return r;
    }
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer realm=\"pubrun\""),
    );
    r
}

fn too_large(hook: &Hook) -> Response {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        Code::InvalidArgument,
        format!(
            "webhook \"{}\": request body is larger than max_body_bytes = {}",
            hook.spec.name, hook.spec.max_body_bytes
        ),
    )
}

/// `POST /hooks/{name}` for the hooks in `state`.
pub fn router(state: Webhooks) -> Router {
    Router::new()
        .route("/hooks/{name}", post(receive))
        .with_state(state)
}

async fn receive(
    State(hooks): State<Webhooks>,
    Path(name): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(hook) = hooks.get(&name) else {
        return error(
            StatusCode::NOT_FOUND,
            Code::NotFound,
            format!("webhook \"{name}\" not found"),
        );
    };
    if let Some(why) = hook.unavailable() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            Code::Unavailable,
            format!("{why}; nothing was published"),
        );
    }
    let authorization = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
    // A bearer secret can be checked before reading the body.
    if hook.bearer_only() {
        if let Err(e) = hook.check_bearer(authorization) {
            return unauthenticated(&hook, e.message());
        }
    }
    let limit = hook.spec.max_body_bytes;
    let declared_len = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared_len.is_some_and(|n| n > limit) {
        return too_large(&hook);
    }
    let mut data = Vec::with_capacity(declared_len.unwrap_or(0).min(limit) as usize);
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => {
                if data.len() as u64 + c.len() as u64 > limit {
                    return too_large(&hook);
                }
                data.extend_from_slice(&c);
            }
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    Code::InvalidArgument,
                    format!("could not read the request body: {e}"),
                )
            }
        }
    }
    let signature = headers.get(SIGNATURE_HEADER).map(|v| v.as_bytes());
    if let Err(e) = hook.authenticate(authorization, signature, &data) {
        tracing::warn!(webhook = %name, reason = e.message(), "webhook request refused");
        return unauthenticated(&hook, e.message());
    }
    let attributes = hook.attributes(
        headers.iter().map(|(k, v)| (k.as_str(), v.as_bytes())),
        uri.query(),
    );
    let message = OutgoingMessage {
        data: data.into(),
        attributes,
        ordering_key: String::new(),
    };
    match hooks.inner.broker.publish(&hook.topic, vec![message]).await {
        Ok(ids) => {
            let id = ids.into_iter().next().unwrap_or_default();
            tracing::info!(webhook = %name, message_id = %id, "webhook published");
            (StatusCode::OK, Json(json!({ "messageId": id }))).into_response()
        }
        Err(e) => from_error(e),
    }
}

/// The schedules REST API (see the module docs).
pub fn schedules_router(scheduler: Scheduler) -> Router {
    Router::new()
        .route("/api/v1/schedules", get(list_schedules))
        .route("/api/v1/schedules/{name}", get(get_schedule))
        .route("/api/v1/schedules/{name}/pause", post(pause))
        .route("/api/v1/schedules/{name}/resume", post(resume))
        .route("/api/v1/schedules/{name}/run-now", post(run_now))
        .with_state(scheduler)
}

/// `{key: value}` as 200, or the error in Google's shape.
fn reply(key: &str, r: Result<impl serde::Serialize>) -> Response {
    match r {
        Ok(v) => Json(json!({ key: v })).into_response(),
        Err(e) => from_error(e),
    }
}

async fn list_schedules(State(s): State<Scheduler>) -> Response {
    reply("schedules", s.list().await)
}

async fn get_schedule(State(s): State<Scheduler>, Path(name): Path<String>) -> Response {
    reply("schedule", s.get(&name).await)
}

async fn pause(State(s): State<Scheduler>, Path(name): Path<String>) -> Response {
    reply("schedule", s.pause(&name).await)
}

async fn resume(State(s): State<Scheduler>, Path(name): Path<String>) -> Response {
    reply("schedule", s.resume(&name).await)
}

async fn run_now(State(s): State<Scheduler>, Path(name): Path<String>) -> Response {
    match s.run_now(&name).await {
        Ok(id) => {
            let st = s.get(&name).await.ok();
            Json(json!({ "messageId": id, "schedule": st })).into_response()
        }
        Err(e) => from_error(e),
    }
}
