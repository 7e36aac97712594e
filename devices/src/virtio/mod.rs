//! Virtio 1.x: the PCI transport ([`pci`]) and devices ([`scsi`]).

pub mod pci;
pub mod scsi;

use std::sync::Arc;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use virtio_bindings::{virtio_config as cfg, virtio_ring as vring};

// Feature bits (as masks) and device status bits, from the virtio
// headers (virtio-bindings).
pub const VIRTIO_F_VERSION_1: u64 = 1 << cfg::VIRTIO_F_VERSION_1;
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << vring::VIRTIO_RING_F_INDIRECT_DESC;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << vring::VIRTIO_RING_F_EVENT_IDX;

pub const STATUS_ACKNOWLEDGE: u8 = cfg::VIRTIO_CONFIG_S_ACKNOWLEDGE as u8;
pub const STATUS_DRIVER: u8 = cfg::VIRTIO_CONFIG_S_DRIVER as u8;
pub const STATUS_DRIVER_OK: u8 = cfg::VIRTIO_CONFIG_S_DRIVER_OK as u8;
pub const STATUS_FEATURES_OK: u8 = cfg::VIRTIO_CONFIG_S_FEATURES_OK as u8;
pub const STATUS_NEEDS_RESET: u8 = cfg::VIRTIO_CONFIG_S_NEEDS_RESET as u8;
pub const STATUS_FAILED: u8 = cfg::VIRTIO_CONFIG_S_FAILED as u8;

/// A queue handed to a device when the driver sets DRIVER_OK.
pub struct ActiveQueue {
    pub index: u16,
    pub queue: virtio_queue::Queue,
    /// Written by the guest's notify (a KVM ioeventfd, no vCPU exit).
    pub notify: EventFd,
    /// The queue's MSI-X vector as an irqfd, if the driver assigned one.
    pub irq: Option<Arc<EventFd>>,
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u16;
    fn queue_max_sizes(&self) -> Vec<u16>;
    fn features(&self) -> u64;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts serving `queues` (the driver set DRIVER_OK).
    fn activate(&mut self, mem: GuestMemoryMmap, acked_features: u64, queues: Vec<ActiveQueue>) -> crate::Result<()>;
    /// Stops serving: returns once no request is in flight (it waits on
    /// events its iothreads set, never on their loops). Queues go back to
    /// the transport's reset state.
    fn reset(&mut self) -> crate::Result<()>;
    /// Stops taking requests and returns once none is in flight, keeping
    /// the queues' and the device's state (a snapshot's final pause, when
    /// the vCPUs are already out). [`VirtioDevice::activate`] serves the
    /// queues again.
    fn pause(&mut self) -> crate::Result<()>;
    /// Device-specific state (its config fields), for a snapshot.
    fn save(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// Loads what [`VirtioDevice::save`] produced; untrusted input.
    fn restore(&mut self, _state: &serde_json::Value) -> Result<(), crate::persist::PersistError> {
        Ok(())
    }
    /// The device found a broken queue (DEVICE_NEEDS_RESET).
    fn needs_reset(&self) -> bool {
        false
    }
    /// Lines for `query-block`-style reporting.
    fn describe(&self) -> Vec<String> {
        Vec::new()
    }
}
