//! The virtio-scsi request path with guest-controlled descriptor tables,
//! avail rings and request headers, through a real iothread and disk
//! file. It must never panic the host; unless the device declares itself
//! broken (NEEDS_RESET) the used ring holds exactly the heads the guest
//! made available (the same multiset); and it may declare itself broken
//! only for an input that is malformed at the ring level.
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
        // What the driver made available, before the device may write anywhere.
        let table: Vec<Desc> = (0..QSIZE).map(|i| Desc::read(mem, i)).collect();
        let heads: Vec<u16> = (0..n_heads).map(|k| mem.read_obj(GuestAddress(AVAIL + 4 + 2 * u64::from(k))).unwrap()).collect();
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
        let (malformed, over_rings) = (ring_malformed(&table, &heads), chains_touch_rings(&table, &heads));
        if broken.load(Ordering::Relaxed) {
            assert!(bogus_idx || malformed || over_rings, "NEEDS_RESET for well-formed rings: heads {heads:?}");
        } else if !over_rings {
            // (A buffer over the rings themselves lets the device's writes
            // change what the rings say; then only "no panic" is checked.)
            let mut used: Vec<u16> = (0..n_heads).map(|k| mem.read_obj::<u32>(GuestAddress(USED + 4 + 8 * u64::from(k))).unwrap() as u16).collect();
            let mut want = heads.clone();
            used.sort_unstable();
            want.sort_unstable();
            assert_eq!(used, want, "the used ring does not hold the heads made available");
        }
        rig.dev.reset().unwrap();
    });
});

/// A split-ring descriptor as the driver wrote it.
#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

impl Desc {
    fn read(mem: &GuestMemoryMmap, i: u16) -> Desc {
        let a = DESC + u64::from(i) * 16;
        Desc {
            addr: mem.read_obj(GuestAddress(a)).unwrap(),
            len: mem.read_obj(GuestAddress(a + 8)).unwrap(),
            flags: mem.read_obj(GuestAddress(a + 12)).unwrap(),
            next: mem.read_obj(GuestAddress(a + 14)).unwrap(),
        }
    }
}

/// The descriptors of each head's chain (at most QSIZE + 1 steps, stopping
/// at an index out of the table).
fn chain(table: &[Desc], head: u16) -> Vec<Desc> {
    let mut out = Vec::new();
    let mut i = head;
    while let Some(d) = table.get(usize::from(i)) {
        out.push(*d);
        if d.flags & 1 == 0 || out.len() > usize::from(QSIZE) {
            break;
        }
        i = d.next;
    }
    out
}

/// Whether any buffer of these chains overlaps the descriptor table or
/// the rings.
fn chains_touch_rings(table: &[Desc], heads: &[u16]) -> bool {
    let rings = DESC..USED + 4 + 8 * u64::from(QSIZE) + 2;
    heads.iter().flat_map(|&h| chain(table, h)).any(|d| d.addr < rings.end && d.addr.saturating_add(u64::from(d.len)) > rings.start)
}

/// Whether the avail ring or a chain it names breaks the split-ring rules
/// (virtio 1.x 2.7): a head out of the table, a head made available twice
/// while in flight, a `next` out of the table or a loop, an indirect
/// descriptor, a buffer outside guest memory, or a device-readable
/// descriptor after a device-writable one.
fn ring_malformed(table: &[Desc], heads: &[u16]) -> bool {
    let mut seen = std::collections::HashSet::new();
    for &h in heads {
        if h >= QSIZE || !seen.insert(h) {
            return true;
        }
        let (mut i, mut n, mut writable) = (h, 0u16, false);
        loop {
            let d = table[usize::from(i)];
            n += 1;
            if n > QSIZE || d.flags & 4 != 0 || d.addr.checked_add(u64::from(d.len)).is_none_or(|end| end > MEM as u64) {
                return true;
            }
            if d.flags & 2 != 0 {
                writable = true;
            } else if writable {
                return true;
            }
            if d.flags & 1 == 0 {
                break;
            }
            if d.next >= QSIZE {
                return true;
            }
            i = d.next;
        }
    }
    false
}
