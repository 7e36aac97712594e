//! ACPI tables (hardware-reduced, ACPI 6): RSDP, XSDT, FADT, MADT and a
//! DSDT that describes the PCI host bridge, the i8042, COM1, a power
//! button behind a Generic Event Device, and the S5 sleep type. Placed in
//! the BIOS area at 0xE0000 (where an OS scans for the RSDP) and named in
//! the PVH start info and the Linux zero page.
//!
//! Power-off and reset go through the FADT's sleep-control and reset
//! registers (ports 0x600 and 0x602, devices::legacy::AcpiPm); QMP
//! `system_powerdown` raises the GED interrupt, whose `_EVT` notifies the
//! power button (0x80), as a press would.

use acpi_tables::{aml, rsdp::Rsdp, sdt::Sdt, Aml};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::error::{Error, Result};
use crate::layout::{ACPI_START, BIOS_END, IOAPIC_START, LAPIC_START, MMIO32_START, PCI_MMIO_END};

const OEM_ID: [u8; 6] = *b"RINGVM";
const OEM_TABLE: [u8; 8] = *b"RINGVMAC";
const OEM_REVISION: u32 = 1;

/// The GSI of the Generic Event Device (an ISA-style edge interrupt).
pub const GED_GSI: u32 = 10;
/// Sleep control (write SLP_TYP << 2 | SLP_EN), sleep status, reset register.
pub const ACPI_PM_PORT: u16 = 0x600;
pub const SLEEP_CONTROL: u16 = ACPI_PM_PORT;
pub const SLEEP_STATUS: u16 = ACPI_PM_PORT + 1;
pub const RESET_REG: u16 = ACPI_PM_PORT + 2;
/// What the guest writes to the reset register.
pub const RESET_VALUE: u8 = 0x01;
/// SLP_TYP of S5 (soft off), as the DSDT's `_S5` says.
pub const S5_SLP_TYP: u8 = 5;

/// A generic address structure (ACPI 5.2.3.2) for a byte-wide I/O port.
fn gas_io8(port: u16) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // system I/O
    g[1] = 8; // bit width
    g[3] = 1; // byte access
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

fn dsdt() -> Sdt {
    use aml::{AddressSpace, Device, EISAName, Interrupt, Name, ResourceTemplate, IO};
    let mut t = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, OEM_REVISION);
    // PCI bus 0 through configuration mechanism #1: bus numbers, the
    // config ports, the I/O space around them, the 32-bit MMIO hole.
    let (bus, cfg) = (AddressSpace::new_bus_number(0x0u16, 0x0u16), IO::new(0xcf8, 0xcf8, 1, 8));
    let (io_lo, io_hi) = (AddressSpace::new_io(0x0u16, 0xcf7u16, None), AddressSpace::new_io(0xd00u16, 0xffffu16, None));
    let mmio = AddressSpace::new_memory(aml::AddressSpaceCacheable::NotCacheable, true, MMIO32_START as u32, (PCI_MMIO_END - 1) as u32, None);
    let pci_crs = ResourceTemplate::new(vec![&bus, &cfg, &io_lo, &io_hi, &mmio]);
    let (pnp0a03, pnp0303, pnp0501, pnp0c0c) = (EISAName::new("PNP0A03"), EISAName::new("PNP0303"), EISAName::new("PNP0501"), EISAName::new("PNP0C0C"));
    let pci_names = [
        Name::new("_HID".into(), &pnp0a03),
        Name::new("_ADR".into(), &aml::ZERO),
        Name::new("_SEG".into(), &aml::ZERO),
        Name::new("_UID".into(), &aml::ZERO),
        Name::new("_BBN".into(), &aml::ZERO),
        Name::new("_CRS".into(), &pci_crs),
    ];
    let pci = Device::new("_SB_.PCI0".into(), pci_names.iter().map(|n| n as &dyn Aml).collect());
    // The i8042 (Linux probes it only when ACPI lists it) and COM1.
    let (kbd_data, kbd_cmd, kbd_irq) = (IO::new(0x60, 0x60, 1, 1), IO::new(0x64, 0x64, 1, 1), Interrupt::new(true, true, false, false, 1));
    let kbd_crs = ResourceTemplate::new(vec![&kbd_data, &kbd_cmd, &kbd_irq]);
    let kbd_names = [Name::new("_HID".into(), &pnp0303), Name::new("_CRS".into(), &kbd_crs)];
    let kbd = Device::new("_SB_.KBD_".into(), kbd_names.iter().map(|n| n as &dyn Aml).collect());
    let (com1_io, com1_irq) = (IO::new(0x3f8, 0x3f8, 1, 8), Interrupt::new(true, true, false, false, 4));
    let com1_crs = ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_names = [Name::new("_HID".into(), &pnp0501), Name::new("_UID".into(), &aml::ONE), Name::new("_CRS".into(), &com1_crs)];
    let com1 = Device::new("_SB_.COM1".into(), com1_names.iter().map(|n| n as &dyn Aml).collect());
    // The power button, notified by the Generic Event Device's _EVT.
    let pwrb_names = [Name::new("_HID".into(), &pnp0c0c), Name::new("_UID".into(), &aml::ZERO)];
    let pwrb = Device::new("_SB_.PWRB".into(), pwrb_names.iter().map(|n| n as &dyn Aml).collect());
    let ged_irq = Interrupt::new(true, true, false, false, GED_GSI);
    let ged_crs = ResourceTemplate::new(vec![&ged_irq]);
    let pwrb_path: aml::Path = "\\_SB_.PWRB".into();
    let press = 0x80u8;
    let notify = aml::Notify::new(&pwrb_path, &press);
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&notify]);
    let ged_hid: &'static str = "ACPI0013";
    let ged_names = [Name::new("_HID".into(), &ged_hid), Name::new("_UID".into(), &aml::ZERO), Name::new("_CRS".into(), &ged_crs)];
    let mut ged_children: Vec<&dyn Aml> = ged_names.iter().map(|n| n as &dyn Aml).collect();
    ged_children.push(&evt);
    let ged = Device::new("_SB_.GED_".into(), ged_children);
    let zero = 0u8;
    let s5_pkg = aml::Package::new(vec![&S5_SLP_TYP, &zero, &zero, &zero]);
    let s5 = Name::new("_S5_".into(), &s5_pkg);
    for d in [&pci as &dyn Aml, &kbd, &com1, &pwrb, &ged, &s5] {
        d.to_aml_bytes(&mut t);
    }
    t.write_u32(4, t.len() as u32);
    t.update_checksum();
    t
}

