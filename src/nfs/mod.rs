//! NFS client for state files (`nfs://SERVER[:PORT]/EXPORT/FILE`), built on
//! libnfs, the library QEMU's nfs block driver uses.
//!
//! libnfs is loaded at run time (`libnfs.so.13`/`.14`, the 4.x/5.x ABI whose
//! signatures are declared here), so ringvm runs without it and a user who
//! asks for `nfs://` without it gets a clear error.
//!
//! Two ways to drive a context:
//! - synchronous calls (mount, open, small reads and writes, COMMIT) for
//!   setup and the closing records, bounded by the RPC timeout;
//! - asynchronous READ/WRITE with many requests in flight, driven by the
//!   owning thread's io_uring: [`Conn::arm`] polls the library's socket from
//!   the ring, and each readiness runs `nfs_service`, whose callbacks only
//!   queue results that the ring's handler then dispatches.
//!
//! URL options are libnfs's (`?nfsport=`, `mountport=`, `uid=`, `version=`...).
//! NFSv3: libnfs 4 says its v4 is not functional yet.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::rc::Rc;
use std::sync::OnceLock;
use std::time::Duration;

use ring::{Op, OpId, Ring, SourceId};

mod error;
mod uri;
pub use error::NfsError;
pub use uri::NfsUri;

/// RPC timeout: a stalled or vanished server fails an operation after this.
pub const TIMEOUT_MS: c_int = 10_000;

type Ctx = *mut c_void;
type Fh = *mut c_void;
type Cb = unsafe extern "C" fn(err: c_int, nfs: Ctx, data: *mut c_void, private: *mut c_void);

#[repr(C)]
struct NfsUrl {
    server: *mut c_char,
    path: *mut c_char,
    file: *mut c_char,
}

/// The libnfs entry points ringvm uses (signatures of libnfs 4.x and 5.x).
struct Lib {
    _lib: libloading::Library,
    init_context: unsafe extern "C" fn() -> Ctx,
    destroy_context: unsafe extern "C" fn(Ctx),
    get_error: unsafe extern "C" fn(Ctx) -> *mut c_char,
    parse_url_full: unsafe extern "C" fn(Ctx, *const c_char) -> *mut NfsUrl,
    destroy_url: unsafe extern "C" fn(*mut NfsUrl),
    set_timeout: unsafe extern "C" fn(Ctx, c_int),
    set_autoreconnect: unsafe extern "C" fn(Ctx, c_int),
    mount: unsafe extern "C" fn(Ctx, *const c_char, *const c_char) -> c_int,
    open: unsafe extern "C" fn(Ctx, *const c_char, c_int, *mut Fh) -> c_int,
    create: unsafe extern "C" fn(Ctx, *const c_char, c_int, c_int, *mut Fh) -> c_int,
    close: unsafe extern "C" fn(Ctx, Fh) -> c_int,
    pread: unsafe extern "C" fn(Ctx, Fh, u64, u64, *mut c_void) -> c_int,
    pwrite: unsafe extern "C" fn(Ctx, Fh, u64, u64, *const c_void) -> c_int,
    fsync: unsafe extern "C" fn(Ctx, Fh) -> c_int,
    ftruncate: unsafe extern "C" fn(Ctx, Fh, u64) -> c_int,
    fstat64: unsafe extern "C" fn(Ctx, Fh, *mut NfsStat64) -> c_int,
    pread_async: unsafe extern "C" fn(Ctx, Fh, u64, u64, Cb, *mut c_void) -> c_int,
    pwrite_async: unsafe extern "C" fn(Ctx, Fh, u64, u64, *const c_void, Cb, *mut c_void) -> c_int,
    fsync_async: unsafe extern "C" fn(Ctx, Fh, Cb, *mut c_void) -> c_int,
    get_fd: unsafe extern "C" fn(Ctx) -> c_int,
    which_events: unsafe extern "C" fn(Ctx) -> c_int,
    service: unsafe extern "C" fn(Ctx, c_int) -> c_int,
    queue_length: unsafe extern "C" fn(Ctx) -> c_int,
    get_readmax: unsafe extern "C" fn(Ctx) -> u64,
    get_writemax: unsafe extern "C" fn(Ctx) -> u64,
    rename: unsafe extern "C" fn(Ctx, *const c_char, *const c_char) -> c_int,
    unlink: unsafe extern "C" fn(Ctx, *const c_char) -> c_int,
}

