//! Foundation: booting the test guest and hand-assembled guests, SMP,
//! resets, fatal exits, and bad command-line values.

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(60);

fn run_guest(cpus: &str, mem: &str, cmdline: &str, extra: &[&str]) -> Output {
    let dir = Scratch::new(&format!("guest-{}", cmdline.replace([' ', '='], "_")));
    let g = guest_elf(&dir);
    let mut args = vec!["run", "--kernel", g.to_str().unwrap(), "--cpus", cpus, "--memory", mem, "--cmdline", cmdline];
    args.extend_from_slice(extra);
    ringvm(&args, T)
}

#[test]
fn mem_verify_one_vcpu() {
    if !require_kvm("mem_verify_one_vcpu") {
        return;
    }
    let o = run_guest("1", "256M", "work=mem mib=64 secs=1 rate=50", &["--no-reboot"]);
    assert_eq!(o.code(), 0, "stdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("cpus online=1"), "{}", o.stdout);
    assert!(o.stdout.contains("verify pages=16384 bad=0"), "{}", o.stdout);
    assert!(o.stdout.contains("RESULT PASS"));
    // The dirty phase really rewrote pages at about the asked rate (50 MiB/s for 1 s).
    let line = o.stdout.lines().find(|l| l.contains("dirty done")).unwrap();
    let pages: u64 = line.split("pages=").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
    assert!((6000..=13500).contains(&pages), "{line}");
}

#[test]
fn mem_verify_two_vcpus() {
    if !require_kvm("mem_verify_two_vcpus") {
        return;
    }
    let o = run_guest("2", "256M", "work=mem mib=96 secs=1 rate=0", &["--no-reboot"]);
    assert_eq!(o.code(), 0, "stdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("start cpus=2"), "MP table lists 2 CPUs: {}", o.stdout);
    assert!(o.stdout.contains("cpus online=2"), "AP came up through INIT/SIPI: {}", o.stdout);
    assert!(o.stdout.contains("verify pages=24576 bad=0"), "{}", o.stdout);
}

#[test]
fn verify_without_fill_fails() {
    if !require_kvm("verify_without_fill_fails") {
        return;
    }
    // Fresh memory holds no pattern: verify must say so, with exit code 1.
    let o = run_guest("1", "64M", "work=verify mib=16", &["--no-reboot"]);
    assert_eq!(o.code(), 1, "stdout:\n{}", o.stdout);
    assert!(o.stdout.contains("verify pages=4096 bad=4096"), "{}", o.stdout);
    assert!(o.stdout.contains("RESULT FAIL"));
}

#[test]
fn i8042_reset_reboots_the_guest() {
    if !require_kvm("i8042_reset_reboots_the_guest") {
        return;
    }
    let o = run_guest("2", "64M", "work=reboot count=5", &[]);
    assert_eq!(o.code(), 0, "stdout:\n{}\nstderr:\n{}", o.stdout, o.stderr);
    assert_eq!(o.stdout.matches("ringvm-guest: start cpus=2").count(), 6, "{}", o.stdout);
    assert!(o.stdout.contains("boot 6 of 6"));
    assert!(o.stdout.contains("reboots done 5"));
}

#[test]
fn no_reboot_exits_zero_on_reset() {
    if !require_kvm("no_reboot_exits_zero_on_reset") {
        return;
    }
    let o = run_guest("1", "64M", "work=reboot count=3", &["--no-reboot"]);
    assert_eq!(o.code(), 0, "stderr:\n{}", o.stderr);
    assert_eq!(o.stdout.matches("ringvm-guest: start").count(), 1, "{}", o.stdout);
}

#[test]
fn serial_to_file_and_bad_guest_cmdline() {
    if !require_kvm("serial_to_file_and_bad_guest_cmdline") {
        return;
    }
    let dir = Scratch::new("serial-file");
    let g = guest_elf(&dir);
    let log = dir.path("serial.log");
    let serial = format!("file={}", log.display());
    let o = ringvm(&["run", "--kernel", g.to_str().unwrap(), "--memory", "64M", "--serial", &serial, "--cmdline", "work=mem mib=zz"], T);
    assert_eq!(o.code(), 2, "guest reports a bad command line with code 2");
    assert_eq!(o.stdout, "");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("bad value for mib"), "{text}");
}

/// A minimal ELF64 with a PVH note around hand-assembled 32-bit code.
fn pvh_elf(code: &[u8]) -> Vec<u8> {
    const LOAD: u64 = 0x100000;
    let note_off = 0x78 + 0x38; // after ehdr + 2 phdrs
    let note: Vec<u8> = [4u32.to_le_bytes(), 4u32.to_le_bytes(), 18u32.to_le_bytes()]
        .concat()
        .into_iter()
        .chain(*b"Xen\0")
        .chain(0u32.to_le_bytes()) // desc, patched below
        .collect();
    let code_off = note_off + note.len();
    let entry = LOAD + code_off as u64;
    let mut f = vec![0u8; code_off];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // 64-bit
    f[5] = 1; // little endian
    f[6] = 1;
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86_64
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&entry.to_le_bytes());
    f[32..40].copy_from_slice(&0x40u64.to_le_bytes()); // phoff
    f[52..54].copy_from_slice(&0x40u16.to_le_bytes());
    f[54..56].copy_from_slice(&0x38u16.to_le_bytes());
    f[56..58].copy_from_slice(&2u16.to_le_bytes());
    let total = (code_off + code.len()) as u64;
    let phdr = |t: u32, off: u64, addr: u64, size: u64| -> Vec<u8> {
        let mut p = vec![0u8; 0x38];
        p[0..4].copy_from_slice(&t.to_le_bytes());
        p[4..8].copy_from_slice(&7u32.to_le_bytes());
        p[8..16].copy_from_slice(&off.to_le_bytes());
        p[16..24].copy_from_slice(&addr.to_le_bytes());
        p[24..32].copy_from_slice(&addr.to_le_bytes());
        p[32..40].copy_from_slice(&size.to_le_bytes());
        p[40..48].copy_from_slice(&size.to_le_bytes());
        p[48..56].copy_from_slice(&4u64.to_le_bytes());
        p
    };
    f[0x40..0x78].copy_from_slice(&phdr(1, 0, LOAD, total));
    f[0x78..0xb0].copy_from_slice(&phdr(4, note_off as u64, LOAD + note_off as u64, note.len() as u64));
    f[note_off..code_off].copy_from_slice(&note);
    f[code_off - 4..code_off].copy_from_slice(&(entry as u32).to_le_bytes());
    f.extend_from_slice(code);
    f
}

