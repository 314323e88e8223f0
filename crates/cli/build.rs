//! Stamps the git commit into `pubrun --version` (env PUBRUN_GIT_COMMIT).
//! Outside a git checkout (a source tarball, a Docker build context without
//! .git) the commit is "unknown" unless PUBRUN_GIT_COMMIT is set by the caller.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-env-changed=PUBRUN_GIT_COMMIT");
    let commit = std::env::var("PUBRUN_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| git(&["rev-parse", "--short=10", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    // Rebuild the stamp when HEAD moves (a commit, a checkout). logs/HEAD
    // changes on every commit, HEAD itself on a branch switch; in a
    // worktree these are the worktree's own files.
    for p in ["HEAD", "logs/HEAD"] {
        if let Some(path) = git(&["rev-parse", "--git-path", p]) {
            let path = std::path::Path::new(&path);
            let path = if path.is_relative() {
                std::env::current_dir().unwrap().join(path)
            } else {
                path.to_path_buf()
            };
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
    println!("cargo:rustc-env=PUBRUN_GIT_COMMIT={commit}");
}
