//! Everything `pubrun apply` declared survives a restart and `kill -9`, and
//! `serve --config` at start agrees with what was applied; a manifest owns
//! only its project's resources. Drives the real binary.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{Serve, ServeBuilder, BIN};
use pubrun_core::clock::Clock;

const HOOK_TOKEN: &str = "hook-bearer-secret";

fn start(data: &Path, config: Option<&Path>) -> Serve {
    let mut b = ServeBuilder::new()
        .data_dir(data)
        .env("APPLY_TEST_HOOK_TOKEN", HOOK_TOKEN);
    if let Some(c) = config {
        b = b.arg("--config").arg(c);
    }
    b.start()
}

impl Serve {
    /// Ends the server with SIGTERM (graceful) or SIGKILL.
    fn stop(mut self, kill9: bool) {
        if kill9 {
            self.kill();
        } else {
            let status = self.terminate();
            assert!(status.success(), "graceful exit, got {status}");
        }
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .args(["--addr", &format!("127.0.0.1:{}", self.port())])
            .env_remove("PUBRUN_TOKEN")
            .env_remove("PUBRUN_PROJECT")
            .output()
            .unwrap()
    }

    /// Pulls (waiting on the server) until a message matches `want`, acking
    /// everything pulled; returns its attributes and data.
    async fn await_message(
        &self,
        sub: &str,
        patience: Duration,
        want: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let deadline = Instant::now() + patience;
        loop {
            assert!(Instant::now() < deadline, "no matching message on {sub}");
            let r: serde_json::Value = common::json_reply(
                http.post(self.url(&format!("/v1/{sub}:pull")))
                    .json(&serde_json::json!({ "maxMessages": 100, "returnImmediately": false })),
            )
            .await;
            let got = r["receivedMessages"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if got.is_empty() {
                continue;
            }
            let ack_ids: Vec<_> = got.iter().map(|m| m["ackId"].clone()).collect();
            http.post(self.url(&format!("/v1/{sub}:acknowledge")))
                .json(&serde_json::json!({ "ackIds": ack_ids }))
                .send()
                .await
                .unwrap();
            if let Some(m) = got.iter().find(|m| want(&m["message"])) {
                return m["message"].clone();
            }
        }
    }

    async fn post_hook(&self, name: &str, bearer: &str, body: &str) -> reqwest::StatusCode {
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .post(self.url(&format!("/hooks/{name}")))
            .bearer_auth(bearer)
            .body(body.to_string())
            .send()
            .await
            .unwrap()
            .status()
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

const DEMO: &str = include_str!("manifests/apply-restart-demo.toml");

const SUB: &str = "projects/demo/subscriptions/imports-watch";

async fn assert_served(node: &Serve, round: &str) {
    let list = node.ok(&["schedules", "list"]);
    assert!(
        list.contains("every-minute") && list.contains("active"),
        "{round}: {list}"
    );
    assert!(
        node.ok(&["webhooks", "list"]).contains("start-import"),
        "{round}"
    );
    assert_eq!(node.post_hook("start-import", "wrong", "x").await, 401);
    assert_eq!(
        node.post_hook("start-import", HOOK_TOKEN, round).await,
        200,
        "{round}"
    );
    let m = node
        .await_message(SUB, Duration::from_secs(60), |m| {
            m["data"].as_str() == Some(&base64(round))
        })
        .await;
    assert!(m["attributes"].get("schedule").is_none(), "{m}");
}

fn base64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applied_schedules_and_webhooks_survive_restart_and_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let manifest = write(dir.path(), "demo.toml", DEMO);
    let m = manifest.to_str().unwrap();

    let node = start(&data, None);
    node.ok(&["apply", "-f", m]);
    assert_served(&node, "applied").await;

    // Graceful restart, no --config: the applied state is the truth.
    node.stop(false);
    let node = start(&data, None);
    assert_served(&node, "after-restart").await;
    let plan = node.ok(&["apply", "-f", m, "--dry-run"]);
    assert!(
        plan.lines()
            .filter(|l| l.contains("schedule") || l.contains("webhook"))
            .all(|l| l.contains("unchanged")),
        "{plan}"
    );

    // kill -9, then the schedule still fires: a tick after the kill arrives.
    let killed_at = pubrun_triggers::format_time(pubrun_core::clock::SystemClock.now());
    node.stop(true);
    let node = start(&data, None);
    assert_served(&node, "after-kill").await;
    let tick = node
        .await_message(SUB, Duration::from_secs(150), |m| {
            // Ticks are whole minutes: a tick in a later minute than the
            // kill was fired by the restarted server.
            m["attributes"]["schedule"] == "every-minute"
                && m["attributes"]["scheduledTime"]
                    .as_str()
                    .is_some_and(|t| t[..16] > killed_at[..16])
        })
        .await;
    assert_eq!(tick["data"], base64("tick"));
    node.stop(false);
}

fn project_toml(project: &str, job: bool, trigger_prefix: &str) -> String {
    let mut s = format!(
        "project = \"{project}\"\n[[topic]]\nname = \"work\"\n\
         [[schedule]]\nname = \"{trigger_prefix}-nightly\"\ncron = \"0 3 * * *\"\ntopic = \"work\"\n\
         [[webhook]]\nname = \"{trigger_prefix}-hook\"\ntopic = \"work\"\n\
         [[pool]]\nname = \"{trigger_prefix}-pool\"\nprovider = \"agents\"\n"
    );
    if job {
        s.push_str(&format!(
            "[[job]]\nname = \"{project}-job\"\ntopic = \"work\"\npool = \"{trigger_prefix}-pool\"\nprocess = {{ command = \"true\" }}\n"
        ));
    }
    s
}

fn listed(node: &Serve) -> (String, String, String, String) {
    (
        node.ok(&["jobs", "list"]),
        node.ok(&["schedules", "list"]),
        node.ok(&["webhooks", "list"]),
        node.ok(&["pools", "list"]),
    )
}

fn assert_both(node: &Serve, round: &str) {
    let (jobs, schedules, hooks, pools) = listed(node);
    for (what, list, names) in [
        ("jobs", &jobs, ["alpha-job", "beta-job"]),
        ("schedules", &schedules, ["a-nightly", "b-nightly"]),
        ("webhooks", &hooks, ["a-hook", "b-hook"]),
        ("pools", &pools, ["a-pool", "b-pool"]),
    ] {
        for n in names {
            assert!(list.contains(n), "{round}: {what} lacks {n}:\n{list}");
        }
    }
}

#[test]
fn projects_own_their_resources_and_serve_config_agrees_with_apply() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let alpha = write(dir.path(), "alpha.toml", &project_toml("alpha", true, "a"));
    let beta = write(dir.path(), "beta.toml", &project_toml("beta", true, "b"));
    let (alpha, beta) = (alpha.to_str().unwrap(), beta.to_str().unwrap());

    let node = start(&data, Some(Path::new(alpha)));
    // Beta's plan deletes nothing of alpha's.
    let plan = node.ok(&["apply", "-f", beta, "--dry-run"]);
    assert!(!plan.contains("- delete"), "{plan}");
    assert!(
        !plan.contains("alpha") && !plan.contains("a-nightly") && !plan.contains("a-hook"),
        "{plan}"
    );
    node.ok(&["apply", "-f", beta]);
    assert_both(&node, "after applying beta");

    // A name another project owns is refused, and nothing changes.
    let steal = write(dir.path(), "steal.toml", &project_toml("beta", true, "a"));
    let o = node.cli(&["apply", "-f", steal.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("FAILED_PRECONDITION") && err.contains("\"alpha\""),
        "{err}"
    );
    assert_both(&node, "after the refused apply");

    // Restart with --config alpha (kill -9) and without: the same state.
    node.stop(true);
    let node = start(&data, Some(Path::new(alpha)));
    assert_both(&node, "restart with --config");
    let with_config = listed(&node);
    node.stop(false);
    let node = start(&data, None);
    assert_both(&node, "restart without --config");
    assert_eq!(listed(&node), with_config);

    // Within its project, apply still deletes what is no longer declared.
    let alpha2 = write(
        dir.path(),
        "alpha2.toml",
        &project_toml("alpha", false, "a"),
    );
    let out = node.ok(&["apply", "-f", alpha2.to_str().unwrap(), "--yes"]);
    assert!(
        out.lines()
            .any(|l| l.contains("- delete") && l.contains("alpha-job")),
        "{out}"
    );
    assert!(!out.contains("beta"), "{out}");
    let (jobs, schedules, hooks, pools) = listed(&node);
    assert!(
        !jobs.contains("alpha-job") && jobs.contains("beta-job"),
        "{jobs}"
    );
    assert!(
        pools.contains("a-pool") && pools.contains("b-pool"),
        "{pools}"
    );
    assert!(schedules.contains("a-nightly") && schedules.contains("b-nightly"));
    assert!(hooks.contains("a-hook") && hooks.contains("b-hook"));
    node.stop(false);
}
