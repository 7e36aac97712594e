//! `snapshot`: live snapshot of the test guest (idle and dirtying memory)
//! to the local disk and /dev/shm, against fio writing the same number of
//! bytes sequentially with O_DIRECT on the same filesystem.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

pub struct Result1 {
    pub total_ms: f64,
    pub bytes: f64,
    pub downtime_ms: f64,
    pub iterations: u64,
    pub file_mib: f64,
}

/// ringvm's own QMP client (QEMU answers it too).
pub(crate) type Qmp = ringvm::qmp::client::Client;

/// Connects (waiting up to 120 s for the socket) and negotiates; every
/// later read has the same deadline.
pub(crate) fn qmp(sock: &Path) -> Result<Qmp> {
    Ok(Qmp::negotiated(sock, Duration::from_secs(120))?)
}

/// Sends `c`; the reply as it came (events skipped).
pub(crate) fn cmd(q: &mut Qmp, c: Value) -> Result<Value> {
    Ok(q.cmd(&c)?)
}

/// A command that must succeed: its `return` value.
pub(crate) fn ok(q: &mut Qmp, c: Value) -> Result<Value> {
    let r = cmd(q, c.clone())?;
    match r.get("return") {
        Some(v) => Ok(v.clone()),
        None => bail!("{}: {r}", c["execute"]),
    }
}

/// Waits (10 s) for a child that was told to quit, then kills it.
/// Polls query-savevm (every 2 ms, 600 s at most) until the snapshot
/// ends; its status object if it completed.
pub(crate) fn savevm_completed(q: &mut Qmp) -> Result<Value> {
    let t0 = Instant::now();
    loop {
        let s = cmd(q, json!({"execute": "query-savevm"}))?["return"].clone();
        if s["status"] == "completed" {
            return Ok(s);
        }
        if s["status"] != "active" {
            bail!("snapshot failed: {s}");
        }
        if t0.elapsed() > Duration::from_secs(600) {
            bail!("snapshot did not finish");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

pub(crate) fn reap(mut child: std::process::Child) -> Result<()> {
    let t0 = Instant::now();
    while child.try_wait()?.is_none() {
        if t0.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The heartbeat lines a guest printed so far.
pub(crate) type Beats = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// Reads the guest's stdout in the background: the receiver gets one
/// message when the guest says its fill is done, and its heartbeat lines
/// are kept.
pub(crate) fn watch_fill(child: &mut std::process::Child) -> (std::sync::mpsc::Receiver<()>, Beats) {
    let out = child.stdout.take().expect("stdout piped");
    let (tx, rx) = std::sync::mpsc::channel();
    let beats = Beats::default();
    let seen = beats.clone();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(|l| l.ok()) {
            if l.contains("fill done") {
                let _ = tx.send(());
            }
            if l.contains("beat") {
                if let Ok(mut v) = seen.lock() {
                    v.push(l);
                }
            }
        }
    });
    (rx, beats)
}

/// `bin`, run inside network namespace `netns` if given.
pub fn command(netns: Option<&str>, bin: &Path) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(bin);
            c
        }
        None => Command::new(bin),
    }
}

/// Boots a `mem_mib` guest filling `fill_pct`% of it, dirtying at `rate`
/// MiB/s, snapshots it to `file` (which may be an nfs:// URI), inside
/// network namespace `netns` if given.
#[allow(clippy::too_many_arguments)]
pub fn ringvm(netns: Option<&str>, bin: &Path, guest: &Path, dir: &Path, file: &Path, mem_mib: u64, rate: u64, fill_pct: u64) -> Result<Result1> {
    let sock = dir.join("snap.sock");
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(file);
    let fill = mem_mib * fill_pct / 100;
    let mut child = command(netns, bin)
        .args(["run", "--cpus", "1", "--memory", &format!("{mem_mib}M"), "--kernel"])
        .arg(guest)
        .args(["--cmdline", &format!("work=mem mib={fill} secs=inf rate={rate}"), "--qmp"])
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let (rx, _) = watch_fill(&mut child);
    let res = (|| -> Result<Result1> {
        rx.recv_timeout(Duration::from_secs(600)).context("guest fill")?;
        let mut q = qmp(&sock)?;
        ok(&mut q, json!({"execute": "savevm-start", "arguments": {"statefile": file}}))?;
        let s = savevm_completed(&mut q)?;
        let _ = cmd(&mut q, json!({"execute": "quit"}));
        let used = std::fs::metadata(file).map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512).unwrap_or(0);
        Ok(Result1 {
            total_ms: s["total-time"].as_f64().unwrap_or(0.0),
            bytes: s["bytes"].as_f64().unwrap_or(0.0),
            downtime_ms: s["downtime"].as_f64().unwrap_or(0.0),
            iterations: s["iterations"].as_u64().unwrap_or(0),
            file_mib: used as f64 / (1 << 20) as f64,
        })
    })();
    reap(child)?;
    res
}

/// Restores `file` with -S and measures the time until the VM is paused
/// with all state applied (QMP query-status leaves inmigrate); also the
/// p99 of back-to-back query-status latencies during the load.
/// Starts `ringvm run -S --loadstate FILE EXTRA` with QMP on a socket in
/// `dir`; returns the child and the socket.
fn spawn_restore(netns: Option<&str>, bin: &Path, dir: &Path, file: &Path, extra: &[&str]) -> Result<(std::process::Child, std::path::PathBuf)> {
    let sock = dir.join("restore.sock");
    let _ = std::fs::remove_file(&sock);
    let child = command(netns, bin)
        .args(["run", "-S", "--serial", "off", "--loadstate"])
        .arg(file)
        .args(extra)
        .arg("--qmp")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok((child, sock))
}

