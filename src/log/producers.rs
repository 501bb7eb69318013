//! Idempotent producers: per producer id, the epoch, the last sequence and the last few
//! batches (for duplicate detection), rebuilt at start from the newest producer snapshot
//! (written at each segment roll) and a walk of the active segment.

use std::collections::VecDeque;
use std::fs;
use std::io;

use super::batch::BatchHeader;
use super::{LogError, PartitionLog, Segment};

/// Idempotent-producer state of one producer id on one partition.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct ProducerState {
    epoch: i16,
    last_sequence: i32,
    /// (first sequence, last sequence, base offset) of the last few batches, for dedup.
    recent: VecDeque<(i32, i32, i64)>,
}

impl PartitionLog {
    pub(super) fn rebuild_producer_state(&mut self) {
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

    pub(super) fn record_producer(&mut self, h: &BatchHeader, base_offset: i64) {
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
    pub(super) fn check_sequence(&self, h: &BatchHeader) -> Result<Option<i64>, LogError> {
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
}
