//! The sidecar's tail cache: recent record batches of each partition, as the upstream
//! served them, so fetches of cached ranges are answered without going upstream.
//!
//! Filled from the upstream's fetch answers only (the bytes a consumer would have got
//! from the broker, exactly; see `docs/sidecar.md` for why not from produce requests),
//! kept in append-only blocks of anonymous memory ([`AppendBlock`]) whose views are sent
//! by reference.
//!
//! # Invariants (the consistency rules; each has a test below)
//! - Nothing at or above the partition's high watermark as last observed is served.
//! - A partition's cache is dropped when its leader epoch changes, when its high
//!   watermark goes backwards (truncation), when an answer for it carries an error or a
//!   diverging epoch, and when its topic is deleted or recreated (an unknown-topic error,
//!   DeleteTopics, a new topic id); batches below a log start that moved past them go.
//! - The cached batches of a partition are contiguous: each starts where the previous
//!   ended (offsets absent between them, e.g. compacted away, are absent upstream too,
//!   since both came from answers that continued one another). An answer that does not
//!   continue the cache replaces it.
//! - read_committed fetches are never served here (the cache does not track aborted
//!   transactions); the caller checks.
//! - Memory is bounded per partition and in total; the least recently read partition
//!   loses its oldest block first.

use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::buffer::{AppendBlock, Chunk};

#[derive(Debug, Clone, Copy)]
pub struct CacheLimits {
    /// All partitions together.
    pub total_bytes: usize,
    /// One partition.
    pub partition_bytes: usize,
    /// Size of the blocks batches are appended into (a larger batch gets a block of its own).
    pub block_bytes: usize,
}

/// A record batch in the cache.
struct Cached {
    base: i64,
    last: i64,
    /// The batch's partition leader epoch (what KIP-320 divergence checks compare).
    epoch: i32,
    /// Part of a transaction (attributes bit 4): read_committed fetches of it go upstream,
    /// since the cache does not track aborted transactions.
    transactional: bool,
    /// The block it lies in (its id), where, and how long.
    block: u64,
    at: usize,
    len: usize,
}

#[derive(Default)]
struct Part {
    batches: VecDeque<Cached>,
    /// Blocks in use, oldest first, by id; batches are appended to the last.
    blocks: VecDeque<(u64, Arc<AppendBlock>)>,
    next_block: u64,
    held: usize,
    hw: i64,
    lso: i64,
    log_start: i64,
    leader_epoch: Option<i32>,
    last_read: u64,
    /// Upstream fetches in flight for this partition, and until when the last of them can
    /// be waited for (a fetch whose answer never comes stops counting then).
    watchers: u32,
    watch_until: Option<std::time::Instant>,
}

impl Part {
    /// The offset after the last cached batch.
    fn end(&self) -> Option<i64> {
        self.batches.back().map(|b| b.last + 1)
    }

    fn clear(&mut self) -> usize {
        let freed = self.held;
        self.batches.clear();
        self.blocks.clear();
        self.held = 0;
        freed
    }

    /// Drops the oldest block and the batches in it; returns the bytes freed.
    fn evict_oldest_block(&mut self) -> usize {
        let Some((gone, b)) = self.blocks.pop_front() else { return 0 };
        while self.batches.front().is_some_and(|c| c.block == gone) {
            self.batches.pop_front();
        }
        self.held -= b.capacity();
        b.capacity()
    }

    fn block(&self, id: u64) -> Option<&Arc<AppendBlock>> {
        self.blocks.iter().find(|(i, _)| *i == id).map(|(_, b)| b)
    }
}

/// What a partition's state is as the upstream last described it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marks {
    pub hw: i64,
    pub lso: i64,
    pub log_start: i64,
    /// The leader epoch the cache's data is of, if known.
    pub leader_epoch: Option<i32>,
}

