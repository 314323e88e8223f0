//! Pools: where runs execute, the machines in them, and what they cost.
//!
//! A [`PoolSpec`] is the validated form of a `[[pool]]` table. `local` (the
//! implicit default) runs inside the server; `agents` takes whatever `pubrun
//! agent`s join; `docker` and `gce` pools start machines on demand through a
//! machine provider. The machine state machine, the autoscaling decision and
//! the cost arithmetic live here, free of I/O, so they are unit-tested with
//! plain numbers.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The pool a job uses when it names none.
pub const LOCAL_POOL: &str = "local";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolSpec {
    /// Same rules as a topic id.
    pub name: String,
    pub provider: ProviderSpec,
    /// Machines kept even when there is no work.
    pub min_machines: u32,
    /// Never more machines than this (starting ones included). 0 for pools
    /// the server does not scale (`local`, `agents`).
    pub max_machines: u32,
    /// Runs one machine executes at the same time (the agent's `--slots`).
    pub runs_per_machine: u32,
    /// A machine without runs for this long is stopped (or deleted).
    #[serde(with = "secs")]
    pub idle_timeout: Duration,
    /// `true`: delete idle machines; `false`: stop them (restart is faster,
    /// a stopped disk may still cost money on a real cloud).
    pub delete_when_idle: bool,
    /// Optional price of one machine-hour, for `pubrun cost`.
    pub price_per_hour: Option<f64>,
    /// Environment variable holding the pool-scoped agent token. Empty: the
    /// server generates one at first apply and keeps it in its data dir.
    pub token_env: String,
    /// A run leased to an agent that has not been heard of for this long is
    /// taken back and retried elsewhere.
    #[serde(with = "secs")]
    pub lease_timeout: Duration,
    /// A machine that has not joined (agent registered) this long after it
    /// was started is marked failed and stopped.
    #[serde(with = "secs")]
    pub boot_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
// Made once per apply and cloned rarely: boxing the gce variant buys nothing.
#[allow(clippy::large_enum_variant)]
pub enum ProviderSpec {
    /// Runs inside the server with its executors and `--slots`.
    Local,
    /// No provider: agents join by themselves.
    Agents,
    /// A machine is a container running `pubrun agent` on a Docker host.
    Docker(DockerProviderSpec),
    /// A machine is a Compute Engine instance whose startup runs `pubrun agent`.
    Gce(GceProviderSpec),
}

impl ProviderSpec {
    pub fn kind(&self) -> &'static str {
        match self {
            ProviderSpec::Local => "local",
            ProviderSpec::Agents => "agents",
            ProviderSpec::Docker(_) => "docker",
            ProviderSpec::Gce(_) => "gce",
        }
    }

    /// Whether the server starts and stops machines for this pool.
    pub fn on_demand(&self) -> bool {
        matches!(self, ProviderSpec::Docker(_) | ProviderSpec::Gce(_))
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct DockerProviderSpec {
    /// Docker Engine endpoint; empty = DOCKER_HOST or the local socket.
    pub docker_host: String,
    /// Image with `pubrun` at /usr/local/bin/pubrun (see scripts/agent-image.sh).
    pub image: String,
    /// Docker network the machine containers join; empty = default bridge.
    pub network: String,
    /// URL the agents use to reach this server (as seen from the containers).
    pub server_url: String,
    /// Extra `docker run`-like settings for the machine container.
    pub memory_bytes: Option<u64>,
    pub cpus: Option<f64>,
    /// Docker jobs on the machines: the engine's socket is mounted into
    /// each machine container (and `DOCKER_HOST` set), so the agent starts
    /// job containers as siblings on the same engine. Their work
    /// directories are bind-mounted by host path, so each machine keeps its
    /// runs under [`machine_data_dir`](Self::machine_data_dir)`/MACHINE`,
    /// mounted at the same path inside the container (the agent's
    /// `--data-dir`).
    #[serde(default)]
    pub docker_socket: bool,
    /// Directory on the Docker host holding the machines' run directories
    /// when `docker_socket` is on; default [`DEFAULT_MACHINE_DATA_DIR`].
    #[serde(default)]
    pub machine_data_dir: String,
}

/// Where `docker_socket` machines keep their runs on the Docker host.
pub const DEFAULT_MACHINE_DATA_DIR: &str = "/var/tmp/pubrun-machines";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GceProviderSpec {
    pub project: String,
    pub zone: String,
    /// e.g. `n2-highmem-8`.
    pub machine_type: String,
    /// Boot disk source image, e.g. `projects/cos-cloud/global/images/family/cos-stable`.
    pub source_image: String,
    /// Compute API base URL; default `https://compute.googleapis.com/compute/v1/`.
    pub api_base: String,
    /// Environment variable with an OAuth access token for the Compute API.
    /// Empty: ask the metadata server (when the server itself runs on GCE).
    pub access_token_env: String,
    /// URL the agents use to reach this server.
    pub server_url: String,
    /// Instance name prefix; machines are `PREFIX-POOL-N`. Default
    /// [`DEFAULT_NAME_PREFIX`] (also when absent from a stored spec).
    #[serde(default = "default_name_prefix")]
    pub name_prefix: String,
    /// More zones to create instances in when `zone` (tried first) is
    /// out of capacity (`ZONE_RESOURCE_POOL_EXHAUSTED`).
    #[serde(default)]
    pub zones: Vec<String>,
    /// Calls the Compute API with this connection's credentials and
    /// endpoint (instead of `access_token_env` or the metadata server).
    #[serde(default)]
    pub connection: Option<crate::connection::ConnectionSpec>,
    /// The instances' service account (jobs on them reach GCS with it);
    /// empty: no service account.
    #[serde(default)]
    pub service_account: String,
    /// OAuth scopes of that service account; empty: `cloud-platform`.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// `global/networks/NAME` or a full URL; empty: `default` (unless a
    /// subnetwork is given, which implies its network).
    #[serde(default)]
    pub network: String,
    /// `regions/R/subnetworks/NAME` or a full URL.
    #[serde(default)]
    pub subnetwork: String,
    /// An ephemeral external IP (`ONE_TO_ONE_NAT`); many organisations forbid it.
    #[serde(default = "yes")]
    pub external_ip: bool,
    /// `pd-balanced`, `pd-ssd`, …; empty: Google's default.
    #[serde(default)]
    pub disk_type: String,
    /// Boot disk size; 0: the image's size.
    #[serde(default)]
    pub disk_size_gb: u32,
    #[serde(default)]
    pub accelerators: Vec<GceAccelerator>,
    /// Spot VMs (`provisioningModel = SPOT`, deleted when reclaimed, so a
    /// reclaimed machine is gone and replaced, never restarted silently).
    #[serde(default)]
    pub spot: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GceAccelerator {
    /// e.g. `nvidia-tesla-t4`.
    pub accelerator_type: String,
    pub count: u32,
}

fn yes() -> bool {
    true
}

/// Machine names are `pubrun-POOL-N` unless a gce pool says otherwise.
pub const DEFAULT_NAME_PREFIX: &str = "pubrun";

fn default_name_prefix() -> String {
    DEFAULT_NAME_PREFIX.to_string()
}

impl Default for GceProviderSpec {
    fn default() -> Self {
        GceProviderSpec {
            project: String::new(),
            zone: String::new(),
            machine_type: String::new(),
            source_image: String::new(),
            api_base: String::new(),
            access_token_env: String::new(),
            server_url: String::new(),
            name_prefix: default_name_prefix(),
            zones: Vec::new(),
            connection: None,
            service_account: String::new(),
            scopes: Vec::new(),
            network: String::new(),
            subnetwork: String::new(),
            external_ip: true,
            disk_type: String::new(),
            disk_size_gb: 0,
            accelerators: Vec::new(),
            spot: false,
        }
    }
}

/// Lifecycle of one machine of a pool:
/// `provisioning → ready → busy ⇄ idle → stopping → stopped`, and `failed`
/// from anywhere but `stopped`. `stopped` machines may be started again
/// (`stopped → provisioning`). An agent registering from a machine makes it
/// `ready` whatever was recorded. Every change goes through
/// [`MachineState::check_transition`] (`MachineRow::set_state` in the store).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MachineState {
    Provisioning,
    Ready,
    Busy,
    Idle,
    Stopping,
    Stopped,
    Failed,
}

impl MachineState {
    pub fn as_str(self) -> &'static str {
        match self {
            MachineState::Provisioning => "provisioning",
            MachineState::Ready => "ready",
            MachineState::Busy => "busy",
            MachineState::Idle => "idle",
            MachineState::Stopping => "stopping",
            MachineState::Stopped => "stopped",
            MachineState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "provisioning" => MachineState::Provisioning,
            "ready" => MachineState::Ready,
            "busy" => MachineState::Busy,
            "idle" => MachineState::Idle,
            "stopping" => MachineState::Stopping,
            "stopped" => MachineState::Stopped,
            "failed" => MachineState::Failed,
            _ => return None,
        })
    }

    /// Whether the machine exists (and costs money) in this state.
    pub fn is_up(self) -> bool {
        !matches!(self, MachineState::Stopped | MachineState::Failed)
    }

    /// Whether the state machine allows `self → to`.
    pub fn can_become(self, to: MachineState) -> bool {
        use MachineState::*;
        match (self, to) {
            (a, b) if a == b => false,
            // Its agent registered: the machine is up, whatever we thought
            // (a partition healed, a stop that did not happen).
            (_, Ready) => true,
            (Stopped, Provisioning) => true,
            (Stopped, _) => false,
            (_, Failed) => true,
            (Provisioning, Stopping) => true,
            (Ready | Idle, Busy) | (Ready | Busy, Idle) => true,
            (Ready | Busy | Idle, Stopping) => true,
            (Stopping, Stopped) => true,
            (Failed, Stopping | Stopped) => true,
            _ => false,
        }
    }

    /// `self → to` if allowed. Staying in a state is allowed too: it
    /// records it again (a stop asked for once more).
    pub fn check_transition(self, to: MachineState) -> Result<(), IllegalTransition> {
        if self == to || self.can_become(to) {
            Ok(())
        } else {
            Err(IllegalTransition { from: self, to })
        }
    }
}

