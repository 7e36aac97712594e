//! The save job's iothread side without KVM: a scripted dirty log stands
//! in for KVM's, the test plays the control thread (pause, final phase,
//! close, cancel) and drives the ring, and the file is read back.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::snapshot::format::{self, MachineDesc};

const RAM: u64 = 8 << 20;
const PAGES: u64 = RAM / PAGE;

/// Hands out scripted bitmaps, one per harvest, then clean ones.
struct Script(Mutex<VecDeque<Vec<u64>>>);

impl Script {
    fn push(&self, pages: &[u64]) {
        let mut bm = vec![0u64; PAGES.div_ceil(64) as usize];
        for &p in pages {
            bm[(p / 64) as usize] |= 1 << (p % 64);
        }
        self.0.lock().unwrap().push_back(bm);
    }
}

impl DirtyLog for Script {
    fn dirty_log(&self, _slot: u32, size: usize) -> Result<Vec<u64>, kvm_ioctls::Error> {
        let clean = vec![0u64; (size as u64 / PAGE).div_ceil(64) as usize];
        Ok(self.0.lock().unwrap().pop_front().unwrap_or(clean))
    }
}

/// Every page holds its number and a generation.
fn write_page(mem: &GuestMemoryMmap, p: u64, generation: u8) {
    let mut b = vec![generation; PAGE as usize];
    b[..8].copy_from_slice(&p.to_le_bytes());
    mem.write_slice(&b, GuestAddress(p * PAGE)).unwrap();
}

struct Rig {
    ring: Ring,
    mem: GuestMemoryMmap,
    log: Arc<Script>,
    shared: Arc<SaveShared>,
    events: Arc<EventQueue>,
    dir: PathBuf,
}

