//! The saving engine. It lives on one iothread and only ever waits in its
//! ring; it talks to the control thread by pushing events (never waiting
//! on it), and the control thread answers by sending closures.

use std::cell::RefCell;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use kvm_ioctls::VmFd;
use ring::{Fd, Op, Ring};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

pub use super::converge::Converge;
use super::format::{Header, PAGE};
use super::pages::is_zero;
pub use super::save_error::SaveError;
use super::target::{open_target, Target};
use super::{SaveShared, SaveState};
use crate::events::{EventQueue, SnapshotStep, VmEvent};
use crate::nfs;

mod close;
use close::{end, finish};

/// Ring source of the state file's operations.
/// The snapshot iothread's one source (its ring serves only the snapshot).
pub const SNAPSHOT_SOURCE: ring::SourceId = ring::SourceId::fixed(1);
const MAX_INFLIGHT: usize = 32;
/// Pages per write (1 MiB).
const RUN_PAGES: u64 = 256;
pub const MAX_PASSES: u32 = 30;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Live,
    /// Waiting for the control thread to pause the vCPUs.
    WaitPause,
    /// vCPUs paused: writing the last dirty pages.
    Final,
    /// vCPUs running again: state, metadata, fdatasync, completion record.
    Closing,
    Done,
}

pub struct Params {
    pub path: String,
    pub header: Header,
    /// (memslot, gpa, size) of each RAM region, in header order.
    pub slots: Vec<(u32, u64, u64)>,
    pub downtime_ms: f64,
    /// Pages devices wrote into guest RAM (KVM's log misses them).
    pub dma: Option<Arc<devices::dirty::DmaDirtyLog>>,
    /// Refuse a symlink as the file (O_NOFOLLOW), for `--statefile-dir`.
    pub nofollow: bool,
    /// The final pause may last this long; past it the snapshot fails and
    /// the guest resumes (a target that stalls must not hold the vCPUs).
    pub final_timeout_ms: f64,
    /// How a snapshot whose guest dirties faster than the target writes
    /// is made to finish.
    pub converge: Converge,
    /// An incremental snapshot (the header names its base): only pages
    /// dirtied since the base (KVM's log and the DMA log kept on since
    /// then) are written, zero ones included (absent means "as in the
    /// base", not zero).
    pub incremental: bool,
}

struct Job {
    p: Params,
    vm: Arc<dyn DirtyLog + Send + Sync>,
    mem: GuestMemoryMmap,
    shared: Arc<SaveShared>,
    events: Arc<EventQueue>,
    target: Target,
    present: Vec<Vec<u64>>,
    /// Each page's checksum, little-endian, as the file holds them: the
    /// closing writes these buffers as they are (a copy made then would
    /// fault 1 MiB of fresh memory per GiB of guest into the pause's
    /// aftermath; 6 ms on this host).
    crcs: Vec<Vec<u8>>,
    dirty: Vec<Vec<u64>>,
    cursor: (usize, u64),
    inflight: usize,
    phase: Phase,
    pass: u32,
    pass_started: Instant,
    pass_bytes: u64,
    last_dirty: Vec<u64>,
    ram_bytes: u64,
    throughput: f64,
    failed: bool,
    header_crc: u32,
    final_timer: Option<ring::OpId>,
    /// The CPU throttle asked for (auto-converge), and the passes since
    /// the last raise in which the guest out-dirtied the target.
    throttle: u32,
    high_passes: u32,
    /// dirty-limit: each vCPU's pages logged at the last pass's end, and
    /// the limits asked for.
    vcpu_pages: Vec<u64>,
    limits: Vec<u64>,
    /// dirty-limit's checks within a pass: pages dirtied behind the cursor
    /// (for the next pass), and when the last check was, with the bytes
    /// written and each vCPU's logged pages then.
    next: Vec<Vec<u64>>,
    tick_at: (Instant, u64),
    tick_pages: Vec<u64>,
    /// Where the time went, logged when the job ends.
    marks: Vec<(String, Instant)>,
}