impl std::fmt::Display for MachineState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A machine state change the state machine does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a {from} machine cannot become {to}")]
pub struct IllegalTransition {
    pub from: MachineState,
    pub to: MachineState,
}

/// What the autoscaler sees of one machine of a pool.
#[derive(Debug, Clone, PartialEq)]
pub struct MachineView {
    pub name: String,
    pub state: MachineState,
    /// Runs executing on it now.
    pub runs: u32,
    /// Cordoned: takes no new runs and is stopped once its runs end.
    pub cordoned: bool,
    /// When it entered `state`.
    pub state_since_ms: i64,
    /// When its run count last dropped to 0 (None while busy).
    pub idle_since_ms: Option<i64>,
}

/// One thing the autoscaler wants done.
#[derive(Debug, Clone, PartialEq)]
pub enum ScaleAction {
    /// Start this many new machines (or restart stopped ones).
    Start { count: u32 },
    /// Stop (or, with `delete`, delete) the named machine.
    Stop {
        name: String,
        delete: bool,
        reason: String,
    },
}

/// Machines that exist and may run work.
fn is_up_for_work(s: MachineState) -> bool {
    matches!(
        s,
        MachineState::Provisioning | MachineState::Ready | MachineState::Busy | MachineState::Idle
    )
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Decides what a pool should start and stop now, given its machines, the
/// runs waiting for a slot in it and the clock. Pure: the caller carries the
/// actions out and marks machines (a boot-timed-out one as failed).
///
/// Only on-demand pools (`docker`, `gce`) scale; others get no actions.
/// Machines that are up or stopping count toward `max_machines`; only up,
/// uncordoned machines offer capacity (`runs_per_machine − runs` each, a
/// provisioning one its full `runs_per_machine`).
pub fn autoscale(
    spec: &PoolSpec,
    machines: &[MachineView],
    waiting_runs: u32,
    now_ms: i64,
) -> Vec<ScaleAction> {
    if !spec.provider.on_demand() {
        return Vec::new();
    }
    let rpm = spec.runs_per_machine.max(1);
    let mut actions = Vec::new();
    // Index of machines leaving this tick: they still count toward max
    // (stopping) but no longer toward capacity or min.
    let mut leaving = vec![false; machines.len()];
    let stop = |i: usize,
                delete: bool,
                reason: String,
                leaving: &mut [bool],
                actions: &mut Vec<ScaleAction>| {
        leaving[i] = true;
        actions.push(ScaleAction::Stop {
            name: machines[i].name.clone(),
            delete,
            reason,
        });
    };

    let boot_ms = duration_ms(spec.boot_timeout);
    for (i, m) in machines.iter().enumerate() {
        if m.state == MachineState::Provisioning
            && now_ms.saturating_sub(m.state_since_ms) >= boot_ms
        {
            // A machine that never joined is not worth keeping as a stopped
            // disk: whatever broke its boot would break the restart too.
            let reason = format!(
                "did not join within {}",
                humantime::format_duration(spec.boot_timeout)
            );
            stop(i, true, reason, &mut leaving, &mut actions);
        } else if m.cordoned && m.runs == 0 && is_up_for_work(m.state) {
            stop(
                i,
                spec.delete_when_idle,
                "drained".to_string(),
                &mut leaving,
                &mut actions,
            );
        }
    }

    let counted = machines
        .iter()
        .filter(|m| is_up_for_work(m.state) || m.state == MachineState::Stopping)
        .count() as u64;
    let serving: Vec<usize> = (0..machines.len())
        .filter(|&i| !leaving[i] && is_up_for_work(machines[i].state) && !machines[i].cordoned)
        .collect();
    let free: u64 = serving
        .iter()
        .map(|&i| u64::from(rpm.saturating_sub(machines[i].runs)))
        .sum();
    let waiting = u64::from(waiting_runs);

    let for_work = if waiting > free {
        (waiting - free).div_ceil(u64::from(rpm))
    } else {
        0
    };
    let for_min = u64::from(spec.min_machines).saturating_sub(serving.len() as u64);
    let room = u64::from(spec.max_machines).saturating_sub(counted);
    let start = for_work.max(for_min).min(room);
    if start > 0 {
        actions.push(ScaleAction::Start {
            count: start as u32,
        });
    }

    // Idle stops: only when nothing is being started for work or min (then
    // every machine is wanted), longest idle first, keeping min_machines
    // and enough free slots for the waiting runs.
    if for_work == 0 && for_min == 0 {
        let idle_ms = duration_ms(spec.idle_timeout);
        let mut idle: Vec<(i64, usize)> = serving
            .iter()
            .filter_map(|&i| {
                let m = &machines[i];
                let since = m.idle_since_ms.unwrap_or(m.state_since_ms);
                let stoppable = matches!(m.state, MachineState::Ready | MachineState::Idle)
                    && m.runs == 0
                    && now_ms.saturating_sub(since) >= idle_ms;
                stoppable.then_some((since, i))
            })
            .collect();
        idle.sort();
        let mut remaining = serving.len() as u64;
        let mut free_left = free;
        for (since, i) in idle {
            if remaining <= u64::from(spec.min_machines) || free_left < waiting + u64::from(rpm) {
                break;
            }
            remaining -= 1;
            free_left -= u64::from(rpm);
            let reason = format!(
                "idle for {}",
                humantime::format_duration(Duration::from_secs(
                    (now_ms.saturating_sub(since) / 1000).max(0) as u64
                ))
            );
            stop(i, spec.delete_when_idle, reason, &mut leaving, &mut actions);
        }
    }
    actions
}

// Durations as seconds in JSON, as jobs store theirs.
use crate::job::humantime_serde_secs as secs;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The whole table: every pair not listed here is refused.
    #[test]
    fn machine_transition_table() {
        use MachineState::*;
        let all = [Provisioning, Ready, Busy, Idle, Stopping, Stopped, Failed];
        let allowed = [
            (Provisioning, Ready),
            (Provisioning, Stopping),
            (Provisioning, Failed),
            (Ready, Busy),
            (Ready, Idle),
            (Ready, Stopping),
            (Ready, Failed),
            (Busy, Ready),
            (Busy, Idle),
            (Busy, Stopping),
            (Busy, Failed),
            (Idle, Ready),
            (Idle, Busy),
            (Idle, Stopping),
            (Idle, Failed),
            (Stopping, Ready),
            (Stopping, Stopped),
            (Stopping, Failed),
            (Stopped, Provisioning),
            (Stopped, Ready),
            (Failed, Ready),
            (Failed, Stopping),
            (Failed, Stopped),
        ];
        for from in all {
            for to in all {
                let want = allowed.contains(&(from, to));
                assert_eq!(from.can_become(to), want, "{from} -> {to}");
                let checked = from.check_transition(to);
                if from == to || want {
                    assert_eq!(checked, Ok(()), "{from} -> {to}");
                } else {
                    assert_eq!(checked, Err(IllegalTransition { from, to }));
                }
            }
        }
        assert_eq!(
            Stopped.check_transition(Busy).unwrap_err().to_string(),
            "a stopped machine cannot become busy"
        );
    }

    #[test]
    fn machine_state_machine() {
        use MachineState::*;
        assert!(Provisioning.can_become(Ready));
        assert!(Ready.can_become(Busy));
        assert!(Busy.can_become(Idle));
        assert!(Idle.can_become(Stopping));
        assert!(Stopping.can_become(Stopped));
        assert!(Stopped.can_become(Provisioning));
        assert!(Busy.can_become(Failed));
        assert!(!Stopped.can_become(Busy));
        assert!(!Provisioning.can_become(Busy));
        assert!(!Stopping.can_become(Busy));
        for s in [Provisioning, Ready, Busy, Idle, Stopping, Stopped, Failed] {
            assert_eq!(MachineState::parse(s.as_str()), Some(s));
        }
    }

    fn docker_pool(min: u32, max: u32, rpm: u32) -> PoolSpec {
        PoolSpec {
            name: "big".into(),
            provider: ProviderSpec::Docker(DockerProviderSpec::default()),
            min_machines: min,
            max_machines: max,
            runs_per_machine: rpm,
            idle_timeout: Duration::from_secs(300),
            delete_when_idle: true,
            price_per_hour: None,
            token_env: String::new(),
            lease_timeout: Duration::from_secs(30),
            boot_timeout: Duration::from_secs(300),
        }
    }

    /// What `autoscale` answers to start `count` machines.
    fn start(count: u32) -> Vec<ScaleAction> {
        vec![ScaleAction::Start { count }]
    }

    fn machine(name: &str, state: MachineState, runs: u32, since: i64) -> MachineView {
        MachineView {
            name: name.into(),
            state,
            runs,
            cordoned: false,
            state_since_ms: since,
            idle_since_ms: None,
        }
    }

    fn started(actions: &[ScaleAction]) -> u32 {
        actions
            .iter()
            .map(|a| match a {
                ScaleAction::Start { count } => *count,
                _ => 0,
            })
            .sum()
    }

    fn stopped(actions: &[ScaleAction]) -> Vec<(&str, &str)> {
        actions
            .iter()
            .filter_map(|a| match a {
                ScaleAction::Stop { name, reason, .. } => Some((name.as_str(), reason.as_str())),
                _ => None,
            })
            .collect()
    }

    const MIN: i64 = 60_000;

    #[test]
    fn burst_from_zero_is_capped_by_max() {
        let spec = docker_pool(0, 3, 1);
        assert_eq!(autoscale(&spec, &[], 2, 0), start(2));
        assert_eq!(autoscale(&spec, &[], 50, 0), start(3));
        assert!(autoscale(&spec, &[], 0, 0).is_empty());
        // Provisioning machines already offer their slots.
        let m = [machine("a", MachineState::Provisioning, 0, 0)];
        assert_eq!(autoscale(&spec, &m, 3, 1000), start(2));
    }

    #[test]
    fn several_runs_per_machine() {
        let spec = docker_pool(0, 10, 4);
        assert_eq!(autoscale(&spec, &[], 9, 0), start(3));
        // 3 free on `a`, 6 waiting: one more machine covers the other 3.
        let m = [machine("a", MachineState::Busy, 1, 0)];
        assert_eq!(autoscale(&spec, &m, 6, 0), start(1));
        assert!(autoscale(&spec, &m, 3, 0).is_empty());
    }

    #[test]
    fn min_machines_are_kept() {
        let spec = docker_pool(2, 5, 1);
        assert_eq!(autoscale(&spec, &[], 0, 0), start(2));
        let mut a = machine("a", MachineState::Idle, 0, 0);
        a.idle_since_ms = Some(0);
        let b = machine("b", MachineState::Ready, 0, 0);
        // Idle for an hour, but they are the minimum.
        assert!(autoscale(&spec, &[a.clone(), b.clone()], 0, 60 * MIN).is_empty());
        // A third idle machine goes; the two kept are the most recently idle.
        let mut c = machine("c", MachineState::Idle, 0, 0);
        c.idle_since_ms = Some(-MIN);
        assert_eq!(
            stopped(&autoscale(&spec, &[a, b, c], 0, 60 * MIN)),
            vec![("c", "idle for 1h 1m")]
        );
    }

    #[test]
    fn idle_machines_stop_only_after_the_timeout() {
        let spec = docker_pool(0, 5, 1);
        let mut a = machine("a", MachineState::Idle, 0, 0);
        a.idle_since_ms = Some(10 * MIN);
        assert!(autoscale(&spec, &[a.clone()], 0, 14 * MIN).is_empty());
        assert_eq!(
            autoscale(&spec, &[a.clone()], 0, 15 * MIN),
            vec![ScaleAction::Stop {
                name: "a".into(),
                delete: true,
                reason: "idle for 5m".into()
            }]
        );
        // Without idle_since, the time in `ready` counts.
        let r = machine("r", MachineState::Ready, 0, 0);
        assert!(autoscale(&spec, std::slice::from_ref(&r), 0, 4 * MIN).is_empty());
        assert_eq!(stopped(&autoscale(&spec, &[r], 0, 5 * MIN)).len(), 1);
        // Busy machines never stop, however long ago they became busy.
        let b = machine("b", MachineState::Busy, 1, 0);
        assert!(autoscale(&spec, &[b], 0, 600 * MIN).is_empty());
        // Stop, not delete, when the pool says so.
        let spec = PoolSpec {
            delete_when_idle: false,
            ..spec
        };
        assert!(matches!(
            autoscale(&spec, &[a], 0, 15 * MIN)[0],
            ScaleAction::Stop { delete: false, .. }
        ));
    }

    #[test]
    fn no_idle_stop_while_work_waits() {
        let spec = docker_pool(0, 5, 1);
        let mut a = machine("a", MachineState::Idle, 0, 0);
        a.idle_since_ms = Some(0);
        // A run is waiting: `a` is the slot it needs.
        assert!(autoscale(&spec, &[a.clone()], 1, 60 * MIN).is_empty());
        // Two waiting, one slot: start one, stop none.
        assert_eq!(autoscale(&spec, &[a.clone()], 2, 60 * MIN), start(1));
        // Two idle, one waiting: one of them may go.
        let mut b = a.clone();
        b.name = "b".into();
        assert_eq!(stopped(&autoscale(&spec, &[a, b], 1, 60 * MIN)).len(), 1);
    }

    #[test]
    fn cordoned_machines_drain() {
        let spec = docker_pool(1, 5, 2);
        let mut a = machine("a", MachineState::Busy, 1, 0);
        a.cordoned = true;
        // Still running: not stopped, offers no capacity, and min wants a
        // replacement.
        assert_eq!(autoscale(&spec, &[a.clone()], 0, MIN), start(1));
        assert_eq!(autoscale(&spec, &[a.clone()], 3, MIN), start(2));
        a.runs = 0;
        a.state = MachineState::Idle;
        let b = machine("b", MachineState::Busy, 1, 0);
        assert_eq!(
            autoscale(&spec, &[a, b], 0, MIN),
            vec![ScaleAction::Stop {
                name: "a".into(),
                delete: true,
                reason: "drained".into()
            }]
        );
    }

    #[test]
    fn machines_that_do_not_join_are_stopped() {
        let spec = docker_pool(0, 2, 1);
        let p = machine("p", MachineState::Provisioning, 0, 0);
        assert!(autoscale(&spec, std::slice::from_ref(&p), 1, 4 * MIN).is_empty());
        let a = autoscale(&spec, &[p], 1, 5 * MIN);
        // Replaced in the same pass: the stopping one still counts toward max.
        assert_eq!(
            a,
            vec![
                ScaleAction::Stop {
                    name: "p".into(),
                    delete: true,
                    reason: "did not join within 5m".into()
                },
                ScaleAction::Start { count: 1 }
            ]
        );
    }

    #[test]
    fn stopping_machines_count_toward_max() {
        let spec = docker_pool(0, 3, 1);
        let m = [
            machine("a", MachineState::Stopping, 0, 0),
            machine("b", MachineState::Stopping, 0, 0),
            machine("c", MachineState::Busy, 1, 0),
            machine("d", MachineState::Stopped, 0, 0),
            machine("e", MachineState::Failed, 0, 0),
        ];
        assert!(autoscale(&spec, &m, 10, 0).is_empty());
        assert_eq!(autoscale(&spec, &m[1..], 10, 0), start(1));
    }

    #[test]
    fn only_on_demand_pools_scale() {
        for provider in [ProviderSpec::Local, ProviderSpec::Agents] {
            let spec = PoolSpec {
                provider,
                ..docker_pool(3, 5, 1)
            };
            assert!(autoscale(&spec, &[], 10, 0).is_empty());
        }
    }

    /// xorshift64*: enough randomness for property tests without a dependency.
    pub(crate) struct Rng(pub u64);
    impl Rng {
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        pub fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
    }

    #[test]
    fn randomized_autoscale_properties() {
        use MachineState::*;
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let states = [Provisioning, Ready, Busy, Idle, Stopping, Stopped, Failed];
        for _ in 0..20_000 {
            let min = rng.below(4) as u32;
            let max = min.max(1) + rng.below(5) as u32;
            let rpm = 1 + rng.below(4) as u32;
            let mut spec = docker_pool(min, max, rpm);
            spec.delete_when_idle = rng.below(2) == 0;
            let now = 100 * MIN;
            let machines: Vec<MachineView> = (0..rng.below(8))
                .map(|i| {
                    let state = states[rng.below(7) as usize];
                    let runs = if matches!(state, Busy) {
                        1 + rng.below(u64::from(rpm) + 1) as u32
                    } else {
                        0
                    };
                    MachineView {
                        name: format!("m{i}"),
                        state,
                        runs,
                        cordoned: rng.below(5) == 0,
                        state_since_ms: now - rng.below(20 * MIN as u64) as i64,
                        idle_since_ms: (runs == 0 && rng.below(2) == 0)
                            .then(|| now - rng.below(20 * MIN as u64) as i64),
                    }
                })
                .collect();
            let waiting = rng.below(12) as u32;
            let actions = autoscale(&spec, &machines, waiting, now);

            let counted = machines
                .iter()
                .filter(|m| is_up_for_work(m.state) || m.state == Stopping)
                .count() as u32;
            let start = started(&actions);
            assert!(
                start == 0 || counted + start <= max,
                "{machines:?} {waiting} → {actions:?}"
            );
            let stops = stopped(&actions);
            for (name, _) in &stops {
                let m = machines.iter().find(|m| m.name == *name).unwrap();
                assert!(
                    m.runs == 0 && is_up_for_work(m.state),
                    "stopped a busy or gone machine: {m:?}"
                );
            }
            let serving: Vec<&MachineView> = machines
                .iter()
                .filter(|m| {
                    is_up_for_work(m.state)
                        && !m.cordoned
                        && !stops.iter().any(|(n, _)| *n == m.name)
                })
                .collect();
            let free: u32 = serving.iter().map(|m| rpm.saturating_sub(m.runs)).sum();
            if free >= waiting && serving.len() as u32 >= min {
                assert_eq!(start, 0, "{machines:?} {waiting} → {actions:?}");
            }
            // Idle stops never take away a slot a waiting run needs.
            let idle_stops = stops.iter().filter(|(_, r)| r.starts_with("idle")).count();
            if idle_stops > 0 {
                assert!(free >= waiting && serving.len() as u32 >= min);
            }
        }
    }
}
