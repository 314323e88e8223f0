//! The broker's in-memory form of a published message: one allocation.
//!
//! [`Message`] is the exchange type (96 bytes: `Bytes`, a `BTreeMap`, a
//! `String`, ...) and, behind an `Arc`, a 128-byte allocation plus the
//! payload's own. The broker holds every unacked message, so it keeps them as
//! a [`Msg`] instead: seq, publish time, payload, ordering key and attributes
//! packed into one exactly-sized `Arc<[u8]>`, shared by every subscription and
//! the retention sets. A 100-byte message without attributes costs one
//! 144-byte heap chunk. It becomes a [`Message`] again only when delivered
//! ([`Msg::to_message`], payload not copied).
//!
//! Layout: `seq` (u64 LE) · `publish_time_nanos` (i64 LE) · flag (u8):
//! 0 = payload only, the rest is the payload; 1 = key length, attributes
//! length (bytes), attribute count (u32 LE each) follow, then payload ·
//! ordering key · attributes as (u32 len, key, u32 len, value)*.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use pubrun_core::Message;
use pubrun_store::SeekTarget;

const HEAD: usize = 17;
const EXTRA: usize = 12;

#[derive(Clone)]
pub(crate) struct Msg(Arc<[u8]>);

fn u32_at(b: &[u8], at: usize) -> usize {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap()) as usize
}

fn put_u32(buf: &mut Vec<u8>, n: usize) {
    buf.extend_from_slice(&u32::try_from(n).expect("fits u32").to_le_bytes());
}

impl Msg {
    /// Packs `m` (copying its payload: the result never pins a request or
    /// log buffer).
    pub fn new(m: &Message) -> Msg {
        let extras = !m.ordering_key.is_empty() || !m.attributes.is_empty();
        let attrs_len: usize = m
            .attributes
            .iter()
            .map(|(k, v)| 8 + k.len() + v.len())
            .sum();
        let len =
            HEAD + if extras { EXTRA } else { 0 } + m.data.len() + m.ordering_key.len() + attrs_len;
        let mut buf = Vec::with_capacity(len);
        buf.extend_from_slice(&m.seq.to_le_bytes());
        buf.extend_from_slice(&m.publish_time_nanos.to_le_bytes());
        buf.push(extras as u8);
        if extras {
            put_u32(&mut buf, m.ordering_key.len());
            put_u32(&mut buf, attrs_len);
            put_u32(&mut buf, m.attributes.len());
        }
        buf.extend_from_slice(&m.data);
        buf.extend_from_slice(m.ordering_key.as_bytes());
        for (k, v) in &m.attributes {
            put_u32(&mut buf, k.len());
            buf.extend_from_slice(k.as_bytes());
            put_u32(&mut buf, v.len());
            buf.extend_from_slice(v.as_bytes());
        }
        debug_assert_eq!(buf.len(), len);
        Msg(Arc::from(buf))
    }

    pub fn seq(&self) -> u64 {
        u64::from_le_bytes(self.0[0..8].try_into().unwrap())
    }

    pub fn publish_time_nanos(&self) -> i64 {
        i64::from_le_bytes(self.0[8..16].try_into().unwrap())
    }

    /// (key length, attributes length, attribute count), or zeros.
    fn extras(&self) -> (usize, usize, usize) {
        if self.0[16] == 0 {
            return (0, 0, 0);
        }
        (
            u32_at(&self.0, HEAD),
            u32_at(&self.0, HEAD + 4),
            u32_at(&self.0, HEAD + 8),
        )
    }

    fn data_range(&self) -> Range<usize> {
        let (key, attrs, _) = self.extras();
        let start = if self.0[16] == 0 { HEAD } else { HEAD + EXTRA };
        start..self.0.len() - key - attrs
    }

    #[cfg(test)]
    pub fn data(&self) -> &[u8] {
        &self.0[self.data_range()]
    }

    /// The payload as `Bytes` sharing this message's allocation.
    pub fn data_bytes(&self) -> Bytes {
        let r = self.data_range();
        if r.is_empty() {
            return Bytes::new();
        }
        Bytes::from_owner(self.0.clone()).slice(r)
    }

    pub fn ordering_key(&self) -> &str {
        let (key, attrs, _) = self.extras();
        let end = self.0.len() - attrs;
        std::str::from_utf8(&self.0[end - key..end]).expect("packed from a String")
    }

    /// The attributes in key order.
    pub fn attrs(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        let (_, attrs, count) = self.extras();
        let mut at = self.0.len() - attrs;
        let b = &self.0[..];
        let mut field = move || {
            let n = u32_at(b, at);
            let s = std::str::from_utf8(&b[at + 4..at + 4 + n]).expect("packed from a String");
            at += 4 + n;
            s
        };
        (0..count).map(move |_| {
            let k = field();
            (k, field())
        })
    }

    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attrs().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    pub fn attributes(&self) -> BTreeMap<String, String> {
        self.attrs()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// [`Message::size`] of the message.
    pub fn size(&self) -> usize {
        let (key, attrs, count) = self.extras();
        self.data_range().len() + key + attrs - 8 * count
    }

    /// The exchange form, for a delivery (the payload is not copied).
    pub fn to_message(&self) -> Arc<Message> {
        Arc::new(Message {
            seq: self.seq(),
            data: self.data_bytes(),
            attributes: self.attributes(),
            ordering_key: self.ordering_key().to_string(),
            publish_time_nanos: self.publish_time_nanos(),
        })
    }
}

/// [`SeekTarget::keeps`] for a packed message.
pub(crate) fn keeps(target: &SeekTarget, m: &Msg) -> bool {
    target.keeps_at(m.seq(), m.publish_time_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(m: Message) {
        let p = Msg::new(&m);
        let back = p.to_message();
        assert_eq!(*back, m);
        assert_eq!(p.size(), m.size());
        assert_eq!(p.ordering_key(), m.ordering_key);
        assert_eq!(p.data(), &m.data[..]);
        for (k, v) in &m.attributes {
            assert_eq!(p.attribute(k), Some(v.as_str()));
        }
        assert_eq!(p.attribute("absent"), None);
        let t = SeekTarget::Time {
            nanos: m.publish_time_nanos,
        };
        assert_eq!(keeps(&t, &p), t.keeps(&m));
        let s = SeekTarget::Snapshot {
            from_seq: m.seq.saturating_add(1),
            seqs: vec![(m.seq, m.seq)],
        };
        assert_eq!(keeps(&s, &p), s.keeps(&m));
    }

    #[test]
    fn packs_and_unpacks() {
        roundtrip(Message {
            seq: 7,
            data: Bytes::from_static(b"hello"),
            attributes: Default::default(),
            ordering_key: String::new(),
            publish_time_nanos: -3,
        });
        roundtrip(Message {
            seq: u64::MAX,
            data: Bytes::new(),
            attributes: [
                ("a".to_string(), "".to_string()),
                ("é".into(), "xyz".into()),
            ]
            .into_iter()
            .collect(),
            ordering_key: "key".into(),
            publish_time_nanos: 1_700_000_000_000_000_000,
        });
        roundtrip(Message {
            seq: 1,
            data: Bytes::from(vec![0u8; 1000]),
            attributes: Default::default(),
            ordering_key: "k".into(),
            publish_time_nanos: 0,
        });
    }
}
