//! `linux`: the real Linux test guest (scripts/linux-guest.sh) booted to
//! its ext4 root on virtio-scsi and through its in-kernel I/O self-test,
//! ringvm vs QEMU 10 (KVM, q35, virtio-scsi-pci, -kernel) with the same
//! kernel, command line and disk images, interleaved. Times are taken when
//! the serial console prints each milestone.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::report::{cell, ratio, Report};
use crate::Ctx;

/// (case, serial line that marks it).
const MILESTONES: [(&str, &str); 4] = [
    ("linux_version", "Linux version"),
    ("scsi_disk", "Direct-Access"),
    ("root_mounted", "VFS: Mounted root"),
    ("selftest_done", "RINGVM-KTEST DONE PASS"),
];

fn guest_dir(root: &Path) -> Option<PathBuf> {
    let dir = std::env::var_os("RINGVM_LINUX_DIR").map(PathBuf::from).unwrap_or_else(|| root.join(".cache/linux"));
    (dir.join("vmlinux").exists() && dir.join("bzImage").exists() && dir.join("root.img").exists()).then_some(dir)
}

/// Runs `cmd` until it exits; the time of each milestone line and the exit.
fn measure(mut cmd: Command, deadline: Duration) -> Result<(Vec<Option<Duration>>, Duration)> {
    let t0 = Instant::now();
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().with_context(|| format!("{:?}", cmd.get_program()))?;
    let out = child.stdout.take().context("stdout")?;
    let reader = std::thread::spawn(move || {
        let mut at = vec![None; MILESTONES.len()];
        for line in BufReader::new(out).lines().map_while(|l| l.ok()) {
            for (i, (_, m)) in MILESTONES.iter().enumerate() {
                if at[i].is_none() && line.contains(m) {
                    at[i] = Some(t0.elapsed());
                }
            }
        }
        at
    });
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if t0.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("deadline: {:?} did not finish in {deadline:?}", cmd.get_program());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let total = t0.elapsed();
    let at = reader.join().unwrap_or_default();
    if !status.success() {
        bail!("{:?} exited with {status}", cmd.get_program());
    }
    Ok((at, total))
}

pub fn suite(c: &Ctx, r: &mut Report) -> Result<()> {
    let Some(dir) = guest_dir(&c.root) else {
        r.skip("linux", "no Linux test guest (scripts/linux-guest.sh builds it)");
        return Ok(());
    };
    let cmdline = format!("{} ringvm_ktest.disk=sdb", std::fs::read_to_string(dir.join("cmdline"))?.trim());
    let scratch = c.scratch()?;
    let mut systems = vec!["ringvm"];
    if c.have_qemu {
        systems.push("QEMU");
    }
    r.begin("linux", (c.reps * systems.len()) as u64);
    for rep in 0..c.reps {
        if crate::stopping() {
            break;
        }
        for sys in crate::interleaved(&systems, rep) {
            r.step(format!("{sys}, repetition {}/{}", rep + 1, c.reps));
            let root = scratch.join("root.img");
            let test = scratch.join("test.img");
            std::fs::copy(dir.join("root.img"), &root)?;
            let _ = std::fs::remove_file(&test);
            std::fs::File::create(&test)?.set_len(16 << 20)?;
            let cmd = if sys == "ringvm" {
                let mut cmd = Command::new(&c.bin);
                cmd.args(["run", "--cpus", "1", "--memory", "256M", "--no-reboot", "--kernel"])
                    .arg(dir.join("bzImage"))
                    .args(["--cmdline", &cmdline])
                    .arg("--disk")
                    .arg(format!("path={}", root.display()))
                    .arg("--disk")
                    .arg(format!("path={}", test.display()));
                cmd
            } else {
                let mut cmd = Command::new("qemu-system-x86_64");
                // -arch-capabilities: some KVMs (kvm-pvm) refuse MSR 0x10a.
                cmd.args(["-M", "q35", "-accel", "kvm", "-cpu", "host,-arch-capabilities", "-m", "256", "-smp", "1"])
                    .args(["-nographic", "-nodefaults", "-no-reboot", "-serial", "stdio", "-kernel"])
                    .arg(dir.join("bzImage"))
                    .args(["-append", &cmdline, "-device", "virtio-scsi-pci,id=scsi0"])
                    .arg("-drive")
                    .arg(format!("file={},format=raw,if=none,id=d0,discard=unmap", root.display()))
                    .args(["-device", "scsi-hd,drive=d0,bus=scsi0.0,lun=0"])
                    .arg("-drive")
                    .arg(format!("file={},format=raw,if=none,id=d1,discard=unmap", test.display()))
                    .args(["-device", "scsi-hd,drive=d1,bus=scsi0.0,lun=1"]);
                cmd
            };
            let (at, total) = measure(cmd, Duration::from_secs(900))?;
            for ((case, line), t) in MILESTONES.iter().zip(&at) {
                let t = t.with_context(|| format!("{sys}: Linux never printed {line:?}"))?;
                r.sample(case, sys, "time", "s", t.as_secs_f64());
            }
            r.sample("exit", sys, "time", "s", total.as_secs_f64());
        }
    }
    let cases = ["linux_version", "scsi_disk", "root_mounted", "selftest_done", "exit"];
    let mut rows = vec![];
    for sys in ["ringvm", "QEMU"] {
        let mut row = vec![sys.to_string()];
        row.extend(cases.iter().map(|k| cell(r.stat(k, sys, "time"), 1)));
        rows.push(row);
    }
    let mut ratios = vec!["ratio ringvm/QEMU".to_string()];
    ratios.extend(cases.iter().map(|k| ratio(r.stat(k, "ringvm", "time"), r.stat(k, "QEMU", "time"))));
    rows.push(ratios);
    r.table(
        "linux",
        "Linux 6.12 (scripts/linux-guest.sh: tinyconfig + virtio-scsi + ext4 + ACPI, the bzImage), 1 vCPU, 256 MiB, an ext4 root and a 16 MiB test disk on virtio-scsi; seconds from process start to each serial line. QEMU: `-M q35 -accel kvm -cpu host` with SeaBIOS, `virtio-scsi-pci`, `scsi-hd`, the same images and command line. On a kvm-pvm host guest kernel code is emulated: these figures compare the VMMs on the same hypervisor, not Linux boot speed.",
        &["system", "`Linux version` s", "`Direct-Access` s", "`VFS: Mounted root` s", "self-test done s", "exit s"],
        &rows,
    );
    let st = |k: &str| (r.stat(k, "ringvm", "time"), r.stat(k, "QEMU", "time"));
    let (m, d) = (st("root_mounted"), st("selftest_done"));
    r.headline("linux: real kernel to `VFS: Mounted root`", ("s", m.0), ("QEMU s", m.1), true);
    r.headline("linux: real kernel through its I/O self-test", ("s", d.0), ("QEMU s", d.1), true);
    r.end();
    Ok(())
}
