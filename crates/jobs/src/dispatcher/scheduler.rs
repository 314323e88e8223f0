//! The scheduler: waits for due runs, claims free slots (local and per
//! pool), builds each run's executor request and spawns its execution;
//! queued runs whose job is gone are dropped.

use super::*;

impl Dispatcher {
    pub(super) async fn scheduler(self: Arc<Self>) {
        let mut sweep_at = 0i64;
        loop {
            let now = self.now_ms();
            if now >= sweep_at {
                // Rare work: expired dedup keys, runs whose job was deleted.
                let _ = self.store.prune_dedup(now).await;
                let jobs: Vec<String> = self.lock().jobs.keys().cloned().collect();
                if let Ok(orphans) = self.store.queued_orphans(&jobs).await {
                    for q in orphans {
                        self.drop_queued(&q).await;
                    }
                }
                sweep_at = now + 60_000;
            }
            self.start_due_runs(now).await;
            let next_wake = match self.store.next_due_ms(now).await {
                Ok(Some(due)) => Duration::from_millis((due - now).clamp(1, 1000) as u64),
                _ => Duration::from_secs(1),
            };
            let _ = tokio::time::timeout(next_wake, self.wake.notified()).await;
        }
    }

    /// Starts queued runs that are due, oldest first per job, within each
    /// job's concurrency and the global slots. Reads only as many queued
    /// runs as could start, so a deep queue costs nothing per wake.
    pub(super) async fn start_due_runs(self: &Arc<Self>, now: i64) {
        let mut capacity: Vec<(String, usize)> = {
            let st = self.lock();
            st.jobs
                .values()
                .map(|j| {
                    let running = st
                        .active
                        .values()
                        .filter(|(job, _, _)| job == &j.spec.name)
                        .count();
                    (
                        j.spec.name.clone(),
                        (j.spec.concurrency as usize).saturating_sub(running),
                    )
                })
                .filter(|(_, free)| *free > 0)
                .collect()
        };
        // Oldest waiting job first would need a join; name order is stable and fair enough.
        capacity.sort();
        for (job, free) in capacity {
            let remote = self
                .lock()
                .jobs
                .get(&job)
                .is_some_and(|j| j.spec.pool != LOCAL_POOL);
            // Runs of a remote pool wait for a machine, not for a local slot.
            let slots_left = if remote {
                usize::MAX
            } else {
                self.slots.saturating_sub(self.local_active())
            };
            if slots_left == 0 {
                continue;
            }
            let queued = match self
                .store
                .startable(&job, now, free.min(slots_left).saturating_add(8))
                .await
            {
                Ok(q) => q,
                Err(e) => {
                    tracing::error!(job, error = %e, "scheduler cannot read queued runs");
                    continue;
                }
            };
            let mut claimed = 0;
            for q in queued {
                if claimed >= free {
                    break;
                }
                if q.cancel_requested {
                    // Cancel requested between two attempts.
                    self.drop_queued(&q).await;
                    continue;
                }
                let token = CancellationToken::new();
                let spec = {
                    let mut st = self.lock();
                    if st.active.contains_key(&q.id) {
                        // Its previous attempt is still being recorded.
                        continue;
                    }
                    if !remote && st.active.values().filter(|a| a.2).count() >= self.slots {
                        break;
                    }
                    let Some(j) = st.jobs.get(&q.job) else { break };
                    let spec = j.spec.clone();
                    // Registered before it is claimed, so that a cancel
                    // that finds the run claimed also finds its switch.
                    st.active
                        .insert(q.id, (q.job.clone(), token.clone(), !remote));
                    spec
                };
                claimed += 1;
                // Claimed on its own task: the claims of one wake share a
                // group commit instead of waiting for each other's fsync.
                let this = self.clone();
                tokio::spawn(async move { this.claim_and_execute(q.id, spec, token).await });
            }
        }
    }

    /// Claims a run registered in `active` (durably: `starting`) and runs
    /// it; a run that cannot be claimed leaves `active` and frees its slot.
    pub(super) async fn claim_and_execute(
        self: Arc<Self>,
        id: i64,
        spec: JobSpec,
        token: CancellationToken,
    ) {
        if let Err(e) = self.store.mark_starting(id).await {
            // No wake: the scheduler's next pass fills the slot (waking it
            // here would spin while the store refuses).
            self.lock().active.remove(&id);
            tracing::debug!(run = id, error = %e, "run not started");
            return;
        }
        let run = match self.store.get(id).await {
            Ok(r) => r,
            Err(e) => {
                self.lock().active.remove(&id);
                tracing::error!(run = id, error = %e, "claimed run cannot be read");
                return;
            }
        };
        // Waited since it was due: queued, or its retry's backoff ended.
        pubrun_observability::metrics()
            .queue_wait
            .get_or_create(&labels([("job", &run.job)]))
            .observe((self.now_ms() - run.not_before_ms).max(0) as f64 / 1000.0);
        self.execute(run, spec, token).await;
    }

