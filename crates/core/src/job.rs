//! Jobs: what to run for every message of a topic, and how.
//!
//! A [`JobSpec`] is the validated form of a `[[job]]` table in `pubrun.toml`
//! (see `manifest/`); it is what the dispatcher executes and what the REST
//! API shows. String fields marked "template" are rendered per message.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Job id: same rules as a topic id.
    pub name: String,
    /// Full topic name the job listens to.
    pub topic: String,
    /// Pub/Sub filter on attributes (empty = every message). Parsed by the broker.
    #[serde(default)]
    pub filter: String,
    pub executor: ExecutorSpec,
    #[serde(with = "humantime_serde_secs")]
    pub timeout: Duration,
    /// Time between SIGTERM (`docker stop`) and SIGKILL on timeout or cancel.
    #[serde(with = "humantime_serde_secs")]
    pub grace_period: Duration,
    pub retries: RetryPolicy,
    /// Runs of this job at the same time.
    pub concurrency: u32,
    /// Template; a second message with the same key inside `dedup_window`
    /// creates no run. Default: the message id.
    #[serde(default)]
    pub dedup_key: String,
    #[serde(with = "humantime_serde_secs")]
    pub dedup_window: Duration,
    /// Full topic name that receives one message per finished run.
    #[serde(default)]
    pub result_topic: String,
    /// Bytes of stdout+stderr kept per run; the rest is dropped (and counted).
    pub log_limit_bytes: u64,
    /// Objects placed into the run's working directory before each attempt.
    #[serde(default)]
    pub inputs: Vec<InputSpec>,
    /// Directories uploaded to a bucket after each attempt.
    #[serde(default)]
    pub outputs: Vec<OutputSpec>,
    /// Pool the runs execute in; default `local` (inside the server).
    #[serde(default = "default_pool")]
    pub pool: String,
    /// Variables of the server's environment the job's command gets too
    /// (values read at run start; a variable the server lacks stays unset).
    /// Nothing else of the server's environment reaches a job.
    #[serde(default)]
    pub pass_env: Vec<String>,
    /// Environment variables whose values come from the server's
    /// environment at run start and are masked in logs and results.
    #[serde(default)]
    pub secrets: BTreeMap<String, SecretRef>,
    /// The connection whose resources this job uses instead of the
    /// server's own: `subscription`, `result_topic` and `gs://` inputs and
    /// outputs then name that project's resources. Copied whole into the
    /// job, so a run after a restart uses the connection it was queued with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection: Option<crate::connection::ConnectionSpec>,
    /// Full name of the connection's subscription that triggers the job
    /// (jobs on a connection only; `topic` is then empty).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub subscription: String,
    /// When outputs are uploaded after an attempt.
    #[serde(default)]
    pub upload_outputs: UploadOutputs,
    /// Extra attributes of the result message; values are templates over
    /// the trigger message (`{{ data.zone }}`), rendered for each result.
    #[serde(default)]
    pub result_attributes: BTreeMap<String, String>,
    /// Copy the trigger message's attributes into the result message
    /// (pubrun's own and `result_attributes` win on a clash).
    #[serde(default)]
    pub result_trigger_attributes: bool,
}

/// Attributes pubrun sets on every result message; `result_attributes`
/// cannot take these names.
pub const RESULT_ATTRIBUTES: [&str; 6] = [
    "job",
    "run_id",
    "status",
    "exit_code",
    "attempt",
    "source_message_id",
];

/// When a job's outputs are uploaded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UploadOutputs {
    /// After every attempt that ran, whatever its status: partial results
    /// of a failed attempt are often what one needs to debug it.
    #[default]
    Always,
    /// Only after an attempt that succeeded, so a failed run never leaves a
    /// half-written result where a successful one belongs.
    OnSuccess,
}

/// `{ env = "SERVER_VAR" }`: where a job secret's value comes from. Only the
/// variable's name is stored; the value never is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretRef {
    pub env: String,
}

/// Prefix of the run variables pubrun sets (`PUBRUN_RUN_ID`, …), reserved.
pub const RUN_VAR_PREFIX: &str = "PUBRUN_";

/// Whether `s` can name an environment variable: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn is_env_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
}

impl JobSpec {
    /// The job's declared `env` (of either executor).
    pub fn declared_env(&self) -> &BTreeMap<String, String> {
        match &self.executor {
            ExecutorSpec::Process(p) => &p.env,
            ExecutorSpec::Docker(d) => &d.env,
        }
    }

