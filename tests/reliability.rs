//! Faults that must lose nothing and crash nothing: ringvm killed mid-
//! snapshot, a completed snapshot read back with the page cache dropped,
//! and a flood of QMP clients against a running VM.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::qmp::Qmp;
use common::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(120);

fn vm(dir: &Scratch, mem: &str, work: &str, wait_for: &str) -> (Proc, Qmp) {
    let g = guest_elf(dir);
    let sock = dir.path("qmp.sock");
    let mut p = Proc::spawn(Command::new(ringvm_bin()).args([
        "run",
        "--kernel",
        g.to_str().unwrap(),
        "--memory",
        mem,
        "--cmdline",
        work,
        "--qmp",
        sock.to_str().unwrap(),
    ]));
    p.wait_for_output(wait_for, T);
    let q = Qmp::negotiated(&sock);
    (p, q)
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()).and_then(|v| v.parse().ok()).unwrap()
}

/// `kill -9` while RAM is being written over an earlier good snapshot of
/// the same name: the good file is untouched (a snapshot writes a new file
/// and puts it in place only once complete). On a local filesystem the new
/// file has no name (O_TMPFILE), so nothing at all is left behind. Where
/// the filesystem has no unnamed files (FUSE here, like NFS mounts) the
/// half-written one stays under its temporary name, has no completion
/// record, and `state inspect` and `--loadstate` refuse it: no guest ever
/// runs from it.
#[test]
fn kill_9_mid_snapshot_leaves_a_file_that_is_refused() {
    if !require_kvm("kill_9_mid_snapshot_leaves_a_file_that_is_refused") {
        return;
    }
    // Kills ringvm mid-snapshot over a good file in `at`; returns what the
    // snapshot left beside it.
    fn kill_mid_snapshot(dir: &Scratch, at: &Path) -> Vec<PathBuf> {
        let (p, mut q) = vm(dir, "768M", "work=mem mib=640 secs=inf rate=300", "fill done");
        let good = at.join("vm.state");
        q.savevm_completes(&good, T);
        q.ok("savevm-end", json!({}));
        let good_bytes = std::fs::read(&good).unwrap();
        q.ok("savevm-start", json!({"statefile": good.to_str().unwrap(), "downtime-ms": 0}));
        q.wait_savevm_bytes(64 << 20, T);
        p.kill();
        assert!(std::fs::read(&good).unwrap() == good_bytes, "the earlier snapshot was changed");
        assert_eq!(ringvm(&["state", "inspect", good.to_str().unwrap()], T).code(), 0);
        std::fs::read_dir(at).unwrap().map(|e| e.unwrap().path()).filter(|p| p.file_name().unwrap() != "vm.state").collect()
    }
    let dir = Scratch::new("rel-kill9");
    let left = kill_mid_snapshot(&dir, &dir.0);
    let left: Vec<_> = left.iter().filter(|p| p.to_string_lossy().contains("vm.state")).collect();
    assert!(left.is_empty(), "a killed snapshot left files on a local filesystem: {left:?}");

    let dir = Scratch::new("rel-kill9-fuse");
    let fs = FaultFs::mount(&dir, "fuse", &[]);
    let left = kill_mid_snapshot(&dir, &fs.mnt);
    assert_eq!(left.len(), 1, "{left:?}");
    let file = &left[0];
    assert!(file.file_name().unwrap().to_string_lossy().starts_with(".vm.state.ringvm-"), "{left:?}");
    let o = ringvm(&["state", "inspect", file.to_str().unwrap()], T);
    assert_eq!(o.code(), 1, "{}", o.stdout);
    assert!(o.stderr.contains(".vm.state.ringvm-") && o.stderr.contains("never finished"), "{}", o.stderr);
    let r = ringvm(&["run", "--loadstate", file.to_str().unwrap()], T);
    assert_eq!(r.code(), 1, "{}", r.stdout);
    assert!(r.stderr.contains(".vm.state.ringvm-") && r.stderr.contains("never finished"), "{}", r.stderr);
    assert!(!r.stdout.contains("ringvm-guest"), "a guest ran from a half-written file:\n{}", r.stdout);
}

/// A completed snapshot, its pages evicted from the page cache, loads and
/// the guest verifies every page (what reached the disk is what counts).
#[test]
fn completed_snapshot_survives_a_dropped_page_cache() {
    if !require_kvm("completed_snapshot_survives_a_dropped_page_cache") {
        return;
    }
    let dir = Scratch::new("rel-dropcache");
    let (p, mut q) = vm(&dir, "192M", "work=mem mib=96 secs=3 rate=50 beat=200", "ringvm-guest: beat 2");
    let file = dir.path("vm.state");
    q.savevm_completes(&file, T);
    q.ok("savevm-end", json!({}));
    drop(q);
    assert_eq!(p.wait(T).code(), 0);
    // Evict this file's pages: written back first (DONTNEED leaves dirty
    // pages), then dropped; as root the whole page cache goes too.
    let f = std::fs::File::open(&file).unwrap();
    f.sync_all().unwrap();
    // SAFETY: advice on our own open file.
    assert_eq!(unsafe { libc::posix_fadvise(std::os::fd::AsRawFd::as_raw_fd(&f), 0, 0, libc::POSIX_FADV_DONTNEED) }, 0);
    if let Err(e) = std::fs::write("/proc/sys/vm/drop_caches", "1") {
        assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "drop_caches under CI=true: {e}");
    }
    assert_eq!(resident_pages(&f), 0, "pages of {} still cached: the load would not read the disk", file.display());
    drop(f);
    let r = ringvm(&["run", "--loadstate", file.to_str().unwrap()], T);
    assert_eq!(r.code(), 0, "stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("verify pages=24576 bad=0"), "{}", r.stdout);
}

/// Pages of `f` in the page cache (mincore over a mapping of it).
fn resident_pages(f: &std::fs::File) -> usize {
    let len = f.metadata().unwrap().len() as usize;
    let page = 4096;
    // SAFETY: a shared read-only mapping of our own open file (mincore sees its page cache), unmapped below.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, std::os::fd::AsRawFd::as_raw_fd(f), 0) };
    assert_ne!(p, libc::MAP_FAILED);
    let mut vec = vec![0u8; len.div_ceil(page)];
    // SAFETY: `vec` has one byte per page of the mapping.
    let r = unsafe { libc::mincore(p, len, vec.as_mut_ptr()) };
    // SAFETY: the mapping made above.
    unsafe { libc::munmap(p, len) };
    assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
    vec.iter().filter(|&&b| b & 1 != 0).count()
}

