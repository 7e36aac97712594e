//! Where a snapshot's state goes: a new file beside the name (local, or
//! nfs://), locked while written, renamed into place only when complete.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::rc::Rc;

use super::fsprobe::blocks_inline;
use crate::nfs::{self, NfsError};

/// Where the state goes.
pub(super) enum Target {
    /// A local file (or a kernel NFS mount): O_DIRECT RAM writes from the
    /// ring, buffered metadata.
    /// `punt`: the filesystem may block on submission (see [`blocks_inline`]).
    /// The state is written to `tmp`, a new file beside `dest`, renamed
    /// over `dest` only once its completion record is durable: whatever
    /// was at `dest` stays whole until then, and a failed or cancelled
    /// snapshot removes `tmp` and leaves `dest` alone.
    File { direct: File, buffered: File, punt: bool, tmp: std::path::PathBuf, dest: std::path::PathBuf },
    /// `nfs://`: libnfs's socket driven by this ring, many WRITEs in flight.
    /// As for a file, the state goes to `tmp` beside `dest` and an NFS
    /// RENAME puts it in place once its completion record is committed.
    Nfs { conn: Rc<RefCell<nfs::Conn>>, handler: Option<nfs::Handler>, tmp: nfs::NfsUri, dest: nfs::NfsUri },
}

/// Opens the target, sized and with its header written.
/// Why a state file could not be opened: the caller names the file,
/// except for a bad URI, whose message already quotes it.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error(transparent)]
    BadUri(NfsError),
    #[error("open: {0}")]
    Open(std::io::Error),
    #[error(transparent)]
    Nfs(NfsError),
    #[error("{0}")]
    Write(std::io::Error),
}

impl TargetError {
    /// The message already names the file.
    pub(super) fn names_the_file(&self) -> bool {
        matches!(self, TargetError::BadUri(_))
    }
}

pub(super) fn open_target(path: &str, header: &[u8], file_size: u64, nofollow: bool) -> Result<(Target, bool), TargetError> {
    if nfs::is_uri(path) {
        // Synchronous (bounded by the RPC timeout): this iothread serves
        // only the snapshot, and nobody waits on it.
        let dest = nfs::NfsUri::parse(path).map_err(TargetError::BadUri)?;
        let tmp = dest.with_file(&temp_name(&dest.file));
        let mut n = nfs::Nfs::open_uri(&tmp, nfs::Open::CreateNew).map_err(TargetError::Nfs)?;
        if let Err(e) = n.set_len(file_size).and_then(|()| n.write_all_at(header, 0)) {
            drop(n);
            let _ = nfs::Nfs::unlink(&tmp);
            return Err(TargetError::Nfs(e));
        }
        return Ok((Target::Nfs { conn: nfs::Conn::new(n), handler: None, tmp, dest }, false));
    }
    let (direct, buffered, is_direct, tmp, dest) = open(path, nofollow).map_err(TargetError::Open)?;
    if let Err(e) = buffered.set_len(file_size).and_then(|_| buffered.write_all_at(header, 0)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(TargetError::Write(e));
    }
    let punt = blocks_inline(&direct);
    Ok((Target::File { direct, buffered, punt, tmp, dest }, is_direct))
}

/// Where a snapshot to `path` lands: `path` itself, or with `nofollow` off
/// the file a symlink there points at (as QEMU follows it); and a fresh
/// temporary name beside it.
pub(super) fn destination(path: &str, nofollow: bool) -> std::io::Result<(std::path::PathBuf, std::path::PathBuf)> {
    let p = std::path::Path::new(path);
    let dest = match std::fs::symlink_metadata(p) {
        Ok(m) if m.file_type().is_symlink() && !nofollow => std::fs::canonicalize(p)?,
        _ => p.to_path_buf(),
    };
    let name = dest.file_name().ok_or_else(|| std::io::Error::other("no file name"))?.to_string_lossy().into_owned();
    let tmp = dest.with_file_name(temp_name(&name));
    Ok((dest, tmp))
}

/// A new temporary name beside `name`: `.NAME.ringvm-PID-N.tmp`.
pub(super) fn temp_name(name: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SERIAL: AtomicU64 = AtomicU64::new(0);
    format!(".{name}.ringvm-{}-{}.tmp", std::process::id(), SERIAL.fetch_add(1, Ordering::Relaxed))
}

/// Creates the temporary file (never an existing one, never through a
/// symlink), locked exclusively while it is written.
pub(super) fn open(path: &str, nofollow: bool) -> std::io::Result<(File, File, bool, std::path::PathBuf, std::path::PathBuf)> {
    let (dest, tmp) = destination(path, nofollow)?;
    let buffered = OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(&tmp)?;
    // SAFETY: flock on our own open fd.
    if unsafe { libc::flock(buffered.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let direct = match OpenOptions::new().write(true).custom_flags(libc::O_DIRECT | libc::O_NOFOLLOW).open(&tmp) {
        Ok(d) => (d, true),
        // No O_DIRECT here (some FUSE, older tmpfs): buffered writes.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => match buffered.try_clone() {
            Ok(b) => (b, false),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        },
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    Ok((direct.0, buffered, direct.1, tmp, dest))
}

/// Puts the finished file in place: rename over the destination (the old
/// file, if any, stays whole until this instant, and a VM whose RAM maps
/// it keeps its pages), then the directory entry made durable.
pub(super) fn publish(tmp: &std::path::Path, dest: &std::path::Path) -> std::io::Result<()> {
    std::fs::rename(tmp, dest)?;
    let dir = dest.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    File::open(dir)?.sync_all()
}
