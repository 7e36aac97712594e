//! The control side of a live snapshot: savevm-start / savevm-end /
//! query-savevm, the final pause and the state it captures.

use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};

use super::savejob::{Effect, SaveJob};
use super::{Controller, RunState};
use crate::events::{SnapshotStep, VmEvent};
use crate::qmp::{QmpError, Request};
use crate::snapshot::incoming::IncomingStatus;
use crate::snapshot::{format, save, SaveShared, SaveState, StateSection};

/// QEMU's migration capabilities and parameters that ringvm honours
/// (`migrate-set-capabilities`, `migrate-set-parameters`).
pub(super) struct MigrateParams {
    pub(super) auto_converge: bool,
    pub(super) dirty_limit: bool,
    /// QEMU's vcpu-dirty-limit (MB/s); `None`: from the target's rate.
    pub(super) vcpu_dirty_limit: Option<u64>,
    pub(super) throttle_initial: u32,
    pub(super) throttle_increment: u32,
    /// QEMU's downtime-limit (ms): `migrate`'s downtime target.
    pub(super) downtime_limit_ms: Option<u64>,
}

impl Default for MigrateParams {
    fn default() -> Self {
        // QEMU's defaults.
        MigrateParams {
            auto_converge: false,
            dirty_limit: false,
            vcpu_dirty_limit: None,
            throttle_initial: 20,
            throttle_increment: 10,
            downtime_limit_ms: None,
        }
    }
}

/// The control thread's side of a running snapshot.
#[derive(Default)]
pub(super) struct SaveCtl {
    pub(super) shared: Arc<SaveShared>,
    pub(super) iothread: Option<ring::IoThread>,
    /// The final pause's state machine.
    pub(super) job: SaveJob,
    /// Guest events that arrived during the final pause.
    pub(super) deferred: Vec<VmEvent>,
    /// (disk, reflink) pairs to take during the final pause.
    pub(super) clones: Vec<(String, String)>,
    /// Says when the reaper removed an ended snapshot's unfinished file.
    pub(super) reaped: Option<std::sync::mpsc::Receiver<()>>,
    /// `"track": true`: once complete, dirty logging stays on so the next
    /// snapshot can be incremental against this one.
    pub(super) track: bool,
    /// The base of the running snapshot, if it is incremental.
    pub(super) base: Option<format::BaseRef>,
    /// The vCPUs' dirty-limit sleep (µs, all together) when it started.
    pub(super) slept_at_start: u64,
}

/// Dirty tracking since a completed snapshot (`"track": true`): KVM's log
/// and the DMA log stay on, so the pages changed since that file are
/// known; an incremental snapshot against it writes only those.
#[derive(Clone, Debug)]
pub(super) struct Tracking {
    /// The file (canonical path, or the nfs:// URI as given).
    pub(super) path: String,
    pub(super) base: format::BaseRef,
}

/// Default downtime target (ms) for the final pause.
pub const DEFAULT_DOWNTIME_MS: f64 = 5.0;
/// How long the final pause may take before the snapshot gives up and the
/// guest resumes (`final-timeout-ms`).
pub const DEFAULT_FINAL_TIMEOUT_MS: f64 = 10_000.0;

