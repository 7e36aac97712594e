//! virtio-scsi (virtio 1.x, 5.6). Request queues are served by iothreads:
//! each queue is owned by exactly one iothread's ring (no lock between
//! queues); a notify wakes it through a multishot poll on the queue's
//! ioeventfd; each request's data is one readv/writev straight between the
//! disk file and guest memory; completion writes the response, the used
//! ring and (unless EVENT_IDX suppresses it) the queue's MSI-X irqfd.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use ring::{Fd, Op, OpId, Remote, Ring, SourceId};
use smallvec::SmallVec;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{ActiveQueue, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

mod policy;
use crate::dirty::DmaDirtyLog;
use crate::scsi::{self, Action, Lun, Sense, Target};
use policy::Io;
pub use policy::{retry_held, ErrorAction, ErrorControl, ErrorSink, IoError};

pub const DEVICE_TYPE: u16 = 8;
pub const QUEUE_SIZE: u16 = 256;
pub const SEG_MAX: u32 = 254;
pub const DEFAULT_CDB_SIZE: u32 = 32;
pub const DEFAULT_SENSE_SIZE: u32 = 96;
const MAX_CDB_SIZE: u32 = 256;
const MAX_SENSE_SIZE: u32 = 256;
/// How long a reset waits for in-flight requests.
const QUIESCE_DEADLINE: Duration = Duration::from_secs(30);

// virtio-scsi response codes.
pub const S_OK: u8 = 0;
pub const S_ABORTED: u8 = 2;
pub const S_FUNCTION_SUCCEEDED: u8 = 10;
pub const S_FUNCTION_REJECTED: u8 = 11;
pub const S_INCORRECT_LUN: u8 = 12;
pub const S_BAD_TARGET: u8 = 3;
pub const S_FAILURE: u8 = 9;

/// The driver may be told of LUNs coming and going (5.6.3).
pub const VIRTIO_SCSI_F_HOTPLUG: u64 = 1 << 1;
/// virtio_scsi_event.event values and the reason of a removal.
pub const T_TRANSPORT_RESET: u32 = 1;
pub const T_EVENTS_MISSED: u32 = 0x8000_0000;
pub const EVT_RESET_REMOVED: u32 = 2;
/// Events kept for a driver that has no event buffer posted; beyond
/// this the next one delivered carries EVENTS_MISSED.
const MAX_PENDING_EVENTS: usize = 64;

/// One disk, exposed as LUN `index` of target 0. Its file can be closed
/// while the device runs (hot-unplug): the LUN then answers as absent.
pub struct Disk {
    pub path: String,
    pub lun: Lun,
    pub direct: bool,
    /// What a host write / read error does (QEMU's werror / rerror).
    pub werror: ErrorAction,
    pub rerror: ErrorAction,
    /// The open file, -1 once closed.
    fd: AtomicI32,
    removed: AtomicBool,
}

impl Disk {
    pub fn new(path: impl Into<String>, file: File, lun: Lun, direct: bool) -> Disk {
        Disk {
            path: path.into(),
            lun,
            direct,
            werror: ErrorAction::Enospc,
            rerror: ErrorAction::Report,
            fd: AtomicI32::new(file.into_raw_fd()),
            removed: AtomicBool::new(false),
        }
    }

    /// QEMU's `werror=` and `rerror=` (defaults: enospc, report).
    pub fn with_error_policy(mut self, werror: ErrorAction, rerror: ErrorAction) -> Disk {
        self.werror = werror;
        self.rerror = rerror;
        self
    }

    /// The slot of a LUN that was unplugged before a snapshot: it keeps
    /// the LUN numbers of the ones after it, and answers as absent.
    pub fn removed_slot(path: impl Into<String>, lun: Lun) -> Disk {
        Disk {
            path: path.into(),
            lun,
            direct: false,
            werror: ErrorAction::Enospc,
            rerror: ErrorAction::Report,
            fd: AtomicI32::new(-1),
            removed: AtomicBool::new(true),
        }
    }

    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    /// The file to do I/O on, None once the LUN was unplugged.
    fn fd(&self) -> Option<RawFd> {
        if self.is_removed() {
            return None;
        }
        let fd = self.fd.load(Ordering::Acquire);
        (fd >= 0).then_some(fd)
    }

    fn close(&self) {
        let fd = self.fd.swap(-1, Ordering::AcqRel);
        if fd >= 0 {
            // SAFETY: the fd came from into_raw_fd and is closed only here
            // (swapped out above, so once); no request can still pick it
            // up (see Hotplug::unplug).
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        self.close();
    }
}

pub struct VirtioScsi {
    disks: Arc<Vec<Disk>>,
    iothreads: Vec<Remote>,
    num_queues: u32,
    sense_size: u32,
    cdb_size: u32,
    /// (iothread, source) of every running queue.
    running: Vec<(Remote, SourceId)>,
    needs_reset: Arc<AtomicBool>,
    dirty: Option<Arc<DmaDirtyLog>>,
    /// The event queue of the current activation, if the driver took
    /// hotplug events: (its iothread, its source).
    events: Arc<Mutex<Option<(Remote, SourceId)>>>,
    /// Told about every request a `stop` error policy holds.
    errors: Option<ErrorSink>,
}

/// The request queues of one activation, for task management: (owning
/// iothread, worker source). Locked only to copy it.
type Peers = Arc<std::sync::Mutex<Vec<(Remote, SourceId)>>>;

impl VirtioScsi {
    /// `num_queues` request queues spread round-robin over `iothreads`.
    pub fn new(disks: Vec<Disk>, iothreads: Vec<Remote>, num_queues: u32) -> VirtioScsi {
        assert!(!iothreads.is_empty() && num_queues >= 1);
        VirtioScsi {
            disks: Arc::new(disks),
            iothreads,
            num_queues,
            sense_size: DEFAULT_SENSE_SIZE,
            cdb_size: DEFAULT_CDB_SIZE,
            running: Vec::new(),
            needs_reset: Arc::new(AtomicBool::new(false)),
            dirty: None,
            events: Arc::default(),
            errors: None,
        }
    }

    /// Where requests held by a `stop` error policy are reported (the VM
    /// stops); [`VirtioScsi::error_control`] issues them again.
    pub fn with_error_sink(mut self, sink: ErrorSink) -> VirtioScsi {
        self.errors = Some(sink);
        self
    }

    pub fn error_control(&self) -> ErrorControl {
        ErrorControl { iothreads: self.iothreads.clone() }
    }

    /// The handle that unplugs this controller's LUNs (used without the
    /// transport's lock).
    pub fn hotplug(&self) -> Hotplug {
        Hotplug { disks: self.disks.clone(), iothreads: self.iothreads.clone(), events: self.events.clone() }
    }

    /// Every byte the queues write into guest memory is also marked in
    /// `log` (for live snapshots).
    pub fn with_dirty_log(mut self, log: Arc<DmaDirtyLog>) -> VirtioScsi {
        self.dirty = Some(log);
        self
    }

    pub fn needs_reset_flag(&self) -> Arc<AtomicBool> {
        self.needs_reset.clone()
    }

    fn config_bytes(&self) -> [u8; 36] {
        let mut c = [0u8; 36];
        let put32 = |c: &mut [u8; 36], o: usize, v: u32| c[o..o + 4].copy_from_slice(&v.to_le_bytes());
        put32(&mut c, 0, self.num_queues);
        put32(&mut c, 4, SEG_MAX);
        put32(&mut c, 8, scsi::MAX_TRANSFER_BLOCKS);
        put32(&mut c, 12, u32::from(QUEUE_SIZE));
        put32(&mut c, 16, 16); // event_info_size
        put32(&mut c, 20, self.sense_size);
        put32(&mut c, 24, self.cdb_size);
        c[28..30].copy_from_slice(&0u16.to_le_bytes()); // max_channel
        c[30..32].copy_from_slice(&0u16.to_le_bytes()); // max_target
        put32(&mut c, 32, self.disks.len().saturating_sub(1) as u32); // max_lun
        c
    }
}

impl VirtioDevice for VirtioScsi {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 2 + self.num_queues as usize]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_SCSI_F_HOTPLUG
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = c.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only sense_size and cdb_size are driver-writable.
        if data.len() != 4 {
            return;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        match offset {
            20 if v <= MAX_SENSE_SIZE => self.sense_size = v,
            24 if (6..=MAX_CDB_SIZE).contains(&v) => self.cdb_size = v,
            _ => log::debug!("virtio-scsi: ignored config write at {offset} ({v})"),
        }
    }

    fn activate(&mut self, mem: GuestMemoryMmap, acked: u64, queues: Vec<ActiveQueue>) -> crate::Result<()> {
        // Shared, not cloned per request: a GuestMemoryMmap clone allocates.
        let mem = Arc::new(mem);
        let event_idx = acked & VIRTIO_RING_F_EVENT_IDX != 0;
        let peers: Peers = Arc::default();
        let mut request_queues = Vec::new();
        for q in queues {
            // The event queue is served only if the driver takes hotplug
            // events (else nothing is ever sent on it).
            if q.index == 1 {
                if acked & VIRTIO_SCSI_F_HOTPLUG != 0 {
                    let remote = self.iothreads[0].clone();
                    let source = SourceId::new();
                    let ev = EventQ {
                        queue: q.queue,
                        mem: mem.clone(),
                        notify: q.notify,
                        irq: q.irq,
                        event_idx,
                        dirty: self.dirty.clone(),
                        pending: VecDeque::new(),
                        missed: false,
                        stopped: false,
                        poll: None,
                    };
                    remote.send(move |ring| EventQ::start(ring, source, ev))?;
                    *self.events.lock().unwrap_or_else(|e| e.into_inner()) = Some((remote.clone(), source));
                    self.running.push((remote, source));
                }
                continue;
            }
            let remote = if q.index == 0 { self.iothreads[0].clone() } else { self.iothreads[(q.index as usize - 2) % self.iothreads.len()].clone() };
            let source = SourceId::new();
            let setup = WorkerSetup {
                control: q.index == 0,
                index: q.index,
                queue: q.queue,
                mem: mem.clone(),
                notify: q.notify,
                irq: q.irq,
                disks: self.disks.clone(),
                sense_size: self.sense_size,
                cdb_size: self.cdb_size,
                source,
                needs_reset: self.needs_reset.clone(),
                dirty: self.dirty.clone(),
                peers: peers.clone(),
                own: remote.clone(),
                errors: self.errors.clone(),
            };
            remote.send(move |ring| Worker::start(ring, setup))?;
            if q.index >= 2 {
                request_queues.push((remote.clone(), source));
            }
            self.running.push((remote, source));
        }
        *peers.lock().unwrap_or_else(|e| e.into_inner()) = request_queues;
        Ok(())
    }

    fn reset(&mut self) -> crate::Result<()> {
        let result = self.quiesce();
        self.needs_reset.store(false, Ordering::Relaxed);
        self.sense_size = DEFAULT_SENSE_SIZE;
        self.cdb_size = DEFAULT_CDB_SIZE;
        result
    }

    fn pause(&mut self) -> crate::Result<()> {
        self.quiesce()
    }

    fn save(&self) -> serde_json::Value {
        serde_json::json!({ "sense_size": self.sense_size, "cdb_size": self.cdb_size })
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let get = |k: &str| state.get(k).and_then(serde_json::Value::as_u64).ok_or_else(|| format!("virtio-scsi state: '{k}' missing"));
        let (sense, cdb) = (get("sense_size")?, get("cdb_size")?);
        if sense > u64::from(MAX_SENSE_SIZE) || !(6..=u64::from(MAX_CDB_SIZE)).contains(&cdb) {
            return Err(format!("virtio-scsi state: sense_size {sense} or cdb_size {cdb} out of range"));
        }
        self.sense_size = sense as u32;
        self.cdb_size = cdb as u32;
        Ok(())
    }

    fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Relaxed)
    }

    fn describe(&self) -> Vec<String> {
        self.disks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                format!(
                    "lun {i}: {}{} ({} blocks of {}, {}{})",
                    d.path,
                    if d.is_removed() { " (unplugged)" } else { "" },
                    d.lun.blocks,
                    d.lun.block_size,
                    if d.lun.readonly { "ro" } else { "rw" },
                    if d.direct { ", cache=none" } else { "" }
                )
            })
            .collect()
    }
}

