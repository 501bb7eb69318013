//! Waiting on the file descriptors the verbs objects expose.

use super::*;

/// Waits until one of `fds` is readable or `timeout` passes (`None`: forever). Returns
/// whether any is readable.
pub fn wait_readable(fds: &[RawFd], timeout: Option<std::time::Duration>) -> io::Result<bool> {
    let mut want: Vec<(RawFd, bool)> = fds.iter().map(|&fd| (fd, false)).collect();
    Ok(wait_fds(&mut want, timeout)?.iter().any(|&r| r))
}

/// `poll(2)`: waits for readability of each `(fd, false)` and writability of each
/// `(fd, true)`; returns which are ready.
pub fn wait_fds(fds: &mut [(RawFd, bool)], timeout: Option<std::time::Duration>) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&(fd, write)| libc::pollfd { fd, events: if write { libc::POLLOUT } else { libc::POLLIN }, revents: 0 })
        .collect();
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
    // SAFETY: `pfds` is a live array of `pfds.len()` pollfd structs.
    let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted { Ok(vec![false; fds.len()]) } else { Err(e) };
    }
    Ok(pfds.iter().map(|p| p.revents != 0).collect())
}
