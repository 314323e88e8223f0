//! The Pub/Sub REST v1 mapping, driven over real HTTP against an in-process server.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use common::{start, Server};
use reqwest::Method;
use serde_json::{json, Value};

struct Reply {
    status: u16,
    content_type: String,
    allow: Option<String>,
    body: Value,
}

impl Reply {
    fn ok(&self) -> &Value {
        assert_eq!(
            self.status, 200,
            "expected 200, got {}: {}",
            self.status, self.body
        );
        &self.body
    }

    /// Asserts Google's error shape: `{"error": {"code", "message", "status"}}`.
    fn error(&self, code: u16, status: &str, message_contains: &str) {
        assert_eq!(self.status, code, "body: {}", self.body);
        assert!(
            self.content_type.starts_with("application/json"),
            "content-type {}",
            self.content_type
        );
        let e = &self.body["error"];
        assert_eq!(e["code"], json!(code), "body: {}", self.body);
        assert_eq!(e["status"], json!(status), "body: {}", self.body);
        let msg = e["message"]
            .as_str()
            .unwrap_or_else(|| panic!("no message in {}", self.body));
        assert!(
            msg.contains(message_contains),
            "message {msg:?} should mention {message_contains:?}"
        );
    }
}

impl Server {
    async fn raw(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> Reply {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_string())
        };
        let content_type = header("content-type").unwrap_or_default();
        let allow = header("allow");
        let text = resp.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!("{path}: response is not JSON ({e}), status {status}: {text:?}")
        });
        Reply {
            status,
            content_type,
            allow,
            body,
        }
    }

    async fn call(&self, method: Method, path: &str, body: Value) -> Reply {
        self.raw(method, path, Some(serde_json::to_vec(&body).unwrap()))
            .await
    }

    /// Each call must fail in Google's error shape: (method, path, body,
    /// code, status, a piece of the message).
    async fn assert_errors<const N: usize>(
        &self,
        cases: [(Method, &str, Value, u16, &str, &str); N],
    ) {
        for (method, path, body, code, status, needle) in cases {
            self.call(method, path, body)
                .await
                .error(code, status, needle);
        }
    }

    async fn get(&self, path: &str) -> Reply {
        self.raw(Method::GET, path, None).await
    }

    async fn put(&self, path: &str, body: Value) -> Reply {
        self.call(Method::PUT, path, body).await
    }

    async fn post(&self, path: &str, body: Value) -> Reply {
        self.call(Method::POST, path, body).await
    }

    async fn patch(&self, path: &str, body: Value) -> Reply {
        self.call(Method::PATCH, path, body).await
    }

    async fn delete(&self, path: &str) -> Reply {
        self.raw(Method::DELETE, path, None).await
    }

    async fn topic(&self, project: &str, id: &str) {
        self.put(&format!("/v1/projects/{project}/topics/{id}"), json!({}))
            .await
            .ok();
    }

    async fn subscription(&self, project: &str, id: &str, topic: &str) {
        let body = json!({ "topic": format!("projects/{project}/topics/{topic}") });
        self.put(&format!("/v1/projects/{project}/subscriptions/{id}"), body)
            .await
            .ok();
    }

    async fn pull_now(&self, sub: &str) -> Value {
        self.post(
            &format!("/v1/{sub}:pull"),
            json!({"maxMessages": 100, "returnImmediately": true}),
        )
        .await
        .ok()
        .clone()
    }
}

