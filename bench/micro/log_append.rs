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
//!   read-only);
//! - `pwrite-ahead`: `pwrite`, with the background thread reading a window of 8 MiB
//!   ahead of the writer into the page cache (zeroes, from the fallocated blocks), so the
//!   writer overwrites pages that exist instead of taking new ones;
//! - `pwrite-drop`: `pwrite`, with the background thread writing back and dropping from
//!   the page cache (`sync_file_range`, `POSIX_FADV_DONTNEED`) what lies more than
//!   `KEEP` (32 MiB) behind the writer, so the pages the writer takes next are ones just
//!   freed rather than fresh ones;
//! - `direct`: memcpy into a ring of 16 MiB of memory faulted in once and reused, whose
//!   full 1 MiB chunks a background thread writes to a fallocated file opened `O_DIRECT`
//!   (the log's own cache, as Redpanda's): no page-cache page per stored byte. The
//!   writer waits when the ring is full, so the disk's rate bounds it.
//!
//! Why `direct`: on these VMs memory the kernel frees goes back to the hypervisor at once
//! (virtio-balloon free page reporting), so every *fresh* page costs a fault on the host:
//! a log that takes a new page-cache page for every byte it stores slows to the rate the
//! host hands out memory (~420 MB/s, `scripts/bench-fresh-memory.py`) once a run has used
//! what was freed recently. Each cell also records the bytes appended in every second of
//! the run (`per_second`), which shows that fall; set `LOG_APPEND_MIB` high enough (8 GiB)
//! to see it. `LOG_APPEND_MODES` (names, comma-separated) and `LOG_APPEND_SIZES` (bytes)
//! pick cells.
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
    PwriteAhead,
    PwriteDrop,
    Direct,
}

const MODES: [Mode; 8] = [
    Mode::Memcpy,
    Mode::MmapSparse,
    Mode::MmapFallocated,
    Mode::MmapPopulate,
    Mode::Pwrite,
    Mode::PwriteAhead,
    Mode::PwriteDrop,
    Mode::Direct,
];

/// The `direct` mode's ring of reused memory, and the chunk its writer writes at once.
const RING: usize = 16 << 20;

/// How much of what was just written `pwrite-drop` leaves in the page cache.
const KEEP: usize = 32 << 20;

/// Writes `[from, from + len)` of `f` back and drops it from the page cache.
fn drop_range(f: &File, from: usize, len: usize) {
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: plain syscalls on a descriptor we own; no memory is passed.
    unsafe {
        libc::sync_file_range(f.as_raw_fd(), from as i64, len as i64, flags);
        libc::posix_fadvise(f.as_raw_fd(), from as i64, len as i64, libc::POSIX_FADV_DONTNEED);
    }
}
const CHUNK: usize = 1 << 20;

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Memcpy => "memcpy",
            Mode::MmapSparse => "mmap-sparse",
            Mode::MmapFallocated => "mmap-fallocated",
            Mode::MmapPopulate => "mmap-populate",
            Mode::Pwrite => "pwrite",
            Mode::PwriteAhead => "pwrite-ahead",
            Mode::PwriteDrop => "pwrite-drop",
            Mode::Direct => "direct",
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
    let mut opts = OpenOptions::new();
    opts.read(true).write(true).create_new(true);
    if mode == Mode::Direct {
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(libc::O_DIRECT);
    }
    let f = opts.open(&path).expect("create segment");
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
    /// MB appended in each whole second of the run.
    per_second: Vec<f64>,
}

/// The `direct` mode's write-behind: full chunks of the ring go to a thread that writes
/// them with `O_DIRECT`; `done` counts the bytes written, so the appender knows which
/// part of the ring it may reuse.
struct Direct {
    ring: Arc<Map>,
    chunks: std::sync::mpsc::Sender<(Arc<File>, usize, usize)>,
    done: Arc<AtomicUsize>,
    thread: std::thread::JoinHandle<()>,
}

