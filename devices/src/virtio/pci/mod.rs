//! Modern virtio-pci (virtio 1.x, 4.1): vendor capabilities pointing into
//! BAR0 (common, ISR, device, notify), MSI-X table and PBA in BAR0.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::bus::BusDevice;
use crate::pci::{BarKind, BarRelocator, PciConfig, PciDevice};
use crate::{MsiMessage, MsiRouter};

mod regs;

pub const BAR_SIZE: u64 = 0x8000;
const COMMON: u64 = 0x0000;
const COMMON_LEN: u64 = 0x40;
const ISR: u64 = 0x1000;
const DEVICE_CFG: u64 = 0x2000;
const DEVICE_CFG_LEN: u64 = 0x1000;
pub const NOTIFY: u64 = 0x3000;
pub const NOTIFY_MULT: u64 = 4;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x5000;
pub const NO_VECTOR: u16 = 0xffff;

static RELOCATE_WARN: crate::ratelimit::RateLimit = crate::ratelimit::RateLimit::new();

const CAP_VENDOR: u8 = 0x09;
const CAP_MSIX: u8 = 0x11;

#[derive(Clone, Copy, Default, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueCfg {
    size: u16,
    vector: u16,
    enabled: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

#[derive(Clone, Copy, Default, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsixEntry {
    addr: u64,
    data: u32,
    masked: bool,
}

struct Vector {
    gsi: u32,
    evt: Arc<EventFd>,
    entry: MsixEntry,
    routed: Option<MsiMessage>,
}

/// A virtio-pci function's state in a snapshot (version 1): the
/// transport registers, the MSI-X table and the device's own state. Queue
/// positions are not stored: the device is quiesced when this is taken,
/// so every request it took is in the used ring, and the used ring's idx
/// (in guest RAM) is where both indices resume.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct VirtioPciState {
    pub device_type: u16,
    pub config: Vec<u32>,
    pub status: u8,
    pub generation: u8,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub queue_select: u16,
    pub config_vector: u16,
    pub queues: Vec<QueueCfg>,
    pub msix: Vec<MsixEntry>,
    pub active: bool,
    pub device: serde_json::Value,
}

pub struct VirtioPci {
    config: PciConfig,
    msix_cap: usize,
    dev: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    router: Arc<dyn MsiRouter>,
    vectors: Vec<Vector>,
    notify: Vec<EventFd>,
    queues: Vec<QueueCfg>,
    max_sizes: Vec<u16>,
    status: u8,
    generation: u8,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    queue_select: u16,
    config_vector: u16,
    active: bool,
    /// Active, but its queues are stopped (snapshot pause).
    paused: bool,
    /// Where BAR0 is mapped on the MMIO bus (and its doorbells registered).
    mapped: u64,
    relocator: Option<Arc<dyn BarRelocator>>,
}

fn vendor_cap(cfg_type: u8, offset: u32, len: u32, extra: Option<u32>) -> Vec<u8> {
    // cap_len, cfg_type, bar, id, padding[2], offset, length (+ multiplier)
    let cap_len = if extra.is_some() { 20 } else { 16 };
    let mut b = vec![cap_len, cfg_type, 0, 0, 0, 0];
    b.extend_from_slice(&offset.to_le_bytes());
    b.extend_from_slice(&len.to_le_bytes());
    if let Some(m) = extra {
        b.extend_from_slice(&m.to_le_bytes());
    }
    b
}

