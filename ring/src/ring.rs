//! The ring: submission, completion routing, continuation of short I/O,
//! backlog, per-source accounting.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, register::Restriction, squeue, types, IoUring, Probe};
use slab::Slab;

mod owned;
mod poll;
mod register;
mod sqe;

use crate::event::Event;
pub use crate::op::{Buf, Completion, Fd, Op, OpId, SourceId, STREAM};
pub use crate::options::{RingOptions, OPCODES};
use crate::options::{REGISTER_BUFFERS_UPDATE, REGISTER_FILES_UPDATE};
use crate::token::{Kind, Token, GENERATION_MASK};
use crate::{Error, Result};

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
    /// Later members of this op's linked group (index, generation).
    link_rest: Vec<(usize, u32)>,
    /// Successors' ECANCELED completions still awaited before a short
    /// transfer is resubmitted together with them.
    relink_wait: usize,
    /// Set on a successor whose predecessor was short: (index, generation).
    relink_to: Option<(usize, u32)>,
    /// Issued with IOSQE_ASYNC (continuations too).
    force_async: bool,
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
    /// Linked groups resubmitted after a short transfer broke the link.
    pub relinked: u64,
    /// Poll windows that found work (a completion or a poller's) before
    /// the thread would have slept, and those that ran out.
    pub poll_hits: u64,
    pub poll_misses: u64,
    /// Times polling paused because the thread kept being preempted (see
    /// [`POLL_BACKOFF`]).
    pub poll_backoffs: u64,
    /// Operations handed to the kernel as they were queued (see
    /// [`RingOptions::eager_submit`]).
    pub eager_submits: u64,
}

/// How long polling pauses once the thread was preempted in 4 of its last
/// 16 poll windows: the CPUs are oversubscribed, and spinning would only
/// take time from the threads (vCPUs) that produce the work.
pub const POLL_BACKOFF: Duration = Duration::from_millis(50);

/// Polling only happens with at most this many operations in flight
/// besides the standing multishot polls.
pub const POLL_MAX_IN_FLIGHT: usize = 4;

/// This thread's involuntary context switches so far.
fn preemptions() -> i64 {
    // SAFETY: rusage is plain data, zeroed is valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct we own.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) } != 0 {
        return 0;
    }
    ru.ru_nivcsw
}

const FIXED_FILES: u32 = 64;
const FIXED_BUFFERS: u32 = 64;

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
    buffers: Vec<bool>,
    restricted: bool,
    wake_fd: Option<RawFd>,
    woken: bool,
    stats: RingStats,
    poll: Duration,
    eager: bool,
    /// Checks run while polling (a virtqueue's avail index, say).
    pollers: Vec<(SourceId, Poller)>,
    /// Checks run before the thread blocks (see [`Ring::add_sleep_check`]).
    sleep_checks: Vec<(SourceId, Poller)>,
    /// Set while the pollers run (they are taken out of `pollers`).
    polling: bool,
    /// Sources whose pollers were removed while the pollers ran.
    unpolled: Vec<SourceId>,
    /// Polling paused until then (see [`POLL_BACKOFF`]).
    poll_paused_until: Option<Instant>,
    /// One bit per recent poll window: was the thread preempted in it.
    poll_preempted: u16,
    /// State this thread owns for its sources (see [`Ring::adopt`]).
    owned: HashMap<SourceId, std::rc::Rc<dyn std::any::Any>>,
}

/// A check an iothread runs while it polls instead of sleeping: it looks
/// for new work (without blocking), does it, and says whether it found any.
pub type Poller = Box<dyn FnMut(&mut Ring) -> bool>;

