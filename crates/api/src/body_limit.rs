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
use axum::response::Response;
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
        // 413 in the body's `code` too, as Google's front end answers it.
        return crate::status::with_status(
            http::StatusCode::PAYLOAD_TOO_LARGE,
            &Error::new(
                Code::InvalidArgument,
                format!("request body too large: at most {max} bytes"),
            ),
        );
    }
    let req = req.map(|b| Body::new(http_body_util::Limited::new(b, max)));
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use axum::routing::post;
    use axum::Router;
    use tower::ServiceExt;

    #[tokio::test]
    async fn a_declared_body_over_the_limit_is_413_in_status_and_body() {
        let app = Router::new()
            .route("/v1/x", post(|| async { "read" }))
            .layer(axum::middleware::from_fn_with_state(8usize, super::limit));
        let req = http::Request::post("/v1/x")
            .header(http::header::CONTENT_LENGTH, "9")
            .body(axum::body::Body::from("123456789"))
            .unwrap();
        let resp = app.oneshot(req).await.unwrap();
        assert_eq!(resp.status(), http::StatusCode::PAYLOAD_TOO_LARGE);
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], 413, "{v}");
        assert_eq!(v["error"]["status"], "INVALID_ARGUMENT", "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("at most 8 bytes"),
            "{v}"
        );
    }
}
