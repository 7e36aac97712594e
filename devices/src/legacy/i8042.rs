//! An i8042 keyboard controller with no mouse: enough for an OS to probe it
//! cleanly (controller self-test, command byte read and write, interface
//! test, a keyboard that acknowledges its commands) and to pulse the CPU
//! reset line (command 0xFE on port 0x64, what Linux's `reboot=k` does).
//! Ports: data 0x60, status/command 0x64.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::bus::BusDevice;
use crate::{Interrupt, VmRequests};

/// Registered at port 0x60 with length 5 (0x60..=0x64).
pub struct I8042 {
    vm: Arc<dyn VmRequests>,
    /// IRQ 1: keyboard output while the command byte enables it.
    irq: Option<Interrupt>,
    /// The controller command byte (CTR).
    ctr: u8,
    /// The output port (bit 0: CPU not in reset, bit 1: A20).
    outp: u8,
    /// Bytes for the guest to read at port 0x60, and whether each came
    /// from the keyboard (one IRQ 1 per such byte, as it reaches the head:
    /// Linux reads one byte per interrupt).
    out: VecDeque<(u8, bool)>,
    /// A command waiting for its data byte at port 0x60.
    pending: Option<u8>,
    /// The last write went to the command port (status bit 3).
    last_was_cmd: bool,
}

const STATUS_OFFSET: u64 = 4;
const DATA_OFFSET: u64 = 0;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_WRITE_KBD_OUT: u8 = 0xd2;
const CMD_WRITE_AUX_LOOP: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_RESET_CPU: u8 = 0xfe;

const CTR_KBD_INT: u8 = 0x01;
const CTR_SYS: u8 = 0x04;
const CTR_KBD_DISABLE: u8 = 0x10;
const CTR_AUX_DISABLE: u8 = 0x20;
const CTR_XLATE: u8 = 0x40;

const STATUS_OBF: u8 = 0x01;
const STATUS_SYS: u8 = 0x04;
const STATUS_CMD: u8 = 0x08;
/// Keyboard not inhibited.
const STATUS_UNLOCKED: u8 = 0x10;

const KBD_ACK: u8 = 0xfa;
const KBD_RESET: u8 = 0xff;
const KBD_GET_ID: u8 = 0xf2;

/// Bound on unread bytes (a guest writing without reading).
const OUT_MAX: usize = 16;

impl I8042 {
    pub fn new(vm: Arc<dyn VmRequests>) -> Self {
        Self { vm, irq: None, ctr: CTR_KBD_INT | CTR_SYS | CTR_XLATE | CTR_AUX_DISABLE, outp: 0x03, out: VecDeque::new(), pending: None, last_was_cmd: false }
    }

    /// Wires the keyboard interrupt (IRQ 1).
    pub fn with_irq(mut self, irq: Interrupt) -> Self {
        self.irq = Some(irq);
        self
    }

    fn status(&self) -> u8 {
        let mut s = STATUS_UNLOCKED;
        if !self.out.is_empty() {
            s |= STATUS_OBF;
        }
        if self.ctr & CTR_SYS != 0 {
            s |= STATUS_SYS;
        }
        if self.last_was_cmd {
            s |= STATUS_CMD;
        }
        s
    }

    /// A controller reply (polled by the guest; no interrupt).
    fn reply(&mut self, b: u8) {
        self.push(b, false);
    }

    fn push(&mut self, b: u8, kbd: bool) {
        if self.out.len() < OUT_MAX {
            self.out.push_back((b, kbd));
            if self.out.len() == 1 {
                self.head_arrived();
            }
        }
    }

