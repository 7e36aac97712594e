//! `IoThread`: a named thread running one ring; `Remote`: how other
//! threads hand it work without ever blocking on its progress.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use crate::event::Event;
use crate::ring::{Ring, RingOptions, RingStats, SourceId};
use crate::{Error, Result};

type Task = Box<dyn FnOnce(&mut Ring) + Send>;

/// Resolves when a source has nothing in flight on its iothread.
pub struct QuiesceWaiter(Arc<Event>);

impl QuiesceWaiter {
    /// Waits for the iothread's signal; an error at the deadline.
    pub fn wait(&self, timeout: Duration) -> Result<()> {
        if self.0.wait(timeout) {
            Ok(())
        } else {
            Err(Error::Timeout(timeout, "a source to quiesce"))
        }
    }
}

struct Shared {
    name: String,
    tasks: Mutex<VecDeque<Task>>,
    wake: EventFd,
    stopping: AtomicBool,
}

/// Sends work to an iothread. Cloneable, usable from any thread; sending
/// takes a short queue lock and writes an eventfd, never waits on the loop.
#[derive(Clone)]
pub struct Remote(Arc<Shared>);

impl Remote {
    /// Runs `f` on the iothread with its ring.
    pub fn send(&self, f: impl FnOnce(&mut Ring) + Send + 'static) -> Result<()> {
        if self.0.stopping.load(Ordering::Acquire) {
            return Err(Error::Stopped(self.0.name.clone()));
        }
        self.0.tasks.lock().unwrap_or_else(|e| e.into_inner()).push_back(Box::new(f));
        self.0.wake.write(1).map_err(Error::EventFd)
    }

    /// Asks the iothread to signal once `source` has no operation in flight.
    /// The caller waits on the returned event; it never touches the ring.
    pub fn quiesce(&self, source: SourceId) -> Result<QuiesceWaiter> {
        let ev = Arc::new(Event::default());
        let e = ev.clone();
        self.send(move |ring| ring.on_quiesced(source, e))?;
        Ok(QuiesceWaiter(ev))
    }

    pub fn name(&self) -> &str {
        &self.0.name
    }
}

/// A named thread that owns one io_uring. Stops (draining or cancelling
/// everything) and joins on drop.
pub struct IoThread {
    remote: Remote,
    handle: Option<JoinHandle<RingStats>>,
}

/// How long stop waits for cancelled operations to come back.
const STOP_DEADLINE: Duration = Duration::from_secs(10);

impl IoThread {
    /// Spawns `name` with a restricted ring of `entries` SQEs (only the
    /// opcodes ringvm uses); fails if the ring cannot be set up (missing
    /// opcodes or features are reported by name).
    pub fn spawn(name: &str, entries: u32) -> Result<IoThread> {
        IoThread::spawn_with(name, RingOptions::new(entries).restricted())
    }

    /// Spawns `name` with a ring set up by `opts` (its wake fd is the
    /// thread's own).
    pub fn spawn_with(name: &str, opts: RingOptions) -> Result<IoThread> {
        let shared = Arc::new(Shared {
            name: name.to_string(),
            tasks: Mutex::new(VecDeque::new()),
            wake: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(Error::EventFd)?,
            stopping: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::channel::<Result<()>>();
        let s = shared.clone();
        let handle = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let opts = RingOptions { wake_fd: Some(s.wake.as_raw_fd()), ..opts };
                let mut ring = match Ring::with_options(opts) {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return RingStats::default();
                    }
                };
                let _ = tx.send(Ok(()));
                event_loop(&s, &mut ring);
                ring.stats()
            })
            .map_err(|source| Error::Spawn { name: name.to_string(), source })?;
        match rx.recv() {
            Ok(Ok(())) => Ok(IoThread { remote: Remote(shared), handle: Some(handle) }),
            Ok(Err(e)) => {
                let _ = handle.join();
                Err(e)
            }
            Err(_) => {
                let _ = handle.join();
                Err(Error::Stopped(name.to_string()))
            }
        }
    }

    pub fn remote(&self) -> Remote {
        self.remote.clone()
    }

    /// Stops the loop: queued tasks still run, in-flight operations are
    /// cancelled and reaped, then the thread is joined.
    pub fn stop(&mut self) -> RingStats {
        self.remote.0.stopping.store(true, Ordering::Release);
        let _ = self.remote.0.wake.write(1);
        self.handle.take().and_then(|h| h.join().ok()).unwrap_or_default()
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        if self.handle.is_some() {
            self.stop();
        }
    }
}

fn event_loop(s: &Shared, ring: &mut Ring) {
    loop {
        // Tasks first: they may have been queued before the ring was armed.
        loop {
            let task = s.tasks.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
            match task {
                Some(t) => t(ring),
                None => break,
            }
        }
        if s.stopping.load(Ordering::Acquire) {
            if !ring.shutdown(STOP_DEADLINE) {
                log::error!("iothread {}: operations still in the kernel at stop", s.name);
            }
            return;
        }
        if let Err(e) = ring.run_once(true) {
            log::error!("iothread {}: {e}", s.name);
            std::thread::sleep(Duration::from_millis(1));
        }
        ring.take_woken();
    }
}
