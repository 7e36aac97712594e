//! Where a snapshot's state goes: a new file (unnamed where the filesystem
//! allows, else beside the name; local, or nfs://), locked while written,
//! put in place only when complete.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use super::fsprobe::blocks_inline;
use crate::nfs::{self, NfsError};

/// Where the state goes.
pub(super) enum Target {
    /// A local file (or a kernel NFS mount): O_DIRECT RAM writes from the
    /// ring, buffered metadata.
    /// `punt`: the filesystem may block on submission (see [`blocks_inline`]).
    /// The state is written to `new` (its descriptor is the buffered
    /// one), put over the destination only once its completion record is
    /// durable: whatever was there stays whole until then, and a failed or
    /// cancelled snapshot leaves it alone (see [`NewFile`]).
    File { direct: File, new: NewFile, punt: bool },
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
    let new = destination(path, nofollow).and_then(|dest| NewFile::create(&dest)).map_err(TargetError::Open)?;
    let (direct, is_direct) = match new.open_direct() {
        Ok(d) => d,
        Err(e) => {
            new.discard();
            return Err(TargetError::Open(e));
        }
    };
    if let Err(e) = new.file.set_len(file_size).and_then(|_| new.file.write_all_at(header, 0)) {
        new.discard();
        return Err(TargetError::Write(e));
    }
    let punt = blocks_inline(&direct);
    Ok((Target::File { direct, new, punt }, is_direct))
}

/// Where a snapshot to `path` lands: `path` itself, or with `nofollow` off
/// the file a symlink there points at (as QEMU follows it).
pub(super) fn destination(path: &str, nofollow: bool) -> std::io::Result<PathBuf> {
    let p = Path::new(path);
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.file_type().is_symlink() && !nofollow => std::fs::canonicalize(p),
        _ => Ok(p.to_path_buf()),
    }
}

/// A new temporary name beside `name`: `.NAME.ringvm-PID-N.tmp`.
pub(super) fn temp_name(name: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SERIAL: AtomicU64 = AtomicU64::new(0);
    format!(".{name}.ringvm-{}-{}.tmp", std::process::id(), SERIAL.fetch_add(1, Ordering::Relaxed))
}

/// A file being written for a destination it replaces only once complete.
///
/// Where the filesystem can (ext4, XFS, btrfs, tmpfs) it is an unnamed
/// O_TMPFILE file in the destination's directory: until [`NewFile::publish`]
/// links it, no other process can open, write or remove it, and a failed,
/// cancelled or killed writer leaves nothing behind (the kernel frees it
/// with its last descriptor). Elsewhere (FUSE, kernel NFS mounts) it is a
/// new file under a temporary name beside the destination, which a failed
/// writer must remove ([`NewFile::leftover`]).
#[derive(Debug)]
pub struct NewFile {
    /// Opened read-write, locked exclusively.
    pub file: File,
    /// The temporary name, when the file has one.
    pub name: Option<PathBuf>,
    pub dest: PathBuf,
}

impl NewFile {
    /// Creates the file for `dest` (never an existing one, never through a
    /// symlink), locked exclusively while it is written.
    pub fn create(dest: &Path) -> std::io::Result<NewFile> {
        let fname = dest.file_name().ok_or_else(|| std::io::Error::other("no file name"))?.to_string_lossy().into_owned();
        let anon = OpenOptions::new().read(true).write(true).mode(0o600).custom_flags(libc::O_TMPFILE).open(dir_of(dest));
        let (file, name) = match anon {
            Ok(f) => (f, None),
            // No O_TMPFILE on this filesystem (FUSE, NFS) or kernel.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::EISDIR) | Some(libc::EINVAL)) => {
                let tmp = dest.with_file_name(temp_name(&fname));
                let f = OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(&tmp)?;
                (f, Some(tmp))
            }
            Err(e) => return Err(e),
        };
        let nf = NewFile { file, name, dest: dest.to_path_buf() };
        // SAFETY: flock on our own open fd.
        if unsafe { libc::flock(nf.file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            nf.discard();
            return Err(e);
        }
        Ok(nf)
    }

