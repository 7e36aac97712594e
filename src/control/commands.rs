//! The QMP command table and its dispatch (and HMP beside it).

use serde_json::{json, Value};

use super::{Controller, RunState};
use crate::events::VmEvent;
use crate::qmp::{self, opt, req, ArgType, CommandSpec, QmpError, Request};
use crate::snapshot::incoming::IncomingStatus;
use crate::snapshot::SaveState;
use crate::vmm::Outcome;

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
        args: &[
            req("statefile", ArgType::Str),
            opt("downtime-ms", ArgType::Number),
            opt("final-timeout-ms", ArgType::Number),
            opt("disks", ArgType::Str),
            opt("converge", ArgType::Str),
            opt("cpu-throttle-initial", ArgType::Int),
            opt("cpu-throttle-increment", ArgType::Int),
        ],
    },
    CommandSpec { name: "query-savevm", args: &[] },
    CommandSpec { name: "savevm-end", args: &[] },
    CommandSpec { name: "migrate", args: &[req("uri", ArgType::Str), opt("detach", ArgType::Bool), opt("resume", ArgType::Bool)] },
    CommandSpec { name: "query-migrate", args: &[] },
    CommandSpec { name: "migrate_cancel", args: &[] },
    CommandSpec { name: "migrate-set-capabilities", args: &[req("capabilities", ArgType::Array)] },
    CommandSpec { name: "query-migrate-capabilities", args: &[] },
    CommandSpec {
        name: "migrate-set-parameters",
        args: &[opt("cpu-throttle-initial", ArgType::Int), opt("cpu-throttle-increment", ArgType::Int), opt("downtime-limit", ArgType::Int)],
    },
    CommandSpec { name: "query-migrate-parameters", args: &[] },
    CommandSpec { name: "migrate-incoming", args: &[req("uri", ArgType::Str)] },
    CommandSpec { name: "human-monitor-command", args: &[req("command-line", ArgType::Str), opt("cpu-index", ArgType::Int)] },
];

impl Controller {
    pub(super) fn execute(&mut self, req: &Request) -> std::result::Result<Value, QmpError> {
        match req.execute.as_str() {
            "query-version" => Ok(qmp::version()),
            "migrate-set-capabilities" => {
                let caps = req.arguments.get("capabilities").and_then(Value::as_array).cloned().unwrap_or_default();
                let mut auto = self.migrate_params.auto_converge;
                for c in &caps {
                    let (Some(name), Some(state)) = (c.get("capability").and_then(Value::as_str), c.get("state").and_then(Value::as_bool)) else {
                        return Err(QmpError::generic("each capability is {\"capability\": NAME, \"state\": BOOL}"));
                    };
                    match name {
                        "auto-converge" => auto = state,
                        // Accepted as QEMU's off state; ringvm has no other mode.
                        n if !state => log::debug!("capability {n} off"),
                        n => return Err(QmpError::generic(format!("Capability '{n}' is not supported by ringvm (supported: auto-converge)"))),
                    }
                }
                self.migrate_params.auto_converge = auto;
                Ok(json!({}))
            }
            "query-migrate-capabilities" => Ok(json!([{"capability": "auto-converge", "state": self.migrate_params.auto_converge}])),
            "migrate-set-parameters" => {
                let get = |k: &str| req.arguments.get(k).and_then(Value::as_u64);
                for k in ["cpu-throttle-initial", "cpu-throttle-increment"] {
                    if let Some(v) = get(k) {
                        if !(1..=99).contains(&v) {
                            return Err(QmpError::generic(format!("Parameter '{k}' expects a number from 1 to 99")));
                        }
                    }
                }
                if let Some(v) = get("cpu-throttle-initial") {
                    self.migrate_params.throttle_initial = v as u32;
                }
                if let Some(v) = get("cpu-throttle-increment") {
                    self.migrate_params.throttle_increment = v as u32;
                }
                Ok(json!({}))
            }
            "query-migrate-parameters" => Ok(json!({
                "cpu-throttle-initial": self.migrate_params.throttle_initial,
                "cpu-throttle-increment": self.migrate_params.throttle_increment,
                "max-cpu-throttle": crate::vcpu::MAX_THROTTLE_PCT,
            })),
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
                if s["cpu-throttle-percentage"].as_u64().unwrap_or(0) > 0 {
                    v["cpu-throttle-percentage"] = s["cpu-throttle-percentage"].clone();
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
        self.vm.unplug_disk(&id, move || events.push(VmEvent::DeviceDeleted(name))).map_err(QmpError::generic)?;
        Ok(json!({}))
    }
}
