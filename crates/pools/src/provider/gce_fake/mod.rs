//! A small fake of the Compute Engine API v1 — only the calls
//! [`super::gce::GceProvider`] makes — for tests and local demos. Nothing
//! here has been checked against real GCP beyond Google's published
//! reference; the provider is untested against the real service.
//!
//! Served on `127.0.0.1` (axum), under `/compute/v1/`:
//! * `POST  projects/P/zones/Z/instances` (insert), `GET …/instances` (list,
//!   `filter=labels.KEY=VALUE`, `maxResults`, `pageToken`),
//!   `GET|DELETE …/instances/NAME`, `POST …/instances/NAME/start|stop`;
//! * `GET …/zones/Z/operations/OP` and `POST …/operations/OP/wait`;
//! * the metadata server's token endpoint
//!   `/computeMetadata/v1/instance/service-accounts/default/token`
//!   (requires `Metadata-Flavor: Google`).
//!
//! Every Compute call needs `Authorization: Bearer TOKEN`. Inputs are
//! validated like Google does (instance name regex, label rules, metadata
//! keys, required fields) and errors use Google's JSON error body.
//! Instances move `PROVISIONING → RUNNING` after `boot_delay`, `STOPPING →
//! TERMINATED` (or gone, on delete) after `stop_delay`; the operation that
//! asked is `RUNNING` meanwhile and `DONE` after.
//!
//! Boot hook: with [`FakeGceConfig::agent_binary`] set, an instance that
//! becomes `RUNNING` spawns `BINARY agent --server S --pool P --name N
//! --slots K` with `PUBRUN_TOKEN` in its environment, all read from the
//! instance's metadata (what the real startup script does), and the process
//! gets SIGTERM (SIGKILL after 10 s) when the instance stops or is deleted.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde_json::{json, Value};
use tokio::sync::Notify;

mod api;
mod instances;

use api::{
    get_instance, get_operation, insert, list, metadata_token, set_metadata, transition,
    wait_operation, Named,
};
use instances::Change;

const NAME_REGEX: &str = "(?:[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?)";

#[derive(Debug, Clone)]
pub struct FakeGceConfig {
    /// The only bearer token accepted (also what the metadata endpoint hands out).
    pub token: String,
    /// `PROVISIONING`/`STAGING` → `RUNNING`.
    pub boot_delay: Duration,
    /// `STOPPING` → `TERMINATED` (or deleted).
    pub stop_delay: Duration,
    /// A `pubrun` binary: running instances run `pubrun agent` (see module doc).
    pub agent_binary: Option<PathBuf>,
    /// Where agents' output goes (`NAME.log`); none: discarded.
    pub agent_log_dir: Option<PathBuf>,
}

impl Default for FakeGceConfig {
    fn default() -> Self {
        FakeGceConfig {
            token: "fake-gce-token".into(),
            boot_delay: Duration::from_millis(200),
            stop_delay: Duration::from_millis(200),
            agent_binary: None,
            agent_log_dir: None,
        }
    }
}

/// A running fake; stops (and kills its agents) when dropped.
pub struct FakeGce {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

type Key = (String, String, String); // project, zone, instance

struct Shared {
    config: FakeGceConfig,
    base: String,
    inner: Mutex<Inner>,
    /// Woken at every state change (operation waits).
    changed: Notify,
}

#[derive(Default)]
struct Inner {
    instances: BTreeMap<Key, Instance>,
    operations: HashMap<String, Value>,
    next_id: u64,
    fail_next_insert: Option<(String, String)>,
    /// Every insert body received (parsed JSON), accepted or not.
    inserts: Vec<Value>,
    /// Every operation created, in order: (instance key, operationType).
    op_log: Vec<(Key, String)>,
    /// Errors the next Compute calls get instead of an answer: (HTTP status, reason).
    fail_calls: std::collections::VecDeque<(u16, &'static str)>,
    /// Compute calls received (after authentication).
    calls: usize,
    /// `requestId` of accepted inserts → their operation: a repeated insert
    /// gets the same operation, as on Google.
    request_ids: HashMap<String, Value>,
}

struct Instance {
    resource: Value,
    /// Bumped by every start/stop/delete, so a stale transition does nothing.
    generation: u64,
    agent: Option<tokio::process::Child>,
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, false)
}

/// Google's JSON error body, as a small value (a `Response` is large).
struct GoogleError {
    code: StatusCode,
    reason: &'static str,
    message: String,
}

impl IntoResponse for GoogleError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "code": self.code.as_u16(),
            "message": self.message,
            "errors": [{"message": self.message, "domain": "global", "reason": self.reason}],
        }});
        (self.code, Json(body)).into_response()
    }
}

fn google_error(code: StatusCode, reason: &'static str, message: String) -> GoogleError {
    GoogleError {
        code,
        reason,
        message,
    }
}

fn invalid(field: &str, value: &str, why: &str) -> GoogleError {
    google_error(
        StatusCode::BAD_REQUEST,
        "invalid",
        format!("Invalid value for field '{field}': '{value}'. {why}"),
    )
}

fn required(field: &str) -> GoogleError {
    google_error(
        StatusCode::BAD_REQUEST,
        "required",
        format!("Required field '{field}' not specified"),
    )
}

fn not_found(p: &str, z: &str, what: &str, name: &str) -> GoogleError {
    google_error(
        StatusCode::NOT_FOUND,
        "notFound",
        format!("The resource 'projects/{p}/zones/{z}/{what}/{name}' was not found"),
    )
}

/// `[a-z]([-a-z0-9]{0,61}[a-z0-9])?`
pub fn valid_name(n: &str) -> bool {
    let b = n.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && *b.last().unwrap() != b'-'
}

