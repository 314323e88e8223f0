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
use axum::extract::{FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;

use crate::protocol::{ErrorBody, Poll, Register, Report, Started, PREFIX};
use crate::remote::{AgentError, Creds, LiveLease, Pools};

/// The header naming the agent on every call after register.
pub const AGENT_HEADER: &str = "x-pubrun-agent";
/// The header carrying the session register returned.
pub const SESSION_HEADER: &str = "x-pubrun-session";

/// Body limits of the agent routes, checked before a byte of the body is
/// read (a larger `Content-Length` is refused at once with 413, a chunked
/// body as soon as it passes the limit):
/// JSON bodies (register, poll, started, result).
pub const JSON_BODY_LIMIT: u64 = 64 * 1024;
/// One log chunk (the agent sends at most 1 MiB at a time).
pub const LOG_BODY_LIMIT: u64 = 4 * 1024 * 1024;
/// The outputs tar, streamed to a temporary file on the server's disk.
pub const OUTPUTS_BODY_LIMIT: u64 = 16 * 1024 * 1024 * 1024;

impl IntoResponse for AgentError {
    fn into_response(self) -> Response {
        let (code, msg) = match self {
            AgentError::Unauthorized(m) | AgentError::BadSession(m) => {
                (StatusCode::UNAUTHORIZED, m)
            }
            AgentError::UnknownAgent(m) => (StatusCode::NOT_FOUND, m),
            AgentError::NoPools => (
                StatusCode::NOT_FOUND,
                "no pool takes agents on this server (declare a [[pool]] with provider agents, docker or gce)".into(),
            ),
            AgentError::Fenced(m) | AgentError::NameTaken(m) => (StatusCode::CONFLICT, m),
            AgentError::TooLarge(m) => (StatusCode::PAYLOAD_TOO_LARGE, m),
            AgentError::NotReady(m) => (StatusCode::SERVICE_UNAVAILABLE, m),
            AgentError::Invalid(m) => (StatusCode::BAD_REQUEST, m),
            AgentError::Internal(m) => (StatusCode::INTERNAL_SERVER_ERROR, m),
        };
        (code, Json(ErrorBody { error: msg })).into_response()
    }
}

fn bearer(h: &HeaderMap) -> Result<&str, AgentError> {
    h.get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(token)
        })
        .ok_or_else(|| {
            AgentError::Unauthorized("Authorization: Bearer <pool token> is required".into())
        })
}

fn header<'h>(h: &'h HeaderMap, name: &str) -> Result<&'h str, AgentError> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| AgentError::Unauthorized(format!("header {name} is required")))
}

/// An agent's credentials on calls after register: name, pool token,
/// session (none is a session that never matches: a late call about a
/// lease already taken back still learns it is fenced).
fn creds(h: &HeaderMap) -> Result<Creds<'_>, AgentError> {
    Ok(Creds {
        token: bearer(h)?,
        name: header(h, AGENT_HEADER)?,
        session: h
            .get(SESSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or(""),
    })
}

/// What a route about one lease starts from: the pools, the lease the path
/// names and the request's headers (the agent's credentials).
struct LeaseCall {
    p: Pools,
    lease: u64,
    h: HeaderMap,
}

impl FromRequestParts<Pools> for LeaseCall {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, p: &Pools) -> Result<Self, Response> {
        let Path(lease) = Path::<u64>::from_request_parts(parts, p)
            .await
            .map_err(IntoResponse::into_response)?;
        Ok(LeaseCall {
            p: p.clone(),
            lease,
            h: parts.headers.clone(),
        })
    }
}

impl LeaseCall {
    /// The credentials, checked against the live lease before the body (up
    /// to `limit`) is read, so a fenced agent's body is not.
    async fn read(&self, body: Body, limit: u64) -> Result<(Creds<'_>, Bytes), AgentError> {
        let c = creds(&self.h)?;
        self.p.live(&c, self.lease, |_| ()).await?;
        Ok((c, read_body(body, limit).await?))
    }

    /// A field of the live lease, for the credentials of the headers.
    async fn live<T>(&self, f: impl FnOnce(&mut LiveLease) -> T) -> Result<T, AgentError> {
        self.p.live(&creds(&self.h)?, self.lease, f).await
    }
}

fn json_body<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, AgentError> {
    serde_json::from_slice(b).map_err(|e| AgentError::Invalid(format!("request body: {e}")))
}

/// The limit of the route a request is for.
fn body_limit(method: &Method, path: &str) -> u64 {
    if method == Method::PUT && path.ends_with("/outputs") {
        OUTPUTS_BODY_LIMIT
    } else if path.ends_with("/log") {
        LOG_BODY_LIMIT
    } else {
        JSON_BODY_LIMIT
    }
}

