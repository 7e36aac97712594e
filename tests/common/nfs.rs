//! A real NFS server for the tests: nfs-ganesha (VFS backend) with its own
//! rpcbind, each server in its own network namespace (so its fixed ports and
//! rpcbind never meet another test's), started and killed by PID.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use super::{Proc, Scratch};

pub const NFS_PORT: u16 = 20490;
pub const MNT_PORT: u16 = 20480;

fn run(args: &[&str]) {
    let o = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

/// A network namespace ("a host"), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!("rv-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(&["ip", "netns", "add", &name]);
        run(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Netns { name }
    }

    /// A namespace with one address of its own (`addr`/24 on a veth whose
    /// peer stays inside): ganesha resolves its bind address with
    /// AI_ADDRCONFIG, which wants a configured non-loopback address.
    pub fn with_address(tag: &str, addr: &str) -> Netns {
        let ns = Netns::new(tag);
        run(&["ip", "-n", &ns.name, "link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
        run(&["ip", "-n", &ns.name, "addr", "add", &format!("{addr}/24"), "dev", "v0"]);
        run(&["ip", "-n", &ns.name, "link", "set", "v0", "up"]);
        run(&["ip", "-n", &ns.name, "link", "set", "v1", "up"]);
        ns
    }

    /// Connects two namespaces with a veth pair: `a_addr` on this side,
    /// `b_addr` on the other (a /24 each).
    pub fn link(&self, ifname: &str, a_addr: &str, b: &Netns, b_addr: &str) {
        let peer = format!("{ifname}p");
        run(&["ip", "-n", &self.name, "link", "add", ifname, "type", "veth", "peer", "name", &peer, "netns", &b.name]);
        run(&["ip", "-n", &self.name, "addr", "add", &format!("{a_addr}/24"), "dev", ifname]);
        run(&["ip", "-n", &b.name, "addr", "add", &format!("{b_addr}/24"), "dev", &peer]);
        run(&["ip", "-n", &self.name, "link", "set", ifname, "up"]);
        run(&["ip", "-n", &b.name, "link", "set", &peer, "up"]);
    }

    /// `prog` run inside the namespace (`ip netns exec` execs it: the PID
    /// is the program's).
    pub fn command(&self, prog: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, prog]);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// nfs-ganesha exporting `export` (NFSv3 on fixed ports) inside `ns`.
pub struct Nfsd {
    proc: Option<Proc>,
    ns: String,
    conf: PathBuf,
    pub export: PathBuf,
    dir: PathBuf,
}

impl Nfsd {
    pub fn start(ns: &Netns, dir: &Scratch) -> Nfsd {
        let export = dir.path("export");
        let squashed = dir.path("squashed");
        std::fs::create_dir_all(&export).unwrap();
        std::fs::create_dir_all(&squashed).unwrap();
        // Root is squashed to nobody there, and the directory is root's
        // 0755: creating a file is refused (permission denied).
        std::fs::set_permissions(&squashed, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let conf = dir.path("ganesha.conf");
        std::fs::write(
            &conf,
            format!(
                r#"NFS_CORE_PARAM {{
    NFS_Port = {NFS_PORT};
    MNT_Port = {MNT_PORT};
    NLM_Port = 20470;
    Rquota_Port = 20460;
    NFS_Protocols = 3, 4;
    Enable_NLM = false;
    Enable_RQUOTA = false;
}}
NFSV4 {{ Graceless = true; }}
NFS_KRB5 {{ Active_krb5 = false; }}
EXPORT_DEFAULTS {{ Access_Type = RW; SecType = sys; Protocols = 3, 4; Transports = TCP; }}
EXPORT {{ Export_Id = 1; Path = {}; Pseudo = /export; Squash = No_Root_Squash; FSAL {{ Name = VFS; }} }}
EXPORT {{ Export_Id = 2; Path = {}; Pseudo = /squashed; Squash = Root_Squash; FSAL {{ Name = VFS; }} }}
LOG {{ Default_Log_Level = WARN; }}
"#,
                export.display(),
                squashed.display()
            ),
        )
        .unwrap();
        let mut d = Nfsd { proc: None, ns: ns.name.clone(), conf, export, dir: dir.0.clone() };
        d.restart();
        d
    }

    /// (Re)starts the server and waits until it serves the export.
    pub fn restart(&mut self) {
        assert!(self.proc.is_none(), "server already running");
        // Own mount namespace (a private /run for rpcbind's socket and lock)
        // and PID namespace: killing `unshare` by PID takes ganesha (PID 1
        // there) and rpcbind with it.
        let script = format!(
            "mount -t tmpfs tmpfs /run && mkdir -p /run/rpcbind && mkdir -p /var/lib/nfs/ganesha && mount -t tmpfs tmpfs /var/lib/nfs/ganesha && \
             (rpcbind -f -w &) && sleep 0.2 && exec ganesha.nfsd -F -f {} -L {}/ganesha.log -p {}/ganesha.pid",
            self.conf.display(),
            self.dir.display(),
            self.dir.display()
        );
        let p = Proc::spawn(Command::new("ip").args(["netns", "exec", &self.ns, "unshare", "--mount", "--pid", "--fork", "--kill-child", "sh", "-c", &script]));
        self.proc = Some(p);
        let probe = format!("nfs://127.0.0.1{}?nfsport={NFS_PORT}&mountport={MNT_PORT}", self.export.display());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let o = Command::new("ip").args(["netns", "exec", &self.ns, "nfs-ls", &probe]).output().expect("nfs-ls (libnfs-utils)");
            if o.status.success() {
                return;
            }
            let log = std::fs::read_to_string(self.dir.join("ganesha.log")).unwrap_or_default();
            assert!(Instant::now() < deadline, "nfs-ganesha did not come up: {}\nlog:\n{log}", String::from_utf8_lossy(&o.stderr));
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// SIGKILL: the server vanishes mid-whatever.
    pub fn kill(&mut self) {
        if let Some(p) = self.proc.take() {
            p.kill();
        }
    }

    /// `nfs://HOST/EXPORT/FILE` with the server's ports.
    pub fn uri(&self, host: &str, file: &str) -> String {
        format!("nfs://{host}{}/{file}?nfsport={NFS_PORT}&mountport={MNT_PORT}", self.export.display())
    }

    /// `nfs://HOST:PORT/EXPORT/FILE?mountport=...`: the NFS port in the
    /// authority, as QEMU users write it.
    pub fn port_uri(&self, host: &str, file: &str) -> String {
        format!("nfs://{host}:{NFS_PORT}{}/{file}?mountport={MNT_PORT}", self.export.display())
    }

    /// The same, on the root-squashed export.
    pub fn squashed_uri(&self, host: &str, file: &str) -> String {
        format!("nfs://{host}{}/{file}?nfsport={NFS_PORT}&mountport={MNT_PORT}", self.dir.join("squashed").display())
    }

    pub fn local(&self, file: &str) -> PathBuf {
        self.export.join(file)
    }
}

impl Drop for Nfsd {
    fn drop(&mut self) {
        self.kill();
    }
}
