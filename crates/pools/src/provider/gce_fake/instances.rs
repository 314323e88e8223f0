//! The instances and operations the fake keeps, and how they change
//! (boot, stop, delete) over time.

use super::*;

impl Shared {
    pub(super) fn authorized(&self, headers: &HeaderMap) -> Result<(), GoogleError> {
        let got = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        match got {
            Some(v) if v == format!("Bearer {}", self.config.token) => {
                let mut inner = self.inner.lock().unwrap();
                inner.calls += 1;
                match inner.fail_calls.pop_front() {
                    None => Ok(()),
                    Some((code, reason)) => Err(google_error(
                        StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                        reason,
                        format!("Injected failure: {reason}"),
                    )),
                }
            }
            None => Err(google_error(
                StatusCode::UNAUTHORIZED,
                "required",
                "Request is missing required authentication credential. Expected OAuth 2 access token, login cookie or other valid authentication credential.".into(),
            )),
            Some(_) => Err(google_error(
                StatusCode::UNAUTHORIZED,
                "authError",
                "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential.".into(),
            )),
        }
    }

    pub(super) fn zone_url(&self, p: &str, z: &str) -> String {
        format!("{}projects/{p}/zones/{z}", self.base)
    }

    /// A new operation on `target`, `RUNNING`, or `DONE` when `done`.
    pub(super) fn operation(
        &self,
        inner: &mut Inner,
        (p, z, name): &Key,
        kind: &str,
        target_id: &str,
        done: bool,
    ) -> Value {
        inner.next_id += 1;
        inner
            .op_log
            .push(((p.clone(), z.clone(), name.clone()), kind.to_string()));
        let op_name = format!(
            "operation-{}-{:x}",
            chrono::Utc::now().timestamp_millis(),
            inner.next_id
        );
        let zone = self.zone_url(p, z);
        let t = now();
        let mut op = json!({
            "kind": "compute#operation",
            "id": (1_000_000 + inner.next_id).to_string(),
            "name": op_name,
            "zone": zone,
            "operationType": kind,
            "targetLink": format!("{zone}/instances/{name}"),
            "targetId": target_id,
            "status": "RUNNING",
            "user": "fake@pubrun.invalid",
            "progress": 0,
            "insertTime": t,
            "startTime": t,
            "selfLink": format!("{zone}/operations/{op_name}"),
        });
        if done {
            finish(&mut op, None);
        }
        inner.operations.insert(op_name, op.clone());
        op
    }

    /// After `delay`, if the instance's generation is still `generation`,
    /// applies `change`; then marks the operation done (with `error`).
    pub(super) fn later(
        self: &Arc<Self>,
        key: Key,
        op: String,
        generation: u64,
        delay: Duration,
        change: Change,
        error: Option<(String, String)>,
    ) {
        let shared = self.clone();
        tokio::spawn(async move {
            // Stopping: the agent gets its SIGTERM first, like a guest
            // shutting down, and the instance stops once it is gone.
            if matches!(change, Change::Terminate | Change::Remove) {
                let child = {
                    let mut inner = shared.inner.lock().unwrap();
                    inner
                        .instances
                        .get_mut(&key)
                        .filter(|i| i.generation == generation)
                        .and_then(|i| i.agent.take())
                };
                if let Some(child) = child {
                    stop_agent(child).await;
                }
            }
            tokio::time::sleep(delay).await;
            let mut spawn_for = None;
            {
                let mut inner = shared.inner.lock().unwrap();
                let current = inner
                    .instances
                    .get(&key)
                    .is_some_and(|i| i.generation == generation);
                if current {
                    let t = now();
                    match change {
                        Change::Run => {
                            let i = inner.instances.get_mut(&key).unwrap();
                            i.resource["status"] = json!("RUNNING");
                            i.resource["lastStartTimestamp"] = json!(t);
                            spawn_for = Some(i.resource.clone());
                        }
                        Change::Terminate => {
                            let i = inner.instances.get_mut(&key).unwrap();
                            i.resource["status"] = json!("TERMINATED");
                            i.resource["lastStopTimestamp"] = json!(t);
                        }
                        Change::Remove => {
                            inner.instances.remove(&key);
                        }
                    }
                }
                if let Some(o) = inner.operations.get_mut(&op) {
                    finish(o, error.as_ref());
                }
            }
            if let Some(resource) = spawn_for {
                if let Some(child) = shared.boot(&resource) {
                    let mut inner = shared.inner.lock().unwrap();
                    match inner.instances.get_mut(&key) {
                        Some(i) if i.generation == generation => i.agent = Some(child),
                        // Stopped meanwhile: dropping kills it.
                        _ => drop(child),
                    }
                }
            }
            shared.changed.notify_waiters();
        });
    }

    /// The boot hook: what the startup script would run.
    pub(super) fn boot(&self, instance: &Value) -> Option<tokio::process::Child> {
        let bin = self.config.agent_binary.as_ref()?;
        let item = |k: &str| metadata_item(instance, k);
        let (Some(server), Some(pool), Some(name), Some(slots), Some(token)) = (
            item("pubrun-server"),
            item("pubrun-pool"),
            item("pubrun-name"),
            item("pubrun-slots"),
            item("pubrun-token"),
        ) else {
            tracing::warn!(instance = %instance["name"], "fake gce: no pubrun metadata; no agent started");
            return None;
        };
        let mut cmd = tokio::process::Command::new(bin);
        cmd.args([
            "agent", "--server", &server, "--pool", &pool, "--name", &name, "--slots", &slots,
        ])
        .env("PUBRUN_TOKEN", token)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
        let log = self.config.agent_log_dir.as_ref().and_then(|dir| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join(format!("{name}.log")))
                .ok()
        });
        match log {
            Some(f) => {
                let f2 = f.try_clone().ok()?;
                cmd.stdout(f).stderr(f2);
            }
            None => {
                cmd.stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null());
            }
        }
        match cmd.spawn() {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(error = %e, binary = %bin.display(), "fake gce: cannot start the agent");
                None
            }
        }
    }
}

#[derive(Clone, Copy)]
pub(super) enum Change {
    Run,
    Terminate,
    Remove,
}

pub(super) fn finish(op: &mut Value, error: Option<&(String, String)>) {
    op["status"] = json!("DONE");
    op["progress"] = json!(100);
    op["endTime"] = json!(now());
    if let Some((code, message)) = error {
        op["error"] = json!({"errors": [{"code": code, "message": message}]});
        op["httpErrorStatusCode"] = json!(400);
        op["httpErrorMessage"] = json!("BAD REQUEST");
    }
}

/// SIGTERM, then SIGKILL after 10 s.
pub(super) async fn stop_agent(mut child: tokio::process::Child) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) on our own child's pid, which is not reaped yet.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
        if tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .is_ok()
        {
            return;
        }
    }
    let _ = child.kill().await;
}