/// Bytes each vCPU dirtied since `before` (its logged pages then, now
/// replaced by `now`).
fn bytes_since(now: Vec<u64>, before: &mut Vec<u64>) -> Vec<u64> {
    let bytes = now.iter().zip(before.iter().chain(std::iter::repeat(&0))).map(|(n, o)| n.saturating_sub(*o) * PAGE).collect();
    *before = now;
    bytes
}

/// How often dirty-limit checks the guest's dirty rate within a pass.
const TICK: std::time::Duration = std::time::Duration::from_millis(500);

/// The job, as its iothread's ring keeps it (under [`SNAPSHOT_SOURCE`]):
/// the control thread reaches it only through closures sent to that ring.
type JobRef = Rc<RefCell<Job>>;

/// The job this thread's ring keeps, if one runs.
fn job_of(ring: &Ring) -> Option<JobRef> {
    ring.owned::<RefCell<Job>>(SNAPSHOT_SOURCE)
}

/// Where the job reads which pages the guest dirtied: KVM's dirty log
/// (KVM_GET_DIRTY_LOG, which also clears it), or a test's stand-in.
pub trait DirtyLog {
    /// The bitmap of `slot` (`size` bytes of RAM), one bit per page, and
    /// the log cleared.
    fn dirty_log(&self, slot: u32, size: usize) -> Result<Vec<u64>, kvm_ioctls::Error>;
    /// Pages logged for each vCPU so far, ever (a dirty ring knows which
    /// vCPU dirtied a page; the bitmap does not: empty).
    fn vcpu_pages(&self) -> Vec<u64> {
        Vec::new()
    }
}

impl DirtyLog for VmFd {
    fn dirty_log(&self, slot: u32, size: usize) -> Result<Vec<u64>, kvm_ioctls::Error> {
        self.get_dirty_log(slot, size)
    }
}

