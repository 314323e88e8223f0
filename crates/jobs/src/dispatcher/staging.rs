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

    /// Where the job's inputs come from and its outputs go: the Cloud
    /// Storage of its connection, or this server's buckets.
    fn objects<'a>(&'a self, spec: &'a JobSpec) -> std::result::Result<Objects<'a>, String> {
        match &spec.connection {
            Some(c) => self
                .connection(c)
                .map(|conn| Objects::Connection(conn, &c.name))
                .map_err(|e| e.to_string()),
            None => self.bucket_storage().map(Objects::Local),
        }
    }

    /// Downloads the job's inputs into the working directory. Errors are
    /// the attempt's error (`parameters: …` when the message cannot name
    /// the input: not retried).
    pub(super) async fn stage_inputs(&self, s: &Stage<'_>) -> std::result::Result<(), Exit> {
        for input in &s.spec.inputs {
            check_relative_path(&input.to).map_err(|e| parameters(format!("inputs.to: {e}")))?;
            let dest = s.workdir.join(&input.to);
            if input.from == TRIGGER_INPUT {
                let attr = |k: &str| s.run.message.attributes.get(k).filter(|v| !v.is_empty());
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
                let objects = self
                    .objects(s.spec)
                    .map_err(|e| io_failure(format!("inputs: {e}")))?;
                let n = objects
                    .download(bucket, object, s.workdir, &dest.join(base))
                    .await
                    .map_err(|e| io_failure(format!("inputs: {e}")))?;
                s.log
                    .note(&format!(
                        "input gs://{bucket}/{object}{} ({n} bytes{}) -> {}{base}",
                        objects.place(),
                        objects.checked(),
                        slash(&input.to)
                    ))
                    .await;
            } else {
                let url = template::render(&input.from, s.ctx)
                    .map_err(|e| parameters(format!("inputs.from: {}", e.message)))?;
                let (bucket, prefix) =
                    parse_gs_url(&url).map_err(|e| parameters(format!("inputs.from: {e}")))?;
                let objects = self
                    .objects(s.spec)
                    .map_err(|e| io_failure(format!("inputs: {e}")))?;
                let names = objects
                    .list(&bucket, &prefix, &url)
                    .await
                    .map_err(|e| io_failure(format!("inputs: {e}")))?;
                tokio::fs::create_dir_all(&dest)
                    .await
                    .map_err(|e| io_failure(format!("inputs: {}: {e}", input.to)))?;
                let (mut files, mut bytes) = (0u64, 0u64);
                for name in names {
                    let Some(rel) = safe_relative(&name[prefix.len().min(name.len())..]) else {
                        if !name.ends_with('/') {
                            s.log
                                .note(&format!(
                                    "input {url}: skipped object \"{}\": its name would leave {}",
                                    name.escape_debug(),
                                    input.to
                                ))
                                .await;
                        }
                        continue;
                    };
                    bytes += objects
                        .download(&bucket, &name, s.workdir, &dest.join(&rel))
                        .await
                        .map_err(|e| io_failure(format!("inputs: {e}")))?;
                    files += 1;
                }
                s.log
                    .note(&format!(
                        "input {url}{}: {files} objects ({bytes} bytes) -> {}",
                        objects.place(),
                        slash(&input.to)
                    ))
                    .await;
            }
        }
        Ok(())
    }

    /// Uploads every regular file under each output directory. The first
    /// failing upload ends the staging with its error.
    pub(super) async fn stage_outputs(&self, s: &Stage<'_>) -> std::result::Result<(), String> {
        let metadata: BTreeMap<String, String> = [
            ("pubrun-run-id".to_string(), s.run.id.to_string()),
            ("pubrun-job".to_string(), s.spec.name.clone()),
            ("pubrun-attempt".to_string(), s.run.attempt.to_string()),
        ]
        .into_iter()
        .collect();
        for output in &s.spec.outputs {
            check_relative_path(&output.from).map_err(|e| format!("outputs.from: {e}"))?;
            let url = template::render(&output.to, s.ctx)
                .map_err(|e| format!("outputs.to: {}", e.message))?;
            let (bucket, prefix) = parse_gs_url(&url).map_err(|e| format!("outputs.to: {e}"))?;
            let src = s.workdir.join(&output.from);
            check_no_symlink(s.workdir, &src).map_err(|e| format!("{}: {e}", output.from))?;
            match tokio::fs::symlink_metadata(&src).await {
                Ok(m) if m.is_dir() => {}
                _ => {
                    s.log
                        .note(&format!(
                            "output {}: no such directory; nothing uploaded",
                            output.from
                        ))
                        .await;
                    continue;
                }
            }
            let objects = self.objects(s.spec)?;
            let files = walk_files(src.clone())
                .await
                .map_err(|e| format!("{}: {e}", output.from))?;
            let mut bytes = 0u64;
            for rel in &files {
                let shown = format!("{}{rel}", slash(&output.from));
                bytes += objects
                    .upload(
                        &bucket,
                        &format!("{prefix}{rel}"),
                        &src.join(rel),
                        &shown,
                        &metadata,
                    )
                    .await?;
            }
            s.log
                .note(&format!(
                    "output {}: {} files ({bytes} bytes) -> {url}{}",
                    slash(&output.from),
                    files.len(),
                    objects.place()
                ))
                .await;
        }
        Ok(())
    }
}

