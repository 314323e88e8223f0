//! Per-run log capture with a size cap, and masking of secret values.

use std::path::{Path, PathBuf};

use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

/// What a secret value is replaced with in logs and results.
pub const MASK: &str = "***";

/// Replaces secret values in a byte stream.
#[derive(Debug, Clone, Default)]
pub struct Masker {
    /// Longest first, so a value that contains another is masked whole.
    needles: Vec<Vec<u8>>,
    longest: usize,
    /// Some value contains a newline: a line end is no safe cut.
    multiline: bool,
}

impl Masker {
    pub fn new(values: impl IntoIterator<Item = String>) -> Self {
        let mut needles: Vec<Vec<u8>> = values
            .into_iter()
            .filter(|v| !v.is_empty())
            .map(String::into_bytes)
            .collect();
        needles.sort_by_key(|n| std::cmp::Reverse(n.len()));
        needles.dedup();
        Masker {
            longest: needles.first().map_or(0, Vec::len),
            multiline: needles.iter().any(|n| n.contains(&b'\n')),
            needles,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.needles.is_empty()
    }

    fn match_at(&self, b: &[u8]) -> Option<usize> {
        self.needles.iter().find(|n| b.starts_with(n)).map(Vec::len)
    }

    /// Masks the bytes of `buf` before `cut` (and a value that starts there
    /// and runs past it); returns the output and how much of `buf` it used.
    fn mask_prefix(&self, buf: &[u8], cut: usize) -> (Vec<u8>, usize) {
        let mut out = Vec::with_capacity(cut);
        let mut i = 0;
        while i < cut {
            match self.match_at(&buf[i..]) {
                Some(n) => {
                    out.extend_from_slice(MASK.as_bytes());
                    i += n;
                }
                None => {
                    out.push(buf[i]);
                    i += 1;
                }
            }
        }
        (out, i)
    }

    /// Masks a complete text.
    pub fn mask_all(&self, b: &[u8]) -> Vec<u8> {
        self.mask_prefix(b, b.len()).0
    }

    /// How much of a pending buffer can be masked and written now: a value
    /// may still be arriving only in its last `longest - 1` bytes, and never
    /// across a line end when no value contains one.
    fn safe_cut(&self, buf: &[u8]) -> usize {
        let overlap = buf.len().saturating_sub(self.longest.saturating_sub(1));
        let line = if self.multiline {
            0
        } else {
            buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1)
        };
        overlap.max(line)
    }
}

/// Appends stdout and stderr of a run to one file, up to `limit` bytes;
/// beyond that bytes are counted, not stored, and a marker line says so.
/// Secret values given at creation are replaced by [`MASK`] before anything
/// reaches the file, also when a value arrives split across writes (the
/// tail that could still be the start of one is held back until more
/// output, a note or a flush comes).
pub struct LogSink {
    path: PathBuf,
    limit: u64,
    masker: Masker,
    state: Mutex<State>,
}

struct State {
    file: LogFile,
    written: u64,
    dropped: u64,
    /// Output not yet written because a secret could still complete in it.
    pending: Vec<u8>,
    /// The job's last written byte was not a newline: a note starts a line.
    mid_line: bool,
}

/// Where the log's bytes go.
enum LogFile {
    /// Not created yet ([`LogSink::deferred`]): the first write, note, flush
    /// or [`LogSink::open`] creates it, its directory and its first note.
    Deferred {
        first_note: Vec<u8>,
    },
    Open(tokio::fs::File),
    /// Creating or writing failed (a full disk): the run goes on, its
    /// output is dropped.
    Failed,
}

impl LogSink {
    pub async fn create(path: impl AsRef<Path>, limit: u64) -> std::io::Result<Self> {
        Self::create_masking(path, limit, Vec::new()).await
    }

