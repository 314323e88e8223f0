//! GCE pools on a connection (service-account key file, RS256 assertion
//! checked by a token endpoint here) against the Compute fake, and what a
//! real project needs: retries on "later" answers, temporary capacity
//! errors, the instance shape (service account, network, disks, GPUs,
//! spot), spot reclaim seen as gone.

use std::collections::BTreeMap;
use std::time::Duration;

use pubrun_core::connection::{ConnectionSpec, CredentialsSpec};
use pubrun_core::pool::{GceAccelerator, GceProviderSpec};
use pubrun_pools::provider::gce::GceProvider;
use pubrun_pools::provider::gce_fake::{FakeGce, FakeGceConfig};
use pubrun_pools::provider::{MachineLaunch, MachineProvider, ProviderError, ProviderStatus};
use pubrun_testkit::token_endpoint::{service_account_key, Grants, TokenEndpoint};
use serde_json::json;

mod provider_suite;

const PROJECT: &str = "theirs";
const ZONE: &str = "europe-west1-b";
const EMAIL: &str = "pools@theirs.iam.gserviceaccount.com";
const WAIT: Duration = Duration::from_secs(30);

struct Setup {
    fake: FakeGce,
    spec: GceProviderSpec,
    tokens: TokenEndpoint,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let fake = FakeGce::start(FakeGceConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (private_pem, public_pem) = pubrun_testkit::rsa_key(dir.path(), "k");
    let tokens = TokenEndpoint::start(Grants {
        public_pem,
        issuer: EMAIL.into(),
        refresh_token: None,
        token: Some(FakeGceConfig::default().token),
        expires_in: 3600,
    })
    .await;
    let key = dir.path().join("sa.json");
    let body = service_account_key(EMAIL, &private_pem, &tokens.url);
    std::fs::write(&key, body.to_string()).unwrap();
    let base = fake.api_base();
    let spec = GceProviderSpec {
        project: PROJECT.into(),
        zone: ZONE.into(),
        machine_type: "g2-standard-4".into(),
        source_image: "projects/debian-cloud/global/images/family/debian-12".into(),
        api_base: base.clone(),
        server_url: "http://10.0.0.2:8085".into(),
        connection: Some(ConnectionSpec {
            name: "gcp".into(),
            project: PROJECT.into(),
            credentials: CredentialsSpec::File {
                path: key.display().to_string(),
            },
            pubsub_endpoint: String::new(),
            storage_endpoint: String::new(),
            compute_endpoint: base.trim_end_matches("/compute/v1/").to_string(),
        }),
        ..Default::default()
    };
    Setup {
        fake,
        spec,
        tokens,
        _dir: dir,
    }
}

fn launch(name: &str) -> MachineLaunch {
    MachineLaunch {
        pool: "gpu".into(),
        name: name.into(),
        server_url: "http://10.0.0.2:8085".into(),
        token: "agent-token".into(),
        slots: 1,
        labels: BTreeMap::new(),
    }
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    pubrun_testkit::within(what, WAIT, f).await
}

/// A provider on `spec` that has started machine `pubrun-gpu-1`.
async fn started(spec: &GceProviderSpec) -> GceProvider {
    let p = GceProvider::new(spec).unwrap();
    within("start", p.start(&launch("pubrun-gpu-1")))
        .await
        .unwrap();
    p
}

async fn until_status(p: &GceProvider, name: &str, want: ProviderStatus) {
    provider_suite::reaches(p, name, want, WAIT).await
}

#[tokio::test]
async fn a_pool_on_a_connection_uses_its_key_file() {
    let s = setup().await;
    let p = started(&s.spec).await;
    until_status(&p, "pubrun-gpu-1", ProviderStatus::Running).await;
    assert_eq!(
        p.list("gpu").await.unwrap(),
        vec![("pubrun-gpu-1".to_string(), ProviderStatus::Running)]
    );
    // One exchange, cached for the token's life.
    assert_eq!(s.tokens.issued(), 1);

    // A key the token endpoint does not trust: refused, naming the connection.
    let dir = tempfile::tempdir().unwrap();
    let (other, _) = pubrun_testkit::rsa_key(dir.path(), "k");
    let bad = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        service_account_key(EMAIL, &other, &s.tokens.url).to_string(),
    )
    .unwrap();
    let mut spec = s.spec.clone();
    spec.connection.as_mut().unwrap().credentials = CredentialsSpec::File {
        path: bad.display().to_string(),
    };
    match within("bad key", GceProvider::new(&spec).unwrap().list("gpu")).await {
        Err(ProviderError::Refused(m)) => assert!(
            m.contains("connection gcp") && m.contains("invalid_grant"),
            "{m}"
        ),
        other => panic!("want Refused, got {other:?}"),
    }
}

#[tokio::test]
async fn busy_answers_are_retried_and_forbidden_is_not() {
    let s = setup().await;
    let p = GceProvider::new(&s.spec)
        .unwrap()
        .with_retry_base(Duration::from_millis(10));
    // 429, 503 and 403 rateLimitExceeded all mean "later".
    s.fake.fail_next_calls(1, 429, "rateLimitExceeded");
    s.fake.fail_next_calls(1, 503, "backendError");
    s.fake.fail_next_calls(1, 403, "rateLimitExceeded");
    let before = s.fake.calls();
    within("start", p.start(&launch("pubrun-gpu-1")))
        .await
        .unwrap();
    assert!(
        s.fake.calls() - before >= 4,
        "three refusals, then the insert"
    );
    assert_eq!(
        s.fake.operations(PROJECT, ZONE, "pubrun-gpu-1"),
        vec!["insert".to_string()]
    );

    // A real permission problem is not retried.
    s.fake.fail_next_calls(1, 403, "forbidden");
    let before = s.fake.calls();
    match within("forbidden", p.status("pubrun-gpu-1")).await {
        Err(ProviderError::Refused(m)) => assert!(m.contains("403"), "{m}"),
        other => panic!("want Refused, got {other:?}"),
    }
    assert_eq!(s.fake.calls() - before, 1);

    // Still busy after every attempt: Unavailable (try again later).
    s.fake.fail_next_calls(10, 503, "backendError");
    assert!(matches!(
        within("busy", p.status("pubrun-gpu-1")).await,
        Err(ProviderError::Unavailable(_))
    ));
}

