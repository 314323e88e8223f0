//! Access tokens as Google's client libraries find them (Application
//! Default Credentials): a service-account key (RS256 JWT assertion
//! exchanged at the key's own `token_uri`, RFC 7523), gcloud's
//! `authorized_user` file (refresh-token grant), the metadata server, or a
//! token in an environment variable. Tokens are cached and refreshed before
//! they expire; neither they nor keys are ever logged or `Debug`-printed.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pubrun_core::connection::CredentialsSpec;
use serde::Deserialize;

use crate::error::{ConnError, ErrorKind};

/// The scope pubrun asks for: Pub/Sub, Storage and Compute are all in it.
pub const SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
/// Where `authorized_user` files are refreshed when they name no endpoint.
pub const GOOGLE_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Lifetime asked for in an assertion (Google's maximum).
const ASSERTION_LIFETIME: u64 = 3600;

/// An access token. Its `Debug` and `Display` never show the value.
#[derive(Clone)]
pub struct AccessToken(String);

impl AccessToken {
    pub fn secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AccessToken(***)")
    }
}

#[derive(Deserialize)]
struct ServiceAccountKey {
    client_email: String,
    private_key: String,
    #[serde(default)]
    private_key_id: String,
    #[serde(default)]
    token_uri: String,
}

#[derive(Deserialize)]
struct AuthorizedUser {
    client_id: String,
    client_secret: String,
    refresh_token: String,
    #[serde(default)]
    token_uri: String,
}

enum Source {
    ServiceAccount {
        path: PathBuf,
        email: String,
        key_id: String,
        key: jsonwebtoken::EncodingKey,
        token_uri: String,
    },
    AuthorizedUser {
        path: PathBuf,
        user: AuthorizedUser,
        token_uri: String,
    },
    Metadata {
        base: String,
    },
    Env(String),
}

struct Cached {
    token: AccessToken,
    refresh_at: Instant,
}

/// One connection's token source and cache.
pub struct TokenSource {
    connection: String,
    source: Source,
    http: reqwest::Client,
    cache: tokio::sync::Mutex<Option<Cached>>,
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSource")
            .field("connection", &self.connection)
            .field("source", &self.describe())
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

#[derive(serde::Serialize)]
struct Claims<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// When to fetch a new token: well before expiry (a quarter of its life,
/// at most five minutes early), so no request goes out with a token that
/// expires on the way.
fn refresh_after(lifetime: Duration) -> Duration {
    let early = (lifetime / 4).min(Duration::from_secs(300));
    lifetime.saturating_sub(early)
}

impl TokenSource {
    pub fn new(
        connection: &str,
        spec: &CredentialsSpec,
        http: reqwest::Client,
    ) -> Result<TokenSource, ConnError> {
        let source = match spec {
            CredentialsSpec::File { path } => load_file(connection, Path::new(path))?,
            CredentialsSpec::TokenEnv { env } => Source::Env(env.clone()),
            CredentialsSpec::Metadata => Source::Metadata {
                base: metadata_base(),
            },
            CredentialsSpec::Adc => adc(connection)?,
        };
        Ok(TokenSource {
            connection: connection.to_string(),
            source,
            http,
            cache: tokio::sync::Mutex::new(None),
        })
    }

    /// Where tokens come from, for messages (never a secret).
    pub fn describe(&self) -> String {
        match &self.source {
            Source::ServiceAccount { path, email, .. } => {
                format!("service account {email} (key file {})", path.display())
            }
            Source::AuthorizedUser { path, .. } => {
                format!("authorized_user file {}", path.display())
            }
            Source::Metadata { base } => format!("metadata server {base}"),
            Source::Env(v) => format!("access token from ${v}"),
        }
    }

    fn err(&self, kind: ErrorKind, message: impl Into<String>) -> ConnError {
        ConnError::new(&self.connection, self.describe(), kind, message)
    }

    /// A valid access token: the cached one, or a new one.
    pub async fn token(&self) -> Result<AccessToken, ConnError> {
        if let Source::Env(var) = &self.source {
            return match std::env::var(var) {
                Ok(v) if !v.is_empty() => Ok(AccessToken(v)),
                _ => Err(self.err(
                    ErrorKind::Credentials,
                    format!("the server's environment variable {var} is not set"),
                )),
            };
        }
        let mut cache = self.cache.lock().await;
        if let Some(c) = cache.as_ref() {
            if Instant::now() < c.refresh_at {
                return Ok(c.token.clone());
            }
        }
        let (token, lifetime) = self.fetch().await?;
        *cache = Some(Cached {
            token: token.clone(),
            refresh_at: Instant::now() + refresh_after(lifetime),
        });
        tracing::debug!(
            connection = self.connection,
            lifetime_s = lifetime.as_secs(),
            "access token refreshed"
        );
        Ok(token)
    }

    /// Forgets the cached token (after a 401: it may have been revoked).
    pub async fn invalidate(&self) {
        *self.cache.lock().await = None;
    }

