//! Broker state: the topic catalog, the per-core partition shards, the group coordinator
//! and the producer-id allocator.
//!
//! Thread-per-core ownership: every partition belongs to one core (its *owner*, a pure
//! function of the partition key and the core count). Only the owner touches the
//! partition's [`PartitionLog`], held in its [`shard::Shard`] without a lock; other cores
//! send it [`shard::PartOp`]s. What every core may read without asking — the catalog and
//! each partition's offsets and byte count — is published lock-free: the catalog through
//! an [`ArcSwap`], the offsets through atomics in [`PartitionShared`].
//!
//! # Invariants
//! - A partition's log is opened, appended to, read and closed only by its owner core.
//! - Topics live in `topics/<topic id>/` so that a topic deleted and re-created under the
//!   same name never shares files with a log its old owner has not dropped yet.
//! - The methods that touch files (topic creation and deletion, partition creation,
//!   producer-id blocks, offset commits) are for the file worker ([`Broker::files`]),
//!   never a dispatch core; the protocols hand such requests to it and park.

pub mod acl;
pub mod groups;
pub mod offsets;
pub mod shard;
pub mod users;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use thiserror::Error;
use uuid::Uuid;

use crate::log::{Files, LogConfig, LogError, PartitionLog};
use crate::wake::Wake;
use groups::{Committed, GroupError};
use offsets::OffsetStore;
use shard::Shard;

#[derive(Debug, Error)]
pub enum BrokerError {
    #[error("invalid topic name '{0}'")]
    InvalidTopic(String),
    #[error("topic '{0}' already exists")]
    TopicExists(String),
    #[error("topic '{0}' does not exist")]
    UnknownTopic(String),
    #[error("invalid partition count {0}")]
    InvalidPartitions(i32),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("I/O error on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Users(#[from] users::UsersError),
    #[error(transparent)]
    Acl(#[from] acl::AclError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> BrokerError + '_ {
    move |source| BrokerError::Io { path: path.to_path_buf(), source }
}

/// Settings the broker needs at run time (from the command line / config file).
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    pub node_id: i32,
    pub cluster_id: String,
    pub data_dir: PathBuf,
    pub default_partitions: i32,
    pub auto_create_topics: bool,
    pub log: LogConfig,
    pub max_request_bytes: usize,
    pub group_initial_rebalance_delay_ms: u64,
    /// Close connections with nothing in flight that sent or received nothing for this
    /// long (Kafka's `connections.max.idle.ms`).
    pub connections_max_idle: std::time::Duration,
    /// Whether and how ACLs are enforced.
    pub authorizer: acl::AuthorizerSettings,
}

/// Per-topic settings persisted in `topic.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TopicMeta {
    pub name: String,
    pub id: Uuid,
    pub partitions: i32,
    #[serde(default)]
    pub configs: HashMap<String, String>,
}

/// Identifies a partition across the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PartKey {
    pub topic_id: Uuid,
    pub partition: i32,
}

/// What any core may read about a partition without asking its owner. Updated by the
/// owner after each append and retention pass.
#[derive(Debug, Default)]
pub struct PartitionShared {
    next_offset: AtomicI64,
    log_start: AtomicI64,
    /// Bytes ever appended (for long-poll fetches waiting on `min_bytes`).
    appended: AtomicU64,
    /// Record bytes read out for fetches and pulls since the broker started.
    read: AtomicU64,
    /// Pages of this partition are being brought into memory for a reader (one span at a
    /// time), and how many such spans were brought in: a read parked on cold pages waits
    /// for the count to move.
    warming: std::sync::atomic::AtomicBool,
    warmed: AtomicU64,
}

impl PartitionShared {
    pub fn next_offset(&self) -> i64 {
        self.next_offset.load(Ordering::Acquire)
    }
    pub fn log_start(&self) -> i64 {
        self.log_start.load(Ordering::Acquire)
    }
    pub fn appended(&self) -> u64 {
        self.appended.load(Ordering::Acquire)
    }
    pub fn read_bytes(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }
    pub fn warmed(&self) -> u64 {
        self.warmed.load(Ordering::Acquire)
    }
    /// Claims the bringing-in of pages; false if a span is already on its way.
    pub(crate) fn begin_warming(&self) -> bool {
        !self.warming.swap(true, Ordering::AcqRel)
    }
    pub(crate) fn end_warming(&self) {
        self.warmed.fetch_add(1, Ordering::AcqRel);
        self.warming.store(false, Ordering::Release);
    }
    pub(crate) fn count_read(&self, bytes: usize) {
        self.read.fetch_add(bytes as u64, Ordering::Relaxed);
    }
    pub(crate) fn publish(&self, log: &PartitionLog, added_bytes: u64) {
        self.log_start.store(log.log_start_offset(), Ordering::Release);
        self.appended.fetch_add(added_bytes, Ordering::AcqRel);
        self.next_offset.store(log.next_offset(), Ordering::Release);
    }
}

