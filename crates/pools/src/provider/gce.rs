//! Machines as Compute Engine instances, through the Compute Engine REST API
//! v1 (`instances.insert/get/list/start/stop/delete`, `zoneOperations.wait`).
//!
//! **Tested only against `gce_fake` (feature `gce-fake`), never against real GCP.** The
//! request and response shapes follow Google's published reference.
//!
//! An instance carries the labels `pubrun-pool` and `pubrun-machine` (values
//! reduced to what label values allow) and the metadata items
//! `pubrun-server`, `pubrun-pool`, `pubrun-name`, `pubrun-slots`,
//! `pubrun-token` (a one-time bootstrap token, replaced through
//! `instances.setMetadata` before a stopped instance is started again)
//! and a `startup-script` that reads them back from the
//! metadata server and runs `pubrun agent` (the token in its environment,
//! not argv). The boot image must have `pubrun` on `PATH` or at
//! `/usr/local/bin/pubrun`. Metadata is set at insert only: an existing
//! stopped instance is started with the metadata it has.
//!
//! Every mutating call returns a zone operation, which is followed to `DONE`
//! (`operations/NAME/wait`); errors recorded in the operation are
//! [`ProviderError::Refused`]. HTTP errors use Google's JSON error body:
//! 404 is "gone", 409 `alreadyExists` on insert means "start the stopped
//! instance instead", 429/5xx and connection failures are
//! [`ProviderError::Unavailable`], other 4xx are [`ProviderError::Refused`].
//!
//! Auth: `Authorization: Bearer` with the token in the environment variable
//! `access_token_env` (read at every call, so it can be refreshed from
//! outside), or, when that is empty, a token of the instance's service
//! account from the metadata server (cached until shortly before it expires).
//!
//! TLS: rustls with the system's root certificates (`SSL_CERT_FILE`
//! overrides them); an `http://` API base is for fakes and proxies.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pubrun_connections::TokenSource;

use pubrun_core::pool::GceProviderSpec;
use reqwest::Method;
use serde_json::{json, Value};
use tokio::sync::Mutex;

use super::{MachineLaunch, MachineProvider, ProviderError, ProviderStatus};

pub const DEFAULT_API_BASE: &str = "https://compute.googleapis.com/compute/v1/";
pub const METADATA_TOKEN_URL: &str =
    "http://metadata.google.internal/computeMetadata/v1/instance/service-accounts/default/token";
pub const POOL_LABEL: &str = "pubrun-pool";
pub const MACHINE_LABEL: &str = "pubrun-machine";

/// Run at every boot of an instance: reads the agent's settings from the
/// metadata server and starts `pubrun agent` in the background (a startup
/// script that never ends would keep the guest agent's unit activating).
pub const STARTUP_SCRIPT: &str = r#"#!/bin/sh
# Written by pubrun: joins this instance to its pool as a `pubrun agent`.
md() {
  u="http://metadata.google.internal/computeMetadata/v1/instance/attributes/$1"
  if command -v curl >/dev/null 2>&1; then
    curl -fsS -H 'Metadata-Flavor: Google' "$u"
  else
    wget -q -O - --header 'Metadata-Flavor: Google' "$u"
  fi
}
server="$(md pubrun-server)" && pool="$(md pubrun-pool)" && name="$(md pubrun-name)" && slots="$(md pubrun-slots)" || exit 1
PUBRUN_TOKEN="$(md pubrun-token)" || exit 1
export PUBRUN_TOKEN
bin="$(command -v pubrun || echo /usr/local/bin/pubrun)"
nohup "$bin" agent --server "$server" --pool "$pool" --name "$name" --slots "$slots" \
  >>/var/log/pubrun-agent.log 2>&1 </dev/null &
"#;

/// Longest a single insert/start/stop/delete is followed.
const DEFAULT_OPERATION_TIMEOUT: Duration = Duration::from_secs(300);
/// `operations.wait` answers within 2 minutes; leave room for that.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(150);

pub struct GceProvider {
    spec: GceProviderSpec,
    /// Ends with `/`.
    base: String,
    token_url: String,
    http: reqwest::Client,
    /// Metadata-server token and when to fetch a new one.
    cached: Mutex<Option<(String, Instant)>>,
    /// The zone each machine was last seen in (several zones per pool).
    zone_of: std::sync::Mutex<std::collections::HashMap<String, String>>,
    /// The connection's credentials, when the pool is on one.
    tokens: Option<Arc<TokenSource>>,
    op_timeout: Duration,
    /// First delay of the retry backoff (tests shorten it).
    retry_base: Duration,
}

