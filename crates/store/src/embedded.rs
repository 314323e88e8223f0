//! The embedded engine: a data directory holding `catalog.json` and
//! `log/<first-seq>.seg` segment files, written by one group-commit thread.
//!
//! Durability: `append` resolves only after the frames are written and the
//! segment is `fdatasync`ed; every append that arrives while a sync runs joins
//! the next one, so many concurrent publishes share one sync. With
//! [`SyncMode::Interval`](crate::SyncMode) it resolves once the frames are
//! written (in the page cache: a process crash loses nothing) and the writer
//! syncs at most one interval later. The catalog is
//! replaced atomically (write temp, fsync, rename, fsync dir).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

use bytes::Bytes;
use std::sync::Mutex;
use tokio::sync::oneshot;

use crate::catalog::Catalog;
use crate::record::{read_frame, Frame, Record};
use crate::{AppendFuture, Store, StoreError};

/// A segment is closed and a new one started past this size.
const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Upper bound of bytes written between two syncs.
const MAX_BATCH_BYTES: usize = 32 * 1024 * 1024;

pub struct EmbeddedStore {
    dir: PathBuf,
    /// Size past which the active segment is closed (tests use small ones).
    segment_bytes: u64,
    _lock: File,
    tx: Mutex<Option<mpsc::Sender<WriteReq>>>,
    /// Closed segments: base seq → (path, highest seq in it, bytes).
    segments: Arc<Mutex<BTreeMap<u64, SegmentInfo>>>,
    log_bytes: Arc<AtomicU64>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

#[derive(Debug, Clone)]
struct SegmentInfo {
    path: PathBuf,
    max_seq: Option<u64>,
    bytes: u64,
}

/// The active segment as recovery left it, handed to the writer thread.
struct Tail {
    base: u64,
    file: File,
    len: u64,
    max_seq: Option<u64>,
    next_seq: u64,
}

struct WriteReq {
    frames: Vec<u8>,
    last_seq: Option<u64>,
    done: oneshot::Sender<Result<(), StoreError>>,
}

impl EmbeddedStore {
    /// Opens (creating if needed) the data directory and takes its lock.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with_segment_bytes(dir, SEGMENT_BYTES)
    }

    /// `open` with another segment size, so that tests can show space being
    /// reclaimed without writing 64 MiB.
    pub fn open_with_segment_bytes(
        dir: impl AsRef<Path>,
        segment_bytes: u64,
    ) -> Result<Self, StoreError> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(dir.join("log")).map_err(|e| StoreError::io(&dir, e))?;
        let lock = lock_directory(&dir)?;
        Ok(EmbeddedStore {
            dir,
            segment_bytes: segment_bytes.max(1),
            _lock: lock,
            tx: Mutex::new(None),
            segments: Arc::new(Mutex::new(BTreeMap::new())),
            log_bytes: Arc::new(AtomicU64::new(0)),
            writer: Mutex::new(None),
        })
    }

    fn log_dir(&self) -> PathBuf {
        self.dir.join("log")
    }

    fn catalog_path(&self) -> PathBuf {
        self.dir.join("catalog.json")
    }

    fn read_catalog(&self) -> Result<Catalog, StoreError> {
        let path = self.catalog_path();
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                path: path.display().to_string(),
                detail: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Catalog::new()),
            Err(e) => Err(StoreError::io(&path, e)),
        }
    }

    fn start_writer(&self, tail: Tail) {
        let (tx, rx) = mpsc::channel::<WriteReq>();
        let log_dir = self.log_dir();
        let segments = self.segments.clone();
        let log_bytes = self.log_bytes.clone();
        let segment_bytes = self.segment_bytes;
        let interval = match crate::sync_mode() {
            crate::SyncMode::Always => None,
            crate::SyncMode::Interval(d) => Some(d),
        };
        let handle = std::thread::Builder::new()
            .name("pubrun-log-writer".into())
            .spawn(move || {
                writer_loop(
                    rx,
                    tail,
                    log_dir,
                    segments,
                    log_bytes,
                    segment_bytes,
                    interval,
                )
            })
            .expect("spawn log writer thread");
        *self.tx.lock().unwrap() = Some(tx);
        *self.writer.lock().unwrap() = Some(handle);
    }

    /// Stops the writer after it has written everything enqueued so far.
    pub fn close(&self) {
        self.tx.lock().unwrap().take();
        if let Some(h) = self.writer.lock().unwrap().take() {
            let _ = h.join();
        }
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        self.close();
    }
}

fn segment_path(log_dir: &Path, base: u64) -> PathBuf {
    log_dir.join(format!("{base:020}.seg"))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(dir, e))
}

