//! vCPU threads and their run loop.
//!
//! Each vCPU runs on its own named thread (`vcpu0`, ...). Other threads
//! control it only through [`VcpuControl`]: they post a request (pause,
//! reset, stop) and kick the thread with a signal. The signal handler sets
//! `kvm_run.immediate_exit`, so a kick that lands just before KVM_RUN is
//! never lost. A vCPU never waits on an iothread; device handlers on this
//! thread take only short device locks.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::bus::Bus;
use kvm_bindings::{kvm_mp_state, kvm_run, CpuId, Msrs, KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::boot::{self, BootEntry};
use crate::error::{kvm, Error, Result};
use crate::events::{EventQueue, VmEvent};

mod state;

pub use state::VcpuState;
use state::{apply_state, capture_state, lapic_reg, set_lapic_reg, MSR_IA32_TSC, MSR_IA32_TSC_ADJUST};

/// What the controller wants the vCPUs to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    Run,
    Pause,
    Stop,
}

struct CtlState {
    request: Request,
    parked: usize,
    /// Bumped by the controller to make every vCPU reload its boot state.
    reset_epoch: u64,
    reset_acks: usize,
    boot: Option<BootEntry>,
    /// Bumped by the controller to make every parked vCPU record its state.
    save_epoch: u64,
    saved: Vec<Option<std::result::Result<VcpuState, String>>>,
    /// Bumped by the controller to make every parked vCPU load a state.
    restore_epoch: u64,
    to_restore: Vec<Option<VcpuState>>,
    restored: Vec<Option<std::result::Result<(), String>>>,
}

/// Shared between the controller and the vCPU threads.
pub struct VcpuControl {
    state: Mutex<CtlState>,
    cv: Condvar,
    count: usize,
    /// KVM_RUN entries, for statistics.
    pub runs: AtomicU64,
    /// Host thread id of each vCPU (0 until its thread starts).
    tids: Mutex<Vec<i32>>,
    /// CPU throttle (QEMU's auto-converge): the share of time, in percent,
    /// every vCPU spends asleep (0: none).
    throttle_pct: AtomicU32,
    /// Bumped by the throttle ticker each period; a vCPU that sees it
    /// change sleeps its share once.
    throttle_epoch: AtomicU64,
    /// The ticker thread runs.
    ticking: AtomicBool,
}

const CONTROL_DEADLINE: Duration = Duration::from_secs(10);
/// The run time between two throttle sleeps (QEMU's CPU_THROTTLE_TIMESLICE).
pub const THROTTLE_SLICE: Duration = Duration::from_millis(10);
/// The highest throttle (QEMU: max-cpu-throttle, default 99).
pub const MAX_THROTTLE_PCT: u32 = 99;

