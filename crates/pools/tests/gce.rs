//! The GCE provider against the Compute Engine fake (`provider::gce_fake`).
//! Neither is checked against real GCP here.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use pubrun_core::pool::GceProviderSpec;
use pubrun_pools::provider::gce::GceProvider;
use pubrun_pools::provider::gce_fake::{FakeGce, FakeGceConfig};
use pubrun_pools::provider::{MachineLaunch, MachineProvider, ProviderError, ProviderStatus};

mod provider_suite;

const PROJECT: &str = "demo";
const ZONE: &str = "europe-west1-b";
const WAIT: Duration = Duration::from_secs(30);

async fn fake() -> FakeGce {
    FakeGce::start(FakeGceConfig::default()).await.unwrap()
}

/// A provider whose token comes from `env` (set here; each test uses its own).
fn provider(fake: &FakeGce, env: &str, token: &str) -> GceProvider {
    std::env::set_var(env, token);
    GceProvider::new(&GceProviderSpec {
        project: PROJECT.into(),
        zone: ZONE.into(),
        machine_type: "n2-highmem-8".into(),
        source_image: "projects/debian-cloud/global/images/family/debian-12".into(),
        api_base: fake.api_base(),
        access_token_env: env.into(),
        server_url: "http://10.128.0.1:8085".into(),
        name_prefix: "pubrun".into(),
        ..Default::default()
    })
    .unwrap()
    .with_retry_base(Duration::from_millis(10))
}

fn launch(pool: &str, name: &str) -> MachineLaunch {
    MachineLaunch {
        pool: pool.into(),
        name: name.into(),
        server_url: "http://10.128.0.1:8085".into(),
        token: format!("agent-token-{pool}"),
        slots: 3,
        labels: BTreeMap::from([("team".to_string(), "Data.Eng".to_string())]),
    }
}

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    pubrun_testkit::within(what, WAIT, f).await
}

async fn wait_status(p: &GceProvider, name: &str, want: ProviderStatus) {
    provider_suite::reaches(p, name, want, WAIT).await
}

fn item(instance: &serde_json::Value, key: &str) -> Option<String> {
    instance["metadata"]["items"]
        .as_array()?
        .iter()
        .find(|i| i["key"] == key)
        .and_then(|i| i["value"].as_str().map(str::to_string))
}

#[tokio::test]
async fn keeps_the_provider_contract() {
    let fake = fake().await;
    let p = provider(&fake, "PUBRUN_TEST_GCE_TOKEN_CONTRACT", "fake-gce-token");
    let nth = |pool: &str, n: u32| launch(pool, &format!("pubrun-{pool}-{n}"));
    provider_suite::machine_contract(&provider_suite::Subject {
        provider: &p,
        pools: ["big", "small"],
        launch: &nth,
        patience: WAIT,
    })
    .await;
}