/// Hundreds of clients at once (beyond the 256 limit), connects and
/// disconnects mid-message, pipelined commands: the VM runs on, every
/// well-behaved client gets its replies in order, memory stays bounded.
#[test]
fn qmp_flood_leaves_the_vm_and_other_clients_alone() {
    if !require_kvm("qmp_flood_leaves_the_vm_and_other_clients_alone") {
        return;
    }
    let dir = Scratch::new("rel-qmpflood");
    let (p, mut good) = vm(&dir, "128M", "work=mem mib=32 secs=inf rate=20 beat=200", "fill done");
    let sock = dir.path("qmp.sock");
    let rss0 = rss_kib(p.pid());
    for round in 0..3 {
        // 300 clients held open at once: the ones past the limit are
        // closed at once (EOF, no greeting); the rest get a greeting.
        let mut held = Vec::new();
        for _ in 0..300 {
            held.push(UnixStream::connect(&sock).unwrap());
        }
        let mut greeted = 0;
        for s in &held {
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut l = String::new();
            if BufReader::new(s).read_line(&mut l).unwrap_or(0) > 0 {
                assert!(l.contains("\"QMP\""), "{l}");
                greeted += 1;
            }
        }
        assert!((200..=256).contains(&greeted), "round {round}: {greeted} of 300 greeted");
        // Half of them leave mid-message.
        for (i, s) in held.iter_mut().enumerate() {
            if i % 2 == 0 {
                let _ = s.write_all(b"{\"execute\": \"qmp_capab");
            }
        }
        drop(held);
        assert_eq!(good.exec("query-status")["status"], "running");
    }
    // 500 pipelined commands in one write: 500 replies, ids in order.
    let mut batch = Vec::new();
    for i in 0..500 {
        batch.extend_from_slice(json!({"execute": if i % 3 == 0 { "query-status" } else { "query-name" }, "id": i}).to_string().as_bytes());
    }
    good.send_raw(&batch);
    for i in 0..500 {
        let r: Value = good.reply();
        assert_eq!(r["id"], i, "{r}");
        assert!(r.get("return").is_some(), "{r}");
    }
    let rss1 = rss_kib(p.pid());
    assert!(rss1 < rss0 + 32 * 1024, "RSS grew from {rss0} KiB to {rss1} KiB");
    assert_eq!(good.exec("query-status")["status"], "running");
    good.exec("quit");
    assert_eq!(p.wait(T).code(), 0);
}

fn killed_by_sigsys(o: &Output) -> bool {
    std::os::unix::process::ExitStatusExt::signal(&o.status) == Some(libc::SIGSYS)
}

/// Every thread of a running VM is filtered; a forbidden system call from
/// each thread role kills ringvm (SIGSYS); `--seccomp off` installs nothing.
#[test]
fn seccomp_filters_every_thread_role() {
    if !require_kvm("seccomp_filters_every_thread_role") {
        return;
    }
    let dir = Scratch::new("rel-seccomp");
    let g = guest_elf(&dir);
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 8 << 20]).unwrap();
    let sock = dir.path("qmp.sock");
    let boot = |extra: &[&str], env: Option<&str>| {
        let _ = std::fs::remove_file(&sock);
        let mut c = Command::new(ringvm_bin());
        c.args(["run", "--kernel", g.to_str().unwrap(), "--memory", "128M", "--cmdline", "work=mem mib=16 secs=inf rate=10"]);
        c.arg("--disk").arg(format!("path={}", disk.display())).arg("--qmp").arg(&sock).args(extra);
        if let Some(role) = env {
            c.env("RINGVM_SECCOMP_SELFTEST", role);
        }
        Proc::spawn(&mut c)
    };
    // A running VM: every thread has a filter (Seccomp: 2 = filter mode).
    let mut p = boot(&[], None);
    p.wait_for_output("fill done", T);
    let mut q = Qmp::negotiated(&sock);
    let file = dir.path("vm.state");
    q.savevm_completes(&file, T);
    let mut seen = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{}/task", p.pid())).unwrap() {
        let t = t.unwrap().path();
        // A thread may end while we look (the finished snapshot's
        // iothread and reaper do): only the ones still there count.
        let (Ok(comm), Ok(status)) = (std::fs::read_to_string(t.join("comm")), std::fs::read_to_string(t.join("status"))) else { continue };
        let comm = comm.trim().to_string();
        if comm.starts_with("kvm-") {
            continue; // KVM's own worker
        }
        assert!(status.lines().any(|l| l == "Seccomp:\t2"), "thread {comm} runs without a filter");
        seen.push(comm);
    }
    for want in ["ringvm", "vcpu0", "iothread0"] {
        assert!(seen.iter().any(|c| c == want), "no {want} thread among {seen:?}");
    }
    q.ok("quit", json!({}));
    assert_eq!(p.wait(T).code(), 0);

    // Each role's thread makes one forbidden call right after its filter
    // is in: the VMM dies of SIGSYS.
    for role in ["control", "vcpu", "iothread"] {
        let o = boot(&[], Some(role)).wait(T);
        assert!(killed_by_sigsys(&o), "{role}: {:?}\n{}", o.status, o.stderr);
    }
    let mut p = boot(&[], Some("snapshot"));
    p.wait_for_output("fill done", T);
    let mut q = Qmp::negotiated(&sock);
    q.send_raw(format!("{}\n", json!({"execute": "savevm-start", "arguments": {"statefile": dir.path("x.state").to_str().unwrap()}})).as_bytes());
    let o = p.wait(T);
    assert!(killed_by_sigsys(&o), "snapshot: {:?}", o.status);
    // The restore roles; `faults` is the lazy restore's userfaultfd thread.
    for (role, extra) in [("loader", &[][..]), ("helper", &[]), ("faults", &["--restore-ram", "lazy"])] {
        let mut c = Command::new(ringvm_bin());
        c.args(["run", "--loadstate", file.to_str().unwrap(), "--disk"])
            .arg(format!("path={}", disk.display()))
            .args(extra)
            .env("RINGVM_SECCOMP_SELFTEST", role);
        let o = Proc::spawn(&mut c).wait(T);
        assert!(killed_by_sigsys(&o), "{role}: {:?}\n{}", o.status, o.stderr);
    }
    // Off: the same self-test call is harmless.
    let mut p = boot(&["--seccomp", "off"], Some("control"));
    p.wait_for_output("fill done", T);
    let mut q = Qmp::negotiated(&sock);
    assert_eq!(q.ok("query-status", json!({}))["status"], "running");
    q.ok("quit", json!({}));
    assert_eq!(p.wait(T).code(), 0);
}

/// The state file's filesystem fails writes (EIO) partway: the snapshot
/// fails naming the file and the error, no completion record, the VM runs
/// on, and the next snapshot (elsewhere) completes.
#[test]
fn state_file_eio_fails_the_snapshot_cleanly() {
    if !require_kvm("state_file_eio_fails_the_snapshot_cleanly") {
        return;
    }
    let dir = Scratch::new("rel-eio");
    let fs = FaultFs::mount(&dir, "eio", &["--fail-writes-after", "40"]);
    let (p, mut q) = vm(&dir, "256M", "work=mem mib=128 secs=inf rate=50", "fill done");
    let bad = fs.path("vm.state");
    q.ok("savevm-start", json!({"statefile": bad.to_str().unwrap()}));
    let s = q.wait_savevm(T);
    assert_eq!(s["status"], "failed", "{s}");
    let err = s["error"].as_str().unwrap();
    assert!(err.contains(bad.to_str().unwrap()) && err.contains("Input/output error"), "{err}");
    assert_eq!(q.ok("query-status", json!({}))["status"], "running");
    q.ok("savevm-end", json!({}));
    let o = ringvm(&["state", "inspect", bad.to_str().unwrap()], T);
    assert_eq!(o.code(), 1, "{}", o.stdout);
    let good = dir.path("good.state");
    q.savevm_completes(&good, T);
    assert_eq!(ringvm(&["state", "inspect", good.to_str().unwrap()], T).code(), 0);
    q.ok("quit", json!({}));
    assert_eq!(p.wait(T).code(), 0);
}

