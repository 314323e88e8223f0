//! `pubrun apply`: diff a manifest against the server, then change it.
//!
//! The plan is computed by a pure function ([`plan`]) from what exists, what
//! the last apply declared and what the manifest declares; [`apply`] then
//! carries it out through the broker and the dispatcher — the same path
//! `pubrun serve --config` takes at boot.

use std::collections::BTreeSet;
use std::sync::Arc;

use pubrun_broker::{Broker, SubscriptionUpdate, TopicUpdate};
use pubrun_core::job::JobSpec;
use pubrun_core::manifest::Manifest;
use pubrun_core::{
    Code, Error, ProjectName, Result, SubscriptionConfig, SubscriptionName, TopicConfig, TopicName,
};
use serde::{Deserialize, Serialize};

use crate::Dispatcher;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Create,
    Update,
    /// Delete and create (a change that cannot be made in place).
    Replace,
    Delete,
    Unchanged,
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

/// Names the previous apply declared: only these are deleted when they
/// disappear from the manifest, so resources made through the API survive.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Applied {
    pub topics: BTreeSet<String>,
    pub subscriptions: BTreeSet<String>,
}

const APPLIED_KEY: &str = "applied_manifest";

/// The changes that turn `current` into `desired`. Pure.
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
    // Deletions: jobs exist only through manifests, so every job not declared
    // goes; topics and subscriptions only if the last apply declared them.
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

async fn current(
    broker: &Broker,
    dispatcher: &Dispatcher,
    project: &ProjectName,
) -> Result<Current> {
    let mut cur = Current {
        jobs: dispatcher.jobs(),
        ..Default::default()
    };
    let mut token = String::new();
    loop {
        let p = broker.list_topics(project, 1000, &token)?;
        cur.topics.extend(p.items);
        if p.next_page_token.is_empty() {
            break;
        }
        token = p.next_page_token;
    }
    let mut token = String::new();
    loop {
        let p = broker.list_subscriptions(project, 1000, &token)?;
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
    let cur = current(broker, dispatcher, &project).await?;
    let applied: Applied = dispatcher
        .store()
        .meta(APPLIED_KEY)?
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
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
    };
    dispatcher
        .store()
        .set_meta(APPLIED_KEY, &serde_json::to_string(&now_applied).unwrap())?;
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
}
