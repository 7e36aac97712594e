//! The README's main job, `ringvm demo`: boot, live snapshot while the
//! guest rewrites pages, restore, verify. Also with a state file on a slow
//! filesystem, where the snapshot outlasts the guest's rewrite time: the
//! guest must keep running until the snapshot is over (it once exited
//! mid-snapshot and the demo failed).

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(180);

fn check(out: &Output) {
    let text = &out.stdout;
    assert_eq!(out.code(), 0, "ringvm demo failed:\n{text}\n{}", out.stderr);
    assert!(text.contains("result:            PASS"), "{text}");
    assert!(text.contains("live snapshot:     completed"), "{text}");
    assert!(text.contains("checksums all ok"), "{text}");
    let verify: Vec<&str> = text.lines().filter(|l| l.contains("verify pages=") && l.contains("bad=0")).collect();
    // The original guest's verify and the restored guest's.
    assert!(verify.len() >= 2, "{text}");
    assert!(text.lines().any(|l| l.starts_with("restored guest:") && l.contains("bad=0") && l.ends_with("exit 0")), "{text}");
}

#[test]
fn demo_passes() {
    if !require_kvm("demo_passes") {
        return;
    }
    check(&ringvm(&["demo", "--memory", "256M", "--mib", "128", "--secs", "1"], T));
}

#[test]
fn demo_waits_for_a_slow_snapshot() {
    if !require_kvm("demo_waits_for_a_slow_snapshot") {
        return;
    }
    let dir = Scratch::new("demo-slow");
    // 2 ms per read and write: 160 MiB of RAM takes seconds to save (the
    // writes reach FUSE one at a time), far longer than the guest's 0 s of
    // rewriting.
    let fs = FaultFs::mount(&dir, "slow", &["--delay-us", "2000"]);
    let state = fs.path("vm.state");
    let out = ringvm(&["demo", "--memory", "256M", "--mib", "160", "--secs", "0", "--rate", "1", "--statefile", state.to_str().unwrap()], T);
    let total: f64 = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("live snapshot:     completed in "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(total > 1000.0, "the snapshot was meant to outlast the guest's rewrite time:\n{}", out.stdout);
    check(&out);
}
