//! Agents joining a pool: bootstrap tokens, registration, sessions and
//! the names machines go by.

use super::leases::poll_hold;
use super::*;

impl Pools {
    /// A one-time bootstrap token for a machine this server starts: its
    /// instance metadata carries it instead of the pool token, so what
    /// anyone reading the metadata later finds is useless once the agent
    /// has joined.
    pub async fn mint_bootstrap(&self, machine: &str, pool: &str) -> Result<String, String> {
        let token = random_token()?;
        self.inner
            .store
            .put_bootstrap(&Bootstrap {
                machine: machine.to_string(),
                pool: pool.to_string(),
                token: token.clone(),
            })
            .await
            .map_err(|e| e.to_string())?;
        self.inner
            .lock()
            .bootstraps
            .insert(machine.to_string(), (pool.to_string(), token.clone()));
        Ok(token)
    }

    /// Whether `token` is the unused bootstrap token of machine `name` of `pool`.
    pub(super) fn bootstrap_matches(&self, name: &str, pool: &str, token: &str) -> bool {
        self.inner
            .lock()
            .bootstraps
            .get(name)
            .is_some_and(|(p, b)| {
                p == pool && pubrun_core::secret::verify_bearer(b.as_bytes(), token.as_bytes())
            })
    }

    /// The agent `name` has called with the pool token it was handed: its
    /// bootstrap token is used up.
    pub(super) async fn bootstrap_used(&self, name: &str) {
        let had = self.inner.lock().bootstraps.remove(name).is_some();
        if had {
            if let Err(e) = self.inner.store.delete_bootstrap(name).await {
                tracing::warn!(machine = name, error = %e, "cannot drop a used bootstrap token");
            }
        }
    }

    pub(super) fn check_token(&self, pool: &str, token: &str) -> Result<PoolSpec, AgentError> {
        let st = self.inner.lock();
        let Some(p) = st.pools.get(pool) else {
            return Err(AgentError::Unauthorized(format!(
                "pool {pool} is not declared on this server"
            )));
        };
        if !p.spec.provider.on_demand()
            && !matches!(p.spec.provider, pubrun_core::pool::ProviderSpec::Agents)
        {
            return Err(AgentError::Invalid(format!(
                "pool {pool} is a {} pool: agents cannot join it",
                p.spec.provider.kind()
            )));
        }
        if !pubrun_core::secret::verify_bearer(p.token.as_bytes(), token.as_bytes()) {
            return Err(AgentError::Unauthorized(format!(
                "wrong token for pool {pool}"
            )));
        }
        Ok(p.spec.clone())
    }

    /// The pool of the agent `c.name`, if `c` carries its pool's token and
    /// its current session.
    pub(super) async fn agent_pool(&self, c: &Creds<'_>) -> Result<String, AgentError> {
        let (pool, session_ok) = {
            let st = self.inner.lock();
            let a = st.agents.get(c.name).ok_or_else(|| {
                AgentError::UnknownAgent(format!("agent {} is not registered", c.name))
            })?;
            (
                a.pool.clone(),
                pubrun_core::secret::verify_bearer(a.session.as_bytes(), c.session.as_bytes()),
            )
        };
        self.check_token(&pool, c.token)?;
        if !session_ok {
            return Err(AgentError::BadSession(format!(
                "no valid session for agent {} (header {SESSION_HEADER}): register again",
                c.name
            )));
        }
        // Its registration's answer (with the pool token) has arrived.
        self.bootstrap_used(c.name).await;
        Ok(pool)
    }

    /// Checks an agent's credentials (before its body is read).
    pub(crate) async fn check_agent(&self, c: &Creds<'_>) -> Result<(), AgentError> {
        self.agent_pool(c).await.map(|_| ())
    }

