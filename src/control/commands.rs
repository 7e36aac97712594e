//! The QMP command table and its dispatch (and HMP beside it).

use serde_json::{json, Value};

use super::{Controller, RunState};
use crate::events::VmEvent;
use crate::qmp::server::ClientId;
use crate::qmp::{self, opt, req, Arg, ArgType, QmpError, Request};
use crate::snapshot::incoming::IncomingStatus;
use crate::snapshot::SaveState;
use crate::vmm::Outcome;

/// What a command does: answer now, or later (its work runs off this
/// thread; see migrate_incoming), with the client's other requests held.
#[derive(Clone, Copy)]
pub(super) enum Run {
    Now(fn(&mut Controller, &Request) -> Result<Value, QmpError>),
    Deferred(fn(&mut Controller, ClientId, &Request) -> Option<Result<Value, QmpError>>),
}

/// A QMP command: its name, its arguments (checked before it runs, with
/// QEMU's error wording) and what runs it.
pub struct Command {
    pub name: &'static str,
    pub args: &'static [Arg],
    pub(super) run: Run,
}

/// Every command ringvm implements: the one list `query-commands` reports
/// and the dispatcher runs (a command is in both or in neither).
pub const COMMANDS: &[Command] = &[
    Command { name: "qmp_capabilities", args: &[opt("enable", ArgType::Array)], run: Run::Now(cmd_qmp_capabilities) },
    Command { name: "query-version", args: &[], run: Run::Now(cmd_query_version) },
    Command { name: "query-commands", args: &[], run: Run::Now(cmd_query_commands) },
    Command { name: "query-status", args: &[], run: Run::Now(cmd_query_status) },
    Command { name: "query-name", args: &[], run: Run::Now(cmd_query_name) },
    Command { name: "query-kvm", args: &[], run: Run::Now(cmd_query_kvm) },
    Command { name: "query-cpus-fast", args: &[], run: Run::Now(cmd_query_cpus_fast) },
    Command { name: "stop", args: &[], run: Run::Now(cmd_stop) },
    Command { name: "cont", args: &[], run: Run::Now(cmd_cont) },
    Command { name: "system_reset", args: &[], run: Run::Now(cmd_system_reset) },
    Command { name: "system_powerdown", args: &[], run: Run::Now(cmd_system_powerdown) },
    Command { name: "quit", args: &[], run: Run::Now(cmd_quit) },
    Command { name: "query-block", args: &[], run: Run::Now(cmd_query_block) },
    Command { name: "device_del", args: &[req("id", ArgType::Str)], run: Run::Now(cmd_device_del) },
    Command {
        name: "savevm-start",
        args: &[
            req("statefile", ArgType::Str),
            opt("downtime-ms", ArgType::Number),
            opt("final-timeout-ms", ArgType::Number),
            opt("disks", ArgType::Str),
            opt("converge", ArgType::Str),
            opt("track", ArgType::Bool),
            opt("base", ArgType::Str),
            opt("base-fallback", ArgType::Str),
            opt("cpu-throttle-initial", ArgType::Int),
            opt("cpu-throttle-increment", ArgType::Int),
            opt("vcpu-dirty-limit", ArgType::Int),
        ],
        run: Run::Now(cmd_savevm_start),
    },
    Command { name: "query-savevm", args: &[], run: Run::Now(cmd_query_savevm) },
    Command { name: "savevm-end", args: &[], run: Run::Now(cmd_savevm_end) },
    Command { name: "migrate", args: &[req("uri", ArgType::Str), opt("detach", ArgType::Bool), opt("resume", ArgType::Bool)], run: Run::Now(cmd_migrate) },
    Command { name: "query-migrate", args: &[], run: Run::Now(cmd_query_migrate) },
    Command { name: "migrate_cancel", args: &[], run: Run::Now(cmd_migrate_cancel) },
    Command { name: "migrate-set-capabilities", args: &[req("capabilities", ArgType::Array)], run: Run::Now(cmd_migrate_set_capabilities) },
    Command { name: "query-migrate-capabilities", args: &[], run: Run::Now(cmd_query_migrate_capabilities) },
    Command {
        name: "migrate-set-parameters",
        args: &[
            opt("cpu-throttle-initial", ArgType::Int),
            opt("cpu-throttle-increment", ArgType::Int),
            opt("downtime-limit", ArgType::Int),
            opt("vcpu-dirty-limit", ArgType::Int),
        ],
        run: Run::Now(cmd_migrate_set_parameters),
    },
    Command { name: "query-migrate-parameters", args: &[], run: Run::Now(cmd_query_migrate_parameters) },
    Command { name: "migrate-incoming", args: &[req("uri", ArgType::Str)], run: Run::Deferred(Controller::migrate_incoming) },
    Command {
        name: "human-monitor-command",
        args: &[req("command-line", ArgType::Str), opt("cpu-index", ArgType::Int)],
        run: Run::Now(cmd_human_monitor_command),
    },
];

