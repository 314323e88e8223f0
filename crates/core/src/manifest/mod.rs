//! `pubrun.toml`: the declarative manifest, parsed in two steps — raw TOML
//! (unknown keys rejected) → validated resources — with every error pointing
//! at `file:line:column`.

use std::collections::BTreeSet;
use std::ops::Range;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::config::{SubscriptionConfig, TopicConfig};
use crate::connection::ConnectionSpec;
use crate::job::JobSpec;
use crate::names::ProjectName;
use crate::pool::PoolSpec;
use crate::trigger::{ScheduleSpec, WebhookSpec};

/// A kind of table whose tables are told apart by their `name` as written.
trait Named {
    const KIND: &'static str;
    fn name(&self) -> &Spanned<String>;
}

/// `named!(RawX => "x")` in a table's module: its tables are `[[x]]`.
macro_rules! named {
    ($raw:ty => $kind:literal) => {
        impl super::Named for $raw {
            const KIND: &'static str = $kind;
            fn name(&self) -> &toml::Spanned<String> {
                &self.name
            }
        }
    };
}

mod bucket;
mod connection;
mod job;
mod pool;
mod schedule;
#[cfg(test)]
mod tests;
mod topic;
mod webhook;

pub use bucket::{BucketDecl, NotificationDecl};

/// Everything a manifest declares, validated and with full resource names.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Manifest {
    pub project: String,
    pub topics: Vec<TopicConfig>,
    pub subscriptions: Vec<SubscriptionConfig>,
    pub jobs: Vec<JobSpec>,
    pub schedules: Vec<ScheduleSpec>,
    pub webhooks: Vec<WebhookSpec>,
    pub buckets: Vec<BucketDecl>,
    /// Declared pools; `local` is implicit and only listed when declared.
    pub pools: Vec<PoolSpec>,
    /// Declared connections (each job on one carries a copy of it).
    pub connections: Vec<ConnectionSpec>,
}

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

/// Every table is optional.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawManifest {
    project: Option<Spanned<String>>,
    topic: Vec<topic::RawTopic>,
    subscription: Vec<topic::RawSubscription>,
    job: Vec<job::RawJob>,
    schedule: Vec<schedule::RawSchedule>,
    webhook: Vec<webhook::RawWebhook>,
    bucket: Vec<bucket::RawBucket>,
    pool: Vec<pool::RawPool>,
    connection: Vec<connection::RawConnection>,
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

/// Rejects a second table of one kind under a name already taken.
struct Unique {
    kind: &'static str,
    seen: BTreeSet<String>,
}

impl Unique {
    fn new(kind: &'static str) -> Self {
        Unique {
            kind,
            seen: BTreeSet::new(),
        }
    }

    /// `key` is the name as compared (full resource name where there is
    /// one); the error quotes the name as written.
    fn insert(
        &mut self,
        cx: &Ctx<'_>,
        written: &Spanned<String>,
        key: String,
    ) -> Result<(), ManifestError> {
        if self.seen.insert(key) {
            return Ok(());
        }
        Err(cx.err(
            written.span(),
            format!("{} \"{}\" is declared twice", self.kind, written.get_ref()),
        ))
    }
}

/// Parses the tables of one kind in order with `parse`; a name declared
/// twice is an error at its second table (checked before that table's own
/// checks).
fn each_named<R: Named, T>(
    cx: &Ctx<'_>,
    raw: &[R],
    mut parse: impl FnMut(&R) -> Result<T, ManifestError>,
) -> Result<Vec<T>, ManifestError> {
    let mut seen = Unique::new(R::KIND);
    raw.iter()
        .map(|r| {
            seen.insert(cx, r.name(), r.name().get_ref().clone())?;
            parse(r)
        })
        .collect()
}

fn is_env_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
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
    let (topics, declared) = topic::parse_topics(&cx, &project, &raw.topic)?;
    let subscriptions = topic::parse_subscriptions(&cx, &declared, &raw.subscription)?;
    let connections = each_named(&cx, &raw.connection, |c| {
        connection::parse_connection(&cx, c)
    })?;
    let pools = each_named(&cx, &raw.pool, |p| pool::parse_pool(&cx, p, &connections))?;
    Ok(Manifest {
        project: project_str,
        jobs: job::parse_jobs(&cx, &declared, &connections, &pools, &raw.job)?,
        buckets: each_named(&cx, &raw.bucket, |b| b.decl(&cx, &declared))?,
        schedules: each_named(&cx, &raw.schedule, |s| s.decl(&cx, &declared, checks))?,
        webhooks: each_named(&cx, &raw.webhook, |w| w.decl(&cx, &declared))?,
        topics,
        subscriptions,
        pools,
        connections,
    })
}
