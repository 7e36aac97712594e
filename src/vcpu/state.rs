//! A vCPU's saved state: what KVM holds for it, read back and loaded
//! again in the order KVM needs.

use kvm_bindings::Msrs;
use kvm_ioctls::VcpuFd;

use crate::error::{kvm, Error, Result};

/// Everything KVM holds for one vCPU, as saved in a state file.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub regs: kvm_bindings::kvm_regs,
    pub sregs: kvm_bindings::kvm_sregs,
    pub xsave: kvm_bindings::kvm_xsave,
    pub xcrs: kvm_bindings::kvm_xcrs,
    pub msrs: Vec<kvm_bindings::kvm_msr_entry>,
    pub lapic: kvm_bindings::kvm_lapic_state,
    pub mp_state: kvm_bindings::kvm_mp_state,
    pub events: kvm_bindings::kvm_vcpu_events,
    pub debugregs: kvm_bindings::kvm_debugregs,
}

pub(super) const MSR_IA32_TSC: u32 = 0x10;
pub(super) const MSR_IA32_TSC_ADJUST: u32 = 0x3b;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// Reads everything KVM holds for a vCPU.
pub(super) fn capture_state(fd: &VcpuFd, id: u8, msr_list: &[u32]) -> Result<VcpuState> {
    Ok(VcpuState {
        id,
        regs: fd.get_regs().map_err(kvm("KVM_GET_REGS"))?,
        sregs: fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
        xsave: fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?,
        xcrs: fd.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?,
        msrs: read_msrs(fd, msr_list)?,
        lapic: fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?,
        mp_state: fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?,
        events: fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
        debugregs: fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
    })
}