pub struct Topic {
    pub meta: TopicMeta,
    pub dir: PathBuf,
    pub log: LogConfig,
    pub partitions: Vec<Arc<PartitionShared>>,
}

impl Topic {
    pub fn name(&self) -> &str {
        &self.meta.name
    }
    pub fn key(&self, partition: i32) -> Option<PartKey> {
        (partition >= 0 && partition < self.meta.partitions).then_some(PartKey { topic_id: self.meta.id, partition })
    }
    pub fn shared(&self, partition: i32) -> Option<&Arc<PartitionShared>> {
        usize::try_from(partition).ok().and_then(|i| self.partitions.get(i))
    }
    pub fn partition_dir(&self, partition: i32) -> PathBuf {
        self.dir.join(partition.to_string())
    }
}

/// The set of topics, replaced whole on every change (read far more often than written).
#[derive(Default, Clone)]
pub struct Catalog {
    by_name: HashMap<String, Arc<Topic>>,
    by_id: HashMap<Uuid, Arc<Topic>>,
}

impl Catalog {
    fn insert(&mut self, t: Arc<Topic>) {
        self.by_id.insert(t.meta.id, t.clone());
        self.by_name.insert(t.meta.name.clone(), t);
    }
}

/// A core's waker and its has-parked-work flag.
type CoreHandle = (Arc<dyn Wake>, Arc<AtomicBool>);

/// Wakes the cores that have parked requests (long-poll fetches, joins) when something
/// they wait for may have happened.
#[derive(Default)]
pub struct Notifier {
    cores: OnceLock<Vec<CoreHandle>>,
    /// Waiters outside the loop (the RocketMQ gRPC front's long polls), woken every time.
    listeners: parking_lot::RwLock<Vec<Arc<dyn Wake>>>,
    epoch: AtomicU64,
}

impl Notifier {
    /// Installs the cores, once, before they start.
    pub fn install(&self, cores: Vec<CoreHandle>) {
        if self.cores.set(cores).is_err() {
            log::error!("notifier installed twice");
        }
    }

    /// Adds a waiter outside the loop, woken on every notification.
    pub fn listen(&self, waker: Arc<dyn Wake>) {
        self.listeners.write().push(waker);
    }

    /// Moves the epoch and wakes the cores with parked work. (A core raises its parked
    /// flag before it reads the epoch; we move the epoch before reading the flags: one of
    /// the two always sees the other.)
    pub fn notify(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        for (w, parked) in self.cores.get().into_iter().flatten() {
            if parked.load(Ordering::SeqCst) {
                w.wake();
            }
        }
        for w in self.listeners.read().iter() {
            w.wake();
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }
}

pub struct Broker {
    pub settings: BrokerSettings,
    cores: usize,
    catalog: ArcSwap<Catalog>,
    /// Serialises catalog writers (admin requests); readers never take it.
    admin: Mutex<()>,
    pub groups: Mutex<groups::Coordinator>,
    /// Committed offsets on disk; written by the file worker only (and at shutdown).
    offsets: Mutex<OffsetStore>,
    /// The file worker: blocking file work goes here, never onto a dispatch core.
    pub files: Files,
    /// The next producer id, and the bound below which ids are reserved on disk.
    producer_ids: Mutex<(i64, i64)>,
    producer_id_file: PathBuf,
    pub notifier: Arc<Notifier>,
    /// SASL users (their SCRAM credentials).
    pub users: users::Users,
    /// ACLs, and whether they are enforced.
    pub acl: acl::Authorizer,
}

/// Names the catalog accepts: Kafka's (`[a-zA-Z0-9._-]`, at most 249) and RocketMQ's,
/// which also use `%` and `|` (`%RETRY%group`, `%DLQ%group`). A name is never a path
/// (topics live in directories named by their id). Each protocol refuses what its own
/// clients may not create ([`kafka_topic_name`]).
pub fn valid_topic_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'%' | b'|'))
}

