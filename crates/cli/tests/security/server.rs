//! The server's own defences (issue 11): cross-site requests and DNS
//! rebinding (item 0), body limits (8), slow and idle connections, the
//! connection cap and the open-file limit (11), the bearer scheme (13).

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use googleapis_tonic_google_pubsub_v1::google::pubsub::v1 as pb;
use pb::publisher_client::PublisherClient;

use crate::common::{self, fill, Serve, ServeBuilder};

const BIN: &str = env!("CARGO_BIN_EXE_pubrun");
const PATIENCE: Duration = Duration::from_secs(60);

/// `pubrun serve` on loopback with `manifest` as `--config` and `extra` flags.
fn start(manifest: &str, extra: &[&str]) -> Serve {
    start_via(manifest, extra, None)
}

/// The same, started through `sh -c SCRIPT` (which ends in `exec "$@"`).
fn start_via(manifest: &str, extra: &[&str], shell: Option<&str>) -> Serve {
    let mut b = ServeBuilder::new()
        .config(manifest)
        .args(extra)
        .log_level("info")
        .patience(PATIENCE);
    if let Some(script) = shell {
        b = b.via_shell(script);
    }
    b.start()
}

/// Requests of the server tests (names unique in the `security` crate).
impl Serve {
    fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .args(args)
            .env("PUBRUN_ADDR", self.addr())
            .env("PUBRUN_PROJECT", "demo")
            .env_remove("PUBRUN_TOKEN")
            .output()
            .unwrap()
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", self.port())).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s
    }

    /// One HTTP/1.1 request with exactly these headers (plus
    /// `Content-Length` and `Connection: close`; `Host` unless given).
    fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> (u16, String) {
        let mut head = format!("{method} {path} HTTP/1.1\r\n");
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            head.push_str(&format!("Host: 127.0.0.1:{}\r\n", self.port()));
        }
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str(&format!(
            "Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        ));
        let mut s = self.connect();
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(body).unwrap();
        read_response(&mut s)
    }
}

/// Reads a whole `Connection: close` response: (status, text).
fn read_response(s: &mut TcpStream) -> (u16, String) {
    let mut resp = Vec::new();
    if let Err(e) = s.read_to_end(&mut resp) {
        // A reset after a complete answer still leaves the answer.
        assert!(!resp.is_empty(), "no response: {e}");
    }
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    (status, text)
}

const KEEP: &str = "project = \"demo\"\n[[topic]]\nname = \"keep\"\n";

/// What a hostile page posts: a job that runs a shell command, in a
/// manifest without the existing topic (so applying it deletes that).
fn hostile_manifest(target: &Path) -> String {
    fill(
        include_str!("../manifests/security-hostile.toml"),
        &[("target", &target.display())],
    )
}

