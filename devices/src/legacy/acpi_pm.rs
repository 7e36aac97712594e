//! The hardware-reduced ACPI power-management registers named in the FADT
//! (ACPI 6, 4.8.3.7 and 4.8.3.6): sleep control (`SLP_TYP << 2 | SLP_EN`),
//! sleep status, and the reset register. Ports: base (control), base + 1
//! (status), base + 2 (reset).

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::VmRequests;

/// Registered at the FADT's port with length 3.
pub struct AcpiPm {
    vm: Arc<dyn VmRequests>,
    s5_slp_typ: u8,
    reset_value: u8,
}

const SLP_EN: u8 = 0x20;
const WAK_STS: u8 = 0x80;

impl AcpiPm {
    /// `s5_slp_typ`: the DSDT's `_S5` value; `reset_value`: the FADT's.
    pub fn new(vm: Arc<dyn VmRequests>, s5_slp_typ: u8, reset_value: u8) -> Self {
        Self { vm, s5_slp_typ, reset_value }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 1 {
            // Sleep status: awake (nothing but S5 is entered, and that ends the VM).
            if let Some(d) = data.first_mut() {
                *d = WAK_STS;
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            0 if v & SLP_EN != 0 && (v >> 2) & 0x7 == self.s5_slp_typ => {
                log::info!("acpi: the guest entered S5 (soft off)");
                self.vm.shutdown();
            }
            2 if v == self.reset_value => {
                log::info!("acpi: the guest wrote the reset register");
                self.vm.reset();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Log(Mutex<Vec<&'static str>>);
    impl VmRequests for Log {
        fn reset(&self) {
            self.0.lock().unwrap().push("reset");
        }
        fn exit(&self, _: u8) {
            self.0.lock().unwrap().push("exit");
        }
        fn shutdown(&self) {
            self.0.lock().unwrap().push("shutdown");
        }
    }

    #[test]
    fn s5_and_reset() {
        let log = Arc::new(Log::default());
        let mut pm = AcpiPm::new(log.clone(), 5, 1);
        pm.write(0, &[5 << 2]); // SLP_TYP without SLP_EN
        pm.write(0, &[(1 << 2) | SLP_EN]); // S1: not offered
        pm.write(2, &[0x0e]); // not the reset value
        assert!(log.0.lock().unwrap().is_empty());
        pm.write(0, &[(5 << 2) | SLP_EN]);
        pm.write(2, &[1]);
        assert_eq!(*log.0.lock().unwrap(), vec!["shutdown", "reset"]);
        let mut b = [0u8];
        pm.read(1, &mut b);
        assert_eq!(b[0], WAK_STS);
    }
}
