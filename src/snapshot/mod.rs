//! Live snapshots ("savevm-async"): RAM is written by an iothread's
//! io_uring straight from guest memory while the guest runs with KVM dirty
//! logging; a short pause writes what is left, and the vCPU and machine
//! state. See docs/state-format.md.

pub mod chain;
pub mod converge;
pub mod format;
pub mod fsprobe;
pub mod incoming;
pub mod lazy;
pub mod load_error;
pub mod mapguard;
pub mod merge;
pub mod pages;
pub mod restore;
pub mod save;
pub mod save_error;
pub mod target;
pub mod uri;

use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// What `query-savevm` reports.
#[derive(Clone, Debug, Default)]
pub struct SaveStatus {
    pub state: SaveState,
    pub path: String,
    pub error: Option<String>,
    pub started: Option<Instant>,
    pub total_ms: u64,
    pub bytes: u64,
    pub iterations: u32,
    pub remaining: u64,
    pub downtime_ms: Option<f64>,
    pub throughput_mbps: f64,
    pub dirty_rate_mbps: f64,
    pub stalled: bool,
    pub direct_io: bool,
    /// The vCPUs' CPU throttle (auto-converge), percent.
    pub throttle_pct: u32,
    /// Once complete: the file's id and its completion record's checksum
    /// (what an incremental snapshot against it names).
    pub file_id: u64,
    pub record_crc: u32,
    /// The unfinished file a failed or cancelled snapshot leaves, for the
    /// control side to remove off the iothread (an unlink waits behind
    /// writes a stalled target still holds).
    pub leftover: Option<std::path::PathBuf>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SaveState {
    #[default]
    None,
    Active,
    Completed,
    Failed,
}

impl SaveState {
    pub fn as_str(self) -> &'static str {
        match self {
            SaveState::None => "none",
            SaveState::Active => "active",
            SaveState::Completed => "completed",
            SaveState::Failed => "failed",
        }
    }
}

/// Shared between the control thread (QMP) and the saving iothread.
#[derive(Default)]
pub struct SaveShared {
    pub status: Mutex<SaveStatus>,
    pub cancel: std::sync::atomic::AtomicBool,
}

