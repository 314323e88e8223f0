//! broker-bench: the same workloads against pubrun (Pub/Sub v1 gRPC) and
//! NATS JetStream, one target per run, results as JSON lines.
//!
//! ```text
//! broker-bench run   --target pubrun --addr http://127.0.0.1:18085 --pid PID --out r.jsonl --phases abc
//! broker-bench run   --target nats   --addr 127.0.0.1:14222        --pid PID --out r.jsonl --phases d
//! broker-bench table r.jsonl          # markdown table with pubrun/NATS ratios
//! ```
//!
//! Phases: a = publish N × SIZE B with acks, many in flight; b = consume and
//! ack those N; c = end-to-end latency at a fixed rate; d = server RSS with a
//! large backlog (publish, no consumer, then read /proc/PID/status).
//! Every loop is bounded by a message count and a deadline.

mod nats;
mod pubrun;

use std::collections::HashMap;
use std::future::Future;
use std::io::Write;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;

/// Knobs shared by both targets (same defaults on both sides).
#[derive(Clone, Debug)]
pub struct Opts {
    /// Messages in phases a and b.
    pub count: usize,
    /// Payload bytes per message.
    pub size: usize,
    /// Messages per Publish request (pubrun batched mode; the official
    /// clients batch up to 100 messages per request by default).
    pub batch: usize,
    /// Publish requests in flight in batched mode.
    pub batch_inflight: usize,
    /// Single-message publishes (pubrun) / unacked JetStream publishes (NATS) in flight.
    pub window: usize,
    /// Flow-control window of the consumer (the official Pub/Sub clients'
    /// default max_outstanding_messages is 1000; NATS max_ack_pending too).
    pub consume_window: usize,
    /// pubrun StreamingPull: send ack ids on the stream instead of unary
    /// Acknowledge calls (what the official clients do).
    pub stream_acks: bool,
    /// Phase c rate (msg/s) and duration (s).
    pub rate: usize,
    pub secs: u64,
    /// Phase d backlog size.
    pub backlog: usize,
    /// Hard cap on any single phase.
    pub phase_timeout: Duration,
}

/// Time base for payload timestamps: driver-process monotonic clock.
fn epoch() -> Instant {
    static E: OnceLock<Instant> = OnceLock::new();
    *E.get_or_init(Instant::now)
}

/// `size` bytes: 8-byte big-endian nanos since `epoch()`, then filler.
pub fn payload(size: usize) -> Bytes {
    let mut v = vec![b'x'; size.max(8)];
    let ns = epoch().elapsed().as_nanos() as u64;
    v[..8].copy_from_slice(&ns.to_be_bytes());
    Bytes::from(v)
}

/// Nanoseconds since the timestamp in `data` was written.
pub fn age_nanos(data: &[u8]) -> Option<u64> {
    let ts = u64::from_be_bytes(data.get(..8)?.try_into().ok()?);
    Some((epoch().elapsed().as_nanos() as u64).saturating_sub(ts))
}

/// VmRSS and VmHWM of a process, in KiB.
pub fn rss_kib(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        let line = status.lines().find(|l| l.starts_with(name)).with_context(|| format!("{name} missing for pid {pid}"))?;
        Ok(line.split_whitespace().nth(1).context("bad status line")?.parse()?)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// CPU seconds (user + system) a process has used so far; `None` = this process.
pub fn cpu_secs(pid: Option<u32>) -> f64 {
    let path = pid.map_or("/proc/self/stat".to_string(), |p| format!("/proc/{p}/stat"));
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the ")" that closes the command name start at field 3.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0.0)).collect();
    // utime = field 14, stime = field 15, in USER_HZ (100 on Linux).
    (f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0)) / 100.0
}

/// Server and driver CPU time over one workload: robust to a shared box,
/// where wall-clock throughput also measures everybody else's load.
pub struct CpuMeter {
    pid: u32,
    server: f64,
    driver: f64,
    wall: Instant,
}

impl CpuMeter {
    pub fn start(pid: u32) -> Self {
        CpuMeter { pid, server: cpu_secs(Some(pid)), driver: cpu_secs(None), wall: Instant::now() }
    }

