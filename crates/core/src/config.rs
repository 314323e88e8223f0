//! Topic and subscription configuration as the broker stores it.
//!
//! These are the durable, API-independent shapes; `api` converts the gRPC and
//! REST representations into them. New fields get `#[serde(default)]` so that
//! catalogs written by older versions still load.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::limits::*;

pub type Labels = BTreeMap<String, String>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopicConfig {
    /// Full name, `projects/P/topics/T`.
    pub name: String,
    #[serde(default)]
    pub labels: Labels,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SubscriptionConfig {
    /// Full name, `projects/P/subscriptions/S`.
    pub name: String,
    /// Full topic name, or `_deleted-topic_` once the topic is gone.
    pub topic: String,
    #[serde(default)]
    pub labels: Labels,
    pub ack_deadline_seconds: i32,
    /// Backoff between redeliveries after a nack or an expired lease. `None`:
    /// redeliver immediately (Google's "immediate redelivery").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_policy: Option<RetryPolicy>,
    /// Where messages go after too many delivery attempts. `None`: they are
    /// redelivered until acked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_policy: Option<DeadLetterPolicy>,
    /// Messages with the same non-empty ordering key are delivered in publish
    /// order. Fixed at creation, as in Google Pub/Sub.
    #[serde(default, skip_serializing_if = "is_false")]
    pub enable_message_ordering: bool,
    /// Pub/Sub filter on attributes ([`crate::filter`]); empty = every message.
    /// Fixed at creation, as in Google Pub/Sub.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub filter: String,
    /// Acks and modacks of expired or superseded ack ids fail instead of being
    /// ignored, and successful ones are confirmed.
    #[serde(default, skip_serializing_if = "is_false")]
    pub enable_exactly_once_delivery: bool,
    /// Push delivery to an HTTP endpoint; `None` is a pull subscription.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_config: Option<PushConfig>,
    /// How long a message stays in the backlog after it was published (and,
    /// with `retain_acked_messages`, after it was acked). `None`: Google's
    /// default of 7 days.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_retention_duration: Option<Duration>,
    /// Keep acked messages for `message_retention_duration` so that a Seek
    /// to an earlier time can deliver them again.
    #[serde(default, skip_serializing_if = "is_false")]
    pub retain_acked_messages: bool,
}

impl SubscriptionConfig {
    /// The backlog retention in effect (the default when unset).
    pub fn retention(&self) -> Duration {
        self.message_retention_duration
            .unwrap_or(DEFAULT_SUBSCRIPTION_RETENTION)
    }
}

/// Google's bounds for `message_retention_duration`.
pub const MIN_RETENTION: Duration = Duration::from_secs(10 * 60);
pub const DEFAULT_SUBSCRIPTION_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
pub const MAX_SUBSCRIPTION_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
pub const MAX_TOPIC_RETENTION: Duration = Duration::from_secs(31 * 24 * 3600);

/// Checks a `message_retention_duration` against 10 minutes..=`max`.
pub fn check_retention(field: &str, d: Duration, max: Duration) -> Result<Duration> {
    if d < MIN_RETENTION || d > max {
        return Err(Error::invalid(format!(
            "{field} is {}; it must be between {}s (10 minutes) and {}s ({} days)",
            fmt_secs(d),
            MIN_RETENTION.as_secs(),
            max.as_secs(),
            max.as_secs() / 86400
        )));
    }
    Ok(d)
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Where and how a push subscription delivers, as Google's `PushConfig`
/// without authentication (`oidc_token` is refused by the API layer).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushConfig {
    /// `http://` URL the messages are POSTed to.
    pub push_endpoint: String,
    /// Only `x-goog-version` (`v1` or `v1beta2`, the same envelope).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
    /// `Some`: payload unwrapping — the body is the raw message data; with
    /// `write_metadata` the metadata and attributes go into headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_wrapper: Option<NoWrapper>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoWrapper {
    #[serde(default)]
    pub write_metadata: bool,
}

impl PushConfig {
    /// Checks a push config as given by a client. An empty endpoint means
    /// pull delivery (`None`), which is how clients switch back to pull.
    pub fn check(self) -> Result<Option<PushConfig>> {
        if self.push_endpoint.is_empty() {
            if !self.attributes.is_empty() || self.no_wrapper.is_some() {
                return Err(Error::invalid(
                    "push_config.push_endpoint must be set when other push_config fields are",
                ));
            }
            return Ok(None);
        }
        let ep = &self.push_endpoint;
        let rest = ep
            .strip_prefix("https://")
            .or_else(|| ep.strip_prefix("http://"))
            .ok_or_else(|| {
                Error::invalid(format!(
                    "push_config.push_endpoint {ep:?} must be an absolute https:// or http:// URL"
                ))
            })?;
        let host = rest.split(['/', '?', '#']).next().unwrap_or("");
        if host.is_empty() || ep.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(Error::invalid(format!(
                "push_config.push_endpoint {ep:?} must be an absolute https:// or http:// URL with a host"
            )));
        }
        for (k, v) in &self.attributes {
            match (k.as_str(), v.as_str()) {
                ("x-goog-version", "v1" | "v1beta2") => {}
                ("x-goog-version", other) => {
                    return Err(Error::invalid(format!(
                        "push_config.attributes[\"x-goog-version\"] is {other:?}; supported: v1, v1beta2 (the v1beta1 format is not)"
                    )))
                }
                (other, _) => {
                    return Err(Error::invalid(format!(
                        "push_config.attributes: unknown attribute {other:?}; the only supported one is x-goog-version"
                    )))
                }
            }
        }
        Ok(Some(self))
    }
}

