//! Polls and leases: an agent with a free slot takes a waiting attempt
//! under a fresh fencing token, then reports on it.

use super::*;

impl Pools {
    pub async fn poll(&self, c: &Creds<'_>, p: Poll) -> Result<PollReply, AgentError> {
        let pool = self.agent_pool(c).await?;
        if p.name != c.name {
            return Err(AgentError::Invalid(format!(
                "poll names agent {} but header {AGENT_HEADER} says {}",
                p.name, c.name
            )));
        }
        let hold = {
            let st = self.inner.lock();
            st.pools
                .get(&pool)
                .map(|e| poll_hold(&e.spec))
                .unwrap_or(POLL_HOLD)
        };
        let _open = OpenPoll::new(self.clone(), p.name.clone());
        let deadline = tokio::time::Instant::now() + hold;
        loop {
            // Register interest before looking, so a wake in between is kept.
            let notified = self.inner.work.notified();
            let reply = self.poll_once(&p, &pool).await?;
            if !reply.assign.is_empty() || !reply.cancel.is_empty() || !reply.revoked.is_empty() {
                return Ok(reply);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(reply);
            }
        }
    }

    pub(super) async fn poll_once(&self, p: &Poll, pool: &str) -> Result<PollReply, AgentError> {
        let now = self.now_ms();
        let cordoned = self
            .machine(&p.name)
            .await
            .map_err(AgentError::Internal)?
            .is_some_and(|m| m.cordoned || !m.state.is_up() || m.state == MachineState::Stopping);
        let mut reply = PollReply {
            cordoned,
            ..Default::default()
        };
        let unknown: Vec<u64> = {
            let mut st = self.inner.lock();
            if let Some(a) = st.agents.get_mut(&p.name) {
                a.last_seen_ms = now;
            }
            let mut unknown = Vec::new();
            for &token in &p.leases {
                match st.leases.get(&token) {
                    Some(l) if l.machine == p.name => {}
                    Some(_) => reply.revoked.push(token),
                    None => unknown.push(token),
                }
            }
            unknown
        };
        // Not followed in memory: after a restart one may be waiting to be
        // re-attached; only the store knows.
        for token in unknown {
            match self.inner.store.lease(token).await {
                Ok(Some(row)) if row.state.is_active() && row.machine == p.name => {}
                Ok(_) => reply.revoked.push(token),
                Err(e) => return Err(AgentError::Internal(e.to_string())),
            }
        }
        // Attempts for the free slots, out of the queue; each is handed out
        // only once its lease is written.
        let taken: Vec<Pending> = {
            let mut st = self.inner.lock();
            for (token, l) in st.leases.iter_mut() {
                if l.machine == p.name && l.cancel_requested && !l.cancel_sent {
                    l.cancel_sent = true;
                    reply.cancel.push(*token);
                }
            }
            // The poll's own count dates from when it was sent; a long poll
            // may have been held since. Runs that ended meanwhile (reported,
            // so no longer leased here) free their slots now, or an agent
            // with full slots would wait out the whole hold per run.
            let slots = st.agents.get(&p.name).map_or(0, |a| a.slots);
            let live = st.leases.values().filter(|l| l.machine == p.name).count() as u32;
            let free = p.free_slots.max(slots.saturating_sub(live));
            let mut taken = Vec::new();
            while (taken.len() as u32) < free && !cordoned {
                let Some(pending) = st.waiting.get_mut(pool).and_then(|q| q.pop_front()) else {
                    break;
                };
                if pending.events.is_closed() {
                    continue; // its run was cancelled or the server is stopping
                }
                taken.push(pending);
            }
            taken
        };
        let mut assigned = Vec::new();
        let mut unassigned = Vec::new();
        let mut taken = taken.into_iter();
        while let Some(pending) = taken.next() {
            let req = &pending.req;
            let lease = NewLease {
                run_id: &req.run_id,
                job: &req.job,
                attempt: req.attempt,
                pool,
                machine: &p.name,
                now_ms: now,
            };
            match self.inner.store.new_lease(&lease).await {
                Ok(token) => assigned.push((token, pending)),
                Err(e) => {
                    tracing::warn!(pool, machine = p.name, error = %e, "cannot write a lease; the run waits");
                    unassigned.push(pending);
                    unassigned.extend(taken.by_ref());
                }
            }
        }
        {
            let mut st = self.inner.lock();
            if !unassigned.is_empty() {
                // Back to the front of the queue, in their order.
                let q = st.waiting.entry(pool.to_string()).or_default();
                for pending in unassigned.into_iter().rev() {
                    q.push_front(pending);
                }
            }
            for (token, pending) in assigned {
                let req = &pending.req;
                reply.assign.push(Assignment {
                    lease: token,
                    run_id: req.run_id.clone(),
                    job: req.job.clone(),
                    attempt: req.attempt,
                    spec: req.spec.clone(),
                    timeout_secs: req.timeout.as_secs_f64(),
                    grace_secs: req.grace_period.as_secs_f64(),
                    env: req.env.clone(),
                    secrets: req.secrets.clone(),
                    server_workdir: req.workdir.display().to_string(),
                    outputs: req.outputs.clone(),
                    log_limit: pending.log.limit(),
                });
                // Sent and followed under one lock: a cancel that comes
                // with `Assigned` finds the lease.
                let _ = pending.events.send(Event::Assigned {
                    token,
                    machine: p.name.clone(),
                });
                st.leases.insert(
                    token,
                    LiveLease {
                        pool: pool.to_string(),
                        machine: p.name.clone(),
                        workdir: pending.req.workdir.clone(),
                        outputs: pending.req.outputs.clone(),
                        log: pending.log,
                        log_received: 0,
                        log_resync: false,
                        events: pending.events,
                        cancel_requested: false,
                        cancel_sent: false,
                    },
                );
            }
        }
        if !reply.assign.is_empty() {
            self.refresh_machine(&p.name).await;
        }
        Ok(reply)
    }

