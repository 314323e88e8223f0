//! `apply`: a manifest against the real broker and dispatcher.

mod common;

use common::*;
use pubrun_core::manifest::Manifest;
use pubrun_core::run::RunStatus;
use pubrun_core::{Code, TopicName};
use pubrun_jobs::apply::{apply, parse_manifest, Action, Change};

/// The first version of the manifest the apply tests change step by step.
const V1: &str = include_str!("manifests/apply_v1.toml");

fn change(kind: &'static str, name: &str, action: Action) -> Change {
    Change {
        kind,
        name: name.to_string(),
        action,
    }
}

fn sorted(mut v: Vec<Change>) -> Vec<Change> {
    v.sort_by(|a, b| (a.kind, &a.name).cmp(&(b.kind, &b.name)));
    v
}

fn assert_unchanged(changes: &[Change]) {
    assert!(
        changes.iter().all(|c| c.action == Action::Unchanged),
        "{changes:?}"
    );
}

impl Env {
    /// Applies `m` (only plans it when `dry_run`); panics when refused.
    async fn apply(&self, m: &Manifest, dry_run: bool) -> Vec<Change> {
        apply(&self.broker, &self.dispatcher, m, dry_run)
            .await
            .unwrap()
    }

    /// Whether the project's topic `id` exists: `Err(code)` when not.
    fn topic_state(&self, id: &str) -> Result<(), Code> {
        self.broker
            .get_topic(&TopicName::parse(&topic_name(id)).unwrap())
            .map(|_| ())
            .map_err(|e| e.code)
    }
}

/// Publishes `order` to `orders`: the job's `n`th run (one-based) succeeds
/// and logs `expect`.
async fn ships(env: &Env, n: usize, order: &str, expect: &str) {
    env.publish("orders", &[("order", order)], "").await;
    let run = env.wait_runs("ship", n).await.remove(n - 1);
    assert_eq!(env.wait_end(run.id).await.status, RunStatus::Succeeded);
    let log = env.log(run.id);
    assert!(log.contains(expect), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_creates_then_changes_nothing_then_updates_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let env = env_in(dir.path(), 4).await;
    let v1 = parse_manifest("v1.toml", V1).unwrap();

    // Dry run of the first apply: the plan, and nothing done.
    let plan = env.apply(&v1, true).await;
    assert!(plan.iter().all(|c| c.action == Action::Create), "{plan:?}");
    assert_eq!(plan.len(), 4, "{plan:?}");
    assert_eq!(env.topic_state("orders"), Err(Code::NotFound));
    assert!(env.dispatcher.jobs().is_empty());

    let changes = env.apply(&v1, false).await;
    assert_eq!(
        sorted(changes),
        sorted(vec![
            change("topic", &topic_name("orders"), Action::Create),
            change("topic", &topic_name("audit"), Action::Create),
            change(
                "subscription",
                "projects/p/subscriptions/audit-watch",
                Action::Create
            ),
            change("job", "ship", Action::Create),
        ])
    );
    assert_eq!(env.topic_state("audit"), Ok(()));
    assert_eq!(
        env.broker.get_subscription(&job_sub("ship")).unwrap().topic,
        topic_name("orders")
    );
    assert_eq!(env.dispatcher.jobs().len(), 1);

    // The job works.
    ships(&env, 1, "A1", "shipping v1 A1").await;

    // Same manifest again: nothing to do.
    let again = env.apply(&v1, false).await;
    assert_unchanged(&again);
    assert_eq!(again.len(), 4);

    // v2: the job changes, the audit topic and its subscription are removed.
    let v2_text = V1
        .replace("shipping v1", "shipping v2")
        .replace("[[topic]]\nname = \"audit\"\n", "")
        .replace(
            "[[subscription]]\nname = \"audit-watch\"\ntopic = \"audit\"\n",
            "",
        );
    let v2 = parse_manifest("v2.toml", &v2_text).unwrap();

    // Dry run: the plan, and nothing changes.
    let plan = env.apply(&v2, true).await;
    let want = sorted(vec![
        change("topic", &topic_name("orders"), Action::Unchanged),
        change("topic", &topic_name("audit"), Action::Delete),
        change(
            "subscription",
            "projects/p/subscriptions/audit-watch",
            Action::Delete,
        ),
        change("job", "ship", Action::Update),
    ]);
    assert_eq!(sorted(plan), want);
    assert_eq!(env.topic_state("audit"), Ok(()));
    assert_eq!(env.dispatcher.job("ship").unwrap(), v1.jobs[0]);

    let changes = env.apply(&v2, false).await;
    assert_eq!(sorted(changes), want);
    assert_eq!(env.topic_state("audit"), Err(Code::NotFound));
    assert_eq!(
        env.broker
            .get_subscription(
                &pubrun_core::SubscriptionName::parse("projects/p/subscriptions/audit-watch")
                    .unwrap()
            )
            .unwrap_err()
            .code,
        Code::NotFound
    );
    assert_eq!(env.dispatcher.job("ship").unwrap(), v2.jobs[0]);

    // The updated job takes new messages with its new command.
    ships(&env, 2, "B2", "shipping v2 B2").await;

    let again = env.apply(&v2, false).await;
    assert_unchanged(&again);

    // Removing the job from the manifest deletes it and its subscription.
    let v3 = parse_manifest("v3.toml", "project = \"p\"\n[[topic]]\nname = \"orders\"\n").unwrap();
    let changes = env.apply(&v3, false).await;
    assert!(
        changes.contains(&change("job", "ship", Action::Delete)),
        "{changes:?}"
    );
    assert!(env.dispatcher.jobs().is_empty());
    assert_eq!(
        env.broker
            .get_subscription(&job_sub("ship"))
            .unwrap_err()
            .code,
        Code::NotFound
    );
}

#[test]
fn reapplying_after_a_restart_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let v1 = parse_manifest("v1.toml", V1).unwrap();
    let rt = runtime();
    rt.block_on(async {
        let env = env_in(dir.path(), 4).await;
        env.apply(&v1, false).await;
    });
    rt.shutdown_timeout(std::time::Duration::from_secs(10));
    let rt = runtime();
    rt.block_on(async {
        let env = env_in(dir.path(), 4).await;
        // Job specs come back from the run store (a JSON round trip).
        assert_eq!(env.dispatcher.jobs(), v1.jobs);
        let again = env.apply(&v1, false).await;
        assert_unchanged(&again);
        // The recovered job still takes messages.
        env.publish("orders", &[("order", "C3")], "").await;
        assert_eq!(env.first_run_end("ship").await.status, RunStatus::Succeeded);
    });
}