/// The state file's filesystem stops answering writes: the guest keeps
/// running, QMP keeps answering, savevm-end ends the snapshot at once, and
/// a snapshot to another file completes while the stuck writes wait.
#[test]
fn stalled_target_does_not_hold_the_vm_or_the_cancel() {
    if !require_kvm("stalled_target_does_not_hold_the_vm_or_the_cancel") {
        return;
    }
    let dir = Scratch::new("rel-stall");
    let mut fs = FaultFs::mount(&dir, "stall", &["--stall-writes-after", "40"]);
    let (p, mut q) = vm(&dir, "256M", "work=mem mib=128 secs=inf rate=50 beat=100", "fill done");
    let stuck = fs.path("vm.state");
    q.ok("savevm-start", json!({"statefile": stuck.to_str().unwrap()}));
    // Writes stop landing (ringvm-faultfs says when it holds the first).
    fs.wait_stalled(T);
    assert_eq!(q.ok("query-savevm", json!({}))["status"], "active");
    // The guest runs (two more heartbeats) and QMP answers (each reply
    // within the client's read timeout) while the target is stuck.
    let beats = p.stdout().matches("ringvm-guest: beat").count();
    p.wait_for_more("ringvm-guest: beat", beats + 1, T);
    for _ in 0..20 {
        assert_eq!(q.ok("query-status", json!({}))["status"], "running");
    }
    // Cancel ends it although the stuck writes never return (they are
    // held for an hour): the deadline is the proof, not a speed target.
    q.ok("savevm-end", json!({}));
    let s = q.wait_savevm(Duration::from_secs(30));
    assert_eq!(s["status"], "failed", "{s}");
    assert!(s["error"].as_str().unwrap().contains("cancelled"), "{s}");
    q.ok("savevm-end", json!({}));
    let good = dir.path("good.state");
    q.savevm_completes(&good, T);
    // Let the stuck requests go (they fail) before ringvm exits.
    fs.kill();
    q.ok("quit", json!({}));
    assert_eq!(p.wait(T).code(), 0);
    let o = ringvm(&["state", "inspect", dir.path("stall-back/vm.state").to_str().unwrap()], T);
    assert_eq!(o.code(), 1, "the stalled file passed inspection:\n{}", o.stdout);
}

/// The disk's file fails every read and write on the host (EIO): the guest
/// gets MEDIUM ERROR sense for each, the LUN keeps serving the commands that
/// do not touch the file, and ringvm runs on.
#[test]
fn disk_eio_is_a_medium_error_for_the_guest() {
    if !require_kvm("disk_eio_is_a_medium_error_for_the_guest") {
        return;
    }
    let dir = Scratch::new("rel-disk-eio");
    std::fs::create_dir_all(dir.path("disk-back")).unwrap();
    std::fs::write(dir.path("disk-back/disk.img"), vec![7u8; 8 << 20]).unwrap();
    let fs = FaultFs::mount(&dir, "disk", &["--fail-reads-after", "0", "--fail-writes-after", "0"]);
    let g = guest_elf(&dir);
    let o = ringvm(
        &[
            "run",
            "--kernel",
            g.to_str().unwrap(),
            "--memory",
            "128M",
            "--cmdline",
            "work=scsi-eio",
            "--disk",
            &format!("path={}", fs.path("disk.img").display()),
        ],
        T,
    );
    assert_eq!(o.code(), 0, "stdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    // The guest prints hex words: CHECK CONDITION, MEDIUM ERROR, and
    // UNRECOVERED READ ERROR / WRITE ERROR, three times over.
    let x = |v: u64| format!("{v:#018x}");
    let read = format!("scsi-eio read: status {} key {} asc {}", x(2), x(3), x(0x11));
    let write = format!("scsi-eio write: status {} key {} asc {}", x(2), x(3), x(0x0c));
    assert_eq!(o.stdout.matches(&read).count(), 3, "{}", o.stdout);
    assert_eq!(o.stdout.matches(&write).count(), 3, "{}", o.stdout);
    assert!(o.stdout.contains("scsi-eio PASS"), "{}", o.stdout);
}

/// 500 `system_reset`s while the guest's virtio-scsi driver has requests in
/// flight (each reset reboots it into the same write-then-verify run):
/// ringvm never hangs or dies, and the run after the last reset writes and
/// verifies the whole disk.
#[test]
fn resets_during_disk_io() {
    if !require_kvm("resets_during_disk_io") {
        return;
    }
    let dir = Scratch::new("rel-reset-io");
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 16 << 20]).unwrap();
    let g = guest_elf(&dir);
    let sock = dir.path("qmp.sock");
    let p = Proc::spawn(
        Command::new(ringvm_bin())
            .args([
                "run",
                "--kernel",
                g.to_str().unwrap(),
                "--cpus",
                "2",
                "--memory",
                "128M",
                "--cmdline",
                "work=scsi-verify mib=0 bs=65536 qd=16 passes=1000000",
            ])
            .arg("--disk")
            .arg(format!("path={},cache=none", disk.display()))
            .arg("--qmp")
            .arg(&sock),
    );
    let mut q = Qmp::negotiated(&sock);
    for i in 0..500u64 {
        // Each reset lands once the rebooted guest is on the disk again
        // (its whole init line printed), 0-18 ms into its I/O.
        p.wait_for_more("capacity=16777216 bytes\r\n", i as usize, T);
        std::thread::sleep(Duration::from_millis((i % 10) * 2));
        assert!(q.cmd(json!({"execute": "system_reset"})).get("return").is_some());
    }
    let before = p.stdout().matches("scsi-verify pass").count();
    let deadline = Instant::now() + T;
    while p.stdout().matches("scsi-verify pass").count() < before + 3 {
        assert!(Instant::now() < deadline, "no full verify pass after the resets:\n{}", p.stdout().lines().rev().take(20).collect::<Vec<_>>().join("\n"));
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = p.stdout();
    // The resets really landed with requests in flight: each boot reports
    // what the reset before it found (the guest counts posted-but-unreaped
    // requests in memory a reset leaves alone).
    let in_flight = out.matches("ringvm-guest: reset found").count();
    eprintln!("{in_flight} of 500 resets found requests in flight, {} verify passes", out.matches("scsi-verify pass").count());
    assert!(in_flight >= 450, "only {in_flight} of 500 resets found requests in flight");
    // Complete lines only (the guest may be mid-line).
    let whole = complete_lines(&out);
    let tail: Vec<&str> = whole.lines().filter(|l| l.contains("scsi-verify pass")).rev().take(2).collect();
    assert_eq!(tail.len(), 2, "{whole}");
    for l in &tail {
        assert!(l.ends_with("bad=0"), "{l}");
    }
    assert!(!out.contains("timed out") && !out.contains("bogus"), "{out}");
    assert_eq!(q.ok("query-status", json!({}))["status"], "running");
    q.ok("quit", json!({}));
    assert_eq!(p.wait(T).code(), 0);
    // The host's file holds the guest's pattern (seed 1, the default) everywhere.
    assert_eq!(pattern_mismatches(&disk, 1, 0, 16 << 20), (0, None), "{}", disk.display());
}

