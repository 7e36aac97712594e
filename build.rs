//! Builds the test guest (tests/guest) into OUT_DIR/guest.elf.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let guest = PathBuf::from("tests/guest");
    for f in ["boot.S", "main.c", "scsi.c", "guest.ld", "Makefile"] {
        println!("cargo:rerun-if-changed=tests/guest/{f}");
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("guest.elf");
    let cc = std::env::var("GUEST_CC").unwrap_or_else(|_| "gcc".into());
    let status = Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(&guest)
        .arg(format!("OUT={}", out.display()))
        .arg(format!("CC={cc}"))
        .status()
        .expect("running make for the test guest (install make and gcc)");
    assert!(status.success(), "building the test guest failed");
}
