//! Results: settling an ended attempt (retry or terminal state), sharing
//! run logs, publishing result messages with retries, and the log lines,
//! trace spans and metrics for queued and ended runs.

use super::*;

impl Dispatcher {
    /// Records how an attempt ended: retry, or terminal state + result.
    pub(super) async fn settle(&self, run: RunRecord, spec: &JobSpec, exit: Exit) {
        let id = run.id;
        let now = self.now_ms();
        if self.store.shared() {
            self.share_log(id).await;
        }
        let current = self.store.get(id).await.ok();
        let mut exit = exit;
        // A cancel asked for while it ran is why it ended, whatever else did.
        if current.as_ref().is_some_and(|r| r.cancel_requested) {
            exit.cause = EndCause::Cancelled;
        }
        let status = exit.status();
        // Only a terminal state of a job with a result topic leaves a result
        // to publish: the publisher need not look after any other end.
        let mut result_pending = false;
        let result = if exit.cause.keeps_attempt() {
            // Not the job's fault: wait and try the same attempt again.
            // A lost machine or lease: another machine can take it now.
            let delay = match exit.cause {
                EndCause::Lost => Duration::ZERO,
                _ => spec
                    .retries
                    .backoff(2, jitter())
                    .min(Duration::from_secs(30)),
            };
            tracing::info!(
                run_id = id,
                job = run.job,
                attempt = run.attempt,
                status = "queued",
                error = exit.error.as_deref(),
                retry_in_ms = delay.as_millis() as u64,
                "run requeued after an infrastructure error"
            );
            self.store
                .requeue(
                    id,
                    Requeue {
                        next_attempt: run.attempt,
                        not_before_ms: now + delay.as_millis() as i64,
                        last_exit: &exit,
                    },
                )
                .await
        } else if matches!(status, RunStatus::Failed | RunStatus::TimedOut)
            && run.attempt < spec.retries.max_attempts
            && !exit.cause.is_final()
        {
            let next = run.attempt + 1;
            let delay = spec.retries.backoff(next, jitter());
            tracing::info!(
                run_id = id,
                job = run.job,
                attempt = run.attempt,
                status = "queued",
                attempt_status = status.as_str(),
                exit_code = exit.exit_code,
                error = exit.error.as_deref(),
                next_attempt = next,
                retry_in_ms = delay.as_millis() as u64,
                "run attempt failed; retrying"
            );
            self.store
                .requeue(
                    id,
                    Requeue {
                        next_attempt: next,
                        not_before_ms: now + delay.as_millis() as i64,
                        last_exit: &exit,
                    },
                )
                .await
        } else {
            result_pending = !spec.result_topic.is_empty();
            let r = self
                .store
                .finish(
                    id,
                    RunEnd {
                        exit: &exit,
                        now_ms: now,
                        has_result_topic: result_pending,
                    },
                )
                .await
                .map(|_| ());
            if r.is_ok() {
                self.discard_work_dir(id);
            }
            let ended = current.unwrap_or_else(|| run.clone());
            run_ended(
                &RunRecord {
                    attempt: run.attempt,
                    ..ended
                },
                &exit,
                now,
            );
            r
        };
        if let Err(e) = result {
            tracing::error!(run = id, error = %e, "could not record the end of an attempt");
        }
        // The slot is freed only once the run's new state is recorded.
        self.lock().inflight.remove(id);
        self.wake.notify_one();
        if result_pending {
            self.results_wake.notify_one();
        }
    }