/// Starts a snapshot on the calling iothread. Failures end up in the
/// shared status (and a `Done` event), never in the caller.
pub fn start(ring: &mut Ring, p: Params, vm: Arc<dyn DirtyLog + Send + Sync>, mem: GuestMemoryMmap, shared: Arc<SaveShared>, events: Arc<EventQueue>) {
    let fail = |shared: &SaveShared, events: &EventQueue, e: SaveError| {
        let msg = if e.names_the_file() { e.to_string() } else { format!("statefile {}: {e}", p.path) };
        shared.update(|s| {
            s.state = SaveState::Failed;
            s.error = Some(msg);
        });
        events.push(VmEvent::Snapshot(SnapshotStep::Done));
    };
    let header = match p.header.encode() {
        Ok(h) => h,
        Err(e) => return fail(&shared, &events, e.into()),
    };
    let header_crc = u32::from_le_bytes(header[16..20].try_into().unwrap_or_default());
    let n = p.header.regions.len();
    let present = p.header.regions.iter().map(|r| vec![0u64; r.pages().div_ceil(64) as usize]).collect();
    let crcs = p.header.regions.iter().map(|r| vec![0u8; r.pages() as usize * 4]).collect();
    // Pass 0: every page (an incremental one: what changed since its base).
    let incremental = p.incremental;
    let dirty = p
        .header
        .regions
        .iter()
        .map(|r| {
            let mut v = vec![if incremental { 0 } else { u64::MAX }; r.pages().div_ceil(64) as usize];
            if !incremental && r.pages() % 64 != 0 {
                let last = v.len() - 1;
                v[last] = (1u64 << (r.pages() % 64)) - 1;
            }
            v
        })
        .collect();
    let vcpu_pages = vm.vcpu_pages();
    let next: Vec<Vec<u64>> = p.header.regions.iter().map(|r| vec![0u64; r.pages().div_ceil(64) as usize]).collect();
    let (target, is_direct) = match open_target(&p.path, &header, p.header.file_size, p.nofollow) {
        Ok(t) => t,
        Err(e) => return fail(&shared, &events, e.into()),
    };
    shared.update(|s| s.direct_io = is_direct);
    let job = Rc::new(RefCell::new(Job {
        p,
        vm,
        mem,
        shared,
        events,
        target,
        present,
        crcs,
        dirty,
        cursor: (0, 0),
        inflight: 0,
        phase: Phase::Live,
        pass: 0,
        pass_started: Instant::now(),
        pass_bytes: 0,
        last_dirty: vec![0; n],
        ram_bytes: 0,
        throughput: 0.0,
        failed: false,
        header_crc,
        final_timer: None,
        throttle: 0,
        high_passes: 0,
        next,
        tick_at: (Instant::now(), 0),
        tick_pages: vcpu_pages.clone(),
        vcpu_pages,
        limits: Vec::new(),
        marks: Vec::new(),
    }));
    {
        let mut j = job.borrow_mut();
        j.mark("setup".into());
        let setup = j.shared.get().started.map(|t| t.elapsed().as_millis() as u64);
        j.shared.update(|s| s.setup_ms = setup);
    }
    if let Target::Nfs { handler, .. } = &mut job.borrow_mut().target {
        // Results of the NFS requests come back through the ring's poll.
        let weak = Rc::downgrade(&job);
        *handler = Some(Rc::new(move |ring: &mut Ring, r: Result<Vec<nfs::Done>, nfs::NfsError>| {
            if let Some(job) = weak.upgrade() {
                nfs_done(&job, ring, r);
            }
        }));
    }
    if incremental {
        let r = job.borrow_mut().harvest();
        if let Err(e) = r {
            job.borrow_mut().fail(e);
        }
    }
    ring.adopt(SNAPSHOT_SOURCE, job.clone());
    if matches!(job.borrow().p.converge, Converge::DirtyLimit { .. }) {
        schedule_tick(&job, ring);
    }
    pump(&job, ring);
}

/// dirty-limit's next check within the pass (see [`Job::tick`]).
fn schedule_tick(job: &JobRef, ring: &mut Ring) {
    let weak = Rc::downgrade(job);
    ring.submit(SNAPSHOT_SOURCE, Op::Timeout { after: TICK }, move |ring, _| {
        let Some(job) = weak.upgrade() else { return };
        {
            let mut j = job.borrow_mut();
            if j.phase != Phase::Live || j.failed {
                return;
            }
            if let Err(e) = j.tick() {
                j.fail(e);
                drop(j);
                return pump(&job, ring);
            }
        }
        schedule_tick(&job, ring);
    });
}

/// Called (as a closure sent by the control thread) once the vCPUs are out.
pub fn final_phase(ring: &mut Ring) {
    let Some(job) = job_of(ring) else { return };
    {
        let mut j = job.borrow_mut();
        if j.phase != Phase::WaitPause {
            return;
        }
        j.phase = Phase::Final;
        j.pass_bytes = 0;
        j.mark("paused".into());
        if let Err(e) = j.harvest() {
            j.fail(e);
        }
        // The watchdog of the pause: the guest waits on this pass.
        let limit = j.p.final_timeout_ms;
        let job2 = job.clone();
        let id = ring.submit(SNAPSHOT_SOURCE, Op::Timeout { after: std::time::Duration::from_secs_f64(limit / 1e3) }, move |ring, c| {
            let fire = {
                let mut j = job2.borrow_mut();
                j.final_timer = None;
                let fire = j.phase == Phase::Final && c.result.as_ref().err().and_then(|e| e.raw_os_error()) != Some(libc::ECANCELED);
                if fire {
                    j.fail(SaveError::PauseTimeout(limit));
                }
                fire
            };
            if fire {
                pump(&job2, ring);
            }
        });
        j.final_timer = Some(id);
    }
    pump(&job, ring);
}

