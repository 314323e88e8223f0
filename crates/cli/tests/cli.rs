//! The client commands as a user runs them: the real `pubrun` binary against a
//! real `pubrun serve` child process, asserting on stdout, stderr and exit codes.

mod common;

use std::process::Command;

use common::{free_port, Cli, Ran, ServeBuilder, BIN};
use serde_json::Value;

/// `pubrun ARGS` as a user without a server or token runs it.
fn run(args: &[&str]) -> Ran {
    Cli::new(args).ran(None)
}

#[test]
fn create_publish_pull_ack_list_and_delete() {
    let server = ServeBuilder::new().start();

    let out = server.ok(&["topics", "create", "orders", "--label", "team=data"]);
    assert!(
        out.contains("created topic projects/demo/topics/orders"),
        "{out}"
    );
    let out = server.ok(&[
        "subscriptions",
        "create",
        "workers",
        "--topic",
        "orders",
        "--ack-deadline",
        "30",
    ]);
    assert!(
        out.contains("created subscription projects/demo/subscriptions/workers"),
        "{out}"
    );

    // Lists show what was created, in aligned columns.
    let out = server.ok(&["topics", "list"]);
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("TOPIC") && lines[0].contains("LABELS"),
        "{out}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("orders ") && l.contains("team=data")),
        "{out}"
    );
    let out = server.ok(&["subscriptions", "list"]);
    let row = out
        .lines()
        .find(|l| l.starts_with("workers "))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(row.contains("orders") && row.contains("30s"), "{out}");
    let out = server.ok(&["subscriptions", "list", "--topic", "orders"]);
    assert!(out.lines().any(|l| l == "workers"), "{out}");

    // Get, human and JSON.
    let out = server.ok(&["topics", "get", "orders"]);
    assert!(
        out.starts_with("name:") && out.contains("projects/demo/topics/orders"),
        "{out}"
    );
    let sub = server.json(&[
        "subscriptions",
        "get",
        "projects/demo/subscriptions/workers",
    ]);
    assert_eq!(sub["topic"], "projects/demo/topics/orders", "{sub}");
    assert_eq!(sub["ackDeadlineSeconds"].as_i64(), Some(30), "{sub}");

    // Publish with attributes prints the message id.
    let out = server.ok(&[
        "publish",
        "orders",
        "--data",
        "hello world",
        "--attr",
        "color=red",
        "--attr",
        "size=L",
    ]);
    let id = out.trim().to_string();
    assert!(
        !id.is_empty() && !id.contains('\n'),
        "one message id expected: {out:?}"
    );

    // Pull --ack shows it; a second pull shows nothing.
    let out = server.ok(&["pull", "workers", "--ack"]);
    assert!(out.contains("hello world"), "{out}");
    assert!(out.contains("color=red") && out.contains("size=L"), "{out}");
    assert!(out.contains(&id), "message id {id} in {out}");
    let r = server.run(&["pull", "workers"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout, "", "nothing left after --ack");
    assert!(r.stderr.contains("no messages"), "{}", r.stderr);

    // Data from stdin (text with an ordering key, then binary data shown as base64).
    let r = server.run_stdin(
        &[
            "publish",
            "orders",
            "--data-file",
            "-",
            "--ordering-key",
            "k1",
            "--json",
        ],
        b"keyed",
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let published: Value =
        serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout));
    assert_eq!(
        published["messageIds"].as_array().map(Vec::len),
        Some(1),
        "{published}"
    );
    let r = server.run_stdin(
        &["publish", "orders", "--data-file", "-"],
        &[0xff, 0x00, 0xfe],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let out = server.ok(&["pull", "workers", "--max", "10", "--ack"]);
    assert!(
        out.contains("keyed") && out.contains("ordering key:"),
        "{out}"
    );
    assert!(out.contains("data (base64): /wD+"), "{out}");
    let pulled = server.json(&["pull", "workers", "--ack"]);
    assert!(pulled.is_object(), "{pulled}");

    let topics = server.json(&["topics", "list"]);
    let names: Vec<&str> = common::array(&topics, "topics")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(names, ["projects/demo/topics/orders"], "{topics}");
    let subs = server.json(&["subscriptions", "list"]);
    assert_eq!(
        subs["subscriptions"][0]["name"], "projects/demo/subscriptions/workers",
        "{subs}"
    );

    // Delete, then it is gone.
    let out = server.ok(&["subscriptions", "delete", "workers"]);
    assert!(
        out.contains("deleted subscription projects/demo/subscriptions/workers"),
        "{out}"
    );
    let out = server.ok(&["topics", "delete", "orders"]);
    assert!(
        out.contains("deleted topic projects/demo/topics/orders"),
        "{out}"
    );
    let r = server.run(&["topics", "list"]);
    assert_eq!((r.code, r.stdout.as_str()), (0, ""), "{}", r.stderr);
    assert!(
        r.stderr.contains("no topics in projects/demo"),
        "{}",
        r.stderr
    );
}

