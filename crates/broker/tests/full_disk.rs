//! A full disk fails publishes with UNAVAILABLE, loses nothing acknowledged,
//! replays nothing half-written, and recovers once space is freed. Uses a
//! real 4 MiB tmpfs, so it needs root (CI runs as root).

use std::path::{Path, PathBuf};
use std::process::Command;

use pubrun_core::{
    Code, OutgoingMessage, SubscriptionConfig, SubscriptionName, TopicConfig, TopicName,
};

mod common;
use common::open;

struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status();
        match ok {
            Ok(s) if s.success() => Some(Tmpfs(dir.to_path_buf())),
            _ => None,
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test]
async fn full_disk_loses_nothing_and_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("mnt");
    let Some(_fs) = Tmpfs::mount(&mnt, "4m") else {
        assert!(
            std::env::var("CI").is_err(),
            "CI must run as root so that this test can mount a tmpfs"
        );
        eprintln!("SKIPPED full_disk test: cannot mount tmpfs (not root?)");
        return;
    };
    let data = mnt.join("data");
    let topic = TopicName::parse("projects/p/topics/full").unwrap();
    let sub = SubscriptionName::parse("projects/p/subscriptions/full-sub").unwrap();
    let ballast = mnt.join("ballast");
    std::fs::write(&ballast, vec![0u8; 1024 * 1024]).unwrap();

    let mut acknowledged = Vec::new();
    {
        let b = open(&data);
        b.create_topic(TopicConfig {
            name: topic.to_string(),
            labels: Default::default(),
        })
        .await
        .unwrap();
        b.create_subscription(SubscriptionConfig {
            name: sub.to_string(),
            topic: topic.to_string(),
            labels: Default::default(),
            ack_deadline_seconds: 600,
            ..Default::default()
        })
        .await
        .unwrap();
        let mut failed = None;
        for i in 0..100 {
            let m = OutgoingMessage {
                data: vec![b'a' + (i % 26) as u8; 100 * 1024].into(),
                ..Default::default()
            };
            match b.publish(&topic, vec![m]).await {
                Ok(ids) => acknowledged.push(ids[0].clone()),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let err = failed.expect("a 4 MiB disk must fill up within 10 MB of publishes");
        assert_eq!(err.code, Code::Unavailable, "{err}");
        assert!(err.message.contains("storage"), "{err}");
        assert!(!acknowledged.is_empty());

        // Everything acknowledged is deliverable now, and nothing else.
        let got = b.pull(&sub, 1000, None).await.unwrap();
        let ids: Vec<String> = got.iter().map(|d| d.message.id()).collect();
        assert_eq!(ids, acknowledged);

        // Free space: publishing works again without a restart.
        std::fs::remove_file(&ballast).unwrap();
        let ids = b
            .publish(
                &topic,
                vec![OutgoingMessage {
                    data: "after".into(),
                    ..Default::default()
                }],
            )
            .await
            .unwrap();
        acknowledged.push(ids[0].clone());
    }
    let b = open(&data);
    let got = b.pull(&sub, 1000, None).await.unwrap();
    let ids: Vec<String> = got.iter().map(|d| d.message.id()).collect();
    assert_eq!(
        ids, acknowledged,
        "after restart: exactly the acknowledged publishes, in order"
    );
    assert_eq!(&got.last().unwrap().message.data[..], b"after");
}
