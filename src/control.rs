//! The control thread: one io_uring loop that serves the QMP sockets and
//! reacts to guest events. It owns the VM's run state, so every command
//! and event is handled in one place, in order, without locks. It never
//! waits on a client, and waits on vCPUs only for them to leave KVM_RUN
//! (which a kick guarantees, with a deadline).

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
use crate::qmp::{self, opt, reply_err, reply_ok, req, ArgType, CommandSpec, QmpError, Request};
use crate::snapshot::incoming::{self, IncomingStatus};
use crate::snapshot::{format, save, SaveShared, SaveState, StateSection};
use crate::vmm::{Outcome, Vm};
use std::sync::Arc;

/// QEMU's run states (qapi/run-state.json) that ringvm can be in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    Prelaunch,
    Running,
    Paused,
    Shutdown,
    InternalError,
    InMigrate,
    PostMigrate,
    FinishMigrate,
    SaveVm,
    RestoreVm,
    /// Stopped by a disk error under a `stop` policy (QEMU's io-error).
    IoError,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Prelaunch => "prelaunch",
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Shutdown => "shutdown",
            RunState::InternalError => "internal-error",
            RunState::InMigrate => "inmigrate",
            RunState::PostMigrate => "postmigrate",
            RunState::FinishMigrate => "finish-migrate",
            RunState::SaveVm => "save-vm",
            RunState::RestoreVm => "restore-vm",
            RunState::IoError => "io-error",
        }
    }
}

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

/// Every command ringvm implements, with its arguments. `query-commands`
/// lists exactly these.
pub const COMMANDS: &[CommandSpec] = &[
    CommandSpec { name: "qmp_capabilities", args: &[opt("enable", ArgType::Array)] },
    CommandSpec { name: "query-version", args: &[] },
    CommandSpec { name: "query-commands", args: &[] },
    CommandSpec { name: "query-status", args: &[] },
    CommandSpec { name: "query-name", args: &[] },
    CommandSpec { name: "query-kvm", args: &[] },
    CommandSpec { name: "query-cpus-fast", args: &[] },
    CommandSpec { name: "stop", args: &[] },
    CommandSpec { name: "cont", args: &[] },
    CommandSpec { name: "system_reset", args: &[] },
    CommandSpec { name: "system_powerdown", args: &[] },
    CommandSpec { name: "quit", args: &[] },
    CommandSpec { name: "query-block", args: &[] },
    CommandSpec { name: "device_del", args: &[req("id", ArgType::Str)] },
    CommandSpec {
        name: "savevm-start",
        args: &[req("statefile", ArgType::Str), opt("downtime-ms", ArgType::Number), opt("final-timeout-ms", ArgType::Number), opt("disks", ArgType::Str)],
    },
    CommandSpec { name: "query-savevm", args: &[] },
    CommandSpec { name: "savevm-end", args: &[] },
    CommandSpec { name: "migrate", args: &[req("uri", ArgType::Str), opt("detach", ArgType::Bool), opt("resume", ArgType::Bool)] },
    CommandSpec { name: "query-migrate", args: &[] },
    CommandSpec { name: "migrate_cancel", args: &[] },
    CommandSpec { name: "migrate-incoming", args: &[req("uri", ArgType::Str)] },
    CommandSpec { name: "human-monitor-command", args: &[req("command-line", ArgType::Str), opt("cpu-index", ArgType::Int)] },
];

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
}

/// An incoming state (restore): loader progress and outcome.
#[derive(Default)]
struct IncomingCtl {
    /// Waiting for RAM: the parsed state to apply once it is in.
    section: Option<crate::snapshot::StateSection>,
    path: Option<std::path::PathBuf>,
    progress: Arc<std::sync::atomic::AtomicU64>,
    total: u64,
    started: Option<Instant>,
    status: IncomingStatus,
    error: Option<String>,
    /// Run the guest when the load completes (no -S).
    autostart: bool,
    /// --loadstate: a failed load ends ringvm with status 1.
    fatal: bool,
    /// migrate-incoming's file is being opened off this thread: the client
    /// waiting for the reply, and its other requests held until then (QMP
    /// answers one client's commands in order).
    waiting: Option<Waiting>,
    /// The opener's result, tagged with its attempt.
    opened: incoming::Slot,
    attempt: u64,
    /// Set by the ring's timer when attempt N's deadline passed.
    expired: Rc<Cell<Option<u64>>>,
}

struct Waiting {
    client: ClientId,
    id: Option<Value>,
    held: std::collections::VecDeque<Request>,
    timer: ring::OpId,
}

/// How long migrate-incoming waits for its file to be opened and checked
/// before answering with an error (the file's filesystem does not answer).
const INCOMING_OPEN_DEADLINE: Duration = Duration::from_secs(30);

/// The control thread's side of a running snapshot.
#[derive(Default)]
struct SaveCtl {
    shared: Arc<SaveShared>,
    iothread: Option<ring::IoThread>,
    /// The vCPUs were paused by the snapshot's final phase.
    paused_by_us: bool,
    /// The state to return to after the final phase.
    resume_to: Option<RunState>,
    pause_started: Option<Instant>,
    /// Guest events that arrived during the final pause.
    deferred: Vec<VmEvent>,
    /// (disk, reflink) pairs to take during the final pause.
    clones: Vec<(String, String)>,
    /// Says when the reaper removed an ended snapshot's unfinished file.
    reaped: Option<std::sync::mpsc::Receiver<()>>,
}

