//! Dashboard sessions and CSRF protection.
//!
//! - With a server token, a browser logs in once: `POST /login` with the
//!   token starts a session, whose random id (never the token) travels in
//!   an `HttpOnly; SameSite=Strict` cookie. The token layer accepts that
//!   cookie for dashboard paths only ([`super::is_dashboard_path`]), never
//!   for the APIs. Without a token (loopback) a session starts at the first
//!   page view.
//! - Sessions live in memory (a restart logs everyone out), expire after
//!   12 hours and are capped in number, oldest dropped first.
//! - Every state-changing dashboard request is a form POST carrying the
//!   session's CSRF token (a hidden `csrf` field), compared in constant
//!   time here, on top of the Origin / `Sec-Fetch-Site` checks of
//!   `csrf.rs` that every route gets.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::rejection::FormRejection;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Form};
use pubrun_core::secret::verify_bearer;
use serde::Deserialize;

use super::{layout, see_other, Dashboard, UiError};

pub const COOKIE: &str = "pubrun_session";
const LIFETIME: Duration = Duration::from_secs(12 * 3600);
const MAX_SESSIONS: usize = 10_000;
/// Largest form body read for the CSRF check: a trigger's message data
/// (10 MB) URL-encoded.
const MAX_FORM_BYTES: usize = 32 * 1024 * 1024;

/// The sessions of one server. Cheap to clone.
#[derive(Clone, Default)]
pub struct Sessions {
    inner: Arc<Mutex<HashMap<String, Entry>>>,
}

struct Entry {
    csrf: String,
    created: Instant,
}

/// A live session, as handlers see it.
#[derive(Clone)]
pub(crate) struct Session {
    pub id: String,
    pub csrf: String,
}

/// `n` random bytes from the OS, hex-encoded.
fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    getrandom::getrandom(&mut buf).expect("the OS random source failed");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn create(&self) -> Session {
        let id = random_hex(32);
        let csrf = random_hex(32);
        let now = Instant::now();
        let mut m = self.lock();
        if m.len() >= MAX_SESSIONS {
            m.retain(|_, e| now.duration_since(e.created) < LIFETIME);
        }
        while m.len() >= MAX_SESSIONS {
            let oldest = m
                .iter()
                .min_by_key(|(_, e)| e.created)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => m.remove(&k),
                None => break,
            };
        }
        m.insert(
            id.clone(),
            Entry {
                csrf: csrf.clone(),
                created: now,
            },
        );
        Session { id, csrf }
    }

    fn get(&self, id: &str) -> Option<Session> {
        let mut m = self.lock();
        let e = m.get(id)?;
        if e.created.elapsed() >= LIFETIME {
            m.remove(id);
            return None;
        }
        Some(Session {
            id: id.to_string(),
            csrf: e.csrf.clone(),
        })
    }

    fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    /// The live session named by the request's cookie.
    pub(crate) fn of_request(&self, h: &HeaderMap) -> Option<Session> {
        cookie(h, COOKIE).and_then(|id| self.get(id))
    }
}

/// The value of cookie `name` among the request's `Cookie` headers.
fn cookie<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn set_cookie(d: &Dashboard, id: &str) -> HeaderValue {
    let secure = if d.inner.secure_cookie {
        "; Secure"
    } else {
        ""
    };
    HeaderValue::from_str(&format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        LIFETIME.as_secs()
    ))
    .expect("hex id")
}

/// Called by the server's token layer for a dashboard request that has no
/// (right) bearer token: a valid session cookie lets it through; otherwise
/// a page view gets the login form and an action is refused.
pub async fn gate(sessions: &Sessions, req: Request, next: Next) -> Response {
    if sessions.of_request(req.headers()).is_some() {
        return next.run(req).await;
    }
    let mut resp = if matches!(*req.method(), Method::GET | Method::HEAD) {
        (StatusCode::UNAUTHORIZED, layout::login_page(None)).into_response()
    } else {
        UiError::new(
            StatusCode::UNAUTHORIZED,
            "not logged in (or the session expired): log in again",
        )
        .into_response()
    };
    super::add_security_headers(&mut resp);
    resp
}

