//! Connections: a named Google project (or any server speaking the same
//! APIs: another pubrun, an emulator) whose Pub/Sub subscriptions and topics
//! and Cloud Storage buckets jobs use as a client. Pure data; the clients
//! are in the `connections` crate.

use serde::{Deserialize, Serialize};

/// Google's production endpoints.
pub const GOOGLE_PUBSUB_ENDPOINT: &str = "https://pubsub.googleapis.com";
pub const GOOGLE_STORAGE_ENDPOINT: &str = "https://storage.googleapis.com";
pub const GOOGLE_COMPUTE_ENDPOINT: &str = "https://compute.googleapis.com";

/// A `[[connection]]` table, validated. Holds no secret: a key file is
/// named by its path and read when a token is needed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionSpec {
    pub name: String,
    /// The project id (`theirs`), for messages and defaults.
    pub project: String,
    /// How to get access tokens.
    #[serde(default)]
    pub credentials: CredentialsSpec,
    pub pubsub_endpoint: String,
    pub storage_endpoint: String,
    pub compute_endpoint: String,
}

/// Where a connection's access tokens come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CredentialsSpec {
    /// Application Default Credentials, in Google's order:
    /// `GOOGLE_APPLICATION_CREDENTIALS`, gcloud's
    /// `~/.config/gcloud/application_default_credentials.json`, the
    /// metadata server.
    #[default]
    Adc,
    /// A JSON key file: `service_account` or `authorized_user`.
    File { path: String },
    /// An access token read from this environment variable of the server
    /// at each use (refreshing it is someone else's job).
    TokenEnv { env: String },
    /// The metadata server (on Compute Engine, GKE, Cloud Run).
    Metadata,
}

/// Checks an endpoint: `http://` (emulators, tests) or `https://` with a
/// host and no path, query or trailing garbage beyond a `/`.
pub fn check_endpoint(s: &str) -> Result<String, String> {
    let rest = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
        .ok_or_else(|| format!("\"{s}\" must start with https:// (or http:// for an emulator)"))?;
    let host = rest.trim_end_matches('/');
    if host.is_empty() || host.contains(['/', '?', '#', ' ', '@']) {
        return Err(format!("\"{s}\" must be scheme://host[:port] with no path"));
    }
    Ok(s.trim_end_matches('/').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            check_endpoint("http://127.0.0.1:8085/").unwrap(),
            "http://127.0.0.1:8085"
        );
        assert!(check_endpoint("https://pubsub.googleapis.com").is_ok());
        for bad in [
            "pubsub.googleapis.com",
            "ftp://x",
            "https://",
            "https://x/v1",
            "https://u@x",
        ] {
            assert!(check_endpoint(bad).is_err(), "{bad}");
        }
    }
}
