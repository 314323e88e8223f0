//! HTTP: the agent protocol (`/agent/v1/…`, pool tokens) and the pools REST
//! API (`/api/v1/pools|machines|agents|cost`, behind the server's token).
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/api/v1/pools` | `{"pools": [..]}` with machines up, runs waiting |
//! | GET | `/api/v1/pools/{name}/token` | `{"token"}`: the pool's agent token |
//! | GET | `/api/v1/machines` | `{"machines": [MachineRow + runs]}` |
//! | POST | `/api/v1/machines/{name}/cordon` / `uncordon` / `drain` | cordon: no new runs; drain: cordon, then stop when empty |
//! | GET | `/api/v1/agents` | `{"agents": [..]}` connected agents |
//! | GET | `/api/v1/cost?since_ms=N` | machine-seconds and cost per pool, machine and run |

use std::io::Write as _;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;

use crate::protocol::{ErrorBody, Poll, Register, Report, Started, PREFIX};
use crate::remote::{now_ms, AgentError, Pools};

/// The header naming the agent on lease calls.
pub const AGENT_HEADER: &str = "x-pubrun-agent";

impl IntoResponse for AgentError {
    fn into_response(self) -> Response {
        let (code, msg) = match self {
            AgentError::Unauthorized(m) => (StatusCode::UNAUTHORIZED, m),
            AgentError::UnknownAgent(m) => (StatusCode::NOT_FOUND, m),
            AgentError::Fenced(m) => (StatusCode::CONFLICT, m),
            AgentError::NotReady(m) => (StatusCode::SERVICE_UNAVAILABLE, m),
            AgentError::Invalid(m) => (StatusCode::BAD_REQUEST, m),
            AgentError::Internal(m) => (StatusCode::INTERNAL_SERVER_ERROR, m),
        };
        (code, Json(ErrorBody { error: msg })).into_response()
    }
}

fn bearer(h: &HeaderMap) -> Result<String, AgentError> {
    h.get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string)
        .ok_or_else(|| {
            AgentError::Unauthorized("Authorization: Bearer <pool token> is required".into())
        })
}

fn agent_name(h: &HeaderMap) -> Result<String, AgentError> {
    h.get(AGENT_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .ok_or_else(|| AgentError::Invalid(format!("header {AGENT_HEADER} is required")))
}

fn json_body<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, AgentError> {
    serde_json::from_slice(b).map_err(|e| AgentError::Invalid(format!("request body: {e}")))
}

/// Agent protocol routes: outside the server token layer (agents hold pool
/// tokens, not the server's admin token).
pub fn agent_router(pools: Pools) -> Router {
    Router::new()
        .route(&format!("{PREFIX}/register"), post(register))
        .route(&format!("{PREFIX}/poll"), post(poll))
        .route(&format!("{PREFIX}/leases/{{lease}}/workdir"), get(workdir))
        .route(&format!("{PREFIX}/leases/{{lease}}/started"), post(started))
        .route(&format!("{PREFIX}/leases/{{lease}}/log"), post(log))
        .route(&format!("{PREFIX}/leases/{{lease}}/outputs"), put(outputs))
        .route(&format!("{PREFIX}/leases/{{lease}}/result"), post(result))
        .with_state(pools)
}

async fn register(
    State(p): State<Pools>,
    h: HeaderMap,
    body: Bytes,
) -> Result<Response, AgentError> {
    let token = bearer(&h)?;
    let r: Register = json_body(&body)?;
    Ok(Json(p.register(r, &token)?).into_response())
}

async fn poll(State(p): State<Pools>, h: HeaderMap, body: Bytes) -> Result<Response, AgentError> {
    let token = bearer(&h)?;
    let r: Poll = json_body(&body)?;
    Ok(Json(p.poll(r, &token).await?).into_response())
}

async fn started(
    State(p): State<Pools>,
    Path(lease): Path<u64>,
    h: HeaderMap,
    body: Bytes,
) -> Result<Response, AgentError> {
    let s: Started = json_body(&body)?;
    p.started(&agent_name(&h)?, &bearer(&h)?, lease, s.handle)?;
    Ok(Json(json!({})).into_response())
}

#[derive(Deserialize)]
struct LogQuery {
    offset: u64,
}

async fn log(
    State(p): State<Pools>,
    Path(lease): Path<u64>,
    Query(q): Query<LogQuery>,
    h: HeaderMap,
    body: Bytes,
) -> Result<Response, AgentError> {
    let total = p
        .log(&agent_name(&h)?, &bearer(&h)?, lease, q.offset, &body)
        .await?;
    Ok(Json(json!({ "received": total })).into_response())
}

async fn result(
    State(p): State<Pools>,
    Path(lease): Path<u64>,
    h: HeaderMap,
    body: Bytes,
) -> Result<Response, AgentError> {
    let r: Report = json_body(&body)?;
    p.report(&agent_name(&h)?, &bearer(&h)?, lease, r.exit)?;
    Ok(Json(json!({})).into_response())
}

/// The run directory as a tar stream (built in a temporary file first, so a
/// large input is never held in memory).
async fn workdir(
    State(p): State<Pools>,
    Path(lease): Path<u64>,
    h: HeaderMap,
) -> Result<Response, AgentError> {
    let dir = p.live(&agent_name(&h)?, &bearer(&h)?, lease, |l| l.workdir.clone())?;
    let file = tokio::task::spawn_blocking(move || -> std::io::Result<std::fs::File> {
        let mut tmp = tempfile_in_dir(&dir)?;
        {
            let mut b = tar::Builder::new(&mut tmp);
            b.follow_symlinks(false);
            if dir.exists() {
                b.append_dir_all(".", &dir)?;
            }
            b.finish()?;
        }
        tmp.flush()?;
        use std::io::Seek;
        tmp.seek(std::io::SeekFrom::Start(0))?;
        Ok(tmp)
    })
    .await
    .map_err(|e| AgentError::Internal(e.to_string()))?
    .map_err(|e| AgentError::Internal(format!("packing the run directory: {e}")))?;
    let stream = tokio_util::io::ReaderStream::new(tokio::fs::File::from_std(file));
    Ok((
        [(http::header::CONTENT_TYPE, "application/x-tar")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// An anonymous temporary file next to the run directory (same disk).
fn tempfile_in_dir(dir: &std::path::Path) -> std::io::Result<std::fs::File> {
    let parent = dir.parent().unwrap_or(dir);
    std::fs::create_dir_all(parent)?;
    let path = parent.join(format!(".workdir-{}-{}.tar", std::process::id(), now_ms()));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    let _ = std::fs::remove_file(&path); // stays readable through the handle
    Ok(f)
}

/// Output directories sent back as a tar; unpacked into the run directory.
/// Only regular files and directories are taken (no links, no devices),
/// and only under the job's declared output directories.
async fn outputs(
    State(p): State<Pools>,
    Path(lease): Path<u64>,
    h: HeaderMap,
    body: Body,
) -> Result<Response, AgentError> {
    let (dir, allowed) = p.live(&agent_name(&h)?, &bearer(&h)?, lease, |l| {
        (l.workdir.clone(), l.outputs.clone())
    })?;
    let mut tmp = tempfile_in_dir(&dir).map_err(|e| AgentError::Internal(e.to_string()))?;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| AgentError::Invalid(format!("reading outputs: {e}")))?;
        tmp.write_all(&chunk)
            .map_err(|e| AgentError::Internal(format!("storing outputs: {e}")))?;
    }
    let n = tokio::task::spawn_blocking(move || -> std::io::Result<usize> {
        use std::io::Seek;
        tmp.seek(std::io::SeekFrom::Start(0))?;
        let mut a = tar::Archive::new(tmp);
        let mut n = 0;
        for entry in a.entries()? {
            let mut e = entry?;
            let kind = e.header().entry_type();
            if !(kind.is_file() || kind.is_dir()) {
                continue;
            }
            let path = e.path()?.into_owned();
            let rel = path.strip_prefix(".").unwrap_or(&path).to_path_buf();
            let under_output = allowed.iter().any(|o| {
                let o = std::path::Path::new(o.trim_start_matches("./"));
                rel.starts_with(o)
            });
            if !under_output {
                continue;
            }
            // `unpack_in` refuses paths that would leave `dir`.
            if e.unpack_in(&dir)? {
                n += 1;
            }
        }
        Ok(n)
    })
    .await
    .map_err(|e| AgentError::Internal(e.to_string()))?
    .map_err(|e| AgentError::Invalid(format!("unpacking outputs: {e}")))?;
    Ok(Json(json!({ "entries": n })).into_response())
}

// ---- admin REST ----

pub fn admin_router(pools: Pools) -> Router {
    Router::new()
        .route("/api/v1/pools", get(list_pools))
        .route("/api/v1/pools/{name}/token", get(pool_token))
        .route("/api/v1/machines", get(list_machines))
        .route("/api/v1/machines/{name}/{action}", post(machine_action))
        .route("/api/v1/agents", get(list_agents))
        .route("/api/v1/cost", get(cost))
        .with_state(pools)
}

fn admin_err(code: StatusCode, msg: String) -> Response {
    (
        code,
        Json(json!({ "error": { "code": code.as_u16(), "message": msg } })),
    )
        .into_response()
}

async fn list_pools(State(p): State<Pools>) -> Response {
    let machines = p.db().machines().unwrap_or_default();
    let pools: Vec<_> = p
        .specs()
        .into_iter()
        .map(|s| {
            let up = machines
                .iter()
                .filter(|m| m.pool == s.name && m.state.is_up())
                .count();
            let mut v = serde_json::to_value(&s).unwrap_or_default();
            v["machines_up"] = json!(up);
            v["runs_waiting"] = json!(p.waiting(&s.name));
            v
        })
        .collect();
    Json(json!({ "pools": pools })).into_response()
}

/// The agent token of a pool, for starting `pubrun agent` by hand. Behind
/// the server's admin token like the rest of this API.
async fn pool_token(State(p): State<Pools>, Path(name): Path<String>) -> Response {
    match p.token(&name) {
        Some(t) => Json(json!({ "pool": name, "token": t })).into_response(),
        None => admin_err(StatusCode::NOT_FOUND, format!("no pool named {name}")),
    }
}

async fn list_machines(State(p): State<Pools>) -> Response {
    match p.db().machines() {
        Ok(ms) => {
            let runs = p.runs_by_machine();
            let v: Vec<_> = ms
                .into_iter()
                .map(|m| {
                    let mut v = serde_json::to_value(&m).unwrap_or_default();
                    v["runs"] = json!(runs.get(&m.name).copied().unwrap_or(0));
                    v
                })
                .collect();
            Json(json!({ "machines": v })).into_response()
        }
        Err(e) => admin_err(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn machine_action(
    State(p): State<Pools>,
    Path((name, action)): Path<(String, String)>,
) -> Response {
    let r = match action.as_str() {
        "cordon" => p.cordon(&name, true),
        "uncordon" => p.cordon(&name, false),
        "drain" => p.drain(&name),
        other => {
            return admin_err(
                StatusCode::NOT_FOUND,
                format!("unknown machine action {other}: cordon, uncordon or drain"),
            )
        }
    };
    match r {
        Ok(m) => Json(json!({ "machine": m })).into_response(),
        Err(e) if e.starts_with("no machine") => admin_err(StatusCode::NOT_FOUND, e),
        Err(e) => admin_err(StatusCode::BAD_REQUEST, e),
    }
}

async fn list_agents(State(p): State<Pools>) -> Response {
    Json(json!({ "agents": p.agents() })).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CostQuery {
    #[serde(default)]
    since_ms: i64,
}

async fn cost(
    State(p): State<Pools>,
    q: Result<Query<CostQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = q else {
        return admin_err(
            StatusCode::BAD_REQUEST,
            "query: since_ms=<milliseconds since the epoch>".into(),
        );
    };
    match p.cost_report(q.since_ms, now_ms()) {
        Ok(r) => Json(r).into_response(),
        Err(e) => admin_err(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}
