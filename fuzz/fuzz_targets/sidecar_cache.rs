//! The sidecar's tail cache fed arbitrary fetch answers (records, watermarks, epochs,
//! errors) and asked arbitrary fetches: never a panic, never a served range at or past
//! the watermark, and what it serves is a run of whole batches that were given to it.
#![no_main]
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use slipstream::sidecar::cache::{Answer, CacheLimits, Position, Serve, TailCache};

fuzz_target!(|data: &[u8]| {
    let mut c = TailCache::new(CacheLimits { total_bytes: 1 << 16, partition_bytes: 1 << 14, block_bytes: 1 << 12 });
    let mut given: Vec<Bytes> = Vec::new();
    let mut rest = data;
    while rest.len() >= 12 {
        let (head, tail) = rest.split_at(12);
        let take = (usize::from(head[0]) * 4).min(tail.len());
        let (records, next) = tail.split_at(take);
        rest = next;
        let partition = i32::from(head[1] % 3);
        let hw = i64::from(head[2]);
        let records = Bytes::copy_from_slice(records);
        match head[3] % 8 {
            0 => c.drop_topic("t"),
            1 => c.observe_topic("t", Some([head[4]; 16]), &[(partition, i32::from(head[5] % 4))]),
            _ => {
                c.fill(
                    "t",
                    partition,
                    &Answer {
                        error_code: i16::from(head[6] % 8 == 0),
                        hw,
                        lso: i64::from(head[7]).min(hw),
                        log_start: i64::from(head[8] % 16),
                        leader_epoch: (head[9] % 4 != 0).then_some(i32::from(head[9] % 3)),
                        diverging: head[10] % 16 == 0,
                        records: Some(&records),
                    },
                );
                given.push(records);
            }
        }
        let at = Position {
            offset: i64::from(head[11]),
            last_fetched_epoch: i32::from(head[5] % 3) - 1,
            committed: head[4] % 2 == 0,
        };
        if let Serve::Hit { records, marks } = c.serve("t", partition, at, usize::from(head[0]) * 64) {
            assert!(!records.is_empty());
            assert!(at.offset < marks.hw, "served at or past the watermark");
            // A served run lies within some answer the cache was given.
            assert!(given.iter().any(|g| g.windows(records.len()).any(|w| w == &records[..])));
        }
    }
});
