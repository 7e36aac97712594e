//! What can go wrong talking to an NFS server.

/// An NFS failure. Every message names what was being done; a failed
/// call keeps the errno libnfs returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NfsError {
    /// libnfs could not be loaded or lacks a symbol.
    #[error("nfs:// needs libnfs 4.x or 5.x (Debian: libnfs13): {0}")]
    Library(String),
    /// The URI does not parse.
    #[error("{uri}: {reason} (want nfs://SERVER[:PORT]/EXPORT/FILE[?OPTION=VALUE&...])")]
    BadUri { uri: String, reason: String },
    /// A call failed: what it was, the server's or library's words, the errno.
    #[error("{what}: {detail}")]
    Call { what: String, detail: String, errno: i32 },
    /// The mount failed and the server's MOUNT service cannot be reached.
    #[error("mount: {detail}: {why}")]
    Unreachable { detail: String, why: String },
    /// The server broke the protocol.
    #[error("server returned {got} bytes for a {want}-byte read")]
    LongRead { got: usize, want: usize },
}

impl NfsError {
    /// The errno of a failed call.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NfsError::Call { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}
