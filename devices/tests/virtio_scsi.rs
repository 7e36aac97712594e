//! virtio-scsi against hand-built split queues in real guest memory, with
//! a real iothread and a real disk file: good requests, and every kind of
//! malformed chain, each with its exact outcome. No head is ever lost.

use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ring::IoThread;
use ringvm_devices::scsi::Lun;
use ringvm_devices::virtio::scsi::{Disk, VirtioScsi, S_ABORTED, S_BAD_TARGET, S_FAILURE, S_OK};
use ringvm_devices::virtio::{ActiveQueue, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const QSIZE: u16 = 16;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const MEM: usize = 4 << 20;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

struct Rig {
    mem: GuestMemoryMmap,
    dev: VirtioScsi,
    notify: EventFd,
    irq: Arc<EventFd>,
    q: Q,
    _io: IoThread,
    _file: tempfile::NamedTempFile,
}

fn rig() -> Rig {
    rig_with(VIRTIO_F_VERSION_1)
}

fn rig_with(features: u64) -> Rig {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    file.write_all(&data).unwrap();
    let backing = file.reopen().unwrap();
    rig_on(features, backing, file)
}

/// A rig whose LUN reads and writes `backing` (a pipe, say).
fn rig_on(features: u64, backing: std::fs::File, file: tempfile::NamedTempFile) -> Rig {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let io = IoThread::spawn("iothread-test", 64).unwrap();
    let disk = Disk::new("test", backing, Lun::new(1 << 20, 512, false, "T"), false);
    let mut dev = VirtioScsi::new(vec![disk], vec![io.remote()], 1);
    let rq = Q { base: DESC, avail_idx: 0, used_seen: 0 };
    let mut q = rq.queue(&mem);
    // As the transport does once the driver acked it.
    q.set_event_idx(features & VIRTIO_RING_F_EVENT_IDX != 0);
    let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let irq = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
    dev.activate(mem.clone(), features, vec![ActiveQueue { index: 2, queue: q, notify: notify.try_clone().unwrap(), irq: Some(irq.clone()) }]).unwrap();
    Rig { mem, dev, notify, irq, q: rq, _io: io, _file: file }
}

impl Rig {
    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.q.desc(&self.mem, i, addr, len, flags, next);
    }

    fn push(&mut self, head: u16) {
        self.q.push(&self.mem, head);
    }

    fn kick(&self) {
        self.notify.write(1).unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.q.used_idx(&self.mem)
    }

    /// Waits for `n` more used entries; returns (id, len) of each.
    fn wait_used(&mut self, n: u16) -> Vec<(u32, u32)> {
        let t0 = Instant::now();
        while self.used_idx().wrapping_sub(self.q.used_seen) < n {
            assert!(t0.elapsed() < Duration::from_secs(10), "deadline: {} of {n} completions", self.used_idx().wrapping_sub(self.q.used_seen));
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut v = Vec::new();
        for _ in 0..n {
            let e = GuestAddress(USED + 4 + 8 * u64::from(self.q.used_seen % QSIZE));
            v.push((self.mem.read_obj(e).unwrap(), self.mem.read_obj(e.unchecked_add(4)).unwrap()));
            self.q.used_seen = self.q.used_seen.wrapping_add(1);
        }
        v
    }

    /// A virtio_scsi_cmd_req at `at` for LUN `lun` with `cdb`.
    fn req(&self, at: u64, target: u8, lun: u16, cdb: &[u8]) {
        let mut r = vec![0u8; 51];
        r[0] = 1;
        r[1] = target;
        r[2] = 0x40 | (lun >> 8) as u8;
        r[3] = lun as u8;
        r[19..19 + cdb.len()].copy_from_slice(cdb);
        self.mem.write_slice(&r, GuestAddress(at)).unwrap();
    }

    /// (response, status, sense key, asc) of the response at `at`.
    fn resp(&self, at: u64) -> (u8, u8, u8, u8) {
        let mut r = [0u8; 108];
        self.mem.read_slice(&mut r, GuestAddress(at)).unwrap();
        (r[11], r[10], r[12 + 2] & 0xf, r[12 + 12])
    }
}

fn read10(lba: u32, blocks: u16) -> Vec<u8> {
    let mut c = vec![0u8; 10];
    c[0] = 0x28;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

#[test]
fn good_read_lands_in_guest_memory() {
    let mut r = rig();
    r.req(0x10000, 0, 0, &read10(2, 8));
    r.desc(0, 0x10000, 51, F_NEXT, 1);
    r.desc(1, 0x11000, 108, F_WRITE | F_NEXT, 2);
    r.desc(2, 0x20000, 4096, F_WRITE, 0);
    r.push(0);
    r.kick();
    assert_eq!(r.wait_used(1), vec![(0, 108 + 4096)]);
    assert_eq!(r.resp(0x11000), (S_OK, 0, 0, 0));
    let mut got = vec![0u8; 4096];
    r.mem.read_slice(&mut got, GuestAddress(0x20000)).unwrap();
    let want: Vec<u8> = (1024..1024 + 4096).map(|i: u32| (i % 251) as u8).collect();
    assert_eq!(got, want);
    assert_eq!(r.irq.read().unwrap(), 1, "one interrupt");
}

#[test]
fn malformed_chains_get_responses_and_no_head_is_lost() {
    let mut r = rig();
    // 1: data buffer outside guest RAM -> FAILURE.
    r.req(0x10000, 0, 0, &read10(0, 1));
    r.desc(0, 0x10000, 51, F_NEXT, 1);
    r.desc(1, 0x11000, 108, F_WRITE | F_NEXT, 2);
    r.desc(2, 1 << 40, 512, F_WRITE, 0);
    // 2: response too short to hold anything -> used with length 0.
    r.req(0x12000, 0, 0, &read10(0, 1));
    r.desc(3, 0x12000, 51, F_NEXT, 4);
    r.desc(4, 0x13000, 10, F_WRITE, 0);
    // 3: a readable descriptor after a writable one -> FAILURE.
    r.req(0x14000, 0, 0, &read10(0, 1));
    r.desc(5, 0x14000, 51, F_NEXT, 6);
    r.desc(6, 0x15000, 108, F_WRITE | F_NEXT, 7);
    r.desc(7, 0x16000, 512, F_NEXT, 8);
    r.desc(8, 0x17000, 512, F_WRITE, 0);
    // 4: target 3 does not exist -> BAD_TARGET.
    r.req(0x18000, 3, 0, &read10(0, 1));
    r.desc(9, 0x18000, 51, F_NEXT, 10);
    r.desc(10, 0x19000, 108, F_WRITE, 0);
    // 5: LUN 5 does not exist -> CHECK CONDITION, LUN not supported.
    r.req(0x1a000, 0, 5, &read10(0, 1));
    r.desc(11, 0x1a000, 51, F_NEXT, 12);
    r.desc(12, 0x1b000, 108, F_WRITE, 0);
    // 6: a loop (descriptor 13 points at itself) -> cut, no response room.
    r.desc(13, 0x1c000, 51, F_NEXT, 13);
    // 7: header shorter than a request -> FAILURE.
    r.desc(14, 0x1d000, 10, F_NEXT, 15);
    r.desc(15, 0x1e000, 108, F_WRITE, 0);
    for h in [0, 3, 5, 9, 11, 13, 14] {
        r.push(h);
    }
    r.kick();
    let mut used = r.wait_used(7);
    used.sort();
    let heads: Vec<u32> = used.iter().map(|u| u.0).collect();
    assert_eq!(heads, vec![0, 3, 5, 9, 11, 13, 14], "every head comes back");
    assert_eq!(r.resp(0x11000).0, S_FAILURE);
    assert_eq!(used[1], (3, 0));
    assert_eq!(r.resp(0x15000).0, S_FAILURE);
    assert_eq!(r.resp(0x19000).0, S_BAD_TARGET);
    assert_eq!(r.resp(0x1b000), (S_OK, 2, 0x05, 0x25));
    assert_eq!(r.resp(0x1e000).0, S_FAILURE);
    assert!(!r.dev.needs_reset_flag().load(Ordering::Relaxed));
    // The queue still works.
    r.req(0x10000, 0, 0, &read10(0, 1));
    r.desc(0, 0x10000, 51, F_NEXT, 1);
    r.desc(1, 0x11000, 108, F_WRITE | F_NEXT, 2);
    r.desc(2, 0x20000, 512, F_WRITE, 0);
    r.push(0);
    r.kick();
    assert_eq!(r.wait_used(1), vec![(0, 108 + 512)]);
    assert_eq!(r.resp(0x11000), (S_OK, 0, 0, 0));
}

#[test]
fn a_head_already_in_flight_breaks_the_queue() {
    let mut r = rig();
    r.req(0x10000, 0, 0, &read10(0, 8));
    r.desc(0, 0x10000, 51, F_NEXT, 1);
    r.desc(1, 0x11000, 108, F_WRITE | F_NEXT, 2);
    r.desc(2, 0x20000, 4096, F_WRITE, 0);
    r.push(0);
    r.push(0);
    r.kick();
    // The first completes; the duplicate is refused and the device asks for a reset.
    assert_eq!(r.wait_used(1), vec![(0, 108 + 4096)]);
    let t0 = Instant::now();
    while !r.dev.needs_reset_flag().load(Ordering::Relaxed) {
        assert!(t0.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(1));
    }
    // Reset quiesces and clears the condition.
    r.dev.reset().unwrap();
    assert!(!r.dev.needs_reset_flag().load(Ordering::Relaxed));
}

#[test]
fn a_bogus_avail_index_breaks_the_queue() {
    let r = rig();
    r.mem.write_obj(QSIZE + 5, GuestAddress(AVAIL + 2)).unwrap();
    r.kick();
    let t0 = Instant::now();
    while !r.dev.needs_reset_flag().load(Ordering::Relaxed) {
        assert!(t0.elapsed() < Duration::from_secs(5), "bogus avail index not detected");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(r.used_idx(), 0, "nothing completed from garbage");
}

/// Reads from a disk that is a pipe stay in flight until the pipe has
/// data; a reset meanwhile returns only once every one of them is back in
/// the used ring with its response (none lost, none completed after the
/// driver may have reused the ring).
#[test]
fn reset_waits_for_in_flight_requests() {
    let (rd, mut wr) = {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills two fds that nothing else owns.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: the fds were just created and are owned here alone.
        unsafe { (<std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fds[0]), <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fds[1])) }
    };
    let mut r = rig_on(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX, rd, tempfile::NamedTempFile::new().unwrap());
    const N: u16 = 5;
    for k in 0..N {
        let base = 0x40000 + u64::from(k) * 0x4000;
        r.req(base, 0, 0, &read10(0, 64));
        r.desc(3 * k, base, 51, F_NEXT, 3 * k + 1);
        r.desc(3 * k + 1, base + 0x100, 108, F_WRITE | F_NEXT, 3 * k + 2);
        r.desc(3 * k + 2, 0x100000 + u64::from(k) * 0x10000, 32768, F_WRITE, 0);
        r.push(3 * k);
    }
    r.kick();
    // The iothread took all five (its sleep check publishes avail_event
    // once it is idle) and they wait on the pipe.
    let t0 = Instant::now();
    loop {
        let avail_event: u16 = r.mem.read_obj(GuestAddress(USED + 4 + 8 * u64::from(QSIZE))).unwrap();
        if avail_event == N {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "deadline: the iothread took {avail_event} of {N} requests");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(r.used_idx(), 0, "a read from an empty pipe completed");
    // The data arrives only after the reset began.
    let feeder = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        wr.write_all(&vec![0xa5u8; usize::from(N) * 32768]).unwrap();
    });
    r.dev.reset().unwrap();
    assert_eq!(r.used_idx(), N, "reset returned with requests still in flight");
    let done = r.wait_used(N);
    let mut heads: Vec<u32> = done.iter().map(|(id, _)| *id).collect();
    heads.sort_unstable();
    assert_eq!(heads, (0..u32::from(N)).map(|k| 3 * k).collect::<Vec<_>>(), "every head once");
    for k in 0..u64::from(N) {
        assert_eq!(r.resp(0x40000 + k * 0x4000 + 0x100), (0, 0, 0, 0), "request {k}: response");
        let mut d = vec![0u8; 32768];
        r.mem.read_slice(&mut d, GuestAddress(0x100000 + k * 0x10000)).unwrap();
        assert!(d.iter().all(|&b| b == 0xa5), "request {k}: the pipe's bytes");
    }
    feeder.join().unwrap();
}

