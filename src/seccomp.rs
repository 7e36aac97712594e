//! Seccomp filters per thread role, built with seccompiler and installed by
//! each thread on itself (`--seccomp on`, the default). A system call
//! outside a role's list kills the whole VMM (SIGSYS); `--seccomp log`
//! allows and logs it instead (kernel audit log), `--seccomp off` installs
//! nothing.
//!
//! Filters stack: a thread spawned by a filtered thread runs under its
//! parent's filter and its own. The control thread spawns the snapshot
//! iothread and the loader at run time, so its list covers theirs; each of
//! them then narrows itself to its own role.
//!
//! `ioctl` is allowed by request type only: KVM's (0xAE) for vCPUs and the
//! dirty log; terminal/socket queries (0x54, e.g. FIONREAD in libnfs) and
//! FICLONE (0x94) where those roles need them. Lists were taken from
//! `strace -f -Y` of the whole test suite plus what glibc and std may call
//! on rarer paths (sleeps, panics, name resolution).
//!
//! For tests: `RINGVM_SECCOMP_SELFTEST=<role>` makes the thread of that role
//! issue one forbidden call (getppid) right after installing its filter.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};

use seccompiler::{BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Violations kill the VMM.
    On,
    /// Violations are allowed and logged by the kernel.
    Log,
    /// No filters.
    Off,
}

static MODE: AtomicU8 = AtomicU8::new(2);

/// Sets the mode for every thread installed from now on (call once, early).
pub fn set_mode(m: Mode) {
    MODE.store(
        match m {
            Mode::On => 0,
            Mode::Log => 1,
            Mode::Off => 2,
        },
        Ordering::Relaxed,
    );
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Main thread: QMP, run control, snapshot and restore orchestration.
    Control,
    Vcpu,
    /// A disk iothread: its ring and eventfds only.
    IoThread,
    /// The snapshot iothread: its ring, the state file (or an NFS socket),
    /// KVM's dirty log.
    Snapshot,
    /// The restore loader: its own ring, the state file or an NFS socket.
    Loader,
    /// The lazy restore's fault thread: its ring, the state file and the
    /// userfaultfd over guest RAM.
    Faults,
    /// Small helpers (page prefaulting, stdin reader).
    Helper,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Control => "control",
            Role::Vcpu => "vcpu",
            Role::IoThread => "iothread",
            Role::Snapshot => "snapshot",
            Role::Loader => "loader",
            Role::Faults => "faults",
            Role::Helper => "helper",
        }
    }
}

/// Every thread: memory, signals, futexes, exit, time, logging.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigaction,
    libc::SYS_sigaltstack,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_getrandom,
    libc::SYS_clock_gettime,
    // The ring's poll window watches its own involuntary context switches.
    libc::SYS_getrusage,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_restart_syscall,
    libc::SYS_prctl,
    libc::SYS_fcntl,
    libc::SYS_lseek,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
];

/// Files and sockets (state files, NFS, name resolution).
const FILES_AND_NET: &[i64] = &[
    libc::SYS_openat,
    // Read-ahead of a state file's header and metadata (posix_fadvise).
    libc::SYS_fadvise64,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_ftruncate,
    libc::SYS_fstatfs,
    libc::SYS_statfs,
    libc::SYS_fallocate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_uname,
    libc::SYS_getuid,
    libc::SYS_getgid,
    libc::SYS_geteuid,
    libc::SYS_getegid,
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_bind,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_shutdown,
    libc::SYS_poll,
    libc::SYS_ppoll,
];

const RING: &[i64] = &[libc::SYS_io_uring_enter, libc::SYS_io_uring_register];

/// What only the control thread does (besides everything its children do).
const CONTROL: &[i64] = &[
    // Threads it spawns install their own filters under its one.
    libc::SYS_seccomp,
    libc::SYS_io_uring_setup,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_eventfd2,
    libc::SYS_signalfd4,
    libc::SYS_listen,
    libc::SYS_accept4,
    libc::SYS_unlink,
    libc::SYS_umask,
    libc::SYS_prlimit64,
    libc::SYS_setpriority,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_kill,
    libc::SYS_getcwd,
    // `demo` cleans its scratch directory up.
    libc::SYS_getdents64,
    libc::SYS_unlinkat,
    libc::SYS_mkdirat,
    // The snapshot iothread, spawned here, inherits this filter: what its
    // own allows must be allowed here too (a new state file locked while
    // written, linked and renamed into place).
    libc::SYS_flock,
    libc::SYS_linkat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
];

const KVM_IOCTL: u64 = 0xAE;
const TTY_SOCK_IOCTL: u64 = 0x54;
const FS_IOCTL: u64 = 0x94;
const USERFAULTFD_IOCTL: u64 = 0xAA;

fn syscalls(role: Role) -> (Vec<i64>, &'static [u64]) {
    let mut v: Vec<i64> = COMMON.to_vec();
    let ioctls: &'static [u64] = match role {
        Role::Vcpu => &[KVM_IOCTL],
        Role::IoThread => {
            v.extend(RING);
            &[]
        }
        Role::Snapshot => {
            v.extend(RING);
            v.extend(FILES_AND_NET);
            // The state goes to a new file (unnamed, or beside the
            // destination), locked while written, linked and renamed over
            // it once complete (the directory entry made durable); a failed
            // named one is removed by the control side's reaper thread.
            v.extend([
                libc::SYS_unlink,
                libc::SYS_unlinkat,
                libc::SYS_flock,
                libc::SYS_linkat,
                libc::SYS_rename,
                libc::SYS_renameat,
                libc::SYS_renameat2,
                libc::SYS_getcwd,
            ]);
            &[KVM_IOCTL, TTY_SOCK_IOCTL]
        }
        Role::Loader => {
            v.extend(RING);
            v.extend(FILES_AND_NET);
            v.extend([libc::SYS_io_uring_setup, libc::SYS_setpriority]);
            &[TTY_SOCK_IOCTL]
        }
        Role::Faults => {
            v.extend(RING);
            &[USERFAULTFD_IOCTL]
        }
        Role::Helper => {
            v.extend([libc::SYS_setpriority, libc::SYS_poll]);
            &[TTY_SOCK_IOCTL]
        }
        Role::Control => {
            v.extend(RING);
            v.extend(FILES_AND_NET);
            v.extend(CONTROL);
            &[KVM_IOCTL, TTY_SOCK_IOCTL, FS_IOCTL]
        }
    };
    v.sort_unstable();
    v.dedup();
    (v, ioctls)
}