impl VirtioScsi {
    /// Asks every owning iothread to stop taking requests, then waits on
    /// each one's quiesce event: in-flight requests finish (their used
    /// entries are written), none is lost or replayed.
    fn quiesce(&mut self) -> crate::Result<()> {
        *self.events.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let mut waiters = Vec::new();
        for (remote, source) in self.running.drain(..) {
            let s = source;
            remote.send(move |ring| Worker::stop(ring, s))?;
            waiters.push((remote.quiesce(source)?, remote, source));
        }
        let mut result = Ok(());
        for (w, remote, source) in waiters {
            if let Err(e) = w.wait(QUIESCE_DEADLINE) {
                log::error!("virtio-scsi: queue source {source:?} did not quiesce: {e}");
                result = Err(e.into());
            }
            let _ = remote.send(move |_| Worker::forget(source));
        }
        result
    }
}

struct WorkerSetup {
    control: bool,
    index: u16,
    queue: Queue,
    mem: Arc<GuestMemoryMmap>,
    notify: EventFd,
    irq: Option<Arc<EventFd>>,
    disks: Arc<Vec<Disk>>,
    sense_size: u32,
    cdb_size: u32,
    source: SourceId,
    needs_reset: Arc<AtomicBool>,
    dirty: Option<Arc<DmaDirtyLog>>,
    /// The request queues (for the control queue's task management).
    peers: Peers,
    /// This queue's iothread (where task-management answers come back).
    own: Remote,
    errors: Option<ErrorSink>,
}

