//! Applying a whole manifest: topics, subscriptions and jobs (through
//! [`super::apply`]), then schedules and webhooks (through the triggers
//! crate). Everything that can be checked is checked before anything
//! changes, so a bad schedule never leaves a half-applied manifest.
//! `pubrun apply` and `pubrun serve --config` both come here.
//!
//! A manifest owns the resources of its `project` only (see
//! [`super`]): pools, jobs, schedules and webhooks another
//! project declared are neither planned nor deleted, and a name another
//! project owns is refused. Buckets are global and never deleted by apply.
//! Applies run one at a time (each reads, then writes, the ownership record).

use std::sync::Arc;

use super::{changed, check_job_owners, deletions, upserts, Action, Change, Ownership};
use crate::Dispatcher;
use pubrun_broker::Broker;
use pubrun_core::manifest::Manifest;
use pubrun_core::{Error, Result};
use pubrun_triggers::{ScheduleSpec, Triggers, Validate, WebhookSpec};

/// The manifest's schedules, each validated by the scheduler's rules.
fn schedule_specs(m: &Manifest) -> Result<Vec<ScheduleSpec>> {
    for spec in &m.schedules {
        spec.validate()?;
    }
    Ok(m.schedules.clone())
}

/// The manifest's webhooks, validated and with their secrets set on this
/// server.
fn webhook_specs(m: &Manifest) -> Result<Vec<WebhookSpec>> {
    for spec in &m.webhooks {
        spec.validate()?;
        for var in [&spec.secret_env, &spec.bearer_secret_env]
            .into_iter()
            .flatten()
        {
            if std::env::var(var).map_or(true, |v| v.is_empty()) {
                return Err(Error::precondition(format!(
                    "webhook \"{}\": environment variable {var} is not set for the server; set it or remove the secret",
                    spec.name
                )));
            }
        }
    }
    Ok(m.webhooks.clone())
}

/// Plans the named things in `desired` against `current`: those replaced
/// whole, so any difference is an update, and any not declared goes.
fn plan_named<T: PartialEq>(
    kind: &'static str,
    current: &[(String, T)],
    desired: &[(String, T)],
) -> Vec<Change> {
    let name: fn(&(String, T)) -> &str = |(n, _)| n;
    let mut out = upserts(kind, current, desired, name, |(_, have), (_, want)| {
        changed(have, want)
    });
    out.extend(deletions(
        kind,
        current.iter().map(name),
        &desired.iter().map(name).collect(),
    ));
    out
}

fn gcs(e: pubrun_buckets::GcsError) -> Error {
    match e.status {
        400 => Error::invalid(e.message),
        404 => Error::not_found(e.message),
        409 => Error::already_exists(e.message),
        412 => Error::precondition(e.message),
        _ => Error::unavailable(e.message),
    }
}

/// Buckets are created and notification configs added; apply never deletes
/// a bucket (it holds data) nor a notification made through the API.
async fn apply_buckets(
    b: &pubrun_buckets::Buckets,
    m: &Manifest,
    dry_run: bool,
) -> Result<Vec<Change>> {
    let mut changes = Vec::new();
    for decl in &m.buckets {
        let exists = match b.get_bucket(&decl.name).await {
            Ok(_) => true,
            Err(e) if e.status == 404 => false,
            Err(e) => return Err(gcs(e)),
        };
        changes.push(Change {
            kind: "bucket",
            name: decl.name.clone(),
            action: if exists {
                Action::Unchanged
            } else {
                Action::Create
            },
        });
        if !dry_run && !exists {
            b.ensure_bucket(&decl.name, &m.project).await.map_err(gcs)?;
        }
        let current = if exists || !dry_run {
            b.list_notifications(&decl.name).await.map_err(gcs)?
        } else {
            Vec::new()
        };
        for n in &decl.notifications {
            let same = |c: &pubrun_buckets::NotificationConfig| {
                c.topic == n.topic
                    && c.event_types == n.event_types
                    && c.object_name_prefix == n.object_name_prefix
                    && c.custom_attributes == n.custom_attributes
                    && c.payload_format == n.payload_format
            };
            let name = format!("{} → {}", decl.name, n.topic);
            if current.iter().any(same) {
                changes.push(Change {
                    kind: "notification",
                    name,
                    action: Action::Unchanged,
                });
                continue;
            }
            changes.push(Change {
                kind: "notification",
                name,
                action: Action::Create,
            });
            if !dry_run {
                let spec = pubrun_buckets::NotificationSpec {
                    topic: n.topic.clone(),
                    payload_format: Some(n.payload_format.clone()),
                    event_types: n.event_types.clone(),
                    object_name_prefix: n.object_name_prefix.clone(),
                    custom_attributes: n.custom_attributes.clone(),
                };
                b.create_notification(&decl.name, spec).await.map_err(gcs)?;
            }
        }
    }
    Ok(changes)
}

/// One apply at a time, server-wide.
static APPLYING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn owned_elsewhere(kind: &str, name: &str, owner: &str) -> Error {
    Error::precondition(format!(
        "{kind} \"{name}\" belongs to project \"{owner}\" (declared by its manifest); {kind} names are server-wide: rename it, or remove it from project \"{owner}\"'s manifest first"
    ))
}

/// Refuses names of `desired` that a project other than `project` owns.
fn check_owners<T>(
    kind: &str,
    project: &str,
    owned: &[(String, T)],
    name: impl Fn(&T) -> &str,
    desired: &[(String, T)],
) -> Result<()> {
    for (n, _) in desired {
        if let Some((owner, _)) = owned.iter().find(|(p, s)| name(s) == n && p != project) {
            return Err(owned_elsewhere(kind, n, owner));
        }
    }
    Ok(())
}

