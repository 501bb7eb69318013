//! Kafka RecordBatch (magic 2) headers, parsed checked.
//!
//! The log stores batches byte for byte as produced; the broker only reads the fixed
//! 61-byte header, checks the CRC-32C, and patches the base offset (outside the CRC) and,
//! for `LogAppendTime` topics, the timestamp type and max timestamp (CRC recomputed).

use thiserror::Error;

/// Size of the fixed RecordBatch v2 header.
pub const HEADER_LEN: usize = 61;
/// baseOffset (8) + batchLength (4): the part not counted in batchLength.
pub const LOG_OVERHEAD: usize = 12;
const CRC_OFFSET: usize = 17;
const ATTRIBUTES_OFFSET: usize = 21;
const MAX_TIMESTAMP_OFFSET: usize = 35;
/// Attribute bit: timestamps are LogAppendTime.
pub const TIMESTAMP_TYPE_BIT: i16 = 0x08;
/// Attribute bits naming the compression codec (0: none).
pub const COMPRESSION_MASK: i16 = 0x07;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BatchError {
    #[error("truncated batch: {have} bytes where {need} are needed")]
    Truncated { have: usize, need: usize },
    #[error("invalid batch length {0}")]
    BadLength(i32),
    #[error("unsupported record batch magic {0} (only v2 is stored)")]
    BadMagic(i8),
    #[error("CRC-32C mismatch: header says {stored:#010x}, bytes give {computed:#010x}")]
    Crc { stored: u32, computed: u32 },
    #[error("batch claims {0} records")]
    BadRecordCount(i32),
}

/// The fixed header of one RecordBatch v2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    pub base_offset: i64,
    pub batch_length: i32,
    pub magic: i8,
    pub crc: u32,
    pub attributes: i16,
    pub last_offset_delta: i32,
    pub base_timestamp: i64,
    pub max_timestamp: i64,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub records_count: i32,
}

fn be_i64(b: &[u8], at: usize) -> i64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    i64::from_be_bytes(a)
}
fn be_i32(b: &[u8], at: usize) -> i32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    i32::from_be_bytes(a)
}
fn be_i16(b: &[u8], at: usize) -> i16 {
    i16::from_be_bytes([b[at], b[at + 1]])
}

impl BatchHeader {
    /// Parses the header at the start of `buf` without checking the CRC. Checks that the
    /// whole batch (as its length says) lies within `buf`.
    pub fn parse(buf: &[u8]) -> Result<BatchHeader, BatchError> {
        if buf.len() < HEADER_LEN {
            return Err(BatchError::Truncated { have: buf.len(), need: HEADER_LEN });
        }
        let batch_length = be_i32(buf, 8);
        if batch_length < (HEADER_LEN - LOG_OVERHEAD) as i32 {
            return Err(BatchError::BadLength(batch_length));
        }
        let magic = buf[16] as i8;
        if magic != 2 {
            return Err(BatchError::BadMagic(magic));
        }
        let total = LOG_OVERHEAD + batch_length as usize;
        if buf.len() < total {
            return Err(BatchError::Truncated { have: buf.len(), need: total });
        }
        let h = BatchHeader {
            base_offset: be_i64(buf, 0),
            batch_length,
            magic,
            crc: be_i32(buf, CRC_OFFSET) as u32,
            attributes: be_i16(buf, ATTRIBUTES_OFFSET),
            last_offset_delta: be_i32(buf, 23),
            base_timestamp: be_i64(buf, 27),
            max_timestamp: be_i64(buf, MAX_TIMESTAMP_OFFSET),
            producer_id: be_i64(buf, 43),
            producer_epoch: be_i16(buf, 51),
            base_sequence: be_i32(buf, 53),
            records_count: be_i32(buf, 57),
        };
        if h.records_count < 0 || h.last_offset_delta < 0 {
            return Err(BatchError::BadRecordCount(h.records_count));
        }
        Ok(h)
    }

    /// Parses and verifies the CRC-32C over attributes..end.
    pub fn parse_checked(buf: &[u8]) -> Result<BatchHeader, BatchError> {
        let h = Self::parse(buf)?;
        let computed = crc32c::crc32c(&buf[ATTRIBUTES_OFFSET..h.total_len()]);
        if computed != h.crc {
            return Err(BatchError::Crc { stored: h.crc, computed });
        }
        Ok(h)
    }

    /// Length of the whole batch including the 12-byte log overhead.
    pub fn total_len(&self) -> usize {
        LOG_OVERHEAD + self.batch_length as usize
    }

    /// Offsets this batch occupies (a compacted batch may hold fewer records).
    pub fn offset_count(&self) -> i64 {
        self.last_offset_delta as i64 + 1
    }

    pub fn last_offset(&self) -> i64 {
        self.base_offset + self.last_offset_delta as i64
    }
}

