//! The web dashboard: server-rendered HTML (maud, which escapes every
//! interpolated value) on the API's port, with one small hand-written
//! script for live logs.
//!
//! | path | what |
//! |---|---|
//! | `GET /` | overview: subscriptions, jobs, machines, recent failures |
//! | `GET /ui/runs?job=&status=&before=` | runs, newest first, 50 a page |
//! | `GET /ui/runs/{id}` | one run; `…/log/events` streams its log (SSE) |
//! | `POST /ui/runs/{id}/cancel`, `…/rerun` | cancel; run again with the same message |
//! | `GET /ui/jobs`, `/ui/jobs/{name}`; `POST /ui/jobs/{name}/trigger` | jobs as applied |
//! | `GET /ui/schedules`; `POST /ui/schedules/{name}/pause\|resume\|run-now` | schedules |
//! | `GET /ui/buckets`, `/ui/buckets/{b}?prefix=`, `…/download?name=` | objects |
//! | `GET /ui/pools`; `POST /ui/machines/{name}/cordon\|uncordon\|drain` | pools, machines, cost |
//! | `POST /login`, `POST /ui/logout` | sessions (`auth.rs`) |
//!
//! Security: see `auth.rs` for sessions and CSRF. Every page is sent with a
//! Content-Security-Policy that allows only this server's own script, so
//! even markup that slipped through could not run; downloads are always
//! attachments of type `application/octet-stream`.

mod auth;
mod buckets;
mod jobs;
mod layout;
mod overview;
mod pools;
mod rates;
mod runs;

use std::sync::Arc;

use axum::extract::{FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use pubrun_broker::Broker;

pub use auth::{gate, Sessions};

use crate::server::ServeOptions;

/// Whether `path` is a dashboard page or action: these (and only these)
/// accept the session cookie in place of the bearer token.
pub fn is_dashboard_path(path: &str) -> bool {
    path == "/" || path.starts_with("/ui/")
}

/// What the pages read from: the same services the REST API uses.
#[derive(Clone)]
pub struct Dashboard {
    inner: Arc<Inner>,
}

struct Inner {
    broker: Arc<Broker>,
    dispatcher: Option<Arc<pubrun_jobs::Dispatcher>>,
    triggers: Option<Arc<pubrun_triggers::Triggers>>,
    buckets: Option<pubrun_buckets::Buckets>,
    pools: Option<pubrun_pools::Pools>,
    sessions: Sessions,
    /// The server's token: with one, sessions begin at the login form.
    token: Option<String>,
    /// Mark the cookie `Secure` when users reach us over https.
    secure_cookie: bool,
    /// Publish/ack counter readings for the overview's rates.
    rates: rates::Rates,
}

impl Dashboard {
    pub fn new(broker: Arc<Broker>, opts: &ServeOptions) -> Dashboard {
        let d = Dashboard {
            inner: Arc::new(Inner {
                broker,
                dispatcher: opts.dispatcher.clone(),
                triggers: opts.triggers.clone(),
                buckets: opts.buckets.clone(),
                pools: opts.pools.clone(),
                sessions: Sessions::default(),
                token: opts.token.clone(),
                secure_cookie: opts
                    .public_url
                    .as_deref()
                    .is_some_and(|u| u.starts_with("https://")),
                rates: rates::Rates::default(),
            }),
        };
        rates::spawn_sampler(Arc::downgrade(&d.inner));
        d
    }

    pub fn sessions(&self) -> Sessions {
        self.inner.sessions.clone()
    }

    /// Pages and actions; mounted inside the server's token layer.
    pub fn pages(&self) -> Router {
        Router::new()
            .route("/", get(overview::page))
            .route("/ui/static/app.js", get(layout::script))
            .route("/ui/runs", get(runs::list))
            .route("/ui/runs/{id}", get(runs::show))
            .route("/ui/runs/{id}/log/events", get(runs::log_events))
            .route("/ui/runs/{id}/cancel", post(runs::cancel))
            .route("/ui/runs/{id}/rerun", post(runs::rerun))
            .route("/ui/jobs", get(jobs::list))
            .route("/ui/jobs/{name}", get(jobs::show))
            .route("/ui/jobs/{name}/trigger", post(jobs::trigger))
            .route("/ui/schedules", get(jobs::schedules))
            .route("/ui/schedules/{name}/{action}", post(jobs::schedule_action))
            .route("/ui/buckets", get(buckets::list))
            .route("/ui/buckets/{bucket}", get(buckets::objects))
            .route("/ui/buckets/{bucket}/download", get(buckets::download))
            .route("/ui/pools", get(pools::page))
            .route("/ui/machines/{name}/{action}", post(pools::machine_action))
            .route("/ui/logout", post(auth::logout))
            .route("/ui/{*rest}", get(not_found))
            .layer(axum::middleware::from_fn_with_state(
                self.clone(),
                auth::session_layer,
            ))
            .layer(axum::middleware::from_fn(security_headers))
            .with_state(self.clone())
    }

    /// The login form's target; mounted outside the token layer.
    pub fn login_routes(&self) -> Router {
        Router::new()
            .route("/login", post(auth::login))
            .layer(axum::middleware::from_fn(security_headers))
            .with_state(self.clone())
    }
}

/// Headers every dashboard response carries.
async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    add_security_headers(&mut resp);
    resp
}

