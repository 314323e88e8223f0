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

/// Why an attempt ended. The dispatcher's retry decision matches on this,
/// never on the text of [`Exit::error`], which is for people.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndCause {
    /// It ran (or tried to) and ended as the job made it end: an exit code,
    /// a signal, out of memory, or a start the job's spec made fail (no such
    /// image or command). Retried per the job's retry policy.
    #[default]
    Exited,
    /// Stopped at the job's timeout. Retried per the retry policy.
    TimedOut,
    /// Stopped, or never started, because it was cancelled (or its job was
    /// deleted). Final.
    Cancelled,
    /// An input could not be downloaded or an output uploaded. Retried per
    /// the retry policy.
    InputOutput,
    /// The message cannot make a valid attempt (a template, an input name, a
    /// missing secret): the same message fails the same way again. Final.
    Parameters,
    /// A bug in pubrun (a panic). Final.
    Internal,
    /// The infrastructure failed, not the job (Docker daemon unreachable,
    /// run directory not writable): the same attempt again after a backoff.
    Infrastructure,
    /// The machine, agent, lease or server running it went away: the same
    /// attempt again at once, elsewhere.
    Lost,
    /// pubrun restarted while it ran and could not find it again. It may
    /// have done part of its work, so it uses an attempt.
    Interrupted,
}

impl EndCause {
    /// Not the job's fault: the run is queued again for the same attempt.
    pub fn keeps_attempt(self) -> bool {
        matches!(self, EndCause::Infrastructure | EndCause::Lost)
    }

    /// Retrying would fail the same way: the run ends whatever attempts remain.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            EndCause::Cancelled | EndCause::Parameters | EndCause::Internal
        )
    }

    /// The cause of an exit stored (or sent by an agent) before causes were
    /// recorded, from its flags and the prefixes its message had then. Read
    /// in the order the dispatcher used to test them.
    fn from_legacy(w: &ExitWire) -> EndCause {
        let error = w.error.as_deref().unwrap_or("");
        let lost = error.starts_with("lost:");
        if w.cancelled {
            EndCause::Cancelled
        } else if w.infra_error && lost {
            EndCause::Lost
        } else if w.infra_error {
            EndCause::Infrastructure
        } else if lost {
            EndCause::Interrupted
        } else if error.starts_with("parameters:") {
            EndCause::Parameters
        } else if error.starts_with("internal error:") {
            EndCause::Internal
        } else if w.timed_out {
            EndCause::TimedOut
        } else if error.starts_with("inputs:") || error.starts_with("outputs:") {
            EndCause::InputOutput
        } else {
            EndCause::Exited
        }
    }
}

/// How an attempt's process ended, as the executor observed it.
///
/// On the wire (run store JSON, agent protocol, REST) it keeps the flags it
/// had before [`EndCause`] existed (`timed_out`, `cancelled`, `infra_error`,
/// derived from `cause`), so old readers understand it; JSON without `cause`
/// is read through [`EndCause::from_legacy`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(from = "ExitWire", into = "ExitWire")]
pub struct Exit {
    pub exit_code: Option<i32>,
    /// Signal that ended the process (Unix), if any.
    pub signal: Option<i32>,
    pub oom_killed: bool,
    pub cause: EndCause,
    /// What went wrong, for people (missing image, daemon down, …).
    pub error: Option<String>,
    /// It did not end within the grace period after SIGTERM (`docker stop`)
    /// on timeout or cancel and was killed with SIGKILL.
    pub killed_after_grace: bool,
}

/// [`Exit`] as JSON: the field order and flags of before, then `cause`.
#[derive(Serialize, Deserialize)]
struct ExitWire {
    exit_code: Option<i32>,
    signal: Option<i32>,
    oom_killed: bool,
    timed_out: bool,
    cancelled: bool,
    error: Option<String>,
    #[serde(default)]
    infra_error: bool,
    #[serde(default)]
    killed_after_grace: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cause: Option<EndCause>,
}

impl From<ExitWire> for Exit {
    fn from(w: ExitWire) -> Exit {
        Exit {
            cause: w.cause.unwrap_or_else(|| EndCause::from_legacy(&w)),
            exit_code: w.exit_code,
            signal: w.signal,
            oom_killed: w.oom_killed,
            error: w.error,
            killed_after_grace: w.killed_after_grace,
        }
    }
}

impl From<Exit> for ExitWire {
    fn from(e: Exit) -> ExitWire {
        ExitWire {
            exit_code: e.exit_code,
            signal: e.signal,
            oom_killed: e.oom_killed,
            timed_out: e.timed_out(),
            cancelled: e.cancelled(),
            error: e.error,
            infra_error: e.cause.keeps_attempt(),
            killed_after_grace: e.killed_after_grace,
            cause: Some(e.cause),
        }
    }
}

