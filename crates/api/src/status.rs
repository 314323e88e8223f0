//! The one mapping from [`Error`] to gRPC status and to Google's JSON error body.

use axum::response::{IntoResponse, Response};
use pubrun_core::{Code, Error};

pub fn to_status(e: Error) -> tonic::Status {
    let code = match e.code {
        Code::InvalidArgument => tonic::Code::InvalidArgument,
        Code::NotFound => tonic::Code::NotFound,
        Code::AlreadyExists => tonic::Code::AlreadyExists,
        Code::FailedPrecondition => tonic::Code::FailedPrecondition,
        Code::PermissionDenied => tonic::Code::PermissionDenied,
        Code::Unauthenticated => tonic::Code::Unauthenticated,
        Code::ResourceExhausted => tonic::Code::ResourceExhausted,
        Code::Unavailable => tonic::Code::Unavailable,
        Code::DeadlineExceeded => tonic::Code::DeadlineExceeded,
        Code::Internal => tonic::Code::Internal,
    };
    tonic::Status::new(code, e.message)
}

/// Error as an HTTP response in Google's shape:
/// `{"error": {"code": 404, "message": "...", "status": "NOT_FOUND"}}`.
pub struct HttpError(pub Error);

impl From<Error> for HttpError {
    fn from(e: Error) -> Self {
        HttpError(e)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = self.0.code.http_status();
        let body = serde_json::json!({
            "error": { "code": status, "message": self.0.message, "status": self.0.code.as_str() }
        });
        let code =
            http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
        (code, axum::Json(body)).into_response()
    }
}
