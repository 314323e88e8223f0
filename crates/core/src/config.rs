//! Topic and subscription configuration as the broker stores it.
//!
//! These are the durable, API-independent shapes; `api` converts the gRPC and
//! REST representations into them. New fields get `#[serde(default)]` so that
//! catalogs written by older versions still load.

use std::collections::BTreeMap;

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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubscriptionConfig {
    /// Full name, `projects/P/subscriptions/S`.
    pub name: String,
    /// Full topic name, or `_deleted-topic_` once the topic is gone.
    pub topic: String,
    #[serde(default)]
    pub labels: Labels,
    pub ack_deadline_seconds: i32,
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
        return Err(Error::invalid(format!("{} labels given; the limit is {MAX_LABELS}", labels.len())));
    }
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-' || (!c.is_ascii() && c.is_lowercase());
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
    fn labels() {
        let mut l = Labels::new();
        l.insert("env".into(), "prod-1".into());
        assert!(validate_labels(&l).is_ok());
        l.insert("Env".into(), "x".into());
        assert!(validate_labels(&l).is_err());
    }
}