#[test]
fn bad_manifests_are_invalid_argument_with_position() {
    let e = parse_manifest("bad.toml", "project = \"p\"\n[[job]]\nname = \"x1x\"\ntopic = \"nope\"\nprocess = { command = \"true\" }\n")
        .unwrap_err();
    assert_eq!(e.code, Code::InvalidArgument);
    assert!(e.message.starts_with("bad.toml:4:"), "{}", e.message);
}

fn project_manifest(project: &str, jobs: &[&str]) -> pubrun_core::manifest::Manifest {
    let mut src = format!("project = \"{project}\"\n[[topic]]\nname = \"orders\"\n");
    for j in jobs {
        src.push_str(&format!(
            "[[job]]\nname = \"{j}\"\ntopic = \"orders\"\nprocess = {{ command = \"echo\", args = [\"{j}\"] }}\n"
        ));
    }
    parse_manifest(&format!("{project}.toml"), &src).unwrap()
}

fn job_names(env: &Env) -> Vec<String> {
    env.dispatcher.jobs().into_iter().map(|j| j.name).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_owns_only_its_projects_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let env = env_in(dir.path(), 4).await;
    let alpha = project_manifest("alpha", &["alpha-ship"]);
    let beta = project_manifest("beta", &["beta-ship"]);
    env.apply(&alpha, false).await;

    // Beta's plan touches nothing of alpha's.
    let plan = env.apply(&beta, true).await;
    assert!(
        plan.iter()
            .all(|c| c.action == Action::Create && c.name.contains("beta")),
        "{plan:?}"
    );
    env.apply(&beta, false).await;
    assert_eq!(job_names(&env), ["alpha-ship", "beta-ship"]);

    // Alpha's job still runs.
    let topic = TopicName::parse("projects/alpha/topics/orders").unwrap();
    env.broker
        .publish(
            &topic,
            vec![pubrun_core::OutgoingMessage {
                data: b"go".to_vec().into(),
                attributes: Default::default(),
                ordering_key: String::new(),
            }],
        )
        .await
        .unwrap();
    assert_eq!(
        env.first_run_end("alpha-ship").await.status,
        RunStatus::Succeeded
    );

    // Job names are server-wide: beta cannot take alpha's, and nothing changes.
    let steal = project_manifest("beta", &["beta-ship", "alpha-ship"]);
    for dry_run in [true, false] {
        let e = apply(&env.broker, &env.dispatcher, &steal, dry_run)
            .await
            .unwrap_err();
        assert_eq!(e.code, Code::FailedPrecondition, "{}", e.message);
        assert!(e.message.contains("\"alpha\""), "{}", e.message);
    }
    assert_eq!(job_names(&env), ["alpha-ship", "beta-ship"]);
    assert_eq!(
        env.dispatcher.job("alpha-ship").unwrap().topic,
        "projects/alpha/topics/orders"
    );

    // Within its project the planner still deletes what is no longer declared.
    let alpha_without = project_manifest("alpha", &[]);
    let changes = env.apply(&alpha_without, false).await;
    assert!(
        changes.contains(&change("job", "alpha-ship", Action::Delete)),
        "{changes:?}"
    );
    assert!(
        !changes.iter().any(|c| c.name.contains("beta")),
        "{changes:?}"
    );
    assert_eq!(job_names(&env), ["beta-ship"]);
    let again = env.apply(&beta, false).await;
    assert_unchanged(&again);
}