/// Wakes the job (after a cancel request).
pub fn poke(ring: &mut Ring) {
    if let Some(job) = job_of(ring) {
        pump(&job, ring);
    }
}

/// The VMM wrote guest memory behind KVM's back (a reset reloaded the
/// kernel): those pages are dirty again.
pub fn mark_dirty(ring: &mut Ring, ranges: &[(u64, u64)]) {
    let Some(job) = job_of(ring) else { return };
    {
        let mut j = job.borrow_mut();
        if !matches!(j.phase, Phase::Live | Phase::WaitPause | Phase::Final) {
            return;
        }
        let regions = j.p.header.regions.clone();
        for &(gpa, len) in ranges {
            for (r, region) in regions.iter().enumerate() {
                let start = gpa.max(region.gpa);
                let end = (gpa + len).min(region.gpa + region.size);
                let mut p = start.saturating_sub(region.gpa) / PAGE;
                while start < end && region.gpa + p * PAGE < end {
                    j.dirty[r][(p / 64) as usize] |= 1 << (p % 64);
                    p += 1;
                }
            }
        }
        // No rescan of this pass: a page already written in it may still be
        // in flight, and a second write of it could land first and leave
        // the older bytes under the newer checksum. The next pass (or the
        // final one, which starts from the top) writes them.
    }
    pump(&job, ring);
}

/// Called once the control thread resumed the vCPUs, with the state.
pub fn close(ring: &mut Ring, state_json: Vec<u8>) {
    let Some(job) = job_of(ring) else { return };
    {
        let mut j = job.borrow_mut();
        j.phase = Phase::Closing;
        j.mark("resumed".into());
    }
    if let Err(e) = finish(&job, ring, state_json) {
        job.borrow_mut().fail(e);
        end(&job, ring);
    }
}

impl Job {
    fn mark(&mut self, what: String) {
        self.marks.push((what, Instant::now()));
    }

    /// "setup 20.1, pass 1 (900 MiB) 480.3, ..." in ms since savevm-start.
    fn timeline(&self) -> String {
        let Some(t0) = self.shared.get().started else { return String::new() };
        self.marks.iter().map(|(w, t)| format!("{w} {:.1}", t.duration_since(t0).as_secs_f64() * 1e3)).collect::<Vec<_>>().join(", ")
    }

    fn fail(&mut self, e: SaveError) {
        if !self.failed {
            self.failed = true;
            log::warn!("snapshot failed: {e}");
            let msg = if e.names_the_file() { e.to_string() } else { format!("statefile {}: {e}", self.p.path) };
            self.shared.update(|s| {
                // The control thread may have failed it first, with the reason.
                if s.state != SaveState::Failed || s.error.is_none() {
                    s.error = Some(msg);
                }
                s.state = SaveState::Failed;
            });
        }
    }

    fn set_crc(&mut self, r: usize, p: u64, crc: u32) {
        let at = p as usize * 4;
        self.crcs[r][at..at + 4].copy_from_slice(&crc.to_le_bytes());
    }

    fn set_present(&mut self, r: usize, p: u64, on: bool) {
        let w = &mut self.present[r][(p / 64) as usize];
        if on {
            *w |= 1 << (p % 64);
        } else {
            *w &= !(1 << (p % 64));
        }
    }

