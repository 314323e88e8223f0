//! `[[webhook]]` tables: `POST /hooks/NAME` publishes to a topic.

use serde::Deserialize;
use toml::Spanned;

use super::topic::Topics;
use super::{Ctx, ManifestError, Unique};

/// A `[[webhook]]` table: `POST /hooks/NAME` publishes to `topic`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct WebhookDecl {
    pub name: String,
    /// Full topic name.
    pub topic: String,
    pub secret_env: Option<String>,
    pub bearer_secret_env: Option<String>,
    pub headers_as_attributes: Vec<String>,
    pub query_as_attributes: bool,
    pub max_body_bytes: Option<u64>,
}

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

pub(super) fn parse_webhooks(
    cx: &Ctx<'_>,
    topics: &Topics<'_>,
    raw: &[RawWebhook],
) -> Result<Vec<WebhookDecl>, ManifestError> {
    let mut seen = Unique::new("webhook");
    let mut out = Vec::new();
    for w in raw {
        seen.insert(cx, &w.name, w.name.get_ref().clone())?;
        out.push(WebhookDecl {
            name: w.name.get_ref().clone(),
            topic: topics.resolve(cx, &w.topic)?.to_string(),
            secret_env: w.secret_env.clone(),
            bearer_secret_env: w.bearer_secret_env.clone(),
            headers_as_attributes: w.headers_as_attributes.clone(),
            query_as_attributes: w.query_as_attributes,
            max_body_bytes: w.max_body_bytes,
        });
    }
    Ok(out)
}
