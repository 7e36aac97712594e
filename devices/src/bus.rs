//! Port-I/O and MMIO dispatch.
//!
//! A [`Bus`] maps non-overlapping address ranges to devices. Lookups take a
//! read lock on the map and then the device's own short lock, never anything
//! that waits on another thread's progress.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use crate::{Error, Result};

/// A device reachable through a bus. Offsets are relative to the range base.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Range {
    base: u64,
    len: u64,
}

pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Default)]
pub struct Bus {
    map: RwLock<BTreeMap<u64, (Range, SharedDevice)>>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `dev` at `[base, base+len)`.
    pub fn insert(&self, dev: SharedDevice, base: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Err(Error::BusZeroLength(base));
        }
        let end = base.checked_add(len).ok_or(Error::BusOverlap { base, len })?;
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        let clash_before = map.range(..end).next_back().is_some_and(|(_, (r, _))| r.base + r.len > base);
        if clash_before {
            return Err(Error::BusOverlap { base, len });
        }
        map.insert(base, (Range { base, len }, dev));
        Ok(())
    }

    /// Removes the device whose range starts at `base`.
    pub fn remove(&self, base: u64) -> Option<SharedDevice> {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        map.remove(&base).map(|(_, d)| d)
    }

    fn find(&self, addr: u64, len: usize) -> Option<(u64, SharedDevice)> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        let (_, (r, dev)) = map.range(..=addr).next_back()?;
        let end = addr.checked_add(len as u64)?;
        (end <= r.base + r.len).then(|| (addr - r.base, dev.clone()))
    }

    /// Dispatches a read; returns false when nothing is mapped there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((off, dev)) => {
                dev.lock().unwrap_or_else(|e| e.into_inner()).read(off, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when nothing is mapped there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((off, dev)) => {
                dev.lock().unwrap_or_else(|e| e.into_inner()).write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0.wrapping_add(offset as u8));
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn dispatch_and_overlap() {
        let bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Echo(1))), 0x10, 8).unwrap();
        assert!(matches!(bus.insert(Arc::new(Mutex::new(Echo(2))), 0x14, 8), Err(Error::BusOverlap { .. })));
        assert!(matches!(bus.insert(Arc::new(Mutex::new(Echo(2))), 0x8, 9), Err(Error::BusOverlap { .. })));
        bus.insert(Arc::new(Mutex::new(Echo(2))), 0x18, 8).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x12, &mut b));
        assert_eq!(b[0], 3);
        assert!(bus.write(0x18, &[7]));
        assert!(bus.read(0x18, &mut b));
        assert_eq!(b[0], 7);
        // A read that straddles the end of a range is not dispatched.
        let mut w = [0u8; 4];
        assert!(!bus.read(0x1e, &mut w));
        assert!(!bus.read(0x40, &mut b));
        assert!(bus.remove(0x18).is_some());
        assert!(!bus.read(0x18, &mut b));
    }
}
