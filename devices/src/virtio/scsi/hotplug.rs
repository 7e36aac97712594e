//! Hot-unplug of LUNs while the controller runs.

use super::*;

/// Unplugs LUNs of one controller while it runs. Cloneable; used from
/// the control thread with no device lock held.
#[derive(Clone)]
pub struct Hotplug {
    pub(super) disks: Arc<Vec<Disk>>,
    pub(super) iothreads: Vec<Remote>,
    pub(super) events: Arc<Mutex<Option<(Remote, SourceId)>>>,
}

impl Hotplug {
    /// Unplugs LUN `lun` and returns at once; `done` runs (on an iothread)
    /// when it is complete. From the moment this is called, new requests to
    /// the LUN are answered as for an absent LUN. Every iothread of the
    /// controller is asked to answer once it has seen that and the LUN's
    /// requests in flight have completed; the last answer closes the file,
    /// sends the driver TRANSPORT_RESET / REMOVED if it took hotplug events,
    /// and calls `done`. Nobody waits: like QEMU's device_del, completion
    /// is an event. An answer dropped unrun (a reset forgot the queue after
    /// quiescing it, or an iothread that stopped) counts as given.
    pub fn unplug_async(&self, lun: usize, done: impl FnOnce() + Send + 'static) -> crate::Result<()> {
        let disk = self.disks.get(lun).ok_or_else(|| crate::Error::Disk { path: format!("lun {lun}"), what: "no such LUN".into() })?;
        if disk.removed.swap(true, Ordering::AcqRel) {
            return Err(crate::Error::Disk { path: disk.path.clone(), what: "already unplugged".into() });
        }
        let last = Arc::new(Unplugging { disks: self.disks.clone(), lun, events: self.events.clone(), done: Mutex::new(Some(Box::new(done))) });
        for remote in &self.iothreads {
            let (token, disks) = (last.clone(), self.disks.clone());
            // Each iothread runs this after whatever request it is in the
            // middle of: from then on it sees the LUN removed.
            let _ = remote.send(move |ring| Worker::drain_lun(ring, &disks, lun as u16, Box::new(move || drop(token))));
        }
        Ok(())
    }

    /// [`Hotplug::unplug_async`], waiting up to `deadline` for it.
    pub fn unplug(&self, lun: usize, deadline: Duration) -> crate::Result<()> {
        let (tx, rx) = mpsc::channel::<()>();
        self.unplug_async(lun, move || {
            let _ = tx.send(());
        })?;
        rx.recv_timeout(deadline)
            .map_err(|_| crate::Error::Disk { path: self.disks[lun].path.clone(), what: format!("requests still in flight after {deadline:?}") })
    }

    /// Whether LUN `lun` exists and is still plugged.
    pub fn present(&self, lun: usize) -> bool {
        self.disks.get(lun).is_some_and(|d| !d.is_removed())
    }
}

/// An unplug in progress: held by each iothread's answer; the last one
/// dropped finishes it.
pub(super) struct Unplugging {
    pub(super) disks: Arc<Vec<Disk>>,
    pub(super) lun: usize,
    pub(super) events: Arc<Mutex<Option<(Remote, SourceId)>>>,
    pub(super) done: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Drop for Unplugging {
    fn drop(&mut self) {
        let lun = self.lun;
        let disk = &self.disks[lun];
        disk.close();
        let ev = self.events.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some((remote, source)) = ev {
            let mut e = [0u8; 16];
            e[0..4].copy_from_slice(&T_TRANSPORT_RESET.to_le_bytes());
            e[4..8].copy_from_slice(&[1, 0, 0x40 | (lun >> 8) as u8, lun as u8]);
            e[12..16].copy_from_slice(&EVT_RESET_REMOVED.to_le_bytes());
            let _ = remote.send(move |ring| EventQ::post(ring, source, e));
        }
        log::info!("virtio-scsi: lun {lun} ({}) unplugged", disk.path);
        if let Some(done) = self.done.lock().unwrap_or_else(|e| e.into_inner()).take() {
            done();
        }
    }
}

impl Worker {
    /// On an iothread: `reply` runs once no request queue of the
    /// controller owning `disks` on this thread has a request for `lun`
    /// in flight (at once if none has).
    pub(super) fn drain_lun(ring: &Ring, disks: &Arc<Vec<Disk>>, lun: u16, reply: Box<dyn FnOnce() + Send>) {
        let workers: Vec<WorkerRef> = Worker::all(ring).into_iter().filter(|w| Arc::ptr_eq(&w.borrow().setup.disks, disks)).collect();
        let left = Rc::new(RefCell::new((1usize, Some(reply))));
        type Left = Rc<RefCell<(usize, Option<Box<dyn FnOnce() + Send>>)>>;
        let one_done = |left: &Left| {
            let r = {
                let mut l = left.borrow_mut();
                l.0 -= 1;
                if l.0 == 0 {
                    l.1.take()
                } else {
                    None
                }
            };
            if let Some(r) = r {
                r();
            }
        };
        for w in workers {
            let heads: Vec<u16> = w.borrow().in_flight_tracks().filter(|(_, t)| t.lun == lun).map(|(h, _)| h).collect();
            if heads.is_empty() {
                continue;
            }
            left.borrow_mut().0 += 1;
            let l = left.clone();
            w.borrow_mut().tmf_waits.push(TmfWait { heads, found: 0, reply: Some(Box::new(move |_| one_done(&l))) });
        }
        one_done(&left);
    }
}
