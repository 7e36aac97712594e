//! Building a slot's SQE from its operation and progress (a short read or
//! write continues where it stopped).

use io_uring::{opcode, squeue, types};

use super::Ring;
use crate::op::{BufKind, Fd, Op, STREAM};

impl Ring {
    /// Builds the SQE for slot `idx` from its current progress.
    pub(super) fn build_sqe(&mut self, idx: usize) -> squeue::Entry {
        let sqe = self.build_sqe_for(idx);
        if self.slots[idx].force_async {
            sqe.flags(squeue::Flags::ASYNC)
        } else {
            sqe
        }
    }

    fn build_sqe_for(&mut self, idx: usize) -> squeue::Entry {
        let slot = &mut self.slots[idx];
        let done = slot.done;
        macro_rules! with_fd {
            ($fd:expr, |$f:ident| $body:expr) => {
                match $fd {
                    Fd::Raw(raw) => {
                        let $f = types::Fd(raw);
                        $body
                    }
                    Fd::Fixed(i) => {
                        let $f = types::Fixed(i);
                        $body
                    }
                }
            };
        }
        match &mut slot.op {
            Op::Read { fd, offset, .. } | Op::Write { fd, offset, .. } => {
                let (fd, offset) = (*fd, if *offset == STREAM { STREAM } else { *offset + done as u64 });
                let write = matches!(slot.op, Op::Write { .. });
                let buf = match &mut slot.op {
                    Op::Read { buf, .. } | Op::Write { buf, .. } => buf,
                    _ => unreachable!("matched above"),
                };
                match &mut buf.0 {
                    BufKind::Spent => opcode::Nop::new().build(),
                    BufKind::Owned(v) => {
                        let len = (v.len() - done).min(u32::MAX as usize) as u32;
                        // SAFETY: in bounds; the Vec is owned by the slot until its final CQE.
                        let ptr = unsafe { v.as_mut_ptr().add(done) };
                        with_fd!(fd, |f| if write {
                            opcode::Write::new(f, ptr, len).offset(offset).build()
                        } else {
                            opcode::Read::new(f, ptr, len).offset(offset).build()
                        })
                    }
                    BufKind::Fixed { index, ptr, len } => {
                        let len = (*len - done).min(u32::MAX as usize) as u32;
                        // SAFETY: done < len, so this stays inside the caller's registered range.
                        let ptr = unsafe { ptr.add(done) };
                        with_fd!(fd, |f| if write {
                            opcode::WriteFixed::new(f, ptr, len, *index).offset(offset).build()
                        } else {
                            opcode::ReadFixed::new(f, ptr, len, *index).offset(offset).build()
                        })
                    }
                    BufKind::Iovecs(iov) => {
                        slot.cont_iov = advance_iovecs(iov, done);
                        let (p, n) = (slot.cont_iov.as_ptr(), slot.cont_iov.len() as u32);
                        with_fd!(fd, |f| if write {
                            opcode::Writev::new(f, p, n).offset(offset).build()
                        } else {
                            opcode::Readv::new(f, p, n).offset(offset).build()
                        })
                    }
                }
            }
            Op::Fsync { fd, datasync } => {
                let flags = if *datasync { types::FsyncFlags::DATASYNC } else { types::FsyncFlags::empty() };
                with_fd!(*fd, |f| opcode::Fsync::new(f).flags(flags).build())
            }
            Op::Fallocate { fd, mode, offset, len } => {
                with_fd!(*fd, |f| opcode::Fallocate::new(f, *len).offset(*offset).mode(*mode).build())
            }
            Op::Poll { fd, events, multishot } => opcode::PollAdd::new(types::Fd(*fd), *events).multi(*multishot).build(),
            Op::Timeout { after } => {
                *slot.timespec = types::Timespec::new().sec(after.as_secs()).nsec(after.subsec_nanos());
                opcode::Timeout::new(&*slot.timespec as *const _).build()
            }
            Op::Accept { fd } => opcode::Accept::new(types::Fd(*fd), std::ptr::null_mut(), std::ptr::null_mut()).flags(libc::SOCK_CLOEXEC).build(),
            Op::Nop => opcode::Nop::new().build(),
        }
    }
}

/// The iovecs left after skipping `skip` bytes.
fn advance_iovecs(iov: &[libc::iovec], mut skip: usize) -> Vec<libc::iovec> {
    let mut out = Vec::with_capacity(iov.len());
    for v in iov {
        if skip >= v.iov_len {
            skip -= v.iov_len;
            continue;
        }
        out.push(libc::iovec {
            // SAFETY: skip < iov_len, so the result stays inside the caller's buffer.
            iov_base: unsafe { v.iov_base.cast::<u8>().add(skip) }.cast(),
            iov_len: v.iov_len - skip,
        });
        skip = 0;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_iovecs_skips_whole_and_partial() {
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        let iov = vec![libc::iovec { iov_base: a.as_mut_ptr().cast(), iov_len: 8 }, libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: 8 }];
        let r = advance_iovecs(&iov, 10);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].iov_len, 6);
        assert_eq!(r[0].iov_base as usize, b.as_ptr() as usize + 2);
        assert_eq!(advance_iovecs(&iov, 0).len(), 2);
        assert!(advance_iovecs(&iov, 16).is_empty());
    }
}
