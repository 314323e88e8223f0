//! The scheduler: a background loop that claims due ticks in the trigger
//! store (`triggers.db`, or PostgreSQL in cluster mode) and publishes them
//! to the broker.
//!
//! # One pass
//!
//! At time `now` (from the injected [`Clock`]), for every schedule:
//!
//! 1. A pending claim whose lease ([`CLAIM_LEASE`]) has expired — its
//!    publisher crashed, or its publish failed — is taken over by
//!    compare-and-set and published again.
//! 2. Unless paused, [`due`] decides which tick (at most one) fires, given
//!    the durable cursor; the tick is **claimed first** (compare-and-set of
//!    the cursor, committed), **then published**, then the claim is cleared.
//!
//! Then the loop sleeps until the earliest next tick or lease expiry, or
//! until woken by a change (schedules set, pause/resume, stop, or a manual
//! clock being moved).
//!
//! # At least once
//!
//! A crash between the claim and the publish leaves the claim pending; after
//! the lease (60 s) any scheduler sharing the database takes it over and
//! publishes the tick. A crash after the publish but before the claim is
//! cleared publishes the tick twice. We chose at-least-once over
//! at-most-once because a silently lost nightly run is worse than a duplicate
//! one, and duplicates are cheap to remove downstream: both copies carry the
//! same `schedule` and `scheduledTime` attributes, so a job's
//! `dedup_key = "{{ attributes.schedule }}/{{ attributes.scheduledTime }}"`
//! collapses them, and the rest of pubrun is at-least-once anyway.
//! A failed publish (e.g. the topic does not exist yet) is retried every
//! lease period until it succeeds or a newer tick of the same schedule is
//! claimed (which supersedes it, like any missed tick).
//!
//! # Several servers
//!
//! The claim is a compare-and-set on the row's cursor, so any number of
//! schedulers sharing the database fire each tick once: all of them compute
//! the same tick from the same cursor, one `UPDATE … WHERE cursor = read`
//! wins, the others change no row and move on. Two [`Scheduler`]s on one
//! `triggers.db` do exactly this (tested), and so do servers sharing a
//! PostgreSQL trigger store (`pubrun_store::triggers`, tested on both
//! engines).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use pubrun_broker::Broker;
use pubrun_core::{Error, Result, TopicName};
use tokio::sync::{watch, Notify};

use crate::db::{DefKind, Definition, Replacement, ScheduleState, Scope, TickClaim, TriggerStore};
use crate::schedule::{due, format_time, MissedPolicy, Schedule, ScheduleSpec, ScheduleStatus};
use crate::Validate;
use pubrun_core::clock::Clock;

/// How long a claim is held before another scheduler (or a retry) may take
/// it over and publish the tick again.
pub const CLAIM_LEASE: Duration = Duration::from_secs(60);

/// After a database error the loop looks again this soon.
const ERROR_RETRY: Duration = Duration::from_secs(5);

/// Runs schedules. Cheap to clone (a handle).
#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<dyn TriggerStore>,
    broker: Arc<Broker>,
    clock: Arc<dyn Clock>,
    schedules: RwLock<BTreeMap<String, Schedule>>,
    wake: Arc<Notify>,
    evaluated: watch::Sender<Option<DateTime<Utc>>>,
    stopped: AtomicBool,
    spawned: AtomicBool,
    owner: String,
}

fn owner_id() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "pid{}-{:x}-{}",
        std::process::id(),
        nanos,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn lease() -> TimeDelta {
    TimeDelta::from_std(CLAIM_LEASE).expect("lease in range")
}