fn fadt(dsdt: u64) -> Sdt {
    let mut t = Sdt::new(*b"FACP", 276, 6, OEM_ID, OEM_TABLE, OEM_REVISION);
    t.write_u8(45, 0); // preferred PM profile: unspecified
                       // IAPC_BOOT_ARCH: legacy devices, an 8042; no VGA, no MSI restrictions.
    t.write_u16(109, 0x0003);
    let flags: u32 = (1 << 20) /* HW_REDUCED_ACPI */ | (1 << 10) /* RESET_REG_SUP */ | (1 << 5) /* SLP_BUTTON: none */;
    t.write_u32(112, flags);
    t.write_bytes(116, &gas_io8(RESET_REG));
    t.write_u8(128, RESET_VALUE);
    t.write_u8(131, 0); // FADT minor version
    t.write_u64(140, dsdt); // X_DSDT
    t.write_bytes(244, &gas_io8(SLEEP_CONTROL));
    t.write_bytes(256, &gas_io8(SLEEP_STATUS));
    t.write_bytes(268, b"RINGVM\0\0"); // hypervisor vendor identity
    t.update_checksum();
    t
}

fn madt(cpus: u8) -> Sdt {
    let mut t = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE, OEM_REVISION);
    t.write_u32(36, LAPIC_START as u32);
    t.write_u32(40, 1); // PCAT_COMPAT: the 8259s exist (masked once the IOAPIC is up)
    for id in 0..cpus {
        t.append_slice(&[0, 8, id, id, 1, 0, 0, 0]); // processor local APIC, enabled
    }
    let ioapic_id = cpus; // as in the MP table
    let mut io = vec![1, 12, ioapic_id, 0];
    io.extend((IOAPIC_START as u32).to_le_bytes());
    io.extend(0u32.to_le_bytes()); // GSI base
    t.append_slice(&io);
    // ISA IRQ 0 (the PIT) is IOAPIC pin 2; the rest are identity mapped.
    let mut iso = vec![2, 10, 0, 0];
    iso.extend(2u32.to_le_bytes());
    iso.extend(0u16.to_le_bytes()); // conforms to the bus (edge, high)
    t.append_slice(&iso);
    // LINT1 of every processor is the NMI.
    t.append_slice(&[4, 6, 0xff, 0x05, 0x00, 1]);
    t.update_checksum();
    t
}

