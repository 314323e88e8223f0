//! Serving: one listener, gRPC and HTTP/1.1 multiplexed, cross-site
//! protection, auth, body limits, health, graceful shutdown (connections
//! themselves: `conn.rs`).

use std::future::Future;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use pubrun_broker::Broker;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::conn::ConnLimits;
use crate::csrf::HostPolicy;
use crate::grpc::PubSub;
use crate::pubsub_server::{
    publisher_server::PublisherServer, subscriber_server::SubscriberServer,
};

/// gRPC and REST bodies may carry a 10 MB publish plus framing / base64;
/// also the limit of every other body read whole (manifests, JSON).
const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

#[derive(Clone, Default)]
pub struct ServeOptions {
    /// When set, every request except `/healthz` must carry `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// Jobs and runs; without it only the Pub/Sub APIs are served.
    pub dispatcher: Option<Arc<pubrun_jobs::Dispatcher>>,
    /// Schedules (REST) and webhooks (`/hooks/NAME`).
    pub triggers: Option<Arc<pubrun_triggers::Triggers>>,
    /// The Cloud Storage JSON API.
    pub buckets: Option<pubrun_buckets::Buckets>,
    /// Machine pools: the pools/machines/cost REST API and the agent protocol.
    pub pools: Option<pubrun_pools::Pools>,
    /// The URL clients use to reach this server (`--public-url`), when it
    /// is not the listen address: its host is allowed and its origin is
    /// this server's own.
    pub public_url: Option<String>,
    /// Host names besides IP literals and `localhost` that requests may
    /// name in `Host` / `:authority` (`--allowed-host`).
    pub allowed_hosts: Vec<String>,
    /// Timeouts and the connection cap.
    pub limits: ConnLimits,
    /// A read-only token valid for `GET /metrics` only (`--metrics-token`),
    /// for a Prometheus scraper that must not hold the server token.
    pub metrics_token: Option<String>,
    /// Cluster mode: this server's node name, sent back on every response as
    /// `x-pubrun-node` so a client (or an operator behind a load balancer)
    /// sees which server answered.
    pub node_name: Option<String>,
    /// Cluster mode: the directory behind `GET /api/v1/cluster`.
    pub cluster: Option<crate::cluster::ClusterView>,
}

/// Builds the single router that answers both protocols.
/// Fails when `public_url` or `allowed_hosts` is malformed.
pub fn router(
    broker: Arc<Broker>,
    opts: &ServeOptions,
    shutdown: watch::Receiver<bool>,
) -> Result<Router, String> {
    let hosts = HostPolicy::new(
        &opts.allowed_hosts,
        opts.public_url.as_deref(),
        opts.pools.clone(),
    )?;
    let broker_for_jobs = broker.clone();
    let pubsub = PubSub::new(broker, shutdown);
    let grpc = tonic::service::Routes::new(
        PublisherServer::new(pubsub.clone()).max_decoding_message_size(MAX_BODY_BYTES),
    )
    .add_service(SubscriberServer::new(pubsub.clone()).max_decoding_message_size(MAX_BODY_BYTES))
    .into_axum_router();
    let mut app = grpc.merge(crate::rest::router(pubsub));
    if let Some(d) = &opts.dispatcher {
        app = app.merge(crate::jobs_api::router(
            broker_for_jobs.clone(),
            d.clone(),
            opts.triggers.clone(),
            opts.buckets.clone(),
            opts.pools.clone(),
        ));
    }
    if let Some(t) = &opts.triggers {
        app = app.merge(pubrun_triggers::schedules_router(t.scheduler().clone()));
    }
    if let Some(b) = &opts.buckets {
        app = app.merge(pubrun_buckets::router(b.clone()));
    }
    if let Some(p) = &opts.pools {
        app = app.merge(pubrun_pools::http::admin_router(p.clone()));
    }
    // The web dashboard (`/`, `/ui/…`): behind the token layer, which also
    // takes its session cookie; its login form posts outside it.
    app = app.route(
        "/api/v1/cluster",
        get(crate::cluster::handler).with_state(opts.cluster.clone()),
    );
    let dashboard = crate::dashboard::Dashboard::new(broker_for_jobs.clone(), opts);
    app = app.merge(dashboard.pages());
    let app = app
        .fallback(unknown_route)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            MAX_BODY_BYTES,
            crate::body_limit::limit,
        ));
    let app = match &opts.token {
        Some(t) => app.layer(axum::middleware::from_fn_with_state(
            Arc::new(Auth {
                token: t.clone(),
                sessions: dashboard.sessions(),
            }),
            require_token,
        )),
        None => app,
    };
    // Health is outside the auth layer: load balancers and `pubrun` itself probe it.
    let mut app = app
        .route("/healthz", get(|| async { "ok\n" }))
        .merge(dashboard.login_routes());
    // Metrics check their own tokens: the server's or the metrics token.
    app = app.route(
        "/metrics",
        get(crate::metrics::handler).with_state(Arc::new(crate::metrics::MetricsAuth {
            server_token: opts.token.clone(),
            metrics_token: opts.metrics_token.clone(),
            dispatcher: opts.dispatcher.clone(),
            pools: opts.pools.clone(),
        })),
    );
    // So are webhooks: GitHub cannot send our token; each hook has its own
    // secret (HMAC signature or bearer) and body limit.
    if let Some(t) = &opts.triggers {
        app = app.merge(pubrun_triggers::router(t.webhooks().clone()));
    }
    // And agents: they hold a pool's token, not the server's. Each agent
    // route checks the pool token from the headers, then reads its body
    // itself within its own limit (pools/http.rs); 404 while no pool takes agents.
    if let Some(p) = &opts.pools {
        app = app.merge(pubrun_pools::http::agent_router(p.clone()));
    }
    // Outermost: a request for another host or from another site is
    // refused before authentication or any body is read.
    let app = app.layer(axum::middleware::from_fn_with_state(
        Arc::new(hosts),
        crate::csrf::guard,
    ));
    let app = app.layer(axum::middleware::from_fn(access_log));
    Ok(match opts.node_name.as_deref().map(HeaderValue::from_str) {
        Some(Ok(node)) => app.layer(axum::middleware::from_fn_with_state(node, node_header)),
        Some(Err(_)) => return Err("--node-name must be printable ASCII".to_string()),
        None => app,
    })
}

