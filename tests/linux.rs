//! Real Linux (Debian's cloud kernel, built by scripts/linux-guest.sh):
//! the banner through the PVH entry, and the bzImage boot protocol set-up.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fn linux_dir(test: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("RINGVM_LINUX_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/linux"));
    if dir.join("vmlinux").exists() {
        return Some(dir);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: no Linux guest in {} (scripts/linux-guest.sh builds it)", dir.display());
    }
    eprintln!("SKIP {test}: no Linux guest in {}; run scripts/linux-guest.sh", dir.display());
    None
}

#[test]
fn debian_kernel_prints_its_banner_through_pvh() {
    if !require_kvm("debian_kernel_prints_its_banner_through_pvh") {
        return;
    }
    let Some(dir) = linux_dir("debian_kernel_prints_its_banner_through_pvh") else { return };
    let mut p = Proc::spawn(
        Command::new(ringvm_bin())
            .args(["run", "--cpus", "1", "--memory", "512M", "--kernel"])
            .arg(dir.join("vmlinux"))
            .arg("--initrd")
            .arg(dir.join("initramfs.cpio.gz"))
            .args(["--cmdline", "console=ttyS0 earlyprintk=serial,ttyS0 panic=-1"]),
    );
    p.wait_for_output("Linux version", Duration::from_secs(120));
    // The kernel saw the e820 map and the command line ringvm gave it.
    p.wait_for_output("Command line: console=ttyS0", Duration::from_secs(30));
    p.wait_for_output("BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable", Duration::from_secs(60));
    let pid = p.pid();
    drop(p); // killed by PID
    assert!(!std::path::Path::new(&format!("/proc/{pid}/status")).exists()
        || std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default().contains("State:\tZ"));
}

#[test]
fn bzimage_boot_protocol_setup() {
    let Some(dir) = linux_dir("bzimage_boot_protocol_setup") else { return };
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 256 << 20)]).unwrap();
    let spec = ringvm::boot::BootSpec {
        kernel: dir.join("bzImage"),
        initrd: Some(dir.join("initramfs.cpio.gz")),
        cmdline: "console=ttyS0".into(),
    };
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
    let initrd_size = u64::from(rd(0x21c));
    assert_eq!(initrd_size, std::fs::metadata(dir.join("initramfs.cpio.gz")).unwrap().len());
    assert_eq!(initrd_addr % 4096, 0);
    let mut head = [0u8; 2];
    mem.read_slice(&mut head, GuestAddress(initrd_addr)).unwrap();
    assert_eq!(head, [0x1f, 0x8b], "initrd bytes in place");
    assert_eq!(rd8(0x1e8), 4, "e820 entries: low RAM, EBDA, BIOS area, high RAM");
    let mut cmd = [0u8; 14];
    mem.read_slice(&mut cmd, GuestAddress(0x20000)).unwrap();
    assert_eq!(&cmd, b"console=ttyS0\0");
}
