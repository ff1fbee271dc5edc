//! `cow`: copy-on-write clones from immutable memfd layers, on any Linux.
//!
//! # Design
//! A clone *freezes* the source: whatever it holds now becomes an immutable [`Image`],
//! and both sides see that image copy-on-write, so the kernel copies a page into
//! anonymous memory of whichever side writes it first.
//!
//! * First clone of a memory backed by its own file: the parent's view is remapped
//!   `MAP_FIXED | MAP_PRIVATE` over the same file, which then has no writable shared
//!   mapping left and is sealed (`F_SEAL_WRITE | F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL`)
//!   so nothing can change it again. It is now the image's one layer. Cost: one remap,
//!   which zaps the parent's page tables (page-table work grows with populated pages;
//!   huge pages keep it small).
//! * The second freeze finds the pages written since from the page map (the view's
//!   anonymous pages: the remap left none) and starts tracking writes
//!   ([`super::dirty`]); later freezes ask the tracker.
//! * Every later freeze of a copy-on-write view (the parent again, a child, a child of a
//!   child) copies just the pages written since the view's last freeze into a new sealed
//!   [`Patch`], packed back to back, and appends it to the image. Nothing of the view is
//!   remapped: the view keeps its anonymous pages and its page tables, so the pause
//!   grows with the pages written since the last clone, scattered or not, and not with
//!   the memory's size or with how many clones came before. The patch's file is
//!   allocated and mapped ahead, between freezes (`Spare`), so the pause copies the
//!   pages with memcpy rather than allocating them one pwrite at a time.
//! * A new view of an image (the child) maps the layers `MAP_PRIVATE` (one VMA per
//!   layer extent, and a fresh image has one) and then copies the patches' pages into
//!   its own mapping, oldest patch first. That work lands on the child, off the parent's
//!   critical path; the child owns those pages privately, while the layers stay shared.
//! * Patches pile up over many clones of a parent that keeps writing. Once an image
//!   holds [`FOLD_AT`] of them, a background thread folds them into one patch holding
//!   each page's newest copy; the next freeze swaps the fold in. Patches are immutable,
//!   so folding needs no pause, and a child never applies more than about `2 * FOLD_AT`.
//!   A fold waits while a freeze of its region runs, so as not to compete with the pause.
//!
//! # Limits
//! * Where writes cannot be tracked (a kernel before 6.7, userfaultfd not allowed, or a
//!   `uffd-minor` child whose range is registered with its page server), a freeze finds
//!   written pages from the page map instead: all anonymous pages, i.e. every page
//!   written since the view was made. That is correct, and proportional to what the view
//!   wrote in its life rather than since its last freeze.
//! * A child's patched pages are private to it: N children of a parent that wrote d
//!   pages hold N copies of them (the layers stay shared). Pages are shared again only by
//!   a future base made by reflink (`reflink`) or a new first freeze.
//! * Read faults of a tracked view map one page at a time: the kernel turns fault-around
//!   off for uffd-WP ranges, and PTE markers keep huge mappings out.
//! * A region frozen at least once holds a spare patch file between freezes: about a
//!   quarter more than its last freeze wrote, at least 1/128 and at most 1/16 of its
//!   size (8 MiB for a 1 GiB guest that writes little).
//! * Sealed layers cannot punch holes: a page overwritten everywhere stays allocated in
//!   its old layer until every memory holding that layer is dropped.
//! * The source file must not be mapped shared and writable by another process, or the
//!   seal fails (`EBUSY`) and the clone is refused with the parent untouched.

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use super::accounting::anon_runs;
use super::{Advice, Error, Extent, Layout, Mapping, MemFile, PAGE_SIZE, Region, Result, Share};

/// Written runs separated by at most this many clean bytes are captured as one run
/// (copying the clean pages between them): fewer, longer copies for the child to make.
pub const GAP_FILL: usize = 4 * PAGE_SIZE;

/// Patches an image may hold before a background fold of them starts.
pub const FOLD_AT: usize = 8;