impl Controller {
    /// The `--statefile-dir` policy for a state file named over QMP.
    pub(super) fn check_statefile(&self, path: &str) -> std::result::Result<(), QmpError> {
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

    pub(super) fn savevm_start(&mut self, req: &Request) -> std::result::Result<Value, QmpError> {
        let asked = Instant::now();
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
        // A bad nfs:// URI is refused here, before anything starts.
        let uri = crate::snapshot::uri::StateUri::from_statefile(&path).map_err(|e| QmpError::generic(format!("statefile {e}")))?;
        self.check_statefile(&path)?;
        let downtime = req.arguments.get("downtime-ms").and_then(Value::as_f64).unwrap_or(DEFAULT_DOWNTIME_MS);
        if !(0.0..=60_000.0).contains(&downtime) {
            return Err(QmpError::generic("Parameter 'downtime-ms' must be between 0 and 60000"));
        }
        let final_timeout = req.arguments.get("final-timeout-ms").and_then(Value::as_f64).unwrap_or(DEFAULT_FINAL_TIMEOUT_MS);
        if !(1.0..=600_000.0).contains(&final_timeout) {
            return Err(QmpError::generic("Parameter 'final-timeout-ms' must be between 1 and 600000"));
        }
        let converge = self.converge_policy(req)?;
        let track = req.arguments.get("track").and_then(Value::as_bool).unwrap_or(false);
        let base = self.incremental_base(req)?;
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
            Some("clone") if uri.is_nfs() => {
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
        let mut header = format::Header::layout(desc, &ram);
        header.base = base.clone();
        let incremental = base.is_some();
        let io = ring::IoThread::spawn("iothread-savevm", 256).map_err(|e| QmpError::generic(format!("cannot start the snapshot iothread: {e}")))?;
        io.remote()
            .send(|_| crate::seccomp::apply_or_exit(crate::seccomp::Role::Snapshot))
            .map_err(|e| QmpError::generic(format!("snapshot iothread: {e}")))?;
        // Tracking since the last snapshot: the log is on and holds what
        // changed since then (re-enabling it is not needed).
        if self.tracking.is_none() {
            machine.set_dirty_log(true).map_err(|e| QmpError::generic(format!("cannot enable dirty logging: {e}")))?;
        }
        let shared = Arc::new(SaveShared::default());
        shared.update(|s| {
            s.state = SaveState::Active;
            s.path = path.clone();
            s.started = Some(asked);
        });
        // What the disks' queues write into guest RAM, KVM does not see.
        let dma = (!self.vm.blocks().is_empty()).then(|| self.vm.storage().dirty.clone());
        if let Some(d) = &dma {
            if !d.enabled() {
                d.set_enabled(true);
            }
        }
        let params = save::Params {
            path,
            header,
            slots,
            downtime_ms: downtime,
            dma,
            nofollow: self.statefile_dir.is_some(),
            final_timeout_ms: final_timeout,
            converge,
            incremental,
        };
        let (vm, mem, sh, ev) = (machine.dirty_log(), machine.mem.clone(), shared.clone(), self.vm.events().clone());
        if let Err(e) = io.remote().send(move |ring| save::start(ring, params, vm, mem, sh, ev)) {
            let _ = machine.set_dirty_log(false);
            self.vm.storage().dirty.set_enabled(false);
            return Err(QmpError::generic(format!("snapshot iothread: {e}")));
        }
        // This snapshot takes the tracked changes; tracking resumes from
        // it only if it completes with "track".
        self.tracking = None;
        let slept_at_start = machine.dirty_rings.as_ref().map_or(0, |r| r.slept_us());
        self.save = SaveCtl { shared, iothread: Some(io), clones, track, base: base.clone(), slept_at_start, ..Default::default() };
        Ok(json!({}))
    }

    /// savevm-start's `"base": FILE`: the tracked snapshot it must be, or
    /// with `"base-fallback": "full"` a full snapshot instead.
    fn incremental_base(&self, req: &Request) -> std::result::Result<Option<format::BaseRef>, QmpError> {
        let Some(base) = req.arguments.get("base").and_then(Value::as_str) else { return Ok(None) };
        let fallback = match req.arguments.get("base-fallback").and_then(Value::as_str) {
            None | Some("error") => false,
            Some("full") => true,
            Some(o) => return Err(QmpError::generic(format!("Parameter 'base-fallback' must be 'error' or 'full', not '{o}'"))),
        };
        let why = match &self.tracking {
            None => "no changes are tracked since a snapshot (take one with \"track\": true first; a reset, a restore or a failed snapshot ends tracking)"
                .to_string(),
            Some(t) if crate::snapshot::same_file(&t.path, base) => return Ok(Some(t.base.clone())),
            Some(t) => format!("the snapshot changes are tracked against is {}, not {base}", t.path),
        };
        if fallback {
            log::info!("incremental snapshot against {base} not possible ({why}); taking a full one");
            return Ok(None);
        }
        Err(QmpError::generic(format!("incremental snapshot refused: {why}")))
    }

    /// Ends dirty tracking (a reset, a failed snapshot): the next snapshot
    /// is a full one.
    pub(super) fn end_tracking(&mut self, why: &str) {
        if self.tracking.take().is_some() {
            log::info!("incremental tracking ended: {why}");
            if self.save.iothread.is_none() {
                if let Err(e) = self.vm.machine().set_dirty_log(false) {
                    log::error!("cannot disable dirty logging: {e}");
                }
                self.vm.storage().dirty.set_enabled(false);
            }
        }
        self.save.track = false;
    }

    /// savevm-start's `converge` ("none", "auto", "dirty-limit"; by
    /// default dirty-limit where the VM has dirty rings), or for `migrate`
    /// the auto-converge / dirty-limit capabilities; cpu-throttle-initial,
    /// -increment and vcpu-dirty-limit from the arguments or
    /// migrate-set-parameters.
    fn converge_policy(&self, req: &Request) -> std::result::Result<save::Converge, QmpError> {
        let num = |name: &str, dflt: u64, range: std::ops::RangeInclusive<u64>| -> std::result::Result<u64, QmpError> {
            match req.arguments.get(name) {
                None => Ok(dflt),
                Some(v) => match v.as_u64().filter(|n| range.contains(n)) {
                    Some(n) => Ok(n),
                    None => Err(QmpError::generic(format!("Parameter '{name}' expects a number from {} to {}", range.start(), range.end()))),
                },
            }
        };
        let initial = num("cpu-throttle-initial", self.migrate_params.throttle_initial.into(), 1..=99)? as u32;
        let increment = num("cpu-throttle-increment", self.migrate_params.throttle_increment.into(), 1..=99)? as u32;
        let auto = save::Converge::Auto { initial, increment };
        let fixed = match req.arguments.get("vcpu-dirty-limit") {
            Some(_) => Some(num("vcpu-dirty-limit", 1, 1..=u64::from(u32::MAX))? * 1_000_000),
            None => self.migrate_params.vcpu_dirty_limit.map(|l| l * 1_000_000),
        };
        let rings = self.vm.machine().dirty_rings.is_some();
        let limit = || {
            if rings {
                Ok(save::Converge::DirtyLimit { fixed })
            } else {
                Err(QmpError::generic("converge 'dirty-limit' needs KVM's dirty ring, which this VM does not use (start it with --dirty-ring N); use 'auto'"))
            }
        };
        match req.arguments.get("converge").and_then(Value::as_str) {
            None if self.migrate_params.auto_converge => Ok(auto),
            None if self.migrate_params.dirty_limit => limit(),
            // savevm-start's default: dirty-limit where it can work (it
            // slows nothing unless the guest out-dirties the target).
            None if rings && req.execute == "savevm-start" => limit(),
            None | Some("none") => Ok(save::Converge::None),
            Some("auto") => Ok(auto),
            Some("dirty-limit") => limit(),
            Some(o) => Err(QmpError::generic(format!("Parameter 'converge' must be 'none', 'auto' or 'dirty-limit', not '{o}'"))),
        }
    }

    /// A reset reloaded the kernel through the VMM (not through KVM, so
    /// the dirty log missed it): a running snapshot rewrites everything.
    pub(super) fn snapshot_memory_rewritten(&self, ranges: Vec<(u64, u64)>) {
        if let Some(io) = &self.save.iothread {
            let _ = io.remote().send(move |ring| save::mark_dirty(ring, &ranges));
        }
    }

    pub(super) fn query_savevm(&self) -> Value {
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
            "cpu-throttle-percentage": s.throttle_pct,
        });
        if !s.vcpu_dirty_rates_mbps.is_empty() {
            v["vcpu-dirty-rate-mbps"] = json!(s.vcpu_dirty_rates_mbps);
        }
        if s.dirty_limits.iter().any(|&l| l > 0) {
            v["vcpu-dirty-limit-mbps"] = json!(s.dirty_limits.iter().map(|l| l / 1_000_000).collect::<Vec<_>>());
        }
        if let Some(r) = &self.vm.machine().dirty_rings {
            let slept = r.slept_us().saturating_sub(self.save.slept_at_start);
            if slept > 0 {
                v["dirty-limit-throttle-time"] = json!(slept);
                v["dirty-limit-throttle-time-per-round"] = json!(slept / u64::from(s.iterations.max(1)));
            }
        }
        if let Some(d) = s.downtime_ms {
            v["downtime"] = json!(d);
        }
        if let Some(t) = s.setup_ms {
            v["setup-time"] = json!(t);
        }
        if let Some(e) = s.error {
            v["error"] = json!(e);
        }
        v
    }

