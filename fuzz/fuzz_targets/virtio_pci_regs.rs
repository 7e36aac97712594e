//! The virtio-pci transport's register interface as a guest drives it: any
//! sequence of BAR0 reads and writes (common config, device config, notify,
//! MSI-X table and PBA, out-of-range offsets, odd sizes) and PCI config-space
//! writes, with queue addresses anywhere. Device activation runs the real
//! virtio-scsi device on a real iothread. It must never panic the host;
//! after a reset the status and every queue's registers read back as at
//! power-on; and a well-formed driver init afterwards (whatever the input
//! left in PCI config space) ends in DRIVER_OK or NEEDS_RESET.
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
        // Back to a clean device: status 0, every queue disabled, its
        // addresses 0, no vector, its size the maximum.
        pci.device_reset();
        assert_eq!(rd(pci, STATUS, 1), 0, "status after reset");
        let nq = rd(pci, NUM_QUEUES, 2);
        assert!(nq >= 3, "num_queues {nq}");
        let mut sizes = Vec::new();
        for q in 0..nq {
            pci.write(QUEUE_SELECT, &(q as u16).to_le_bytes());
            let size = rd(pci, QUEUE_SIZE, 2);
            assert!(size > 0 && size.is_power_of_two(), "queue {q}: size {size} after reset");
            for (what, off, len, want) in [("enable", QUEUE_ENABLE, 2, 0), ("vector", QUEUE_MSIX, 2, 0xffff), ("desc", QUEUE_DESC, 8, 0), ("driver", QUEUE_DRIVER, 8, 0), ("device", QUEUE_DEVICE, 8, 0)] {
                assert_eq!(rd(pci, off, len), want, "queue {q}: {what} after reset");
            }
            sizes.push(size);
        }
        // A well-formed init: ACKNOWLEDGE, DRIVER, VERSION_1, FEATURES_OK,
        // every queue in RAM, DRIVER_OK.
        pci.write(STATUS, &[1]);
        pci.write(STATUS, &[3]);
        pci.write(DRIVER_FEATURE_SELECT, &1u32.to_le_bytes());
        pci.write(DRIVER_FEATURE, &1u32.to_le_bytes());
        pci.write(STATUS, &[0xb]);
        assert_eq!(rd(pci, STATUS, 1) & 0x8, 0x8, "FEATURES_OK with VERSION_1 alone");
        for (q, size) in sizes.iter().enumerate() {
            let base = 0x10000 + q as u64 * 0x8000;
            pci.write(QUEUE_SELECT, &(q as u16).to_le_bytes());
            pci.write(QUEUE_SIZE, &(*size as u16).to_le_bytes());
            wr64(pci, QUEUE_DESC, base);
            wr64(pci, QUEUE_DRIVER, base + 0x2000);
            wr64(pci, QUEUE_DEVICE, base + 0x4000);
            pci.write(QUEUE_ENABLE, &1u16.to_le_bytes());
        }
        pci.write(STATUS, &[0xf]);
        let st = rd(pci, STATUS, 1);
        assert!(st & 0x4 != 0 || st & 0x40 != 0, "status {st:#x} after a well-formed init");
        pci.device_reset();
    });
});

// Common configuration registers (virtio 1.x 4.1.4.3), at BAR0 offset 0.
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const NUM_QUEUES: u64 = 0x12;
const STATUS: u64 = 0x14;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;

/// Reads a register; 64-bit ones as two 32-bit halves (as drivers must).
fn rd(pci: &mut VirtioPci, off: u64, len: usize) -> u64 {
    if len == 8 {
        return rd(pci, off, 4) | rd(pci, off + 4, 4) << 32;
    }
    let mut b = [0u8; 8];
    pci.read(off, &mut b[..len]);
    u64::from_le_bytes(b)
}

fn wr64(pci: &mut VirtioPci, off: u64, v: u64) {
    pci.write(off, &(v as u32).to_le_bytes());
    pci.write(off + 4, &((v >> 32) as u32).to_le_bytes());
}