/// A fold covering more than this share of the region (1/`FLATTEN_DIV`) becomes a
/// whole new layer instead of a patch: a child maps a layer but copies a patch in, so
/// a patch that kept growing with a parent that writes everywhere would bring back a
/// full copy per clone.
pub const FLATTEN_DIV: usize = 16;

/// What a region held at a freeze, immutable from then on: layer extents that tile the
/// region, then patches laid over them, oldest first.
#[derive(Clone, Debug)]
pub struct Image {
    /// Runs of sealed layer files, in order of offset, covering the region.
    pub extents: Vec<Extent>,
    /// Pages written between freezes; a later patch wins over an earlier one.
    pub patches: Vec<Arc<Patch>>,
}

impl Image {
    /// An image made of layers alone.
    pub fn from_extents(extents: Vec<Extent>) -> Self {
        Image { extents, patches: Vec::new() }
    }

    /// Bytes of all patches (what a new view of the image copies).
    pub fn patch_bytes(&self) -> usize {
        self.patches.iter().map(|p| p.bytes()).sum()
    }
}

/// Pages of a region written between two freezes, packed back to back in a sealed file.
#[derive(Debug)]
pub struct Patch {
    file: Arc<MemFile>,
    /// Region offsets `[start, end)`, sorted and disjoint; run `i` sits in the file right
    /// after run `i - 1`.
    runs: Vec<(usize, usize)>,
}

impl Patch {
    /// A patch over `file`, checking that `runs` are page aligned, sorted, disjoint,
    /// inside `region_size` and fit the file.
    pub fn new(file: Arc<MemFile>, runs: Vec<(usize, usize)>, region_size: usize) -> Result<Self> {
        let mut end = 0;
        let mut total = 0usize;
        for &(s, e) in &runs {
            if s % PAGE_SIZE != 0 || e % PAGE_SIZE != 0 || s < end || e <= s || e > region_size {
                return Err(Error::BadLayout(format!(
                    "patch run {s:#x}..{e:#x} is not page aligned, sorted and inside the {region_size:#x}-byte region"
                )));
            }
            end = e;
            total += e - s;
        }
        if total > file.size() {
            return Err(Error::SizeMismatch { what: "patch runs", expected: file.size(), got: total });
        }
        Ok(Patch { file, runs })
    }

    /// The sealed file holding the pages.
    pub fn file(&self) -> &Arc<MemFile> {
        &self.file
    }

    /// The region offsets the patch covers.
    pub fn runs(&self) -> &[(usize, usize)] {
        &self.runs
    }

    /// Bytes the patch holds.
    pub fn bytes(&self) -> usize {
        self.runs.iter().map(|(s, e)| e - s).sum()
    }

    /// Each run with where it sits in the file: `(start, end, file_offset)`.
    pub fn placed(&self) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        self.runs.iter().scan(0, |at, &(s, e)| {
            let here = *at;
            *at += e - s;
            Some((s, e, here))
        })
    }
}

/// A fold of an image's oldest patches, running in the background.
#[derive(Debug)]
pub(super) struct Folding {
    /// How many of the image's first patches it replaces.
    count: usize,
    worker: JoinHandle<Result<Folded>>,
    /// Set while a freeze runs: the fold waits, so that it takes no CPU or page
    /// allocations from the parent's pause (on a 2-core host it doubled the pause).
    hold: Arc<Hold>,
}

/// A flag a background fold checks between chunks, waiting while it is set.
#[derive(Debug, Default)]
pub struct Hold(AtomicBool);

impl Hold {
    /// Waits (parked) while the flag is set.
    fn wait(&self) {
        while self.0.load(Ordering::Acquire) {
            std::thread::park();
        }
    }
}

/// Holds a region's running fold, if any, until dropped.
struct HeldFold<'a>(Option<(&'a Hold, std::thread::Thread)>);

impl<'a> HeldFold<'a> {
    fn new(fold: &'a Option<Folding>) -> Self {
        HeldFold(fold.as_ref().map(|f| {
            f.hold.0.store(true, Ordering::Release);
            (&*f.hold, f.worker.thread().clone())
        }))
    }
}

impl Drop for HeldFold<'_> {
    fn drop(&mut self) {
        if let Some((hold, thread)) = self.0.take() {
            hold.0.store(false, Ordering::Release);
            // A fold that saw the flag set and has not parked yet finds the token.
            thread.unpark();
        }
    }
}