    /// Like [`LogSink::create`], masking every value of `secrets`.
    pub async fn create_masking(
        path: impl AsRef<Path>,
        limit: u64,
        secrets: Vec<String>,
    ) -> std::io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .await?;
        let written = file.metadata().await?.len();
        Ok(Self::new(
            path,
            limit,
            Masker::new(secrets),
            LogFile::Open(file),
            written,
        ))
    }

    /// A log whose file (appended to if it exists) and missing parent
    /// directory are made only when first needed, with `first_note` as its
    /// first line: creating them is disk work an attempt need not wait for
    /// before its process starts. No I/O here.
    pub fn deferred(
        path: impl AsRef<Path>,
        limit: u64,
        secrets: Vec<String>,
        first_note: Option<&str>,
    ) -> Self {
        let masker = Masker::new(secrets);
        let first_note = first_note
            .map(|n| masker.mask_all(format!("[pubrun] {n}\n").as_bytes()))
            .unwrap_or_default();
        let path = path.as_ref().to_path_buf();
        Self::new(path, limit, masker, LogFile::Deferred { first_note }, 0)
    }

    fn new(path: PathBuf, limit: u64, masker: Masker, file: LogFile, written: u64) -> Self {
        LogSink {
            path,
            limit,
            masker,
            state: Mutex::new(State {
                file,
                written,
                dropped: 0,
                pending: Vec::new(),
                mid_line: false,
            }),
        }
    }

    /// Creates a deferred log's file now (nothing if it exists); `false`
    /// when it cannot be (its output will be dropped).
    pub async fn open(&self) -> bool {
        let mut st = self.state.lock().await;
        Self::file(&self.path, &mut st).await.is_some()
    }

    /// The open file, creating a deferred one first.
    async fn file<'s>(path: &Path, st: &'s mut State) -> Option<&'s mut tokio::fs::File> {
        if let LogFile::Deferred { first_note } = &mut st.file {
            let (path, note) = (path.to_path_buf(), std::mem::take(first_note));
            st.file = match crate::blocking_io(move || open_appending(&path, &note)).await {
                Ok((file, len)) => {
                    // Notes do not count against the limit, as with `note`.
                    st.written = len;
                    LogFile::Open(tokio::fs::File::from_std(file))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot create a run log; its output is dropped");
                    LogFile::Failed
                }
            };
        }
        match &mut st.file {
            LogFile::Open(f) => Some(f),
            LogFile::Deferred { .. } | LogFile::Failed => None,
        }
    }

    /// Bytes kept at most.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends bytes (already interleaved stdout/stderr).
    pub async fn write(&self, bytes: &[u8]) {
        let mut st = self.state.lock().await;
        if self.masker.is_empty() {
            return self.append(&mut st, bytes).await;
        }
        st.pending.extend_from_slice(bytes);
        let cut = self.masker.safe_cut(&st.pending);
        self.release(&mut st, cut).await;
    }

    /// Writes the masked pending bytes up to `cut`.
    async fn release(&self, st: &mut State, cut: usize) {
        if cut == 0 {
            return;
        }
        let (out, used) = self.masker.mask_prefix(&st.pending, cut);
        st.pending.drain(..used);
        self.append(st, &out).await;
    }

    async fn release_all(&self, st: &mut State) {
        let n = st.pending.len();
        self.release(st, n).await;
    }

    async fn append(&self, st: &mut State, bytes: &[u8]) {
        // Opened first: an existing file's length counts against the limit.
        Self::file(&self.path, st).await;
        let room = self.limit.saturating_sub(st.written) as usize;
        let keep = bytes.len().min(room);
        if keep > 0 {
            if let Some(f) = Self::file(&self.path, st).await {
                if f.write_all(&bytes[..keep]).await.is_err() {
                    st.file = LogFile::Failed; // a full disk must not fail the run
                }
            }
            st.written += keep as u64;
            st.mid_line = bytes[keep - 1] != b'\n';
        }
        if keep < bytes.len() {
            let first_drop = st.dropped == 0;
            st.dropped += (bytes.len() - keep) as u64;
            if first_drop {
                if let Some(f) = Self::file(&self.path, st).await {
                    let _ = f
                        .write_all(b"\n[pubrun: log limit reached; further output is dropped]\n")
                        .await;
                }
            }
        }
    }

    /// A line from pubrun itself (start, retry, exit), marked as such.
    pub async fn note(&self, line: &str) {
        let mut st = self.state.lock().await;
        self.release_all(&mut st).await;
        let start = if std::mem::take(&mut st.mid_line) {
            "\n"
        } else {
            ""
        };
        let line = self
            .masker
            .mask_all(format!("{start}[pubrun] {line}\n").as_bytes());
        if let Some(f) = Self::file(&self.path, &mut st).await {
            let _ = f.write_all(&line).await;
        }
    }

    /// Writes what is held back and syncs the file.
    pub async fn flush(&self) {
        self.finish(true).await
    }

    /// Writes what is held back to the OS without syncing: for a server
    /// whose logs are synced in the background ([`sync_filesystem`]).
    pub async fn flush_unsynced(&self) {
        self.finish(false).await
    }

    async fn finish(&self, sync: bool) {
        let mut st = self.state.lock().await;
        self.release_all(&mut st).await;
        if let Some(f) = Self::file(&self.path, &mut st).await {
            let _ = f.flush().await;
            if sync {
                if let Err(e) = f.sync_data().await {
                    tracing::warn!(log = %self.path.display(), error = %e, "cannot sync a run log");
                }
            }
        }
    }

    /// Bytes that did not fit under the limit.
    pub async fn dropped(&self) -> u64 {
        self.state.lock().await.dropped
    }
}

