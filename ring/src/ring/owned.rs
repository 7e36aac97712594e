//! State a ring's thread owns for its sources (a device queue's worker,
//! say): kept by the ring, so it lives and dies with the thread that
//! serves it, and found again by the closures other threads send there
//! through its [`crate::Remote`]. Nothing of it ever crosses threads.

use std::rc::Rc;

use super::Ring;
use crate::op::SourceId;

impl Ring {
    /// Keeps `obj` for `source` on this ring (replacing what was kept for
    /// it, of any type).
    pub fn adopt<T: 'static>(&mut self, source: SourceId, obj: Rc<T>) {
        self.owned.insert(source, obj);
    }

    /// What this ring keeps for `source`, if it is a `T`.
    pub fn owned<T: 'static>(&self, source: SourceId) -> Option<Rc<T>> {
        self.owned.get(&source).cloned().and_then(|o| o.downcast::<T>().ok())
    }

    /// Everything of type `T` this ring keeps, in no particular order.
    pub fn all_owned<T: 'static>(&self) -> Vec<Rc<T>> {
        self.owned.values().filter_map(|o| o.clone().downcast::<T>().ok()).collect()
    }

    /// Drops what this ring keeps for `source`.
    pub fn disown(&mut self, source: SourceId) {
        self.owned.remove(&source);
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    #[test]
    fn a_ring_keeps_typed_state_per_source() {
        let mut ring = Ring::new(8, None).unwrap();
        let (a, b, c) = (SourceId::new(), SourceId::new(), SourceId::new());
        ring.adopt(a, Rc::new(RefCell::new(1u32)));
        ring.adopt(b, Rc::new(RefCell::new(2u32)));
        ring.adopt(c, Rc::new("other type"));
        *ring.owned::<RefCell<u32>>(a).unwrap().borrow_mut() += 10;
        assert_eq!(*ring.owned::<RefCell<u32>>(a).unwrap().borrow(), 11);
        assert!(ring.owned::<RefCell<u32>>(c).is_none(), "found through the wrong type");
        let mut all: Vec<u32> = ring.all_owned::<RefCell<u32>>().iter().map(|r| *r.borrow()).collect();
        all.sort_unstable();
        assert_eq!(all, [2, 11]);
        ring.disown(a);
        assert!(ring.owned::<RefCell<u32>>(a).is_none());
        let kept = ring.owned::<RefCell<u32>>(b).unwrap();
        drop(ring);
        assert_eq!(Rc::strong_count(&kept), 1, "the ring's copy dies with the ring");
    }
}
