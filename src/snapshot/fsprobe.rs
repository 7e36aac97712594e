//! What kind of filesystem a state file is on, which decides how it is
//! read and written (punted to io-wq, mapped).

use std::fs::File;
use std::os::fd::AsRawFd;

/// Filesystems that may block inside io_uring_enter even for a
/// non-blocking issue attempt (FUSE's direct I/O waits for its daemon;
/// network filesystems wait for their server): their writes go straight to
/// the kernel's io_uring workers, so a stalled target never blocks the
/// iothread (which must stay free to fail or cancel the snapshot).
/// The restore loader punts its reads there too: io_uring then gives each
/// its own io-wq worker, so many are in flight at once (issued the normal
/// way, reads on such a file run one at a time). Writes stay serialised
/// whatever the flag: io-wq orders writes to one inode unless the
/// filesystem declares parallel direct writes (ext4 and XFS do; FUSE and
/// the kernel's NFS client do not), which is why `nfs://` is the fast way
/// to an NFS server.
pub fn blocks_inline(f: &File) -> bool {
    const FUSE: i64 = 0x6573_5546;
    const NFS: i64 = 0x6969;
    const SMB2: i64 = 0xFE53_4D42;
    const CIFS: i64 = 0xFF53_4D42;
    const CEPH: i64 = 0x00C3_6400;
    const V9FS: i64 = 0x0102_1997;
    // SAFETY: fstatfs fills a local struct for an open fd.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstatfs(f.as_raw_fd(), &mut st) } != 0 {
        return true;
    }
    [FUSE, NFS, SMB2, CIFS, CEPH, V9FS].contains(&(st.f_type as i64))
}

/// tmpfs and ramfs: the file's pages are memory already.
pub fn on_memory_fs(f: &File) -> bool {
    const TMPFS: i64 = 0x0102_1994;
    const RAMFS: i64 = 0x8584_58f6;
    // SAFETY: fstatfs fills a local struct for an open fd.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::fstatfs(f.as_raw_fd(), &mut st) == 0 && [TMPFS, RAMFS].contains(&(st.f_type as i64)) }
}
