//! Live snapshots of the running test guest: completion with checksums,
//! refusal of a second start, ENOSPC, cancel, resets and stop/cont during
//! snapshots, and files that are not loadable (truncated, corrupt, never
//! completed) are reported as such by `state inspect`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::qmp::Qmp;
use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(120);

fn vm(dir: &Scratch, cpus: &str, mem: &str, work: &str) -> (Proc, Qmp) {
    let g = guest_elf(dir);
    let sock = dir.path("qmp.sock");
    let mut p = Proc::spawn(Command::new(ringvm_bin()).args([
        "run",
        "--kernel",
        g.to_str().unwrap(),
        "--cpus",
        cpus,
        "--memory",
        mem,
        "--cmdline",
        work,
        "--qmp",
        sock.to_str().unwrap(),
    ]));
    p.wait_for_output("cpus online", T);
    let q = Qmp::negotiated(&sock);
    (p, q)
}

fn inspect(path: &Path) -> Output {
    ringvm(&["state", "inspect", path.to_str().unwrap()], T)
}

fn beats(p: &Proc) -> usize {
    p.stdout().matches("ringvm-guest: beat").count()
}

fn snapshot_while_dirtying(cpus: &str) {
    let dir = Scratch::new(&format!("snap-live-{cpus}"));
    let (mut p, mut q) = vm(&dir, cpus, "256M", "work=mem mib=128 secs=inf rate=200 beat=100");
    p.wait_for_output("fill done", T);
    let file = dir.path("vm.state");
    assert_eq!(q.ok("savevm-start", json!({"statefile": file.to_str().unwrap()})), json!({}));
    let s = q.wait_savevm(T);
    assert_eq!(s["status"], "completed", "{s}");
    assert!(s["iterations"].as_u64().unwrap() >= 1, "{s}");
    assert!(s["bytes"].as_u64().unwrap() >= 128 << 20, "at least the dirtied region was written: {s}");
    assert!(s["downtime"].as_f64().unwrap() > 0.0, "{s}");
    // QEMU's setup-time: part of the total, which runs from the command.
    let (setup, total) = (s["setup-time"].as_u64().unwrap(), s["total-time"].as_u64().unwrap());
    assert!(setup <= total && total > 0, "{s}");
    assert!(s.get("error").is_none());
    // One SAVEVM_PROGRESS per live pass, then MIGRATION completed.
    let ev = q.wait_event("SAVEVM_PROGRESS");
    assert_eq!(ev["data"]["pass"], 1, "{ev}");
    assert!(ev["data"]["bytes"].as_u64().unwrap() >= 128 << 20, "{ev}");
    assert!(ev["data"]["throughput-mbps"].as_f64().unwrap() > 0.0, "{ev}");
    assert_eq!(q.wait_event("MIGRATION")["data"]["status"], "completed");
    // The guest keeps running afterwards.
    assert_eq!(q.ok("query-status", json!({}))["status"], "running");
    let b = beats(&p);
    let t0 = Instant::now();
    while beats(&p) < b + 2 {
        assert!(t0.elapsed() < T, "guest stopped after the snapshot");
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = inspect(&file);
    assert_eq!(o.code(), 0, "{}\n{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("checksums: all ok"), "{}", o.stdout);
    assert!(o.stdout.contains(&format!("machine: {cpus} vCPU(s), 256 MiB RAM")), "{}", o.stdout);
    // Sparse: the untouched half of RAM takes no space.
    let used = std::fs::metadata(&file).map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512).unwrap();
    assert!(used < 200 << 20, "file uses {used} bytes");
    q.ok("quit", json!({}));
    assert_eq!(p.wait(T).code(), 0);
}

#[test]
fn live_snapshot_one_vcpu() {
    if require_kvm("live_snapshot_one_vcpu") {
        snapshot_while_dirtying("1");
    }
}

#[test]
fn live_snapshot_two_vcpus() {
    if require_kvm("live_snapshot_two_vcpus") {
        snapshot_while_dirtying("2");
    }
}

#[test]
fn second_start_refused_cancel_and_restart() {
    if !require_kvm("second_start_refused_cancel_and_restart") {
        return;
    }
    let dir = Scratch::new("snap-cancel");
    let (p, mut q) = vm(&dir, "1", "1G", "work=mem mib=768 secs=inf rate=0");
    // A target that answers every write 50 ms late: 768 MiB take seconds,
    // so the cancel certainly lands mid-flight.
    let slow = FaultFs::mount(&dir, "slow", &["--delay-us", "50000"]);
    let a = slow.path("a.state");
    q.ok("savevm-start", json!({"statefile": a.to_str().unwrap()}));
    let r = q.cmd(json!({"execute": "savevm-start", "arguments": {"statefile": dir.path("b.state").to_str().unwrap()}}));
    assert!(r["error"]["desc"].as_str().unwrap().contains("already running"), "{r}");
    q.ok("savevm-end", json!({}));
    let s = q.wait_savevm(T);
    assert_eq!(s["status"], "failed", "{s}");
    assert!(s["error"].as_str().unwrap().contains("cancelled"), "{s}");
    if a.exists() {
        let o = inspect(&a);
        assert_eq!(o.code(), 1);
        assert!(o.stderr.contains("no completion record"), "{}", o.stderr);
    }
    // A new snapshot can start and complete.
    let c = dir.path("c.state");
    q.ok("savevm-end", json!({}));
    q.savevm_completes(&c, T);
    assert_eq!(inspect(&c).code(), 0);
    // Bad arguments.
    assert!(q.cmd(json!({"execute": "savevm-start"}))["error"]["desc"].as_str().unwrap().contains("statefile"));
    assert!(q.cmd(json!({"execute": "savevm-start", "arguments": {"statefile": 7}}))["error"].is_object());
    q.ok("quit", json!({}));
    assert_eq!(p.wait(T).code(), 0);
}

#[test]
fn enospc_fails_cleanly_and_the_vm_keeps_running() {
    if !require_kvm("enospc_fails_cleanly_and_the_vm_keeps_running") {
        return;
    }
    let dir = Scratch::new("snap-enospc");
    let small = dir.path("small");
    std::fs::create_dir_all(&small).unwrap();
    let path = std::ffi::CString::new(small.to_str().unwrap()).unwrap();
    // SAFETY: mounting a 16 MiB tmpfs on our own scratch directory.
    let rc = unsafe { libc::mount(c"tmpfs".as_ptr(), path.as_ptr(), c"tmpfs".as_ptr(), 0, c"size=16m".as_ptr().cast()) };
    if rc != 0 {
        assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "CI must be able to mount a tmpfs");
        eprintln!("SKIP: cannot mount tmpfs");
        return;
    }
    struct Unmount(std::ffi::CString);
    impl Drop for Unmount {
        fn drop(&mut self) {
            // SAFETY: unmounting what this test mounted.
            unsafe { libc::umount2(self.0.as_ptr(), libc::MNT_DETACH) };
        }
    }
    let _u = Unmount(path);
    let (mut p, mut q) = vm(&dir, "1", "256M", "work=mem mib=64 secs=inf rate=50 beat=100");
    // 64 MiB of non-zero pages must exist before the snapshot starts, or it fits in
    // 16 MiB (a slow machine ran the snapshot while the fill was at 19 MB).
    p.wait_for_output("fill done", T);
    let file = small.join("vm.state");
    q.ok("savevm-start", json!({"statefile": file.to_str().unwrap()}));
    let s = q.wait_savevm(T);
    assert_eq!(s["status"], "failed", "{s}");
    let err = s["error"].as_str().unwrap();
    assert!(err.contains(file.to_str().unwrap()) && err.contains("No space left"), "{err}");
    assert_eq!(q.ok("query-status", json!({}))["status"], "running");
    let o = inspect(&file);
    assert_eq!(o.code(), 1, "a failed snapshot is never loadable");
    // Nothing of it is left to fill the filesystem (removed off the
    // iothread once the snapshot ended).
    let left = entries_after_cleanup(&small, |_| true);
    assert!(left.is_empty(), "a failed snapshot left {left:?}");
    // The next snapshot, somewhere with room, succeeds.
    let good = dir.path("good.state");
    q.ok("savevm-end", json!({}));
    q.savevm_completes(&good, T);
    assert_eq!(inspect(&good).code(), 0);
    let b = beats(&p);
    let t0 = Instant::now();
    while beats(&p) <= b {
        assert!(t0.elapsed() < T);
        std::thread::sleep(Duration::from_millis(20));
    }
    q.ok("quit", json!({}));
    assert_eq!(p.wait(T).code(), 0);
}

