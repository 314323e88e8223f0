//! The Compute Engine REST calls the fake answers, each checked the way
//! Google documents it.

use super::*;

/// Checks an insert body as Compute Engine does; the instance to store.
fn validate_insert(shared: &Shared, p: &str, z: &str, body: &Value) -> Result<Value, GoogleError> {
    if !body.is_object() {
        return Err(google_error(
            StatusCode::BAD_REQUEST,
            "parseError",
            "Invalid JSON payload received.".into(),
        ));
    }
    let name = match body["name"].as_str() {
        None | Some("") => return Err(required("resource.name")),
        Some(n) => n,
    };
    if !valid_name(name) {
        return Err(invalid(
            "resource.name",
            name,
            &format!("Must be a match of regex '{NAME_REGEX}'"),
        ));
    }
    let machine_type = match body["machineType"].as_str() {
        None | Some("") => return Err(required("resource.machineType")),
        Some(m) => m,
    };
    // `zones/Z/machineTypes/T`, possibly as a longer URL, in this zone.
    let mt_name = machine_type
        .rsplit_once("zones/")
        .and_then(|(_, rest)| rest.split_once("/machineTypes/"))
        .filter(|(zone, t)| *zone == z && !t.is_empty() && !t.contains('/'))
        .map(|(_, t)| t.to_string());
    let Some(mt_name) = mt_name else {
        return Err(invalid(
            "resource.machineType",
            machine_type,
            &format!("Machine type must be given as zones/{z}/machineTypes/TYPE."),
        ));
    };
    let disks = body["disks"].as_array().cloned().unwrap_or_default();
    let boot: Vec<&Value> = disks.iter().filter(|d| d["boot"] == true).collect();
    if boot.len() != 1 {
        return Err(invalid(
            "resource.disks",
            "",
            "Exactly one boot disk must be specified.",
        ));
    }
    if boot[0]["initializeParams"]["sourceImage"]
        .as_str()
        .is_none_or(str::is_empty)
    {
        return Err(required("resource.disks[0].initializeParams.sourceImage"));
    }
    let nics = body["networkInterfaces"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if nics.is_empty() {
        return Err(required("resource.networkInterfaces"));
    }
    let labels = match &body["labels"] {
        Value::Null => serde_json::Map::new(),
        Value::Object(m) => m.clone(),
        other => {
            return Err(invalid(
                "resource.labels",
                &other.to_string(),
                "Labels must be a map.",
            ))
        }
    };
    if labels.len() > 64 {
        return Err(invalid(
            "resource.labels",
            "",
            "At most 64 labels are allowed.",
        ));
    }
    for (k, v) in &labels {
        if k.is_empty() || !k.starts_with(|c: char| c.is_ascii_lowercase()) || !label_chars(k) {
            return Err(invalid("resource.labels", "", &format!(
                "Label key '{k}' violates format constraints. The key must start with a lowercase character, can only contain lowercase letters, numeric characters, underscores and dashes. The key can be at most 63 characters long. International characters are allowed."
            )));
        }
        if !v.as_str().is_some_and(label_chars) {
            return Err(invalid("resource.labels", "", &format!(
                "Label value '{}' violates format constraints. The value can only contain lowercase letters, numeric characters, underscores and dashes. The value can be at most 63 characters long. International characters are allowed.",
                v.as_str().unwrap_or(&v.to_string())
            )));
        }
    }
    let items = match &body["metadata"]["items"] {
        Value::Null => Vec::new(),
        Value::Array(a) => a.clone(),
        other => {
            return Err(invalid(
                "resource.metadata.items",
                &other.to_string(),
                "Items must be a list.",
            ))
        }
    };
    let mut seen = std::collections::HashSet::new();
    let mut size = 0;
    for (n, item) in items.iter().enumerate() {
        let key = item["key"].as_str().unwrap_or("");
        let key_ok = (1..=128).contains(&key.len())
            && key
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_');
        if !key_ok {
            return Err(invalid(
                &format!("resource.metadata.items[{n}].key"),
                key,
                "Must be a match of regex '[a-zA-Z0-9-_]{1,128}'",
            ));
        }
        if !seen.insert(key.to_string()) {
            return Err(invalid(
                "resource.metadata",
                "",
                &format!("Duplicate metadata key '{key}'."),
            ));
        }
        size += key.len() + item["value"].as_str().map_or(0, str::len);
    }
    if size > 512 * 1024 {
        return Err(invalid(
            "resource.metadata",
            "",
            "Metadata is larger than 512 KB.",
        ));
    }

    let zone = shared.zone_url(p, z);
    let items: Vec<Value> = items
        .iter()
        .map(|i| json!({"key": i["key"], "value": i["value"].as_str().unwrap_or("")}))
        .collect();
    let metadata = json!({"kind": "compute#metadata", "items": items});
    let labels = Value::Object(labels);
    Ok(json!({
        "kind": "compute#instance",
        "creationTimestamp": now(),
        "name": name,
        "description": body["description"].as_str().unwrap_or(""),
        "machineType": format!("{zone}/machineTypes/{mt_name}"),
        "status": "PROVISIONING",
        "zone": zone,
        "canIpForward": false,
        "networkInterfaces": [{
            "kind": "compute#networkInterface",
            "name": "nic0",
            "network": format!("{}projects/{p}/global/networks/default", shared.base),
            "networkIP": "10.128.0.2",
            "accessConfigs": [{
                "kind": "compute#accessConfig",
                "type": "ONE_TO_ONE_NAT",
                "name": "External NAT",
                "natIP": "203.0.113.2",
            }],
        }],
        "disks": [{
            "kind": "compute#attachedDisk",
            "type": "PERSISTENT",
            "mode": "READ_WRITE",
            "source": format!("{zone}/disks/{name}"),
            "deviceName": "persistent-disk-0",
            "index": 0,
            "boot": true,
            "autoDelete": boot[0]["autoDelete"].as_bool().unwrap_or(true),
        }],
        "metadata": {
            "kind": "compute#metadata",
            "fingerprint": fingerprint(&metadata),
            "items": items,
        },
        "labels": labels,
        "labelFingerprint": fingerprint(&labels),
        "selfLink": format!("{zone}/instances/{name}"),
    }))
}

type Zone = Path<(String, String)>;
pub(super) type Named = Path<(String, String, String)>;

pub(super) async fn insert(
    State(s): State<Arc<Shared>>,
    Path((p, z)): Zone,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, GoogleError> {
    s.authorized(&headers)?;
    let request_id = q.get("requestId").filter(|r| !r.is_empty()).cloned();
    if let Some(op) = request_id
        .as_ref()
        .and_then(|r| s.inner.lock().unwrap().request_ids.get(r).cloned())
    {
        return Ok(Json(op).into_response());
    }
    let body: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return Err(google_error(
                StatusCode::BAD_REQUEST,
                "parseError",
                format!("Invalid JSON payload received. {e}"),
            ))
        }
    };
    s.inner.lock().unwrap().inserts.push(body.clone());
    let mut resource = match validate_insert(&s, &p, &z, &body) {
        Ok(r) => r,
        Err(r) => return Err(r),
    };
    let name = resource["name"].as_str().unwrap_or_default().to_string();
    let key: Key = (p.clone(), z.clone(), name.clone());
    let mut inner = s.inner.lock().unwrap();
    if inner.instances.contains_key(&key) {
        return Err(google_error(
            StatusCode::CONFLICT,
            "alreadyExists",
            format!("The resource 'projects/{p}/zones/{z}/instances/{name}' already exists"),
        ));
    }
    inner.next_id += 1;
    let id = (4_000_000_000_000_000_000u64 + inner.next_id).to_string();
    resource["id"] = json!(id);
    let failure = inner.fail_next_insert.take();
    let op = s.operation(&mut inner, &key, "insert", &id, false);
    inner.instances.insert(
        key.clone(),
        Instance {
            resource,
            generation: 0,
            agent: None,
        },
    );
    if let Some(r) = request_id {
        inner.request_ids.insert(r, op.clone());
    }
    let op_name = op["name"].as_str().unwrap().to_string();
    let change = if failure.is_some() {
        Change::Remove
    } else {
        Change::Run
    };
    drop(inner);
    s.later(key, op_name, 0, s.config.boot_delay, change, failure);
    Ok(Json(op).into_response())
}