impl VirtioPci {
    /// A virtio-pci function for `dev` with BAR0 at `bar_addr`; one MSI-X
    /// vector per queue plus one for configuration changes.
    pub fn new(dev: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, router: Arc<dyn MsiRouter>, bar_addr: u64) -> crate::Result<VirtioPci> {
        let max_sizes = dev.queue_max_sizes();
        let nq = max_sizes.len();
        let nvec = nq + 1;
        let dtype = dev.device_type();
        let mut config = PciConfig::new(0x1af4, 0x1040 + dtype, class_of(dtype), subclass_of(dtype), 0, 0x1af4, 0x40);
        // Revision 1: a modern-only device.
        config.write(2, 0, &[1]);
        config.set_bar(0, BarKind::Mem64, bar_addr, BAR_SIZE);
        config.add_capability(CAP_VENDOR, &vendor_cap(1, COMMON as u32, COMMON_LEN as u32, None), &[]);
        config.add_capability(CAP_VENDOR, &vendor_cap(3, ISR as u32, 4, None), &[]);
        config.add_capability(CAP_VENDOR, &vendor_cap(4, DEVICE_CFG as u32, DEVICE_CFG_LEN as u32, None), &[]);
        config.add_capability(CAP_VENDOR, &vendor_cap(2, NOTIFY as u32, (nq as u64 * NOTIFY_MULT) as u32, Some(NOTIFY_MULT as u32)), &[]);
        let mut msix = ((nvec - 1) as u16).to_le_bytes().to_vec();
        msix.extend_from_slice(&(MSIX_TABLE as u32).to_le_bytes()); // BIR 0
        msix.extend_from_slice(&(MSIX_PBA as u32).to_le_bytes());
        // Message control: enable (bit 15) and function mask (bit 14) writable.
        let msix_cap = config.add_capability(CAP_MSIX, &msix, &[0, 0xc0]);
        let mut vectors = Vec::with_capacity(nvec);
        for _ in 0..nvec {
            let gsi = router.allocate()?;
            let evt = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(crate::Error::EventFd)?);
            vectors.push(Vector { gsi, evt, entry: MsixEntry { masked: true, ..Default::default() }, routed: None });
        }
        let notify = (0..nq).map(|_| EventFd::new(libc::EFD_NONBLOCK).map_err(crate::Error::EventFd)).collect::<crate::Result<Vec<_>>>()?;
        Ok(VirtioPci {
            config,
            msix_cap,
            dev,
            mem,
            router,
            vectors,
            notify,
            queues: max_sizes.iter().map(|&s| QueueCfg { size: s, vector: NO_VECTOR, ..Default::default() }).collect(),
            max_sizes,
            status: 0,
            generation: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            queue_select: 0,
            config_vector: NO_VECTOR,
            active: false,
            paused: false,
            mapped: bar_addr,
            relocator: None,
        })
    }

    /// Lets the guest move BAR0: without a relocator a move is logged and
    /// the device stays where it was mapped.
    pub fn set_relocator(&mut self, r: Arc<dyn BarRelocator>) {
        self.relocator = Some(r);
    }

    /// Where BAR0 is mapped now.
    pub fn mapped_bar(&self) -> u64 {
        self.mapped
    }

    /// Follows the guest's BAR0: a new address takes effect once memory
    /// decoding is on (Linux and firmware size and place BARs with decoding
    /// off, so the all-ones probes and half-written 64-bit addresses in
    /// between never move anything). Turning decoding off keeps the
    /// mapping: nothing else can claim the range meanwhile.
    fn sync_bar(&mut self) {
        let want = self.config.bar_addr(0);
        if !self.config.mem_enabled() || want == self.mapped {
            return;
        }
        let Some(r) = self.relocator.clone() else {
            crate::ratelimit::warn(&RELOCATE_WARN, || {
                format!("virtio-pci: guest moved BAR0 from {:#x} to {want:#x}; this device cannot be moved", self.mapped)
            });
            return;
        };
        let ioevents: Vec<(u64, &EventFd)> = self.notify.iter().enumerate().map(|(i, e)| (NOTIFY + i as u64 * NOTIFY_MULT, e)).collect();
        match r.move_bar(self.mapped, want, BAR_SIZE, &ioevents) {
            Ok(()) => {
                log::info!("virtio-pci: BAR0 moved from {:#x} to {want:#x}", self.mapped);
                self.mapped = want;
            }
            Err(e) => crate::ratelimit::warn(&RELOCATE_WARN, || format!("virtio-pci: BAR0 stays at {:#x}: cannot move it to {want:#x}: {e}", self.mapped)),
        }
    }

    pub fn bar_addr(&self) -> u64 {
        self.config.bar_addr(0)
    }

    /// (guest physical address, eventfd) of each queue's notify register,
    /// for KVM ioeventfds.
    pub fn notify_events(&self) -> Vec<(u64, &EventFd)> {
        let base = self.bar_addr() + NOTIFY;
        self.notify.iter().enumerate().map(|(i, e)| (base + i as u64 * NOTIFY_MULT, e)).collect()
    }

    pub fn status(&self) -> u8 {
        self.status
    }

    /// Resets the device as a driver writing status 0 would: its queues
    /// are quiesced through their iothreads first.
    pub fn device_reset(&mut self) {
        self.reset();
    }

    pub fn describe(&self) -> Vec<String> {
        self.dev.describe()
    }

    /// Stops the device's queues, keeping their state (vCPUs are out):
    /// returns once nothing is in flight.
    pub fn pause(&mut self) -> crate::Result<()> {
        if self.active {
            self.dev.pause()?;
            self.paused = true;
        }
        Ok(())
    }

    /// Serves the queues again after [`VirtioPci::pause`], from where the
    /// used rings say they stopped.
    pub fn resume(&mut self) {
        if self.paused {
            self.paused = false;
            self.active = false;
            self.activate(true);
        }
    }

    /// The transport's and device's state (take it paused).
    pub fn save_state(&self) -> VirtioPciState {
        VirtioPciState {
            device_type: self.dev.device_type(),
            config: self.config.save(),
            status: self.status,
            generation: self.generation,
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            driver_features: self.driver_features,
            queue_select: self.queue_select,
            config_vector: self.config_vector,
            queues: self.queues.clone(),
            msix: self.vectors.iter().map(|v| v.entry).collect(),
            active: self.active || self.paused,
            device: self.dev.save(),
        }
    }

    /// Loads a saved state (untrusted: every field is checked) into a
    /// device that has not run, after guest RAM was loaded; an active
    /// device starts serving its queues from the used rings' positions.
    pub fn restore_state(&mut self, st: &VirtioPciState) -> Result<(), String> {
        if st.device_type != self.dev.device_type() {
            return Err(format!("virtio device type {} in the state, {} here", st.device_type, self.dev.device_type()));
        }
        if st.queues.len() != self.queues.len() || st.msix.len() != self.vectors.len() {
            return Err(format!(
                "{} queues and {} MSI-X vectors in the state, {} and {} here",
                st.queues.len(),
                st.msix.len(),
                self.queues.len(),
                self.vectors.len()
            ));
        }
        let nvec = self.vectors.len();
        for (i, q) in st.queues.iter().enumerate() {
            if q.size > self.max_sizes[i] || (q.size != 0 && !q.size.is_power_of_two()) {
                return Err(format!("queue {i}: size {} invalid (max {})", q.size, self.max_sizes[i]));
            }
            if q.vector != NO_VECTOR && q.vector as usize >= nvec {
                return Err(format!("queue {i}: MSI-X vector {} out of range", q.vector));
            }
        }
        if st.config_vector != NO_VECTOR && st.config_vector as usize >= nvec {
            return Err(format!("config MSI-X vector {} out of range", st.config_vector));
        }
        if st.driver_features & !self.dev.features() != 0 {
            return Err(format!("driver features {:#x} not offered by the device", st.driver_features));
        }
        if self.active {
            return Err("the device is already running".into());
        }
        self.config.restore(&st.config)?;
        self.dev.restore(&st.device).map_err(|e| e.to_string())?;
        self.status = st.status;
        self.generation = st.generation;
        self.device_feature_select = st.device_feature_select;
        self.driver_feature_select = st.driver_feature_select;
        self.driver_features = st.driver_features;
        self.queue_select = st.queue_select;
        self.config_vector = st.config_vector;
        self.queues = st.queues.clone();
        for (v, e) in self.vectors.iter_mut().zip(&st.msix) {
            v.entry = *e;
        }
        self.sync_vectors();
        self.sync_bar();
        if st.active {
            self.activate(true);
            if !self.active {
                return Err("a queue in the state is not valid in the loaded guest memory".into());
            }
        }
        Ok(())
    }

    fn msix_control(&self) -> u16 {
        let off = self.msix_cap + 2;
        u16::from(self.config.read_bytes(off)) | u16::from(self.config.read_bytes(off + 1)) << 8
    }

    /// Routes each vector per its table entry and the enable/mask bits.
    fn sync_vectors(&mut self) {
        let ctl = self.msix_control();
        let enabled = ctl & 0x8000 != 0 && ctl & 0x4000 == 0;
        for v in &mut self.vectors {
            let want = (enabled && !v.entry.masked).then_some(MsiMessage { addr: v.entry.addr, data: v.entry.data });
            if want != v.routed {
                if let Err(e) = self.router.route(v.gsi, want, &v.evt) {
                    crate::error_limited!("virtio-pci: MSI route for GSI {}: {e}", v.gsi);
                }
                v.routed = want;
            }
        }
    }

    fn reset(&mut self) {
        self.paused = false;
        if self.active {
            if let Err(e) = self.dev.reset() {
                crate::error_limited!("virtio-pci: device reset: {e}");
            }
            self.active = false;
        }
        for (q, &max) in self.queues.iter_mut().zip(&self.max_sizes) {
            *q = QueueCfg { size: max, vector: NO_VECTOR, ..Default::default() };
        }
        self.status = 0;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        self.config_vector = NO_VECTOR;
        // Drain notifications the old queues left behind.
        for n in &self.notify {
            let _ = n.read();
        }
    }

    fn activate(&mut self, resume: bool) {
        let mut active = Vec::new();
        for (i, q) in self.queues.iter().enumerate() {
            if !q.enabled {
                continue;
            }
            let Ok(mut queue) = Queue::new(self.max_sizes[i]) else {
                self.status |= STATUS_NEEDS_RESET;
                return;
            };
            queue.set_size(q.size);
            queue.set_desc_table_address(Some(q.desc as u32), Some((q.desc >> 32) as u32));
            queue.set_avail_ring_address(Some(q.driver as u32), Some((q.driver >> 32) as u32));
            queue.set_used_ring_address(Some(q.device as u32), Some((q.device >> 32) as u32));
            queue.set_event_idx(self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0);
            queue.set_ready(true);
            if !queue.is_valid(&self.mem) {
                crate::warn_limited!("virtio-pci: queue {i} is not valid (size {} or rings outside RAM); device needs reset", q.size);
                self.status |= STATUS_NEEDS_RESET;
                return;
            }
            // A fresh activation starts at 0. After a pause or a restore
            // every request taken was completed, so both positions resume
            // at the used ring's idx (which only the device writes).
            if resume {
                match self.mem.read_obj::<u16>(vm_memory::GuestAddress(q.device + 2)) {
                    Ok(idx) => {
                        queue.set_next_avail(idx);
                        queue.set_next_used(idx);
                    }
                    Err(_) => {
                        self.status |= STATUS_NEEDS_RESET;
                        return;
                    }
                }
            }
            let notify = match self.notify[i].try_clone() {
                Ok(n) => n,
                Err(_) => {
                    self.status |= STATUS_NEEDS_RESET;
                    return;
                }
            };
            let irq = self.vectors.get(q.vector as usize).map(|v| v.evt.clone());
            active.push(ActiveQueue { index: i as u16, queue, notify, irq });
        }
        match self.dev.activate(self.mem.clone(), self.driver_features, active) {
            Ok(()) => self.active = true,
            Err(e) => {
                crate::warn_limited!("virtio-pci: activation failed: {e}");
                self.status |= STATUS_NEEDS_RESET;
            }
        }
    }

    fn write_status(&mut self, v: u8) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        let mut v = v;
        if v & STATUS_FEATURES_OK != 0 && old & STATUS_FEATURES_OK == 0 {
            let offered = self.dev.features();
            let ok = self.driver_features & !offered == 0 && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                v &= !STATUS_FEATURES_OK;
            }
        }
        self.status = v | (old & STATUS_NEEDS_RESET);
        if v & STATUS_DRIVER_OK != 0 && old & STATUS_DRIVER_OK == 0 && v & STATUS_FEATURES_OK != 0 && !self.active {
            self.activate(false);
        }
    }
}

