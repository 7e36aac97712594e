//! The KVM virtual machine: VM fd, guest memory, in-kernel irqchip and PIT,
//! port-I/O and MMIO buses, and the legacy devices on them.

use std::sync::{Arc, Mutex};

use devices::bus::Bus;
use devices::legacy::{AcpiPm, DebugExit, Serial, SerialOutput, I8042};
use devices::pci::PciConfigIo;
use devices::{Interrupt, VmRequests};
use kvm_bindings::{
    kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region, CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::boot::acpi;
use crate::dirty_ring::{self, DirtyRings};
use crate::error::{self, Error, Result};
use crate::layout;

pub const SERIAL_PORT: u64 = 0x3f8;
pub const SERIAL_IRQ: u32 = 4;
pub const KBD_IRQ: u32 = 1;
pub const I8042_PORT: u64 = 0x60;
pub const DEBUG_EXIT_PORT: u64 = 0x501;
pub const PCI_CONFIG_PORT: u64 = 0xcf8;
const TSS_ADDRESS: usize = 0xfffb_d000;

/// Saved initial interrupt-controller state, put back on reset.
struct ResetState {
    irqchips: Vec<kvm_irqchip>,
    pit: kvm_pit_state2,
}

pub struct Machine {
    pub kvm: Kvm,
    pub vm: Arc<VmFd>,
    pub mem: GuestMemoryMmap,
    pub mem_size: u64,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub serial: Arc<Mutex<Serial>>,
    pub pci: Arc<Mutex<PciConfigIo>>,
    /// The ACPI Generic Event Device's interrupt: a power-button press.
    pub power_button: Interrupt,
    pub supported_cpuid: CpuId,
    /// The vCPUs' dirty rings, when dirty logging uses them instead of
    /// the bitmap (`--dirty-ring`).
    pub dirty_rings: Option<Arc<DirtyRings>>,
    reset_state: ResetState,
}

fn check_caps(kvm: &Kvm) -> Result<()> {
    let api = kvm.get_api_version();
    if api != kvm_bindings::KVM_API_VERSION as i32 {
        return Err(Error::KvmApiVersion(api));
    }
    for (cap, name) in [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::Pit2, "KVM_CAP_PIT2"),
        (Cap::Irqfd, "KVM_CAP_IRQFD"),
        (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
        (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(Error::KvmCap(name));
        }
    }
    Ok(())
}

impl Machine {
    /// Creates the VM with `mem_size` bytes of RAM and the legacy devices;
    /// `dirty_ring`: entries per vCPU dirty ring (`None` or 0: KVM's dirty
    /// bitmap, as QEMU's default dirty-ring-size 0).
    pub fn new(mem_size: u64, thp: bool, dirty_ring: Option<u32>, cpus: u8, serial_out: SerialOutput, requests: Arc<dyn VmRequests>) -> Result<Self> {
        let kvm = Kvm::new().map_err(Error::KvmOpen)?;
        check_caps(&kvm)?;
        let vm = kvm.create_vm().map_err(error::kvm("KVM_CREATE_VM"))?;
        let ring_entries = match dirty_ring {
            Some(n) if n > 0 => {
                dirty_ring::enable(&kvm, &vm, n).map_err(|e| Error::Config(e.to_string()))?;
                n
            }
            _ => 0,
        };
        let supported_cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(error::kvm("KVM_GET_SUPPORTED_CPUID"))?;

        let ranges: Vec<(GuestAddress, usize)> = layout::ram_regions(mem_size).into_iter().map(|(s, l)| (GuestAddress(s), l as usize)).collect();
        let mem = GuestMemoryMmap::<()>::from_ranges(&ranges).map_err(|source| Error::GuestMemory { size: mem_size, source })?;
        for (slot, region) in mem.iter().enumerate() {
            let host = mem.get_host_address(region.start_addr()).map_err(|source| Error::GuestMemoryAccess { addr: region.start_addr().0, source })?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // Transparent huge pages unless --no-thp: a 1 MiB O_DIRECT
            // transfer into guest RAM is then one physical segment instead
            // of 256, which doubles large reads on a virtio host disk; but
            // each snapshot's dirty logging makes KVM split them again.
            // Advice only: failure changes nothing.
            // SAFETY: advice on a mapping `mem` owns; it does not change contents.
            if thp && unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_HUGEPAGE) } != 0 {
                log::debug!("madvise(MADV_HUGEPAGE) on guest RAM: {}", std::io::Error::last_os_error());
            }
            // SAFETY: the mapping backs `region` and lives as long as `mem`,
            // which the Machine owns for the VM's whole lifetime.
            unsafe { vm.set_user_memory_region(r) }.map_err(error::kvm("KVM_SET_USER_MEMORY_REGION"))?;
        }

        vm.set_tss_address(TSS_ADDRESS).map_err(error::kvm("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip().map_err(error::kvm("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        vm.create_pit2(pit).map_err(error::kvm("KVM_CREATE_PIT2"))?;
        let reset_state = ResetState {
            irqchips: [KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC]
                .into_iter()
                .map(|id| {
                    let mut chip = kvm_irqchip { chip_id: id, ..Default::default() };
                    vm.get_irqchip(&mut chip).map(|_| chip)
                })
                .collect::<std::result::Result<_, _>>()
                .map_err(error::kvm("KVM_GET_IRQCHIP"))?,
            pit: vm.get_pit2().map_err(error::kvm("KVM_GET_PIT2"))?,
        };

        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let serial_irq = Interrupt::new()?;
        vm.register_irqfd(serial_irq.eventfd(), SERIAL_IRQ).map_err(error::kvm("KVM_IRQFD"))?;
        let serial = Arc::new(Mutex::new(Serial::new(serial_irq, serial_out)));
        pio.insert(serial.clone(), SERIAL_PORT, 8)?;
        let kbd_irq = Interrupt::new()?;
        vm.register_irqfd(kbd_irq.eventfd(), KBD_IRQ).map_err(error::kvm("KVM_IRQFD"))?;
        pio.insert(Arc::new(Mutex::new(I8042::new(requests.clone()).with_irq(kbd_irq))), I8042_PORT, 5)?;
        pio.insert(Arc::new(Mutex::new(AcpiPm::new(requests.clone(), acpi::S5_SLP_TYP, acpi::RESET_VALUE))), u64::from(acpi::ACPI_PM_PORT), 3)?;
        pio.insert(Arc::new(Mutex::new(DebugExit::new(requests))), DEBUG_EXIT_PORT, 1)?;
        let power_button = Interrupt::new()?;
        vm.register_irqfd(power_button.eventfd(), acpi::GED_GSI).map_err(error::kvm("KVM_IRQFD"))?;
        let pci = Arc::new(Mutex::new(PciConfigIo::new()));
        pio.insert(pci.clone(), PCI_CONFIG_PORT, 8)?;

        let vm = Arc::new(vm);
        let dirty_rings = (ring_entries > 0).then(|| {
            let slots: Vec<u64> = mem.iter().map(|r| r.len()).collect();
            Arc::new(DirtyRings::new(vm.clone(), ring_entries, usize::from(cpus), &slots))
        });
        Ok(Self { kvm, vm, mem, mem_size, pio, mmio, serial, pci, power_button, supported_cpuid, dirty_rings, reset_state })
    }

    /// Puts the PIC, IOAPIC and PIT back in their power-on state.
    pub fn reset_irqchips(&self) -> Result<()> {
        for chip in &self.reset_state.irqchips {
            self.vm.set_irqchip(chip).map_err(error::kvm("KVM_SET_IRQCHIP"))?;
        }
        self.vm.set_pit2(&self.reset_state.pit).map_err(error::kvm("KVM_SET_PIT2"))
    }

    /// (memslot, gpa, size) of each RAM region.
    pub fn slots(&self) -> Vec<(u32, u64, u64)> {
        self.mem.iter().enumerate().map(|(i, r)| (i as u32, r.start_addr().0, r.len())).collect()
    }

    /// Where a snapshot reads the pages the vCPUs dirtied: the dirty
    /// rings if the VM has them, else KVM's bitmap.
    pub fn dirty_log(&self) -> Arc<dyn crate::snapshot::save::DirtyLog + Send + Sync> {
        match &self.dirty_rings {
            Some(r) => r.clone(),
            None => self.vm.clone(),
        }
    }

    /// Turns KVM dirty-page logging on or off for every RAM slot.
    pub fn set_dirty_log(&self, on: bool) -> Result<()> {
        if let (true, Some(r)) = (on, &self.dirty_rings) {
            // What the rings held from an earlier logging period is stale.
            r.discard();
        }
        for (slot, region) in self.mem.iter().enumerate() {
            let host = self.mem.get_host_address(region.start_addr()).map_err(|source| Error::GuestMemoryAccess { addr: region.start_addr().0, source })?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: if on { kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the same mapping as at creation; only the flags change.
            unsafe { self.vm.set_user_memory_region(r) }.map_err(error::kvm("KVM_SET_USER_MEMORY_REGION (dirty log)"))?;
        }
        Ok(())
    }

    /// Interrupt controllers, PIT and clock, for a state file.
    pub fn save_state(&self) -> Result<crate::snapshot::MachineState> {
        let irqchips = [KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC]
            .into_iter()
            .map(|id| {
                let mut chip = kvm_irqchip { chip_id: id, ..Default::default() };
                self.vm.get_irqchip(&mut chip).map(|_| chip)
            })
            .collect::<std::result::Result<_, _>>()
            .map_err(error::kvm("KVM_GET_IRQCHIP"))?;
        Ok(crate::snapshot::MachineState {
            irqchips,
            pit: self.vm.get_pit2().map_err(error::kvm("KVM_GET_PIT2"))?,
            clock: self.vm.get_clock().map_err(error::kvm("KVM_GET_CLOCK"))?,
        })
    }

    /// Loads interrupt controllers, PIT and clock from a state file.
    pub fn restore_state(&self, st: &crate::snapshot::MachineState) -> Result<()> {
        if st.irqchips.len() != 3 {
            return Err(Error::Config(format!("state has {} interrupt controllers, expected 3", st.irqchips.len())));
        }
        for (chip, want) in st.irqchips.iter().zip([KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC]) {
            if chip.chip_id != want {
                return Err(Error::Config(format!("state has interrupt controller {} where {want} belongs", chip.chip_id)));
            }
            self.vm.set_irqchip(chip).map_err(error::kvm("KVM_SET_IRQCHIP"))?;
        }
        self.vm.set_pit2(&st.pit).map_err(error::kvm("KVM_SET_PIT2"))?;
        let mut clock = st.clock;
        clock.flags = 0;
        self.vm.set_clock(&clock).map_err(error::kvm("KVM_SET_CLOCK"))
    }

    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }
}
