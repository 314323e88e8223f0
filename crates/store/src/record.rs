//! Log records and their on-disk encoding.
//!
//! A frame is `len: u32 LE | crc32c(payload): u32 LE | payload`, and a payload
//! is one kind byte followed by a protobuf body (prost derive, no .proto
//! file): compact, and fields can be added without breaking old logs.

use std::collections::BTreeMap;

use bytes::Bytes;
use prost::Message as _;
use pubrun_core::Message;

#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// Messages published to a topic in one call; seqs ascending.
    Publish {
        topic_uid: u64,
        messages: Vec<Message>,
    },
    /// Messages acknowledged on a subscription.
    Ack { sub_uid: u64, seqs: Vec<u64> },
    /// A Seek: from here on the subscription owes exactly the messages the
    /// target keeps (of those it can still get), and none other.
    Seek { sub_uid: u64, target: SeekTarget },
}

/// Where a Seek moves a subscription's ack state to.
#[derive(Debug, Clone, PartialEq)]
pub enum SeekTarget {
    /// Messages published at or after this time are unacked, earlier ones acked.
    Time { nanos: i64 },
    /// A snapshot's state: unacked are the seqs in `seqs` (inclusive ranges)
    /// and every seq from `from_seq` on.
    Snapshot {
        from_seq: u64,
        seqs: Vec<(u64, u64)>,
    },
}

impl SeekTarget {
    /// Whether a message is unacked after seeking here.
    pub fn keeps(&self, m: &Message) -> bool {
        self.keeps_at(m.seq, m.publish_time_nanos)
    }

    /// [`Self::keeps`] for the message with this seq and publish time.
    pub fn keeps_at(&self, seq: u64, publish_time_nanos: i64) -> bool {
        match self {
            SeekTarget::Time { nanos } => publish_time_nanos >= *nanos,
            SeekTarget::Snapshot { from_seq, seqs } => {
                seq >= *from_seq || crate::catalog::ranges_contain(seqs, seq)
            }
        }
    }
}

const KIND_PUBLISH: u8 = 1;
const KIND_ACK: u8 = 2;
const KIND_SEEK: u8 = 3;
pub const FRAME_HEADER: usize = 8;

