//! Command-line parsing helpers.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::vmm::SerialConfig;

#[derive(Parser, Debug)]
#[command(name = "ringvm", version, about = "An io_uring-centric, storage-first KVM VMM")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Boot a guest kernel.
    Run(RunArgs),
    /// The main job on the embedded test guest: boot, run `mem`, verify, print figures.
    Demo(DemoArgs),
    /// Write the embedded test guest (a PVH ELF) to a file.
    GuestImage {
        /// Output path.
        #[arg(long)]
        out: PathBuf,
    },
    /// State files.
    #[command(subcommand)]
    State(StateCommand),
}

#[derive(Subcommand, Debug)]
pub enum StateCommand {
    /// Print a state file's header and sections and check every checksum.
    Inspect {
        /// The state file.
        file: PathBuf,
    },
    /// Fold an incremental chain into one stand-alone state file (written
    /// beside OUT, renamed into place once complete).
    Merge {
        /// The newest file of the chain.
        file: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

impl MachineArgs {
    /// --cpus, or its default (1).
    pub fn cpus(&self) -> u8 {
        self.cpus.unwrap_or(1)
    }
    /// --memory, or its default (512 MiB).
    pub fn memory(&self) -> u64 {
        self.memory.unwrap_or(512 << 20)
    }
}

#[derive(Args, Debug, Clone)]
pub struct MachineArgs {
    /// Number of vCPUs [default: 1]. With --loadstate, when given, it must
    /// match the state file (None: not given, so the file decides).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=254))]
    pub cpus: Option<u8>,
    /// Guest RAM (e.g. 512M, 2G; a bare number is MiB) [default: 512M].
    /// With --loadstate, when given, it must match the state file.
    #[arg(long, value_parser = parse_size)]
    pub memory: Option<u64>,
    /// Serial console: stdio, file=PATH or none.
    #[arg(long, default_value = "stdio", value_parser = parse_serial)]
    pub serial: SerialArg,
    /// Exit (status 0) when the guest resets instead of rebooting it.
    #[arg(long)]
    pub no_reboot: bool,
    /// Do not back guest RAM with transparent huge pages. By default it is
    /// (MADV_HUGEPAGE, as QEMU does): a 1 MiB disk read into guest RAM is
    /// then one DMA segment instead of 256 (about 2x the large-transfer
    /// throughput on a virtio host disk); the cost is KVM splitting huge
    /// pages whenever a snapshot turns dirty logging on.
    #[arg(long)]
    pub no_thp: bool,
    /// Entries in each vCPU's KVM dirty ring (a power of two, at least
    /// 256; 4096 is QEMU's suggestion), instead of KVM's dirty bitmap (0,
    /// the default, as QEMU's dirty-ring-size). The ring tells which vCPU
    /// dirtied each page: a snapshot's dirty-limit, which slows only the
    /// vCPUs that dirty, needs it, and is then the default policy.
    #[arg(long)]
    pub dirty_ring: Option<u32>,
    /// Seccomp filters per thread role: on (a forbidden system call kills
    /// ringvm), log (allowed, logged by the kernel), off.
    #[arg(long, value_enum, default_value = "on")]
    pub seccomp: crate::seccomp::Mode,
    /// A disk on virtio-scsi: path=FILE[,readonly=on][,cache=none|writeback][,iothread=N][,queues=N]
    /// (repeat for more LUNs).
    #[arg(long = "disk", value_parser = crate::disk::parse_disk)]
    pub disks: Vec<crate::disk::DiskSpec>,
    /// iothreads serving the disks' request queues.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=64))]
    pub iothreads: u8,
    /// Microseconds a disk iothread keeps polling its queues and ring for
    /// new work before it sleeps, while few requests are in flight (a
    /// request that arrives meanwhile costs no wake-up); 0 turns polling
    /// off. Default: 50 when the host has a CPU for every vCPU and
    /// iothread, else 0 (spinning would take time from the vCPUs).
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub iothread_poll_us: Option<u64>,
    /// virtio-scsi request queues per controller (default: one per vCPU).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub scsi_queues: Option<u32>,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Kernel: a bzImage or an ELF with a PVH note.
    #[arg(long, required_unless_present_any = ["loadstate", "incoming"])]
    pub kernel: Option<PathBuf>,
    /// Restore a VM from a state file (Proxmox's spelling) instead of booting.
    /// The source's command line may be given with it (QEMU users do):
    /// --kernel, --initrd, --cmdline, --cpus, --memory and --disk must then
    /// agree with the file.
    #[arg(long, conflicts_with = "incoming")]
    pub loadstate: Option<PathBuf>,
    /// `defer`: wait for QMP migrate-incoming {"uri": "file:PATH"} (QEMU's
    /// spelling); boot options given must agree with that file.
    #[arg(long, value_parser = ["defer"])]
    pub incoming: Option<String>,
    /// Initial ramdisk.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long)]
    pub cmdline: Option<String>,
    /// QMP control socket: PATH or unix:PATH,server=on,wait=off.
    #[arg(long, value_parser = crate::qmp::server::parse_spec)]
    pub qmp: Option<PathBuf>,
    /// Start with the vCPUs paused; QMP `cont` starts them (QEMU's -S).
    #[arg(short = 'S', long)]
    pub paused: bool,
    /// Confine state files named over QMP (savevm-start, migrate,
    /// migrate-incoming) to files directly inside DIR: no symlinks (also
    /// refused at open, O_NOFOLLOW), no other directories, no nfs://.
    #[arg(long, value_name = "DIR")]
    pub statefile_dir: Option<PathBuf>,
    /// VM name (reported by query-name).
    #[arg(long)]
    pub name: Option<String>,
    /// How a restore (--loadstate, migrate-incoming) brings guest RAM in:
    /// `read` (io_uring reads into guest RAM), `map` (guest RAM becomes a
    /// private copy-on-write mapping of the file, which must then stay
    /// unchanged while the VM runs), `auto` (map from tmpfs/ramfs, read
    /// otherwise), `lazy` (the guest runs at once, RAM is faulted in and
    /// streamed behind it through a userfaultfd; also `--loadstate
    /// FILE,lazy=on`).
    #[arg(long, value_enum, default_value_t)]
    pub restore_ram: crate::snapshot::restore::RamMode,
    #[command(flatten)]
    pub machine: MachineArgs,
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// MiB of guest memory the workload fills and verifies.
    #[arg(long, default_value_t = 256)]
    pub mib: u64,
    /// Seconds of rewriting pages after the fill, at least: the guest
    /// rewrites until the live snapshot is over, then verifies.
    #[arg(long, default_value_t = 1)]
    pub secs: u64,
    /// Rewrite rate in MiB/s (0 = as fast as the guest can).
    #[arg(long, default_value_t = 100)]
    pub rate: u64,
    /// Where the live snapshot goes (default: a temporary file, removed).
    #[arg(long)]
    pub statefile: Option<PathBuf>,
    #[command(flatten)]
    pub machine: MachineArgs,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialArg {
    Stdio,
    File(PathBuf),
    None,
}

impl SerialArg {
    pub fn to_config(&self) -> SerialConfig {
        match self {
            SerialArg::Stdio => SerialConfig::Stdio,
            SerialArg::File(p) => SerialConfig::File(p.clone()),
            SerialArg::None => SerialConfig::Off,
        }
    }
}

/// Parses sizes like `512M`, `2G`, `1T`, `4096K`, `65536B`; a bare number is MiB (as QEMU's -m).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'B' => 1,
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size suffix '{c}' (use K, M, G or T)")),
            };
            (&s[..i], m)
        }
        _ => (s, 1 << 20),
    };
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a size (e.g. 512M, 2G)"))?;
    if n == 0 {
        return Err("size must be greater than zero".into());
    }
    n.checked_mul(mult).ok_or_else(|| format!("size '{s}' is too large"))
}

pub fn parse_serial(s: &str) -> Result<SerialArg, String> {
    match s {
        "stdio" => Ok(SerialArg::Stdio),
        "none" | "off" => Ok(SerialArg::None),
        _ => match s.strip_prefix("file=") {
            Some(p) if !p.is_empty() => Ok(SerialArg::File(PathBuf::from(p))),
            _ => Err(format!("'{s}' is not stdio, file=PATH or none")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("1024"), Ok(1 << 30));
        assert_eq!(parse_size("4096K"), Ok(4 << 20));
        assert!(parse_size("0").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("abc").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn serial() {
        assert_eq!(parse_serial("stdio"), Ok(SerialArg::Stdio));
        assert_eq!(parse_serial("file=/tmp/x"), Ok(SerialArg::File("/tmp/x".into())));
        assert_eq!(parse_serial("none"), Ok(SerialArg::None));
        assert!(parse_serial("file=").is_err());
        assert!(parse_serial("tcp:1").is_err());
    }
}
