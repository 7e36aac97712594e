//! PCI: configuration mechanism #1 (ports 0xCF8/0xCFC), a config-space model
//! with BAR sizing and a capability list, and the host bridge.

mod config;

use std::sync::{Arc, Mutex};

pub use config::{BarKind, PciConfig};

use crate::bus::BusDevice;

/// Moves a function's memory BAR when the guest reprograms it: the bus
/// mapping and the doorbell eventfds go from `old` to `new` (the VMM owns
/// both). `ioevents` are (offset in the BAR, eventfd). On an error the
/// mapping stays at `old` and the device keeps answering there.
pub trait BarRelocator: Send + Sync {
    fn move_bar(&self, old: u64, new: u64, len: u64, ioevents: &[(u64, &vmm_sys_util::eventfd::EventFd)]) -> Result<(), String>;
}

/// A function on PCI bus 0.
pub trait PciDevice: Send {
    /// Reads the 32-bit config register `reg` (byte offset / 4).
    fn config_read(&mut self, reg: usize) -> u32;
    /// Writes `data` at byte `offset` within register `reg`.
    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]);
}

/// Host bridge (bus 0, device 0), Intel 440FX-like identity.
pub struct HostBridge {
    config: PciConfig,
}

impl Default for HostBridge {
    fn default() -> Self {
        // Vendor Intel, device 440FX host bridge, class 06/00 (bridge, host).
        Self { config: PciConfig::new(0x8086, 0x1237, 0x06, 0x00, 0x00, 0, 0) }
    }
}

impl PciDevice for HostBridge {
    fn config_read(&mut self, reg: usize) -> u32 {
        self.config.read_reg(reg)
    }
    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        self.config.write(reg, offset, data);
    }
}

pub const MAX_DEVICES: usize = 32;

/// Bus 0 with up to 32 single-function devices, seen through ports
/// 0xCF8-0xCFF. Register with length 8 at 0xCF8.
pub struct PciConfigIo {
    address: u32,
    devices: Vec<Option<Arc<Mutex<dyn PciDevice>>>>,
}

impl Default for PciConfigIo {
    fn default() -> Self {
        Self::new()
    }
}

impl PciConfigIo {
    pub fn new() -> Self {
        let mut devices: Vec<Option<Arc<Mutex<dyn PciDevice>>>> = (0..MAX_DEVICES).map(|_| None).collect();
        devices[0] = Some(Arc::new(Mutex::new(HostBridge::default())));
        Self { address: 0, devices }
    }

    /// Plugs `dev` into the first free slot; returns the device number.
    pub fn add(&mut self, dev: Arc<Mutex<dyn PciDevice>>) -> crate::Result<u8> {
        let slot = self.devices.iter().position(Option::is_none).ok_or(crate::Error::PciExhausted("no free slot on bus 0"))?;
        self.devices[slot] = Some(dev);
        Ok(slot as u8)
    }

    /// (device, register) selected by the address latch, if it targets an
    /// existing function 0 on bus 0 and the enable bit is set.
    fn target(&self) -> Option<(&Arc<Mutex<dyn PciDevice>>, usize)> {
        let a = self.address;
        if a & 0x8000_0000 == 0 {
            return None;
        }
        let bus = (a >> 16) & 0xff;
        let dev = ((a >> 11) & 0x1f) as usize;
        let func = (a >> 8) & 0x7;
        let reg = ((a >> 2) & 0x3f) as usize;
        if bus != 0 || func != 0 {
            return None;
        }
        self.devices.get(dev)?.as_ref().map(|d| (d, reg))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            0..=3 => {
                let v = self.address.to_le_bytes();
                let o = offset as usize;
                let n = data.len().min(4 - o);
                data[..n].copy_from_slice(&v[o..o + n]);
                data[n..].fill(0xff);
                return;
            }
            4..=7 => match self.target() {
                Some((d, reg)) => d.lock().unwrap_or_else(|e| e.into_inner()).config_read(reg),
                None => 0xffff_ffff,
            },
            _ => 0xffff_ffff,
        };
        let shift = (offset as usize - 4) * 8;
        let v = (value >> shift).to_le_bytes();
        let n = data.len().min(4 - (offset as usize - 4));
        data[..n].copy_from_slice(&v[..n]);
        data[n..].fill(0xff);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => {
                self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            }
            4..=7 => {
                let o = offset as usize - 4;
                if o + data.len() > 4 {
                    return;
                }
                if let Some((d, reg)) = self.target() {
                    d.lock().unwrap_or_else(|e| e.into_inner()).config_write(reg, o, data);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg_read(io: &mut PciConfigIo, dev: u32, reg: u32) -> u32 {
        io.write(0, &(0x8000_0000 | (dev << 11) | (reg << 2)).to_le_bytes());
        let mut b = [0u8; 4];
        io.read(4, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn enumerates_host_bridge_only() {
        let mut io = PciConfigIo::new();
        assert_eq!(cfg_read(&mut io, 0, 0), 0x1237_8086);
        assert_eq!(cfg_read(&mut io, 0, 2) >> 16, 0x0600);
        assert_eq!(cfg_read(&mut io, 1, 0), 0xffff_ffff);
        // Function 1 of device 0 does not exist.
        io.write(0, &(0x8000_0100u32).to_le_bytes());
        let mut b = [0u8; 4];
        io.read(4, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0xffff_ffff);
        // Byte reads at an offset within the data port.
        io.write(0, &(0x8000_0000u32).to_le_bytes());
        let mut w = [0u8; 2];
        io.read(6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1237);
        // The address latch reads back.
        io.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x8000_0000);
    }
}