fn class_of(dtype: u16) -> u8 {
    match dtype {
        8 | 2 => 0x01, // mass storage
        1 => 0x02,
        _ => 0xff,
    }
}

fn subclass_of(dtype: u16) -> u8 {
    match dtype {
        8 => 0x00, // SCSI
        2 => 0x80,
        _ => 0x00,
    }
}

impl PciDevice for VirtioPci {
    fn config_read(&mut self, reg: usize) -> u32 {
        self.config.read_reg(reg)
    }

    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        self.config.write(reg, offset, data);
        if reg == (self.msix_cap / 4) {
            self.sync_vectors();
        }
        self.sync_bar();
    }
}

impl BusDevice for VirtioPci {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            o if (COMMON..COMMON + COMMON_LEN).contains(&o) => self.common_read(o - COMMON, data),
            o if o == ISR => {
                // MSI-X only: nothing is ever pending in the ISR.
                data.fill(0);
            }
            o if (DEVICE_CFG..DEVICE_CFG + DEVICE_CFG_LEN).contains(&o) => self.dev.read_config(o - DEVICE_CFG, data),
            o if (MSIX_TABLE..MSIX_TABLE + 16 * self.vectors.len() as u64).contains(&o) => self.msix_read(o - MSIX_TABLE, data),
            o if (MSIX_PBA..MSIX_PBA + 8).contains(&o) => data.fill(0),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if (COMMON..COMMON + COMMON_LEN).contains(&o) => self.common_write(o - COMMON, data),
            o if (DEVICE_CFG..DEVICE_CFG + DEVICE_CFG_LEN).contains(&o) => self.dev.write_config(o - DEVICE_CFG, data),
            o if (NOTIFY..NOTIFY + self.notify.len() as u64 * NOTIFY_MULT).contains(&o) => {
                // Only reached when the ioeventfd did not match (odd sizes).
                if let Some(e) = self.notify.get(((o - NOTIFY) / NOTIFY_MULT) as usize) {
                    let _ = e.write(1);
                }
            }
            o if (MSIX_TABLE..MSIX_TABLE + 16 * self.vectors.len() as u64).contains(&o) => self.msix_write(o - MSIX_TABLE, data),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use vm_memory::GuestAddress;

