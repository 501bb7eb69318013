use super::batch::{build_batch, BatchHeader};
use super::*;

fn cfg(segment: usize) -> LogConfig {
    LogConfig { segment_bytes: segment, flush: FlushPolicy::Always, ..LogConfig::default() }
}

fn offsets_in(bytes: &[u8]) -> Vec<i64> {
    batch::split_checked(bytes).unwrap().iter().map(|h| h.base_offset).collect()
}

#[test]
fn append_read_roll_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = PartitionLog::open(dir.path(), cfg(4096), Files::inline()).unwrap();
    for i in 0..100 {
        let b = build_batch(0, 1000 + i, &[format!("value-{i}").as_bytes(), b"second"]);
        let info = log.append(&b).unwrap();
        assert_eq!(info.base_offset, i * 2);
    }
    assert_eq!(log.next_offset(), 200);
    assert!(!log.sealed.is_empty(), "4 KiB segments must have rolled");
    // A read from inside a batch returns that whole batch: no record is skipped.
    let r = log.read(51, 1).unwrap();
    assert_eq!(offsets_in(&r.records), vec![50]);
    let r = log.read(0, 1 << 20).unwrap();
    assert!(!r.records.is_empty());
    // Batch i holds records stamped 1000+i and 1001+i: offset 19 is the first at 1010.
    assert_eq!(log.offset_for_time(1010), Some(19));
    drop(log);
    let (log, report) = PartitionLog::open(dir.path(), cfg(4096), Files::inline()).unwrap();
    assert_eq!(report.next_offset, 200);
    assert_eq!(offsets_in(&log.read(198, 100).unwrap().records), vec![198]);
    assert!(matches!(log.read(201, 100), Err(LogError::OffsetOutOfRange { .. })));
}

#[test]
fn torn_tail_is_cut_at_the_last_valid_batch() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = PartitionLog::open(dir.path(), cfg(1 << 16), Files::inline()).unwrap();
    for _ in 0..10 {
        log.append(&build_batch(0, 1, &[b"abcdefgh"])).unwrap();
    }
    let end = log.writer.position();
    drop(log);
    // Simulate a crash mid-write: half a batch after the valid ones.
    let path = dir.path().join(format!("{:020}.log", 0));
    let mut bytes = std::fs::read(&path).unwrap();
    let mut torn = build_batch(10, 1, &[b"torn batch payload"]);
    torn.truncate(torn.len() / 2);
    bytes[end..end + torn.len()].copy_from_slice(&torn);
    std::fs::write(&path, &bytes).unwrap();
    let (mut log, report) = PartitionLog::open(dir.path(), cfg(1 << 16), Files::inline()).unwrap();
    assert_eq!(report.next_offset, 10);
    assert!(report.truncated_bytes > 0);
    assert_eq!(log.append(&build_batch(0, 1, &[b"x"])).unwrap().base_offset, 10);
}

#[test]
fn corrupt_batch_is_rejected_and_nothing_changes() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = PartitionLog::open(dir.path(), cfg(1 << 16), Files::inline()).unwrap();
    log.append(&build_batch(0, 1, &[b"good"])).unwrap();
    let mut bad = build_batch(0, 1, &[b"bad"]);
    let n = bad.len();
    bad[n - 1] ^= 1;
    assert!(matches!(log.append(&bad), Err(LogError::Corrupt(_))));
    assert_eq!(log.next_offset(), 1);
    assert_eq!(offsets_in(&log.read(0, 1 << 20).unwrap().records), vec![0]);
}

#[test]
fn missing_sealed_index_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = PartitionLog::open(dir.path(), cfg(4096), Files::inline()).unwrap();
    for _ in 0..60 {
        log.append(&build_batch(0, 1, &[&[7u8; 100]])).unwrap();
    }
    drop(log);
    let idx = dir.path().join(format!("{:020}.index", 0));
    assert!(idx.exists());
    std::fs::remove_file(&idx).unwrap();
    let (log, _) = PartitionLog::open(dir.path(), cfg(4096), Files::inline()).unwrap();
    assert!(idx.exists());
    assert_eq!(offsets_in(&log.read(3, 1).unwrap().records), vec![3]);
}