/// Google's defaults and bounds for [`RetryPolicy`].
pub const DEFAULT_MINIMUM_BACKOFF: Duration = Duration::from_secs(10);
pub const DEFAULT_MAXIMUM_BACKOFF: Duration = Duration::from_secs(600);
pub const MAX_BACKOFF: Duration = Duration::from_secs(600);

/// Exponential redelivery backoff, as Google's `RetryPolicy`: after the n-th
/// failed delivery of a message (nack or expired ack deadline) it is
/// redelivered no sooner than `minimum_backoff * 2^(n-1)`, capped at
/// `maximum_backoff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    pub minimum_backoff: Duration,
    pub maximum_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            minimum_backoff: DEFAULT_MINIMUM_BACKOFF,
            maximum_backoff: DEFAULT_MAXIMUM_BACKOFF,
        }
    }
}

impl RetryPolicy {
    /// Applies Google's defaults (10 s, 600 s) to unset values and checks the
    /// bounds: each 0..=600 s, and minimum <= maximum.
    pub fn new(
        minimum_backoff: Option<Duration>,
        maximum_backoff: Option<Duration>,
    ) -> Result<Self> {
        let min = minimum_backoff.unwrap_or(DEFAULT_MINIMUM_BACKOFF);
        let max = maximum_backoff.unwrap_or(DEFAULT_MAXIMUM_BACKOFF);
        for (field, d) in [("minimum_backoff", min), ("maximum_backoff", max)] {
            if d > MAX_BACKOFF {
                return Err(Error::invalid(format!(
                    "retry_policy.{field} is {}; it must be between 0 and 600 seconds",
                    fmt_secs(d)
                )));
            }
        }
        if min > max {
            return Err(Error::invalid(format!(
                "retry_policy.minimum_backoff ({}) must not be greater than retry_policy.maximum_backoff ({})",
                fmt_secs(min),
                fmt_secs(max)
            )));
        }
        Ok(RetryPolicy {
            minimum_backoff: min,
            maximum_backoff: max,
        })
    }

    /// Delay before redelivering a message whose `failures`-th delivery
    /// failed (1 = the first delivery was nacked or expired).
    pub fn backoff(&self, failures: u32) -> Duration {
        let shift = failures.saturating_sub(1).min(32);
        let d = self
            .minimum_backoff
            .checked_mul(1u32 << shift.min(31))
            .unwrap_or(self.maximum_backoff);
        d.min(self.maximum_backoff)
    }
}

