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

impl Shared {
    fn authorized(&self, headers: &HeaderMap) -> Result<(), GoogleError> {
        let got = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        match got {
            Some(v) if v == format!("Bearer {}", self.config.token) => {
                let mut inner = self.inner.lock().unwrap();
                inner.calls += 1;
                match inner.fail_calls.pop_front() {
                    None => Ok(()),
                    Some((code, reason)) => Err(google_error(
                        StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                        reason,
                        format!("Injected failure: {reason}"),
                    )),
                }
            }
            None => Err(google_error(
                StatusCode::UNAUTHORIZED,
                "required",
                "Request is missing required authentication credential. Expected OAuth 2 access token, login cookie or other valid authentication credential.".into(),
            )),
            Some(_) => Err(google_error(
                StatusCode::UNAUTHORIZED,
                "authError",
                "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential.".into(),
            )),
        }
    }

    fn zone_url(&self, p: &str, z: &str) -> String {
        format!("{}projects/{p}/zones/{z}", self.base)
    }

    /// A new operation on `target`, `RUNNING`, or `DONE` when `done`.
    fn operation(
        &self,
        inner: &mut Inner,
        (p, z, name): &Key,
        kind: &str,
        target_id: &str,
        done: bool,
    ) -> Value {
        inner.next_id += 1;
        inner
            .op_log
            .push(((p.clone(), z.clone(), name.clone()), kind.to_string()));
        let op_name = format!(
            "operation-{}-{:x}",
            chrono::Utc::now().timestamp_millis(),
            inner.next_id
        );
        let zone = self.zone_url(p, z);
        let t = now();
        let mut op = json!({
            "kind": "compute#operation",
            "id": (1_000_000 + inner.next_id).to_string(),
            "name": op_name,
            "zone": zone,
            "operationType": kind,
            "targetLink": format!("{zone}/instances/{name}"),
            "targetId": target_id,
            "status": "RUNNING",
            "user": "fake@pubrun.invalid",
            "progress": 0,
            "insertTime": t,
            "startTime": t,
            "selfLink": format!("{zone}/operations/{op_name}"),
        });
        if done {
            finish(&mut op, None);
        }
        inner.operations.insert(op_name, op.clone());
        op
    }

    /// After `delay`, if the instance's generation is still `generation`,
    /// applies `change`; then marks the operation done (with `error`).
    fn later(
        self: &Arc<Self>,
        key: Key,
        op: String,
        generation: u64,
        delay: Duration,
        change: Change,
        error: Option<(String, String)>,
    ) {
        let shared = self.clone();
        tokio::spawn(async move {
            // Stopping: the agent gets its SIGTERM first, like a guest
            // shutting down, and the instance stops once it is gone.
            if matches!(change, Change::Terminate | Change::Remove) {
                let child = {
                    let mut inner = shared.inner.lock().unwrap();
                    inner
                        .instances
                        .get_mut(&key)
                        .filter(|i| i.generation == generation)
                        .and_then(|i| i.agent.take())
                };
                if let Some(child) = child {
                    stop_agent(child).await;
                }
            }
            tokio::time::sleep(delay).await;
            let mut spawn_for = None;
            {
                let mut inner = shared.inner.lock().unwrap();
                let current = inner
                    .instances
                    .get(&key)
                    .is_some_and(|i| i.generation == generation);
                if current {
                    let t = now();
                    match change {
                        Change::Run => {
                            let i = inner.instances.get_mut(&key).unwrap();
                            i.resource["status"] = json!("RUNNING");
                            i.resource["lastStartTimestamp"] = json!(t);
                            spawn_for = Some(i.resource.clone());
                        }
                        Change::Terminate => {
                            let i = inner.instances.get_mut(&key).unwrap();
                            i.resource["status"] = json!("TERMINATED");
                            i.resource["lastStopTimestamp"] = json!(t);
                        }
                        Change::Remove => {
                            inner.instances.remove(&key);
                        }
                    }
                }
                if let Some(o) = inner.operations.get_mut(&op) {
                    finish(o, error.as_ref());
                }
            }
            if let Some(resource) = spawn_for {
                if let Some(child) = shared.boot(&resource) {
                    let mut inner = shared.inner.lock().unwrap();
                    match inner.instances.get_mut(&key) {
                        Some(i) if i.generation == generation => i.agent = Some(child),
                        // Stopped meanwhile: dropping kills it.
                        _ => drop(child),
                    }
                }
            }
            shared.changed.notify_waiters();
        });
    }

