//! The physical limit, measured in the same run: a raw TCP ping-pong of the workload's
//! message size over loopback, with blocking sockets and with both ends busy-polling.
//! Every broker latency is also reported as a multiple of this.

use anyhow::Context;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use super::stats::Latency;

fn read_full(s: &mut TcpStream, buf: &mut [u8], spin: bool) -> std::io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if spin && e.kind() == ErrorKind::WouldBlock => std::hint::spin_loop(),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn write_full(s: &mut TcpStream, buf: &[u8], spin: bool) -> std::io::Result<()> {
    let mut put = 0;
    while put < buf.len() {
        match s.write(&buf[put..]) {
            Ok(n) => put += n,
            Err(e) if spin && e.kind() == ErrorKind::WouldBlock => std::hint::spin_loop(),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Round-trip times of `size`-byte ping-pongs for `duration` (after a short warm-up).
pub fn ping_pong(size: usize, duration: Duration, busy_poll: bool) -> anyhow::Result<Latency> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding the echo server")?;
    let addr = listener.local_addr()?;
    let server = thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        s.set_nonblocking(busy_poll)?;
        let mut buf = vec![0u8; size];
        loop {
            match read_full(&mut s, &mut buf, busy_poll) {
                Ok(()) => write_full(&mut s, &buf, busy_poll)?,
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    });
    let mut c = TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    c.set_nonblocking(busy_poll)?;
    let msg = vec![0x5au8; size];
    let mut buf = vec![0u8; size];
    let mut lat = Latency::default();
    let warm_until = Instant::now() + Duration::from_millis(300);
    let until = warm_until + duration;
    loop {
        let t = Instant::now();
        if t >= until {
            break;
        }
        write_full(&mut c, &msg, busy_poll)?;
        read_full(&mut c, &mut buf, busy_poll)?;
        if t >= warm_until {
            lat.record_ns(t.elapsed().as_nanos() as u64);
        }
    }
    drop(c);
    server.join().map_err(|_| anyhow::anyhow!("echo server panicked"))??;
    Ok(lat)
}
