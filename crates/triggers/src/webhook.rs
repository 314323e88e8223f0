//! Webhooks, without I/O: the spec, its validation, signature and bearer
//! checks, and how a request becomes message attributes.
//!
//! # Authentication
//!
//! - `secret_env`: the hook requires GitHub's signature scheme: header
//!   `X-Hub-Signature-256: sha256=HEX` where HEX is the lowercase or
//!   uppercase hex HMAC-SHA256 of the raw body keyed with the secret.
//! - `bearer_secret_env`: the hook requires `Authorization: Bearer SECRET`.
//! - Both: either one is enough.
//! - Neither: the hook is open to anyone who can reach the port.
//!
//! The secrets are read from the server's environment when the hooks are
//! set; a named variable that is unset or empty is an error, so a hook meant
//! to be protected never silently becomes open. Comparisons are constant
//! time.
//!
//! # Attributes
//!
//! Every message carries `webhook = NAME`. With `query_as_attributes`, each
//! query parameter becomes an attribute (a repeated key's values are joined
//! with `,`). Each header named in `headers_as_attributes` (case-insensitive)
//! becomes an attribute under its lowercased name, repeated values joined
//! with `,`; a header that is absent sets nothing. On a name clash headers win
//! over query parameters, and `webhook` wins over both.

use std::collections::BTreeMap;

use hmac::{Hmac, Mac};
use pubrun_core::limits::MAX_MESSAGE_BYTES;
use pubrun_core::{Error, Result, TopicName};
use sha2::Sha256;

pub use pubrun_core::trigger::{WebhookSpec, DEFAULT_MAX_BODY_BYTES};

use crate::schedule::validate_trigger_name;
use crate::Validate;

/// The attribute naming the hook.
pub const ATTR_WEBHOOK: &str = "webhook";

/// GitHub's signature header.
pub const SIGNATURE_HEADER: &str = "x-hub-signature-256";

impl Validate for WebhookSpec {
    type Valid = TopicName;

    /// Checks every field; errors name the webhook and the field.
    fn validate(&self) -> Result<TopicName> {
        let ctx = |m: String| Error::invalid(format!("webhook \"{}\": {m}", self.name));
        validate_trigger_name("webhook", &self.name)?;
        let topic =
            TopicName::parse(&self.topic).map_err(|e| ctx(format!("topic: {}", e.message)))?;
        for (key, var) in [
            ("secret_env", &self.secret_env),
            ("bearer_secret_env", &self.bearer_secret_env),
        ] {
            if let Some(v) = var {
                let ok = v
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                    && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !ok {
                    return Err(ctx(format!(
                        "{key}: \"{v}\" is not an environment variable name (letters, digits and '_', not starting with a digit); it names the variable that holds the secret, not the secret itself"
                    )));
                }
            }
        }
        for h in &self.headers_as_attributes {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                return Err(ctx(format!(
                    "headers_as_attributes: \"{h}\" is not a valid HTTP header name"
                )));
            }
            let lower = h.to_ascii_lowercase();
            if lower.starts_with("goog")
                || lower == ATTR_WEBHOOK
                || lower.len() > pubrun_core::limits::MAX_ATTRIBUTE_KEY_BYTES
            {
                return Err(ctx(format!(
                    "headers_as_attributes: \"{h}\" cannot be an attribute name"
                )));
            }
        }
        if self.max_body_bytes == 0 || self.max_body_bytes > MAX_MESSAGE_BYTES as u64 {
            return Err(ctx(format!(
                "max_body_bytes: {} is out of range; use 1 to {MAX_MESSAGE_BYTES} (10 MiB, the Pub/Sub message limit)",
                self.max_body_bytes
            )));
        }
        Ok(topic)
    }
}

/// A webhook ready to serve: validated, secrets resolved.
#[derive(Clone)]
pub struct Hook {
    pub spec: WebhookSpec,
    pub topic: TopicName,
    hmac_secret: Option<Vec<u8>>,
    bearer_secret: Option<Vec<u8>>,
    headers: Vec<String>,
    /// Set when a secret's variable is missing on this server (a definition
    /// loaded at start): the hook refuses every request, never opens up.
    unavailable: Option<String>,
}

impl std::fmt::Debug for Hook {
    // Never print secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hook")
            .field("spec", &self.spec)
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

/// Why a request was refused before publishing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    MissingSignature,
    BadSignature,
    MissingBearer,
    BadBearer,
    /// The hook's secret is not configured on this server.
    SecretUnavailable,
}

