//! Loading a Linux kernel and initrd into guest memory, and the vCPU state of the 64-bit
//! boot protocol (Documentation/arch/x86/boot.rst): long mode with identity-mapped page
//! tables, flat segments with `__BOOT_CS` 0x10 and `__BOOT_DS` 0x18, `rsi` pointing at
//! the zero page, entry at the kernel's 64-bit entry point (load address + 0x200 for a
//! bzImage, the ELF entry for a vmlinux).

use std::fs::File;

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{KernelLoader, bzimage::BzImage, elf::Elf};
use vm_memory::{ByteValued, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use super::{
    BootError, CMDLINE_GPA, CMDLINE_MAX, GDT_GPA, IDT_GPA, KERNEL_GPA, LOW_RAM_END, LinuxBoot, MAX_MEM,
    MIN_MEM, PML4_GPA, ZERO_PAGE_GPA,
};
use crate::memory::GuestMemory;
use crate::vmm::consts::{
    EFER_LMA, EFER_LME, MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING, MSR_MTRR_DEF_TYPE,
    MTRR_DEF_TYPE_E, MTRR_TYPE_WRBACK,
};

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const BOOT_CS: u16 = 0x10;
const BOOT_DS: u16 = 0x18;
const BOOT_TSS: u16 = 0x20;

/// Where the kernel landed.
pub struct Loaded {
    /// 64-bit entry point.
    pub entry: u64,
}

/// A vm-memory view of `mem` (borrowing its mappings), for linux-loader.
fn vm_memory_view(mem: &GuestMemory) -> Result<GuestMemoryMmap, BootError> {
    let mut regions = Vec::new();
    for r in mem.regions() {
        // SAFETY: the region's mapping is valid, readable and writable for its size and
        // outlives the view, which lives only while the kernel is loaded; the view does
        // not own the mapping (build_raw), so dropping it unmaps nothing.
        let mapping = unsafe {
            MmapRegion::build_raw(
                r.host_addr(),
                r.size(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
            )
        }
        .map_err(|e| BootError::LoaderView(e.into()))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr()))
            .ok_or_else(|| BootError::LoaderView("a region ends past the top of the address space".into()))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| BootError::LoaderView(e.into()))
}

