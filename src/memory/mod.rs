//! Guest memory and the ways to clone it.
//!
//! Guest memory lives in memfds mapped into the VMM. A *clone* turns one [`GuestMemory`]
//! that keeps running (the parent) into two: the parent and an independent child holding
//! exactly the parent's contents at the clone instant. Afterwards neither side ever sees
//! the other's writes. [`GuestMemory::clone_with`] is the one interface; each
//! [`Strategy`] lives in a file of its own:
//!
//! | strategy | file | how |
//! |---|---|---|
//! | `copy` | [`copy`] | eager copy into a new memfd (the baseline) |
//! | `cow` | [`cow`] | freeze the memory as immutable layers, both sides map them `MAP_PRIVATE` |
//! | `reflink` | [`reflink`] | `ioctl(FICLONE)` into a new memfd (needs vmfork's kernel patch) |
//! | `uffd` | [`uffd`] | child memfd filled lazily by a userfaultfd page server |
//! | `uffd-minor` | [`uffd`] | `cow` view whose first touch of each page goes through a page server (`UFFDIO_CONTINUE`) |
//! | `auto` | here | `reflink` where the kernel has it, else `cow` |
//!
//! The caller keeps writers of the source quiet for the duration of
//! [`GuestMemory::clone_with`] (a VMM pauses its vCPUs); how long that is, is what the
//! strategies compete on.

pub mod accounting;
pub mod copy;
pub mod cow;
mod dirty;
mod file;
mod pagemap;
pub mod reflink;
pub mod transfer;
pub mod uffd;

use std::os::fd::AsRawFd;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::names::Named;

pub use file::{Advice, MFD_REFLINK, Mapping, MemFile, PAGE_SIZE, Share, check_size};

/// Errors of the memory layer. The message says what happened and, where it helps, what
/// to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Size is not a positive multiple of the page size.
    #[error("memory size {0} bytes is not a positive multiple of the 4096-byte page size")]
    BadSize(usize),
    /// A range that does not fit the memory or is not page aligned.
    #[error("range at offset {offset:#x} of {len:#x} bytes is not page aligned or lies outside the memory")]
    BadRange { offset: usize, len: usize },
    /// A guest-physical access outside every region.
    #[error("guest-physical range {addr:#x}+{len:#x} is not backed by guest memory")]
    BadGuestAddress { addr: u64, len: usize },
    /// Regions overlap or are empty.
    #[error("invalid region layout: {0}")]
    BadLayout(String),
    #[error("cannot create memfd: {0}")]
    Memfd(std::io::Error),
    /// Reading, writing or sizing up a memory file failed.
    #[error("cannot read or write the guest memory file: {0}")]
    File(std::io::Error),
    #[error("cannot duplicate a file descriptor: {0}")]
    Dup(std::io::Error),
    /// A helper thread (page server, watchdog) could not start.
    #[error("cannot start thread {name}: {error}")]
    Thread { name: String, error: std::io::Error },
    /// Two things that must be the same size are not.
    #[error("{what} is {got:#x} bytes, expected {expected:#x}")]
    SizeMismatch { what: &'static str, expected: usize, got: usize },
    #[error("cannot map guest memory: {0}")]
    Mmap(std::io::Error),
    #[error(
        "cannot seal the memory file as an immutable base: {0} (is it mapped shared and writable by another process?)"
    )]
    Seal(std::io::Error),
    #[error("cannot read the page map of guest memory: {0}")]
    PageMap(std::io::Error),
    /// The kernel has no reflink for memfd/tmpfs.
    #[error(
        "this kernel cannot reflink memfd/tmpfs files (FICLONE: {0}); vmfork's kernel-patch/ adds it (memfds made with MFD_REFLINK). Use --strategy cow, or auto, which falls back to cow"
    )]
    ReflinkUnsupported(std::io::Error),
    /// FICLONE failed for another reason.
    #[error("FICLONE failed: {0}")]
    Reflink(std::io::Error),

    #[error("userfaultfd: {0}")]
    Uffd(std::io::Error),
    /// The page server of a lazily filled memory is gone.
    #[error("the page server of this lazily cloned memory died; pages it never served are lost")]
    PageServerDied,
    #[error("{}", crate::names::unknown::<Strategy>(.0))]
    UnknownStrategy(String),
    /// A worker of an eager copy panicked; the child's memory is incomplete.
    #[error("a guest memory copy worker panicked; the clone was abandoned")]
    CopyWorkerPanicked,
    /// A memory manifest that does not match the files sent with it.
    #[error("invalid guest memory manifest: {0}")]
    BadManifest(String),
    #[error("cannot pass guest memory between processes: {0}")]
    Transfer(crate::wire::Error),
}

