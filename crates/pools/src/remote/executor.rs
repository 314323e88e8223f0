//! [`PoolExecutor`]: the dispatcher's [`Executor`] for a remote pool.

use super::*;

/// The executor of one remote pool.
pub struct PoolExecutor {
    pub(super) pools: Pools,
    pub(super) pool: String,
}

impl PoolExecutor {
    async fn follow(
        &self,
        mut rx: mpsc::UnboundedReceiver<Event>,
        mut token: Option<u64>,
        waiting_seq: Option<u64>,
        log: Arc<LogSink>,
        cancel: CancellationToken,
        mut on_started: Option<OnStarted>,
    ) -> Exit {
        let mut machine = String::new();
        let mut cancel_sent = false;
        loop {
            tokio::select! {
                ev = rx.recv() => match ev {
                    Some(Event::Assigned { token: t, machine: m }) => {
                        token = Some(t);
                        log.note(&format!("leased to machine {m} (lease {t})")).await;
                        machine = m;
                        if cancel.is_cancelled() {
                            self.pools.request_cancel(t);
                            cancel_sent = true;
                        }
                    }
                    Some(Event::Started { handle }) => {
                        if let Some(f) = on_started.take() {
                            f(pubrun_exec::Started { machine: machine.clone(), handle: format!("lease {} {handle}", token.unwrap_or(0)) });
                        }
                    }
                    Some(Event::Ended(exit)) => return exit,
                    None => {
                        return Exit::failed(EndCause::Infrastructure, "pool executor stopped")
                    }
                },
                _ = cancel.cancelled(), if !cancel_sent => {
                    cancel_sent = true;
                    match token {
                        Some(t) => self.pools.request_cancel(t),
                        None => {
                            if waiting_seq.is_some_and(|s| self.pools.dequeue(&self.pool, s)) {
                                return Exit::failed(
                                    EndCause::Cancelled,
                                    "cancelled while waiting for a machine",
                                );
                            }
                            // Taken by a poll just now: `Assigned` is on its way.
                        }
                    }
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl Executor for PoolExecutor {
    async fn run(&self, a: Attempt) -> Exit {
        let waiting = format!("waiting for a machine of pool {}", self.pool);
        a.log.note(&waiting).await;
        let (seq, rx) = self.pools.enqueue(&self.pool, a.req, a.log.clone());
        self.follow(rx, None, Some(seq), a.log, a.cancel, Some(a.on_started))
            .await
    }

    async fn reattach(&self, a: Attempt) -> Option<Exit> {
        let Attempt {
            req, log, cancel, ..
        } = a;
        let row = match self.pools.inner.store.lease_of_run(&req.run_id).await {
            Ok(row) => row?,
            Err(e) => {
                tracing::error!(run = req.run_id, error = %e, "cannot read the run's lease");
                return None;
            }
        };
        if row.attempt != req.attempt {
            return None;
        }
        match row.state {
            LeaseState::Done => return row.exit,
            // Taken back from a silent machine: the same attempt runs again.
            LeaseState::Revoked => {
                return Some(Exit::failed(
                    EndCause::Lost,
                    format!(
                        "lost: lease {} on machine {} was taken back; retrying on another machine",
                        row.token, row.machine
                    ),
                ))
            }
            LeaseState::Assigned | LeaseState::Running => {}
        }
        let (tx, rx) = mpsc::unbounded_channel();
        self.pools.inner.lock().leases.insert(
            row.token,
            LiveLease {
                pool: self.pool.clone(),
                machine: row.machine.clone(),
                workdir: req.workdir.clone(),
                outputs: req.outputs.clone(),
                log: log.clone(),
                log_received: 0,
                log_resync: true,
                events: tx,
                cancel_requested: false,
                cancel_sent: false,
            },
        );
        log.note(&format!(
            "waiting for machine {} to report lease {}",
            row.machine, row.token
        ))
        .await;
        Some(
            self.follow(rx, Some(row.token), None, log, cancel, None)
                .await,
        )
    }
}

impl pubrun_exec::PoolRouter for Pools {
    fn executor(&self, pool: &str) -> Option<Arc<dyn Executor>> {
        Pools::executor(self, pool)
    }
}
