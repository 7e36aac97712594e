//! `ringvm demo`: the main job on an embedded default, in one process:
//! boot the built-in test guest, snapshot it live while it rewrites its
//! memory, restore the file into a new VM, let the guest verify every
//! page, and print the figures.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::boot::BootSpec;
use crate::cli::DemoArgs;
use crate::control::{ControlOptions, Controller};
use crate::vmm::{SerialConfig, Vm, VmConfig};

/// Serial output that goes to stdout and records when lines arrive.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<RecorderState>>);

#[derive(Default)]
struct RecorderState {
    first_line: Option<Instant>,
    text: Vec<u8>,
}

impl Write for Recorder {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut st = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if st.first_line.is_none() && buf.contains(&b'\n') {
            st.first_line = Some(Instant::now());
        }
        st.text.extend_from_slice(buf);
        let mut out = io::stdout().lock();
        out.write_all(buf)?;
        if buf.contains(&b'\n') {
            out.flush()?;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        io::stdout().flush()
    }
}

/// Drives the demo's live snapshot over the VM's own QMP socket, as any
/// client would: after the fill, savevm-start, then poll query-savevm.
/// The guest rewrites pages until it is told to verify (a 'v' on its
/// serial port), which happens once the snapshot is over and `secs` have
/// passed since the fill -- whatever the outcome, so the guest always ends.
fn demo_snapshot(
    sock: std::path::PathBuf,
    statefile: std::path::PathBuf,
    rec: Recorder,
    input: crate::vmm::SerialInput,
    secs: u64,
) -> anyhow::Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut filled = None;
    let r = (|| {
        while !String::from_utf8_lossy(&rec.0.lock().unwrap_or_else(|e| e.into_inner()).text).contains("fill done") {
            anyhow::ensure!(Instant::now() < deadline, "the guest never finished its fill");
            std::thread::sleep(Duration::from_millis(5));
        }
        filled = Some(Instant::now());
        demo_savevm(&sock, &statefile, deadline)
    })();
    if let Some(t) = filled {
        let left = Duration::from_secs(secs).saturating_sub(t.elapsed());
        std::thread::sleep(left);
    }
    demo_type(&input, b"v");
    r
}

