//! ringvm's benchmark harness: every suite measures ringvm side by side
//! with its reference in the same run (fio on the same file for the
//! physical limit, QEMU 10 on the same test guest), repeats each figure,
//! interleaves the systems, and writes every sample, the tables, headline
//! ratios and plots under `perf/results/<date>/<time>-<suite>/`.

use std::path::{Path, PathBuf};
use std::process::Command;

mod bootbench;
mod convbench;
mod fio;
mod firecracker;
mod incbench;
mod linuxbench;
mod nfsbench;
mod plot;
mod qmpbench;
mod report;
mod ringbench;
mod scsibench;
mod snapbench;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};

use report::Report;

#[derive(Parser)]
#[command(about = "ringvm benchmarks: ringvm vs the physical limit (fio) vs QEMU 10, with tables, JSON and plots")]
struct Cli {
    /// The suite to run.
    #[arg(value_enum)]
    suite: Which,
    /// Smoke run: one repetition, small guests, short runs (about a few
    /// minutes for `all`). Its figures are not for quoting.
    #[arg(long)]
    quick: bool,
    /// Repetitions of every figure (default 5; 1 with --quick).
    #[arg(long)]
    reps: Option<usize>,
    /// Guest sizes in MiB for the snapshot suite's size sweep
    /// (default 1024,4096,8192; 256 with --quick), e.g. `--sizes 1024,4096`.
    #[arg(long, value_delimiter = ',')]
    sizes: Option<Vec<u64>>,
    /// Dirty rates in MiB/s for the downtime sweep (default 100,250,500;
    /// 100 with --quick).
    #[arg(long, value_delimiter = ',')]
    rates: Option<Vec<u64>>,
    /// The snapshot and converge suites' targets (default all): `local`
    /// (the local disk, with the dirty-rate sweep), `shm` (/dev/shm), `fuse`
    /// (the NFS stand-in; converge: `fuse500` or `fuse3000` for one of its
    /// delays), `ganesha` (converge: nfs-ganesha), e.g. `--targets shm`.
    #[arg(long, value_delimiter = ',', value_parser = ["local", "shm", "fuse", "fuse500", "fuse3000", "ganesha"])]
    targets: Option<Vec<String>>,
    /// The converge suite's systems (default all): those whose name
    /// contains one of these, e.g. `--systems 'dirty-limit,auto-converge'`
    /// (names: ringvm, ringvm auto, ringvm dirty-limit, QEMU mapped-ram,
    /// QEMU mapped-ram + auto-converge, QEMU mapped-ram + dirty-limit).
    #[arg(long, value_delimiter = ',')]
    systems: Option<Vec<String>>,
    /// Do not install the peers (fio, QEMU 10, fonts, nfs-ganesha) or build
    /// ringvm first; suites whose peer is missing are reported as skipped.
    #[arg(long)]
    no_install: bool,
    /// Measure this ringvm binary instead of target/release/ringvm (an
    /// older build, for a same-day before/after; the test guest and
    /// ringvm-faultfs still come from this tree).
    #[arg(long)]
    ringvm: Option<PathBuf>,
    /// The Firecracker binary for the incremental suite's diff-snapshot
    /// column (default: $FC; no binary, no column). Not packaged here:
    /// perf/README.md says how it was built from source.
    #[arg(long)]
    firecracker: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Which {
    /// Time to the first serial line and to the end of a memory workload, peak RSS.
    Boot,
    /// The real Linux test guest to its root mount and through its I/O self-test.
    Linux,
    /// The ring crate vs fio's io_uring engine on one file.
    Ring,
    /// QMP round-trip latency while the guest spins or does disk I/O.
    Qmp,
    /// virtio-scsi: the guest's scsi-bench in ringvm and QEMU vs host fio, IOPS vs queue depth.
    Scsi,
    /// Live snapshot save, downtime vs dirty rate, and restore, on the local
    /// disk, /dev/shm and an NFS stand-in (FUSE with injected latency).
    Snapshot,
    /// Save and restore to a real NFS server (nfs-ganesha in a network namespace).
    Nfs,
    /// Incremental snapshots against full ones, and chain restores.
    Incremental,
    /// Snapshots of a guest dirtying faster than a slow target: ringvm
    /// with and without auto-converge vs QEMU with and without.
    Converge,
    /// Every suite, in this order.
    All,
}

impl Which {
    fn name(self) -> &'static str {
        match self {
            Which::Boot => "boot",
            Which::Linux => "linux",
            Which::Ring => "ring",
            Which::Qmp => "qmp",
            Which::Scsi => "scsi",
            Which::Snapshot => "snapshot",
            Which::Nfs => "nfs",
            Which::Incremental => "incremental",
            Which::Converge => "converge",
            Which::All => "all",
        }
    }
}

