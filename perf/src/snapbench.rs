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

/// Boots a `mem_mib` guest filling `fill_pct`% of it, dirtying at `rate`
/// MiB/s, snapshots it to `file`.
pub fn ringvm(bin: &Path, guest: &Path, dir: &Path, file: &Path, mem_mib: u64, rate: u64, fill_pct: u64) -> Result<Result1> {
    let sock = dir.join("snap.sock");
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(file);
    let fill = mem_mib * fill_pct / 100;
    let mut child = Command::new(bin)
        .args(["run", "--cpus", "1", "--memory", &format!("{mem_mib}M"), "--kernel"])
        .arg(guest)
        .args(["--cmdline", &format!("work=mem mib={fill} secs=inf rate={rate}"), "--qmp"])
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(|l| l.ok()) {
            if l.contains("fill done") {
                let _ = tx.send(());
            }
        }
    });
    let res = (|| -> Result<Result1> {
        rx.recv_timeout(Duration::from_secs(600)).context("guest fill")?;
        let mut q = qmp(&sock)?;
        let r = cmd(&mut q, json!({"execute": "savevm-start", "arguments": {"statefile": file}}))?;
        if r.get("return").is_none() {
            bail!("savevm-start: {r}");
        }
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
        let used = std::fs::metadata(file).map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512).unwrap_or(0);
        Ok(Result1 {
            total_ms: s["total-time"].as_f64().unwrap_or(0.0),
            bytes: s["bytes"].as_f64().unwrap_or(0.0),
            downtime_ms: s["downtime"].as_f64().unwrap_or(0.0),
            iterations: s["iterations"].as_u64().unwrap_or(0),
            file_mib: used as f64 / (1 << 20) as f64,
        })
    })();
    let t0 = Instant::now();
    while child.try_wait()?.is_none() {
        if t0.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    res
}