/// Where a fetch of one partition reads from, as its request says.
#[derive(Debug, Clone, Copy)]
pub struct Position {
    pub offset: i64,
    /// KIP-320's last fetched epoch (-1: none).
    pub last_fetched_epoch: i32,
    /// read_committed.
    pub committed: bool,
}

impl Position {
    pub fn at(offset: i64) -> Position {
        Position { offset, last_fetched_epoch: -1, committed: false }
    }
}

/// How a fetch of one partition at one offset can be answered here.
#[derive(Debug)]
pub enum Serve {
    /// Batches from the one holding the offset on, below the high watermark, within one
    /// block (a view of the cache), and the partition's marks.
    Hit { records: Chunk, marks: Marks },
    /// The offset is the high watermark: nothing to give yet.
    Tail { marks: Marks },
    /// Not here: ask upstream.
    Miss,
}

/// One partition of an upstream fetch answer, as the cache takes it.
pub struct Answer<'a> {
    pub error_code: i16,
    pub hw: i64,
    pub lso: i64,
    pub log_start: i64,
    /// The leader epoch the answer names (Fetch v12+ `CurrentLeader`), if any.
    pub leader_epoch: Option<i32>,
    /// Whether the answer says the fetcher's log diverged (truncation).
    pub diverging: bool,
    pub records: Option<&'a Bytes>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    pub held_bytes: usize,
    pub filled_bytes: u64,
    pub dropped_partitions: u64,
    pub evicted_bytes: u64,
}

pub struct TailCache {
    limits: CacheLimits,
    parts: HashMap<(String, i32), Part>,
    topic_ids: HashMap<[u8; 16], String>,
    held: usize,
    clock: u64,
    stats: CacheStats,
}

/// Record batch v2 header fields: base offset, length, magic, last offset delta.
const BATCH_LENGTH_AT: usize = 8;
const EPOCH_AT: usize = 12;
const ATTRIBUTES_AT: usize = 21;
const MAGIC_AT: usize = 16;
const LAST_DELTA_AT: usize = 23;
const BATCH_HEADER: usize = 61;

/// A whole v2 record batch found in an answer's records.
struct Found {
    base: i64,
    last: i64,
    epoch: i32,
    transactional: bool,
    range: std::ops::Range<usize>,
}

/// The whole v2 batches at the front of `records`: (base, last, byte range). Stops at a
/// partial batch (answers are cut at the size limit) or anything that is not a v2 batch.
#[cfg(test)]
fn batches(records: &[u8]) -> Vec<(i64, i64, std::ops::Range<usize>)> {
    scan(records).into_iter().map(|f| (f.base, f.last, f.range)).collect()
}

/// The whole v2 batches at the front of `records`. Stops at a partial batch (answers are
/// cut at the size limit) or anything that is not a v2 batch.
fn scan(records: &[u8]) -> Vec<Found> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while let Some(h) = records.get(at..at + BATCH_HEADER) {
        let base = i64::from_be_bytes(h[..8].try_into().unwrap_or_default());
        let len = i32::from_be_bytes(h[BATCH_LENGTH_AT..BATCH_LENGTH_AT + 4].try_into().unwrap_or_default());
        let delta = i32::from_be_bytes(h[LAST_DELTA_AT..LAST_DELTA_AT + 4].try_into().unwrap_or_default());
        if h[MAGIC_AT] != 2 || len < (BATCH_HEADER - 12) as i32 || delta < 0 {
            break;
        }
        let end = match at.checked_add(12 + len as usize) {
            Some(e) if e <= records.len() => e,
            _ => break,
        };
        // Offsets a log can hold: the offset after the last one must exist too.
        let Some(last) = base.checked_add(i64::from(delta)).filter(|l| base >= 0 && *l < i64::MAX) else { break };
        out.push(Found {
            base,
            last,
            epoch: i32::from_be_bytes(h[EPOCH_AT..EPOCH_AT + 4].try_into().unwrap_or_default()),
            transactional: h[ATTRIBUTES_AT + 1] & 0x10 != 0,
            range: at..end,
        });
        at = end;
    }
    out
}

