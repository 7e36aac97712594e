//! QMP: the real qemu.qmp client drives a running guest; raw-socket tests
//! feed the server bad input and check it answers or disconnects cleanly
//! while the VM keeps running.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::qmp::Qmp;
use common::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);
const IO: Duration = Duration::from_secs(10);

/// A guest that keeps running (dirtying memory) until told otherwise.
fn start_vm(dir: &Scratch, sock: &Path, cpus: &str) -> Proc {
    let g = guest_elf(dir);
    let mut p = Proc::spawn(
        Command::new(ringvm_bin())
            .args(["run", "--kernel"])
            .arg(&g)
            .args(["--cpus", cpus, "--memory", "256M", "--cmdline", "work=mem mib=32 secs=inf rate=20 beat=200", "--qmp"])
            .arg(format!("unix:{},server=on,wait=off", sock.display())),
    );
    p.wait_for_output("ringvm-guest: start", T);
    p
}

fn error_of(v: &Value) -> (String, String) {
    let e = &v["error"];
    assert!(e.is_object(), "expected an error, got {v}");
    (e["class"].as_str().unwrap().to_string(), e["desc"].as_str().unwrap().to_string())
}

fn python() -> Option<PathBuf> {
    let p = std::env::var_os("RINGVM_PYTHON").map(PathBuf::from).unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/venv/bin/python"));
    let ok = Command::new(&p).args(["-c", "import qemu.qmp"]).stderr(Stdio::null()).status().map(|s| s.success()).unwrap_or(false);
    if ok {
        return Some(p);
    }
    assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "the qemu.qmp client is required under CI=true (scripts/test.sh installs it)");
    eprintln!("SKIP: no python with qemu.qmp at {} (run scripts/test.sh)", p.display());
    None
}

fn count(hay: &str, needle: &str) -> usize {
    hay.matches(needle).count()
}

#[test]
fn qemu_qmp_client_drives_the_vm() {
    if !require_kvm("qemu_qmp_client_drives_the_vm") {
        return;
    }
    let Some(py) = python() else { return };
    let dir = Scratch::new("qmp-client");
    let sock = dir.path("qmp.sock");
    let vm = start_vm(&dir, &sock, "2");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/qmp/client.py");
    let mut client = Command::new(&py).arg(&script).arg(&sock).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut out = BufReader::new(client.stdout.take().unwrap());
    let mut transcript = String::new();
    let deadline = Instant::now() + T;
    let mut line = String::new();
    // Step through the client's checks; after the reset, wait until the
    // guest printed its start banner again, then let the client quit.
    loop {
        line.clear();
        if out.read_line(&mut line).unwrap() == 0 {
            break;
        }
        transcript.push_str(&line);
        if line.trim() == "RESET-SENT" {
            while count(&vm.stdout(), "ringvm-guest: start") < 2 {
                assert!(Instant::now() < deadline, "guest did not restart after system_reset:\n{}", vm.stdout());
                std::thread::sleep(Duration::from_millis(20));
            }
            client.stdin.as_mut().unwrap().write_all(b"GUEST-RESTARTED\n").unwrap();
        }
        assert!(Instant::now() < deadline, "deadline\n{transcript}");
    }
    let st = client.wait().unwrap();
    let mut err = String::new();
    client.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(st.success() && transcript.contains("DONE"), "client failed:\n{transcript}\n{err}");
    let o = vm.wait(T);
    assert_eq!(o.code(), 0, "quit exits 0\n{}", o.stderr);
    assert!(!sock.exists(), "socket removed at exit");
}