/// Inside the dashboard router: attaches the session (starting one for a
/// page view that has none: the request already passed the token layer)
/// and checks the CSRF field of every state-changing request.
pub(crate) async fn session_layer(
    State(d): State<Dashboard>,
    req: Request,
    next: Next,
) -> Response {
    let sessions = &d.inner.sessions;
    let existing = sessions.of_request(req.headers());
    if matches!(*req.method(), Method::GET | Method::HEAD) {
        let (session, fresh) = match existing {
            Some(s) => (s, false),
            None => (sessions.create(), true),
        };
        let id = session.id.clone();
        let mut req = req;
        req.extensions_mut().insert(session);
        let mut resp = next.run(req).await;
        if fresh {
            resp.headers_mut()
                .append(header::SET_COOKIE, set_cookie(&d, &id));
        }
        return resp;
    }
    let Some(session) = existing else {
        return UiError::new(
            StatusCode::FORBIDDEN,
            "no session: reload the page and try again",
        )
        .into_response();
    };
    let is_form = crate::csrf::media_type(req.headers())
        .is_some_and(|m| m == "application/x-www-form-urlencoded");
    if !is_form {
        return UiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "dashboard actions are form posts (application/x-www-form-urlencoded)",
        )
        .into_response();
    }
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_FORM_BYTES).await {
        Ok(b) => b,
        Err(_) => {
            return UiError::new(StatusCode::PAYLOAD_TOO_LARGE, "form too large").into_response()
        }
    };
    let given = form_urlencoded::parse(&bytes)
        .find(|(k, _)| k == "csrf")
        .map(|(_, v)| v.into_owned());
    if !given.is_some_and(|g| verify_bearer(session.csrf.as_bytes(), g.as_bytes())) {
        return UiError::new(
            StatusCode::FORBIDDEN,
            "missing or wrong CSRF token: reload the page and try again",
        )
        .into_response();
    }
    let mut req = Request::from_parts(parts, Body::from(bytes));
    req.extensions_mut().insert(session);
    next.run(req).await
}

#[derive(Deserialize)]
pub(crate) struct LoginForm {
    token: String,
}

/// `POST /login`: the server's token for a session cookie.
pub(crate) async fn login(
    State(d): State<Dashboard>,
    form: Result<Form<LoginForm>, FormRejection>,
) -> Response {
    let Some(token) = &d.inner.token else {
        return see_other("/"); // no token: nothing to log in to
    };
    let ok = form.is_ok_and(|Form(f)| verify_bearer(token.as_bytes(), f.token.trim().as_bytes()));
    if !ok {
        tracing::info!("dashboard login refused: wrong token");
        return (
            StatusCode::UNAUTHORIZED,
            layout::login_page(Some("Wrong token.")),
        )
            .into_response();
    }
    // A fresh id at login, so an id planted before cannot be logged in.
    let s = d.inner.sessions.create();
    let mut resp = see_other("/");
    resp.headers_mut()
        .append(header::SET_COOKIE, set_cookie(&d, &s.id));
    resp
}

/// `POST /ui/logout`: ends the session.
pub(crate) async fn logout(
    State(d): State<Dashboard>,
    Extension(s): Extension<Session>,
) -> Response {
    d.inner.sessions.remove(&s.id);
    let mut resp = see_other("/");
    resp.headers_mut().append(
        header::SET_COOKIE,
        HeaderValue::from_static("pubrun_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_among_others() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; pubrun_session=abc"),
        );
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        assert_eq!(cookie(&h, COOKIE), Some("abc"));
        assert_eq!(cookie(&h, "b"), Some("2"));
        assert_eq!(cookie(&h, "c"), None);
    }

    #[test]
    fn sessions_are_random_and_removable() {
        let s = Sessions::default();
        let a = s.create();
        let b = s.create();
        assert_ne!(a.id, b.id);
        assert_ne!(a.csrf, b.csrf);
        assert_eq!(a.id.len(), 64);
        assert_eq!(s.get(&a.id).unwrap().csrf, a.csrf);
        s.remove(&a.id);
        assert!(s.get(&a.id).is_none());
        assert!(s.get("not-a-session").is_none());
    }
}
