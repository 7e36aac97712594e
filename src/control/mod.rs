//! The control thread: one io_uring loop that serves the QMP sockets and
//! reacts to guest events. It owns the VM's run state, so every command
//! and event is handled in one place, in order, without locks. It never
//! waits on a client, and waits on vCPUs only for them to leave KVM_RUN
//! (which a kick guarantees, with a deadline).
//!
//! Layout: this file is the loop and the event fan-in (guest events, QMP
//! requests, signals, deadlines); [`runstate`] the run states;
//! [`signals`] the termination signals; `commands` the QMP command table
//! and its dispatch; `snapshot` the control side of a live snapshot;
//! `incoming` the control side of a restore.

use std::cell::Cell;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use ring::{Op, Ring};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::events::SnapshotStep;
use crate::events::VmEvent;
use crate::qmp::server::{ClientId, Limits, Server, Shared, QMP_SOURCE};
use crate::qmp::{self, reply_err, reply_ok, QmpError, Request};
use crate::snapshot::incoming::IncomingStatus;
use crate::snapshot::SaveState;
use crate::vmm::{Outcome, Vm};
use std::sync::Arc;

mod commands;
mod errors;
mod incoming;
mod runstate;
mod savejob;
mod signals;
mod snapshot;

pub use commands::COMMANDS;
use incoming::IncomingCtl;
pub use runstate::RunState;
pub use signals::block_term_signals;
use signals::{signalfd, term_signals_blocked};
use snapshot::SaveCtl;
pub use snapshot::{DEFAULT_DOWNTIME_MS, DEFAULT_FINAL_TIMEOUT_MS};

#[derive(Default)]
pub struct ControlOptions {
    /// QMP socket to serve.
    pub qmp: Option<PathBuf>,
    /// Start with the vCPUs paused (QEMU's -S).
    pub paused: bool,
    /// The VM's name (query-name).
    pub name: Option<String>,
    /// Wait for migrate-incoming (the VM was built without a kernel).
    pub incoming: bool,
    /// Figures for the caller (the demo).
    pub stats: Option<Arc<ControlStats>>,
    /// When set, state files named over QMP must be regular files (or new
    /// names) directly inside this directory, never symlinks, never nfs://.
    pub statefile_dir: Option<PathBuf>,
    /// How a restore brings guest RAM in (`--restore-ram`).
    pub restore_ram: crate::snapshot::restore::RamMode,
}

/// Figures the control loop records for whoever started it.
#[derive(Default)]
pub struct ControlStats {
    /// Microseconds from the start of a restore to the guest running.
    pub restore_us: std::sync::atomic::AtomicU64,
    /// RAM bytes the restore loaded.
    pub restore_bytes: std::sync::atomic::AtomicU64,
}

/// How long output to clients may take once the VM is finishing.
const FLUSH_DEADLINE: Duration = Duration::from_millis(500);
/// How long a snapshot cancelled by quit/SIGTERM may take to stop (its
/// writes already in the kernel drain first: on FUSE, one at a time).
const SHUTDOWN_CANCEL_DEADLINE: Duration = Duration::from_millis(900);
const RING_ENTRIES: u32 = 256;

pub struct Controller {
    vm: Vm,
    ring: Ring,
    qmp: Option<Shared>,
    state: RunState,
    name: Option<String>,
    statefile_dir: Option<PathBuf>,
    restore_ram: crate::snapshot::restore::RamMode,
    vm_event: Rc<Cell<bool>>,
    signal: Rc<Cell<Option<i32>>>,
    /// Set when the VM is finishing; the loop flushes clients, then ends.
    finishing: Option<Result<Outcome>>,
    _signalfd: Option<std::os::fd::OwnedFd>,
    save: SaveCtl,
    incoming: IncomingCtl,
    stats: Arc<ControlStats>,
    /// query-block's io-status of disks with held requests ("failed" or
    /// "nospace"); cleared by `cont` (which retries them) or a reset.
    io_status: std::collections::HashMap<String, &'static str>,
    migrate_params: snapshot::MigrateParams,
    /// Dirty tracking since a completed snapshot, for incremental ones.
    tracking: Option<snapshot::Tracking>,
}

