//! `pubrun serve` as a process: safe defaults, auth on gRPC, graceful stop.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use googleapis_tonic_google_pubsub_v1::google::pubsub::v1 as pb;
use pb::publisher_client::PublisherClient;

use common::{
    bearer, connect, create_topic_and_subscription, free_port, open_streaming_pull, Server,
};

fn pubrun(args: &[&str], data: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pubrun"));
    c.args(args)
        .arg("--data-dir")
        .arg(data)
        .env("PUBRUN_LOG", "warn")
        .env_remove("PUBRUN_TOKEN");
    c
}

/// `pubrun serve` on 127.0.0.1:`port` with its data in `data`.
fn serve_on(port: u16, data: &std::path::Path) -> Command {
    pubrun(&["serve", "--listen", &format!("127.0.0.1:{port}")], data)
}

#[test]
fn non_loopback_listen_requires_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let out = pubrun(&["serve", "--listen", "0.0.0.0:0"], dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to listen on 0.0.0.0:0") && err.contains("--token"),
        "{err}"
    );
}

#[test]
fn second_server_on_same_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut first = Server(serve_on(port, dir.path()).spawn().unwrap());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(connect(port));
    let out = serve_on(free_port(), dir.path()).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another pubrun process"), "{err}");
    assert!(
        first.0.try_wait().unwrap().is_none(),
        "the first server keeps running"
    );
}

#[tokio::test]
async fn grpc_requires_the_bearer_token_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _server = Server(
        serve_on(port, dir.path())
            .args(["--token", "s3cret"])
            .spawn()
            .unwrap(),
    );
    let ch = connect(port).await;
    let topic = pb::Topic {
        name: "projects/p/topics/auth-topic".into(),
        ..Default::default()
    };
    let err = PublisherClient::new(ch.clone())
        .create_topic(topic.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    assert!(err.message().contains("bearer token"), "{}", err.message());

    let wrong = bearer(Some("nope"), topic.clone());
    let err = PublisherClient::new(ch.clone())
        .create_topic(wrong)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    let right = bearer(Some("s3cret"), topic);
    let created = PublisherClient::new(ch)
        .create_topic(right)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.name, "projects/p/topics/auth-topic");

    // Health stays open for probes.
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    for (path, want) in [("/healthz", 200), ("/v1/projects/p/topics", 401)] {
        let got = http
            .get(format!("http://127.0.0.1:{port}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(got.status(), want, "{path}");
    }
}

#[tokio::test]
async fn sigterm_ends_open_streams_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut server = Server(
        serve_on(port, dir.path())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let ch = connect(port).await;
    let sub = "projects/p/subscriptions/term-sub";
    create_topic_and_subscription(&ch, "projects/p/topics/term", sub).await;
    let (tx, mut stream) = open_streaming_pull(&ch, sub, 10).await;

    let pid = server.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    // The open stream ends with UNAVAILABLE (clients reconnect) instead of hanging.
    let end = tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .expect("stream ended");
    match end {
        Err(status) => assert_eq!(status.code(), tonic::Code::Unavailable, "{status}"),
        Ok(None) => {}
        Ok(Some(m)) => panic!("unexpected message {m:?}"),
    }
    drop(tx);
    let status = tokio::task::spawn_blocking(move || {
        let s = server.0.wait().unwrap();
        std::mem::forget(server);
        s
    });
    let status = tokio::time::timeout(Duration::from_secs(30), status)
        .await
        .expect("server exited")
        .unwrap();
    assert!(status.success(), "graceful exit code, got {status}");
}
