//! Firecracker as a peer of the incremental suite: its "diff snapshot"
//! (only the pages dirtied since the last snapshot, `track_dirty_pages`) is
//! the closest thing another VMM has to ringvm's incremental snapshot.
//!
//! Firecracker is not packaged for this distribution; the harness uses the
//! binary named by `--firecracker PATH` or `$FC` and leaves the column out
//! when there is none (perf/README.md says how it was built). The test guest
//! boots under it unchanged (`--config-file`, its serial console on
//! stdout); the API is HTTP/1.1 on a Unix socket, spoken here with a few
//! lines of std rather than an HTTP stack.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::snapbench::{reap, watch_fill, Beats};

/// The Firecracker binary to measure: `--firecracker` first, then `$FC`;
/// only one that answers `--version`.
pub fn find(cli: Option<PathBuf>) -> Option<(PathBuf, String)> {
    let p = cli.or_else(|| std::env::var_os("FC").map(PathBuf::from))?;
    let out = Command::new(&p).arg("--version").output().ok()?;
    if !out.status.success() {
        return None;
    }
    let v = String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or("").trim().to_string();
    Some((p, v))
}

/// One request on a fresh connection; the status code and the body. Every
/// read and write has a 600 s deadline (a 4 GiB full snapshot to a slow
/// disk takes minutes).
fn request(sock: &Path, method: &str, path: &str, body: &Value) -> Result<(u16, String)> {
    let mut s = UnixStream::connect(sock).with_context(|| format!("connecting to {}", sock.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(600)))?;
    s.set_write_timeout(Some(Duration::from_secs(600)))?;
    let b = body.to_string();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nAccept: application/json\r\nContent-Length: {}\r\n\r\n{b}",
        b.len()
    )?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let code: u16 = line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).with_context(|| format!("{method} {path}: bad status line {line:?}"))?;
    let mut len = 0usize;
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; len.min(1 << 20)];
    r.read_exact(&mut body)?;
    Ok((code, String::from_utf8_lossy(&body).into_owned()))
}

/// A request that must succeed (2xx).
fn call(sock: &Path, method: &str, path: &str, body: Value) -> Result<()> {
    let (code, text) = request(sock, method, path, &body)?;
    if !(200..300).contains(&code) {
        bail!("Firecracker {method} {path}: {code} {text}");
    }
    Ok(())
}

/// Firecracker's snapshot of a running guest: pause, `/snapshot/create`,
/// resume (Firecracker snapshots only a paused guest); milliseconds from
/// the pause request to the resume reply, which is also the guest's pause.
fn snapshot(sock: &Path, kind: &str, state: &Path, mem: &Path) -> Result<f64> {
    let t0 = Instant::now();
    call(sock, "PATCH", "/vm", json!({"state": "Paused"}))?;
    let made = call(sock, "PUT", "/snapshot/create", json!({"snapshot_type": kind, "snapshot_path": state, "mem_file_path": mem}));
    // Resume even when the snapshot failed: the guest must not stay paused.
    let resumed = call(sock, "PATCH", "/vm", json!({"state": "Resumed"}));
    made?;
    resumed?;
    Ok(t0.elapsed().as_secs_f64() * 1e3)
}

/// One Firecracker full + diff pair, the same shape as ringvm's.
pub struct Diff {
    pub full_ms: f64,
    pub full_mb: f64,
    pub diff_ms: f64,
    pub diff_mb: f64,
    /// The guest's pages rewritten per second (host clock) just before the
    /// Full snapshot, to compare with its rate under ringvm (it paces by
    /// the TSC, whose rate it learns from the VMM).
    pub guest_pages_per_s: f64,
}

fn on_disk_mb(p: &Path) -> f64 {
    std::fs::metadata(p).map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512).unwrap_or(0) as f64 / 1e6
}

