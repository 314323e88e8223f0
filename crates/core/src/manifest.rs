//! `pubrun.toml`: the declarative manifest, parsed in two steps — raw TOML
//! (unknown keys rejected) → validated resources — with every error pointing
//! at `file:line:column`.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::config::{
    normalize_ack_deadline, validate_labels, Labels, SubscriptionConfig, TopicConfig,
};
use crate::connection::{
    check_endpoint, ConnectionSpec, CredentialsSpec, GOOGLE_COMPUTE_ENDPOINT,
    GOOGLE_PUBSUB_ENDPOINT, GOOGLE_STORAGE_ENDPOINT,
};
use crate::job::{
    check_relative_path, parse_gs_url, DockerSpec, ExecutorSpec, InputSpec, JobSpec, Mount,
    OutputSpec, ProcessSpec, PullPolicy, RegistryAuth, RetryPolicy, SecretRef, UploadOutputs,
    TRIGGER_INPUT,
};
use crate::names::{validate_resource_id, ProjectName, SubscriptionName, TopicName};
use crate::pool::{DockerProviderSpec, GceProviderSpec, PoolSpec, ProviderSpec, LOCAL_POOL};
use crate::template;

/// Everything a manifest declares, validated and with full resource names.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Manifest {
    pub project: String,
    pub topics: Vec<TopicConfig>,
    pub subscriptions: Vec<SubscriptionConfig>,
    pub jobs: Vec<JobSpec>,
    pub schedules: Vec<ScheduleDecl>,
    pub webhooks: Vec<WebhookDecl>,
    pub buckets: Vec<BucketDecl>,
    /// Declared pools; `local` is implicit and only listed when declared.
    pub pools: Vec<PoolSpec>,
    /// Declared connections (each job on one carries a copy of it).
    pub connections: Vec<ConnectionSpec>,
}

/// A `[[bucket]]` table. The bucket name is checked by the buckets crate
/// when applied; notification topics must be declared here.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BucketDecl {
    pub name: String,
    pub notifications: Vec<NotificationDecl>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct NotificationDecl {
    /// Full topic name.
    pub topic: String,
    /// Empty: every event type.
    pub event_types: Vec<String>,
    pub object_name_prefix: String,
    pub custom_attributes: BTreeMap<String, String>,
    /// `JSON_API_V1` (default) or `NONE`.
    pub payload_format: String,
}

/// A `[[schedule]]` table: checked for shape here (unknown keys, declared
/// topic); cron expression, time zone and policy are validated by the
/// triggers crate when applied, with messages naming the schedule.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ScheduleDecl {
    pub name: String,
    pub cron: String,
    pub time_zone: String,
    /// Full topic name.
    pub topic: String,
    pub data: String,
    pub attributes: BTreeMap<String, String>,
    pub missed: Option<String>,
    pub missed_max_age: Option<String>,
    pub paused: bool,
}

/// A `[[webhook]]` table: `POST /hooks/NAME` publishes to `topic`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct WebhookDecl {
    pub name: String,
    /// Full topic name.
    pub topic: String,
    pub secret_env: Option<String>,
    pub bearer_secret_env: Option<String>,
    pub headers_as_attributes: Vec<String>,
    pub query_as_attributes: bool,
    pub max_body_bytes: Option<u64>,
}

/// A manifest error with its location.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct ManifestError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// The resource tables a manifest may hold (`[[topic]]`, …), for help texts;
/// a test keeps it equal to what the parser accepts.
pub const RESOURCE_KINDS: &[&str] = &[
    "topic",
    "subscription",
    "job",
    "schedule",
    "webhook",
    "bucket",
    "pool",
    "connection",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    project: Option<Spanned<String>>,
    #[serde(default)]
    topic: Vec<RawTopic>,
    #[serde(default)]
    subscription: Vec<RawSubscription>,
    #[serde(default)]
    job: Vec<RawJob>,
    #[serde(default)]
    schedule: Vec<RawSchedule>,
    #[serde(default)]
    webhook: Vec<RawWebhook>,
    #[serde(default)]
    bucket: Vec<RawBucket>,
    #[serde(default)]
    pool: Vec<RawPool>,
    #[serde(default)]
    connection: Vec<RawConnection>,
}

/// A `[[connection]]` table; at most one of `credentials_file`,
/// `token_env`, `metadata_server` (none: Application Default Credentials).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConnection {
    name: Spanned<String>,
    project: Spanned<String>,
    credentials_file: Option<Spanned<String>>,
    token_env: Option<Spanned<String>>,
    metadata_server: Option<Spanned<bool>>,
    pubsub_endpoint: Option<Spanned<String>>,
    storage_endpoint: Option<Spanned<String>>,
    compute_endpoint: Option<Spanned<String>>,
}

/// Every key any provider takes; which ones a provider accepts is checked
/// after parsing, so a misplaced key gets a message naming the provider.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    name: Spanned<String>,
    provider: Spanned<String>,
    min_machines: Option<Spanned<u32>>,
    max_machines: Option<Spanned<u32>>,
    runs_per_machine: Option<Spanned<u32>>,
    idle_timeout: Option<Spanned<String>>,
    when_idle: Option<Spanned<String>>,
    price_per_hour: Option<Spanned<f64>>,
    token_env: Option<Spanned<String>>,
    lease_timeout: Option<Spanned<String>>,
    boot_timeout: Option<Spanned<String>>,
    server_url: Option<Spanned<String>>,
    // docker
    docker_host: Option<Spanned<String>>,
    image: Option<Spanned<String>>,
    network: Option<Spanned<String>>,
    memory: Option<Spanned<String>>,
    cpus: Option<Spanned<f64>>,
    docker_socket: Option<Spanned<bool>>,
    machine_data_dir: Option<Spanned<String>>,
    // gce
    project: Option<Spanned<String>>,
    zone: Option<Spanned<String>>,
    machine_type: Option<Spanned<String>>,
    source_image: Option<Spanned<String>>,
    api_base: Option<Spanned<String>>,
    access_token_env: Option<Spanned<String>>,
    name_prefix: Option<Spanned<String>>,
    connection: Option<Spanned<String>>,
    zones: Option<Spanned<Vec<String>>>,
    service_account: Option<Spanned<String>>,
    scopes: Option<Spanned<Vec<String>>>,
    subnetwork: Option<Spanned<String>>,
    external_ip: Option<Spanned<bool>>,
    disk_type: Option<Spanned<String>>,
    disk_size_gb: Option<Spanned<u32>>,
    accelerators: Option<Spanned<Vec<RawAccelerator>>>,
    spot: Option<Spanned<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccelerator {
    #[serde(rename = "type")]
    accelerator_type: String,
    #[serde(default = "one")]
    count: u32,
}