impl Controller {
    /// Runs a command that answers at once (for HMP's aliases).
    pub(super) fn execute(&mut self, req: &Request) -> Result<Value, QmpError> {
        match COMMANDS.iter().find(|c| c.name == req.execute).map(|c| c.run) {
            Some(Run::Now(run)) => run(self, req),
            _ => Err(QmpError::not_found(format!("The command {} has not been found", req.execute))),
        }
    }

    /// The few HMP commands management tools send through QMP.
    pub(super) fn hmp(&mut self, line: &str) -> std::result::Result<String, QmpError> {
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

    /// `device_del id=scsiC-lunL`: new requests find no LUN at once; when
    /// the disk's requests in flight have finished, the file is closed,
    /// the guest is told (a virtio-scsi hotplug event) and clients get
    /// DEVICE_DELETED.
    pub(super) fn device_del(&mut self, req: &Request) -> std::result::Result<Value, QmpError> {
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
        self.vm.unplug_disk(&id, move || events.push(VmEvent::DeviceDeleted(name)))?;
        Ok(json!({}))
    }
}

fn cmd_qmp_capabilities(_: &mut Controller, _: &Request) -> Result<Value, QmpError> {
    Err(QmpError::not_found("Capabilities negotiation is already complete, command ignored"))
}

fn cmd_query_version(_: &mut Controller, _: &Request) -> Result<Value, QmpError> {
    Ok(qmp::version())
}

fn cmd_migrate_set_capabilities(c: &mut Controller, req: &Request) -> Result<Value, QmpError> {
    let caps = req.arguments.get("capabilities").and_then(Value::as_array).cloned().unwrap_or_default();
    let (mut auto, mut limit) = (c.migrate_params.auto_converge, c.migrate_params.dirty_limit);
    for c in &caps {
        let (Some(name), Some(state)) = (c.get("capability").and_then(Value::as_str), c.get("state").and_then(Value::as_bool)) else {
            return Err(QmpError::generic("each capability is {\"capability\": NAME, \"state\": BOOL}"));
        };
        match name {
            "auto-converge" => auto = state,
            "dirty-limit" => limit = state,
            // Accepted as QEMU's off state; ringvm has no other mode.
            n if !state => log::debug!("capability {n} off"),
            n => return Err(QmpError::generic(format!("Capability '{n}' is not supported by ringvm (supported: auto-converge, dirty-limit)"))),
        }
    }
    // QEMU's rules: the two exclude each other, and dirty-limit needs the
    // dirty ring.
    if auto && limit {
        return Err(QmpError::generic("Capability 'dirty-limit' is incompatible with 'auto-converge'"));
    }
    if limit && c.vm.machine().dirty_rings.is_none() {
        return Err(QmpError::generic("Capability 'dirty-limit' needs KVM's dirty ring, which this VM does not use (start it with --dirty-ring N)"));
    }
    c.migrate_params.auto_converge = auto;
    c.migrate_params.dirty_limit = limit;
    Ok(json!({}))
}

fn cmd_query_migrate_capabilities(c: &mut Controller, _: &Request) -> Result<Value, QmpError> {
    Ok(json!([
        {"capability": "auto-converge", "state": c.migrate_params.auto_converge},
        {"capability": "dirty-limit", "state": c.migrate_params.dirty_limit},
    ]))
}

fn cmd_migrate_set_parameters(c: &mut Controller, req: &Request) -> Result<Value, QmpError> {
    let get = |k: &str| req.arguments.get(k).and_then(Value::as_u64);
    for k in ["cpu-throttle-initial", "cpu-throttle-increment"] {
        if let Some(v) = get(k) {
            if !(1..=99).contains(&v) {
                return Err(QmpError::generic(format!("Parameter '{k}' expects a number from 1 to 99")));
            }
        }
    }
    if let Some(v) = get("cpu-throttle-initial") {
        c.migrate_params.throttle_initial = v as u32;
    }
    if let Some(v) = get("cpu-throttle-increment") {
        c.migrate_params.throttle_increment = v as u32;
    }
    if let Some(v) = get("vcpu-dirty-limit") {
        if !(1..=u64::from(u32::MAX)).contains(&v) {
            return Err(QmpError::generic("Parameter 'vcpu-dirty-limit' expects a number of MB/s from 1"));
        }
        c.migrate_params.vcpu_dirty_limit = Some(v);
    }
    if let Some(v) = get("downtime-limit") {
        if v > 60_000 {
            return Err(QmpError::generic("Parameter 'downtime-limit' expects a number from 0 to 60000 (ms)"));
        }
        c.migrate_params.downtime_limit_ms = Some(v);
    }
    Ok(json!({}))
}

fn cmd_query_migrate_parameters(c: &mut Controller, _: &Request) -> Result<Value, QmpError> {
    Ok(json!({
        "cpu-throttle-initial": c.migrate_params.throttle_initial,
        "cpu-throttle-increment": c.migrate_params.throttle_increment,
        "max-cpu-throttle": crate::vcpu::MAX_THROTTLE_PCT,
        "downtime-limit": c.migrate_params.downtime_limit_ms.unwrap_or(crate::control::DEFAULT_DOWNTIME_MS as u64),
        // QEMU's default is 1 MB/s; ringvm's default derives the limit from
        // the target's measured rate, reported as 0 until one is set.
        "vcpu-dirty-limit": c.migrate_params.vcpu_dirty_limit.unwrap_or(0),
    }))
}

fn cmd_query_commands(_: &mut Controller, _: &Request) -> Result<Value, QmpError> {
    Ok(Value::Array(COMMANDS.iter().map(|c| json!({"name": c.name})).collect()))
}

fn cmd_query_status(c: &mut Controller, _: &Request) -> Result<Value, QmpError> {
    Ok(json!({"running": c.state == RunState::Running, "status": c.state.as_str()}))
}

fn cmd_query_name(c: &mut Controller, _: &Request) -> Result<Value, QmpError> {
    Ok(c.name.as_ref().map_or(json!({}), |n| json!({"name": n})))
}

fn cmd_query_kvm(_: &mut Controller, _: &Request) -> Result<Value, QmpError> {
    Ok(json!({"enabled": true, "present": true}))
}

fn cmd_query_cpus_fast(c: &mut Controller, _: &Request) -> Result<Value, QmpError> {
    let tids = c.vm.vcpus().control().thread_ids();
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

fn cmd_stop(c: &mut Controller, _: &Request) -> Result<Value, QmpError> {
    if c.state == RunState::InMigrate {
        // QEMU: stop before the incoming state is in means no autostart.
        c.incoming.autostart = false;
        Ok(json!({}))
    } else if c.state == RunState::FinishMigrate {
        // The snapshot's final pause holds the vCPUs: they stay
        // paused when it ends.
        if c.save.job.stop() {
            c.broadcast("STOP", None);
        }
        Ok(json!({}))
    } else {
        if matches!(c.state, RunState::Running) {
            c.vm.vcpus().pause().map_err(|e| QmpError::generic(format!("cannot pause the vCPUs: {e}")))?;
            c.state = RunState::Paused;
            c.broadcast("STOP", None);
        } else if c.state == RunState::Prelaunch {
            c.state = RunState::Paused;
        }
        Ok(json!({}))
    }
}

fn cmd_cont(c: &mut Controller, _: &Request) -> Result<Value, QmpError> {
    if c.state == RunState::FinishMigrate {
        // They run again as soon as the final pause ends (ms).
        if c.save.job.cont() {
            c.broadcast("RESUME", None);
        }
        Ok(json!({}))
    } else {
        match c.state {
            RunState::Running => Ok(json!({})),
            RunState::Paused | RunState::Prelaunch | RunState::IoError => {
                if !c.io_status.is_empty() {
                    // The admin fixed the storage: the held requests go
                    // again before the guest runs.
                    c.io_status.clear();
                    c.vm.storage().retry_held();
                }
                c.vm.vcpus().resume();
                c.state = RunState::Running;
                c.broadcast("RESUME", None);
                Ok(json!({}))
            }
            RunState::Shutdown | RunState::InternalError => Err(QmpError::generic("Resetting the Virtual Machine is required")),
            RunState::InMigrate => Err(QmpError::generic("Migration is not finished yet; wait for it or cancel it")),
            s => Err(QmpError::generic(format!("cannot continue while the VM is in state '{}'", s.as_str()))),
        }
    }
}

fn cmd_system_reset(c: &mut Controller, _: &Request) -> Result<Value, QmpError> {
    if c.state == RunState::InMigrate {
        Err(QmpError::generic("the VM is waiting for its incoming state; system_reset is not possible yet"))
    } else if c.state == RunState::FinishMigrate {
        Err(QmpError::generic("a snapshot is finishing; retry system_reset in a moment"))
    } else {
        c.io_status.clear();
        c.end_tracking("system_reset");
        let resume = c.state == RunState::Running;
        let written = c.vm.reset(resume).map_err(|e| QmpError::generic(format!("reset failed: {e}")))?;
        c.snapshot_memory_rewritten(written);
        c.broadcast("RESET", Some(json!({"guest": false, "reason": "host-qmp-system-reset"})));
        Ok(json!({}))
    }
}

fn cmd_system_powerdown(c: &mut Controller, _: &Request) -> Result<Value, QmpError> {
    if c.state == RunState::InMigrate {
        Err(QmpError::generic("the VM is waiting for its incoming state; system_powerdown is not possible yet"))
    } else {
        // The ACPI power button, as QEMU presses it: the guest decides
        // what to do (a Linux guest powers off through S5).
        c.vm.press_power_button().map_err(|e| QmpError::generic(format!("system_powerdown: {e}")))?;
        c.broadcast("POWERDOWN", None);
        Ok(json!({}))
    }
}

fn cmd_quit(c: &mut Controller, _: &Request) -> Result<Value, QmpError> {
    c.broadcast("SHUTDOWN", Some(json!({"guest": false, "reason": "host-qmp-quit"})));
    c.finish(Ok(Outcome::Quit));
    Ok(json!({}))
}

fn cmd_query_block(c: &mut Controller, _: &Request) -> Result<Value, QmpError> {
    Ok(Value::Array(
        c.vm.blocks()
            .iter()
            .filter(|b| !b.removed)
            .map(|b| {
                json!({
                    "device": b.device,
                    "qdev": format!("/machine/peripheral/scsi{}/virtio-backend", b.controller),
                    "locked": false,
                    "removable": false,
                    "type": "unknown",
                    "io-status": c.io_status.get(&b.device).copied().unwrap_or("ok"),
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
    ))
}

fn cmd_device_del(c: &mut Controller, req: &Request) -> Result<Value, QmpError> {
    c.device_del(req)
}

fn cmd_savevm_start(c: &mut Controller, req: &Request) -> Result<Value, QmpError> {
    c.savevm_start(req)
}

// QEMU's spelling, same engine: file: and nfs:// URIs.
fn cmd_migrate(c: &mut Controller, req: &Request) -> Result<Value, QmpError> {
    let uri = req.arguments.get("uri").and_then(Value::as_str).unwrap_or_default();
    let path = crate::snapshot::uri::StateUri::from_migrate_uri(uri)?.to_name();
    let mut r = req.clone();
    r.arguments = serde_json::Map::new();
    r.arguments.insert("statefile".into(), json!(path));
    if let Some(ms) = c.migrate_params.downtime_limit_ms {
        r.arguments.insert("downtime-ms".into(), json!(ms));
    }
    c.savevm_start(&r)
}

fn cmd_query_migrate(c: &mut Controller, _: &Request) -> Result<Value, QmpError> {
    if c.incoming.status != IncomingStatus::None && c.save.shared.get().state == SaveState::None {
        let done = c.incoming.progress.load(std::sync::atomic::Ordering::Relaxed);
        let ms = c.incoming.started.map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3);
        let mut v = json!({
            "status": c.incoming.status.as_str(),
            "total-time": ms as u64,
            "ram": {"transferred": done, "total": c.incoming.total, "remaining": c.incoming.total.saturating_sub(done),
                    "mbps": if ms > 0.0 { done as f64 * 8.0 / ms / 1e3 } else { 0.0 }},
        });
        if let Some(e) = &c.incoming.error {
            v["error-desc"] = json!(e);
        }
        Ok(v)
    } else {
        let s = c.query_savevm();
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
        if let Some(t) = s.get("setup-time") {
            v["setup-time"] = t.clone();
        }
        if s["cpu-throttle-percentage"].as_u64().unwrap_or(0) > 0 {
            v["cpu-throttle-percentage"] = s["cpu-throttle-percentage"].clone();
        }
        if let Some(t) = s.get("dirty-limit-throttle-time-per-round") {
            v["dirty-limit-throttle-time-per-round"] = t.clone();
        }
        if let Some(e) = s.get("error") {
            v["error-desc"] = e.clone();
        }
        Ok(v)
    }
}

// QEMU: cancels a running migration; after the end it changes nothing
// (query-migrate still reports how it ended).
fn cmd_migrate_cancel(c: &mut Controller, _: &Request) -> Result<Value, QmpError> {
    if c.save.shared.get().state == SaveState::Active {
        c.cancel_snapshot(None);
    }
    Ok(json!({}))
}

fn cmd_query_savevm(c: &mut Controller, _: &Request) -> Result<Value, QmpError> {
    Ok(c.query_savevm())
}

fn cmd_savevm_end(c: &mut Controller, _: &Request) -> Result<Value, QmpError> {
    Ok(c.savevm_end())
}

fn cmd_human_monitor_command(c: &mut Controller, req: &Request) -> Result<Value, QmpError> {
    let line = req.arguments.get("command-line").and_then(Value::as_str).unwrap_or("");
    c.hmp(line).map(Value::String)
}
