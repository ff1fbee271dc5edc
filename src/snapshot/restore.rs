//! Reading a snapshot back: opening it, and memory that fills from its chunks.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::cache::PackCache;
use super::format::{self, Entry, Index, Kind, Manifest, WorkingSet};
use super::remote::{Remote, RemoteReport, S3Config, S3Url};
use super::{Error, Result, io_err};
use crate::memory::uffd::{self, PageSource};
use crate::memory::{GuestMemory, MemFile, Region};
use crate::vmm::VmState;

/// An open snapshot: manifest, state, index and working set read and checked, packs open
/// (or, in an object store, fetched into the host's pack cache when first needed).
#[derive(Debug)]
pub struct Snapshot {
    /// The directory, or the `s3://` address.
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub index: Index,
    pub working_set: Option<WorkingSet>,
    state_json: String,
    /// Every pack the index points into: the parents', then this snapshot's own.
    packs: Vec<Pack>,
    /// Where each pack starts in the concatenation of all packs.
    pack_starts: Vec<u64>,
    /// The stores packs come from (this snapshot's first, where it is in one), for the
    /// counters; and the host's pack cache they go through.
    remotes: Vec<Arc<Remote>>,
    cache: PackCache,
}

/// An object fetched from a store: its bytes, or `None` where there is none.
type Fetched = Result<Option<Vec<u8>>>;

/// One pack, and where its bytes are read from.
#[derive(Debug)]
enum Pack {
    Local(File),
    /// Fetched whole on first use (one GET of object `name`), checked against `size` and
    /// `crc`, and kept in the host's cache; `file` is it, once there.
    Remote {
        remote: Arc<Remote>,
        name: String,
        size: u64,
        crc: u32,
        file: Mutex<Option<Arc<File>>>,
    },
}

