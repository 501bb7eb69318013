//! RAII wrappers over the verbs and connection-manager objects the RDMA transport and the
//! bridge use, on the `rdma-mummy-sys` bindings (which load rdma-core at run time, so the
//! binary builds and starts on machines without it; every call then fails `EOPNOTSUPP`).
//!
//! Each object owns its handle (`NonNull`) and releases it in `Drop`; children keep their
//! parent alive with an `Arc` (memory regions, queues and the shared receive queue hold
//! their protection domain; a connection id holds its event channel).
//!
//! # Invariants
//! - Memory named by a posted work request (an SGE's address and lkey) stays mapped and
//!   registered until that request's completion has been polled: the callers own the
//!   buffers and `post_*` are `unsafe fn` saying so.
//! - A queue pair is destroyed before its connection id, and both before the completion
//!   queues, shared receive queue and protection domain they use (the owners declare their
//!   fields in that order).
//! - The verbs device context belongs to librdmacm, which keeps it open while any id on
//!   the device exists; a protection domain is allocated from an id that outlives it
//!   (the broker's listening id, the bridge connection's own id).
//!
//! The parts: `cm` (the connection manager: event channels, events, ids and the queue
//! pairs they carry), `objects` (protection domains, memory regions, completion channels
//! and queues, shared receive queues, work requests and posting), `poll` (waiting on the
//! file descriptors they expose).
#![allow(unsafe_code)]

use rdma_mummy_sys as sys;
use std::ffi::c_void;
use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::ptr::{null_mut, NonNull};
use std::sync::Arc;

mod cm;
mod objects;
mod poll;

pub use cm::*;
pub use objects::*;
pub use poll::*;

fn last_err(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn check(rc: i32, what: &str) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else if rc > 0 {
        // Verbs calls return a positive errno; rdma_cm calls return -1 and set errno.
        let e = io::Error::from_raw_os_error(rc);
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    } else {
        Err(last_err(what))
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own, with valid commands.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(last_err("fcntl(O_NONBLOCK)"));
    }
    Ok(())
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is a valid (AF_UNSPEC) value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage, which is suitably aligned.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}
