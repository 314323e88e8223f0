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

#[cfg(test)]
mod tests {
    use super::verify_bearer;

    #[test]
    fn only_the_same_bytes_pass() {
        assert!(verify_bearer(b"s3cret", b"s3cret"));
        assert!(!verify_bearer(b"s3cret", b"s3cre"));
        assert!(!verify_bearer(b"s3cret", b"s3cret "));
        assert!(!verify_bearer(b"s3cret", b""));
    }
}
