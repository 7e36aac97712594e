//! Restore: snapshot a guest mid-workload, restore it in a fresh ringvm,
//! the guest carries on and verifies every page; chains of snapshots;
//! and every kind of bad file is a one-line error before anything runs.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::qmp::Qmp;
use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(120);

/// Boots (or restores) with QMP and snapshots to `file` once the guest
/// printed `wait_for`; the snapshot must complete. The VM keeps running.
fn start_and_snapshot(dir: &Scratch, args: &[&str], file: &Path, wait_for: &str) -> (Proc, Qmp) {
    let sock = dir.path("qmp.sock");
    let _ = std::fs::remove_file(&sock);
    let mut p = Proc::spawn(Command::new(ringvm_bin()).args(args).arg("--qmp").arg(&sock));
    p.wait_for_output(wait_for, T);
    let mut q = Qmp::negotiated(&sock);
    q.savevm_completes(file, T);
    q.ok("savevm-end", json!({}));
    (p, q)
}

/// [`start_and_snapshot`], then lets the guest finish; returns its output.
fn run_and_snapshot(dir: &Scratch, args: &[&str], file: &Path, wait_for: &str) -> Output {
    let (p, q) = start_and_snapshot(dir, args, file, wait_for);
    drop(q);
    p.wait(T)
}

/// [`start_and_snapshot`], then quits the VM at once (its guest may have
/// long to run: time the restored one needs).
fn snapshot_and_quit(dir: &Scratch, args: &[&str], file: &Path, wait_for: &str) {
    let (p, mut q) = start_and_snapshot(dir, args, file, wait_for);
    q.ok("quit", json!({}));
    assert_eq!(p.wait(T).code(), 0);
}

