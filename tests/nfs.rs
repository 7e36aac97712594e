//! Snapshots to and restores from `nfs://` against a real server
//! (nfs-ganesha on loopback, or across network namespaces as separate
//! hosts): the bytes on the server check out, the restored guest verifies
//! every page, and a server that vanishes fails the snapshot cleanly.

mod common;

use std::time::Duration;

use common::nfs::{Netns, Nfsd};
use common::qmp::Qmp;
use common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(120);

fn inspect(path: &str) -> Output {
    ringvm(&["state", "inspect", path], T)
}

/// A VM inside `ns`, with QMP.
fn vm_in(ns: &Netns, dir: &Scratch, args: &[&str], wait_for: &str) -> (Proc, Qmp) {
    let sock = dir.path("qmp.sock");
    let _ = std::fs::remove_file(&sock);
    let mut p = Proc::spawn(ns.command(ringvm_bin()).args(args).arg("--qmp").arg(&sock));
    p.wait_for_output(wait_for, T);
    let q = Qmp::negotiated(&sock);
    (p, q)
}

/// Saves a guest mid-workload to `uri`, lets it finish, and restores it
/// from `restore_uri` in a fresh ringvm in `restore_ns`: the guest carries
/// on and verifies every page.
fn save_then_restore(save_ns: &Netns, restore_ns: &Netns, dir: &Scratch, uri: &str, restore_uri: &str, local: &std::path::Path) {
    let g = guest_elf(dir);
    let work = "work=mem mib=96 secs=3 rate=50 beat=200";
    let (p, mut q) =
        vm_in(save_ns, dir, &["run", "--kernel", g.to_str().unwrap(), "--cpus", "2", "--memory", "192M", "--cmdline", work], "ringvm-guest: beat 2");
    assert_eq!(q.ok("savevm-start", json!({"statefile": uri})), json!({}));
    let s = q.wait_savevm(T);
    assert_eq!(s["status"], "completed", "{s}");
    assert_eq!(s["statefile"], uri);
    q.ok("savevm-end", json!({}));
    drop(q);
    let o = p.wait(T);
    assert_eq!(o.code(), 0, "{}", o.stdout);
    // The bytes the server stored, checked locally, page by page.
    let i = inspect(local.to_str().unwrap());
    assert_eq!(i.code(), 0, "{}\n{}", i.stdout, i.stderr);
    assert!(i.stdout.contains("checksums: all ok"), "{}", i.stdout);
    // A fresh ringvm on another "host" loads it over NFS.
    let r = Proc::spawn(restore_ns.command(ringvm_bin()).args(["run", "--loadstate", restore_uri])).wait(T);
    assert_eq!(r.code(), 0, "stdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    assert!(!r.stdout.contains("ringvm-guest: start"), "the restored guest rebooted:\n{}", r.stdout);
    assert!(r.stdout.contains("verify pages=24576 bad=0"), "{}", r.stdout);
    assert!(r.stdout.contains("RESULT PASS"), "{}", r.stdout);
}

#[test]
fn snapshot_to_nfs_and_restore_from_it() {
    if !require_kvm("snapshot_to_nfs_and_restore_from_it") {
        return;
    }
    let dir = Scratch::new("nfs-loop");
    let ns = Netns::with_address("loop", "10.98.0.1");
    let nfsd = Nfsd::start(&ns, &dir);
    let uri = nfsd.uri("127.0.0.1", "vm.state");
    save_then_restore(&ns, &ns, &dir, &uri, &uri, &nfsd.local("vm.state"));
    // `state inspect` reads over NFS too.
    let o = Proc::spawn(ns.command(ringvm_bin()).args(["state", "inspect", &uri])).wait(T);
    assert_eq!(o.code(), 0, "{}", o.stderr);
    assert!(o.stdout.contains("checksums: all ok"), "{}", o.stdout);
}

/// The scale-out path: the server on one host, a VM saved on a second, and
/// restored by a fresh ringvm on a third, all from the same export.
#[test]
fn three_hosts_one_export() {
    if !require_kvm("three_hosts_one_export") {
        return;
    }
    let dir = Scratch::new("nfs-hosts");
    let server = Netns::new("srv");
    let a = Netns::new("a");
    let b = Netns::new("b");
    server.link("va", "10.97.1.1", &a, "10.97.1.2");
    server.link("vb", "10.97.2.1", &b, "10.97.2.2");
    let nfsd = Nfsd::start(&server, &dir);
    save_then_restore(&a, &b, &dir, &nfsd.uri("10.97.1.1", "vm.state"), &nfsd.uri("10.97.2.1", "vm.state"), &nfsd.local("vm.state"));
}

/// Unreachable server, missing export, permission denied, and a server
/// killed mid-snapshot: each fails the snapshot with the URI and the
/// reason, the VM runs on, no file is loadable; once the server is back the
/// next snapshot completes.
#[test]
fn nfs_failures_are_clean() {
    if !require_kvm("nfs_failures_are_clean") {
        return;
    }
    let dir = Scratch::new("nfs-fail");
    let ns = Netns::with_address("fail", "10.96.0.1");
    let mut nfsd = Nfsd::start(&ns, &dir);
    let g = guest_elf(&dir);
    let (p, mut q) =
        vm_in(&ns, &dir, &["run", "--kernel", g.to_str().unwrap(), "--memory", "768M", "--cmdline", "work=mem mib=640 secs=inf rate=200"], "fill done");

    let expect_failure = |q: &mut Qmp, uri: &str, why: &[&str]| {
        q.ok("savevm-start", json!({"statefile": uri}));
        let s = q.wait_savevm(T);
        assert_eq!(s["status"], "failed", "{uri}: {s}");
        let err = s["error"].as_str().unwrap_or_default().to_string();
        assert!(err.contains(uri), "the error names the URI: {err}");
        assert!(why.iter().any(|w| err.to_lowercase().contains(w)), "{uri}: {err} (wanted one of {why:?})");
        assert_eq!(q.ok("query-status", json!({}))["status"], "running");
        q.ok("savevm-end", json!({}));
    };
    // Nothing listens there.
    expect_failure(&mut q, "nfs://127.0.0.1/x/vm.state?nfsport=1&mountport=2", &["connect", "refused"]);
    // No such export.
    expect_failure(&mut q, &nfsd.uri("127.0.0.1", "vm.state").replace("/export/", "/no-such-export/"), &["mount"]);
    // Root squashed into a directory it may not write.
    expect_failure(&mut q, &nfsd.squashed_uri("127.0.0.1", "vm.state"), &["permission", "access"]);

    // The server dies while RAM is being written.
    let uri = nfsd.uri("127.0.0.1", "killed.state");
    q.ok("savevm-start", json!({"statefile": uri, "downtime-ms": 0}));
    q.wait_savevm_bytes(32 << 20, T);
    nfsd.kill();
    let s = q.wait_savevm(T);
    assert_eq!(s["status"], "failed", "the snapshot outlived its server: {s}");
    assert!(s["error"].as_str().unwrap_or_default().contains(&uri), "{s}");
    assert_eq!(q.ok("query-status", json!({}))["status"], "running");
    q.ok("savevm-end", json!({}));
    // Nothing is at the name, and what reached the server under the
    // temporary name (the dead server kept the reaper from removing it)
    // is not loadable.
    assert!(!nfsd.local("killed.state").exists(), "a failed snapshot created its file");
    for f in std::fs::read_dir(&nfsd.export).unwrap() {
        let f = f.unwrap().path();
        let o = inspect(f.to_str().unwrap());
        assert_eq!(o.code(), 1, "{} passed inspection:\n{}", f.display(), o.stdout);
    }

    // Server back: the next snapshot completes and checks out.
    nfsd.restart();
    let uri = nfsd.uri("127.0.0.1", "again.state");
    q.ok("savevm-start", json!({"statefile": uri}));
    let s = q.wait_savevm(T);
    assert_eq!(s["status"], "completed", "{s}");
    let o = inspect(nfsd.local("again.state").to_str().unwrap());
    assert_eq!(o.code(), 0, "{}\n{}", o.stdout, o.stderr);
    q.ok("quit", json!({}));
    assert_eq!(p.wait(T).code(), 0);
}

/// `nfs://SERVER:PORT/...` (the port in the authority; libnfs 4 cannot
/// parse it, ringvm passes it as nfsport) saves, inspects and restores like
/// the `?nfsport=` spelling; and a snapshot over an existing file replaces
/// it only once complete: one cancelled half-way leaves the old file
/// byte-identical and its own temporary file removed from the server.
#[test]
fn nfs_port_in_the_uri_and_atomic_replace() {
    if !require_kvm("nfs_port_in_the_uri_and_atomic_replace") {
        return;
    }
    let dir = Scratch::new("nfs-port");
    let ns = Netns::with_address("port", "10.95.0.1");
    let nfsd = Nfsd::start(&ns, &dir);
    let g = guest_elf(&dir);
    let (p, mut q) =
        vm_in(&ns, &dir, &["run", "--kernel", g.to_str().unwrap(), "--memory", "512M", "--cmdline", "work=mem mib=384 secs=inf rate=100"], "fill done");
    let uri = nfsd.port_uri("127.0.0.1", "vm.state");
    q.ok("savevm-start", json!({"statefile": uri}));
    let s = q.wait_savevm(T);
    assert_eq!(s["status"], "completed", "{s}");
    q.ok("savevm-end", json!({}));
    let good = std::fs::read(nfsd.local("vm.state")).unwrap();
    let o = Proc::spawn(ns.command(ringvm_bin()).args(["state", "inspect", &uri])).wait(T);
    assert_eq!(o.code(), 0, "{}", o.stderr);
    assert!(o.stdout.contains("checksums: all ok"), "{}", o.stdout);
    // Again to the same name, cancelled once RAM is flowing.
    q.ok("savevm-start", json!({"statefile": uri, "downtime-ms": 0}));
    q.wait_savevm_bytes(32 << 20, T);
    q.ok("savevm-end", json!({}));
    let s = q.wait_savevm(T);
    assert_eq!(s["status"], "failed", "{s}");
    q.ok("savevm-end", json!({}));
    assert!(std::fs::read(nfsd.local("vm.state")).unwrap() == good, "the cancelled snapshot changed the good file");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let names: Vec<String> = std::fs::read_dir(&nfsd.export).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        if names == ["vm.state"] {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the cancelled snapshot's file stayed: {names:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    q.ok("quit", json!({}));
    assert_eq!(p.wait(T).code(), 0);
    // A bad port is one clear error.
    let bad = uri.replace(&format!(":{}", common::nfs::NFS_PORT), ":99999");
    let o = ringvm(&["state", "inspect", &bad], T);
    assert_eq!(o.code(), 1);
    assert!(o.stderr.contains("port '99999'"), "{}", o.stderr);
}

/// Incremental snapshots over nfs://: a full one with "track", then an
/// increment against it, both on the server; the chain restores over NFS
/// (the base named by its URI) and the guest verifies every page.
#[test]
fn incremental_chain_over_nfs() {
    if !require_kvm("incremental_chain_over_nfs") {
        return;
    }
    let dir = Scratch::new("nfs-incremental");
    let ns = Netns::with_address("inc", "10.94.0.1");
    let nfsd = Nfsd::start(&ns, &dir);
    let g = guest_elf(&dir);
    let (p, mut q) =
        vm_in(&ns, &dir, &["run", "--kernel", g.to_str().unwrap(), "--memory", "192M", "--cmdline", "work=mem mib=96 secs=inf rate=10 beat=100"], "fill done");
    let (full, inc) = (nfsd.uri("127.0.0.1", "full.state"), nfsd.uri("127.0.0.1", "inc.state"));
    q.ok("savevm-start", json!({"statefile": full, "track": true}));
    assert_eq!(q.wait_savevm(T)["status"], "completed");
    q.ok("savevm-end", json!({}));
    std::thread::sleep(Duration::from_millis(500));
    q.ok("savevm-start", json!({"statefile": inc, "base": full}));
    assert_eq!(q.wait_savevm(T)["status"], "completed");
    q.ok("savevm-end", json!({}));
    q.ok("quit", json!({}));
    assert_eq!(p.wait(T).code(), 0);
    use std::os::unix::fs::MetadataExt;
    let (bf, bi) = (std::fs::metadata(nfsd.local("full.state")).unwrap().blocks(), std::fs::metadata(nfsd.local("inc.state")).unwrap().blocks());
    assert!(bi * 2 < bf, "the increment is not small: {bi} blocks against {bf}");
    let mut r = Proc::spawn_with_stdin(ns.command(ringvm_bin()).args(["run", "--loadstate", &inc]));
    r.wait_for_output("ringvm-guest: beat", T);
    r.type_serial(b"v");
    let o = r.wait(T);
    assert_eq!(o.code(), 0, "{}\n{}", o.stdout, o.stderr);
    assert!(o.stdout.contains("verify pages=24576 bad=0") && o.stdout.contains("RESULT PASS"), "{}", o.stdout);
}
