//! The control side of a restore: `migrate-incoming` (its file opened off
//! this thread, the reply deferred), the loader's start and its outcome.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{Controller, RunState};
use crate::error::Error;
use crate::events::VmEvent;
use crate::qmp::server::{ClientId, QMP_SOURCE};
use crate::qmp::{QmpError, Request};
use crate::snapshot::incoming::{self, IncomingStatus};
use crate::snapshot::{format, StateSection};
use ring::Op;

/// An incoming state (restore): loader progress and outcome.
#[derive(Default)]
pub(super) struct IncomingCtl {
    /// Waiting for RAM: the parsed state to apply once it is in.
    pub(super) section: Option<crate::snapshot::StateSection>,
    pub(super) path: Option<std::path::PathBuf>,
    pub(super) progress: Arc<std::sync::atomic::AtomicU64>,
    pub(super) total: u64,
    pub(super) started: Option<Instant>,
    pub(super) status: IncomingStatus,
    pub(super) error: Option<String>,
    /// Run the guest when the load completes (no -S).
    pub(super) autostart: bool,
    /// --loadstate: a failed load ends ringvm with status 1.
    pub(super) fatal: bool,
    /// migrate-incoming's file is being opened off this thread: the client
    /// waiting for the reply, and its other requests held until then (QMP
    /// answers one client's commands in order).
    pub(super) waiting: Option<Waiting>,
    /// The opener's result, tagged with its attempt.
    pub(super) opened: incoming::Slot,
    pub(super) attempt: u64,
    /// Set by the ring's timer when attempt N's deadline passed.
    pub(super) expired: Rc<Cell<Option<u64>>>,
}

pub(super) struct Waiting {
    pub(super) client: ClientId,
    pub(super) id: Option<Value>,
    pub(super) held: std::collections::VecDeque<Request>,
    pub(super) timer: ring::OpId,
}

/// How long migrate-incoming waits for its file to be opened and checked
/// before answering with an error (the file's filesystem does not answer).
pub(super) const INCOMING_OPEN_DEADLINE: Duration = Duration::from_secs(30);

impl Controller {
    /// Starts the loader thread; the control loop keeps serving QMP.
    pub(super) fn start_load(
        &mut self,
        path: std::path::PathBuf,
        checked: format::Checked,
        section: StateSection,
        bases: Vec<(std::path::PathBuf, format::Checked)>,
    ) -> std::result::Result<(), String> {
        use crate::snapshot::restore::{self, RamMode};
        let mut total = restore::present_bytes(&checked);
        let events = self.vm.events().clone();
        let shown = path.display().to_string();
        // An incremental chain: read, or lazily (a mapping is of one file).
        if !bases.is_empty() && self.restore_ram == RamMode::Map {
            return Err(format!(
                "state file {shown}: it is incremental ({} base file(s)); --restore-ram map maps one file: merge it first (ringvm state merge) or restore with --restore-ram read or lazy",
                bases.len()
            ));
        }
        let mut chain: Vec<(std::path::PathBuf, &format::Checked)> = vec![(path.clone(), &checked)];
        chain.extend(bases.iter().map(|(p, c)| (p.clone(), c)));
        if chain.len() > 1 {
            total = restore::chain_present_bytes(&chain.iter().map(|(_, c)| *c).collect::<Vec<_>>());
        }
        let ev2 = events.clone();
        let restored = move |r: std::result::Result<restore::LoadStats, restore::LoadError>| {
            events.push(VmEvent::Restored(r.map(|s| s.bytes).map_err(|e| format!("state file {shown}: {e}"))))
        };
        let mem = &self.vm.machine().mem;
        let progress = self.incoming.progress.clone();
        match self.restore_ram {
            RamMode::Lazy => crate::snapshot::lazy::spawn(&chain, mem, progress, restored, move |s| ev2.push(VmEvent::Streamed(s.bytes))),
            _ if chain.len() > 1 => restore::spawn_chain_loader(&chain, mem, progress, restored),
            mode => restore::spawn_loader(&path, &checked, mem, mode, progress, restored),
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

    pub(super) fn on_restored(&mut self, r: std::result::Result<u64, String>) {
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
    pub(super) fn migrate_incoming(&mut self, client: ClientId, req: &Request) -> Option<std::result::Result<Value, QmpError>> {
        if self.state != RunState::InMigrate || self.incoming.status != IncomingStatus::None {
            let why = if self.incoming.status == IncomingStatus::Setup {
                "a migrate-incoming is already opening its file"
            } else {
                "migrate-incoming is only possible once, on a VM started with --incoming defer"
            };
            return Some(Err(QmpError::generic(why)));
        }
        let uri = req.arguments.get("uri").and_then(Value::as_str).unwrap_or_default();
        let path = match crate::snapshot::uri::StateUri::from_migrate_uri(uri) {
            Ok(u) => u.to_name(),
            Err(e) => return Some(Err(e.into())),
        };
        let path = path.as_str();
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
    pub(super) fn on_incoming_opened(&mut self, attempt: u64) {
        let taken = self.incoming.opened.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some((n, r)) = taken else { return };
        if n != attempt || attempt != self.incoming.attempt || self.incoming.status != IncomingStatus::Setup {
            // A late answer for an attempt that already timed out.
            return;
        }
        let r = r.map_err(QmpError::from).and_then(|o| {
            self.vm.adopt_boot(&o.checked.header.machine);
            self.start_load(o.path, o.checked, o.section, o.bases).map_err(QmpError::generic)
        });
        if r.is_err() {
            self.incoming.status = IncomingStatus::None;
        }
        self.answer_incoming(r.map(|()| json!({})));
    }

    /// The deadline of the open in progress passed.
    pub(super) fn on_incoming_deadline(&mut self, attempt: u64) {
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
    pub(super) fn answer_incoming(&mut self, r: std::result::Result<Value, QmpError>) {
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
}
