//! The commit log: one [`PartitionLog`] per partition, made of memory-mapped segments.
//!
//! Layout on disk, per partition directory: `<base offset, 20 digits>.log` (preallocated
//! to the segment size and mapped), and for sealed segments `.index` (sparse: relative
//! offset → file position, every `index_interval_bytes`) and `.timeindex` (max timestamp
//! so far → relative offset). The active segment's indexes live in memory and are
//! rebuilt by the recovery scan, which has to read the active segment anyway; they are
//! written when the segment is sealed. A missing or damaged sealed index is rebuilt.
//!
//! Batches are stored exactly as produced (compressed ones untouched): the broker checks
//! the CRC-32C, patches the base offset in place and, for LogAppendTime topics, the
//! timestamp. That copy into the mapping is the only one a produced byte ever sees.
//!
//! # Durability (the flush policy)
//! Appends land in the page cache through the mapping, so an acknowledged batch survives
//! a *process* crash (SIGKILL, panic) under every policy. Surviving *power loss* needs the
//! pages on disk: `always` msyncs before acknowledging (survives power loss), `bytes:N`
//! msyncs once N bytes are unflushed (loses at most N bytes), `interval:MS` msyncs from a
//! background thread (loses at most MS of data).
//!
//! # Invariants
//! - Offsets are contiguous: every batch's base offset is the previous batch's last
//!   offset + 1; recovery cuts the log at the first batch that breaks this.
//! - Readers see only published bytes (see [`mmap`]); a batch is published after it is
//!   complete, patched and (under `always`) flushed.

pub mod batch;
pub mod files;
pub mod mmap;

use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use thiserror::Error;

use crate::buffer::Chunk;
use crate::metrics;
use batch::{BatchError, BatchHeader, LOG_OVERHEAD};
pub use files::{FileWorker, Files, Pending};
use mmap::{SegmentFile, SegmentMap, SegmentWriter};

#[derive(Debug, Error)]
pub enum LogError {
    #[error("corrupt batch: {0}")]
    Corrupt(#[from] BatchError),
    #[error("empty record set")]
    Empty,
    #[error("batch of {size} bytes exceeds the segment size {segment}")]
    TooLarge { size: usize, segment: usize },
    #[error("offset {offset} out of range [{start}, {end}]")]
    OffsetOutOfRange { offset: i64, start: i64, end: i64 },
    #[error("producer {producer_id}: epoch {epoch} is older than {current}")]
    ProducerFenced { producer_id: i64, epoch: i16, current: i16 },
    #[error("producer {producer_id}: sequence {got} where {expected} was expected")]
    OutOfOrderSequence { producer_id: i64, expected: i32, got: i32 },
    #[error("I/O error on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LogError + '_ {
    move |source| LogError::Io { path: path.to_path_buf(), source }
}

/// When appended bytes are forced to stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FlushPolicy {
    /// msync before every acknowledgement.
    Always,
    /// msync from a background thread every so many milliseconds.
    Interval(u64),
    /// msync on the append path once this many bytes are unflushed.
    Bytes(u64),
}

impl std::str::FromStr for FlushPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, arg) = s.split_once(':').unwrap_or((s, ""));
        let num = |d: u64| -> Result<u64, String> {
            if arg.is_empty() {
                Ok(d)
            } else {
                arg.parse().map_err(|_| format!("bad number in flush policy '{s}'"))
            }
        };
        match kind {
            "always" => Ok(FlushPolicy::Always),
            "interval" => Ok(FlushPolicy::Interval(num(1000)?)),
            "bytes" => Ok(FlushPolicy::Bytes(num(1 << 20)?)),
            _ => Err(format!("unknown flush policy '{s}': use always, interval[:MS] or bytes[:N]")),
        }
    }
}

