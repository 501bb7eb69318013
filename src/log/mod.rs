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
//! The parts: `segment` (a segment's metadata and sparse indexes), `recovery`
//! (opening and scanning), `producers` (idempotent-producer state), [`mmap`] (the mapped
//! files), [`files`] (the file worker), [`batch`] (record-batch headers); this module
//! appends, reads, rolls and enforces retention.
//!
//! # The page cache
//! Appends go into the page cache with `pwritev` (see [`mmap`]); readers map it. What lies
//! more than [`LogConfig::page_cache_keep`] behind a partition's newest byte is written
//! back and dropped by the file worker (`PartitionLog::trim_page_cache`), so the log
//! reuses the pages it frees instead of taking fresh ones; readers further behind go
//! through the cold path ([`PartitionLog::read_resident`]).
//!
//! # Durability (the flush policy)
//! Appends land in the page cache before they are acknowledged, so an acknowledged batch survives
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
mod producers;
mod recovery;
mod segment;
#[cfg(test)]
mod tests;

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
use batch::{BatchError, BatchHeader};
pub use files::{FileWorker, Files, Pending};
use mmap::{SegmentFile, SegmentMap, SegmentWriter};
use producers::ProducerState;
use segment::Segment;

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
    /// How many of a partition's newest bytes stay in the page cache; what lies further
    /// back is written back and dropped by the file worker as the partition grows, so
    /// appends reuse the pages it frees instead of taking fresh ones (`None`: the kernel
    /// decides). See "How appends reach the file" in docs/architecture.md.
    pub page_cache_keep: Option<usize>,
}

/// Default of [`LogConfig::page_cache_keep`]: well past what consumers keeping up read
/// back, small beside the machine's memory for a few hundred partitions.
pub const DEFAULT_PAGE_CACHE_KEEP: usize = 256 << 20;

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes: 128 << 20,
            index_interval_bytes: 4096,
            retention_bytes: None,
            retention_ms: Some(7 * 24 * 3600 * 1000),
            flush: FlushPolicy::Interval(1000),
            log_append_time: false,
            page_cache_keep: Some(DEFAULT_PAGE_CACHE_KEEP),
        }
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
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
    /// Nothing was read because the pages were not in memory ([`PartitionLog::read_resident`]):
    /// they are being brought in, and the partition's readers will be woken.
    pub cold: bool,
}

/// Pages a [`PartitionLog::read_resident`] found out of memory: the span of a segment
/// to bring in before reading again, and what the partition's previous cold read
/// brought in that its reader has moved past.
pub struct Cold {
    /// To bring in.
    pub span: ColdSpan,
    /// To drop before bringing the span in (see [`PartitionLog::read_resident`]).
    pub behind: Option<ColdSpan>,
}

/// A span of one segment's file.
#[derive(Clone)]
pub struct ColdSpan {
    pub map: Arc<SegmentMap>,
    /// The segment's base offset.
    pub segment: i64,
    pub from: usize,
    pub to: usize,
}

impl Cold {
    /// Drops what lies behind, then brings the span in (blocks on I/O: a background
    /// thread's work). In that order, so that the pages brought in are the ones just
    /// freed.
    pub fn populate(&self) -> std::io::Result<()> {
        if let Some(b) = &self.behind {
            // Costs memory, never data: the read goes on.
            if let Err(e) = (IoWork::Drop { map: b.map.clone(), from: b.from, to: b.to }).run() {
                log::warn!("dropping log pages a reader has passed: {e}");
            }
        }
        let span = &self.span;
        span.map.populate(span.from, span.to - span.from)
    }
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
    /// Write back a range of a segment and drop it from the page cache.
    Drop { map: Arc<SegmentMap>, from: usize, to: usize },
}

impl IoWork {
    pub fn run(self) -> io::Result<()> {
        match self {
            IoWork::Flush { map, from, to } => {
                crate::metrics::count_log_flush();
                map.flush_range(from, to)
            }
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
            IoWork::Drop { map, from, to } => {
                map.drop_cached(from, to)?;
                crate::metrics::count_page_cache_dropped(to.saturating_sub(from));
                Ok(())
            }
        }
    }
}