impl WorkerSetup {
    /// Notes guest memory this queue wrote (disk data, responses).
    fn mark(&self, segs: &[(GuestAddress, usize)]) {
        if let Some(d) = &self.dirty {
            for &(a, l) in segs {
                d.mark(a.0, l as u64);
            }
        }
    }
}

/// A request in flight: its I_T_L_Q nexus and the ring operations a task
/// management function would cancel.
struct Track {
    lun: u16,
    tag: u64,
    ops: SmallVec<[OpId; 2]>,
}

/// A task management function waiting for these heads to complete.
struct TmfWait {
    heads: Vec<u16>,
    found: u64,
    reply: Option<Box<dyn FnOnce(u64)>>,
}

/// A task management request on the control queue, waiting for the
/// request queues' answers.
struct PendingTmf {
    head: u16,
    wr: Vec<(GuestAddress, usize)>,
    waiting: usize,
    found: u64,
    query: bool,
}

/// One queue, owned by one iothread.
struct Worker {
    s: WorkerSetup,
    poll: Option<OpId>,
    stopped: bool,
    broken: bool,
    /// The driver was told not to notify (no NO_NOTIFY flag, or the
    /// EVENT_IDX avail_event left behind): set while the iothread is awake
    /// after taking requests; its sleep check turns notifications back on.
    notify_off: bool,
    in_flight: Vec<bool>,
    pub completed: u64,
    /// By head index: the requests in flight (their nexus and ring ops).
    tracked: Vec<Option<Track>>,
    tmf_waits: Vec<TmfWait>,
    tmfs: HashMap<u64, PendingTmf>,
    next_tmf: u64,
    /// Requests held by a `stop` error policy until `cont` retries them.
    held: Vec<(Req, Io, u64)>,
}

thread_local! {
    /// The workers this iothread owns, by source id.
    static WORKERS: RefCell<HashMap<SourceId, Rc<RefCell<Worker>>>> = RefCell::new(HashMap::new());
}

type W = Rc<RefCell<Worker>>;

/// Guest memory segments of a chain; a request rarely has more than four,
/// so they stay off the heap.
type Segs = SmallVec<[(GuestAddress, usize); 4]>;

/// Where a request's pieces are in guest memory.
#[derive(Clone)]
struct Req {
    head: u16,
    resp: Segs,
    data_out: Segs,
    data_in: Segs,
}

fn total(segs: &[(GuestAddress, usize)]) -> u64 {
    segs.iter().map(|s| s.1 as u64).sum()
}

/// Splits `segs` at byte `at`: (first part, rest).
fn split(segs: &[(GuestAddress, usize)], mut at: usize) -> (Segs, Segs) {
    let (mut a, mut b) = (Segs::new(), Segs::new());
    for &(addr, len) in segs {
        if at >= len {
            a.push((addr, len));
            at -= len;
        } else if at > 0 {
            a.push((addr, at));
            b.push((GuestAddress(addr.0 + at as u64), len - at));
            at = 0;
        } else {
            b.push((addr, len));
        }
    }
    (a, b)
}

fn read_segs(mem: &GuestMemoryMmap, segs: &[(GuestAddress, usize)], len: usize) -> Option<Vec<u8>> {
    let mut out = vec![0u8; len];
    let mut off = 0;
    for &(addr, l) in segs {
        if off == len {
            break;
        }
        let n = l.min(len - off);
        mem.read_slice(&mut out[off..off + n], addr).ok()?;
        off += n;
    }
    (off == len).then_some(out)
}

fn write_segs(mem: &GuestMemoryMmap, segs: &[(GuestAddress, usize)], data: &[u8]) -> bool {
    let mut off = 0;
    for &(addr, l) in segs {
        if off == data.len() {
            break;
        }
        let n = l.min(data.len() - off);
        if mem.write_slice(&data[off..off + n], addr).is_err() {
            return false;
        }
        off += n;
    }
    off == data.len()
}