    /// Records `NAME_cpu` (server CPU µs per message) and `NAME_cpu_driver`.
    pub fn put(&self, s: &mut Sink, name: &str, msgs: usize) -> Result<()> {
        let server = cpu_secs(Some(self.pid)) - self.server;
        let driver = cpu_secs(None) - self.driver;
        let wall = self.wall.elapsed().as_secs_f64();
        let note = format!("server {:.0}% / driver {:.0}% of one core over {wall:.2} s", 100.0 * server / wall, 100.0 * driver / wall);
        s.put(&format!("{name}_cpu"), server * 1e6 / msgs as f64, "µs/msg", &note)?;
        s.put(&format!("{name}_cpu_driver"), driver * 1e6 / msgs as f64, "µs/msg", "")
    }
}

/// Note suffix for phase c: the publish rate reached (sent and acked), so a
/// run where the server could not keep up with `rate` says so.
pub fn pace_note(total: usize, secs: f64, rate: usize) -> String {
    let got = total as f64 / secs.max(1e-9);
    let behind = if got < 0.95 * rate as f64 { ", below the asked rate" } else { "" };
    format!(" = {got:.0} of {rate} msg/s acked{behind}")
}

/// Records a latency phase's p50/p99/p99.9/max (nanoseconds in, ms out),
/// the same four rows for every target.
pub fn put_latencies(s: &mut Sink, mut lat: Vec<u64>, note: &str) -> Result<()> {
    lat.sort_unstable();
    let ms = |ns: u64| ns as f64 / 1e6;
    s.put("latency_p50", ms(percentile(&lat, 50.0)), "ms", note)?;
    s.put("latency_p99", ms(percentile(&lat, 99.0)), "ms", note)?;
    s.put("latency_p999", ms(percentile(&lat, 99.9)), "ms", note)?;
    s.put("latency_max", ms(*lat.last().unwrap_or(&0)), "ms", note)
}

/// Runs one throughput workload under a [`CpuMeter`] and records its rate as
/// `name` (msg/s) next to its CPU cost per message.
pub async fn measured(s: &mut Sink, pid: u32, name: &str, msgs: usize, note: &str, work: impl Future<Output = Result<f64>>) -> Result<()> {
    let cpu = CpuMeter::start(pid);
    let rate = work.await?;
    cpu.put(s, name, msgs)?;
    s.put(name, rate, "msg/s", note)
}

/// Ends phase c for either target. `published` is the publisher's outcome
/// (seconds it took to send and get acked); on failure the subscriber is
/// stopped and the error returned. Otherwise the subscriber's latencies are
/// recorded: it gives up at its own deadline (≈ `deadline`), and the grace
/// past it only lets its error, which says how many messages arrived, come
/// through. `who` names the subscriber in that error, `how` the publishing
/// mode in the note.
pub async fn finish_latency(
    s: &mut Sink,
    o: &Opts,
    published: Result<f64>,
    subscriber: tokio::task::JoinHandle<Result<Vec<u64>>>,
    deadline: tokio::time::Instant,
    who: &str,
    how: &str,
) -> Result<()> {
    let send_secs = match published {
        Ok(t) => t,
        Err(e) => {
            subscriber.abort();
            return Err(e);
        }
    };
    let lat = tokio::time::timeout_at(deadline + Duration::from_secs(15), subscriber).await.with_context(|| format!("latency {who} did not finish"))???;
    let total = o.rate * o.secs as usize;
    let note = format!("{total} msgs, {how}, sent in {send_secs:.2} s{}", pace_note(total, send_secs, o.rate));
    put_latencies(s, lat, &note)
}

/// Phase d for either target: RSS before and after publishing `o.backlog`
/// messages that nobody consumes (`publish` does that and returns msg/s).
/// The pause lets the server get past one reclaim/maintenance cycle.
pub async fn backlog_rss(s: &mut Sink, pid: u32, publish: impl Future<Output = Result<f64>>, publish_note: &str, backlog_note: &str) -> Result<()> {
    let (idle, _) = rss_kib(pid)?;
    s.put("rss_idle", idle as f64 / 1024.0, "MiB", "before the backlog publish")?;
    let r = publish.await?;
    s.put("backlog_publish", r, "msg/s", publish_note)?;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (rss, hwm) = rss_kib(pid)?;
    s.put("rss_backlog", rss as f64 / 1024.0, "MiB", backlog_note)?;
    s.put("hwm_backlog", hwm as f64 / 1024.0, "MiB", "VmHWM")
}