impl Scheduler {
    /// A scheduler on `db` (normally `<data_dir>/triggers.db`, or the
    /// cluster's PostgreSQL) with the schedules defined there (the last
    /// applies): they run from [`Scheduler::spawn`] on.
    pub async fn new(
        db: Arc<dyn TriggerStore>,
        broker: Arc<Broker>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self> {
        let defs = db.definitions(DefKind::Schedule).await?;
        let (evaluated, _) = watch::channel(None);
        let scheduler = Scheduler {
            inner: Arc::new(Inner {
                db,
                broker,
                clock,
                schedules: RwLock::new(BTreeMap::new()),
                wake: Arc::new(Notify::new()),
                evaluated,
                stopped: AtomicBool::new(false),
                spawned: AtomicBool::new(false),
                owner: owner_id(),
            }),
        };
        scheduler.install(&defs);
        Ok(scheduler)
    }

    /// Replaces every declared schedule, whatever its project (each is
    /// recorded as its topic's project's). All are validated first; nothing
    /// changes on an error. A new schedule starts now: earlier ticks never
    /// fire. For an existing schedule the run-time pause state (from
    /// [`Scheduler::pause`]/[`Scheduler::resume`]) is kept unless the declared
    /// `paused` value changed since it was last set, in which case the
    /// declaration wins. Schedules no longer declared are forgotten.
    pub async fn set_schedules(&self, specs: Vec<ScheduleSpec>) -> Result<()> {
        self.replace(Scope::All, specs).await
    }

    /// As [`Scheduler::set_schedules`] for the schedules of one project only
    /// (what its manifest declares): other projects' schedules stay, and a
    /// name another project holds is FAILED_PRECONDITION.
    pub async fn set_project_schedules(
        &self,
        project: &str,
        specs: Vec<ScheduleSpec>,
    ) -> Result<()> {
        self.replace(Scope::Project(project), specs).await
    }

    async fn replace(&self, scope: Scope<'_>, specs: Vec<ScheduleSpec>) -> Result<()> {
        let mut defs = NewDefinitions::new("schedule", scope);
        for spec in specs {
            let s = spec.validate()?;
            defs.push(&spec.name, &s.topic, &spec, spec.paused)?;
        }
        let defs = defs.defs;
        let all = self
            .inner
            .db
            .replace_definitions(Replacement {
                kind: DefKind::Schedule,
                scope,
                defs: &defs,
                now: self.inner.clock.now(),
            })
            .await?;
        self.install(&all);
        self.inner.wake.notify_one();
        Ok(())
    }

    /// Makes the running schedules those of `defs`. A definition that no
    /// longer compiles (e.g. written by a newer pubrun) is skipped, loudly.
    fn install(&self, defs: &[Definition]) {
        let compiled: BTreeMap<String, Schedule> = parse_definitions::<ScheduleSpec>("schedule", defs)
            .filter_map(|(_, spec)| match spec.validate() {
                Ok(s) => Some((spec.name.clone(), s)),
                Err(e) => {
                    tracing::error!(schedule = %spec.name, error = %e, "stored schedule is invalid; it does not run (apply its manifest again)");
                    None
                }
            })
            .collect();
        *self
            .inner
            .schedules
            .write()
            .unwrap_or_else(|p| p.into_inner()) = compiled;
    }

    pub(crate) fn clock_now(&self) -> DateTime<Utc> {
        self.inner.clock.now()
    }

    pub(crate) fn db(&self) -> &Arc<dyn TriggerStore> {
        &self.inner.db
    }

    /// The stored definitions with the project that declared each.
    pub async fn definitions(&self) -> Result<Vec<(String, ScheduleSpec)>> {
        Ok(parse_definitions(
            "schedule",
            &self.inner.db.definitions(DefKind::Schedule).await?,
        )
        .collect())
    }

    /// The declared specs.
    pub fn specs(&self) -> Vec<ScheduleSpec> {
        self.inner
            .read_schedules()
            .values()
            .map(|s| s.spec.clone())
            .collect()
    }

    fn schedule(&self, name: &str) -> Result<Schedule> {
        self.inner
            .read_schedules()
            .get(name)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("schedule \"{name}\" not found")))
    }

    /// Every schedule with its state, by name.
    pub async fn list(&self) -> Result<Vec<ScheduleStatus>> {
        let schedules = self.inner.snapshot();
        let states: BTreeMap<String, ScheduleState> = self
            .inner
            .db
            .list()
            .await?
            .into_iter()
            .map(|s| (s.name.clone(), s))
            .collect();
        let now = self.inner.clock.now();
        Ok(schedules
            .iter()
            .map(|s| status(s, states.get(s.name()), now))
            .collect())
    }

    pub async fn get(&self, name: &str) -> Result<ScheduleStatus> {
        let s = self.schedule(name)?;
        let st = self.inner.db.get(name).await?;
        Ok(status(&s, st.as_ref(), self.inner.clock.now()))
    }

    /// Pauses a schedule (durably; survives restarts and re-applies of an
    /// unchanged manifest). Ticks while paused never fire.
    pub async fn pause(&self, name: &str) -> Result<ScheduleStatus> {
        self.set_paused(name, true).await
    }

    /// Resumes a schedule; the next tick after now is the first to fire
    /// (ticks that passed while paused are not caught up).
    pub async fn resume(&self, name: &str) -> Result<ScheduleStatus> {
        self.set_paused(name, false).await
    }

    async fn set_paused(&self, name: &str, paused: bool) -> Result<ScheduleStatus> {
        self.schedule(name)?;
        if !self
            .inner
            .db
            .set_paused(name, paused, self.inner.clock.now())
            .await?
        {
            return Err(Error::not_found(format!("schedule \"{name}\" not found")));
        }
        self.inner.wake.notify_one();
        self.get(name).await
    }

    /// Publishes the schedule's message now, with `scheduledTime` = now and
    /// `runNow = "true"`, whether or not the schedule is paused. Does not
    /// move the schedule's cursor. Returns the message id.
    pub async fn run_now(&self, name: &str) -> Result<String> {
        let s = self.schedule(name)?;
        let now = self.inner.clock.now();
        let ids = self
            .inner
            .broker
            .publish(&s.topic, vec![s.message(now, true)])
            .await?;
        let id = ids
            .into_iter()
            .next()
            .ok_or_else(|| Error::internal("publish returned no id"))?;
        self.inner
            .db
            .record_run_now(name, &id, self.inner.clock.now())
            .await?;
        tracing::info!(schedule = name, message_id = %id, "schedule run now");
        Ok(id)
    }

    /// Starts the loop (once per handle); it runs until [`Scheduler::stop`].
    pub fn spawn(&self) -> tokio::task::JoinHandle<()> {
        let inner = self.inner.clone();
        if inner.spawned.swap(true, Ordering::SeqCst) {
            return tokio::spawn(async {});
        }
        inner.stopped.store(false, Ordering::SeqCst);
        crate::clock::wake_on_set(&*inner.clock, inner.wake.clone());
        tokio::spawn(async move { inner.run().await })
    }

    /// Stops the loop after its current pass (a publish in progress
    /// completes).
    pub fn stop(&self) {
        self.inner.stopped.store(true, Ordering::SeqCst);
        self.inner.wake.notify_one();
    }

    /// One pass at the clock's current time, without the loop: returns the
    /// time the next pass is needed.
    pub async fn evaluate_now(&self) -> Option<DateTime<Utc>> {
        let now = self.inner.clock.now();
        let next = self.inner.evaluate(now).await;
        self.inner.evaluated.send_replace(Some(now));
        next
    }

    /// Waits until a pass at or after `t` has finished (publishes included).
    /// For tests with a manual clock: `clock.set(t); sched.wait_evaluated(t)`.
    pub async fn wait_evaluated(&self, t: DateTime<Utc>) {
        let mut rx = self.inner.evaluated.subscribe();
        let _ = rx.wait_for(|v| v.is_some_and(|v| v >= t)).await;
    }
}

