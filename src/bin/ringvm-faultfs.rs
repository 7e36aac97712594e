//! ringvm-faultfs: a FUSE passthrough of one flat directory that injects
//! faults and latency, for ringvm's tests and benchmarks.
//!
//! ```text
//! ringvm-faultfs BACKING MOUNTPOINT [--delay-us N] [--fail-writes-after N]
//!     [--fail-reads-after N] [--errno N] [--stall-writes-after N]
//!     [--stall-writes-from OFFSET] [--stall-reads-after N] [--stall-secs S]
//! ```
//! - `--delay-us`: every read and write is answered N us late (requests are
//!   delayed in parallel, as a network would: latency, not serialisation);
//! - `--fail-writes-after N` / `--fail-reads-after N`: the (N+1)th and later
//!   write / read requests fail with `--errno` (default EIO);
//! - `--stall-writes-after N`: write requests after the Nth are held for
//!   `--stall-secs` (default 3600) before being served;
//! - `--stall-writes-from OFFSET`: so are writes at or past that offset.
//!   The first stalled write is announced on stderr
//!   (`ringvm-faultfs: stalling writes ...`);
//! - `--stall-reads-after N`: read requests after the Nth are held the same
//!   way (`ringvm-faultfs: stalling reads ...`).
//!
//! Runs in the foreground until unmounted or killed.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use fuser::{
    FileAttr, FileType, Filesystem, MountOption, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request,
    TimeOrNow,
};

const TTL: Duration = Duration::ZERO;
/// FOPEN_PARALLEL_DIRECT_WRITES: the kernel may send direct writes to one
/// file concurrently (otherwise it holds the inode lock across each one,
/// and injected latency would serialise every writer).
const PARALLEL_DIRECT_WRITES: u32 = 1 << 6;

#[derive(Clone, Default)]
struct Faults {
    delay: Duration,
    fail_writes_after: Option<u64>,
    fail_reads_after: Option<u64>,
    errno: i32,
    stall_writes_after: Option<u64>,
    /// Writes at or past this file offset stall.
    stall_writes_from: Option<u64>,
    stall_reads_after: Option<u64>,
    stall: Duration,
}

type Job = Box<dyn FnOnce() + Send>;

struct Fs {
    dir: PathBuf,
    names: HashMap<u64, String>,
    inos: HashMap<String, u64>,
    next_ino: u64,
    files: HashMap<u64, Arc<File>>,
    next_fh: u64,
    faults: Faults,
    writes: Arc<AtomicU64>,
    /// The first stalled write was announced on stderr.
    stalled_once: bool,
    /// The first stalled read was announced on stderr.
    stalled_reads_once: bool,
    reads: Arc<AtomicU64>,
    /// Delayed requests go here with their due time.
    delayed: mpsc::Sender<(Instant, Job)>,
}

