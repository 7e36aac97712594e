//! The event queue (hotplug events to the driver).

use super::*;

/// The event queue (5.6.6.3), kept by the control queue's iothread's ring
/// under its own source: events wait in `pending` until the driver has
/// posted a buffer.
pub(super) struct EventQ {
    pub(super) queue: Queue,
    pub(super) mem: Arc<GuestMemoryMmap>,
    pub(super) notify: EventFd,
    pub(super) irq: Option<Arc<EventFd>>,
    pub(super) event_idx: bool,
    pub(super) dirty: Option<Arc<DmaDirtyLog>>,
    pub(super) pending: VecDeque<[u8; 16]>,
    pub(super) missed: bool,
    pub(super) stopped: bool,
    pub(super) poll: Option<OpId>,
}

impl EventQ {
    pub(super) fn start(ring: &mut Ring, source: SourceId, ev: EventQ) {
        let fd = ev.notify.as_raw_fd();
        let e = Rc::new(RefCell::new(ev));
        let e2 = e.clone();
        let poll = ring.submit(source.companion(), Op::Poll { fd, events: libc::POLLIN as u32, multishot: true }, move |_, c| {
            if c.result.is_ok() {
                let _ = e2.borrow().notify.read();
                e2.borrow_mut().deliver();
            }
        });
        e.borrow_mut().poll = Some(poll);
        ring.adopt(source, e);
    }

    pub(super) fn stop(ring: &mut Ring, source: SourceId) {
        let Some(e) = ring.owned::<RefCell<EventQ>>(source) else { return };
        let poll = {
            let mut e = e.borrow_mut();
            e.stopped = true;
            e.poll.take()
        };
        if let Some(p) = poll {
            ring.cancel(p);
        }
    }

    pub(super) fn post(ring: &mut Ring, source: SourceId, event: [u8; 16]) {
        let Some(e) = ring.owned::<RefCell<EventQ>>(source) else { return };
        let mut e = e.borrow_mut();
        if e.pending.len() >= MAX_PENDING_EVENTS {
            e.missed = true;
        } else {
            e.pending.push_back(event);
        }
        e.deliver();
    }

    /// Hands pending events to the driver's buffers, as far as they go.
    pub(super) fn deliver(&mut self) {
        let mem = self.mem.clone();
        let mut signal = false;
        while !self.stopped && !self.pending.is_empty() {
            let Some(chain) = self.queue.pop_descriptor_chain(&*mem) else { break };
            let head = chain.head_index();
            let wr: Vec<(GuestAddress, usize)> = chain.filter(|d| d.is_write_only()).map(|d| (d.addr(), d.len() as usize)).collect();
            let mut used = 0u32;
            if total(&wr) >= 16 {
                let mut ev = self.pending.pop_front().unwrap_or_default();
                if self.missed {
                    let t = u32::from_le_bytes([ev[0], ev[1], ev[2], ev[3]]) | T_EVENTS_MISSED;
                    ev[0..4].copy_from_slice(&t.to_le_bytes());
                    self.missed = false;
                }
                if write_segs(&mem, &wr, &ev) {
                    used = 16;
                    if let Some(d) = &self.dirty {
                        for &(a, l) in &wr {
                            d.mark(a.0, l as u64);
                        }
                    }
                } else {
                    self.missed = true;
                }
            } else {
                log::debug!("virtio-scsi: event buffer {head} shorter than an event");
            }
            if self.queue.add_used(&*mem, head, used).is_err() {
                crate::warn_limited!("virtio-scsi: event queue: add_used failed");
                return;
            }
            if let Some(d) = &self.dirty {
                d.mark(self.queue.used_ring(), 6 + 8 * u64::from(self.queue.size()));
            }
            signal |= self.queue.needs_notification(&*mem).unwrap_or(true);
        }
        if self.event_idx {
            // Kick us when the driver posts more buffers.
            let _ = self.queue.enable_notification(&*mem);
        }
        if signal {
            if let Some(irq) = &self.irq {
                let _ = irq.write(1);
            }
        }
    }
}
