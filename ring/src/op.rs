//! What a ring is asked to do: operations, their buffers and file
//! descriptors, who they belong to, and what comes back.

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

/// The offset for files without one (sockets, pipes): the kernel uses and
/// advances the file position instead.
pub const STREAM: u64 = u64::MAX;

/// Who an operation belongs to (a device queue, a state file...): the
/// unit [`Ring::cancel_source`] and quiescing work on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceId(u32);

/// Ids below this are [`SourceId::fixed`]; above, allocated.
const FIRST_ALLOCATED: u32 = 1 << 16;
const COMPANION: u32 = 1 << 31;

impl SourceId {
    /// A process-unique id (for sources that move between rings or
    /// several of which share one, like device queues).
    pub fn new() -> SourceId {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(FIRST_ALLOCATED);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        assert!(n < COMPANION, "source ids exhausted");
        SourceId(n)
    }

    /// A well-known id, for the one-purpose ring of a thread (its QMP
    /// server, a snapshot's writer) and for tests: never equal to an
    /// allocated one.
    pub const fn fixed(n: u16) -> SourceId {
        SourceId(n as u32)
    }

    /// The id for operations of the same owner that quiescing this source
    /// must not wait for (e.g. the doorbell poll of a queue that is being
    /// drained).
    pub const fn companion(self) -> SourceId {
        SourceId(self.0 | COMPANION)
    }
}

impl Default for SourceId {
    fn default() -> Self {
        SourceId::new()
    }
}

/// Handle of a submitted operation (its encoded token).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OpId(pub u64);

/// A file descriptor, raw or registered with the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fd {
    Raw(RawFd),
    Fixed(u32),
}

/// Memory the kernel reads or writes. Opaque: a buffer that points at
/// caller memory (iovecs, part of a registered buffer) is made only by the
/// `unsafe` [`Op`] constructors, and never comes back out of a completion
/// (it is handed back spent), so safe code cannot aim the kernel at
/// arbitrary memory.
pub struct Buf(pub(crate) BufKind);

pub(crate) enum BufKind {
    /// Owned by the operation; handed back in the completion.
    Owned(Vec<u8>),
    /// Memory the caller keeps valid until the completion (guest RAM).
    Iovecs(Vec<libc::iovec>),
    /// Part of a registered buffer (see [`Ring::register_buffer`]).
    Fixed { index: u16, ptr: *mut u8, len: usize },
    /// Caller memory whose operation has completed: no memory at all.
    Spent,
}

impl Buf {
    /// A buffer the operation owns (and hands back in its completion).
    pub fn owned(v: Vec<u8>) -> Buf {
        Buf(BufKind::Owned(v))
    }

    pub(crate) fn total(&self) -> usize {
        match &self.0 {
            BufKind::Owned(v) => v.len(),
            BufKind::Iovecs(iov) => iov.iter().map(|i| i.iov_len).sum(),
            BufKind::Fixed { len, .. } => *len,
            BufKind::Spent => 0,
        }
    }

    /// The owned bytes (None for caller memory).
    pub fn into_vec(self) -> Option<Vec<u8>> {
        match self.0 {
            BufKind::Owned(v) => Some(v),
            BufKind::Iovecs(_) | BufKind::Fixed { .. } | BufKind::Spent => None,
        }
    }

    /// Forgets caller memory once its operation is over.
    pub(crate) fn spend(&mut self) {
        if !matches!(self.0, BufKind::Owned(_)) {
            self.0 = BufKind::Spent;
        }
    }
}

/// An operation. Reads and writes are continued until complete, so a
/// completion reports the whole transfer (or less only at end of file);
/// except reads at [`STREAM`], which complete with whatever arrived.
pub enum Op {
    Read {
        fd: Fd,
        buf: Buf,
        offset: u64,
    },
    Write {
        fd: Fd,
        buf: Buf,
        offset: u64,
    },
    Fsync {
        fd: Fd,
        datasync: bool,
    },
    Fallocate {
        fd: Fd,
        mode: i32,
        offset: u64,
        len: u64,
    },
    /// Poll for `events`; multishot delivers every readiness from one submission.
    Poll {
        fd: RawFd,
        events: u32,
        multishot: bool,
    },
    Timeout {
        after: Duration,
    },
    /// Accepts a connection on a listening socket; the result is the new fd.
    Accept {
        fd: RawFd,
    },
    /// Does nothing (measures the ring's own overhead).
    Nop,
}

impl Op {
    pub fn read(fd: Fd, buf: Vec<u8>, offset: u64) -> Op {
        Op::Read { fd, buf: Buf(BufKind::Owned(buf)), offset }
    }

    pub fn write(fd: Fd, buf: Vec<u8>, offset: u64) -> Op {
        Op::Write { fd, buf: Buf(BufKind::Owned(buf)), offset }
    }

    /// Scatter read into caller memory.
    ///
    /// # Safety
    /// Every iovec must point at memory that stays valid and is not otherwise
    /// accessed until this operation's completion is delivered.
    pub unsafe fn readv(fd: Fd, iov: Vec<libc::iovec>, offset: u64) -> Op {
        Op::Read { fd, buf: Buf(BufKind::Iovecs(iov)), offset }
    }

    /// Gather write from caller memory.
    ///
    /// # Safety
    /// As for [`Op::readv`].
    pub unsafe fn writev(fd: Fd, iov: Vec<libc::iovec>, offset: u64) -> Op {
        Op::Write { fd, buf: Buf(BufKind::Iovecs(iov)), offset }
    }

    /// Read into part of registered buffer `index`.
    ///
    /// # Safety
    /// `ptr..ptr+len` must lie inside that registered buffer and not be
    /// otherwise accessed until the completion is delivered.
    pub unsafe fn read_fixed(fd: Fd, index: u16, ptr: *mut u8, len: usize, offset: u64) -> Op {
        Op::Read { fd, buf: Buf(BufKind::Fixed { index, ptr, len }), offset }
    }

    /// Write from part of registered buffer `index`.
    ///
    /// # Safety
    /// As for [`Op::read_fixed`].
    pub unsafe fn write_fixed(fd: Fd, index: u16, ptr: *mut u8, len: usize, offset: u64) -> Op {
        Op::Write { fd, buf: Buf(BufKind::Fixed { index, ptr, len }), offset }
    }

    pub(crate) fn is_rw(&self) -> bool {
        matches!(self, Op::Read { .. } | Op::Write { .. })
    }
}

/// What an operation's handler receives.
pub struct Completion {
    /// Bytes transferred (reads/writes), poll mask (polls), 0 otherwise.
    pub result: io::Result<usize>,
    /// The operation, with its buffers, once it is final.
    pub op: Option<Op>,
    /// More completions will follow (multishot polls).
    pub more: bool,
}