#[test]
fn retention_by_size_moves_the_log_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(4096);
    c.retention_bytes = Some(8192);
    let (mut log, _) = PartitionLog::open(dir.path(), c, Files::inline()).unwrap();
    for _ in 0..200 {
        log.append(&build_batch(0, 1, &[&[1u8; 100]])).unwrap();
    }
    assert!(log.enforce_retention(now_ms()) > 0);
    assert!(!dir.path().join(format!("{:020}.log", 0)).exists());
    assert!(log.log_start_offset() > 0);
    assert!(matches!(log.read(0, 100), Err(LogError::OffsetOutOfRange { .. })));
    let start = log.log_start_offset();
    assert_eq!(offsets_in(&log.read(start, 1).unwrap().records), vec![start]);
}

fn idempotent_batch(pid: i64, epoch: i16, seq: i32) -> Vec<u8> {
    let mut b = build_batch(0, 1, &[b"x"]);
    b[43..51].copy_from_slice(&pid.to_be_bytes());
    b[51..53].copy_from_slice(&epoch.to_be_bytes());
    b[53..57].copy_from_slice(&seq.to_be_bytes());
    let crc = crc32c::crc32c(&b[21..]);
    b[17..21].copy_from_slice(&crc.to_be_bytes());
    BatchHeader::parse_checked(&b).unwrap();
    b
}

#[test]
fn idempotent_producer_dedups_and_rejects_gaps() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = PartitionLog::open(dir.path(), cfg(1 << 16), Files::inline()).unwrap();
    assert_eq!(log.append(&idempotent_batch(7, 0, 0)).unwrap().base_offset, 0);
    assert_eq!(log.append(&idempotent_batch(7, 0, 1)).unwrap().base_offset, 1);
    let dup = log.append(&idempotent_batch(7, 0, 1)).unwrap();
    assert!(dup.duplicate);
    assert_eq!(dup.base_offset, 1);
    assert!(matches!(log.append(&idempotent_batch(7, 0, 5)), Err(LogError::OutOfOrderSequence { .. })));
    assert_eq!(log.next_offset(), 2);
    drop(log);
    // Producer state is rebuilt from the active segment at recovery.
    let (mut log, _) = PartitionLog::open(dir.path(), cfg(1 << 16), Files::inline()).unwrap();
    assert!(log.append(&idempotent_batch(7, 0, 1)).unwrap().duplicate);
    assert_eq!(log.append(&idempotent_batch(7, 0, 2)).unwrap().base_offset, 2);
}

/// A producer whose last batch sits in a sealed segment is still known after a
/// restart: its retry is a duplicate, its next batch in sequence, a gap refused.
#[test]
fn producer_state_survives_a_roll_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = PartitionLog::open(dir.path(), cfg(4096), Files::inline()).unwrap();
    let mut seq = 0;
    while log.sealed.is_empty() {
        log.append(&idempotent_batch(9, 2, seq)).unwrap();
        seq += 1;
    }
    // Another producer fills the active segment until it rolls too: producer 9's last
    // batch is then in a sealed segment.
    let mut other = 0;
    while log.sealed.len() < 2 {
        log.append(&idempotent_batch(5, 0, other)).unwrap();
        other += 1;
    }
    drop(log);
    let (mut log, _) = PartitionLog::open(dir.path(), cfg(4096), Files::inline()).unwrap();
    let retry = log.append(&idempotent_batch(9, 2, seq - 1)).unwrap();
    assert!(retry.duplicate, "a retry of a batch in a sealed segment was appended again");
    assert!(matches!(log.append(&idempotent_batch(9, 2, seq + 3)), Err(LogError::OutOfOrderSequence { .. })));
    assert!(matches!(log.append(&idempotent_batch(9, 1, seq)), Err(LogError::ProducerFenced { .. })));
    assert!(!log.append(&idempotent_batch(9, 2, seq)).unwrap().duplicate);
    // A damaged snapshot is ignored, not fatal.
    drop(log);
    let snap = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "producers"))
        .expect("a producer snapshot was written at the roll");
    std::fs::write(&snap, b"{not json").unwrap();
    assert!(PartitionLog::open(dir.path(), cfg(4096), Files::inline()).is_ok());
}

