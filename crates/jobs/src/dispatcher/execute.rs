//! Execution and recovery: one attempt of a run (templates, inputs, the
//! executor, outputs) guarded against panics, and after a restart the
//! reattaching to, or declaring lost, attempts that were in flight.

use super::*;

impl Dispatcher {
    /// One attempt and its record. A panic anywhere in it (templates,
    /// inputs, the executor, outputs, recording) fails this run with an
    /// `internal error:` cause and frees its slot; other runs go on.
    pub(super) async fn execute(
        self: Arc<Self>,
        run: RunRecord,
        spec: JobSpec,
        token: CancellationToken,
    ) {
        let attempt = self.attempt(&run, &spec, token);
        let exit = self
            .unless_panicked("running the attempt", run.id, &spec, attempt)
            .await;
        self.settle_guarded(run, &spec, exit).await;
    }

    /// The exit of `attempt`; a panic in it ends the attempt with an
    /// internal error (`while_` says in what), noted in the run's log.
    async fn unless_panicked(
        &self,
        while_: &str,
        id: i64,
        spec: &JobSpec,
        attempt: impl std::future::Future<Output = Exit>,
    ) -> Exit {
        match std::panic::AssertUnwindSafe(attempt).catch_unwind().await {
            Ok(exit) => exit,
            Err(p) => {
                let exit = internal_error(while_, &*p);
                self.note_in_log(id, spec, &exit).await;
                exit
            }
        }
    }

    /// [`Self::settle`], and if that panics: the run fails as it can, and
    /// its slot is freed anyway.
    pub(super) async fn settle_guarded(&self, run: RunRecord, spec: &JobSpec, exit: Exit) {
        let id = run.id;
        let settled = std::panic::AssertUnwindSafe(self.settle(run, spec, exit))
            .catch_unwind()
            .await;
        if let Err(p) = settled {
            let exit = internal_error("recording the end of the attempt", &*p);
            tracing::error!(run = id, error = exit.error.as_deref(), "run failed");
            if let Err(e) = self
                .store
                .finish(
                    id,
                    RunEnd {
                        exit: &exit,
                        now_ms: self.now_ms(),
                        has_result_topic: !spec.result_topic.is_empty(),
                    },
                )
                .await
            {
                tracing::error!(run = id, error = %e, "could not record the end of an attempt");
            }
            self.lock().inflight.remove(id);
            self.wake.notify_one();
            self.results_wake.notify_one();
        }
    }

    /// Best effort: says in the run's log how the attempt ended.
    pub(super) async fn note_in_log(&self, id: i64, spec: &JobSpec, exit: &Exit) {
        let secrets = server_env(spec, false)
            .map(|(_, s)| s.values())
            .unwrap_or_default();
        let log = LogSink::deferred(self.log_path(id), spec.log_limit_bytes, secrets, None);
        log.note(&describe(exit)).await;
        self.close_log(&log).await;
    }

    pub(super) async fn attempt(
        &self,
        run: &RunRecord,
        spec: &JobSpec,
        token: CancellationToken,
    ) -> Exit {
        let t = traces::enabled().then(|| run_trace(run));
        let mut span = traces::start(|| SpanStart {
            attributes: vec![
                KeyValue::new("pubrun.job", run.job.clone()),
                KeyValue::new("pubrun.run_id", run.id),
                KeyValue::new("pubrun.attempt", i64::from(run.attempt)),
                KeyValue::new("pubrun.pool", spec.pool.clone()),
            ],
            ..SpanStart::new("attempt", t.as_ref().map(|t| &t.run))
        });
        let exit = self.attempt_inner(run, spec, token, &span).await;
        span.set("pubrun.status", exit.status().as_str());
        if let Some(c) = exit.exit_code {
            span.set("pubrun.exit_code", i64::from(c));
        }
        if exit.status() != RunStatus::Succeeded {
            span.error(exit.status().as_str());
        }
        exit
    }

