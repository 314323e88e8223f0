//! Cron schedules, without I/O: the spec, its validation, [`next_fire`] and
//! [`due`]. Every function takes the time it needs as an argument.
//!
//! # Cron syntax
//!
//! Five fields, `MINUTE HOUR DAY-OF-MONTH MONTH DAY-OF-WEEK`, POSIX/Vixie
//! semantics (when both day fields are restricted, a day matches if *either*
//! does), with lists `1,15`, ranges `1-5`, steps `*/15` and `10-50/20`,
//! names `JAN`…`DEC` and `SUN`…`SAT` (0 and 7 are Sunday), the extensions
//! `L` (last day / last weekday `5L`), `W` (nearest weekday) and `#`
//! (`1#2` = second Monday), and the nicknames `@yearly`, `@monthly`,
//! `@weekly`, `@daily`, `@hourly`. Seconds and years are not accepted:
//! schedules have minute resolution. Parsing and matching are done by the
//! `croner` crate.
//!
//! # Time zones and daylight saving time
//!
//! The expression is matched against the wall clock of `time_zone` (an IANA
//! name such as `Europe/Berlin`; default `UTC`). Where the wall clock jumps,
//! the rules are Vixie cron's (as the Open Cron Pattern Specification writes
//! them down), split by the kind of expression:
//!
//! - a **fixed-time** expression has one fixed value in each of minute and
//!   hour (`30 2 * * *`); every other expression (`*`, steps, lists or
//!   ranges in minute or hour, e.g. `*/15 * * * *`, `0 * * * *`) is an
//!   **interval** expression.
//! - **Skipped hour** (spring forward; Europe/Berlin 2026-03-29, 02:00 CET
//!   becomes 03:00 CEST): a fixed-time expression whose time does not exist
//!   that day fires once, at the first instant after the gap (`30 2 * * *`
//!   fires at 03:00 CEST = 01:00 UTC), so a daily job still runs that day.
//!   Interval expressions simply have no ticks inside the gap
//!   (`*/30 * * * *` goes 01:30 CET → 03:00 CEST).
//! - **Repeated hour** (fall back; Europe/Berlin 2026-10-25, 03:00 CEST
//!   becomes 02:00 CET, so 02:00–02:59 happens twice): a fixed-time
//!   expression fires once, at the first occurrence (`30 2 * * *` fires at
//!   02:30 CEST = 00:30 UTC, not again at 02:30 CET). Interval expressions
//!   fire in both passes, so `*/30 * * * *` keeps firing every 30 real
//!   minutes (00:00, 00:30, 01:00, 01:30 UTC are all 02:xx local).
//!
//! # Missed ticks
//!
//! [`due`] answers "what should fire now, given the last tick already
//! settled". It returns **at most one** tick — the latest tick at or before
//! `now` that is newer than `last_fired` and not older than the policy's
//! window ([`MissedPolicy::window`]):
//!
//! - [`MissedPolicy::RunOnce`] (default, `max_age` 24 h): after downtime the
//!   schedule fires **once** for all the ticks it missed, stamped with the
//!   latest missed tick as `scheduledTime`, provided that tick is at most
//!   `max_age` old; older ticks are dropped.
//! - [`MissedPolicy::Skip`]: missed ticks never fire; only a tick at most
//!   [`ON_TIME_GRACE`] (60 s) late fires (the grace absorbs a slow loop or a
//!   restart in the very minute of a tick).
//!
//! A schedule that has never run starts at the moment it is created: ticks
//! before that never fire.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, TimeDelta, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds, Year};
use pubrun_core::{Error, OutgoingMessage, Result, TopicName};
use serde::Serialize;

pub use pubrun_core::trigger::{MissedPolicy, ScheduleSpec, DEFAULT_MISSED_MAX_AGE, ON_TIME_GRACE};

use crate::Validate;

/// Attribute names a schedule sets itself; a spec may not use them.
pub const ATTR_SCHEDULE: &str = "schedule";
pub const ATTR_SCHEDULED_TIME: &str = "scheduledTime";
/// Set to `"true"` on messages published by run-now.
pub const ATTR_RUN_NOW: &str = "runNow";

impl Validate for ScheduleSpec {
    type Valid = Schedule;