/// `struct nfs_stat_64` (libnfs 4/5).
#[repr(C)]
#[derive(Default)]
struct NfsStat64 {
    dev: u64,
    ino: u64,
    mode: u64,
    nlink: u64,
    uid: u64,
    gid: u64,
    rdev: u64,
    size: u64,
    blksize: u64,
    blocks: u64,
    atime: u64,
    mtime: u64,
    ctime: u64,
    atime_nsec: u64,
    mtime_nsec: u64,
    ctime_nsec: u64,
    used: u64,
}

fn load() -> Result<Lib, NfsError> {
    let mut last = String::new();
    for name in ["libnfs.so.13", "libnfs.so.14"] {
        // SAFETY: loading libnfs runs only its ELF constructors (none that
        // touch process state beyond the library's own).
        match unsafe { libloading::Library::new(name) } {
            Ok(lib) => return bind(lib).map_err(|e| NfsError::Library(format!("{name}: {e}"))),
            Err(e) => last = e.to_string(),
        }
    }
    Err(NfsError::Library(last))
}

fn bind(lib: libloading::Library) -> Result<Lib, libloading::Error> {
    macro_rules! sym {
        ($name:literal) => {
            // SAFETY: the symbol has the C signature declared in `Lib` for
            // the libnfs ABIs (so.13, so.14) we accept in `load`.
            *unsafe { lib.get(concat!($name, "\0").as_bytes())? }
        };
    }
    Ok(Lib {
        init_context: sym!("nfs_init_context"),
        destroy_context: sym!("nfs_destroy_context"),
        get_error: sym!("nfs_get_error"),
        parse_url_full: sym!("nfs_parse_url_full"),
        destroy_url: sym!("nfs_destroy_url"),
        set_timeout: sym!("nfs_set_timeout"),
        set_autoreconnect: sym!("nfs_set_autoreconnect"),
        mount: sym!("nfs_mount"),
        open: sym!("nfs_open"),
        create: sym!("nfs_create"),
        close: sym!("nfs_close"),
        pread: sym!("nfs_pread"),
        pwrite: sym!("nfs_pwrite"),
        fsync: sym!("nfs_fsync"),
        ftruncate: sym!("nfs_ftruncate"),
        fstat64: sym!("nfs_fstat64"),
        pread_async: sym!("nfs_pread_async"),
        pwrite_async: sym!("nfs_pwrite_async"),
        fsync_async: sym!("nfs_fsync_async"),
        get_fd: sym!("nfs_get_fd"),
        which_events: sym!("nfs_which_events"),
        service: sym!("nfs_service"),
        queue_length: sym!("nfs_queue_length"),
        get_readmax: sym!("nfs_get_readmax"),
        get_writemax: sym!("nfs_get_writemax"),
        rename: sym!("nfs_rename"),
        unlink: sym!("nfs_unlink"),
        _lib: lib,
    })
}

fn lib() -> Result<&'static Lib, NfsError> {
    static LIB: OnceLock<Result<Lib, NfsError>> = OnceLock::new();
    LIB.get_or_init(load).as_ref().map_err(Clone::clone)
}

/// Is `s` an NFS URI (rather than a local path)?
pub fn is_uri(s: &str) -> bool {
    s.starts_with("nfs://")
}

/// A finished asynchronous operation: its token and bytes or error.
pub type Done = (u64, Result<usize, NfsError>);

/// What an async callback needs: where results go, and for a read, where
/// the data goes.
/// Owned by the [`Nfs`] (never by the callback), so a callback that the
/// library ran twice for one request (on a connection error and again
/// when the context is destroyed) finds `fired` set and does nothing,
/// instead of freeing or writing through memory twice.
struct Pending {
    token: u64,
    what: &'static str,
    done: *const RefCell<Vec<Done>>,
    dest: *mut u8,
    cap: usize,
    fired: std::cell::Cell<bool>,
}

