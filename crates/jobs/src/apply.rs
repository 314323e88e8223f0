//! `pubrun apply`: diff a manifest against the server, then change it.
//!
//! The plan is computed by a pure function ([`plan`]) from what exists, what
//! the last apply declared and what the manifest declares; [`apply`] then
//! carries it out through the broker and the dispatcher — the same path
//! `pubrun serve --config` takes at boot. [`apply_manifest`] applies a whole
//! manifest (this plus buckets, pools, schedules and webhooks), one apply at
//! a time; the API and `serve --config` call it, so the transport crate
//! holds no apply logic.
//!
//! # Ownership
//!
//! A manifest owns the resources of its `project`, nothing else: [`Ownership`]
//! records, per project, what that project's last apply declared. Applying a
//! manifest deletes only what its own project declared before and declares no
//! more; another project's jobs (and topics, subscriptions, pools) are never
//! touched. Job and pool names are server-wide, so a name another project
//! owns is refused (FAILED_PRECONDITION) before anything changes.

mod manifest;

pub use manifest::apply_manifest;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use pubrun_broker::{Broker, ListRequest, Page, SubscriptionUpdate, TopicUpdate};
use pubrun_core::job::JobSpec;
use pubrun_core::manifest::Manifest;
use pubrun_core::{
    Code, Error, ProjectName, Result, SubscriptionConfig, SubscriptionName, TopicConfig, TopicName,
};
use serde::{Deserialize, Serialize};

use crate::{Dispatcher, RunStoreEngine};

/// What applying a manifest does to one resource. Crosses the wire as its
/// lower-case name (`"create"`, …); the CLI reads it back with [`Action::parse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Create,
    Update,
    /// Delete and create (a change that cannot be made in place).
    Replace,
    Delete,
    Unchanged,
}

impl Action {
    /// Every action, in the order a plan's summary lists them.
    pub const ALL: [Action; 5] = [
        Action::Create,
        Action::Update,
        Action::Replace,
        Action::Delete,
        Action::Unchanged,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Update => "update",
            Action::Replace => "replace",
            Action::Delete => "delete",
            Action::Unchanged => "unchanged",
        }
    }

    /// `None` for a name this build does not know (a newer server's).
    pub fn parse(s: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.as_str() == s)
    }

    /// The plan line's marker: `+ create`, `-/+ replace`, …
    pub fn sign(self) -> &'static str {
        match self {
            Action::Create => "+",
            Action::Update => "~",
            Action::Replace => "-/+",
            Action::Delete => "-",
            Action::Unchanged => "=",
        }
    }

    /// The summary's past tense once applied (`created`, …).
    pub fn done(self) -> &'static str {
        match self {
            Action::Create => "created",
            Action::Update => "updated",
            Action::Replace => "replaced",
            Action::Delete => "deleted",
            Action::Unchanged => "unchanged",
        }
    }

    /// Whether the change removes something that exists.
    pub fn is_destructive(self) -> bool {
        matches!(self, Action::Delete | Action::Replace)
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    pub kind: &'static str,
    pub name: String,
    pub action: Action,
}

/// What the server has now, as far as a manifest is concerned.
#[derive(Debug, Default, Clone)]
pub struct Current {
    pub topics: Vec<TopicConfig>,
    pub subscriptions: Vec<SubscriptionConfig>,
    pub jobs: Vec<JobSpec>,
}

/// Names one project's previous apply declared: only these are deleted when
/// they disappear from the manifest, so resources made through the API (and
/// other projects' resources) survive.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Applied {
    #[serde(default)]
    pub topics: BTreeSet<String>,
    #[serde(default)]
    pub subscriptions: BTreeSet<String>,
    #[serde(default)]
    pub jobs: BTreeSet<String>,
    #[serde(default)]
    pub pools: BTreeSet<String>,
}