/// The tables for `cpus` CPUs, laid out from `base`: (bytes, RSDP address).
pub fn build(cpus: u8, base: u64) -> (Vec<u8>, u64) {
    let mut out = Vec::new();
    let place = |out: &mut Vec<u8>, bytes: &[u8]| -> u64 {
        while !out.len().is_multiple_of(16) {
            out.push(0);
        }
        let at = base + out.len() as u64;
        out.extend_from_slice(bytes);
        at
    };
    // The RSDP first, so that it sits on the 16-byte boundary scanners expect.
    out.resize(Rsdp::len(), 0);
    let dsdt_at = place(&mut out, dsdt().as_slice());
    let fadt_at = place(&mut out, fadt(dsdt_at).as_slice());
    let madt_at = place(&mut out, madt(cpus).as_slice());
    let mut xsdt = Sdt::new(*b"XSDT", 36, 1, OEM_ID, OEM_TABLE, OEM_REVISION);
    xsdt.append(fadt_at);
    xsdt.append(madt_at);
    xsdt.update_checksum();
    let xsdt_at = place(&mut out, xsdt.as_slice());
    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt_at).to_aml_bytes(&mut rsdp);
    out[..rsdp.len()].copy_from_slice(&rsdp);
    (out, base)
}

/// Writes the tables into guest memory at [`ACPI_START`]; returns the RSDP's address.
pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<u64> {
    let (bytes, rsdp) = build(cpus, ACPI_START);
    assert!(ACPI_START + bytes.len() as u64 <= BIOS_END - 0x10000, "ACPI tables overlap the MP table");
    mem.write_slice(&bytes, GuestAddress(ACPI_START)).map_err(|source| Error::GuestMemoryAccess { addr: ACPI_START, source })?;
    Ok(rsdp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn table(all: &[u8], base: u64, at: u64) -> &[u8] {
        let off = (at - base) as usize;
        let len = u32::from_le_bytes(all[off + 4..off + 8].try_into().unwrap()) as usize;
        &all[off..off + len]
    }

    /// Every table is reachable from the RSDP and checksums to zero; the
    /// MADT lists each CPU and the IOAPIC; the FADT is hardware-reduced and
    /// points at the DSDT, which names the devices.
    #[test]
    fn tables_are_linked_and_checksummed() {
        let base = 0xe0000;
        let (all, rsdp) = build(3, base);
        let r = &all[(rsdp - base) as usize..][..36];
        assert_eq!(&r[..8], b"RSD PTR ");
        assert_eq!(sum(&r[..20]), 0);
        assert_eq!(sum(r), 0);
        let xsdt = table(&all, base, u64::from_le_bytes(r[24..32].try_into().unwrap()));
        assert_eq!(&xsdt[..4], b"XSDT");
        assert_eq!(sum(xsdt), 0);
        let entries: Vec<u64> = xsdt[36..].chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(entries.len(), 2);
        let fadt = table(&all, base, entries[0]);
        assert_eq!((&fadt[..4], fadt.len(), sum(fadt)), (&b"FACP"[..], 276, 0));
        assert_ne!(u32::from_le_bytes(fadt[112..116].try_into().unwrap()) & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_eq!(u64::from_le_bytes(fadt[244 + 4..256].try_into().unwrap()), u64::from(SLEEP_CONTROL));
        let dsdt = table(&all, base, u64::from_le_bytes(fadt[140..148].try_into().unwrap()));
        assert_eq!((&dsdt[..4], sum(dsdt)), (&b"DSDT"[..], 0));
        let has = |n: &[u8]| dsdt.windows(n.len()).any(|w| w == n);
        for name in [&b"PCI0"[..], b"PWRB", b"GED_", b"KBD_", b"COM1", b"_S5_", b"_EVT", b"ACPI0013"] {
            assert!(has(name), "DSDT lacks {}", String::from_utf8_lossy(name));
        }
        let madt = table(&all, base, entries[1]);
        assert_eq!((&madt[..4], sum(madt)), (&b"APIC"[..], 0));
        let mut lapics = 0;
        let mut ioapics = 0;
        let mut o = 44;
        while o + 2 <= madt.len() {
            match madt[o] {
                0 => {
                    assert_eq!(madt[o + 3], lapics, "APIC ids in order");
                    lapics += 1;
                }
                1 => ioapics += 1,
                _ => {}
            }
            o += madt[o + 1] as usize;
        }
        assert_eq!((lapics, ioapics), (3, 1));
        assert!(all.len() < 0x10000);
    }
}
