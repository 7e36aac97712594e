//! A blocking QMP client for ringvm's own tools (the `demo`, the perf
//! harness, the integration tests). It speaks plain QMP, so QEMU answers
//! it too. Every read and write has a deadline (socket timeouts); events
//! that arrive while a reply is awaited are kept for [`Client::wait_event`].

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Why a QMP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect {path}: {source}")]
    Connect { path: String, source: std::io::Error },
    #[error("QMP: {0}")]
    Io(#[from] std::io::Error),
    #[error("QMP: the connection was closed")]
    Closed,
    #[error("QMP: bad JSON {line:?}: {source}")]
    Json { line: String, source: serde_json::Error },
    /// The server answered the command with an error.
    #[error("{command}: {class}: {desc}")]
    Command { command: String, class: String, desc: String },
    #[error("QMP: no {0} within the deadline")]
    Deadline(String),
    #[error("QMP: unexpected message {0}")]
    Unexpected(String),
}

pub type Result<T> = std::result::Result<T, ClientError>;

pub struct Client {
    r: BufReader<UnixStream>,
    w: UnixStream,
    /// The server's greeting.
    pub greeting: Value,
    events: VecDeque<Value>,
    timeout: Duration,
}

impl Client {
    /// Connects (retrying until `timeout` while the socket is not there
    /// yet) and reads the greeting; not negotiated yet. `timeout` is also
    /// every later read's and write's deadline.
    pub fn connect(sock: &Path, timeout: Duration) -> Result<Client> {
        let t0 = Instant::now();
        let s = loop {
            match UnixStream::connect(sock) {
                Ok(s) => break s,
                Err(source) if t0.elapsed() >= timeout => return Err(ClientError::Connect { path: sock.display().to_string(), source }),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        let mut c = Client { r: BufReader::new(s.try_clone()?), w: s, greeting: Value::Null, events: VecDeque::new(), timeout };
        c.greeting = c.read()?.ok_or(ClientError::Closed)?;
        if c.greeting.get("QMP").is_none() {
            return Err(ClientError::Unexpected(c.greeting.to_string()));
        }
        Ok(c)
    }

    /// [`Client::connect`], then `qmp_capabilities`.
    pub fn negotiated(sock: &Path, timeout: Duration) -> Result<Client> {
        let mut c = Client::connect(sock, timeout)?;
        c.execute("qmp_capabilities", Value::Null)?;
        Ok(c)
    }

    /// The next message, or None at the end of the stream.
    pub fn read(&mut self) -> Result<Option<Value>> {
        let mut line = String::new();
        match self.r.read_line(&mut line) {
            Ok(0) => Ok(None),
            Ok(_) => serde_json::from_str(&line).map(Some).map_err(|source| ClientError::Json { line, source }),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(None),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => Err(ClientError::Deadline("message".into())),
            Err(e) => Err(e.into()),
        }
    }

    /// Sends bytes as they are (malformed input, pipelines).
    pub fn send_raw(&mut self, b: &[u8]) -> Result<()> {
        Ok(self.w.write_all(b)?)
    }

    /// The next reply; events on the way are kept aside.
    pub fn reply(&mut self) -> Result<Value> {
        loop {
            let v = self.read()?.ok_or(ClientError::Closed)?;
            if v.get("event").is_some() {
                self.events.push_back(v);
            } else {
                return Ok(v);
            }
        }
    }

    /// Sends a request object and returns the reply as it came (success
    /// or error).
    pub fn cmd(&mut self, req: &Value) -> Result<Value> {
        let mut b = serde_json::to_vec(req).map_err(|source| ClientError::Json { line: String::new(), source })?;
        b.push(b'\n');
        self.send_raw(&b)?;
        self.reply()
    }

    /// Runs `name` (with `args` unless null) and returns its `return`
    /// value; an error reply is [`ClientError::Command`].
    pub fn execute(&mut self, name: &str, args: Value) -> Result<Value> {
        let req = if args.is_null() { json!({"execute": name}) } else { json!({"execute": name, "arguments": args}) };
        let r = self.cmd(&req)?;
        match r.get("return") {
            Some(v) => Ok(v.clone()),
            None => Err(ClientError::Command {
                command: name.to_string(),
                class: r["error"]["class"].as_str().unwrap_or("?").to_string(),
                desc: r["error"]["desc"].as_str().map_or_else(|| r.to_string(), str::to_string),
            }),
        }
    }

    /// The first event called `name` (kept earlier or arriving within the
    /// client's timeout); other events stay kept.
    pub fn wait_event(&mut self, name: &str) -> Result<Value> {
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
                return Ok(self.events.remove(i).unwrap_or_default());
            }
            if Instant::now() >= deadline {
                return Err(ClientError::Deadline(format!("{name} event")));
            }
            let v = self.read()?.ok_or(ClientError::Closed)?;
            if v.get("event").is_none() {
                return Err(ClientError::Unexpected(v.to_string()));
            }
            self.events.push_back(v);
        }
    }

    /// The events kept so far, oldest first.
    pub fn take_events(&mut self) -> Vec<Value> {
        self.events.drain(..).collect()
    }

    /// The socket's two halves, for tests that need the raw stream.
    pub fn streams(&mut self) -> (&mut BufReader<UnixStream>, &mut UnixStream) {
        (&mut self.r, &mut self.w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A scripted server: greets, then answers each line with the next
    /// canned message(s).
    fn serve(dir: &Path, script: Vec<Vec<&'static str>>) -> std::path::PathBuf {
        let sock = dir.join("qmp.sock");
        let l = UnixListener::bind(&sock).unwrap();
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n").unwrap();
            for answers in script {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap() == 0 {
                    return;
                }
                for a in answers {
                    w.write_all(a.as_bytes()).unwrap();
                    w.write_all(b"\n").unwrap();
                }
            }
        });
        sock
    }

    #[test]
    fn replies_errors_and_events() {
        let dir = std::env::temp_dir().join(format!("ringvm-qmpc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = serve(
            &dir,
            vec![
                vec![r#"{"return": {}}"#],
                vec![r#"{"event": "STOP", "data": {}}"#, r#"{"return": {"status": "paused"}}"#],
                vec![r#"{"error": {"class": "GenericError", "desc": "no"}}"#],
                vec![r#"{"event": "RESUME", "data": {}}"#],
            ],
        );
        let mut c = Client::negotiated(&sock, Duration::from_secs(10)).unwrap();
        assert_eq!(c.execute("query-status", Value::Null).unwrap()["status"], "paused");
        match c.execute("cont", json!({})) {
            Err(ClientError::Command { command, class, desc }) => assert_eq!((command.as_str(), class.as_str(), desc.as_str()), ("cont", "GenericError", "no")),
            other => panic!("{other:?}"),
        }
        c.send_raw(b"{\"execute\": \"x\"}\n").unwrap();
        assert_eq!(c.wait_event("RESUME").unwrap()["event"], "RESUME");
        assert_eq!(c.wait_event("STOP").unwrap()["event"], "STOP");
        assert!(matches!(c.reply(), Err(ClientError::Closed)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
