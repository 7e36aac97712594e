//! Registered files and buffers (fixed descriptors, fixed buffers).

use std::os::fd::RawFd;

use super::{Fd, Ring};
use crate::{Error, Result};

impl Ring {
    /// Registers `fd` as a fixed file.
    pub fn register_fd(&mut self, fd: RawFd) -> Result<Fd> {
        let idx = self.fixed.iter().position(|u| !u).ok_or(Error::FixedFilesFull)?;
        self.uring.submitter().register_files_update(idx as u32, &[fd]).map_err(Error::RegisterFiles)?;
        self.fixed[idx] = true;
        Ok(Fd::Fixed(idx as u32))
    }

    /// Removes a fixed file (its in-flight operations keep their reference).
    pub fn unregister_fd(&mut self, fd: Fd) -> Result<()> {
        if let Fd::Fixed(idx) = fd {
            self.uring.submitter().register_files_update(idx, &[-1]).map_err(Error::RegisterFiles)?;
            if let Some(u) = self.fixed.get_mut(idx as usize) {
                *u = false;
            }
        }
        Ok(())
    }

    /// Registers `len` bytes at `ptr` as a fixed buffer; returns its index
    /// for [`Op::read_fixed`]/[`Op::write_fixed`]. Fails (e.g. ENOMEM under
    /// RLIMIT_MEMLOCK) without side effects, so callers can fall back to
    /// plain reads and writes.
    ///
    /// # Safety
    /// The memory must stay mapped until [`Ring::unregister_buffer`] or the
    /// ring is dropped (the kernel pins it).
    pub unsafe fn register_buffer(&mut self, ptr: *mut u8, len: usize) -> Result<u16> {
        let idx = self.buffers.iter().position(|u| !u).ok_or(Error::FixedBuffersFull)?;
        let iov = [libc::iovec { iov_base: ptr.cast(), iov_len: len }];
        // SAFETY: the caller guarantees the memory outlives the registration.
        unsafe { self.uring.submitter().register_buffers_update(idx as u32, &iov, None) }.map_err(Error::RegisterBuffers)?;
        self.buffers[idx] = true;
        Ok(idx as u16)
    }

    /// Releases a fixed buffer (operations in flight keep their pin).
    pub fn unregister_buffer(&mut self, index: u16) -> Result<()> {
        let iov = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }];
        // SAFETY: an empty iovec clears the slot; no memory is referenced.
        unsafe { self.uring.submitter().register_buffers_update(u32::from(index), &iov, None) }.map_err(Error::RegisterBuffers)?;
        if let Some(u) = self.buffers.get_mut(index as usize) {
            *u = false;
        }
        Ok(())
    }
}