/// `--statefile-dir`: QMP may name state files only directly inside it; a
/// symlink planted there (pointing anywhere) is refused, as are other
/// directories, `..` and nfs://; a hard link planted there is replaced,
/// not written through.
#[test]
fn statefile_dir_confines_qmp_paths() {
    if !require_kvm("statefile_dir_confines_qmp_paths") {
        return;
    }
    let dir = Scratch::new("rel-sfdir");
    let states = dir.path("states");
    std::fs::create_dir_all(&states).unwrap();
    let victim = dir.path("victim.txt");
    std::fs::write(&victim, b"precious").unwrap();
    std::os::unix::fs::symlink(&victim, states.join("link.state")).unwrap();
    let g = guest_elf(&dir);
    let sock = dir.path("qmp.sock");
    let mut p = Proc::spawn(Command::new(ringvm_bin()).args([
        "run",
        "--kernel",
        g.to_str().unwrap(),
        "--memory",
        "64M",
        "--cmdline",
        "work=mem mib=8 secs=inf rate=10",
        "--statefile-dir",
        states.to_str().unwrap(),
        "--qmp",
        sock.to_str().unwrap(),
    ]));
    p.wait_for_output("fill done", T);
    let mut q = Qmp::negotiated(&sock);
    for bad in [
        states.join("link.state").to_str().unwrap().to_string(),
        dir.path("elsewhere.state").to_str().unwrap().to_string(),
        format!("{}/../escape.state", states.display()),
        "nfs://127.0.0.1/export/vm.state".to_string(),
    ] {
        let r = q.cmd(json!({"execute": "savevm-start", "arguments": {"statefile": bad}}));
        let desc = r["error"]["desc"].as_str().unwrap_or_else(|| panic!("{bad} was accepted: {r}"));
        assert!(desc.contains("--statefile-dir"), "{desc}");
        let r = q.cmd(json!({"execute": "migrate", "arguments": {"uri": format!("file:{bad}")}}));
        assert!(r.get("error").is_some(), "migrate to {bad} was accepted: {r}");
    }
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    // A hard link planted at the name (to a file outside): the snapshot
    // replaces the name, never writes through the link.
    let linked = states.join("hard.state");
    std::fs::hard_link(&victim, &linked).unwrap();
    q.savevm_completes(&linked, T);
    q.ok("savevm-end", json!({}));
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious", "the snapshot wrote through a hard link");
    assert_eq!(ringvm(&["state", "inspect", linked.to_str().unwrap()], T).code(), 0);
    let good = states.join("vm.state");
    q.savevm_completes(&good, T);
    q.ok("quit", json!({}));
    assert_eq!(p.wait(T).code(), 0);
    assert_eq!(ringvm(&["state", "inspect", good.to_str().unwrap()], T).code(), 0);
}

/// The state file is truncated, or deleted, while RAM is being written:
/// the snapshot fails saying so (never "completed"), the VM runs on, and
/// the next snapshot completes. On the local filesystem the file being
/// written has no name (O_TMPFILE), so it is truncated through ringvm's
/// descriptor in /proc; a file with a name to delete is written where the
/// filesystem has no unnamed files (FUSE).
#[test]
fn state_file_truncated_or_deleted_under_the_snapshot() {
    if !require_kvm("state_file_truncated_or_deleted_under_the_snapshot") {
        return;
    }
    let dir = Scratch::new("rel-trunc");
    let fs = FaultFs::mount(&dir, "fuse", &[]);
    let (p, mut q) = vm(&dir, "768M", "work=mem mib=640 secs=inf rate=300", "fill done");
    for (what, at, expect) in [("truncate", &dir.0, "truncated"), ("delete", &fs.mnt, "deleted")] {
        let file = at.join(format!("{what}.state"));
        q.ok("savevm-start", json!({"statefile": file.to_str().unwrap(), "downtime-ms": 0}));
        q.wait_savevm_bytes(64 << 20, T);
        if what == "truncate" {
            // The unnamed file: a descriptor of ringvm's on `#INODE (deleted)` in this directory.
            let fds: Vec<PathBuf> = std::fs::read_dir(format!("/proc/{}/fd", p.pid()))
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|f| std::fs::read_link(f).is_ok_and(|l| l.starts_with(&dir.0) && l.to_string_lossy().ends_with(" (deleted)")))
                .collect();
            assert!(!fds.is_empty(), "no unnamed state file is open");
            let names: Vec<_> = std::fs::read_dir(&dir.0).unwrap().map(|e| e.unwrap().file_name()).collect();
            assert!(!names.iter().any(|n| n.to_string_lossy().contains("truncate.state")), "the file being written has a name: {names:?}");
            std::fs::OpenOptions::new().write(true).open(&fds[0]).unwrap().set_len(0).unwrap();
        } else {
            let prefix = format!(".{what}.state.ringvm-");
            let written = std::fs::read_dir(at)
                .unwrap()
                .map(|e| e.unwrap().path())
                .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(&prefix))
                .expect("the snapshot's file");
            std::fs::remove_file(&written).unwrap();
        }
        let s = q.wait_savevm(T);
        assert_eq!(s["status"], "failed", "{what}: {s}");
        let err = s["error"].as_str().unwrap();
        assert!(err.contains(expect) && err.contains(file.to_str().unwrap()), "{err}");
        assert_eq!(q.ok("query-status", json!({}))["status"], "running");
        q.ok("savevm-end", json!({}));
    }
    let good = dir.path("good.state");
    q.savevm_completes(&good, T);
    q.ok("quit", json!({}));
    assert_eq!(p.wait(T).code(), 0);
    assert_eq!(ringvm(&["state", "inspect", good.to_str().unwrap()], T).code(), 0);
}