/// Loads kernel, initrd, command line, zero page, page tables and GDT into `mem`.
pub fn load(mem: &GuestMemory, boot: &LinuxBoot) -> Result<Loaded, BootError> {
    let size = mem.size();
    // RAM below the 3 GiB hole: the kernel, initrd and boot data all go there.
    let low_end = match mem.regions().first() {
        Some(r) if r.guest_addr() == 0 && (MIN_MEM..=MAX_MEM).contains(&size) => r.size() as u64,
        _ => return Err(BootError::MemorySize(size)),
    };
    let read_err = |path: &std::path::Path| {
        let path = path.to_path_buf();
        move |error| BootError::Read { path, error }
    };
    let view = vm_memory_view(mem)?;
    let mut kernel = File::open(&boot.kernel).map_err(read_err(&boot.kernel))?;
    let himem = Some(GuestAddress(KERNEL_GPA));
    let (entry, kernel_end, hdr) = match BzImage::load(&view, None, &mut kernel, himem) {
        Ok(r) => (r.kernel_load.0 + 0x200, r.kernel_load.0 + r.kernel_end, r.setup_header),
        Err(bz) => match Elf::load(&view, None, &mut kernel, himem) {
            Ok(r) => (r.kernel_load.0, r.kernel_end, None),
            Err(elf) => {
                return Err(BootError::Kernel(boot.kernel.clone(), format!("bzImage: {bz}; ELF: {elf}")));
            }
        },
    };
    drop(view);

    let mut params = boot_params {
        hdr: hdr.unwrap_or(setup_header {
            boot_flag: 0xaa55,
            header: 0x5372_6448, // "HdrS"
            kernel_alignment: 0x100_0000,
            ..Default::default()
        }),
        ..Default::default()
    };
    params.hdr.type_of_loader = 0xff;

    let cmdline = boot.cmdline.as_bytes();
    let max =
        if params.hdr.cmdline_size > 0 { params.hdr.cmdline_size as usize } else { 255 }.min(CMDLINE_MAX - 1);
    if cmdline.len() > max {
        return Err(BootError::Cmdline(cmdline.len(), max));
    }
    let mut c = cmdline.to_vec();
    c.push(0);
    mem.write(CMDLINE_GPA, &c)?;
    params.hdr.cmd_line_ptr = CMDLINE_GPA as u32;
    params.hdr.cmdline_size = cmdline.len() as u32;

    if let Some(path) = &boot.initrd {
        let data = std::fs::read(path).map_err(read_err(path))?;
        let max_addr =
            if params.hdr.initrd_addr_max != 0 { params.hdr.initrd_addr_max as u64 } else { 0x37ff_ffff };
        let top = low_end.min(max_addr + 1);
        let at = top.checked_sub(data.len() as u64).map(|a| a & !0xfff);
        match at {
            Some(at) if at >= kernel_end => {
                mem.write(at, &data)?;
                params.hdr.ramdisk_image = at as u32;
                params.hdr.ramdisk_size = data.len() as u32;
            }
            _ => return Err(BootError::InitrdTooBig { size: data.len(), limit: top }),
        }
    }

    // Low RAM, the legacy area (ACPI tables, the generation id page), RAM up to the hole,
    // and every region above it.
    let mut e820 = vec![
        (0, LOW_RAM_END, E820_RAM),
        (LOW_RAM_END, KERNEL_GPA - LOW_RAM_END, E820_RESERVED),
        (KERNEL_GPA, low_end - KERNEL_GPA, E820_RAM),
    ];
    e820.extend(mem.regions().iter().skip(1).map(|r| (r.guest_addr(), r.size() as u64, E820_RAM)));
    if e820.len() > params.e820_table.len() {
        return Err(BootError::MemorySize(size));
    }
    for (i, &(addr, len, type_)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry { addr, size: len, r#type: type_ };
    }
    params.e820_entries = e820.len() as u8;
    params.acpi_rsdp_addr = super::RSDP_GPA;
    mem.write(ZERO_PAGE_GPA, params.as_slice())?;

    // Page tables: PML4[0] -> PDPT; PDPT[i] -> PD i; 4 PDs of 2 MiB pages map 4 GiB.
    let pdpt = PML4_GPA + 0x1000;
    mem.write(PML4_GPA, &(pdpt | 3).to_le_bytes())?;
    for i in 0..4u64 {
        let pd = pdpt + 0x1000 * (i + 1);
        mem.write(pdpt + 8 * i, &(pd | 3).to_le_bytes())?;
        let entries: Vec<u8> =
            (0..512u64).flat_map(|j| ((((i << 9) + j) << 21) | 0x83).to_le_bytes()).collect();
        mem.write(pd, &entries)?;
    }
    let gdt: Vec<u8> = gdt().iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write(GDT_GPA, &gdt)?;
    mem.write(IDT_GPA, &0u64.to_le_bytes())?;
    Ok(Loaded { entry })
}

/// Null, null, 64-bit code (0x10), data (0x18), TSS (0x20).
fn gdt() -> [u64; 5] {
    [0, 0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x0080_8b00_0000_ffff]
}

fn seg(selector: u16, type_: u8, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        ..Default::default()
    }
}

/// Special registers at the 64-bit entry.
pub fn sregs(base: &kvm_sregs) -> kvm_sregs {
    let mut s = *base;
    s.cs = seg(BOOT_CS, 0xb, true);
    let ds = seg(BOOT_DS, 0x3, false);
    s.ds = ds;
    s.es = ds;
    s.fs = ds;
    s.gs = ds;
    s.ss = ds;
    s.tr = kvm_segment {
        base: 0,
        limit: 0xfffff,
        selector: BOOT_TSS,
        type_: 0xb,
        present: 1,
        ..Default::default()
    };
    s.gdt.base = GDT_GPA;
    s.gdt.limit = (gdt().len() * 8 - 1) as u16;
    s.idt.base = IDT_GPA;
    s.idt.limit = 7;
    s.cr3 = PML4_GPA;
    s.cr4 = 0x20; // PAE
    s.cr0 = 0x8000_0011; // PG, ET, PE
    s.efer = EFER_LMA | EFER_LME;
    s
}