    use super::*;

    struct NoRouter;
    impl MsiRouter for NoRouter {
        fn allocate(&self) -> crate::Result<u32> {
            Ok(0)
        }
        fn route(&self, _: u32, _: Option<MsiMessage>, _: &EventFd) -> crate::Result<()> {
            Ok(())
        }
    }

    struct Dummy;
    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u16 {
            8
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![16, 16]
        }
        fn features(&self) -> u64 {
            1 << 32
        }
        fn read_config(&self, _: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(&mut self, _: GuestMemoryMmap, _: u64, _: Vec<ActiveQueue>) -> crate::Result<()> {
            Ok(())
        }
        fn reset(&mut self) -> crate::Result<()> {
            Ok(())
        }
        fn pause(&mut self) -> crate::Result<()> {
            Ok(())
        }
    }

    /// Records every move; refuses addresses in `refuse`.
    #[derive(Default)]
    struct Mover {
        moves: Mutex<Vec<(u64, u64, Vec<u64>)>>,
        refuse: Option<u64>,
    }
    impl BarRelocator for Mover {
        fn move_bar(&self, old: u64, new: u64, len: u64, ioevents: &[(u64, &EventFd)]) -> Result<(), String> {
            assert_eq!(len, BAR_SIZE);
            if Some(new) == self.refuse {
                return Err("clash".into());
            }
            self.moves.lock().unwrap().push((old, new, ioevents.iter().map(|(o, _)| *o).collect()));
            Ok(())
        }
    }