/// What every suite needs.
pub struct Ctx {
    pub root: PathBuf,
    /// target/release/ringvm and ringvm-faultfs.
    pub bin: PathBuf,
    pub faultfs: PathBuf,
    /// A private temporary directory (sockets, the guest image).
    pub dir: PathBuf,
    pub guest: PathBuf,
    pub quick: bool,
    pub reps: usize,
    pub sizes: Option<Vec<u64>>,
    pub rates: Option<Vec<u64>>,
    /// The snapshot and converge suites' targets; `None` is all of them.
    pub targets: Option<Vec<String>>,
    /// The converge suite's systems (name fragments); `None` is all.
    pub systems: Option<Vec<String>>,
    pub have_qemu: bool,
    pub have_fio: bool,
    /// Firecracker's binary and its `--version` line, if one was given.
    pub firecracker: Option<(PathBuf, String)>,
}

impl Ctx {
    /// Scratch space for benchmark files on the project's filesystem
    /// (target/perf-scratch).
    pub fn scratch(&self) -> Result<PathBuf> {
        scratch_dir(&self.root)
    }
}

fn scratch_dir(root: &Path) -> Result<PathBuf> {
    let d = root.join("target/perf-scratch");
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    Ok(d)
}

/// The order in which `systems` take repetition `rep`: rotated by one
/// each time (A B C, B C A, C A B, ...), so drift hits all of them alike.
static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// SIGINT or SIGTERM arrived: the step under way finishes, the others are
/// skipped, and what was measured is written out (tables, JSON, plots).
/// A second signal ends the harness at once.
pub fn stopping() -> bool {
    STOP.load(std::sync::atomic::Ordering::Relaxed)
}

fn catch_stop_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe);
        // SA_RESETHAND makes a second signal take the default action.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_stop_signal as *const () as usize;
            sa.sa_flags = libc::SA_RESETHAND | libc::SA_RESTART;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

pub fn interleaved<T: Clone>(systems: &[T], rep: usize) -> Vec<T> {
    let mut order = systems.to_vec();
    if !order.is_empty() {
        let n = order.len();
        order.rotate_left(rep % n);
    }
    order
}

/// Whether `cmd --version` runs.
pub fn have(cmd: &str) -> bool {
    Command::new(cmd).arg("--version").output().map(|o| o.status.success()).unwrap_or(false)
}

/// QEMU 10 specifically: older QEMUs lack options the suites use.
fn have_qemu10() -> bool {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("version 1"))
        .unwrap_or(false)
}

/// Installs the peers (scripts/peers.sh, idempotent) and builds ringvm's
/// binaries in release mode.
fn prepare(root: &Path) -> Result<()> {
    eprintln!("[ringvm-perf] installing peers (scripts/peers.sh) ...");
    match Command::new("bash").arg(root.join("scripts/peers.sh")).status() {
        Ok(s) if s.success() => {}
        // Not fatal: the suites that need a missing peer say "skipped".
        other => eprintln!("[ringvm-perf] scripts/peers.sh failed ({other:?}); suites whose peer is missing will be skipped"),
    }
    eprintln!("[ringvm-perf] building ringvm (cargo build --release --bins -p ringvm) ...");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo).current_dir(root).args(["build", "--release", "--bins", "-p", "ringvm"]).status().context("running cargo")?;
    if !st.success() {
        bail!("cargo build --release failed");
    }
    Ok(())
}

