//! Building and running a VM: one linear builder of `?` steps, then the
//! control loop that reacts to guest events (exit, reset, faults).

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use devices::legacy::SerialOutput;

use crate::boot::{self, BootEntry, BootImages, BootSpec};
use crate::error::{Error, Result};
use crate::events::{DeviceRequests, EventQueue};
use crate::machine::Machine;
use crate::vcpu::{self, Vcpu, VcpuControl, Vcpus};

pub const MIN_MEMORY: u64 = 16 << 20;
/// APIC ids are 8 bits and the IOAPIC takes the id after the last CPU.
pub const MAX_CPUS: u8 = 254;

pub enum SerialConfig {
    Stdio,
    File(PathBuf),
    Off,
    Writer(Box<dyn Write + Send>),
}

/// The disk iothreads' poll window when the host has CPUs to spare.
pub const DEFAULT_IOTHREAD_POLL: std::time::Duration = std::time::Duration::from_micros(50);

pub struct VmConfig {
    pub cpus: u8,
    pub mem_size: u64,
    pub boot: BootSpec,
    pub serial: SerialConfig,
    pub no_reboot: bool,
    /// MADV_HUGEPAGE on guest RAM.
    pub thp: bool,
    /// Entries per vCPU dirty ring (`None` or 0: KVM's dirty bitmap).
    pub dirty_ring: Option<u32>,
    pub disks: Vec<crate::disk::DiskSpec>,
    pub iothreads: usize,
    /// How long a disk iothread polls for new requests and completions
    /// before sleeping (QEMU's iothread poll-max-ns); zero: never; `None`:
    /// [`DEFAULT_IOTHREAD_POLL`] if the host has a CPU for every vCPU and
    /// iothread, else zero.
    pub iothread_poll: Option<std::time::Duration>,
    /// Request queues per virtio-scsi controller (None: one per vCPU).
    pub scsi_queues: Option<u32>,
    /// Restore from this state file instead of booting.
    pub restore: Option<PathBuf>,
    /// Wait for QMP migrate-incoming (QEMU's `-incoming defer`).
    pub incoming_defer: bool,
}

/// A checked state file and its parsed state section.
pub struct PendingRestore {
    pub path: PathBuf,
    pub checked: crate::snapshot::format::Checked,
    pub section: crate::snapshot::StateSection,
    /// An incremental file's bases, newest first.
    pub bases: Vec<(PathBuf, crate::snapshot::format::Checked)>,
}

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest wrote this code to the debug-exit port.
    GuestExit(u8),
    /// The guest reset itself and `--no-reboot` was given.
    Reset,
    /// The guest powered off.
    Shutdown,
    /// QMP `quit` or a termination signal.
    Quit,
}

impl Outcome {
    pub fn exit_code(&self) -> u8 {
        match self {
            Outcome::GuestExit(c) => *c,
            Outcome::Reset | Outcome::Shutdown | Outcome::Quit => 0,
        }
    }
}

pub struct Vm {
    machine: Machine,
    vcpus: Vcpus,
    events: Arc<EventQueue>,
    boot: BootSpec,
    /// The kernel and initrd as first read: reboots load these, not the
    /// files (a restored VM reads them at its first reboot).
    boot_images: Option<BootImages>,
    cpus: u8,
    no_reboot: bool,
    storage: crate::disk::Storage,
    scsi_queues: u32,
    /// A state file validated at build time, to load before the guest runs.
    pending: Option<PendingRestore>,
    pub resets: u64,
    pub started: Instant,
}

fn host_memory() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib * 1024)
}