    /// The local state file is still ours and whole: not deleted or
    /// replaced under the snapshot, not truncated (RAM precedes the
    /// metadata, which is written only at the end, so a truncation shows as
    /// a short file until then).
    fn check_file(&self) -> Result<(), SaveError> {
        let Target::File { direct, new, .. } = &self.target else { return Ok(()) };
        let m = match direct.metadata() {
            Ok(m) => m,
            // What network and FUSE filesystems answer for a removed file.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ESTALE)) => return Err(SaveError::Deleted),
            Err(e) => return Err(SaveError::io("fstat")(e)),
        };
        // (An unnamed file has no name to lose.)
        if let Some(tmp) = &new.name {
            if std::os::unix::fs::MetadataExt::nlink(&m) == 0 {
                return Err(SaveError::Deleted);
            }
            match std::fs::symlink_metadata(tmp) {
                Ok(p)
                    if std::os::unix::fs::MetadataExt::ino(&p) == std::os::unix::fs::MetadataExt::ino(&m)
                        && std::os::unix::fs::MetadataExt::dev(&p) == std::os::unix::fs::MetadataExt::dev(&m) => {}
                _ => return Err(SaveError::Replaced),
            }
        }
        if m.len() < self.p.header.file_size {
            return Err(SaveError::Truncated { len: m.len(), laid_out: self.p.header.file_size });
        }
        Ok(())
    }

    /// dirty-limit's check within a pass, every [`TICK`]: on a slow target
    /// one pass takes many seconds, and a guest that rewrites its RAM in a
    /// fraction of one would have dirtied all of it again by the pass's
    /// end. So the dirty log is taken now: a page still to be written in
    /// this pass needs nothing more (its bit is dropped: the pass writes
    /// what it holds then), the others wait in `next`; and vCPUs that
    /// dirty faster than [`DIRTY_SHARE`](super::converge::DIRTY_SHARE) of
    /// what the target took since the last check are limited at once (never raised within the snapshot).
    fn tick(&mut self) -> Result<(), SaveError> {
        let secs = self.tick_at.0.elapsed().as_secs_f64().max(1e-3);
        let written = self.ram_bytes.saturating_sub(self.tick_at.1);
        self.tick_at = (Instant::now(), self.ram_bytes);
        for (i, &(slot, gpa, size)) in self.p.slots.iter().enumerate() {
            let bm = self.vm.dirty_log(slot, size as usize).map_err(SaveError::DirtyLog)?;
            let dma = self.p.dma.as_ref().and_then(|l| l.take(gpa)).unwrap_or_default();
            for (w, n) in self.next[i].iter_mut().enumerate() {
                let new = bm.get(w).copied().unwrap_or(0) | dma.get(w).copied().unwrap_or(0);
                *n |= new & !self.dirty[i][w];
            }
        }
        let per_vcpu = bytes_since(self.vm.vcpu_pages(), &mut self.tick_pages);
        let dirtied = per_vcpu.iter().sum();
        let m = super::converge::PassRates { written, secs, dirtied, per_vcpu: &per_vcpu };
        if let Some(next) = self.p.converge.next_limits(&self.limits, &m, false) {
            log::info!(
                "snapshot pass {}: the guest dirtied {:.0} MB/s while the target took {:.0} MB/s; vCPU limits {:?} MB/s",
                self.pass,
                dirtied as f64 / secs / 1e6,
                written as f64 / secs / 1e6,
                next.iter().map(|l| l / 1_000_000).collect::<Vec<_>>()
            );
            self.set_limits(next);
        }
        Ok(())
    }

    /// KVM_GET_DIRTY_LOG for every slot (it also clears KVM's copy), and
    /// what the checks within the pass set aside.
    fn harvest(&mut self) -> Result<(), SaveError> {
        for (i, &(slot, gpa, size)) in self.p.slots.iter().enumerate() {
            for (d, n) in self.dirty[i].iter_mut().zip(self.next[i].iter_mut()) {
                *d |= std::mem::take(n);
            }
            let bm = self.vm.dirty_log(slot, size as usize).map_err(SaveError::DirtyLog)?;
            for (d, b) in self.dirty[i].iter_mut().zip(bm) {
                *d |= b;
            }
            if let Some(dma) = self.p.dma.as_ref().and_then(|l| l.take(gpa)) {
                for (d, b) in self.dirty[i].iter_mut().zip(dma) {
                    *d |= b;
                }
            }
            self.last_dirty[i] = self.dirty[i].iter().map(|w| u64::from(w.count_ones())).sum();
        }
        self.cursor = (0, 0);
        Ok(())
    }