    /// The boot hook: what the startup script would run.
    fn boot(&self, instance: &Value) -> Option<tokio::process::Child> {
        let bin = self.config.agent_binary.as_ref()?;
        let item = |k: &str| metadata_item(instance, k);
        let (Some(server), Some(pool), Some(name), Some(slots), Some(token)) = (
            item("pubrun-server"),
            item("pubrun-pool"),
            item("pubrun-name"),
            item("pubrun-slots"),
            item("pubrun-token"),
        ) else {
            tracing::warn!(instance = %instance["name"], "fake gce: no pubrun metadata; no agent started");
            return None;
        };
        let mut cmd = tokio::process::Command::new(bin);
        cmd.args([
            "agent", "--server", &server, "--pool", &pool, "--name", &name, "--slots", &slots,
        ])
        .env("PUBRUN_TOKEN", token)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
        let log = self.config.agent_log_dir.as_ref().and_then(|dir| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join(format!("{name}.log")))
                .ok()
        });
        match log {
            Some(f) => {
                let f2 = f.try_clone().ok()?;
                cmd.stdout(f).stderr(f2);
            }
            None => {
                cmd.stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null());
            }
        }
        match cmd.spawn() {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(error = %e, binary = %bin.display(), "fake gce: cannot start the agent");
                None
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Change {
    Run,
    Terminate,
    Remove,
}

fn finish(op: &mut Value, error: Option<&(String, String)>) {
    op["status"] = json!("DONE");
    op["progress"] = json!(100);
    op["endTime"] = json!(now());
    if let Some((code, message)) = error {
        op["error"] = json!({"errors": [{"code": code, "message": message}]});
        op["httpErrorStatusCode"] = json!(400);
        op["httpErrorMessage"] = json!("BAD REQUEST");
    }
}

/// SIGTERM, then SIGKILL after 10 s.
async fn stop_agent(mut child: tokio::process::Child) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) on our own child's pid, which is not reaped yet.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
        if tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .is_ok()
        {
            return;
        }
    }
    let _ = child.kill().await;
}