/// Host iovecs for the first `len` bytes of `segs`; None if any part is
/// outside guest RAM.
fn iovecs(mem: &GuestMemoryMmap, segs: &[(GuestAddress, usize)], len: u64) -> Option<Vec<libc::iovec>> {
    let mut left = len as usize;
    let mut v = Vec::with_capacity(segs.len());
    for &(addr, l) in segs {
        if left == 0 {
            break;
        }
        let n = l.min(left);
        let slice = mem.get_slice(addr, n).ok()?;
        v.push(libc::iovec { iov_base: slice.ptr_guard_mut().as_ptr().cast(), iov_len: n });
        left -= n;
    }
    (left == 0).then_some(v)
}

impl Worker {
    fn start(ring: &mut Ring, s: WorkerSetup) {
        let source = s.source;
        let fd = s.notify.as_raw_fd();
        let size = s.queue.size() as usize;
        let w: W = Rc::new(RefCell::new(Worker {
            s,
            poll: None,
            stopped: false,
            broken: false,
            notify_off: false,
            in_flight: vec![false; size],
            completed: 0,
            tracked: (0..size).map(|_| None).collect(),
            tmf_waits: Vec::new(),
            tmfs: HashMap::new(),
            next_tmf: 0,
            held: Vec::new(),
        }));
        let w2 = w.clone();
        let poll = ring.submit(source.companion(), Op::Poll { fd, events: libc::POLLIN as u32, multishot: true }, move |ring, c| {
            if c.result.is_ok() {
                let _ = w2.borrow().s.notify.read();
                Worker::process(&w2, ring);
            }
        });
        w.borrow_mut().poll = Some(poll);
        // While the iothread polls (if it does: its poll window), new
        // requests are picked up from the avail ring without waiting for
        // the doorbell's wake-up.
        let w3 = w.clone();
        ring.add_poller(source, move |ring| {
            let ready = {
                let wk = w3.borrow();
                !wk.stopped
                    && !wk.broken
                    && wk.s.queue.avail_idx(&*wk.s.mem, std::sync::atomic::Ordering::Acquire).is_ok_and(|i| i.0 != wk.s.queue.next_avail())
            };
            if ready {
                Worker::process(&w3, ring);
            }
            ready
        });
        // Notifications stay off while the iothread is awake (as QEMU's
        // aio_poll does); before it blocks, they are turned back on and the
        // avail ring looked at once more, so a request posted in between is
        // never left waiting.
        let w4 = w.clone();
        ring.add_sleep_check(source, move |ring| Worker::arm(&w4, ring));
        WORKERS.with(|m| m.borrow_mut().insert(source, w.clone()));
        // Requests queued before DRIVER_OK reached us.
        Worker::process(&w, ring);
    }

    fn stop(ring: &mut Ring, source: SourceId) {
        let Some(w) = WORKERS.with(|m| m.borrow().get(&source).cloned()) else { return EventQ::stop(ring, source) };
        let poll = {
            let mut w = w.borrow_mut();
            w.stopped = true;
            w.poll.take()
        };
        if let Some(p) = poll {
            ring.cancel(p);
        }
        ring.remove_pollers(source);
    }

    fn forget(source: SourceId) {
        WORKERS.with(|m| m.borrow_mut().remove(&source));
        EVENTQS.with(|m| m.borrow_mut().remove(&source));
    }

    /// The used ring (flags, idx, entries, avail_event) was written.
    fn mark_used_ring(&self) {
        if let Some(d) = &self.s.dirty {
            d.mark(self.s.queue.used_ring(), 6 + 8 * u64::from(self.s.queue.size()));
        }
    }

    fn mark_broken(&mut self, why: &str) {
        if !self.broken {
            crate::warn_limited!("virtio-scsi: queue {}: {why}; device needs reset", self.s.index);
            self.broken = true;
            self.s.needs_reset.store(true, Ordering::Relaxed);
        }
    }

    /// Takes every available chain, leaving the driver's notifications off
    /// (the iothread is awake; [`Worker::arm`] turns them on before it
    /// sleeps).
    fn process(w: &W, ring: &mut Ring) {
        let mem = w.borrow().s.mem.clone();
        let chains = {
            let mut wk = w.borrow_mut();
            if wk.stopped || wk.broken {
                return;
            }
            if !wk.notify_off {
                if let Err(e) = wk.s.queue.disable_notification(&*mem) {
                    wk.mark_broken(&format!("disable notification: {e}"));
                    return;
                }
                wk.notify_off = true;
                wk.mark_used_ring();
            }
            let mut chains = Vec::new();
            match wk.s.queue.iter(&*mem) {
                Ok(it) => chains.extend(it),
                Err(e) => {
                    wk.mark_broken(&format!("bad avail index: {e}"));
                    return;
                }
            }
            chains
        };
        for chain in chains {
            Worker::handle(w, ring, chain);
        }
    }

    /// The iothread's sleep check: notifications back on, then one more
    /// look (a request posted while they were off would otherwise wait).
    /// Whether it found work.
    fn arm(w: &W, ring: &mut Ring) -> bool {
        let more = {
            let mut wk = w.borrow_mut();
            if wk.stopped || wk.broken || !wk.notify_off {
                return false;
            }
            let mem = wk.s.mem.clone();
            let re_enabled = wk.s.queue.enable_notification(&*mem);
            wk.notify_off = false;
            wk.mark_used_ring();
            match re_enabled {
                Ok(more) => more,
                Err(e) => {
                    wk.mark_broken(&format!("enable notification: {e}"));
                    false
                }
            }
        };
        if more {
            Worker::process(w, ring);
        }
        more
    }

