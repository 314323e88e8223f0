//! Runs an attempt as a local child process.
//!
//! The command starts in a process group of its own, so a timeout or a cancel
//! reaches everything it started: SIGTERM to the whole group, `grace_period`
//! to finish, then SIGKILL to the group. When the main process ends, whatever
//! it left behind in its group is killed too (as Docker does when a
//! container's main process exits), so an attempt never leaks processes and
//! its output pipes close.
//!
//! * Working directory: `spec.working_dir` when set (a relative path is taken
//!   relative to the run's directory), else the run's directory.
//! * Environment: cleared, then [`crate::base_env`] (`PATH`, `HOME`, `LANG`,
//!   `TZ` of this process), then `spec.env`, `req.env` (run variables,
//!   `pass_env`) and `req.secrets` — see [`crate::job_env`]. The rest of the
//!   server's (or agent's) environment never reaches the job.
//! * stdin is `/dev/null`; stdout and stderr go to the [`LogSink`] chunk by
//!   chunk as they are written, interleaved in arrival order.
//! * A zero `timeout` means no time limit.
//! * If the future returned by [`Executor::run`] is dropped before the
//!   process ended (server shutdown), the process group is killed: a process
//!   cannot be found again after a restart, so [`Executor::reattach`] returns
//!   `None`.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use pubrun_core::job::ExecutorSpec;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Child;
use tokio::task::JoinHandle;

use crate::{stop_cause, Attempt, EndCause, Executor, Exit, LogSink, Started};

/// How long the output readers may take to reach end-of-file after the
/// process group is gone. Only a process that left the group (setsid) and
/// still holds stdout/stderr open can make them wait that long.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);

pub struct ProcessExecutor {
    hostname: String,
}

impl ProcessExecutor {
    pub fn new() -> Self {
        ProcessExecutor {
            hostname: hostname(),
        }
    }
}

impl Default for ProcessExecutor {
    fn default() -> Self {
        Self::new()
    }
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates
    // when the name fits, and we stop at the first NUL either way.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

fn failed(msg: String) -> Exit {
    Exit {
        error: Some(msg),
        ..Default::default()
    }
}

/// Sends `sig` to process group `pgid`; a group that is already gone is fine.
fn signal_group(pgid: i32, sig: libc::c_int) {
    // SAFETY: killpg has no memory-safety preconditions.
    unsafe {
        libc::killpg(pgid, sig);
    }
}

/// Kills the process group if the run future is dropped before the end.
struct GroupGuard {
    pgid: i32,
    armed: bool,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed {
            signal_group(self.pgid, libc::SIGKILL);
        }
    }
}

fn pump<R: AsyncRead + Unpin + Send + 'static>(mut from: R, log: Arc<LogSink>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => log.write(&buf[..n]).await,
            }
        }
    })
}

/// SIGTERM to the group, up to `grace` for the main process to end, then
/// SIGKILL to the group (`*killed` is set then).
async fn terminate(
    child: &mut Child,
    pgid: i32,
    grace: Duration,
    log: &LogSink,
    killed: &mut bool,
) -> std::io::Result<std::process::ExitStatus> {
    signal_group(pgid, libc::SIGTERM);
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            log.note(&format!(
                "still running {} after SIGTERM: sending SIGKILL to process group {pgid}",
                secs(grace)
            ))
            .await;
            signal_group(pgid, libc::SIGKILL);
            *killed = true;
            child.wait().await
        }
    }
}

fn secs(d: Duration) -> String {
    format!("{}s", d.as_secs_f64())
}

fn resolve_cwd(spec_dir: &str, workdir: &Path) -> PathBuf {
    if spec_dir.is_empty() {
        workdir.to_path_buf()
    } else {
        // join keeps an absolute spec_dir as it is.
        workdir.join(spec_dir)
    }
}

/// The job's command as an absolute path when it is found on the job's own
/// `PATH` (directories relative to `cwd`), else unchanged. std spawns with
/// `posix_spawn` (no copy of the server's page tables) only when it need not
/// search a `PATH` of a replaced environment; otherwise it forks the whole
/// server, which cost a quarter of its CPU on a stream of short jobs. The
/// search mirrors the one `execvp` would make in the child; a command not
/// found is left to `spawn`, which reports it.
fn resolve_program(command: &str, path: Option<&str>, cwd: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    if command.contains('/') {
        return PathBuf::from(command);
    }
    for dir in path.unwrap_or(crate::DEFAULT_PATH).split(':') {
        // An empty entry means the current directory, as for execvp.
        let candidate = cwd
            .join(if dir.is_empty() { "." } else { dir })
            .join(command);
        let executable = std::fs::metadata(&candidate)
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
        if executable {
            return candidate;
        }
    }
    PathBuf::from(command)
}