/// The deterministic sibling of `fuzz/fuzz_targets/log_recovery.rs`: a damaged active
/// segment recovers to exactly the intact batches before the first damage.
#[test]
fn damaged_segment_recovers_to_the_intact_prefix() {
    let src = tempfile::tempdir().unwrap();
    let (mut log, _) = PartitionLog::open(src.path(), cfg(1 << 16), Files::inline()).unwrap();
    let mut ends = Vec::new(); // (end position, next offset) after each batch
    for i in 0..40 {
        log.append(&build_batch(0, i, &[format!("record {i}").as_bytes(), b"two"])).unwrap();
        ends.push((log.writer.position(), log.next_offset()));
    }
    drop(log);
    let image = std::fs::read(src.path().join(format!("{:020}.log", 0))).unwrap();
    let mut x: u64 = 0x2545f4914f6cdd1d;
    for _ in 0..200 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let at = (x % ends.last().unwrap().0 as u64) as usize;
        let mut damaged = image.clone();
        match x % 3 {
            0 => damaged[at] ^= 1 << (x % 8),
            1 => damaged[at..].iter_mut().for_each(|b| *b = 0),
            _ => {
                let n = 7.min(damaged.len() - at);
                damaged[at..at + n].fill(0xff);
            }
        }
        // Judge by the first byte that really changed (0xff over 0xff changes nothing).
        let Some(first) = damaged.iter().zip(&image).position(|(a, b)| a != b) else {
            continue;
        };
        let batch_start = ends.iter().map(|(e, _)| *e).take_while(|e| *e <= first).last().unwrap_or(0);
        let last = damaged.iter().zip(&image).rposition(|(a, b)| a != b).unwrap_or(first);
        if (12..16).contains(&(first - batch_start)) && last < batch_start + 16 {
            // Only partitionLeaderEpoch changed: it lies outside the CRC (as in Kafka),
            // so this damage is undetectable by design.
            continue;
        }
        let at = first;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(format!("{:020}.log", 0)), &damaged).unwrap();
        let (mut log, _) = PartitionLog::open(dir.path(), cfg(1 << 16), Files::inline()).unwrap();
        // Batches wholly before the damage survive; the damaged one and later do not.
        let expect = ends.iter().take_while(|(end, _)| *end <= at).last().map_or(0, |(_, next)| *next);
        assert_eq!(log.next_offset(), expect, "damage at byte {at} (batch-relative {})", at - batch_start);
        if expect > 0 {
            let r = log.read(0, 1 << 20).unwrap();
            assert_eq!(&r.records[..], &image[..r.records.len()]);
        }
        assert_eq!(log.append(&build_batch(0, 1, &[b"next"])).unwrap().base_offset, expect);
    }
}

#[test]
fn roll_takes_the_spare_made_ahead_of_time() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = PartitionLog::open(dir.path(), cfg(8192), Files::inline()).unwrap();
    while !log.prepare_spare() {
        log.append(&build_batch(0, 1, &[&[3u8; 200]])).unwrap();
    }
    assert!(!log.prepare_spare(), "asked twice");
    // Made at once (no worker thread here).
    let spare_path = dir.path().join(format!("0.{SPARE_SUFFIX}"));
    assert!(spare_path.exists());
    let before = log.sealed.len();
    while log.sealed.len() == before {
        log.append(&build_batch(0, 1, &[&[3u8; 200]])).unwrap();
    }
    assert!(!spare_path.exists(), "the spare became the new segment");
    assert!(dir.path().join(format!("{:020}.log", log.active.base_offset)).exists());
    // A spare left behind by a crash is not mistaken for a segment.
    std::fs::write(dir.path().join(format!("9.{SPARE_SUFFIX}")), [1u8; 64]).unwrap();
    let next = log.next_offset();
    drop(log);
    let (log, _) = PartitionLog::open(dir.path(), cfg(8192), Files::inline()).unwrap();
    assert_eq!(log.next_offset(), next);
    assert!(!dir.path().join(format!("9.{SPARE_SUFFIX}")).exists());
}

