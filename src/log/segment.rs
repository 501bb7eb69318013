//! A segment's metadata: where its bytes are (the mapping), how many are valid, the
//! offsets and timestamps it holds, and its sparse offset and time indexes (kept in memory,
//! written as `.index`/`.timeindex` files when the segment is sealed).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::batch::BatchHeader;
use super::mmap::SegmentMap;

/// A sealed or active segment's metadata; the bytes are in `map`.
pub(super) struct Segment {
    pub(super) base_offset: i64,
    pub(super) map: Arc<SegmentMap>,
    /// Valid bytes.
    pub(super) size: usize,
    /// Exclusive end offset.
    pub(super) next_offset: i64,
    pub(super) max_timestamp: i64,
    /// (relative offset, position), ascending.
    pub(super) index: Vec<(u32, u32)>,
    /// (max timestamp so far, relative offset), both ascending.
    pub(super) time_index: Vec<(i64, u32)>,
    pub(super) bytes_since_index: usize,
}

impl Segment {
    pub(super) fn empty(base_offset: i64, map: Arc<SegmentMap>) -> Segment {
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

    pub(super) fn file_stem(dir: &Path, base_offset: i64) -> PathBuf {
        dir.join(format!("{base_offset:020}"))
    }

    /// Records a batch at `pos` in the in-memory indexes.
    pub(super) fn note_batch(&mut self, h: &BatchHeader, pos: usize, interval: usize) {
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
    pub(super) fn write_indexes(&self, dir: &Path) -> io::Result<()> {
        let stem = Self::file_stem(dir, self.base_offset);
        let (idx, tidx) = self.index_files();
        fs::write(stem.with_extension("index"), idx)?;
        fs::write(stem.with_extension("timeindex"), tidx)
    }

    /// The bytes of the `.index` and `.timeindex` files.
    pub(super) fn index_files(&self) -> (Vec<u8>, Vec<u8>) {
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
    /// Where the walk to `offset`'s batch starts: the index entry at or below it.
    pub(super) fn index_position(&self, offset: i64) -> usize {
        let rel = (offset - self.base_offset) as u32;
        let i = self.index.partition_point(|(r, _)| *r <= rel);
        if i == 0 {
            0
        } else {
            self.index[i - 1].1 as usize
        }
    }

    pub(super) fn locate(&self, offset: i64) -> Option<(usize, BatchHeader)> {
        let mut pos = self.index_position(offset);
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