/// Restores `file` with -S and measures the time until the VM is paused
/// with all state applied (QMP query-status leaves inmigrate); also the
/// p99 of back-to-back query-status latencies during the load.
pub fn restore(bin: &Path, dir: &Path, file: &Path) -> Result<(f64, f64)> {
    let sock = dir.join("restore.sock");
    let _ = std::fs::remove_file(&sock);
    let t0 = Instant::now();
    let mut child = Command::new(bin)
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
    let t1 = Instant::now();
    while child.try_wait()?.is_none() {
        if t1.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    res
}

/// fio reading `bytes` sequentially from `file` (1 MiB, QD32, O_DIRECT):
/// milliseconds.
pub fn fio_read_ms(file: &Path, bytes: u64) -> Result<f64> {
    let run = |direct: u32| {
        Command::new("fio")
            .args(["--name=r", "--ioengine=io_uring", "--rw=read", "--bs=1M", "--iodepth=32", "--output-format=json"])
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
    let bw = v["jobs"][0]["read"]["bw_bytes"].as_f64().context("bw_bytes")?;
    Ok(bytes as f64 / bw * 1e3)
}

/// fio writing `bytes` sequentially (1 MiB, QD 32, O_DIRECT where the
/// filesystem takes it) to a file in `dir`; returns MB/s.
pub fn fio(dir: &Path, bytes: u64) -> Result<f64> {
    let file = dir.join("fio-snap.dat");
    let mib = (bytes >> 20).max(1);
    let run = |direct: u32| {
        Command::new("fio")
            .args(["--name=w", "--ioengine=io_uring", "--rw=write", "--bs=1M", "--iodepth=32", "--output-format=json", "--end_fsync=1"])
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
pub fn qemu(guest: &Path, dir: &Path, file: &Path, mem_mib: u64, rate: u64, mode: QemuMode) -> Result<Result1> {
    let sock = dir.join("qemu-snap.sock");
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(file);
    let fill = mem_mib * 9 / 10;
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "kvm", "-cpu", "host,-arch-capabilities", "-smp", "1", "-m", &format!("{mem_mib}M"), "-kernel"])
        .arg(guest)
        .args(["-append", &format!("work=mem mib={fill} secs=inf rate={rate}"), "-nographic", "-serial", "stdio", "-monitor", "none"])
        .args(["-device", "isa-debug-exit,iobase=0x501,iosize=1", "-qmp"])
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("qemu-system-x86_64")?;
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(|l| l.ok()) {
            if l.contains("fill done") {
                let _ = tx.send(());
            }
        }
    });
    let res = (|| -> Result<Result1> {
        rx.recv_timeout(Duration::from_secs(600)).context("guest fill under QEMU")?;
        let mut q = qmp(&sock)?;
        // No bandwidth cap (QEMU's default is 128 MiB/s) and ringvm's
        // default downtime target (QEMU's is 300 ms).
        let r = cmd(&mut q, json!({"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": 1u64 << 40, "downtime-limit": 5}}))?;
        if r.get("return").is_none() {
            bail!("migrate-set-parameters: {r}");
        }
        if mode == QemuMode::MappedRam {
            let caps = json!([{"capability": "mapped-ram", "state": true}, {"capability": "multifd", "state": true}]);
            let r = cmd(&mut q, json!({"execute": "migrate-set-capabilities", "arguments": {"capabilities": caps}}))?;
            if r.get("return").is_none() {
                bail!("migrate-set-capabilities: {r}");
            }
            let r = cmd(&mut q, json!({"execute": "migrate-set-parameters", "arguments": {"multifd-channels": 4, "direct-io": true}}))?;
            if r.get("return").is_none() {
                bail!("migrate-set-parameters: {r}");
            }
        }
        let r = cmd(&mut q, json!({"execute": "migrate", "arguments": {"uri": format!("file:{}", file.display())}}))?;
        if r.get("return").is_none() {
            bail!("migrate: {r}");
        }
        let t0 = Instant::now();
        let s = loop {
            let s = cmd(&mut q, json!({"execute": "query-migrate"}))?["return"].clone();
            match s["status"].as_str() {
                Some("completed") => break s,
                Some("failed") | Some("cancelled") => bail!("QEMU migrate: {s}"),
                _ => {}
            }
            if t0.elapsed() > Duration::from_secs(600) {
                bail!("QEMU migrate did not finish");
            }
            std::thread::sleep(Duration::from_millis(2));
        };
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
    let t0 = Instant::now();
    while child.try_wait()?.is_none() {
        if t0.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    res
}

/// QEMU restoring `file` (saved by [`qemu`] in `mode`) with `-incoming
/// defer` + `migrate-incoming`, paused (-S): milliseconds from process
/// start until the incoming migration completed.
pub fn qemu_restore(guest: &Path, dir: &Path, file: &Path, mem_mib: u64, mode: QemuMode) -> Result<f64> {
    let sock = dir.join("qemu-in.sock");
    let _ = std::fs::remove_file(&sock);
    let t0 = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "kvm", "-cpu", "host,-arch-capabilities", "-smp", "1", "-m", &format!("{mem_mib}M"), "-kernel"])
        .arg(guest)
        .args(["-nographic", "-serial", "null", "-monitor", "none", "-S", "-incoming", "defer"])
        .args(["-device", "isa-debug-exit,iobase=0x501,iosize=1", "-qmp"])
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("qemu-system-x86_64")?;
    let res = (|| -> Result<f64> {
        let mut q = qmp(&sock)?;
        if mode == QemuMode::MappedRam {
            let caps = json!([{"capability": "mapped-ram", "state": true}, {"capability": "multifd", "state": true}]);
            let r = cmd(&mut q, json!({"execute": "migrate-set-capabilities", "arguments": {"capabilities": caps}}))?;
            if r.get("return").is_none() {
                bail!("migrate-set-capabilities: {r}");
            }
            let r = cmd(&mut q, json!({"execute": "migrate-set-parameters", "arguments": {"multifd-channels": 4, "direct-io": true}}))?;
            if r.get("return").is_none() {
                bail!("migrate-set-parameters: {r}");
            }
        }
        let r = cmd(&mut q, json!({"execute": "migrate-incoming", "arguments": {"uri": format!("file:{}", file.display())}}))?;
        if r.get("return").is_none() {
            bail!("migrate-incoming: {r}");
        }
        loop {
            let s = cmd(&mut q, json!({"execute": "query-migrate"}))?["return"].clone();
            match s["status"].as_str() {
                Some("completed") => break,
                Some("failed") | Some("cancelled") => bail!("QEMU incoming: {s}"),
                _ => {}
            }
            if t0.elapsed() > Duration::from_secs(600) {
                bail!("QEMU restore did not finish");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let _ = cmd(&mut q, json!({"execute": "quit"}));
        Ok(ms)
    })();
    let t0 = Instant::now();
    while child.try_wait()?.is_none() {
        if t0.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    res
}
