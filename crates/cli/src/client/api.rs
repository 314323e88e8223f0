//! The HTTP side: one request helper that turns every failure into an error
//! message saying what happened and what to do.

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::{Map, Value};

use super::args::ConnArgs;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Generous: a publish may carry 10 MB, a pull may wait briefly on the server.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Largest page Google's list methods accept.
const PAGE_SIZE: &str = "1000";

pub struct Api {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Api {
    pub fn new(conn: &ConnArgs) -> Result<Self> {
        Self::with_timeouts(conn, Timeouts::Request)
    }

    /// For object transfers: a download of gigabytes may take longer than
    /// any whole-request limit, so only a stalled connection is an error.
    pub fn for_transfers(conn: &ConnArgs) -> Result<Self> {
        Self::with_timeouts(conn, Timeouts::Stall)
    }

    fn with_timeouts(conn: &ConnArgs, timeouts: Timeouts) -> Result<Self> {
        let mut builder = reqwest::Client::builder().connect_timeout(CONNECT_TIMEOUT);
        builder = match timeouts {
            Timeouts::Request => builder.timeout(REQUEST_TIMEOUT),
            Timeouts::Stall => builder.read_timeout(REQUEST_TIMEOUT),
        };
        let mut builder = builder
            .user_agent(concat!("pubrun-cli/", env!("CARGO_PKG_VERSION")))
            // pubrun's REST refuses state-changing calls a browser form could
            // send; this header (which no form can set) marks them as ours.
            .default_headers(HeaderMap::from_iter([(
                reqwest::header::HeaderName::from_static(pubrun_api::csrf::CLIENT_HEADER),
                reqwest::header::HeaderValue::from_static("cli"),
            )]));
        if is_loopback(&conn.addr) {
            // An HTTP_PROXY meant for the internet must not swallow requests to this machine.
            builder = builder.no_proxy();
        }
        let http = builder
            .build()
            .map_err(|e| anyhow!("cannot set up the HTTP client: {e}"))?;
        Ok(Api {
            http,
            base: conn.addr.clone(),
            token: conn.token.clone().filter(|t| !t.is_empty()),
        })
    }

