//! `[[job]]` tables: what runs, on which pool, triggered by which topic.

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::connection::connection_ref;
use super::topic::Topics;
use super::{parse_bytes, Ctx, ManifestError, Unique};
use crate::connection::ConnectionSpec;
use crate::job::{
    check_relative_path, parse_gs_url, DockerSpec, ExecutorSpec, InputSpec, JobSpec, Mount,
    OutputSpec, ProcessSpec, PullPolicy, RegistryAuth, RetryPolicy, SecretRef, UploadOutputs,
    TRIGGER_INPUT,
};
use crate::names::{validate_resource_id, SubscriptionName, TopicName};
use crate::pool::{PoolSpec, LOCAL_POOL};
use crate::template;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawJob {
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

pub(super) fn parse_jobs(
    cx: &Ctx<'_>,
    topics: &Topics<'_>,
    connections: &[ConnectionSpec],
    pools: &[PoolSpec],
    raw: &[RawJob],
) -> Result<Vec<JobSpec>, ManifestError> {
    let mut seen = Unique::new("job");
    let mut out = Vec::new();
    for j in raw {
        validate_resource_id("job", j.name.get_ref())
            .map_err(|e| cx.err(j.name.span(), e.message))?;
        seen.insert(cx, &j.name, j.name.get_ref().clone())?;
        out.push(parse_job(cx, topics, connections, pools, j)?);
    }
    Ok(out)
}

fn parse_job(
    cx: &Ctx<'_>,
    topics: &Topics<'_>,
    connections: &[ConnectionSpec],
    pools: &[PoolSpec],
    j: &RawJob,
) -> Result<JobSpec, ManifestError> {
    let name = j.name.get_ref();
    // A job listens to a local topic, or to a subscription of a
    // connection (full Google names: nothing there is declared here).
    let connection = connection_ref(cx, connections, &j.connection)?;
    let (topic, subscription) = match (&connection, &j.topic, &j.subscription) {
            (None, Some(t), None) => (topics.resolve(cx, t)?.to_string(), String::new()),
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
            for s in std::iter::once(&r.command)
                .chain(&r.args)
                .chain(r.env.values())
            {
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
                    cx.err(
                        d.span(),
                        format!(
                            "docker.memory: \"{s}\" is not a size; write e.g. \"512m\" or \"2g\""
                        ),
                    )
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
                    return Err(cx.err(
                        d.span(),
                        format!("mount target \"{}\" must be an absolute path", mnt.target),
                    ));
                }
            }
            ExecutorSpec::Docker(DockerSpec {
                image: r.image.clone(),
                command: r.command.clone(),
                env: r.env.clone(),
                mounts: r
                    .mounts
                    .iter()
                    .map(|x| Mount {
                        source: x.source.clone(),
                        target: x.target.clone(),
                        read_only: x.read_only,
                    })
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
        (Some(_), Some(d)) => {
            return Err(cx.err(d.span(), "a job has either `process` or `docker`, not both"))
        }
        (None, None) => {
            return Err(cx.err(
                j.name.span(),
                format!(
                "job \"{name}\" needs `process = {{ command = … }}` or `docker = {{ image = … }}`"
            ),
            ))
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
            (Some(t), None) => topics.resolve(cx, t)?.to_string(),
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
            Some(p) if p.get_ref() == LOCAL_POOL || pools.iter().any(|x| &x.name == p.get_ref()) => {
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
    let spec = JobSpec {
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
    };
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
    Ok(spec)
}
