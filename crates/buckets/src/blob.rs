//! Object bytes, through the storage seam ([`pubrun_store::buckets`]): the
//! embedded engine keeps one file per blob under `<data_dir>/buckets/`,
//! PostgreSQL keeps 1 MiB chunks. Here blobs are hashed (MD5, CRC32C) while
//! they stream in. A blob is visible only once an object row naming it
//! commits; one whose commit never happens is discarded (or swept).

use std::sync::Arc;

use pubrun_store::buckets::{BlobWriter as StoreWriter, BucketStore};

use crate::error::GcsResult;
use crate::hash::{Digests, Hasher};

/// 32 lowercase hex characters: the only strings used as blob/upload ids.
pub fn is_id(id: &str) -> bool {
    pubrun_store::buckets::is_blob_id(id)
}

pub fn new_id() -> String {
    pubrun_store::buckets::new_blob_id()
}

/// A new blob being written and hashed. Dropped without [`finish`], its
/// bytes are removed.
///
/// [`finish`]: BlobWriter::finish
pub struct BlobWriter {
    w: Box<dyn StoreWriter>,
    store: Arc<dyn BucketStore>,
    hasher: Hasher,
}

impl BlobWriter {
    pub(crate) async fn new(store: Arc<dyn BucketStore>) -> GcsResult<Self> {
        Ok(BlobWriter {
            w: store.blob_writer(None).await?,
            store,
            hasher: Hasher::new(),
        })
    }

    pub async fn write(&mut self, data: &[u8]) -> GcsResult<()> {
        self.hasher.update(data);
        Ok(self.w.write(data).await?)
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.hasher.len()
    }

    /// Makes the bytes durable; returns the blob (not yet visible) and its digests.
    pub async fn finish(self) -> GcsResult<TempBlob> {
        let id = self.w.id().to_string();
        self.w.finish().await?;
        Ok(TempBlob {
            id: Some(id),
            store: self.store,
            digests: self.hasher.finish(),
        })
    }
}

/// A complete blob no object names yet. Discarded on drop unless taken
/// with [`TempBlob::take_id`].
pub struct TempBlob {
    id: Option<String>,
    store: Arc<dyn BucketStore>,
    pub digests: Digests,
}

impl TempBlob {
    /// Takes charge of a finished blob (a copy).
    pub(crate) fn adopt(store: Arc<dyn BucketStore>, id: String, digests: Digests) -> Self {
        TempBlob {
            id: Some(id),
            store,
            digests,
        }
    }
    pub fn id(&self) -> &str {
        self.id.as_deref().expect("temp blob id taken")
    }
    pub fn take_id(mut self) -> String {
        self.id.take().expect("temp blob id taken")
    }
}

impl Drop for TempBlob {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            discard_later(self.store.clone(), id);
        }
    }
}

/// Discards a blob in the background (drop paths cannot wait); what fails
/// here is left for the sweep at the next start.
pub(crate) fn discard_later(store: Arc<dyn BucketStore>, id: String) {
    if let Ok(h) = tokio::runtime::Handle::try_current() {
        h.spawn(async move {
            if let Err(e) = store.discard_blob(&id).await {
                tracing::warn!(blob = %id, error = %e, "could not remove an unused blob; the next sweep will");
            }
        });
    }
}
