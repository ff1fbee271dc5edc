//! `uffd`: the child's memory fills lazily, a page at a time, through userfaultfd.
//!
//! # Design
//! The clone freezes the source exactly as [`cow`](super::cow) does, which gives an
//! immutable *image* of the clone instant while the parent keeps running copy-on-write.
//! (The alternative, write-protecting the parent with uffd-WP and pushing old contents
//! to children before each parent write, puts a round trip on the parent's every first
//! write; freezing costs the parent the same single CoW fault it pays under `cow`.)
//!
//! The child gets an empty memfd of its own, mapped `MAP_SHARED` and registered for
//! missing-page faults. A page server thread answers each fault with `UFFDIO_COPY` from
//! the image, [`FAULT_AROUND`] pages at a time where the neighbours are still missing.
//! Once filled (or [`LazyFill::finish`]ed) the child is ordinary file-backed memory.
//!
//! The server treats `EEXIST` as done (the page arrived another way), retries `EAGAIN`
//! (the address space changed under it), and remembers ranges the child discarded
//! (`UFFD_EVENT_REMOVE`, e.g. `MADV_REMOVE`) so they fault back as zeros, not as stale
//! image contents.
//!
//! # A page server that dies
//! A fault waits in the kernel until someone answers; if the server is gone, nobody
//! will. A watchdog thread holds the read end of a pipe whose write end the server owns:
//! when the server exits for any reason other than [`LazyFill::stop`], the watchdog
//! fences every page never served (`mprotect(PROT_NONE)` over the child file's holes)
//! and wakes the waiters. Their retried access faults with `SIGSEGV`, which a handler
//! installed here recognises: it prints which page was lost and exits the process with
//! [`EXIT_PAGE_SERVER_DIED`]. KVM's own accesses fail with `EFAULT` instead, and
//! [`super::GuestMemory::read`] and friends return [`Error::PageServerDied`] up front.
//!
//! The liveness end can be a pipe to a server thread here or the socket to a parent
//! process serving a forked child's memory ([`RemoteSource`]): the parent dying is the
//! same event. A `uffd-minor` child loses nothing when its server dies (it maps the
//! frozen layers itself), so its watchdog just unregisters and the child carries on as
//! a `cow` view.
//!
//! # The minor-fault variant (`uffd-minor`)
//! The child is a `cow` view of the frozen layers (`MAP_PRIVATE`), registered for minor
//! faults: its pages are all in the layers' page cache already, so the server answers
//! each first touch with `UFFDIO_CONTINUE`, which maps the shared page read-only without
//! copying; a later write copies on write as under `cow`. Clean pages stay shared
//! between all children, and the server sees every first touch (the hook for recording
//! a working set, or for filling the page cache from a compressed snapshot before
//! mapping). Discarded ranges (`MADV_DONTNEED`) revert to the layers, as for any private
//! mapping.
//!
//! # Known gap
//! For `uffd`, a range discarded with `MADV_REMOVE` reads back as zeros; a hole punched
//! with `fallocate(2)` is not reported to the server, which would serve the image's old
//! contents there. Discard guest memory of a lazily filled region with `MADV_REMOVE`.

mod fence;
pub mod sys;

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Instant;

use super::transfer::{Detached, DetachedRegion};
use super::{Error, GuestMemory, Layout, MemFile, PAGE_SIZE, Region, Result, Strategy, cow};
use sys::{Mode, Msg, Uffd};

pub use fence::EXIT_PAGE_SERVER_DIED;

/// Pages served per fault where the neighbours are still missing.
pub const FAULT_AROUND: usize = 16;

/// Counters of one page server.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Faults answered.
    pub faults: AtomicU64,
    /// Pages placed (fault-around places more than one per fault).
    pub pages: AtomicU64,
    /// Nanoseconds spent answering faults (from reading the message to the copy's end).
    pub service_ns: AtomicU64,
}