/// Reads a whole (small) body, refusing it once it passes `limit`.
async fn read_body(body: Body, limit: u64) -> Result<Bytes, AgentError> {
    let mut stream = body.into_data_stream();
    let mut buf = bytes::BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| AgentError::Invalid(format!("reading the body: {e}")))?;
        if (buf.len() + chunk.len()) as u64 > limit {
            return Err(too_large(limit));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

fn too_large(limit: u64) -> AgentError {
    AgentError::TooLarge(format!(
        "request body over this route's limit of {limit} bytes"
    ))
}

/// In front of every agent route, before any body is read: 404 when no
/// pool takes agents (pools come and go with apply, so this is checked per
/// request), 401 without a pool token of this server, 413 when the
/// declared length is over the route's limit.
async fn guard(State(p): State<Pools>, req: Request, next: Next) -> Response {
    if !p.has_remote_pool() {
        return AgentError::NoPools.into_response();
    }
    match bearer(req.headers()) {
        Ok(t) if p.token_known(t) => {}
        Ok(_) => {
            return AgentError::Unauthorized("not a pool token of this server".into())
                .into_response()
        }
        Err(e) => return e.into_response(),
    }
    let limit = body_limit(req.method(), req.uri().path());
    let declared = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return too_large(limit).into_response();
    }
    next.run(req).await
}

/// Agent protocol routes: outside the server token layer (agents hold pool
/// tokens, not the server's admin token). Each route reads its body itself,
/// after the credentials in the headers are checked, within its limit.
pub fn agent_router(pools: Pools) -> Router {
    Router::new()
        .route(&format!("{PREFIX}/register"), post(register))
        .route(&format!("{PREFIX}/poll"), post(poll))
        .route(&format!("{PREFIX}/leases/{{lease}}/workdir"), get(workdir))
        .route(&format!("{PREFIX}/leases/{{lease}}/started"), post(started))
        .route(&format!("{PREFIX}/leases/{{lease}}/log"), post(log))
        .route(&format!("{PREFIX}/leases/{{lease}}/outputs"), put(outputs))
        .route(&format!("{PREFIX}/leases/{{lease}}/result"), post(result))
        .route_layer(axum::middleware::from_fn_with_state(pools.clone(), guard))
        .with_state(pools)
}

async fn register(
    State(p): State<Pools>,
    h: HeaderMap,
    body: Body,
) -> Result<Response, AgentError> {
    let token = bearer(&h)?;
    // An agent registering again while alive proves it is itself.
    let session = h.get(SESSION_HEADER).and_then(|v| v.to_str().ok());
    let r: Register = json_body(&read_body(body, JSON_BODY_LIMIT).await?)?;
    Ok(Json(p.register(r, token, session).await?).into_response())
}

async fn poll(State(p): State<Pools>, h: HeaderMap, body: Body) -> Result<Response, AgentError> {
    let c = creds(&h)?;
    p.check_agent(&c).await?;
    let r: Poll = json_body(&read_body(body, JSON_BODY_LIMIT).await?)?;
    Ok(Json(p.poll(&c, r).await?).into_response())
}

async fn started(l: LeaseCall, body: Body) -> Result<Response, AgentError> {
    let (c, b) = l.read(body, JSON_BODY_LIMIT).await?;
    let s: Started = json_body(&b)?;
    l.p.started(&c, l.lease, s.handle).await?;
    Ok(Json(json!({})).into_response())
}

#[derive(Deserialize)]
struct LogQuery {
    offset: u64,
}

async fn log(l: LeaseCall, Query(q): Query<LogQuery>, body: Body) -> Result<Response, AgentError> {
    let (c, bytes) = l.read(body, LOG_BODY_LIMIT).await?;
    let total = l.p.log(&c, l.lease, q.offset, &bytes).await?;
    Ok(Json(json!({ "received": total })).into_response())
}

async fn result(l: LeaseCall, body: Body) -> Result<Response, AgentError> {
    let (c, b) = l.read(body, JSON_BODY_LIMIT).await?;
    let r: Report = json_body(&b)?;
    l.p.report(&c, l.lease, r.exit).await?;
    Ok(Json(json!({})).into_response())
}

/// The run directory as a tar stream (built in a temporary file first, so a
/// large input is never held in memory).
async fn workdir(l: LeaseCall) -> Result<Response, AgentError> {
    let dir = l.live(|l| l.workdir.clone()).await?;
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
    // Unique within this process; the file is unlinked once open.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = parent.join(format!(".workdir-{}-{n}.tar", std::process::id()));
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
async fn outputs(l: LeaseCall, body: Body) -> Result<Response, AgentError> {
    let (dir, allowed) = l.live(|l| (l.workdir.clone(), l.outputs.clone())).await?;
    let mut tmp = tempfile_in_dir(&dir).map_err(|e| AgentError::Internal(e.to_string()))?;
    let mut stream = body.into_data_stream();
    let mut received: u64 = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| AgentError::Invalid(format!("reading outputs: {e}")))?;
        received += chunk.len() as u64;
        if received > OUTPUTS_BODY_LIMIT {
            return Err(too_large(OUTPUTS_BODY_LIMIT));
        }
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
        Json(pubrun_core::error::json_body(code.as_u16(), None, &msg)),
    )
        .into_response()
}

async fn list_pools(State(p): State<Pools>) -> Response {
    let machines = match p.machines().await {
        Ok(m) => m,
        Err(e) => return admin_err(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
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
    match p.machines().await {
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
        "cordon" => p.cordon(&name, true).await,
        "uncordon" => p.cordon(&name, false).await,
        "drain" => p.drain(&name).await,
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
    match p.agents().await {
        Ok(a) => Json(json!({ "agents": a })).into_response(),
        Err(e) => admin_err(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
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
    match p.cost_report(q.since_ms, p.now_ms()).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => admin_err(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}