/// Per-partition log settings.
#[derive(Debug, Clone)]
pub struct LogConfig {
    pub segment_bytes: usize,
    pub index_interval_bytes: usize,
    pub retention_bytes: Option<u64>,
    pub retention_ms: Option<i64>,
    pub flush: FlushPolicy,
    pub log_append_time: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes: 128 << 20,
            index_interval_bytes: 4096,
            retention_bytes: None,
            retention_ms: Some(7 * 24 * 3600 * 1000),
            flush: FlushPolicy::Interval(1000),
            log_append_time: false,
        }
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// A sealed or active segment's metadata; the bytes are in `map`.
struct Segment {
    base_offset: i64,
    map: Arc<SegmentMap>,
    /// Valid bytes.
    size: usize,
    /// Exclusive end offset.
    next_offset: i64,
    max_timestamp: i64,
    /// (relative offset, position), ascending.
    index: Vec<(u32, u32)>,
    /// (max timestamp so far, relative offset), both ascending.
    time_index: Vec<(i64, u32)>,
    bytes_since_index: usize,
}

impl Segment {
    fn empty(base_offset: i64, map: Arc<SegmentMap>) -> Segment {
        Segment {
            base_offset,
            map,
            size: 0,
            next_offset: base_offset,
            max_timestamp: -1,
            index: Vec::new(),
            time_index: Vec::new(),
            bytes_since_index: 0,
        }
    }

    fn file_stem(dir: &Path, base_offset: i64) -> PathBuf {
        dir.join(format!("{base_offset:020}"))
    }

    /// Records a batch at `pos` in the in-memory indexes.
    fn note_batch(&mut self, h: &BatchHeader, pos: usize, interval: usize) {
        let rel = (h.base_offset - self.base_offset) as u32;
        if self.index.is_empty() || self.bytes_since_index >= interval {
            self.index.push((rel, pos as u32));
            self.bytes_since_index = 0;
        }
        self.bytes_since_index += h.total_len();
        if h.max_timestamp > self.max_timestamp {
            self.max_timestamp = h.max_timestamp;
            self.time_index.push((h.max_timestamp, rel));
        }
        self.size = pos + h.total_len();
        self.next_offset = h.last_offset() + 1;
    }

    /// Writes the sparse indexes next to the segment (when sealing it).
    fn write_indexes(&self, dir: &Path) -> io::Result<()> {
        let stem = Self::file_stem(dir, self.base_offset);
        let (idx, tidx) = self.index_files();
        fs::write(stem.with_extension("index"), idx)?;
        fs::write(stem.with_extension("timeindex"), tidx)
    }

    /// The bytes of the `.index` and `.timeindex` files.
    fn index_files(&self) -> (Vec<u8>, Vec<u8>) {
        let mut idx = Vec::with_capacity(self.index.len() * 8 + 16);
        for (rel, pos) in &self.index {
            idx.extend_from_slice(&rel.to_be_bytes());
            idx.extend_from_slice(&pos.to_be_bytes());
        }
        let mut tidx = Vec::with_capacity(self.time_index.len() * 12);
        for (ts, rel) in &self.time_index {
            tidx.extend_from_slice(&ts.to_be_bytes());
            tidx.extend_from_slice(&rel.to_be_bytes());
        }
        (idx, tidx)
    }

    /// Position of the batch containing `offset` (which must be in this segment).
    fn locate(&self, offset: i64) -> Option<(usize, BatchHeader)> {
        let rel = (offset - self.base_offset) as u32;
        let i = self.index.partition_point(|(r, _)| *r <= rel);
        let mut pos = if i == 0 { 0 } else { self.index[i - 1].1 as usize };
        let view = self.map.slice(0, self.size)?;
        while pos < self.size {
            let h = BatchHeader::parse(&view[pos..]).ok()?;
            if h.last_offset() >= offset {
                return Some((pos, h));
            }
            pos += h.total_len();
        }
        None
    }
}

/// Idempotent-producer state of one producer id on one partition.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct ProducerState {
    epoch: i16,
    last_sequence: i32,
    /// (first sequence, last sequence, base offset) of the last few batches, for dedup.
    recent: VecDeque<(i32, i32, i64)>,
}