fn program(role: Role, on_violation: SeccompAction) -> Result<BpfProgram, seccompiler::BackendError> {
    let (calls, ioctls) = syscalls(role);
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = calls.into_iter().map(|c| (c, vec![])).collect();
    if !ioctls.is_empty() {
        // The request's type byte (bits 8..15).
        let by_type = ioctls
            .iter()
            .map(|&t| SeccompRule::new(vec![SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::MaskedEq(0xff00), t << 8)?]))
            .collect::<Result<Vec<_>, _>>()?;
        rules.insert(libc::SYS_ioctl, by_type);
    }
    if let std::collections::btree_map::Entry::Vacant(e) = rules.entry(libc::SYS_openat) {
        // glibc's free() reads /proc/sys/vm/overcommit_memory the first
        // time it shrinks a thread arena's heap, on whatever thread frees:
        // read-only opens (exactly O_RDONLY|O_CLOEXEC) stay allowed.
        let ro = SeccompCondition::new(2, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, (libc::O_RDONLY | libc::O_CLOEXEC) as u64)?;
        e.insert(vec![SeccompRule::new(vec![ro])?]);
    }
    let arch = TargetArch::try_from(std::env::consts::ARCH)?;
    SeccompFilter::new(rules, on_violation, SeccompAction::Allow, arch)?.try_into()
}

/// Installs `prog` on the calling thread with SECCOMP_FILTER_FLAG_SPEC_ALLOW.
///
/// Without that flag, on hosts whose SSB mitigation is "prctl and seccomp"
/// (a common default), the kernel also turns on Speculative Store Bypass
/// Disable for every filtered thread, slowing memory-heavy work (page
/// checksums, copies). SSBD guards a process against code speculating
/// inside it (JIT sandboxes); a guest runs no code in the VMM's address
/// space, and KVM handles the guest's own mitigations. QEMU's -sandbox makes
/// the same choice.
fn install(prog: &BpfProgram) -> std::io::Result<()> {
    let len = u16::try_from(prog.len()).map_err(|_| std::io::Error::from_raw_os_error(libc::E2BIG))?;
    let fprog = libc::sock_fprog { len, filter: prog.as_ptr().cast::<libc::sock_filter>().cast_mut() };
    const SECCOMP_SET_MODE_FILTER: libc::c_ulong = 1;
    const SECCOMP_FILTER_FLAG_SPEC_ALLOW: libc::c_ulong = 1 << 2;
    // SAFETY: prctl and seccomp on the calling thread; `fprog` points at
    // `prog`'s instructions (same layout as the kernel's sock_filter),
    // which outlive the call (the kernel copies them).
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::syscall(libc::SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_SPEC_ALLOW, &fprog as *const libc::sock_fprog) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Installs `role`'s filter on the calling thread (per the mode).
pub fn apply(role: Role) -> Result<(), String> {
    let action = match MODE.load(Ordering::Relaxed) {
        0 => SeccompAction::KillProcess,
        1 => SeccompAction::Log,
        _ => return Ok(()),
    };
    let prog = program(role, action).map_err(|e| format!("seccomp filter for the {} thread: {e}", role.name()))?;
    install(&prog).map_err(|e| format!("seccomp filter for the {} thread: {e}", role.name()))?;
    if std::env::var("RINGVM_SECCOMP_SELFTEST").as_deref() == Ok(role.name()) {
        log::warn!("seccomp self-test: the {} thread makes a forbidden system call", role.name());
        // SAFETY: getppid has no side effects; here it must kill the VMM.
        unsafe { libc::syscall(libc::SYS_getppid) };
    }
    Ok(())
}

/// [`apply`] for threads that cannot report an error: a failure is logged
/// and ends the VMM (a thread must not run unfiltered when filters are on).
pub fn apply_or_exit(role: Role) {
    if let Err(e) = apply(role) {
        log::error!("{e}");
        eprintln!("ringvm: error: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_compiles_and_none_allows_process_creation() {
        for r in [Role::Control, Role::Vcpu, Role::IoThread, Role::Snapshot, Role::Loader, Role::Faults, Role::Helper] {
            program(r, SeccompAction::KillProcess).unwrap();
            let (calls, _) = syscalls(r);
            for bad in [libc::SYS_execve, libc::SYS_execveat, libc::SYS_fork, libc::SYS_vfork, libc::SYS_ptrace, libc::SYS_mount, libc::SYS_getppid] {
                assert!(!calls.contains(&bad), "{r:?} allows syscall {bad}");
            }
        }
        let (vcpu, _) = syscalls(Role::Vcpu);
        // (openat is added read-only by `program`, not in the list.)
        assert!(!vcpu.contains(&libc::SYS_openat) && !vcpu.contains(&libc::SYS_socket));
        let (io, ioctls) = syscalls(Role::IoThread);
        assert!(!io.contains(&libc::SYS_openat) && ioctls.is_empty());
    }
}
