use std::fmt;

/// What went wrong, as far as a caller must tell cases apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Credentials cannot be read or were refused by the token endpoint.
    Credentials,
    /// The server refused the token (401).
    Unauthenticated,
    /// The token is valid but lacks permission (403).
    PermissionDenied,
    NotFound,
    InvalidArgument,
    /// Network trouble, 429, 5xx, gRPC UNAVAILABLE: worth retrying.
    Unavailable,
    /// Data arrived but its checksum or size does not match.
    Integrity,
    Other,
}

impl ErrorKind {
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::Unavailable | ErrorKind::Integrity | ErrorKind::Other
        )
    }

    fn label(self) -> &'static str {
        match self {
            ErrorKind::Credentials => "credentials",
            ErrorKind::Unauthenticated => "UNAUTHENTICATED",
            ErrorKind::PermissionDenied => "PERMISSION_DENIED",
            ErrorKind::NotFound => "NOT_FOUND",
            ErrorKind::InvalidArgument => "INVALID_ARGUMENT",
            ErrorKind::Unavailable => "UNAVAILABLE",
            ErrorKind::Integrity => "integrity check failed",
            ErrorKind::Other => "error",
        }
    }

    pub fn from_http(status: u16) -> ErrorKind {
        match status {
            401 => ErrorKind::Unauthenticated,
            403 => ErrorKind::PermissionDenied,
            404 => ErrorKind::NotFound,
            400 | 411 | 412 | 413 => ErrorKind::InvalidArgument,
            408 | 429 | 500..=599 => ErrorKind::Unavailable,
            _ => ErrorKind::Other,
        }
    }

    pub fn from_grpc(code: tonic::Code) -> ErrorKind {
        use tonic::Code::*;
        match code {
            Unauthenticated => ErrorKind::Unauthenticated,
            PermissionDenied => ErrorKind::PermissionDenied,
            NotFound => ErrorKind::NotFound,
            InvalidArgument | FailedPrecondition => ErrorKind::InvalidArgument,
            Unavailable | DeadlineExceeded | ResourceExhausted | Aborted | Internal | Unknown
            | Cancelled => ErrorKind::Unavailable,
            _ => ErrorKind::Other,
        }
    }
}

/// An error of a connection: `connection NAME: RESOURCE: KIND: message`.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConnError {
    pub connection: String,
    pub resource: String,
    pub kind: ErrorKind,
    pub message: String,
}

impl fmt::Display for ConnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "connection {}: {}: {}: {}",
            self.connection,
            self.resource,
            self.kind.label(),
            self.message
        )
    }
}

impl ConnError {
    pub fn new(
        connection: &str,
        resource: impl Into<String>,
        kind: ErrorKind,
        message: impl Into<String>,
    ) -> ConnError {
        ConnError {
            connection: connection.to_string(),
            resource: resource.into(),
            kind,
            message: message.into(),
        }
    }

    pub fn from_status(connection: &str, resource: &str, s: &tonic::Status) -> ConnError {
        let kind = ErrorKind::from_grpc(s.code());
        let mut message = s.message().to_string();
        if message.is_empty() {
            message = format!("{:?}", s.code());
        }
        ConnError::new(connection, resource, kind, message)
    }

    /// A reqwest failure before any status (connect, TLS, timeout, body).
    pub fn from_reqwest(connection: &str, resource: &str, e: &reqwest::Error) -> ConnError {
        let kind = match e.status() {
            Some(s) => ErrorKind::from_http(s.as_u16()),
            None => ErrorKind::Unavailable,
        };
        // reqwest's own text names the URL (no token is in a URL here).
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(e);
        while let Some(s) = src {
            msg.push_str(&format!(": {s}"));
            src = s.source();
        }
        ConnError::new(connection, resource, kind, msg)
    }
}
