//! The sweeper: expires leases and agents that stopped reporting, and
//! moves machines along their lifecycle.

use super::*;

impl Pools {
    /// Takes back leases whose agent has not been heard of for the pool's
    /// lease timeout, and forgets silent agents. Called every second.
    pub async fn sweep(&self, now: i64) {
        let mut expired = Vec::new();
        let mut lost_agents = Vec::new();
        {
            let st = self.inner.lock();
            for (name, a) in &st.agents {
                let Some(p) = st.pools.get(&a.pool) else {
                    continue;
                };
                let timeout = p.spec.lease_timeout.as_millis() as i64;
                if a.polling == 0 && now - a.last_seen_ms > timeout {
                    lost_agents.push((name.clone(), now - a.last_seen_ms));
                }
            }
            for (token, l) in &st.leases {
                let seen = st
                    .agents
                    .get(&l.machine)
                    .map(|a| (a.polling, a.last_seen_ms));
                let timeout = st
                    .pools
                    .get(&l.pool)
                    .map_or(30_000, |p| p.spec.lease_timeout.as_millis() as i64);
                let silent = match seen {
                    Some((polling, last)) => polling == 0 && now - last > timeout,
                    // Unknown agent (server restarted and it did not come back).
                    None => now - self.inner.boot_ms > timeout,
                };
                if silent {
                    expired.push((*token, l.machine.clone(), timeout));
                }
            }
        }
        // Machines that were up before a restart and whose agent has not
        // come back since: as lost as an agent that went silent.
        let machines = match self.machines().await {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(error = %e, "lease sweep cannot read machines");
                Vec::new()
            }
        };
        {
            let st = self.inner.lock();
            for m in machines {
                let up = matches!(
                    m.state,
                    MachineState::Ready | MachineState::Busy | MachineState::Idle
                );
                let timeout = st
                    .pools
                    .get(&m.pool)
                    .map_or(30_000, |p| p.spec.lease_timeout.as_millis() as i64);
                let silent_ms = now - self.inner.boot_ms.max(m.state_since_ms);
                if up && !st.agents.contains_key(&m.name) && silent_ms > timeout {
                    lost_agents.push((m.name, silent_ms));
                }
            }
        }
        for (token, machine, timeout) in expired {
            let reason = format!("machine {machine} not heard from for {} s", timeout / 1000);
            match self
                .inner
                .store
                .lease_end(token, LeaseEnd::Revoked(&reason), now)
                .await
            {
                Ok(true) => {
                    tracing::warn!(
                        lease = token,
                        machine,
                        "lease expired; the run goes back to the queue"
                    );
                    let l = self.inner.lock().leases.remove(&token);
                    if let Some(l) = l {
                        let exit = if l.cancel_requested {
                            Exit::failed(EndCause::Cancelled, format!("cancelled; {reason}"))
                        } else {
                            Exit::failed(
                                EndCause::Lost,
                                format!("lost: {reason}; retrying on another machine"),
                            )
                        };
                        let _ = l.events.send(Event::Ended(exit));
                    }
                }
                Ok(false) => {
                    self.inner.lock().leases.remove(&token);
                }
                Err(e) => tracing::error!(lease = token, error = %e, "cannot revoke lease"),
            }
        }
        for (name, silent_ms) in lost_agents {
            self.inner.lock().agents.remove(&name);
            tracing::warn!(agent = name, silent_ms, "agent lost");
            let mut m = match self.machine(&name).await {
                Ok(Some(m)) => m,
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!(machine = name, error = %e, "cannot read a lost agent's machine");
                    continue;
                }
            };
            // Only a machine this agent serves: one (re)starting since
            // is waiting for its next agent (boot_timeout covers it).
            if matches!(
                m.state,
                MachineState::Ready | MachineState::Busy | MachineState::Idle
            ) {
                if let Err(e) = m.set_state(MachineState::Failed, now) {
                    tracing::error!(machine = name, error = %e, "cannot record a lost machine");
                    continue;
                }
                m.last_error = format!("agent not heard from for {} s", silent_ms / 1000);
                // Still up as far as we know (a partition): the autoscaler
                // stops it, and the cost span ends then.
                m.needs_stop = self.provider(&m.pool).is_some();
                if let Err(e) = self.put_machine(&m).await {
                    tracing::error!(machine = name, error = %e, "cannot record a lost machine");
                    continue;
                }
                if !m.needs_stop {
                    self.span_close_logged(&name, now).await;
                }
            }
        }
    }

    /// Keeps a machine's busy/idle state in line with its live leases.
    pub(crate) async fn refresh_machine(&self, name: &str) {
        let runs = self
            .inner
            .lock()
            .leases
            .values()
            .filter(|l| l.machine == name)
            .count();
        let mut m = match self.machine(name).await {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(machine = name, error = %e, "cannot read machine state");
                return;
            }
        };
        let want = if runs > 0 {
            MachineState::Busy
        } else {
            MachineState::Idle
        };
        if matches!(
            m.state,
            MachineState::Ready | MachineState::Busy | MachineState::Idle
        ) && m.state != want
        {
            let now = self.now_ms();
            if let Err(e) = m.set_state(want, now) {
                tracing::warn!(machine = name, error = %e, "cannot record machine state");
                return;
            }
            m.idle_since_ms = (runs == 0).then_some(now);
            if let Err(e) = self.put_machine(&m).await {
                tracing::warn!(machine = name, error = %e, "cannot record machine state");
            }
        }
    }

    /// Sets cordon (no new runs) on a machine.
    pub async fn cordon(&self, name: &str, on: bool) -> Result<MachineRow, String> {
        let mut m = self
            .machine(name)
            .await?
            .ok_or_else(|| format!("no machine {name}"))?;
        m.cordoned = on;
        self.put_machine(&m).await?;
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use pubrun_core::clock::ManualClock;
    use pubrun_core::pool::ProviderSpec;

    use super::*;
    use crate::protocol::Register;

    /// An agent is forgotten once it has been silent longer than its pool's
    /// lease timeout, by the pools' clock, and not a moment before.
    #[tokio::test]
    async fn a_silent_agent_is_forgotten_after_the_lease_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let store = pubrun_store::SqlitePoolStore::open(&dir.path().join("pools.db"))
            .await
            .unwrap();
        let clock = ManualClock::at_ms(1_000_000);
        let pools = Pools::with_clock(Arc::new(store), Arc::new(clock.clone()))
            .await
            .unwrap();
        pools
            .set_pools(vec![PoolSpec {
                name: "laptops".into(),
                provider: ProviderSpec::Agents,
                min_machines: 0,
                max_machines: 0,
                runs_per_machine: 1,
                idle_timeout: Duration::from_secs(300),
                delete_when_idle: false,
                price_per_hour: None,
                token_env: String::new(),
                lease_timeout: Duration::from_secs(30),
                boot_timeout: Duration::from_secs(300),
            }])
            .await
            .unwrap();
        let token = pools.token("laptops").unwrap();
        let register = Register {
            pool: "laptops".into(),
            name: "laptop-1".into(),
            slots: 1,
            labels: Default::default(),
            version: String::new(),
        };
        pools.register(register, &token, None).await.unwrap();

        clock.advance(Duration::from_secs(30));
        pools.sweep(pools.now_ms()).await;
        assert_eq!(pools.agents().await.unwrap().len(), 1, "at the timeout");

        clock.advance(Duration::from_millis(1));
        pools.sweep(pools.now_ms()).await;
        assert!(pools.agents().await.unwrap().is_empty(), "past it");
    }
}
