//! Lazy restore (`--restore-ram lazy`, or `--loadstate FILE,lazy=on`): the
//! guest runs before its RAM is in. Guest RAM is registered with a
//! userfaultfd; the fault thread (`ringvm-uffd`) owns it and one io_uring.
//! A guest (or device, or KVM) access to a page not yet in faults; the
//! thread reads that page's run from the file (ahead of everything else),
//! checks every page's crc32c and places the run with `UFFDIO_COPY`, which
//! wakes the faulting thread. Absent (zero) pages get `UFFDIO_ZEROPAGE`.
//! Meanwhile the thread streams every other run in file order, with up to
//! [`BACKGROUND`] reads in flight and [`RESERVED`] buffers kept for faults.
//! When all runs are in, the range is unregistered and `streamed` reports.
//!
//! Who waits on whom: vCPUs, iothreads (their I/O into guest RAM) and the
//! control thread (device state that reads guest RAM) may wait in the
//! kernel for a page; only this thread supplies pages, and it waits only
//! on its own ring (file reads). It never waits on any of them.
//!
//! A run that cannot be read or fails its checksum once the guest runs is
//! fatal: the guest must not get a wrong page, and pages it waits for will
//! never come, so the process exits with status 1 and one line naming the
//! file and the page. Nothing is written to a disk from a page that was
//! never supplied: the waiting I/O dies with the process.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ring::{Fd, Op, Ring};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

use super::format::{Checked, CrcTables, PAGE};
use super::load_error::LoadError;
use super::restore::{open_for_loading, plan_chain, LoadStats, Run, RUN_PAGES};

/// Background reads in flight at most.
const BACKGROUND: usize = 32;
/// Buffers only faults may take, so a fault never waits behind the stream.
const RESERVED: usize = 4;
const BUF_LEN: usize = (RUN_PAGES * PAGE) as usize;

// linux/userfaultfd.h (the `userfaultfd` crate needs libclang at build
// time for its bindings; these few are stable ABI).
const UFFD_API: u64 = 0xAA;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFDIO_API: libc::c_ulong = 0xC018_AA3F;
const UFFDIO_REGISTER: libc::c_ulong = 0xC020_AA00;
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_AA01;
const UFFDIO_WAKE: libc::c_ulong = 0x8010_AA02;
const UFFDIO_COPY: libc::c_ulong = 0xC028_AA03;
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xC020_AA04;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// struct uffd_msg (32 bytes); for a page fault, `arg[1]` is the address.
#[repr(C)]
#[derive(Default)]
struct UffdMsg {
    event: u8,
    _reserved: [u8; 7],
    arg: [u64; 3],
}

/// A userfaultfd over guest RAM.
struct Uffd(OwnedFd);

impl Uffd {
    fn new() -> Result<Uffd, LoadError> {
        // SAFETY: the syscall takes flags only and returns a new fd.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(LoadError::last_os("userfaultfd (lazy restore needs it: root, CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1)"));
        }
        // SAFETY: a new fd that nothing else owns.
        let u = Uffd(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
        let mut api = UffdioApi { api: UFFD_API, ..Default::default() };
        u.ioctl(UFFDIO_API, &mut api).map_err(LoadError::io("UFFDIO_API"))?;
        Ok(u)
    }

