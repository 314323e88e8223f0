//! Runs: one execution of a job for one message, and its state machine
//! `queued → starting → running → succeeded | failed | timed_out | cancelled`.
//!
//! A failed attempt that will be retried goes back to `queued` with
//! `attempt + 1` and a `not_before` time; the run id stays the same.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Queued,
    Starting,
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Starting => "starting",
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::TimedOut => "timed_out",
            RunStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "queued" => RunStatus::Queued,
            "starting" => RunStatus::Starting,
            "running" => RunStatus::Running,
            "succeeded" => RunStatus::Succeeded,
            "failed" => RunStatus::Failed,
            "timed_out" => RunStatus::TimedOut,
            "cancelled" => RunStatus::Cancelled,
            other => {
                return Err(Error::invalid(format!(
                    "unknown run status \"{other}\"; one of queued, starting, running, succeeded, failed, timed_out, cancelled"
                )))
            }
        })
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunStatus::Succeeded | RunStatus::Failed | RunStatus::TimedOut | RunStatus::Cancelled
        )
    }

    /// Whether the state machine allows `self → to`.
    pub fn can_become(self, to: RunStatus) -> bool {
        use RunStatus::*;
        match (self, to) {
            (Queued, Starting) | (Starting, Running) => true,
            // A retry sends an attempt that ended badly back to the queue.
            (Starting | Running, Queued) => true,
            (Starting | Running, Succeeded | Failed | TimedOut) => true,
            (Queued | Starting | Running, Cancelled) => true,
            // Could not even start (missing image, bad template).
            (Queued, Failed) => true,
            _ => false,
        }
    }

    pub fn check_transition(self, to: RunStatus) -> Result<()> {
        if self.can_become(to) {
            Ok(())
        } else {
            Err(Error::precondition(format!(
                "a {} run cannot become {}",
                self.as_str(),
                to.as_str()
            )))
        }
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How an attempt's process ended, as the executor observed it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Exit {
    pub exit_code: Option<i32>,
    /// Signal that ended the process (Unix), if any.
    pub signal: Option<i32>,
    pub oom_killed: bool,
    pub timed_out: bool,
    pub cancelled: bool,
    /// Why it could not start or was lost (missing image, daemon down, …).
    pub error: Option<String>,
    /// The failure was the infrastructure's (Docker daemon unreachable), not
    /// the job's: the run waits and tries again without using up an attempt.
    #[serde(default)]
    pub infra_error: bool,
    /// It did not end within the grace period after SIGTERM (`docker stop`)
    /// on timeout or cancel and was killed with SIGKILL.
    #[serde(default)]
    pub killed_after_grace: bool,
}

impl Exit {
    /// The terminal status this exit maps to.
    pub fn status(&self) -> RunStatus {
        if self.cancelled {
            RunStatus::Cancelled
        } else if self.timed_out {
            RunStatus::TimedOut
        } else if self.exit_code == Some(0) && self.error.is_none() && !self.oom_killed {
            RunStatus::Succeeded
        } else {
            RunStatus::Failed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions() {
        use RunStatus::*;
        assert!(Queued.can_become(Starting));
        assert!(Running.can_become(Queued));
        assert!(!Succeeded.can_become(Running));
        assert!(!Cancelled.can_become(Queued));
        assert!(!Queued.can_become(Succeeded));
        assert_eq!(
            Succeeded.check_transition(Failed).unwrap_err().code,
            crate::Code::FailedPrecondition
        );
        for s in [
            Queued, Starting, Running, Succeeded, Failed, TimedOut, Cancelled,
        ] {
            assert_eq!(RunStatus::parse(s.as_str()).unwrap(), s);
        }
    }

    #[test]
    fn exit_status() {
        assert_eq!(
            Exit {
                exit_code: Some(0),
                ..Default::default()
            }
            .status(),
            RunStatus::Succeeded
        );
        assert_eq!(
            Exit {
                exit_code: Some(3),
                ..Default::default()
            }
            .status(),
            RunStatus::Failed
        );
        assert_eq!(
            Exit {
                exit_code: Some(137),
                oom_killed: true,
                ..Default::default()
            }
            .status(),
            RunStatus::Failed
        );
        assert_eq!(
            Exit {
                timed_out: true,
                signal: Some(9),
                ..Default::default()
            }
            .status(),
            RunStatus::TimedOut
        );
        assert_eq!(
            Exit {
                error: Some("no image".into()),
                ..Default::default()
            }
            .status(),
            RunStatus::Failed
        );
    }
}