/// What every project's last apply declared, by project id. Kept in the run
/// store's meta table (`runs.db`), written after each apply.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ownership {
    pub projects: BTreeMap<String, Applied>,
}

const OWNERSHIP_KEY: &str = "applied_by_project";
/// Before projects owned their resources: one record for whatever manifest
/// was applied last (topics and subscriptions only).
const LEGACY_APPLIED_KEY: &str = "applied_manifest";

/// `P` of `projects/P/...`.
fn project_of(name: &str) -> Option<&str> {
    name.strip_prefix("projects/")?.split('/').next()
}

impl Ownership {
    pub async fn load(store: &dyn RunStoreEngine) -> Result<Self> {
        if let Some(s) = store.meta(OWNERSHIP_KEY).await? {
            return serde_json::from_str(&s)
                .map_err(|e| Error::internal(format!("runs.db: stored apply record: {e}")));
        }
        // The legacy record's names carry their project.
        let mut out = Ownership::default();
        let legacy: Applied = store
            .meta(LEGACY_APPLIED_KEY)
            .await?
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default();
        let mut file = |names: BTreeSet<String>,
                        kind: fn(&mut Applied) -> &mut BTreeSet<String>| {
            for name in names {
                if let Some(p) = project_of(&name) {
                    kind(out.projects.entry(p.to_string()).or_default()).insert(name);
                }
            }
        };
        file(legacy.topics, |a| &mut a.topics);
        file(legacy.subscriptions, |a| &mut a.subscriptions);
        Ok(out)
    }

    pub async fn save(&self, store: &dyn RunStoreEngine) -> Result<()> {
        let json = serde_json::to_string(self)
            .map_err(|e| Error::internal(format!("apply record as JSON: {e}")))?;
        store.set_meta(OWNERSHIP_KEY, &json).await
    }

    /// What `project`'s last apply declared.
    pub fn project(&self, project: &str) -> Applied {
        self.projects.get(project).cloned().unwrap_or_default()
    }

    /// The project owning job `spec`: the one whose last apply declared it.
    /// A job no record names (applied by a pubrun before projects owned
    /// jobs, or a crash between creating it and recording it) belongs to its
    /// topic's project, where its subscription lives.
    pub fn job_owner<'a>(&'a self, spec: &'a JobSpec) -> &'a str {
        self.projects
            .iter()
            .find(|(_, a)| a.jobs.contains(&spec.name))
            .map(|(p, _)| p.as_str())
            .or_else(|| project_of(&spec.topic))
            .unwrap_or_default()
    }

    /// The project owning pool `name`, if a record names it (pools applied
    /// before projects owned pools have none).
    pub fn pool_owner(&self, name: &str) -> Option<&str> {
        self.projects
            .iter()
            .find(|(_, a)| a.pools.contains(name))
            .map(|(p, _)| p.as_str())
    }

    /// Records `applied` as `project`'s, and takes its job and pool names out
    /// of every other project's record (they are `project`'s now).
    pub fn set_project(&mut self, project: &str, applied: Applied) {
        for (p, a) in self.projects.iter_mut() {
            if p != project {
                a.jobs.retain(|j| !applied.jobs.contains(j));
                a.pools.retain(|j| !applied.pools.contains(j));
            }
        }
        self.projects.insert(project.to_string(), applied);
    }
}

/// Refuses a manifest that declares a job another project owns (job names
/// are server-wide).
pub fn check_job_owners(ownership: &Ownership, jobs: &[JobSpec], desired: &Manifest) -> Result<()> {
    for j in &desired.jobs {
        if let Some(have) = jobs.iter().find(|c| c.name == j.name) {
            let owner = ownership.job_owner(have);
            if owner != desired.project {
                return Err(Error::precondition(format!(
                    "job \"{}\" belongs to project \"{owner}\" (declared by its manifest); job names are server-wide: rename it, or remove it from project \"{owner}\"'s manifest first",
                    j.name
                )));
            }
        }
    }
    Ok(())
}

