//! One explicit body limit for every route that reads a whole body, checked
//! before the body is read: a declared `Content-Length` over the limit is
//! answered 413 at once, a chunked body is cut at the limit (the handler's
//! read fails and answers 413).
//!
//! Not here: gRPC (tonic checks each message's length prefix against its
//! own limit before reading it, and a StreamingPull carries many messages),
//! Cloud Storage uploads (streamed to disk under their own limits) and the
//! agent protocol (its router sets its own limits).

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use pubrun_core::{Code, Error};

/// Paths whose handlers stream their body under their own limits.
const STREAMING_PREFIXES: &[&str] = &["/upload/storage/v1/", "/agent/v1/"];

pub async fn limit(State(max): State<usize>, req: Request, next: Next) -> Response {
    if crate::server::is_grpc(&req)
        || STREAMING_PREFIXES
            .iter()
            .any(|p| req.uri().path().starts_with(p))
    {
        return next.run(req).await;
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        let mut resp = crate::status::HttpError(Error::new(
            Code::InvalidArgument,
            format!("request body too large: at most {max} bytes"),
        ))
        .into_response();
        *resp.status_mut() = http::StatusCode::PAYLOAD_TOO_LARGE;
        return resp;
    }
    let req = req.map(|b| Body::new(http_body_util::Limited::new(b, max)));
    next.run(req).await
}