impl Inner {
    /// The compiled schedules (a writer that panicked left a whole map).
    fn read_schedules(&self) -> RwLockReadGuard<'_, BTreeMap<String, Schedule>> {
        self.schedules.read().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of every schedule, so no lock is held across an await.
    fn snapshot(&self) -> Vec<Schedule> {
        self.read_schedules().values().cloned().collect()
    }

    async fn run(self: Arc<Self>) {
        tracing::debug!(owner = %self.owner, "scheduler started");
        while !self.stopped.load(Ordering::SeqCst) {
            let now = self.clock.now();
            let next = self.evaluate(now).await;
            self.evaluated.send_replace(Some(now));
            if self.stopped.load(Ordering::SeqCst) {
                break;
            }
            let sleep = match next {
                Some(t) => crate::clock::sleep_until(&*self.clock, t),
                None => Box::pin(std::future::pending()),
            };
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = sleep => {}
            }
        }
        self.spawned.store(false, Ordering::SeqCst);
        tracing::debug!(owner = %self.owner, "scheduler stopped");
    }

    /// One pass; returns when the next one is needed.
    async fn evaluate(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let schedules = self.snapshot();
        let mut next: Option<DateTime<Utc>> = None;
        for s in &schedules {
            let wake = match self.evaluate_one(s, now).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(schedule = s.name(), error = %e, "schedule evaluation failed");
                    Some(now + TimeDelta::from_std(ERROR_RETRY).unwrap())
                }
            };
            next = match (next, wake) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        next
    }

    async fn evaluate_one(
        &self,
        s: &Schedule,
        now: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>> {
        let name = s.name();
        let Some(st) = self.db.get(name).await? else {
            return Ok(None);
        };
        let mut wake: Option<DateTime<Utc>> = None;
        let mut wake_at =
            |t: DateTime<Utc>| wake = Some(wake.map_or(t, |w: DateTime<Utc>| w.min(t)));

        // 1. An expired claim is published again (at least once).
        if let Some(claim) = &st.pending {
            let expires = claim.claimed_at + lease();
            if expires <= now {
                let again = TickClaim {
                    name,
                    tick: claim.tick,
                    owner: &self.owner,
                    now,
                };
                if self.db.take_over(again, claim).await? {
                    tracing::info!(schedule = name, tick = %format_time(claim.tick), previous_owner = %claim.owner, "publishing a claimed tick again");
                    if !self.publish_tick(s, claim.tick, now).await {
                        wake_at(now + lease());
                    }
                }
            } else {
                wake_at(expires);
            }
        }

        // 2. The tick that is due now, if any: claim, then publish.
        if !st.paused {
            let mut live = s.clone();
            live.spec.paused = false;
            if let Some(&tick) = due(&live, st.cursor, now).first() {
                let c = TickClaim {
                    name,
                    tick,
                    owner: &self.owner,
                    now,
                };
                if self.db.claim(c, st.cursor).await? {
                    if !self.publish_tick(s, tick, now).await {
                        wake_at(now + lease());
                    }
                } else {
                    tracing::debug!(schedule = name, tick = %format_time(tick), "tick claimed elsewhere");
                }
            }
            if let Some(t) = s.next_fire(now) {
                wake_at(t);
            }
        }
        Ok(wake)
    }

    /// Publishes a claimed tick and clears the claim; false if the publish
    /// failed (the claim stays pending and is retried after its lease).
    async fn publish_tick(&self, s: &Schedule, tick: DateTime<Utc>, now: DateTime<Utc>) -> bool {
        let name = s.name();
        match self
            .broker
            .publish(&s.topic, vec![s.message(tick, false)])
            .await
        {
            Ok(ids) => {
                let id = ids.into_iter().next().unwrap_or_default();
                tracing::info!(schedule = name, tick = %format_time(tick), message_id = %id, "schedule fired");
                if let Err(e) = self
                    .db
                    .complete(
                        TickClaim {
                            name,
                            tick,
                            owner: &self.owner,
                            now: self.clock.now(),
                        },
                        &id,
                    )
                    .await
                {
                    // Published but not recorded: the claim expires and the
                    // tick is published again (at least once).
                    tracing::warn!(schedule = name, error = %e, "could not record a published tick");
                }
                true
            }
            Err(e) => {
                tracing::warn!(schedule = name, tick = %format_time(tick), error = %e, "schedule publish failed; retrying after the claim lease");
                if let Err(e) = self.db.record_error(name, &e.to_string(), now).await {
                    tracing::warn!(schedule = name, error = %e, "could not record the failed publish");
                }
                false
            }
        }
    }
}