#[test]
fn bad_input_gets_errors_and_the_vm_keeps_running() {
    if !require_kvm("bad_input_gets_errors_and_the_vm_keeps_running") {
        return;
    }
    let dir = Scratch::new("qmp-bad");
    let sock = dir.path("qmp.sock");
    let vm = start_vm(&dir, &sock, "1");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode");

    // Before negotiation only qmp_capabilities is accepted.
    let mut a = Qmp::connect(&sock);
    let r = a.cmd(json!({"execute": "query-status", "id": "x"}));
    assert_eq!(error_of(&r).0, "CommandNotFound");
    assert_eq!(r["id"], "x");
    let r = a.cmd(json!({"execute": "qmp_capabilities", "arguments": {"enable": "oob"}}));
    assert_eq!(error_of(&r), ("GenericError".into(), "Invalid parameter type for 'enable', expected: array".into()));
    assert_eq!(a.exec("qmp_capabilities"), json!({}));
    assert_eq!(error_of(&a.cmd(json!({"execute": "qmp_capabilities"}))).0, "CommandNotFound");

    // Malformed JSON, non-objects, bad members: errors, connection kept.
    a.send_raw(b"{\"execute\": }\n");
    assert!(error_of(&a.reply()).1.starts_with("JSON parse error"));
    a.send_raw(b"[1, 2]\n");
    assert_eq!(error_of(&a.reply()).1, "QMP input must be a JSON object");
    a.send_raw(b"\"just a string\"\n");
    assert_eq!(error_of(&a.reply()).1, "QMP input must be a JSON object");
    let r = a.cmd(json!({"execute": "no-such-thing", "id": {"deep": [1, 2]}}));
    assert_eq!(error_of(&r), ("CommandNotFound".into(), "The command no-such-thing has not been found".into()));
    assert_eq!(r["id"], json!({"deep": [1, 2]}), "id echoed as given");
    assert_eq!(error_of(&a.cmd(json!({"execute": 7}))).1, "QMP input member 'execute' must be a string");
    assert_eq!(error_of(&a.cmd(json!({"execute": "stop", "arguments": [1]}))).1, "QMP input member 'arguments' must be an object");
    assert_eq!(error_of(&a.cmd(json!({"execute": "stop", "foo": 1}))).1, "QMP input member 'foo' is unexpected");
    // Argument checks name the argument.
    assert_eq!(error_of(&a.cmd(json!({"execute": "stop", "arguments": {"now": true}}))).1, "Parameter 'now' is unexpected");
    assert_eq!(error_of(&a.cmd(json!({"execute": "human-monitor-command"}))).1, "Parameter 'command-line' is missing");
    assert_eq!(
        error_of(&a.cmd(json!({"execute": "human-monitor-command", "arguments": {"command-line": ["info"]}}))).1,
        "Invalid parameter type for 'command-line', expected: string"
    );
    // The ACPI power button: pressed (the test guest does not act on it).
    assert_eq!(a.cmd(json!({"execute": "system_powerdown"})), json!({"return": {}}));
    // Ids of any JSON type; several commands in one write.
    a.send_raw(b"{\"execute\":\"query-name\",\"id\":1}{\"execute\":\"query-status\",\"id\":null}\n");
    assert_eq!(a.reply(), json!({"return": {}, "id": 1}));
    assert_eq!(a.reply(), json!({"return": {"running": true, "status": "running"}, "id": null}));

    // A client that disconnects mid-request.
    let mut b = Qmp::negotiated(&sock);
    b.send_raw(b"{\"execute\": \"query-sta");
    drop(b);

    // 16 MiB of garbage without a break: an error, then a disconnect.
    let mut g = Qmp::negotiated(&sock);
    let junk: Vec<u8> = (0..16u32 << 20).map(|i| b'a' + (i.wrapping_mul(2_654_435_761) >> 27) as u8 % 26).collect();
    let w = g.streams().1.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut w = w;
        let _ = w.write_all(&junk); // fails with EPIPE once ringvm hangs up
    });
    let r = g.read().expect("an error before the disconnect");
    assert!(error_of(&r).1.contains("exceeds"), "{r}");
    assert!(g.read().is_none(), "disconnected after the oversized message");
    writer.join().unwrap();
    // The same inside an unterminated object.
    let mut h = Qmp::negotiated(&sock);
    let w = h.streams().1.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut w = w;
        let _ = w.write_all(b"{\"execute\": \"");
        let _ = w.write_all(&vec![b'x'; 16 << 20]);
    });
    assert!(error_of(&h.read().unwrap()).1.contains("exceeds"));
    assert!(h.read().is_none());
    writer.join().unwrap();

    // Two clients interleaving: each gets its own replies, both see events.
    let mut c = Qmp::negotiated(&sock);
    let mut d = Qmp::negotiated(&sock);
    c.send_raw(b"{\"execute\":\"query-name\",\"id\":\"c1\"}");
    d.send_raw(b"{\"execute\":\"query-status\",\"id\":\"d1\"}");
    c.send_raw(b"{\"execute\":\"stop\",\"id\":\"c2\"}");
    assert_eq!(d.reply()["id"], "d1");
    assert_eq!(c.reply()["id"], "c1");
    assert_eq!(c.reply()["id"], "c2");
    c.wait_event("STOP");
    d.wait_event("STOP");
    assert_eq!(d.exec("query-status"), json!({"running": false, "status": "paused"}));
    assert_eq!(d.exec("cont"), json!({}));
    c.wait_event("RESUME");
    d.wait_event("RESUME");

    // Still running, still answering, guest still making progress.
    assert_eq!(a.exec("query-status"), json!({"running": true, "status": "running"}));
    let before = count(&vm.stdout(), "ringvm-guest: beat");
    let t0 = Instant::now();
    while count(&vm.stdout(), "ringvm-guest: beat") < before + 2 {
        assert!(t0.elapsed() < IO, "guest stopped making progress:\n{}", vm.stdout());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(a.exec("quit"), json!({}));
    let o = vm.wait(T);
    assert_eq!(o.code(), 0, "{}", o.stderr);
}