fn writer_loop(
    rx: mpsc::Receiver<WriteReq>,
    mut tail: Tail,
    log_dir: PathBuf,
    segments: Arc<Mutex<BTreeMap<u64, SegmentInfo>>>,
    log_bytes: Arc<AtomicU64>,
    segment_bytes: u64,
    interval: Option<std::time::Duration>,
) {
    let mut batch: Vec<WriteReq> = Vec::new();
    // Interval mode: when the oldest write not yet synced was made.
    let mut dirty_since: Option<std::time::Instant> = None;
    loop {
        let first = match (interval, dirty_since) {
            (Some(every), Some(since)) => {
                match rx.recv_timeout(every.saturating_sub(since.elapsed())) {
                    Ok(r) => r,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        sync_tail(&tail);
                        dirty_since = None;
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
            _ => match rx.recv() {
                Ok(r) => r,
                Err(_) => break,
            },
        };
        batch.push(first);
        let mut bytes = batch[0].frames.len();
        while bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(req) => {
                    bytes += req.frames.len();
                    batch.push(req);
                }
                Err(_) => break,
            }
        }
        let path = segment_path(&log_dir, tail.base);
        let result = write_batch(&mut tail.file, &batch).and_then(|()| match interval {
            None => timed_sync(&tail.file),
            Some(_) => {
                dirty_since.get_or_insert_with(std::time::Instant::now);
                Ok(())
            }
        });
        match result {
            Ok(()) => {
                tail.len += bytes as u64;
                log_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
                for req in &batch {
                    if let Some(s) = req.last_seq {
                        tail.max_seq = Some(s);
                        tail.next_seq = s + 1;
                    }
                }
                for req in batch.drain(..) {
                    let _ = req.done.send(Ok(()));
                }
            }
            Err(e) => {
                // Cut the segment back to its last durable length so that a
                // half-written batch never turns into records on recovery,
                // then fail every caller: none of them was acknowledged.
                let _ = tail.file.set_len(tail.len);
                let _ = tail.file.seek(SeekFrom::Start(tail.len));
                tracing::error!(error = %e, path = %path.display(), "log write failed");
                for req in batch.drain(..) {
                    let _ = req.done.send(Err(StoreError::io(
                        &path,
                        std::io::Error::new(e.kind(), e.to_string()),
                    )));
                }
            }
        }
        // Segments are named after the next seq, so a segment into which no
        // seq was published cannot be closed: its successor would get the same
        // name, i.e. be the same file, and `reclaim` would then delete the
        // active segment as a dead closed one. It keeps growing (acks only)
        // until a publish arrives.
        if let (Some(every), Some(since)) = (interval, dirty_since) {
            if since.elapsed() >= every {
                sync_tail(&tail);
                dirty_since = None;
            }
        }
        if tail.len >= segment_bytes && tail.next_seq > tail.base {
            // A closed segment is never synced again: sync it now.
            if dirty_since.take().is_some() {
                sync_tail(&tail);
            }
            match roll_segment(&log_dir, &tail) {
                Ok(file) => {
                    segments.lock().unwrap().insert(
                        tail.base,
                        SegmentInfo {
                            path: path.clone(),
                            max_seq: tail.max_seq,
                            bytes: tail.len,
                        },
                    );
                    tail = Tail {
                        base: tail.next_seq,
                        file,
                        len: 0,
                        max_seq: None,
                        next_seq: tail.next_seq,
                    };
                }
                Err(e) => {
                    tracing::error!(error = %e, "could not start a new log segment; continuing in the old one")
                }
            }
        }
    }
    sync_tail(&tail);
}

/// One timed `fdatasync` of the active segment.
fn timed_sync(file: &File) -> std::io::Result<()> {
    let started = std::time::Instant::now();
    let synced = file.sync_data();
    pubrun_observability::metrics()
        .store_sync
        .observe(started.elapsed().as_secs_f64());
    synced
}

/// Interval mode's background sync. The writes it covers were acknowledged
/// already, so a failure can only be reported: loudly, since a power loss
/// could now lose them.
fn sync_tail(tail: &Tail) {
    if let Err(e) = timed_sync(&tail.file) {
        tracing::error!(error = %e, "fdatasync of the message log failed: acknowledged messages may not survive a power loss");
    }
}

fn write_batch(file: &mut File, batch: &[WriteReq]) -> std::io::Result<()> {
    for req in batch {
        file.write_all(&req.frames)?;
    }
    Ok(())
}

/// Takes `dir`'s `LOCK` file (an `flock`, released when the returned file
/// is closed): `Locked` while another holder has it. One directory, one
/// owner — the data directory's store, a server's `--work-dir`.
pub fn lock_directory(dir: &Path) -> Result<File, StoreError> {
    let lock = open_keeping(&dir.join("LOCK"))?;
    lock.try_lock()
        .map_err(|_| StoreError::Locked(dir.display().to_string()))?;
    Ok(lock)
}

/// Opens `path` for writing, creating it but keeping what it holds.
fn open_keeping(path: &Path) -> Result<File, StoreError> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| StoreError::io(path, e))
}

fn roll_segment(log_dir: &Path, tail: &Tail) -> Result<File, StoreError> {
    let path = segment_path(log_dir, tail.next_seq);
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| StoreError::io(&path, e))?;
    sync_dir(log_dir)?;
    Ok(file)
}

#[async_trait::async_trait]
impl Store for EmbeddedStore {
    fn load_catalog(&self) -> Result<Catalog, StoreError> {
        self.read_catalog()
    }

