//! One error type for every layer, and the one mapping of it to the wire:
//! HTTP status, Google's status name, gRPC code and Google's JSON error body.
//! The axum and tonic adapters (`api::status`, the triggers, buckets and pools
//! routers) only wrap what is built here.

use std::fmt;

/// Google's canonical error codes, limited to those pubrun returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    PermissionDenied,
    Unauthenticated,
    ResourceExhausted,
    Unavailable,
    DeadlineExceeded,
    Unimplemented,
    Internal,
}

impl Code {
    /// The `status` string Google puts in JSON error bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::InvalidArgument => "INVALID_ARGUMENT",
            Code::NotFound => "NOT_FOUND",
            Code::AlreadyExists => "ALREADY_EXISTS",
            Code::FailedPrecondition => "FAILED_PRECONDITION",
            Code::PermissionDenied => "PERMISSION_DENIED",
            Code::Unauthenticated => "UNAUTHENTICATED",
            Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Code::Unavailable => "UNAVAILABLE",
            Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Code::Unimplemented => "UNIMPLEMENTED",
            Code::Internal => "INTERNAL",
        }
    }

    /// HTTP status Google uses for this code in its JSON APIs.
    pub fn http_status(self) -> u16 {
        match self {
            Code::InvalidArgument | Code::FailedPrecondition => 400,
            Code::Unauthenticated => 401,
            Code::PermissionDenied => 403,
            Code::NotFound => 404,
            Code::AlreadyExists => 409,
            Code::ResourceExhausted => 429,
            Code::Internal => 500,
            Code::Unimplemented => 501,
            Code::Unavailable => 503,
            Code::DeadlineExceeded => 504,
        }
    }

    /// The numeric gRPC status code (`google.rpc.Code`).
    pub fn grpc_code(self) -> i32 {
        match self {
            Code::InvalidArgument => 3,
            Code::DeadlineExceeded => 4,
            Code::NotFound => 5,
            Code::AlreadyExists => 6,
            Code::PermissionDenied => 7,
            Code::ResourceExhausted => 8,
            Code::FailedPrecondition => 9,
            Code::Unimplemented => 12,
            Code::Internal => 13,
            Code::Unavailable => 14,
            Code::Unauthenticated => 16,
        }
    }
}

/// Google's JSON error body: `{"error": {"code": 404, "message": "…",
/// "status": "NOT_FOUND"}}`. `http_status` may differ from the code's own
/// (405 with `UNIMPLEMENTED`, 413 with `INVALID_ARGUMENT`); APIs that name no
/// status (Cloud Storage, the pools admin API) pass `None`. Callers add
/// `errors` or `details` to the inner object when their API has them.
pub fn json_body(http_status: u16, code: Option<Code>, message: &str) -> serde_json::Value {
    let mut inner = serde_json::Map::new();
    inner.insert("code".into(), http_status.into());
    inner.insert("message".into(), message.into());
    if let Some(c) = code {
        inner.insert("status".into(), c.as_str().into());
    }
    serde_json::json!({ "error": inner })
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Error {
    pub code: Code,
    pub message: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `name(message)` constructors of [`Error`], one per code.
macro_rules! code_constructors {
    ($($name:ident => $code:ident),* $(,)?) => {$(
        pub fn $name(message: impl Into<String>) -> Self {
            Self::new(Code::$code, message)
        }
    )*};
}

impl Error {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Error {
            code,
            message: message.into(),
        }
    }
    code_constructors!(
        invalid => InvalidArgument,
        not_found => NotFound,
        already_exists => AlreadyExists,
        precondition => FailedPrecondition,
        unavailable => Unavailable,
        internal => Internal,
        unimplemented => Unimplemented,
    );

    pub fn http_status(&self) -> u16 {
        self.code.http_status()
    }

    /// This error as Google's JSON error body, under its own HTTP status.
    pub fn json_body(&self) -> serde_json::Value {
        json_body(self.http_status(), Some(self.code), &self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Code; 11] = [
        Code::InvalidArgument,
        Code::NotFound,
        Code::AlreadyExists,
        Code::FailedPrecondition,
        Code::PermissionDenied,
        Code::Unauthenticated,
        Code::ResourceExhausted,
        Code::Unavailable,
        Code::DeadlineExceeded,
        Code::Unimplemented,
        Code::Internal,
    ];

    #[test]
    fn every_code_maps_to_googles_http_status_name_and_grpc_number() {
        let got: Vec<(u16, &str, i32)> = ALL
            .iter()
            .map(|c| (c.http_status(), c.as_str(), c.grpc_code()))
            .collect();
        assert_eq!(
            got,
            [
                (400, "INVALID_ARGUMENT", 3),
                (404, "NOT_FOUND", 5),
                (409, "ALREADY_EXISTS", 6),
                (400, "FAILED_PRECONDITION", 9),
                (403, "PERMISSION_DENIED", 7),
                (401, "UNAUTHENTICATED", 16),
                (429, "RESOURCE_EXHAUSTED", 8),
                (503, "UNAVAILABLE", 14),
                (504, "DEADLINE_EXCEEDED", 4),
                (501, "UNIMPLEMENTED", 12),
                (500, "INTERNAL", 13),
            ]
        );
    }

    #[test]
    fn every_error_becomes_googles_json_body() {
        for code in ALL {
            let e = Error::new(code, "no \"x\" here");
            assert_eq!(
                e.json_body().to_string(),
                format!(
                    r#"{{"error":{{"code":{},"message":"no \"x\" here","status":"{}"}}}}"#,
                    code.http_status(),
                    code.as_str()
                )
            );
        }
    }

    #[test]
    fn a_body_may_carry_another_http_status_or_no_status_name() {
        assert_eq!(
            json_body(405, Some(Code::Unimplemented), "m").to_string(),
            r#"{"error":{"code":405,"message":"m","status":"UNIMPLEMENTED"}}"#
        );
        assert_eq!(
            json_body(412, None, "m").to_string(),
            r#"{"error":{"code":412,"message":"m"}}"#
        );
    }
}
