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
//! # Not done
//! The minor-fault variant (`UFFDIO_CONTINUE` over the image's page cache) would share
//! clean pages between children, but minor faults resolve by mapping the shmem page
//! *shared*, so a later write from the child would reach the image: it needs a private
//! mapping of the image plus `MINOR` registration, which the kernel supports only for
//! shared shmem and hugetlbfs mappings. `cow` already shares clean pages.

mod fence;
pub mod sys;

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;

use super::{Error, Layout, MemFile, PAGE_SIZE, Region, Result, cow};
use sys::{Msg, Uffd};

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
    let child = Region::with_file(
        src.guest_addr(),
        Arc::new(MemFile::create("vmfork-uffd", src.size())?),
    )?;
    let file = match &*child.layout() {
        Layout::File(f) => f.clone(),
        Layout::Layers(_) => unreachable!("Region::with_file maps one file"),
    };
    let fill = LazyFill::start(image, &file, child.host_addr() as usize)?;
    *child.lazy.lock().unwrap_or_else(|p| p.into_inner()) = Some(fill);
    Ok(child)
}

/// The page server and its watchdog, for one lazily filled region.
#[derive(Debug)]
pub struct LazyFill {
    uffd: Arc<Uffd>,
    addr: usize,
    len: usize,
    stopping: Arc<AtomicBool>,
    dead: Arc<AtomicBool>,
    stop_tx: Option<OwnedFd>,
    server: Option<JoinHandle<()>>,
    watchdog: Option<JoinHandle<()>>,
    stats: Arc<ServerStats>,
}

impl LazyFill {
    fn start(image: Region, file: &Arc<MemFile>, addr: usize) -> Result<Self> {
        let len = file.size();
        // Weak, so the fill does not count as another holder of the child's file.
        let file = Arc::downgrade(file);
        let uffd = Arc::new(
            Uffd::open(sys::FEATURE_MISSING_SHMEM | sys::FEATURE_EVENT_REMOVE).map_err(Error::Uffd)?,
        );
        uffd.register_missing(addr, len).map_err(Error::Uffd)?;
        fence::install_handler();
        let (stop_rx, stop_tx) = pipe()?;
        let (alive_rx, alive_tx) = pipe()?;
        let stats = Arc::new(ServerStats::default());
        let stopping = Arc::new(AtomicBool::new(false));
        let dead = Arc::new(AtomicBool::new(false));
        let server = {
            let (uffd, stats) = (uffd.clone(), stats.clone());
            std::thread::Builder::new()
                .name("vmfork-pages".into())
                .spawn(move || {
                    let _alive = alive_tx; // Dropped when this thread ends, however it ends.
                    PageServer {
                        uffd: &uffd,
                        image,
                        addr,
                        len,
                        removed: Vec::new(),
                        stats: &stats,
                    }
                    .run(&stop_rx);
                })
                .map_err(Error::Copy)?
        };
        let watchdog = {
            let (uffd, stopping, dead) = (uffd.clone(), stopping.clone(), dead.clone());
            std::thread::Builder::new()
                .name("vmfork-pages-watch".into())
                .spawn(move || {
                    wait_hangup(&alive_rx);
                    if !stopping.load(Ordering::Acquire) {
                        dead.store(true, Ordering::Release);
                        // The region (and so its file) outlives this thread: Region::drop
                        // stops the fill first.
                        if let Some(file) = file.upgrade() {
                            fence::fence_unserved(&uffd, &file, addr);
                        }
                    }
                })
                .map_err(Error::Copy)?
        };
        Ok(LazyFill {
            uffd,
            addr,
            len,
            stopping,
            dead,
            stop_tx: Some(stop_tx),
            server: Some(server),
            watchdog: Some(watchdog),
            stats,
        })
    }

    /// The page server's counters.
    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// Whether the page server died before the memory was filled.
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Ends the page server as if it had crashed (for tests of the failure path).
    #[doc(hidden)]
    pub fn kill_server(&mut self) {
        self.stop_tx.take();
        if let Some(s) = self.server.take() {
            let _ = s.join();
        }
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
    }