fn received(pull: &Value) -> Vec<Value> {
    pull["receivedMessages"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[tokio::test]
async fn create_publish_pull_ack_round_trip() {
    let s = start().await;

    let t = s.put("/v1/projects/demo/topics/uploads", json!({})).await;
    let t = t.ok();
    assert_eq!(t["name"], "projects/demo/topics/uploads");
    assert_eq!(t["state"], "ACTIVE");
    assert!(t.get("labels").is_none(), "empty labels are omitted: {t}");

    let sub = s
        .put(
            "/v1/projects/demo/subscriptions/fit",
            json!({"topic": "projects/demo/topics/uploads", "ackDeadlineSeconds": 20, "labels": {"team": "ml"}}),
        )
        .await;
    let sub = sub.ok();
    assert_eq!(sub["name"], "projects/demo/subscriptions/fit");
    assert_eq!(sub["topic"], "projects/demo/topics/uploads");
    assert_eq!(sub["ackDeadlineSeconds"], 20);
    assert_eq!(sub["labels"], json!({"team": "ml"}));
    assert_eq!(sub["messageRetentionDuration"], "604800s");
    assert_eq!(sub["state"], "ACTIVE");
    assert_eq!(s.get("/v1/projects/demo/subscriptions/fit").await.ok(), sub);
    assert_eq!(s.get("/v1/projects/demo/topics/uploads").await.ok(), t);

    // Binary data in both base64 alphabets, with and without padding.
    let bin: Vec<u8> = vec![0xfb, 0xff, 0xfe, 0x00, 0x41];
    let before = chrono::Utc::now();
    let published = s
        .post(
            "/v1/projects/demo/topics/uploads:publish",
            json!({"messages": [
                {"data": STANDARD.encode(&bin), "attributes": {"objectId": "csv/a.csv", "eventType": "OBJECT_FINALIZE"}, "orderingKey": "k1"},
                {"data": URL_SAFE_NO_PAD.encode(&bin)},
                {"attributes": {"only": "attrs"}},
            ]}),
        )
        .await;
    let ids: Vec<String> = serde_json::from_value(published.ok()["messageIds"].clone()).unwrap();
    assert_eq!(ids.len(), 3);
    assert_eq!(
        ids.iter().collect::<BTreeSet<_>>().len(),
        3,
        "ids are distinct: {ids:?}"
    );

    let pulled = s
        .post(
            "/v1/projects/demo/subscriptions/fit:pull",
            json!({"maxMessages": 10}),
        )
        .await;
    let mut got = received(pulled.ok());
    assert_eq!(got.len(), 3, "{}", pulled.body);
    got.sort_by_key(|r| {
        r["message"]["messageId"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
    });
    for (r, id) in got.iter().zip(&ids) {
        assert_eq!(r["message"]["messageId"], json!(id));
        assert!(!r["ackId"].as_str().unwrap().is_empty());
        assert!(
            r.get("deliveryAttempt").is_none(),
            "no dead-letter policy, no deliveryAttempt: {r}"
        );
        let pt = r["message"]["publishTime"].as_str().unwrap();
        assert!(pt.ends_with('Z'), "publishTime is Z-normalized: {pt}");
        let parsed = chrono::DateTime::parse_from_rfc3339(pt)
            .unwrap_or_else(|e| panic!("{pt} is not RFC 3339: {e}"));
        let drift = (parsed.with_timezone(&chrono::Utc) - before).num_seconds();
        assert!(
            (0..60).contains(&drift) || drift == -1,
            "publishTime {pt} is now-ish"
        );
    }
    let m0 = &got[0]["message"];
    assert_eq!(STANDARD.decode(m0["data"].as_str().unwrap()).unwrap(), bin);
    assert_eq!(
        m0["attributes"],
        json!({"objectId": "csv/a.csv", "eventType": "OBJECT_FINALIZE"})
    );
    assert_eq!(m0["orderingKey"], "k1");
    let m1 = &got[1]["message"];
    assert_eq!(
        STANDARD.decode(m1["data"].as_str().unwrap()).unwrap(),
        bin,
        "URL-safe input decodes to the same bytes"
    );
    assert!(
        m1.get("attributes").is_none() && m1.get("orderingKey").is_none(),
        "empty fields are omitted: {m1}"
    );
    let m2 = &got[2]["message"];
    assert!(m2.get("data").is_none(), "empty data is omitted: {m2}");
    assert_eq!(m2["attributes"], json!({"only": "attrs"}));

    let ack_ids: Vec<Value> = got.iter().map(|r| r["ackId"].clone()).collect();
    let acked = s
        .post(
            "/v1/projects/demo/subscriptions/fit:acknowledge",
            json!({"ackIds": ack_ids}),
        )
        .await;
    assert_eq!(acked.ok(), &json!({}));

    // Acked messages do not come back, even after the 20 s deadline would matter.
    s.post(
        "/v1/projects/demo/subscriptions/fit:modifyAckDeadline",
        json!({"ackIds": ack_ids, "ackDeadlineSeconds": 0}),
    )
    .await
    .ok();
    let empty = s.pull_now("projects/demo/subscriptions/fit").await;
    assert_eq!(empty, json!({}), "an empty pull is {{}}");
}

#[tokio::test]
async fn pull_waits_for_a_message_published_meanwhile() {
    let s = Arc::new(start().await);
    s.topic("p", "events").await;
    s.subscription("p", "waiter", "events").await;
    let puller = {
        let s = s.clone();
        tokio::spawn(async move {
            s.post(
                "/v1/projects/p/subscriptions/waiter:pull",
                json!({"maxMessages": 1}),
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !puller.is_finished(),
        "pull without returnImmediately waits"
    );
    s.post(
        "/v1/projects/p/topics/events:publish",
        json!({"messages": [{"data": "aGk="}]}),
    )
    .await
    .ok();
    let r = tokio::time::timeout(Duration::from_secs(4), puller)
        .await
        .expect("pull answers once a message arrives")
        .unwrap();
    let got = received(r.ok());
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["message"]["data"], "aGk=");
}

#[tokio::test]
async fn modify_ack_deadline_zero_redelivers_and_longer_keeps_leased() {
    let s = start().await;
    s.topic("p", "jobs").await;
    s.subscription("p", "worker", "jobs").await;
    let sub = "projects/p/subscriptions/worker";
    let ids = s
        .post(
            "/v1/projects/p/topics/jobs:publish",
            json!({"messages": [{"data": "b25l"}]}),
        )
        .await;
    let id = ids.ok()["messageIds"][0].clone();

    let first = received(&s.pull_now(sub).await);
    assert_eq!(first.len(), 1);
    assert_eq!(first[0]["message"]["messageId"], id);
    let ack1 = first[0]["ackId"].clone();

    // Leased: nothing to pull. Extending keeps it leased.
    assert_eq!(s.pull_now(sub).await, json!({}));
    let ext = s
        .post(
            &format!("/v1/{sub}:modifyAckDeadline"),
            json!({"ackIds": [ack1], "ackDeadlineSeconds": "60"}),
        )
        .await;
    assert_eq!(ext.ok(), &json!({}));
    assert_eq!(s.pull_now(sub).await, json!({}));

    // Nack: redelivered at once.
    let nack = s
        .post(
            &format!("/v1/{sub}:modifyAckDeadline"),
            json!({"ackIds": [ack1], "ackDeadlineSeconds": 0}),
        )
        .await;
    assert_eq!(nack.ok(), &json!({}));
    let again = received(&s.pull_now(sub).await);
    assert_eq!(again.len(), 1, "nacked message is redelivered");
    assert_eq!(again[0]["message"]["messageId"], id);
    assert_eq!(again[0]["message"]["data"], "b25l");

    s.post(
        &format!("/v1/{sub}:acknowledge"),
        json!({"ackIds": [again[0]["ackId"]]}),
    )
    .await
    .ok();
    s.post(
        &format!("/v1/{sub}:modifyAckDeadline"),
        json!({"ackIds": [again[0]["ackId"]], "ackDeadlineSeconds": 0}),
    )
    .await
    .ok();
    assert_eq!(
        s.pull_now(sub).await,
        json!({}),
        "acked message stays acked"
    );

    s.post(
        &format!("/v1/{sub}:modifyAckDeadline"),
        json!({"ackIds": [ack1], "ackDeadlineSeconds": 601}),
    )
    .await
    .error(400, "INVALID_ARGUMENT", "601");
    s.post(&format!("/v1/{sub}:acknowledge"), json!({"ackIds": []}))
        .await
        .error(400, "INVALID_ARGUMENT", "ack_ids");
    s.post(
        &format!("/v1/{sub}:acknowledge"),
        json!({"ackIds": ["garbage"]}),
    )
    .await
    .error(400, "INVALID_ARGUMENT", "garbage");
    s.post(&format!("/v1/{sub}:pull"), json!({"maxMessages": 0}))
        .await
        .error(400, "INVALID_ARGUMENT", "max_messages");
    s.post(
        "/v1/projects/p/subscriptions/nope:pull",
        json!({"maxMessages": 1, "returnImmediately": true}),
    )
    .await
    .error(404, "NOT_FOUND", "projects/p/subscriptions/nope");
}

/// Follows nextPageToken until the end; returns every item and the page sizes.
async fn walk(s: &Server, path: &str, key: &str, page_size: usize) -> (Vec<Value>, Vec<usize>) {
    let mut items = Vec::new();
    let mut sizes = Vec::new();
    let mut token = String::new();
    loop {
        let enc: String = token.replace('/', "%2F");
        let r = s
            .get(&format!("{path}?pageSize={page_size}&pageToken={enc}"))
            .await;
        let body = r.ok().clone();
        let page = body[key].as_array().cloned().unwrap_or_default();
        sizes.push(page.len());
        items.extend(page);
        match body.get("nextPageToken").and_then(Value::as_str) {
            Some(t) => {
                assert!(!t.is_empty());
                token = t.to_string();
            }
            None => break,
        }
        assert!(sizes.len() < 20, "paging does not terminate");
    }
    (items, sizes)
}

#[tokio::test]
async fn lists_page_through_everything_once() {
    let s = start().await;
    for t in ["t-a", "t-b", "t-c", "t-d", "t-e"] {
        s.topic("paging", t).await;
    }
    s.topic("other", "t-x").await;
    for sub in ["s-1", "s-2", "s-3"] {
        s.subscription("paging", sub, "t-a").await;
    }
    s.subscription("paging", "s-4", "t-b").await;

    let (topics, sizes) = walk(&s, "/v1/projects/paging/topics", "topics", 2).await;
    assert_eq!(sizes, [2, 2, 1]);
    let names: Vec<&str> = topics.iter().map(|t| t["name"].as_str().unwrap()).collect();
    let want: Vec<String> = ["t-a", "t-b", "t-c", "t-d", "t-e"]
        .iter()
        .map(|t| format!("projects/paging/topics/{t}"))
        .collect();
    assert_eq!(names, want);
    assert!(topics.iter().all(|t| t["state"] == "ACTIVE"));

    // Default page size returns everything; pageToken also works unescaped and in snake_case.
    let all = s.get("/v1/projects/paging/topics").await;
    assert_eq!(all.ok()["topics"].as_array().unwrap().len(), 5);
    assert!(all.body.get("nextPageToken").is_none());
    let rest = s
        .get("/v1/projects/paging/topics?page_size=10&page_token=projects/paging/topics/t-c")
        .await;
    let rest: Vec<&str> = rest.ok()["topics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        rest,
        ["projects/paging/topics/t-d", "projects/paging/topics/t-e"]
    );

    let (subs, sizes) = walk(&s, "/v1/projects/paging/subscriptions", "subscriptions", 3).await;
    assert_eq!(sizes, [3, 1]);
    assert_eq!(subs.len(), 4);
    assert_eq!(subs[3]["name"], "projects/paging/subscriptions/s-4");
    assert_eq!(subs[3]["topic"], "projects/paging/topics/t-b");
    assert_eq!(
        subs[0]["ackDeadlineSeconds"], 10,
        "default ack deadline is reported"
    );

    let (names, sizes) = walk(
        &s,
        "/v1/projects/paging/topics/t-a/subscriptions",
        "subscriptions",
        2,
    )
    .await;
    assert_eq!(sizes, [2, 1]);
    assert_eq!(
        names,
        [
            json!("projects/paging/subscriptions/s-1"),
            json!("projects/paging/subscriptions/s-2"),
            json!("projects/paging/subscriptions/s-3")
        ]
    );

    assert_eq!(s.get("/v1/projects/empty/topics").await.ok(), &json!({}));
    assert_eq!(
        s.get("/v1/projects/paging/topics/t-c/subscriptions")
            .await
            .ok(),
        &json!({})
    );
    assert_eq!(
        s.get("/v1/projects/paging/topics/t-c/snapshots").await.ok(),
        &json!({})
    );
    for (path, code, status, names) in [
        ("topics/missing/subscriptions", 404, "NOT_FOUND", "missing"),
        ("topics?pageSize=abc", 400, "INVALID_ARGUMENT", "page_size"),
        ("topics?pageSize=-1", 400, "INVALID_ARGUMENT", "page_size"),
        ("topics?color=red", 400, "INVALID_ARGUMENT", "color"),
    ] {
        s.get(&format!("/v1/projects/paging/{path}"))
            .await
            .error(code, status, names);
    }
    // System parameters are accepted and ignored.
    assert_eq!(
        s.get("/v1/projects/paging/topics?alt=json&prettyPrint=false")
            .await
            .ok()["topics"]
            .as_array()
            .unwrap()
            .len(),
        5
    );
}

#[tokio::test]
async fn patch_updates_labels_and_ack_deadline() {
    let s = start().await;
    let t = s
        .put(
            "/v1/projects/p/topics/labelled",
            json!({"labels": {"env": "dev", "team": "a"}}),
        )
        .await;
    assert_eq!(t.ok()["labels"], json!({"env": "dev", "team": "a"}));

    let r = s
        .patch(
            "/v1/projects/p/topics/labelled",
            json!({"topic": {"labels": {"env": "prod"}}, "updateMask": "labels"}),
        )
        .await;
    assert_eq!(r.ok()["labels"], json!({"env": "prod"}));
    assert_eq!(r.body["name"], "projects/p/topics/labelled");
    assert_eq!(
        s.get("/v1/projects/p/topics/labelled").await.ok()["labels"],
        json!({"env": "prod"})
    );

    // Clearing labels omits them.
    let r = s
        .patch(
            "/v1/projects/p/topics/labelled",
            json!({"topic": {}, "updateMask": "labels"}),
        )
        .await;
    assert!(r.ok().get("labels").is_none(), "{}", r.body);

    s.patch(
        "/v1/projects/p/topics/labelled",
        json!({"topic": {"labels": {"a": "b"}}}),
    )
    .await
    .error(400, "INVALID_ARGUMENT", "update_mask");
    s.patch(
        "/v1/projects/p/topics/labelled",
        json!({"topic": {"kmsKeyName": "k"}, "updateMask": "kmsKeyName"}),
    )
    .await
    .error(400, "INVALID_ARGUMENT", "kms_key_name");
    s.patch(
        "/v1/projects/p/topics/ghost",
        json!({"topic": {"labels": {"a": "b"}}, "updateMask": "labels"}),
    )
    .await
    .error(404, "NOT_FOUND", "projects/p/topics/ghost");

    s.subscription("p", "worker", "labelled").await;
    let r = s
        .patch(
            "/v1/projects/p/subscriptions/worker",
            json!({"subscription": {"ackDeadlineSeconds": 30, "labels": {"tier": "gold"}}, "updateMask": "ackDeadlineSeconds,labels"}),
        )
        .await;
    assert_eq!(r.ok()["ackDeadlineSeconds"], 30);
    assert_eq!(r.body["labels"], json!({"tier": "gold"}));
    // snake_case mask paths and an int32 given as a string work too.
    let r = s
        .patch(
            "/v1/projects/p/subscriptions/worker",
            json!({"subscription": {"ackDeadlineSeconds": "45", "labels": {"x": "y"}}, "updateMask": "ack_deadline_seconds"}),
        )
        .await;
    assert_eq!(r.ok()["ackDeadlineSeconds"], 45);
    assert_eq!(
        r.body["labels"],
        json!({"tier": "gold"}),
        "labels not in the mask are unchanged"
    );
    let got = s.get("/v1/projects/p/subscriptions/worker").await;
    assert_eq!(got.ok()["ackDeadlineSeconds"], 45);

    s.patch(
        "/v1/projects/p/subscriptions/worker",
        json!({"subscription": {"filter": "x"}, "updateMask": "filter"}),
    )
    .await
    .error(400, "INVALID_ARGUMENT", "filter");
    s.patch(
        "/v1/projects/p/subscriptions/worker",
        json!({"subscription": {"ackDeadlineSeconds": 9000}, "updateMask": "ackDeadlineSeconds"}),
    )
    .await
    .error(400, "INVALID_ARGUMENT", "9000");
}

#[tokio::test]
async fn delete_topic_and_subscription() {
    let s = start().await;
    s.topic("p", "doomed").await;
    s.subscription("p", "orphan", "doomed").await;
    delete_for_good(&s, "projects/p/topics/doomed").await;
    s.post(
        "/v1/projects/p/topics/doomed:publish",
        json!({"messages": [{"data": "eA=="}]}),
    )
    .await
    .error(404, "NOT_FOUND", "doomed");
    // As in Google Pub/Sub, the subscription outlives its topic.
    assert_eq!(
        s.get("/v1/projects/p/subscriptions/orphan").await.ok()["topic"],
        "_deleted-topic_"
    );
    delete_for_good(&s, "projects/p/subscriptions/orphan").await;
}

/// Deletes the resource `name` (`projects/…/topics/…` or
/// `…/subscriptions/…`), which is then gone: a GET and a second DELETE
/// answer NOT_FOUND naming it.
async fn delete_for_good(s: &Server, name: &str) {
    let path = format!("/v1/{name}");
    assert_eq!(s.delete(&path).await.ok(), &json!({}));
    s.get(&path).await.error(404, "NOT_FOUND", name);
    s.delete(&path).await.error(404, "NOT_FOUND", name);
}

#[tokio::test]
async fn errors_use_googles_shape_and_codes() {
    let s = start().await;
    s.get("/v1/projects/p/topics/missing").await.error(
        404,
        "NOT_FOUND",
        "projects/p/topics/missing",
    );
    s.put(
        "/v1/projects/p/subscriptions/sub",
        json!({"topic": "projects/p/topics/missing"}),
    )
    .await
    .error(404, "NOT_FOUND", "projects/p/topics/missing");

    s.topic("p", "dup").await;
    s.put("/v1/projects/p/topics/dup", json!({})).await.error(
        409,
        "ALREADY_EXISTS",
        "projects/p/topics/dup",
    );
    s.subscription("p", "dup-sub", "dup").await;
    s.put(
        "/v1/projects/p/subscriptions/dup-sub",
        json!({"topic": "projects/p/topics/dup"}),
    )
    .await
    .error(409, "ALREADY_EXISTS", "dup-sub");

    #[rustfmt::skip]
    let cases = [
        // Bad names.
        (Method::PUT, "/v1/projects/p/topics/ab", json!({}), 400, "INVALID_ARGUMENT", "between 3 and 255"),
        (Method::PUT, "/v1/projects/p/topics/9lives", json!({}), 400, "INVALID_ARGUMENT", "must start with a letter"),
        (Method::PUT, "/v1/projects/p/topics/googly", json!({}), 400, "INVALID_ARGUMENT", "goog"),
        (Method::PUT, "/v1/projects/p/topics/a%2Fbcd", json!({}), 400, "INVALID_ARGUMENT", "'/'"),
        (Method::PUT, "/v1/projects/p/subscriptions/s1", json!({"topic": "projects/p/topics/dup"}), 400, "INVALID_ARGUMENT", "s1"),
        (Method::PUT, "/v1/projects/p/subscriptions/okname", json!({"topic": "topics/dup"}), 400, "INVALID_ARGUMENT", "topics/dup"),
        // Unknown fields, at the top level and nested.
        (Method::PUT, "/v1/projects/p/topics/fresh", json!({"labelz": {"a": "b"}}), 400, "INVALID_ARGUMENT", "labelz"),
        (Method::PUT, "/v1/projects/p/subscriptions/fresh", json!({"topic": "projects/p/topics/dup", "ackDeadline": 10}), 400, "INVALID_ARGUMENT", "ackDeadline"),
        (Method::POST, "/v1/projects/p/topics/dup:publish", json!({"messages": [{"data": "eA==", "attrs": {}}]}), 400, "INVALID_ARGUMENT", "attrs"),
        (Method::POST, "/v1/projects/p/subscriptions/dup-sub:pull", json!({"max": 1}), 400, "INVALID_ARGUMENT", "max"),
    ];
    s.assert_errors(cases).await;
    assert_eq!(
        s.get("/v1/projects/p/topics/fresh").await.status,
        404,
        "rejected creates create nothing"
    );

    // snake_case field names are accepted, as proto3 JSON parsers must.
    let r = s
        .put(
            "/v1/projects/p/subscriptions/snaky",
            json!({"topic": "projects/p/topics/dup", "ack_deadline_seconds": 33}),
        )
        .await;
    assert_eq!(r.ok()["ackDeadlineSeconds"], 33);

    // Malformed JSON and wrong JSON types.
    for bad in [
        &b"{"[..],
        b"{\"labels\": }",
        b"not json",
        b"[]",
        b"{\"labels\": 5}",
    ] {
        s.raw(
            Method::PUT,
            "/v1/projects/p/topics/broken",
            Some(bad.to_vec()),
        )
        .await
        .error(400, "INVALID_ARGUMENT", "Invalid JSON payload");
    }
    s.raw(
        Method::POST,
        "/v1/projects/p/topics/dup:publish",
        Some(b"{\"messages\": [".to_vec()),
    )
    .await
    .error(400, "INVALID_ARGUMENT", "Invalid JSON payload");
    s.put(
        "/v1/projects/p/subscriptions/s-int",
        json!({"topic": "projects/p/topics/dup", "ackDeadlineSeconds": "ten"}),
    )
    .await
    .error(400, "INVALID_ARGUMENT", "ack_deadline_seconds");

    // An empty body on PUT means an empty Topic.
    let r = s
        .raw(Method::PUT, "/v1/projects/p/topics/bodiless", None)
        .await;
    assert_eq!(r.ok()["name"], "projects/p/topics/bodiless");

    #[rustfmt::skip]
    let cases = [
        // Bad base64 names the message.
        (Method::POST, "/v1/projects/p/topics/dup:publish", json!({"messages": [{"data": "eA=="}, {"data": "%%%not-base64"}]}), 400, "INVALID_ARGUMENT", "messages[1].data"),
        // Publish validation comes from the broker, through the same path as gRPC.
        (Method::POST, "/v1/projects/p/topics/dup:publish", json!({"messages": []}), 400, "INVALID_ARGUMENT", "at least one message"),
        (Method::POST, "/v1/projects/p/topics/dup:publish", json!({"messages": [{}]}), 400, "INVALID_ARGUMENT", "message 0"),
        // Durations parse; unsupported settings are refused by the shared logic.
        (Method::PUT, "/v1/projects/p/topics/retained", json!({"messageRetentionDuration": "60s"}), 400, "INVALID_ARGUMENT", "message_retention_duration"),
        (Method::PUT, "/v1/projects/p/topics/retained", json!({"messageRetentionDuration": "ten minutes"}), 400, "INVALID_ARGUMENT", "Duration"),
        (Method::PUT, "/v1/projects/p/subscriptions/dead-letters", json!({"topic": "projects/p/topics/dup", "deadLetterPolicy": {"deadLetterTopic": "x"}}), 400, "INVALID_ARGUMENT", "dead_letter_policy"),
        // Nested messages are checked too, and their contents reach the shared logic.
        (Method::PUT, "/v1/projects/p/subscriptions/dead-letters", json!({"topic": "projects/p/topics/dup", "deadLetterPolicy": {"deadLetterTopik": "x"}}), 400, "INVALID_ARGUMENT", "deadLetterTopik"),
        (Method::PUT, "/v1/projects/p/subscriptions/expiring", json!({"topic": "projects/p/topics/dup", "expirationPolicy": {"ttl": "86400s"}}), 400, "INVALID_ARGUMENT", "expiration_policy"),
        (Method::PUT, "/v1/projects/p/subscriptions/expiring", json!({"topic": "projects/p/topics/dup", "expirationPolicy": {"ttl": "1 day"}}), 400, "INVALID_ARGUMENT", "expiration_policy.ttl"),
        (Method::PUT, "/v1/projects/p/subscriptions/pushy", json!({"topic": "projects/p/topics/dup", "pushConfig": {"pushEndpoint": "ftp://example.com/push"}}), 400, "INVALID_ARGUMENT", "push"),
    ];
    s.assert_errors(cases).await;
    // What Google returns for a pull subscription can be sent back as is.
    let echoed = json!({
        "topic": "projects/p/topics/dup", "pushConfig": {}, "ackDeadlineSeconds": 10,
        "messageRetentionDuration": "604800s", "expirationPolicy": {}, "state": "ACTIVE"
    });
    assert_eq!(
        s.put("/v1/projects/p/subscriptions/echoed", echoed)
            .await
            .ok()["state"],
        "ACTIVE"
    );

    // Unknown custom verb, unknown path, wrong method, unsupported feature.
    s.post("/v1/projects/p/topics/dup:frobnicate", json!({}))
        .await
        .error(404, "NOT_FOUND", "frobnicate");
    s.post("/v1/projects/p/subscriptions/dup-sub:publish", json!({}))
        .await
        .error(404, "NOT_FOUND", "publish");
    s.get("/v1/projects/p/widgets")
        .await
        .error(404, "NOT_FOUND", "/v1/projects/p/widgets");
    s.get("/v1/projects/p/topics/dup/extra/segments")
        .await
        .error(404, "NOT_FOUND", "extra");
    let r = s.get("/v1/projects/p/topics/dup:publish").await;
    r.error(405, "UNIMPLEMENTED", "POST");
    assert_eq!(r.allow.as_deref(), Some("POST"));
    let r = s.post("/v1/projects/p/topics/dup", json!({})).await;
    r.error(405, "UNIMPLEMENTED", "GET, PUT, PATCH, DELETE");
    s.call(Method::DELETE, "/v1/projects/p/topics", json!({}))
        .await
        .error(405, "UNIMPLEMENTED", "GET");
    s.post(
        "/v1/projects/p/subscriptions/dup-sub:seek",
        json!({"time": "2024-01-01T00:00:00Z", "snapshot": "projects/p/snapshots/abc"}),
    )
    .await
    .error(400, "INVALID_ARGUMENT", "oneof");
    assert_eq!(s.get("/v1/projects/p/snapshots").await.ok(), &json!({}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_message_is_rejected() {
    let s = start().await;
    s.topic("p", "big").await;
    s.subscription("p", "big-sub", "big").await;
    let too_big = vec![b'x'; 10 * 1024 * 1024 + 1];
    s.post(
        "/v1/projects/p/topics/big:publish",
        json!({"messages": [{"data": STANDARD.encode(&too_big)}]}),
    )
    .await
    .error(400, "INVALID_ARGUMENT", "10 MB");
    assert_eq!(
        s.pull_now("projects/p/subscriptions/big-sub").await,
        json!({}),
        "nothing was published"
    );

    // Just under the limit (data + attribute) goes through intact.
    let fits = vec![0xabu8; 10 * 1024 * 1024 - 10];
    s.post(
        "/v1/projects/p/topics/big:publish",
        json!({"messages": [{"data": STANDARD.encode(&fits), "attributes": {"k": "v"}}]}),
    )
    .await
    .ok();
    let got = received(&s.pull_now("projects/p/subscriptions/big-sub").await);
    assert_eq!(got.len(), 1);
    assert_eq!(
        STANDARD
            .decode(got[0]["message"]["data"].as_str().unwrap())
            .unwrap(),
        fits
    );
}
