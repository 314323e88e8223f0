//! `[[webhook]]` tables: `POST /hooks/NAME` publishes to a topic.

use serde::Deserialize;
use toml::Spanned;

use super::topic::Topics;
use super::{Ctx, ManifestError};
use crate::trigger::{WebhookSpec, DEFAULT_MAX_BODY_BYTES};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWebhook {
    name: Spanned<String>,
    topic: Spanned<String>,
    secret_env: Option<String>,
    bearer_secret_env: Option<String>,
    #[serde(default)]
    headers_as_attributes: Vec<String>,
    #[serde(default)]
    query_as_attributes: bool,
    max_body_bytes: Option<u64>,
}

/// A `[[webhook]]` table becomes the spec the server serves at
/// `POST /hooks/NAME`; the triggers crate validates it when applied.
impl RawWebhook {
    pub(super) fn decl(
        &self,
        cx: &Ctx<'_>,
        topics: &Topics<'_>,
    ) -> Result<WebhookSpec, ManifestError> {
        Ok(WebhookSpec {
            name: self.name.get_ref().clone(),
            topic: topics.resolve(cx, &self.topic)?.to_string(),
            secret_env: self.secret_env.clone(),
            bearer_secret_env: self.bearer_secret_env.clone(),
            headers_as_attributes: self.headers_as_attributes.clone(),
            query_as_attributes: self.query_as_attributes,
            max_body_bytes: self.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES),
        })
    }
}

named!(RawWebhook => "webhook");
