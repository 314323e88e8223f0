//! Quotas and limits as Google documents them for Cloud Pub/Sub.

pub const MAX_MESSAGE_BYTES: usize = 10 * 1024 * 1024;
pub const MAX_PUBLISH_REQUEST_BYTES: usize = 10 * 1024 * 1024;
pub const MAX_MESSAGES_PER_PUBLISH: usize = 1000;
pub const MAX_ATTRIBUTES: usize = 100;
pub const MAX_ATTRIBUTE_KEY_BYTES: usize = 256;
pub const MAX_ATTRIBUTE_VALUE_BYTES: usize = 1024;
pub const MAX_ORDERING_KEY_BYTES: usize = 1024;

pub const MIN_ACK_DEADLINE_SECS: i32 = 10;
pub const MAX_ACK_DEADLINE_SECS: i32 = 600;
pub const DEFAULT_ACK_DEADLINE_SECS: i32 = 10;

/// Upper bound of `max_messages` honoured by one Pull call.
pub const MAX_PULL_MESSAGES: usize = 1000;

/// Labels: at most 64, keys 1..=63 chars and values 0..=63 chars of `[a-z0-9_-]`.
pub const MAX_LABELS: usize = 64;

/// Page size used when a List request leaves it unset, and its ceiling.
pub const DEFAULT_PAGE_SIZE: usize = 100;
pub const MAX_PAGE_SIZE: usize = 1000;