    /// Fetches every page not served yet, then stops the server: the region becomes
    /// ordinary file-backed memory.
    pub(super) fn finish(self, region: &Region) -> Result<()> {
        if self.is_dead() {
            return Err(Error::PageServerDied);
        }
        let file = match &*region.layout() {
            Layout::File(f) => f.clone(),
            Layout::Layers(_) => unreachable!("a lazily filled region maps its own file"),
        };
        for (start, end) in holes(&file) {
            // A read fault on each missing page goes to the server, which fills it.
            region
                .mapping()
                .madvise(start, end - start, libc::MADV_POPULATE_READ)?;
        }
        self.uffd.unregister(self.addr, self.len).map_err(Error::Uffd)?;
        self.stop();
        Ok(())
    }

    /// Stops the server and the watchdog; faults that come later are no longer served.
    pub(super) fn stop(mut self) {
        self.stopping.store(true, Ordering::Release);
        self.kill_server();
    }
}

impl Drop for LazyFill {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        self.kill_server();
        fence::forget(self.addr);
    }
}

impl Region {
    /// The page server of a lazily filled region, if it still has one.
    pub fn with_page_server<T>(&self, f: impl FnOnce(&mut LazyFill) -> T) -> Option<T> {
        self.lazy().as_mut().map(f)
    }

    /// Fails if this region lost its page server before it was filled.
    pub fn check_served(&self) -> Result<()> {
        match &*self.lazy() {
            Some(fill) if fill.is_dead() => Err(Error::PageServerDied),
            _ => Ok(()),
        }
    }
}

/// Ranges of the file that hold no page yet.
fn holes(file: &MemFile) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut pos = 0;
    for (s, e) in file.data_ranges() {
        if s > pos {
            out.push((pos, s));
        }
        pos = e;
    }
    if pos < file.size() {
        out.push((pos, file.size()));
    }
    out
}

struct PageServer<'a> {
    uffd: &'a Uffd,
    image: Region,
    addr: usize,
    len: usize,
    /// Ranges (offsets) the child discarded: they fault back as zeros.
    removed: Vec<(usize, usize)>,
    stats: &'a ServerStats,
}

impl PageServer<'_> {
    fn run(mut self, stop: &OwnedFd) {
        let mut msgs = [Msg::default(); 64];
        let mut retry: Vec<usize> = Vec::new();
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.uffd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: stop.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
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
                    sys::EVENT_REMOVE => self.note_removed(m.arg0 as usize, m.arg1 as usize),
                    _ => {}
                }
            }
            let mut served = 0;
            retry.retain(|&fault| match self.serve(fault) {
                Ok(()) => {
                    served += 1;
                    false
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => true,
                Err(_) => false, // ENOENT/ESRCH: the mapping or its owner went away.
            });
            if served > 0 {
                self.stats.faults.fetch_add(served, Ordering::Relaxed);
                self.stats
                    .service_ns
                    .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
            }
        }
    }

    /// Places the page at `fault` (and missing neighbours) from the image.
    fn serve(&self, fault: usize) -> std::io::Result<()> {
        let page = (fault & !(PAGE_SIZE - 1)).clamp(self.addr, self.addr + self.len - PAGE_SIZE) - self.addr;
        if self.is_removed(page, PAGE_SIZE) {
            return ok_if_exists(self.uffd.zeropage(self.addr + page, PAGE_SIZE).map(|_| PAGE_SIZE))
                .map(|_| ());
        }
        let window = FAULT_AROUND * PAGE_SIZE;
        let start = page - page % window;
        let end = (start + window).min(self.len);
        if !self.is_removed(start, end - start) {
            // SAFETY (of the source pointer): [start, end) lies inside the image mapping,
            // which lives as long as this server.
            let src = self.image.host_addr().wrapping_add(start);
            if let Ok(n) = self.uffd.copy(self.addr + start, src, end - start) {
                self.stats
                    .pages
                    .fetch_add((n / PAGE_SIZE) as u64, Ordering::Relaxed);
                return Ok(());
            }
            // Some neighbour exists already (EEXIST) or the window raced: fall back to
            // the one page that faulted.
        }
        let src = self.image.host_addr().wrapping_add(page);
        let n = ok_if_exists(self.uffd.copy(self.addr + page, src, PAGE_SIZE))?;
        self.stats
            .pages
            .fetch_add((n / PAGE_SIZE) as u64, Ordering::Relaxed);
        Ok(())
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

/// Blocks until the write end of the pipe is closed.
fn wait_hangup(rx: &OwnedFd) {
    loop {
        let mut fd = libc::pollfd {
            fd: rx.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut fd, 1, -1) };
        if rc > 0 && fd.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
            return;
        }
    }
}
