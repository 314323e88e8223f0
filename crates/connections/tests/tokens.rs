//! Token sources against a token endpoint in the test: a service-account
//! key's assertion is verified (RS256, `iss`, `aud`, `scope`) and answered
//! with short-lived tokens, so caching and refresh are observed; gcloud's
//! `authorized_user` file uses the refresh-token grant.

use std::path::Path;
use std::time::Duration;

use pubrun_connections::{ErrorKind, TokenSource};
use pubrun_core::connection::CredentialsSpec;
use pubrun_testkit::token_endpoint::{service_account_key, Grants, TokenEndpoint};
use serde_json::{json, Value};

const EMAIL: &str = "t@theirs.iam.gserviceaccount.com";

/// A token endpoint trusting `public_pem` and the refresh token `rt-1`,
/// handing out `tok-1`, `tok-2`, … that live one second.
async fn endpoint(public_pem: String) -> TokenEndpoint {
    TokenEndpoint::start(Grants {
        public_pem,
        issuer: EMAIL.into(),
        refresh_token: Some("rt-1".into()),
        token: None,
        expires_in: 1,
    })
    .await
}

/// A token source for connection `gcp` reading `credentials`, written to
/// `dir/file`.
fn source(dir: &Path, file: &str, credentials: &Value) -> TokenSource {
    let path = dir.join(file);
    std::fs::write(&path, credentials.to_string()).unwrap();
    TokenSource::new(
        "gcp",
        &CredentialsSpec::File {
            path: path.display().to_string(),
        },
        reqwest::Client::new(),
    )
    .unwrap()
}

#[tokio::test]
async fn short_lived_tokens_are_cached_then_refreshed() {
    let dir = tempfile::tempdir().unwrap();
    let (private_pem, public_pem) = pubrun_testkit::rsa_key(dir.path(), "k");
    let tokens = endpoint(public_pem).await;
    let key = service_account_key(EMAIL, &private_pem, &tokens.url);
    let ts = source(dir.path(), "sa.json", &key);
    assert!(!format!("{ts:?}").contains("PRIVATE KEY"));

    assert_eq!(ts.token().await.unwrap().secret(), "tok-1");
    assert_eq!(
        ts.token().await.unwrap().secret(),
        "tok-1",
        "cached while fresh"
    );
    assert_eq!(tokens.issued(), 1);
    // A 1 s token is refreshed after 750 ms: outwait it.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        ts.token().await.unwrap().secret(),
        "tok-2",
        "refreshed before expiry"
    );
    // After a 401 the cache is dropped.
    ts.invalidate().await;
    assert_eq!(ts.token().await.unwrap().secret(), "tok-3");
    assert_eq!(tokens.issued(), 3);
}

#[tokio::test]
async fn authorized_user_files_use_the_refresh_token_grant() {
    let dir = tempfile::tempdir().unwrap();
    let (_, public_pem) = pubrun_testkit::rsa_key(dir.path(), "k");
    let tokens = endpoint(public_pem).await;
    let mut user = json!({"type": "authorized_user", "client_id": "c", "client_secret": "s", "refresh_token": "rt-1", "token_uri": tokens.url});
    let ts = source(dir.path(), "adc.json", &user);
    assert_eq!(ts.token().await.unwrap().secret(), "tok-1");

    // A revoked refresh token: a credentials error naming connection and file.
    user["refresh_token"] = json!("rt-revoked");
    let ts = source(dir.path(), "bad.json", &user);
    let e = ts.token().await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Credentials);
    let text = e.to_string();
    assert!(
        text.starts_with("connection gcp: authorized_user file ")
            && text.contains("bad.json")
            && text.contains("invalid_grant"),
        "{text}"
    );
}

#[tokio::test]
async fn an_unreachable_token_endpoint_is_retryable_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let (private_pem, _) = pubrun_testkit::rsa_key(dir.path(), "k");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let uri = format!("http://127.0.0.1:{port}/token");
    let key = service_account_key(EMAIL, &private_pem, &uri);
    let ts = source(dir.path(), "sa.json", &key);
    let e = ts.token().await.unwrap_err();
    assert!(e.kind.is_retryable(), "{e}");
    assert!(
        e.to_string().contains("connection gcp")
            && e.to_string().contains("token endpoint unreachable"),
        "{e}"
    );
}
