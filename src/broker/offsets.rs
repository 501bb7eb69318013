//! Committed consumer offsets on disk: `consumer_offsets.jsonl` in the data directory, one
//! JSON record per committed (group, topic, partition) — or its deletion — appended per
//! commit request, replayed at start and compacted when mostly superseded.
//!
//! The group coordinator keeps the offsets in memory; this store only writes them, on
//! the file worker (see [`crate::log::files`]), never under the coordinator's lock.
//!
//! # Invariants
//! - The file holds whole records only: a failed append is cut back off, so no half
//!   record lies before the next one (a torn last line from a crash is skipped at start).

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};

use super::groups::Committed;

/// Committed offsets by group, then (topic, partition).
pub type CommittedByGroup = HashMap<String, HashMap<(String, i32), Committed>>;

#[derive(Serialize, Deserialize)]
struct OffsetRecord {
    g: String,
    t: String,
    p: i32,
    /// `None`: the offset was deleted (its topic or group is gone).
    #[serde(flatten)]
    c: Option<Committed>,
}

pub struct OffsetStore {
    path: PathBuf,
    file: File,
}

impl OffsetStore {
    /// Opens the store in `data_dir`, replaying it; compacts it when most records are
    /// superseded.
    pub fn open(data_dir: &Path) -> io::Result<(OffsetStore, CommittedByGroup)> {
        fs::create_dir_all(data_dir)?;
        let path = data_dir.join("consumer_offsets.jsonl");
        let mut committed = CommittedByGroup::new();
        let mut records = 0;
        if let Ok(f) = File::open(&path) {
            for line in io::BufReader::new(f).lines() {
                let line = line?;
                // A torn last line (crash mid-write) is skipped; earlier lines stand.
                let Ok(r) = serde_json::from_str::<OffsetRecord>(&line) else {
                    continue;
                };
                records += 1;
                let g = committed.entry(r.g).or_default();
                match r.c {
                    Some(c) => g.insert((r.t, r.p), c),
                    None => g.remove(&(r.t, r.p)),
                };
            }
        }
        let live: usize = committed.values().map(HashMap::len).sum();
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let mut store = OffsetStore { path, file };
        if records > 2 * live + 1000 {
            // Only a saving: on a full disk it waits for the next start.
            if let Err(e) = store.compact(&committed) {
                log::warn!("{}: not compacted: {e}", store.path.display());
                let _ = fs::remove_file(store.path.with_extension("tmp"));
            }
        }
        Ok((store, committed))
    }

    /// Rewrites the file with only the live entries.
    fn compact(&mut self, committed: &CommittedByGroup) -> io::Result<()> {
        let tmp = self.path.with_extension("tmp");
        let mut out = io::BufWriter::new(File::create(&tmp)?);
        for (g, offsets) in committed {
            for ((t, p), c) in offsets {
                let r = OffsetRecord { g: g.clone(), t: t.clone(), p: *p, c: Some(c.clone()) };
                serde_json::to_writer(&mut out, &r)?;
                out.write_all(b"\n")?;
            }
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        fs::rename(&tmp, &self.path)?;
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        Ok(())
    }

    /// Appends `group`'s records (an offset, or `None` for a deletion) in one write, or
    /// nothing.
    pub fn append<'a>(
        &mut self,
        group: &str,
        entries: impl IntoIterator<Item = (&'a str, i32, Option<&'a Committed>)>,
    ) -> io::Result<()> {
        let mut line = Vec::new();
        for (t, p, c) in entries {
            let r = OffsetRecord { g: group.to_string(), t: t.to_string(), p, c: c.cloned() };
            serde_json::to_writer(&mut line, &r)?;
            line.push(b'\n');
        }
        let before = self.file.metadata()?.len();
        let written = self.file.write_all(&line);
        if written.is_err() {
            if let Err(e) = self.file.set_len(before) {
                log::error!("cutting a failed offsets write back off {}: {e}", self.path.display());
            }
        }
        written
    }

    /// Forces the file to disk (shutdown).
    pub fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Writes to `file` from now on (tests: a file that refuses writes).
    #[cfg(test)]
    pub(crate) fn replace_file(&mut self, file: File) {
        self.file = file;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_replay_deletions_and_compact() {
        let dir = tempfile::tempdir().unwrap();
        let at = |offset| Committed { offset, leader_epoch: -1, metadata: None };
        {
            let (mut s, c) = OffsetStore::open(dir.path()).unwrap();
            assert!(c.is_empty());
            for i in 0..3000 {
                s.append("g", [("t", 0, Some(&at(i))), ("u", 1, Some(&at(i)))]).unwrap();
            }
            s.append("g", [("u", 1, None)]).unwrap();
        }
        let (_, c) = OffsetStore::open(dir.path()).unwrap();
        assert_eq!(c["g"].len(), 1);
        assert_eq!(c["g"][&("t".to_string(), 0)].offset, 2999);
        // The first reopen compacted 6001 records into one.
        let lines = fs::read_to_string(dir.path().join("consumer_offsets.jsonl")).unwrap().lines().count();
        assert_eq!(lines, 1);
    }
}
