//! `cow`: copy-on-write clones from immutable memfd layers, on any Linux.
//!
//! # Design
//! A clone *freezes* the source: whatever it holds now becomes immutable, and both
//! sides map that frozen image `MAP_PRIVATE`, so the kernel copies a page into anonymous
//! memory of whichever side writes it first.
//!
//! * First clone of a memory backed by its own file: the parent's view is remapped
//!   `MAP_FIXED | MAP_PRIVATE` over the same file, which then has no writable shared
//!   mapping left and is sealed (`F_SEAL_WRITE | F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL`)
//!   so nothing can change it again. It is now layer 0. Cost: one remap, which zaps the
//!   parent's page tables (page-table work grows with populated pages; huge pages keep
//!   it small).
//! * Every later clone of a copy-on-write view (the parent again, a child, a child of a
//!   child) finds the pages written since the last freeze — the anonymous pages of the
//!   view, from the page map — copies just those into a new, packed layer file, seals it
//!   and remaps those runs over it. Cost grows with pages dirtied since the last clone,
//!   not with memory size: a fan-out of N clones from one parent pays the remap once and
//!   then only a page-map scan per clone.
//! * A view is thus a list of [`Extent`]s, each a run of the region mapped from one
//!   layer. Dirty runs closer than [`GAP_FILL`] are merged (copying the clean pages in
//!   between) so scattered writes do not explode the extent count.
//!
//! # Limits
//! * Each extent is a VMA, and `vm.max_map_count` (65530 by default) bounds VMAs per
//!   process across all memories, so a region may use at most [`MAX_EXTENTS`]. Past that,
//!   a freeze merges dirty runs across the smallest clean gaps (copying those clean pages
//!   too), so widely scattered writes make a re-clone cost up to a full copy; and when
//!   the view itself is used up it is flattened into one layer. Many fragmented memories
//!   in one process (the in-process benchmark's fan-out) can still exhaust the map count:
//!   the clone then fails with `ENOMEM` and the source is unchanged.
//! * Sealed layers cannot punch holes: a page overwritten in every view that maps it
//!   stays allocated in its old layer until every memory holding that layer is dropped.
//!   Long chains that rewrite the same pages therefore accumulate garbage; flattening
//!   reclaims it.
//! * The source file must not be mapped shared and writable by another process, or the
//!   seal fails (`EBUSY`) and the clone is refused with the parent untouched.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use super::accounting::anon_runs;
use super::{Extent, Layout, MemFile, Region, Result, Share};

/// Dirty runs separated by at most this many clean bytes become one run.
pub const GAP_FILL: usize = 64 << 10;

/// Extents (VMAs) one region may use: 32 regions fit `vm.max_map_count`'s default.
/// A freeze that would exceed it merges dirty runs across clean gaps (copying the clean
/// pages too) until it fits, and flattens the view into one layer when even that fails.
pub const MAX_EXTENTS: usize = 2048;

/// Clones `src` copy-on-write.
pub(super) fn clone_region(src: &Region) -> Result<Region> {
    src.materialize()?;
    let extents = freeze(src)?;
    Region::with_layers(src.guest_addr(), src.size(), extents)
}

/// Makes the current contents of `region` immutable and returns the layers that hold
/// them. The region keeps running as a copy-on-write view over those layers.
pub fn freeze(region: &Region) -> Result<Vec<Extent>> {
    let mut layout = region.layout();
    let size = region.size();
    let map = region.mapping();
    match &mut *layout {
        Layout::File(file) => {
            let file = file.clone();
            let fd = file.file().as_raw_fd();
            map.map_file(0, size, fd, 0, Share::Private)?;
            if let Err(e) = file.seal_immutable() {
                // Give the parent its writable shared view back before reporting.
                map.map_file(0, size, fd, 0, Share::Shared)?;
                return Err(e);
            }
            *layout = Layout::Layers(vec![Extent { offset: 0, len: size, file, file_offset: 0 }]);
        }
        Layout::Layers(extents) => {
            let runs = merge_close(anon_runs(map.as_ptr() as usize, size)?, GAP_FILL);
            if !runs.is_empty() {
                // Each new run can add two extents; stay within the budget by merging the
                // runs closest together, or by flattening when the view is used up.
                let room = MAX_EXTENTS.saturating_sub(extents.len()) / 2;
                let placed = if room == 0 {
                    write_layer(region, &[(0, size)])?
                } else {
                    write_layer(region, &fit_budget(runs, room))?
                };
                for p in &placed {
                    p.map_private(map)?;
                }
                *extents = overlay(extents, &placed);
            }
        }
    }
    match &*layout {
        Layout::Layers(extents) => Ok(extents.clone()),
        Layout::File(_) => unreachable!("a frozen region is made of layers"),
    }
}

/// Copies the given runs of the region's current view into one new sealed layer, packed
/// back to back, and returns the extents that now describe those runs.
fn write_layer(region: &Region, runs: &[(usize, usize)]) -> Result<Vec<Extent>> {
    let total = runs.iter().map(|(s, e)| e - s).sum();
    let layer = Arc::new(MemFile::create("vmfork-layer", total)?);
    let mut placed = Vec::with_capacity(runs.len());
    let mut at = 0;
    for &(s, e) in runs {
        // SAFETY: [s, e) lies inside the region's mapping (runs come from its page map or
        // are the whole region) and the region is not written during a clone.
        let bytes = unsafe { std::slice::from_raw_parts(region.host_addr().add(s), e - s) };
        layer.write_all_at(bytes, at as u64)?;
        placed.push(Extent { offset: s, len: e - s, file: layer.clone(), file_offset: at });
        at += e - s;
    }
    layer.seal_immutable()?;
    Ok(placed)
}