    fn handle(w: &W, ring: &mut Ring, chain: DescriptorChain<&GuestMemoryMmap>) {
        let head = chain.head_index();
        let (mut rd, mut wr) = (Segs::new(), Segs::new());
        let mut bad_order = false;
        let mut n = 0u32;
        for d in chain {
            n += 1;
            if d.is_write_only() {
                wr.push((d.addr(), d.len() as usize));
            } else {
                if !wr.is_empty() {
                    bad_order = true;
                }
                rd.push((d.addr(), d.len() as usize));
            }
        }
        {
            let mut wk = w.borrow_mut();
            match wk.in_flight.get_mut(head as usize) {
                Some(f) if !*f => *f = true,
                _ => {
                    wk.mark_broken(&format!("head {head} is already in flight"));
                    return;
                }
            }
        }
        let (control, sense_size, cdb_size, mem) = {
            let wk = w.borrow();
            (wk.s.control, wk.s.sense_size as usize, wk.s.cdb_size as usize, wk.s.mem.clone())
        };
        if control {
            return Worker::control(w, ring, head, &rd, &wr);
        }
        let resp_len = 12 + sense_size;
        let (resp, data_in) = split(&wr, resp_len);
        if total(&resp) < resp_len as u64 {
            // Nowhere to say anything: give the head back, zero bytes.
            log::debug!("virtio-scsi: head {head}: response buffer too short");
            return Worker::finish(w, head, 0);
        }
        let req_len = 19 + cdb_size;
        let (hdr_segs, data_out) = split(&rd, req_len);
        let r = Req { head, resp, data_out, data_in };
        let fail = |w: &W, r: &Req, code: u8| Worker::respond(w, r, code, scsi::GOOD, None, 0, 0);
        if bad_order || n > SEG_MAX + 2 {
            return fail(w, &r, S_FAILURE);
        }
        let Some(hdr) = read_segs(&mem, &hdr_segs, req_len) else { return fail(w, &r, S_FAILURE) };
        let lun = &hdr[0..8];
        if lun[0] != 1 || lun[1] != 0 {
            return fail(w, &r, S_BAD_TARGET);
        }
        let lun_id = usize::from(u16::from_be_bytes([lun[2], lun[3]]) & 0x3fff);
        let tag = u64::from_le_bytes(hdr[8..16].try_into().unwrap_or_default());
        if let Some(t) = w.borrow_mut().tracked.get_mut(usize::from(head)) {
            *t = Some(Track { lun: lun_id as u16, tag, ops: SmallVec::new() });
        }
        let cdb = &hdr[19..19 + cdb_size];
        let disks = w.borrow().s.disks.clone();
        // An unplugged LUN answers as absent; with none left, so does the
        // target (as QEMU's bus does).
        let disk = disks.get(lun_id).and_then(|d| d.fd().map(|fd| (d, fd)));
        let luns: Vec<u16> = (0..disks.len() as u16).filter(|&i| !disks[usize::from(i)].is_removed()).collect();
        if luns.is_empty() {
            return fail(w, &r, S_BAD_TARGET);
        }
        let out_len = total(&r.data_out);
        let in_len = total(&r.data_in);
        let params = if scsi::wants_data_out(cdb) {
            let n = (out_len as usize).min(scsi::MAX_PARAM_LEN);
            match read_segs(&mem, &r.data_out, n) {
                Some(p) => p,
                None => return fail(w, &r, S_FAILURE),
            }
        } else {
            Vec::new()
        };
        let action = scsi::execute(&Target { lun: disk.map(|d| &d.0.lun), luns: &luns }, cdb, out_len, in_len, &params);
        let source = w.borrow().s.source;
        let Some((_, fd)) = disk else {
            return Worker::done(w, &r, action);
        };
        let fd = Fd::Raw(fd);
        match action {
            a @ Action::Done { .. } => Worker::done(w, &r, a),
            Action::Read { offset, len } => Worker::submit_io(w, ring, r, Io::Read { lun: lun_id, offset, len }, in_len),
            Action::Write { offset, len, sync } => Worker::submit_io(w, ring, r, Io::Write { lun: lun_id, offset, len, sync }, in_len),
            Action::WriteBuf { offset, data, sync } => Worker::submit_io(w, ring, r, Io::WriteBuf { lun: lun_id, offset, data, sync }, in_len),
            Action::Flush => Worker::submit_io(w, ring, r, Io::Flush { lun: lun_id }, in_len),
            Action::Discard { ranges } => {
                if ranges.is_empty() {
                    return Worker::done(w, &r, Action::good(vec![]));
                }
                let left = Rc::new(RefCell::new((ranges.len(), None::<i32>)));
                let r = Rc::new(r);
                for (off, len) in ranges {
                    let (w2, left, r) = (w.clone(), left.clone(), r.clone());
                    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                    let id = ring.submit(source, Op::Fallocate { fd, mode, offset: off, len }, move |_, c| {
                        let mut l = left.borrow_mut();
                        l.0 -= 1;
                        if let Err(e) = c.result {
                            l.1 = l.1.or(e.raw_os_error());
                        }
                        if l.0 == 0 {
                            match l.1 {
                                None => Worker::done(&w2, &r, Action::good(vec![])),
                                Some(errno) => Worker::done(&w2, &r, Action::check(Sense::from_errno(errno, true))),
                            }
                        }
                    });
                    Worker::track(w, head, &[id]);
                }
            }
        }
    }

    /// Completes a request the target answered without file I/O.
    fn done(w: &W, r: &Req, a: Action) {
        let mem = w.borrow().s.mem.clone();
        let in_len = total(&r.data_in);
        match a {
            Action::Done { status, sense, data } => {
                let n = (data.len() as u64).min(in_len) as usize;
                if !write_segs(&mem, &r.data_in, &data[..n]) {
                    return Worker::respond(w, r, S_FAILURE, scsi::GOOD, None, 0, in_len);
                }
                Worker::respond(w, r, S_OK, status, sense, n as u64, in_len)
            }
            _ => Worker::respond(w, r, S_FAILURE, scsi::GOOD, None, 0, in_len),
        }
    }

