//! Intake: each job's subscription pull loop, turning deliveries into
//! queued runs (dedup by message or template key), manual triggers, and
//! cancelling queued or running runs.

use super::*;

impl Dispatcher {
    pub(super) fn start_intake(self: &Arc<Self>, spec: JobSpec) -> Result<()> {
        let this = self.clone();
        let name = spec.name.clone();
        let intake: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
            if spec.connection.is_some() {
                Box::pin(async move { this.remote_intake(name).await })
            } else {
                let topic = TopicName::parse(&spec.topic)?;
                let sub =
                    SubscriptionName::parse(&job_subscription(topic.project().id(), &spec.name))?;
                Box::pin(async move { this.intake(name, sub).await })
            };
        // Spawned under the lock: the new intake must not look its job up
        // before the job is installed (it would find nothing, or the old
        // spec, and stop). Replacing the entry drops the old JobState, which
        // aborts the old intake.
        let mut st = self.lock();
        let intake = tokio::spawn(intake);
        let old = st.jobs.insert(spec.name.clone(), JobState { spec, intake });
        drop(st);
        drop(old);
        Ok(())
    }

    /// Streams the job's subscription; queues a run per message, then acks.
    pub(super) async fn intake(self: Arc<Self>, job: String, sub: SubscriptionName) {
        let stream = match self.broker.open_stream(&sub, 60, 1000, 0) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(job, error = %e, "job intake cannot open its subscription");
                return;
            }
        };
        loop {
            let batch = match stream.next(500).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(job, error = %e, "job intake stopped");
                    return;
                }
            };
            let Ok(spec) = self.job(&job) else { return };
            let items: Vec<(SourceMessage, String)> =
                batch.iter().map(|d| source_and_key(&spec, d)).collect();
            // On a task of its own: replacing the job aborts this intake,
            // and runs committed as `starting` must still be started (and
            // their reserved slots settled) when that happens mid-commit.
            let this = self.clone();
            let queued = tokio::spawn(async move { this.queue_and_start(spec, items).await });
            let queued: Vec<_> = match queued.await {
                Ok(true) => batch.into_iter().map(|d| d.ack_id).collect(),
                // Not acked: the messages come back after their lease.
                _ => Vec::new(),
            };
            if !queued.is_empty() {
                if let Err(e) = self.broker.acknowledge(&sub, &queued).await {
                    tracing::warn!(job, error = %e, "ack after queueing failed; duplicates will be caught by dedup");
                }
            }
        }
    }

    /// Queues a run per message, starting at once (in the same commit) as
    /// many as there are free slots; wakes the scheduler for the rest.
    /// Whether the runs are durable (then the messages may be acked).
    async fn queue_and_start(
        self: Arc<Self>,
        spec: JobSpec,
        items: Vec<(SourceMessage, String)>,
    ) -> bool {
        // Runs of a remote pool wait for a machine: the scheduler hands
        // them over. Local runs may take the slots that are free now.
        let local = spec.pool == LOCAL_POOL;
        let start = if local && self.running.load(Ordering::Acquire) {
            let mut st = self.lock();
            let free = (spec.concurrency as usize)
                .saturating_sub(st.inflight.busy(&spec.name))
                .min(self.slots.saturating_sub(st.inflight.local_busy()))
                .min(items.len());
            st.inflight.reserve(&spec.name, true, free);
            free
        } else {
            0
        };
        let mut held = Reserved {
            dispatcher: &self,
            job: &spec.name,
            local,
            n: start,
        };
        let received = SystemTime::now();
        let (ids, started) = match self
            .store
            .enqueue_starting(
                Batch {
                    job: &spec,
                    messages: &items,
                    now_ms: self.now_ms(),
                },
                start,
            )
            .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(job = spec.name, error = %e, "could not queue runs");
                return false;
            }
        };
        let mut new = 0;
        for (id, (msg, _)) in ids.iter().zip(&items) {
            log_queued(&spec.name, id, &msg.id);
            if let Enqueued::New(run) = id {
                new += 1;
                delivery_span(&spec.name, *run, msg, received);
            }
        }
        let left_queued = new > started.len();
        for run in started {
            let token = held.admit(run.id);
            self.launch(run, spec.clone(), token);
        }
        let unused = held.n > 0;
        drop(held);
        if left_queued || unused {
            // The runs are durable: the scheduler need not wait for the
            // ack's own commit (a redelivery is caught by dedup).
            self.wake.notify_one();
        }
        true
    }

    /// Queues a run for a message given by hand (`pubrun jobs trigger`).
    pub async fn trigger(
        &self,
        job: &str,
        data: Vec<u8>,
        attributes: BTreeMap<String, String>,
    ) -> Result<i64> {
        let spec = self.job(job)?;
        let now = self.now_ms();
        let msg = SourceMessage {
            id: format!(
                "manual-{now}-{}",
                self.trigger_seq.fetch_add(1, Ordering::Relaxed)
            ),
            data,
            attributes,
            publish_time: rfc3339_nanos(now * 1_000_000),
            ordering_key: String::new(),
        };
        let key = msg.id.clone();
        let received = SystemTime::now();
        let r = self.store.enqueue(&spec, &msg, &key, now).await?;
        log_queued(&spec.name, &r, &msg.id);
        // The run span's parent, as for a delivered message.
        if let Enqueued::New(run) = &r {
            delivery_span(&spec.name, *run, &msg, received);
        }
        self.wake.notify_one();
        match r {
            Enqueued::New(id) | Enqueued::Duplicate(id) => Ok(id),
        }
    }

    /// Cancels a run: a queued one (also one waiting for a retry) at once,
    /// a starting or running one via its executor. FAILED_PRECONDITION when
    /// the run has already ended.
    ///
    /// Races with claims are settled in the run store: the cancel flag is
    /// set first, and no claim takes a flagged queued run, so either the run
    /// is still queued (and ends here) or it was claimed. A claimed run whose
    /// cancel switch is not registered yet (its claim just committed) is
    /// marked, and gets its switch already cancelled (see `slots`).
    pub async fn cancel_run(&self, id: i64) -> Result<RunRecord> {
        let run = self.store.request_cancel(id).await?;
        let has_result = self
            .lock()
            .jobs
            .get(&run.job)
            .is_some_and(|j| !j.spec.result_topic.is_empty());
        let exit = Exit::failed(EndCause::Cancelled, "cancelled before it started");
        if self
            .store
            .cancel_if_queued(
                id,
                RunEnd {
                    exit: &exit,
                    now_ms: self.now_ms(),
                    has_result_topic: has_result,
                },
            )
            .await?
        {
            run_ended(&run, &exit, self.now_ms());
            self.discard_work_dir(id);
            self.results_wake.notify_one();
        } else {
            self.lock().inflight.cancel(id);
        }
        let now = self.store.get(id).await?;
        if !matches!(now.status, RunStatus::Starting | RunStatus::Running) {
            // Ended, or queued again with its flag set (never claimed):
            // nothing will be admitted to take the mark.
            self.lock().inflight.forget_mark(id);
        }
        Ok(now)
    }

    /// [`cancel_run`](Self::cancel_run) for synchronous callers. Blocks the
    /// thread: call it from a multi-threaded runtime or a blocking thread.
    pub fn cancel(&self, id: i64) -> Result<RunRecord> {
        let handle = tokio::runtime::Handle::current();
        tokio::task::block_in_place(|| handle.block_on(self.cancel_run(id)))
    }
}

