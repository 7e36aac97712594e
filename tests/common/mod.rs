//! Shared helpers for the integration tests: the ringvm binary, the test
//! guest, KVM gating (fail under CI=true, skip otherwise) and processes with
//! deadlines that are always killed by PID.
#![allow(dead_code)]

pub mod nfs;
pub mod qmp;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn ringvm_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ringvm")
}

/// True when KVM is usable. Without it: a failure under CI=true, a skip otherwise.
pub fn require_kvm(test: &str) -> bool {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => true,
        Err(e) => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{test}: /dev/kvm is required under CI=true: {e}");
            }
            eprintln!("SKIP {test}: /dev/kvm unavailable: {e}");
            false
        }
    }
}

/// A per-test scratch directory under the target dir, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
    pub fn path(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes the embedded test guest into `dir`.
pub fn guest_elf(dir: &Scratch) -> PathBuf {
    let p = dir.path("guest.elf");
    std::fs::write(&p, ringvm::TEST_GUEST_ELF).unwrap();
    p
}

pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }
}

/// A child whose output is collected in the background; killed on drop.
pub struct Proc {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

fn pump(mut r: impl Read + Send + 'static, buf: Arc<Mutex<Vec<u8>>>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
            buf.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    })
}

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Proc {
        Self::spawn_stdin(cmd.stdin(Stdio::null()))
    }

    /// As [`Proc::spawn`], with a pipe on stdin ([`Proc::type_serial`]:
    /// ringvm's `--serial stdio` passes it to the guest's COM1).
    pub fn spawn_with_stdin(cmd: &mut Command) -> Proc {
        Self::spawn_stdin(cmd.stdin(Stdio::piped()))
    }

    fn spawn_stdin(cmd: &mut Command) -> Proc {
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
        let out = Arc::new(Mutex::new(Vec::new()));
        let err = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![pump(child.stdout.take().unwrap(), out.clone()), pump(child.stderr.take().unwrap(), err.clone())];
        let stdin = child.stdin.take();
        Proc { child, stdin, out, err, readers }
    }

    /// Writes `bytes` to the child's stdin (spawned with [`Proc::spawn_with_stdin`]).
    pub fn type_serial(&mut self, bytes: &[u8]) {
        use std::io::Write;
        let w = self.stdin.as_mut().expect("spawned without a stdin pipe");
        w.write_all(bytes).and_then(|_| w.flush()).expect("write to the VMM's stdin");
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned()
    }

    /// Waits until stdout holds more than `seen` matches of `needle`.
    pub fn wait_for_more(&self, needle: &str, seen: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.stdout().matches(needle).count() <= seen {
            assert!(Instant::now() < deadline, "deadline: no new {needle:?} within {timeout:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until stdout contains `needle`; panics at the deadline.
    pub fn wait_for_output(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.stdout().contains(needle) {
            if let Ok(Some(st)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(50));
                if self.stdout().contains(needle) {
                    return;
                }
                panic!("process exited ({st}) before printing {needle:?}\nstdout:\n{}\nstderr:\n{}", self.stdout(), self.stderr());
            }
            if Instant::now() > deadline {
                panic!("deadline: no {needle:?} within {timeout:?}\nstdout:\n{}\nstderr:\n{}", self.stdout(), self.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL by PID, and reaped.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for exit; kills by PID and panics at the deadline.
    pub fn wait(mut self, timeout: Duration) -> Output {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("deadline: process did not exit within {timeout:?}\nstdout:\n{}\nstderr:\n{}", self.stdout(), self.stderr());
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        Output { status, stdout: self.stdout(), stderr: self.stderr() }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if std::thread::panicking() {
                // A failed test with the VMM still up: show where each of its
                // threads is (a hang's evidence) and what it logged.
                eprintln!("--- ringvm (pid {}) stderr:\n{}", self.child.id(), self.stderr());
                let bt = Command::new("timeout")
                    .args(["-k", "5", "60", "gdb", "-p", &self.child.id().to_string(), "-batch", "-nx", "-ex", "thread apply all bt 30"])
                    .stdin(Stdio::null())
                    .output();
                match bt {
                    Ok(o) => eprintln!("--- ringvm threads:\n{}", String::from_utf8_lossy(&o.stdout)),
                    Err(e) => eprintln!("--- no thread stacks (gdb: {e})"),
                }
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `out` up to its last newline (a guest may be mid-line).
pub fn complete_lines(out: &str) -> &str {
    &out[..out.rfind('\n').map_or(0, |i| i + 1)]
}

/// Runs ringvm with `args` to completion within `timeout`.
pub fn ringvm(args: &[&str], timeout: Duration) -> Output {
    Proc::spawn(Command::new(ringvm_bin()).args(args)).wait(timeout)
}

/// ringvm-faultfs mounted over a scratch directory; unmounted (lazily, so
/// a stuck request cannot hold the test up) and killed by PID on drop.
pub struct FaultFs {
    proc: Option<Proc>,
    pub mnt: PathBuf,
}

impl FaultFs {
    pub fn mount(dir: &Scratch, name: &str, args: &[&str]) -> FaultFs {
        let back = dir.path(&format!("{name}-back"));
        let mnt = dir.path(name);
        std::fs::create_dir_all(&back).unwrap();
        std::fs::create_dir_all(&mnt).unwrap();
        let p = Proc::spawn(Command::new(env!("CARGO_BIN_EXE_ringvm-faultfs")).arg(&back).arg(&mnt).args(args));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
            if mounts.lines().any(|l| l.starts_with("ringvm-faultfs ") && l.contains(mnt.to_str().unwrap())) {
                break;
            }
            assert!(Instant::now() < deadline, "ringvm-faultfs did not mount (fusermount3 missing?)\n{}", p.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
        FaultFs { proc: Some(p), mnt }
    }

    pub fn path(&self, f: &str) -> PathBuf {
        self.mnt.join(f)
    }

    /// Waits until ringvm-faultfs has stalled its first write (it says so).
    pub fn wait_stalled(&self, timeout: Duration) {
        self.wait_announced("ringvm-faultfs: stalling writes", timeout);
    }

    /// Waits until ringvm-faultfs has stalled its first read.
    pub fn wait_stalled_reads(&self, timeout: Duration) {
        self.wait_announced("ringvm-faultfs: stalling reads", timeout);
    }

    fn wait_announced(&self, line: &str, timeout: Duration) {
        let p = self.proc.as_ref().expect("ringvm-faultfs is running");
        let deadline = Instant::now() + timeout;
        while !p.stderr().contains(line) {
            assert!(Instant::now() < deadline, "deadline: no '{line}' within {timeout:?}\n{}", p.stderr());
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Ends the filesystem: requests still waiting fail (ENOTCONN).
    pub fn kill(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).output();
        if let Some(p) = self.proc.take() {
            p.kill();
        }
    }
}

impl Drop for FaultFs {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A loop-mounted XFS (reflink) in `dir`, unmounted on drop.
pub struct XfsMount {
    pub dir: std::path::PathBuf,
    image: std::path::PathBuf,
}

impl XfsMount {
    /// None (a skip) when it cannot be made here, unless CI=true.
    pub fn new(scratch: &Scratch) -> Option<XfsMount> {
        let image = scratch.path("xfs.img");
        let dir = scratch.path("xfs");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::File::create(&image).unwrap().set_len(512 << 20).unwrap();
        let run = |c: &mut Command| c.output().map(|o| o.status.success()).unwrap_or(false);
        let ok =
            run(Command::new("mkfs.xfs").args(["-q", "-m", "reflink=1"]).arg(&image)) && run(Command::new("mount").args(["-o", "loop"]).arg(&image).arg(&dir));
        if !ok {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("cannot make a loop-mounted XFS (mkfs.xfs from xfsprogs, root, loop devices)");
            }
            eprintln!("SKIP: no loop-mounted XFS here");
            return None;
        }
        Some(XfsMount { dir, image })
    }
}

impl Drop for XfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
        let _ = std::fs::remove_file(&self.image);
    }
}

/// The test guest's disk pattern (tests/guest/scsi.c `pattern`).
pub fn pattern(seed: u64, lun: u32, off: u64) -> u64 {
    let mut x = (off / 8 + 1) ^ (seed << 40) ^ (u64::from(lun) << 56);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    x
}

/// Words of `path` in `[0, bytes)` that differ from the guest's pattern
/// for (`seed`, `lun`): (count, first offset).
pub fn pattern_mismatches(path: &Path, seed: u64, lun: u32, bytes: u64) -> (u64, Option<u64>) {
    let d = std::fs::read(path).unwrap();
    assert!(d.len() as u64 >= bytes, "{} is {} bytes, expected {bytes}", path.display(), d.len());
    let mut bad = (0, None);
    for off in (0..bytes).step_by(8) {
        let w = u64::from_le_bytes(d[off as usize..off as usize + 8].try_into().unwrap());
        if w != pattern(seed, lun, off) {
            bad.0 += 1;
            bad.1.get_or_insert(off);
        }
    }
    bad
}

/// Blocks of `bs` bytes in `path` that are neither untouched (zero) nor
/// the guest's pattern for (`seed`, `lun`), and how many hold the pattern.
pub fn blocks_torn_and_written(path: &Path, seed: u64, lun: u32, bs: u64) -> (Vec<u64>, u64) {
    let d = std::fs::read(path).unwrap();
    let (mut torn, mut written) = (Vec::new(), 0);
    for (i, blk) in d.chunks(bs as usize).enumerate() {
        if blk.iter().all(|&b| b == 0) {
            continue;
        }
        let base = i as u64 * bs;
        let ok = blk.chunks(8).enumerate().all(|(j, w)| u64::from_le_bytes(w.try_into().unwrap()) == pattern(seed, lun, base + j as u64 * 8));
        if ok {
            written += 1;
        } else {
            torn.push(base);
        }
    }
    (torn, written)
}
