//! Guest physical memory layout (x86_64).
//!
//! ```text
//! 0x0000_0500  GDT (boot)            0x0000_6000  PVH hvm_start_info + memmap
//! 0x0000_7000  Linux zero page       0x0000_9000  boot page tables (PML4, PDPT, 4 PDs)
//! 0x0002_0000  kernel command line   0x0009_fc00  EBDA (reserved)
//! 0x000e_0000  ACPI tables (RSDP)    0x000f_0000  MP table (BIOS area)
//! 0x0010_0000  kernel / PVH ELF
//! RAM up to 3 GiB, then the 32-bit MMIO hole (PCI BARs, IOAPIC, LAPIC), RAM again from 4 GiB.
//! ```

pub const GDT_START: u64 = 0x500;
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MODLIST_START: u64 = 0x6040;
pub const PVH_MEMMAP_START: u64 = 0x6080;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000; // four pages: identity map of the first 4 GiB
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables (RSDP first), in the BIOS area an OS scans for the RSDP.
pub const ACPI_START: u64 = 0xe0000;
pub const MPTABLE_START: u64 = 0xf0000;
pub const BIOS_END: u64 = 0x10_0000;
pub const HIMEM_START: u64 = 0x10_0000;

/// End of low RAM / start of the 32-bit MMIO hole.
pub const MMIO32_START: u64 = 0xc000_0000;
/// PCI BARs are allocated from here up to the IOAPIC.
pub const PCI_MMIO_START: u64 = MMIO32_START;
pub const PCI_MMIO_END: u64 = 0xfec0_0000;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const LAPIC_START: u64 = 0xfee0_0000;
pub const HIGH_RAM_START: u64 = 1 << 32;

/// RAM regions for a guest of `size` bytes: (start, len).
pub fn ram_regions(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO32_START {
        vec![(0, size)]
    } else {
        vec![(0, MMIO32_START), (HIGH_RAM_START, size - MMIO32_START)]
    }
}

/// E820 type for usable RAM and reserved areas.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// The e820 map shown to the guest: (start, len, type).
pub fn e820_map(size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![(0, EBDA_START, E820_RAM), (EBDA_START, 0xa0000 - EBDA_START, E820_RESERVED)];
    map.push((ACPI_START, BIOS_END - ACPI_START, E820_RESERVED));
    for (start, len) in ram_regions(size) {
        if start == 0 {
            map.push((HIMEM_START, len - HIMEM_START, E820_RAM));
        } else {
            map.push((start, len, E820_RAM));
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_split_around_hole() {
        assert_eq!(ram_regions(1 << 30), vec![(0, 1 << 30)]);
        let r = ram_regions(4 << 30);
        assert_eq!(r, vec![(0, MMIO32_START), (HIGH_RAM_START, (4 << 30) - MMIO32_START)]);
        let total: u64 = e820_map(4 << 30).iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        assert_eq!(total, (4 << 30) - (HIMEM_START - EBDA_START));
    }
}
