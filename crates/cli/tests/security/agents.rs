//! The agent protocol under attack (issue 11 items 8, 10 and 12), against
//! a real `pubrun serve --token …` with an `agents` pool:
//!
//! - no credentials and a huge chunked body: 401 at once, before the body
//!   is sent, without the server's memory growing (register, poll, log,
//!   result); without any pool that takes agents: 404 the same way;
//! - a pool token but a body over the route's limit: 413, from the
//!   declared `Content-Length` before any body, or as a chunked body passes
//!   the limit;
//! - a live agent's name cannot be taken with the pool token alone; once
//!   the agent has been silent past `lease_timeout` it can, and the old
//!   session gets nothing in (its run went back to the queue); bad names
//!   are refused.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{Serve, ServeBuilder};

const BIN: &str = env!("CARGO_BIN_EXE_pubrun");
const SERVER_TOKEN: &str = "server-token-security-agents";
const POOL_TOKEN: &str = "pool-token-security-agents";
const PATIENCE: Duration = Duration::from_secs(60);
const MIB: u64 = 1024 * 1024;

const MANIFEST: &str = include_str!("../manifests/security-agents.toml");

type Srv = Serve;

/// `pubrun serve --token` on loopback, with `manifest` as its config.
fn start_srv(manifest: Option<&str>) -> Srv {
    ServeBuilder::new()
        .token(SERVER_TOKEN)
        .maybe_config(manifest)
        .env("SEC_POOL_TOKEN", POOL_TOKEN)
        .log_level("info")
        .patience(PATIENCE)
        .start()
}

/// What the agent tests ask of the server (names unique in the `security` crate).
impl Serve {
    /// The server's resident memory, from /proc.
    fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("/proc/PID/status");
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS");
        kb * 1024
    }

    fn publish(&self, data: &str) {
        pubrun_testkit::run_ok(
            "publish",
            Command::new(BIN)
                .args(["publish", "work", "--data", data])
                .env("PUBRUN_ADDR", self.addr())
                .env("PUBRUN_TOKEN", SERVER_TOKEN)
                .env("PUBRUN_PROJECT", "demo"),
        );
    }
}

/// What became of one request with a large chunked body.
struct Flood {
    status: u16,
    /// Body bytes written when the status line had arrived.
    sent_at_answer: u64,
    elapsed: Duration,
}

/// Sends `head` (request line and headers, no blank line) with a chunked
/// body of `total` bytes in 1 MiB chunks from another thread, and reads
/// the answer meanwhile. The socket is shut once the answer is in.
fn flood(port: u16, head: &str, total: u64) -> Flood {
    let started = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.write_all(format!("{head}\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n").as_bytes())
        .unwrap();
    let sent = Arc::new(AtomicU64::new(0));
    let writer = {
        let mut w = s.try_clone().unwrap();
        let sent = sent.clone();
        std::thread::spawn(move || {
            let chunk = vec![b'x'; MIB as usize];
            while sent.load(Ordering::SeqCst) < total {
                let ok = w
                    .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                    .is_ok()
                    && w.write_all(&chunk).is_ok()
                    && w.write_all(b"\r\n").is_ok();
                if !ok {
                    return;
                }
                sent.fetch_add(MIB, Ordering::SeqCst);
            }
            let _ = w.write_all(b"0\r\n\r\n");
        })
    };
    let status = read_status(&mut s);
    let sent_at_answer = sent.load(Ordering::SeqCst);
    let elapsed = started.elapsed();
    let _ = s.shutdown(Shutdown::Both);
    writer.join().unwrap();
    Flood {
        status,
        sent_at_answer,
        elapsed,
    }
}

/// Reads up to the end of the response head; returns its status.
fn read_status(s: &mut TcpStream) -> u16 {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            Ok(_) => break,
            Err(e) => panic!("no answer ({e}) after {:?}", String::from_utf8_lossy(&buf)),
        }
    }
    let head = String::from_utf8_lossy(&buf);
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {head:?}"))
}