/// What a fold made of an image's oldest patches.
#[derive(Debug)]
pub enum Folded {
    /// A patch holding each page's newest copy, to replace them.
    Patch(Patch),
    /// A sealed file of the whole region (the extents with those patches applied), to
    /// replace the extents and those patches.
    Layer(Arc<MemFile>),
}

/// Clones `src` copy-on-write.
pub(super) fn clone_region(src: &Region) -> Result<Region> {
    src.materialize()?;
    let image = freeze(src)?;
    Region::with_layers(src.guest_addr(), src.size(), image)
}

/// Makes the current contents of `region` immutable and returns the image that holds
/// them. The region keeps running as a copy-on-write view of that image.
pub fn freeze(region: &Region) -> Result<Image> {
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
            *layout = Layout::Layers(Image::from_extents(vec![Extent {
                offset: 0,
                len: size,
                file,
                file_offset: 0,
            }]));
            region.prepare_spare(spare_bytes(size, 0));
        }
        Layout::Layers(image) => {
            collect_fold(region, image);
            let fold = region.fold();
            let held = HeldFold::new(&fold);
            let mut tracker = region.tracker();
            let tracked = tracker.as_ref().map(|t| t.take_written());
            let runs = match tracked {
                Some(Ok(runs)) => runs,
                // A scan that failed part way may have protected pages it never reported:
                // stop trusting the tracker and take every page written since the view
                // was made, which is always enough.
                Some(Err(_)) | None => {
                    *tracker = None;
                    anon_runs(map.as_ptr() as usize, size)?
                }
            };
            drop(tracker);
            let runs = merge_close(runs, GAP_FILL);
            let written = runs.iter().map(|(s, e)| e - s).sum();
            if !runs.is_empty() {
                image.patches.push(Arc::new(write_patch(region, runs)?));
            }
            drop(held);
            drop(fold);
            start_fold(region, image);
            region.prepare_spare(spare_bytes(size, written));
            // Tracking starts here rather than at the first freeze: right after that
            // remap the view has no anonymous page, so the page map alone finds exactly
            // what the second freeze needs, and the first clone stays one remap.
            region.track_writes();
        }
    }
    match &*layout {
        Layout::Layers(image) => Ok(image.clone()),
        Layout::File(_) => unreachable!("a frozen region is made of layers"),
    }
}

/// Copies the given runs of the region's current view into one new sealed patch.
fn write_patch(region: &Region, runs: Vec<(usize, usize)>) -> Result<Patch> {
    let total = runs.iter().map(|(s, e)| e - s).sum();
    let parts: Vec<&[u8]> = runs
        .iter()
        // SAFETY: [s, e) lies inside the region's mapping (runs come from its page map or
        // its write tracker) and the region is not written during a clone.
        .map(|&(s, e)| unsafe { std::slice::from_raw_parts(region.host_addr().add(s), e - s) })
        .collect();
    let file = match region.take_spare() {
        Some(spare) => spare.fill(&parts, total)?,
        None => {
            let file = MemFile::create("vmfork-patch", total)?;
            file.write_all_vectored_at(&parts, 0)?;
            file
        }
    };
    file.seal_immutable()?;
    Patch::new(Arc::new(file), runs, region.size())
}

/// The smallest spare patch file worth preparing, in pages.
const SPARE_MIN_PAGES: usize = 256;

/// How big a spare to prepare for the next freeze of a `size`-byte region that wrote
/// `written` bytes since its last one: a quarter more than that (a guest that keeps
/// writing at the same rate fills it), at least 1/128 of the region or
/// [`SPARE_MIN_PAGES`], at most 1/[`FLATTEN_DIV`] of it.
fn spare_bytes(size: usize, written: usize) -> usize {
    let want = (written + written / 4).max(size / 128).max(SPARE_MIN_PAGES * PAGE_SIZE);
    let want = want.min(size / FLATTEN_DIV).max(PAGE_SIZE);
    // Whole 2 MiB pages where it is that big: the kernel maps a reservation with PMDs
    // only when its length is a multiple of them (and then aligns it).
    if want >= HUGE_PAGE { want.next_multiple_of(HUGE_PAGE) } else { want.next_multiple_of(PAGE_SIZE) }
}

