//! Machine providers: the seam between a pool and whatever starts machines.
//!
//! A provider only starts, stops and looks at machines. It knows nothing of
//! runs: a machine it starts runs `pubrun agent --server URL --pool P
//! --token T --name NAME`, and from then on the machine is an agent like any
//! other. The autoscaler decides when; the provider does how.

pub mod docker;
pub mod gce;
#[cfg(feature = "gce-fake")]
pub mod gce_fake;

use std::collections::BTreeMap;

/// Everything a provider needs to start one machine of a pool.
#[derive(Debug, Clone, PartialEq)]
pub struct MachineLaunch {
    pub pool: String,
    /// Unique machine name chosen by the server (`pubrun-POOL-N`); the agent
    /// registers under it, which links the agent to the machine.
    pub name: String,
    /// URL the agent uses to reach the server.
    pub server_url: String,
    /// Pool-scoped agent token (a secret: never log it).
    pub token: String,
    /// The agent's `--slots`.
    pub slots: u32,
    /// Labels put on the machine (container labels, instance labels).
    pub labels: BTreeMap<String, String>,
}

/// What the provider reports about a machine it knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderStatus {
    /// Being created or booting.
    Pending,
    Running,
    Stopping,
    /// Exists but is not running (a stopped instance, an exited container).
    Stopped,
    /// Does not exist (deleted, or never created).
    Gone,
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The provider cannot be reached (daemon down, network): try again later.
    #[error("provider unavailable: {0}")]
    Unavailable(String),
    /// The provider refused (bad image, quota, permission): retrying the
    /// same request will not help.
    #[error("provider refused: {0}")]
    Refused(String),
    /// Out of capacity or quota right now (`ZONE_RESOURCE_POOL_EXHAUSTED`):
    /// nothing was created, and the same request may work later or
    /// elsewhere. Not the pool's fault: it is never marked refused for it.
    #[error("no capacity now: {0}")]
    NoCapacity(String),
}

#[async_trait::async_trait]
pub trait MachineProvider: Send + Sync + 'static {
    /// `docker`, `gce`.
    fn kind(&self) -> &'static str;

    /// Starts a machine named `launch.name`: creates it, or starts it again
    /// when a stopped machine of that name exists. Returns the provider's id
    /// for it (container id, instance self link) once the request is
    /// accepted; the machine joins later, when its agent registers.
    async fn start(&self, launch: &MachineLaunch) -> Result<String, ProviderError>;

    /// Stops (`delete = false`) or deletes the machine. Idempotent: a
    /// machine that is already stopped or gone is not an error.
    async fn stop(&self, name: &str, delete: bool) -> Result<(), ProviderError>;

    /// Current status of the machine named `name`.
    async fn status(&self, name: &str) -> Result<ProviderStatus, ProviderError>;

    /// Names of the machines of `pool` the provider knows (found by label),
    /// so that a restarted server finds machines it started before.
    async fn list(&self, pool: &str) -> Result<Vec<(String, ProviderStatus)>, ProviderError>;
}

/// The provider of an on-demand pool; `None` for local and agents pools.
pub fn build(
    spec: &pubrun_core::pool::PoolSpec,
) -> Result<Option<std::sync::Arc<dyn MachineProvider>>, ProviderError> {
    use pubrun_core::pool::ProviderSpec;
    Ok(match &spec.provider {
        ProviderSpec::Local | ProviderSpec::Agents => None,
        ProviderSpec::Docker(d) => Some(std::sync::Arc::new(docker::DockerProvider::new(d)?)),
        ProviderSpec::Gce(g) => Some(std::sync::Arc::new(gce::GceProvider::new(g)?)),
    })
}
