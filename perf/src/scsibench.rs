//! `scsi`: the test guest's scsi-bench in ringvm and in QEMU (virtio-scsi-pci,
//! iothread, aio=io_uring, cache=none), and fio on the host, on one file.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

#[derive(Clone, Copy)]
pub struct Job {
    pub pattern: &'static str,
    pub bs: u64,
    pub qd: u32,
}

impl Job {
    pub fn name(&self) -> String {
        let bs = if self.bs >= 1 << 20 { format!("{}M", self.bs >> 20) } else { format!("{}k", self.bs >> 10) };
        let what = match self.pattern {
            "randread" => "randread",
            "read" => "seq read",
            _ => "seq write",
        };
        format!("{bs} {what} QD{}", self.qd)
    }
}

/// 4 KiB random reads over a range of queue depths (the IOPS vs QD curve),
/// then 1 MiB sequential reads and writes.
pub fn jobs(quick: bool) -> Vec<Job> {
    let qds: &[u32] = if quick { &[1, 32] } else { &[1, 4, 16, 32] };
    let mut v: Vec<Job> = qds.iter().map(|&qd| Job { pattern: "randread", bs: 4096, qd }).collect();
    v.push(Job { pattern: "read", bs: 1 << 20, qd: 8 });
    v.push(Job { pattern: "write", bs: 1 << 20, qd: 8 });
    v
}

fn cmdline(job: Job, secs: u64) -> String {
    format!("work=scsi-bench pattern={} bs={} qd={} secs={secs} mib=0", job.pattern, job.bs, job.qd)
}

/// Bytes per second the guest reported.
/// The guest's throughput, in bytes/s; it must have driven `queues` queues.
fn parse(out: &str, queues: u32) -> Result<f64> {
    let line = out.lines().find(|l| l.starts_with("ringvm-guest: scsi-bench ")).with_context(|| format!("no scsi-bench line in:\n{out}"))?;
    if !line.contains(&format!(" queues={queues} ")) {
        bail!("the guest did not drive {queues} queue(s) (fewer vCPUs or queues came up): {line}");
    }
    let kbps: f64 = line.split("kbps=").nth(1).and_then(|v| v.trim().parse().ok()).context("kbps")?;
    Ok(kbps * 1000.0)
}

fn run(mut cmd: Command, deadline: Duration) -> Result<String> {
    let child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
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
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        // Whatever the program said about it, for the notes.
        text.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    Ok(text)
}

pub fn ringvm(bin: &Path, guest: &Path, file: &Path, job: Job, queues: u32, secs: u64) -> Result<f64> {
    let mut c = Command::new(bin);
    c.args(["run", "--cpus", &queues.to_string(), "--memory", "512M", "--iothreads", &queues.to_string(), "--kernel"])
        .arg(guest)
        .args(["--cmdline", &cmdline(job, secs)])
        .arg("--disk")
        .arg(format!("path={},cache=none", file.display()));
    // RINGVM_PERF_THP=0: guest RAM in small pages (ringvm --no-thp).
    if std::env::var("RINGVM_PERF_THP").is_ok_and(|v| v == "0") {
        c.arg("--no-thp");
    }
    parse(&run(c, Duration::from_secs(secs + 120))?, queues)
}

