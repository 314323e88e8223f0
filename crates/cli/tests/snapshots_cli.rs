//! `pubrun snapshots …` and `pubrun subscriptions seek …` against the real
//! binary, including a snapshot that outlives a server restart.

mod common;

use std::process::{Command, Output};

use common::{ServeBuilder, BIN};

fn run(port: u16, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("PUBRUN_ADDR", format!("http://127.0.0.1:{port}"))
        .env("PUBRUN_PROJECT", "snapcli")
        .env_remove("PUBRUN_TOKEN")
        .output()
        .unwrap()
}

/// Runs and asserts success; returns stdout.
fn ok(port: u16, args: &[&str]) -> String {
    let o = run(port, args);
    assert!(
        o.status.success(),
        "pubrun {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// Runs and asserts failure; returns stderr.
fn fails(port: u16, args: &[&str]) -> String {
    let o = run(port, args);
    assert!(!o.status.success(), "pubrun {args:?} should fail");
    String::from_utf8(o.stderr).unwrap()
}

/// Message data pulled (and acked) from the subscription, sorted.
fn pull(port: u16, sub: &str) -> Vec<String> {
    let out = ok(port, &["pull", sub, "--ack", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    let mut datas: Vec<String> = v["receivedMessages"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| {
                    let b64 = m["message"]["data"].as_str().unwrap_or("");
                    String::from_utf8(base64_decode(b64)).unwrap()
                })
                .collect()
        })
        .unwrap_or_default();
    datas.sort();
    datas
}

fn base64_decode(s: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let mut buf = 0u32;
    let mut bits = 0;
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = ALPHABET.iter().position(|a| *a == c).expect("base64") as u32;
        buf = (buf << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
            buf &= (1 << bits) - 1;
        }
    }
    out
}

#[test]
fn snapshots_and_seek_through_the_cli_survive_a_restart() {
    let mut server = ServeBuilder::new().start();
    let port = server.port();

    ok(port, &["topics", "create", "events"]);
    ok(
        port,
        &["subscriptions", "create", "events-sub", "--topic", "events"],
    );
    ok(port, &["publish", "events", "--data", "first"]);
    assert_eq!(pull(port, "events-sub"), ["first"]);
    ok(port, &["publish", "events", "--data", "second"]);

    // The snapshot holds "second" (unacked now) and everything after it.
    let create = [
        "snapshots",
        "create",
        "before-third",
        "--subscription",
        "events-sub",
    ];
    let out = ok(port, &[&create[..], &["--label", "why=test"]].concat());
    assert!(
        out.contains("created snapshot projects/snapcli/snapshots/before-third"),
        "{out}"
    );
    let err = fails(port, &create);
    assert!(err.contains("already exists"), "{err}");
    ok(port, &["publish", "events", "--data", "third"]);
    assert_eq!(pull(port, "events-sub"), ["second", "third"]);

    let list = ok(port, &["snapshots", "list"]);
    assert!(
        list.contains("before-third") && list.contains("events"),
        "{list}"
    );
    let got = ok(port, &["snapshots", "get", "before-third", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&got).unwrap();
    assert_eq!(v["topic"], "projects/snapcli/topics/events");
    assert_eq!(v["labels"]["why"], "test");
    assert!(v["expireTime"].as_str().is_some_and(|t| t.ends_with('Z')));

    // Restart on the same data directory: the snapshot and its messages stay.
    server.restart();
    assert!(
        pull(port, "events-sub").is_empty(),
        "acks survive the restart"
    );
    let seek_back = [
        "subscriptions",
        "seek",
        "events-sub",
        "--snapshot",
        "before-third",
    ];
    ok(port, &seek_back);
    assert_eq!(pull(port, "events-sub"), ["second", "third"]);

    // Seek to a time in the future acks everything; a bad time is refused.
    ok(port, &["publish", "events", "--data", "fourth"]);
    ok(
        port,
        &[
            "subscriptions",
            "seek",
            "events-sub",
            "--time",
            "2999-01-01T00:00:00Z",
        ],
    );
    assert!(pull(port, "events-sub").is_empty());
    let err = fails(
        port,
        &["subscriptions", "seek", "events-sub", "--time", "yesterday"],
    );
    assert!(err.contains("time"), "{err}");
    let err = fails(port, &["subscriptions", "seek", "events-sub"]);
    assert!(
        err.contains("--time") || err.contains("--snapshot"),
        "{err}"
    );

    ok(port, &["snapshots", "delete", "before-third"]);
    let err = fails(port, &["snapshots", "get", "before-third"]);
    assert!(err.contains("not found"), "{err}");
    let err = fails(port, &seek_back);
    assert!(err.contains("not found"), "{err}");
    drop(server);
}
