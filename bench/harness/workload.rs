//! Workload files (`bench/workloads/*.toml`), OpenMessaging-Benchmark style.

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Partitions of the benchmark topic.
    pub partitions: i32,
    /// Bytes per message value.
    pub message_size: usize,
    /// Producer connections (each one request in flight).
    pub producers: usize,
    /// Consumer groups; each reads every partition (fan-out).
    #[serde(default = "one")]
    pub consumer_groups: usize,
    /// Total target rate in messages per second; 0 = as fast as possible (closed loop).
    #[serde(default)]
    pub rate: f64,
    /// Messages per produce request (the client-side batch).
    #[serde(default = "one")]
    pub batch_messages: usize,
    /// For client libraries: how long to wait to fill a batch.
    #[serde(default)]
    pub linger_ms: u64,
    /// -1 (all), 1 or 0.
    #[serde(default = "all")]
    pub acks: i16,
    pub warmup_s: f64,
    pub duration_s: f64,
    /// A fetch-throughput workload when not 0: the producers first write this many
    /// messages (not measured), then stop; the consumers drain them from offset 0 and the
    /// measurement is their fetch rate, until drained or `duration_s` is up.
    #[serde(default)]
    pub backlog_messages: u64,
}

fn one() -> usize {
    1
}
fn all() -> i16 {
    -1
}

impl Workload {
    pub fn load(path: &Path) -> anyhow::Result<Workload> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading workload {}", path.display()))?;
        let w: Workload = toml::from_str(&text).with_context(|| format!("parsing workload {}", path.display()))?;
        w.validate()?;
        Ok(w)
    }

    /// Finds `name` as a path, or as `bench/workloads/<name>.toml`.
    pub fn find(name: &str) -> anyhow::Result<Workload> {
        let p = Path::new(name);
        if p.exists() {
            return Self::load(p);
        }
        let under = Path::new(env!("CARGO_MANIFEST_DIR")).join("workloads").join(format!("{name}.toml"));
        if under.exists() {
            return Self::load(&under);
        }
        bail!("no workload '{name}' (neither a file nor bench/workloads/{name}.toml)")
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.partitions < 1 || self.producers < 1 || self.batch_messages < 1 {
            bail!("{}: partitions, producers and batch_messages must be at least 1", self.name);
        }
        if self.message_size < 16 {
            bail!("{}: message_size must be at least 16 bytes (it carries a timestamp)", self.name);
        }
        if !(-1..=1).contains(&self.acks) {
            bail!("{}: acks must be -1, 0 or 1", self.name);
        }
        if self.duration_s <= 0.0 || self.warmup_s < 0.0 || self.rate < 0.0 {
            bail!("{}: duration must be positive, warm-up and rate not negative", self.name);
        }
        Ok(())
    }

    /// Whether a backlog workload's fill is done after `produced` messages (never, for
    /// other workloads).
    pub fn backlog_written(&self, produced: u64) -> bool {
        self.backlog_messages > 0 && produced >= self.backlog_messages
    }

    /// Shortens the run (CI smoke runs).
    pub fn scaled(mut self, duration_s: Option<f64>, warmup_s: Option<f64>) -> Workload {
        if let Some(d) = duration_s {
            self.duration_s = d;
        }
        if let Some(w) = warmup_s {
            self.warmup_s = w;
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_workloads_parse() {
        for name in ["latency-128b", "fixed-rate-1k", "max-throughput-1k", "fanout", "fetch-backlog-1k"] {
            let w = Workload::find(name).unwrap();
            assert_eq!(w.name, name);
        }
    }
}
