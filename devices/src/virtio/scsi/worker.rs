//! A request queue's worker, owned by its iothread: takes requests off
//! the avail ring, parses them, submits their file I/O to the ring and
//! answers in the used ring.

use super::*;

pub(super) struct WorkerSetup {
    pub(super) control: bool,
    pub(super) index: u16,
    pub(super) queue: Queue,
    pub(super) mem: Arc<GuestMemoryMmap>,
    pub(super) notify: EventFd,
    pub(super) irq: Option<Arc<EventFd>>,
    pub(super) disks: Arc<Vec<Disk>>,
    pub(super) sense_size: u32,
    pub(super) cdb_size: u32,
    pub(super) source: SourceId,
    pub(super) needs_reset: Arc<AtomicBool>,
    pub(super) dirty: Option<Arc<DmaDirtyLog>>,
    /// The request queues (for the control queue's task management).
    pub(super) peers: Peers,
    /// This queue's iothread (where task-management answers come back).
    pub(super) own: Remote,
    pub(super) errors: Option<ErrorSink>,
}

impl WorkerSetup {
    /// Notes guest memory this queue wrote (disk data, responses).
    pub(super) fn mark(&self, segs: &[(GuestAddress, usize)]) {
        if let Some(d) = &self.dirty {
            for &(a, l) in segs {
                d.mark(a.0, l as u64);
            }
        }
    }
}

/// A request in flight: its I_T_L_Q nexus and the ring operations a task
/// management function would cancel.
pub(super) struct Track {
    pub(super) lun: u16,
    pub(super) tag: u64,
    pub(super) ops: SmallVec<[OpId; 2]>,
}

/// A task management function waiting for these heads to complete.
pub(super) struct TmfWait {
    pub(super) heads: Vec<u16>,
    pub(super) found: u64,
    pub(super) reply: Option<Box<dyn FnOnce(u64)>>,
}

/// A task management request on the control queue, waiting for the
/// request queues' answers.
pub(super) struct PendingTmf {
    pub(super) head: u16,
    pub(super) wr: Vec<(GuestAddress, usize)>,
    pub(super) waiting: usize,
    pub(super) found: u64,
    pub(super) query: bool,
}

/// One queue, owned by one iothread.
pub(super) struct Worker {
    pub(super) setup: WorkerSetup,
    pub(super) poll: Option<OpId>,
    pub(super) stopped: bool,
    pub(super) broken: bool,
    /// The driver was told not to notify (no NO_NOTIFY flag, or the
    /// EVENT_IDX avail_event left behind): set while the iothread is awake
    /// after taking requests; its sleep check turns notifications back on.
    pub(super) notify_off: bool,
    pub(super) in_flight: Vec<bool>,
    pub completed: u64,
    /// By head index: the requests in flight (their nexus and ring ops).
    pub(super) tracked: Vec<Option<Track>>,
    pub(super) tmf_waits: Vec<TmfWait>,
    pub(super) tmfs: HashMap<u64, PendingTmf>,
    pub(super) next_tmf: u64,
    /// Requests held by a `stop` error policy until `cont` retries them.
    pub(super) held: Vec<(Req, Io, u64)>,
}

/// A worker, as its iothread's ring keeps it ([`Ring::adopt`] under the
/// queue's source): other threads reach it only by sending that ring a
/// closure through its `Remote`, which finds it with [`Worker::of`].
pub(super) type WorkerRef = Rc<RefCell<Worker>>;

pub(super) fn read_segs(mem: &GuestMemoryMmap, segs: &[(GuestAddress, usize)], len: usize) -> Option<Vec<u8>> {
    let mut out = vec![0u8; len];
    let mut off = 0;
    for &(addr, l) in segs {
        if off == len {
            break;
        }
        let n = l.min(len - off);
        mem.read_slice(&mut out[off..off + n], addr).ok()?;
        off += n;
    }
    (off == len).then_some(out)
}