/// The changes that turn `current` into `desired`. Pure. `current` holds
/// the desired project's resources only (its topics, subscriptions and the
/// jobs it owns), `applied` what that project's last apply declared.
pub fn plan(current: &Current, applied: &Applied, desired: &Manifest) -> Vec<Change> {
    let topic: fn(&TopicConfig) -> &str = |t| &t.name;
    let subscription: fn(&SubscriptionConfig) -> &str = |s| &s.name;
    let job: fn(&JobSpec) -> &str = |j| &j.name;
    let mut out = upserts("topic", &current.topics, &desired.topics, topic, |c, t| {
        if c.labels != t.labels {
            Action::Update
        } else {
            Action::Unchanged
        }
    });
    out.extend(upserts(
        "subscription",
        &current.subscriptions,
        &desired.subscriptions,
        subscription,
        |c, s| {
            if c.topic != s.topic {
                Action::Replace
            } else if c.ack_deadline_seconds != s.ack_deadline_seconds || c.labels != s.labels {
                Action::Update
            } else {
                Action::Unchanged
            }
        },
    ));
    out.extend(upserts("job", &current.jobs, &desired.jobs, job, changed));
    // Deletions: jobs exist only through manifests, so every job of the
    // project not declared goes; topics and subscriptions only if the last
    // apply declared them (and they still exist).
    out.extend(deletions(
        "job",
        current.jobs.iter().map(job),
        &desired.jobs.iter().map(job).collect(),
    ));
    out.extend(deletions(
        "subscription",
        still_there(&applied.subscriptions, &current.subscriptions, subscription),
        &desired.subscriptions.iter().map(subscription).collect(),
    ));
    out.extend(deletions(
        "topic",
        still_there(&applied.topics, &current.topics, topic),
        &desired.topics.iter().map(topic).collect(),
    ));
    out
}

/// The names of `applied` that `current` still holds, in order.
fn still_there<'a, T>(
    applied: &'a BTreeSet<String>,
    current: &[T],
    name: fn(&T) -> &str,
) -> Vec<&'a str> {
    applied
        .iter()
        .map(String::as_str)
        .filter(|n| current.iter().any(|c| name(c) == *n))
        .collect()
}

/// The comparison of things replaced whole: any difference is an update.
pub(crate) fn changed<T: PartialEq>(have: &T, want: &T) -> Action {
    if have != want {
        Action::Update
    } else {
        Action::Unchanged
    }
}

/// One change per item of `desired`, in order: `Create` when `current` has
/// none of its name, else what `compare(current, desired)` says.
pub(crate) fn upserts<T>(
    kind: &'static str,
    current: &[T],
    desired: &[T],
    name: impl Fn(&T) -> &str,
    compare: impl Fn(&T, &T) -> Action,
) -> Vec<Change> {
    desired
        .iter()
        .map(|want| {
            let action = match current.iter().find(|have| name(have) == name(want)) {
                None => Action::Create,
                Some(have) => compare(have, want),
            };
            Change {
                kind,
                name: name(want).to_string(),
                action,
            }
        })
        .collect()
}

/// A `Delete` for each of `names` that `declared` no longer holds, in order.
pub(crate) fn deletions<'a>(
    kind: &'static str,
    names: impl IntoIterator<Item = &'a str>,
    declared: &BTreeSet<&str>,
) -> Vec<Change> {
    names
        .into_iter()
        .filter(|n| !declared.contains(n))
        .map(|n| Change {
            kind,
            name: n.to_string(),
            action: Action::Delete,
        })
        .collect()
}

async fn current(broker: &Broker, jobs: Vec<JobSpec>, project: &ProjectName) -> Result<Current> {
    Ok(Current {
        topics: every_page(|token| broker.list_topics(ListRequest::new(project, 1000, token)))?,
        subscriptions: every_page(|token| {
            broker.list_subscriptions(ListRequest::new(project, 1000, token))
        })?,
        jobs,
    })
}