    /// Writes the virtio_scsi_cmd_resp and completes the head.
    fn respond(w: &W, r: &Req, response: u8, status: u8, sense: Option<Sense>, data_in: u64, in_len: u64) {
        let (mem, sense_size) = {
            let wk = w.borrow();
            (wk.s.mem.clone(), wk.s.sense_size as usize)
        };
        let mut buf = [0u8; 12 + MAX_SENSE_SIZE as usize];
        let resp = &mut buf[..12 + sense_size];
        let sb = sense.map(|s| s.fixed());
        let sense_len = sb.map_or(0, |s| s.len().min(sense_size));
        resp[0..4].copy_from_slice(&(sense_len as u32).to_le_bytes());
        let resid = in_len.saturating_sub(data_in).min(u64::from(u32::MAX)) as u32;
        resp[4..8].copy_from_slice(&resid.to_le_bytes());
        resp[10] = status;
        resp[11] = response;
        if let Some(s) = sb {
            resp[12..12 + sense_len].copy_from_slice(&s[..sense_len]);
        }
        let used = if write_segs(&mem, &r.resp, resp) { resp.len() as u64 + data_in } else { 0 };
        {
            let wk = w.borrow();
            wk.s.mark(&r.data_in);
            wk.s.mark(&r.resp);
        }
        Worker::finish(w, r.head, used as u32);
    }

    /// Puts `head` in the used ring and signals if the driver wants it.
    fn finish(w: &W, head: u16, used: u32) {
        let mut wk = w.borrow_mut();
        let mem = wk.s.mem.clone();
        if let Some(f) = wk.in_flight.get_mut(head as usize) {
            *f = false;
        }
        if wk.tracked.get_mut(usize::from(head)).and_then(Option::take).is_some() && !wk.tmf_waits.is_empty() {
            for t in &mut wk.tmf_waits {
                t.heads.retain(|&h| h != head);
            }
            let (done, waiting): (Vec<TmfWait>, Vec<TmfWait>) = std::mem::take(&mut wk.tmf_waits).into_iter().partition(|t| t.heads.is_empty());
            wk.tmf_waits = waiting;
            for mut t in done {
                if let Some(reply) = t.reply.take() {
                    reply(t.found);
                }
            }
        }
        wk.completed += 1;
        if let Err(e) = wk.s.queue.add_used(&*mem, head, used) {
            wk.mark_broken(&format!("add_used: {e}"));
            return;
        }
        wk.mark_used_ring();
        match wk.s.queue.needs_notification(&*mem) {
            Ok(true) => {
                if let Some(irq) = &wk.s.irq {
                    let _ = irq.write(1);
                }
            }
            Ok(false) => {}
            Err(e) => wk.mark_broken(&format!("needs_notification: {e}")),
        }
    }

    /// The tracked requests, with their heads.
    fn in_flight_tracks(&self) -> impl Iterator<Item = (u16, &Track)> {
        self.tracked.iter().enumerate().filter_map(|(h, t)| t.as_ref().map(|t| (h as u16, t)))
    }

    fn track(w: &W, head: u16, ids: &[OpId]) {
        if let Some(Some(t)) = w.borrow_mut().tracked.get_mut(usize::from(head)) {
            t.ops.extend_from_slice(ids);
        }
    }

    /// On a request queue's iothread: the requests in flight for `lun`
    /// (all LUNs if None) and `tag` (all if None); with `cancel`, their
    /// ring operations are cancelled and `reply` runs once every one of
    /// them has completed (answered ABORTED, or normally if the kernel
    /// finished first). `reply` gets how many there were.
    fn tmf_scan(ring: &mut Ring, source: SourceId, lun: Option<u16>, tag: Option<u64>, cancel: bool, reply: Box<dyn FnOnce(u64) + Send>) {
        let Some(w) = WORKERS.with(|m| m.borrow().get(&source).cloned()) else { return reply(0) };
        let (heads, ops): (Vec<u16>, Vec<OpId>) = {
            let wk = w.borrow();
            let hit: Vec<(u16, &Track)> = wk.in_flight_tracks().filter(|(_, t)| lun.is_none_or(|l| l == t.lun) && tag.is_none_or(|g| g == t.tag)).collect();
            (hit.iter().map(|(h, _)| *h).collect(), hit.iter().flat_map(|(_, t)| t.ops.iter().copied()).collect())
        };
        let found = heads.len() as u64;
        if !cancel || heads.is_empty() {
            return reply(found);
        }
        w.borrow_mut().tmf_waits.push(TmfWait { heads, found, reply: Some(reply) });
        for op in ops {
            ring.cancel(op);
        }
    }

    /// On the control queue's iothread: one request queue answered.
    fn tmf_part_done(source: SourceId, id: u64, found: u64) {
        let Some(w) = WORKERS.with(|m| m.borrow().get(&source).cloned()) else { return };
        let ready = {
            let mut wk = w.borrow_mut();
            let Some(p) = wk.tmfs.get_mut(&id) else { return };
            p.waiting -= 1;
            p.found += found;
            if p.waiting > 0 {
                return;
            }
            wk.tmfs.remove(&id)
        };
        if let Some(p) = ready {
            let response = if p.query && p.found > 0 { S_FUNCTION_SUCCEEDED } else { 0 };
            Worker::control_reply(&w, p.head, &p.wr, &[response]);
        }
    }

    fn control_reply(w: &W, head: u16, wr: &[(GuestAddress, usize)], reply: &[u8]) {
        let mem = w.borrow().s.mem.clone();
        let used = if write_segs(&mem, wr, reply) { reply.len() as u32 } else { 0 };
        w.borrow().s.mark(wr);
        Worker::finish(w, head, used);
    }