pub(super) fn write_segs(mem: &GuestMemoryMmap, segs: &[(GuestAddress, usize)], data: &[u8]) -> bool {
    let mut off = 0;
    for &(addr, l) in segs {
        if off == data.len() {
            break;
        }
        let n = l.min(data.len() - off);
        if mem.write_slice(&data[off..off + n], addr).is_err() {
            return false;
        }
        off += n;
    }
    off == data.len()
}

/// Host iovecs for the first `len` bytes of `segs`; None if any part is
/// outside guest RAM.
pub(super) fn iovecs(mem: &GuestMemoryMmap, segs: &[(GuestAddress, usize)], len: u64) -> Option<Vec<libc::iovec>> {
    let mut left = len as usize;
    let mut v = Vec::with_capacity(segs.len());
    for &(addr, l) in segs {
        if left == 0 {
            break;
        }
        let n = l.min(left);
        let slice = mem.get_slice(addr, n).ok()?;
        v.push(libc::iovec { iov_base: slice.ptr_guard_mut().as_ptr().cast(), iov_len: n });
        left -= n;
    }
    (left == 0).then_some(v)
}

impl Worker {
    pub(super) fn start(ring: &mut Ring, s: WorkerSetup) {
        let source = s.source;
        let fd = s.notify.as_raw_fd();
        let size = s.queue.size() as usize;
        let w: WorkerRef = Rc::new(RefCell::new(Worker {
            setup: s,
            poll: None,
            stopped: false,
            broken: false,
            notify_off: false,
            in_flight: vec![false; size],
            completed: 0,
            tracked: (0..size).map(|_| None).collect(),
            tmf_waits: Vec::new(),
            tmfs: HashMap::new(),
            next_tmf: 0,
            held: Vec::new(),
        }));
        let w2 = w.clone();
        let poll = ring.submit(source.companion(), Op::Poll { fd, events: libc::POLLIN as u32, multishot: true }, move |ring, c| {
            if c.result.is_ok() {
                let _ = w2.borrow().setup.notify.read();
                Worker::process(&w2, ring);
            }
        });
        w.borrow_mut().poll = Some(poll);
        // While the iothread polls (if it does: its poll window), new
        // requests are picked up from the avail ring without waiting for
        // the doorbell's wake-up.
        let w3 = w.clone();
        ring.add_poller(source, move |ring| {
            let ready = {
                let wk = w3.borrow();
                !wk.stopped
                    && !wk.broken
                    && wk.setup.queue.avail_idx(&*wk.setup.mem, std::sync::atomic::Ordering::Acquire).is_ok_and(|i| i.0 != wk.setup.queue.next_avail())
            };
            if ready {
                Worker::process(&w3, ring);
            }
            ready
        });
        // Notifications stay off while the iothread is awake (as QEMU's
        // aio_poll does); before it blocks, they are turned back on and the
        // avail ring looked at once more, so a request posted in between is
        // never left waiting.
        let w4 = w.clone();
        ring.add_sleep_check(source, move |ring| Worker::arm(&w4, ring));
        ring.adopt(source, w.clone());
        // Requests queued before DRIVER_OK reached us.
        Worker::process(&w, ring);
    }

    /// The worker this thread's ring keeps for `source`.
    pub(super) fn of(ring: &Ring, source: SourceId) -> Option<WorkerRef> {
        ring.owned::<RefCell<Worker>>(source)
    }

    /// Every worker this thread's ring keeps.
    pub(super) fn all(ring: &Ring) -> Vec<WorkerRef> {
        ring.all_owned::<RefCell<Worker>>()
    }

    pub(super) fn stop(ring: &mut Ring, source: SourceId) {
        let Some(w) = Worker::of(ring, source) else { return EventQ::stop(ring, source) };
        let poll = {
            let mut w = w.borrow_mut();
            w.stopped = true;
            w.poll.take()
        };
        if let Some(p) = poll {
            ring.cancel(p);
        }
        ring.remove_pollers(source);
    }

