//! QMP sockets served from the control thread's io_uring: accept, read and
//! write are ring operations, so a slow or hostile client never blocks the
//! loop, and nothing a client does can delay the VM.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use ring::{Completion, Fd, Op, OpId, Ring, SourceId, STREAM};

use super::stream::{Frame, Splitter};
use super::{greeting, parse_request, reply_err, reply_ok, QmpError, Request};
use crate::error::{Error, Result};

pub type ClientId = u64;

/// Ring source id of everything the QMP server submits.
pub const QMP_SOURCE: SourceId = SourceId::fixed(1);

/// Bounds that keep one client from taking the VMM's memory.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_message: usize,
    pub max_depth: usize,
    /// Replies and events queued for a client that is not reading.
    pub max_output: usize,
    pub max_clients: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_message: 1 << 20, max_depth: 1024, max_output: 4 << 20, max_clients: 256 }
    }
}

const READ_CHUNK: usize = 16 << 10;

struct Client {
    stream: UnixStream,
    negotiated: bool,
    splitter: Splitter,
    outq: VecDeque<Vec<u8>>,
    out_bytes: usize,
    writing: bool,
    read_op: Option<OpId>,
    closing: bool,
}

impl Client {
    fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }
}

pub struct Server {
    listener: UnixListener,
    path: PathBuf,
    clients: HashMap<ClientId, Client>,
    next_id: ClientId,
    inbox: VecDeque<(ClientId, Request)>,
    limits: Limits,
    pub accepted: u64,
    pub dropped: u64,
}

pub type Shared = Rc<RefCell<Server>>;

/// Parses `--qmp` the way QEMU spells it: `PATH` or
/// `unix:PATH[,server=on|off][,wait=on|off]` (ringvm is always the server
/// and never waits for a client before starting the guest).
pub fn parse_spec(s: &str) -> std::result::Result<PathBuf, String> {
    if let Some((scheme, _)) = s.split_once(':') {
        if scheme != "unix" && !scheme.is_empty() && scheme.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(format!("'{s}': QMP transport '{scheme}:' is not supported; use unix:PATH (or ./{s} for a path with a colon)"));
        }
    }
    let Some(rest) = s.strip_prefix("unix:") else {
        if s.is_empty() || s.contains(',') {
            return Err(format!("'{s}' is not a socket path (use PATH or unix:PATH,server=on,wait=off)"));
        }
        return Ok(PathBuf::from(s));
    };
    let mut parts = rest.split(',');
    let path = parts.next().filter(|p| !p.is_empty()).ok_or_else(|| format!("'{s}': missing socket path"))?;
    for opt in parts {
        match opt {
            "server" | "server=on" | "wait=off" | "nowait" => {}
            "server=off" => return Err(format!("'{s}': ringvm only listens (server=on)")),
            "wait=on" | "wait" => return Err(format!("'{s}': wait=on is not supported; the VM starts without waiting for a client")),
            o => return Err(format!("'{s}': unknown option '{o}'")),
        }
    }
    Ok(PathBuf::from(path))
}

/// Binds the socket with mode 0600. An existing non-socket at `path` is an
/// error; a stale socket (nobody listening) is replaced; a live one is an
/// error.
fn bind(path: &Path) -> Result<UnixListener> {
    let err = |what: &str| Error::Config(format!("QMP socket {}: {what}", path.display()));
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => return Err(err("exists and is not a socket; refusing to replace it")),
        Ok(_) => {
            if UnixStream::connect(path).is_ok() {
                return Err(err("another process is listening on it"));
            }
            std::fs::remove_file(path).map_err(|e| err(&format!("cannot remove the stale socket: {e}")))?;
        }
        Err(_) => {}
    }
    // SAFETY: umask only changes this process's file-creation mask; it is
    // restored right after the bind (no other thread creates files now).
    let old = unsafe { libc::umask(0o177) };
    let r = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    r.map_err(|e| err(&e.to_string()))
}

