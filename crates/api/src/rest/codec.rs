//! Request parsing: path parameters, proto3 JSON bodies, query strings,
//! durations, timestamps, base64 and field masks.

use super::*;

pub(super) fn path_params<T>(
    p: std::result::Result<Path<T>, PathRejection>,
) -> std::result::Result<T, Fail> {
    match p {
        Ok(Path(v)) => Ok(v),
        Err(r) => Err(Error::invalid(format!("invalid request path: {}", r.body_text())).into()),
    }
}

/// Splits `id:verb` at the first ':' (resource ids cannot contain ':').
pub(super) fn split_verb(seg: &str) -> (&str, Option<&str>) {
    match seg.split_once(':') {
        Some((id, verb)) => (id, Some(verb)),
        None => (seg, None),
    }
}

/// Parses a JSON request body; an empty body means `{}`.
pub(super) fn parse_body<T: DeserializeOwned + Default>(
    body: std::result::Result<Bytes, BytesRejection>,
) -> std::result::Result<T, Fail> {
    let bytes =
        match body {
            Ok(b) => b,
            Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => return Err(Error::invalid(
                "request payload size exceeds the server's limit (Pub/Sub allows at most 10 MB per publish request)",
            )
            .into()),
            Err(r) => return Err(Error::invalid(format!("could not read the request body: {}", r.body_text())).into()),
        };
    let text: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        &bytes
    };
    let v: Value = serde_json::from_slice(text)
        .map_err(|e| Error::invalid(format!("Invalid JSON payload received. {e}")))?;
    if !v.is_object() {
        return Err(Error::invalid(format!(
            "Invalid JSON payload received. The request body must be a JSON object, not {}",
            json_kind(&v)
        ))
        .into());
    }
    Ok(from_object("", v)?)
}

/// Parses an Update call's body, `{KEY: {...}, "updateMask": "a,b"}`: the
/// resource (a message, errors naming KEY) and the field mask. Other keys
/// are unknown fields.
pub(super) fn parse_update<T: DeserializeOwned + Default>(
    body: std::result::Result<Bytes, BytesRejection>,
    key: &str,
) -> std::result::Result<(T, Option<prost_types::FieldMask>), Fail> {
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase", deny_unknown_fields, default)]
    struct Rest {
        update_mask: Option<String>,
    }
    let mut fields: Map<String, Value> = parse_body(body)?;
    let resource = fields.remove(key).unwrap_or_default();
    let rest: Rest = from_object("", Value::Object(fields))?;
    Ok((from_object(key, resource)?, field_mask(rest.update_mask)))
}

/// Deserializes a message-typed value. Only objects (or null) are accepted:
/// serde would otherwise also read a struct from a JSON array.
pub(super) fn from_object<T: DeserializeOwned + Default>(
    at: &str,
    v: Value,
) -> pubrun_core::Result<T> {
    let at_msg = if at.is_empty() {
        String::new()
    } else {
        format!(" (at '{at}')")
    };
    match v {
        Value::Null => Ok(T::default()),
        Value::Object(fields) => {
            let CamelCased { fields, spelled } = camel_case_keys(fields).map_err(|e| {
                Error::invalid(format!("Invalid JSON payload received. {e}{at_msg}"))
            })?;
            serde_json::from_value(Value::Object(fields)).map_err(|e| {
            let e = e.to_string();
            match e.strip_prefix("unknown field `").and_then(|r| r.split_once('`')) {
                // Google's wording for a field the message does not have,
                // named as the request spelled it.
                Some((name, _)) => {
                    let name = spelled.get(name).map_or(name, String::as_str);
                    let at = if at.is_empty() { String::new() } else { format!(" at '{at}'") };
                    Error::invalid(format!(
                        "Invalid JSON payload received. Unknown name \"{name}\"{at}: Cannot find field."
                    ))
                }
                None => Error::invalid(format!("Invalid JSON payload received. {e}{at_msg}")),
            }
        })
        }
        other => Err(Error::invalid(format!(
            "Invalid JSON payload received. Expected an object{at_msg}, got {}",
            json_kind(&other)
        ))),
    }
}

/// An object with every key in its camelCase spelling.
struct CamelCased {
    fields: Map<String, Value>,
    /// camelCase key → the snake_case spelling the request used, for errors.
    spelled: HashMap<String, String>,
}

/// proto3 JSON parsers accept a field's original snake_case name as well as
/// its lowerCamelCase JSON name. The request types name only the latter, so
/// this renames every key that is exactly the snake_case spelling of a
/// camelCase name (`ack_ids`, not `ack_Ids`) before serde reads the object.
/// A field given in both spellings is a duplicate, as under one name twice.
fn camel_case_keys(fields: Map<String, Value>) -> std::result::Result<CamelCased, String> {
    let mut out = CamelCased {
        fields: Map::with_capacity(fields.len()),
        spelled: HashMap::new(),
    };
    let mut renamed = Vec::new();
    for (key, value) in fields {
        let camel = snake_to_camel(&key);
        if camel != key && camel_to_snake(&camel) == key {
            renamed.push((camel, key, value));
        } else {
            out.fields.insert(key, value);
        }
    }
    for (camel, key, value) in renamed {
        if out.fields.contains_key(&camel) {
            return Err(format!("duplicate field `{camel}`"));
        }
        out.fields.insert(camel.clone(), value);
        out.spelled.insert(camel, key);
    }
    Ok(out)
}

