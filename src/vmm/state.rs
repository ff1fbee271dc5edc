//! Capture and restore of vCPU and VM state, serializable with serde (JSON is fine: a
//! state is a few tens of KiB), so another process can rebuild the VM.
//!
//! Order matters (the reasons are Firecracker's):
//! - capture per vCPU: MP_STATE first (reading it can change the LAPIC), then REGS,
//!   SREGS, XSAVE, XCRS, DEBUGREGS, LAPIC, CPUID, MSRS, and VCPU_EVENTS last;
//! - restore per vCPU: CPUID, MP_STATE, REGS, SREGS, XSAVE, XCRS, DEBUGREGS, LAPIC
//!   (needs the APIC base from SREGS), MSRS (TSC before TSC_DEADLINE), VCPU_EVENTS
//!   (REGS clears pending exceptions, so events come after it);
//! - VM level, after the vCPUs: PIT2, CLOCK, IRQCHIP (PIC master, PIC slave, IOAPIC);
//!   then the VMM's own device state (the serial port).

use kvm_bindings::{
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, Msrs,
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_state2,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{VcpuFd, VmFd};

use super::consts::{
    MSR_CSTAR, MSR_IA32_CR_PAT, MSR_IA32_MISC_ENABLE, MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_EIP,
    MSR_IA32_SYSENTER_ESP, MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE, MSR_KERNEL_GS_BASE, MSR_KVM_SYSTEM_TIME_NEW,
    MSR_KVM_WALL_CLOCK_NEW, MSR_LSTAR, MSR_STAR, MSR_SYSCALL_MASK, MSR_TSC_AUX,
};
use super::devices::SerialSnapshot;
use super::{Error, Result, VmConfig, kvm_err};

/// MSRs saved with a vCPU (those the host's KVM lists). TSC comes before TSC_DEADLINE.
pub const MSRS_TO_SAVE: &[u32] = &[
    MSR_IA32_TSC,
    MSR_IA32_SYSENTER_CS,
    MSR_IA32_SYSENTER_ESP,
    MSR_IA32_SYSENTER_EIP,
    MSR_IA32_MISC_ENABLE,
    MSR_IA32_CR_PAT,
    MSR_STAR,
    MSR_LSTAR,
    MSR_CSTAR,
    MSR_SYSCALL_MASK,
    MSR_KERNEL_GS_BASE,
    MSR_TSC_AUX,
    MSR_KVM_WALL_CLOCK_NEW,
    MSR_KVM_SYSTEM_TIME_NEW,
    MSR_IA32_TSC_DEADLINE, // last: needs the LAPIC and the TSC
];

/// Everything KVM holds about one vCPU.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct VcpuState {
    pub cpuid: CpuId,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: Option<kvm_xcrs>,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Msrs,
    pub events: kvm_vcpu_events,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &self.regs.rip)
            .field("msrs", &self.msrs.as_slice().len())
            .finish()
    }
}

impl VcpuState {
    /// Reads the state of a vCPU that is not running.
    pub fn capture(vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState> {
        let mp_state = vcpu.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?;
        let regs = vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let xsave = vcpu.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?;
        // Hosts without XCR0 (no XSAVE in the guest's CPUID) refuse this; then it has
        // nothing to save.
        let xcrs = vcpu.get_xcrs().ok();
        let debugregs = vcpu.get_debug_regs().map_err(kvm_err("KVM_GET_DEBUGREGS"))?;
        let lapic = vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
        let cpuid = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("KVM_GET_CPUID2"))?;
        let entries: Vec<kvm_msr_entry> =
            msr_indices.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| Error::MsrList(entries.len()))?;
        let n = vcpu.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
        if n != entries.len() {
            let failed = entries[n].index;
            return Err(Error::MsrRead(failed));
        }
        let events = vcpu.get_vcpu_events().map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
        Ok(VcpuState { cpuid, mp_state, regs, sregs, xsave, xcrs, debugregs, lapic, msrs, events })
    }

    /// Writes this state into a fresh vCPU.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<()> {
        vcpu.set_cpuid2(&self.cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        vcpu.set_mp_state(self.mp_state).map_err(kvm_err("KVM_SET_MP_STATE"))?;
        vcpu.set_regs(&self.regs).map_err(kvm_err("KVM_SET_REGS"))?;
        vcpu.set_sregs(&self.sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        // SAFETY: `self.xsave` is a complete kvm_xsave read by KVM_GET_XSAVE, which is
        // the buffer size KVM_SET_XSAVE reads.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
        if let Some(xcrs) = &self.xcrs {
            vcpu.set_xcrs(xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
        }
        vcpu.set_debug_regs(&self.debugregs).map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
        vcpu.set_lapic(&self.lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
        let n = vcpu.set_msrs(&self.msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
        if n != self.msrs.as_slice().len() {
            let failed = self.msrs.as_slice()[n].index;
            return Err(Error::StateMismatch(format!("KVM refused MSR {failed:#x}")));
        }
        vcpu.set_vcpu_events(&self.events).map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

/// Everything needed to rebuild a VM over its memory.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct VmState {
    pub config: VmConfig,
    pub memory_size: u64,
    pub vcpus: Vec<VcpuState>,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: Vec<kvm_irqchip>,
    /// The VMM's serial port.
    #[serde(default)]
    pub serial: SerialSnapshot,
}

const IRQCHIPS: [u32; 3] = [KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC];

impl VmState {
    /// Reads the VM-level state after the vCPUs' (`vcpus`).
    pub fn capture(vm: &VmFd, config: VmConfig, memory_size: u64, vcpus: Vec<VcpuState>) -> Result<VmState> {
        let pit = vm.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?;
        let mut clock = vm.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?;
        // Only the clock value is restorable; the other fields describe the host moment.
        clock.flags = 0;
        let mut irqchips = Vec::new();
        for id in IRQCHIPS {
            let mut c = kvm_irqchip { chip_id: id, ..Default::default() };
            vm.get_irqchip(&mut c).map_err(kvm_err("KVM_GET_IRQCHIP"))?;
            irqchips.push(c);
        }
        Ok(VmState { config, memory_size, vcpus, pit, clock, irqchips, serial: SerialSnapshot::default() })
    }

    /// Writes the VM-level state into a fresh VM whose vCPUs were restored.
    pub fn restore_vm(&self, vm: &VmFd) -> Result<()> {
        if self.vcpus.len() != self.config.vcpus as usize {
            return Err(Error::StateMismatch(format!(
                "{} vCPU states for a {}-vCPU VM",
                self.vcpus.len(),
                self.config.vcpus
            )));
        }
        vm.set_pit2(&self.pit).map_err(kvm_err("KVM_SET_PIT2"))?;
        vm.set_clock(&self.clock).map_err(kvm_err("KVM_SET_CLOCK"))?;
        for c in &self.irqchips {
            vm.set_irqchip(c).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        }
        Ok(())
    }

    /// The state as JSON.
    pub fn to_json(&self) -> serde_json::Result<String> {
        serde_json::to_string(self)
    }

    /// A state from [`VmState::to_json`].
    pub fn from_json(s: &str) -> serde_json::Result<VmState> {
        serde_json::from_str(s)
    }
}