/// Result of the memory layer.
pub type Result<T> = std::result::Result<T, Error>;

/// How a clone is made. See the module documentation.
///
/// [`Strategy::name`] is the one place a strategy's name is spelled: `FromStr`, serde
/// (the API, fork messages, benchmark records) and the command line (`clap::ValueEnum`)
/// all go through it ([`crate::names`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Strategy {
    Copy,
    Cow,
    Reflink,
    Uffd,
    UffdMinor,
    Auto,
}

impl Strategy {
    /// Every strategy that does real work (`auto` only picks one of them), in table order.
    pub const CONCRETE: [Strategy; 5] =
        [Strategy::Copy, Strategy::Cow, Strategy::Reflink, Strategy::Uffd, Strategy::UffdMinor];

    /// Every strategy: the concrete ones, then `auto`.
    pub const ALL: [Strategy; 6] = [
        Strategy::CONCRETE[0],
        Strategy::CONCRETE[1],
        Strategy::CONCRETE[2],
        Strategy::CONCRETE[3],
        Strategy::CONCRETE[4],
        Strategy::Auto,
    ];

    /// The name used on the command line, in the API and in benchmark records.
    pub const fn name(self) -> &'static str {
        match self {
            Strategy::Copy => "copy",
            Strategy::Cow => "cow",
            Strategy::Reflink => "reflink",
            Strategy::Uffd => "uffd",
            Strategy::UffdMinor => "uffd-minor",
            Strategy::Auto => "auto",
        }
    }

    /// The strategy's line of `--help`.
    fn help(self) -> &'static str {
        match self {
            Strategy::Copy => "eager copy into a new memfd (the baseline)",
            Strategy::Cow => "freeze the memory as immutable layers, both sides map them copy-on-write",
            Strategy::Reflink => "FICLONE into a new memfd (needs vmfork's kernel patch)",
            Strategy::Uffd => "the child's memory is filled lazily by a userfaultfd page server",
            Strategy::UffdMinor => "a cow view whose first touch of each page goes through a page server",
            Strategy::Auto => "reflink where the kernel has it, else cow",
        }
    }

    /// Whether the child's memory is served lazily by a page server of the parent
    /// (`uffd`, `uffd-minor`).
    pub fn is_lazy(self) -> bool {
        matches!(self, Strategy::Uffd | Strategy::UffdMinor)
    }

    /// Turns `auto` into the strategy it stands for on this kernel, with the reason.
    pub fn resolve(self) -> (Strategy, String) {
        match self {
            Strategy::Auto => match reflink::probe() {
                Ok(()) => (Strategy::Reflink, "the kernel supports memfd reflink".into()),
                Err(e) => (Strategy::Cow, format!("reflink unavailable ({e}); using cow")),
            },
            s => (s, format!("{} requested", s.name())),
        }
    }
}

impl Named for Strategy {
    const KIND: &'static str = "clone strategy";

    fn all() -> impl Iterator<Item = Self> {
        Strategy::ALL.into_iter()
    }

    fn name(self) -> &'static str {
        Strategy::name(self)
    }
}

crate::names::by_name!(Strategy, value_enum);

impl FromStr for Strategy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Strategy::from_name(s).ok_or_else(|| Error::UnknownStrategy(s.to_string()))
    }
}

/// A contiguous run of a region mapped from one file.
#[derive(Clone, Debug)]
pub struct Extent {
    /// Offset of the run within its region.
    pub offset: usize,
    /// Length in bytes.
    pub len: usize,
    /// The file the run is mapped from.
    pub file: Arc<MemFile>,
    /// Where in `file` the run starts.
    pub file_offset: usize,
}

impl Extent {
    /// Maps this run of its layer copy-on-write at its place in `map`.
    fn map_private(&self, map: &Mapping) -> Result<()> {
        map.map_file(self.offset, self.len, self.file.file().as_raw_fd(), self.file_offset, Share::Private)
    }
}

/// What a region's mapping is made of.
#[derive(Debug)]
pub enum Layout {
    /// One writable file of its own, mapped `MAP_SHARED`.
    File(Arc<MemFile>),
    /// A copy-on-write view of the image of its last freeze: immutable (sealed) layer
    /// files mapped `MAP_PRIVATE` and patches copied in; pages written since are
    /// anonymous.
    Layers(cow::Image),
}

