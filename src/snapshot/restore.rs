//! Restore: the incoming loader thread reads every present page straight
//! into guest memory with io_uring (O_DIRECT where possible, many large
//! reads in flight), checking each page's checksum as it lands. It holds no
//! lock anyone else needs; vCPU and machine state are applied afterwards,
//! with the vCPUs parked.

use std::cell::RefCell;
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use ring::{Fd, Op, Ring};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::format::{Checked, PAGE};

const MAX_INFLIGHT: usize = 32;
const RUN_PAGES: u64 = 256;

pub struct LoadStats {
    pub bytes: u64,
    pub elapsed: Duration,
    pub direct: bool,
}

/// Plans the reads: runs of present pages.
fn plan(checked: &Checked, mem: &GuestMemoryMmap) -> Result<(Vec<Run>, Vec<Vec<u32>>, Vec<u64>), String> {
    // Runs of present pages: (file offset, host address, pages, region, first page).
    let mut runs = Vec::new();
    for (ri, r) in checked.header.regions.iter().enumerate() {
        let base = mem.get_host_address(GuestAddress(r.gpa)).map_err(|e| format!("guest memory at {:#x}: {e}", r.gpa))? as usize;
        let mut p = 0;
        while p < r.pages() {
            if !checked.present(ri, p) {
                p += 1;
                continue;
            }
            let start = p;
            while p < r.pages() && p - start < RUN_PAGES && checked.present(ri, p) {
                p += 1;
            }
            runs.push((r.offset + start * PAGE, base + (start * PAGE) as usize, p - start, ri, start));
        }
    }
    let crcs: Vec<Vec<u32>> = checked
        .header
        .regions
        .iter()
        .enumerate()
        .map(|(ri, r)| (0..r.pages()).map(|p| checked.crc(ri, p)).collect())
        .collect();
    let gpas: Vec<u64> = checked.header.regions.iter().map(|r| r.gpa).collect();
    Ok((runs, crcs, gpas))
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
    let mut n = 0;
    for (ri, r) in checked.header.regions.iter().enumerate() {
        n += (0..r.pages()).filter(|&p| checked.present(ri, p)).count() as u64 * PAGE;
    }
    n
}

/// Starts the named loader thread; `done` runs on it with the result. The
/// VM's vCPUs must be parked and stay parked until then. `progress` counts
/// bytes loaded.
pub fn spawn_loader(
    path: &Path,
    checked: &Checked,
    mem: &GuestMemoryMmap,
    progress: std::sync::Arc<std::sync::atomic::AtomicU64>,
    done: impl FnOnce(Result<LoadStats, String>) + Send + 'static,
) -> Result<(), String> {
    let (runs, crcs, gpas) = plan(checked, mem)?;
    // Fault the destination pages in on a second thread, ahead of the
    // reads: a page the loader already filled is left as it is, so this
    // only moves the cost of first touch off the I/O path.
    let prefault: Vec<(usize, usize)> = runs.iter().map(|r| (r.1, (r.2 * PAGE) as usize)).collect();
    let _ = std::thread::Builder::new().name("ringvm-prefault".into()).spawn(move || {
        crate::seccomp::apply_or_exit(crate::seccomp::Role::Helper);
        background_priority();
        for (addr, len) in prefault {
            // SAFETY: advice on guest RAM we own; MADV_POPULATE_WRITE only
            // faults pages in and never changes their contents.
            if unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_POPULATE_WRITE) } != 0 {
                return; // an older kernel: the reads fault the pages in
            }
        }
    });
    let path: PathBuf = path.to_path_buf();
    std::thread::Builder::new()
        .name("ringvm-loader".into())
        .spawn(move || {
            crate::seccomp::apply_or_exit(crate::seccomp::Role::Loader);
            background_priority();
            done(loader(&path, runs, crcs, gpas, &progress))
        })
        .map(|_| ())
        .map_err(|e| format!("cannot start the loader thread: {e}"))
}

type Run = (u64, usize, u64, usize, u64);

/// A loader's progress over its list of reads (files and NFS alike).
#[derive(Default)]
struct Loads {
    next: usize,
    inflight: usize,
    bytes: u64,
    /// The first error; no new reads once set.
    err: Option<String>,
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
    fn finish(&mut self, run: &Run, r: Result<usize, String>, crcs: &[Vec<u32>], gpas: &[u64]) {
        self.inflight = self.inflight.saturating_sub(1);
        match landed(run, r, crcs, gpas) {
            Ok(()) => self.bytes += run.2 * PAGE,
            Err(e) => self.fail(e),
        }
    }

    fn fail(&mut self, e: String) {
        self.err.get_or_insert(e);
    }