/// A consumer's read touches no page out of memory: it reports the span instead, and once
/// that is brought in, reads the same bytes a plain read does.
#[test]
fn resident_reads_report_evicted_pages_and_read_them_once_brought_in() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = PartitionLog::open(dir.path(), cfg(8 << 20), Files::inline()).unwrap();
    let value = vec![7u8; 16 << 10];
    for i in 0..64 {
        log.append(&build_batch(0, i, &[&value])).unwrap();
    }
    // Written with fdatasync (FlushPolicy::Always) and never read through the mapping
    // (a read would map the pages, and mapped pages are not dropped): dropping the file's
    // pages evicts them. (A file system that keeps everything in memory, e.g. tmpfs,
    // cannot: then there is nothing to check.)
    let file = std::fs::File::open(log.active.map.path()).unwrap();
    rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
    let (empty, cold) = log.read_resident(10, 64 << 10).unwrap();
    let Some(cold) = cold else {
        eprintln!("the segment's pages stayed in memory (tmpfs?): skipping the cold half");
        return;
    };
    assert!(empty.cold && empty.records.is_empty());
    let len = cold.span.to - cold.span.from;
    assert!(len >= 64 << 10, "the span covers the read: {len}");
    cold.populate().unwrap();
    let (again, cold) = log.read_resident(10, 64 << 10).unwrap();
    assert!(cold.is_none() && !again.cold);
    assert_eq!(again.records.bytes(), log.read(10, 64 << 10).unwrap().records.bytes());
}

/// A log keeping `keep` bytes in the page cache, its segments `segment_bytes`, flushed in
/// the background (so that nothing but the drops writes pages back).
fn keeping_page_cache(dir: &Path, segment_bytes: usize, keep: usize) -> PartitionLog {
    let cfg = LogConfig {
        segment_bytes,
        flush: FlushPolicy::Interval(60_000),
        page_cache_keep: Some(keep),
        ..LogConfig::default()
    };
    PartitionLog::open(dir, cfg, Files::inline()).unwrap().0
}

/// For a log whose pages far behind its newest stayed in memory: a file system that keeps
/// everything in memory (tmpfs) cannot drop anything, and nothing else may keep them.
/// The caller skips the rest.
fn only_tmpfs_keeps_dropped_pages(dir: &Path) {
    let fs = rustix::fs::statfs(dir).unwrap();
    assert_eq!(fs.f_type as i64, 0x0102_1994, "pages far behind the newest stayed in the page cache");
    eprintln!("tmpfs: nothing to drop");
}

#[test]
fn appends_drop_what_lies_further_back_than_the_page_cache_keep() {
    let dir = tempfile::tempdir().unwrap();
    let keep = 256 << 10;
    let mut log = keeping_page_cache(dir.path(), 1 << 20, keep);
    let first = build_batch(0, 0, &[&[1u8; 16 << 10]]);
    log.append(&first).unwrap();
    // A view a reader holds across the drops, read through the mapping (which maps its
    // pages: the drop must unmap them to let them go).
    let held = log.read(0, 1).unwrap().records;
    assert_eq!(held.bytes()[batch::HEADER_LEN..], first[batch::HEADER_LEN..]);
    for i in 1..200u8 {
        log.append(&build_batch(0, i as i64, &[&[i; 16 << 10]])).unwrap();
        // Consumers keeping up read every batch through the mapping.
        let _ = log.read(i as i64, 1).unwrap().records.bytes();
    }
    assert!(log.sealed.len() >= 2, "1 MiB segments rolled");
    let old = &log.sealed[0];
    if old.map.resident(0, old.size) {
        only_tmpfs_keeps_dropped_pages(dir.path());
        return;
    }
    // The newest `keep` bytes stay; what lies further back went, sealed or active.
    let pos = log.writer.position();
    assert!(log.active.map.resident(pos.saturating_sub(keep / 2), keep / 2));
    let (empty, cold) = log.read_resident(0, 1 << 20).unwrap();
    assert!(empty.cold && cold.is_some(), "a read of dropped pages is a cold read");
    // Nothing changed: the held view and every batch read back as written.
    assert_eq!(held.bytes()[batch::HEADER_LEN..], first[batch::HEADER_LEN..]);
    for i in 0..200u8 {
        let r = log.read(i as i64, 1).unwrap().records;
        let r = r.bytes();
        assert_eq!(offsets_in(r), vec![i as i64]);
        let value = if i == 0 { 1 } else { i };
        assert_eq!(r[batch::HEADER_LEN..], build_batch(0, i as i64, &[&[value; 16 << 10]])[batch::HEADER_LEN..]);
    }
}