    /// Checks every field and compiles the expression. Errors name the
    /// schedule and the field.
    fn validate(&self) -> Result<Schedule> {
        let ctx =
            |e: Error| Error::new(e.code, format!("schedule \"{}\": {}", self.name, e.message));
        validate_trigger_name("schedule", &self.name)?;
        let cron = CronExpr::parse(&self.cron).map_err(ctx)?;
        let tz = parse_time_zone(&self.time_zone).map_err(ctx)?;
        let topic = TopicName::parse(&self.topic)
            .map_err(|e| ctx(Error::invalid(format!("topic: {}", e.message))))?;
        for reserved in [ATTR_SCHEDULE, ATTR_SCHEDULED_TIME, ATTR_RUN_NOW] {
            if self.attributes.contains_key(reserved) {
                return Err(ctx(Error::invalid(format!(
                    "attributes: \"{reserved}\" is set by the scheduler itself; choose another name"
                ))));
            }
        }
        if let MissedPolicy::RunOnce { max_age } = self.missed {
            if max_age.is_zero() {
                return Err(ctx(Error::invalid("missed_max_age must be greater than 0")));
            }
        }
        // The message must be publishable (attribute limits, size…).
        let schedule = Schedule {
            spec: self.clone(),
            cron,
            tz,
            topic,
        };
        schedule
            .message(DateTime::<Utc>::UNIX_EPOCH, false)
            .validate()
            .map_err(|e| ctx(Error::invalid(e.message)))?;
        Ok(schedule)
    }
}

/// Names of schedules and webhooks: they appear in URL paths.
pub(crate) fn validate_trigger_name(kind: &str, name: &str) -> Result<()> {
    let ok_start = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if name.is_empty() || name.len() > 128 || !ok_start || !ok_chars {
        return Err(Error::invalid(format!(
            "invalid {kind} name \"{name}\": use 1 to 128 letters, digits, '-', '_' or '.', starting with a letter or digit"
        )));
    }
    Ok(())
}

/// A parsed cron expression.
#[derive(Clone)]
pub struct CronExpr {
    source: String,
    cron: croner::Cron,
}

impl fmt::Debug for CronExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CronExpr({:?})", self.source)
    }
}

impl fmt::Display for CronExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

const FIELDS: [(&str, &str); 5] = [
    ("minute", "0-59"),
    ("hour", "0-23"),
    ("day-of-month", "1-31, L or W"),
    ("month", "1-12 or JAN-DEC"),
    (
        "day-of-week",
        "0-7 or SUN-SAT, 0 and 7 being Sunday, L or #",
    ),
];

const CRON_HELP: &str = "expected 5 fields \"MINUTE HOUR DAY-OF-MONTH MONTH DAY-OF-WEEK\" (e.g. \"0 3 * * *\" = 03:00 every day) or @hourly/@daily/@weekly/@monthly/@yearly";

