//! Outgoing TLS: a push subscription delivers to an https:// endpoint whose
//! certificate the server trusts through `SSL_CERT_FILE` (rustls with the
//! system's roots otherwise), and refuses one it does not trust.
//!
//! The endpoint is Python's http.server wrapped in TLS with a certificate
//! for 127.0.0.1 from a throwaway CA, both made by `openssl`.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Cli, Serve, ServeBuilder, Server};

const PATIENCE: Duration = Duration::from_secs(60);

/// Writes each POST body to `DIR/N.json` and answers 200 (or 500 with FAIL).
const RECEIVER: &str = r#"
import http.server, ssl, sys, os, itertools
port, cert, key, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
counter = itertools.count()
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        path = os.path.join(out, "%d.json" % next(counter))
        with open(path + ".tmp", "wb") as f:
            f.write(body)
        os.rename(path + ".tmp", path)
        self.send_response(200)
        self.end_headers()
    def log_message(self, *a):
        pass
srv = http.server.HTTPServer(("127.0.0.1", port), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print("ready", flush=True)
srv.serve_forever()
"#;

/// A CA (`ca.pem`, what the server is told to trust) and a certificate for
/// 127.0.0.1 signed by it (`cert.pem` + `key.pem`, what the endpoint shows);
/// rustls refuses a self-signed CA certificate used as the endpoint's own.
fn make_certificates(dir: &Path) -> bool {
    let ext = dir.join("leaf.ext");
    if std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .is_err()
    {
        return false;
    }
    let steps: [Vec<&str>; 3] = [
        vec![
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=pubrun test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
        vec![
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "key.pem",
            "-out",
            "leaf.csr",
        ],
        vec![
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "leaf.ext",
            "-out",
            "cert.pem",
        ],
    ];
    steps.iter().all(|args| {
        Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// Serves `dir` on `port`, logging push attempts to `log`.
fn serve(dir: &Path, port: u16, trust: Option<&Path>, log: &Path) -> Serve {
    let b = ServeBuilder::new()
        .dir(log.parent().unwrap())
        .log_name(log.file_name().unwrap().to_str().unwrap())
        .data_dir(dir)
        .port(port)
        .log_level("warn,pubrun_broker::push=debug")
        .patience(PATIENCE);
    match trust {
        Some(cert) => b.env("SSL_CERT_FILE", cert),
        None => b.env_remove("SSL_CERT_FILE"),
    }
    .start()
}

fn cli(port: u16, args: &[&str]) -> String {
    Cli::new(args)
        .env("PUBRUN_ADDR", format!("http://127.0.0.1:{port}"))
        .ok()
}

fn received(dir: &Path) -> Vec<serde_json::Value> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap())
        .collect()
}

#[test]
fn push_reaches_an_https_endpoint_only_when_its_certificate_is_trusted() {
    let tmp = tempfile::tempdir().unwrap();
    if !make_certificates(tmp.path()) {
        pubrun_testkit::skip(
            "push_reaches_an_https_endpoint_only_when_its_certificate_is_trusted",
            "openssl could not make a certificate (.ci/run installs openssl)",
        );
        return;
    }
    let inbox = tmp.path().join("inbox");
    std::fs::create_dir(&inbox).unwrap();
    let https_port = common::free_port();
    let mut receiver = Command::new("python3")
        .args(["-c", RECEIVER, &https_port.to_string()])
        .arg(tmp.path().join("cert.pem"))
        .arg(tmp.path().join("key.pem"))
        .arg(&inbox)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(receiver.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready");
    }
    let _receiver = Server(receiver);
    let endpoint = format!("https://127.0.0.1:{https_port}/push");

    // A server that does not trust the certificate: nothing is delivered
    // (the handshake fails), the message stays in the subscription.
    let port = common::free_port();
    let data = tmp.path().join("untrusting");
    let log = tmp.path().join("untrusting.log");
    let server = serve(&data, port, None, &log);
    cli(port, &["topics", "create", "tls-topic"]);
    cli(
        port,
        &[
            "subscriptions",
            "create",
            "tls-sub",
            "--topic",
            "tls-topic",
            "--push-endpoint",
            &endpoint,
        ],
    );
    cli(port, &["publish", "tls-topic", "--data", "first"]);
    pubrun_testkit::wait_until(
        "a failed push attempt in the log",
        PATIENCE,
        || {
            std::fs::read_to_string(&log)
                .is_ok_and(|l| l.contains("push request failed"))
                .then_some(())
        },
        String::new,
    );
    drop(server);
    assert!(received(&inbox).is_empty(), "{:?}", received(&inbox));

    // The same data directory, now trusting it: the kept message arrives,
    // over TLS, in Google's envelope.
    let _server = serve(
        &data,
        port,
        Some(&tmp.path().join("ca.pem")),
        &tmp.path().join("trusting.log"),
    );
    let deadline = Instant::now() + PATIENCE;
    let got = loop {
        let got = received(&inbox);
        if !got.is_empty() {
            break got;
        }
        assert!(
            Instant::now() < deadline,
            "nothing pushed to {endpoint}:\n{}\n--- before ---\n{}",
            std::fs::read_to_string(tmp.path().join("trusting.log")).unwrap_or_default(),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let m = &got[0]["message"];
    assert_eq!(m["data"], "Zmlyc3Q=", "{got:?}"); // base64("first")
    assert_eq!(
        got[0]["subscription"],
        "projects/demo/subscriptions/tls-sub"
    );
}