impl VcpuControl {
    pub fn new(count: usize, boot: BootEntry) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(CtlState {
                request: Request::Pause,
                parked: 0,
                reset_epoch: 0,
                reset_acks: 0,
                boot: Some(boot),
                save_epoch: 0,
                saved: (0..count).map(|_| None).collect(),
                restore_epoch: 0,
                to_restore: (0..count).map(|_| None).collect(),
                restored: (0..count).map(|_| None).collect(),
            }),
            cv: Condvar::new(),
            count,
            runs: AtomicU64::new(0),
            tids: Mutex::new(vec![0; count]),
            throttle_pct: AtomicU32::new(0),
            throttle_epoch: AtomicU64::new(0),
            ticking: AtomicBool::new(false),
        })
    }

    /// The current CPU throttle, percent.
    pub fn throttle(&self) -> u32 {
        self.throttle_pct.load(Ordering::Relaxed)
    }

    /// How long a vCPU sleeps per throttle period at `pct`: run SLICE,
    /// sleep SLICE * pct / (100 - pct).
    fn throttle_sleep(pct: u32) -> Duration {
        let pct = pct.min(MAX_THROTTLE_PCT);
        THROTTLE_SLICE * pct / (100 - pct)
    }

    /// Sleeps up to `d` while the vCPUs should run and `still()` holds: a
    /// pause or stop request, or the end of the throttle, ends it early.
    fn nap(&self, d: Duration, still: impl Fn() -> bool) {
        let until = Instant::now() + d;
        let mut st = self.lock();
        while st.request == Request::Run && still() {
            let Some(left) = until.checked_duration_since(Instant::now()) else { break };
            st = self.cv.wait_timeout(st, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    fn lock(&self) -> MutexGuard<'_, CtlState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait_until(&self, what: &'static str, mut done: impl FnMut(&CtlState) -> bool) -> Result<()> {
        let deadline = Instant::now() + CONTROL_DEADLINE;
        let mut st = self.lock();
        while !done(&st) {
            let left = deadline.checked_duration_since(Instant::now()).ok_or(Error::Timeout(what))?;
            st = self.cv.wait_timeout(st, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        Ok(())
    }

    pub fn request(&self) -> Request {
        self.lock().request
    }

    /// Host thread ids of the vCPUs, by index.
    pub fn thread_ids(&self) -> Vec<i32> {
        self.tids.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Handles of the running vCPU threads.
pub struct Vcpus {
    ctl: Arc<VcpuControl>,
    threads: Vec<JoinHandle<()>>,
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN_PTR.with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: `run` points at this thread's kvm_run mapping, set by
            // the vCPU thread for the lifetime of its VcpuFd; a byte store is
            // async-signal-safe.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    });
}

thread_local! {
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

pub fn install_kick_handler() -> Result<()> {
    register_signal_handler(SIGRTMIN(), kick_handler).map_err(|e| Error::Io(std::io::Error::from_raw_os_error(e.errno())))
}

impl Vcpus {
    pub fn control(&self) -> &Arc<VcpuControl> {
        &self.ctl
    }

    fn kick_all(&self) {
        for t in &self.threads {
            // ESRCH only when the thread already ended, which is fine.
            let _ = t.kill(SIGRTMIN());
        }
    }

    /// Returns once every vCPU is out of KVM_RUN and parked.
    /// Sets the CPU throttle (0 ends it): every vCPU then sleeps `pct`
    /// percent of the time, in slices (a ticker thread kicks them out of
    /// KVM_RUN once per period; each sleeps once per period, so a guest's
    /// own exits do not add sleeps). Sleeps end early for a pause.
    pub fn set_throttle(&self, pct: u32) {
        let pct = pct.min(MAX_THROTTLE_PCT);
        self.ctl.throttle_pct.store(pct, Ordering::Relaxed);
        if pct == 0 {
            self.ctl.cv.notify_all();
            return;
        }
        if self.ctl.ticking.swap(true, Ordering::AcqRel) {
            return;
        }
        let ctl = self.ctl.clone();
        let r = std::thread::Builder::new().name("vcpu-throttle".into()).spawn(move || {
            loop {
                let pct = ctl.throttle_pct.load(Ordering::Relaxed);
                if pct == 0 {
                    break;
                }
                std::thread::sleep(THROTTLE_SLICE + VcpuControl::throttle_sleep(pct));
                ctl.throttle_epoch.fetch_add(1, Ordering::Relaxed);
                // SAFETY: getpid has no preconditions.
                let pid = unsafe { libc::getpid() };
                for tid in ctl.thread_ids().into_iter().filter(|&t| t > 0) {
                    // SAFETY: tgkill of one of our own vCPU threads with the
                    // kick signal, whose handler only sets immediate_exit.
                    unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, SIGRTMIN()) };
                }
            }
            ctl.ticking.store(false, Ordering::Release);
        });
        if let Err(e) = r {
            self.ctl.ticking.store(false, Ordering::Release);
            log::warn!("cannot start the vCPU throttle: {e}");
        }
    }

    pub fn pause(&self) -> Result<()> {
        self.ctl.lock().request = Request::Pause;
        self.ctl.cv.notify_all();
        self.kick_all();
        self.ctl.wait_until("vCPUs to pause", |s| s.parked == self.ctl.count)
    }

    pub fn resume(&self) {
        self.ctl.lock().request = Request::Run;
        self.ctl.cv.notify_all();
    }

    /// With the vCPUs paused: every vCPU reloads its power-on state
    /// (the BSP from `boot`), then they stay paused.
    pub fn reset(&self, boot: BootEntry) -> Result<()> {
        {
            let mut st = self.ctl.lock();
            st.boot = Some(boot);
            st.reset_epoch += 1;
            st.reset_acks = 0;
        }
        self.ctl.cv.notify_all();
        self.ctl.wait_until("vCPUs to reset", |s| s.reset_acks == self.ctl.count)
    }

    /// With the vCPUs paused: each vCPU thread records its own state (KVM's
    /// vCPU ioctls belong to the thread that runs it); returns them in
    /// order.
    pub fn save_state(&self) -> Result<Vec<VcpuState>> {
        {
            let mut st = self.ctl.lock();
            st.save_epoch += 1;
            st.saved.iter_mut().for_each(|s| *s = None);
        }
        self.ctl.cv.notify_all();
        self.ctl.wait_until("vCPUs to save their state", |s| s.saved.iter().all(Option::is_some))?;
        let mut st = self.ctl.lock();
        st.saved
            .iter_mut()
            .enumerate()
            .map(|(cpu, s)| match s.take() {
                Some(Ok(v)) => Ok(v),
                Some(Err(what)) => Err(Error::Vcpu { cpu, what }),
                None => Err(Error::Timeout("vCPU state")),
            })
            .collect()
    }

    /// With the vCPUs paused: each vCPU thread loads `states[id]`.
    pub fn restore_state(&self, states: Vec<VcpuState>) -> Result<()> {
        if states.len() != self.ctl.count {
            return Err(Error::Config(format!("the state has {} vCPUs, the VM {}", states.len(), self.ctl.count)));
        }
        {
            let mut st = self.ctl.lock();
            st.restore_epoch += 1;
            st.restored.iter_mut().for_each(|s| *s = None);
            for (slot, s) in st.to_restore.iter_mut().zip(states) {
                *slot = Some(s);
            }
        }
        self.ctl.cv.notify_all();
        self.ctl.wait_until("vCPUs to load their state", |s| s.restored.iter().all(Option::is_some))?;
        let mut st = self.ctl.lock();
        for (cpu, r) in st.restored.iter_mut().enumerate() {
            if let Some(Err(what)) = r.take() {
                return Err(Error::Vcpu { cpu, what });
            }
        }
        Ok(())
    }

    /// Stops and joins every vCPU thread.
    pub fn stop(&mut self) {
        self.ctl.lock().request = Request::Stop;
        self.ctl.cv.notify_all();
        self.kick_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One vCPU before it is moved onto its thread.
pub struct Vcpu {
    id: u8,
    count: u8,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    mem: GuestMemoryMmap,
    events: Arc<EventQueue>,
    /// MSRs to save (KVM_GET_MSR_INDEX_LIST).
    msr_list: Vec<u32>,
    /// The last save request this vCPU answered.
    save_seen: std::cell::Cell<u64>,
    /// The last restore request this vCPU answered.
    restore_seen: std::cell::Cell<u64>,
    /// The state configured at power-on, loaded again on every reset, so a
    /// reset leaves nothing of the last boot (an armed LAPIC timer, x2APIC
    /// mode, pending events, FPU state) behind.
    power_on: std::cell::OnceCell<VcpuState>,
    /// The VM's dirty rings, if dirty logging uses them.
    rings: Option<Arc<crate::dirty_ring::DirtyRings>>,
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

impl Vcpu {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vm: &VmFd,
        id: u8,
        count: u8,
        supported: &CpuId,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        mem: GuestMemoryMmap,
        events: Arc<EventQueue>,
        msr_list: Vec<u32>,
        rings: Option<Arc<crate::dirty_ring::DirtyRings>>,
    ) -> Result<Self> {
        let fd = vm.create_vcpu(u64::from(id)).map_err(kvm("KVM_CREATE_VCPU"))?;
        if let Some(r) = &rings {
            r.attach(usize::from(id), &fd).map_err(|e| Error::Config(e.to_string()))?;
        }
        let cpuid = boot::cpuid::for_vcpu(supported, id, count);
        // CPUID must be set before the guest enables long mode, so set it now.
        fd.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
        Ok(Self {
            id,
            count,
            fd,
            pio,
            mmio,
            mem,
            events,
            msr_list,
            save_seen: std::cell::Cell::new(0),
            restore_seen: std::cell::Cell::new(0),
            power_on: std::cell::OnceCell::new(),
            rings,
        })
    }

    /// Power-on state: MSRs, FPU, LAPIC LINT pins; the BSP gets the boot
    /// registers, APs wait for INIT/SIPI.
    fn configure(&self, boot: Option<&BootEntry>) -> Result<()> {
        match self.power_on.get() {
            Some(p) => apply_state(&self.fd, self.id, p)?,
            None => {
                self.power_on_setup()?;
                // The guest's TSC runs on across a reset, as KVM keeps it.
                let mut p = capture_state(&self.fd, self.id, &self.msr_list)?;
                p.msrs.retain(|m| ![MSR_IA32_TSC, MSR_IA32_TSC_ADJUST].contains(&m.index));
                let _ = self.power_on.set(p);
            }
        }
        match (self.id, boot) {
            (0, Some(b)) => {
                let sregs = self.fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
                let sregs = boot::regs::setup_sregs(&self.mem, b.mode, sregs)?;
                self.fd.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
                self.fd.set_regs(&boot::regs::boot_regs(b.mode, b.entry, b.boot_info)).map_err(kvm("KVM_SET_REGS"))?;
                self.fd.set_mp_state(kvm_mp_state { mp_state: KVM_MP_STATE_RUNNABLE }).map_err(kvm("KVM_SET_MP_STATE"))?;
            }
            _ => {
                self.fd.set_mp_state(kvm_mp_state { mp_state: KVM_MP_STATE_UNINITIALIZED }).map_err(kvm("KVM_SET_MP_STATE"))?;
            }
        }
        Ok(())
    }

    /// The first configuration of a new vCPU: boot MSRs, FPU, LAPIC LINT pins.
    fn power_on_setup(&self) -> Result<()> {
        let cpu = usize::from(self.id);
        // CPUID was set at creation; KVM refuses to change it after KVM_RUN.
        let entries: Vec<_> = [
            (MSR_IA32_SYSENTER_CS, 0),
            (MSR_IA32_SYSENTER_ESP, 0),
            (MSR_IA32_SYSENTER_EIP, 0),
            (MSR_STAR, 0),
            (MSR_CSTAR, 0),
            (MSR_KERNEL_GS_BASE, 0),
            (MSR_SYSCALL_MASK, 0),
            (MSR_LSTAR, 0),
            (MSR_IA32_MISC_ENABLE, 1),
            (MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
        ]
        .into_iter()
        .map(|(index, data)| kvm_bindings::kvm_msr_entry { index, data, ..Default::default() })
        .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|e| Error::Vcpu { cpu, what: format!("MSR list: {e:?}") })?;
        let set = self.fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
        if set != entries.len() {
            log::debug!("vcpu{cpu}: KVM accepted {set} of {} boot MSRs (MSR {:#x} refused)", entries.len(), entries[set].index);
        }
        self.fd.set_fpu(&boot::regs::boot_fpu()).map_err(kvm("KVM_SET_FPU"))?;
        let mut lapic = self.fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
        for (off, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
            let v = (lapic_reg(&lapic, off) & !0x700) | (mode << 8);
            set_lapic_reg(&mut lapic, off, v);
        }
        self.fd.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))?;
        Ok(())
    }

    /// Describes where the vCPU is, for fatal-exit messages.
    fn where_am_i(&self) -> String {
        let (Ok(regs), Ok(sregs)) = (self.fd.get_regs(), self.fd.get_sregs()) else {
            return "(registers unavailable)".into();
        };
        let linear = sregs.cs.base.wrapping_add(regs.rip);
        let phys =
            if sregs.cr0 & 0x8000_0000 != 0 { self.fd.translate_gva(linear).ok().filter(|t| t.valid != 0).map(|t| t.physical_address) } else { Some(linear) };
        let bytes = phys
            .and_then(|p| {
                let mut b = [0u8; 15];
                self.mem.read_slice(&mut b, GuestAddress(p)).ok().map(|_| b)
            })
            .map(|b| b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|| "unreadable".into());
        format!(
            "RIP {:#x} (CS {:#x}, CPL {}), instruction bytes: {bytes}; RFLAGS {:#x} RSP {:#x} CR0 {:#x} CR2 {:#x} CR3 {:#x} CR4 {:#x} EFER {:#x}",
            regs.rip, sregs.cs.selector, sregs.cs.dpl, regs.rflags, regs.rsp, sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4, sregs.efer
        )
    }

    /// Starts the thread. It parks until the controller resumes it.
    pub fn start(vcpus: Vec<Vcpu>, ctl: Arc<VcpuControl>) -> Result<Vcpus> {
        let mut threads = Vec::new();
        for v in vcpus {
            let name = format!("vcpu{}", v.id);
            let c = ctl.clone();
            let t = std::thread::Builder::new().name(name.clone()).spawn(move || v.thread_main(c)).map_err(|source| Error::Thread { name, source })?;
            threads.push(t);
        }
        Ok(Vcpus { ctl, threads })
    }

    fn thread_main(mut self, ctl: Arc<VcpuControl>) {
        crate::seccomp::apply_or_exit(crate::seccomp::Role::Vcpu);
        KVM_RUN_PTR.with(|p| p.set(self.fd.get_kvm_run() as *mut kvm_run));
        let id = usize::from(self.id);
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        if let Some(t) = ctl.tids.lock().unwrap_or_else(|e| e.into_inner()).get_mut(id) {
            *t = tid;
        }
        if let Err(e) = self.run_loop(&ctl) {
            self.events.push(VmEvent::Error(format!("vcpu{id}: {e}")));
        }
        KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
        // Stay accounted as parked so the controller never waits on us.
        let mut st = ctl.lock();
        st.parked += 1;
        st.reset_acks += 1;
        ctl.cv.notify_all();
    }

    /// Parks while the controller asks for a pause; applies resets.
    /// Returns false when asked to stop.
    fn park(&self, ctl: &VcpuControl, my_epoch: &mut u64) -> Result<bool> {
        let mut st = ctl.lock();
        let mut counted = false;
        let keep_running = loop {
            let me = usize::from(self.id);
            if st.request == Request::Pause && st.restore_epoch != self.restore_seen.get() && counted {
                self.restore_seen.set(st.restore_epoch);
                let state = st.to_restore.get_mut(me).and_then(Option::take);
                drop(st);
                let r = match state {
                    Some(s) => self.apply(&s).map_err(|e| e.to_string()),
                    None => Err("no state for this vCPU".to_string()),
                };
                st = ctl.lock();
                st.restored[me] = Some(r);
                ctl.cv.notify_all();
                continue;
            }
            if st.request == Request::Pause && st.save_epoch != self.save_seen.get() && counted {
                self.save_seen.set(st.save_epoch);
                drop(st);
                let r = self.capture().map_err(|e| e.to_string());
                st = ctl.lock();
                st.saved[me] = Some(r);
                ctl.cv.notify_all();
                continue;
            }
            if st.reset_epoch != *my_epoch {
                let boot = st.boot;
                *my_epoch = st.reset_epoch;
                drop(st);
                self.configure(boot.as_ref())?;
                st = ctl.lock();
                st.reset_acks += 1;
                ctl.cv.notify_all();
                continue;
            }
            match st.request {
                Request::Run => break true,
                Request::Stop => break false,
                Request::Pause => {
                    if !counted {
                        counted = true;
                        st.parked += 1;
                        ctl.cv.notify_all();
                    }
                    st = ctl.cv.wait(st).unwrap_or_else(|e| e.into_inner());
                }
            }
        };
        if counted {
            st.parked -= 1;
        }
        drop(st);
        if counted && keep_running {
            self.tell_guest_it_was_paused();
        }
        Ok(keep_running)
    }

    /// KVM_KVMCLOCK_CTRL on the way out of a pause (QEMU does it on every
    /// stop -> run, Firecracker on resume): the guest's kvmclock page gets
    /// PVCLOCK_GUEST_STOPPED, so Linux's RCU-stall and soft-lockup checks
    /// take the time the VM stood still (a pause, or save -> restore) for
    /// what it is instead of a CPU stuck for that long. EINVAL means the
    /// guest has no kvmclock registered: nothing to tell.
    fn tell_guest_it_was_paused(&self) {
        match self.fd.kvmclock_ctrl() {
            Ok(()) => {}
            Err(e) if e.errno() == libc::EINVAL => {}
            Err(e) => log::debug!("vcpu{}: KVM_KVMCLOCK_CTRL: {e}", self.id),
        }
    }

    fn run_loop(&mut self, ctl: &VcpuControl) -> Result<()> {
        let cpu = usize::from(self.id);
        let mut epoch = 0u64;
        let boot = ctl.lock().boot;
        self.configure(boot.as_ref())?;
        let mut throttled = ctl.throttle_epoch.load(Ordering::Relaxed);
        loop {
            if ctl.request() != Request::Run && !self.park(ctl, &mut epoch)? {
                return Ok(());
            }
            let tick = ctl.throttle_epoch.load(Ordering::Relaxed);
            if tick != throttled {
                throttled = tick;
                let pct = ctl.throttle();
                if pct > 0 {
                    // Asleep for the throttle's share.
                    ctl.nap(VcpuControl::throttle_sleep(pct), || ctl.throttle() > 0);
                    continue;
                }
            }
            ctl.runs.fetch_add(1, Ordering::Relaxed);
            let fatal = match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    if !self.pio.read(u64::from(port), data) {
                        data.fill(0xff);
                    }
                    None
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    self.pio.write(u64::from(port), data);
                    None
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !self.mmio.read(addr, data) {
                        log::debug!("vcpu{cpu}: unhandled MMIO read at {addr:#x}");
                        data.fill(0xff);
                    }
                    None
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if !self.mmio.write(addr, data) {
                        log::debug!("vcpu{cpu}: unhandled MMIO write at {addr:#x}");
                    }
                    None
                }
                Ok(VcpuExit::Hlt) => None,
                Ok(VcpuExit::Shutdown) => Some(Fatal::TripleFault),
                Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                        self.events.push(VmEvent::Reset);
                        None
                    }
                    _ => {
                        self.events.push(VmEvent::Shutdown);
                        None
                    }
                },
                Ok(VcpuExit::Unsupported(kvm_bindings::KVM_EXIT_DIRTY_RING_FULL)) => {
                    // The ring must be harvested before KVM runs this vCPU
                    // again; under a dirty limit, it then sleeps its share.
                    match self.rings.as_ref().map(|r| (r, r.full(cpu))) {
                        Some((r, Some(d))) if !d.is_zero() => {
                            let slept = Instant::now();
                            ctl.nap(d, || r.limit(cpu) > 0);
                            r.add_slept(slept.elapsed());
                            None
                        }
                        Some((_, None)) => Some(Fatal::Other(
                            "KVM overflowed this vCPU's dirty ring and cannot reset it (KVM logged more guest writes in one run than the ring holds); run without --dirty-ring".into(),
                        )),
                        _ => None,
                    }
                }
                Ok(VcpuExit::InternalError) => Some(Fatal::Internal),
                Ok(VcpuExit::FailEntry(reason, _)) => Some(Fatal::Other(format!("KVM_EXIT_FAIL_ENTRY, reason {reason:#x}"))),
                Ok(other) => Some(Fatal::Other(format!("unexpected exit {other:?}"))),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                    None
                }
                Err(e) => Some(Fatal::Other(format!("KVM_RUN failed: {e}"))),
            };
            match fatal {
                None => {}
                Some(Fatal::TripleFault) => {
                    let at = self.where_am_i();
                    self.events.push(VmEvent::TripleFault { cpu, at });
                    // Wait for the controller to reset or stop the VM.
                    self.wait_for_controller(ctl);
                }
                Some(Fatal::Internal) => {
                    let run = self.fd.get_kvm_run();
                    // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so the
                    // `internal` member of the exit union is the one KVM filled.
                    let sub = unsafe { run.__bindgen_anon_1.internal.suberror };
                    let what = match sub {
                        kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => "emulation failure",
                        kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
                        kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery error",
                        _ => "internal error",
                    };
                    return Err(Error::Vcpu { cpu, what: format!("KVM_EXIT_INTERNAL_ERROR ({what}, suberror {sub}) at {}", self.where_am_i()) });
                }
                Some(Fatal::Other(msg)) => return Err(Error::Vcpu { cpu, what: format!("{msg} at {}", self.where_am_i()) }),
            }
        }
    }

    fn capture(&self) -> Result<VcpuState> {
        capture_state(&self.fd, self.id, &self.msr_list)
    }

    fn apply(&self, s: &VcpuState) -> Result<()> {
        apply_state(&self.fd, self.id, s)?;
        self.check_tsc(s);
        Ok(())
    }

    /// Says so, once, when KVM did not take the saved TSC (some hosts keep
    /// the guest's TSC on the host's): the restored guest then sees the
    /// time between save and restore pass at once.
    fn check_tsc(&self, s: &VcpuState) {
        static SAID: AtomicBool = AtomicBool::new(false);
        let Some(saved) = s.msrs.iter().find(|m| m.index == MSR_IA32_TSC).map(|m| m.data) else { return };
        let Ok(now) = state::read_msr(&self.fd, MSR_IA32_TSC) else { return };
        // A few hundred ms of a GHz TSC: far above the load's own jitter.
        if now.abs_diff(saved) > 1 << 30 && !SAID.swap(true, Ordering::Relaxed) {
            log::warn!(
                "vcpu{}: KVM did not restore the guest's TSC ({} cycles off); the guest sees the time since the save pass in one step",
                self.id,
                i128::from(now) - i128::from(saved)
            );
        }
    }

    /// After a fatal-but-recoverable exit: park until the controller acts.
    fn wait_for_controller(&self, ctl: &VcpuControl) {
        let mut st = ctl.lock();
        let epoch = st.reset_epoch;
        while st.request == Request::Run && st.reset_epoch == epoch {
            st = ctl.cv.wait_timeout(st, Duration::from_millis(50)).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    pub fn id(&self) -> u8 {
        self.id
    }

    pub fn count(&self) -> u8 {
        self.count
    }
}

enum Fatal {
    TripleFault,
    Internal,
    Other(String),
}