/// One contiguous range of guest-physical memory.
///
/// Its mapping is written by the guest and, for a lazily filled region, by a page
/// server through userfaultfd, behind Rust's back: vmfork reaches it through raw
/// pointers and volatile copies, and reads it as a slice only while nothing fills it
/// (a paused VM's region after `materialize`, or a frozen image). That is what the
/// registrations in `uffd` rely on.
#[derive(Debug)]
pub struct Region {
    guest_addr: u64,
    map: Mapping,
    layout: Mutex<Layout>,
    /// Set while a uffd child is still being filled by its page server.
    lazy: Mutex<Option<uffd::LazyFill>>,
    /// Pages written since the last freeze, where the kernel can track them.
    tracker: Mutex<Option<dirty::WriteTracker>>,
    /// A background fold of the image's patches.
    fold: Mutex<Option<cow::Folding>>,
    /// The next freeze's patch file, being prepared (see [`cow::Spare`]).
    spare: Mutex<Option<cow::Spare>>,
}

impl Region {
    /// A region backed by a fresh memfd of its own.
    fn with_new_file(guest_addr: u64, size: usize, name: &str) -> Result<Self> {
        Self::with_file(guest_addr, Arc::new(MemFile::create(name, size)?))
    }

    /// A region that maps `file` shared and writable.
    pub fn with_file(guest_addr: u64, file: Arc<MemFile>) -> Result<Self> {
        let map = Mapping::reserve(file.size())?;
        map.map_file(0, file.size(), file.file().as_raw_fd(), 0, Share::Shared)?;
        Ok(Self::assemble(guest_addr, map, Layout::File(file)))
    }

    /// A new copy-on-write view of `image`: its layers mapped `MAP_PRIVATE`, then its
    /// patches copied in, oldest first (see [`cow`]).
    pub fn with_layers(guest_addr: u64, size: usize, image: cow::Image) -> Result<Self> {
        let map = Mapping::reserve(size)?;
        for e in &image.extents {
            e.map_private(&map)?;
        }
        for p in &image.patches {
            for (s, e, at) in p.placed() {
                map.fill_from(s, e - s, p.file().file(), at)?;
            }
        }
        Ok(Self::assemble(guest_addr, map, Layout::Layers(image)))
    }

    fn assemble(guest_addr: u64, map: Mapping, layout: Layout) -> Self {
        Region {
            guest_addr,
            map,
            layout: Mutex::new(layout),
            lazy: Mutex::new(None),
            tracker: Mutex::new(None),
            fold: Mutex::new(None),
            spare: Mutex::new(None),
        }
    }

    /// Whether writes to this region are tracked since its last freeze (so the next
    /// freeze costs what was written since, see [`cow`]).
    pub fn tracks_writes(&self) -> bool {
        self.tracker().is_some()
    }

    fn tracker(&self) -> MutexGuard<'_, Option<dirty::WriteTracker>> {
        self.tracker.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fold(&self) -> MutexGuard<'_, Option<cow::Folding>> {
        self.fold.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts preparing the next freeze's patch file, `bytes` long, unless one is still
    /// being prepared: two would only compete for the same CPU and pages.
    fn prepare_spare(&self, bytes: usize) {
        let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
        if spare.as_ref().is_none_or(|s| s.is_finished()) {
            *spare = cow::Spare::prepare(bytes);
        }
    }

    /// The spare patch file, if one is ready; one still being prepared stays for a later
    /// freeze.
    fn take_spare(&self) -> Option<cow::SpareFile> {
        let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
        if spare.as_ref()?.is_finished() { spare.take()?.ready() } else { None }
    }

    /// Starts tracking writes, if not yet, on a region just frozen. Where the kernel
    /// cannot, the next freeze falls back to the page map.
    fn track_writes(&self) {
        let mut tracker = self.tracker();
        if tracker.is_none() {
            *tracker = dirty::WriteTracker::start(self.host_addr() as usize, self.size()).ok();
        }
    }

    /// First guest-physical address.
    pub fn guest_addr(&self) -> u64 {
        self.guest_addr
    }

    /// Size in bytes.
    pub fn size(&self) -> usize {
        self.map.len()
    }

    /// Host virtual address of the first byte (for KVM memory slots).
    pub fn host_addr(&self) -> *mut u8 {
        self.map.as_ptr()
    }

    /// The mapping of the region.
    pub fn mapping(&self) -> &Mapping {
        &self.map
    }

    /// The region's layout, locked.
    pub fn layout(&self) -> MutexGuard<'_, Layout> {
        self.layout.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lazy(&self) -> MutexGuard<'_, Option<uffd::LazyFill>> {
        self.lazy.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Finishes a lazy (uffd) fill: every page not yet served is fetched now and the page
    /// server is stopped. A no-op for other regions.
    pub fn materialize(&self) -> Result<()> {
        let mut lazy = self.lazy();
        if let Some(fill) = lazy.take() {
            fill.finish(self)?;
        }
        Ok(())
    }

