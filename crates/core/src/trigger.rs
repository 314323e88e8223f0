//! What a schedule and a webhook declare, as plain data: the manifest
//! produces these specs and the triggers crate, which owns the cron dialect,
//! time zones and HTTP rules, validates and runs them. One type each, so a
//! manifest table and a stored definition cannot drift apart.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A tick at most this late still fires under [`MissedPolicy::Skip`] (and
/// under a `RunOnce` whose `max_age` is smaller).
pub const ON_TIME_GRACE: Duration = Duration::from_secs(60);

/// Default `max_age` of [`MissedPolicy::RunOnce`].
pub const DEFAULT_MISSED_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// What happens to ticks that passed while no scheduler was running (server
/// down, schedule just resumed…). See `pubrun_triggers::schedule`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "policy")]
pub enum MissedPolicy {
    /// Missed ticks are dropped; a tick fires only if at most
    /// [`ON_TIME_GRACE`] late.
    Skip,
    /// All missed ticks together fire once (as the latest of them), if that
    /// tick is at most `max_age` old.
    RunOnce { max_age: Duration },
}

impl Default for MissedPolicy {
    fn default() -> Self {
        MissedPolicy::RunOnce {
            max_age: DEFAULT_MISSED_MAX_AGE,
        }
    }
}

impl MissedPolicy {
    /// From the manifest keys `missed = "run_once" | "skip"` (default
    /// `run_once`) and `missed_max_age` (already read by
    /// [`MissedPolicy::parse_max_age`]; only with `run_once`).
    pub fn from_config(missed: Option<&str>, max_age: Option<Duration>) -> Result<Self> {
        match missed.unwrap_or("run_once") {
            "run_once" => Ok(MissedPolicy::RunOnce {
                max_age: max_age.unwrap_or(DEFAULT_MISSED_MAX_AGE),
            }),
            "skip" => {
                if max_age.is_some() {
                    return Err(Error::invalid(
                        "missed_max_age only applies to missed = \"run_once\"",
                    ));
                }
                Ok(MissedPolicy::Skip)
            }
            other => Err(Error::invalid(format!(
                "missed: \"{other}\" is not a policy; use \"run_once\" or \"skip\""
            ))),
        }
    }

    /// The manifest key `missed_max_age = "24h"` (humantime).
    pub fn parse_max_age(s: &str) -> Result<Duration> {
        humantime::parse_duration(s).map_err(|e| {
            Error::invalid(format!(
                "missed_max_age: \"{s}\" is not a duration like \"24h\" or \"90m\" ({e})"
            ))
        })
    }

    /// How late a tick may be and still fire.
    pub fn window(&self) -> Duration {
        match *self {
            MissedPolicy::Skip => ON_TIME_GRACE,
            MissedPolicy::RunOnce { max_age } => max_age.max(ON_TIME_GRACE),
        }
    }

    /// `"run_once"` or `"skip"`.
    pub fn name(&self) -> &'static str {
        match self {
            MissedPolicy::Skip => "skip",
            MissedPolicy::RunOnce { .. } => "run_once",
        }
    }
}

/// A declared schedule, as the manifest or the API gives it. Serialized as
/// JSON into `triggers.db` (its definition).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleSpec {
    /// `[A-Za-z0-9][A-Za-z0-9._-]*`, at most 128 characters.
    pub name: String,
    /// Five-field cron expression (see `pubrun_triggers::schedule`).
    pub cron: String,
    /// IANA time zone name; `UTC` by default.
    pub time_zone: String,
    /// Full topic name, `projects/P/topics/T`.
    pub topic: String,
    /// Published as the message data (UTF-8 text, typically JSON).
    pub data: String,
    /// Published as attributes, plus `schedule` and `scheduledTime`.
    pub attributes: BTreeMap<String, String>,
    pub missed: MissedPolicy,
    /// Declared paused. Pause/resume at run time override this until the
    /// declared value itself changes (see `pubrun_triggers::Scheduler::set_schedules`).
    pub paused: bool,
}

impl ScheduleSpec {
    /// A spec with the defaults: UTC, empty data, no attributes, `RunOnce`
    /// within 24 h, not paused.
    pub fn new(name: impl Into<String>, cron: impl Into<String>, topic: impl Into<String>) -> Self {
        ScheduleSpec {
            name: name.into(),
            cron: cron.into(),
            time_zone: "UTC".into(),
            topic: topic.into(),
            data: String::new(),
            attributes: BTreeMap::new(),
            missed: MissedPolicy::default(),
            paused: false,
        }
    }
}

/// Default body limit: 1 MiB.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 1024 * 1024;

/// A declared webhook: `POST /hooks/NAME` publishes to `topic`. Serialized
/// as JSON into `triggers.db` (its definition): it holds the names of the
/// variables with the secrets, never a secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookSpec {
    /// `[A-Za-z0-9][A-Za-z0-9._-]*`, at most 128 characters.
    pub name: String,
    /// Full topic name, `projects/P/topics/T`.
    pub topic: String,
    /// Environment variable holding the HMAC-SHA256 secret (GitHub's
    /// `X-Hub-Signature-256: sha256=HEX`).
    pub secret_env: Option<String>,
    /// Environment variable holding a bearer secret (`Authorization: Bearer …`).
    pub bearer_secret_env: Option<String>,
    /// Request headers copied into attributes (names lowercased).
    pub headers_as_attributes: Vec<String>,
    /// Copy query parameters into attributes.
    pub query_as_attributes: bool,
    /// Larger bodies get 413. Default 1 MiB, at most 10 MiB (the Pub/Sub
    /// message limit).
    pub max_body_bytes: u64,
}

impl WebhookSpec {
    pub fn new(name: impl Into<String>, topic: impl Into<String>) -> Self {
        WebhookSpec {
            name: name.into(),
            topic: topic.into(),
            secret_env: None,
            bearer_secret_env: None,
            headers_as_attributes: Vec::new(),
            query_as_attributes: false,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missed_policy_config() {
        assert_eq!(
            MissedPolicy::from_config(None, None).unwrap(),
            MissedPolicy::RunOnce {
                max_age: DEFAULT_MISSED_MAX_AGE
            }
        );
        assert_eq!(
            MissedPolicy::from_config(Some("skip"), None).unwrap(),
            MissedPolicy::Skip
        );
        let two_hours = MissedPolicy::parse_max_age("2h").unwrap();
        assert_eq!(
            MissedPolicy::from_config(Some("run_once"), Some(two_hours)).unwrap(),
            MissedPolicy::RunOnce {
                max_age: Duration::from_secs(7200)
            }
        );
        assert!(MissedPolicy::from_config(Some("all"), None)
            .unwrap_err()
            .message
            .contains("\"all\""));
        assert!(MissedPolicy::from_config(Some("skip"), Some(Duration::from_secs(3600))).is_err());
        assert!(MissedPolicy::parse_max_age("soon")
            .unwrap_err()
            .message
            .contains("soon"));
    }
}