impl Rig {
    fn new(name: &str) -> Rig {
        let dir = std::env::temp_dir().join(format!("ringvm-savejob-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
        for p in 0..PAGES {
            // Every eighth page stays zero (written as absent).
            if p % 8 != 7 {
                write_page(&mem, p, 1);
            }
        }
        let shared = Arc::new(SaveShared::default());
        shared.update(|s| s.state = SaveState::Active);
        Rig { ring: Ring::new(64, None).unwrap(), mem, log: Arc::new(Script(Mutex::default())), shared, events: Arc::new(EventQueue::new().unwrap()), dir }
    }

    fn start(&mut self, file: &Path) {
        let desc = MachineDesc { cpus: 1, mem_size: RAM, disks: vec![], kernel: None, initrd: None, cmdline: String::new(), scsi_queues: 1, iothreads: 1 };
        let p = Params {
            path: file.display().to_string(),
            header: format::Header::layout(desc, &[(0, RAM)]),
            slots: vec![(0, 0, RAM)],
            downtime_ms: 1000.0,
            dma: None,
            nofollow: false,
            final_timeout_ms: 10_000.0,
            converge: Converge::None,
            incremental: false,
        };
        start(&mut self.ring, p, self.log.clone(), self.mem.clone(), self.shared.clone(), self.events.clone());
    }

    /// Runs the ring until the job says `want` (or its Done); the steps seen.
    fn until(&mut self, want: SnapshotStep) -> Vec<SnapshotStep> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        loop {
            while let Some(ev) = self.events.pop() {
                if let VmEvent::Snapshot(s) = ev {
                    seen.push(s);
                    if s == want || s == SnapshotStep::Done {
                        return seen;
                    }
                }
            }
            assert!(Instant::now() < deadline, "no {want:?} within 30 s: {seen:?}");
            // (Waits only while operations are in flight.)
            self.ring.run_once(true).unwrap();
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Passes until the log runs dry, the final pause with a page written
/// while "paused", close: the file is complete, every page present
/// (zero pages absent) with the bytes the guest had at the pause, and
/// nothing else is left in the directory.
#[test]
fn a_snapshot_runs_its_passes_and_writes_what_the_guest_had_at_the_pause() {
    let mut rig = Rig::new("passes");
    let file = rig.dir.join("vm.state");
    // Pages the guest rewrites during pass 0, seen by the first harvest.
    for p in [3, 70, 1000] {
        write_page(&rig.mem, p, 2);
    }
    rig.log.push(&[3, 70, 1000]);
    rig.start(&file);
    let seen = rig.until(SnapshotStep::Pause);
    assert!(seen.contains(&SnapshotStep::Pass), "{seen:?}");
    assert_eq!(seen.last(), Some(&SnapshotStep::Pause));
    assert!(!file.exists(), "the file is at its name before it is complete");
    // Paused: one last page changes, the final harvest shows it.
    write_page(&rig.mem, 5, 3);
    write_page(&rig.mem, 15, 3); // a zero page no longer zero
    rig.log.push(&[5, 15]);
    final_phase(&mut rig.ring);
    assert_eq!(rig.until(SnapshotStep::Resume).last(), Some(&SnapshotStep::Resume));
    close(&mut rig.ring, br#"{"devices": "test"}"#.to_vec());
    assert_eq!(rig.until(SnapshotStep::Done).last(), Some(&SnapshotStep::Done));
    let s = rig.shared.get();
    assert_eq!(s.state, SaveState::Completed, "{:?}", s.error);
    let mut c = format::open_checked(&file).unwrap();
    assert_eq!(c.state_json, br#"{"devices": "test"}"#);
    let offset = c.header.regions[0].offset;
    let mut b = vec![0u8; PAGE as usize];
    let mut want = vec![0u8; PAGE as usize];
    for p in 0..PAGES {
        rig.mem.read_slice(&mut want, GuestAddress(p * PAGE)).unwrap();
        if want.iter().all(|&x| x == 0) {
            assert!(!c.present(0, p), "zero page {p} written");
            continue;
        }
        assert!(c.present(0, p), "page {p} missing");
        c.src.read_exact_at(&mut b, offset + p * PAGE).unwrap();
        assert!(b == want, "page {p}: the file has generation {}, the guest {}", b[8], want[8]);
        assert_eq!(crc32c::crc32c(&b), c.crc(0, p), "page {p}: checksum");
    }
    let names: Vec<_> = std::fs::read_dir(&rig.dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["vm.state"]);
    assert!(job_of(&rig.ring).is_none(), "the ring still keeps the finished job");
}

/// A cancel while RAM is written: the job fails, the good file that was
/// at the name stays byte-identical, and nothing else is left.
#[test]
fn a_cancelled_snapshot_leaves_the_earlier_file_alone() {
    let mut rig = Rig::new("cancel");
    let file = rig.dir.join("vm.state");
    std::fs::write(&file, b"an earlier snapshot").unwrap();
    // The guest keeps dirtying: never converges on its own.
    for _ in 0..1000 {
        rig.log.push(&(0..PAGES).step_by(2).collect::<Vec<_>>());
    }
    rig.start(&file);
    rig.until(SnapshotStep::Pass);
    rig.shared.cancel.store(true, Ordering::Relaxed);
    poke(&mut rig.ring);
    assert_eq!(rig.until(SnapshotStep::Done).last(), Some(&SnapshotStep::Done));
    assert_ne!(rig.shared.get().state, SaveState::Completed);
    assert_eq!(std::fs::read(&file).unwrap(), b"an earlier snapshot");
    let names: Vec<_> = std::fs::read_dir(&rig.dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["vm.state"]);
}

/// A directory that does not exist: the job fails at once naming the file.
#[test]
fn an_unopenable_target_fails_naming_the_file() {
    let mut rig = Rig::new("noent");
    let file = rig.dir.join("missing-dir").join("vm.state");
    rig.start(&file);
    assert_eq!(rig.until(SnapshotStep::Done).last(), Some(&SnapshotStep::Done));
    let s = rig.shared.get();
    assert_eq!(s.state, SaveState::Failed);
    let e = s.error.unwrap_or_default();
    assert!(e.contains(&file.display().to_string()), "{e}");
}