/// The disk file shrinks under a running guest (truncated to half while
/// it verifies in a loop): reads past the new end get MEDIUM ERROR, never
/// zeros passed off as data; reads below it still verify; ringvm runs on.
#[test]
fn disk_file_shrinking_under_the_guest() {
    if !require_kvm("disk_file_shrinking_under_the_guest") {
        return;
    }
    let dir = Scratch::new("rel-shrink");
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 8 << 20]).unwrap();
    let g = guest_elf(&dir);
    let sock = dir.path("qmp.sock");
    let mut p = Proc::spawn(
        Command::new(ringvm_bin())
            .args(["run", "--kernel", g.to_str().unwrap(), "--memory", "128M", "--cmdline", "work=scsi-verify mib=0 bs=65536 qd=4 passes=1000000"])
            .arg("--disk")
            .arg(format!("path={}", disk.display()))
            .arg("--qmp")
            .arg(&sock),
    );
    p.wait_for_output("scsi-verify pass 2 bad=0", T);
    let mut q = Qmp::negotiated(&sock);
    std::fs::OpenOptions::new().write(true).open(&disk).unwrap().set_len(4 << 20).unwrap();
    let shrunk = Instant::now();
    // Complete lines only (the guest may be mid-line).
    let errors = |out: &str| {
        let whole = complete_lines(out);
        whole.lines().filter(|l| l.contains(": status ")).map(str::to_string).collect::<Vec<_>>()
    };
    let deadline = Instant::now() + T;
    while errors(&p.stdout()).len() < 64 {
        assert!(Instant::now() < deadline, "no read errors after the shrink:\n{}", p.stdout().lines().rev().take(10).collect::<Vec<_>>().join("\n"));
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = p.stdout();
    let x = |v: u64| format!("{v:#018x}");
    for l in errors(&out) {
        // Chunks 64.. (the lost half) only, each a MEDIUM ERROR.
        let chunk: u64 = l.split("chunk ").nth(1).unwrap().split(':').next().unwrap().parse().unwrap();
        assert!(chunk >= 64, "a read below the new end failed: {l}");
        assert!(l.ends_with(&format!("status {} key {} asc {}", x(2), x(3), x(0x11))), "{l}");
    }
    assert!(!out.contains("bad words"), "data that is not on disk was returned as good:\n{out}");
    // Hundreds of failing reads a second, but the log gets at most one
    // line a second per kind (with a count of the ones held back).
    std::thread::sleep(Duration::from_secs(2));
    let secs = shrunk.elapsed().as_secs() + 1;
    let warns = p.stderr().lines().filter(|l| l.contains("WARN")).count() as u64;
    assert!(warns <= 2 * secs + 2, "{warns} WARN lines in {secs} s:\n{}", p.stderr());
    assert_eq!(q.ok("query-status", json!({}))["status"], "running");
    q.ok("quit", json!({}));
    assert_eq!(p.wait(T).code(), 0);
}

