//! Opening a partition's log: every segment is scanned from the start and cut at the
//! first batch that is torn, fails its CRC or breaks offset contiguity; the sealed
//! segments' indexes are read back (or rebuilt when missing or damaged).

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use super::batch::{BatchHeader, LOG_OVERHEAD};
use super::mmap::{SegmentFile, SegmentWriter};
use super::{io_err, Files, LogConfig, LogError, PartitionLog, RecoveryReport, Segment, SPARE_SUFFIX};

impl PartitionLog {
    /// Opens (recovering) or creates the log in `dir`; background file work goes to
    /// `files`.
    pub fn open(dir: &Path, cfg: LogConfig, files: Files) -> Result<(PartitionLog, RecoveryReport), LogError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        for e in fs::read_dir(dir).map_err(io_err(dir))?.flatten() {
            if e.path().extension().is_some_and(|x| x == SPARE_SUFFIX) {
                // Made ahead of a roll that never happened: not part of the log.
                let _ = fs::remove_file(e.path());
            }
        }
        let mut bases: Vec<i64> = fs::read_dir(dir)
            .map_err(io_err(dir))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_suffix(".log")?.parse::<i64>().ok()
            })
            .collect();
        bases.sort_unstable();
        let mut report = RecoveryReport::default();
        if bases.is_empty() {
            bases.push(0);
            let path = Segment::file_stem(dir, 0).with_extension("log");
            SegmentFile::create(&path, cfg.segment_bytes).map_err(io_err(&path))?;
        }
        let mut sealed = Vec::new();
        let last = bases.len() - 1;
        let mut expected: Option<i64> = None;
        let mut active = None;
        for (i, base) in bases.iter().copied().enumerate() {
            let path = Segment::file_stem(dir, base).with_extension("log");
            let file = SegmentFile::open(&path, cfg.segment_bytes).map_err(io_err(&path))?;
            let is_active = i == last;
            let (seg, writer) = Self::recover_segment(dir, base, file, is_active, &cfg, &mut report)?;
            if let Some(e) = expected {
                if e != base {
                    log::warn!("{}: segment {base} does not follow offset {e}", dir.display());
                }
            }
            expected = Some(seg.next_offset);
            report.segments += 1;
            if is_active {
                active = Some((seg, writer));
            } else {
                sealed.push(seg);
            }
        }
        let Some((active, writer)) = active else {
            return Err(LogError::Empty);
        };
        let log_start_offset = sealed.first().map_or(active.base_offset, |s: &Segment| s.base_offset);
        let flushed_to = writer.position();
        let mut log = PartitionLog {
            dir: dir.to_path_buf(),
            cfg,
            sealed,
            active,
            writer,
            log_start_offset,
            flushed_to,
            producers: HashMap::new(),
            spare: None,
            spare_failed: false,
            files,
            appended: 0,
            cached_from: 0,
            trail: Default::default(),
            cold_last: None,
            cold_before: None,
        };
        log.rebuild_producer_state();
        report.next_offset = log.next_offset();
        Ok((log, report))
    }

    fn recover_segment(
        dir: &Path,
        base: i64,
        mut file: SegmentFile,
        is_active: bool,
        cfg: &LogConfig,
        report: &mut RecoveryReport,
    ) -> Result<(Segment, SegmentWriter), LogError> {
        let path = Segment::file_stem(dir, base).with_extension("log");
        let mut pos = 0usize;
        let mut next = base;
        let mut stop_reason = None;
        let mut found: Vec<(usize, BatchHeader)> = Vec::new();
        {
            let data = file.contents();
            while pos < data.len() {
                let rest = &data[pos..];
                // The active segment may hold a torn tail: check every CRC there. Sealed
                // segments were complete when sealed; a header walk finds their end.
                let parsed = if is_active { BatchHeader::parse_checked(rest) } else { BatchHeader::parse(rest) };
                let h = match parsed {
                    Ok(h) => h,
                    Err(e) => {
                        if rest.len() >= LOG_OVERHEAD && rest[..LOG_OVERHEAD].iter().any(|b| *b != 0) {
                            stop_reason = Some(e.to_string());
                        }
                        break;
                    }
                };
                if h.base_offset != next {
                    stop_reason =
                        Some(format!("batch at {pos} has offset {} where {next} was expected", h.base_offset));
                    break;
                }
                found.push((pos, h));
                report.batches_scanned += 1;
                pos += h.total_len();
                next = h.last_offset() + 1;
            }
        }
        if is_active {
            if let Some(reason) = &stop_reason {
                log::warn!("{}: truncating torn tail at byte {pos}: {reason}", path.display());
                report.truncated_bytes += file.capacity() - pos;
            }
            // Zero the tail even when it looks empty: a stale batch past a crash point
            // must never be found by a later scan. Then allocate it for appends; on a full
            // disk the segment is served read-only and the next append rolls (and fails,
            // answered as a storage error, until space comes back).
            file = file.truncate_tail(pos).map_err(io_err(&path))?;
            file.try_allocate();
        } else if let Some(reason) = &stop_reason {
            log::warn!("{}: sealed segment ends early at byte {pos}: {reason}", path.display());
        }
        let (map, writer) = file.into_shared(pos);
        let mut seg = Segment::empty(base, map);
        for (at, h) in &found {
            seg.note_batch(h, *at, cfg.index_interval_bytes);
        }
        if !is_active {
            let stem = Segment::file_stem(dir, base);
            if !stem.with_extension("index").exists() {
                // In memory it is rebuilt already; failing to write it (a full disk) only
                // means rebuilding it again at the next start.
                match seg.write_indexes(dir) {
                    Ok(()) => log::info!("{}: rebuilt missing index", path.display()),
                    Err(e) => log::warn!("{}: rebuilt missing index, not written: {e}", path.display()),
                }
            }
        }
        Ok((seg, writer))
    }
}
