//! What can go wrong loading guest RAM from a state file (read, mapped,
//! lazy or from a chain).

use std::io;
use std::sync::Arc;

use super::format::FormatError;
use crate::nfs::NfsError;

/// A failed load. The VM it was loading into never runs.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LoadError {
    /// A gpa the file names is not guest RAM of this VM.
    #[error("guest memory at {gpa:#x}: {reason}")]
    GuestMemory { gpa: u64, reason: String },
    #[error("page at gpa {0:#x} fails its checksum")]
    Checksum(u64),
    #[error("short read at file offset {offset:#x} ({got} of {want} bytes): the file is truncated")]
    ShortRead { offset: u64, got: usize, want: usize },
    #[error("the RAM region at gpa {gpa:#x} (file bytes {offset:#x}..{end:#x}) lies outside the file ({len} bytes): truncated")]
    RegionOutsideFile { gpa: u64, offset: u64, end: u64, len: u64 },
    /// A system call failed; `what` says which and where.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: Arc<io::Error>,
    },
    #[error(transparent)]
    Nfs(#[from] NfsError),
    #[error("read at file offset {offset:#x}: {source}")]
    NfsRead {
        offset: u64,
        #[source]
        source: NfsError,
    },
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("io_uring: {0}")]
    Ring(String),
    #[error("cannot start the {0} thread: {1}")]
    Thread(&'static str, Arc<io::Error>),
    #[error("a loader thread panicked")]
    Panicked,
    /// The mode cannot load this file (a lazy or mapped restore of nfs://).
    #[error("{0}")]
    Unsupported(&'static str),
    /// A file of a chain, named.
    #[error("{file}: {source}")]
    InFile {
        file: String,
        #[source]
        source: Box<LoadError>,
    },
}

impl LoadError {
    /// For `map_err`: an I/O error while doing `what`.
    pub fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> LoadError {
        let what = what.into();
        move |e| LoadError::Io { what, source: Arc::new(e) }
    }

    /// For `map_err`: the last OS error while doing `what`.
    pub fn last_os(what: impl Into<String>) -> LoadError {
        LoadError::Io { what: what.into(), source: Arc::new(io::Error::last_os_error()) }
    }

    pub fn thread(name: &'static str) -> impl FnOnce(io::Error) -> LoadError {
        move |e| LoadError::Thread(name, Arc::new(e))
    }

    pub fn ring(e: impl std::fmt::Display) -> LoadError {
        LoadError::Ring(e.to_string())
    }
}
