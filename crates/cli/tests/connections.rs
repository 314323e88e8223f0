//! Jobs on a Google Cloud connection, end to end. There is no internet
//! here, so "Google" is a second `pubrun serve --token T2` (the same
//! Pub/Sub and Cloud Storage APIs: the client code paths are the real ones)
//! and a token endpoint in this test that checks the service-account JWT
//! assertion (RS256 signature against the key's public half, `aud`, `iss`,
//! `scope`, expiry) before it issues T2, with a short lifetime so the
//! client must refresh.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{fill, free_port, Serve, ServeBuilder};
use pubrun_testkit::rsa_key;
use pubrun_testkit::token_endpoint::{Grants, TokenEndpoint};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_pubrun");
const PATIENCE: Duration = Duration::from_secs(90);
const T2: &str = "t2-google-access-token";
const EMAIL: &str = "runner@theirs.iam.gserviceaccount.com";
/// Seconds a token lives: short, so the client refreshes during the test.
const TOKEN_LIFETIME: u64 = 1;

async fn token_endpoint(public_pem: String) -> TokenEndpoint {
    TokenEndpoint::start(Grants {
        public_pem,
        issuer: EMAIL.into(),
        refresh_token: None,
        token: Some(T2.into()),
        expires_in: TOKEN_LIFETIME,
    })
    .await
}

/// Every grant the client asked for was honoured, and the token it got
/// never reached the local server's log.
fn honoured_and_unlogged(tokens: &TokenEndpoint, local: &Serve) {
    assert_eq!(tokens.refused(), 0);
    assert!(!local.log().contains(T2), "the token reached the log");
}

fn key_file(dir: &Path, private_pem: &str, token_uri: &str) -> PathBuf {
    let p = dir.join("sa.json");
    let key = json!({
        "type": "service_account",
        "project_id": "theirs",
        "private_key_id": "k1",
        "private_key": private_pem,
        "client_email": EMAIL,
        "token_uri": token_uri,
    });
    std::fs::write(&p, key.to_string()).unwrap();
    p
}

/// A service-account key pair, a token endpoint trusting its public half
/// and the key file (in `dir`) naming that endpoint.
async fn trusted_key(dir: &Path) -> (TokenEndpoint, PathBuf) {
    let (private_pem, public_pem) = rsa_key(dir, "sa");
    let tokens = token_endpoint(public_pem).await;
    let key = key_file(dir, &private_pem, &tokens.url);
    (tokens, key)
}

/// The local `pubrun serve` (in `tmp/local`, on a free port) with `manifest`.
fn start_local(tmp: &Path, manifest: &str) -> Serve {
    start_serve(&tmp.join("local"), free_port(), manifest, None)
}

/// Both servers' logs, for failure messages.
fn both_logs(local: &Serve, google: &Serve) -> String {
    format!(
        "--- local ---\n{}\n--- google ---\n{}",
        local.log(),
        google.log()
    )
}

/// A downloaded object as trimmed text.
fn trimmed(out: Option<Vec<u8>>) -> Option<String> {
    out.map(|b| String::from_utf8_lossy(&b).trim().to_string())
}

/// A `pubrun serve` with its data, config and log (appended across
/// restarts) in `dir`.
fn start_serve(dir: &Path, port: u16, config: &str, token: Option<&str>) -> Serve {
    std::fs::create_dir_all(dir).unwrap();
    ServeBuilder::new()
        .dir(dir)
        .port(port)
        .config(config)
        .maybe_token(token)
        .log_level("info")
        .patience(PATIENCE)
        .append_log()
        .env_remove("GOOGLE_APPLICATION_CREDENTIALS")
        .start()
}

fn google_manifest() -> &'static str {
    include_str!("manifests/connections-google.toml")
}

fn local_manifest(key: &Path, google: u16) -> String {
    local_manifest_with(
        key,
        google,
        "mkdir -p out && wc -c < in/data.txt | tr -d ' ' > out/count.txt",
    )
}

/// The local manifest whose job runs `script` (after the input is staged).
fn local_manifest_with(key: &Path, google: u16, script: &str) -> String {
    fill(
        include_str!("manifests/connections-ours.toml"),
        &[
            ("key", &key.display()),
            ("google", &google),
            ("script", &format!("{script:?}")),
        ],
    )
}

