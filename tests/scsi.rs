//! virtio-scsi, driven by the test guest's own driver: data integrity
//! across LUNs and queues (checked in the guest and in the host files),
//! sense data for bad requests, and resets with I/O in flight.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::qmp::Qmp;
use common::*;

const T: Duration = Duration::from_secs(120);

fn disk(dir: &Scratch, name: &str, mib: u64) -> String {
    let p = dir.path(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(mib << 20).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn scsi_verify_across_luns_and_queues_and_host_files_match() {
    if !require_kvm("scsi_verify_across_luns_and_queues_and_host_files_match") {
        return;
    }
    let dir = Scratch::new("scsi-verify");
    let g = guest_elf(&dir);
    let d0 = disk(&dir, "d0.img", 24);
    let d1 = disk(&dir, "d1.img", 16);
    let o = ringvm(
        &[
            "run",
            "--kernel",
            g.to_str().unwrap(),
            "--cpus",
            "2",
            "--memory",
            "256M",
            "--iothreads",
            "2",
            "--cmdline",
            "work=scsi-verify mib=16 bs=65536 qd=8 seed=77",
            "--disk",
            &format!("path={d0}"),
            "--disk",
            &format!("path={d1},cache=none"),
        ],
        T,
    );
    assert_eq!(o.code(), 0, "stdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("virtio-scsi queues=2 luns=2"), "{}", o.stdout);
    assert!(o.stdout.contains("scsi-verify luns=2 bytes=16777216 bad=0"), "{}", o.stdout);
    // The host sees exactly what the guest wrote, LUN by LUN.
    for (lun, path) in [(0u32, &d0), (1, &d1)] {
        let data = std::fs::read(path).unwrap();
        for (i, w) in data[..16 << 20].chunks_exact(8).enumerate() {
            let got = u64::from_le_bytes(w.try_into().unwrap());
            assert_eq!(got, pattern(77, lun, i as u64 * 8), "{path} byte {}", i * 8);
        }
        // Nothing written past what the guest covered.
        assert!(data[16 << 20..].iter().all(|&b| b == 0), "{path}: bytes past 16 MiB");
    }
}

#[test]
fn scsi_errors_out_of_range_write_protect_and_bad_opcode() {
    if !require_kvm("scsi_errors_out_of_range_write_protect_and_bad_opcode") {
        return;
    }
    let dir = Scratch::new("scsi-errors");
    let g = guest_elf(&dir);
    let rw = disk(&dir, "rw.img", 8);
    let ro = disk(&dir, "ro.img", 8);
    std::fs::write(&ro, vec![0xabu8; 8 << 20]).unwrap();
    let o = ringvm(
        &[
            "run",
            "--kernel",
            g.to_str().unwrap(),
            "--memory",
            "128M",
            "--cmdline",
            "work=scsi-errors mib=1",
            "--disk",
            &format!("path={rw}"),
            "--disk",
            &format!("path={ro},readonly=on"),
        ],
        T,
    );
    assert_eq!(o.code(), 0, "stdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("lun 1 wp=1 write: status 0x0000000000000002 key 0x0000000000000007 asc 0x0000000000000027"), "{}", o.stdout);
    assert!(o.stdout.contains("scsi-errors PASS"));
    assert!(std::fs::read(&ro).unwrap().iter().all(|&b| b == 0xab), "read-only disk was modified");
    // A disk that cannot be opened is a one-line error before the guest starts.
    let o = ringvm(&["run", "--kernel", g.to_str().unwrap(), "--disk", "path=/nonexistent/x.img"], T);
    assert_eq!(o.code(), 1);
    assert!(o.stderr.contains("/nonexistent/x.img") && o.stderr.trim().lines().count() == 1, "{}", o.stderr);
}

/// The savevm-async seed scenario: resets while requests are in flight.
/// Each system_reset pauses the vCPUs and quiesces every queue through its
/// iothread; the guest re-initialises the device and resumes I/O (4 KiB
/// writes then reads of its pattern, QD32 on two queues). 200 times, with
/// a deadline; most resets find requests in flight (the guest counts them
/// across the reset); then the last run writes and verifies the whole
/// 32 MiB and the host finds the pattern in the file.
#[test]
fn system_reset_200_times_during_scsi_bench() {
    if !require_kvm("system_reset_200_times_during_scsi_bench") {
        return;
    }
    let dir = Scratch::new("scsi-reset");
    let g = guest_elf(&dir);
    let d0 = disk(&dir, "d0.img", 32);
    let sock = dir.path("qmp.sock");
    let vm = Proc::spawn(Command::new(ringvm_bin()).args([
        "run",
        "--kernel",
        g.to_str().unwrap(),
        "--cpus",
        "2",
        "--memory",
        "256M",
        "--iothreads",
        "2",
        "--cmdline",
        "work=scsi-verify bs=4096 qd=32 mib=32 seed=31 passes=1",
        "--disk",
        &format!("path={d0},cache=none"),
        "--qmp",
        sock.to_str().unwrap(),
    ]));
    // The whole line: the guest starts its I/O right after printing it.
    let ready = "capacity=33554432 bytes\r\n";
    let mut q = Qmp::negotiated(&sock);
    for i in 0..200u64 {
        // Wait until the guest has the device running again (I/O restarts),
        // then reset 0-7 ms into its I/O.
        vm.wait_for_more(ready, i as usize, T);
        std::thread::sleep(Duration::from_millis(i % 8));
        let reply = q.cmd(serde_json::json!({"execute": "system_reset"}));
        assert!(reply.get("return").is_some(), "reset {i}: {reply}");
    }
    // The last run goes to its end: exit 0 after a clean verify.
    let o = vm.wait(T);
    assert_eq!(o.code(), 0, "{}\n{}", o.stderr, o.stdout.lines().rev().take(10).collect::<Vec<_>>().join("\n"));
    assert!(!o.stdout.contains("needs reset") && !o.stdout.contains("timed out") && !o.stdout.contains("bogus"), "{}", o.stdout);
    assert!(o.stdout.contains("scsi-verify luns=1 bytes=33554432 bad=0") && o.stdout.contains("RESULT PASS"), "{}", o.stdout);
    assert!(!o.stderr.contains("did not quiesce"), "{}", o.stderr);
    let in_flight = o.stdout.matches("ringvm-guest: reset found").count();
    eprintln!("{in_flight} of 200 resets found requests in flight");
    assert!(in_flight >= 180, "only {in_flight} of 200 resets found requests in flight");
    assert_eq!(pattern_mismatches(std::path::Path::new(&d0), 31, 0, 32 << 20), (0, None), "{d0} after the last run");
}

#[test]
fn query_block_lists_disks() {
    if !require_kvm("query_block_lists_disks") {
        return;
    }
    let dir = Scratch::new("scsi-qb");
    let g = guest_elf(&dir);
    let d0 = disk(&dir, "d0.img", 4);
    let d1 = disk(&dir, "d1.img", 2);
    let sock = dir.path("qmp.sock");
    let vm = Proc::spawn(Command::new(ringvm_bin()).args([
        "run",
        "--kernel",
        g.to_str().unwrap(),
        "--memory",
        "128M",
        "--iothreads",
        "2",
        "--cmdline",
        "work=spin secs=inf",
        "--disk",
        &format!("path={d0},cache=none"),
        "--disk",
        &format!("path={d1},readonly=on,iothread=1"),
        "--qmp",
        sock.to_str().unwrap(),
    ]));
    wait_for_socket(&sock);
    let mut q = Qmp::negotiated(&sock);
    let v = q.exec("query-block");
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), 2, "{v}");
    assert_eq!(list[0]["inserted"]["file"], d0.as_str());
    assert_eq!(list[0]["inserted"]["cache"]["direct"], true);
    assert_eq!(list[0]["inserted"]["image"]["virtual-size"], 4 << 20);
    assert_eq!(list[1]["inserted"]["ro"], true);
    assert_eq!(list[1]["ringvm"]["iothreads"], serde_json::json!(["iothread1"]));
    q.exec("quit");
    assert_eq!(vm.wait(T).code(), 0);
}

/// `queues=N` on a disk sets its controller's request queues (the guest
/// drives min(its CPUs, the device's queues)); disks sharing a controller
/// that disagree are refused.
#[test]
fn per_disk_queue_count() {
    if !require_kvm("per_disk_queue_count") {
        return;
    }
    let dir = Scratch::new("scsi-queues");
    let g = guest_elf(&dir);
    let d0 = disk(&dir, "d0.img", 8);
    let d1 = disk(&dir, "d1.img", 8);
    let o = ringvm(
        &[
            "run",
            "--kernel",
            g.to_str().unwrap(),
            "--cpus",
            "2",
            "--memory",
            "128M",
            "--cmdline",
            "work=scsi-verify mib=4 bs=65536 qd=4 seed=3",
            "--disk",
            &format!("path={d0},queues=1"),
        ],
        T,
    );
    assert_eq!(o.code(), 0, "{}\n{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("virtio-scsi queues=1 luns=1"), "{}", o.stdout);
    assert!(o.stdout.contains("bad=0"), "{}", o.stdout);
    let o = ringvm(
        &["run", "--kernel", g.to_str().unwrap(), "--memory", "64M", "--disk", &format!("path={d0},queues=1"), "--disk", &format!("path={d1},queues=2")],
        T,
    );
    assert_eq!(o.code(), 1);
    assert!(o.stderr.contains("different queue counts"), "{}", o.stderr);
}

/// The ringvm process's open files, as paths.
fn open_files(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().filter_map(|e| std::fs::read_link(e.ok()?.path()).ok()).map(|p| p.display().to_string()).collect()
}

fn wait_for_socket(sock: &std::path::Path) {
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(t0.elapsed() < T, "no QMP socket");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// QMP `device_del` of a LUN while the guest reads it (QD1, one request
/// always in flight): the guest's driver, which negotiated HOTPLUG, gets
/// TRANSPORT_RESET / REMOVED for that LUN, then finds it gone (reads
/// refused with LOGICAL UNIT NOT SUPPORTED, INQUIRY without a unit, not in
/// REPORT LUNS) and LUN 0 still served. The host side: DEVICE_DELETED,
/// query-block without it, its file closed, bad ids get DeviceNotFound.
#[test]
fn device_del_unplugs_a_lun_under_io_and_the_guest_sees_it_go() {
    if !require_kvm("device_del_unplugs_a_lun_under_io_and_the_guest_sees_it_go") {
        return;
    }
    let dir = Scratch::new("scsi-unplug");
    let g = guest_elf(&dir);
    let d0 = disk(&dir, "d0.img", 4);
    let d1 = disk(&dir, "d1.img", 4);
    let sock = dir.path("qmp.sock");
    let mut vm = Proc::spawn(Command::new(ringvm_bin()).args([
        "run",
        "--kernel",
        g.to_str().unwrap(),
        "--memory",
        "128M",
        "--cmdline",
        "work=scsi-unplug mib=1 secs=60",
        "--disk",
        &format!("path={d0}"),
        "--disk",
        &format!("path={d1},cache=none"),
        "--qmp",
        sock.to_str().unwrap(),
    ]));
    vm.wait_for_output("scsi-unplug ready luns=2 watching lun 1", T);
    wait_for_socket(&sock);
    let mut q = Qmp::negotiated(&sock);
    assert!(open_files(vm.pid()).contains(&d1), "d1 is open before the unplug");
    let r = q.cmd(serde_json::json!({"execute": "device_del", "arguments": {"id": "scsi0-lun7"}}));
    assert_eq!(r["error"]["class"], "DeviceNotFound", "{r}");
    let r = q.cmd(serde_json::json!({"execute": "device_del"}));
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    // The guest is reading the LUN when it goes.
    vm.wait_for_output("scsi-unplug reading lun 1", T);
    q.ok("device_del", serde_json::json!({"id": "scsi0-lun1"}));
    let ev = q.wait_event("DEVICE_DELETED");
    assert_eq!(ev["data"]["device"], "scsi0-lun1", "{ev}");
    let list = q.exec("query-block");
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["inserted"]["file"], d0.as_str());
    let files = open_files(vm.pid());
    assert!(!files.contains(&d1), "d1 is closed after the unplug: {files:?}");
    assert!(files.contains(&d0));
    let r = q.cmd(serde_json::json!({"execute": "device_del", "arguments": {"id": "scsi0-lun1"}}));
    assert_eq!(r["error"]["class"], "DeviceNotFound", "a second device_del: {r}");
    let o = vm.wait(T);
    assert_eq!(o.code(), 0, "stdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    assert!(o.stdout.contains(" lun=1 reason=2 reads="), "{}", o.stdout);
    assert!(o.stdout.contains("scsi-unplug PASS"), "{}", o.stdout);
    let reads: u64 = o.stdout.split("reads=").nth(1).and_then(|s| s.split_whitespace().next()).and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(reads > 0, "the guest read the LUN before it went: {}", o.stdout);
}

/// A snapshot taken after LUN 0 was unplugged keeps LUN 1 at LUN 1: the
/// restore (with the disks from the file, or with the remaining disk given
/// again) rebuilds the empty slot; `--incoming defer` with one disk is
/// refused with the reason.
#[test]
fn snapshot_after_unplug_restores_the_remaining_lun_at_its_number() {
    if !require_kvm("snapshot_after_unplug_restores_the_remaining_lun_at_its_number") {
        return;
    }
    let dir = Scratch::new("scsi-unplug-snap");
    let g = guest_elf(&dir);
    let d0 = disk(&dir, "d0.img", 4);
    let d1 = disk(&dir, "d1.img", 4);
    // LUN 1 holds the guest's pattern for (seed 5, LUN 1): the restored
    // guest reads it back through the LUN number it knew.
    let words: Vec<u8> = (0..4u64 << 20).step_by(8).flat_map(|off| pattern(5, 1, off).to_le_bytes()).collect();
    std::fs::write(&d1, words).unwrap();
    let sock = dir.path("qmp.sock");
    let mut vm = Proc::spawn(Command::new(ringvm_bin()).args([
        "run",
        "--kernel",
        g.to_str().unwrap(),
        "--memory",
        "64M",
        "--cmdline",
        "work=scsi-unplug-restore mib=4 bs=65536 seed=5",
        "--disk",
        &format!("path={d0}"),
        "--disk",
        &format!("path={d1}"),
        "--qmp",
        sock.to_str().unwrap(),
    ]));
    vm.wait_for_output("scsi-unplug-restore ready", T);
    let mut q = Qmp::negotiated(&sock);
    q.ok("device_del", serde_json::json!({"id": "scsi0-lun0"}));
    q.wait_event("DEVICE_DELETED");
    vm.wait_for_output("waiting for 'c'", T);
    let state = dir.path("vm.state");
    q.savevm_completes(&state, T);
    q.ok("quit", serde_json::json!({}));
    assert_eq!(vm.wait(T).code(), 0);
    let check = |extra: &[&str]| {
        let sock2 = dir.path("qmp2.sock");
        let _ = std::fs::remove_file(&sock2);
        let mut args = vec!["run", "--loadstate", state.to_str().unwrap(), "--qmp", sock2.to_str().unwrap()];
        args.extend_from_slice(extra);
        let mut vm = Proc::spawn_with_stdin(Command::new(ringvm_bin()).args(&args));
        wait_for_socket(&sock2);
        let mut q = Qmp::negotiated(&sock2);
        let t0 = Instant::now();
        while q.exec("query-status")["status"] != "running" {
            assert!(t0.elapsed() < T, "the restored VM never ran");
            std::thread::sleep(Duration::from_millis(20));
        }
        let list = q.exec("query-block");
        let list = list.as_array().unwrap().clone();
        // The restored guest: REPORT LUNS and a read of all of LUN 1.
        vm.type_serial(b"c");
        let o = vm.wait(T);
        assert_eq!(o.code(), 0, "{}\n{}", o.stderr, o.stdout);
        assert!(o.stdout.contains("scsi-unplug-restore luns=1 lun1 bytes=4194304 bad=0"), "{}", o.stdout);
        assert_eq!(list.len(), 1, "{list:?}");
        assert_eq!(list[0]["inserted"]["file"], d1.as_str());
        assert_eq!(list[0]["ringvm"]["lun"], 1, "{list:?}");
        assert_eq!(list[0]["device"], "scsi0-lun1");
    };
    check(&[]);
    check(&["--disk", &d1]);
    let sock3 = dir.path("qmp3.sock");
    let vm = Proc::spawn(Command::new(ringvm_bin()).args(["run", "--incoming", "defer", "--memory", "64M", "--disk", &d1, "--qmp", sock3.to_str().unwrap()]));
    wait_for_socket(&sock3);
    let mut q = Qmp::negotiated(&sock3);
    let r = q.cmd(serde_json::json!({"execute": "migrate-incoming", "arguments": {"uri": format!("file:{}", state.display())}}));
    assert!(r["error"]["desc"].as_str().unwrap_or_default().contains("unplugged"), "{r}");
    q.ok("quit", serde_json::json!({}));
    assert_eq!(vm.wait(T).code(), 0);
}
