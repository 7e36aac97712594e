//! `boot`: time to the test guest's first serial line and to the end of its
//! `mem` workload, and peak RSS of a minimal boot, ringvm vs QEMU on the
//! same guest file, interleaved (A B / B A).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::report::{cell, ratio, Report};
use crate::Ctx;

struct Sample {
    first_line: Duration,
    total: Duration,
    maxrss_kib: i64,
    status: i32,
}

/// Runs `cmd`, timing the first serial line and the exit; RSS from wait4.
fn measure(mut cmd: Command, deadline: Duration) -> Result<Sample> {
    let t0 = Instant::now();
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
    let pid = child.id() as libc::pid_t;
    let out = child.stdout.take().context("stdout")?;
    let reader = std::thread::spawn(move || {
        let mut first = None;
        for line in BufReader::new(out).lines().map_while(|l| l.ok()) {
            if first.is_none() && line.contains("ringvm-guest: start") {
                first = Some(Instant::now());
            }
        }
        first
    });
    let mut status = 0;
    // SAFETY: rusage is plain data, zeroed is valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: waiting on our own child with valid out-pointers.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) };
        if r == pid {
            break;
        }
        if t0.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("deadline: {:?} did not finish in {deadline:?}", cmd.get_program());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let total = t0.elapsed();
    let first = reader.join().unwrap_or(None).context("no 'ringvm-guest: start' line")? - t0;
    Ok(Sample { first_line: first, total, maxrss_kib: ru.ru_maxrss, status: libc::WEXITSTATUS(status) })
}

fn ringvm_cmd(bin: &Path, guest: &Path, mem: &str, cmdline: &str) -> Command {
    let mut c = Command::new(bin);
    c.args(["run", "--cpus", "1", "--memory", mem, "--no-reboot", "--kernel"]).arg(guest).args(["--cmdline", cmdline]);
    c
}

fn qemu_cmd(guest: &Path, mem: &str, cmdline: &str) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    // -arch-capabilities: some KVMs (kvm-pvm) refuse MSR 0x10a.
    c.args(["-accel", "kvm", "-cpu", "host,-arch-capabilities", "-smp", "1", "-m", mem, "-kernel"])
        .arg(guest)
        .args(["-append", cmdline, "-nographic", "-serial", "stdio", "-monitor", "none", "-no-reboot"])
        .args(["-device", "isa-debug-exit,iobase=0x501,iosize=1"]);
    c
}

pub fn suite(c: &Ctx, r: &mut Report) -> Result<()> {
    let (mem, mib) = if c.quick { ("512M", 256) } else { ("1280M", 1024) };
    let work = format!("work=mem mib={mib} secs=0");
    let mut systems = vec!["ringvm"];
    if c.have_qemu {
        systems.push("QEMU");
    }
    r.begin("boot", (c.reps * systems.len()) as u64);
    for rep in 0..c.reps {
        if crate::stopping() {
            break;
        }
        for sys in crate::interleaved(&systems, rep) {
            r.step(format!("{sys}, repetition {}/{}", rep + 1, c.reps));
            let (mem_cmd, hello_cmd) = if sys == "ringvm" {
                (ringvm_cmd(&c.bin, &c.guest, mem, &work), ringvm_cmd(&c.bin, &c.guest, "256M", "work=hello"))
            } else {
                (qemu_cmd(&c.guest, mem, &work), qemu_cmd(&c.guest, "256M", "work=hello"))
            };
            let s = measure(mem_cmd, Duration::from_secs(300))?;
            let want = if sys == "QEMU" { 1 } else { 0 }; // QEMU exits (code << 1) | 1
            if s.status != want {
                bail!("{sys}: guest failed (exit status {})", s.status);
            }
            let h = measure(hello_cmd, Duration::from_secs(120))?;
            r.sample("mem", sys, "first_serial_line", "ms", s.first_line.as_secs_f64() * 1e3);
            r.sample("mem", sys, "end_of_mem", "ms", s.total.as_secs_f64() * 1e3);
            r.sample("hello", sys, "peak_rss", "MiB", h.maxrss_kib as f64 / 1024.0);
        }
    }
    let mut rows = vec![];
    for sys in ["ringvm", "QEMU"] {
        rows.push(vec![
            sys.to_string(),
            cell(r.stat("mem", sys, "first_serial_line"), 1),
            cell(r.stat("mem", sys, "end_of_mem"), 0),
            cell(r.stat("hello", sys, "peak_rss"), 1),
        ]);
    }
    let st = |r: &Report, case: &str, m: &str| (r.stat(case, "ringvm", m), r.stat(case, "QEMU", m));
    let (f, e, m) = (st(r, "mem", "first_serial_line"), st(r, "mem", "end_of_mem"), st(r, "hello", "peak_rss"));
    rows.push(vec!["ratio ringvm/QEMU".into(), ratio(f.0, f.1), ratio(e.0, e.1), ratio(m.0, m.1)]);
    r.table(
        "boot",
        &format!("The test guest, 1 vCPU, --memory {mem}, `{work}`; peak RSS of `work=hello` in a 256M guest. QEMU: `-accel kvm -cpu host` with the same guest.elf (PVH), SeaBIOS and its option ROM included."),
        &["system", "first serial line ms", "end of mem ms", "peak RSS MiB"],
        &rows,
    );
    r.headline("boot: first serial line", ("ms", f.0), ("QEMU ms", f.1), true);
    r.headline(&format!("boot: end of {mib} MiB mem workload"), ("ms", e.0), ("QEMU ms", e.1), true);
    r.headline("boot: peak RSS, 256M guest", ("MiB", m.0), ("QEMU MiB", m.1), true);
    r.end();
    Ok(())
}