    pub(super) async fn attempt_inner(
        &self,
        run: &RunRecord,
        spec: &JobSpec,
        token: CancellationToken,
        span: &traces::Span,
    ) -> Exit {
        let ctx = context(run);
        let from_server = match server_env(spec, true) {
            Ok(v) => v,
            Err(e) => return e,
        };
        let secrets = from_server.1.clone();
        let rendered = match render_spec(&spec.executor, &ctx) {
            Ok(r) => r,
            Err(e) => return parameters(e.message),
        };
        let mut req = self.request(run, spec, rendered, from_server);
        // Directories and message files in one trip to a blocking thread:
        // they are most of what an attempt costs before its spawn.
        let (_, msg_dir) = self.run_dirs(run.id);
        let (message, log_path) = (run.message.clone(), self.log_path(run.id));
        let (limit, masked) = (spec.log_limit_bytes, secrets.values());
        let note = format!(
            "attempt {} of {} starting",
            run.attempt, spec.retries.max_attempts
        );
        let prepared = pubrun_exec::blocking_io(move || prepare_run_dir(&msg_dir, &message));
        if let Err(e) = prepared.await {
            return Exit::failed(
                EndCause::Infrastructure,
                format!("cannot prepare run directory: {e}"),
            );
        }
        // The log file (and, with a --work-dir, its directory) is made
        // while the process starts, not before: disk work the start need
        // not wait for. Should it fail, the run goes on without its output.
        let log = Arc::new(LogSink::deferred(log_path, limit, masked, Some(&note)));
        if token.is_cancelled() {
            // Cancelled between being claimed and here: never start it.
            let exit = Exit::failed(EndCause::Cancelled, "cancelled before it started");
            log.note(&describe(&exit)).await;
            self.close_log(&log).await;
            return exit;
        }
        let store = self.store.clone();
        let id = run.id;
        let (job, attempt) = (run.job.clone(), run.attempt);
        // The callback is synchronous and the store is not: the write runs
        // as a task that is awaited before the attempt's end is recorded, so
        // `running` is never written after the terminal state.
        let marking: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>> = Arc::default();
        let marking2 = marking.clone();
        let clock = self.clock();
        let on_started = Box::new(move |s: pubrun_exec::Started| {
            tracing::info!(
                run_id = id,
                job,
                attempt,
                machine = s.machine,
                status = "running",
                "run started"
            );
            let store = store.clone();
            let task = tokio::spawn(async move {
                if let Err(e) = store
                    .mark_running(id, &s.machine, &s.handle, clock.now_ms())
                    .await
                {
                    tracing::warn!(run = id, error = %e, "could not record running state");
                }
            });
            *marking2.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        });
        // The job continues the trace from its attempt (W3C env carrier).
        if let Some(tp) = span.traceparent() {
            req.env.insert("TRACEPARENT".into(), tp);
        }
        let workdir = req.workdir.clone();
        let stage = Stage {
            run,
            spec,
            ctx: &ctx,
            workdir: &workdir,
            log: &log,
        };
        if !spec.inputs.is_empty() {
            let parent = span.context();
            let mut staging = traces::start(|| SpanStart::new("stage inputs", parent.as_ref()));
            let staged = self.stage_inputs(&stage).await;
            if staged.is_err() {
                staging.error("input staging failed");
            }
            drop(staging);
            if let Err(exit) = staged {
                log.note(&describe(&exit)).await;
                self.close_log(&log).await;
                return exit;
            }
        }
        // A job that prints nothing still has its log (and first note).
        tokio::spawn({
            let log = log.clone();
            async move { log.open().await }
        });
        let mut exit = self
            .executor_for(spec)
            .run(pubrun_exec::Attempt {
                req,
                log: log.clone(),
                cancel: token,
                on_started,
            })
            .await;
        let marked = marking.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = marked {
            let _ = task.await;
        }
        // Outputs are uploaded per `upload_outputs` (by default whatever the
        // attempt's status: partial results of a failed attempt are often
        // what one needs), never when the attempt did not start for an
        // infrastructure reason.
        let upload = match spec.upload_outputs {
            UploadOutputs::Always => true,
            UploadOutputs::OnSuccess => exit.status() == RunStatus::Succeeded,
        };
        if !spec.outputs.is_empty() && !exit.cause.keeps_attempt() && !upload {
            log.note("outputs not uploaded: the attempt did not succeed (upload_outputs = \"on_success\")")
                .await;
        }
        if !spec.outputs.is_empty() && !exit.cause.keeps_attempt() && upload {
            let parent = span.context();
            let mut uploading = traces::start(|| SpanStart::new("upload outputs", parent.as_ref()));
            let uploaded = self.stage_outputs(&stage).await;
            if uploaded.is_err() {
                uploading.error("output upload failed");
            }
            drop(uploading);
            if let Err(e) = uploaded {
                let e = format!("outputs: {e}");
                log.note(&e).await;
                exit.error = Some(match exit.error.take() {
                    Some(prev) => format!("{prev}; {e}"),
                    None => e,
                });
                // A timeout or cancel stays what ended the attempt.
                if exit.cause == EndCause::Exited {
                    exit.cause = EndCause::InputOutput;
                }
            }
        }
        // Results and the API show the error: no secret value in it.
        exit.error = exit.error.map(|e| secrets.mask(&e));
        log.note(&describe(&exit)).await;
        self.close_log(&log).await;
        exit
    }

