//! `slipstream bridge`: runs on the client host, accepts Kafka TCP connections and carries
//! each one over its own RDMA connection to a broker serving `--transport rdma`.
//!
//! Clients change nothing but their bootstrap address: Metadata, FindCoordinator and
//! DescribeCluster answers are rewritten ([`super::rewrite`]) to name the bridge,
//! so every later connection comes through it too. All other bytes pass through
//! untouched: requests are cut into RDMA messages as credits allow, and responses are
//! written to the TCP socket straight from the landing ring the broker RDMA-writes into.
//!
//! One thread per client connection, sleeping in `poll(2)` on the socket and the RDMA
//! connection's channels: a bridge serves a host's clients, not thousands.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::rewrite::{self, RequestLog, Responses};
use crate::transport::rdma::stream::{RdmaStream, StreamOptions};
use crate::transport::rdma::verbs;

#[derive(Debug, Clone, clap::Args)]
pub struct BridgeArgs {
    /// Where Kafka clients connect (TCP).
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub listen: String,
    /// The slipstream broker serving `--transport rdma` (its RDMA address and port).
    #[arg(long)]
    pub upstream: String,
    /// The address put in metadata answers [default: the listen address].
    #[arg(long)]
    pub advertise: Option<String>,
    /// Size of each connection's landing ring, in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    pub ring_bytes: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("bad address {0:?}: {1}")]
    Address(String, String),
    #[error("cannot listen on {0}: {1}")]
    Listen(String, io::Error),
}

fn resolve(s: &str) -> Result<SocketAddr, BridgeError> {
    s.to_socket_addrs()
        .map_err(|e| BridgeError::Address(s.into(), e.to_string()))?
        .next()
        .ok_or_else(|| BridgeError::Address(s.into(), "resolves to nothing".into()))
}

fn host_port(s: &str) -> Result<(String, u16), BridgeError> {
    let (h, p) = s.rsplit_once(':').ok_or_else(|| BridgeError::Address(s.into(), "expected HOST:PORT".into()))?;
    let p = p.parse().map_err(|_| BridgeError::Address(s.into(), "bad port".into()))?;
    Ok((h.trim_matches(|c| c == '[' || c == ']').to_string(), p))
}

/// Serves until `stop` is set.
pub fn run(args: &BridgeArgs, stop: Arc<AtomicBool>) -> Result<(), BridgeError> {
    let upstream = resolve(&args.upstream)?;
    let listener =
        TcpListener::bind(resolve(&args.listen)?).map_err(|e| BridgeError::Listen(args.listen.clone(), e))?;
    let local = listener.local_addr().map_err(|e| BridgeError::Listen(args.listen.clone(), e))?;
    let (host, port) = host_port(args.advertise.as_deref().unwrap_or(&local.to_string()))?;
    log::info!("bridge: Kafka on {local} -> RDMA {upstream}; advertising {host}:{port}");
    listener.set_nonblocking(true).map_err(|e| BridgeError::Listen(args.listen.clone(), e))?;
    let opts = StreamOptions { ring_len: args.ring_bytes, ..StreamOptions::default() };
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((tcp, peer)) => {
                let (host, stop) = (host.clone(), stop.clone());
                let spawned = std::thread::Builder::new().name(format!("bridge {peer}")).spawn(move || {
                    match serve_conn(tcp, upstream, opts, &host, port, &stop) {
                        Ok(()) => log::debug!("bridge: {peer} done"),
                        // A client that hung up with answers on the way.
                        Err(e) if matches!(e.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset) => {
                            log::debug!("bridge: {peer}: {e}")
                        }
                        Err(e) => log::warn!("bridge: {peer}: {e}"),
                    }
                });
                if let Err(e) = spawned {
                    log::error!("bridge: cannot start a connection thread: {e}");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let _ = verbs::wait_readable(&[listener.as_raw_fd()], Some(Duration::from_millis(200)));
            }
            Err(e) => log::warn!("bridge: accept: {e}"),
        }
    }
    Ok(())
}

fn serve_conn(
    mut tcp: TcpStream,
    upstream: SocketAddr,
    opts: StreamOptions,
    host: &str,
    port: u16,
    stop: &AtomicBool,
) -> io::Result<()> {
    let mut rdma = RdmaStream::connect(upstream, opts)?;
    tcp.set_nodelay(true)?;
    tcp.set_nonblocking(true)?;
    let mut requests = RequestLog::default();
    let mut inbuf = vec![0u8; 64 * 1024];
    let (mut in_off, mut in_len) = (0usize, 0usize);
    let mut out: Vec<u8> = Vec::new(); // rewritten frames and prefixes waiting for the socket
    let mut responses = Responses::new(rewrite::Fixed::new(host, port));
    let mut client_open = true;
    let invalid = |e: rewrite::RewriteError| io::Error::new(io::ErrorKind::InvalidData, e.to_string());
    while !stop.load(Ordering::Relaxed) {
        rdma.progress()?;
        if let Some(why) = rdma.closed() {
            return Err(io::Error::new(io::ErrorKind::ConnectionReset, why.to_string()));
        }
        // Client -> broker.
        if in_off == in_len && client_open {
            match tcp.read(&mut inbuf) {
                Ok(0) => client_open = false,
                Ok(n) => {
                    requests.observe(&inbuf[..n]).map_err(invalid)?;
                    (in_off, in_len) = (0, n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        if in_off < in_len {
            in_off += rdma.write(&inbuf[in_off..in_len])?;
        }
        // Broker -> client.
        let mut socket_full = false;
        loop {
            if !out.is_empty() {
                match tcp.write(&out) {
                    Ok(n) => {
                        out.drain(..n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        socket_full = true;
                        break;
                    }
                    Err(e) => return Err(e),
                }
                if !out.is_empty() {
                    socket_full = true;
                    break;
                }
            }
            let avail = rdma.readable();
            if avail.is_empty() {
                break;
            }
            match responses.passing() {
                None => {
                    let n = responses.take(avail, &mut requests, &mut out).map_err(invalid)?;
                    rdma.consume(n)?;
                }
                Some(_) if !out.is_empty() => continue, // the prefix goes first
                Some(left) => match tcp.write(&avail[..left.min(avail.len())]) {
                    Ok(w) => {
                        responses.passed(w);
                        rdma.consume(w)?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        socket_full = true;
                        break;
                    }
                    Err(e) => return Err(e),
                },
            }
        }
        rdma.report_freed()?;
        // A client that closed its sending side still gets every answer it is owed.
        if !client_open && in_off == in_len && requests.is_empty() && responses.between_frames() && out.is_empty() {
            return Ok(());
        }
        // Sleep until something can move.
        let pending_in = in_off < in_len;
        let [a, b] = rdma.fds();
        let mut fds = vec![(a, false), (b, false)];
        if !pending_in && client_open {
            fds.push((tcp.as_raw_fd(), false));
        }
        if socket_full {
            fds.push((tcp.as_raw_fd(), true));
        }
        verbs::wait_fds(&mut fds, Some(Duration::from_millis(100)))?;
    }
    Ok(())
}
