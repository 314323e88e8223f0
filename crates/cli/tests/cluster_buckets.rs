//! Cluster mode, buckets: bucket metadata, objects, upload sessions and
//! object bytes live in PostgreSQL. Two real `pubrun serve --store
//! postgres://…` processes on one throwaway PostgreSQL: objects (one of
//! several MiB, i.e. several 1 MiB chunks) are uploaded through the owner
//! and a resumable upload is left half done; after `kill -9` of the owner
//! the standby takes over, serves every object back byte-exact, and
//! finishes the resumable upload the dead server started. The notification
//! config made through A is in force on B, and every object change is
//! published (at least once) through the surviving server.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use googleapis_tonic_google_pubsub_v1::google::pubsub::v1 as pb;
use pb::subscriber_client::SubscriberClient;

use common::{
    cluster_node, connect, create_topic_and_subscription, free_port, noise, pull_now, read_log,
    two_nodes, wait_answered_by, Serve,
};

const TOPIC: &str = "projects/cluster/topics/gcs";
const SUB: &str = "projects/cluster/subscriptions/gcs-sub";

const LEASE_TTL: Duration = Duration::from_secs(2);

fn start(url: &str, node: &str, data: &Path, port: u16, log: &Path) -> Serve {
    cluster_node(url, node, LEASE_TTL, data, port, log).spawn()
}

async fn upload(http: &reqwest::Client, port: u16, name: &str, data: Vec<u8>) {
    let r = http
        .post(format!(
            "http://127.0.0.1:{port}/upload/storage/v1/b/bkt/o?uploadType=media&name={name}"
        ))
        .header("content-type", "application/octet-stream")
        .body(data)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

/// The body of a `GET` of `path` on `port`, which must answer 200.
async fn get_ok(http: &reqwest::Client, port: u16, path: &str) -> Vec<u8> {
    let r = http
        .get(format!("http://127.0.0.1:{port}{path}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{path}");
    r.bytes().await.unwrap().to_vec()
}

async fn download(http: &reqwest::Client, port: u16, name: &str) -> Vec<u8> {
    let path = format!("/download/storage/v1/b/bkt/o/{name}?alt=media");
    get_ok(http, port, &path).await
}

async fn get_json(http: &reqwest::Client, port: u16, path: &str) -> serde_json::Value {
    serde_json::from_slice(&get_ok(http, port, path).await).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn objects_survive_kill_9_of_the_owner_byte_exact() {
    let (pg, _dirs, (data_a, data_b), (log_a, log_b)) = two_nodes();
    let read = read_log;
    let http = reqwest::Client::new();

    let port_a = free_port();
    let mut a = start(&pg.url(), "a", &data_a, port_a, &log_a);
    a.wait_healthy();

    let r = http
        .post(format!(
            "http://127.0.0.1:{port_a}/storage/v1/b?project=cluster"
        ))
        .json(&serde_json::json!({"name": "bkt", "labels": {"team": "ml"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    create_topic_and_subscription(&connect(port_a).await, TOPIC, SUB).await;
    let r = http
        .post(format!(
            "http://127.0.0.1:{port_a}/storage/v1/b/bkt/notificationConfigs"
        ))
        .json(
            &serde_json::json!({"topic": TOPIC, "payload_format": "JSON_API_V1",
                                  "event_types": ["OBJECT_FINALIZE"]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let big = noise(5 * (1 << 20) + 12_345, 1);
    let small = b"hello, cluster".to_vec();
    upload(&http, port_a, "big.bin", big.clone()).await;
    upload(&http, port_a, "dir%2Fsmall.txt", small.clone()).await;
    // Overwritten: only the last generation's bytes may come back.
    upload(&http, port_a, "over", b"first".to_vec()).await;
    upload(&http, port_a, "over", b"second".to_vec()).await;

    // A resumable upload: the session and its first chunk go through A.
    let resumable = noise(3 * (1 << 20) + 99, 2);
    let r = http
        .post(format!(
            "http://127.0.0.1:{port_a}/upload/storage/v1/b/bkt/o?uploadType=resumable&name=resumed.bin"
        ))
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let first = 2 * (1 << 20) + 256 * 1024;
    let r = http
        .put(&location)
        .header("content-range", format!("bytes 0-{}/*", first - 1))
        .body(resumable[..first].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 308);

    let port_b = free_port();
    let mut b = start(&pg.url(), "b", &data_b, port_b, &log_b);
    // B is a standby: calls through it are answered by A.
    wait_answered_by(port_b, "a", Duration::from_secs(60), || read(&log_b));
    a.child().kill().expect("SIGKILL A");
    a.child().wait().unwrap();
    wait_answered_by(port_b, "b", Duration::from_secs(60), || read(&log_b));
    assert!(b.child().try_wait().unwrap().is_none(), "{}", read(&log_b));

    // Everything is served by B, byte-exact.
    assert!(
        download(&http, port_b, "big.bin").await == big,
        "big.bin differs"
    );
    assert_eq!(download(&http, port_b, "dir%2Fsmall.txt").await, small);
    assert_eq!(download(&http, port_b, "over").await, b"second");
    let r = get_json(&http, port_b, "/storage/v1/b/bkt").await;
    assert_eq!(r["labels"]["team"], "ml");
    let list = get_json(&http, port_b, "/storage/v1/b/bkt/o").await;
    let names: Vec<&str> = common::array(&list, "items")
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["big.bin", "dir/small.txt", "over"]);
    assert_eq!(list["items"][0]["size"], big.len().to_string());

    // The upload A started resumes on B from where A acknowledged.
    let on_b = location.replace(&format!(":{port_a}/"), &format!(":{port_b}/"));
    let r = http
        .put(&on_b)
        .header("content-range", "bytes */*")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 308);
    assert_eq!(
        r.headers()["range"].to_str().unwrap(),
        format!("bytes=0-{}", first - 1)
    );
    let r = http
        .put(&on_b)
        .header(
            "content-range",
            format!("bytes {first}-{}/{}", resumable.len() - 1, resumable.len()),
        )
        .body(resumable[first..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert!(
        download(&http, port_b, "resumed.bin").await == resumable,
        "resumed.bin differs"
    );
    // The config made through A is in force on B; every change made
    // through either server is published (at least once) through B.
    upload(&http, port_b, "after", b"after".to_vec()).await;
    let mut sub = SubscriberClient::new(connect(port_b).await);
    let want: BTreeSet<String> = ["big.bin", "dir/small.txt", "over", "resumed.bin", "after"]
        .map(String::from)
        .into();
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen != want {
        assert!(
            Instant::now() < deadline,
            "notifications seen {seen:?}, want {want:?}\n{}",
            read(&log_b)
        );
        let msgs = pull_now(&mut sub, SUB, 100).await.unwrap();
        if msgs.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for m in msgs {
            let a = &m.message.unwrap().attributes;
            assert_eq!(a["eventType"], "OBJECT_FINALIZE");
            seen.insert(a["objectId"].clone());
        }
    }
    // Nothing of it stayed on a server's disk.
    assert!(!data_a.join("buckets").exists(), "A wrote bucket files");
    assert!(!data_b.join("buckets").exists(), "B wrote bucket files");
}