/// The seed's scenario from the other side: resets, stop and cont while
/// snapshots run. At least 5 snapshots and 500 resets, no deadlock (every wait has a
/// deadline), every completed file whole.
#[test]
fn resets_and_stop_cont_during_snapshots() {
    if !require_kvm("resets_and_stop_cont_during_snapshots") {
        return;
    }
    let dir = Scratch::new("snap-resets");
    let (p, mut q) = vm(&dir, "2", "128M", "work=mem mib=48 secs=inf rate=100");
    let file = dir.path("vm.state");
    let (mut started, mut completed, mut resets, mut toggles) = (0, 0, 0, 0);
    let t0 = Instant::now();
    // At least 500 resets and 5 snapshots started among them (on a loaded
    // machine each snapshot spans more resets).
    while resets < 500 || started < 5 {
        assert!(t0.elapsed() < T, "deadline: {resets} resets, {started} snapshots");
        let s = q.ok("query-savevm", json!({}));
        if s["status"] != "active" {
            if s["status"] == "completed" {
                completed += 1;
                assert_eq!(inspect(&file).code(), 0, "snapshot {started}");
            }
            q.ok("savevm-end", json!({}));
            q.ok("savevm-start", json!({"statefile": file.to_str().unwrap()}));
            started += 1;
        }
        if resets % 4 == 3 && toggles < resets {
            q.ok("stop", json!({}));
            q.ok("cont", json!({}));
            toggles = resets;
        }
        let r = q.cmd(json!({"execute": "system_reset"}));
        if r.get("return").is_some() {
            resets += 1;
            // Let some snapshots finish between resets, others not.
            std::thread::sleep(Duration::from_millis((resets % 5) as u64 * 8));
        } else {
            assert!(r["error"]["desc"].as_str().unwrap().contains("snapshot is finishing"), "{r}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let s = q.wait_savevm(T);
    if s["status"] == "completed" {
        completed += 1;
        assert_eq!(inspect(&file).code(), 0);
    }
    assert!(started >= 5 && completed >= started - 1, "{completed} of {started} snapshots completed");
    assert_eq!(q.ok("query-status", json!({}))["status"], "running");
    q.ok("quit", json!({}));
    assert_eq!(p.wait(T).code(), 0);
}

#[test]
fn inspect_refuses_truncated_and_corrupt_files() {
    if !require_kvm("inspect_refuses_truncated_and_corrupt_files") {
        return;
    }
    let dir = Scratch::new("snap-bad");
    let (p, mut q) = vm(&dir, "1", "64M", "work=mem mib=16 secs=inf rate=0");
    let file = dir.path("vm.state");
    q.savevm_completes(&file, T);
    q.ok("quit", json!({}));
    assert_eq!(p.wait(T).code(), 0);
    assert_eq!(inspect(&file).code(), 0);
    let data = std::fs::read(&file).unwrap();
    // A flipped byte inside a present page (the pattern region, 16 MiB in).
    let mut bad = data.clone();
    bad[(1 << 20) + (16 << 20) + 100] ^= 0x40;
    let b = dir.path("bad.state");
    std::fs::write(&b, &bad).unwrap();
    let o = inspect(&b);
    assert_eq!(o.code(), 1, "{}", o.stdout);
    assert!(o.stdout.contains("fails its checksum"), "{}", o.stdout);
    // Truncated.
    std::fs::write(&b, &data[..data.len() / 2]).unwrap();
    let o = inspect(&b);
    assert_eq!(o.code(), 1);
    assert!(o.stderr.contains("truncated") && o.stderr.contains("bad.state"), "{}", o.stderr);
    // Wrong magic and wrong version.
    let mut m = data.clone();
    m[0] = b'X';
    std::fs::write(&b, &m).unwrap();
    assert!(inspect(&b).stderr.contains("bad magic"));
    let mut v = data.clone();
    v[8] = 7;
    std::fs::write(&b, &v).unwrap();
    assert!(inspect(&b).stderr.contains("version 7"));
    // The completion record erased: never loadable.
    let mut c = data;
    let n = c.len();
    c[n - 4096..].fill(0);
    std::fs::write(&b, &c).unwrap();
    assert!(inspect(&b).stderr.contains("no completion record"));
}

/// QEMU's spelling on the same engine: migrate file:, query-migrate,
/// migrate_cancel; other URIs are errors.
#[test]
fn qemu_migrate_file_spelling() {
    if !require_kvm("qemu_migrate_file_spelling") {
        return;
    }
    let dir = Scratch::new("snap-migrate");
    let (p, mut q) = vm(&dir, "1", "128M", "work=mem mib=32 secs=inf rate=20");
    let file = dir.path("m.state");
    assert_eq!(q.ok("query-migrate", json!({})), json!({}));
    let r = q.cmd(json!({"execute": "migrate", "arguments": {"uri": "tcp:127.0.0.1:4444"}}));
    assert!(r["error"]["desc"].as_str().unwrap().contains("file:PATH"), "{r}");
    q.ok("migrate", json!({"uri": format!("file:{}", file.display())}));
    let t0 = std::time::Instant::now();
    let m = loop {
        let m = q.ok("query-migrate", json!({}));
        if m["status"] != "active" {
            break m;
        }
        assert!(t0.elapsed() < T);
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(m["status"], "completed", "{m}");
    assert!(m["ram"]["transferred"].as_u64().unwrap() > 0);
    assert!(m["setup-time"].as_u64().unwrap() <= m["total-time"].as_u64().unwrap(), "{m}");
    assert_eq!(inspect(&file).code(), 0);
    // migrate_cancel after the end changes nothing.
    q.ok("migrate_cancel", json!({}));
    assert_eq!(q.ok("query-migrate", json!({}))["status"], "completed");
    // migrate_cancel while it runs (to a target 50 ms late on every write):
    // the migration ends cancelled and leaves no loadable file.
    let slow = FaultFs::mount(&dir, "slow", &["--delay-us", "50000"]);
    let late = slow.path("late.state");
    q.ok("migrate", json!({"uri": format!("file:{}", late.display())}));
    assert_eq!(q.ok("query-migrate", json!({}))["status"], "active");
    q.ok("migrate_cancel", json!({}));
    let t0 = std::time::Instant::now();
    let m = loop {
        let m = q.ok("query-migrate", json!({}));
        if m["status"] != "active" && m["status"] != "cancelling" {
            break m;
        }
        assert!(t0.elapsed() < T, "the cancelled migration never ended: {m}");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(m["status"] == "cancelled" || m["status"] == "failed", "{m}");
    if late.exists() {
        assert_eq!(inspect(&late).code(), 1, "a cancelled migration left a loadable file");
    }
    assert_eq!(q.ok("query-status", json!({}))["status"], "running");
    q.ok("quit", json!({}));
    assert_eq!(p.wait(T).code(), 0);
}

/// Snapshots of a VM whose guest writes its disk flat out (two queues,
/// two vCPUs), with stop/cont during one of them: every snapshot
/// completes with the controller's state, the final pause quiesces the
/// queues without losing or failing a request (the guest fails on the
/// first failed I/O and on any completion 30 s late), the guest finishes
/// its timed run with exit 0, and every block of the file is either
/// untouched or whole pattern (no torn or misplaced write).
#[test]
fn snapshots_with_a_disk_under_write_load() {
    if !require_kvm("snapshots_with_a_disk_under_write_load") {
        return;
    }
    let dir = Scratch::new("snap-disk");
    let g = guest_elf(&dir);
    let disk = dir.path("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(64 << 20).unwrap();
    let sock = dir.path("qmp.sock");
    let mut p = Proc::spawn(
        Command::new(ringvm_bin())
            .args(["run", "--kernel", g.to_str().unwrap(), "--cpus", "2", "--memory", "128M", "--no-reboot"])
            .args(["--cmdline", "work=scsi-bench pattern=write bs=65536 qd=16 secs=15 mib=48 seed=13", "--disk"])
            .arg(format!("path={},cache=none", disk.display()))
            .arg("--qmp")
            .arg(&sock),
    );
    p.wait_for_output("virtio-scsi queues=2", T);
    let mut q = Qmp::negotiated(&sock);
    for i in 0..3 {
        let file = dir.path(&format!("vm{i}.state"));
        q.ok("savevm-start", json!({"statefile": file.to_str().unwrap()}));
        if i == 1 {
            q.ok("stop", json!({}));
            std::thread::sleep(Duration::from_millis(50));
            q.ok("cont", json!({}));
        }
        let s = q.wait_savevm(T);
        assert_eq!(s["status"], "completed", "snapshot {i}: {s}");
        q.ok("savevm-end", json!({}));
        let o = inspect(&file);
        assert_eq!(o.code(), 0, "{}\n{}", o.stdout, o.stderr);
        assert!(o.stdout.contains("1 disk(s)") && o.stdout.contains("checksums: all ok"), "{}", o.stdout);
    }
    // The guest was still writing through all three (it ends on its own).
    assert!(!p.stdout().contains(" iops="), "the guest's run ended before the snapshots did:\n{}", p.stdout());
    drop(q);
    let o = p.wait(T);
    assert_eq!(o.code(), 0, "{}\n{}", o.stdout, o.stderr);
    assert!(!o.stdout.contains("I/O failed") && !o.stdout.contains("needs reset") && !o.stdout.contains("timed out"), "{}", o.stdout);
    let line =
        o.stdout.lines().find(|l| l.contains("scsi-bench pattern=write") && l.contains(" iops=")).unwrap_or_else(|| panic!("no bench result:\n{}", o.stdout));
    let ops: u64 = line.split_whitespace().find_map(|w| w.strip_prefix("ops=")).and_then(|v| v.parse().ok()).unwrap();
    assert!(ops > 0, "{line}");
    let (torn, written) = blocks_torn_and_written(&disk, 13, 0, 65536);
    assert!(torn.is_empty(), "blocks neither untouched nor the guest's pattern at {:?}", &torn[..torn.len().min(8)]);
    assert!(written > 0, "nothing the guest wrote reached the file");
}

/// A snapshot never writes over the name it saves to: it writes a new file
/// beside it and renames it into place once complete. A cancelled one (or
/// a failed one) leaves an earlier good file at that name untouched, and
/// two VMs saving to one path at once leave one whole, loadable file.
#[test]
fn an_unfinished_snapshot_never_touches_the_file_at_its_name() {
    if !require_kvm("an_unfinished_snapshot_never_touches_the_file_at_its_name") {
        return;
    }
    let dir = Scratch::new("snap-atomic");
    let (p, mut q) = vm(&dir, "1", "256M", "work=mem mib=128 secs=inf rate=20");
    let good = dir.path("good.state");
    q.savevm_completes(&good, T);
    q.ok("savevm-end", json!({}));
    let before = std::fs::read(&good).unwrap();
    // The same name again, on a target 20 ms late on every write, cancelled.
    let slow = FaultFs::mount(&dir, "slow", &["--delay-us", "20000"]);
    let same = slow.path("good.state");
    std::fs::copy(&good, dir.path("slow-back").join("good.state")).unwrap();
    q.ok("savevm-start", json!({"statefile": same.to_str().unwrap()}));
    q.wait_savevm_bytes(1 << 20, T);
    q.ok("savevm-end", json!({}));
    let s = q.wait_savevm(T);
    assert_eq!(s["status"], "failed", "{s}");
    assert_eq!(std::fs::read(&same).unwrap(), before, "the cancelled snapshot changed the file at its name");
    assert_eq!(inspect(&same).code(), 0);
    let left = entries_after_cleanup(&slow.mnt, |n| n != "good.state");
    assert!(left.is_empty(), "the cancelled snapshot's file was not removed: {left:?}");
    q.ok("savevm-end", json!({}));
    // Two VMs, one path, at once: both complete, the file is whole.
    let dir2 = Scratch::new("snap-atomic-2");
    let (p2, mut q2) = vm(&dir2, "1", "256M", "work=mem mib=128 secs=inf rate=20");
    let shared = dir.path("shared.state");
    q.ok("savevm-start", json!({"statefile": shared.to_str().unwrap()}));
    q2.ok("savevm-start", json!({"statefile": shared.to_str().unwrap()}));
    assert_eq!(q.wait_savevm(T)["status"], "completed");
    assert_eq!(q2.wait_savevm(T)["status"], "completed");
    let o = inspect(&shared);
    assert_eq!(o.code(), 0, "{}\n{}", o.stdout, o.stderr);
    for (p, mut q) in [(p, q), (p2, q2)] {
        q.ok("quit", json!({}));
        assert_eq!(p.wait(T).code(), 0);
    }
    let stray = entries_after_cleanup(&dir.0, |n| n.contains(".ringvm-"));
    assert!(stray.is_empty(), "temporary files left: {stray:?}");
}

/// `quit` while a snapshot runs cancels it as savevm-end would. On a
/// local filesystem the file being written has no name (O_TMPFILE), so
/// nothing is left. To a slow (not stalled) FUSE target the VM exits
/// within its 0.9 s cancel window (it waited out the iothread's 10 s stop
/// deadline before) and nothing is at the state file's name; FUSE has no
/// unnamed files, and an unfinished file may stay under its temporary
/// name when the target cannot drain in time.
#[test]
fn quit_during_a_snapshot_cancels_it() {
    if !require_kvm("quit_during_a_snapshot_cancels_it") {
        return;
    }
    let local = Scratch::new("snap-quit-local");
    let (p, mut q) = vm(&local, "1", "256M", "work=mem mib=192 secs=inf rate=50");
    let file = local.path("vm.state");
    q.ok("savevm-start", json!({"statefile": file.to_str().unwrap(), "downtime-ms": 0}));
    q.wait_savevm_bytes(4 << 20, T);
    q.ok("quit", json!({}));
    assert_eq!(p.wait(Duration::from_secs(5)).code(), 0);
    let left: Vec<String> = std::fs::read_dir(&local.0).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(!left.iter().any(|n| n.contains("vm.state")), "a cancelled local snapshot left {left:?}");

    let dir = Scratch::new("snap-quit");
    let (p, mut q) = vm(&dir, "1", "512M", "work=mem mib=384 secs=inf rate=50");
    let slow = FaultFs::mount(&dir, "slow", &["--delay-us", "3000"]);
    let file = slow.path("vm.state");
    q.ok("savevm-start", json!({"statefile": file.to_str().unwrap()}));
    q.wait_savevm_bytes(4 << 20, T);
    q.ok("quit", json!({}));
    let t0 = Instant::now();
    let o = p.wait(Duration::from_secs(5));
    eprintln!("quit during the snapshot took {:?}", t0.elapsed());
    assert_eq!(o.code(), 0, "{}", o.stderr);
    assert!(!file.exists(), "a cancelled snapshot put a file at its name");
    let left: Vec<String> = std::fs::read_dir(&slow.mnt).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(left.iter().all(|n| n.starts_with(".vm.state.ringvm-")), "unexpected files {left:?}");
    for n in &left {
        assert_eq!(inspect(&slow.path(n)).code(), 1, "an unfinished file passes inspection");
    }
}

/// Names in `dir` matching `pred`, once none is left or after 10 s.
fn entries_after_cleanup(dir: &Path, pred: impl Fn(&str) -> bool) -> Vec<String> {
    let t0 = Instant::now();
    loop {
        let left: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| pred(n)).collect();
        if left.is_empty() || t0.elapsed() > Duration::from_secs(10) {
            return left;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Pages per beat (100 ms) over the last `n` beats of the guest's output
/// (whole lines only: the serial port delivers a line a byte at a time).
fn beat_rate(out: &str, n: usize) -> f64 {
    beat_field_rate(out, "pages=", n)
}

/// A heartbeat field's (`pages=`, `spins=`) growth per beat over the last
/// `n` beats.
fn beat_field_rate(out: &str, field: &str, n: usize) -> f64 {
    let pages: Vec<u64> = out
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| l.split("beat ").nth(1))
        .filter_map(|r| r.split(field).nth(1))
        .filter_map(|p| p.split_whitespace().next()?.parse().ok())
        .collect();
    let k = pages.len();
    assert!(k > n, "only {k} beats");
    (pages[k - 1] - pages[k - 1 - n]) as f64 / n as f64
}

/// A test guest rewriting 48 MiB of its 128 MiB as fast as it can (run
/// options `run`, guest options `words`), with QMP, beside an NFS stand-in
/// answering every request 3 ms late; returned once its sixth heartbeat
/// began (beats 1 to 5 are whole lines).
fn writer_beside_a_slow_target(name: &str, run: &[&str], words: &str) -> (Scratch, FaultFs, PathBuf, Proc, Qmp) {
    let dir = Scratch::new(name);
    let fs = FaultFs::mount(&dir, "slow", &["--delay-us", "3000"]);
    let g = guest_elf(&dir);
    let sock = dir.path("qmp.sock");
    let mut p = Proc::spawn(
        Command::new(ringvm_bin())
            .args(["run", "--kernel", g.to_str().unwrap(), "--memory", "128M"])
            .args(run)
            .args(["--cmdline", &format!("work=mem mib=48 secs=inf rate=0 beat=100{words}"), "--qmp"])
            .arg(&sock),
    );
    p.wait_for_output("ringvm-guest: beat 6", T);
    let q = Qmp::negotiated(&sock);
    (dir, fs, g, p, q)
}

/// Cancels the running snapshot (`savevm-end`), checks it failed, and
/// returns the guest's page rate over the 4 heartbeats that follow.
fn cancel_then_beat_rate(q: &mut Qmp, p: &Proc) -> f64 {
    q.ok("savevm-end", json!({}));
    let s = q.wait_savevm(T);
    assert_eq!(s["status"], "failed", "{s}");
    q.ok("savevm-end", json!({}));
    let seen = p.stdout().matches("ringvm-guest: beat").count();
    p.wait_for_more("ringvm-guest: beat", seen + 5, T);
    beat_rate(&p.stdout(), 4)
}

/// Ends the VM (`quit`), restores `file` in a new one and has its guest
/// verify every page of the 48 MiB it rewrote.
fn quit_then_the_restored_guest_verifies(mut q: Qmp, p: Proc, file: &Path) {
    q.ok("savevm-end", json!({}));
    q.ok("quit", json!({}));
    assert_eq!(p.wait(T).code(), 0);
    let mut r = Proc::spawn_with_stdin(Command::new(ringvm_bin()).args(["run", "--loadstate", file.to_str().unwrap()]));
    r.wait_for_output("ringvm-guest: beat", T);
    r.type_serial(b"v");
    let o = r.wait(T);
    assert_eq!(o.code(), 0, "{}\n{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("verify pages=12288 bad=0") && o.stdout.contains("RESULT PASS"), "{}", o.stdout);
}

/// A guest that dirties memory faster than its target takes it (an
/// unpaced writer against ringvm-faultfs at +3 ms per request, ~40 MB/s
/// here) only finishes with a convergence policy. First, with a downtime
/// target it can never meet (so the snapshot is certainly still running):
/// `converge: auto` throttles the vCPUs (QEMU's auto-converge: 60% after
/// two passes it out-dirtied, +20% each time again) and the guest slows;
/// cancelled, the throttle ends at once and the guest's speed comes back.
/// Then a normal snapshot converges with a short pause, and its file
/// restores to a guest that verifies every page.
#[test]
fn auto_converge_finishes_against_a_slow_target() {
    if !require_kvm("auto_converge_finishes_against_a_slow_target") {
        return;
    }
    let (_dir, fs, _g, p, mut q) = writer_beside_a_slow_target("snap-autoconverge", &[], "");
    let before = beat_rate(&p.stdout(), 4);
    let file = fs.path("vm.state");
    let r = q.cmd(json!({"execute": "savevm-start", "arguments": {"statefile": file.to_str().unwrap(), "converge": "bogus"}}));
    assert!(r["error"]["desc"].as_str().unwrap_or_default().contains("'converge'"), "{r}");
    let auto = |downtime: f64| json!({"statefile": file.to_str().unwrap(), "converge": "auto", "cpu-throttle-initial": 60, "cpu-throttle-increment": 20, "downtime-ms": downtime});
    let beats = |p: &Proc| p.stdout().matches("ringvm-guest: beat").count();
    // A: never converges (downtime 0); throttled, then cancelled.
    q.ok("savevm-start", auto(0.0));
    let t0 = Instant::now();
    while q.ok("query-savevm", json!({}))["cpu-throttle-percentage"].as_u64().unwrap_or(0) < 80 {
        assert!(t0.elapsed() < T, "the throttle never reached 80%");
        std::thread::sleep(Duration::from_millis(20));
    }
    p.wait_for_more("ringvm-guest: beat", beats(&p) + 4, T);
    let throttled = beat_rate(&p.stdout(), 3);
    let s = q.ok("query-savevm", json!({}));
    assert_eq!(s["status"], "active", "{s}");
    assert!(throttled < before * 0.5, "the throttle did not slow the guest: before {before:.0}, throttled {throttled:.0}");
    let after_cancel = cancel_then_beat_rate(&mut q, &p);
    assert!(after_cancel > before * 0.5, "the guest stayed slow after the cancel: before {before:.0}, after {after_cancel:.0}");
    // B: converges.
    q.ok("savevm-start", auto(5.0));
    let s = q.wait_savevm(T);
    assert_eq!(s["status"], "completed", "{s}");
    assert_eq!(s["stalled"], false, "{s}");
    assert!(s["cpu-throttle-percentage"].as_u64().unwrap() >= 60, "{s}");
    assert!(s["downtime"].as_f64().unwrap() < 1000.0, "{s}");
    p.wait_for_more("ringvm-guest: beat", beats(&p) + 5, T);
    let after = beat_rate(&p.stdout(), 4);
    eprintln!("pages per 100 ms: before {before:.0}, throttled {throttled:.0}, after a cancel {after_cancel:.0}, after completion {after:.0}; snapshot {s}");
    assert!(after > before * 0.5, "the guest stayed slow: before {before:.0}, after {after:.0}");
    // The restored guest carries on and verifies every page.
    quit_then_the_restored_guest_verifies(q, p, &file);
}

/// dirty-limit (savevm-start's default with `--dirty-ring`): with two
/// vCPUs of which only one dirties (guest `workers=1`; the other counts
/// spins), against the +3 ms target, only the dirtying vCPU gets a limit
/// and slows, the other keeps its speed; cancelled, the limit ends at
/// once. Then a snapshot converges with a short pause and its file
/// restores to a guest that verifies every page. Without `--dirty-ring`
/// (KVM's bitmap) dirty-limit is refused with the reason.
#[test]
fn dirty_limit_slows_only_the_vcpu_that_dirties() {
    if !require_kvm("dirty_limit_slows_only_the_vcpu_that_dirties") {
        return;
    }
    let (dir, fs, g, p, mut q) = writer_beside_a_slow_target("snap-dirtylimit", &["--cpus", "2", "--dirty-ring", "1024"], " workers=1");
    let (before, spins_before) = (beat_rate(&p.stdout(), 4), beat_field_rate(&p.stdout(), "spins=", 4));
    let file = fs.path("vm.state");
    let beats = |p: &Proc| p.stdout().matches("ringvm-guest: beat").count();
    // A: never converges (downtime 0); the default policy limits vCPU 0.
    q.ok("savevm-start", json!({"statefile": file.to_str().unwrap(), "downtime-ms": 0.0}));
    let t0 = Instant::now();
    let limits = loop {
        let s = q.ok("query-savevm", json!({}));
        if let Some(l) = s.get("vcpu-dirty-limit-mbps") {
            break l.clone();
        }
        assert!(t0.elapsed() < T, "no dirty limit was set: {s}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(limits[0].as_u64().unwrap() > 0 && limits[1] == 0, "only vCPU 0 dirties, yet the limits are {limits}");
    p.wait_for_more("ringvm-guest: beat", beats(&p) + 5, T);
    let (limited, spins_limited) = (beat_rate(&p.stdout(), 4), beat_field_rate(&p.stdout(), "spins=", 4));
    let s = q.ok("query-savevm", json!({}));
    assert_eq!(s["status"], "active", "{s}");
    assert!(s["dirty-limit-throttle-time"].as_u64().unwrap_or(0) > 0, "the limited vCPU never slept: {s}");
    assert!(limited < before * 0.5, "the limit did not slow the dirtying vCPU: before {before:.0}, limited {limited:.0}; {s}");
    assert!(spins_limited > spins_before * 0.5, "the idle vCPU slowed too: spins before {spins_before:.0}, limited {spins_limited:.0}");
    let after_cancel = cancel_then_beat_rate(&mut q, &p);
    // Back to speed: far above the limited rate (with some margin for the
    // other tests sharing this host's two cores).
    let back = (limited * 4.0).max(before * 0.25);
    assert!(after_cancel > back, "the guest stayed slow after the cancel: before {before:.0}, limited {limited:.0}, after {after_cancel:.0}");
    // B: converges.
    q.ok("savevm-start", json!({"statefile": file.to_str().unwrap(), "converge": "dirty-limit", "downtime-ms": 5.0}));
    let s = q.wait_savevm(T);
    assert_eq!(s["status"], "completed", "{s}");
    assert_eq!(s["stalled"], false, "{s}");
    assert!(s["downtime"].as_f64().unwrap() < 1000.0, "{s}");
    p.wait_for_more("ringvm-guest: beat", beats(&p) + 5, T);
    let after = beat_rate(&p.stdout(), 4);
    eprintln!("pages per 100 ms: before {before:.0}, limited {limited:.0}, after a cancel {after_cancel:.0}, after completion {after:.0}; spins before {spins_before:.0}, limited {spins_limited:.0}; snapshot {s}");
    assert!(after > back, "the guest stayed slow: before {before:.0}, limited {limited:.0}, after {after:.0}");
    quit_then_the_restored_guest_verifies(q, p, &file);
    // KVM's bitmap (the default) instead of the rings: dirty-limit cannot work.
    let sock2 = dir.path("qmp2.sock");
    let mut p2 = Proc::spawn(
        Command::new(ringvm_bin())
            .args(["run", "--kernel", g.to_str().unwrap(), "--memory", "64M"])
            .args(["--cmdline", "work=mem mib=8 secs=inf rate=10 beat=100", "--qmp"])
            .arg(&sock2),
    );
    p2.wait_for_output("ringvm-guest: beat 1", T);
    let mut q2 = Qmp::negotiated(&sock2);
    let r = q2.cmd(json!({"execute": "savevm-start", "arguments": {"statefile": dir.path("b.state").to_str().unwrap(), "converge": "dirty-limit"}}));
    assert!(r["error"]["desc"].as_str().unwrap_or_default().contains("dirty ring"), "{r}");
    // ... and a snapshot without a policy still works on the bitmap.
    q2.ok("savevm-start", json!({"statefile": dir.path("b.state").to_str().unwrap()}));
    assert_eq!(q2.wait_savevm(T)["status"], "completed");
    q2.ok("quit", json!({}));
    assert_eq!(p2.wait(T).code(), 0);
}