    /// Ends a queued run that must not start: cancelled, or its job deleted.
    pub(super) async fn drop_queued(&self, run: &QueuedRun) {
        let job = self
            .lock()
            .jobs
            .get(&run.job)
            .map(|j| j.spec.result_topic.clone());
        let error = match &job {
            Some(_) => "cancelled before it started".to_string(),
            None => format!("job {} was deleted before this run started", run.job),
        };
        let has_result = job.is_some_and(|t| !t.is_empty());
        let exit = Exit::failed(EndCause::Cancelled, error);
        match self
            .store
            .cancel_if_queued(run.id, &exit, self.now_ms(), has_result)
            .await
        {
            Ok(true) => {
                if let Ok(r) = self.store.get(run.id).await {
                    run_ended(&r, &exit, self.now_ms());
                }
                self.results_wake.notify_one()
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(run = run.id, error = %e, "cannot cancel queued run"),
        }
    }

    pub(super) fn request(
        &self,
        run: &RunRecord,
        spec: &JobSpec,
        rendered: ExecutorSpec,
        (passed, secrets): (BTreeMap<String, String>, Secrets),
    ) -> std::io::Result<RunRequest> {
        let dir = self.data_dir.join("runs").join(run.id.to_string());
        let workdir = dir.join("work");
        // The message itself, as files: data of any size (argv and env are
        // limited to ~128 KiB per string) and attributes as JSON.
        let msg_dir = workdir.join(".pubrun");
        std::fs::create_dir_all(&msg_dir)?;
        std::fs::write(msg_dir.join("data"), &run.message.data)?;
        std::fs::write(
            msg_dir.join("attributes.json"),
            serde_json::to_vec(&run.message.attributes).unwrap_or_default(),
        )?;
        let seen_as = match &rendered {
            ExecutorSpec::Docker(_) => PathBuf::from("/workspace/.pubrun"),
            ExecutorSpec::Process(_) => msg_dir.clone(),
        };
        let mut env: BTreeMap<String, String> = [
            ("PUBRUN_RUN_ID".to_string(), run.id.to_string()),
            ("PUBRUN_JOB".to_string(), run.job.clone()),
            ("PUBRUN_ATTEMPT".to_string(), run.attempt.to_string()),
            ("PUBRUN_MESSAGE_ID".to_string(), run.message.id.clone()),
            (
                "PUBRUN_DATA_FILE".to_string(),
                seen_as.join("data").display().to_string(),
            ),
            (
                "PUBRUN_ATTRIBUTES_FILE".to_string(),
                seen_as.join("attributes.json").display().to_string(),
            ),
        ]
        .into_iter()
        .collect();
        env.extend(passed);
        Ok(RunRequest {
            run_id: run.id.to_string(),
            job: run.job.clone(),
            attempt: run.attempt,
            spec: rendered,
            workdir,
            timeout: spec.timeout,
            grace_period: spec.grace_period,
            env,
            secrets,
            outputs: spec.outputs.iter().map(|o| o.from.clone()).collect(),
        })
    }

    pub fn log_path(&self, id: i64) -> PathBuf {
        self.data_dir.join("runs").join(id.to_string()).join("log")
    }

    pub(super) fn local_active(&self) -> usize {
        self.lock().active.values().filter(|a| a.2).count()
    }

    /// The executor of the job's pool: the server's own for `local`, the
    /// pool's (agents, machines) otherwise.
    pub(super) fn executor_for(&self, spec: &JobSpec) -> Arc<dyn Executor> {
        if spec.pool != LOCAL_POOL {
            return match self.pools.get().and_then(|p| p.executor(&spec.pool)) {
                Some(e) => e,
                None => Arc::new(pubrun_exec::Unavailable(format!(
                    "pool {} is not declared on this server; the run waits until it is",
                    spec.pool
                ))),
            };
        }
        match spec.executor {
            ExecutorSpec::Process(_) => self.executors.process.clone(),
            ExecutorSpec::Docker(_) => self.executors.docker.clone(),
        }
    }
}