/// Where a snapshot's own packs are.
#[derive(Clone, Copy)]
enum Own<'a> {
    Dir(&'a Path),
    Store(&'a Arc<Remote>),
}

/// Opens pack file `path`, which the manifest says is `size` bytes.
fn local_pack(path: &Path, size: u64) -> Result<File> {
    let f = File::open(path).map_err(|error| Error::Missing { path: path.to_path_buf(), error })?;
    let len = f.metadata().map_err(io_err(path))?.len();
    if len != size {
        return Err(Error::Format {
            file: "snapshot.json",
            what: format!("{} is {len} bytes, the manifest says {size} (truncated?)", path.display()),
        });
    }
    Ok(f)
}

/// Every pack `m`'s index points into, its own where `own` says, its parents' where
/// the manifest does (a parent in a store is reached as `own`'s store is, or as the
/// environment says for a local snapshot); and the stores among them.
fn open_packs(m: &Manifest, own: Own<'_>) -> Result<(Vec<Pack>, Vec<Arc<Remote>>)> {
    let mut remotes: Vec<Arc<Remote>> = match own {
        Own::Store(r) => vec![r.clone()],
        Own::Dir(_) => vec![],
    };
    let in_store = |remote: &Arc<Remote>, i: usize, size, crc| Pack::Remote {
        remote: remote.clone(),
        name: Manifest::pack_name(i),
        size,
        crc,
        file: Mutex::new(None),
    };
    let mut packs = Vec::new();
    for (at, i, size, crc) in m.all_packs() {
        let pack = match (at, own) {
            (None, Own::Dir(dir)) => Pack::Local(local_pack(&dir.join(Manifest::pack_name(i)), size)?),
            (None, Own::Store(r)) => in_store(r, i, size, crc),
            (Some(at), _) => {
                let location = || at.to_string();
                match S3Url::parse(at) {
                    Some(url) => {
                        let url = url.map_err(Error::ParentUrl)?;
                        let remote = match remotes.iter().find(|r| r.url == url) {
                            Some(r) => r.clone(),
                            None => {
                                let r = Arc::new(match own {
                                    Own::Store(r) => r.sibling(url)?,
                                    Own::Dir(_) => Remote::new(url, &S3Config::from_env(None))?,
                                });
                                remotes.push(r.clone());
                                r
                            }
                        };
                        in_store(&remote, i, size, crc)
                    }
                    None if matches!(own, Own::Store(_)) => {
                        return Err(Error::LocalParentInStore { location: location() });
                    }
                    None => {
                        let path = Path::new(at).join(Manifest::pack_name(i));
                        let parent_packs =
                            |e| Error::ParentPacks { location: location(), source: Box::new(e) };
                        Pack::Local(local_pack(&path, size).map_err(parent_packs)?)
                    }
                }
            }
        };
        packs.push(pack);
    }
    Ok((packs, remotes))
}

impl Snapshot {
    /// Opens the snapshot in `dir`, checking everything but the chunks themselves (each
    /// is checked when it is decoded).
    pub fn open(dir: &Path) -> Result<Snapshot> {
        let read = |name: &str| match std::fs::read(dir.join(name)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(dir.join(name))(e)),
        };
        Snapshot::open_with(dir, &read, Own::Dir(dir), PackCache::from_env())
    }

    /// Opens the snapshot at `s3://BUCKET/PREFIX`: manifest, state, index and working set
    /// now; packs when first needed.
    pub fn open_remote(remote: Remote) -> Result<Snapshot> {
        Snapshot::open_remote_with_cache(remote, PackCache::from_env())
    }

    /// [`Snapshot::open_remote`] with the pack cache `cache` instead of the one the
    /// environment names (the benchmarks: a fresh cache per cold restore).
    pub fn open_remote_with_cache(remote: Remote, cache: PackCache) -> Result<Snapshot> {
        let remote = Arc::new(remote);
        let dir = PathBuf::from(remote.url.to_string());
        // The small files all at once: one round trip, not four.
        let names = ["snapshot.json", "index.bin", "ws.bin", "state.json"];
        let got: Vec<Fetched> = std::thread::scope(|s| {
            let handles: Vec<_> = names.iter().map(|n| s.spawn(|| remote.get(n))).collect();
            handles.into_iter().map(|h| h.join().expect("a GET does not panic")).collect()
        });
        let files: Mutex<Vec<(&str, Fetched)>> = Mutex::new(names.into_iter().zip(got).collect());
        let read = |name: &str| {
            let mut files = files.lock().unwrap_or_else(|e| e.into_inner());
            match files.iter().position(|f| f.0 == name) {
                Some(i) => files.swap_remove(i).1,
                None => remote.get(name),
            }
        };
        Snapshot::open_with(&dir, &read, Own::Store(&remote), cache)
    }

    /// What the object-store clients did, for a snapshot with packs in a store: the
    /// requests and bytes of every store, named by this snapshot's location.
    pub fn remote_report(&self) -> Option<RemoteReport> {
        let mut all = self.remotes.iter().map(|r| r.report());
        let mut report = all.next()?;
        for r in all {
            report.requests += r.requests;
            report.bytes_fetched += r.bytes_fetched;
            report.pack_cache_hits += r.pack_cache_hits;
        }
        report.location = self.dir.to_string_lossy().into_owned();
        Some(report)
    }

    fn open_with(
        dir: &Path,
        read_opt: &dyn Fn(&str) -> Result<Option<Vec<u8>>>,
        own: Own<'_>,
        cache: PackCache,
    ) -> Result<Snapshot> {
        let read = |name: &str| {
            read_opt(name)?.ok_or_else(|| Error::Missing {
                path: dir.join(name),
                error: std::io::ErrorKind::NotFound.into(),
            })
        };
        let manifest: Manifest = serde_json::from_slice(&read("snapshot.json")?).map_err(Error::Manifest)?;
        manifest.validate()?;
        if matches!(own, Own::Store(_)) && manifest.pack_crc32c.len() != manifest.packs.len() {
            return Err(Error::Format {
                file: "snapshot.json",
                what: "no pack checksums (pack_crc32c): snapshot and push it again with this vmfork".into(),
            });
        }
        let (packs, remotes) = open_packs(&manifest, own)?;
        let sizes: Vec<u64> = manifest.all_packs().map(|p| p.2).collect();
        let mut pack_starts = Vec::with_capacity(sizes.len());
        let mut total = 0u64;
        for &size in &sizes {
            pack_starts.push(total);
            total += size;
        }
        let index = Index::decode(&read("index.bin")?, manifest.chunks(), total)?;
        // A chunk lies in one pack.
        for (i, e) in index.entries.iter().enumerate() {
            if e.kind != Kind::Zero {
                let p = pack_starts.partition_point(|&s| s <= e.offset) - 1;
                if e.offset + e.len as u64 > pack_starts[p] + sizes[p] {
                    return Err(Error::Format {
                        file: "index.bin",
                        what: format!("chunk {i} spans two packs"),
                    });
                }
            }
        }
        let working_set = match read_opt("ws.bin")? {
            Some(b) => Some(WorkingSet::decode(&b, manifest.chunks())?),
            None => None,
        };
        let state_json = String::from_utf8(read("state.json")?).map_err(Error::StateText)?;
        Ok(Snapshot {
            dir: dir.to_path_buf(),
            manifest,
            index,
            working_set,
            state_json,
            packs,
            pack_starts,
            remotes,
            cache,
        })
    }

    /// The VM state stored beside the memory.
    pub fn state(&self) -> Result<VmState> {
        let state = VmState::from_json(&self.state_json).map_err(Error::State)?;
        if state.memory_size != self.manifest.guest_size() {
            return Err(Error::StateSize { state: state.memory_size, memory: self.manifest.guest_size() });
        }
        Ok(state)
    }

    /// Reads chunk `chunk`'s stored bytes into `buf`.
    pub(super) fn read_stored(&self, chunk: u64, e: &Entry, buf: &mut Vec<u8>) -> Result<()> {
        let p = self.pack_starts.partition_point(|&s| s <= e.offset) - 1;
        buf.resize(e.len as usize, 0);
        let at = e.offset - self.pack_starts[p];
        let io = |error| Error::Io {
            path: PathBuf::from(format!("{} (chunk {chunk})", self.pack_place(p))),
            error,
        };
        match &self.packs[p] {
            Pack::Local(f) => f.read_exact_at(buf, at).map_err(io),
            Pack::Remote { .. } => self.remote_pack(p)?.read_exact_at(buf, at).map_err(io),
        }
    }

    /// Where pack `p` is, for messages.
    fn pack_place(&self, p: usize) -> String {
        let (at, i, _, _) = self.manifest.all_packs().nth(p).expect("pack p exists");
        let owner = at.map_or_else(|| self.dir.to_string_lossy().into_owned(), str::to_string);
        format!("{}/{}", owner.trim_end_matches('/'), Manifest::pack_name(i))
    }

    /// Pack `p`, in a store: from the host's cache, or fetched into it (one GET of the
    /// whole pack, checked against the manifest's size and crc32c). Whoever asks for a
    /// pack being fetched waits for that fetch rather than starting another.
    fn remote_pack(&self, p: usize) -> Result<Arc<File>> {
        let Pack::Remote { remote, name, size, crc, file } = &self.packs[p] else {
            unreachable!("pack {p} is in a store")
        };
        let (size, crc) = (*size, *crc);
        let mut slot = file.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = &*slot {
            return Ok(f.clone());
        }
        let scope = remote.cache_scope();
        let got = match self.cache.get(&scope, name, size, crc) {
            Some(f) => {
                remote.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
                f
            }
            None => {
                let data =
                    remote.get(name)?.ok_or_else(|| Error::PackMissing { object: remote.object(name) })?;
                if data.len() as u64 != size || crc32c::crc32c(&data) != crc {
                    let (object, len) = (remote.object(name), data.len() as u64);
                    return Err(Error::PackChecksum { object, len, size, crc });
                }
                self.cache.put(&scope, name, &data, crc)?
            }
        };
        let got = Arc::new(got);
        *slot = Some(got.clone());
        Ok(got)
    }

    /// Fetches the packs holding `chunks` ahead of need, a few at a time (a remote
    /// snapshot's prefetch: the working set is stored first, so these are few).
    fn fetch_packs_of(&self, chunks: &[u32]) {
        let mut packs: Vec<usize> = chunks
            .iter()
            .map(|&c| self.index.entries[c as usize])
            .filter(|e| e.kind != Kind::Zero)
            .map(|e| self.pack_starts.partition_point(|&s| s <= e.offset) - 1)
            .filter(|&p| matches!(self.packs[p], Pack::Remote { .. }))
            .collect();
        packs.sort_unstable();
        packs.dedup();
        std::thread::scope(|s| {
            for group in packs.chunks(packs.len().div_ceil(4).max(1)) {
                s.spawn(move || group.iter().all(|&p| self.remote_pack(p).is_ok()));
            }
        });
    }

    /// Decodes chunk `chunk` into `out`, checking it.
    pub(super) fn decode(
        &self,
        chunk: u64,
        dec: &mut zstd::bulk::Decompressor<'_>,
        buf: &mut Vec<u8>,
        out: &mut [u8],
    ) -> Result<()> {
        let e = self.index.entries[chunk as usize];
        if e.kind != Kind::Zero {
            self.read_stored(chunk, &e, buf)?;
        }
        format::decode_chunk(chunk, &e, buf, dec, out)
    }

    /// The guest-physical address of chunk `chunk`.
    fn guest_addr(&self, chunk: u64) -> u64 {
        let m = &self.manifest;
        let r = m.regions.iter().rev().find(|r| r.first_chunk <= chunk).expect("chunk 0 is in region 0");
        r.guest_addr + (chunk - r.first_chunk) * m.chunk_size as u64
    }
}

