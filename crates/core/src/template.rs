//! Parameters templated from a message, in Jinja syntax (minijinja):
//! `{{ attributes.objectId }}`, `{{ data.full }}`, `{{ publish_time | date }}`.
//!
//! Variables a template may use:
//! - `data`: the message data parsed as JSON, or the text when it is not JSON;
//! - `text`: the data as UTF-8 text;
//! - `attributes`: the message attributes;
//! - `message_id`, `publish_time` (RFC 3339), `ordering_key`;
//! - `run.id`, `run.attempt`, `job.name`.
//!
//! Templates are compiled and their variables checked when a job is applied;
//! at run time an undefined value (a missing attribute) is an error, not an
//! empty string, so a job never runs with a silently blank parameter.

use std::collections::BTreeMap;

use minijinja::{Environment, UndefinedBehavior, Value};
use serde::Serialize;

use crate::error::{Error, Result};

const ROOTS: &[&str] = &[
    "data",
    "text",
    "attributes",
    "message_id",
    "publish_time",
    "ordering_key",
    "run",
    "job",
];

/// What a template sees.
#[derive(Debug, Clone, Serialize, Default)]
pub struct TemplateContext {
    pub data: serde_json::Value,
    pub text: String,
    pub attributes: BTreeMap<String, String>,
    pub message_id: String,
    pub publish_time: String,
    pub ordering_key: String,
    pub run: RunContext,
    pub job: JobContext,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct RunContext {
    pub id: String,
    pub attempt: u32,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct JobContext {
    pub name: String,
}

impl TemplateContext {
    /// Builds the context from a message's parts.
    pub fn from_message(
        data: &[u8],
        attributes: BTreeMap<String, String>,
        message_id: String,
        publish_time: String,
        ordering_key: String,
    ) -> Self {
        let text = String::from_utf8_lossy(data).into_owned();
        let parsed = serde_json::from_slice(data)
            .unwrap_or_else(|_| serde_json::Value::String(text.clone()));
        TemplateContext {
            data: parsed,
            text,
            attributes,
            message_id,
            publish_time,
            ordering_key,
            ..Default::default()
        }
    }
}

fn env() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    // Parameters end up in shells, env vars and JSON: print booleans, null
    // and structures the JSON way rather than Python's `True` / `None`.
    env.set_formatter(|out, state, value| {
        use minijinja::value::ValueKind;
        match value.kind() {
            ValueKind::Bool | ValueKind::None | ValueKind::Map | ValueKind::Seq => {
                let json = serde_json::to_string(value).map_err(|e| {
                    minijinja::Error::new(minijinja::ErrorKind::BadSerialization, e.to_string())
                })?;
                out.write_str(&json).map_err(minijinja::Error::from)
            }
            _ => minijinja::escape_formatter(out, state, value),
        }
    });
    // `date`: the calendar day (YYYY-MM-DD) of an RFC 3339 timestamp (in
    // the timestamp's own offset) or of a plain date. Input comes from
    // messages: anything else is a template error, never a panic.
    env.add_filter(
        "date",
        |v: String| -> std::result::Result<String, minijinja::Error> {
            calendar_day(&v).ok_or_else(|| {
                minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    format!(
                        "{:?} is not an RFC 3339 time or a YYYY-MM-DD date",
                        v.chars().take(64).collect::<String>()
                    ),
                )
            })
        },
    );
    env
}

/// `YYYY-MM-DD` of an RFC 3339 timestamp or a plain date, `None` otherwise.
fn calendar_day(v: &str) -> Option<String> {
    let day = match chrono::DateTime::parse_from_rfc3339(v) {
        Ok(t) => t.date_naive(),
        Err(_) => chrono::NaiveDate::parse_from_str(v, "%Y-%m-%d").ok()?,
    };
    Some(day.format("%Y-%m-%d").to_string())
}

/// Checks syntax and that every variable is one a template may use.
pub fn validate(source: &str) -> Result<()> {
    let env = env();
    let tmpl = env
        .template_from_str(source)
        .map_err(|e| Error::invalid(format!("template {source:?}: {}", detail(&e))))?;
    let mut unknown: Vec<String> = tmpl
        .undeclared_variables(false)
        .into_iter()
        .filter(|v| !ROOTS.contains(&v.as_str()))
        .collect();
    unknown.sort();
    if let Some(v) = unknown.first() {
        return Err(Error::invalid(format!(
            "template {source:?} uses unknown variable `{v}`; available: {}",
            ROOTS.join(", ")
        )));
    }
    Ok(())
}

