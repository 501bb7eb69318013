//! Any bytes as the active segment of a partition: recovery must keep a valid prefix,
//! leave a log that reads back what it claims and accepts new appends at the next offset.
#![no_main]
use libfuzzer_sys::fuzz_target;
use slipstream::log::batch::{build_batch, split_checked};
use slipstream::log::{Files, FlushPolicy, LogConfig, PartitionLog};

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = LogConfig { segment_bytes: 1 << 16, flush: FlushPolicy::Bytes(1 << 30), ..LogConfig::default() };
    let mut seg = data.to_vec();
    seg.truncate(cfg.segment_bytes);
    std::fs::write(dir.path().join(format!("{:020}.log", 0)), &seg).expect("write segment");
    let (mut log, report) = PartitionLog::open(dir.path(), cfg, Files::inline()).expect("recovery must not fail on bad bytes");
    assert_eq!(report.next_offset, log.next_offset());
    if log.next_offset() > 0 {
        let r = log.read(0, 1 << 20).expect("read back the recovered prefix");
        let batches = split_checked(&r.records).expect("recovered batches are valid");
        assert_eq!(batches.first().map(|b| b.base_offset), Some(0));
    }
    let next = log.next_offset();
    let info = log.append(&build_batch(0, 1, &[b"after recovery"])).expect("append after recovery");
    assert_eq!(info.base_offset, next);
});
