//! Two io_uring features the transport does *not* use, measured so the choice is evidence:
//!
//! 1. **Registered buffers.** For sockets, only zero-copy sends take a registered buffer
//!    (`IORING_RECVSEND_FIXED_BUF`: the pages are pinned once, not per send). Our payloads
//!    live in file-backed mmap'd segments: the first lines try to register such a mapping
//!    (on the filesystem of `target/`, where `./data` usually lives, and on /dev/shm). Then
//!    `SEND_ZC` from anonymous memory, registered versus not, shows what registering would
//!    buy where it is allowed.
//! 2. **Linked sends.** Pipelined responses on one connection must leave in order. The
//!    transport keeps one `SENDMSG` in flight per connection and coalesces what queues
//!    behind it into the next one's iovecs; the alternative is a chain of `SEND`s linked with
//!    `IOSQE_IO_LINK`. Both send bursts of 16 × 512 B responses to a loopback reader.
//!
//!     cargo bench --bench uring_ops
//!
//! Figures are ratios within one run; the machine is shared and noisy.

#[path = "common.rs"]
mod common;
use common::{cpu_s, spawn_reader};
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Instant;

/// A connected pair: our sending socket and a thread that reads everything until EOF.
fn pair() -> anyhow::Result<(TcpStream, std::thread::JoinHandle<std::io::Result<usize>>)> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let reader = spawn_reader(addr);
    let (s, _) = l.accept()?;
    s.set_nodelay(true)?;
    Ok((s, reader))
}

fn try_register(path: &std::path::Path) -> String {
    let run = || -> anyhow::Result<String> {
        let mut f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path)?;
        f.write_all(&vec![7u8; 1 << 20])?;
        // SAFETY: the file is ours, private to this function, and not resized while mapped.
        // Shared and writable, like the log's active segment.
        let mut map = unsafe { memmap2::MmapMut::map_mut(&f)? };
        let ring = IoUring::new(8)?;
        let iov = [libc::iovec { iov_base: map.as_mut_ptr().cast(), iov_len: map.len() }];
        // SAFETY: the mapping outlives the registration (unregistered when the ring drops,
        // before `map`).
        let r = unsafe { ring.submitter().register_buffers(&iov) };
        drop(ring);
        drop(map);
        let _ = std::fs::remove_file(path);
        Ok(match r {
            Ok(()) => "registered".into(),
            Err(e) => format!("refused: {e}"),
        })
    };
    run().unwrap_or_else(|e| format!("could not try: {e}"))
}

/// Sends `total` bytes as `size`-byte `SEND_ZC`s from one anonymous buffer, 8 in flight,
/// registered (`fixed`) or not. Returns (GiB/s, CPU s per GiB).
fn send_zc(size: usize, total: usize, fixed: bool) -> anyhow::Result<(f64, f64)> {
    let (sock, reader) = pair()?;
    let mut ring = IoUring::new(64)?;
    let buf = vec![0xa5u8; size];
    if fixed {
        let iov = [libc::iovec { iov_base: buf.as_ptr() as *mut _, iov_len: size }];
        // SAFETY: `buf` outlives the ring (dropped after it at the end of this function).
        unsafe { ring.submitter().register_buffers(&iov)? };
    }
    let sends = total / size;
    let (mut submitted, mut results, mut notifs) = (0usize, 0usize, 0usize);
    let (cpu0, t0) = (cpu_s(), Instant::now());
    while notifs < sends {
        while submitted < sends && submitted - notifs < 8 {
            let mut op =
                opcode::SendZc::new(types::Fd(sock.as_raw_fd()), buf.as_ptr(), size as u32).flags(libc::MSG_WAITALL);
            if fixed {
                op = op.buf_index(Some(0));
            }
            // SAFETY: `buf` lives until every notification has arrived (loop condition).
            unsafe { ring.submission().push(&op.build().user_data(1)) }
                .map_err(|_| anyhow::anyhow!("submission queue full"))?;
            submitted += 1;
        }
        ring.submit_and_wait(1)?;
        for c in ring.completion() {
            if cqueue::notif(c.flags()) {
                notifs += 1;
            } else {
                anyhow::ensure!(c.result() == size as i32, "short or failed send: {}", c.result());
                results += 1;
                if !cqueue::more(c.flags()) {
                    notifs += 1; // no notification will follow
                }
            }
        }
    }
    let (secs, cpu) = (t0.elapsed().as_secs_f64(), cpu_s() - cpu0);
    anyhow::ensure!(results == sends, "lost completions");
    drop(sock);
    let got = reader.join().map_err(|_| anyhow::anyhow!("reader panicked"))??;
    anyhow::ensure!(got == total / size * size, "reader got {got}");
    let gib = got as f64 / (1u64 << 30) as f64;
    Ok((gib / secs, cpu / gib))
}