/// General registers at the 64-bit entry.
pub fn regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: super::BOOT_STACK,
        rbp: super::BOOT_STACK,
        rsi: ZERO_PAGE_GPA,
        rflags: 0x2,
        ..Default::default()
    }
}

/// x87 and SSE control words at reset.
pub fn fpu() -> kvm_fpu {
    kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() }
}

/// MSRs the boot vCPU starts with: fast strings on, MTRRs enabled with write-back default.
pub const BOOT_MSRS: &[(u32, u64)] = &[
    (MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
    (MSR_MTRR_DEF_TYPE, MTRR_DEF_TYPE_E | MTRR_TYPE_WRBACK),
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryOptions;

    /// A bzImage with a valid setup header and a page of payload: enough to load.
    fn tiny_bzimage(path: &std::path::Path) {
        let setup_sects = 4u8;
        let hdr = setup_header {
            setup_sects,
            boot_flag: 0xaa55,
            header: 0x5372_6448,
            version: 0x020f,
            loadflags: 1,
            code32_start: 0x10_0000,
            initrd_addr_max: 0x7fff_ffff,
            kernel_alignment: 0x20_0000,
            cmdline_size: 2048,
            ..Default::default()
        };
        let mut image = vec![0u8; (setup_sects as usize + 1) * 512 + 4096];
        image[0x1f1..0x1f1 + std::mem::size_of::<setup_header>()].copy_from_slice(hdr.as_slice());
        std::fs::write(path, image).unwrap();
    }

    #[test]
    fn ram_above_the_hole_is_in_the_e820_map_and_the_initrd_stays_below_it() {
        let mem = crate::vmm::guest::memory(5 << 30, &MemoryOptions::default()).unwrap();
        let dir = std::env::temp_dir().join(format!("vmfork-e820-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (kernel, initrd) = (dir.join("bzImage"), dir.join("initrd"));
        tiny_bzimage(&kernel);
        std::fs::write(&initrd, vec![7u8; 1 << 20]).unwrap();
        let boot = LinuxBoot { kernel, initrd: Some(initrd), cmdline: "console=ttyS0".into() };
        let loaded = load(&mem, &boot);
        std::fs::remove_dir_all(&dir).unwrap();
        loaded.unwrap();
        let mut params = boot_params::default();
        mem.read(ZERO_PAGE_GPA, params.as_mut_slice()).unwrap();
        let e820: Vec<(u64, u64, u32)> = params.e820_table[..params.e820_entries as usize]
            .iter()
            .map(|e| (e.addr, e.size, e.r#type))
            .collect();
        assert_eq!(
            e820,
            vec![
                (0, LOW_RAM_END, E820_RAM),
                (LOW_RAM_END, KERNEL_GPA - LOW_RAM_END, E820_RESERVED),
                (KERNEL_GPA, (3 << 30) - KERNEL_GPA, E820_RAM),
                (4 << 30, 2 << 30, E820_RAM),
            ]
        );
        let (at, len) = (params.hdr.ramdisk_image as u64, params.hdr.ramdisk_size as u64);
        assert_eq!(len, 1 << 20);
        assert!(at + len <= 3 << 30, "initrd at {at:#x} crosses into the hole");
    }

    #[test]
    fn rejects_a_file_that_is_no_kernel() {
        let mem = GuestMemory::with_size(64 << 20, &MemoryOptions::default()).unwrap();
        let dir = std::env::temp_dir().join(format!("vmfork-notakernel-{}", std::process::id()));
        std::fs::write(&dir, vec![0u8; 8192]).unwrap();
        let boot = LinuxBoot { kernel: dir.clone(), initrd: None, cmdline: "x".into() };
        let err = load(&mem, &boot).err().unwrap().to_string();
        std::fs::remove_file(&dir).unwrap();
        assert!(err.contains("neither a bzImage nor an ELF"), "{err}");
    }
}
