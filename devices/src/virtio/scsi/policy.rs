//! Disk error policy (QEMU's `werror=` / `rerror=`): what a host I/O error
//! on a LUN's file does to the guest's request.
//!
//! - `report`: the guest gets CHECK CONDITION with the sense for the errno;
//! - `ignore`: the request completes as if it had succeeded;
//! - `stop`: the request is held (not completed), the VM is told to stop
//!   (QEMU's BLOCK_IO_ERROR, run state `io-error`), and on `cont` every
//!   held request is issued again, so none is lost or done twice;
//! - `enospc` (werror only, the default): `stop` for ENOSPC (and EDQUOT),
//!   `report` for anything else.
//!
//! The held requests live on their queue's worker, on its iothread; the
//! VM-side sink hears about each one, and [`retry_held`] (sent to every
//! iothread by [`ErrorControl::retry`]) issues them again.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use ring::{Completion, Fd, Op, Remote, Ring};

use super::{iovecs, Req, Worker, WorkerRef};
use crate::scsi::{self, Sense};

/// What a host I/O error on a LUN does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ErrorAction {
    #[default]
    Report,
    Ignore,
    Stop,
    /// Stop on "no space" (ENOSPC, EDQUOT), report anything else.
    Enospc,
}

impl ErrorAction {
    /// Parses QEMU's spelling; `enospc` only where `allow_enospc`.
    pub fn parse(s: &str, allow_enospc: bool) -> Result<ErrorAction, String> {
        match s {
            "report" => Ok(ErrorAction::Report),
            "ignore" => Ok(ErrorAction::Ignore),
            "stop" => Ok(ErrorAction::Stop),
            "enospc" if allow_enospc => Ok(ErrorAction::Enospc),
            "enospc" => Err("'enospc' is not a valid rerror action (report, ignore, stop)".into()),
            o => Err(format!("'{o}' is not an error action (report, ignore, stop{})", if allow_enospc { ", enospc" } else { "" })),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorAction::Report => "report",
            ErrorAction::Ignore => "ignore",
            ErrorAction::Stop => "stop",
            ErrorAction::Enospc => "enospc",
        }
    }

    /// What this policy does for `errno`: Report, Ignore or Stop.
    pub fn resolve(self, errno: i32) -> ErrorAction {
        match self {
            ErrorAction::Enospc if is_nospace(errno) => ErrorAction::Stop,
            ErrorAction::Enospc => ErrorAction::Report,
            a => a,
        }
    }
}

pub fn is_nospace(errno: i32) -> bool {
    errno == libc::ENOSPC || errno == libc::EDQUOT
}

/// A held request, as the VM is told about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IoError {
    pub lun: usize,
    pub write: bool,
    pub errno: i32,
}

/// Called (on an iothread) for every request a `stop` policy holds.
pub type ErrorSink = Arc<dyn Fn(IoError) + Send + Sync>;

/// One request's file I/O, kept so that it can be issued again.
#[derive(Clone)]
pub(super) enum Io {
    Read { lun: usize, offset: u64, len: u64 },
    Write { lun: usize, offset: u64, len: u64, sync: bool },
    WriteBuf { lun: usize, offset: u64, data: Vec<u8>, sync: bool },
    Flush { lun: usize },
}

impl Io {
    fn lun(&self) -> usize {
        match self {
            Io::Read { lun, .. } | Io::Write { lun, .. } | Io::WriteBuf { lun, .. } | Io::Flush { lun } => *lun,
        }
    }
    fn is_write(&self) -> bool {
        !matches!(self, Io::Read { .. })
    }
}

impl Worker {
    /// Issues `io` for request `r` (again, for a retry).
    pub(super) fn submit_io(w: &WorkerRef, ring: &mut Ring, r: Req, io: Io, in_len: u64) {
        let (source, head, mem, fd) = {
            let wk = w.borrow();
            (wk.setup.source, r.head, wk.setup.mem.clone(), wk.setup.disks.get(io.lun()).and_then(|d| d.fd()))
        };
        // Unplugged while the request was held: answered as for an absent LUN.
        let Some(fd) = fd.map(Fd::Raw) else { return Worker::respond(w, &r, super::S_BAD_TARGET, scsi::GOOD, None, 0, in_len) };
        let (op, sync) = match &io {
            Io::Read { offset, len, .. } => {
                let Some(iov) = iovecs(&mem, &r.data_in, *len) else { return Worker::respond(w, &r, super::S_FAILURE, scsi::GOOD, None, 0, in_len) };
                // SAFETY: the iovecs point into guest RAM, which stays mapped
                // while this worker (holding the memory) lives; the guest
                // gave these buffers to the device until we put the head in
                // the used ring, which happens only in the completion.
                (unsafe { Op::readv(fd, iov, *offset) }, false)
            }
            Io::Write { offset, len, sync, .. } => {
                let Some(iov) = iovecs(&mem, &r.data_out, *len) else { return Worker::respond(w, &r, super::S_FAILURE, scsi::GOOD, None, 0, in_len) };
                // SAFETY: as for reads; the kernel only reads this memory.
                (unsafe { Op::writev(fd, iov, *offset) }, *sync)
            }
            Io::WriteBuf { offset, data, sync, .. } => (Op::write(fd, data.clone(), *offset), *sync),
            Io::Flush { .. } => (Op::Fsync { fd, datasync: true }, false),
        };
        // The handlers run once; they are FnMut for the ring's sake.
        let mut req = Some((r, io));
        if !sync {
            let w2 = w.clone();
            let id = ring.submit(source, op, move |_, c| {
                if let Some((r, io)) = req.take() {
                    Worker::io_finished(&w2, r, io, c.result.map_err(errno_of), in_len);
                }
            });
            return Worker::track(w, head, &[id]);
        }
        // Write, then fdatasync, linked: the response waits for both.
        let first = Rc::new(RefCell::new(None::<i32>));
        let (w2, res1, res2) = (w.clone(), first.clone(), first);
        let ids = ring.submit_linked(
            source,
            vec![
                (
                    op,
                    Box::new(move |_: &mut Ring, c: Completion| {
                        if let Err(e) = c.result {
                            *res1.borrow_mut() = Some(errno_of(e));
                        }
                    }),
                ),
                (
                    Op::Fsync { fd, datasync: true },
                    Box::new(move |_: &mut Ring, c: Completion| {
                        let errno = (*res2.borrow()).or_else(|| c.result.as_ref().err().map(|e| e.raw_os_error().unwrap_or(libc::EIO)));
                        let result = match errno {
                            None => Ok(0),
                            Some(e) => Err(e),
                        };
                        if let Some((r, io)) = req.take() {
                            Worker::io_finished(&w2, r, io, result, in_len);
                        }
                    }),
                ),
            ],
        );
        Worker::track(w, head, &ids);
    }

