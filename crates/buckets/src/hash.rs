//! MD5 and CRC32C as Cloud Storage reports them: base64 of the digest bytes
//! (CRC32C big-endian), and the checks of client-supplied values.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use md5::{Digest, Md5};

use crate::error::{GcsError, GcsResult};

/// Running MD5 + CRC32C over bytes written in order.
#[derive(Clone, Default)]
pub struct Hasher {
    md5: Md5,
    crc: u32,
    len: u64,
}

impl Hasher {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn update(&mut self, data: &[u8]) {
        self.md5.update(data);
        self.crc = crc32c::crc32c_append(self.crc, data);
        self.len += data.len() as u64;
    }
    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn finish(self) -> Digests {
        Digests {
            md5: Some(self.md5.finalize().into()),
            crc32c: self.crc,
            size: self.len,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digests {
    /// `None` for composite objects, as in Google Cloud Storage.
    pub md5: Option<[u8; 16]>,
    pub crc32c: u32,
    pub size: u64,
}

pub fn md5_b64(md5: &[u8; 16]) -> String {
    B64.encode(md5)
}

pub fn crc32c_b64(crc: u32) -> String {
    B64.encode(crc.to_be_bytes())
}

/// Checksums a client asserted for the data it sends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expected {
    pub md5: Option<String>,
    pub crc32c: Option<String>,
}

impl Expected {
    /// Merges the `x-goog-hash` header values (`crc32c=...,md5=...`, possibly
    /// repeated) into the expectations.
    pub fn add_goog_hash_header(&mut self, value: &str) -> GcsResult<()> {
        for part in value.split(',') {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let (k, v) = part.split_once('=').ok_or_else(|| {
                GcsError::invalid(format!("Invalid x-goog-hash header value '{part}': expected crc32c=BASE64 or md5=BASE64"))
            })?;
            match k.trim().to_ascii_lowercase().as_str() {
                "md5" => self.md5 = Some(v.trim().to_string()),
                "crc32c" => self.crc32c = Some(v.trim().to_string()),
                other => {
                    return Err(GcsError::invalid(format!(
                    "Invalid x-goog-hash header: unknown hash type '{other}' (use crc32c or md5)"
                )))
                }
            }
        }
        Ok(())
    }

    /// Checks the format of the asserted values before any data is stored.
    pub fn validate_format(&self) -> GcsResult<()> {
        let base64_of = |v: &str, len: usize| B64.decode(v).is_ok_and(|b| b.len() == len);
        if let Some(m) = self.md5.as_deref().filter(|m| !base64_of(m, 16)) {
            return Err(GcsError::invalid(format!(
                "Invalid MD5 hash '{m}': expected base64 of 16 bytes"
            )));
        }
        if let Some(c) = self.crc32c.as_deref().filter(|c| !base64_of(c, 4)) {
            return Err(GcsError::invalid(format!(
                "Invalid CRC32C checksum '{c}': expected base64 of 4 big-endian bytes"
            )));
        }
        Ok(())
    }

    /// 400 when a computed digest differs from the asserted one.
    pub fn verify(&self, d: &Digests) -> GcsResult<()> {
        if let Some(m) = &self.md5 {
            let actual = d.md5.map(|m| md5_b64(&m)).unwrap_or_default();
            if *m != actual {
                return Err(GcsError::bad_request(format!(
                    "Provided MD5 hash \"{m}\" doesn't match calculated MD5 hash \"{actual}\"."
                )));
            }
        }
        if let Some(c) = &self.crc32c {
            let actual = crc32c_b64(d.crc32c);
            if *c != actual {
                return Err(GcsError::bad_request(format!(
                    "Provided CRC32C \"{c}\" doesn't match calculated CRC32C \"{actual}\"."
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_match_google_examples() {
        let mut h = Hasher::new();
        h.update(b"hello ");
        h.update(b"world");
        let d = h.finish();
        // `gsutil hash` of "hello world".
        assert_eq!(md5_b64(&d.md5.unwrap()), "XrY7u+Ae7tCTyyK7j1rNww==");
        assert_eq!(crc32c_b64(d.crc32c), "yZRlqg==");
        assert_eq!(d.size, 11);
    }

    #[test]
    fn goog_hash_header() {
        let mut e = Expected::default();
        e.add_goog_hash_header("crc32c=yZRlqg==, md5=XrY7u+Ae7tCTyyK7j1rNww==")
            .unwrap();
        e.validate_format().unwrap();
        let mut h = Hasher::new();
        h.update(b"hello world");
        e.verify(&h.clone().finish()).unwrap();
        let mut h2 = Hasher::new();
        h2.update(b"hello world!");
        assert_eq!(e.verify(&h2.finish()).unwrap_err().status, 400);
        assert!(Expected::default()
            .add_goog_hash_header("sha1=abc")
            .is_err());
        let bad = Expected {
            md5: Some("short".into()),
            crc32c: None,
        };
        assert!(bad.validate_format().is_err());
    }
}