#[test]
fn hand_assembled_guest_port_io_and_registers() {
    if !require_kvm("hand_assembled_guest_port_io_and_registers") {
        return;
    }
    // 32-bit protected mode (PVH entry): %ebx holds hvm_start_info; print its
    // magic's low byte check result and exit with a computed code.
    let code = [
        0x81, 0x3b, 0x78, 0xc5, 0x6e, 0x33, // cmp dword [ebx], 0x336ec578
        0x75, 0x0f, // jne fail
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'O', 0xee, // mov al,'O'; out dx,al
        0xb0, b'K', 0xee, // mov al,'K'; out dx,al
        0xb0, 0x2a, // mov al, 42
        0xeb, 0x02, // jmp out
        0xb0, 0x07, // fail: mov al, 7
        0x66, 0xba, 0x01, 0x05, // out: mov dx, 0x501
        0xee, // out dx, al
        0xf4, // hlt
    ];
    let dir = Scratch::new("handasm");
    let k = dir.path("k.elf");
    std::fs::write(&k, pvh_elf(&code)).unwrap();
    let o = ringvm(&["run", "--kernel", k.to_str().unwrap(), "--memory", "32M"], T);
    assert_eq!(o.stdout, "OK");
    assert_eq!(o.code(), 42, "stderr: {}", o.stderr);
}

