//! Printing: aligned tables, key/value blocks, pretty JSON. Output goes to
//! stdout; a closed pipe (`pubrun topics list | head`) is not an error.

use std::io::Write;

use anyhow::Result;
use serde_json::Value;

/// Writes `text` to stdout as is.
pub fn out(text: &str) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
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

/// Columns separated by two spaces, padded to the widest cell; the last
/// column is not padded.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
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
                l.extend(std::iter::repeat_n(' ', widths[i] - cell.chars().count() + 2));
            } else {
                l.push_str(cell);
            }
        }
        s.push_str(l.trim_end());
        s.push('\n');
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    s
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
    let width = rows.iter().map(|(k, _)| k.chars().count()).max().unwrap_or(0);
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
    let Some(m) = v.as_object() else { return "-".into() };
    if m.is_empty() {
        return "-".into();
    }
    let mut pairs: Vec<String> = m.iter().map(|(k, v)| format!("{k}={}", display(v))).collect();
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
            &[vec!["a".into(), "t".into()], vec!["long-name".into(), "u".into()]],
        );
        assert_eq!(t, "NAME       TOPIC\na          t\nlong-name  u\n");
    }

    #[test]
    fn fields_align_and_skip_empty() {
        let f = fields(&json!({"name": "n", "labels": {"b": "2", "a": "1"}, "ackDeadlineSeconds": 10, "x": ""}));
        assert!(f.starts_with("name:               n\n"), "{f}");
        assert!(f.contains("\nlabels:             a=1, b=2\n"), "{f}");
        assert!(f.contains("ackDeadlineSeconds: 10\n"), "{f}");
        assert!(!f.contains("x:"), "{f}");
    }
}
