//! The virtio-scsi device: its configuration, activation (a worker per
//! queue on its iothread), reset, quiesce and saved state.

use super::*;
use crate::persist::PersistError;

pub struct VirtioScsi {
    pub(super) disks: Arc<Vec<Disk>>,
    pub(super) iothreads: Vec<Remote>,
    pub(super) num_queues: u32,
    pub(super) sense_size: u32,
    pub(super) cdb_size: u32,
    /// (iothread, source) of every running queue.
    pub(super) running: Vec<(Remote, SourceId)>,
    pub(super) needs_reset: Arc<AtomicBool>,
    pub(super) dirty: Option<Arc<DmaDirtyLog>>,
    /// The event queue of the current activation, if the driver took
    /// hotplug events: (its iothread, its source).
    pub(super) events: Arc<Mutex<Option<(Remote, SourceId)>>>,
    /// Told about every request a `stop` error policy holds.
    pub(super) errors: Option<ErrorSink>,
}

/// The request queues of one activation, for task management: (owning
/// iothread, worker source). Locked only to copy it.
pub(super) type Peers = Arc<std::sync::Mutex<Vec<(Remote, SourceId)>>>;

impl VirtioScsi {
    /// `num_queues` request queues spread round-robin over `iothreads`.
    pub fn new(disks: Vec<Disk>, iothreads: Vec<Remote>, num_queues: u32) -> VirtioScsi {
        assert!(!iothreads.is_empty() && num_queues >= 1);
        VirtioScsi {
            disks: Arc::new(disks),
            iothreads,
            num_queues,
            sense_size: DEFAULT_SENSE_SIZE,
            cdb_size: DEFAULT_CDB_SIZE,
            running: Vec::new(),
            needs_reset: Arc::new(AtomicBool::new(false)),
            dirty: None,
            events: Arc::default(),
            errors: None,
        }
    }

    /// Where requests held by a `stop` error policy are reported (the VM
    /// stops); [`VirtioScsi::error_control`] issues them again.
    pub fn with_error_sink(mut self, sink: ErrorSink) -> VirtioScsi {
        self.errors = Some(sink);
        self
    }

    pub fn error_control(&self) -> ErrorControl {
        ErrorControl { iothreads: self.iothreads.clone() }
    }

    /// The handle that unplugs this controller's LUNs (used without the
    /// transport's lock).
    pub fn hotplug(&self) -> Hotplug {
        Hotplug { disks: self.disks.clone(), iothreads: self.iothreads.clone(), events: self.events.clone() }
    }

    /// Every byte the queues write into guest memory is also marked in
    /// `log` (for live snapshots).
    pub fn with_dirty_log(mut self, log: Arc<DmaDirtyLog>) -> VirtioScsi {
        self.dirty = Some(log);
        self
    }

    pub fn needs_reset_flag(&self) -> Arc<AtomicBool> {
        self.needs_reset.clone()
    }

    pub(super) fn config_bytes(&self) -> [u8; 36] {
        let mut c = [0u8; 36];
        let put32 = |c: &mut [u8; 36], o: usize, v: u32| c[o..o + 4].copy_from_slice(&v.to_le_bytes());
        put32(&mut c, 0, self.num_queues);
        put32(&mut c, 4, SEG_MAX);
        put32(&mut c, 8, scsi::MAX_TRANSFER_BLOCKS);
        put32(&mut c, 12, u32::from(QUEUE_SIZE));
        put32(&mut c, 16, 16); // event_info_size
        put32(&mut c, 20, self.sense_size);
        put32(&mut c, 24, self.cdb_size);
        c[28..30].copy_from_slice(&0u16.to_le_bytes()); // max_channel
        c[30..32].copy_from_slice(&0u16.to_le_bytes()); // max_target
        put32(&mut c, 32, self.disks.len().saturating_sub(1) as u32); // max_lun
        c
    }
}

