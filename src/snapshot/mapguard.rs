//! What happens when a state file that backs guest RAM (`--restore-ram
//! map`, or `auto` on tmpfs) shrinks under the VM.
//!
//! The file is mapped privately over guest RAM, so a page the guest has
//! not written yet is read from the file; once the file is truncated such
//! a page no longer exists. A VMM thread touching it gets SIGBUS, a vCPU
//! gets EFAULT from KVM_RUN. Neither may end ringvm without a word: the
//! SIGBUS handler installed here prints one line naming the state file and
//! exits 1 when the faulting address lies in RAM mapped from it (any other
//! SIGBUS goes to the handler that was there before, e.g. Rust's), and
//! [`explain`] turns a vCPU's EFAULT into the same line.
//!
//! Why not prevent it: a lease (F_SETLEASE) only tells us after the fact
//! and delays the writer by up to `lease-break-time`; sealing needs a
//! memfd; copying the file first would cost exactly what `map` saves. The
//! README states the precondition (do not change a state file a VM maps);
//! this makes its violation a clear error instead of a crash.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::Mutex;

const MAX_RANGES: usize = 16;
static STARTS: [AtomicUsize; MAX_RANGES] = [const { AtomicUsize::new(0) }; MAX_RANGES];
static LENS: [AtomicUsize; MAX_RANGES] = [const { AtomicUsize::new(0) }; MAX_RANGES];
/// The line printed on a fault in a guarded range (leaked, never freed).
static MESSAGE: AtomicPtr<Vec<u8>> = AtomicPtr::new(std::ptr::null_mut());
/// The handler that was installed before ours.
static PREVIOUS: Mutex<Option<libc::sigaction>> = Mutex::new(None);
static PREVIOUS_RAW: AtomicPtr<libc::sigaction> = AtomicPtr::new(std::ptr::null_mut());

/// The mapped file, for [`explain`]: (path, open file, bytes it must have).
static MAPPED: Mutex<Option<(String, std::fs::File, u64)>> = Mutex::new(None);

fn in_range(addr: usize) -> bool {
    STARTS.iter().zip(LENS.iter()).any(|(s, l)| {
        let (s, l) = (s.load(Ordering::Relaxed), l.load(Ordering::Relaxed));
        l != 0 && addr >= s && addr - s < l
    })
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    if in_range(addr) {
        let msg = MESSAGE.load(Ordering::Acquire);
        if !msg.is_null() {
            // SAFETY: MESSAGE points at a leaked Vec that is never freed;
            // write(2) and _exit are async-signal-safe.
            unsafe {
                let m = &*msg;
                libc::write(2, m.as_ptr().cast(), m.len());
            }
        }
        // SAFETY: async-signal-safe process exit.
        unsafe { libc::_exit(1) };
    }
    let prev = PREVIOUS_RAW.load(Ordering::Acquire);
    // SAFETY: `prev` is a leaked copy of the earlier sigaction (or null).
    // Calling its handler, or restoring the default and returning (the
    // fault repeats and kills the process as it would have), is what
    // would have happened without us.
    unsafe {
        if !prev.is_null() {
            let p = &*prev;
            if p.sa_flags & libc::SA_SIGINFO != 0 && p.sa_sigaction > libc::SIG_IGN {
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) = std::mem::transmute(p.sa_sigaction);
                return f(sig, info, ctx);
            }
        }
        libc::signal(libc::SIGBUS, libc::SIG_DFL);
    }
}

fn install() -> std::io::Result<()> {
    let mut prev = PREVIOUS.lock().unwrap_or_else(|e| e.into_inner());
    if prev.is_some() {
        return Ok(());
    }
    // SAFETY: a zeroed sigaction with our SA_SIGINFO handler; the old one
    // is kept for chaining.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigbus as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut sa.sa_mask);
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGBUS, &sa, &mut old) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        PREVIOUS_RAW.store(Box::into_raw(Box::new(old)), Ordering::Release);
        *prev = Some(old);
    }
    Ok(())
}

/// Guest RAM at `ranges` (host address, bytes) is now backed by `file`
/// (`path`), which must stay at least `len` bytes long.
pub fn guard(path: &Path, file: &std::fs::File, len: u64, ranges: &[(usize, usize)]) -> std::io::Result<()> {
    let line = format!("ringvm: state file {}: it shrank while guest RAM is mapped from it (--restore-ram map); the VM cannot go on\n", path.display());
    let old = MESSAGE.swap(Box::into_raw(Box::new(line.into_bytes())), Ordering::AcqRel);
    // The old message is leaked on purpose: a handler may be reading it.
    let _ = old;
    for (i, &(start, bytes)) in ranges.iter().take(MAX_RANGES).enumerate() {
        LENS[i].store(0, Ordering::Relaxed);
        STARTS[i].store(start, Ordering::Relaxed);
        LENS[i].store(bytes, Ordering::Release);
    }
    *MAPPED.lock().unwrap_or_else(|e| e.into_inner()) = Some((path.display().to_string(), file.try_clone()?, len));
    install()
}

/// Guest RAM is anonymous again (a reset or a new restore replaced it).
pub fn release() {
    for l in &LENS {
        l.store(0, Ordering::Release);
    }
    *MAPPED.lock().unwrap_or_else(|e| e.into_inner()) = None;
}

/// If a mapped state file has shrunk: the line that says so (for a vCPU's
/// `KVM_RUN: Bad address`).
pub fn explain() -> Option<String> {
    let g = MAPPED.lock().unwrap_or_else(|e| e.into_inner());
    let (path, file, len) = g.as_ref()?;
    // SAFETY: fstat of an fd we own into a local struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(file.as_raw_fd(), &mut st) } != 0 {
        return None;
    }
    ((st.st_size as u64) < *len).then(|| {
        format!(
            "state file {path}: it shrank to {} bytes (it must stay {len}) while guest RAM is mapped from it (--restore-ram map); the VM cannot go on",
            st.st_size
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_explanations() {
        let dir = std::env::temp_dir().join(format!("ringvm-mapguard-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("vm.state");
        std::fs::write(&p, vec![1u8; 8192]).unwrap();
        let f = std::fs::File::open(&p).unwrap();
        guard(&p, &f, 8192, &[(0x10000, 0x2000)]).unwrap();
        assert!(in_range(0x10000) && in_range(0x11fff) && !in_range(0x12000) && !in_range(0xffff));
        assert_eq!(explain(), None);
        std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(4096).unwrap();
        let e = explain().unwrap();
        assert!(e.contains("vm.state") && e.contains("shrank to 4096"), "{e}");
        release();
        assert!(!in_range(0x10000));
        assert_eq!(explain(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
