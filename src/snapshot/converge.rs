//! How a snapshot whose guest dirties faster than its target writes is
//! made to finish (QEMU's auto-converge).

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

#[cfg(test)]
mod tests {
    use super::Converge;

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
