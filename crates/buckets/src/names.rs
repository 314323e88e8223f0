//! Bucket and object names, with the rules Google documents for them.
//! Pure functions; names are never used to build file paths.

use crate::error::{GcsError, GcsResult};

/// Bucket names: 3–63 characters (up to 222 when they contain dots, each
/// dot-separated part at most 63), lowercase letters, digits, `-`, `_` and
/// `.`; starting and ending with a letter or digit; not an IP address; not
/// starting with `goog` nor containing `google`.
pub fn validate_bucket_name(name: &str) -> GcsResult<()> {
    let bad = |why: &str| {
        Err(GcsError::invalid(format!(
            "Invalid bucket name: '{}': {why}",
            shorten(name)
        )))
    };
    let max = if name.contains('.') { 222 } else { 63 };
    if name.len() < 3 || name.len() > max {
        return bad(&format!(
            "bucket names must be 3 to 63 characters long (up to 222 with dots), not {}",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(*c)))
    {
        return bad(&format!(
            "character {c:?} is not allowed; use lowercase letters, digits, '-', '_' and '.'"
        ));
    }
    let b = name.as_bytes();
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return bad("bucket names must start and end with a letter or digit");
    }
    if name.split('.').any(|p| p.is_empty() || p.len() > 63) {
        return bad("each dot-separated part must be 1 to 63 characters long");
    }
    if name.split('.').count() == 4
        && name
            .split('.')
            .all(|p| !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit()))
    {
        return bad("bucket names cannot be IP addresses in dotted-decimal notation");
    }
    if name.starts_with("goog") {
        return bad("bucket names cannot begin with the \"goog\" prefix");
    }
    if name.contains("google") || name.contains("g00gle") {
        return bad("bucket names cannot contain \"google\" or close misspellings");
    }
    Ok(())
}

/// Object names: 1–1024 bytes of UTF-8 (guaranteed by `&str`), no carriage
/// return or line feed, not `.` or `..`, not under `.well-known/acme-challenge/`.
/// Anything else — `../x`, `/abs`, NUL, unicode — is a valid, opaque name.
pub fn validate_object_name(name: &str) -> GcsResult<()> {
    if name.is_empty() {
        return Err(GcsError::required(
            "Required object name: the object name must not be empty",
        ));
    }
    if name.len() > 1024 {
        return Err(GcsError::invalid(format!(
            "The object name is {} bytes long when UTF-8 encoded; the limit is 1024 bytes",
            name.len()
        )));
    }
    if name.contains('\r') || name.contains('\n') {
        return Err(GcsError::invalid(format!(
            "Object name '{}' contains a carriage return or line feed, which is not allowed",
            shorten(&name.escape_debug().to_string())
        )));
    }
    if name == "." || name == ".." {
        return Err(GcsError::invalid(format!(
            "Object name '{name}' is not allowed"
        )));
    }
    if name.starts_with(".well-known/acme-challenge/") {
        return Err(GcsError::invalid(
            "Object names cannot start with '.well-known/acme-challenge/'",
        ));
    }
    Ok(())
}

pub(crate) fn shorten(s: &str) -> String {
    if s.len() <= 100 {
        return s.to_string();
    }
    let mut end = 100;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_names() {
        for ok in [
            "abc",
            "my-bucket_1",
            "a.b.c",
            "0ab",
            &"a".repeat(63),
            "ab.cd-ef",
        ] {
            validate_bucket_name(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "ab",
            "Abc",
            "-abc",
            "abc-",
            "ab c",
            "a/b",
            &"a".repeat(64),
            "192.168.5.4",
            "goog-x",
            "my-google-b",
            "a..b",
            "ab_",
            "äbc",
        ] {
            assert!(
                validate_bucket_name(bad).is_err(),
                "{bad} should be rejected"
            );
        }
        // Long dotted names are allowed when each part is short enough.
        let dotted = format!("{}.{}.{}", "a".repeat(63), "b".repeat(63), "c".repeat(63));
        validate_bucket_name(&dotted).unwrap();
    }

    #[test]
    fn object_names() {
        for ok in [
            "a",
            "../../etc/passwd",
            "/abs/path",
            "nul\0byte",
            "ünï/cødé",
            "a//b",
            &"x".repeat(1024),
            "...",
        ] {
            validate_object_name(ok).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        }
        for bad in [
            "",
            "a\nb",
            "a\rb",
            ".",
            "..",
            &"x".repeat(1025),
            ".well-known/acme-challenge/x",
        ] {
            assert!(
                validate_object_name(bad).is_err(),
                "{bad:?} should be rejected"
            );
        }
        // 1024 bytes counts bytes, not characters.
        assert!(validate_object_name(&"é".repeat(513)).is_err());
        validate_object_name(&"é".repeat(512)).unwrap();
    }
}
