//! A core's partitions: the logs it owns, and the operations other cores ask it to run.

use bytes::Bytes;
use std::collections::hash_map::Entry;
use std::collections::HashMap;

use super::{Broker, PartKey};
use crate::log::{AppendInfo, Files, FlushPolicy, LogError, PartitionLog, ReadResult};

/// An operation on one partition, run by its owner core.
#[derive(Debug)]
pub enum PartOp {
    Append {
        records: Bytes,
    },
    /// Whole batches from `offset`; may wait on the disk for pages not in memory (admin
    /// reads, lookups: rare, and they need the bytes).
    Read {
        offset: i64,
        max_bytes: usize,
    },
    /// A consumer's read: never waits on the disk. Pages not in memory give an empty
    /// result marked `cold`; the file worker brings them in and the notifier wakes the
    /// readers, whose next read finds them ([`super::PartitionShared::warmed`]).
    ReadResident {
        offset: i64,
        max_bytes: usize,
    },
    OffsetForTime {
        timestamp: i64,
    },
}

/// The answer to a [`PartOp`].
#[derive(Debug)]
pub enum PartResult {
    /// The append and the log start offset after it.
    Appended(AppendInfo, i64),
    Read(ReadResult),
    Offset(Option<i64>),
    /// The partition (or its topic) does not exist (any more).
    Unknown,
    /// The log refused; the high watermark and log start are given for the response.
    Failed {
        error: LogError,
        high_watermark: i64,
        log_start: i64,
    },
}

/// The partitions one core owns. Not shared: no lock.
pub struct Shard {
    logs: HashMap<PartKey, PartitionLog>,
    /// Where the logs' background file work goes.
    files: Files,
    /// Something was appended since [`Shard::take_appended`] last looked: parked fetches
    /// may now be answerable. The core notifies once per loop turn, not once per append
    /// (a produce to many partitions would otherwise wake parked cores again and again).
    appended: bool,
}

impl Shard {
    pub fn new(files: Files) -> Shard {
        Shard { logs: HashMap::new(), files, appended: false }
    }

    /// Whether anything was appended since the last call.
    pub fn take_appended(&mut self) -> bool {
        std::mem::take(&mut self.appended)
    }

    pub fn adopt(&mut self, key: PartKey, log: PartitionLog) {
        self.logs.insert(key, log);
    }

    /// Runs `op` on the partition `key`, opening its log on first use.
    pub fn execute(&mut self, broker: &Broker, key: PartKey, op: PartOp) -> PartResult {
        let Some(topic) = broker.topic_by_id(key.topic_id) else { return PartResult::Unknown };
        let Some(shared) = topic.shared(key.partition).cloned() else { return PartResult::Unknown };
        let log = match self.logs.entry(key) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                match PartitionLog::open(&topic.partition_dir(key.partition), topic.log.clone(), self.files.clone()) {
                    Ok((log, _)) => {
                        shared.publish(&log, 0);
                        e.insert(log)
                    }
                    Err(error) => return PartResult::Failed { error, high_watermark: -1, log_start: -1 },
                }
            }
        };
        let fail = |error, log: &PartitionLog| PartResult::Failed {
            error,
            high_watermark: log.next_offset(),
            log_start: log.log_start_offset(),
        };
        match op {
            PartOp::Append { records } => match log.append(&records) {
                Ok(info) => {
                    if !info.duplicate {
                        shared.publish(log, records.len() as u64);
                        self.appended = true;
                    }
                    PartResult::Appended(info, log.log_start_offset())
                }
                Err(e) => fail(e, log),
            },
            PartOp::Read { offset, max_bytes } => match log.read(offset, max_bytes) {
                Ok(r) => {
                    shared.count_read(r.records.bytes().len());
                    PartResult::Read(r)
                }
                Err(e) => fail(e, log),
            },
            PartOp::ReadResident { offset, max_bytes } => match log.read_resident(offset, max_bytes) {
                Ok((r, cold)) => {
                    if let Some(cold) = cold.filter(|_| shared.begin_warming()) {
                        let shared = shared.clone();
                        // Dropped: the worker's notification, not this handle, wakes the readers.
                        let _ = self.files.run(move || {
                            if let Err(e) = cold.populate() {
                                log::warn!("bringing log pages into memory: {e}");
                            }
                            shared.end_warming();
                        });
                    }
                    shared.count_read(r.records.bytes().len());
                    PartResult::Read(r)
                }
                Err(e) => fail(e, log),
            },
            PartOp::OffsetForTime { timestamp } => PartResult::Offset(log.offset_for_time(timestamp)),
        }
    }

    /// Periodic upkeep: background flushes, retention, spare segments, dropping logs of
    /// deleted topics. The file work goes to the file worker.
    pub fn housekeeping(&mut self, broker: &Broker, now_ms: i64, retention: bool) {
        self.logs.retain(|key, _| broker.topic_by_id(key.topic_id).is_some());
        for (key, log) in self.logs.iter_mut() {
            if matches!(log.config().flush, FlushPolicy::Interval(_)) {
                log.schedule_flush();
            }
            if retention && log.enforce_retention(now_ms) > 0 {
                if let Some(shared) = broker.topic_by_id(key.topic_id).and_then(|t| t.shared(key.partition).cloned()) {
                    shared.publish(log, 0);
                }
                log::info!(
                    "retention: partition {} of topic {} now starts at {}",
                    key.partition,
                    key.topic_id,
                    log.log_start_offset()
                );
            }
            log.prepare_spare();
        }
    }

    /// Flushes every log (shutdown; their queued file work is the worker's to finish).
    pub fn close(&mut self) {
        for log in self.logs.values_mut() {
            if let Err(e) = log.close() {
                log::error!("flushing a log at shutdown: {e}");
            }
        }
    }
}