/// Clones `src` lazily: see the module documentation.
pub(super) fn clone_region(src: &Region) -> Result<Region> {
    src.materialize()?;
    let image = Region::with_layers(src.guest_addr(), src.size(), cow::freeze(src)?)?;
    let file = Arc::new(MemFile::create("vmfork-uffd", src.size())?);
    let child = Region::with_file(src.guest_addr(), file.clone())?;
    // SAFETY: `child` maps `file` at its host address, the target lives with the region,
    // and guest memory is never held by a Rust reference while it fills (see `Region`).
    let target = unsafe { LazyTarget::register(&file, child.host_addr() as usize) }?;
    serve_here(child, target, Fill::Copy(Box::new(image)))
}

/// Clones `src` as a `cow` view whose pages reach the child through minor faults:
/// see the module documentation.
pub(super) fn clone_region_minor(src: &Region) -> Result<Region> {
    src.materialize()?;
    let child = Region::with_layers(src.guest_addr(), src.size(), cow::freeze(src)?)?;
    // SAFETY: `child` is a fresh `MAP_PRIVATE` view of the layers, the target lives with
    // the region, and guest memory is never held by a Rust reference while it fills.
    let target = unsafe { LazyTarget::register_minor(child.host_addr() as usize, child.size()) }?;
    serve_here(child, target, Fill::Continue)
}

/// Where a page server outside this module gets its pages (a snapshot's chunks): the
/// run of the region around a faulting offset and its contents, decoded on demand.
pub trait PageSource: Send + 'static {
    /// The run to place for a fault at `offset` (page aligned, inside the region): its
    /// start and length (page multiples containing `offset`) and its bytes, `None` for
    /// zeros. An error means the page cannot be produced: the server stops, and the
    /// pages it never served are fenced (module documentation), so the guest's access
    /// fails instead of waiting for ever.
    fn fetch(&mut self, offset: usize) -> std::io::Result<(usize, usize, Option<&[u8]>)>;
}

/// Makes `file` (mapped by `child`, all of it, `MAP_SHARED`) fill lazily: every missing
/// page faults to a page server thread here that places what `source` gives.
pub fn fill_from_source(child: Region, file: &Arc<MemFile>, source: Box<dyn PageSource>) -> Result<Region> {
    // SAFETY: `child` maps `file` at its host address, the target lives with the region,
    // and guest memory is never held by a Rust reference while it fills (see `Region`).
    let target = unsafe { LazyTarget::register(file, child.host_addr() as usize) }?;
    serve_here(child, target, Fill::Source(source))
}

/// Starts a page server in this process for `child`, watched by its target.
fn serve_here(child: Region, mut target: LazyTarget, fill: Fill) -> Result<Region> {
    let (alive_rx, alive_tx) = pipe()?;
    let server = PageServer::start(target.uffd().clone(), fill, target.addr, target.len, Some(alive_tx))?;
    target.watch(alive_rx)?;
    *child.lazy() = Some(LazyFill { target, server: Some(server) });
    Ok(child)
}

/// A lazily filled region: the faulting half, and the serving half when the server
/// runs in this process.
#[derive(Debug)]
pub struct LazyFill {
    target: LazyTarget,
    server: Option<PageServer>,
}

impl LazyFill {
    /// A lazily filled region whose page server runs elsewhere (another process, which
    /// received `target.uffd()`).
    pub fn remote(target: LazyTarget) -> Self {
        LazyFill { target, server: None }
    }

    /// `(faults answered, nanoseconds spent)` of the local page server, if any.
    pub fn service_time(&self) -> Option<(u64, u64)> {
        self.server.as_ref().map(|s| {
            let st = s.stats();
            (st.faults.load(Ordering::Relaxed), st.service_ns.load(Ordering::Relaxed))
        })
    }

    /// The userfaultfd the region is registered with, for a helper that places pages
    /// ahead of faults (a snapshot's prefetch).
    pub fn uffd(&self) -> Arc<Uffd> {
        self.target.uffd.clone()
    }

    /// Whether the page server died before the memory was filled.
    pub fn is_dead(&self) -> bool {
        self.target.dead.load(Ordering::Acquire)
    }

