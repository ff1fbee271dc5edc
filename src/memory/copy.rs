//! `copy`: the eager baseline. The child gets a new memfd holding a full copy.
//!
//! Only pages that hold data are copied: for a region backed by one file, its holes
//! (`SEEK_HOLE`) stay holes in the child; a `cow` view is frozen first and only its
//! layers' data and its patches are copied. The copy is split over all CPUs. Without huge
//! pages it uses `pwrite(2)` from the source mapping, which allocates the child's pages
//! inside the kernel without building page tables; with huge pages it copies through a
//! `MADV_HUGEPAGE` mapping of the child, so the child's file gets huge folios.

use std::sync::Arc;

use super::{Error, Layout, MemFile, Region, Result};

/// Copies `src` into a new region.
pub(super) fn clone_region(src: &Region, huge_pages: bool) -> Result<Region> {
    src.materialize()?;
    let size = src.size();
    let layered = matches!(&*src.layout(), Layout::Layers(_));
    let ranges = if layered {
        // A view of layers: what it holds is its image once frozen (a no-op beyond the
        // pages written since the last freeze). Only the layers' data and the patches are
        // read: reading a hole through the view would fault a page into the layer for it.
        held_ranges(&super::cow::freeze(src)?)
    } else {
        match &*src.layout() {
            Layout::File(f) => f.data_ranges(),
            Layout::Layers(_) => unreachable!("checked above"),
        }
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

/// The region offsets where `image` holds data, sorted and merged: each layer's data
/// ranges within its extent, and every patch's runs.
fn held_ranges(image: &super::cow::Image) -> Vec<(usize, usize)> {
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    for e in &image.extents {
        let (lo, hi) = (e.file_offset, e.file_offset + e.len);
        for (s, t) in e.file.data_ranges() {
            let (s, t) = (s.max(lo), t.min(hi));
            if s < t {
                ranges.push((e.offset + s - lo, e.offset + t - lo));
            }
        }
    }
    ranges.extend(image.patches.iter().flat_map(|p| p.runs().iter().copied()));
    ranges.sort_unstable();
    let mut merged: Vec<(usize, usize)> = Vec::with_capacity(ranges.len());
    for (s, t) in ranges {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(t),
            _ => merged.push((s, t)),
        }
    }
    merged
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
