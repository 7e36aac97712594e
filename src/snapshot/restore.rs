//! Restore: the incoming loader thread reads every present page straight
//! into guest memory with io_uring (O_DIRECT where possible, many large
//! reads in flight), checking each page's checksum as it lands. It holds no
//! lock anyone else needs; vCPU and machine state are applied afterwards,
//! with the vCPUs parked.
//!
//! A state file on a memory filesystem (tmpfs, ramfs: `/dev/shm`) is
//! already in RAM. There the default ([`RamMode::Auto`]) maps each region
//! of the file over guest RAM, private and copy-on-write (Firecracker's way
//! of restoring from a memory file): no page is copied or allocated until
//! the guest writes it, and the checksums are checked through the mapping
//! by two threads. The file must then stay as it is while the VM runs
//! (truncating it would take the guest's memory away); ringvm's own saves
//! to that path replace the file instead of truncating it.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ring::{Fd, Op, Ring};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::format::{Checked, CrcTables, PAGE};
pub use super::load_error::LoadError;

/// Reads in flight and pages per read. 64 x 2 MiB restored a 7.2 GiB
/// state from this project's virtio disk in a median 2558 ms, against
/// 2977 ms with 32 x 1 MiB and 2760 ms with 32 x 2 MiB (5-7 runs each,
/// page cache dropped).
const MAX_INFLIGHT: usize = 64;
pub(super) const RUN_PAGES: u64 = 512;

pub struct LoadStats {
    pub bytes: u64,
    pub elapsed: Duration,
    pub direct: bool,
    /// Guest RAM is a private mapping of the file ([`RamMode::Map`]).
    pub mapped: bool,
}

/// How the loader brings guest RAM in (`--restore-ram`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum RamMode {
    /// `map` for a file on a memory filesystem (tmpfs, ramfs), `read`
    /// otherwise.
    #[default]
    Auto,
    /// io_uring reads into guest RAM, O_DIRECT where the filesystem takes
    /// it: the file is not needed once the VM runs.
    Read,
    /// Guest RAM becomes a private, copy-on-write mapping of the file: no
    /// copy, pages are allocated only as the guest writes them. The file
    /// must not be truncated or rewritten while the VM runs. Not for
    /// `nfs://`.
    Map,
    /// The guest runs once its vCPU and device state are applied; RAM
    /// comes in behind it through a userfaultfd (see `snapshot::lazy`). A
    /// bad page found after that ends the process. Not for `nfs://`.
    Lazy,
}

/// Plans the reads: runs of present pages.
/// The reads, every page's checksum by region, and each region's gpa.
pub(super) type Plan = (Vec<Run>, CrcTables, Vec<u64>);

pub(super) fn plan(checked: &Checked, mem: &GuestMemoryMmap) -> Result<Plan, LoadError> {
    // A single file owns every page it holds: the chain rule for one file.
    let own = super::chain::owned_pages(&[checked]).pop().unwrap_or_default();
    plan_bits(checked, mem, &own)
}

/// For each file of an incremental chain (newest first), the plan of the
/// pages it is the newest to hold.
pub(super) fn plan_chain(chain: &[(PathBuf, &Checked)], mem: &GuestMemoryMmap) -> Result<Vec<Plan>, LoadError> {
    let files: Vec<&Checked> = chain.iter().map(|(_, c)| *c).collect();
    let owned = super::chain::owned_pages(&files);
    chain.iter().zip(&owned).map(|((_, c), own)| plan_bits(c, mem, own)).collect()
}

/// Opens a state file for loading: O_DIRECT where the filesystem takes it
/// (true), else buffered.
pub(super) fn open_for_loading(path: &Path) -> std::io::Result<(File, bool)> {
    match OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path) {
        Ok(f) => Ok((f, true)),
        Err(_) => OpenOptions::new().read(true).open(path).map(|f| (f, false)),
    }
}