    /// Bytes from the keyboard.
    fn kbd_send(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.push(b, true);
        }
    }

    /// A byte reached the output buffer: IRQ 1 if it is the keyboard's and
    /// the command byte enables the interrupt.
    fn head_arrived(&self) {
        if let Some(&(_, true)) = self.out.front() {
            if self.ctr & CTR_KBD_INT != 0 {
                if let Some(irq) = &self.irq {
                    let _ = irq.trigger();
                }
            }
        }
    }

    fn pop(&mut self) -> u8 {
        let b = self.out.pop_front().map_or(0, |(b, _)| b);
        self.head_arrived();
        b
    }

    fn command(&mut self, cmd: u8) {
        self.pending = None;
        match cmd {
            CMD_READ_CTR => self.reply(self.ctr),
            CMD_WRITE_CTR | CMD_WRITE_OUTP | CMD_WRITE_KBD_OUT | CMD_WRITE_AUX_LOOP | CMD_WRITE_AUX => self.pending = Some(cmd),
            CMD_DISABLE_AUX => self.ctr |= CTR_AUX_DISABLE,
            CMD_ENABLE_AUX => self.ctr &= !CTR_AUX_DISABLE,
            CMD_SELF_TEST => self.reply(0x55),
            CMD_KBD_TEST => self.reply(0x00),
            CMD_DISABLE_KBD => self.ctr |= CTR_KBD_DISABLE,
            CMD_ENABLE_KBD => self.ctr &= !CTR_KBD_DISABLE,
            CMD_READ_OUTP => self.reply(self.outp),
            CMD_RESET_CPU => {
                log::info!("i8042: guest pulsed the reset line");
                self.vm.reset();
            }
            // No mouse: the AUX test (0xa9) gets no answer, which is how a
            // controller without an AUX port looks to Linux (it times out
            // and skips the port).
            _ => {}
        }
    }

    fn data(&mut self, b: u8) {
        match self.pending.take() {
            Some(CMD_WRITE_CTR) => self.ctr = b,
            Some(CMD_WRITE_OUTP) => {
                self.outp = b;
                if b & 0x01 == 0 {
                    log::info!("i8042: guest cleared the CPU reset bit of the output port");
                    self.vm.reset();
                }
            }
            Some(CMD_WRITE_KBD_OUT) => self.kbd_send(&[b]),
            // No AUX device: its bytes (and the loopback) go nowhere.
            Some(CMD_WRITE_AUX_LOOP | CMD_WRITE_AUX) => {}
            _ => match b {
                // A keyboard that acknowledges every command byte.
                KBD_RESET => self.kbd_send(&[KBD_ACK, 0xaa]),
                KBD_GET_ID => self.kbd_send(&[KBD_ACK, 0xab, 0x83]),
                _ => self.kbd_send(&[KBD_ACK]),
            },
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match offset {
            STATUS_OFFSET => self.status(),
            DATA_OFFSET => self.pop(),
            _ => 0,
        };
        data.fill(0);
        if let Some(d) = data.first_mut() {
            *d = v;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&b) = data.first() else { return };
        match offset {
            STATUS_OFFSET => {
                self.last_was_cmd = true;
                self.command(b);
            }
            DATA_OFFSET => {
                self.last_was_cmd = false;
                self.data(b);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[derive(Default)]
    struct Resets(AtomicU32);
    impl VmRequests for Resets {
        fn reset(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        fn exit(&self, _code: u8) {}
        fn shutdown(&self) {}
    }

    fn cmd(d: &mut I8042, c: u8) {
        d.write(STATUS_OFFSET, &[c]);
    }
    fn status(d: &mut I8042) -> u8 {
        let mut b = [0];
        d.read(STATUS_OFFSET, &mut b);
        b[0]
    }
    fn data(d: &mut I8042) -> Option<u8> {
        if status(d) & STATUS_OBF == 0 {
            return None;
        }
        let mut b = [0];
        d.read(DATA_OFFSET, &mut b);
        Some(b[0])
    }

    #[test]
    fn linux_probe_sequence() {
        let resets = Arc::new(Resets::default());
        let mut d = I8042::new(resets.clone());
        // i8042_controller_check: nothing to read at first.
        assert_eq!(data(&mut d), None);
        cmd(&mut d, CMD_SELF_TEST);
        assert_eq!(data(&mut d), Some(0x55));
        // CTR read, modify, write, read back.
        cmd(&mut d, CMD_READ_CTR);
        let ctr = data(&mut d).unwrap();
        assert_ne!(ctr & CTR_SYS, 0);
        cmd(&mut d, CMD_WRITE_CTR);
        d.write(DATA_OFFSET, &[ctr & !CTR_KBD_INT]);
        cmd(&mut d, CMD_READ_CTR);
        assert_eq!(data(&mut d), Some(ctr & !CTR_KBD_INT));
        cmd(&mut d, CMD_KBD_TEST);
        assert_eq!(data(&mut d), Some(0));
        // No mouse: AUX loopback gets no answer.
        cmd(&mut d, 0xd3);
        d.write(DATA_OFFSET, &[0x5a]);
        assert_eq!(data(&mut d), None);
        // The keyboard answers a reset and its ID.
        d.write(DATA_OFFSET, &[KBD_RESET]);
        assert_eq!((data(&mut d), data(&mut d)), (Some(KBD_ACK), Some(0xaa)));
        d.write(DATA_OFFSET, &[KBD_GET_ID]);
        assert_eq!((data(&mut d), data(&mut d), data(&mut d)), (Some(KBD_ACK), Some(0xab), Some(0x83)));
        assert_eq!(resets.0.load(Ordering::SeqCst), 0);
        cmd(&mut d, CMD_RESET_CPU);
        assert_eq!(resets.0.load(Ordering::SeqCst), 1);
        // Output is bounded whatever the guest writes.
        for _ in 0..1000 {
            d.write(DATA_OFFSET, &[0xf4]);
        }
        assert!(d.out.len() <= OUT_MAX);
    }

    /// One interrupt per keyboard byte, each once the one before was read.
    #[test]
    fn one_irq_per_keyboard_byte() {
        let irq = Interrupt::new().unwrap();
        let evt = irq.eventfd().try_clone().unwrap();
        let mut d = I8042::new(Arc::new(Resets::default())).with_irq(irq);
        let fired = |e: &vmm_sys_util::eventfd::EventFd| e.read().unwrap_or(0);
        d.write(DATA_OFFSET, &[KBD_GET_ID]);
        assert_eq!(fired(&evt), 1);
        for want in [KBD_ACK, 0xab, 0x83] {
            assert_eq!(data(&mut d), Some(want));
            let more = d.out.front().is_some();
            assert_eq!(fired(&evt), u64::from(more), "after reading {want:#x}");
        }
        // Controller replies are polled: no interrupt.
        cmd(&mut d, CMD_READ_CTR);
        assert_eq!(fired(&evt), 0);
        assert!(data(&mut d).is_some());
    }
}