fn label_chars(s: &str) -> bool {
    s.len() <= 63
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-')
}

fn fingerprint(v: &Value) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    v.to_string().hash(&mut h);
    base64::engine::general_purpose::STANDARD.encode(h.finish().to_be_bytes())
}

fn metadata_item(instance: &Value, key: &str) -> Option<String> {
    instance["metadata"]["items"]
        .as_array()?
        .iter()
        .find(|i| i["key"] == key)?["value"]
        .as_str()
        .map(str::to_string)
}

impl FakeGce {
    pub async fn start(config: FakeGceConfig) -> std::io::Result<FakeGce> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            config,
            base: format!("http://{addr}/compute/v1/"),
            inner: Mutex::new(Inner::default()),
            changed: Notify::new(),
        });
        let zone = "/compute/v1/projects/{project}/zones/{zone}";
        // `instances.start`, `.stop` and `.delete` differ only in the change
        // they ask for.
        let to = |kind: &'static str| {
            move |State(s): State<Arc<Shared>>, Path(key): Named, headers: HeaderMap| {
                transition(s, key, kind, headers)
            }
        };
        let app = Router::new()
            .route(&format!("{zone}/instances"), post(insert).get(list))
            .route(
                &format!("{zone}/instances/{{name}}"),
                get(get_instance).delete(to("delete")),
            )
            .route(
                &format!("{zone}/instances/{{name}}/start"),
                post(to("start")),
            )
            .route(&format!("{zone}/instances/{{name}}/stop"), post(to("stop")))
            .route(
                &format!("{zone}/instances/{{name}}/setMetadata"),
                post(set_metadata),
            )
            .route(&format!("{zone}/operations/{{op}}"), get(get_operation))
            .route(
                &format!("{zone}/operations/{{op}}/wait"),
                post(wait_operation),
            )
            .route(
                "/computeMetadata/v1/instance/service-accounts/default/token",
                get(metadata_token),
            )
            .with_state(shared.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(FakeGce {
            addr,
            shared,
            server,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// For `GceProviderSpec::api_base`: `http://127.0.0.1:PORT/compute/v1/`.
    pub fn api_base(&self) -> String {
        self.shared.base.clone()
    }

    /// For `GceProvider::with_metadata_token_url`.
    pub fn metadata_token_url(&self) -> String {
        format!(
            "http://{}/computeMetadata/v1/instance/service-accounts/default/token",
            self.addr
        )
    }

    /// The stored instance resource, as `instances.get` would return it.
    pub fn instance(&self, project: &str, zone: &str, name: &str) -> Option<Value> {
        let inner = self.shared.inner.lock().unwrap();
        inner
            .instances
            .get(&(project.into(), zone.into(), name.into()))
            .map(|i| i.resource.clone())
    }

    /// The pid of the agent the boot hook runs for that instance.
    pub fn agent_pid(&self, project: &str, zone: &str, name: &str) -> Option<u32> {
        let inner = self.shared.inner.lock().unwrap();
        inner
            .instances
            .get(&(project.into(), zone.into(), name.into()))?
            .agent
            .as_ref()?
            .id()
    }

    /// The bodies of every `instances.insert` received (valid JSON), in
    /// order, whether or not the insert was accepted.
    pub fn inserts(&self) -> Vec<Value> {
        self.shared.inner.lock().unwrap().inserts.clone()
    }

    /// The `operationType` of every operation on that instance, oldest
    /// first: `insert`, `start`, `stop`, `delete` (a refused request, such
    /// as an insert answered 409, makes none).
    pub fn operations(&self, project: &str, zone: &str, name: &str) -> Vec<String> {
        let key: Key = (project.into(), zone.into(), name.into());
        let inner = self.shared.inner.lock().unwrap();
        inner
            .op_log
            .iter()
            .filter(|(k, _)| *k == key)
            .map(|(_, kind)| kind.clone())
            .collect()
    }

    /// The next `n` Compute calls are answered with this HTTP status and
    /// reason (`429 rateLimitExceeded`, `503 backendError`, `403
    /// rateLimitExceeded`), in Google's error body.
    pub fn fail_next_calls(&self, n: usize, status: u16, reason: &'static str) {
        let mut inner = self.shared.inner.lock().unwrap();
        for _ in 0..n {
            inner.fail_calls.push_back((status, reason));
        }
    }

    /// Compute calls received so far (failed ones included).
    pub fn calls(&self) -> usize {
        self.shared.inner.lock().unwrap().calls
    }

    /// Reclaims a spot instance as Google does with
    /// `instanceTerminationAction = DELETE`: its agent is killed and the
    /// instance is gone.
    pub fn reclaim(&self, project: &str, zone: &str, name: &str) {
        let key: Key = (project.into(), zone.into(), name.into());
        let removed = self.shared.inner.lock().unwrap().instances.remove(&key);
        // Dropping the child kills the agent (kill_on_drop).
        drop(removed);
        self.shared.changed.notify_waiters();
    }

    /// The next insert is accepted but its operation ends with this error
    /// (e.g. `ZONE_RESOURCE_POOL_EXHAUSTED`) and no instance is left, as
    /// when a zone is out of capacity.
    pub fn fail_next_insert(&self, code: &str, message: &str) {
        self.shared.inner.lock().unwrap().fail_next_insert = Some((code.into(), message.into()));
    }
}

impl Drop for FakeGce {
    fn drop(&mut self) {
        self.server.abort();
        // kill_on_drop: dropping the children kills the agents.
        if let Ok(mut inner) = self.shared.inner.lock() {
            for i in inner.instances.values_mut() {
                i.agent.take();
            }
        }
    }
}
