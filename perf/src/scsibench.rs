//! `scsi`: the test guest's scsi-bench in ringvm and in QEMU (virtio-scsi-pci,
//! iothread, aio=io_uring, cache=none), and fio on the host, on one file.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

#[derive(Clone, Copy)]
pub struct Job {
    pub name: &'static str,
    pub pattern: &'static str,
    pub bs: u64,
    pub qd: u32,
}

pub const JOBS: &[Job] = &[
    Job {
        name: "4k randread QD1",
        pattern: "randread",
        bs: 4096,
        qd: 1,
    },
    Job {
        name: "4k randread QD32",
        pattern: "randread",
        bs: 4096,
        qd: 32,
    },
    Job {
        name: "1M seq read QD8",
        pattern: "read",
        bs: 1 << 20,
        qd: 8,
    },
    Job {
        name: "1M seq write QD8",
        pattern: "write",
        bs: 1 << 20,
        qd: 8,
    },
];

fn cmdline(job: Job, secs: u64) -> String {
    format!(
        "work=scsi-bench pattern={} bs={} qd={} secs={secs} mib=0",
        job.pattern, job.bs, job.qd
    )
}

/// Bytes per second the guest reported.
fn parse(out: &str) -> Result<f64> {
    let line = out
        .lines()
        .find(|l| l.starts_with("ringvm-guest: scsi-bench "))
        .with_context(|| format!("no scsi-bench line in:\n{out}"))?;
    let kbps: f64 = line
        .split("kbps=")
        .nth(1)
        .and_then(|v| v.trim().parse().ok())
        .context("kbps")?;
    Ok(kbps * 1000.0)
}

fn run(mut cmd: Command, deadline: Duration) -> Result<String> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let waiter = std::thread::spawn(move || child.wait_with_output());
    let t0 = std::time::Instant::now();
    while !waiter.is_finished() {
        if t0.elapsed() > deadline {
            // SAFETY: killing our own child by PID.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            bail!("deadline: {:?}", cmd.get_program());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = waiter.join().unwrap()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn ringvm(
    bin: &Path,
    guest: &Path,
    file: &Path,
    job: Job,
    queues: u32,
    secs: u64,
) -> Result<f64> {
    let mut c = Command::new(bin);
    c.args([
        "run",
        "--cpus",
        &queues.to_string(),
        "--memory",
        "512M",
        "--iothreads",
        &queues.to_string(),
        "--kernel",
    ])
    .arg(guest)
    .args(["--cmdline", &cmdline(job, secs)])
    .arg("--disk")
    .arg(format!("path={},cache=none", file.display()));
    // RINGVM_PERF_THP=0: guest RAM in small pages (ringvm --no-thp).
    if std::env::var("RINGVM_PERF_THP").is_ok_and(|v| v == "0") {
        c.arg("--no-thp");
    }
    parse(&run(c, Duration::from_secs(secs + 120))?)
}

pub fn qemu(guest: &Path, file: &Path, job: Job, queues: u32, secs: u64) -> Result<f64> {
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-accel",
        "kvm",
        "-cpu",
        "host,-arch-capabilities",
        "-smp",
        &queues.to_string(),
        "-m",
        "512M",
        "-kernel",
    ])
    .arg(guest)
    .args([
        "-append",
        &cmdline(job, secs),
        "-display",
        "none",
        "-serial",
        "stdio",
        "-monitor",
        "none",
        "-no-reboot",
    ])
    .args([
        "-device",
        "isa-debug-exit,iobase=0x501,iosize=1",
        "-object",
        "iothread,id=io0",
    ])
    .args([
        "-device",
        &format!("virtio-scsi-pci,id=scsi0,iothread=io0,disable-legacy=on,num_queues={queues}"),
    ])
    .arg("-drive")
    .arg(format!(
        "file={},if=none,id=d0,format=raw,cache=none,aio=io_uring",
        file.display()
    ))
    .args(["-device", "scsi-hd,drive=d0,bus=scsi0.0,lun=0"]);
    parse(&run(c, Duration::from_secs(secs + 120))?)
}

pub fn fio(file: &Path, job: Job, jobs: u32, secs: u64) -> Result<f64> {
    let rw = match job.pattern {
        "randread" => "randread",
        "read" => "read",
        _ => "write",
    };
    let out = Command::new("fio")
        .args([
            "--name=job",
            "--ioengine=io_uring",
            "--direct=1",
            "--thread",
            "--output-format=json",
            "--time_based",
            "--norandommap",
            "--randrepeat=0",
            "--group_reporting",
        ])
        .arg(format!("--filename={}", file.display()))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={}", job.bs))
        .arg(format!("--iodepth={}", job.qd))
        .arg(format!("--numjobs={jobs}"))
        .arg(format!("--runtime={secs}"))
        .output()
        .context("fio")?;
    if !out.status.success() {
        bail!("fio: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let side = if rw == "write" { "write" } else { "read" };
    v["jobs"][0][side]["bw_bytes"].as_f64().context("bw_bytes")
}
