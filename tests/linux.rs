//! A real Linux kernel as the client: Linux 6.12 from Debian's
//! linux-source-6.12, built by scripts/linux-guest.sh with the in-kernel
//! block I/O self-test (scripts/linux/ringvm_ktest.c). Each test boots it to
//! its ext4 root on ringvm's virtio-scsi, lets the self-test write, flush,
//! read back, discard and zero a second disk, and then checks on the host
//! what the guest claimed: the root filesystem is clean (`e2fsck -fn`) and
//! the test disk holds the self-test's pattern and zeroes byte for byte.
//!
//! The guest's word (its serial lines) says what ran; the host's files say
//! whether it was right.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::qmp::Qmp;
use common::*;
use serde_json::json;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// One boot to the self-test's end: about a minute here, more when the
/// other tests share the two cores.
const BOOT: Duration = Duration::from_secs(600);
const MIB: u64 = 1 << 20;
/// The self-test's defaults (ringvm_ktest.seed, .offset_mib, .mib).
const SEED: u64 = 0x5249_4e47_564d;
const PATTERN_AT: u64 = MIB;
const PATTERN_LEN: u64 = 4 * MIB;
const TEST_DISK: u64 = 16 * MIB;

struct Guest {
    dir: PathBuf,
    cmdline: String,
}

impl Guest {
    fn kernel(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

fn linux_guest(test: &str) -> Option<Guest> {
    let dir = std::env::var_os("RINGVM_LINUX_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/linux"));
    if dir.join("vmlinux").exists() && dir.join("root.img").exists() {
        let cmdline = std::fs::read_to_string(dir.join("cmdline")).unwrap().trim().to_string();
        return Some(Guest { dir, cmdline });
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: no Linux guest in {} (scripts/linux-guest.sh builds it)", dir.display());
    }
    eprintln!("SKIP {test}: no Linux guest in {}; run scripts/linux-guest.sh", dir.display());
    None
}

/// The word the self-test writes at disk byte offset `off`.
fn pattern_word(off: u64) -> u64 {
    (off >> 3).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ SEED
}

/// The test disk as the self-test leaves it: its pattern at 1-5 MiB, the
/// discarded MiB (reads as zeroes: ringvm reports LBPRZ) and the zeroed
/// MiB after it, nothing written anywhere else.
fn check_test_disk(path: &Path) {
    let d = std::fs::read(path).unwrap();
    assert_eq!(d.len() as u64, TEST_DISK, "{} changed size", path.display());
    let mut bad = Vec::new();
    for off in (PATTERN_AT..PATTERN_AT + PATTERN_LEN).step_by(8) {
        let w = u64::from_le_bytes(d[off as usize..off as usize + 8].try_into().unwrap());
        if w != pattern_word(off) {
            bad.push(off);
        }
    }
    assert!(bad.is_empty(), "{}: {} words of the self-test's pattern are wrong, first at byte {}", path.display(), bad.len(), bad[0]);
    let nonzero = |r: std::ops::Range<u64>| d[r.start as usize..r.end as usize].iter().position(|&b| b != 0).map(|i| r.start + i as u64);
    let end = PATTERN_AT + PATTERN_LEN;
    assert_eq!(nonzero(0..PATTERN_AT), None, "{}: bytes before the pattern", path.display());
    assert_eq!(nonzero(end..end + MIB), None, "{}: the discarded MiB is not zero", path.display());
    assert_eq!(nonzero(end + MIB..end + 2 * MIB), None, "{}: the WRITE ZEROES MiB is not zero", path.display());
    assert_eq!(nonzero(end + 2 * MIB..TEST_DISK), None, "{}: bytes past the self-test's range", path.display());
}

/// `e2fsck -fn` finds the root filesystem clean, with no journal to replay.
fn check_root_clean(path: &Path) {
    let o = Command::new("e2fsck").arg("-fn").arg(path).output().expect("e2fsck (e2fsprogs)");
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.status.code(), Some(0), "e2fsck -fn {}:\n{text}", path.display());
    assert!(!text.contains("journal recovery"), "{} was left with a journal to replay:\n{text}", path.display());
}

struct Disks {
    root: PathBuf,
    test: PathBuf,
}

fn make_disks(dir: &Path, g: &Guest) -> Disks {
    let root = dir.join("root.img");
    std::fs::copy(g.dir.join("root.img"), &root).unwrap();
    let test = dir.join("test.img");
    std::fs::File::create(&test).unwrap().set_len(TEST_DISK).unwrap();
    Disks { root, test }
}