#[test]
fn a_client_that_never_reads_is_dropped_and_others_are_served() {
    if !require_kvm("a_client_that_never_reads_is_dropped_and_others_are_served") {
        return;
    }
    let dir = Scratch::new("qmp-slow");
    let sock = dir.path("qmp.sock");
    let vm = start_vm(&dir, &sock, "1");
    let mut lazy = Qmp::negotiated(&sock);
    let mut good = Qmp::negotiated(&sock);
    // Pipeline many commands and never read the replies: ringvm's output
    // for this client grows to its bound, then it is disconnected.
    let w = lazy.streams().1.try_clone().unwrap();
    let spam = std::thread::spawn(move || {
        let mut w = w;
        let one = b"{\"execute\":\"query-cpus-fast\"}";
        for _ in 0..200_000 {
            if w.write_all(one).is_err() {
                return true;
            }
        }
        false
    });
    for i in 0..200 {
        assert_eq!(good.cmd(json!({"execute": "query-status", "id": i}))["id"], i);
    }
    assert!(spam.join().unwrap(), "the non-reading client was never disconnected");
    // Its socket is closed: reading drains what was sent (the last reply
    // may be cut), then EOF.
    let mut rest = Vec::new();
    let _ = lazy.streams().0.read_to_end(&mut rest);
    assert_eq!(good.exec("query-status")["status"], "running");
    // Many connects and disconnects.
    for _ in 0..300 {
        let s = UnixStream::connect(&sock).unwrap();
        drop(s);
    }
    assert_eq!(good.exec("query-status")["status"], "running");
    good.exec("quit");
    assert_eq!(vm.wait(T).code(), 0);
}