impl CronExpr {
    /// Parses a five-field expression; the error says what is wrong and what
    /// is expected.
    pub fn parse(source: &str) -> Result<Self> {
        let trimmed = source.trim();
        let bad = |why: String| {
            Error::invalid(format!(
                "invalid cron expression \"{source}\": {why}; {CRON_HELP}"
            ))
        };
        if trimmed.is_empty() {
            return Err(bad("it is empty".into()));
        }
        if trimmed.starts_with('@') {
            let ok = [
                "@yearly",
                "@annually",
                "@monthly",
                "@weekly",
                "@daily",
                "@midnight",
                "@hourly",
            ];
            if !ok.contains(&trimmed.to_ascii_lowercase().as_str()) {
                return Err(bad(format!("unknown nickname {trimmed}")));
            }
        } else {
            let n = trimmed.split_whitespace().count();
            if n != 5 {
                return Err(bad(format!(
                    "it has {n} field{}{}",
                    if n == 1 { "" } else { "s" },
                    if n == 6 || n == 7 {
                        " (seconds and years are not supported)"
                    } else {
                        ""
                    }
                )));
            }
        }
        let parser = CronParser::builder()
            .seconds(Seconds::Disallowed)
            .year(Year::Disallowed)
            .build();
        let cron = parser.parse(trimmed).map_err(|e| {
            // Name the field at fault: parse each one alone.
            let fields: Vec<&str> = trimmed.split_whitespace().collect();
            if !trimmed.starts_with('@') && fields.len() == 5 {
                for (i, (field, range)) in FIELDS.iter().enumerate() {
                    let mut probe = ["*"; 5];
                    probe[i] = fields[i];
                    if let Err(fe) = parser.parse(&probe.join(" ")) {
                        return Error::invalid(format!(
                            "invalid cron expression \"{source}\": {field} field \"{}\": {} ({field} takes {range})",
                            fields[i],
                            describe_cron_error(&fe)
                        ));
                    }
                }
            }
            bad(describe_cron_error(&e))
        })?;
        let expr = CronExpr {
            source: trimmed.to_string(),
            cron,
        };
        // Reject expressions that can never match (e.g. "0 0 30 2 *").
        let probe = DateTime::<Utc>::from_timestamp(946_684_800, 0).expect("2000-01-01"); // 2000-01-01
        if next_fire(&expr, Tz::UTC, probe).is_none() {
            return Err(Error::invalid(format!(
                "invalid cron expression \"{source}\": it never matches a real date (like February 30)"
            )));
        }
        Ok(expr)
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// True for one fixed minute and hour (`30 2 * * *`): fires once in a
    /// repeated hour and right after a skipped one. See the module docs.
    pub fn is_fixed_time(&self) -> bool {
        matches!(self.cron.determine_job_type(), croner::JobType::FixedTime)
    }
}

fn describe_cron_error(e: &croner::errors::CronError) -> String {
    use croner::errors::CronError as E;
    match e {
        E::EmptyPattern => "it is empty".into(),
        E::IllegalCharacters(m) | E::InvalidPattern(m) | E::ComponentError(m) => {
            let m = m
                .trim_end_matches('.')
                .replace("CronPattern contains", "contains");
            let mut c = m.chars();
            c.next()
                .map(|f| f.to_lowercase().chain(c).collect())
                .unwrap_or_default()
        }
        other => other.to_string().trim_end_matches('.').to_string(),
    }
}

/// The manifest checks this crate owns: cron dialect and time zone names.
pub fn manifest_checks() -> pubrun_core::manifest::FieldChecks {
    pubrun_core::manifest::FieldChecks {
        cron: Some(|s| CronExpr::parse(s).map(drop).map_err(|e| e.message)),
        time_zone: Some(|s| parse_time_zone(s).map(drop).map_err(|e| e.message)),
    }
}

/// Parses an IANA time zone name (`Europe/Berlin`, `America/New_York`,
/// `UTC`); an unknown name is an error that names it.
pub fn parse_time_zone(name: &str) -> Result<Tz> {
    Tz::from_str(name.trim()).map_err(|_| {
        Error::invalid(format!(
            "unknown time zone \"{name}\": use an IANA time zone name such as \"Europe/Berlin\", \"America/New_York\" or \"UTC\""
        ))
    })
}

/// The first tick strictly after `after`, as a UTC instant, with the DST
/// rules of the module docs. `None` if there is none before the year 5000.
pub fn next_fire(cron: &CronExpr, tz: Tz, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let mut from = after;
    // croner works in whole seconds; guard against an answer at or before
    // `after` when `after` has a fractional second.
    for _ in 0..3 {
        let t = cron
            .cron
            .find_next_occurrence(&from.with_timezone(&tz), false)
            .ok()?
            .with_timezone(&Utc);
        if t > after {
            return Some(t);
        }
        from = t + TimeDelta::seconds(1);
    }
    None
}

/// The latest tick at or before `now`.
pub fn last_fire_at_or_before(
    cron: &CronExpr,
    tz: Tz,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    // Find a candidate with a backward search, then settle it with forward
    // searches so both directions agree on DST rules: a forward walk from a
    // few hours earlier (wider than any DST shift) is the reference.
    let candidate = cron
        .cron
        .find_previous_occurrence(&now.with_timezone(&tz), true)
        .ok()?
        .with_timezone(&Utc);
    let mut from = candidate.min(now) - TimeDelta::hours(3);
    let mut latest = None;
    while let Some(t) = next_fire(cron, tz, from) {
        if t > now {
            break;
        }
        latest = Some(t);
        from = t;
    }
    latest.or(Some(candidate).filter(|c| *c <= now))
}

/// A validated schedule: the spec with its compiled parts.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub spec: ScheduleSpec,
    pub cron: CronExpr,
    pub tz: Tz,
    pub topic: TopicName,
}

