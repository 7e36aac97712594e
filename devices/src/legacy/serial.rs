//! 16550A UART (vm-superio) as a bus device.

use std::io::{self, Write};

use crate::bus::BusDevice;
use crate::Interrupt;

/// Where the guest's serial output goes.
pub enum SerialOutput {
    Stdout,
    Writer(Box<dyn Write + Send>),
    Sink,
}

struct OutWriter(SerialOutput);

impl Write for OutWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.0 {
            SerialOutput::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(buf)?;
                if buf.contains(&b'\n') {
                    out.flush()?;
                }
                Ok(buf.len())
            }
            SerialOutput::Writer(w) => w.write(buf),
            SerialOutput::Sink => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.0 {
            SerialOutput::Stdout => io::stdout().flush(),
            SerialOutput::Writer(w) => w.flush(),
            SerialOutput::Sink => Ok(()),
        }
    }
}

pub struct Serial {
    uart: vm_superio::Serial<Interrupt, vm_superio::serial::NoEvents, OutWriter>,
}

impl Serial {
    pub fn new(irq: Interrupt, out: SerialOutput) -> Self {
        Self { uart: vm_superio::Serial::new(irq, OutWriter(out)) }
    }

    /// Queues bytes for the guest to read; returns how many fit.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().flush();
    }

    /// Snapshot of the UART registers (for save/restore).
    pub fn state(&self) -> vm_superio::serial::SerialState {
        self.uart.state()
    }

    /// The UART's registers and receive FIFO, for a snapshot (version 1).
    pub fn save(&self) -> serde_json::Value {
        let s = self.uart.state();
        serde_json::json!({
            "dll": s.baud_divisor_low, "dlh": s.baud_divisor_high, "ier": s.interrupt_enable,
            "iir": s.interrupt_identification, "lcr": s.line_control, "lsr": s.line_status,
            "mcr": s.modem_control, "msr": s.modem_status, "scr": s.scratch, "fifo": s.in_buffer,
        })
    }

    /// Loads what [`Serial::save`] produced (untrusted input); the output
    /// stays where it goes now.
    pub fn restore(&mut self, v: &serde_json::Value) -> Result<(), String> {
        let reg = |k: &str| -> Result<u8, String> {
            v.get(k).and_then(serde_json::Value::as_u64).and_then(|x| u8::try_from(x).ok()).ok_or_else(|| format!("serial state: '{k}' missing or not a byte"))
        };
        let fifo: Vec<u8> = match v.get("fifo").and_then(serde_json::Value::as_array) {
            Some(a) if a.len() <= 64 => {
                a.iter().map(|x| x.as_u64().and_then(|b| u8::try_from(b).ok())).collect::<Option<_>>().ok_or("serial state: bad FIFO byte")?
            }
            _ => return Err("serial state: 'fifo' missing or longer than 64 bytes".into()),
        };
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: reg("dll")?,
            baud_divisor_high: reg("dlh")?,
            interrupt_enable: reg("ier")?,
            interrupt_identification: reg("iir")?,
            line_control: reg("lcr")?,
            line_status: reg("lsr")?,
            modem_control: reg("mcr")?,
            modem_status: reg("msr")?,
            scratch: reg("scr")?,
            in_buffer: fifo,
        };
        let irq = self.uart.interrupt_evt().try_clone().map_err(|e| format!("serial: {e}"))?;
        let mut uart = vm_superio::Serial::from_state(&state, irq, vm_superio::serial::NoEvents, OutWriter(SerialOutput::Sink))
            .map_err(|e| format!("serial state: {e:?}"))?;
        std::mem::swap(uart.writer_mut(), self.uart.writer_mut());
        self.uart = uart;
        Ok(())
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 || offset > 7 {
            data.fill(0xff);
            return;
        }
        data[0] = self.uart.read(offset as u8);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 || offset > 7 {
            return;
        }
        if let Err(e) = self.uart.write(offset as u8, data[0]) {
            crate::warn_limited!("serial write: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn save_and_restore_registers_and_fifo() {
        let mut a = Serial::new(Interrupt::new().unwrap(), SerialOutput::Sink);
        a.write(7, &[0x5a]); // scratch
        a.write(1, &[0x01]); // IER
        assert_eq!(a.enqueue_input(b"ab"), 2);
        let saved = a.save();
        let out = Shared::default();
        let mut b = Serial::new(Interrupt::new().unwrap(), SerialOutput::Writer(Box::new(out.clone())));
        b.restore(&saved).unwrap();
        let mut r = [0u8];
        b.read(7, &mut r);
        assert_eq!(r[0], 0x5a);
        b.read(1, &mut r);
        assert_eq!(r[0], 0x01);
        b.read(0, &mut r);
        assert_eq!(r[0], b'a');
        b.write(0, b"z");
        assert_eq!(&*out.0.lock().unwrap(), b"z", "output stays with the restoring VM");
        let mut bad = saved.clone();
        bad["fifo"] = serde_json::json!(vec![0; 65]);
        assert!(b.restore(&bad).is_err());
        bad = saved;
        bad["lcr"] = serde_json::json!(300);
        assert!(b.restore(&bad).is_err());
    }

    #[test]
    fn output_input_and_interrupt() {
        let irq = Interrupt::new().unwrap();
        let evt = irq.try_clone().unwrap();
        let out = Shared::default();
        let mut s = Serial::new(irq, SerialOutput::Writer(Box::new(out.clone())));
        for b in b"hi" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi");
        // LSR: transmitter empty, no data ready.
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_eq!(lsr[0] & 0x61, 0x60);
        // Enable the received-data interrupt, queue input, read it back.
        s.write(1, &[0x01]);
        assert_eq!(s.enqueue_input(b"x"), 1);
        assert_eq!(evt.eventfd().read().unwrap(), 1);
        s.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1);
        let mut rbr = [0u8];
        s.read(0, &mut rbr);
        assert_eq!(rbr[0], b'x');
        // Out-of-range offsets and wide accesses are ignored.
        let mut wide = [0u8; 2];
        s.read(0, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
    }
}
