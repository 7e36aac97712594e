//! The virtio-pci transport's register interface as a guest drives it: any
//! sequence of BAR0 reads and writes (common config, device config, notify,
//! MSI-X table and PBA, out-of-range offsets, odd sizes) and PCI config-space
//! writes, with queue addresses anywhere. Device activation runs the real
//! virtio-scsi device on a real iothread. It must never panic the host;
//! the device either works or says NEEDS_RESET.
#![no_main]

use std::cell::RefCell;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use ring::IoThread;
use ringvm_devices::bus::BusDevice;
use ringvm_devices::pci::PciDevice;
use ringvm_devices::scsi::Lun;
use ringvm_devices::virtio::pci::{VirtioPci, BAR_SIZE};
use ringvm_devices::virtio::scsi::{Disk, VirtioScsi};
use ringvm_devices::{MsiMessage, MsiRouter};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

struct NoRouter;

impl MsiRouter for NoRouter {
    fn allocate(&self) -> ringvm_devices::Result<u32> {
        Ok(32)
    }
    fn route(&self, _gsi: u32, _msg: Option<MsiMessage>, _irqfd: &EventFd) -> ringvm_devices::Result<()> {
        Ok(())
    }
}

struct Rig {
    pci: VirtioPci,
    _io: IoThread,
}

thread_local! {
    static RIG: RefCell<Option<Rig>> = const { RefCell::new(None) };
}

fn rig() -> Rig {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let path = std::env::temp_dir().join(format!("ringvm-fuzz-pci-{}", std::process::id()));
    let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    file.set_len(1 << 20).unwrap();
    let _ = std::fs::remove_file(&path);
    let io = IoThread::spawn("iothread-fuzz", 64).unwrap();
    let disks = vec![Disk::new("rw", file, Lun::new(1 << 20, 512, false, "RW"), false)];
    let dev = VirtioScsi::new(disks, vec![io.remote()], 2);
    let pci = VirtioPci::new(Box::new(dev), mem, Arc::new(NoRouter), 0xe000_0000).unwrap();
    Rig { pci, _io: io }
}

fuzz_target!(|data: &[u8]| {
    RIG.with(|r| {
        let mut r = r.borrow_mut();
        let rig = r.get_or_insert_with(rig);
        let pci = &mut rig.pci;
        // Each step: op, offset (2 bytes), size, value (8 bytes).
        for step in data.chunks_exact(12) {
            let off = u64::from(u16::from_le_bytes([step[1], step[2]])) % (BAR_SIZE + 0x100);
            let size = [1usize, 2, 4, 8, 3][usize::from(step[3]) % 5];
            let val = &step[4..4 + size];
            match step[0] % 4 {
                0 => pci.write(off, val),
                1 => {
                    let mut buf = [0u8; 8];
                    pci.read(off, &mut buf[..size]);
                }
                2 => pci.config_write(usize::from(step[1]) % 64, usize::from(step[2]) % 4, &val[..size.min(4 - usize::from(step[2]) % 4)]),
                _ => {
                    let _ = pci.config_read(usize::from(step[1]) % 64);
                }
            }
        }
        // Back to a clean device for the next input.
        pci.device_reset();
    });
});
