//! Printing: aligned tables, key/value blocks, pretty JSON. Output goes to
//! stdout; a closed pipe (`pubrun topics list | head`) is not an error.

use std::io::Write;

use anyhow::Result;
use serde_json::Value;

use super::api::Api;
use super::args::ConnArgs;

/// Writes `text` to stdout as is.
pub fn out(text: &str) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(anyhow::anyhow!("writing to standard output: {e}")),
    }
}

pub fn json(v: &Value) -> Result<()> {
    let mut s = serde_json::to_string_pretty(v)?;
    s.push('\n');
    out(&s)
}

/// The array at `key` of a server reply (none when it is missing).
pub fn items<'a>(resp: &'a Value, key: &str) -> &'a [Value] {
    resp.get(key)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// What every list command prints: with `--json` (`as_json`) the reply
/// `whole`; else, when there are no `items` and an `empty` note is given,
/// that note on stderr; else a table of `headers` with `row` per item.
pub fn list(
    as_json: bool,
    whole: &Value,
    items: &[Value],
    empty: Option<&str>,
    headers: &[&str],
    row: impl FnMut(&Value) -> Vec<String>,
) -> Result<()> {
    if as_json {
        return json(whole);
    }
    if let (true, Some(note)) = (items.is_empty(), empty) {
        eprintln!("{note}");
        return Ok(());
    }
    out(&table_of(headers, items, row))
}

/// A table of `headers` with `row` per item.
pub fn table_of(
    headers: &[&str],
    items: &[Value],
    row: impl FnMut(&Value) -> Vec<String>,
) -> String {
    let rows: Vec<Vec<String>> = items.iter().map(row).collect();
    table(headers, &rows)
}

/// [`table_of`] the `items`, or the line `empty` when there are none.
pub fn table_or(
    items: &[Value],
    empty: &str,
    headers: &[&str],
    row: impl FnMut(&Value) -> Vec<String>,
) -> String {
    if items.is_empty() {
        format!("{empty}\n")
    } else {
        table_of(headers, items, row)
    }
}

/// [`list`] of the array `key` in the reply to `GET path` (a list of
/// pubrun's own API, whose whole reply is what `--json` prints).
pub async fn get_list(
    conn: &ConnArgs,
    path: &str,
    key: &str,
    empty: Option<&str>,
    headers: &[&str],
    row: impl FnMut(&Value) -> Vec<String>,
) -> Result<()> {
    let resp = Api::new(conn)?.get(path).await?;
    list(conn.json, &resp, items(&resp, key), empty, headers, row)
}

/// Writes raw bytes to stdout and flushes. Returns `false` when stdout is a
/// closed pipe (the reader went away), so a follower can stop.
pub fn out_bytes(bytes: &[u8]) -> Result<bool> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(anyhow::anyhow!("writing to standard output: {e}")),
    }
}

/// Columns separated by two spaces, padded to the widest cell; the last
/// column is not padded.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut all = Vec::with_capacity(rows.len() + 1);
    all.push(headers.iter().map(|h| h.to_string()).collect());
    all.extend(rows.iter().cloned());
    columns(&all)
}

/// Like [`table`] without a header row.
pub fn columns(rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = Vec::new();
    for row in rows {
        if widths.len() < row.len() {
            widths.resize(row.len(), 0);
        }
    }
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut s = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, cell) in cells.enumerate() {
            if i + 1 < widths.len() {
                l.push_str(cell);
                l.extend(std::iter::repeat_n(
                    ' ',
                    widths[i] - cell.chars().count() + 2,
                ));
            } else {
                l.push_str(cell);
            }
        }
        s.push_str(l.trim_end());
        s.push('\n');
    };
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    s
}

/// `label: value` lines with the values aligned (labels in the given order).
pub fn block(rows: &[(&str, String)]) -> String {
    let width = rows
        .iter()
        .map(|(k, _)| k.chars().count() + 1)
        .max()
        .unwrap_or(0);
    let mut s = String::new();
    for (k, v) in rows {
        let key = format!("{k}:");
        // Continuation lines of multi-line values stay in the value column.
        let v = v
            .trim_end_matches('\n')
            .replace('\n', &format!("\n{:width$} ", ""));
        s.push_str(format!("{key:<width$} {v}").trim_end());
        s.push('\n');
    }
    s
}

/// Milliseconds since the Unix epoch as RFC 3339 in UTC, e.g.
/// `2024-05-01T12:00:03.250Z` (`millis = false`: `2024-05-01T12:00:03Z`).
pub fn rfc3339_ms(ms: i64, millis: bool) -> String {
    let t = chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default();
    let format = if millis {
        chrono::SecondsFormat::Millis
    } else {
        chrono::SecondsFormat::Secs
    };
    t.to_rfc3339_opts(format, true)
}

/// Now, in milliseconds since the Unix epoch (what the API's times use).
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A duration for people: `850ms`, `3.2s`, `42s`, `1m05s`, `2h03m`, `3d04h`.
pub fn duration_ms(ms: i64) -> String {
    let ms = ms.max(0);
    if ms < 1000 {
        return format!("{ms}ms");
    }
    if ms < 10_000 {
        return format!("{:.1}s", ms as f64 / 1000.0);
    }
    let s = ms / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// A configured duration given in (fractional) seconds, as it would be
/// written in pubrun.toml: `30m`, `1h30m`, `90s` → `1m30s`, `0.5` → `500ms`.
pub fn config_duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return secs.to_string();
    }
    let total_ms = (secs * 1000.0).round() as u64;
    if total_ms == 0 {
        return "0s".into();
    }
    let (mut rest, ms) = (total_ms / 1000, total_ms % 1000);
    let mut s = String::new();
    for (unit, size) in [("d", 86_400u64), ("h", 3600), ("m", 60), ("s", 1)] {
        if rest >= size {
            s.push_str(&format!("{}{unit}", rest / size));
            rest %= size;
        }
    }
    if ms > 0 {
        s.push_str(&format!("{ms}ms"));
    }
    s
}

