//! `converge`: live snapshots of a guest that dirties memory faster than
//! its target takes it. The target is the NFS stand-in (ringvm-faultfs, a
//! FUSE passthrough to the local disk answering every request late); the
//! test guest rewrites its RAM as fast as it can. ringvm with `converge`
//! none, auto and dirty-limit against QEMU 10's `migrate file:`
//! (mapped-ram, multifd and direct-io: its fastest file mode) without a
//! policy, with auto-converge and with dirty-limit (its dirty ring on):
//! whether each finishes within the cap, its total time and pause, and
//! what the guest kept of its speed meanwhile.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::json;

use crate::incbench::{last_beat_pages, rewrite_rate, start_guest_with};
use crate::report::{cell, Report};
use crate::snapbench::{cmd, ok, qemu_guest_accel, qemu_set_mode, qmp, reap, Beats, Fuse, QemuMode};
use crate::Ctx;

const SYSTEMS: [&str; 6] =
    ["ringvm", "ringvm auto", "ringvm dirty-limit", "QEMU mapped-ram", "QEMU mapped-ram + auto-converge", "QEMU mapped-ram + dirty-limit"];

/// The policy each system runs with.
fn policy(sys: &str) -> &'static str {
    if sys.ends_with("dirty-limit") {
        "dirty-limit"
    } else if sys.ends_with("auto") || sys.ends_with("auto-converge") {
        "auto"
    } else {
        "none"
    }
}

struct Run {
    completed: bool,
    total_ms: f64,
    downtime_ms: f64,
    written_mb: f64,
    max_throttle: f64,
    /// dirty-limit: the vCPUs' sleep per pass, ms.
    limit_sleep_ms: f64,
    /// ringvm: what the target took in the last pass, MB/s (0: unknown).
    target_mbps: f64,
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

fn ringvm(c: &Ctx, ns: Option<&str>, file: &Path, mem_mib: u64, rate: u64, policy: &str, cap: Duration) -> Result<Run> {
    let sock = c.dir.join("conv.sock");
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(file);
    // dirty-limit needs KVM's dirty ring (as QEMU's: off unless asked).
    let ring: &[&str] = if policy == "dirty-limit" { &["--dirty-ring", "1024"] } else { &[] };
    let (child, rx, beats) = start_guest_with(c, ns, &sock, mem_mib, rate, ring)?;
    let r = (|| -> Result<Run> {
        rx.recv_timeout(Duration::from_secs(600)).context("guest fill")?;
        let mut q = qmp(&sock)?;
        let before = rewrite_rate(&beats, 1.0);
        ok(&mut q, json!({"execute": "savevm-start", "arguments": {"statefile": file, "converge": policy}}))?;
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
            limit_sleep_ms: s["dirty-limit-throttle-time-per-round"].as_f64().unwrap_or(0.0) / 1e3,
            target_mbps: s["throughput-mbps"].as_f64().unwrap_or(0.0),
            before,
            during,
        })
    })();
    reap(child)?;
    let _ = std::fs::remove_file(file);
    r
}

