//! The autoscaler: once a second, per on-demand pool, compares runs waiting
//! with machines up (the pure decision is `pubrun_core::pool::autoscale`)
//! and asks the pool's provider to start or stop machines.
//!
//! Every machine state change is written to the pool store *before* the
//! provider is asked (and again after it answered), so a restarted server
//! knows what it started; and since the write is fenced in cluster mode, a
//! server that lost ownership (a partitioned ex-owner) has its write refused
//! and never asks the provider: it cannot start or delete machines.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use pubrun_core::pool::{autoscale, MachineState, MachineView, PoolSpec, ScaleAction};

use crate::db::MachineRow;
use crate::provider::{MachineLaunch, MachineProvider, ProviderError, ProviderStatus};
use crate::remote::Pools;

/// A machine in `stopping` this long is asked to stop again.
const STOP_RETRY_MS: i64 = 30_000;

impl Pools {
    /// Starts the lease sweeper and the autoscaler (both once a second).
    pub fn spawn(&self, shutdown: tokio_util::sync::CancellationToken) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.cancelled() => return,
                }
                let now = this.now_ms();
                this.sweep(now).await;
                for spec in this.specs() {
                    if let Some(provider) = this.provider(&spec.name) {
                        this.scale(&spec, provider, now).await;
                    }
                }
            }
        });
    }

    /// One autoscaling step for one pool.
    pub async fn scale(&self, spec: &PoolSpec, provider: Arc<dyn MachineProvider>, now: i64) {
        let machines: Vec<MachineRow> = match self.machines().await {
            Ok(m) => m.into_iter().filter(|m| m.pool == spec.name).collect(),
            Err(e) => {
                tracing::error!(pool = spec.name, error = %e, "autoscaler cannot read machines");
                return;
            }
        };
        let runs = self.runs_by_machine();
        let views: Vec<MachineView> = machines
            .iter()
            .map(|m| MachineView {
                name: m.name.clone(),
                state: m.state,
                runs: runs.get(&m.name).copied().unwrap_or(0),
                cordoned: m.cordoned,
                state_since_ms: m.state_since_ms,
                idle_since_ms: m.idle_since_ms,
            })
            .collect();
        // Machines stuck in `stopping` (the provider failed) are asked again;
        // failed machines that may still exist are stopped so they stop costing.
        for m in &machines {
            let stuck = m.state == MachineState::Stopping && now - m.state_since_ms > STOP_RETRY_MS;
            let failed_unstopped = m.state == MachineState::Failed && m.needs_stop;
            if stuck || failed_unstopped {
                self.stop_machine(
                    m.clone(),
                    provider.clone(),
                    spec.delete_when_idle,
                    "retry".into(),
                )
                .await;
            }
        }
        let waiting = self.waiting(&spec.name) as u32;
        for action in autoscale(spec, &views, waiting, now) {
            match action {
                ScaleAction::Start { count } => {
                    for _ in 0..count {
                        self.start_machine(spec, provider.clone(), now).await;
                    }
                }
                ScaleAction::Stop {
                    name,
                    delete,
                    reason,
                } => {
                    if let Some(m) = machines.iter().find(|m| m.name == name) {
                        let mut m = m.clone();
                        if m.state == MachineState::Provisioning {
                            // Did not join in time: failed, and stopped.
                            m.last_error = reason.clone();
                        }
                        self.stop_machine(m, provider.clone(), delete, reason).await;
                    }
                }
            }
        }
    }

    /// Records a new (or restarted) machine, then asks the provider to
    /// start it; when the record is refused (the store is down, or another
    /// server took ownership) the provider is not asked.
    pub(crate) async fn start_machine(
        &self,
        spec: &PoolSpec,
        provider: Arc<dyn MachineProvider>,
        now: i64,
    ) {
        let Some(token) = self.token(&spec.name) else {
            return;
        };
        // Restart a stopped machine (its disk and image are warm) when the
        // pool keeps them; a deleted machine is never brought back under its
        // old name: a new machine gets a name never used before, so it
        // cannot collide with one still being deleted, and its cost is its own.
        // Read afresh: a previous start of this pass took a stopped one.
        let reuse = if spec.delete_when_idle {
            None
        } else {
            match self.machines().await {
                Ok(m) => m.into_iter().find(|m| {
                    m.pool == spec.name && m.state == MachineState::Stopped && !m.cordoned
                }),
                Err(e) => {
                    tracing::error!(pool = spec.name, error = %e, "autoscaler cannot read machines");
                    return;
                }
            }
        };
        let name = match &reuse {
            Some(m) => m.name.clone(),
            None => match self
                .store()
                .new_machine_name(&spec.name, name_prefix(spec))
                .await
            {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!(pool = spec.name, error = %e, "cannot name a new machine; not starting one");
                    return;
                }
            },
        };
        let row = MachineRow {
            name: name.clone(),
            pool: spec.name.clone(),
            provider: provider.kind().to_string(),
            provider_id: reuse
                .as_ref()
                .map(|m| m.provider_id.clone())
                .unwrap_or_default(),
            state: MachineState::Provisioning,
            state_since_ms: now,
            idle_since_ms: None,
            created_ms: reuse.as_ref().map_or(now, |m| m.created_ms),
            cordoned: false,
            slots: spec.runs_per_machine,
            last_error: String::new(),
            needs_stop: false,
        };
        // Recorded before the provider is asked, so a crash in between
        // leaves a machine the next server finds (and times out if it never
        // joins), and a server whose write is refused starts nothing.
        if let Err(e) = self.put_machine(&row).await {
            tracing::error!(machine = name, error = %e, "cannot record a new machine; not starting it");
            return;
        }
        if let Err(e) = self.store().span_open(&name, &spec.name, now).await {
            // Without its cost span the machine is not started; it stays in
            // `provisioning` and its boot timeout clears it.
            tracing::error!(machine = name, error = %e, "cannot open the machine's cost span; not starting it");
            return;
        }
        tracing::info!(pool = spec.name, machine = name, "starting machine");
        // A Compute instance's metadata is readable by anything on it for
        // its whole life: it gets a one-time bootstrap token, new at every
        // start, not the pool token.
        let token = if provider.kind() == "gce" {
            match self.mint_bootstrap(&name, &spec.name).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!(machine = name, error = %e, "cannot make a bootstrap token");
                    return;
                }
            }
        } else {
            token
        };
        let launch = MachineLaunch {
            pool: spec.name.clone(),
            name: name.clone(),
            server_url: server_url(spec),
            token,
            slots: spec.runs_per_machine,
            labels: BTreeMap::from([("pubrun-pool".to_string(), spec.name.clone())]),
        };
        let this = self.clone();
        tokio::spawn(async move {
            let result = provider.start(&launch).await;
            this.started_machine(&launch.name, result).await;
        });
    }

    /// Records what the provider answered to a start.
    async fn started_machine(&self, name: &str, result: Result<String, ProviderError>) {
        let mut m = match self.machine(name).await {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(machine = name, error = %e, "cannot read a started machine");
                return;
            }
        };
        match result {
            Ok(id) => {
                m.provider_id = id;
                if let Err(e) = self.put_machine(&m).await {
                    tracing::error!(machine = name, error = %e, "cannot record the machine's provider id");
                }
            }
            Err(e) => {
                tracing::warn!(machine = name, error = %e, "machine did not start");
                let now = self.now_ms();
                if let Err(t) = m.set_state(MachineState::Failed, now) {
                    tracing::error!(machine = name, error = %t, "cannot record a failed start");
                    return;
                }
                m.last_error = e.to_string();
                // Refused or no capacity: nothing started, so nothing costs.
                // Any other failure may have left something running.
                let nothing_started =
                    matches!(e, ProviderError::Refused(_) | ProviderError::NoCapacity(_));
                m.needs_stop = !nothing_started;
                if let Err(e) = self.put_machine(&m).await {
                    tracing::error!(machine = name, error = %e, "cannot record a failed machine");
                    return;
                }
                if nothing_started {
                    self.span_close_logged(name, now).await;
                }
            }
        }
    }

    /// Records the machine as `stopping`, then asks the provider to stop
    /// (or delete) it; when the record is refused the provider is not asked.
    pub(crate) async fn stop_machine(
        &self,
        mut m: MachineRow,
        provider: Arc<dyn MachineProvider>,
        delete: bool,
        reason: String,
    ) {
        let now = self.now_ms();
        let failed = m.state == MachineState::Provisioning || m.state == MachineState::Failed;
        // Written every time, also when asking again (then `state_since_ms`
        // is when it was last asked): the fenced write is what allows the
        // provider call.
        if let Err(e) = m.set_state(MachineState::Stopping, now) {
            tracing::error!(machine = m.name, error = %e, "not stopping machine");
            return;
        }
        if let Err(e) = self.put_machine(&m).await {
            tracing::error!(machine = m.name, error = %e, "cannot record a stopping machine; not stopping it");
            return;
        }
        tracing::info!(machine = m.name, reason, delete, "stopping machine");
        let this = self.clone();
        tokio::spawn(async move {
            let result = provider.stop(&m.name, delete).await;
            this.stopped_machine(m, delete, failed, result).await;
        });
    }

    /// Records what the provider answered to a stop.
    async fn stopped_machine(
        &self,
        m: MachineRow,
        delete: bool,
        failed: bool,
        result: Result<(), ProviderError>,
    ) {
        let fresh = match self.machine(&m.name).await {
            Ok(fresh) => fresh,
            Err(e) => {
                tracing::error!(machine = m.name, error = %e, "cannot read a stopped machine");
                return;
            }
        };
        let mut m = fresh.unwrap_or(m);
        match result {
            Ok(()) => {
                let now = self.now_ms();
                self.span_close_logged(&m.name, now).await;
                // Its agent is gone with it: no longer listed.
                self.forget_agent(&m.name);
                if delete && !failed {
                    // Gone for good: the row goes (its spans and leases
                    // stay for cost and history; its name is never reused).
                    if let Err(e) = self.store().delete_machine(&m.name).await {
                        tracing::warn!(machine = m.name, error = %e, "cannot forget a deleted machine");
                    }
                    return;
                }
                let next = if failed {
                    MachineState::Failed
                } else {
                    MachineState::Stopped
                };
                if let Err(e) = m.set_state(next, now) {
                    tracing::error!(machine = m.name, error = %e, "cannot record a stopped machine");
                    return;
                }
                m.idle_since_ms = None;
                m.needs_stop = false;
                if !failed {
                    m.cordoned = false;
                }
                if let Err(e) = self.put_machine(&m).await {
                    tracing::error!(machine = m.name, error = %e, "cannot record a stopped machine");
                }
            }
            Err(e) => {
                tracing::warn!(machine = m.name, error = %e, "machine did not stop; will retry");
                m.last_error = e.to_string();
                if let Err(e) = self.put_machine(&m).await {
                    tracing::error!(machine = m.name, error = %e, "cannot record a failed stop");
                }
            }
        }
    }

    /// Drain: no new runs; the autoscaler stops the machine once it is empty
    /// (an agent of an `agents` pool just stops getting work).
    pub async fn drain(&self, name: &str) -> Result<MachineRow, String> {
        self.cordon(name, true).await
    }

    /// At boot: machines the provider no longer has are marked stopped or
    /// failed, so the autoscaler does not count them.
    pub async fn reconcile(&self) {
        for spec in self.specs() {
            let Some(provider) = self.provider(&spec.name) else {
                continue;
            };
            let machines = match self.machines().await {
                Ok(m) => m,
                Err(e) => {
                    tracing::error!(error = %e, "cannot reconcile machines");
                    return;
                }
            };
            for mut m in machines
                .into_iter()
                .filter(|m| m.pool == spec.name && m.state.is_up())
            {
                match provider.status(&m.name).await {
                    Ok(ProviderStatus::Gone | ProviderStatus::Stopped) => {
                        let now = self.now_ms();
                        let next = if m.state == MachineState::Stopping {
                            MachineState::Stopped
                        } else {
                            MachineState::Failed
                        };
                        if let Err(e) = m.set_state(next, now) {
                            tracing::error!(machine = m.name, error = %e, "cannot record a machine gone while the server was down");
                            continue;
                        }
                        m.last_error = "gone while the server was down".into();
                        m.needs_stop = false;
                        if let Err(e) = self.put_machine(&m).await {
                            tracing::error!(machine = m.name, error = %e, "cannot record a machine gone while the server was down");
                            continue;
                        }
                        self.span_close_logged(&m.name, now).await;
                        // A dead container or instance is still there to
                        // be removed when the pool deletes idle machines.
                        if spec.delete_when_idle {
                            match provider.stop(&m.name, true).await {
                                // It was being deleted when the server went down.
                                Ok(()) if m.state == MachineState::Stopped => {
                                    if let Err(e) = self.store().delete_machine(&m.name).await {
                                        tracing::warn!(machine = m.name, error = %e, "cannot forget a deleted machine");
                                    }
                                }
                                Ok(()) => {}
                                Err(e) => {
                                    tracing::warn!(machine = m.name, error = %e, "cannot delete a dead machine")
                                }
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(machine = m.name, error = %e, "cannot check machine"),
                }
            }
        }
    }
}

/// Machines are named `{prefix}-{pool}-{n}`: a gce pool's `name_prefix`,
/// else `pubrun`.
fn name_prefix(spec: &PoolSpec) -> &str {
    match &spec.provider {
        pubrun_core::pool::ProviderSpec::Gce(g) if !g.name_prefix.is_empty() => &g.name_prefix,
        _ => pubrun_core::pool::DEFAULT_NAME_PREFIX,
    }
}

fn server_url(spec: &PoolSpec) -> String {
    match &spec.provider {
        pubrun_core::pool::ProviderSpec::Docker(d) => d.server_url.clone(),
        pubrun_core::pool::ProviderSpec::Gce(g) => g.server_url.clone(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use pubrun_core::pool::{DockerProviderSpec, GceProviderSpec, ProviderSpec};

    use super::*;
    use crate::protocol::Register;

    /// A provider that starts and deletes at once, and remembers the names.
    #[derive(Default)]
    struct Instant {
        started: Mutex<Vec<String>>,
        stopped: Mutex<Vec<String>>,
    }

    #[async_trait::async_trait]
    impl MachineProvider for Instant {
        fn kind(&self) -> &'static str {
            "docker"
        }
        async fn start(&self, l: &MachineLaunch) -> Result<String, ProviderError> {
            self.started.lock().unwrap().push(l.name.clone());
            Ok(format!("id-{}", l.name))
        }
        async fn stop(&self, name: &str, _: bool) -> Result<(), ProviderError> {
            self.stopped.lock().unwrap().push(name.to_string());
            Ok(())
        }
        async fn status(&self, _: &str) -> Result<ProviderStatus, ProviderError> {
            Ok(ProviderStatus::Running)
        }
        async fn list(&self, _: &str) -> Result<Vec<(String, ProviderStatus)>, ProviderError> {
            Ok(Vec::new())
        }
    }

    /// Waits (bounded) until the pool's machine rows satisfy `ok`: the
    /// provider calls run in spawned tasks.
    async fn machines_until(pools: &Pools, ok: impl Fn(&[MachineRow]) -> bool) -> Vec<MachineRow> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let m = pools.machines().await.unwrap();
            if ok(&m) {
                return m;
            }
            assert!(tokio::time::Instant::now() < deadline, "machines: {m:#?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Issue 11 item 4: two machines, both deleted, two more: the new ones
    /// get new names (the old ones may still be in the middle of being
    /// deleted), each machine keeps its own cost row, and the agents of
    /// deleted machines are not listed.
    #[tokio::test]
    async fn scaling_up_again_from_zero_never_reuses_a_deleted_machines_name() {
        let dir = tempfile::tempdir().unwrap();
        let pools = Pools::open(dir.path()).await.unwrap();
        let spec = PoolSpec {
            name: "pool1".into(),
            provider: ProviderSpec::Docker(DockerProviderSpec {
                image: "agent:dev".into(),
                server_url: "http://127.0.0.1:1".into(),
                ..Default::default()
            }),
            min_machines: 0,
            max_machines: 2,
            runs_per_machine: 1,
            idle_timeout: Duration::from_secs(5),
            delete_when_idle: true,
            price_per_hour: Some(1.0),
            token_env: String::new(),
            lease_timeout: Duration::from_secs(30),
            boot_timeout: Duration::from_secs(60),
        };
        pools.set_pools(vec![spec.clone()]).await.unwrap();
        let token = pools.token("pool1").unwrap();
        let provider = Arc::new(Instant::default());
        let mut names = Vec::new();
        for round in 0..2 {
            for _ in 0..2 {
                pools
                    .start_machine(&spec, provider.clone(), pools.now_ms())
                    .await;
            }
            let up = machines_until(&pools, |m| m.len() == 2).await;
            for m in &up {
                pools
                    .register(
                        Register {
                            pool: "pool1".into(),
                            name: m.name.clone(),
                            slots: 1,
                            labels: Default::default(),
                            version: String::new(),
                        },
                        &token,
                        None,
                    )
                    .await
                    .unwrap_or_else(|e| panic!("round {round}: register {}: {e:?}", m.name));
            }
            assert_eq!(pools.agents().await.unwrap().len(), 2);
            for m in up {
                names.push(m.name.clone());
                let m = pools.machine(&m.name).await.unwrap().unwrap();
                pools
                    .stop_machine(m, provider.clone(), true, "idle".into())
                    .await;
            }
            // Deleted: no machine left, no agent listed.
            machines_until(&pools, |m| m.is_empty()).await;
            let agents = pools.agents().await.unwrap();
            assert!(agents.is_empty(), "{agents:?}");
        }
        let mut distinct = names.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 4, "machine names: {names:?}");
        assert_eq!(*provider.started.lock().unwrap(), names);
        // Four machines, four cost rows.
        let report = pools.cost_report(0, pools.now_ms() + 1000).await.unwrap();
        let rows = report["machines"].as_array().unwrap();
        assert_eq!(rows.len(), 4, "{report:#}");
    }

    fn docker_pool(name: &str, min_machines: u32) -> PoolSpec {
        PoolSpec {
            name: name.into(),
            provider: ProviderSpec::Docker(DockerProviderSpec {
                image: "agent:dev".into(),
                server_url: "http://127.0.0.1:1".into(),
                ..Default::default()
            }),
            min_machines,
            max_machines: 4,
            runs_per_machine: 1,
            idle_timeout: Duration::from_secs(5),
            delete_when_idle: true,
            price_per_hour: None,
            token_env: String::new(),
            lease_timeout: Duration::from_secs(30),
            boot_timeout: Duration::from_secs(60),
        }
    }

    /// Issue 12 item 4 (fencing): the autoscaler of a server that lost the
    /// ownership lease (a partitioned ex-owner) has its machine writes
    /// refused by PostgreSQL, and so never asks the provider to start or
    /// stop a machine; the new owner's view of the machines is untouched.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_server_that_lost_ownership_neither_starts_nor_stops_machines() {
        use pubrun_store::postgres::BROKER_OWNERSHIP;
        use pubrun_store::runs::postgres::Fence;
        use pubrun_store::{PostgresOptions, PostgresPoolStore, PostgresStore};

        let pg = pubrun_store::testing::TempPostgres::start();
        let owner = |node: &str| PostgresOptions {
            url: pg.url(),
            node_name: node.into(),
            lease_ttl: Duration::from_secs(1),
        };
        let fence = |token| {
            Some(Fence {
                name: BROKER_OWNERSHIP.to_string(),
                token,
            })
        };
        let lease_a = PostgresStore::open(owner("a")).await.unwrap();
        let store_a = Arc::new(
            PostgresPoolStore::open(&pg.url(), fence(lease_a.token()))
                .await
                .unwrap(),
        );
        let pools = Pools::with_store(store_a.clone()).await.unwrap();
        let spec = docker_pool("fenced", 1);
        pools.set_pools(vec![spec.clone()]).await.unwrap();
        let provider = Arc::new(Instant::default());

        // The owner: min_machines = 1 starts one machine.
        pools.scale(&spec, provider.clone(), pools.now_ms()).await;
        let before = machines_until(&pools, |m| m.len() == 1 && !m[0].provider_id.is_empty()).await;
        assert_eq!(provider.started.lock().unwrap().len(), 1);

        // Cut off: "b" takes the ownership lease over.
        lease_a.stop_renewing();
        let lease_b = PostgresStore::open(owner("b")).await.unwrap();
        assert!(lease_b.token() > lease_a.token());
        let store_b = PostgresPoolStore::open(&pg.url(), fence(lease_b.token()))
            .await
            .unwrap();

        // The ex-owner wants a second machine and to stop the first: both
        // writes are refused, so the provider hears of neither.
        let more = docker_pool("fenced", 2);
        pools.scale(&more, provider.clone(), pools.now_ms()).await;
        pools
            .start_machine(&more, provider.clone(), pools.now_ms())
            .await;
        pools
            .stop_machine(before[0].clone(), provider.clone(), true, "idle".into())
            .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            provider.started.lock().unwrap().len(),
            1,
            "no start after the takeover"
        );
        assert!(
            provider.stopped.lock().unwrap().is_empty(),
            "no stop after the takeover"
        );
        assert!(store_a.is_fenced());
        assert!(!store_b.is_fenced());
        // Nothing of it was written: the new owner sees the one machine as it was.
        let after = crate::db::PoolStore::machines(&store_b).await.unwrap();
        assert_eq!(after, before);
        drop(lease_b);
    }

    #[test]
    fn machine_names_use_the_gce_name_prefix() {
        let mut spec = PoolSpec {
            name: "big".into(),
            provider: ProviderSpec::Gce(GceProviderSpec {
                name_prefix: "acme".into(),
                ..Default::default()
            }),
            min_machines: 0,
            max_machines: 1,
            runs_per_machine: 1,
            idle_timeout: Duration::from_secs(60),
            delete_when_idle: false,
            price_per_hour: None,
            token_env: String::new(),
            lease_timeout: Duration::from_secs(30),
            boot_timeout: Duration::from_secs(60),
        };
        assert_eq!(name_prefix(&spec), "acme");
        spec.provider = ProviderSpec::Gce(GceProviderSpec::default());
        assert_eq!(name_prefix(&spec), "pubrun");
        spec.provider = ProviderSpec::Gce(GceProviderSpec {
            name_prefix: String::new(),
            ..Default::default()
        });
        assert_eq!(name_prefix(&spec), "pubrun");
        spec.provider = ProviderSpec::Docker(DockerProviderSpec::default());
        assert_eq!(name_prefix(&spec), "pubrun");
    }
}
