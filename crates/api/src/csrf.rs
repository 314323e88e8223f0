//! Cross-site protection for every route: a browser on another site must not
//! be able to change anything here, neither directly (CSRF: a form or a
//! `fetch` in no-cors mode sends "simple" requests without a preflight) nor
//! through DNS rebinding (an attacker's name resolving to this server's
//! address, so the page becomes same-origin with it).
//!
//! - `Host` (HTTP/1) and `:authority` (HTTP/2, gRPC) must name this server:
//!   an IP literal, `localhost`, a name given with `--allowed-host`, the host
//!   of `--public-url`, or the host of a pool's `server_url`.
//! - A state-changing request (any method but GET/HEAD/OPTIONS) is refused
//!   when it carries `Sec-Fetch-Site: cross-site` or an `Origin` that is not
//!   the server's own (the origin its `Host` names, or `--public-url`'s).
//! - pubrun's own REST (`/api/v1/*`) state-changing calls also need a
//!   content type a form cannot send (e.g. `application/json`) or the
//!   `X-Pubrun-Client` header, so even a browser that sends no `Origin`
//!   cannot reach `apply` or `trigger`. Google-compatible routes accept any
//!   media type (uploads), so the first two rules protect them.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use pubrun_core::pool::ProviderSpec;
use pubrun_core::{Code, Error};

/// The header pubrun's CLI sends; browsers cannot add it without a CORS
/// preflight, which pubrun never grants.
pub const CLIENT_HEADER: &str = "x-pubrun-client";

/// Which names this server answers to.
#[derive(Clone, Default)]
pub struct HostPolicy {
    /// Lowercase host names, without port or trailing dot.
    names: Vec<String>,
    /// `--public-url`: its origin is also this server's own.
    public: Option<PublicOrigin>,
    /// Pools' `server_url` hosts are names agents use to reach us.
    pools: Option<pubrun_pools::Pools>,
}

#[derive(Clone)]
struct PublicOrigin {
    scheme: String,
    host: String,
    port: u16,
}

impl HostPolicy {
    /// `allowed` are bare host names (`--allowed-host`); `public_url` is an
    /// absolute http(s) URL. Errors name what is wrong with a value.
    pub fn new(
        allowed: &[String],
        public_url: Option<&str>,
        pools: Option<pubrun_pools::Pools>,
    ) -> Result<HostPolicy, String> {
        let mut names = Vec::new();
        for a in allowed {
            let a = a.trim();
            if a.is_empty() {
                continue;
            }
            if a.contains("://") || a.contains('/') || a.contains(':') && !a.starts_with('[') {
                return Err(format!(
                    "--allowed-host {a:?}: give a host name only (like pubrun.example.com), without scheme, port or path"
                ));
            }
            names.push(normalize(a));
        }
        let public = match public_url {
            None => None,
            Some(u) => {
                let uri: Uri = u
                    .parse()
                    .map_err(|e| format!("--public-url {u:?} is not a URL: {e}"))?;
                let scheme = match uri.scheme_str() {
                    Some(s @ ("http" | "https")) => s.to_string(),
                    _ => {
                        return Err(format!(
                            "--public-url {u:?} must start with http:// or https://"
                        ))
                    }
                };
                let Some(host) = uri.host().filter(|h| !h.is_empty()) else {
                    return Err(format!("--public-url {u:?} has no host"));
                };
                let host = normalize(host);
                let port = uri.port_u16().unwrap_or(default_port(&scheme));
                names.push(host.clone());
                Some(PublicOrigin { scheme, host, port })
            }
        };
        Ok(HostPolicy {
            names,
            public,
            pools,
        })
    }

    /// Whether `host` (a Host header value or an authority, port allowed)
    /// names this server.
    pub fn allows(&self, host: &str) -> bool {
        let (name, _) = split_host_port(host);
        let name = normalize(name);
        if name.is_empty() {
            return false;
        }
        if name == "localhost" || name.trim_matches(['[', ']']).parse::<IpAddr>().is_ok() {
            return true;
        }
        if self.names.contains(&name) {
            return true;
        }
        self.pools.as_ref().is_some_and(|p| {
            p.specs().iter().any(|s| {
                let url = match &s.provider {
                    ProviderSpec::Docker(d) => &d.server_url,
                    ProviderSpec::Gce(g) => &g.server_url,
                    ProviderSpec::Local | ProviderSpec::Agents => return false,
                };
                url.parse::<Uri>()
                    .ok()
                    .and_then(|u| u.host().map(normalize))
                    .is_some_and(|h| h == name)
            })
        })
    }

    /// Whether `origin` (an `Origin` header value) is this server's own
    /// origin, given the request's `host`.
    fn same_origin(&self, origin: &str, host: Option<&str>) -> bool {
        let Ok(uri) = origin.parse::<Uri>() else {
            return false; // includes the opaque origin "null"
        };
        let (Some(scheme), Some(o_host)) = (uri.scheme_str(), uri.host()) else {
            return false;
        };
        if scheme != "http" && scheme != "https" {
            return false;
        }
        let o_host = normalize(o_host);
        let o_port = uri.port_u16().unwrap_or(default_port(scheme));
        if let Some(p) = &self.public {
            if p.scheme == scheme && p.host == o_host && p.port == o_port {
                return true;
            }
        }
        // The origin the request's Host names; pubrun itself speaks plain
        // HTTP, but a TLS proxy in front may keep the Host, so either scheme.
        host.is_some_and(|h| {
            let (h_name, h_port) = split_host_port(h);
            normalize(h_name) == o_host && h_port.unwrap_or(default_port(scheme)) == o_port
        })
    }
}

