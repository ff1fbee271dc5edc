//! `copy`: the eager baseline. The child gets a new memfd holding a full copy.
//!
//! Only pages that hold data are copied: for a region backed by one file, its holes
//! (`SEEK_HOLE`) stay holes in the child. The copy is split over all CPUs. Without huge
//! pages it uses `pwrite(2)` from the source mapping, which allocates the child's pages
//! inside the kernel without building page tables; with huge pages it copies through a
//! `MADV_HUGEPAGE` mapping of the child, so the child's file gets huge folios.

use std::sync::Arc;

use super::{Error, Layout, MemFile, Region, Result};

/// Copies `src` into a new region.
pub(super) fn clone_region(src: &Region, huge_pages: bool) -> Result<Region> {
    src.materialize()?;
    let size = src.size();
    let ranges = match &*src.layout() {
        Layout::File(f) => f.data_ranges(),
        Layout::Layers(_) => vec![(0, size)],
    };
    let file = Arc::new(MemFile::create("vmfork-copy", size)?);
    let child = Region::with_file(src.guest_addr(), file.clone())?;
    if huge_pages {
        child.mapping().advise_huge()?;
    }
    let chunks = split(&ranges, threads());
    let src_addr = src.host_addr() as usize;
    let dst_addr = child.host_addr() as usize;
    std::thread::scope(|s| {
        let workers: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                let file = &file;
                s.spawn(move || -> Result<()> {
                    for (start, end) in chunk {
                        // SAFETY: [start, end) lies within both regions (ranges come from the
                        // source's layout, both regions have `size` bytes); the source is
                        // not written during a clone (the caller's contract) and each
                        // worker writes a disjoint part of the child.
                        unsafe {
                            let from = (src_addr + start) as *const u8;
                            if huge_pages {
                                std::ptr::copy_nonoverlapping(
                                    from,
                                    (dst_addr + start) as *mut u8,
                                    end - start,
                                );
                            } else {
                                let data = std::slice::from_raw_parts(from, end - start);
                                file.write_all_at(data, start as u64)?;
                            }
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| w.join().map_err(|_| Error::CopyWorkerPanicked)?)
    })?;
    Ok(child)
}

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).min(8)
}

/// Splits byte ranges into `n` lists of about equal total length, cutting at 2 MiB
/// boundaries so no huge page is shared between workers.
fn split(ranges: &[(usize, usize)], n: usize) -> Vec<Vec<(usize, usize)>> {
    const GRAIN: usize = 2 << 20;
    let total: usize = ranges.iter().map(|(s, e)| e - s).sum();
    let share = total.div_ceil(n).next_multiple_of(GRAIN).max(GRAIN);
    let mut out = vec![Vec::new()];
    let mut filled = 0;
    for &(mut start, end) in ranges {
        while start < end {
            if filled >= share {
                out.push(Vec::new());
                filled = 0;
            }
            let take = (end - start).min(share - filled);
            out.last_mut().expect("never empty").push((start, start + take));
            start += take;
            filled += take;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_covers_every_byte_once() {
        let ranges = [(0, 3 << 20), (8 << 20, 9 << 20), (16 << 20, 32 << 20)];
        for n in 1..5 {
            let parts = split(&ranges, n);
            let mut flat: Vec<_> = parts.into_iter().flatten().collect();
            flat.sort();
            let total: usize = flat.iter().map(|(s, e)| e - s).sum();
            assert_eq!(total, (3 + 1 + 16) << 20);
            for w in flat.windows(2) {
                assert!(w[0].1 <= w[1].0, "overlap {w:?}");
            }
        }
    }
}
