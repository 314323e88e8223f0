//! gRPC requests that are not valid protobuf are the caller's error.

mod common;

use bytes::{Buf, BufMut};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;

/// Sends the given bytes as the request message, unparsed.
#[derive(Default)]
struct RawCodec;

struct Raw;

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let v = buf.chunk().to_vec();
        buf.advance(v.len());
        Ok(Some(v))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

/// Issue 11, item 13: this answered INTERNAL (tonic-prost's mapping).
#[tokio::test]
async fn invalid_protobuf_is_invalid_argument() {
    let server = common::start().await;
    let mut grpc = tonic::client::Grpc::new(server.channel.clone());
    for (path, bytes) in [
        // Field 1 (topic), length 5, but only one byte follows.
        (
            "/google.pubsub.v1.Publisher/Publish",
            vec![0x0a, 0x05, b'a'],
        ),
        // A varint that never ends.
        (
            "/google.pubsub.v1.Publisher/GetTopic",
            vec![0x08, 0xff, 0xff],
        ),
    ] {
        grpc.ready().await.unwrap();
        let err = grpc
            .unary::<Vec<u8>, Vec<u8>, _>(
                tonic::Request::new(bytes),
                path.parse().unwrap(),
                RawCodec,
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{path}: {err:?}");
        assert!(err.message().contains("protobuf"), "{path}: {err:?}");
    }
}
