//! What installing pubrun relies on: `--version` with the commit,
//! completions, man pages, `healthcheck`, `--token-file`, and the systemd
//! units as examples/systemd/install.sh puts them in place.

mod common;

use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_pubrun");
const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

fn pubrun(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("PUBRUN_TOKEN")
        .env_remove("PUBRUN_TOKEN_FILE")
        .env_remove("PUBRUN_ADDR")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn stdout_ok(args: &[&str]) -> String {
    let out = pubrun(args);
    assert!(
        out.status.success(),
        "pubrun {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn version_names_the_commit() {
    let v = stdout_ok(&["--version"]);
    let commit = Command::new("git")
        .args(["rev-parse", "--short=10", "HEAD"])
        .current_dir(ROOT)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8(o.stdout).unwrap().trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    assert_eq!(
        v.trim(),
        format!("pubrun {} ({commit})", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn completions_cover_the_commands() {
    for shell in ["bash", "zsh", "fish", "powershell"] {
        let script = stdout_ok(&["completions", shell]);
        for word in ["serve", "agent", "objects", "subscriptions", "token-file"] {
            assert!(script.contains(word), "{shell} completions lack {word}");
        }
    }
    let e = pubrun(&["completions", "tcsh"]);
    assert!(!e.status.success());
    assert!(String::from_utf8_lossy(&e.stderr).contains("possible values"));
}

#[test]
fn man_pages_render() {
    let page = stdout_ok(&["man"]);
    assert!(page.contains(".TH pubrun 1"), "{page}");
    assert!(page.contains("objects") && page.contains("serve"));
    let dir = tempfile::tempdir().unwrap();
    stdout_ok(&["man", "--dir", dir.path().to_str().unwrap()]);
    for p in [
        "pubrun.1",
        "pubrun-serve.1",
        "pubrun-objects-cp.1",
        "pubrun-agent.1",
    ] {
        assert!(dir.path().join(p).exists(), "{p} not written");
    }
    if have("man") {
        // man(1) formats it: what a user sees for `man pubrun-objects-cp`.
        let out = Command::new("man")
            .arg("-l")
            .arg(dir.path().join("pubrun-objects-cp.1"))
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "100")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("SYNOPSIS") && text.contains("--recursive"),
            "{text}"
        );
        assert!(!text.contains(".TH"), "unformatted roff: {text}");
    }
}

#[test]
fn healthcheck_and_token_file() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let token = dir.path().join("token");
    std::fs::write(&token, "from-a-file\n").unwrap();
    let addr = format!("http://127.0.0.1:{port}");

    // Nothing listening: exit 1 with the reason.
    let out = pubrun(&["healthcheck", "--addr", &addr, "--timeout", "2s"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/healthz"));

    let both = pubrun(&[
        "serve",
        "--token",
        "x",
        "--token-file",
        token.to_str().unwrap(),
    ]);
    assert!(!both.status.success());
    assert!(String::from_utf8_lossy(&both.stderr).contains("cannot be used with"));

    // The agent takes its pool token the same way.
    let missing = dir.path().join("no-such-token");
    let agent = pubrun(&[
        "agent",
        "--server",
        "http://127.0.0.1:1",
        "--pool",
        "p",
        "--token-file",
        missing.to_str().unwrap(),
    ]);
    assert!(
        String::from_utf8_lossy(&agent.stderr).contains("reading the token file"),
        "{agent:?}"
    );
    let agent = pubrun(&["agent", "--server", "http://127.0.0.1:1", "--pool", "p"]);
    assert!(
        String::from_utf8_lossy(&agent.stderr).contains("--token"),
        "{agent:?}"
    );

    let _server = common::ServeBuilder::new()
        .dir(dir.path())
        .port(port)
        .arg("--token-file")
        .arg(&token)
        // The manifest install.sh puts in /etc/pubrun applies cleanly.
        .arg("--config")
        .arg(format!("{ROOT}/examples/systemd/pubrun.toml"))
        .start();

    assert_eq!(stdout_ok(&["healthcheck", "--addr", &addr]).trim(), "ok");
    let no = pubrun(&["topics", "list", "--addr", &addr]);
    assert!(String::from_utf8_lossy(&no.stderr).contains("requires a token"));
    let topics = stdout_ok(&["topics", "list", "--addr", &addr, "--token", "from-a-file"]);
    assert!(topics.contains("work"), "{topics}");
}

#[test]
fn systemd_units_verify_after_install() {
    if !have("systemd-analyze") {
        panic!("systemd-analyze is missing: apt-get install systemd (.ci/run does)");
    }
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    // Installed into a temporary root with absolute paths, so ExecStart
    // names a binary that exists (verify checks it).
    let install = || {
        Command::new("bash")
            .arg(format!("{ROOT}/examples/systemd/install.sh"))
            .arg(BIN)
            .env("PREFIX", r.join("usr"))
            .env("SYSCONFDIR", r.join("etc"))
            .env("UNITDIR", r.join("units"))
            .output()
            .unwrap()
    };
    let out = install();
    assert!(
        out.status.success(),
        "install.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "usr/bin/pubrun",
        "etc/pubrun/pubrun.toml",
        "etc/pubrun/token",
        "etc/pubrun/agent.env",
        "usr/share/bash-completion/completions/pubrun",
        "usr/share/zsh/site-functions/_pubrun",
        "usr/share/fish/vendor_completions.d/pubrun.fish",
        "usr/share/man/man1/pubrun-serve.1",
    ] {
        assert!(r.join(f).exists(), "install.sh did not write {f}");
    }
    let token = std::fs::read_to_string(r.join("etc/pubrun/token")).unwrap();
    assert_eq!(token.len(), 64, "a 32-byte hex token");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(r.join("etc/pubrun/token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "the token file is private");

    let unit = std::fs::read_to_string(r.join("units/pubrun.service")).unwrap();
    for must in [
        "DynamicUser=yes",
        "StateDirectory=pubrun",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "LoadCredential=pubrun-token:",
        "--token-file %d/pubrun-token",
    ] {
        assert!(unit.contains(must), "pubrun.service lacks {must}");
    }
    assert!(!unit.contains("--token "), "no token on the command line");

    let mut verify = Command::new("systemd-analyze");
    verify.arg("verify");
    if have("man") {
        verify.env("MANPATH", r.join("usr/share/man"));
    } else {
        verify.arg("--man=no");
    }
    let out = verify
        .arg(r.join("units/pubrun.service"))
        .arg(r.join("units/pubrun-agent.service"))
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Installing again keeps the operator's config and token.
    std::fs::write(r.join("etc/pubrun/pubrun.toml"), "# mine\n").unwrap();
    let again = install();
    assert!(again.status.success());
    assert_eq!(
        std::fs::read_to_string(r.join("etc/pubrun/pubrun.toml")).unwrap(),
        "# mine\n"
    );
    assert_eq!(
        std::fs::read_to_string(r.join("etc/pubrun/token")).unwrap(),
        token
    );
}
