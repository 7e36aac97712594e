//! How a snapshot whose guest dirties faster than its target writes is
//! made to finish (QEMU's auto-converge and dirty-limit).

/// Convergence policy (QEMU's capabilities of the same names).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Converge {
    /// Today's behaviour: passes until the rest fits the downtime target or
    /// MAX_PASSES, then the final pause, however long.
    #[default]
    None,
    /// auto-converge: once the guest dirtied more than half of what a pass
    /// wrote, twice, every vCPU is throttled to `initial` percent, then
    /// `increment` more each time it happens again (up to 99): QEMU's rule,
    /// as the floor. On a slow target a pass takes seconds and that rule
    /// needs many of them (measured: neither QEMU nor this rule alone
    /// finished a 512 MiB guest in 60 s at +3 ms per request), so the
    /// throttle also goes straight to what the last pass measured as
    /// needed: the guest's dirtying slowed to half of what the target
    /// wrote in the same time.
    Auto { initial: u32, increment: u32 },
    /// dirty-limit: each vCPU's dirty rate (from its KVM dirty ring) is
    /// capped, so only the vCPUs that dirty are slowed, and only as much
    /// as the target needs. Once a pass (or a check within one) finds the
    /// guest dirtied more than [`DIRTY_SHARE`] of what the target took,
    /// the vCPUs share a budget of that share of the target's measured
    /// rate (a vCPU under its fair share keeps its pace; the rest split
    /// what is left); every further such pass halves the limits.
    /// `fixed`: QEMU's vcpu-dirty-limit instead (bytes/s, one limit for
    /// every vCPU that dirties faster).
    DirtyLimit { fixed: Option<u64> },
}

/// The share of the target's measured rate that dirty-limit lets the
/// guest dirty. Each pass then writes at most this share of the last, so
/// the snapshot takes at most 1 / (1 - share) of the time to write the RAM
/// once (1.67x at 0.4), plus the final pass and the fixed costs. At 0.5 the
/// bound is 2x itself, and a 4 GiB guest dirtying 100 MiB/s against the
/// +0.5 ms stand-in took 2.07x (perf/README.md, session 17). A lower
/// share also costs a guest that out-dirties the target less work in all:
/// it is slowed harder but for a shorter snapshot, (k - s) / (1 - s)
/// times the write-once time of work lost for a guest dirtying k times
/// what the target takes, which grows with s wherever k > 1.
pub const DIRTY_SHARE: f64 = 0.4;

/// What a pass measured, for [`Converge::next_limits`].
pub struct PassRates<'a> {
    /// Bytes the target took during the pass, and the pass's length.
    pub written: u64,
    pub secs: f64,
    /// Bytes the guest dirtied during the pass (what the next pass writes).
    pub dirtied: u64,
    /// Bytes each vCPU dirtied during the pass.
    pub per_vcpu: &'a [u64],
}

impl Converge {
    /// The throttle after a pass that wrote `written` bytes while the guest
    /// dirtied `dirtied`, given the throttle now and the count of such
    /// passes so far (QEMU's dirty_rate_high_cnt), which it updates.
    pub fn next_throttle(self, now: u32, high_passes: &mut u32, written: u64, dirtied: u64) -> u32 {
        let Converge::Auto { initial, increment } = self else { return 0 };
        if dirtied.saturating_mul(2) <= written {
            return now;
        }
        *high_passes += 1;
        if *high_passes < 2 {
            return now;
        }
        *high_passes = 0;
        let floor = if now == 0 { initial } else { now + increment };
        // dirtied * (1 - t) <= written / 2, with t the share of time the
        // vCPUs sleep (the dirtying slows in proportion).
        let needed = (100.0 * (1.0 - written as f64 / (2.0 * dirtied as f64))).ceil() as u32;
        floor.max(needed).min(crate::vcpu::MAX_THROTTLE_PCT)
    }
}