impl Server {
    pub fn bind(path: &Path, limits: Limits) -> Result<Shared> {
        let listener = bind(path)?;
        Ok(Rc::new(RefCell::new(Server {
            listener,
            path: path.to_path_buf(),
            clients: HashMap::new(),
            next_id: 1,
            inbox: VecDeque::new(),
            limits,
            accepted: 0,
            dropped: 0,
        })))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts accepting connections on `ring`.
    pub fn start(this: &Shared, ring: &mut Ring) {
        submit_accept(this, ring);
    }

    /// Requests from clients in command mode, in arrival order.
    pub fn take_requests(&mut self) -> VecDeque<(ClientId, Request)> {
        std::mem::take(&mut self.inbox)
    }

    pub fn client_count(&self) -> usize {
        self.clients.len()
    }

    /// True when no client has output waiting.
    pub fn flushed(&self) -> bool {
        self.clients.values().all(|c| c.outq.is_empty() && !c.writing)
    }

    /// Queues `bytes` for `client`.
    pub fn send(this: &Shared, ring: &mut Ring, client: ClientId, bytes: Vec<u8>) {
        let over = {
            let mut s = this.borrow_mut();
            let max = s.limits.max_output;
            let Some(c) = s.clients.get_mut(&client) else { return };
            if c.closing {
                return;
            }
            log::trace!("qmp: client {client}: queue {} bytes", bytes.len());
            c.out_bytes += bytes.len();
            c.outq.push_back(bytes);
            c.out_bytes > max
        };
        if over {
            log::warn!("qmp: client {client} is not reading ({} bytes queued); disconnecting", this.borrow().limits.max_output);
            close(this, ring, client);
            return;
        }
        pump(this, ring, client);
    }

    /// Sends an event to every client in command mode.
    pub fn broadcast(this: &Shared, ring: &mut Ring, bytes: &[u8]) {
        let ids: Vec<ClientId> = this.borrow().clients.iter().filter(|(_, c)| c.negotiated && !c.closing).map(|(i, _)| *i).collect();
        for id in ids {
            Server::send(this, ring, id, bytes.to_vec());
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn submit_accept(this: &Shared, ring: &mut Ring) {
    let fd = this.borrow().listener.as_raw_fd();
    let s = this.clone();
    ring.submit(QMP_SOURCE, Op::Accept { fd }, move |ring, c| on_accept(&s, ring, c));
}

fn on_accept(this: &Shared, ring: &mut Ring, c: Completion) {
    match c.result {
        Ok(fd) => {
            // SAFETY: accept returned a new descriptor that nothing else owns.
            let stream = unsafe { <UnixStream as std::os::fd::FromRawFd>::from_raw_fd(fd as RawFd) };
            let id = {
                let mut s = this.borrow_mut();
                s.accepted += 1;
                if s.clients.len() >= s.limits.max_clients {
                    s.dropped += 1;
                    log::warn!("qmp: {} clients connected; refusing another", s.clients.len());
                    None
                } else {
                    let id = s.next_id;
                    s.next_id += 1;
                    let l = s.limits;
                    s.clients.insert(
                        id,
                        Client {
                            stream,
                            negotiated: false,
                            splitter: Splitter::new(l.max_message, l.max_depth),
                            outq: VecDeque::new(),
                            out_bytes: 0,
                            writing: false,
                            read_op: None,
                            closing: false,
                        },
                    );
                    Some(id)
                }
            };
            if let Some(id) = id {
                Server::send(this, ring, id, greeting());
                submit_read(this, ring, id, vec![0; READ_CHUNK]);
            }
            submit_accept(this, ring);
        }
        Err(e) if e.raw_os_error() == Some(libc::ECANCELED) => {}
        Err(e) => {
            // EMFILE and friends: try again shortly rather than spin.
            log::warn!("qmp: accept: {e}");
            let s = this.clone();
            ring.submit(QMP_SOURCE, Op::Timeout { after: Duration::from_millis(100) }, move |ring, _| submit_accept(&s, ring));
        }
    }
}

fn submit_read(this: &Shared, ring: &mut Ring, id: ClientId, buf: Vec<u8>) {
    let Some(fd) = this.borrow().clients.get(&id).filter(|c| !c.closing).map(Client::fd) else { return };
    let s = this.clone();
    let op = ring.submit(QMP_SOURCE, Op::read(Fd::Raw(fd), buf, STREAM), move |ring, c| on_read(&s, ring, id, c));
    if let Some(c) = this.borrow_mut().clients.get_mut(&id) {
        c.read_op = Some(op);
    }
}

fn on_read(this: &Shared, ring: &mut Ring, id: ClientId, c: Completion) {
    if let Some(cl) = this.borrow_mut().clients.get_mut(&id) {
        cl.read_op = None;
    }
    let n = match c.result {
        Ok(0) => {
            log::debug!("qmp: client {id} disconnected");
            return close(this, ring, id);
        }
        Ok(n) => n,
        Err(e) => {
            if e.raw_os_error() != Some(libc::ECANCELED) {
                log::info!("qmp: client {id}: read: {e}");
            }
            return close(this, ring, id);
        }
    };
    let Some(buf) = c.op.and_then(|op| match op {
        Op::Read { buf, .. } => buf.into_vec(),
        _ => None,
    }) else {
        return close(this, ring, id);
    };
    log::trace!("qmp: client {id}: read {n} bytes");
    let mut frames = Vec::new();
    match this.borrow_mut().clients.get_mut(&id) {
        Some(cl) if !cl.closing => cl.splitter.feed(&buf[..n], &mut frames),
        _ => return,
    }
    for f in frames {
        match f {
            Frame::Message(text) => on_message(this, ring, id, &text),
            Frame::Unbalanced(b) => {
                let e = QmpError::generic(format!("JSON parse error, stray '{}'", b as char));
                Server::send(this, ring, id, reply_err(&e, None));
            }
            Frame::TooDeep => Server::send(this, ring, id, reply_err(&QmpError::generic("JSON parse error, nesting too deep"), None)),
            Frame::TooLarge => {
                let max = this.borrow().limits.max_message;
                log::warn!("qmp: client {id} sent a message over {max} bytes; disconnecting");
                Server::send(this, ring, id, reply_err(&QmpError::generic(format!("JSON message exceeds {max} bytes")), None));
                return close_after_flush(this, ring, id);
            }
        }
    }
    submit_read(this, ring, id, buf);
}

fn on_message(this: &Shared, ring: &mut Ring, id: ClientId, text: &[u8]) {
    let req = match parse_request(text) {
        Ok(r) => r,
        Err((e, rid)) => return Server::send(this, ring, id, reply_err(&e, rid.as_ref())),
    };
    let negotiated = this.borrow().clients.get(&id).is_some_and(|c| c.negotiated);
    if req.execute == "qmp_capabilities" {
        if negotiated {
            let e = QmpError::not_found("Capabilities negotiation is already complete, command ignored");
            return Server::send(this, ring, id, reply_err(&e, req.id.as_ref()));
        }
        if let Err(e) = super::check_args(&req.arguments, &[super::opt("enable", super::ArgType::Array)]) {
            return Server::send(this, ring, id, reply_err(&e, req.id.as_ref()));
        }
        if let Some(cap) = req.arguments.get("enable").and_then(|v| v.as_array()).and_then(|a| a.first()) {
            let e = QmpError::generic(format!("Capability '{}' not available", cap.as_str().unwrap_or("?")));
            return Server::send(this, ring, id, reply_err(&e, req.id.as_ref()));
        }
        if let Some(c) = this.borrow_mut().clients.get_mut(&id) {
            c.negotiated = true;
        }
        return Server::send(this, ring, id, reply_ok(serde_json::json!({}), req.id.as_ref()));
    }
    if !negotiated {
        let e = QmpError::not_found("Expecting capabilities negotiation with 'qmp_capabilities'");
        return Server::send(this, ring, id, reply_err(&e, req.id.as_ref()));
    }
    this.borrow_mut().inbox.push_back((id, req));
}

/// Starts the next write of `id`'s queue if none is in flight.
fn pump(this: &Shared, ring: &mut Ring, id: ClientId) {
    let (fd, bytes) = {
        let mut s = this.borrow_mut();
        let Some(c) = s.clients.get_mut(&id) else { return };
        if c.writing || c.closing {
            return;
        }
        let Some(mut first) = c.outq.pop_front() else { return };
        // Coalesce what is queued into one write.
        while let Some(next) = c.outq.pop_front() {
            if first.len() + next.len() > 256 << 10 {
                c.outq.push_front(next);
                break;
            }
            first.extend_from_slice(&next);
        }
        c.writing = true;
        (c.fd(), first)
    };
    let s = this.clone();
    ring.submit(QMP_SOURCE, Op::write(Fd::Raw(fd), bytes, STREAM), move |ring, c| {
        let closing = {
            let mut st = s.borrow_mut();
            let Some(cl) = st.clients.get_mut(&id) else { return };
            cl.writing = false;
            match &c.result {
                Ok(n) => cl.out_bytes = cl.out_bytes.saturating_sub(*n),
                Err(e) => log::debug!("qmp: client {id}: write: {e}"),
            }
            c.result.is_err() || cl.closing
        };
        if closing {
            close(&s, ring, id);
        } else {
            pump(&s, ring, id);
        }
    });
}

/// Stops reading from `id`; drops it once its queued output is written.
fn close_after_flush(this: &Shared, ring: &mut Ring, id: ClientId) {
    let read = this.borrow_mut().clients.get_mut(&id).and_then(|c| c.read_op.take());
    if let Some(op) = read {
        ring.cancel(op);
    }
    if let Some(fd) = this.borrow().clients.get(&id).map(Client::fd) {
        // SAFETY: shutdown on a socket we own; pending reads end with EOF.
        unsafe { libc::shutdown(fd, libc::SHUT_RD) };
    }
    let done = this.borrow().clients.get(&id).is_some_and(|c| c.outq.is_empty() && !c.writing);
    if done {
        close(this, ring, id);
    } else {
        // Give the reply 1 s, then drop the client regardless.
        let s = this.clone();
        ring.submit(QMP_SOURCE, Op::Timeout { after: Duration::from_secs(1) }, move |ring, _| close(&s, ring, id));
    }
}

/// Disconnects `id`: pending operations are cancelled (shutdown wakes
/// them), and the socket is closed once none refers to it.
pub fn close(this: &Shared, ring: &mut Ring, id: ClientId) {
    let (busy, read) = {
        let mut s = this.borrow_mut();
        let Some(c) = s.clients.get_mut(&id) else { return };
        if !c.closing {
            c.closing = true;
            c.outq.clear();
            // SAFETY: shutdown on a socket we own; in-flight reads and
            // writes on it complete promptly.
            unsafe { libc::shutdown(c.fd(), libc::SHUT_RDWR) };
        }
        (c.writing || c.read_op.is_some(), c.read_op.take())
    };
    if let Some(op) = read {
        ring.cancel(op);
    }
    if !busy {
        this.borrow_mut().clients.remove(&id);
    }
}