fn linux(g: &Guest, kernel: &str, cpus: u32, disks: &Disks, extra_cmdline: &str) -> Command {
    let mut c = Command::new(ringvm_bin());
    c.args(["run", "--cpus", &cpus.to_string(), "--memory", "256M", "--no-reboot", "--kernel", &g.kernel(kernel)])
        .args(["--cmdline", &format!("{} ringvm_ktest.disk=sdb{extra_cmdline}", g.cmdline)])
        .arg("--disk")
        .arg(format!("path={}", disks.root.display()))
        .arg("--disk")
        .arg(format!("path={}", disks.test.display()));
    c
}

/// What Linux printed on its way to the self-test's end.
fn assert_milestones(out: &str, cpus: u32) {
    for m in [
        " default/read/poll queues",
        "scsi 0:0:0:0: Direct-Access     RINGVM",
        "scsi 0:0:0:1: Direct-Access     RINGVM",
        "[sda] 131072 512-byte logical blocks",
        "[sdb] 32768 512-byte logical blocks",
        "VFS: Mounted root (ext4 filesystem)",
        "RINGVM-KTEST PASS disk=sdb",
        "RINGVM-KTEST DONE PASS; root remounted ro",
    ] {
        assert!(out.contains(m), "Linux never printed {m:?}:\n{out}");
    }
    assert!(out.lines().any(|l| l.contains("EXT4-fs (sda): mounted filesystem") && l.contains(" r/w ")), "root not mounted r/w:\n{out}");
    assert!(out.contains(&format!("smp: Brought up 1 node, {cpus} CPU")), "not {cpus} CPU(s) online:\n{out}");
    for bad in ["RINGVM-KTEST FAIL", "Call Trace", "rcu: INFO", "BUG:", "WARNING:", "Kernel panic", "timed out", "I/O error"] {
        assert!(!out.contains(bad), "Linux printed {bad:?}:\n{out}");
    }
}

/// ringvm-specific: Linux configures itself from ringvm's ACPI tables and
/// the devices it probes find what they expect.
fn assert_devices_clean(out: &str, stderr: &str) {
    for m in [
        "ACPI: RSDP 0x00000000000E0000",
        "ACPI: Interpreter enabled",
        "ACPI: Using ACPI (MADT) for SMP configuration information",
        "ACPI: PCI Root Bridge [PCI0]",
        "ACPI: button: Power Button [PWRB]",
        "i8042: PNP: PS/2 Controller [PNP0303:KBD] at 0x60,0x64",
        "serio: i8042 KBD port at 0x60,0x64",
        "input: AT Translated Set 2 keyboard",
    ] {
        assert!(out.contains(m), "Linux never printed {m:?}:\n{out}");
    }
    for bad in ["Can't read CTR", "ACPI Error", "ACPI BIOS Error", "relocation is not supported"] {
        assert!(!out.contains(bad) && !stderr.contains(bad), "{bad:?}:\n{out}\n{stderr}");
    }
    assert!(!stderr.contains("WARN"), "ringvm warned:\n{stderr}");
}

/// How the self-test's init ends the machine.
#[derive(Clone, Copy, PartialEq)]
enum End {
    /// A restart, through the FADT's reset register (ringvm exits under --no-reboot).
    Restart,
    /// QMP `system_powerdown` presses the ACPI power button; Linux powers
    /// off through S5.
    PowerButton,
}

fn boot_and_check(test: &str, kernel: &str, cpus: u32, end: End) {
    if !require_kvm(test) {
        return;
    }
    let Some(g) = linux_guest(test) else { return };
    let dir = Scratch::new(test);
    let disks = make_disks(&dir.0, &g);
    let sock = dir.path("qmp.sock");
    let mut cmd = linux(&g, kernel, cpus, &disks, if end == End::PowerButton { " ringvm_ktest.power=1" } else { "" });
    cmd.env("RUST_LOG", "info").arg("--qmp").arg(&sock);
    let mut p = Proc::spawn(&mut cmd);
    if end == End::PowerButton {
        p.wait_for_output("RINGVM-KTEST waiting for the power button", BOOT);
        let mut q = Qmp::negotiated(&sock);
        assert_eq!(q.cmd(json!({"execute": "system_powerdown"})), json!({"return": {}}));
        q.wait_event("POWERDOWN");
        let ev = q.wait_event("SHUTDOWN");
        assert_eq!(ev["data"], json!({"guest": true, "reason": "guest-shutdown"}), "{ev}");
    }
    let o = p.wait(BOOT);
    assert_eq!(o.code(), 0, "ringvm: {}\n{}", o.stderr, o.stdout);
    assert_milestones(&o.stdout, cpus);
    assert_devices_clean(&o.stdout, &o.stderr);
    match end {
        End::Restart => {
            assert!(o.stdout.contains("reboot: machine restart"), "{}", o.stdout);
            assert!(o.stderr.contains("acpi: the guest wrote the reset register"), "not restarted through ACPI:\n{}", o.stderr);
        }
        End::PowerButton => {
            for m in ["ringvm-ktest: power button pressed (Power Button)", "ACPI: PM: Preparing to enter system sleep state S5", "reboot: Power down"] {
                assert!(o.stdout.contains(m), "Linux never printed {m:?}:\n{}", o.stdout);
            }
            assert!(o.stderr.contains("acpi: the guest entered S5"), "{}", o.stderr);
        }
    }
    check_root_clean(&disks.root);
    check_test_disk(&disks.test);
}