/// Checks the configuration before anything is created.
pub fn validate(config: &VmConfig) -> Result<()> {
    if config.cpus == 0 || config.cpus > MAX_CPUS {
        return Err(Error::Config(format!("--cpus {} is out of range (1..={MAX_CPUS})", config.cpus)));
    }
    if config.mem_size < MIN_MEMORY {
        return Err(Error::Config(format!("--memory {} KiB is below the minimum of {} MiB", config.mem_size >> 10, MIN_MEMORY >> 20)));
    }
    if !config.mem_size.is_multiple_of(4096) {
        return Err(Error::Config("--memory must be a multiple of 4 KiB".into()));
    }
    if let Some(host) = host_memory() {
        if config.mem_size > host {
            return Err(Error::Config(format!("--memory {} MiB is larger than the host's {} MiB", config.mem_size >> 20, host >> 20)));
        }
    }
    if config.restore.is_some() || config.incoming_defer {
        return Ok(());
    }
    boot::probe_kernel(&config.boot.kernel)?;
    if let Some(initrd) = &config.boot.initrd {
        boot::open_regular("initrd", initrd)?;
    }
    Ok(())
}

impl Vm {
    /// Creates the machine, loads the kernel, creates the vCPUs (parked).
    /// Once every file is open, the calling thread's SIGTERM, SIGINT and
    /// SIGHUP are blocked (the threads started here inherit that), for
    /// the [`Controller`](crate::control::Controller)'s signalfd.
    pub fn build(mut config: VmConfig) -> Result<Vm> {
        validate(&config)?;
        let started = Instant::now();
        vcpu::install_kick_handler()?;
        let events = Arc::new(EventQueue::new()?);
        let stdin_to_guest = matches!(config.serial, SerialConfig::Stdio) && stdin_is_interactive();
        let serial_out = match config.serial {
            SerialConfig::Stdio => SerialOutput::Stdout,
            SerialConfig::File(p) => SerialOutput::Writer(Box::new(std::io::LineWriter::new(create_serial_file(&p)?))),
            SerialConfig::Off => SerialOutput::Sink,
            SerialConfig::Writer(w) => SerialOutput::Writer(w),
        };
        let machine = Machine::new(config.mem_size, config.thp, config.dirty_ring, config.cpus, serial_out, Arc::new(DeviceRequests(events.clone())))?;
        if usize::from(config.cpus) > machine.max_vcpus() {
            return Err(Error::Config(format!("--cpus {} exceeds KVM's limit of {}", config.cpus, machine.max_vcpus())));
        }
        let mut bases = Vec::new();
        let checked = match &config.restore {
            Some(p) => {
                let mut chain = crate::snapshot::chain::open_chain(p).map_err(|e| Error::Config(e.to_string()))?;
                let c = chain.remove(0).1;
                bases = chain;
                let h = &c.header.machine;
                if h.cpus != config.cpus || h.mem_size != config.mem_size {
                    return Err(Error::Config(format!(
                        "state file {}: the VM has {} vCPU(s) and {} MiB, the file {} and {} MiB",
                        p.display(),
                        config.cpus,
                        config.mem_size >> 20,
                        h.cpus,
                        h.mem_size >> 20
                    )));
                }
                // The saved disks (their clones, if taken) come back as
                // saved unless given again (then they must be those files).
                // An unplugged disk's slot comes back empty either way.
                let slot = |d: &crate::snapshot::format::DiskDesc| crate::disk::DiskSpec {
                    path: d.clone.clone().unwrap_or_else(|| d.path.clone()).into(),
                    readonly: d.readonly,
                    direct: d.direct,
                    iothread: d.iothread,
                    queues: d.queues,
                    removed: d.removed,
                    werror: devices::virtio::scsi::ErrorAction::Enospc,
                    rerror: devices::virtio::scsi::ErrorAction::Report,
                };
                if !config.disks.is_empty() && h.disks.iter().any(|d| d.removed) {
                    // The disks given again are the ones still plugged, in
                    // order; the unplugged ones' slots go back between them.
                    let mut given = std::mem::take(&mut config.disks).into_iter();
                    for d in &h.disks {
                        if d.removed {
                            config.disks.push(slot(d));
                        } else if let Some(g) = given.next() {
                            config.disks.push(g);
                        }
                    }
                    config.disks.extend(given);
                }
                if config.disks.is_empty() {
                    config.disks = h.disks.iter().map(slot).collect();
                    if h.scsi_queues > 0 && config.scsi_queues.is_none() {
                        config.scsi_queues = Some(h.scsi_queues);
                    }
                    config.iothreads = config.iothreads.max(h.iothreads);
                }
                crate::snapshot::check_disks(&h.disks, &config.disks.iter().map(|d| d.path.display().to_string()).collect::<Vec<_>>())
                    .map_err(|e| Error::Config(format!("state file {}: {e}", p.display())))?;
                Some(c)
            }
            None => None,
        };
        let queues = config.scsi_queues.unwrap_or(u32::from(config.cpus));
        let poll = config.iothread_poll.unwrap_or_else(|| {
            let host = std::thread::available_parallelism().map_or(1, |n| n.get());
            if usize::from(config.cpus) + config.iothreads.max(1) <= host {
                DEFAULT_IOTHREAD_POLL
            } else {
                std::time::Duration::ZERO
            }
        });
        if !config.disks.is_empty() {
            log::info!("iothread poll window: {} us", poll.as_micros());
        }
        // Every file is opened and read before the first thread starts, and
        // only then are the termination signals blocked (for the control
        // thread's signalfd, inherited by every thread from here on): an
        // open or read that blocks can still be ended by SIGTERM or ^C.
        let opened = crate::disk::open_all(&config.disks)?;
        if let (Some(c), Some(p)) = (&checked, &config.restore) {
            let media: Vec<(u64, bool)> = opened.iter().map(|d| (d.lun.blocks * u64::from(d.lun.block_size), d.lun.readonly)).collect();
            crate::snapshot::check_disk_media(&c.header.machine.disks, &media).map_err(|e| Error::Config(format!("state file {}: {e}", p.display())))?;
        }
        let boot_images = match &checked {
            None if !config.incoming_defer => Some(BootImages::read(&config.boot)?),
            _ => None,
        };
        crate::control::block_term_signals()?;
        let storage = crate::disk::attach(&machine, &config.disks, opened, config.iothreads, queues, poll, events.clone())?;
        let entry = match &boot_images {
            Some(images) => boot::load_images(&machine.mem, images, config.mem_size, config.cpus)?,
            // Placeholder: the vCPUs get their saved state before they run.
            _ => BootEntry { mode: boot::EntryMode::Pvh, entry: 0, boot_info: 0, kernel_end: 0, initrd: None },
        };
        let vcpus = Self::create_vcpus(&machine, config.cpus, &events, entry)?;
        let pending = match (checked, &config.restore) {
            (Some(c), Some(path)) => {
                let section = crate::snapshot::parse_section(path, &c)?;
                // Every vCPU parked (and done with its power-on set-up, which
                // writes boot tables into RAM) before RAM is loaded over it.
                vcpus.pause()?;
                Some(PendingRestore { path: path.clone(), checked: c, section, bases: std::mem::take(&mut bases) })
            }
            _ if config.incoming_defer => {
                vcpus.pause()?;
                None
            }
            _ => None,
        };
        if stdin_to_guest {
            spawn_stdin_reader(machine.serial.clone())?;
        }
        Ok(Vm {
            machine,
            vcpus,
            events,
            boot: config.boot,
            boot_images,
            cpus: config.cpus,
            no_reboot: config.no_reboot,
            storage,
            scsi_queues: queues,
            resets: 0,
            started,
            pending,
        })
    }

