//! A small QMP client for the integration tests: every read has a
//! deadline (socket timeouts), events are kept aside for `wait_event`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const IO: Duration = Duration::from_secs(30);

pub struct Qmp {
    pub r: BufReader<UnixStream>,
    pub w: UnixStream,
    pub events: Vec<Value>,
}

impl Qmp {
    /// Connects and reads the greeting (not negotiated yet).
    pub fn connect(sock: &Path) -> Qmp {
        let t0 = Instant::now();
        let s = loop {
            match UnixStream::connect(sock) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(t0.elapsed() < IO, "connect {}: {e}", sock.display());
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        };
        s.set_read_timeout(Some(IO)).unwrap();
        s.set_write_timeout(Some(IO)).unwrap();
        let mut q = Qmp { r: BufReader::new(s.try_clone().unwrap()), w: s, events: vec![] };
        let g = q.read().expect("greeting");
        assert!(g["QMP"]["version"]["package"].as_str().unwrap().starts_with("ringvm"), "{g}");
        assert_eq!(g["QMP"]["capabilities"], json!([]));
        q
    }

    pub fn negotiated(sock: &Path) -> Qmp {
        let mut q = Qmp::connect(sock);
        assert_eq!(q.cmd(json!({"execute": "qmp_capabilities"})), json!({"return": {}}));
        q
    }

    /// Next message, or None at EOF.
    pub fn read(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.r.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad JSON from ringvm {line:?}: {e}"))),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionReset) => None,
            Err(e) => panic!("read: {e}"),
        }
    }

    pub fn send_raw(&mut self, b: &[u8]) {
        self.w.write_all(b).unwrap();
    }

    /// The next reply (events are collected on the side).
    pub fn reply(&mut self) -> Value {
        loop {
            let v = self.read().expect("connection closed while waiting for a reply");
            if v.get("event").is_some() {
                self.events.push(v);
            } else {
                return v;
            }
        }
    }

    pub fn cmd(&mut self, c: Value) -> Value {
        let mut b = serde_json::to_vec(&c).unwrap();
        b.push(b'\n');
        self.send_raw(&b);
        self.reply()
    }

    pub fn exec(&mut self, name: &str) -> Value {
        let r = self.cmd(json!({"execute": name}));
        r.get("return").cloned().unwrap_or_else(|| panic!("{name}: {r}"))
    }

    pub fn wait_event(&mut self, name: &str) -> Value {
        let deadline = Instant::now() + IO;
        loop {
            if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
                return self.events.remove(i);
            }
            assert!(Instant::now() < deadline, "no {name} event");
            let v = self.read().expect("closed while waiting for an event");
            assert!(v.get("event").is_some(), "unexpected reply {v}");
            self.events.push(v);
        }
    }

    /// `execute` with arguments; panics on an error reply.
    pub fn ok(&mut self, name: &str, args: Value) -> Value {
        let r = self.cmd(json!({"execute": name, "arguments": args}));
        r.get("return").cloned().unwrap_or_else(|| panic!("{name}: {r}"))
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