impl SaveShared {
    pub fn get(&self) -> SaveStatus {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    pub fn update(&self, f: impl FnOnce(&mut SaveStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// Machine-level KVM state saved with the vCPUs.
#[derive(Serialize, Deserialize)]
pub struct MachineState {
    pub irqchips: Vec<kvm_bindings::kvm_irqchip>,
    pub pit: kvm_bindings::kvm_pit_state2,
    pub clock: kvm_bindings::kvm_clock_data,
}

/// The state section's JSON: versioned per part.
#[derive(Serialize, Deserialize)]
pub struct StateSection {
    pub vcpus_version: u32,
    pub vcpus: Vec<crate::vcpu::VcpuState>,
    pub machine_version: u32,
    pub machine: MachineState,
    pub serial_version: u32,
    pub serial: Option<serde_json::Value>,
    /// virtio-pci functions (version 1), in attach order; absent in files
    /// of VMs without disks written before they existed.
    #[serde(default)]
    pub devices_version: u32,
    #[serde(default)]
    pub devices: Vec<devices::virtio::pci::VirtioPciState>,
}

/// Boot options given on a restoring VM's command line (None: not given).
#[derive(Clone, Debug, Default)]
pub struct GivenBoot {
    pub kernel: Option<std::path::PathBuf>,
    pub initrd: Option<std::path::PathBuf>,
    pub cmdline: Option<String>,
}

/// Whether two names denote the same file: the same text, or the same
/// canonical path (names that do not resolve, such as nfs:// URIs, only
/// by text).
pub fn same_file(a: impl AsRef<std::path::Path>, b: impl AsRef<std::path::Path>) -> bool {
    let (a, b) = (a.as_ref(), b.as_ref());
    a == b || matches!((std::fs::canonicalize(a), std::fs::canonicalize(b)), (Ok(x), Ok(y)) if x == y)
}

/// A restore started with the source's command line: each boot option
/// given must name what the file was saved from (the kernel in RAM is the
/// one that booted; a different file or command line means the wrong
/// state file, or the wrong command line). Files saved without a record
/// of one are not checked for it.
pub fn check_boot(m: &format::MachineDesc, given: &GivenBoot) -> Result<(), String> {
    if let (Some(saved), Some(k)) = (m.kernel.as_deref().filter(|k| !k.is_empty()), &given.kernel) {
        if !same_file(saved, k) {
            return Err(format!("it was saved from a guest booted from {saved}; --kernel {} is another file", k.display()));
        }
    }
    match (m.initrd.as_deref(), &given.initrd) {
        (Some(saved), Some(i)) if !same_file(saved, i) => {
            return Err(format!("it was saved from a guest booted with initrd {saved}; --initrd {} is another file", i.display()))
        }
        (None, Some(i)) if m.kernel.is_some() => return Err(format!("it was saved from a guest booted without an initrd; --initrd {} was given", i.display())),
        _ => {}
    }
    if let Some(c) = &given.cmdline {
        if m.kernel.is_some() && *c != m.cmdline {
            return Err(format!("it was saved from a guest booted with --cmdline {:?}; this one gives {c:?}", m.cmdline));
        }
    }
    Ok(())
}

/// The disks a state file names against the media a VM has opened, in
/// order ((bytes, read-only) each): a disk that changed size, or whose
/// read-only setting differs from the one the guest saw, is refused (the
/// guest's idea of it would be wrong).
pub fn check_disk_media(saved: &[format::DiskDesc], have: &[(u64, bool)]) -> Result<(), String> {
    for (i, (s, &(size, readonly))) in saved.iter().zip(have).enumerate() {
        if s.removed {
            continue;
        }
        let path = s.clone.as_ref().unwrap_or(&s.path);
        if let Some(want) = s.size.filter(|&w| w != size) {
            let how = if size < want { "truncated" } else { "grown" };
            return Err(format!("disk {i} ({path}): {want} bytes when saved, {size} now ({how}); a restore needs the disk as it was saved"));
        }
        if s.readonly != readonly {
            let on = |b: bool| if b { "on" } else { "off" };
            return Err(format!(
                "disk {i} ({path}): readonly={} when saved, readonly={} now; the guest would see its disk change",
                on(s.readonly),
                on(readonly)
            ));
        }
    }
    Ok(())
}

/// The disks a state file names against the ones a VM has (by path, in
/// order): a VM must come back on the very files it was saved with.
pub fn check_disks(saved: &[format::DiskDesc], have: &[String]) -> Result<(), String> {
    if saved.len() != have.len() {
        let gone = saved.iter().filter(|d| d.removed).count();
        let how = if gone > 0 { format!(" ({gone} of them unplugged: restore it with --loadstate, which keeps their LUN slots)") } else { String::new() };
        return Err(format!("the file holds a VM with {} disk(s){how}, this one has {}", saved.len(), have.len()));
    }
    for (i, (s, h)) in saved.iter().zip(have).enumerate() {
        if s.removed {
            continue;
        }
        let want = s.clone.as_ref().unwrap_or(&s.path);
        if !same_file(want, h) {
            let what = if s.clone.is_some() { "its clone is" } else { "it was" };
            return Err(format!("disk {i}: {what} {want} when saved, here it is {h}"));
        }
    }
    Ok(())
}

/// Parses and version-checks a state section.
pub fn parse_section(path: &std::path::Path, c: &format::Checked) -> crate::Result<StateSection> {
    let fail = |e: String| crate::Error::Config(format!("state file {}: {e}", path.display()));
    let section: StateSection = serde_json::from_slice(&c.state_json).map_err(|e| fail(format!("state section: {e}")))?;
    if section.vcpus_version != 1 || section.machine_version != 1 {
        return Err(fail(format!("state section versions {}/{} are not supported", section.vcpus_version, section.machine_version)));
    }
    if !section.devices.is_empty() && section.devices_version != 1 {
        return Err(fail(format!("device state version {} is not supported", section.devices_version)));
    }
    if section.vcpus.len() != usize::from(c.header.machine.cpus) {
        return Err(fail(format!("state section has {} vCPUs, the header {}", section.vcpus.len(), c.header.machine.cpus)));
    }
    Ok(section)
}