pub(super) async fn get_instance(
    State(s): State<Arc<Shared>>,
    Path((p, z, name)): Named,
    headers: HeaderMap,
) -> Result<Response, GoogleError> {
    s.authorized(&headers)?;
    let inner = s.inner.lock().unwrap();
    match inner.instances.get(&(p.clone(), z.clone(), name.clone())) {
        Some(i) => Ok(Json(i.resource.clone()).into_response()),
        None => Err(not_found(&p, &z, "instances", &name)),
    }
}

/// `labels.KEY=VALUE` (spaces and quotes around VALUE allowed); `None`
/// when the expression is something else.
fn parse_filter(f: &str) -> Option<(String, String)> {
    let (lhs, rhs) = f.trim().split_once('=')?;
    let key = lhs.trim().strip_prefix("labels.")?;
    let value = rhs.trim();
    let value = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value);
    (!key.is_empty()).then(|| (key.to_string(), value.to_string()))
}

pub(super) async fn list(
    State(s): State<Arc<Shared>>,
    Path((p, z)): Zone,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, GoogleError> {
    s.authorized(&headers)?;
    let filter = match q.get("filter").map(|f| f.trim()).filter(|f| !f.is_empty()) {
        None => None,
        Some(f) => match parse_filter(f) {
            Some(kv) => Some(kv),
            None => return Err(invalid("filter", f, "Invalid list filter expression.")),
        },
    };
    let max = match q.get("maxResults").map(|m| m.parse::<usize>()) {
        None => 500,
        Some(Ok(m)) if m <= 500 => m.max(1),
        Some(_) => {
            return Err(invalid(
                "maxResults",
                q.get("maxResults").map_or("", |v| v),
                "Must be less than or equal to 500",
            ))
        }
    };
    let start = match q.get("pageToken").map(|t| t.parse::<usize>()) {
        None => 0,
        Some(Ok(n)) => n,
        Some(Err(_)) => {
            return Err(invalid(
                "pageToken",
                q.get("pageToken").map_or("", |v| v),
                "Invalid page token.",
            ))
        }
    };
    let inner = s.inner.lock().unwrap();
    let all: Vec<Value> = inner
        .instances
        .iter()
        .filter(|((ip, iz, _), _)| *ip == p && *iz == z)
        .map(|(_, i)| &i.resource)
        .filter(|r| match &filter {
            None => true,
            Some((k, v)) => r["labels"][k].as_str() == Some(v.as_str()),
        })
        .cloned()
        .collect();
    let zone = s.zone_url(&p, &z);
    let mut out = json!({
        "kind": "compute#instanceList",
        "id": format!("projects/{p}/zones/{z}/instances"),
        "selfLink": format!("{zone}/instances"),
    });
    let page: Vec<Value> = all.iter().skip(start).take(max).cloned().collect();
    // Google leaves out empty lists.
    if !page.is_empty() {
        out["items"] = json!(page);
    }
    if start + max < all.len() {
        out["nextPageToken"] = json!((start + max).to_string());
    }
    Ok(Json(out).into_response())
}

/// start, stop and delete: a state change that takes time and an operation.
pub(super) async fn transition(
    s: Arc<Shared>,
    key: Key,
    kind: &str,
    headers: HeaderMap,
) -> Result<Response, GoogleError> {
    s.authorized(&headers)?;
    let (p, z, name) = key.clone();
    let mut inner = s.inner.lock().unwrap();
    let Some(inst) = inner.instances.get(&key) else {
        return Err(not_found(&p, &z, "instances", &name));
    };
    let status = inst.resource["status"].as_str().unwrap_or("").to_string();
    let id = inst.resource["id"].as_str().unwrap_or("").to_string();
    let (next, change, delay) = match (kind, status.as_str()) {
        ("start", "RUNNING" | "PROVISIONING" | "STAGING") | ("stop", "TERMINATED") => {
            // Nothing to do: an operation that is already done.
            let op = s.operation(&mut inner, &key, kind, &id, true);
            return Ok(Json(op).into_response());
        }
        ("start", "TERMINATED") => ("STAGING", Change::Run, s.config.boot_delay),
        ("start", _) | ("stop", "STOPPING") => {
            return Err(google_error(
                StatusCode::BAD_REQUEST,
                "resourceNotReady",
                format!("The resource 'projects/{p}/zones/{z}/instances/{name}' is not ready"),
            ))
        }
        ("stop", _) => ("STOPPING", Change::Terminate, s.config.stop_delay),
        _ => ("STOPPING", Change::Remove, s.config.stop_delay),
    };
    let op = s.operation(&mut inner, &key, kind, &id, false);
    let inst = inner.instances.get_mut(&key).unwrap();
    inst.generation += 1;
    inst.resource["status"] = json!(next);
    let generation = inst.generation;
    drop(inner);
    s.later(
        key,
        op["name"].as_str().unwrap().to_string(),
        generation,
        delay,
        change,
        None,
    );
    s.changed.notify_waiters();
    Ok(Json(op).into_response())
}

/// `instances.setMetadata`: replaces the items when the fingerprint is
/// the current one (412 `conditionNotMet` otherwise), as Google does.
pub(super) async fn set_metadata(
    State(s): State<Arc<Shared>>,
    Path((p, z, name)): Named,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, GoogleError> {
    s.authorized(&headers)?;
    let body: Value = serde_json::from_slice(&body).map_err(|e| {
        google_error(
            StatusCode::BAD_REQUEST,
            "parseError",
            format!("Invalid JSON payload received. {e}"),
        )
    })?;
    let key: Key = (p.clone(), z.clone(), name.clone());
    let mut inner = s.inner.lock().unwrap();
    let Some(i) = inner.instances.get_mut(&key) else {
        return Err(not_found(&p, &z, "instances", &name));
    };
    if body["fingerprint"] != i.resource["metadata"]["fingerprint"] {
        return Err(google_error(
            StatusCode::PRECONDITION_FAILED,
            "conditionNotMet",
            "Supplied fingerprint does not match current metadata fingerprint.".into(),
        ));
    }
    let items = body["items"].clone();
    i.resource["metadata"]["fingerprint"] =
        json!(fingerprint(&json!([items, i.generation, now()])));
    i.resource["metadata"]["items"] = items;
    let id = i.resource["id"].as_str().unwrap_or_default().to_string();
    let op = s.operation(&mut inner, &key, "setMetadata", &id, true);
    drop(inner);
    s.changed.notify_waiters();
    Ok(Json(op).into_response())
}

fn find_operation(s: &Shared, p: &str, z: &str, op: &str) -> Result<Value, GoogleError> {
    let inner = s.inner.lock().unwrap();
    inner
        .operations
        .get(op)
        .filter(|o| o["zone"] == s.zone_url(p, z))
        .cloned()
        .ok_or_else(|| not_found(p, z, "operations", op))
}

pub(super) async fn get_operation(
    State(s): State<Arc<Shared>>,
    Path((p, z, op)): Named,
    headers: HeaderMap,
) -> Result<Response, GoogleError> {
    s.authorized(&headers)?;
    find_operation(&s, &p, &z, &op).map(|o| Json(o).into_response())
}

/// Like Google's: returns when the operation is `DONE` or after a while
/// (here 30 s, Google's is 2 min) with it still running.
pub(super) async fn wait_operation(
    State(s): State<Arc<Shared>>,
    Path((p, z, op)): Named,
    headers: HeaderMap,
) -> Result<Response, GoogleError> {
    s.authorized(&headers)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let notified = s.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let o = find_operation(&s, &p, &z, &op)?;
        if o["status"] == "DONE" {
            return Ok(Json(o).into_response());
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return Ok(Json(o).into_response());
        }
    }
}

pub(super) async fn metadata_token(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if headers.get("metadata-flavor").and_then(|v| v.to_str().ok()) != Some("Google") {
        return (
            StatusCode::FORBIDDEN,
            "Missing Metadata-Flavor:Google header.",
        )
            .into_response();
    }
    Json(json!({
        "access_token": s.config.token,
        "expires_in": 3599,
        "token_type": "Bearer",
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_filters() {
        assert!(valid_name("pubrun-big-1"));
        assert!(valid_name("a"));
        assert!(!valid_name("Big"));
        assert!(!valid_name("1abc"));
        assert!(!valid_name("abc-"));
        assert!(!valid_name(&"a".repeat(64)));
        assert_eq!(
            parse_filter("labels.pubrun-pool = \"big\""),
            Some(("pubrun-pool".into(), "big".into()))
        );
        assert_eq!(
            parse_filter("labels.pubrun-pool=big"),
            Some(("pubrun-pool".into(), "big".into()))
        );
        assert_eq!(parse_filter("name=big"), None);
    }
}
