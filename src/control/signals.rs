//! SIGTERM, SIGINT and SIGHUP: blocked once the VM's files are open, then
//! taken from a signalfd the control loop polls (QEMU: SHUTDOWN, reason
//! host-signal).

use crate::error::{Error, Result};

/// Signals that end the VM gracefully (QEMU: SHUTDOWN, reason host-signal).
pub(super) const TERM_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// The termination signals as a set (vmm-sys-util builds it).
fn term_set() -> Result<libc::sigset_t> {
    vmm_sys_util::signal::create_sigset(&TERM_SIGNALS).map_err(|e| Error::Io(std::io::Error::from_raw_os_error(e.errno())))
}

/// Blocks the termination signals in the calling thread, so threads created
/// afterwards inherit the mask and the controller takes them from a
/// signalfd. Call it first thing in main.
pub fn block_term_signals() -> Result<()> {
    let set = term_set()?;
    // SAFETY: pthread_sigmask reads the set we own; no old mask is asked for.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(Error::Io(std::io::Error::from_raw_os_error(rc)));
    }
    Ok(())
}

pub(super) fn signalfd() -> Result<std::os::fd::OwnedFd> {
    let set = term_set()?;
    // SAFETY: creates a new signalfd from the set we own; the result is
    // checked and owned at once.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    if fd < 0 {
        return Err(Error::Io(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a new descriptor nobody else owns.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

pub(super) fn term_signals_blocked() -> bool {
    vmm_sys_util::signal::get_blocked_signals().is_ok_and(|b| b.contains(&libc::SIGTERM))
}
