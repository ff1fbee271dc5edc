//! The `snapshot` suite: taking a snapshot of a running VM (the built-in guest) and
//! restoring it, every restore strategy side by side, per guest size, for two memory
//! contents:
//!
//! * `idle`: the guest booted and parked (`idle` workload): memory is nearly all zero;
//! * `written25`: the bench writes 25 % of guest memory (the workload area, from 1 MiB)
//!   from the host, through the VM's guest memory mapping with the VM paused, with
//!   text-like bytes (log lines of a made-up web service; see [`text_pool`]): no guest
//!   workload writes compressible data (`touch` increments one word per page). The
//!   guest then runs `touch` over that area (one word per page per pass, sequentially),
//!   so a restored VM's working set is that 25 %.
//!
//! What each column is:
//!
//! * `zstd`: the snapshot as [`snapshot::take`] writes it (zstd chunks, 8 KiB);
//! * `raw`: the same frozen image written uncompressed into one file (zero chunks left
//!   as holes: a sparse file), for the `file-*` restores;
//! * `cow-fork`: a `cow` fork's parent pause, in this process (pause, capture the state,
//!   [`GuestMemory::clone_with`] `cow`, resume), of a VM made the same way: what `take`
//!   claims its pause costs;
//! * `file-private`: the raw file mapped `MAP_PRIVATE` (Firecracker's File backend);
//! * `file-uffd`: the raw file served through userfaultfd by a [`PageSource`] that
//!   reads one chunk (8 KiB, as the zstd path) with `pread` per fault and places it with
//!   `UFFDIO_COPY` (`UFFDIO_ZEROPAGE` where it reads all zero, as the zstd server does
//!   for zero chunks);
//! * `zstd-uffd`: [`snapshot::restore_memory`] without prefetch (the real restore path);
//! * `zstd-prefetch`: the same with the working set recorded from the first `zstd-uffd`
//!   restore's first touches ([`snapshot::record_working_set`]) prefetched;
//! * `eager`: [`snapshot::restore_memory`] with `eager`: every chunk decoded first.
//!
//! Metrics (medians over [`Plan`]'s repetitions):
//!
//! * `pause_ns` (`zstd`, `cow-fork`): the VM's vCPUs stopped during `take` (its own
//!   `Summary::pause_ns`), and the `cow` fork pause; each of a fresh VM never frozen
//!   before (a second freeze copies the pages written since the first into a new layer,
//!   inside the pause: that cost grows with the pages dirtied, for both);
//! * `write_mib_s` (`zstd`, `raw`): guest bytes / seconds to write them: `take`'s
//!   `write_secs` (compressing and writing the packs, after the VM resumed; the
//!   `written25` guest keeps running its `touch` pass meanwhile), and for `raw`
//!   pwrite-ing every non-zero chunk from an eagerly restored copy of the snapshot, then
//!   `fsync`;
//! * `stored_bytes`: the chunks' stored bytes (`zstd`, index and manifest not counted),
//!   the raw file's allocated blocks (`raw`);
//! * `ratio`: non-zero guest bytes (whole chunks) / stored bytes;
//! * `restore_ns`: request → vCPUs running, as `vmfork restore` does it: open the
//!   snapshot (the `file-*` strategies read `state.json` only), build the memory, new
//!   identity, [`Vm::restore`], resume returned;
//! * `ready_ns`: request → the restored guest has touched its working set: its first
//!   report after the resume for `idle`, its second for `written25` (the `touch` pass it
//!   was in, then one whole pass; so it includes up to one pass over already present
//!   pages, as the fork suite's child workload does);
//! * `ws_touch_ns`: the same without a VM: request → a host thread has read one byte
//!   of every page of the recorded working set's chunks, in recorded order, from memory
//!   restored by the strategy (what the page servers and the prefetch alone cost,
//!   without the guest's own faults: see the notes of the benchmark report);
//! * `faults` (`file-uffd`, `zstd-*`): faults the page server answered in that restore
//!   (decoded + zero chunks), up to `ready`; `prefetched`: chunks the prefetch placed;
//! * `touch_p50_ns`, `touch_p99_ns`: a host thread reads one byte at the first page of
//!   each sampled chunk of freshly restored memory (no VM), in a shuffled order, and
//!   times each read: the first-touch cost every lazy strategy is measured by alike
//!   (`eager` is the floor: a page already in memory, mapped on first touch). Sampled:
//!   the non-zero chunks for `written25`, every chunk for `idle` (zero chunks: what an
//!   idle guest faults on), at most [`Plan::touch_samples`];
//! * `srv_p50_ns`, `srv_p99_ns` (`file-uffd`, `zstd-uffd`): in that same loop, the page
//!   server's own time per fault on a non-zero chunk, from the fetch's start until the
//!   chunk's bytes are ready (read, or read + decode + checksum), without the placing
//!   (`StatsReport` for zstd, the same clock points in the raw source here).
//!
//! Every file is in the page cache when read (it was just written): these are warm
//! restores.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{
    BenchError, BenchOptions, Error, Metric, Ratio, Record, Scenario, Subject, Suite, Unit, human_bytes, note,
};
use crate::memory::cow::Image;
use crate::memory::uffd::{self, PageSource};
use crate::memory::{Extent, GuestMemory, MemFile, MemoryOptions, PAGE_SIZE, Region, Strategy};
use crate::snapshot::format::{Kind, is_zero};
use crate::snapshot::{self, RestoreOptions, RestoreStats, Snapshot, TakeOptions};
use crate::vmm::{Vm, VmConfig, VmState, Workload, guest};

