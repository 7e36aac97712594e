//! The integration tests' QMP client: ringvm's own client
//! (`ringvm::qmp::client`) with every failure a panic naming it, plus the
//! snapshot waits the tests share. Every read has a deadline.

use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use ringvm::qmp::client::Client;
use serde_json::{json, Value};

const IO: Duration = Duration::from_secs(30);

pub struct Qmp {
    c: Client,
}

impl Qmp {
    /// Connects and reads the greeting (not negotiated yet).
    pub fn connect(sock: &Path) -> Qmp {
        let c = Client::connect(sock, IO).unwrap_or_else(|e| panic!("{e}"));
        let g = &c.greeting;
        assert!(g["QMP"]["version"]["package"].as_str().unwrap().starts_with("ringvm"), "{g}");
        assert_eq!(g["QMP"]["capabilities"], json!([]));
        Qmp { c }
    }

    pub fn negotiated(sock: &Path) -> Qmp {
        let mut q = Qmp::connect(sock);
        assert_eq!(q.cmd(json!({"execute": "qmp_capabilities"})), json!({"return": {}}));
        q
    }

    /// Next message, or None at EOF.
    pub fn read(&mut self) -> Option<Value> {
        self.c.read().unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn send_raw(&mut self, b: &[u8]) {
        self.c.send_raw(b).unwrap_or_else(|e| panic!("{e}"));
    }

    /// The next reply (events are collected on the side).
    pub fn reply(&mut self) -> Value {
        self.c.reply().unwrap_or_else(|e| panic!("while waiting for a reply: {e}"))
    }

    pub fn cmd(&mut self, c: Value) -> Value {
        self.c.cmd(&c).unwrap_or_else(|e| panic!("{c}: {e}"))
    }

    pub fn exec(&mut self, name: &str) -> Value {
        self.c.execute(name, Value::Null).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn wait_event(&mut self, name: &str) -> Value {
        self.c.wait_event(name).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The raw socket, for tests of what a misbehaving client does.
    pub fn streams(&mut self) -> (&mut BufReader<UnixStream>, &mut UnixStream) {
        self.c.streams()
    }

    /// `execute` with arguments; panics on an error reply.
    pub fn ok(&mut self, name: &str, args: Value) -> Value {
        self.c.execute(name, args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Polls query-savevm until at least `min` bytes are written; the
    /// snapshot must still be active then. Returns the last status.
    pub fn wait_savevm_bytes(&mut self, min: u64, deadline: Duration) -> Value {
        let t0 = Instant::now();
        loop {
            let s = self.ok("query-savevm", json!({}));
            assert_eq!(s["status"], "active", "the snapshot ended first: {s}");
            if s["bytes"].as_u64().unwrap_or(0) >= min {
                return s;
            }
            assert!(t0.elapsed() < deadline, "no progress: {s}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Polls query-savevm until the status is not active.
    pub fn wait_savevm(&mut self, deadline: Duration) -> Value {
        let t0 = Instant::now();
        loop {
            let s = self.ok("query-savevm", json!({}));
            if s["status"] != "active" {
                return s;
            }
            assert!(t0.elapsed() < deadline, "snapshot still active after {deadline:?}: {s}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Takes a snapshot to `file` and asserts it completes; its status.
    pub fn savevm_completes(&mut self, file: &Path, deadline: Duration) -> Value {
        self.ok("savevm-start", json!({"statefile": file.to_str().unwrap()}));
        let s = self.wait_savevm(deadline);
        assert_eq!(s["status"], "completed", "snapshot to {}: {s}", file.display());
        s
    }
}
