//! 16550A UART (vm-superio) as a bus device.

use std::io::{self, Write};

use crate::bus::BusDevice;
use crate::persist::{DeviceState, PersistError};
use crate::Interrupt;

/// The UART in a snapshot: its registers by their 16550 names and the
/// receive FIFO.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SerialSaved {
    dll: u8,
    dlh: u8,
    ier: u8,
    iir: u8,
    lcr: u8,
    lsr: u8,
    mcr: u8,
    msr: u8,
    scr: u8,
    fifo: Vec<u8>,
}

impl DeviceState for SerialSaved {
    const DEVICE: &'static str = "serial";
}

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
        SerialSaved {
            dll: s.baud_divisor_low,
            dlh: s.baud_divisor_high,
            ier: s.interrupt_enable,
            iir: s.interrupt_identification,
            lcr: s.line_control,
            lsr: s.line_status,
            mcr: s.modem_control,
            msr: s.modem_status,
            scr: s.scratch,
            fifo: s.in_buffer,
        }
        .to_value()
    }

    /// Loads what [`Serial::save`] produced (untrusted input); the output
    /// stays where it goes now.
    pub fn restore(&mut self, v: &serde_json::Value) -> Result<(), PersistError> {
        let s = SerialSaved::from_value(v)?;
        if s.fifo.len() > 64 {
            return Err(SerialSaved::invalid(format!("a receive FIFO of {} bytes (at most 64)", s.fifo.len())));
        }
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: s.dll,
            baud_divisor_high: s.dlh,
            interrupt_enable: s.ier,
            interrupt_identification: s.iir,
            line_control: s.lcr,
            line_status: s.lsr,
            modem_control: s.mcr,
            modem_status: s.msr,
            scratch: s.scr,
            in_buffer: s.fifo,
        };
        let irq = self.uart.interrupt_evt().try_clone().map_err(|e| SerialSaved::invalid(format!("its interrupt eventfd: {e}")))?;
        let mut uart = vm_superio::Serial::from_state(&state, irq, vm_superio::serial::NoEvents, OutWriter(SerialOutput::Sink))
            .map_err(|e| SerialSaved::invalid(format!("{e:?}")))?;
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
        bad = saved.clone();
        bad["lcr"] = serde_json::json!(300);
        assert!(matches!(b.restore(&bad), Err(PersistError::Parse { device: "serial", .. })));
        bad = saved;
        bad["thr"] = serde_json::json!(1);
        let e = b.restore(&bad).unwrap_err().to_string();
        assert!(e.starts_with("serial state: unknown field `thr`"), "{e}");
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
