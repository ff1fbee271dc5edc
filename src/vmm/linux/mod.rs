//! A stock Linux guest: bzImage (or ELF vmlinux) direct boot through the 64-bit boot
//! protocol ([`boot`]), ACPI tables with a VMGenID device whose changes are announced
//! through an ACPI Generic Event Device ([`acpi`]), and the machine facts a fork needs
//! to carry to the child ([`LinuxMachine`]).
//!
//! Guest-physical layout:
//!
//! | address | what |
//! |---|---|
//! | `0x500` [`GDT_GPA`] | boot GDT (null, null, code 0x10, data 0x18, TSS 0x20) |
//! | `0x520` [`IDT_GPA`] | empty IDT |
//! | `0x7000` [`ZERO_PAGE_GPA`] | `boot_params` (the "zero page") |
//! | `0x9000` [`PML4_GPA`] | page tables: PML4, PDPT, 4 PDs identity-mapping 4 GiB in 2 MiB pages |
//! | `0x20000` [`CMDLINE_GPA`] | kernel command line |
//! | `0x9f000` [`GENID_GPA`] | VMGenID: the 16-byte generation id (reserved in the e820 map) |
//! | `0xe0000` [`RSDP_GPA`] | ACPI RSDP, then XSDT, FADT, MADT, DSDT (reserved) |
//! | `0x100000` [`KERNEL_GPA`] | the kernel; the initrd goes as high as the kernel allows |
//!
//! RAM is `[0, 0x9f000)`, `[1 MiB, min(size, 3 GiB))`, and the rest of `size` from
//! 4 GiB up (`guest::ram_layout`, as for the built-in guest): the 3–4 GiB hole holds the
//! IOAPIC (`0xfec00000`) and LAPIC (`0xfee00000`). The initrd stays below the hole.

pub mod acpi;
pub mod boot;

use std::path::PathBuf;

pub const GDT_GPA: u64 = 0x500;
pub const IDT_GPA: u64 = 0x520;
pub const ZERO_PAGE_GPA: u64 = 0x7000;
pub const BOOT_STACK: u64 = 0x8ff0;
pub const PML4_GPA: u64 = 0x9000;
pub const CMDLINE_GPA: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 0x10000;
/// End of low RAM; from here to 1 MiB is reserved.
pub const LOW_RAM_END: u64 = 0x9f000;
/// The VMGenID buffer: a reserved page, so Linux maps it (`memremap`) but never
/// allocates it.
pub const GENID_GPA: u64 = 0x9f000;
pub const RSDP_GPA: u64 = 0xe0000;
pub const ACPI_END: u64 = 0x10_0000;
pub const KERNEL_GPA: u64 = 0x10_0000;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// COM1's interrupt line.
pub const SERIAL_GSI: u32 = 4;
/// The Generic Event Device's interrupt: raising it makes Linux run the GED's `_EVT`,
/// which notifies the VMGenID device (0x80), so the vmgenid driver rereads the id.
pub const GED_GSI: u32 = 5;
/// Most guest memory (as for the built-in guest, laid out by `guest::ram_layout`: RAM
/// up to the 3 GiB hole, the rest from 4 GiB on).
pub const MAX_MEM: usize = crate::vmm::guest::MAX_MEM;
/// Least guest memory worth trying.
pub const MIN_MEM: usize = 64 << 20;

/// The default kernel command line: serial console, reset through the keyboard
/// controller (the VM exits), no PCI (there is none), panic reboots at once.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off i8042.noaux";

/// What to boot.
#[derive(Clone, Debug)]
pub struct LinuxBoot {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
}

/// The machine a Linux guest runs on, as far as a restored copy must know it (it travels
/// in [`super::VmConfig`], so a fork child builds the same devices).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LinuxMachine {
    /// Where the 16-byte VM generation id lives.
    pub genid_gpa: u64,
    /// Interrupt that announces a new generation id.
    pub ged_gsi: u32,
    /// COM1's interrupt.
    pub serial_gsi: u32,
}

impl Default for LinuxMachine {
    fn default() -> Self {
        LinuxMachine { genid_gpa: GENID_GPA, ged_gsi: GED_GSI, serial_gsi: SERIAL_GSI }
    }
}

