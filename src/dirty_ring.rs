//! KVM's per-vCPU dirty rings (KVM_CAP_DIRTY_LOG_RING): where each vCPU's
//! dirtied pages come from while dirty logging is on, instead of the
//! VM-wide bitmap. Because every page is logged by the vCPU that wrote it,
//! each vCPU's dirty rate is known, and a vCPU that dirties faster than a
//! snapshot's target can take is slowed alone (QEMU's dirty-limit): it
//! sleeps when its ring fills, long enough to keep under its limit.
//!
//! Harvesting (any thread): read the ring's entries the kernel marked
//! dirty, set their pages in a bitmap per memslot, mark them for reset,
//! then KVM_RESET_DIRTY_RINGS write-protects those pages again. A page
//! written after its entry was read but before the reset is still in the
//! bitmap, and whoever takes the bitmap copies it after the reset; a write
//! after the reset logs it again. A vCPU whose ring is full exits to its
//! thread (KVM_EXIT_DIRTY_RING_FULL), which harvests its own ring before
//! it runs on.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_dirty_gfn, kvm_enable_cap, KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_DIRTY_LOG_PAGE_OFFSET};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmm_sys_util::{ioctl::ioctl, ioctl_io_nr};

const PAGE: u64 = 4096;
/// KVM_DIRTY_GFN_F_DIRTY / _RESET (include/uapi/linux/kvm.h).
const GFN_DIRTY: u32 = 1;
const GFN_RESET: u32 = 2;
/// The fewest entries a ring may have (one page of 16-byte entries).
pub const MIN_ENTRIES: u32 = (PAGE / 16) as u32;
/// The lowest per-vCPU dirty limit (QEMU's vcpu-dirty-limit minimum).
pub const MIN_LIMIT: u64 = 1_000_000;

/// Ring-full exits in a row with nothing to harvest after which the ring
/// is taken as stuck.
const STUCK_EXITS: u32 = 10_000;

ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, kvm_bindings::KVMIO, 0xc7);

#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("--dirty-ring {0}: the ring size must be a power of two from {MIN_ENTRIES} to {1}")]
    Size(u32, u32),
    #[error("KVM has no dirty ring (KVM_CAP_DIRTY_LOG_RING); run without --dirty-ring")]
    Unsupported,
    #[error("{0}: {1}")]
    Kvm(&'static str, std::io::Error),
}

/// The ring entries a kernel allows at most (0: no dirty ring).
pub fn max_entries(kvm: &Kvm) -> u32 {
    let bytes = kvm.check_extension_raw(u64::from(KVM_CAP_DIRTY_LOG_RING));
    u32::try_from(bytes.max(0) / 16).unwrap_or(0)
}

/// Turns the rings on for `vm` (before any vCPU exists) with `entries`
/// entries each.
pub fn enable(kvm: &Kvm, vm: &VmFd, entries: u32) -> Result<(), RingError> {
    let max = max_entries(kvm);
    if max == 0 {
        return Err(RingError::Unsupported);
    }
    if !entries.is_power_of_two() || entries < MIN_ENTRIES || entries > max {
        return Err(RingError::Size(entries, max));
    }
    // The acquire/release flavour where the kernel has it (it is the one
    // weakly ordered hosts need; on x86 both behave the same).
    let cap = if kvm.check_extension_raw(u64::from(KVM_CAP_DIRTY_LOG_RING_ACQ_REL)) > 0 { KVM_CAP_DIRTY_LOG_RING_ACQ_REL } else { KVM_CAP_DIRTY_LOG_RING };
    let mut c = kvm_enable_cap { cap, ..Default::default() };
    c.args[0] = u64::from(entries) * 16;
    vm.enable_cap(&c).map_err(|e| RingError::Kvm("KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING)", e.into()))
}

/// One vCPU's ring as this process maps it.
struct Mapped {
    entries: *mut kvm_dirty_gfn,
    /// Where the next scan starts (after the last entry taken).
    fetch: u32,
    /// Only the vCPU's own thread uses these: for the dirty limit, when
    /// the ring last filled and the vCPU's pushed count then; ring-full
    /// exits in a row that found nothing to take.
    last_full: Option<(Instant, u64)>,
    empty_exits: u32,
}

