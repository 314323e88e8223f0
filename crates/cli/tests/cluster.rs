//! Cluster mode with three real `pubrun serve --store postgres://…` servers
//! on one throwaway PostgreSQL: any server answers any call (the owner of
//! the state serves, the others forward), `kill -9` of the owner under
//! publish, consume and job load loses nothing, and an owner cut off from
//! PostgreSQL (a TCP proxy in front of it that the test cuts) steps down,
//! is fenced, and rejoins as a standby when the network returns.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use googleapis_tonic_google_pubsub_v1::google::pubsub::v1 as pb;
use pb::publisher_client::PublisherClient;
use pb::subscriber_client::SubscriberClient;
use pubrun_store::testing::TempPostgres;
use tokio::net::{TcpListener, TcpStream};

use common::{
    answering_node, connect, poll_async, pull_now, wait_answered_by, Serve, ServeBuilder,
};

const LEASE_TTL: Duration = Duration::from_secs(2);
const PATIENCE: Duration = Duration::from_secs(90);

struct Node {
    name: &'static str,
    port: u16,
    server: Serve,
}

impl Node {
    /// Spawns `server` with this node's data in `dir/NAME`, its log in
    /// `dir/NAME.log`.
    fn spawn(name: &'static str, dir: &Path, server: ServeBuilder) -> Node {
        let server = server
            .dir(dir)
            .data_dir(dir.join(name))
            .log_name(&format!("{name}.log"))
            .patience(PATIENCE)
            .spawn();
        Node {
            name,
            port: server.port(),
            server,
        }
    }

    fn log(&self) -> String {
        self.server.log()
    }

    fn alive(&mut self) -> bool {
        self.server.child().try_wait().unwrap().is_none()
    }
}

fn logs(nodes: &[&Node]) -> String {
    nodes
        .iter()
        .map(|n| format!("--- {} ---\n{}", n.name, n.log()))
        .collect()
}

/// Runs `pubrun ARGS --json` against `port`; panics with `log()` on failure.
fn cli_json(port: u16, args: &[&str], log: impl Fn() -> String) -> serde_json::Value {
    common::cli_json(port, Some("cluster"), args, log)
}

fn topic(id: &str) -> String {
    format!("projects/cluster/topics/{id}")
}

fn subscription(id: &str) -> String {
    format!("projects/cluster/subscriptions/{id}")
}

async fn clients(
    port: u16,
) -> (
    PublisherClient<tonic::transport::Channel>,
    SubscriberClient<tonic::transport::Channel>,
) {
    let ch = connect(port).await;
    (PublisherClient::new(ch.clone()), SubscriberClient::new(ch))
}

async fn pull_once(
    sub: &mut SubscriberClient<tonic::transport::Channel>,
    name: &str,
) -> Result<Vec<pb::ReceivedMessage>, tonic::Status> {
    pull_now(sub, name, 100).await
}

/// Starts three servers; `a` first, so it owns the state; `b` and `c`
/// forward to it. `a_store` is the URL `a` uses (a proxy, to cut it off).
fn start_three(pg: &TempPostgres, a_store: &str, dir: &Path) -> (Node, Node, Node) {
    let url = pg.url();
    start_three_with(dir, |name| {
        let store = if name == "a" { a_store } else { &url };
        ServeBuilder::cluster(store, name, LEASE_TTL)
    })
}