unsafe extern "C" fn on_done(err: c_int, _nfs: Ctx, data: *mut c_void, private: *mut c_void) {
    // SAFETY: `private` points at a Pending boxed in the Nfs's
    // `outstanding` list, which outlives every callback of its context
    // (it is dropped after the context is destroyed).
    let p = unsafe { &*private.cast::<Pending>() };
    if p.fired.replace(true) {
        return;
    }
    let r = if err < 0 {
        let detail = if data.is_null() {
            std::io::Error::from_raw_os_error(-err).to_string()
        } else {
            // SAFETY: on failure `data` is the library's NUL-terminated message.
            unsafe { CStr::from_ptr(data.cast()) }.to_string_lossy().into_owned()
        };
        Err(NfsError::Call { what: p.what.to_string(), detail, errno: -err })
    } else {
        let n = err as usize;
        if !p.dest.is_null() {
            if n > p.cap {
                Err(NfsError::LongRead { got: n, want: p.cap })
            } else {
                // SAFETY: `data` holds `n` bytes from the reply; `dest` is
                // the caller's buffer of `cap` bytes (see `pread_async`).
                unsafe { std::ptr::copy_nonoverlapping(data.cast::<u8>(), p.dest, n) };
                Ok(n)
            }
        } else {
            Ok(n)
        }
    };
    // SAFETY: the list lives in the Nfs (boxed, stable address) that owns
    // the context calling us.
    unsafe { &*p.done }.borrow_mut().push((p.token, r));
}

/// After a failed mount (libnfs says only "nfs_service failed"): can the
/// server's MOUNT service (the URI's `mountport`, else rpcbind's 111) be
/// reached at all?
fn unreachable(uri: &NfsUri) -> Option<String> {
    use std::net::{TcpStream, ToSocketAddrs};
    let host = uri.host.as_str();
    let port = uri.option("mountport").and_then(|p| p.parse::<u16>().ok()).unwrap_or(111);
    let addrs = match (host, port).to_socket_addrs() {
        Ok(a) => a.collect::<Vec<_>>(),
        Err(e) => return Some(format!("cannot resolve {host}: {e}")),
    };
    let mut last = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, Duration::from_secs(5)) {
            Ok(_) => return None,
            Err(e) => last = Some(e),
        }
    }
    last.map(|e| format!("server {host} port {port} unreachable: {e}"))
}

/// What [`Nfs::open_uri`] does with the URI's file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Open {
    Read,
    /// Create it; an existing file is an error.
    CreateNew,
    /// Leave it alone (for directory operations).
    MountOnly,
}

/// One NFS context (one TCP connection), mounted, with one open file.
pub struct Nfs {
    lib: &'static Lib,
    ctx: Ctx,
    fh: Fh,
    /// Boxed: callbacks hold its address, and the Nfs moves.
    #[allow(clippy::box_collection)]
    done: Box<RefCell<Vec<Done>>>,
    /// Every queued request's callback data, until none can fire again
    /// (boxed: the library holds each one's address while the Vec grows).
    #[allow(clippy::vec_box)]
    outstanding: RefCell<Vec<Box<Pending>>>,
}

// SAFETY: a context is used by one thread at a time (it moves to the thread
// that drives it and stays there); libnfs keeps no thread-local state.
unsafe impl Send for Nfs {}

impl Nfs {
    fn err(&self, what: &str, rc: c_int) -> NfsError {
        // SAFETY: the context is live; the message is owned by it.
        let msg = unsafe { (self.lib.get_error)(self.ctx) };
        let os = std::io::Error::from_raw_os_error(-rc);
        let detail = if msg.is_null() {
            os.to_string()
        } else {
            // SAFETY: NUL-terminated string owned by the context.
            format!("{} ({os})", unsafe { CStr::from_ptr(msg) }.to_string_lossy())
        };
        NfsError::Call { what: what.to_string(), detail, errno: -rc }
    }

    /// Connects and mounts the export named by `uri`, then opens its file
    /// (or, with `create`, creates it: a new file, never an existing one).
    pub fn open(uri: &str, create: bool) -> Result<Nfs, NfsError> {
        Nfs::open_uri(&NfsUri::parse(uri)?, if create { Open::CreateNew } else { Open::Read })
    }

