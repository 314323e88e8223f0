//! Webhooks over real HTTP into a real broker.

mod common;

use std::sync::Arc;

use pubrun_broker::Broker;
use pubrun_core::Message;
use pubrun_triggers::{github_signature, Triggers, WebhookSpec};
use reqwest::{RequestBuilder, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOPIC: &str = "projects/demo/topics/imports";
const SUB: &str = "projects/demo/subscriptions/imports-sub";
const SECRET: &str = "It's a Secret to Everybody";

struct Env {
    _dir: tempfile::TempDir,
    broker: Arc<Broker>,
    triggers: Arc<Triggers>,
    base: String,
    addr: std::net::SocketAddr,
    http: reqwest::Client,
}

fn env_lookup(k: &str) -> Option<String> {
    match k {
        "IMPORT_HOOK_SECRET" => Some(SECRET.into()),
        "IMPORT_BEARER" => Some("bearer-token-1".into()),
        _ => None,
    }
}

async fn env(hooks: Vec<WebhookSpec>) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let broker = common::broker(dir.path(), TOPIC, SUB).await;
    let triggers = Arc::new(
        Triggers::open(&dir.path().join("data"), broker.clone())
            .await
            .unwrap(),
    );
    triggers
        .set_webhooks_with_env(hooks, &env_lookup)
        .await
        .unwrap();
    let addr = common::serve(triggers.router()).await;
    Env {
        _dir: dir,
        broker,
        triggers,
        base: format!("http://{addr}"),
        addr,
        http: reqwest::Client::new(),
    }
}

impl Env {
    async fn drain(&self) -> Vec<Arc<Message>> {
        common::pull_acked(&self.broker, SUB).await
    }

    /// A POST to `/hooks/{path}` (`path` may carry a query string).
    fn post(&self, path: &str) -> RequestBuilder {
        self.http.post(format!("{}/hooks/{path}", self.base))
    }

    /// POSTs `body` to `/hooks/{path}`, signed the GitHub way with `secret`
    /// (which may be other than the body's own: `signed_body`).
    async fn signed(
        &self,
        path: &str,
        secret: &[u8],
        signed_body: &[u8],
        body: impl Into<reqwest::Body>,
    ) -> Response {
        self.post(path)
            .header("X-Hub-Signature-256", github_signature(secret, signed_body))
            .body(body)
            .send()
            .await
            .unwrap()
    }

    /// POSTs `body` to `/hooks/{path}` with `bearer` (if any) as the token.
    async fn post_body(&self, path: &str, bearer: Option<&str>, body: &'static str) -> Response {
        let mut req = self.post(path).body(body);
        if let Some(token) = bearer {
            req = req.bearer_auth(token);
        }
        req.send().await.unwrap()
    }
}

fn github_hook() -> WebhookSpec {
    let mut h = WebhookSpec::new("start-import", TOPIC);
    h.secret_env = Some("IMPORT_HOOK_SECRET".into());
    h.headers_as_attributes = vec!["X-GitHub-Event".into(), "x-github-delivery".into()];
    h.max_body_bytes = 1024;
    h
}

