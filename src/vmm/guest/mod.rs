//! The built-in guest: a small x86-64 program ([`guest.S`](./guest.S), assembled by
//! `build.rs`) that runs a memory workload in ring 3, and the guest-physical layout the
//! VMM sets up for it (page tables, GDT, parameters, mailboxes).
//!
//! Guest RAM is `[0, 3 GiB)` and, for bigger guests, `[4 GiB, …)`: the gap between
//! ([`HOLE_GPA`]) is where a PC has its MMIO (LAPIC, IOAPIC, and the VMX TSS pages KVM
//! may place there), and where the built-in guest's port window lives. The guest's page
//! tables hide the gap: virtual addresses `[0, size)` are contiguous RAM (virtual =
//! physical below the hole, physical = virtual + 1 GiB above it; see [`ram_gpa`]), and
//! the hole itself is mapped at [`HOLE_VA`].
//!
//! Layout of the first MiB (virtual = physical):
//!
//! | address | what |
//! |---|---|
//! | `0x1000` [`GDT_GPA`] | GDT: null, kernel code/data, user data, user code, TSS |
//! | `0x3000` [`TSS_GPA`] | TSS (unused, but TR must point somewhere valid) |
//! | `0x4000` [`GENID_GPA`] | VM generation id (16 bytes), read by the guest at every report |
//! | `0x4100` [`ENTROPY_GPA`] | fresh entropy a fork writes; the guest reseeds from it on a new generation id |
//! | `0x5000` [`MAILBOX_GPA`] | per-vCPU report mailboxes, 64 bytes each |
//! | `0x6000` [`PARAMS_GPA`] | per-vCPU workload parameters, 64 bytes each |
//! | `0x8000` [`PML4_GPA`] | page tables: PML4 and PDPT |
//! | `0x10000` [`CODE_GPA`] | guest code |
//! | `0x20000` [`STACKS_GPA`] | per-vCPU stacks, [`STACK_SIZE`] each (ring-0 frame on top) |
//! | `0x80000` [`PD_GPA`] | page directories (2 MiB pages): one per GiB of RAM, one for the hole |
//! | `0x100000` [`AREA_GPA`] | workload area, split evenly between vCPUs, up to [`MAX_MEM`] |
//! | `0xd0000000` [`PIO_MMIO_BASE`] | port I/O window in the hole (no memory: MMIO exits), virtual [`PIO_MMIO_VA`] |

use std::fmt;
use std::str::FromStr;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

use crate::memory::GuestMemory;
use crate::vmm::consts::{EFER_LMA, EFER_LME, EFER_SCE};

/// The assembled guest program (flat binary, loaded at [`CODE_GPA`]).
pub const GUEST_BIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest.bin"));
/// Offset of the ring-0 entry (a lone `iretq`) in [`GUEST_BIN`].
pub const RING0_ENTRY: u64 = 0;
/// Offset of the ring-3 entry in [`GUEST_BIN`].
pub const USER_ENTRY: u64 = 0x10;

pub const GDT_GPA: u64 = 0x1000;
pub const TSS_GPA: u64 = 0x3000;
/// Guest-physical address of the 16-byte VM generation id. The guest reads it at every
/// report; a fork writes a new id here so the child's reports show it.
pub const GENID_GPA: u64 = 0x4000;
/// Where a fork writes fresh entropy ([`ENTROPY_LEN`] bytes) beside the new generation id;
/// the guest mixes it into its random state when it sees a new generation id.
pub const ENTROPY_GPA: u64 = GENID_GPA + 0x100;
pub const ENTROPY_LEN: usize = 32;
pub const MAILBOX_GPA: u64 = 0x5000;
pub const PARAMS_GPA: u64 = 0x6000;
pub const PML4_GPA: u64 = 0x8000;
/// Page directories, one 4 KiB page per GiB of virtual address space mapped.
pub const PD_GPA: u64 = 0x80000;
pub const CODE_GPA: u64 = 0x10000;
pub const STACKS_GPA: u64 = 0x20000;
pub const STACK_SIZE: u64 = 0x4000;
/// Start of the workload area.
pub const AREA_GPA: u64 = 0x100000;
/// Start of the MMIO hole in guest-physical memory; RAM resumes at [`HOLE_END_GPA`].
pub const HOLE_GPA: u64 = 3 << 30;
pub const HOLE_END_GPA: u64 = 4 << 30;
/// Where the guest's page tables map the hole: right above the largest guest's RAM.
pub const HOLE_VA: u64 = MAX_MEM as u64;
/// Most guest memory: the RAM's virtual range must end below [`HOLE_VA`], and its page
/// directories fit between [`PD_GPA`] and [`AREA_GPA`].
pub const MAX_MEM: usize = 64 << 30;
/// Smallest guest memory: the fixed layout plus one page of workload area per vCPU.
pub const MIN_MEM: usize = 2 << 20;

