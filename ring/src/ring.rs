//! The ring: submission, completion routing, continuation of short I/O,
//! backlog, per-source accounting.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring, Probe};
use slab::Slab;

use crate::thread::Event;
use crate::token::{Kind, Token, GENERATION_MASK};
use crate::{Error, Result};

/// Who an operation belongs to (a device queue, a state file...).
pub type SourceId = u32;

/// Handle of a submitted operation (its encoded token).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OpId(pub u64);

/// A file descriptor, raw or registered with the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fd {
    Raw(RawFd),
    Fixed(u32),
}

/// Memory the kernel reads or writes.
pub enum Buf {
    /// Owned by the operation; handed back in the completion.
    Owned(Vec<u8>),
    /// Memory the caller keeps valid until the completion (guest RAM).
    Iovecs(Vec<libc::iovec>),
}

impl Buf {
    fn total(&self) -> usize {
        match self {
            Buf::Owned(v) => v.len(),
            Buf::Iovecs(iov) => iov.iter().map(|i| i.iov_len).sum(),
        }
    }

    pub fn into_vec(self) -> Option<Vec<u8>> {
        match self {
            Buf::Owned(v) => Some(v),
            Buf::Iovecs(_) => None,
        }
    }
}

/// An operation. Reads and writes are continued until complete, so a
/// completion reports the whole transfer (or less only at end of file).
pub enum Op {
    Read { fd: Fd, buf: Buf, offset: u64 },
    Write { fd: Fd, buf: Buf, offset: u64 },
    Fsync { fd: Fd, datasync: bool },
    Fallocate { fd: Fd, mode: i32, offset: u64, len: u64 },
    /// Poll for `events`; multishot delivers every readiness from one submission.
    Poll { fd: RawFd, events: u32, multishot: bool },
    Timeout { after: Duration },
}

impl Op {
    pub fn read(fd: Fd, buf: Vec<u8>, offset: u64) -> Op {
        Op::Read { fd, buf: Buf::Owned(buf), offset }
    }

    pub fn write(fd: Fd, buf: Vec<u8>, offset: u64) -> Op {
        Op::Write { fd, buf: Buf::Owned(buf), offset }
    }

    /// Scatter read into caller memory.
    ///
    /// # Safety
    /// Every iovec must point at memory that stays valid and is not otherwise
    /// accessed until this operation's completion is delivered.
    pub unsafe fn readv(fd: Fd, iov: Vec<libc::iovec>, offset: u64) -> Op {
        Op::Read { fd, buf: Buf::Iovecs(iov), offset }
    }

    /// Gather write from caller memory.
    ///
    /// # Safety
    /// As for [`Op::readv`].
    pub unsafe fn writev(fd: Fd, iov: Vec<libc::iovec>, offset: u64) -> Op {
        Op::Write { fd, buf: Buf::Iovecs(iov), offset }
    }

