//! Whether a state file fits the VM it is loaded into: the machine's size,
//! its disks (the same files, the same size and read-only setting) and,
//! when the source's command line comes along, its boot options. Each
//! difference is a [`Mismatch`]; the caller names the state file.

use std::path::Path;

use super::format;
use super::{same_file, GivenBoot};

/// How a state file and the VM it is loaded into differ.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    #[error("the file holds {saved_cpus} vCPU(s) and {} MiB, this VM has {cpus} and {} MiB", .saved_mem >> 20, .mem >> 20)]
    Machine { saved_cpus: u8, saved_mem: u64, cpus: u8, mem: u64 },
    #[error("it was saved from a guest booted from {saved}; --kernel {given} is another file")]
    Kernel { saved: String, given: String },
    #[error("it was saved from a guest booted with initrd {saved}; --initrd {given} is another file")]
    Initrd { saved: String, given: String },
    #[error("it was saved from a guest booted without an initrd; --initrd {0} was given")]
    NoInitrd(String),
    #[error("it was saved from a guest booted with --cmdline {saved:?}; this one gives {given:?}")]
    Cmdline { saved: String, given: String },
    #[error("the file holds a VM with {saved} disk(s){}, this one has {now}", unplugged_hint(*.unplugged))]
    DiskCount { saved: usize, unplugged: usize, now: usize },
    #[error("disk {index}: {} {saved} when saved, here it is {now}", if *.clone { "its clone is" } else { "it was" })]
    DiskPath { index: usize, saved: String, now: String, clone: bool },
    #[error("disk {index} ({path}): {saved} bytes when saved, {now} now ({}); a restore needs the disk as it was saved", if .now < .saved { "truncated" } else { "grown" })]
    DiskSize { index: usize, path: String, saved: u64, now: u64 },
    #[error("disk {index} ({path}): readonly={} when saved, readonly={} now; the guest would see its disk change", on(*.saved), on(*.now))]
    DiskReadonly { index: usize, path: String, saved: bool, now: bool },
}

