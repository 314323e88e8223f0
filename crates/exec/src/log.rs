//! Per-run log capture with a size cap.

use std::path::{Path, PathBuf};

use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

/// Appends stdout and stderr of a run to one file, up to `limit` bytes;
/// beyond that bytes are counted, not stored, and a marker line says so.
pub struct LogSink {
    path: PathBuf,
    limit: u64,
    state: Mutex<State>,
}

struct State {
    file: Option<tokio::fs::File>,
    written: u64,
    dropped: u64,
}

impl LogSink {
    pub async fn create(path: impl AsRef<Path>, limit: u64) -> std::io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .await?;
        let written = file.metadata().await?.len();
        Ok(LogSink {
            path,
            limit,
            state: Mutex::new(State {
                file: Some(file),
                written,
                dropped: 0,
            }),
        })
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
        let room = self.limit.saturating_sub(st.written) as usize;
        let keep = bytes.len().min(room);
        if keep > 0 {
            if let Some(f) = st.file.as_mut() {
                if f.write_all(&bytes[..keep]).await.is_err() {
                    st.file = None; // a full disk must not fail the run
                }
            }
            st.written += keep as u64;
        }
        if keep < bytes.len() {
            let first_drop = st.dropped == 0;
            st.dropped += (bytes.len() - keep) as u64;
            if first_drop {
                if let Some(f) = st.file.as_mut() {
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
        if let Some(f) = st.file.as_mut() {
            let _ = f.write_all(format!("[pubrun] {line}\n").as_bytes()).await;
        }
    }

    pub async fn flush(&self) {
        let mut st = self.state.lock().await;
        if let Some(f) = st.file.as_mut() {
            let _ = f.flush().await;
            let _ = f.sync_data().await;
        }
    }

    /// Bytes that did not fit under the limit.
    pub async fn dropped(&self) -> u64 {
        self.state.lock().await.dropped
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