/// Reads a zig-zag varint (Kafka record fields); `None` if truncated or over-long.
fn varint(buf: &[u8], pos: &mut usize) -> Option<i64> {
    let mut v: u64 = 0;
    for shift in (0..70).step_by(7) {
        let b = *buf.get(*pos)?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some((v >> 1) as i64 ^ -((v & 1) as i64));
        }
    }
    None
}

/// The offset of the first record in `batch` whose timestamp is at or after `ts`
/// (ListOffsets by time). Uncompressed CreateTime batches are searched record by record;
/// for compressed or LogAppendTime batches (one timestamp for all) the batch's base
/// offset is the answer, as it is for anything that does not parse.
pub fn first_offset_at_or_after(batch: &[u8], h: &BatchHeader, ts: i64) -> i64 {
    if h.attributes & (COMPRESSION_MASK | TIMESTAMP_TYPE_BIT) != 0 {
        return h.base_offset;
    }
    let mut pos = HEADER_LEN;
    for _ in 0..h.records_count {
        let Some(len) = varint(batch, &mut pos) else { break };
        let start = pos;
        let mut p = pos + 1; // attributes
        let (Some(ts_delta), Some(off_delta)) = (varint(batch, &mut p), varint(batch, &mut p)) else { break };
        if h.base_timestamp.saturating_add(ts_delta) >= ts {
            return h.base_offset + off_delta;
        }
        let Some(next) = usize::try_from(len).ok().and_then(|l| start.checked_add(l)) else { break };
        pos = next;
    }
    h.base_offset
}

/// Calls `f` with each record value of an uncompressed batch, in order; stops quietly at
/// anything that does not parse. Returns how many values it saw.
pub fn for_each_value(batch: &[u8], h: &BatchHeader, mut f: impl FnMut(&[u8])) -> usize {
    if h.attributes & COMPRESSION_MASK != 0 {
        return 0;
    }
    let mut pos = HEADER_LEN;
    let mut seen = 0;
    for _ in 0..h.records_count {
        let Some(len) = varint(batch, &mut pos) else { break };
        let Some(end) = usize::try_from(len).ok().and_then(|l| pos.checked_add(l)).filter(|e| *e <= batch.len()) else {
            break;
        };
        let mut p = pos + 1; // attributes
        let parsed = (|| {
            varint(batch, &mut p)?; // timestamp delta
            varint(batch, &mut p)?; // offset delta
            let key_len = varint(batch, &mut p)?;
            if key_len > 0 {
                p = p.checked_add(key_len as usize)?;
            }
            let value_len = usize::try_from(varint(batch, &mut p)?).ok()?;
            batch.get(p..p.checked_add(value_len)?)
        })();
        let Some(value) = parsed.filter(|_| p <= end) else { break };
        f(value);
        seen += 1;
        pos = end;
    }
    seen
}

/// Iterates the batches of a produce payload (or a log region), checking each CRC.
pub fn split_checked(mut buf: &[u8]) -> Result<Vec<BatchHeader>, BatchError> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let h = BatchHeader::parse_checked(buf)?;
        buf = &buf[h.total_len()..];
        out.push(h);
    }
    Ok(out)
}

/// Writes the base offset of a batch in place (outside the CRC).
pub fn set_base_offset(batch: &mut [u8], base_offset: i64) {
    batch[0..8].copy_from_slice(&base_offset.to_be_bytes());
}

/// Stamps LogAppendTime on a batch's header (`head`, [`HEADER_LEN`] bytes) whose records
/// are `rest`: sets the timestamp-type bit, max timestamp := `now_ms`, and recomputes the
/// CRC (both fields are inside it, and so are the records).
pub fn set_log_append_time(head: &mut [u8], rest: &[u8], now_ms: i64) {
    let attrs = be_i16(head, ATTRIBUTES_OFFSET) | TIMESTAMP_TYPE_BIT;
    head[ATTRIBUTES_OFFSET..ATTRIBUTES_OFFSET + 2].copy_from_slice(&attrs.to_be_bytes());
    head[MAX_TIMESTAMP_OFFSET..MAX_TIMESTAMP_OFFSET + 8].copy_from_slice(&now_ms.to_be_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&head[ATTRIBUTES_OFFSET..HEADER_LEN]), rest);
    head[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_be_bytes());
}

