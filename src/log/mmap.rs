//! Memory-mapped segment files: one writer, many concurrent readers, no locks.
//!
//! A segment file is preallocated (sparse) to its capacity and mapped shared once. The
//! partition's single writer copies produced batches into the mapping past the
//! *published* length; readers on any core take [`Bytes`] views of the published prefix,
//! which the transport sends straight from the page cache.
//!
//! # Invariants
//! - Bytes below `published` are never written again while the mapping lives: readers
//!   hold `&[u8]` views of them without synchronisation.
//! - Only the one [`SegmentWriter`] (not `Clone`, owned by the partition's owner core) writes,
//!   and only at or past `published`; `publish` is a `Release` store that readers pair with
//!   an `Acquire` load, so a reader that sees a length sees the bytes under it.
//! - The file is never shrunk while mapped: truncation at recovery happens on a
//!   [`SegmentFile`] that has not been shared yet, and it remaps.
//! - The writer stores only into blocks the file system has allocated (`fallocate`
//!   succeeded for the whole file): a store into a hole the file system cannot fill
//!   would be a SIGBUS, not an error. A segment that could not be allocated (a full
//!   disk) is shared read-only: its writer has no room, so the log rolls, and the roll
//!   fails with ENOSPC until space comes back.
#![allow(unsafe_code)]

use bytes::Bytes;
use memmap2::{MmapOptions, MmapRaw};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::buffer::{Chunk, Region};

/// A segment file not yet shared with readers: recovery may scan and truncate it.
pub struct SegmentFile {
    path: PathBuf,
    file: File,
    map: MmapRaw,
    capacity: usize,
    /// Every block of the file is allocated: stores into the mapping cannot fault for
    /// want of space.
    allocated: bool,
}

