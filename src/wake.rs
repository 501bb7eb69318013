//! Waking a sleeping core from another thread: the one cross-thread signal every layer
//! shares (the broker's notifier wakes cores with parked requests, cores wake each other
//! for partition operations, the signal thread wakes them all for shutdown).
//!
//! It sits below every layer because both its users and its implementors span them: the
//! transports implement [`Wake`] on what their poll sleeps in (mio's waker for epoll, an
//! [`EventFd`] armed as a read on the ring for io_uring, an [`EventFd`] polled beside the
//! completion channels for RDMA), and the broker and dispatch call it without knowing
//! which.
#![allow(unsafe_code)]

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

/// Makes a blocked transport poll return.
pub trait Wake: Send + Sync {
    fn wake(&self);
}

/// A non-blocking eventfd: a counter a sleeping poller watches.
pub struct EventFd(File);

impl EventFd {
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd(2) with valid flags and no pointers; the result is checked.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `efd` is a fresh descriptor nobody else owns; the File closes it.
        Ok(EventFd(unsafe { File::from_raw_fd(efd) }))
    }

    pub fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Resets the counter (for pollers that do not read it themselves).
    pub fn drain(&self) {
        let mut v = [0u8; 8];
        // WouldBlock: nothing to reset.
        let _ = (&self.0).read(&mut v);
    }
}

impl Wake for EventFd {
    fn wake(&self) {
        // WouldBlock only if the counter is at its maximum: the poller is woken already.
        if let Err(e) = (&self.0).write(&1u64.to_ne_bytes()) {
            if e.kind() != io::ErrorKind::WouldBlock {
                log::warn!("waking a core failed: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wake_makes_the_fd_readable_and_drain_resets_it() {
        let e = EventFd::new().expect("eventfd");
        let mut fds = [libc::pollfd { fd: e.fd(), events: libc::POLLIN, revents: 0 }];
        let readable = |fds: &mut [libc::pollfd; 1]| {
            // SAFETY: one valid pollfd in a live local array; zero timeout.
            unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) == 1 }
        };
        assert!(!readable(&mut fds));
        e.wake();
        e.wake();
        assert!(readable(&mut fds));
        e.drain();
        assert!(!readable(&mut fds));
    }
}
