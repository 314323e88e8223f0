//! `[[pool]]` tables: where jobs run (local, agents, docker, gce).

use std::ops::Range;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::connection::connection_ref;
use super::{is_env_name, parse_bytes, Ctx, ManifestError};
use crate::connection::ConnectionSpec;
use crate::names::validate_resource_id;
use crate::pool::{DockerProviderSpec, GceProviderSpec, PoolSpec, ProviderSpec, LOCAL_POOL};

/// Every key any provider takes; which ones a provider accepts is checked
/// after parsing, so a misplaced key gets a message naming the provider.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPool {
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

/// `[(key, its span if given), ...]` for optional keys of a raw table, each
/// key named once.
macro_rules! key_spans {
    ($raw:expr; $($key:ident),* $(,)?) => {
        [$((stringify!($key), $raw.$key.as_ref().map(|v| v.span()))),*]
    };
}

pub(super) fn parse_pool(
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
    let given: [(&str, Option<Range<usize>>); 34] = key_spans!(
        r;
        min_machines, max_machines, runs_per_machine, idle_timeout, when_idle, price_per_hour,
        token_env, lease_timeout, boot_timeout, server_url, docker_host, image, network, memory,
        cpus, docker_socket, machine_data_dir, project, zone, machine_type, source_image,
        api_base, access_token_env, name_prefix, connection, zones, service_account, scopes,
        subnetwork, external_ip, disk_type, disk_size_gb, accelerators, spot
    );
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
            let connection = connection_ref(cx, connections, &r.connection)?;
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

named!(RawPool => "pool");