/// Checks an insert body as Compute Engine does; the instance to store.
fn validate_insert(shared: &Shared, p: &str, z: &str, body: &Value) -> Result<Value, GoogleError> {
    if !body.is_object() {
        return Err(google_error(
            StatusCode::BAD_REQUEST,
            "parseError",
            "Invalid JSON payload received.".into(),
        ));
    }
    let name = match body["name"].as_str() {
        None | Some("") => return Err(required("resource.name")),
        Some(n) => n,
    };
    if !valid_name(name) {
        return Err(invalid(
            "resource.name",
            name,
            &format!("Must be a match of regex '{NAME_REGEX}'"),
        ));
    }
    let machine_type = match body["machineType"].as_str() {
        None | Some("") => return Err(required("resource.machineType")),
        Some(m) => m,
    };
    // `zones/Z/machineTypes/T`, possibly as a longer URL, in this zone.
    let mt_name = machine_type
        .rsplit_once("zones/")
        .and_then(|(_, rest)| rest.split_once("/machineTypes/"))
        .filter(|(zone, t)| *zone == z && !t.is_empty() && !t.contains('/'))
        .map(|(_, t)| t.to_string());
    let Some(mt_name) = mt_name else {
        return Err(invalid(
            "resource.machineType",
            machine_type,
            &format!("Machine type must be given as zones/{z}/machineTypes/TYPE."),
        ));
    };
    let disks = body["disks"].as_array().cloned().unwrap_or_default();
    let boot: Vec<&Value> = disks.iter().filter(|d| d["boot"] == true).collect();
    if boot.len() != 1 {
        return Err(invalid(
            "resource.disks",
            "",
            "Exactly one boot disk must be specified.",
        ));
    }
    if boot[0]["initializeParams"]["sourceImage"]
        .as_str()
        .is_none_or(str::is_empty)
    {
        return Err(required("resource.disks[0].initializeParams.sourceImage"));
    }
    let nics = body["networkInterfaces"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if nics.is_empty() {
        return Err(required("resource.networkInterfaces"));
    }
    let labels = match &body["labels"] {
        Value::Null => serde_json::Map::new(),
        Value::Object(m) => m.clone(),
        other => {
            return Err(invalid(
                "resource.labels",
                &other.to_string(),
                "Labels must be a map.",
            ))
        }
    };
    if labels.len() > 64 {
        return Err(invalid(
            "resource.labels",
            "",
            "At most 64 labels are allowed.",
        ));
    }
    for (k, v) in &labels {
        if k.is_empty() || !k.starts_with(|c: char| c.is_ascii_lowercase()) || !label_chars(k) {
            return Err(invalid("resource.labels", "", &format!(
                "Label key '{k}' violates format constraints. The key must start with a lowercase character, can only contain lowercase letters, numeric characters, underscores and dashes. The key can be at most 63 characters long. International characters are allowed."
            )));
        }
        if !v.as_str().is_some_and(label_chars) {
            return Err(invalid("resource.labels", "", &format!(
                "Label value '{}' violates format constraints. The value can only contain lowercase letters, numeric characters, underscores and dashes. The value can be at most 63 characters long. International characters are allowed.",
                v.as_str().unwrap_or(&v.to_string())
            )));
        }
    }
    let items = match &body["metadata"]["items"] {
        Value::Null => Vec::new(),
        Value::Array(a) => a.clone(),
        other => {
            return Err(invalid(
                "resource.metadata.items",
                &other.to_string(),
                "Items must be a list.",
            ))
        }
    };
    let mut seen = std::collections::HashSet::new();
    let mut size = 0;
    for (n, item) in items.iter().enumerate() {
        let key = item["key"].as_str().unwrap_or("");
        let key_ok = (1..=128).contains(&key.len())
            && key
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_');
        if !key_ok {
            return Err(invalid(
                &format!("resource.metadata.items[{n}].key"),
                key,
                "Must be a match of regex '[a-zA-Z0-9-_]{1,128}'",
            ));
        }
        if !seen.insert(key.to_string()) {
            return Err(invalid(
                "resource.metadata",
                "",
                &format!("Duplicate metadata key '{key}'."),
            ));
        }
        size += key.len() + item["value"].as_str().map_or(0, str::len);
    }
    if size > 512 * 1024 {
        return Err(invalid(
            "resource.metadata",
            "",
            "Metadata is larger than 512 KB.",
        ));
    }

    let zone = shared.zone_url(p, z);
    let items: Vec<Value> = items
        .iter()
        .map(|i| json!({"key": i["key"], "value": i["value"].as_str().unwrap_or("")}))
        .collect();
    let metadata = json!({"kind": "compute#metadata", "items": items});
    let labels = Value::Object(labels);
    Ok(json!({
        "kind": "compute#instance",
        "creationTimestamp": now(),
        "name": name,
        "description": body["description"].as_str().unwrap_or(""),
        "machineType": format!("{zone}/machineTypes/{mt_name}"),
        "status": "PROVISIONING",
        "zone": zone,
        "canIpForward": false,
        "networkInterfaces": [{
            "kind": "compute#networkInterface",
            "name": "nic0",
            "network": format!("{}projects/{p}/global/networks/default", shared.base),
            "networkIP": "10.128.0.2",
            "accessConfigs": [{
                "kind": "compute#accessConfig",
                "type": "ONE_TO_ONE_NAT",
                "name": "External NAT",
                "natIP": "203.0.113.2",
            }],
        }],
        "disks": [{
            "kind": "compute#attachedDisk",
            "type": "PERSISTENT",
            "mode": "READ_WRITE",
            "source": format!("{zone}/disks/{name}"),
            "deviceName": "persistent-disk-0",
            "index": 0,
            "boot": true,
            "autoDelete": boot[0]["autoDelete"].as_bool().unwrap_or(true),
        }],
        "metadata": {
            "kind": "compute#metadata",
            "fingerprint": fingerprint(&metadata),
            "items": items,
        },
        "labels": labels,
        "labelFingerprint": fingerprint(&labels),
        "selfLink": format!("{zone}/instances/{name}"),
    }))
}

type Zone = Path<(String, String)>;
type Named = Path<(String, String, String)>;

async fn insert(
    State(s): State<Arc<Shared>>,
    Path((p, z)): Zone,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, GoogleError> {
    s.authorized(&headers)?;
    let request_id = q.get("requestId").filter(|r| !r.is_empty()).cloned();
    if let Some(op) = request_id
        .as_ref()
        .and_then(|r| s.inner.lock().unwrap().request_ids.get(r).cloned())
    {
        return Ok(Json(op).into_response());
    }
    let body: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return Err(google_error(
                StatusCode::BAD_REQUEST,
                "parseError",
                format!("Invalid JSON payload received. {e}"),
            ))
        }
    };
    s.inner.lock().unwrap().inserts.push(body.clone());
    let mut resource = match validate_insert(&s, &p, &z, &body) {
        Ok(r) => r,
        Err(r) => return Err(r),
    };
    let name = resource["name"].as_str().unwrap_or_default().to_string();
    let key: Key = (p.clone(), z.clone(), name.clone());
    let mut inner = s.inner.lock().unwrap();
    if inner.instances.contains_key(&key) {
        return Err(google_error(
            StatusCode::CONFLICT,
            "alreadyExists",
            format!("The resource 'projects/{p}/zones/{z}/instances/{name}' already exists"),
        ));
    }
    inner.next_id += 1;
    let id = (4_000_000_000_000_000_000u64 + inner.next_id).to_string();
    resource["id"] = json!(id);
    let failure = inner.fail_next_insert.take();
    let op = s.operation(&mut inner, &key, "insert", &id, false);
    inner.instances.insert(
        key.clone(),
        Instance {
            resource,
            generation: 0,
            agent: None,
        },
    );
    if let Some(r) = request_id {
        inner.request_ids.insert(r, op.clone());
    }
    let op_name = op["name"].as_str().unwrap().to_string();
    let change = if failure.is_some() {
        Change::Remove
    } else {
        Change::Run
    };
    drop(inner);
    s.later(key, op_name, 0, s.config.boot_delay, change, failure);
    Ok(Json(op).into_response())
}

