//! Shared by the micro-benchmarks.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};

/// CPU seconds (user + system) this process has used.
pub fn cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rfind(')').map_or("", |i| &stat[i + 2..]);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / 100.0
}

/// A thread that connects to `addr` and reads everything until EOF; returns the count.
pub fn spawn_reader(addr: SocketAddr) -> std::thread::JoinHandle<std::io::Result<usize>> {
    std::thread::spawn(move || -> std::io::Result<usize> {
        let mut s = TcpStream::connect(addr)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0;
        loop {
            match s.read(&mut buf)? {
                0 => return Ok(got),
                n => got += n,
            }
        }
    })
}
