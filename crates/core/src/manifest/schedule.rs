//! `[[schedule]]` tables: cron triggers that publish to a topic.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use super::topic::Topics;
use super::{Ctx, FieldChecks, ManifestError};

/// A `[[schedule]]` table: checked for shape here (unknown keys, declared
/// topic); cron expression, time zone and policy are validated by the
/// triggers crate when applied, with messages naming the schedule.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ScheduleDecl {
    pub name: String,
    pub cron: String,
    pub time_zone: String,
    /// Full topic name.
    pub topic: String,
    pub data: String,
    pub attributes: BTreeMap<String, String>,
    pub missed: Option<String>,
    pub missed_max_age: Option<String>,
    pub paused: bool,
}

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
    missed: Option<String>,
    missed_max_age: Option<String>,
    #[serde(default)]
    paused: bool,
}

impl RawSchedule {
    pub(super) fn decl(
        &self,
        cx: &Ctx<'_>,
        topics: &Topics<'_>,
        checks: FieldChecks,
    ) -> Result<ScheduleDecl, ManifestError> {
        let named = |e: String| format!("schedule \"{}\": {e}", self.name.get_ref());
        if let Some(check) = checks.cron {
            check(self.cron.get_ref()).map_err(|e| cx.err(self.cron.span(), named(e)))?;
        }
        if let (Some(check), Some(tz)) = (checks.time_zone, &self.time_zone) {
            check(tz.get_ref()).map_err(|e| cx.err(tz.span(), named(e)))?;
        }
        Ok(ScheduleDecl {
            name: self.name.get_ref().clone(),
            cron: self.cron.get_ref().clone(),
            time_zone: self
                .time_zone
                .as_ref()
                .map_or_else(|| "UTC".to_string(), |t| t.get_ref().clone()),
            topic: topics.resolve(cx, &self.topic)?.to_string(),
            data: self.data.clone(),
            attributes: self.attributes.clone(),
            missed: self.missed.clone(),
            missed_max_age: self.missed_max_age.clone(),
            paused: self.paused,
        })
    }
}

named!(RawSchedule => "schedule");