    /// Ends the local page server as if it had crashed (for tests of the failure path),
    /// and waits until the watchdog has reacted.
    #[doc(hidden)]
    pub fn kill_server(&mut self) {
        if let Some(mut s) = self.server.take() {
            s.stop();
        }
        while self.target.watchdog.as_ref().is_some_and(|w| !w.is_finished()) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Fetches every page not served yet (none for a minor-fault view, whose pages are
    /// all in the page cache), then stops serving: the region becomes ordinary
    /// file-backed memory.
    pub(super) fn finish(mut self, region: &Region) -> Result<()> {
        if self.is_dead() {
            return Err(Error::PageServerDied);
        }
        // A minor-fault view needs nothing fetched: every page it lacks is in the layers'
        // page cache already, and once unregistered a first touch maps it as under `cow`.
        // (Touching them all here made forking a `uffd-minor` child cost a fault round
        // trip per page of its memory: a chain's last fork many times its first.)
        let unserved = match &self.target.kind {
            Kind::Missing(file) => file.upgrade().map_or_else(Vec::new, |f| holes(&f)),
            Kind::Minor => Vec::new(),
        };
        for (start, end) in unserved {
            // A read fault on each page not served yet goes to the server.
            region.mapping().madvise(start, end - start, super::Advice::PopulateRead)?;
        }
        if self.is_dead() {
            return Err(Error::PageServerDied);
        }
        self.target.stop_watching();
        self.target.uffd.unregister(self.target.addr, self.target.len).map_err(Error::Uffd)?;
        Ok(())
    }

    /// Stops serving; faults that come later are no longer answered.
    pub(super) fn stop(mut self) {
        self.target.stop_watching();
    }
}

impl Drop for LazyFill {
    fn drop(&mut self) {
        // Watchdog first, so stopping the server is not taken for a crash.
        self.target.stop_watching();
        if let Some(mut s) = self.server.take() {
            s.stop();
        }
    }
}

/// The faulting half: a region registered for missing-page faults, plus the watchdog
/// that fences it when the page server goes away (see the module documentation).
#[derive(Debug)]
pub struct LazyTarget {
    uffd: Arc<Uffd>,
    addr: usize,
    len: usize,
    dead: Arc<AtomicBool>,
    kind: Kind,
    watchdog: Option<Helper>,
}

/// What a lazily filled region waits for.
#[derive(Clone, Debug)]
enum Kind {
    /// Missing pages of its own file (weak: the target must not count as another holder
    /// of the child's file); unserved pages are the file's holes.
    Missing(Weak<MemFile>),
    /// Minor faults on a `cow` view: nothing can be lost, the layers hold every page.
    Minor,
}

impl LazyTarget {
    /// Registers the mapping of `file` at `addr` (all of it) for missing-page faults.
    ///
    /// # Safety
    /// `addr` must be where `file` is mapped, and the mapping must be memory no Rust
    /// reference covers for as long as the target lives (a [`Region`]'s guest memory):
    /// see [`Uffd::register`].
    pub unsafe fn register(file: &Arc<MemFile>, addr: usize) -> Result<Self> {
        let features = sys::FEATURE_MISSING_SHMEM | sys::FEATURE_EVENT_REMOVE;
        // SAFETY: the caller's promise, passed on.
        unsafe { Self::open(addr, file.size(), features, Mode::Missing, Kind::Missing(Arc::downgrade(file))) }
    }

    /// Registers a `MAP_PRIVATE` view of shmem layers at `addr` for minor faults.
    ///
    /// # Safety
    /// `[addr, addr + len)` must be such a view, memory no Rust reference covers for as
    /// long as the target lives: see [`Uffd::register`].
    pub unsafe fn register_minor(addr: usize, len: usize) -> Result<Self> {
        // SAFETY: the caller's promise, passed on.
        unsafe { Self::open(addr, len, sys::FEATURE_MINOR_SHMEM, Mode::Minor, Kind::Minor) }
    }

    /// # Safety
    /// As [`Uffd::register`], for `[addr, addr + len)`.
    unsafe fn open(addr: usize, len: usize, features: u64, mode: Mode, kind: Kind) -> Result<Self> {
        let uffd = Uffd::open(features).map_err(Error::Uffd)?;
        // SAFETY: the caller's promise, passed on.
        unsafe { uffd.register(addr, len, mode) }.map_err(Error::Uffd)?;
        fence::install_handler();
        Ok(LazyTarget {
            uffd: Arc::new(uffd),
            addr,
            len,
            dead: Arc::new(AtomicBool::new(false)),
            kind,
            watchdog: None,
        })
    }

    /// The userfaultfd, to hand to the page server.
    pub fn uffd(&self) -> &Arc<Uffd> {
        &self.uffd
    }

    /// Starts the watchdog: when `liveness` hangs up (the server's end closed: it exited,
    /// crashed, or its process died), unserved pages are fenced.
    pub fn watch(&mut self, liveness: OwnedFd) -> Result<()> {
        let (uffd, dead, kind, addr, len) =
            (self.uffd.clone(), self.dead.clone(), self.kind.clone(), self.addr, self.len);
        self.watchdog = Some(Helper::spawn("vmfork-pages-watch", move |stop| {
            if wait_hangup(&liveness, &stop) {
                // The region (and so its file) outlives this thread: LazyFill's drop
                // stops the watchdog before the region unmaps.
                match kind {
                    Kind::Missing(file) => {
                        let unserved = file.upgrade().map_or_else(Vec::new, |f| holes(&f));
                        if unserved.is_empty() {
                            return; // Everything was served: nothing is lost.
                        }
                        dead.store(true, Ordering::Release);
                        fence::fence(&uffd, &unserved, addr, len);
                    }
                    // Every page of a minor view is in layers this process maps itself:
                    // without a server it is simply a `cow` view. Stop reporting faults
                    // and let the waiters retry as ordinary ones.
                    Kind::Minor => {
                        let _ = uffd.unregister(addr, len);
                        let _ = uffd.wake(addr, len);
                    }
                }
            }
        })?);
        Ok(())
    }

    fn stop_watching(&mut self) {
        self.watchdog.take();
    }
}

impl Drop for LazyTarget {
    fn drop(&mut self) {
        self.stop_watching();
        fence::forget(self.addr);
    }
}

/// The serving half: answers the faults of one userfaultfd from an image of the clone
/// instant. Runs wherever the image is: beside the child in one process, or in the
/// parent VMM serving a forked child's memory.
#[derive(Debug)]
pub struct PageServer {
    worker: Option<Helper>,
    stats: Arc<ServerStats>,
}

impl PageServer {
    /// Serves faults in `[addr, addr + len)` of `uffd`'s address space from `fill`.
    /// `liveness` is closed when the server ends, however it ends.
    fn start(
        uffd: Arc<Uffd>,
        fill: Fill,
        addr: usize,
        len: usize,
        liveness: Option<OwnedFd>,
    ) -> Result<Self> {
        let stats = Arc::new(ServerStats::default());
        let worker = {
            let stats = stats.clone();
            Helper::spawn("vmfork-pages", move |stop| {
                let _alive = liveness; // Closed when this thread ends, however it ends.
                let mut worker = Worker { uffd: &uffd, fill, addr, len, removed: Vec::new(), stats: &stats };
                worker.run(&stop);
            })?
        };
        Ok(PageServer { worker: Some(worker), stats })
    }

    /// The server's counters.
    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// Stops serving and waits for the thread.
    pub fn stop(&mut self) {
        self.worker.take();
    }
}

/// A helper thread that runs until the pipe it is given hangs up; dropping the helper
/// closes the pipe and joins the thread.
#[derive(Debug)]
struct Helper {
    stop_tx: Option<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl Helper {
    fn spawn(name: &str, body: impl FnOnce(OwnedFd) + Send + 'static) -> Result<Self> {
        let (stop_rx, stop_tx) = pipe()?;
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || body(stop_rx))
            .map_err(|error| Error::Thread { name: name.into(), error })?;
        Ok(Helper { stop_tx: Some(stop_tx), thread: Some(thread) })
    }
}

impl Helper {
    fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        self.stop_tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Region {
    /// Runs `f` on the lazy fill of this region, if it is still being filled.
    pub fn with_page_server<T>(&self, f: impl FnOnce(&mut LazyFill) -> T) -> Option<T> {
        self.lazy().as_mut().map(f)
    }

    /// Makes this region lazily filled by a page server elsewhere.
    pub fn set_remote_fill(&self, target: LazyTarget) {
        *self.lazy() = Some(LazyFill::remote(target));
    }

    /// Fails if this region lost its page server before it was filled.
    pub fn check_served(&self) -> Result<()> {
        match &*self.lazy() {
            Some(fill) if fill.is_dead() => Err(Error::PageServerDied),
            _ => Ok(()),
        }
    }
}

/// The parent's half of a lazy clone whose child lives in another process: what each
/// region is served from, and a page server per region once the child has registered.
#[derive(Debug)]
pub struct RemoteSource {
    fills: Vec<Option<RemoteFill>>,
    servers: Vec<PageServer>,
}

impl GuestMemory {
    /// Freezes this memory (as `cow` does) and returns what to serve from, plus the
    /// memory to send to the child process, which registers it with
    /// [`GuestMemory::expect_remote_fill`] and sends back its userfaultfds. For `uffd` the
    /// child's memory is empty files of its own; for `uffd-minor` it is a `cow` view of
    /// the frozen layers whose pages get mapped on first touch.
    pub fn lazy_clone_for_remote(&self, strategy: Strategy) -> Result<(RemoteSource, Detached)> {
        let mut fills = Vec::with_capacity(self.regions().len());
        let mut regions = Vec::with_capacity(self.regions().len());
        for r in self.regions() {
            r.materialize()?;
            let image = cow::freeze(r)?;
            let (guest_addr, size) = (r.guest_addr(), r.size());
            let layout = match strategy {
                Strategy::Uffd => {
                    fills.push(Some(RemoteFill::Copy { guest_addr, size, image }));
                    Layout::File(Arc::new(MemFile::create("vmfork-uffd", size)?))
                }
                Strategy::UffdMinor => {
                    fills.push(Some(RemoteFill::Continue));
                    Layout::Layers(image)
                }
                other => return Err(Error::BadLayout(format!("{other} is not a lazy strategy"))),
            };
            regions.push(DetachedRegion { guest_addr, size, layout });
        }
        let child = Detached::new(regions, self.huge_pages());
        Ok((RemoteSource { fills, servers: Vec::new() }, child))
    }

    /// The child's half: registers every region for faults to be served by the process
    /// at the other end of `liveness` (missing pages of a region's own file, or minor
    /// faults of a `cow` view); when that end closes before the memory is filled,
    /// unserved pages are fenced. Returns each region's userfaultfd and the address it
    /// was registered at, for [`RemoteSource::serve`].
    pub fn expect_remote_fill(&self, liveness: &impl AsFd) -> Result<Vec<(Arc<Uffd>, usize)>> {
        let mut out = Vec::with_capacity(self.regions().len());
        for r in self.regions() {
            let addr = r.host_addr() as usize;
            // `addr` is where the region maps its file or layers, the target is kept by
            // the region itself, and guest memory is never held by a Rust reference while
            // it fills (see `Region`).
            let mut target = match &*r.layout() {
                // SAFETY: as said above, for the region's file.
                Layout::File(f) => unsafe { LazyTarget::register(f, addr) }?,
                // SAFETY: as said above, for its view of the layers.
                Layout::Layers(_) => unsafe { LazyTarget::register_minor(addr, r.size()) }?,
            };
            target.watch(liveness.as_fd().try_clone_to_owned().map_err(Error::Dup)?)?;
            out.push((target.uffd().clone(), target.addr));
            r.set_remote_fill(target);
        }
        Ok(out)
    }
}

/// The child's half of the userfaultfd hand-back of a lazy fork: registers `memory`
/// (received from the page server's process) for remote fill, watched through `sock`
/// ([`GuestMemory::expect_remote_fill`]), and sends each region's userfaultfd with its
/// range over `sock`, in region order. The page server's half is
/// [`RemoteSource::serve_handed_back`]; nothing else speaks this message.
pub fn hand_back(memory: &GuestMemory, sock: &std::os::unix::net::UnixStream) -> Result<()> {
    let targets = memory.expect_remote_fill(sock)?;
    let ranges: Vec<(usize, usize)> =
        targets.iter().zip(memory.regions()).map(|((_, a), r)| (*a, r.size())).collect();
    let fds: Vec<_> = targets.iter().map(|(u, _)| u.as_fd()).collect();
    let json = serde_json::to_vec(&ranges).expect("ranges serialize");
    crate::wire::send(sock, crate::wire::Kind::HandBack, &json, &fds).map_err(Error::Transfer)
}

impl RemoteSource {
    /// The page server's half of the hand-back ([`hand_back`]): serves each region
    /// through the userfaultfd and range the child handed back in `frame` (a
    /// [`crate::wire::Kind::HandBack`] frame; the caller receives it, since the child may
    /// answer with another message instead).
    pub fn serve_handed_back(&mut self, frame: crate::wire::Frame) -> Result<()> {
        let (json, fds) = (frame.payload, frame.fds);
        let ranges: Vec<(usize, usize)> = serde_json::from_slice(&json)
            .map_err(|e| Error::Uffd(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
        if ranges.len() != fds.len() || ranges.len() != self.fills.len() {
            return Err(Error::Uffd(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "the child handed back {} ranges and {} userfaultfds for {} regions",
                    ranges.len(),
                    fds.len(),
                    self.fills.len()
                ),
            )));
        }
        for (i, (fd, (addr, len))) in fds.into_iter().zip(ranges).enumerate() {
            self.serve(i, Uffd::from_fd(fd), addr, len)?;
        }
        Ok(())
    }

    /// Starts serving region `index` of the child through `uffd`, registered at `addr`
    /// in the child's address space, `len` bytes.
    pub fn serve(&mut self, index: usize, uffd: Uffd, addr: usize, len: usize) -> Result<()> {
        let fill =
            self.fills.get_mut(index).and_then(Option::take).ok_or_else(|| {
                Error::BadLayout(format!("region {index} does not exist or is already served"))
            })?;
        let fill = match fill {
            RemoteFill::Copy { size, .. } if size != len => {
                return Err(Error::SizeMismatch {
                    what: "the image of a lazily filled region",
                    expected: len,
                    got: size,
                });
            }
            // Mapped only now, after the parent's pause: the image is immutable, so the
            // parent running meanwhile changes nothing in it.
            RemoteFill::Copy { guest_addr, size, image } => {
                Fill::Copy(Box::new(Region::with_layers(guest_addr, size, image)?))
            }
            RemoteFill::Continue => Fill::Continue,
        };
        self.servers.push(PageServer::start(Arc::new(uffd), fill, addr, len, None)?);
        Ok(())
    }

    /// How many page servers (one a region) this source runs.
    pub fn servers(&self) -> usize {
        self.servers.len()
    }
}

/// The page servers a VM runs for its lazily filled children in other processes, each
/// child's [`RemoteSource`] with the parent's end of the socket to it (the child takes
/// that socket closing as its page server's death). Owned by the serving VM; a child's
/// servers are dropped (threads joined, userfaultfds and socket closed) once it has
/// exited, through [`PageServers::release`].
#[derive(Debug, Default)]
pub struct PageServers {
    children: std::sync::Mutex<Vec<Served>>,
    next: AtomicU64,
}

/// One child's entry in [`PageServers`]: its key, what serves it, the socket to it.
type Served = (u64, RemoteSource, std::os::unix::net::UnixStream);

impl PageServers {
    /// Keeps `source` serving the child at the other end of `link`; returns the key that
    /// [`PageServers::release`] takes.
    pub fn adopt(&self, source: RemoteSource, link: std::os::unix::net::UnixStream) -> u64 {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().push((key, source, link));
        key
    }

    /// Stops the page servers of the child `key` names (joining their threads) and
    /// closes its socket; [`PageServers::count`] counts them until they are gone.
    pub fn release(&self, key: u64) {
        self.lock().retain(|(k, ..)| *k != key);
    }

    /// How many page servers run, over all children.
    pub fn count(&self) -> usize {
        self.lock().iter().map(|(_, source, _)| source.servers()).sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Served>> {
        self.children.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The complement of sorted, disjoint `runs` within `[0, len)`.
fn gaps(runs: &[(usize, usize)], len: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut pos = 0;
    for &(s, e) in runs {
        if s > pos {
            out.push((pos, s));
        }
        pos = e;
    }
    if pos < len {
        out.push((pos, len));
    }
    out
}

/// Ranges of the file that hold no page yet.
fn holes(file: &MemFile) -> Vec<(usize, usize)> {
    gaps(&file.data_ranges(), file.size())
}

/// Where served pages come from.
/// What a [`RemoteSource`] will serve a region from, before it serves it.
#[derive(Debug)]
enum RemoteFill {
    /// Copied from a view of this image, mapped when serving starts.
    Copy { guest_addr: u64, size: usize, image: cow::Image },
    /// Already in the page cache the child maps; only mapped there.
    Continue,
}

enum Fill {
    /// Copied from this image of the clone instant.
    Copy(Box<Region>),
    /// Already in the page cache; only mapped.
    Continue,
    /// Produced on demand (decoded from a snapshot).
    Source(Box<dyn PageSource>),
}

impl std::fmt::Debug for Fill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fill::Copy(r) => f.debug_tuple("Copy").field(r).finish(),
            Fill::Continue => f.write_str("Continue"),
            Fill::Source(_) => f.write_str("Source"),
        }
    }
}

struct Worker<'a> {
    uffd: &'a Uffd,
    fill: Fill,
    addr: usize,
    len: usize,
    /// Ranges (offsets) the child discarded: they fault back as zeros.
    removed: Vec<(usize, usize)>,
    stats: &'a ServerStats,
}

impl Worker<'_> {
    fn run(&mut self, stop: &OwnedFd) {
        let mut msgs = [Msg::default(); 64];
        let mut retry: Vec<usize> = Vec::new();
        loop {
            let mut fds = [
                libc::pollfd { fd: self.uffd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            ];
            let timeout = if retry.is_empty() { -1 } else { 1 };
            // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
            if rc < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                return;
            }
            if fds[1].revents != 0 {
                return; // Asked to stop (or the owner is gone).
            }
            let n = match self.uffd.read(&mut msgs) {
                Ok(n) => n,
                Err(_) => return,
            };
            let started = Instant::now();
            for m in &msgs[..n] {
                match m.event {
                    sys::EVENT_PAGEFAULT => retry.push(m.arg1 as usize),
                    // Discarding a private (minor) view reverts it to the layers, which the
                    // next fault maps again; only a shared file's discards read as zeros.
                    sys::EVENT_REMOVE if matches!(self.fill, Fill::Copy(_)) => {
                        self.note_removed(m.arg0 as usize, m.arg1 as usize)
                    }
                    _ => {}
                }
            }
            let mut served = 0;
            let mut failed = false;
            retry.retain(|&fault| match self.serve(fault) {
                Ok(()) => {
                    served += 1;
                    false
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => true,
                // The source cannot produce the page: stop serving, so the watchdog
                // fences what was never served and the waiting access fails.
                Err(e) if e.raw_os_error().is_none() => {
                    eprintln!("vmfork: page server: {e}; pages not served yet are lost");
                    failed = true;
                    false
                }
                Err(_) => false, // ENOENT/ESRCH: the mapping or its owner went away.
            });
            if served > 0 {
                self.stats.faults.fetch_add(served, Ordering::Relaxed);
                self.stats.service_ns.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
            }
            if failed {
                return;
            }
        }
    }

    /// Places the page at `fault`, and its neighbours in a [`FAULT_AROUND`] window where
    /// they are still missing, falling back to the one page when the window fails
    /// (`EEXIST`: some neighbour is there already).
    fn serve(&mut self, fault: usize) -> std::io::Result<()> {
        let page = (fault & !(PAGE_SIZE - 1)).clamp(self.addr, self.addr + self.len - PAGE_SIZE) - self.addr;
        if let Fill::Source(source) = &mut self.fill {
            if self.removed.iter().any(|&(s, e)| page < e && s < page + PAGE_SIZE) {
                return ok_if_exists(self.uffd.zeropage(self.addr + page, PAGE_SIZE).map(|_| PAGE_SIZE))
                    .map(|_| ());
            }
            let (start, len, data) = source.fetch(page)?;
            let placed = match data {
                None => self.uffd.zeropage(self.addr + start, len).map(|_| len),
                // `data` is `len` bytes the source owns until the next fetch.
                Some(bytes) => self.uffd.copy(self.addr + start, &bytes[..len]),
            };
            let n = match placed {
                // Some page of the run is there already (placed by a prefetch): each page
                // on its own, so the rest of the decoded run is not decoded again later.
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) && len > PAGE_SIZE => {
                    let mut n = 0;
                    for at in (0..len).step_by(PAGE_SIZE) {
                        let dst = self.addr + start + at;
                        n += ok_if_exists(match data {
                            None => self.uffd.zeropage(dst, PAGE_SIZE).map(|_| PAGE_SIZE),
                            Some(bytes) => self.uffd.copy(dst, &bytes[at..at + PAGE_SIZE]),
                        })?;
                    }
                    n
                }
                other => ok_if_exists(other)?,
            };
            self.stats.pages.fetch_add((n / PAGE_SIZE) as u64, Ordering::Relaxed);
            return Ok(());
        }
        if self.is_removed(page, PAGE_SIZE) {
            return ok_if_exists(self.uffd.zeropage(self.addr + page, PAGE_SIZE).map(|_| PAGE_SIZE))
                .map(|_| ());
        }
        let window = FAULT_AROUND * PAGE_SIZE;
        let start = page - page % window;
        let end = (start + window).min(self.len);
        if !self.is_removed(start, end - start) {
            if let Ok(n) = self.place(start, end - start) {
                self.stats.pages.fetch_add((n / PAGE_SIZE) as u64, Ordering::Relaxed);
                return Ok(());
            }
        }
        let n = ok_if_exists(self.place(page, PAGE_SIZE))?;
        self.stats.pages.fetch_add((n / PAGE_SIZE) as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Fills `[offset, offset + len)` of the target; returns the bytes placed.
    fn place(&self, offset: usize, len: usize) -> std::io::Result<usize> {
        match &self.fill {
            Fill::Copy(image) => {
                assert!(offset + len <= image.size());
                // SAFETY: the range lies inside the image mapping (checked above), which
                // is readable and lives as long as this worker; nothing writes it while
                // the bytes are copied (the image is frozen layers, mapped private).
                let src = unsafe { std::slice::from_raw_parts(image.host_addr().add(offset), len) };
                self.uffd.copy(self.addr + offset, src)
            }
            Fill::Continue => self.uffd.continue_range(self.addr + offset, len),
            Fill::Source(_) => unreachable!("serve() places source pages itself"),
        }
    }

    fn note_removed(&mut self, start: usize, end: usize) {
        let s = start.max(self.addr) - self.addr;
        let e = end.min(self.addr + self.len).saturating_sub(self.addr);
        if s < e {
            self.removed.push((s, e));
        }
    }

    fn is_removed(&self, start: usize, len: usize) -> bool {
        self.removed.iter().any(|&(s, e)| start < e && s < start + len)
    }
}

/// `EEXIST` means the page is already there: as good as served.
fn ok_if_exists(r: std::io::Result<usize>) -> std::io::Result<usize> {
    match r {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(0),
        other => other,
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| Error::Uffd(e.into()))
}

/// Blocks until `liveness` hangs up (true) or `stop` does (false).
fn wait_hangup(liveness: &OwnedFd, stop: &OwnedFd) -> bool {
    loop {
        let mut fds = [
            libc::pollfd { fd: liveness.as_raw_fd(), events: 0, revents: 0 },
            libc::pollfd { fd: stop.as_raw_fd(), events: 0, revents: 0 },
        ];
        // SAFETY: two valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc <= 0 {
            continue;
        }
        if fds[1].revents != 0 {
            return false;
        }
        if fds[0].revents & (libc::POLLHUP | libc::POLLERR | libc::POLLRDHUP) != 0 {
            return true;
        }
    }
}
