//! `qmp`: round-trip latency of `query-status` while the guest spins on
//! every vCPU, ringvm vs QEMU on the same guest file.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub struct Latency {
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

fn connect(sock: &Path, deadline: Duration) -> Result<UnixStream> {
    let t0 = Instant::now();
    loop {
        match UnixStream::connect(sock) {
            Ok(s) => return Ok(s),
            Err(e) if t0.elapsed() > deadline => bail!("connect {}: {e}", sock.display()),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// `n` query-status round trips on a fresh connection.
pub fn measure(sock: &Path, n: usize) -> Result<Latency> {
    let s = connect(sock, Duration::from_secs(60))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?; // greeting
    w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")?;
    line.clear();
    r.read_line(&mut line)?;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        w.write_all(b"{\"execute\":\"query-status\"}\n")?;
        loop {
            line.clear();
            if r.read_line(&mut line)? == 0 {
                bail!("connection closed");
            }
            if line.contains("\"return\"") {
                break;
            }
        }
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    let _ = w.write_all(b"{\"execute\":\"quit\"}\n");
    Ok(Latency { p50_us: pct(0.50), p99_us: pct(0.99), max_us: samples[samples.len() - 1] })
}

/// The guest's load: spinning, or random reads on a disk at QD 32.
pub fn workload(disk: Option<&Path>) -> &'static str {
    if disk.is_some() {
        "work=scsi-bench pattern=randread bs=4096 qd=32 secs=100000 mib=0"
    } else {
        "work=spin secs=inf"
    }
}

pub fn spawn_ringvm(bin: &Path, guest: &Path, sock: &Path, cpus: &str, disk: Option<&Path>) -> Result<Child> {
    let mut c = Command::new(bin);
    c.args(["run", "--cpus", cpus, "--memory", "256M", "--cmdline", workload(disk), "--serial", "off", "--kernel"]).arg(guest);
    if let Some(d) = disk {
        c.arg("--disk").arg(format!("path={},cache=none", d.display()));
    }
    c.arg("--qmp").arg(sock).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().context("spawn ringvm")
}

pub fn spawn_qemu(guest: &Path, sock: &Path, cpus: &str, disk: Option<&Path>) -> Result<Child> {
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-accel", "kvm", "-cpu", "host,-arch-capabilities", "-smp", cpus, "-m", "256M", "-kernel"]).arg(guest).args([
        "-append",
        workload(disk),
        "-display",
        "none",
        "-serial",
        "null",
        "-monitor",
        "none",
        "-no-reboot",
    ]);
    if let Some(d) = disk {
        c.args(["-object", "iothread,id=io0", "-device", "virtio-scsi-pci,id=scsi0,iothread=io0,disable-legacy=on"])
            .arg("-drive")
            .arg(format!("file={},if=none,id=d0,format=raw,cache=none,aio=io_uring", d.display()))
            .args(["-device", "scsi-hd,drive=d0,bus=scsi0.0,lun=0"]);
    }
    c.arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn qemu")
}

/// Ends `child` (it was sent `quit`); kills it by PID after 10 s.
pub fn reap(mut child: Child) {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The suite: `n` query-status round trips per run, per guest load, ringvm
/// and QEMU alternating; the median over runs of each run's percentiles.
pub fn suite(c: &crate::Ctx, r: &mut crate::report::Report) -> Result<()> {
    use crate::report::{cell, ratio};
    let n = if c.quick { 200 } else { 2000 };
    let disk = c.scratch()?.join("qmp-disk.dat");
    {
        let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&disk)?;
        f.set_len(256 << 20)?;
    }
    let mut systems = vec!["ringvm"];
    if c.have_qemu {
        systems.push("QEMU");
    }
    r.begin("qmp", (2 * c.reps * systems.len()) as u64);
    for load in ["cpu", "disk"] {
        let d = (load == "disk").then_some(disk.as_path());
        for rep in 0..c.reps {
            if crate::stopping() {
                break;
            }
            for sys in crate::interleaved(&systems, rep) {
                r.step(format!("{sys}, {load} load, repetition {}/{}", rep + 1, c.reps));
                let sock = c.dir.join(format!("qmp-{sys}-{load}-{rep}.sock"));
                let child = if sys == "ringvm" { spawn_ringvm(&c.bin, &c.guest, &sock, "2", d)? } else { spawn_qemu(&c.guest, &sock, "2", d)? };
                if d.is_some() {
                    std::thread::sleep(Duration::from_millis(1500)); // let the I/O start
                }
                let l = measure(&sock, n);
                reap(child);
                let l = l?;
                r.sample(load, sys, "p50", "us", l.p50_us);
                r.sample(load, sys, "p99", "us", l.p99_us);
                r.sample(load, sys, "max", "us", l.max_us);
            }
        }
    }
    let _ = std::fs::remove_file(&disk);
    let mut rows = vec![];
    for load in ["cpu", "disk"] {
        for sys in ["ringvm", "QEMU"] {
            rows.push(vec![sys.into(), load.into(), cell(r.stat(load, sys, "p50"), 1), cell(r.stat(load, sys, "p99"), 1), cell(r.stat(load, sys, "max"), 0)]);
        }
        let s = |m: &str| (r.stat(load, "ringvm", m), r.stat(load, "QEMU", m));
        let (p50, p99) = (s("p50"), s("p99"));
        rows.push(vec!["ratio ringvm/QEMU".into(), load.into(), ratio(p50.0, p50.1), ratio(p99.0, p99.1), String::new()]);
        r.headline(&format!("qmp: query-status p99, guest {load} load"), ("us", p99.0), ("QEMU us", p99.1), true);
    }
    r.table(
        "qmp: query-status round trips",
        &format!("{n} round trips per run on one connection while the test guest spins on 2 vCPUs (`work=spin`) or reads its disk (`scsi-bench randread QD32`, cache=none); each run's p50/p99/max, then median (min..max) over the runs."),
        &["system", "guest load", "p50 us", "p99 us", "max us"],
        &rows,
    );
    r.end();
    Ok(())
}
