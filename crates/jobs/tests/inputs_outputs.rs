//! Job inputs (the triggering object, a bucket prefix) staged into the
//! run's working directory, and outputs uploaded to a bucket afterwards.

mod common;

use std::path::Path;

use common::*;
use pubrun_buckets::{Buckets, NotificationSpec, ObjectMeta};
use pubrun_core::run::RunStatus;
use tokio::io::AsyncReadExt;

async fn with_buckets(dir: &Path) -> (Env, Buckets) {
    let env = env_in(dir, 2).await;
    let buckets = Buckets::open(dir, env.broker.clone()).unwrap();
    env.dispatcher.set_buckets(buckets.clone());
    for b in ["input", "shared", "output"] {
        buckets.ensure_bucket(b, PROJECT).await.unwrap();
    }
    (env, buckets)
}

async fn put(b: &Buckets, bucket: &str, name: &str, data: &str) {
    b.put_object(
        bucket,
        name,
        data.as_bytes(),
        ObjectMeta::default(),
        Default::default(),
    )
    .await
    .unwrap();
}

async fn read(b: &Buckets, bucket: &str, name: &str) -> (String, ObjectMeta) {
    let (row, mut f) = b
        .open_object(bucket, name, None, Default::default())
        .await
        .unwrap();
    let mut s = String::new();
    f.read_to_string(&mut s).await.unwrap();
    (s, row.meta)
}

const JOB: &str = r#"name = "stage"
topic = "uploads"
process = { command = "sh", args = ["-c", "cat in/*.csv shared/*; mkdir -p out; wc -c in/*.csv > out/result.txt"] }
inputs = [{ from = "trigger", to = "in/" }, { from = "gs://shared/", to = "shared/" }]
outputs = [{ from = "out/", to = "gs://output/results/{{ run.id }}/" }]
retries = { max_attempts = 3, initial_backoff = "1s", max_backoff = "1s" }
"#;

