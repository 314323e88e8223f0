//! Jobs on a connection: the remote intake (StreamingPull on the
//! connection's subscription, a run queued per message through the same
//! run store path as local intakes, acked only once queued), results
//! published to the connection's topic. Its inputs and outputs go through
//! the connection's Cloud Storage in `staging.rs`, by the same steps as a
//! local job's.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use pubrun_connections::pubsub::{PubsubMessage, ReceivedMessage};
use pubrun_connections::{ConnError, Connection, ErrorKind};
use pubrun_core::connection::ConnectionSpec;
use pubrun_core::job::JobSpec;
use pubrun_core::{Error, OutgoingMessage, Result, TopicName};

use super::{dedup_key, now_ms, rfc3339_nanos, Dispatcher};
use crate::runstore::{Batch, SourceMessage};

/// The lease asked for on the connection's messages, and how often it is
/// extended while a batch waits to be queued.
const ACK_DEADLINE_S: i32 = 60;
const EXTEND_EVERY: Duration = Duration::from_secs(20);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

impl Dispatcher {
    /// The clients of a connection, made once per (name, spec): a changed
    /// spec (new endpoint, other key file) gets new clients.
    pub(super) fn connection(
        &self,
        spec: &ConnectionSpec,
    ) -> std::result::Result<Arc<Connection>, ConnError> {
        let mut map = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(&spec.name) {
            if &c.spec == spec {
                return Ok(c.clone());
            }
        }
        let c = Arc::new(Connection::new(spec.clone())?);
        map.insert(spec.name.clone(), c.clone());
        Ok(c)
    }

    /// `put_job` for a job on a connection: nothing is created on the
    /// connection's side (its subscription and topics are the user's); the
    /// credentials are loaded now so a bad key file fails the apply.
    pub(super) async fn put_remote_job(self: &Arc<Self>, spec: JobSpec) -> Result<()> {
        let c = spec.connection.as_ref().expect("a job on a connection");
        self.connection(c)
            .map_err(|e| Error::invalid(format!("job {}: {e}", spec.name)))?;
        pubrun_core::SubscriptionName::parse(&spec.subscription)?;
        if !spec.result_topic.is_empty() {
            TopicName::parse(&spec.result_topic)?;
        }
        // A job that was local before leaves its local subscription behind.
        if let Ok(old) = self.job(&spec.name) {
            if old.connection.is_none() {
                if let Ok(t) = TopicName::parse(&old.topic) {
                    if let Ok(sub) = pubrun_core::SubscriptionName::parse(
                        &pubrun_core::manifest::job_subscription(t.project().id(), &old.name),
                    ) {
                        match self.broker.delete_subscription(&sub).await {
                            Ok(_) => {}
                            Err(e) if e.code == pubrun_core::Code::NotFound => {}
                            Err(e) => {
                                tracing::warn!(subscription = %sub, error = %e, "could not delete the job's old local subscription")
                            }
                        }
                    }
                }
            }
        }
        self.store.put_job(&spec).await?;
        self.start_intake(spec)?;
        self.wake.notify_one();
        Ok(())
    }