/// [`start_three`] with each node's server as `server(NAME)` builds it.
fn start_three_with(
    dir: &Path,
    server: impl Fn(&'static str) -> ServeBuilder,
) -> (Node, Node, Node) {
    let mut a = Node::spawn("a", dir, server("a"));
    a.server.wait_healthy();
    wait_answered_by(a.port, "a", PATIENCE, || a.log());
    let b = Node::spawn("b", dir, server("b"));
    let c = Node::spawn("c", dir, server("c"));
    for n in [&b, &c] {
        wait_answered_by(n.port, "a", PATIENCE, || logs(&[&a, &b, &c]));
    }
    (a, b, c)
}

/// Creates topic `topic_id` through `p` and subscription `sub_id` on it
/// through `s`.
async fn create_topic_and_sub(
    p: &mut PublisherClient<tonic::transport::Channel>,
    s: &mut SubscriberClient<tonic::transport::Channel>,
    topic_id: &str,
    sub_id: &str,
) {
    p.create_topic(pb::Topic {
        name: topic(topic_id),
        ..Default::default()
    })
    .await
    .unwrap();
    s.create_subscription(pb::Subscription {
        name: subscription(sub_id),
        topic: topic(topic_id),
        ack_deadline_seconds: 600,
        ..Default::default()
    })
    .await
    .unwrap();
}

/// Publishes `n` messages (`TAG0`, `TAG1`, …) to `topic_id`; their ids.
async fn publish_batch(
    mut p: PublisherClient<tonic::transport::Channel>,
    topic_id: &str,
    tag: &str,
    n: usize,
) -> Result<Vec<String>, tonic::Status> {
    p.publish(pb::PublishRequest {
        topic: topic(topic_id),
        messages: (0..n)
            .map(|i| pb::PubsubMessage {
                data: format!("{tag}{i}").into_bytes().into(),
                ..Default::default()
            })
            .collect(),
    })
    .await
    .map(|r| r.into_inner().message_ids)
}

/// Publishes five messages through `port`, retrying on a fresh connection
/// while the cluster recovers; their ids.
async fn publish_until_accepted(
    port: u16,
    topic_id: &str,
    tag: &str,
    all: impl Fn() -> String,
) -> Vec<String> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (p, _) = clients(port).await;
        match publish_batch(p, topic_id, tag, 5).await {
            Ok(ids) => return ids,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "publish through {port}: {e}\n{}",
                    all()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Pulls `sub_id` through `port` until every id in `want` was delivered.
async fn pull_until_delivered(
    port: u16,
    sub_id: &str,
    want: &HashSet<String>,
    all: impl Fn() -> String,
) {
    let (_, mut s) = clients(port).await;
    let mut received = HashSet::new();
    let deadline = Instant::now() + PATIENCE;
    while !want.is_subset(&received) {
        assert!(
            Instant::now() < deadline,
            "missing {:?}\n{}",
            want.difference(&received).collect::<Vec<_>>(),
            all()
        );
        match pull_once(&mut s, &subscription(sub_id)).await {
            Ok(msgs) => received.extend(msgs.into_iter().map(|m| m.message.unwrap().message_id)),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Waits until `port` is answered by a node that `accept`s; its name.
async fn wait_owner(port: u16, accept: impl Fn(&str) -> bool, all: impl Fn() -> String) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match answering_node(port) {
            Some(n) if accept(&n) => return n,
            _ => {}
        }
        assert!(Instant::now() < deadline, "no owner serves\n{}", all());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `node` logs that it stepped down.
async fn wait_stepped_down(node: &Node) {
    let deadline = Instant::now() + PATIENCE;
    while !node.log().contains("restarting as a standby") {
        assert!(
            Instant::now() < deadline,
            "{} never stepped down\n{}",
            node.name,
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writes `manifest` to `dir/m.toml` and applies it through `port`.
fn apply(port: u16, dir: &Path, manifest: &str, all: impl Fn() -> String) {
    let path = dir.join("m.toml");
    std::fs::write(&path, manifest).unwrap();
    cli_json(port, &["apply", "-f", path.to_str().unwrap(), "--yes"], all);
}

/// Polls run `id` through `port` until it succeeded (panicking if it ends
/// otherwise or `deadline` passes); the run.
async fn wait_succeeded(
    port: u16,
    id: &str,
    deadline: Instant,
    all: impl Fn() -> String,
) -> serde_json::Value {
    let all = &all;
    poll_async(
        deadline.saturating_duration_since(Instant::now()),
        Duration::from_millis(100),
        || {
            let run = cli_json(port, &["runs", "show", id], all)["run"].clone();
            let status = run["status"].as_str();
            let failed = matches!(status, Some("failed" | "timed_out" | "cancelled"));
            assert!(!failed, "{run:#}\n{}", all());
            let done = status == Some("succeeded");
            std::future::ready(common::ready_if(done, run))
        },
        |run| format!("run {id} stuck: {run:#}\n{}", all()),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn any_server_answers_any_call() {
    let pg = TempPostgres::start();
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = start_three(&pg, &pg.url(), dir.path());
    let all = || logs(&[&a, &b, &c]);

    // Pub/Sub: create through B, subscribe through C, publish through B,
    // pull through C, acknowledge through A.
    let (mut pub_b, mut sub_b) = clients(b.port).await;
    let (_, mut sub_c) = clients(c.port).await;
    let (_, mut sub_a) = clients(a.port).await;
    create_topic_and_sub(&mut pub_b, &mut sub_c, "events", "events-sub").await;
    let published: HashSet<String> = publish_batch(pub_b, "events", "m", 20)
        .await
        .unwrap()
        .into_iter()
        .collect();
    let mut received = HashSet::new();
    let deadline = Instant::now() + PATIENCE;
    while received.len() < published.len() {
        assert!(
            Instant::now() < deadline,
            "pull through C stalled\n{}",
            all()
        );
        let msgs = pull_once(&mut sub_c, &subscription("events-sub"))
            .await
            .unwrap();
        let ack_ids = msgs.iter().map(|m| m.ack_id.clone()).collect::<Vec<_>>();
        if !ack_ids.is_empty() {
            sub_a
                .acknowledge(pb::AcknowledgeRequest {
                    subscription: subscription("events-sub"),
                    ack_ids,
                })
                .await
                .unwrap();
        }
        received.extend(msgs.into_iter().map(|m| m.message.unwrap().message_id));
    }
    assert_eq!(received, published);
    // Acknowledged through A: nothing is left for B either.
    let left = pull_once(&mut sub_b, &subscription("events-sub"))
        .await
        .unwrap();
    assert!(left.is_empty(), "acked messages came back: {left:?}");

    // Jobs: a manifest applied through C is in force; a run triggered
    // through B is listed through A, executed by the owner.
    apply(
        c.port,
        dir.path(),
        include_str!("manifests/cluster-hello.toml"),
        all,
    );
    let run = cli_json(b.port, &["jobs", "trigger", "hello"], all)["run"].clone();
    let id = run["id"].to_string();
    let run = wait_succeeded(a.port, &id, Instant::now() + PATIENCE, all).await;
    assert_eq!(
        run["node"], "a",
        "the run names the server that ran it: {run:#}"
    );
    let log = cli_json(c.port, &["logs", &id], all);
    assert!(
        log.to_string().contains("hello from the cluster"),
        "log through C: {log:#}"
    );
    let listed = cli_json(c.port, &["runs", "--job", "hello"], all);
    assert_eq!(listed["runs"].as_array().unwrap().len(), 1, "{listed:#}");

    // `pubrun cluster` through a standby: three members, A the owner.
    let cluster = cli_json(b.port, &["cluster"], all);
    assert_eq!(cluster["mode"], "cluster", "{cluster:#}");
    assert_eq!(cluster["owner"]["node"], "a", "{cluster:#}");
    let mut members: Vec<(String, bool)> = common::array(&cluster, "nodes")
        .iter()
        .map(|n| (n["name"].as_str().unwrap().to_string(), n["owner"] == true))
        .collect();
    members.sort();
    assert_eq!(
        members,
        [("a".into(), true), ("b".into(), false), ("c".into(), false)],
        "{cluster:#}"
    );
}

/// What the load generators saw.
#[derive(Default)]
struct Seen {
    /// Publishes that returned ids.
    published: HashSet<String>,
    /// Every delivery, by message id.
    received: HashMap<String, u32>,
    /// Messages whose acknowledge returned OK, and when.
    acked: HashMap<String, Instant>,
    /// Deliveries of a message after its ack returned OK.
    came_back: Vec<String>,
    /// Times of successful pulls that returned messages.
    deliveries: Vec<Instant>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_the_owner_under_load_loses_nothing() {
    let pg = TempPostgres::start();
    let dir = tempfile::tempdir().unwrap();
    let (mut a, mut b, mut c) = start_three(&pg, &pg.url(), dir.path());

    apply(
        b.port,
        dir.path(),
        include_str!("manifests/cluster-count.toml"),
        || logs(&[&a, &b, &c]),
    );

    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(AtomicBool::new(false));
    // Publisher through B: batches of 10 to `events`, one message to `work`
    // (one run each) per batch; a failed publish is retried as a new one.
    let work_ids = Arc::new(Mutex::new(HashSet::new()));
    let publisher = {
        let (seen, stop, work_ids) = (seen.clone(), stop.clone(), work_ids.clone());
        let port = b.port;
        tokio::spawn(async move {
            let (mut p, _) = clients(port).await;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let batch = (0..10)
                    .map(|i| pb::PubsubMessage {
                        data: format!("e{n}-{i}").into_bytes().into(),
                        ..Default::default()
                    })
                    .collect();
                if let Ok(r) = p
                    .publish(pb::PublishRequest {
                        topic: topic("events"),
                        messages: batch,
                    })
                    .await
                {
                    seen.lock()
                        .unwrap()
                        .published
                        .extend(r.into_inner().message_ids);
                }
                if n.is_multiple_of(2) && work_ids.lock().unwrap().len() < 40 {
                    if let Ok(r) = p
                        .publish(pb::PublishRequest {
                            topic: topic("work"),
                            messages: vec![pb::PubsubMessage {
                                data: format!("w{n}").into_bytes().into(),
                                ..Default::default()
                            }],
                        })
                        .await
                    {
                        work_ids.lock().unwrap().extend(r.into_inner().message_ids);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    // Consumer through C: pull, acknowledge, remember what came back.
    let consumer = {
        let (seen, stop) = (seen.clone(), stop.clone());
        let port = c.port;
        tokio::spawn(async move {
            let (_, mut s) = clients(port).await;
            let name = subscription("events-sub");
            loop {
                let msgs = match pull_once(&mut s, &name).await {
                    Ok(m) => m,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let done = stop.load(Ordering::Relaxed) && {
                    let g = seen.lock().unwrap();
                    g.published.iter().all(|id| g.received.contains_key(id))
                };
                if done {
                    return;
                }
                if msgs.is_empty() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                {
                    let mut g = seen.lock().unwrap();
                    g.deliveries.push(Instant::now());
                    for m in &msgs {
                        let id = m.message.as_ref().unwrap().message_id.clone();
                        if g.acked.contains_key(&id) {
                            g.came_back.push(id.clone());
                        }
                        *g.received.entry(id).or_default() += 1;
                    }
                }
                let ack = s
                    .acknowledge(pb::AcknowledgeRequest {
                        subscription: name.clone(),
                        ack_ids: msgs.iter().map(|m| m.ack_id.clone()).collect(),
                    })
                    .await;
                if ack.is_ok() {
                    let now = Instant::now();
                    let mut g = seen.lock().unwrap();
                    for m in &msgs {
                        g.acked
                            .insert(m.message.as_ref().unwrap().message_id.clone(), now);
                    }
                }
            }
        })
    };

    // Load runs for a while, then the owner dies.
    let deadline = Instant::now() + PATIENCE;
    while seen.lock().unwrap().acked.len() < 200 {
        assert!(
            Instant::now() < deadline,
            "no load before the kill\n{}",
            logs(&[&a, &b, &c])
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.server.child().kill().expect("SIGKILL a");
    a.server.child().wait().unwrap();
    let killed = Instant::now();

    // A new owner (b or c) serves; the other forwards to it.
    let owner = wait_owner(b.port, |n| n != "a", || logs(&[&b, &c])).await;
    wait_answered_by(c.port, &owner, PATIENCE, || logs(&[&b, &c]));
    // Keep the load on for a while after the takeover.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let after = seen
            .lock()
            .unwrap()
            .deliveries
            .iter()
            .filter(|t| **t > killed)
            .count();
        if after >= 20 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "delivery did not resume after the kill\n{}",
            logs(&[&b, &c])
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    publisher.await.unwrap();
    tokio::time::timeout(PATIENCE, consumer)
        .await
        .unwrap_or_else(|_| {
            let g = seen.lock().unwrap();
            let missing: Vec<_> = g
                .published
                .iter()
                .filter(|id| !g.received.contains_key(*id))
                .take(10)
                .collect();
            panic!(
                "published messages never delivered (e.g. {missing:?})\n{}",
                logs(&[&b, &c])
            )
        })
        .unwrap();

    {
        let g = seen.lock().unwrap();
        assert!(
            g.published.len() > 200,
            "load too small: {}",
            g.published.len()
        );
        assert!(
            g.came_back.is_empty(),
            "messages delivered again after their ack returned OK: {:?}",
            &g.came_back[..g.came_back.len().min(10)]
        );
        // Delivery resumed within 15 s of the kill (the lease TTL is short here;
        // the bound is the issue's, for any TTL up to the default 10 s).
        let first_after = g
            .deliveries
            .iter()
            .find(|t| **t > killed)
            .expect("a delivery after the kill");
        let gap = first_after.duration_since(killed);
        assert!(
            gap < Duration::from_secs(15),
            "delivery resumed after {gap:?}"
        );
    }

    // Every `work` message that was acknowledged as published made exactly
    // one run, and every run ended once, successfully.
    let work: HashSet<String> = work_ids.lock().unwrap().clone();
    assert!(!work.is_empty());
    let port = b.port;
    let all = || logs(&[&b, &c]);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let runs = cli_json(port, &["runs", "--job", "count", "--limit", "1000"], all);
        let runs = runs["runs"].as_array().unwrap().clone();
        let mut by_message: HashMap<String, Vec<serde_json::Value>> = HashMap::new();
        for r in &runs {
            by_message
                .entry(r["message"]["id"].as_str().unwrap_or_default().to_string())
                .or_default()
                .push(r.clone());
        }
        let done = work.iter().all(|id| {
            by_message
                .get(id)
                .is_some_and(|rs| rs.iter().all(|r| r["status"] == "succeeded"))
        });
        if done {
            for (id, rs) in &by_message {
                assert_eq!(rs.len(), 1, "message {id} made {} runs: {rs:#?}", rs.len());
            }
            for r in &runs {
                assert_eq!(r["status"], "succeeded", "{r:#}");
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "runs of acknowledged work messages did not all succeed: {runs:#?}\n{}",
            all()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let still = b.alive() && c.alive();
    assert!(still, "{}", logs(&[&b, &c]));
}

/// A TCP proxy between one server and PostgreSQL that the test can cut
/// (every open connection dropped, new ones refused) and restore.
struct Link {
    port: u16,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Link {
    async fn start(upstream: u16) -> Link {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::new()));
        {
            let (cut, conns) = (cut.clone(), conns.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((mut client, _)) = listener.accept().await else {
                        continue;
                    };
                    if cut.load(Ordering::SeqCst) {
                        continue; // dropped: refused
                    }
                    let task = tokio::spawn(async move {
                        if let Ok(mut up) = TcpStream::connect(("127.0.0.1", upstream)).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                        }
                    });
                    conns.lock().unwrap().push(task);
                }
            });
        }
        Link { port, cut, conns }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for t in self.conns.lock().unwrap().drain(..) {
            t.abort();
        }
    }

    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitioned_owner_steps_down_is_fenced_and_rejoins() {
    let pg = TempPostgres::start();
    let dir = tempfile::tempdir().unwrap();
    let pg_port: u16 = pg
        .url()
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split('/').next()?.parse().ok())
        .expect("port in the PostgreSQL URL");
    let link = Link::start(pg_port).await;
    let a_url = pg
        .url()
        .replacen(&format!(":{pg_port}/"), &format!(":{}/", link.port), 1);
    let (mut a, b, c) = start_three(&pg, &a_url, dir.path());
    let all = |a: &Node| logs(&[a, &b, &c]);
    let a_pid = a.server.pid();

    let (mut pub_b, _) = clients(b.port).await;
    let (_, mut sub_c) = clients(c.port).await;
    create_topic_and_sub(&mut pub_b, &mut sub_c, "tee", "ess").await;
    let mut published: HashSet<String> = publish_batch(pub_b, "tee", "before", 5)
        .await
        .unwrap()
        .into_iter()
        .collect();

    // Cut A off from PostgreSQL (A still reaches B and C and they reach it).
    link.cut();
    let cut_at = Instant::now();
    // While cut off, nothing A is asked to write can be acknowledged by it.
    let (pub_a, _) = clients(a.port).await;
    if let Ok(ids) = publish_batch(pub_a, "tee", "during", 5).await {
        panic!("a publish through the cut-off owner returned ids {ids:?}");
    }
    // B or C takes over within the lease (+ polling).
    let owner = wait_owner(b.port, |n| n != "a", || all(&a)).await;
    assert!(
        cut_at.elapsed() < Duration::from_secs(15),
        "takeover took {:?}",
        cut_at.elapsed()
    );
    // A says it stepped down, in its log.
    wait_stepped_down(&a).await;
    // The new owner accepts publishes.
    published.extend(publish_until_accepted(b.port, "tee", "after", || all(&a)).await);

    // The network returns: A (the same process, re-executed) rejoins as a
    // standby and forwards to the new owner.
    link.restore();
    wait_answered_by(a.port, &owner, PATIENCE, || all(&a));
    assert!(a.alive(), "A exited instead of rejoining\n{}", a.log());
    assert_eq!(a.server.pid(), a_pid);

    // Everything acknowledged as published is delivered, pulled through A.
    pull_until_delivered(a.port, "ess", &published, || all(&a)).await;
}

/// `--agent-pool`: every server (owner and standbys) runs an agent of the
/// pool, so that pool's runs spread over the whole cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn builtin_agents_spread_runs_over_every_server() {
    let pg = TempPostgres::start();
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = start_three_with(dir.path(), |name| {
        ServeBuilder::cluster(&pg.url(), name, LEASE_TTL)
            .args(["--agent-pool", "workers", "--agent-slots", "2"])
            .env("PUBRUN_AGENT_TOKEN", "cluster-agent-token")
    });
    let all = || logs(&[&a, &b, &c]);
    apply(
        b.port,
        dir.path(),
        include_str!("manifests/cluster-spread.toml"),
        all,
    );
    let ids: Vec<String> = (0..18)
        .map(|_| cli_json(c.port, &["jobs", "trigger", "spread"], all)["run"]["id"].to_string())
        .collect();
    let mut machines = HashSet::new();
    for id in &ids {
        let run = wait_succeeded(a.port, id, Instant::now() + PATIENCE, all).await;
        machines.insert(run["machine"].as_str().unwrap_or_default().to_string());
    }
    let want: HashSet<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
    assert_eq!(
        machines, want,
        "runs of the pool ran on every server's built-in agent"
    );
}

/// An agent whose slots are full holds a long poll; when its run ends the
/// held poll hands it the next run at once instead of after the whole hold
/// (10 s here), so one slot runs queued runs back to back. (All five are
/// queued up front, so no new enqueue wakes the poll.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_agent_gets_the_next_run_as_soon_as_a_slot_frees() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Node::spawn(
        "a",
        dir.path(),
        ServeBuilder::new()
            .args(["--agent-pool", "workers", "--agent-slots", "1"])
            .env("PUBRUN_AGENT_TOKEN", "agent-token")
            .log_level("info"),
    );
    let port = a.port;
    a.server.wait_healthy();
    let all = || a.log();
    apply(
        port,
        dir.path(),
        include_str!("manifests/cluster-quick.toml"),
        all,
    );
    let ids: Vec<String> = (0..5)
        .map(|_| cli_json(port, &["jobs", "trigger", "quick"], all)["run"]["id"].to_string())
        .collect();
    // Without the early hand-out each run after the first waits for the
    // 10 s hold: about 40 s for five. 15 s is generous for a slow box.
    let deadline = Instant::now() + Duration::from_secs(15);
    for id in &ids {
        wait_succeeded(port, id, deadline, all).await;
    }
}

/// PostgreSQL restarts for longer than the lease: calls fail meanwhile (no
/// publish is acknowledged), every server survives (the owner steps down
/// and rejoins), and afterwards one of them serves everything that was
/// acknowledged before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgres_restart_loses_nothing_and_every_server_survives() {
    let pg = TempPostgres::start();
    let dir = tempfile::tempdir().unwrap();
    let (mut a, mut b, mut c) = start_three(&pg, &pg.url(), dir.path());
    let (mut publisher, mut subscriber) = clients(b.port).await;
    create_topic_and_sub(&mut publisher, &mut subscriber, "restart", "restart-sub").await;
    let mut published: HashSet<String> = publish_batch(publisher.clone(), "restart", "before", 5)
        .await
        .unwrap()
        .into_iter()
        .collect();

    pg.stop();
    // While it is down nothing can be acknowledged.
    if let Ok(ids) = publish_batch(publisher, "restart", "during", 5).await {
        panic!("a publish was acknowledged while PostgreSQL was down: {ids:?}");
    }
    // Longer than the lease: the owner steps down.
    wait_stepped_down(&a).await;
    pg.start_again();

    // Some server owns the state again; every port answers.
    let all = || logs(&[&a, &b, &c]);
    let owner = wait_owner(c.port, |_| true, all).await;
    for n in [&a, &b] {
        wait_answered_by(n.port, &owner, PATIENCE, all);
    }
    published.extend(publish_until_accepted(b.port, "restart", "after", all).await);
    pull_until_delivered(a.port, "restart-sub", &published, all).await;
    let alive = [a.alive(), b.alive(), c.alive()];
    assert_eq!(alive, [true; 3], "{}", logs(&[&a, &b, &c]));
}