fn on(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

fn unplugged_hint(n: usize) -> String {
    if n > 0 {
        format!(" ({n} of them unplugged: restore it with --loadstate, which keeps their LUN slots)")
    } else {
        String::new()
    }
}

/// The vCPUs and RAM a file holds against the VM's.
pub fn check_machine(m: &format::MachineDesc, cpus: u8, mem: u64) -> Result<(), Mismatch> {
    if m.cpus != cpus || m.mem_size != mem {
        return Err(Mismatch::Machine { saved_cpus: m.cpus, saved_mem: m.mem_size, cpus, mem });
    }
    Ok(())
}

/// A restore started with the source's command line: each boot option
/// given must name what the file was saved from (the kernel in RAM is the
/// one that booted; a different file or command line means the wrong
/// state file, or the wrong command line). Files saved without a record
/// of one are not checked for it.
pub fn check_boot(m: &format::MachineDesc, given: &GivenBoot) -> Result<(), Mismatch> {
    let shown = |p: &Path| p.display().to_string();
    if let (Some(saved), Some(k)) = (m.kernel.as_deref().filter(|k| !k.is_empty()), &given.kernel) {
        if !same_file(saved, k) {
            return Err(Mismatch::Kernel { saved: saved.to_string(), given: shown(k) });
        }
    }
    match (m.initrd.as_deref(), &given.initrd) {
        (Some(saved), Some(i)) if !same_file(saved, i) => return Err(Mismatch::Initrd { saved: saved.to_string(), given: shown(i) }),
        (None, Some(i)) if m.kernel.is_some() => return Err(Mismatch::NoInitrd(shown(i))),
        _ => {}
    }
    if let Some(c) = &given.cmdline {
        if m.kernel.is_some() && *c != m.cmdline {
            return Err(Mismatch::Cmdline { saved: m.cmdline.clone(), given: c.clone() });
        }
    }
    Ok(())
}

/// The disks a state file names against the media a VM has opened, in
/// order ((bytes, read-only) each): a disk that changed size, or whose
/// read-only setting differs from the one the guest saw, is refused (the
/// guest's idea of it would be wrong).
pub fn check_disk_media(saved: &[format::DiskDesc], have: &[(u64, bool)]) -> Result<(), Mismatch> {
    for (index, (s, &(size, readonly))) in saved.iter().zip(have).enumerate() {
        if s.removed {
            continue;
        }
        let path = s.clone.as_ref().unwrap_or(&s.path).clone();
        if let Some(want) = s.size.filter(|&w| w != size) {
            return Err(Mismatch::DiskSize { index, path, saved: want, now: size });
        }
        if s.readonly != readonly {
            return Err(Mismatch::DiskReadonly { index, path, saved: s.readonly, now: readonly });
        }
    }
    Ok(())
}

/// The disks a state file names against the ones a VM has (by path, in
/// order): a VM must come back on the very files it was saved with.
pub fn check_disks(saved: &[format::DiskDesc], have: &[String]) -> Result<(), Mismatch> {
    if saved.len() != have.len() {
        return Err(Mismatch::DiskCount { saved: saved.len(), unplugged: saved.iter().filter(|d| d.removed).count(), now: have.len() });
    }
    for (index, (s, h)) in saved.iter().zip(have).enumerate() {
        if s.removed {
            continue;
        }
        let want = s.clone.as_ref().unwrap_or(&s.path);
        if !same_file(want, h) {
            return Err(Mismatch::DiskPath { index, saved: want.clone(), now: h.clone(), clone: s.clone.is_some() });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(path: &str, size: u64, readonly: bool) -> format::DiskDesc {
        format::DiskDesc { path: path.into(), readonly, direct: false, iothread: None, clone: None, queues: None, removed: false, size: Some(size) }
    }

    fn machine() -> format::MachineDesc {
        format::MachineDesc {
            cpus: 2,
            mem_size: 256 << 20,
            disks: vec![disk("/nonexistent/a.img", 1 << 20, false)],
            scsi_queues: 1,
            iothreads: 1,
            kernel: Some("/nonexistent/vmlinux".into()),
            initrd: None,
            cmdline: "console=ttyS0".into(),
        }
    }

    #[test]
    fn each_difference_is_its_own_variant_with_the_old_wording() {
        let m = machine();
        assert_eq!(check_machine(&m, 2, 256 << 20), Ok(()));
        let e = check_machine(&m, 1, 512 << 20).unwrap_err();
        assert_eq!(e.to_string(), "the file holds 2 vCPU(s) and 256 MiB, this VM has 1 and 512 MiB");
        let given =
            |k: Option<&str>, i: Option<&str>, c: Option<&str>| GivenBoot { kernel: k.map(Into::into), initrd: i.map(Into::into), cmdline: c.map(Into::into) };
        assert_eq!(check_boot(&m, &given(Some("/nonexistent/vmlinux"), None, Some("console=ttyS0"))), Ok(()));
        assert!(matches!(check_boot(&m, &given(Some("/nonexistent/other"), None, None)), Err(Mismatch::Kernel { .. })));
        assert_eq!(check_boot(&m, &given(None, Some("/x.img"), None)), Err(Mismatch::NoInitrd("/x.img".into())));
        let e = check_boot(&m, &given(None, None, Some("quiet"))).unwrap_err();
        assert_eq!(e.to_string(), "it was saved from a guest booted with --cmdline \"console=ttyS0\"; this one gives \"quiet\"");
        let e = check_disk_media(&m.disks, &[(1 << 19, false)]).unwrap_err();
        assert_eq!(e.to_string(), "disk 0 (/nonexistent/a.img): 1048576 bytes when saved, 524288 now (truncated); a restore needs the disk as it was saved");
        let e = check_disk_media(&m.disks, &[(1 << 20, true)]).unwrap_err();
        assert!(e.to_string().contains("readonly=off when saved, readonly=on now"), "{e}");
        assert_eq!(check_disks(&m.disks, &[]), Err(Mismatch::DiskCount { saved: 1, unplugged: 0, now: 0 }));
        let e = check_disks(&m.disks, &["/nonexistent/b.img".into()]).unwrap_err();
        assert_eq!(e.to_string(), "disk 0: it was /nonexistent/a.img when saved, here it is /nonexistent/b.img");
    }
}