    /// Registers an agent and hands it a fresh session. A name held by an
    /// agent heard from within the pool's `lease_timeout` is refused
    /// (`NameTaken`) unless the caller presents that agent's session; once
    /// that agent has been silent longer, it is treated as lost (its leases
    /// are taken back) and the name is free.
    pub async fn register(
        &self,
        r: Register,
        token: &str,
        session: Option<&str>,
    ) -> Result<Registered, AgentError> {
        validate_agent_name(&r.name)?;
        if r.slots == 0 || r.slots > 1000 {
            return Err(AgentError::Invalid("slots must be 1..1000".into()));
        }
        // The pool token, or (once) the machine's bootstrap token, which
        // the answer trades for the pool token.
        let (spec, handed) = match self.check_token(&r.pool, token) {
            Ok(spec) => (spec, None),
            Err(AgentError::Unauthorized(m)) => {
                if !self.bootstrap_matches(&r.name, &r.pool, token) {
                    return Err(AgentError::Unauthorized(m));
                }
                let pool_token = self.token(&r.pool).ok_or(AgentError::Unauthorized(m))?;
                (self.check_token(&r.pool, &pool_token)?, Some(pool_token))
            }
            Err(e) => return Err(e),
        };
        let now = self.now_ms();
        let existing = self.machine(&r.name).await.map_err(AgentError::Internal)?;
        if let Some(m) = &existing {
            if m.pool != r.pool {
                return Err(AgentError::Invalid(format!(
                    "machine {} belongs to pool {}, not {}",
                    r.name, m.pool, r.pool
                )));
            }
        }
        if spec.provider.on_demand() && existing.is_none() {
            return Err(AgentError::Invalid(format!(
                "pool {} starts its own machines; {} is not one of them",
                r.pool, r.name
            )));
        }
        let new_session = random_token().map_err(AgentError::Internal)?;
        self.claim_name(&r, &new_session, session, now).await?;
        let recorded = self.record_registered(&r, &spec, now).await;
        if let Err(e) = recorded {
            // Give the name back: this registration did not happen.
            let mut st = self.inner.lock();
            if st
                .agents
                .get(&r.name)
                .is_some_and(|a| a.session == new_session)
            {
                st.agents.remove(&r.name);
            }
            return Err(AgentError::Internal(e));
        }
        tracing::info!(
            agent = r.name,
            pool = r.pool,
            slots = r.slots,
            "agent registered"
        );
        self.refresh_machine(&r.name).await;
        Ok(Registered {
            lease_timeout_secs: spec.lease_timeout.as_secs_f64(),
            poll_secs: poll_hold(&spec).as_secs_f64(),
            session: new_session,
            token: handed,
        })
    }

    /// The machine of a registered agent is up (its row read again: taking
    /// the name over from a lost agent may have just changed it).
    pub(super) async fn record_registered(
        &self,
        r: &Register,
        spec: &PoolSpec,
        now: i64,
    ) -> Result<(), String> {
        let mut m = self.machine(&r.name).await?.unwrap_or(MachineRow {
            name: r.name.clone(),
            pool: r.pool.clone(),
            provider: spec.provider.kind().to_string(),
            provider_id: String::new(),
            state: MachineState::Provisioning,
            state_since_ms: now,
            idle_since_ms: None,
            created_ms: now,
            cordoned: false,
            slots: r.slots,
            last_error: String::new(),
            needs_stop: false,
        });
        m.slots = r.slots;
        if !matches!(
            m.state,
            MachineState::Ready | MachineState::Busy | MachineState::Idle
        ) {
            m.set_state(MachineState::Ready, now)
                .map_err(|e| format!("machine {}: {e}", m.name))?;
            m.idle_since_ms = Some(now);
            m.last_error.clear();
            m.needs_stop = false;
        }
        self.put_machine(&m).await?;
        self.inner
            .store
            .span_open(&m.name, &m.pool, now)
            .await
            .map_err(|e| format!("opening the cost span of machine {}: {e}", m.name))
    }