async fn get_instance(
    State(s): State<Arc<Shared>>,
    Path((p, z, name)): Named,
    headers: HeaderMap,
) -> Result<Response, GoogleError> {
    s.authorized(&headers)?;
    let inner = s.inner.lock().unwrap();
    match inner.instances.get(&(p.clone(), z.clone(), name.clone())) {
        Some(i) => Ok(Json(i.resource.clone()).into_response()),
        None => Err(not_found(&p, &z, "instances", &name)),
    }
}

/// `labels.KEY=VALUE` (spaces and quotes around VALUE allowed); `None`
/// when the expression is something else.
fn parse_filter(f: &str) -> Option<(String, String)> {
    let (lhs, rhs) = f.trim().split_once('=')?;
    let key = lhs.trim().strip_prefix("labels.")?;
    let value = rhs.trim();
    let value = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value);
    (!key.is_empty()).then(|| (key.to_string(), value.to_string()))
}

async fn list(
    State(s): State<Arc<Shared>>,
    Path((p, z)): Zone,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, GoogleError> {
    s.authorized(&headers)?;
    let filter = match q.get("filter").map(|f| f.trim()).filter(|f| !f.is_empty()) {
        None => None,
        Some(f) => match parse_filter(f) {
            Some(kv) => Some(kv),
            None => return Err(invalid("filter", f, "Invalid list filter expression.")),
        },
    };
    let max = match q.get("maxResults").map(|m| m.parse::<usize>()) {
        None => 500,
        Some(Ok(m)) if m <= 500 => m.max(1),
        Some(_) => {
            return Err(invalid(
                "maxResults",
                q.get("maxResults").map_or("", |v| v),
                "Must be less than or equal to 500",
            ))
        }
    };
    let start = match q.get("pageToken").map(|t| t.parse::<usize>()) {
        None => 0,
        Some(Ok(n)) => n,
        Some(Err(_)) => {
            return Err(invalid(
                "pageToken",
                q.get("pageToken").map_or("", |v| v),
                "Invalid page token.",
            ))
        }
    };
    let inner = s.inner.lock().unwrap();
    let all: Vec<Value> = inner
        .instances
        .iter()
        .filter(|((ip, iz, _), _)| *ip == p && *iz == z)
        .map(|(_, i)| &i.resource)
        .filter(|r| match &filter {
            None => true,
            Some((k, v)) => r["labels"][k].as_str() == Some(v.as_str()),
        })
        .cloned()
        .collect();
    let zone = s.zone_url(&p, &z);
    let mut out = json!({
        "kind": "compute#instanceList",
        "id": format!("projects/{p}/zones/{z}/instances"),
        "selfLink": format!("{zone}/instances"),
    });
    let page: Vec<Value> = all.iter().skip(start).take(max).cloned().collect();
    // Google leaves out empty lists.
    if !page.is_empty() {
        out["items"] = json!(page);
    }
    if start + max < all.len() {
        out["nextPageToken"] = json!((start + max).to_string());
    }
    Ok(Json(out).into_response())
}

/// start, stop and delete: a state change that takes time and an operation.
async fn transition(
    s: Arc<Shared>,
    key: Key,
    kind: &str,
    headers: HeaderMap,
) -> Result<Response, GoogleError> {
    s.authorized(&headers)?;
    let (p, z, name) = key.clone();
    let mut inner = s.inner.lock().unwrap();
    let Some(inst) = inner.instances.get(&key) else {
        return Err(not_found(&p, &z, "instances", &name));
    };
    let status = inst.resource["status"].as_str().unwrap_or("").to_string();
    let id = inst.resource["id"].as_str().unwrap_or("").to_string();
    let (next, change, delay) = match (kind, status.as_str()) {
        ("start", "RUNNING" | "PROVISIONING" | "STAGING") | ("stop", "TERMINATED") => {
            // Nothing to do: an operation that is already done.
            let op = s.operation(&mut inner, &key, kind, &id, true);
            return Ok(Json(op).into_response());
        }
        ("start", "TERMINATED") => ("STAGING", Change::Run, s.config.boot_delay),
        ("start", _) | ("stop", "STOPPING") => {
            return Err(google_error(
                StatusCode::BAD_REQUEST,
                "resourceNotReady",
                format!("The resource 'projects/{p}/zones/{z}/instances/{name}' is not ready"),
            ))
        }
        ("stop", _) => ("STOPPING", Change::Terminate, s.config.stop_delay),
        _ => ("STOPPING", Change::Remove, s.config.stop_delay),
    };
    let op = s.operation(&mut inner, &key, kind, &id, false);
    let inst = inner.instances.get_mut(&key).unwrap();
    inst.generation += 1;
    inst.resource["status"] = json!(next);
    let generation = inst.generation;
    drop(inner);
    s.later(
        key,
        op["name"].as_str().unwrap().to_string(),
        generation,
        delay,
        change,
        None,
    );
    s.changed.notify_waiters();
    Ok(Json(op).into_response())
}

/// `instances.setMetadata`: replaces the items when the fingerprint is
/// the current one (412 `conditionNotMet` otherwise), as Google does.
async fn set_metadata(
    State(s): State<Arc<Shared>>,
    Path((p, z, name)): Named,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, GoogleError> {
    s.authorized(&headers)?;
    let body: Value = serde_json::from_slice(&body).map_err(|e| {
        google_error(
            StatusCode::BAD_REQUEST,
            "parseError",
            format!("Invalid JSON payload received. {e}"),
        )
    })?;
    let key: Key = (p.clone(), z.clone(), name.clone());
    let mut inner = s.inner.lock().unwrap();
    let Some(i) = inner.instances.get_mut(&key) else {
        return Err(not_found(&p, &z, "instances", &name));
    };
    if body["fingerprint"] != i.resource["metadata"]["fingerprint"] {
        return Err(google_error(
            StatusCode::PRECONDITION_FAILED,
            "conditionNotMet",
            "Supplied fingerprint does not match current metadata fingerprint.".into(),
        ));
    }
    let items = body["items"].clone();
    i.resource["metadata"]["fingerprint"] =
        json!(fingerprint(&json!([items, i.generation, now()])));
    i.resource["metadata"]["items"] = items;
    let id = i.resource["id"].as_str().unwrap_or_default().to_string();
    let op = s.operation(&mut inner, &key, "setMetadata", &id, true);
    drop(inner);
    s.changed.notify_waiters();
    Ok(Json(op).into_response())
}

fn find_operation(s: &Shared, p: &str, z: &str, op: &str) -> Result<Value, GoogleError> {
    let inner = s.inner.lock().unwrap();
    inner
        .operations
        .get(op)
        .filter(|o| o["zone"] == s.zone_url(p, z))
        .cloned()
        .ok_or_else(|| not_found(p, z, "operations", op))
}

async fn get_operation(
    State(s): State<Arc<Shared>>,
    Path((p, z, op)): Named,
    headers: HeaderMap,
) -> Result<Response, GoogleError> {
    s.authorized(&headers)?;
    find_operation(&s, &p, &z, &op).map(|o| Json(o).into_response())
}

/// Like Google's: returns when the operation is `DONE` or after a while
/// (here 30 s, Google's is 2 min) with it still running.
async fn wait_operation(
    State(s): State<Arc<Shared>>,
    Path((p, z, op)): Named,
    headers: HeaderMap,
) -> Result<Response, GoogleError> {
    s.authorized(&headers)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let notified = s.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let o = find_operation(&s, &p, &z, &op)?;
        if o["status"] == "DONE" {
            return Ok(Json(o).into_response());
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return Ok(Json(o).into_response());
        }
    }
}

async fn metadata_token(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if headers.get("metadata-flavor").and_then(|v| v.to_str().ok()) != Some("Google") {
        return (
            StatusCode::FORBIDDEN,
            "Missing Metadata-Flavor:Google header.",
        )
            .into_response();
    }
    Json(json!({
        "access_token": s.config.token,
        "expires_in": 3599,
        "token_type": "Bearer",
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_filters() {
        assert!(valid_name("pubrun-big-1"));
        assert!(valid_name("a"));
        assert!(!valid_name("Big"));
        assert!(!valid_name("1abc"));
        assert!(!valid_name("abc-"));
        assert!(!valid_name(&"a".repeat(64)));
        assert_eq!(
            parse_filter("labels.pubrun-pool = \"big\""),
            Some(("pubrun-pool".into(), "big".into()))
        );
        assert_eq!(
            parse_filter("labels.pubrun-pool=big"),
            Some(("pubrun-pool".into(), "big".into()))
        );
        assert_eq!(parse_filter("name=big"), None);
    }
}