fn run_suite(w: Which, c: &Ctx, r: &mut Report) -> Result<()> {
    match w {
        Which::Boot => bootbench::suite(c, r),
        Which::Linux => linuxbench::suite(c, r),
        Which::Ring => ringbench::suite(c, r),
        Which::Qmp => qmpbench::suite(c, r),
        Which::Scsi => scsibench::suite(c, r),
        Which::Snapshot => snapbench::suite(c, r),
        Which::Nfs => nfsbench::suite(c, r),
        Which::Incremental => incbench::suite(c, r),
        Which::Converge => convbench::suite(c, r),
        Which::All => unreachable!(),
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    catch_stop_signals();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize()?;
    if !cli.no_install {
        prepare(&root)?;
    }
    let bin = cli.ringvm.clone().unwrap_or_else(|| root.join("target/release/ringvm"));
    let faultfs = root.join("target/release/ringvm-faultfs");
    if !bin.exists() {
        bail!("{} is missing: run without --no-install, or cargo build --release", bin.display());
    }
    let dir = std::env::temp_dir().join(format!("ringvm-perf-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let guest = dir.join("guest.elf");
    let st = Command::new(root.join("target/release/ringvm")).args(["guest-image", "--out"]).arg(&guest).status()?;
    if !st.success() {
        bail!("ringvm guest-image failed");
    }
    let reps = cli.reps.unwrap_or(if cli.quick { 1 } else { 5 }).max(1);
    let c = Ctx {
        root: root.clone(),
        bin,
        faultfs,
        dir: dir.clone(),
        guest,
        quick: cli.quick,
        reps,
        sizes: cli.sizes,
        rates: cli.rates,
        targets: cli.targets,
        systems: cli.systems,
        have_qemu: have_qemu10(),
        have_fio: have("fio"),
        firecracker: firecracker::find(cli.firecracker),
    };
    let mut r = Report::new(&root, &scratch_dir(&root)?, cli.suite.name(), cli.quick, reps)?;
    if !c.have_qemu {
        r.log("QEMU 10 (qemu-system-x86_64) unavailable: every QEMU column is reported as skipped");
    }
    if !c.have_fio {
        r.log("fio unavailable: every fio column (the physical limit) is reported as skipped");
    }
    match &c.firecracker {
        Some((p, v)) => r.log(format!("Firecracker: {} ({v})", p.display())),
        None if matches!(cli.suite, Which::Incremental | Which::All) => {
            r.log("no Firecracker (--firecracker PATH or $FC): the incremental suite's Firecracker diff-snapshot column is reported as skipped")
        }
        None => {}
    }
    let suites = if cli.suite == Which::All {
        vec![Which::Boot, Which::Linux, Which::Ring, Which::Qmp, Which::Scsi, Which::Snapshot, Which::Nfs, Which::Incremental, Which::Converge]
    } else {
        vec![cli.suite]
    };
    for w in suites {
        if stopping() {
            r.log(format!("stopped by a signal: suite {} not run", w.name()));
            continue;
        }
        if let Err(e) = run_suite(w, &c, &mut r) {
            r.fail(w.name(), &e);
        }
    }
    let failed = r.failed();
    r.finish()?;
    let _ = std::fs::remove_dir_all(&dir);
    if !failed.is_empty() {
        bail!("suite(s) failed: {}", failed.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn interleaving_rotates_the_systems() {
        let s = ["a", "b", "c"];
        assert_eq!(super::interleaved(&s, 0), ["a", "b", "c"]);
        assert_eq!(super::interleaved(&s, 1), ["b", "c", "a"]);
        assert_eq!(super::interleaved(&s, 4), ["b", "c", "a"]);
        assert_eq!(super::interleaved(&["x", "y"], 1), ["y", "x"]);
        assert!(super::interleaved::<&str>(&[], 3).is_empty());
    }
}