/// [`plan`] for the pages set in `own` (per region, one bit per page in
/// 64-bit words, as the file's bitmaps are laid out).
fn plan_bits(checked: &Checked, mem: &GuestMemoryMmap, own: &[Vec<u64>]) -> Result<Plan, LoadError> {
    // Runs of pages: (file offset, host address, pages, region, first page).
    let mut runs = Vec::new();
    for (ri, r) in checked.header.regions.iter().enumerate() {
        let base = mem.get_host_address(GuestAddress(r.gpa)).map_err(|e| LoadError::GuestMemory { gpa: r.gpa, reason: e.to_string() })? as usize;
        let words = own.get(ri).map(Vec::as_slice).unwrap_or_default();
        let take = |p: u64| words.get((p / 64) as usize).is_some_and(|w| w & (1 << (p % 64)) != 0);
        let mut p = 0;
        while p < r.pages() {
            // Whole words of pages not taken are skipped at once.
            if p % 64 == 0 && words.get((p / 64) as usize).is_none_or(|w| *w == 0) {
                p += 64;
                continue;
            }
            if !take(p) {
                p += 1;
                continue;
            }
            let start = p;
            while p < r.pages() && p - start < RUN_PAGES && take(p) {
                p += 1;
            }
            runs.push((r.offset + start * PAGE, base + (start * PAGE) as usize, p - start, ri, start));
        }
    }
    let gpas: Vec<u64> = checked.header.regions.iter().map(|r| r.gpa).collect();
    Ok((runs, checked.crcs.clone(), gpas))
}

/// Bulk work yields to the control thread (QMP keeps answering while RAM
/// loads): nice 10 for the calling thread.
fn background_priority() {
    // SAFETY: gettid/setpriority on the calling thread only.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 10);
    }
}

/// Bytes to load (present pages) of a checked file.
pub fn present_bytes(checked: &Checked) -> u64 {
    chain_present_bytes(&[checked])
}

/// Bytes a chain restore reads: every page from the newest file that has it.
pub fn chain_present_bytes(chain: &[&Checked]) -> u64 {
    let owned = super::chain::owned_pages(chain);
    owned.iter().flatten().flatten().map(|w| u64::from(w.count_ones())).sum::<u64>() * PAGE
}

/// Restores an incremental chain (newest first): every page is read once,
/// from the newest file that has it (checked against that file's
/// checksum), every file by its own io_uring loader thread, all at once.
/// Pages in no file stay zero.
pub fn spawn_chain_loader(
    chain: &[(PathBuf, &Checked)],
    mem: &GuestMemoryMmap,
    progress: Arc<AtomicU64>,
    done: impl FnOnce(Result<LoadStats, LoadError>) + Send + 'static,
) -> Result<(), LoadError> {
    let mut plans = Vec::new();
    for ((path, _), (runs, crcs, gpas)) in chain.iter().zip(plan_chain(chain, mem)?) {
        if !runs.is_empty() {
            plans.push((path.clone(), runs, crcs, gpas));
        }
    }
    // One thread faults in every file's destination pages: without it
    // the loaders fault them in from their reads, and loaders whose pages
    // share a 2 MiB huge page race to fault it, each zeroing a huge page
    // of which all but one are thrown away.
    prefault(plans.iter().flat_map(|p| p.1.iter()));
    std::thread::Builder::new()
        .name("ringvm-chain".into())
        .spawn(move || {
            // This thread only starts the loaders and waits for them (it
            // keeps its parent's filter: a loader's forbids new threads).
            let t0 = Instant::now();
            let mut total = LoadStats { bytes: 0, elapsed: Default::default(), direct: true, mapped: false };
            // The files' pages are disjoint: their loaders run at once, each
            // with its own ring, so a chain reads about as fast as one file.
            let mut first_err = None;
            std::thread::scope(|sc| {
                let handles: Vec<_> = plans
                    .into_iter()
                    .enumerate()
                    .map(|(i, (path, runs, crcs, gpas))| {
                        let progress = &progress;
                        std::thread::Builder::new().name(format!("ringvm-loader{i}")).spawn_scoped(sc, move || {
                            crate::seccomp::apply_or_exit(crate::seccomp::Role::Loader);
                            background_priority();
                            loader(&path, runs, crcs, gpas, progress).map_err(|e| LoadError::InFile { file: path.display().to_string(), source: Box::new(e) })
                        })
                    })
                    .collect();
                for h in handles {
                    let r = match h {
                        Ok(h) => h.join().unwrap_or(Err(LoadError::Panicked)),
                        Err(e) => Err(LoadError::thread("loader")(e)),
                    };
                    match r {
                        Ok(s) => {
                            total.bytes += s.bytes;
                            total.direct &= s.direct;
                        }
                        Err(e) => {
                            first_err.get_or_insert(e);
                        }
                    }
                }
            });
            if let Some(e) = first_err {
                return done(Err(e));
            }
            total.elapsed = t0.elapsed();
            done(Ok(total))
        })
        .map(|_| ())
        .map_err(LoadError::thread("loader"))
}

