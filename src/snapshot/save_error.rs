//! What can fail a live snapshot (the save job's side; the control side
//! adds its own reasons, such as a pause that never came).

use std::io;

use super::format::FormatError;
use super::target::TargetError;
use crate::nfs::NfsError;

#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Nfs(#[from] NfsError),
    /// A system call on the state file failed; `what` says which.
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    /// The finished file could not take its name.
    #[error("rename {from} to {to}: {source}")]
    Publish {
        from: String,
        to: String,
        #[source]
        source: io::Error,
    },
    #[error("KVM_GET_DIRTY_LOG: {0}")]
    DirtyLog(kvm_ioctls::Error),
    #[error("guest memory: {0}")]
    GuestMemory(String),
    #[error("the file was deleted during the snapshot")]
    Deleted,
    #[error("the file was replaced or moved during the snapshot")]
    Replaced,
    #[error("the file was truncated during the snapshot ({len} bytes, {laid_out} laid out)")]
    Truncated { len: u64, laid_out: u64 },
    #[error("the final pause exceeded {0} ms (final-timeout-ms; the target is too slow): the guest was resumed")]
    PauseTimeout(f64),
    #[error("cancelled by savevm-end")]
    Cancelled,
}

impl SaveError {
    pub(super) fn io(what: &'static str) -> impl FnOnce(io::Error) -> SaveError {
        move |source| SaveError::Io { what, source }
    }

    /// The message names the file already (else the status adds it).
    pub(super) fn names_the_file(&self) -> bool {
        match self {
            SaveError::Target(t) => t.names_the_file(),
            SaveError::Nfs(NfsError::BadUri { .. }) => true,
            _ => false,
        }
    }
}