impl TailCache {
    pub fn new(limits: CacheLimits) -> TailCache {
        TailCache {
            limits,
            parts: HashMap::new(),
            topic_ids: HashMap::new(),
            held: 0,
            clock: 0,
            stats: CacheStats::default(),
        }
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats { held_bytes: self.held, ..self.stats }
    }

    /// The topic a Fetch v13+ id stands for, as Metadata answers named it.
    pub fn topic_of(&self, id: &[u8; 16]) -> Option<&str> {
        self.topic_ids.get(id).map(String::as_str)
    }

    fn drop_part(&mut self, key: &(String, i32)) {
        if let Some(p) = self.parts.get_mut(key) {
            if !p.batches.is_empty() {
                self.stats.dropped_partitions += 1;
            }
            self.held -= p.clear();
        }
    }

    /// A topic is gone (deleted, or unknown to the upstream): everything of it goes.
    pub fn drop_topic(&mut self, topic: &str) {
        let keys: Vec<_> = self.parts.keys().filter(|(t, _)| t == topic).cloned().collect();
        for k in keys {
            self.drop_part(&k);
            self.parts.remove(&k);
        }
    }

    /// What a Metadata answer says of a topic: its id (v10+; a new id is a recreated
    /// topic) and its partitions' leader epochs (v7+).
    pub fn observe_topic(&mut self, topic: &str, id: Option<[u8; 16]>, epochs: &[(i32, i32)]) {
        if let Some(id) = id.filter(|id| *id != [0; 16]) {
            let known = self.topic_ids.iter().find(|(_, t)| t.as_str() == topic).map(|(k, _)| *k);
            if known.is_some_and(|k| k != id) {
                self.drop_topic(topic);
            }
            if let Some(k) = known {
                self.topic_ids.remove(&k);
            }
            self.topic_ids.insert(id, topic.to_string());
        }
        for &(partition, epoch) in epochs {
            self.observe_epoch(topic, partition, epoch);
        }
    }

    fn observe_epoch(&mut self, topic: &str, partition: i32, epoch: i32) {
        if epoch < 0 {
            return;
        }
        let key = (topic.to_string(), partition);
        let changed = self.parts.get(&key).and_then(|p| p.leader_epoch).is_some_and(|e| e != epoch);
        if changed {
            self.drop_part(&key);
        }
        self.parts.entry(key).or_default().leader_epoch = Some(epoch);
    }

    /// Takes one partition of an upstream fetch answer.
    pub fn fill(&mut self, topic: &str, partition: i32, a: &Answer<'_>) {
        let key = (topic.to_string(), partition);
        if a.error_code != 0 || a.diverging {
            self.drop_part(&key);
            return;
        }
        if let Some(e) = a.leader_epoch {
            self.observe_epoch(topic, partition, e);
        }
        let p = self.parts.entry(key.clone()).or_default();
        if a.hw < p.hw {
            // The high watermark went backwards: the log was truncated under us.
            self.drop_part(&key);
        }
        let p = self.parts.entry(key.clone()).or_default();
        p.hw = a.hw;
        p.lso = a.lso;
        p.log_start = a.log_start;
        // Batches wholly below the log start are gone upstream.
        while p.batches.front().is_some_and(|b| b.last < a.log_start) {
            p.batches.pop_front();
        }
        let Some(records) = a.records.filter(|r| !r.is_empty()) else { return };
        let found = scan(records);
        let Some(first) = found.first() else { return };
        // An answer is a contiguous run of the log: it continues the cache if it starts at
        // or before the cache's end (what it has past the end follows on). One starting
        // beyond the end leaves a gap: it replaces the cache.
        let continues = p.end().is_some_and(|end| first.base <= end);
        if !continues {
            let freed = p.clear();
            self.held -= freed;
        }
        for f in found {
            let p = self.parts.get_mut(&key).expect("inserted above");
            match p.end() {
                Some(end) if f.last < end => continue, // already held
                Some(end) if f.base < end => {
                    // Overlaps what is held without matching it: not the same log.
                    let freed = p.clear();
                    self.held -= freed;
                }
                _ => {}
            }
            let bytes = &records[f.range.clone()];
            self.append(&key, &f, bytes);
        }
    }