    /// The server's base URL (`http://host:port`).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// One request whose answer is read by the caller (streamed downloads,
    /// resumable upload chunks). Success and 308 (a resumable upload's
    /// "resume incomplete") come back as the response; any other status as
    /// the errors [`Api::call`] gives.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        headers: &[(&str, String)],
        body: Option<reqwest::Body>,
    ) -> Result<reqwest::Response> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method.clone(), &url);
        if !query.is_empty() {
            req = req.query(query);
        }
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        if let Some(b) = body {
            req = req.body(b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| self.transport_error(&method, path, &e))?;
        let status = resp.status();
        if status.is_success() || status == StatusCode::PERMANENT_REDIRECT {
            return Ok(resp);
        }
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| self.transport_error(&method, path, &e))?;
        Err(self.status_error(&method, path, status, &bytes))
    }

    /// Wraps a failure while reading a response body streamed by [`Api::send`].
    pub fn body_error(&self, method: &Method, path: &str, e: &reqwest::Error) -> anyhow::Error {
        self.transport_error(method, path, e)
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        self.call(Method::GET, path, &[], None).await
    }

    pub async fn put(&self, path: &str, body: &Value) -> Result<Value> {
        self.call(Method::PUT, path, &[], Some(body)).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        self.call(Method::POST, path, &[], Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> Result<Value> {
        self.call(Method::DELETE, path, &[], None).await
    }

    /// Fetches every page of a list method, following `nextPageToken`, and
    /// returns the concatenated `key` arrays.
    pub async fn list_all(&self, path: &str, key: &str) -> Result<Vec<Value>> {
        let mut items = Vec::new();
        let mut token = String::new();
        // A server that keeps returning the same token would loop forever.
        let mut seen = std::collections::HashSet::new();
        loop {
            let mut query = vec![("pageSize", PAGE_SIZE)];
            if !token.is_empty() {
                query.push(("pageToken", token.as_str()));
            }
            let page = self.call(Method::GET, path, &query, None).await?;
            match page.get(key) {
                None | Some(Value::Null) => {}
                Some(Value::Array(a)) => items.extend(a.iter().cloned()),
                Some(other) => bail!(
                    "server sent an unexpected list response for GET {path}: `{key}` is {other}"
                ),
            }
            let next = page
                .get("nextPageToken")
                .and_then(Value::as_str)
                .unwrap_or("");
            if next.is_empty() {
                return Ok(items);
            }
            if !seen.insert(next.to_string()) {
                bail!("server repeated page token {next:?} for GET {path}; stopping");
            }
            token = next.to_string();
        }
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Result<Value> {
        let body = match body {
            Some(b) => Some(Body {
                content_type: "application/json",
                bytes: serde_json::to_vec(b)?,
            }),
            None => None,
        };
        let (_, bytes) = self.call_raw(method.clone(), path, query, body).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Value::Object(Map::new()));
        }
        serde_json::from_slice(&bytes).map_err(|e| {
            anyhow!(
                "server at {} sent a response to {method} {path} that is not JSON ({e}): {}",
                self.base,
                snippet(&bytes)
            )
        })
    }

    /// One request with any body; a success answer comes back as headers +
    /// bytes, anything else as the same errors [`Api::call`] gives (a
    /// [`ServerError`] when the server answered, a [`TransportError`] when it
    /// could not be reached).
    pub async fn call_raw(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<Body>,
    ) -> Result<(HeaderMap, Vec<u8>)> {
        let url = format!("{}{path}", self.base);
        let mut req = self
            .http
            .request(method.clone(), &url)
            .header("accept", "application/json");
        if !query.is_empty() {
            req = req.query(query);
        }
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.header("content-type", b.content_type).body(b.bytes);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| self.transport_error(&method, path, &e))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| self.transport_error(&method, path, &e))?;
        if status.is_success() {
            return Ok((headers, Vec::from(bytes)));
        }
        Err(self.status_error(&method, path, status, &bytes))
    }

    fn transport_error(&self, method: &Method, path: &str, e: &reqwest::Error) -> anyhow::Error {
        let hint = "start it with `pubrun serve` or set --addr/PUBRUN_ADDR";
        let message = if e.is_connect() {
            format!(
                "cannot reach pubrun at {}: {} — {hint}",
                self.base,
                root_cause(e)
            )
        } else if e.is_timeout() {
            format!(
                "pubrun at {} did not answer {method} {path} within {}s — is the server overloaded or stuck?",
                self.base,
                REQUEST_TIMEOUT.as_secs()
            )
        } else {
            format!(
                "request {method} {path} to pubrun at {} failed: {}",
                self.base,
                root_cause(e)
            )
        };
        anyhow::Error::new(TransportError(message))
    }

    fn status_error(
        &self,
        method: &Method,
        path: &str,
        status: StatusCode,
        body: &[u8],
    ) -> anyhow::Error {
        let google = serde_json::from_slice::<Value>(body).ok().and_then(|v| {
            let err = v.get("error")?;
            let message = err
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let code = err
                .get("status")
                .and_then(Value::as_str)
                .map(str::to_string);
            Some((code, message))
        });
        if status == StatusCode::UNAUTHORIZED {
            return match &self.token {
                None => anyhow!(
                    "UNAUTHENTICATED: pubrun at {} requires a token and none was given — pass --token or set \
                     PUBRUN_TOKEN to the token the server was started with",
                    self.base
                ),
                Some(_) => anyhow!(
                    "UNAUTHENTICATED: pubrun at {} rejected the token — the --token / PUBRUN_TOKEN value is wrong; \
                     use the token the server was started with",
                    self.base
                ),
            };
        }
        match google {
            Some((code, message)) => {
                let code = code.unwrap_or_else(|| status.as_str().to_string());
                let display = if message.is_empty() {
                    format!("{code}: {method} {path} failed with HTTP {status}")
                } else {
                    format!("{code}: {message}")
                };
                anyhow::Error::new(ServerError {
                    code,
                    message,
                    display,
                })
            }
            None if status == StatusCode::NOT_FOUND || status == StatusCode::METHOD_NOT_ALLOWED => anyhow!(
                "server at {} answered {method} {path} with HTTP {status} and no Pub/Sub error: it does not \
                 serve this REST route (is --addr pointing at a current pubrun server?)",
                self.base
            ),
            None => {
                let body = snippet(body);
                if body.is_empty() {
                    anyhow!("server at {} answered {method} {path} with HTTP {status}", self.base)
                } else {
                    anyhow!(
                        "server at {} answered {method} {path} with HTTP {status}: {body}",
                        self.base
                    )
                }
            }
        }
    }
}