/// A split queue at `base` (descriptors, avail at +0x1000, used at +0x2000;
/// the rig's queue is the one at DESC).
struct Q {
    base: u64,
    avail_idx: u16,
    used_seen: u16,
}

impl Q {
    fn queue(&self, mem: &GuestMemoryMmap) -> Queue {
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(self.base as u32), Some(0));
        q.set_avail_ring_address(Some((self.base + 0x1000) as u32), Some(0));
        q.set_used_ring_address(Some((self.base + 0x2000) as u32), Some(0));
        q.set_ready(true);
        assert!(q.is_valid(mem));
        q
    }
    fn desc(&self, mem: &GuestMemoryMmap, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let a = GuestAddress(self.base + u64::from(i) * 16);
        mem.write_obj(addr, a).unwrap();
        mem.write_obj(len, a.unchecked_add(8)).unwrap();
        mem.write_obj(flags, a.unchecked_add(12)).unwrap();
        mem.write_obj(next, a.unchecked_add(14)).unwrap();
    }
    fn push(&mut self, mem: &GuestMemoryMmap, head: u16) {
        mem.write_obj(head, GuestAddress(self.base + 0x1000 + 4 + 2 * u64::from(self.avail_idx % QSIZE))).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.base + 0x1000 + 2)).unwrap();
    }
    fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.base + 0x2002)).unwrap()
    }

    /// The queue with VIRTIO_RING_F_EVENT_IDX on, as the transport sets it.
    fn queue_event_idx(&self, mem: &GuestMemoryMmap) -> Queue {
        let mut q = self.queue(mem);
        q.set_event_idx(true);
        q
    }

    /// Waits (10 s deadline) until the device has taken `n` requests from
    /// the avail ring and gone idle: with EVENT_IDX its sleep check
    /// publishes avail_event = what it consumed just before it blocks.
    fn wait_taken(&self, mem: &GuestMemoryMmap, n: u16) {
        let t0 = Instant::now();
        loop {
            let avail_event: u16 = mem.read_obj(GuestAddress(self.base + 0x2000 + 4 + 8 * u64::from(QSIZE))).unwrap();
            if avail_event == n {
                return;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "deadline: the device took {avail_event} of {n} requests");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Task management on the control queue against a request queue whose
/// reads cannot finish (the disk is an empty pipe): ABORT TASK cancels
/// exactly its task through the ring, the aborted request completes with
/// VIRTIO_SCSI_S_ABORTED, and the TMF answers only after it; QUERY TASK
/// SET sees what is in flight; LUN RESET clears the rest; bad LUNs and
/// targets get their codes.
#[test]
fn task_management_cancels_in_flight_requests_and_answers_after_them() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let mut fds = [0; 2];
    // SAFETY: pipe() fills two fds.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: fds[0] is ours; the File owns it from here.
    let read_end = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fds[0]) };
    let io = IoThread::spawn("iothread-tmf", 64).unwrap();
    let disk = Disk::new("pipe", read_end, Lun::new(1 << 20, 512, false, "P"), false);
    let mut dev = VirtioScsi::new(vec![disk], vec![io.remote()], 1);
    let (mut ctl, mut rq) = (Q { base: 0x100000, avail_idx: 0, used_seen: 0 }, Q { base: 0x200000, avail_idx: 0, used_seen: 0 });
    let (cn, rn) = (EventFd::new(libc::EFD_NONBLOCK).unwrap(), EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let queues = vec![
        ActiveQueue { index: 0, queue: ctl.queue_event_idx(&mem), notify: cn.try_clone().unwrap(), irq: None },
        ActiveQueue { index: 2, queue: rq.queue_event_idx(&mem), notify: rn.try_clone().unwrap(), irq: None },
    ];
    dev.activate(mem.clone(), VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX, queues).unwrap();
    let wait = |q: &Q, n: u16| {
        let t0 = Instant::now();
        while q.used_idx(&mem).wrapping_sub(q.used_seen) < n {
            assert!(t0.elapsed() < Duration::from_secs(10), "deadline waiting for {n} completions");
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    // Two reads with tags 7 and 8: they block on the pipe.
    for (k, tag) in [(0u16, 7u64), (3, 8)] {
        let at = 0x10000 + u64::from(k) * 0x1000;
        let mut r = vec![0u8; 51];
        r[0] = 1;
        r[2] = 0x40;
        r[8..16].copy_from_slice(&tag.to_le_bytes());
        r[19..29].copy_from_slice(&read10(0, 1));
        mem.write_slice(&r, GuestAddress(at)).unwrap();
        rq.desc(&mem, k, at, 51, F_NEXT, k + 1);
        rq.desc(&mem, k + 1, at + 0x100, 108, F_WRITE | F_NEXT, k + 2);
        rq.desc(&mem, k + 2, 0x40000 + u64::from(k) * 0x1000, 512, F_WRITE, 0);
        rq.push(&mem, k);
    }
    rn.write(1).unwrap();
    rq.wait_taken(&mem, 2);
    assert_eq!(rq.used_idx(&mem), 0, "reads from an empty pipe stay in flight");
    // A TMF request: type 0, subtype, lun, tag; response byte at `resp`.
    let mut next = 0u16;
    let mut tmf = |ctl: &mut Q, subtype: u32, target: u8, lun: u16, tag: u64| -> u8 {
        let at = 0x30000 + u64::from(next) * 0x100;
        let mut b = vec![0u8; 24];
        b[4..8].copy_from_slice(&subtype.to_le_bytes());
        b[8] = 1;
        b[9] = target;
        b[10] = 0x40 | (lun >> 8) as u8;
        b[11] = lun as u8;
        b[16..24].copy_from_slice(&tag.to_le_bytes());
        mem.write_slice(&b, GuestAddress(at)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(at + 0x80)).unwrap();
        ctl.desc(&mem, next, at, 24, F_NEXT, next + 1);
        ctl.desc(&mem, next + 1, at + 0x80, 1, F_WRITE, 0);
        ctl.push(&mem, next);
        next += 2;
        cn.write(1).unwrap();
        wait(ctl, 1);
        ctl.used_seen = ctl.used_seen.wrapping_add(1);
        mem.read_obj(GuestAddress(at + 0x80)).unwrap()
    };
    assert_eq!(tmf(&mut ctl, 7, 0, 0, 0), 10, "QUERY TASK SET: FUNCTION SUCCEEDED (tasks in flight)");
    assert_eq!(tmf(&mut ctl, 6, 0, 0, 99), 0, "QUERY TASK of an unknown tag: FUNCTION COMPLETE");
    // ABORT TASK 7: when its answer is back, request 0 is in the used ring, aborted.
    assert_eq!(tmf(&mut ctl, 0, 0, 0, 7), 0);
    assert_eq!(rq.used_idx(&mem), 1, "exactly the aborted task completed before the TMF answered");
    let id: u32 = mem.read_obj(GuestAddress(0x202004)).unwrap();
    assert_eq!(id, 0);
    let resp: u8 = mem.read_obj(GuestAddress(0x10000 + 0x100 + 11)).unwrap();
    assert_eq!(resp, S_ABORTED);
    // Bad addresses.
    assert_eq!(tmf(&mut ctl, 5, 0, 3, 0), 12, "LUN 3: INCORRECT LUN");
    assert_eq!(tmf(&mut ctl, 5, 2, 0, 0), S_BAD_TARGET);
    assert_eq!(tmf(&mut ctl, 2, 0, 0, 0), 11, "CLEAR ACA: FUNCTION REJECTED");
    // LUN RESET: the other one is aborted too, before the answer.
    assert_eq!(tmf(&mut ctl, 5, 0, 0, 0), 0);
    assert_eq!(rq.used_idx(&mem), 2);
    let resp: u8 = mem.read_obj(GuestAddress(0x13000 + 0x100 + 11)).unwrap();
    assert_eq!(resp, S_ABORTED);
    assert_eq!(tmf(&mut ctl, 7, 0, 0, 0), 0, "nothing left in flight");
    dev.reset().unwrap();
    // SAFETY: closing our write end.
    unsafe { libc::close(fds[1]) };
}

/// Hot-unplug of LUN 1 while a read of it cannot finish (its disk is an
/// empty pipe): new requests to LUN 1 are answered as for an absent LUN at
/// once; unplug returns only after the in-flight read completed; then the
/// file is closed and the driver gets TRANSPORT_RESET / REMOVED on the
/// event queue, or, with no event buffer posted, as soon as it posts one.
/// With no LUN left the target is gone (BAD_TARGET).
#[test]
fn unplug_waits_for_in_flight_requests_then_closes_the_file_and_tells_the_driver() {
    use ringvm_devices::virtio::scsi::{EVT_RESET_REMOVED, T_TRANSPORT_RESET, VIRTIO_SCSI_F_HOTPLUG};
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let mut fds = [0; 2];
    // SAFETY: pipe() fills two fds.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both fds are ours; each File owns one from here.
    let (read_end, mut write_end) =
        unsafe { (<std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fds[0]), <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fds[1])) };
    let file = tempfile::tempfile().unwrap();
    file.set_len(1 << 20).unwrap();
    let io = IoThread::spawn("iothread-unplug", 64).unwrap();
    let disks =
        vec![Disk::new("file", file, Lun::new(1 << 20, 512, false, "F"), false), Disk::new("pipe", read_end, Lun::new(1 << 20, 512, false, "P"), false)];
    let mut dev = VirtioScsi::new(disks, vec![io.remote()], 1);
    let hp = dev.hotplug();
    let (mut evq, mut rq) = (Q { base: 0x100000, avail_idx: 0, used_seen: 0 }, Q { base: 0x200000, avail_idx: 0, used_seen: 0 });
    let (en, rn) = (EventFd::new(libc::EFD_NONBLOCK).unwrap(), EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let queues = vec![
        ActiveQueue { index: 1, queue: evq.queue_event_idx(&mem), notify: en.try_clone().unwrap(), irq: None },
        ActiveQueue { index: 2, queue: rq.queue_event_idx(&mem), notify: rn.try_clone().unwrap(), irq: None },
    ];
    dev.activate(mem.clone(), VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_SCSI_F_HOTPLUG, queues).unwrap();
    let wait = |q: &Q, n: u16| {
        let t0 = Instant::now();
        while q.used_idx(&mem).wrapping_sub(q.used_seen) < n {
            assert!(t0.elapsed() < Duration::from_secs(10), "deadline waiting for {n} completions");
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    // One event buffer.
    evq.desc(&mem, 0, 0x50000, 16, F_WRITE, 0);
    evq.push(&mem, 0);
    en.write(1).unwrap();
    // Request k (descriptors 3k..3k+2) to `lun` with `cdb`, 512 bytes in.
    let req = |rq: &mut Q, k: u16, lun: u16, cdb: &[u8]| {
        let at = 0x10000 + u64::from(k) * 0x1000;
        let mut r = vec![0u8; 51];
        r[0] = 1;
        r[2] = 0x40 | (lun >> 8) as u8;
        r[3] = lun as u8;
        r[19..19 + cdb.len()].copy_from_slice(cdb);
        mem.write_slice(&r, GuestAddress(at)).unwrap();
        let h = 3 * k;
        rq.desc(&mem, h, at, 51, F_NEXT, h + 1);
        rq.desc(&mem, h + 1, at + 0x100, 108, F_WRITE | F_NEXT, h + 2);
        rq.desc(&mem, h + 2, 0x40000 + u64::from(k) * 0x1000, 512, F_WRITE, 0);
        rq.push(&mem, h);
        rn.write(1).unwrap();
    };
    let resp = |k: u16| {
        let mut r = [0u8; 108];
        mem.read_slice(&mut r, GuestAddress(0x10000 + u64::from(k) * 0x1000 + 0x100)).unwrap();
        (r[11], r[10], r[12 + 2] & 0xf, r[12 + 12])
    };
    req(&mut rq, 0, 1, &read10(0, 1));
    rq.wait_taken(&mem, 1);
    assert_eq!(rq.used_idx(&mem), 0, "the read from an empty pipe stays in flight");
    let h2 = hp.clone();
    let unplug = std::thread::spawn(move || h2.unplug(1, Duration::from_secs(10)));
    // The LUN is gone for new requests as soon as the unplug starts.
    let t0 = Instant::now();
    while hp.present(1) {
        assert!(t0.elapsed() < Duration::from_secs(10), "deadline: LUN 1 still present");
        std::thread::sleep(Duration::from_millis(1));
    }
    // Meanwhile LUN 1 answers as absent, LUN 0 works.
    req(&mut rq, 1, 1, &read10(0, 1));
    wait(&rq, 1);
    assert_eq!(resp(1), (S_OK, 2, 5, 0x25), "READ of the unplugged LUN: LOGICAL UNIT NOT SUPPORTED");
    rq.used_seen += 1;
    req(&mut rq, 2, 0, &read10(0, 1));
    wait(&rq, 1);
    assert_eq!(resp(2), (S_OK, 0, 0, 0));
    rq.used_seen += 1;
    // Two more round trips through the iothread (LUN 1 refused, LUN 0
    // read) and the read from the pipe still holds the unplug up.
    assert!(!unplug.is_finished(), "unplug waits for the LUN's request in flight");
    assert_eq!(evq.used_idx(&mem), 0, "no event before the LUN's requests are done");
    write_end.write_all(&[0x5a; 512]).unwrap();
    unplug.join().unwrap().unwrap();
    wait(&rq, 1);
    assert_eq!(resp(0), (S_OK, 0, 0, 0), "the request in flight completed normally");
    rq.used_seen += 1;
    wait(&evq, 1);
    evq.used_seen += 1;
    let mut ev = [0u8; 16];
    mem.read_slice(&mut ev, GuestAddress(0x50000)).unwrap();
    assert_eq!(u32::from_le_bytes(ev[0..4].try_into().unwrap()), T_TRANSPORT_RESET);
    assert_eq!(&ev[4..8], &[1, 0, 0x40, 1]);
    assert_eq!(u32::from_le_bytes(ev[12..16].try_into().unwrap()), EVT_RESET_REMOVED);
    let e = write_end.write(&[0; 1]).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "the pipe's read end (LUN 1's file) is closed");
    // REPORT LUNS lists LUN 0 only.
    req(&mut rq, 3, 0, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0]);
    wait(&rq, 1);
    rq.used_seen += 1;
    let mut rl = [0u8; 24];
    mem.read_slice(&mut rl, GuestAddress(0x40000 + 3 * 0x1000)).unwrap();
    assert_eq!(u32::from_be_bytes(rl[0..4].try_into().unwrap()), 8, "one LUN left");
    assert!(hp.unplug(1, Duration::from_secs(1)).unwrap_err().to_string().contains("already unplugged"));
    assert!(hp.unplug(7, Duration::from_secs(1)).is_err());
    // No event buffer now: the event for LUN 0 waits for one.
    hp.unplug(0, Duration::from_secs(10)).unwrap();
    assert_eq!(evq.used_idx(&mem), 1, "an event without a buffer");
    evq.desc(&mem, 1, 0x51000, 16, F_WRITE, 0);
    evq.push(&mem, 1);
    en.write(1).unwrap();
    wait(&evq, 1);
    mem.read_slice(&mut ev, GuestAddress(0x51000)).unwrap();
    assert_eq!(&ev[4..8], &[1, 0, 0x40, 0]);
    // No LUN left: the target is gone.
    req(&mut rq, 4, 0, &[0, 0, 0, 0, 0, 0]);
    wait(&rq, 1);
    assert_eq!(resp(4).0, S_BAD_TARGET);
    dev.reset().unwrap();
}

/// The device keeps the driver's notifications off while its iothread is
/// awake and turns them back on before the iothread sleeps. A driver that
/// kicks only when told to (VRING_USED_F_NO_NOTIFY clear, or EVENT_IDX's
/// `avail_event` crossed, as Linux decides) must never strand a request,
/// whatever the interleaving: 100 batches of 4 reads, each posted without
/// waiting, all complete with their data. Once the iothread is idle,
/// notifications are on again (flags 0, or `avail_event` at the avail index).
#[test]
fn a_driver_that_skips_suppressed_notifications_never_strands_a_request() {
    use std::sync::atomic::fence;
    for event_idx in [false, true] {
        let features = VIRTIO_F_VERSION_1 | if event_idx { VIRTIO_RING_F_EVENT_IDX } else { 0 };
        let mut r = rig_with(features);
        let (mut kicks, mut posted) = (0u32, 0u32);
        for batch in 0..100u32 {
            for k in 0..4u16 {
                let (h, base) = (k * 3, 0x40000 + u64::from(k) * 0x4000);
                let lba = (batch * 4 + u32::from(k)) % 2048;
                r.req(base, 0, 0, &read10(lba, 1));
                r.desc(h, base, 51, F_NEXT, h + 1);
                r.desc(h + 1, base + 0x1000, 108, F_WRITE | F_NEXT, h + 2);
                r.desc(h + 2, base + 0x2000, 512, F_WRITE, 0);
                let old = r.q.avail_idx;
                r.push(h);
                posted += 1;
                fence(Ordering::SeqCst);
                let kick = if event_idx {
                    let event: u16 = r.mem.read_obj(GuestAddress(USED + 4 + 8 * u64::from(QSIZE))).unwrap();
                    let new = r.q.avail_idx;
                    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
                } else {
                    r.mem.read_obj::<u16>(GuestAddress(USED)).unwrap() & 1 == 0
                };
                if kick {
                    r.kick();
                    kicks += 1;
                }
            }
            let done = r.wait_used(4);
            for (id, _) in done {
                let base = 0x40000 + u64::from(id / 3) * 0x4000;
                assert_eq!(r.resp(base + 0x1000).0, S_OK, "event_idx={event_idx} batch {batch} head {id}");
                let lba = (batch * 4 + id / 3) % 2048;
                let mut got = [0u8; 4];
                r.mem.read_slice(&mut got, GuestAddress(base + 0x2000)).unwrap();
                let at = lba * 512;
                assert_eq!(got, [0, 1, 2, 3].map(|i| ((at + i) % 251) as u8), "event_idx={event_idx} batch {batch} head {id}");
            }
        }
        assert!(kicks >= 1 && kicks <= posted, "{kicks} kicks for {posted} requests");
        // Idle: notifications back on.
        let t0 = Instant::now();
        loop {
            let on = if event_idx {
                r.mem.read_obj::<u16>(GuestAddress(USED + 4 + 8 * u64::from(QSIZE))).unwrap() == r.q.avail_idx
            } else {
                r.mem.read_obj::<u16>(GuestAddress(USED)).unwrap() & 1 == 0
            };
            if on {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "event_idx={event_idx}: notifications still off with the iothread idle");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
