//! Faults that must lose nothing and crash nothing: ringvm killed mid-
//! snapshot, a completed snapshot read back with the page cache dropped,
//! and a flood of QMP clients against a running VM.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::qmp::Qmp;
use common::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(120);

fn vm(dir: &Scratch, mem: &str, work: &str, wait_for: &str) -> (Proc, Qmp) {
    let g = guest_elf(dir);
    let sock = dir.path("qmp.sock");
    let mut p = Proc::spawn(Command::new(ringvm_bin()).args(["run", "--kernel", g.to_str().unwrap(), "--memory", mem, "--cmdline", work, "--qmp", sock.to_str().unwrap()]));
    p.wait_for_output(wait_for, T);
    let q = Qmp::negotiated(&sock);
    (p, q)
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()).and_then(|v| v.parse().ok()).unwrap()
}

/// `kill -9` while RAM is being written: the file has no completion record,
/// so `state inspect` and `--loadstate` refuse it and no guest ever runs.
#[test]
fn kill_9_mid_snapshot_leaves_a_file_that_is_refused() {
    if !require_kvm("kill_9_mid_snapshot_leaves_a_file_that_is_refused") {
        return;
    }
    let dir = Scratch::new("rel-kill9");
    let (p, mut q) = vm(&dir, "768M", "work=mem mib=640 secs=inf rate=300", "fill done");
    let file = dir.path("vm.state");
    q.ok("savevm-start", json!({"statefile": file.to_str().unwrap(), "downtime-ms": 0}));
    let t0 = Instant::now();
    loop {
        let s = q.ok("query-savevm", json!({}));
        assert_eq!(s["status"], "active", "the snapshot ended before the kill: {s}");
        if s["bytes"].as_u64().unwrap_or(0) >= 64 << 20 {
            break;
        }
        assert!(t0.elapsed() < T, "no progress: {s}");
        std::thread::sleep(Duration::from_millis(2));
    }
    p.kill();
    assert!(file.exists());
    let o = ringvm(&["state", "inspect", file.to_str().unwrap()], T);
    assert_eq!(o.code(), 1, "{}", o.stdout);
    assert!(o.stderr.contains("vm.state") && o.stderr.contains("never finished"), "{}", o.stderr);
    let r = ringvm(&["run", "--loadstate", file.to_str().unwrap()], T);
    assert_eq!(r.code(), 1, "{}", r.stdout);
    assert!(r.stderr.contains("vm.state") && r.stderr.contains("never finished"), "{}", r.stderr);
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
    q.ok("savevm-start", json!({"statefile": file.to_str().unwrap()}));
    assert_eq!(q.wait_savevm(T)["status"], "completed");
    q.ok("savevm-end", json!({}));
    drop(q);
    assert_eq!(p.wait(T).code(), 0);
    // Evict this file's pages (and, as root, the whole page cache).
    let f = std::fs::File::open(&file).unwrap();
    // SAFETY: advice on our own open file.
    assert_eq!(unsafe { libc::posix_fadvise(std::os::fd::AsRawFd::as_raw_fd(&f), 0, 0, libc::POSIX_FADV_DONTNEED) }, 0);
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "1");
    let r = ringvm(&["run", "--loadstate", file.to_str().unwrap()], T);
    assert_eq!(r.code(), 0, "stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("verify pages=24576 bad=0"), "{}", r.stdout);
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