async fn node_header(State(node): State<HeaderValue>, req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    resp.headers_mut().insert(NODE_HEADER, node);
    resp
}

/// The response header naming the server that answered (cluster mode).
pub const NODE_HEADER: &str = "x-pubrun-node";

/// One debug line per request: method, path (never the query, headers or
/// body, where tokens and data travel), status and time taken.
async fn access_log(req: Request, next: Next) -> Response {
    if !tracing::enabled!(target: "pubrun::access", tracing::Level::DEBUG) {
        return next.run(req).await;
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    let grpc_status = resp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    tracing::debug!(
        target: "pubrun::access",
        %method,
        path,
        status = resp.status().as_u16(),
        grpc_status,
        duration_ms = started.elapsed().as_secs_f64() * 1000.0,
        "request"
    );
    resp
}

/// Unknown gRPC methods get UNIMPLEMENTED, unknown HTTP paths a JSON 404.
async fn unknown_route(req: Request) -> Response {
    if is_grpc(&req) {
        return crate::status::grpc_response(&pubrun_core::Error::unimplemented(format!(
            "method {} is not implemented by pubrun",
            req.uri().path()
        )));
    }
    crate::status::HttpError(pubrun_core::Error::not_found(format!(
        "no such endpoint: {} {}",
        req.method(),
        req.uri().path()
    )))
    .into_response()
}

pub(crate) fn is_grpc(req: &Request) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// What the token layer checks: the bearer token everywhere, or a
/// dashboard session cookie on dashboard paths only.
struct Auth {
    token: String,
    sessions: crate::dashboard::Sessions,
}

async fn require_token(State(auth): State<Arc<Auth>>, req: Request, next: Next) -> Response {
    let token = &auth.token;
    let ok = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(pubrun_core::secret::bearer_token)
        .is_some_and(|given| {
            pubrun_core::secret::verify_bearer(token.as_bytes(), given.as_bytes())
        });
    if ok {
        return next.run(req).await;
    }
    if crate::dashboard::is_dashboard_path(req.uri().path()) && !is_grpc(&req) {
        return crate::dashboard::gate(&auth.sessions, req, next).await;
    }
    let msg = "missing or wrong bearer token: send Authorization: Bearer <token> (the server's --token / PUBRUN_TOKEN)";
    let e = pubrun_core::Error::new(pubrun_core::Code::Unauthenticated, msg);
    if is_grpc(&req) {
        return crate::status::grpc_response(&e);
    }
    crate::status::HttpError(e).into_response()
}

/// Serves until `signal` resolves, then stops accepting, ends streams and
/// drains open connections for a bounded time.
pub async fn serve(
    listener: TcpListener,
    broker: Arc<Broker>,
    opts: ServeOptions,
    signal: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let app = router(broker.clone(), &opts, stop_rx)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    crate::metrics::install_sources(&broker, opts.dispatcher.as_ref(), opts.pools.as_ref());
    let maintenance = broker.spawn_maintenance();
    // Push subscriptions' workers follow the catalog from here on.
    let pusher = pubrun_broker::push::spawn(&broker);
    crate::conn::serve(listener, app, &opts.limits, signal, || {
        tracing::info!("shutting down: no new connections, ending streams");
        let _ = stop_tx.send(true);
    })
    .await;
    maintenance.abort();
    pusher.abort();
    Ok(())
}
