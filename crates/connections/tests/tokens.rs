//! Token sources against a token endpoint in the test: a service-account
//! key's assertion is verified (RS256, `iss`, `aud`, `scope`) and answered
//! with short-lived tokens, so caching and refresh are observed; gcloud's
//! `authorized_user` file uses the refresh-token grant.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Form, State};
use axum::routing::post;
use axum::{Json, Router};
use pubrun_connections::{ErrorKind, TokenSource};
use pubrun_core::connection::CredentialsSpec;
use serde_json::{json, Value};

const EMAIL: &str = "t@theirs.iam.gserviceaccount.com";

#[derive(Clone)]
struct St {
    public_pem: String,
    aud: String,
    issued: Arc<AtomicUsize>,
}

#[derive(serde::Deserialize)]
struct Claims {
    scope: String,
}

async fn token(
    State(st): State<St>,
    Form(f): Form<HashMap<String, String>>,
) -> (axum::http::StatusCode, Json<Value>) {
    let ok = match f.get("grant_type").map(String::as_str) {
        Some("urn:ietf:params:oauth:grant-type:jwt-bearer") => {
            let key = jsonwebtoken::DecodingKey::from_rsa_pem(st.public_pem.as_bytes()).unwrap();
            let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
            v.set_audience(&[&st.aud]);
            v.set_issuer(&[EMAIL]);
            jsonwebtoken::decode::<Claims>(
                f.get("assertion").map(String::as_str).unwrap_or(""),
                &key,
                &v,
            )
            .is_ok_and(|t| t.claims.scope == "https://www.googleapis.com/auth/cloud-platform")
        }
        Some("refresh_token") => {
            f.get("refresh_token").map(String::as_str) == Some("rt-1")
                && f.contains_key("client_secret")
        }
        _ => false,
    };
    if !ok {
        return (
            axum::http::StatusCode::BAD_REQUEST,
            Json(json!({"error": "invalid_grant"})),
        );
    }
    let n = st.issued.fetch_add(1, Ordering::SeqCst) + 1;
    (
        axum::http::StatusCode::OK,
        Json(json!({"access_token": format!("tok-{n}"), "expires_in": 1})),
    )
}

async fn endpoint(public_pem: String) -> (String, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/token", l.local_addr().unwrap());
    let issued = Arc::new(AtomicUsize::new(0));
    let st = St {
        public_pem,
        aud: url.clone(),
        issued: issued.clone(),
    };
    tokio::spawn(async move {
        axum::serve(l, Router::new().route("/token", post(token)).with_state(st))
            .await
            .unwrap()
    });
    (url, issued)
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
    let (url, issued) = endpoint(public_pem).await;
    let key = json!({"type": "service_account", "client_email": EMAIL, "private_key": private_pem, "token_uri": url});
    let ts = source(dir.path(), "sa.json", &key);
    assert!(!format!("{ts:?}").contains("PRIVATE KEY"));

    assert_eq!(ts.token().await.unwrap().secret(), "tok-1");
    assert_eq!(
        ts.token().await.unwrap().secret(),
        "tok-1",
        "cached while fresh"
    );
    assert_eq!(issued.load(Ordering::SeqCst), 1);
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
    assert_eq!(issued.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn authorized_user_files_use_the_refresh_token_grant() {
    let dir = tempfile::tempdir().unwrap();
    let (_, public_pem) = pubrun_testkit::rsa_key(dir.path(), "k");
    let (url, _) = endpoint(public_pem).await;
    let mut user = json!({"type": "authorized_user", "client_id": "c", "client_secret": "s", "refresh_token": "rt-1", "token_uri": url});
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
    let key = json!({"type": "service_account", "client_email": EMAIL, "private_key": private_pem, "token_uri": uri});
    let ts = source(dir.path(), "sa.json", &key);
    let e = ts.token().await.unwrap_err();
    assert!(e.kind.is_retryable(), "{e}");
    assert!(
        e.to_string().contains("connection gcp")
            && e.to_string().contains("token endpoint unreachable"),
        "{e}"
    );
}