/// What is left in the page cache of a sealed segment, dropped once the partition has
/// grown [`LogConfig::page_cache_keep`] past the seal.
struct Trail {
    map: Arc<SegmentMap>,
    from: usize,
    to: usize,
    /// [`PartitionLog::appended`] when the segment was sealed.
    sealed_at: u64,
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
    /// The last spare could not be made (a full disk): rolls create their own.
    spare_failed: bool,
    /// Where background file work goes.
    files: Files,
    /// Bytes appended since the log was opened (a clock for [`Trail::sealed_at`]).
    appended: u64,
    /// Where the active segment's bytes not yet handed to the file worker to drop start.
    cached_from: usize,
    /// Sealed segments whose newest pages are still cached, oldest first.
    trail: VecDeque<Trail>,
    /// The last cold read and the one before it, in a run of cold reads each further on
    /// than the last (see [`Self::read_resident`]).
    cold_last: Option<ColdSpan>,
    cold_before: Option<ColdSpan>,
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
        // Each batch goes out as its header, patched here (base offset, LogAppendTime and
        // its CRC), and the rest straight from the request: the kernel's copy into the
        // page cache is the only copy of a produced byte.
        let mut heads: Vec<[u8; batch::HEADER_LEN]> = Vec::with_capacity(headers.len());
        let mut at = 0;
        for h in &headers {
            let b = &records[at..at + h.total_len()];
            let mut head = [0u8; batch::HEADER_LEN];
            head.copy_from_slice(&b[..batch::HEADER_LEN]);
            batch::set_base_offset(&mut head, next);
            if append_time >= 0 {
                batch::set_log_append_time(&mut head, &b[batch::HEADER_LEN..], append_time);
            }
            heads.push(head);
            next += h.offset_count();
            at += h.total_len();
        }
        let mut parts: Vec<&[u8]> = Vec::with_capacity(2 * heads.len());
        let mut at = 0;
        for (h, head) in headers.iter().zip(&heads) {
            parts.push(head);
            parts.push(&records[at + batch::HEADER_LEN..at + h.total_len()]);
            at += h.total_len();
        }
        match self.writer.write(&parts) {
            Ok(true) => metrics::count_copy(metrics::Path::ProduceIntoLog, total),
            Ok(false) => return Err(LogError::TooLarge { size: total, segment: self.cfg.segment_bytes }),
            Err(e) => return Err(io_err(self.active.map.path())(e)),
        }
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
        self.appended += total as u64;
        self.trim_page_cache();
        Ok(AppendInfo { base_offset, last_offset: next - 1, log_append_time: append_time, duplicate: false })
    }

    fn flush_now(&mut self) -> Result<(), LogError> {
        let to = self.writer.position();
        self.active.map.flush_range(self.flushed_to, to).map_err(io_err(self.active.map.path()))?;
        crate::metrics::count_log_flush();
        self.flushed_to = to;
        Ok(())
    }

    /// Hands the file worker what lies more than `page_cache_keep` behind the newest
    /// byte, to write back and drop from the page cache.
    ///
    /// Why: a log that only ever grows takes a new page-cache page for every byte it
    /// stores. On machines that give freed memory back to a hypervisor (these VMs:
    /// virtio-balloon free page reporting) a new page costs a fault on the host, and a run
    /// falls to the rate the host hands out memory (~440 MB/s here, against 2.2 GB/s when
    /// the pages are ones the log itself just freed: `bench/micro/log_append.rs`,
    /// `pwrite` against `pwrite-drop`). Anywhere, it bounds the page cache the log holds
    /// at that much per partition; consumers further behind read through the cold path
    /// (`read_resident`), which they would after an eviction anyway.
    fn trim_page_cache(&mut self) {
        let Some(keep) = self.cfg.page_cache_keep else { return };
        while let Some(t) = self.trail.front() {
            if self.appended < t.sealed_at.saturating_add(keep as u64) {
                break;
            }
            if let Some(t) = self.trail.pop_front() {
                self.files.submit(IoWork::Drop { map: t.map, from: t.from, to: t.to });
            }
        }
        // In steps, so that the worker gets one job per step rather than one per append.
        let step = (keep / 4).clamp(64 << 10, 8 << 20);
        let upto = self.writer.position().saturating_sub(keep);
        if upto >= self.cached_from + step {
            self.files.submit(IoWork::Drop { map: self.active.map.clone(), from: self.cached_from, to: upto });
            self.cached_from = upto;
        }
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
        if self.spare.is_some() || self.spare_failed || self.writer.position() < self.cfg.segment_bytes / 2 {
            return false;
        }
        let path = self.dir.join(format!("{}.{SPARE_SUFFIX}", self.active.base_offset));
        self.spare = Some(self.files.prepare(path, self.cfg.segment_bytes));
        true
    }

    /// Seals the active segment and starts a new one at the next offset.
    ///
    /// On a full disk the new segment cannot be allocated: the roll fails with ENOSPC,
    /// nothing changes, and the append that needed it is refused (a storage error for the
    /// client); the next append tries again, so writes resume once space comes back.
    fn roll(&mut self) -> Result<(), LogError> {
        let base = self.active.next_offset;
        let path = Segment::file_stem(&self.dir, base).with_extension("log");
        // A spare still being made is left to the worker (it is removed at the next
        // start, like any spare a crash left behind).
        let spare = self.spare.take().and_then(|p| p.try_take());
        // One that could not be made is not asked for again before a roll succeeds.
        self.spare_failed = matches!(spare, Some(Err(_)));
        let file = match spare {
            Some(Ok(spare)) if spare.capacity() == self.cfg.segment_bytes => {
                spare.rename(&path).map_err(io_err(&path))?
            }
            _ => SegmentFile::create(&path, self.cfg.segment_bytes).map_err(io_err(&path))?,
        };
        self.spare_failed = false;
        // Producer state as of the new segment's start, so recovery does not have to scan
        // sealed segments to know a producer whose last batches are in them (a retry after
        // a restart is still recognised as a duplicate). Written by the file worker; if it
        // is lost, recovery falls back to what the active segment shows.
        match serde_json::to_vec(&self.producers) {
            Ok(bytes) => self
                .files
                .submit(IoWork::Write { path: Segment::file_stem(&self.dir, base).with_extension("producers"), bytes }),
            Err(e) => log::warn!("{}: producer snapshot not written: {e}", self.dir.display()),
        }
        let (map, writer) = file.into_shared(0);
        // The sealed segment's last msync and its index files go to the I/O thread.
        self.schedule_flush();
        let (idx, tidx) = self.active.index_files();
        let stem = Segment::file_stem(&self.dir, self.active.base_offset);
        self.files.submit(IoWork::Write { path: stem.with_extension("index"), bytes: idx });
        self.files.submit(IoWork::Write { path: stem.with_extension("timeindex"), bytes: tidx });
        let new = Segment::empty(base, map);
        let old = std::mem::replace(&mut self.active, new);
        if self.cfg.page_cache_keep.is_some() {
            let from = std::mem::take(&mut self.cached_from);
            self.trail.push_back(Trail { map: old.map.clone(), from, to: old.size, sealed_at: self.appended });
        }
        self.sealed.push(old);
        self.writer = writer;
        self.flushed_to = 0;
        crate::metrics::count_segment_roll();
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
        self.read_inner(offset, max_bytes, false).map(|(r, _)| r)
    }

    /// As [`PartitionLog::read`], but touching no page that is not in memory (a consumer's
    /// read on a dispatch core, which must not wait for the disk): when the span the read
    /// would touch is not all resident, an empty result marked `cold` and the span to
    /// bring in.
    ///
    /// With the page cache kept ([`LogConfig::page_cache_keep`]), a cold read further on
    /// than the previous one also hands back, to drop first, what lies from where the one
    /// before the previous started to where the previous one started: a consumer catching
    /// up from far back reads on through pages it freed itself, as the writer does,
    /// instead of taking a fresh page for every byte (a sixth of the rate here:
    /// `scripts/bench-cold-read.py`, `docs/bench/cold-read/`). One read's lag, so that a
    /// reader a fetch or so behind this one finds its pages still in; pages the tail keeps
    /// are never dropped this way, nor anything when cold reads come from readers at
    /// different places (each one further back than the last starts over). A reader
    /// further behind may find pages gone and read them in again: a cost, never a
    /// different answer.
    pub fn read_resident(&mut self, offset: i64, max_bytes: usize) -> Result<(ReadResult, Option<Cold>), LogError> {
        let (read, cold) = self.read_inner(offset, max_bytes, true)?;
        let Some(mut cold) = cold else { return Ok((read, None)) };
        if self.cfg.page_cache_keep.is_none() {
            return Ok((read, Some(cold)));
        }
        let now = cold.span.clone();
        match self.cold_last.as_ref().map(|l| (l.segment, l.from)) {
            // The reader goes on: it has passed everything from where the cold read before
            // the last one started (the kernel's read-ahead brought in more than that read
            // asked for) to where the last one started.
            Some((segment, from)) if (segment, from) < (now.segment, now.from) => {
                cold.behind = self.cold_before.take().and_then(|b| {
                    let to = if b.segment < segment { b.map.published() } else { from };
                    let to = to.min(self.kept_from(&b.map));
                    (to > b.from).then_some(ColdSpan { to, ..b })
                });
                self.cold_before = self.cold_last.replace(now);
            }
            // The same span again (another reader asking before it came in): nothing.
            Some(last) if last == (now.segment, now.from) => {}
            // The first, or one further back (another reader): a new run of cold reads.
            _ => {
                self.cold_before = None;
                self.cold_last = Some(now);
            }
        }
        Ok((read, Some(cold)))
    }

    /// Where the pages the tail keeps start in the segment `map` (`usize::MAX` when it
    /// keeps none of them).
    fn kept_from(&self, map: &Arc<SegmentMap>) -> usize {
        if Arc::ptr_eq(map, &self.active.map) {
            return self.cached_from;
        }
        self.trail.iter().find(|t| Arc::ptr_eq(&t.map, map)).map_or(usize::MAX, |t| t.from)
    }

    fn read_inner(
        &self,
        offset: i64,
        max_bytes: usize,
        resident_only: bool,
    ) -> Result<(ReadResult, Option<Cold>), LogError> {
        let hw = self.next_offset();
        if offset < self.log_start_offset || offset > hw {
            return Err(LogError::OffsetOutOfRange { offset, start: self.log_start_offset, end: hw });
        }
        let empty = |cold: bool| ReadResult {
            records: Chunk::Heap(Bytes::new()),
            high_watermark: hw,
            log_start_offset: self.log_start_offset,
            cold,
        };
        if offset == hw {
            return Ok((empty(false), None));
        }
        let seg = self.segment_for(offset);
        let cold = |from: usize, to: usize| Cold {
            span: ColdSpan { map: seg.map.clone(), segment: seg.base_offset, from, to },
            behind: None,
        };
        // The span the header walk and the answer touch: from the index entry at or below
        // `offset` through one index interval and `max_bytes` more, where the walk below
        // stops; plus one header, since a header that starts inside it may end past it.
        // (The walk to `offset`'s batch reads headers that start within one index interval
        // of the entry: a batch starting further on would have had an entry of its own.)
        let window_end = match resident_only {
            true => {
                let from = seg.index_position(offset);
                let end = seg.size.min(from.saturating_add(self.cfg.index_interval_bytes).saturating_add(max_bytes));
                let checked = seg.size.min(end.saturating_add(batch::HEADER_LEN));
                if !seg.map.resident(from, checked - from) {
                    return Ok((empty(true), Some(cold(from, checked))));
                }
                end
            }
            false => seg.size,
        };
        let Some((start, first)) = seg.locate(offset) else {
            return Ok((empty(false), None));
        };
        let Some(view) = seg.map.slice(0, seg.size) else {
            return Ok((empty(false), None));
        };
        let mut end = start + first.total_len();
        while end < seg.size && end < window_end {
            let Ok(h) = BatchHeader::parse(&view[end..]) else {
                break;
            };
            if end - start + h.total_len() > max_bytes {
                break;
            }
            end += h.total_len();
        }
        // A first batch reaching past the checked span: the rest of it must be in memory too.
        if resident_only && end > window_end && !seg.map.resident(window_end, end - window_end) {
            return Ok((empty(true), Some(cold(window_end, end))));
        }
        let Some(records) = seg.map.chunk(start, end - start) else {
            return Ok((empty(false), None));
        };
        Ok((ReadResult { records, high_watermark: hw, log_start_offset: self.log_start_offset, cold: false }, None))
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
            crate::metrics::count_retention_deleted(1);
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