#[test]
fn socket_path_rules() {
    if !require_kvm("socket_path_rules") {
        return;
    }
    let dir = Scratch::new("qmp-path");
    let g = guest_elf(&dir);
    // A regular file is never replaced.
    let file = dir.path("not-a-socket");
    std::fs::write(&file, b"precious").unwrap();
    let o = ringvm(&["run", "--kernel", g.to_str().unwrap(), "--memory", "64M", "--cmdline", "work=hello", "--qmp", file.to_str().unwrap()], T);
    assert_eq!(o.code(), 1);
    assert!(o.stderr.contains("is not a socket") && o.stderr.lines().count() == 1, "{}", o.stderr);
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");
    // A stale socket (nobody listening) is replaced.
    let stale = dir.path("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let vm = start_vm(&dir, &stale, "1");
    let mut q = Qmp::negotiated(&stale);
    assert_eq!(q.exec("query-status")["status"], "running");
    // A live one is refused.
    let o = ringvm(&["run", "--kernel", g.to_str().unwrap(), "--memory", "64M", "--cmdline", "work=hello", "--qmp", stale.to_str().unwrap()], T);
    assert_eq!(o.code(), 1);
    assert!(o.stderr.contains("another process is listening"), "{}", o.stderr);
    q.exec("quit");
    assert_eq!(vm.wait(T).code(), 0);
    // Bad spellings of the option.
    for bad in ["unix:", "unix:/x,wait=on", "unix:/x,server=off", "tcp:localhost:4444", "unix:/x,bogus"] {
        let o = ringvm(&["run", "--kernel", g.to_str().unwrap(), "--qmp", bad], T);
        assert_eq!(o.code(), 1, "{bad}: {}", o.stderr);
        assert_eq!(o.stderr.trim().lines().count(), 1, "{bad}: {}", o.stderr);
    }
}

#[test]
fn paused_start_and_sigterm() {
    if !require_kvm("paused_start_and_sigterm") {
        return;
    }
    let dir = Scratch::new("qmp-paused");
    let sock = dir.path("qmp.sock");
    let g = guest_elf(&dir);
    // How long this guest takes, on this machine now, from a running VM's
    // QMP socket to its first line: the paused VM below is watched for
    // several times that (it would have printed by then if it ran).
    let first_line = {
        let vm =
            Proc::spawn(Command::new(ringvm_bin()).args(["run", "--memory", "64M", "--cmdline", "work=hello", "--kernel"]).arg(&g).arg("--qmp").arg(&sock));
        let t0 = Instant::now();
        while !sock.exists() {
            assert!(t0.elapsed() < IO, "no socket");
            std::thread::sleep(Duration::from_millis(1));
        }
        let t1 = Instant::now();
        while !vm.stdout().contains("ringvm-guest") {
            assert!(t1.elapsed() < IO, "the guest never printed");
            std::thread::sleep(Duration::from_millis(1));
        }
        let d = t1.elapsed();
        assert_eq!(vm.wait(T).code(), 0);
        let _ = std::fs::remove_file(&sock);
        d
    };
    let vm = Proc::spawn(
        Command::new(ringvm_bin())
            .args(["run", "-S", "--name", "vm-one", "--memory", "64M", "--cmdline", "work=hello", "--kernel"])
            .arg(&g)
            .arg("--qmp")
            .arg(&sock),
    );
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(t0.elapsed() < IO, "no socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut q = Qmp::negotiated(&sock);
    assert_eq!(q.exec("query-status"), json!({"running": false, "status": "prelaunch"}));
    assert_eq!(q.exec("query-name"), json!({"name": "vm-one"}));
    std::thread::sleep((first_line * 5).max(Duration::from_millis(50)));
    assert!(!vm.stdout().contains("ringvm-guest"), "guest ran while paused (a running one prints within {first_line:?})");
    assert_eq!(q.exec("cont"), json!({}));
    q.wait_event("RESUME");
    // work=hello exits by itself: SHUTDOWN from the guest.
    let ev = q.wait_event("SHUTDOWN");
    assert_eq!(ev["data"], json!({"guest": true, "reason": "guest-shutdown"}));
    assert_eq!(vm.wait(T).code(), 0);

    // SIGTERM: SHUTDOWN (host-signal) and exit 0.
    let vm = start_vm(&dir, &sock, "1");
    let mut q = Qmp::negotiated(&sock);
    // SAFETY: signalling our own child by PID.
    unsafe { libc::kill(vm.pid() as i32, libc::SIGTERM) };
    let ev = q.wait_event("SHUTDOWN");
    assert_eq!(ev["data"], json!({"guest": false, "reason": "host-signal"}));
    assert_eq!(vm.wait(T).code(), 0);
}

#[test]
fn qmp_shell_works_unchanged() {
    if !require_kvm("qmp_shell_works_unchanged") {
        return;
    }
    let Some(py) = python() else { return };
    let shell = py.with_file_name("qmp-shell");
    let dir = Scratch::new("qmp-shell");
    let sock = dir.path("qmp.sock");
    let vm = start_vm(&dir, &sock, "1");
    let mut sh = Command::new(&shell).arg(&sock).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    sh.stdin.take().unwrap().write_all(b"query-status\nstop\nquery-status\nquit\n").unwrap();
    let t0 = Instant::now();
    while sh.try_wait().unwrap().is_none() {
        if t0.elapsed() > T {
            let _ = sh.kill();
            panic!("qmp-shell did not finish");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut out = String::new();
    sh.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(out.contains(r#"{"return": {"running": true, "status": "running"}}"#), "{out}");
    assert!(out.contains(r#"{"return": {"running": false, "status": "paused"}}"#), "{out}");
    assert_eq!(vm.wait(T).code(), 0);
}

/// QEMU's migration capability and parameter commands: query-commands
/// lists them (the command table is the one list), values out of range
/// and unknown capabilities are errors, and what is set reads back.
#[test]
fn migration_capabilities_and_parameters() {
    if !require_kvm("migration_capabilities_and_parameters") {
        return;
    }
    let dir = Scratch::new("qmp-migcaps");
    let sock = dir.path("qmp.sock");
    let p = start_vm(&dir, &sock, "1");
    let mut q = Qmp::negotiated(&sock);
    let names: Vec<String> = q.ok("query-commands", json!({})).as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap().to_string()).collect();
    for n in ["migrate-set-capabilities", "query-migrate-capabilities", "migrate-set-parameters", "query-migrate-parameters", "migrate", "savevm-start"] {
        assert!(names.iter().any(|x| x == n), "{n} missing from {names:?}");
    }
    assert_eq!(
        q.ok("query-migrate-capabilities", json!({})),
        json!([{"capability": "auto-converge", "state": false}, {"capability": "dirty-limit", "state": false}])
    );
    q.ok("migrate-set-capabilities", json!({"capabilities": [{"capability": "auto-converge", "state": true}, {"capability": "xbzrle", "state": false}]}));
    assert_eq!(q.ok("query-migrate-capabilities", json!({}))[0]["state"], true);
    // QEMU's rule: dirty-limit and auto-converge exclude each other.
    let r = q.cmd(json!({"execute": "migrate-set-capabilities", "arguments": {"capabilities": [{"capability": "dirty-limit", "state": true}]}}));
    assert!(error_of(&r).1.contains("incompatible"), "{r}");
    // ... and dirty-limit needs the dirty ring this VM does not have.
    let both = json!([{"capability": "auto-converge", "state": false}, {"capability": "dirty-limit", "state": true}]);
    let r = q.cmd(json!({"execute": "migrate-set-capabilities", "arguments": {"capabilities": both}}));
    assert!(error_of(&r).1.contains("--dirty-ring"), "{r}");
    assert_eq!(q.ok("query-migrate-capabilities", json!({}))[1]["state"], false);
    q.ok("migrate-set-parameters", json!({"vcpu-dirty-limit": 20}));
    assert_eq!(q.ok("query-migrate-parameters", json!({}))["vcpu-dirty-limit"], 20);
    let r = q.cmd(json!({"execute": "migrate-set-parameters", "arguments": {"vcpu-dirty-limit": 0}}));
    assert!(error_of(&r).1.contains("vcpu-dirty-limit"), "{r}");
    let r = q.cmd(
        json!({"execute": "savevm-start", "arguments": {"statefile": dir.path("x").to_str().unwrap(), "converge": "dirty-limit", "vcpu-dirty-limit": -1}}),
    );
    assert!(error_of(&r).1.contains("vcpu-dirty-limit"), "{r}");
    let r = q.cmd(json!({"execute": "migrate-set-capabilities", "arguments": {"capabilities": [{"capability": "postcopy-ram", "state": true}]}}));
    assert!(error_of(&r).1.contains("postcopy-ram"), "{r}");
    q.ok("migrate-set-parameters", json!({"cpu-throttle-initial": 30, "cpu-throttle-increment": 15, "downtime-limit": 50}));
    let v = q.ok("query-migrate-parameters", json!({}));
    assert_eq!((v["cpu-throttle-initial"].clone(), v["cpu-throttle-increment"].clone(), v["downtime-limit"].clone()), (json!(30), json!(15), json!(50)), "{v}");
    let r = q.cmd(json!({"execute": "migrate-set-parameters", "arguments": {"cpu-throttle-initial": 100}}));
    assert!(error_of(&r).1.contains("cpu-throttle-initial"), "{r}");
    let r = q.cmd(json!({"execute": "migrate", "arguments": {"uri": "tcp:127.0.0.1:4444"}}));
    assert!(error_of(&r).1.contains("Invalid URI"), "{r}");
    let r = q.cmd(json!({"execute": "savevm-start", "arguments": {"statefile": "nfs://srv:99999/e/f"}}));
    assert!(error_of(&r).1.contains("port"), "{r}");
    let r = q.cmd(json!({"execute": "qmp_capabilities"}));
    assert_eq!(error_of(&r).0, "CommandNotFound", "{r}");
    q.ok("quit", json!({}));
    assert_eq!(p.wait(Duration::from_secs(60)).code(), 0);
}