/// Port the guest writes its vCPU index to after filling its mailbox (through the
/// [`PIO_MMIO_BASE`] window, like every port access of the guest).
pub const REPORT_PORT: u16 = 0x700;
/// Port the guest writes to when it has nothing to do (idle workload).
pub const IDLE_PORT: u16 = 0x701;

/// Selectors of the GDT built by [`setup`].
pub const KERNEL_CS: u16 = 0x08;
pub const KERNEL_DS: u16 = 0x10;
pub const USER_DS: u16 = 0x18 | 3;
pub const USER_CS: u16 = 0x20 | 3;
pub const TSS_SEL: u16 = 0x28;

/// RFLAGS at guest entry: reserved bit 1 only; interrupts stay disabled. (IOPL=3 would
/// allow ring-3 port I/O on hardware KVM, but PVM raises #GP anyway; see [`PIO_MMIO_BASE`].)
pub const ENTRY_RFLAGS: u64 = 0x2;

/// Port I/O over MMIO: a guest store of a byte to `PIO_MMIO_BASE + port` is an `out` of
/// that byte to `port` (and a load an `in`). Ring-3 code cannot do port I/O on PVM-based
/// KVM, but a store to guest-physical memory without a memory slot exits to the VMM from
/// any ring.
pub const PIO_MMIO_BASE: u64 = 0xd000_0000;
/// The guest-virtual address of [`PIO_MMIO_BASE`] (guest.S uses this one).
pub const PIO_MMIO_VA: u64 = HOLE_VA + (PIO_MMIO_BASE - HOLE_GPA);
/// Size of the port window (the whole 16-bit port space).
pub const PIO_MMIO_SIZE: u64 = 0x1_0000;

/// What the guest does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum Workload {
    /// Count in a register; report every `every` iterations.
    Count { every: u64 },
    /// Touch `mib` MiB of pages (split between vCPUs), sequentially or at random.
    Touch { mib: u64, random: bool, every: u64 },
    /// Report once, then park the vCPU (it reports again after each resume).
    Idle,
    /// Report once, then reset through the i8042 controller (the VM exits).
    Exit,
}

impl Workload {
    /// Iterations between reports by default: roughly every 50-100 ms at native speed.
    pub const COUNT_EVERY: u64 = 1 << 27;
    pub const TOUCH_EVERY: u64 = 1 << 24;
    pub const RAND_EVERY: u64 = 1 << 22;

    fn mode(&self) -> u64 {
        match self {
            Workload::Count { .. } => 0,
            Workload::Touch { random: false, .. } => 1,
            Workload::Touch { random: true, .. } => 2,
            Workload::Idle => 3,
            Workload::Exit => 4,
        }
    }

    fn every(&self) -> u64 {
        match *self {
            Workload::Count { every } | Workload::Touch { every, .. } => every.max(1),
            _ => 1,
        }
    }
}

impl Default for Workload {
    fn default() -> Self {
        Workload::Count { every: Workload::COUNT_EVERY }
    }
}

/// Error for a `--workload` that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("bad workload {0:?}: expected count[:EVERY], idle, exit or touch:MIB[:seq|rand][:EVERY]")]
pub struct BadWorkload(String);

impl FromStr for Workload {
    type Err = BadWorkload;
    fn from_str(s: &str) -> Result<Self, BadWorkload> {
        let bad = || BadWorkload(s.to_string());
        let parts: Vec<&str> = s.split(':').collect();
        let num = |p: &str| p.parse::<u64>().ok().filter(|&n| n > 0).ok_or_else(bad);
        Ok(match parts.as_slice() {
            ["count"] => Workload::Count { every: Workload::COUNT_EVERY },
            ["count", every] => Workload::Count { every: num(every)? },
            ["idle"] => Workload::Idle,
            ["exit"] => Workload::Exit,
            ["touch", mib, rest @ ..] => {
                let mib = num(mib)?;
                let (random, rest) = match rest {
                    ["seq", r @ ..] => (false, r),
                    ["rand", r @ ..] => (true, r),
                    r => (false, r),
                };
                let default_every = if random { Workload::RAND_EVERY } else { Workload::TOUCH_EVERY };
                let every = match rest {
                    [] => default_every,
                    [e] => num(e)?,
                    _ => return Err(bad()),
                };
                Workload::Touch { mib, random, every }
            }
            _ => return Err(bad()),
        })
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Workload::Count { every } => write!(f, "count:{every}"),
            Workload::Touch { mib, random, every } => {
                write!(f, "touch:{mib}:{}:{every}", if random { "rand" } else { "seq" })
            }
            Workload::Idle => f.write_str("idle"),
            Workload::Exit => f.write_str("exit"),
        }
    }
}