/// `extra`: more `ringvm run` arguments (e.g. `--restore-ram read`).
pub fn restore(netns: Option<&str>, bin: &Path, dir: &Path, file: &Path, extra: &[&str]) -> Result<(f64, f64)> {
    let t0 = Instant::now();
    let (child, sock) = spawn_restore(netns, bin, dir, file, extra)?;
    let res = (|| -> Result<(f64, f64)> {
        let mut q = qmp(&sock)?;
        let mut lat: Vec<f64> = Vec::new();
        loop {
            let t = Instant::now();
            let st = cmd(&mut q, json!({"execute": "query-status"}))?["return"]["status"].clone();
            lat.push(t.elapsed().as_secs_f64() * 1e3);
            if st != "inmigrate" {
                if st != "paused" {
                    bail!("restore ended in state {st}");
                }
                break;
            }
            if t0.elapsed() > Duration::from_secs(600) {
                bail!("restore did not finish");
            }
            // The same 1 ms cadence as QEMU's wait (qemu_wait): the clock
            // stops within a millisecond of the end for both, and the
            // probe does not take a CPU from the load it measures.
            std::thread::sleep(Duration::from_millis(1));
        }
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let _ = cmd(&mut q, json!({"execute": "quit"}));
        lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let p99 = lat[((lat.len() * 99) / 100).min(lat.len() - 1)];
        Ok((ms, p99))
    })();
    reap(child)?;
    res
}