fn one() -> u32 {
    1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBucket {
    name: Spanned<String>,
    #[serde(default)]
    notifications: Vec<Spanned<RawNotification>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNotification {
    topic: String,
    #[serde(default)]
    event_types: Vec<String>,
    #[serde(default)]
    object_name_prefix: String,
    #[serde(default)]
    custom_attributes: BTreeMap<String, String>,
    payload_format: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchedule {
    name: Spanned<String>,
    cron: Spanned<String>,
    time_zone: Option<Spanned<String>>,
    topic: Spanned<String>,
    #[serde(default)]
    data: String,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
    missed: Option<String>,
    missed_max_age: Option<String>,
    #[serde(default)]
    paused: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    name: Spanned<String>,
    topic: Spanned<String>,
    secret_env: Option<String>,
    bearer_secret_env: Option<String>,
    #[serde(default)]
    headers_as_attributes: Vec<String>,
    #[serde(default)]
    query_as_attributes: bool,
    max_body_bytes: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTopic {
    name: Spanned<String>,
    labels: Option<Spanned<Labels>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSubscription {
    name: Spanned<String>,
    topic: Spanned<String>,
    #[serde(default)]
    ack_deadline_seconds: Option<Spanned<i32>>,
    labels: Option<Spanned<Labels>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    name: Spanned<String>,
    topic: Option<Spanned<String>>,
    connection: Option<Spanned<String>>,
    subscription: Option<Spanned<String>>,
    #[serde(default)]
    filter: Option<Spanned<String>>,
    process: Option<Spanned<RawProcess>>,
    docker: Option<Spanned<RawDocker>>,
    timeout: Option<Spanned<String>>,
    grace_period: Option<Spanned<String>>,
    retries: Option<Spanned<RawRetries>>,
    concurrency: Option<Spanned<u32>>,
    dedup_key: Option<Spanned<String>>,
    dedup_window: Option<Spanned<String>>,
    result_topic: Option<Spanned<String>>,
    log_limit: Option<Spanned<String>>,
    #[serde(default)]
    inputs: Vec<Spanned<RawStaging>>,
    #[serde(default)]
    outputs: Vec<Spanned<RawStaging>>,
    pool: Option<Spanned<String>>,
    #[serde(default)]
    pass_env: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    secrets: Option<Spanned<BTreeMap<String, RawSecret>>>,
    upload_outputs: Option<Spanned<String>>,
    result_attributes: Option<Spanned<BTreeMap<String, String>>>,
    #[serde(default)]
    result_trigger_attributes: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecret {
    env: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStaging {
    from: Spanned<String>,
    to: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProcess {
    command: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    working_dir: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDocker {
    image: String,
    #[serde(default)]
    command: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    mounts: Vec<RawMount>,
    cpus: Option<f64>,
    memory: Option<String>,
    #[serde(default)]
    network: String,
    #[serde(default)]
    pull: Option<String>,
    auth: Option<RawAuth>,
    #[serde(default)]
    working_dir: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMount {
    source: String,
    target: String,
    #[serde(default)]
    read_only: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    username: String,
    password_env: String,
    #[serde(default)]
    server: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetries {
    max_attempts: u32,
    initial_backoff: Option<String>,
    max_backoff: Option<String>,
}

struct Ctx<'a> {
    file: &'a str,
    src: &'a str,
}

impl Ctx<'_> {
    fn err(&self, span: Range<usize>, message: impl Into<String>) -> ManifestError {
        let upto = &self.src[..span.start.min(self.src.len())];
        let line = upto.matches('\n').count() + 1;
        let column = upto.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        ManifestError {
            file: self.file.to_string(),
            line,
            column,
            message: message.into(),
        }
    }

    fn duration(
        &self,
        v: &Option<Spanned<String>>,
        default: Duration,
        what: &str,
    ) -> Result<Duration, ManifestError> {
        match v {
            None => Ok(default),
            Some(s) => humantime::parse_duration(s.get_ref()).map_err(|e| {
                self.err(s.span(), format!("{what}: \"{}\" is not a duration ({e}); write e.g. \"90s\", \"30m\", \"2h\"", s.get_ref()))
            }),
        }
    }
}

impl Ctx<'_> {
    /// Points at `key` when it is written on the line of its value (`key =
    /// value`, also inside inline tables); otherwise at the value.
    fn key_err(&self, key: &str, value: Range<usize>, message: impl Into<String>) -> ManifestError {
        let before = &self.src[..value.start.min(self.src.len())];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let at = before[line_start..]
            .rfind(key)
            .map_or(value.start, |i| line_start + i);
        self.err(at..at, message)
    }
}

/// The keys each provider accepts besides `name` and `provider`.
const ON_DEMAND_KEYS: [&str; 10] = [
    "min_machines",
    "max_machines",
    "runs_per_machine",
    "idle_timeout",
    "when_idle",
    "price_per_hour",
    "token_env",
    "lease_timeout",
    "boot_timeout",
    "server_url",
];
const DOCKER_KEYS: [&str; 7] = [
    "docker_host",
    "image",
    "network",
    "memory",
    "cpus",
    "docker_socket",
    "machine_data_dir",
];
const GCE_KEYS: [&str; 18] = [
    "zones",
    "connection",
    "service_account",
    "scopes",
    "network",
    "subnetwork",
    "external_ip",
    "disk_type",
    "disk_size_gb",
    "accelerators",
    "spot",
    "project",
    "zone",
    "machine_type",
    "source_image",
    "api_base",
    "access_token_env",
    "name_prefix",
];

fn is_env_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

fn parse_pool(
    cx: &Ctx<'_>,
    r: &RawPool,
    connections: &[ConnectionSpec],
) -> Result<PoolSpec, ManifestError> {
    let name = r.name.get_ref();
    validate_resource_id("pool", name).map_err(|e| cx.err(r.name.span(), e.message))?;
    let kind = r.provider.get_ref().as_str();
    let allowed: Vec<&str> = match kind {
        "local" => vec!["price_per_hour"],
        "agents" => vec!["price_per_hour", "token_env", "lease_timeout"],
        "docker" => ON_DEMAND_KEYS.iter().chain(&DOCKER_KEYS).copied().collect(),
        "gce" => ON_DEMAND_KEYS.iter().chain(&GCE_KEYS).copied().collect(),
        other => {
            return Err(cx.err(
                r.provider.span(),
                format!(
                    "provider is \"{other}\"; one of \"local\", \"agents\", \"docker\", \"gce\""
                ),
            ))
        }
    };
    if (name == LOCAL_POOL) != (kind == "local") {
        let why = if name == LOCAL_POOL {
            "the pool \"local\" is the server itself; its provider can only be \"local\" (give this pool another name)"
        } else {
            "provider \"local\" is the server itself and belongs to the pool named \"local\""
        };
        return Err(cx.err(r.provider.span(), why));
    }

    // Keys of another provider (or of no provider) point at themselves.
    let given: [(&str, Option<Range<usize>>); 34] = [
        ("min_machines", r.min_machines.as_ref().map(|v| v.span())),
        ("max_machines", r.max_machines.as_ref().map(|v| v.span())),
        (
            "runs_per_machine",
            r.runs_per_machine.as_ref().map(|v| v.span()),
        ),
        ("idle_timeout", r.idle_timeout.as_ref().map(|v| v.span())),
        ("when_idle", r.when_idle.as_ref().map(|v| v.span())),
        (
            "price_per_hour",
            r.price_per_hour.as_ref().map(|v| v.span()),
        ),
        ("token_env", r.token_env.as_ref().map(|v| v.span())),
        ("lease_timeout", r.lease_timeout.as_ref().map(|v| v.span())),
        ("boot_timeout", r.boot_timeout.as_ref().map(|v| v.span())),
        ("server_url", r.server_url.as_ref().map(|v| v.span())),
        ("docker_host", r.docker_host.as_ref().map(|v| v.span())),
        ("image", r.image.as_ref().map(|v| v.span())),
        ("network", r.network.as_ref().map(|v| v.span())),
        ("memory", r.memory.as_ref().map(|v| v.span())),
        ("cpus", r.cpus.as_ref().map(|v| v.span())),
        ("docker_socket", r.docker_socket.as_ref().map(|v| v.span())),
        (
            "machine_data_dir",
            r.machine_data_dir.as_ref().map(|v| v.span()),
        ),
        ("project", r.project.as_ref().map(|v| v.span())),
        ("zone", r.zone.as_ref().map(|v| v.span())),
        ("machine_type", r.machine_type.as_ref().map(|v| v.span())),
        ("source_image", r.source_image.as_ref().map(|v| v.span())),
        ("api_base", r.api_base.as_ref().map(|v| v.span())),
        (
            "access_token_env",
            r.access_token_env.as_ref().map(|v| v.span()),
        ),
        ("name_prefix", r.name_prefix.as_ref().map(|v| v.span())),
        ("connection", r.connection.as_ref().map(|v| v.span())),
        ("zones", r.zones.as_ref().map(|v| v.span())),
        (
            "service_account",
            r.service_account.as_ref().map(|v| v.span()),
        ),
        ("scopes", r.scopes.as_ref().map(|v| v.span())),
        ("subnetwork", r.subnetwork.as_ref().map(|v| v.span())),
        ("external_ip", r.external_ip.as_ref().map(|v| v.span())),
        ("disk_type", r.disk_type.as_ref().map(|v| v.span())),
        ("disk_size_gb", r.disk_size_gb.as_ref().map(|v| v.span())),
        ("accelerators", r.accelerators.as_ref().map(|v| v.span())),
        ("spot", r.spot.as_ref().map(|v| v.span())),
    ];
    for (key, at) in &given {
        if let Some(at) = at {
            if !allowed.contains(key) {
                let hint = match (kind, *key) {
                    ("agents", "runs_per_machine") => {
                        "; agents say how many runs they take with `pubrun agent --slots N`"
                    }
                    _ => "",
                };
                return Err(cx.key_err(
                    key,
                    at.clone(),
                    format!(
                        "`{key}` does not apply to provider \"{kind}\"; it takes {}{hint}",
                        if allowed.is_empty() {
                            "no other keys".to_string()
                        } else {
                            allowed.join(", ")
                        }
                    ),
                ));
            }
        }
    }

    let on_demand = matches!(kind, "docker" | "gce");
    let min_machines = r.min_machines.as_ref().map_or(0, |v| *v.get_ref());
    let max_machines = match &r.max_machines {
        Some(v) if *v.get_ref() == 0 => {
            return Err(cx.err(v.span(), "max_machines must be at least 1"))
        }
        Some(v) => *v.get_ref(),
        None if on_demand => 1,
        None => 0,
    };
    if on_demand && min_machines > max_machines {
        let (at, dflt) = match (&r.max_machines, &r.min_machines) {
            (Some(v), _) => (v.span(), ""),
            (None, Some(v)) => (v.span(), ", the default"),
            (None, None) => unreachable!("min 0 is never above max"),
        };
        return Err(cx.err(
            at,
            format!("min_machines ({min_machines}) is above max_machines ({max_machines}{dflt})"),
        ));
    }
    let runs_per_machine = match &r.runs_per_machine {
        Some(v) if !(1..=1000).contains(v.get_ref()) => {
            return Err(cx.err(
                v.span(),
                format!("runs_per_machine is {}; it must be 1 to 1000", v.get_ref()),
            ))
        }
        Some(v) => *v.get_ref(),
        None => 1,
    };
    let idle_timeout = cx.duration(&r.idle_timeout, Duration::from_secs(300), "idle_timeout")?;
    let delete_when_idle = match &r.when_idle {
        None => kind == "docker",
        Some(v) => match v.get_ref().as_str() {
            "stop" => false,
            "delete" => true,
            other => {
                return Err(cx.err(
                    v.span(),
                    format!("when_idle is \"{other}\"; one of \"stop\", \"delete\""),
                ))
            }
        },
    };
    let price_per_hour = match &r.price_per_hour {
        Some(v) if !(v.get_ref().is_finite() && *v.get_ref() >= 0.0) => {
            return Err(cx.err(v.span(), "price_per_hour must be a number ≥ 0"))
        }
        v => v.as_ref().map(|v| *v.get_ref()),
    };
    let env_name = |v: &Option<Spanned<String>>, what: &str| -> Result<String, ManifestError> {
        match v {
            None => Ok(String::new()),
            Some(v) if is_env_name(v.get_ref()) => Ok(v.get_ref().clone()),
            Some(v) => Err(cx.err(
                v.span(),
                format!(
                    "{what} names an environment variable (letters, digits, '_'), not \"{}\"",
                    v.get_ref()
                ),
            )),
        }
    };
    let token_env = env_name(&r.token_env, "token_env")?;
    let lease_timeout = cx.duration(&r.lease_timeout, Duration::from_secs(30), "lease_timeout")?;
    if !(Duration::from_secs(5)..=Duration::from_secs(3600)).contains(&lease_timeout) {
        let at = r.lease_timeout.as_ref().unwrap().span();
        return Err(cx.err(at, "lease_timeout must be between 5s and 1h"));
    }
    let boot_timeout = cx.duration(&r.boot_timeout, Duration::from_secs(300), "boot_timeout")?;
    if boot_timeout < Duration::from_secs(1) {
        let at = r.boot_timeout.as_ref().unwrap().span();
        return Err(cx.err(at, "boot_timeout must be at least 1s"));
    }

    let required =
        |v: &Option<Spanned<String>>, key: &str, example: &str| -> Result<String, ManifestError> {
            match v {
                Some(v) if !v.get_ref().trim().is_empty() => Ok(v.get_ref().clone()),
                Some(v) => Err(cx.err(v.span(), format!("{key} must not be empty"))),
                None => Err(cx.err(
                    r.provider.span(),
                    format!("provider \"{kind}\" needs {key} = \"{example}\""),
                )),
            }
        };
    let http_url = |v: &Spanned<String>, key: &str| -> Result<(), ManifestError> {
        let u = v.get_ref();
        let rest = u
            .strip_prefix("http://")
            .or_else(|| u.strip_prefix("https://"));
        if rest.is_none_or(|h| h.is_empty() || h.starts_with('/')) {
            return Err(cx.err(
                v.span(),
                format!("{key}: \"{u}\" is not an http:// or https:// URL"),
            ));
        }
        Ok(())
    };
    let server_url = if on_demand {
        // Machines run `pubrun agent --server URL`: only the user knows how
        // they reach this server (127.0.0.1 inside a container is not it).
        let url = required(&r.server_url, "server_url", "http://HOST:8085")?;
        http_url(r.server_url.as_ref().unwrap(), "server_url")?;
        url
    } else {
        String::new()
    };

    let provider = match kind {
        "local" => ProviderSpec::Local,
        "agents" => ProviderSpec::Agents,
        "docker" => {
            // Machine containers are named after the pool.
            if let Some(c) = name
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || "-._".contains(*c)))
            {
                return Err(cx.err(
                    r.name.span(),
                    format!("a docker pool's name is part of container names; {c:?} is not allowed there (letters, digits, '-', '.', '_')"),
                ));
            }
            let memory_bytes = match &r.memory {
                Some(v) => Some(parse_bytes(v.get_ref()).ok_or_else(|| {
                    cx.err(
                        v.span(),
                        format!(
                            "memory: \"{}\" is not a size; write e.g. \"2GiB\" or \"512m\"",
                            v.get_ref()
                        ),
                    )
                })?),
                None => None,
            };
            if let Some(c) = &r.cpus {
                if !(*c.get_ref() > 0.0 && *c.get_ref() <= 1024.0) {
                    return Err(cx.err(
                        c.span(),
                        format!(
                            "cpus is {}; it must be above 0 (and at most 1024)",
                            c.get_ref()
                        ),
                    ));
                }
            }
            if let Some(h) = &r.docker_host {
                if !h.get_ref().contains("://") {
                    return Err(cx.err(
                        h.span(),
                        format!("docker_host: \"{}\" needs a scheme, e.g. unix:///var/run/docker.sock or tcp://HOST:2376", h.get_ref()),
                    ));
                }
            }
            let docker_socket = r.docker_socket.as_ref().is_some_and(|v| *v.get_ref());
            let machine_data_dir = match &r.machine_data_dir {
                Some(v) if !docker_socket => {
                    return Err(cx.err(
                        v.span(),
                        "machine_data_dir is only used with docker_socket = true",
                    ))
                }
                Some(v) => {
                    let d = v.get_ref();
                    if !d.starts_with('/') || d.contains(':') || d.contains(',') {
                        return Err(cx.err(
                            v.span(),
                            format!("machine_data_dir: \"{d}\" must be an absolute path on the docker host without ':' or ','"),
                        ));
                    }
                    d.trim_end_matches('/').to_string()
                }
                None if docker_socket => crate::pool::DEFAULT_MACHINE_DATA_DIR.to_string(),
                None => String::new(),
            };
            let image = match &r.image {
                Some(v) if v.get_ref().trim().is_empty() => {
                    return Err(cx.err(v.span(), "image must not be empty"))
                }
                Some(v) => v.get_ref().clone(),
                None => "pubrun-agent:dev".to_string(),
            };
            ProviderSpec::Docker(DockerProviderSpec {
                docker_host: r
                    .docker_host
                    .as_ref()
                    .map(|v| v.get_ref().clone())
                    .unwrap_or_default(),
                image,
                network: r
                    .network
                    .as_ref()
                    .map(|v| v.get_ref().clone())
                    .unwrap_or_default(),
                server_url,
                memory_bytes,
                cpus: r.cpus.as_ref().map(|v| *v.get_ref()),
                docker_socket,
                machine_data_dir,
            })
        }
        _ => {
            let connection = match &r.connection {
                None => None,
                Some(c) => Some(
                    connections
                        .iter()
                        .find(|x| &x.name == c.get_ref())
                        .cloned()
                        .ok_or_else(|| {
                            cx.err(
                                c.span(),
                                format!("connection \"{}\" is not declared; add a [[connection]] with name = \"{}\"", c.get_ref(), c.get_ref()),
                            )
                        })?,
                ),
            };
            // A pool on a connection defaults to its project.
            let project = match (&r.project, &connection) {
                (None, Some(c)) => c.project.clone(),
                _ => required(&r.project, "project", "my-project")?,
            };
            let zone = required(&r.zone, "zone", "europe-west1-b")?;
            let machine_type = required(&r.machine_type, "machine_type", "n2-standard-4")?;
            let source_image = required(
                &r.source_image,
                "source_image",
                "projects/cos-cloud/global/images/family/cos-stable",
            )?;
            let mut api_base = match &connection {
                Some(c) => format!("{}/compute/v1/", c.compute_endpoint.trim_end_matches('/')),
                None => "https://compute.googleapis.com/compute/v1/".to_string(),
            };
            if let Some(v) = &r.api_base {
                http_url(v, "api_base")?;
                api_base = v.get_ref().clone();
                if !api_base.ends_with('/') {
                    api_base.push('/');
                }
            }
            let access_token_env = env_name(&r.access_token_env, "access_token_env")?;
            let name_prefix = match &r.name_prefix {
                Some(v) => v.get_ref().clone(),
                None => crate::pool::DEFAULT_NAME_PREFIX.to_string(),
            };
            // Instances are PREFIX-POOL-N; Compute Engine wants
            // [a-z]([-a-z0-9]*[a-z0-9])?, at most 63 characters.
            let gce_part = |s: &str| {
                s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            };
            if let Some(v) = &r.name_prefix {
                if !(v.get_ref().starts_with(|c: char| c.is_ascii_lowercase())
                    && gce_part(v.get_ref()))
                {
                    return Err(cx.err(v.span(), format!("name_prefix \"{}\" must start with a lowercase letter and hold only a-z, 0-9, '-'", v.get_ref())));
                }
            }
            if !gce_part(name) || name.ends_with('-') {
                return Err(cx.err(
                    r.name.span(),
                    "a gce pool's name is part of instance names; use only a-z, 0-9 and '-' (not at the end)",
                ));
            }
            // Room for "-" + up to 6 digits of machine number.
            if name_prefix.len() + 1 + name.len() + 7 > 63 {
                return Err(cx.err(
                    r.name.span(),
                    format!("instance names \"{name_prefix}-{name}-N\" would exceed Compute Engine's 63 characters; shorten the pool name or name_prefix"),
                ));
            }
            ProviderSpec::Gce(GceProviderSpec {
                project,
                zone,
                machine_type,
                source_image,
                api_base,
                access_token_env,
                server_url,
                name_prefix,
                zones: r
                    .zones
                    .as_ref()
                    .map(|v| v.get_ref().clone())
                    .unwrap_or_default(),
                connection,
                service_account: opt(&r.service_account),
                scopes: r
                    .scopes
                    .as_ref()
                    .map(|v| v.get_ref().clone())
                    .unwrap_or_default(),
                network: opt(&r.network),
                subnetwork: opt(&r.subnetwork),
                external_ip: r.external_ip.as_ref().is_none_or(|v| *v.get_ref()),
                disk_type: opt(&r.disk_type),
                disk_size_gb: r.disk_size_gb.as_ref().map_or(0, |v| *v.get_ref()),
                accelerators: r
                    .accelerators
                    .as_ref()
                    .map(|v| v.get_ref().as_slice())
                    .unwrap_or_default()
                    .iter()
                    .map(|a| crate::pool::GceAccelerator {
                        accelerator_type: a.accelerator_type.clone(),
                        count: a.count.max(1),
                    })
                    .collect(),
                spot: r.spot.as_ref().is_some_and(|v| *v.get_ref()),
            })
        }
    };
    Ok(PoolSpec {
        name: name.clone(),
        provider,
        min_machines,
        max_machines,
        runs_per_machine,
        idle_timeout,
        delete_when_idle,
        price_per_hour,
        token_env,
        lease_timeout,
        boot_timeout,
    })
}

fn opt(v: &Option<Spanned<String>>) -> String {
    v.as_ref()
        .map(|v| v.get_ref().trim().to_string())
        .unwrap_or_default()
}

fn labels_of(cx: &Ctx<'_>, l: &Option<Spanned<Labels>>) -> Result<Labels, ManifestError> {
    match l {
        None => Ok(Labels::new()),
        Some(l) => {
            validate_labels(l.get_ref()).map_err(|e| cx.err(l.span(), e.message))?;
            Ok(l.get_ref().clone())
        }
    }
}

/// Parses a size such as `512m`, `2g`, `1GiB`, `100000` into bytes.
pub fn parse_bytes(s: &str) -> Option<u64> {
    let t = s.trim().to_ascii_lowercase();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return None,
    };
    Some((n * mult as f64) as u64)
}

fn parse_connection(cx: &Ctx<'_>, c: &RawConnection) -> Result<ConnectionSpec, ManifestError> {
    validate_resource_id("connection", c.name.get_ref())
        .map_err(|e| cx.err(c.name.span(), e.message))?;
    ProjectName::from_id(c.project.get_ref()).map_err(|e| cx.err(c.project.span(), e.message))?;
    let mut chosen: Vec<Range<usize>> = Vec::new();
    let mut credentials = CredentialsSpec::Adc;
    if let Some(f) = &c.credentials_file {
        if f.get_ref().trim().is_empty() {
            return Err(cx.err(f.span(), "credentials_file must not be empty"));
        }
        credentials = CredentialsSpec::File {
            path: f.get_ref().clone(),
        };
        chosen.push(f.span());
    }
    if let Some(t) = &c.token_env {
        if !is_env_name(t.get_ref()) {
            return Err(cx.err(t.span(), "token_env must name an environment variable"));
        }
        credentials = CredentialsSpec::TokenEnv {
            env: t.get_ref().clone(),
        };
        chosen.push(t.span());
    }
    if let Some(b) = &c.metadata_server {
        if *b.get_ref() {
            credentials = CredentialsSpec::Metadata;
            chosen.push(b.span());
        }
    }
    if chosen.len() > 1 {
        return Err(cx.err(
            chosen[1].clone(),
            "a connection takes one of credentials_file, token_env, metadata_server (none: Application Default Credentials)",
        ));
    }
    let endpoint = |v: &Option<Spanned<String>>, dflt: &str, what: &str| match v {
        None => Ok(dflt.to_string()),
        Some(s) => {
            check_endpoint(s.get_ref()).map_err(|e| cx.err(s.span(), format!("{what}: {e}")))
        }
    };
    Ok(ConnectionSpec {
        name: c.name.get_ref().clone(),
        project: c.project.get_ref().clone(),
        credentials,
        pubsub_endpoint: endpoint(
            &c.pubsub_endpoint,
            GOOGLE_PUBSUB_ENDPOINT,
            "pubsub_endpoint",
        )?,
        storage_endpoint: endpoint(
            &c.storage_endpoint,
            GOOGLE_STORAGE_ENDPOINT,
            "storage_endpoint",
        )?,
        compute_endpoint: endpoint(
            &c.compute_endpoint,
            GOOGLE_COMPUTE_ENDPOINT,
            "compute_endpoint",
        )?,
    })
}

fn resolve_topic(project: &ProjectName, s: &str) -> crate::Result<TopicName> {
    if s.starts_with("projects/") {
        TopicName::parse(s)
    } else {
        TopicName::new(project.clone(), s)
    }
}

/// Name of the subscription pubrun creates for a job.
pub fn job_subscription(project: &str, job: &str) -> String {
    format!("projects/{project}/subscriptions/pubrun-job-{job}")
}

/// Parses and validates a manifest. `file` is only used in messages.
/// Value checks the core cannot make itself (the scheduler owns its cron
/// dialect), run while parsing so that their errors point at the value's
/// `file:line:column` like every other manifest error.
#[derive(Debug, Default, Clone, Copy)]
pub struct FieldChecks {
    pub cron: Option<FieldCheck>,
    pub time_zone: Option<FieldCheck>,
}

/// Checks one value; the error says what is wrong with it.
pub type FieldCheck = fn(&str) -> Result<(), String>;

pub fn parse(file: &str, src: &str) -> Result<Manifest, ManifestError> {
    parse_checked(file, src, FieldChecks::default())
}

/// [`parse`] plus `checks` on the values they cover.
pub fn parse_checked(
    file: &str,
    src: &str,
    checks: FieldChecks,
) -> Result<Manifest, ManifestError> {
    let cx = Ctx { file, src };
    let raw: RawManifest = toml::from_str(src).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        cx.err(span, e.message().trim().to_string())
    })?;
    let project_str = raw
        .project
        .as_ref()
        .map(|p| p.get_ref().clone())
        .unwrap_or_else(|| "demo".to_string());
    let project = ProjectName::from_id(&project_str)
        .map_err(|e| cx.err(raw.project.as_ref().map_or(0..0, |p| p.span()), e.message))?;
    let mut m = Manifest {
        project: project_str.clone(),
        ..Default::default()
    };

    let mut seen = BTreeSet::new();
    for t in &raw.topic {
        let name = resolve_topic(&project, t.name.get_ref())
            .map_err(|e| cx.err(t.name.span(), e.message))?;
        if !seen.insert(name.to_string()) {
            return Err(cx.err(
                t.name.span(),
                format!("topic \"{}\" is declared twice", t.name.get_ref()),
            ));
        }
        let labels = labels_of(&cx, &t.labels)?;
        m.topics.push(TopicConfig {
            name: name.to_string(),
            labels,
        });
    }
    let declared = seen.clone();
    let topic_ref = |s: &Spanned<String>| -> Result<TopicName, ManifestError> {
        let name = resolve_topic(&project, s.get_ref()).map_err(|e| cx.err(s.span(), e.message))?;
        if !declared.contains(&name.to_string()) {
            // Topics may also exist on the server already; apply checks those.
            // Declaring them keeps a manifest self-contained, so we ask for it.
            return Err(cx.err(
                s.span(),
                format!(
                    "topic \"{}\" is not declared; add a [[topic]] with name = \"{}\"",
                    s.get_ref(),
                    name.id()
                ),
            ));
        }
        Ok(name)
    };

    let mut sub_names = BTreeSet::new();
    for s in &raw.subscription {
        let name = SubscriptionName::new(project.clone(), s.name.get_ref())
            .or_else(|_| SubscriptionName::parse(s.name.get_ref()))
            .map_err(|e| cx.err(s.name.span(), e.message))?;
        if !sub_names.insert(name.to_string()) {
            return Err(cx.err(
                s.name.span(),
                format!("subscription \"{}\" is declared twice", s.name.get_ref()),
            ));
        }
        let topic = topic_ref(&s.topic)?;
        let ack = match &s.ack_deadline_seconds {
            Some(a) => {
                normalize_ack_deadline(*a.get_ref()).map_err(|e| cx.err(a.span(), e.message))?
            }
            None => normalize_ack_deadline(0).unwrap(),
        };
        let labels = labels_of(&cx, &s.labels)?;
        m.subscriptions.push(SubscriptionConfig {
            name: name.to_string(),
            topic: topic.to_string(),
            labels,
            ack_deadline_seconds: ack,
            ..Default::default()
        });
    }

    for c in &raw.connection {
        if m.connections.iter().any(|x| &x.name == c.name.get_ref()) {
            return Err(cx.err(
                c.name.span(),
                format!("connection \"{}\" is declared twice", c.name.get_ref()),
            ));
        }
        m.connections.push(parse_connection(&cx, c)?);
    }

    let mut pool_names = BTreeSet::new();
    for p in &raw.pool {
        if !pool_names.insert(p.name.get_ref().clone()) {
            return Err(cx.err(
                p.name.span(),
                format!("pool \"{}\" is declared twice", p.name.get_ref()),
            ));
        }
        m.pools.push(parse_pool(&cx, p, &m.connections)?);
    }

    let mut job_names = BTreeSet::new();
    for j in &raw.job {
        let name = j.name.get_ref();
        validate_resource_id("job", name).map_err(|e| cx.err(j.name.span(), e.message))?;
        if !job_names.insert(name.clone()) {
            return Err(cx.err(j.name.span(), format!("job \"{name}\" is declared twice")));
        }
        // A job listens to a local topic, or to a subscription of a
        // connection (full Google names: nothing there is declared here).
        let connection = match &j.connection {
            None => None,
            Some(c) => Some(
                m.connections
                    .iter()
                    .find(|x| &x.name == c.get_ref())
                    .cloned()
                    .ok_or_else(|| {
                        cx.err(
                            c.span(),
                            format!(
                                "connection \"{}\" is not declared; add a [[connection]] with name = \"{}\"",
                                c.get_ref(),
                                c.get_ref()
                            ),
                        )
                    })?,
            ),
        };
        let (topic, subscription) = match (&connection, &j.topic, &j.subscription) {
            (None, Some(t), None) => (topic_ref(t)?.to_string(), String::new()),
            (None, _, Some(s)) => {
                return Err(cx.err(
                    s.span(),
                    "`subscription` names a subscription of a connection; set `connection` too (local jobs use `topic`)",
                ))
            }
            (None, None, None) => {
                return Err(cx.err(j.name.span(), format!("job \"{name}\" needs `topic`")))
            }
            (Some(_), Some(t), _) => {
                return Err(cx.err(
                    t.span(),
                    "a job on a connection is triggered by its `subscription`, not a `topic`",
                ))
            }
            (Some(c), None, None) => {
                return Err(cx.err(
                    j.name.span(),
                    format!(
                        "job \"{name}\" on connection \"{}\" needs `subscription = \"projects/{}/subscriptions/…\"`",
                        c.name, c.project
                    ),
                ))
            }
            (Some(_), None, Some(s)) => {
                let sub = SubscriptionName::parse(s.get_ref()).map_err(|e| {
                    cx.err(s.span(), format!("subscription: {} (write the full name projects/P/subscriptions/S)", e.message))
                })?;
                (String::new(), sub.to_string())
            }
        };
        if let Some(f) = &j.filter {
            if let Err(e) = crate::filter::parse(f.get_ref()) {
                // Point at the offending character when the value is written
                // without escapes; otherwise at the start of the string.
                let span = f.span();
                let raw = cx.src.get(span.clone()).unwrap_or("");
                let quote = if raw.starts_with("'''") || raw.starts_with("\"\"\"") {
                    3
                } else {
                    1
                };
                let exact = raw
                    .get(quote..)
                    .is_some_and(|r| r.starts_with(f.get_ref().as_str()));
                let at = if exact {
                    span.start + quote + e.position
                } else {
                    span.start
                };
                return Err(cx.err(
                    at..at,
                    format!("invalid filter: {} (at position {})", e.message, e.position),
                ));
            }
        }
        let check_tmpl = |span: Range<usize>, s: &str| -> Result<(), ManifestError> {
            template::validate(s).map_err(|e| cx.err(span, e.message))
        };
        let executor = match (&j.process, &j.docker) {
            (Some(p), None) => {
                let r = p.get_ref();
                if r.command.is_empty() {
                    return Err(cx.err(p.span(), "process.command must not be empty"));
                }
                for s in std::iter::once(&r.command).chain(&r.args).chain(r.env.values()) {
                    check_tmpl(p.span(), s)?;
                }
                ExecutorSpec::Process(ProcessSpec {
                    command: r.command.clone(),
                    args: r.args.clone(),
                    env: r.env.clone(),
                    working_dir: r.working_dir.clone(),
                })
            }
            (None, Some(d)) => {
                let r = d.get_ref();
                if r.image.trim().is_empty() {
                    return Err(cx.err(d.span(), "docker.image must not be empty"));
                }
                for s in r.command.iter().chain(r.env.values()) {
                    check_tmpl(d.span(), s)?;
                }
                let memory_bytes = match &r.memory {
                    Some(s) => Some(parse_bytes(s).ok_or_else(|| {
                        cx.err(d.span(), format!("docker.memory: \"{s}\" is not a size; write e.g. \"512m\" or \"2g\""))
                    })?),
                    None => None,
                };
                if let Some(c) = r.cpus {
                    if !(c > 0.0 && c <= 1024.0) {
                        return Err(cx.err(d.span(), format!("docker.cpus is {c}; it must be above 0")));
                    }
                }
                let pull = match r.pull.as_deref() {
                    None | Some("if-not-present") => PullPolicy::IfNotPresent,
                    Some("always") => PullPolicy::Always,
                    Some("never") => PullPolicy::Never,
                    Some(other) => {
                        return Err(cx.err(
                            d.span(),
                            format!("docker.pull is \"{other}\"; one of \"if-not-present\", \"always\", \"never\""),
                        ))
                    }
                };
                for mnt in &r.mounts {
                    if !mnt.target.starts_with('/') {
                        return Err(cx.err(d.span(), format!("mount target \"{}\" must be an absolute path", mnt.target)));
                    }
                }
                ExecutorSpec::Docker(DockerSpec {
                    image: r.image.clone(),
                    command: r.command.clone(),
                    env: r.env.clone(),
                    mounts: r
                        .mounts
                        .iter()
                        .map(|x| Mount { source: x.source.clone(), target: x.target.clone(), read_only: x.read_only })
                        .collect(),
                    cpus: r.cpus,
                    memory_bytes,
                    network: r.network.clone(),
                    pull,
                    auth: r.auth.as_ref().map(|a| RegistryAuth {
                        username: a.username.clone(),
                        password_env: a.password_env.clone(),
                        server: a.server.clone(),
                    }),
                    working_dir: r.working_dir.clone(),
                })
            }
            (Some(_), Some(d)) => return Err(cx.err(d.span(), "a job has either `process` or `docker`, not both")),
            (None, None) => {
                return Err(cx.err(j.name.span(), format!("job \"{name}\" needs `process = {{ command = … }}` or `docker = {{ image = … }}`")))
            }
        };
        let retries = match &j.retries {
            None => RetryPolicy::default(),
            Some(r) => {
                let raw = r.get_ref();
                if raw.max_attempts == 0 {
                    return Err(cx.err(
                        r.span(),
                        "retries.max_attempts counts the first attempt too; it must be at least 1",
                    ));
                }
                let d = RetryPolicy::default();
                let parse = |v: &Option<String>, dflt: Duration, what: &str| match v {
                    None => Ok(dflt),
                    Some(s) => humantime::parse_duration(s)
                        .map_err(|e| cx.err(r.span(), format!("retries.{what}: \"{s}\" ({e})"))),
                };
                let initial = parse(&raw.initial_backoff, d.initial_backoff, "initial_backoff")?;
                let max = parse(&raw.max_backoff, d.max_backoff, "max_backoff")?;
                if max < initial {
                    return Err(cx.err(
                        r.span(),
                        "retries.max_backoff must not be below initial_backoff",
                    ));
                }
                RetryPolicy {
                    max_attempts: raw.max_attempts,
                    initial_backoff: initial,
                    max_backoff: max,
                }
            }
        };
        let concurrency = match &j.concurrency {
            Some(c) if *c.get_ref() == 0 => {
                return Err(cx.err(c.span(), "concurrency must be at least 1"))
            }
            Some(c) => *c.get_ref(),
            None => 1,
        };
        let timeout = cx.duration(&j.timeout, Duration::from_secs(3600), "timeout")?;
        if timeout.is_zero() {
            return Err(cx.err(
                j.timeout.as_ref().unwrap().span(),
                "timeout must be above 0",
            ));
        }
        let dedup_key = match &j.dedup_key {
            Some(k) => {
                check_tmpl(k.span(), k.get_ref())?;
                k.get_ref().clone()
            }
            None => String::new(),
        };
        let result_topic = match (&j.result_topic, &connection) {
            (Some(t), None) => topic_ref(t)?.to_string(),
            (Some(t), Some(_)) => TopicName::parse(t.get_ref())
                .map_err(|e| {
                    cx.err(t.span(), format!("result_topic: {} (a topic of the connection: write the full name projects/P/topics/T)", e.message))
                })?
                .to_string(),
            (None, _) => String::new(),
        };
        let log_limit_bytes = match &j.log_limit {
            Some(s) => parse_bytes(s.get_ref()).ok_or_else(|| {
                cx.err(
                    s.span(),
                    format!("log_limit: \"{}\" is not a size; e.g. \"10m\"", s.get_ref()),
                )
            })?,
            None => 10 << 20,
        };
        // Staging: local sides relative and inside the working directory,
        // bucket sides `gs://BUCKET/PREFIX` (the prefix may be a template).
        let check_local = |v: &Spanned<String>, what: &str| -> Result<(), ManifestError> {
            check_relative_path(v.get_ref()).map_err(|e| cx.err(v.span(), format!("{what}: {e}")))
        };
        let check_gs = |v: &Spanned<String>, what: &str| -> Result<(), ManifestError> {
            parse_gs_url(v.get_ref()).map_err(|e| cx.err(v.span(), format!("{what}: {e}")))?;
            check_tmpl(v.span(), v.get_ref())
        };
        let mut inputs = Vec::new();
        for i in &j.inputs {
            let r = i.get_ref();
            if r.from.get_ref() != TRIGGER_INPUT {
                check_gs(&r.from, "inputs.from (\"trigger\" or gs://BUCKET/PREFIX)")?;
            }
            check_local(&r.to, "inputs.to")?;
            inputs.push(InputSpec {
                from: r.from.get_ref().clone(),
                to: r.to.get_ref().clone(),
            });
        }
        let mut outputs = Vec::new();
        for o in &j.outputs {
            let r = o.get_ref();
            check_local(&r.from, "outputs.from")?;
            check_gs(&r.to, "outputs.to")?;
            outputs.push(OutputSpec {
                from: r.from.get_ref().clone(),
                to: r.to.get_ref().clone(),
            });
        }
        let pool = match &j.pool {
            None => LOCAL_POOL.to_string(),
            Some(p) if p.get_ref() == LOCAL_POOL || pool_names.contains(p.get_ref()) => {
                p.get_ref().clone()
            }
            Some(p) => {
                return Err(cx.err(
                    p.span(),
                    format!(
                        "pool \"{}\" is not declared; add a [[pool]] with name = \"{}\" (or leave `pool` out to run on \"local\")",
                        p.get_ref(),
                        p.get_ref()
                    ),
                ))
            }
        };
        let upload_outputs = match &j.upload_outputs {
            None => UploadOutputs::Always,
            Some(u) => match u.get_ref().as_str() {
                "always" => UploadOutputs::Always,
                "on_success" => UploadOutputs::OnSuccess,
                other => {
                    return Err(cx.err(
                        u.span(),
                        format!("upload_outputs is \"{other}\"; one of \"always\", \"on_success\""),
                    ))
                }
            },
        };
        let mut result_attributes = BTreeMap::new();
        if let Some(ra) = &j.result_attributes {
            for (k, v) in ra.get_ref() {
                if crate::job::RESULT_ATTRIBUTES.contains(&k.as_str()) {
                    return Err(cx.err(
                        ra.span(),
                        format!("result_attributes: \"{k}\" is set by pubrun on every result; choose another name"),
                    ));
                }
                check_tmpl(ra.span(), v)?;
                result_attributes.insert(k.clone(), v.clone());
            }
        }
        m.jobs.push(JobSpec {
            upload_outputs,
            result_attributes,
            result_trigger_attributes: j.result_trigger_attributes,
            name: name.clone(),
            pool,
            topic,
            connection,
            subscription,
            filter: j
                .filter
                .as_ref()
                .map(|f| f.get_ref().clone())
                .unwrap_or_default(),
            executor,
            timeout,
            grace_period: cx.duration(&j.grace_period, Duration::from_secs(10), "grace_period")?,
            retries,
            concurrency,
            dedup_key,
            dedup_window: cx.duration(
                &j.dedup_window,
                Duration::from_secs(24 * 3600),
                "dedup_window",
            )?,
            result_topic,
            log_limit_bytes,
            inputs,
            outputs,
            pass_env: j
                .pass_env
                .as_ref()
                .map(|p| p.get_ref().clone())
                .unwrap_or_default(),
            secrets: j
                .secrets
                .as_ref()
                .map(|s| {
                    s.get_ref()
                        .iter()
                        .map(|(k, v)| (k.clone(), SecretRef { env: v.env.clone() }))
                        .collect()
                })
                .unwrap_or_default(),
        });
        let spec = m.jobs.last().expect("just pushed");
        if let Err(e) = spec.check_environment() {
            let span = if e.contains("secrets") {
                j.secrets.as_ref().map(|s| s.span())
            } else if e.contains("pass_env") {
                j.pass_env.as_ref().map(|p| p.span())
            } else {
                None
            };
            let span = span
                .or(j.process.as_ref().map(|p| p.span()))
                .or(j.docker.as_ref().map(|d| d.span()))
                .unwrap_or(j.name.span());
            return Err(cx.err(span, e));
        }
    }
    let mut names = BTreeSet::new();
    for b in &raw.bucket {
        if !names.insert(b.name.get_ref().clone()) {
            return Err(cx.err(
                b.name.span(),
                format!("bucket \"{}\" is declared twice", b.name.get_ref()),
            ));
        }
        let mut notifications = Vec::new();
        for n in &b.notifications {
            let r = n.get_ref();
            let topic = topic_ref(&Spanned::new(n.span(), r.topic.clone()))?;
            const EVENTS: [&str; 4] = [
                "OBJECT_FINALIZE",
                "OBJECT_DELETE",
                "OBJECT_METADATA_UPDATE",
                "OBJECT_ARCHIVE",
            ];
            if let Some(bad) = r.event_types.iter().find(|e| !EVENTS.contains(&e.as_str())) {
                return Err(cx.err(
                    n.span(),
                    format!("unknown event type \"{bad}\"; one of {}", EVENTS.join(", ")),
                ));
            }
            let payload_format = r
                .payload_format
                .clone()
                .unwrap_or_else(|| "JSON_API_V1".to_string());
            if payload_format != "JSON_API_V1" && payload_format != "NONE" {
                return Err(cx.err(
                    n.span(),
                    format!("payload_format is \"{payload_format}\"; one of JSON_API_V1, NONE"),
                ));
            }
            notifications.push(NotificationDecl {
                topic: topic.to_string(),
                event_types: r.event_types.clone(),
                object_name_prefix: r.object_name_prefix.clone(),
                custom_attributes: r.custom_attributes.clone(),
                payload_format,
            });
        }
        m.buckets.push(BucketDecl {
            name: b.name.get_ref().clone(),
            notifications,
        });
    }
    let mut names = BTreeSet::new();
    for sc in &raw.schedule {
        if !names.insert(sc.name.get_ref().clone()) {
            return Err(cx.err(
                sc.name.span(),
                format!("schedule \"{}\" is declared twice", sc.name.get_ref()),
            ));
        }
        let named = |e: String| format!("schedule \"{}\": {e}", sc.name.get_ref());
        if let Some(check) = checks.cron {
            check(sc.cron.get_ref()).map_err(|e| cx.err(sc.cron.span(), named(e)))?;
        }
        if let (Some(check), Some(tz)) = (checks.time_zone, &sc.time_zone) {
            check(tz.get_ref()).map_err(|e| cx.err(tz.span(), named(e)))?;
        }
        m.schedules.push(ScheduleDecl {
            name: sc.name.get_ref().clone(),
            cron: sc.cron.get_ref().clone(),
            time_zone: sc
                .time_zone
                .as_ref()
                .map_or_else(|| "UTC".to_string(), |t| t.get_ref().clone()),
            topic: topic_ref(&sc.topic)?.to_string(),
            data: sc.data.clone(),
            attributes: sc.attributes.clone(),
            missed: sc.missed.clone(),
            missed_max_age: sc.missed_max_age.clone(),
            paused: sc.paused,
        });
    }
    let mut names = BTreeSet::new();
    for w in &raw.webhook {
        if !names.insert(w.name.get_ref().clone()) {
            return Err(cx.err(
                w.name.span(),
                format!("webhook \"{}\" is declared twice", w.name.get_ref()),
            ));
        }
        m.webhooks.push(WebhookDecl {
            name: w.name.get_ref().clone(),
            topic: topic_ref(&w.topic)?.to_string(),
            secret_env: w.secret_env.clone(),
            bearer_secret_env: w.bearer_secret_env.clone(),
            headers_as_attributes: w.headers_as_attributes.clone(),
            query_as_attributes: w.query_as_attributes,
            max_body_bytes: w.max_body_bytes,
        });
    }
    Ok(m)
}

#[cfg(test)]
mod tests {

    #[test]
    fn resource_kinds_are_the_tables_the_parser_takes() {
        let e = parse("m.toml", "[[no_such_kind]]\nname = \"x\"\n").unwrap_err();
        let mut named: Vec<&str> = e
            .message
            .split('`')
            .skip(1)
            .step_by(2)
            .filter(|k| *k != "project" && *k != "no_such_kind")
            .collect();
        named.sort_unstable();
        let mut kinds = RESOURCE_KINDS.to_vec();
        kinds.sort_unstable();
        assert_eq!(named, kinds, "{}", e.message);
    }

    use super::*;

    const GOOD: &str = r#"
project = "demo"

[[topic]]
name = "uploads"
[[topic]]
name = "results"

[[job]]
name = "fit-model"
topic = "uploads"
process = { command = "python3", args = ["fit.py", "{{ attributes.objectId }}"] }
timeout = "30m"
retries = { max_attempts = 3, initial_backoff = "10s", max_backoff = "5m" }
concurrency = 4
result_topic = "results"
dedup_key = "{{ publish_time | date }}"
"#;

    #[test]
    fn parses_the_design_example() {
        let m = parse("pubrun.toml", GOOD).unwrap();
        assert_eq!(m.topics.len(), 2);
        let j = &m.jobs[0];
        assert_eq!(j.topic, "projects/demo/topics/uploads");
        assert_eq!(j.result_topic, "projects/demo/topics/results");
        assert_eq!(j.timeout, Duration::from_secs(1800));
        assert_eq!(j.retries.max_attempts, 3);
        assert_eq!(j.concurrency, 4);
        assert!(
            matches!(&j.executor, ExecutorSpec::Process(p) if p.args[1] == "{{ attributes.objectId }}")
        );
    }

    fn err(src: &str) -> ManifestError {
        parse("pubrun.toml", src).unwrap_err()
    }

    #[test]
    fn unknown_keys_point_at_their_line() {
        let e = err("project = \"demo\"\n[[topic]]\nname = \"abc\"\ncolour = \"red\"\n");
        assert_eq!((e.line, e.file.as_str()), (4, "pubrun.toml"));
        assert!(e.message.contains("colour"), "{e}");
        assert!(e.to_string().starts_with("pubrun.toml:4:"), "{e}");
    }

    #[test]
    fn semantic_errors_point_at_the_value() {
        let e = err("[[topic]]\nname = \"uploads\"\n[[job]]\nname = \"j1x\"\ntopic = \"upload\"\nprocess = { command = \"true\" }\n");
        assert_eq!(e.line, 5);
        assert!(e.message.contains("not declared"), "{e}");
        let e = err("[[topic]]\nname = \"uploads\"\n[[job]]\nname = \"j1x\"\ntopic = \"uploads\"\nprocess = { command = \"echo\", args = [\"{{ atributes.x }}\"] }\n");
        assert_eq!(e.line, 6);
        assert!(e.message.contains("atributes"), "{e}");
        let e = err("[[topic]]\nname = \"uploads\"\n[[job]]\nname = \"j1x\"\ntopic = \"uploads\"\nprocess = { command = \"x\" }\ntimeout = \"soon\"\n");
        assert_eq!(e.line, 7);
        let e = err("[[topic]]\nname = \"up\"\n");
        assert!(e.message.contains("between 3 and 255"), "{e}");
        let e =
            err("[[topic]]\nname = \"uploads\"\n[[job]]\nname = \"j1x\"\ntopic = \"uploads\"\n");
        assert!(e.message.contains("needs `process"), "{e}");
        let e = err("[[topic]]\nname = \"uploads\"\n[[job]]\nname = \"j1x\"\ntopic = \"uploads\"\ndocker = { image = \"x\", memory = \"lots\" }\n");
        assert!(e.message.contains("memory"), "{e}");
    }

    #[test]
    fn job_filters_are_validated_with_the_error_position() {
        let job = |filter: &str| {
            format!("[[topic]]\nname = \"uploads\"\n[[job]]\nname = \"j1x\"\ntopic = \"uploads\"\nprocess = {{ command = \"true\" }}\nfilter = {filter}\n")
        };
        let m = parse(
            "pubrun.toml",
            &job(r#"'attributes.eventType = "OBJECT_FINALIZE"'"#),
        )
        .unwrap();
        assert_eq!(
            m.jobs[0].filter,
            r#"attributes.eventType = "OBJECT_FINALIZE""#
        );
        // `filter = '` is 10 characters, so position 15 of the filter is column 26.
        let e = err(&job("'attributes.x = '"));
        assert_eq!((e.line, e.column), (7, 26), "{e}");
        assert!(
            e.message.starts_with("invalid filter:") && e.message.contains("position 15"),
            "{e}"
        );
        let e = err(&job("'''attributes.x AND'''"));
        assert_eq!(e.line, 7, "{e}");
        assert!(e.message.contains("invalid filter"), "{e}");
    }

    #[test]
    fn buckets_with_notifications() {
        let m = parse(
            "t.toml",
            "[[topic]]\nname = \"uploads\"\n[[bucket]]\nname = \"input\"\nnotifications = [{ topic = \"uploads\", event_types = [\"OBJECT_FINALIZE\"], object_name_prefix = \"csv/\" }]\n",
        )
        .unwrap();
        assert_eq!(
            m.buckets[0].notifications[0].topic,
            "projects/demo/topics/uploads"
        );
        assert_eq!(m.buckets[0].notifications[0].payload_format, "JSON_API_V1");
        let e = err("[[topic]]\nname = \"uploads\"\n[[bucket]]\nname = \"input\"\nnotifications = [{ topic = \"uploads\", event_types = [\"OBJECT_MADE\"] }]\n");
        assert_eq!(e.line, 5, "{e}");
        assert!(e.message.contains("OBJECT_MADE"), "{e}");
    }

    #[test]
    fn schedules_and_webhooks() {
        let m = parse(
            "t.toml",
            "[[topic]]\nname = \"imports\"\n[[schedule]]\nname = \"nightly\"\ncron = \"0 3 * * *\"\ntime_zone = \"Europe/Berlin\"\ntopic = \"imports\"\ndata = '{\"full\": true}'\n[[webhook]]\nname = \"start-import\"\ntopic = \"imports\"\nsecret_env = \"HOOK_SECRET\"\n",
        )
        .unwrap();
        assert_eq!(m.schedules[0].topic, "projects/demo/topics/imports");
        assert_eq!(m.schedules[0].time_zone, "Europe/Berlin");
        assert_eq!(m.webhooks[0].secret_env.as_deref(), Some("HOOK_SECRET"));
        let e = err("[[topic]]\nname = \"imports\"\n[[schedule]]\nname = \"n\"\ncron = \"0 3 * * *\"\ntopic = \"imports\"\nwhen = 1\n");
        assert_eq!(e.line, 7, "{e}");
        let e = err("[[webhook]]\nname = \"w\"\ntopic = \"nope\"\n");
        assert!(e.message.contains("not declared"), "{e}");
    }

    #[test]
    fn job_pass_env_and_secrets() {
        let job = |extra: &str| {
            format!("[[topic]]\nname = \"uploads\"\n[[job]]\nname = \"j1x\"\ntopic = \"uploads\"\nprocess = {{ command = \"env\", env = {{ MODE = \"x\" }} }}\n{extra}\n")
        };
        let m = parse(
            "pubrun.toml",
            &job("pass_env = [\"HTTP_PROXY\"]\nsecrets = { DB_PASSWORD = { env = \"PROD_DB_PASSWORD\" } }"),
        )
        .unwrap();
        let j = &m.jobs[0];
        assert_eq!(j.pass_env, vec!["HTTP_PROXY".to_string()]);
        assert_eq!(j.secrets["DB_PASSWORD"].env, "PROD_DB_PASSWORD");
        let e = parse("m.toml", &job("secrets = { MODE = { env = \"X\" } }")).unwrap_err();
        assert!(e.message.contains("both env and secrets"), "{e}");
        assert_eq!(e.line, 7, "{e}");
        let e = parse("m.toml", &job("pass_env = [\"PUBRUN_TOKEN\"]")).unwrap_err();
        assert!(e.message.contains("reserved"), "{e}");
        assert_eq!(e.line, 7, "{e}");
        let e = parse(
            "m.toml",
            &job("secrets = { A = { env = \"X\", value = \"s\" } }"),
        )
        .unwrap_err();
        assert!(e.message.contains("value"), "{e}");
    }

    #[test]
    fn connections_and_jobs_on_them() {
        let src = r#"
[[connection]]
name = "gcp"
project = "theirs"
credentials_file = "/etc/pubrun/sa.json"
pubsub_endpoint = "http://127.0.0.1:9000/"
[[job]]
name = "xjob"
connection = "gcp"
subscription = "projects/theirs/subscriptions/uploads"
result_topic = "projects/theirs/topics/results"
process = { command = "true" }
inputs = [{ from = "trigger", to = "in/" }]
outputs = [{ from = "out/", to = "gs://their-bucket/results/{{ run.id }}/" }]
"#;
        let m = parse("pubrun.toml", src).unwrap();
        let c = &m.connections[0];
        assert_eq!(c.pubsub_endpoint, "http://127.0.0.1:9000");
        assert_eq!(c.storage_endpoint, GOOGLE_STORAGE_ENDPOINT);
        assert_eq!(
            c.credentials,
            CredentialsSpec::File {
                path: "/etc/pubrun/sa.json".into()
            }
        );
        let j = &m.jobs[0];
        assert_eq!(j.connection.as_ref(), Some(c));
        assert_eq!(j.subscription, "projects/theirs/subscriptions/uploads");
        assert_eq!(j.topic, "");
        assert_eq!(j.result_topic, "projects/theirs/topics/results");

        let e = err(&src.replace("connection = \"gcp\"", "connection = \"gpc\""));
        assert!(
            e.message.contains("connection \"gpc\" is not declared"),
            "{e}"
        );
        assert_eq!(e.line, 9);
        let e = err(&src.replace(
            "subscription = \"projects/theirs/subscriptions/uploads\"",
            "subscription = \"uploads\"",
        ));
        assert!(e.message.contains("full name"), "{e}");
        let e = err(&src.replace("name = \"xjob\"", "name = \"xjob\"\ntopic = \"t\""));
        assert!(e.message.contains("not a `topic`"), "{e}");
        let e = err(&src.replace("credentials_file", "token_env = \"T\"\ncredentials_file"));
        assert!(e.message.contains("one of credentials_file"), "{e}");
        let e = err(&src.replace("credentials_file", "credentials_fiel"));
        assert!(e.message.contains("unknown field"), "{e}");
        assert_eq!(e.line, 5);
        let e = err(&src.replace("http://127.0.0.1:9000/", "127.0.0.1:9000"));
        assert!(e.message.contains("pubsub_endpoint"), "{e}");
    }

    #[test]
    fn job_inputs_and_outputs() {
        let job = |extra: &str| {
            format!("[[topic]]\nname = \"uploads\"\n[[job]]\nname = \"j1x\"\ntopic = \"uploads\"\nprocess = {{ command = \"true\" }}\n{extra}\n")
        };
        let m = parse(
            "pubrun.toml",
            &job("inputs = [{ from = \"trigger\", to = \"in/\" }, { from = \"gs://shared-bucket/some/prefix/\", to = \"shared/\" }]\noutputs = [{ from = \"out/\", to = \"gs://output/results/{{ run.id }}/\" }]"),
        )
        .unwrap();
        let j = &m.jobs[0];
        assert_eq!(j.inputs.len(), 2);
        assert_eq!(
            j.inputs[0],
            InputSpec {
                from: "trigger".into(),
                to: "in/".into()
            }
        );
        assert_eq!(j.inputs[1].from, "gs://shared-bucket/some/prefix/");
        assert_eq!(
            j.outputs[0],
            OutputSpec {
                from: "out/".into(),
                to: "gs://output/results/{{ run.id }}/".into()
            }
        );
        // Without them: empty.
        assert!(parse("pubrun.toml", &job("")).unwrap().jobs[0]
            .inputs
            .is_empty());

        let e = err(&job("inputs = [{ from = \"trigger\", to = \"../in\" }]"));
        assert_eq!((e.line, e.column), (7, 36), "{e}");
        assert!(
            e.message.contains("inputs.to") && e.message.contains(".."),
            "{e}"
        );
        let e = err(&job("inputs = [{ from = \"trigger\", to = \"/abs\" }]"));
        assert!(e.message.contains("relative"), "{e}");
        let e = err(&job("inputs = [{ from = \"s3://x/y\", to = \"in\" }]"));
        assert_eq!((e.line, e.column), (7, 20), "{e}");
        assert!(e.message.contains("gs://"), "{e}");
        let e = err(&job(
            "outputs = [{ from = \"out/\", to = \"gs://Bad_Bucket!/x\" }]",
        ));
        assert_eq!(e.line, 7, "{e}");
        assert!(e.message.contains("bucket name"), "{e}");
        let e = err(&job(
            "outputs = [{ from = \"out/\", to = \"gs://output/{{ runn.id }}/\" }]",
        ));
        assert_eq!(e.line, 7, "{e}");
        assert!(e.message.contains("runn"), "{e}");
        let e = err(&job(
            "outputs = [{ from = \"a/../../b\", to = \"gs://output/x/\" }]",
        ));
        assert!(e.message.contains("outputs.from"), "{e}");
        let e = err(&job(
            "outputs = [{ from = \"out/\", to = \"gs://output/x/\", mode = 1 }]",
        ));
        assert!(e.message.contains("mode"), "{e}");
    }

    const POOLS: &str = r#"[[topic]]
name = "imports"

[[pool]]
name = "big"
provider = "docker"
docker_host = "unix:///var/run/docker.sock"
server_url = "http://host.docker.internal:8085"
min_machines = 0
max_machines = 2
runs_per_machine = 2
idle_timeout = "10m"
price_per_hour = 3.20
memory = "2GiB"
cpus = 2

[[pool]]
name = "gpu"
provider = "gce"
project = "my-project"
zone = "europe-west1-b"
machine_type = "n2-highmem-8"
source_image = "projects/cos-cloud/global/images/family/cos-stable"
server_url = "https://pubrun.example.com"
access_token_env = "GCE_TOKEN"

[[pool]]
name = "laptops"
provider = "agents"
token_env = "LAPTOP_TOKEN"
lease_timeout = "1m"

[[job]]
name = "es-import"
topic = "imports"
docker = { image = "importer:latest" }
pool = "big"

[[job]]
name = "quick"
topic = "imports"
process = { command = "true" }
"#;

    #[test]
    fn pools_parse_with_defaults() {
        use crate::pool::{ProviderSpec, LOCAL_POOL};
        let m = parse("pubrun.toml", POOLS).unwrap();
        assert_eq!(m.pools.len(), 3);
        let big = &m.pools[0];
        assert_eq!(
            (big.min_machines, big.max_machines, big.runs_per_machine),
            (0, 2, 2)
        );
        assert_eq!(big.idle_timeout, Duration::from_secs(600));
        assert_eq!(big.lease_timeout, Duration::from_secs(30));
        assert_eq!(big.boot_timeout, Duration::from_secs(300));
        assert!(
            big.delete_when_idle,
            "docker machines are deleted by default"
        );
        assert_eq!(big.price_per_hour, Some(3.2));
        let ProviderSpec::Docker(d) = &big.provider else {
            panic!("{big:?}")
        };
        assert_eq!(d.image, "pubrun-agent:dev");
        assert_eq!(d.memory_bytes, Some(2 << 30));
        assert_eq!(d.cpus, Some(2.0));
        assert_eq!(d.server_url, "http://host.docker.internal:8085");

        let gpu = &m.pools[1];
        assert_eq!((gpu.min_machines, gpu.max_machines), (0, 1));
        assert!(!gpu.delete_when_idle, "gce machines are stopped by default");
        let ProviderSpec::Gce(g) = &gpu.provider else {
            panic!("{gpu:?}")
        };
        assert_eq!(g.api_base, "https://compute.googleapis.com/compute/v1/");
        assert_eq!(g.name_prefix, "pubrun");
        assert_eq!(g.access_token_env, "GCE_TOKEN");

        let laptops = &m.pools[2];
        assert_eq!(laptops.provider, ProviderSpec::Agents);
        assert_eq!(laptops.token_env, "LAPTOP_TOKEN");
        assert_eq!(laptops.lease_timeout, Duration::from_secs(60));

        assert_eq!(m.jobs[0].pool, "big");
        assert_eq!(m.jobs[1].pool, LOCAL_POOL);
        // "local" needs no declaration; declaring it with provider "local" is fine.
        let m = parse(
            "t.toml",
            &POOLS.replace("pool = \"big\"", "pool = \"local\""),
        )
        .unwrap();
        assert_eq!(m.jobs[0].pool, "local");
        let m = parse(
            "t.toml",
            "[[pool]]\nname = \"local\"\nprovider = \"local\"\nprice_per_hour = 0.5\n",
        )
        .unwrap();
        assert_eq!(m.pools[0].provider, ProviderSpec::Local);
    }

    #[test]
    fn gce_name_prefix_is_stored_and_checked() {
        use crate::pool::ProviderSpec;
        let with = |prefix: &str| {
            POOLS.replace(
                "access_token_env = \"GCE_TOKEN\"\n",
                &format!("access_token_env = \"GCE_TOKEN\"\nname_prefix = {prefix}\n"),
            )
        };
        let m = parse("pubrun.toml", &with("\"acme-ci\"")).unwrap();
        let ProviderSpec::Gce(g) = &m.pools[1].provider else {
            panic!("{:?}", m.pools[1])
        };
        assert_eq!(g.name_prefix, "acme-ci");
        // Not a valid start of an instance name: pointed at on its line (26).
        let e = err(&with("\"Acme\""));
        assert_eq!((e.line, e.column), (26, 15), "{e}");
        assert!(e.message.contains("name_prefix \"Acme\""), "{e}");
        // PREFIX-gpu-NNNNNN must fit in 63 characters.
        let e = err(&with(&format!("\"{}\"", "p".repeat(53))));
        assert!(e.message.contains("63 characters"), "{e}");
        assert!(parse("pubrun.toml", &with(&format!("\"{}\"", "p".repeat(52)))).is_ok());
        // Only gce pools take it.
        let e = err(&pools_with(10, "name_prefix = \"x\""));
        assert!(
            e.message
                .contains("`name_prefix` does not apply to provider \"docker\""),
            "{e}"
        );
    }

    #[test]
    fn gce_pools_on_a_connection() {
        use crate::pool::ProviderSpec;
        let src = r#"
[[connection]]
name = "gcp"
project = "theirs"
credentials_file = "/etc/pubrun/sa.json"
compute_endpoint = "http://127.0.0.1:9"

[[pool]]
name = "gpu"
provider = "gce"
connection = "gcp"
server_url = "http://10.0.0.2:8085"
zone = "europe-west1-b"
machine_type = "g2-standard-4"
source_image = "projects/debian-cloud/global/images/family/debian-12"
service_account = "runner@theirs.iam.gserviceaccount.com"
subnetwork = "regions/europe-west1/subnetworks/batch"
external_ip = false
disk_type = "pd-ssd"
disk_size_gb = 200
accelerators = [{ type = "nvidia-l4", count = 2 }]
spot = true
"#;
        let m = parse("pubrun.toml", src).unwrap();
        let ProviderSpec::Gce(g) = &m.pools[0].provider else {
            panic!("{:?}", m.pools[0])
        };
        assert_eq!(g.project, "theirs", "the connection's project");
        assert_eq!(g.api_base, "http://127.0.0.1:9/compute/v1/");
        assert_eq!(g.connection.as_ref().unwrap().name, "gcp");
        assert!(!g.external_ip && g.spot);
        assert_eq!((g.disk_type.as_str(), g.disk_size_gb), ("pd-ssd", 200));
        assert_eq!(g.accelerators[0].count, 2);
        let e = err(&src.replace(
            "connection = \"gcp\"\nserver",
            "connection = \"gpc\"\nserver",
        ));
        assert!(
            e.message.contains("connection \"gpc\" is not declared"),
            "{e}"
        );
        let e = err(&pools_with(10, "spot = true"));
        assert!(
            e.message
                .contains("`spot` does not apply to provider \"docker\""),
            "{e}"
        );
    }

    #[test]
    fn the_gce_example_manifest_is_valid() {
        use crate::pool::ProviderSpec;
        let m = parse(
            "pubrun.toml",
            include_str!("../../../examples/gce/pubrun.toml"),
        )
        .unwrap();
        let ProviderSpec::Gce(g) = &m.pools[0].provider else {
            panic!("{:?}", m.pools[0])
        };
        assert!(g.spot && !g.external_ip && g.connection.is_some());
        assert_eq!(m.jobs[0].pool, "gpu");
        assert_eq!(m.jobs[0].connection.as_ref().unwrap().name, "gcp");
    }

    #[test]
    fn job_pool_must_be_declared() {
        let e = err(&POOLS.replace("pool = \"big\"", "pool = \"bigg\""));
        assert_eq!((e.line, e.column), (37, 8), "{e}");
        assert!(e.message.contains("\"bigg\" is not declared"), "{e}");
    }

    #[test]
    fn docker_socket_pools() {
        use crate::pool::{ProviderSpec, DEFAULT_MACHINE_DATA_DIR};
        let docker = |m: &Manifest| match &m.pools[0].provider {
            ProviderSpec::Docker(d) => d.clone(),
            other => panic!("{other:?}"),
        };
        // Off by default, and then no data dir.
        let d = docker(&parse("pubrun.toml", POOLS).unwrap());
        assert!(!d.docker_socket);
        assert_eq!(d.machine_data_dir, "");
        // On: the default data dir, or the one given (trailing '/' dropped).
        let d = docker(&parse("pubrun.toml", &pools_with(13, "docker_socket = true")).unwrap());
        assert!(d.docker_socket);
        assert_eq!(d.machine_data_dir, DEFAULT_MACHINE_DATA_DIR);
        let src = pools_with(
            13,
            "docker_socket = true\nmachine_data_dir = \"/srv/pubrun/\"",
        );
        assert_eq!(
            docker(&parse("pubrun.toml", &src).unwrap()).machine_data_dir,
            "/srv/pubrun"
        );
        // A relative or bind-breaking path, or a data dir without the socket.
        for bad in ["\"srv\"", "\"/a:b\""] {
            let e = err(&pools_with(
                13,
                &format!("docker_socket = true\nmachine_data_dir = {bad}"),
            ));
            assert_eq!(e.line, 14, "{e}");
            assert!(e.message.contains("absolute path"), "{e}");
        }
        let e = err(&pools_with(13, "machine_data_dir = \"/srv\""));
        assert!(e.message.contains("only used with docker_socket"), "{e}");
        // Docker keys only.
        let e = err(&POOLS.replace(
            "access_token_env = \"GCE_TOKEN\"\n",
            "access_token_env = \"GCE_TOKEN\"\ndocker_socket = true\n",
        ));
        assert!(
            e.message
                .contains("`docker_socket` does not apply to provider \"gce\""),
            "{e}"
        );
    }

    /// `src` with `line` (1-based) of POOLS replaced.
    fn pools_with(line: usize, text: &str) -> String {
        let mut lines: Vec<&str> = POOLS.lines().collect();
        lines[line - 1] = text;
        lines.join("\n")
    }

    #[test]
    fn bad_pools_point_at_the_key_or_value() {
        // Line 10 is `max_machines = 2` of the docker pool.
        let cases: &[(usize, &str, (usize, usize), &str)] = &[
            (
                10,
                "project = \"p\"",
                (10, 1),
                "`project` does not apply to provider \"docker\"",
            ),
            (10, "max_machines = 0", (10, 16), "at least 1"),
            (9, "min_machines = 3", (10, 16), "above max_machines (2)"),
            (10, "colour = 1", (10, 1), "colour"),
            (10, "when_idle = \"sleep\"", (10, 13), "when_idle"),
            (11, "runs_per_machine = 0", (11, 20), "1 to 1000"),
            (12, "idle_timeout = \"soon\"", (12, 16), "idle_timeout"),
            (10, "lease_timeout = \"1s\"", (10, 17), "between 5s and 1h"),
            (13, "price_per_hour = -1.0", (13, 18), "≥ 0"),
            (
                10,
                "token_env = \"my token\"",
                (10, 13),
                "environment variable",
            ),
            (14, "memory = \"lots\"", (14, 10), "not a size"),
            (15, "cpus = 0", (15, 8), "above 0"),
            (
                7,
                "docker_host = \"/var/run/docker.sock\"",
                (7, 15),
                "scheme",
            ),
            (8, "# no server_url", (6, 12), "needs server_url"),
            (8, "server_url = \"host:8085\"", (8, 14), "http://"),
            (6, "provider = \"kubernetes\"", (6, 12), "one of"),
            (5, "name = \"gpu\"", (18, 8), "declared twice"),
            (5, "name = \"local\"", (6, 12), "can only be \"local\""),
            (5, "name = \"b~g\"", (5, 8), "container names"),
            (21, "# no zone", (19, 12), "needs zone"),
            (
                21,
                "image = \"x\"",
                (21, 1),
                "`image` does not apply to provider \"gce\"",
            ),
            (18, "name = \"GPU\"", (18, 8), "instance names"),
            (28, "name = \"l\"", (28, 8), "between 3 and 255"),
            (30, "runs_per_machine = 4", (30, 1), "--slots"),
            (
                30,
                "idle_timeout = \"1m\"",
                (30, 1),
                "does not apply to provider \"agents\"",
            ),
        ];
        for (line, text, at, msg) in cases {
            let e = err(&pools_with(*line, text));
            assert_eq!((e.line, e.column), *at, "{text}: {e}");
            assert!(e.message.contains(msg), "{text}: {e}");
        }
        // Above the default max (1): the error points at min_machines.
        let e = err(&pools_with(10, "min_machines = 3").replacen("min_machines = 0\n", "", 1));
        assert_eq!((e.line, e.column), (9, 16), "{e}");
        assert!(e.message.contains("max_machines (1, the default)"), "{e}");
        // Keys inside a provider-less pool: only price_per_hour.
        let e = err("[[pool]]\nname = \"local\"\nprovider = \"local\"\n  max_machines = 3\n");
        assert_eq!((e.line, e.column), (4, 3), "{e}");
        let e = err("[[pool]]\nname = \"cpu\"\nprovider = \"local\"\n");
        assert!(
            e.message.contains("belongs to the pool named \"local\""),
            "{e}"
        );
    }

    #[test]
    fn syntax_error_has_position() {
        let e = err("project = \"demo\"\n[[topic]\nname = 1\n");
        assert_eq!(e.line, 2, "{e}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("512m"), Some(512 << 20));
        assert_eq!(parse_bytes("1GiB"), Some(1 << 30));
        assert_eq!(parse_bytes("100"), Some(100));
        assert_eq!(parse_bytes("lots"), None);
    }
}

#[cfg(test)]
mod readme {
    /// The manifest shown in README.md must stay valid.
    #[test]
    fn readme_manifest_parses() {
        let readme = include_str!("../../../README.md");
        let start = readme.find("```toml\n").expect("README has a toml block") + 8;
        let end = start + readme[start..].find("```").unwrap();
        let m = super::parse("README.md", &readme[start..end]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(m.jobs.len(), 2);
    }

    /// So does the `[[pool]]` example of its Pools section.
    #[test]
    fn readme_pools_parse() {
        let readme = include_str!("../../../README.md");
        let section = &readme[readme.find("## Pools").expect("README has a Pools section")..];
        let start = section.find("```\n").unwrap() + 4;
        let end = start + section[start..].find("```").unwrap();
        let m = super::parse("README.md", &section[start..end]).unwrap_or_else(|e| panic!("{e}"));
        let kinds: Vec<&str> = m.pools.iter().map(|p| p.provider.kind()).collect();
        assert_eq!(kinds, ["docker", "gce", "agents"]);
    }
}
