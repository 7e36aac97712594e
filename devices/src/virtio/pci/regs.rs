//! BAR0's register blocks: the common configuration structure (virtio 1.x,
//! 4.1.4.3) and the MSI-X table and PBA.

use super::*;

impl VirtioPci {
    pub(super) fn common_read(&self, off: u64, data: &mut [u8]) {
        let q = self.queues.get(self.queue_select as usize);
        let feat = self.dev.features();
        let v: u64 = match off {
            0x00 => u64::from(self.device_feature_select),
            0x04 => match self.device_feature_select {
                0 => feat & 0xffff_ffff,
                1 => feat >> 32,
                _ => 0,
            },
            0x08 => u64::from(self.driver_feature_select),
            0x0c => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            0x10 => u64::from(self.config_vector),
            0x12 => self.queues.len() as u64,
            0x14 => u64::from(self.status | if self.dev.needs_reset() { STATUS_NEEDS_RESET } else { 0 }),
            0x15 => u64::from(self.generation),
            0x16 => u64::from(self.queue_select),
            0x18 => q.map_or(0, |q| u64::from(q.size)),
            0x1a => q.map_or(u64::from(NO_VECTOR), |q| u64::from(q.vector)),
            0x1c => q.map_or(0, |q| u64::from(q.enabled)),
            0x1e => u64::from(self.queue_select),
            0x20 => q.map_or(0, |q| q.desc),
            0x24 => q.map_or(0, |q| q.desc >> 32),
            0x28 => q.map_or(0, |q| q.driver),
            0x2c => q.map_or(0, |q| q.driver >> 32),
            0x30 => q.map_or(0, |q| q.device),
            0x34 => q.map_or(0, |q| q.device >> 32),
            _ => 0,
        };
        let b = v.to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&b[..n]);
    }

    pub(super) fn common_write(&mut self, off: u64, data: &[u8]) {
        let mut b = [0u8; 8];
        let n = data.len().min(8);
        b[..n].copy_from_slice(&data[..n]);
        let v = u64::from_le_bytes(b);
        let live = self.status & STATUS_DRIVER_OK != 0;
        let sel = self.queue_select as usize;
        let set_lo = |x: &mut u64, v: u64| *x = (*x & !0xffff_ffff) | (v & 0xffff_ffff);
        let set_hi = |x: &mut u64, v: u64| *x = (*x & 0xffff_ffff) | (v << 32);
        match off {
            0x00 => self.device_feature_select = v as u32,
            0x08 => self.driver_feature_select = v as u32,
            0x0c if self.status & STATUS_FEATURES_OK == 0 => match self.driver_feature_select {
                0 => set_lo(&mut self.driver_features, v),
                1 => set_hi(&mut self.driver_features, v),
                _ => {}
            },
            0x10 => self.config_vector = v as u16,
            0x14 => self.write_status(v as u8),
            0x16 => self.queue_select = v as u16,
            _ if live && (0x18..0x38).contains(&off) && off != 0x1a => {
                log::debug!("virtio-pci: queue register {off:#x} written after DRIVER_OK; ignored");
            }
            0x18 => {
                if let Some(q) = self.queues.get_mut(sel) {
                    // Split rings: a power of two up to the maximum.
                    let s = v as u16;
                    if s.is_power_of_two() && s <= self.max_sizes[sel] {
                        q.size = s;
                    } else {
                        q.size = 0;
                    }
                }
            }
            0x1a => {
                if let Some(q) = self.queues.get_mut(sel) {
                    let vec = v as u16;
                    q.vector = if (vec as usize) < self.vectors.len() { vec } else { NO_VECTOR };
                }
            }
            0x1c => {
                if let Some(q) = self.queues.get_mut(sel) {
                    q.enabled = v & 1 == 1;
                }
            }
            0x20 | 0x24 | 0x28 | 0x2c | 0x30 | 0x34 => {
                if let Some(q) = self.queues.get_mut(sel) {
                    let field = match off {
                        0x20 | 0x24 => &mut q.desc,
                        0x28 | 0x2c => &mut q.driver,
                        _ => &mut q.device,
                    };
                    if off.is_multiple_of(8) {
                        if data.len() == 8 {
                            *field = v;
                        } else {
                            set_lo(field, v);
                        }
                    } else {
                        set_hi(field, v);
                    }
                }
            }
            _ => {}
        }
    }

    pub(super) fn msix_read(&self, off: u64, data: &mut [u8]) {
        let (i, f) = ((off / 16) as usize, off % 16);
        let Some(v) = self.vectors.get(i) else { return data.fill(0) };
        let e = v.entry;
        let word: u32 = match f & !3 {
            0 => e.addr as u32,
            4 => (e.addr >> 32) as u32,
            8 => e.data,
            _ => u32::from(e.masked),
        };
        let b = word.to_le_bytes();
        let s = (f % 4) as usize;
        let n = data.len().min(4 - s);
        data[..n].copy_from_slice(&b[s..s + n]);
    }

    pub(super) fn msix_write(&mut self, off: u64, data: &[u8]) {
        let (i, f) = ((off / 16) as usize, off % 16);
        let Some(v) = self.vectors.get_mut(i) else { return };
        if data.len() != 4 && data.len() != 8 {
            return;
        }
        let w = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        match f {
            0 => {
                v.entry.addr = (v.entry.addr & !0xffff_ffff) | u64::from(w);
                if data.len() == 8 {
                    v.entry.addr = u64::from_le_bytes(data.try_into().unwrap_or([0; 8]));
                }
            }
            4 => v.entry.addr = (v.entry.addr & 0xffff_ffff) | u64::from(w) << 32,
            8 => v.entry.data = w,
            12 => v.entry.masked = w & 1 == 1,
            _ => {}
        }
        self.sync_vectors();
    }
}
