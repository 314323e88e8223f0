//! Event sources that publish into the broker: cron schedules and webhooks.
//!
//! - [`schedule`] and [`webhook`] are the I/O-free parts: specs, validation,
//!   [`next_fire`] (DST rules documented there), [`due`] (missed-tick
//!   policy), signature checks, request → attributes.
//! - [`Scheduler`] is the background loop: it claims each tick by
//!   compare-and-set in `<data_dir>/triggers.db` *before* publishing (at
//!   least once; several schedulers on one database fire a tick once), with
//!   an injectable [`Clock`].
//! - [`Webhooks`] and [`http`] serve `POST /hooks/{name}` and the schedules
//!   REST API.
//! - [`Triggers`] bundles both for the server.
//!
//! # Wiring (server)
//!
//! ```ignore
//! let triggers = Arc::new(Triggers::open(&data_dir, broker.clone())?);
//! triggers.set_schedules(manifest_schedules)?;   // Vec<ScheduleSpec>
//! triggers.set_webhooks(manifest_webhooks)?;     // Vec<WebhookSpec>, secrets from env
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
//! topic id becomes `projects/PROJECT/topics/ID` in the specs.

pub mod clock;
pub mod db;
pub mod http;
pub mod schedule;
pub mod scheduler;
pub mod webhook;

use std::path::Path;
use std::sync::Arc;

use pubrun_broker::Broker;
use pubrun_core::{Error, Result};

pub use clock::{Clock, ManualClock, SystemClock};
pub use http::{router, schedules_router, Webhooks};
pub use schedule::{
    due, format_time, next_fire, parse_time_zone, CronExpr, MissedPolicy, Schedule, ScheduleSpec,
    ScheduleStatus, DEFAULT_MISSED_MAX_AGE, ON_TIME_GRACE,
};
pub use scheduler::{Scheduler, CLAIM_LEASE};
pub use webhook::{github_signature, verify_github_signature, WebhookSpec, DEFAULT_MAX_BODY_BYTES};

/// File name of the schedules database inside the data directory.
pub const DB_FILE: &str = "triggers.db";

/// Schedules and webhooks of one server.
pub struct Triggers {
    scheduler: Scheduler,
    webhooks: Webhooks,
}

impl Triggers {
    /// Opens `<data_dir>/triggers.db` (creating the directory if needed),
    /// on the system clock.
    pub fn open(data_dir: &Path, broker: Arc<Broker>) -> Result<Self> {
        Self::open_with_clock(data_dir, broker, Arc::new(SystemClock))
    }

    /// As [`Triggers::open`], with another clock (tests: [`ManualClock`]).
    pub fn open_with_clock(
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
        let scheduler = Scheduler::open(&data_dir.join(DB_FILE), broker.clone(), clock)?;
        Ok(Triggers {
            scheduler,
            webhooks: Webhooks::new(broker),
        })
    }

    /// Replaces the declared schedules (see [`Scheduler::set_schedules`]).
    pub fn set_schedules(&self, specs: Vec<ScheduleSpec>) -> Result<()> {
        self.scheduler.set_schedules(specs)
    }

    /// Replaces the webhooks; secrets are read from the environment now (an
    /// unset `secret_env`/`bearer_secret_env` variable is an error).
    pub fn set_webhooks(&self, specs: Vec<WebhookSpec>) -> Result<()> {
        self.webhooks.set_from_env(specs)
    }

    /// As [`Triggers::set_webhooks`], reading secrets through `env`.
    pub fn set_webhooks_with_env(
        &self,
        specs: Vec<WebhookSpec>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<()> {
        self.webhooks.set(specs, env)
    }

    pub fn list_schedules(&self) -> Result<Vec<ScheduleStatus>> {
        self.scheduler.list()
    }

    pub fn list_webhooks(&self) -> Vec<WebhookSpec> {
        self.webhooks.specs()
    }

    pub fn pause(&self, name: &str) -> Result<ScheduleStatus> {
        self.scheduler.pause(name)
    }

    pub fn resume(&self, name: &str) -> Result<ScheduleStatus> {
        self.scheduler.resume(name)
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