/// Loads a saved state (validated by KVM as it goes: a state it refuses
/// is an error, never a half-applied vCPU that runs).
///
/// The order matters. The APIC base (in the special registers) before the
/// LAPIC, whose layout depends on the x2APIC bit. The TSC before anything
/// that is a TSC value. And the TSC-deadline MSR only after KVM_SET_LAPIC:
/// KVM ignores a deadline written while LVTT is not in TSC-deadline mode,
/// and KVM_SET_LAPIC clears the deadline when it switches LVTT into that
/// mode, so a deadline set earlier is lost and a guest idling on its next
/// timer tick never wakes (QEMU's kvm_put_tscdeadline_msr, last for the
/// same reason).
pub(super) fn apply_state(fd: &VcpuFd, id: u8, s: &VcpuState) -> Result<()> {
    if s.id != id {
        return Err(Error::Config(format!("state for vCPU {} given to vCPU {id}", s.id)));
    }
    fd.set_sregs(&s.sregs).map_err(kvm("KVM_SET_SREGS"))?;
    fd.set_regs(&s.regs).map_err(kvm("KVM_SET_REGS"))?;
    // SAFETY: the xsave area is a full kvm_xsave read back from KVM_GET_XSAVE.
    unsafe { fd.set_xsave(&s.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
    fd.set_xcrs(&s.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
    fd.set_debug_regs(&s.debugregs).map_err(kvm("KVM_SET_DEBUGREGS"))?;
    let (deadline, rest): (Vec<_>, Vec<_>) = s.msrs.iter().partition(|m| m.index == MSR_IA32_TSC_DEADLINE);
    write_msrs(fd, &rest)?;
    fd.set_lapic(&s.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    write_msrs(fd, &deadline)?;
    fd.set_mp_state(s.mp_state).map_err(kvm("KVM_SET_MP_STATE"))?;
    fd.set_vcpu_events(&s.events).map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

/// Writes MSRs; one KVM refuses is an error naming it.
fn write_msrs(fd: &VcpuFd, entries: &[kvm_bindings::kvm_msr_entry]) -> Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
    let msrs = Msrs::from_entries(entries).map_err(|_| Error::Config("too many MSRs in the state".into()))?;
    let n = fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if n != entries.len() {
        return Err(Error::Config(format!("KVM refused MSR {:#x} from the state", entries[n].index)));
    }
    Ok(())
}

/// Every MSR KVM lists as saveable that this vCPU can read.
fn read_msrs(fd: &VcpuFd, msr_list: &[u32]) -> Result<Vec<kvm_bindings::kvm_msr_entry>> {
    let mut out = Vec::new();
    let mut pending: Vec<u32> = msr_list.to_vec();
    while !pending.is_empty() {
        let entries: Vec<kvm_bindings::kvm_msr_entry> = pending.iter().map(|&index| kvm_bindings::kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| Error::Timeout("MSR list"))?;
        let n = fd.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..n]);
        // The MSR at `n` could not be read: skip it and go on.
        pending = pending.split_off((n + 1).min(pending.len()));
    }
    Ok(out)
}

/// One MSR as KVM holds it now.
pub(super) fn read_msr(fd: &VcpuFd, index: u32) -> Result<u64> {
    let mut m = Msrs::from_entries(&[kvm_bindings::kvm_msr_entry { index, ..Default::default() }]).map_err(|_| Error::Config("MSR list".into()))?;
    match fd.get_msrs(&mut m).map_err(kvm("KVM_GET_MSRS"))? {
        1 => Ok(m.as_slice()[0].data),
        _ => Err(Error::Config(format!("KVM cannot read MSR {index:#x}"))),
    }
}

/// A 32-bit LAPIC register of a KVM_GET_LAPIC image.
pub(super) fn lapic_reg(l: &kvm_bindings::kvm_lapic_state, off: usize) -> u32 {
    u32::from_le_bytes(std::array::from_fn(|i| l.regs[off + i] as u8))
}

pub(super) fn set_lapic_reg(l: &mut kvm_bindings::kvm_lapic_state, off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().into_iter().enumerate() {
        l.regs[off + i] = b as libc::c_char;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
    use kvm_ioctls::{Kvm, VmFd};

    use crate::boot;

    const APIC_SPIV: usize = 0xf0;
    const APIC_LVTT: usize = 0x320;
    const LVTT_TSC_DEADLINE: u32 = 2 << 17;

    fn kvm(test: &str) -> Option<Kvm> {
        match Kvm::new() {
            Ok(k) => Some(k),
            Err(e) if std::env::var("CI").as_deref() == Ok("true") => panic!("{test}: /dev/kvm is required under CI=true: {e}"),
            Err(e) => {
                eprintln!("SKIP {test}: /dev/kvm unavailable: {e}");
                None
            }
        }
    }

    fn new_vcpu(kvm: &Kvm) -> (VmFd, VcpuFd) {
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let fd = vm.create_vcpu(0).unwrap();
        let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        fd.set_cpuid2(&boot::cpuid::for_vcpu(&supported, 0, 1)).unwrap();
        (vm, fd)
    }

    fn msr(fd: &VcpuFd, index: u32) -> u64 {
        read_msr(fd, index).unwrap()
    }

    /// Arms the LAPIC timer in TSC-deadline mode far in the future, as a
    /// guest idling until its next tick has it; returns the deadline.
    fn arm_deadline_timer(fd: &VcpuFd) -> u64 {
        let mut l = fd.get_lapic().unwrap();
        let spiv = lapic_reg(&l, APIC_SPIV);
        set_lapic_reg(&mut l, APIC_SPIV, spiv | 0x1ff);
        set_lapic_reg(&mut l, APIC_LVTT, 0xec | LVTT_TSC_DEADLINE);
        fd.set_lapic(&l).unwrap();
        let deadline = msr(fd, MSR_IA32_TSC) + (1 << 50);
        write_msrs(fd, &[kvm_bindings::kvm_msr_entry { index: MSR_IA32_TSC_DEADLINE, data: deadline, ..Default::default() }]).unwrap();
        assert_eq!(msr(fd, MSR_IA32_TSC_DEADLINE), deadline, "the timer did not arm");
        deadline
    }

    /// A restored vCPU has the timer the saved one had armed. Loading the
    /// MSRs before the LAPIC lost it (found by the real-Linux mid-boot
    /// snapshot test: the restored kernel idled forever).
    #[test]
    fn an_armed_tsc_deadline_timer_survives_save_and_restore() {
        let Some(kvm) = kvm("an_armed_tsc_deadline_timer_survives_save_and_restore") else { return };
        let msr_list = kvm.get_msr_index_list().unwrap().as_slice().to_vec();
        assert!(msr_list.contains(&MSR_IA32_TSC_DEADLINE), "KVM does not list the TSC-deadline MSR");
        let (_vm, fd) = new_vcpu(&kvm);
        let deadline = arm_deadline_timer(&fd);
        let saved = capture_state(&fd, 0, &msr_list).unwrap();
        let (_vm2, fd2) = new_vcpu(&kvm);
        apply_state(&fd2, 0, &saved).unwrap();
        assert_eq!(lapic_reg(&fd2.get_lapic().unwrap(), APIC_LVTT), 0xec | LVTT_TSC_DEADLINE);
        assert_eq!(msr(&fd2, MSR_IA32_TSC_DEADLINE), deadline, "the restored vCPU lost its armed timer");
    }

    /// Loading the power-on state (what a reset does) disarms a timer the
    /// last boot left armed.
    #[test]
    fn the_power_on_state_disarms_the_last_boots_timer() {
        let Some(kvm) = kvm("the_power_on_state_disarms_the_last_boots_timer") else { return };
        let msr_list = kvm.get_msr_index_list().unwrap().as_slice().to_vec();
        let (_vm, fd) = new_vcpu(&kvm);
        let power_on = capture_state(&fd, 0, &msr_list).unwrap();
        arm_deadline_timer(&fd);
        apply_state(&fd, 0, &power_on).unwrap();
        assert_eq!(lapic_reg(&fd.get_lapic().unwrap(), APIC_LVTT), lapic_reg(&power_on.lapic, APIC_LVTT));
        assert_eq!(msr(&fd, MSR_IA32_TSC_DEADLINE), 0, "a reset left the timer armed");
    }
}