/// The test guest under Firecracker (1 vCPU, `mem_mib` of RAM with
/// `track_dirty_pages`), 90% of its RAM filled and then rewritten
/// round-robin at `rate` MiB/s: a Full snapshot once the fill is done, the
/// guest rewrites `pct`% of its RAM in use, then a Diff snapshot. Files in
/// `dir` (removed after); the process is ended by its PID.
pub fn diff_once(fc: &Path, guest: &Path, run_dir: &Path, dir: &Path, mem_mib: u64, rate: u64, pct: u64) -> Result<Diff> {
    let fill = mem_mib * 9 / 10;
    std::fs::create_dir_all(dir)?;
    let files = ["fc-full.vmstate", "fc-full.mem", "fc-diff.vmstate", "fc-diff.mem"].map(|f| dir.join(f));
    for f in &files {
        let _ = std::fs::remove_file(f);
    }
    let sock = run_dir.join("fc.sock");
    let _ = std::fs::remove_file(&sock);
    let config = run_dir.join("fc.json");
    let cfg = json!({
        "boot-source": {"kernel_image_path": guest, "boot_args": format!("work=mem mib={fill} secs=inf rate={rate} beat=100")},
        "drives": [],
        "machine-config": {"vcpu_count": 1, "mem_size_mib": mem_mib, "track_dirty_pages": true},
    });
    std::fs::write(&config, cfg.to_string())?;
    let mut child = Command::new(fc)
        .arg("--api-sock")
        .arg(&sock)
        .arg("--config-file")
        .arg(&config)
        .args(["--level", "Warn"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", fc.display()))?;
    let (rx, beats): (_, Beats) = watch_fill(&mut child);
    let r = (|| -> Result<Diff> {
        rx.recv_timeout(Duration::from_secs(600)).context("the guest under Firecracker did not fill its memory in 600 s")?;
        let guest_pages_per_s = crate::incbench::rewrite_rate(&beats, 1.0);
        let full_ms = snapshot(&sock, "Full", &files[0], &files[1])?;
        std::thread::sleep(Duration::from_secs_f64(fill as f64 * pct as f64 / 100.0 / rate as f64));
        let diff_ms = snapshot(&sock, "Diff", &files[2], &files[3])?;
        Ok(Diff {
            full_ms,
            full_mb: on_disk_mb(&files[1]) + on_disk_mb(&files[0]),
            diff_ms,
            diff_mb: on_disk_mb(&files[3]) + on_disk_mb(&files[2]),
            guest_pages_per_s,
        })
    })();
    // Firecracker has no QMP quit; SIGKILL by PID, then reap.
    let _ = child.kill();
    reap(child)?;
    for f in &files {
        let _ = std::fs::remove_file(f);
    }
    let _ = std::fs::remove_file(&sock);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The client against a one-shot server answering like Firecracker's
    /// micro-http: a 204 with no body, then a 400 with a JSON fault.
    #[test]
    fn request_reads_status_and_body() {
        let dir = std::env::temp_dir().join(format!("ringvm-perf-fc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("api.sock");
        let _ = std::fs::remove_file(&sock);
        let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            for reply in [
                "HTTP/1.1 204 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\r\n",
                "HTTP/1.1 400 \r\nContent-Type: application/json\r\nContent-Length: 21\r\n\r\n{\"fault_message\":\"x\"}",
            ] {
                let (s, _) = l.accept().unwrap();
                let mut r = BufReader::new(s);
                let mut len = 0;
                let mut line = String::new();
                loop {
                    line.clear();
                    r.read_line(&mut line).unwrap();
                    if line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.strip_prefix("Content-Length: ") {
                        len = v.trim().parse().unwrap();
                    }
                }
                let mut b = vec![0; len];
                r.read_exact(&mut b).unwrap();
                assert_eq!(serde_json::from_slice::<Value>(&b).unwrap()["state"], "Paused");
                r.get_mut().write_all(reply.as_bytes()).unwrap();
            }
        });
        assert_eq!(request(&sock, "PATCH", "/vm", &json!({"state": "Paused"})).unwrap(), (204, String::new()));
        let e = call(&sock, "PATCH", "/vm", json!({"state": "Paused"})).unwrap_err().to_string();
        assert!(e.contains("400") && e.contains("fault_message"), "{e}");
        server.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