pub(super) fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Query parameters every Google API accepts and that do not bind to the request.
pub(super) const SYSTEM_PARAMS: &[&str] = &[
    "$.xgafv",
    "access_token",
    "alt",
    "callback",
    "fields",
    "key",
    "oauth_token",
    "prettyPrint",
    "quotaUser",
    "uploadType",
    "upload_protocol",
];

/// Parses the query string; `allowed` are the camelCase request fields that may
/// be bound from it (snake_case spellings are accepted too).
pub(super) fn parse_query(
    q: Option<String>,
    allowed: &[&str],
) -> std::result::Result<HashMap<String, String>, Fail> {
    let mut out = HashMap::new();
    for pair in q
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = (percent_decode(k)?, percent_decode(v)?);
        if SYSTEM_PARAMS.contains(&k.as_str()) {
            continue;
        }
        let camel = snake_to_camel(&k);
        if !allowed.contains(&camel.as_str()) {
            return Err(Error::invalid(format!(
                "Invalid JSON payload received. Unknown name \"{k}\": Cannot bind query parameter. Field '{k}' could not be found in request message."
            ))
            .into());
        }
        out.insert(camel, v);
    }
    Ok(out)
}

pub(super) fn percent_decode(s: &str) -> std::result::Result<String, Fail> {
    let bad = || {
        Fail::from(Error::invalid(format!(
            "invalid percent-encoding in query string: \"{s}\""
        )))
    };
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = b
                    .get(i + 1..i + 3)
                    .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .ok_or_else(bad)?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| bad())
}

pub(super) fn snake_to_camel(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut upper = false;
    for c in s.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.push(c.to_ascii_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

pub(super) fn camel_to_snake(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    for c in s.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// `pageSize` / `pageToken` from the query string.
pub(super) fn page_params(q: Option<String>) -> std::result::Result<(i32, String), Fail> {
    let mut q = parse_query(q, &["pageSize", "pageToken"])?;
    let size = match q.remove("pageSize") {
        None => 0,
        Some(s) => s.trim().parse::<i32>().map_err(|_| {
            Error::invalid(format!(
                "Invalid value at 'page_size' (TYPE_INT32), \"{s}\": expected an integer"
            ))
        })?,
    };
    Ok((size, q.remove("pageToken").unwrap_or_default()))
}

/// `null` means the field's default, as in proto3 JSON.
pub(super) fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(
    d: D,
) -> std::result::Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// An int32 field: a JSON number or a string holding one.
pub(super) fn int32(field: &str, v: &Option<Value>) -> pubrun_core::Result<i32> {
    let n = match v {
        None | Some(Value::Null) => return Ok(0),
        Some(Value::Number(n)) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 1e15)
                .map(|f| f as i64)
        }),
        Some(Value::String(s)) => s.trim().parse::<i64>().ok(),
        _ => None,
    };
    n.and_then(|n| i32::try_from(n).ok()).ok_or_else(|| {
        Error::invalid(format!(
            "Invalid value at '{field}' (TYPE_INT32), {}: expected an integer",
            v.as_ref().map(Value::to_string).unwrap_or_default()
        ))
    })
}

/// A `google.protobuf.Duration` field: `"3.5s"`.
pub(super) fn duration(
    field: &str,
    v: &Option<Value>,
) -> pubrun_core::Result<Option<prost_types::Duration>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => parse_duration(s).map(Some).ok_or_else(|| {
            Error::invalid(format!(
                "Invalid value at '{field}' (type.googleapis.com/google.protobuf.Duration), \"{s}\": expected seconds with up to 9 fractional digits and the suffix 's', e.g. \"604800s\""
            ))
        }),
        Some(other) => Err(Error::invalid(format!(
            "Invalid value at '{field}' (type.googleapis.com/google.protobuf.Duration), {other}: expected a string such as \"604800s\""
        ))),
    }
}

pub(super) fn parse_duration(s: &str) -> Option<prost_types::Duration> {
    let body = s.strip_suffix('s')?;
    let (neg, body) = match body.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, body),
    };
    let (secs, frac) = match body.split_once('.') {
        Some((a, b)) if !b.is_empty() => (a, b),
        Some(_) => return None,
        None => (body, ""),
    };
    let digits = |x: &str| x.bytes().all(|b| b.is_ascii_digit());
    if secs.is_empty() || !digits(secs) || !digits(frac) || frac.len() > 9 {
        return None;
    }
    let seconds: i64 = secs.parse().ok().filter(|s| *s <= 315_576_000_000)?;
    let nanos: i32 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<9}").parse().ok()?
    };
    Some(if neg {
        prost_types::Duration {
            seconds: -seconds,
            nanos: -nanos,
        }
    } else {
        prost_types::Duration { seconds, nanos }
    })
}

