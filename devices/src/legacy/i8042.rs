//! A minimal i8042 keyboard controller: enough for the guest to pulse the
//! CPU reset line (command 0xFE on port 0x64, what Linux's `reboot=k` does).

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::VmRequests;

/// Registered at port 0x60 with length 5 (0x60..=0x64).
pub struct I8042 {
    vm: Arc<dyn VmRequests>,
}

const CMD_RESET_CPU: u8 = 0xfe;
const STATUS_OFFSET: u64 = 4;

impl I8042 {
    pub fn new(vm: Arc<dyn VmRequests>) -> Self {
        Self { vm }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // No keyboard: output buffer empty, input buffer empty, self-test ok.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == STATUS_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            log::info!("i8042: guest pulsed the reset line");
            self.vm.reset();
        }
    }
}
