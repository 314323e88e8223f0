//! The workloads over Pub/Sub v1 gRPC (pubrun).

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::stream::{FuturesUnordered, StreamExt};
use googleapis_tonic_google_pubsub_v1::google::pubsub::v1 as pb;
use pb::publisher_client::PublisherClient;
use pb::subscriber_client::SubscriberClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::{age_nanos, backlog_rss, finish_latency, measured, payload, CpuMeter, Opts, Sink};

const PROJECT: &str = "projects/bench";

struct Pair {
    topic: String,
    sub: String,
}

async fn setup(ch: &Channel, name: &str) -> Result<Pair> {
    // Unique per driver run, so runs against one server do not collide.
    let name = format!("{name}-{}", std::process::id());
    let p = Pair { topic: format!("{PROJECT}/topics/{name}"), sub: format!("{PROJECT}/subscriptions/{name}") };
    PublisherClient::new(ch.clone()).create_topic(pb::Topic { name: p.topic.clone(), ..Default::default() }).await.context("CreateTopic")?;
    SubscriberClient::new(ch.clone())
        .create_subscription(pb::Subscription { name: p.sub.clone(), topic: p.topic.clone(), ack_deadline_seconds: 60, ..Default::default() })
        .await
        .context("CreateSubscription")?;
    Ok(p)
}

/// Publishes `count` messages, `batch` per request, `inflight` requests
/// outstanding; returns msg/s over the time until the last id came back.
async fn publish(ch: &Channel, topic: &str, o: &Opts, count: usize, batch: usize, inflight: usize) -> Result<f64> {
    let client = PublisherClient::new(ch.clone());
    let mut pending = FuturesUnordered::new();
    let (mut sent, mut acked) = (0usize, 0usize);
    let start = Instant::now();
    let deadline = start + o.phase_timeout;
    while acked < count {
        while pending.len() < inflight && sent < count {
            let n = batch.min(count - sent);
            let req = pb::PublishRequest {
                topic: topic.to_string(),
                messages: (0..n).map(|_| pb::PubsubMessage { data: payload(o.size), ..Default::default() }).collect(),
            };
            let mut c = client.clone();
            pending.push(async move { c.publish(req).await });
            sent += n;
        }
        let r = tokio::time::timeout_at(deadline.into(), pending.next())
            .await
            .with_context(|| format!("publish phase exceeded {:?} with {acked} of {count} acked", o.phase_timeout))?;
        acked += r.expect("pending is not empty")?.into_inner().message_ids.len();
    }
    Ok(count as f64 / start.elapsed().as_secs_f64())
}

/// Receives `expect` distinct messages over one StreamingPull. Acks go out
/// as the official clients send them: one unary Acknowledge per received
/// batch, without waiting (they return once the acks are durable; the
/// workload ends when all have returned). With `o.stream_acks` the ack ids
/// ride on the stream instead; then the client half-closes at the end and
/// waits for the server to close the stream, which it does only after
/// applying every queued ack. With `latencies`, records the age of each first
/// delivery.
async fn consume_stream(ch: &Channel, sub: &str, o: &Opts, expect: usize, mut latencies: Option<&mut Vec<u64>>) -> Result<f64> {
    let (tx, rx) = mpsc::channel::<pb::StreamingPullRequest>(64);
    tx.send(pb::StreamingPullRequest {
        subscription: sub.to_string(),
        stream_ack_deadline_seconds: 60,
        max_outstanding_messages: o.consume_window as i64,
        client_id: "broker-bench".into(),
        ..Default::default()
    })
    .await?;
    let mut client = SubscriberClient::new(ch.clone()).max_decoding_message_size(64 << 20);
    let start = Instant::now();
    let deadline = start + o.phase_timeout;
    let mut stream = client.streaming_pull(ReceiverStream::new(rx)).await.context("StreamingPull")?.into_inner();
    let mut seen = HashSet::with_capacity(expect);
    let mut acks = Vec::new();
    while seen.len() < expect {
        let resp = tokio::time::timeout_at(deadline.into(), stream.message())
            .await
            .with_context(|| format!("consume timed out after {} of {expect}", seen.len()))??
            .context("server ended the stream early")?;
        let mut ack_ids = Vec::with_capacity(resp.received_messages.len());
        for r in resp.received_messages {
            let m = r.message.context("received message without a message")?;
            if seen.insert(m.message_id) {
                if let Some(l) = latencies.as_deref_mut() {
                    l.push(age_nanos(&m.data).unwrap_or(0));
                }
            }
            ack_ids.push(r.ack_id);
        }
        if o.stream_acks {
            tx.send(pb::StreamingPullRequest { ack_ids, ..Default::default() }).await?;
        } else {
            let (mut c, sub) = (client.clone(), sub.to_string());
            acks.push(tokio::spawn(async move { c.acknowledge(pb::AcknowledgeRequest { subscription: sub, ack_ids }).await }));
        }
    }
    for a in acks {
        tokio::time::timeout_at(deadline.into(), a).await.context("Acknowledge timed out")???;
    }
    drop(tx);
    if o.stream_acks {
        while tokio::time::timeout_at(deadline.into(), stream.message()).await.context("waiting for the stream to close")??.is_some() {}
    }
    Ok(expect as f64 / start.elapsed().as_secs_f64())
}

