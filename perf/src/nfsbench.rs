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

/// Whether the system has the command `c` (the NFS tools, iproute2).
pub(crate) fn on_path(c: &str) -> bool {
    ["/usr/bin", "/usr/sbin", "/bin", "/sbin"].iter().any(|d| Path::new(d).join(c).exists())
}

/// The suite: local disk, nfs:// on loopback and nfs:// through the
/// delaying proxy, in rotating order; nfs-cp moves the same bytes.
pub fn suite(c: &crate::Ctx, r: &mut crate::report::Report) -> Result<()> {
    use crate::report::{cell, ratio};
    use crate::snapbench;
    if !on_path("ganesha.nfsd") || !on_path("nfs-cp") || !on_path("ip") {
        r.skip("nfs", "needs nfs-ganesha, libnfs-utils and iproute2 (scripts/peers.sh installs them)");
        return Ok(());
    }
    let local = c.scratch()?;
    let sizes = c.sizes.clone().unwrap_or(if c.quick { vec![256u64] } else { vec![1024] });
    // RINGVM_PERF_NFS_DELAY_US: the injected one-way delay (default 500 us).
    let delay_us: u64 = std::env::var("RINGVM_PERF_NFS_DELAY_US").ok().and_then(|v| v.parse().ok()).unwrap_or(500);
    let targets: [(&str, Option<u16>); 3] = [("local disk", None), ("nfs:// loopback", Some(NFS_PORT)), ("nfs:// + delay", Some(PROXY_PORT))];
    r.begin("nfs", (sizes.len() * c.reps * targets.len() + c.reps) as u64 + 1);
    r.step("starting nfs-ganesha in a network namespace");
    let sdir = c.dir.join("nfs");
    std::fs::create_dir_all(&sdir)?;
    let server = Server::start(&sdir).context("NFS server")?;
    start_proxy(&server.ns, Duration::from_micros(delay_us))?;
    let mbs = |bytes: f64, ms: f64| bytes / 1e6 / (ms / 1e3);
    for &mib in &sizes {
        for rep in 0..c.reps {
            if crate::stopping() {
                break;
            }
            for (tname, port) in crate::interleaved(&targets, rep) {
                r.step(format!("{tname} {mib} MiB, repetition {}/{}", rep + 1, c.reps));
                let k = format!("{tname} {mib}MiB");
                // Fresh names each time: ganesha caches what it served and
                // answers STALE for a name deleted behind its back.
                let (name, seq) = (format!("vm-{mib}-{}-{rep}.state", port.unwrap_or(0)), format!("seq-{mib}-{}-{rep}.dat", port.unwrap_or(0)));
                let (file, ns) = match port {
                    None => (local.join(format!("ringvm-perf-nfs-{}.state", std::process::id())), None),
                    Some(p) => (PathBuf::from(server.uri(&name, p)), Some(server.ns.as_str())),
                };
                let res = snapbench::ringvm(ns, &c.bin, &c.guest, &c.dir, &file, mib, 1, snapbench::DENSE_PCT)?;
                let on_disk = if port.is_some() { server.export.join(&name) } else { file.clone() };
                let present = std::fs::metadata(&on_disk).map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512).unwrap_or(0) as f64;
                r.sample(&k, "ringvm", "save_ms", "ms", res.total_ms);
                r.sample(&k, "ringvm", "save_mbs", "MB/s", mbs(res.bytes, res.total_ms));
                let (ms, _) = snapbench::restore(ns, &c.bin, &c.dir, &file, &[])?;
                r.sample(&k, "ringvm", "restore_ms", "ms", ms);
                r.sample(&k, "ringvm", "restore_mbs", "MB/s", mbs(present, ms));
                let _ = std::fs::remove_file(&on_disk);
                if let Some(p) = port {
                    let src = local.join(format!("ringvm-perf-nfs-src-{}", std::process::id()));
                    make_source(&src, res.bytes as u64)?;
                    let dst = server.uri(&seq, p);
                    let w = nfs_cp(&server.ns, src.to_str().unwrap_or_default(), &dst)?;
                    r.sample(&k, "nfs-cp", "write_mbs", "MB/s", mbs(res.bytes, w));
                    let back = PathBuf::from("/dev/shm").join(format!("ringvm-perf-nfs-back-{}", std::process::id()));
                    let _ = std::fs::remove_file(&back);
                    let rms = nfs_cp(&server.ns, &dst, back.to_str().unwrap_or_default())?;
                    r.sample(&k, "nfs-cp", "read_mbs", "MB/s", mbs(res.bytes, rms));
                    let _ = std::fs::remove_file(&back);
                    let _ = std::fs::remove_file(&src);
                    let _ = std::fs::remove_file(server.export.join(&seq));
                }
            }
        }
    }
    // Incremental snapshots over nfs://, through the delaying proxy: a full
    // snapshot with "track", 1% of the RAM in use rewritten, then an
    // increment against it; the chain restored from the server.
    let mib = sizes[0];
    for rep in 0..c.reps {
        if crate::stopping() {
            break;
        }
        r.step(format!("incremental over nfs:// + delay, {mib} MiB, repetition {}/{}", rep + 1, c.reps));
        let export = server.export.clone();
        let on_disk = move |p: &Path| {
            let uri = p.to_string_lossy();
            let path = uri.split('?').next().unwrap_or_default();
            export.join(path.rsplit('/').next().unwrap_or_default())
        };
        let t = crate::incbench::Target {
            full: PathBuf::from(server.uri(&format!("full-{rep}.state"), PROXY_PORT)),
            inc: PathBuf::from(server.uri(&format!("inc-{rep}.state"), PROXY_PORT)),
            on_disk: &on_disk,
            merged: None,
            ns: Some(server.ns.as_str()),
        };
        match crate::incbench::once(c, &t, mib, 1) {
            Ok(o) => {
                let k = format!("incremental {mib}MiB");
                r.sample(&k, "full", "save_ms", "ms", o.full_ms);
                r.sample(&k, "full", "written_mb", "MB", o.full_mb);
                r.sample(&k, "incremental", "save_ms", "ms", o.inc_ms);
                r.sample(&k, "incremental", "written_mb", "MB", o.inc_mb);
                r.sample(&k, "chain", "restore_ms", "ms", o.chain_restore_ms);
            }
            Err(e) => r.log(format!("incremental over nfs://: {e:#}")),
        }
    }
    drop(server);
    let k = format!("incremental {mib}MiB");
    let s = |sys: &str, m: &str| r.stat(&k, sys, m);
    let inc_row = vec![
        format!("{} GiB, 1% rewritten", mib as f64 / 1024.0),
        cell(s("full", "save_ms"), 0),
        cell(s("full", "written_mb"), 0),
        cell(s("incremental", "save_ms"), 0),
        cell(s("incremental", "written_mb"), 0),
        ratio(s("incremental", "save_ms"), s("full", "save_ms")),
        cell(s("chain", "restore_ms"), 0),
    ];
    r.table(
        "nfs: incremental snapshots over nfs:// + delay",
        &format!("The same server through the {delay_us} us proxy. A full snapshot with `\"track\": true` to `nfs://`, the guest rewrites 1% of its RAM in use (at 100 MiB/s), then `savevm-start {{\"base\": full}}` to `nfs://`; then a fresh ringvm restores the two-file chain from the server (`--restore-ram read`, to a paused VM)."),
        &["guest", "full save ms", "full MB", "incremental save ms", "incremental MB", "inc/full", "chain restore ms"],
        &[inc_row],
    );
    let mut rows = vec![];
    for &mib in &sizes {
        for (tname, port) in targets {
            let k = format!("{tname} {mib}MiB");
            let s = |sys: &str, m: &str| r.stat(&k, sys, m);
            rows.push(vec![
                tname.into(),
                format!("{} GiB", mib as f64 / 1024.0),
                cell(s("ringvm", "save_ms"), 0),
                cell(s("ringvm", "save_mbs"), 0),
                cell(s("nfs-cp", "write_mbs"), 0),
                ratio(s("ringvm", "save_mbs"), s("nfs-cp", "write_mbs")),
                cell(s("ringvm", "restore_ms"), 0),
                cell(s("ringvm", "restore_mbs"), 0),
                cell(s("nfs-cp", "read_mbs"), 0),
                ratio(s("ringvm", "restore_mbs"), s("nfs-cp", "read_mbs")),
            ]);
            if port.is_some() {
                let (a, b, cc, d) = (s("ringvm", "save_mbs"), s("nfs-cp", "write_mbs"), s("ringvm", "restore_mbs"), s("nfs-cp", "read_mbs"));
                r.headline(&format!("nfs: save to {tname}, {mib} MiB guest, vs a sequential client"), ("MB/s", a), ("nfs-cp MB/s", b), false);
                r.headline(&format!("nfs: restore from {tname}, {mib} MiB guest, vs a sequential client"), ("MB/s", cc), ("nfs-cp MB/s", d), false);
            }
        }
    }
    r.table(
        "nfs: snapshot to and from a real NFS server",
        &format!("nfs-ganesha (VFS backend, state on the local disk) and rpcbind in a network namespace; ringvm in the same namespace saves an idle test guest (90% of RAM filled, 1 vCPU) to `nfs://127.0.0.1/...`, then a fresh ringvm restores it (`--loadstate`, to a paused VM, process start included). The sequential client is libnfs's `nfs-cp` moving the same number of bytes one request at a time. '+ delay' goes through a TCP proxy holding every chunk {delay_us} us each way. Everything shares this machine's CPUs: the figures show the shape (latency hidden by depth), not a LAN's absolute numbers."),
        &["target", "guest", "save ms", "save MB/s", "seq. client write MB/s", "save / seq.", "restore ms", "restore MB/s", "seq. client read MB/s", "restore / seq."],
        &rows,
    );
    r.end();
    Ok(())
}
