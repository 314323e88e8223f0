//! The same workloads over NATS JetStream (file storage, one replica).

use std::collections::HashSet;
use std::future::IntoFuture;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use async_nats::jetstream::{self, consumer, stream};
use futures::stream::{FuturesUnordered, StreamExt};

use tokio::sync::mpsc;

use crate::{age_nanos, backlog_rss, finish_latency, measured, payload, CpuMeter, Opts, Sink};

type Consumer = consumer::Consumer<consumer::pull::Config>;

/// A file-backed stream on subject `bench.NAME` and a durable pull consumer
/// with explicit acks: the JetStream counterpart of a topic + subscription.
async fn setup(js: &jetstream::Context, name: &str, o: &Opts) -> Result<(String, Consumer)> {
    let name = format!("{name}_{}", std::process::id());
    let subject = format!("bench.{name}");
    let s = js
        .create_stream(stream::Config {
            name: format!("BENCH_{}", name.to_uppercase()),
            subjects: vec![subject.clone()],
            storage: stream::StorageType::File,
            num_replicas: 1,
            ..Default::default()
        })
        .await
        .context("creating stream")?;
    let c = s
        .create_consumer(consumer::pull::Config {
            durable_name: Some(format!("c_{name}")),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(60),
            max_ack_pending: o.consume_window as i64,
            ..Default::default()
        })
        .await
        .context("creating consumer")?;
    Ok((subject, c))
}

/// Async JetStream publishes with at most `window` acks outstanding; msg/s
/// over the time until the last PubAck arrived.
async fn publish(js: &jetstream::Context, subject: &str, o: &Opts, count: usize) -> Result<f64> {
    let mut pending = FuturesUnordered::new();
    let (mut sent, mut acked) = (0usize, 0usize);
    let start = Instant::now();
    let deadline = start + o.phase_timeout;
    while acked < count {
        while pending.len() < o.window && sent < count {
            let ack = js.publish(subject.to_string(), payload(o.size)).await.context("publish")?;
            pending.push(ack.into_future());
            sent += 1;
        }
        let r = tokio::time::timeout_at(deadline.into(), pending.next())
            .await
            .with_context(|| format!("publish phase exceeded {:?} with {acked} of {count} acked", o.phase_timeout))?;
        r.expect("pending is not empty").context("PubAck")?;
        acked += 1;
    }
    Ok(count as f64 / start.elapsed().as_secs_f64())
}

