//! `snapshot`: live snapshot of the test guest (idle and dirtying memory)
//! to the local disk and /dev/shm, against fio writing the same number of
//! bytes sequentially with O_DIRECT on the same filesystem.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
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

fn qmp(sock: &Path) -> Result<(BufReader<UnixStream>, UnixStream)> {
    let t0 = Instant::now();
    let s = loop {
        match UnixStream::connect(sock) {
            Ok(s) => break s,
            Err(e) if t0.elapsed() > Duration::from_secs(60) => bail!("connect: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let w = s.try_clone()?;
    let mut r = BufReader::new(s);
    let mut l = String::new();
    r.read_line(&mut l)?;
    let mut q = (r, w);
    cmd(&mut q, json!({"execute": "qmp_capabilities"}))?;
    Ok(q)
}

fn cmd(q: &mut (BufReader<UnixStream>, UnixStream), c: Value) -> Result<Value> {
    q.1.write_all(format!("{c}\n").as_bytes())?;
    loop {
        let mut l = String::new();
        if q.0.read_line(&mut l)? == 0 {
            bail!("QMP closed");
        }
        let v: Value = serde_json::from_str(&l)?;
        if v.get("event").is_none() {
            return Ok(v);
        }
    }
}

/// A command that must succeed: its `return` value.
fn ok(q: &mut (BufReader<UnixStream>, UnixStream), c: Value) -> Result<Value> {
    let r = cmd(q, c.clone())?;
    match r.get("return") {
        Some(v) => Ok(v.clone()),
        None => bail!("{}: {r}", c["execute"]),
    }
}

/// Waits (10 s) for a child that was told to quit, then kills it.
fn reap(mut child: std::process::Child) -> Result<()> {
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

/// Reads the guest's stdout in the background; the receiver gets one
/// message when the guest says its fill is done.
fn watch_fill(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<()> {
    let out = child.stdout.take().expect("stdout piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(|l| l.ok()) {
            if l.contains("fill done") {
                let _ = tx.send(());
            }
        }
    });
    rx
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
pub fn ringvm(
    netns: Option<&str>,
    bin: &Path,
    guest: &Path,
    dir: &Path,
    file: &Path,
    mem_mib: u64,
    rate: u64,
    fill_pct: u64,
) -> Result<Result1> {
    let sock = dir.join("snap.sock");
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(file);
    let fill = mem_mib * fill_pct / 100;
    let mut child = command(netns, bin)
        .args([
            "run",
            "--cpus",
            "1",
            "--memory",
            &format!("{mem_mib}M"),
            "--kernel",
        ])
        .arg(guest)
        .args([
            "--cmdline",
            &format!("work=mem mib={fill} secs=inf rate={rate}"),
            "--qmp",
        ])
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let rx = watch_fill(&mut child);
    let res = (|| -> Result<Result1> {
        rx.recv_timeout(Duration::from_secs(600))
            .context("guest fill")?;
        let mut q = qmp(&sock)?;
        ok(
            &mut q,
            json!({"execute": "savevm-start", "arguments": {"statefile": file}}),
        )?;
        let t0 = Instant::now();
        let s = loop {
            let s = cmd(&mut q, json!({"execute": "query-savevm"}))?["return"].clone();
            if s["status"] != "active" {
                break s;
            }
            if t0.elapsed() > Duration::from_secs(600) {
                bail!("snapshot did not finish");
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        if s["status"] != "completed" {
            bail!("snapshot failed: {s}");
        }
        let _ = cmd(&mut q, json!({"execute": "quit"}));
        let used = std::fs::metadata(file)
            .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
            .unwrap_or(0);
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
pub fn restore(netns: Option<&str>, bin: &Path, dir: &Path, file: &Path) -> Result<(f64, f64)> {
    let sock = dir.join("restore.sock");
    let _ = std::fs::remove_file(&sock);
    let t0 = Instant::now();
    let child = command(netns, bin)
        .args(["run", "-S", "--serial", "off", "--loadstate"])
        .arg(file)
        .arg("--qmp")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
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

/// fio reading `bytes` sequentially from `file` (1 MiB, QD32, O_DIRECT):
/// milliseconds.
pub fn fio_read_ms(file: &Path, bytes: u64) -> Result<f64> {
    let run = |direct: u32| {
        Command::new("fio")
            .args([
                "--name=r",
                "--ioengine=io_uring",
                "--rw=read",
                "--bs=1M",
                "--iodepth=32",
                "--output-format=json",
            ])
            .arg(format!("--direct={direct}"))
            .arg(format!("--filename={}", file.display()))
            .arg(format!("--size={}M", (bytes >> 20).max(1)))
            .output()
    };
    let mut out = run(1)?;
    if !out.status.success() {
        out = run(0)?;
    }
    if !out.status.success() {
        bail!("fio: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: Value = serde_json::from_slice(&out.stdout)?;
    let bw = v["jobs"][0]["read"]["bw_bytes"]
        .as_f64()
        .context("bw_bytes")?;
    Ok(bytes as f64 / bw * 1e3)
}

/// fio writing `bytes` sequentially (1 MiB, QD 32, O_DIRECT where the
/// filesystem takes it) to a file in `dir`; returns MB/s.
pub fn fio(dir: &Path, bytes: u64) -> Result<f64> {
    let file = dir.join("fio-snap.dat");
    let mib = (bytes >> 20).max(1);
    let run = |direct: u32| {
        Command::new("fio")
            .args([
                "--name=w",
                "--ioengine=io_uring",
                "--rw=write",
                "--bs=1M",
                "--iodepth=32",
                "--output-format=json",
                "--end_fsync=1",
            ])
            .arg(format!("--direct={direct}"))
            .arg(format!("--filename={}", file.display()))
            .arg(format!("--size={mib}M"))
            .output()
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
    let bw = v["jobs"][0]["write"]["bw_bytes"]
        .as_f64()
        .context("bw_bytes")?;
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
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-accel",
        "kvm",
        "-cpu",
        "host,-arch-capabilities",
        "-smp",
        "1",
        "-m",
        &format!("{mem_mib}M"),
        "-kernel",
    ])
    .arg(guest)
    .args([
        "-nographic",
        "-monitor",
        "none",
        "-device",
        "isa-debug-exit,iobase=0x501,iosize=1",
        "-qmp",
    ])
    .arg(format!("unix:{},server=on,wait=off", sock.display()))
    .stdin(Stdio::null())
    .stderr(Stdio::null());
    c
}

/// mapped-ram + multifd (4 channels) + direct-io, on both ends.
fn qemu_set_mode(q: &mut (BufReader<UnixStream>, UnixStream), mode: QemuMode) -> Result<()> {
    if mode == QemuMode::MappedRam {
        let caps = json!([{"capability": "mapped-ram", "state": true}, {"capability": "multifd", "state": true}]);
        ok(
            q,
            json!({"execute": "migrate-set-capabilities", "arguments": {"capabilities": caps}}),
        )?;
        ok(
            q,
            json!({"execute": "migrate-set-parameters", "arguments": {"multifd-channels": 4, "direct-io": true}}),
        )?;
    }
    Ok(())
}

/// Polls query-migrate until `completed` (its status object), within
/// 600 s of `t0`.
fn qemu_wait(
    q: &mut (BufReader<UnixStream>, UnixStream),
    t0: Instant,
    poll: Duration,
) -> Result<Value> {
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

pub fn qemu(
    guest: &Path,
    dir: &Path,
    file: &Path,
    mem_mib: u64,
    rate: u64,
    mode: QemuMode,
) -> Result<Result1> {
    let sock = dir.join("qemu-snap.sock");
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(file);
    let fill = mem_mib * 9 / 10;
    let mut child = qemu_command(guest, mem_mib, &sock)
        .args([
            "-append",
            &format!("work=mem mib={fill} secs=inf rate={rate}"),
            "-serial",
            "stdio",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .context("qemu-system-x86_64")?;
    let rx = watch_fill(&mut child);
    let res = (|| -> Result<Result1> {
        rx.recv_timeout(Duration::from_secs(600))
            .context("guest fill under QEMU")?;
        let mut q = qmp(&sock)?;
        // No bandwidth cap (QEMU's default is 128 MiB/s) and ringvm's
        // default downtime target (QEMU's is 300 ms).
        ok(
            &mut q,
            json!({"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": 1u64 << 40, "downtime-limit": 5}}),
        )?;
        qemu_set_mode(&mut q, mode)?;
        ok(
            &mut q,
            json!({"execute": "migrate", "arguments": {"uri": format!("file:{}", file.display())}}),
        )?;
        let s = qemu_wait(&mut q, Instant::now(), Duration::from_millis(2))?;
        let _ = cmd(&mut q, json!({"execute": "quit"}));
        let used = std::fs::metadata(file)
            .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
            .unwrap_or(0);
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
pub fn qemu_restore(
    guest: &Path,
    dir: &Path,
    file: &Path,
    mem_mib: u64,
    mode: QemuMode,
) -> Result<f64> {
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
        ok(
            &mut q,
            json!({"execute": "migrate-incoming", "arguments": {"uri": format!("file:{}", file.display())}}),
        )?;
        qemu_wait(&mut q, t0, Duration::from_millis(1))?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let _ = cmd(&mut q, json!({"execute": "quit"}));
        Ok(ms)
    })();
    reap(child)?;
    res
}
