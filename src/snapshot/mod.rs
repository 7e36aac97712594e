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
pub mod mismatch;
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
    /// From savevm-start to the first write (dirty logging on, the
    /// iothread up, the file open), as QEMU's `setup-time`.
    pub setup_ms: Option<u64>,
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
    /// Each vCPU's dirty-rate limit, bytes/s (dirty-limit; 0: none).
    pub dirty_limits: Vec<u64>,
    /// Each vCPU's dirty rate in the last pass, MB/s (dirty rings only).
    pub vcpu_dirty_rates_mbps: Vec<f64>,
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

pub use mismatch::{check_boot, check_disk_media, check_disks, check_machine, Mismatch};

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
