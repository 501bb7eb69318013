//! Any bytes as a RocketMQ remoting stream: frames are cut, headers (JSON and binary)
//! decoded, re-encoded and decoded again to the same command; bodies are read as batch
//! sends, and any record batch inside laid out as a PULL message. Nothing panics.
#![no_main]
use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use slipstream::protocol::rocketmq::frame::{Command, Framer};
use slipstream::protocol::rocketmq::message::{decode_batch, encode_for_pull, plain_body, Stored};

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    let framer = Framer::default();
    while let Ok(Some(frame)) = framer.cut(&mut buf) {
        let Ok(cmd) = Command::decode(frame) else { continue };
        let again = Command::decode(cmd.encode().slice(4..)).expect("an encoded command decodes");
        assert_eq!(again, cmd);
        let _ = decode_batch(&cmd.body);
        let _ = plain_body(cmd.body.clone(), 1);
        let mut records = cmd.body.clone();
        if let Ok(set) = kafka_protocol::records::RecordBatchDecoder::decode(&mut records) {
            let host = "127.0.0.1:10911".parse().expect("addr");
            let at = Stored { topic: "t", queue_id: 0, store_host: host, physical_offset: 0 };
            let mut out = BytesMut::new();
            for r in &set.records {
                encode_for_pull(&mut out, r, &at, 0);
            }
        }
    }
    // The whole input as one body, too.
    let _ = decode_batch(&Bytes::copy_from_slice(data));
});
