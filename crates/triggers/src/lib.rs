//! Event sources that publish into the broker: cron schedules and webhooks.
//!
//! - [`schedule`] and [`webhook`] are the I/O-free parts: specs, validation,
//!   [`next_fire`] (DST rules documented there), [`due`] (missed-tick
//!   policy), signature checks, request → attributes.
//! - [`Scheduler`] is the background loop: it claims each tick by
//!   compare-and-set in the trigger store ([`db::TriggerStore`]:
//!   `<data_dir>/triggers.db`, or PostgreSQL in cluster mode) *before*
//!   publishing (at least once; several schedulers on one store fire a tick
//!   once), with an injectable [`Clock`].
//! - [`Webhooks`] and [`http`] serve `POST /hooks/{name}` and the schedules
//!   REST API.
//! - [`Triggers`] bundles both for the server.
//!
//! Definitions are durable: every declared schedule and webhook is stored in
//! the trigger store with the project whose manifest declared it, and
//! [`Triggers::open`] / [`Triggers::with_store`] serve them again after a
//! restart (or `kill -9`, or on the server that takes a cluster over). A
//! project's apply replaces only that project's definitions.
//!
//! # Wiring (server)
//!
//! ```ignore
//! let triggers = Arc::new(Triggers::open(&data_dir, broker.clone()).await?); // serves what was stored
//! // or Triggers::with_store(Arc<dyn TriggerStore>, broker, clock).await? (cluster mode)
//! triggers.set_project_schedules("demo", manifest_schedules).await?; // Vec<ScheduleSpec>
//! triggers.set_project_webhooks("demo", manifest_webhooks).await?;   // Vec<WebhookSpec>, secrets from env
//! triggers.spawn();                              // the scheduler loop
//! let app = app.merge(triggers.router());        // /hooks/{name} + /api/v1/schedules…
//! // on shutdown: triggers.stop();
//! ```
//!
//! `/hooks/{name}` authenticates with each hook's own secret (a sender such
//! as GitHub cannot present pubrun's API token), so the server's token layer
//! should let `/hooks/` through; `/api/v1/schedules…` stays behind it.
//!
//! # Manifest keys (`pubrun.toml`)
//!
//! ```toml
//! [[schedule]]
//! name = "nightly-import"          # required; [A-Za-z0-9][A-Za-z0-9._-]*, ≤ 128
//! cron = "0 3 * * *"               # required; 5 fields or @daily/@hourly/…
//! time_zone = "Europe/Berlin"      # IANA name; default "UTC"
//! topic = "imports"                # required; topic id in the manifest's project
//! data = '{"full": true}'          # default ""
//! attributes = { kind = "import" } # default {}; not schedule/scheduledTime/runNow
//! missed = "run_once"              # "run_once" (default) | "skip"
//! missed_max_age = "24h"           # humantime, run_once only; default 24h
//! paused = false                   # default false
//!
//! [[webhook]]
//! name = "start-import"            # required; POST /hooks/start-import
//! topic = "imports"                # required
//! secret_env = "IMPORT_HOOK_SECRET"        # optional: HMAC-SHA256, X-Hub-Signature-256
//! bearer_secret_env = "IMPORT_HOOK_TOKEN"  # optional: Authorization: Bearer …
//! headers_as_attributes = ["X-GitHub-Event"] # default []
//! query_as_attributes = false      # default false
//! max_body_bytes = 1048576         # default 1 MiB, at most 10 MiB
//! ```
//!
//! `missed`/`missed_max_age` map through [`MissedPolicy::from_config`]; the
//! topic id becomes `projects/PROJECT/topics/ID` in the specs, which the
//! manifest parser produces directly (`pubrun_core::trigger`).

pub mod clock;
pub mod db;
pub mod http;
pub mod schedule;
pub mod scheduler;
pub mod webhook;

use std::path::Path;
use std::sync::Arc;

use pubrun_broker::Broker;
use pubrun_core::clock::{Clock, SystemClock};
use pubrun_core::{Error, Result};

