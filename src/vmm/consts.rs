//! x86 architectural numbers the VMM programs: MSR indices and values, and local APIC
//! registers. Names follow Linux (`arch/x86/include/asm/msr-index.h`, `apicdef.h`);
//! each line cites the name in the Intel SDM (volume 4 for MSRs, volume 3A's APIC
//! chapter for the local APIC) and in Linux.

use std::ops::Range;

// MSR indices.

/// Time-stamp counter (SDM `IA32_TIME_STAMP_COUNTER`; Linux `MSR_IA32_TSC`).
pub const MSR_IA32_TSC: u32 = 0x10;
/// Local APIC base address and enables (SDM `IA32_APIC_BASE`; Linux `MSR_IA32_APICBASE`).
pub const MSR_IA32_APICBASE: u32 = 0x1b;
/// SYSENTER code segment (SDM `IA32_SYSENTER_CS`; Linux `MSR_IA32_SYSENTER_CS`).
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
/// SYSENTER stack pointer (SDM `IA32_SYSENTER_ESP`; Linux `MSR_IA32_SYSENTER_ESP`).
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
/// SYSENTER entry point (SDM `IA32_SYSENTER_EIP`; Linux `MSR_IA32_SYSENTER_EIP`).
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
/// Miscellaneous processor features (SDM `IA32_MISC_ENABLE`; Linux `MSR_IA32_MISC_ENABLE`).
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// Page attribute table (SDM `IA32_PAT`; Linux `MSR_IA32_CR_PAT`).
pub const MSR_IA32_CR_PAT: u32 = 0x277;
/// Default memory type and MTRR enables (SDM `IA32_MTRR_DEF_TYPE`; Linux `MSR_MTRRdefType`).
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// TSC-deadline timer target (SDM `IA32_TSC_DEADLINE`; Linux `MSR_IA32_TSC_DEADLINE`).
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// The x2APIC registers, one MSR each, from Linux `APIC_BASE_MSR` (SDM: x2APIC register
/// address space); every one KVM lists lies in this range.
pub const X2APIC_MSRS: Range<u32> = 0x800..0x900;
/// SYSCALL/SYSRET segments (SDM `IA32_STAR`; Linux `MSR_STAR`).
pub const MSR_STAR: u32 = 0xc000_0081;
/// 64-bit SYSCALL entry point (SDM `IA32_LSTAR`; Linux `MSR_LSTAR`).
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// Compatibility-mode SYSCALL entry point (AMD; Linux `MSR_CSTAR`).
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// RFLAGS mask on SYSCALL (SDM `IA32_FMASK`; Linux `MSR_SYSCALL_MASK`).
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// GS base that SWAPGS swaps in (SDM `IA32_KERNEL_GS_BASE`; Linux `MSR_KERNEL_GS_BASE`).
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// The value RDTSCP returns in ECX (SDM `IA32_TSC_AUX`; Linux `MSR_TSC_AUX`).
pub const MSR_TSC_AUX: u32 = 0xc000_0103;
/// kvmclock wall clock (Linux `Documentation/virt/kvm/x86/msr.rst`, `MSR_KVM_WALL_CLOCK_NEW`).
pub const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
/// kvmclock per-vCPU time (Linux `msr.rst`, `MSR_KVM_SYSTEM_TIME_NEW`).
pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;

// MSR values.

/// `IA32_MISC_ENABLE` bit 0, fast string operations (Linux `MSR_IA32_MISC_ENABLE_FAST_STRING`).
pub const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1 << 0;
/// `IA32_MTRR_DEF_TYPE` bit 11, MTRRs enabled (SDM flag `E`; Linux `MTRR_DEF_TYPE_E`).
pub const MTRR_DEF_TYPE_E: u64 = 1 << 11;
/// Memory type write-back in an MTRR type field (SDM `WB`, 06H; Linux `MTRR_TYPE_WRBACK`).
pub const MTRR_TYPE_WRBACK: u64 = 6;
/// `IA32_EFER` bit 0, SYSCALL enable (SDM `IA32_EFER.SCE`; Linux `EFER_SCE`).
pub const EFER_SCE: u64 = 1 << 0;
/// `IA32_EFER` bit 8, long mode enable (SDM `IA32_EFER.LME`; Linux `EFER_LME`).
pub const EFER_LME: u64 = 1 << 8;
/// `IA32_EFER` bit 10, long mode active (SDM `IA32_EFER.LMA`; Linux `EFER_LMA`).
pub const EFER_LMA: u64 = 1 << 10;

// Local APIC registers: byte offsets into the APIC page (and `kvm_lapic_state::regs`).

/// LVT LINT0 register (SDM `LVT LINT0 Register`; Linux `APIC_LVT0`).
pub const APIC_LVT0: usize = 0x350;
/// LVT LINT1 register (SDM `LVT LINT1 Register`; Linux `APIC_LVT1`).
pub const APIC_LVT1: usize = 0x360;

// Fields of an LVT register (SDM: Local Vector Table).

/// Delivery mode, bits 8..=10 (Linux `APIC_MODE_MASK`).
pub const APIC_MODE_MASK: u32 = 0x700;
/// The delivery mode field's first bit (Linux `SET_APIC_DELIVERY_MODE` shifts by it).
pub const APIC_MODE_SHIFT: u32 = 8;
/// Delivery mode NMI, before the shift (SDM `100b`; Linux `APIC_MODE_NMI`).
pub const APIC_MODE_NMI: u32 = 0b100;
/// Delivery mode ExtINT, before the shift (SDM `111b`; Linux `APIC_MODE_EXTINT`).
pub const APIC_MODE_EXTINT: u32 = 0b111;
/// Mask bit 16: the LVT entry delivers nothing (Linux `APIC_LVT_MASKED`).
pub const APIC_LVT_MASKED: u32 = 1 << 16;