fn check_opcodes(uring: &IoUring) -> Result<()> {
    let mut probe = Probe::new();
    uring.submitter().register_probe(&mut probe).map_err(Error::Probe)?;
    for &(code, name) in OPCODES {
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
        Ring::with_options(RingOptions { wake_fd, ..RingOptions::new(entries) })
    }

    pub fn with_options(opts: RingOptions) -> Result<Ring> {
        let (entries, wake_fd) = (opts.entries, opts.wake_fd);
        let mut builder = IoUring::builder();
        builder.setup_clamp();
        if opts.allowed_opcodes.is_some() {
            builder.setup_r_disabled();
        }
        // One thread submits and reaps: let the kernel defer completion
        // work to when we wait (no IPIs to interrupt the loop), falling
        // back on kernels without these flags (before 6.1).
        let mut fast = builder.clone();
        fast.setup_coop_taskrun().setup_single_issuer().setup_defer_taskrun();
        let uring = match fast.build(entries) {
            Ok(u) => u,
            Err(_) => builder.build(entries).map_err(Error::Setup)?,
        };
        if !uring.params().is_feature_nodrop() {
            return Err(Error::NoDrop);
        }
        check_opcodes(&uring)?;
        uring.submitter().register_files_sparse(FIXED_FILES).map_err(Error::RegisterFiles)?;
        uring.submitter().register_buffers_sparse(FIXED_BUFFERS).map_err(Error::RegisterBuffers)?;
        if let Some(ops) = &opts.allowed_opcodes {
            let mut res: Vec<Restriction> = ops.iter().map(|&c| Restriction::sqe_op(c)).collect();
            res.push(Restriction::register_op(REGISTER_FILES_UPDATE));
            res.push(Restriction::register_op(REGISTER_BUFFERS_UPDATE));
            res.push(Restriction::sqe_flags_allowed((squeue::Flags::IO_LINK | squeue::Flags::FIXED_FILE | squeue::Flags::ASYNC).bits()));
            uring.submitter().register_restrictions(&mut res).map_err(Error::Restrict)?;
            uring.submitter().register_enable_rings().map_err(Error::Restrict)?;
        }
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
            buffers: vec![false; FIXED_BUFFERS as usize],
            restricted: opts.allowed_opcodes.is_some(),
            wake_fd,
            woken: false,
            stats: RingStats::default(),
            poll: opts.poll,
            eager: opts.eager_submit,
            pollers: Vec::new(),
            sleep_checks: Vec::new(),
            owned: HashMap::new(),
            polling: false,
            unpolled: Vec::new(),
            poll_paused_until: None,
            poll_preempted: 0,
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

    /// Whether the ring runs with an opcode allowlist.
    pub fn is_restricted(&self) -> bool {
        self.restricted
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

    /// Like [`Ring::submit`], but the kernel never issues `op` inline in
    /// the submitting `io_uring_enter` (IOSQE_ASYNC: straight to its
    /// workers). For files whose filesystem may block on submission even
    /// when asked not to (FUSE, network filesystems): a stuck server then
    /// holds a kernel worker, never this thread.
    pub fn submit_async(&mut self, source: SourceId, op: Op, handler: impl FnMut(&mut Ring, Completion) + 'static) -> OpId {
        let (id, sqe) = self.prepare(source, op, Box::new(handler));
        if let Some(t) = Token::decode(id.0) {
            self.slots[t.index as usize].force_async = true;
        }
        self.queue(vec![sqe.flags(squeue::Flags::ASYNC)]);
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
        let members: Vec<(usize, u32)> = ids.iter().filter_map(|id| Token::decode(id.0)).map(|t| (t.index as usize, t.generation)).collect();
        for (i, &(idx, _)) in members.iter().enumerate() {
            self.slots[idx].link_rest = members[i + 1..].to_vec();
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
            link_rest: Vec::new(),
            relink_wait: 0,
            relink_to: None,
            force_async: false,
        });
        if !persistent {
            self.sources.entry(source).or_default().inflight += 1;
        }
        let token = Token { index, generation, kind: Kind::Op }.encode();
        let sqe = self.build_sqe(index as usize).user_data(token);
        (OpId(token), sqe)
    }

    /// Queues a group of SQEs (contiguous, for links) behind the backlog.
    fn queue(&mut self, group: Vec<squeue::Entry>) {
        self.backlog.push_back(group);
        self.flush_backlog();
        if !self.backlog.is_empty() {
            self.stats.backlogged += 1;
            self.stats.max_backlog = self.stats.max_backlog.max(self.backlog.len());
        }
        if self.eager && !self.uring.submission().is_empty() {
            // No waiting here: a failure other than a transient one shows
            // again, and is returned, when the loop next enters the kernel.
            match self.uring.submit() {
                Ok(_) => self.stats.eager_submits += 1,
                Err(e) => log::debug!("ring: eager submit: {e}"),
            }
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
    /// With a poll window and pollers, it polls for that long first.
    pub fn run_once(&mut self, wait: bool) -> Result<usize> {
        self.flush_backlog();
        let mut want = usize::from(wait && self.in_kernel > 0);
        // Polling is for latency: with more than a few operations in flight
        // beyond the standing ones (one multishot poll per poller, the
        // wake-up poll), completions keep coming anyway and spinning would
        // only take CPU from the vCPUs that produce the work.
        let few = self.in_kernel <= self.pollers.len() + 1 + POLL_MAX_IN_FLIGHT;
        if want > 0 && few && !self.poll.is_zero() && !self.pollers.is_empty() && self.poll_window() {
            want = 0;
            self.flush_backlog();
        }
        if want > 0 && !self.sleep_checks.is_empty() && self.run_checks(true) {
            want = 0;
            self.flush_backlog();
        }
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

        // A successor cancelled by the kernel because its predecessor was
        // short: resubmit the rest of the chain once all of them are back.
        if let Some((p, pgen)) = self.slots[idx].relink_to.take() {
            let parent_ok = self.slots.get(p).is_some_and(|s| s.generation == pgen);
            if res == -libc::ECANCELED && !self.slots[idx].cancelled && parent_ok {
                self.slots[p].relink_wait -= 1;
                if self.slots[p].relink_wait == 0 {
                    self.relink(p);
                }
                return;
            }
            if parent_ok {
                self.slots[p].relink_wait = self.slots[p].relink_wait.saturating_sub(1);
                self.slots[p].link_rest.retain(|&(i, _)| i != idx);
                if self.slots[p].relink_wait == 0 {
                    self.relink(p);
                }
            }
        }

        // Continue short reads/writes; a read of 0 bytes is end of file.
        // Stream reads (sockets, pipes) complete with what arrived.
        let stream_read = matches!(self.slots[idx].op, Op::Read { offset: STREAM, .. });
        if res > 0 && self.slots[idx].op.is_rw() {
            let slot = &mut self.slots[idx];
            slot.done += res as usize;
            let total = match &slot.op {
                Op::Read { buf, .. } | Op::Write { buf, .. } => buf.total(),
                _ => 0,
            };
            if slot.done < total && !slot.cancelled && !stream_read {
                self.stats.continued += 1;
                if !slot.link_rest.is_empty() {
                    // The kernel fails the rest of the link on a short
                    // transfer; wait for those completions, then resubmit.
                    let rest = std::mem::take(&mut slot.link_rest);
                    let mut live = Vec::with_capacity(rest.len());
                    for (i, g) in rest {
                        if let Some(s) = self.slots.get_mut(i).filter(|s| s.generation == g) {
                            s.relink_to = Some((idx, token.generation));
                            live.push((i, g));
                        }
                    }
                    let slot = &mut self.slots[idx];
                    slot.relink_wait = live.len();
                    slot.link_rest = live;
                    if slot.relink_wait > 0 {
                        return;
                    }
                }
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
        let (source, persistent) = (slot.source, slot.persistent);
        // The handler runs before the source's count drops: what it does
        // (a device writing its response and used entry into guest RAM)
        // is part of the operation a quiesce waiter waits for; what it
        // submits keeps the source busy.
        if let Some(mut h) = slot.handler {
            let mut op = slot.op;
            if let Op::Read { buf, .. } | Op::Write { buf, .. } = &mut op {
                buf.spend();
            }
            h(self, Completion { result, op: Some(op), more: false });
        }
        if !persistent {
            self.source_done(source);
        }
    }

    /// Resubmits slot `p`'s continuation linked with its remaining chain.
    fn relink(&mut self, p: usize) {
        self.stats.relinked += 1;
        let mut members = vec![(p, self.slots[p].generation)];
        members.extend(self.slots[p].link_rest.iter().copied().filter(|&(i, g)| self.slots.get(i).is_some_and(|s| s.generation == g)));
        let n = members.len();
        let mut group = Vec::with_capacity(n);
        for (k, (i, g)) in members.into_iter().enumerate() {
            let token = Token { index: i as u32, generation: g, kind: Kind::Op }.encode();
            let mut sqe = self.build_sqe(i).user_data(token);
            if k + 1 < n {
                sqe = sqe.flags(squeue::Flags::IO_LINK);
            }
            group.push(sqe);
        }
        self.queue(group);
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
        let ids: Vec<OpId> = self.slots.iter().map(|(i, s)| OpId(Token { index: i as u32, generation: s.generation, kind: Kind::Op }.encode())).collect();
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