    fn wr32(p: &mut VirtioPci, reg: usize, v: u32) {
        p.config_write(reg, 0, &v.to_le_bytes());
    }

    /// What Linux and firmware do: size and program BAR0 with decoding off,
    /// then turn decoding on. Only the final address moves the device, once;
    /// the doorbells go with it.
    #[test]
    fn bar0_moves_once_decoding_is_on() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut p = VirtioPci::new(Box::new(Dummy), mem, Arc::new(NoRouter), 0xc000_0000).unwrap();
        let mover = Arc::new(Mover::default());
        p.set_relocator(mover.clone());
        // Sizing, decoding off: all ones, read back, restore, then a new address.
        wr32(&mut p, 1, 0);
        wr32(&mut p, 4, 0xffff_ffff);
        wr32(&mut p, 5, 0xffff_ffff);
        assert_eq!(p.config_read(4) & !0xf, !(BAR_SIZE as u32 - 1));
        wr32(&mut p, 4, 0xd000_0000);
        wr32(&mut p, 5, 0x0000_0001);
        assert!(mover.moves.lock().unwrap().is_empty(), "moved while decoding was off");
        assert_eq!(p.mapped_bar(), 0xc000_0000);
        wr32(&mut p, 1, 0x6); // memory space + bus master
        assert_eq!(p.mapped_bar(), 0x1_d000_0000);
        let moves = mover.moves.lock().unwrap().clone();
        assert_eq!(moves, vec![(0xc000_0000, 0x1_d000_0000, vec![NOTIFY, NOTIFY + NOTIFY_MULT])]);
        // Rewriting the same address, or other registers, moves nothing.
        wr32(&mut p, 4, 0xd000_0000);
        wr32(&mut p, 3, 0x10);
        assert_eq!(mover.moves.lock().unwrap().len(), 1);
    }

    /// A move the VMM refuses (a clash) leaves the device where it answers.
    #[test]
    fn a_refused_move_keeps_the_mapping() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut p = VirtioPci::new(Box::new(Dummy), mem.clone(), Arc::new(NoRouter), 0xc000_0000).unwrap();
        p.set_relocator(Arc::new(Mover { refuse: Some(0xc000_8000), ..Default::default() }));
        wr32(&mut p, 1, 0x2);
        wr32(&mut p, 4, 0xc000_8000);
        assert_eq!(p.mapped_bar(), 0xc000_0000);
        // Without a relocator a move is refused too.
        let mut q = VirtioPci::new(Box::new(Dummy), mem, Arc::new(NoRouter), 0xc000_0000).unwrap();
        wr32(&mut q, 1, 0x2);
        wr32(&mut q, 4, 0xe000_0000);
        assert_eq!(q.mapped_bar(), 0xc000_0000);
    }
}