    /// After a restart: follows an attempt that was in flight, or declares
    /// it lost. A lost `running` attempt counts (retried per policy); a lost
    /// `starting` one never reported running, so as far as pubrun knows
    /// nothing ran and the same attempt is tried again.
    pub(super) async fn recover_run(
        self: Arc<Self>,
        run: RunRecord,
        spec: JobSpec,
        token: CancellationToken,
    ) {
        let attempt = self.recover_attempt(&run, &spec, token);
        let exit = self
            .unless_panicked(
                "recovering the attempt after a restart",
                run.id,
                &spec,
                attempt,
            )
            .await;
        self.settle_guarded(run, &spec, exit).await;
    }

    pub(super) async fn recover_attempt(
        &self,
        run: &RunRecord,
        spec: &JobSpec,
        token: CancellationToken,
    ) -> Exit {
        // Secrets whose variable is gone now are only not masked: the
        // attempt is followed anyway.
        let from_server = server_env(spec, false).unwrap_or_default();
        let log = Arc::new(LogSink::deferred(
            self.log_path(run.id),
            spec.log_limit_bytes,
            from_server.1.values(),
            None,
        ));
        let log = log.open().await.then_some(log);
        if let Some(log) = &log {
            log.note(&format!(
                "server restarted; looking for attempt {} ({})",
                run.attempt, run.status
            ))
            .await;
        }
        let found = match (render_spec(&spec.executor, &context(run)), &log) {
            (Ok(rendered), Some(log)) => {
                match prepare_run_dir(&self.run_dirs(run.id).1, &run.message) {
                    Ok(()) => {
                        let req = self.request(run, spec, rendered, from_server);
                        self.reattach(req, spec, log, &token).await
                    }
                    Err(_) => None,
                }
            }
            _ => None,
        };
        let exit = found.unwrap_or_else(|| match run.status {
            // Cluster mode: this server took over from one that stopped
            // (or was cut off) with the attempt in flight. As for a lost
            // agent, that is not the job's fault: same attempt again.
            _ if self.store.shared() => Exit::failed(
                EndCause::Lost,
                format!(
                    "lost: the server running this attempt stopped ({})",
                    run.status
                ),
            ),
            RunStatus::Starting => Exit::failed(
                EndCause::Lost,
                "lost: pubrun restarted while this attempt was starting",
            ),
            _ => Exit::failed(
                EndCause::Interrupted,
                "lost: pubrun restarted while this attempt ran",
            ),
        });
        if let Some(log) = &log {
            log.note(&describe(&exit)).await;
            self.close_log(log).await;
        }
        exit
    }

    /// Asks the executor for the attempt until it can answer. An engine that
    /// does not answer (Docker daemon down) is asked again with backoff: the
    /// attempt may still be alive, and starting it anew could run it twice.
    pub(super) async fn reattach(
        &self,
        req: RunRequest,
        spec: &JobSpec,
        log: &Arc<LogSink>,
        token: &CancellationToken,
    ) -> Option<Exit> {
        let executor = self.executor_for(spec);
        let mut delay = REATTACH_FIRST_DELAY;
        loop {
            match executor
                .reattach(pubrun_exec::Attempt::new(req.clone(), log.clone()).cancel(token.clone()))
                .await
            {
                // `Lost` is an answer (a pool took the lease back), not
                // an engine that cannot be asked.
                Some(exit) if exit.cause == EndCause::Infrastructure => {
                    let why = exit.error.unwrap_or_default();
                    log.note(&format!(
                        "cannot look for the attempt yet ({why}); asking again in {delay:?}"
                    ))
                    .await;
                    tracing::warn!(run = req.run_id, error = why, "reattach failed; will retry");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = token.cancelled() => {
                            return Some(Exit::failed(EndCause::Cancelled, format!("cancelled while the engine did not answer ({why})")));
                        }
                    }
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
                other => return other,
            }
        }
    }
}