impl Direct {
    fn start() -> Direct {
        let ring = Arc::new(Map::new(None, RING));
        // Faulted in once: from here on the ring is memory the process reuses.
        ring.populate_write(0, RING);
        let (chunks, rx) = std::sync::mpsc::channel::<(Arc<File>, usize, usize)>();
        let done = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (ring, done) = (ring.clone(), done.clone());
            std::thread::spawn(move || {
                for (file, file_at, ring_at) in rx {
                    // SAFETY: `[ring_at, ring_at + CHUNK)` lies inside the ring, which the
                    // appender does not write again until `done` covers it.
                    let chunk = unsafe { std::slice::from_raw_parts(ring.ptr.add(ring_at), CHUNK) };
                    file.write_all_at(chunk, file_at as u64).expect("O_DIRECT pwrite");
                    done.fetch_add(CHUNK, Ordering::Release);
                }
            })
        };
        Direct { ring, chunks, done, thread }
    }
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
            // `pwrite-ahead`: reading the window puts its pages in the page cache.
            let scratch = std::cell::RefCell::new(vec![0u8; WINDOW]);
            let warm = |f: &File, from: usize| {
                let n = WINDOW.min(SEGMENT - from);
                f.read_exact_at(&mut scratch.borrow_mut()[..n], from as u64).expect("read ahead");
            };
            let make = |n: usize| {
                let f = if mode == Mode::Memcpy {
                    File::open("/dev/null").expect("null")
                } else {
                    segment_file(&dir, n, mode)
                };
                let map = match mode {
                    Mode::Memcpy => anon.clone(),
                    Mode::Pwrite | Mode::PwriteAhead | Mode::PwriteDrop | Mode::Direct => None,
                    _ => Some(Arc::new(Map::new(Some(&f), SEGMENT))),
                };
                if mode == Mode::MmapPopulate {
                    if let Some(m) = &map {
                        m.populate_write(0, WINDOW);
                    }
                }
                if mode == Mode::PwriteAhead {
                    warm(&f, 0);
                }
                (f, map)
            };
            let mut next = make(0);
            for n in 0..segments {
                let (f, map) = next;
                let current = map.clone();
                let ahead = matches!(mode, Mode::PwriteAhead | Mode::PwriteDrop).then(|| f.try_clone().expect("dup"));
                if tx.send((f, map)).is_err() {
                    return;
                }
                // The next segment is made while the writer fills this one.
                next = make(n + 1);
                if let (Mode::PwriteDrop, Some(f)) = (mode, &ahead) {
                    // Drop what the writer left more than KEEP behind, a window at a time.
                    let mut dropped = 0;
                    loop {
                        let at = pos.load(Ordering::Acquire);
                        if at >= SEGMENT {
                            break;
                        }
                        if at >= dropped + KEEP + WINDOW {
                            drop_range(f, dropped, WINDOW);
                            dropped += WINDOW;
                        } else {
                            std::thread::sleep(std::time::Duration::from_micros(200));
                        }
                    }
                    // The segment is full: the rest of it goes too.
                    drop_range(f, dropped, SEGMENT - dropped);
                    continue;
                }
                // Keep a window ahead of the writer resident (and, mapped, writable).
                let mut step: Box<dyn FnMut(usize)> = match (mode, current, ahead) {
                    (Mode::MmapPopulate, Some(m), _) => Box::new(move |at| m.populate_write(at, WINDOW)),
                    (Mode::PwriteAhead, _, Some(f)) => Box::new(move |at| warm(&f, at)),
                    _ => continue,
                };
                let mut done = WINDOW;
                while done < SEGMENT {
                    let at = pos.load(Ordering::Acquire);
                    if at >= SEGMENT {
                        break;
                    }
                    if at + WINDOW > done {
                        step(done);
                        done += WINDOW;
                    } else {
                        std::thread::sleep(std::time::Duration::from_micros(200));
                    }
                }
            }
        })
    };
    let direct = (mode == Mode::Direct).then(Direct::start);
    assert!(CHUNK.is_multiple_of(append) && SEGMENT.is_multiple_of(CHUNK) && RING.is_multiple_of(CHUNK));
    let mut per_second: Vec<usize> = Vec::new();
    let started = Instant::now();
    let mut written = 0usize;
    while written < total {
        let (file, map) = rx.recv().expect("segment");
        let file = Arc::new(file);
        pos.store(0, Ordering::Release);
        let mut at = 0usize;
        while at + append <= SEGMENT && written < total {
            let t = Instant::now();
            match (&direct, &map) {
                (Some(d), _) => {
                    // Wait for the writer while the ring holds nothing it has written.
                    while written + append - d.done.load(Ordering::Acquire) > RING {
                        std::hint::spin_loop();
                    }
                    let ring_at = written % RING;
                    // SAFETY: `[ring_at, ring_at + append)` lies inside the ring and the
                    // writer is done with it (checked above).
                    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), d.ring.ptr.add(ring_at), append) };
                    if (at + append).is_multiple_of(CHUNK) {
                        let first = ring_at + append - CHUNK;
                        d.chunks.send((file.clone(), at + append - CHUNK, first)).expect("writer");
                    }
                }
                (None, Some(m)) => {
                    // SAFETY: `[at, at + append)` lies inside the mapping.
                    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), m.ptr.add(at), append) };
                }
                (None, None) => file.write_all_at(&src, at as u64).expect("pwrite"),
            }
            lat.push(t.elapsed().as_nanos().min(u32::MAX as u128) as u32);
            let second = t.duration_since(started).as_secs() as usize;
            if per_second.len() <= second {
                per_second.resize(second + 1, 0);
            }
            per_second[second] += append;
            at += append;
            written += append;
            pos.store(at, Ordering::Release);
        }
        pos.store(SEGMENT, Ordering::Release);
    }
    if let Some(d) = direct {
        // The run is over when the last chunk is on disk.
        while d.done.load(Ordering::Acquire) < written {
            std::thread::yield_now();
        }
        drop(d.chunks);
        let _ = d.thread.join();
    }
    let secs = started.elapsed().as_secs_f64();
    // The last second is cut short by the end of the run: only whole ones count.
    per_second.pop();
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
        per_second: per_second.iter().map(|b| *b as f64 / 1e6).collect(),
    }
}

