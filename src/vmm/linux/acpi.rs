//! ACPI tables for a Linux guest (built with rust-vmm's `acpi_tables`): RSDP → XSDT →
//! FADT (hardware-reduced: no PM timer, SCI or GPE blocks) → DSDT, and MADT.
//!
//! The DSDT holds COM1 (`PNP0501`, its port and IRQ) and two more devices:
//! - `\_SB.VGEN`, the VM Generation ID: `_HID "VMGENCTR"` and `_CID "VM_GEN_COUNTER"` (the
//!   two ids Linux's `drivers/virt/vmgenid.c` matches), and `ADDR`, a package of two
//!   integers (low and high 32 bits of the id's guest-physical address) that the driver
//!   evaluates to map the 16 bytes;
//! - `\_SB.GED`, a Generic Event Device (`ACPI0013`) owning one edge-triggered interrupt.
//!   When the VMM raises it, Linux's GED driver runs `_EVT(gsi)`, which does
//!   `Notify(\_SB.VGEN, 0x80)`: the vmgenid driver then copies the new id and, when it
//!   changed, calls `add_vmfork_randomness`, which reseeds the kernel's RNG.

use acpi_tables::Aml;
use acpi_tables::aml::{self, Path};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;

use super::{ACPI_END, IOAPIC_ADDR, LAPIC_ADDR, LinuxMachine, RSDP_GPA};
use crate::memory::GuestMemory;

const OEM_ID: [u8; 6] = *b"VMFORK";

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// The DSDT's AML: the VMGenID device and the GED that notifies it.
pub fn dsdt_aml(m: &LinuxMachine) -> Vec<u8> {
    let mut out = Vec::new();
    let addr_lo = (m.genid_gpa & 0xffff_ffff) as u32;
    let addr_hi = (m.genid_gpa >> 32) as u32;
    let addr = aml::Package::new(vec![&addr_lo, &addr_hi]);
    aml::Device::new(
        "\\_SB_.VGEN".into(),
        vec![
            &aml::Name::new("_HID".into(), &"VMGENCTR"),
            &aml::Name::new("_CID".into(), &"VM_GEN_COUNTER"),
            &aml::Name::new("_DDN".into(), &"VM_Gen_Counter"),
            &aml::Name::new("ADDR".into(), &addr),
        ],
    )
    .to_aml_bytes(&mut out);
    // COM1. With a hardware-reduced FADT Linux has no legacy PIC and maps no ISA
    // interrupt by itself: the serial port's IRQ exists only as this device declares it
    // (the 8250 PNP driver then takes the port over from the legacy probe).
    let com_irq = aml::Interrupt::new(true, true, false, false, m.serial_gsi);
    let com_io = aml::IO::new(0x3f8, 0x3f8, 0, 8);
    let com_crs = aml::ResourceTemplate::new(vec![&com_io, &com_irq]);
    aml::Device::new(
        "\\_SB_.COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ONE),
            &aml::Name::new("_CRS".into(), &com_crs),
        ],
    )
    .to_aml_bytes(&mut out);
    let irq = aml::Interrupt::new(true, true, false, false, m.ged_gsi);
    let crs = aml::ResourceTemplate::new(vec![&irq]);
    let gsi = m.ged_gsi;
    let notify_value = 0x80u8;
    let vgen_path: Path = "\\_SB_.VGEN".into();
    let notify = aml::Notify::new(&vgen_path, &notify_value);
    let is_ours = aml::Equal::new(&aml::Arg(0), &gsi);
    let when = aml::If::new(&is_ours, vec![&notify]);
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&when]);
    aml::Device::new(
        "\\_SB_.GED_".into(),
        vec![
            &aml::Name::new("_HID".into(), &"ACPI0013"),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &crs),
            &evt,
        ],
    )
    .to_aml_bytes(&mut out);
    out
}

/// The MADT: one local APIC per vCPU, the IOAPIC, and LINT1 of every local APIC as NMI.
/// Flags say PC-AT compatible (the 8259 pair exists: KVM's in-kernel PIC).
fn madt(vcpus: u32) -> Sdt {
    let mut t = Sdt::new(*b"APIC", 36, 4, OEM_ID, *b"VMFORKMA", 1);
    t.append_slice(&LAPIC_ADDR.to_le_bytes());
    t.append_slice(&1u32.to_le_bytes()); // PCAT_COMPAT
    for i in 0..vcpus {
        // Processor local APIC: type 0, length 8, uid, APIC id, flags (enabled).
        t.append_slice(&[0, 8, i as u8, i as u8, 1, 0, 0, 0]);
    }
    // IOAPIC: type 1, length 12, id, reserved, address, GSI base 0.
    let mut io = vec![1, 12, vcpus as u8, 0];
    io.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    io.extend_from_slice(&0u32.to_le_bytes());
    t.append_slice(&io);
    // Local APIC NMI: type 4, length 6, every processor (0xff), flags 0, LINT1.
    t.append_slice(&[4, 6, 0xff, 0, 0, 1]);
    t
}

fn fadt(dsdt: u64) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, *b"VMFORKFA", 1)
        .dsdt_64(dsdt)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    // IA-PC boot architecture: no VGA (bit 2), no CMOS RTC (bit 5); no 8042 (bit 1 clear):
    // Linux then leaves the keyboard controller alone (reboot=k still uses its reset).
    f.iapc_boot_arch = ((1u16 << 2) | (1 << 5)).into();
    f.hypervisor_vendor_identity = u64::from_le_bytes(*b"VMFORK\0\0").into();
    bytes(&f.finalize())
}

/// Writes every table from [`RSDP_GPA`] up; returns the RSDP's address.
pub fn write_tables(mem: &GuestMemory, vcpus: u32, m: &LinuxMachine) -> Result<u64, crate::memory::Error> {
    let mut next = RSDP_GPA + 0x100;
    let mut place = |data: &[u8]| -> Result<u64, crate::memory::Error> {
        let at = next;
        assert!(at + data.len() as u64 <= ACPI_END, "ACPI tables overflow their area");
        mem.write(at, data)?;
        next = (at + data.len() as u64 + 15) & !15;
        Ok(at)
    };
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"VMFORKDS", 1);
    dsdt.append_slice(&dsdt_aml(m));
    let dsdt_at = place(dsdt.as_slice())?;
    let fadt_at = place(&fadt(dsdt_at))?;
    let madt_at = place(madt(vcpus).as_slice())?;
    let mut xsdt = XSDT::new(OEM_ID, *b"VMFORKXS", 1);
    xsdt.add_entry(fadt_at);
    xsdt.add_entry(madt_at);
    let xsdt_at = place(&bytes(&xsdt))?;
    mem.write(RSDP_GPA, &bytes(&Rsdp::new(OEM_ID, xsdt_at)))?;
    Ok(RSDP_GPA)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(t: &[u8]) -> bool {
        t.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_have_valid_checksums_and_name_the_vmgenid_ids() {
        let m = LinuxMachine::default();
        let madt = madt(2);
        assert!(checksum_ok(madt.as_slice()));
        assert_eq!(madt.as_slice().len(), 44 + 2 * 8 + 12 + 6);
        let f = fadt(0x1234);
        assert!(checksum_ok(&f));
        let aml = dsdt_aml(&m);
        let has = |s: &[u8]| aml.windows(s.len()).any(|w| w == s);
        assert!(has(b"VMGENCTR\0") && has(b"VM_GEN_COUNTER\0") && has(b"ACPI0013\0"));
        assert!(has(b"ADDR") && has(b"_EVT"));
    }
}