    /// Clears a run's outbox flag; false (logged) when that write failed:
    /// the result is then published again on the next pass (at least once).
    pub(super) async fn mark_result_published(&self, id: i64) -> bool {
        match self.store.mark_result_published(id).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(run = id, error = %e, "could not record the result as published; it will be published again");
                false
            }
        }
    }

    /// Copies the run's log file into a shared store, so that every server
    /// of a cluster can show it (best effort: the file stays the source).
    pub(super) async fn share_log(&self, id: i64) {
        let log = match tokio::fs::read(self.log_path(id)).await {
            Ok(l) => l,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::warn!(run = id, error = %e, "cannot read the run log to share it");
                return;
            }
        };
        if let Err(e) = self.store.put_log(id, &log).await {
            tracing::warn!(run = id, error = %e, "cannot store the run log");
        }
    }

    /// The log of a run: this server's file, else the copy in a shared store
    /// (a run executed by another server of the cluster). None when neither.
    pub async fn run_log(&self, id: i64) -> Result<Option<Vec<u8>>> {
        match tokio::fs::read(self.log_path(id)).await {
            Ok(l) => Ok(Some(l)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.store.shared() => {
                self.store.log(id).await
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::internal(format!("reading the log of run {id}: {e}"))),
        }
    }

    /// The one task that publishes results, so that two runs ending at the
    /// same time never publish the same result twice. Failed publishes are
    /// retried every few seconds (outbox: at least once).
    pub(super) async fn result_publisher(self: Arc<Self>) {
        loop {
            let retry = self.publish_pending_results().await;
            let wait = if retry {
                Duration::from_secs(2)
            } else {
                Duration::from_secs(60)
            };
            let _ = tokio::time::timeout(wait, self.results_wake.notified()).await;
        }
    }

    /// Publishes the result message of every finished run not yet published.
    /// Returns whether some are left to retry.
    pub(super) async fn publish_pending_results(&self) -> bool {
        let pending = match self.store.unpublished_results().await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read pending results");
                return true;
            }
        };
        let mut retry = false;
        for run in pending {
            let spec = self.lock().jobs.get(&run.job).map(|j| j.spec.clone());
            let (topic, spec) = match spec {
                Some(s) if !s.result_topic.is_empty() => (s.result_topic.clone(), s),
                _ => {
                    retry |= !self.mark_result_published(run.id).await;
                    continue;
                }
            };
            let msg = self.result_message(&run, &spec).await;
            let published = match (&spec.connection, TopicName::parse(&topic)) {
                (Some(c), _) => self.publish_remote(c, &topic, msg).await,
                (None, Ok(t)) => self.broker.publish(&t, vec![msg]).await.map(|_| ()),
                (None, Err(e)) => Err(e),
            };
            match published {
                Ok(_) => {
                    retry |= !self.mark_result_published(run.id).await;
                }
                Err(e) if e.code == pubrun_core::Code::NotFound => {
                    // Retrying cannot help until someone creates the topic;
                    // dropping it beats warning forever.
                    tracing::warn!(run = run.id, topic, error = %e, "result topic does not exist; result dropped");
                    retry |= !self.mark_result_published(run.id).await;
                }
                Err(e) => {
                    tracing::warn!(run = run.id, topic, error = %e, "result not published yet; will retry");
                    retry = true;
                }
            }
        }
        retry
    }

    pub(super) async fn result_message(&self, run: &RunRecord, spec: &JobSpec) -> OutgoingMessage {
        let exit = run.exit.clone().unwrap_or_default();
        let tail = pubrun_exec::log::tail(&self.log_path(run.id), 4096).await;
        // Lowest precedence first: the trigger's attributes, the job's
        // result_attributes, then pubrun's own.
        let mut attributes = if spec.result_trigger_attributes {
            run.message.attributes.clone()
        } else {
            BTreeMap::new()
        };
        let ctx = context(run);
        for (k, tmpl) in &spec.result_attributes {
            match template::render(tmpl, &ctx) {
                // A value Pub/Sub would refuse must not block the result.
                Ok(v) if v.len() > limits::MAX_ATTRIBUTE_VALUE_BYTES => {
                    tracing::warn!(
                        run = run.id,
                        attribute = k,
                        bytes = v.len(),
                        "result attribute longer than Pub/Sub allows; left out"
                    )
                }
                Ok(v) => {
                    attributes.insert(k.clone(), v);
                }
                // The run's result still goes out; the attribute says why
                // it is empty in the server log.
                Err(e) => {
                    tracing::warn!(run = run.id, attribute = k, error = %e, "result attribute cannot be rendered; left out")
                }
            }
        }
        attributes.insert("job".to_string(), run.job.clone());
        attributes.insert("run_id".to_string(), run.id.to_string());
        attributes.insert("status".to_string(), run.status.as_str().to_string());
        attributes.insert(
            "exit_code".to_string(),
            exit.exit_code.map(|c| c.to_string()).unwrap_or_default(),
        );
        attributes.insert("attempt".to_string(), run.attempt.to_string());
        attributes.insert("source_message_id".to_string(), run.message.id.clone());
        // Downstream subscribers continue the trace from this run.
        if traces::enabled() {
            traces::inject(&run_trace(run).run, &mut attributes);
        }
        // Copied trigger attributes go first when there are too many.
        while attributes.len() > limits::MAX_ATTRIBUTES {
            let drop = attributes
                .keys()
                .find(|k| {
                    !pubrun_core::job::RESULT_ATTRIBUTES.contains(&k.as_str())
                        && !spec.result_attributes.contains_key(*k)
                })
                .or_else(|| {
                    attributes
                        .keys()
                        .find(|k| !pubrun_core::job::RESULT_ATTRIBUTES.contains(&k.as_str()))
                })
                .cloned();
            match drop {
                Some(k) => attributes.remove(&k),
                None => break,
            };
        }
        let summary = serde_json::json!({
            "run_id": run.id,
            "job": run.job,
            "status": run.status.as_str(),
            "attempt": run.attempt,
            "exit_code": exit.exit_code,
            "signal": exit.signal,
            "oom_killed": exit.oom_killed,
            "error": exit.error,
            "source_message_id": run.message.id,
            "created_at": rfc3339_nanos(run.created_at_ms * 1_000_000),
            "started_at": run.started_at_ms.map(|t| rfc3339_nanos(t * 1_000_000)),
            "ended_at": run.ended_at_ms.map(|t| rfc3339_nanos(t * 1_000_000)),
            "duration_ms": run.started_at_ms.zip(run.ended_at_ms).map(|(s, e)| e - s),
            "machine": run.machine,
            "log_tail": tail,
        });
        OutgoingMessage {
            data: serde_json::to_vec(&summary).unwrap().into(),
            attributes,
            ordering_key: String::new(),
        }
    }
}

