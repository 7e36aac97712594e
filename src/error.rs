//! The VMM's error type.

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open /dev/kvm")]
    KvmOpen(#[source] kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (need 12)")]
    KvmApiVersion(i32),
    #[error("KVM lacks a required capability: {0}")]
    KvmCap(&'static str),
    #[error("{op}")]
    Kvm { op: &'static str, source: kvm_ioctls::Error },
    #[error("cannot allocate {size} bytes of guest memory")]
    GuestMemory { size: u64, source: vm_memory::mmap::FromRangesError },
    #[error("guest memory access at {addr:#x}")]
    GuestMemoryAccess { addr: u64, source: vm_memory::GuestMemoryError },
    #[error("cannot open {what} {}", path.display())]
    OpenFile { what: &'static str, path: PathBuf, source: io::Error },
    #[error("{} is neither an ELF kernel with a PVH note nor a bzImage", .0.display())]
    UnknownKernelFormat(PathBuf),
    #[error("ELF kernel {} has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)", .0.display())]
    NoPvhNote(PathBuf),
    #[error("cannot load kernel {}", path.display())]
    KernelLoad { path: PathBuf, source: linux_loader::loader::Error },
    #[error("boot configuration")]
    BootConfig(#[source] linux_loader::configurator::Error),
    #[error("initrd {} ({size} bytes) does not fit below {limit:#x}", path.display())]
    InitrdTooBig { path: PathBuf, size: u64, limit: u64 },
    #[error("kernel command line is too long ({0} bytes)")]
    CmdlineTooLong(usize),
    #[error("{0}")]
    Config(String),
    #[error("device setup")]
    Device(#[from] devices::Error),
    #[error("cannot create thread {name}")]
    Thread { name: String, source: io::Error },
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("vCPU{cpu}: {what}")]
    Vcpu { cpu: usize, what: String },
    #[error("io_uring")]
    Ring(#[from] ring::Error),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { op, source }
}