    /// Typing into the guest's serial port from another thread.
    pub fn serial_input(&self) -> SerialInput {
        SerialInput(self.machine.serial.clone())
    }

    fn create_vcpus(machine: &Machine, cpus: u8, events: &Arc<EventQueue>, entry: BootEntry) -> Result<Vcpus> {
        let msr_list: Vec<u32> = machine.kvm.get_msr_index_list().map_err(crate::error::kvm("KVM_GET_MSR_INDEX_LIST"))?.as_slice().to_vec();
        let list = (0..cpus)
            .map(|id| {
                Vcpu::new(
                    &machine.vm,
                    id,
                    cpus,
                    &machine.supported_cpuid,
                    machine.pio.clone(),
                    machine.mmio.clone(),
                    machine.mem.clone(),
                    events.clone(),
                    msr_list.clone(),
                    machine.dirty_rings.clone(),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Vcpu::start(list, VcpuControl::new(usize::from(cpus), entry))
    }

    pub fn machine(&self) -> &Machine {
        &self.machine
    }

    pub fn events(&self) -> &Arc<EventQueue> {
        &self.events
    }

    pub fn vcpus(&self) -> &Vcpus {
        &self.vcpus
    }

    /// The boot options this VM was given (an incoming VM may have none).
    pub fn given_boot(&self) -> crate::snapshot::GivenBoot {
        let b = &self.boot;
        crate::snapshot::GivenBoot {
            kernel: (!b.kernel.as_os_str().is_empty()).then(|| b.kernel.clone()),
            initrd: b.initrd.clone(),
            cmdline: (!b.kernel.as_os_str().is_empty()).then(|| b.cmdline.clone()),
        }
    }

    /// A VM restored by migrate-incoming without boot options reboots
    /// from the kernel the state file names (read at the first reboot).
    pub fn adopt_boot(&mut self, m: &crate::snapshot::format::MachineDesc) {
        if self.boot.kernel.as_os_str().is_empty() {
            if let Some(k) = m.kernel.as_ref().filter(|k| !k.is_empty()) {
                self.boot = BootSpec { kernel: k.into(), initrd: m.initrd.clone().map(Into::into), cmdline: m.cmdline.clone() };
                self.boot_images = None;
            }
        }
    }

    pub fn take_pending_restore(&mut self) -> Option<PendingRestore> {
        self.pending.take()
    }

    /// Applies machine and vCPU state after RAM was loaded (vCPUs parked).
    pub fn apply_state(&mut self, section: crate::snapshot::StateSection) -> Result<()> {
        self.machine.restore_state(&section.machine)?;
        self.vcpus.restore_state(section.vcpus)?;
        if let Some(v) = &section.serial {
            self.machine.serial.lock().unwrap_or_else(|e| e.into_inner()).restore(v).map_err(|e| Error::Config(e.to_string()))?;
        }
        self.storage.restore_state(&section.devices).map_err(|e| Error::Config(e.to_string()))
    }

    /// Starts unplugging a disk by its query-block name; `done` runs
    /// (on an iothread) once its requests in flight are done and its file
    /// is closed.
    pub fn unplug_disk(&mut self, device: &str, done: impl FnOnce() + Send + 'static) -> std::result::Result<crate::disk::BlockInfo, crate::disk::DiskError> {
        self.storage.unplug(device, done)
    }

    pub fn storage(&self) -> &crate::disk::Storage {
        &self.storage
    }

    pub fn scsi_queues(&self) -> u32 {
        self.scsi_queues
    }

    pub fn boot_spec(&self) -> &BootSpec {
        &self.boot
    }

    pub fn cpus(&self) -> u8 {
        self.cpus
    }

    pub fn blocks(&self) -> &[crate::disk::BlockInfo] {
        &self.storage.blocks
    }

    /// The disks in the order they were given (as a state file lists them).
    pub fn disks_in_order(&self) -> Vec<crate::disk::BlockInfo> {
        let mut b = self.storage.blocks.clone();
        b.sort_by_key(|b| b.index);
        b
    }

    /// Presses the ACPI power button (the Generic Event Device's interrupt).
    pub fn press_power_button(&self) -> std::io::Result<()> {
        self.machine.power_button.trigger()
    }

    pub fn no_reboot(&self) -> bool {
        self.no_reboot
    }

    /// Resets the whole VM: vCPUs out, kernel reloaded, interrupt
    /// controllers and vCPUs back to power-on state; running again if
    /// `resume`. Returns the guest ranges the VMM rewrote.
    pub fn reset(&mut self, resume: bool) -> Result<Vec<(u64, u64)>> {
        self.vcpus.pause()?;
        // Devices back to power-on state: each controller quiesces its
        // queues through their iothreads (this thread waits on their
        // events; they never wait on it).
        for c in &self.storage.controllers {
            c.lock().unwrap_or_else(|e| e.into_inner()).device_reset();
        }
        if self.boot_images.is_none() {
            self.boot_images = Some(BootImages::read(&self.boot)?);
        }
        let images = self.boot_images.as_ref().expect("read above");
        let entry = boot::load_images(&self.machine.mem, images, self.machine.mem_size, self.cpus)?;
        self.machine.reset_irqchips()?;
        self.vcpus.reset(entry)?;
        self.resets += 1;
        if resume {
            self.vcpus.resume();
        }
        Ok(entry.written())
    }

    /// Stops the vCPUs and flushes the console.
    pub fn shutdown(&mut self) {
        self.vcpus.stop();
        self.storage.stop();
        self.machine.serial.lock().unwrap_or_else(|e| e.into_inner()).flush();
    }
}

/// Feeds a terminal's input to the guest's UART (line by line: the
/// terminal stays in canonical mode, so ringvm never leaves it raw).
/// A handle that types bytes into the guest's COM1 (as a terminal would).
#[derive(Clone)]
pub struct SerialInput(Arc<std::sync::Mutex<devices::legacy::Serial>>);

impl SerialInput {
    /// Queues what fits in the UART's receive FIFO; returns how much did.
    pub fn send(&self, bytes: &[u8]) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).enqueue_input(bytes)
    }
}

/// Creates (or truncates) the serial output file without ever blocking:
/// a FIFO would hang the open until someone reads it, so only a regular
/// file (or a character device such as /dev/null) is taken.
fn create_serial_file(p: &std::path::Path) -> Result<File> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let err = |source| Error::OpenFile { what: "serial output file", path: p.to_owned(), source };
    if let Ok(m) = std::fs::metadata(p) {
        if !m.is_file() && !m.file_type().is_char_device() {
            return Err(err(std::io::Error::other("not a regular file (for a pipe, use --serial stdio)")));
        }
    }
    let f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).custom_flags(libc::O_NONBLOCK).open(p).map_err(err)?;
    let m = f.metadata().map_err(err)?;
    if !m.is_file() && !m.file_type().is_char_device() {
        return Err(err(std::io::Error::other("not a regular file (for a pipe, use --serial stdio)")));
    }
    // Writes block as usual from here.
    // SAFETY: F_SETFL on our own open fd.
    if unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&f), libc::F_SETFL, 0) } != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(f)
}