/// The time to write the guest's RAM once at the target's speed, measured:
/// ringvm's snapshot (`converge` none) of the same guest, filled, then
/// either running but rewriting only 1 MiB/s (`live`: the host's CPUs as
/// busy as in the runs it is the yardstick of; on this 2-core host the
/// guest's vCPU takes one core from the NFS server and proxy) or paused
/// (`stop`: every core for the target). One pass and the final one, with
/// the target's fixed costs (file creation, the closing flush or COMMIT)
/// that a rate from the last pass alone leaves out.
fn write_once(c: &Ctx, ns: Option<&str>, file: &Path, mem_mib: u64, cap: Duration, live: bool) -> Result<f64> {
    let sock = c.dir.join("conv-once.sock");
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(file);
    let (child, rx, _) = start_guest_with(c, ns, &sock, mem_mib, if live { 1 } else { 100 }, &[])?;
    let r = (|| -> Result<f64> {
        rx.recv_timeout(Duration::from_secs(600)).context("guest fill")?;
        let mut q = qmp(&sock)?;
        if !live {
            ok(&mut q, json!({"execute": "stop"}))?;
        }
        ok(&mut q, json!({"execute": "savevm-start", "arguments": {"statefile": file, "converge": "none"}}))?;
        let (t0, mut s) = (Instant::now(), serde_json::Value::Null);
        while t0.elapsed() < cap {
            s = ok(&mut q, json!({"execute": "query-savevm"}))?;
            if s["status"] != "active" {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = cmd(&mut q, json!({"execute": "quit"}));
        if s["status"] != "completed" {
            anyhow::bail!("the write-once snapshot did not complete: {s}");
        }
        Ok(s["total-time"].as_f64().unwrap_or(0.0))
    })();
    reap(child)?;
    let _ = std::fs::remove_file(file);
    r
}

fn qemu(c: &Ctx, file: &Path, mem_mib: u64, rate: u64, policy: &str, cap: Duration) -> Result<Run> {
    let sock = c.dir.join("qemu-conv.sock");
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(file);
    let fill = mem_mib * 9 / 10;
    // QEMU's dirty-limit needs its dirty ring (QEMU's recommended size).
    let accel = if policy == "dirty-limit" { "kvm,dirty-ring-size=4096" } else { "kvm" };
    let (child, rx, beats) = qemu_guest_accel(&c.guest, mem_mib, &sock, &format!("work=mem mib={fill} secs=inf rate={rate} beat=100"), accel)?;
    let r = (|| -> Result<Run> {
        rx.recv_timeout(Duration::from_secs(600)).context("guest fill under QEMU")?;
        let mut q = qmp(&sock)?;
        let before = rewrite_rate(&beats, 1.0);
        ok(&mut q, json!({"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": 1u64 << 40, "downtime-limit": 5}}))?;
        qemu_set_mode(&mut q, QemuMode::MappedRam)?;
        let cap_name = match policy {
            "auto" => Some("auto-converge"),
            "dirty-limit" => Some("dirty-limit"),
            _ => None,
        };
        if let Some(n) = cap_name {
            ok(&mut q, json!({"execute": "migrate-set-capabilities", "arguments": {"capabilities": [{"capability": n, "state": true}]}}))?;
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
            limit_sleep_ms: s["dirty-limit-throttle-time-per-round"].as_f64().unwrap_or(0.0) / 1e3,
            target_mbps: 0.0,
            before,
            during,
        })
    })();
    reap(child)?;
    let _ = std::fs::remove_file(file);
    r
}

/// The real-NFS target's name in the table.
const GANESHA: &str = "nfs-ganesha +500 us";

fn rate_name(rate: u64) -> String {
    if rate == 0 {
        "unpaced".into()
    } else {
        format!("{rate} MiB/s")
    }
}

