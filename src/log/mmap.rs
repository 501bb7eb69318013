//! Segment files: one writer, many concurrent readers, no locks.
//!
//! A segment file is preallocated (every block allocated) to its capacity and mapped
//! shared once, and never stored into through the mapping. The partition's single writer puts produced batches into
//! the file's page cache with `pwritev` past the *published* length (the kernel's copy,
//! the only one a produced byte sees); readers on any core take [`Bytes`] views of the
//! published prefix through the mapping, which the transport sends straight from the page
//! cache. Why `pwritev` and not stores into a writable mapping: a store into a page that
//! is not resident is a page fault taken by the dispatch core — the kernel zero-filling
//! and (under memory pressure) reading pages back while every client of the core waits —
//! and a store the file system cannot back is a SIGBUS; `bench/micro/log_append.rs`
//! measured both (docs/architecture.md, "The commit log").
//!
//! # Invariants
//! - Bytes below `published` are never written again while the mapping lives: readers
//!   hold `&[u8]` views of them without synchronisation.
//! - Only the one [`SegmentWriter`] (not `Clone`, owned by the partition's owner core) writes,
//!   and only at or past `published`; `publish` is a `Release` store that readers pair with
//!   an `Acquire` load, so a reader that sees a length sees the bytes under it.
//! - The file is never shrunk while mapped: truncation at recovery happens on a
//!   [`SegmentFile`] that has not been shared yet, and it remaps.
//! - The writer writes only into blocks the file system has allocated (`fallocate`
//!   succeeded for the whole file), so an acknowledged append never waits for space. A
//!   segment that could not be allocated (a full disk) gets a writer with no room, so the
//!   log rolls, and the roll fails with ENOSPC until space comes back.
//! - Published bytes may leave memory at any time — the kernel's eviction, or the file
//!   worker's [`SegmentMap::drop_cached`] (unmapping them and dropping them from the page
//!   cache once written back) — but never change: a view reads them back from the file.
//!   A dispatch core that must not wait for the disk asks [`SegmentMap::resident`] first.
//! - Nothing stores through a segment's mapping. (It is mapped writable all the same:
//!   the RDMA backend registers windows of it with a NIC, and soft-RoCE on the VM's 6.1
//!   kernel refused to register windows of a read-only mapping — the test of fetches by
//!   one-sided RDMA from the log caught it. Unwritten, its pages are never dirtied
//!   through it, so no write fault and no write-protect pass of a flush touches it.)
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

/// The machine's page size (mincore and madvise work in pages).
fn page_size() -> usize {
    rustix::param::page_size()
}

/// A segment file not yet shared with readers: recovery may scan and truncate it.
pub struct SegmentFile {
    path: PathBuf,
    file: File,
    map: MmapRaw,
    capacity: usize,
    /// Every block of the file is allocated: appends cannot fail for want of space.
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
            file: self.file,
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
    /// Appends go through it (`pwritev`), flushes too (`fdatasync`).
    file: File,
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

    /// The page-aligned span of the mapping covering `[start, start + len)`, clamped to
    /// the published bytes: (offset of its first page, its length), `None` if empty.
    fn pages(&self, start: usize, len: usize) -> Option<(usize, usize)> {
        let end = start.saturating_add(len).min(self.published());
        let first = start & !(page_size() - 1);
        (end > start).then_some((first, end - first))
    }

    /// Whether every page holding `[start, start + len)` of the published bytes is in the
    /// page cache (`mincore`, which asks the page cache for pages this mapping has not
    /// touched yet): reading them through the mapping then waits for no I/O. An error of
    /// `mincore` answers false (the caller brings the pages in off the core).
    pub fn resident(&self, start: usize, len: usize) -> bool {
        let Some((first, span)) = self.pages(start, len) else { return true };
        let mut vec = vec![0u8; span.div_ceil(page_size())];
        // SAFETY: `first` is page-aligned and `first + span` lies within the mapping (at
        // most `published <= capacity`), which `self` keeps alive; `vec` has one byte per
        // page of the span, as mincore writes.
        let rc = unsafe { libc::mincore(self.map.as_mut_ptr().add(first).cast(), span, vec.as_mut_ptr()) };
        rc == 0 && vec.iter().all(|v| v & 1 == 1)
    }