    /// A task management function (virtio_scsi_ctrl_tmf_req: type,
    /// subtype, lun[8], tag). Aborts and resets cancel the matching
    /// requests on every request queue and answer once they are done.
    fn tmf(w: &W, head: u16, req: &[u8], wr: &[(GuestAddress, usize)]) {
        let subtype = u32::from_le_bytes(req[4..8].try_into().unwrap_or_default());
        let lun = &req[8..16];
        let tag = u64::from_le_bytes(req[16..24].try_into().unwrap_or_default());
        if lun[0] != 1 || lun[1] != 0 {
            return Worker::control_reply(w, head, wr, &[S_BAD_TARGET]);
        }
        let lun_id = u16::from_be_bytes([lun[2], lun[3]]) & 0x3fff;
        if w.borrow().s.disks.get(usize::from(lun_id)).is_none_or(Disk::is_removed) {
            return Worker::control_reply(w, head, wr, &[S_INCORRECT_LUN]);
        }
        // (lun filter, tag filter, cancel, query)
        let (lf, tf, cancel, query) = match subtype {
            0 => (Some(lun_id), Some(tag), true, false),                            // ABORT TASK
            1 | 3 | 5 => (Some(lun_id), None, true, false),                         // ABORT/CLEAR TASK SET, LOGICAL UNIT RESET
            4 => (None, None, true, false),                                         // I_T NEXUS RESET
            6 => (Some(lun_id), Some(tag), false, true),                            // QUERY TASK
            7 => (Some(lun_id), None, false, true),                                 // QUERY TASK SET
            _ => return Worker::control_reply(w, head, wr, &[S_FUNCTION_REJECTED]), // CLEAR ACA (no ACA), unknown
        };
        let (peers, own, source) = {
            let wk = w.borrow();
            let peers = wk.s.peers.lock().unwrap_or_else(|e| e.into_inner()).clone();
            (peers, wk.s.own.clone(), wk.s.source)
        };
        let id = {
            let mut wk = w.borrow_mut();
            wk.next_tmf += 1;
            let id = wk.next_tmf;
            wk.tmfs.insert(id, PendingTmf { head, wr: wr.to_vec(), waiting: peers.len() + 1, found: 0, query });
            id
        };
        for (remote, peer) in peers {
            let back = own.clone();
            let reply: Box<dyn FnOnce(u64) + Send> = Box::new(move |found| {
                let _ = back.send(move |_| Worker::tmf_part_done(source, id, found));
            });
            if remote.send(move |ring| Worker::tmf_scan(ring, peer, lf, tf, cancel, reply)).is_err() {
                Worker::tmf_part_done(source, id, 0);
            }
        }
        // Our own share (the control queue holds no SCSI commands).
        Worker::tmf_part_done(source, id, 0);
    }

    /// Control queue: task management and asynchronous notification.
    fn control(w: &W, _ring: &mut Ring, head: u16, rd: &[(GuestAddress, usize)], wr: &[(GuestAddress, usize)]) {
        let mem = w.borrow().s.mem.clone();
        let Some(t) = read_segs(&mem, rd, 4) else { return Worker::finish(w, head, 0) };
        let kind = u32::from_le_bytes([t[0], t[1], t[2], t[3]]);
        if kind == 0 {
            return match read_segs(&mem, rd, 24) {
                Some(req) => Worker::tmf(w, head, &req, wr),
                None => Worker::control_reply(w, head, wr, &[S_FAILURE]),
            };
        }
        let reply: Vec<u8> = match kind {
            1 | 2 => {
                let mut v = vec![0u8; 5]; // AN query/subscribe: no events supported
                v[4] = S_OK;
                v
            }
            _ => vec![S_FAILURE],
        };
        Worker::control_reply(w, head, wr, &reply);
    }
}

/// Unplugs LUNs of one controller while it runs. Cloneable; used from
/// the control thread with no device lock held.
#[derive(Clone)]
pub struct Hotplug {
    disks: Arc<Vec<Disk>>,
    iothreads: Vec<Remote>,
    events: Arc<Mutex<Option<(Remote, SourceId)>>>,
}

impl Hotplug {
    /// Unplugs LUN `lun` and returns at once; `done` runs (on an iothread)
    /// when it is complete. From the moment this is called, new requests to
    /// the LUN are answered as for an absent LUN. Every iothread of the
    /// controller is asked to answer once it has seen that and the LUN's
    /// requests in flight have completed; the last answer closes the file,
    /// sends the driver TRANSPORT_RESET / REMOVED if it took hotplug events,
    /// and calls `done`. Nobody waits: like QEMU's device_del, completion
    /// is an event. An answer dropped unrun (a reset forgot the queue after
    /// quiescing it, or an iothread that stopped) counts as given.
    pub fn unplug_async(&self, lun: usize, done: impl FnOnce() + Send + 'static) -> crate::Result<()> {
        let disk = self.disks.get(lun).ok_or_else(|| crate::Error::Disk { path: format!("lun {lun}"), what: "no such LUN".into() })?;
        if disk.removed.swap(true, Ordering::AcqRel) {
            return Err(crate::Error::Disk { path: disk.path.clone(), what: "already unplugged".into() });
        }
        let last = Arc::new(Unplugging { disks: self.disks.clone(), lun, events: self.events.clone(), done: Mutex::new(Some(Box::new(done))) });
        for remote in &self.iothreads {
            let (token, disks) = (last.clone(), self.disks.clone());
            // Each iothread runs this after whatever request it is in the
            // middle of: from then on it sees the LUN removed.
            let _ = remote.send(move |_| Worker::drain_lun(&disks, lun as u16, Box::new(move || drop(token))));
        }
        Ok(())
    }

    /// [`Hotplug::unplug_async`], waiting up to `deadline` for it.
    pub fn unplug(&self, lun: usize, deadline: Duration) -> crate::Result<()> {
        let (tx, rx) = mpsc::channel::<()>();
        self.unplug_async(lun, move || {
            let _ = tx.send(());
        })?;
        rx.recv_timeout(deadline)
            .map_err(|_| crate::Error::Disk { path: self.disks[lun].path.clone(), what: format!("requests still in flight after {deadline:?}") })
    }

    /// Whether LUN `lun` exists and is still plugged.
    pub fn present(&self, lun: usize) -> bool {
        self.disks.get(lun).is_some_and(|d| !d.is_removed())
    }
}

