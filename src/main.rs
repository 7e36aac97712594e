//! The ringvm binary: parses the command line and maps outcomes to exit
//! statuses. Errors are printed as one line; status 1.

use std::io::{self, Write};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use ringvm::boot::BootSpec;
use ringvm::cli::{Cli, Command, DemoArgs, RunArgs};
use ringvm::control::{ControlOptions, Controller};
use ringvm::vmm::{SerialConfig, Vm, VmConfig};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_micros()
        .init();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One line: the error, plus what it refers to when clap puts that on the next line.
            let msg = e.to_string();
            let mut lines = msg.lines().map(str::trim).filter(|l| !l.is_empty());
            let mut line = lines.next().unwrap_or("invalid command line").trim_start_matches("error: ").to_string();
            if line.ends_with(':') {
                if let Some(next) = lines.next() {
                    line = format!("{line} {next}");
                }
            }
            eprintln!("ringvm: {line}");
            return ExitCode::from(1);
        }
    };
    match dispatch(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let _ = io::stdout().flush();
            eprintln!("ringvm: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Run(args) => run(args),
        Command::Demo(args) => demo(args),
        Command::State(ringvm::cli::StateCommand::Inspect { file }) => {
            let r = ringvm::snapshot::format::inspect(&file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            println!("{}", file.display());
            for l in &r.lines {
                println!("  {l}");
            }
            Ok(if r.ok { 0 } else { 1 })
        }
        Command::GuestImage { out } => {
            std::fs::write(&out, ringvm::TEST_GUEST_ELF).with_context(|| format!("cannot write {}", out.display()))?;
            Ok(0)
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<u8> {
    let config = VmConfig {
        cpus: args.machine.cpus,
        mem_size: args.machine.memory,
        boot: BootSpec { kernel: args.kernel, initrd: args.initrd, cmdline: args.cmdline },
        serial: args.machine.serial.to_config(),
        no_reboot: args.machine.no_reboot,
        disks: args.machine.disks.clone(),
        iothreads: usize::from(args.machine.iothreads),
        scsi_queues: args.machine.scsi_queues,
    };
    ringvm::control::block_term_signals()?;
    let vm = Vm::build(config)?;
    let opts = ControlOptions { qmp: args.qmp, paused: args.paused, name: args.name };
    let outcome = Controller::new(vm, opts)?.run()?;
    Ok(outcome.exit_code())
}

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

fn demo(args: DemoArgs) -> anyhow::Result<u8> {
    let t0 = Instant::now();
    let guest = std::env::temp_dir().join(format!("ringvm-guest-{}.elf", std::process::id()));
    std::fs::write(&guest, ringvm::TEST_GUEST_ELF).with_context(|| format!("cannot write {}", guest.display()))?;
    let rec = Recorder::default();
    let config = VmConfig {
        cpus: args.machine.cpus,
        mem_size: args.machine.memory,
        boot: BootSpec {
            kernel: guest.clone(),
            initrd: None,
            cmdline: format!("work=mem mib={} secs={} rate={}", args.mib, args.secs, args.rate),
        },
        serial: SerialConfig::Writer(Box::new(rec.clone())),
        no_reboot: true,
        disks: args.machine.disks.clone(),
        iothreads: usize::from(args.machine.iothreads),
        scsi_queues: args.machine.scsi_queues,
    };
    let result = Vm::build(config).and_then(|vm| vm.run());
    let _ = std::fs::remove_file(&guest);
    let outcome = result?;
    let total = t0.elapsed();
    let st = rec.0.lock().unwrap_or_else(|e| e.into_inner());
    let text = String::from_utf8_lossy(&st.text);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("--- ringvm demo ---");
    println!("guest:            embedded test guest, {} vCPU(s), {} MiB RAM", args.machine.cpus, args.machine.memory >> 20);
    if let Some(first) = st.first_line {
        println!("first serial line: {:.1} ms after start", ms(first - t0));
    }
    for key in ["fill done", "dirty done", "verify pages"] {
        if let Some(l) = text.lines().find(|l| l.contains(key)) {
            println!("guest reported:   {}", l.trim_start_matches("ringvm-guest: ").trim());
        }
    }
    println!("total:            {:.1} ms", ms(total));
    let code = outcome.exit_code();
    println!("result:           {}", if code == 0 { "PASS" } else { "FAIL" });
    Ok(code)
}