/// The PMD-mapped transparent huge page size of x86-64.
const HUGE_PAGE: usize = 2 << 20;

/// A patch file allocated and mapped writable ahead of the freeze that fills it.
///
/// A patch written with pwrite(2) pays, inside the parent's pause, for a page allocation
/// and page-cache insertion per 4 KiB. So after every freeze a thread allocates the next
/// freeze's file and maps it populated (`MADV_POPULATE_WRITE`), and the pause only copies
/// the written pages into it. Pages the freeze does not need are truncated away before
/// the seal; pages beyond the spare go in with pwrite. Cost: between freezes the region
/// holds the spare's pages, about what its last freeze wrote (see [`spare_bytes`]).
#[derive(Debug)]
pub(super) struct Spare(JoinHandle<Result<SpareFile>>);

#[derive(Debug)]
pub(super) struct SpareFile {
    file: MemFile,
    map: Mapping,
}

impl Spare {
    /// Starts preparing a spare of `bytes` bytes; `None` where no thread could start.
    pub(super) fn prepare(bytes: usize) -> Option<Spare> {
        let worker = std::thread::Builder::new().name("vmfork-spare".into()).spawn(move || {
            let file = MemFile::create("vmfork-patch", bytes)?;
            let map = Mapping::reserve(bytes)?;
            // Huge pages, where the host gives them to shmem, make the pause's unmap of
            // the spare 512 times less page-table work.
            map.advise_huge()?;
            map.map_file(0, bytes, file.file().as_raw_fd(), 0, Share::Shared)?;
            map.madvise(0, bytes, Advice::PopulateWrite)?;
            Ok(SpareFile { file, map })
        });
        worker.ok().map(Spare)
    }

    /// Whether the preparation has ended (well or not).
    pub(super) fn is_finished(&self) -> bool {
        self.0.is_finished()
    }

    /// The spare file, if it is ready now: a freeze does not wait for one.
    pub(super) fn ready(self) -> Option<SpareFile> {
        if self.0.is_finished() { self.0.join().ok()?.ok() } else { None }
    }
}

impl SpareFile {
    /// `parts` back to back in this file, cut to their `total` bytes: copied into the
    /// mapping as far as it reaches, written with pwrite beyond it. Unmapped on return,
    /// so the file can be sealed.
    fn fill(self, parts: &[&[u8]], total: usize) -> Result<MemFile> {
        let SpareFile { mut file, map } = self;
        let room = map.len();
        let mut at = 0;
        let mut rest: Vec<&[u8]> = Vec::new();
        for part in parts {
            let n = part.len().min(room.saturating_sub(at));
            // SAFETY: `at + n <= room`, inside the mapping, which maps this file shared
            // and writable, has no other user and is never referenced by Rust; the part
            // is a live slice.
            unsafe { std::ptr::copy_nonoverlapping(part.as_ptr(), map.as_ptr().add(at), n) };
            if n < part.len() {
                rest.push(&part[n..]);
            }
            at += part.len();
        }
        drop(map);
        if total > room {
            file.truncate(total)?;
            file.write_all_vectored_at(&rest, room as u64)?;
        } else if total < room {
            file.truncate(total)?;
        }
        Ok(file)
    }
}

/// Swaps a finished fold in for the patches it replaces. A fold that failed leaves the
/// patches as they were: folding only saves work for later children.
fn collect_fold(region: &Region, image: &mut Image) {
    let mut fold = region.fold();
    if !fold.as_ref().is_some_and(|f| f.worker.is_finished()) {
        return;
    }
    let Some(done) = fold.take() else { return };
    // Only freezes change `patches`, and they only append while a fold runs, so the
    // first `count` patches are still the ones that were folded.
    match done.worker.join() {
        Ok(Ok(Folded::Patch(folded))) => {
            image.patches.splice(..done.count, [Arc::new(folded)]);
        }
        Ok(Ok(Folded::Layer(file))) => {
            image.patches.drain(..done.count);
            let len = file.size();
            image.extents = vec![Extent { offset: 0, len, file, file_offset: 0 }];
        }
        _ => {}
    }
}

