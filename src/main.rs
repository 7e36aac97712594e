//! The ringvm binary: parses the command line and maps outcomes to exit
//! statuses. Errors are printed as one line; status 1.

use std::io::{self, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use ringvm::boot::BootSpec;
use ringvm::cli::{Cli, Command, RunArgs};
use ringvm::control::{ControlOptions, Controller};
use ringvm::vmm::{Vm, VmConfig};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).format_timestamp_micros().init();
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
        Command::Demo(args) => ringvm::demo::demo(args),
        Command::State(ringvm::cli::StateCommand::Inspect { file }) => {
            let r = ringvm::snapshot::format::inspect(&file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            println!("{}", file.display());
            for l in &r.lines {
                println!("  {l}");
            }
            Ok(if r.ok { 0 } else { 1 })
        }
        Command::State(ringvm::cli::StateCommand::Merge { file, out }) => {
            let (files, bytes) = ringvm::snapshot::merge::merge(&file, &out).map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("{}: {files} file(s) merged, {} MiB of RAM", out.display(), bytes >> 20);
            Ok(0)
        }
        Command::GuestImage { out } => {
            std::fs::write(&out, ringvm::TEST_GUEST_ELF).with_context(|| format!("cannot write {}", out.display()))?;
            Ok(0)
        }
    }
}

fn run(mut args: RunArgs) -> anyhow::Result<u8> {
    // `--loadstate FILE,lazy=on|off` (the spelling of --restore-ram lazy).
    if let Some(s) = args.loadstate.as_ref().and_then(|p| p.to_str()).map(str::to_string) {
        if let Some(p) = s.strip_suffix(",lazy=on") {
            args.loadstate = Some(p.into());
            args.restore_ram = ringvm::snapshot::restore::RamMode::Lazy;
        } else if let Some(p) = s.strip_suffix(",lazy=off") {
            args.loadstate = Some(p.into());
        }
    }
    let (mut cpus, mut memory) = (args.machine.cpus(), args.machine.memory());
    let mut boot = BootSpec { kernel: args.kernel.clone().unwrap_or_default(), initrd: args.initrd.clone(), cmdline: args.cmdline.clone().unwrap_or_default() };
    if let Some(state) = &args.loadstate {
        // The machine comes from the file; what the command line gives must agree.
        let header = ringvm::snapshot::format::read_header(state).map_err(|e| anyhow::anyhow!("state file {}: {e}", state.display()))?;
        let m = &header.machine;
        // Given explicitly (even at its default value), it must agree.
        if args.machine.cpus.is_some_and(|c| c != m.cpus) {
            anyhow::bail!("state file {}: --cpus {cpus} but the file holds {} vCPU(s)", state.display(), m.cpus);
        }
        if args.machine.memory.is_some_and(|v| v != m.mem_size) {
            anyhow::bail!("state file {}: --memory {} MiB but the file holds {} MiB", state.display(), memory >> 20, m.mem_size >> 20);
        }
        // The source's command line may come along (kernel, initrd,
        // cmdline): it must describe the guest the file holds.
        let given = ringvm::snapshot::GivenBoot { kernel: args.kernel.clone(), initrd: args.initrd.clone(), cmdline: args.cmdline.clone() };
        ringvm::snapshot::check_boot(m, &given).map_err(|e| anyhow::anyhow!("state file {}: {e}", state.display()))?;
        cpus = m.cpus;
        memory = m.mem_size;
        if args.kernel.is_none() {
            boot = BootSpec { kernel: m.kernel.clone().unwrap_or_default().into(), initrd: m.initrd.clone().map(Into::into), cmdline: m.cmdline.clone() };
        }
    }
    let config = VmConfig {
        cpus,
        mem_size: memory,
        boot,
        serial: args.machine.serial.to_config(),
        no_reboot: args.machine.no_reboot,
        thp: !args.machine.no_thp,
        dirty_ring: args.machine.dirty_ring,
        disks: args.machine.disks.clone(),
        iothreads: usize::from(args.machine.iothreads),
        iothread_poll: args.machine.iothread_poll_us.map(Duration::from_micros),
        scsi_queues: args.machine.scsi_queues,
        restore: args.loadstate.clone(),
        incoming_defer: args.incoming.is_some(),
    };
    // Vm::build blocks SIGTERM/SIGINT/SIGHUP once its files are open (the
    // control loop serves them); until then they end ringvm at once.
    ringvm::seccomp::set_mode(args.machine.seccomp);
    let vm = Vm::build(config)?;
    let opts = ControlOptions {
        qmp: args.qmp,
        paused: args.paused,
        name: args.name,
        incoming: args.incoming.is_some(),
        stats: None,
        statefile_dir: args.statefile_dir,
        restore_ram: args.restore_ram,
    };
    let outcome = Controller::new(vm, opts)?.run()?;
    Ok(outcome.exit_code())
}