#[test]
fn publish_reads_stdin_and_pull_json_round_trips() {
    let server = ServeBuilder::new().start();
    server.ok(&["topics", "create", "inbox"]);
    server.ok(&[
        "subscriptions",
        "create",
        "inbox-sub",
        "--topic",
        "projects/demo/topics/inbox",
    ]);
    let r = server.run_stdin(
        &[
            "publish",
            "inbox",
            "--data-file",
            "-",
            "--attr",
            "a=1=2",
            "--json",
        ],
        b"from stdin\n",
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let published: Value = serde_json::from_str(&r.stdout).unwrap();
    let id = published["messageIds"][0]
        .as_str()
        .unwrap_or_else(|| panic!("{published}"))
        .to_string();

    let pulled = server.json(&["pull", "inbox-sub", "--ack"]);
    let msgs = pulled["receivedMessages"]
        .as_array()
        .unwrap_or_else(|| panic!("{pulled}"));
    assert_eq!(msgs.len(), 1, "{pulled}");
    let m = &msgs[0]["message"];
    assert_eq!(m["messageId"], id.as_str(), "{pulled}");
    assert_eq!(
        m["data"], "ZnJvbSBzdGRpbgo=",
        "base64 of \"from stdin\\n\": {pulled}"
    );
    assert_eq!(m["attributes"]["a"], "1=2", "{pulled}");
    assert!(msgs[0]["ackId"].is_string(), "{pulled}");

    let again = server.json(&["pull", "inbox-sub"]);
    let n = again
        .get("receivedMessages")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    assert_eq!(n, 0, "acked message came back: {again}");
}

#[test]
fn projects_scope_short_names() {
    let server = ServeBuilder::new().start();
    server.ok(&["topics", "create", "shared", "--project", "other"]);
    server.ok(&["topics", "create", "projects/third/topics/full"]);
    let r = server.run(&["topics", "list"]);
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (0, ""),
        "demo is empty: {}",
        r.stderr
    );
    let out = server.ok(&["topics", "list", "--project", "other"]);
    assert!(out.lines().any(|l| l.starts_with("shared")), "{out}");
    let t = server.json(&["topics", "get", "full", "--project", "third"]);
    assert_eq!(t["name"], "projects/third/topics/full");
    // A subscription in one project on a topic in another, by full name.
    server.ok(&[
        "subscriptions",
        "create",
        "sub1",
        "--topic",
        "projects/other/topics/shared",
    ]);
    let out = server.ok(&["subscriptions", "list"]);
    let row = out
        .lines()
        .find(|l| l.starts_with("sub1 "))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(row.contains("projects/other/topics/shared"), "{out}");
}