/// Attempts of one API call on retryable errors (429, 5xx,
/// `rateLimitExceeded`), with exponential backoff and full jitter.
const CALL_ATTEMPTS: u32 = 6;
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Operation error codes that say "not now" rather than "never":
/// capacity and quota, which come and go.
const TEMPORARY_OPERATION_ERRORS: &[&str] = &[
    "ZONE_RESOURCE_POOL_EXHAUSTED",
    "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS",
    "RESOURCE_POOL_EXHAUSTED",
    "QUOTA_EXCEEDED",
    "RESOURCE_NOT_READY",
];

/// A uniformly random duration in `[0, max]` (full jitter).
fn jitter(max: Duration) -> Duration {
    let mut b = [0u8; 8];
    let r = if getrandom::fill(&mut b).is_ok() {
        u64::from_le_bytes(b)
    } else {
        u64::from(std::process::id())
    };
    let ms = max.as_millis().max(1) as u64;
    Duration::from_millis(r % (ms + 1))
}

/// A random UUID (v4), as Compute wants for `requestId`.
fn request_id() -> String {
    let mut b = [0u8; 16];
    let _ = getrandom::fill(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The Compute instance name of a machine: Compute wants
/// `[a-z]([-a-z0-9]{0,61}[a-z0-9])?`. A valid name is kept; any other is
/// lowercased, has other characters replaced by `-` and, when that changed
/// it or it is too long, gets a hash of the original so two machine names
/// never share an instance.
pub fn instance_name(machine: &str) -> String {
    let valid = |n: &str| {
        n.len() <= 63
            && n.starts_with(|c: char| c.is_ascii_lowercase())
            && !n.ends_with('-')
            && n.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    };
    if valid(machine) {
        return machine.to_string();
    }
    let mut n: String = machine
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    if !n.starts_with(|c: char| c.is_ascii_lowercase()) {
        n.insert(0, 'm');
    }
    // FNV-1a: stable across releases (std's hasher is not).
    let mut h: u32 = 0x811c_9dc5;
    for b in machine.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    let suffix = format!("-{h:08x}");
    n.truncate(63 - suffix.len());
    let n = n.trim_end_matches('-');
    format!("{n}{suffix}")
}

/// A failed API call, before it becomes a [`ProviderError`].
enum CallError {
    /// Google answered with an error status.
    Status {
        code: u16,
        reason: String,
        message: String,
    },
    /// Anything else, already classified.
    Provider(ProviderError),
}

impl CallError {
    fn into_provider(self, what: &str) -> ProviderError {
        match self {
            CallError::Status {
                code,
                reason,
                message,
            } => {
                let text = format!("{what}: {code} {reason}: {message}");
                let rate_limited = code == 403 && reason.ends_with("ateLimitExceeded");
                if code == 429 || code >= 500 || rate_limited {
                    ProviderError::Unavailable(text)
                } else {
                    ProviderError::Refused(text)
                }
            }
            CallError::Provider(p) => p,
        }
    }

    fn retryable(&self) -> bool {
        match self {
            CallError::Status { code, reason, .. } => {
                *code == 429
                    || *code >= 500
                    || (*code == 403
                        && matches!(
                            reason.as_str(),
                            "rateLimitExceeded" | "userRateLimitExceeded"
                        ))
            }
            CallError::Provider(ProviderError::Unavailable(_)) => true,
            CallError::Provider(_) => false,
        }
    }

    fn is(&self, status: u16) -> bool {
        matches!(self, CallError::Status { code, .. } if *code == status)
    }
}

/// A label value as Compute Engine allows it: lowercase letters, digits,
/// `_` and `-`, at most 63 characters.
pub fn label_value(v: &str) -> String {
    v.chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect()
}

/// A label key: like a value, but non-empty and starting with a letter.
fn label_key(k: &str) -> Option<String> {
    let v = label_value(k);
    if v.is_empty() {
        None
    } else if v.starts_with(|c: char| c.is_ascii_lowercase()) {
        Some(v)
    } else {
        Some(format!("l-{v}").chars().take(63).collect())
    }
}

pub fn status_of(gce_status: &str) -> ProviderStatus {
    match gce_status {
        "RUNNING" => ProviderStatus::Running,
        "STOPPING" | "SUSPENDING" | "PENDING_STOP" | "DEPROVISIONING" => ProviderStatus::Stopping,
        "TERMINATED" | "STOPPED" | "SUSPENDED" => ProviderStatus::Stopped,
        // PROVISIONING, STAGING, REPAIRING, and whatever Google adds.
        _ => ProviderStatus::Pending,
    }
}

fn metadata_item<'a>(instance: &'a Value, key: &str) -> Option<&'a str> {
    instance["metadata"]["items"]
        .as_array()?
        .iter()
        .find(|i| i["key"] == key)?["value"]
        .as_str()
}