pub fn suite(c: &Ctx, r: &mut Report) -> Result<()> {
    let sizes: Vec<u64> = c.sizes.clone().unwrap_or_else(|| vec![if c.quick { 256 } else { 512 }]);
    // The guest's dirty rate, MiB/s (0: as fast as it can).
    let rates: Vec<u64> = c.rates.clone().unwrap_or_else(|| vec![0]);
    let delays: &[u64] = if c.quick { &[3000] } else { &[500, 3000] };
    // Real NFS too (not with --quick): nfs-ganesha in a network namespace
    // behind the +0.5 ms proxy of the nfs suite.
    use crate::nfsbench::on_path;
    let ganesha = !c.quick && on_path("ganesha.nfsd") && on_path("nfs-ls") && on_path("ip");
    let want = |t: &str| c.targets.as_ref().is_none_or(|v| v.iter().any(|x| x == t || (x == "fuse" && t.starts_with("fuse"))));
    let mut targets: Vec<String> = delays.iter().filter(|d| want(&format!("fuse{d}"))).map(|d| format!("+{d} us")).collect();
    if ganesha && want("ganesha") {
        targets.push(GANESHA.to_string());
    }
    // Long enough for a target at ~30 MB/s to take the guest's RAM twice
    // over, at least a minute (20 s with --quick).
    let cap_for = |mib: u64| Duration::from_secs(if c.quick { 20 } else { 60.max(mib * 2 * 1024 * 1024 / 30_000_000 + 20) });
    let systems: Vec<&str> = SYSTEMS.iter().copied().filter(|sys| c.systems.as_ref().is_none_or(|v| v.iter().any(|f| sys.contains(f.as_str())))).collect();
    r.begin("converge", (sizes.len() * rates.len() * targets.len() * c.reps * (systems.len() + 2)) as u64);
    let back = c.scratch()?.join("conv-back");
    let mnt = c.dir.join("conv-mnt");
    // (size, rate, target, system) -> (runs completed, runs).
    let mut done = std::collections::HashMap::<(u64, u64, String, &str), (usize, usize)>::new();
    for target in &targets {
        // The FUSE stand-in, or the NFS server and its proxy.
        let mut _fuse = None;
        let mut server = None;
        let (file, ns) = if target == GANESHA {
            r.step("starting nfs-ganesha in a network namespace");
            let s = match crate::nfsbench::Server::start(&c.dir.join("conv-nfs")) {
                Ok(s) => s,
                Err(e) => {
                    r.log(format!("{target}: {e:#}"));
                    continue;
                }
            };
            crate::nfsbench::start_proxy(&s.ns, Duration::from_micros(500))?;
            let uri = PathBuf::from(s.uri("conv.state", crate::nfsbench::PROXY_PORT));
            let ns = s.ns.clone();
            server = Some(s);
            (uri, Some(ns))
        } else {
            let delay: u64 = target.trim_start_matches('+').trim_end_matches(" us").parse().unwrap_or(0);
            _fuse = Some(Fuse::mount(&c.faultfs, &back, &mnt, delay)?);
            (mnt.join("conv.state"), None)
        };
        for (&mem_mib, &rate) in sizes.iter().flat_map(|m| rates.iter().map(move |r| (m, r))) {
            let cap = cap_for(mem_mib);
            for rep in 0..c.reps {
                // The reference: writing the RAM once, per rate and rep so
                // that it drifts with the runs it is the yardstick of.
                for (live, name) in [(true, "write once"), (false, "write once, paused")] {
                    if crate::stopping() {
                        break;
                    }
                    r.step(format!("{mem_mib} MiB, {target} target, {name}, rep {rep}"));
                    let once = write_once(c, ns.as_deref(), &file, mem_mib, cap, live);
                    if let Some(s) = &server {
                        let _ = std::fs::remove_file(s.export.join("conv.state"));
                    }
                    match once {
                        Ok(ms) => r.sample(&format!("{mem_mib}MiB {target}"), name, "total_ms", "ms", ms),
                        Err(e) => r.log(format!("{mem_mib} MiB {target} {name}: {e:#}")),
                    }
                }
                for sys in crate::interleaved(&systems, rep) {
                    if crate::stopping() {
                        break;
                    }
                    // QEMU's `migrate file:` needs a mounted path: there is
                    // no kernel NFS client on the hosts this runs on.
                    if sys.starts_with("QEMU") && (!c.have_qemu || ns.is_some()) {
                        continue;
                    }
                    r.step(format!("{mem_mib} MiB at {}, {target} target, {sys}, rep {rep}", rate_name(rate)));
                    let res = if sys.starts_with("QEMU") {
                        qemu(c, &file, mem_mib, rate, policy(sys), cap)
                    } else {
                        ringvm(c, ns.as_deref(), &file, mem_mib, rate, policy(sys), cap)
                    };
                    if let Some(s) = &server {
                        let _ = std::fs::remove_file(s.export.join("conv.state"));
                    }
                    let k = format!("{mem_mib}MiB {rate}MiBps {target}");
                    match res {
                        Ok(o) => {
                            let d = done.entry((mem_mib, rate, target.clone(), sys)).or_default();
                            d.0 += usize::from(o.completed);
                            d.1 += 1;
                            if o.completed {
                                r.sample(&k, sys, "total_ms", "ms", o.total_ms);
                                r.sample(&k, sys, "downtime_ms", "ms", o.downtime_ms);
                            }
                            r.sample(&k, sys, "written_mb", "MB", o.written_mb);
                            r.sample(&k, sys, "max_throttle", "%", o.max_throttle);
                            r.sample(&k, sys, "limit_sleep_ms", "ms", o.limit_sleep_ms);
                            if o.target_mbps > 0.0 {
                                r.sample(&k, sys, "target_mbps", "MB/s", o.target_mbps);
                            }
                            if o.before > 0.0 {
                                let kept = o.during / o.before;
                                r.sample(&k, sys, "kept", "", kept);
                                // The guest's work the snapshot cost, in
                                // seconds at its own speed (completed runs).
                                if o.completed {
                                    r.sample(&k, sys, "lost_s", "s", (1.0 - kept).max(0.0) * o.total_ms / 1e3);
                                }
                            }
                        }
                        Err(e) => r.log(format!("{k} {sys}: {e:#}")),
                    }
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&back);
    let mut rows = Vec::new();
    for &mem_mib in &sizes {
        for &rate in &rates {
            for target in &targets {
                let k = format!("{mem_mib}MiB {rate}MiBps {target}");
                let once = r.stat(&format!("{mem_mib}MiB {target}"), "write once", "total_ms");
                let paused = r.stat(&format!("{mem_mib}MiB {target}"), "write once, paused", "total_ms");
                for sys in SYSTEMS {
                    let s = |m: &str| r.stat(&k, sys, m);
                    let Some(&(ok_runs, runs)) = done.get(&(mem_mib, rate, target.clone(), sys)) else { continue };
                    rows.push(vec![
                        format!("{mem_mib} MiB"),
                        rate_name(rate),
                        target.clone(),
                        sys.to_string(),
                        format!("{ok_runs}/{runs}"),
                        cell(s("total_ms"), 0),
                        crate::report::ratio(s("total_ms"), once),
                        cell(once, 0),
                        cell(paused, 0),
                        cell(s("downtime_ms"), 1),
                        cell(s("written_mb"), 0),
                        cell(s("max_throttle"), 0),
                        cell(s("limit_sleep_ms"), 0),
                        cell(s("kept"), 2),
                        cell(s("lost_s"), 1),
                        cell(s("target_mbps"), 0),
                    ]);
                }
            }
        }
    }
    r.table(
        "converge: snapshot of a guest dirtying faster than its target",
        "The test guest fills 90% of its RAM and then rewrites it (1 vCPU) at the given rate, or as fast as it can ('unpaced'). Targets: the NFS stand-in (ringvm-faultfs, FUSE passthrough to the local disk, every request answered the given delay late), and real NFS: `nfs://` to nfs-ganesha in a network namespace through the nfs suite's proxy adding 0.5 ms each way (ringvm only: QEMU's `migrate file:` needs a mounted path and this host has no kernel NFS client). ringvm: `savevm-start` with `converge` none, auto (QEMU's auto-converge rule, 20% then +10% per second pass that does not shrink, as the floor; straight to the throttle the last pass measured as needed when that is more) or dirty-limit (`--dirty-ring 1024`; a vCPU that dirtied more than the target can take is limited to its share of 40% of the target's measured rate, halved each pass that does not shrink, sleeping when its ring fills). QEMU 10: `migrate file:` with mapped-ram + multifd (4 channels) + direct-io, no bandwidth cap, downtime-limit 5 ms, without a policy, with auto-converge, or with dirty-limit (`-accel kvm,dirty-ring-size=4096`, its default vcpu-dirty-limit 1 MB/s). Each run is capped (60 s, or the time to write the RAM twice at 30 MB/s plus 20 s if longer), then cancelled (savevm-end, migrate_cancel). 'done' counts the runs that completed; time and pause are of those; 'sleep/pass' is dirty-limit-throttle-time-per-round; 'kept' is the guest's pages rewritten per second while the snapshot ran over its rate just before (1.00: not slowed); 'work lost' is what that cost the guest over a completed snapshot, (1 - kept) x total time, in seconds of its own speed; 'target MB/s' is what ringvm's last pass measured the target taking; 'x once' is the total time over 'once ms', the time to write the RAM once at the target's speed, measured in the same run (per size, rate, target and repetition): ringvm's snapshot (`converge` none) of the same guest, filled and then rewriting only 1 MiB/s, so that the host's CPUs are as busy as in the runs (on this 2-core host the guest's vCPU takes a core from the NFS server and proxy), one pass plus the final one with the target's fixed costs (file creation, the closing flush or NFS COMMIT); 'once ms, paused' is the same with the guest paused (every core for the target). The goal is 2x or less.",
        &["guest", "dirtying", "target", "system", "done", "total ms", "x once", "once ms", "once ms, paused", "pause ms", "MB written", "max throttle %", "sleep/pass ms", "kept", "work lost s", "target MB/s"],
        &rows,
    );
    r.end();
    Ok(())
}
