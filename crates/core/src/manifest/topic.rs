//! `[[topic]]` and `[[subscription]]` tables, and the topic references
//! other tables make.

use std::collections::BTreeSet;

use serde::Deserialize;
use toml::Spanned;

use super::{Ctx, ManifestError, Unique};
use crate::config::{
    normalize_ack_deadline, validate_labels, Labels, SubscriptionConfig, TopicConfig,
};
use crate::names::{ProjectName, SubscriptionName, TopicName};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTopic {
    name: Spanned<String>,
    labels: Option<Spanned<Labels>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSubscription {
    name: Spanned<String>,
    topic: Spanned<String>,
    #[serde(default)]
    ack_deadline_seconds: Option<Spanned<i32>>,
    labels: Option<Spanned<Labels>>,
}

/// The topics a manifest declares; every other table names one of them.
pub(super) struct Topics<'a> {
    project: &'a ProjectName,
    declared: BTreeSet<String>,
}

impl Topics<'_> {
    /// Resolves a reference (short id or full name) to a declared topic.
    pub(super) fn resolve(
        &self,
        cx: &Ctx<'_>,
        s: &Spanned<String>,
    ) -> Result<TopicName, ManifestError> {
        let name =
            resolve_topic(self.project, s.get_ref()).map_err(|e| cx.err(s.span(), e.message))?;
        if !self.declared.contains(&name.to_string()) {
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
    }
}

pub(super) fn parse_topics<'a>(
    cx: &Ctx<'_>,
    project: &'a ProjectName,
    raw: &[RawTopic],
) -> Result<(Vec<TopicConfig>, Topics<'a>), ManifestError> {
    let mut seen = Unique::new("topic");
    let mut out = Vec::new();
    for t in raw {
        let name = resolve_topic(project, t.name.get_ref())
            .map_err(|e| cx.err(t.name.span(), e.message))?;
        seen.insert(cx, &t.name, name.to_string())?;
        out.push(TopicConfig {
            name: name.to_string(),
            labels: labels_of(cx, &t.labels)?,
        });
    }
    let declared = out.iter().map(|t| t.name.clone()).collect();
    Ok((out, Topics { project, declared }))
}

pub(super) fn parse_subscriptions(
    cx: &Ctx<'_>,
    topics: &Topics<'_>,
    raw: &[RawSubscription],
) -> Result<Vec<SubscriptionConfig>, ManifestError> {
    let mut seen = Unique::new("subscription");
    let mut out = Vec::new();
    for s in raw {
        let name = SubscriptionName::new(topics.project.clone(), s.name.get_ref())
            .or_else(|_| SubscriptionName::parse(s.name.get_ref()))
            .map_err(|e| cx.err(s.name.span(), e.message))?;
        seen.insert(cx, &s.name, name.to_string())?;
        let topic = topics.resolve(cx, &s.topic)?;
        let ack = match &s.ack_deadline_seconds {
            Some(a) => {
                normalize_ack_deadline(*a.get_ref()).map_err(|e| cx.err(a.span(), e.message))?
            }
            None => normalize_ack_deadline(0).unwrap(),
        };
        out.push(SubscriptionConfig {
            name: name.to_string(),
            topic: topic.to_string(),
            labels: labels_of(cx, &s.labels)?,
            ack_deadline_seconds: ack,
            ..Default::default()
        });
    }
    Ok(out)
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

fn resolve_topic(project: &ProjectName, s: &str) -> crate::Result<TopicName> {
    if s.starts_with("projects/") {
        TopicName::parse(s)
    } else {
        TopicName::new(project.clone(), s)
    }
}
