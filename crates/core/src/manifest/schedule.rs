//! `[[schedule]]` tables: cron triggers that publish to a topic.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use super::topic::Topics;
use super::{Ctx, FieldChecks, ManifestError};
use crate::trigger::{MissedPolicy, ScheduleSpec};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSchedule {
    name: Spanned<String>,
    cron: Spanned<String>,
    time_zone: Option<Spanned<String>>,
    topic: Spanned<String>,
    #[serde(default)]
    data: String,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
    missed: Option<Spanned<String>>,
    missed_max_age: Option<Spanned<String>>,
    #[serde(default)]
    paused: bool,
}

/// A `[[schedule]]` table becomes the spec the scheduler runs: checked here
/// for shape (unknown keys, declared topic, missed-tick policy) and, through
/// `checks`, cron expression and time zone; the triggers crate validates the
/// rest when applied, with messages naming the schedule.
impl RawSchedule {
    pub(super) fn decl(
        &self,
        cx: &Ctx<'_>,
        topics: &Topics<'_>,
        checks: FieldChecks,
    ) -> Result<ScheduleSpec, ManifestError> {
        let named = |e: String| format!("schedule \"{}\": {e}", self.name.get_ref());
        if let Some(check) = checks.cron {
            check(self.cron.get_ref()).map_err(|e| cx.err(self.cron.span(), named(e)))?;
        }
        if let (Some(check), Some(tz)) = (checks.time_zone, &self.time_zone) {
            check(tz.get_ref()).map_err(|e| cx.err(tz.span(), named(e)))?;
        }
        let max_age = self
            .missed_max_age
            .as_ref()
            .map(|s| {
                MissedPolicy::parse_max_age(s.get_ref())
                    .map_err(|e| cx.err(s.span(), named(e.message)))
            })
            .transpose()?;
        let missed = self.missed.as_ref();
        let missed = MissedPolicy::from_config(missed.map(|m| m.get_ref().as_str()), max_age)
            .map_err(|e| {
                let at = missed.map_or_else(|| self.name.span(), |m| m.span());
                cx.err(at, named(e.message))
            })?;
        Ok(ScheduleSpec {
            name: self.name.get_ref().clone(),
            cron: self.cron.get_ref().clone(),
            time_zone: self
                .time_zone
                .as_ref()
                .map_or_else(|| "UTC".to_string(), |t| t.get_ref().clone()),
            topic: topics.resolve(cx, &self.topic)?.to_string(),
            data: self.data.clone(),
            attributes: self.attributes.clone(),
            missed,
            paused: self.paused,
        })
    }
}

named!(RawSchedule => "schedule");