    fn stats(&self, t0: Instant, direct: bool) -> Result<LoadStats, String> {
        match &self.err {
            Some(e) => Err(e.clone()),
            None => Ok(LoadStats { bytes: self.bytes, elapsed: t0.elapsed(), direct }),
        }
    }
}

/// Checks a run that was read: whole, and every page's checksum.
fn landed(run: &Run, r: Result<usize, String>, crcs: &[Vec<u32>], gpas: &[u64]) -> Result<(), String> {
    let &(off, host, pages, ri, first) = run;
    let len = (pages * PAGE) as usize;
    match r {
        Ok(n) if n == len => {}
        Ok(n) => return Err(format!("short read at file offset {off:#x} ({n} of {len} bytes): the file is truncated")),
        Err(e) => return Err(format!("read at file offset {off:#x}: {e}")),
    }
    for k in 0..pages {
        // SAFETY: inside the run just read, which nothing else touches.
        let page = unsafe { std::slice::from_raw_parts((host + (k * PAGE) as usize) as *const u8, PAGE as usize) };
        if crc32c::crc32c(page) != crcs[ri][(first + k) as usize] {
            return Err(format!("page at gpa {:#x} fails its checksum", gpas[ri] + (first + k) * PAGE));
        }
    }
    Ok(())
}

/// Loads from `nfs://`: many READs in flight on one connection, driven by
/// this thread's ring; each reply is copied into guest memory as it lands.
fn nfs_loader(uri: &str, runs: Vec<Run>, crcs: Vec<Vec<u32>>, gpas: Vec<u64>, progress: &std::sync::atomic::AtomicU64) -> Result<LoadStats, String> {
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
    let mut ring = Ring::new(64, None).map_err(|e| e.to_string())?;
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
                s.fail(e);
            }
        }
    };
    let handler: crate::nfs::Handler = {
        let (st, reads) = (st.clone(), reads.clone());
        Rc::new(move |_: &mut Ring, r: Result<Vec<crate::nfs::Done>, String>| {
            let mut s = st.borrow_mut();
            match r {
                Ok(done) => {
                    for (i, res) in done {
                        s.finish(&reads[i as usize], res, &crcs, &gpas);
                    }
                }
                Err(e) => s.fail(e),
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
        crate::nfs::Conn::kick(&conn, &mut ring, 1, &handler);
        ring.run_once(true).map_err(|e| e.to_string())?;
        progress.store(st.borrow().bytes, std::sync::atomic::Ordering::Relaxed);
    }
    crate::nfs::Conn::close(&conn, &mut ring);
    ring.run_until(Duration::from_secs(1), |r| r.in_flight() == 0).ok();
    let stats = st.borrow().stats(t0, false);
    stats
}

fn loader(path: &Path, runs: Vec<Run>, crcs: Vec<Vec<u32>>, gpas: Vec<u64>, progress: &std::sync::atomic::AtomicU64) -> Result<LoadStats, String> {
    if let Some(uri) = path.to_str().filter(|p| crate::nfs::is_uri(p)) {
        return nfs_loader(uri, runs, crcs, gpas, progress);
    }
    let t0 = Instant::now();
    let (file, direct) = match OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path) {
        Ok(f) => (f, true),
        Err(_) => (OpenOptions::new().read(true).open(path).map_err(|e| e.to_string())?, false),
    };
    let mut ring = Ring::new(64, None).map_err(|e| e.to_string())?;
    let fd = ring.register_fd(file.as_raw_fd()).unwrap_or(Fd::Raw(file.as_raw_fd()));
    let st = Rc::new(RefCell::new(Loads::default()));
    let runs = Rc::new(runs);
    let crcs = Rc::new(crcs);
    let gpas = Rc::new(gpas);
    // FUSE and network filesystems: each read on its own io-wq worker (see
    // save::blocks_inline), or they run one at a time.
    let punt = super::save::blocks_inline(&file);
    fn issue(ring: &mut Ring, st: &Rc<RefCell<Loads>>, runs: &Rc<Vec<Run>>, crcs: &Rc<Vec<Vec<u32>>>, gpas: &Rc<Vec<u64>>, fd: Fd, punt: bool) {
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
                st2.borrow_mut().finish(&runs2[i], c.result.map_err(|e| e.to_string()), &crcs2, &gpas2);
                issue(ring, &st2, &runs2, &crcs2, &gpas2, fd, punt);
            };
            if punt {
                ring.submit_async(1, op, done);
            } else {
                ring.submit(1, op, done);
            }
        }
    }
    issue(&mut ring, &st, &runs, &crcs, &gpas, fd, punt);
    while ring.in_flight() > 0 {
        ring.run_once(true).map_err(|e| e.to_string())?;
        progress.store(st.borrow().bytes, std::sync::atomic::Ordering::Relaxed);
    }
    let stats = st.borrow().stats(t0, direct);
    stats
}
