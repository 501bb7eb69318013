//! How the log should put appended bytes into a segment file (issue 10): the options,
//! measured on one core, against plain memcpy bandwidth.
//!
//!     cargo bench --bench log_append                 # files under target/, i.e. on disk
//!     LOG_APPEND_DIR=/dev/shm cargo bench --bench log_append
//!
//! Each option appends `TOTAL` bytes in appends of one size (1 KiB and 64 KiB: a
//! small produce and a max-throughput batch) into 128 MiB segment files made ahead of the
//! writer (as the broker's file worker does), and reports GB/s and the latency of single
//! appends (p50, p99, p99.9, max). A background thread stands for the broker's: it makes
//! the next segment and, for `populate`, faults the next window in ahead of the writer.
//!
//! - `memcpy`: into one anonymous buffer, faulted in once and written over and over: the
//!   bandwidth limit;
//! - `mmap-sparse`: into a shared mapping of a sparse file (slipstream before issue 10);
//! - `mmap-fallocated`: the same, the file's blocks allocated first;
//! - `mmap-populate`: fallocated, and a window of 8 MiB ahead of the writer made resident
//!   and writable by the background thread (`MADV_POPULATE_WRITE`);
//! - `pwrite`: `pwrite(2)` into the page cache of a fallocated file (readers would map it
//!   read-only).
//!
//! Cells run `LOG_APPEND_REPS` times (3 by default), interleaved, each after `sync` and
//! (when allowed) dropping the page cache, so no cell inherits another's dirty pages; the
//! table gives the median of each figure. Prints it and writes JSON to `LOG_APPEND_OUT`
//! if set.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

const SEGMENT: usize = 128 << 20;
const WINDOW: usize = 8 << 20;

fn total() -> usize {
    std::env::var("LOG_APPEND_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024) << 20
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Memcpy,
    MmapSparse,
    MmapFallocated,
    MmapPopulate,
    Pwrite,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Memcpy => "memcpy",
            Mode::MmapSparse => "mmap-sparse",
            Mode::MmapFallocated => "mmap-fallocated",
            Mode::MmapPopulate => "mmap-populate",
            Mode::Pwrite => "pwrite",
        }
    }
}

/// A mapping of `len` bytes of `file` (or anonymous memory), unmapped on drop.
struct Map {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is shared with the populating thread only through raw addresses
// passed to madvise, which does not touch the bytes' values.
unsafe impl Send for Map {}
// SAFETY: as above: only addresses are shared.
unsafe impl Sync for Map {}

impl Map {
    fn new(file: Option<&File>, len: usize) -> Map {
        let (flags, fd) = match file {
            Some(f) => (libc::MAP_SHARED, f.as_raw_fd()),
            None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1),
        };
        // SAFETY: a fresh mapping at an address of the kernel's choosing; checked.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, flags, fd, 0) };
        assert_ne!(p, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
        Map { ptr: p.cast(), len }
    }

    fn populate_write(&self, from: usize, len: usize) {
        let len = len.min(self.len.saturating_sub(from));
        if len == 0 {
            return;
        }
        // SAFETY: a range inside the mapping; MADV_POPULATE_WRITE (23) only faults pages in.
        unsafe { libc::madvise(self.ptr.add(from).cast(), len, 23) };
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: our own mapping, of this length.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn segment_file(dir: &Path, n: usize, mode: Mode) -> File {
    let path = dir.join(format!("{n:08}.log"));
    let _ = std::fs::remove_file(&path);
    let f = OpenOptions::new().read(true).write(true).create_new(true).open(&path).expect("create segment");
    if mode == Mode::MmapSparse {
        f.set_len(SEGMENT as u64).expect("set_len");
    } else {
        // SAFETY: plain syscall on our descriptor.
        let rc = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, SEGMENT as libc::off_t) };
        assert_eq!(rc, 0, "posix_fallocate");
    }
    f
}

struct Result {
    mode: Mode,
    append: usize,
    gb_s: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
}

fn run(mode: Mode, append: usize, dir: &Path) -> Result {
    let total = total();
    let segments = total.div_ceil(SEGMENT);
    let src = vec![0xa5u8; append];
    let mut lat: Vec<u32> = Vec::with_capacity(total / append);
    // Segment files are made ahead of the writer by a background thread, as the broker's
    // file worker does; `populate` also faults in the window ahead of the writer.
    let (tx, rx) = std::sync::mpsc::sync_channel::<(File, Option<Arc<Map>>)>(1);
    let pos = Arc::new(AtomicUsize::new(0));
    let anon = (mode == Mode::Memcpy).then(|| {
        let m = Map::new(None, SEGMENT);
        m.populate_write(0, SEGMENT);
        Arc::new(m)
    });
    let maker = {
        let dir = dir.to_path_buf();
        let pos = pos.clone();
        std::thread::spawn(move || {
            let make = |n: usize| {
                let f = if mode == Mode::Memcpy {
                    File::open("/dev/null").expect("null")
                } else {
                    segment_file(&dir, n, mode)
                };
                let map = match mode {
                    Mode::Memcpy => anon.clone(),
                    Mode::Pwrite => None,
                    _ => Some(Arc::new(Map::new(Some(&f), SEGMENT))),
                };
                if mode == Mode::MmapPopulate {
                    if let Some(m) = &map {
                        m.populate_write(0, WINDOW);
                    }
                }
                (f, map)
            };
            let mut next = make(0);
            for n in 0..segments {
                let (f, map) = next;
                let current = map.clone();
                if tx.send((f, map)).is_err() {
                    return;
                }
                // The next segment is made while the writer fills this one.
                next = make(n + 1);
                if let (Mode::MmapPopulate, Some(m)) = (mode, current) {
                    // Keep a window ahead of the writer resident and writable.
                    let mut done = WINDOW;
                    while done < SEGMENT {
                        let at = pos.load(Ordering::Acquire);
                        if at >= SEGMENT {
                            break;
                        }
                        if at + WINDOW > done {
                            m.populate_write(done, WINDOW);
                            done += WINDOW;
                        } else {
                            std::thread::sleep(std::time::Duration::from_micros(200));
                        }
                    }
                }
            }
        })
    };
    let started = Instant::now();
    let mut written = 0usize;
    while written < total {
        let (file, map) = rx.recv().expect("segment");
        pos.store(0, Ordering::Release);
        let mut at = 0usize;
        while at + append <= SEGMENT && written < total {
            let t = Instant::now();
            match &map {
                Some(m) => {
                    // SAFETY: `[at, at + append)` lies inside the mapping.
                    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), m.ptr.add(at), append) };
                }
                None => file.write_all_at(&src, at as u64).expect("pwrite"),
            }
            lat.push(t.elapsed().as_nanos().min(u32::MAX as u128) as u32);
            at += append;
            written += append;
            pos.store(at, Ordering::Release);
        }
        pos.store(SEGMENT, Ordering::Release);
    }
    let secs = started.elapsed().as_secs_f64();
    drop(rx);
    let _ = maker.join();
    for n in 0..=segments {
        let _ = std::fs::remove_file(dir.join(format!("{n:08}.log")));
    }
    lat.sort_unstable();
    let q = |f: f64| lat[((lat.len() as f64 * f) as usize).min(lat.len() - 1)] as f64 / 1e3;
    Result {
        mode,
        append,
        gb_s: written as f64 / secs / 1e9,
        p50_us: q(0.5),
        p99_us: q(0.99),
        p999_us: q(0.999),
        max_us: *lat.last().unwrap_or(&0) as f64 / 1e3,
    }
}

