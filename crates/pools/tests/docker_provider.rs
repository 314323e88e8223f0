//! The Docker provider against the real engine, with the agent image built by
//! scripts/agent-image.sh from the `pubrun` binary (`$PUBRUN_BIN`, else
//! `target/debug/pubrun` next to this test; scripts/test-all.sh builds it
//! before the tests). Without an engine or binary these tests print SKIPPED,
//! except under CI=true where they fail.
//!
//! The machines point at a server that does not exist: `pubrun agent` keeps
//! retrying, so its container stays running.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use bollard::models::ContainerInspectResponse;
use bollard::query_parameters::InspectContainerOptions;
use pubrun_core::pool::DockerProviderSpec;
use pubrun_pools::provider::docker::{DockerProvider, MACHINE_LABEL, POOL_LABEL};
use pubrun_pools::provider::{MachineLaunch, MachineProvider, ProviderError, ProviderStatus};

mod provider_suite;

const WAIT: Duration = Duration::from_secs(60);
const IMAGE: &str = "pubrun-agent:dev";
/// Nothing listens there; the agent retries forever.
const SERVER: &str = "http://192.0.2.1:8085";

fn pubrun_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PUBRUN_BIN") {
        return Some(PathBuf::from(p));
    }
    // target/debug/deps/docker_provider-HASH → target/debug/pubrun
    let exe = std::env::current_exe().ok()?;
    let bin = exe.parent()?.parent()?.join("pubrun");
    bin.exists().then_some(bin)
}

/// Whether the engine answers and the agent image is built; see the module doc.
fn ready(test: &str) -> bool {
    if !pubrun_testkit::require_docker(test) {
        return false;
    }
    static READY: OnceLock<Result<(), (bool, String)>> = OnceLock::new();
    let ready = READY.get_or_init(|| {
        let Some(bin) = pubrun_binary() else {
            return Err((
                true,
                "no pubrun binary: run `cargo build -p pubrun` first (scripts/test-all.sh does) or set PUBRUN_BIN".into(),
            ));
        };
        pubrun_testkit::run_script("agent-image.sh", &[bin.to_str().unwrap(), IMAGE])
            .map(|_| ())
            .map_err(|e| (false, e))
    });
    match ready {
        Ok(()) => true,
        Err((true, why)) => pubrun_testkit::skip(test, why),
        Err((_, why)) => panic!("{test}: {why}"),
    }
}

/// A pool name no other test (or earlier run) uses; its containers are
/// removed when this guard drops, whatever the test did.
struct Pool(String);

impl Pool {
    fn new(what: &str) -> Pool {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        Pool(format!("t-{what}-{}-{nanos}", std::process::id()))
    }

    fn machine(&self, n: u32) -> String {
        format!("pubrun-{}-{n}", self.0)
    }

    fn launch(&self, n: u32) -> MachineLaunch {
        MachineLaunch {
            pool: self.0.clone(),
            name: self.machine(n),
            server_url: SERVER.into(),
            token: format!("secret-{}", self.0),
            slots: 2,
            labels: BTreeMap::from([("team".to_string(), "data".to_string())]),
        }
    }
}

/// Label of the stand-in job containers a test makes (removed with the pool).
const TEST_LABEL: &str = "pubrun.test-pool";

impl Drop for Pool {
    fn drop(&mut self) {
        for label in [POOL_LABEL, TEST_LABEL] {
            self.remove_labelled(label);
        }
    }
}

impl Pool {
    fn remove_labelled(&self, label: &str) {
        let ids = Command::new("docker")
            .args([
                "ps",
                "-aq",
                "--filter",
                &format!("label={label}={}", self.0),
            ])
            .output();
        if let Ok(out) = ids {
            let ids = String::from_utf8_lossy(&out.stdout);
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let _ = Command::new("docker")
                    .args(["rm", "-f"])
                    .args(&ids)
                    .output();
            }
        }
    }
}

fn spec() -> DockerProviderSpec {
    DockerProviderSpec {
        image: IMAGE.into(),
        server_url: SERVER.into(),
        ..Default::default()
    }
}