/// Proto3 JSON: 0, 3, 6 or 9 fractional digits and the suffix `s`.
pub(super) fn format_duration(d: &prost_types::Duration) -> String {
    let sign = if d.seconds < 0 || d.nanos < 0 {
        "-"
    } else {
        ""
    };
    format!(
        "{sign}{}{}s",
        d.seconds.unsigned_abs(),
        fraction(d.nanos.unsigned_abs())
    )
}

#[allow(clippy::manual_is_multiple_of)] // u32::is_multiple_of needs Rust 1.87; MSRV is 1.85
pub(super) fn fraction(nanos: u32) -> String {
    if nanos == 0 {
        String::new()
    } else if nanos % 1_000_000 == 0 {
        format!(".{:03}", nanos / 1_000_000)
    } else if nanos % 1_000 == 0 {
        format!(".{:06}", nanos / 1_000)
    } else {
        format!(".{nanos:09}")
    }
}

/// A `google.protobuf.Timestamp` field: RFC 3339.
pub(super) fn timestamp(
    field: &str,
    v: &Option<Value>,
) -> pubrun_core::Result<Option<prost_types::Timestamp>> {
    let bad = |shown: String| {
        Error::invalid(format!(
            "Invalid value at '{field}' (type.googleapis.com/google.protobuf.Timestamp), {shown}: expected RFC 3339, e.g. \"2024-01-02T03:04:05.123Z\""
        ))
    };
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => {
            let t = chrono::DateTime::parse_from_rfc3339(s).map_err(|_| bad(format!("\"{s}\"")))?;
            Ok(Some(prost_types::Timestamp {
                seconds: t.timestamp(),
                nanos: t.timestamp_subsec_nanos() as i32,
            }))
        }
        Some(other) => Err(bad(other.to_string())),
    }
}

/// Proto3 JSON: Z-normalized RFC 3339 with 0, 3, 6 or 9 fractional digits.
pub(super) fn format_timestamp(t: &prost_types::Timestamp) -> String {
    let secs = t.seconds + i64::from(t.nanos.div_euclid(1_000_000_000));
    let nanos = t.nanos.rem_euclid(1_000_000_000) as u32;
    match chrono::DateTime::<chrono::Utc>::from_timestamp(secs, 0) {
        Some(dt) => format!("{}{}Z", dt.format("%Y-%m-%dT%H:%M:%S"), fraction(nanos)),
        None => "1970-01-01T00:00:00Z".to_string(),
    }
}

/// Decodes `bytes` fields: standard or URL-safe alphabet, padded or not.
pub(super) fn decode_base64(s: &str) -> std::result::Result<Bytes, base64::DecodeError> {
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let normalized: String = s
        .chars()
        .map(|c| match c {
            '-' => '+',
            '_' => '/',
            c => c,
        })
        .collect();
    LENIENT.decode(normalized).map(Bytes::from)
}

/// Output-only or unsupported message fields: present (non-null) means set.
pub(super) fn present<T: Default>(v: &Option<Value>) -> Option<T> {
    v.as_ref().filter(|v| !v.is_null()).map(|_| T::default())
}

/// A repeated field of unsupported messages: each element kept as a default.
pub(super) fn present_each<T: Default>(v: &[Value]) -> Vec<T> {
    v.iter().map(|_| T::default()).collect()
}

/// A nested message field, parsed with its own unknown-field checks.
pub(super) fn nested<T: DeserializeOwned + Default>(
    at: &str,
    v: Option<Value>,
) -> pubrun_core::Result<Option<T>> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(v) => from_object(at, v).map(Some),
    }
}

/// An enum field: its value name (`from_name` is the enum's
/// `from_str_name`) or its number.
pub(super) fn enum_i32<E: Into<i32>>(
    field: &str,
    v: &Option<Value>,
    from_name: impl Fn(&str) -> Option<E>,
) -> pubrun_core::Result<i32> {
    match v {
        None | Some(Value::Null) => Ok(0),
        Some(Value::String(s)) => from_name(s).map(Into::into).ok_or_else(|| {
            Error::invalid(format!(
                "Invalid value at '{field}', \"{s}\": not a valid enum value name"
            ))
        }),
        Some(Value::Number(n)) => n
            .as_i64()
            .and_then(|n| i32::try_from(n).ok())
            .ok_or_else(|| {
                Error::invalid(format!(
                    "Invalid value at '{field}', {n}: not a valid enum value"
                ))
            }),
        Some(other) => Err(Error::invalid(format!(
            "Invalid value at '{field}', {other}: not a valid enum value"
        ))),
    }
}

/// `updateMask` is a comma-separated string of camelCase (or snake_case) paths.
pub(super) fn field_mask(mask: Option<String>) -> Option<prost_types::FieldMask> {
    mask.map(|m| prost_types::FieldMask {
        paths: m
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| {
                p.split('.')
                    .map(camel_to_snake)
                    .collect::<Vec<_>>()
                    .join(".")
            })
            .collect(),
    })
}