/// Result of a successful append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendInfo {
    pub base_offset: i64,
    pub last_offset: i64,
    /// LogAppendTime stamped on the batch, or -1.
    pub log_append_time: i64,
    /// The batch was a retry of one already in the log: nothing was written.
    pub duplicate: bool,
}

/// A zero-copy read: whole batches from one segment.
#[derive(Debug, Clone)]
pub struct ReadResult {
    /// Whole batches, pointing into the segment's mapping (which the chunk names).
    pub records: Chunk,
    pub high_watermark: i64,
    pub log_start_offset: i64,
}

/// Slow file-system work the log hands off, so that rolls, retention and background
/// flushes never make an append wait (the owner core ships it to an I/O thread).
pub enum IoWork {
    /// msync a range of a segment.
    Flush { map: Arc<SegmentMap>, from: usize, to: usize },
    /// Write a whole small file (a sealed segment's index).
    Write { path: PathBuf, bytes: Vec<u8> },
    /// Unlink files (segments removed by retention).
    Remove(Vec<PathBuf>),
}

impl IoWork {
    pub fn run(self) -> io::Result<()> {
        match self {
            IoWork::Flush { map, from, to } => map.flush_range(from, to),
            IoWork::Write { path, bytes } => fs::write(path, bytes),
            IoWork::Remove(paths) => {
                for p in paths {
                    match fs::remove_file(&p) {
                        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                        _ => {}
                    }
                }
                Ok(())
            }
        }
    }
}

/// Extension of a segment file made ahead of time, not yet part of the log.
const SPARE_SUFFIX: &str = "spare";

/// One partition's log, owned by one core's shard (no lock); see the module docs.
pub struct PartitionLog {
    dir: PathBuf,
    cfg: LogConfig,
    sealed: Vec<Segment>,
    active: Segment,
    writer: SegmentWriter,
    log_start_offset: i64,
    flushed_to: usize,
    producers: HashMap<i64, ProducerState>,
    /// The next segment's file, being made ahead of time by the file worker (see
    /// [`Self::prepare_spare`]).
    spare: Option<Pending<io::Result<SegmentFile>>>,
    /// Where background file work goes.
    files: Files,
}