/// 500 guest-initiated resets (i8042) while snapshots run back to back:
/// no deadlock, every completed file checks out, and the guest's reset
/// counter (kept in its RAM across resets) keeps counting.
#[test]
fn guest_resets_during_snapshots() {
    if !require_kvm("guest_resets_during_snapshots") {
        return;
    }
    let dir = Scratch::new("rel-guest-resets");
    let (p, mut q) = vm(&dir, "64M", "work=reboot count=1000000", "boot 2 of");
    let (mut started, mut completed) = (0, 0);
    let t0 = Instant::now();
    let files = [dir.path("a.state"), dir.path("b.state")];
    loop {
        assert!(t0.elapsed() < T * 2, "deadline: {completed} of {started} snapshots");
        let s = q.ok("query-savevm", json!({}));
        if s["status"] != "active" {
            if s["status"] == "completed" {
                completed += 1;
                let done = &files[(started - 1) % 2];
                let o = ringvm(&["state", "inspect", done.to_str().unwrap()], T);
                assert_eq!(o.code(), 0, "snapshot {started}: {s}\n{}\n{}", o.stdout, o.stderr);
            }
            // Whole lines only: a line still being written would count
            // here and not in the check below.
            let boots = complete_lines(&p.stdout()).matches("ringvm-guest: boot ").count();
            if boots > 500 && completed >= 5 {
                break;
            }
            q.ok("savevm-end", json!({}));
            q.ok("savevm-start", json!({"statefile": files[started % 2].to_str().unwrap()}));
            started += 1;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(completed + 1 >= started, "{completed} of {started} snapshots completed");
    let out = p.stdout();
    let whole = complete_lines(&out);
    let last = whole.lines().rfind(|l| l.contains("ringvm-guest: boot ")).unwrap();
    let n: u64 = last.split("boot ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!(n > 500, "the guest's counter says {last}");
    assert_eq!(q.ok("query-status", json!({}))["status"], "running");
    q.ok("quit", json!({}));
    assert_eq!(p.wait(T).code(), 0);
}

/// Restoring from a filesystem that fails reads partway: a one-line error
/// naming the file and the errno, exit 1, and the guest never runs.
#[test]
fn restore_read_eio_is_refused_cleanly() {
    if !require_kvm("restore_read_eio_is_refused_cleanly") {
        return;
    }
    let dir = Scratch::new("rel-restore-eio");
    std::fs::create_dir_all(dir.path("ro-back")).unwrap();
    let (p, mut q) = vm(&dir, "128M", "work=mem mib=64 secs=inf rate=10", "fill done");
    let file = dir.path("ro-back/vm.state");
    q.savevm_completes(&file, T);
    q.ok("quit", json!({}));
    assert_eq!(p.wait(T).code(), 0);
    // Header, record, state and metadata read fine; RAM reads fail.
    let fs = FaultFs::mount(&dir, "ro", &["--fail-reads-after", "40"]);
    let bad = fs.path("vm.state");
    let r = ringvm(&["run", "--loadstate", bad.to_str().unwrap()], T);
    assert_eq!(r.code(), 1, "stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains(bad.to_str().unwrap()) && r.stderr.contains("Input/output error"), "{}", r.stderr);
    assert!(!r.stdout.contains("ringvm-guest"), "the guest ran:\n{}", r.stdout);
}

/// A target too slow for the final pause (every write answered 50 ms
/// late): past `final-timeout-ms` the snapshot fails saying why and the
/// guest runs again; nothing loadable is left.
#[test]
fn final_pause_watchdog_resumes_the_guest() {
    if !require_kvm("final_pause_watchdog_resumes_the_guest") {
        return;
    }
    let dir = Scratch::new("rel-final-wd");
    let fs = FaultFs::mount(&dir, "slow", &["--delay-us", "50000"]);
    let (p, mut q) = vm(&dir, "64M", "work=mem mib=8 secs=inf rate=20 beat=100", "fill done");
    let file = fs.path("vm.state");
    // A downtime target that converges after one pass, so the final pause
    // comes with dirty pages to write at 50 ms or more each.
    q.ok("savevm-start", json!({"statefile": file.to_str().unwrap(), "downtime-ms": 60000, "final-timeout-ms": 100}));
    let s = q.wait_savevm(T);
    assert_eq!(s["status"], "failed", "{s}");
    assert!(s["error"].as_str().unwrap().contains("final pause exceeded 100 ms"), "{s}");
    // The pause ended at the watchdog, not at the target's pace.
    assert!(s["downtime"].as_f64().unwrap() < 1000.0, "{s}");
    let beats = p.stdout().matches("ringvm-guest: beat").count();
    assert_eq!(q.ok("query-status", json!({}))["status"], "running");
    p.wait_for_more("ringvm-guest: beat", beats, T);
    q.ok("savevm-end", json!({}));
    q.ok("quit", json!({}));
    assert_eq!(p.wait(T).code(), 0);
    drop(fs);
    assert_eq!(ringvm(&["state", "inspect", dir.path("slow-back/vm.state").to_str().unwrap()], T).code(), 1);
}

/// The target stalls once RAM is written, in the closing writes (state
/// section and page metadata lie past RAM in the file): the guest runs,
/// QMP answers, and savevm-end ends the snapshot at once.
#[test]
fn stall_in_the_closing_writes_is_cancellable() {
    if !require_kvm("stall_in_the_closing_writes_is_cancellable") {
        return;
    }
    let dir = Scratch::new("rel-close-stall");
    // A 64 MiB guest's RAM ends at file offset 65 MiB.
    let mut fs = FaultFs::mount(&dir, "cl", &["--stall-writes-from", &(65u64 << 20).to_string()]);
    let (p, mut q) = vm(&dir, "64M", "work=mem mib=16 secs=inf rate=20 beat=100", "fill done");
    let file = fs.path("vm.state");
    q.ok("savevm-start", json!({"statefile": file.to_str().unwrap()}));
    // The pause is over (downtime reported) but the snapshot cannot finish.
    let t0 = Instant::now();
    loop {
        let s = q.ok("query-savevm", json!({}));
        assert_eq!(s["status"], "active", "{s}");
        if s.get("downtime").is_some_and(|d| !d.is_null()) {
            break;
        }
        assert!(t0.elapsed() < T, "{s}");
        std::thread::sleep(Duration::from_millis(20));
    }
    fs.wait_stalled(T);
    assert_eq!(q.ok("query-savevm", json!({}))["status"], "active");
    let beats = p.stdout().matches("ringvm-guest: beat").count();
    assert_eq!(q.ok("query-status", json!({}))["status"], "running");
    q.ok("savevm-end", json!({}));
    let s = q.wait_savevm(Duration::from_secs(5));
    assert_eq!(s["status"], "failed", "{s}");
    assert!(s["error"].as_str().unwrap().contains("cancelled"), "{s}");
    p.wait_for_more("ringvm-guest: beat", beats, T);
    fs.kill();
    q.ok("savevm-end", json!({}));
    q.ok("quit", json!({}));
    assert_eq!(p.wait(T).code(), 0);
    assert_eq!(ringvm(&["state", "inspect", dir.path("cl-back/vm.state").to_str().unwrap()], T).code(), 1);
}

/// The QMP dispatcher past parsing, driven like a fuzzer (seeded, 3000
/// commands): every command ringvm lists, with random argument names and
/// values of every JSON type. Each gets a well-formed reply, the connection
/// survives, and the VM is still running at the end.
#[test]
fn qmp_dispatcher_random_commands() {
    if !require_kvm("qmp_dispatcher_random_commands") {
        return;
    }
    let dir = Scratch::new("rel-qmp-rand");
    let (p, mut q) = vm(&dir, "64M", "work=mem mib=8 secs=inf rate=10", "fill done");
    let cmds: Vec<String> = q.ok("query-commands", json!({})).as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap().to_string()).collect();
    // Not these: they end the VM or write files where the test says nothing.
    let skip = ["quit", "savevm-start", "migrate", "migrate-incoming"];
    let cmds: Vec<&String> = cmds.iter().filter(|c| !skip.contains(&c.as_str())).collect();
    assert!(cmds.len() >= 15, "{cmds:?}");
    let keys = ["statefile", "uri", "downtime-ms", "disks", "command-line", "cpu-index", "id", "detach", "enable", "capabilities", "x", ""];
    let mut seed: u64 = 0x5eed_1234_abcd_9876;
    let mut rnd = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    fn value(rnd: &mut dyn FnMut(u64) -> u64, depth: u32) -> Value {
        match rnd(if depth > 2 { 6 } else { 8 }) {
            0 => Value::Null,
            1 => json!(rnd(2) == 0),
            2 => json!(rnd(u64::MAX) as i64),
            3 => json!(-(rnd(1 << 20) as f64) / 3.0),
            4 => json!(["info status", "info cpus", "stop", "cont", "bogus", "", "info version", "system_reset"][rnd(8) as usize]),
            5 => json!("x".repeat(rnd(300) as usize)),
            6 => Value::Array((0..rnd(4)).map(|_| value(rnd, depth + 1)).collect()),
            _ => {
                let mut m = serde_json::Map::new();
                for i in 0..rnd(4) {
                    m.insert(format!("k{i}"), value(rnd, depth + 1));
                }
                Value::Object(m)
            }
        }
    }
    for i in 0..3000u64 {
        let name = cmds[rnd(cmds.len() as u64) as usize];
        let mut args = serde_json::Map::new();
        for _ in 0..rnd(4) {
            args.insert(keys[rnd(keys.len() as u64) as usize].to_string(), value(&mut rnd, 0));
        }
        let mut c = json!({"execute": name, "id": i});
        if rnd(4) != 0 {
            c["arguments"] = Value::Object(args);
        }
        let r = q.cmd(c.clone());
        assert_eq!(r["id"], i, "{c} -> {r}");
        match (r.get("return"), r.get("error")) {
            (Some(_), None) => {}
            (None, Some(e)) => assert!(e["class"].is_string() && e["desc"].is_string(), "{c} -> {r}"),
            _ => panic!("{c} -> malformed reply {r}"),
        }
    }
    // Whatever state the commands left: running again.
    let _ = q.cmd(json!({"execute": "cont"}));
    assert_eq!(q.ok("query-status", json!({}))["status"], "running");
    q.ok("quit", json!({}));
    assert_eq!(p.wait(T).code(), 0);
}

/// 500 guest-initiated resets (i8042) with the guest's own virtio-scsi
/// requests in flight (2-20 ms into its I/O each time); the run after the
/// last one writes and verifies the whole disk.
#[test]
fn guest_resets_during_disk_io() {
    if !require_kvm("guest_resets_during_disk_io") {
        return;
    }
    let dir = Scratch::new("rel-guest-reset-io");
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 16 << 20]).unwrap();
    let g = guest_elf(&dir);
    let o = Proc::spawn(
        Command::new(ringvm_bin())
            .args(["run", "--kernel", g.to_str().unwrap(), "--cpus", "2", "--memory", "128M", "--cmdline", "work=scsi-verify mib=0 bs=65536 qd=16 reboots=500"])
            .arg("--disk")
            .arg(format!("path={},cache=none", disk.display())),
    )
    .wait(T * 2);
    assert_eq!(o.code(), 0, "stderr:\n{}\nstdout tail:\n{}", o.stderr, o.stdout.lines().rev().take(20).collect::<Vec<_>>().join("\n"));
    assert_eq!(o.stdout.matches("scsi reboot ").count(), 500, "{}", o.stdout.lines().rev().take(5).collect::<Vec<_>>().join("\n"));
    assert!(o.stdout.contains("scsi reboots done 500"));
    assert!(o.stdout.contains("RESULT PASS"), "{}", o.stdout.lines().rev().take(5).collect::<Vec<_>>().join("\n"));
    let in_flight = o.stdout.matches("ringvm-guest: reset found").count();
    eprintln!("{in_flight} of 500 guest resets found requests in flight");
    assert!(in_flight >= 450, "only {in_flight} of 500 guest resets found requests in flight");
    assert_eq!(pattern_mismatches(&disk, 1, 0, 16 << 20), (0, None), "{}", disk.display());
}

/// A FIFO (or anything but a regular file) where a kernel, initrd, serial
/// output file or state file belongs is one clear line and exit 1, at
/// once: never an open that blocks for ever.
#[test]
fn fifos_where_files_belong_fail_fast() {
    let dir = Scratch::new("rel-fifo");
    let g = guest_elf(&dir);
    let fifo = dir.path("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: creating a FIFO in our scratch directory.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let (g, f) = (g.to_str().unwrap(), fifo.to_str().unwrap());
    let serial = format!("file={f}");
    for (args, what) in [
        (vec!["run", "--memory", "64M", "--kernel", f], "kernel"),
        (vec!["run", "--memory", "64M", "--kernel", g, "--initrd", f], "initrd"),
        (vec!["run", "--memory", "64M", "--kernel", g, "--serial", &serial], "serial output file"),
        (vec!["run", "--loadstate", f], "state file"),
        (vec!["state", "inspect", f], "fifo"),
    ] {
        let o = ringvm(&args, Duration::from_secs(20));
        assert_eq!(o.code(), 1, "{args:?}: {}", o.stderr);
        let err = o.stderr.trim();
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(what) && err.contains("fifo") && err.contains("not a regular file"), "{args:?}: {err}");
    }
}

/// The kernel file deleted after boot: guest reboots load the image ringvm
/// read at start (as QEMU does), so the VM carries on.
#[test]
fn reboots_after_the_kernel_file_is_gone() {
    if !require_kvm("reboots_after_the_kernel_file_is_gone") {
        return;
    }
    let dir = Scratch::new("rel-kernel-gone");
    let g = guest_elf(&dir);
    let sock = dir.path("qmp.sock");
    let p = Proc::spawn(
        Command::new(ringvm_bin()).args(["run", "-S", "--memory", "64M", "--cmdline", "work=reboot count=3", "--kernel"]).arg(&g).arg("--qmp").arg(&sock),
    );
    let mut q = Qmp::negotiated(&sock);
    std::fs::remove_file(&g).unwrap();
    q.ok("cont", json!({}));
    let o = p.wait(T);
    assert_eq!(o.code(), 0, "{}\n{}", o.stdout, o.stderr);
    assert_eq!(o.stdout.matches("ringvm-guest: start").count(), 4, "{}", o.stdout);
}

/// `migrate-incoming` naming a FIFO is a QMP error at once (the open and
/// header read used to block the control thread for ever: no replies, no
/// greeting for new clients, SIGTERM ignored); the connection and the
/// waiting VM carry on.
#[test]
fn migrate_incoming_from_a_fifo_is_an_error_not_a_hang() {
    if !require_kvm("migrate_incoming_from_a_fifo_is_an_error_not_a_hang") {
        return;
    }
    let dir = Scratch::new("rel-incoming-fifo");
    let fifo = dir.path("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: creating a FIFO in our scratch directory.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let sock = dir.path("qmp.sock");
    let p = Proc::spawn(Command::new(ringvm_bin()).args(["run", "--incoming", "defer", "--memory", "256M", "--serial", "none", "--qmp"]).arg(&sock));
    let mut q = Qmp::negotiated(&sock);
    let r = q.cmd(json!({"execute": "migrate-incoming", "arguments": {"uri": format!("file:{}", fifo.display())}}));
    let desc = r["error"]["desc"].as_str().unwrap_or_default();
    assert!(desc.contains("fifo") && desc.contains("not a regular file"), "{r}");
    // Still answering, on this connection and a new one.
    assert_eq!(q.ok("query-status", json!({}))["status"], "inmigrate");
    let mut q2 = Qmp::negotiated(&sock);
    assert_eq!(q2.ok("query-status", json!({}))["status"], "inmigrate");
    q.ok("quit", json!({}));
    assert_eq!(p.wait(T).code(), 0);
}

/// Sends SIGTERM to `p` and asserts it is gone within `bound`.
fn sigterm_within(p: Proc, bound: Duration) -> Output {
    let t = Instant::now();
    // SAFETY: signalling the child we started, by its PID.
    assert_eq!(unsafe { libc::kill(p.pid() as i32, libc::SIGTERM) }, 0);
    let o = p.wait(bound * 2);
    assert!(t.elapsed() < bound, "SIGTERM took {:?}", t.elapsed());
    o
}

/// `migrate-incoming` of a file whose filesystem stops answering reads:
/// the file is opened off the control thread, so other clients are
/// greeted and answered (query-migrate says "setup"), the waiting
/// client's reply is simply late, and SIGTERM still ends ringvm at once.
#[test]
fn migrate_incoming_from_a_stalled_file_does_not_hold_the_control_socket() {
    if !require_kvm("migrate_incoming_from_a_stalled_file_does_not_hold_the_control_socket") {
        return;
    }
    let dir = Scratch::new("rel-incoming-stall");
    std::fs::create_dir_all(dir.path("nfs-back")).unwrap();
    std::fs::write(dir.path("nfs-back/vm.state"), vec![0u8; 1 << 20]).unwrap();
    let fs = FaultFs::mount(&dir, "nfs", &["--stall-reads-after", "0"]);
    let sock = dir.path("qmp.sock");
    let p = Proc::spawn(Command::new(ringvm_bin()).args(["run", "--incoming", "defer", "--memory", "256M", "--serial", "none", "--qmp"]).arg(&sock));
    let mut q = Qmp::negotiated(&sock);
    q.send_raw(format!("{}\n", json!({"execute": "migrate-incoming", "arguments": {"uri": format!("file:{}", fs.path("vm.state").display())}})).as_bytes());
    fs.wait_stalled_reads(T);
    for _ in 0..10 {
        let mut q2 = Qmp::negotiated(&sock);
        assert_eq!(q2.ok("query-status", json!({}))["status"], "inmigrate");
        assert_eq!(q2.ok("query-migrate", json!({}))["status"], "setup");
        let r = q2.cmd(json!({"execute": "migrate-incoming", "arguments": {"uri": "file:/nonexistent"}}));
        assert!(r["error"]["desc"].as_str().unwrap_or_default().contains("already opening"), "{r}");
    }
    let o = sigterm_within(p, Duration::from_secs(5));
    assert_eq!(o.code(), 0, "{}", o.stderr);
}

/// A kernel image whose filesystem stops answering reads: ringvm waits in
/// the read, and SIGTERM ends it there (the termination signals are only
/// blocked once every file is read and the control loop will serve them).
#[test]
fn sigterm_ends_a_start_stuck_reading_the_kernel() {
    let dir = Scratch::new("rel-kernel-stall");
    std::fs::create_dir_all(dir.path("k-back")).unwrap();
    std::fs::write(dir.path("k-back/vmlinux"), ringvm::TEST_GUEST_ELF).unwrap();
    let fs = FaultFs::mount(&dir, "k", &["--stall-reads-after", "0"]);
    let p = Proc::spawn(Command::new(ringvm_bin()).args(["run", "--memory", "64M", "--serial", "none", "--kernel"]).arg(fs.path("vmlinux")));
    fs.wait_stalled_reads(T);
    let o = sigterm_within(p, Duration::from_secs(5));
    assert_ne!(o.code(), 0, "{}", o.stderr);
}

/// A disk file that is not a whole number of 512-byte blocks is refused
/// with one line saying so and how to fix it (it used to be seen as
/// smaller, its last bytes silently out of the guest's reach).
#[test]
fn odd_sized_disks_are_refused_with_the_reason() {
    if !require_kvm("odd_sized_disks_are_refused_with_the_reason") {
        return;
    }
    let dir = Scratch::new("rel-odd-disk");
    let g = guest_elf(&dir);
    let disk = dir.path("odd.img");
    std::fs::write(&disk, vec![0u8; (1 << 20) + 100]).unwrap();
    let o = ringvm(&["run", "--kernel", g.to_str().unwrap(), "--memory", "64M", "--serial", "none", "--disk", &format!("path={}", disk.display())], T);
    assert_eq!(o.code(), 1, "{}", o.stderr);
    let err = o.stderr.trim();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("odd.img") && err.contains("not a whole number of 512-byte blocks") && err.contains("100 bytes"), "{err}");
}

/// A tmpfs of `size` mounted over `dir`, unmounted (lazily) on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: std::path::PathBuf, size: &str) -> Tmpfs {
        std::fs::create_dir_all(&dir).unwrap();
        let o = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(&dir).output().unwrap();
        assert!(o.status.success(), "mount tmpfs: {}", String::from_utf8_lossy(&o.stderr));
        Tmpfs(dir)
    }
    fn grow(&self, size: &str) {
        let o = Command::new("mount").args(["-o", &format!("remount,size={size}")]).arg(&self.0).output().unwrap();
        assert!(o.status.success(), "remount: {}", String::from_utf8_lossy(&o.stderr));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).output();
    }
}

