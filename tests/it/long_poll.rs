//! Fetch long-poll: a fetch waiting on an empty partition answers as soon as data
//! arrives (not at its max wait), and an empty one answers at its max wait. Two cores and
//! two partitions, so one partition is owned by a core other than the fetcher's.

use crate::harness::{flags, BrokerProc};
use bytes::Bytes;
use slipstream::client::Client;
use slipstream::log::batch::build_batch;
use std::time::{Duration, Instant};

per_transport!(long_poll_fetch_answers_when_data_arrives, long_poll_fetch_answers_when_data_arrives, ustack);

fn long_poll_fetch_answers_when_data_arrives(transport: &[&str]) {
    let broker = BrokerProc::start(&flags(&["--cores", "2"], transport));
    let addr = broker.addr;
    let mut admin = Client::connect(addr, Duration::from_secs(5)).expect("connect");
    assert_eq!(admin.create_topic("lp", 2).expect("create"), 0);
    for partition in 0..2 {
        let waiter = std::thread::spawn(move || {
            let mut c = Client::connect(addr, Duration::from_secs(5)).expect("connect");
            let started = Instant::now();
            let f = c.fetch("lp", partition, 0, 1 << 20, 20_000).expect("fetch");
            (started.elapsed(), f)
        });
        std::thread::sleep(Duration::from_millis(300));
        let p = admin.produce("lp", partition, Bytes::from(build_batch(0, 1, &[b"wake up"])), -1).expect("produce");
        assert_eq!(p.error_code, 0);
        let (took, f) = waiter.join().expect("waiter");
        assert_eq!(f.error_code, 0);
        assert!(f.records.windows(7).any(|w| w == b"wake up"), "the fetch came back without the record");
        // Far below the 20 s max wait: it was answered by the arrival, not the deadline.
        assert!(took < Duration::from_secs(10), "partition {partition}: answered after {took:?}");
        println!("partition {partition}: parked fetch answered {took:?} after it was sent (300 ms before the produce)");
    }
    // Nothing arrives: the fetch answers empty at its max wait.
    let mut c = Client::connect(addr, Duration::from_secs(5)).expect("connect");
    let started = Instant::now();
    let f = c.fetch("lp", 0, 1, 1 << 20, 400).expect("fetch");
    let took = started.elapsed();
    assert_eq!(f.error_code, 0);
    assert!(f.records.is_empty());
    assert!(took >= Duration::from_millis(350), "answered before its max wait: {took:?}");
}