enum Timeouts {
    /// The whole request within [`REQUEST_TIMEOUT`].
    Request,
    /// No read may wait longer than [`REQUEST_TIMEOUT`].
    Stall,
}

/// A request body that is not JSON (a manifest, say).
pub struct Body {
    pub content_type: &'static str,
    pub bytes: Vec<u8>,
}

/// The server answered with an error in Google's JSON shape.
#[derive(Debug)]
pub struct ServerError {
    /// Google's status name, e.g. `INVALID_ARGUMENT`.
    pub code: String,
    /// The server's message, unprefixed.
    pub message: String,
    display: String,
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display)
    }
}

impl std::error::Error for ServerError {}

/// The server could not be reached or did not answer in time.
#[derive(Debug)]
pub struct TransportError(String);

impl std::fmt::Display for TransportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TransportError {}

fn is_loopback(addr: &str) -> bool {
    let Some(host) = reqwest::Url::parse(addr)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
    else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The innermost cause, in words a person recognizes ("connection refused").
fn root_cause(e: &reqwest::Error) -> String {
    let mut cur: &(dyn std::error::Error + 'static) = e;
    let mut io: Option<&std::io::Error> = None;
    while let Some(next) = cur.source() {
        if let Some(i) = next.downcast_ref::<std::io::Error>() {
            io = Some(i);
        }
        cur = next;
    }
    if let Some(i) = io {
        use std::io::ErrorKind::*;
        let words = match i.kind() {
            ConnectionRefused => Some("connection refused"),
            ConnectionReset => Some("connection reset"),
            ConnectionAborted => Some("connection aborted"),
            TimedOut => Some("connection timed out"),
            AddrNotAvailable => Some("address not available"),
            _ => None,
        };
        if let Some(w) = words {
            return w.to_string();
        }
        return i.to_string();
    }
    let s = cur.to_string();
    if s.is_empty() {
        e.to_string()
    } else {
        s
    }
}

fn snippet(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(body);
    let s = s.trim();
    if s.chars().count() > 300 {
        format!("{}…", s.chars().take(300).collect::<String>())
    } else {
        s.to_string()
    }
}

/// Percent-encodes one path segment (object names may hold '/', spaces,
/// unicode): everything but RFC 3986's unreserved characters.
pub fn segment(x: &str) -> String {
    x.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Answers each connection with the next canned (status line, body) and
    /// records the request lines it saw.
    async fn fake_server(
        replies: Vec<(&'static str, &'static str)>,
    ) -> (String, tokio::task::JoinHandle<Vec<String>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let mut seen = Vec::new();
            for (status, body) in replies {
                let (mut sock, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 8192];
                let mut req = Vec::new();
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = sock.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    req.extend_from_slice(&buf[..n]);
                }
                let text = String::from_utf8_lossy(&req).into_owned();
                seen.push(text.lines().next().unwrap_or("").to_string());
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                sock.write_all(resp.as_bytes()).await.unwrap();
                let _ = sock.shutdown().await;
            }
            seen
        });
        (addr, task)
    }

    #[test]
    fn loopback_detection() {
        assert!(is_loopback("http://127.0.0.1:8085"));
        assert!(is_loopback("http://localhost:1"));
        assert!(is_loopback("http://[::1]:1"));
        assert!(!is_loopback("http://10.0.0.1:1"));
        assert!(!is_loopback("http://example.com"));
    }

    fn api(addr: &str, token: Option<&str>) -> Api {
        Api::new(&ConnArgs {
            addr: addr.into(),
            token: token.map(Into::into),
            project: "demo".into(),
            json: false,
        })
        .unwrap()
    }

    #[tokio::test]
    async fn list_all_follows_next_page_token() {
        let (addr, task) = fake_server(vec![
            (
                "200 OK",
                r#"{"topics":[{"name":"projects/demo/topics/a"}],"nextPageToken":"p 2"}"#,
            ),
            (
                "200 OK",
                r#"{"topics":[{"name":"projects/demo/topics/b"}],"nextPageToken":"p3"}"#,
            ),
            (
                "200 OK",
                r#"{"topics":[{"name":"projects/demo/topics/c"}]}"#,
            ),
        ])
        .await;
        let items = api(&addr, None)
            .list_all("/v1/projects/demo/topics", "topics")
            .await
            .unwrap();
        let names: Vec<_> = items.iter().map(|t| t["name"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            [
                "projects/demo/topics/a",
                "projects/demo/topics/b",
                "projects/demo/topics/c"
            ]
        );
        let seen = task.await.unwrap();
        assert_eq!(
            seen[0],
            "GET /v1/projects/demo/topics?pageSize=1000 HTTP/1.1"
        );
        assert_eq!(
            seen[1],
            "GET /v1/projects/demo/topics?pageSize=1000&pageToken=p+2 HTTP/1.1"
        );
        assert_eq!(
            seen[2],
            "GET /v1/projects/demo/topics?pageSize=1000&pageToken=p3 HTTP/1.1"
        );
    }

    #[tokio::test]
    async fn list_all_stops_on_a_repeated_token() {
        let page = r#"{"topics":[],"nextPageToken":"same"}"#;
        let (addr, _task) =
            fake_server(vec![("200 OK", page), ("200 OK", page), ("200 OK", page)]).await;
        let err = api(&addr, None)
            .list_all("/v1/projects/demo/topics", "topics")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("repeated page token"), "{err}");
    }

    #[tokio::test]
    async fn errors_say_what_happened() {
        let (addr, _task) = fake_server(vec![
            (
                "404 Not Found",
                r#"{"error":{"code":404,"message":"topic projects/demo/topics/x not found","status":"NOT_FOUND"}}"#,
            ),
            ("404 Not Found", ""),
            ("500 Internal Server Error", "boom"),
            (
                "401 Unauthorized",
                r#"{"error":{"code":401,"message":"m","status":"UNAUTHENTICATED"}}"#,
            ),
            ("200 OK", "not json"),
            ("200 OK", ""),
        ])
        .await;
        let a = api(&addr, None);
        let e = a.get("/v1/x").await.unwrap_err().to_string();
        assert_eq!(e, "NOT_FOUND: topic projects/demo/topics/x not found");
        let e = a.get("/v1/x").await.unwrap_err().to_string();
        assert!(
            e.contains("404") && e.contains("does not serve this REST route"),
            "{e}"
        );
        let e = a.get("/v1/x").await.unwrap_err().to_string();
        assert!(e.contains("500") && e.contains("boom"), "{e}");
        let e = a.get("/v1/x").await.unwrap_err().to_string();
        assert!(
            e.contains("requires a token") && e.contains("PUBRUN_TOKEN"),
            "{e}"
        );
        let e = a.get("/v1/x").await.unwrap_err().to_string();
        assert!(e.contains("not JSON"), "{e}");
        assert_eq!(a.delete("/v1/x").await.unwrap(), serde_json::json!({}));
    }
}