impl Converge {
    /// The per-vCPU dirty limits (bytes/s, 0: none) after a pass (or a
    /// check within one), given the limits now; `None`: unchanged. A limit
    /// in force is halved after a pass (`halve`), else never raised.
    pub fn next_limits(self, now: &[u64], m: &PassRates, halve: bool) -> Option<Vec<u64>> {
        let Converge::DirtyLimit { fixed } = self else { return None };
        if m.dirtied as f64 <= m.written as f64 * DIRTY_SHARE || m.per_vcpu.is_empty() {
            return None;
        }
        let secs = m.secs.max(1e-3);
        let rates: Vec<f64> = m.per_vcpu.iter().map(|&b| b as f64 / secs).collect();
        let floor = crate::dirty_ring::MIN_LIMIT;
        let next: Vec<u64> = if let Some(l) = fixed {
            rates.iter().map(|&r| if r > l as f64 { l.max(floor) } else { 0 }).collect()
        } else {
            // Water-filling: the slowest dirtiers first, each keeps its
            // rate while it is under an equal share of what is left.
            let mut budget = m.written as f64 / secs * DIRTY_SHARE;
            let mut order: Vec<usize> = (0..rates.len()).collect();
            order.sort_by(|&a, &b| rates[a].total_cmp(&rates[b]));
            let mut out = vec![0u64; rates.len()];
            for (k, &i) in order.iter().enumerate() {
                let share = budget / (rates.len() - k) as f64;
                if rates[i] <= share {
                    budget -= rates[i];
                } else {
                    out[i] = share as u64;
                }
            }
            out.iter()
                .zip(now.iter().chain(std::iter::repeat(&0)))
                .map(|(&new, &old)| match (new, old) {
                    (0, _) => old,
                    // Limited already and still too fast: at most half
                    // after a pass; never more within one.
                    (n, o) if o > 0 && halve => n.min(o / 2),
                    (n, o) if o > 0 => n.min(o),
                    (n, _) => n,
                })
                .map(|l| if l > 0 { l.max(floor) } else { 0 })
                .collect()
        };
        (next.as_slice() != now).then_some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::{Converge, PassRates};

    #[test]
    fn dirty_limit_slows_only_the_vcpus_that_dirty() {
        let dl = Converge::DirtyLimit { fixed: None };
        // A pass of 1 s: the target took 40 MB, vCPU 0 dirtied 2 MB, vCPU 1
        // 100 MB. The budget is 40% of 40 MB/s, 16 MB/s: vCPU 0 keeps its
        // 2, vCPU 1 gets 14.
        assert_eq!(super::DIRTY_SHARE, 0.4);
        let m = PassRates { written: 40_000_000, secs: 1.0, dirtied: 102_000_000, per_vcpu: &[2_000_000, 100_000_000] };
        let l = dl.next_limits(&[0, 0], &m, true).unwrap();
        assert_eq!(l, vec![0, 14_000_000]);
        // Still out-dirtied at that limit: halved.
        let l = dl.next_limits(&l, &m, true).unwrap();
        assert_eq!(l, vec![0, 7_000_000]);
        // A pass the target kept up with changes nothing: 16 MB dirtied
        // of 40 written is the share itself, 17 is over it.
        let calm = PassRates { written: 40_000_000, secs: 1.0, dirtied: 16_000_000, per_vcpu: &[2_000_000, 14_000_000] };
        assert_eq!(dl.next_limits(&l, &calm, true), None);
        let over = PassRates { written: 40_000_000, secs: 1.0, dirtied: 17_000_000, per_vcpu: &[2_000_000, 15_000_000] };
        assert_eq!(dl.next_limits(&[0, 0], &over, true), Some(vec![0, 14_000_000]));
        // Within a pass: set, never raised, not halved.
        assert_eq!(dl.next_limits(&[0, 0], &m, false), Some(vec![0, 14_000_000]));
        assert_eq!(dl.next_limits(&[0, 7_000_000], &m, false), None);
        // Never under the floor.
        let mut l = l;
        for _ in 0..20 {
            l = dl.next_limits(&l, &m, true).unwrap_or(l);
        }
        assert_eq!(l, vec![0, crate::dirty_ring::MIN_LIMIT]);
        // QEMU's fixed vcpu-dirty-limit: every vCPU above it, at it.
        let fixed = Converge::DirtyLimit { fixed: Some(5_000_000) };
        assert_eq!(fixed.next_limits(&[0, 0], &m, true), Some(vec![0, 5_000_000]));
        // Other policies set no limits.
        assert_eq!(Converge::None.next_limits(&[0, 0], &m, true), None);
        assert_eq!(Converge::Auto { initial: 20, increment: 10 }.next_limits(&[0, 0], &m, true), None);
    }

    #[test]
    fn auto_converge_raises_the_throttle_as_qemu_does_or_to_what_was_measured() {
        let auto = Converge::Auto { initial: 20, increment: 10 };
        let mut high = 0;
        // A pass the target kept up with: nothing changes.
        assert_eq!(auto.next_throttle(0, &mut high, 100, 50), 0);
        assert_eq!(high, 0);
        // Out-dirtied once (the guest dirtied 55 while 100 were written):
        // wait for a second time, then QEMU's initial step.
        assert_eq!(auto.next_throttle(0, &mut high, 100, 55), 0);
        assert_eq!(auto.next_throttle(0, &mut high, 100, 55), 20);
        assert_eq!(high, 0);
        assert_eq!(auto.next_throttle(20, &mut high, 100, 55), 20);
        assert_eq!(auto.next_throttle(20, &mut high, 100, 55), 30);
        // A target far slower than the guest: straight to what the pass
        // measured (1000 dirtied while 40 were written: 98%), not +10.
        assert_eq!(auto.next_throttle(30, &mut high, 40, 1000), 30);
        assert_eq!(auto.next_throttle(30, &mut high, 40, 1000), 98);
        // Never past 99.
        let mut t = 30;
        for _ in 0..40 {
            t = auto.next_throttle(t, &mut high, 100, 90);
        }
        assert_eq!(t, 99);
        // `none` never throttles.
        assert_eq!(Converge::None.next_throttle(0, &mut high, 1, 1000), 0);
    }
}