/// `project`'s specs among `owned`, by name.
fn own<T: Clone>(
    project: &str,
    owned: &[(String, T)],
    name: impl Fn(&T) -> &str,
) -> Vec<(String, T)> {
    owned
        .iter()
        .filter(|(p, _)| p == project)
        .map(|(_, s)| (name(s).to_string(), s.clone()))
        .collect()
}

/// Applies a manifest (or plans it, with `dry_run`); each change made is
/// logged at info.
pub async fn apply_manifest(
    broker: &Arc<Broker>,
    dispatcher: &Arc<Dispatcher>,
    triggers: Option<&Triggers>,
    buckets: Option<&pubrun_buckets::Buckets>,
    pools: Option<&pubrun_pools::Pools>,
    m: &Manifest,
    dry_run: bool,
) -> Result<Vec<Change>> {
    let result = async {
        let schedules = schedule_specs(m)?;
        let webhooks = webhook_specs(m)?;
        for decl in &m.buckets {
            pubrun_buckets::names::validate_bucket_name(&decl.name).map_err(gcs)?;
        }
        if buckets.is_none() && !m.buckets.is_empty() {
            return Err(Error::precondition("this server does not serve buckets"));
        }
        if triggers.is_none() && (!schedules.is_empty() || !webhooks.is_empty()) {
            return Err(Error::precondition(
                "this server does not run schedules and webhooks",
            ));
        }
        let _one_at_a_time = APPLYING.lock().await;
        let project = m.project.as_str();
        let named_s = |v: Vec<ScheduleSpec>| {
            v.into_iter()
                .map(|s| (s.name.clone(), s))
                .collect::<Vec<_>>()
        };
        let named_w = |v: Vec<WebhookSpec>| {
            v.into_iter()
                .map(|w| (w.name.clone(), w))
                .collect::<Vec<_>>()
        };
        let (schedules, webhooks) = (named_s(schedules), named_w(webhooks));

        // Names another project owns are refused before anything changes.
        let mut ownership = Ownership::load(&**dispatcher.store()).await?;
        check_job_owners(&ownership, &dispatcher.jobs(), m)?;
        for p in &m.pools {
            match ownership.pool_owner(&p.name) {
                Some(owner) if owner != project => {
                    return Err(owned_elsewhere("pool", &p.name, owner))
                }
                _ => {}
            }
        }
        let owned_triggers = match triggers {
            Some(t) => {
                let s = t.scheduler().definitions().await?;
                let w = t.webhook_definitions().await?;
                check_owners("schedule", project, &s, |x| &x.name, &schedules)?;
                check_owners("webhook", project, &w, |x| &x.name, &webhooks)?;
                Some((s, w))
            }
            None => None,
        };

        // Pools before jobs: a job's first run may already need its pool.
        let declared: Vec<_> = m
            .pools
            .iter()
            .filter(|p| p.name != pubrun_core::pool::LOCAL_POOL)
            .map(|p| (p.name.clone(), p.clone()))
            .collect();
        let mut changes = Vec::new();
        match pools {
            Some(p) => {
                // A pool no record names (applied before projects owned pools)
                // is the applying project's, as every pool was then.
                let (theirs, mine): (Vec<_>, Vec<_>) = p
                    .specs()
                    .into_iter()
                    .partition(|s| ownership.pool_owner(&s.name).is_some_and(|o| o != project));
                let current: Vec<_> = mine.into_iter().map(|s| (s.name.clone(), s)).collect();
                changes.extend(plan_named("pool", &current, &declared));
                if !dry_run {
                    let all = theirs
                        .into_iter()
                        .chain(declared.iter().map(|(_, s)| s.clone()))
                        .collect();
                    p.set_pools(all).await.map_err(Error::invalid)?;
                    let mut applied = ownership.project(project);
                    applied.pools = declared.iter().map(|(n, _)| n.clone()).collect();
                    ownership.set_project(project, applied);
                    ownership.save(&**dispatcher.store()).await?;
                }
            }
            None if !declared.is_empty() => {
                return Err(Error::precondition(
                    "this server does not run machine pools",
                ));
            }
            None => {}
        }
        changes.extend(super::apply(broker, dispatcher, m, dry_run).await?);
        if let Some(b) = buckets {
            changes.extend(apply_buckets(b, m, dry_run).await?);
        }
        if let (Some(t), Some((s, w))) = (triggers, owned_triggers) {
            changes.extend(plan_named(
                "schedule",
                &own(project, &s, |x| &x.name),
                &schedules,
            ));
            changes.extend(plan_named(
                "webhook",
                &own(project, &w, |x| &x.name),
                &webhooks,
            ));
            if !dry_run {
                t.set_project_schedules(project, schedules.into_iter().map(|(_, s)| s).collect())
                    .await?;
                t.set_project_webhooks(project, webhooks.into_iter().map(|(_, w)| w).collect())
                    .await?;
            }
        }
        Ok::<_, Error>(changes)
    }
    .await;
    match &result {
        Ok(changes) if !dry_run => {
            for c in changes.iter().filter(|c| c.action != Action::Unchanged) {
                tracing::info!(kind = c.kind, name = c.name, action = ?c.action, "manifest change applied");
            }
        }
        Ok(_) => {}
        Err(e) if !dry_run => {
            tracing::warn!(error = %e, "applying a manifest failed; changes before the failure stay")
        }
        Err(_) => {}
    }
    result
}