fn default_port(scheme: &str) -> u16 {
    if scheme == "https" {
        443
    } else {
        80
    }
}

fn normalize(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// `example.com:8085` → (`example.com`, Some(8085)); `[::1]:80` → (`[::1]`, Some(80)).
fn split_host_port(host: &str) -> (&str, Option<u16>) {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) => {
                let port = host[end + 1..]
                    .strip_prefix(':')
                    .and_then(|p| p.parse().ok());
                (&host[..=end], port)
            }
            None => (host, None),
        };
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') => (name, port.parse().ok()),
        _ => (host, None),
    }
}

/// The middleware: refuses requests for other hosts and cross-site writes.
pub async fn guard(State(policy): State<Arc<HostPolicy>>, req: Request, next: Next) -> Response {
    match check(&policy, &req) {
        Ok(()) => next.run(req).await,
        Err(msg) => refuse(&req, &msg),
    }
}

fn check(policy: &HostPolicy, req: &Request) -> Result<(), String> {
    let host_header = req
        .headers()
        .get(header::HOST)
        .map(|v| v.to_str().unwrap_or("\u{fffd}"));
    // HTTP/2 (gRPC) carries :authority, which hyper puts in the URI; an
    // HTTP/1 request in absolute form does too. Both must name us.
    let authority = req.uri().authority().map(|a| a.as_str());
    for h in [authority, host_header].into_iter().flatten() {
        if !policy.allows(h) {
            return Err(format!(
                "this server does not answer to host {h:?} (DNS rebinding protection): \
                 add the name with --allowed-host (PUBRUN_ALLOWED_HOSTS) or --public-url"
            ));
        }
    }
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return Ok(());
    }
    let h = req.headers();
    if h.get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"cross-site"))
    {
        return Err(
            "cross-site request refused: a web page of another site may not change this server"
                .into(),
        );
    }
    if let Some(origin) = h.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("null");
        if !policy.same_origin(origin, authority.or(host_header)) {
            return Err(format!(
                "cross-origin request refused: Origin {origin:?} is not this server's origin \
                 (set --public-url if pubrun is served under another address)"
            ));
        }
    }
    if req.uri().path().starts_with("/api/v1/") && !h.contains_key(CLIENT_HEADER) {
        let simple = match media_type(h).as_deref() {
            None | Some("") => true,
            Some(m) => matches!(
                m,
                "text/plain" | "application/x-www-form-urlencoded" | "multipart/form-data"
            ),
        };
        if simple {
            return Err(format!(
                "{} {} needs a Content-Type such as application/json or application/toml, \
                 or the {CLIENT_HEADER} header (a browser form cannot send either)",
                req.method(),
                req.uri().path()
            ));
        }
    }
    Ok(())
}

/// The media type of the request body (`Content-Type` without parameters,
/// lower-cased); `None` when there is none or it is not text.
pub(crate) fn media_type(h: &HeaderMap) -> Option<String> {
    let v = h.get(header::CONTENT_TYPE)?.to_str().ok()?;
    Some(
        v.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase(),
    )
}

fn refuse(req: &Request, msg: &str) -> Response {
    let e = Error::new(Code::PermissionDenied, msg);
    if crate::server::is_grpc(req) {
        return crate::status::grpc_response(&e);
    }
    crate::status::HttpError(e).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> HostPolicy {
        HostPolicy::new(
            &["pubrun.internal".into()],
            Some("https://pubrun.example.com"),
            None,
        )
        .unwrap()
    }

    #[test]
    fn hosts() {
        let p = policy();
        for ok in [
            "127.0.0.1:8085",
            "localhost:1",
            "LOCALHOST",
            "[::1]:8085",
            "172.17.0.1:8085",
            "pubrun.internal",
            "PubRun.Internal.:80",
            "pubrun.example.com",
        ] {
            assert!(p.allows(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8085",
            "localhost.evil.example",
            "",
            "127.0.0.1.evil.example",
        ] {
            assert!(!p.allows(bad), "{bad}");
        }
    }

    #[test]
    fn origins() {
        let p = policy();
        assert!(p.same_origin("http://127.0.0.1:8085", Some("127.0.0.1:8085")));
        assert!(p.same_origin("http://localhost", Some("localhost:80")));
        assert!(p.same_origin("https://pubrun.example.com", Some("127.0.0.1:8085")));
        assert!(!p.same_origin("http://pubrun.example.com", Some("127.0.0.1:8085")));
        assert!(!p.same_origin("http://evil.example", Some("127.0.0.1:8085")));
        assert!(!p.same_origin("http://127.0.0.1:9999", Some("127.0.0.1:8085")));
        assert!(!p.same_origin("null", Some("127.0.0.1:8085")));
        assert!(!p.same_origin("http://127.0.0.1:8085", None));
    }

    #[test]
    fn bad_flags_are_refused() {
        assert!(HostPolicy::new(&["http://x".into()], None, None).is_err());
        assert!(HostPolicy::new(&["x:80".into()], None, None).is_err());
        assert!(HostPolicy::new(&[], Some("ftp://x"), None).is_err());
        assert!(HostPolicy::new(&[], Some("x"), None).is_err());
    }
}