    /// Connects and mounts the export holding `uri`'s file; `how` says what
    /// happens to the file.
    pub fn open_uri(uri: &NfsUri, how: Open) -> Result<Nfs, NfsError> {
        let lib = lib()?;
        let url_text = uri.libnfs_url();
        let c_uri = CString::new(url_text.as_str()).map_err(|_| NfsError::BadUri { uri: uri.to_string(), reason: "NUL in the URI".into() })?;
        // SAFETY: plain constructor; NULL on failure.
        let ctx = unsafe { (lib.init_context)() };
        if ctx.is_null() {
            return Err(NfsError::Library(format!("{uri}: cannot create an NFS context")));
        }
        let mut n = Nfs { lib, ctx, fh: std::ptr::null_mut(), done: Box::new(RefCell::new(Vec::new())), outstanding: RefCell::new(Vec::new()) };
        // SAFETY: live context and NUL-terminated URL.
        let url = unsafe { (lib.parse_url_full)(ctx, c_uri.as_ptr()) };
        if url.is_null() {
            return Err(n.err("bad URI (want nfs://SERVER[:PORT]/EXPORT/FILE)", -libc::EINVAL));
        }
        // SAFETY: `url` is a valid nfs_url whose strings live until
        // destroy_url; the context is live.
        let (stage, rc) = unsafe {
            (lib.set_timeout)(ctx, TIMEOUT_MS);
            // A lost connection fails the operations (and the snapshot)
            // instead of retrying forever behind the guest's back.
            (lib.set_autoreconnect)(ctx, 0);
            match (lib.mount)(ctx, (*url).server, (*url).path) {
                0 => match how {
                    Open::CreateNew => ("create", (lib.create)(ctx, (*url).file, libc::O_RDWR | libc::O_EXCL, 0o600, &mut n.fh)),
                    Open::Read => ("open", (lib.open)(ctx, (*url).file, libc::O_RDONLY, &mut n.fh)),
                    Open::MountOnly => ("mount", 0),
                },
                rc => ("mount", rc),
            }
        };
        // SAFETY: the URL came from parse_url_full and is not used again.
        unsafe { (lib.destroy_url)(url) };
        if rc < 0 {
            let e = n.err(stage, rc);
            if let (NfsError::Call { detail, .. }, "mount") = (&e, stage) {
                if let Some(why) = unreachable(uri) {
                    return Err(NfsError::Unreachable { detail: detail.clone(), why });
                }
            }
            return Err(e);
        }
        Ok(n)
    }

    /// Renames `from` to `to`, both names in the mounted directory (NFS
    /// RENAME replaces `to` atomically on the server).
    pub fn rename(&self, from: &str, to: &str) -> Result<(), NfsError> {
        let c = |s: &str| CString::new(format!("/{s}")).map_err(|_| NfsError::BadUri { uri: s.to_string(), reason: "NUL in the name".into() });
        let (f, t) = (c(from)?, c(to)?);
        // SAFETY: live, mounted context; NUL-terminated names.
        let rc = unsafe { (self.lib.rename)(self.ctx, f.as_ptr(), t.as_ptr()) };
        if rc < 0 {
            return Err(self.err(&format!("rename {from} to {to}"), rc));
        }
        Ok(())
    }

    /// Removes `uri`'s file (its own connection; bounded by the RPC timeout).
    pub fn unlink(uri: &NfsUri) -> Result<(), NfsError> {
        let n = Nfs::open_uri(uri, Open::MountOnly)?;
        let name = CString::new(format!("/{}", uri.file)).map_err(|_| NfsError::BadUri { uri: uri.to_string(), reason: "NUL in the name".into() })?;
        // SAFETY: live, mounted context; NUL-terminated name.
        let rc = unsafe { (n.lib.unlink)(n.ctx, name.as_ptr()) };
        if rc < 0 {
            return Err(n.err(&format!("{uri}: unlink"), rc));
        }
        Ok(())
    }

    /// Largest READ and WRITE the server takes.
    pub fn readmax(&self) -> usize {
        // SAFETY: live, mounted context.
        (unsafe { (self.lib.get_readmax)(self.ctx) } as usize).clamp(4096, 1 << 20)
    }
    pub fn writemax(&self) -> usize {
        // SAFETY: live, mounted context.
        (unsafe { (self.lib.get_writemax)(self.ctx) } as usize).clamp(4096, 1 << 20)
    }