    /// Drops the queue (a worker or the event queue) kept for `source`.
    pub(super) fn forget(ring: &mut Ring, source: SourceId) {
        ring.disown(source);
    }

    /// The used ring (flags, idx, entries, avail_event) was written.
    pub(super) fn mark_used_ring(&self) {
        if let Some(d) = &self.setup.dirty {
            d.mark(self.setup.queue.used_ring(), 6 + 8 * u64::from(self.setup.queue.size()));
        }
    }

    pub(super) fn mark_broken(&mut self, why: &str) {
        if !self.broken {
            crate::warn_limited!("virtio-scsi: queue {}: {why}; device needs reset", self.setup.index);
            self.broken = true;
            self.setup.needs_reset.store(true, Ordering::Relaxed);
        }
    }

    /// Takes every available chain, leaving the driver's notifications off
    /// (the iothread is awake; [`Worker::arm`] turns them on before it
    /// sleeps).
    pub(super) fn process(w: &WorkerRef, ring: &mut Ring) {
        let mem = w.borrow().setup.mem.clone();
        let chains = {
            let mut wk = w.borrow_mut();
            if wk.stopped || wk.broken {
                return;
            }
            if !wk.notify_off {
                if let Err(e) = wk.setup.queue.disable_notification(&*mem) {
                    wk.mark_broken(&format!("disable notification: {e}"));
                    return;
                }
                wk.notify_off = true;
                wk.mark_used_ring();
            }
            let mut chains = Vec::new();
            match wk.setup.queue.iter(&*mem) {
                Ok(it) => chains.extend(it),
                Err(e) => {
                    wk.mark_broken(&format!("bad avail index: {e}"));
                    return;
                }
            }
            chains
        };
        for chain in chains {
            Worker::handle(w, ring, chain);
        }
    }

    /// The iothread's sleep check: notifications back on, then one more
    /// look (a request posted while they were off would otherwise wait).
    /// Whether it found work.
    pub(super) fn arm(w: &WorkerRef, ring: &mut Ring) -> bool {
        let more = {
            let mut wk = w.borrow_mut();
            if wk.stopped || wk.broken || !wk.notify_off {
                return false;
            }
            let mem = wk.setup.mem.clone();
            let re_enabled = wk.setup.queue.enable_notification(&*mem);
            wk.notify_off = false;
            wk.mark_used_ring();
            match re_enabled {
                Ok(more) => more,
                Err(e) => {
                    wk.mark_broken(&format!("enable notification: {e}"));
                    false
                }
            }
        };
        if more {
            Worker::process(w, ring);
        }
        more
    }