/// A second pubrun server standing in for Google, with its data in `dir`
/// and on `port`, and a client for it.
fn start_google(dir: &Path, port: u16) -> (Serve, Google) {
    let google = start_serve(dir, port, google_manifest(), Some(T2));
    let g = Google {
        http: reqwest::Client::new(),
        base: google.addr(),
    };
    (google, g)
}

/// The "Google" side as a user would reach it: bearer T2.
struct Google {
    http: reqwest::Client,
    base: String,
}

impl Google {
    async fn upload(&self, name: &str, data: &[u8]) {
        let req = self
            .http
            .post(format!(
                "{}/upload/storage/v1/b/their-bucket/o?uploadType=media&name={name}",
                self.base
            ))
            .bearer_auth(T2)
            .header("content-type", "application/octet-stream")
            .body(data.to_vec());
        common::ok_json(req, "upload").await;
    }

    async fn download(&self, name: &str) -> Option<Vec<u8>> {
        let enc = name.replace('/', "%2F");
        let r = self
            .http
            .get(format!(
                "{}/storage/v1/b/their-bucket/o/{enc}?alt=media",
                self.base
            ))
            .bearer_auth(T2)
            .send()
            .await
            .unwrap();
        r.status()
            .is_success()
            .then_some(r.bytes().await.unwrap().to_vec())
    }

    /// Pulls (and acks) up to 10 messages of a subscription.
    async fn pull(&self, sub: &str, ack: bool) -> Vec<Value> {
        let r: Value = common::json_reply(
            self.http
                .post(format!(
                    "{}/v1/projects/theirs/subscriptions/{sub}:pull",
                    self.base
                ))
                .bearer_auth(T2)
                .json(&json!({ "maxMessages": 10, "returnImmediately": true })),
        )
        .await;
        let msgs: Vec<Value> = r["receivedMessages"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if ack && !msgs.is_empty() {
            let ids: Vec<Value> = msgs.iter().map(|m| m["ackId"].clone()).collect();
            let r = self
                .http
                .post(format!(
                    "{}/v1/projects/theirs/subscriptions/{sub}:acknowledge",
                    self.base
                ))
                .bearer_auth(T2)
                .json(&json!({ "ackIds": ids }))
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success());
        }
        msgs
    }

    /// Waits for the first result message(s) on `results-sub` (acked).
    async fn first_results(&self, logs: impl Fn() -> String) -> Vec<Value> {
        until(
            "a result on projects/theirs/topics/results",
            logs,
            || async {
                let m = self.pull("results-sub", true).await;
                (!m.is_empty()).then_some(m)
            },
        )
        .await
    }
}

async fn local_runs(http: &reqwest::Client, local: &Serve) -> Vec<Value> {
    let r: Value = common::json_reply(http.get(format!("{}/api/v1/runs", local.addr()))).await;
    r["runs"].as_array().cloned().unwrap_or_default()
}

/// A run's id as the result attributes carry it.
fn id_of(run: &Value) -> String {
    run["id"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| run["id"].to_string())
}

