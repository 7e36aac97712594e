//! `linux`: the real Linux test guest (scripts/linux-guest.sh) booted to
//! its ext4 root on virtio-scsi and through its in-kernel I/O self-test,
//! ringvm vs QEMU 10 (KVM, q35, virtio-scsi-pci, -kernel) with the same
//! kernel, command line and disk images, interleaved. Times are taken when
//! the serial console prints each milestone.
//!
//! Then the booting kernel is saved live while it probes its SCSI disks
//! (ringvm `savevm-start`; QEMU `migrate file:` with no bandwidth cap and
//! the same 5 ms downtime target) and restored in a fresh process, paused
//! (ringvm `--loadstate`; QEMU `-incoming defer` + `migrate-incoming`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use serde_json::json;

use crate::report::{cell, ratio, Report};
use crate::snapbench::{self, ok, qemu_wait, qmp, reap};
use crate::Ctx;

/// The serial line at which the booting kernel is saved.
const SNAPSHOT_AT: &str = "scsi host0: Virtio SCSI HBA";

/// (case, serial line that marks it).
const MILESTONES: [(&str, &str); 4] =
    [("linux_version", "Linux version"), ("scsi_disk", "Direct-Access"), ("root_mounted", "VFS: Mounted root"), ("selftest_done", "RINGVM-KTEST DONE PASS")];

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

struct Images {
    root: PathBuf,
    test: PathBuf,
}

fn fresh_images(dir: &Path, scratch: &Path) -> Result<Images> {
    let root = scratch.join("root.img");
    let test = scratch.join("test.img");
    std::fs::copy(dir.join("root.img"), &root)?;
    let _ = std::fs::remove_file(&test);
    std::fs::File::create(&test)?.set_len(16 << 20)?;
    Ok(Images { root, test })
}

fn ringvm_cmd(c: &Ctx, dir: &Path, cmdline: &str, img: &Images) -> Command {
    let mut cmd = Command::new(&c.bin);
    cmd.args(["run", "--cpus", "1", "--memory", "256M", "--no-reboot", "--kernel"])
        .arg(dir.join("bzImage"))
        .args(["--cmdline", cmdline])
        .arg("--disk")
        .arg(format!("path={}", img.root.display()))
        .arg("--disk")
        .arg(format!("path={}", img.test.display()));
    cmd
}

/// QEMU's machine for the same guest (also the incoming side of a restore).
fn qemu_cmd(dir: &Path, cmdline: &str, img: &Images) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    // -arch-capabilities: some KVMs (kvm-pvm) refuse MSR 0x10a.
    cmd.args(["-M", "q35", "-accel", "kvm", "-cpu", "host,-arch-capabilities", "-m", "256", "-smp", "1"])
        .args(["-nographic", "-nodefaults", "-no-reboot", "-kernel"])
        .arg(dir.join("bzImage"))
        .args(["-append", cmdline, "-device", "virtio-scsi-pci,id=scsi0"])
        .arg("-drive")
        .arg(format!("file={},format=raw,if=none,id=d0,discard=unmap", img.root.display()))
        .args(["-device", "scsi-hd,drive=d0,bus=scsi0.0,lun=0"])
        .arg("-drive")
        .arg(format!("file={},format=raw,if=none,id=d1,discard=unmap", img.test.display()))
        .args(["-device", "scsi-hd,drive=d1,bus=scsi0.0,lun=1"]);
    cmd
}

/// Figures of one save and restore of the booting kernel.
struct SaveRestore {
    total_ms: f64,
    downtime_ms: f64,
    restore_ms: f64,
}

/// Starts `cmd` (stdout piped) and returns once it prints [`SNAPSHOT_AT`].
fn start_until_probing(mut cmd: Command) -> Result<std::process::Child> {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
    let out = child.stdout.take().context("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(|l| l.ok()) {
            if line.contains(SNAPSHOT_AT) {
                let _ = tx.send(());
            }
        }
    });
    if rx.recv_timeout(Duration::from_secs(900)).is_err() {
        let _ = child.kill();
        let _ = child.wait();
        bail!("Linux never printed {SNAPSHOT_AT:?}");
    }
    Ok(child)
}

fn ringvm_save_restore(c: &Ctx, dir: &Path, cmdline: &str, img: &Images, scratch: &Path) -> Result<SaveRestore> {
    let sock = scratch.join("linux.sock");
    let file = scratch.join("linux.state");
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(&file);
    let mut cmd = ringvm_cmd(c, dir, cmdline, img);
    cmd.arg("--qmp").arg(&sock);
    let child = start_until_probing(cmd)?;
    let saved = (|| -> Result<(f64, f64)> {
        let mut q = qmp(&sock)?;
        ok(&mut q, json!({"execute": "savevm-start", "arguments": {"statefile": file}}))?;
        let s = snapbench::savevm_completed(&mut q)?;
        let _ = snapbench::cmd(&mut q, json!({"execute": "quit"}));
        Ok((s["total-time"].as_f64().unwrap_or(0.0), s["downtime"].as_f64().unwrap_or(0.0)))
    })();
    reap(child)?;
    let (total_ms, downtime_ms) = saved?;
    let (restore_ms, _) = snapbench::restore(None, &c.bin, scratch, &file, &[])?;
    Ok(SaveRestore { total_ms, downtime_ms, restore_ms })
}