/// `ringvm run -S --loadstate FILE --restore-ram lazy`: milliseconds from
/// process start to a paused VM with its state applied (RAM still coming),
/// and to `query-migrate` saying completed (all of RAM in).
pub fn restore_lazy(bin: &Path, dir: &Path, file: &Path) -> Result<(f64, f64)> {
    let t0 = Instant::now();
    let (child, sock) = spawn_restore(None, bin, dir, file, &["--restore-ram", "lazy"])?;
    let res = (|| -> Result<(f64, f64)> {
        let mut q = qmp(&sock)?;
        let mut ready = None;
        loop {
            if ready.is_none() && cmd(&mut q, json!({"execute": "query-status"}))?["return"]["status"] != "inmigrate" {
                ready = Some(t0.elapsed().as_secs_f64() * 1e3);
            }
            if ready.is_some() && cmd(&mut q, json!({"execute": "query-migrate"}))?["return"]["status"] == "completed" {
                break;
            }
            if t0.elapsed() > Duration::from_secs(600) {
                bail!("lazy restore did not finish");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let all = t0.elapsed().as_secs_f64() * 1e3;
        let _ = cmd(&mut q, json!({"execute": "quit"}));
        Ok((ready.unwrap_or(all), all))
    })();
    reap(child)?;
    res
}

/// fio reading `bytes` sequentially from `file`, O_DIRECT where taken:
/// milliseconds, the faster of two queue shapes, 1 MiB at QD32 (fio's
/// usual) and 2 MiB at QD64 (ringvm's loader's), so the reference is the
/// most this file gives fio either way.
/// `force_async`: every read on its own io-wq worker (IOSQE_ASYNC), which
/// FUSE and network filesystems need for reads to overlap.
pub fn fio_read_ms(file: &Path, bytes: u64, force_async: bool) -> Result<f64> {
    let run = |bs: &str, depth: u32, direct: u32| {
        let huge = crate::fio::HugeBuffers::reserve(if bs == "2M" { 2 << 20 } else { 1 << 20 }, depth, 1);
        Command::new("fio")
            .arg(crate::fio::HugeBuffers::iomem(&huge))
            .args(["--name=r", "--ioengine=io_uring", "--rw=read", "--output-format=json"])
            .arg(format!("--bs={bs}"))
            .arg(format!("--iodepth={depth}"))
            // An io_uring engine option: after --ioengine.
            .arg(format!("--force_async={}", u32::from(force_async)))
            .arg(format!("--direct={direct}"))
            .arg(format!("--filename={}", file.display()))
            .arg(format!("--size={}M", (bytes >> 20).max(1)))
            .output()
    };
    let mut best = f64::INFINITY;
    for (bs, depth) in [("1M", 32), ("2M", 64)] {
        let mut out = run(bs, depth, 1)?;
        if !out.status.success() {
            out = run(bs, depth, 0)?;
        }
        if !out.status.success() {
            bail!("fio: {}", String::from_utf8_lossy(&out.stderr));
        }
        let v: Value = serde_json::from_slice(&out.stdout)?;
        let bw = v["jobs"][0]["read"]["bw_bytes"].as_f64().context("bw_bytes")?;
        best = best.min(bytes as f64 / bw * 1e3);
    }
    Ok(best)
}

/// fio writing `bytes` sequentially in 1 MiB blocks to a file in `dir`
/// (O_DIRECT where the filesystem takes it, fsync at the end); returns
/// MB/s. `qd` 1 is a synchronous writer (psync: one write at a time, as a
/// plain `write()` loop); more uses io_uring at that depth.
///
/// `prealloc` false (`--fallocate=none`) writes a new, empty file, as a
/// snapshot does: the filesystem allocates blocks (tmpfs: pages) as the
/// writes land, and that is part of the time. fio's default allocates the
/// whole file before its clock starts, which measures overwriting an
/// existing file: here about 2.5x faster on /dev/shm and 1.3x on the
/// local ext4 disk.
pub fn fio_write(dir: &Path, bytes: u64, qd: u32, force_async: bool, prealloc: bool) -> Result<f64> {
    let file = dir.join("fio-snap.dat");
    let mib = (bytes >> 20).max(1);
    let run = |direct: u32| {
        let huge = crate::fio::HugeBuffers::reserve(1 << 20, qd, 1);
        let mut c = Command::new("fio");
        c.arg(crate::fio::HugeBuffers::iomem(&huge));
        c.args(["--name=w", "--rw=write", "--bs=1M", "--output-format=json", "--end_fsync=1"]);
        c.arg(if prealloc { "--fallocate=native" } else { "--fallocate=none" });
        if qd <= 1 {
            c.arg("--ioengine=psync");
        } else {
            c.arg("--ioengine=io_uring").arg(format!("--iodepth={qd}")).arg(format!("--force_async={}", u32::from(force_async)));
        }
        c.arg(format!("--direct={direct}")).arg(format!("--filename={}", file.display())).arg(format!("--size={mib}M")).output()
    };
    let mut out = run(1)?;
    if !out.status.success() {
        out = run(0)?;
    }
    let _ = std::fs::remove_file(&file);
    if !out.status.success() {
        bail!("fio: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: Value = serde_json::from_slice(&out.stdout)?;
    let bw = v["jobs"][0]["write"]["bw_bytes"].as_f64().context("bw_bytes")?;
    Ok(bw / 1e6)
}

/// How QEMU writes its state file.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum QemuMode {
    /// `migrate file:` as is: a stream.
    Plain,
    /// mapped-ram + multifd (4 channels) + direct-io: RAM at fixed offsets.
    MappedRam,
}

impl QemuMode {
    pub fn name(self) -> &'static str {
        match self {
            QemuMode::Plain => "QEMU migrate file:",
            QemuMode::MappedRam => "QEMU mapped-ram+multifd+direct-io",
        }
    }
}

/// The same guest and workload in QEMU 10, saved with `migrate file:`.
/// QEMU brings up one vCPU of this guest (its MP table differs), which
/// does the same filling and dirtying.
/// QEMU 10 with the test guest, one vCPU, `mem_mib` of RAM and QMP on
/// `sock`; the caller adds the rest.
fn qemu_command(guest: &Path, mem_mib: u64, sock: &Path) -> Command {
    qemu_command_accel(guest, mem_mib, sock, "kvm")
}

fn qemu_command_accel(guest: &Path, mem_mib: u64, sock: &Path, accel: &str) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-accel", accel, "-cpu", "host,-arch-capabilities", "-smp", "1", "-m", &format!("{mem_mib}M"), "-kernel"])
        .arg(guest)
        .args(["-nographic", "-monitor", "none", "-device", "isa-debug-exit,iobase=0x501,iosize=1", "-qmp"])
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(Stdio::null())
        .stderr(Stdio::null());
    c
}

/// The test guest running `cmdline` under QEMU 10, its serial output
/// watched (see [`watch_fill`]).
pub(crate) fn qemu_guest(guest: &Path, mem_mib: u64, sock: &Path, cmdline: &str) -> Result<(std::process::Child, std::sync::mpsc::Receiver<()>, Beats)> {
    qemu_guest_accel(guest, mem_mib, sock, cmdline, "kvm")
}

/// [`qemu_guest`] with its `-accel` option (e.g. `kvm,dirty-ring-size=4096`).
pub(crate) fn qemu_guest_accel(
    guest: &Path,
    mem_mib: u64,
    sock: &Path,
    cmdline: &str,
    accel: &str,
) -> Result<(std::process::Child, std::sync::mpsc::Receiver<()>, Beats)> {
    let mut child = qemu_command_accel(guest, mem_mib, sock, accel)
        .args(["-append", cmdline, "-serial", "stdio"])
        .stdout(Stdio::piped())
        .spawn()
        .context("qemu-system-x86_64")?;
    let (rx, beats) = watch_fill(&mut child);
    Ok((child, rx, beats))
}

/// mapped-ram + multifd (4 channels) + direct-io, on both ends.
pub(crate) fn qemu_set_mode(q: &mut Qmp, mode: QemuMode) -> Result<()> {
    if mode == QemuMode::MappedRam {
        let caps = json!([{"capability": "mapped-ram", "state": true}, {"capability": "multifd", "state": true}]);
        ok(q, json!({"execute": "migrate-set-capabilities", "arguments": {"capabilities": caps}}))?;
        ok(q, json!({"execute": "migrate-set-parameters", "arguments": {"multifd-channels": 4, "direct-io": true}}))?;
    }
    Ok(())
}

/// Polls query-migrate until `completed` (its status object), within
/// 600 s of `t0`.
pub(crate) fn qemu_wait(q: &mut Qmp, t0: Instant, poll: Duration) -> Result<Value> {
    loop {
        let s = ok(q, json!({"execute": "query-migrate"}))?;
        match s["status"].as_str() {
            Some("completed") => return Ok(s),
            Some("failed") | Some("cancelled") => bail!("QEMU migration: {s}"),
            _ => {}
        }
        if t0.elapsed() > Duration::from_secs(600) {
            bail!("QEMU migration did not finish");
        }
        std::thread::sleep(poll);
    }
}

pub fn qemu(guest: &Path, dir: &Path, file: &Path, mem_mib: u64, rate: u64, fill_pct: u64, mode: QemuMode) -> Result<Result1> {
    let sock = dir.join("qemu-snap.sock");
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(file);
    let fill = mem_mib * fill_pct / 100;
    let (child, rx, _) = qemu_guest(guest, mem_mib, &sock, &format!("work=mem mib={fill} secs=inf rate={rate}"))?;
    let res = (|| -> Result<Result1> {
        rx.recv_timeout(Duration::from_secs(600)).context("guest fill under QEMU")?;
        let mut q = qmp(&sock)?;
        // No bandwidth cap (QEMU's default is 128 MiB/s) and ringvm's
        // default downtime target (QEMU's is 300 ms).
        ok(&mut q, json!({"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": 1u64 << 40, "downtime-limit": 5}}))?;
        qemu_set_mode(&mut q, mode)?;
        ok(&mut q, json!({"execute": "migrate", "arguments": {"uri": format!("file:{}", file.display())}}))?;
        let s = qemu_wait(&mut q, Instant::now(), Duration::from_millis(2))?;
        let _ = cmd(&mut q, json!({"execute": "quit"}));
        let used = std::fs::metadata(file).map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512).unwrap_or(0);
        Ok(Result1 {
            total_ms: s["total-time"].as_f64().unwrap_or(0.0),
            bytes: s["ram"]["transferred"].as_f64().unwrap_or(0.0),
            downtime_ms: s["downtime"].as_f64().unwrap_or(0.0),
            iterations: s["ram"]["dirty-sync-count"].as_u64().unwrap_or(0),
            file_mib: used as f64 / (1 << 20) as f64,
        })
    })();
    reap(child)?;
    res
}