/// Starts the named loader thread; `done` runs on it with the result. The
/// VM's vCPUs must be parked and stay parked until then. `progress` counts
/// bytes loaded.
pub fn spawn_loader(
    path: &Path,
    checked: &Checked,
    mem: &GuestMemoryMmap,
    mode: RamMode,
    progress: Arc<AtomicU64>,
    done: impl FnOnce(Result<LoadStats, LoadError>) + Send + 'static,
) -> Result<(), LoadError> {
    if mode == RamMode::Lazy {
        return Err(LoadError::Unsupported("a lazy restore starts with snapshot::lazy::spawn"));
    }
    let (runs, crcs, gpas) = plan(checked, mem)?;
    let nfs = path.to_str().is_some_and(crate::nfs::is_uri);
    if mode == RamMode::Map && nfs {
        return Err(LoadError::Unsupported("--restore-ram map needs a local file, not nfs://"));
    }
    if !nfs && mode != RamMode::Read {
        let file = super::format::open_regular(path)?;
        if mode == RamMode::Map || super::fsprobe::on_memory_fs(&file) {
            return spawn_mapped(path, file, checked, mem, runs, crcs, gpas, progress, done);
        }
    }
    prefault(runs.iter());
    let path: PathBuf = path.to_path_buf();
    std::thread::Builder::new()
        .name("ringvm-loader".into())
        .spawn(move || {
            crate::seccomp::apply_or_exit(crate::seccomp::Role::Loader);
            background_priority();
            done(loader(&path, runs, crcs, gpas, &progress))
        })
        .map(|_| ())
        .map_err(LoadError::thread("loader"))
}

/// Faults the destination pages of `runs` in ahead of the reads (see
/// [`super::pages::prefault`]).
fn prefault<'a>(runs: impl Iterator<Item = &'a Run>) {
    super::pages::prefault(runs.map(|r| (r.1, (r.2 * PAGE) as usize)).collect(), background_priority);
}

/// (file offset, host address, pages, region, first page).
pub(super) type Run = (u64, usize, u64, usize, u64);

/// Checks every page of a run that is in guest RAM against its checksum.
fn verify(run: &Run, crcs: &CrcTables, gpas: &[u64]) -> Result<(), LoadError> {
    let &(_, host, pages, ri, first) = run;
    for k in 0..pages {
        // SAFETY: guest RAM inside the run, which nothing writes while the
        // load is in progress (vCPUs parked).
        let page = unsafe { std::slice::from_raw_parts((host + (k * PAGE) as usize) as *const u8, PAGE as usize) };
        if crc32c::crc32c(page) != crcs.get(ri, first + k) {
            return Err(LoadError::Checksum(gpas[ri] + (first + k) * PAGE));
        }
    }
    Ok(())
}

/// Threads that check a mapped file's checksums.
const MAP_VERIFIERS: usize = 2;
/// Runs a verifier takes at a time (16 MiB of dense RAM).
const MAP_CHUNK: usize = 16;

