//! RocketMQ 5 gRPC input: SendMessage and Ack requests decoded from arbitrary bytes, each
//! message through the mapping onto the remoting data model (and back through the log
//! record), and arbitrary receipt handles authenticated. None may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use slipstream::protocol::rocketmq::grpc::{convert, pb, pop};
use slipstream::protocol::rocketmq::message;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = pb::SendMessageRequest::decode(data) {
        for m in req.messages {
            if let Ok(msg) = convert::from_pb(m, None) {
                let mut record = message::to_record(&msg);
                record.offset = 7;
                let at = convert::Delivery {
                    topic: "t",
                    queue_id: 0,
                    store_host: "127.0.0.1:8081".parse().expect("address"),
                    fallback_id: String::new(),
                    receipt_handle: None,
                    attempt: 1,
                    invisible_ms: None,
                };
                let _ = convert::to_pb(&record, &at);
            }
        }
    }
    let mut p = pop::Pop::default();
    p.queue("g", "t", 0).next = Some(0);
    let real = p.lease("g", "t", 0, 0, pop::Lease { attempt: 1, visible_at: 0, renew_for: None, group: None });
    if let Ok(req) = pb::AckMessageRequest::decode(data) {
        for e in req.entries {
            let _ = p.check("g", "t", &e.receipt_handle);
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        assert!(text == real || p.check("g", "t", text).is_err());
    }
});
