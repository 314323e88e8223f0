//! The server container image as a user runs it: scripts/server-image.sh
//! builds it from this test's own (debug) binary, `docker run … serve
//! --listen 0.0.0.0:8085 --token T` starts it on a free host port, and the
//! official Pub/Sub gRPC client and the CLI drive it.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use googleapis_tonic_google_pubsub_v1::google::pubsub::v1 as pb;
use pb::publisher_client::PublisherClient;
use pb::subscriber_client::SubscriberClient;
use pubrun_testkit::run_ok;

const BIN: &str = env!("CARGO_BIN_EXE_pubrun");
const TOKEN: &str = "image-test-token";

/// The container, removed when dropped (also when the test panics).
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rm", "-f", &self.0]).output();
    }
}

fn docker(args: &[&str]) -> String {
    run_ok(
        &format!("docker {args:?}"),
        Command::new("docker").args(args),
    )
    .trim()
    .to_string()
}

fn authed<T>(msg: T) -> tonic::Request<T> {
    common::bearer(Some(TOKEN), msg)
}

#[tokio::test]
async fn server_image_serves_the_official_client() {
    if !pubrun_testkit::require_docker("server_image_serves_the_official_client") {
        return;
    }
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let image = format!("pubrun-server:test-{}", std::process::id());
    run_ok(
        "server-image.sh",
        Command::new("bash")
            .arg(format!("{root}/scripts/server-image.sh"))
            .args([BIN, &image]),
    );
    // Removed at the end; the container first (Drop order: reverse).
    struct Image(String);
    impl Drop for Image {
        fn drop(&mut self) {
            let _ = Command::new("docker").args(["rmi", "-f", &self.0]).output();
        }
    }
    let _image = Image(image.clone());

    // What the image declares, as the Dockerfile does.
    let config = docker(&[
        "image",
        "inspect",
        "-f",
        "{{.Config.User}}|{{json .Config.ExposedPorts}}|{{json .Config.Volumes}}|{{json .Config.Healthcheck.Test}}",
        &image,
    ]);
    assert!(config.starts_with("10001:10001|"), "{config}");
    assert!(
        config.contains("8085/tcp") && config.contains("/data"),
        "{config}"
    );
    assert!(config.contains("healthcheck"), "{config}");

    let port = common::free_port();
    let name = format!("pubrun-image-test-{}", std::process::id());
    let id = docker(&[
        "run",
        "-d",
        "--name",
        &name,
        // The image's 10 s interval, shortened so the test sees "healthy" soon.
        "--health-interval",
        "1s",
        "-p",
        &format!("127.0.0.1:{port}:8085"),
        "-e",
        "PUBRUN_LOG=warn",
        &image,
        "serve",
        "--listen",
        "0.0.0.0:8085",
        "--token",
        TOKEN,
    ]);
    let _container = Container(id.clone());

    // HEALTHCHECK (`pubrun healthcheck` inside, no curl) turns healthy.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let status = docker(&[
            "inspect",
            "-f",
            "{{.State.Status}} {{.State.Health.Status}}",
            &id,
        ]);
        if status == "running healthy" {
            break;
        }
        assert!(
            !status.starts_with("exited") && Instant::now() < deadline,
            "container not healthy ({status}):\n{}",
            docker(&["logs", &id])
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        docker(&["exec", &id, "id", "-u"]),
        "10001",
        "runs as non-root"
    );

    let ch = common::connect(port).await;
    let topic = "projects/demo/topics/image-topic";
    let sub = "projects/demo/subscriptions/image-sub";
    let err = PublisherClient::new(ch.clone())
        .create_topic(pb::Topic {
            name: topic.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::Unauthenticated,
        "the token is enforced"
    );
    common::create_topic_and_subscription_as(&ch, Some(TOKEN), topic, sub).await;
    PublisherClient::new(ch.clone())
        .publish(authed(pb::PublishRequest {
            topic: topic.into(),
            messages: vec![pb::PubsubMessage {
                data: b"from the image test".to_vec().into(),
                ..Default::default()
            }],
        }))
        .await
        .unwrap();
    let pulled = SubscriberClient::new(ch.clone())
        .pull(authed(pb::PullRequest {
            subscription: sub.into(),
            max_messages: 10,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pulled.received_messages.len(), 1);
    assert_eq!(
        &pulled.received_messages[0].message.as_ref().unwrap().data[..],
        b"from the image test"
    );

    // The CLI against the container: the data lands in the /data volume.
    let out = run_ok(
        "pubrun topics list",
        Command::new(BIN)
            .args(["topics", "list"])
            .env("PUBRUN_ADDR", format!("127.0.0.1:{port}"))
            .env("PUBRUN_TOKEN", TOKEN),
    );
    assert!(out.contains("image-topic"));
    let ls = docker(&["exec", &id, "ls", "/data"]);
    assert!(!ls.is_empty(), "state is kept in /data");
}