    /// Reads `[start, start + len)` of the published bytes into the page cache and this
    /// mapping (`MADV_POPULATE_READ`), waiting for the I/O: for a background thread,
    /// never a dispatch core.
    pub fn populate(&self, start: usize, len: usize) -> io::Result<()> {
        let Some((first, span)) = self.pages(start, len) else { return Ok(()) };
        // SAFETY: as in `resident`: a page-aligned span inside the live mapping. Populating
        // for read changes no byte and no protection.
        let rc = unsafe { libc::madvise(self.map.as_mut_ptr().add(first).cast(), span, libc::MADV_POPULATE_READ) };
        if rc == 0 {
            return Ok(());
        }
        // Kernels before 5.14 have no MADV_POPULATE_READ: reading the span with pread puts
        // it in the page cache as well (which is what `resident` asks about).
        log::debug!("MADV_POPULATE_READ: {}; reading the span instead", io::Error::last_os_error());
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; span.min(256 << 10)];
        let mut at = first;
        while at < first + span {
            let n = buf.len().min(first + span - at);
            match self.file.read_at(&mut buf[..n], at as u64)? {
                0 => break,
                read => at += read,
            }
        }
        Ok(())
    }

    /// Writes `[from, to)` back to the disk and drops its pages from the page cache (and
    /// from this process's page tables), so the next pages the writer takes are these,
    /// freed, rather than fresh ones (see `LogConfig::page_cache_keep`). Waits for the
    /// write-back: for a background thread, never a dispatch core. Whole pages inside the
    /// range only; pages still in use elsewhere (pinned by a NIC or an in-flight
    /// zero-copy send) are left where they are by the kernel.
    pub fn drop_cached(&self, from: usize, to: usize) -> io::Result<()> {
        let page = page_size();
        let first = from.next_multiple_of(page);
        let end = to.min(self.published()) & !(page - 1);
        if end <= first {
            return Ok(());
        }
        let len = end - first;
        // SAFETY: a page-aligned span inside the live mapping (`end <= published <=
        // capacity`). On a shared file mapping MADV_DONTNEED only unmaps: the bytes stay
        // in the file (and its page cache until dropped below), and a later access maps
        // them again, unchanged, so views readers hold keep reading the same bytes.
        let rc = unsafe { libc::madvise(self.map.as_mut_ptr().add(first).cast(), len, libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = self.file.as_raw_fd();
        let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        // SAFETY: plain syscalls on the descriptor this map owns; no memory is passed.
        let rc = unsafe { libc::sync_file_range(fd, first as libc::off64_t, len as libc::off64_t, flags) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // Clean pages now: the kernel can drop them (dirty ones it would skip).
        // SAFETY: as above.
        let rc =
            unsafe { libc::posix_fadvise(fd, first as libc::off_t, len as libc::off_t, libc::POSIX_FADV_DONTNEED) };
        match rc {
            0 => Ok(()),
            e => Err(io::Error::from_raw_os_error(e)),
        }
    }

    /// Flushes what was appended up to `end` to stable storage (`fdatasync`: the file's
    /// size and blocks are fixed, so its data is all there is to sync; `start` is what an
    /// earlier flush covered already).
    pub fn flush_range(&self, start: usize, end: usize) -> io::Result<()> {
        if end > start {
            self.file.sync_data()?;
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
    /// Where appends must stop: the capacity, or `pos` of a segment not allocated.
    limit: usize,
}

/// Most iovecs one `pwritev` takes (Linux's IOV_MAX).
const MAX_IOV: usize = 1024;

impl SegmentWriter {
    /// Where the next append goes (equal to `published` between appends).
    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn remaining(&self) -> usize {
        self.limit - self.pos
    }

    /// Writes `parts`, one after the other, at the write position and moves past them
    /// (not yet visible to readers: see [`Self::publish`]). `Ok(false)`: no room, nothing
    /// written. On an error the position stays, so whatever reached the file is written
    /// over by the next append and never published.
    pub fn write(&mut self, parts: &[&[u8]]) -> io::Result<bool> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > self.remaining() {
            return Ok(false);
        }
        let mut iov: Vec<libc::iovec> = parts
            .iter()
            .filter(|p| !p.is_empty())
            .map(|p| libc::iovec { iov_base: p.as_ptr() as *mut _, iov_len: p.len() })
            .collect();
        let mut at = self.pos;
        let mut first = 0;
        while first < iov.len() {
            let n = (iov.len() - first).min(MAX_IOV);
            // SAFETY: the iovecs point into `parts`, borrowed for this call and only read;
            // the file offset is ours (the one writer, past `published`).
            let rc = unsafe {
                libc::pwritev(self.map.file.as_raw_fd(), iov[first..].as_ptr(), n as libc::c_int, at as libc::off_t)
            };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            // A short write: skip what went, resume within the iovec it stopped in.
            let mut done = rc as usize;
            at += done;
            while done > 0 && first < iov.len() {
                let v = &mut iov[first];
                if done >= v.iov_len {
                    done -= v.iov_len;
                    first += 1;
                } else {
                    // SAFETY: `done < iov_len`: still inside the same part.
                    v.iov_base = unsafe { v.iov_base.cast::<u8>().add(done) }.cast();
                    v.iov_len -= done;
                    done = 0;
                }
            }
            if rc == 0 {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "pwritev wrote nothing"));
            }
        }
        self.pos += len;
        Ok(true)
    }

    /// Makes everything written so far visible to readers.
    pub fn publish(&self) {
        self.map.published.store(self.pos, Ordering::Release);
    }
}