/// PVH entry, 1 vCPU; the machine is powered down with the ACPI button.
#[test]
fn pvh_vmlinux_one_vcpu_mounts_root_passes_the_io_selftest_and_powers_down() {
    boot_and_check("linux-pvh-1cpu", "vmlinux", 1, End::PowerButton);
}

/// Linux boot protocol (bzImage), 2 vCPUs; the kernel restarts itself.
#[test]
fn bzimage_two_vcpus_mounts_root_passes_the_io_selftest_and_restarts() {
    boot_and_check("linux-bzimage-2cpu", "bzImage", 2, End::Restart);
}

/// A live snapshot of the kernel while it is probing its SCSI disks
/// (interrupts, timers and requests in flight), with the disks reflinked
/// in the final pause; the source carries on to PASS, and the state
/// restored in a fresh ringvm, read in and lazily, carries on to the root
/// mount and the self-test's PASS from where it was, on the clones.
/// Each restore starts 20 s or more after the save: where KVM keeps the
/// guest's TSC on the host's (this kvm-pvm host), the restored kernel's
/// clock jumps that far, and only KVM_KVMCLOCK_CTRL on resume keeps it
/// from reporting an RCU stall (the lazy restore did, in CI, before).
#[test]
fn snapshot_mid_boot_restores_to_root_mount_and_selftest() {
    let test = "linux-snapshot-mid-boot";
    if !require_kvm(test) {
        return;
    }
    let Some(g) = linux_guest(test) else { return };
    let scratch = Scratch::new(test);
    let Some(xfs) = XfsMount::new(&scratch) else { return };
    let disks = make_disks(&xfs.dir, &g);
    let sock = scratch.path("qmp.sock");
    let state = xfs.dir.join("boot.state");
    let mut src = Proc::spawn(linux(&g, "vmlinux", 1, &disks, "").arg("--qmp").arg(&sock));
    src.wait_for_output("scsi host0: Virtio SCSI HBA", BOOT);
    let mut q = Qmp::negotiated(&sock);
    q.ok("savevm-start", json!({"statefile": state.to_str().unwrap(), "disks": "clone"}));
    let s = q.wait_savevm(BOOT);
    assert_eq!(s["status"], "completed", "{s}");
    let at_snapshot = src.stdout();
    assert!(!at_snapshot.contains("VFS: Mounted root"), "the snapshot came too late to be mid-boot:\n{at_snapshot}");
    drop(q);
    // The clones as the snapshot left them, for the second restore.
    let clones = [xfs.dir.join("boot.state.disk0"), xfs.dir.join("boot.state.disk1")];
    let pristine = [xfs.dir.join("pristine0"), xfs.dir.join("pristine1")];
    for (c, p) in clones.iter().zip(&pristine) {
        assert!(Command::new("cp").arg("--reflink=always").arg(c).arg(p).status().unwrap().success());
    }
    for mode in ["read", "lazy"] {
        for (c, p) in clones.iter().zip(&pristine) {
            assert!(Command::new("cp").arg("--reflink=always").arg(p).arg(c).status().unwrap().success());
        }
        let r = Proc::spawn(Command::new(ringvm_bin()).args(["run", "--no-reboot", "--restore-ram", mode, "--loadstate", state.to_str().unwrap()]));
        let o = r.wait(BOOT);
        assert_eq!(o.code(), 0, "{mode} restore: {}\n{}", o.stderr, o.stdout);
        assert!(!o.stdout.contains("Linux version"), "{mode}: the restored kernel started over:\n{}", o.stdout);
        for m in ["VFS: Mounted root (ext4 filesystem)", "RINGVM-KTEST PASS disk=sdb", "RINGVM-KTEST DONE PASS; root remounted ro"] {
            assert!(o.stdout.contains(m), "{mode}: the restored kernel never printed {m:?}:\n{}", o.stdout);
        }
        for bad in ["RINGVM-KTEST FAIL", "Call Trace", "rcu: INFO", "BUG:", "WARNING:", "timed out", "I/O error", "abort"] {
            assert!(!o.stdout.contains(bad), "{mode}: the restored kernel printed {bad:?}:\n{}", o.stdout);
        }
        check_root_clean(&clones[0]);
        check_test_disk(&clones[1]);
    }
    // The source never noticed.
    let o = src.wait(BOOT);
    assert_eq!(o.code(), 0, "source: {}", o.stderr);
    assert_milestones(&o.stdout, 1);
    check_root_clean(&disks.root);
    check_test_disk(&disks.test);
}