#[tokio::test]
async fn machine_lifecycle() {
    let fake = fake().await;
    let p = provider(&fake, "PUBRUN_TEST_GCE_TOKEN_LIFECYCLE", "fake-gce-token");
    assert_eq!(p.kind(), "gce");
    let l = launch("big", "pubrun-big-1");

    let link = within("start", p.start(&l)).await.unwrap();
    assert_eq!(
        link,
        format!(
            "{}projects/{PROJECT}/zones/{ZONE}/instances/pubrun-big-1",
            fake.api_base()
        )
    );
    // start() follows the insert to DONE, by which time the fake runs it.
    assert_eq!(
        p.status("pubrun-big-1").await.unwrap(),
        ProviderStatus::Running
    );

    let inst = fake.instance(PROJECT, ZONE, "pubrun-big-1").unwrap();
    assert_eq!(inst["kind"], "compute#instance");
    assert_eq!(inst["status"], "RUNNING");
    assert!(inst["machineType"]
        .as_str()
        .unwrap()
        .ends_with(&format!("/zones/{ZONE}/machineTypes/n2-highmem-8")));
    assert_eq!(inst["labels"]["pubrun-pool"], "big");
    assert_eq!(inst["labels"]["pubrun-machine"], "pubrun-big-1");
    // Label values are reduced to what Compute Engine allows.
    assert_eq!(inst["labels"]["team"], "data-eng");
    assert_eq!(
        item(&inst, "pubrun-token").as_deref(),
        Some("agent-token-big")
    );
    assert_eq!(
        item(&inst, "pubrun-server").as_deref(),
        Some("http://10.128.0.1:8085")
    );
    assert_eq!(item(&inst, "pubrun-pool").as_deref(), Some("big"));
    assert_eq!(item(&inst, "pubrun-name").as_deref(), Some("pubrun-big-1"));
    assert_eq!(item(&inst, "pubrun-slots").as_deref(), Some("3"));
    let script = item(&inst, "startup-script").unwrap();
    assert!(
        script.contains("pubrun-token") && script.contains("agent --server"),
        "{script}"
    );
    assert!(
        !script.contains("agent-token-big"),
        "the token is read at boot, not baked in"
    );
    assert!(inst["metadata"]["fingerprint"]
        .as_str()
        .is_some_and(|f| !f.is_empty()));

    // Another pool's machine does not show in this pool's list.
    within("start other", p.start(&launch("small", "pubrun-small-1")))
        .await
        .unwrap();
    assert_eq!(
        p.list("big").await.unwrap(),
        vec![("pubrun-big-1".to_string(), ProviderStatus::Running)]
    );
    assert_eq!(
        p.list("small").await.unwrap(),
        vec![("pubrun-small-1".to_string(), ProviderStatus::Running)]
    );
    assert!(p.list("nobody").await.unwrap().is_empty());

    // Stop: TERMINATED, still listed; stopping again is fine.
    within("stop", p.stop("pubrun-big-1", false)).await.unwrap();
    wait_status(&p, "pubrun-big-1", ProviderStatus::Stopped).await;
    assert_eq!(
        fake.instance(PROJECT, ZONE, "pubrun-big-1").unwrap()["status"],
        "TERMINATED"
    );
    within("stop again", p.stop("pubrun-big-1", false))
        .await
        .unwrap();
    assert_eq!(
        p.list("big").await.unwrap(),
        vec![("pubrun-big-1".to_string(), ProviderStatus::Stopped)]
    );

    // Start again: the insert conflicts (409) and the stopped one is started.
    let again = within("start again", p.start(&l)).await.unwrap();
    assert_eq!(again, link);
    wait_status(&p, "pubrun-big-1", ProviderStatus::Running).await;
    assert_eq!(
        fake.instance(PROJECT, ZONE, "pubrun-big-1").unwrap()["id"],
        inst["id"],
        "the same instance, not a new one"
    );
    // Starting a running machine is a no-op.
    assert_eq!(within("start running", p.start(&l)).await.unwrap(), link);

    // Delete: gone; deleting again and stopping a gone one are fine.
    within("delete", p.stop("pubrun-big-1", true))
        .await
        .unwrap();
    wait_status(&p, "pubrun-big-1", ProviderStatus::Gone).await;
    assert!(fake.instance(PROJECT, ZONE, "pubrun-big-1").is_none());
    within("delete again", p.stop("pubrun-big-1", true))
        .await
        .unwrap();
    within("stop gone", p.stop("pubrun-big-1", false))
        .await
        .unwrap();
    assert!(p.list("big").await.unwrap().is_empty());
    assert_eq!(p.status("never-was").await.unwrap(), ProviderStatus::Gone);

    // One instance, started again rather than re-created: the later
    // inserts were answered 409 and made no operation; the no-op stops and
    // deletes made none either.
    assert_eq!(
        fake.operations(PROJECT, ZONE, "pubrun-big-1"),
        ["insert", "stop", "start", "delete"]
    );
    let inserts = fake.inserts();
    assert_eq!(
        inserts
            .iter()
            .filter(|b| b["name"] == "pubrun-big-1")
            .count(),
        3
    );
    assert_eq!(
        inserts[0]["machineType"],
        format!("zones/{ZONE}/machineTypes/n2-highmem-8")
    );
}

#[tokio::test]
async fn bad_token_and_missing_token_are_refused() {
    let fake = fake().await;
    let p = provider(&fake, "PUBRUN_TEST_GCE_TOKEN_BAD", "not-the-token");
    let err = within("start", p.start(&launch("big", "pubrun-big-1")))
        .await
        .unwrap_err();
    match &err {
        ProviderError::Refused(m) => {
            assert!(
                m.contains("401") && m.contains("invalid authentication credentials"),
                "{m}"
            )
        }
        other => panic!("want Refused, got {other:?}"),
    }
    assert!(matches!(
        p.status("x").await,
        Err(ProviderError::Refused(_))
    ));
    assert!(fake.instance(PROJECT, ZONE, "pubrun-big-1").is_none());

    let p = provider(&fake, "PUBRUN_TEST_GCE_TOKEN_EMPTY", "");
    match p.list("big").await {
        Err(ProviderError::Refused(m)) => {
            assert!(m.contains("PUBRUN_TEST_GCE_TOKEN_EMPTY"), "{m}")
        }
        other => panic!("want Refused, got {other:?}"),
    }
}

#[tokio::test]
async fn token_from_the_metadata_server() {
    let fake = fake().await;
    let p = provider(&fake, "PUBRUN_TEST_GCE_TOKEN_UNUSED", "x");
    let spec = GceProviderSpec {
        project: PROJECT.into(),
        zone: ZONE.into(),
        machine_type: "e2-small".into(),
        source_image: "projects/debian-cloud/global/images/family/debian-12".into(),
        api_base: fake.api_base(),
        access_token_env: String::new(),
        server_url: "http://10.128.0.1:8085".into(),
        name_prefix: String::new(),
        ..Default::default()
    };
    drop(p);
    let p = GceProvider::new(&spec)
        .unwrap()
        .with_metadata_token_url(&fake.metadata_token_url());
    within("start", p.start(&launch("md", "pubrun-md-1")))
        .await
        .unwrap();
    assert_eq!(
        p.status("pubrun-md-1").await.unwrap(),
        ProviderStatus::Running
    );
}