fn add_security_headers(resp: &mut Response) {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src 'self' data:; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
}

/// A service the server can run without: its pages answer 404 while it is off.
fn enabled<'a, T>(service: &'a Option<T>, what: &str) -> Result<&'a T, UiError> {
    service
        .as_ref()
        .ok_or_else(|| UiError::new(StatusCode::NOT_FOUND, format!("{what} are not enabled")))
}

/// What every page handler gets: the services and the caller's session
/// (for the CSRF field of its forms).
pub(crate) struct Ctx {
    pub d: Dashboard,
    pub csrf: String,
}

impl Ctx {
    fn broker(&self) -> &Arc<Broker> {
        &self.d.inner.broker
    }
    fn dispatcher(&self) -> Result<&Arc<pubrun_jobs::Dispatcher>, UiError> {
        enabled(&self.d.inner.dispatcher, "jobs")
    }
    /// Now by the broker's clock, the one every stored timestamp was taken
    /// with (a manual clock in tests), so "ago" columns agree with it.
    fn now_ms(&self) -> i64 {
        self.broker().clock().now_ms()
    }
    fn logged_in(&self) -> bool {
        self.d.inner.token.is_some()
    }
}

impl FromRequestParts<Dashboard> for Ctx {
    type Rejection = UiError;

    async fn from_request_parts(parts: &mut Parts, d: &Dashboard) -> Result<Ctx, UiError> {
        let s = parts
            .extensions
            .get::<auth::Session>()
            .ok_or_else(|| UiError::new(StatusCode::UNAUTHORIZED, "no session"))?;
        Ok(Ctx {
            d: d.clone(),
            csrf: s.csrf.clone(),
        })
    }
}

/// An error shown as a page.
#[derive(Debug)]
pub(crate) struct UiError {
    status: StatusCode,
    message: String,
}

impl UiError {
    fn new(status: StatusCode, message: impl Into<String>) -> UiError {
        UiError {
            status,
            message: message.into(),
        }
    }
}

impl From<pubrun_core::Error> for UiError {
    fn from(e: pubrun_core::Error) -> UiError {
        let status =
            StatusCode::from_u16(e.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        UiError::new(status, e.message)
    }
}

impl From<pubrun_buckets::GcsError> for UiError {
    fn from(e: pubrun_buckets::GcsError) -> UiError {
        UiError::new(
            StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            e.message,
        )
    }
}

impl IntoResponse for UiError {
    fn into_response(self) -> Response {
        let body = maud::html! {
            h1 { "Error " (self.status.as_u16()) }
            p.error { (self.message) }
            p { a href="/" { "Back to the overview" } }
        };
        (self.status, layout::bare("Error", body)).into_response()
    }
}

type UiResult = Result<Response, UiError>;

async fn not_found(req: Request) -> UiError {
    UiError::new(
        StatusCode::NOT_FOUND,
        format!("no page {}", req.uri().path()),
    )
}

/// Query strings: a malformed one is a 400 page.
fn query<T>(
    q: Result<axum::extract::Query<T>, axum::extract::rejection::QueryRejection>,
) -> Result<T, UiError> {
    q.map(|axum::extract::Query(v)| v)
        .map_err(|e| UiError::new(StatusCode::BAD_REQUEST, e.body_text()))
}

/// Runs the run store's blocking calls off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> pubrun_core::Result<T> + Send + 'static,
) -> Result<T, UiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| UiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(UiError::from)
}

/// After an action: back to a page (303, so a reload does not post again).
fn see_other(to: &str) -> Response {
    (
        StatusCode::SEE_OTHER,
        [(
            header::LOCATION,
            HeaderValue::from_str(to).unwrap_or(HeaderValue::from_static("/")),
        )],
    )
        .into_response()
}
