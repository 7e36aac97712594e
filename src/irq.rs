//! GSI routing: the in-kernel irqchip's pins plus one MSI route per
//! virtio MSI-X vector, each bound to an irqfd. KVM_SET_GSI_ROUTING
//! replaces the whole table, so the table is rebuilt from this state.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use devices::{MsiMessage, MsiRouter};
use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

/// GSIs 0..24 are the IOAPIC's pins.
const FIRST_MSI_GSI: u32 = 24;
const MAX_GSI: u32 = 1023;

#[derive(Default)]
struct State {
    next: u32,
    msi: BTreeMap<u32, MsiMessage>,
}

pub struct KvmMsiRouter {
    vm: Arc<VmFd>,
    state: Mutex<State>,
}

impl KvmMsiRouter {
    pub fn new(vm: Arc<VmFd>) -> KvmMsiRouter {
        KvmMsiRouter { vm, state: Mutex::new(State { next: FIRST_MSI_GSI, ..Default::default() }) }
    }

    fn irqchip_entries() -> Vec<kvm_irq_routing_entry> {
        let mut v = Vec::new();
        let mut pin = |gsi: u32, chip: u32, p: u32| {
            let mut e = kvm_irq_routing_entry { gsi, type_: KVM_IRQ_ROUTING_IRQCHIP, ..Default::default() };
            e.u.irqchip.irqchip = chip;
            e.u.irqchip.pin = p;
            v.push(e);
        };
        for gsi in 0..24 {
            if gsi < 16 && gsi != 2 {
                pin(gsi, if gsi < 8 { KVM_IRQCHIP_PIC_MASTER } else { KVM_IRQCHIP_PIC_SLAVE }, gsi % 8);
            }
            pin(gsi, KVM_IRQCHIP_IOAPIC, gsi);
        }
        v
    }

    fn apply(&self, st: &State) -> devices::Result<()> {
        let mut entries = Self::irqchip_entries();
        for (&gsi, m) in &st.msi {
            let mut e = kvm_irq_routing_entry { gsi, type_: KVM_IRQ_ROUTING_MSI, ..Default::default() };
            e.u.msi.address_lo = m.addr as u32;
            e.u.msi.address_hi = (m.addr >> 32) as u32;
            e.u.msi.data = m.data;
            entries.push(e);
        }
        let table = KvmIrqRouting::from_entries(&entries).map_err(|e| devices::Error::Irq(format!("routing table: {e:?}")))?;
        self.vm.set_gsi_routing(&table).map_err(|e| devices::Error::Irq(format!("KVM_SET_GSI_ROUTING: {e}")))
    }
}

impl MsiRouter for KvmMsiRouter {
    fn allocate(&self) -> devices::Result<u32> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.next > MAX_GSI {
            return Err(devices::Error::Irq("no free GSI".into()));
        }
        st.next += 1;
        Ok(st.next - 1)
    }

    fn route(&self, gsi: u32, msg: Option<MsiMessage>, irqfd: &EventFd) -> devices::Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let was = st.msi.contains_key(&gsi);
        match msg {
            Some(m) => {
                st.msi.insert(gsi, m);
                self.apply(&st)?;
                if !was {
                    // KVM delivers a signal already pending in the eventfd.
                    self.vm.register_irqfd(irqfd, gsi).map_err(|e| devices::Error::Irq(format!("KVM_IRQFD gsi {gsi}: {e}")))?;
                }
            }
            None if was => {
                self.vm.unregister_irqfd(irqfd, gsi).map_err(|e| devices::Error::Irq(format!("KVM_IRQFD deassign gsi {gsi}: {e}")))?;
                st.msi.remove(&gsi);
                self.apply(&st)?;
            }
            None => {}
        }
        Ok(())
    }
}