/// Receives `expect` distinct messages from the pull consumer (client's
/// default continuous-pull settings), acking each; done when the server
/// reports no ack pending.
async fn consume(c: &mut Consumer, o: &Opts, expect: usize, mut latencies: Option<&mut Vec<u64>>) -> Result<f64> {
    let start = Instant::now();
    let deadline = start + o.phase_timeout;
    let mut msgs = c.messages().await.context("pull subscribe")?;
    let mut seen = HashSet::with_capacity(expect);
    while seen.len() < expect {
        let m = tokio::time::timeout_at(deadline.into(), msgs.next())
            .await
            .with_context(|| format!("consume timed out after {} of {expect}", seen.len()))?
            .context("message stream ended")?
            .map_err(|e| anyhow::anyhow!("pull: {e}"))?;
        let seq = m.info().map_err(|e| anyhow::anyhow!("message info: {e}"))?.stream_sequence;
        if seen.insert(seq) {
            if let Some(l) = latencies.as_deref_mut() {
                l.push(age_nanos(&m.payload).unwrap_or(0));
            }
        }
        m.ack().await.map_err(|e| anyhow::anyhow!("ack: {e}"))?;
    }
    drop(msgs);
    // Acks are fire-and-forget in NATS: wait until the server applied them.
    loop {
        let info = c.info().await.context("consumer info")?;
        if info.num_ack_pending == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("{} acks still pending at the deadline", info.num_ack_pending);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(expect as f64 / start.elapsed().as_secs_f64())
}

/// Publishes at `rate` msg/s for `secs` while a pull consumer records the
/// age of each message. If the server acks slower than `rate`, the publisher
/// falls behind (async-nats makes `publish` wait once 5000 PubAcks are
/// outstanding) and the note says which rate it reached.
async fn latency(js: &jetstream::Context, o: &Opts, s: &mut Sink) -> Result<()> {
    let (subject, mut c) = setup(js, "latency", o).await?;
    let total = o.rate * o.secs as usize;
    let deadline = tokio::time::Instant::now() + o.phase_timeout;
    let o2 = o.clone();
    let subscriber = tokio::spawn(async move {
        let mut lat = Vec::with_capacity(total);
        consume(&mut c, &o2, total, Some(&mut lat)).await?;
        anyhow::Ok(lat)
    });
    // PubAcks are awaited in their own task. Each unacked publish holds one
    // of the context's ack permits until its PubAck future completes, so
    // awaiting them in the publishing task deadlocks as soon as `publish`
    // waits for a permit: nothing polls the futures that would free one.
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<jetstream::context::PublishAckFuture>();
    let acker = tokio::spawn(async move {
        let mut pending = FuturesUnordered::new();
        let mut open = true;
        loop {
            tokio::select! {
                f = ack_rx.recv(), if open => match f {
                    Some(f) => pending.push(f.into_future()),
                    None => open = false,
                },
                Some(r) = pending.next(), if !pending.is_empty() => { r.context("PubAck")?; }
                else => break,
            }
        }
        anyhow::Ok(())
    });
    // With 5000 publishes queued at a server that syncs each one, a PubAck
    // can take longer than async-nats' default 5 s; the phase deadline is
    // the bound here. The clone shares the ack permits, API calls keep theirs.
    let mut js = js.clone();
    js.set_timeout(o.phase_timeout);
    let published = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let start = tokio::time::Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        let mut sent = 0usize;
        while sent < total {
            tick.tick().await;
            let due = ((start.elapsed().as_secs_f64() * o.rate as f64) as usize).min(total);
            while sent < due {
                let ack = tokio::time::timeout_at(deadline, js.publish(subject.clone(), payload(o.size)))
                    .await
                    .with_context(|| format!("latency phase exceeded {:?}: publish blocked after {sent} of {total} sent", o.phase_timeout))?
                    .context("publish")?;
                if ack_tx.send(ack).is_err() {
                    break; // the acker failed; its error is reported below
                }
                sent += 1;
            }
            if ack_tx.is_closed() {
                break;
            }
        }
        drop(ack_tx);
        tokio::time::timeout_at(deadline, acker).await.with_context(|| format!("latency phase exceeded {:?} waiting for PubAcks", o.phase_timeout))???;
        anyhow::Ok(start.elapsed().as_secs_f64())
    }
    .await;
    finish_latency(s, o, published, subscriber, deadline, "consumer", "async JetStream publish").await
}

pub async fn run(addr: &str, pid: u32, phases: &str, o: &Opts, s: &mut Sink) -> Result<()> {
    let client = async_nats::connect(addr).await.context("connecting to nats-server")?;
    let js = jetstream::new(client);
    if phases.contains('a') || phases.contains('b') {
        let (subject, mut c) = setup(&js, "a", o).await?;
        let note = format!("async publish, {} PubAcks outstanding", o.window);
        measured(s, pid, "publish", o.count, &note, publish(&js, &subject, o, o.count)).await?;
        if phases.contains('b') {
            let note = format!("pull consumer, explicit ack, max_ack_pending {}", o.consume_window);
            measured(s, pid, "consume", o.count, &note, consume(&mut c, o, o.count, None)).await?;
        }
    }
    if phases.contains('c') {
        let cpu = CpuMeter::start(pid);
        latency(&js, o, s).await?;
        cpu.put(s, "latency", o.rate * o.secs as usize)?;
    }
    if phases.contains('d') {
        let (subject, _c) = setup(&js, "backlog", o).await?;
        let publish_note = format!("{} msgs, {} PubAcks outstanding", o.backlog, o.window);
        let backlog_note = format!("{} msgs in the stream, durable consumer idle", o.backlog);
        backlog_rss(s, pid, publish(&js, &subject, o, o.backlog), &publish_note, &backlog_note).await?;
    }
    Ok(())
}