const SUITE: Suite = Suite::Snapshot;
/// `--quick`'s only size.
const QUICK: usize = 64 << 20;
/// The default sizes; each runs only where [`room`] finds space for it. Not 4 GiB: it
/// fits in memory, but a `written25` restore's guest pass over its 1 GiB takes 15–30 s
/// per strategy and round on two shared cores (`--size 4G` runs it).
const SIZES: [usize; 2] = [256 << 20, 1 << 30];

/// How much one run measures.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// Snapshots taken (and `cow` pauses) per size and contents; medians.
    pub takes: usize,
    /// Restores per strategy; medians.
    pub restores: usize,
    /// Chunks first-touched per strategy in the touch loop.
    pub touch_samples: usize,
}

impl Plan {
    pub const FULL: Plan = Plan { takes: 3, restores: 3, touch_samples: 32768 };
    /// `--quick`: each measurement once, fewer touches.
    pub const QUICK: Plan = Plan { takes: 1, restores: 1, touch_samples: 4096 };
}

/// What guest memory holds when the snapshot is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Contents {
    Idle,
    Written25,
}

impl Contents {
    /// The records' scenario.
    pub(super) fn scenario(self) -> Scenario {
        match self {
            Contents::Idle => Scenario::Idle,
            Contents::Written25 => Scenario::Written25,
        }
    }
}

/// How a restore gets its memory (a column of the snapshot suite: [`super::Subject::Restore`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Restore {
    FilePrivate,
    FileUffd,
    ZstdUffd,
    ZstdPrefetch,
    Eager,
}

/// Table order.
pub(super) const RESTORES: [Restore; 5] =
    [Restore::FilePrivate, Restore::FileUffd, Restore::ZstdUffd, Restore::ZstdPrefetch, Restore::Eager];

impl Restore {
    pub(super) fn name(self) -> &'static str {
        match self {
            Restore::FilePrivate => "file-private",
            Restore::FileUffd => "file-uffd",
            Restore::ZstdUffd => "zstd-uffd",
            Restore::ZstdPrefetch => "zstd-prefetch",
            Restore::Eager => "eager",
        }
    }
}

/// A directory for a suite's snapshots and files in this run, removed when dropped.
pub(super) struct WorkDir(pub(super) PathBuf);

