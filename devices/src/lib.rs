//! Guest-facing device models for ringvm.
//!
//! Devices here know nothing about KVM: they see port/MMIO accesses through
//! [`bus::Bus`], guest memory through vm-memory, interrupts through
//! [`Interrupt`] (an eventfd-backed line the VMM wires to an irqfd), and
//! I/O through a ring handle.

pub mod bus;
pub mod dirty;
pub mod legacy;
pub mod pci;
pub mod persist;
pub mod ratelimit;
pub mod scsi;
pub mod virtio;

use std::io;

use vmm_sys_util::eventfd::EventFd;

/// Errors of the device crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Two devices claimed overlapping bus ranges.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    BusOverlap { base: u64, len: u64 },
    /// A zero-length bus range.
    #[error("bus range at {0:#x} has zero length")]
    BusZeroLength(u64),
    /// Creating or cloning an eventfd failed.
    #[error("eventfd")]
    EventFd(#[source] io::Error),
    /// No free PCI slot or BAR space.
    #[error("PCI resources exhausted: {0}")]
    PciExhausted(&'static str),
    /// Setting up interrupt routing failed.
    #[error("interrupt routing: {0}")]
    Irq(String),
    /// A disk could not be opened or used.
    #[error("disk {path}: {what}")]
    Disk { path: String, what: String },
    /// An iothread refused work or did not quiesce in time.
    #[error("iothread: {0}")]
    Ring(#[from] ring::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// An edge-triggered interrupt line backed by an eventfd (KVM irqfd).
#[derive(Debug)]
pub struct Interrupt {
    evt: EventFd,
}

impl Interrupt {
    pub fn new() -> Result<Self> {
        Ok(Self { evt: EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)? })
    }

    /// The eventfd to register with the hypervisor.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    pub fn trigger(&self) -> io::Result<()> {
        self.evt.write(1)
    }

    pub fn try_clone(&self) -> Result<Self> {
        Ok(Self { evt: self.evt.try_clone().map_err(Error::EventFd)? })
    }
}

impl vm_superio::Trigger for Interrupt {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        Interrupt::trigger(self)
    }
}

/// What a device asks of the machine that hosts it.
pub trait VmRequests: Send + Sync {
    /// The guest asked for a system reset (i8042 pulse, triple fault, ...).
    fn reset(&self);
    /// The guest asked the VMM to exit with `code` (isa-debug-exit).
    fn exit(&self, code: u8);
    /// The guest powered itself off (ACPI S5).
    fn shutdown(&self);
}

/// An MSI message (address/data) as the guest programmed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiMessage {
    pub addr: u64,
    pub data: u32,
}

/// MSI routing, provided by the VMM (KVM GSI routes + irqfds).
pub trait MsiRouter: Send + Sync {
    /// Reserves a GSI for one vector.
    fn allocate(&self) -> Result<u32>;
    /// Routes `gsi` to `msg` and binds `irqfd` to it; `None` unbinds it
    /// (masked or disabled: signals stay pending in the eventfd and are
    /// delivered when it is bound again).
    fn route(&self, gsi: u32, msg: Option<MsiMessage>, irqfd: &EventFd) -> Result<()>;
}
