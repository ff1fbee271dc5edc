//! The `PAGEMAP_SCAN` ioctl of `/proc/self/pagemap` (Linux 6.7+): ranges of a mapping
//! whose pages fall in given categories, and, with [`WP_MATCHING`], write-protecting
//! them in the same walk. Two owners use it: [`super::accounting`] (which pages are
//! anonymous) and [`super::dirty`] (which pages were written since the last look).

use std::fs::File;
use std::os::fd::AsRawFd;

// Layout of `struct pm_scan_arg` and `struct page_region` (include/uapi/linux/fs.h).
#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: libc::c_ulong = 0xc060_6610;

/// Page categories (`PAGE_IS_*`).
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
pub const PAGE_IS_FILE: u64 = 1 << 2;
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;

/// Scan flags (`PM_SCAN_*`): write-protect the matching pages as they are reported,
/// and refuse unless the range is registered with an asynchronous uffd-WP descriptor.
pub const WP_MATCHING: u64 = 1 << 0;
pub const CHECK_WPASYNC: u64 = 1 << 1;

/// Which pages a scan reports: those whose categories, XORed with `inverted`, have
/// every bit of `all` and at least one bit of `any` (when `any` is not 0).
#[derive(Clone, Copy, Debug, Default)]
pub struct Query {
    pub flags: u64,
    pub inverted: u64,
    pub all: u64,
    pub any: u64,
}

/// Runs `[start, end)`, as offsets from `addr`, of the pages in `[addr, addr + len)`
/// that match `query`, merged where they touch.
pub fn scan(addr: usize, len: usize, query: Query) -> std::io::Result<Vec<(usize, usize)>> {
    let pagemap = File::open("/proc/self/pagemap")?;
    let mut buf = vec![PageRegion::default(); 1024];
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let end = (addr + len) as u64;
    let mut start = addr as u64;
    while start < end {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            flags: query.flags,
            start,
            end,
            vec: buf.as_mut_ptr() as u64,
            vec_len: buf.len() as u64,
            category_inverted: query.inverted,
            category_mask: query.all,
            category_anyof_mask: query.any,
            return_mask: query.all | query.any,
            ..Default::default()
        };
        // SAFETY: `arg` is a correctly sized pm_scan_arg whose `vec` points at `buf`, which
        // has room for `vec_len` page_region entries and outlives the call. With
        // WP_MATCHING the kernel also write-protects page table entries of our own
        // mappings, which changes no memory contents.
        let n = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // Seen on Linux 6.18: a call that reported every region up to `end` can still
        // set `walk_end` short of them, so the next call reports some again. Keep only
        // what lies beyond what was already covered.
        let mut covered = runs.last().map_or(0, |r| r.1);
        for r in &buf[..n as usize] {
            let (s, e) = ((r.start as usize - addr).max(covered), r.end as usize - addr);
            if s >= e {
                continue;
            }
            match runs.last_mut() {
                Some(last) if last.1 == s => last.1 = e,
                _ => runs.push((s, e)),
            }
            covered = e;
        }
        let next = arg.walk_end.max(addr as u64 + covered as u64);
        if next <= start {
            break;
        }
        start = next;
    }
    Ok(runs)
}