impl WorkDir {
    pub(super) fn new(suite: &str) -> Result<Self, BenchError> {
        let dir = std::env::temp_dir().join(format!("vmfork-bench-{suite}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(Error::io(format!("cannot create {}", dir.display())))?;
        Ok(WorkDir(dir))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(super) fn run(opts: &BenchOptions, out: &mut Vec<Record>) -> Result<(), BenchError> {
    let sizes = match (&opts.sizes[..], opts.quick) {
        ([], true) => vec![QUICK],
        ([], false) => SIZES.to_vec(),
        (sizes, _) => sizes.to_vec(),
    };
    let plan = if opts.quick { Plan::QUICK } else { Plan::FULL };
    let skip_size = |out: &mut Vec<Record>, size: usize, why: &str| {
        eprintln!("  skipped at {}: {why}", human_bytes(size as u64));
        for c in [Contents::Idle, Contents::Written25] {
            out.push(Record::skipped(SUITE, c.scenario(), Subject::All, size as u64, Metric::RestoreNs, why));
        }
    };
    if let Err(e) = kvm_ioctls::Kvm::new() {
        for &size in &sizes {
            skip_size(out, size, &format!("no KVM: {e}"));
        }
        return Ok(());
    }
    let work = WorkDir::new("snapshot")?;
    for &size in &sizes {
        eprintln!("snapshot suite at {}", human_bytes(size as u64));
        if let Err(e) = room(size, &work.0) {
            skip_size(out, size, &note(&e));
            continue;
        }
        for contents in [Contents::Idle, Contents::Written25] {
            eprintln!("  {}", contents.scenario());
            let dir = work.0.join(format!("{}-{}", contents.scenario(), human_bytes(size as u64)));
            let result = measure(size, contents, opts.huge_pages, plan, &dir, out);
            let _ = std::fs::remove_dir_all(&dir);
            if let Err(e) = result {
                let why = note(&e);
                let (sc, pause) = (contents.scenario(), Metric::PauseNs);
                eprintln!("  {sc}: {why}");
                out.push(Record::skipped(SUITE, sc, Subject::All, size as u64, pause, &why));
            }
        }
    }
    Ok(())
}

/// Whether this machine has room for the suite at `size`: memory for the source VM (a
/// quarter of it written, plus as much again copied on write while the snapshot is
/// written) and one restored VM at a time, and disk for a snapshot and a sparse raw
/// file beside it.
pub(super) fn room(size: usize, dir: &Path) -> Result<(), BenchError> {
    let (guest, needs) = (size as u64, size as u64 + (512 << 20));
    let available = super::meminfo("MemAvailable");
    if available < needs {
        return Err(Error::NoMemory { available, guest, needs });
    }
    let free =
        nix::sys::statvfs::statvfs(dir).map(|s| s.blocks_available() * s.fragment_size()).map_err(|e| {
            Error::Io { what: format!("cannot see how much room {} has", dir.display()), source: e.into() }
        })?;
    let needs = size as u64 / 2 + (256 << 20);
    if free < needs {
        return Err(Error::NoDisk { free, dir: dir.to_path_buf(), guest, needs });
    }
    Ok(())
}

pub(super) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The workload area a `written25` guest holds data in: `(first guest-virtual address,
/// MiB)`.
fn written_area(size: usize) -> (u64, u64) {
    (guest::AREA_GPA, (size as u64 / 4) >> 20)
}

/// Everything measured for one size and contents; snapshots go into `dir`.
fn measure(
    size: usize,
    contents: Contents,
    huge: bool,
    plan: Plan,
    dir: &Path,
    out: &mut Vec<Record>,
) -> Result<(), BenchError> {
    std::fs::create_dir_all(dir).map_err(Error::io(format!("cannot create {}", dir.display())))?;
    let (sc, sz) = (contents.scenario(), size as u64);
    let snap_dir = dir.join("snapshot");
    let raw_path = dir.join("memory.raw");

    // The snapshot, and a cow fork's pause beside it: each on a VM of its own, never
    // frozen before (a VM frozen before pays for copying the pages dirtied since in its
    // next pause, snapshot or fork alike).
    let (mut pauses, mut cow_pauses, mut writes) = (Vec::new(), Vec::new(), Vec::new());
    let mut summary = None;
    for i in 0..plan.takes {
        let d = if i + 1 == plan.takes { snap_dir.clone() } else { dir.join(format!("take{i}")) };
        let vm = source_vm(size, contents, huge)?;
        let taken = snapshot::take(&vm, "bench", false, &d, &TakeOptions::default(), None, &mut |_| {});
        vm.stop();
        drop(vm);
        let s = taken?;
        pauses.push(s.pause_ns as f64);
        writes.push(s.guest_bytes as f64 / (1 << 20) as f64 / s.write_secs);
        if d != snap_dir {
            let _ = std::fs::remove_dir_all(&d);
        }
        summary = Some(s);
        let vm = source_vm(size, contents, huge)?;
        let pause = cow_pause(&vm);
        vm.stop();
        cow_pauses.push(pause?);
    }
    let summary = summary.ok_or(Error::NoSnapshot)?;
    out.push(Record::value(SUITE, sc, Subject::Zstd, sz, Metric::PauseNs, median(pauses), Unit::Ns));
    out.push(Record::value(SUITE, sc, Subject::Zstd, sz, Metric::WriteMibS, median(writes), Unit::MibPerSec));
    out.push(Record::value(
        SUITE,
        sc,
        Subject::Zstd,
        sz,
        Metric::StoredBytes,
        summary.stored_bytes as f64,
        Unit::Bytes,
    ));
    out.push(Record::value(SUITE, sc, Subject::Zstd, sz, Metric::Ratio, summary.ratio, Unit::X));
    out.push(Record::value(SUITE, sc, Subject::CowFork, sz, Metric::PauseNs, median(cow_pauses), Unit::Ns));

    let nonzero = (summary.chunks - summary.zero_chunks) * TakeOptions::default().chunk_size as u64;
    let raw = match write_raw(&snap_dir, &raw_path) {
        Ok((secs, allocated)) => {
            out.push(Record::value(
                SUITE,
                sc,
                Subject::Raw,
                sz,
                Metric::WriteMibS,
                sz as f64 / (1 << 20) as f64 / secs,
                Unit::MibPerSec,
            ));
            out.push(Record::value(
                SUITE,
                sc,
                Subject::Raw,
                sz,
                Metric::StoredBytes,
                allocated as f64,
                Unit::Bytes,
            ));
            let ratio = if allocated == 0 { 0.0 } else { nonzero as f64 / allocated as f64 };
            out.push(Record::value(SUITE, sc, Subject::Raw, sz, Metric::Ratio, ratio, Unit::X));
            Ok(())
        }
        Err(e) => {
            let why = note(&e);
            out.push(Record::skipped(SUITE, sc, Subject::Raw, sz, Metric::WriteMibS, &why));
            Err(why)
        }
    };

    // Restores of a VM, each strategy in turn, `plan.restores` rounds. The first
    // zstd-uffd restore's first touches become the working set that zstd-prefetch uses.
    let order =
        [Restore::ZstdUffd, Restore::ZstdPrefetch, Restore::Eager, Restore::FileUffd, Restore::FilePrivate];
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); RESTORES.len()];
    let mut failed: Vec<Option<String>> = vec![None; RESTORES.len()];
    let at = |k: Restore| RESTORES.iter().position(|r| *r == k).expect("every restore is in RESTORES");
    for k in [Restore::FilePrivate, Restore::FileUffd] {
        if let Err(e) = &raw {
            failed[at(k)] = Some(format!("no raw file: {e}"));
        }
    }
    for round in 0..plan.restores {
        for k in order {
            let i = at(k);
            if failed[i].is_some() {
                continue;
            }
            match restore_vm(k, contents, &snap_dir, &raw_path) {
                Ok((run, ws)) => {
                    if k == Restore::ZstdUffd && round == 0 {
                        let ws = ws.expect("a zstd restore has a trace");
                        if let Err(e) = snapshot::record_working_set(&snap_dir, &ws) {
                            failed[at(Restore::ZstdPrefetch)] =
                                Some(format!("cannot record the working set: {}", crate::error::report(&e)));
                        }
                    }
                    runs[i].push(run);
                }
                Err(e) => {
                    let why = note(&e);
                    eprintln!("  {} {sc}: {why}", k.name());
                    failed[i] = Some(why);
                }
            }
        }
    }
    // The first touch of each sampled chunk, memory only; and the recorded working set
    // touched in its recorded order by a host thread.
    let samples = touch_samples(&snap_dir, contents, plan.touch_samples)?;
    let ws = working_set_gpas(&snap_dir)?;
    // Each a value, or the skip note saying why not.
    let mut ws_touches: Vec<Option<Result<f64, String>>> = RESTORES.iter().map(|_| None).collect();
    if !ws.is_empty() {
        for (i, k) in RESTORES.into_iter().enumerate() {
            ws_touches[i] = Some(match &failed[i] {
                Some(why) if runs[i].is_empty() => Err(why.clone()),
                _ => ws_touch(k, &snap_dir, &raw_path, &ws).map_err(|e| note(&e)),
            });
        }
    }
    let mut touches: Vec<Option<Result<Touch, String>>> = RESTORES.iter().map(|_| None).collect();
    for k in [Restore::FilePrivate, Restore::FileUffd, Restore::ZstdUffd, Restore::Eager] {
        let i = at(k);
        touches[i] = Some(match &failed[i] {
            Some(why) if runs[i].is_empty() => Err(why.clone()),
            _ => touch_loop(k, &snap_dir, &raw_path, &samples).map_err(|e| note(&e)),
        });
    }

    for (i, k) in RESTORES.into_iter().enumerate() {
        if runs[i].is_empty() {
            let why = failed[i].as_deref().unwrap_or("not run");
            out.push(Record::skipped(SUITE, sc, k, sz, Metric::RestoreNs, why));
            continue;
        }
        let m = |f: fn(&Run) -> f64| median(runs[i].iter().map(f).collect());
        out.push(Record::value(SUITE, sc, k, sz, Metric::RestoreNs, m(|r| r.restore_ns), Unit::Ns));
        out.push(Record::value(SUITE, sc, k, sz, Metric::ReadyNs, m(|r| r.ready_ns), Unit::Ns));
        if runs[i][0].faults.is_some() {
            out.push(Record::value(
                SUITE,
                sc,
                k,
                sz,
                Metric::Faults,
                m(|r| r.faults.unwrap_or(0) as f64),
                Unit::Count,
            ));
        }
        if k == Restore::ZstdPrefetch {
            let v = m(|r| r.prefetched as f64);
            out.push(Record::value(SUITE, sc, k, sz, Metric::Prefetched, v, Unit::Count));
        }
        match &ws_touches[i] {
            None => {}
            Some(Ok(ns)) => out.push(Record::value(SUITE, sc, k, sz, Metric::WsTouchNs, *ns, Unit::Ns)),
            Some(Err(why)) => out.push(Record::skipped(SUITE, sc, k, sz, Metric::WsTouchNs, why)),
        }
        match &touches[i] {
            None => {}
            Some(Ok(t)) => {
                out.push(Record::value(SUITE, sc, k, sz, Metric::TouchP50Ns, t.p50, Unit::Ns));
                out.push(Record::value(SUITE, sc, k, sz, Metric::TouchP99Ns, t.p99, Unit::Ns));
                if let Some((p50, p99)) = t.server {
                    out.push(Record::value(SUITE, sc, k, sz, Metric::SrvP50Ns, p50, Unit::Ns));
                    out.push(Record::value(SUITE, sc, k, sz, Metric::SrvP99Ns, p99, Unit::Ns));
                }
            }
            Some(Err(why)) => out.push(Record::skipped(SUITE, sc, k, sz, Metric::TouchP50Ns, why)),
        }
    }
    Ok(())
}

/// A running built-in guest of `size` bytes holding `contents`; its memory is written
/// and it has reported (twice for `written25`: it is in its `touch` passes).
pub(super) fn source_vm(size: usize, contents: Contents, huge: bool) -> Result<Vm, BenchError> {
    let memory = Arc::new(guest::memory(size, &MemoryOptions { huge_pages: huge })?);
    let (start, mib) = written_area(size);
    let pages = mib << 8;
    let workload = match contents {
        Contents::Idle => Workload::Idle,
        Contents::Written25 => Workload::Touch { mib, random: false, every: pages },
    };
    let vm = Vm::create(memory.clone(), &VmConfig { workload, ..Default::default() })?;
    let reports = vm.subscribe();
    let wait = Duration::from_secs(60);
    let silent = || Error::Silent { guest: "the guest", event: "report", secs: wait.as_secs() };
    reports.recv_timeout(wait).map_err(|_| silent())?;
    if contents == Contents::Written25 {
        vm.pause()?;
        write_text(&memory, (start..start + (mib << 20)).step_by(PAGE_SIZE), 0x2545_f491_4f6c_dd1d)?;
        vm.resume()?;
        // A whole pass over the area since the resume: the guest is in its loop.
        for _ in 0..2 {
            reports.recv_timeout(wait).map_err(|_| silent())?;
        }
    }
    Ok(vm)
}

/// Writes a page of text (from [`text_pool`], at offsets drawn from `seed`) at each
/// guest-virtual address of `vas` (the workload area's), with the vCPUs paused.
pub(super) fn write_text(
    memory: &GuestMemory,
    vas: impl Iterator<Item = u64>,
    seed: u64,
) -> Result<(), BenchError> {
    let pool = text_pool(4 << 20);
    let mut x = seed;
    for va in vas {
        let off = (xorshift(&mut x) as usize % (pool.len() - PAGE_SIZE)) & !7;
        memory.write(guest::ram_gpa(va), &pool[off..off + PAGE_SIZE])?;
    }
    Ok(())
}

/// The workload area a `written25` guest holds text in: `(first guest-virtual address,
/// bytes)`; the `family` measurement of the remote suite writes it too.
pub(super) fn text_area(size: usize) -> (u64, u64) {
    let (start, mib) = written_area(size);
    (start, mib << 20)
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// `len` bytes of text like a service's access log: timestamps, a few methods, paths,
/// statuses and user names, and pseudo-random numbers and request ids.
fn text_pool(len: usize) -> Vec<u8> {
    use std::io::Write;
    const METHODS: [&str; 4] = ["GET", "GET", "POST", "PUT"];
    const PATHS: [&str; 8] = [
        "/api/v1/items",
        "/api/v1/users",
        "/api/v1/orders",
        "/static/app.js",
        "/static/style.css",
        "/healthz",
        "/login",
        "/search",
    ];
    const STATUS: [u32; 6] = [200, 200, 200, 304, 404, 500];
    const USERS: [&str; 6] = ["alice", "bob", "carol", "dave", "erin", "-"];
    const NOTES: [&str; 5] = ["ok", "cache hit", "cache miss", "upstream timeout, retrying", "ok"];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut out = Vec::with_capacity(len + 256);
    while out.len() < len {
        let r = xorshift(&mut x);
        let t = xorshift(&mut x);
        let _ = writeln!(
            out,
            "2026-12-03T{:02}:{:02}:{:02}.{:03}Z INFO http worker-{} {} {}/{} user={} status={} bytes={} ms={} req={:08x} {}",
            (t >> 8) % 24,
            (t >> 16) % 60,
            (t >> 24) % 60,
            (t >> 32) % 1000,
            r % 8,
            METHODS[(r >> 3) as usize % METHODS.len()],
            PATHS[(r >> 5) as usize % PATHS.len()],
            (r >> 8) % 5000,
            USERS[(r >> 21) as usize % USERS.len()],
            STATUS[(r >> 24) as usize % STATUS.len()],
            (r >> 28) % 20000,
            (r >> 44) % 300,
            t >> 40,
            NOTES[(r >> 60) as usize % NOTES.len()],
        );
    }
    out.truncate(len);
    out
}

/// The `cow` fork pause of `vm`, in this process: pause, capture, clone, resume.
fn cow_pause(vm: &Vm) -> Result<f64, BenchError> {
    let t = Instant::now();
    vm.pause()?;
    let cloned = vm.capture().map_err(Error::from).and_then(|_| Ok(vm.memory().clone_with(Strategy::Cow)?));
    let resumed = vm.resume();
    let ns = t.elapsed().as_nanos() as f64;
    drop(cloned?);
    resumed?;
    Ok(ns)
}

/// Writes the snapshot in `snap_dir` uncompressed into the sparse file `raw` (regions
/// one after the other, zero chunks left as holes), from an eager restore of it: returns
/// (seconds to write and fsync, allocated bytes).
fn write_raw(snap_dir: &Path, raw: &Path) -> Result<(f64, u64), BenchError> {
    let snap = Arc::new(Snapshot::open(snap_dir)?);
    let (memory, _) =
        snapshot::restore_memory(snap.clone(), &RestoreOptions { eager: true, no_prefetch: true })?;
    let m = &snap.manifest;
    let cs = m.chunk_size as u64;
    let file = File::create(raw).map_err(Error::io(format!("cannot create {}", raw.display())))?;
    let t = Instant::now();
    file.set_len(m.guest_size()).map_err(Error::io(format!("cannot size {}", raw.display())))?;
    let mut buf = vec![0u8; cs as usize];
    let mut at = 0u64;
    for r in &m.regions {
        for c in 0..r.size / cs {
            // Only the chunks that hold data: reading a hole of the restored memory would
            // allocate it.
            if snap.index.entries[(r.first_chunk + c) as usize].kind == Kind::Zero {
                continue;
            }
            memory.read(r.guest_addr + c * cs, &mut buf)?;
            file.write_all_at(&buf, at + c * cs)
                .map_err(Error::io(format!("cannot write {}", raw.display())))?;
        }
        at += r.size;
    }
    file.sync_all().map_err(Error::io(format!("cannot sync {}", raw.display())))?;
    let secs = t.elapsed().as_secs_f64();
    use std::os::unix::fs::MetadataExt;
    let allocated =
        file.metadata().map_err(Error::io(format!("cannot stat {}", raw.display())))?.blocks() * 512;
    Ok((secs, allocated))
}

/// What the raw file's page servers did.
#[derive(Debug, Default)]
struct RawCounters {
    faults: AtomicU64,
    /// ns per fetch of a non-zero run (read until the bytes are ready).
    fetch_ns: Mutex<Vec<u32>>,
}

/// Serves one region's faults from the raw file: one chunk per fault, read with `pread`.
struct RawSource {
    file: Arc<File>,
    /// Where the region starts in the file.
    base: u64,
    len: usize,
    chunk: usize,
    buf: Vec<u8>,
    counters: Arc<RawCounters>,
}

impl PageSource for RawSource {
    fn fetch(&mut self, offset: usize) -> std::io::Result<(usize, usize, Option<&[u8]>)> {
        let t = Instant::now();
        let start = offset - offset % self.chunk;
        let len = self.chunk.min(self.len - start);
        self.buf.resize(len, 0);
        self.file.read_exact_at(&mut self.buf, self.base + start as u64)?;
        self.counters.faults.fetch_add(1, Ordering::Relaxed);
        if is_zero(&self.buf) {
            return Ok((start, len, None));
        }
        let mut ns = self.counters.fetch_ns.lock().unwrap_or_else(|p| p.into_inner());
        if ns.len() < 1 << 20 {
            ns.push(t.elapsed().as_nanos().min(u32::MAX as u128) as u32);
        }
        Ok((start, len, Some(&self.buf)))
    }
}

/// What a restore's page servers did: the zstd path's counters or the raw file's.
enum Served {
    None,
    Zstd(Arc<RestoreStats>),
    Raw(Arc<RawCounters>),
}

/// Memory and state for a VM restored from the snapshot in `snap_dir` (or its raw file
/// `raw`) with strategy `k`: what a restore reads, and nothing more (the zstd paths open
/// the snapshot: manifest, index, state, packs; the raw file comes with `state.json`).
fn restored_memory(
    k: Restore,
    snap_dir: &Path,
    raw: &Path,
) -> Result<(GuestMemory, Served, VmState), BenchError> {
    let zstd = |opts: RestoreOptions| -> Result<(GuestMemory, Served, VmState), BenchError> {
        let snap = Arc::new(Snapshot::open(snap_dir)?);
        if !opts.eager && !opts.no_prefetch && snap.working_set.is_none() {
            return Err(Error::NoWorkingSet);
        }
        let state = snap.state()?;
        let (memory, stats) = snapshot::restore_memory(snap, &opts)?;
        Ok((memory, Served::Zstd(stats), state))
    };
    let state = || -> Result<VmState, BenchError> {
        let path = snap_dir.join("state.json");
        let json =
            std::fs::read_to_string(&path).map_err(Error::io(format!("cannot read {}", path.display())))?;
        VmState::from_json(&json).map_err(|source| Error::BadState { path, source })
    };
    let chunk = TakeOptions::default().chunk_size as usize;
    let open_raw = || File::open(raw).map_err(Error::io(format!("cannot open {}", raw.display())));
    match k {
        Restore::ZstdUffd => zstd(RestoreOptions { eager: false, no_prefetch: true }),
        Restore::ZstdPrefetch => zstd(RestoreOptions { eager: false, no_prefetch: false }),
        Restore::Eager => zstd(RestoreOptions { eager: true, no_prefetch: true }),
        Restore::FilePrivate => {
            let state = state()?;
            let file = Arc::new(MemFile::from_fd(open_raw()?.into())?);
            let mut regions = Vec::new();
            let mut at = 0;
            for (gpa, len) in guest::ram_layout(file.size()) {
                let extent = Extent { offset: 0, len, file: file.clone(), file_offset: at };
                regions.push(Region::with_layers(gpa, len, Image::from_extents(vec![extent]))?);
                at += len;
            }
            Ok((GuestMemory::from_regions(regions, false)?, Served::None, state))
        }
        Restore::FileUffd => {
            let state = state()?;
            let file = Arc::new(open_raw()?);
            let size =
                file.metadata().map_err(Error::io(format!("cannot stat {}", raw.display())))?.len() as usize;
            let counters = Arc::new(RawCounters::default());
            let mut regions = Vec::new();
            let mut at = 0;
            for (gpa, len) in guest::ram_layout(size) {
                let mem = Arc::new(MemFile::create("vmfork-restore", len)?);
                let region = Region::with_file(gpa, mem.clone())?;
                let source = RawSource {
                    file: file.clone(),
                    base: at as u64,
                    len,
                    chunk,
                    buf: Vec::new(),
                    counters: counters.clone(),
                };
                regions.push(uffd::fill_from_source(region, &mem, Box::new(source))?);
                at += len;
            }
            Ok((GuestMemory::from_regions(regions, false)?, Served::Raw(counters), state))
        }
    }
}

/// One restore of a VM.
#[derive(Clone, Debug)]
struct Run {
    restore_ns: f64,
    ready_ns: f64,
    faults: Option<u64>,
    prefetched: u64,
}

/// Restores a VM from the snapshot in `snap_dir` with `k`, runs it until its guest has
/// touched its working set, and stops it. Returns the timings and, for the zstd paths,
/// the restore's first touches as a working set.
fn restore_vm(
    k: Restore,
    contents: Contents,
    snap_dir: &Path,
    raw: &Path,
) -> Result<(Run, Option<snapshot::format::WorkingSet>), BenchError> {
    let t0 = Instant::now();
    let (memory, served, state) = restored_memory(k, snap_dir, raw)?;
    let memory = Arc::new(memory);
    let vm = crate::fork::restore_as_new_vm(memory, &state)?;
    let reports = vm.subscribe();
    vm.resume()?;
    let restore_ns = t0.elapsed().as_nanos() as f64;
    let (wait, n) = match contents {
        Contents::Idle => (Duration::from_secs(30), 1),
        Contents::Written25 => (Duration::from_secs(300), 2),
    };
    let mut ready = Ok(());
    for _ in 0..n {
        if reports.recv_timeout(wait).is_err() {
            ready = Err(Error::Silent { guest: "the restored guest", event: "report", secs: wait.as_secs() });
            break;
        }
    }
    let ready_ns = t0.elapsed().as_nanos() as f64;
    let (faults, prefetched, ws) = match &served {
        Served::None => (None, 0, None),
        Served::Zstd(stats) => {
            let r = stats.report(None);
            let faults = (!r.eager).then_some(r.zero_faults + r.decoded_faults);
            (faults, r.prefetched_chunks, Some(stats.working_set()))
        }
        Served::Raw(c) => (Some(c.faults.load(Ordering::Relaxed)), 0, None),
    };
    vm.stop();
    ready?;
    Ok((Run { restore_ns, ready_ns, faults, prefetched }, ws))
}

/// Guest-physical addresses of the chunks the touch loop reads, shuffled: the non-zero
/// chunks for `written25`, every chunk for `idle`; at most `max`.
fn touch_samples(snap_dir: &Path, contents: Contents, max: usize) -> Result<Vec<u64>, BenchError> {
    let snap = Snapshot::open(snap_dir)?;
    let m = &snap.manifest;
    let mut gpas = Vec::new();
    for r in &m.regions {
        for c in 0..r.size / m.chunk_size as u64 {
            let e = &snap.index.entries[(r.first_chunk + c) as usize];
            if contents == Contents::Idle || e.kind != Kind::Zero {
                gpas.push(r.guest_addr + c * m.chunk_size as u64);
            }
        }
    }
    let mut x = 0x853c_49e6_748f_ea9bu64;
    for i in (1..gpas.len()).rev() {
        gpas.swap(i, xorshift(&mut x) as usize % (i + 1));
    }
    gpas.truncate(max);
    Ok(gpas)
}

/// Guest-physical addresses of the snapshot's recorded working set, in recorded order.
fn working_set_gpas(snap_dir: &Path) -> Result<Vec<u64>, BenchError> {
    let snap = Snapshot::open(snap_dir)?;
    let m = &snap.manifest;
    let gpa = |c: u64| {
        let r = m.regions.iter().rev().find(|r| r.first_chunk <= c).expect("chunk 0 is in region 0");
        r.guest_addr + (c - r.first_chunk) * m.chunk_size as u64
    };
    Ok(snap.working_set.iter().flat_map(|ws| ws.chunks.iter().map(|&(c, _)| gpa(c as u64))).collect())
}

/// Restores memory (no VM) with `k` and reads one byte of every page of the chunks at
/// `gpas` in that order, from a host thread: ns from the request until done.
fn ws_touch(k: Restore, snap_dir: &Path, raw: &Path, gpas: &[u64]) -> Result<f64, BenchError> {
    let t = Instant::now();
    let (memory, _, _) = restored_memory(k, snap_dir, raw)?;
    let chunk = TakeOptions::default().chunk_size as u64;
    let mut b = [0u8; 1];
    for &gpa in gpas {
        for page in (gpa..gpa + chunk).step_by(PAGE_SIZE) {
            memory.read(page, &mut b)?;
            std::hint::black_box(b[0]);
        }
    }
    Ok(t.elapsed().as_nanos() as f64)
}

/// First-touch times of one strategy's restored memory.
#[derive(Clone, Debug)]
struct Touch {
    p50: f64,
    p99: f64,
    /// The page server's own p50 and p99 per non-zero fault, where it keeps them.
    server: Option<(f64, f64)>,
}

fn percentiles(mut ns: Vec<f64>) -> Option<(f64, f64)> {
    if ns.is_empty() {
        return None;
    }
    ns.sort_by(f64::total_cmp);
    let at = |p: f64| ns[((ns.len() - 1) as f64 * p) as usize];
    Some((at(0.5), at(0.99)))
}

/// Restores memory (no VM) with `k` and times a one-byte read at each of `gpas`.
fn touch_loop(k: Restore, snap_dir: &Path, raw: &Path, gpas: &[u64]) -> Result<Touch, BenchError> {
    let (memory, served, _) = restored_memory(k, snap_dir, raw)?;
    let mut times = Vec::with_capacity(gpas.len());
    let mut b = [0u8; 1];
    for &gpa in gpas {
        let t = Instant::now();
        memory.read(gpa, &mut b)?;
        // The byte is used: the read cannot be optimized away.
        std::hint::black_box(b[0]);
        times.push(t.elapsed().as_nanos() as f64);
    }
    let (p50, p99) = percentiles(times).ok_or(Error::NothingToTouch)?;
    let server = match &served {
        Served::Zstd(stats) => {
            let r = stats.report(None);
            r.fault_p50_us.zip(r.fault_p99_us).map(|(a, b)| (a * 1e3, b * 1e3))
        }
        Served::Raw(c) => {
            let ns = c.fetch_ns.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|&v| v as f64).collect();
            percentiles(ns)
        }
        Served::None => None,
    };
    Ok(Touch { p50, p99, server })
}

/// The snapshot suite's targets, from one run's records.
pub(super) fn ratios(records: &[Record]) -> Vec<Ratio> {
    let value = |scenario: Scenario, strategy: Subject, metric: Metric, size: u64| {
        super::find(records, SUITE, scenario, strategy, metric, size).and_then(|r| r.value)
    };
    let mut out = Vec::new();
    let mut push = |name: String, size: u64, v: Option<f64>, target: &str, met: fn(f64) -> bool| {
        if let Some(value) = v.filter(|v| v.is_finite()) {
            out.push(Ratio { name, size_bytes: size, value, target: target.into(), met: met(value) });
        }
    };
    let w = Scenario::Written25;
    let (zstd_uffd, file_uffd) = (Subject::Restore(Restore::ZstdUffd), Subject::Restore(Restore::FileUffd));
    let prefetch = Subject::Restore(Restore::ZstdPrefetch);
    for size in super::sizes_of(records, SUITE) {
        let div = |a: Option<f64>, b: Option<f64>| a.zip(b).filter(|(_, b)| *b > 0.0).map(|(a, b)| a / b);
        let touch = |s: Subject| value(w, s, Metric::TouchP50Ns, size);
        let r = div(touch(zstd_uffd), touch(file_uffd));
        push(format!("{w} {zstd_uffd}/{file_uffd} touch_p50"), size, r, "<= 2", |v| v <= 2.0);
        let ready = |s: Subject| value(w, s, Metric::ReadyNs, size);
        let r = div(ready(zstd_uffd), ready(prefetch));
        push(format!("{w} {zstd_uffd}/{prefetch} ready_ns"), size, r, ">= 3", |v| v >= 3.0);
        let host = |s: Subject| value(w, s, Metric::WsTouchNs, size);
        let r = div(host(zstd_uffd), host(prefetch));
        push(format!("{w} {zstd_uffd}/{prefetch} ws_touch_ns"), size, r, ">= 3", |v| v >= 3.0);
        let ratio = value(w, Subject::Zstd, Metric::Ratio, size);
        push(format!("{w} zstd stored ratio"), size, ratio, ">= 2.5", |v| v >= 2.5);
        for c in [Contents::Idle, Contents::Written25].map(Contents::scenario) {
            let pause = |s: Subject| value(c, s, Metric::PauseNs, size);
            let ms = pause(Subject::Zstd).map(|ns| ns / 1e6);
            push(format!("{c} snapshot pause_ms"), size, ms, "<= 1", |v| v <= 1.0);
            let r = div(pause(Subject::Zstd), pause(Subject::CowFork));
            push(format!("{c} snapshot/cow-fork pause_ns"), size, r, "<= 1.5", |v| v <= 1.5);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_is_compressible_and_never_zero() {
        let pool = text_pool(1 << 20);
        assert_eq!(pool.len(), 1 << 20);
        let mut comp = zstd::bulk::Compressor::new(TakeOptions::default().level).unwrap();
        let (mut stored, mut buf) = (0, Vec::new());
        for chunk in pool.chunks(8192) {
            let e = snapshot::format::encode_chunk(chunk, &mut comp, &mut buf).unwrap();
            assert_eq!(e.kind, Kind::Zstd);
            stored += e.len as usize;
        }
        let ratio = pool.len() as f64 / stored as f64;
        // Text, not a repeated pattern: it compresses, but not absurdly.
        assert!((1.5..10.0).contains(&ratio), "ratio {ratio}");
    }

    #[test]
    fn the_raw_source_serves_chunks_and_reports_zeros() {
        let path = std::env::temp_dir().join(format!("vmfork-raw-source-test-{}", std::process::id()));
        let file = File::create(&path).unwrap();
        file.set_len(64 << 10).unwrap();
        file.write_all_at(&[7u8; 100], (32 << 10) + 5).unwrap();
        let counters = Arc::new(RawCounters::default());
        let mut src = RawSource {
            file: Arc::new(File::open(&path).unwrap()),
            base: 16 << 10,
            len: 48 << 10,
            chunk: 8192,
            buf: Vec::new(),
            counters: counters.clone(),
        };
        let (start, len, data) = src.fetch(20 << 10).unwrap();
        assert_eq!((start, len), (16 << 10, 8192));
        let data = data.unwrap();
        assert_eq!(&data[5..105], &[7u8; 100][..]);
        assert_eq!(data[4], 0);
        let (start, _, data) = src.fetch(4096).unwrap();
        assert_eq!(start, 0);
        assert!(data.is_none(), "a hole is served as zeros");
        assert_eq!(counters.faults.load(Ordering::Relaxed), 2);
        assert_eq!(counters.fetch_ns.lock().unwrap().len(), 1);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn ratios_are_taken_at_each_size_against_their_targets() {
        let size = 256u64 << 20;
        let rec = |scenario: Scenario, strategy: Subject, metric: Metric, v: f64| {
            Record::value(SUITE, scenario, strategy, size, metric, v, Unit::Ns)
        };
        let (w, idle) = (Scenario::Written25, Scenario::Idle);
        let (zstd_uffd, prefetch) = (Restore::ZstdUffd.into(), Restore::ZstdPrefetch.into());
        let records = vec![
            rec(w, zstd_uffd, Metric::TouchP50Ns, 30_000.0),
            rec(w, Restore::FileUffd.into(), Metric::TouchP50Ns, 10_000.0),
            rec(w, zstd_uffd, Metric::ReadyNs, 900e6),
            rec(w, prefetch, Metric::ReadyNs, 300e6),
            rec(w, zstd_uffd, Metric::WsTouchNs, 400e6),
            rec(w, prefetch, Metric::WsTouchNs, 200e6),
            rec(w, Subject::Zstd, Metric::Ratio, 3.1),
            rec(idle, Subject::Zstd, Metric::PauseNs, 400_000.0),
            rec(idle, Subject::CowFork, Metric::PauseNs, 350_000.0),
            rec(w, Subject::Zstd, Metric::PauseNs, 2e6),
        ];
        let got: Vec<(String, f64, bool)> = ratios(&records)
            .into_iter()
            .map(|r| (r.name, (r.value * 100.0).round() / 100.0, r.met))
            .collect();
        let want = [
            ("written25 zstd-uffd/file-uffd touch_p50", 3.0, false),
            ("written25 zstd-uffd/zstd-prefetch ready_ns", 3.0, true),
            ("written25 zstd-uffd/zstd-prefetch ws_touch_ns", 2.0, false),
            ("written25 zstd stored ratio", 3.1, true),
            ("idle snapshot pause_ms", 0.4, true),
            ("idle snapshot/cow-fork pause_ns", 1.14, true),
            ("written25 snapshot pause_ms", 2.0, false),
        ];
        let want: Vec<(String, f64, bool)> = want.iter().map(|&(n, v, m)| (n.to_string(), v, m)).collect();
        assert_eq!(got, want);
    }
}