    /// Whether pages of this region are still served lazily.
    pub fn is_lazy(&self) -> bool {
        self.lazy().is_some()
    }

    fn contains(&self, addr: u64, len: usize) -> Option<usize> {
        let off = addr.checked_sub(self.guest_addr)? as usize;
        (off.checked_add(len)? <= self.size()).then_some(off)
    }
}

/// A VM's memory: one or more non-overlapping guest-physical regions.
#[derive(Debug)]
pub struct GuestMemory {
    regions: Vec<Region>,
    huge_pages: bool,
}

/// Options for [`GuestMemory::new`].
#[derive(Clone, Debug)]
pub struct MemoryOptions {
    /// Ask for transparent huge pages (`MADV_HUGEPAGE`) on every mapping. The default:
    /// a fork's pause is mostly page-table work, 512 times less of it with 2 MiB pages.
    /// Whether shmem honours it is the host's choice
    /// ([`accounting::huge_pages_unavailable`] says when it will not).
    pub huge_pages: bool,
}

impl MemoryOptions {
    /// 4 KiB pages only: for measuring them, or where page-granular accounting matters.
    pub const SMALL_PAGES: MemoryOptions = MemoryOptions { huge_pages: false };
    /// Transparent huge pages asked for (the default).
    pub const HUGE_PAGES: MemoryOptions = MemoryOptions { huge_pages: true };
}

impl Default for MemoryOptions {
    fn default() -> Self {
        Self::HUGE_PAGES
    }
}

impl GuestMemory {
    /// Creates zeroed memory with regions of the given `(guest address, size)`.
    pub fn new(layout: &[(u64, usize)], opts: &MemoryOptions) -> Result<Self> {
        if layout.is_empty() {
            return Err(Error::BadLayout("no regions".into()));
        }
        let mut sorted: Vec<_> = layout.to_vec();
        sorted.sort_by_key(|r| r.0);
        for pair in sorted.windows(2) {
            if pair[0].0 + pair[0].1 as u64 > pair[1].0 {
                return Err(Error::BadLayout(format!(
                    "regions at {:#x} and {:#x} overlap",
                    pair[0].0, pair[1].0
                )));
            }
        }
        let mut regions = Vec::with_capacity(sorted.len());
        for &(gpa, size) in &sorted {
            check_size(size)?;
            if gpa % PAGE_SIZE as u64 != 0 {
                return Err(Error::BadLayout(format!("region address {gpa:#x} is not page aligned")));
            }
            regions.push(Region::with_new_file(gpa, size, "vmfork-guest")?);
        }
        let mem = GuestMemory { regions, huge_pages: opts.huge_pages };
        mem.apply_options()?;
        Ok(mem)
    }

    /// Creates one zeroed region of `size` bytes at guest address 0.
    pub fn with_size(size: usize, opts: &MemoryOptions) -> Result<Self> {
        Self::new(&[(0, size)], opts)
    }

    /// Assembles memory from regions built elsewhere (a clone, or memory received from
    /// another process).
    pub fn from_regions(regions: Vec<Region>, huge_pages: bool) -> Result<Self> {
        let mem = GuestMemory { regions, huge_pages };
        mem.apply_options()?;
        Ok(mem)
    }

    fn apply_options(&self) -> Result<()> {
        if self.huge_pages {
            for r in &self.regions {
                r.map.advise_huge()?;
            }
        }
        Ok(())
    }

    /// The regions, in order of guest address.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Total bytes of guest memory.
    pub fn size(&self) -> usize {
        self.regions.iter().map(Region::size).sum()
    }

    /// Whether transparent huge pages were asked for.
    pub fn huge_pages(&self) -> bool {
        self.huge_pages
    }

    /// Host address of guest-physical `addr`, valid for `len` bytes.
    ///
    /// Fails with [`Error::PageServerDied`] where the memory was filled lazily by a page
    /// server that has died.
    pub fn host_addr(&self, addr: u64, len: usize) -> Result<*mut u8> {
        for r in &self.regions {
            if let Some(off) = r.contains(addr, len) {
                r.check_served()?;
                // SAFETY: `off + len <= size` (checked by `contains`), so the result stays
                // inside the region's mapping.
                return Ok(unsafe { r.host_addr().add(off) });
            }
        }
        Err(Error::BadGuestAddress { addr, len })
    }