impl Controller {
    pub fn new(mut vm: Vm, opts: ControlOptions) -> Result<Controller> {
        let pending = vm.take_pending_restore();
        let incoming = pending.is_some() || opts.incoming;
        let mut ring = Ring::new(RING_ENTRIES, None)?;
        let qmp = match &opts.qmp {
            Some(path) => {
                let s = Server::bind(path, Limits::default())?;
                Server::start(&s, &mut ring);
                Some(s)
            }
            None => None,
        };
        let vm_event = Rc::new(Cell::new(false));
        let flag = vm_event.clone();
        let efd = vm.events().eventfd().as_raw_fd();
        ring.submit(QMP_SOURCE, Op::Poll { fd: efd, events: libc::POLLIN as u32, multishot: true }, move |_, _| flag.set(true));
        let signal = Rc::new(Cell::new(None));
        let signalfd = if term_signals_blocked() {
            let sfd = signalfd()?;
            let (fd, sig) = (sfd.as_raw_fd(), signal.clone());
            ring.submit(QMP_SOURCE, Op::Poll { fd, events: libc::POLLIN as u32, multishot: true }, move |_, _| {
                let mut info = [0u8; 128];
                // SAFETY: reading one signalfd_siginfo (128 bytes) into a local buffer.
                let n = unsafe { libc::read(fd, info.as_mut_ptr().cast(), info.len()) };
                if n == 128 {
                    sig.set(Some(u32::from_ne_bytes([info[0], info[1], info[2], info[3]]) as i32));
                }
            });
            Some(sfd)
        } else {
            None
        };
        let mut c = Controller {
            vm,
            ring,
            qmp,
            state: if incoming {
                RunState::InMigrate
            } else if opts.paused {
                RunState::Prelaunch
            } else {
                RunState::Running
            },
            name: opts.name,
            statefile_dir: opts.statefile_dir.clone(),
            restore_ram: opts.restore_ram,
            vm_event,
            signal,
            finishing: None,
            _signalfd: signalfd,
            save: SaveCtl::default(),
            incoming: IncomingCtl { autostart: !opts.paused, ..Default::default() },
            stats: opts.stats.clone().unwrap_or_default(),
            io_status: Default::default(),
            migrate_params: Default::default(),
            tracking: None,
        };
        if let Some(p) = pending {
            c.incoming.fatal = true;
            c.start_load(p.path, p.checked, p.section, p.bases).map_err(Error::Config)?;
        }
        Ok(c)
    }

    pub fn state(&self) -> RunState {
        self.state
    }

