//! Notification configs over HTTP and the messages they publish through the
//! broker: attributes, payload, filters, and the outbox across restarts.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use pubrun_broker::Delivered;
use pubrun_buckets::Buckets;
use serde_json::{json, Value};

/// Waits until every committed notification has been handed to the broker.
async fn settle(b: &Buckets) {
    for _ in 0..200 {
        if b.pending_notifications().await.unwrap() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("notifications still pending after 5s");
}

fn attrs(d: &Delivered) -> &BTreeMap<String, String> {
    &d.message.attributes
}

fn payload(d: &Delivered) -> Value {
    serde_json::from_slice(&d.message.data).unwrap()
}

#[tokio::test]
async fn notifications_carry_googles_attributes_and_payload() {
    let (_dir, broker, s) = start_temp().await;
    let uploads = topic_with_sub(&broker, "uploads", "uploads-sub").await;
    let all = topic_with_sub(&broker, "all", "all-sub").await;
    s.create_bucket("inbox").await;

    // Config 1: finalize events under csv/, JSON payload, custom attributes.
    let r = s
        .post_json(
            "/storage/v1/b/inbox/notificationConfigs",
            &json!({
                "topic": "//pubsub.googleapis.com/projects/p/topics/uploads",
                "payload_format": "JSON_API_V1",
                "event_types": ["OBJECT_FINALIZE"],
                "object_name_prefix": "csv/",
                "custom_attributes": {"team": "ml"},
            }),
        )
        .await;
    assert_eq!(r.status(), 200);
    let n1: Value = r.json().await.unwrap();
    assert_eq!(n1["kind"], "storage#notification");
    assert_eq!(
        n1["topic"],
        "//pubsub.googleapis.com/projects/p/topics/uploads"
    );
    assert_eq!(n1["event_types"], json!(["OBJECT_FINALIZE"]));
    assert_eq!(n1["object_name_prefix"], "csv/");
    assert_eq!(n1["custom_attributes"], json!({"team": "ml"}));
    let id1 = n1["id"].as_str().unwrap().to_string();
    // Config 2: every event, no payload, short topic form.
    let r = s
        .post_json(
            "/storage/v1/b/inbox/notificationConfigs",
            &json!({"topic": "projects/p/topics/all", "payload_format": "NONE"}),
        )
        .await;
    let n2: Value = r.json().await.unwrap();
    let id2 = n2["id"].as_str().unwrap().to_string();
    assert_ne!(id1, id2);
    let (_, list) = s.get_json("/storage/v1/b/inbox/notificationConfigs").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 2);
    let (st, got) = s
        .get_json(&format!("/storage/v1/b/inbox/notificationConfigs/{id1}"))
        .await;
    assert_eq!((st, &got), (200, &n1));

    // Upload under csv/.
    let o = s.put("inbox", "csv/a.csv", "x,y\n1,2\n").await;
    let g1 = o["generation"].as_str().unwrap().to_string();
    let m = pull_n(&broker, &uploads, 1, Duration::from_secs(5)).await;
    assert_eq!(m.len(), 1);
    let a = attrs(&m[0]);
    assert_eq!(
        a["notificationConfig"],
        format!("projects/_/buckets/inbox/notificationConfigs/{id1}")
    );
    assert_eq!(a["eventType"], "OBJECT_FINALIZE");
    assert_eq!(a["payloadFormat"], "JSON_API_V1");
    assert_eq!(a["bucketId"], "inbox");
    assert_eq!(a["objectId"], "csv/a.csv");
    assert_eq!(a["objectGeneration"], g1);
    assert_eq!(a["team"], "ml");
    assert!(
        chrono::DateTime::parse_from_rfc3339(&a["eventTime"]).is_ok(),
        "{}",
        a["eventTime"]
    );
    assert!(!a.contains_key("overwroteGeneration"));
    let p = payload(&m[0]);
    assert_eq!(p["kind"], "storage#object");
    assert_eq!(p["name"], "csv/a.csv");
    assert_eq!(p["bucket"], "inbox");
    assert_eq!(p["generation"], g1.as_str());
    assert_eq!(p["size"], "8");
    assert_eq!(p["md5Hash"], o["md5Hash"]);
    assert_eq!(p["crc32c"], o["crc32c"]);
    let m = pull_n(&broker, &all, 1, Duration::from_secs(5)).await;
    assert_eq!(m.len(), 1);
    assert_eq!(attrs(&m[0])["payloadFormat"], "NONE");
    assert_eq!(
        attrs(&m[0])["notificationConfig"],
        format!("projects/_/buckets/inbox/notificationConfigs/{id2}")
    );
    assert!(m[0].message.data.is_empty());

    // Outside the prefix: only config 2.
    s.put("inbox", "txt/b.txt", "b").await;
    let m = pull_n(&broker, &all, 1, Duration::from_secs(5)).await;
    assert_eq!(attrs(&m[0])["objectId"], "txt/b.txt");
    settle(s.buckets()).await;
    assert!(nothing_arrives(&broker, &uploads).await);

    // Overwrite: FINALIZE (overwroteGeneration) and DELETE of the old one (overwrittenByGeneration).
    let o2 = s.put("inbox", "csv/a.csv", "x,y\n3,4\n").await;
    let g2 = o2["generation"].as_str().unwrap().to_string();
    let m = pull_n(&broker, &uploads, 1, Duration::from_secs(5)).await;
    assert_eq!(attrs(&m[0])["overwroteGeneration"], g1);
    assert_eq!(attrs(&m[0])["objectGeneration"], g2);
    let m = pull_n(&broker, &all, 2, Duration::from_secs(5)).await;
    let kinds: Vec<(&str, &str)> = m
        .iter()
        .map(|d| {
            (
                attrs(d)["eventType"].as_str(),
                attrs(d)["objectGeneration"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("OBJECT_FINALIZE", g2.as_str()),
            ("OBJECT_DELETE", g1.as_str())
        ]
    );
    assert_eq!(attrs(&m[1])["overwrittenByGeneration"], g2);

    // Metadata update and delete reach config 2 only.
    s.patch_json(
        "/storage/v1/b/inbox/o/csv%2Fa.csv",
        &json!({"metadata": {"k": "v"}}),
    )
    .await;
    let m = pull_n(&broker, &all, 1, Duration::from_secs(5)).await;
    assert_eq!(attrs(&m[0])["eventType"], "OBJECT_METADATA_UPDATE");
    assert_eq!(attrs(&m[0])["objectGeneration"], g2);
    s.delete("/storage/v1/b/inbox/o/csv%2Fa.csv").await;
    let m = pull_n(&broker, &all, 1, Duration::from_secs(5)).await;
    assert_eq!(attrs(&m[0])["eventType"], "OBJECT_DELETE");
    assert!(!attrs(&m[0]).contains_key("overwrittenByGeneration"));

    // Copy and compose finalize objects too.
    s.http
        .post(s.url("/storage/v1/b/inbox/o/txt%2Fb.txt/copyTo/b/inbox/o/csv%2Fcopied.csv"))
        .send()
        .await
        .unwrap();
    let m = pull_n(&broker, &uploads, 1, Duration::from_secs(5)).await;
    assert_eq!(attrs(&m[0])["objectId"], "csv/copied.csv");
    s.post_json(
        "/storage/v1/b/inbox/o/csv%2Fcomposed.csv/compose",
        &json!({"sourceObjects": [{"name": "txt/b.txt"}, {"name": "csv/copied.csv"}]}),
    )
    .await;
    let m = pull_n(&broker, &uploads, 1, Duration::from_secs(5)).await;
    assert_eq!(attrs(&m[0])["objectId"], "csv/composed.csv");
    assert_eq!(payload(&m[0])["componentCount"], 2);
    pull_n(&broker, &all, 2, Duration::from_secs(5)).await;

    // A write that fails its precondition publishes nothing.
    let r = s
        .put_raw("inbox", "csv/copied.csv", "nope", "&ifGenerationMatch=0")
        .await;
    assert_eq!(r.status(), 412);
    settle(s.buckets()).await;
    assert!(nothing_arrives(&broker, &uploads).await);
    assert!(nothing_arrives(&broker, &all).await);

    // Deleting a config stops its messages.
    let r = s
        .delete(&format!("/storage/v1/b/inbox/notificationConfigs/{id2}"))
        .await;
    assert_eq!(r.status(), 204);
    s.put("inbox", "csv/later.csv", "l").await;
    assert_eq!(
        pull_n(&broker, &uploads, 1, Duration::from_secs(5))
            .await
            .len(),
        1
    );
    settle(s.buckets()).await;
    assert!(nothing_arrives(&broker, &all).await);
    assert_eq!(
        s.get_error(&format!("/storage/v1/b/inbox/notificationConfigs/{id2}"))
            .await
            .0,
        404
    );
    let r = s
        .delete(&format!("/storage/v1/b/inbox/notificationConfigs/{id2}"))
        .await;
    assert_eq!(error_of(r).await.0, 404);
    s.stop().await;
}

#[tokio::test]
async fn notification_config_validation() {
    let (_dir, broker, s) = start_temp().await;
    topic_with_sub(&broker, "topic1", "topic1-sub").await;
    s.create_bucket("bkt").await;
    let post = |body: Value| {
        let req = s
            .http
            .post(s.url("/storage/v1/b/bkt/notificationConfigs"))
            .json(&body);
        async move { error_of(req.send().await.unwrap()).await }
    };
    assert_eq!(post(json!({})).await.0, 400);
    assert_eq!(
        post(json!({"topic": "//pubsub.googleapis.com/projects/p/topics/"}))
            .await
            .0,
        400
    );
    assert_eq!(post(json!({"topic": "not a topic"})).await.0, 400);
    let (status, _, msg) = post(json!({"topic": "projects/p/topics/missing"})).await;
    assert_eq!(status, 404);
    assert!(msg.contains("projects/p/topics/missing"), "{msg}");
    assert_eq!(
        post(json!({"topic": "projects/p/topics/topic1", "payload_format": "XML"}))
            .await
            .0,
        400
    );
    assert_eq!(
        post(json!({"topic": "projects/p/topics/topic1", "event_types": ["OBJECT_EXPLODE"]}))
            .await
            .0,
        400
    );
    assert_eq!(
        post(json!({"topic": "projects/p/topics/topic1", "custom_attributes": {"googKey": "x"}}))
            .await
            .0,
        400
    );
    let r = s
        .post_json(
            "/storage/v1/b/nobucket/notificationConfigs",
            &json!({"topic": "projects/p/topics/topic1"}),
        )
        .await;
    assert_eq!(error_of(r).await.0, 404);
    assert_eq!(
        s.get_error("/storage/v1/b/bkt/notificationConfigs/999")
            .await
            .0,
        404
    );
    assert_eq!(
        s.get_error("/storage/v1/b/bkt/notificationConfigs/abc")
            .await
            .0,
        404
    );
    s.stop().await;
}

#[tokio::test]
async fn outbox_is_published_after_a_restart_and_orphans_are_removed() {
    let (dir, broker, s) = start_temp().await;
    let sub = topic_with_sub(&broker, "events", "events-sub").await;
    s.create_bucket("bkt").await;
    s.buckets()
        .create_notification(
            "bkt",
            pubrun_buckets::NotificationSpec {
                topic: "projects/p/topics/events".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    s.put("bkt", "kept", "k").await;
    assert_eq!(
        pull_n(&broker, &sub, 1, Duration::from_secs(5)).await.len(),
        1
    );
    settle(s.buckets()).await;
    s.stop().await;

    // As if the server died after committing an event but before publishing
    // it, and after writing a blob whose commit never happened.
    let root = dir.path().join("buckets");
    {
        let c = rusqlite::Connection::open(root.join("index.db")).unwrap();
        let attrs =
            json!({"eventType": "OBJECT_FINALIZE", "objectId": "crashed", "bucketId": "bkt"})
                .to_string();
        c.execute(
            "INSERT INTO outbox(topic, attributes, data, created_us) VALUES ('projects/p/topics/events', ?1, x'7B7D', 0)",
            [attrs],
        )
        .unwrap();
    }
    let orphan = root.join("blobs/ab/ab000000000000000000000000000000");
    std::fs::create_dir_all(orphan.parent().unwrap()).unwrap();
    std::fs::write(&orphan, "never committed").unwrap();
    std::fs::write(
        root.join("tmp/00000000000000000000000000000000"),
        "half written",
    )
    .unwrap();

    let s = start(dir.path(), broker.clone()).await;
    let m = pull_n(&broker, &sub, 1, Duration::from_secs(5)).await;
    assert_eq!(m.len(), 1, "the pending event is published at start");
    assert_eq!(m[0].message.attributes["objectId"], "crashed");
    settle(s.buckets()).await;
    assert!(!orphan.exists(), "an uncommitted blob is removed at start");
    assert_eq!(std::fs::read_dir(root.join("tmp")).unwrap().count(), 0);
    assert_eq!(
        s.get_bytes("bkt", "kept").await,
        b"k",
        "committed objects keep their blobs"
    );

    // A topic that went away does not block the outbox.
    broker
        .delete_topic(&pubrun_core::TopicName::parse("projects/p/topics/events").unwrap())
        .await
        .unwrap();
    s.put("bkt", "after-topic-delete", "x").await;
    settle(s.buckets()).await;
    s.put("bkt", "still-works", "y").await;
    assert_eq!(s.get_bytes("bkt", "still-works").await, b"y");
    s.stop().await;
}