/// Renders a template against a message's context.
pub fn render(source: &str, ctx: &TemplateContext) -> Result<String> {
    if !source.contains("{{") && !source.contains("{%") {
        return Ok(source.to_string());
    }
    let env = env();
    env.render_str(source, Value::from(minijinja::value::Serde(ctx)))
        .map_err(|e| {
            Error::invalid(format!(
                "template {source:?}: {}",
                render_detail(&e, source)
            ))
        })
}

/// [`detail`], naming the expression that was undefined (`attributes.zone`)
/// so the user knows which attribute or field the message lacked.
fn render_detail(e: &minijinja::Error, source: &str) -> String {
    let culprit = (e.kind() == minijinja::ErrorKind::UndefinedError)
        .then(|| e.range().and_then(|r| source.get(r)))
        .flatten()
        .map(str::trim)
        // Only a path into the context; a span on a filter or call would mislead.
        .filter(|s| {
            let root = s.split(['.', '[']).next().unwrap_or("");
            ROOTS.contains(&root)
        });
    match culprit {
        Some(expr) => format!("`{expr}` is undefined (the message has no such value)"),
        None => detail(e),
    }
}

fn detail(e: &minijinja::Error) -> String {
    match e.detail() {
        Some(d) => format!("{} ({d})", e.kind()),
        None => e.kind().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> TemplateContext {
        let mut attrs = BTreeMap::new();
        attrs.insert("objectId".to_string(), "csv/a.csv".to_string());
        let mut c = TemplateContext::from_message(
            br#"{"full": true, "n": 3}"#,
            attrs,
            "42".into(),
            "2026-11-25T03:00:00.123Z".into(),
            String::new(),
        );
        c.run.id = "run-1".into();
        c
    }

    #[test]
    fn renders_message_fields() {
        let c = ctx();
        assert_eq!(
            render("{{ attributes.objectId }}", &c).unwrap(),
            "csv/a.csv"
        );
        assert_eq!(render("{{ data.full }}", &c).unwrap(), "true");
        assert_eq!(render("{{ data }}", &c).unwrap(), r#"{"full":true,"n":3}"#);
        assert_eq!(
            render("{{ publish_time | date }}", &c).unwrap(),
            "2026-11-25"
        );
        assert_eq!(render("out/{{ run.id }}/", &c).unwrap(), "out/run-1/");
        assert_eq!(render("plain", &c).unwrap(), "plain");
    }

    #[test]
    fn date_filter_parses_and_never_panics() {
        let mut c = ctx();
        let day = |c: &TemplateContext| render("{{ attributes.day | date }}", c);
        for (input, want) in [
            ("2026-11-25", "2026-11-25"),
            ("2026-11-25T23:30:00+02:00", "2026-11-25"),
            ("2026-11-25T03:00:00.123456789Z", "2026-11-25"),
        ] {
            c.attributes.insert("day".into(), input.into());
            assert_eq!(day(&c).unwrap(), want, "{input}");
        }
        // Byte 10 falls inside `é`: the old filter sliced there and panicked.
        for bad in [
            "2026-11-0éxx",
            "2026-13-01",
            "2026-11-25Tnope",
            "",
            "é",
            "20261125",
        ] {
            c.attributes.insert("day".into(), bad.into());
            let e = day(&c).unwrap_err();
            assert!(
                e.message.contains("not an RFC 3339 time"),
                "{bad}: {}",
                e.message
            );
        }
    }

    #[test]
    fn missing_values_are_errors() {
        let err = render("{{ attributes.nope }}", &ctx()).unwrap_err();
        assert!(err.message.contains("undefined"), "{}", err.message);
        // The error names what was missing, also inside a longer template.
        assert!(err.message.contains("`attributes.nope`"), "{}", err.message);
        let err = render("x-{{ data.n }}-{{ attributes.label }}", &ctx()).unwrap_err();
        assert!(
            err.message.contains("`attributes.label`"),
            "{}",
            err.message
        );
    }

    #[test]
    fn validation_catches_syntax_and_unknown_variables() {
        assert!(validate("{{ attributes.x }}").is_ok());
        assert!(validate("{{ attributes.x ")
            .unwrap_err()
            .message
            .contains("syntax"));
        let e = validate("{{ atributes.x }}").unwrap_err();
        assert!(e.message.contains("`atributes`"), "{}", e.message);
    }

    #[test]
    fn non_json_data_is_text() {
        let c = TemplateContext::from_message(
            b"hello",
            BTreeMap::new(),
            "1".into(),
            String::new(),
            String::new(),
        );
        assert_eq!(render("{{ data }} {{ text }}", &c).unwrap(), "hello hello");
    }
}
