//! ringvm: an io_uring-centric, storage-first KVM virtual machine monitor.
//!
//! Crate map: `machine` (KVM VM, memory, irqchip, buses), `vcpu` (threads
//! and run loop), `boot` (kernel loading, CPU tables, registers), `vmm`
//! (builder and control loop), `cli` (command line). Device models live in
//! the `ringvm-devices` crate and the io_uring event loop in `ringvm-ring`.

pub mod boot;
pub mod cli;
pub mod control;
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