    /// Runs until the guest exits, `quit`, a fatal error or a signal.
    pub fn run(mut self) -> Result<Outcome> {
        request_short_slice();
        crate::seccomp::apply(crate::seccomp::Role::Control).map_err(Error::Config)?;
        if self.state == RunState::Running {
            self.vm.vcpus().resume();
        }
        while self.finishing.is_none() {
            self.ring.run_once(true)?;
            if let Some(sig) = self.signal.take() {
                log::info!("signal {sig}: shutting down");
                self.broadcast("SHUTDOWN", Some(json!({"guest": false, "reason": "host-signal"})));
                self.finish(Ok(Outcome::Quit));
            }
            if let Some(attempt) = self.incoming.expired.take() {
                self.on_incoming_deadline(attempt);
            }
            if self.vm_event.take() {
                self.vm.events().clear();
                while let Some(ev) = self.vm.events().pop() {
                    self.on_vm_event(ev);
                    if self.finishing.is_some() {
                        break;
                    }
                }
            }
            let requests = self.qmp.as_ref().map(|s| s.borrow_mut().take_requests()).unwrap_or_default();
            for (client, req) in requests {
                self.on_request(client, req);
            }
        }
        // A snapshot still running is cancelled, as savevm-end would: its
        // writes stop, the half-written file is removed and any earlier
        // file at its name stays; the process does not wait out a slow
        // target (a stalled one keeps what it holds; the file's temporary
        // name marks it as never finished).
        if self.save.iothread.is_some() {
            if self.save.shared.get().state == SaveState::Active {
                self.cancel_snapshot(None);
            }
            // Its end is the Done event (other events no longer matter);
            // then its unfinished file is removed by the reaper.
            let deadline = Instant::now() + SHUTDOWN_CANCEL_DEADLINE;
            let mut done = false;
            while !done && Instant::now() < deadline {
                if self.ring.run_once(false).is_err() {
                    break;
                }
                if self.vm_event.take() {
                    self.vm.events().clear();
                    while let Some(ev) = self.vm.events().pop() {
                        done |= ev == VmEvent::Snapshot(SnapshotStep::Done);
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            if done {
                self.on_snapshot_step(SnapshotStep::Done);
            }
            if let Some(rx) = self.save.reaped.take() {
                let _ = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
            }
            if let Some(io) = self.save.iothread.take() {
                // Exiting: its thread ends with the process, unjoined.
                std::mem::forget(io);
            }
        }
        // Let replies and the last events reach the clients.
        let deadline = Instant::now() + FLUSH_DEADLINE;
        while self.qmp.as_ref().is_some_and(|s| !s.borrow().flushed()) && Instant::now() < deadline {
            if self.ring.run_once(true).is_err() {
                break;
            }
        }
        let result = self.finishing.take().unwrap_or(Ok(Outcome::Quit));
        drop(self.qmp.take());
        self.vm.shutdown();
        result
    }

    fn finish(&mut self, r: Result<Outcome>) {
        if self.finishing.is_none() {
            if r.is_ok() {
                self.state = RunState::Shutdown;
            }
            self.finishing = Some(r);
        }
    }

    fn broadcast(&mut self, name: &str, data: Option<Value>) {
        if let Some(s) = &self.qmp {
            Server::broadcast(s, &mut self.ring, &qmp::event(name, data));
        }
    }

    fn on_vm_event(&mut self, ev: VmEvent) {
        if self.state == RunState::FinishMigrate && matches!(ev, VmEvent::Reset | VmEvent::TripleFault { .. } | VmEvent::BlockIoError { .. }) {
            // Not while a snapshot's final phase holds the vCPUs: the RAM
            // being written and the state about to be captured must match.
            self.save.deferred.push(ev);
            return;
        }
        let guest_reset = json!({"guest": true, "reason": "guest-reset"});
        match ev {
            VmEvent::Exit(code) => {
                self.broadcast("SHUTDOWN", Some(json!({"guest": true, "reason": "guest-shutdown"})));
                self.finish(Ok(Outcome::GuestExit(code)));
            }
            VmEvent::Shutdown => {
                self.broadcast("SHUTDOWN", Some(json!({"guest": true, "reason": "guest-shutdown"})));
                self.finish(Ok(Outcome::Shutdown));
            }
            VmEvent::Reset if self.vm.no_reboot() => {
                self.broadcast("SHUTDOWN", Some(guest_reset));
                self.finish(Ok(Outcome::Reset));
            }
            VmEvent::Reset => {
                log::info!("guest reset");
                self.guest_reset(guest_reset);
            }
            VmEvent::TripleFault { cpu, at } if self.vm.no_reboot() => {
                self.fatal(Error::Vcpu { cpu, what: format!("guest triple fault (KVM_EXIT_SHUTDOWN) at {at}") });
            }
            VmEvent::TripleFault { cpu, at } => {
                log::warn!("vcpu{cpu}: guest triple fault at {at}; resetting");
                self.guest_reset(guest_reset);
            }
            VmEvent::Error(msg) => {
                // A vCPU's EFAULT from RAM mapped from a state file that
                // shrank: say which file, not just "Bad address".
                let msg = match crate::snapshot::mapguard::explain() {
                    Some(why) => format!("{msg}: {why}"),
                    None => msg,
                };
                self.fatal(Error::Config(msg))
            }
            VmEvent::Snapshot(step) => self.on_snapshot_step(step),
            VmEvent::Restored(r) => self.on_restored(r),
            VmEvent::DeviceDeleted(id) => {
                let path = format!("/machine/peripheral/{id}");
                self.broadcast("DEVICE_DELETED", Some(json!({"device": id, "path": path})));
            }
            VmEvent::IncomingOpened(attempt) => self.on_incoming_opened(attempt),
            VmEvent::BlockIoError { device, write, errno } => self.on_block_io_error(device, write, errno),
            VmEvent::Streamed(bytes) => {
                self.stats.restore_bytes.store(bytes, std::sync::atomic::Ordering::Relaxed);
                self.incoming.status = IncomingStatus::Completed;
                self.broadcast("MIGRATION", Some(json!({"status": "completed"})));
            }
        }
    }

    /// A guest-initiated reset (i8042, triple fault): RESET, then the VM
    /// back to power-on state, running if it was.
    /// A disk request is held by a `stop` policy: tell the clients
    /// (BLOCK_IO_ERROR, as QEMU) and stop the guest until `cont`.
    fn on_block_io_error(&mut self, device: String, write: bool, errno: i32) {
        let nospace = errno == libc::ENOSPC || errno == libc::EDQUOT;
        let reason = std::io::Error::from_raw_os_error(errno).to_string();
        if self.io_status.insert(device.clone(), if nospace { "nospace" } else { "failed" }).is_none() {
            log::warn!("{device}: {} error ({reason}); the VM stops until `cont` retries it", if write { "write" } else { "read" });
        }
        self.broadcast(
            "BLOCK_IO_ERROR",
            Some(json!({"device": "", "node-name": device, "operation": if write { "write" } else { "read" }, "action": "stop", "nospace": nospace, "reason": reason})),
        );
        if self.state == RunState::Running {
            match self.vm.vcpus().pause() {
                Ok(()) => {
                    self.state = RunState::IoError;
                    self.broadcast("STOP", None);
                }
                Err(e) => log::error!("cannot stop the vCPUs after a disk error: {e}"),
            }
        }
    }

    fn guest_reset(&mut self, data: Value) {
        // A device reset drops the held requests with the queues.
        self.io_status.clear();
        self.end_tracking("the guest reset");
        self.broadcast("RESET", Some(data));
        let resume = self.state == RunState::Running;
        match self.vm.reset(resume) {
            Ok(w) => self.snapshot_memory_rewritten(w),
            Err(e) => self.fatal(e),
        }
    }

    fn fatal(&mut self, e: Error) {
        self.state = RunState::InternalError;
        self.broadcast("SHUTDOWN", Some(json!({"guest": false, "reason": "host-error"})));
        self.finish(Err(e));
    }

    fn reply(&mut self, client: ClientId, id: Option<&Value>, r: std::result::Result<Value, QmpError>) {
        let bytes = match r {
            Ok(v) => reply_ok(v, id),
            Err(e) => reply_err(&e, id),
        };
        if let Some(s) = &self.qmp {
            Server::send(s, &mut self.ring, client, bytes);
        }
    }

    fn on_request(&mut self, client: ClientId, req: Request) {
        if let Some(w) = &mut self.incoming.waiting {
            if w.client == client {
                w.held.push_back(req);
                return;
            }
        }
        let r = match COMMANDS.iter().find(|c| c.name == req.execute) {
            None => Err(QmpError::not_found(format!("The command {} has not been found", req.execute))),
            Some(cmd) => match qmp::check_args(&req.arguments, cmd.args) {
                Err(e) => Err(e),
                Ok(()) => match cmd.run {
                    commands::Run::Now(run) => run(self, &req),
                    // Answered later (see migrate_incoming).
                    commands::Run::Deferred(run) => match run(self, client, &req) {
                        None => return,
                        Some(r) => r,
                    },
                },
            },
        };
        self.reply(client, req.id.as_ref(), r);
    }
}

/// Asks the scheduler for a short time slice (100 us) for the calling
/// thread, the control thread. Since Linux 6.12 a fair-class task that asked
/// for a shorter slice preempts the running one when it wakes; without it a
/// woken QMP request could wait out the slice of a bulk thread on the same
/// CPU (a restore's loader: niced, but left to run to parity). Older kernels
/// ignore the field; no privilege is needed. Best effort. Threads the
/// control thread starts later (a snapshot's iothread, a deferred restore's
/// loader) get the default slice back (SCHED_FLAG_RESET_ON_FORK).
/// Once per thread: a second VM run on the same thread (the demo's
/// restore) finds its seccomp filter in place, and this call is not in it.
fn request_short_slice() {
    thread_local! {
        static ASKED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    if ASKED.with(|a| a.replace(true)) {
        return;
    }
    // struct sched_attr (include/uapi/linux/sched/types.h), SCHED_ATTR_SIZE_VER1.
    #[repr(C)]
    #[derive(Default)]
    struct SchedAttr {
        size: u32,
        policy: u32,
        flags: u64,
        nice: i32,
        priority: u32,
        runtime: u64,
        deadline: u64,
        period: u64,
        util_min: u32,
        util_max: u32,
    }
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        policy: libc::SCHED_OTHER as u32,
        flags: 1, /* SCHED_FLAG_RESET_ON_FORK */
        runtime: 100_000,
        ..Default::default()
    };
    // SAFETY: sched_setattr on the calling thread (pid 0) with a fully
    // initialised attribute of the size it declares; the kernel only reads it.
    let r = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0u32) };
    if r != 0 {
        log::debug!("sched_setattr (short slice): {}", std::io::Error::last_os_error());
    }
}