/// Builds an uncompressed RecordBatch v2 (for tests, benches and internal use).
pub fn build_batch(base_offset: i64, timestamp_ms: i64, values: &[&[u8]]) -> Vec<u8> {
    fn varint(out: &mut Vec<u8>, v: i64) {
        let mut z = ((v << 1) ^ (v >> 63)) as u64;
        loop {
            if z < 0x80 {
                out.push(z as u8);
                return;
            }
            out.push((z as u8 & 0x7f) | 0x80);
            z >>= 7;
        }
    }
    let mut records = Vec::new();
    for (i, v) in values.iter().enumerate() {
        let mut r = Vec::new();
        r.push(0u8); // attributes
        varint(&mut r, i as i64); // timestamp delta: record i is i ms after the first
        varint(&mut r, i as i64); // offset delta
        varint(&mut r, -1); // key: null
        varint(&mut r, v.len() as i64);
        r.extend_from_slice(v);
        varint(&mut r, 0); // headers
        varint(&mut records, r.len() as i64);
        records.extend_from_slice(&r);
    }
    let mut b = Vec::with_capacity(HEADER_LEN + records.len());
    b.extend_from_slice(&base_offset.to_be_bytes());
    b.extend_from_slice(&((HEADER_LEN - LOG_OVERHEAD + records.len()) as i32).to_be_bytes());
    b.extend_from_slice(&0i32.to_be_bytes()); // partition leader epoch
    b.push(2); // magic
    b.extend_from_slice(&0u32.to_be_bytes()); // crc placeholder
    b.extend_from_slice(&0i16.to_be_bytes()); // attributes
    b.extend_from_slice(&((values.len() as i32 - 1).max(0)).to_be_bytes());
    b.extend_from_slice(&timestamp_ms.to_be_bytes());
    b.extend_from_slice(&(timestamp_ms + (values.len() as i64 - 1).max(0)).to_be_bytes());
    b.extend_from_slice(&(-1i64).to_be_bytes()); // producer id
    b.extend_from_slice(&(-1i16).to_be_bytes()); // producer epoch
    b.extend_from_slice(&(-1i32).to_be_bytes()); // base sequence
    b.extend_from_slice(&(values.len() as i32).to_be_bytes());
    b.extend_from_slice(&records);
    let crc = crc32c::crc32c(&b[ATTRIBUTES_OFFSET..]);
    b[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_be_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_it_builds() {
        let b = build_batch(0, 1234, &[b"a", b"bb", b"ccc"]);
        let h = BatchHeader::parse_checked(&b).unwrap();
        assert_eq!(h.records_count, 3);
        assert_eq!(h.last_offset_delta, 2);
        assert_eq!(h.total_len(), b.len());
    }

    #[test]
    fn detects_corruption_and_truncation() {
        let mut b = build_batch(0, 1, &[b"hello"]);
        let n = b.len();
        assert!(matches!(BatchHeader::parse_checked(&b[..n - 1]), Err(BatchError::Truncated { .. })));
        b[n - 2] ^= 0xff;
        assert!(matches!(BatchHeader::parse_checked(&b), Err(BatchError::Crc { .. })));
        b[16] = 1;
        assert_eq!(BatchHeader::parse(&b), Err(BatchError::BadMagic(1)));
    }

    #[test]
    fn base_offset_patch_keeps_crc_and_append_time_refreshes_it() {
        let mut b = build_batch(0, 1, &[b"x"]);
        set_base_offset(&mut b, 42);
        assert_eq!(BatchHeader::parse_checked(&b).unwrap().base_offset, 42);
        let (head, rest) = b.split_at_mut(HEADER_LEN);
        set_log_append_time(head, rest, 99);
        let h = BatchHeader::parse_checked(&b).unwrap();
        assert_eq!(h.max_timestamp, 99);
        assert!(h.attributes & TIMESTAMP_TYPE_BIT != 0);
    }

    #[test]
    fn timestamp_search_finds_the_record_inside_a_batch() {
        let mut b = build_batch(0, 1000, &[b"a", b"b", b"c", b"d"]);
        set_base_offset(&mut b, 40);
        let h = BatchHeader::parse_checked(&b).unwrap();
        assert_eq!(h.max_timestamp, 1003);
        assert_eq!(first_offset_at_or_after(&b, &h, 0), 40);
        assert_eq!(first_offset_at_or_after(&b, &h, 1002), 42);
        assert_eq!(first_offset_at_or_after(&b, &h, 1003), 43);
        // Damaged record bytes fall back to the batch start instead of panicking.
        let n = b.len();
        for cut in HEADER_LEN..n {
            let _ = first_offset_at_or_after(&b[..cut], &h, 1003);
        }
    }

    #[test]
    fn values_come_back_in_order() {
        let b = build_batch(0, 1, &[b"one", b"", b"three"]);
        let h = BatchHeader::parse_checked(&b).unwrap();
        let mut got = Vec::new();
        assert_eq!(for_each_value(&b, &h, |v| got.push(v.to_vec())), 3);
        assert_eq!(got, vec![b"one".to_vec(), vec![], b"three".to_vec()]);
        for cut in 0..b.len() {
            let _ = for_each_value(&b[..cut], &h, |_| {});
        }
    }

    #[test]
    fn garbage_never_panics() {
        for len in 0..200 {
            let junk: Vec<u8> = (0..len).map(|i| (i * 37 % 251) as u8).collect();
            let _ = split_checked(&junk);
        }
    }
}