fn fmt_secs(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}s", d.as_secs_f64())
    }
}

/// Google's bounds for `max_delivery_attempts`, and the value 0 stands for.
pub const MIN_DELIVERY_ATTEMPTS: i32 = 5;
pub const MAX_DELIVERY_ATTEMPTS: i32 = 100;
pub const DEFAULT_DELIVERY_ATTEMPTS: i32 = 5;

/// Forwarding of undeliverable messages, as Google's `DeadLetterPolicy`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterPolicy {
    /// Full topic name, `projects/P/topics/T`.
    pub dead_letter_topic: String,
    /// 5..=100.
    pub max_delivery_attempts: i32,
}

impl DeadLetterPolicy {
    /// Returns `None` for an empty topic (no policy; how clients clear it),
    /// applies the default of 5 attempts for 0 and checks 5..=100. The topic
    /// name's form is checked by the caller, which also knows whether it exists.
    pub fn new(dead_letter_topic: &str, max_delivery_attempts: i32) -> Result<Option<Self>> {
        if dead_letter_topic.is_empty() {
            if max_delivery_attempts != 0 {
                return Err(Error::invalid(
                    "dead_letter_policy.dead_letter_topic must be set when max_delivery_attempts is",
                ));
            }
            return Ok(None);
        }
        let attempts = match max_delivery_attempts {
            0 => DEFAULT_DELIVERY_ATTEMPTS,
            MIN_DELIVERY_ATTEMPTS..=MAX_DELIVERY_ATTEMPTS => max_delivery_attempts,
            n => {
                return Err(Error::invalid(format!(
                    "dead_letter_policy.max_delivery_attempts is {n}; it must be between {MIN_DELIVERY_ATTEMPTS} and {MAX_DELIVERY_ATTEMPTS}"
                )))
            }
        };
        Ok(Some(DeadLetterPolicy {
            dead_letter_topic: dead_letter_topic.to_string(),
            max_delivery_attempts: attempts,
        }))
    }
}

/// Applies the default and checks the range of `ack_deadline_seconds`.
pub fn normalize_ack_deadline(secs: i32) -> Result<i32> {
    match secs {
        0 => Ok(DEFAULT_ACK_DEADLINE_SECS),
        MIN_ACK_DEADLINE_SECS..=MAX_ACK_DEADLINE_SECS => Ok(secs),
        _ => Err(Error::invalid(format!(
            "ack_deadline_seconds is {secs}; it must be between {MIN_ACK_DEADLINE_SECS} and {MAX_ACK_DEADLINE_SECS}"
        ))),
    }
}

