//! Pages that devices wrote into guest memory. KVM's dirty log only sees
//! vCPU writes; a disk read that io_uring lands in guest RAM, a response
//! or a used-ring entry are invisible to it. While a live snapshot runs,
//! devices mark what they wrote here and the snapshot harvests it with
//! KVM's bitmap.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

const PAGE: u64 = 4096;

struct Region {
    gpa: u64,
    pages: u64,
    bits: Vec<AtomicU64>,
}

/// One bit per guest page, per RAM region; lock-free for the marking side.
pub struct DmaDirtyLog {
    enabled: AtomicBool,
    regions: Vec<Region>,
}

impl DmaDirtyLog {
    /// A log for RAM regions `(gpa, size)`.
    pub fn new(ranges: &[(u64, u64)]) -> DmaDirtyLog {
        let regions = ranges
            .iter()
            .map(|&(gpa, size)| {
                let pages = size.div_ceil(PAGE);
                Region { gpa, pages, bits: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect() }
            })
            .collect();
        DmaDirtyLog { enabled: AtomicBool::new(false), regions }
    }

    /// Starts (clearing what an earlier run left) or stops logging.
    pub fn set_enabled(&self, on: bool) {
        if on {
            for r in &self.regions {
                for w in &r.bits {
                    w.store(0, Ordering::Relaxed);
                }
            }
        }
        self.enabled.store(on, Ordering::SeqCst);
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Marks `[gpa, gpa + len)` written (after the write landed).
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 || !self.enabled() {
            return;
        }
        let end = gpa.saturating_add(len);
        for r in &self.regions {
            let rend = r.gpa + r.pages * PAGE;
            let (s, e) = (gpa.max(r.gpa), end.min(rend));
            if s >= e {
                continue;
            }
            for p in (s - r.gpa) / PAGE..=(e - 1 - r.gpa) / PAGE {
                r.bits[(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::Release);
            }
        }
    }

    /// Takes (and clears) the bitmap of the region starting at `gpa`.
    pub fn take(&self, gpa: u64) -> Option<Vec<u64>> {
        let r = self.regions.iter().find(|r| r.gpa == gpa)?;
        Some(r.bits.iter().map(|w| w.swap(0, Ordering::AcqRel)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_only_when_enabled_and_take_clears() {
        let log = DmaDirtyLog::new(&[(0, 1 << 20), (4 << 30, 1 << 20)]);
        log.mark(0, 4096);
        assert_eq!(log.take(0).unwrap()[0], 0);
        log.set_enabled(true);
        log.mark(4095, 2); // straddles pages 0 and 1
        log.mark((4 << 30) + 64 * 4096, 1);
        log.mark(3 << 30, 4096); // outside RAM: ignored
        assert_eq!(log.take(0).unwrap()[0], 0b11);
        assert_eq!(log.take(0).unwrap()[0], 0);
        assert_eq!(log.take(4 << 30).unwrap()[1], 1);
        assert!(log.take(12345).is_none());
    }
}
