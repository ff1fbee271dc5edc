//! Who pays for guest memory: bytes private to one memory vs shared with others.
//!
//! Two sources: the page map of our own mappings (which pages are anonymous, i.e. were
//! copied on write and belong to this mapping alone) and the files behind them (allocated
//! blocks of each memfd, shared when more than one memory maps the file). The page map is
//! read with the `PAGEMAP_SCAN` ioctl (Linux 6.7+), which returns ranges and skips
//! unpopulated page tables; older kernels fall back to reading `/proc/self/pagemap`.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::{Error, GuestMemory, Layout, MemFile, PAGE_SIZE, Region, Result};

/// Memory used by one [`GuestMemory`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    /// Bytes only this memory holds: its anonymous (copied-on-write) pages and files
    /// nobody else maps.
    pub private_bytes: u64,
    /// Bytes of files this memory maps together with other memories.
    pub shared_bytes: u64,
}

/// What `memory` costs, split into private and shared bytes.
pub fn usage(memory: &GuestMemory) -> Result<Usage> {
    let mut u = Usage::default();
    for region in memory.regions() {
        u.private_bytes += anon_bytes(region)?;
        for (file, refs_here) in files_of(region) {
            let bytes = file.allocated_bytes()?;
            // Every extent of every region holds one Arc, and `files_of` one more; any
            // Arc beyond those of this region belongs to another memory.
            if Arc::strong_count(&file) - 1 > refs_here {
                u.shared_bytes += bytes;
            } else {
                u.private_bytes += bytes;
            }
        }
    }
    Ok(u)
}

/// What `memory` has resident in this process's page tables, split as the kernel sees
/// it across processes (`/proc/self/smaps`): pages mapped by this process alone
/// (copied-on-write pages, a file of its own) are private; pages mapped by other
/// processes too (layers a forked parent and child both map) are shared. Pages of a
/// file that nobody maps at the moment are not counted.
pub fn resident_usage(memory: &GuestMemory) -> Result<Usage> {
    let mut u = Usage::default();
    for_each_smaps_field(memory, |field, kb| match field {
        "Private_Clean:" | "Private_Dirty:" => u.private_bytes += kb * 1024,
        "Shared_Clean:" | "Shared_Dirty:" => u.shared_bytes += kb * 1024,
        _ => {}
    })?;
    Ok(u)
}

/// The host's policy for huge pages in shmem (and so in memfds): `MADV_HUGEPAGE` gets
/// them only in modes `advise`, `always`, `within_size` and `force`.
pub const SHMEM_THP_KNOB: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";

/// The active mode of [`SHMEM_THP_KNOB`] (the bracketed word), or `None` where the
/// kernel has no such file (built without transparent huge pages).
pub fn shmem_thp_mode() -> Option<String> {
    let text = std::fs::read_to_string(SHMEM_THP_KNOB).ok()?;
    active_mode(&text).map(str::to_string)
}

fn active_mode(knob: &str) -> Option<&str> {
    knob.split_whitespace().find_map(|w| w.strip_prefix('[')?.strip_suffix(']'))
}

/// Why guest memory that asks for huge pages will get 4 KiB pages on this host, with
/// the command that changes it; `None` when huge pages will be given.
pub fn huge_pages_unavailable() -> Option<String> {
    why_no_huge_pages(shmem_thp_mode().as_deref())
}

fn why_no_huge_pages(mode: Option<&str>) -> Option<String> {
    match mode {
        Some("advise" | "always" | "within_size" | "force") => None,
        Some(mode) => Some(format!(
            "guest memory gets 4 KiB pages: {SHMEM_THP_KNOB} is \"{mode}\", so shmem ignores \
             MADV_HUGEPAGE and a fork of a large VM pauses it longer (page tables 512 times \
             larger); to get 2 MiB pages, as root: echo advise > {SHMEM_THP_KNOB}"
        )),
        None => Some(format!(
            "guest memory gets 4 KiB pages: this kernel has no {SHMEM_THP_KNOB} \
             (built without transparent huge pages)"
        )),
    }
}

/// How much of `memory`'s resident part this process maps with PMDs (2 MiB pages on
/// x86-64), as the kernel reports it in `/proc/self/smaps`: what a run really got, which
/// asking for huge pages does not guarantee (shmem THP `never`, fragmented memory, a
/// range cloned in 4 KiB pieces).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageSizes {
    /// `Rss` of the guest memory's mappings.
    pub resident_bytes: u64,
    /// Of that, mapped by PMDs: `ShmemPmdMapped` + `FilePmdMapped` + `AnonHugePages`.
    pub huge_bytes: u64,
}

impl PageSizes {
    /// The share of resident memory mapped with huge pages, in percent (0 when nothing is
    /// resident).
    pub fn huge_percent(&self) -> f64 {
        if self.resident_bytes == 0 {
            0.0
        } else {
            100.0 * self.huge_bytes as f64 / self.resident_bytes as f64
        }
    }
}