    /// Copies guest memory at `addr` into `buf`.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        let src = self.host_addr(addr, buf.len())?;
        // SAFETY: `src` is valid for `buf.len()` bytes of mapped guest memory (checked by
        // host_addr); guest memory is never referenced by Rust, so no aliasing rule applies.
        unsafe { std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Copies `data` into guest memory at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<()> {
        let dst = self.host_addr(addr, data.len())?;
        // SAFETY: as in `read`, with the roles swapped.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
        Ok(())
    }

    /// Clones this memory with `strategy` (see the module documentation). Returns the
    /// child and the concrete strategy that made it (what `auto` chose).
    pub fn clone_with(&self, strategy: Strategy) -> Result<(GuestMemory, Strategy)> {
        let (concrete, _) = strategy.resolve();
        let mut regions = Vec::with_capacity(self.regions.len());
        for r in &self.regions {
            let child = match concrete {
                Strategy::Copy => copy::clone_region(r, self.huge_pages)?,
                Strategy::Cow => cow::clone_region(r)?,
                Strategy::Reflink => reflink::clone_region(r)?,
                Strategy::Uffd => uffd::clone_region(r)?,
                Strategy::UffdMinor => uffd::clone_region_minor(r)?,
                Strategy::Auto => unreachable!("resolve() never returns auto"),
            };
            regions.push(child);
        }
        Ok((GuestMemory::from_regions(regions, self.huge_pages)?, concrete))
    }

    /// The `cow` clone's freeze alone: every region's current contents become an
    /// immutable image (as [`GuestMemory::clone_with`] `cow` makes them) and this memory
    /// runs on as a view of it, but the child is not mapped here. It is what a fork's
    /// parent does inside its pause; the child's process maps the image and copies its
    /// patches in ([`transfer::Detached`]).
    pub fn freeze_detached(&self) -> Result<transfer::Detached> {
        let mut regions = Vec::with_capacity(self.regions.len());
        for r in &self.regions {
            r.materialize()?;
            let image = cow::freeze(r)?;
            regions.push(transfer::DetachedRegion {
                guest_addr: r.guest_addr(),
                size: r.size(),
                layout: Layout::Layers(image),
            });
        }
        Ok(transfer::Detached::new(regions, self.huge_pages))
    }

    /// Fetches every page a lazy (uffd) clone has not been served yet and stops its page
    /// server, so the memory stands on its own.
    pub fn materialize(&self) -> Result<()> {
        self.regions.iter().try_for_each(Region::materialize)
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // Stop the page server before the mapping it fills goes away.
        if let Some(fill) = self.lazy().take() {
            fill.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Strategy;

    /// The names on the wire (API, fork messages, benchmark JSON): changing one breaks
    /// saved reports and older peers, so they are pinned here.
    const WIRE_NAMES: [&str; 6] = ["copy", "cow", "reflink", "uffd", "uffd-minor", "auto"];

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[arg(long, value_enum)]
        strategy: Strategy,
    }

    #[test]
    fn every_strategy_round_trips_by_one_name_everywhere() {
        use clap::Parser;
        assert_eq!(Strategy::ALL.map(Strategy::name), WIRE_NAMES);
        assert_eq!(Strategy::ALL[..5], Strategy::CONCRETE);
        crate::names::check_round_trips::<Strategy>();
        crate::names::check_value_enum::<Strategy>();
        for s in Strategy::ALL {
            assert_eq!(s.name().parse::<Strategy>().unwrap(), s);
            assert_eq!(Cli::try_parse_from(["t", "--strategy", s.name()]).unwrap().strategy, s);
        }
    }

    #[test]
    fn an_unknown_strategy_is_refused_with_the_list_everywhere() {
        use clap::Parser;
        let list = "copy, cow, reflink, uffd, uffd-minor, auto";
        let e = "fork".parse::<Strategy>().unwrap_err().to_string();
        assert!(e.contains(list), "{e}");
        let e = serde_json::from_str::<Strategy>("\"uffd_minor\"").unwrap_err().to_string();
        assert!(e.contains(list), "{e}");
        let e = Cli::try_parse_from(["t", "--strategy", "fork"]).unwrap_err().to_string();
        assert!(e.contains("[possible values: copy, cow, reflink, uffd, uffd-minor, auto]"), "{e}");
    }

    #[test]
    fn the_lazy_strategies_are_the_page_served_ones() {
        let lazy: Vec<_> = Strategy::ALL.into_iter().filter(|s| s.is_lazy()).collect();
        assert_eq!(lazy, [Strategy::Uffd, Strategy::UffdMinor]);
    }
}