    fn append(&mut self, key: &(String, i32), f: &Found, bytes: &[u8]) {
        let Found { base, last, epoch, transactional, .. } = *f;
        let limits = self.limits;
        if bytes.len() > limits.partition_bytes || bytes.len() > limits.total_bytes {
            return;
        }
        loop {
            let p = self.parts.get_mut(key).expect("present");
            let appended = p.blocks.back().and_then(|(id, b)| Some((*id, b.append(bytes)?)));
            if let Some((block, at)) = appended {
                p.batches.push_back(Cached { base, last, epoch, transactional, block, at, len: bytes.len() });
                self.stats.filled_bytes += bytes.len() as u64;
                return;
            }
            // A new block: make room for it first.
            let want = limits.block_bytes.max(bytes.len());
            while p.held + want > limits.partition_bytes && !p.blocks.is_empty() {
                let freed = p.evict_oldest_block();
                self.held -= freed;
                self.stats.evicted_bytes += freed as u64;
            }
            if self.held + want > limits.total_bytes && !self.evict_coldest(key, want) {
                return;
            }
            let Ok(block) = AppendBlock::new(want) else { return };
            let p = self.parts.get_mut(key).expect("present");
            let id = p.next_block;
            p.next_block += 1;
            p.blocks.push_back((id, block));
            p.held += want;
            self.held += want;
        }
    }

    /// Frees blocks of the least recently read partitions (this one last) until `want`
    /// more bytes fit; false if they cannot.
    fn evict_coldest(&mut self, keep: &(String, i32), want: usize) -> bool {
        while self.held + want > self.limits.total_bytes {
            let coldest = self
                .parts
                .iter()
                .filter(|(_, p)| !p.blocks.is_empty())
                .min_by_key(|(k, p)| (*k == keep, p.last_read))
                .map(|(k, _)| k.clone());
            let Some(k) = coldest else { return false };
            let p = self.parts.get_mut(&k).expect("found");
            let freed = p.evict_oldest_block();
            self.held -= freed;
            self.stats.evicted_bytes += freed as u64;
        }
        true
    }

    /// An upstream fetch of this partition went out that will be answered by `until`:
    /// fetches at the tail may wait for its answer instead of going upstream too.
    pub fn watch(&mut self, topic: &str, partition: i32, until: std::time::Instant) {
        let p = self.parts.entry((topic.to_string(), partition)).or_default();
        p.watchers += 1;
        p.watch_until = Some(p.watch_until.map_or(until, |u| u.max(until)));
    }

    /// An upstream fetch of this partition was answered.
    pub fn release(&mut self, topic: &str, partition: i32) {
        if let Some(p) = self.parts.get_mut(&(topic.to_string(), partition)) {
            p.watchers = p.watchers.saturating_sub(1);
            if p.watchers == 0 {
                p.watch_until = None;
            }
        }
    }

    /// Whether an upstream fetch of this partition is in flight (and not overdue).
    pub fn watched(&self, topic: &str, partition: i32, now: std::time::Instant) -> bool {
        self.parts
            .get(&(topic.to_string(), partition))
            .is_some_and(|p| p.watchers > 0 && p.watch_until.is_some_and(|u| u > now))
    }

