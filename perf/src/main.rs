//! ringvm benchmark harness. `boot`: time to the test guest's first serial
//! line and to the end of `mem` (1 GiB), and peak RSS of a minimal boot,
//! ringvm vs QEMU on the same guest file, interleaved (A B A B), median of N.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod nfsbench;
mod qmpbench;
mod ringbench;
mod scsibench;
mod snapbench;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    suite: Suite,
    /// Fewer repetitions and a smaller guest (smoke run).
    #[arg(long, global = true)]
    quick: bool,
}

#[derive(Subcommand)]
enum Suite {
    /// Boot latency and memory overhead.
    Boot,
    /// The ring crate vs fio (io_uring engine) on one file: 4 KiB randread
    /// QD32, 1 MiB sequential write and read, O_DIRECT.
    Ring,
    /// QMP query-status round-trip latency while the guest spins.
    Qmp,
    /// virtio-scsi: the guest's scsi-bench in ringvm and QEMU, and host fio.
    Scsi,
    /// Live snapshot save: guest sizes x dirty rates x targets, vs fio.
    Snapshot,
    /// Snapshot save and restore to nfs:// (nfs-ganesha in a network
    /// namespace) vs nfs-cp and the local disk, with and without latency.
    Nfs,
    /// Every suite.
    All,
}

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
    let out = child.stdout.take().unwrap();
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
    let first = reader.join().unwrap().context("no 'ringvm-guest: start' line")? - t0;
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

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn boot(quick: bool) -> Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin = root.join("target/release/ringvm");
    if !bin.exists() {
        bail!("build ringvm first: cargo build --release");
    }
    let dir = std::env::temp_dir().join(format!("ringvm-perf-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let guest = dir.join("guest.elf");
    let st = Command::new(&bin).args(["guest-image", "--out"]).arg(&guest).status()?;
    if !st.success() {
        bail!("ringvm guest-image failed");
    }
    let have_qemu = have("qemu-system-x86_64");
    if !have_qemu {
        println!("QEMU: unavailable (scripts/peers.sh installs it) -- QEMU columns skipped");
    }
    let reps = if quick { 2 } else { 5 };
    let (mem, mib) = if quick { ("512M", 256) } else { ("1280M", 1024) };
    let work = format!("work=mem mib={mib} secs=0");
    let mut rows: Vec<(&str, Vec<f64>, Vec<f64>, Vec<f64>)> = vec![("ringvm", vec![], vec![], vec![]), ("qemu", vec![], vec![], vec![])];
    for rep in 0..reps {
        for (i, sys) in ["ringvm", "qemu"].into_iter().enumerate() {
            if sys == "qemu" && !have_qemu {
                continue;
            }
            let (mem_cmd, hello_cmd) = if sys == "ringvm" {
                (ringvm_cmd(&bin, &guest, mem, &work), ringvm_cmd(&bin, &guest, "256M", "work=hello"))
            } else {
                (qemu_cmd(&guest, mem, &work), qemu_cmd(&guest, "256M", "work=hello"))
            };
            let s = measure(mem_cmd, Duration::from_secs(300))?;
            let want = if sys == "qemu" { 1 } else { 0 }; // QEMU exits (code << 1) | 1
            if s.status != want {
                bail!("{sys}: guest failed (status {})", s.status);
            }
            let h = measure(hello_cmd, Duration::from_secs(120))?;
            eprintln!("rep {rep} {sys}: first line {:.1} ms, mem end {:.1} ms, hello RSS {} MiB", s.first_line.as_secs_f64() * 1e3, s.total.as_secs_f64() * 1e3, h.maxrss_kib / 1024);
            rows[i].1.push(s.first_line.as_secs_f64() * 1e3);
            rows[i].2.push(s.total.as_secs_f64() * 1e3);
            rows[i].3.push(h.maxrss_kib as f64 / 1024.0);
        }
    }
    println!("\n## boot: test guest, 1 vCPU, mem={mem}, work=mem mib={mib}; median of {reps} (min..max)\n");
    println!("| system | first serial line (ms) | end of mem (ms) | peak RSS, work=hello, 256M guest (MiB) |");
    println!("| --- | --- | --- | --- |");
    let mut meds = vec![];
    for (name, a, b, c) in &rows {
        if a.is_empty() {
            continue;
        }
        let (a, b, c) = (median(a.clone()), median(b.clone()), median(c.clone()));
        println!("| {name} | {:.1} ({:.1}..{:.1}) | {:.0} ({:.0}..{:.0}) | {:.1} ({:.1}..{:.1}) |", a.0, a.1, a.2, b.0, b.1, b.2, c.0, c.1, c.2);
        meds.push((a.0, b.0, c.0));
    }
    if meds.len() == 2 {
        println!("\nratios ringvm/qemu: first line {:.3}, end of mem {:.3}, RSS {:.3}", meds[0].0 / meds[1].0, meds[0].1 / meds[1].1, meds[0].2 / meds[1].2);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn have(cmd: &str) -> bool {
    Command::new(cmd).arg("--version").output().map(|o| o.status.success()).unwrap_or(false)
}

/// Scratch space for benchmark files, on the project's filesystem.
fn scratch_dir() -> Result<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/perf-scratch");
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn ring(quick: bool) -> Result<()> {
    if !have("fio") {
        println!("\n## ring: SKIPPED -- fio unavailable (scripts/peers.sh installs it)");
        return Ok(());
    }
    let (size, secs, reps) = if quick { (256u64 << 20, 1.0, 1) } else { (2u64 << 30, 5.0, 5) };
    let path = scratch_dir()?.join("ring-bench.dat");
    ringbench::prepare_file(&path, size)?;
    println!("\n## ring: {} on {} ({} MiB file, O_DIRECT, fixed buffers + registered file on both sides); {secs} s runs, median of {reps} (min..max), interleaved A B / B A\n", "ringvm-ring vs fio --ioengine=io_uring", path.display(), size >> 20);
    println!("| job | ringvm-ring MB/s | fio MB/s | ratio ring/fio |");
    println!("| --- | --- | --- | --- |");
    let only = std::env::var("RINGVM_PERF_JOB").ok();
    for job in ringbench::JOBS.iter().filter(|j| only.as_deref().is_none_or(|o| j.name.contains(o))) {
        let (mut a, mut b) = (vec![], vec![]);
        for rep in 0..reps {
            // A B, then B A: neither side always runs on a warmer cache.
            if std::env::var("RINGVM_PERF_SIDE").as_deref() == Ok("ring") {
                let v = ringbench::run_ring(&path, size, *job, secs)? / 1e6;
                println!("ring {}: {v:.1} MB/s", job.name);
                continue;
            }
            if rep % 2 == 0 {
                a.push(ringbench::run_ring(&path, size, *job, secs)? / 1e6);
                b.push(ringbench::run_fio(&path, size, *job, secs)? / 1e6);
            } else {
                b.push(ringbench::run_fio(&path, size, *job, secs)? / 1e6);
                a.push(ringbench::run_ring(&path, size, *job, secs)? / 1e6);
            }
        }
        if b.is_empty() || a.is_empty() {
            continue;
        }
        let (ma, mb) = (median(a), median(b));
        let iops = |mbs: f64| mbs * 1e6 / job.bs as f64;
        println!(
            "| {} | {:.1} ({:.1}..{:.1}; {:.0} IOPS) | {:.1} ({:.1}..{:.1}; {:.0} IOPS) | {:.3} |",
            job.name, ma.0, ma.1, ma.2, iops(ma.0), mb.0, mb.1, mb.2, iops(mb.0), ma.0 / mb.0
        );
    }
    Ok(())
}

fn qmp(quick: bool) -> Result<()> {
    let (bin, dir, guest) = setup()?;
    let have_qemu = have("qemu-system-x86_64");
    let (n, reps) = if quick { (200, 1) } else { (2000, 3) };
    let disk = scratch_dir()?.join("qmp-disk.dat");
    {
        let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&disk)?;
        f.set_len(256 << 20)?;
    }
    println!("\n## qmp: {n} query-status round trips while the guest spins on 2 vCPUs (work=spin) or reads its disk (scsi-bench randread QD32, cache=none); best-of-{reps} p50 shown with that run's p99\n");
    println!("| system | guest load | p50 (us) | p99 (us) | max (us) |");
    println!("| --- | --- | --- | --- | --- |");
    for load in ["cpu", "disk"] {
        let d = (load == "disk").then_some(disk.as_path());
        let mut rows = vec![];
        for sys in ["ringvm", "qemu"] {
            if sys == "qemu" && !have_qemu {
                println!("| qemu | {load} | skipped: QEMU unavailable | | |");
                continue;
            }
            let mut best: Option<qmpbench::Latency> = None;
            for rep in 0..reps {
                let sock = dir.join(format!("{sys}-{load}-{rep}.sock"));
                let child = if sys == "ringvm" { qmpbench::spawn_ringvm(&bin, &guest, &sock, "2", d)? } else { qmpbench::spawn_qemu(&guest, &sock, "2", d)? };
                if d.is_some() {
                    std::thread::sleep(Duration::from_millis(1500)); // let the I/O start
                }
                let l = qmpbench::measure(&sock, n);
                qmpbench::reap(child);
                let l = l?;
                if best.as_ref().is_none_or(|b| l.p50_us < b.p50_us) {
                    best = Some(l);
                }
            }
            let b = best.unwrap();
            println!("| {sys} | {load} | {:.1} | {:.1} | {:.1} |", b.p50_us, b.p99_us, b.max_us);
            rows.push(b);
        }
        if rows.len() == 2 {
            println!("| ratio ringvm/qemu | {load} | {:.3} | {:.3} | |", rows[0].p50_us / rows[1].p50_us, rows[0].p99_us / rows[1].p99_us);
        }
    }
    let _ = std::fs::remove_file(&disk);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn scsi(quick: bool) -> Result<()> {
    let (bin, dir, guest) = setup()?;
    let have_qemu = have("qemu-system-x86_64");
    let have_fio = have("fio");
    let (size, secs, reps) = if quick { (256u64 << 20, 1, 1) } else { (2u64 << 30, 5, 3) };
    let file = scratch_dir()?.join("ring-bench.dat");
    if have_fio {
        ringbench::prepare_file(&file, size)?;
    } else {
        let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&file)?;
        f.set_len(size)?;
    }
    println!("\n## scsi: test guest scsi-bench on {} ({} MiB, cache=none / O_DIRECT); {secs} s runs, median of {reps}, interleaved\n", file.display(), size >> 20);
    println!("| job | queues | ringvm MB/s | QEMU MB/s | host fio MB/s | ringvm/fio | ringvm/QEMU |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for &queues in &[1u32, 2] {
        for job in scsibench::JOBS {
            let (mut a, mut b, mut c) = (vec![], vec![], vec![]);
            for _ in 0..reps {
                a.push(scsibench::ringvm(&bin, &guest, &file, *job, queues, secs)? / 1e6);
                // QEMU gives this guest one CPU (it reads no MP table from SeaBIOS), so only the 1-queue rows compare.
                if have_qemu && queues == 1 {
                    b.push(scsibench::qemu(&guest, &file, *job, queues, secs)? / 1e6);
                }
                if have_fio {
                    c.push(scsibench::fio(&file, *job, queues, secs)? / 1e6);
                }
            }
            let m = |v: Vec<f64>| if v.is_empty() { None } else { Some(median(v).0) };
            let (ma, mb, mc) = (median(a).0, m(b), m(c));
            let f = |x: Option<f64>| x.map_or("skipped".to_string(), |v| format!("{v:.1}"));
            let r = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{:.3}", ma / v));
            println!("| {} | {queues} | {ma:.1} | {} | {} | {} | {} |", job.name, f(mb), f(mc), r(mc), r(mb));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn snapshot(quick: bool) -> Result<()> {
    let (bin, dir, guest) = setup()?;
    let have_fio = have("fio");
    // RINGVM_PERF_SIZES=1024,4096 (MiB) and RINGVM_PERF_REPS=N narrow a run.
    let env_sizes: Option<Vec<u64>> = std::env::var("RINGVM_PERF_SIZES").ok().map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect());
    let sizes: &[u64] = match &env_sizes {
        Some(v) => v,
        None if quick => &[512],
        None => &[1024, 4096, 8192],
    };
    // RINGVM_PERF_RATES=1,100 (MiB/s; 1 is idle) narrows them.
    let env_rates: Option<Vec<u64>> = std::env::var("RINGVM_PERF_RATES").ok().map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect());
    let rates: &[u64] = match &env_rates {
        Some(v) => v,
        None if quick => &[1, 100],
        None => &[1, 100, 500],
    };
    let reps = std::env::var("RINGVM_PERF_REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(if quick { 1 } else { 3 });
    let targets = [("local disk", scratch_dir()?), ("/dev/shm", PathBuf::from("/dev/shm"))];
    println!("\n## snapshot: live save of the test guest (1 vCPU, as QEMU brings up one of this guest's vCPUs; 90% of RAM filled, then rewritten at the given rate); median of {reps}\n");
    println!("QEMU rows: the same guest, workload and target under QEMU 10 (`migrate file:` with and without mapped-ram); its 'dirty MiB/s' column names the mode, its 'passes' column is QEMU's dirty-sync-count.\n");
    println!("| target | guest | dirty MiB/s | total ms | downtime ms | passes | written MB | MB/s | file MiB | fio MB/s (same bytes) | ratio |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut restores = Vec::new();
    let mut qemu_restores: Vec<(String, u64, snapbench::QemuMode, f64)> = Vec::new();
    for (tname, tdir) in &targets {
        for &mib in sizes {
            for &rate in rates {
                let file = tdir.join(format!("ringvm-perf-{}.state", std::process::id()));
                let mut rs = Vec::new();
                let mut fios = Vec::new();
                let have_qemu = have("qemu-system-x86_64");
                let modes = [snapbench::QemuMode::MappedRam, snapbench::QemuMode::Plain];
                let mut qs: Vec<Vec<snapbench::Result1>> = vec![Vec::new(), Vec::new()];
                // Sides alternate order from one repetition to the next
                // (A B C / C B A): on this machine freshly allocated memory
                // is slow to touch (the host reclaims freed pages), which
                // favours whoever runs second.
                for rep in 0..reps {
                    let mut order: Vec<Option<usize>> = vec![None];
                    if have_qemu {
                        order.extend([Some(0), Some(1)]);
                    }
                    if rep % 2 == 1 {
                        order.reverse();
                    }
                    for side in order {
                        match side {
                            None => {
                                let r = snapbench::ringvm(None, &bin, &guest, &dir, &file, mib, rate, 90)?;
                                if have_fio {
                                    match snapbench::fio(tdir, r.bytes as u64) {
                                        Ok(v) => fios.push(v),
                                        // e.g. /dev/shm full: the row says skipped.
                                        Err(e) => eprintln!("fio on {tname}: {e:#}"),
                                    }
                                }
                                if rate > 1 && rate < 500 {
                                    // Restore the file just written, against fio reading as many bytes.
                                    let mut restore_row = |label: String, file_mib: f64| -> Result<()> {
                                        let (ms, p99) = snapbench::restore(None, &bin, &dir, &file)?;
                                        let present = (file_mib * (1 << 20) as f64) as u64;
                                        let fio_ms = if have_fio { snapbench::fio_read_ms(&file, present).ok() } else { None };
                                        restores.push((label, mib, ms, p99, fio_ms, file_mib));
                                        Ok(())
                                    };
                                    // One dirty rate is enough: this snapshot, then a sparse one (10% of RAM in use).
                                    restore_row(tname.to_string(), r.file_mib)?;
                                    let _ = std::fs::remove_file(&file);
                                    let sparse = snapbench::ringvm(None, &bin, &guest, &dir, &file, mib, 1, 10)?;
                                    restore_row(format!("{tname} (sparse)"), sparse.file_mib)?;
                                }
                                let _ = std::fs::remove_file(&file);
                                rs.push(r);
                            }
                            Some(m) => {
                                let mode = modes[m];
                                match snapbench::qemu(&guest, &dir, &file, mib, rate, mode) {
                                    Ok(r) => {
                                        if rate > 1 && rate < 500 {
                                            match snapbench::qemu_restore(&guest, &dir, &file, mib, mode) {
                                                Ok(ms) => qemu_restores.push((tname.to_string(), mib, mode, ms)),
                                                Err(e) => eprintln!("{} restore on {tname}: {e:#}", mode.name()),
                                            }
                                        }
                                        qs[m].push(r)
                                    }
                                    Err(e) => eprintln!("{} on {tname}: {e:#}", mode.name()),
                                }
                                let _ = std::fs::remove_file(&file);
                            }
                        }
                    }
                }
                let mut qemu_rows = Vec::new();
                if have_qemu {
                    for (m, mut v) in qs.into_iter().enumerate() {
                        v.sort_by(|a, b| a.total_ms.partial_cmp(&b.total_ms).unwrap());
                        qemu_rows.push((modes[m], if v.is_empty() { None } else { Some(v.swap_remove(v.len() / 2)) }));
                    }
                }
                rs.sort_by(|a, b| a.total_ms.partial_cmp(&b.total_ms).unwrap());
                let r = &rs[rs.len() / 2];
                let mbs = r.bytes / 1e6 / (r.total_ms / 1e3);
                let f = if fios.is_empty() { None } else { Some(median(fios).0) };
                println!(
                    "| {tname} | {} GiB | {} | {:.0} | {:.2} | {} | {:.0} | {:.0} | {:.0} | {} | {} |",
                    mib as f64 / 1024.0,
                    if rate <= 1 { "idle".to_string() } else { rate.to_string() },
                    r.total_ms,
                    r.downtime_ms,
                    r.iterations,
                    r.bytes / 1e6,
                    mbs,
                    r.file_mib,
                    f.map_or("skipped".into(), |v| format!("{v:.0}")),
                    f.map_or("-".into(), |v| format!("{:.3}", mbs / v)),
                );
                for (mode, q) in qemu_rows {
                    match q {
                        Some(q) => println!(
                            "| {tname} | {} GiB | {} | {:.0} | {:.2} | {} | {:.0} | {:.0} | {:.0} | {} | total time ringvm/QEMU {:.3}, downtime {:.3} |",
                            mib as f64 / 1024.0,
                            mode.name(),
                            q.total_ms,
                            q.downtime_ms,
                            q.iterations,
                            q.bytes / 1e6,
                            q.bytes / 1e6 / (q.total_ms / 1e3),
                            q.file_mib,
                            "-",
                            r.total_ms / q.total_ms,
                            r.downtime_ms / q.downtime_ms.max(1e-3),
                        ),
                        None => println!("| {tname} | {} GiB | {} | failed (see stderr) | | | | | | | |", mib as f64 / 1024.0, mode.name()),
                    }
                }
            }
        }
    }
    println!("\n### restore (ringvm run --loadstate -S, until the VM is paused with all state applied)\n");
    println!("| target | guest | present MiB | time to ready ms | MB/s | fio read of the same bytes ms | ratio (ringvm/fio time) | p99 query-status during load ms |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for (t, mib, ms, p99, fio_ms, file_mib) in restores.clone() {
        println!(
            "| {t} | {} GiB | {file_mib:.0} | {ms:.0} | {:.0} | {} | {} | {p99:.2} |",
            mib as f64 / 1024.0,
            file_mib * 1.048576 / (ms / 1e3),
            fio_ms.map_or("skipped".into(), |v| format!("{v:.0}")),
            fio_ms.map_or("-".into(), |v| format!("{:.3}", ms / v)),
        );
    }
    if !qemu_restores.is_empty() {
        println!("\n### QEMU restore of its own file of the same guest (-S -incoming defer + migrate-incoming file:, process start to completed)\n");
        println!("| target | guest | mode | time to ready ms | ringvm time to ready ms (same target and size, median) | ratio ringvm/QEMU |");
        println!("| --- | --- | --- | --- | --- | --- |");
        for (t, mib, mode, ms) in &qemu_restores {
            let ours: Vec<f64> = restores.iter().filter(|r| &r.0 == t && r.1 == *mib).map(|r| r.2).collect();
            let o = if ours.is_empty() { None } else { Some(median(ours).0) };
            println!(
                "| {t} | {} GiB | {} | {ms:.0} | {} | {} |",
                *mib as f64 / 1024.0,
                mode.name(),
                o.map_or("-".into(), |v| format!("{v:.0}")),
                o.map_or("-".into(), |v| format!("{:.3}", v / ms)),
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn nfs(quick: bool) -> Result<()> {
    let on_path = |c: &str| ["/usr/bin", "/usr/sbin", "/bin", "/sbin"].iter().any(|d| Path::new(d).join(c).exists());
    if !on_path("ganesha.nfsd") || !on_path("nfs-cp") || !on_path("ip") {
        println!("\n## nfs: skipped (needs nfs-ganesha, libnfs-utils and iproute2: scripts/lib.sh ensure_nfs_deps)\n");
        return Ok(());
    }
    let (bin, dir, guest) = setup()?;
    let local = scratch_dir()?;
    let env_sizes: Option<Vec<u64>> = std::env::var("RINGVM_PERF_SIZES").ok().map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect());
    let sizes: &[u64] = match &env_sizes {
        Some(v) => v,
        None if quick => &[256],
        None => &[1024, 2048],
    };
    let reps = std::env::var("RINGVM_PERF_REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(if quick { 1 } else { 3 });
    // RINGVM_PERF_NFS_DELAY_US: the injected one-way delay (default 500 us).
    let delay_us: u64 = std::env::var("RINGVM_PERF_NFS_DELAY_US").ok().and_then(|v| v.parse().ok()).unwrap_or(500);
    let server = nfsbench::Server::start(&dir).context("NFS server")?;
    nfsbench::start_proxy(&server.ns, Duration::from_micros(delay_us))?;
    println!("\n## nfs: live save (idle guest, 90% of RAM filled, 1 vCPU) to nfs:// and restore from it; nfs-ganesha 4 (VFS) on loopback in a network namespace, state on the local disk; median of {reps}\n");
    println!("'seq. client' is libnfs's nfs-cp moving the same number of bytes one request at a time. The delayed rows go through a TCP proxy adding {delay_us} us each way (RTT +{} ms).\n", delay_us as f64 * 2.0 / 1e3);
    println!("| target | guest | save ms | save MB/s | seq. client write MB/s | save / seq. | restore ms | restore MB/s | seq. client read MB/s | restore / seq. |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let mbs = |bytes: f64, ms: f64| bytes / 1e6 / (ms / 1e3);
    let cell = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
    let ratio = |a: f64, b: Option<f64>| b.map_or("-".to_string(), |b| format!("{:.2}", a / b));
    for &mib in sizes {
        let targets: [(&str, Option<u16>); 3] = [("local disk", None), ("nfs:// loopback", Some(nfsbench::NFS_PORT)), ("nfs:// + delay", Some(nfsbench::PROXY_PORT))];
        for (tname, port) in targets {
            let (mut saves, mut restores, mut wr, mut rd) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for rep in 0..reps {
                // Fresh names each time: ganesha caches what it served and
                // answers STALE for a name deleted behind its back.
                let (name, seq) = (format!("vm-{mib}-{}-{rep}.state", port.unwrap_or(0)), format!("seq-{mib}-{}-{rep}.dat", port.unwrap_or(0)));
                let (file, ns) = match port {
                    None => (local.join(format!("ringvm-perf-nfs-{}.state", std::process::id())), None),
                    Some(p) => (PathBuf::from(server.uri(&name, p)), Some(server.ns.as_str())),
                };
                let r = snapbench::ringvm(ns, &bin, &guest, &dir, &file, mib, 1, 90)?;
                let on_disk = if port.is_some() { server.export.join(&name) } else { file.clone() };
                let present = std::fs::metadata(&on_disk).map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512).unwrap_or(0) as f64;
                saves.push(mbs(r.bytes, r.total_ms));
                let (ms, _) = snapbench::restore(ns, &bin, &dir, &file)?;
                restores.push((mbs(present, ms), ms));
                if port.is_none() {
                    let _ = std::fs::remove_file(&on_disk);
                }
                if let Some(p) = port {
                    let src = local.join(format!("ringvm-perf-nfs-src-{}", std::process::id()));
                    nfsbench::make_source(&src, r.bytes as u64)?;
                    let dst = server.uri(&seq, p);
                    let w = nfsbench::nfs_cp(&server.ns, src.to_str().unwrap(), &dst)?;
                    wr.push(mbs(r.bytes, w));
                    let back = PathBuf::from("/dev/shm").join(format!("ringvm-perf-nfs-back-{}", std::process::id()));
                    let _ = std::fs::remove_file(&back);
                    let rms = nfsbench::nfs_cp(&server.ns, &dst, back.to_str().unwrap())?;
                    rd.push(mbs(r.bytes, rms));
                    let _ = std::fs::remove_file(&back);
                    let _ = std::fs::remove_file(&src);
                }
            }
            let s = median(saves).0;
            let (rmbs, rms) = {
                restores.sort_by(|a, b| a.1.partial_cmp(&b.1).unwrap());
                restores[restores.len() / 2]
            };
            let w = (!wr.is_empty()).then(|| median(wr).0);
            let rd = (!rd.is_empty()).then(|| median(rd).0);
            let save_ms = mib as f64 * 0.9 * 1.048576 / s * 1e3;
            println!(
                "| {tname} | {} GiB | {save_ms:.0} | {s:.0} | {} | {} | {rms:.0} | {rmbs:.0} | {} | {} |",
                mib as f64 / 1024.0,
                cell(w),
                ratio(s, w),
                cell(rd),
                ratio(rmbs, rd)
            );
        }
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The ringvm binary, a scratch dir and the test guest written into it.
fn setup() -> Result<(PathBuf, PathBuf, PathBuf)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin = root.join("target/release/ringvm");
    if !bin.exists() {
        bail!("build ringvm first: cargo build --release");
    }
    let dir = std::env::temp_dir().join(format!("ringvm-perf-{}-{}", std::process::id(), Instant::now().elapsed().as_nanos()));
    std::fs::create_dir_all(&dir)?;
    let guest = dir.join("guest.elf");
    let st = Command::new(&bin).args(["guest-image", "--out"]).arg(&guest).status()?;
    if !st.success() {
        bail!("ringvm guest-image failed");
    }
    Ok((bin, dir, guest))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.suite {
        Suite::Boot => boot(cli.quick),
        Suite::Ring => ring(cli.quick),
        Suite::Qmp => qmp(cli.quick),
        Suite::Scsi => scsi(cli.quick),
        Suite::Snapshot => snapshot(cli.quick),
        Suite::Nfs => nfs(cli.quick),
        Suite::All => {
            boot(cli.quick)?;
            ring(cli.quick)?;
            qmp(cli.quick)?;
            scsi(cli.quick)?;
            snapshot(cli.quick)?;
            nfs(cli.quick)
        }
    }
}