    /// Ends a running snapshot: marks it failed with `why` (if given), asks
    /// the job to stop and wakes it so it notices.
    pub(super) fn cancel_snapshot(&mut self, why: Option<String>) {
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

    pub(super) fn savevm_end(&mut self) -> Value {
        if self.save.shared.get().state == SaveState::Active {
            self.cancel_snapshot(None);
        } else if self.save.iothread.is_none() {
            self.save.shared = Arc::new(SaveShared::default());
        }
        json!({})
    }

    pub(super) fn on_snapshot_step(&mut self, step: SnapshotStep) {
        match step {
            SnapshotStep::Pause => {
                if self.save.iothread.is_none() {
                    return;
                }
                let clone = !self.save.clones.is_empty();
                let effects = self.save.job.pause(self.state, Instant::now(), clone);
                self.run_effects(effects);
            }
            SnapshotStep::Resume => {
                if !self.save.job.is_paused() {
                    return;
                }
                // Capture vCPU and machine state while they are still out.
                let state = if self.save.shared.get().state == SaveState::Active { Some(self.capture_state()) } else { None };
                let effects = self.save.job.resume(state, Instant::now());
                self.run_effects(effects);
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
            SnapshotStep::Throttle(pct) => {
                if self.save.iothread.is_some() {
                    self.vm.vcpus().set_throttle(pct);
                }
            }
            SnapshotStep::DirtyLimit => {
                if let (Some(_), Some(r)) = (&self.save.iothread, &self.vm.machine().dirty_rings) {
                    r.set_limits(&self.save.shared.get().dirty_limits);
                }
            }
            SnapshotStep::Done => {
                // The guest's full speed back the moment the snapshot ends.
                if let Some(r) = &self.vm.machine().dirty_rings {
                    r.set_limits(&[]);
                }
                self.vm.vcpus().set_throttle(0);
                let done = self.save.shared.get();
                if done.state == SaveState::Completed && self.save.track && done.file_id != 0 {
                    // Logging stays on: the next snapshot may be incremental.
                    let path = if crate::nfs::is_uri(&done.path) {
                        done.path.clone()
                    } else {
                        std::fs::canonicalize(&done.path).map(|p| p.display().to_string()).unwrap_or_else(|_| done.path.clone())
                    };
                    // The files an increment on this one builds on, newest
                    // first (so a restore can read all their headers at once).
                    let ancestors =
                        self.save.base.as_ref().map(|b| std::iter::once(b.path.clone()).chain(b.ancestors.iter().cloned()).collect()).unwrap_or_default();
                    let base = format::BaseRef { path: path.clone(), id: done.file_id, completion_crc: done.record_crc, ancestors };
                    self.tracking = Some(Tracking { path, base });
                } else {
                    self.tracking = None;
                    if let Err(e) = self.vm.machine().set_dirty_log(false) {
                        log::error!("cannot disable dirty logging: {e}");
                    }
                    self.vm.storage().dirty.set_enabled(false);
                }
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
                                Some(uri) => crate::nfs::NfsUri::parse(uri).and_then(|u| crate::nfs::Nfs::unlink(&u)).map_err(|e| e.to_string()),
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

    /// Carries out the save job's effects in order; a failed one is
    /// reported back and the job's undo runs instead of the rest.
    fn run_effects(&mut self, effects: Vec<Effect>) {
        let mut queue: std::collections::VecDeque<Effect> = effects.into();
        while let Some(e) = queue.pop_front() {
            if let Err(why) = self.do_effect(&e) {
                queue = self.save.job.failed(&e, &why).into();
            }
        }
    }

    fn do_effect(&mut self, e: &Effect) -> std::result::Result<(), String> {
        match e {
            Effect::PauseVcpus => self.vm.vcpus().pause().map_err(|e| e.to_string())?,
            Effect::QuiesceDisks => self.vm.storage().pause().map_err(|e| e.to_string())?,
            // Quiesced: the disks' content is the RAM's. Reflinks are
            // metadata operations (the kernel flushes dirty data first).
            Effect::CloneDisks => {
                if let Some(e) = self.save.clones.iter().find_map(|(src, dst)| crate::disk::reflink(src, dst).err()) {
                    return Err(e.to_string());
                }
            }
            Effect::ResumeDisks => self.vm.storage().resume(),
            Effect::ResumeVcpus => self.vm.vcpus().resume(),
            Effect::SetRunState(s) => self.state = *s,
            Effect::FinalPhase => {
                if let Some(io) = &self.save.iothread {
                    let _ = io.remote().send(save::final_phase);
                }
            }
            Effect::RecordDowntime { ms } => {
                let ms = *ms;
                self.save.shared.update(|s| s.downtime_ms = Some(ms));
            }
            Effect::ReplayDeferred => {
                for ev in std::mem::take(&mut self.save.deferred) {
                    self.on_vm_event(ev);
                }
            }
            Effect::Close(json) => {
                if let Some(io) = &self.save.iothread {
                    let json = json.clone();
                    let _ = io.remote().send(move |ring| save::close(ring, json));
                }
            }
            Effect::Cancel(why) => self.cancel_snapshot(Some(why.clone())),
        }
        Ok(())
    }

    pub(super) fn capture_state(&self) -> std::result::Result<Vec<u8>, String> {
        let vcpus = self.vm.vcpus().save_state().map_err(|e| e.to_string())?;
        let machine = self.vm.machine().save_state().map_err(|e| e.to_string())?;
        let devices = self.vm.storage().save_state();
        let serial = Some(self.vm.machine().serial.lock().unwrap_or_else(|e| e.into_inner()).save());
        let section = StateSection { vcpus_version: 1, vcpus, machine_version: 1, machine, serial_version: 1, serial, devices_version: 1, devices };
        serde_json::to_vec(&section).map_err(|e| e.to_string())
    }
}
