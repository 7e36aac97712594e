//! `converge`: live snapshots of a guest that dirties memory faster than
//! its target takes it. The target is the NFS stand-in (ringvm-faultfs, a
//! FUSE passthrough to the local disk answering every request late); the
//! test guest rewrites its RAM as fast as it can. ringvm without and with
//! `converge: auto` against QEMU 10's `migrate file:` (mapped-ram, multifd
//! and direct-io: its fastest file mode) without and with its auto-converge
//! capability: whether each finishes within the cap, its total time and
//! pause, and what the guest kept of its speed meanwhile.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::json;

use crate::incbench::{last_beat_pages, rewrite_rate, start_guest};
use crate::report::{cell, Report};
use crate::snapbench::{cmd, ok, qemu_guest, qemu_set_mode, qmp, reap, Beats, Fuse, QemuMode};
use crate::Ctx;

const SYSTEMS: [&str; 4] = ["ringvm", "ringvm auto", "QEMU mapped-ram", "QEMU mapped-ram + auto-converge"];

struct Run {
    completed: bool,
    total_ms: f64,
    downtime_ms: f64,
    written_mb: f64,
    max_throttle: f64,
    /// The guest's pages per second before the snapshot and while it ran.
    before: f64,
    during: f64,
}

/// Polls a status query every 50 ms until `done` says it ended or `cap`
/// passed: (ended, the last status, the highest throttle seen, the guest's
/// pages per second meanwhile).
fn watch(q: &mut crate::snapbench::Qmp, query: &str, beats: &Beats, cap: Duration) -> Result<(bool, serde_json::Value, f64, f64)> {
    let (t0, p0) = (Instant::now(), last_beat_pages(beats).unwrap_or(0));
    let mut max_throttle = 0f64;
    loop {
        let s = ok(q, json!({"execute": query}))?;
        max_throttle = max_throttle.max(s["cpu-throttle-percentage"].as_f64().unwrap_or(0.0));
        let status = s["status"].as_str().unwrap_or_default().to_string();
        let ended = !matches!(status.as_str(), "active" | "setup" | "device" | "pre-switchover" | "");
        if ended || t0.elapsed() > cap {
            let during = last_beat_pages(beats).unwrap_or(p0).saturating_sub(p0) as f64 / t0.elapsed().as_secs_f64();
            return Ok((ended, s, max_throttle, during));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn ringvm(c: &Ctx, file: &Path, mem_mib: u64, auto: bool, cap: Duration) -> Result<Run> {
    let sock = c.dir.join("conv.sock");
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(file);
    let (child, rx, beats) = start_guest(c, None, &sock, mem_mib, 0)?;
    let r = (|| -> Result<Run> {
        rx.recv_timeout(Duration::from_secs(600)).context("guest fill")?;
        let mut q = qmp(&sock)?;
        let before = rewrite_rate(&beats, 1.0);
        ok(&mut q, json!({"execute": "savevm-start", "arguments": {"statefile": file, "converge": if auto { "auto" } else { "none" }}}))?;
        let (ended, mut s, max_throttle, during) = watch(&mut q, "query-savevm", &beats, cap)?;
        if !ended {
            ok(&mut q, json!({"execute": "savevm-end"}))?;
            s = crate::snapbench::savevm_completed(&mut q).unwrap_or(s);
        }
        let _ = cmd(&mut q, json!({"execute": "quit"}));
        Ok(Run {
            completed: ended && s["status"] == "completed",
            total_ms: s["total-time"].as_f64().unwrap_or(0.0),
            downtime_ms: s["downtime"].as_f64().unwrap_or(0.0),
            written_mb: s["bytes"].as_f64().unwrap_or(0.0) / 1e6,
            max_throttle,
            before,
            during,
        })
    })();
    reap(child)?;
    let _ = std::fs::remove_file(file);
    r
}

fn qemu(c: &Ctx, file: &Path, mem_mib: u64, auto: bool, cap: Duration) -> Result<Run> {
    let sock = c.dir.join("qemu-conv.sock");
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(file);
    let fill = mem_mib * 9 / 10;
    let (child, rx, beats) = qemu_guest(&c.guest, mem_mib, &sock, &format!("work=mem mib={fill} secs=inf rate=0 beat=100"))?;
    let r = (|| -> Result<Run> {
        rx.recv_timeout(Duration::from_secs(600)).context("guest fill under QEMU")?;
        let mut q = qmp(&sock)?;
        let before = rewrite_rate(&beats, 1.0);
        ok(&mut q, json!({"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": 1u64 << 40, "downtime-limit": 5}}))?;
        qemu_set_mode(&mut q, QemuMode::MappedRam)?;
        if auto {
            ok(&mut q, json!({"execute": "migrate-set-capabilities", "arguments": {"capabilities": [{"capability": "auto-converge", "state": true}]}}))?;
        }
        ok(&mut q, json!({"execute": "migrate", "arguments": {"uri": format!("file:{}", file.display())}}))?;
        let (ended, s, max_throttle, during) = watch(&mut q, "query-migrate", &beats, cap)?;
        if !ended {
            let _ = cmd(&mut q, json!({"execute": "migrate_cancel"}));
        }
        let _ = cmd(&mut q, json!({"execute": "quit"}));
        Ok(Run {
            completed: ended && s["status"] == "completed",
            total_ms: s["total-time"].as_f64().unwrap_or(0.0),
            downtime_ms: s["downtime"].as_f64().unwrap_or(0.0),
            written_mb: s["ram"]["transferred"].as_f64().unwrap_or(0.0) / 1e6,
            max_throttle,
            before,
            during,
        })
    })();
    reap(child)?;
    let _ = std::fs::remove_file(file);
    r
}

pub fn suite(c: &Ctx, r: &mut Report) -> Result<()> {
    let mem_mib = c.sizes.as_ref().and_then(|s| s.first().copied()).unwrap_or(if c.quick { 256 } else { 512 });
    let delays: &[u64] = if c.quick { &[3000] } else { &[500, 3000] };
    let cap = Duration::from_secs(if c.quick { 20 } else { 60 });
    let have_qemu = std::process::Command::new("qemu-system-x86_64").arg("--version").output().is_ok_and(|o| o.status.success());
    r.begin("converge", (delays.len() * c.reps * SYSTEMS.len()) as u64);
    let back = c.scratch()?.join("conv-back");
    let mnt = c.dir.join("conv-mnt");
    // (target, system) -> (runs completed, runs).
    let mut done = std::collections::HashMap::<(u64, &str), (usize, usize)>::new();
    for &delay in delays {
        let fuse = Fuse::mount(&c.faultfs, &back, &mnt, delay)?;
        for rep in 0..c.reps {
            for sys in crate::interleaved(&SYSTEMS, rep) {
                if crate::stopping() {
                    break;
                }
                if sys.starts_with("QEMU") && !have_qemu {
                    continue;
                }
                r.step(format!("+{delay} us target, {sys}, rep {rep}"));
                let file = mnt.join("conv.state");
                let res = match sys {
                    "ringvm" => ringvm(c, &file, mem_mib, false, cap),
                    "ringvm auto" => ringvm(c, &file, mem_mib, true, cap),
                    "QEMU mapped-ram" => qemu(c, &file, mem_mib, false, cap),
                    _ => qemu(c, &file, mem_mib, true, cap),
                };
                let k = format!("+{delay}us");
                match res {
                    Ok(o) => {
                        let d = done.entry((delay, sys)).or_default();
                        d.0 += usize::from(o.completed);
                        d.1 += 1;
                        if o.completed {
                            r.sample(&k, sys, "total_ms", "ms", o.total_ms);
                            r.sample(&k, sys, "downtime_ms", "ms", o.downtime_ms);
                        }
                        r.sample(&k, sys, "written_mb", "MB", o.written_mb);
                        r.sample(&k, sys, "max_throttle", "%", o.max_throttle);
                        if o.before > 0.0 {
                            r.sample(&k, sys, "kept", "", o.during / o.before);
                        }
                    }
                    Err(e) => r.log(format!("{k} {sys}: {e:#}")),
                }
            }
        }
        drop(fuse);
    }
    let _ = std::fs::remove_dir_all(&back);
    let mut rows = Vec::new();
    for &delay in delays {
        let k = format!("+{delay}us");
        for sys in SYSTEMS {
            let s = |m: &str| r.stat(&k, sys, m);
            let Some(&(ok_runs, runs)) = done.get(&(delay, sys)) else { continue };
            rows.push(vec![
                format!("+{delay} us"),
                sys.to_string(),
                format!("{ok_runs}/{runs}"),
                cell(s("total_ms"), 0),
                cell(s("downtime_ms"), 1),
                cell(s("written_mb"), 0),
                cell(s("max_throttle"), 0),
                cell(s("kept"), 2),
            ]);
        }
    }
    r.table(
        &format!("converge: snapshot of a {mem_mib} MiB guest dirtying faster than its target"),
        &format!("The test guest fills 90% of its RAM and then rewrites it as fast as it can (1 vCPU). Target: the NFS stand-in (ringvm-faultfs, FUSE passthrough to the local disk, every request answered the given delay late). ringvm: `savevm-start` with `converge` none or auto (QEMU's auto-converge rule, 20% then +10% per second pass that does not shrink, as the floor; straight to the throttle the last pass measured as needed when that is more). QEMU 10: `migrate file:` with mapped-ram + multifd (4 channels) + direct-io, no bandwidth cap, downtime-limit 5 ms, with and without the auto-converge capability (its defaults). Each run is capped at {} s, then cancelled (savevm-end, migrate_cancel). 'done' counts the runs that completed; time and pause are of those; 'kept' is the guest's pages rewritten per second while the snapshot ran over its rate just before (1.00: not slowed).", cap.as_secs()),
        &["target", "system", "done", "total ms", "pause ms", "MB written", "max throttle %", "kept"],
        &rows,
    );
    r.end();
    Ok(())
}