/// Starts folding the image's patches in the background once there are enough of them.
fn start_fold(region: &Region, image: &Image) {
    let mut fold = region.fold();
    if fold.is_some() || image.patches.len() < FOLD_AT {
        return;
    }
    let patches = image.patches.clone();
    let extents = image.extents.clone();
    let size = region.size();
    let hold = Arc::new(Hold::default());
    let held = hold.clone();
    let spawned = std::thread::Builder::new().name("vmfork-fold".into()).spawn(move || {
        let patch = fold_patches(&patches, size, &held)?;
        if patch.bytes() <= size / FLATTEN_DIV {
            return Ok(Folded::Patch(patch));
        }
        flatten(&extents, &patch, size, &held).map(Folded::Layer)
    });
    // Without a thread the patches just stay as they are.
    if let Ok(worker) = spawned {
        *fold = Some(Folding { count: image.patches.len(), worker, hold });
    }
}

/// A sealed file of the whole region: `extents` with `patch` laid over them. Pages that
/// read as zeroes are left as holes, so a sparse memory stays sparse.
/// Waits at `hold` between chunks.
pub fn flatten(extents: &[Extent], patch: &Patch, region_size: usize, hold: &Hold) -> Result<Arc<MemFile>> {
    const CHUNK: usize = 512 * PAGE_SIZE;
    let file = Arc::new(MemFile::create("vmfork-layer", region_size)?);
    let mut buf = vec![0u8; CHUNK];
    for x in extents {
        let mut done = 0;
        while done < x.len {
            hold.wait();
            let n = CHUNK.min(x.len - done);
            let bytes = &mut buf[..n];
            x.file.file().read_exact_at(bytes, (x.file_offset + done) as u64).map_err(Error::File)?;
            if bytes.iter().any(|&b| b != 0) {
                file.write_all_at(bytes, (x.offset + done) as u64)?;
            }
            done += n;
        }
    }
    for (s, e, at) in patch.placed() {
        let mut done = 0;
        while s + done < e {
            hold.wait();
            let n = CHUNK.min(e - s - done);
            let bytes = &mut buf[..n];
            patch.file().file().read_exact_at(bytes, (at + done) as u64).map_err(Error::File)?;
            file.write_all_at(bytes, (s + done) as u64)?;
            done += n;
        }
    }
    file.seal_immutable()?;
    Ok(file)
}