/// The differential reference: the same kernel, command line and disks
/// under QEMU 10 (q35, virtio-scsi-pci, -kernel) reach the same milestones
/// and leave the same bytes. Where they disagree, ringvm is wrong until
/// shown otherwise.
#[test]
fn qemu_reaches_the_same_milestones() {
    let test = "linux-qemu-reference";
    let Some(g) = linux_guest(test) else { return };
    let Some(qemu) = qemu_system() else {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{test}: qemu-system-x86_64 10 is required under CI=true (scripts/peers.sh installs it)");
        }
        eprintln!("SKIP {test}: no qemu-system-x86_64 10");
        return;
    };
    let dir = Scratch::new(test);
    let disks = make_disks(&dir.0, &g);
    let o = Proc::spawn(
        Command::new(qemu)
            .args(["-M", "q35", "-accel", "tcg", "-m", "256", "-smp", "1", "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio"])
            .args(["-kernel", &g.kernel("bzImage"), "-append", &format!("{} ringvm_ktest.disk=sdb", g.cmdline)])
            .args(["-device", "virtio-scsi-pci,id=scsi0"])
            .arg("-drive")
            .arg(format!("file={},format=raw,if=none,id=d0,discard=unmap", disks.root.display()))
            .args(["-device", "scsi-hd,drive=d0,bus=scsi0.0,lun=0"])
            .arg("-drive")
            .arg(format!("file={},format=raw,if=none,id=d1,discard=unmap", disks.test.display()))
            .args(["-device", "scsi-hd,drive=d1,bus=scsi0.0,lun=1"]),
    )
    .wait(BOOT);
    assert_eq!(o.code(), 0, "qemu: {}\n{}", o.stderr, o.stdout);
    for m in [
        "virtio_scsi virtio0",
        "scsi 0:0:0:0: Direct-Access     QEMU",
        "VFS: Mounted root (ext4 filesystem)",
        "RINGVM-KTEST PASS disk=sdb",
        "RINGVM-KTEST DONE PASS",
    ] {
        assert!(o.stdout.contains(m), "QEMU: Linux never printed {m:?}:\n{}", o.stdout);
    }
    check_root_clean(&disks.root);
    check_test_disk(&disks.test);
}

fn qemu_system() -> Option<&'static str> {
    let o = Command::new("qemu-system-x86_64").arg("--version").output().ok()?;
    String::from_utf8_lossy(&o.stdout).contains("version 10").then_some("qemu-system-x86_64")
}

/// The bzImage loader's boot-protocol set-up, read back from guest memory
/// (no KVM needed).
#[test]
fn bzimage_boot_protocol_setup() {
    let Some(g) = linux_guest("bzimage_boot_protocol_setup") else { return };
    let dir = Scratch::new("linux-bzimage-setup");
    let initrd = dir.path("initrd");
    std::fs::write(&initrd, [0x1f, 0x8b, 0, 0, 1, 2, 3]).unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 256 << 20)]).unwrap();
    let spec = ringvm::boot::BootSpec { kernel: g.dir.join("bzImage"), initrd: Some(initrd.clone()), cmdline: "console=ttyS0".into() };
    let entry = ringvm::boot::load(&mem, &spec, 256 << 20, 2).unwrap();
    assert_eq!(entry.mode, ringvm::boot::EntryMode::Linux64);
    assert_eq!(entry.entry, 0x100000 + 0x200, "64-bit entry = startup_64");
    let zp = entry.boot_info;
    let rd = |off: u64| -> u32 { mem.read_obj(GuestAddress(zp + off)).unwrap() };
    let rd8 = |off: u64| -> u8 { mem.read_obj(GuestAddress(zp + off)).unwrap() };
    assert_eq!(rd(0x202), 0x5372_6448, "HdrS");
    assert_eq!(rd8(0x210), 0xff, "type_of_loader");
    assert_eq!(rd(0x228), 0x20000, "cmd_line_ptr");
    let initrd_addr = u64::from(rd(0x218));
    assert_eq!(u64::from(rd(0x21c)), 7, "initrd size");
    assert_eq!(initrd_addr % 4096, 0);
    let mut head = [0u8; 7];
    mem.read_slice(&mut head, GuestAddress(initrd_addr)).unwrap();
    assert_eq!(head, [0x1f, 0x8b, 0, 0, 1, 2, 3], "initrd bytes in place");
    let mut cmd = [0u8; 14];
    mem.read_slice(&mut cmd, GuestAddress(0x20000)).unwrap();
    assert_eq!(&cmd, b"console=ttyS0\0");
}