/// Errors of booting Linux.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(
        "guest memory of {0} bytes is outside what a Linux guest gets here ({MIN_MEM}..={MAX_MEM} bytes)"
    )]
    MemorySize(usize),
    #[error("cannot read {path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("{0} is neither a bzImage nor an ELF vmlinux: {1}")]
    Kernel(PathBuf, String),
    #[error("the initrd ({size} bytes) does not fit in guest memory below {limit:#x} above the kernel")]
    InitrdTooBig { size: usize, limit: u64 },
    /// Guest memory could not be shown to linux-loader as vm-memory regions.
    #[error("cannot map guest memory for the kernel loader: {0}")]
    LoaderView(Box<dyn std::error::Error + Send + Sync>),
    #[error("the kernel command line is too long ({0} bytes; at most {1})")]
    Cmdline(usize, usize),
    #[error(transparent)]
    Memory(#[from] crate::memory::Error),
}

/// Why a stock Linux guest cannot run here, or its files are missing.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error("/dev/kvm is absent")]
    NoKvm,
    #[error("this host's KVM is PVM-based (kvm_pvm), which cannot run a stock Linux guest")]
    Pvm,
    #[error("the CPU has no VMX/SVM: this KVM is not hardware-assisted and cannot run a stock Linux guest")]
    NoHardwareVirt,
    #[error("no initramfs in {0} (run qemu-testbed/linux-guest)")]
    NoInitramfs(PathBuf),
    #[error("{0} is missing (run qemu-testbed/linux-guest)")]
    Missing(PathBuf),
}

/// Whether this host's KVM can run a stock Linux guest, and if not, why. PVM-based KVM
/// (the `kvm_pvm` module, no VMX/SVM in the CPU flags) runs ring-3 code only: Linux dies
/// in the instruction emulator early in boot.
pub fn host_can_boot_linux() -> Result<(), Unavailable> {
    if !std::path::Path::new("/dev/kvm").exists() {
        return Err(Unavailable::NoKvm);
    }
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        return Err(Unavailable::Pvm);
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if !hw {
        return Err(Unavailable::NoHardwareVirt);
    }
    Ok(())
}

/// Kernel and initrd of the reference guest that `qemu-testbed/linux-guest` builds:
/// `$VMFORK_LINUX_KERNEL` / `$VMFORK_LINUX_INITRD`, else the newest in its cache
/// (`$VMFORK_CACHE/linux-guest`), or why they are missing.
pub fn reference_guest_files() -> Result<(PathBuf, PathBuf), Unavailable> {
    let cache = reference_guest_cache();
    let kernel = std::env::var_os("VMFORK_LINUX_KERNEL").map_or_else(|| cache.join("vmlinuz"), PathBuf::from);
    let initrd = match std::env::var_os("VMFORK_LINUX_INITRD") {
        Some(p) => PathBuf::from(p),
        None => std::fs::read_dir(&cache)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("initramfs-"))
            .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
            .map(|e| e.path())
            .ok_or_else(|| Unavailable::NoInitramfs(cache.clone()))?,
    };
    for f in [&kernel, &initrd] {
        if !f.exists() {
            return Err(Unavailable::Missing(f.clone()));
        }
    }
    Ok((kernel, initrd))
}

/// Where `qemu-testbed/linux-guest` keeps the reference guest.
fn reference_guest_cache() -> PathBuf {
    PathBuf::from(std::env::var_os("VMFORK_CACHE").unwrap_or_else(|| "/var/cache/vmfork-testbed".into()))
        .join("linux-guest")
}

/// The reference guest's kernel as an ELF `vmlinux` (unpacked from its bzImage by
/// `qemu-testbed/linux-guest`): `$VMFORK_LINUX_VMLINUX`, else the testbed cache.
pub fn reference_vmlinux() -> Result<PathBuf, Unavailable> {
    let path = std::env::var_os("VMFORK_LINUX_VMLINUX")
        .map_or_else(|| reference_guest_cache().join("vmlinux"), PathBuf::from);
    if path.exists() { Ok(path) } else { Err(Unavailable::Missing(path)) }
}