    /// Streams the connection's subscription for as long as the job exists:
    /// reconnects with backoff after any error (the server restarting,
    /// UNAVAILABLE, a refused token), logging what went wrong with the
    /// connection and the subscription named.
    pub(super) async fn remote_intake(self: Arc<Self>, job: String) {
        let mut backoff = Duration::from_millis(250);
        loop {
            let Ok(spec) = self.job(&job) else { return };
            let Some(cspec) = spec.connection.clone() else {
                return;
            };
            let sub = spec.subscription.clone();
            let failed = match self.connection(&cspec) {
                Err(e) => Some(e),
                Ok(conn) => {
                    // Flow control: no more messages leased to us than the
                    // job runs at once; each batch is queued (and acked)
                    // before the next is read.
                    let max_outstanding = i64::from(spec.concurrency.max(1));
                    match conn
                        .pubsub
                        .streaming_pull(&sub, max_outstanding, ACK_DEADLINE_S)
                        .await
                    {
                        Err(e) => Some(e),
                        Ok(mut stream) => {
                            tracing::info!(
                                job,
                                connection = cspec.name,
                                subscription = sub,
                                "job intake streaming from the connection"
                            );
                            loop {
                                match stream.next().await {
                                    Ok(Some(batch)) => {
                                        backoff = Duration::from_millis(250);
                                        self.queue_remote(&job, &conn, &sub, batch).await;
                                    }
                                    Ok(None) => break None,
                                    Err(e) => break Some(e),
                                }
                            }
                        }
                    }
                }
            };
            match failed {
                Some(e) if e.kind == ErrorKind::Unavailable => {
                    tracing::warn!(
                        job,
                        subscription = sub,
                        "job {job}: subscription {sub}: {e}; reconnecting in {backoff:?}"
                    )
                }
                Some(e) => {
                    tracing::error!(
                        job,
                        subscription = sub,
                        "job {job}: subscription {sub}: {e}; trying again in {backoff:?}"
                    )
                }
                None => tracing::info!(
                    job,
                    subscription = sub,
                    "the connection ended the stream; reconnecting"
                ),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Queues a run per message (dedup, filter as for local jobs), extending
    /// the messages' leases while the run store is busy; acks only what is
    /// durably queued. On failure nothing is acked: the messages come back.
    async fn queue_remote(
        &self,
        job: &str,
        conn: &Connection,
        sub: &str,
        batch: Vec<ReceivedMessage>,
    ) {
        let Ok(spec) = self.job(job) else {
            // Deleted meanwhile: give the messages back at once.
            let ids = batch.into_iter().map(|m| m.ack_id).collect();
            let _ = conn.pubsub.modify_ack_deadline(sub, ids, 0).await;
            return;
        };
        let filter = pubrun_core::filter::parse(&spec.filter)
            .unwrap_or_else(|_| pubrun_core::filter::Filter::all());
        let mut ack_ids = Vec::with_capacity(batch.len());
        let mut items = Vec::with_capacity(batch.len());
        for r in batch {
            ack_ids.push(r.ack_id);
            let Some(m) = r.message else { continue };
            let msg = source_message(m);
            // As a filtered subscription would: a message that does not
            // match is acked without a run.
            if !filter.matches(&msg.attributes) {
                continue;
            }
            let key = dedup_key(&spec, &msg);
            items.push((msg, key));
        }
        let store = self.store.clone();
        let s2 = spec.clone();
        // A task of its own: queueing goes on while the leases are extended.
        let now = self.now_ms();
        let queued = tokio::spawn(async move {
            let batch = Batch {
                job: &s2,
                messages: &items,
                now_ms: now,
            };
            store.enqueue_batch(batch).await
        });
        tokio::pin!(queued);
        let queued = loop {
            tokio::select! {
                r = &mut queued => break r,
                _ = tokio::time::sleep(EXTEND_EVERY) => {
                    if let Err(e) = conn.pubsub.modify_ack_deadline(sub, ack_ids.clone(), ACK_DEADLINE_S).await {
                        tracing::warn!(job, error = %e, "could not extend the leases of messages being queued");
                    }
                }
            }
        };
        match queued {
            Ok(Ok(_)) => {
                self.wake.notify_one();
                let mut delay = Duration::from_millis(200);
                for attempt in 1..=5 {
                    match conn.pubsub.acknowledge(sub, ack_ids.clone()).await {
                        Ok(()) => return,
                        Err(e) if attempt < 5 && e.kind.is_retryable() => {
                            tokio::time::sleep(delay).await;
                            delay *= 2;
                        }
                        Err(e) => {
                            tracing::warn!(job, error = %e, "ack after queueing failed; redeliveries will be caught by dedup");
                            return;
                        }
                    }
                }
            }
            Ok(Err(e)) => {
                tracing::error!(job, error = %e, "could not queue runs; the messages are not acked and will come back");
            }
            Err(e) => {
                tracing::error!(job, error = %e, "queueing runs panicked; the messages are not acked and will come back");
            }
        }
    }

    pub(super) async fn publish_remote(
        &self,
        c: &ConnectionSpec,
        topic: &str,
        msg: OutgoingMessage,
    ) -> Result<()> {
        let conn = self
            .connection(c)
            .map_err(|e| Error::unavailable(e.to_string()))?;
        let m = PubsubMessage {
            data: msg.data,
            attributes: msg.attributes.into_iter().collect(),
            ordering_key: msg.ordering_key,
            ..Default::default()
        };
        match conn.pubsub.publish(topic, vec![m]).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind == ErrorKind::NotFound => Err(Error::not_found(e.to_string())),
            Err(e) => Err(Error::unavailable(e.to_string())),
        }
    }
}

/// The run-store view of a message from a connection.
fn source_message(m: PubsubMessage) -> SourceMessage {
    let publish_time = m
        .publish_time
        .map(|t| {
            rfc3339_nanos(
                t.seconds
                    .saturating_mul(1_000_000_000)
                    .saturating_add(i64::from(t.nanos)),
            )
        })
        .unwrap_or_else(|| rfc3339_nanos(now_ms() * 1_000_000));
    let attributes: HashMap<String, String> = m.attributes;
    SourceMessage {
        id: m.message_id,
        data: m.data.to_vec(),
        attributes: attributes.into_iter().collect(),
        publish_time,
        ordering_key: m.ordering_key,
    }
}