pub use http::{router, schedules_router, Webhooks};
pub use schedule::{
    due, format_time, next_fire, parse_time_zone, CronExpr, MissedPolicy, Schedule, ScheduleSpec,
    ScheduleStatus, DEFAULT_MISSED_MAX_AGE, ON_TIME_GRACE,
};
pub use scheduler::{Scheduler, CLAIM_LEASE};
pub use webhook::{
    github_signature, verify_github_signature, Hook, WebhookSpec, DEFAULT_MAX_BODY_BYTES,
};

use db::{DefKind, Replacement, Scope, SqliteTriggerStore, TriggerStore};

/// Validation of the specs `pubrun-core` declares ([`ScheduleSpec`],
/// [`WebhookSpec`]): it needs this crate's cron dialect, time zones and
/// HTTP rules, which the I/O-free core does not carry.
pub trait Validate {
    /// What a valid spec compiles to.
    type Valid;
    fn validate(&self) -> Result<Self::Valid>;
}

/// File name of the schedules database inside the data directory.
pub const DB_FILE: &str = "triggers.db";

/// Schedules and webhooks of one server.
pub struct Triggers {
    scheduler: Scheduler,
    webhooks: Webhooks,
}

impl Triggers {
    /// Opens `<data_dir>/triggers.db` (creating the directory if needed),
    /// on the system clock: the embedded engine.
    pub async fn open(data_dir: &Path, broker: Arc<Broker>) -> Result<Self> {
        Self::open_with_clock(data_dir, broker, Arc::new(SystemClock)).await
    }