/// Whether stdin carries input for the guest: a terminal, a pipe or a
/// socket (QEMU's `-serial stdio` reads those too). /dev/null and regular
/// files are left alone.
fn stdin_is_interactive() -> bool {
    use std::os::unix::fs::FileTypeExt;
    let stdin = std::io::stdin();
    if std::io::IsTerminal::is_terminal(&stdin) {
        return true;
    }
    // /proc/self/fd/0 names whatever stdin is; a closed stdin is not input.
    std::fs::metadata("/proc/self/fd/0").map(|m| m.file_type().is_fifo() || m.file_type().is_socket()).unwrap_or(false)
}

fn spawn_stdin_reader(serial: Arc<std::sync::Mutex<devices::legacy::Serial>>) -> Result<()> {
    std::thread::Builder::new()
        .name("serial-stdin".into())
        .spawn(move || {
            crate::seccomp::apply_or_exit(crate::seccomp::Role::Helper);
            use std::io::Read;
            let mut buf = [0u8; 64];
            let mut stdin = std::io::stdin();
            while let Ok(n) = stdin.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut rest = &buf[..n];
                while !rest.is_empty() {
                    let taken = serial.lock().unwrap_or_else(|e| e.into_inner()).enqueue_input(rest);
                    rest = &rest[taken..];
                    if taken == 0 {
                        // The guest hasn't drained its FIFO yet.
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                }
            }
        })
        .map(|_| ())
        .map_err(|source| Error::Thread { name: "serial-stdin".into(), source })
}