fn snapshot_restore_verify(cpus: &str) {
    let dir = Scratch::new(&format!("restore-{cpus}"));
    let g = guest_elf(&dir);
    let file = dir.path("vm.state");
    let work = "work=mem mib=96 secs=3 rate=50 beat=200";
    let o =
        run_and_snapshot(&dir, &["run", "--kernel", g.to_str().unwrap(), "--cpus", cpus, "--memory", "192M", "--cmdline", work], &file, "ringvm-guest: beat 2");
    assert_eq!(o.code(), 0, "{}", o.stdout);
    let beats_before = o.stdout.matches("ringvm-guest: beat").count();
    // The restored guest resumes inside its dirty loop (no new start
    // banner), finishes it and verifies every page against its table.
    let r = ringvm(&["run", "--loadstate", file.to_str().unwrap()], T);
    assert_eq!(r.code(), 0, "stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    assert!(!r.stdout.contains("ringvm-guest: start"), "the restored guest rebooted:\n{}", r.stdout);
    assert!(r.stdout.contains("verify pages=24576 bad=0"), "{}", r.stdout);
    assert!(r.stdout.contains("RESULT PASS"));
    assert!(beats_before >= 2);
}

#[test]
fn restore_one_vcpu_verifies() {
    if require_kvm("restore_one_vcpu_verifies") {
        snapshot_restore_verify("1");
    }
}

#[test]
fn restore_two_vcpus_verifies() {
    if require_kvm("restore_two_vcpus_verifies") {
        snapshot_restore_verify("2");
    }
}

/// Starts `ringvm ARGS --qmp SOCK` and waits (with a deadline) until the
/// restore is done and the guest runs.
fn restored_running(sock: &Path, args: &[&str]) -> (Proc, Qmp) {
    let p = Proc::spawn(Command::new(ringvm_bin()).args(args).arg("--qmp").arg(sock));
    let mut q = Qmp::negotiated(sock);
    let t0 = std::time::Instant::now();
    while q.ok("query-status", json!({}))["status"] == "inmigrate" {
        assert!(t0.elapsed() < T, "restore never finished");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(q.ok("query-status", json!({}))["status"], "running");
    (p, q)
}

/// Restore, run, snapshot again, three times over.
#[test]
fn chain_of_three_restores() {
    if !require_kvm("chain_of_three_restores") {
        return;
    }
    let dir = Scratch::new("restore-chain");
    let g = guest_elf(&dir);
    let work = "work=mem mib=48 secs=inf rate=30 beat=100";
    let mut prev = dir.path("s0.state");
    // Generation 0: boot; snapshot; quit.
    {
        let sock = dir.path("qmp.sock");
        let mut p =
            Proc::spawn(Command::new(ringvm_bin()).args(["run", "--kernel", g.to_str().unwrap(), "--memory", "128M", "--cmdline", work, "--qmp"]).arg(&sock));
        p.wait_for_output("ringvm-guest: beat 2", T);
        let mut q = Qmp::negotiated(&sock);
        q.savevm_completes(&prev, T);
        q.ok("quit", json!({}));
        assert_eq!(p.wait(T).code(), 0);
    }
    for gen in 1..=3 {
        let next = dir.path(&format!("s{gen}.state"));
        let sock = dir.path("qmp.sock");
        let _ = std::fs::remove_file(&sock);
        let (mut p, mut q) = restored_running(&sock, &["run", "--loadstate", prev.to_str().unwrap()]);
        // It makes progress after the restore: two more heartbeats.
        p.wait_for_output("ringvm-guest: beat", T);
        let n = p.stdout().matches("ringvm-guest: beat").count();
        p.wait_for_more("ringvm-guest: beat", n + 1, T);
        assert!(!p.stdout().contains("ringvm-guest: start"), "generation {gen} rebooted");
        q.ok("savevm-start", json!({"statefile": next.to_str().unwrap()}));
        assert_eq!(q.wait_savevm(T)["status"], "completed", "generation {gen}");
        q.ok("quit", json!({}));
        assert_eq!(p.wait(T).code(), 0);
        prev = next;
    }
    // The last generation runs on, then stops its loop on 'v' (typed on
    // its serial port) and verifies every page against its table.
    let o = ringvm(&["state", "inspect", prev.to_str().unwrap()], T);
    assert_eq!(o.code(), 0, "{}", o.stdout);
    let mut p = Proc::spawn_with_stdin(Command::new(ringvm_bin()).args(["run", "--loadstate", prev.to_str().unwrap()]));
    p.wait_for_output("ringvm-guest: beat", T);
    p.type_serial(b"v");
    let o = p.wait(T);
    assert_eq!(o.code(), 0, "{}\n{}", o.stdout, o.stderr);
    assert!(!o.stdout.contains("ringvm-guest: start"), "the last generation rebooted:\n{}", o.stdout);
    assert!(o.stdout.contains("ringvm-guest: stop requested"), "{}", o.stdout);
    assert!(o.stdout.contains("verify pages=12288 bad=0") && o.stdout.contains("RESULT PASS"), "{}", o.stdout);
}

/// `--restore-ram map` (the default for tmpfs): guest RAM becomes a
/// private mapping of the file. The guest carries on and verifies every
/// page; a snapshot to that same file while the VM runs writes a new file
/// in its place (a new inode: truncating the old one would take the
/// guest's pages away) and the guest is not disturbed; the new file
/// restores too.
#[test]
fn mapped_restore_verifies_and_saves_over_its_own_file() {
    use std::os::unix::fs::MetadataExt;
    if !require_kvm("mapped_restore_verifies_and_saves_over_its_own_file") {
        return;
    }
    let dir = Scratch::new("restore-map");
    let g = guest_elf(&dir);
    let file = dir.path("vm.state");
    // 10 s of dirtying: the restored guest must still be in it when its
    // snapshot (slow on a loaded CI machine) completes.
    let work = "work=mem mib=96 secs=10 rate=50 beat=200";
    snapshot_and_quit(&dir, &["run", "--kernel", g.to_str().unwrap(), "--memory", "192M", "--cmdline", work], &file, "ringvm-guest: beat 2");
    let ino = std::fs::metadata(&file).unwrap().ino();
    let sock = dir.path("qmp.sock");
    let _ = std::fs::remove_file(&sock);
    let (p, mut q) = restored_running(&sock, &["run", "--loadstate", file.to_str().unwrap(), "--restore-ram", "map"]);
    q.savevm_completes(&file, T);
    q.ok("savevm-end", json!({}));
    drop(q);
    let r = p.wait(T);
    assert_eq!(r.code(), 0, "stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    assert!(!r.stdout.contains("ringvm-guest: start"), "the restored guest rebooted:\n{}", r.stdout);
    assert!(r.stdout.contains("verify pages=24576 bad=0"), "{}", r.stdout);
    assert_ne!(std::fs::metadata(&file).unwrap().ino(), ino, "the mapped file was rewritten in place");
    // Both modes at once (each guest has most of its 10 s still to run).
    let runs: Vec<_> = ["map", "read"]
        .into_iter()
        .map(|mode| {
            let f = file.clone();
            (mode, std::thread::spawn(move || ringvm(&["run", "--loadstate", f.to_str().unwrap(), "--restore-ram", mode], T)))
        })
        .collect();
    for (mode, h) in runs {
        let r = h.join().unwrap();
        assert_eq!(r.code(), 0, "{mode}: stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
        assert!(r.stdout.contains("verify pages=24576 bad=0"), "{mode}: {}", r.stdout);
    }
}

/// Lazy restore (2 vCPUs dirtying memory when saved): the guest runs as
/// soon as its state is applied (MIGRATION postcopy-active, then completed
/// once all of RAM is in), finishes its dirty loop and verifies every page;
/// a snapshot is refused until the load completes. A page corrupted in the
/// file ends the process with status 1 and the page's address, and the
/// `--loadstate FILE,lazy=on` spelling works.
#[test]
fn lazy_restore_runs_first_and_verifies() {
    if !require_kvm("lazy_restore_runs_first_and_verifies") {
        return;
    }
    let dir = Scratch::new("restore-lazy");
    let g = guest_elf(&dir);
    let file = dir.path("vm.state");
    let work = "work=mem mib=160 secs=8 rate=50 beat=200";
    snapshot_and_quit(&dir, &["run", "--kernel", g.to_str().unwrap(), "--cpus", "2", "--memory", "256M", "--cmdline", work], &file, "ringvm-guest: beat 2");
    // The state file behind a FUSE that answers every read 100 ms late:
    // the lazy window (guest running, RAM still streaming) lasts seconds.
    let slow = FaultFs::mount(&dir, "slow", &["--delay-us", "100000"]);
    std::fs::copy(&file, dir.path("slow-back").join("vm.state")).unwrap();
    let slow_file = slow.path("vm.state");
    let sock = dir.path("lazy.sock");
    let (p, mut q) = restored_running(&sock, &["run", "--loadstate", slow_file.to_str().unwrap(), "--restore-ram", "lazy"]);
    let m = q.ok("query-migrate", json!({}));
    assert_eq!(m["status"], "postcopy-active", "{m}");
    let r = q.cmd(json!({"execute": "savevm-start", "arguments": {"statefile": dir.path("during.state").to_str().unwrap()}}));
    assert!(r["error"]["desc"].as_str().unwrap_or_default().contains("still loading RAM"), "{r}");
    // The guest runs before all of its RAM is in: a heartbeat printed
    // after the restore while the load is still going.
    let beats = p.stdout().matches("ringvm-guest: beat").count();
    p.wait_for_more("ringvm-guest: beat", beats, T);
    let m = q.ok("query-migrate", json!({}));
    assert_eq!(m["status"], "postcopy-active", "the guest printed only once all RAM was in: {m}");
    let ev = q.wait_event("MIGRATION");
    let ev = if ev["data"]["status"] == "postcopy-active" { q.wait_event("MIGRATION") } else { ev };
    assert_eq!(ev["data"]["status"], "completed", "{ev}");
    let m = q.ok("query-migrate", json!({}));
    assert_eq!(m["status"], "completed", "{m}");
    assert!(m["ram"]["transferred"].as_u64().unwrap_or(0) >= 140 << 20, "{m}");
    // Once in, a snapshot works (of the restored guest, still dirtying).
    q.savevm_completes(&dir.path("after.state"), T);
    q.ok("savevm-end", json!({}));
    drop(q);
    let o = p.wait(T);
    assert_eq!(o.code(), 0, "stdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    assert!(!o.stdout.contains("ringvm-guest: start"), "the restored guest rebooted:\n{}", o.stdout);
    assert!(o.stdout.contains("verify pages=40960 bad=0"), "{}", o.stdout);
    // A flipped bit 100 MiB into the guest's pages: found while the guest runs.
    let mut v = std::fs::read(&file).unwrap();
    v[(1 << 20) + (100 << 20) + 777] ^= 1;
    let bad = dir.path("bad.state");
    std::fs::write(&bad, &v).unwrap();
    let arg = format!("{},lazy=on", bad.display());
    let o = ringvm(&["run", "--loadstate", &arg], T);
    assert_eq!(o.code(), 1, "stdout {}\nstderr {}", o.stdout, o.stderr);
    assert!(o.stderr.contains("bad.state") && o.stderr.contains("lazy restore failed") && o.stderr.contains("fails its checksum"), "{}", o.stderr);
    assert!(!o.stdout.contains("RESULT PASS"), "the guest finished on a bad page: {}", o.stdout);
}

#[test]
fn bad_state_files_are_one_line_errors() {
    if !require_kvm("bad_state_files_are_one_line_errors") {
        return;
    }
    let dir = Scratch::new("restore-bad");
    let g = guest_elf(&dir);
    let file = dir.path("vm.state");
    let o = run_and_snapshot(
        &dir,
        &["run", "--kernel", g.to_str().unwrap(), "--memory", "64M", "--cmdline", "work=mem mib=16 secs=2 rate=10 beat=100"],
        &file,
        "ringvm-guest: beat 1",
    );
    assert_eq!(o.code(), 0);
    let good = std::fs::read(&file).unwrap();
    let bad = dir.path("bad.state");
    let check = |data: &[u8], extra: &[&str], want: &str| {
        std::fs::write(&bad, data).unwrap();
        let mut args = vec!["run", "--loadstate", bad.to_str().unwrap()];
        args.extend_from_slice(extra);
        let o = ringvm(&args, T);
        assert_eq!(o.code(), 1, "{want}: stdout {}", o.stdout);
        let line = o.stderr.trim();
        assert_eq!(line.lines().count(), 1, "{want}: {line}");
        assert!(line.contains("bad.state") && line.contains(want), "{want}: {line}");
        assert!(!o.stdout.contains("ringvm-guest"), "{want}: the guest ran");
    };
    check(&good[..good.len() / 2], &[], "truncated");
    let mut v = good.clone();
    let n = v.len();
    v[n - 4096..].fill(0);
    check(&v, &[], "no completion record");
    let mut v = good.clone();
    v[0] = b'Z';
    check(&v, &[], "bad magic");
    let mut v = good.clone();
    v[8] = 2;
    check(&v, &[], "version 2");
    // A page of the workload (16 MiB in) with one bit flipped.
    let mut v = good.clone();
    v[(1 << 20) + (16 << 20) + 12345] ^= 1;
    check(&v, &[], "fails its checksum");
    check(&v, &["--restore-ram", "map"], "fails its checksum");
    // The state section corrupted.
    let mut v = good.clone();
    let hlen = u32::from_le_bytes(v[12..16].try_into().unwrap()) as usize;
    let h: serde_json::Value = serde_json::from_slice(&v[32..32 + hlen]).unwrap();
    let so = h["state_offset"].as_u64().unwrap() as usize;
    v[so + 40] ^= 0x20;
    check(&v, &[], "state section checksum mismatch");
    // What the command line says must agree with the file.
    check(&good, &["--memory", "128M"], "--memory 128 MiB but the file holds 64 MiB");
    check(&good, &["--cpus", "3"], "--cpus 3 but the file holds 1");
    // Values equal to the defaults, given explicitly, are checked too.
    check(&good, &["--memory", "512M"], "--memory 512 MiB but the file holds 64 MiB");
    let o = ringvm(&["run", "--loadstate", dir.path("missing.state").to_str().unwrap()], T);
    assert_eq!(o.code(), 1);
    assert!(o.stderr.contains("missing.state") && o.stderr.contains("No such file"), "{}", o.stderr);
}

/// QEMU's spelling: --incoming defer, then migrate-incoming file:PATH over
/// QMP; query-status says inmigrate while RAM loads and QMP keeps
/// answering; -S leaves the restored VM paused until cont.
#[test]
fn incoming_defer_and_qmp_during_the_load() {
    if !require_kvm("incoming_defer_and_qmp_during_the_load") {
        return;
    }
    let dir = Scratch::new("restore-incoming");
    let g = guest_elf(&dir);
    let file = dir.path("big.state");
    // A 1 GiB guest with 900 MiB of data.
    let o = run_and_snapshot(
        &dir,
        &["run", "--kernel", g.to_str().unwrap(), "--memory", "1G", "--cmdline", "work=mem mib=900 secs=8 rate=10 beat=100"],
        &file,
        "ringvm-guest: beat 1",
    );
    assert_eq!(o.code(), 0);
    let sock = dir.path("in.sock");
    let p = Proc::spawn(Command::new(ringvm_bin()).args(["run", "--incoming", "defer", "-S", "--memory", "1G", "--qmp"]).arg(&sock));
    let mut q = Qmp::negotiated(&sock);
    assert_eq!(q.ok("query-status", json!({}))["status"], "inmigrate");
    // Bad requests first: wrong URI, a file that does not match.
    assert!(q.cmd(json!({"execute": "migrate-incoming", "arguments": {"uri": "tcp:1.2.3.4:5"}}))["error"].is_object());
    let small = dir.path("small.state");
    std::fs::write(&small, b"not a state file").unwrap();
    let r = q.cmd(json!({"execute": "migrate-incoming", "arguments": {"uri": format!("file:{}", small.display())}}));
    assert!(r["error"]["desc"].as_str().unwrap().contains("small.state"), "{r}");
    q.ok("migrate-incoming", json!({"uri": format!("file:{}", file.display())}));
    // QMP answers while RAM loads.
    let mut answered = 0;
    let t0 = std::time::Instant::now();
    loop {
        let st = q.ok("query-status", json!({}));
        answered += 1;
        if st["status"] != "inmigrate" {
            assert_eq!(st["status"], "paused", "-S keeps it paused");
            break;
        }
        let m = q.ok("query-migrate", json!({}));
        assert!(m["ram"]["total"].as_u64().unwrap() >= 900 << 20, "{m}");
        assert!(t0.elapsed() < T);
    }
    assert!(answered >= 2, "QMP was not answered during the load");
    assert_eq!(q.ok("query-migrate", json!({}))["status"], "completed");
    assert!(!p.stdout().contains("ringvm-guest: dirty done"), "the guest ran before cont");
    q.ok("cont", json!({}));
    let o = p.wait(T);
    assert_eq!(o.code(), 0, "{}", o.stderr);
    assert!(o.stdout.contains("verify pages=230400 bad=0"), "{}", o.stdout);
}

/// Waits (deadline T) until the guest has printed `n` scsi-verify pass lines.
fn wait_passes(p: &Proc, n: usize, what: &str) {
    let t0 = std::time::Instant::now();
    while p.stdout().matches("scsi-verify pass").count() < n {
        assert!(t0.elapsed() < T, "{what}:\n{}\n{}", p.stdout(), p.stderr());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Every scsi-verify pass line says bad=0 (the last one may be cut short
/// by quit) and no chunk reported bad words.
fn assert_passes_clean(stdout: &str) {
    // Whole lines only: quit may cut the last one mid-number ("bad=").
    for line in complete_lines(stdout).lines().filter(|l| l.contains("scsi-verify pass") && l.contains(" bad=")) {
        assert!(line.ends_with(" bad=0"), "{line}\n{stdout}");
    }
    assert!(!stdout.contains("bad words"), "{stdout}");
}

/// A VM with a disk, snapshotted while its guest reads and verifies the
/// disk in a loop: the disk's reads land in guest RAM behind KVM's dirty
/// log, the final pause quiesces the queues, and the restored VM (disks
/// from the state file) resumes mid-loop with every buffer and used-ring
/// entry in place -- any page the snapshot missed is a bad word or a hang.
#[test]
fn restore_with_disk_under_verify_load() {
    if !require_kvm("restore_with_disk_under_verify_load") {
        return;
    }
    let dir = Scratch::new("restore-disk");
    let g = guest_elf(&dir);
    let disk = dir.path("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(16 << 20).unwrap();
    let file = dir.path("vm.state");
    let sock = dir.path("qmp.sock");
    let work = "work=scsi-verify mib=8 bs=65536 qd=8 seed=5 passes=1000000";
    let mut p = Proc::spawn(
        Command::new(ringvm_bin())
            .args(["run", "--kernel", g.to_str().unwrap(), "--memory", "128M", "--cmdline", work, "--disk"])
            .arg(format!("path={},cache=none", disk.display()))
            .arg("--qmp")
            .arg(&sock),
    );
    p.wait_for_output("scsi-verify pass 3 bad=0", T);
    let mut q = Qmp::negotiated(&sock);
    let qb = q.ok("query-block", json!({}));
    assert_eq!(qb.as_array().map(Vec::len), Some(1), "{qb}");
    q.ok("savevm-start", json!({"statefile": file.to_str().unwrap()}));
    let s = q.wait_savevm(T);
    assert_eq!(s["status"], "completed", "{s}");
    // The guest kept verifying after the pause (queues resumed).
    wait_passes(&p, p.stdout().matches("scsi-verify pass").count() + 2, "no progress after the snapshot");
    q.ok("quit", json!({}));
    let o = p.wait(T);
    assert_eq!(o.code(), 0, "{}", o.stdout);
    assert!(!o.stdout.contains("bad words") && !o.stdout.contains("status "), "{}", o.stdout);

    let info = ringvm(&["state", "inspect", file.to_str().unwrap()], T);
    assert_eq!(info.code(), 0, "{}", info.stdout);
    assert!(info.stdout.contains("1 disk(s)"), "{}", info.stdout);

    // Restore with the disk the file names; the guest goes on verifying.
    // Lazily too: then the disk's reads land in pages still missing, and
    // the guest's buffers come in by fault.
    for mode in ["read", "lazy"] {
        let _ = std::fs::remove_file(&sock);
        let r = Proc::spawn(Command::new(ringvm_bin()).args(["run", "--loadstate", file.to_str().unwrap(), "--restore-ram", mode, "--qmp"]).arg(&sock));
        let mut q = Qmp::negotiated(&sock);
        wait_passes(&r, 3, "the restored guest made no progress");
        assert_eq!(q.ok("query-status", json!({}))["status"], "running");
        q.ok("quit", json!({}));
        let o = r.wait(T);
        assert_eq!(o.code(), 0, "{mode}: {}\n{}", o.stdout, o.stderr);
        assert!(!o.stdout.contains("ringvm-guest: start"), "{mode}: the restored guest rebooted:\n{}", o.stdout);
        assert_passes_clean(&o.stdout);
        assert!(!o.stdout.contains("status "), "{mode}: {}", o.stdout);
    }

    // The wrong disk is refused before anything runs.
    let other = dir.path("other.img");
    std::fs::File::create(&other).unwrap().set_len(16 << 20).unwrap();
    let o = ringvm(&["run", "--loadstate", file.to_str().unwrap(), "--disk", other.to_str().unwrap()], T);
    assert_eq!(o.code(), 1, "{}", o.stdout);
    assert!(o.stderr.contains("disk 0: it was") && o.stderr.contains("disk.img") && o.stderr.contains("other.img"), "{}", o.stderr);
}

/// `"disks": "clone"`: the disk is reflinked during the final pause, the
/// state file names the clone, and a restore runs on it -- even after the
/// original disk was wiped. On a filesystem without reflink the request
/// is refused before the snapshot starts.
#[test]
fn disks_clone_reflinks_during_the_pause() {
    if !require_kvm("disks_clone_reflinks_during_the_pause") {
        return;
    }
    let scratch = Scratch::new("restore-clone");
    let g = guest_elf(&scratch);
    // Refused where reflink is not supported (the scratch dir, when it is such a filesystem).
    {
        let a = scratch.path("probe-a");
        std::fs::write(&a, b"x").unwrap();
        if ringvm::disk::reflink(a.to_str().unwrap(), scratch.path("probe-b").to_str().unwrap()).is_err() {
            let disk = scratch.path("plain.img");
            std::fs::File::create(&disk).unwrap().set_len(1 << 20).unwrap();
            let sock = scratch.path("plain.sock");
            let p = Proc::spawn(
                Command::new(ringvm_bin())
                    .args([
                        "run",
                        "--kernel",
                        g.to_str().unwrap(),
                        "--memory",
                        "64M",
                        "--cmdline",
                        "work=mem mib=8 secs=inf",
                        "--disk",
                        disk.to_str().unwrap(),
                        "--qmp",
                    ])
                    .arg(&sock),
            );
            let mut q = Qmp::negotiated(&sock);
            let r = q.cmd(json!({"execute": "savevm-start", "arguments": {"statefile": scratch.path("plain.state").to_str().unwrap(), "disks": "clone"}}));
            let desc = r["error"]["desc"].as_str().unwrap_or_default().to_string();
            assert!(desc.contains("reflink") && desc.contains("plain.img"), "{r}");
            assert_eq!(q.ok("query-savevm", json!({})), json!({}), "nothing started");
            let r = q.cmd(json!({"execute": "savevm-start", "arguments": {"statefile": "/tmp/x", "disks": "copy"}}));
            assert!(r["error"]["desc"].as_str().unwrap().contains("'disks'"), "{r}");
            q.ok("quit", json!({}));
            drop(p);
        }
    }
    let Some(xfs) = XfsMount::new(&scratch) else { return };
    let disk = xfs.dir.join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(16 << 20).unwrap();
    let file = xfs.dir.join("vm.state");
    let sock = scratch.path("qmp.sock");
    let mut p = Proc::spawn(
        Command::new(ringvm_bin())
            .args([
                "run",
                "--kernel",
                g.to_str().unwrap(),
                "--memory",
                "128M",
                "--cmdline",
                "work=scsi-verify mib=8 bs=65536 qd=8 seed=9 passes=1000000",
                "--disk",
            ])
            .arg(format!("path={},cache=none", disk.display()))
            .arg("--qmp")
            .arg(&sock),
    );
    p.wait_for_output("scsi-verify pass 2 bad=0", T);
    let mut q = Qmp::negotiated(&sock);
    q.ok("savevm-start", json!({"statefile": file.to_str().unwrap(), "disks": "clone"}));
    assert_eq!(q.wait_savevm(T)["status"], "completed");
    q.ok("quit", json!({}));
    assert_eq!(p.wait(T).code(), 0);
    let clone = xfs.dir.join("vm.state.disk0");
    assert_eq!(std::fs::metadata(&clone).unwrap().len(), 16 << 20);
    // Wipe the original: the restore must run on the clone.
    std::fs::write(&disk, vec![0u8; 16 << 20]).unwrap();
    let _ = std::fs::remove_file(&sock);
    let r = Proc::spawn(Command::new(ringvm_bin()).args(["run", "--loadstate", file.to_str().unwrap(), "--qmp"]).arg(&sock));
    let mut q = Qmp::negotiated(&sock);
    wait_passes(&r, 3, "no progress after the restore");
    let blocks = q.ok("query-block", json!({}));
    assert!(blocks.to_string().contains("vm.state.disk0"), "{blocks}");
    q.ok("quit", json!({}));
    let o = r.wait(T);
    assert_eq!(o.code(), 0, "{}", o.stderr);
    assert_passes_clean(&o.stdout);
}

/// The state file behind a mapped restore shrinks while the guest runs
/// from it (a precondition the README states, violated): ringvm ends with
/// status 1 and one line naming the state file, whichever thread touched
/// the missing pages first (a vCPU's EFAULT or a VMM thread's SIGBUS),
/// never a bare SIGBUS or "Bad address".
#[test]
fn mapped_state_file_truncated_under_the_guest_is_named() {
    if !require_kvm("mapped_state_file_truncated_under_the_guest_is_named") {
        return;
    }
    let dir = Scratch::new("restore-map-trunc");
    let g = guest_elf(&dir);
    let file = dir.path("vm.state");
    let work = "work=mem mib=96 secs=inf rate=50 beat=100";
    snapshot_and_quit(&dir, &["run", "--kernel", g.to_str().unwrap(), "--memory", "192M", "--cmdline", work], &file, "ringvm-guest: beat 2");
    let sock = dir.path("qmp.sock");
    let _ = std::fs::remove_file(&sock);
    let (p, q) = restored_running(&sock, &["run", "--loadstate", file.to_str().unwrap(), "--restore-ram", "map"]);
    std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(4096).unwrap();
    drop(q);
    let r = p.wait(T);
    assert_eq!(r.code(), 1, "stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    let named: Vec<&str> = r.stderr.lines().filter(|l| l.contains(file.to_str().unwrap()) && l.contains("shrank")).collect();
    assert!(!named.is_empty(), "no line names the state file:\n{}", r.stderr);
}

/// A restore checks the disks it reopens against what the guest saw:
/// one truncated since the snapshot, or given `readonly=on` when it was
/// writable, is refused with one line naming the disk and the difference;
/// the disk as saved restores.
#[test]
fn restore_refuses_a_changed_disk() {
    if !require_kvm("restore_refuses_a_changed_disk") {
        return;
    }
    let dir = Scratch::new("restore-disk-check");
    let g = guest_elf(&dir);
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 8 << 20]).unwrap();
    let file = dir.path("vm.state");
    let spec = format!("path={}", disk.display());
    let work = "work=mem mib=16 secs=1 rate=20 beat=100";
    snapshot_and_quit(&dir, &["run", "--kernel", g.to_str().unwrap(), "--memory", "64M", "--cmdline", work, "--disk", &spec], &file, "ringvm-guest: beat 2");
    let ro = format!("{spec},readonly=on");
    std::fs::OpenOptions::new().write(true).open(&disk).unwrap().set_len(4 << 20).unwrap();
    for (args, what) in [
        (vec!["run", "--loadstate", file.to_str().unwrap()], "8388608 bytes when saved, 4194304 now (truncated)"),
        (vec!["run", "--loadstate", file.to_str().unwrap(), "--disk", &spec], "8388608 bytes when saved, 4194304 now (truncated)"),
    ] {
        let o = ringvm(&args, T);
        assert_eq!(o.code(), 1, "{args:?}: {}", o.stderr);
        let err = o.stderr.trim();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("disk.img") && err.contains(what) && err.contains("vm.state"), "{err}");
    }
    std::fs::OpenOptions::new().write(true).open(&disk).unwrap().set_len(8 << 20).unwrap();
    let o = ringvm(&["run", "--loadstate", file.to_str().unwrap(), "--disk", &ro], T);
    assert_eq!(o.code(), 1, "{}", o.stderr);
    assert!(o.stderr.contains("readonly=off when saved, readonly=on now"), "{}", o.stderr);
    let o = ringvm(&["run", "--loadstate", file.to_str().unwrap()], T);
    assert_eq!(o.code(), 0, "{}\n{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("RESULT PASS"), "{}", o.stdout);
}

/// QEMU users restore with the source's command line plus the state file:
/// `--kernel K --cmdline C --memory M --cpus N --loadstate F` restores
/// (it was refused: "'--kernel' cannot be used with '--loadstate'"); a
/// kernel, cmdline or size that is not what the file was saved from is one
/// line naming the file and the difference.
#[test]
fn restore_with_the_source_command_line() {
    if !require_kvm("restore_with_the_source_command_line") {
        return;
    }
    let dir = Scratch::new("restore-same-cmdline");
    let g = guest_elf(&dir);
    let file = dir.path("vm.state");
    let work = "work=mem mib=16 secs=1 rate=20 beat=100";
    let k = g.to_str().unwrap();
    let source = ["run", "--kernel", k, "--memory", "64M", "--cpus", "1", "--cmdline", work];
    snapshot_and_quit(&dir, &source, &file, "ringvm-guest: beat 2");
    let f = file.to_str().unwrap();
    let mut same: Vec<&str> = source.to_vec();
    same.extend(["--loadstate", f]);
    let o = ringvm(&same, T);
    assert_eq!(o.code(), 0, "{}\n{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("RESULT PASS") && !o.stdout.contains("ringvm-guest: start"), "{}", o.stdout);
    let other = dir.path("other.elf");
    std::fs::copy(&g, &other).unwrap();
    for (args, what) in [
        (vec!["run", "--kernel", k, "--cmdline", "work=mem mib=8", "--loadstate", f], "--cmdline"),
        (vec!["run", "--kernel", other.to_str().unwrap(), "--cmdline", work, "--loadstate", f], "another file"),
        (vec!["run", "--kernel", k, "--cmdline", work, "--memory", "128M", "--loadstate", f], "--memory 128 MiB"),
    ] {
        let o = ringvm(&args, T);
        assert_eq!(o.code(), 1, "{args:?}: {}", o.stderr);
        let err = o.stderr.trim();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("vm.state") && err.contains(what), "{args:?}: {err}");
    }
}

/// Restores `file` (with `extra` options) and has the guest verify every
/// page; its output.
fn restore_and_verify(file: &Path, extra: &[&str]) -> Output {
    let mut r = Proc::spawn_with_stdin(Command::new(ringvm_bin()).args(["run", "--loadstate", file.to_str().unwrap()]).args(extra));
    r.wait_for_output("ringvm-guest: beat", T);
    r.type_serial(b"v");
    r.wait(T)
}

fn blocks(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks()
}

/// Incremental snapshots: a full one with `"track": true`, the guest keeps
/// rewriting pages, then two incremental ones each against the last
/// (only what changed is written: far fewer blocks). The chain of three
/// restores to a guest that verifies every page; `state inspect` shows the
/// chain; `state merge` folds it into one file that restores alone; a
/// base that is not the file the increment was taken from, an increment
/// against a file that is not the tracked one, one after a reset, and a
/// mapped restore of a chain are each refused with the reason; the chain
/// also restores lazily.
#[test]
fn incremental_snapshots_chain_restore_and_merge() {
    if !require_kvm("incremental_snapshots_chain_restore_and_merge") {
        return;
    }
    let dir = Scratch::new("restore-incremental");
    let g = guest_elf(&dir);
    let sock = dir.path("qmp.sock");
    let mut p = Proc::spawn(
        Command::new(ringvm_bin())
            .args(["run", "--kernel", g.to_str().unwrap(), "--memory", "192M", "--cmdline", "work=mem mib=96 secs=inf rate=10 beat=100", "--qmp"])
            .arg(&sock),
    );
    p.wait_for_output("fill done", T);
    let mut q = Qmp::negotiated(&sock);
    let (full, inc1, inc2) = (dir.path("full.state"), dir.path("inc1.state"), dir.path("inc2.state"));
    let s = |f: &Path| f.to_str().unwrap().to_string();
    // Without tracking, an increment is refused.
    let r = q.cmd(json!({"execute": "savevm-start", "arguments": {"statefile": s(&inc1), "base": s(&full)}}));
    assert!(r["error"]["desc"].as_str().unwrap_or_default().contains("no changes are tracked"), "{r}");
    let take = |q: &mut Qmp, args: serde_json::Value| {
        q.ok("savevm-start", args);
        let st = q.wait_savevm(T);
        assert_eq!(st["status"], "completed", "{st}");
        q.ok("savevm-end", json!({}));
        st
    };
    take(&mut q, json!({"statefile": s(&full), "track": true}));
    std::thread::sleep(Duration::from_millis(700));
    take(&mut q, json!({"statefile": s(&inc1), "base": s(&full), "track": true}));
    std::thread::sleep(Duration::from_millis(400));
    // Against a file that is not the tracked one (inc1 is).
    let r = q.cmd(json!({"execute": "savevm-start", "arguments": {"statefile": s(&inc2), "base": s(&full)}}));
    assert!(r["error"]["desc"].as_str().unwrap_or_default().contains("tracked against"), "{r}");
    take(&mut q, json!({"statefile": s(&inc2), "base": s(&inc1), "track": true}));
    // A reset ends tracking.
    q.ok("system_reset", json!({}));
    let r = q.cmd(json!({"execute": "savevm-start", "arguments": {"statefile": s(&dir.path("x.state")), "base": s(&inc2)}}));
    assert!(r["error"]["desc"].as_str().unwrap_or_default().contains("no changes are tracked"), "{r}");
    q.ok("quit", json!({}));
    assert_eq!(p.wait(T).code(), 0);
    let (bf, b1, b2) = (blocks(&full), blocks(&inc1), blocks(&inc2));
    eprintln!("512-byte blocks: full {bf}, inc1 {b1}, inc2 {b2}");
    assert!(b1 * 2 < bf && b2 * 2 < bf, "increments are not small: full {bf}, inc1 {b1}, inc2 {b2}");
    let i = ringvm(&["state", "inspect", &s(&inc2)], T);
    assert_eq!(i.code(), 0, "{}\n{}", i.stdout, i.stderr);
    assert!(i.stdout.contains("chain: 3 file(s)") && i.stdout.contains("incremental: pages not in this file come from"), "{}", i.stdout);
    // The chain restores and the guest verifies every page.
    let o = restore_and_verify(&inc2, &[]);
    assert_eq!(o.code(), 0, "{}\n{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("verify pages=24576 bad=0") && o.stdout.contains("RESULT PASS") && !o.stdout.contains("ringvm-guest: start"), "{}", o.stdout);
    // Lazily: the guest runs first, each page faulted in from the newest
    // file that has it, and verifies.
    let o = restore_and_verify(&inc2, &["--restore-ram", "lazy"]);
    assert_eq!(o.code(), 0, "{}\n{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("verify pages=24576 bad=0") && o.stdout.contains("RESULT PASS"), "{}", o.stdout);
    // A mapped restore of a chain: refused with the way out.
    let l = ringvm(&["run", "--loadstate", &s(&inc2), "--restore-ram", "map"], T);
    assert_eq!(l.code(), 1);
    assert!(l.stderr.contains("incremental") && l.stderr.contains("merge"), "{}", l.stderr);
    // Merged: one file, no base, restores alone.
    let merged = dir.path("merged.state");
    let m = ringvm(&["state", "merge", &s(&inc2), "--out", &s(&merged)], T);
    assert_eq!(m.code(), 0, "{}\n{}", m.stdout, m.stderr);
    assert!(m.stdout.contains("3 file(s) merged"), "{}", m.stdout);
    let i = ringvm(&["state", "inspect", &s(&merged)], T);
    assert!(i.code() == 0 && !i.stdout.contains("incremental:"), "{}", i.stdout);
    let o = restore_and_verify(&merged, &[]);
    assert!(o.code() == 0 && o.stdout.contains("verify pages=24576 bad=0"), "{}\n{}", o.stdout, o.stderr);
    // The base replaced by another file: the increment names the file it
    // was taken from, so the chain is refused.
    std::fs::copy(&merged, &full).unwrap();
    let r = ringvm(&["run", "--loadstate", &s(&inc2)], T);
    assert_eq!(r.code(), 1, "{}", r.stdout);
    assert!(r.stderr.contains("full.state") && r.stderr.contains("not the file it was taken from"), "{}", r.stderr);
}
