//! The Pub/Sub REST v1 mapping (`/v1/projects/...`), transcoded onto [`PubSub`].

use axum::Router;

use crate::grpc::PubSub;

/// Routes for `/v1/projects/{project}/topics/...` and `/subscriptions/...`.
pub fn router(_pubsub: PubSub) -> Router {
    Router::new()
}
