//! Conversions between this crate's resources and the rows of the storage
//! seam ([`pubrun_store::buckets`], which keeps object metadata,
//! notification configs and upload specs as JSON text), and the state of
//! resumable upload sessions. A row that does not parse is an error, never
//! a default.

use serde::{Deserialize, Serialize};

use pubrun_store::buckets::{NotificationRecord, ObjectRecord, UploadRecord};

use crate::conditions::Conditions;
use crate::error::{GcsError, GcsResult};
use crate::hash::Expected;
use crate::model::{NotificationConfig, ObjectMeta, ObjectRow};

fn corrupt(what: &str, e: impl std::fmt::Display) -> GcsError {
    tracing::error!(error = %e, "corrupt {what} in the bucket index");
    GcsError::internal(format!("corrupt {what} in the bucket index: {e}"))
}

pub(crate) fn object_from(r: ObjectRecord) -> GcsResult<ObjectRow> {
    r.try_map_meta(|m| {
        serde_json::from_str::<ObjectMeta>(&m).map_err(|e| corrupt("object metadata", e))
    })
}

pub(crate) fn object_to(o: &ObjectRow) -> GcsResult<ObjectRecord> {
    o.clone().try_map_meta(|m| {
        serde_json::to_string(&m)
            .map_err(|e| GcsError::internal(format!("metadata does not serialize: {e}")))
    })
}

pub(crate) fn notification_from(r: &NotificationRecord) -> GcsResult<NotificationConfig> {
    serde_json::from_str(&r.config).map_err(|e| corrupt("notification config", e))
}

/// What the initiating request of a resumable upload fixed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UploadSpec {
    pub meta: ObjectMeta,
    pub conditions: Conditions,
    pub expected_md5: Option<String>,
    pub expected_crc32c: Option<String>,
}

impl UploadSpec {
    pub fn expected(&self) -> Expected {
        Expected {
            md5: self.expected_md5.clone(),
            crc32c: self.expected_crc32c.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct UploadRow {
    pub id: String,
    pub bucket: String,
    pub name: String,
    pub spec: UploadSpec,
    pub total: Option<u64>,
    pub received: u64,
    /// The object resource (JSON) once the upload completed.
    pub done: Option<String>,
    pub created_us: i64,
}

pub(crate) fn upload_from(r: UploadRecord) -> GcsResult<UploadRow> {
    Ok(UploadRow {
        spec: serde_json::from_str(&r.spec).map_err(|e| corrupt("upload session", e))?,
        id: r.id,
        bucket: r.bucket,
        name: r.name,
        total: r.total,
        received: r.received,
        done: r.done,
        created_us: r.created_us,
    })
}

pub(crate) fn upload_to(u: &UploadRow) -> GcsResult<UploadRecord> {
    Ok(UploadRecord {
        id: u.id.clone(),
        bucket: u.bucket.clone(),
        name: u.name.clone(),
        spec: serde_json::to_string(&u.spec)
            .map_err(|e| GcsError::internal(format!("upload spec does not serialize: {e}")))?,
        total: u.total,
        received: u.received,
        done: u.done.clone(),
        created_us: u.created_us,
    })
}
