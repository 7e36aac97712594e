//! Where a state file is, as QMP clients and the command line name it:
//! parsed in one place.
//!
//! - `savevm-start {"statefile": ...}`, `--loadstate`, `state inspect`: a
//!   bare path or `nfs://SERVER[:PORT]/EXPORT/FILE`;
//! - `migrate` / `migrate-incoming {"uri": ...}` (QEMU's spelling):
//!   `file:PATH` or the same `nfs://` URI.

use std::path::PathBuf;

use crate::nfs::NfsUri;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StateUri {
    File(PathBuf),
    Nfs(NfsUri),
}

impl StateUri {
    /// A state file name: a bare path, or an `nfs://` URI (checked now, so
    /// a bad one is an error before anything starts).
    pub fn from_statefile(s: &str) -> Result<StateUri, String> {
        if s.is_empty() {
            return Err("the state file name is empty".into());
        }
        if crate::nfs::is_uri(s) {
            return NfsUri::parse(s).map(StateUri::Nfs);
        }
        Ok(StateUri::File(PathBuf::from(s)))
    }

    /// QEMU's migration URI: `file:PATH` or `nfs://...`.
    pub fn from_migrate_uri(s: &str) -> Result<StateUri, String> {
        if let Some(p) = s.strip_prefix("file:") {
            if p.is_empty() {
                return Err(format!("Invalid URI '{s}': no path after file:"));
            }
            return Ok(StateUri::File(PathBuf::from(p)));
        }
        if crate::nfs::is_uri(s) {
            return NfsUri::parse(s).map(StateUri::Nfs);
        }
        Err(format!("Invalid URI '{s}': ringvm uses file:PATH or nfs://SERVER[:PORT]/EXPORT/FILE"))
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
        assert!(StateUri::from_migrate_uri("/a/b.state").unwrap_err().contains("Invalid URI"));
        assert!(StateUri::from_migrate_uri("tcp:host:4444").unwrap_err().contains("Invalid URI"));
        assert!(StateUri::from_migrate_uri("file:").is_err());
        assert!(StateUri::from_statefile("").is_err());
        assert!(StateUri::from_statefile("nfs://srv:0/e/f").unwrap_err().contains("port"));
    }
}