impl Schedule {
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The first tick strictly after `after`.
    pub fn next_fire(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        next_fire(&self.cron, self.tz, after)
    }

    /// The message for the tick `scheduled` (or a run-now at that time):
    /// `data`, the spec's attributes, `schedule`, `scheduledTime` (RFC 3339,
    /// UTC) and, for run-now, `runNow = "true"`.
    pub fn message(&self, scheduled: DateTime<Utc>, run_now: bool) -> OutgoingMessage {
        let mut attributes = self.spec.attributes.clone();
        attributes.insert(ATTR_SCHEDULE.into(), self.spec.name.clone());
        attributes.insert(ATTR_SCHEDULED_TIME.into(), format_time(scheduled));
        if run_now {
            attributes.insert(ATTR_RUN_NOW.into(), "true".into());
        }
        OutgoingMessage {
            data: self.spec.data.clone().into_bytes().into(),
            attributes,
            ordering_key: String::new(),
        }
    }
}

/// RFC 3339 in UTC with `Z`, fractional seconds only when present.
pub fn format_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// What should fire at `now`, given that every tick at or before
/// `last_fired` is settled: at most one tick (see the module docs on missed
/// ticks). A paused spec has nothing due. Pure: the clock is an argument.
pub fn due(
    schedule: &Schedule,
    last_fired: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Vec<DateTime<Utc>> {
    if schedule.spec.paused || now <= last_fired {
        return Vec::new();
    }
    let Some(latest) = last_fire_at_or_before(&schedule.cron, schedule.tz, now) else {
        return Vec::new();
    };
    if latest <= last_fired {
        return Vec::new();
    }
    let window = TimeDelta::from_std(schedule.spec.missed.window()).unwrap_or(TimeDelta::MAX);
    if now - latest > window {
        return Vec::new();
    }
    vec![latest]
}

/// How a schedule is shown by the API and the CLI.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleStatus {
    pub name: String,
    pub cron: String,
    pub time_zone: String,
    pub topic: String,
    pub paused: bool,
    /// `run_once` or `skip`.
    pub missed: String,
    /// `run_once` only, humantime (`24h`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub missed_max_age: Option<String>,
    /// Next tick (RFC 3339); absent while paused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_fire_time: Option<String>,
    /// Scheduled time of the last tick that was published.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_fire_time: Option<String>,
    /// Message id of the last publish (tick or run-now).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_message_id: Option<String>,
    /// A claimed tick not yet published (it is retried).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending_tick: Option<String>,
    /// Why the last publish failed, until one succeeds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use std::time::Duration;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn cron(s: &str) -> CronExpr {
        CronExpr::parse(s).unwrap()
    }

    fn ticks(c: &str, tz: &str, from: &str, n: usize) -> Vec<String> {
        let c = cron(c);
        let tz = parse_time_zone(tz).unwrap();
        let mut t = utc(from);
        let mut out = Vec::new();
        for _ in 0..n {
            t = next_fire(&c, tz, t).unwrap();
            out.push(format_time(t));
        }
        out
    }

    fn spec(c: &str, tz: &str) -> Schedule {
        let mut s = ScheduleSpec::new("nightly", c, "projects/demo/topics/imports");
        s.time_zone = tz.into();
        s.validate().unwrap()
    }

    #[test]
    fn next_fire_is_strictly_after() {
        let c = cron("0 3 * * *");
        assert_eq!(
            next_fire(&c, Tz::UTC, utc("2026-01-01T02:59:59Z")),
            Some(utc("2026-01-01T03:00:00Z"))
        );
        assert_eq!(
            next_fire(&c, Tz::UTC, utc("2026-01-01T03:00:00Z")),
            Some(utc("2026-01-02T03:00:00Z"))
        );
        assert_eq!(
            next_fire(&c, Tz::UTC, utc("2026-01-01T03:00:00.500Z")),
            Some(utc("2026-01-02T03:00:00Z"))
        );
        assert_eq!(
            next_fire(&c, Tz::UTC, utc("2026-01-01T02:59:59.999Z")),
            Some(utc("2026-01-01T03:00:00Z"))
        );
        let every = cron("* * * * *");
        assert_eq!(
            next_fire(&every, Tz::UTC, utc("2026-01-01T03:00:00.999Z")),
            Some(utc("2026-01-01T03:01:00Z"))
        );
    }

    #[test]
    fn time_zone_shifts_ticks() {
        // 03:00 in Berlin is 02:00 UTC in winter, 01:00 UTC in summer.
        assert_eq!(
            ticks("0 3 * * *", "Europe/Berlin", "2026-01-10T00:00:00Z", 1),
            ["2026-01-10T02:00:00Z"]
        );
        assert_eq!(
            ticks("0 3 * * *", "Europe/Berlin", "2026-07-10T00:00:00Z", 1),
            ["2026-07-10T01:00:00Z"]
        );
    }

    #[test]
    fn berlin_spring_forward_skipped_hour() {
        // 2026-03-29: 02:00 CET (01:00 UTC) jumps to 03:00 CEST.
        // A fixed time inside the gap fires once, right after the gap.
        assert_eq!(
            ticks("30 2 * * *", "Europe/Berlin", "2026-03-28T12:00:00Z", 3),
            [
                "2026-03-29T01:00:00Z",
                "2026-03-30T00:30:00Z",
                "2026-03-31T00:30:00Z"
            ]
        );
        // The day before it was 02:30 CET = 01:30 UTC.
        assert_eq!(
            ticks("30 2 * * *", "Europe/Berlin", "2026-03-27T12:00:00Z", 1),
            ["2026-03-28T01:30:00Z"]
        );
        // A daily 03:00 is not disturbed: 03:00 CEST = 01:00 UTC.
        assert_eq!(
            ticks("0 3 * * *", "Europe/Berlin", "2026-03-28T12:00:00Z", 1),
            ["2026-03-29T01:00:00Z"]
        );
        // Interval expressions have no ticks inside the gap.
        assert_eq!(
            ticks("*/30 * * * *", "Europe/Berlin", "2026-03-29T00:00:00Z", 4),
            // 01:30 CET, 03:00 CEST, 03:30 CEST, 04:00 CEST
            [
                "2026-03-29T00:30:00Z",
                "2026-03-29T01:00:00Z",
                "2026-03-29T01:30:00Z",
                "2026-03-29T02:00:00Z"
            ]
        );
        assert_eq!(
            ticks("0 * * * *", "Europe/Berlin", "2026-03-28T23:30:00Z", 3),
            // 01:00 CET, 03:00 CEST, 04:00 CEST: one real hour apart
            [
                "2026-03-29T00:00:00Z",
                "2026-03-29T01:00:00Z",
                "2026-03-29T02:00:00Z"
            ]
        );
    }

    #[test]
    fn berlin_fall_back_repeated_hour() {
        // 2026-10-25: 03:00 CEST (01:00 UTC) falls back to 02:00 CET.
        // A fixed time in the repeated hour fires once, at its first pass.
        assert_eq!(
            ticks("30 2 * * *", "Europe/Berlin", "2026-10-24T12:00:00Z", 2),
            ["2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"]
        );
        // Interval expressions fire in both passes.
        assert_eq!(
            ticks("*/30 * * * *", "Europe/Berlin", "2026-10-24T23:45:00Z", 5),
            // 02:00 CEST, 02:30 CEST, 02:00 CET, 02:30 CET, 03:00 CET
            [
                "2026-10-25T00:00:00Z",
                "2026-10-25T00:30:00Z",
                "2026-10-25T01:00:00Z",
                "2026-10-25T01:30:00Z",
                "2026-10-25T02:00:00Z"
            ]
        );
        // "0 2 * * *" is fixed: once, at 02:00 CEST.
        assert_eq!(
            ticks("0 2 * * *", "Europe/Berlin", "2026-10-24T12:00:00Z", 2),
            ["2026-10-25T00:00:00Z", "2026-10-26T01:00:00Z"]
        );
        assert!(cron("30 2 * * *").is_fixed_time());
        assert!(!cron("*/30 * * * *").is_fixed_time());
    }

    #[test]
    fn last_fire_agrees_with_next_fire_across_dst() {
        for (c, tz) in [
            ("30 2 * * *", "Europe/Berlin"),
            ("*/30 * * * *", "Europe/Berlin"),
            ("0 * * * *", "Europe/Berlin"),
            ("*/7 1-3 * * *", "Europe/Berlin"),
            ("0 3 * * *", "America/New_York"),
        ] {
            for start in [
                "2026-03-28T20:00:00Z",
                "2026-10-24T20:00:00Z",
                "2026-03-08T00:00:00Z",
                "2026-11-01T00:00:00Z",
            ] {
                let e = cron(c);
                let tz = parse_time_zone(tz).unwrap();
                let mut t = utc(start);
                for _ in 0..40 {
                    let n = next_fire(&e, tz, t).unwrap();
                    // Just before the tick the latest is the previous tick; at the tick, it is the tick.
                    assert_eq!(last_fire_at_or_before(&e, tz, n), Some(n), "{c} at {n}");
                    let before = last_fire_at_or_before(&e, tz, n - TimeDelta::seconds(1)).unwrap();
                    assert!(
                        before <= t && before < n,
                        "{c}: latest before {n} was {before}, previous tick {t}"
                    );
                    t = n;
                }
            }
        }
    }

    #[test]
    fn bad_cron_says_what_is_wrong() {
        // Each bad expression, and what its error must say.
        for (bad, says) in [
            ("", "empty"),
            ("0 3 * *", "4 fields"),
            ("0 0 3 * * *", "seconds and years are not supported"),
            (
                "61 3 * * *",
                "\"61 3 * * *\": minute field \"61\": number out of bounds (minute takes 0-59)",
            ),
            ("0 25 * * *", "hour field \"25\""),
            ("0 3 32 * *", "day-of-month field \"32\""),
            ("0 3 * 13 *", "month field \"13\""),
            ("0 3 * * FOO", "day-of-week field \"FOO\""),
            ("*/0 * * * *", "step cannot be zero"),
            ("0 3 * *", "MINUTE HOUR DAY-OF-MONTH MONTH DAY-OF-WEEK"),
            ("@reboot", "unknown nickname"),
            ("0 0 30 2 *", "never matches"),
        ] {
            let e = CronExpr::parse(bad).unwrap_err().message;
            assert!(e.contains(says), "{bad:?}: {e}");
        }
        assert!(CronExpr::parse("@daily").is_ok());
        assert!(CronExpr::parse("0 9 * * MON-FRI").is_ok());
        assert!(CronExpr::parse("  */5 * * * *  ").is_ok());
    }

    #[test]
    fn unknown_time_zone_is_named() {
        let e = parse_time_zone("Europe/Berln").unwrap_err();
        assert!(e.message.contains("\"Europe/Berln\""), "{}", e.message);
        assert!(parse_time_zone("Europe/Berlin").is_ok());
        assert!(parse_time_zone("UTC").is_ok());
        let mut s = ScheduleSpec::new("x", "0 3 * * *", "projects/demo/topics/t");
        s.time_zone = "Mars/Olympus".into();
        let e = s.validate().unwrap_err();
        assert!(
            e.message.contains("schedule \"x\"") && e.message.contains("Mars/Olympus"),
            "{}",
            e.message
        );
    }

    #[test]
    fn spec_validation() {
        let ok = ScheduleSpec::new(
            "nightly-import",
            "0 3 * * *",
            "projects/demo/topics/imports",
        );
        ok.validate().unwrap();
        let mut bad = ok.clone();
        bad.name = "has space".into();
        assert!(bad
            .validate()
            .unwrap_err()
            .message
            .contains("invalid schedule name"));
        let mut bad = ok.clone();
        bad.topic = "imports".into();
        assert!(bad.validate().unwrap_err().message.contains("topic"));
        let mut bad = ok.clone();
        bad.attributes.insert("schedule".into(), "x".into());
        assert!(bad
            .validate()
            .unwrap_err()
            .message
            .contains("set by the scheduler"));
        let mut bad = ok.clone();
        bad.attributes.insert("googx".into(), "x".into());
        assert!(bad.validate().is_err());
        let mut bad = ok.clone();
        bad.cron = "0 3 * *".into();
        let m = bad.validate().unwrap_err().message;
        assert!(
            m.starts_with("schedule \"nightly-import\": invalid cron expression"),
            "{m}"
        );
    }

    #[test]
    fn due_fires_the_tick_on_time() {
        let s = spec("0 * * * *", "UTC");
        let last = utc("2026-05-01T09:00:00Z");
        assert!(due(&s, last, utc("2026-05-01T09:59:59Z")).is_empty());
        assert_eq!(
            due(&s, last, utc("2026-05-01T10:00:00Z")),
            [utc("2026-05-01T10:00:00Z")]
        );
        assert_eq!(
            due(&s, last, utc("2026-05-01T10:00:30Z")),
            [utc("2026-05-01T10:00:00Z")]
        );
        // Once settled, nothing more until the next tick.
        assert!(due(&s, utc("2026-05-01T10:00:00Z"), utc("2026-05-01T10:59:00Z")).is_empty());
    }

    #[test]
    fn due_run_once_coalesces_missed_ticks() {
        let s = spec("0 * * * *", "UTC");
        let last = utc("2026-05-01T09:00:00Z");
        // Down from 09:30 to 14:20: 10..14 missed → one fire, as 14:00.
        assert_eq!(
            due(&s, last, utc("2026-05-01T14:20:00Z")),
            [utc("2026-05-01T14:00:00Z")]
        );
        // Too old for max_age: nothing.
        let mut sp = s.spec.clone();
        sp.missed = MissedPolicy::RunOnce {
            max_age: Duration::from_secs(600),
        };
        let s2 = sp.validate().unwrap();
        assert!(due(&s2, last, utc("2026-05-01T14:20:00Z")).is_empty());
        assert_eq!(
            due(&s2, last, utc("2026-05-01T14:05:00Z")),
            [utc("2026-05-01T14:00:00Z")]
        );
    }

    #[test]
    fn due_skip_drops_missed_ticks() {
        let mut sp = spec("0 * * * *", "UTC").spec;
        sp.missed = MissedPolicy::Skip;
        let s = sp.validate().unwrap();
        let last = utc("2026-05-01T09:00:00Z");
        assert!(due(&s, last, utc("2026-05-01T14:20:00Z")).is_empty());
        // A tick less than ON_TIME_GRACE late still fires.
        assert_eq!(
            due(&s, last, utc("2026-05-01T14:00:59Z")),
            [utc("2026-05-01T14:00:00Z")]
        );
        assert!(due(&s, last, utc("2026-05-01T14:01:01Z")).is_empty());
    }

    #[test]
    fn due_respects_paused() {
        let mut sp = spec("0 * * * *", "UTC").spec;
        sp.paused = true;
        let s = sp.validate().unwrap();
        assert!(due(&s, utc("2026-05-01T09:00:00Z"), utc("2026-05-01T10:00:00Z")).is_empty());
    }

    #[test]
    fn due_on_dst_days() {
        let s = spec("30 2 * * *", "Europe/Berlin");
        // Spring: the 02:30 tick happens at 03:00 CEST = 01:00 UTC.
        let last = utc("2026-03-28T01:30:00Z");
        assert!(due(&s, last, utc("2026-03-29T00:59:59Z")).is_empty());
        assert_eq!(
            due(&s, last, utc("2026-03-29T01:00:00Z")),
            [utc("2026-03-29T01:00:00Z")]
        );
        // Autumn: once at 02:30 CEST = 00:30 UTC, not at 02:30 CET.
        let last = utc("2026-10-25T00:30:00Z");
        assert!(due(&s, last, utc("2026-10-25T01:30:00Z")).is_empty());
        assert!(due(&s, last, utc("2026-10-26T01:29:00Z")).is_empty());
    }

    #[test]
    fn message_shape() {
        let mut sp = ScheduleSpec::new("nightly", "0 3 * * *", "projects/demo/topics/imports");
        sp.data = r#"{"full": true}"#.into();
        sp.attributes.insert("kind".into(), "import".into());
        let s = sp.validate().unwrap();
        let m = s.message(Utc.with_ymd_and_hms(2026, 3, 29, 1, 0, 0).unwrap(), false);
        assert_eq!(&m.data[..], br#"{"full": true}"#);
        assert_eq!(m.attributes["schedule"], "nightly");
        assert_eq!(m.attributes["scheduledTime"], "2026-03-29T01:00:00Z");
        assert_eq!(m.attributes["kind"], "import");
        assert!(!m.attributes.contains_key("runNow"));
        assert_eq!(
            s.message(utc("2026-03-29T01:00:00.250Z"), true).attributes["runNow"],
            "true"
        );
    }
}