// SAFETY: the mapping is shared memory owned by this struct for its
// lifetime; access is serialised by the Mutex around it.
unsafe impl Send for Mapped {}

struct PerVcpu {
    ring: Mutex<Option<Mapped>>,
    /// Pages harvested from this vCPU's ring, ever.
    pushed: AtomicU64,
    /// Its dirty-rate limit, bytes per second (0: none).
    limit: AtomicU64,
}

/// The rings of every vCPU, and the pages harvested from them but not yet
/// taken, per memslot.
pub struct DirtyRings {
    vm: Arc<VmFd>,
    size: u32,
    vcpus: Vec<PerVcpu>,
    /// Per memslot: one bit per page, and its pages.
    bits: Vec<Vec<AtomicU64>>,
    pages: Vec<u64>,
    /// Microseconds the vCPUs slept for their limits, all together.
    slept_us: AtomicU64,
}

impl DirtyRings {
    /// `slots`: each memslot's size in bytes, by slot number.
    pub fn new(vm: Arc<VmFd>, entries: u32, vcpus: usize, slots: &[u64]) -> Self {
        DirtyRings {
            vm,
            size: entries,
            vcpus: (0..vcpus).map(|_| PerVcpu { ring: Mutex::new(None), pushed: AtomicU64::new(0), limit: AtomicU64::new(0) }).collect(),
            bits: slots.iter().map(|&s| (0..(s / PAGE).div_ceil(64)).map(|_| AtomicU64::new(0)).collect()).collect(),
            pages: slots.iter().map(|&s| s / PAGE).collect(),
            slept_us: AtomicU64::new(0),
        }
    }

    fn lock(&self, cpu: usize) -> Option<MutexGuard<'_, Option<Mapped>>> {
        self.vcpus.get(cpu).map(|v| v.ring.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Maps vCPU `cpu`'s ring (right after KVM_CREATE_VCPU).
    pub fn attach(&self, cpu: usize, fd: &VcpuFd) -> Result<(), RingError> {
        use std::os::fd::AsRawFd;
        let len = self.size as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: a new shared mapping of the vCPU fd's dirty-ring pages at
        // the offset KVM documents; the result is checked, and the mapping
        // is owned by `Mapped` (unmapped in Drop).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                (u64::from(KVM_DIRTY_LOG_PAGE_OFFSET) * PAGE) as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(RingError::Kvm("mmap of the vCPU's dirty ring", std::io::Error::last_os_error()));
        }
        match self.lock(cpu) {
            Some(mut g) => *g = Some(Mapped { entries: p.cast(), fetch: 0, last_full: None, empty_exits: 0 }),
            None => {
                // SAFETY: the mapping just made, not shared with anyone.
                unsafe { libc::munmap(p, len) };
            }
        }
        Ok(())
    }

