//! The virtio-scsi request path with guest-controlled descriptor tables,
//! avail rings and request headers, through a real iothread and disk
//! file. It must never panic the host, and unless the device declares
//! itself broken (NEEDS_RESET) every head the guest made available comes
//! back in the used ring.
#![no_main]

use std::cell::RefCell;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use ring::IoThread;
use ringvm_devices::scsi::Lun;
use ringvm_devices::virtio::scsi::{Disk, VirtioScsi};
use ringvm_devices::virtio::{ActiveQueue, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const QSIZE: u16 = 16;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const MEM: usize = 1 << 20;

struct Rig {
    mem: GuestMemoryMmap,
    dev: VirtioScsi,
    _io: IoThread,
}

thread_local! {
    static RIG: RefCell<Option<Rig>> = const { RefCell::new(None) };
}

fn rig() -> Rig {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let path = std::env::temp_dir().join(format!("ringvm-fuzz-disk-{}", std::process::id()));
    let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    file.set_len(1 << 20).unwrap();
    let _ = std::fs::remove_file(&path);
    let io = IoThread::spawn("iothread-fuzz", 64).unwrap();
    let disks = vec![
        Disk::new("rw", file.try_clone().unwrap(), Lun::new(1 << 20, 512, false, "RW"), false),
        Disk::new("ro", file, Lun::new(1 << 20, 4096, true, "RO"), false),
    ];
    let dev = VirtioScsi::new(disks, vec![io.remote()], 1);
    Rig { mem, dev, _io: io }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    RIG.with(|r| {
        let mut r = r.borrow_mut();
        let rig = r.get_or_insert_with(rig);
        let mem = &rig.mem;
        // Guest memory below the rings: request headers and buffers from the input.
        let zero = vec![0u8; MEM];
        mem.write_slice(&zero, GuestAddress(0)).unwrap();
        let (ctl, rest) = data.split_at(4);
        let event_idx = ctl[0] & 1 != 0;
        let n_heads = u16::from(ctl[1]) % (QSIZE + 1);
        let bogus_idx = ctl[2] == 0xff;
        // Descriptor table (addresses mostly inside RAM, lengths bounded by the input).
        let table_len = (usize::from(QSIZE) * 16).min(rest.len());
        mem.write_slice(&rest[..table_len], GuestAddress(DESC)).unwrap();
        for i in 0..QSIZE {
            let a = GuestAddress(DESC + u64::from(i) * 16);
            let addr: u64 = mem.read_obj(a).unwrap();
            // Keep most addresses in the data area, some anywhere.
            if ctl[3] & 0x80 == 0 {
                mem.write_obj(0x10000 + (addr % 0xe0000), a).unwrap();
            }
        }
        let rest = &rest[table_len..];
        // Avail ring: the heads, then the index.
        for k in 0..n_heads {
            let h = rest.get(usize::from(k)).copied().unwrap_or(k as u8);
            mem.write_obj(u16::from(h) % (QSIZE + 2), GuestAddress(AVAIL + 4 + 2 * u64::from(k))).unwrap();
        }
        let avail_idx = if bogus_idx { 0x8000 } else { n_heads };
        mem.write_obj(avail_idx, GuestAddress(AVAIL + 2)).unwrap();
        // Request headers and data: the rest of the input, repeated over the data area.
        let body = &rest[usize::from(n_heads).min(rest.len())..];
        if !body.is_empty() {
            let mut area = Vec::with_capacity(0x20000);
            while area.len() < 0x20000 {
                area.extend_from_slice(body);
            }
            mem.write_slice(&area[..0x20000], GuestAddress(0x10000)).unwrap();
        }
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_event_idx(event_idx);
        q.set_ready(true);
        let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let features = VIRTIO_F_VERSION_1 | if event_idx { VIRTIO_RING_F_EVENT_IDX } else { 0 };
        rig.dev.activate(mem.clone(), features, vec![ActiveQueue { index: 2, queue: q, notify: notify.try_clone().unwrap(), irq: Some(irq) }]).unwrap();
        notify.write(1).unwrap();
        let broken = rig.dev.needs_reset_flag();
        let t0 = Instant::now();
        loop {
            let used: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
            if broken.load(Ordering::Relaxed) || (!bogus_idx && used == n_heads) {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(5), "{used} of {n_heads} heads came back, device not broken");
            std::thread::sleep(Duration::from_micros(50));
        }
        assert!(!bogus_idx || broken.load(Ordering::Relaxed), "a bogus avail index must break the queue");
        rig.dev.reset().unwrap();
    });
});