/// Maps every region of `file` over guest RAM (private, copy-on-write),
/// then checks every present page's checksum on [`MAP_VERIFIERS`] threads;
/// the last one to finish calls `done`. Absent pages must read as zero:
/// a page the file still holds data for (written by an earlier pass,
/// then zero) is cleared in guest RAM.
#[allow(clippy::too_many_arguments)]
fn spawn_mapped(
    path: &Path,
    file: File,
    checked: &Checked,
    mem: &GuestMemoryMmap,
    runs: Vec<Run>,
    crcs: CrcTables,
    gpas: Vec<u64>,
    progress: Arc<AtomicU64>,
    done: impl FnOnce(Result<LoadStats, LoadError>) + Send + 'static,
) -> Result<(), LoadError> {
    let t0 = Instant::now();
    let spans: Vec<(u64, u64, u64)> = checked.header.regions.iter().map(|r| (r.gpa, r.pages() * PAGE, r.offset)).collect();
    let mapped = map_regions(&file, &spans, mem)?;
    // From here a shrinking file is a one-line error, not a bare SIGBUS.
    let need = spans.iter().map(|&(_, size, off)| off + size).max().unwrap_or(0);
    if let Err(e) = super::mapguard::guard(path, &file, need, &mapped) {
        log::warn!("state file {}: cannot watch for it shrinking under guest RAM: {e}", path.display());
    }
    let regions: Vec<(u64, u64, u64, Vec<bool>)> = checked
        .header
        .regions
        .iter()
        .enumerate()
        .map(|(ri, r)| (r.gpa, r.offset, r.pages(), (0..r.pages()).map(|p| checked.present(ri, p)).collect()))
        .collect();
    type Done = Box<dyn FnOnce(Result<LoadStats, LoadError>) + Send>;
    struct Shared {
        runs: Vec<Run>,
        crcs: CrcTables,
        gpas: Vec<u64>,
        next: AtomicUsize,
        stop: AtomicBool,
        err: Mutex<Option<LoadError>>,
        left: AtomicUsize,
        done: Mutex<Option<Done>>,
    }
    let sh = Arc::new(Shared {
        runs,
        crcs,
        gpas,
        next: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        err: Mutex::new(None),
        left: AtomicUsize::new(MAP_VERIFIERS),
        done: Mutex::new(Some(Box::new(done))),
    });
    let fail = |sh: &Shared, e: LoadError| {
        sh.stop.store(true, Ordering::Relaxed);
        if let Ok(mut g) = sh.err.lock() {
            g.get_or_insert(e);
        }
    };
    let mem = mem.clone();
    for k in 0..MAP_VERIFIERS {
        let (sh, progress, mem, file) = (sh.clone(), progress.clone(), mem.clone(), file.try_clone().map_err(LoadError::io("dup of the state file"))?);
        let regions = if k == 0 { regions.clone() } else { Vec::new() };
        let name = if k == 0 { "ringvm-loader".to_string() } else { format!("ringvm-verify{k}") };
        std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                crate::seccomp::apply_or_exit(crate::seccomp::Role::Loader);
                background_priority();
                if let Err(e) = clear_stale(&file, &mem, &regions) {
                    fail(&sh, e);
                }
                while !sh.stop.load(Ordering::Relaxed) {
                    let i = sh.next.fetch_add(MAP_CHUNK, Ordering::Relaxed);
                    if i >= sh.runs.len() {
                        break;
                    }
                    for run in &sh.runs[i..(i + MAP_CHUNK).min(sh.runs.len())] {
                        if let Err(e) = verify(run, &sh.crcs, &sh.gpas) {
                            fail(&sh, e);
                            break;
                        }
                        progress.fetch_add(run.2 * PAGE, Ordering::Relaxed);
                    }
                }
                if sh.left.fetch_sub(1, Ordering::AcqRel) == 1 {
                    let r = match sh.err.lock().ok().and_then(|mut g| g.take()) {
                        Some(e) => Err(e),
                        None => Ok(LoadStats { bytes: progress.load(Ordering::Relaxed), elapsed: t0.elapsed(), direct: false, mapped: true }),
                    };
                    if let Some(done) = sh.done.lock().ok().and_then(|mut g| g.take()) {
                        done(r);
                    }
                }
            })
            .map_err(LoadError::thread("loader"))?;
    }
    Ok(())
}