/// The items of every page of a List call, `list` given each page token.
fn every_page<T>(mut list: impl FnMut(&str) -> Result<Page<T>>) -> Result<Vec<T>> {
    let mut items = Vec::new();
    let mut token = String::new();
    loop {
        let p = list(&token)?;
        items.extend(p.items);
        if p.next_page_token.is_empty() {
            return Ok(items);
        }
        token = p.next_page_token;
    }
}

/// Plans and, unless `dry_run`, applies a manifest. Order: topics, then
/// subscriptions and jobs (which need topics), then deletions in reverse.
pub async fn apply(
    broker: &Arc<Broker>,
    dispatcher: &Arc<Dispatcher>,
    desired: &Manifest,
    dry_run: bool,
) -> Result<Vec<Change>> {
    let project = ProjectName::from_id(&desired.project)?;
    let mut ownership = Ownership::load(&**dispatcher.store()).await?;
    let all_jobs = dispatcher.jobs();
    check_job_owners(&ownership, &all_jobs, desired)?;
    let own_jobs = all_jobs
        .into_iter()
        .filter(|j| ownership.job_owner(j) == desired.project)
        .collect();
    let cur = current(broker, own_jobs, &project).await?;
    let applied = ownership.project(&desired.project);
    let changes = plan(&cur, &applied, desired);
    if dry_run {
        return Ok(changes);
    }
    for (action, t) in declared(&changes, "topic", &desired.topics, |t| &t.name) {
        match action {
            Action::Create => ignore_exists(broker.create_topic(t.clone()).await.map(|_| ()))?,
            Action::Update => {
                broker
                    .update_topic(
                        &TopicName::parse(&t.name)?,
                        TopicUpdate {
                            labels: Some(t.labels.clone()),
                        },
                    )
                    .await?;
            }
            _ => {}
        }
    }
    for (action, s) in declared(&changes, "subscription", &desired.subscriptions, |s| {
        &s.name
    }) {
        let name = SubscriptionName::parse(&s.name)?;
        match action {
            Action::Create => {
                ignore_exists(broker.create_subscription(s.clone()).await.map(|_| ()))?
            }
            Action::Replace => {
                broker.delete_subscription(&name).await?;
                broker.create_subscription(s.clone()).await?;
            }
            Action::Update => {
                let update = SubscriptionUpdate {
                    ack_deadline_seconds: Some(s.ack_deadline_seconds),
                    labels: Some(s.labels.clone()),
                };
                broker.update_subscription(&name, update).await?;
            }
            _ => {}
        }
    }
    for (action, j) in declared(&changes, "job", &desired.jobs, |j| &j.name) {
        if action != Action::Unchanged {
            dispatcher.put_job(j.clone()).await?;
        }
    }
    // Deletions last, in plan order: jobs, then subscriptions, then topics.
    for c in changes.iter().filter(|c| c.action == Action::Delete) {
        match c.kind {
            "job" => dispatcher.delete_job(&c.name).await?,
            "subscription" => ignore_missing(
                broker
                    .delete_subscription(&SubscriptionName::parse(&c.name)?)
                    .await,
            )?,
            "topic" => ignore_missing(broker.delete_topic(&TopicName::parse(&c.name)?).await)?,
            _ => {}
        }
    }
    let now_applied = Applied {
        topics: desired.topics.iter().map(|t| t.name.clone()).collect(),
        subscriptions: desired
            .subscriptions
            .iter()
            .map(|s| s.name.clone())
            .collect(),
        jobs: desired.jobs.iter().map(|j| j.name.clone()).collect(),
        // Pools are applied by the caller (pubrun-api), which records them.
        pools: applied.pools,
    };
    ownership.set_project(&desired.project, now_applied);
    ownership.save(&**dispatcher.store()).await?;
    Ok(changes)
}