    /// As [`Triggers::open`], with another clock (tests: [`pubrun_core::clock::ManualClock`]).
    pub async fn open_with_clock(
        data_dir: &Path,
        broker: Arc<Broker>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self> {
        std::fs::create_dir_all(data_dir).map_err(|e| {
            Error::unavailable(format!(
                "cannot create data directory {}: {e}",
                data_dir.display()
            ))
        })?;
        let store = SqliteTriggerStore::open_async(&data_dir.join(DB_FILE)).await?;
        Self::with_store(Arc::new(store), broker, clock).await
    }

    /// Schedules and webhooks on `store` (any engine: the cluster's
    /// PostgreSQL in `serve --store`), serving the definitions stored there.
    pub async fn with_store(
        store: Arc<dyn TriggerStore>,
        broker: Arc<Broker>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self> {
        let scheduler = Scheduler::new(store, broker.clone(), clock).await?;
        let triggers = Triggers {
            scheduler,
            webhooks: Webhooks::new(broker),
        };
        let defs = triggers
            .scheduler
            .db()
            .definitions(DefKind::Webhook)
            .await?;
        triggers.install_webhooks(&defs, &|k| std::env::var(k).ok());
        Ok(triggers)
    }

    /// Replaces every declared schedule (see [`Scheduler::set_schedules`]).
    pub async fn set_schedules(&self, specs: Vec<ScheduleSpec>) -> Result<()> {
        self.scheduler.set_schedules(specs).await
    }

    /// Replaces the schedules of `project` (see
    /// [`Scheduler::set_project_schedules`]).
    pub async fn set_project_schedules(
        &self,
        project: &str,
        specs: Vec<ScheduleSpec>,
    ) -> Result<()> {
        self.scheduler.set_project_schedules(project, specs).await
    }

    /// Replaces every webhook; secrets are read from the environment now (an
    /// unset `secret_env`/`bearer_secret_env` variable is an error).
    pub async fn set_webhooks(&self, specs: Vec<WebhookSpec>) -> Result<()> {
        self.set_webhooks_with_env(specs, &|k| std::env::var(k).ok())
            .await
    }

    /// As [`Triggers::set_webhooks`], reading secrets through `env`.
    pub async fn set_webhooks_with_env(
        &self,
        specs: Vec<WebhookSpec>,
        env: &(dyn Fn(&str) -> Option<String> + Sync),
    ) -> Result<()> {
        self.replace_webhooks(Scope::All, specs, env).await
    }

    /// Replaces the webhooks of `project` only (what its manifest declares):
    /// other projects' hooks stay; a name another project holds is
    /// FAILED_PRECONDITION. Secrets are read from the environment now.
    pub async fn set_project_webhooks(&self, project: &str, specs: Vec<WebhookSpec>) -> Result<()> {
        self.replace_webhooks(Scope::Project(project), specs, &|k| std::env::var(k).ok())
            .await
    }

    async fn replace_webhooks(
        &self,
        scope: Scope<'_>,
        specs: Vec<WebhookSpec>,
        env: &(dyn Fn(&str) -> Option<String> + Sync),
    ) -> Result<()> {
        // Resolve first: a bad spec or an unset secret changes nothing.
        let mut defs = scheduler::NewDefinitions::new("webhook", scope);
        for spec in specs {
            let hook = Hook::resolve(spec.clone(), env)?;
            defs.push(&spec.name, &hook.topic, &spec, false)?;
        }
        let defs = defs.defs;
        let all = self
            .scheduler
            .db()
            .replace_definitions(Replacement {
                kind: DefKind::Webhook,
                scope,
                defs: &defs,
                now: self.scheduler.clock_now(),
            })
            .await?;
        self.install_webhooks(&all, env);
        Ok(())
    }

    /// Serves the hooks of `defs`. A hook whose secret variable is unset
    /// answers 503 to every request (logged now); one whose spec no longer
    /// validates is skipped (logged).
    fn install_webhooks(&self, defs: &[db::Definition], env: &dyn Fn(&str) -> Option<String>) {
        let mut hooks = std::collections::BTreeMap::new();
        for (_, spec) in scheduler::parse_definitions::<WebhookSpec>("webhook", defs) {
            match Hook::resolve_or_unavailable(spec.clone(), env) {
                Ok(hook) => {
                    if let Some(why) = hook.unavailable() {
                        tracing::warn!(webhook = %spec.name, "{why}; the hook answers 503 until the variable is set and pubrun restarted");
                    }
                    hooks.insert(spec.name.clone(), Arc::new(hook));
                }
                Err(e) => {
                    tracing::error!(webhook = %spec.name, error = %e, "stored webhook is invalid; it is not served (apply its manifest again)");
                }
            }
        }
        self.webhooks.install(hooks);
    }

    /// The stored webhook definitions with the project that declared each.
    pub async fn webhook_definitions(&self) -> Result<Vec<(String, WebhookSpec)>> {
        Ok(scheduler::parse_definitions(
            "webhook",
            &self.scheduler.db().definitions(DefKind::Webhook).await?,
        )
        .collect())
    }

    pub async fn list_schedules(&self) -> Result<Vec<ScheduleStatus>> {
        self.scheduler.list().await
    }

    pub fn list_webhooks(&self) -> Vec<WebhookSpec> {
        self.webhooks.specs()
    }

    pub async fn pause(&self, name: &str) -> Result<ScheduleStatus> {
        self.scheduler.pause(name).await
    }

    pub async fn resume(&self, name: &str) -> Result<ScheduleStatus> {
        self.scheduler.resume(name).await
    }

    /// Publishes a schedule's message now; returns the message id.
    pub async fn run_now(&self, name: &str) -> Result<String> {
        self.scheduler.run_now(name).await
    }

    /// Starts the scheduler loop.
    pub fn spawn(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        self.scheduler.spawn()
    }

    /// Stops the scheduler loop after its current pass.
    pub fn stop(&self) {
        self.scheduler.stop()
    }

    /// `POST /hooks/{name}` and the schedules REST API, to merge into the
    /// server's router.
    pub fn router(&self) -> axum::Router {
        http::router(self.webhooks.clone()).merge(http::schedules_router(self.scheduler.clone()))
    }

    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    pub fn webhooks(&self) -> &Webhooks {
        &self.webhooks
    }
}