/// QEMU's werror=enospc (the default): the disk's filesystem fills up
/// mid-write, the VM stops (BLOCK_IO_ERROR nospace, run state io-error,
/// query-block io-status nospace) without the guest seeing an error; the
/// admin grows the storage and `cont`s, the held writes go again, and the
/// guest verifies every byte it wrote. With werror=report the guest gets
/// the errors instead; with rerror=stop a read that keeps failing stops
/// the VM again after each `cont`.
#[test]
fn disk_error_policies_stop_and_retry() {
    if !require_kvm("disk_error_policies_stop_and_retry") {
        return;
    }
    let dir = Scratch::new("rel-werror");
    let g = guest_elf(&dir);
    let run = |disk: &std::path::Path, opts: &str, sock: &std::path::Path| {
        let spec = format!("path={}{opts}", disk.display());
        Proc::spawn(
            Command::new(ringvm_bin())
                .args([
                    "run",
                    "--kernel",
                    g.to_str().unwrap(),
                    "--memory",
                    "128M",
                    "--cmdline",
                    "work=scsi-verify mib=16 bs=65536 qd=8 seed=1",
                    "--disk",
                    &spec,
                ])
                .arg("--qmp")
                .arg(sock),
        )
    };
    // enospc: stop, grow, cont, nothing lost.
    let fs = Tmpfs::mount(dir.path("small"), "4M");
    let disk = dir.path("small/disk.img");
    std::fs::File::create(&disk).unwrap().set_len(16 << 20).unwrap();
    let sock = dir.path("q1.sock");
    let p = run(&disk, "", &sock);
    let mut q = Qmp::negotiated(&sock);
    let e = q.wait_event("BLOCK_IO_ERROR");
    assert_eq!(e["data"]["operation"], "write", "{e}");
    assert_eq!(e["data"]["action"], "stop", "{e}");
    assert_eq!(e["data"]["nospace"], true, "{e}");
    assert_eq!(e["data"]["node-name"], "scsi0-lun0", "{e}");
    q.wait_event("STOP");
    assert_eq!(q.ok("query-status", json!({}))["status"], "io-error");
    assert_eq!(q.ok("query-block", json!({}))[0]["io-status"], "nospace");
    assert!(!p.stdout().contains(": status "), "the guest saw an error:\n{}", p.stdout());
    fs.grow("32M");
    q.ok("cont", json!({}));
    let o = p.wait(T);
    assert_eq!(o.code(), 0, "stdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("scsi-verify luns=1 bytes=16777216 bad=0"), "{}", o.stdout);
    assert_eq!(pattern_mismatches(&disk, 1, 0, 16 << 20), (0, None));
    drop(q);
    drop(fs);
    // werror=report: the guest gets the error, nothing stops.
    let fs = Tmpfs::mount(dir.path("small2"), "4M");
    let disk = dir.path("small2/disk.img");
    std::fs::File::create(&disk).unwrap().set_len(16 << 20).unwrap();
    let sock = dir.path("q2.sock");
    let o = run(&disk, ",werror=report", &sock).wait(T);
    assert_eq!(o.code(), 1, "{}", o.stdout);
    assert!(o.stdout.contains(": status ") && o.stdout.contains("RESULT FAIL"), "{}", o.stdout);
    drop(fs);
    // rerror=stop on reads that keep failing: stopped again after cont.
    std::fs::create_dir_all(dir.path("eio-back")).unwrap();
    std::fs::write(dir.path("eio-back/disk.img"), vec![0u8; 16 << 20]).unwrap();
    let ffs = FaultFs::mount(&dir, "eio", &["--fail-reads-after", "0"]);
    let sock = dir.path("q3.sock");
    let p = run(&ffs.path("disk.img"), ",rerror=stop,cache=none", &sock);
    let mut q = Qmp::negotiated(&sock);
    let e = q.wait_event("BLOCK_IO_ERROR");
    assert_eq!((e["data"]["operation"].clone(), e["data"]["nospace"].clone()), (json!("read"), json!(false)), "{e}");
    q.wait_event("STOP");
    assert_eq!(q.ok("query-block", json!({}))[0]["io-status"], "failed");
    q.ok("cont", json!({}));
    q.wait_event("RESUME");
    q.wait_event("BLOCK_IO_ERROR");
    q.wait_event("STOP");
    assert_eq!(q.ok("query-status", json!({}))["status"], "io-error");
    q.ok("quit", json!({}));
    assert_eq!(p.wait(T).code(), 0);
}
