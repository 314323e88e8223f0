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
    /// job's concurrency and the global slots: per job, one commit claims
    /// as many runs as may start and reads them back. A deep queue costs
    /// nothing per wake.
    pub(super) async fn start_due_runs(self: &Arc<Self>, now: i64) {
        let mut jobs: Vec<(String, bool)> = self
            .lock()
            .jobs
            .values()
            .map(|j| (j.spec.name.clone(), j.spec.pool != LOCAL_POOL))
            .collect();
        // Oldest waiting job first would need a join; name order is stable and fair enough.
        jobs.sort();
        for (job, remote) in jobs {
            let (spec, free, in_flight) = {
                let mut st = self.lock();
                let Some(j) = st.jobs.get(&job) else { continue };
                let spec = j.spec.clone();
                let mut free = (spec.concurrency as usize).saturating_sub(st.inflight.busy(&job));
                // Runs of a remote pool wait for a machine, not for a local slot.
                if !remote {
                    free = free.min(self.slots.saturating_sub(st.inflight.local_busy()));
                }
                st.inflight.reserve(&job, !remote, free);
                (spec, free, st.inflight.ids_of(&job))
            };
            if free == 0 {
                continue;
            }
            let mut held = Reserved {
                dispatcher: self,
                job: &job,
                local: !remote,
                n: free,
            };
            // A run requeued by an attempt still being recorded is not
            // claimed again until that attempt left `inflight`.
            let claimed = match self.store.claim_due(&job, now, free, &in_flight).await {
                Ok(c) => c,
                Err(e) => {
                    // No wake: the next pass tries again (waking here would
                    // spin while the store refuses).
                    tracing::error!(job, error = %e, "scheduler cannot claim queued runs");
                    continue;
                }
            };
            for run in claimed.started {
                let token = held.admit(run.id);
                self.launch(run, spec.clone(), token);
            }
            drop(held);
            for q in claimed.cancelled {
                // Cancel requested between two attempts.
                self.drop_queued(&q).await;
            }
        }
    }

    /// Runs a claimed, admitted run's attempt on a task of its own.
    pub(super) fn launch(
        self: &Arc<Self>,
        run: RunRecord,
        spec: JobSpec,
        token: CancellationToken,
    ) {
        // Waited since it was due: queued, or its retry's backoff ended.
        pubrun_observability::metrics()
            .queue_wait
            .get_or_create(&labels([("job", &run.job)]))
            .observe((self.now_ms() - run.not_before_ms).max(0) as f64 / 1000.0);
        let this = self.clone();
        tokio::spawn(async move { this.execute(run, spec, token).await });
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
            .cancel_if_queued(
                run.id,
                RunEnd {
                    exit: &exit,
                    now_ms: self.now_ms(),
                    has_result_topic: has_result,
                },
            )
            .await
        {
            Ok(true) => {
                if let Ok(r) = self.store.get(run.id).await {
                    run_ended(&r, &exit, self.now_ms());
                }
                // A run waiting for a retry has a directory from before.
                self.discard_work_dir(run.id);
                self.results_wake.notify_one()
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(run = run.id, error = %e, "cannot cancel queued run"),
        }
    }

    /// The run's working directory and, in it, the message files' directory.
    pub(super) fn run_dirs(&self, id: i64) -> (PathBuf, PathBuf) {
        let workdir = match self.work_root.get() {
            Some(root) => root.join(id.to_string()),
            None => self.data_dir.join("runs").join(id.to_string()).join("work"),
        };
        let msg_dir = workdir.join(".pubrun");
        (workdir, msg_dir)
    }

    /// The executor's request for an attempt (no I/O: the run's directory
    /// is made by [`prepare_run_dir`]).
    pub(super) fn request(
        &self,
        run: &RunRecord,
        spec: &JobSpec,
        rendered: ExecutorSpec,
        (passed, secrets): (BTreeMap<String, String>, Secrets),
    ) -> RunRequest {
        let (workdir, msg_dir) = self.run_dirs(run.id);
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
        RunRequest {
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
        }
    }

    pub fn log_path(&self, id: i64) -> PathBuf {
        self.data_dir.join("runs").join(id.to_string()).join("log")
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

/// Makes the run's working directory with the message in it as files: data
/// of any size (argv and env are limited to ~128 KiB per string) and
/// attributes as JSON. Blocking: a few inodes per run.
pub(super) fn prepare_run_dir(msg_dir: &Path, message: &SourceMessage) -> std::io::Result<()> {
    // The parents first, one mkdir each (create_dir_all would try the
    // deepest first and fail its way up); a retry finds them made.
    let mut dirs: Vec<&Path> = msg_dir.ancestors().take(3).collect();
    dirs.reverse();
    for d in dirs {
        make_dir(d)?;
    }
    std::fs::write(msg_dir.join("data"), &message.data)?;
    std::fs::write(
        msg_dir.join("attributes.json"),
        serde_json::to_vec(&message.attributes).unwrap_or_default(),
    )
}

/// Makes one directory, content when it exists; makes its parents too only
/// when they are missing (the data directory's `runs/` may be).
fn make_dir(d: &Path) -> std::io::Result<()> {
    match std::fs::create_dir(d) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir_all(d),
        Err(e) => Err(e),
    }
}
