//! Staging: the run directory's inputs downloaded from buckets before an
//! attempt and its outputs uploaded after it, with the path checks that keep
//! object names inside the run's working directory.

use super::*;

impl Dispatcher {
    pub(super) fn bucket_storage(&self) -> std::result::Result<&pubrun_buckets::Buckets, String> {
        self.buckets
            .get()
            .ok_or_else(|| "bucket storage is not available in this server".to_string())
    }

    /// Downloads the job's inputs into the working directory. Errors are
    /// the attempt's error (`parameters: …` when the message cannot name
    /// the input: not retried).
    pub(super) async fn stage_inputs(
        &self,
        run: &RunRecord,
        spec: &JobSpec,
        ctx: &TemplateContext,
        workdir: &Path,
        log: &Arc<LogSink>,
    ) -> std::result::Result<(), Exit> {
        if let Some(c) = &spec.connection {
            return self
                .stage_inputs_remote(c, run, spec, ctx, workdir, log)
                .await;
        }
        for input in &spec.inputs {
            check_relative_path(&input.to).map_err(|e| parameters(format!("inputs.to: {e}")))?;
            let dest = workdir.join(&input.to);
            if input.from == TRIGGER_INPUT {
                let attr = |k: &str| run.message.attributes.get(k).filter(|v| !v.is_empty());
                let (Some(bucket), Some(object)) = (attr("bucketId"), attr("objectId")) else {
                    return Err(parameters(
                        "input \"trigger\" needs the message attributes bucketId and objectId \
                                (sent by bucket notifications); this message has none",
                    ));
                };
                let base = object.rsplit('/').next().unwrap_or("");
                if safe_relative(base).is_none() {
                    return Err(parameters(format_args!(
                        "input \"trigger\": object name \"{}\" has no usable file name",
                        object.escape_debug()
                    )));
                }
                let buckets = self
                    .bucket_storage()
                    .map_err(|e| io_failure(format!("inputs: {e}")))?;
                let n = download(buckets, bucket, object, workdir, &dest.join(base))
                    .await
                    .map_err(|e| io_failure(format!("inputs: gs://{bucket}/{object}: {e}")))?;
                log.note(&format!(
                    "input gs://{bucket}/{object} ({n} bytes) -> {}{base}",
                    slash(&input.to)
                ))
                .await;
            } else {
                let url = template::render(&input.from, ctx)
                    .map_err(|e| parameters(format!("inputs.from: {}", e.message)))?;
                let (bucket, prefix) =
                    parse_gs_url(&url).map_err(|e| parameters(format!("inputs.from: {e}")))?;
                let buckets = self
                    .bucket_storage()
                    .map_err(|e| io_failure(format!("inputs: {e}")))?;
                let objects = buckets
                    .list_all_objects(&bucket, &prefix)
                    .await
                    .map_err(|e| io_failure(format!("inputs: {url}: {e}")))?;
                tokio::fs::create_dir_all(&dest)
                    .await
                    .map_err(|e| io_failure(format!("inputs: {}: {e}", input.to)))?;
                let (mut files, mut bytes) = (0u64, 0u64);
                for o in objects {
                    let rel = &o.name[prefix.len()..];
                    let Some(rel) = safe_relative(rel) else {
                        if !o.name.ends_with('/') {
                            log.note(&format!(
                                "input {url}: skipped object \"{}\": its name would leave {}",
                                o.name.escape_debug(),
                                input.to
                            ))
                            .await;
                        }
                        continue;
                    };
                    bytes += download(buckets, &bucket, &o.name, workdir, &dest.join(&rel))
                        .await
                        .map_err(|e| {
                            io_failure(format!("inputs: gs://{bucket}/{}: {e}", o.name))
                        })?;
                    files += 1;
                }
                log.note(&format!(
                    "input {url}: {files} objects ({bytes} bytes) -> {}",
                    slash(&input.to)
                ))
                .await;
            }
        }
        Ok(())
    }

