//! Comparing secrets presented by callers (bearer tokens, pool tokens).

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Compares a presented bearer token with the secret in constant time
/// (hashing both first, so neither length nor content leaks).
pub fn verify_bearer(secret: &[u8], presented: &[u8]) -> bool {
    let a = Sha256::digest(secret);
    let b = Sha256::digest(presented);
    a.ct_eq(&b).into()
}

/// The token of an `Authorization` header value in the Bearer scheme.
/// RFC 6750 (via RFC 7235) makes the scheme name case-insensitive, so
/// `bearer`, `Bearer` and `BEARER` all count; one or more spaces separate it
/// from the token. `None` for another scheme or an empty token.
pub fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, rest) = authorization.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = rest.trim_matches(' ');
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::{bearer_token, verify_bearer};

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc"), Some("abc"));
        assert_eq!(bearer_token("BEARER  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Bearerabc"), None);
        assert_eq!(bearer_token("abc"), None);
    }

    #[test]
    fn only_the_same_bytes_pass() {
        assert!(verify_bearer(b"s3cret", b"s3cret"));
        assert!(!verify_bearer(b"s3cret", b"s3cre"));
        assert!(!verify_bearer(b"s3cret", b"s3cret "));
        assert!(!verify_bearer(b"s3cret", b""));
    }
}