/// Writes back every dirty page and, where allowed (root), drops the clean ones, so a
/// cell starts with neither another cell's dirty pages nor its cached ones.
///
/// With `LOG_APPEND_QUIESCE` set, it then waits (up to 30 s) until the guest kernel has
/// stopped handing freed memory back to the hypervisor (free page reporting's
/// `reported_kib` unchanged for 3 s), so every sustained cell starts from the same state:
/// otherwise a cell runs fast on whatever the one before it freed and was not yet given
/// back, and the cells' order decides their figures.
fn settle() {
    // SAFETY: sync(2) takes no arguments.
    unsafe { libc::sync() };
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "1");
    if std::env::var_os("LOG_APPEND_QUIESCE").is_none() {
        return;
    }
    let reported = || std::fs::read_to_string("/sys/module/page_reporting/parameters/reported_kib").ok();
    let started = Instant::now();
    let (mut last, mut since) = (reported(), Instant::now());
    while last.is_some() && since.elapsed().as_secs() < 3 && started.elapsed().as_secs() < 30 {
        std::thread::sleep(std::time::Duration::from_millis(250));
        let now = reported();
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
}

/// A figure for the JSON: whole MB/s, or `null` for a run shorter than a second.
fn json_num(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.0}")
    } else {
        "null".into()
    }
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
    let list =
        |var: &str| std::env::var(var).ok().map(|v| v.split(',').map(|x| x.trim().to_string()).collect::<Vec<_>>());
    let modes: Vec<Mode> = match list("LOG_APPEND_MODES") {
        Some(names) => MODES.into_iter().filter(|m| names.iter().any(|n| n == m.name())).collect(),
        None => MODES.to_vec(),
    };
    let sizes: Vec<usize> = match list("LOG_APPEND_SIZES") {
        Some(sizes) => sizes.iter().map(|s| s.parse().expect("LOG_APPEND_SIZES: bytes")).collect(),
        None => vec![1 << 10, 64 << 10],
    };
    let reps: usize = std::env::var("LOG_APPEND_REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let cells: Vec<(usize, Mode)> = sizes.iter().flat_map(|a| modes.iter().map(move |m| (*a, *m))).collect();
    let mut runs: Vec<Vec<Result>> = cells.iter().map(|_| Vec::new()).collect();
    println!("{} MiB per cell, {reps} repetitions interleaved, medians, in {}", total() >> 20, dir.display());
    for _ in 0..reps {
        for (i, (append, mode)) in cells.iter().enumerate() {
            settle();
            runs[i].push(run(*mode, *append, &dir));
        }
    }
    println!(
        "{:<16} {:>7} {:>8} {:>9} {:>9} {:>9} {:>10} {:>12} {:>12}",
        "mode", "append", "GB/s", "p50 µs", "p99 µs", "p99.9 µs", "max µs", "1st s MB/s", "last s MB/s"
    );
    let mut results = Vec::new();
    let mut timelines = Vec::new();
    for ((append, mode), rs) in cells.into_iter().zip(runs) {
        let first = median(&rs, |r| r.per_second.first().copied().unwrap_or(f64::NAN));
        let last = median(&rs, |r| r.per_second.last().copied().unwrap_or(f64::NAN));
        timelines.push((first, last, rs.iter().map(|r| r.per_second.clone()).collect::<Vec<_>>()));
        let r = Result {
            mode,
            append,
            gb_s: median(&rs, |r| r.gb_s),
            p50_us: median(&rs, |r| r.p50_us),
            p99_us: median(&rs, |r| r.p99_us),
            p999_us: median(&rs, |r| r.p999_us),
            max_us: median(&rs, |r| r.max_us),
            per_second: Vec::new(),
        };
        println!(
            "{:<16} {:>7} {:>8.2} {:>9.2} {:>9.2} {:>9.2} {:>10.0} {:>12.0} {:>12.0}",
            r.mode.name(),
            r.append,
            r.gb_s,
            r.p50_us,
            r.p99_us,
            r.p999_us,
            r.max_us,
            first,
            last
        );
        results.push(r);
    }
    if let Some(out) = std::env::var_os("LOG_APPEND_OUT") {
        let rows: Vec<String> = results
            .iter()
            .zip(&timelines)
            .map(|(r, (first, last, reps))| {
                let reps: Vec<String> = reps
                    .iter()
                    .map(|t| format!("[{}]", t.iter().map(|mb| format!("{mb:.0}")).collect::<Vec<_>>().join(",")))
                    .collect();
                format!(
                    "{{\"mode\":\"{}\",\"append_bytes\":{},\"gb_per_s\":{:.3},\"p50_us\":{:.2},\"p99_us\":{:.2},\"p999_us\":{:.2},\"max_us\":{:.0},\"first_second_mb_per_s\":{},\"last_second_mb_per_s\":{},\"per_second_mb\":[{}]}}",
                    r.mode.name(), r.append, r.gb_s, r.p50_us, r.p99_us, r.p999_us, r.max_us, json_num(*first), json_num(*last), reps.join(",")
                )
            })
            .collect();
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let date = std::process::Command::new("date")
            .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let json = format!(
            "{{\"date\":\"{date}\",\"dir\":\"{}\",\"mib_per_cell\":{},\"repetitions\":{reps},\"statistic\":\"median\",\"kernel\":\"{}\",\"results\":[{}]}}\n",
            dir.display(),
            total() >> 20,
            kernel.trim(),
            rows.join(",")
        );
        std::fs::write(&out, json).expect("write results");
    }
}