/// Options of [`restore_memory`].
#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    /// Decode every chunk before the VM runs (no userfaultfd).
    pub eager: bool,
    /// Do not prefetch the working set.
    pub no_prefetch: bool,
}

/// What a restore's page servers did, for `vmfork snapshot inspect`.
#[derive(Debug)]
pub struct RestoreStats {
    t0: Instant,
    zero_faults: AtomicU64,
    decoded_faults: AtomicU64,
    prefetched: AtomicU64,
    bytes_decoded: AtomicU64,
    /// First touches by demand fault: (chunk, µs since the memory was made).
    trace: Mutex<Vec<(u32, u32)>>,
    /// Service time of each demand fault that decoded, in ns (the first million).
    fault_ns: Mutex<Vec<u32>>,
    /// The working set this restore prefetched.
    prefetch_set: Vec<u32>,
    eager: bool,
}

/// [`RestoreStats`] as numbers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatsReport {
    pub eager: bool,
    pub zero_faults: u64,
    pub decoded_faults: u64,
    pub prefetched_chunks: u64,
    /// Chunks of the working set this restore set out to prefetch (0: no prefetch).
    #[serde(default)]
    pub prefetch_planned: u64,
    /// Bytes decoded by demand faults and by the prefetch.
    pub bytes_decoded: u64,
    pub fault_p50_us: Option<f64>,
    pub fault_p99_us: Option<f64>,
    /// Demand faults on chunks outside the prefetched working set.
    pub misses: u64,
    /// Of the recorded working set, the share this run touched by demand (meaningful for
    /// a restore without prefetch: one with prefetch does not see touches of prefetched
    /// chunks).
    pub ws_precision: Option<f64>,
    /// Of the chunks this run touched by demand, the share in the working set.
    pub ws_recall: Option<f64>,
    /// The first touches, (chunk, µs since the restore began).
    pub trace: Vec<(u32, u32)>,
    /// What the object-store client did, for a snapshot restored from one.
    #[serde(default)]
    pub remote: Option<RemoteReport>,
}