/// Allocates every block of `file` up to `len` bytes (`posix_fallocate`: the file system's
/// `fallocate`, or writing a byte per block where it has none).
fn allocate(file: &File, len: usize) -> io::Result<()> {
    // SAFETY: a plain syscall on a descriptor we own; no memory is passed.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) };
    match rc {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

impl SegmentFile {
    /// Creates a new, zero-filled segment of `capacity` bytes, every block allocated (on
    /// a full disk this fails with ENOSPC and leaves no file behind). Fails if it exists.
    pub fn create(path: &Path, capacity: usize) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(path)?;
        if let Err(e) = allocate(&file, capacity) {
            drop(file);
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        let mut f = Self::map(path, file, capacity)?;
        f.allocated = true;
        Ok(f)
    }

    /// Allocates every block of the file, so the writer may store anywhere in it; on
    /// failure (a full disk) the segment stays read-only. Returns whether it is allocated.
    pub fn try_allocate(&mut self) -> bool {
        match allocate(&self.file, self.capacity) {
            Ok(()) => self.allocated = true,
            Err(e) => {
                log::warn!("{}: cannot allocate the segment ({e}); no appends to it", self.path.display());
                self.allocated = false;
            }
        }
        self.allocated
    }

    /// Opens an existing segment, growing it to `capacity` if it is shorter (a larger
    /// existing file keeps its size, so a smaller configured segment size never cuts data).
    pub fn open(path: &Path, capacity: usize) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let len = file.metadata()?.len() as usize;
        let capacity = capacity.max(len);
        if len < capacity {
            file.set_len(capacity as u64)?;
        }
        Self::map(path, file, capacity)
    }

    fn map(path: &Path, file: File, capacity: usize) -> io::Result<Self> {
        let map = MmapOptions::new().len(capacity).map_raw(&file)?;
        Ok(SegmentFile { path: path.to_path_buf(), file, map, capacity, allocated: false })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The whole mapping, for the recovery scan. `&mut self`: nobody else can see it yet.
    pub fn contents(&mut self) -> &[u8] {
        // SAFETY: the mapping is `capacity` bytes long, the file is at least that long and
        // is never shrunk while mapped; we hold the only handle (`&mut self`), so no
        // writer can change it while the slice lives.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr(), self.capacity) }
    }

    /// Zeroes everything from `at` to the end (a torn or invalid tail), so that no stale
    /// batch past the cut can ever be mistaken for data by a later scan. The tail is a
    /// hole afterwards: see [`Self::try_allocate`].
    pub fn truncate_tail(self, at: usize) -> io::Result<Self> {
        let SegmentFile { path, file, map, capacity, .. } = self;
        drop(map);
        file.set_len(at as u64)?;
        file.set_len(capacity as u64)?;
        file.sync_all()?;
        Self::map(&path, file, capacity)
    }

    /// Renames the (unshared) file, e.g. a spare segment taking its final name.
    pub fn rename(mut self, to: &Path) -> io::Result<Self> {
        std::fs::rename(&self.path, to)?;
        self.path = to.to_path_buf();
        Ok(self)
    }

    /// Shares the mapping: `len` valid bytes become visible to readers. The writer may
    /// append only if every block is allocated.
    pub fn into_shared(self, len: usize) -> (Arc<SegmentMap>, SegmentWriter) {
        let limit = if self.allocated { self.capacity } else { len };
        let shared = Arc::new(SegmentMap {
            path: self.path,
            _file: self.file,
            map: self.map,
            capacity: self.capacity,
            published: AtomicUsize::new(len),
        });
        (shared.clone(), SegmentWriter { map: shared, pos: len, limit })
    }
}

/// The shared, read side of a mapped segment.
pub struct SegmentMap {
    path: PathBuf,
    _file: File,
    map: MmapRaw,
    capacity: usize,
    published: AtomicUsize,
}

impl SegmentMap {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the mapping starts in this process's address space.
    pub fn base(&self) -> *const u8 {
        self.map.as_ptr()
    }

    /// The mapping's length.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes readers may see.
    pub fn published(&self) -> usize {
        self.published.load(Ordering::Acquire)
    }

    /// A zero-copy view of `[start, start + len)` that names this mapping as its region
    /// (for a transport that registers memory with a NIC), or `None` if it is not all
    /// published.
    pub fn chunk(self: &Arc<Self>, start: usize, len: usize) -> Option<Chunk> {
        let bytes = self.slice(start, len)?;
        Some(Chunk::Mapped { bytes, region: self.clone() })
    }

    /// A zero-copy view of `[start, start + len)`, or `None` if it is not all published.
    pub fn slice(self: &Arc<Self>, start: usize, len: usize) -> Option<Bytes> {
        let end = start.checked_add(len)?;
        if end > self.published() {
            return None;
        }
        Some(Bytes::from_owner(MappedSlice { map: self.clone(), start, len }))
    }

    /// Flushes `[start, end)` to stable storage (msync).
    pub fn flush_range(&self, start: usize, end: usize) -> io::Result<()> {
        if end > start {
            self.map.flush_range(start, end - start)?;
        }
        Ok(())
    }
}

impl Region for SegmentMap {
    fn base(&self) -> *const u8 {
        self.map.as_ptr()
    }

    fn len(&self) -> usize {
        self.capacity
    }
}

/// Keeps the mapping alive for as long as a [`Bytes`] view of it exists.
struct MappedSlice {
    map: Arc<SegmentMap>,
    start: usize,
    len: usize,
}

impl AsRef<[u8]> for MappedSlice {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `slice` checked `start + len <= published <= capacity`; published bytes
        // are never written again (module invariant) and the `Arc` keeps the mapping
        // alive, so the memory is valid and immutable for the borrow.
        unsafe { std::slice::from_raw_parts(self.map.map.as_ptr().add(self.start), self.len) }
    }
}

/// The single writer of a segment. See the module invariants.
pub struct SegmentWriter {
    map: Arc<SegmentMap>,
    pos: usize,
    /// Where stores must stop: the capacity, or `pos` of a segment not allocated.
    limit: usize,
}

impl SegmentWriter {
    /// Where the next append goes (equal to `published` between appends).
    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn remaining(&self) -> usize {
        self.limit - self.pos
    }

    /// Unpublished room of `len` bytes at the write position, to copy into and patch.
    /// Returns `None` if the segment has no room.
    pub fn reserve(&mut self, len: usize) -> Option<&mut [u8]> {
        if len > self.remaining() {
            return None;
        }
        // SAFETY: `[pos, pos + len)` lies inside the mapping and its allocated blocks
        // (checked above: `limit` is within both) and at or past `published`, so no reader
        // looks at it; `&mut self` makes this the only writer.
        Some(unsafe { std::slice::from_raw_parts_mut(self.map.map.as_mut_ptr().add(self.pos), len) })
    }

    /// Moves the write position past `len` reserved bytes (not yet visible to readers).
    pub fn advance(&mut self, len: usize) {
        debug_assert!(len <= self.remaining());
        self.pos += len;
    }

    /// Makes everything written so far visible to readers.
    pub fn publish(&self) {
        self.map.published.store(self.pos, Ordering::Release);
    }
}
