//! PCI type-0 configuration space with BAR sizing and capabilities.

const NUM_REGS: usize = 64; // 256 bytes
const BAR0_REG: usize = 4;
const NUM_BARS: usize = 6;
const CAP_PTR_REG: usize = 13;
const STATUS_CAP_LIST: u32 = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    Io,
    Mem32,
    Mem64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Bar {
    size: u64,
    kind: Option<BarKind>,
}

/// 256 bytes of config space, with a write mask per register.
#[derive(Clone, Debug)]
pub struct PciConfig {
    regs: [u32; NUM_REGS],
    wmask: [u32; NUM_REGS],
    bars: [Bar; NUM_BARS],
    last_cap: Option<usize>,
    next_cap_offset: usize,
}

impl PciConfig {
    pub fn new(vendor: u16, device: u16, class: u8, subclass: u8, prog_if: u8, subsys_vendor: u16, subsys_id: u16) -> Self {
        let mut regs = [0u32; NUM_REGS];
        let mut wmask = [0u32; NUM_REGS];
        regs[0] = u32::from(device) << 16 | u32::from(vendor);
        regs[2] = u32::from(class) << 24 | u32::from(subclass) << 16 | u32::from(prog_if) << 8;
        regs[11] = u32::from(subsys_id) << 16 | u32::from(subsys_vendor);
        // Command register: I/O, memory, bus master, INTx disable are writable.
        wmask[1] = 0x0000_0407;
        // Cache line size and latency timer.
        wmask[3] = 0x0000_ffff;
        // Interrupt line.
        wmask[15] = 0x0000_00ff;
        Self { regs, wmask, bars: [Bar::default(); NUM_BARS], last_cap: None, next_cap_offset: 0x40 }
    }

    /// Declares BAR `idx` of `size` bytes (a power of two) at `addr`.
    pub fn set_bar(&mut self, idx: usize, kind: BarKind, addr: u64, size: u64) {
        assert!(size.is_power_of_two() && idx < NUM_BARS, "BAR {idx} size {size:#x}");
        let reg = BAR0_REG + idx;
        match kind {
            BarKind::Io => {
                self.regs[reg] = (addr as u32 & !0x3) | 1;
                self.wmask[reg] = !(size as u32 - 1) & !0x3;
            }
            BarKind::Mem32 => {
                self.regs[reg] = addr as u32 & !0xf;
                self.wmask[reg] = !(size as u32 - 1) & !0xf;
            }
            BarKind::Mem64 => {
                assert!(idx + 1 < NUM_BARS);
                self.regs[reg] = (addr as u32 & !0xf) | 0x4;
                self.regs[reg + 1] = (addr >> 32) as u32;
                let mask = !(size - 1);
                self.wmask[reg] = mask as u32 & !0xf;
                self.wmask[reg + 1] = (mask >> 32) as u32;
            }
        }
        self.bars[idx] = Bar { size, kind: Some(kind) };
    }

    /// Current guest-programmed address of BAR `idx`.
    pub fn bar_addr(&self, idx: usize) -> u64 {
        let reg = BAR0_REG + idx;
        match self.bars[idx].kind {
            Some(BarKind::Io) => u64::from(self.regs[reg] & !0x3),
            Some(BarKind::Mem32) => u64::from(self.regs[reg] & !0xf),
            Some(BarKind::Mem64) => u64::from(self.regs[reg] & !0xf) | u64::from(self.regs[reg + 1]) << 32,
            None => 0,
        }
    }

    pub fn bar_size(&self, idx: usize) -> u64 {
        self.bars[idx].size
    }