    /// Moves what `cpu`'s ring holds into the bitmaps: the entries taken,
    /// and whether every entry of the ring was taken (then the ring may
    /// have overflowed, see [`Self::overflowed`]).
    ///
    /// The whole ring is scanned, from where the last harvest stopped, not
    /// only up to the first entry that is not dirty: the entries' order
    /// does not matter here (they land in a bitmap), and a scan needs no
    /// index to agree with the kernel's.
    fn harvest_one(&self, cpu: usize) -> (u64, bool) {
        let Some(mut g) = self.lock(cpu) else { return (0, false) };
        let Some(m) = g.as_mut() else { return (0, false) };
        let mut n = 0u64;
        let mut next = m.fetch;
        for k in 0..self.size {
            let pos = m.fetch.wrapping_add(k) % self.size;
            // SAFETY: `pos` is below the ring's size, so the pointer stays
            // inside the mapping `m` owns.
            let e = unsafe { m.entries.add(pos as usize) };
            // SAFETY: `flags` is the first u32 of an aligned 16-byte entry
            // the kernel also writes; it is only accessed atomically here.
            let flags = unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*e).flags)) };
            if flags.load(Ordering::Acquire) & GFN_DIRTY == 0 {
                continue;
            }
            // SAFETY: the kernel published this entry (DIRTY, read with
            // acquire) and does not touch it again until it is reset.
            let (slot, offset) = unsafe { ((*e).slot, (*e).offset) };
            // Address space 0 only (x86's SMM space is never logged here);
            // entries outside a known slot are ignored, never trusted.
            if slot >> 16 == 0 {
                if let Some(w) = self.bits.get((slot & 0xffff) as usize).and_then(|b| b.get((offset / 64) as usize)) {
                    w.fetch_or(1 << (offset % 64), Ordering::Relaxed);
                }
            }
            flags.store(GFN_RESET, Ordering::Release);
            next = pos.wrapping_add(1);
            n += 1;
        }
        m.fetch = next % self.size;
        drop(g);
        self.vcpus[cpu].pushed.fetch_add(n, Ordering::Relaxed);
        (n, n == u64::from(self.size))
    }

    /// A ring that held as many entries as it has room for may have
    /// overflowed: KVM stops a vCPU well before its ring fills (the soft
    /// limit leaves room for the entries a hardware log flushes at exit),
    /// but where KVM itself performs a long stretch of guest writes in one
    /// KVM_RUN it pushes one entry per write and can run past the end
    /// (seen on this project's development host, whose KVM emulates guest
    /// kernel code: `WARNING ... kvm_dirty_ring_push` in the kernel log),
    /// overwriting entries not yet read. Their pages are lost, so every
    /// page counts as dirty: a snapshot writes more, never less.
    fn overflowed(&self, cpu: usize) {
        static WARNED: AtomicU32 = AtomicU32::new(0);
        if WARNED.fetch_add(1, Ordering::Relaxed) < 3 {
            log::warn!("vcpu{cpu}: its dirty ring of {} entries overflowed (KVM logged more pages than it holds without an exit); every page counts as dirty (a larger --dirty-ring avoids this)", self.size);
        }
        for (b, &pages) in self.bits.iter().zip(&self.pages) {
            for (i, w) in b.iter().enumerate() {
                let left = pages.saturating_sub(i as u64 * 64);
                w.store(if left >= 64 { u64::MAX } else { (1u64 << left) - 1 }, Ordering::Relaxed);
            }
        }
    }

    /// KVM_RESET_DIRTY_RINGS. KVM stops early (EINTR) for a pending
    /// signal, such as the kick that pauses a vCPU: it is tried again, and
    /// what stays flagged is reset by the next call anyway.
    fn reset(&self) {
        static FAILED: AtomicU32 = AtomicU32::new(0);
        for _ in 0..3 {
            // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument; the VM fd is valid.
            if unsafe { ioctl(&*self.vm, KVM_RESET_DIRTY_RINGS()) } >= 0 {
                return;
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                if FAILED.fetch_add(1, Ordering::Relaxed) < 3 {
                    log::error!("KVM_RESET_DIRTY_RINGS: {e}");
                }
                return;
            }
        }
    }

    /// Harvests every ring and re-protects what was in them.
    pub fn harvest(&self) {
        let mut n = 0;
        for c in 0..self.vcpus.len() {
            let (k, full) = self.harvest_one(c);
            if full {
                self.overflowed(c);
            }
            n += k;
        }
        if n > 0 {
            self.reset();
        }
    }

    /// Takes slot `slot`'s dirty pages (harvesting first), as
    /// KVM_GET_DIRTY_LOG would return them.
    pub fn take(&self, slot: u32) -> Vec<u64> {
        self.harvest();
        self.bits.get(slot as usize).map(|b| b.iter().map(|w| w.swap(0, Ordering::Relaxed)).collect()).unwrap_or_default()
    }

    /// Forgets every page logged so far (dirty logging starts anew).
    pub fn discard(&self) {
        self.harvest();
        for w in self.bits.iter().flatten() {
            w.store(0, Ordering::Relaxed);
        }
    }

    /// Pages harvested from each vCPU's ring, ever.
    pub fn pushed(&self) -> Vec<u64> {
        self.vcpus.iter().map(|v| v.pushed.load(Ordering::Relaxed)).collect()
    }

    /// Sets each vCPU's dirty limit, bytes/s (0: none; missing: none).
    pub fn set_limits(&self, limits: &[u64]) {
        for (i, v) in self.vcpus.iter().enumerate() {
            v.limit.store(limits.get(i).copied().unwrap_or(0), Ordering::Relaxed);
        }
    }

    pub fn limit(&self, cpu: usize) -> u64 {
        self.vcpus.get(cpu).map_or(0, |v| v.limit.load(Ordering::Relaxed))
    }

    /// Microseconds the vCPUs slept for their dirty limits, all together.
    pub fn slept_us(&self) -> u64 {
        self.slept_us.load(Ordering::Relaxed)
    }

    pub fn add_slept(&self, d: Duration) {
        self.slept_us.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// vCPU `cpu`'s ring is full (its thread calls this on
    /// KVM_EXIT_DIRTY_RING_FULL): harvests it, and returns how long the
    /// vCPU must sleep to keep its dirty rate under its limit, or `None`
    /// once the ring is stuck (see below).
    pub fn full(&self, cpu: usize) -> Option<Duration> {
        let (n, full) = self.harvest_one(cpu);
        if full {
            self.overflowed(cpu);
        }
        self.reset();
        let limit = self.limit(cpu);
        let pushed = self.vcpus.get(cpu).map_or(0, |v| v.pushed.load(Ordering::Relaxed));
        let now = Instant::now();
        let Some(mut g) = self.lock(cpu) else { return Some(Duration::ZERO) };
        let Some(m) = g.as_mut() else { return Some(Duration::ZERO) };
        // "Full" with nothing in it, again and again: after an overflow,
        // KVM's reset position points at entries already reset, which no
        // harvest can mark again, and KVM refuses to run the vCPU until its
        // ring drains: it never will. (An exit with nothing to take also
        // happens when another thread has just taken the entries, but not
        // ten thousand in a row.)
        if n == 0 {
            m.empty_exits += 1;
            if m.empty_exits >= STUCK_EXITS {
                drop(g);
                self.overflowed(cpu);
                return None;
            }
        } else {
            m.empty_exits = 0;
        }
        let last = m.last_full.replace((now, pushed));
        Some(match last {
            Some((at, before)) if limit > 0 => limit_sleep(pushed.saturating_sub(before), now.duration_since(at), limit),
            _ => Duration::ZERO,
        })
    }
}