/// What staging works on: one attempt's run, its job, the template context
/// of its message, its working directory and its log.
#[derive(Clone, Copy)]
pub(super) struct Stage<'a> {
    pub run: &'a RunRecord,
    pub spec: &'a JobSpec,
    pub ctx: &'a TemplateContext,
    pub workdir: &'a Path,
    pub log: &'a Arc<LogSink>,
}

/// The object storage a job stages through; errors name the object.
enum Objects<'a> {
    /// This server's buckets.
    Local(&'a pubrun_buckets::Buckets),
    /// The Cloud Storage of a connection (its clients, its name).
    Connection(Arc<pubrun_connections::Connection>, &'a str),
}

impl Objects<'_> {
    /// How the log names the storage after an object or URL.
    fn place(&self) -> String {
        match self {
            Objects::Local(_) => String::new(),
            Objects::Connection(_, name) => format!(" on connection {name}"),
        }
    }

    /// What a download checked beyond the size (the log says so).
    fn checked(&self) -> &'static str {
        match self {
            Objects::Local(_) => "",
            Objects::Connection(..) => ", CRC32C checked",
        }
    }

    /// The names of the objects under `prefix` (`url` names it in errors).
    async fn list(
        &self,
        bucket: &str,
        prefix: &str,
        url: &str,
    ) -> std::result::Result<Vec<String>, String> {
        match self {
            Objects::Local(buckets) => match buckets.list_all_objects(bucket, prefix).await {
                Ok(rows) => Ok(rows.into_iter().map(|o| o.name).collect()),
                Err(e) => Err(format!("{url}: {e}")),
            },
            Objects::Connection(conn, _) => match conn.storage.list(bucket, prefix).await {
                Ok(infos) => Ok(infos.into_iter().map(|o| o.name).collect()),
                Err(e) => Err(e.to_string()),
            },
        }
    }

    /// Writes one object to `dest` (below `root`, no symbolic link on the
    /// way); returns its size.
    async fn download(
        &self,
        bucket: &str,
        object: &str,
        root: &Path,
        dest: &Path,
    ) -> std::result::Result<u64, String> {
        let fetched = async {
            check_no_symlink(root, dest).map_err(|e| e.to_string())?;
            if let Some(parent) = dest.parent() {
                tokio::fs::create_dir_all(parent)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            match self {
                Objects::Local(buckets) => copy_object(buckets, bucket, object, dest).await,
                Objects::Connection(conn, _) => conn
                    .storage
                    .download(bucket, object, dest)
                    .await
                    .map_err(|e| e.to_string()),
            }
        };
        match self {
            Objects::Local(_) => fetched
                .await
                .map_err(|e| format!("gs://{bucket}/{object}: {e}")),
            Objects::Connection(..) => fetched.await,
        }
    }

    /// Uploads the file at `path` (`shown` in errors) as `name` with the
    /// run's `metadata`; returns its size.
    async fn upload(
        &self,
        bucket: &str,
        name: &str,
        path: &Path,
        shown: &str,
        metadata: &BTreeMap<String, String>,
    ) -> std::result::Result<u64, String> {
        match self {
            Objects::Local(buckets) => {
                let file = tokio::fs::File::open(path)
                    .await
                    .map_err(|e| format!("{shown}: {e}"))?;
                let meta = pubrun_buckets::ObjectMeta {
                    metadata: metadata.clone(),
                    ..Default::default()
                };
                let row = buckets
                    .put_object(bucket, name, file, meta, Default::default())
                    .await
                    .map_err(|e| format!("gs://{bucket}/{name}: {e}"))?;
                Ok(row.size)
            }
            Objects::Connection(conn, _) => conn
                .storage
                .upload(bucket, name, path, metadata)
                .await
                .map(|info| info.size)
                .map_err(|e| e.to_string()),
        }
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

/// Streams one object of this server's buckets into the file `dest`;
/// returns its size.
async fn copy_object(
    buckets: &pubrun_buckets::Buckets,
    bucket: &str,
    object: &str,
    dest: &Path,
) -> std::result::Result<u64, String> {
    let (_, mut src) = buckets
        .open_object(bucket, object, None, Default::default())
        .await
        .map_err(|e| e.to_string())?;
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
    pubrun_exec::blocking_io(move || {
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
}
