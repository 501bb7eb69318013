//! Several listeners in one `serve` process, each bound to a protocol and with its own
//! advertised address, served by the same cores from the same log.

use crate::harness::{flags, free_port, BrokerProc};
use bytes::Bytes;
use kafka_protocol::messages::{FindCoordinatorRequest, MetadataRequest};
use kafka_protocol::protocol::StrBytes;
use slipstream::client::Client;
use slipstream::log::batch::build_batch;
use std::time::Duration;

per_transport!(two_kafka_listeners_each_advertise_their_own_address, two_kafka_listeners);

fn two_kafka_listeners(transport: &[&str]) {
    let second = format!("127.0.0.1:{}", free_port());
    let spec = format!("kafka://{second},advertise=kafka-b.example:19093");
    let base = ["--listen", spec.as_str(), "--advertised-listener", "kafka-a.example:19092", "--cores", "2"];
    let broker = BrokerProc::start(&flags(&base, transport));
    let second = second.parse().expect("addr");
    let connect = |addr| Client::connect(addr, Duration::from_secs(5)).expect("connect");
    for (addr, host, port) in [(broker.addr, "kafka-a.example", 19092), (second, "kafka-b.example", 19093)] {
        let mut c = connect(addr);
        let m = c.call(&MetadataRequest::default(), 12).expect("metadata");
        assert_eq!(m.brokers.len(), 1);
        assert_eq!((m.brokers[0].host.as_str(), m.brokers[0].port), (host, port), "metadata through {addr}");
        let mut find = FindCoordinatorRequest::default();
        find.key = StrBytes::from_static_str("group");
        let f = c.call(&find, 3).expect("find coordinator");
        assert_eq!((f.error_code, f.host.as_str(), f.port), (0, host, port), "coordinator through {addr}");
    }
    // One log behind both: produced through one listener, fetched through the other.
    let mut a = connect(broker.addr);
    assert_eq!(a.create_topic("shared", 2).expect("create"), 0);
    for p in 0..2 {
        let produced = a.produce("shared", p, Bytes::from(build_batch(0, 0, &[b"through-a"])), -1).expect("produce");
        assert_eq!((produced.error_code, produced.base_offset), (0, 0));
    }
    let mut b = connect(second);
    for p in 0..2 {
        let f = b.fetch("shared", p, 0, 1 << 20, 0).expect("fetch");
        assert_eq!(f.error_code, 0);
        assert!(f.records.windows(9).any(|w| w == b"through-a"), "partition {p} not read back through b");
    }
}