/// A request with a declared length and no body sent: the status.
fn declared(port: u16, head: &str, length: u64) -> u16 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    s.write_all(
        format!("{head}\r\nHost: 127.0.0.1\r\nContent-Length: {length}\r\nContent-Type: application/json\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    read_status(&mut s)
}

const HUGE: u64 = 200 * MIB;

#[test]
fn unauthenticated_agent_calls_are_refused_before_their_body_is_read() {
    let srv = start_srv(Some(MANIFEST));
    let before = srv.rss_bytes();
    for path in [
        "/agent/v1/register",
        "/agent/v1/poll",
        "/agent/v1/leases/1/log?offset=0",
        "/agent/v1/leases/1/result",
    ] {
        for auth in ["", "\r\nAuthorization: Bearer not-the-pool-token"] {
            let f = flood(srv.port(), &format!("POST {path} HTTP/1.1{auth}"), HUGE);
            assert_eq!(f.status, 401, "{path} {auth:?}\n{}", srv.log());
            assert!(
                f.sent_at_answer < HUGE / 4,
                "{path}: answered only after {} MiB of body",
                f.sent_at_answer / MIB
            );
            assert!(
                f.elapsed < Duration::from_secs(20),
                "{path}: {:?}",
                f.elapsed
            );
        }
    }
    let grew = srv.rss_bytes().saturating_sub(before);
    assert!(grew < 64 * MIB, "server memory grew by {} MiB", grew / MIB);
}

#[test]
fn agent_routes_answer_404_without_a_pool_that_takes_agents() {
    let srv = start_srv(None);
    for path in ["/agent/v1/register", "/agent/v1/poll"] {
        let f = flood(srv.port(), &format!("POST {path} HTTP/1.1"), HUGE);
        assert_eq!(f.status, 404, "{path}\n{}", srv.log());
        assert!(f.sent_at_answer < HUGE / 4, "{path}: read the body");
    }
}

#[test]
fn agent_bodies_over_their_limit_are_refused_with_413() {
    let srv = start_srv(Some(MANIFEST));
    let auth = format!("Authorization: Bearer {POOL_TOKEN}");
    // Declared too long: refused before any byte of body is sent.
    for (path, length) in [
        ("/agent/v1/register", 100 * MIB),
        ("/agent/v1/poll", MIB),
        ("/agent/v1/leases/1/log?offset=0", 100 * MIB),
        ("/agent/v1/leases/1/result", MIB),
    ] {
        let status = declared(
            srv.port(),
            &format!("POST {path} HTTP/1.1\r\n{auth}"),
            length,
        );
        assert_eq!(status, 413, "{path}\n{}", srv.log());
    }
    // Chunked: refused as the body passes the limit, not read to its end.
    let f = flood(
        srv.port(),
        &format!("POST /agent/v1/register HTTP/1.1\r\n{auth}"),
        HUGE,
    );
    assert_eq!(f.status, 413, "{}", srv.log());
    assert!(
        f.sent_at_answer < HUGE / 4,
        "read {} MiB",
        f.sent_at_answer / MIB
    );
}

/// A client of the agent protocol driven by hand.
struct Raw {
    http: reqwest::Client,
}

impl Raw {
    async fn post(
        &self,
        srv: &Srv,
        path: &str,
        agent: Option<(&str, &str)>,
        body: Value,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .post(srv.url(&format!("/agent/v1{path}")))
            .bearer_auth(POOL_TOKEN)
            .timeout(Duration::from_secs(30));
        if let Some((name, session)) = agent {
            req = req
                .header("x-pubrun-agent", name)
                .header("x-pubrun-session", session);
        }
        let r = req.json(&body).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn register(&self, srv: &Srv, name: &str) -> (u16, Value) {
        self.post(
            srv,
            "/register",
            None,
            json!({ "pool": "crew", "name": name, "slots": 1 }),
        )
        .await
    }

    async fn poll(&self, srv: &Srv, name: &str, session: &str, free: u32) -> (u16, Value) {
        self.post(
            srv,
            "/poll",
            Some((name, session)),
            json!({ "name": name, "free_slots": free, "leases": [] }),
        )
        .await
    }

    /// Polls until a lease is assigned; returns its number.
    async fn lease(&self, srv: &Srv, name: &str, session: &str) -> u64 {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let (status, reply) = self.poll(srv, name, session, 1).await;
            assert_eq!(status, 200, "{reply}\n{}", srv.log());
            if let Some(l) = reply["assign"][0]["lease"].as_u64() {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "no lease for {name}\n{}",
                srv.log()
            );
        }
    }

    async fn log(&self, srv: &Srv, name: &str, session: &str, lease: u64, text: &str) -> u16 {
        let r = self
            .http
            .post(srv.url(&format!("/agent/v1/leases/{lease}/log?offset=0")))
            .bearer_auth(POOL_TOKEN)
            .header("x-pubrun-agent", name)
            .header("x-pubrun-session", session)
            .body(text.to_string())
            .send()
            .await
            .unwrap();
        r.status().as_u16()
    }

    async fn result(&self, srv: &Srv, name: &str, session: &str, lease: u64, code: i32) -> u16 {
        self.post(
            srv,
            &format!("/leases/{lease}/result"),
            Some((name, session)),
            json!({ "exit": pubrun_core::run::Exit { exit_code: Some(code), ..Default::default() } }),
        )
        .await
        .0
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_agents_name_cannot_be_taken_over() {
    let srv = start_srv(Some(MANIFEST));
    let raw = Raw {
        http: reqwest::Client::new(),
    };

    // A registers and gets a session of its own.
    let (status, reg) = raw.register(&srv, "a").await;
    assert_eq!(status, 200, "{reg}\n{}", srv.log());
    let a_session = reg["session"].as_str().unwrap_or_default().to_string();
    assert!(a_session.len() >= 32, "{reg}");
    // Its calls need the session, not only the pool token.
    assert_eq!(raw.poll(&srv, "a", "", 0).await.0, 401);
    assert_eq!(raw.poll(&srv, "a", "guess", 0).await.0, 401);

    // A takes a run.
    srv.publish("{}");
    let lease = raw.lease(&srv, "a", &a_session).await;
    let a_heard = Instant::now();

    // While A is alive, its name is not for the taking.
    let (status, body) = raw.register(&srv, "a").await;
    assert_eq!(status, 409, "{body}\n{}", srv.log());
    assert_eq!(raw.log(&srv, "a", &a_session, lease, "from a\n").await, 200);

    // Silent past lease_timeout (5 s): the name is free again.
    let deadline = Instant::now() + PATIENCE;
    let b_session = loop {
        let (status, body) = raw.register(&srv, "a").await;
        if status == 200 {
            break body["session"].as_str().unwrap().to_string();
        }
        assert_eq!(status, 409, "{body}\n{}", srv.log());
        assert!(Instant::now() < deadline, "name never freed\n{}", srv.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        a_heard.elapsed() >= Duration::from_millis(4500),
        "taken over {:?} after A was last heard",
        a_heard.elapsed()
    );
    assert_ne!(b_session, a_session);

    // A's old session gets nothing in: its lease was taken back.
    assert_eq!(raw.poll(&srv, "a", &a_session, 1).await.0, 401);
    let s = raw.log(&srv, "a", &a_session, lease, "late\n").await;
    assert!(s == 409 || s == 401, "late log: {s}");
    let s = raw.result(&srv, "a", &a_session, lease, 0).await;
    assert!(s == 409 || s == 401, "late result: {s}");

    // The run goes to the new holder of the name; the old session cannot
    // touch that lease either.
    let second = raw.lease(&srv, "a", &b_session).await;
    assert!(second > lease);
    assert_eq!(raw.log(&srv, "a", &a_session, second, "evil\n").await, 401);
    assert_eq!(raw.result(&srv, "a", &a_session, second, 7).await, 401);
    assert_eq!(
        raw.log(&srv, "a", &b_session, second, "from b\n").await,
        200
    );
    assert_eq!(raw.result(&srv, "a", &b_session, second, 0).await, 200);

    // Bad names never register.
    for name in ["a\u{1}b", "line\nbreak", "tab\there", &"x".repeat(64), ""] {
        let (status, body) = raw.register(&srv, name).await;
        assert_eq!(status, 400, "{name:?}: {body}");
    }
}
