//! Object bytes on disk. File names are random ids chosen here, never
//! derived from bucket or object names:
//!
//! ```text
//! <data_dir>/buckets/
//!   index.db            SQLite: buckets, objects (name → blob id), notifications, outbox, uploads
//!   blobs/ab/ab12…ef    one immutable file per object generation (32 hex chars)
//!   uploads/<id>        bytes received so far by a resumable upload session
//!   tmp/                files being written by simple/multipart uploads, copies, composes
//! ```
//!
//! A blob is written to `tmp/` while it is hashed, fsynced, then renamed into
//! `blobs/` and the directory fsynced — all before the index commit that
//! makes it visible. Blobs no object refers to (a crash between rename and
//! commit, or after a commit that replaced an object) are removed at start.

use std::io;
use std::path::{Path, PathBuf};

use tokio::io::AsyncWriteExt;

use crate::hash::{Digests, Hasher};

pub struct BlobStore {
    root: PathBuf,
}

/// 32 lowercase hex characters: the only strings turned into file names.
pub fn is_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

pub fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

impl BlobStore {
    /// Creates the directories and empties `tmp/`.
    pub fn open(root: &Path) -> io::Result<Self> {
        for d in ["blobs", "uploads", "tmp"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        for entry in std::fs::read_dir(root.join("tmp"))? {
            let entry = entry?;
            let _ = std::fs::remove_file(entry.path());
        }
        Ok(BlobStore {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blob_path(&self, id: &str) -> PathBuf {
        assert!(is_id(id), "blob id {id:?} is not 32 hex characters");
        self.root.join("blobs").join(&id[..2]).join(id)
    }

    pub fn upload_path(&self, upload_id: &str) -> PathBuf {
        assert!(
            is_id(upload_id),
            "upload id {upload_id:?} is not 32 hex characters"
        );
        self.root.join("uploads").join(upload_id)
    }

    /// A new temp file that hashes what is written to it.
    pub async fn writer(&self) -> io::Result<BlobWriter> {
        let path = self.root.join("tmp").join(new_id());
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .await?;
        Ok(BlobWriter {
            file: Some(tokio::io::BufWriter::with_capacity(1 << 20, file)),
            path: Some(path),
            hasher: Hasher::new(),
        })
    }

    /// Moves a finished (fsynced) file into `blobs/` under a new id and makes
    /// the rename durable. Blocking.
    pub fn install(&self, file: &Path) -> io::Result<String> {
        let id = new_id();
        let dest = self.blob_path(&id);
        let dir = dest.parent().expect("blob path has a parent");
        if !dir.exists() {
            std::fs::create_dir_all(dir)?;
            sync_dir(&self.root.join("blobs"))?;
        }
        std::fs::rename(file, &dest)?;
        sync_dir(dir)?;
        Ok(id)
    }

    /// A new blob with the same bytes as `src` (a hard link; a copy where the
    /// file system has no hard links). Blocking.
    pub fn duplicate(&self, src: &str) -> io::Result<String> {
        let id = new_id();
        let dest = self.blob_path(&id);
        let dir = dest.parent().expect("blob path has a parent");
        if !dir.exists() {
            std::fs::create_dir_all(dir)?;
            sync_dir(&self.root.join("blobs"))?;
        }
        if std::fs::hard_link(self.blob_path(src), &dest).is_err() {
            let tmp = self.root.join("tmp").join(new_id());
            std::fs::copy(self.blob_path(src), &tmp)?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &dest)?;
        }
        sync_dir(dir)?;
        Ok(id)
    }

    /// Removes a blob; a missing file is not an error. Blocking.
    pub fn remove(&self, id: &str) {
        if !is_id(id) {
            return;
        }
        if let Err(e) = std::fs::remove_file(self.blob_path(id)) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(blob = id, error = %e, "could not remove blob file");
            }
        }
    }

    /// Every blob id on disk. Blocking.
    pub fn list(&self) -> io::Result<Vec<String>> {
        let mut ids = Vec::new();
        for shard in std::fs::read_dir(self.root.join("blobs"))? {
            let shard = shard?;
            if !shard.file_type()?.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(shard.path())? {
                let f = f?;
                if let Some(name) = f.file_name().to_str() {
                    if is_id(name) {
                        ids.push(name.to_string());
                    }
                }
            }
        }
        Ok(ids)
    }

    /// Every upload-session file on disk. Blocking.
    pub fn list_uploads(&self) -> io::Result<Vec<String>> {
        let mut ids = Vec::new();
        for f in std::fs::read_dir(self.root.join("uploads"))? {
            let f = f?;
            if let Some(name) = f.file_name().to_str() {
                if is_id(name) {
                    ids.push(name.to_string());
                }
            }
        }
        Ok(ids)
    }
}

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// A temp file being written and hashed. Dropped without [`finish`], the
/// file is removed.
///
/// [`finish`]: BlobWriter::finish
pub struct BlobWriter {
    file: Option<tokio::io::BufWriter<tokio::fs::File>>,
    path: Option<PathBuf>,
    hasher: Hasher,
}

impl BlobWriter {
    pub async fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.hasher.update(data);
        self.file
            .as_mut()
            .expect("writer used after finish")
            .write_all(data)
            .await
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.hasher.len()
    }

    /// Flushes and fsyncs; returns the temp path (now owned by the caller) and digests.
    pub async fn finish(mut self) -> io::Result<TempBlob> {
        let mut file = self.file.take().expect("finish once");
        file.flush().await?;
        file.get_mut().sync_all().await?;
        drop(file);
        let path = self.path.take().expect("finish once");
        Ok(TempBlob {
            path: Some(path),
            digests: std::mem::take(&mut self.hasher).finish(),
        })
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A complete, fsynced temp file not yet installed. Removed on drop unless
/// taken with [`TempBlob::take_path`].
pub struct TempBlob {
    path: Option<PathBuf>,
    pub digests: Digests,
}

impl TempBlob {
    pub fn new(path: PathBuf, digests: Digests) -> Self {
        TempBlob {
            path: Some(path),
            digests,
        }
    }
    pub fn path(&self) -> &Path {
        self.path.as_deref().expect("temp blob path taken")
    }
    pub fn take_path(mut self) -> PathBuf {
        self.path.take().expect("temp blob path taken")
    }
}

impl Drop for TempBlob {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}
