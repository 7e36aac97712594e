//! isa-debug-exit (QEMU's convention, port 0x501): the guest writes a code
//! and the VMM exits. ringvm exits with the code itself; QEMU exits with
//! `(code << 1) | 1`.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::VmRequests;

pub struct DebugExit {
    vm: Arc<dyn VmRequests>,
}

impl DebugExit {
    pub fn new(vm: Arc<dyn VmRequests>) -> Self {
        Self { vm }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 {
            if let Some(code) = data.first() {
                self.vm.exit(*code);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::legacy::I8042;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);
    impl VmRequests for Recorder {
        fn reset(&self) {
            self.0.lock().unwrap().push("reset".into());
        }
        fn exit(&self, code: u8) {
            self.0.lock().unwrap().push(format!("exit {code}"));
        }
        fn shutdown(&self) {
            self.0.lock().unwrap().push("shutdown".into());
        }
    }

    #[test]
    fn exit_and_reset_requests() {
        let rec = Arc::new(Recorder::default());
        let mut d = DebugExit::new(rec.clone());
        d.write(0, &[3, 0, 0, 0]);
        d.write(1, &[9]);
        let mut k = I8042::new(rec.clone());
        k.write(4, &[0xd1]);
        k.write(4, &[0xfe]);
        k.write(0, &[0xfe]);
        assert_eq!(*rec.0.lock().unwrap(), vec!["exit 3".to_string(), "reset".to_string()]);
    }
}