    pub(super) fn handle(w: &WorkerRef, ring: &mut Ring, chain: DescriptorChain<&GuestMemoryMmap>) {
        let head = chain.head_index();
        let mut segs = Chain::new();
        for d in chain {
            segs.push(d.addr(), d.len() as usize, d.is_write_only());
        }
        {
            let mut wk = w.borrow_mut();
            match wk.in_flight.get_mut(head as usize) {
                Some(f) if !*f => *f = true,
                _ => {
                    wk.mark_broken(&format!("head {head} is already in flight"));
                    return;
                }
            }
        }
        let (control, sense_size, cdb_size, mem) = {
            let wk = w.borrow();
            (wk.setup.control, wk.setup.sense_size as usize, wk.setup.cdb_size as usize, wk.setup.mem.clone())
        };
        if control {
            return Worker::control(w, ring, head, &segs.rd, &segs.wr);
        }
        let fail = |w: &WorkerRef, r: &Req, code: u8| Worker::respond(w, r, code, scsi::GOOD, None, 0, 0);
        let (hdr_segs, r) = match layout(head, &segs, cdb_size, sense_size) {
            Layout::Ok { header, req } => (header, req),
            Layout::NoResponse => {
                // Nowhere to say anything: give the head back, zero bytes.
                log::debug!("virtio-scsi: head {head}: response buffer too short");
                return Worker::finish(w, head, 0);
            }
            Layout::Failure(r) => return fail(w, &r, S_FAILURE),
        };
        let Some(hdr) = read_segs(&mem, &hdr_segs, 19 + cdb_size) else { return fail(w, &r, S_FAILURE) };
        let (lun_id, tag, cdb) = match request::header(&hdr, cdb_size) {
            Ok(h) => (usize::from(h.lun), h.tag, h.cdb),
            Err(code) => return fail(w, &r, code),
        };
        if let Some(t) = w.borrow_mut().tracked.get_mut(usize::from(head)) {
            *t = Some(Track { lun: lun_id as u16, tag, ops: SmallVec::new() });
        }
        let disks = w.borrow().setup.disks.clone();
        // An unplugged LUN answers as absent; with none left, so does the
        // target (as QEMU's bus does).
        let disk = disks.get(lun_id).and_then(|d| d.fd().map(|fd| (d, fd)));
        let luns: Vec<u16> = (0..disks.len() as u16).filter(|&i| !disks[usize::from(i)].is_removed()).collect();
        if luns.is_empty() {
            return fail(w, &r, S_BAD_TARGET);
        }
        let out_len = total(&r.data_out);
        let in_len = total(&r.data_in);
        let params = if scsi::wants_data_out(cdb) {
            let n = (out_len as usize).min(scsi::MAX_PARAM_LEN);
            match read_segs(&mem, &r.data_out, n) {
                Some(p) => p,
                None => return fail(w, &r, S_FAILURE),
            }
        } else {
            Vec::new()
        };
        let action = scsi::execute(&Target { lun: disk.map(|d| &d.0.lun), luns: &luns }, cdb, out_len, in_len, &params);
        let source = w.borrow().setup.source;
        let Some((_, fd)) = disk else {
            return Worker::done(w, &r, action);
        };
        let fd = Fd::Raw(fd);
        match action {
            a @ Action::Done { .. } => Worker::done(w, &r, a),
            Action::Read { offset, len } => Worker::submit_io(w, ring, r, Io::Read { lun: lun_id, offset, len }, in_len),
            Action::Write { offset, len, sync } => Worker::submit_io(w, ring, r, Io::Write { lun: lun_id, offset, len, sync }, in_len),
            Action::WriteBuf { offset, data, sync } => Worker::submit_io(w, ring, r, Io::WriteBuf { lun: lun_id, offset, data, sync }, in_len),
            Action::Flush => Worker::submit_io(w, ring, r, Io::Flush { lun: lun_id }, in_len),
            Action::Discard { ranges } => {
                if ranges.is_empty() {
                    return Worker::done(w, &r, Action::good(vec![]));
                }
                let left = Rc::new(RefCell::new((ranges.len(), None::<i32>)));
                let r = Rc::new(r);
                for (off, len) in ranges {
                    let (w2, left, r) = (w.clone(), left.clone(), r.clone());
                    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                    let id = ring.submit(source, Op::Fallocate { fd, mode, offset: off, len }, move |_, c| {
                        let mut l = left.borrow_mut();
                        l.0 -= 1;
                        if let Err(e) = c.result {
                            l.1 = l.1.or(e.raw_os_error());
                        }
                        if l.0 == 0 {
                            match l.1 {
                                None => Worker::done(&w2, &r, Action::good(vec![])),
                                Some(errno) => Worker::done(&w2, &r, Action::check(Sense::from_errno(errno, true))),
                            }
                        }
                    });
                    Worker::track(w, head, &[id]);
                }
            }
        }
    }