/// The planned changes of `kind` other than deletions, each with the item
/// of `desired` it was planned from.
fn declared<'a, T>(
    changes: &'a [Change],
    kind: &'static str,
    desired: &'a [T],
    name: impl Fn(&T) -> &String + 'a,
) -> impl Iterator<Item = (Action, &'a T)> + 'a {
    changes
        .iter()
        .filter(move |c| c.kind == kind && c.action != Action::Delete)
        .map(move |c| {
            let item = desired
                .iter()
                .find(|d| *name(d) == c.name)
                .expect("planned from desired");
            (c.action, item)
        })
}

fn ignore_exists(r: Result<()>) -> Result<()> {
    match r {
        Err(e) if e.code == Code::AlreadyExists => Ok(()),
        other => other,
    }
}

fn ignore_missing(r: Result<()>) -> Result<()> {
    match r {
        Err(e) if e.code == Code::NotFound => Ok(()),
        other => other,
    }
}

/// Parses manifest text, mapping its error to INVALID_ARGUMENT with location.
pub fn parse_manifest(file: &str, text: &str) -> Result<Manifest> {
    pubrun_core::manifest::parse(file, text).map_err(|e| Error::invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn action_crosses_the_wire_as_its_name() {
        for a in Action::ALL {
            let json = serde_json::to_string(&a).unwrap();
            assert_eq!(json, format!("\"{}\"", a.as_str()));
            assert_eq!(serde_json::from_str::<Action>(&json).unwrap(), a);
            assert_eq!(Action::parse(a.as_str()), Some(a));
            assert_eq!(a.to_string(), a.as_str());
        }
        assert_eq!(Action::parse("rename"), None);
        let c = Change {
            kind: "topic",
            name: "projects/p/topics/t".into(),
            action: Action::Replace,
        };
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            r#"{"kind":"topic","name":"projects/p/topics/t","action":"replace"}"#
        );
    }

    fn manifest(src: &str) -> Manifest {
        pubrun_core::manifest::parse("t.toml", src).unwrap()
    }

    /// The server and the apply record right after `m` was applied.
    fn applied(m: &Manifest) -> (Current, Applied) {
        let cur = Current {
            topics: m.topics.clone(),
            subscriptions: m.subscriptions.clone(),
            jobs: m.jobs.clone(),
        };
        let applied = Applied {
            topics: m.topics.iter().map(|t| t.name.clone()).collect(),
            subscriptions: m.subscriptions.iter().map(|s| s.name.clone()).collect(),
            ..Default::default()
        };
        (cur, applied)
    }

    const BASE: &str = r#"
project = "p"
[[topic]]
name = "in-topic"
[[subscription]]
name = "watch"
topic = "in-topic"
[[job]]
name = "echo-job"
topic = "in-topic"
process = { command = "echo" }
"#;

    #[test]
    fn first_apply_creates_everything_second_changes_nothing() {
        let m = manifest(BASE);
        let changes = plan(&Current::default(), &Applied::default(), &m);
        assert!(
            changes.iter().all(|c| c.action == Action::Create),
            "{changes:?}"
        );
        assert_eq!(changes.len(), 3);
        let (cur, _) = applied(&m);
        let again = plan(&cur, &Applied::default(), &m);
        assert!(
            again.iter().all(|c| c.action == Action::Unchanged),
            "{again:?}"
        );
    }

    #[test]
    fn changes_and_deletions() {
        let m = manifest(BASE);
        let (cur, applied) = applied(&m);
        let changed = manifest(
            &BASE
                .replace("command = \"echo\"", "command = \"true\"")
                .replace(
                    "[[subscription]]\nname = \"watch\"\ntopic = \"in-topic\"\n",
                    "",
                ),
        );
        let changes = plan(&cur, &applied, &changed);
        assert!(changes.contains(&Change {
            kind: "job",
            name: "echo-job".into(),
            action: Action::Update
        }));
        assert!(changes.contains(&Change {
            kind: "subscription",
            name: "projects/p/subscriptions/watch".into(),
            action: Action::Delete
        }));
        // A subscription the manifest never declared is left alone.
        let mut cur2 = cur.clone();
        cur2.subscriptions.push(SubscriptionConfig {
            name: "projects/p/subscriptions/by-hand".into(),
            topic: "projects/p/topics/in-topic".into(),
            labels: Default::default(),
            ack_deadline_seconds: 10,
            ..Default::default()
        });
        let changes = plan(&cur2, &applied, &changed);
        assert!(!changes.iter().any(|c| c.name.ends_with("by-hand")));
    }

    #[test]
    fn plan_order_is_upserts_by_kind_then_deletions_jobs_first() {
        let m = manifest(BASE);
        let kinds = |changes: &[Change]| {
            changes
                .iter()
                .map(|c| (c.kind, c.action))
                .collect::<Vec<_>>()
        };
        let created = plan(&Current::default(), &Applied::default(), &m);
        assert_eq!(
            kinds(&created),
            [
                ("topic", Action::Create),
                ("subscription", Action::Create),
                ("job", Action::Create)
            ]
        );
        let (cur, applied) = applied(&m);
        let gone = plan(&cur, &applied, &manifest("project = \"p\"\n"));
        assert_eq!(
            kinds(&gone),
            [
                ("job", Action::Delete),
                ("subscription", Action::Delete),
                ("topic", Action::Delete)
            ]
        );
    }

    #[tokio::test]
    async fn a_legacy_apply_record_is_split_by_project() {
        let dir = tempfile::tempdir().unwrap();
        let store = pubrun_store::runs::SqliteRunStore::open(&dir.path().join("runs.db")).unwrap();
        let legacy = r#"{"topics":["projects/a/topics/t","projects/b/topics/u","odd"],"subscriptions":["projects/b/subscriptions/s"]}"#;
        store.set_meta(LEGACY_APPLIED_KEY, legacy).await.unwrap();
        let own = Ownership::load(&store).await.unwrap();
        assert_eq!(own.projects.len(), 2, "{own:?}");
        let a = own.project("a");
        assert_eq!(a.topics, ["projects/a/topics/t".to_string()].into());
        assert!(a.subscriptions.is_empty());
        let b = own.project("b");
        assert_eq!(b.topics, ["projects/b/topics/u".to_string()].into());
        assert_eq!(
            b.subscriptions,
            ["projects/b/subscriptions/s".to_string()].into()
        );
    }

    #[test]
    fn job_owner_is_the_recording_project_else_the_topic_project() {
        let m = manifest(BASE);
        let job = &m.jobs[0];
        let mut own = Ownership::default();
        assert_eq!(own.job_owner(job), "p", "unrecorded: its topic's project");
        own.set_project(
            "other",
            Applied {
                jobs: [job.name.clone()].into(),
                pools: ["gpu".to_string()].into(),
                ..Default::default()
            },
        );
        assert_eq!(own.job_owner(job), "other");
        assert_eq!(own.pool_owner("gpu"), Some("other"));
        let mut theirs = manifest(&BASE.replace("project = \"p\"", "project = \"q\""));
        let e = check_job_owners(&own, &m.jobs, &theirs).unwrap_err();
        assert_eq!(e.code, Code::FailedPrecondition);
        assert!(e.message.contains("\"other\""), "{}", e.message);
        // Taking a name over moves it out of the other record.
        theirs.project = "other".into();
        check_job_owners(&own, &m.jobs, &theirs).unwrap();
        own.set_project(
            "q",
            Applied {
                pools: ["gpu".to_string()].into(),
                ..Default::default()
            },
        );
        assert_eq!(own.pool_owner("gpu"), Some("q"));
        assert_eq!(own.job_owner(job), "other");
    }
}