/// Default downtime target (ms) for the final pause.
pub const DEFAULT_DOWNTIME_MS: f64 = 5.0;
/// How long the final pause may take before the snapshot gives up and the
/// guest resumes (`final-timeout-ms`).
pub const DEFAULT_FINAL_TIMEOUT_MS: f64 = 10_000.0;

/// Signals that end the VM gracefully (QEMU: SHUTDOWN, reason host-signal).
const TERM_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// Blocks the termination signals in the calling thread, so threads created
/// afterwards inherit the mask and the controller takes them from a
/// signalfd. Call it first thing in main.
pub fn block_term_signals() -> Result<()> {
    // SAFETY: sigset manipulation on a local set, then pthread_sigmask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in TERM_SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(Error::Io(std::io::Error::from_raw_os_error(rc)));
        }
    }
    Ok(())
}

fn signalfd() -> Result<std::os::fd::OwnedFd> {
    // SAFETY: builds a local sigset and creates a new signalfd; the result
    // is checked and owned at once.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in TERM_SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
        if fd < 0 {
            return Err(Error::Io(std::io::Error::last_os_error()));
        }
        Ok(<std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd))
    }
}

fn term_signals_blocked() -> bool {
    // SAFETY: queries this thread's mask into a local set.
    unsafe {
        let mut cur: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut cur) == 0 && libc::sigismember(&cur, libc::SIGTERM) == 1
    }
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
        };
        if let Some(p) = pending {
            c.incoming.fatal = true;
            c.start_load(p.path, p.checked, p.section).map_err(Error::Config)?;
        }
        Ok(c)
    }

    /// Starts the loader thread; the control loop keeps serving QMP.
    fn start_load(&mut self, path: std::path::PathBuf, checked: format::Checked, section: StateSection) -> std::result::Result<(), String> {
        let total = crate::snapshot::restore::present_bytes(&checked);
        let events = self.vm.events().clone();
        let shown = path.display().to_string();
        if self.restore_ram == crate::snapshot::restore::RamMode::Lazy {
            let ev2 = events.clone();
            crate::snapshot::lazy::spawn(
                &path,
                &checked,
                &self.vm.machine().mem,
                self.incoming.progress.clone(),
                move |r| events.push(VmEvent::Restored(r.map(|s| s.bytes).map_err(|e| format!("state file {shown}: {e}")))),
                move |s| ev2.push(VmEvent::Streamed(s.bytes)),
            )
        } else {
            crate::snapshot::restore::spawn_loader(&path, &checked, &self.vm.machine().mem, self.restore_ram, self.incoming.progress.clone(), move |r| {
                events.push(VmEvent::Restored(r.map(|s| s.bytes).map_err(|e| format!("state file {shown}: {e}"))));
            })
        }
        .map_err(|e| format!("state file {}: {e}", path.display()))?;
        self.incoming.section = Some(section);
        self.incoming.path = Some(path);
        self.incoming.total = total;
        self.incoming.started = Some(Instant::now());
        self.incoming.status = IncomingStatus::Active;
        self.state = RunState::InMigrate;
        Ok(())
    }

    fn on_restored(&mut self, r: std::result::Result<u64, String>) {
        let r = r.and_then(|bytes| {
            let section = self.incoming.section.take().ok_or("no state to apply")?;
            self.vm
                .apply_state(section)
                .map_err(|e| format!("state file {}: {e}", self.incoming.path.as_ref().map(|p| p.display().to_string()).unwrap_or_default()))?;
            Ok(bytes)
        });
        match r {
            Ok(bytes) => {
                let ms = self.incoming.started.map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3);
                self.stats.restore_us.store((ms * 1e3) as u64, std::sync::atomic::Ordering::Relaxed);
                if self.restore_ram == crate::snapshot::restore::RamMode::Lazy {
                    // QEMU's postcopy spelling: running, RAM still coming.
                    log::info!("lazy restore: state applied in {ms:.1} ms, RAM follows");
                    self.incoming.status = IncomingStatus::PostcopyActive;
                    self.broadcast("MIGRATION", Some(json!({"status": "postcopy-active"})));
                } else {
                    log::info!("restored {} MiB of RAM in {ms:.1} ms", bytes >> 20);
                    self.stats.restore_bytes.store(bytes, std::sync::atomic::Ordering::Relaxed);
                    self.incoming.status = IncomingStatus::Completed;
                    self.broadcast("MIGRATION", Some(json!({"status": "completed"})));
                }
                if self.incoming.autostart {
                    self.vm.vcpus().resume();
                    self.state = RunState::Running;
                    self.broadcast("RESUME", None);
                } else {
                    self.state = RunState::Paused;
                }
            }
            Err(e) => {
                if !self.incoming.fatal {
                    log::warn!("{e}");
                }
                self.incoming.status = IncomingStatus::Failed;
                self.incoming.error = Some(e.clone());
                self.broadcast("MIGRATION", Some(json!({"status": "failed", "error": e})));
                if self.incoming.fatal {
                    self.finish(Err(Error::Config(e)));
                }
            }
        }
    }

    /// `migrate-incoming`: the file is opened and checked on another
    /// thread (its filesystem may take any time); the reply goes out when
    /// that is done, or as an error at [`INCOMING_OPEN_DEADLINE`].
    fn migrate_incoming(&mut self, client: ClientId, req: &Request) -> Option<std::result::Result<Value, QmpError>> {
        if self.state != RunState::InMigrate || self.incoming.status != IncomingStatus::None {
            let why = if self.incoming.status == IncomingStatus::Setup {
                "a migrate-incoming is already opening its file"
            } else {
                "migrate-incoming is only possible once, on a VM started with --incoming defer"
            };
            return Some(Err(QmpError::generic(why)));
        }
        let uri = req.arguments.get("uri").and_then(Value::as_str).unwrap_or_default();
        let Some(path) = uri.strip_prefix("file:").or(crate::nfs::is_uri(uri).then_some(uri)) else {
            return Some(Err(QmpError::generic(format!("Invalid URI '{uri}': ringvm loads from file:PATH or nfs://SERVER/EXPORT/FILE"))));
        };
        if let Err(e) = self.check_statefile(path) {
            return Some(Err(e));
        }
        let target = incoming::Target {
            cpus: self.vm.cpus(),
            mem_size: self.vm.machine().mem_size,
            disks: self.vm.disks_in_order().into_iter().map(|b| b.path).collect(),
            media: self.vm.disks_in_order().into_iter().map(|b| (b.size, b.readonly)).collect(),
            boot: self.vm.given_boot(),
        };
        self.incoming.attempt += 1;
        let attempt = self.incoming.attempt;
        let path = std::path::PathBuf::from(path);
        if let Err(e) = incoming::spawn_open(path.clone(), target, attempt, self.incoming.opened.clone(), self.vm.events().clone()) {
            return Some(Err(QmpError::generic(format!("state file {}: cannot start its opener thread: {e}", path.display()))));
        }
        let expired = self.incoming.expired.clone();
        let timer = self.ring.submit(QMP_SOURCE, Op::Timeout { after: INCOMING_OPEN_DEADLINE }, move |_, _| expired.set(Some(attempt)));
        self.incoming.status = IncomingStatus::Setup;
        self.incoming.path = Some(path);
        self.incoming.started = Some(Instant::now());
        self.incoming.waiting = Some(Waiting { client, id: req.id.clone(), held: Default::default(), timer });
        None
    }

    /// The opener of attempt `attempt` is done: start the load and answer.
    fn on_incoming_opened(&mut self, attempt: u64) {
        let taken = self.incoming.opened.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some((n, r)) = taken else { return };
        if n != attempt || attempt != self.incoming.attempt || self.incoming.status != IncomingStatus::Setup {
            // A late answer for an attempt that already timed out.
            return;
        }
        let r = r.and_then(|o| {
            self.vm.adopt_boot(&o.checked.header.machine);
            self.start_load(o.path, o.checked, o.section)
        });
        if r.is_err() {
            self.incoming.status = IncomingStatus::None;
        }
        self.answer_incoming(r.map(|()| json!({})).map_err(QmpError::generic));
    }

    /// The deadline of the open in progress passed.
    fn on_incoming_deadline(&mut self, attempt: u64) {
        if attempt != self.incoming.attempt || self.incoming.status != IncomingStatus::Setup {
            return;
        }
        let path = self.incoming.path.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        log::warn!("state file {path}: not opened and checked within {} s; migrate-incoming gives up on it", INCOMING_OPEN_DEADLINE.as_secs());
        // The opener thread is left to its fate; its late answer is ignored.
        self.incoming.attempt += 1;
        self.incoming.status = IncomingStatus::None;
        self.answer_incoming(Err(QmpError::generic(format!(
            "state file {path}: no answer from its filesystem within {} s (the file was not loaded; the VM still waits for migrate-incoming)",
            INCOMING_OPEN_DEADLINE.as_secs()
        ))));
    }

    /// Sends migrate-incoming's deferred reply, then the client's held
    /// requests in order.
    fn answer_incoming(&mut self, r: std::result::Result<Value, QmpError>) {
        let Some(w) = self.incoming.waiting.take() else { return };
        self.ring.cancel(w.timer);
        self.reply(w.client, w.id.as_ref(), r);
        let mut held = w.held;
        while let Some(req) = held.pop_front() {
            self.on_request(w.client, req);
            if let Some(w2) = &mut self.incoming.waiting {
                // Another deferred command: the rest waits for it.
                w2.held.extend(held.drain(..));
            }
        }
    }

    /// `device_del id=scsiC-lunL`: new requests find no LUN at once; when
    /// the disk's requests in flight have finished, the file is closed,
    /// the guest is told (a virtio-scsi hotplug event) and clients get
    /// DEVICE_DELETED.
    fn device_del(&mut self, req: &Request) -> std::result::Result<Value, QmpError> {
        let id = req.arguments.get("id").and_then(Value::as_str).unwrap_or_default().to_string();
        if !self.vm.blocks().iter().any(|b| b.device == id && !b.removed) {
            return Err(QmpError { class: crate::qmp::ErrorClass::DeviceNotFound, desc: format!("Device '{id}' not found") });
        }
        // A snapshot lists the disks when it starts and pauses them at its
        // end; a restore rebuilds the LUNs from the file.
        if self.save.shared.get().state == SaveState::Active || self.save.iothread.is_some() {
            return Err(QmpError::generic(format!("device_del {id}: a snapshot is running; retry when it has ended (savevm-end)")));
        }
        if matches!(self.state, RunState::InMigrate | RunState::FinishMigrate) {
            return Err(QmpError::generic(format!("device_del {id}: not while the VM is in state '{}'", self.state.as_str())));
        }
        // As in QEMU, the command returns once the unplug is under way;
        // DEVICE_DELETED says when it is done (the LUN's requests finished,
        // its file closed). The control loop never waits for it.
        let events = self.vm.events().clone();
        let name = id.clone();
        self.vm.unplug_disk(&id, move || events.push(VmEvent::DeviceDeleted(name))).map_err(QmpError::generic)?;
        Ok(json!({}))
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

    /// The `--statefile-dir` policy for a state file named over QMP.
    fn check_statefile(&self, path: &str) -> std::result::Result<(), QmpError> {
        let Some(dir) = &self.statefile_dir else { return Ok(()) };
        let refuse = |why: &str| Err(QmpError::generic(format!("statefile {path}: {why} (--statefile-dir {})", dir.display())));
        if crate::nfs::is_uri(path) {
            return refuse("only files inside the state-file directory are allowed");
        }
        let p = std::path::Path::new(path);
        let (Some(parent), Some(_)) = (p.parent(), p.file_name()) else { return refuse("not a file name") };
        let inside = match (std::fs::canonicalize(parent), std::fs::canonicalize(dir)) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        if !inside {
            return refuse("not directly inside the state-file directory");
        }
        match std::fs::symlink_metadata(p) {
            Ok(m) if !m.file_type().is_file() => refuse("exists and is not a regular file (symlinks are refused)"),
            _ => Ok(()),
        }
    }

    fn savevm_start(&mut self, req: &Request) -> std::result::Result<Value, QmpError> {
        if self.save.shared.get().state == SaveState::Active || self.save.iothread.is_some() {
            return Err(QmpError::generic("a snapshot is already running; wait for it to finish or call savevm-end"));
        }
        if !matches!(self.state, RunState::Running | RunState::Paused) {
            return Err(QmpError::generic(format!("cannot snapshot a VM in state '{}'", self.state.as_str())));
        }
        if self.incoming.status == IncomingStatus::PostcopyActive {
            let from = self.incoming.path.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
            return Err(QmpError::generic(format!("the lazy restore from {from} is still loading RAM; snapshot once query-migrate says completed")));
        }
        let path = req.arguments.get("statefile").and_then(Value::as_str).unwrap_or_default().to_string();
        if path.is_empty() {
            return Err(QmpError::generic("Parameter 'statefile' must not be empty"));
        }
        self.check_statefile(&path)?;
        let downtime = req.arguments.get("downtime-ms").and_then(Value::as_f64).unwrap_or(DEFAULT_DOWNTIME_MS);
        if !(0.0..=60_000.0).contains(&downtime) {
            return Err(QmpError::generic("Parameter 'downtime-ms' must be between 0 and 60000"));
        }
        let final_timeout = req.arguments.get("final-timeout-ms").and_then(Value::as_f64).unwrap_or(DEFAULT_FINAL_TIMEOUT_MS);
        if !(1.0..=600_000.0).contains(&final_timeout) {
            return Err(QmpError::generic("Parameter 'final-timeout-ms' must be between 1 and 600000"));
        }
        let machine = self.vm.machine();
        let slots = machine.slots();
        let ram: Vec<(u64, u64)> = slots.iter().map(|&(_, g, s)| (g, s)).collect();
        let boot = self.vm.boot_spec();
        let blocks = self.vm.disks_in_order();
        // "disks": "clone": each disk is reflinked next to the state file
        // during the final pause, so the disks match the RAM. Tried once
        // now: a filesystem without reflink fails here, before anything runs.
        let clones: Vec<(String, String)> = match req.arguments.get("disks").and_then(Value::as_str) {
            None => Vec::new(),
            Some("clone") if crate::nfs::is_uri(&path) => {
                return Err(QmpError::generic("disks=clone reflinks the disks next to the state file: it needs a local statefile, not nfs://"));
            }
            Some("clone") => {
                let c: Vec<(String, String)> = blocks.iter().filter(|b| !b.removed).map(|b| (b.path.clone(), format!("{path}.disk{}", b.index))).collect();
                for (src, dst) in &c {
                    crate::disk::reflink(src, dst).map_err(|e| QmpError::generic(format!("disks=clone: {e}")))?;
                }
                c
            }
            Some(other) => return Err(QmpError::generic(format!("Parameter 'disks' must be 'clone', not '{other}'"))),
        };
        let disks = blocks
            .iter()
            .map(|b| format::DiskDesc {
                path: b.path.clone(),
                readonly: b.readonly,
                direct: b.direct,
                iothread: b.pin,
                clone: clones.iter().find(|c| c.0 == b.path && !b.removed).map(|c| c.1.clone()),
                queues: b.queues,
                removed: b.removed,
                size: (!b.removed).then_some(b.size),
            })
            .collect();
        let desc = format::MachineDesc {
            cpus: self.vm.cpus(),
            mem_size: machine.mem_size,
            disks,
            scsi_queues: self.vm.scsi_queues(),
            iothreads: self.vm.storage().iothreads.len(),
            kernel: Some(boot.kernel.display().to_string()),
            initrd: boot.initrd.as_ref().map(|p| p.display().to_string()),
            cmdline: boot.cmdline.clone(),
        };
        let header = format::Header::layout(desc, &ram);
        let io = ring::IoThread::spawn("iothread-savevm", 256).map_err(|e| QmpError::generic(format!("cannot start the snapshot iothread: {e}")))?;
        io.remote()
            .send(|_| crate::seccomp::apply_or_exit(crate::seccomp::Role::Snapshot))
            .map_err(|e| QmpError::generic(format!("snapshot iothread: {e}")))?;
        machine.set_dirty_log(true).map_err(|e| QmpError::generic(format!("cannot enable dirty logging: {e}")))?;
        let shared = Arc::new(SaveShared::default());
        shared.update(|s| {
            s.state = SaveState::Active;
            s.path = path.clone();
            s.started = Some(Instant::now());
        });
        // What the disks' queues write into guest RAM, KVM does not see.
        let dma = (!self.vm.blocks().is_empty()).then(|| self.vm.storage().dirty.clone());
        if let Some(d) = &dma {
            d.set_enabled(true);
        }
        let params = save::Params { path, header, slots, downtime_ms: downtime, dma, nofollow: self.statefile_dir.is_some(), final_timeout_ms: final_timeout };
        let (vm, mem, sh, ev) = (machine.vm.clone(), machine.mem.clone(), shared.clone(), self.vm.events().clone());
        if let Err(e) = io.remote().send(move |ring| save::start(ring, params, vm, mem, sh, ev)) {
            let _ = machine.set_dirty_log(false);
            self.vm.storage().dirty.set_enabled(false);
            return Err(QmpError::generic(format!("snapshot iothread: {e}")));
        }
        self.save = SaveCtl { shared, iothread: Some(io), clones, ..Default::default() };
        Ok(json!({}))
    }

    /// A reset reloaded the kernel through the VMM (not through KVM, so
    /// the dirty log missed it): a running snapshot rewrites everything.
    fn snapshot_memory_rewritten(&self, ranges: Vec<(u64, u64)>) {
        if let Some(io) = &self.save.iothread {
            let _ = io.remote().send(move |ring| save::mark_dirty(ring, &ranges));
        }
    }

    fn query_savevm(&self) -> Value {
        let s = self.save.shared.get();
        if s.state == SaveState::None {
            return json!({});
        }
        let total = match (s.state, s.started) {
            (SaveState::Active, Some(t)) => t.elapsed().as_millis() as u64,
            _ => s.total_ms,
        };
        let mut v = json!({
            "status": s.state.as_str(),
            "statefile": s.path,
            "total-time": total,
            "bytes": s.bytes,
            "iterations": s.iterations,
            "remaining": s.remaining,
            "throughput-mbps": s.throughput_mbps,
            "dirty-rate-mbps": s.dirty_rate_mbps,
            "direct-io": s.direct_io,
            "stalled": s.stalled,
        });
        if let Some(d) = s.downtime_ms {
            v["downtime"] = json!(d);
        }
        if let Some(e) = s.error {
            v["error"] = json!(e);
        }
        v
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
        self.broadcast("RESET", Some(data));
        let resume = self.state == RunState::Running;
        match self.vm.reset(resume) {
            Ok(w) => self.snapshot_memory_rewritten(w),
            Err(e) => self.fatal(e),
        }
    }

    /// Ends a running snapshot: marks it failed with `why` (if given), asks
    /// the job to stop and wakes it so it notices.
    fn cancel_snapshot(&mut self, why: Option<String>) {
        if let Some(msg) = why {
            self.save.shared.update(|s| {
                s.state = SaveState::Failed;
                s.error = Some(msg);
            });
        }
        self.save.shared.cancel.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(io) = &self.save.iothread {
            let _ = io.remote().send(save::poke);
        }
    }

    fn savevm_end(&mut self) -> Value {
        if self.save.shared.get().state == SaveState::Active {
            self.cancel_snapshot(None);
        } else if self.save.iothread.is_none() {
            self.save.shared = Arc::new(SaveShared::default());
        }
        json!({})
    }

    fn on_snapshot_step(&mut self, step: SnapshotStep) {
        match step {
            SnapshotStep::Pause => {
                if self.save.iothread.is_none() {
                    return;
                }
                // The downtime starts as the vCPUs are asked to stop (as
                // QEMU counts it from vm_stop): their way out of KVM_RUN
                // and the disks' quiesce are part of the pause.
                let pause_started = Instant::now();
                if self.state == RunState::Running {
                    if let Err(e) = self.vm.vcpus().pause() {
                        self.cancel_snapshot(Some(format!("cannot pause the vCPUs: {e}")));
                        return;
                    }
                    self.save.paused_by_us = true;
                }
                // Disks next: their iothreads finish what is in flight (so
                // its data and used entries are in RAM and in the dirty
                // log) and take nothing new until the resume.
                if let Err(e) = self.vm.storage().pause() {
                    self.release_snapshot_pause();
                    self.cancel_snapshot(Some(format!("cannot quiesce the disks: {e}")));
                    return;
                }
                // Quiesced: the disks' content is the RAM's. Reflinks are
                // metadata operations (the kernel flushes dirty data first).
                let clone_err = self.save.clones.iter().find_map(|(src, dst)| crate::disk::reflink(src, dst).err());
                if let Some(e) = clone_err {
                    self.vm.storage().resume();
                    self.release_snapshot_pause();
                    self.cancel_snapshot(Some(format!("disks=clone: {e}")));
                    return;
                }
                self.save.resume_to = Some(self.state);
                self.state = RunState::FinishMigrate;
                self.save.pause_started = Some(pause_started);
                if let Some(io) = &self.save.iothread {
                    let _ = io.remote().send(save::final_phase);
                }
            }
            SnapshotStep::Resume => {
                let Some(back) = self.save.resume_to.take() else { return };
                // Capture vCPU and machine state while they are still out.
                let state = if self.save.shared.get().state == SaveState::Active { Some(self.capture_state()) } else { None };
                self.vm.storage().resume();
                self.release_snapshot_pause();
                self.state = back;
                if let Some(t) = self.save.pause_started.take() {
                    let ms = t.elapsed().as_secs_f64() * 1e3;
                    self.save.shared.update(|s| s.downtime_ms = Some(ms));
                }
                for ev in std::mem::take(&mut self.save.deferred) {
                    self.on_vm_event(ev);
                }
                match state {
                    Some(Ok(json)) => {
                        if let Some(io) = &self.save.iothread {
                            let _ = io.remote().send(move |ring| save::close(ring, json));
                        }
                    }
                    Some(Err(e)) => self.cancel_snapshot(Some(format!("cannot save vCPU/device state: {e}"))),
                    None => {}
                }
            }
            SnapshotStep::Pass => {
                let s = self.save.shared.get();
                if s.state == SaveState::Active {
                    self.broadcast(
                        "SAVEVM_PROGRESS",
                        Some(json!({
                            "pass": s.iterations,
                            "bytes": s.bytes,
                            "remaining": s.remaining,
                            "throughput-mbps": s.throughput_mbps,
                            "dirty-rate-mbps": s.dirty_rate_mbps,
                        })),
                    );
                }
            }
            SnapshotStep::Done => {
                if let Err(e) = self.vm.machine().set_dirty_log(false) {
                    log::error!("cannot disable dirty logging: {e}");
                }
                self.vm.storage().dirty.set_enabled(false);
                let leftover = self.save.shared.get().leftover;
                if let Some(mut io) = self.save.iothread.take() {
                    // Stopped off the control thread: a failed or cancelled
                    // snapshot may leave writes stuck in a stalled target,
                    // and QMP must keep answering meanwhile. Its unfinished
                    // file is removed there too (the unlink may wait behind
                    // those writes).
                    let (tx, rx) = std::sync::mpsc::channel();
                    self.save.reaped = Some(rx);
                    let _ = std::thread::Builder::new().name("savevm-reaper".into()).spawn(move || {
                        if let Some(p) = leftover {
                            let r = match p.to_str().filter(|p| crate::nfs::is_uri(p)) {
                                Some(uri) => crate::nfs::NfsUri::parse(uri).and_then(|u| crate::nfs::Nfs::unlink(&u)),
                                None => std::fs::remove_file(&p).map_err(|e| e.to_string()),
                            };
                            if let Err(e) = r {
                                log::warn!("cannot remove the unfinished state file {}: {e}", p.display());
                            }
                        }
                        let _ = tx.send(());
                        io.stop();
                    });
                }
                let s = self.save.shared.get();
                let mut data = json!({"status": s.state.as_str()});
                if let Some(e) = &s.error {
                    data["error"] = json!(e);
                }
                self.broadcast("MIGRATION", Some(data));
            }
        }
    }

    /// Resumes the vCPUs if the snapshot's final pause stopped them.
    fn release_snapshot_pause(&mut self) {
        if self.save.paused_by_us {
            self.vm.vcpus().resume();
            self.save.paused_by_us = false;
        }
    }

    fn capture_state(&self) -> std::result::Result<Vec<u8>, String> {
        let vcpus = self.vm.vcpus().save_state().map_err(|e| e.to_string())?;
        let machine = self.vm.machine().save_state().map_err(|e| e.to_string())?;
        let devices = self.vm.storage().save_state();
        let serial = Some(self.vm.machine().serial.lock().unwrap_or_else(|e| e.into_inner()).save());
        let section = StateSection { vcpus_version: 1, vcpus, machine_version: 1, machine, serial_version: 1, serial, devices_version: 1, devices };
        serde_json::to_vec(&section).map_err(|e| e.to_string())
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
            Some(spec) => match qmp::check_args(&req.arguments, spec.args) {
                Err(e) => Err(e),
                // Answered later (see migrate_incoming).
                Ok(()) if req.execute == "migrate-incoming" => match self.migrate_incoming(client, &req) {
                    None => return,
                    Some(r) => r,
                },
                Ok(()) => self.execute(&req),
            },
        };
        self.reply(client, req.id.as_ref(), r);
    }

    fn execute(&mut self, req: &Request) -> std::result::Result<Value, QmpError> {
        match req.execute.as_str() {
            "query-version" => Ok(qmp::version()),
            "query-commands" => Ok(Value::Array(COMMANDS.iter().map(|c| json!({"name": c.name})).collect())),
            "query-status" => Ok(json!({"running": self.state == RunState::Running, "status": self.state.as_str()})),
            "query-name" => Ok(self.name.as_ref().map_or(json!({}), |n| json!({"name": n}))),
            "query-kvm" => Ok(json!({"enabled": true, "present": true})),
            "query-cpus-fast" => {
                let tids = self.vm.vcpus().control().thread_ids();
                Ok(Value::Array(
                    tids.iter()
                        .enumerate()
                        .map(|(i, tid)| {
                            json!({
                                "cpu-index": i,
                                "qom-path": format!("/machine/unattached/device[{i}]"),
                                "thread-id": tid,
                                "props": {"core-id": i, "thread-id": 0, "socket-id": 0},
                                "target": "x86_64",
                            })
                        })
                        .collect(),
                ))
            }
            "stop" if self.state == RunState::InMigrate => {
                // QEMU: stop before the incoming state is in means no autostart.
                self.incoming.autostart = false;
                Ok(json!({}))
            }
            "stop" if self.state == RunState::FinishMigrate => {
                // The snapshot's final pause holds the vCPUs: they stay
                // paused when it ends.
                if self.save.resume_to == Some(RunState::Running) {
                    self.save.resume_to = Some(RunState::Paused);
                    self.save.paused_by_us = false;
                    self.broadcast("STOP", None);
                }
                Ok(json!({}))
            }
            "cont" if self.state == RunState::FinishMigrate => {
                // They run again as soon as the final pause ends (ms).
                if matches!(self.save.resume_to, Some(RunState::Paused | RunState::Prelaunch)) {
                    self.save.resume_to = Some(RunState::Running);
                    self.save.paused_by_us = true;
                    self.broadcast("RESUME", None);
                }
                Ok(json!({}))
            }
            "stop" => {
                if matches!(self.state, RunState::Running) {
                    self.vm.vcpus().pause().map_err(|e| QmpError::generic(format!("cannot pause the vCPUs: {e}")))?;
                    self.state = RunState::Paused;
                    self.broadcast("STOP", None);
                } else if self.state == RunState::Prelaunch {
                    self.state = RunState::Paused;
                }
                Ok(json!({}))
            }
            "cont" => match self.state {
                RunState::Running => Ok(json!({})),
                RunState::Paused | RunState::Prelaunch | RunState::IoError => {
                    if !self.io_status.is_empty() {
                        // The admin fixed the storage: the held requests go
                        // again before the guest runs.
                        self.io_status.clear();
                        self.vm.storage().retry_held();
                    }
                    self.vm.vcpus().resume();
                    self.state = RunState::Running;
                    self.broadcast("RESUME", None);
                    Ok(json!({}))
                }
                RunState::Shutdown | RunState::InternalError => Err(QmpError::generic("Resetting the Virtual Machine is required")),
                RunState::InMigrate => Err(QmpError::generic("Migration is not finished yet; wait for it or cancel it")),
                s => Err(QmpError::generic(format!("cannot continue while the VM is in state '{}'", s.as_str()))),
            },
            "system_reset" if self.state == RunState::InMigrate => {
                Err(QmpError::generic("the VM is waiting for its incoming state; system_reset is not possible yet"))
            }
            "system_reset" if self.state == RunState::FinishMigrate => Err(QmpError::generic("a snapshot is finishing; retry system_reset in a moment")),
            "system_reset" => {
                self.io_status.clear();
                let resume = self.state == RunState::Running;
                let written = self.vm.reset(resume).map_err(|e| QmpError::generic(format!("reset failed: {e}")))?;
                self.snapshot_memory_rewritten(written);
                self.broadcast("RESET", Some(json!({"guest": false, "reason": "host-qmp-system-reset"})));
                Ok(json!({}))
            }
            "system_powerdown" if self.state == RunState::InMigrate => {
                Err(QmpError::generic("the VM is waiting for its incoming state; system_powerdown is not possible yet"))
            }
            "system_powerdown" => {
                // The ACPI power button, as QEMU presses it: the guest decides
                // what to do (a Linux guest powers off through S5).
                self.vm.press_power_button().map_err(|e| QmpError::generic(format!("system_powerdown: {e}")))?;
                self.broadcast("POWERDOWN", None);
                Ok(json!({}))
            }
            "quit" => {
                self.broadcast("SHUTDOWN", Some(json!({"guest": false, "reason": "host-qmp-quit"})));
                self.finish(Ok(Outcome::Quit));
                Ok(json!({}))
            }
            "query-block" => Ok(Value::Array(
                self.vm
                    .blocks()
                    .iter()
                    .filter(|b| !b.removed)
                    .map(|b| {
                        json!({
                            "device": b.device,
                            "qdev": format!("/machine/peripheral/scsi{}/virtio-backend", b.controller),
                            "locked": false,
                            "removable": false,
                            "type": "unknown",
                            "io-status": self.io_status.get(&b.device).copied().unwrap_or("ok"),
                            "inserted": {
                                "file": b.path,
                                "ro": b.readonly,
                                "drv": "raw",
                                "image": {"filename": b.path, "format": "raw", "virtual-size": b.size},
                                "cache": {"direct": b.direct, "writeback": true, "no-flush": false},
                            },
                            "ringvm": {"controller": b.controller, "lun": b.lun, "iothreads": b.iothreads},
                        })
                    })
                    .collect(),
            )),
            "device_del" => self.device_del(req),
            "savevm-start" => self.savevm_start(req),
            // QEMU's spelling, same engine: file: and nfs:// URIs.
            "migrate" => {
                let uri = req.arguments.get("uri").and_then(Value::as_str).unwrap_or_default();
                let Some(path) = uri.strip_prefix("file:").or(crate::nfs::is_uri(uri).then_some(uri)) else {
                    return Err(QmpError::generic(format!("Invalid URI '{uri}': ringvm migrates to file:PATH or nfs://SERVER/EXPORT/FILE")));
                };
                let mut r = req.clone();
                r.arguments = serde_json::Map::new();
                r.arguments.insert("statefile".into(), json!(path));
                self.savevm_start(&r)
            }
            "query-migrate" if self.incoming.status != IncomingStatus::None && self.save.shared.get().state == SaveState::None => {
                let done = self.incoming.progress.load(std::sync::atomic::Ordering::Relaxed);
                let ms = self.incoming.started.map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3);
                let mut v = json!({
                    "status": self.incoming.status.as_str(),
                    "total-time": ms as u64,
                    "ram": {"transferred": done, "total": self.incoming.total, "remaining": self.incoming.total.saturating_sub(done),
                            "mbps": if ms > 0.0 { done as f64 * 8.0 / ms / 1e3 } else { 0.0 }},
                });
                if let Some(e) = &self.incoming.error {
                    v["error-desc"] = json!(e);
                }
                Ok(v)
            }
            "query-migrate" => {
                let s = self.query_savevm();
                if s.get("status").is_none() {
                    return Ok(json!({}));
                }
                let mut v = json!({
                    "status": s["status"],
                    "total-time": s["total-time"],
                    "ram": {
                        "transferred": s["bytes"],
                        "remaining": s["remaining"],
                        "mbps": s["throughput-mbps"].as_f64().unwrap_or(0.0) * 8.0,
                        "dirty-sync-count": s["iterations"],
                        "dirty-pages-rate": s["dirty-rate-mbps"].as_f64().unwrap_or(0.0) * 1e6 / 4096.0,
                    },
                });
                if let Some(d) = s.get("downtime") {
                    v["downtime"] = json!(d.as_f64().unwrap_or(0.0).round() as u64);
                }
                if let Some(e) = s.get("error") {
                    v["error-desc"] = e.clone();
                }
                Ok(v)
            }
            // QEMU: cancels a running migration; after the end it changes nothing
            // (query-migrate still reports how it ended).
            "migrate_cancel" => {
                if self.save.shared.get().state == SaveState::Active {
                    self.cancel_snapshot(None);
                }
                Ok(json!({}))
            }
            "query-savevm" => Ok(self.query_savevm()),
            "savevm-end" => Ok(self.savevm_end()),
            "human-monitor-command" => {
                let line = req.arguments.get("command-line").and_then(Value::as_str).unwrap_or("");
                self.hmp(line).map(Value::String)
            }
            other => Err(QmpError::not_found(format!("The command {other} has not been found"))),
        }
    }

    /// The few HMP commands management tools send through QMP.
    fn hmp(&mut self, line: &str) -> std::result::Result<String, QmpError> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let run = |this: &mut Self, cmd: &str| {
            let r = Request { execute: cmd.into(), arguments: Default::default(), id: None };
            this.execute(&r)
        };
        Ok(match words.as_slice() {
            [] => String::new(),
            ["info", "status"] => {
                let st = self.state.as_str();
                format!("VM status: {st}\r\n")
            }
            ["info", "version"] => {
                let (a, b, c) = qmp::QEMU_COMPAT;
                format!("{a}.{b}.{c} (ringvm {})\r\n", env!("CARGO_PKG_VERSION"))
            }
            ["info", "name"] => self.name.as_ref().map(|n| format!("{n}\r\n")).unwrap_or_default(),
            ["info", "cpus"] => {
                let tids = self.vm.vcpus().control().thread_ids();
                tids.iter().enumerate().map(|(i, t)| format!("{}CPU #{i}: thread_id={t}\r\n", if i == 0 { "* " } else { "  " })).collect()
            }
            ["stop"] => run(self, "stop").map(|_| String::new())?,
            ["c"] | ["cont"] => run(self, "cont").map(|_| String::new())?,
            ["system_reset"] => run(self, "system_reset").map(|_| String::new())?,
            [cmd, ..] => format!("unknown command: '{cmd}'\r\n"),
        })
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