fn attr(ino: u64, m: &std::fs::Metadata) -> FileAttr {
    let t = |s: i64| UNIX_EPOCH + Duration::from_secs(s.max(0) as u64);
    FileAttr {
        ino,
        size: m.len(),
        blocks: m.blocks(),
        atime: t(m.atime()),
        mtime: t(m.mtime()),
        ctime: t(m.ctime()),
        crtime: t(m.ctime()),
        kind: if m.is_dir() { FileType::Directory } else { FileType::RegularFile },
        perm: (m.mode() & 0o7777) as u16,
        nlink: m.nlink() as u32,
        uid: m.uid(),
        gid: m.gid(),
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

impl Fs {
    fn path(&self, ino: u64) -> Option<PathBuf> {
        if ino == fuser::FUSE_ROOT_ID {
            return Some(self.dir.clone());
        }
        self.names.get(&ino).map(|n| self.dir.join(n))
    }

    fn ino(&mut self, name: &str) -> u64 {
        if let Some(&i) = self.inos.get(name) {
            return i;
        }
        let i = self.next_ino;
        self.next_ino += 1;
        self.inos.insert(name.to_string(), i);
        self.names.insert(i, name.to_string());
        i
    }

    fn open_fh(&mut self, f: File) -> u64 {
        let fh = self.next_fh;
        self.next_fh += 1;
        self.files.insert(fh, Arc::new(f));
        fh
    }

    /// Runs `job` now or after the configured delay (on the delay thread,
    /// so delays overlap).
    fn later(&self, extra: Duration, job: Job) {
        let d = self.faults.delay + extra;
        if d.is_zero() {
            job();
        } else {
            let _ = self.delayed.send((Instant::now() + d, job));
        }
    }
}

impl Filesystem for Fs {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let Some(name) = name.to_str().filter(|_| parent == fuser::FUSE_ROOT_ID) else {
            return reply.error(libc::ENOENT);
        };
        match std::fs::metadata(self.dir.join(name)) {
            Ok(m) => {
                let ino = self.ino(name);
                reply.entry(&TTL, &attr(ino, &m), 0)
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.path(ino).map(std::fs::metadata) {
            Some(Ok(m)) => reply.attr(&TTL, &attr(ino, &m)),
            Some(Err(e)) => reply.error(errno(&e)),
            None => reply.error(libc::ENOENT),
        }
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        let Some(p) = self.path(ino) else { return reply.error(libc::ENOENT) };
        if let Some(len) = size {
            if let Err(e) = OpenOptions::new().write(true).open(&p).and_then(|f| f.set_len(len)) {
                return reply.error(errno(&e));
            }
        }
        match std::fs::metadata(&p) {
            Ok(m) => reply.attr(&TTL, &attr(ino, &m)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// Within the one directory (state files are renamed into place).
    fn rename(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, newparent: u64, newname: &OsStr, flags: u32, reply: ReplyEmpty) {
        let (Some(from), Some(to)) = (name.to_str(), newname.to_str()) else { return reply.error(libc::EINVAL) };
        if parent != fuser::FUSE_ROOT_ID || newparent != fuser::FUSE_ROOT_ID || flags != 0 {
            return reply.error(libc::EINVAL);
        }
        if let Err(e) = std::fs::rename(self.dir.join(from), self.dir.join(to)) {
            return reply.error(errno(&e));
        }
        // The renamed inode takes the new name; one replaced there is gone.
        if let Some(old) = self.inos.remove(to) {
            self.names.remove(&old);
        }
        if let Some(i) = self.inos.remove(from) {
            self.names.insert(i, to.to_string());
            self.inos.insert(to.to_string(), i);
        }
        reply.ok();
    }

    fn unlink(&mut self, _req: &Request<'_>, _parent: u64, name: &OsStr, reply: ReplyEmpty) {
        match std::fs::remove_file(self.dir.join(name)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        let Some(p) = self.path(ino) else { return reply.error(libc::ENOENT) };
        let acc = flags & libc::O_ACCMODE;
        let r = OpenOptions::new().read(acc != libc::O_WRONLY).write(acc != libc::O_RDONLY).custom_flags(flags & libc::O_TRUNC).open(&p).and_then(|f| {
            if flags & libc::O_TRUNC != 0 {
                f.set_len(0)?;
            }
            Ok(f)
        });
        match r {
            Ok(f) => {
                let fh = self.open_fh(f);
                reply.opened(fh, PARALLEL_DIRECT_WRITES)
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn create(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, mode: u32, _umask: u32, _flags: i32, reply: ReplyCreate) {
        let Some(name) = name.to_str().filter(|_| parent == fuser::FUSE_ROOT_ID) else {
            return reply.error(libc::EINVAL);
        };
        let p = self.dir.join(name);
        match OpenOptions::new().read(true).write(true).create(true).truncate(true).mode(mode & 0o777).open(&p) {
            Ok(f) => match f.metadata() {
                Ok(m) => {
                    let ino = self.ino(name);
                    let fh = self.open_fh(f);
                    reply.created(&TTL, &attr(ino, &m), 0, fh, PARALLEL_DIRECT_WRITES)
                }
                Err(e) => reply.error(errno(&e)),
            },
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(&mut self, _req: &Request<'_>, _ino: u64, fh: u64, offset: i64, size: u32, _flags: i32, _lock: Option<u64>, reply: ReplyData) {
        let Some(f) = self.files.get(&fh).cloned() else { return reply.error(libc::EBADF) };
        let n = self.reads.fetch_add(1, Ordering::Relaxed);
        if self.faults.fail_reads_after.is_some_and(|k| n >= k) {
            let e = self.faults.errno;
            return self.later(Duration::ZERO, Box::new(move || reply.error(e)));
        }
        let stalls = self.faults.stall_reads_after.is_some_and(|k| n >= k);
        if stalls && !self.stalled_reads_once {
            self.stalled_reads_once = true;
            eprintln!("ringvm-faultfs: stalling reads (read {n} at offset {offset})");
        }
        self.later(
            if stalls { self.faults.stall } else { Duration::ZERO },
            Box::new(move || {
                let mut buf = vec![0u8; size as usize];
                let mut done = 0;
                while done < buf.len() {
                    match f.read_at(&mut buf[done..], offset as u64 + done as u64) {
                        Ok(0) => break,
                        Ok(k) => done += k,
                        Err(e) => return reply.error(errno(&e)),
                    }
                }
                reply.data(&buf[..done])
            }),
        );
    }

    fn write(&mut self, _req: &Request<'_>, _ino: u64, fh: u64, offset: i64, data: &[u8], _wf: u32, _flags: i32, _lock: Option<u64>, reply: ReplyWrite) {
        let Some(f) = self.files.get(&fh).cloned() else { return reply.error(libc::EBADF) };
        let n = self.writes.fetch_add(1, Ordering::Relaxed);
        if self.faults.fail_writes_after.is_some_and(|k| n >= k) {
            let e = self.faults.errno;
            return self.later(Duration::ZERO, Box::new(move || reply.error(e)));
        }
        let stalls = self.faults.stall_writes_after.is_some_and(|k| n >= k) || self.faults.stall_writes_from.is_some_and(|o| offset as u64 >= o);
        let stall = if stalls { self.faults.stall } else { Duration::ZERO };
        if stalls && !self.stalled_once {
            // Tests wait for this line: from here on the target is stuck.
            self.stalled_once = true;
            eprintln!("ringvm-faultfs: stalling writes (write {n} at offset {offset})");
        }
        let data = data.to_vec();
        self.later(
            stall,
            Box::new(move || match f.write_all_at(&data, offset as u64) {
                Ok(()) => reply.written(data.len() as u32),
                Err(e) => reply.error(errno(&e)),
            }),
        );
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _lock: u64, reply: ReplyEmpty) {
        reply.ok();
    }

    fn release(&mut self, _req: &Request<'_>, _ino: u64, fh: u64, _flags: i32, _lock: Option<u64>, _flush: bool, reply: ReplyEmpty) {
        self.files.remove(&fh);
        reply.ok();
    }

    fn fsync(&mut self, _req: &Request<'_>, _ino: u64, fh: u64, datasync: bool, reply: ReplyEmpty) {
        let Some(f) = self.files.get(&fh).cloned() else { return reply.error(libc::EBADF) };
        self.later(
            Duration::ZERO,
            Box::new(move || match if datasync { f.sync_data() } else { f.sync_all() } {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            }),
        );
    }

    fn readdir(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, offset: i64, mut reply: ReplyDirectory) {
        if ino != fuser::FUSE_ROOT_ID {
            return reply.error(libc::ENOTDIR);
        }
        let mut names: Vec<String> = match std::fs::read_dir(&self.dir) {
            Ok(d) => d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect(),
            Err(e) => return reply.error(errno(&e)),
        };
        names.sort();
        for (i, n) in names.iter().enumerate().skip(offset as usize) {
            let ino = self.ino(n);
            if reply.add(ino, (i + 1) as i64, FileType::RegularFile, n) {
                break;
            }
        }
        reply.ok()
    }
}

/// Serves delayed requests when they are due (each on a short-lived
/// thread, so slow backing I/O never holds the others up).
fn delay_thread(rx: mpsc::Receiver<(Instant, Job)>) {
    let mut p: Vec<(Instant, Job)> = Vec::new();
    loop {
        let next = p.iter().map(|(t, _)| *t).min();
        let msg = match next {
            None => rx.recv().ok(),
            Some(t) => match rx.recv_timeout(t.saturating_duration_since(Instant::now())) {
                Ok(m) => Some(m),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            },
        };
        if let Some(m) = msg {
            p.push(m);
        } else if next.is_none() {
            return;
        }
        let now = Instant::now();
        let mut i = 0;
        while i < p.len() {
            if p[i].0 <= now {
                let (_, job) = p.swap_remove(i);
                std::thread::spawn(job);
            } else {
                i += 1;
            }
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        bail!("usage: ringvm-faultfs BACKING MOUNTPOINT [--delay-us N] [--fail-writes-after N] [--fail-reads-after N] [--errno N] [--stall-writes-after N] [--stall-writes-from OFFSET] [--stall-reads-after N] [--stall-secs S]");
    }
    let (dir, mnt) = (PathBuf::from(&args[0]), PathBuf::from(&args[1]));
    let mut f = Faults { errno: libc::EIO, stall: Duration::from_secs(3600), ..Default::default() };
    let mut it = args[2..].iter();
    while let Some(k) = it.next() {
        let v: u64 = it.next().with_context(|| format!("{k} needs a value"))?.parse().with_context(|| format!("{k}: not a number"))?;
        match k.as_str() {
            "--delay-us" => f.delay = Duration::from_micros(v),
            "--fail-writes-after" => f.fail_writes_after = Some(v),
            "--fail-reads-after" => f.fail_reads_after = Some(v),
            "--errno" => f.errno = v as i32,
            "--stall-writes-after" => f.stall_writes_after = Some(v),
            "--stall-writes-from" => f.stall_writes_from = Some(v),
            "--stall-reads-after" => f.stall_reads_after = Some(v),
            "--stall-secs" => f.stall = Duration::from_secs(v),
            _ => bail!("unknown option {k}"),
        }
    }
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new().name("delays".into()).spawn(move || delay_thread(rx))?;
    let fs = Fs {
        dir: std::fs::canonicalize(&dir).with_context(|| dir.display().to_string())?,
        names: HashMap::new(),
        inos: HashMap::new(),
        next_ino: 2,
        files: HashMap::new(),
        next_fh: 1,
        faults: f,
        writes: Arc::new(AtomicU64::new(0)),
        stalled_once: false,
        stalled_reads_once: false,
        reads: Arc::new(AtomicU64::new(0)),
        delayed: tx,
    };
    fuser::mount2(fs, &mnt, &[MountOption::FSName("ringvm-faultfs".into()), MountOption::RW, MountOption::AllowOther, MountOption::DefaultPermissions])
        .with_context(|| format!("mount on {}", mnt.display()))?;
    Ok(())
}
