//! Retention, snapshots and Seek on protobuf types: the [`PubSub`] methods
//! behind the Subscriber's snapshot RPCs, used by gRPC (`grpc.rs`) and REST
//! (`rest.rs`) alike.

use std::time::Duration;

use pubrun_broker::{ListRequest, SnapshotInfo};
use pubrun_core::names::SnapshotName;
use pubrun_core::{config::Labels, TopicName};
use pubrun_core::{Error, ProjectName, Result, SubscriptionConfig, SubscriptionName, TopicConfig};

use crate::grpc::{
    duration_from_pb, duration_to_pb, mask_paths, sub_to_pb, timestamp, topic_to_pb, PubSub,
};
use crate::pb;

/// A topic's `message_retention_duration` (bounds are checked by the broker).
pub fn topic_retention_from_pb(t: &pb::Topic) -> Result<Option<Duration>> {
    duration_from_pb("message_retention_duration", t.message_retention_duration)
}

fn snapshot_to_pb(s: SnapshotInfo) -> pb::Snapshot {
    pb::Snapshot {
        name: s.name,
        topic: s.topic,
        expire_time: Some(timestamp(s.expire_time_nanos)),
        labels: s.labels.into_iter().collect(),
    }
}

fn snapshot_name(name: &str) -> Result<SnapshotName> {
    if name.is_empty() {
        return Err(Error::invalid(
            "snapshot name must be set (projects/PROJECT/snapshots/ID)",
        ));
    }
    SnapshotName::parse(name)
}

impl PubSub {
    /// A topic as Google shows it, with its retention.
    pub fn topic_pb(&self, t: &TopicConfig) -> pb::Topic {
        pb::Topic {
            message_retention_duration: self.broker.topic_retention(&t.name).map(duration_to_pb),
            ..topic_to_pb(t)
        }
    }

    /// A subscription as Google shows it, with its topic's retention.
    pub fn sub_pb(&self, s: &SubscriptionConfig) -> pb::Subscription {
        pb::Subscription {
            topic_message_retention_duration: self
                .broker
                .topic_retention(&s.topic)
                .map(duration_to_pb),
            ..sub_to_pb(s)
        }
    }

    pub async fn create_snapshot(&self, r: pb::CreateSnapshotRequest) -> Result<pb::Snapshot> {
        // The REST mapping requires a name; so do we (no generated names).
        let name = snapshot_name(&r.name)?;
        let sub = SubscriptionName::parse(&r.subscription)?;
        if !r.tags.is_empty() {
            return Err(Error::invalid(
                "tags is not supported by this pubrun version; leave it unset",
            ));
        }
        let labels: Labels = r.labels.into_iter().collect();
        Ok(snapshot_to_pb(
            self.broker.create_snapshot(&name, &sub, labels).await?,
        ))
    }

    pub fn get_snapshot(&self, r: pb::GetSnapshotRequest) -> Result<pb::Snapshot> {
        Ok(snapshot_to_pb(
            self.broker.get_snapshot(&snapshot_name(&r.snapshot)?)?,
        ))
    }

    pub fn list_snapshots(&self, r: pb::ListSnapshotsRequest) -> Result<pb::ListSnapshotsResponse> {
        let project = ProjectName::parse(&r.project)?;
        let page =
            self.broker
                .list_snapshots(ListRequest::new(&project, r.page_size, &r.page_token))?;
        Ok(pb::ListSnapshotsResponse {
            snapshots: page.items.into_iter().map(snapshot_to_pb).collect(),
            next_page_token: page.next_page_token,
        })
    }

    pub fn list_topic_snapshots(
        &self,
        r: pb::ListTopicSnapshotsRequest,
    ) -> Result<pb::ListTopicSnapshotsResponse> {
        let topic = TopicName::parse(&r.topic)?;
        let page = self.broker.list_topic_snapshots(ListRequest::new(
            &topic,
            r.page_size,
            &r.page_token,
        ))?;
        Ok(pb::ListTopicSnapshotsResponse {
            snapshots: page.items,
            next_page_token: page.next_page_token,
        })
    }

    /// Only `labels` can change (the expire time follows from the backlog).
    pub async fn update_snapshot(&self, r: pb::UpdateSnapshotRequest) -> Result<pb::Snapshot> {
        let snap = r
            .snapshot
            .ok_or_else(|| Error::invalid("snapshot must be set"))?;
        let name = snapshot_name(&snap.name)?;
        let mut labels = None;
        for path in mask_paths(r.update_mask)? {
            match path.as_str() {
                "labels" => labels = Some(snap.labels.clone().into_iter().collect()),
                other => {
                    return Err(Error::invalid(format!(
                        "cannot update field \"{other}\" of a snapshot; supported: labels"
                    )))
                }
            }
        }
        let labels = labels.expect("the mask named labels");
        Ok(snapshot_to_pb(
            self.broker.update_snapshot_labels(&name, labels).await?,
        ))
    }

    pub async fn delete_snapshot(&self, r: pb::DeleteSnapshotRequest) -> Result<()> {
        self.broker
            .delete_snapshot(&snapshot_name(&r.snapshot)?)
            .await
    }

    pub async fn seek(&self, r: pb::SeekRequest) -> Result<pb::SeekResponse> {
        use pb::seek_request::Target;
        let sub = SubscriptionName::parse(&r.subscription)?;
        match r.target {
            Some(Target::Time(t)) => {
                if !(0..1_000_000_000).contains(&t.nanos) {
                    return Err(Error::invalid("time.nanos must be between 0 and 999999999"));
                }
                // Beyond i64 nanoseconds (year 2262) every message is older.
                let nanos = t
                    .seconds
                    .saturating_mul(1_000_000_000)
                    .saturating_add(t.nanos as i64);
                self.broker.seek_to_time(&sub, nanos).await?
            }
            Some(Target::Snapshot(s)) => {
                self.broker
                    .seek_to_snapshot(&sub, &snapshot_name(&s)?)
                    .await?
            }
            None => {
                return Err(Error::invalid(
                    "set exactly one of time and snapshot to seek to",
                ))
            }
        }
        Ok(pb::SeekResponse {})
    }
}