    fn ioctl<T>(&self, req: libc::c_ulong, arg: &mut T) -> std::io::Result<()> {
        // SAFETY: `req` is a userfaultfd ioctl whose argument is `T` (the
        // structs above match the kernel's layout); the kernel reads and
        // writes only that struct.
        if unsafe { libc::ioctl(self.0.as_raw_fd(), req, arg as *mut T) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    fn register(&self, start: usize, len: usize) -> std::io::Result<()> {
        let mut r = UffdioRegister { range: UffdioRange { start: start as u64, len: len as u64 }, mode: UFFDIO_REGISTER_MODE_MISSING, ioctls: 0 };
        self.ioctl(UFFDIO_REGISTER, &mut r)
    }

    fn unregister(&self, start: usize, len: usize) -> std::io::Result<()> {
        let mut r = UffdioRange { start: start as u64, len: len as u64 };
        self.ioctl(UFFDIO_UNREGISTER, &mut r)
    }

    fn wake(&self, start: usize, len: usize) {
        let mut r = UffdioRange { start: start as u64, len: len as u64 };
        let _ = self.ioctl(UFFDIO_WAKE, &mut r);
    }

    /// Places `len` bytes from `src` at the missing pages at `dst` and
    /// wakes their waiters; pages already there (EEXIST) are skipped.
    fn copy(&self, dst: usize, src: usize, len: usize) -> std::io::Result<()> {
        let mut off = 0;
        while off < len {
            let mut c = UffdioCopy { dst: (dst + off) as u64, src: (src + off) as u64, len: (len - off) as u64, mode: 0, copy: 0 };
            match self.ioctl(UFFDIO_COPY, &mut c) {
                Ok(()) => return Ok(()),
                Err(e) if matches!(e.raw_os_error(), Some(libc::EEXIST) | Some(libc::EAGAIN)) => {
                    if c.copy > 0 {
                        off += c.copy as usize;
                    } else if e.raw_os_error() == Some(libc::EEXIST) {
                        self.wake(dst + off, PAGE as usize);
                        off += PAGE as usize;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// A zero page at `addr` (an absent page), waking its waiters.
    fn zero(&self, addr: usize) -> std::io::Result<()> {
        let mut z = UffdioZeropage { range: UffdioRange { start: addr as u64, len: PAGE }, mode: 0, zeropage: 0 };
        match self.ioctl(UFFDIO_ZEROPAGE, &mut z) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                self.wake(addr, PAGE as usize);
                Ok(())
            }
            r => r,
        }
    }

    /// The next fault's page address, None when none is pending.
    fn next_fault(&self) -> Option<usize> {
        loop {
            let mut m = UffdMsg::default();
            // SAFETY: reads one uffd_msg into a local of its size.
            let n = unsafe { libc::read(self.0.as_raw_fd(), (&mut m as *mut UffdMsg).cast(), std::mem::size_of::<UffdMsg>()) };
            if n != std::mem::size_of::<UffdMsg>() as isize {
                return None;
            }
            if m.event == UFFD_EVENT_PAGEFAULT {
                return Some(m.arg[1] as usize & !(PAGE as usize - 1));
            }
        }
    }
}

const PENDING: u8 = 0;
const QUEUED: u8 = 1;
const READING: u8 = 2;
const DONE: u8 = 3;

/// One file of what is loaded (one, or each of an incremental chain).
struct Source {
    /// Named in errors when there are several.
    name: String,
    fd: Fd,
    _file: File,
    punt: bool,
    /// Every page's checksum, by region.
    crcs: CrcTables,
}

struct State {
    uffd: Uffd,
    sources: Vec<Source>,
    runs: Vec<Run>,
    /// The source each run is read from.
    run_source: Vec<usize>,
    gpas: Vec<u64>,
    /// (host start, host end, run) by host address.
    index: Vec<(usize, usize, usize)>,
    state: Vec<u8>,
    next_bg: usize,
    urgent: VecDeque<usize>,
    bufs: usize,
    free: Vec<usize>,
    left: usize,
    bytes: u64,
    faults: u64,
    err: Option<LoadError>,
}

type StateRef = Rc<RefCell<State>>;

impl State {
    fn run_at(&self, addr: usize) -> Option<usize> {
        let i = self.index.partition_point(|&(s, _, _)| s <= addr);
        let &(s, e, r) = self.index.get(i.checked_sub(1)?)?;
        (s <= addr && addr < e).then_some(r)
    }

    /// Serves every pending fault message.
    fn faults(&mut self) {
        while let Some(addr) = self.uffd.next_fault() {
            self.faults += 1;
            match self.run_at(addr) {
                Some(r) => match self.state[r] {
                    PENDING => {
                        self.state[r] = QUEUED;
                        self.urgent.push_back(r);
                    }
                    DONE => self.uffd.wake(addr, PAGE as usize),
                    _ => {} // its read is queued or in flight: the copy wakes it
                },
                None => {
                    if let Err(e) = self.uffd.zero(addr) {
                        self.err.get_or_insert(LoadError::io(format!("zero page at host address {addr:#x}"))(e));
                    }
                }
            }
        }
    }

    /// The next run to read into a free buffer: faults first; the stream
    /// only while more than RESERVED buffers are free.
    fn next_run(&mut self) -> Option<usize> {
        if let Some(r) = self.urgent.pop_front() {
            return Some(r);
        }
        if self.free.len() <= RESERVED {
            return None;
        }
        while self.next_bg < self.runs.len() && self.state[self.next_bg] != PENDING {
            self.next_bg += 1;
        }
        (self.next_bg < self.runs.len()).then(|| {
            self.next_bg += 1;
            self.next_bg - 1
        })
    }

    /// A run's read came back into buffer `b`: checked, then placed.
    fn landed(&mut self, r: usize, b: usize, res: std::io::Result<usize>) -> Result<(), LoadError> {
        let e = match self.place(r, b, res) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        Err(match self.sources.len() {
            1 => e,
            _ => LoadError::InFile { file: self.sources[self.run_source[r]].name.clone(), source: Box::new(e) },
        })
    }

    fn place(&mut self, r: usize, b: usize, res: std::io::Result<usize>) -> Result<(), LoadError> {
        let (off, host, pages, ri, first) = self.runs[r];
        let crcs = &self.sources[self.run_source[r]].crcs;
        let len = (pages * PAGE) as usize;
        match res {
            Ok(n) if n == len => {}
            Ok(n) => return Err(LoadError::ShortRead { offset: off, got: n, want: len }),
            Err(e) => return Err(LoadError::io(format!("read at file offset {off:#x}"))(e)),
        }
        let buf = self.bufs + b * BUF_LEN;
        for k in 0..pages {
            // SAFETY: inside buffer `b` of the pool this thread mapped; the
            // read into it has completed.
            let page = unsafe { std::slice::from_raw_parts((buf + (k * PAGE) as usize) as *const u8, PAGE as usize) };
            if crc32c::crc32c(page) != crcs.get(ri, first + k) {
                return Err(LoadError::Checksum(self.gpas[ri] + (first + k) * PAGE));
            }
        }
        self.uffd.copy(host, buf, len).map_err(LoadError::io(format!("UFFDIO_COPY at gpa {:#x}", self.gpas[ri] + first * PAGE)))?;
        self.state[r] = DONE;
        self.left -= 1;
        self.bytes += len as u64;
        Ok(())
    }
}

fn issue(ring: &mut Ring, st: &StateRef) {
    loop {
        let (r, b, fd, punt, off, len, buf) = {
            let mut s = st.borrow_mut();
            if s.err.is_some() {
                return;
            }
            let Some(b) = s.free.pop() else { return };
            let Some(r) = s.next_run() else {
                s.free.push(b);
                return;
            };
            s.state[r] = READING;
            let (off, _, pages, _, _) = s.runs[r];
            let src = &s.sources[s.run_source[r]];
            (r, b, src.fd, src.punt, off, (pages * PAGE) as usize, s.bufs + b * BUF_LEN)
        };
        let iov = vec![libc::iovec { iov_base: buf as *mut libc::c_void, iov_len: len }];
        // SAFETY: buffer `b` belongs to this read until its completion
        // gives it back to the free list; the pool outlives the ring.
        let op = unsafe { Op::readv(fd, iov, off) };
        let st2 = st.clone();
        let done = move |ring: &mut Ring, c: ring::Completion| {
            let r2 = {
                let mut s = st2.borrow_mut();
                let r2 = s.landed(r, b, c.result);
                s.free.push(b);
                r2
            };
            if let Err(e) = r2 {
                st2.borrow_mut().err.get_or_insert(e);
            }
            issue(ring, &st2);
        };
        if punt {
            ring.submit_async(ring::SourceId::fixed(1), op, done);
        } else {
            ring.submit(ring::SourceId::fixed(1), op, done);
        }
    }
}

/// Watches the userfaultfd for faults (a multishot poll, armed again if
/// the kernel ends it while pages are still missing).
fn arm(ring: &mut Ring, st: &StateRef, poll: &Rc<std::cell::Cell<Option<ring::OpId>>>) {
    let ufd = st.borrow().uffd.0.as_raw_fd();
    let (st2, poll2) = (st.clone(), poll.clone());
    let id = ring.submit(ring::SourceId::fixed(2), Op::Poll { fd: ufd, events: libc::POLLIN as u32, multishot: true }, move |ring, c| {
        if c.result.is_ok() {
            st2.borrow_mut().faults();
            issue(ring, &st2);
        }
        if !c.more && poll2.get().is_some() && st2.borrow().left > 0 {
            arm(ring, &st2, &poll2);
        }
    });
    poll.set(Some(id));
}

/// Starts a lazy restore of `chain` (one file, or an incremental chain
/// newest first) into `mem` (the vCPUs parked, guest RAM untouched since
/// it was mapped). A fault, or the stream, reads each page from the newest
/// file that has it; pages in no file are zero. `ready` runs on the fault
/// thread once faults are served: the VM may apply its state and run.
/// `streamed` runs once every page is in and the files are no longer
/// needed. A failure after `ready` ends the process (see the module
/// comment).
pub fn spawn(
    chain: &[(PathBuf, &Checked)],
    mem: &GuestMemoryMmap,
    progress: Arc<AtomicU64>,
    ready: impl FnOnce(Result<LoadStats, LoadError>) + Send + 'static,
    streamed: impl FnOnce(LoadStats) + Send + 'static,
) -> Result<(), LoadError> {
    if chain.iter().any(|(p, _)| p.to_str().is_some_and(crate::nfs::is_uri)) {
        return Err(LoadError::Unsupported("a lazy restore needs local files, not nfs://"));
    }
    let (mut runs, mut run_source, mut plans) = (Vec::new(), Vec::new(), Vec::new());
    let mut gpas = Vec::new();
    let mut direct = true;
    for (i, ((path, _), (r, crcs, g))) in chain.iter().zip(plan_chain(chain, mem)?).enumerate() {
        run_source.extend(std::iter::repeat_n(i, r.len()));
        runs.extend(r);
        // Every file of a chain has the same regions.
        gpas = g;
        let (file, d) = open_for_loading(path).map_err(LoadError::io(format!("open {}", path.display())))?;
        direct &= d;
        plans.push((path.display().to_string(), file, crcs));
    }
    let regions: Vec<(usize, usize)> = mem
        .iter()
        .map(|r| r.get_host_address(MemoryRegionAddress(0)).map(|h| (h as usize, r.len() as usize)))
        .collect::<Result<_, _>>()
        .map_err(|e| LoadError::GuestMemory { gpa: 0, reason: e.to_string() })?;
    let path = chain[0].0.clone();
    std::thread::Builder::new()
        .name("ringvm-uffd".into())
        .spawn(move || {
            let t0 = Instant::now();
            let st = match setup(plans, runs, run_source, gpas, &regions) {
                Ok(s) => s,
                Err(e) => return ready(Err(e)),
            };
            let (mut ring, st) = st;
            crate::seccomp::apply_or_exit(crate::seccomp::Role::Faults);
            ready(Ok(LoadStats { bytes: 0, elapsed: t0.elapsed(), direct, mapped: false }));
            let fatal = |e: LoadError| -> ! {
                log::error!("state file {}: lazy restore: {e}", path.display());
                eprintln!("ringvm: state file {}: lazy restore failed: {e}; the running guest cannot get this memory, stopping", path.display());
                std::process::exit(1)
            };
            let poll = Rc::new(std::cell::Cell::new(None));
            arm(&mut ring, &st, &poll);
            issue(&mut ring, &st);
            loop {
                if let Some(e) = st.borrow().err.clone() {
                    fatal(e);
                }
                if st.borrow().left == 0 {
                    break;
                }
                if let Err(e) = ring.run_once(true) {
                    fatal(LoadError::ring(e));
                }
                progress.store(st.borrow().bytes, Ordering::Relaxed);
            }
            // Every present page is in: absent ones become ordinary zero
            // pages, and whoever waits on one is woken.
            for &(h, l) in &regions {
                if let Err(e) = st.borrow().uffd.unregister(h, l) {
                    fatal(LoadError::io("UFFDIO_UNREGISTER")(e));
                }
            }
            if let Some(p) = poll.take() {
                ring.cancel(p);
            }
            while ring.in_flight() > 0 && ring.run_once(true).is_ok() {}
            let (bytes, faults) = (st.borrow().bytes, st.borrow().faults);
            progress.store(bytes, Ordering::Relaxed);
            log::info!("lazy restore: {} MiB streamed in {:.1} ms, {faults} faults served", bytes >> 20, t0.elapsed().as_secs_f64() * 1e3);
            streamed(LoadStats { bytes, elapsed: t0.elapsed(), direct, mapped: false });
        })
        .map(|_| ())
        .map_err(LoadError::thread("fault"))
}

/// Drops whatever guest RAM holds, registers it with a new userfaultfd,
/// and sets up the ring and the buffer pool.
fn setup(
    files: Vec<(String, File, CrcTables)>,
    runs: Vec<Run>,
    run_source: Vec<usize>,
    gpas: Vec<u64>,
    regions: &[(usize, usize)],
) -> Result<(Ring, StateRef), LoadError> {
    let uffd = Uffd::new()?;
    for &(h, l) in regions {
        // SAFETY: guest RAM (private anonymous) of a VM whose vCPUs are
        // parked: dropped pages come back through the userfaultfd.
        if unsafe { libc::madvise(h as *mut libc::c_void, l, libc::MADV_DONTNEED) } != 0 {
            return Err(LoadError::last_os("madvise(DONTNEED) on guest RAM"));
        }
        uffd.register(h, l).map_err(LoadError::io("UFFDIO_REGISTER on guest RAM"))?;
    }
    let nbufs = BACKGROUND + RESERVED;
    // SAFETY: a new private anonymous mapping for the staging buffers; it
    // is never unmapped (one lazy restore per process).
    let bufs = unsafe { libc::mmap(std::ptr::null_mut(), nbufs * BUF_LEN, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
    if bufs == libc::MAP_FAILED {
        return Err(LoadError::last_os("staging buffers"));
    }
    let mut ring = Ring::new(128, None).map_err(LoadError::ring)?;
    let sources = files
        .into_iter()
        .map(|(name, file, crcs)| {
            let fd = ring.register_fd(file.as_raw_fd()).unwrap_or(Fd::Raw(file.as_raw_fd()));
            let punt = super::fsprobe::blocks_inline(&file);
            Source { name, fd, _file: file, punt, crcs }
        })
        .collect();
    let mut index: Vec<(usize, usize, usize)> = runs.iter().enumerate().map(|(i, r)| (r.1, r.1 + (r.2 * PAGE) as usize, i)).collect();
    index.sort_unstable();
    let n = runs.len();
    let st = State {
        uffd,
        sources,
        runs,
        run_source,
        gpas,
        index,
        state: vec![PENDING; n],
        next_bg: 0,
        urgent: VecDeque::new(),
        bufs: bufs as usize,
        free: (0..nbufs).collect(),
        left: n,
        bytes: 0,
        faults: 0,
        err: None,
    };
    Ok((ring, Rc::new(RefCell::new(st))))
}