#[async_trait::async_trait]
impl Executor for ProcessExecutor {
    async fn run(&self, attempt: Attempt) -> Exit {
        let Attempt {
            req,
            log,
            cancel,
            on_started,
        } = attempt;
        let spec = match &req.spec {
            ExecutorSpec::Process(p) => p,
            ExecutorSpec::Docker(d) => {
                return failed(format!(
                    "the process executor cannot run a docker job (image {})",
                    d.image
                ));
            }
        };
        if spec.command.is_empty() {
            return failed("cannot start: the command is empty".into());
        }
        let cwd = resolve_cwd(&spec.working_dir, &req.workdir);
        if !cwd.is_dir() {
            return failed(format!(
                "cannot start `{}`: working directory {} does not exist or is not a directory",
                spec.command,
                cwd.display()
            ));
        }
        if cancel.is_cancelled() {
            return Exit::failed(EndCause::Cancelled, "cancelled before it started");
        }

        let env = crate::job_env(crate::base_env(&req.workdir), &spec.env, &req);
        let program = resolve_program(&spec.command, env.get("PATH").map(String::as_str), &cwd);
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(&spec.args)
            .current_dir(&cwd)
            .env_clear()
            .envs(env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let hint = match e.kind() {
                    std::io::ErrorKind::NotFound if !spec.command.contains('/') => {
                        " (not found on PATH)"
                    }
                    std::io::ErrorKind::PermissionDenied => " (is it executable?)",
                    _ => "",
                };
                return failed(format!("cannot start `{}`: {e}{hint}", spec.command));
            }
        };
        let Some(pid) = child.id() else {
            return failed(format!(
                "cannot start `{}`: it ended before it could be observed",
                spec.command
            ));
        };
        let pgid = pid as i32;
        let mut guard = GroupGuard { pgid, armed: true };
        let mut pumps = Vec::with_capacity(2);
        if let Some(out) = child.stdout.take() {
            pumps.push(pump(out, log.clone()));
        }
        if let Some(err) = child.stderr.take() {
            pumps.push(pump(err, log.clone()));
        }
        on_started(Started {
            machine: self.hostname.clone(),
            handle: pid.to_string(),
        });

        let mut cause = EndCause::Exited;
        let mut killed_after_grace = false;
        let status = tokio::select! {
            status = child.wait() => status,
            (why, what) = stop_cause(req.timeout, &cancel) => {
                cause = why;
                log.note(&format!("{what}: sending SIGTERM to process group {pgid}")).await;
                terminate(&mut child, pgid, req.grace_period, &log, &mut killed_after_grace).await
            }
        };
        // The main process is gone: so is the attempt. Leftovers in its group
        // would hold the output pipes open; end them.
        signal_group(pgid, libc::SIGKILL);
        guard.armed = false;

        let drain = futures::future::join_all(pumps.iter_mut());
        if tokio::time::timeout(DRAIN_LIMIT, drain).await.is_err() {
            for p in &pumps {
                p.abort();
            }
            log.note("output is still open after the process ended (a process left its group?); no longer reading it")
                .await;
        }

        match status {
            Ok(st) => Exit {
                exit_code: st.code(),
                signal: st.signal(),
                cause,
                killed_after_grace,
                ..Default::default()
            },
            Err(e) => Exit {
                cause,
                killed_after_grace,
                error: Some(format!("lost track of `{}` (pid {pid}): {e}", spec.command)),
                ..Default::default()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::resolve_program;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    #[test]
    fn commands_resolve_on_the_jobs_own_path_like_execvp() {
        let dir = tempfile::tempdir().unwrap();
        let cwd = dir.path();
        std::fs::create_dir_all(cwd.join("bin")).unwrap();
        std::fs::create_dir_all(cwd.join("plain")).unwrap();
        let tool = cwd.join("bin/tool");
        std::fs::write(&tool, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        // Not executable: skipped, as execvp would.
        std::fs::write(cwd.join("plain/tool"), "").unwrap();

        let found = resolve_program("tool", Some("/nonexistent:plain:bin"), cwd);
        assert_eq!(found, cwd.join("bin").join("tool"));
        assert!(found.is_absolute());
        // Absent from PATH: left for spawn to report as not found.
        assert_eq!(
            resolve_program("no-such-tool", Some("bin"), cwd),
            PathBuf::from("no-such-tool")
        );
        // A path is used as given.
        assert_eq!(
            resolve_program("./bin/tool", Some("plain"), cwd),
            PathBuf::from("./bin/tool")
        );
        // An empty PATH entry is the working directory.
        std::fs::set_permissions(
            cwd.join("plain/tool"),
            std::fs::Permissions::from_mode(0o700),
        )
        .unwrap();
        assert_eq!(
            resolve_program("tool", Some(":bin"), &cwd.join("plain")),
            cwd.join("plain").join(".").join("tool")
        );
    }
}