    async fn fetch(&self) -> Result<(AccessToken, Duration), ConnError> {
        let req = match &self.source {
            Source::ServiceAccount {
                email,
                key_id,
                key,
                token_uri,
                ..
            } => {
                let iat = unix_now();
                let claims = Claims {
                    iss: email,
                    scope: SCOPE,
                    aud: token_uri,
                    iat,
                    exp: iat + ASSERTION_LIFETIME,
                };
                let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
                if !key_id.is_empty() {
                    header.kid = Some(key_id.clone());
                }
                let assertion = jsonwebtoken::encode(&header, &claims, key).map_err(|e| {
                    self.err(
                        ErrorKind::Credentials,
                        format!("cannot sign the assertion: {e}"),
                    )
                })?;
                self.http
                    .post(token_uri)
                    .form(&[("grant_type", JWT_BEARER), ("assertion", &assertion)])
            }
            Source::AuthorizedUser {
                user, token_uri, ..
            } => self.http.post(token_uri).form(&[
                ("grant_type", "refresh_token"),
                ("client_id", &user.client_id),
                ("client_secret", &user.client_secret),
                ("refresh_token", &user.refresh_token),
            ]),
            Source::Metadata { base } => self
                .http
                .get(format!(
                    "{base}/computeMetadata/v1/instance/service-accounts/default/token"
                ))
                .header("Metadata-Flavor", "Google"),
            Source::Env(_) => unreachable!("handled in token()"),
        };
        let resp = req
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .map_err(|e| {
                self.err(
                    ErrorKind::Unavailable,
                    format!(
                        "token endpoint unreachable: {}",
                        ConnError::from_reqwest(&self.connection, "", &e).message
                    ),
                )
            })?;
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            // The token endpoint's error body (`invalid_grant`, …) says
            // why; it holds no token.
            let kind = if status.is_server_error() || status.as_u16() == 429 {
                ErrorKind::Unavailable
            } else {
                ErrorKind::Credentials
            };
            let mut text: String = body.chars().take(300).collect();
            if text.is_empty() {
                text = "(no body)".into();
            }
            return Err(self.err(kind, format!("token endpoint answered {status}: {text}")));
        }
        let t: TokenResponse = serde_json::from_str(&body).map_err(|e| {
            self.err(
                ErrorKind::Credentials,
                format!("token endpoint answered something that is not a token response: {e}"),
            )
        })?;
        Ok((
            AccessToken(t.access_token),
            Duration::from_secs(t.expires_in.unwrap_or(3600).max(1)),
        ))
    }
}

fn metadata_base() -> String {
    match std::env::var("GCE_METADATA_HOST") {
        Ok(h) if !h.is_empty() => {
            if h.starts_with("http://") || h.starts_with("https://") {
                h.trim_end_matches('/').to_string()
            } else {
                format!("http://{h}")
            }
        }
        _ => "http://metadata.google.internal".to_string(),
    }
}

/// Application Default Credentials, in Google's order.
fn adc(connection: &str) -> Result<Source, ConnError> {
    if let Ok(p) = std::env::var("GOOGLE_APPLICATION_CREDENTIALS") {
        if !p.is_empty() {
            return load_file(connection, Path::new(&p));
        }
    }
    if let Ok(home) = std::env::var("HOME") {
        let p = Path::new(&home).join(".config/gcloud/application_default_credentials.json");
        if p.is_file() {
            return load_file(connection, &p);
        }
    }
    Ok(Source::Metadata {
        base: metadata_base(),
    })
}

fn load_file(connection: &str, path: &Path) -> Result<Source, ConnError> {
    let err = |m: String| {
        ConnError::new(
            connection,
            format!("credentials file {}", path.display()),
            ErrorKind::Credentials,
            m,
        )
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read it: {e}")))?;
    #[derive(Deserialize)]
    struct Kind {
        #[serde(rename = "type")]
        kind: Option<String>,
    }
    let k: Kind =
        serde_json::from_str(&text).map_err(|e| err(format!("not a JSON key file ({e})")))?;
    match k.kind.as_deref() {
        Some("service_account") => {
            let key: ServiceAccountKey = serde_json::from_str(&text)
                .map_err(|e| err(format!("service_account key: {e}")))?;
            let encoding = jsonwebtoken::EncodingKey::from_rsa_pem(key.private_key.as_bytes())
                .map_err(|e| err(format!("private_key is not an RSA key in PEM: {e}")))?;
            let token_uri = if key.token_uri.is_empty() {
                GOOGLE_TOKEN_URI.to_string()
            } else {
                key.token_uri
            };
            Ok(Source::ServiceAccount {
                path: path.to_path_buf(),
                email: key.client_email,
                key_id: key.private_key_id,
                key: encoding,
                token_uri,
            })
        }
        Some("authorized_user") => {
            let user: AuthorizedUser = serde_json::from_str(&text)
                .map_err(|e| err(format!("authorized_user file: {e}")))?;
            let token_uri = if user.token_uri.is_empty() {
                GOOGLE_TOKEN_URI.to_string()
            } else {
                user.token_uri.clone()
            };
            Ok(Source::AuthorizedUser {
                path: path.to_path_buf(),
                user,
                token_uri,
            })
        }
        Some(other) => Err(err(format!(
            "credentials of type \"{other}\" are not supported (service_account, authorized_user)"
        ))),
        None => Err(err(
            "no \"type\" field; expected a service_account or authorized_user file".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_is_early() {
        assert_eq!(
            refresh_after(Duration::from_secs(3600)),
            Duration::from_secs(3300)
        );
        assert_eq!(
            refresh_after(Duration::from_secs(4)),
            Duration::from_secs(3)
        );
    }

    #[test]
    fn token_debug_hides_the_value() {
        let t = AccessToken("ya29.secret".into());
        assert!(!format!("{t:?}").contains("secret"));
    }

    #[test]
    fn bad_key_files_name_the_connection_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sa.json");
        std::fs::write(
            &p,
            r#"{"type":"service_account","client_email":"a@b","private_key":"nope"}"#,
        )
        .unwrap();
        let e = load_file("gcp", &p).err().unwrap().to_string();
        assert!(e.starts_with("connection gcp: credentials file "), "{e}");
        assert!(e.contains("sa.json") && e.contains("not an RSA key"), "{e}");
        let e = load_file("gcp", &dir.path().join("missing.json"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("cannot read it"), "{e}");
    }
}
