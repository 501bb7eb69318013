//! Broker state shared by the cores: the topic catalog, partitions and their logs, the
//! group coordinator and the producer-id allocator.
//!
//! A partition's log sits under its own mutex. Appends to one partition are serialised
//! there (Kafka orders a partition anyway); different partitions never contend, and a
//! fetch holds the lock only to locate its bytes, then sends them from the mmap unlocked.

pub mod groups;

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use thiserror::Error;
use uuid::Uuid;

use crate::log::{LogConfig, LogError, PartitionLog};
use crate::transport::Wake;

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
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> BrokerError + '_ {
    move |source| BrokerError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Settings the broker needs at run time (from the command line / config file).
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    pub node_id: i32,
    pub advertised_host: String,
    pub advertised_port: i32,
    pub cluster_id: String,
    pub data_dir: PathBuf,
    pub default_partitions: i32,
    pub auto_create_topics: bool,
    pub log: LogConfig,
    pub max_request_bytes: usize,
    pub group_initial_rebalance_delay_ms: u64,
}

/// Per-topic settings persisted in `topic.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TopicMeta {
    pub id: Uuid,
    pub partitions: i32,
    #[serde(default)]
    pub configs: HashMap<String, String>,
}

pub struct Partition {
    pub topic: String,
    pub index: i32,
    pub log: Mutex<PartitionLog>,
}

pub struct Topic {
    pub name: String,
    pub meta: TopicMeta,
    pub partitions: Vec<Arc<Partition>>,
}

impl Topic {
    pub fn partition(&self, i: i32) -> Option<&Arc<Partition>> {
        usize::try_from(i).ok().and_then(|i| self.partitions.get(i))
    }
}

/// Wakes the cores that have parked requests (long-poll fetches, joins) when something
/// they wait for may have happened.
/// A core's waker and its has-parked-work flag.
type CoreHandle = (Arc<dyn Wake>, Arc<AtomicBool>);

#[derive(Default)]
pub struct Notifier {
    cores: RwLock<Vec<CoreHandle>>,
    epoch: AtomicU64,
}

impl Notifier {
    /// Registers a core; the returned flag is set by the core while it has parked work.
    pub fn register(&self, waker: Arc<dyn Wake>) -> Arc<AtomicBool> {
        let flag = Arc::new(AtomicBool::new(false));
        self.cores.write().push((waker, flag.clone()));
        flag
    }

