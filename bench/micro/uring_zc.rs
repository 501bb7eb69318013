//! Where does io_uring zero-copy send start to pay? Sends the same payload through the
//! real `UringTransport` with copying `SENDMSG` and with `SENDMSG_ZC`, at several sizes,
//! to a plain reader over loopback, and prints throughput and the process's CPU time per
//! GiB for each, plus the crossover (the smallest size where zero-copy costs less CPU per
//! byte without losing throughput).
//!
//!     cargo bench --bench uring_zc
//!
//! Figures are ratios within one run; the machine is shared and noisy.

#[path = "common.rs"]
mod common;
use bytes::Bytes;
use common::{cpu_s, spawn_reader};
use slipstream::buffer::Chunk;
use slipstream::transport::uring::{UringOptions, UringTransport};
use slipstream::transport::{Completion, Transport};

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

/// Sends `total` bytes in `size`-byte sends, 8 in flight; returns (GiB/s, CPU s per GiB).
fn run(size: usize, total: usize, zc: bool) -> anyhow::Result<(f64, f64)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr: SocketAddr = listener.local_addr()?;
    let opts = UringOptions { zc_threshold: if zc { 1 } else { usize::MAX }, ..UringOptions::default() };
    let mut t = UringTransport::new(vec![listener], opts)?;
    let reader = spawn_reader(addr);
    let mut out = Vec::new();
    let conn = loop {
        t.poll(Some(Duration::from_millis(100)), &mut out)?;
        if let Some(Completion::Accepted { conn, .. }) = out.drain(..).next() {
            break conn;
        }
    };
    let payload = Bytes::from(vec![0xa5u8; size]);
    let sends = total / size;
    let (mut submitted, mut done) = (0usize, 0usize);
    let cpu0 = cpu_s();
    let t0 = Instant::now();
    while done < sends {
        while submitted < sends && submitted - done < 8 {
            t.send(conn, vec![Chunk::Heap(payload.clone())]);
            submitted += 1;
        }
        t.poll(Some(Duration::from_millis(100)), &mut out)?;
        done += out.drain(..).filter(|c| matches!(c, Completion::Sent { .. })).count();
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_s() - cpu0;
    t.close(conn);
    for _ in 0..20 {
        t.poll(Some(Duration::from_millis(10)), &mut out)?;
    }
    drop(t);
    let got = reader.join().map_err(|_| anyhow::anyhow!("reader panicked"))??;
    anyhow::ensure!(got == sends * size, "reader got {got} of {} bytes", sends * size);
    let gib = (sends * size) as f64 / (1u64 << 30) as f64;
    Ok((gib / secs, cpu / gib))
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs bench binaries without
    // it, and a 12 GiB measurement is no test.
    if !std::env::args().any(|a| a == "--bench") {
        println!("uring_zc: a measurement; run it with `cargo bench --bench uring_zc`");
        return Ok(());
    }
    let total = 1usize << 30;
    println!("{:>9} {:>12} {:>12} {:>14} {:>14}", "size", "copy GiB/s", "zc GiB/s", "copy cpu s/GiB", "zc cpu s/GiB");
    let mut crossover = None;
    for size in [1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20] {
        let (ct, cc) = run(size, total, false)?;
        let (zt, zcpu) = run(size, total, true)?;
        println!("{size:>9} {ct:>12.2} {zt:>12.2} {cc:>14.2} {zcpu:>14.2}");
        if crossover.is_none() && zcpu < cc && zt >= ct * 0.95 {
            crossover = Some(size);
        }
    }
    match crossover {
        Some(s) => println!("crossover: zero-copy pays from {s} bytes"),
        None => println!("crossover: none up to 1 MiB here (loopback copies zero-copy skbs on receive anyway)"),
    }
    Ok(())
}