/// Opens `path` for appending (making a missing parent directory) and
/// writes `first`; returns the file and its length before `first`.
fn open_appending(path: &Path, first: &[u8]) -> std::io::Result<(std::fs::File, u64)> {
    use std::io::Write;
    let open = || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    };
    let mut file = match open() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            open()?
        }
        r => r?,
    };
    let len = file.metadata()?.len();
    file.write_all(first)?;
    Ok((file, len))
}

/// Commits every written file of the filesystem holding `dir` to disk
/// (`syncfs(2)`): one call covers every log finished since the last one,
/// where syncing each costs a journal commit per run. Blocking.
pub fn sync_filesystem(dir: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let d = std::fs::File::open(dir)?;
    // SAFETY: syncfs only reads the descriptor, which `d` keeps open.
    if unsafe { libc::syncfs(d.as_raw_fd()) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The last `max` bytes of a log file, as lossy UTF-8 (for result summaries).
pub async fn tail(path: &Path, max: usize) -> String {
    match tokio::fs::read(path).await {
        Ok(b) => {
            let start = b.len().saturating_sub(max);
            String::from_utf8_lossy(&b[start..]).into_owned()
        }
        Err(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_deferred_log_is_made_when_first_needed_with_its_note_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("runs").join("7").join("log");
        let sink = LogSink::deferred(&path, 1 << 20, vec!["pw1".into()], Some("start pw1"));
        assert!(!path.exists(), "made before it was needed");
        sink.write(b"out\n").await;
        sink.flush().await;
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "[pubrun] start ***\nout\n"
        );

        // `open` makes it without output; an existing log is appended to,
        // its bytes counting against the limit.
        let quiet = dir.path().join("quiet");
        assert!(
            LogSink::deferred(&quiet, 10, vec![], Some("n"))
                .open()
                .await
        );
        assert_eq!(std::fs::read_to_string(&quiet).unwrap(), "[pubrun] n\n");
        let again = LogSink::deferred(&path, 30, vec![], None);
        again.write(b"0123456789").await;
        again.flush().await;
        assert_eq!(again.dropped().await, 3, "23 bytes were there, 30 fit");
    }

    #[tokio::test]
    async fn secrets_are_masked_also_when_split_across_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let sink = LogSink::create_masking(&path, 1 << 20, vec!["hunter2".into(), "s3cr".into()])
            .await
            .unwrap();
        // One byte at a time: every value arrives split.
        for b in b"pw=hunter2 short=s3cr end\nhun".iter() {
            sink.write(std::slice::from_ref(b)).await;
        }
        sink.write(b"ter2!").await;
        sink.note("exit, env had hunter2").await;
        sink.write(b"tail s3").await;
        sink.write(b"cr").await;
        sink.flush().await;
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            !text.contains("hunter2") && !text.contains("s3cr"),
            "{text}"
        );
        assert_eq!(
            text,
            "pw=*** short=*** end\n***!\n[pubrun] exit, env had ***\ntail ***"
        );
    }
}