#[test]
fn fatal_exit_names_rip_and_bytes() {
    if !require_kvm("fatal_exit_names_rip_and_bytes") {
        return;
    }
    // int3 at CPL0 with no IDT: a triple fault on hardware KVM, an emulation
    // failure on PVM. Either way: status 1 and a message with RIP and bytes.
    let dir = Scratch::new("fatal");
    let k = dir.path("k.elf");
    std::fs::write(&k, pvh_elf(&[0x90, 0xcc, 0xf4])).unwrap();
    let o = ringvm(&["run", "--kernel", k.to_str().unwrap(), "--memory", "32M", "--no-reboot"], T);
    assert_eq!(o.code(), 1, "stderr: {}", o.stderr);
    let err = o.stderr.trim();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("RIP 0x1000"), "{err}");
    assert!(err.contains("instruction bytes: cc f4") || err.contains("instruction bytes: 90 cc f4"), "{err}");
    assert!(err.contains("KVM_EXIT_SHUTDOWN") || err.contains("KVM_EXIT_INTERNAL_ERROR"), "{err}");
}

#[test]
fn bad_command_lines_give_one_line_and_status_1() {
    let dir = Scratch::new("badcli");
    let g = guest_elf(&dir);
    let g = g.to_str().unwrap();
    let junk = dir.path("junk");
    std::fs::write(&junk, b"not a kernel at all").unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["run", "--kernel", g, "--cpus", "0"], "--cpus"),
        (vec!["run", "--kernel", g, "--cpus", "many"], "--cpus"),
        (vec!["run", "--kernel", g, "--memory", "100T"], "larger than the host"),
        (vec!["run", "--kernel", g, "--memory", "1M"], "below the minimum"),
        (vec!["run", "--kernel", g, "--memory", "12Q"], "unknown size suffix"),
        (vec!["run", "--kernel", g, "--memory", "0"], "greater than zero"),
        (vec!["run", "--kernel", "/nonexistent/kernel"], "cannot open kernel /nonexistent/kernel"),
        (vec!["run", "--kernel", junk.to_str().unwrap()], "neither an ELF"),
        (vec!["run", "--kernel", g, "--initrd", "/nonexistent/initrd"], "cannot open initrd"),
        (vec!["run", "--kernel", g, "--serial", "tcp:1"], "--serial"),
        (vec!["run"], "--kernel"),
        (vec!["run", "--kernel", g, "--frobnicate"], "--frobnicate"),
        (vec!["launch"], "launch"),
    ];
    for (args, needle) in cases {
        let o = ringvm(&args, Duration::from_secs(20));
        assert_eq!(o.code(), 1, "{args:?}: stderr {}", o.stderr);
        let err = o.stderr.trim_end();
        assert_eq!(err.lines().count(), 1, "{args:?}: expected one line, got:\n{err}");
        assert!(err.contains(needle), "{args:?}: {err:?} lacks {needle:?}");
        assert!(!err.contains("panicked") && !err.contains("backtrace"), "{err}");
    }
}

/// Without access to /dev/kvm, ringvm says so in one line and exits 1. As
/// root the test drops to uid 65534 with copies of the binary and guest it
/// can execute and read; any other outcome (a panic, a second line) fails.
#[test]
fn no_access_to_dev_kvm_is_one_line() {
    use std::os::unix::fs::PermissionsExt;
    let dir = Scratch::new("nokvm");
    let g = guest_elf(&dir);
    let bin = dir.path("ringvm");
    std::fs::copy(ringvm_bin(), &bin).unwrap();
    for (p, mode) in [(&dir.0, 0o755), (&g, 0o644), (&bin, 0o755)] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let mut cmd = if unsafe_free_is_root() {
        let mut c = std::process::Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"]).arg(&bin);
        c
    } else if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        std::process::Command::new(&bin)
    } else {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("no_access_to_dev_kvm_is_one_line: needs root (to drop privileges) under CI=true");
        }
        eprintln!("SKIP no_access_to_dev_kvm_is_one_line: not root and /dev/kvm is accessible");
        return;
    };
    let o = Proc::spawn(cmd.args(["run", "--kernel"]).arg(&g)).wait(Duration::from_secs(20));
    let err = o.stderr.trim_end();
    assert_eq!(o.code(), 1, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("/dev/kvm") && err.contains("Permission denied"), "{err}");
}

fn unsafe_free_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").map(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))).unwrap_or(false)
}
