//! A one-shot event (set once, waited on with a deadline), shared by the
//! ring and its thread.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// A one-shot event a thread can wait on with a deadline.
#[derive(Default)]
pub struct Event {
    set: Mutex<bool>,
    cv: Condvar,
}

impl Event {
    pub(crate) fn set(&self) {
        *self.set.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cv.notify_all();
    }

    pub(crate) fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = self.set.lock().unwrap_or_else(|e| e.into_inner());
        while !*g {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else { return false };
            g = self.cv.wait_timeout(g, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        true
    }
}