    /// Checks `env`, `pass_env` and `secrets` together: valid names, none
    /// reserved (`PUBRUN_*`), no name declared twice, so which value a job
    /// sees never depends on an ordering rule.
    pub fn check_environment(&self) -> std::result::Result<(), String> {
        let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
        let declared = self.declared_env().keys().map(|k| (k.as_str(), "env"));
        let passed = self.pass_env.iter().map(|k| (k.as_str(), "pass_env"));
        let secret = self.secrets.keys().map(|k| (k.as_str(), "secrets"));
        for (name, what) in declared.chain(passed).chain(secret) {
            if !is_env_name(name) {
                return Err(format!(
                    "{what}: \"{}\" is not an environment variable name (letters, digits, '_')",
                    name.escape_debug()
                ));
            }
            if name.starts_with(RUN_VAR_PREFIX) {
                return Err(format!(
                    "{what}: {name}: names starting with {RUN_VAR_PREFIX} are reserved for pubrun's run variables"
                ));
            }
            if let Some(first) = seen.insert(name, what) {
                return Err(format!("{name} is declared in both {first} and {what}"));
            }
        }
        for (name, r) in &self.secrets {
            if !is_env_name(&r.env) {
                return Err(format!(
                    "secrets.{name}.env: \"{}\" is not an environment variable name",
                    r.env.escape_debug()
                ));
            }
        }
        Ok(())
    }
}

fn default_pool() -> String {
    crate::pool::LOCAL_POOL.to_string()
}

/// `{ from = "trigger" | "gs://BUCKET/PREFIX", to = "relative/dir/" }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputSpec {
    /// `trigger` (the object named by the message attributes `bucketId` and
    /// `objectId`) or `gs://BUCKET/PREFIX` (template).
    pub from: String,
    /// Directory relative to the run's working directory.
    pub to: String,
}

/// `{ from = "relative/dir/", to = "gs://BUCKET/PREFIX" }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputSpec {
    /// Directory relative to the run's working directory.
    pub from: String,
    /// `gs://BUCKET/PREFIX` (template); files go to `PREFIX` + relative path.
    pub to: String,
}

/// The value of an input's `from` that names the triggering object.
pub const TRIGGER_INPUT: &str = "trigger";