impl RestoreStats {
    /// The counters now; `ws` is the snapshot's working set, for precision and recall.
    pub fn report(&self, ws: Option<&WorkingSet>) -> StatsReport {
        let trace = self.trace.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut ns = self.fault_ns.lock().unwrap_or_else(|p| p.into_inner()).clone();
        ns.sort_unstable();
        let pct = |p: f64| (!ns.is_empty()).then(|| ns[((ns.len() - 1) as f64 * p) as usize] as f64 / 1e3);
        let prefetched: std::collections::HashSet<u32> = self.prefetch_set.iter().copied().collect();
        let touched: std::collections::HashSet<u32> = trace.iter().map(|t| t.0).collect();
        let (precision, recall) = match ws {
            Some(ws) if !ws.chunks.is_empty() && !touched.is_empty() => {
                let set: std::collections::HashSet<u32> = ws.chunks.iter().map(|c| c.0).collect();
                let both = set.intersection(&touched).count() as f64;
                (Some(both / set.len() as f64), Some(both / touched.len() as f64))
            }
            _ => (None, None),
        };
        StatsReport {
            eager: self.eager,
            zero_faults: self.zero_faults.load(Ordering::Relaxed),
            decoded_faults: self.decoded_faults.load(Ordering::Relaxed),
            prefetched_chunks: self.prefetched.load(Ordering::Relaxed),
            prefetch_planned: self.prefetch_set.len() as u64,
            bytes_decoded: self.bytes_decoded.load(Ordering::Relaxed),
            fault_p50_us: pct(0.5),
            fault_p99_us: pct(0.99),
            misses: touched.iter().filter(|c| !prefetched.contains(c)).count() as u64,
            ws_precision: precision,
            ws_recall: recall,
            trace,
            remote: None,
        }
    }