const BURST: usize = 16;
const MSG: usize = 512;

/// Sends `bursts` bursts of 16 × 512 B, one burst in flight: as one `SENDMSG` with 16
/// iovecs (`linked == false`, the transport's way) or as 16 `SEND`s linked in a chain.
/// Returns (messages/s, CPU µs per burst).
fn bursts(bursts: usize, linked: bool) -> anyhow::Result<(f64, f64)> {
    let (sock, reader) = pair()?;
    let mut ring = IoUring::new(64)?;
    let msgs: Vec<Vec<u8>> = (0..BURST).map(|i| vec![i as u8; MSG]).collect();
    let iov: Vec<libc::iovec> =
        msgs.iter().map(|m| libc::iovec { iov_base: m.as_ptr() as *mut _, iov_len: m.len() }).collect();
    // SAFETY: an all-zero msghdr is valid; it points at `iov`, which outlives the ring's use.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = iov.as_ptr() as *mut _;
    hdr.msg_iovlen = iov.len();
    let fd = types::Fd(sock.as_raw_fd());
    let (cpu0, t0) = (cpu_s(), Instant::now());
    for _ in 0..bursts {
        let expected = if linked { BURST } else { 1 };
        if linked {
            for (i, m) in msgs.iter().enumerate() {
                let mut e = opcode::Send::new(fd, m.as_ptr(), MSG as u32).flags(libc::MSG_WAITALL).build();
                if i + 1 < BURST {
                    e = e.flags(squeue::Flags::IO_LINK);
                }
                // SAFETY: `msgs` outlives the op (we wait for its completion below).
                unsafe { ring.submission().push(&e) }.map_err(|_| anyhow::anyhow!("submission queue full"))?;
            }
        } else {
            let e = opcode::SendMsg::new(fd, &hdr).flags(libc::MSG_WAITALL as u32).build();
            // SAFETY: `hdr`, `iov` and `msgs` outlive the op (we wait for it below).
            unsafe { ring.submission().push(&e) }.map_err(|_| anyhow::anyhow!("submission queue full"))?;
        }
        ring.submit_and_wait(expected)?;
        let mut done = 0;
        while done < expected {
            for c in ring.completion() {
                anyhow::ensure!(c.result() > 0, "send failed: {}", c.result());
                done += 1;
            }
            if done < expected {
                ring.submit_and_wait(1)?;
            }
        }
    }
    let (secs, cpu) = (t0.elapsed().as_secs_f64(), cpu_s() - cpu0);
    drop(sock);
    let got = reader.join().map_err(|_| anyhow::anyhow!("reader panicked"))??;
    anyhow::ensure!(got == bursts * BURST * MSG, "reader got {got}");
    Ok(((bursts * BURST) as f64 / secs, cpu / bursts as f64 * 1e6))
}

fn main() -> anyhow::Result<()> {
    if !std::env::args().any(|a| a == "--bench") {
        // `cargo test --all-targets` runs bench binaries without --bench.
        println!("uring_ops: a measurement; run it with `cargo bench --bench uring_ops`");
        return Ok(());
    }
    println!("registering a file-backed mapping as an io_uring fixed buffer:");
    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/uring-regbuf-probe.dat");
    println!("  filesystem of target/ (like ./data): {}", try_register(&target));
    println!(
        "  /dev/shm (tmpfs):                    {}",
        try_register(std::path::Path::new("/dev/shm/uring-regbuf-probe"))
    );

    println!("\nSEND_ZC from anonymous memory, registered vs not (256 MiB each, loopback):");
    println!(
        "{:>8} {:>14} {:>14} {:>16} {:>16}",
        "size", "GiB/s plain", "GiB/s fixed", "CPU s/GiB plain", "CPU s/GiB fixed"
    );
    for size in [16 << 10, 64 << 10, 256 << 10, 1 << 20] {
        let (p, pc) = send_zc(size, 256 << 20, false)?;
        let (f, fc) = send_zc(size, 256 << 20, true)?;
        println!("{:>7}K {p:>14.2} {f:>14.2} {pc:>16.3} {fc:>16.3}", size >> 10);
    }

    println!("\nbursts of {BURST} x {MSG} B responses on one connection, one burst in flight (20000 bursts):");
    for linked in [false, true] {
        let (mps, us) = bursts(20_000, linked)?;
        let name = if linked { "16 linked SENDs" } else { "1 SENDMSG, 16 iovecs" };
        println!("  {name:<22} {mps:>12.0} msg/s {us:>8.2} CPU µs/burst");
    }
    Ok(())
}
