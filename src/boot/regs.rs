//! Initial register state: PVH (32-bit protected mode, paging off) and the
//! Linux 64-bit boot protocol (long mode, identity-mapped first 4 GiB).

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::error::{Error, Result};
use crate::layout::{GDT_START, PDE_START, PDPTE_START, PML4_START};

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// How the boot CPU enters the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// PVH: 32-bit protected mode, `%ebx` = hvm_start_info.
    Pvh,
    /// Linux 64-bit boot protocol: long mode, `%rsi` = zero page.
    Linux64,
}

fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    (u64::from(base) & 0xff00_0000) << 32
        | (u64::from(flags) & 0x0000_f0ff) << 40
        | (u64::from(limit) & 0x000f_0000) << 32
        | (u64::from(base) & 0x00ff_ffff) << 16
        | u64::from(limit) & 0x0000_ffff
}

fn segment(entry: u64, index: u16) -> kvm_segment {
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: {
            let l = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
            if (entry >> 55) & 1 == 1 {
                (l << 12) | 0xfff
            } else {
                l
            }
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
        padding: 0,
    }
}

fn write_u64s(mem: &GuestMemoryMmap, at: u64, vals: &[u64]) -> Result<()> {
    for (i, v) in vals.iter().enumerate() {
        let addr = at + 8 * i as u64;
        mem.write_obj(*v, GuestAddress(addr)).map_err(|source| Error::GuestMemoryAccess { addr, source })?;
    }
    Ok(())
}

/// Writes the boot GDT (and, for Linux64, page tables) and returns sregs.
pub fn setup_sregs(mem: &GuestMemoryMmap, mode: EntryMode, mut sregs: kvm_sregs) -> Result<kvm_sregs> {
    // Selectors follow the Linux boot protocol: __BOOT_CS = 0x10, __BOOT_DS = 0x18.
    let code = match mode {
        EntryMode::Pvh => gdt_entry(0xc09b, 0, 0xfffff),
        EntryMode::Linux64 => gdt_entry(0xa09b, 0, 0xfffff),
    };
    let data = gdt_entry(0xc093, 0, 0xfffff);
    let tss = gdt_entry(0x008b, 0, 0x67);
    let gdt = [0, 0, code, data, tss];
    write_u64s(mem, GDT_START, &gdt)?;

    let code_seg = segment(code, 2);
    let data_seg = segment(data, 3);
    let tss_seg = segment(tss, 4);
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = code_seg;
    sregs.ds = data_seg;
    sregs.es = data_seg;
    sregs.fs = data_seg;
    sregs.gs = data_seg;
    sregs.ss = data_seg;
    sregs.tr = tss_seg;

    match mode {
        EntryMode::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        EntryMode::Linux64 => {
            // PML4[0] -> PDPT; PDPT[0..4] -> 4 PDs of 2 MiB pages: first 4 GiB.
            write_u64s(mem, PML4_START, &[PDPTE_START | 0x03])?;
            let pdpt: Vec<u64> = (0..4).map(|i| (PDE_START + i * 0x1000) | 0x03).collect();
            write_u64s(mem, PDPTE_START, &pdpt)?;
            let pd: Vec<u64> = (0..2048u64).map(|i| (i << 21) | 0x83).collect();
            write_u64s(mem, PDE_START, &pd)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 = X86_CR4_PAE;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
    Ok(sregs)
}

/// General registers at entry.
pub fn boot_regs(mode: EntryMode, entry: u64, boot_info: u64) -> kvm_regs {
    let mut regs = kvm_regs { rflags: 0x2, rip: entry, ..Default::default() };
    match mode {
        EntryMode::Pvh => regs.rbx = boot_info,
        EntryMode::Linux64 => {
            regs.rsi = boot_info;
            regs.rsp = crate::layout::BOOT_STACK_POINTER;
            regs.rbp = crate::layout::BOOT_STACK_POINTER;
        }
    }
    regs
}

pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_roundtrip() {
        let code = gdt_entry(0xa09b, 0, 0xfffff);
        let s = segment(code, 2);
        assert_eq!((s.selector, s.l, s.db, s.present, s.type_), (0x10, 1, 0, 1, 0xb));
        assert_eq!(s.limit, 0xffff_ffff);
        let s32 = segment(gdt_entry(0xc09b, 0, 0xfffff), 2);
        assert_eq!((s32.l, s32.db), (0, 1));
    }

    #[test]
    fn linux64_page_tables() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let s = setup_sregs(&mem, EntryMode::Linux64, kvm_sregs::default()).unwrap();
        assert_eq!(s.cr3, PML4_START);
        let pde: u64 = mem.read_obj(GuestAddress(PDE_START + 8 * 2047)).unwrap();
        assert_eq!(pde, (2047 << 21) | 0x83);
        assert_eq!(s.efer & EFER_LMA, EFER_LMA);
    }
}