/// Merges runs whose gap is at most `gap` bytes.
fn merge_close(runs: Vec<(usize, usize)>, gap: usize) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::with_capacity(runs.len());
    for (s, e) in runs {
        match out.last_mut() {
            Some(last) if s - last.1 <= gap => last.1 = e,
            _ => out.push((s, e)),
        }
    }
    out
}

/// Merges the runs separated by the smallest gaps until at most `max_runs` remain.
fn fit_budget(runs: Vec<(usize, usize)>, max_runs: usize) -> Vec<(usize, usize)> {
    if runs.len() <= max_runs {
        return runs;
    }
    let mut gaps: Vec<usize> = runs.windows(2).map(|w| w[1].0 - w[0].1).collect();
    gaps.sort_unstable();
    let must_merge = runs.len() - max_runs.max(1);
    merge_close(runs, gaps[must_merge - 1])
}

/// Lays `top` (sorted, non-overlapping) over `base` (sorted, covering the region) and
/// merges neighbours that continue each other in the same file.
fn overlay(base: &[Extent], top: &[Extent]) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::with_capacity(base.len() + 2 * top.len());
    let mut push = |piece: &Extent, from: usize, to: usize| {
        let e = Extent {
            offset: from,
            len: to - from,
            file: piece.file.clone(),
            file_offset: piece.file_offset + (from - piece.offset),
        };
        match out.last_mut() {
            Some(last)
                if Arc::ptr_eq(&last.file, &e.file)
                    && last.end() == e.offset
                    && last.file_offset + last.len == e.file_offset =>
            {
                last.len += e.len
            }
            _ => out.push(e),
        }
    };
    let mut t = 0;
    for b in base {
        let mut pos = b.offset;
        while pos < b.end() {
            while t < top.len() && top[t].end() <= pos {
                t += 1;
            }
            match top.get(t) {
                Some(over) if over.offset <= pos => {
                    let stop = over.end().min(b.end());
                    push(over, pos, stop);
                    pos = stop;
                }
                next => {
                    let stop = next.map_or(b.end(), |over| over.offset.min(b.end()));
                    push(b, pos, stop);
                    pos = stop;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::PAGE_SIZE;

    fn file(pages: usize) -> Arc<MemFile> {
        Arc::new(MemFile::create("t", pages * PAGE_SIZE).unwrap())
    }

    fn ext(offset: usize, len: usize, f: &Arc<MemFile>, file_offset: usize) -> Extent {
        Extent {
            offset: offset * PAGE_SIZE,
            len: len * PAGE_SIZE,
            file: f.clone(),
            file_offset: file_offset * PAGE_SIZE,
        }
    }

    /// Which (file, page) backs each page of the region.
    fn resolve(extents: &[Extent], pages: usize) -> Vec<(*const MemFile, usize)> {
        let mut out = Vec::new();
        let mut next = 0;
        for e in extents {
            assert_eq!(e.offset, next, "extents must tile the region");
            for p in 0..e.len / PAGE_SIZE {
                out.push((Arc::as_ptr(&e.file), e.file_offset / PAGE_SIZE + p));
            }
            next = e.end();
        }
        assert_eq!(out.len(), pages);
        out
    }

    #[test]
    fn overlay_replaces_exactly_the_top_runs() {
        let base_a = file(10);
        let base_b = file(10);
        let base = vec![ext(0, 6, &base_a, 0), ext(6, 10, &base_b, 2)];
        let layer = file(5);
        // A run inside one extent, one spanning the boundary, one at the very end.
        let top = vec![ext(1, 2, &layer, 0), ext(5, 2, &layer, 2), ext(15, 1, &layer, 4)];
        let got = overlay(&base, &top);
        let mut want = resolve(&base, 16);
        for t in &top {
            for p in 0..t.len / PAGE_SIZE {
                want[t.offset / PAGE_SIZE + p] = (Arc::as_ptr(&layer), t.file_offset / PAGE_SIZE + p);
            }
        }
        assert_eq!(resolve(&got, 16), want);
    }

    #[test]
    fn overlay_merges_contiguous_neighbours() {
        let a = file(8);
        let layer = file(8);
        let got = overlay(&[ext(0, 8, &a, 0)], &[ext(0, 8, &layer, 0)]);
        assert_eq!(got.len(), 1);
        let got = overlay(&got, &[ext(2, 2, &layer, 2)]);
        assert_eq!(got.len(), 1, "same file, same offsets: still one extent");
    }

    #[test]
    fn fit_budget_merges_the_closest_runs_first() {
        let runs = vec![(0, 1), (2, 3), (10, 11), (100, 101), (103, 104)];
        assert_eq!(fit_budget(runs.clone(), 5), runs);
        assert_eq!(fit_budget(runs.clone(), 3), vec![(0, 3), (10, 11), (100, 104)]);
        assert_eq!(fit_budget(runs, 1), vec![(0, 104)]);
    }

    #[test]
    fn merge_close_fills_small_gaps_only() {
        let runs = vec![(0, 4096), (8192, 12288), (1 << 20, (1 << 20) + 4096)];
        assert_eq!(merge_close(runs, GAP_FILL), vec![(0, 12288), (1 << 20, (1 << 20) + 4096)]);
    }
}
