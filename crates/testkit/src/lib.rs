//! Helpers the integration tests of every crate share (dev-dependency only).
//!
//! The rule for what a test needs from the machine: where Docker or a tool
//! is missing, a test prints `SKIPPED <test>: <why>` and passes, except under
//! `CI=true`, where it fails, so CI never skips silently.

pub mod token_endpoint;

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Whether we run under CI (`CI=true`), where nothing may be skipped.
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Skips `test` with `why` (returns `false`), or panics under `CI=true`.
pub fn skip(test: &str, why: &str) -> bool {
    if ci() {
        panic!("{test}: CI=true but {why}");
    }
    eprintln!("SKIPPED {test}: {why}");
    false
}

/// Whether a Docker engine answers (`docker version`); asked once per test
/// binary. Skips (`false`, with a message) when none does; panics under
/// `CI=true`.
pub fn require_docker(test: &str) -> bool {
    static ANSWERS: OnceLock<bool> = OnceLock::new();
    let answers = *ANSWERS.get_or_init(|| {
        Command::new("docker")
            .args(["version", "--format", "{{.Server.Version}}"])
            .stdin(Stdio::null())
            .output()
            .is_ok_and(|o| o.status.success())
    });
    answers
        || skip(
            test,
            "no Docker engine answers (`docker version` failed); start dockerd or set DOCKER_HOST",
        )
}

/// A client of the local Docker engine with the API version negotiated
/// (bollard speaks a newer API than e.g. Debian's Docker 20.10); panics
/// when none answers (check [`require_docker`] first).
pub async fn docker_client() -> bollard::Docker {
    bollard::Docker::connect_with_defaults()
        .unwrap()
        .negotiate_version()
        .await
        .expect("docker engine")
}

/// The program `cmd` on `PATH`, or `None`.
pub fn on_path(cmd: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
}

/// `cmd` on `PATH`, or `None` after a skip message (a panic under
/// `CI=true`); `hint` says how to install it.
pub fn require(test: &str, cmd: &str, hint: &str) -> Option<PathBuf> {
    let found = on_path(cmd);
    if found.is_none() {
        skip(test, &format!("`{cmd}` is not installed ({hint})"));
    }
    found
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

/// The repository's root (for `scripts/`, `examples/`, the Dockerfile).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs `cmd` with stdin closed and returns its stdout; panics naming
/// `what`, with the exit status and both outputs, when it fails.
pub fn run_ok(what: &str, cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    output_ok(what, &out)
}

/// The stdout of a finished command; panics naming `what`, with the exit
/// status and both outputs, when it failed.
pub fn output_ok(what: &str, out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `bash scripts/<name> <args>`; its trimmed stdout, or an error
/// carrying both outputs.
pub fn run_script(name: &str, args: &[&str]) -> Result<String, String> {
    let script = repo_root().join("scripts").join(name);
    let out = Command::new("bash")
        .arg(&script)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "{} failed ({}):\n{}{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Calls `probe` every `every` until it returns `Ok` (that value); once
/// `patience` has passed, panics with `fail` of what it saw last (the
/// message is made only then: it may read a log), so a wait can report the
/// run or reply it last saw.
pub fn poll_until<T, S>(
    patience: Duration,
    every: Duration,
    mut probe: impl FnMut() -> Result<T, S>,
    fail: impl FnOnce(S) -> String,
) -> T {
    let deadline = Instant::now() + patience;
    loop {
        let seen = match probe() {
            Ok(v) => return v,
            Err(seen) => seen,
        };
        assert!(Instant::now() < deadline, "{}", fail(seen));
        std::thread::sleep(every);
    }
}

/// [`poll_until`] for async tests: `probe` is awaited, the pause does not
/// block the runtime (servers may run in it).
pub async fn poll_until_async<T, S, Fut>(
    patience: Duration,
    every: Duration,
    mut probe: impl FnMut() -> Fut,
    fail: impl FnOnce(S) -> String,
) -> T
where
    Fut: Future<Output = Result<T, S>>,
{
    let deadline = Instant::now() + patience;
    loop {
        let seen = match probe().await {
            Ok(v) => return v,
            Err(seen) => seen,
        };
        assert!(Instant::now() < deadline, "{}", fail(seen));
        tokio::time::sleep(every).await;
    }
}

/// A [`poll_until`] probe's answer: `Ok(seen)` when `done`, else `Err(seen)`.
pub fn ready_if<T>(done: bool, seen: T) -> Result<T, T> {
    if done {
        Ok(seen)
    } else {
        Err(seen)
    }
}

/// Polls `cond` every 100 ms until it returns `Some`; panics naming `what`
/// (and `log()`, e.g. a server's log) after `patience`.
pub fn wait_until<T>(
    what: &str,
    patience: Duration,
    mut cond: impl FnMut() -> Option<T>,
    log: impl Fn() -> String,
) -> T {
    poll_until(
        patience,
        Duration::from_millis(100),
        || cond().ok_or(()),
        |()| format!("timed out after {patience:?} waiting for {what}\n{}", log()),
    )
}

/// [`wait_until`] for async checks, polled every 50 ms on the tokio timer.
pub async fn eventually<T, F, Fut>(what: &str, patience: Duration, mut cond: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let probe = || {
        let fut = cond();
        async move { fut.await.ok_or(()) }
    };
    poll_until_async(patience, Duration::from_millis(50), probe, |()| {
        format!("timed out after {patience:?} waiting for {what}")
    })
    .await
}

/// Awaits `f`; panics naming `what` once `patience` has passed.
pub async fn within<T>(what: &str, patience: Duration, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(patience, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: took longer than {patience:?}"))
}

/// Polls the async `cond` every 50 ms on the tokio timer until it returns
/// `Some`; `None` once `patience` has passed.
pub async fn poll<T, F, Fut>(patience: Duration, mut cond: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + patience;
    loop {
        if let Some(v) = cond().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A fresh 2048-bit RSA key pair made by `openssl` in `dir` (as
/// `<name>.pem` and `<name>.pub.pem`): (private PKCS#8 PEM, public SPKI PEM).
/// For service-account keys and the token endpoints that verify them.
pub fn rsa_key(dir: &Path, name: &str) -> (String, String) {
    let key = dir.join(format!("{name}.pem"));
    let public = dir.join(format!("{name}.pub.pem"));
    let (key_arg, public_arg) = (key.to_str().unwrap(), public.to_str().unwrap());
    for args in [
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            key_arg,
        ][..],
        &["pkey", "-in", key_arg, "-pubout", "-out", public_arg],
    ] {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl is installed (.ci/run installs it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (
        std::fs::read_to_string(key).unwrap(),
        std::fs::read_to_string(public).unwrap(),
    )
}
