//! Thin axum and tonic adapters over the one mapping in
//! [`pubrun_core::error`]: an [`Error`] as a tonic status, as a trailers-only
//! gRPC response, and as Google's JSON error body.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use pubrun_core::Error;

pub fn to_status(e: Error) -> tonic::Status {
    tonic::Status::new(tonic::Code::from_i32(e.code.grpc_code()), e.message)
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
        let status =
            StatusCode::from_u16(self.0.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        with_status(status, &self.0)
    }
}

/// `e`'s JSON body under an HTTP status other than its code's own
/// (405 and 413 have no Google code of their own).
pub fn with_status(status: StatusCode, e: &Error) -> Response {
    let body = pubrun_core::error::json_body(status.as_u16(), Some(e.code), &e.message);
    (status, axum::Json(body)).into_response()
}

/// A trailers-only gRPC error response, for requests refused before they
/// reach tonic (unknown method, missing token, CSRF).
pub fn grpc_response(e: &Error) -> Response {
    let mut resp = StatusCode::OK.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from(e.code.grpc_code()));
    // grpc-message is percent-encoded (gRPC over HTTP/2, "Responses").
    let encoded: String = e
        .message
        .bytes()
        .map(|b| {
            if b.is_ascii_graphic() && b != b'%' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    if let Ok(v) = HeaderValue::from_str(&encoded) {
        h.insert("grpc-message", v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use pubrun_core::Code;

    #[test]
    fn grpc_status_and_trailers_carry_the_core_code() {
        let e = Error::new(Code::Unauthenticated, "no token: 100%");
        let s = to_status(e.clone());
        assert_eq!(s.code(), tonic::Code::Unauthenticated);
        assert_eq!(s.message(), "no token: 100%");

        let r = grpc_response(&e);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "16");
        assert_eq!(r.headers()["grpc-message"], "no%20token:%20100%25");
    }

    #[test]
    fn an_http_error_uses_the_codes_status_unless_told_otherwise() {
        let e = Error::unimplemented("nope");
        assert_eq!(
            HttpError(e.clone()).into_response().status(),
            StatusCode::NOT_IMPLEMENTED
        );
        assert_eq!(
            with_status(StatusCode::METHOD_NOT_ALLOWED, &e).status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }
}