/// The page sizes `memory` is mapped with now: see [`PageSizes`].
pub fn page_sizes(memory: &GuestMemory) -> Result<PageSizes> {
    let mut p = PageSizes::default();
    for_each_smaps_field(memory, |field, kb| match field {
        "Rss:" => p.resident_bytes += kb * 1024,
        "ShmemPmdMapped:" | "FilePmdMapped:" | "AnonHugePages:" => p.huge_bytes += kb * 1024,
        _ => {}
    })?;
    Ok(p)
}

/// Calls `f(field, kB)` for each `kB` field of the `/proc/self/smaps` entries of the
/// mappings that lie inside `memory`'s regions (e.g. `("Rss:", 4)`).
fn for_each_smaps_field(memory: &GuestMemory, mut f: impl FnMut(&str, u64)) -> Result<()> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").map_err(Error::PageMap)?;
    let ranges: Vec<(usize, usize)> = memory
        .regions()
        .iter()
        .map(|r| (r.host_addr() as usize, r.host_addr() as usize + r.size()))
        .collect();
    let mut inside = false;
    for line in smaps.lines() {
        if let Some((span, _)) = line.split_once(' ') {
            if let Some((a, b)) = span.split_once('-') {
                if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                    inside = ranges.iter().any(|&(s, e)| a >= s && b <= e);
                    continue;
                }
            }
        }
        if !inside {
            continue;
        }
        let Some((field, rest)) = line.split_once(char::is_whitespace) else { continue };
        if let Some(Ok(kb)) = rest.trim().strip_suffix("kB").map(|v| v.trim().parse::<u64>()) {
            f(field, kb);
        }
    }
    Ok(())
}

/// Total memory used by a set of memories, counting each file once: what N clones cost
/// the host together.
pub fn footprint(memories: &[&GuestMemory]) -> Result<u64> {
    let mut files: HashMap<*const MemFile, Arc<MemFile>> = HashMap::new();
    let mut total = 0;
    for m in memories {
        for region in m.regions() {
            total += anon_bytes(region)?;
            for (file, _) in files_of(region) {
                files.insert(Arc::as_ptr(&file), file);
            }
        }
    }
    for f in files.values() {
        total += f.allocated_bytes()?;
    }
    Ok(total)
}

/// The distinct files a region maps, with how many references the region holds to each.
fn files_of(region: &Region) -> Vec<(Arc<MemFile>, usize)> {
    let mut out: Vec<(Arc<MemFile>, usize)> = Vec::new();
    let layout = region.layout();
    let files: Vec<&Arc<MemFile>> = match &*layout {
        Layout::File(f) => vec![f],
        Layout::Layers(image) => {
            image.extents.iter().map(|e| &e.file).chain(image.patches.iter().map(|p| p.file())).collect()
        }
    };
    for f in files {
        match out.iter_mut().find(|(g, _)| Arc::ptr_eq(f, g)) {
            Some((_, n)) => *n += 1,
            None => out.push((f.clone(), 1)),
        }
    }
    out
}

/// Bytes of anonymous memory resident in the region's mapping.
pub fn anon_bytes(region: &Region) -> Result<u64> {
    let runs = resident_anon_runs(region.host_addr() as usize, region.size())?;
    Ok(runs.iter().map(|(s, e)| (e - s) as u64).sum())
}

/// Runs `[start, end)` (offsets from `addr`) of pages in `[addr, addr + len)` that are
/// anonymous and present or swapped: in a `MAP_PRIVATE` file mapping, every page
/// written since it was mapped. In a range whose writes are tracked ([`super::dirty`]),
/// the uffd-WP markers of untouched pages look swapped too (Linux 6.18 reports them as
/// `PAGE_IS_SWAPPED`, and `/proc/self/pagemap` as `PM_SWAP`), so there the runs are a
/// superset; that is what a freeze needs (never less than was written), not a count.
pub fn anon_runs(addr: usize, len: usize) -> Result<Vec<(usize, usize)>> {
    scan(addr, len, true)
}

/// Like [`anon_runs`], present pages only: what a mapping holds in memory now, the
/// same with or without write tracking. Swapped-out pages are not counted.
pub fn resident_anon_runs(addr: usize, len: usize) -> Result<Vec<(usize, usize)>> {
    scan(addr, len, false)
}

fn scan(addr: usize, len: usize, swapped: bool) -> Result<Vec<(usize, usize)>> {
    use super::pagemap::{PAGE_IS_FILE, PAGE_IS_PRESENT, PAGE_IS_SWAPPED, Query};
    // Not a file page, and present (or swapped).
    let query = Query {
        inverted: PAGE_IS_FILE,
        all: PAGE_IS_FILE,
        any: PAGE_IS_PRESENT | if swapped { PAGE_IS_SWAPPED } else { 0 },
        ..Default::default()
    };
    match super::pagemap::scan(addr, len, query) {
        Ok(runs) => Ok(runs),
        Err(e) if e.raw_os_error() == Some(libc::ENOTTY) || e.raw_os_error() == Some(libc::EINVAL) => {
            scan_pagemap_file(addr, len, swapped)
        }
        Err(e) => Err(Error::PageMap(e)),
    }
}