/// Bytes for people: `512 B`, `64 KiB`, `1.5 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    if v.fract() == 0.0 {
        format!("{v:.0} {unit}")
    } else {
        format!("{v:.1} {unit}")
    }
}

/// A word for shell use: quoted only when needed (`'it''s'` style escaping).
pub fn shell_word(w: &str) -> String {
    let plain = !w.is_empty()
        && w.chars().all(|c| {
            c.is_ascii_alphanumeric()
                || matches!(c, '-' | '_' | '.' | '/' | ':' | '=' | ',' | '+' | '@' | '%')
        });
    if plain {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', "'\\''"))
    }
}

/// `key: value` lines with values aligned, one per top-level field.
pub fn fields(v: &Value) -> String {
    let Some(obj) = v.as_object() else {
        return format!("{}\n", display(v));
    };
    // The name first, the rest in the server's order.
    let mut rows: Vec<(String, String)> = obj
        .iter()
        .filter(|(_, v)| !is_empty(v))
        .map(|(k, v)| (format!("{k}:"), display(v)))
        .collect();
    rows.sort_by_key(|(k, _)| k != "name:");
    let width = rows
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    let mut s = String::new();
    for (k, v) in rows {
        s.push_str(&format!("{k:<width$} {v}\n"));
    }
    s
}

/// A JSON value in one line: strings bare, string maps as `k=v, k2=v2`,
/// everything else as compact JSON.
pub fn display(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Object(m) if m.values().all(Value::is_string) => map_pairs(v),
        other => other.to_string(),
    }
}

/// `k=v, k2=v2` (sorted by key) for a JSON object; `-` when empty or absent.
pub fn map_pairs(v: &Value) -> String {
    let Some(m) = v.as_object() else {
        return "-".into();
    };
    if m.is_empty() {
        return "-".into();
    }
    let mut pairs: Vec<String> = m
        .iter()
        .map(|(k, v)| format!("{k}={}", display(v)))
        .collect();
    pairs.sort();
    pairs.join(", ")
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn table_aligns_columns() {
        let t = table(
            &["NAME", "TOPIC"],
            &[
                vec!["a".into(), "t".into()],
                vec!["long-name".into(), "u".into()],
            ],
        );
        assert_eq!(t, "NAME       TOPIC\na          t\nlong-name  u\n");
    }

    #[test]
    fn columns_without_header() {
        let c = columns(&[
            vec![
                "+ create".into(),
                "topic".into(),
                "projects/demo/topics/a".into(),
            ],
            vec!["= unchanged".into(), "job".into(), "j".into()],
        ]);
        assert_eq!(
            c,
            "+ create     topic  projects/demo/topics/a\n= unchanged  job    j\n"
        );
    }

    #[test]
    fn times_and_durations() {
        assert_eq!(rfc3339_ms(0, false), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339_ms(1_714_564_803_250, true),
            "2024-05-01T12:00:03.250Z"
        );
        assert_eq!(rfc3339_ms(951_782_400_000, false), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_ms(-1, true), "1969-12-31T23:59:59.999Z");
        assert_eq!(duration_ms(850), "850ms");
        assert_eq!(duration_ms(3_240), "3.2s");
        assert_eq!(duration_ms(42_000), "42s");
        assert_eq!(duration_ms(65_000), "1m05s");
        assert_eq!(duration_ms(7_380_000), "2h03m");
        assert_eq!(duration_ms(3 * 86_400_000 + 4 * 3_600_000), "3d04h");
        assert_eq!(config_duration(1800.0), "30m");
        assert_eq!(config_duration(5400.0), "1h30m");
        assert_eq!(config_duration(90.0), "1m30s");
        assert_eq!(config_duration(0.5), "500ms");
        assert_eq!(config_duration(0.0), "0s");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1 << 20), "1 MiB");
        assert_eq!(bytes(1536 * 1024), "1.5 MiB");
        assert_eq!(shell_word("echo"), "echo");
        assert_eq!(shell_word("a b"), "'a b'");
        assert_eq!(shell_word("it's"), "'it'\\''s'");
        assert_eq!(shell_word(""), "''");
    }

    #[test]
    fn block_aligns_multiline_values() {
        assert_eq!(
            block(&[("a", "1".into()), ("long", "x\ny".into())]),
            "a:    1\nlong: x\n      y\n"
        );
    }

    #[test]
    fn fields_align_and_skip_empty() {
        let f = fields(
            &json!({"name": "n", "labels": {"b": "2", "a": "1"}, "ackDeadlineSeconds": 10, "x": ""}),
        );
        assert!(f.starts_with("name:               n\n"), "{f}");
        assert!(f.contains("\nlabels:             a=1, b=2\n"), "{f}");
        assert!(f.contains("ackDeadlineSeconds: 10\n"), "{f}");
        assert!(!f.contains("x:"), "{f}");
    }
}
