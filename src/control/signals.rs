//! SIGTERM, SIGINT and SIGHUP: blocked once the VM's files are open, then
//! taken from a signalfd the control loop polls (QEMU: SHUTDOWN, reason
//! host-signal).

use crate::error::{Error, Result};

/// Signals that end the VM gracefully (QEMU: SHUTDOWN, reason host-signal).
pub(super) const TERM_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// Blocks the termination signals in the calling thread, so threads created
/// afterwards inherit the mask and the controller takes them from a
/// signalfd. Call it first thing in main.
pub fn block_term_signals() -> Result<()> {
    // SAFETY: sigset manipulation on a local set, then pthread_sigmask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in TERM_SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(Error::Io(std::io::Error::from_raw_os_error(rc)));
        }
    }
    Ok(())
}

pub(super) fn signalfd() -> Result<std::os::fd::OwnedFd> {
    // SAFETY: builds a local sigset and creates a new signalfd; the result
    // is checked and owned at once.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in TERM_SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
        if fd < 0 {
            return Err(Error::Io(std::io::Error::last_os_error()));
        }
        Ok(<std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd))
    }
}

pub(super) fn term_signals_blocked() -> bool {
    // SAFETY: queries this thread's mask into a local set.
    unsafe {
        let mut cur: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut cur) == 0 && libc::sigismember(&cur, libc::SIGTERM) == 1
    }
}