    /// Takes the name `r.name` for a new session, in one step under the
    /// lock so two registrations cannot both win.
    pub(super) async fn claim_name(
        &self,
        r: &Register,
        new_session: &str,
        presented: Option<&str>,
        now: i64,
    ) -> Result<(), AgentError> {
        enum Holder {
            Free,
            /// The live holder itself (it presented its session).
            Itself,
            Live {
                silent_ms: i64,
                timeout_ms: i64,
            },
            /// Silent past its lease timeout: lost.
            Lost,
        }
        let holder = |st: &State| match st.agents.get(&r.name) {
            None => Holder::Free,
            Some(a) => {
                let timeout_ms = st
                    .pools
                    .get(&a.pool)
                    .map_or(30_000, |p| p.spec.lease_timeout.as_millis() as i64);
                let silent_ms = now - a.last_seen_ms;
                if a.polling == 0 && silent_ms > timeout_ms {
                    Holder::Lost
                } else if presented.is_some_and(|s| {
                    pubrun_core::secret::verify_bearer(a.session.as_bytes(), s.as_bytes())
                }) {
                    Holder::Itself
                } else {
                    Holder::Live {
                        silent_ms,
                        timeout_ms,
                    }
                }
            }
        };
        let entry = AgentEntry {
            pool: r.pool.clone(),
            session: new_session.to_string(),
            slots: r.slots,
            labels: r.labels.clone(),
            last_seen_ms: now,
            polling: 0,
            registered_ms: now,
            version: r.version.clone(),
        };
        let taken = |silent_ms: i64, timeout_ms: i64| {
            AgentError::NameTaken(format!(
                "agent name {} belongs to a live agent (heard from {} s ago); it is free once that agent has been silent for {} s",
                r.name,
                silent_ms.max(0) / 1000,
                timeout_ms / 1000
            ))
        };
        {
            let mut st = self.inner.lock();
            match holder(&st) {
                Holder::Free | Holder::Itself => {
                    st.agents.insert(r.name.clone(), entry);
                    return Ok(());
                }
                Holder::Live {
                    silent_ms,
                    timeout_ms,
                } => return Err(taken(silent_ms, timeout_ms)),
                Holder::Lost => {}
            }
        }
        // Lost, as the sweep would find it: its leases are taken back (and
        // its session dropped) before the name changes hands.
        self.sweep(now).await;
        let mut st = self.inner.lock();
        match holder(&st) {
            Holder::Live {
                silent_ms,
                timeout_ms,
            } => Err(taken(silent_ms, timeout_ms)),
            _ => {
                st.agents.insert(r.name.clone(), entry);
                Ok(())
            }
        }
    }

    /// Forgets the agent of a machine that was stopped or deleted.
    pub(crate) fn forget_agent(&self, name: &str) {
        self.inner.lock().agents.remove(name);
    }
}

/// 32 random bytes from the operating system's CSPRNG, hex (pool tokens,
/// agent sessions). No fallback: without randomness there is no secret.
pub(crate) fn random_token() -> Result<String, String> {
    token_from(getrandom::fill)
}

fn token_from(
    fill: impl FnOnce(&mut [u8]) -> Result<(), getrandom::Error>,
) -> Result<String, String> {
    let mut buf = [0u8; 32];
    fill(&mut buf).map_err(|e| {
        format!("cannot generate a secret token: no randomness from the operating system: {e}")
    })?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// The credentials of an agent's call after register, all from headers.
pub struct Creds<'a> {
    pub name: &'a str,
    pub token: &'a str,
    pub session: &'a str,
}

/// Agent names become machine names, log lines and label values: 1-63 of
/// `A-Z a-z 0-9 . _ -`.
pub fn validate_agent_name(name: &str) -> Result<(), AgentError> {
    let ok = (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(AgentError::Invalid(format!(
            "agent name {name:?} is not valid: use 1-63 of A-Z a-z 0-9 . _ -"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_a_failing_generator_is_an_error() {
        let a = random_token().unwrap();
        let b = random_token().unwrap();
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        assert_ne!(a, "0".repeat(64));
        // No randomness: an error, never a predictable token.
        let e = token_from(|_| Err(getrandom::Error::UNSUPPORTED)).unwrap_err();
        assert!(e.contains("randomness"), "{e}");
    }

    #[test]
    fn agent_names_are_checked() {
        for ok in ["a", "pubrun-big-12", "host.example_1", &"x".repeat(63)] {
            assert!(validate_agent_name(ok).is_ok(), "{ok:?}");
        }
        for bad in ["", "a b", "a\nb", "bell\u{7}", "a/b", "é", &"x".repeat(64)] {
            assert!(validate_agent_name(bad).is_err(), "{bad:?}");
        }
    }
}
