//! Turning what the user typed (a short id or a full resource name) into
//! resource names and REST paths, and full names back into short display names.

use anyhow::{anyhow, Result};
use pubrun_core::{ProjectName, SubscriptionName, TopicName};

/// `orders` (in `project`) or `projects/P/topics/orders`.
pub fn topic(project: &str, arg: &str) -> Result<TopicName> {
    resource(
        project,
        arg,
        "topic",
        "orders",
        TopicName::parse,
        TopicName::new,
    )
}

/// `workers` (in `project`) or `projects/P/subscriptions/workers`.
pub fn subscription(project: &str, arg: &str) -> Result<SubscriptionName> {
    resource(
        project,
        arg,
        "subscription",
        "workers",
        SubscriptionName::parse,
        SubscriptionName::new,
    )
}

/// What the user typed for a `kind` (`topic`, …: its collection is `kinds`):
/// a full name is parsed as one, an id is taken in `project`.
pub fn resource<N>(
    project: &str,
    arg: &str,
    kind: &str,
    example: &str,
    parse: fn(&str) -> pubrun_core::Result<N>,
    new: fn(ProjectName, &str) -> pubrun_core::Result<N>,
) -> Result<N> {
    let parsed = if arg.starts_with("projects/") {
        parse(arg)
    } else if arg.contains('/') {
        return Err(anyhow!(
            "invalid {kind} \"{arg}\": expected a {kind} id like `{example}` or a full name projects/PROJECT/{kind}s/ID"
        ));
    } else {
        ProjectName::from_id(project).and_then(|p| new(p, arg))
    };
    parsed.map_err(|e| anyhow!("{}", e.message))
}

pub fn topic_path(t: &TopicName) -> String {
    format!(
        "/v1/projects/{}/topics/{}",
        segment(t.project().id()),
        segment(t.id())
    )
}

pub fn subscription_path(s: &SubscriptionName) -> String {
    format!(
        "/v1/projects/{}/subscriptions/{}",
        segment(s.project().id()),
        segment(s.id())
    )
}

pub fn project_path(project: &str, collection: &str) -> String {
    format!("/v1/projects/{}/{collection}", segment(project))
}

/// Percent-encodes one path segment (ids may contain `%`, `+`, `~`).
pub fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The id when `full` is `projects/<project>/<collection>/ID`, else `full` unchanged.
pub fn short<'a>(full: &'a str, project: &str, collection: &str) -> &'a str {
    full.strip_prefix("projects/")
        .and_then(|r| r.strip_prefix(project))
        .and_then(|r| r.strip_prefix('/'))
        .and_then(|r| r.strip_prefix(collection))
        .and_then(|r| r.strip_prefix('/'))
        .filter(|id| !id.is_empty() && !id.contains('/'))
        .unwrap_or(full)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_short_and_full_names() {
        assert_eq!(
            topic("demo", "orders").unwrap().to_string(),
            "projects/demo/topics/orders"
        );
        assert_eq!(
            topic("demo", "projects/p2/topics/orders")
                .unwrap()
                .to_string(),
            "projects/p2/topics/orders"
        );
        assert!(topic("demo", "projects/p2/subscriptions/orders").is_err());
        assert!(topic("demo", "a/b")
            .unwrap_err()
            .to_string()
            .contains("expected a topic id"));
        assert!(topic("demo", "9lives")
            .unwrap_err()
            .to_string()
            .contains("must start with a letter"));
        assert_eq!(
            subscription("demo", "work").unwrap().to_string(),
            "projects/demo/subscriptions/work"
        );
    }

    #[test]
    fn paths_are_encoded() {
        let t = topic("demo", "a%b+c~d").unwrap();
        assert_eq!(topic_path(&t), "/v1/projects/demo/topics/a%25b%2Bc~d");
    }

    #[test]
    fn short_names() {
        assert_eq!(short("projects/demo/topics/t1", "demo", "topics"), "t1");
        assert_eq!(
            short("projects/other/topics/t1", "demo", "topics"),
            "projects/other/topics/t1"
        );
        assert_eq!(
            short("projects/demo2/topics/t1", "demo", "topics"),
            "projects/demo2/topics/t1"
        );
        assert_eq!(
            short("_deleted-topic_", "demo", "topics"),
            "_deleted-topic_"
        );
    }
}
