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
            log::warn!("serial write: {e:?}");
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