/// Checks labels as Google documents them for Pub/Sub resources.
pub fn validate_labels(labels: &Labels) -> Result<()> {
    if labels.len() > MAX_LABELS {
        return Err(Error::invalid(format!(
            "{} labels given; the limit is {MAX_LABELS}",
            labels.len()
        )));
    }
    let ok_char = |c: char| {
        c.is_ascii_lowercase()
            || c.is_ascii_digit()
            || c == '_'
            || c == '-'
            || (!c.is_ascii() && c.is_lowercase())
    };
    for (k, v) in labels {
        let starts_lower = k.chars().next().is_some_and(|c| c.is_lowercase());
        if k.is_empty() || k.chars().count() > 63 || !starts_lower || !k.chars().all(ok_char) {
            return Err(Error::invalid(format!(
                "invalid label key \"{k}\": 1 to 63 characters, starting with a lowercase letter, of lowercase letters, digits, '_' and '-'"
            )));
        }
        if v.chars().count() > 63 || !v.chars().all(ok_char) {
            return Err(Error::invalid(format!(
                "invalid value for label \"{k}\": up to 63 lowercase letters, digits, '_' and '-'"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_deadline_range() {
        assert_eq!(normalize_ack_deadline(0).unwrap(), 10);
        assert_eq!(normalize_ack_deadline(600).unwrap(), 600);
        assert!(normalize_ack_deadline(9).is_err());
        assert!(normalize_ack_deadline(601).is_err());
    }

    #[test]
    fn retry_policy_defaults_bounds_and_backoff() {
        let p = RetryPolicy::new(None, None).unwrap();
        assert_eq!(p, RetryPolicy::default());
        assert_eq!(
            (p.minimum_backoff, p.maximum_backoff),
            (Duration::from_secs(10), Duration::from_secs(600))
        );
        let s = Duration::from_secs;
        let p = RetryPolicy::new(Some(s(1)), Some(s(5))).unwrap();
        let got: Vec<u64> = (1..=5).map(|n| p.backoff(n).as_secs()).collect();
        assert_eq!(got, [1, 2, 4, 5, 5]);
        assert_eq!(p.backoff(0), s(1));
        assert_eq!(p.backoff(u32::MAX), s(5));
        assert_eq!(
            RetryPolicy::new(Some(s(0)), Some(s(0))).unwrap().backoff(7),
            s(0)
        );
        assert!(RetryPolicy::new(Some(s(601)), None)
            .unwrap_err()
            .message
            .contains("minimum_backoff"));
        assert!(RetryPolicy::new(None, Some(s(601)))
            .unwrap_err()
            .message
            .contains("maximum_backoff"));
        assert!(RetryPolicy::new(Some(s(20)), Some(s(10)))
            .unwrap_err()
            .message
            .contains("greater"));
        // Only the minimum given: the maximum is Google's default.
        assert_eq!(
            RetryPolicy::new(Some(s(30)), None).unwrap().maximum_backoff,
            s(600)
        );
    }

    #[test]
    fn dead_letter_policy_bounds() {
        assert_eq!(DeadLetterPolicy::new("", 0).unwrap(), None);
        assert!(DeadLetterPolicy::new("", 7).is_err());
        assert_eq!(
            DeadLetterPolicy::new("projects/p/topics/d", 0)
                .unwrap()
                .unwrap()
                .max_delivery_attempts,
            5
        );
        assert_eq!(
            DeadLetterPolicy::new("projects/p/topics/d", 100)
                .unwrap()
                .unwrap()
                .max_delivery_attempts,
            100
        );
        for bad in [4, 101, -1] {
            assert!(DeadLetterPolicy::new("projects/p/topics/d", bad)
                .unwrap_err()
                .message
                .contains("between 5 and 100"));
        }
    }

    #[test]
    fn old_catalog_entries_load_and_plain_configs_serialize_as_before() {
        let old = r#"{"name":"projects/p/subscriptions/s","topic":"projects/p/topics/t","labels":{},"ack_deadline_seconds":10}"#;
        let c: SubscriptionConfig = serde_json::from_str(old).unwrap();
        assert_eq!(
            (
                c.retry_policy,
                c.dead_letter_policy.clone(),
                c.filter.as_str()
            ),
            (None, None, "")
        );
        assert!(!c.enable_message_ordering && !c.enable_exactly_once_delivery);
        assert_eq!(serde_json::to_string(&c).unwrap(), old);
        let full = SubscriptionConfig {
            retry_policy: Some(RetryPolicy::default()),
            dead_letter_policy: DeadLetterPolicy::new("projects/p/topics/d", 0).unwrap(),
            enable_message_ordering: true,
            filter: "attributes:k".into(),
            enable_exactly_once_delivery: true,
            ..c
        };
        let back: SubscriptionConfig =
            serde_json::from_str(&serde_json::to_string(&full).unwrap()).unwrap();
        assert_eq!(back, full);
    }

    #[test]
    fn labels() {
        let mut l = Labels::new();
        l.insert("env".into(), "prod-1".into());
        assert!(validate_labels(&l).is_ok());
        l.insert("Env".into(), "x".into());
        assert!(validate_labels(&l).is_err());
    }
}
