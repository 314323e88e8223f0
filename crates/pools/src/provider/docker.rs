//! Machines as containers on a Docker host.
//!
//! A machine is one container named after the machine, from the pool's
//! agent image (see `scripts/agent-image.sh`), running
//! `/usr/local/bin/pubrun agent --server URL --pool POOL --name NAME --slots N`.
//! The token travels in the environment (`PUBRUN_TOKEN`), never in argv, so
//! `ps` and `docker inspect …Cmd` do not show it. Containers carry the labels
//! `pubrun.pool` and `pubrun.machine`, by which a restarted server finds them.
//! They run with Docker's init (`--init`) as PID 1, so the agent gets
//! `docker stop`'s SIGTERM and orphaned job processes are reaped.
//!
//! `docker_socket = true` lets machines run docker jobs: the engine's unix
//! socket is bind-mounted into the machine container at the same path
//! (`DOCKER_HOST` set to it; a `tcp://` engine is only named in
//! `DOCKER_HOST`), so the agent starts job containers as siblings on the same
//! engine. A job container's work directory is bind-mounted by path, and the
//! engine resolves that path on the Docker host, not in the machine
//! container; so each machine keeps its runs in
//! `MACHINE_DATA_DIR/MACHINE` on the host, bind-mounted at the same path in
//! the machine container and passed as the agent's `--data-dir`. Job
//! containers of a machine are found by that mount and removed when the
//! machine is stopped, so nothing a machine started outlives it. The socket
//! gives the machine (and nothing else: job containers do not get it) full
//! control of the engine, as `docker run -v /var/run/docker.sock` always does.
//!
//! Errors: no answer from the engine (socket missing, connection refused,
//! timeout) is [`ProviderError::Unavailable`]; an answer that says no
//! (image missing, bad network, bad limits) is [`ProviderError::Refused`].
//! The engine is contacted lazily and the API version negotiated once it
//! answers, so a provider made while the engine is down works once it is up.

use std::collections::HashMap;
use std::time::Duration;

use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerStateStatusEnum, ContainerSummary,
    ContainerSummaryStateEnum, HostConfig,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, InspectContainerOptions, ListContainersOptionsBuilder,
    RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
};
use bollard::Docker;
use pubrun_core::pool::DockerProviderSpec;

use super::{MachineLaunch, MachineProvider, ProviderError, ProviderStatus};

/// Where Docker listens when neither the spec nor `DOCKER_HOST` say.
pub const DEFAULT_DOCKER_HOST: &str = "unix:///var/run/docker.sock";
/// Label holding the pool name.
pub const POOL_LABEL: &str = "pubrun.pool";
/// Label holding the machine name.
pub const MACHINE_LABEL: &str = "pubrun.machine";
/// Where the agent image keeps the binary.
pub const AGENT_BINARY: &str = "/usr/local/bin/pubrun";
/// Label the docker executor puts on job containers (see `pubrun_exec::docker`).
const RUN_LABEL: &str = "pubrun.run_id";

/// `docker stop` grace: the agent hands its runs back on SIGTERM quickly.
const STOP_GRACE: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

pub struct DockerProvider {
    spec: DockerProviderSpec,
    engine: Engine,
}

impl From<EngineError> for ProviderError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Unreachable(m) => ProviderError::Unavailable(m),
            EngineError::Refused(m) => ProviderError::Refused(m),
        }
    }
}

// Engine error helpers shared with the docker executor.
use pubrun_exec::docker::{docker_message, is_status, Engine, EngineError};

// The engine reports a container's state as one of two enums with the same
// variants (inspect, list); one mapping serves both.
macro_rules! status_from {
    ($name:ident, $enum:ident) => {
        fn $name(s: Option<$enum>) -> ProviderStatus {
            use $enum as S;
            match s {
                Some(S::RUNNING) | Some(S::PAUSED) => ProviderStatus::Running,
                Some(S::REMOVING) | Some(S::STOPPING) => ProviderStatus::Stopping,
                Some(S::EXITED) | Some(S::DEAD) => ProviderStatus::Stopped,
                Some(S::CREATED) | Some(S::RESTARTING) | Some(S::EMPTY) | None => {
                    ProviderStatus::Pending
                }
            }
        }
    };
}

status_from!(from_state, ContainerStateStatusEnum);
status_from!(from_summary_state, ContainerSummaryStateEnum);

