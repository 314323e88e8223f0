//! Schedules and webhooks declared in a manifest, driven through the CLI and
//! plain HTTP against the real binary.

mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{Serve, ServeBuilder, BIN};

const MANIFEST: &str = include_str!("manifests/schedules-cli.toml");

fn start() -> Serve {
    start_with(MANIFEST)
}

fn start_with(manifest_text: &str) -> Serve {
    ServeBuilder::new()
        .config(manifest_text)
        .env("TEST_HOOK_SECRET", "s3cret-hook")
        .start()
}

fn cli(server: &Serve, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .args(["--addr", &format!("127.0.0.1:{}", server.port())])
        .env_remove("PUBRUN_TOKEN")
        .env_remove("PUBRUN_PROJECT")
        .output()
        .unwrap()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn schedules_list_pause_resume_run_now() {
    let s = start();
    let list = ok(&cli(&s, &["schedules", "list"]));
    assert!(
        list.contains("nightly-import")
            && list.contains("Europe/Berlin")
            && list.contains("active"),
        "{list}"
    );
    let paused = ok(&cli(&s, &["schedules", "pause", "nightly-import"]));
    assert!(paused.contains("paused"), "{paused}");
    let fired = ok(&cli(&s, &["schedules", "run-now", "nightly-import"]));
    assert!(fired.contains("fired now"), "{fired}");
    let pulled = ok(&cli(&s, &["pull", "imports-watch", "--ack"]));
    assert!(
        pulled.contains(r#"{"full": true}"#) && pulled.contains("schedule=nightly-import"),
        "{pulled}"
    );
    let resumed = ok(&cli(&s, &["schedules", "resume", "nightly-import"]));
    assert!(resumed.contains("active"), "{resumed}");
    let missing = cli(&s, &["schedules", "pause", "nope"]);
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("NOT_FOUND"),
        "{missing:?}"
    );
}

#[tokio::test]
async fn webhook_checks_the_signature_and_publishes_the_body() {
    let s = start();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = format!("http://127.0.0.1:{}/hooks/start-import", s.port());
    let body = r#"{"ref": "main"}"#;
    // The body POSTed to the hook with `headers`.
    let post = |headers: Vec<(&'static str, String)>| {
        let mut req = http.post(&url).body(body);
        for (name, value) in headers {
            req = req.header(name, value);
        }
        async { req.send().await.unwrap() }
    };
    let bad = post(vec![("x-hub-signature-256", "sha256=00".into())]).await;
    assert_eq!(bad.status(), 401);
    let sig = pubrun_triggers::github_signature(b"s3cret-hook", body.as_bytes());
    let good = post(vec![
        ("x-hub-signature-256", sig),
        ("x-github-event", "push".into()),
    ])
    .await;
    assert_eq!(good.status(), 200);
    let v: serde_json::Value = good.json().await.unwrap();
    assert!(
        v["messageId"].as_str().is_some_and(|id| !id.is_empty()),
        "{v}"
    );
    let pulled = ok(&cli(&s, &["pull", "imports-watch", "--ack", "--max", "10"]));
    assert!(
        pulled.contains(r#"{"ref": "main"}"#) && pulled.contains("x-github-event=push"),
        "{pulled}"
    );
    // Only the signed request was published.
    assert_eq!(pulled.matches("message id:").count(), 1, "{pulled}");
}

#[tokio::test]
async fn declared_buckets_notify_their_topic_and_reapply_is_unchanged() {
    let s = start();
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("pubrun.toml");
    std::fs::write(&manifest, MANIFEST).unwrap();
    let plan = ok(&cli(
        &s,
        &["apply", "-f", manifest.to_str().unwrap(), "--dry-run"],
    ));
    for line in ["bucket", "notification", "schedule", "webhook"] {
        assert!(
            plan.lines()
                .any(|l| l.contains(line) && l.contains("unchanged")),
            "{line} not unchanged:\n{plan}"
        );
    }
    // An upload under csv/ notifies `imports` with Google's attributes.
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = format!(
        "http://127.0.0.1:{}/upload/storage/v1/b/input/o?uploadType=media&name=csv/a.csv",
        s.port()
    );
    let up = http.post(&url).body("x,y\n1,2\n").send().await.unwrap();
    assert_eq!(up.status(), 200);
    // The notification is published just after the upload commits: pull
    // until it is there.
    let deadline = Instant::now() + Duration::from_secs(60);
    let pulled = loop {
        let pulled = ok(&cli(&s, &["pull", "imports-watch", "--ack", "--max", "10"]));
        if !pulled.trim().is_empty() || Instant::now() > deadline {
            break pulled;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        pulled.contains("eventType=OBJECT_FINALIZE") && pulled.contains("objectId=csv/a.csv"),
        "{pulled}"
    );

    // The same resources through the CLI.
    let buckets = ok(&cli(&s, &["buckets", "list"]));
    assert!(buckets.contains("input"), "{buckets}");
    let objects = ok(&cli(&s, &["objects", "list", "input", "--prefix", "csv/"]));
    assert!(
        objects.contains("csv/a.csv") && objects.contains("8"),
        "{objects}"
    );
    let hooks = ok(&cli(&s, &["webhooks", "list"]));
    assert!(
        hooks.contains("/hooks/start-import") && hooks.contains("hmac-sha256"),
        "{hooks}"
    );
    assert!(
        !hooks.contains("s3cret"),
        "secrets are never shown: {hooks}"
    );
    ok(&cli(&s, &["buckets", "create", "scratch-bucket"]));
    assert!(ok(&cli(&s, &["buckets", "list"])).contains("scratch-bucket"));
    ok(&cli(&s, &["buckets", "delete", "scratch-bucket"]));
    let not_empty = cli(&s, &["buckets", "delete", "input"]);
    assert!(
        !not_empty.status.success(),
        "deleting a non-empty bucket must fail"
    );
}

/// Cron and time-zone mistakes point at `file:line:column` of the value, as
/// every other manifest error does, and change nothing.
#[test]
fn cron_and_time_zone_errors_point_at_the_value() {
    let s = start();
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "cron = \"0 25 * * *\"\ntime_zone = \"UTC\"",
            5,
            "hour field",
        ),
        (
            "cron = \"0 3 * * *\"\ntime_zone = \"Mars/Olympus\"",
            6,
            "unknown time zone",
        ),
    ];
    for (fields, line, what) in cases {
        let manifest = dir.path().join("bad.toml");
        let text = format!(
            "project = \"tz\"\n[[topic]]\nname = \"ticks\"\n[[schedule]]\n{fields}\nname = \"nightly\"\ntopic = \"ticks\"\n"
        );
        std::fs::write(&manifest, text).unwrap();
        let path = manifest.to_str().unwrap();
        let o = cli(&s, &["apply", "-f", path]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "applied: {err}");
        let at = format!("{path}:{line}:");
        assert!(
            err.contains(&at) && err.contains(what) && err.contains("schedule \"nightly\""),
            "wanted {at}… {what}: {err}"
        );
    }
    let listed = ok(&cli(&s, &["schedules", "list"]));
    assert!(
        !listed.lines().any(|l| l.starts_with("nightly ")),
        "{listed}"
    );
}