/// How long a vCPU that dirtied `pages` in `took` sleeps to stay under
/// `limit` bytes per second.
pub fn limit_sleep(pages: u64, took: Duration, limit: u64) -> Duration {
    let allowed = Duration::from_secs_f64((pages * PAGE) as f64 / limit.max(1) as f64);
    allowed.saturating_sub(took)
}

impl Drop for DirtyRings {
    fn drop(&mut self) {
        let len = self.size as usize * std::mem::size_of::<kvm_dirty_gfn>();
        for v in &self.vcpus {
            if let Some(m) = v.ring.lock().unwrap_or_else(|e| e.into_inner()).take() {
                // SAFETY: the mapping `attach` made with this length; no
                // one else holds a pointer into it.
                unsafe { libc::munmap(m.entries.cast(), len) };
            }
        }
    }
}

impl crate::snapshot::save::DirtyLog for DirtyRings {
    fn dirty_log(&self, slot: u32, _size: usize) -> Result<Vec<u64>, kvm_ioctls::Error> {
        Ok(self.take(slot))
    }

    fn vcpu_pages(&self) -> Vec<u64> {
        self.pushed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limited_vcpu_sleeps_what_its_limit_asks() {
        // 1024 pages (4 MiB) at 4 MB/s take 1.048576 s; 0.3 s were spent.
        let d = limit_sleep(1024, Duration::from_millis(300), 4_000_000);
        assert!((d.as_secs_f64() - 0.748576).abs() < 1e-6, "{d:?}");
        // Already slower than the limit: no sleep.
        assert_eq!(limit_sleep(1024, Duration::from_secs(2), 4_000_000), Duration::ZERO);
    }
}