    /// This run's first touches as a working set (what `record-ws` stores).
    pub fn working_set(&self) -> WorkingSet {
        WorkingSet { chunks: self.trace.lock().unwrap_or_else(|p| p.into_inner()).clone() }
    }

    fn touch(&self, chunk: u64) {
        let us = self.t0.elapsed().as_micros().min(u32::MAX as u128) as u32;
        self.trace.lock().unwrap_or_else(|p| p.into_inner()).push((chunk as u32, us));
    }
}

/// Bytes written over the snapshot's own as its chunks are placed, `(guest-physical
/// address, bytes)`: the restored VM's new identity.
#[derive(Debug, Default)]
struct Patches(Vec<(u64, Vec<u8>)>);

impl Patches {
    /// Whether any patch falls in the chunk of `len` bytes at `gpa`.
    fn touch(&self, gpa: u64, len: usize) -> bool {
        self.0.iter().any(|(at, b)| *at < gpa + len as u64 && gpa < at + b.len() as u64)
    }

    /// Writes the patches' bytes that fall in `chunk` (the chunk at `gpa`).
    fn apply(&self, gpa: u64, chunk: &mut [u8]) {
        for (at, bytes) in &self.0 {
            let (start, end) = ((*at).max(gpa), (at + bytes.len() as u64).min(gpa + chunk.len() as u64));
            if start < end {
                let (from, to) = ((start - at) as usize, (start - gpa) as usize);
                let n = (end - start) as usize;
                chunk[to..to + n].copy_from_slice(&bytes[from..from + n]);
            }
        }
    }
}