    /// Uploads every regular file under each output directory. The first
    /// failing upload ends the staging with its error.
    pub(super) async fn stage_outputs(
        &self,
        run: &RunRecord,
        spec: &JobSpec,
        ctx: &TemplateContext,
        workdir: &Path,
        log: &Arc<LogSink>,
    ) -> std::result::Result<(), String> {
        if let Some(c) = &spec.connection {
            return self
                .stage_outputs_remote(c, run, spec, ctx, workdir, log)
                .await;
        }
        for output in &spec.outputs {
            check_relative_path(&output.from).map_err(|e| format!("outputs.from: {e}"))?;
            let url = template::render(&output.to, ctx)
                .map_err(|e| format!("outputs.to: {}", e.message))?;
            let (bucket, prefix) = parse_gs_url(&url).map_err(|e| format!("outputs.to: {e}"))?;
            let src = workdir.join(&output.from);
            check_no_symlink(workdir, &src).map_err(|e| format!("{}: {e}", output.from))?;
            match tokio::fs::symlink_metadata(&src).await {
                Ok(m) if m.is_dir() => {}
                _ => {
                    log.note(&format!(
                        "output {}: no such directory; nothing uploaded",
                        output.from
                    ))
                    .await;
                    continue;
                }
            }
            let buckets = self.bucket_storage()?;
            let files = walk_files(src.clone())
                .await
                .map_err(|e| format!("{}: {e}", output.from))?;
            let meta = pubrun_buckets::ObjectMeta {
                metadata: [
                    ("pubrun-run-id".to_string(), run.id.to_string()),
                    ("pubrun-job".to_string(), spec.name.clone()),
                    ("pubrun-attempt".to_string(), run.attempt.to_string()),
                ]
                .into_iter()
                .collect(),
                ..Default::default()
            };
            let mut bytes = 0u64;
            for rel in &files {
                let name = format!("{prefix}{rel}");
                let file = tokio::fs::File::open(src.join(rel))
                    .await
                    .map_err(|e| format!("{}{rel}: {e}", slash(&output.from)))?;
                let row = buckets
                    .put_object(&bucket, &name, file, meta.clone(), Default::default())
                    .await
                    .map_err(|e| format!("gs://{bucket}/{name}: {e}"))?;
                bytes += row.size;
            }
            log.note(&format!(
                "output {}: {} files ({bytes} bytes) -> {url}",
                slash(&output.from),
                files.len()
            ))
            .await;
        }
        Ok(())
    }
}

pub(super) fn slash(dir: &str) -> String {
    if dir.ends_with('/') {
        dir.to_string()
    } else {
        format!("{dir}/")
    }
}

/// An object name (or the part after an input's prefix) as a relative path
/// that stays below its directory; `None` for names that would escape it
/// (`..`, absolute, NUL, backslashes) or name a directory (`a/`, empty).
pub(super) fn safe_relative(name: &str) -> Option<PathBuf> {
    if name.is_empty()
        || name.ends_with('/')
        || name.starts_with('/')
        || name.contains(['\0', '\\'])
    {
        return None;
    }
    let mut p = PathBuf::new();
    for c in name.split('/') {
        match c {
            "" | "." => continue,
            ".." => return None,
            c => p.push(c),
        }
    }
    (!p.as_os_str().is_empty()).then_some(p)
}

/// Refuses a path below `root` whose existing components include a
/// symbolic link (a previous attempt could have planted one to make
/// pubrun read or write outside the working directory).
pub(super) fn check_no_symlink(root: &Path, path: &Path) -> std::io::Result<()> {
    let rel = path
        .strip_prefix(root)
        .map_err(|_| std::io::Error::other("outside the working directory"))?;
    let mut cur = root.to_path_buf();
    for c in rel.components() {
        cur.push(c);
        match std::fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(std::io::Error::other(format!(
                    "{} is a symbolic link",
                    cur.display()
                )))
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Streams one object into `dest` (below `root`); returns its size.
pub(super) async fn download(
    buckets: &pubrun_buckets::Buckets,
    bucket: &str,
    object: &str,
    root: &Path,
    dest: &Path,
) -> std::result::Result<u64, String> {
    check_no_symlink(root, dest).map_err(|e| e.to_string())?;
    let (_, mut src) = buckets
        .open_object(bucket, object, None, Default::default())
        .await
        .map_err(|e| e.to_string())?;
    if let Some(parent) = dest.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| e.to_string())?;
    }
    let mut out = tokio::fs::File::create(dest)
        .await
        .map_err(|e| format!("{}: {e}", dest.display()))?;
    let n = tokio::io::copy(&mut src, &mut out)
        .await
        .map_err(|e| format!("{}: {e}", dest.display()))?;
    tokio::io::AsyncWriteExt::flush(&mut out)
        .await
        .map_err(|e| e.to_string())?;
    Ok(n)
}

/// Relative paths (with `/`) of the regular files below `dir`, sorted;
/// symbolic links are not followed.
pub(super) async fn walk_files(dir: PathBuf) -> std::io::Result<Vec<String>> {
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        let mut stack = vec![(dir, String::new())];
        while let Some((d, rel)) = stack.pop() {
            for entry in std::fs::read_dir(&d)? {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let ty = entry.file_type()?;
                let r = format!("{rel}{name}");
                if ty.is_dir() {
                    stack.push((entry.path(), format!("{r}/")));
                } else if ty.is_file() {
                    out.push(r);
                }
            }
        }
        out.sort();
        Ok(out)
    })
    .await
    .map_err(|e| std::io::Error::other(e.to_string()))?
}
