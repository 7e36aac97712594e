//! `ring`: the ring crate against fio (ioengine=io_uring) on the same file,
//! same block size, depth and O_DIRECT, interleaved, median of N.

use std::cell::RefCell;
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::Command;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ringvm_ring::{Fd, Op, Ring};

#[derive(Clone, Copy)]
pub struct Job {
    pub name: &'static str,
    pub write: bool,
    pub random: bool,
    pub bs: usize,
    pub depth: usize,
}

pub const JOBS: &[Job] = &[
    Job { name: "4k randread QD32", write: false, random: true, bs: 4096, depth: 32 },
    Job { name: "1M seq write QD8", write: true, random: false, bs: 1 << 20, depth: 8 },
    Job { name: "1M seq read QD8", write: false, random: false, bs: 1 << 20, depth: 8 },
];

/// Anonymous, page-aligned memory for O_DIRECT: the same kind of memory as
/// fio's `--mem=mmap`, in small pages on both sides. (Physical layout matters
/// on a virtio host disk: a 1 MiB read into transparent huge pages is one
/// segment and runs about twice as fast -- guest RAM gets MADV_HUGEPAGE.)
/// Like fio, a read job leaves its buffers untouched, so registering them
/// is what faults them in; a write job fills them first. (That matters
/// here: on this virtual machine 1 MiB reads into buffers the program had
/// written first ran 10-25% slower at the device, the same requests and
/// depth, whatever the reason below us.)
struct Arena {
    ptr: *mut u8,
    len: usize,
}

impl Arena {
    fn new(len: usize, fill: bool) -> Result<Arena> {
        // SAFETY: anonymous private mapping, checked below.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
        if p == libc::MAP_FAILED {
            bail!("mmap {len}: {}", std::io::Error::last_os_error());
        }
        if fill {
            // SAFETY: the mapping is len bytes, writable.
            unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0x5a, len) };
        }
        Ok(Arena { ptr: p.cast(), len })
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Bytes per second moved by the ring for `secs`.
pub fn run_ring(path: &Path, size: u64, job: Job, secs: f64) -> Result<f64> {
    let file = OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(path).with_context(|| format!("open {}", path.display()))?;
    // Eager submission: each completion's follow-up read or write is in
    // flight before the next completion is handled, as fio does.
    let mut ring = Ring::with_options(ringvm_ring::RingOptions::new(64).eager(true))?;
    let fd = ring.register_fd(file.as_raw_fd())?;
    let arena = Arena::new(job.bs * job.depth, job.write)?;

    struct St {
        rng: u64,
        next_seq: u64,
        bytes: u64,
        stop: bool,
        err: Option<std::io::Error>,
    }
    let st = Rc::new(RefCell::new(St { rng: 0x9E37_79B9_7F4A_7C15, next_seq: 0, bytes: 0, stop: false, err: None }));
    let blocks = size / job.bs as u64;
    fn issue(ring: &mut Ring, st: &Rc<RefCell<St>>, job: Job, fd: Fd, idx: u16, slot_ptr: *mut u8, blocks: u64) {
        let off = {
            let mut s = st.borrow_mut();
            if s.stop {
                return;
            }
            if job.random {
                s.rng ^= s.rng << 13;
                s.rng ^= s.rng >> 7;
                s.rng ^= s.rng << 17;
                (s.rng % blocks) * job.bs as u64
            } else {
                let o = s.next_seq % blocks * job.bs as u64;
                s.next_seq += 1;
                o
            }
        };
        // SAFETY: each in-flight op owns its own bs-sized slice of the registered arena.
        let op = unsafe {
            if job.write {
                Op::write_fixed(fd, idx, slot_ptr, job.bs, off)
            } else {
                Op::read_fixed(fd, idx, slot_ptr, job.bs, off)
            }
        };
        let st2 = st.clone();
        ring.submit(ringvm_ring::SourceId::fixed(1), op, move |ring, c| {
            match c.result {
                Ok(n) => st2.borrow_mut().bytes += n as u64,
                Err(e) => {
                    let mut s = st2.borrow_mut();
                    s.err = Some(e);
                    s.stop = true;
                }
            }
            issue(ring, &st2, job, fd, idx, slot_ptr, blocks);
        });
    }
    // Warm-up is part of fio's ramp too; measure a steady window.
    for k in 0..job.depth {
        // SAFETY: k * bs < arena.len.
        let p = unsafe { arena.ptr.add(k * job.bs) };
        // One registered buffer per in-flight slot, as fio registers one per io_u.
        // SAFETY: the arena outlives the ring (dropped after it below).
        let idx = unsafe { ring.register_buffer(p, job.bs) }?;
        issue(&mut ring, &st, job, fd, idx, p, blocks);
    }
    let t0 = Instant::now();
    let mut measured_from = (t0, 0u64);
    let warm = Duration::from_secs_f64((secs * 0.1).min(1.0));
    let mut warmed = false;
    while t0.elapsed() < warm + Duration::from_secs_f64(secs) {
        ring.run_once(true)?;
        if !warmed && t0.elapsed() >= warm {
            warmed = true;
            measured_from = (Instant::now(), st.borrow().bytes);
        }
        if st.borrow().err.is_some() {
            break;
        }
    }
    let (t1, b1) = (Instant::now(), st.borrow().bytes);
    st.borrow_mut().stop = true;
    ring.run_until(Duration::from_secs(30), |r| r.in_flight() == 0)?;
    if let Some(e) = st.borrow_mut().err.take() {
        bail!("ring {}: {e}", job.name);
    }
    drop(ring);
    drop(arena);
    Ok((b1 - measured_from.1) as f64 / (t1 - measured_from.0).as_secs_f64())
}

