//! Errors in the shape the Cloud Storage JSON API returns them:
//!
//! ```json
//! {"error": {"code": 404, "message": "...",
//!            "errors": [{"message": "...", "domain": "global", "reason": "notFound"}]}}
//! ```
//!
//! The official clients map the HTTP status to their exception classes
//! (`NotFound`, `Conflict`, `PreconditionFailed`, …) and show `message`.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcsError {
    pub status: u16,
    pub reason: &'static str,
    pub message: String,
}

pub type GcsResult<T> = Result<T, GcsError>;

/// `name(message)` constructors of [`GcsError`]: its HTTP status and reason.
macro_rules! status_constructors {
    ($($name:ident => $status:literal $reason:literal),* $(,)?) => {$(
        pub fn $name(message: impl Into<String>) -> Self {
            Self::new($status, $reason, message)
        }
    )*};
}

impl GcsError {
    pub fn new(status: u16, reason: &'static str, message: impl Into<String>) -> Self {
        GcsError {
            status,
            reason,
            message: message.into(),
        }
    }
    status_constructors!(
        invalid => 400 "invalid",
        required => 400 "required",
        bad_request => 400 "badRequest",
        not_found => 404 "notFound",
        conflict => 409 "conflict",
        precondition => 412 "conditionNotMet",
        range_not_satisfiable => 416 "requestedRangeNotSatisfiable",
        internal => 500 "backendError",
        unavailable => 503 "backendError",
    );
    pub fn not_modified() -> Self {
        Self::new(304, "notModified", "")
    }

    pub fn no_bucket(bucket: &str) -> Self {
        Self::not_found(format!("The specified bucket does not exist: {bucket}"))
    }
    pub fn no_object(bucket: &str, name: &str) -> Self {
        Self::not_found(format!("No such object: {bucket}/{name}"))
    }

    /// Google's body without a status name, plus the `errors` array that
    /// the Cloud Storage clients read `reason` from.
    pub fn body(&self) -> serde_json::Value {
        let mut body = pubrun_core::error::json_body(self.status, None, &self.message);
        body["error"]["errors"] = serde_json::json!([
            {"message": self.message, "domain": "global", "reason": self.reason}
        ]);
        body
    }
}

impl std::fmt::Display for GcsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.reason, self.message)
    }
}

impl std::error::Error for GcsError {}

impl From<pubrun_store::StoreError> for GcsError {
    fn from(e: pubrun_store::StoreError) -> Self {
        tracing::error!(error = %e, "bucket storage error");
        match e {
            pubrun_store::StoreError::Corrupt { .. } => {
                GcsError::internal(format!("bucket storage error: {e}"))
            }
            e => GcsError::unavailable(format!("bucket storage unavailable: {e}")),
        }
    }
}

impl From<std::io::Error> for GcsError {
    fn from(e: std::io::Error) -> Self {
        tracing::error!(error = %e, "bucket storage I/O error");
        GcsError::unavailable(format!("storage I/O error: {e}"))
    }
}

impl IntoResponse for GcsError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status == StatusCode::NOT_MODIFIED {
            return status.into_response();
        }
        let mut resp = (status, self.body().to_string()).into_response();
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=UTF-8"),
        );
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_keeps_the_cloud_storage_shape() {
        assert_eq!(
            GcsError::no_bucket("b").body().to_string(),
            r#"{"error":{"code":404,"errors":[{"domain":"global","message":"The specified bucket does not exist: b","reason":"notFound"}],"message":"The specified bucket does not exist: b"}}"#
        );
    }
}