fn qemu_save_restore(dir: &Path, cmdline: &str, img: &Images, scratch: &Path) -> Result<SaveRestore> {
    let sock = scratch.join("qemu-linux.sock");
    let file = scratch.join("qemu-linux.state");
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(&file);
    let mut cmd = qemu_cmd(dir, cmdline, img);
    cmd.args(["-serial", "stdio", "-qmp"]).arg(format!("unix:{},server=on,wait=off", sock.display()));
    let child = start_until_probing(cmd)?;
    let saved = (|| -> Result<(f64, f64)> {
        let mut q = qmp(&sock)?;
        ok(&mut q, json!({"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": 1u64 << 40, "downtime-limit": 5}}))?;
        ok(&mut q, json!({"execute": "migrate", "arguments": {"uri": format!("file:{}", file.display())}}))?;
        let s = qemu_wait(&mut q, Instant::now(), Duration::from_millis(2))?;
        let _ = snapbench::cmd(&mut q, json!({"execute": "quit"}));
        Ok((s["total-time"].as_f64().unwrap_or(0.0), s["downtime"].as_f64().unwrap_or(0.0)))
    })();
    reap(child)?;
    let (total_ms, downtime_ms) = saved?;
    let isock = scratch.join("qemu-linux-in.sock");
    let _ = std::fs::remove_file(&isock);
    let t0 = Instant::now();
    let mut cmd = qemu_cmd(dir, cmdline, img);
    let child = cmd
        .args(["-serial", "null", "-S", "-incoming", "defer", "-qmp"])
        .arg(format!("unix:{},server=on,wait=off", isock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let restored = (|| -> Result<f64> {
        let mut q = qmp(&isock)?;
        ok(&mut q, json!({"execute": "migrate-incoming", "arguments": {"uri": format!("file:{}", file.display())}}))?;
        qemu_wait(&mut q, t0, Duration::from_millis(1))?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let _ = snapbench::cmd(&mut q, json!({"execute": "quit"}));
        Ok(ms)
    })();
    reap(child)?;
    Ok(SaveRestore { total_ms, downtime_ms, restore_ms: restored? })
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
    r.begin("linux", (2 * c.reps * systems.len()) as u64);
    for rep in 0..c.reps {
        if crate::stopping() {
            break;
        }
        for sys in crate::interleaved(&systems, rep) {
            r.step(format!("{sys}, repetition {}/{}", rep + 1, c.reps));
            let img = fresh_images(&dir, &scratch)?;
            let cmd = if sys == "ringvm" {
                ringvm_cmd(c, &dir, &cmdline, &img)
            } else {
                let mut cmd = qemu_cmd(&dir, &cmdline, &img);
                cmd.args(["-serial", "stdio"]);
                cmd
            };
            let (at, total) = measure(cmd, Duration::from_secs(900))?;
            for ((case, line), t) in MILESTONES.iter().zip(&at) {
                let t = t.with_context(|| format!("{sys}: Linux never printed {line:?}"))?;
                r.sample(case, sys, "time", "s", t.as_secs_f64());
            }
            r.sample("exit", sys, "time", "s", total.as_secs_f64());
            r.step(format!("{sys}: save and restore the booting kernel, repetition {}/{}", rep + 1, c.reps));
            let img = fresh_images(&dir, &scratch)?;
            let sr = if sys == "ringvm" { ringvm_save_restore(c, &dir, &cmdline, &img, &scratch)? } else { qemu_save_restore(&dir, &cmdline, &img, &scratch)? };
            r.sample("save", sys, "total", "ms", sr.total_ms);
            r.sample("save", sys, "downtime", "ms", sr.downtime_ms);
            r.sample("save", sys, "restore", "ms", sr.restore_ms);
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
    let metrics = ["total", "downtime", "restore"];
    let mut rows = vec![];
    for sys in ["ringvm", "QEMU"] {
        let mut row = vec![sys.to_string()];
        row.extend(metrics.iter().map(|m| cell(r.stat("save", sys, m), 1)));
        rows.push(row);
    }
    let mut ratios = vec!["ratio ringvm/QEMU".to_string()];
    ratios.extend(metrics.iter().map(|m| ratio(r.stat("save", "ringvm", m), r.stat("save", "QEMU", m))));
    rows.push(ratios);
    r.table(
        "linux snapshot",
        &format!("The same kernel saved live at `{SNAPSHOT_AT}` (its SCSI scan in flight) to a file in the scratch directory, then restored in a fresh process, paused: ringvm `savevm-start` and `run -S --loadstate`; QEMU `migrate file:` (max-bandwidth unlimited, downtime-limit 5 ms) and `-incoming defer` + `migrate-incoming` with the same machine. Restore: ms from process start to a paused VM with all state applied."),
        &["system", "save total ms", "downtime ms", "restore ms"],
        &rows,
    );
    let st = |k: &str| (r.stat(k, "ringvm", "time"), r.stat(k, "QEMU", "time"));
    let (m, d) = (st("root_mounted"), st("selftest_done"));
    r.headline("linux: real kernel to `VFS: Mounted root`", ("s", m.0), ("QEMU s", m.1), true);
    r.headline("linux: real kernel through its I/O self-test", ("s", d.0), ("QEMU s", d.1), true);
    let sv = |m: &str| (r.stat("save", "ringvm", m), r.stat("save", "QEMU", m));
    let (dt, rs) = (sv("downtime"), sv("restore"));
    r.headline("linux: downtime saving the booting kernel", ("ms", dt.0), ("QEMU ms", dt.1), true);
    r.headline("linux: restoring the booting kernel", ("ms", rs.0), ("QEMU ms", rs.1), true);
    r.end();
    Ok(())
}