/// Bytes per second by fio with the same job.
pub fn run_fio(path: &Path, size: u64, job: Job, secs: f64) -> Result<f64> {
    let rw = match (job.write, job.random) {
        (false, true) => "randread",
        (true, true) => "randwrite",
        (false, false) => "read",
        (true, false) => "write",
    };
    let ramp = (secs * 0.1).min(1.0);
    let out = Command::new("fio")
        .args([
            "--name=job",
            "--ioengine=io_uring",
            "--direct=1",
            "--fixedbufs=1",
            "--registerfiles=1",
            "--thread",
            "--mem=mmap",
            "--output-format=json",
            "--time_based",
            "--norandommap",
            "--randrepeat=0",
        ])
        .arg(format!("--filename={}", path.display()))
        .arg(format!("--size={size}"))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={}", job.bs))
        .arg(format!("--iodepth={}", job.depth))
        .arg(format!("--runtime={secs}"))
        .arg(format!("--ramp_time={ramp}"))
        .output()
        .context("running fio")?;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("fio JSON")?;
    let side = if job.write { "write" } else { "read" };
    v["jobs"][0][side]["bw_bytes"].as_f64().context("fio JSON: bw_bytes")
}

/// One sequential 1 MiB O_DIRECT pass of fio over `path` (`rw` = write or
/// read), untimed.
fn fio_pass(path: &Path, rw: &str, size: u64) -> Result<()> {
    let st = Command::new("fio")
        .args([&format!("--name={rw}-pass"), "--ioengine=io_uring", "--direct=1", &format!("--rw={rw}"), "--bs=1M", "--iodepth=8", "--output-format=terse"])
        .arg(format!("--filename={}", path.display()))
        .arg(format!("--size={size}"))
        .output()
        .with_context(|| format!("fio ({rw} pass)"))?;
    if !st.status.success() {
        bail!("fio {rw} pass failed: {}", String::from_utf8_lossy(&st.stderr));
    }
    Ok(())
}

/// A fully written file of `size` bytes (written once, kept between runs),
/// then read once, untimed, before anything is measured. The disk under
/// this machine is itself virtual: after an idle spell the first tens of
/// seconds of reads ran at a fifth of the later speed (session 9: 63-137
/// MB/s in the first two repetitions of 4k QD32, then 530-590 for both
/// sides), and whichever side drew those runs lost the median.
pub fn prepare_file(path: &Path, size: u64) -> Result<()> {
    if !std::fs::metadata(path).is_ok_and(|m| m.len() == size) {
        fio_pass(path, "write", size)?;
    }
    fio_pass(path, "read", size)
}

/// The suite: every job, ring and fio alternating (A B / B A).
pub fn suite(c: &crate::Ctx, r: &mut crate::report::Report) -> Result<()> {
    use crate::report::{cell, ratio};
    if !c.have_fio {
        r.skip("ring", "fio unavailable (scripts/peers.sh installs it)");
        return Ok(());
    }
    let (size, secs) = if c.quick { (256u64 << 20, 1.0) } else { (2u64 << 30, 5.0) };
    let path = c.scratch()?.join("ring-bench.dat");
    r.begin("ring", (JOBS.len() * c.reps * 2) as u64 + 1);
    r.step(format!("preparing {} MiB file (and reading it once)", size >> 20));
    prepare_file(&path, size)?;
    for job in JOBS {
        for rep in 0..c.reps {
            if crate::stopping() {
                break;
            }
            for side in crate::interleaved(&["ringvm-ring", "fio"], rep) {
                r.step(format!("{}: {side}, repetition {}/{}", job.name, rep + 1, c.reps));
                let bps = if side == "fio" { run_fio(&path, size, *job, secs)? } else { run_ring(&path, size, *job, secs)? };
                r.sample(job.name, side, "throughput", "MB/s", bps / 1e6);
                r.sample(job.name, side, "iops", "IO/s", bps / job.bs as f64);
            }
        }
    }
    let mut rows = vec![];
    for job in JOBS {
        let (a, b) = (r.stat(job.name, "ringvm-ring", "throughput"), r.stat(job.name, "fio", "throughput"));
        let iops = |s: Option<crate::report::Stat>| s.map_or(String::new(), |s| format!("; {:.0} IOPS", s.median * 1e6 / job.bs as f64));
        rows.push(vec![job.name.to_string(), format!("{}{}", cell(a, 1), iops(a)), format!("{}{}", cell(b, 1), iops(b)), ratio(a, b)]);
        r.headline(&format!("ring: {}", job.name), ("MB/s", a), ("fio MB/s", b), false);
    }
    r.table(
        "ring: the ring crate vs fio (io_uring engine)",
        &format!("{} MiB file in {} (O_DIRECT, registered file and one fixed buffer per in-flight slot on both sides, small-page buffers; the ring submits eagerly, one io_uring_enter per queued operation, as fio does), {secs} s runs after a ramp; the file is read once, untimed, before the first run.", size >> 20, path.display()),
        &["job", "ringvm-ring MB/s", "fio MB/s", "ratio ring/fio"],
        &rows,
    );
    r.end();
    Ok(())
}