    /// A request's file I/O finished: respond, or apply the LUN's error
    /// policy.
    fn io_finished(w: &WorkerRef, r: Req, io: Io, result: Result<usize, i32>, in_len: u64) {
        let write = io.is_write();
        let want = match &io {
            Io::Read { len, .. } => *len,
            _ => 0,
        };
        let errno = match result {
            Ok(_) if write => return Worker::respond(w, &r, super::S_OK, scsi::GOOD, None, 0, in_len),
            Ok(n) if n as u64 == want => return Worker::respond(w, &r, super::S_OK, scsi::GOOD, None, n as u64, in_len),
            Ok(n) => {
                // Short read: the file shrank under us.
                crate::warn_limited!("virtio-scsi: short read ({n} of {want} bytes)");
                return Worker::respond(w, &r, super::S_OK, scsi::CHECK_CONDITION, Some(Sense::READ_ERROR), n as u64, in_len);
            }
            Err(libc::ECANCELED) => {
                // Cancelled by a task management function.
                return Worker::respond(w, &r, super::S_ABORTED, scsi::GOOD, None, 0, in_len);
            }
            Err(e) => e,
        };
        let policy = {
            let wk = w.borrow();
            wk.setup.disks.get(io.lun()).map_or(ErrorAction::Report, |d| if write { d.werror } else { d.rerror })
        };
        match policy.resolve(errno) {
            ErrorAction::Ignore => {
                log::debug!("virtio-scsi: host I/O error ignored (errno {errno})");
                Worker::respond(w, &r, super::S_OK, scsi::GOOD, None, want, in_len)
            }
            ErrorAction::Stop => {
                let lun = io.lun();
                let sink = {
                    let mut wk = w.borrow_mut();
                    wk.held.push((r, io, in_len));
                    wk.setup.errors.clone()
                };
                match sink {
                    Some(sink) => sink(IoError { lun, write, errno }),
                    None => log::error!("virtio-scsi: a request is held for a stop error policy, but nobody stops the VM"),
                }
            }
            _ => {
                log::debug!("virtio-scsi: host I/O error: errno {errno}");
                Worker::respond(w, &r, super::S_OK, scsi::CHECK_CONDITION, Some(Sense::from_errno(errno, write)), 0, in_len)
            }
        }
    }
}

fn errno_of(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// Issues every request held on this iothread again (its workers').
pub fn retry_held(ring: &mut Ring) {
    let workers: Vec<WorkerRef> = Worker::all(ring);
    for w in workers {
        let held = std::mem::take(&mut w.borrow_mut().held);
        for (r, io, in_len) in held {
            Worker::submit_io(&w, ring, r, io, in_len);
        }
    }
}

/// Tells a controller's iothreads to issue their held requests again.
#[derive(Clone)]
pub struct ErrorControl {
    pub(super) iothreads: Vec<Remote>,
}

impl ErrorControl {
    pub fn retry(&self) {
        for r in &self.iothreads {
            if let Err(e) = r.send(retry_held) {
                log::error!("virtio-scsi: cannot retry held requests on {}: {e}", r.name());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_spellings_and_defaults() {
        assert_eq!(ErrorAction::parse("enospc", true), Ok(ErrorAction::Enospc));
        assert!(ErrorAction::parse("enospc", false).is_err());
        assert!(ErrorAction::parse("bogus", true).unwrap_err().contains("'bogus'"));
        for a in [ErrorAction::Report, ErrorAction::Ignore, ErrorAction::Stop, ErrorAction::Enospc] {
            assert_eq!(ErrorAction::parse(a.as_str(), true), Ok(a));
        }
        assert_eq!(ErrorAction::Enospc.resolve(libc::ENOSPC), ErrorAction::Stop);
        assert_eq!(ErrorAction::Enospc.resolve(libc::EDQUOT), ErrorAction::Stop);
        assert_eq!(ErrorAction::Enospc.resolve(libc::EIO), ErrorAction::Report);
        assert_eq!(ErrorAction::Stop.resolve(libc::EIO), ErrorAction::Stop);
        assert_eq!(ErrorAction::Ignore.resolve(libc::ENOSPC), ErrorAction::Ignore);
    }
}