/// The definitions one replace stores, gathered from checked specs: names
/// unique, each under the scope's project (in a replace of all, its topic's).
pub(crate) struct NewDefinitions<'a> {
    kind: &'static str,
    scope: Scope<'a>,
    names: std::collections::BTreeSet<String>,
    /// Each with whether it is declared paused.
    pub defs: Vec<(Definition, bool)>,
}

impl<'a> NewDefinitions<'a> {
    pub fn new(kind: &'static str, scope: Scope<'a>) -> Self {
        NewDefinitions {
            kind,
            scope,
            names: Default::default(),
            defs: Vec::new(),
        }
    }

    pub fn push(
        &mut self,
        name: &str,
        topic: &TopicName,
        spec: &impl serde::Serialize,
        paused: bool,
    ) -> Result<()> {
        let kind = self.kind;
        if !self.names.insert(name.to_string()) {
            return Err(Error::invalid(format!(
                "{kind} \"{name}\" is declared twice"
            )));
        }
        let project = match self.scope {
            Scope::Project(p) => p.to_string(),
            Scope::All => topic.project().id().to_string(),
        };
        let spec = serde_json::to_string(spec)
            .map_err(|e| Error::internal(format!("{kind} spec as JSON: {e}")))?;
        let def = Definition {
            name: name.to_string(),
            project,
            spec,
        };
        self.defs.push((def, paused));
        Ok(())
    }
}