/// QEMU restoring `file` (saved by [`qemu`] in `mode`) with `-incoming
/// defer` + `migrate-incoming`, paused (-S): milliseconds from process
/// start until the incoming migration completed.
pub fn qemu_restore(guest: &Path, dir: &Path, file: &Path, mem_mib: u64, mode: QemuMode) -> Result<f64> {
    let sock = dir.join("qemu-in.sock");
    let _ = std::fs::remove_file(&sock);
    let t0 = Instant::now();
    let child = qemu_command(guest, mem_mib, &sock)
        .args(["-serial", "null", "-S", "-incoming", "defer"])
        .stdout(Stdio::null())
        .spawn()
        .context("qemu-system-x86_64")?;
    let res = (|| -> Result<f64> {
        let mut q = qmp(&sock)?;
        qemu_set_mode(&mut q, mode)?;
        ok(&mut q, json!({"execute": "migrate-incoming", "arguments": {"uri": format!("file:{}", file.display())}}))?;
        qemu_wait(&mut q, t0, Duration::from_millis(1))?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let _ = cmd(&mut q, json!({"execute": "quit"}));
        Ok(ms)
    })();
    reap(child)?;
    res
}

/// ringvm-faultfs mounted as an NFS stand-in: a FUSE passthrough to a
/// directory on the local disk that answers every read and write late.
pub(crate) struct Fuse {
    child: std::process::Child,
    mnt: std::path::PathBuf,
}