/// Whether a Kafka client may create a topic of this name (Kafka's legal characters).
pub fn kafka_topic_name(name: &str) -> bool {
    valid_topic_name(name) && !name.contains(['%', '|'])
}

/// Topic-level overrides we honour, mapped onto the log config.
fn log_config_for(base: &LogConfig, configs: &HashMap<String, String>) -> LogConfig {
    let mut c = base.clone();
    if let Some(v) = configs.get("segment.bytes").and_then(|v| v.parse().ok()) {
        c.segment_bytes = v;
    }
    if let Some(v) = configs.get("retention.bytes").and_then(|v| v.parse::<i64>().ok()) {
        c.retention_bytes = u64::try_from(v).ok();
    }
    if let Some(v) = configs.get("retention.ms").and_then(|v| v.parse::<i64>().ok()) {
        c.retention_ms = (v >= 0).then_some(v);
    }
    if let Some(v) = configs.get("message.timestamp.type") {
        c.log_append_time = v == "LogAppendTime";
    }
    c
}

/// The topic configs we report in DescribeConfigs, with their effective values and
/// whether each is the default.
pub fn effective_configs(base: &LogConfig, configs: &HashMap<String, String>) -> Vec<(String, String, bool)> {
    let c = log_config_for(base, configs);
    let mut out = vec![
        ("segment.bytes".to_string(), c.segment_bytes.to_string()),
        ("retention.bytes".to_string(), c.retention_bytes.map_or("-1".into(), |v| v.to_string())),
        ("retention.ms".to_string(), c.retention_ms.map_or("-1".into(), |v| v.to_string())),
        ("message.timestamp.type".to_string(), if c.log_append_time { "LogAppendTime" } else { "CreateTime" }.into()),
        ("cleanup.policy".to_string(), "delete".to_string()),
    ];
    out.sort();
    out.into_iter()
        .map(|(k, v)| {
            let is_default = !configs.contains_key(&k);
            (k, v, is_default)
        })
        .collect()
}

impl Broker {
    /// Opens the data directory, recovering every partition log into the shard of its
    /// owner core; `files` takes the broker's and the logs' background file work. Returns
    /// the broker and one shard per core.
    pub fn open(settings: BrokerSettings, cores: usize, files: Files) -> Result<(Broker, Vec<Shard>), BrokerError> {
        let topics_dir = settings.data_dir.join("topics");
        fs::create_dir_all(&topics_dir).map_err(io_err(&topics_dir))?;
        let mut catalog = Catalog::default();
        let mut shards: Vec<Shard> = (0..cores).map(|_| Shard::new(files.clone())).collect();
        let started = std::time::Instant::now();
        let (mut batches, mut truncated) = (0usize, 0usize);
        for entry in fs::read_dir(&topics_dir).map_err(io_err(&topics_dir))? {
            let entry = entry.map_err(io_err(&topics_dir))?;
            let meta_path = entry.path().join("topic.json");
            let meta: TopicMeta = match fs::read_to_string(&meta_path).map(|t| serde_json::from_str(&t)) {
                Ok(Ok(m)) => m,
                Ok(Err(e)) => {
                    log::warn!("{}: unreadable ({e}), skipped", meta_path.display());
                    continue;
                }
                Err(e) => {
                    log::warn!("{}: {e}, skipped", meta_path.display());
                    continue;
                }
            };
            let topic = Arc::new(Topic {
                log: log_config_for(&settings.log, &meta.configs),
                dir: entry.path(),
                partitions: (0..meta.partitions).map(|_| Arc::default()).collect(),
                meta,
            });
            for p in 0..topic.meta.partitions {
                let (log, report) = PartitionLog::open(&topic.partition_dir(p), topic.log.clone(), files.clone())?;
                batches += report.batches_scanned;
                truncated += report.truncated_bytes;
                if let Some(shared) = topic.shared(p) {
                    shared.publish(&log, 0);
                }
                let key = PartKey { topic_id: topic.meta.id, partition: p };
                shards[owner_of(key, cores)].adopt(key, log);
            }
            catalog.insert(topic);
        }
        log::info!(
            "recovered {} topics ({batches} batches scanned, {truncated} bytes of torn tails cut) in {:.1} ms",
            catalog.by_id.len(),
            started.elapsed().as_secs_f64() * 1e3
        );
        let (offsets, committed) = OffsetStore::open(&settings.data_dir).map_err(io_err(&settings.data_dir))?;
        let groups = groups::Coordinator::new(settings.group_initial_rebalance_delay_ms, committed);
        let notifier = Arc::new(Notifier::default());
        {
            let notifier = notifier.clone();
            files.set_notify(Box::new(move || notifier.notify()));
        }
        let users = users::Users::open(&settings.data_dir)?;
        let acl = acl::Authorizer::open(&settings.data_dir, settings.authorizer.clone())?;
        let producer_id_file = settings.data_dir.join("producer_ids");
        // Producer ids are handed out in blocks; a restart skips the rest of the block, so
        // an id is never reused even if the process dies mid-block.
        let next = fs::read_to_string(&producer_id_file).ok().and_then(|s| s.trim().parse::<i64>().ok()).unwrap_or(0);
        let broker = Broker {
            settings,
            cores,
            catalog: ArcSwap::from_pointee(catalog),
            admin: Mutex::new(()),
            groups: Mutex::new(groups),
            offsets: Mutex::new(offsets),
            files,
            // Nothing reserved yet: the first InitProducerId writes the first block (a
            // broker starting on a full disk must not fail for want of this file).
            producer_ids: Mutex::new((next, next)),
            producer_id_file,
            notifier,
            users,
            acl,
        };
        Ok((broker, shards))
    }

