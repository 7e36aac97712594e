//! Intel MultiProcessor Specification 1.4 table: lets SMP guests find every
//! CPU without ACPI. Placed in the BIOS area at 0xF0000.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::error::{Error, Result};
use crate::layout::{IOAPIC_START, LAPIC_START, MPTABLE_START};

const APIC_VERSION: u8 = 0x14;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;
const ISA_IRQS: u8 = 16;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the floating pointer + config table for `cpus` CPUs (APIC ids 0..cpus).
pub fn build(cpus: u8) -> Vec<u8> {
    let ioapic_id = cpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let mut e = vec![0u8; 20];
        e[0] = 0; // processor
        e[1] = id;
        e[2] = APIC_VERSION;
        e[3] = 1 | if id == 0 { 2 } else { 0 }; // enabled, BSP
        e[4..8].copy_from_slice(&CPU_STEPPING.to_le_bytes());
        e[8..12].copy_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend(e);
        count += 1;
    }
    // Bus 0: ISA.
    entries.extend([1, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    count += 1;
    // IOAPIC.
    let mut io = vec![2, ioapic_id, APIC_VERSION, 1];
    io.extend((IOAPIC_START as u32).to_le_bytes());
    entries.extend(io);
    count += 1;
    // I/O interrupt assignments: ISA IRQ n -> IOAPIC pin n (IRQ0 -> pin 2).
    for irq in 0..ISA_IRQS {
        let pin = if irq == 0 { 2 } else { irq };
        entries.extend([3, 0 /* INT */, 0, 0, 0 /* bus */, irq, ioapic_id, pin]);
        count += 1;
    }
    // Local interrupt assignments: ExtINT on LINT0, NMI on LINT1.
    entries.extend([4, 3 /* ExtINT */, 0, 0, 0, 0, 0xff, 0]);
    entries.extend([4, 1 /* NMI */, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let mut cfg = vec![0u8; 44];
    cfg[0..4].copy_from_slice(b"PCMP");
    let len = (44 + entries.len()) as u16;
    cfg[4..6].copy_from_slice(&len.to_le_bytes());
    cfg[6] = 4; // spec rev 1.4
    cfg[8..16].copy_from_slice(b"RINGVM  ");
    cfg[16..28].copy_from_slice(b"000000000000");
    cfg[34..36].copy_from_slice(&count.to_le_bytes());
    cfg[36..40].copy_from_slice(&(LAPIC_START as u32).to_le_bytes());
    cfg.extend(entries);
    cfg[7] = checksum(&cfg);

    let mut fp = vec![0u8; 16];
    fp[0..4].copy_from_slice(b"_MP_");
    fp[4..8].copy_from_slice(&((MPTABLE_START + 16) as u32).to_le_bytes());
    fp[8] = 1; // length in 16-byte units
    fp[9] = 4;
    fp[10] = checksum(&fp);
    fp.extend(cfg);
    fp
}

pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<()> {
    let table = build(cpus);
    mem.write_slice(&table, GuestAddress(MPTABLE_START)).map_err(|source| Error::GuestMemoryAccess { addr: MPTABLE_START, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_cpu_count() {
        let t = build(4);
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(t[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let len = u16::from_le_bytes([t[20], t[21]]) as usize;
        assert_eq!(t[16..16 + len].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let cpus = t[16 + 44..].chunks(20).take(4).filter(|e| e[0] == 0 && e[3] & 1 == 1).count();
        assert_eq!(cpus, 4);
    }
}
