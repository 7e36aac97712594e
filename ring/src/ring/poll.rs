//! Pollers, sleep checks and the poll window: looking for work before
//! the thread sleeps.

use std::time::Instant;

use super::{preemptions, Poller, Ring, SourceId, POLL_BACKOFF};

impl Ring {
    /// Adds a poller for `source`, run while this ring polls (only rings
    /// with a poll window poll; see [`RingOptions::poll`]).
    pub fn add_poller(&mut self, source: SourceId, p: impl FnMut(&mut Ring) -> bool + 'static) {
        self.pollers.push((source, Box::new(p)));
    }

    /// Adds a check for `source` that runs every time, just before this
    /// thread would block waiting for completions: it arms whatever wakes
    /// the thread for that source (a virtqueue's notifications, say), looks
    /// once more for work, does it, and says whether it found any (the
    /// thread then does not block). With it, a source may leave its
    /// wake-ups off while the thread is awake: the thread always comes back
    /// here before it sleeps.
    pub fn add_sleep_check(&mut self, source: SourceId, p: impl FnMut(&mut Ring) -> bool + 'static) {
        self.sleep_checks.push((source, Box::new(p)));
    }

    /// Removes `source`'s pollers and sleep checks (also from inside one).
    pub fn remove_pollers(&mut self, source: SourceId) {
        self.pollers.retain(|(s, _)| *s != source);
        self.sleep_checks.retain(|(s, _)| *s != source);
        if self.polling {
            self.unpolled.push(source);
        }
    }

    /// Runs every poller once; whether any found work.
    pub(super) fn run_pollers(&mut self) -> bool {
        self.run_checks(false)
    }

    /// Runs every poller (or every sleep check) once; whether any found work.
    pub(super) fn run_checks(&mut self, sleep: bool) -> bool {
        let mut ps = std::mem::take(self.checks(sleep));
        self.polling = true;
        let mut found = false;
        for (source, p) in ps.iter_mut() {
            if !self.unpolled.contains(source) {
                found |= p(self);
            }
        }
        self.polling = false;
        let gone = std::mem::take(&mut self.unpolled);
        ps.retain(|(s, _)| !gone.contains(s));
        // Checks added while these ran (the other list was pruned by
        // remove_pollers itself).
        ps.append(self.checks(sleep));
        *self.checks(sleep) = ps;
        found
    }

    pub(super) fn checks(&mut self, sleep: bool) -> &mut Vec<(SourceId, Poller)> {
        if sleep {
            &mut self.sleep_checks
        } else {
            &mut self.pollers
        }
    }

    /// Spins for up to the poll window, having submitted what is queued,
    /// letting the kernel post completions (with DEFER_TASKRUN it does so
    /// only when asked), and running the pollers. True as soon as a
    /// completion is ready or a poller did work.
    pub(super) fn poll_window(&mut self) -> bool {
        let start = Instant::now();
        if self.poll_paused_until.is_some_and(|t| start < t) {
            return false;
        }
        self.poll_paused_until = None;
        let deadline = start + self.poll;
        let before = preemptions();
        // What is queued goes in once: nothing else is queued while
        // spinning (a poller that queues work ends the window).
        let _ = self.uring.submit();
        let found = loop {
            // SAFETY: io_uring_enter on our own ring with no submissions,
            // no wait and no signal mask: it only runs deferred completion
            // work (IORING_ENTER_GETEVENTS = 1).
            let _ = unsafe { self.uring.submitter().enter::<libc::sigset_t>(0, 0, 1, None) };
            if !self.uring.completion().is_empty() || self.run_pollers() {
                self.stats.poll_hits += 1;
                break true;
            }
            if Instant::now() >= deadline {
                self.stats.poll_misses += 1;
                break false;
            }
            std::hint::spin_loop();
        };
        // One preemption can be anyone's; several in the last 16 windows
        // mean the CPUs are oversubscribed.
        self.poll_preempted = (self.poll_preempted << 1) | u16::from(preemptions() > before);
        if self.poll_preempted.count_ones() >= 4 {
            self.stats.poll_backoffs += 1;
            self.poll_preempted = 0;
            self.poll_paused_until = Some(Instant::now() + POLL_BACKOFF);
        }
        found
    }
}