async fn until<T, F, Fut>(what: &str, log: impl Fn() -> String, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    common::poll_async(
        PATIENCE,
        Duration::from_millis(100),
        || {
            let next = f();
            async move { next.await.ok_or(()) }
        },
        |()| format!("timed out waiting for {what}\n{}", log()),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_file_connection_runs_jobs_on_google_resources_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let (tokens, key) = trusted_key(tmp.path()).await;

    let gport = free_port();
    let (google, g) = start_google(&tmp.path().join("google"), gport);
    let local = start_local(tmp.path(), &local_manifest(&key, gport));
    let logs = || both_logs(&local, &google);

    // The intake has exchanged the key for a token; let that token expire
    // so the calls below need a refreshed one.
    until("the first token", logs, || async {
        (tokens.issued() >= 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(TOKEN_LIFETIME) + Duration::from_millis(200)).await;

    g.upload("in/data.txt", b"hello, google\n").await;

    // The result arrives on the "Google" topic.
    let results = g.first_results(logs).await;
    assert_eq!(results.len(), 1, "{results:?}");
    let attrs = &results[0]["message"]["attributes"];
    assert_eq!(attrs["status"], "succeeded", "{results:?}\n{}", logs());
    assert_eq!(attrs["job"], "count-bytes");
    let run_id = attrs["run_id"].as_str().unwrap().to_string();

    // The output is in the "Google" bucket.
    let out = g.download(&format!("results/{run_id}/count.txt")).await;
    assert_eq!(trimmed(out), Some("14".to_string()), "{}", logs());

    // One run; the notification was acked once queued: nothing comes back.
    let http = reqwest::Client::new();
    let runs = local_runs(&http, &local).await;
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert!(
        g.pull("uploads-sub", false).await.is_empty(),
        "the notification was not acked\n{}",
        logs()
    );
    assert!(
        tokens.issued() >= 2,
        "the short-lived token was never refreshed"
    );
    honoured_and_unlogged(&tokens, &local);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_name_the_connection_and_ack_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, public_pem) = rsa_key(tmp.path(), "sa");
    // The key file holds a different key than the one the endpoint trusts.
    let (other_private, _) = rsa_key(tmp.path(), "other");
    let tokens = token_endpoint(public_pem).await;
    let key = key_file(tmp.path(), &other_private, &tokens.url);

    let gport = free_port();
    let (google, g) = start_google(&tmp.path().join("google"), gport);
    g.upload("in/data.txt", b"abc").await;
    let local = start_local(tmp.path(), &local_manifest(&key, gport));
    let logs = || both_logs(&local, &google);

    let line = until("the intake's error", logs, || async {
        local
            .log()
            .lines()
            .find(|l| l.contains("connection gcp:") && l.contains("invalid_grant"))
            .map(str::to_string)
    })
    .await;
    assert!(
        line.contains("projects/theirs/subscriptions/uploads-sub"),
        "{line}"
    );
    assert!(line.contains("sa.json"), "the key file is named: {line}");
    assert!(tokens.refused() >= 1);
    assert_eq!(tokens.issued(), 0);

    // No run, and the notification is still there for a working client.
    let http = reqwest::Client::new();
    assert!(local_runs(&http, &local).await.is_empty());
    let left = g.pull("uploads-sub", false).await;
    assert_eq!(left.len(), 1, "the message must not be acked: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_key_file_fails_the_apply_naming_connection_and_file() {
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("sa.json");
    std::fs::write(
        &key,
        r#"{"type":"service_account","client_email":"a@b","private_key":"not a key"}"#,
    )
    .unwrap();
    let cfg = tmp.path().join("pubrun.toml");
    std::fs::write(&cfg, local_manifest(&key, 9)).unwrap();
    let out = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--data-dir",
        ])
        .arg(tmp.path().join("data"))
        .arg("--config")
        .arg(&cfg)
        .env_remove("PUBRUN_TOKEN")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("connection gcp") && err.contains("sa.json") && err.contains("not an RSA key"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_google_side_restarting_mid_run_loses_nothing_and_duplicates_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (tokens, key) = trusted_key(tmp.path()).await;
    // Each run waits for its gate file: the test decides when it ends.
    let gates = tmp.path().join("gates");
    std::fs::create_dir_all(&gates).unwrap();
    let script = format!(
        "f=$(ls in); while [ ! -e {g}/$f ]; do sleep 0.05; done; mkdir -p out && wc -c < in/$f | tr -d ' ' > out/count.txt",
        g = gates.display()
    );

    let gport = free_port();
    let gdir = tmp.path().join("google");
    let (google, g) = start_google(&gdir, gport);
    let local = start_local(tmp.path(), &local_manifest_with(&key, gport, &script));
    let http = reqwest::Client::new();
    let logs = |google: &Serve| both_logs(&local, google);

    // The first upload is queued as a run, which then waits at its gate.
    g.upload("in/a.txt", b"first\n").await;
    let first = until(
        "the first run to be running",
        || logs(&google),
        || async {
            let runs = local_runs(&http, &local).await;
            (runs.len() == 1 && runs[0]["status"] == "running").then(|| id_of(&runs[0]))
        },
    )
    .await;

    // "Google" goes away mid-run and comes back on the same port and data.
    drop(google);
    let (google, g) = start_google(&gdir, gport);

    // The intake reconnects: a second upload becomes a second run.
    g.upload("in/b.txt", b"second!\n").await;
    let second = until(
        "the second run",
        || logs(&google),
        || async {
            let runs = local_runs(&http, &local).await;
            runs.iter().map(id_of).find(|id| *id != first)
        },
    )
    .await;
    std::fs::write(gates.join("a.txt"), "").unwrap();
    std::fs::write(gates.join("b.txt"), "").unwrap();

    // Both results reach the restarted "Google" topic, once each.
    let mut results: Vec<Value> = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    while results.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for two results: {results:?}\n{}",
            logs(&google)
        );
        results.extend(g.pull("results-sub", true).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut ids: Vec<String> = results
        .iter()
        .map(|m| {
            assert_eq!(m["message"]["attributes"]["status"], "succeeded", "{m}");
            m["message"]["attributes"]["run_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    ids.sort();
    let mut want = vec![first.clone(), second.clone()];
    want.sort();
    assert_eq!(ids, want, "one result per run\n{}", logs(&google));
    for (id, n) in [(&first, "6"), (&second, "8")] {
        let out = g.download(&format!("results/{id}/count.txt")).await;
        assert_eq!(trimmed(out), Some(n.to_string()));
    }

    // No duplicate run, nothing left unacked, nothing published twice.
    let runs = local_runs(&http, &local).await;
    assert_eq!(runs.len(), 2, "{runs:?}\n{}", logs(&google));
    assert!(
        g.pull("uploads-sub", false).await.is_empty(),
        "a notification was not acked\n{}",
        logs(&google)
    );
    assert!(
        g.pull("results-sub", true).await.is_empty(),
        "a result was published twice"
    );
    // (Refresh is covered by the end-to-end test, which outwaits a token.)
    honoured_and_unlogged(&tokens, &local);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_endpoint_is_named_and_the_intake_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let (_tokens, key) = trusted_key(tmp.path()).await;

    // The local server starts while "Google" is down.
    let gport = free_port();
    let local = start_local(tmp.path(), &local_manifest(&key, gport));
    let line = until(
        "the intake's error",
        || local.log(),
        || async {
            local
                .log()
                .lines()
                .find(|l| l.contains("connection gcp:") && l.contains("UNAVAILABLE"))
                .map(str::to_string)
        },
    )
    .await;
    assert!(
        line.contains("projects/theirs/subscriptions/uploads-sub"),
        "{line}"
    );
    assert!(
        line.contains(&format!("127.0.0.1:{gport}")),
        "the endpoint is named: {line}"
    );

    // "Google" comes up: the intake reconnects and the flow works.
    let (google, g) = start_google(&tmp.path().join("google"), gport);
    let logs = || both_logs(&local, &google);
    g.upload("in/data.txt", b"late\n").await;
    let results = g.first_results(logs).await;
    assert_eq!(
        results[0]["message"]["attributes"]["status"], "succeeded",
        "{results:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_inputs_and_outputs_cross_the_connection_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let (_tokens, key) = trusted_key(tmp.path()).await;
    let gport = free_port();
    let (google, g) = start_google(&tmp.path().join("google"), gport);
    let script = "mkdir -p out && cp in/big.bin out/copy.bin";
    let local = start_local(tmp.path(), &local_manifest_with(&key, gport, script));
    let logs = || both_logs(&local, &google);

    // 20 MiB + 1: three resumable chunks of 8 MiB, the last one short.
    let data: Vec<u8> = (0..(20u32 << 20) + 1)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    g.upload("in/big.bin", &data).await;
    let results = g.first_results(logs).await;
    let attrs = &results[0]["message"]["attributes"];
    assert_eq!(attrs["status"], "succeeded", "{results:?}\n{}", logs());
    let run_id = attrs["run_id"].as_str().unwrap();
    let out = g
        .download(&format!("results/{run_id}/copy.bin"))
        .await
        .expect("the output exists");
    assert_eq!(out.len(), data.len());
    assert!(out == data, "the output's bytes differ from the input's");
}