/// Splits `gs://BUCKET/PREFIX` (PREFIX may be empty). The bucket name must
/// be 3–63 characters of `a-z 0-9 . _ -`, starting and ending with a letter
/// or digit.
pub fn parse_gs_url(s: &str) -> std::result::Result<(String, String), String> {
    let rest = s
        .strip_prefix("gs://")
        .ok_or_else(|| format!("\"{s}\" is not a gs://BUCKET/PREFIX address"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let ok_char =
        |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-');
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !(3..=63).contains(&bucket.len())
        || !bucket.chars().all(ok_char)
        || !edge(bucket.chars().next())
        || !edge(bucket.chars().last())
    {
        return Err(format!(
            "\"{s}\": bucket name \"{bucket}\" must be 3-63 characters of a-z, 0-9, '.', '_', '-'"
        ));
    }
    if prefix.contains('\0') {
        return Err(format!("\"{s}\": the prefix contains NUL"));
    }
    Ok((bucket.to_string(), prefix.to_string()))
}

/// Checks a path meant to stay inside a run's working directory: relative,
/// not empty, no `..` component, no NUL.
pub fn check_relative_path(p: &str) -> std::result::Result<(), String> {
    if p.is_empty() {
        return Err("must not be empty (use \"./\" for the working directory itself)".into());
    }
    if p.contains('\0') {
        return Err(format!("\"{}\" contains NUL", p.escape_debug()));
    }
    if p.starts_with('/') || p.starts_with('\\') || std::path::Path::new(p).is_absolute() {
        return Err(format!(
            "\"{p}\" must be relative to the run's working directory"
        ));
    }
    if p.split(['/', '\\']).any(|c| c == "..") {
        return Err(format!("\"{p}\" must not contain \"..\""));
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ExecutorSpec {
    Process(ProcessSpec),
    Docker(DockerSpec),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ProcessSpec {
    /// Template.
    pub command: String,
    /// Templates.
    #[serde(default)]
    pub args: Vec<String>,
    /// Values are templates.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory; default a fresh per-run directory.
    #[serde(default)]
    pub working_dir: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct DockerSpec {
    pub image: String,
    /// Overrides the image's entrypoint+cmd when non-empty. Templates.
    #[serde(default)]
    pub command: Vec<String>,
    /// Values are templates.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub mounts: Vec<Mount>,
    /// CPUs, e.g. 1.5.
    #[serde(default)]
    pub cpus: Option<f64>,
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    /// Docker network name (default: the engine's default bridge).
    #[serde(default)]
    pub network: String,
    #[serde(default)]
    pub pull: PullPolicy,
    #[serde(default)]
    pub auth: Option<RegistryAuth>,
    /// Working directory in the container: empty means `/workspace` (where
    /// inputs are and outputs are collected, as for process jobs); a relative
    /// path is taken relative to `/workspace`; `"image"` keeps the image's
    /// own `WORKDIR`.
    #[serde(default)]
    pub working_dir: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mount {
    /// Host path.
    pub source: String,
    /// Path in the container.
    pub target: String,
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum PullPolicy {
    /// Pull only when the image is not present locally.
    #[default]
    IfNotPresent,
    Always,
    Never,
}

/// Registry credentials. The password is never stored in the spec: it is
/// read from the named environment variable of the server when pulling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistryAuth {
    pub username: String,
    pub password_env: String,
    /// Registry host, default the image's registry.
    #[serde(default)]
    pub server: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Attempts in total, including the first (1 = no retry).
    pub max_attempts: u32,
    #[serde(with = "humantime_serde_secs")]
    pub initial_backoff: Duration,
    #[serde(with = "humantime_serde_secs")]
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 1,
            initial_backoff: Duration::from_secs(10),
            max_backoff: Duration::from_secs(300),
        }
    }
}

impl RetryPolicy {
    /// Delay before attempt `next_attempt` (2 = first retry): exponential,
    /// capped, with "full jitter" scaled by `jitter` in [0, 1) so that
    /// retries of many runs spread out. Pure: the caller supplies randomness.
    pub fn backoff(&self, next_attempt: u32, jitter: f64) -> Duration {
        let exp = next_attempt.saturating_sub(2).min(30);
        let base = self.initial_backoff.as_secs_f64() * 2f64.powi(exp as i32);
        let capped = base.min(self.max_backoff.as_secs_f64());
        // Half fixed, half random: never retries instantly, still spreads.
        Duration::from_secs_f64(capped * (0.5 + 0.5 * jitter.clamp(0.0, 1.0)))
    }
}

/// Durations as seconds (with fractions) in JSON, readable and unambiguous.
pub(crate) mod humantime_serde_secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        if !(0.0..=1e12).contains(&secs) {
            return Err(serde::de::Error::custom("duration out of range"));
        }
        Ok(Duration::from_secs_f64(secs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let p = RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_secs(10),
            max_backoff: Duration::from_secs(35),
        };
        assert_eq!(p.backoff(2, 1.0), Duration::from_secs(10));
        assert_eq!(p.backoff(3, 1.0), Duration::from_secs(20));
        assert_eq!(p.backoff(4, 1.0), Duration::from_secs(35));
        assert_eq!(p.backoff(2, 0.0), Duration::from_secs(5));
        assert_eq!(p.backoff(40, 1.0), Duration::from_secs(35));
    }

    #[test]
    fn environment_names_are_checked() {
        let mut j = JobSpec {
            name: "j".into(),
            topic: "projects/p/topics/t".into(),
            filter: String::new(),
            executor: ExecutorSpec::Process(ProcessSpec {
                command: "env".into(),
                env: BTreeMap::from([("A".to_string(), "1".to_string())]),
                ..Default::default()
            }),
            timeout: Duration::from_secs(1),
            grace_period: Duration::from_secs(1),
            retries: RetryPolicy::default(),
            concurrency: 1,
            dedup_key: String::new(),
            dedup_window: Duration::from_secs(1),
            result_topic: String::new(),
            log_limit_bytes: 1,
            inputs: vec![],
            outputs: vec![],
            pool: "local".into(),
            pass_env: vec!["HTTP_PROXY".into()],
            upload_outputs: UploadOutputs::Always,
            result_attributes: BTreeMap::new(),
            result_trigger_attributes: false,
            secrets: BTreeMap::from([(
                "DB".to_string(),
                SecretRef {
                    env: "PROD_DB".into(),
                },
            )]),
            connection: None,
            subscription: String::new(),
        };
        assert_eq!(j.check_environment(), Ok(()));
        j.pass_env.push("A".into());
        assert!(j
            .check_environment()
            .unwrap_err()
            .contains("both env and pass_env"));
        j.pass_env = vec!["PUBRUN_TOKEN".into()];
        assert!(j.check_environment().unwrap_err().contains("reserved"));
        j.pass_env = vec!["BAD-NAME".into()];
        assert!(j.check_environment().is_err());
        j.pass_env.clear();
        j.secrets.insert(
            "X".into(),
            SecretRef {
                env: "no way".into(),
            },
        );
        assert!(j.check_environment().unwrap_err().contains("secrets.X.env"));
    }

    #[test]
    fn gs_urls_and_relative_paths() {
        assert_eq!(
            parse_gs_url("gs://output/results/x/").unwrap(),
            ("output".into(), "results/x/".into())
        );
        assert_eq!(
            parse_gs_url("gs://shared").unwrap(),
            ("shared".into(), "".into())
        );
        assert!(parse_gs_url("s3://x/y").is_err());
        assert!(parse_gs_url("gs://Up/x").is_err());
        assert!(parse_gs_url("gs:///x").is_err());
        assert!(check_relative_path("in/").is_ok());
        assert!(check_relative_path("./").is_ok());
        assert!(check_relative_path("/etc").is_err());
        assert!(check_relative_path("a/../../b").is_err());
        assert!(check_relative_path("").is_err());
    }
}