/// An unplug in progress: held by each iothread's answer; the last one
/// dropped finishes it.
struct Unplugging {
    disks: Arc<Vec<Disk>>,
    lun: usize,
    events: Arc<Mutex<Option<(Remote, SourceId)>>>,
    done: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Drop for Unplugging {
    fn drop(&mut self) {
        let lun = self.lun;
        let disk = &self.disks[lun];
        disk.close();
        let ev = self.events.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some((remote, source)) = ev {
            let mut e = [0u8; 16];
            e[0..4].copy_from_slice(&T_TRANSPORT_RESET.to_le_bytes());
            e[4..8].copy_from_slice(&[1, 0, 0x40 | (lun >> 8) as u8, lun as u8]);
            e[12..16].copy_from_slice(&EVT_RESET_REMOVED.to_le_bytes());
            let _ = remote.send(move |ring| EventQ::post(ring, source, e));
        }
        log::info!("virtio-scsi: lun {lun} ({}) unplugged", disk.path);
        if let Some(done) = self.done.lock().unwrap_or_else(|e| e.into_inner()).take() {
            done();
        }
    }
}

impl Worker {
    /// On an iothread: `reply` runs once no request queue of the
    /// controller owning `disks` on this thread has a request for `lun`
    /// in flight (at once if none has).
    fn drain_lun(disks: &Arc<Vec<Disk>>, lun: u16, reply: Box<dyn FnOnce() + Send>) {
        let workers: Vec<W> = WORKERS.with(|m| m.borrow().values().filter(|w| Arc::ptr_eq(&w.borrow().s.disks, disks)).cloned().collect());
        let left = Rc::new(RefCell::new((1usize, Some(reply))));
        type Left = Rc<RefCell<(usize, Option<Box<dyn FnOnce() + Send>>)>>;
        let one_done = |left: &Left| {
            let r = {
                let mut l = left.borrow_mut();
                l.0 -= 1;
                if l.0 == 0 {
                    l.1.take()
                } else {
                    None
                }
            };
            if let Some(r) = r {
                r();
            }
        };
        for w in workers {
            let heads: Vec<u16> = w.borrow().in_flight_tracks().filter(|(_, t)| t.lun == lun).map(|(h, _)| h).collect();
            if heads.is_empty() {
                continue;
            }
            left.borrow_mut().0 += 1;
            let l = left.clone();
            w.borrow_mut().tmf_waits.push(TmfWait { heads, found: 0, reply: Some(Box::new(move |_| one_done(&l))) });
        }
        one_done(&left);
    }
}

/// The event queue (5.6.6.3), on the control queue's iothread: events
/// wait in `pending` until the driver has posted a buffer.
struct EventQ {
    queue: Queue,
    mem: Arc<GuestMemoryMmap>,
    notify: EventFd,
    irq: Option<Arc<EventFd>>,
    event_idx: bool,
    dirty: Option<Arc<DmaDirtyLog>>,
    pending: VecDeque<[u8; 16]>,
    missed: bool,
    stopped: bool,
    poll: Option<OpId>,
}

thread_local! {
    static EVENTQS: RefCell<HashMap<SourceId, Rc<RefCell<EventQ>>>> = RefCell::new(HashMap::new());
}

impl EventQ {
    fn start(ring: &mut Ring, source: SourceId, ev: EventQ) {
        let fd = ev.notify.as_raw_fd();
        let e = Rc::new(RefCell::new(ev));
        let e2 = e.clone();
        let poll = ring.submit(source.companion(), Op::Poll { fd, events: libc::POLLIN as u32, multishot: true }, move |_, c| {
            if c.result.is_ok() {
                let _ = e2.borrow().notify.read();
                e2.borrow_mut().deliver();
            }
        });
        e.borrow_mut().poll = Some(poll);
        EVENTQS.with(|m| m.borrow_mut().insert(source, e));
    }

    fn stop(ring: &mut Ring, source: SourceId) {
        let Some(e) = EVENTQS.with(|m| m.borrow().get(&source).cloned()) else { return };
        let poll = {
            let mut e = e.borrow_mut();
            e.stopped = true;
            e.poll.take()
        };
        if let Some(p) = poll {
            ring.cancel(p);
        }
    }

    fn post(_ring: &mut Ring, source: SourceId, event: [u8; 16]) {
        let Some(e) = EVENTQS.with(|m| m.borrow().get(&source).cloned()) else { return };
        let mut e = e.borrow_mut();
        if e.pending.len() >= MAX_PENDING_EVENTS {
            e.missed = true;
        } else {
            e.pending.push_back(event);
        }
        e.deliver();
    }

    /// Hands pending events to the driver's buffers, as far as they go.
    fn deliver(&mut self) {
        let mem = self.mem.clone();
        let mut signal = false;
        while !self.stopped && !self.pending.is_empty() {
            let Some(chain) = self.queue.pop_descriptor_chain(&*mem) else { break };
            let head = chain.head_index();
            let wr: Vec<(GuestAddress, usize)> = chain.filter(|d| d.is_write_only()).map(|d| (d.addr(), d.len() as usize)).collect();
            let mut used = 0u32;
            if total(&wr) >= 16 {
                let mut ev = self.pending.pop_front().unwrap_or_default();
                if self.missed {
                    let t = u32::from_le_bytes([ev[0], ev[1], ev[2], ev[3]]) | T_EVENTS_MISSED;
                    ev[0..4].copy_from_slice(&t.to_le_bytes());
                    self.missed = false;
                }
                if write_segs(&mem, &wr, &ev) {
                    used = 16;
                    if let Some(d) = &self.dirty {
                        for &(a, l) in &wr {
                            d.mark(a.0, l as u64);
                        }
                    }
                } else {
                    self.missed = true;
                }
            } else {
                log::debug!("virtio-scsi: event buffer {head} shorter than an event");
            }
            if self.queue.add_used(&*mem, head, used).is_err() {
                crate::warn_limited!("virtio-scsi: event queue: add_used failed");
                return;
            }
            if let Some(d) = &self.dirty {
                d.mark(self.queue.used_ring(), 6 + 8 * u64::from(self.queue.size()));
            }
            signal |= self.queue.needs_notification(&*mem).unwrap_or(true);
        }
        if self.event_idx {
            // Kick us when the driver posts more buffers.
            let _ = self.queue.enable_notification(&*mem);
        }
        if signal {
            if let Some(irq) = &self.irq {
                let _ = irq.write(1);
            }
        }
    }
}

/// A disk's size in bytes (files and block devices).
pub fn disk_size(f: &File) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = f;
    f.seek(SeekFrom::End(0))
}