    /// The core that owns `key`.
    pub fn owner(&self, key: PartKey) -> usize {
        owner_of(key, self.cores)
    }

    const PRODUCER_ID_BLOCK: i64 = 1000;

    /// Writes that ids below `until` may have been handed out (a restart starts there).
    fn reserve_producer_ids(&self, until: i64) -> Result<(), BrokerError> {
        let tmp = self.producer_id_file.with_extension("tmp");
        fs::write(&tmp, until.to_string()).map_err(io_err(&tmp))?;
        fs::rename(&tmp, &self.producer_id_file).map_err(io_err(&self.producer_id_file))
    }

    /// A producer id never handed out before, even across crashes: ids are reserved on
    /// disk a block at a time before any of the block is handed out (for the file worker:
    /// it may write that file).
    pub fn allocate_producer_id(&self) -> Result<i64, BrokerError> {
        let mut ids = self.producer_ids.lock();
        let (next, reserved) = *ids;
        if next >= reserved {
            self.reserve_producer_ids(next + Self::PRODUCER_ID_BLOCK)?;
            ids.1 = next + Self::PRODUCER_ID_BLOCK;
        }
        ids.0 = next + 1;
        Ok(next)
    }

    pub fn topic(&self, name: &str) -> Option<Arc<Topic>> {
        self.catalog.load().by_name.get(name).cloned()
    }

    pub fn topic_by_id(&self, id: Uuid) -> Option<Arc<Topic>> {
        self.catalog.load().by_id.get(&id).cloned()
    }

    pub fn topics(&self) -> Vec<Arc<Topic>> {
        let mut v: Vec<_> = self.catalog.load().by_name.values().cloned().collect();
        v.sort_by(|a, b| a.meta.name.cmp(&b.meta.name));
        v
    }

    pub fn create_topic(
        &self,
        name: &str,
        partitions: i32,
        configs: HashMap<String, String>,
        validate_only: bool,
    ) -> Result<Arc<Topic>, BrokerError> {
        if !valid_topic_name(name) {
            return Err(BrokerError::InvalidTopic(name.to_string()));
        }
        let partitions = if partitions <= 0 { self.settings.default_partitions } else { partitions };
        if !(1..=10_000).contains(&partitions) {
            return Err(BrokerError::InvalidPartitions(partitions));
        }
        let _admin = self.admin.lock();
        if self.topic(name).is_some() {
            return Err(BrokerError::TopicExists(name.to_string()));
        }
        let meta = TopicMeta { name: name.to_string(), id: Uuid::new_v4(), partitions, configs };
        let dir = self.settings.data_dir.join("topics").join(meta.id.simple().to_string());
        let topic = Arc::new(Topic {
            log: log_config_for(&self.settings.log, &meta.configs),
            dir,
            partitions: (0..partitions).map(|_| Arc::default()).collect(),
            meta,
        });
        if validate_only {
            return Ok(topic);
        }
        // Partition logs are opened by their owner cores on first use.
        fs::create_dir_all(&topic.dir).map_err(io_err(&topic.dir))?;
        write_meta(&topic.dir, &topic.meta)?;
        let mut next = Catalog::clone(&self.catalog.load());
        next.insert(topic.clone());
        self.catalog.store(Arc::new(next));
        log::info!("created topic {name} with {partitions} partitions");
        Ok(topic)
    }