/// One report of one vCPU, read from its mailbox.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    pub vcpu: u32,
    /// Iterations done so far.
    pub counter: u64,
    /// Running checksum (see guest.S).
    pub checksum: u64,
    /// The generation id the guest read from [`GENID_GPA`].
    pub genid: [u64; 2],
    /// Reports this vCPU made so far, this one included.
    pub seq: u64,
    /// Times the guest saw a new generation id and reseeded its random state.
    #[serde(default)]
    pub reseeds: u64,
}

impl Report {
    /// Reads vCPU `vcpu`'s mailbox.
    pub fn read(mem: &GuestMemory, vcpu: u32) -> crate::memory::Result<Report> {
        let mut b = [0u8; 48];
        mem.read(MAILBOX_GPA + 64 * vcpu as u64, &mut b)?;
        let w = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        Ok(Report { vcpu, counter: w(0), checksum: w(1), genid: [w(2), w(3)], seq: w(4), reseeds: w(5) })
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "report vcpu={} seq={} counter={} checksum={:#018x} genid={:016x}{:016x} reseeds={}",
            self.vcpu, self.seq, self.counter, self.checksum, self.genid[1], self.genid[0], self.reseeds
        )
    }
}

/// Errors preparing guest memory.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(
        "guest memory of {0} bytes is outside the built-in guest's range ({MIN_MEM}..={MAX_MEM} bytes) or not laid out around the hole at 3 GiB"
    )]
    MemorySize(usize),
    #[error(
        "the workload needs {need} bytes of guest memory above {AREA_GPA:#x} but only {have} exist; give the VM more --mem"
    )]
    AreaTooSmall { need: u64, have: u64 },
    #[error(transparent)]
    Memory(#[from] crate::memory::Error),
}