/// Writes back every dirty page and, where allowed (root), drops the clean ones, so a
/// cell starts with neither another cell's dirty pages nor its cached ones.
fn settle() {
    // SAFETY: sync(2) takes no arguments.
    unsafe { libc::sync() };
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "1");
}

fn median(rs: &[Result], f: fn(&Result) -> f64) -> f64 {
    let mut v: Vec<f64> = rs.iter().map(f).collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("log_append: a measurement; run it with `cargo bench --bench log_append`");
        return;
    }
    let dir: PathBuf = std::env::var_os("LOG_APPEND_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("log-append-bench");
    std::fs::create_dir_all(&dir).expect("bench dir");
    let modes = [Mode::Memcpy, Mode::MmapSparse, Mode::MmapFallocated, Mode::MmapPopulate, Mode::Pwrite];
    let reps: usize = std::env::var("LOG_APPEND_REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let cells: Vec<(usize, Mode)> = [1 << 10, 64 << 10].into_iter().flat_map(|a| modes.map(|m| (a, m))).collect();
    let mut runs: Vec<Vec<Result>> = cells.iter().map(|_| Vec::new()).collect();
    println!("{} MiB per cell, {reps} repetitions interleaved, medians, in {}", total() >> 20, dir.display());
    for _ in 0..reps {
        for (i, (append, mode)) in cells.iter().enumerate() {
            settle();
            runs[i].push(run(*mode, *append, &dir));
        }
    }
    println!(
        "{:<16} {:>7} {:>8} {:>9} {:>9} {:>9} {:>10}",
        "mode", "append", "GB/s", "p50 µs", "p99 µs", "p99.9 µs", "max µs"
    );
    let mut results = Vec::new();
    for ((append, mode), rs) in cells.into_iter().zip(runs) {
        let r = Result {
            mode,
            append,
            gb_s: median(&rs, |r| r.gb_s),
            p50_us: median(&rs, |r| r.p50_us),
            p99_us: median(&rs, |r| r.p99_us),
            p999_us: median(&rs, |r| r.p999_us),
            max_us: median(&rs, |r| r.max_us),
        };
        println!(
            "{:<16} {:>7} {:>8.2} {:>9.2} {:>9.2} {:>9.2} {:>10.0}",
            r.mode.name(),
            r.append,
            r.gb_s,
            r.p50_us,
            r.p99_us,
            r.p999_us,
            r.max_us
        );
        results.push(r);
    }
    if let Some(out) = std::env::var_os("LOG_APPEND_OUT") {
        let rows: Vec<String> = results
            .iter()
            .map(|r| {
                format!(
                    "{{\"mode\":\"{}\",\"append_bytes\":{},\"gb_per_s\":{:.3},\"p50_us\":{:.2},\"p99_us\":{:.2},\"p999_us\":{:.2},\"max_us\":{:.0}}}",
                    r.mode.name(), r.append, r.gb_s, r.p50_us, r.p99_us, r.p999_us, r.max_us
                )
            })
            .collect();
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let json = format!(
            "{{\"dir\":\"{}\",\"mib_per_cell\":{},\"repetitions\":{reps},\"statistic\":\"median\",\"kernel\":\"{}\",\"results\":[{}]}}\n",
            dir.display(),
            total() >> 20,
            kernel.trim(),
            rows.join(",")
        );
        std::fs::write(&out, json).expect("write results");
    }
}