/// Specs of stored definitions, with their projects; one that does not parse
/// is logged and skipped.
pub(crate) fn parse_definitions<'a, T: serde::de::DeserializeOwned>(
    kind: &'static str,
    defs: &'a [Definition],
) -> impl Iterator<Item = (String, T)> + 'a {
    defs.iter()
        .filter_map(move |d| match serde_json::from_str::<T>(&d.spec) {
            Ok(spec) => Some((d.project.clone(), spec)),
            Err(e) => {
                tracing::error!(kind, name = %d.name, error = %e, "stored definition does not parse; ignored (apply its manifest again)");
                None
            }
        })
}

fn status(s: &Schedule, st: Option<&ScheduleState>, now: DateTime<Utc>) -> ScheduleStatus {
    let paused = st.map_or(s.spec.paused, |st| st.paused);
    let after = st.map_or(now, |st| st.cursor.max(now));
    ScheduleStatus {
        name: s.spec.name.clone(),
        cron: s.cron.as_str().to_string(),
        time_zone: s.tz.name().to_string(),
        topic: s.topic.to_string(),
        paused,
        missed: s.spec.missed.name().to_string(),
        missed_max_age: match s.spec.missed {
            MissedPolicy::RunOnce { max_age } => {
                Some(humantime::format_duration(max_age).to_string())
            }
            MissedPolicy::Skip => None,
        },
        next_fire_time: if paused {
            None
        } else {
            s.next_fire(after).map(format_time)
        },
        last_fire_time: st.and_then(|st| st.last_fired).map(format_time),
        last_message_id: st.and_then(|st| st.last_message_id.clone()),
        pending_tick: st
            .and_then(|st| st.pending.as_ref())
            .map(|c| format_time(c.tick)),
        last_error: st.and_then(|st| st.last_error.clone()),
    }
}