impl Fuse {
    pub(crate) fn mount(faultfs: &Path, back: &Path, mnt: &Path, delay_us: u64) -> Result<Fuse> {
        let _ = Command::new("umount").arg("-l").arg(mnt).output();
        std::fs::create_dir_all(back)?;
        std::fs::create_dir_all(mnt)?;
        let child = Command::new(faultfs)
            .arg(back)
            .arg(mnt)
            .args(["--delay-us", &delay_us.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("{}", faultfs.display()))?;
        let f = Fuse { child, mnt: mnt.to_path_buf() };
        let t0 = Instant::now();
        loop {
            let mounts = std::fs::read_to_string("/proc/self/mounts")?;
            if mounts.lines().any(|l| l.starts_with("ringvm-faultfs ") && l.contains(mnt.to_str().unwrap_or("?"))) {
                return Ok(f);
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("ringvm-faultfs did not mount {} within 30 s (is fusermount3 installed?)", mnt.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Fuse {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).output();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const LOCAL: &str = "local disk";
const SHM: &str = "/dev/shm";
const FUSE: &str = "NFS stand-in (FUSE +delay)";

struct Case {
    target: &'static str,
    dir: std::path::PathBuf,
    mib: u64,
    /// MiB/s; 1 is idle.
    rate: u64,
    /// Percent of the guest's RAM its workload fills: [`DENSE_PCT`] or
    /// [`SPARSE_PCT`] (sparse: most pages zero, left out of the file).
    fill_pct: u64,
    /// Restore what was saved, and run the fio peers for the same bytes.
    restore: bool,
}

impl Case {
    fn key(&self) -> String {
        key(self.target, self.mib, self.rate, self.fill_pct)
    }
}

/// The dense rows' fill: 90% of RAM in use.
pub const DENSE_PCT: u64 = 90;
/// The sparse rows' fill: a quarter of RAM in use.
const SPARSE_PCT: u64 = 25;

fn key(target: &str, mib: u64, rate: u64, fill_pct: u64) -> String {
    if fill_pct == DENSE_PCT {
        format!("{target} {mib}MiB rate={rate}")
    } else {
        format!("{target} {mib}MiB rate={rate} fill={fill_pct}%")
    }
}

fn rate_name(rate: u64) -> String {
    if rate <= 1 {
        "idle".into()
    } else {
        rate.to_string()
    }
}

const MAPPED: &str = "QEMU mapped-ram";
const PLAIN: &str = "QEMU migrate file:";

/// The samples of one save, by ringvm or QEMU.
fn record_save(r: &mut crate::report::Report, k: &str, sys: &str, res: &Result1) {
    r.sample(k, sys, "save_ms", "ms", res.total_ms);
    r.sample(k, sys, "save_mbs", "MB/s", res.bytes / 1e6 / (res.total_ms / 1e3));
    r.sample(k, sys, "downtime_ms", "ms", res.downtime_ms);
    r.sample(k, sys, "passes", "count", res.iterations as f64);
    r.sample(k, sys, "written_mb", "MB", res.bytes / 1e6);
    r.sample(k, sys, "file_mib", "MiB", res.file_mib);
}

/// The samples of one restore taking `ms` of a guest with `fill_bytes` in use.
fn record_restore(r: &mut crate::report::Report, k: &str, sys: &str, ms: f64, fill_bytes: f64) {
    r.sample(k, sys, "restore_ms", "ms", ms);
    r.sample(k, sys, "restore_mbs", "MB/s", fill_bytes / 1e6 / (ms / 1e3));
}

/// Every restore starts from the disk: the state file is flushed and its
/// pages dropped from the page cache first (a buffered writer's file, such
/// as QEMU's plain stream, would otherwise be read back from memory while
/// an O_DIRECT writer's is read from the disk). Memory filesystems keep
/// their pages (that is where they live).
pub(crate) fn uncache(file: &Path) {
    if let Ok(f) = std::fs::File::open(file) {
        let _ = f.sync_all();
        // SAFETY: advice on an fd we own, over the whole file.
        unsafe { libc::posix_fadvise(std::os::fd::AsRawFd::as_raw_fd(&f), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
}

/// ringvm restoring with `--restore-ram read` (the /dev/shm rows).
const READ: &str = "ringvm read";
/// ringvm restoring with `--restore-ram lazy` (local disk rows).
const LAZY: &str = "ringvm lazy";

/// On a memory target, guest-sized memory held while fio writes, as a
/// VMM's guest RAM is held while it writes its state file.
///
/// This host returns free memory to its hypervisor (virtio-balloon free
/// page reporting, a fraction of the free lists every 2 s), so what a
/// tmpfs write costs depends on what the machine did just before: fio
/// writing 3.6 GiB to /dev/shm ran at 1380 MB/s right after a 4 GiB VM
/// exited and at 388 MB/s 15 s later; waiting a fixed time before fio did
/// not make it repeatable. A VMM's state file always comes after its
/// guest has taken its RAM, the recently freed (fast) memory first; the
/// hog does the same before fio's timed writes.
struct Hog(*mut libc::c_void, usize);

impl Hog {
    fn take(case: &Case) -> Option<Hog> {
        if case.target != SHM {
            return None;
        }
        let len = (case.mib as usize) << 20;
        // SAFETY: a new private anonymous mapping, ours alone.
        let p = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE, -1, 0)
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        // SAFETY: advice on the mapping just made (huge pages, as guest
        // RAM has; then every page allocated, as a filled guest's is).
        unsafe {
            libc::madvise(p, len, libc::MADV_HUGEPAGE);
            libc::madvise(p, len, libc::MADV_POPULATE_WRITE);
        }
        Some(Hog(p, len))
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        // SAFETY: unmaps what take() mapped.
        unsafe { libc::munmap(self.0, self.1) };
    }
}

/// One system's turn at one case: saves (and restores) and records samples.
fn turn(c: &crate::Ctx, r: &mut crate::report::Report, case: &Case, sys: &str) -> Result<()> {
    let k = case.key();
    let fill_bytes = (case.mib * case.fill_pct / 100) as f64 * (1 << 20) as f64;
    if sys == "ringvm" {
        let file = case.dir.join("ringvm-perf.state");
        let res = ringvm(None, &c.bin, &c.guest, &c.dir, &file, case.mib, case.rate, case.fill_pct)?;
        record_save(r, &k, sys, &res);
        if case.restore {
            uncache(&file);
            let (ms, p99) = restore(None, &c.bin, &c.dir, &file, &[])?;
            record_restore(r, &k, sys, ms, fill_bytes);
            r.sample(&k, sys, "restore_qmp_p99_ms", "ms", p99);
            if case.target == SHM {
                // The default there maps the file; the copy, for comparison.
                let (ms, _) = restore(None, &c.bin, &c.dir, &file, &["--restore-ram", "read"])?;
                record_restore(r, &k, READ, ms, fill_bytes);
            }
            if case.target == LOCAL {
                uncache(&file);
                match restore_lazy(&c.bin, &c.dir, &file) {
                    Ok((ready, all)) => {
                        r.sample(&k, LAZY, "restore_ms", "ms", ready);
                        r.sample(&k, LAZY, "all_in_ms", "ms", all);
                    }
                    Err(e) => r.note(format!("ringvm lazy restore: {e:#}")),
                }
            }
            if c.have_fio {
                let present = std::fs::metadata(&file).map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512).unwrap_or(0);
                match fio_read_ms(&file, present, case.target == FUSE) {
                    Ok(fms) => {
                        r.sample(&k, "fio", "read_ms", "ms", fms);
                        r.sample(&k, "fio", "read_mbs", "MB/s", present as f64 / 1e6 / (fms / 1e3));
                    }
                    Err(e) => r.note(format!("fio read on {}: {e:#}", case.target)),
                }
            }
        }
        let _ = std::fs::remove_file(&file);
        if c.have_fio {
            let _hog = Hog::take(case);
            match fio_write(&case.dir, res.bytes as u64, 32, case.target == FUSE, false) {
                Ok(v) => r.sample(&k, "fio", "write_mbs", "MB/s", v),
                Err(e) => r.note(format!("fio write on {}: {e:#}", case.target)),
            }
            if case.restore {
                match fio_write(&case.dir, res.bytes as u64, 32, case.target == FUSE, true) {
                    Ok(v) => r.sample(&k, "fio preallocated", "write_mbs", "MB/s", v),
                    Err(e) => r.note(format!("fio write (preallocated) on {}: {e:#}", case.target)),
                }
                match fio_write(&case.dir, res.bytes as u64, 1, false, false) {
                    Ok(v) => r.sample(&k, "sync writer", "write_mbs", "MB/s", v),
                    Err(e) => r.note(format!("fio psync write on {}: {e:#}", case.target)),
                }
            }
        }
        return Ok(());
    }
    let mode = if sys == MAPPED { QemuMode::MappedRam } else { QemuMode::Plain };
    let file = case.dir.join("qemu-perf.state");
    match qemu(&c.guest, &c.dir, &file, case.mib, case.rate, case.fill_pct, mode) {
        Ok(q) => {
            record_save(r, &k, sys, &q);
            if case.restore {
                uncache(&file);
                match qemu_restore(&c.guest, &c.dir, &file, case.mib, mode) {
                    Ok(ms) => record_restore(r, &k, sys, ms, fill_bytes),
                    Err(e) => r.note(format!("{} restore, {k}: {e:#}", mode.name())),
                }
            }
        }
        Err(e) => r.note(format!("{}, {k}: {e:#}", mode.name())),
    }
    let _ = std::fs::remove_file(&file);
    Ok(())
}

/// The suite: save (and restore) vs guest size on the local disk, /dev/shm
/// and the NFS stand-in; downtime vs dirty rate on the local disk. Per
/// case the systems run in rotating order, `reps` times.
pub fn suite(c: &crate::Ctx, r: &mut crate::report::Report) -> Result<()> {
    use crate::plot::{Panel, Series};
    use crate::report::{cell, ratio};
    let small = if c.quick { 256 } else { 1024 };
    // QEMU's plain stream through the stand-in runs at ~5 MB/s (see turn()):
    // a smaller guest there keeps the run within reason.
    let fuse_mib = if c.quick { 256 } else { 512 };
    let sizes = c.sizes.clone().unwrap_or(if c.quick { vec![256] } else { vec![1024, 4096, 8192] });
    let rates = c.rates.clone().unwrap_or(if c.quick { vec![100] } else { vec![100, 250, 500] });
    let delay_us: u64 = std::env::var("RINGVM_PERF_FUSE_DELAY_US").ok().and_then(|v| v.parse().ok()).unwrap_or(500);
    let scratch = c.scratch()?;
    let local = scratch.join("snap");
    std::fs::create_dir_all(&local)?;
    let shm = std::path::PathBuf::from(format!("/dev/shm/ringvm-perf-{}", std::process::id()));
    std::fs::create_dir_all(&shm)?;
    r.begin("snapshot", 1);
    let want = |t: &str| c.targets.as_ref().is_none_or(|v| v.iter().any(|x| x == t));
    let fuse = if !want("fuse") {
        None
    } else {
        match Fuse::mount(&c.faultfs, &scratch.join("fuse-back"), &scratch.join("fuse-mnt"), delay_us) {
            Ok(f) => Some(f),
            Err(e) => {
                r.note(format!("NFS stand-in target skipped: {e:#}"));
                None
            }
        }
    };
    let mut cases = vec![];
    let mid = sizes.iter().copied().filter(|&m| m <= 4096).max().unwrap_or(sizes[0]);
    for (t, d) in [(LOCAL, &local), (SHM, &shm)] {
        if !want(if t == LOCAL { "local" } else { "shm" }) {
            continue;
        }
        for &mib in &sizes {
            cases.push(Case { target: t, dir: d.clone(), mib, rate: 1, fill_pct: DENSE_PCT, restore: true });
        }
        // Sparse: a quarter of a mid-sized guest in use; the rest is zero
        // pages, which no system writes or reads back.
        cases.push(Case { target: t, dir: d.clone(), mib: mid, rate: 1, fill_pct: SPARSE_PCT, restore: true });
    }
    if let Some(f) = &fuse {
        cases.push(Case { target: FUSE, dir: f.mnt.clone(), mib: fuse_mib, rate: 1, fill_pct: DENSE_PCT, restore: true });
    }
    for &rate in rates.iter().filter(|_| want("local")) {
        cases.push(Case { target: LOCAL, dir: local.clone(), mib: small, rate, fill_pct: DENSE_PCT, restore: false });
    }
    let mut systems = vec!["ringvm"];
    if c.have_qemu {
        systems.extend([MAPPED, PLAIN]);
    }
    r.begin("snapshot", (cases.len() * c.reps * systems.len()) as u64);
    let mut result = Ok(());
    'outer: for case in &cases {
        for rep in 0..c.reps {
            if crate::stopping() {
                r.note(format!("stopped by a signal at {} (repetition {}): the rest was not run", case.key(), rep + 1));
                break 'outer;
            }
            for sys in crate::interleaved(&systems, rep) {
                if case.target == FUSE && sys == PLAIN && rep > 0 {
                    continue;
                }
                r.step(format!("{} {} MiB {}: {sys}, repetition {}/{}", case.target, case.mib, rate_name(case.rate), rep + 1, c.reps));
                if let Err(e) = turn(c, r, case, sys) {
                    result = Err(e.context(format!("ringvm, {}", case.key())));
                    break 'outer;
                }
            }
        }
    }
    drop(fuse);
    let _ = std::fs::remove_dir_all(&shm);
    result?;

    let gib = |mib: u64| format!("{} GiB", mib as f64 / 1024.0);
    let guest = |c: &Case| if c.fill_pct == DENSE_PCT { gib(c.mib) } else { format!("{}, {}% used", gib(c.mib), c.fill_pct) };
    let mut save_rows = vec![];
    let mut down_rows = vec![];
    let mut restore_rows = vec![];
    for case in &cases {
        let k = case.key();
        let s = |sys: &str, m: &str| r.stat(&k, sys, m);
        let (ours, mapped, plain) = (s("ringvm", "save_ms"), s(MAPPED, "save_ms"), s(PLAIN, "save_ms"));
        save_rows.push(vec![
            case.target.into(),
            guest(case),
            rate_name(case.rate),
            cell(ours, 0),
            cell(s("ringvm", "save_mbs"), 0),
            cell(s("fio", "write_mbs"), 0),
            ratio(s("ringvm", "save_mbs"), s("fio", "write_mbs")),
            if case.restore { cell(s("fio preallocated", "write_mbs"), 0) } else { "-".into() },
            if case.restore { cell(s("sync writer", "write_mbs"), 0) } else { "-".into() },
            cell(mapped, 0),
            cell(plain, 0),
            ratio(ours, mapped),
            ratio(ours, plain),
        ]);
        down_rows.push(vec![
            case.target.into(),
            guest(case),
            rate_name(case.rate),
            cell(s("ringvm", "downtime_ms"), 2),
            cell(s("ringvm", "passes"), 0),
            cell(s(MAPPED, "downtime_ms"), 1),
            cell(s(MAPPED, "passes"), 0),
            cell(s(PLAIN, "downtime_ms"), 1),
            cell(s(PLAIN, "passes"), 0),
            ratio(s("ringvm", "downtime_ms"), s(MAPPED, "downtime_ms")),
        ]);
        if case.restore {
            let (ours, mapped, plain) = (s("ringvm", "restore_ms"), s(MAPPED, "restore_ms"), s(PLAIN, "restore_ms"));
            restore_rows.push(vec![
                case.target.into(),
                guest(case),
                cell(ours, 0),
                if case.target == SHM { cell(s(READ, "restore_ms"), 0) } else { "-".into() },
                if case.target == LOCAL { format!("{} / {}", cell(s(LAZY, "restore_ms"), 0), cell(s(LAZY, "all_in_ms"), 0)) } else { "-".into() },
                cell(s("ringvm", "restore_mbs"), 0),
                cell(s("ringvm", "restore_qmp_p99_ms"), 2),
                cell(s("fio", "read_ms"), 0),
                ratio(ours, s("fio", "read_ms")),
                cell(mapped, 0),
                cell(plain, 0),
                ratio(ours, mapped),
                ratio(ours, plain),
            ]);
        }
    }
    let fuse_note = format!("The NFS stand-in is ringvm-faultfs, a FUSE passthrough to the local disk that answers every read and write {delay_us} us late (requests overlap, as on a network); it is not NFS: it shows what latency does to a deep queue and to a synchronous writer. It has no write-back cache, so a buffered writer's small writes each pay the delay where an NFS client would gather them: QEMU's plain `migrate file:` stream crawls there (about 5 MB/s) and is measured once, not per repetition. On FUSE (as on the kernel's NFS client) io_uring runs writes to one file one at a time (io-wq orders writes per inode unless the filesystem declares parallel direct writes), so ringvm's deep queue cannot hide write latency there; reads overlap when each is punted to its own worker (IOSQE_ASYNC), which ringvm's loader and fio (`--force_async=1` on this target) do.");
    r.table(
        "snapshot: live save",
        &format!("The test guest, 1 vCPU (QEMU brings up one of this guest's vCPUs), 90% of RAM filled (sparse rows: 25%), then rewritten at the given rate. ringvm: `savevm-start` until `query-savevm` says completed. QEMU 10: `migrate file:` with no bandwidth cap and a 5 ms downtime target, plain and with mapped-ram + multifd (4 channels) + direct-io. fio writes the same number of bytes (1 MiB, io_uring QD32, O_DIRECT where taken, fsync, huge-page buffers as guest RAM has: `--iomem=shmhuge`) to a new file after ringvm (`--fallocate=none`: blocks, or tmpfs pages, are allocated as the writes land, as for a state file); on /dev/shm the harness first takes and holds guest-sized memory, as a VMM's guest holds its RAM while the state file is written (this host hands free memory back to its hypervisor a little at a time, and memory freed moments ago is up to 3.5x faster to take again: without this, fio wrote into what the VM had just freed); 'fio preallocated' is fio's default, which allocates the whole file before its clock starts and so times an overwrite (the idle rows only); the sync writer is fio psync (one 1 MiB write at a time, new file). 'ringvm/QEMU' is a ratio of total times (below 1: ringvm faster). {fuse_note}"),
        &["target", "guest", "dirty MiB/s", "ringvm ms", "ringvm MB/s", "fio QD32 MB/s", "ringvm/fio", "fio preallocated MB/s", "sync writer MB/s", "QEMU mapped-ram ms", "QEMU plain ms", "ringvm/QEMU mapped-ram", "ringvm/QEMU plain"],
        &save_rows,
    );
    r.table(
        "snapshot: downtime",
        "The final pause (vCPUs stopped to resumed), as each VMM reports it; passes = ringvm's iterations, QEMU's dirty-sync-count.",
        &[
            "target",
            "guest",
            "dirty MiB/s",
            "ringvm downtime ms",
            "ringvm passes",
            "QEMU mapped-ram downtime ms",
            "passes",
            "QEMU plain downtime ms",
            "passes",
            "ringvm/QEMU mapped-ram",
        ],
        &down_rows,
    );
    r.table(
        "snapshot: restore",
        "ringvm: `ringvm run -S --loadstate FILE`, process start until QMP says `paused` (RAM loaded and checked, all state applied). On /dev/shm its default maps the file over guest RAM (private, copy-on-write; every page's checksum checked through the mapping); 'ringvm read' is `--restore-ram read` there, the io_uring copy into fresh guest RAM that is the default elsewhere. 'ringvm lazy' (local disk) is `--restore-ram lazy`: process start until `paused` with the state applied and RAM still coming through the userfaultfd, then until `query-migrate` says completed. `query-status` every millisecond during the load (p99 of their round trips). QEMU: `-S -incoming defer` + `migrate-incoming file:` of its own file, process start until `completed` (`query-migrate` every millisecond). Before every restore the state file is flushed and dropped from the page cache (posix_fadvise DONTNEED), so each system reads it from the disk: without that, QEMU's plain stream (written through the page cache) was read back from memory while ringvm's (written O_DIRECT) came from the disk. MB/s = guest RAM in use / time. fio reads the state file's allocated bytes (the faster of 1 MiB at QD32 and 2 MiB at QD64, ringvm's loader's queue; O_DIRECT where taken; huge-page buffers, `--iomem=shmhuge`, as guest RAM is THP-backed).",
        &["target", "guest", "ringvm ms", "ringvm read ms", "ringvm lazy ms (paused / all RAM in)", "ringvm MB/s", "p99 query-status ms", "fio read ms", "ringvm/fio", "QEMU mapped-ram ms", "QEMU plain ms", "ringvm/QEMU mapped-ram", "ringvm/QEMU plain"],
        &restore_rows,
    );

    // Plots: throughput vs guest size, downtime vs dirty rate.
    let vs_size = |r: &crate::report::Report, target: &str, sys: &str, m: &str| Series {
        name: sys.to_string(),
        points: sizes
            .iter()
            .filter_map(|&mib| r.stat(&key(target, mib, 1, DENSE_PCT), sys, m).map(|s| (mib as f64 / 1024.0, s.median, s.min, s.max)))
            .collect(),
    };
    let panels = |r: &crate::report::Report, peer: &str, ours: &str, fio_m: &str| {
        [LOCAL, SHM]
            .iter()
            .map(|t| Panel {
                title: t.to_string(),
                series: vec![
                    vs_size(r, t, "ringvm", ours),
                    vs_size(r, t, MAPPED, ours),
                    vs_size(r, t, PLAIN, ours),
                    Series { name: peer.into(), ..vs_size(r, t, "fio", fio_m) },
                ],
            })
            .collect::<Vec<_>>()
    };
    let p = panels(r, "fio write QD32 (same bytes)", "save_mbs", "write_mbs");
    r.plot("save-throughput-vs-guest-size.png", "live snapshot save: throughput vs guest size (idle guest)", "guest GiB", "MB/s", false, p);
    let p = panels(r, "fio read (same bytes)", "restore_mbs", "read_mbs");
    r.plot("restore-throughput-vs-guest-size.png", "restore: guest RAM in use / time to a paused VM", "guest GiB", "MB/s", false, p);
    let all_rates: Vec<u64> = std::iter::once(1).chain(rates.iter().copied()).collect();
    let vs_rate = |r: &crate::report::Report, sys: &str, m: &str| Series {
        name: sys.to_string(),
        points: all_rates
            .iter()
            .filter_map(|&rate| {
                r.stat(&key(LOCAL, small, rate, DENSE_PCT), sys, m).map(|s| (if rate <= 1 { 0.0 } else { rate as f64 }, s.median, s.min, s.max))
            })
            .collect(),
    };
    let p = ["downtime_ms", "save_ms"]
        .iter()
        .map(|m| Panel {
            title: format!("{} ({} MiB guest, local disk)", if *m == "downtime_ms" { "downtime" } else { "total time" }, small),
            series: vec![vs_rate(r, "ringvm", m), vs_rate(r, MAPPED, m), vs_rate(r, PLAIN, m)],
        })
        .collect();
    r.plot("downtime-vs-dirty-rate.png", "live snapshot: downtime and total time vs guest dirty rate", "dirty MiB/s (0 = idle)", "ms", false, p);

    // Headlines.
    let big = *sizes.iter().max().unwrap_or(&small);
    let mut at_cases = vec![(LOCAL, small, DENSE_PCT)];
    if big != small {
        at_cases.push((LOCAL, big, DENSE_PCT));
    }
    at_cases.extend([(LOCAL, mid, SPARSE_PCT), (SHM, small, DENSE_PCT), (FUSE, fuse_mib, DENSE_PCT)]);
    for (target, mib, fill) in at_cases {
        let k = key(target, mib, 1, fill);
        let s = |sys: &str, m: &str| r.stat(&k, sys, m);
        let (save, fio_w, sync_w, fio_r) = (s("ringvm", "save_mbs"), s("fio", "write_mbs"), s("sync writer", "write_mbs"), s("fio", "read_ms"));
        let fio_pre = s("fio preallocated", "write_mbs");
        let rread = s(READ, "restore_ms");
        let (lazy_ready, lazy_all) = (s(LAZY, "restore_ms"), s(LAZY, "all_in_ms"));
        let (t, tm, tp, rs, rm, rp) =
            (s("ringvm", "save_ms"), s(MAPPED, "save_ms"), s(PLAIN, "save_ms"), s("ringvm", "restore_ms"), s(MAPPED, "restore_ms"), s(PLAIN, "restore_ms"));
        let at = if fill == DENSE_PCT { format!("{target}, {}", gib(mib)) } else { format!("{target}, {}, {fill}% used", gib(mib)) };
        r.headline(&format!("save MB/s vs fio QD32 (new file), {at}"), ("MB/s", save), ("fio MB/s", fio_w), false);
        r.headline(&format!("save MB/s vs fio QD32 into a preallocated file, {at}"), ("MB/s", save), ("fio MB/s", fio_pre), false);
        if target == FUSE {
            r.headline(&format!("save MB/s vs a sync writer, {at}"), ("MB/s", save), ("psync MB/s", sync_w), false);
        }
        r.headline(&format!("save time vs QEMU mapped-ram, {at}"), ("ms", t), ("QEMU ms", tm), true);
        r.headline(&format!("save time vs QEMU migrate file:, {at}"), ("ms", t), ("QEMU ms", tp), true);
        r.headline(&format!("restore time vs fio read, {at}"), ("ms", rs), ("fio ms", fio_r), true);
        if target == SHM {
            r.headline(&format!("restore time with --restore-ram read vs fio read, {at}"), ("ms", rread), ("fio ms", fio_r), true);
        }
        if target == LOCAL {
            r.headline(&format!("lazy restore: time to a paused VM vs fio read, {at}"), ("ms", lazy_ready), ("fio ms", fio_r), true);
            r.headline(&format!("lazy restore: time to all RAM in vs fio read, {at}"), ("ms", lazy_all), ("fio ms", fio_r), true);
        }
        r.headline(&format!("restore time vs QEMU mapped-ram, {at}"), ("ms", rs), ("QEMU ms", rm), true);
        r.headline(&format!("restore time vs QEMU migrate file:, {at}"), ("ms", rs), ("QEMU ms", rp), true);
    }
    if let Some(&top) = rates.iter().max() {
        let k = key(LOCAL, small, top, DENSE_PCT);
        let (a, b) = (r.stat(&k, "ringvm", "downtime_ms"), r.stat(&k, MAPPED, "downtime_ms"));
        r.headline(&format!("downtime at {top} MiB/s dirty vs QEMU mapped-ram, local disk, {}", gib(small)), ("ms", a), ("QEMU ms", b), true);
    }
    r.end();
    Ok(())
}