/// A consumer catching up from far back drops what it has read as it goes (the pages it
/// brings in next are those), never what the tail keeps, and reads every batch as written.
#[test]
fn a_reader_catching_up_from_far_back_drops_what_it_has_passed() {
    let dir = tempfile::tempdir().unwrap();
    let keep = 256 << 10;
    let mut log = keeping_page_cache(dir.path(), 2 << 20, keep);
    let count = 300u16;
    let batch = |i: u16| build_batch(0, i as i64, &[&[(i % 251) as u8; 16 << 10]]);
    let batch_len = batch(0).len();
    for i in 0..count {
        log.append(&batch(i)).unwrap();
    }
    assert!(log.sealed.len() >= 2, "2 MiB segments rolled");
    if log.sealed[0].map.resident(0, log.sealed[0].size) {
        only_tmpfs_keeps_dropped_pages(dir.path());
        return;
    }
    let page = rustix::param::page_size();
    let (mut offset, mut dropped, mut last_cold) = (0i64, 0usize, None);
    while offset < count as i64 {
        let (read, cold) = log.read_resident(offset, 128 << 10).unwrap();
        if let Some(cold) = cold {
            assert!(read.cold && read.records.is_empty());
            if let Some(b) = &cold.behind {
                // One read's lag: behind the previous cold read, never up to this one.
                let prev = last_cold.as_ref().expect("a previous cold read");
                let before = (b.segment, b.to) <= *prev;
                assert!(b.from < b.to && before, "behind the previous read: {}..{} ({prev:?})", b.from, b.to);
                assert!(b.to <= log.kept_from(&b.map), "never what the tail keeps");
            }
            last_cold = Some((cold.span.segment, cold.span.from));
            cold.populate().unwrap();
            if let Some(b) = &cold.behind {
                let (first, end) = (b.from.next_multiple_of(page), b.to & !(page - 1));
                if end > first {
                    assert!(!b.map.resident(first, end - first), "dropped: {first}..{end}");
                    dropped += end - first;
                }
            }
            continue;
        }
        let r = read.records;
        let offsets = offsets_in(r.bytes());
        assert_eq!(offsets[0], offset);
        for (k, o) in offsets.iter().enumerate() {
            let at = k * batch_len;
            assert_eq!(&r.bytes()[at + batch::HEADER_LEN..at + batch_len], &batch(*o as u16)[batch::HEADER_LEN..]);
        }
        offset = offsets[offsets.len() - 1] + 1;
    }
    assert!(dropped >= 1 << 20, "what the reader passed was dropped: {dropped} bytes");
    // The oldest segment is out of memory again; the tail is still in.
    assert!(!log.sealed[0].map.resident(0, 1 << 20));
    let pos = log.writer.position();
    assert!(log.active.map.resident(pos.saturating_sub(keep / 2), keep / 2));

    // A cold read further back than the last (another reader) drops nothing.
    let file = std::fs::File::open(log.sealed[0].map.path()).unwrap();
    rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
    let (_, cold) = log.read_resident(0, 128 << 10).unwrap();
    assert!(cold.expect("cold").behind.is_none());
}
