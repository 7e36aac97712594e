//! Task management on the control queue (ABORT TASK, ... QUERY TASK SET):
//! the matching requests are found and cancelled on their own queues'
//! iothreads.

use super::*;

impl Worker {
    /// On a request queue's iothread: the requests in flight for `lun`
    /// (all LUNs if None) and `tag` (all if None); with `cancel`, their
    /// ring operations are cancelled and `reply` runs once every one of
    /// them has completed (answered ABORTED, or normally if the kernel
    /// finished first). `reply` gets how many there were.
    pub(super) fn tmf_scan(ring: &mut Ring, source: SourceId, lun: Option<u16>, tag: Option<u64>, cancel: bool, reply: Box<dyn FnOnce(u64) + Send>) {
        let Some(w) = Worker::of(ring, source) else { return reply(0) };
        let (heads, ops): (Vec<u16>, Vec<OpId>) = {
            let wk = w.borrow();
            let hit: Vec<(u16, &Track)> = wk.in_flight_tracks().filter(|(_, t)| lun.is_none_or(|l| l == t.lun) && tag.is_none_or(|g| g == t.tag)).collect();
            (hit.iter().map(|(h, _)| *h).collect(), hit.iter().flat_map(|(_, t)| t.ops.iter().copied()).collect())
        };
        let found = heads.len() as u64;
        if !cancel || heads.is_empty() {
            return reply(found);
        }
        w.borrow_mut().tmf_waits.push(TmfWait { heads, found, reply: Some(reply) });
        for op in ops {
            ring.cancel(op);
        }
    }

    /// On the control queue's iothread: one request queue answered.
    pub(super) fn tmf_part_done(w: &WorkerRef, id: u64, found: u64) {
        let ready = {
            let mut wk = w.borrow_mut();
            let Some(p) = wk.tmfs.get_mut(&id) else { return };
            p.waiting -= 1;
            p.found += found;
            if p.waiting > 0 {
                return;
            }
            wk.tmfs.remove(&id)
        };
        if let Some(p) = ready {
            let response = if p.query && p.found > 0 { S_FUNCTION_SUCCEEDED } else { 0 };
            Worker::control_reply(w, p.head, &p.wr, &[response]);
        }
    }

    pub(super) fn control_reply(w: &WorkerRef, head: u16, wr: &[(GuestAddress, usize)], reply: &[u8]) {
        let mem = w.borrow().setup.mem.clone();
        let used = if write_segs(&mem, wr, reply) { reply.len() as u32 } else { 0 };
        w.borrow().setup.mark(wr);
        Worker::finish(w, head, used);
    }

    /// A task management function (virtio_scsi_ctrl_tmf_req: type,
    /// subtype, lun[8], tag). Aborts and resets cancel the matching
    /// requests on every request queue and answer once they are done.
    pub(super) fn tmf(w: &WorkerRef, head: u16, req: &[u8], wr: &[(GuestAddress, usize)]) {
        let subtype = u32::from_le_bytes(req[4..8].try_into().unwrap_or_default());
        let lun = &req[8..16];
        let tag = u64::from_le_bytes(req[16..24].try_into().unwrap_or_default());
        if lun[0] != 1 || lun[1] != 0 {
            return Worker::control_reply(w, head, wr, &[S_BAD_TARGET]);
        }
        let lun_id = u16::from_be_bytes([lun[2], lun[3]]) & 0x3fff;
        if w.borrow().setup.disks.get(usize::from(lun_id)).is_none_or(Disk::is_removed) {
            return Worker::control_reply(w, head, wr, &[S_INCORRECT_LUN]);
        }
        // (lun filter, tag filter, cancel, query)
        let (lf, tf, cancel, query) = match subtype {
            vs::VIRTIO_SCSI_T_TMF_ABORT_TASK => (Some(lun_id), Some(tag), true, false),
            vs::VIRTIO_SCSI_T_TMF_ABORT_TASK_SET | vs::VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET | vs::VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET => {
                (Some(lun_id), None, true, false)
            }
            vs::VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET => (None, None, true, false),
            vs::VIRTIO_SCSI_T_TMF_QUERY_TASK => (Some(lun_id), Some(tag), false, true),
            vs::VIRTIO_SCSI_T_TMF_QUERY_TASK_SET => (Some(lun_id), None, false, true),
            // CLEAR ACA (there is no ACA), unknown functions.
            _ => return Worker::control_reply(w, head, wr, &[S_FUNCTION_REJECTED]),
        };
        let (peers, own, source) = {
            let wk = w.borrow();
            let peers = wk.setup.peers.lock().unwrap_or_else(|e| e.into_inner()).clone();
            (peers, wk.setup.own.clone(), wk.setup.source)
        };
        let id = {
            let mut wk = w.borrow_mut();
            wk.next_tmf += 1;
            let id = wk.next_tmf;
            wk.tmfs.insert(id, PendingTmf { head, wr: wr.to_vec(), waiting: peers.len() + 1, found: 0, query });
            id
        };
        for (remote, peer) in peers {
            let back = own.clone();
            let reply: Box<dyn FnOnce(u64) + Send> = Box::new(move |found| {
                let _ = back.send(move |ring| {
                    if let Some(w) = Worker::of(ring, source) {
                        Worker::tmf_part_done(&w, id, found);
                    }
                });
            });
            if remote.send(move |ring| Worker::tmf_scan(ring, peer, lf, tf, cancel, reply)).is_err() {
                Worker::tmf_part_done(w, id, 0);
            }
        }
        // Our own share (the control queue holds no SCSI commands).
        Worker::tmf_part_done(w, id, 0);
    }

    /// Control queue: task management and asynchronous notification.
    pub(super) fn control(w: &WorkerRef, _ring: &mut Ring, head: u16, rd: &[(GuestAddress, usize)], wr: &[(GuestAddress, usize)]) {
        let mem = w.borrow().setup.mem.clone();
        let Some(t) = read_segs(&mem, rd, 4) else { return Worker::finish(w, head, 0) };
        let kind = u32::from_le_bytes([t[0], t[1], t[2], t[3]]);
        if kind == vs::VIRTIO_SCSI_T_TMF {
            return match read_segs(&mem, rd, 24) {
                Some(req) => Worker::tmf(w, head, &req, wr),
                None => Worker::control_reply(w, head, wr, &[S_FAILURE]),
            };
        }
        let reply: Vec<u8> = match kind {
            vs::VIRTIO_SCSI_T_AN_QUERY | vs::VIRTIO_SCSI_T_AN_SUBSCRIBE => {
                let mut v = vec![0u8; 5]; // no asynchronous notifications supported
                v[4] = S_OK;
                v
            }
            _ => vec![S_FAILURE],
        };
        Worker::control_reply(w, head, wr, &reply);
    }
}