/// Issue 11, item 0: a web page could apply a manifest and trigger a job
/// (code execution) on the default loopback server with simple requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_site_requests_cannot_apply_or_trigger() {
    let s = start(KEEP, &[]);
    let target = s.path("pwned");
    let evil = hostile_manifest(&target);
    let port = s.port();
    let own_origin = format!("http://127.0.0.1:{port}");

    // (path, what the refusal says, headers)
    type Case<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>);
    let refused: &[Case] = &[
        // The attack as filed: a text/plain POST from another origin.
        (
            "/api/v1/apply",
            "cross-origin",
            vec![
                ("Content-Type", "text/plain"),
                ("Origin", "http://evil.example"),
            ],
        ),
        // A form post whose browser sends no Origin: simple content type.
        (
            "/api/v1/apply",
            "Content-Type",
            vec![("Content-Type", "text/plain")],
        ),
        (
            "/api/v1/apply",
            "Content-Type",
            vec![("Content-Type", "application/x-www-form-urlencoded")],
        ),
        // A no-cors fetch with no body at all.
        ("/api/v1/jobs/pwn/trigger", "Content-Type", vec![]),
        (
            "/api/v1/jobs/pwn/trigger",
            "cross-origin",
            vec![
                ("Content-Type", "text/plain"),
                ("Origin", "http://evil.example"),
            ],
        ),
        // Another port on the same host is another origin.
        (
            "/api/v1/apply",
            "cross-origin",
            vec![
                ("Content-Type", "application/toml"),
                ("Origin", "http://127.0.0.1:1"),
            ],
        ),
        (
            "/api/v1/apply",
            "cross-site",
            vec![
                ("Content-Type", "application/toml"),
                ("Sec-Fetch-Site", "cross-site"),
            ],
        ),
        // DNS rebinding: the attacker's name resolves to 127.0.0.1.
        (
            "/api/v1/apply",
            "--allowed-host",
            vec![
                ("Content-Type", "application/toml"),
                ("Host", "evil.example"),
            ],
        ),
        // Google-compatible routes too.
        (
            "/v1/projects/demo/topics/keep:publish",
            "cross-origin",
            vec![
                ("Content-Type", "text/plain"),
                ("Origin", "http://evil.example"),
            ],
        ),
    ];
    for (path, why, headers) in refused {
        let (status, text) = s.request("POST", path, headers, evil.as_bytes());
        assert_eq!(status, 403, "POST {path} {headers:?}:\n{text}");
        assert!(
            text.contains(why),
            "POST {path} {headers:?}: {why:?} not in\n{text}"
        );
    }
    // Reading through a rebound name is refused as well.
    let (status, text) = s.request(
        "GET",
        "/v1/projects/demo/topics/keep",
        &[("Host", "evil.example:8085")],
        b"",
    );
    assert_eq!(status, 403, "{text}");

    // Nothing ran and nothing was deleted.
    assert!(!target.exists(), "the hostile job ran");
    let (status, text) = s.request("GET", "/v1/projects/demo/topics/keep", &[], b"");
    assert_eq!(status, 200, "the existing topic is gone: {text}");
    let (status, text) = s.request("GET", "/api/v1/jobs/pwn", &[], b"");
    assert_eq!(status, 404, "the hostile job exists: {text}");

    // The server's own origin and non-browser clients with a real content
    // type are fine (dry run: nothing changes).
    let (status, text) = s.request(
        "POST",
        "/api/v1/apply?dry_run=true",
        &[
            ("Content-Type", "application/toml"),
            ("Origin", own_origin.as_str()),
            ("Sec-Fetch-Site", "same-origin"),
        ],
        evil.as_bytes(),
    );
    assert_eq!(status, 200, "{text}");
    let (status, text) = s.request(
        "POST",
        "/api/v1/apply?dry_run=true",
        &[("Content-Type", "application/toml"), ("Host", "localhost")],
        evil.as_bytes(),
    );
    assert_eq!(status, 200, "{text}");

    // gRPC and HTTP/2: :authority is checked the same way.
    let rebound = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .origin(format!("http://evil.example:{port}").parse().unwrap())
        .connect()
        .await
        .unwrap();
    let err = PublisherClient::new(rebound)
        .get_topic(pb::GetTopicRequest {
            topic: "projects/demo/topics/keep".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("--allowed-host"), "{err:?}");
    let topic = PublisherClient::new(common::connect(port).await)
        .get_topic(pb::GetTopicRequest {
            topic: "projects/demo/topics/keep".into(),
        })
        .await
        .unwrap();
    assert_eq!(topic.get_ref().name, "projects/demo/topics/keep");

    // The CLI's apply and trigger still work (and so the job runs).
    let manifest = s.path("mine.toml");
    std::fs::write(&manifest, format!("{evil}\n[[topic]]\nname = \"keep\"\n")).unwrap();
    common::stdout_ok("apply", s.cli(&["apply", "-f", manifest.to_str().unwrap()]));
    common::stdout_ok("jobs trigger", s.cli(&["jobs", "trigger", "pwn"]));
    let deadline = Instant::now() + PATIENCE;
    while !target.exists() {
        assert!(
            Instant::now() < deadline,
            "the CLI-triggered job did not run\n{}",
            s.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `--allowed-host` and `--public-url` add names; their requests pass.
#[test]
fn allowed_hosts_and_public_url_are_served() {
    let s = start(
        KEEP,
        &[
            "--allowed-host",
            "pubrun.internal",
            "--public-url",
            "https://pubrun.example.com/",
        ],
    );
    for host in [
        "pubrun.internal:8085",
        "pubrun.example.com",
        "PUBRUN.INTERNAL",
    ] {
        let (status, text) = s.request(
            "GET",
            "/v1/projects/demo/topics/keep",
            &[("Host", host)],
            b"",
        );
        assert_eq!(status, 200, "{host}: {text}");
    }
    // The public URL's origin is the server's own, even through a proxy
    // that rewrites Host.
    let (status, text) = s.request(
        "POST",
        "/api/v1/apply?dry_run=true",
        &[
            ("Content-Type", "application/toml"),
            ("Origin", "https://pubrun.example.com"),
        ],
        KEEP.as_bytes(),
    );
    assert_eq!(status, 200, "{text}");
    let (status, text) = s.request(
        "GET",
        "/v1/projects/demo/topics/keep",
        &[("Host", "other.example")],
        b"",
    );
    assert_eq!(status, 403, "{text}");
}

/// Issue 11, item 13: RFC 6750's scheme name is case-insensitive.
#[test]
fn bearer_scheme_is_case_insensitive() {
    let s = start(KEEP, &["--token", "s3cret"]);
    for auth in ["Bearer s3cret", "bearer s3cret", "BEARER s3cret"] {
        let (status, text) = s.request(
            "GET",
            "/v1/projects/demo/topics/keep",
            &[("Authorization", auth)],
            b"",
        );
        assert_eq!(status, 200, "{auth}: {text}");
    }
    for auth in ["Basic s3cret", "Bearer wrong", "bearers3cret"] {
        let (status, text) = s.request(
            "GET",
            "/v1/projects/demo/topics/keep",
            &[("Authorization", auth)],
            b"",
        );
        assert_eq!(status, 401, "{auth}: {text}");
    }
}

/// Issue 11, item 8: a declared body over the limit is refused before it
/// is read; Cloud Storage uploads stream past that limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_are_refused_before_reading_them() {
    let s = start(&format!("{KEEP}[[bucket]]\nname = \"input\"\n"), &[]);
    for path in [
        "/api/v1/apply",
        "/v1/projects/demo/topics/keep:publish",
        "/storage/v1/b",
    ] {
        // Headers only: the server must answer without waiting for 1 GiB.
        let mut c = s.connect();
        write!(
            c,
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Content-Length: 1073741824\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let started = Instant::now();
        let (status, text) = read_response(&mut c);
        assert_eq!(status, 413, "{path}: {text}");
        assert!(started.elapsed() < Duration::from_secs(20), "{path}");
    }
    // A 40 MiB object goes through the streaming upload route.
    let body = vec![7u8; 40 << 20];
    let resp = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(format!(
            "http://127.0.0.1:{}/upload/storage/v1/b/input/o?uploadType=media&name=big",
            s.port()
        ))
        .header("content-type", "application/octet-stream")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    assert_eq!(status, 200, "{text}");
    assert!(text.contains(&(40u64 << 20).to_string()), "{text}");
}

/// Issue 11, item 11: a connection that sends a partial header, or
/// nothing, is closed after the header-read timeout.
#[test]
fn slow_and_silent_connections_are_closed() {
    let s = start(
        KEEP,
        &["--header-read-timeout", "1s", "--idle-timeout", "1s"],
    );
    let mut partial = s.connect();
    partial
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: loc")
        .unwrap();
    let silent = s.connect();
    let started = Instant::now();
    for mut c in [partial, silent] {
        let mut buf = Vec::new();
        match c.read_to_end(&mut buf) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Err(e) => panic!("connection not closed by the server: {e}"),
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "closed only after {:?}",
        started.elapsed()
    );
}

/// Issue 11, item 11: beyond `--max-connections` a connection gets a fast
/// 503; once idle connections are closed, new ones are served again.
#[test]
fn connections_beyond_the_cap_get_503() {
    let s = start(
        KEEP,
        &[
            "--max-connections",
            "3",
            "--header-read-timeout",
            "4s",
            "--idle-timeout",
            "4s",
        ],
    );
    // Three keep-alive connections, each proven to hold a slot by an answer.
    let mut held = Vec::new();
    for _ in 0..50 {
        if held.len() == 3 {
            break;
        }
        let mut c = s.connect();
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = c.read(&mut buf).unwrap();
        let head = String::from_utf8_lossy(&buf[..n]);
        if head.starts_with("HTTP/1.1 200") {
            held.push(c);
        } else {
            // A slot still held by the health check's closing connection.
            assert!(head.starts_with("HTTP/1.1 503"), "{head}");
        }
    }
    assert_eq!(held.len(), 3, "could not fill the connection slots");
    let started = Instant::now();
    let (status, text) = s.request("GET", "/healthz", &[], b"");
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("--max-connections"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // The server closes the idle ones...
    for mut c in held {
        let mut rest = Vec::new();
        match c.read_to_end(&mut rest) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Err(e) => panic!("idle connection not closed: {e}"),
        }
    }
    // ...and a fresh connection is served again.
    let deadline = Instant::now() + PATIENCE;
    while !common::healthz(s.port()) {
        assert!(Instant::now() < deadline, "not served again\n{}", s.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Open streams keep their connection however long they last: a
/// StreamingPull outlives the idle timeout and still receives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_pull_outlives_the_idle_timeout() {
    let s = start(
        &format!("{KEEP}[[subscription]]\nname = \"keep-sub\"\ntopic = \"keep\"\n"),
        &["--header-read-timeout", "1s", "--idle-timeout", "1s"],
    );
    let ch = common::connect(s.port()).await;
    let (tx, mut stream) =
        common::open_streaming_pull(&ch, "projects/demo/subscriptions/keep-sub", 60).await;
    // Longer than the idle timeout, on purpose.
    tokio::time::sleep(Duration::from_secs(3)).await;
    PublisherClient::new(ch)
        .publish(pb::PublishRequest {
            topic: "projects/demo/topics/keep".into(),
            messages: vec![pb::PubsubMessage {
                data: b"still here".to_vec().into(),
                ..Default::default()
            }],
        })
        .await
        .unwrap();
    let got = tokio::time::timeout(PATIENCE, stream.message())
        .await
        .expect("no message within the patience")
        .expect("stream failed")
        .expect("stream ended");
    assert_eq!(
        &got.received_messages[0].message.as_ref().unwrap().data[..],
        b"still here"
    );
    drop(tx);
}

/// Issue 11, item 11: the soft open-file limit is raised to the hard one.
#[test]
fn open_file_limit_is_raised() {
    let s = start_via(KEEP, &[], Some("ulimit -Sn 256 && exec \"$@\""));
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", s.pid())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let nums: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(nums[0], nums[1], "soft limit not raised: {line}");
    assert_ne!(nums[0], "256", "{line}");
}