fn seg(selector: u16, type_: u8, dpl: u8, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The GDT entries [`setup`] writes.
fn gdt() -> [u64; 7] {
    let tss_lo = 0x0000_8900_0000_0067u64 // present, type 9 (available 64-bit TSS), limit 0x67
        | ((TSS_GPA & 0xff_ffff) << 16)
        | (((TSS_GPA >> 24) & 0xff) << 56);
    [
        0,
        0x00af_9a00_0000_ffff, // kernel code, 64-bit
        0x00cf_9200_0000_ffff, // kernel data
        0x00cf_f200_0000_ffff, // user data (DPL 3)
        0x00af_fa00_0000_ffff, // user code, 64-bit (DPL 3)
        tss_lo,
        TSS_GPA >> 32,
    ]
}

/// The guest-physical RAM layout of a built-in guest with `size` bytes of memory:
/// `(guest address, bytes)` per region, for [`GuestMemory::new`].
pub fn ram_layout(size: usize) -> Vec<(u64, usize)> {
    let low = size.min(HOLE_GPA as usize);
    let mut layout = vec![(0, low)];
    if size > low {
        layout.push((HOLE_END_GPA, size - low));
    }
    layout
}

/// Guest memory for a built-in guest of `size` bytes, laid out by [`ram_layout`].
pub fn memory(size: usize, opts: &crate::memory::MemoryOptions) -> Result<GuestMemory, SetupError> {
    if !(MIN_MEM..=MAX_MEM).contains(&size) {
        return Err(SetupError::MemorySize(size));
    }
    Ok(GuestMemory::new(&ram_layout(size), opts)?)
}

/// The guest-physical address of guest-virtual RAM address `va` (see the module docs).
pub fn ram_gpa(va: u64) -> u64 {
    if va < HOLE_GPA { va } else { va + (HOLE_END_GPA - HOLE_GPA) }
}

/// Writes code, GDT, page tables and per-vCPU parameters into `mem` for `vcpus` vCPUs
/// running `workload`. Also clears the mailboxes and the generation id.
pub fn setup(mem: &GuestMemory, vcpus: u32, workload: Workload) -> Result<(), SetupError> {
    let size = mem.size();
    let layout: Vec<(u64, usize)> = mem.regions().iter().map(|r| (r.guest_addr(), r.size())).collect();
    if !(MIN_MEM..=MAX_MEM).contains(&size) || layout != ram_layout(size) {
        return Err(SetupError::MemorySize(size));
    }
    mem.write(CODE_GPA, GUEST_BIN)?;
    let gdt: Vec<u8> = gdt().iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write(GDT_GPA, &gdt)?;
    // PML4[0] -> PDPT; PDPT[g] -> the PD of virtual GiB g, whose entries map 2 MiB pages:
    // RAM for g below the size, the hole at HOLE_VA. Every level is present, writable
    // and user-accessible.
    let flags = 0x7u64;
    let pdpt = PML4_GPA + 0x1000;
    mem.write(PML4_GPA, &(pdpt | flags).to_le_bytes())?;
    let ram_gibs = (size as u64).div_ceil(1 << 30);
    let mapped = (0..ram_gibs).map(|g| (g << 30, ram_gpa(g << 30))).chain([(HOLE_VA, HOLE_GPA)]);
    for (i, (va, gpa)) in mapped.enumerate() {
        let pd = PD_GPA + 0x1000 * i as u64;
        mem.write(pdpt + 8 * (va >> 30), &(pd | flags).to_le_bytes())?;
        let entries: Vec<u8> =
            (0..512u64).flat_map(|j| ((gpa + (j << 21)) | flags | 0x80).to_le_bytes()).collect();
        mem.write(pd, &entries)?;
    }
    // Workload area: split page-aligned between vCPUs.
    let area_bytes = (size as u64).saturating_sub(AREA_GPA);
    let per_vcpu_pages = match workload {
        Workload::Touch { mib, .. } => {
            let need = mib << 20;
            if need > area_bytes {
                return Err(SetupError::AreaTooSmall { need, have: area_bytes });
            }
            (need >> 12) / vcpus as u64
        }
        _ => 1,
    }
    .max(1);
    for v in 0..vcpus as u64 {
        let params = [
            workload.mode(),
            AREA_GPA + v * per_vcpu_pages * 4096,
            per_vcpu_pages,
            workload.every(),
            0x9e37_79b9_7f4a_7c15 ^ (v + 1), // xorshift seed (never 0)
        ];
        let bytes: Vec<u8> = params.iter().flat_map(|p| p.to_le_bytes()).collect();
        mem.write(PARAMS_GPA + 64 * v, &bytes)?;
        mem.write(MAILBOX_GPA + 64 * v, &[0u8; 64])?;
    }
    mem.write(GENID_GPA, &[0u8; 16])?;
    Ok(())
}

/// Special registers for 64-bit long mode with the page tables and GDT of [`setup`].
/// With `user`, the vCPU starts in ring 3 (CS/SS DPL 3); otherwise in ring 0.
pub fn sregs(base: &kvm_sregs, user: bool) -> kvm_sregs {
    let mut s = *base;
    let (cs, ds) = if user {
        (seg(USER_CS, 0xb, 3, true), seg(USER_DS, 0x3, 3, false))
    } else {
        (seg(KERNEL_CS, 0xb, 0, true), seg(KERNEL_DS, 0x3, 0, false))
    };
    s.cs = cs;
    s.ds = ds;
    s.es = ds;
    s.fs = ds;
    s.gs = ds;
    s.ss = ds;
    s.tr = kvm_segment {
        base: TSS_GPA,
        limit: 0x67,
        selector: TSS_SEL,
        type_: 0xb,
        present: 1,
        s: 0,
        ..Default::default()
    };
    s.gdt.base = GDT_GPA;
    s.gdt.limit = (gdt().len() * 8 - 1) as u16;
    s.idt.base = 0;
    s.idt.limit = 0;
    s.cr3 = PML4_GPA;
    s.cr4 = 0x20 | 0x200 | 0x400; // PAE, OSFXSR, OSXMMEXCPT
    s.cr0 = 0x8005_0033; // PG, WP, NE, ET, MP, PE
    s.efer = EFER_LMA | EFER_LME | EFER_SCE;
    s
}

/// General registers at entry for vCPU `vcpu`. In ring-0 mode, the stack holds an
/// `iretq` frame to the ring-3 entry, which [`iret_frame`] writes.
pub fn regs(vcpu: u32, user: bool) -> kvm_regs {
    let v = vcpu as u64;
    let stack_top = STACKS_GPA + (v + 1) * STACK_SIZE;
    kvm_regs {
        rip: CODE_GPA + if user { USER_ENTRY } else { RING0_ENTRY },
        rsp: if user { stack_top - 64 } else { stack_top - 64 - 40 },
        rflags: if user { ENTRY_RFLAGS } else { 0x2 },
        rdi: v,
        rsi: PARAMS_GPA + 64 * v,
        rbp: MAILBOX_GPA + 64 * v,
        ..Default::default()
    }
}

/// Writes the `iretq` frame (RIP, CS, RFLAGS, RSP, SS) used by the ring-0 entry.
pub fn iret_frame(mem: &GuestMemory, vcpu: u32) -> crate::memory::Result<()> {
    let user = regs(vcpu, true);
    let frame = [CODE_GPA + USER_ENTRY, USER_CS as u64, ENTRY_RFLAGS, user.rsp, USER_DS as u64];
    let bytes: Vec<u8> = frame.iter().flat_map(|p| p.to_le_bytes()).collect();
    mem.write(regs(vcpu, false).rsp, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_parses_and_prints() {
        assert_eq!("count".parse::<Workload>().unwrap(), Workload::Count { every: Workload::COUNT_EVERY });
        assert_eq!(
            "touch:64".parse::<Workload>().unwrap(),
            Workload::Touch { mib: 64, random: false, every: Workload::TOUCH_EVERY }
        );
        assert_eq!(
            "touch:8:rand:100".parse::<Workload>().unwrap(),
            Workload::Touch { mib: 8, random: true, every: 100 }
        );
        for w in ["idle", "exit", "count:5", "touch:3:seq:7"] {
            let parsed: Workload = w.parse().unwrap();
            assert_eq!(parsed.to_string().parse::<Workload>().unwrap(), parsed);
        }
        for bad in ["", "touch", "touch:0", "touch:x", "count:0", "touch:1:seq:1:2", "sleep"] {
            assert!(bad.parse::<Workload>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn guest_binary_has_both_entries() {
        assert_eq!(GUEST_BIN[RING0_ENTRY as usize..][..2], [0x48, 0xcf], "iretq at offset 0");
        assert!(GUEST_BIN.len() > USER_ENTRY as usize + 16);
        assert!((GUEST_BIN.len() as u64) < STACKS_GPA - CODE_GPA);
        let window = PIO_MMIO_VA.to_le_bytes();
        assert!(GUEST_BIN.windows(8).any(|w| w == window), "guest.S's PIO_MMIO_VA matches");
        let entropy = (ENTROPY_GPA as u32).to_le_bytes();
        assert!(GUEST_BIN.windows(4).any(|w| w == entropy), "guest.S's ENTROPY_GPA matches");
    }

    #[test]
    fn setup_writes_layout_and_rejects_bad_sizes() {
        let mem = memory(8 << 20, &Default::default()).unwrap();
        setup(&mem, 2, "touch:4".parse().unwrap()).unwrap();
        let mut b = [0u8; 8];
        mem.read(PARAMS_GPA + 64 + 8, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), AREA_GPA + 512 * 4096, "vCPU 1 gets the second half");
        mem.read(PML4_GPA, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), PML4_GPA + 0x1007);
        assert!(matches!(setup(&mem, 1, "touch:8".parse().unwrap()), Err(SetupError::AreaTooSmall { .. })));
        let tiny = GuestMemory::with_size(1 << 20, &Default::default()).unwrap();
        assert!(matches!(setup(&tiny, 1, Workload::Idle), Err(SetupError::MemorySize(_))));
        assert!(matches!(memory(1 << 20, &Default::default()), Err(SetupError::MemorySize(_))));
        let flat = GuestMemory::with_size(MIN_MEM, &Default::default()).unwrap();
        assert!(setup(&flat, 1, Workload::Idle).is_ok(), "below the hole the layout is one region");
    }

    #[test]
    fn big_guests_skip_the_hole() {
        assert_eq!(ram_layout(1 << 30), vec![(0, 1 << 30)]);
        assert_eq!(ram_layout(5 << 30), vec![(0, 3 << 30), (4 << 30, 2 << 30)]);
        assert_eq!(ram_gpa(0x1000), 0x1000);
        assert_eq!(ram_gpa((3 << 30) + 0x2000), (4 << 30) + 0x2000);
        assert_eq!(PIO_MMIO_VA - HOLE_VA, PIO_MMIO_BASE - HOLE_GPA);
        // The page directories of the largest guest end below the workload area.
        assert!(PD_GPA + 0x1000 * ((MAX_MEM as u64 >> 30) + 1) <= AREA_GPA);
        // A 4 GiB guest with a one-region layout (RAM over the hole) is refused.
        let flat = GuestMemory::with_size(4 << 30, &Default::default()).unwrap();
        assert!(matches!(setup(&flat, 1, Workload::Idle), Err(SetupError::MemorySize(_))));
    }
}