pub fn qemu(guest: &Path, file: &Path, job: Job, queues: u32, secs: u64) -> Result<f64> {
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-accel", "kvm", "-cpu", "host,-arch-capabilities", "-smp", &queues.to_string(), "-m", "512M", "-kernel"])
        .arg(guest)
        .args(["-append", &cmdline(job, secs), "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot"])
        .args(["-device", "isa-debug-exit,iobase=0x501,iosize=1"]);
    // One iothread per request queue, as ringvm runs them: QEMU 10's
    // iothread-vq-mapping (JSON -device syntax) when there are several.
    for i in 0..queues {
        c.args(["-object", &format!("iothread,id=io{i}")]);
    }
    if queues == 1 {
        c.args(["-device", "virtio-scsi-pci,id=scsi0,iothread=io0,disable-legacy=on,num_queues=1"]);
    } else {
        let map: Vec<serde_json::Value> = (0..queues).map(|i| serde_json::json!({"iothread": format!("io{i}")})).collect();
        let dev = serde_json::json!({"driver": "virtio-scsi-pci", "id": "scsi0", "disable-legacy": "on", "num_queues": queues, "iothread-vq-mapping": map});
        c.args(["-device", &dev.to_string()]);
    }
    c.arg("-drive")
        .arg(format!("file={},if=none,id=d0,format=raw,cache=none,aio=io_uring", file.display()))
        // JSON too: a legacy -device cannot name the bus of a JSON one.
        .args(["-device", r#"{"driver":"scsi-hd","drive":"d0","bus":"scsi0.0","lun":0}"#]);
    parse(&run(c, Duration::from_secs(secs + 120))?, queues)
}

pub fn fio(file: &Path, job: Job, jobs: u32, secs: u64) -> Result<f64> {
    let rw = match job.pattern {
        "randread" => "randread",
        "read" => "read",
        _ => "write",
    };
    let huge = crate::fio::HugeBuffers::reserve(job.bs, job.qd, jobs);
    let out = Command::new("fio")
        .arg(crate::fio::HugeBuffers::iomem(&huge))
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

/// The suite: every job with one request queue (ringvm, QEMU, host fio in
/// rotating order), and the main ones again with two queues, two vCPUs and
/// two iothreads (fio with two jobs).
pub fn suite(c: &crate::Ctx, r: &mut crate::report::Report) -> Result<()> {
    use crate::plot::{Panel, Series};
    use crate::report::{cell, ratio};
    let (size, secs) = if c.quick { (256u64 << 20, 1) } else { (2u64 << 30, 3) };
    let file = c.scratch()?.join("ring-bench.dat");
    let jobs = jobs(c.quick);
    let mut runs: Vec<(u32, Job)> = jobs.iter().map(|j| (1, *j)).collect();
    runs.extend(jobs.iter().filter(|j| j.qd == 1 || j.qd == 32 || j.bs > 4096).map(|j| (2, *j)));
    let case = |q: u32, j: &Job| if q == 1 { j.name() } else { format!("{}, 2 queues", j.name()) };
    let systems = |_q: u32| {
        let mut v = vec!["ringvm"];
        if c.have_qemu {
            v.push("QEMU");
        }
        if c.have_fio {
            v.push("host fio");
        }
        v
    };
    r.begin("scsi", runs.iter().map(|(q, _)| c.reps * systems(*q).len()).sum::<usize>() as u64 + 1);
    r.step(format!("preparing {} MiB file (and reading it once)", size >> 20));
    if c.have_fio {
        crate::ringbench::prepare_file(&file, size)?;
    } else {
        let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&file)?;
        f.set_len(size)?;
    }
    for (q, job) in &runs {
        let name = case(*q, job);
        let sys_list = systems(*q);
        for rep in 0..c.reps {
            if crate::stopping() {
                break;
            }
            for sys in crate::interleaved(&sys_list, rep) {
                r.step(format!("{name}: {sys}, repetition {}/{}", rep + 1, c.reps));
                let bps = match sys {
                    "ringvm" => ringvm(&c.bin, &c.guest, &file, *job, *q, secs)?,
                    "QEMU" => match qemu(&c.guest, &file, *job, *q, secs) {
                        Ok(v) => v,
                        Err(e) => {
                            r.note(format!("QEMU {name}: {e:#}"));
                            continue;
                        }
                    },
                    _ => fio(&file, *job, *q, secs)?,
                };
                r.sample(&name, sys, "throughput", "MB/s", bps / 1e6);
                r.sample(&name, sys, "iops", "IO/s", bps / job.bs as f64);
            }
        }
    }
    let mut rows = vec![];
    for (q, job) in &runs {
        let n = case(*q, job);
        let s = |sys: &str| r.stat(&n, sys, "throughput");
        let (a, b, f) = (s("ringvm"), s("QEMU"), s("host fio"));
        let iops = r.stat(&n, "ringvm", "iops").map_or(String::new(), |s| format!("{:.0}", s.median));
        rows.push(vec![n.clone(), cell(a, 1), iops, cell(b, 1), cell(f, 1), ratio(a, f), ratio(a, b)]);
        if *q == 1 && (job.qd == 1 || job.qd == 32 || job.bs > 4096) {
            r.headline(&format!("scsi: {n} vs host fio"), ("MB/s", a), ("fio MB/s", f), false);
            r.headline(&format!("scsi: {n} vs QEMU"), ("MB/s", a), ("QEMU MB/s", b), false);
        }
    }
    r.table(
        "scsi: virtio-scsi, the test guest's scsi-bench",
        &format!("The guest's own polling virtio-scsi driver in ringvm (one iothread per queue, io_uring) and QEMU 10 (`virtio-scsi-pci,iothread=io0`, `aio=io_uring`, `cache=none`), and fio (io_uring, O_DIRECT, one job per queue, huge-page buffers `--iomem=shmhuge` as ringvm's THP-backed guest RAM has) on the host, all on the same {} MiB file in {}; {secs} s runs. The 2-queue rows run 2 vCPUs and 2 iothreads (QEMU: `iothread-vq-mapping`, one iothread per queue) on this machine's 2 cores.", size >> 20, file.display()),
        &["job", "ringvm MB/s", "ringvm IOPS", "QEMU MB/s", "host fio MB/s", "ringvm/fio", "ringvm/QEMU"],
        &rows,
    );
    let series = |sys: &str| Series {
        name: sys.to_string(),
        points: jobs.iter().filter(|j| j.bs == 4096).filter_map(|j| r.stat(&j.name(), sys, "iops").map(|s| (j.qd as f64, s.median, s.min, s.max))).collect(),
    };
    let panel = Panel { title: "4 KiB random reads, 1 queue".into(), series: vec![series("ringvm"), series("QEMU"), series("host fio")] };
    r.plot("iops-vs-queue-depth.png", "virtio-scsi IOPS vs queue depth", "queue depth", "IOPS", true, vec![panel]);
    r.end();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn parses_the_guest_bench_line() {
        let out = "ringvm-guest: start cpus=2\nringvm-guest: scsi-bench pattern=randread bs=4096 qd=32 queues=2 ops=1000 ms=1000 iops=1000 kbps=4096\nringvm-guest: RESULT PASS\n";
        assert_eq!(parse(out, 2).unwrap(), 4_096_000.0);
        // The guest drove another queue count than asked.
        assert!(parse(out, 1).unwrap_err().to_string().contains("did not drive 1 queue"));
        // No result line, or a result line without kbps.
        assert!(parse("ringvm-guest: start\n", 1).is_err());
        assert!(parse("ringvm-guest: scsi-bench pattern=read queues=1 ops=3 \n", 1).is_err());
        // CRLF line ends (the serial console's).
        assert_eq!(parse("ringvm-guest: scsi-bench queues=1 kbps=8\r\n", 1).unwrap(), 8000.0);
    }
}