async fn assert_google_error(r: Response, code: u16, status: &str) -> String {
    assert_eq!(r.status().as_u16(), code);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], code, "{v}");
    assert_eq!(v["error"]["status"], status, "{v}");
    v["error"]["message"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn valid_github_signature_publishes_body_and_headers() {
    let e = env(vec![github_hook()]).await;
    let body = r#"{"ref":"refs/heads/main","after":"abc"}"#;
    let r = e
        .post("start-import")
        .header(
            "X-Hub-Signature-256",
            github_signature(SECRET.as_bytes(), body.as_bytes()),
        )
        .header("X-GitHub-Event", "push")
        .header("X-GitHub-Delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958")
        .header("X-Other", "not copied")
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    let id = v["messageId"].as_str().unwrap().to_string();

    let msgs = e.drain().await;
    assert_eq!(msgs.len(), 1);
    let m = &msgs[0];
    assert_eq!(m.id(), id);
    assert_eq!(&m.data[..], body.as_bytes());
    assert_eq!(m.attributes["x-github-event"], "push");
    assert_eq!(
        m.attributes["x-github-delivery"],
        "72d3162e-cc78-11e3-81ab-4c9367dc0958"
    );
    assert_eq!(m.attributes["webhook"], "start-import");
    assert!(!m.attributes.contains_key("x-other"));
    assert!(!m.attributes.contains_key("content-type"));
}

#[tokio::test]
async fn wrong_or_missing_signature_is_401_and_publishes_nothing() {
    let e = env(vec![github_hook()]).await;
    let body = r#"{"ref":"refs/heads/main"}"#;
    let hook = "start-import";

    let r = e
        .signed(hook, b"another secret", body.as_bytes(), body)
        .await;
    let msg = assert_google_error(r, 401, "UNAUTHENTICATED").await;
    assert!(msg.contains("does not match"), "{msg}");

    // Signed body, but a different body sent.
    let r = e.signed(hook, SECRET.as_bytes(), b"{}", body).await;
    assert_google_error(r, 401, "UNAUTHENTICATED").await;

    let r = e.post_body(hook, None, body).await;
    let msg = assert_google_error(r, 401, "UNAUTHENTICATED").await;
    assert!(msg.contains("missing X-Hub-Signature-256"), "{msg}");

    let r = e
        .post(hook)
        .header("X-Hub-Signature-256", "sha256=nothex")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_google_error(r, 401, "UNAUTHENTICATED").await;

    assert!(e.drain().await.is_empty(), "nothing may be published");
}

#[tokio::test]
async fn oversized_body_is_413() {
    let e = env(vec![github_hook()]).await;
    let body = vec![b'x'; 1025];
    let r = e
        .signed("start-import", SECRET.as_bytes(), &body, body.clone())
        .await;
    let msg = assert_google_error(r, 413, "INVALID_ARGUMENT").await;
    assert!(msg.contains("max_body_bytes = 1024"), "{msg}");

    // Exactly at the limit is fine.
    let body = vec![b'x'; 1024];
    let r = e
        .signed("start-import", SECRET.as_bytes(), &body, body.clone())
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(e.drain().await.len(), 1);
}

#[tokio::test]
async fn oversized_chunked_body_without_length_is_413() {
    let e = env(vec![github_hook()]).await;
    let mut s = tokio::net::TcpStream::connect(e.addr).await.unwrap();
    let mut req = String::from(
        "POST /hooks/start-import HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\nX-Hub-Signature-256: sha256=00\r\n\r\n",
    );
    for _ in 0..4 {
        req.push_str(&format!("200\r\n{}\r\n", "y".repeat(0x200)));
    }
    req.push_str("0\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).await.unwrap();
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
    assert!(resp.contains("\"status\":\"INVALID_ARGUMENT\""), "{resp}");
    assert!(e.drain().await.is_empty());
}

#[tokio::test]
async fn bearer_secret_alternative() {
    let mut h = WebhookSpec::new("bearer", TOPIC);
    h.bearer_secret_env = Some("IMPORT_BEARER".into());
    let e = env(vec![h]).await;

    let r = e.post_body("bearer", Some("bearer-token-1"), "hello").await;
    assert_eq!(r.status(), 200);
    let r = e.post_body("bearer", Some("bearer-token-2"), "hello").await;
    assert_eq!(r.headers()["www-authenticate"], "Bearer realm=\"pubrun\"");
    let msg = assert_google_error(r, 401, "UNAUTHENTICATED").await;
    assert!(msg.contains("wrong bearer secret"), "{msg}");
    let r = e.post_body("bearer", None, "hello").await;
    assert_google_error(r, 401, "UNAUTHENTICATED").await;

    let msgs = e.drain().await;
    assert_eq!(msgs.len(), 1);
    assert_eq!(&msgs[0].data[..], b"hello");
}

#[tokio::test]
async fn either_secret_when_both_are_configured() {
    let mut h = github_hook();
    h.bearer_secret_env = Some("IMPORT_BEARER".into());
    let e = env(vec![h]).await;
    let hook = "start-import";
    let r = e.post_body(hook, Some("bearer-token-1"), "a").await;
    assert_eq!(r.status(), 200);
    let r = e.signed(hook, SECRET.as_bytes(), b"b", "b").await;
    assert_eq!(r.status(), 200);
    let r = e.post_body(hook, Some("nope"), "c").await;
    assert_eq!(r.status(), 401);
    assert_eq!(e.drain().await.len(), 2);
}

#[tokio::test]
async fn query_parameters_as_attributes_and_open_hook() {
    let mut h = WebhookSpec::new("open", TOPIC);
    h.query_as_attributes = true;
    let e = env(vec![h]).await;
    let r = e
        .post("open?env=prod&file=a%20b.csv&tag=x&tag=y")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let msgs = e.drain().await;
    assert_eq!(msgs.len(), 1);
    let a = &msgs[0].attributes;
    assert_eq!(a["env"], "prod");
    assert_eq!(a["file"], "a b.csv");
    assert_eq!(a["tag"], "x,y");
    assert_eq!(a["webhook"], "open");
    assert!(msgs[0].data.is_empty());
}

#[tokio::test]
async fn unknown_hook_is_404_and_other_methods_405() {
    let e = env(vec![github_hook()]).await;
    let r = e.post_body("nope", None, "x").await;
    let msg = assert_google_error(r, 404, "NOT_FOUND").await;
    assert!(msg.contains("\"nope\""), "{msg}");
    let r = e
        .http
        .get(format!("{}/hooks/start-import", e.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert!(e.drain().await.is_empty());
}

#[tokio::test]
async fn missing_topic_is_reported_and_hooks_can_be_replaced() {
    let e = env(vec![WebhookSpec::new(
        "lost",
        "projects/demo/topics/missing",
    )])
    .await;
    let r = e.post_body("lost", None, "x").await;
    let msg = assert_google_error(r, 404, "NOT_FOUND").await;
    assert!(msg.contains("topic"), "{msg}");

    // Replacing the hooks takes effect at once; a bad set changes nothing.
    let mut bad = WebhookSpec::new("new", TOPIC);
    bad.secret_env = Some("UNSET_VARIABLE_FOR_TEST".into());
    let err = e
        .triggers
        .set_webhooks_with_env(vec![bad], &env_lookup)
        .await
        .unwrap_err();
    assert!(
        err.message.contains("UNSET_VARIABLE_FOR_TEST"),
        "{}",
        err.message
    );
    assert_eq!(e.triggers.list_webhooks().len(), 1);

    e.triggers
        .set_webhooks_with_env(vec![WebhookSpec::new("new", TOPIC)], &env_lookup)
        .await
        .unwrap();
    let r = e.post_body("lost", None, "x").await;
    assert_eq!(r.status(), 404);
    let r = e.post_body("new", None, "x").await;
    assert_eq!(r.status(), 200);
}