    /// Completes a request the target answered without file I/O.
    pub(super) fn done(w: &WorkerRef, r: &Req, a: Action) {
        let mem = w.borrow().setup.mem.clone();
        let in_len = total(&r.data_in);
        match a {
            Action::Done { status, sense, data } => {
                let n = (data.len() as u64).min(in_len) as usize;
                if !write_segs(&mem, &r.data_in, &data[..n]) {
                    return Worker::respond(w, r, S_FAILURE, scsi::GOOD, None, 0, in_len);
                }
                Worker::respond(w, r, S_OK, status, sense, n as u64, in_len)
            }
            _ => Worker::respond(w, r, S_FAILURE, scsi::GOOD, None, 0, in_len),
        }
    }

    /// Writes the virtio_scsi_cmd_resp and completes the head.
    pub(super) fn respond(w: &WorkerRef, r: &Req, response: u8, status: u8, sense: Option<Sense>, data_in: u64, in_len: u64) {
        let (mem, sense_size) = {
            let wk = w.borrow();
            (wk.setup.mem.clone(), wk.setup.sense_size as usize)
        };
        let mut buf = [0u8; 12 + MAX_SENSE_SIZE as usize];
        let resp = &mut buf[..12 + sense_size];
        let sb = sense.map(|s| s.fixed());
        let sense_len = sb.map_or(0, |s| s.len().min(sense_size));
        resp[0..4].copy_from_slice(&(sense_len as u32).to_le_bytes());
        let resid = in_len.saturating_sub(data_in).min(u64::from(u32::MAX)) as u32;
        resp[4..8].copy_from_slice(&resid.to_le_bytes());
        resp[10] = status;
        resp[11] = response;
        if let Some(s) = sb {
            resp[12..12 + sense_len].copy_from_slice(&s[..sense_len]);
        }
        let used = if write_segs(&mem, &r.resp, resp) { resp.len() as u64 + data_in } else { 0 };
        {
            let wk = w.borrow();
            wk.setup.mark(&r.data_in);
            wk.setup.mark(&r.resp);
        }
        Worker::finish(w, r.head, used as u32);
    }

    /// Puts `head` in the used ring and signals if the driver wants it.
    pub(super) fn finish(w: &WorkerRef, head: u16, used: u32) {
        let mut wk = w.borrow_mut();
        let mem = wk.setup.mem.clone();
        if let Some(f) = wk.in_flight.get_mut(head as usize) {
            *f = false;
        }
        if wk.tracked.get_mut(usize::from(head)).and_then(Option::take).is_some() && !wk.tmf_waits.is_empty() {
            for t in &mut wk.tmf_waits {
                t.heads.retain(|&h| h != head);
            }
            let (done, waiting): (Vec<TmfWait>, Vec<TmfWait>) = std::mem::take(&mut wk.tmf_waits).into_iter().partition(|t| t.heads.is_empty());
            wk.tmf_waits = waiting;
            for mut t in done {
                if let Some(reply) = t.reply.take() {
                    reply(t.found);
                }
            }
        }
        wk.completed += 1;
        if let Err(e) = wk.setup.queue.add_used(&*mem, head, used) {
            wk.mark_broken(&format!("add_used: {e}"));
            return;
        }
        wk.mark_used_ring();
        match wk.setup.queue.needs_notification(&*mem) {
            Ok(true) => {
                if let Some(irq) = &wk.setup.irq {
                    let _ = irq.write(1);
                }
            }
            Ok(false) => {}
            Err(e) => wk.mark_broken(&format!("needs_notification: {e}")),
        }
    }

    /// The tracked requests, with their heads.
    pub(super) fn in_flight_tracks(&self) -> impl Iterator<Item = (u16, &Track)> {
        self.tracked.iter().enumerate().filter_map(|(h, t)| t.as_ref().map(|t| (h as u16, t)))
    }

    pub(super) fn track(w: &WorkerRef, head: u16, ids: &[OpId]) {
        if let Some(Some(t)) = w.borrow_mut().tracked.get_mut(usize::from(head)) {
            t.ops.extend_from_slice(ids);
        }
    }
}