impl VirtioDevice for VirtioScsi {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 2 + self.num_queues as usize]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_SCSI_F_HOTPLUG
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = c.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only sense_size and cdb_size are driver-writable.
        if data.len() != 4 {
            return;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        match offset {
            20 if v <= MAX_SENSE_SIZE => self.sense_size = v,
            24 if (6..=MAX_CDB_SIZE).contains(&v) => self.cdb_size = v,
            _ => log::debug!("virtio-scsi: ignored config write at {offset} ({v})"),
        }
    }

    fn activate(&mut self, mem: GuestMemoryMmap, acked: u64, queues: Vec<ActiveQueue>) -> crate::Result<()> {
        // Shared, not cloned per request: a GuestMemoryMmap clone allocates.
        let mem = Arc::new(mem);
        let event_idx = acked & VIRTIO_RING_F_EVENT_IDX != 0;
        let peers: Peers = Arc::default();
        let mut request_queues = Vec::new();
        for q in queues {
            // The event queue is served only if the driver takes hotplug
            // events (else nothing is ever sent on it).
            if q.index == 1 {
                if acked & VIRTIO_SCSI_F_HOTPLUG != 0 {
                    let remote = self.iothreads[0].clone();
                    let source = SourceId::new();
                    let ev = EventQ {
                        queue: q.queue,
                        mem: mem.clone(),
                        notify: q.notify,
                        irq: q.irq,
                        event_idx,
                        dirty: self.dirty.clone(),
                        pending: VecDeque::new(),
                        missed: false,
                        stopped: false,
                        poll: None,
                    };
                    remote.send(move |ring| EventQ::start(ring, source, ev))?;
                    *self.events.lock().unwrap_or_else(|e| e.into_inner()) = Some((remote.clone(), source));
                    self.running.push((remote, source));
                }
                continue;
            }
            let remote = if q.index == 0 { self.iothreads[0].clone() } else { self.iothreads[(q.index as usize - 2) % self.iothreads.len()].clone() };
            let source = SourceId::new();
            let setup = WorkerSetup {
                control: q.index == 0,
                index: q.index,
                queue: q.queue,
                mem: mem.clone(),
                notify: q.notify,
                irq: q.irq,
                disks: self.disks.clone(),
                sense_size: self.sense_size,
                cdb_size: self.cdb_size,
                source,
                needs_reset: self.needs_reset.clone(),
                dirty: self.dirty.clone(),
                peers: peers.clone(),
                own: remote.clone(),
                errors: self.errors.clone(),
            };
            remote.send(move |ring| Worker::start(ring, setup))?;
            if q.index >= 2 {
                request_queues.push((remote.clone(), source));
            }
            self.running.push((remote, source));
        }
        *peers.lock().unwrap_or_else(|e| e.into_inner()) = request_queues;
        Ok(())
    }

    fn reset(&mut self) -> crate::Result<()> {
        let result = self.quiesce();
        self.needs_reset.store(false, Ordering::Relaxed);
        self.sense_size = DEFAULT_SENSE_SIZE;
        self.cdb_size = DEFAULT_CDB_SIZE;
        result
    }

    fn pause(&mut self) -> crate::Result<()> {
        self.quiesce()
    }

    fn save(&self) -> serde_json::Value {
        self.saved_state()
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<(), PersistError> {
        self.restore_state(state)
    }

    fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Relaxed)
    }

    fn describe(&self) -> Vec<String> {
        self.disks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                format!(
                    "lun {i}: {}{} ({} blocks of {}, {}{})",
                    d.path,
                    if d.is_removed() { " (unplugged)" } else { "" },
                    d.lun.blocks,
                    d.lun.block_size,
                    if d.lun.readonly { "ro" } else { "rw" },
                    if d.direct { ", cache=none" } else { "" }
                )
            })
            .collect()
    }
}

impl VirtioScsi {
    /// Asks every owning iothread to stop taking requests, then waits on
    /// each one's quiesce event: in-flight requests finish (their used
    /// entries are written), none is lost or replayed.
    pub(super) fn quiesce(&mut self) -> crate::Result<()> {
        *self.events.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let mut waiters = Vec::new();
        for (remote, source) in self.running.drain(..) {
            let s = source;
            remote.send(move |ring| Worker::stop(ring, s))?;
            waiters.push((remote.quiesce(source)?, remote, source));
        }
        let mut result = Ok(());
        for (w, remote, source) in waiters {
            if let Err(e) = w.wait(QUIESCE_DEADLINE) {
                log::error!("virtio-scsi: queue source {source:?} did not quiesce: {e}");
                result = Err(e.into());
            }
            let _ = remote.send(move |ring| Worker::forget(ring, source));
        }
        result
    }
}
