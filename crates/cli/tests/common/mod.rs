//! Helpers shared by the `pubrun` binary's integration tests: a child
//! process guard, a free port, and waiting for a server to come up.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Child;
use std::time::{Duration, Instant};

use tonic::transport::Channel;

/// A `pubrun serve` child, killed when dropped (also when a test panics).
pub struct Server(pub Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether `GET /healthz` on the port answers 200.
pub fn healthz(port: u16) -> bool {
    healthz_response(port).is_some_and(|r| r.starts_with("HTTP/1.1 200"))
}

fn healthz_response(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    Some(resp)
}

/// Cluster mode: the node that answered a healthy `GET /healthz` on the
/// port (its `x-pubrun-node` header), whichever server the port belongs to.
pub fn answering_node(port: u16) -> Option<String> {
    let resp = healthz_response(port)?;
    if !resp.starts_with("HTTP/1.1 200") {
        return None;
    }
    resp.lines().take_while(|l| !l.is_empty()).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("x-pubrun-node")
            .then(|| v.trim().to_string())
    })
}

/// Waits until `GET /healthz` on `port` is answered by `node` (directly or
/// forwarded), panicking with `log()` after `patience`.
pub fn wait_answered_by(port: u16, node: &str, patience: Duration, log: impl Fn() -> String) {
    let deadline = Instant::now() + patience;
    loop {
        let seen = answering_node(port);
        if seen.as_deref() == Some(node) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "port {port} not answered by node {node} within {patience:?} (last: {seen:?})\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the server child on `port` is healthy; panics (with `log()`
/// appended) if it exits first or is not healthy within `patience`.
pub fn wait_healthy(child: &mut Child, port: u16, patience: Duration, log: impl Fn() -> String) {
    let deadline = Instant::now() + patience;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "pubrun serve exited before becoming healthy: {status}\n{}",
                log()
            );
        }
        if healthz(port) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pubrun serve not healthy on port {port} within {patience:?}\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A gRPC channel to the server on `port`, retried for up to 60 s.
pub async fn connect(port: u16) -> Channel {
    let url = format!("http://127.0.0.1:{port}");
    for _ in 0..600 {
        if let Ok(ch) = Channel::from_shared(url.clone()).unwrap().connect().await {
            return ch;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("pubrun did not listen on {url} within 60 s");
}