/// One log line per queued run.
pub(super) fn log_queued(job: &str, e: &Enqueued, message_id: &str) {
    match e {
        Enqueued::New(id) => {
            tracing::info!(
                run_id = id,
                job,
                message_id,
                status = "queued",
                "run queued"
            )
        }
        Enqueued::Duplicate(id) => tracing::debug!(
            run_id = id,
            job,
            message_id,
            "message deduplicated onto an existing run"
        ),
    }
}

/// The run's derived spans (see `pubrun_observability::traces`).
pub(super) fn run_trace(run: &RunRecord) -> traces::RunTrace {
    traces::RunTrace::of(
        run.id,
        &run.message.attributes,
        &format!("{}/{}", run.message.id, run.message.publish_time),
    )
}

/// The delivery span: message handed to the job's intake → run queued.
pub(super) fn delivery_span(job: &str, run_id: i64, msg: &SourceMessage, received: SystemTime) {
    if !traces::enabled() {
        return;
    }
    let t = traces::RunTrace::of(
        run_id,
        &msg.attributes,
        &format!("{}/{}", msg.id, msg.publish_time),
    );
    traces::start(|| SpanStart {
        kind: SpanKind::Consumer,
        id: Some(t.delivery.span_id()),
        // A root when the message carried no context: the derived trace.
        trace_id: Some(t.delivery.trace_id()),
        start: Some(received),
        attributes: vec![
            KeyValue::new("messaging.system", "gcp_pubsub"),
            KeyValue::new("messaging.operation", "deliver"),
            KeyValue::new("messaging.message.id", msg.id.clone()),
            KeyValue::new("pubrun.job", job.to_string()),
            KeyValue::new("pubrun.run_id", run_id),
        ],
        ..SpanStart::new("deliver", t.remote_parent.as_ref())
    });
}

/// The run span, queued → ended, recorded once the run has ended (its id
/// was derived, so attempts were its children all along).
pub(super) fn run_span(run: &RunRecord, exit: &Exit, now: i64) {
    if !traces::enabled() {
        return;
    }
    let t = run_trace(run);
    let status = exit.status();
    let mut span = traces::start(|| SpanStart {
        id: Some(t.run.span_id()),
        start: Some(traces::at_ms(run.created_at_ms)),
        attributes: vec![
            KeyValue::new("pubrun.job", run.job.clone()),
            KeyValue::new("pubrun.run_id", run.id),
            KeyValue::new("pubrun.attempts", i64::from(run.attempt)),
            KeyValue::new("pubrun.status", status.as_str()),
            KeyValue::new("messaging.message.id", run.message.id.clone()),
        ],
        ..SpanStart::new("run", Some(&t.delivery))
    });
    if let Some(c) = exit.exit_code {
        span.set("pubrun.exit_code", i64::from(c));
    }
    if status != RunStatus::Succeeded {
        span.error(status.as_str());
    }
    // Not before its last attempt's span, which `now` (ms) may truncate.
    span.end_at(std::time::SystemTime::now().max(traces::at_ms(now)));
}

/// A run reached its terminal status: one log line, the run counters.
pub(super) fn run_ended(run: &RunRecord, exit: &Exit, now: i64) {
    run_span(run, exit, now);
    let status = exit.status();
    let duration_s = run.started_at_ms.map(|s| (now - s).max(0) as f64 / 1000.0);
    tracing::info!(
        run_id = run.id,
        job = run.job,
        status = status.as_str(),
        attempt = run.attempt,
        exit_code = exit.exit_code,
        signal = exit.signal,
        oom_killed = exit.oom_killed,
        duration_s,
        machine = run.machine,
        error = exit.error.as_deref(),
        "run ended"
    );
    let m = pubrun_observability::metrics();
    m.runs
        .get_or_create(&labels([("job", &run.job), ("status", status.as_str())]))
        .inc();
    if let Some(d) = duration_s {
        m.run_duration
            .get_or_create(&labels([("job", &run.job)]))
            .observe(d);
    }
}

pub(super) fn describe(exit: &Exit) -> String {
    let mut s = format!("attempt ended: {}", exit.status());
    if let Some(c) = exit.exit_code {
        s += &format!(", exit code {c}");
    }
    if let Some(sig) = exit.signal {
        s += &format!(", signal {sig}");
    }
    if exit.oom_killed {
        s += ", killed: out of memory";
    }
    if let Some(e) = &exit.error {
        s += &format!(", {e}");
    }
    s
}