/// Builds guest memory for the snapshot `snap`: lazily filled through userfaultfd, or
/// decoded whole with `opts.eager`. The memory holds the restored VM's new identity
/// ([`crate::fork::new_identity`]; start the VM with [`crate::fork::vm_with_new_identity`]).
/// See the module documentation.
pub fn restore_memory(
    snap: Arc<Snapshot>,
    opts: &RestoreOptions,
) -> Result<(GuestMemory, Arc<RestoreStats>)> {
    let m = &snap.manifest;
    let host = host_memory_bytes();
    if host.is_some_and(|h| m.guest_size() > h) {
        return Err(Error::TooBig { guest_mib: m.guest_size() >> 20, host_mib: host.unwrap_or(0) >> 20 });
    }
    let prefetch_set: Vec<u32> = match (&snap.working_set, opts.no_prefetch || opts.eager) {
        (Some(ws), false) => ws.chunks.iter().map(|c| c.0).collect(),
        _ => Vec::new(),
    };
    let stats = Arc::new(RestoreStats {
        t0: Instant::now(),
        zero_faults: AtomicU64::new(0),
        decoded_faults: AtomicU64::new(0),
        prefetched: AtomicU64::new(0),
        bytes_decoded: AtomicU64::new(0),
        trace: Mutex::new(Vec::new()),
        fault_ns: Mutex::new(Vec::new()),
        prefetch_set,
        eager: opts.eager,
    });
    let genid_gpa = snap.state()?.config.genid_gpa();
    let patches = Arc::new(Patches(crate::fork::new_identity(genid_gpa).map_err(Error::Identity)?));
    let cs = m.chunk_size as usize;
    let mut regions = Vec::with_capacity(m.regions.len());
    for (ri, r) in m.regions.iter().enumerate() {
        let file = Arc::new(MemFile::create("vmfork-restore", r.size as usize)?);
        let region = Region::with_file(r.guest_addr, file.clone())?;
        if opts.eager {
            let mut dec = zstd::bulk::Decompressor::new().map_err(io_err(&snap.dir))?;
            let (mut buf, mut out) = (Vec::new(), vec![0u8; cs]);
            for c in 0..r.size / cs as u64 {
                let chunk = r.first_chunk + c;
                if snap.index.entries[chunk as usize].kind == Kind::Zero {
                    continue;
                }
                snap.decode(chunk, &mut dec, &mut buf, &mut out)?;
                file.write_all_at(&out, c * cs as u64)?;
                stats.bytes_decoded.fetch_add(cs as u64, Ordering::Relaxed);
            }
            regions.push(region);
            continue;
        }
        let source = ChunkSource::new(snap.clone(), ri, stats.clone(), patches.clone())?;
        let region = uffd::fill_from_source(region, &file, Box::new(source))?;
        if !stats.prefetch_set.is_empty() {
            let uffd = region.with_page_server(|f| f.uffd()).expect("the region was just made lazy");
            spawn_prefetch(
                snap.clone(),
                ri,
                region.host_addr() as usize,
                uffd,
                stats.clone(),
                patches.clone(),
            );
        }
        regions.push(region);
    }
    let memory = GuestMemory::from_regions(regions, false)?;
    if opts.eager {
        // Nothing faults in eager memory: the identity is written as it is.
        for (gpa, bytes) in &patches.0 {
            memory.write(*gpa, bytes)?;
        }
    }
    Ok((memory, stats))
}

/// Serves the faults of one region from the snapshot's chunks.
struct ChunkSource {
    snap: Arc<Snapshot>,
    region: usize,
    stats: Arc<RestoreStats>,
    dec: zstd::bulk::Decompressor<'static>,
    buf: Vec<u8>,
    out: Vec<u8>,
    patches: Arc<Patches>,
}

impl ChunkSource {
    fn new(
        snap: Arc<Snapshot>,
        region: usize,
        stats: Arc<RestoreStats>,
        patches: Arc<Patches>,
    ) -> Result<Self> {
        let dec = zstd::bulk::Decompressor::new().map_err(io_err(&snap.dir))?;
        let out = vec![0u8; snap.manifest.chunk_size as usize];
        Ok(ChunkSource { snap, region, stats, dec, buf: Vec::new(), out, patches })
    }
}

impl PageSource for ChunkSource {
    fn fetch(&mut self, offset: usize) -> std::io::Result<(usize, usize, Option<&[u8]>)> {
        let t = Instant::now();
        let cs = self.snap.manifest.chunk_size as usize;
        let start = offset - offset % cs;
        let chunk = self.snap.manifest.regions[self.region].first_chunk + (start / cs) as u64;
        self.stats.touch(chunk);
        let gpa = self.snap.guest_addr(chunk);
        if self.snap.index.entries[chunk as usize].kind == Kind::Zero {
            self.stats.zero_faults.fetch_add(1, Ordering::Relaxed);
            if !self.patches.touch(gpa, cs) {
                return Ok((start, cs, None));
            }
            self.out.fill(0);
            self.patches.apply(gpa, &mut self.out);
            return Ok((start, cs, Some(&self.out)));
        }
        if let Err(e) = self.snap.decode(chunk, &mut self.dec, &mut self.buf, &mut self.out) {
            return Err(std::io::Error::other(format!(
                "snapshot {}: {} (guest address {:#x}); the guest cannot run on without it: \
                 restore from an intact copy of the snapshot, or take it again",
                self.snap.dir.display(),
                crate::error::report(&e),
                self.snap.guest_addr(chunk)
            )));
        }
        self.patches.apply(gpa, &mut self.out);
        self.stats.decoded_faults.fetch_add(1, Ordering::Relaxed);
        self.stats.bytes_decoded.fetch_add(cs as u64, Ordering::Relaxed);
        let mut ns = self.stats.fault_ns.lock().unwrap_or_else(|p| p.into_inner());
        if ns.len() < 1 << 20 {
            ns.push(t.elapsed().as_nanos().min(u32::MAX as u128) as u32);
        }
        Ok((start, cs, Some(&self.out)))
    }
}

