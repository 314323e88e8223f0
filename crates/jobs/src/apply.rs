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

use pubrun_broker::{Broker, ListRequest, SubscriptionUpdate, TopicUpdate};
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
        for t in legacy.topics {
            if let Some(p) = project_of(&t) {
                out.projects
                    .entry(p.to_string())
                    .or_default()
                    .topics
                    .insert(t);
            }
        }
        for s in legacy.subscriptions {
            if let Some(p) = project_of(&s) {
                out.projects
                    .entry(p.to_string())
                    .or_default()
                    .subscriptions
                    .insert(s);
            }
        }
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
    let mut out = Vec::new();
    let want_topics: BTreeSet<&str> = desired.topics.iter().map(|t| t.name.as_str()).collect();
    for t in &desired.topics {
        let action = match current.topics.iter().find(|c| c.name == t.name) {
            None => Action::Create,
            Some(c) if c.labels != t.labels => Action::Update,
            Some(_) => Action::Unchanged,
        };
        out.push(Change {
            kind: "topic",
            name: t.name.clone(),
            action,
        });
    }
    for s in &desired.subscriptions {
        let action = match current.subscriptions.iter().find(|c| c.name == s.name) {
            None => Action::Create,
            Some(c) if c.topic != s.topic => Action::Replace,
            Some(c) if c.ack_deadline_seconds != s.ack_deadline_seconds || c.labels != s.labels => {
                Action::Update
            }
            Some(_) => Action::Unchanged,
        };
        out.push(Change {
            kind: "subscription",
            name: s.name.clone(),
            action,
        });
    }
    for j in &desired.jobs {
        let action = match current.jobs.iter().find(|c| c.name == j.name) {
            None => Action::Create,
            Some(c) if c != j => Action::Update,
            Some(_) => Action::Unchanged,
        };
        out.push(Change {
            kind: "job",
            name: j.name.clone(),
            action,
        });
    }
    // Deletions: jobs exist only through manifests, so every job of the
    // project not declared goes; topics and subscriptions only if the last
    // apply declared them.
    for j in &current.jobs {
        if !desired.jobs.iter().any(|d| d.name == j.name) {
            out.push(Change {
                kind: "job",
                name: j.name.clone(),
                action: Action::Delete,
            });
        }
    }
    let want_subs: BTreeSet<&str> = desired
        .subscriptions
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    for s in &applied.subscriptions {
        if !want_subs.contains(s.as_str()) && current.subscriptions.iter().any(|c| &c.name == s) {
            out.push(Change {
                kind: "subscription",
                name: s.clone(),
                action: Action::Delete,
            });
        }
    }
    for t in &applied.topics {
        if !want_topics.contains(t.as_str()) && current.topics.iter().any(|c| &c.name == t) {
            out.push(Change {
                kind: "topic",
                name: t.clone(),
                action: Action::Delete,
            });
        }
    }
    out
}

async fn current(broker: &Broker, jobs: Vec<JobSpec>, project: &ProjectName) -> Result<Current> {
    let mut cur = Current {
        jobs,
        ..Default::default()
    };
    let mut token = String::new();
    loop {
        let p = broker.list_topics(ListRequest::new(project, 1000, &token))?;
        cur.topics.extend(p.items);
        if p.next_page_token.is_empty() {
            break;
        }
        token = p.next_page_token;
    }
    let mut token = String::new();
    loop {
        let p = broker.list_subscriptions(ListRequest::new(project, 1000, &token))?;
        cur.subscriptions.extend(p.items);
        if p.next_page_token.is_empty() {
            break;
        }
        token = p.next_page_token;
    }
    Ok(cur)
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
    for c in changes
        .iter()
        .filter(|c| c.kind == "topic" && c.action != Action::Delete)
    {
        let t = desired
            .topics
            .iter()
            .find(|t| t.name == c.name)
            .expect("planned from desired");
        match c.action {
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
    for c in changes
        .iter()
        .filter(|c| c.kind == "subscription" && c.action != Action::Delete)
    {
        let s = desired
            .subscriptions
            .iter()
            .find(|s| s.name == c.name)
            .expect("planned from desired");
        let name = SubscriptionName::parse(&s.name)?;
        match c.action {
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
    for c in changes.iter().filter(|c| c.kind == "job") {
        match c.action {
            Action::Create | Action::Update | Action::Replace => {
                let j = desired
                    .jobs
                    .iter()
                    .find(|j| j.name == c.name)
                    .expect("planned from desired");
                dispatcher.put_job(j.clone()).await?;
            }
            Action::Delete => dispatcher.delete_job(&c.name).await?,
            Action::Unchanged => {}
        }
    }
    for c in changes.iter().filter(|c| c.action == Action::Delete) {
        match c.kind {
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
        let cur = Current {
            topics: m.topics.clone(),
            subscriptions: m.subscriptions.clone(),
            jobs: m.jobs.clone(),
        };
        let again = plan(&cur, &Applied::default(), &m);
        assert!(
            again.iter().all(|c| c.action == Action::Unchanged),
            "{again:?}"
        );
    }

    #[test]
    fn changes_and_deletions() {
        let m = manifest(BASE);
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
