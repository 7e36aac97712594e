//! ringvm: an io_uring-centric, storage-first KVM virtual machine monitor.
//!
//! Crate map:
//! - `vmm`: builds a VM from its configuration (machine, disks, vCPUs,
//!   boot or pending restore); `machine` (KVM VM, memory, irqchip, buses),
//!   `vcpu` (threads and run loop), `boot` (kernel loading, ACPI and CPU
//!   tables, registers), `disk` (virtio-scsi controllers and their
//!   iothreads), `events` (vCPU/device/worker events to the control thread);
//! - `control`: the control thread, which runs a built VM: its io_uring
//!   loop, run state, signals, the QMP command table, and the control
//!   sides of snapshots and restores; `qmp` (protocol, socket server, and the blocking client the demo, perf and tests share);
//! - `snapshot`: the state file format, the saving iothread (`save`), the
//!   loaders (`restore`, `lazy`), `incoming` (opening and checking a file
//!   off the control thread), `mapguard` (a mapped file that shrinks);
//!   `nfs` (libnfs for nfs:// state files);
//! - `seccomp` (per-thread filters), `cli` (command line), `demo` (the `ringvm demo` main job), `error`.
//!
//! Device models live in the `ringvm-devices` crate and the io_uring event
//! loop in `ringvm-ring`.

pub mod boot;
pub mod cli;
pub mod control;
pub mod demo;
pub mod dirty_ring;
pub mod disk;
pub mod error;
pub mod events;
pub mod irq;
pub mod layout;
pub mod machine;
pub mod nfs;
pub mod qmp;
pub mod seccomp;
pub mod snapshot;
pub mod vcpu;
pub mod vmm;

pub use error::{Error, Result};

/// The test guest (tests/guest), built by build.rs and embedded so that
/// `ringvm demo` and the tests need nothing else.
pub const TEST_GUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest.elf"));

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