    fn replay(&self, visit: &mut dyn FnMut(Record)) -> Result<u64, StoreError> {
        let log_dir = self.log_dir();
        let mut bases: Vec<u64> = fs::read_dir(&log_dir)
            .map_err(|e| StoreError::io(&log_dir, e))?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".seg")?.parse().ok())
            .collect();
        bases.sort_unstable();
        if bases.is_empty() {
            bases.push(1);
        }
        let mut next_seq = 1u64;
        let mut total = 0u64;
        let last_base = *bases.last().unwrap();
        let mut segs = BTreeMap::new();
        let mut tail = None;
        for base in bases {
            let path = segment_path(&log_dir, base);
            let is_last = base == last_base;
            let buf = match fs::read(&path) {
                Ok(b) => Bytes::from(b),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Bytes::new(),
                Err(e) => return Err(StoreError::io(&path, e)),
            };
            next_seq = next_seq.max(base);
            let mut pos = 0;
            let mut max_seq = None;
            while pos < buf.len() {
                let (frame, next) =
                    read_frame(&buf, pos).map_err(|detail| StoreError::Corrupt {
                        path: path.display().to_string(),
                        detail,
                    })?;
                match frame {
                    Frame::Record(rec) => {
                        if let Some(s) = rec.last_seq() {
                            max_seq = Some(s);
                            next_seq = next_seq.max(s + 1);
                        }
                        visit(rec);
                        pos = next;
                    }
                    Frame::Torn if is_last => {
                        tracing::warn!(path = %path.display(), offset = pos, dropped = buf.len() - pos,
                            "discarding a torn write at the end of the log (never acknowledged)");
                        break;
                    }
                    Frame::Torn => {
                        return Err(StoreError::Corrupt {
                            path: path.display().to_string(),
                            detail: format!("bad frame at offset {pos} in a closed segment"),
                        })
                    }
                }
            }
            total += pos as u64;
            if is_last {
                let file = open_keeping(&path)?;
                file.set_len(pos as u64)
                    .map_err(|e| StoreError::io(&path, e))?;
                let mut file = file;
                file.seek(SeekFrom::Start(pos as u64))
                    .map_err(|e| StoreError::io(&path, e))?;
                file.sync_all().map_err(|e| StoreError::io(&path, e))?;
                tail = Some(Tail {
                    base,
                    file,
                    len: pos as u64,
                    max_seq,
                    next_seq,
                });
            } else {
                segs.insert(
                    base,
                    SegmentInfo {
                        path,
                        max_seq,
                        bytes: pos as u64,
                    },
                );
            }
        }
        sync_dir(&log_dir)?;
        let mut tail = tail.expect("the last segment is always opened");
        tail.next_seq = next_seq;
        *self.segments.lock().unwrap() = segs;
        self.log_bytes.store(total, Ordering::Relaxed);
        self.start_writer(tail);
        Ok(next_seq)
    }

    async fn save_catalog(&self, catalog: &Catalog) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec_pretty(catalog).expect("catalog serializes");
        let dir = self.dir.clone();
        let path = self.catalog_path();
        tokio::task::spawn_blocking(move || {
            let tmp = dir.join("catalog.json.tmp");
            let mut f = File::create(&tmp).map_err(|e| StoreError::io(&tmp, e))?;
            f.write_all(&bytes)
                .and_then(|()| f.sync_all())
                .map_err(|e| StoreError::io(&tmp, e))?;
            fs::rename(&tmp, &path).map_err(|e| StoreError::io(&path, e))?;
            sync_dir(&dir)
        })
        .await
        .map_err(|_| StoreError::Closed)?
    }

    fn append(&self, records: Vec<Record>) -> AppendFuture {
        let mut frames = Vec::with_capacity(256);
        let mut last_seq = None;
        for r in &records {
            r.encode_frame(&mut frames);
            if let Some(s) = r.last_seq() {
                last_seq = Some(s);
            }
        }
        let (done, rx) = oneshot::channel();
        let sent = match &*self.tx.lock().unwrap() {
            Some(tx) => tx
                .send(WriteReq {
                    frames,
                    last_seq,
                    done,
                })
                .is_ok(),
            None => false,
        };
        crate::append_answer(sent, rx)
    }

    fn reclaim(&self, lowest_live_seq: u64) -> Result<u64, StoreError> {
        let mut segs = self.segments.lock().unwrap();
        let mut freed = 0;
        // Delete oldest-first only: an ack record can only refer to messages
        // in its own or an older segment, so dropping a prefix never loses an
        // ack for a message that is still on disk.
        while let Some((&base, info)) = segs.iter().next() {
            let dead = info.max_seq.is_none_or(|m| m < lowest_live_seq);
            if !dead {
                break;
            }
            match fs::remove_file(&info.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io(&info.path, e)),
            }
            freed += info.bytes;
            segs.remove(&base);
        }
        if freed > 0 {
            self.log_bytes.fetch_sub(freed, Ordering::Relaxed);
            sync_dir(&self.log_dir())?;
        }
        Ok(freed)
    }

    fn log_bytes(&self) -> u64 {
        self.log_bytes.load(Ordering::Relaxed)
    }
}