impl Exit {
    /// An attempt that ended for `cause` with `error` saying why.
    pub fn failed(cause: EndCause, error: impl Into<String>) -> Exit {
        Exit {
            cause,
            error: Some(error.into()),
            ..Default::default()
        }
    }

    pub fn timed_out(&self) -> bool {
        self.cause == EndCause::TimedOut
    }

    pub fn cancelled(&self) -> bool {
        self.cause == EndCause::Cancelled
    }

    /// The terminal status this exit maps to.
    pub fn status(&self) -> RunStatus {
        match self.cause {
            EndCause::Cancelled => RunStatus::Cancelled,
            EndCause::TimedOut => RunStatus::TimedOut,
            _ if self.exit_code == Some(0) && self.error.is_none() && !self.oom_killed => {
                RunStatus::Succeeded
            }
            _ => RunStatus::Failed,
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
                cause: EndCause::TimedOut,
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

    #[test]
    fn exit_json_keeps_the_old_flags_and_adds_the_cause() {
        let lost = Exit::failed(EndCause::Lost, "lost: lease 3 was taken back");
        let v: serde_json::Value = serde_json::to_value(&lost).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "exit_code": null, "signal": null, "oom_killed": false,
                "timed_out": false, "cancelled": false,
                "error": "lost: lease 3 was taken back",
                "infra_error": true, "killed_after_grace": false, "cause": "lost"
            })
        );
        assert_eq!(serde_json::from_value::<Exit>(v).unwrap(), lost);
        // The cause wins over the flags when both are there.
        let v = serde_json::json!({
            "exit_code": null, "signal": null, "oom_killed": false, "timed_out": true,
            "cancelled": false, "error": null, "cause": "internal"
        });
        assert_eq!(
            serde_json::from_value::<Exit>(v).unwrap().cause,
            EndCause::Internal
        );
    }

    /// Run store rows and old agents' reports have no `cause`: it is
    /// derived from the flags and message prefixes they were written with.
    #[test]
    fn old_exit_json_reads_with_its_cause() {
        let read = |timed_out: bool, cancelled: bool, infra: bool, error: Option<&str>| {
            let mut v = serde_json::json!({
                "exit_code": 1, "signal": null, "oom_killed": false,
                "timed_out": timed_out, "cancelled": cancelled, "error": error,
                "infra_error": infra
            });
            if !infra {
                // Older still: before `infra_error` and `killed_after_grace`.
                v.as_object_mut().unwrap().remove("infra_error");
            }
            let e: Exit = serde_json::from_value(v).unwrap();
            assert_eq!(e.exit_code, Some(1));
            assert_eq!(e.error.as_deref(), error);
            e.cause
        };
        use EndCause::*;
        assert_eq!(read(false, false, false, None), Exited);
        assert_eq!(read(true, false, false, None), TimedOut);
        assert_eq!(
            read(false, true, false, Some("cancelled before it started")),
            Cancelled
        );
        assert_eq!(read(false, true, true, Some("lost: x")), Cancelled);
        assert_eq!(
            read(false, false, true, Some("lost: agent a stopped")),
            Lost
        );
        assert_eq!(
            read(true, false, true, Some("docker engine unreachable")),
            Infrastructure
        );
        assert_eq!(
            read(
                false,
                false,
                false,
                Some("lost: pubrun restarted while this attempt ran")
            ),
            Interrupted
        );
        assert_eq!(
            read(false, false, false, Some("parameters: inputs.to: ..")),
            Parameters
        );
        assert_eq!(
            read(
                false,
                false,
                false,
                Some("internal error: pubrun panicked while x")
            ),
            Internal
        );
        assert_eq!(
            read(false, false, false, Some("inputs: gs://b/o: gone")),
            InputOutput
        );
        assert_eq!(read(false, false, false, Some("no such image")), Exited);
    }

    #[test]
    fn causes_decide_retries() {
        use EndCause::*;
        // (cause, keeps the attempt, final)
        let table = [
            (Exited, false, false),
            (TimedOut, false, false),
            (Cancelled, false, true),
            (InputOutput, false, false),
            (Parameters, false, true),
            (Internal, false, true),
            (Infrastructure, true, false),
            (Lost, true, false),
            (Interrupted, false, false),
        ];
        for (cause, keeps, fin) in table {
            assert_eq!(cause.keeps_attempt(), keeps, "{cause:?}");
            assert_eq!(cause.is_final(), fin, "{cause:?}");
        }
    }
}