    /// How a fetch of `topic`/`partition` at `offset` (at most `max_bytes`, but always a
    /// whole first batch) can be answered here. `last_fetched_epoch` (KIP-320; -1: none)
    /// is the epoch of the batch the client read last: served only when the cache holds
    /// that batch, ending right before `offset`, with that epoch — then the broker's
    /// divergence check would pass too. `committed` (read_committed): bounded by the last
    /// stable offset instead of the high watermark, and only non-transactional batches
    /// (for which there are no aborted transactions to report).
    pub fn serve(&mut self, topic: &str, partition: i32, at: Position, max_bytes: usize) -> Serve {
        let Position { offset, last_fetched_epoch, committed } = at;
        self.clock += 1;
        let now = self.clock;
        let Some(p) = self.parts.get_mut(&(topic.to_string(), partition)) else { return Serve::Miss };
        p.last_read = now;
        let marks = Marks { hw: p.hw, lso: p.lso, log_start: p.log_start, leader_epoch: p.leader_epoch };
        let (Some(front), Some(end)) = (p.batches.front(), p.end()) else {
            log::trace!("tail cache: {topic}/{partition} at {offset}: nothing cached");
            return Serve::Miss;
        };
        // What a consumer may see: below the high watermark, or for read_committed the
        // last stable offset.
        let bound = if committed { p.lso.min(p.hw) } else { p.hw };
        if offset < front.base.max(p.log_start) || offset > bound {
            return Serve::Miss;
        }
        if last_fetched_epoch >= 0 && !p.batches.iter().any(|b| b.last == offset - 1 && b.epoch == last_fetched_epoch) {
            log::trace!("tail cache: {topic}/{partition} at {offset}: no cached batch of epoch {last_fetched_epoch} ends before it");
            return Serve::Miss;
        }
        if offset == bound {
            return Serve::Tail { marks };
        }
        if offset >= end {
            return Serve::Miss;
        }
        let Some(i) = p.batches.iter().position(|b| b.last >= offset) else { return Serve::Miss };
        let first = &p.batches[i];
        if committed && first.transactional {
            return Serve::Miss;
        }
        if first.last >= bound {
            // Not committed yet as far as we know.
            return Serve::Tail { marks };
        }
        let (block, start) = (first.block, first.at);
        let mut len = first.len;
        for b in p.batches.iter().skip(i + 1) {
            // Batches of one block lie back to back in it: one view covers them.
            if b.block != block
                || b.at != start + len
                || b.last >= bound
                || (committed && b.transactional)
                || len + b.len > max_bytes
            {
                break;
            }
            len += b.len;
        }
        match p.block(block).and_then(|blk| blk.view(start, len)) {
            Some(records) => Serve::Hit { records, marks },
            None => Serve::Miss,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A v2 record batch header (and `payload` bytes of body) for offsets base..=last,
    /// of partition leader epoch 3.
    fn batch(base: i64, last: i64, payload: usize) -> Vec<u8> {
        let mut b = vec![0u8; BATCH_HEADER + payload];
        b[EPOCH_AT..EPOCH_AT + 4].copy_from_slice(&3i32.to_be_bytes());
        b[..8].copy_from_slice(&base.to_be_bytes());
        b[8..12].copy_from_slice(&((BATCH_HEADER - 12 + payload) as i32).to_be_bytes());
        b[MAGIC_AT] = 2;
        b[LAST_DELTA_AT..LAST_DELTA_AT + 4].copy_from_slice(&((last - base) as i32).to_be_bytes());
        b[BATCH_HEADER..].fill((base % 251) as u8);
        b
    }

    fn run(batches: &[(i64, i64)]) -> Bytes {
        Bytes::from(batches.iter().flat_map(|&(b, l)| batch(b, l, 100)).collect::<Vec<u8>>())
    }

    fn answer(records: &Bytes, hw: i64) -> Answer<'_> {
        Answer {
            error_code: 0,
            hw,
            lso: hw,
            log_start: 0,
            leader_epoch: None,
            diverging: false,
            records: Some(records),
        }
    }

    fn cache() -> TailCache {
        TailCache::new(CacheLimits { total_bytes: 1 << 20, partition_bytes: 256 << 10, block_bytes: 64 << 10 })
    }

    fn hit(c: &mut TailCache, offset: i64) -> Option<Vec<(i64, i64)>> {
        match c.serve("t", 0, Position::at(offset), 1 << 20) {
            Serve::Hit { records, .. } => Some(batches(&records).into_iter().map(|(b, l, _)| (b, l)).collect()),
            _ => None,
        }
    }

    #[test]
    fn fetched_batches_are_served_back_byte_for_byte_from_the_one_holding_the_offset() {
        let mut c = cache();
        let r = run(&[(0, 9), (10, 19), (20, 29)]);
        c.fill("t", 0, &answer(&r, 30));
        assert_eq!(hit(&mut c, 0), Some(vec![(0, 9), (10, 19), (20, 29)]));
        assert_eq!(hit(&mut c, 15), Some(vec![(10, 19), (20, 29)]), "from the batch holding 15");
        match c.serve("t", 0, Position::at(0), 1) {
            Serve::Hit { records, .. } => assert_eq!(&records[..], &r[..r.len() / 3], "one whole batch at least"),
            other => panic!("{other:?}"),
        }
        // Continued by the next answer (it starts inside the cache), a partial batch at
        // its end left out.
        let mut next = run(&[(20, 29), (30, 39)]).to_vec();
        next.extend_from_slice(&batch(40, 49, 100)[..70]);
        c.fill("t", 0, &answer(&Bytes::from(next), 40));
        assert_eq!(hit(&mut c, 35), Some(vec![(30, 39)]));
        assert!(matches!(c.serve("t", 0, Position::at(40), 1 << 20), Serve::Tail { .. }));
        assert!(matches!(c.serve("t", 0, Position::at(41), 1 << 20), Serve::Miss), "past the high watermark");
        assert!(matches!(c.serve("t", 1, Position::at(0), 1 << 20), Serve::Miss), "another partition");
    }

    #[test]
    fn a_last_fetched_epoch_is_served_only_when_the_batch_before_matches_it() {
        let mut c = cache();
        c.fill("t", 0, &answer(&run(&[(0, 9), (10, 19)]), 30));
        let at = |offset, epoch| Position { offset, last_fetched_epoch: epoch, committed: false };
        assert!(matches!(c.serve("t", 0, at(10, 3), 1 << 20), Serve::Hit { .. }), "batch 0..9 has epoch 3");
        assert!(matches!(c.serve("t", 0, at(20, 3), 1 << 20), Serve::Miss), "past what is cached");
        assert!(matches!(c.serve("t", 0, at(10, 2), 1 << 20), Serve::Miss), "another epoch: the broker decides");
        assert!(matches!(c.serve("t", 0, at(5, 3), 1 << 20), Serve::Miss), "no batch ends right before 5");
    }

    #[test]
    fn read_committed_is_served_below_the_last_stable_offset_and_never_from_transactions() {
        let mut c = cache();
        let committed = |offset| Position { offset, last_fetched_epoch: -1, committed: true };
        let mut txn = batch(20, 29, 100);
        txn[ATTRIBUTES_AT + 1] |= 0x10;
        let mut recs = run(&[(0, 9), (10, 19)]).to_vec();
        recs.extend(txn);
        let recs = Bytes::from(recs);
        c.fill("t", 0, &Answer { lso: 10, ..answer(&recs, 30) });
        assert!(
            matches!(c.serve("t", 0, committed(0), 1 << 20), Serve::Hit { records, .. } if batches(&records).len() == 1)
        );
        assert!(matches!(c.serve("t", 0, committed(10), 1 << 20), Serve::Tail { .. }), "the last stable offset");
        assert!(
            matches!(c.serve("t", 0, Position::at(10), 1 << 20), Serve::Hit { .. }),
            "read_uncommitted: the watermark"
        );
        let empty = Bytes::new();
        c.fill("t", 0, &Answer { lso: 30, ..answer(&empty, 30) });
        assert!(
            matches!(c.serve("t", 0, committed(10), 1 << 20), Serve::Hit { records, .. } if batches(&records).len() == 1),
            "up to the transaction"
        );
        assert!(matches!(c.serve("t", 0, committed(20), 1 << 20), Serve::Miss), "a transactional batch goes upstream");
    }

    #[test]
    fn nothing_at_or_above_the_high_watermark_is_served() {
        let mut c = cache();
        // Batches the upstream had but had not committed (acks=1 above the watermark).
        c.fill("t", 0, &answer(&run(&[(0, 9), (10, 19)]), 10));
        assert_eq!(hit(&mut c, 0), Some(vec![(0, 9)]), "only the batch below the watermark");
        assert!(matches!(c.serve("t", 0, Position::at(10), 1 << 20), Serve::Tail { .. }));
        c.fill("t", 0, &answer(&Bytes::new(), 20));
        assert_eq!(hit(&mut c, 10), Some(vec![(10, 19)]), "served once the watermark passed it");
    }

    #[test]
    fn a_leader_epoch_change_drops_the_partition() {
        let mut c = cache();
        c.observe_topic("t", None, &[(0, 5)]);
        c.fill("t", 0, &answer(&run(&[(0, 9)]), 10));
        assert!(hit(&mut c, 0).is_some());
        c.observe_topic("t", None, &[(0, 5)]);
        assert!(hit(&mut c, 0).is_some(), "the same epoch keeps it");
        c.observe_topic("t", None, &[(0, 6)]);
        assert!(hit(&mut c, 0).is_none(), "a new leader epoch drops it");
        // The same through a fetch answer's CurrentLeader.
        c.fill("t", 0, &answer(&run(&[(0, 9)]), 10));
        let empty = Bytes::new();
        c.fill("t", 0, &Answer { leader_epoch: Some(7), ..answer(&empty, 10) });
        assert!(hit(&mut c, 0).is_none());
        assert_eq!(c.stats().dropped_partitions, 2);
    }

    #[test]
    fn truncation_errors_and_diverging_epochs_drop_the_partition() {
        let empty = Bytes::new();
        for bad in [
            Answer { hw: 5, ..answer(&empty, 0) },            // watermark went backwards
            Answer { error_code: 6, ..answer(&empty, 10) },   // NOT_LEADER_OR_FOLLOWER
            Answer { error_code: 1, ..answer(&empty, 10) },   // OFFSET_OUT_OF_RANGE
            Answer { diverging: true, ..answer(&empty, 10) }, // the fetcher's log diverged
        ] {
            let mut c = cache();
            c.fill("t", 0, &answer(&run(&[(0, 9)]), 10));
            assert!(hit(&mut c, 0).is_some());
            c.fill("t", 0, &bad);
            assert!(hit(&mut c, 0).is_none());
        }
        // An answer overlapping the cache without matching its batch boundaries.
        let mut c = cache();
        c.fill("t", 0, &answer(&run(&[(0, 9)]), 20));
        c.fill("t", 0, &answer(&run(&[(5, 14)]), 20));
        assert_eq!(hit(&mut c, 0), None, "what did not match is gone");
        assert_eq!(hit(&mut c, 5), Some(vec![(5, 14)]), "the upstream's run replaced it");
    }

    #[test]
    fn a_log_start_moving_past_batches_drops_them() {
        let mut c = cache();
        c.fill("t", 0, &answer(&run(&[(0, 9), (10, 19), (20, 29)]), 30));
        let empty = Bytes::new();
        c.fill("t", 0, &Answer { log_start: 15, ..answer(&empty, 30) });
        assert!(hit(&mut c, 0).is_none(), "below the log start");
        assert!(hit(&mut c, 12).is_none(), "below the log start, in a batch that still holds later offsets");
        assert_eq!(hit(&mut c, 15), Some(vec![(10, 19), (20, 29)]));
    }

    #[test]
    fn a_deleted_or_recreated_topic_is_forgotten() {
        let mut c = cache();
        c.observe_topic("t", Some([1; 16]), &[]);
        c.fill("t", 0, &answer(&run(&[(0, 9)]), 10));
        assert_eq!(c.topic_of(&[1; 16]), Some("t"));
        c.observe_topic("t", Some([1; 16]), &[]);
        assert!(hit(&mut c, 0).is_some());
        c.observe_topic("t", Some([2; 16]), &[]);
        assert!(hit(&mut c, 0).is_none(), "a new topic id: recreated");
        assert_eq!(c.topic_of(&[2; 16]), Some("t"));
        c.fill("t", 0, &answer(&run(&[(0, 9)]), 10));
        c.drop_topic("t");
        assert!(hit(&mut c, 0).is_none());
        assert_eq!(c.stats().held_bytes, 0);
    }

    #[test]
    fn a_gap_ahead_replaces_the_cache_and_older_answers_add_nothing() {
        let mut c = cache();
        c.fill("t", 0, &answer(&run(&[(100, 109)]), 110));
        c.fill("t", 0, &answer(&run(&[(0, 9)]), 110));
        assert_eq!(hit(&mut c, 0), None, "an older run: not cached");
        assert!(hit(&mut c, 100).is_some(), "what was cached stays");
        c.fill("t", 0, &answer(&run(&[(200, 209)]), 210));
        assert!(hit(&mut c, 100).is_none() && hit(&mut c, 200).is_some(), "a run after a gap replaces it");
    }

    #[test]
    fn watches_end_with_their_answer_or_their_deadline() {
        let mut c = cache();
        let now = std::time::Instant::now();
        let later = now + std::time::Duration::from_secs(1);
        assert!(!c.watched("t", 0, now));
        c.watch("t", 0, later);
        c.watch("t", 0, later);
        assert!(c.watched("t", 0, now));
        assert!(!c.watched("t", 0, later), "overdue");
        c.release("t", 0);
        assert!(c.watched("t", 0, now), "one still in flight");
        c.release("t", 0);
        assert!(!c.watched("t", 0, now));
        c.release("t", 0);
        assert!(!c.watched("t", 0, now), "more answers than fetches: no harm");
    }

    #[test]
    fn memory_is_bounded_and_the_coldest_partition_loses_first() {
        // 64 KiB blocks, 128 KiB per partition, 256 KiB in all.
        let mut c =
            TailCache::new(CacheLimits { total_bytes: 256 << 10, partition_bytes: 128 << 10, block_bytes: 64 << 10 });
        let big = |base: i64| Bytes::from(batch(base, base, 30_000));
        // One partition: each block holds two batches; the third block evicts the first.
        for i in 0..6 {
            c.fill("t", 0, &answer(&big(i), i + 1));
        }
        assert!(c.stats().held_bytes <= 128 << 10);
        assert!(hit(&mut c, 0).is_none() && hit(&mut c, 5).is_some(), "the oldest went");
        // Three more partitions: the total bound holds, and the partition read last keeps
        // its data while colder ones lose theirs.
        for p in 1..4 {
            for i in 0..4 {
                c.fill("t", p, &answer(&big(i), i + 1));
            }
        }
        assert!(c.stats().held_bytes <= 256 << 10, "{:?}", c.stats());
        assert!(c.stats().evicted_bytes > 0);
        assert!(
            matches!(c.serve("t", 3, Position::at(3), 1 << 20), Serve::Hit { .. }),
            "the newest partition is whole"
        );
        // A batch larger than a partition may hold is not cached at all.
        c.fill("t", 9, &answer(&Bytes::from(batch(0, 0, 200_000)), 1));
        assert!(matches!(c.serve("t", 9, Position::at(0), 1 << 20), Serve::Miss));
    }
}