#[test]
fn missing_resources_are_not_found_with_exit_code_1() {
    let server = ServeBuilder::new().start();
    for args in [
        &["topics", "get", "nope"][..],
        &["topics", "delete", "nope"],
        &["publish", "nope", "--data", "x"],
        &["subscriptions", "get", "nope"],
        &["pull", "nope"],
    ] {
        let r = server.run(args);
        assert_eq!(r.code, 1, "`pubrun {}`: {}", args.join(" "), r.stderr);
        assert!(
            r.stderr.starts_with("error: NOT_FOUND: "),
            "`pubrun {}`: {}",
            args.join(" "),
            r.stderr
        );
        assert!(
            r.stderr.contains("nope"),
            "the message names the resource: {}",
            r.stderr
        );
        assert_eq!(r.stdout, "");
    }
    let r = server.run(&["subscriptions", "create", "sub1", "--topic", "nope"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("NOT_FOUND"), "{}", r.stderr);

    server.ok(&["topics", "create", "dup"]);
    let r = server.run(&["topics", "create", "dup"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("ALREADY_EXISTS"), "{}", r.stderr);
}

#[test]
fn invalid_names_fail_before_any_request() {
    // No server: the name is rejected locally with Google's rule.
    let addr = format!("127.0.0.1:{}", free_port());
    let r = run(&["topics", "create", "9lives", "--addr", &addr]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("must start with a letter"),
        "{}",
        r.stderr
    );
    let r = run(&["topics", "get", "a/b", "--addr", &addr]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("projects/PROJECT/topics/ID"),
        "{}",
        r.stderr
    );
}

#[test]
fn unreachable_server_says_how_to_fix_it() {
    let port = free_port(); // bound and released: nothing listens there
    let r = run(&["topics", "list", "--addr", &format!("127.0.0.1:{port}")]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let err = r.stderr;
    assert!(
        err.contains(&format!("cannot reach pubrun at http://127.0.0.1:{port}")),
        "{err}"
    );
    assert!(err.contains("connection refused"), "{err}");
    assert!(
        err.contains("pubrun serve") && err.contains("PUBRUN_ADDR"),
        "{err}"
    );
}

#[test]
fn bad_attr_is_a_usage_error_naming_the_value() {
    let r = run(&["publish", "t1x", "--data", "x", "--attr", "color-red"]);
    assert_eq!(r.code, 2, "clap usage error: {}", r.stderr);
    assert!(
        r.stderr.contains("color-red") && r.stderr.contains("KEY=VALUE"),
        "{}",
        r.stderr
    );
    let r = run(&["topics", "create", "t1x", "--label", "=v"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("=v"), "{}", r.stderr);
    let r = run(&["publish", "t1x", "--data", "x", "--data-file", "f"]);
    assert_eq!(r.code, 2, "--data and --data-file conflict: {}", r.stderr);
}

#[test]
fn token_is_required_when_the_server_has_one() {
    let server = ServeBuilder::new().token("s3cret").start();
    // The harness's own client would send the server's token: this one does not.
    let anon = |args: &[&str]| Cli::new(args).env("PUBRUN_ADDR", server.addr());

    let r = anon(&["topics", "list"]).ran(None);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("UNAUTHENTICATED") && r.stderr.contains("requires a token"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("--token") && r.stderr.contains("PUBRUN_TOKEN"),
        "{}",
        r.stderr
    );

    let r = anon(&["topics", "list", "--token", "wrong"]).ran(None);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("rejected the token"), "{}", r.stderr);

    let out = anon(&["topics", "create", "secure", "--token", "s3cret"]).ok();
    assert!(out.contains("created topic"), "{out}");
    let out = anon(&["topics", "list", "--token", "s3cret"]).ok();
    assert!(out.lines().any(|l| l.starts_with("secure")), "{out}");

    // The token can also come from the environment.
    pubrun_testkit::run_ok(
        "pubrun topics get",
        Command::new(BIN)
            .args(["topics", "get", "secure"])
            .env("PUBRUN_ADDR", server.addr())
            .env("PUBRUN_TOKEN", "s3cret"),
    );
}