    fn is_rw(&self) -> bool {
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

type Handler = Box<dyn FnMut(&mut Ring, Completion)>;

struct Slot {
    generation: u32,
    source: SourceId,
    op: Op,
    handler: Option<Handler>,
    /// Bytes already transferred (continuation of short reads/writes).
    done: usize,
    /// Iovecs for the remaining part of a continued transfer.
    cont_iov: Vec<libc::iovec>,
    timespec: Box<types::Timespec>,
    cancelled: bool,
    persistent: bool,
}

#[derive(Default)]
struct SourceState {
    inflight: usize,
    waiters: Vec<Arc<Event>>,
}

/// Counters for tests and benchmarks.
#[derive(Clone, Copy, Debug, Default)]
pub struct RingStats {
    pub submitted: u64,
    pub completed: u64,
    pub continued: u64,
    pub stale: u64,
    pub backlogged: u64,
    pub max_backlog: usize,
}

const FIXED_FILES: u32 = 64;

pub struct Ring {
    uring: IoUring,
    slots: Slab<Slot>,
    next_generation: u32,
    backlog: VecDeque<Vec<squeue::Entry>>,
    /// SQEs in the kernel whose final CQE has not been reaped.
    in_kernel: usize,
    cq_cap: usize,
    sources: HashMap<SourceId, SourceState>,
    fixed: Vec<bool>,
    wake_fd: Option<RawFd>,
    woken: bool,
    stats: RingStats,
}

fn check_opcodes(uring: &IoUring) -> Result<()> {
    let mut probe = Probe::new();
    uring.submitter().register_probe(&mut probe).map_err(Error::Probe)?;
    for (code, name) in [
        (opcode::Read::CODE, "READ"),
        (opcode::Write::CODE, "WRITE"),
        (opcode::Readv::CODE, "READV"),
        (opcode::Writev::CODE, "WRITEV"),
        (opcode::Fsync::CODE, "FSYNC"),
        (opcode::Fallocate::CODE, "FALLOCATE"),
        (opcode::PollAdd::CODE, "POLL_ADD"),
        (opcode::Timeout::CODE, "TIMEOUT"),
        (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
    ] {
        if !probe.is_supported(code) {
            return Err(Error::Unsupported(name));
        }
    }
    Ok(())
}

impl Ring {
    /// A ring with `entries` SQEs (CQ twice that). `wake_fd`, if given, is an
    /// eventfd whose readiness sets [`Ring::take_woken`].
    pub fn new(entries: u32, wake_fd: Option<RawFd>) -> Result<Ring> {
        let uring = IoUring::builder().setup_clamp().build(entries).map_err(Error::Setup)?;
        if !uring.params().is_feature_nodrop() {
            return Err(Error::NoDrop);
        }
        check_opcodes(&uring)?;
        uring.submitter().register_files_sparse(FIXED_FILES).map_err(Error::RegisterFiles)?;
        let cq_cap = uring.params().cq_entries() as usize;
        let mut ring = Ring {
            uring,
            slots: Slab::with_capacity(256),
            next_generation: 1,
            backlog: VecDeque::new(),
            in_kernel: 0,
            cq_cap,
            sources: HashMap::new(),
            fixed: vec![false; FIXED_FILES as usize],
            wake_fd,
            woken: false,
            stats: RingStats::default(),
        };
        ring.arm_wake();
        Ok(ring)
    }

    fn arm_wake(&mut self) {
        if let Some(fd) = self.wake_fd {
            let token = Token { index: 0, generation: 0, kind: Kind::Wake }.encode();
            let sqe = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32).multi(true).build().user_data(token);
            self.queue(vec![sqe]);
        }
    }

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

    pub fn stats(&self) -> RingStats {
        self.stats
    }

    /// Operations not yet completed (kernel and backlog).
    pub fn in_flight(&self) -> usize {
        self.slots.len()
    }

    /// Non-persistent operations of `source` not yet completed.
    pub fn source_in_flight(&self, source: SourceId) -> usize {
        self.sources.get(&source).map_or(0, |s| s.inflight)
    }

    pub fn take_woken(&mut self) -> bool {
        std::mem::take(&mut self.woken)
    }

    /// Submits `op`; `handler` runs on this thread when it completes.
    pub fn submit(&mut self, source: SourceId, op: Op, handler: impl FnMut(&mut Ring, Completion) + 'static) -> OpId {
        let (id, sqe) = self.prepare(source, op, Box::new(handler));
        self.queue(vec![sqe]);
        id
    }

    /// Submits operations that run in order, each only if the previous one
    /// succeeded (IOSQE_IO_LINK): e.g. a write then an fdatasync. If an
    /// earlier one fails or is short, the later ones complete with ECANCELED.
    pub fn submit_linked(&mut self, source: SourceId, ops: Vec<(Op, Handler)>) -> Vec<OpId> {
        let n = ops.len();
        let mut ids = Vec::with_capacity(n);
        let mut group = Vec::with_capacity(n);
        for (i, (op, h)) in ops.into_iter().enumerate() {
            let (id, mut sqe) = self.prepare(source, op, h);
            if i + 1 < n {
                sqe = sqe.flags(squeue::Flags::IO_LINK);
            }
            ids.push(id);
            group.push(sqe);
        }
        self.queue(group);
        ids
    }

    fn prepare(&mut self, source: SourceId, op: Op, handler: Handler) -> (OpId, squeue::Entry) {
        let generation = self.next_generation;
        self.next_generation = (self.next_generation + 1) & GENERATION_MASK;
        if self.next_generation == 0 {
            self.next_generation = 1;
        }
        let persistent = matches!(op, Op::Poll { multishot: true, .. });
        let entry = self.slots.vacant_entry();
        let index = entry.key() as u32;
        entry.insert(Slot {
            generation,
            source,
            op,
            handler: Some(handler),
            done: 0,
            cont_iov: Vec::new(),
            timespec: Box::new(types::Timespec::new()),
            cancelled: false,
            persistent,
        });
        if !persistent {
            self.sources.entry(source).or_default().inflight += 1;
        }
        let token = Token { index, generation, kind: Kind::Op }.encode();
        let sqe = self.build_sqe(index as usize).user_data(token);
        (OpId(token), sqe)
    }

    /// Builds the SQE for slot `idx` from its current progress.
    fn build_sqe(&mut self, idx: usize) -> squeue::Entry {
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
                let (fd, offset) = (*fd, *offset + done as u64);
                let write = matches!(slot.op, Op::Write { .. });
                let buf = match &mut slot.op {
                    Op::Read { buf, .. } | Op::Write { buf, .. } => buf,
                    _ => unreachable!("matched above"),
                };
                match buf {
                    Buf::Owned(v) => {
                        let len = (v.len() - done).min(u32::MAX as usize) as u32;
                        // SAFETY: in bounds; the Vec is owned by the slot until its final CQE.
                        let ptr = unsafe { v.as_mut_ptr().add(done) };
                        with_fd!(fd, |f| if write {
                            opcode::Write::new(f, ptr, len).offset(offset).build()
                        } else {
                            opcode::Read::new(f, ptr, len).offset(offset).build()
                        })
                    }
                    Buf::Iovecs(iov) => {
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
        }
    }

    /// Queues a group of SQEs (contiguous, for links) behind the backlog.
    fn queue(&mut self, group: Vec<squeue::Entry>) {
        self.backlog.push_back(group);
        self.flush_backlog();
        if !self.backlog.is_empty() {
            self.stats.backlogged += 1;
            self.stats.max_backlog = self.stats.max_backlog.max(self.backlog.len());
        }
    }

    /// Moves backlog groups into the SQ while the CQ can absorb them.
    fn flush_backlog(&mut self) {
        while let Some(group) = self.backlog.front() {
            let n = group.len();
            let mut sq = self.uring.submission();
            if self.in_kernel + n > self.cq_cap || sq.capacity() - sq.len() < n {
                break;
            }
            for sqe in group {
                // SAFETY: every pointer in the SQE refers to memory owned by a
                // slab slot (or promised valid by an unsafe Op constructor)
                // that is only freed when the final CQE is reaped.
                unsafe { sq.push(sqe) }.expect("space checked above");
            }
            drop(sq);
            self.in_kernel += n;
            self.stats.submitted += n as u64;
            self.backlog.pop_front();
        }
    }

    /// Asks the kernel to cancel `id`. Its handler still runs, with
    /// ECANCELED (or its result if it finished first).
    pub fn cancel(&mut self, id: OpId) {
        let Some(t) = Token::decode(id.0) else { return };
        match self.slots.get_mut(t.index as usize) {
            Some(s) if s.generation == t.generation => s.cancelled = true,
            _ => return,
        }
        let token = Token { index: 0, generation: 0, kind: Kind::Cancel }.encode();
        self.queue(vec![opcode::AsyncCancel::new(id.0).build().user_data(token)]);
    }

    /// Cancels every operation of `source`.
    pub fn cancel_source(&mut self, source: SourceId) {
        let ids: Vec<OpId> = self
            .slots
            .iter()
            .filter(|(_, s)| s.source == source && !s.cancelled)
            .map(|(i, s)| OpId(Token { index: i as u32, generation: s.generation, kind: Kind::Op }.encode()))
            .collect();
        for id in ids {
            self.cancel(id);
        }
    }

    /// Registers `event` to be set once `source` has no operation in flight.
    pub(crate) fn on_quiesced(&mut self, source: SourceId, event: Arc<Event>) {
        if self.source_in_flight(source) == 0 {
            event.set();
        } else {
            self.sources.entry(source).or_default().waiters.push(event);
        }
    }

    /// Submits what is queued, waits for at least one completion if `wait`
    /// and anything is in flight, and runs the handlers of what completed.
    pub fn run_once(&mut self, wait: bool) -> Result<usize> {
        self.flush_backlog();
        let want = usize::from(wait && self.in_kernel > 0);
        match self.uring.submit_and_wait(want) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN)) => {}
            Err(e) => return Err(Error::Enter(e)),
        }
        let cqes: Vec<cqueue::Entry> = self.uring.completion().collect();
        let n = cqes.len();
        for cqe in cqes {
            self.dispatch(cqe);
        }
        self.flush_backlog();
        Ok(n)
    }