    pub fn notify(&self) {
        self.epoch.fetch_add(1, Ordering::Release);
        for (w, parked) in self.cores.read().iter() {
            if parked.load(Ordering::Acquire) {
                w.wake();
            }
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }
}

pub struct Broker {
    pub settings: BrokerSettings,
    topics: RwLock<HashMap<String, Arc<Topic>>>,
    pub groups: Mutex<groups::Coordinator>,
    next_producer_id: AtomicI64,
    producer_id_file: PathBuf,
    pub notifier: Notifier,
}

pub fn valid_topic_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// Topic-level overrides we honour, mapped onto the log config.
fn log_config_for(base: &LogConfig, configs: &HashMap<String, String>) -> LogConfig {
    let mut c = base.clone();
    if let Some(v) = configs.get("segment.bytes").and_then(|v| v.parse().ok()) {
        c.segment_bytes = v;
    }
    if let Some(v) = configs
        .get("retention.bytes")
        .and_then(|v| v.parse::<i64>().ok())
    {
        c.retention_bytes = u64::try_from(v).ok();
    }
    if let Some(v) = configs
        .get("retention.ms")
        .and_then(|v| v.parse::<i64>().ok())
    {
        c.retention_ms = (v >= 0).then_some(v);
    }
    if let Some(v) = configs.get("message.timestamp.type") {
        c.log_append_time = v == "LogAppendTime";
    }
    c
}

/// The topic configs we report in DescribeConfigs, with their effective values.
pub fn effective_configs(
    base: &LogConfig,
    configs: &HashMap<String, String>,
) -> Vec<(String, String, bool)> {
    let c = log_config_for(base, configs);
    let mut out = vec![
        ("segment.bytes".to_string(), c.segment_bytes.to_string()),
        (
            "retention.bytes".to_string(),
            c.retention_bytes.map_or("-1".into(), |v| v.to_string()),
        ),
        (
            "retention.ms".to_string(),
            c.retention_ms.map_or("-1".into(), |v| v.to_string()),
        ),
        (
            "message.timestamp.type".to_string(),
            if c.log_append_time {
                "LogAppendTime"
            } else {
                "CreateTime"
            }
            .to_string(),
        ),
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
    /// Opens the data directory, recovering every partition log.
    pub fn open(settings: BrokerSettings) -> Result<Broker, BrokerError> {
        let topics_dir = settings.data_dir.join("topics");
        fs::create_dir_all(&topics_dir).map_err(io_err(&topics_dir))?;
        let mut topics = HashMap::new();
        let started = std::time::Instant::now();
        let mut batches = 0usize;
        for entry in fs::read_dir(&topics_dir).map_err(io_err(&topics_dir))? {
            let entry = entry.map_err(io_err(&topics_dir))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let meta_path = entry.path().join("topic.json");
            let Ok(text) = fs::read_to_string(&meta_path) else {
                log::warn!("{}: no topic.json, skipped", entry.path().display());
                continue;
            };
            let meta: TopicMeta = match serde_json::from_str(&text) {
                Ok(m) => m,
                Err(e) => {
                    log::warn!("{}: unreadable ({e}), skipped", meta_path.display());
                    continue;
                }
            };
            let cfg = log_config_for(&settings.log, &meta.configs);
            let mut parts = Vec::new();
            for p in 0..meta.partitions {
                let (log, report) =
                    PartitionLog::open(&entry.path().join(p.to_string()), cfg.clone())?;
                batches += report.batches_scanned;
                parts.push(Arc::new(Partition {
                    topic: name.clone(),
                    index: p,
                    log: Mutex::new(log),
                }));
            }
            topics.insert(
                name.clone(),
                Arc::new(Topic {
                    name,
                    meta,
                    partitions: parts,
                }),
            );
        }
        log::info!(
            "recovered {} topics ({batches} batches scanned) in {:.1} ms",
            topics.len(),
            started.elapsed().as_secs_f64() * 1e3
        );
        let groups = groups::Coordinator::open(
            &settings.data_dir,
            settings.group_initial_rebalance_delay_ms,
        )
        .map_err(io_err(&settings.data_dir))?;
        let producer_id_file = settings.data_dir.join("producer_ids");
        // Producer ids are handed out in blocks; a restart skips the rest of the block, so
        // an id is never reused even if the process dies mid-block.
        let next = fs::read_to_string(&producer_id_file)
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .unwrap_or(0);
        let broker = Broker {
            settings,
            topics: RwLock::new(topics),
            groups: Mutex::new(groups),
            next_producer_id: AtomicI64::new(next),
            producer_id_file,
            notifier: Notifier::default(),
        };
        broker.reserve_producer_ids(next)?;
        Ok(broker)
    }

    const PRODUCER_ID_BLOCK: i64 = 1000;

    fn reserve_producer_ids(&self, from: i64) -> Result<(), BrokerError> {
        let tmp = self.producer_id_file.with_extension("tmp");
        fs::write(&tmp, (from + Self::PRODUCER_ID_BLOCK).to_string()).map_err(io_err(&tmp))?;
        fs::rename(&tmp, &self.producer_id_file).map_err(io_err(&self.producer_id_file))
    }

    pub fn allocate_producer_id(&self) -> Result<i64, BrokerError> {
        let id = self.next_producer_id.fetch_add(1, Ordering::AcqRel);
        if (id + 1) % Self::PRODUCER_ID_BLOCK == 0 {
            self.reserve_producer_ids(id + 1)?;
        }
        Ok(id)
    }

    pub fn topic(&self, name: &str) -> Option<Arc<Topic>> {
        self.topics.read().get(name).cloned()
    }

    pub fn topics(&self) -> Vec<Arc<Topic>> {
        let mut v: Vec<_> = self.topics.read().values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub fn topic_by_id(&self, id: Uuid) -> Option<Arc<Topic>> {
        self.topics
            .read()
            .values()
            .find(|t| t.meta.id == id)
            .cloned()
    }

    fn topic_dir(&self, name: &str) -> PathBuf {
        self.settings.data_dir.join("topics").join(name)
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
        let partitions = if partitions <= 0 {
            self.settings.default_partitions
        } else {
            partitions
        };
        if !(1..=10_000).contains(&partitions) {
            return Err(BrokerError::InvalidPartitions(partitions));
        }
        let mut topics = self.topics.write();
        if topics.contains_key(name) {
            return Err(BrokerError::TopicExists(name.to_string()));
        }
        let meta = TopicMeta {
            id: Uuid::new_v4(),
            partitions,
            configs,
        };
        if validate_only {
            return Ok(Arc::new(Topic {
                name: name.to_string(),
                meta,
                partitions: Vec::new(),
            }));
        }
        let dir = self.topic_dir(name);
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let cfg = log_config_for(&self.settings.log, &meta.configs);
        let mut parts = Vec::new();
        for p in 0..partitions {
            let (log, _) = PartitionLog::open(&dir.join(p.to_string()), cfg.clone())?;
            parts.push(Arc::new(Partition {
                topic: name.to_string(),
                index: p,
                log: Mutex::new(log),
            }));
        }
        write_meta(&dir, &meta)?;
        let topic = Arc::new(Topic {
            name: name.to_string(),
            meta,
            partitions: parts,
        });
        topics.insert(name.to_string(), topic.clone());
        log::info!("created topic {name} with {partitions} partitions");
        Ok(topic)
    }

    pub fn delete_topic(&self, name: &str) -> Result<Arc<Topic>, BrokerError> {
        let topic = self
            .topics
            .write()
            .remove(name)
            .ok_or_else(|| BrokerError::UnknownTopic(name.to_string()))?;
        let dir = self.topic_dir(name);
        // Open mappings stay valid for readers still holding them; the files go now.
        fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
        self.groups.lock().forget_topic(name);
        log::info!("deleted topic {name}");
        Ok(topic)
    }

    pub fn create_partitions(
        &self,
        name: &str,
        count: i32,
        validate_only: bool,
    ) -> Result<(), BrokerError> {
        let mut topics = self.topics.write();
        let old = topics
            .get(name)
            .cloned()
            .ok_or_else(|| BrokerError::UnknownTopic(name.to_string()))?;
        if count <= old.meta.partitions || count > 10_000 {
            return Err(BrokerError::InvalidPartitions(count));
        }
        if validate_only {
            return Ok(());
        }
        let dir = self.topic_dir(name);
        let cfg = log_config_for(&self.settings.log, &old.meta.configs);
        let mut parts = old.partitions.clone();
        for p in old.meta.partitions..count {
            let (log, _) = PartitionLog::open(&dir.join(p.to_string()), cfg.clone())?;
            parts.push(Arc::new(Partition {
                topic: name.to_string(),
                index: p,
                log: Mutex::new(log),
            }));
        }
        let mut meta = old.meta.clone();
        meta.partitions = count;
        write_meta(&dir, &meta)?;
        topics.insert(
            name.to_string(),
            Arc::new(Topic {
                name: name.to_string(),
                meta,
                partitions: parts,
            }),
        );
        Ok(())
    }

    /// Every partition (for the flusher, retention and shutdown).
    pub fn all_partitions(&self) -> Vec<Arc<Partition>> {
        self.topics
            .read()
            .values()
            .flat_map(|t| t.partitions.iter().cloned())
            .collect()
    }

    /// Flushes every log and the group state (graceful shutdown).
    pub fn close(&self) {
        for p in self.all_partitions() {
            if let Err(e) = p.log.lock().close() {
                log::error!("flushing {}-{}: {e}", p.topic, p.index);
            }
        }
        if let Err(e) = self.groups.lock().sync_file() {
            log::error!("flushing group offsets: {e}");
        }
    }
}

fn write_meta(dir: &Path, meta: &TopicMeta) -> Result<(), BrokerError> {
    let path = dir.join("topic.json");
    let tmp = dir.join("topic.json.tmp");
    let text = serde_json::to_string_pretty(meta).map_err(|e| BrokerError::Io {
        path: path.clone(),
        source: e.into(),
    })?;
    fs::write(&tmp, text).map_err(io_err(&tmp))?;
    fs::rename(&tmp, &path).map_err(io_err(&path))
}