    /// The file's size (a GETATTR): fallible, so no `is_empty` beside it.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> Result<u64, NfsError> {
        let mut st = NfsStat64::default();
        // SAFETY: live context and file; `st` is a local of the right layout.
        let rc = unsafe { (self.lib.fstat64)(self.ctx, self.fh, &mut st) };
        if rc < 0 {
            return Err(self.err("fstat", rc));
        }
        Ok(st.size)
    }

    pub fn set_len(&mut self, len: u64) -> Result<(), NfsError> {
        // SAFETY: live context and file.
        let rc = unsafe { (self.lib.ftruncate)(self.ctx, self.fh, len) };
        if rc < 0 {
            return Err(self.err("truncate", rc));
        }
        Ok(())
    }

    /// Writes all of `buf` at `offset` (UNSTABLE; [`Nfs::commit`] makes it durable).
    pub fn write_all_at(&mut self, buf: &[u8], offset: u64) -> Result<(), NfsError> {
        let max = self.writemax();
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(max);
            // SAFETY: `buf[done..done + n]` is valid for reads during the call.
            let rc = unsafe { (self.lib.pwrite)(self.ctx, self.fh, offset + done as u64, n as u64, buf[done..].as_ptr().cast()) };
            if rc <= 0 {
                return Err(self.err("write", if rc == 0 { -libc::EIO } else { rc }));
            }
            done += rc as usize;
        }
        Ok(())
    }

    /// Reads as much of `buf` as the file has at `offset`.
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<usize, NfsError> {
        let max = self.readmax();
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(max);
            // SAFETY: `buf[done..done + n]` is valid for writes during the call.
            let rc = unsafe { (self.lib.pread)(self.ctx, self.fh, offset + done as u64, n as u64, buf[done..].as_mut_ptr().cast()) };
            if rc < 0 {
                return Err(self.err("read", rc));
            }
            if rc == 0 {
                break;
            }
            done += rc as usize;
        }
        Ok(done)
    }

    /// COMMIT: everything written so far is on the server's stable storage.
    pub fn commit(&mut self) -> Result<(), NfsError> {
        // SAFETY: live context and file.
        let rc = unsafe { (self.lib.fsync)(self.ctx, self.fh) };
        if rc < 0 {
            return Err(self.err("commit", rc));
        }
        Ok(())
    }

    fn pending(&self, token: u64, what: &'static str, dest: *mut u8, cap: usize) -> *mut c_void {
        let b = Box::new(Pending { token, what, done: &*self.done, dest, cap, fired: std::cell::Cell::new(false) });
        let p: *const Pending = &*b;
        self.outstanding.borrow_mut().push(b);
        p.cast_mut().cast()
    }

    fn queued(&self, what: &str, rc: c_int, p: *mut c_void) -> Result<(), NfsError> {
        if rc < 0 {
            // Not queued: its callback never runs.
            self.outstanding.borrow_mut().retain(|b| !std::ptr::eq(&**b, p.cast::<Pending>()));
            return Err(self.err(what, rc));
        }
        Ok(())
    }

    /// Queues an UNSTABLE WRITE of `len` bytes at `ptr`; the result comes
    /// back with `token` from [`Nfs::service`].
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay mapped until the result is delivered (the
    /// library encodes the data into its request when it queues it).
    pub unsafe fn pwrite_async(&mut self, token: u64, ptr: *const u8, len: usize, offset: u64) -> Result<(), NfsError> {
        let p = self.pending(token, "write", std::ptr::null_mut(), 0);
        // SAFETY: caller keeps the buffer valid; `p` is freed by on_done.
        let rc = unsafe { (self.lib.pwrite_async)(self.ctx, self.fh, offset, len as u64, ptr.cast(), on_done, p) };
        self.queued("write", rc, p)
    }

    /// Queues a READ of `len` bytes at `offset` into `dest`.
    ///
    /// # Safety
    /// `dest..dest+len` must stay valid for writes, and not be accessed
    /// otherwise, until the result is delivered or the context is dropped.
    pub unsafe fn pread_async(&mut self, token: u64, dest: *mut u8, len: usize, offset: u64) -> Result<(), NfsError> {
        let p = self.pending(token, "read", dest, len);
        // SAFETY: caller keeps `dest` valid; `p` is freed by on_done.
        let rc = unsafe { (self.lib.pread_async)(self.ctx, self.fh, offset, len as u64, on_done, p) };
        self.queued("read", rc, p)
    }

    /// Queues a COMMIT.
    pub fn commit_async(&mut self, token: u64) -> Result<(), NfsError> {
        let p = self.pending(token, "commit", std::ptr::null_mut(), 0);
        // SAFETY: live context and file; `p` is freed by on_done.
        let rc = unsafe { (self.lib.fsync_async)(self.ctx, self.fh, on_done, p) };
        self.queued("commit", rc, p)
    }

    /// Runs the library for `revents` (0: timeouts only) and returns the
    /// operations that finished (including any finished by sync calls).
    pub fn service(&mut self, revents: c_int) -> Result<Vec<Done>, NfsError> {
        // SAFETY: live context; callbacks only push to `self.done`.
        let rc = unsafe { (self.lib.service)(self.ctx, revents) };
        let done = std::mem::take(&mut *self.done.borrow_mut());
        if self.queue_length() == 0 {
            // Nothing queued in the library: no callback can run again
            // (fired ones are kept until then: see Pending).
            self.outstanding.borrow_mut().clear();
        }
        if rc < 0 {
            return Err(self.err("connection", rc));
        }
        Ok(done)
    }

    pub fn fd(&self) -> i32 {
        // SAFETY: live context.
        unsafe { (self.lib.get_fd)(self.ctx) }
    }

    pub fn events(&self) -> u32 {
        // SAFETY: live context.
        unsafe { (self.lib.which_events)(self.ctx) as u32 }
    }

    /// Requests queued or waiting for a reply.
    pub fn queue_length(&self) -> usize {
        // SAFETY: live context.
        unsafe { (self.lib.queue_length)(self.ctx) }.max(0) as usize
    }
}