    pub fn delete_topic(&self, name: &str) -> Result<Arc<Topic>, BrokerError> {
        let _admin = self.admin.lock();
        let topic = self.topic(name).ok_or_else(|| BrokerError::UnknownTopic(name.to_string()))?;
        let mut next = Catalog::clone(&self.catalog.load());
        next.by_name.remove(name);
        next.by_id.remove(&topic.meta.id);
        self.catalog.store(Arc::new(next));
        // Owners drop their logs when they see the topic gone; open mappings stay valid
        // for readers still holding them. The files go now.
        fs::remove_dir_all(&topic.dir).map_err(io_err(&topic.dir))?;
        let forgotten = self.groups.lock().forget_topic(name);
        let mut by_group: HashMap<String, Vec<i32>> = HashMap::new();
        for (g, p) in forgotten {
            by_group.entry(g).or_default().push(p);
        }
        for (g, parts) in by_group {
            // Were this lost, a restart would bring back offsets of a topic that is gone.
            if let Err(e) = self.offsets.lock().append(&g, parts.iter().map(|p| (name, *p, None))) {
                log::error!("recording that group {g} has no offsets of deleted topic {name} any more: {e}");
            }
        }
        log::info!("deleted topic {name}");
        Ok(topic)
    }

    pub fn create_partitions(&self, name: &str, count: i32, validate_only: bool) -> Result<(), BrokerError> {
        let _admin = self.admin.lock();
        let old = self.topic(name).ok_or_else(|| BrokerError::UnknownTopic(name.to_string()))?;
        if count <= old.meta.partitions || count > 10_000 {
            return Err(BrokerError::InvalidPartitions(count));
        }
        if validate_only {
            return Ok(());
        }
        let mut meta = old.meta.clone();
        meta.partitions = count;
        write_meta(&old.dir, &meta)?;
        let mut partitions = old.partitions.clone();
        partitions.resize_with(count as usize, Arc::default);
        let topic = Arc::new(Topic { meta, dir: old.dir.clone(), log: old.log.clone(), partitions });
        let mut next = Catalog::clone(&self.catalog.load());
        next.insert(topic);
        self.catalog.store(Arc::new(next));
        Ok(())
    }

    /// Commits offsets (for the file worker: it writes the offsets file); see
    /// [`groups::commit`].
    pub fn commit_offsets(
        &self,
        group: &str,
        member_id: &str,
        generation: i32,
        offsets: Vec<(String, i32, Committed)>,
        now: std::time::Instant,
    ) -> Result<(), GroupError> {
        groups::commit(&self.groups, &self.offsets, group, member_id, generation, offsets, now)
    }

    /// Flushes the group state (graceful shutdown; the shards flush their own logs).
    pub fn close(&self) {
        if let Err(e) = self.offsets.lock().sync() {
            log::error!("flushing group offsets: {e}");
        }
    }
}

/// Spreads a topic's partitions round-robin over the cores, starting at a core chosen by
/// the topic id (so single-partition topics do not all land on core 0).
fn owner_of(key: PartKey, cores: usize) -> usize {
    let start = key.topic_id.as_u64_pair().0 as usize;
    start.wrapping_add(key.partition as usize) % cores.max(1)
}

/// Replaces `path` with `bytes` durably: written beside it, synced, renamed over it, the
/// directory synced — a crash leaves the old file or the new one, never part of either.
/// Blocking file work (the file worker's, or a command's).
pub(crate) fn replace_durably(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    {
        let mut f = fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    match path.parent() {
        Some(dir) => fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

fn write_meta(dir: &Path, meta: &TopicMeta) -> Result<(), BrokerError> {
    let path = dir.join("topic.json");
    let tmp = dir.join("topic.json.tmp");
    let text =
        serde_json::to_string_pretty(meta).map_err(|e| BrokerError::Io { path: path.clone(), source: e.into() })?;
    fs::write(&tmp, text).map_err(io_err(&tmp))?;
    fs::rename(&tmp, &path).map_err(io_err(&path))
}