/// What recovery found, for logging and the crash test.
#[derive(Debug, Clone, Copy, Default)]
pub struct RecoveryReport {
    pub segments: usize,
    pub batches_scanned: usize,
    pub truncated_bytes: usize,
    pub next_offset: i64,
}

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
            files,
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
            // must never be found by a later scan.
            file = file.truncate_tail(pos).map_err(io_err(&path))?;
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
                log::info!("{}: rebuilt missing index", path.display());
                seg.write_indexes(dir).map_err(io_err(&path))?;
            }
        }
        Ok((seg, writer))
    }

    fn rebuild_producer_state(&mut self) {
        let snapshot = Segment::file_stem(&self.dir, self.active.base_offset).with_extension("producers");
        match fs::read(&snapshot) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(producers) => self.producers = producers,
                Err(e) => log::warn!("{}: ignoring a damaged producer snapshot: {e}", snapshot.display()),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("{}: cannot read the producer snapshot: {e}", snapshot.display()),
        }
        let Some(view) = self.active.map.slice(0, self.active.size) else {
            return;
        };
        let mut pos = 0;
        while pos < view.len() {
            let Ok(h) = BatchHeader::parse(&view[pos..]) else {
                break;
            };
            if h.producer_id >= 0 && h.base_sequence >= 0 {
                self.record_producer(&h, h.base_offset);
            }
            pos += h.total_len();
        }
    }

    fn record_producer(&mut self, h: &BatchHeader, base_offset: i64) {
        let last_seq = h.base_sequence.wrapping_add(h.last_offset_delta);
        let st = self.producers.entry(h.producer_id).or_insert_with(|| ProducerState {
            epoch: h.producer_epoch,
            last_sequence: -1,
            recent: VecDeque::new(),
        });
        if h.producer_epoch != st.epoch {
            st.epoch = h.producer_epoch;
            st.recent.clear();
        }
        st.last_sequence = last_seq;
        st.recent.push_back((h.base_sequence, last_seq, base_offset));
        if st.recent.len() > 5 {
            st.recent.pop_front();
        }
    }

    /// Checks idempotent-producer sequencing. `Ok(Some(base))`: a duplicate of a batch
    /// already at `base`.
    fn check_sequence(&self, h: &BatchHeader) -> Result<Option<i64>, LogError> {
        if h.producer_id < 0 || h.base_sequence < 0 {
            return Ok(None);
        }
        let Some(st) = self.producers.get(&h.producer_id) else {
            return Ok(None);
        };
        if h.producer_epoch < st.epoch {
            return Err(LogError::ProducerFenced {
                producer_id: h.producer_id,
                epoch: h.producer_epoch,
                current: st.epoch,
            });
        }
        if h.producer_epoch > st.epoch {
            return if h.base_sequence == 0 {
                Ok(None)
            } else {
                Err(LogError::OutOfOrderSequence { producer_id: h.producer_id, expected: 0, got: h.base_sequence })
            };
        }
        let last = h.base_sequence.wrapping_add(h.last_offset_delta);
        if let Some((_, _, base)) = st.recent.iter().find(|(f, l, _)| *f == h.base_sequence && *l == last) {
            return Ok(Some(*base));
        }
        let expected = if st.last_sequence == i32::MAX { 0 } else { st.last_sequence + 1 };
        if h.base_sequence != expected {
            return Err(LogError::OutOfOrderSequence { producer_id: h.producer_id, expected, got: h.base_sequence });
        }
        Ok(None)
    }

    pub fn next_offset(&self) -> i64 {
        self.active.next_offset
    }

    pub fn log_start_offset(&self) -> i64 {
        self.log_start_offset
    }

    /// Appends the batches of one produce payload (already CRC-checked or not: checked here).
    pub fn append(&mut self, records: &[u8]) -> Result<AppendInfo, LogError> {
        let headers = batch::split_checked(records)?;
        let Some(first) = headers.first() else {
            return Err(LogError::Empty);
        };
        if let Some(base) = self.check_sequence(first)? {
            let last = base + headers.iter().map(BatchHeader::offset_count).sum::<i64>() - 1;
            return Ok(AppendInfo { base_offset: base, last_offset: last, log_append_time: -1, duplicate: true });
        }
        for h in &headers[1..] {
            if self.check_sequence(h)?.is_some() {
                return Err(LogError::OutOfOrderSequence {
                    producer_id: h.producer_id,
                    expected: -1,
                    got: h.base_sequence,
                });
            }
        }
        let total = records.len();
        if total > self.cfg.segment_bytes {
            return Err(LogError::TooLarge { size: total, segment: self.cfg.segment_bytes });
        }
        if total > self.writer.remaining() {
            self.roll()?;
        }
        let append_time = if self.cfg.log_append_time { now_ms() } else { -1 };
        let start = self.writer.position();
        let base_offset = self.active.next_offset;
        let mut next = base_offset;
        {
            let Some(dst) = self.writer.reserve(total) else {
                return Err(LogError::TooLarge { size: total, segment: self.cfg.segment_bytes });
            };
            dst.copy_from_slice(records);
            metrics::count_copy(metrics::Path::ProduceIntoLog, total);
            let mut at = 0;
            for h in &headers {
                let b = &mut dst[at..at + h.total_len()];
                batch::set_base_offset(b, next);
                if append_time >= 0 {
                    batch::set_log_append_time(b, append_time);
                }
                next += h.offset_count();
                at += h.total_len();
            }
        }
        self.writer.advance(total);
        let mut at = start;
        let mut off = base_offset;
        for h in &headers {
            let mut h = *h;
            h.base_offset = off;
            if append_time >= 0 {
                h.max_timestamp = append_time;
            }
            self.active.note_batch(&h, at, self.cfg.index_interval_bytes);
            if h.producer_id >= 0 && h.base_sequence >= 0 {
                self.record_producer(&h, off);
            }
            off += h.offset_count();
            at += h.total_len();
        }
        match self.cfg.flush {
            FlushPolicy::Always => self.flush_now()?,
            FlushPolicy::Bytes(n) if (self.writer.position() - self.flushed_to) as u64 >= n => self.flush_now()?,
            _ => {}
        }
        self.writer.publish();
        metrics::count_produced(total);
        Ok(AppendInfo { base_offset, last_offset: next - 1, log_append_time: append_time, duplicate: false })
    }

    fn flush_now(&mut self) -> Result<(), LogError> {
        let to = self.writer.position();
        self.active.map.flush_range(self.flushed_to, to).map_err(io_err(self.active.map.path()))?;
        self.flushed_to = to;
        Ok(())
    }

    /// Queues an msync of the unflushed range (the `interval` policy's background flush).
    pub fn schedule_flush(&mut self) {
        let to = self.writer.position();
        if to > self.flushed_to {
            self.files.submit(IoWork::Flush { map: self.active.map.clone(), from: self.flushed_to, to });
            self.flushed_to = to;
        }
    }

    /// Has the file worker make the next segment's file ahead of time, once the active
    /// one is half full (so the roll itself is a rename, not a file creation on the append
    /// path). Returns whether it asked.
    pub fn prepare_spare(&mut self) -> bool {
        if self.spare.is_some() || self.writer.position() < self.cfg.segment_bytes / 2 {
            return false;
        }
        let path = self.dir.join(format!("{}.{SPARE_SUFFIX}", self.active.base_offset));
        self.spare = Some(self.files.prepare(path, self.cfg.segment_bytes));
        true
    }

    /// Seals the active segment and starts a new one at the next offset.
    fn roll(&mut self) -> Result<(), LogError> {
        let base = self.active.next_offset;
        // Producer state as of the new segment's start, so recovery does not have to scan
        // sealed segments to know a producer whose last batches are in them (a retry after
        // a restart is still recognised as a duplicate). Written by the I/O thread; if it
        // is lost, recovery falls back to what the active segment shows.
        match serde_json::to_vec(&self.producers) {
            Ok(bytes) => self
                .files
                .submit(IoWork::Write { path: Segment::file_stem(&self.dir, base).with_extension("producers"), bytes }),
            Err(e) => log::warn!("{}: producer snapshot not written: {e}", self.dir.display()),
        }
        let path = Segment::file_stem(&self.dir, base).with_extension("log");
        // A spare still being made is left to the worker (it is removed at the next
        // start, like any spare a crash left behind).
        let file = match self.spare.take().and_then(|p| p.try_take()) {
            Some(Ok(spare)) if spare.capacity() == self.cfg.segment_bytes => {
                spare.rename(&path).map_err(io_err(&path))?
            }
            _ => SegmentFile::create(&path, self.cfg.segment_bytes).map_err(io_err(&path))?,
        };
        let (map, writer) = file.into_shared(0);
        // The sealed segment's last msync and its index files go to the I/O thread.
        self.schedule_flush();
        let (idx, tidx) = self.active.index_files();
        let stem = Segment::file_stem(&self.dir, self.active.base_offset);
        self.files.submit(IoWork::Write { path: stem.with_extension("index"), bytes: idx });
        self.files.submit(IoWork::Write { path: stem.with_extension("timeindex"), bytes: tidx });
        let new = Segment::empty(base, map);
        let old = std::mem::replace(&mut self.active, new);
        self.sealed.push(old);
        self.writer = writer;
        self.flushed_to = 0;
        Ok(())
    }

    fn segment_for(&self, offset: i64) -> &Segment {
        if offset >= self.active.base_offset {
            return &self.active;
        }
        let i = self.sealed.partition_point(|s| s.base_offset <= offset);
        &self.sealed[i.saturating_sub(1)]
    }

    /// Whole batches starting with the one that contains `offset`, up to about `max_bytes`
    /// (at least one batch, as Kafka requires, so a large message is never stuck).
    pub fn read(&self, offset: i64, max_bytes: usize) -> Result<ReadResult, LogError> {
        let hw = self.next_offset();
        if offset < self.log_start_offset || offset > hw {
            return Err(LogError::OffsetOutOfRange { offset, start: self.log_start_offset, end: hw });
        }
        let empty = ReadResult {
            records: Chunk::Heap(Bytes::new()),
            high_watermark: hw,
            log_start_offset: self.log_start_offset,
        };
        if offset == hw {
            return Ok(empty);
        }
        let seg = self.segment_for(offset);
        let Some((start, first)) = seg.locate(offset) else {
            return Ok(empty);
        };
        let Some(view) = seg.map.slice(0, seg.size) else {
            return Ok(empty);
        };
        let mut end = start + first.total_len();
        while end < seg.size {
            let Ok(h) = BatchHeader::parse(&view[end..]) else {
                break;
            };
            if end - start + h.total_len() > max_bytes {
                break;
            }
            end += h.total_len();
        }
        let Some(records) = seg.map.chunk(start, end - start) else {
            return Ok(empty);
        };
        Ok(ReadResult { records, high_watermark: hw, log_start_offset: self.log_start_offset })
    }

    /// Bytes available at or after `offset` (for fetch min_bytes), capped at `cap`.
    pub fn bytes_after(&self, offset: i64, cap: usize) -> usize {
        if offset >= self.next_offset() || offset < self.log_start_offset {
            return 0;
        }
        let mut total = 0;
        let first = self.sealed.partition_point(|s| s.next_offset <= offset);
        for seg in self.sealed[first..].iter().chain(std::iter::once(&self.active)) {
            let from = if seg.base_offset <= offset { seg.locate(offset).map_or(seg.size, |(p, _)| p) } else { 0 };
            total += seg.size - from;
            if total >= cap {
                break;
            }
        }
        total
    }

    /// The first offset whose batch has a timestamp at or after `ts`, or None.
    pub fn offset_for_time(&self, ts: i64) -> Option<i64> {
        let seg = self.sealed.iter().chain(std::iter::once(&self.active)).find(|s| s.max_timestamp >= ts)?;
        let i = seg.time_index.partition_point(|(t, _)| *t < ts);
        let rel = if i == 0 { 0 } else { seg.time_index[i - 1].1 };
        let (mut pos, _) = seg.locate(seg.base_offset + rel as i64)?;
        let view = seg.map.slice(0, seg.size)?;
        while pos < seg.size {
            let h = BatchHeader::parse(&view[pos..]).ok()?;
            if h.max_timestamp >= ts {
                let exact = batch::first_offset_at_or_after(&view[pos..pos + h.total_len()], &h, ts);
                return Some(exact.max(self.log_start_offset));
            }
            pos += h.total_len();
        }
        None
    }

    /// Drops sealed segments past the size or age limit (their files are unlinked by the
    /// file worker); returns how many.
    pub fn enforce_retention(&mut self, now_ms: i64) -> usize {
        let mut removed = 0;
        loop {
            let total: u64 = self.sealed.iter().map(|s| s.size as u64).sum::<u64>() + self.active.size as u64;
            let Some(oldest) = self.sealed.first() else {
                break;
            };
            let too_big = self.cfg.retention_bytes.is_some_and(|b| total > b);
            let too_old =
                self.cfg.retention_ms.is_some_and(|ms| oldest.max_timestamp >= 0 && oldest.max_timestamp < now_ms - ms);
            if !too_big && !too_old {
                break;
            }
            let seg = self.sealed.remove(0);
            let stem = Segment::file_stem(&self.dir, seg.base_offset);
            self.files.submit(IoWork::Remove(
                ["log", "index", "timeindex", "producers"].iter().map(|x| stem.with_extension(x)).collect(),
            ));
            self.log_start_offset = self.sealed.first().map_or(self.active.base_offset, |s| s.base_offset);
            removed += 1;
        }
        removed
    }

    /// Flushes everything (shutdown).
    pub fn close(&mut self) -> Result<(), LogError> {
        self.flush_now()
    }

    pub fn config(&self) -> &LogConfig {
        &self.cfg
    }
}

#[cfg(test)]
mod tests {
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
}
