//! Where a state file is, as QMP clients and the command line name it:
//! parsed in one place.
//!
//! - `savevm-start {"statefile": ...}`, `--loadstate`, `state inspect`: a
//!   bare path or `nfs://SERVER[:PORT]/EXPORT/FILE`;
//! - `migrate` / `migrate-incoming {"uri": ...}` (QEMU's spelling):
//!   `file:PATH` or the same `nfs://` URI.

use std::path::PathBuf;

use crate::nfs::{NfsError, NfsUri};

/// A state file name or migration URI that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    #[error("the state file name is empty")]
    Empty,
    #[error("Invalid URI '{0}': no path after file:")]
    NoPath(String),
    #[error("Invalid URI '{0}': ringvm uses file:PATH or nfs://SERVER[:PORT]/EXPORT/FILE")]
    Scheme(String),
    #[error(transparent)]
    Nfs(#[from] NfsError),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StateUri {
    File(PathBuf),
    Nfs(NfsUri),
}

impl StateUri {
    /// A state file name: a bare path, or an `nfs://` URI (checked now, so
    /// a bad one is an error before anything starts).
    pub fn from_statefile(s: &str) -> Result<StateUri, UriError> {
        if s.is_empty() {
            return Err(UriError::Empty);
        }
        if crate::nfs::is_uri(s) {
            return Ok(StateUri::Nfs(NfsUri::parse(s)?));
        }
        Ok(StateUri::File(PathBuf::from(s)))
    }

    /// QEMU's migration URI: `file:PATH` or `nfs://...`.
    pub fn from_migrate_uri(s: &str) -> Result<StateUri, UriError> {
        if let Some(p) = s.strip_prefix("file:") {
            if p.is_empty() {
                return Err(UriError::NoPath(s.into()));
            }
            return Ok(StateUri::File(PathBuf::from(p)));
        }
        if crate::nfs::is_uri(s) {
            return Ok(StateUri::Nfs(NfsUri::parse(s)?));
        }
        Err(UriError::Scheme(s.into()))
    }

    pub fn is_nfs(&self) -> bool {
        matches!(self, StateUri::Nfs(_))
    }

    /// The name the loaders and the saving iothread take (a path, or the
    /// URI as the user wrote it).
    pub fn to_name(&self) -> String {
        match self {
            StateUri::File(p) => p.display().to_string(),
            StateUri::Nfs(u) => u.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_spellings_and_their_errors() {
        assert_eq!(StateUri::from_migrate_uri("file:/a/b.state"), Ok(StateUri::File("/a/b.state".into())));
        assert_eq!(StateUri::from_statefile("/a/b.state"), Ok(StateUri::File("/a/b.state".into())));
        assert_eq!(StateUri::from_statefile("rel.state"), Ok(StateUri::File("rel.state".into())));
        let n = StateUri::from_migrate_uri("nfs://srv:2049/export/vm.state").unwrap();
        assert!(n.is_nfs());
        assert_eq!(n.to_name(), "nfs://srv:2049/export/vm.state");
        assert_eq!(StateUri::from_statefile("nfs://srv:2049/export/vm.state").unwrap(), n);
        assert_eq!(StateUri::from_migrate_uri("/a/b.state"), Err(UriError::Scheme("/a/b.state".into())));
        assert_eq!(StateUri::from_migrate_uri("tcp:host:4444"), Err(UriError::Scheme("tcp:host:4444".into())));
        assert!(StateUri::from_migrate_uri("tcp:host:4444").unwrap_err().to_string().starts_with("Invalid URI 'tcp:host:4444'"));
        assert_eq!(StateUri::from_migrate_uri("file:"), Err(UriError::NoPath("file:".into())));
        assert_eq!(StateUri::from_statefile(""), Err(UriError::Empty));
        assert!(matches!(StateUri::from_statefile("nfs://srv:0/e/f"), Err(UriError::Nfs(NfsError::BadUri { reason, .. })) if reason.contains("port")));
    }
}