#[tokio::test]
async fn instances_have_what_a_real_project_needs() {
    let s = setup().await;
    let mut spec = s.spec.clone();
    spec.service_account = "runner@theirs.iam.gserviceaccount.com".into();
    spec.subnetwork = "regions/europe-west1/subnetworks/batch".into();
    spec.external_ip = false;
    spec.disk_type = "pd-ssd".into();
    spec.disk_size_gb = 200;
    spec.accelerators = vec![GceAccelerator {
        accelerator_type: "nvidia-l4".into(),
        count: 1,
    }];
    spec.spot = true;
    let p = started(&spec).await;
    let body = s.fake.inserts().pop().unwrap();
    assert_eq!(
        body["serviceAccounts"],
        json!([{"email": "runner@theirs.iam.gserviceaccount.com", "scopes": ["https://www.googleapis.com/auth/cloud-platform"]}])
    );
    let nic = &body["networkInterfaces"][0];
    assert_eq!(nic["subnetwork"], "regions/europe-west1/subnetworks/batch");
    assert!(
        nic.get("network").is_none(),
        "the subnetwork implies its network: {nic}"
    );
    assert!(nic.get("accessConfigs").is_none(), "no external IP: {nic}");
    let init = &body["disks"][0]["initializeParams"];
    assert_eq!(init["diskType"], format!("zones/{ZONE}/diskTypes/pd-ssd"));
    assert_eq!(init["diskSizeGb"], "200");
    assert_eq!(
        body["guestAccelerators"],
        json!([{"acceleratorType": format!("zones/{ZONE}/acceleratorTypes/nvidia-l4"), "acceleratorCount": 1}])
    );
    let sched = &body["scheduling"];
    assert_eq!(sched["onHostMaintenance"], "TERMINATE");
    assert_eq!(sched["provisioningModel"], "SPOT");
    assert_eq!(sched["instanceTerminationAction"], "DELETE");
    assert_eq!(sched["automaticRestart"], false);

    // Reclaimed: gone (lease lost, replaced by the autoscaler), not restarted.
    until_status(&p, "pubrun-gpu-1", ProviderStatus::Running).await;
    s.fake.reclaim(PROJECT, ZONE, "pubrun-gpu-1");
    assert_eq!(
        p.status("pubrun-gpu-1").await.unwrap(),
        ProviderStatus::Gone
    );
    assert!(p.list("gpu").await.unwrap().is_empty());
}

#[tokio::test]
async fn defaults_keep_the_default_network_with_an_external_ip() {
    let s = setup().await;
    let _p = started(&s.spec).await;
    let body = s.fake.inserts().pop().unwrap();
    let nic = &body["networkInterfaces"][0];
    assert_eq!(nic["network"], "global/networks/default");
    assert_eq!(nic["accessConfigs"][0]["type"], "ONE_TO_ONE_NAT");
    assert!(
        body.get("scheduling").is_none() && body.get("serviceAccounts").is_none(),
        "{body}"
    );
}

#[tokio::test]
async fn a_zone_out_of_capacity_falls_back_to_the_next_zone() {
    let s = setup().await;
    let other = "europe-west1-c";
    let mut spec = s.spec.clone();
    spec.zones = vec![other.into()];
    let p = GceProvider::new(&spec).unwrap();
    s.fake.fail_next_insert(
        "ZONE_RESOURCE_POOL_EXHAUSTED",
        "The zone does not have enough resources available to fulfill the request.",
    );
    within("start", p.start(&launch("pubrun-gpu-1")))
        .await
        .unwrap();
    assert!(
        s.fake.instance(PROJECT, other, "pubrun-gpu-1").is_some(),
        "created in the next zone"
    );
    let bodies = s.fake.inserts();
    assert_eq!(bodies.len(), 2, "one insert per zone");
    assert_eq!(
        bodies[1]["machineType"],
        format!("zones/{other}/machineTypes/g2-standard-4")
    );
    until_status(&p, "pubrun-gpu-1", ProviderStatus::Running).await;
    assert_eq!(
        p.list("gpu").await.unwrap(),
        vec![("pubrun-gpu-1".to_string(), ProviderStatus::Running)]
    );

    // Stopped there, it is started there again by a provider that has
    // forgotten where it was (a server restart), not made twice.
    p.stop("pubrun-gpu-1", false).await.unwrap();
    until_status(&p, "pubrun-gpu-1", ProviderStatus::Stopped).await;
    let p = GceProvider::new(&spec).unwrap();
    within("restart", p.start(&launch("pubrun-gpu-1")))
        .await
        .unwrap();
    assert_eq!(s.fake.inserts().len(), 2, "no new insert");
    assert_eq!(
        s.fake.operations(PROJECT, other, "pubrun-gpu-1"),
        vec![
            "insert".to_string(),
            "stop".to_string(),
            "start".to_string()
        ]
    );
    p.stop("pubrun-gpu-1", true).await.unwrap();
    until_status(&p, "pubrun-gpu-1", ProviderStatus::Gone).await;
}