    /// dirty-limit: per-vCPU rates from the dirty rings, and new limits
    /// when the guest out-dirtied the target.
    fn dirty_limit(&mut self, written: u64, dirtied: u64, secs: f64) {
        if !matches!(self.p.converge, Converge::DirtyLimit { .. }) {
            return;
        }
        let per_vcpu = bytes_since(self.vm.vcpu_pages(), &mut self.vcpu_pages);
        let m = super::converge::PassRates { written, secs, dirtied, per_vcpu: &per_vcpu };
        let rates: Vec<f64> = per_vcpu.iter().map(|&b| b as f64 / secs / 1e6).collect();
        if let Some(next) = self.p.converge.next_limits(&self.limits, &m, true) {
            log::info!(
                "snapshot pass {}: the guest dirtied {} MiB while {} MiB were written; vCPU dirty rates {rates:.1?} MB/s, limits {:?} MB/s",
                self.pass,
                dirtied >> 20,
                written >> 20,
                next.iter().map(|l| l / 1_000_000).collect::<Vec<_>>()
            );
            self.set_limits(next);
        }
        self.shared.update(|s| s.vcpu_dirty_rates_mbps = rates);
    }

    /// New dirty limits: kept, shown, and sent to the control thread,
    /// which applies them to the vCPUs.
    fn set_limits(&mut self, next: Vec<u64>) {
        self.limits = next.clone();
        self.shared.update(|s| s.dirty_limits = next);
        self.events.push(VmEvent::Snapshot(SnapshotStep::DirtyLimit));
    }