/// p-th percentile (0..=100) of sorted values.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Appends one result line.
pub struct Sink {
    target: String,
    file: std::fs::File,
}

impl Sink {
    pub fn put(&mut self, metric: &str, value: f64, unit: &str, note: &str) -> Result<()> {
        let line = serde_json::json!({"target": self.target, "metric": metric, "value": value, "unit": unit, "note": note});
        if !metric.starts_with("param_") {
            eprintln!("  {:<8} {:<28} {:>14.2} {:<6} {}", self.target, metric, value, unit, note);
        }
        writeln!(self.file, "{line}")?;
        Ok(())
    }
}

fn args() -> (String, HashMap<String, String>, Vec<String>) {
    let mut it = std::env::args().skip(1);
    let cmd = it.next().unwrap_or_default();
    let mut flags = HashMap::new();
    let mut rest = Vec::new();
    while let Some(a) = it.next() {
        if let Some(k) = a.strip_prefix("--") {
            flags.insert(k.to_string(), it.next().unwrap_or_default());
        } else {
            rest.push(a);
        }
    }
    (cmd, flags, rest)
}

fn num<T: std::str::FromStr>(f: &HashMap<String, String>, k: &str, default: T) -> Result<T> {
    match f.get(k) {
        Some(v) => v.parse().map_err(|_| anyhow::anyhow!("--{k} {v}: not a number")),
        None => Ok(default),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    epoch();
    let (cmd, f, rest) = args();
    match cmd.as_str() {
        "run" => {
            let opts = Opts {
                count: num(&f, "count", 100_000)?,
                size: num(&f, "size", 100)?,
                batch: num(&f, "batch", 100)?,
                batch_inflight: num(&f, "batch-inflight", 4)?,
                window: num(&f, "window", 256)?,
                consume_window: num(&f, "consume-window", 1000)?,
                stream_acks: num::<u8>(&f, "stream-acks", 0)? == 1,
                rate: num(&f, "rate", 2000)?,
                secs: num(&f, "secs", 10)?,
                backlog: num(&f, "backlog", 1_000_000)?,
                phase_timeout: Duration::from_secs(num(&f, "phase-timeout", 300)?),
            };
            let target = f.get("target").context("--target pubrun|nats")?.clone();
            let addr = f.get("addr").context("--addr")?.clone();
            let pid: u32 = num(&f, "pid", 0)?;
            let phases = f.get("phases").cloned().unwrap_or_else(|| "abcd".into());
            let out = f.get("out").context("--out FILE")?;
            let file = std::fs::OpenOptions::new().create(true).append(true).open(out)?;
            let mut sink = Sink { target: target.clone(), file };
            for (k, v) in [("count", opts.count), ("backlog", opts.backlog), ("rate", opts.rate), ("secs", opts.secs as usize)] {
                sink.put(&format!("param_{k}"), v as f64, "", "")?;
            }
            match target.as_str() {
                "pubrun" => pubrun::run(&addr, pid, &phases, &opts, &mut sink).await,
                "nats" => nats::run(&addr, pid, &phases, &opts, &mut sink).await,
                other => bail!("unknown target {other}"),
            }
        }
        "table" => {
            let path = rest.first().context("table FILE")?;
            print!("{}", table(&std::fs::read_to_string(path)?)?);
            Ok(())
        }
        _ => bail!("usage: broker-bench run --target pubrun|nats --addr A --pid P --out FILE [--phases abcd] | table FILE"),
    }
}

/// One markdown table: rows are workloads, columns both systems and the ratio.
fn table(jsonl: &str) -> Result<String> {
    let mut v: HashMap<(String, String), f64> = HashMap::new();
    for line in jsonl.lines().filter(|l| !l.trim().is_empty()) {
        let j: serde_json::Value = serde_json::from_str(line)?;
        let t = j["target"].as_str().unwrap_or_default().to_string();
        let m = j["metric"].as_str().unwrap_or_default().to_string();
        v.insert((t, m), j["value"].as_f64().unwrap_or(f64::NAN));
    }
    let get = |t: &str, m: &str| v.get(&(t.to_string(), m.to_string())).copied();
    let param = |k: &str, d: f64| get("pubrun", &format!("param_{k}")).unwrap_or(d);
    let human = |n: f64| match n {
        n if n >= 1e6 && n % 1e6 == 0.0 => format!("{}M", n / 1e6),
        n if n >= 1e3 && n % 1e3 == 0.0 => format!("{}k", n / 1e3),
        n => format!("{n}"),
    };
    let (count, backlog) = (human(param("count", 1e5)), human(param("backlog", 1e6)));
    let (rate, secs) = (param("rate", 2000.0), param("secs", 10.0));
    // (label, pubrun metric, nats metric, unit, higher is better, issue-4 target)
    // (label, pubrun metric, nats metric, unit, higher is better, issue-4 target)
    // One row per line, so the table reads as one.
    #[rustfmt::skip]
    let rows: Vec<(String, &str, &str, &str, bool, &str)> = vec![
        (format!("(a) publish {count}×100 B: pubrun 100 msgs/request, 4 requests in flight · NATS async, 256 PubAcks pending"), "publish_batched", "publish", "msg/s", true, "≥ 1.0×"),
        (format!("(a) publish {count}×100 B: pubrun 1 msg/request, 256 requests in flight · NATS as above"), "publish_single", "publish", "msg/s", true, "≥ 1.0×"),
        (format!("(b) consume+ack {count}: pubrun StreamingPull, 1000 outstanding, unary Acknowledge per batch · NATS pull consumer, 1000 ack pending"), "consume_stream", "consume", "msg/s", true, "≥ 1.0×"),
        (format!("(b) consume+ack {count}: pubrun 4 × (Pull 1000 + Acknowledge) · NATS as above"), "consume_pull", "consume", "msg/s", true, ""),
        ("(a) server CPU per message, first row's mode".to_string(), "publish_batched_cpu", "publish_cpu", "µs/msg", false, ""),
        ("(a) server CPU per message, second row's mode".to_string(), "publish_single_cpu", "publish_cpu", "µs/msg", false, ""),
        ("(b) server CPU per message, StreamingPull".to_string(), "consume_stream_cpu", "consume_cpu", "µs/msg", false, ""),
        ("(b) server CPU per message, Pull+Acknowledge".to_string(), "consume_pull_cpu", "consume_cpu", "µs/msg", false, ""),
        (format!("(c) end-to-end latency p50 at {rate} msg/s × {secs} s"), "latency_p50", "latency_p50", "ms", false, ""),
        (format!("(c) end-to-end latency p99 at {rate} msg/s × {secs} s"), "latency_p99", "latency_p99", "ms", false, "≤ 1.0×"),
        ("(c) end-to-end latency max".to_string(), "latency_max", "latency_max", "ms", false, ""),
        ("(c) server CPU per message at that rate".to_string(), "latency_cpu", "latency_cpu", "µs/msg", false, ""),
        ("(d) server RSS, idle, before the backlog".to_string(), "rss_idle", "rss_idle", "MiB", false, ""),
        (format!("(d) server RSS with a {backlog}×100 B backlog"), "rss_backlog", "rss_backlog", "MiB", false, "< 200 MiB"),
        (format!("(d) server peak RSS (VmHWM) while publishing the {backlog} backlog"), "hwm_backlog", "hwm_backlog", "MiB", false, ""),
        (format!("(d) publish rate of the {backlog} backlog (modes of the first row)"), "backlog_publish", "backlog_publish", "msg/s", true, ""),
    ];
    let mut s = String::new();
    s.push_str("| workload | unit | pubrun | NATS JetStream | pubrun/NATS | better | issue-4 target |\n");
    s.push_str("|---|---|---:|---:|---:|---|---|\n");
    let fmt = |x: Option<f64>| match x {
        Some(x) if x >= 100.0 => format!("{x:.0}"),
        Some(x) => format!("{x:.2}"),
        None => "–".into(),
    };
    for (label, pm, nm, unit, higher, goal) in &rows {
        let p = get("pubrun", pm);
        let n = get("nats", nm);
        let ratio = match (p, n) {
            (Some(p), Some(n)) if n != 0.0 => format!("{:.2}×", p / n),
            _ => "–".into(),
        };
        let better = if *higher { "higher" } else { "lower" };
        s.push_str(&format!("| {label} | {unit} | {} | {} | {ratio} | {better} | {goal} |\n", fmt(p), fmt(n)));
    }
    Ok(s)
}