/// One patch holding, for every page any of `patches` covers, its newest copy. Waits
/// at `hold` between chunks.
pub fn fold_patches(patches: &[Arc<Patch>], region_size: usize, hold: &Hold) -> Result<Patch> {
    let pages = region_size / PAGE_SIZE;
    let mut claimed = vec![false; pages];
    // (region offset, patch, file offset) per page, newest patch first.
    let mut pieces: Vec<(usize, usize, usize)> = Vec::new();
    for (i, p) in patches.iter().enumerate().rev() {
        for (s, e, at) in p.placed() {
            let first = s / PAGE_SIZE;
            for (page, taken) in claimed[first..e / PAGE_SIZE].iter_mut().enumerate() {
                if !std::mem::replace(taken, true) {
                    let page = first + page;
                    pieces.push((page * PAGE_SIZE, i, at + page * PAGE_SIZE - s));
                }
            }
        }
    }
    pieces.sort_unstable_by_key(|p| p.0);
    let file = Arc::new(MemFile::create("vmfork-patch", pieces.len() * PAGE_SIZE)?);
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut buf = vec![0u8; 256 * PAGE_SIZE];
    let mut k = 0;
    while k < pieces.len() {
        hold.wait();
        // A span: consecutive pages from consecutive offsets of one patch.
        let (start, from, at) = pieces[k];
        let mut n = 1;
        while k + n < pieces.len()
            && n < buf.len() / PAGE_SIZE
            && pieces[k + n] == (start + n * PAGE_SIZE, from, at + n * PAGE_SIZE)
        {
            n += 1;
        }
        let bytes = &mut buf[..n * PAGE_SIZE];
        patches[from].file.file().read_exact_at(bytes, at as u64).map_err(Error::File)?;
        file.write_all_at(bytes, (k * PAGE_SIZE) as u64)?;
        match runs.last_mut() {
            Some(last) if last.1 == start => last.1 = start + n * PAGE_SIZE,
            _ => runs.push((start, start + n * PAGE_SIZE)),
        }
        k += n;
    }
    file.seal_immutable()?;
    Patch::new(file, runs, region_size)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn patch(pages: &[(usize, usize)], fill: u8) -> Arc<Patch> {
        let runs: Vec<(usize, usize)> = pages.iter().map(|&(s, e)| (s * PAGE_SIZE, e * PAGE_SIZE)).collect();
        let total: usize = runs.iter().map(|(s, e)| e - s).sum();
        let file = Arc::new(MemFile::create("t", total).unwrap());
        // Each page holds its fill byte and its region page number.
        let mut at = 0;
        for &(s, e) in &runs {
            for off in (s..e).step_by(PAGE_SIZE) {
                let mut page = vec![fill; PAGE_SIZE];
                page[..8].copy_from_slice(&(off / PAGE_SIZE).to_le_bytes());
                file.write_all_at(&page, at as u64).unwrap();
                at += PAGE_SIZE;
            }
        }
        Arc::new(Patch::new(file, runs, 64 * PAGE_SIZE).unwrap())
    }

    /// The newest (fill byte, page number) per page a set of patches covers.
    fn resolve(patches: &[Arc<Patch>]) -> Vec<Option<(u8, usize)>> {
        let mut out = vec![None; 64];
        for p in patches {
            for (s, e, at) in p.placed() {
                for off in (s..e).step_by(PAGE_SIZE) {
                    let mut page = vec![0u8; PAGE_SIZE];
                    p.file().file().read_exact_at(&mut page, (at + off - s) as u64).unwrap();
                    let n = usize::from_le_bytes(page[..8].try_into().unwrap());
                    out[off / PAGE_SIZE] = Some((page[100], n));
                }
            }
        }
        out
    }

    #[test]
    fn a_fold_keeps_each_pages_newest_copy() {
        let patches = vec![
            patch(&[(0, 4), (10, 12)], 1),
            patch(&[(2, 6)], 2),
            patch(&[(11, 13), (63, 64)], 3),
            patch(&[(0, 1)], 4),
        ];
        let folded = fold_patches(&patches, 64 * PAGE_SIZE, &Hold::default()).unwrap();
        assert_eq!(
            folded.runs(),
            &[(0, 6 * PAGE_SIZE), (10 * PAGE_SIZE, 13 * PAGE_SIZE), (63 * PAGE_SIZE, 64 * PAGE_SIZE)]
        );
        assert_eq!(resolve(&[Arc::new(folded)]), resolve(&patches));
    }

    #[test]
    fn a_flattened_layer_holds_the_extents_under_the_folded_patch() {
        // Two extents from two layers: pages 0..32 from a layer of 7s, 32..64 from the
        // second half of a layer of 9s.
        let layer = |fill: u8, pages: usize| {
            let f = Arc::new(MemFile::create("t", pages * PAGE_SIZE).unwrap());
            f.write_all_at(&vec![fill; pages * PAGE_SIZE], 0).unwrap();
            f
        };
        let extents = vec![
            Extent { offset: 0, len: 32 * PAGE_SIZE, file: layer(7, 32), file_offset: 0 },
            Extent {
                offset: 32 * PAGE_SIZE,
                len: 32 * PAGE_SIZE,
                file: layer(9, 64),
                file_offset: 32 * PAGE_SIZE,
            },
        ];
        let patches = vec![patch(&[(1, 3), (40, 41)], 1), patch(&[(2, 4)], 2)];
        let folded = fold_patches(&patches, 64 * PAGE_SIZE, &Hold::default()).unwrap();
        let flat = flatten(&extents, &folded, 64 * PAGE_SIZE, &Hold::default()).unwrap();
        let newest = resolve(&patches);
        for (page, newest) in newest.iter().enumerate() {
            let mut got = vec![0u8; PAGE_SIZE];
            flat.file().read_exact_at(&mut got, (page * PAGE_SIZE) as u64).unwrap();
            let want = match *newest {
                Some((fill, _)) => fill,
                None if page < 32 => 7,
                None => 9,
            };
            assert_eq!(got[100], want, "page {page}");
        }
    }

    #[test]
    fn patches_refuse_runs_that_overlap_or_leave_the_region() {
        let file = || Arc::new(MemFile::create("t", 4 * PAGE_SIZE).unwrap());
        let p = PAGE_SIZE;
        for runs in [vec![(0, 2 * p), (p, 3 * p)], vec![(0, 5 * p)], vec![(62 * p, 65 * p)], vec![(1, p)]] {
            assert!(Patch::new(file(), runs.clone(), 64 * p).is_err(), "{runs:?}");
        }
        assert!(Patch::new(file(), vec![(0, p), (60 * p, 63 * p)], 64 * p).is_ok());
    }

    #[test]
    fn merge_close_fills_small_gaps_only() {
        let runs = vec![(0, 4096), (8192, 12288), (1 << 20, (1 << 20) + 4096)];
        assert_eq!(merge_close(runs, GAP_FILL), vec![(0, 12288), (1 << 20, (1 << 20) + 4096)]);
    }

    /// Parts of odd lengths, more of them than one pwritev takes, written back to back.
    fn parts(n: usize) -> Vec<Vec<u8>> {
        (0..n).map(|i| vec![(i % 251) as u8 + 1; 1 + (i * 37) % 5000]).collect()
    }

    fn read_all(file: &MemFile) -> Vec<u8> {
        let mut got = vec![0u8; file.size()];
        file.file().read_exact_at(&mut got, 0).unwrap();
        got
    }

    #[test]
    fn a_vectored_write_puts_every_part_back_to_back() {
        let parts = parts(2500);
        let want: Vec<u8> = parts.concat();
        let file = MemFile::create("t", want.len().next_multiple_of(PAGE_SIZE)).unwrap();
        let slices: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        file.write_all_vectored_at(&slices, 0).unwrap();
        assert!(read_all(&file)[..want.len()] == want[..]);
    }

    fn spare(bytes: usize) -> SpareFile {
        let spare = Spare::prepare(bytes).unwrap();
        let t = std::time::Instant::now();
        while !spare.0.is_finished() {
            assert!(t.elapsed().as_secs() < 10, "a spare of {bytes} bytes not ready in 10 s");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        spare.ready().unwrap()
    }

    #[test]
    fn a_spare_takes_patches_smaller_and_larger_than_itself() {
        for (room, pages) in [(64 * PAGE_SIZE, 10), (64 * PAGE_SIZE, 64), (16 * PAGE_SIZE, 40)] {
            let parts: Vec<Vec<u8>> = (0..pages).map(|i| vec![i as u8 + 1; PAGE_SIZE]).collect();
            let slices: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
            let file = spare(room).fill(&slices, pages * PAGE_SIZE).unwrap();
            assert_eq!(file.size(), pages * PAGE_SIZE, "room {room}, {pages} pages");
            assert!(read_all(&file) == parts.concat(), "room {room}, {pages} pages");
            // Unmapped and cut to size: it seals, and holds no page past its end.
            file.seal_immutable().unwrap();
            assert!(file.allocated_bytes().unwrap() <= (pages * PAGE_SIZE) as u64);
        }
    }

    #[test]
    fn spares_follow_what_was_written_within_bounds() {
        let g = 1 << 30;
        // At least 1/128 of the region before anything was written.
        assert_eq!(spare_bytes(g, 0), g / 128);
        // A quarter more than the last freeze wrote, in whole 2 MiB pages.
        assert_eq!(spare_bytes(g, 40 << 20), 50 << 20);
        // Never more than 1/FLATTEN_DIV of the region.
        assert_eq!(spare_bytes(g, g), g / FLATTEN_DIV);
        // Small regions get small spares, in pages.
        assert_eq!(spare_bytes(48 * PAGE_SIZE, PAGE_SIZE), 3 * PAGE_SIZE);
    }
}