/// Slots reserved for a claim; those no run took are given back on drop
/// (also when the claim failed or panicked).
pub(super) struct Reserved<'a> {
    pub dispatcher: &'a Dispatcher,
    pub job: &'a str,
    pub local: bool,
    pub n: usize,
}

impl Reserved<'_> {
    /// A claimed run takes one reserved slot and gets its cancel switch.
    pub fn admit(&mut self, id: i64) -> CancellationToken {
        self.n = self.n.saturating_sub(1);
        self.dispatcher
            .lock()
            .inflight
            .admit(id, self.job, self.local)
    }
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        let n = std::mem::take(&mut self.n);
        self.dispatcher
            .lock()
            .inflight
            .unreserve(self.job, self.local, n);
    }
}

/// The run-store view of a delivered message and its dedup key.
pub(super) fn source_and_key(spec: &JobSpec, d: &Delivered) -> (SourceMessage, String) {
    let m = &d.message;
    let msg = SourceMessage {
        id: m.id(),
        data: m.data.to_vec(),
        attributes: m.attributes.clone(),
        publish_time: rfc3339_nanos(m.publish_time_nanos),
        ordering_key: m.ordering_key.clone(),
    };
    let key = dedup_key(spec, &msg);
    (msg, key)
}

/// A message's dedup key: the job's `dedup_key` rendered, else its id.
pub(super) fn dedup_key(spec: &JobSpec, msg: &SourceMessage) -> String {
    if spec.dedup_key.is_empty() {
        msg.id.clone()
    } else {
        let ctx = TemplateContext::from_message(
            &msg.data,
            msg.attributes.clone(),
            msg.id.clone(),
            msg.publish_time.clone(),
            msg.ordering_key.clone(),
        );
        // A key that cannot be rendered falls back to the message id: the
        // run is still created and its failure will say what is missing.
        // Even a panic must not leave the message unacked: it would come
        // back, and fail the same way, forever.
        let rendered = std::panic::catch_unwind(|| template::render(&spec.dedup_key, &ctx));
        match rendered {
            // PostgreSQL text cannot hold NUL (an object name can): every
            // engine stores the same key, with NUL as U+FFFD.
            Ok(Ok(k)) => k.replace('\0', "\u{FFFD}"),
            Ok(Err(e)) => {
                tracing::warn!(job = spec.name, message = msg.id, error = %e, "dedup_key cannot be rendered; using the message id");
                msg.id.clone()
            }
            Err(p) => {
                tracing::error!(
                    job = spec.name,
                    message = msg.id,
                    error = panic_message(&*p),
                    "dedup_key rendering panicked; using the message id"
                );
                msg.id.clone()
            }
        }
    }
}