/// Places the working set's chunks of region `ri` (registered at `addr`) in recorded
/// order, on a thread of lower priority than the demand faults' server.
fn spawn_prefetch(
    snap: Arc<Snapshot>,
    ri: usize,
    addr: usize,
    uffd: Arc<uffd::sys::Uffd>,
    stats: Arc<RestoreStats>,
    patches: Arc<Patches>,
) {
    let _ = std::thread::Builder::new().name("vmfork-prefetch".into()).spawn(move || {
        // SAFETY: setpriority only changes this thread's nice value.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 5) };
        let m = &snap.manifest;
        let (r, cs) = (&m.regions[ri], m.chunk_size as usize);
        let Ok(mut dec) = zstd::bulk::Decompressor::new() else { return };
        // From an object store: the working set's packs first, a few GETs at once.
        snap.fetch_packs_of(&stats.prefetch_set);
        let (mut buf, mut out) = (Vec::new(), vec![0u8; cs]);
        for &c in &stats.prefetch_set {
            let c = c as u64;
            if c < r.first_chunk || c >= r.first_chunk + r.size / cs as u64 {
                continue;
            }
            let dst = addr + (c - r.first_chunk) as usize * cs;
            let gpa = snap.guest_addr(c);
            let placed = if snap.index.entries[c as usize].kind == Kind::Zero && !patches.touch(gpa, cs) {
                uffd.zeropage(dst, cs).map(|()| cs)
            } else {
                // A bad chunk stops the prefetch; the demand fault on it reports it.
                if snap.decode(c, &mut dec, &mut buf, &mut out).is_err() {
                    return;
                }
                patches.apply(gpa, &mut out);
                uffd.copy(dst, &out[..cs])
            };
            match placed {
                Ok(_) => {
                    stats.prefetched.fetch_add(1, Ordering::Relaxed);
                    if snap.index.entries[c as usize].kind != Kind::Zero {
                        stats.bytes_decoded.fetch_add(cs as u64, Ordering::Relaxed);
                    }
                }
                // Already there (a demand fault was first), or the region is gone.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EEXIST | libc::EAGAIN)) => {}
                Err(_) => return,
            }
        }
    });
}

/// MemTotal of this host.
fn host_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 =
        info.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb << 10)
}

#[cfg(test)]
mod tests {
    use super::Patches;

    #[test]
    fn patches_land_in_the_chunks_they_overlap_and_nowhere_else() {
        let p = Patches(vec![(0x1ffe, vec![1, 2, 3, 4]), (0x3000, vec![9])]);
        assert!(p.touch(0x1000, 0x1000) && p.touch(0x2000, 0x1000) && p.touch(0x3000, 0x1000));
        assert!(!p.touch(0x4000, 0x1000) && !p.touch(0, 0x1000));
        let mut a = vec![0u8; 0x1000];
        p.apply(0x1000, &mut a);
        assert_eq!((&a[0xffe..], a[..0xffe].iter().all(|&b| b == 0)), (&[1u8, 2][..], true));
        let mut b = vec![7u8; 0x1000];
        p.apply(0x2000, &mut b);
        assert_eq!(&b[..3], &[3, 4, 7]);
        let mut c = vec![0u8; 0x1000];
        p.apply(0x3000, &mut c);
        assert_eq!(c[0], 9);
    }
}