fn scan_pagemap_file(addr: usize, len: usize, swapped: bool) -> Result<Vec<(usize, usize)>> {
    const PRESENT: u64 = 1 << 63;
    let swap_bit: u64 = if swapped { 1 << 62 } else { 0 };
    const FILE_OR_SHARED: u64 = 1 << 61;
    let pagemap = File::open("/proc/self/pagemap").map_err(Error::PageMap)?;
    let pages = len / PAGE_SIZE;
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut raw = vec![0u8; 8 * 4096];
    let mut page = 0;
    while page < pages {
        let batch = (pages - page).min(raw.len() / 8);
        let at = ((addr / PAGE_SIZE + page) * 8) as u64;
        pagemap.read_exact_at(&mut raw[..batch * 8], at).map_err(Error::PageMap)?;
        for i in 0..batch {
            let e = u64::from_ne_bytes(raw[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
            if e & (PRESENT | swap_bit) != 0 && e & FILE_OR_SHARED == 0 {
                let s = (page + i) * PAGE_SIZE;
                match runs.last_mut() {
                    Some(last) if last.1 == s => last.1 = s + PAGE_SIZE,
                    _ => runs.push((s, s + PAGE_SIZE)),
                }
            }
        }
        page += batch;
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryOptions;

    #[test]
    fn resident_usage_sees_own_pages_as_private() {
        let mem = GuestMemory::with_size(64 * PAGE_SIZE, &MemoryOptions::default()).unwrap();
        for p in 0..10 {
            mem.write((p * PAGE_SIZE) as u64, &[1]).unwrap();
        }
        let u = resident_usage(&mem).unwrap();
        assert_eq!(u, Usage { private_bytes: 10 * PAGE_SIZE as u64, shared_bytes: 0 });
    }

    #[test]
    fn page_sizes_count_what_the_kernel_mapped() {
        // 4 KiB pages: resident, none huge.
        let small = GuestMemory::with_size(1024 * PAGE_SIZE, &MemoryOptions::SMALL_PAGES).unwrap();
        for p in 0..10 {
            small.write((p * PAGE_SIZE) as u64, &[1]).unwrap();
        }
        assert_eq!(
            page_sizes(&small).unwrap(),
            PageSizes { resident_bytes: 10 * PAGE_SIZE as u64, huge_bytes: 0 }
        );
        // Asked for huge pages: whatever the host's shmem THP setting gives, the count
        // agrees with the kernel's own total for the mapping.
        let huge = GuestMemory::with_size(8 << 20, &MemoryOptions::HUGE_PAGES).unwrap();
        for at in (0..8 << 20).step_by(PAGE_SIZE) {
            huge.write(at as u64, &[1]).unwrap();
        }
        let p = page_sizes(&huge).unwrap();
        assert_eq!(p.resident_bytes, 8 << 20);
        assert_eq!(p.huge_bytes % (2 << 20), 0, "{p:?}");
        let thp =
            std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled").unwrap_or_default();
        if thp.contains("[never]") || thp.contains("[deny]") {
            assert_eq!(p.huge_bytes, 0, "shmem THP is off, yet {p:?}");
        } else {
            eprintln!("shmem THP {}: {:.0} % huge", thp.trim(), p.huge_percent());
        }
    }

    #[test]
    fn the_note_on_missing_huge_pages_names_the_mode_and_the_fix() {
        assert_eq!(active_mode("always within_size [advise] never deny force"), Some("advise"));
        assert_eq!(active_mode("always within_size advise [never] deny force\n"), Some("never"));
        assert_eq!(active_mode("garbage"), None);
        for mode in ["advise", "always", "within_size", "force"] {
            assert_eq!(why_no_huge_pages(Some(mode)), None, "{mode}");
        }
        for mode in ["never", "deny"] {
            let note = why_no_huge_pages(Some(mode)).unwrap();
            assert!(note.contains(&format!("\"{mode}\"")), "{note}");
            assert!(note.contains(&format!("echo advise > {SHMEM_THP_KNOB}")), "{note}");
        }
        assert!(why_no_huge_pages(None).unwrap().contains("without transparent huge pages"));
    }

    #[test]
    fn ioctl_and_file_scans_agree() {
        let mem = GuestMemory::with_size(64 * PAGE_SIZE, &MemoryOptions::default()).unwrap();
        let (child, _) = mem.clone_with(crate::memory::Strategy::Cow).unwrap();
        for page in [0usize, 1, 2, 7, 30, 63] {
            child.write((page * PAGE_SIZE) as u64, &[1]).unwrap();
        }
        let r = &child.regions()[0];
        let want = vec![
            (0, 3 * PAGE_SIZE),
            (7 * PAGE_SIZE, 8 * PAGE_SIZE),
            (30 * PAGE_SIZE, 31 * PAGE_SIZE),
            (63 * PAGE_SIZE, 64 * PAGE_SIZE),
        ];
        for swapped in [true, false] {
            assert_eq!(scan_pagemap_file(r.host_addr() as usize, r.size(), swapped).unwrap(), want);
            assert_eq!(scan(r.host_addr() as usize, r.size(), swapped).unwrap(), want);
        }
    }
}
