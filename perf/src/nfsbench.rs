//! `nfs`: snapshot save and restore to `nfs://` (nfs-ganesha on loopback,
//! in its own network namespace) against a sequential one-request-at-a-time
//! client moving the same bytes (libnfs's `nfs-cp`) and against the local
//! disk; then the same through a TCP proxy that delays every byte by a
//! configurable time each way (a LAN's latency; this kernel has no netem).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub const NFS_PORT: u16 = 20490;
pub const MNT_PORT: u16 = 20480;
pub const PROXY_PORT: u16 = 20500;

fn run(args: &[&str]) -> Result<()> {
    let o = Command::new(args[0]).args(&args[1..]).output().with_context(|| format!("{args:?}"))?;
    if !o.status.success() {
        bail!("{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(())
}

/// A network namespace with an address, nfs-ganesha + rpcbind inside.
pub struct Server {
    pub ns: String,
    pub export: PathBuf,
    child: Option<Child>,
}

impl Server {
    pub fn start(dir: &Path) -> Result<Server> {
        let ns = format!("rv-perf-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        run(&["ip", "netns", "add", &ns])?;
        let mut s = Server { ns: ns.clone(), export: dir.join("export"), child: None };
        run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        // ganesha resolves its bind address with AI_ADDRCONFIG: it wants a
        // non-loopback address.
        run(&["ip", "-n", &ns, "link", "add", "v0", "type", "veth", "peer", "name", "v1"])?;
        run(&["ip", "-n", &ns, "addr", "add", "10.95.0.1/24", "dev", "v0"])?;
        run(&["ip", "-n", &ns, "link", "set", "v0", "up"])?;
        run(&["ip", "-n", &ns, "link", "set", "v1", "up"])?;
        std::fs::create_dir_all(&s.export)?;
        let conf = dir.join("ganesha.conf");
        std::fs::write(
            &conf,
            format!(
                "NFS_CORE_PARAM {{ NFS_Port = {NFS_PORT}; MNT_Port = {MNT_PORT}; NLM_Port = 20470; Rquota_Port = 20460; NFS_Protocols = 3, 4; Enable_NLM = false; Enable_RQUOTA = false; }}\n\
                 NFSV4 {{ Graceless = true; }}\nNFS_KRB5 {{ Active_krb5 = false; }}\n\
                 EXPORT {{ Export_Id = 1; Path = {}; Pseudo = /export; Access_Type = RW; Squash = No_Root_Squash; SecType = sys; Protocols = 3, 4; Transports = TCP; FSAL {{ Name = VFS; }} }}\n\
                 LOG {{ Default_Log_Level = WARN; }}\n",
                s.export.display()
            ),
        )?;
        let script = format!(
            "mount -t tmpfs tmpfs /run && mkdir -p /run/rpcbind /var/lib/nfs/ganesha && mount -t tmpfs tmpfs /var/lib/nfs/ganesha && \
             (rpcbind -f -w &) && sleep 0.2 && exec ganesha.nfsd -F -f {} -L {}/ganesha.log -p {}/ganesha.pid",
            conf.display(),
            dir.display(),
            dir.display()
        );
        s.child = Some(
            Command::new("ip")
                .args(["netns", "exec", &ns, "unshare", "--mount", "--pid", "--fork", "--kill-child", "sh", "-c", &script])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
        let probe = format!("nfs://127.0.0.1{}?nfsport={NFS_PORT}&mountport={MNT_PORT}", s.export.display());
        let t0 = Instant::now();
        loop {
            if Command::new("ip").args(["netns", "exec", &ns, "nfs-ls", &probe]).output()?.status.success() {
                return Ok(s);
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("nfs-ganesha did not come up (see {}/ganesha.log)", dir.display());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `nfs://` URI of `file` in the export, through `nfs_port`.
    pub fn uri(&self, file: &str, nfs_port: u16) -> String {
        format!("nfs://127.0.0.1{}/{file}?nfsport={nfs_port}&mountport={MNT_PORT}", self.export.display())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

/// Moves the calling thread into network namespace `ns`.
fn enter(ns: &str) -> Result<()> {
    let f = std::fs::File::open(format!("/var/run/netns/{ns}"))?;
    // SAFETY: setns on this thread only, with a namespace fd we own.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {ns}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// One direction: every chunk read is written `delay` after it arrived
/// (pipelined: latency is added, bandwidth is kept).
fn delayed_pump(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let writer = std::thread::spawn(move || {
        for (due, buf) in rx {
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if to.write_all(&buf).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
    let mut buf = vec![0u8; 256 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.join();
}

/// A TCP proxy inside `ns` from PROXY_PORT to the server's NFS port that
/// delays each direction by `delay`. Runs until the process ends.
pub fn start_proxy(ns: &str, delay: Duration) -> Result<()> {
    let ns = ns.to_string();
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new().name("nfs-delay-proxy".into()).spawn(move || {
        let l = enter(&ns).and_then(|_| Ok(TcpListener::bind(("127.0.0.1", PROXY_PORT))?));
        let l = match l {
            Ok(l) => {
                let _ = tx.send(Ok(()));
                l
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        for c in l.incoming().map_while(|c| c.ok()) {
            let ns = ns.clone();
            std::thread::spawn(move || {
                if enter(&ns).is_err() {
                    return;
                }
                let Ok(s) = TcpStream::connect(("127.0.0.1", NFS_PORT)) else { return };
                let _ = (c.set_nodelay(true), s.set_nodelay(true));
                let (c2, s2) = match (c.try_clone(), s.try_clone()) {
                    (Ok(a), Ok(b)) => (a, b),
                    _ => return,
                };
                let up = std::thread::spawn(move || delayed_pump(c, s, delay));
                delayed_pump(s2, c2, delay);
                let _ = up.join();
            });
        }
    })?;
    rx.recv()?
}

/// nfs-cp (one request at a time) of `src` to `dst`: milliseconds.
pub fn nfs_cp(ns: &str, src: &str, dst: &str) -> Result<f64> {
    let t0 = Instant::now();
    let o = Command::new("ip").args(["netns", "exec", ns, "nfs-cp", src, dst]).output()?;
    if !o.status.success() {
        bail!("nfs-cp {src} {dst}: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(t0.elapsed().as_secs_f64() * 1e3)
}

/// A file of `bytes` non-zero bytes (what nfs-cp sends).
pub fn make_source(path: &Path, bytes: u64) -> Result<()> {
    let mut f = std::fs::File::create(path)?;
    let chunk: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8 + 1).collect();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    f.sync_all()?;
    Ok(())
}