    fn pending_pages(&self) -> u64 {
        self.dirty.iter().flatten().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Next run of dirty pages from the cursor: (region, first page, count).
    fn next_run(&mut self) -> Option<(usize, u64, u64)> {
        while self.cursor.0 < self.dirty.len() {
            let r = self.cursor.0;
            let pages = self.p.header.regions[r].pages();
            let mut p = self.cursor.1;
            while p < pages {
                let word = self.dirty[r][(p / 64) as usize] >> (p % 64);
                if word == 0 {
                    p = (p / 64 + 1) * 64;
                    continue;
                }
                p += u64::from(word.trailing_zeros());
                if p >= pages {
                    break;
                }
                let start = p;
                while p < pages && p - start < RUN_PAGES && self.dirty[r][(p / 64) as usize] & (1 << (p % 64)) != 0 {
                    self.dirty[r][(p / 64) as usize] &= !(1 << (p % 64));
                    p += 1;
                }
                self.cursor = (r, p);
                return Some((r, start, p - start));
            }
            self.cursor = (r + 1, 0);
        }
        None
    }
}

fn pump(job: &JobRef, ring: &mut Ring) {
    let mut queued_nfs = false;
    fill(job, ring, &mut queued_nfs);
    if queued_nfs {
        let nfs = match &job.borrow().target {
            Target::Nfs { conn, handler: Some(h), .. } => Some((conn.clone(), h.clone())),
            _ => None,
        };
        if let Some((conn, h)) = nfs {
            nfs::Conn::kick(&conn, ring, SNAPSHOT_SOURCE, &h);
        }
    }
}

/// The NFS requests that finished (or the connection's failure).
fn nfs_done(job: &JobRef, ring: &mut Ring, r: Result<Vec<nfs::Done>, nfs::NfsError>) {
    {
        let mut j = job.borrow_mut();
        match r {
            Ok(done) => {
                for (_, res) in done {
                    j.inflight = j.inflight.saturating_sub(1);
                    match res {
                        Ok(b) => {
                            j.ram_bytes += b as u64;
                            j.pass_bytes += b as u64;
                        }
                        Err(e) => j.fail(e.into()),
                    }
                }
            }
            Err(e) => j.fail(e.into()),
        }
    }
    pump(job, ring);
}

/// Queues writes while there is room; `queued_nfs` tells the caller to
/// send what was queued on an NFS connection.
fn fill(job: &JobRef, ring: &mut Ring, queued_nfs: &mut bool) {
    loop {
        let mut j = job.borrow_mut();
        if j.failed || j.shared.cancel.load(Ordering::Relaxed) {
            if !j.failed {
                j.fail(SaveError::Cancelled);
            }
            // No waiting for what is in flight: a stalled target (a hung
            // NFS server, a stuck FUSE filesystem) must not hold the
            // failure or a cancel up. No completion record gets written, so
            // whatever still lands later leaves an unloadable file.
            match &j.target {
                Target::Nfs { conn, .. } => nfs::Conn::close(conn, ring),
                Target::File { .. } => ring.cancel_source(SNAPSHOT_SOURCE),
            }
            j.inflight = 0;
            drop(j);
            end(job, ring);
            return;
        }
        if !matches!(j.phase, Phase::Live | Phase::Final) {
            return;
        }
        if j.inflight >= MAX_INFLIGHT {
            return;
        }
        let Some((r, first, count)) = j.next_run() else {
            if j.inflight == 0 {
                drop(j);
                end_of_pass(job, ring);
            }
            return;
        };
        let region = j.p.header.regions[r].clone();
        let base = match j.mem.get_host_address(GuestAddress(region.gpa)) {
            Ok(b) => b,
            Err(e) => {
                j.fail(SaveError::GuestMemory(e.to_string()));
                continue;
            }
        };
        // Zero pages are left out (the file is sparse); the rest is split
        // into runs of non-zero pages, each one write from guest memory.
        let mut k = 0;
        while k < count {
            let p = first + k;
            // SAFETY: p < region pages; the region is mapped for the VM's life.
            let page = unsafe { std::slice::from_raw_parts(base.add((p * PAGE) as usize), PAGE as usize) };
            if !j.p.incremental && is_zero(page) {
                j.set_present(r, p, false);
                j.set_crc(r, p, 0);
                k += 1;
                continue;
            }
            let start = p;
            while k < count {
                let p = first + k;
                // SAFETY: as above.
                let page = unsafe { std::slice::from_raw_parts(base.add((p * PAGE) as usize), PAGE as usize) };
                if !j.p.incremental && is_zero(page) {
                    break;
                }
                j.set_crc(r, p, crc32c::crc32c(page));
                j.set_present(r, p, true);
                k += 1;
            }
            let n = first + k - start;
            // SAFETY: inside the region (start + n <= pages).
            let host = unsafe { base.add((start * PAGE) as usize) };
            let (len, at) = ((n * PAGE) as usize, region.offset + start * PAGE);
            let direct = match &j.target {
                Target::File { direct, punt, .. } => (direct.as_raw_fd(), *punt),
                Target::Nfs { conn, .. } => {
                    // WRITEs of up to the server's wsize; each is one
                    // request in flight. The library copies the bytes into
                    // its request when queueing it.
                    let conn = conn.clone();
                    let max = conn.borrow().nfs.writemax();
                    let mut off = 0;
                    while off < len {
                        let chunk = (len - off).min(max);
                        // SAFETY: guest RAM stays mapped for the VM's life.
                        let r = unsafe { conn.borrow_mut().nfs.pwrite_async(0, host.add(off), chunk, at + off as u64) };
                        if let Err(e) = r {
                            j.fail(e.into());
                            break;
                        }
                        j.inflight += 1;
                        off += chunk;
                    }
                    *queued_nfs = true;
                    continue;
                }
            };
            let (direct, punt) = direct;
            let iov = vec![libc::iovec { iov_base: host.cast(), iov_len: len }];
            let fd = Fd::Raw(direct);
            // SAFETY: guest RAM stays mapped while the job (holding the
            // memory) lives; the kernel only reads it.
            let op = unsafe { Op::writev(fd, iov, at) };
            j.inflight += 1;
            let job2 = job.clone();
            let done = move |ring: &mut Ring, c: ring::Completion| {
                {
                    let mut j = job2.borrow_mut();
                    j.inflight = j.inflight.saturating_sub(1);
                    match c.result {
                        Ok(b) => {
                            j.ram_bytes += b as u64;
                            j.pass_bytes += b as u64;
                        }
                        Err(e) => j.fail(SaveError::io("write")(e)),
                    }
                }
                pump(&job2, ring);
            };
            if punt {
                ring.submit_async(SNAPSHOT_SOURCE, op, done);
            } else {
                ring.submit(SNAPSHOT_SOURCE, op, done);
            }
        }
    }
}

fn end_of_pass(job: &JobRef, ring: &mut Ring) {
    let mut j = job.borrow_mut();
    if let Err(e) = j.check_file() {
        j.fail(e);
        drop(j);
        return pump(job, ring);
    }
    match j.phase {
        Phase::Live => {
            let secs = j.pass_started.elapsed().as_secs_f64().max(1e-6);
            if j.pass_bytes > 0 {
                j.throughput = j.pass_bytes as f64 / secs;
            }
            if let Err(e) = j.harvest() {
                j.fail(e);
                drop(j);
                return pump(job, ring);
            }
            j.pass += 1;
            let (pass, pass_mib) = (j.pass, j.pass_bytes >> 20);
            j.mark(format!("pass {pass} ({pass_mib} MiB)"));
            let pending = j.pending_pages() * PAGE;
            let dirty_rate = pending as f64 / secs;
            let (pass, tp, target, ram) = (j.pass, j.throughput, j.p.downtime_ms, j.ram_bytes);
            let expected_ms = pending as f64 / tp.max(1.0) * 1e3;
            j.shared.update(|s| {
                s.iterations = pass;
                s.remaining = pending;
                s.throughput_mbps = tp / 1e6;
                s.dirty_rate_mbps = dirty_rate / 1e6;
                s.bytes = ram;
            });
            let (written, dirtied) = (j.pass_bytes, pending);
            let (now, mut high) = (j.throttle, j.high_passes);
            let next = j.p.converge.next_throttle(now, &mut high, written, dirtied);
            j.high_passes = high;
            if next != now {
                j.throttle = next;
                log::info!("snapshot pass {pass}: the guest dirtied {} MiB while {} MiB were written; CPU throttle {next}%", dirtied >> 20, written >> 20);
                j.shared.update(|s| s.throttle_pct = next);
                j.events.push(VmEvent::Snapshot(SnapshotStep::Throttle(next)));
            }
            j.dirty_limit(written, dirtied, secs);
            j.events.push(VmEvent::Snapshot(SnapshotStep::Pass));
            let stalled = pass >= MAX_PASSES;
            if expected_ms <= target || stalled {
                if stalled {
                    j.shared.update(|s| s.stalled = true);
                }
                j.phase = Phase::WaitPause;
                j.events.push(VmEvent::Snapshot(SnapshotStep::Pause));
                return;
            }
            j.pass_started = Instant::now();
            j.pass_bytes = 0;
            drop(j);
            pump(job, ring);
        }
        Phase::Final => {
            // The last dirty pages are in the file: the guest may run.
            let mib = j.pass_bytes >> 20;
            j.mark(format!("final pass ({mib} MiB)"));
            if let Some(id) = j.final_timer.take() {
                ring.cancel(id);
            }
            let ram = j.ram_bytes;
            j.shared.update(|s| {
                s.bytes = ram;
                s.remaining = 0;
            });
            j.events.push(VmEvent::Snapshot(SnapshotStep::Resume));
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests;