fn logs(container: &str) -> String {
    let out = Command::new("docker")
        .args(["logs", container])
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

async fn wait_status(p: &DockerProvider, name: &str, want: ProviderStatus) {
    // The agent retries forever: a machine that stopped by itself while we
    // wait for it to run is a failure, and its log says why.
    provider_suite::reaches_unless(p, name, want, WAIT, |got| {
        (want == ProviderStatus::Running && got == ProviderStatus::Stopped)
            .then(|| format!("the agent exited:\n{}", logs(name)))
    })
    .await
}

/// The engine and agent-image check, then a fresh pool and a provider on
/// `spec`; `None` when the test is skipped.
fn setup(test: &str, pool: &str, spec: DockerProviderSpec) -> Option<(Pool, DockerProvider)> {
    ready(test).then(|| (Pool::new(pool), DockerProvider::new(&spec).unwrap()))
}

/// Starts machine 1 of `pool`, waits until it runs and returns its name and
/// the engine's view of its container.
async fn start_and_inspect(p: &DockerProvider, pool: &Pool) -> (String, ContainerInspectResponse) {
    let name = pool.machine(1);
    p.start(&pool.launch(1)).await.unwrap();
    wait_status(p, &name, ProviderStatus::Running).await;
    let c = pubrun_testkit::docker_client()
        .await
        .inspect_container(&name, None::<InspectContainerOptions>)
        .await
        .unwrap();
    (name, c)
}

#[tokio::test]
async fn machine_lifecycle() {
    let spec = DockerProviderSpec {
        memory_bytes: Some(256 << 20),
        cpus: Some(0.5),
        ..spec()
    };
    let Some((pool, p)) = setup("machine_lifecycle", "life", spec) else {
        return;
    };
    assert_eq!(p.kind(), "docker");
    let name = pool.machine(1);
    let launch = pool.launch(1);

    let id = tokio::time::timeout(WAIT, p.start(&launch))
        .await
        .unwrap()
        .unwrap();
    wait_status(&p, &name, ProviderStatus::Running).await;

    let docker = pubrun_testkit::docker_client().await;
    let c = docker
        .inspect_container(&name, None::<InspectContainerOptions>)
        .await
        .unwrap();
    assert_eq!(c.id.as_deref(), Some(id.as_str()));
    let config = c.config.unwrap();
    let labels = config.labels.unwrap();
    assert_eq!(labels[POOL_LABEL], pool.0);
    assert_eq!(labels[MACHINE_LABEL], name);
    assert_eq!(labels["team"], "data");
    let cmd = config.cmd.unwrap();
    assert_eq!(
        cmd,
        [
            "/usr/local/bin/pubrun",
            "agent",
            "--server",
            SERVER,
            "--pool",
            &pool.0,
            "--name",
            &name,
            "--slots",
            "2"
        ]
    );
    let token = format!("PUBRUN_TOKEN={}", launch.token);
    assert!(config.env.unwrap().contains(&token));
    assert!(
        !cmd.iter().any(|a| a.contains(&launch.token)),
        "token in argv"
    );
    let hc = c.host_config.unwrap();
    assert_eq!(hc.memory, Some(256 << 20));
    assert_eq!(hc.nano_cpus, Some(500_000_000));
    // The agent keeps retrying an unreachable server: still running now.
    assert!(
        c.state.unwrap().running.unwrap(),
        "the agent exited:\n{}",
        logs(&name)
    );

    // Lists, stop, start again and delete: `keeps_the_provider_contract`.
    // Docker's own rule: a new token replaces the stopped container rather
    // than restarting it stale.
    p.stop(&name, false).await.unwrap();
    let rotated = MachineLaunch {
        token: "rotated".into(),
        ..launch.clone()
    };
    let new_id = p.start(&rotated).await.unwrap();
    assert_ne!(new_id, id);
    wait_status(&p, &name, ProviderStatus::Running).await;
}

#[tokio::test]
async fn keeps_the_provider_contract() {
    if !ready("keeps_the_provider_contract") {
        return;
    }
    let (a, b) = (Pool::new("contract-a"), Pool::new("contract-b"));
    let p = DockerProvider::new(&spec()).unwrap();
    let nth = |pool: &str, n: u32| MachineLaunch {
        pool: pool.into(),
        name: format!("pubrun-{pool}-{n}"),
        server_url: SERVER.into(),
        token: format!("secret-{pool}"),
        slots: 1,
        labels: BTreeMap::new(),
    };
    provider_suite::machine_contract(&provider_suite::Subject {
        provider: &p,
        pools: [&a.0, &b.0],
        launch: &nth,
        patience: WAIT,
    })
    .await;
}

#[tokio::test]
async fn machines_join_the_given_network() {
    if !ready("machines_join_the_given_network") {
        return;
    }
    let pool = Pool::new("net");
    let net = format!("pubrun-test-{}", pool.0);
    pubrun_testkit::run_ok(
        "docker network create",
        Command::new("docker").args(["network", "create", &net]),
    );
    let p = DockerProvider::new(&DockerProviderSpec {
        network: net.clone(),
        ..spec()
    })
    .unwrap();
    let (name, c) = start_and_inspect(&p, &pool).await;
    let networks: HashMap<_, _> = c.network_settings.unwrap().networks.unwrap();
    assert!(networks.contains_key(&net), "{networks:?}");
    p.stop(&name, true).await.unwrap();
    drop(pool);
    let _ = Command::new("docker")
        .args(["network", "rm", &net])
        .output();
}

#[tokio::test]
async fn missing_image_is_refused() {
    let spec = DockerProviderSpec {
        image: "pubrun-test/no-such-agent:nope".into(),
        ..spec()
    };
    let Some((pool, p)) = setup("missing_image_is_refused", "noimg", spec) else {
        return;
    };
    match p.start(&pool.launch(1)).await {
        Err(ProviderError::Refused(m)) => assert!(m.contains("not present"), "{m}"),
        other => panic!("want Refused, got {other:?}"),
    }
    assert_eq!(
        p.status(&pool.machine(1)).await.unwrap(),
        ProviderStatus::Gone
    );
}

/// Needs no engine: nothing answers at these addresses.
#[tokio::test]
async fn dead_docker_host_is_unavailable() {
    let port = pubrun_testkit::free_port();
    for host in [
        "unix:///nonexistent/docker.sock".to_string(),
        format!("tcp://127.0.0.1:{port}"),
    ] {
        let p = DockerProvider::new(&DockerProviderSpec {
            docker_host: host.clone(),
            ..spec()
        })
        .unwrap();
        assert_eq!(p.endpoint(), host);
        let launch = Pool::new("dead").launch(1);
        for r in [
            p.start(&launch).await.map(drop),
            p.stop("x", true).await,
            p.status("x").await.map(drop),
            p.list("x").await.map(drop),
        ] {
            match r {
                Err(ProviderError::Unavailable(m)) => {
                    assert!(m.contains(&host), "{m}")
                }
                other => panic!("{host}: want Unavailable, got {other:?}"),
            }
        }
    }
}

/// `docker_socket = true`: the machine gets the engine's socket and its run
/// directory at the same path as on the host, and the job containers it
/// started (siblings on the engine) go when it is stopped.
#[tokio::test]
async fn docker_socket_machines_take_their_job_containers_along() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("machines");
    let spec = DockerProviderSpec {
        docker_socket: true,
        machine_data_dir: data.display().to_string(),
        ..spec()
    };
    let test = "docker_socket_machines_take_their_job_containers_along";
    let Some((pool, p)) = setup(test, "sock", spec) else {
        return;
    };
    let (name, c) = start_and_inspect(&p, &pool).await;
    let dir = format!("{}/{name}", data.display());
    let binds = c.host_config.unwrap().binds.unwrap();
    assert!(binds.contains(&format!("{dir}:{dir}")), "{binds:?}");
    assert!(
        binds.contains(&"/var/run/docker.sock:/var/run/docker.sock".to_string()),
        "{binds:?}"
    );
    let config = c.config.unwrap();
    let cmd = config.cmd.unwrap();
    assert_eq!(&cmd[cmd.len() - 2..], ["--data-dir", dir.as_str()]);
    assert!(config
        .env
        .unwrap()
        .contains(&"DOCKER_HOST=unix:///var/run/docker.sock".to_string()));
    // The engine made the machine's directory on the host.
    assert!(std::path::Path::new(&dir).is_dir(), "{dir}");

    // Stand-ins for job containers: one working in this machine's directory,
    // one elsewhere (another machine's, or a local run's).
    let job = |work: &str| {
        pubrun_testkit::run_ok(
            "docker run",
            Command::new("docker")
                .args(["run", "-d", "--label", "pubrun.run_id=1"])
                .args(["--label", &format!("{TEST_LABEL}={}", pool.0)])
                .args(["-v", &format!("{work}:/workspace"), IMAGE, "sleep", "300"]),
        )
        .trim()
        .to_string()
    };
    let ours = job(&format!("{dir}/leases/7/work"));
    let other = job(&format!("{}/elsewhere/work", tmp.path().display()));

    tokio::time::timeout(WAIT, p.stop(&name, true))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(p.status(&name).await.unwrap(), ProviderStatus::Gone);
    let docker = pubrun_testkit::docker_client().await;
    let gone = docker
        .inspect_container(&ours, None::<InspectContainerOptions>)
        .await;
    assert!(gone.is_err(), "the machine's job container outlived it");
    let kept = docker
        .inspect_container(&other, None::<InspectContainerOptions>)
        .await
        .unwrap();
    assert_eq!(kept.state.unwrap().running, Some(true));
    // Stopping a machine that is gone already is fine, and still sweeps.
    p.stop(&name, true).await.unwrap();
}
