//! Rate-limited logging for messages a guest can trigger: at most one line
//! per second per call site, with the number of lines held back.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// One call site's budget. `const`-constructible, so it lives in a static.
pub struct RateLimit {
    /// Milliseconds since the process epoch of the last line, +1 (0: never).
    last_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

const PERIOD_MS: u64 = 1000;

fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

impl RateLimit {
    pub const fn new() -> Self {
        Self { last_ms: AtomicU64::new(0), suppressed: AtomicU64::new(0) }
    }

    /// Whether a line may be written now; if so, how many were held back
    /// since the last one.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(now_ms())
    }

    fn allow_at(&self, now: u64) -> Option<u64> {
        let last = self.last_ms.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < PERIOD_MS {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if self.last_ms.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_err() {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

/// `log::warn!` of `msg()` through `limit` (the message is built only when written).
pub fn warn(limit: &RateLimit, msg: impl FnOnce() -> String) {
    log_at(log::Level::Warn, limit, msg);
}

/// `msg()` at `level` through `limit`.
pub fn log_at(level: log::Level, limit: &RateLimit, msg: impl FnOnce() -> String) {
    if let Some(held) = limit.allow() {
        if held > 0 {
            log::log!(level, "{} ({held} similar lines suppressed)", msg());
        } else {
            log::log!(level, "{}", msg());
        }
    }
}

/// `log::warn!` with a budget of one line per second for this call site.
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)*) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new();
        $crate::ratelimit::log_at(log::Level::Warn, &LIMIT, || format!($($arg)*));
    }};
}

/// `log::error!` with a budget of one line per second for this call site.
#[macro_export]
macro_rules! error_limited {
    ($($arg:tt)*) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new();
        $crate::ratelimit::log_at(log::Level::Error, &LIMIT, || format!($($arg)*));
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_period_and_a_count_of_the_rest() {
        let r = RateLimit::new();
        assert_eq!(r.allow_at(10), Some(0));
        for t in 11..16 {
            assert_eq!(r.allow_at(t), None);
        }
        assert_eq!(r.allow_at(10 + PERIOD_MS - 1), None);
        assert_eq!(r.allow_at(10 + PERIOD_MS), Some(6));
        assert_eq!(r.allow_at(11 + PERIOD_MS), None);
    }
}