    /// Runs until `done()` or the deadline.
    pub fn run_until(&mut self, timeout: Duration, mut done: impl FnMut(&Ring) -> bool) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !done(self) {
            if Instant::now() > deadline {
                return Err(Error::Timeout(timeout, "ring operations"));
            }
            if self.in_kernel == 0 && self.backlog.is_empty() {
                return Err(Error::Timeout(timeout, "a condition no operation can satisfy"));
            }
            self.run_once(true)?;
        }
        Ok(())
    }

    fn dispatch(&mut self, cqe: cqueue::Entry) {
        let more = cqueue::more(cqe.flags());
        let res = cqe.result();
        let Some(token) = Token::decode(cqe.user_data()) else { return };
        match token.kind {
            Kind::Wake => {
                if let Some(fd) = self.wake_fd {
                    let mut v = 0u64;
                    // SAFETY: reading 8 bytes into a u64 from an eventfd.
                    unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
                }
                self.woken = true;
                if !more {
                    self.in_kernel -= 1;
                    self.arm_wake();
                }
                return;
            }
            Kind::Cancel => {
                self.in_kernel -= 1;
                return;
            }
            Kind::Op => {}
        }
        let idx = token.index as usize;
        match self.slots.get(idx) {
            Some(s) if s.generation == token.generation => {}
            _ => {
                self.stats.stale += 1;
                log::warn!("ring: stale completion {:#x} dropped", cqe.user_data());
                return;
            }
        }
        if !more {
            self.in_kernel -= 1;
        }
        self.stats.completed += 1;

        // Continue short reads/writes; a read of 0 bytes is end of file.
        if res > 0 && self.slots[idx].op.is_rw() {
            let slot = &mut self.slots[idx];
            slot.done += res as usize;
            let total = match &slot.op {
                Op::Read { buf, .. } | Op::Write { buf, .. } => buf.total(),
                _ => 0,
            };
            if slot.done < total && !slot.cancelled {
                self.stats.continued += 1;
                let sqe = self.build_sqe(idx).user_data(cqe.user_data());
                self.queue(vec![sqe]);
                return;
            }
        }

        let result = if res < 0 {
            Err(io::Error::from_raw_os_error(-res))
        } else if self.slots[idx].op.is_rw() {
            Ok(self.slots[idx].done)
        } else {
            Ok(res as usize)
        };

        let persistent = self.slots[idx].persistent;
        if persistent && (more || (res >= 0 && !self.slots[idx].cancelled)) {
            // A multishot poll event; re-arm if the kernel ended the multishot.
            let mut handler = self.slots[idx].handler.take();
            if let Some(h) = handler.as_mut() {
                h(self, Completion { result, op: None, more: true });
            }
            if let Some(s) = self.slots.get_mut(idx) {
                if s.generation == token.generation {
                    s.handler = handler;
                    if !more && !s.cancelled {
                        let sqe = self.build_sqe(idx).user_data(cqe.user_data());
                        self.queue(vec![sqe]);
                    }
                }
            }
            return;
        }

        let slot = self.slots.remove(idx);
        if !slot.persistent {
            self.source_done(slot.source);
        }
        if let Some(mut h) = slot.handler {
            h(self, Completion { result, op: Some(slot.op), more: false });
        }
    }

    fn source_done(&mut self, source: SourceId) {
        if let Some(s) = self.sources.get_mut(&source) {
            s.inflight -= 1;
            if s.inflight == 0 {
                for w in s.waiters.drain(..) {
                    w.set();
                }
            }
        }
    }

    /// Cancels everything and reaps until nothing is in the kernel, within
    /// `timeout`. Returns false if the kernel still holds operations.
    pub fn shutdown(&mut self, timeout: Duration) -> bool {
        self.wake_fd = None; // do not re-arm the wake poll
        let ids: Vec<OpId> = self
            .slots
            .iter()
            .map(|(i, s)| OpId(Token { index: i as u32, generation: s.generation, kind: Kind::Op }.encode()))
            .collect();
        for id in ids {
            self.cancel(id);
        }
        let wake = Token { index: 0, generation: 0, kind: Kind::Wake }.encode();
        let cancel = Token { index: 0, generation: 0, kind: Kind::Cancel }.encode();
        self.queue(vec![opcode::AsyncCancel::new(wake).build().user_data(cancel)]);
        let deadline = Instant::now() + timeout;
        while self.in_kernel > 0 || !self.backlog.is_empty() {
            if Instant::now() > deadline || self.run_once(true).is_err() {
                return false;
            }
        }
        true
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        if (self.in_kernel > 0 || !self.backlog.is_empty()) && !self.shutdown(Duration::from_secs(5)) {
            // The kernel may still write into slot-owned buffers: leak them
            // rather than free memory under it.
            log::error!("ring dropped with {} operations in the kernel; leaking their buffers", self.in_kernel);
            std::mem::forget(std::mem::take(&mut self.slots));
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
        let iov = vec![
            libc::iovec { iov_base: a.as_mut_ptr().cast(), iov_len: 8 },
            libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: 8 },
        ];
        let r = advance_iovecs(&iov, 10);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].iov_len, 6);
        assert_eq!(r[0].iov_base as usize, b.as_ptr() as usize + 2);
        assert_eq!(advance_iovecs(&iov, 0).len(), 2);
        assert!(advance_iovecs(&iov, 16).is_empty());
    }
}