/// `workers` loops of Pull(max) + Acknowledge (which returns once durable).
async fn consume_pull(ch: &Channel, sub: &str, o: &Opts, expect: usize, workers: usize) -> Result<f64> {
    let done = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(tokio::sync::Notify::new());
    let start = Instant::now();
    let deadline = start + o.phase_timeout;
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (mut c, sub, done, stop) = (SubscriberClient::new(ch.clone()), sub.to_string(), done.clone(), stop.clone());
        let max = o.consume_window as i32;
        tasks.push(tokio::spawn(async move {
            while done.load(Ordering::Relaxed) < expect {
                #[allow(deprecated)]
                let req = pb::PullRequest { subscription: sub.clone(), max_messages: max, return_immediately: false };
                let got = tokio::select! {
                    r = c.pull(req) => r?.into_inner().received_messages,
                    _ = stop.notified() => break,
                };
                if got.is_empty() {
                    continue;
                }
                let n = got.len();
                let ack_ids = got.into_iter().map(|r| r.ack_id).collect();
                c.acknowledge(pb::AcknowledgeRequest { subscription: sub.clone(), ack_ids }).await?;
                if done.fetch_add(n, Ordering::Relaxed) + n >= expect {
                    stop.notify_waiters();
                }
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        // One deadline for all workers, not one timeout each.
        tokio::time::timeout_at(deadline.into(), t)
            .await
            .with_context(|| format!("pull consumer timed out after {} of {expect}", done.load(Ordering::Relaxed)))???;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64())
}

/// Publishes one message per Publish call at `rate` msg/s for `secs` while a
/// StreamingPull subscriber measures publish→receive time.
async fn latency(ch: &Channel, p: &Pair, o: &Opts, s: &mut Sink) -> Result<()> {
    let total = o.rate * o.secs as usize;
    let deadline = tokio::time::Instant::now() + o.phase_timeout;
    let (ch2, sub, o2) = (ch.clone(), p.sub.clone(), o.clone());
    let subscriber = tokio::spawn(async move {
        let mut lat = Vec::with_capacity(total);
        consume_stream(&ch2, &sub, &o2, total, Some(&mut lat)).await?;
        anyhow::Ok(lat)
    });
    tokio::time::sleep(Duration::from_millis(300)).await; // let the stream open
    let client = PublisherClient::new(ch.clone());
    let mut pending = FuturesUnordered::new();
    let start = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let mut sent = 0usize;
    let published = async {
        while sent < total {
            if tokio::time::Instant::now() > deadline {
                bail!("latency phase exceeded {:?} after {sent} of {total} sent", o.phase_timeout);
            }
            tokio::select! {
                _ = tick.tick() => {
                    let due = ((start.elapsed().as_secs_f64() * o.rate as f64) as usize).min(total);
                    while sent < due {
                        let mut c = client.clone();
                        let req = pb::PublishRequest {
                            topic: p.topic.clone(),
                            messages: vec![pb::PubsubMessage { data: payload(o.size), ..Default::default() }],
                        };
                        pending.push(async move { c.publish(req).await });
                        sent += 1;
                    }
                }
                Some(r) = pending.next(), if !pending.is_empty() => { r?; }
            }
        }
        // Requests are never awaited one by one here, so the loop keeps the
        // rate; a slow server shows as outstanding calls, bounded by the deadline.
        while let Some(r) = tokio::time::timeout_at(deadline, pending.next())
            .await
            .with_context(|| format!("latency phase exceeded {:?} with {} publishes unanswered", o.phase_timeout, pending.len()))?
        {
            r?;
        }
        anyhow::Ok(start.elapsed().as_secs_f64())
    }
    .await;
    finish_latency(s, o, published, subscriber, deadline, "subscriber", "single-message Publish calls").await
}

pub async fn run(addr: &str, pid: u32, phases: &str, o: &Opts, s: &mut Sink) -> Result<()> {
    let ch = Endpoint::from_shared(addr.to_string())?.tcp_nodelay(true).connect().await.context("connecting to pubrun")?;
    if phases.contains('a') || phases.contains('b') {
        // a, then b on the messages a left in the subscription.
        let p = setup(&ch, "batched").await?;
        let note = format!("{} msgs/request, {} requests in flight", o.batch, o.batch_inflight);
        measured(s, pid, "publish_batched", o.count, &note, publish(&ch, &p.topic, o, o.count, o.batch, o.batch_inflight)).await?;
        if phases.contains('b') {
            let acks = if o.stream_acks { "on the stream" } else { "unary" };
            let note = format!("StreamingPull, max_outstanding_messages {}, acks {acks}", o.consume_window);
            measured(s, pid, "consume_stream", o.count, &note, consume_stream(&ch, &p.sub, o, o.count, None)).await?;
        }
        let p = setup(&ch, "single").await?;
        let note = format!("1 msg/request, {} requests in flight", o.window);
        measured(s, pid, "publish_single", o.count, &note, publish(&ch, &p.topic, o, o.count, 1, o.window)).await?;
        if phases.contains('b') {
            let note = format!("4 × (Pull max {} + Acknowledge)", o.consume_window);
            measured(s, pid, "consume_pull", o.count, &note, consume_pull(&ch, &p.sub, o, o.count, 4)).await?;
        }
    }
    if phases.contains('c') {
        let p = setup(&ch, "latency").await?;
        let cpu = CpuMeter::start(pid);
        latency(&ch, &p, o, s).await?;
        cpu.put(s, "latency", o.rate * o.secs as usize)?;
    }
    if phases.contains('d') {
        let p = setup(&ch, "backlog").await?;
        let publish_note = format!("{} msgs, {} msgs/request, {} in flight", o.backlog, o.batch, o.batch_inflight);
        let backlog_note = format!("{} msgs unconsumed in 1 subscription", o.backlog);
        backlog_rss(s, pid, publish(&ch, &p.topic, o, o.backlog, o.batch, o.batch_inflight), &publish_note, &backlog_note).await?;
    }
    Ok(())
}