    /// A second descriptor of the file for the RAM writes: with O_DIRECT
    /// (true), or where the filesystem has none (some FUSE, older tmpfs)
    /// a buffered one (false).
    pub fn open_direct(&self) -> std::io::Result<(File, bool)> {
        let path = match &self.name {
            Some(n) => n.clone(),
            None => proc_fd(&self.file),
        };
        // (The /proc link of an unnamed file is a symlink to follow.)
        let nofollow = if self.name.is_some() { libc::O_NOFOLLOW } else { 0 };
        match OpenOptions::new().write(true).custom_flags(libc::O_DIRECT | nofollow).open(path) {
            Ok(d) => Ok((d, true)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok((self.file.try_clone()?, false)),
            Err(e) => Err(e),
        }
    }

    /// How the file is shown in messages: its temporary name, or the
    /// destination it will become.
    pub fn shown(&self) -> String {
        match &self.name {
            Some(n) => n.display().to_string(),
            None => format!("{} (new, unnamed)", self.dest.display()),
        }
    }

    /// What a failed writer must remove: the temporary name, if any.
    pub fn leftover(&self) -> Option<PathBuf> {
        self.name.clone()
    }

    /// Puts the finished file in place: linked (an unnamed file) and
    /// renamed over the destination (the old file, if any, stays whole
    /// until this instant, and a VM whose RAM maps it keeps its pages),
    /// then the directory entry made durable. The caller has made the
    /// file's contents durable first.
    pub fn publish(&self) -> std::io::Result<()> {
        let named = match &self.name {
            Some(n) => n.clone(),
            None => {
                let fname = self.dest.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
                let n = self.dest.with_file_name(temp_name(&fname));
                link_unnamed(&self.file, &n)?;
                n
            }
        };
        if let Err(e) = std::fs::rename(&named, &self.dest) {
            if self.name.is_none() {
                let _ = std::fs::remove_file(&named);
            }
            return Err(e);
        }
        File::open(dir_of(&self.dest))?.sync_all()
    }

    /// Gives the file up: an unnamed one vanishes with its descriptor, a
    /// named one is removed now.
    pub fn discard(self) {
        if let Some(n) = &self.name {
            let _ = std::fs::remove_file(n);
        }
    }
}

fn dir_of(p: &Path) -> &Path {
    p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

fn proc_fd(f: &File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()))
}

/// Gives an O_TMPFILE file the name `to`: through /proc/self/fd (any user),
/// or AT_EMPTY_PATH where /proc is not mounted (needs CAP_DAC_READ_SEARCH).
fn link_unnamed(f: &File, to: &Path) -> std::io::Result<()> {
    let cstr = |p: &Path| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL));
    let (from, to) = (cstr(&proc_fd(f))?, cstr(to)?);
    // SAFETY: both paths are NUL-terminated strings that outlive the call.
    if unsafe { libc::linkat(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), libc::AT_SYMLINK_FOLLOW) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::ENOENT) {
        return Err(e);
    }
    // SAFETY: as above; the empty path names `f` itself.
    if unsafe { libc::linkat(f.as_raw_fd(), c"".as_ptr(), libc::AT_FDCWD, to.as_ptr(), libc::AT_EMPTY_PATH) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    /// On a local filesystem the new file has no name until published,
    /// then replaces the old one whole; a discarded one leaves nothing.
    #[test]
    fn a_new_file_is_invisible_until_published() {
        let dir = std::env::temp_dir().join(format!("ringvm-newfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dest = dir.join("vm.state");
        std::fs::write(&dest, b"old").unwrap();
        let n = NewFile::create(&dest).unwrap();
        assert!(n.name.is_none(), "{} has O_TMPFILE", dir.display());
        n.file.write_all_at(b"new contents", 0).unwrap();
        assert_eq!(names(&dir), ["vm.state"]);
        assert_eq!(std::fs::read(&dest).unwrap(), b"old");
        n.publish().unwrap();
        let mut s = String::new();
        File::open(&dest).unwrap().read_to_string(&mut s).unwrap();
        assert_eq!(s, "new contents");
        assert_eq!(names(&dir), ["vm.state"]);
        let n = NewFile::create(&dest).unwrap();
        n.file.write_all_at(b"never", 0).unwrap();
        n.discard();
        assert_eq!(names(&dir), ["vm.state"]);
        assert_eq!(std::fs::read(&dest).unwrap(), b"new contents");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