impl GceProvider {
    /// Checks the spec; contacts nothing.
    pub fn new(spec: &GceProviderSpec) -> Result<Self, ProviderError> {
        for (field, v) in [
            ("project", &spec.project),
            ("zone", &spec.zone),
            ("machine_type", &spec.machine_type),
            ("source_image", &spec.source_image),
            ("server_url", &spec.server_url),
        ] {
            if v.is_empty() {
                return Err(ProviderError::Refused(format!(
                    "gce pool: {field} is required"
                )));
            }
        }
        let mut base = if spec.api_base.is_empty() {
            DEFAULT_API_BASE.to_string()
        } else {
            spec.api_base.clone()
        };
        if !base.ends_with('/') {
            base.push('/');
        }
        if !base.starts_with("https://") && !base.starts_with("http://") {
            return Err(ProviderError::Refused(format!(
                "gce pool: api_base {base} is not an https:// or http:// URL"
            )));
        }
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| ProviderError::Refused(format!("gce pool: HTTP client: {e}")))?;
        // On a connection: its key file is read (and checked) now.
        let tokens = match &spec.connection {
            Some(c) => Some(Arc::new(
                TokenSource::new(&c.name, &c.credentials, http.clone())
                    .map_err(|e| ProviderError::Refused(format!("gce pool: {e}")))?,
            )),
            None => None,
        };
        Ok(GceProvider {
            spec: spec.clone(),
            base,
            token_url: METADATA_TOKEN_URL.to_string(),
            http,
            cached: Mutex::new(None),
            tokens,
            zone_of: Default::default(),
            op_timeout: DEFAULT_OPERATION_TIMEOUT,
            retry_base: Duration::from_secs(1),
        })
    }

    /// Where to get a token when `access_token_env` is empty (tests point
    /// this at the fake).
    pub fn with_metadata_token_url(mut self, url: &str) -> Self {
        self.token_url = url.to_string();
        self
    }

    /// The first retry delay (it doubles, with jitter, up to 30 s).
    pub fn with_retry_base(mut self, base: Duration) -> Self {
        self.retry_base = base;
        self
    }

    /// How long one operation is followed before giving up (Unavailable).
    pub fn with_operation_timeout(mut self, timeout: Duration) -> Self {
        self.op_timeout = timeout;
        self
    }

    fn zone_url(&self, zone: &str) -> String {
        format!("{}projects/{}/zones/{zone}", self.base, self.spec.project)
    }

    fn instance_url(&self, zone: &str, name: &str) -> String {
        format!("{}/instances/{}", self.zone_url(zone), instance_name(name))
    }

    /// The pool's zones, the first one preferred.
    fn zones(&self) -> Vec<String> {
        let mut z = vec![self.spec.zone.clone()];
        for x in &self.spec.zones {
            if !z.contains(x) {
                z.push(x.clone());
            }
        }
        z
    }

    fn remember_zone(&self, name: &str, zone: &str) {
        self.zone_of
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), zone.to_string());
    }

    async fn token(&self) -> Result<String, ProviderError> {
        if let Some(ts) = &self.tokens {
            return match ts.token().await {
                Ok(t) => Ok(t.secret().to_string()),
                Err(e) if e.kind.is_retryable() => {
                    Err(ProviderError::Unavailable(format!("gce pool: {e}")))
                }
                Err(e) => Err(ProviderError::Refused(format!("gce pool: {e}"))),
            };
        }
        let env = &self.spec.access_token_env;
        if !env.is_empty() {
            return match std::env::var(env) {
                Ok(t) if !t.is_empty() => Ok(t),
                _ => Err(ProviderError::Refused(format!(
                    "gce pool: the environment variable {env} (access_token_env) is not set"
                ))),
            };
        }
        let mut cached = self.cached.lock().await;
        if let Some((t, until)) = &*cached {
            if Instant::now() < *until {
                return Ok(t.clone());
            }
        }
        let resp = self
            .http
            .get(&self.token_url)
            .header("Metadata-Flavor", "Google")
            .send()
            .await
            .map_err(|e| {
                ProviderError::Unavailable(format!(
                    "gce pool: no access token from the metadata server {}: {e}",
                    self.token_url
                ))
            })?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        let token = body["access_token"].as_str().unwrap_or_default();
        if !status.is_success() || token.is_empty() {
            return Err(ProviderError::Unavailable(format!(
                "gce pool: the metadata server {} gave no access token ({status})",
                self.token_url
            )));
        }
        // Refresh a minute early so a token never expires mid-call.
        let life = body["expires_in"]
            .as_u64()
            .unwrap_or(300)
            .saturating_sub(60);
        *cached = Some((
            token.to_string(),
            Instant::now() + Duration::from_secs(life),
        ));
        Ok(token.to_string())
    }

    /// One API call, retried with backoff and full jitter while Google
    /// says "later": 429, 5xx, 403 `rateLimitExceeded`, no answer. Inserts
    /// carry a `requestId`, so a retried insert is not a second instance.
    async fn call(
        &self,
        method: Method,
        url: &str,
        query: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Result<Value, CallError> {
        let mut delay = self.retry_base;
        let mut attempt = 1;
        loop {
            let sent = async {
                let token = self.token().await.map_err(CallError::Provider)?;
                let req = self
                    .http
                    .request(method.clone(), url)
                    .bearer_auth(token)
                    .query(query);
                let req = match body {
                    Some(b) => req.json(b),
                    // Google wants a length on bodiless POSTs (411 otherwise).
                    None => req.header(http::header::CONTENT_LENGTH, "0"),
                };
                send(req, url).await
            };
            match sent.await {
                Err(e) if attempt < CALL_ATTEMPTS && e.retryable() => {
                    tracing::debug!(url, attempt, "compute API busy; retrying");
                    tokio::time::sleep(jitter(delay)).await;
                    delay = (delay * 2).min(RETRY_MAX);
                    attempt += 1;
                }
                r => return r,
            }
        }
    }

    async fn get_in(&self, zone: &str, name: &str) -> Result<Option<Value>, ProviderError> {
        match self
            .call(Method::GET, &self.instance_url(zone, name), &[], None)
            .await
        {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.is(404) => Ok(None),
            Err(e) => Err(e.into_provider(&format!("getting instance {name}"))),
        }
    }

    /// The instance of a machine and its zone: the zone it was started in
    /// when known, else each of the pool's zones in turn.
    async fn get(&self, name: &str) -> Result<Option<(String, Value)>, ProviderError> {
        let known = self
            .zone_of
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned();
        let mut zones = self.zones();
        if let Some(z) = known {
            zones.retain(|x| *x != z);
            zones.insert(0, z);
        }
        for z in zones {
            if let Some(i) = self.get_in(&z, name).await? {
                self.remember_zone(name, &z);
                return Ok(Some((z, i)));
            }
        }
        Ok(None)
    }

    /// Follows a zone operation until it is `DONE`; its recorded errors
    /// become `Refused`.
    async fn wait(&self, mut op: Value, what: &str, zone: &str) -> Result<Value, ProviderError> {
        let deadline = Instant::now() + self.op_timeout;
        // `wait` may answer at once (under load, or when it is not
        // implemented by a proxy): never poll in a tight loop.
        let mut pause = Duration::from_millis(100);
        let mut first = true;
        loop {
            if !first && op["status"] != "DONE" {
                tokio::time::sleep(jitter(pause) + pause / 2).await;
                pause = (pause * 2).min(Duration::from_secs(10));
            }
            first = false;
            if op["status"] == "DONE" {
                if let Some(errors) = op["error"]["errors"].as_array() {
                    let text: Vec<String> = errors
                        .iter()
                        .map(|e| {
                            format!(
                                "{}: {}",
                                e["code"].as_str().unwrap_or("ERROR"),
                                e["message"].as_str().unwrap_or("")
                            )
                        })
                        .collect();
                    if !text.is_empty() {
                        let text = format!("{what}: {}", text.join("; "));
                        // Out of capacity or quota: try again later, the
                        // pool is not refused for it.
                        let temporary = errors.iter().any(|e| {
                            TEMPORARY_OPERATION_ERRORS.contains(&e["code"].as_str().unwrap_or(""))
                        });
                        return Err(if temporary {
                            ProviderError::NoCapacity(text)
                        } else {
                            ProviderError::Refused(text)
                        });
                    }
                }
                return Ok(op);
            }
            if Instant::now() >= deadline {
                return Err(ProviderError::Unavailable(format!(
                    "{what}: operation {} not done after {:?}",
                    op["name"].as_str().unwrap_or("?"),
                    self.op_timeout
                )));
            }
            let Some(name) = op["name"].as_str() else {
                return Err(ProviderError::Refused(format!(
                    "{what}: the answer is not an operation: {op}"
                )));
            };
            let url = format!("{}/operations/{name}/wait", self.zone_url(zone));
            op = self
                .call(Method::POST, &url, &[], None)
                .await
                .map_err(|e| e.into_provider(&format!("{what}: waiting for {name}")))?;
        }
    }

    fn insert_body(&self, launch: &MachineLaunch, zone: &str) -> Value {
        let machine_type = if self.spec.machine_type.contains('/') {
            self.spec.machine_type.clone()
        } else {
            format!("zones/{}/machineTypes/{}", zone, self.spec.machine_type)
        };
        let mut labels = serde_json::Map::new();
        for (k, v) in &launch.labels {
            if let Some(k) = label_key(k) {
                labels.insert(k, json!(label_value(v)));
            }
        }
        labels.insert(POOL_LABEL.into(), json!(label_value(&launch.pool)));
        labels.insert(MACHINE_LABEL.into(), json!(label_value(&launch.name)));
        let items: Vec<Value> = [
            ("pubrun-server", launch.server_url.as_str()),
            ("pubrun-pool", &launch.pool),
            ("pubrun-name", &launch.name),
            ("pubrun-slots", &launch.slots.to_string()),
            ("pubrun-token", &launch.token),
            ("startup-script", STARTUP_SCRIPT),
        ]
        .iter()
        .map(|(k, v)| json!({"key": k, "value": v}))
        .collect();
        let sp = &self.spec;
        let mut init = json!({"sourceImage": sp.source_image});
        if !sp.disk_type.is_empty() {
            init["diskType"] = json!(if sp.disk_type.contains('/') {
                sp.disk_type.clone()
            } else {
                format!("zones/{zone}/diskTypes/{}", sp.disk_type)
            });
        }
        if sp.disk_size_gb > 0 {
            // int64 fields are strings in Compute's JSON.
            init["diskSizeGb"] = json!(sp.disk_size_gb.to_string());
        }
        let mut nic = serde_json::Map::new();
        if !sp.network.is_empty() {
            nic.insert("network".into(), json!(sp.network));
        } else if sp.subnetwork.is_empty() {
            nic.insert("network".into(), json!("global/networks/default"));
        }
        if !sp.subnetwork.is_empty() {
            nic.insert("subnetwork".into(), json!(sp.subnetwork));
        }
        if sp.external_ip {
            nic.insert(
                "accessConfigs".into(),
                json!([{"type": "ONE_TO_ONE_NAT", "name": "External NAT"}]),
            );
        }
        let mut body = json!({
            "name": instance_name(&launch.name),
            "machineType": machine_type,
            "disks": [{
                "boot": true,
                "autoDelete": true,
                "initializeParams": init,
            }],
            "networkInterfaces": [nic],
            "labels": labels,
            "metadata": {"items": items},
        });
        if !sp.service_account.is_empty() {
            let scopes = if sp.scopes.is_empty() {
                vec![pubrun_connections::credentials::SCOPE.to_string()]
            } else {
                sp.scopes.clone()
            };
            body["serviceAccounts"] = json!([{"email": sp.service_account, "scopes": scopes}]);
        }
        let mut scheduling = serde_json::Map::new();
        if !sp.accelerators.is_empty() {
            body["guestAccelerators"] = Value::Array(
                sp.accelerators
                    .iter()
                    .map(|a| {
                        let t = if a.accelerator_type.contains('/') {
                            a.accelerator_type.clone()
                        } else {
                            format!("zones/{zone}/acceleratorTypes/{}", a.accelerator_type)
                        };
                        json!({"acceleratorType": t, "acceleratorCount": a.count})
                    })
                    .collect(),
            );
            // GPUs cannot live-migrate: Compute refuses MIGRATE with them.
            scheduling.insert("onHostMaintenance".into(), json!("TERMINATE"));
        }
        if sp.spot {
            // Reclaimed spot VMs are deleted: the machine is gone, its
            // lease lost and a new one started, never restarted behind
            // the autoscaler's back.
            scheduling.insert("provisioningModel".into(), json!("SPOT"));
            scheduling.insert("instanceTerminationAction".into(), json!("DELETE"));
            scheduling.insert("automaticRestart".into(), json!(false));
            scheduling.insert("onHostMaintenance".into(), json!("TERMINATE"));
        }
        if !scheduling.is_empty() {
            body["scheduling"] = Value::Object(scheduling);
        }
        body
    }

    /// Starts an existing instance of the pool that is not running.
    async fn start_existing(
        &self,
        launch: &MachineLaunch,
        zone: &str,
        mut instance: Value,
    ) -> Result<String, ProviderError> {
        let name = &launch.name;
        let owner = metadata_item(&instance, "pubrun-pool");
        if owner != Some(launch.pool.as_str()) {
            return Err(ProviderError::Refused(format!(
                "instance {name} exists and is not a machine of pool {}",
                launch.pool
            )));
        }
        let deadline = Instant::now() + self.op_timeout;
        loop {
            let status = instance["status"].as_str().unwrap_or("").to_string();
            let link = instance["selfLink"].as_str().unwrap_or(name).to_string();
            match status_of(&status) {
                ProviderStatus::Running | ProviderStatus::Pending => return Ok(link),
                ProviderStatus::Stopped if status == "SUSPENDED" => {
                    return Err(ProviderError::Refused(format!(
                        "instance {name} is suspended; pubrun does not resume instances"
                    )))
                }
                ProviderStatus::Stopped => {
                    // A new start has a new bootstrap token: the old one
                    // in the metadata is used up.
                    if metadata_item(&instance, "pubrun-token") != Some(launch.token.as_str()) {
                        self.set_token(zone, name, &instance, &launch.token).await?;
                    }
                    let op = self
                        .call(
                            Method::POST,
                            &format!("{}/start", self.instance_url(zone, name)),
                            &[],
                            None,
                        )
                        .await
                        .map_err(|e| e.into_provider(&format!("starting instance {name}")))?;
                    self.wait(op, &format!("starting instance {name}"), zone)
                        .await?;
                    return Ok(link);
                }
                // Still stopping: it can be started once it has stopped.
                ProviderStatus::Stopping | ProviderStatus::Gone => {}
            }
            if Instant::now() >= deadline {
                return Err(ProviderError::Unavailable(format!(
                    "instance {name} still {status} after {:?}",
                    self.op_timeout
                )));
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            instance = match self.get_in(zone, name).await? {
                Some(i) => i,
                None => {
                    return Err(ProviderError::Unavailable(format!(
                        "instance {name} vanished while stopping; start it again"
                    )))
                }
            };
        }
    }

    /// Replaces the `pubrun-token` metadata item (`instances.setMetadata`,
    /// guarded by the metadata's fingerprint).
    async fn set_token(
        &self,
        zone: &str,
        name: &str,
        instance: &Value,
        token: &str,
    ) -> Result<(), ProviderError> {
        let mut items: Vec<Value> = instance["metadata"]["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|i| i["key"] != "pubrun-token")
            .collect();
        items.push(json!({"key": "pubrun-token", "value": token}));
        let body = json!({
            "fingerprint": instance["metadata"]["fingerprint"],
            "items": items,
        });
        let what = format!("setting the bootstrap token of instance {name}");
        let op = self
            .call(
                Method::POST,
                &format!("{}/setMetadata", self.instance_url(zone, name)),
                &[],
                Some(&body),
            )
            .await
            .map_err(|e| e.into_provider(&what))?;
        self.wait(op, &what, zone).await.map(drop)
    }

    /// Inserts the machine's instance in one zone and follows the operation.
    async fn insert_in(&self, launch: &MachineLaunch, zone: &str) -> Result<String, ProviderError> {
        let what = format!("creating instance {} in {zone}", launch.name);
        let url = format!("{}/instances", self.zone_url(zone));
        // One id for all retries of this insert: Google runs it once.
        let rid = request_id();
        match self
            .call(
                Method::POST,
                &url,
                &[("requestId", rid.as_str())],
                Some(&self.insert_body(launch, zone)),
            )
            .await
        {
            Ok(op) => {
                self.remember_zone(&launch.name, zone);
                let op = self.wait(op, &what, zone).await?;
                Ok(op["targetLink"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| self.instance_url(zone, &launch.name)))
            }
            Err(e) if e.is(409) => match self.get_in(zone, &launch.name).await? {
                Some(instance) => self.start_existing(launch, zone, instance).await,
                None => Err(ProviderError::Unavailable(format!(
                    "{what}: it exists and does not; try again"
                ))),
            },
            Err(e) => Err(e.into_provider(&what)),
        }
    }
}

/// Whether an error says "this zone has no room now" (try another zone).
fn out_of_capacity(e: &ProviderError) -> bool {
    matches!(e, ProviderError::NoCapacity(_))
}

#[async_trait::async_trait]
impl MachineProvider for GceProvider {
    fn kind(&self) -> &'static str {
        "gce"
    }

    async fn start(&self, launch: &MachineLaunch) -> Result<String, ProviderError> {
        let zones = self.zones();
        // With several zones, a stopped machine may be in any of them:
        // start it where it is rather than make a second one.
        if zones.len() > 1 {
            if let Some((zone, instance)) = self.get(&launch.name).await? {
                return self.start_existing(launch, &zone, instance).await;
            }
        }
        let mut last = None;
        for zone in &zones {
            match self.insert_in(launch, zone).await {
                Err(e) if out_of_capacity(&e) => {
                    tracing::warn!(machine = launch.name, zone, error = %e, "zone out of capacity; trying the next zone");
                    last = Some(e);
                }
                r => return r,
            }
        }
        Err(last.unwrap_or_else(|| ProviderError::NoCapacity("no zone".into())))
    }

    async fn stop(&self, name: &str, delete: bool) -> Result<(), ProviderError> {
        let Some((zone, instance)) = self.get(name).await? else {
            return Ok(());
        };
        let (method, url, what) = if delete {
            (
                Method::DELETE,
                self.instance_url(&zone, name),
                format!("deleting instance {name}"),
            )
        } else {
            if status_of(instance["status"].as_str().unwrap_or("")) == ProviderStatus::Stopped {
                return Ok(());
            }
            (
                Method::POST,
                format!("{}/stop", self.instance_url(&zone, name)),
                format!("stopping instance {name}"),
            )
        };
        match self.call(method, &url, &[], None).await {
            Ok(op) => self.wait(op, &what, &zone).await.map(drop),
            Err(e) if e.is(404) => Ok(()),
            Err(e) => Err(e.into_provider(&what)),
        }
    }

    async fn status(&self, name: &str) -> Result<ProviderStatus, ProviderError> {
        Ok(match self.get(name).await? {
            None => ProviderStatus::Gone,
            Some((_, i)) => status_of(i["status"].as_str().unwrap_or("")),
        })
    }

    async fn list(&self, pool: &str) -> Result<Vec<(String, ProviderStatus)>, ProviderError> {
        let mut out = Vec::new();
        for zone in self.zones() {
            for (name, status) in self.list_in(&zone, pool).await? {
                self.remember_zone(&name, &zone);
                out.push((name, status));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

impl GceProvider {
    async fn list_in(
        &self,
        zone: &str,
        pool: &str,
    ) -> Result<Vec<(String, ProviderStatus)>, ProviderError> {
        let url = format!("{}/instances", self.zone_url(zone));
        // Google's filter grammar: `labels.KEY = "VALUE"`, the value quoted
        // (a bare value with `-` does not parse).
        let filter = format!("labels.{POOL_LABEL} = \"{}\"", label_value(pool));
        let mut out = Vec::new();
        let mut page = String::new();
        loop {
            let mut query = vec![("filter", filter.as_str())];
            if !page.is_empty() {
                query.push(("pageToken", page.as_str()));
            }
            let list = self
                .call(Method::GET, &url, &query, None)
                .await
                .map_err(|e| e.into_provider(&format!("listing instances of pool {pool}")))?;
            for i in list["items"].as_array().into_iter().flatten() {
                // Label values are lossy ("Big" and "big" agree): the metadata
                // holds the exact pool and machine names.
                if metadata_item(i, "pubrun-pool") != Some(pool) {
                    continue;
                }
                let name = metadata_item(i, "pubrun-name")
                    .or(i["name"].as_str())
                    .unwrap_or_default();
                out.push((
                    name.to_string(),
                    status_of(i["status"].as_str().unwrap_or("")),
                ));
            }
            match list["nextPageToken"].as_str() {
                Some(t) if !t.is_empty() => page = t.to_string(),
                _ => break,
            }
        }
        Ok(out)
    }
}

/// Sends one compute API request (`url` names it in errors): its JSON
/// answer, or the error Google gave (status, reason, message).
async fn send(req: reqwest::RequestBuilder, url: &str) -> Result<Value, CallError> {
    let resp = req.send().await.map_err(|e| {
        CallError::Provider(if e.is_builder() {
            ProviderError::Refused(format!("gce: bad request to {url}: {e}"))
        } else {
            ProviderError::Unavailable(format!("gce: no answer from {url}: {e}"))
        })
    })?;
    let status = resp.status();
    let text = resp.text().await.map_err(|e| {
        CallError::Provider(ProviderError::Unavailable(format!(
            "gce: reading the answer of {url}: {e}"
        )))
    })?;
    let json: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    if status.is_success() {
        return Ok(json);
    }
    let err = &json["error"];
    Err(CallError::Status {
        code: status.as_u16(),
        reason: err["errors"][0]["reason"]
            .as_str()
            .or(err["status"].as_str())
            .unwrap_or("")
            .to_string(),
        message: err["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| text.chars().take(300).collect()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_made_valid() {
        assert_eq!(label_value("Big.Pool~1"), "big-pool-1");
        assert_eq!(label_value(&"x".repeat(70)).len(), 63);
        assert_eq!(label_key("pubrun.job").as_deref(), Some("pubrun-job"));
        assert_eq!(label_key("9x").as_deref(), Some("l-9x"));
        assert_eq!(label_key(""), None);
    }

    #[test]
    fn instance_names_are_valid_for_compute() {
        let ok = |n: &str| {
            n.len() <= 63
                && n.starts_with(|c: char| c.is_ascii_lowercase())
                && !n.ends_with('-')
                && n.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        };
        assert_eq!(instance_name("pubrun-big-1"), "pubrun-big-1");
        for n in [
            "Big_Pool-1",
            "pubrun-Big.Pool~2-3",
            "9lives-1",
            &format!("pubrun-{}-1", "x".repeat(80)),
            "-",
        ] {
            let i = instance_name(n);
            assert!(ok(&i), "{n} -> {i}");
        }
        // Distinct machines, distinct instances (the hash keeps them apart).
        assert_ne!(instance_name("pubrun-A-1"), instance_name("pubrun-a-1"));
        let long = format!("pubrun-{}", "y".repeat(80));
        assert_ne!(
            instance_name(&format!("{long}-1")),
            instance_name(&format!("{long}-2"))
        );
    }

    #[test]
    fn request_ids_are_uuids_and_jitter_is_bounded() {
        let (a, b) = (request_id(), request_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        for _ in 0..100 {
            assert!(jitter(Duration::from_millis(50)) <= Duration::from_millis(50));
        }
    }

    #[test]
    fn statuses() {
        assert_eq!(status_of("PROVISIONING"), ProviderStatus::Pending);
        assert_eq!(status_of("STAGING"), ProviderStatus::Pending);
        assert_eq!(status_of("RUNNING"), ProviderStatus::Running);
        assert_eq!(status_of("STOPPING"), ProviderStatus::Stopping);
        assert_eq!(status_of("TERMINATED"), ProviderStatus::Stopped);
        assert_eq!(status_of("SUSPENDED"), ProviderStatus::Stopped);
    }

    #[test]
    fn api_base_and_fields_are_checked() {
        let spec = GceProviderSpec {
            project: "p".into(),
            zone: "us-central1-a".into(),
            machine_type: "e2-small".into(),
            source_image: "projects/debian-cloud/global/images/family/debian-12".into(),
            server_url: "http://10.0.0.2:8085".into(),
            ..Default::default()
        };
        // The default base is Google's own, over TLS.
        assert_eq!(GceProvider::new(&spec).unwrap().base, DEFAULT_API_BASE);
        let ftp = GceProviderSpec {
            api_base: "ftp://x/compute/v1".into(),
            ..spec.clone()
        };
        assert!(matches!(
            GceProvider::new(&ftp),
            Err(ProviderError::Refused(_))
        ));
        let ok = GceProviderSpec {
            api_base: "http://127.0.0.1:1/compute/v1".into(),
            ..spec.clone()
        };
        let p = GceProvider::new(&ok).unwrap();
        assert_eq!(p.base, "http://127.0.0.1:1/compute/v1/");
        let body = p.insert_body(
            &MachineLaunch {
                pool: "Big".into(),
                name: "pubrun-big-1".into(),
                server_url: "http://10.0.0.2:8085".into(),
                token: "t".into(),
                slots: 2,
                labels: Default::default(),
            },
            "us-central1-a",
        );
        assert_eq!(
            body["machineType"],
            "zones/us-central1-a/machineTypes/e2-small"
        );
        assert_eq!(body["labels"][POOL_LABEL], "big");
        assert_eq!(metadata_item(&body, "pubrun-pool"), Some("Big"));
        assert_eq!(metadata_item(&body, "pubrun-slots"), Some("2"));
        let missing = GceProviderSpec {
            zone: String::new(),
            ..ok
        };
        assert!(matches!(
            GceProvider::new(&missing),
            Err(ProviderError::Refused(_))
        ));
    }
}