/// Maps each region of the file at its place in guest RAM. On failure the
/// regions get fresh anonymous memory back (the load has failed; the VM
/// will not run).
/// `regions`: (gpa, bytes, file offset) each.
/// Returns the host ranges (address, bytes) now backed by the file.
fn map_regions(file: &File, regions: &[(u64, u64, u64)], mem: &GuestMemoryMmap) -> Result<Vec<(usize, usize)>, LoadError> {
    let len = file.metadata().map_err(LoadError::io("stat"))?.len();
    let mut spans = Vec::new();
    for &(gpa, size, offset) in regions {
        let end = offset.saturating_add(size);
        if offset % PAGE != 0 || size % PAGE != 0 || end > len {
            return Err(LoadError::RegionOutsideFile { gpa, offset, end, len });
        }
        // One host mapping must hold the whole region.
        let slice = mem.get_slice(GuestAddress(gpa), size as usize).map_err(|e| LoadError::GuestMemory { gpa, reason: e.to_string() })?;
        spans.push((slice.ptr_guard_mut().as_ptr() as usize, size as usize, offset));
    }
    for (i, &(host, size, off)) in spans.iter().enumerate() {
        // SAFETY: `host..host+size` is guest RAM owned by `mem` (within one
        // of its regions, checked above) of a VM whose vCPUs are parked and
        // whose devices have nothing in flight (the guest has not run).
        // MAP_FIXED swaps the pages under the same addresses, so every
        // pointer and KVM memory slot into them stays valid.
        let p = unsafe {
            libc::mmap(
                host as *mut libc::c_void,
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                off as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            for &(h, s, _) in &spans[..=i] {
                // SAFETY: as above; anonymous zero memory again.
                unsafe {
                    libc::mmap(
                        h as *mut libc::c_void,
                        s,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                        -1,
                        0,
                    )
                };
            }
            return Err(LoadError::io(format!("mmap of the RAM region at gpa {:#x}", regions[i].0))(e));
        }
    }
    Ok(spans.iter().map(|&(h, s, _)| (h, s)).collect())
}

/// Absent pages read as zero. The file has holes there, except where a
/// page was written by one pass and found zero by a later one: those are
/// cleared in guest RAM (a private copy). Only the file's data extents
/// (SEEK_DATA) are looked at, so holes are never faulted in.
fn clear_stale(file: &File, mem: &GuestMemoryMmap, regions: &[(u64, u64, u64, Vec<bool>)]) -> Result<(), LoadError> {
    let fd = file.as_raw_fd();
    let zero = [0u8; PAGE as usize];
    for (gpa, offset, pages, present) in regions {
        let end = offset + pages * PAGE;
        let mut at = *offset;
        while at < end {
            // SAFETY: lseek on an fd we own.
            let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
            if data < 0 || data as u64 >= end {
                break; // ENXIO: no data past `at`
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            let hole = if hole < 0 { end } else { (hole as u64).min(end) };
            let (first, last) = ((data as u64 - offset) / PAGE, (hole - offset).div_ceil(PAGE));
            for p in first..last {
                if present[p as usize] {
                    continue;
                }
                let addr = GuestAddress(gpa + p * PAGE);
                let slice = mem.get_slice(addr, PAGE as usize).map_err(|e| LoadError::GuestMemory { gpa: addr.0, reason: e.to_string() })?;
                // SAFETY: one page of guest RAM (vCPUs parked), only read.
                let page = unsafe { std::slice::from_raw_parts(slice.ptr_guard().as_ptr(), PAGE as usize) };
                if !super::pages::is_zero(page) {
                    mem.write_slice(&zero, addr).map_err(|e| LoadError::GuestMemory { gpa: addr.0, reason: e.to_string() })?;
                }
            }
            at = hole.max(at + PAGE);
        }
    }
    Ok(())
}

/// A loader's progress over its list of reads (files and NFS alike).
#[derive(Default)]
struct Loads {
    next: usize,
    inflight: usize,
    bytes: u64,
    /// The first error; no new reads once set.
    err: Option<LoadError>,
}

impl Loads {
    /// Index of the next read to issue, if there is room and no error.
    fn take_next(&mut self, total: usize) -> Option<usize> {
        if self.err.is_some() || self.next >= total || self.inflight >= MAX_INFLIGHT {
            return None;
        }
        self.next += 1;
        self.inflight += 1;
        Some(self.next - 1)
    }

    /// A read came back: checked by [`landed`] into `bytes` or `err`.
    fn finish(&mut self, run: &Run, r: Result<usize, LoadError>, crcs: &CrcTables, gpas: &[u64]) {
        self.inflight = self.inflight.saturating_sub(1);
        match landed(run, r, crcs, gpas) {
            Ok(()) => self.bytes += run.2 * PAGE,
            Err(e) => self.fail(e),
        }
    }

    fn fail(&mut self, e: LoadError) {
        self.err.get_or_insert(e);
    }

    fn stats(&self, t0: Instant, direct: bool) -> Result<LoadStats, LoadError> {
        match &self.err {
            Some(e) => Err(e.clone()),
            None => Ok(LoadStats { bytes: self.bytes, elapsed: t0.elapsed(), direct, mapped: false }),
        }
    }
}

/// Checks a run that was read: whole, and every page's checksum.
fn landed(run: &Run, r: Result<usize, LoadError>, crcs: &CrcTables, gpas: &[u64]) -> Result<(), LoadError> {
    let &(off, _, pages, _, _) = run;
    let len = (pages * PAGE) as usize;
    match r {
        Ok(n) if n == len => {}
        Ok(n) => return Err(LoadError::ShortRead { offset: off, got: n, want: len }),
        Err(e) => return Err(e),
    }
    verify(run, crcs, gpas)
}

/// Loads from `nfs://`: many READs in flight on one connection, driven by
/// this thread's ring; each reply is copied into guest memory as it lands.
fn nfs_loader(uri: &str, runs: Vec<Run>, crcs: CrcTables, gpas: Vec<u64>, progress: &AtomicU64) -> Result<LoadStats, LoadError> {
    let t0 = Instant::now();
    let n = crate::nfs::Nfs::open(uri, false)?;
    // One READ per run, no larger than the server's rsize.
    let max_pages = (n.readmax() as u64 / PAGE).max(1);
    let mut reads = Vec::new();
    for &(off, host, pages, ri, first) in &runs {
        let mut k = 0;
        while k < pages {
            let c = (pages - k).min(max_pages);
            reads.push((off + k * PAGE, host + (k * PAGE) as usize, c, ri, first + k));
            k += c;
        }
    }
    log::info!("{uri}: {} READs of up to {} KiB", reads.len(), max_pages * PAGE / 1024);
    let conn = crate::nfs::Conn::new(n);
    let mut ring = Ring::new(64, None).map_err(LoadError::ring)?;
    let st = Rc::new(RefCell::new(Loads::default()));
    let reads = Rc::new(reads);
    let issue = {
        let (st, reads, conn) = (st.clone(), reads.clone(), conn.clone());
        move || loop {
            let mut s = st.borrow_mut();
            let Some(i) = s.take_next(reads.len()) else { return };
            let (off, host, pages, _, _) = reads[i];
            // SAFETY: guest RAM of a VM whose vCPUs are parked; nothing
            // else touches the run until its reply is copied in.
            let r = unsafe { conn.borrow_mut().nfs.pread_async(i as u64, host as *mut u8, (pages * PAGE) as usize, off) };
            if let Err(e) = r {
                s.inflight -= 1;
                s.fail(e.into());
            }
        }
    };
    let handler: crate::nfs::Handler = {
        let (st, reads) = (st.clone(), reads.clone());
        Rc::new(move |_: &mut Ring, r: Result<Vec<crate::nfs::Done>, crate::nfs::NfsError>| {
            let mut s = st.borrow_mut();
            match r {
                Ok(done) => {
                    for (i, res) in done {
                        let off = reads[i as usize].0;
                        s.finish(&reads[i as usize], res.map_err(|source| LoadError::NfsRead { offset: off, source }), &crcs, &gpas);
                    }
                }
                Err(e) => s.fail(e.into()),
            }
        })
    };
    loop {
        issue();
        {
            let s = st.borrow();
            if s.err.is_some() || (s.inflight == 0 && s.next >= reads.len()) {
                break;
            }
        }
        crate::nfs::Conn::kick(&conn, &mut ring, ring::SourceId::fixed(1), &handler);
        ring.run_once(true).map_err(LoadError::ring)?;
        progress.store(st.borrow().bytes, Ordering::Relaxed);
    }
    crate::nfs::Conn::close(&conn, &mut ring);
    ring.run_until(Duration::from_secs(1), |r| r.in_flight() == 0).ok();
    let stats = st.borrow().stats(t0, false);
    stats
}

fn loader(path: &Path, runs: Vec<Run>, crcs: CrcTables, gpas: Vec<u64>, progress: &AtomicU64) -> Result<LoadStats, LoadError> {
    if let Some(uri) = path.to_str().filter(|p| crate::nfs::is_uri(p)) {
        return nfs_loader(uri, runs, crcs, gpas, progress);
    }
    let t0 = Instant::now();
    let (file, direct) = open_for_loading(path).map_err(LoadError::io("open"))?;
    let mut ring = Ring::new(64, None).map_err(LoadError::ring)?;
    let fd = ring.register_fd(file.as_raw_fd()).unwrap_or(Fd::Raw(file.as_raw_fd()));
    let st = Rc::new(RefCell::new(Loads::default()));
    let runs = Rc::new(runs);
    let crcs = Rc::new(crcs);
    let gpas = Rc::new(gpas);
    // FUSE and network filesystems: each read on its own io-wq worker (see
    // fsprobe::blocks_inline), or they run one at a time.
    let punt = super::fsprobe::blocks_inline(&file);
    fn issue(ring: &mut Ring, st: &Rc<RefCell<Loads>>, runs: &Rc<Vec<Run>>, crcs: &Rc<CrcTables>, gpas: &Rc<Vec<u64>>, fd: Fd, punt: bool) {
        loop {
            let Some(i) = st.borrow_mut().take_next(runs.len()) else { return };
            let (off, host, pages, _, _) = runs[i];
            let len = (pages * PAGE) as usize;
            let iov = vec![libc::iovec { iov_base: host as *mut libc::c_void, iov_len: len }];
            // SAFETY: `host..host+len` is guest RAM of a VM whose vCPUs are
            // parked; nothing else touches it until the load is done.
            let op = unsafe { Op::readv(fd, iov, off) };
            let (st2, runs2, crcs2, gpas2) = (st.clone(), runs.clone(), crcs.clone(), gpas.clone());
            let done = move |ring: &mut Ring, c: ring::Completion| {
                st2.borrow_mut().finish(&runs2[i], c.result.map_err(LoadError::io(format!("read at file offset {:#x}", runs2[i].0))), &crcs2, &gpas2);
                issue(ring, &st2, &runs2, &crcs2, &gpas2, fd, punt);
            };
            if punt {
                ring.submit_async(ring::SourceId::fixed(1), op, done);
            } else {
                ring.submit(ring::SourceId::fixed(1), op, done);
            }
        }
    }
    issue(&mut ring, &st, &runs, &crcs, &gpas, fd, punt);
    while ring.in_flight() > 0 {
        ring.run_once(true).map_err(LoadError::ring)?;
        progress.store(st.borrow().bytes, Ordering::Relaxed);
    }
    let stats = st.borrow().stats(t0, direct);
    stats
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::{clear_stale, map_regions, PAGE};

    /// A file mapped over guest RAM: present pages show the file's bytes,
    /// holes and stale absent pages read as zero, and guest writes stay
    /// private (the file is unchanged).
    #[test]
    fn mapped_regions_read_the_file_and_clear_stale_pages() {
        let dir = std::env::temp_dir().join(format!("ringvm-map-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ram.state");
        let pages = 64u64;
        let off = 2 * PAGE; // a header page ahead of the region, as in the format
        let mut f = std::fs::File::create(&path).unwrap();
        f.set_len(off + pages * PAGE).unwrap();
        // Pages 3 and 10 carry data and are present; page 20 carries stale
        // data but is absent; the rest are holes.
        for (p, b) in [(3u64, 0xa5u8), (10, 0x5a), (20, 0x77)] {
            std::os::unix::fs::FileExt::write_all_at(&f, &vec![b; PAGE as usize], off + p * PAGE).unwrap();
        }
        f.flush().unwrap();
        let f = std::fs::File::open(&path).unwrap();
        let gpa = 0x10_0000u64;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(gpa), (pages * PAGE) as usize)]).unwrap();
        mem.write_slice(&[0xee; 16], GuestAddress(gpa + 5 * PAGE)).unwrap(); // replaced by the mapping
        map_regions(&f, &[(gpa, pages * PAGE, off)], &mem).unwrap();
        let present: Vec<bool> = (0..pages).map(|p| p == 3 || p == 10).collect();
        clear_stale(&f, &mem, &[(gpa, off, pages, present)]).unwrap();
        let page = |p: u64| {
            let mut v = vec![0u8; PAGE as usize];
            mem.read_slice(&mut v, GuestAddress(gpa + p * PAGE)).unwrap();
            v
        };
        assert!(page(3).iter().all(|&b| b == 0xa5));
        assert!(page(10).iter().all(|&b| b == 0x5a));
        for p in [0, 5, 20, 63] {
            assert!(page(p).iter().all(|&b| b == 0), "page {p}");
        }
        // Copy-on-write: the guest's writes never reach the file.
        mem.write_slice(&[1, 2, 3], GuestAddress(gpa + 3 * PAGE)).unwrap();
        assert_eq!(&page(3)[..4], &[1, 2, 3, 0xa5]);
        let mut b = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, off + 3 * PAGE).unwrap();
        assert_eq!(b, [0xa5; 4]);
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, off + 20 * PAGE).unwrap();
        assert_eq!(b, [0x77; 4]);
        // A region reaching past the end of the file is refused.
        let e = map_regions(&f, &[(gpa, pages * PAGE, off + PAGE)], &mem).unwrap_err();
        assert!(matches!(e, super::LoadError::RegionOutsideFile { .. }), "{e}");
        assert!(e.to_string().contains("truncated"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