impl AuthError {
    pub fn message(&self) -> &'static str {
        match self {
            AuthError::MissingSignature => "missing X-Hub-Signature-256 header (expected \"sha256=\" followed by the hex HMAC-SHA256 of the body)",
            AuthError::BadSignature => "X-Hub-Signature-256 does not match the body",
            AuthError::MissingBearer => "missing Authorization: Bearer header",
            AuthError::BadBearer => "wrong bearer secret",
            AuthError::SecretUnavailable => "the webhook's secret is not set on the server",
        }
    }
}

impl Hook {
    /// Validates `spec` and reads its secrets through `env` (the server uses
    /// `std::env::var`).
    pub fn resolve(spec: WebhookSpec, env: &dyn Fn(&str) -> Option<String>) -> Result<Hook> {
        let topic = spec.validate()?;
        let read = |key: &str, var: &Option<String>| -> Result<Option<Vec<u8>>> {
            match var {
                None => Ok(None),
                Some(v) => match env(v) {
                    Some(s) if !s.is_empty() => Ok(Some(s.into_bytes())),
                    _ => Err(Error::precondition(format!(
                        "webhook \"{}\": {key}: environment variable {v} is not set (or empty) on the server; set it before starting pubrun",
                        spec.name
                    ))),
                },
            }
        };
        let hmac_secret = read("secret_env", &spec.secret_env)?;
        let bearer_secret = read("bearer_secret_env", &spec.bearer_secret_env)?;
        let headers = spec
            .headers_as_attributes
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect();
        Ok(Hook {
            spec,
            topic,
            hmac_secret,
            bearer_secret,
            headers,
            unavailable: None,
        })
    }