impl Drop for Nfs {
    fn drop(&mut self) {
        // SAFETY: the context and file are ours; destroying the context
        // fails whatever is still queued (its callbacks run and free their
        // Pending) and closes the socket.
        unsafe {
            if !self.fh.is_null() {
                (self.lib.close)(self.ctx, self.fh);
            }
            (self.lib.destroy_context)(self.ctx);
        }
        self.done.borrow_mut().clear();
    }
}

/// An [`Nfs`] driven by a ring: its socket is polled from the ring, each
/// readiness (and a periodic tick, for RPC timeouts) runs the library, and
/// `handler` gets the finished operations.
pub struct Conn {
    pub nfs: Nfs,
    poll: Option<OpId>,
    tick: Option<OpId>,
    closed: bool,
}

pub type Handler = Rc<dyn Fn(&mut Ring, Result<Vec<Done>, NfsError>)>;

impl Conn {
    pub fn new(nfs: Nfs) -> Rc<RefCell<Conn>> {
        Rc::new(RefCell::new(Conn { nfs, poll: None, tick: None, closed: false }))
    }

    /// Sends what was queued (without waiting) and makes sure the socket is
    /// watched. Call after queueing requests.
    pub fn kick(conn: &Rc<RefCell<Conn>>, ring: &mut Ring, source: SourceId, handler: &Handler) {
        let r = conn.borrow_mut().nfs.service(libc::POLLOUT as c_int);
        if !matches!(&r, Ok(d) if d.is_empty()) {
            handler(ring, r);
        }
        Conn::arm(conn, ring, source, handler);
    }

    /// Polls the socket from the ring while requests are outstanding.
    pub fn arm(conn: &Rc<RefCell<Conn>>, ring: &mut Ring, source: SourceId, handler: &Handler) {
        let (fd, events, want) = {
            let c = conn.borrow();
            if c.closed {
                return;
            }
            (c.nfs.fd(), c.nfs.events(), c.nfs.queue_length() > 0)
        };
        if !want || fd < 0 {
            return;
        }
        if conn.borrow().poll.is_none() {
            let (c2, h2) = (conn.clone(), handler.clone());
            let id = ring.submit(source, Op::Poll { fd, events, multishot: false }, move |ring, c| {
                c2.borrow_mut().poll = None;
                if c2.borrow().closed {
                    return;
                }
                let revents = match c.result {
                    Ok(m) => m as c_int,
                    Err(e) if e.raw_os_error() == Some(libc::ECANCELED) => return,
                    Err(_) => libc::POLLERR as c_int,
                };
                let r = c2.borrow_mut().nfs.service(revents);
                h2(ring, r);
                Conn::arm(&c2, ring, source, &h2);
            });
            conn.borrow_mut().poll = Some(id);
        }
        if conn.borrow().tick.is_none() {
            let (c2, h2) = (conn.clone(), handler.clone());
            let id = ring.submit(source, Op::Timeout { after: Duration::from_millis(500) }, move |ring, _| {
                c2.borrow_mut().tick = None;
                if c2.borrow().closed {
                    return;
                }
                let r = c2.borrow_mut().nfs.service(0);
                if !matches!(&r, Ok(d) if d.is_empty()) {
                    h2(ring, r);
                }
                Conn::arm(&c2, ring, source, &h2);
            });
            conn.borrow_mut().tick = Some(id);
        }
    }

    /// Stops watching the socket (the ring ops are cancelled; the context
    /// goes with the last reference).
    pub fn close(conn: &Rc<RefCell<Conn>>, ring: &mut Ring) {
        let (poll, tick) = {
            let mut c = conn.borrow_mut();
            c.closed = true;
            (c.poll.take(), c.tick.take())
        };
        for id in [poll, tick].into_iter().flatten() {
            ring.cancel(id);
        }
    }
}