#[tokio::test(flavor = "multi_thread")]
async fn trigger_and_prefix_inputs_then_outputs_uploaded() {
    let dir = tempfile::tempdir().unwrap();
    let (env, buckets) = with_buckets(dir.path()).await;
    env.job(JOB, "uploads").await;
    buckets
        .create_notification(
            "input",
            NotificationSpec {
                topic: topic_name("uploads"),
                event_types: vec!["OBJECT_FINALIZE".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    put(&buckets, "shared", "notes.txt", "SHARED-CONTENT\n").await;
    put(&buckets, "input", "csv/data.csv", "a,b\n1,2\n").await;

    let run = env.first_run_end("stage").await;
    let log = env.log(run.id);
    assert_eq!(run.status, RunStatus::Succeeded, "{run:#?}\n{log}");
    assert!(log.contains("SHARED-CONTENT"), "{log}");
    assert!(log.contains("a,b"), "{log}");
    let (content, meta) = read(
        &buckets,
        "output",
        &format!("results/{}/result.txt", run.id),
    )
    .await;
    assert_eq!(content.trim(), "8 in/data.csv", "{log}");
    assert_eq!(
        meta.metadata.get("pubrun-run-id"),
        Some(&run.id.to_string())
    );
    assert_eq!(
        meta.metadata.get("pubrun-job").map(String::as_str),
        Some("stage")
    );
    assert_eq!(
        meta.metadata.get("pubrun-attempt").map(String::as_str),
        Some("1")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn trigger_input_without_attributes_fails_without_retry() {
    let dir = tempfile::tempdir().unwrap();
    let (env, _buckets) = with_buckets(dir.path()).await;
    env.job(JOB, "uploads").await;
    env.publish("uploads", &[("eventType", "OBJECT_FINALIZE")], "{}")
        .await;
    let run = env.first_run_end("stage").await;
    assert_eq!(run.status, RunStatus::Failed);
    assert_eq!(run.attempt, 1, "not retried: {run:#?}");
    let error = run_error(&run);
    assert!(
        error.starts_with("parameters:") && error.contains("bucketId"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn escaping_object_names_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let (env, buckets) = with_buckets(dir.path()).await;
    env.job(
        r#"name = "evil"
topic = "uploads"
process = { command = "sh", args = ["-c", "find shared -type f | sort"] }
inputs = [{ from = "gs://shared/", to = "shared/" }]
"#,
        "uploads",
    )
    .await;
    put(&buckets, "shared", "../evil", "x").await;
    put(&buckets, "shared", "a/../../../../evil2", "x").await;
    put(&buckets, "shared", "/evil3", "x").await;
    put(&buckets, "shared", "ok/file.txt", "fine").await;
    env.publish("uploads", &[], "go").await;
    let run = env.first_run_end("evil").await;
    let log = env.log(run.id);
    assert_eq!(run.status, RunStatus::Succeeded, "{log}");
    assert!(log.contains("shared/ok/file.txt"), "{log}");
    assert!(log.contains("skipped object \"../evil\""), "{log}");
    assert!(
        log.contains("skipped object \"a/../../../../evil2\""),
        "{log}"
    );
    assert!(log.contains("skipped object \"/evil3\""), "{log}");
    // Nothing named evil* anywhere in the data directory (blobs are stored by id).
    fn walk(d: &Path, found: &mut Vec<String>) {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            let p = e.path();
            if e.file_name().to_string_lossy().starts_with("evil") {
                found.push(p.display().to_string());
            }
            if e.file_type().unwrap().is_dir() {
                walk(&p, found);
            }
        }
    }
    let mut found = Vec::new();
    walk(dir.path(), &mut found);
    assert!(found.is_empty(), "{found:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_output_upload_fails_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let (env, _buckets) = with_buckets(dir.path()).await;
    env.job(
        r#"name = "nobucket"
topic = "uploads"
process = { command = "sh", args = ["-c", "mkdir -p out; echo hi > out/x"] }
outputs = [{ from = "out/", to = "gs://missing-bucket/r/" }]
"#,
        "uploads",
    )
    .await;
    env.publish("uploads", &[], "go").await;
    let run = env.first_run_end("nobucket").await;
    assert_eq!(run.status, RunStatus::Failed);
    let error = run_error(&run);
    assert!(
        error.starts_with("outputs:") && error.contains("missing-bucket"),
        "{error}"
    );
    assert!(env.log(run.id).contains("outputs:"), "{}", env.log(run.id));
}

/// `upload_outputs = "on_success"`: a failed attempt's half-written result is
/// not uploaded where a successful one belongs; the default uploads it.
#[tokio::test(flavor = "multi_thread")]
async fn outputs_of_a_failed_attempt_follow_upload_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let (env, buckets) = with_buckets(dir.path()).await;
    for (name, policy) in [
        ("careful", "upload_outputs = \"on_success\"\n"),
        ("default", ""),
    ] {
        let job = format!(
            "name = \"{name}\"\ntopic = \"{name}-in\"\n{policy}process = {{ command = \"sh\", args = [\"-c\", \"mkdir -p out; echo half > out/result.txt; exit 3\"] }}\noutputs = [{{ from = \"out/\", to = \"gs://output/{name}/\" }}]\n"
        );
        env.job(&job, &format!("{name}-in")).await;
        env.publish(&format!("{name}-in"), &[], "").await;
        let run = env.first_run_end(name).await;
        assert_eq!(run.status, RunStatus::Failed, "{run:#?}");
        let found = buckets
            .open_object(
                "output",
                &format!("{name}/result.txt"),
                None,
                Default::default(),
            )
            .await
            .is_ok();
        let log = env.log(run.id);
        if name == "careful" {
            assert!(
                !found,
                "on_success uploaded a failed attempt's output\n{log}"
            );
            assert!(log.contains("outputs not uploaded"), "{log}");
        } else {
            assert!(found, "the default uploads whatever the status\n{log}");
        }
    }
}