    /// As [`Hook::resolve`], but a missing secret variable gives a hook that
    /// refuses every request (see [`Hook::unavailable`]) instead of an error:
    /// for definitions loaded at start, so one unset variable does not keep
    /// the server from starting. Errors only for an invalid spec.
    pub fn resolve_or_unavailable(
        spec: WebhookSpec,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Hook> {
        match Hook::resolve(spec.clone(), env) {
            Ok(h) => Ok(h),
            Err(e) if e.code == pubrun_core::Code::FailedPrecondition => {
                let topic = spec.validate()?;
                Ok(Hook {
                    spec,
                    topic,
                    hmac_secret: None,
                    bearer_secret: None,
                    headers: Vec::new(),
                    unavailable: Some(e.message),
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Why the hook cannot serve (its secret is not set), if so.
    pub fn unavailable(&self) -> Option<&str> {
        self.unavailable.as_deref()
    }

    /// True when a bearer secret is configured and HMAC is not: the check can
    /// be done before the body is read.
    pub fn bearer_only(&self) -> bool {
        self.unavailable.is_none() && self.bearer_secret.is_some() && self.hmac_secret.is_none()
    }

    /// True when a bearer secret is configured.
    pub fn accepts_bearer(&self) -> bool {
        self.bearer_secret.is_some()
    }

    pub fn is_open(&self) -> bool {
        self.unavailable.is_none() && self.bearer_secret.is_none() && self.hmac_secret.is_none()
    }

    /// Checks the `Authorization` header against the bearer secret, if any.
    pub fn check_bearer(&self, authorization: Option<&[u8]>) -> Result<(), AuthError> {
        let Some(secret) = &self.bearer_secret else {
            return Err(AuthError::MissingBearer);
        };
        let token = authorization.and_then(|a| {
            let (scheme, rest) = split_scheme(a)?;
            scheme.eq_ignore_ascii_case(b"bearer").then_some(rest)
        });
        match token {
            None => Err(AuthError::MissingBearer),
            Some(t) if verify_bearer(secret, t) => Ok(()),
            Some(_) => Err(AuthError::BadBearer),
        }
    }

    /// Authenticates a request: either a valid bearer secret or a valid
    /// signature over `body`, among the methods configured.
    pub fn authenticate(
        &self,
        authorization: Option<&[u8]>,
        signature: Option<&[u8]>,
        body: &[u8],
    ) -> Result<(), AuthError> {
        if self.unavailable.is_some() {
            return Err(AuthError::SecretUnavailable);
        }
        if self.is_open() {
            return Ok(());
        }
        let mut err = None;
        if self.bearer_secret.is_some() {
            match self.check_bearer(authorization) {
                Ok(()) => return Ok(()),
                Err(e) => err = Some(e),
            }
        }
        if let Some(secret) = &self.hmac_secret {
            return match signature {
                None => Err(if authorization.is_some() {
                    err.unwrap_or(AuthError::MissingSignature)
                } else {
                    AuthError::MissingSignature
                }),
                Some(sig) if verify_github_signature(secret, body, sig) => Ok(()),
                Some(_) => Err(AuthError::BadSignature),
            };
        }
        Err(err.unwrap_or(AuthError::MissingBearer))
    }

    /// Attributes for a request (see the module docs).
    pub fn attributes<'a>(
        &self,
        headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
        query: Option<&str>,
    ) -> BTreeMap<String, String> {
        let mut attrs = BTreeMap::new();
        if self.spec.query_as_attributes {
            if let Some(q) = query {
                for (k, v) in parse_query(q) {
                    if k.is_empty() {
                        continue;
                    }
                    join_into(&mut attrs, k, v);
                }
            }
        }
        let mut from_headers: BTreeMap<String, String> = BTreeMap::new();
        for (name, value) in headers {
            let lower = name.to_ascii_lowercase();
            if self.headers.contains(&lower) {
                join_into(
                    &mut from_headers,
                    lower,
                    String::from_utf8_lossy(value).into_owned(),
                );
            }
        }
        attrs.extend(from_headers);
        attrs.insert(ATTR_WEBHOOK.into(), self.spec.name.clone());
        attrs
    }
}

fn join_into(map: &mut BTreeMap<String, String>, k: String, v: String) {
    map.entry(k)
        .and_modify(|old| {
            old.push(',');
            old.push_str(&v);
        })
        .or_insert(v);
}

fn split_scheme(value: &[u8]) -> Option<(&[u8], &[u8])> {
    let value = value.trim_ascii();
    let sp = value.iter().position(|b| *b == b' ')?;
    Some((&value[..sp], value[sp + 1..].trim_ascii()))
}

/// `sha256=HEX` for `body` under `secret`: what a sender puts in
/// `X-Hub-Signature-256`.
pub fn github_signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    let mut s = String::with_capacity(7 + 64);
    s.push_str("sha256=");
    for b in tag {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Checks GitHub's `X-Hub-Signature-256` value (`sha256=HEX`) in constant
/// time.
pub fn verify_github_signature(secret: &[u8], body: &[u8], header: &[u8]) -> bool {
    let header = header.trim_ascii();
    let Some(hex) = header.strip_prefix(b"sha256=") else {
        return false;
    };
    let Some(tag) = decode_hex(hex) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    mac.verify_slice(&tag).is_ok()
}

pub use pubrun_core::secret::verify_bearer;

fn decode_hex(s: &[u8]) -> Option<Vec<u8>> {
    if s.len() & 1 == 1 {
        return None;
    }
    let nib = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    s.chunks(2)
        .map(|p| Some(nib(p[0])? << 4 | nib(p[1])?))
        .collect()
}

/// `application/x-www-form-urlencoded` pairs, percent- and `+`-decoded;
/// a malformed escape stays as written and bad UTF-8 is replaced.
pub fn parse_query(q: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(q.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(k: &str) -> Option<String> {
        match k {
            "HOOK_SECRET" => Some("It's a Secret to Everybody".into()),
            "BEARER" => Some("tok-123".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    fn hook(f: impl FnOnce(&mut WebhookSpec)) -> Result<Hook> {
        let mut s = WebhookSpec::new("gh", "projects/demo/topics/imports");
        f(&mut s);
        Hook::resolve(s, &env)
    }

    #[test]
    fn github_documented_example() {
        // The example from GitHub's "Validating webhook deliveries" page.
        let sig = github_signature(b"It's a Secret to Everybody", b"Hello, World!");
        assert_eq!(
            sig,
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        );
        assert!(verify_github_signature(
            b"It's a Secret to Everybody",
            b"Hello, World!",
            sig.as_bytes()
        ));
        assert!(verify_github_signature(
            b"It's a Secret to Everybody",
            b"Hello, World!",
            sig.to_uppercase().replace("SHA256", "sha256").as_bytes()
        ));
        assert!(!verify_github_signature(
            b"It's a Secret to Everybody",
            b"Hello, World?",
            sig.as_bytes()
        ));
        assert!(!verify_github_signature(
            b"wrong",
            b"Hello, World!",
            sig.as_bytes()
        ));
        assert!(!verify_github_signature(
            b"It's a Secret to Everybody",
            b"Hello, World!",
            &sig.as_bytes()[7..]
        ));
        assert!(!verify_github_signature(
            b"It's a Secret to Everybody",
            b"Hello, World!",
            b"sha256=zz"
        ));
        assert!(!verify_github_signature(
            b"It's a Secret to Everybody",
            b"Hello, World!",
            b"sha1=abc"
        ));
    }

    #[test]
    fn authenticate_modes() {
        let h = hook(|s| s.secret_env = Some("HOOK_SECRET".into())).unwrap();
        let body = b"{}";
        let sig = github_signature(b"It's a Secret to Everybody", body);
        assert_eq!(h.authenticate(None, Some(sig.as_bytes()), body), Ok(()));
        assert_eq!(
            h.authenticate(None, None, body),
            Err(AuthError::MissingSignature)
        );
        assert_eq!(
            h.authenticate(None, Some(b"sha256=00"), body),
            Err(AuthError::BadSignature)
        );

        let h = hook(|s| s.bearer_secret_env = Some("BEARER".into())).unwrap();
        assert!(h.bearer_only());
        assert_eq!(h.authenticate(Some(b"Bearer tok-123"), None, body), Ok(()));
        assert_eq!(
            h.authenticate(Some(b"bearer  tok-123 "), None, body),
            Ok(())
        );
        assert_eq!(
            h.authenticate(Some(b"Bearer tok-124"), None, body),
            Err(AuthError::BadBearer)
        );
        assert_eq!(
            h.authenticate(Some(b"Basic tok-123"), None, body),
            Err(AuthError::MissingBearer)
        );
        assert_eq!(
            h.authenticate(None, None, body),
            Err(AuthError::MissingBearer)
        );

        let h = hook(|s| {
            s.secret_env = Some("HOOK_SECRET".into());
            s.bearer_secret_env = Some("BEARER".into());
        })
        .unwrap();
        assert_eq!(h.authenticate(Some(b"Bearer tok-123"), None, body), Ok(()));
        assert_eq!(h.authenticate(None, Some(sig.as_bytes()), body), Ok(()));
        assert!(h
            .authenticate(Some(b"Bearer nope"), Some(b"sha256=00"), body)
            .is_err());
        assert!(h.authenticate(None, None, body).is_err());

        let open = hook(|_| {}).unwrap();
        assert!(open.is_open());
        assert_eq!(open.authenticate(None, None, body), Ok(()));
    }

    #[test]
    fn missing_secret_env_is_an_error() {
        let e = hook(|s| s.secret_env = Some("NOT_SET_ANYWHERE".into())).unwrap_err();
        assert!(
            e.message.contains("NOT_SET_ANYWHERE") && e.message.contains("secret_env"),
            "{}",
            e.message
        );
        assert!(hook(|s| s.bearer_secret_env = Some("EMPTY".into())).is_err());
        let e = hook(|s| s.secret_env = Some("my secret value".into())).unwrap_err();
        assert!(
            e.message.contains("not an environment variable name"),
            "{}",
            e.message
        );
    }

    #[test]
    fn validation() {
        assert!(hook(|s| s.name = "a/b".into())
            .unwrap_err()
            .message
            .contains("invalid webhook name"));
        assert!(hook(|s| s.topic = "imports".into())
            .unwrap_err()
            .message
            .contains("topic"));
        assert!(hook(|s| s.max_body_bytes = 0)
            .unwrap_err()
            .message
            .contains("max_body_bytes"));
        assert!(hook(|s| s.max_body_bytes = 11 * 1024 * 1024).is_err());
        assert!(
            hook(|s| s.headers_as_attributes = vec!["bad header".into()])
                .unwrap_err()
                .message
                .contains("bad header")
        );
        assert!(hook(|s| s.headers_as_attributes = vec!["goog-x".into()]).is_err());
        assert!(hook(|s| s.headers_as_attributes = vec!["X-GitHub-Event".into()]).is_ok());
    }

    #[test]
    fn attributes_from_headers_and_query() {
        let h = hook(|s| {
            s.headers_as_attributes =
                vec!["X-GitHub-Event".into(), "x-multi".into(), "x-absent".into()];
            s.query_as_attributes = true;
        })
        .unwrap();
        let headers: Vec<(&str, &[u8])> = vec![
            ("x-github-event", b"push"),
            ("X-Multi", b"a"),
            ("x-multi", b"b"),
            ("content-type", b"application/json"),
        ];
        let a = h.attributes(
            headers,
            Some("env=prod&tag=a+b&tag=c%2Fd&x-github-event=q&webhook=evil&&=x"),
        );
        let want: BTreeMap<String, String> = [
            ("env", "prod"),
            ("tag", "a b,c/d"),
            ("x-github-event", "push"),
            ("x-multi", "a,b"),
            ("webhook", "gh"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(a, want);

        let no_query = hook(|_| {}).unwrap();
        let a = no_query.attributes(Vec::<(&str, &[u8])>::new(), Some("env=prod"));
        assert_eq!(a.len(), 1);
    }

    #[test]
    fn percent_decoding() {
        let q = parse_query("a%20b%zz%=%41%4&&k=caf%C3%A9+x&flag");
        let want = [("a b%zz%", "A%4"), ("k", "café x"), ("flag", "")];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(q, want);
    }
}