#[tokio::test]
async fn invalid_requests_are_refused_with_googles_message() {
    let fake = fake().await;
    let p = provider(&fake, "PUBRUN_TEST_GCE_TOKEN_INVALID", "fake-gce-token");
    // A machine name Compute would refuse becomes a valid instance name;
    // the machine keeps its own name (from the metadata) in listings.
    within("odd name", p.start(&launch("big", "Bad_Name")))
        .await
        .unwrap();
    let inserted = fake.inserts();
    let iname = inserted.last().unwrap()["name"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        iname.starts_with("bad-name-") && iname.len() <= 63,
        "{iname}"
    );
    assert!(fake.instance(PROJECT, ZONE, &iname).is_some());
    assert_eq!(p.list("big").await.unwrap()[0].0, "Bad_Name");
    p.stop("Bad_Name", true).await.unwrap();
    wait_status(&p, "Bad_Name", ProviderStatus::Gone).await;

    // A capacity error recorded in the operation, not in the HTTP status.
    fake.fail_next_insert(
        "ZONE_RESOURCE_POOL_EXHAUSTED",
        "The zone does not have enough resources available.",
    );
    // Out of capacity is temporary (retry later or elsewhere), never Refused.
    match within("exhausted", p.start(&launch("big", "pubrun-big-2"))).await {
        Err(ProviderError::NoCapacity(m)) => {
            assert!(m.contains("ZONE_RESOURCE_POOL_EXHAUSTED"), "{m}")
        }
        other => panic!("want NoCapacity, got {other:?}"),
    }
    wait_status(&p, "pubrun-big-2", ProviderStatus::Gone).await;
    // The failure was for that insert only.
    within("retry", p.start(&launch("big", "pubrun-big-2")))
        .await
        .unwrap();

    // A name taken by a machine of another pool is not started for this one.
    match within("taken", p.start(&launch("other", "pubrun-big-2"))).await {
        Err(ProviderError::Refused(m)) => assert!(m.contains("not a machine of pool other"), "{m}"),
        other => panic!("want Refused, got {other:?}"),
    }
}

#[tokio::test]
async fn unreachable_api_is_unavailable() {
    // A port that was just free: nothing listens there.
    let port = pubrun_testkit::free_port();
    std::env::set_var("PUBRUN_TEST_GCE_TOKEN_DOWN", "t");
    let p = GceProvider::new(&GceProviderSpec {
        project: PROJECT.into(),
        zone: ZONE.into(),
        machine_type: "e2-small".into(),
        source_image: "img".into(),
        api_base: format!("http://127.0.0.1:{port}/compute/v1/"),
        access_token_env: "PUBRUN_TEST_GCE_TOKEN_DOWN".into(),
        server_url: "http://10.128.0.1:8085".into(),
        name_prefix: String::new(),
        ..Default::default()
    })
    .unwrap()
    .with_retry_base(Duration::from_millis(10));
    assert!(matches!(
        within("status", p.status("x")).await,
        Err(ProviderError::Unavailable(_))
    ));
    assert!(matches!(
        within("start", p.start(&launch("big", "pubrun-big-1"))).await,
        Err(ProviderError::Unavailable(_))
    ));
}

/// The boot hook runs the "agent" with the metadata's settings and the
/// token in its environment, and SIGTERMs it on stop. A shell script stands
/// in for `pubrun` and records what it got.
#[tokio::test]
async fn boot_hook_runs_and_stops_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    let script = out.join("fake-pubrun");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             d='{}'\n\
             echo \"$@\" > \"$d/args.tmp\" && mv \"$d/args.tmp\" \"$d/args\"\n\
             printf '%s' \"$PUBRUN_TOKEN\" > \"$d/token\"\n\
             trap 'echo term > \"$d/term\"; exit 0' TERM\n\
             while :; do sleep 0.05; done\n",
            out.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let fake = FakeGce::start(FakeGceConfig {
        agent_binary: Some(script),
        ..Default::default()
    })
    .await
    .unwrap();
    let p = provider(&fake, "PUBRUN_TEST_GCE_TOKEN_BOOT", "fake-gce-token");
    within("start", p.start(&launch("big", "pubrun-big-1")))
        .await
        .unwrap();

    wait_file(&out.join("args")).await;
    assert_eq!(
        std::fs::read_to_string(out.join("args")).unwrap().trim(),
        "agent --server http://10.128.0.1:8085 --pool big --name pubrun-big-1 --slots 3"
    );
    wait_file(&out.join("token")).await;
    assert_eq!(
        std::fs::read_to_string(out.join("token")).unwrap(),
        "agent-token-big"
    );
    assert!(fake.agent_pid(PROJECT, ZONE, "pubrun-big-1").is_some());

    within("stop", p.stop("pubrun-big-1", false)).await.unwrap();
    wait_file(&out.join("term")).await;
    wait_status(&p, "pubrun-big-1", ProviderStatus::Stopped).await;
    assert!(fake.agent_pid(PROJECT, ZONE, "pubrun-big-1").is_none());
}

async fn wait_file(path: &Path) {
    let start = Instant::now();
    while !path.exists() {
        assert!(start.elapsed() < WAIT, "{} never appeared", path.display());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
