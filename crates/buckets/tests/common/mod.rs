//! A bucket server over real HTTP on 127.0.0.1:0 with a real broker, and
//! helpers shared by the integration tests.

#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use pubrun_broker::Broker;
use pubrun_buckets::hash::{crc32c_b64, md5_b64, Hasher};
use pubrun_buckets::Buckets;
use pubrun_core::{SubscriptionConfig, SubscriptionName, TopicConfig, TopicName};
use pubrun_store::EmbeddedStore;
use serde_json::Value;
use tokio::sync::oneshot;

pub struct Server {
    pub base: String,
    pub http: reqwest::Client,
    pub buckets: Option<Buckets>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

pub fn open_broker(dir: &Path) -> Arc<Broker> {
    Broker::open(Arc::new(EmbeddedStore::open(dir.join("store")).unwrap())).unwrap()
}

pub async fn start(dir: &Path, broker: Arc<Broker>) -> Server {
    let buckets = Buckets::open(dir, broker).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // As `pubrun serve` does: links use the listen address.
    buckets
        .set_base_url(&pubrun_buckets::listen_base_url(addr))
        .unwrap();
    let app = pubrun_buckets::router(buckets.clone());
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    Server {
        base: format!("http://{addr}"),
        http: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap(),
        buckets: Some(buckets),
        stop: Some(tx),
        task: Some(task),
    }
}

/// A server over a fresh broker, both in a new temporary directory (which
/// lives as long as the returned `TempDir`).
pub async fn start_temp() -> (tempfile::TempDir, Arc<Broker>, Server) {
    let dir = tempfile::tempdir().unwrap();
    let broker = open_broker(dir.path());
    let s = start(dir.path(), broker.clone()).await;
    (dir, broker, s)
}

/// [`start_temp`] with one bucket created.
pub async fn start_with_bucket(bucket: &str) -> (tempfile::TempDir, Arc<Broker>, Server) {
    let (dir, broker, s) = start_temp().await;
    s.create_bucket(bucket).await;
    (dir, broker, s)
}

impl Server {
    /// Stops serving and drops every handle on the bucket service, so the
    /// same data directory can be opened again.
    pub async fn stop(mut self) {
        self.http = reqwest::Client::new();
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), self.task.take().unwrap())
            .await
            .unwrap()
            .unwrap();
        self.buckets.take();
        // Let the publisher task notice that its service is gone.
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(self.url(path)).send().await.unwrap()
    }

    /// GETs `path`, which must fail: its (status, reason, message).
    pub async fn get_error(&self, path: &str) -> (u16, String, String) {
        error_of(self.get(path).await).await
    }

    pub async fn delete(&self, path: &str) -> reqwest::Response {
        self.http.delete(self.url(path)).send().await.unwrap()
    }

    async fn send_json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &impl serde::Serialize,
    ) -> reqwest::Response {
        let request = self.http.request(method, self.url(path)).json(body);
        request.send().await.unwrap()
    }

    pub async fn post_json(&self, path: &str, body: &impl serde::Serialize) -> reqwest::Response {
        self.send_json(reqwest::Method::POST, path, body).await
    }

    pub async fn patch_json(&self, path: &str, body: &impl serde::Serialize) -> reqwest::Response {
        self.send_json(reqwest::Method::PATCH, path, body).await
    }

    pub async fn put_json(&self, path: &str, body: &impl serde::Serialize) -> reqwest::Response {
        self.send_json(reqwest::Method::PUT, path, body).await
    }

    pub fn buckets(&self) -> &Buckets {
        self.buckets.as_ref().unwrap()
    }

    pub async fn create_bucket(&self, name: &str) {
        let r = self
            .http
            .post(self.url("/storage/v1/b?project=p"))
            .json(&serde_json::json!({"name": name}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }

    /// Simple upload; returns the object resource.
    pub async fn put(&self, bucket: &str, name: &str, data: impl Into<reqwest::Body>) -> Value {
        let r = self.put_raw(bucket, name, data, "").await;
        let status = r.status();
        let body: Value = r.json().await.unwrap();
        assert_eq!(status, 200, "{body}");
        body
    }

    pub async fn put_raw(
        &self,
        bucket: &str,
        name: &str,
        data: impl Into<reqwest::Body>,
        query: &str,
    ) -> reqwest::Response {
        self.http
            .post(self.url(&format!(
                "/upload/storage/v1/b/{bucket}/o?uploadType=media&name={}{query}",
                enc(name)
            )))
            .header("content-type", "text/plain")
            .body(data)
            .send()
            .await
            .unwrap()
    }

    pub async fn get_bytes(&self, bucket: &str, name: &str) -> Vec<u8> {
        let r = self
            .http
            .get(self.url(&format!("/storage/v1/b/{bucket}/o/{}?alt=media", enc(name))))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap().to_vec()
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let r = self.http.get(self.url(path)).send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }
}

pub fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// Deterministic pseudo-random bytes.
pub fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn hashes(d: &[u8]) -> (String, String) {
    let mut h = Hasher::new();
    h.update(d);
    let d = h.finish();
    (md5_b64(&d.md5.unwrap()), crc32c_b64(d.crc32c))
}

/// Asserts Google's error shape and returns (status, reason, message).
pub async fn error_of(r: reqwest::Response) -> (u16, String, String) {
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap();
    let e = &v["error"];
    assert_eq!(e["code"], status, "{v}");
    assert_eq!(e["errors"][0]["domain"], "global", "{v}");
    assert_eq!(e["errors"][0]["message"], e["message"], "{v}");
    (
        status,
        e["errors"][0]["reason"].as_str().unwrap().to_string(),
        e["message"].as_str().unwrap().to_string(),
    )
}

pub async fn topic_with_sub(broker: &Broker, topic: &str, sub: &str) -> SubscriptionName {
    let t = TopicName::parse(&format!("projects/p/topics/{topic}")).unwrap();
    let _ = broker
        .create_topic(TopicConfig {
            name: t.to_string(),
            labels: Default::default(),
        })
        .await;
    let s = SubscriptionName::parse(&format!("projects/p/subscriptions/{sub}")).unwrap();
    broker
        .create_subscription(SubscriptionConfig {
            name: s.to_string(),
            topic: t.to_string(),
            ack_deadline_seconds: 60,
            ..Default::default()
        })
        .await
        .unwrap();
    s
}

/// Pulls and acks until `n` messages arrived or `wait` passed.
/// Whether no message comes to `sub` within 300 ms (acking any that does).
pub async fn nothing_arrives(broker: &Broker, sub: &SubscriptionName) -> bool {
    pull_n(broker, sub, 1, Duration::from_millis(300))
        .await
        .is_empty()
}

pub async fn pull_n(
    broker: &Broker,
    sub: &SubscriptionName,
    n: usize,
    wait: Duration,
) -> Vec<pubrun_broker::Delivered> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut out = Vec::new();
    while out.len() < n {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            break;
        }
        let got = broker
            .pull(sub, 100, Some(left.min(Duration::from_millis(500))))
            .await
            .unwrap();
        let ids: Vec<String> = got.iter().map(|d| d.ack_id.clone()).collect();
        if !ids.is_empty() {
            broker.acknowledge(sub, &ids).await.unwrap();
        }
        out.extend(got);
    }
    out
}