    /// Appends a capability (`body` excludes the 2-byte id/next header);
    /// returns its config-space offset. `writable` masks the body's bytes.
    pub fn add_capability(&mut self, id: u8, body: &[u8], writable: &[u8]) -> usize {
        let off = self.next_cap_offset;
        let len = (2 + body.len() + 3) & !3;
        assert!(off + len <= NUM_REGS * 4, "capability space exhausted");
        let mut bytes = vec![0u8; len];
        bytes[0] = id;
        bytes[2..2 + body.len()].copy_from_slice(body);
        let mut mask = vec![0u8; len];
        mask[2..2 + writable.len().min(body.len())].copy_from_slice(&writable[..writable.len().min(body.len())]);
        for (i, chunk) in bytes.chunks(4).enumerate() {
            self.regs[off / 4 + i] = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
        for (i, chunk) in mask.chunks(4).enumerate() {
            self.wmask[off / 4 + i] = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
        match self.last_cap {
            Some(prev) => self.set_byte(prev + 1, off as u8),
            None => {
                self.regs[CAP_PTR_REG] = off as u32;
                self.regs[1] |= STATUS_CAP_LIST;
            }
        }
        self.last_cap = Some(off);
        self.next_cap_offset = off + len;
        off
    }

    fn set_byte(&mut self, off: usize, v: u8) {
        let shift = (off % 4) * 8;
        self.regs[off / 4] = (self.regs[off / 4] & !(0xff << shift)) | u32::from(v) << shift;
    }

    pub fn read_reg(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(0xffff_ffff)
    }

    /// Reads `len` (1, 2 or 4) bytes at byte offset `off`.
    pub fn read_bytes(&self, off: usize) -> u8 {
        (self.read_reg(off / 4) >> ((off % 4) * 8)) as u8
    }

    pub fn write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        if reg >= NUM_REGS || offset + data.len() > 4 {
            return;
        }
        for (i, b) in data.iter().enumerate() {
            let shift = (offset + i) * 8;
            let m = (self.wmask[reg] >> shift) & 0xff;
            let old = self.regs[reg];
            self.regs[reg] = (old & !(m << shift)) | ((u32::from(*b) & m) << shift);
        }
    }

    /// All 64 registers, for a snapshot.
    pub fn save(&self) -> Vec<u32> {
        self.regs.to_vec()
    }

    /// Loads saved registers: only guest-writable bits are taken from
    /// `regs` (identity, capabilities and BAR sizes stay this device's).
    pub fn restore(&mut self, regs: &[u32]) -> Result<(), String> {
        if regs.len() != NUM_REGS {
            return Err(format!("PCI config space has {} registers, expected {NUM_REGS}", regs.len()));
        }
        for (i, &v) in regs.iter().enumerate() {
            self.regs[i] = (self.regs[i] & !self.wmask[i]) | (v & self.wmask[i]);
        }
        Ok(())
    }

    pub fn command(&self) -> u16 {
        self.regs[1] as u16
    }

    /// Whether the function decodes its memory BARs (command bit 1).
    pub fn mem_enabled(&self) -> bool {
        self.command() & 0x2 != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_sizing_and_caps() {
        let mut c = PciConfig::new(0x1af4, 0x1048, 1, 0, 0, 0x1af4, 8);
        c.set_bar(0, BarKind::Mem64, 0xc000_0000, 0x4000);
        // Sizing: all ones reads back the size mask with the type bits.
        c.write(4, 0, &[0xff; 4]);
        c.write(5, 0, &[0xff; 4]);
        assert_eq!(c.read_reg(4), 0xffff_c004);
        assert_eq!(c.read_reg(5), 0xffff_ffff);
        c.write(4, 0, &0xd000_0000u32.to_le_bytes());
        c.write(5, 0, &[0; 4]);
        assert_eq!(c.bar_addr(0), 0xd000_0000);
        // Read-only identity.
        c.write(0, 0, &[0; 4]);
        assert_eq!(c.read_reg(0), 0x1048_1af4);
        let a = c.add_capability(0x09, &[16, 1, 2, 3], &[0, 0, 0xff, 0]);
        let b = c.add_capability(0x11, &[0, 0], &[0, 0x80]);
        assert_eq!(a, 0x40);
        assert_eq!(c.read_reg(13), 0x40);
        assert_eq!(c.read_bytes(a + 1) as usize, b);
        assert_ne!(c.read_reg(1) & STATUS_CAP_LIST, 0);
        c.write(b / 4, 3, &[0xff]);
        assert_eq!(c.read_bytes(b + 3), 0x80);
    }
}