#[derive(Clone, PartialEq, prost::Message)]
struct PublishBody {
    #[prost(uint64, tag = "1")]
    topic_uid: u64,
    #[prost(message, repeated, tag = "2")]
    messages: Vec<MessageBody>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct MessageBody {
    #[prost(uint64, tag = "1")]
    seq: u64,
    #[prost(bytes = "bytes", tag = "2")]
    data: Bytes,
    #[prost(btree_map = "string, string", tag = "3")]
    attributes: BTreeMap<String, String>,
    #[prost(string, tag = "4")]
    ordering_key: String,
    #[prost(int64, tag = "5")]
    publish_time_nanos: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SeekBody {
    #[prost(uint64, tag = "1")]
    sub_uid: u64,
    /// Set for a seek to a time.
    #[prost(int64, optional, tag = "2")]
    time_nanos: Option<i64>,
    #[prost(uint64, tag = "3")]
    from_seq: u64,
    /// Snapshot ranges flattened: lo, hi, lo, hi, ...
    #[prost(uint64, repeated, tag = "4")]
    ranges: Vec<u64>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct AckBody {
    #[prost(uint64, tag = "1")]
    sub_uid: u64,
    #[prost(uint64, repeated, tag = "2")]
    seqs: Vec<u64>,
}

impl Record {
    /// Highest message seq this record introduces, if it publishes.
    pub fn last_seq(&self) -> Option<u64> {
        match self {
            Record::Publish { messages, .. } => messages.last().map(|m| m.seq),
            Record::Ack { .. } | Record::Seek { .. } => None,
        }
    }

    /// Appends this record as one frame to `out`.
    pub fn encode_frame(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0u8; FRAME_HEADER]);
        match self {
            Record::Publish {
                topic_uid,
                messages,
            } => {
                out.push(KIND_PUBLISH);
                let body = PublishBody {
                    topic_uid: *topic_uid,
                    messages: messages
                        .iter()
                        .map(|m| MessageBody {
                            seq: m.seq,
                            data: m.data.clone(),
                            attributes: m.attributes.clone(),
                            ordering_key: m.ordering_key.clone(),
                            publish_time_nanos: m.publish_time_nanos,
                        })
                        .collect(),
                };
                body.encode(out).expect("Vec<u8> grows as needed");
            }
            Record::Ack { sub_uid, seqs } => {
                out.push(KIND_ACK);
                AckBody {
                    sub_uid: *sub_uid,
                    seqs: seqs.clone(),
                }
                .encode(out)
                .expect("Vec<u8> grows as needed");
            }
            Record::Seek { sub_uid, target } => {
                out.push(KIND_SEEK);
                let body = match target {
                    SeekTarget::Time { nanos } => SeekBody {
                        sub_uid: *sub_uid,
                        time_nanos: Some(*nanos),
                        ..Default::default()
                    },
                    SeekTarget::Snapshot { from_seq, seqs } => SeekBody {
                        sub_uid: *sub_uid,
                        time_nanos: None,
                        from_seq: *from_seq,
                        ranges: seqs.iter().flat_map(|(a, b)| [*a, *b]).collect(),
                    },
                };
                body.encode(out).expect("Vec<u8> grows as needed");
            }
        }
        let payload_len = (out.len() - start - FRAME_HEADER) as u32;
        let crc = crc32c::crc32c(&out[start + FRAME_HEADER..]);
        out[start..start + 4].copy_from_slice(&payload_len.to_le_bytes());
        out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decodes one payload (the bytes after a verified frame header).
    pub fn decode_payload(payload: Bytes) -> Result<Record, String> {
        let (&kind, _) = payload.split_first().ok_or("empty record")?;
        let body = payload.slice(1..);
        match kind {
            KIND_PUBLISH => {
                let b = PublishBody::decode(body).map_err(|e| e.to_string())?;
                Ok(Record::Publish {
                    topic_uid: b.topic_uid,
                    messages: b
                        .messages
                        .into_iter()
                        .map(|m| Message {
                            seq: m.seq,
                            data: m.data,
                            attributes: m.attributes,
                            ordering_key: m.ordering_key,
                            publish_time_nanos: m.publish_time_nanos,
                        })
                        .collect(),
                })
            }
            KIND_ACK => {
                let b = AckBody::decode(body).map_err(|e| e.to_string())?;
                Ok(Record::Ack {
                    sub_uid: b.sub_uid,
                    seqs: b.seqs,
                })
            }
            KIND_SEEK => {
                let b = SeekBody::decode(body).map_err(|e| e.to_string())?;
                let target = match b.time_nanos {
                    Some(nanos) => SeekTarget::Time { nanos },
                    None => {
                        if b.ranges.len() % 2 != 0 {
                            return Err("seek record with an odd number of range bounds".into());
                        }
                        SeekTarget::Snapshot {
                            from_seq: b.from_seq,
                            seqs: b.ranges.chunks(2).map(|c| (c[0], c[1])).collect(),
                        }
                    }
                };
                Ok(Record::Seek {
                    sub_uid: b.sub_uid,
                    target,
                })
            }
            other => Err(format!("unknown record kind {other}")),
        }
    }
}

/// Outcome of reading one frame from a buffer.
pub enum Frame {
    Record(Record),
    /// Not enough bytes, or a checksum mismatch: a torn write at the tail.
    Torn,
}

/// Reads the frame at `buf[pos..]`; returns it and the position after it.
pub fn read_frame(buf: &Bytes, pos: usize) -> Result<(Frame, usize), String> {
    if buf.len() - pos < FRAME_HEADER {
        return Ok((Frame::Torn, pos));
    }
    let len = u32::from_le_bytes(buf[pos..pos + 4].try_into().unwrap()) as usize;
    let crc = u32::from_le_bytes(buf[pos + 4..pos + 8].try_into().unwrap());
    let end = pos + FRAME_HEADER + len;
    // Every frame holds at least its kind byte. A zero length with a zero
    // crc (crc32c of nothing) is what a crash leaves when the file grew but
    // its data blocks were never written: a torn tail, not a record.
    if len == 0 || end > buf.len() || crc32c::crc32c(&buf[pos + FRAME_HEADER..end]) != crc {
        return Ok((Frame::Torn, pos));
    }
    let record = Record::decode_payload(buf.slice(pos + FRAME_HEADER..end))?;
    Ok((Frame::Record(record), end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_detect_tears() {
        let mut attrs = BTreeMap::new();
        attrs.insert("k".to_string(), "v".to_string());
        let recs = vec![
            Record::Publish {
                topic_uid: 3,
                messages: vec![Message {
                    seq: 7,
                    data: Bytes::from_static(b"hello"),
                    attributes: attrs,
                    ordering_key: "o".into(),
                    publish_time_nanos: 123,
                }],
            },
            Record::Ack {
                sub_uid: 4,
                seqs: vec![7, 9],
            },
        ];
        let mut buf = Vec::new();
        for r in &recs {
            r.encode_frame(&mut buf);
        }
        let bytes = Bytes::from(buf.clone());
        let (Frame::Record(a), p) = read_frame(&bytes, 0).unwrap() else {
            panic!()
        };
        let (Frame::Record(b), p2) = read_frame(&bytes, p).unwrap() else {
            panic!()
        };
        assert_eq!(vec![a, b], recs);
        assert_eq!(p2, bytes.len());
        // Any cut inside the second frame reads as torn, never as a record.
        for cut in p + 1..bytes.len() {
            let short = Bytes::copy_from_slice(&buf[..cut]);
            assert!(matches!(read_frame(&short, p).unwrap().0, Frame::Torn));
        }
        // A flipped payload bit is caught by the checksum.
        let mut bad = buf.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(matches!(
            read_frame(&Bytes::from(bad), p).unwrap().0,
            Frame::Torn
        ));
    }

    #[test]
    fn seek_records_round_trip() {
        let recs = vec![
            Record::Seek {
                sub_uid: 4,
                target: SeekTarget::Time { nanos: -5 },
            },
            Record::Seek {
                sub_uid: 4,
                target: SeekTarget::Snapshot {
                    from_seq: 30,
                    seqs: vec![(1, 3), (7, 7)],
                },
            },
        ];
        let mut buf = Vec::new();
        for r in &recs {
            r.encode_frame(&mut buf);
        }
        let bytes = Bytes::from(buf);
        let mut pos = 0;
        let mut got = Vec::new();
        while pos < bytes.len() {
            let (Frame::Record(r), next) = read_frame(&bytes, pos).unwrap() else {
                panic!("torn")
            };
            got.push(r);
            pos = next;
        }
        assert_eq!(got, recs);
    }
}