    /// The live lease `token` held by agent `name`, checked against the
    /// database: `Fenced` when it is no longer honoured.
    pub(crate) async fn live<T>(
        &self,
        c: &Creds<'_>,
        lease: u64,
        f: impl FnOnce(&mut LiveLease) -> T,
    ) -> Result<T, AgentError> {
        let name = c.name;
        let _pool = match self.agent_pool(c).await {
            Ok(p) => p,
            // An agent forgotten for its silence (or whose name another
            // agent has since taken) comes back: the leases it held were
            // taken back, so it gets 409 for them (not 404/401, which it
            // would retry until it registers again). A live lease of the
            // name stays out of its reach.
            Err(e @ (AgentError::UnknownAgent(_) | AgentError::BadSession(_))) => {
                return match self.stored_lease(lease).await? {
                    Some(row) if row.machine == name && !row.state.is_active() => {
                        self.check_token(&row.pool, c.token)?;
                        Err(AgentError::Fenced(format!(
                            "lease {lease} is no longer {name}'s ({})",
                            if row.reason.is_empty() {
                                "-"
                            } else {
                                &row.reason
                            }
                        )))
                    }
                    _ => Err(e),
                };
            }
            Err(e) => return Err(e),
        };
        {
            let mut st = self.inner.lock();
            if let Some(l) = st.leases.get_mut(&lease) {
                if l.machine != name {
                    return Err(AgentError::Fenced(format!(
                        "lease {lease} belongs to {}",
                        l.machine
                    )));
                }
                return Ok(f(l));
            }
        }
        match self.stored_lease(lease).await? {
            Some(row) if row.state.is_active() && row.machine == name => Err(AgentError::NotReady(
                format!("lease {lease} is being recovered after a server restart; try again"),
            )),
            Some(row) => Err(AgentError::Fenced(format!(
                "lease {lease} is {} ({}); the run is no longer yours",
                match row.state {
                    LeaseState::Done => "already reported",
                    _ => "revoked",
                },
                if row.reason.is_empty() {
                    "-"
                } else {
                    &row.reason
                }
            ))),
            None => Err(AgentError::Fenced(format!("no lease {lease}"))),
        }
    }

    pub(super) async fn stored_lease(
        &self,
        lease: u64,
    ) -> Result<Option<crate::db::LeaseRow>, AgentError> {
        self.inner
            .store
            .lease(lease)
            .await
            .map_err(|e| AgentError::Internal(e.to_string()))
    }

    pub async fn started(
        &self,
        c: &Creds<'_>,
        lease: u64,
        handle: String,
    ) -> Result<(), AgentError> {
        self.live(c, lease, |_| ()).await?;
        self.inner
            .store
            .lease_started(lease, self.now_ms())
            .await
            .map_err(|e| AgentError::Internal(e.to_string()))?;
        self.live(c, lease, |l| {
            let _ = l.events.send(Event::Started { handle });
        })
        .await
    }

    /// Appends log bytes starting at `offset`; returns the new total. Bytes
    /// already received (a retried call) are skipped.
    pub async fn log(
        &self,
        c: &Creds<'_>,
        lease: u64,
        offset: u64,
        bytes: &[u8],
    ) -> Result<u64, AgentError> {
        let (log, received) = self
            .live(c, lease, |l| {
                if l.log_resync {
                    l.log_resync = false;
                    l.log_received = offset;
                }
                (l.log.clone(), l.log_received)
            })
            .await?;
        if offset > received {
            return Err(AgentError::Invalid(format!(
                "log offset {offset} is past the {received} bytes received; resend from {received}"
            )));
        }
        let skip = (received - offset) as usize;
        if skip < bytes.len() {
            log.write(&bytes[skip..]).await;
        }
        let total = offset.max(received) + bytes.len().saturating_sub(skip) as u64;
        let total = total.max(received);
        self.live(c, lease, |l| {
            l.log_received = l.log_received.max(total);
            l.log_received
        })
        .await
    }

    pub async fn report(&self, c: &Creds<'_>, lease: u64, exit: Exit) -> Result<(), AgentError> {
        self.live(c, lease, |_| ()).await?;
        let ok = self
            .inner
            .store
            .lease_end(lease, LeaseEnd::Done(&exit), self.now_ms())
            .await
            .map_err(|e| AgentError::Internal(e.to_string()))?;
        if !ok {
            return Err(AgentError::Fenced(format!("lease {lease} was revoked")));
        }
        let l = self.inner.lock().leases.remove(&lease);
        if let Some(l) = l {
            let _ = l.events.send(Event::Ended(exit));
        }
        // A slot is free: the agent's held poll may take the next run.
        self.inner.work.notify_waiters();
        self.refresh_machine(c.name).await;
        Ok(())
    }
}

pub(super) fn poll_hold(spec: &PoolSpec) -> Duration {
    (spec.lease_timeout / 3).clamp(Duration::from_secs(1), POLL_HOLD)
}

/// Marks an agent as polling for as long as the poll is open.
struct OpenPoll {
    pools: Pools,
    name: String,
}

impl OpenPoll {
    pub(super) fn new(pools: Pools, name: String) -> Self {
        if let Some(a) = pools.inner.lock().agents.get_mut(&name) {
            a.polling += 1;
        }
        OpenPoll { pools, name }
    }
}

impl Drop for OpenPoll {
    fn drop(&mut self) {
        let now = self.pools.now_ms();
        if let Some(a) = self.pools.inner.lock().agents.get_mut(&self.name) {
            a.polling = a.polling.saturating_sub(1);
            a.last_seen_ms = now;
        }
    }
}
