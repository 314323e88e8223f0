//! A stand-in for Google's OAuth token endpoint (a key file's `token_uri`),
//! for the tests of everything that trades credentials for access tokens.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::{Form, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

/// The scope every credential of ours asks for.
const SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

/// What the endpoint grants.
#[derive(Clone, Debug)]
pub struct Grants {
    /// A service-account assertion (JWT bearer grant) counts only when it is
    /// RS256-signed by the key whose public half this is (SPKI PEM), issued
    /// by `issuer`, addressed to the endpoint's own URL, unexpired (no
    /// leeway; `exp`, `iat`, `aud` and `iss` required) and for our scope.
    pub public_pem: String,
    pub issuer: String,
    /// The refresh-token grant (gcloud's `authorized_user` files) counts
    /// only for this token, sent with a client secret; `None`: never.
    pub refresh_token: Option<String>,
    /// The access token handed out; `None`: `tok-1`, `tok-2`, … one per grant.
    pub token: Option<String>,
    /// Seconds each token lives.
    pub expires_in: u64,
}

/// A running endpoint on 127.0.0.1 (it lives as long as the test's runtime).
pub struct TokenEndpoint {
    /// `http://127.0.0.1:PORT/token`: the `token_uri` to put in key files.
    pub url: String,
    /// How many tokens it has granted.
    pub issued: Arc<AtomicUsize>,
    /// How many grants it has refused.
    pub refused: Arc<AtomicUsize>,
}

#[derive(Clone)]
struct St {
    grants: Grants,
    aud: String,
    issued: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
}

#[derive(serde::Deserialize)]
struct Claims {
    scope: String,
}

impl TokenEndpoint {
    pub async fn start(grants: Grants) -> TokenEndpoint {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/token", listener.local_addr().unwrap());
        let st = St {
            grants,
            aud: url.clone(),
            issued: Arc::default(),
            refused: Arc::default(),
        };
        let (issued, refused) = (st.issued.clone(), st.refused.clone());
        let app = Router::new().route("/token", post(token)).with_state(st);
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        TokenEndpoint {
            url,
            issued,
            refused,
        }
    }

    /// Tokens granted so far.
    pub fn issued(&self) -> usize {
        self.issued.load(Ordering::SeqCst)
    }

    /// Grants refused so far.
    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::SeqCst)
    }
}

/// A service-account key file's content, for the key pair made by
/// [`crate::rsa_key`].
pub fn service_account_key(email: &str, private_pem: &str, token_uri: &str) -> Value {
    json!({"type": "service_account", "client_email": email, "private_key": private_pem, "token_uri": token_uri})
}

async fn token(
    State(st): State<St>,
    Form(f): Form<HashMap<String, String>>,
) -> (StatusCode, Json<Value>) {
    match check(&st, &f) {
        Ok(()) => {
            let n = st.issued.fetch_add(1, Ordering::SeqCst) + 1;
            let token = st
                .grants
                .token
                .clone()
                .unwrap_or_else(|| format!("tok-{n}"));
            (
                StatusCode::OK,
                Json(
                    json!({"access_token": token, "expires_in": st.grants.expires_in, "token_type": "Bearer"}),
                ),
            )
        }
        Err(why) => {
            st.refused.fetch_add(1, Ordering::SeqCst);
            (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": "invalid_grant", "error_description": why})),
            )
        }
    }
}

/// Whether the form is a grant this endpoint honours; else why not.
fn check(st: &St, f: &HashMap<String, String>) -> Result<(), String> {
    let field = |k: &str| f.get(k).map(String::as_str);
    match field("grant_type") {
        Some("urn:ietf:params:oauth:grant-type:jwt-bearer") => {
            let key =
                jsonwebtoken::DecodingKey::from_rsa_pem(st.grants.public_pem.as_bytes()).unwrap();
            let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
            v.set_audience(&[&st.aud]);
            v.set_issuer(&[&st.grants.issuer]);
            v.set_required_spec_claims(&["exp", "iat", "aud", "iss"]);
            v.leeway = 0;
            let t = jsonwebtoken::decode::<Claims>(field("assertion").unwrap_or(""), &key, &v)
                .map_err(|e| format!("Invalid JWT Signature: {e}"))?;
            if t.claims.scope != SCOPE {
                return Err(format!("scope {}", t.claims.scope));
            }
            Ok(())
        }
        Some("refresh_token") => {
            let known = st.grants.refresh_token.is_some()
                && field("refresh_token") == st.grants.refresh_token.as_deref();
            if known && f.contains_key("client_secret") {
                Ok(())
            } else {
                Err("unknown refresh token".into())
            }
        }
        other => Err(format!("grant_type {}", other.unwrap_or(""))),
    }
}
