//! Per-vCPU CPUID from KVM_GET_SUPPORTED_CPUID.

use kvm_bindings::CpuId;

const LEAF_FEATURES: u32 = 1;
const LEAF_CACHE: u32 = 4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const ECX_TSC_DEADLINE: u32 = 1 << 24;

/// Adjusts the host-supported CPUID for vCPU `id` of `count`: APIC ids,
/// topology (one socket, `count` cores, one thread each), hypervisor bit.
pub fn for_vcpu(base: &CpuId, id: u8, count: u8) -> CpuId {
    let mut cpuid = base.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | u32::from(id) << 24 | u32::from(count) << 16;
                e.ecx |= ECX_HYPERVISOR | ECX_TSC_DEADLINE;
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE => {
                // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing - 1.
                e.eax = (e.eax & 0x3fff) | (u32::from(count.saturating_sub(1)) & 0x3f) << 26;
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                e.edx = u32::from(id);
                let core_bits = u32::BITS - u32::from(count.saturating_sub(1)).leading_zeros();
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = u32::from(count);
                        e.ecx = 2 << 8 | 1;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            _ => {}
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use kvm_bindings::kvm_cpuid_entry2;

    use super::*;

    #[test]
    fn apic_ids_and_topology() {
        let base = CpuId::from_entries(&[
            kvm_cpuid_entry2 { function: 1, ebx: 0xffff_0800, ..Default::default() },
            kvm_cpuid_entry2 { function: 0xb, index: 1, ..Default::default() },
        ])
        .unwrap();
        let c = for_vcpu(&base, 3, 4);
        let e = c.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_eq!(e[0].ebx & 0xffff, 0x0800);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_eq!(e[1].edx, 3);
        assert_eq!(e[1].ebx, 4);
        assert_eq!(e[1].eax, 2);
    }
}