impl DockerProvider {
    /// Checks the spec and the engine address; does not contact the engine.
    pub fn new(spec: &DockerProviderSpec) -> Result<Self, ProviderError> {
        if spec.image.is_empty() {
            return Err(ProviderError::Refused(
                "docker pool: no image given (build one with scripts/agent-image.sh)".into(),
            ));
        }
        if spec.server_url.is_empty() {
            return Err(ProviderError::Refused(
                "docker pool: no server_url for the agents to reach the server".into(),
            ));
        }
        if spec.docker_socket {
            let d = &spec.machine_data_dir;
            if !d.starts_with('/') || d.contains(':') || d.contains(',') {
                return Err(ProviderError::Refused(format!(
                    "docker pool: machine_data_dir {d:?} must be an absolute path on the docker host without ':' or ','"
                )));
            }
        }
        if let Some(c) = spec.cpus {
            if !(c > 0.0 && c.is_finite()) {
                return Err(ProviderError::Refused(format!(
                    "docker pool: cpus must be positive, not {c}"
                )));
            }
        }
        let endpoint = if !spec.docker_host.is_empty() {
            spec.docker_host.clone()
        } else {
            std::env::var("DOCKER_HOST")
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| DEFAULT_DOCKER_HOST.to_string())
        };
        let engine = Engine::new(&endpoint, REQUEST_TIMEOUT).map_err(ProviderError::Refused)?;
        Ok(DockerProvider {
            spec: spec.clone(),
            engine,
        })
    }

    /// The engine address in use.
    pub fn endpoint(&self) -> &str {
        self.engine.endpoint()
    }

    fn classify(&self, what: &str, e: &DockerError) -> ProviderError {
        self.engine.classify(what, e).into()
    }

    /// Every container, running or not, carrying `label` (`KEY` or
    /// `KEY=VALUE`); `what` names them in the error.
    async fn labelled(
        &self,
        docker: &Docker,
        label: String,
        what: &str,
    ) -> Result<Vec<ContainerSummary>, ProviderError> {
        let filters = HashMap::from([("label".to_string(), vec![label])]);
        let opts = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        docker
            .list_containers(Some(opts))
            .await
            .map_err(|e| self.classify(&format!("listing {what}"), &e))
    }

    async fn client(&self) -> Result<Docker, ProviderError> {
        Ok(self.engine.client().await?)
    }

    /// With `docker_socket`: the machine's run directory, the same path on
    /// the Docker host and inside the machine container.
    pub fn machine_dir(&self, name: &str) -> Option<String> {
        self.spec.docker_socket.then(|| {
            format!(
                "{}/{name}",
                self.spec.machine_data_dir.trim_end_matches('/')
            )
        })
    }

    /// The engine's unix socket path, when the endpoint is one.
    fn socket_path(&self) -> Option<&str> {
        self.endpoint().strip_prefix("unix://")
    }

    fn command(&self, launch: &MachineLaunch) -> Vec<String> {
        let slots = launch.slots.to_string();
        let mut cmd = vec![
            AGENT_BINARY,
            "agent",
            "--server",
            &launch.server_url,
            "--pool",
            &launch.pool,
            "--name",
            &launch.name,
            "--slots",
            &slots,
        ];
        let dir = self.machine_dir(&launch.name);
        if let Some(dir) = &dir {
            cmd.extend(["--data-dir", dir.as_str()]);
        }
        cmd.into_iter().map(str::to_string).collect()
    }

    /// Bind mounts of a `docker_socket` machine: the socket, its run directory.
    fn binds(&self, name: &str) -> Option<Vec<String>> {
        let dir = self.machine_dir(name)?;
        let mut binds = vec![format!("{dir}:{dir}")];
        if let Some(sock) = self.socket_path() {
            binds.push(format!("{sock}:{sock}"));
        }
        Some(binds)
    }

    fn body(&self, launch: &MachineLaunch) -> ContainerCreateBody {
        // Our two labels last, so launch labels cannot hide a machine from list().
        let mut labels: HashMap<String, String> = launch.labels.clone().into_iter().collect();
        labels.insert(POOL_LABEL.into(), launch.pool.clone());
        labels.insert(MACHINE_LABEL.into(), launch.name.clone());
        let memory = self
            .spec
            .memory_bytes
            .map(|m| m.min(i64::MAX as u64) as i64);
        let mut env = vec![
            format!("PUBRUN_TOKEN={}", launch.token),
            "PATH=/usr/local/bin:/bin:/usr/bin".into(),
        ];
        if self.spec.docker_socket {
            env.push(format!("DOCKER_HOST={}", self.endpoint()));
        }
        ContainerCreateBody {
            image: Some(self.spec.image.clone()),
            cmd: Some(self.command(launch)),
            env: Some(env),
            labels: Some(labels),
            stop_timeout: Some(STOP_GRACE.as_secs() as i64),
            host_config: Some(HostConfig {
                // docker-init as PID 1: forwards `docker stop`'s SIGTERM to the
                // agent and reaps the orphans of the jobs it runs.
                init: Some(true),
                memory,
                memory_swap: memory,
                nano_cpus: self.spec.cpus.map(|c| (c * 1e9).round() as i64),
                network_mode: (!self.spec.network.is_empty()).then(|| self.spec.network.clone()),
                // The legacy `Binds` form: the engine creates a missing host
                // directory (a `Mounts` bind would refuse it).
                binds: self.binds(&launch.name),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Whether an existing container would start the agent we want now:
    /// same command and token, and the image the tag names *now* (a rebuilt
    /// agent image is picked up); otherwise it is replaced.
    async fn matches(
        &self,
        docker: &Docker,
        c: &ContainerInspectResponse,
        launch: &MachineLaunch,
    ) -> Result<bool, ProviderError> {
        let Some(config) = &c.config else {
            return Ok(false);
        };
        let token = format!("PUBRUN_TOKEN={}", launch.token);
        if config.cmd.as_ref() != Some(&self.command(launch))
            || !config.env.as_ref().is_some_and(|e| e.contains(&token))
        {
            return Ok(false);
        }
        match docker.inspect_image(&self.spec.image).await {
            Ok(image) => Ok(image.id.is_some() && image.id == c.image),
            // Gone: creating anew reports the missing image.
            Err(e) if is_status(&e, 404) => Ok(false),
            Err(e) => Err(self.classify(&format!("image {}", self.spec.image), &e)),
        }
    }

    async fn inspect(
        &self,
        docker: &Docker,
        name: &str,
    ) -> Result<Option<ContainerInspectResponse>, ProviderError> {
        match docker
            .inspect_container(name, None::<InspectContainerOptions>)
            .await
        {
            Ok(c) => Ok(Some(c)),
            Err(e) if is_status(&e, 404) => Ok(None),
            Err(e) => Err(self.classify(&format!("inspecting container {name}"), &e)),
        }
    }

    async fn remove(&self, docker: &Docker, name: &str) -> Result<(), ProviderError> {
        let opts = RemoveContainerOptionsBuilder::new()
            .force(true)
            .v(true)
            .build();
        match docker.remove_container(name, Some(opts)).await {
            Ok(()) => Ok(()),
            Err(e) if is_status(&e, 404) => Ok(()),
            // 409: removal already in progress.
            Err(e) if is_status(&e, 409) => Ok(()),
            Err(e) => Err(self.classify(&format!("removing container {name}"), &e)),
        }
    }

    /// Removes the job containers a `docker_socket` machine started (found
    /// by their work directory under the machine's directory): they are
    /// siblings on the engine, so stopping the machine does not stop them.
    async fn remove_job_containers(
        &self,
        docker: &Docker,
        name: &str,
    ) -> Result<(), ProviderError> {
        let Some(dir) = self.machine_dir(name) else {
            return Ok(());
        };
        let prefix = format!("{dir}/");
        let found = self
            .labelled(
                docker,
                RUN_LABEL.to_string(),
                &format!("job containers of machine {name}"),
            )
            .await?;
        for c in found {
            let ours = c
                .mounts
                .iter()
                .flatten()
                .any(|m| m.source.as_deref().is_some_and(|s| s.starts_with(&prefix)));
            if let (true, Some(id)) = (ours, c.id) {
                tracing::info!(
                    machine = name,
                    container = id,
                    "removing a job container of a stopped machine"
                );
                self.remove(docker, &id).await?;
            }
        }
        Ok(())
    }

    /// Creates the machine's container; `None` when one of that name
    /// appeared meanwhile (409).
    async fn create(
        &self,
        docker: &Docker,
        launch: &MachineLaunch,
    ) -> Result<Option<String>, ProviderError> {
        let opts = CreateContainerOptionsBuilder::new()
            .name(&launch.name)
            .build();
        match docker.create_container(Some(opts), self.body(launch)).await {
            Ok(r) => Ok(Some(r.id)),
            Err(e) if is_status(&e, 409) => Ok(None),
            Err(e) if is_status(&e, 404) => Err(ProviderError::Refused(format!(
                "image {} is not present on the docker host {} (build it with scripts/agent-image.sh): {}",
                self.spec.image,
                self.endpoint(),
                docker_message(&e)
            ))),
            Err(e) => Err(self.classify(
                &format!("cannot create container {} from image {}", launch.name, self.spec.image),
                &e,
            )),
        }
    }
}

#[async_trait::async_trait]
impl MachineProvider for DockerProvider {
    fn kind(&self) -> &'static str {
        "docker"
    }

    async fn start(&self, launch: &MachineLaunch) -> Result<String, ProviderError> {
        let docker = self.client().await?;
        let id = match self.inspect(&docker, &launch.name).await? {
            Some(c) if c.state.as_ref().and_then(|s| s.running) == Some(true) => {
                return Ok(c.id.unwrap_or_else(|| launch.name.clone()));
            }
            Some(c) if self.matches(&docker, &c, launch).await? => {
                c.id.unwrap_or_else(|| launch.name.clone())
            }
            Some(_) => {
                // Stopped, but made for another image, server or token.
                self.remove(&docker, &launch.name).await?;
                self.create(&docker, launch)
                    .await?
                    .unwrap_or_else(|| launch.name.clone())
            }
            // `None`: created concurrently by another call; start that one.
            None => self
                .create(&docker, launch)
                .await?
                .unwrap_or_else(|| launch.name.clone()),
        };
        match docker.start_container(&id, None).await {
            // 304: already started.
            Ok(()) => Ok(id),
            Err(e) if is_status(&e, 304) => Ok(id),
            Err(e) => Err(self.classify(
                &format!(
                    "cannot start container {} from image {}",
                    launch.name, self.spec.image
                ),
                &e,
            )),
        }
    }

    async fn stop(&self, name: &str, delete: bool) -> Result<(), ProviderError> {
        let docker = self.client().await?;
        // The request lasts as long as the stop does.
        let patient = docker.clone().with_timeout(STOP_GRACE + REQUEST_TIMEOUT);
        let opts = StopContainerOptionsBuilder::new()
            .t(STOP_GRACE.as_secs() as i32)
            .build();
        match patient.stop_container(name, Some(opts)).await {
            Ok(()) => {}
            Err(e) if is_status(&e, 304) => {} // not running
            Err(e) if is_status(&e, 404) => return self.remove_job_containers(&docker, name).await,
            Err(e) => return Err(self.classify(&format!("stopping container {name}"), &e)),
        }
        if delete {
            self.remove(&docker, name).await?;
        }
        self.remove_job_containers(&docker, name).await?;
        // A deleted machine's directory goes too, when it is on this host.
        if let (true, Some(dir)) = (
            delete && self.endpoint().starts_with("unix://"),
            self.machine_dir(name),
        ) {
            match tokio::fs::remove_dir_all(&dir).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(machine = name, dir, error = %e, "cannot remove the machine's directory")
                }
            }
        }
        Ok(())
    }

    async fn status(&self, name: &str) -> Result<ProviderStatus, ProviderError> {
        let docker = self.client().await?;
        Ok(match self.inspect(&docker, name).await? {
            None => ProviderStatus::Gone,
            Some(c) => from_state(c.state.and_then(|s| s.status)),
        })
    }

    async fn list(&self, pool: &str) -> Result<Vec<(String, ProviderStatus)>, ProviderError> {
        let docker = self.client().await?;
        let found = self
            .labelled(
                &docker,
                format!("{POOL_LABEL}={pool}"),
                &format!("containers of pool {pool}"),
            )
            .await?;
        let mut out: Vec<(String, ProviderStatus)> = found
            .into_iter()
            .filter_map(|c| {
                let labels = c.labels.unwrap_or_default();
                // The machine label names it; the container name is the fallback.
                let name = labels.get(MACHINE_LABEL).cloned().or_else(|| {
                    c.names
                        .and_then(|n| n.into_iter().next())
                        .map(|n| n.trim_start_matches('/').to_string())
                })?;
                Some((name, from_summary_state(c.state)))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> DockerProviderSpec {
        DockerProviderSpec {
            image: "pubrun-agent:dev".into(),
            server_url: "http://172.17.0.1:8085".into(),
            ..Default::default()
        }
    }

    #[test]
    fn token_is_in_env_not_argv() {
        let p = DockerProvider::new(&DockerProviderSpec {
            docker_host: "unix:///nonexistent.sock".into(),
            memory_bytes: Some(1 << 30),
            cpus: Some(1.5),
            network: "pubrun-net".into(),
            ..spec()
        })
        .unwrap();
        let launch = MachineLaunch {
            pool: "big".into(),
            name: "pubrun-big-1".into(),
            server_url: "http://172.17.0.1:8085".into(),
            token: "s3cret".into(),
            slots: 4,
            labels: [("pubrun.pool".to_string(), "spoof".to_string())].into(),
        };
        let body = p.body(&launch);
        let cmd = body.cmd.unwrap();
        assert!(!cmd.iter().any(|a| a.contains("s3cret")), "{cmd:?}");
        assert_eq!(cmd[0], AGENT_BINARY);
        assert_eq!(&cmd[cmd.len() - 2..], ["--slots", "4"]);
        assert!(body
            .env
            .unwrap()
            .contains(&"PUBRUN_TOKEN=s3cret".to_string()));
        let labels = body.labels.unwrap();
        assert_eq!(labels[POOL_LABEL], "big");
        assert_eq!(labels[MACHINE_LABEL], "pubrun-big-1");
        let hc = body.host_config.unwrap();
        assert_eq!(hc.memory, Some(1 << 30));
        assert_eq!(hc.nano_cpus, Some(1_500_000_000));
        assert_eq!(hc.network_mode.as_deref(), Some("pubrun-net"));
    }

    #[test]
    fn docker_socket_machines_get_the_socket_and_their_dir() {
        let launch = MachineLaunch {
            pool: "big".into(),
            name: "pubrun-big-1".into(),
            server_url: "http://172.17.0.1:8085".into(),
            token: "s3cret".into(),
            slots: 1,
            labels: Default::default(),
        };
        // Off: no mounts, no --data-dir, no DOCKER_HOST.
        let p = DockerProvider::new(&DockerProviderSpec {
            docker_host: "unix:///run/x/docker.sock".into(),
            ..spec()
        })
        .unwrap();
        let body = p.body(&launch);
        assert!(body.host_config.unwrap().binds.is_none());
        assert!(!body.cmd.unwrap().contains(&"--data-dir".to_string()));
        assert!(!body
            .env
            .unwrap()
            .iter()
            .any(|e| e.starts_with("DOCKER_HOST=")));
        // On: both at the same path inside as outside.
        let p = DockerProvider::new(&DockerProviderSpec {
            docker_host: "unix:///run/x/docker.sock".into(),
            docker_socket: true,
            machine_data_dir: "/srv/machines/".into(),
            ..spec()
        })
        .unwrap();
        let body = p.body(&launch);
        let dir = "/srv/machines/pubrun-big-1";
        assert_eq!(p.machine_dir("pubrun-big-1").as_deref(), Some(dir));
        assert_eq!(
            body.host_config.unwrap().binds.unwrap(),
            [
                format!("{dir}:{dir}"),
                "/run/x/docker.sock:/run/x/docker.sock".into()
            ]
        );
        let cmd = body.cmd.unwrap();
        assert_eq!(&cmd[cmd.len() - 2..], ["--data-dir", dir]);
        assert!(body
            .env
            .unwrap()
            .contains(&"DOCKER_HOST=unix:///run/x/docker.sock".to_string()));
        // A tcp engine: named, not mounted.
        let p = DockerProvider::new(&DockerProviderSpec {
            docker_host: "tcp://10.0.0.5:2375".into(),
            docker_socket: true,
            machine_data_dir: "/srv".into(),
            ..spec()
        })
        .unwrap();
        let body = p.body(&launch);
        assert_eq!(
            body.host_config.unwrap().binds.unwrap(),
            ["/srv/pubrun-big-1:/srv/pubrun-big-1"]
        );
        assert!(body
            .env
            .unwrap()
            .contains(&"DOCKER_HOST=tcp://10.0.0.5:2375".to_string()));
        // A data dir that cannot be bound.
        for bad in ["", "relative", "/a:b"] {
            let r = DockerProvider::new(&DockerProviderSpec {
                docker_socket: true,
                machine_data_dir: bad.into(),
                ..spec()
            });
            assert!(matches!(r, Err(ProviderError::Refused(_))), "{bad:?}");
        }
    }

    #[test]
    fn bad_specs_are_refused() {
        let no_image = DockerProviderSpec {
            image: String::new(),
            ..spec()
        };
        assert!(matches!(
            DockerProvider::new(&no_image),
            Err(ProviderError::Refused(_))
        ));
        let bad_host = DockerProviderSpec {
            docker_host: "ftp://nowhere".into(),
            ..spec()
        };
        assert!(matches!(
            DockerProvider::new(&bad_host),
            Err(ProviderError::Refused(_))
        ));
    }
}