/// Types `bytes` into the guest's serial port, waiting (up to 10 s) for
/// room in its receive FIFO.
fn demo_type(input: &crate::vmm::SerialInput, mut bytes: &[u8]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !bytes.is_empty() && Instant::now() < deadline {
        let n = input.send(bytes);
        bytes = &bytes[n..];
        if n == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn demo_savevm(sock: &std::path::Path, statefile: &std::path::Path, deadline: Instant) -> anyhow::Result<serde_json::Value> {
    use crate::qmp::client::Client;
    use serde_json::{json, Value};
    let mut q = Client::negotiated(sock, Duration::from_secs(60))?;
    q.execute("savevm-start", json!({"statefile": statefile}))?;
    loop {
        let st = q.execute("query-savevm", Value::Null)?;
        if st["status"] != "active" {
            q.execute("savevm-end", Value::Null)?;
            return Ok(st);
        }
        anyhow::ensure!(Instant::now() < deadline, "snapshot did not finish");
        std::thread::sleep(Duration::from_millis(2));
    }
}

pub fn demo(args: DemoArgs) -> anyhow::Result<u8> {
    let t0 = Instant::now();
    crate::control::block_term_signals()?;
    crate::seccomp::set_mode(args.machine.seccomp);
    let tmp = std::env::temp_dir().join(format!("ringvm-demo-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let guest = tmp.join("guest.elf");
    std::fs::write(&guest, crate::TEST_GUEST_ELF).with_context(|| format!("cannot write {}", guest.display()))?;
    let sock = tmp.join("qmp.sock");
    let statefile = args.statefile.clone().unwrap_or_else(|| tmp.join("vm.state"));
    let rec = Recorder::default();
    let config = VmConfig {
        cpus: args.machine.cpus(),
        mem_size: args.machine.memory(),
        boot: BootSpec {
            kernel: guest.clone(),
            initrd: None,
            // Until told to verify: see demo_snapshot.
            cmdline: format!("work=mem mib={} secs=inf rate={}", args.mib, args.rate),
        },
        serial: SerialConfig::Writer(Box::new(rec.clone())),
        no_reboot: true,
        thp: !args.machine.no_thp,
        dirty_ring: args.machine.dirty_ring,
        disks: args.machine.disks.clone(),
        iothreads: usize::from(args.machine.iothreads),
        iothread_poll: args.machine.iothread_poll_us.map(Duration::from_micros),
        scsi_queues: args.machine.scsi_queues,
        restore: None,
        incoming_defer: false,
    };
    let vm = Vm::build(config)?;
    let snap = {
        let (s, f, r, input, secs) = (sock.clone(), statefile.clone(), rec.clone(), vm.serial_input(), args.secs);
        std::thread::Builder::new().name("demo-client".into()).spawn(move || demo_snapshot(s, f, r, input, secs))?
    };
    let outcome = Controller::new(vm, ControlOptions { qmp: Some(sock.clone()), ..Default::default() })?.run()?;
    let snap = snap.join().map_err(|_| anyhow::anyhow!("demo client panicked"))?;
    let st = rec.0.lock().unwrap_or_else(|e| e.into_inner());
    let text = String::from_utf8_lossy(&st.text);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("--- ringvm demo ---");
    println!("guest:             embedded test guest, {} vCPU(s), {} MiB RAM", args.machine.cpus(), args.machine.memory() >> 20);
    if let Some(first) = st.first_line {
        println!("first serial line: {:.1} ms after start", ms(first - t0));
    }
    for key in ["fill done", "dirty done", "verify pages"] {
        if let Some(l) = text.lines().find(|l| l.contains(key)) {
            println!("guest reported:    {}", l.trim_start_matches("ringvm-guest: ").trim());
        }
    }
    let mut ok = outcome.exit_code() == 0;
    match &snap {
        Ok(s) => {
            let mb = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
            println!(
                "live snapshot:     {} in {} ms while the guest rewrote pages: {} passes, {:.0} MB written at {:.0} MB/s, downtime {:.2} ms{}",
                s["status"].as_str().unwrap_or("?"),
                s["total-time"],
                s["iterations"],
                mb(&s["bytes"]) / 1e6,
                mb(&s["throughput-mbps"]),
                mb(&s["downtime"]),
                if s["direct-io"] == true { ", O_DIRECT" } else { "" }
            );
            if let Some(e) = s.get("error") {
                println!("snapshot error:    {e}");
            }
            ok &= s["status"] == "completed";
            match crate::snapshot::format::inspect(&statefile) {
                Ok(r) => {
                    let used = std::fs::metadata(&statefile).map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512).unwrap_or(0);
                    println!(
                        "state file:        {} ({} MiB on disk, sparse), checksums {}",
                        statefile.display(),
                        used >> 20,
                        if r.ok { "all ok" } else { "FAILED" }
                    );
                    ok &= r.ok;
                }
                Err(e) => {
                    println!("state file:        {}: {e}", statefile.display());
                    ok = false;
                }
            }
        }
        Err(e) => {
            println!("live snapshot:     FAILED: {e:#}");
            ok = false;
        }
    }
    // Restore the snapshot into a fresh VM; the guest carries on from the
    // moment of the snapshot and verifies every page it wrote.
    if ok {
        let rrec = Recorder::default();
        let t1 = Instant::now();
        let rconfig = VmConfig {
            cpus: args.machine.cpus(),
            mem_size: args.machine.memory(),
            boot: BootSpec { kernel: guest.clone(), initrd: None, cmdline: String::new() },
            serial: SerialConfig::Writer(Box::new(rrec.clone())),
            no_reboot: true,
            thp: !args.machine.no_thp,
            dirty_ring: args.machine.dirty_ring,
            disks: vec![],
            iothreads: 1,
            iothread_poll: args.machine.iothread_poll_us.map(Duration::from_micros),
            scsi_queues: None,
            restore: Some(statefile.clone()),
            incoming_defer: false,
        };
        let stats = Arc::new(crate::control::ControlStats::default());
        let restored = Vm::build(rconfig).and_then(|vm| {
            let built = t1.elapsed();
            // The restored guest carries on rewriting pages; once its RAM is
            // loaded, let it run a moment, then tell it to verify.
            let (input, st, secs) = (vm.serial_input(), stats.clone(), args.secs);
            std::thread::Builder::new()
                .name("demo-verify".into())
                .spawn(move || {
                    let deadline = Instant::now() + Duration::from_secs(300);
                    while st.restore_us.load(std::sync::atomic::Ordering::Relaxed) == 0 && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    std::thread::sleep(Duration::from_secs(secs).min(Duration::from_millis(500)));
                    demo_type(&input, b"v");
                })
                .map_err(|source| crate::Error::Thread { name: "demo-verify".into(), source })?;
            Controller::new(vm, ControlOptions { stats: Some(stats.clone()), ..Default::default() })?.run().map(|o| (built, o))
        });
        match restored {
            Ok((built, o)) => {
                let load_us = stats.restore_us.load(std::sync::atomic::Ordering::Relaxed) as f64;
                let bytes = stats.restore_bytes.load(std::sync::atomic::Ordering::Relaxed) as f64;
                let ready = built + Duration::from_micros(load_us as u64);
                let rtext = String::from_utf8_lossy(&rrec.0.lock().unwrap_or_else(|e| e.into_inner()).text).into_owned();
                let verify =
                    rtext.lines().find(|l| l.contains("verify pages")).unwrap_or("(no verify line)").trim_start_matches("ringvm-guest: ").trim().to_string();
                println!(
                    "restore:           guest running {:.1} ms after start: {:.0} MB of RAM loaded in {:.1} ms ({:.0} MB/s, io_uring, every page checksummed)",
                    ms(ready),
                    bytes / 1e6,
                    load_us / 1e3,
                    bytes / load_us.max(1.0)
                );
                println!("restored guest:    {verify}, exit {}", o.exit_code());
                ok &= o.exit_code() == 0 && rtext.contains("RESULT PASS");
            }
            Err(e) => {
                println!("restore:           FAILED: {e}");
                ok = false;
            }
        }
    }
    println!("total:             {:.1} ms (boot, run, live snapshot, restore, verify)", ms(t0.elapsed()));
    println!("result:            {}", if ok { "PASS" } else { "FAIL" });
    drop(st);
    if args.statefile.is_none() {
        let _ = std::fs::remove_dir_all(&tmp);
    } else {
        let _ = std::fs::remove_file(&guest);
    }
    Ok(if ok { 0 } else { 1 })
}
