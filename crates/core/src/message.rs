//! Messages as publishers send them and as the broker stores them.

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::limits::*;

/// A message as a publisher hands it in, before it has an id.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OutgoingMessage {
    pub data: Bytes,
    pub attributes: BTreeMap<String, String>,
    pub ordering_key: String,
}

impl OutgoingMessage {
    /// Bytes this message counts against the request and message limits.
    pub fn size(&self) -> usize {
        counted_size(&self.data, &self.ordering_key, &self.attributes)
    }

    /// Checks the per-message limits Google enforces on Publish.
    pub fn validate(&self) -> Result<()> {
        if self.data.is_empty() && self.attributes.is_empty() {
            return Err(Error::invalid(
                "a message must have non-empty data or at least one attribute",
            ));
        }
        at_most(self.size(), MAX_MESSAGE_BYTES, |n| {
            format!("message is {n} bytes; the limit is {MAX_MESSAGE_BYTES} bytes (10 MB)")
        })?;
        at_most(self.attributes.len(), MAX_ATTRIBUTES, |n| {
            format!("message has {n} attributes; the limit is {MAX_ATTRIBUTES}")
        })?;
        for (k, v) in &self.attributes {
            validate_attribute(k, v)?;
        }
        at_most(self.ordering_key.len(), MAX_ORDERING_KEY_BYTES, |n| {
            format!("ordering key is {n} bytes; the limit is {MAX_ORDERING_KEY_BYTES}")
        })?;
        Ok(())
    }
}

/// Checks one attribute of a published message.
fn validate_attribute(k: &str, v: &str) -> Result<()> {
    if k.is_empty() {
        return Err(Error::invalid("attribute keys must not be empty"));
    }
    at_most(k.len(), MAX_ATTRIBUTE_KEY_BYTES, |n| {
        format!("attribute key is {n} bytes; the limit is {MAX_ATTRIBUTE_KEY_BYTES}")
    })?;
    // `googclient_` is the client libraries' own (trace context,
    // ordering key), which Pub/Sub accepts from them.
    if k.starts_with("goog") && !k.starts_with("googclient_") {
        return Err(Error::invalid(format!(
            "attribute key \"{k}\" must not start with \"goog\" (reserved)"
        )));
    }
    at_most(v.len(), MAX_ATTRIBUTE_VALUE_BYTES, |n| {
        format!("value of attribute \"{k}\" is {n} bytes; the limit is {MAX_ATTRIBUTE_VALUE_BYTES}")
    })?;
    Ok(())
}

/// `Ok` when `n` is within `max`; otherwise INVALID_ARGUMENT with `message(n)`.
fn at_most(n: usize, max: usize, message: impl FnOnce(usize) -> String) -> Result<()> {
    if n > max {
        return Err(Error::invalid(message(n)));
    }
    Ok(())
}

/// Validates a whole Publish request: message count, total size, each message.
pub fn validate_publish(messages: &[OutgoingMessage]) -> Result<()> {
    if messages.is_empty() {
        return Err(Error::invalid(
            "publish request must contain at least one message",
        ));
    }
    at_most(messages.len(), MAX_MESSAGES_PER_PUBLISH, |n| {
        format!("publish request has {n} messages; the limit is {MAX_MESSAGES_PER_PUBLISH}")
    })?;
    let total: usize = messages.iter().map(OutgoingMessage::size).sum();
    at_most(total, MAX_PUBLISH_REQUEST_BYTES, |n| {
        format!(
            "publish request is {n} bytes; the limit is {MAX_PUBLISH_REQUEST_BYTES} bytes (10 MB)"
        )
    })?;
    for (i, m) in messages.iter().enumerate() {
        m.validate()
            .map_err(|e| Error::invalid(format!("message {i}: {}", e.message)))?;
    }
    Ok(())
}

/// What a message counts against Google's size limits: data, ordering key,
/// and every attribute's key and value.
fn counted_size(data: &[u8], ordering_key: &str, attributes: &BTreeMap<String, String>) -> usize {
    let attributes: usize = attributes.iter().map(|(k, v)| k.len() + v.len()).sum();
    data.len() + ordering_key.len() + attributes
}

/// A stored message. `seq` is its position in the broker's log and, printed
/// in decimal, its Pub/Sub message id.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub seq: u64,
    pub data: Bytes,
    pub attributes: BTreeMap<String, String>,
    pub ordering_key: String,
    /// Nanoseconds since the Unix epoch.
    pub publish_time_nanos: i64,
}

impl Message {
    pub fn id(&self) -> String {
        self.seq.to_string()
    }

    pub fn size(&self) -> usize {
        counted_size(&self.data, &self.ordering_key, &self.attributes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(data: &[u8]) -> OutgoingMessage {
        OutgoingMessage {
            data: Bytes::copy_from_slice(data),
            ..Default::default()
        }
    }

    #[test]
    fn empty_message_is_rejected() {
        assert!(msg(b"").validate().is_err());
        let mut m = msg(b"");
        m.attributes.insert("k".into(), "v".into());
        assert!(m.validate().is_ok());
    }

    #[test]
    fn limits_are_enforced() {
        assert!(msg(&vec![0; MAX_MESSAGE_BYTES]).validate().is_ok());
        assert!(msg(&vec![0; MAX_MESSAGE_BYTES + 1]).validate().is_err());
        let mut m = msg(b"x");
        for i in 0..=MAX_ATTRIBUTES {
            m.attributes.insert(format!("k{i}"), "v".into());
        }
        assert!(m.validate().unwrap_err().message.contains("attributes"));
        let mut m = msg(b"x");
        m.attributes.insert("k".repeat(257), "v".into());
        assert!(m.validate().is_err());
        let mut m = msg(b"x");
        m.attributes.insert("k".into(), "v".repeat(1025));
        assert!(m.validate().is_err());
        let mut m = msg(b"x");
        m.attributes.insert("googkey".into(), "v".into());
        assert!(m.validate().is_err());
        let mut m = msg(b"x");
        m.attributes
            .insert("googclient_traceparent".into(), "00-…".into());
        assert!(m.validate().is_ok());
        assert!(validate_publish(&vec![msg(b"x"); 1001]).is_err());
        assert!(validate_publish(&vec![msg(b"x"); 1000]).is_ok());
        assert!(validate_publish(&[]).is_err());
        let big = msg(&vec![0; 6 * 1024 * 1024]);
        assert!(validate_publish(&[big.clone(), big])
            .unwrap_err()
            .message
            .contains("publish request"));
    }
}
