//! fio as the physical limit, with the buffers ringvm has.
//!
//! ringvm's I/O goes to and from guest RAM, which is backed by transparent
//! huge pages, so a 1 MiB request is one or a few physically contiguous
//! segments. fio's default buffers are small pages (this host's THP mode is
//! `madvise`, which fio never asks for), and on this machine's virtio disk
//! that alone costs fio a third of its throughput (1 MiB QD32 O_DIRECT:
//! 2.0-2.2 GB/s read with malloc buffers, 3.3-3.5 GB/s with huge pages). A
//! reference with that handicap is not the limit, so every fio run that is
//! a suite's limit takes `--iomem=shmhuge`: hugetlb pages reserved here for
//! the run and handed back after it.

use std::path::Path;

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";
const HUGE: u64 = 2 << 20;
static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Hugetlb pages reserved for one fio run, handed back when dropped.
pub struct HugeBuffers {
    added: u64,
}

impl HugeBuffers {
    /// Reserves enough 2 MiB pages for fio's buffers (`bs * iodepth` per
    /// job, each job's rounded up to whole huge pages plus fio's alignment
    /// slack), or None where the kernel gives none (not root, or memory too
    /// fragmented).
    pub fn reserve(bs: u64, iodepth: u32, jobs: u32) -> Option<HugeBuffers> {
        let per_job = (bs * u64::from(iodepth.max(1))).div_ceil(HUGE) + 2;
        let h = Self::try_reserve(per_job * u64::from(jobs.max(1)) + 2);
        if h.is_none() && !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            eprintln!("perf: no hugetlb pages could be reserved: fio runs with small-page buffers, a lower limit than the machine's");
        }
        h
    }

    fn try_reserve(need: u64) -> Option<HugeBuffers> {
        let now = read_u64(Path::new(NR_HUGEPAGES))?;
        std::fs::write(NR_HUGEPAGES, (now + need).to_string()).ok()?;
        let h = HugeBuffers { added: need };
        // The kernel may grant fewer than asked (fragmentation).
        (free_huge()? >= need).then_some(h)
    }

    /// The fio option that uses them.
    pub fn iomem(h: &Option<HugeBuffers>) -> &'static str {
        if h.is_some() {
            "--iomem=shmhuge"
        } else {
            "--iomem=malloc"
        }
    }
}

impl Drop for HugeBuffers {
    fn drop(&mut self) {
        if let Some(now) = read_u64(Path::new(NR_HUGEPAGES)) {
            let _ = std::fs::write(NR_HUGEPAGES, now.saturating_sub(self.added).to_string());
        }
    }
}

fn read_u64(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

fn free_huge() -> Option<u64> {
    let m = std::fs::read_to_string("/proc/meminfo").ok()?;
    m.lines().find_map(|l| l.strip_prefix("HugePages_Free:")).and_then(|v| v.trim().parse().ok())
}
