//! The `remote` suite: restoring a snapshot from an S3-compatible object store against
//! restoring it from a local directory, side by side in one run, per guest size, for
//! the `snapshot` suite's two memory contents (`idle`, `written25`: the same guest and
//! the same host-written text, see [`super::snapshot`]).
//!
//! The snapshot is taken once per size and contents (zstd, as [`snapshot::take`] writes
//! it) and pushed twice to the store under a prefix of this run
//! (`bench/<pid>-<nanos>/<contents>-<size>/`): `plain/` as taken, and `ws/` after a
//! local restore's first touches were recorded into it as its working set
//! ([`snapshot::record_working_set`]). Nothing is deleted from the store. Columns:
//!
//! * `local`: [`Snapshot::open`] of the directory (with its working set, not
//!   prefetched), memory served through userfaultfd ([`snapshot::restore_memory`]);
//! * `local-prefetch`: the same with the working set prefetched (what `s3-cold-prefetch`
//!   compares with);
//! * `s3-cold`: [`Snapshot::open_remote_with_cache`] of `plain/` with an empty pack cache
//!   (a fresh directory per restore): every pack the guest faults on is fetched whole,
//!   on the fault;
//! * `s3-warm`: the same prefix again, with the cache the `s3-cold` restore before it
//!   filled: the small objects (manifest, index, state) are fetched again, packs not;
//! * `s3-cold-prefetch`: `ws/` with an empty pack cache and the working set prefetched:
//!   the prefetch thread fetches the working set's packs (a few GETs at once) and places
//!   their chunks while the vCPUs already run; the guest's faults on chunks not placed
//!   yet are served on demand (fetching the pack if the prefetch has not);
//! * `s3-rtt20-cold`, `s3-rtt20-prefetch`: `s3-cold` and `s3-cold-prefetch` through a
//!   forwarder that holds every byte 10 ms each way ([`super::delay`]): each request
//!   costs a 20 ms round trip more, as from a store in another data centre.
//!
//! And per size a `family`: a snapshot (`parent`) and, after 1 % of the guest's pages
//! were rewritten, a snapshot against it (`child`); see [`measure_family`].
//!
//! Metrics (medians over [`Plan::restores`] rounds, each round every column once):
//!
//! * `restore_ns`: request → vCPUs running, as the snapshot suite measures it: open
//!   (for the store: its GETs of the small objects), build the memory, new identity,
//!   [`Vm::restore`], resume returned;
//! * `ready_ns`: request → the guest has touched its working set (its first report after
//!   the resume for `idle`, its second for `written25`);
//! * `faults`: faults the page server answered up to `ready`; `prefetched`: chunks the
//!   prefetch placed;
//! * `requests`, `fetched_bytes` (`s3-*`): GETs and bytes from the store in that restore,
//!   up to `ready` ([`Snapshot::remote_report`]); `packs_fetched`: of those, pack GETs
//!   (the requests after the open); `pack_cache_hits`: packs taken from the host's cache;
//! * `stored_bytes`, `packs` (`local`): the snapshot's stored chunk bytes and its number
//!   of packs, for reference (the guest size is the size column).
//!
//! The store the `scripts/s3-server` script runs listens on loopback: no network
//! latency but the forwarder's, and every object it serves is in the host's page cache. Without a store
//! (`VMFORK_S3_ENDPOINT` or `AWS_ENDPOINT_URL` unset) every record is skipped.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::delay::DelayProxy;
use super::snapshot::{Contents, WorkDir, median, room, source_vm, text_area, write_text};
use super::{
    BenchError, BenchOptions, Error, Metric, Ratio, Record, Scenario, Subject, Suite, Unit, find,
    human_bytes, note, sizes_of,
};
use crate::memory::PAGE_SIZE;
use crate::snapshot::cache::PackCache;
use crate::snapshot::remote::{self, Remote, S3Config, S3Url};
use crate::snapshot::{self, RestoreOptions, Snapshot, TakeOptions};

const SUITE: Suite = Suite::Remote;
/// `--quick`'s only size.
const QUICK: usize = 64 << 20;
/// The default sizes; each runs only where [`room`] finds space for it (both take about
/// 75 s on two shared cores, nearly all of it the 1 GiB `written25` guest's passes).
const SIZES: [usize; 2] = [256 << 20, 1 << 30];
/// The bucket `scripts/s3-server` creates.
const BUCKET: &str = "vmfork-test";
/// Why every record is skipped without a store.
const NO_STORE: &str = "no object store: run scripts/s3-server start and export what it prints";

/// How much one run measures.
#[derive(Clone, Copy, Debug)]
struct Plan {
    /// Rounds of restores (each column once per round); medians.
    restores: usize,
}

impl Plan {
    const FULL: Plan = Plan { restores: 3 };
    const QUICK: Plan = Plan { restores: 1 };
}

/// How a restore gets its snapshot and memory (a column of the remote suite:
/// [`super::Subject::Remote`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RemoteColumn {
    Local,
    LocalPrefetch,
    S3Cold,
    S3Warm,
    S3ColdPrefetch,
    /// `s3-cold` and `s3-cold-prefetch` through a link with a 20 ms round trip.
    S3RttCold,
    S3RttPrefetch,
}

/// Table order (and the order of each round).
pub(super) const COLUMNS: [RemoteColumn; 7] = [
    RemoteColumn::Local,
    RemoteColumn::LocalPrefetch,
    RemoteColumn::S3Cold,
    RemoteColumn::S3Warm,
    RemoteColumn::S3ColdPrefetch,
    RemoteColumn::S3RttCold,
    RemoteColumn::S3RttPrefetch,
];

/// The latency the `s3-rtt20-*` columns add to every request: 10 ms each way.
const ONE_WAY: Duration = Duration::from_millis(10);
/// The `family` measurement rewrites every 25th page of the text area (a quarter of the
/// guest) between the parent and the child snapshot: 1 % of the guest's pages, scattered.
const FAMILY_DIRTY_EVERY: u64 = 25;

impl RemoteColumn {
    pub(super) fn name(self) -> &'static str {
        match self {
            RemoteColumn::Local => "local",
            RemoteColumn::LocalPrefetch => "local-prefetch",
            RemoteColumn::S3Cold => "s3-cold",
            RemoteColumn::S3Warm => "s3-warm",
            RemoteColumn::S3ColdPrefetch => "s3-cold-prefetch",
            RemoteColumn::S3RttCold => "s3-rtt20-cold",
            RemoteColumn::S3RttPrefetch => "s3-rtt20-prefetch",
        }
    }

    fn remote(self) -> bool {
        !matches!(self, RemoteColumn::Local | RemoteColumn::LocalPrefetch)
    }

    fn prefetch(self) -> bool {
        matches!(
            self,
            RemoteColumn::LocalPrefetch | RemoteColumn::S3ColdPrefetch | RemoteColumn::S3RttPrefetch
        )
    }

    /// Through the delaying forwarder.
    fn delayed(self) -> bool {
        matches!(self, RemoteColumn::S3RttCold | RemoteColumn::S3RttPrefetch)
    }
}

fn endpoint() -> Option<String> {
    ["VMFORK_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"]
        .into_iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
}

/// Where this run's objects go in the store.
struct Store {
    cfg: S3Config,
    /// The same store through the delaying forwarder.
    delayed: S3Config,
    /// `bench/<pid>-<nanos>`: unique per run.
    run_prefix: String,
}

impl Store {
    fn url(&self, prefix: &str) -> S3Url {
        S3Url { bucket: BUCKET.into(), prefix: format!("{}/{prefix}", self.run_prefix) }
    }

    fn remote(&self, prefix: &str) -> Result<Remote, BenchError> {
        Ok(Remote::new(self.url(prefix), &self.cfg)?)
    }

    fn remote_delayed(&self, prefix: &str) -> Result<Remote, BenchError> {
        Ok(Remote::new(self.url(prefix), &self.delayed)?)
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
        for c in [Contents::Idle, Contents::Written25] {
            out.push(Record::skipped(SUITE, c.scenario(), Subject::All, size as u64, Metric::RestoreNs, why));
        }
    };
    let skip_all = |out: &mut Vec<Record>, why: &str| {
        eprintln!("  remote suite skipped: {why}");
        for &size in &sizes {
            skip_size(out, size, why);
        }
    };
    let Some(endpoint) = endpoint() else {
        skip_all(out, NO_STORE);
        return Ok(());
    };
    if let Err(e) = kvm_ioctls::Kvm::new() {
        skip_all(out, &format!("no KVM: {e}"));
        return Ok(());
    }
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let upstream = endpoint.trim_start_matches("http://").trim_end_matches('/');
    let proxy = match upstream.parse() {
        Ok(addr) => {
            DelayProxy::start(addr, ONE_WAY).map_err(Error::io("cannot start the delaying forwarder"))?
        }
        Err(_) => {
            skip_all(
                out,
                &format!(
                    "the store's endpoint {endpoint} is not http://IP:PORT (the delaying forwarder needs one)"
                ),
            );
            return Ok(());
        }
    };
    let store = Store {
        cfg: S3Config::from_env(Some(endpoint.clone())),
        delayed: S3Config::from_env(Some(proxy.url())),
        run_prefix: format!("bench/{}-{}", std::process::id(), nanos.as_nanos()),
    };
    // One request first: a store that is set but down or refusing is one skip, found
    // within the client's timeouts, not one per size.
    if let Err(e) = probe(&store, &endpoint) {
        skip_all(out, &note(&e));
        return Ok(());
    }
    eprintln!("remote suite: s3://{BUCKET}/{} at {endpoint}", store.run_prefix);
    let work = WorkDir::new("remote")?;
    for &size in &sizes {
        eprintln!("remote suite at {}", human_bytes(size as u64));
        if let Err(e) = room(size, &work.0) {
            let why = note(&e);
            eprintln!("  skipped at {}: {why}", human_bytes(size as u64));
            skip_size(out, size, &why);
            continue;
        }
        for contents in [Contents::Idle, Contents::Written25] {
            let sc = contents.scenario();
            eprintln!("  {sc}");
            let name = format!("{sc}-{}", human_bytes(size as u64));
            let dir = work.0.join(&name);
            let result = measure(size, contents, opts.huge_pages, plan, &store, &name, &dir, out);
            let _ = std::fs::remove_dir_all(&dir);
            if let Err(e) = result {
                let why = note(&e);
                eprintln!("  {sc}: {why}");
                out.push(Record::skipped(SUITE, sc, Subject::All, size as u64, Metric::RestoreNs, &why));
            }
        }
        eprintln!("  family");
        let dir = work.0.join(format!("family-{}", human_bytes(size as u64)));
        let result = measure_family(size, opts.huge_pages, &store, &dir, out);
        let _ = std::fs::remove_dir_all(&dir);
        if let Err(e) = result {
            let why = note(&e);
            eprintln!("  family: {why}");
            let (family, new) = (Scenario::Family, Metric::NewBytes);
            out.push(Record::skipped(SUITE, family, Subject::All, size as u64, new, &why));
        }
    }
    drop(proxy);
    Ok(())
}

/// One request to the store at `endpoint`: whether it answers at all.
fn probe(store: &Store, endpoint: &str) -> Result<(), BenchError> {
    let down = |source| Error::StoreDown { endpoint: endpoint.to_string(), source };
    let remote = Remote::new(store.url("probe"), &store.cfg).map_err(down)?;
    remote.get("snapshot.json").map_err(down)?;
    Ok(())
}

/// A fork family's cost. An idle guest whose workload area holds text (a quarter of its
/// memory, as `written25`'s) is snapshotted and pushed (the `parent`); then 1 % of its
/// pages are rewritten with other text (every [`FAMILY_DIRTY_EVERY`]th page of that
/// area, with the vCPUs paused) and it is snapshotted against the parent in the store
/// and pushed (the `child`). Each column: the VM's pause, the write after it, the bytes
/// stored anew and uploaded, the upload's time; then a cold restore of each from the
/// store (`ready_ns`: to the guest's first report; `requests`, `fetched_bytes`).
fn measure_family(
    size: usize,
    huge: bool,
    store: &Store,
    dir: &Path,
    out: &mut Vec<Record>,
) -> Result<(), BenchError> {
    std::fs::create_dir_all(dir).map_err(Error::io(format!("cannot create {}", dir.display())))?;
    let sz = size as u64;
    let (start, bytes) = text_area(size);
    let name = format!("family-{}", human_bytes(sz));
    let columns = [
        (Subject::Parent, dir.join("parent"), format!("{name}/parent")),
        (Subject::Child, dir.join("child"), format!("{name}/child")),
    ];
    let vm = source_vm(size, Contents::Idle, huge)?;
    let taken = (|| -> Result<Vec<(snapshot::Summary, u64, f64)>, BenchError> {
        let mut taken = Vec::new();
        for (i, (_, snap_dir, prefix)) in columns.iter().enumerate() {
            let (every, seed) =
                if i == 0 { (1, 0x2545_f491_4f6c_dd1d) } else { (FAMILY_DIRTY_EVERY, 0x9e37_79b9_7f4a_7c15) };
            vm.pause()?;
            let written =
                write_text(vm.memory(), (start..start + bytes).step_by(PAGE_SIZE * every as usize), seed);
            vm.resume()?;
            written?;
            let parent = match i {
                0 => None,
                _ => Some(snapshot::Parent::load(&columns[0].1, store.url(&columns[0].2).to_string())?),
            };
            let summary = snapshot::take(
                &vm,
                "bench",
                false,
                snap_dir,
                &TakeOptions::default(),
                parent.as_ref(),
                &mut |_| {},
            )?;
            let t = Instant::now();
            let pushed = remote::push(snap_dir, &store.remote(prefix)?)?;
            taken.push((summary, pushed, t.elapsed().as_nanos() as f64));
        }
        Ok(taken)
    })();
    vm.stop();
    drop(vm);
    let taken = taken?;
    let no_prefetch = RestoreOptions { eager: false, no_prefetch: true };
    for ((col, _, prefix), (summary, pushed, push_ns)) in columns.iter().zip(taken) {
        eprintln!("    {col}: {summary}; pushed {} in {:.2} s", human_bytes(pushed), push_ns / 1e9);
        let col = *col;
        let v = |metric: Metric, value: f64, unit: Unit| {
            Record::value(SUITE, Scenario::Family, col, sz, metric, value, unit)
        };
        out.push(v(Metric::PauseNs, summary.pause_ns as f64, Unit::Ns));
        out.push(v(Metric::WriteNs, summary.write_secs * 1e9, Unit::Ns));
        out.push(v(Metric::NewBytes, summary.new_bytes as f64, Unit::Bytes));
        out.push(v(Metric::PushedBytes, pushed as f64, Unit::Bytes));
        out.push(v(Metric::PushNs, push_ns, Unit::Ns));
        let cache = PackCache { dir: dir.join(format!("cache-{col}")), limit_bytes: 16 << 30 };
        let open = || Ok(Snapshot::open_remote_with_cache(store.remote(prefix)?, cache.clone())?);
        match restore_vm(open, &no_prefetch, Contents::Idle) {
            Ok((run, _)) => {
                out.push(v(Metric::ReadyNs, run.ready_ns, Unit::Ns));
                out.push(v(Metric::Requests, run.requests as f64, Unit::Count));
                out.push(v(Metric::FetchedBytes, run.fetched_bytes as f64, Unit::Bytes));
            }
            Err(e) => out.push(Record::skipped(SUITE, Scenario::Family, col, sz, Metric::ReadyNs, &note(&e))),
        }
    }
    Ok(())
}

/// The remote suite's ratios: what prefetch buys over a link with a round trip, and
/// what a child snapshot costs against its parent.
pub(super) fn ratios(records: &[Record]) -> Vec<Ratio> {
    let mut out = Vec::new();
    let get = |sc: Scenario, st: Subject, m: Metric, size: u64| {
        find(records, SUITE, sc, st, m, size).and_then(|r| r.value)
    };
    let (rtt_cold, rtt_prefetch) = (RemoteColumn::S3RttCold.into(), RemoteColumn::S3RttPrefetch.into());
    for size in sizes_of(records, SUITE) {
        if let (Some(cold), Some(pre)) = (
            get(Scenario::Written25, rtt_cold, Metric::ReadyNs, size),
            get(Scenario::Written25, rtt_prefetch, Metric::ReadyNs, size),
        ) {
            let value = cold / pre;
            out.push(Ratio {
                name: "written25 s3-rtt20-cold/s3-rtt20-prefetch ready_ns".into(),
                size_bytes: size,
                value,
                target: "> 1".into(),
                met: value > 1.0,
            });
        }
        let pushed = |s: Subject| get(Scenario::Family, s, Metric::PushedBytes, size);
        if let (Some(child), Some(parent)) = (pushed(Subject::Child), pushed(Subject::Parent)) {
            let value = child / parent;
            out.push(Ratio {
                name: "family child/parent pushed_bytes (1 % of pages rewritten)".into(),
                size_bytes: size,
                value,
                target: "<= 0.1".into(),
                met: value <= 0.1,
            });
        }
    }
    out
}

/// One restore of a VM.
#[derive(Clone, Debug, Default)]
struct Run {
    restore_ns: f64,
    ready_ns: f64,
    faults: u64,
    prefetched: u64,
    /// The store's counters, for the `s3-*` columns.
    requests: u64,
    fetched_bytes: u64,
    packs_fetched: u64,
    cache_hits: u64,
}

/// Everything measured for one size and contents: the snapshot in `dir`, pushed under
/// `name/` in the run's prefix.
#[allow(clippy::too_many_arguments)]
fn measure(
    size: usize,
    contents: Contents,
    huge: bool,
    plan: Plan,
    store: &Store,
    name: &str,
    dir: &Path,
    out: &mut Vec<Record>,
) -> Result<(), BenchError> {
    std::fs::create_dir_all(dir).map_err(Error::io(format!("cannot create {}", dir.display())))?;
    let (sc, sz) = (contents.scenario(), size as u64);
    let snap_dir = dir.join("snapshot");
    let vm = source_vm(size, contents, huge)?;
    let taken = snapshot::take(&vm, "bench", false, &snap_dir, &TakeOptions::default(), None, &mut |_| {});
    vm.stop();
    drop(vm);
    let summary = taken?;
    let plain = format!("{name}/plain");
    let t = Instant::now();
    let pushed = remote::push(&snap_dir, &store.remote(&plain)?)?;
    eprintln!("    pushed {} in {:.2} s", human_bytes(pushed), t.elapsed().as_secs_f64());

    // A local restore's first touches become the working set; then the snapshot with it
    // goes to the store too.
    let local = || Ok(Snapshot::open(&snap_dir)?);
    let no_prefetch = RestoreOptions { eager: false, no_prefetch: true };
    let (_, ws) = restore_vm(local, &no_prefetch, contents)?;
    snapshot::record_working_set(&snap_dir, &ws)?;
    let with_ws = format!("{name}/ws");
    remote::push(&snap_dir, &store.remote(&with_ws)?)?;
    let packs = Snapshot::open(&snap_dir)?.manifest.packs.len();

    let caches = dir.join("caches");
    let fresh_cache = |label: String| PackCache { dir: caches.join(label), limit_bytes: 16 << 30 };
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); COLUMNS.len()];
    let mut failed: Vec<Option<String>> = vec![None; COLUMNS.len()];
    for round in 0..plan.restores {
        // s3-warm takes the cache s3-cold of the same round filled.
        let cold_cache = fresh_cache(format!("cold-{round}"));
        for (i, k) in COLUMNS.into_iter().enumerate() {
            if failed[i].is_some() {
                continue;
            }
            let opts = RestoreOptions { eager: false, no_prefetch: !k.prefetch() };
            let remote_open = |prefix: &str, cache: PackCache| {
                let remote =
                    if k.delayed() { store.remote_delayed(prefix)? } else { store.remote(prefix)? };
                Ok(Snapshot::open_remote_with_cache(remote, cache)?)
            };
            let got = match k {
                RemoteColumn::Local | RemoteColumn::LocalPrefetch => restore_vm(local, &opts, contents),
                RemoteColumn::S3Cold | RemoteColumn::S3Warm => {
                    restore_vm(|| remote_open(&plain, cold_cache.clone()), &opts, contents)
                }
                RemoteColumn::S3RttCold => {
                    restore_vm(|| remote_open(&plain, fresh_cache(format!("rtt-{round}"))), &opts, contents)
                }
                RemoteColumn::S3ColdPrefetch | RemoteColumn::S3RttPrefetch => restore_vm(
                    || remote_open(&with_ws, fresh_cache(format!("{}-{round}", k.name()))),
                    &opts,
                    contents,
                ),
            };
            match got {
                Ok((run, _)) => runs[i].push(run),
                Err(e) => {
                    let why = note(&e);
                    eprintln!("    {} {sc}: {why}", k.name());
                    failed[i] = Some(why);
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&caches);

    let (dir_col, stored) = (RemoteColumn::Local, summary.stored_bytes as f64);
    out.push(Record::value(SUITE, sc, dir_col, sz, Metric::StoredBytes, stored, Unit::Bytes));
    out.push(Record::value(SUITE, sc, dir_col, sz, Metric::Packs, packs as f64, Unit::Count));
    for (i, k) in COLUMNS.into_iter().enumerate() {
        if runs[i].is_empty() {
            let why = failed[i].as_deref().unwrap_or("not run");
            out.push(Record::skipped(SUITE, sc, k, sz, Metric::RestoreNs, why));
            continue;
        }
        // The median of `f` over the column's runs, as a record of `metric`.
        let put = |out: &mut Vec<Record>, metric, f: fn(&Run) -> f64, unit| {
            let v = median(runs[i].iter().map(f).collect());
            out.push(Record::value(SUITE, sc, k, sz, metric, v, unit));
        };
        put(out, Metric::RestoreNs, |r| r.restore_ns, Unit::Ns);
        put(out, Metric::ReadyNs, |r| r.ready_ns, Unit::Ns);
        put(out, Metric::Faults, |r| r.faults as f64, Unit::Count);
        if k.prefetch() {
            put(out, Metric::Prefetched, |r| r.prefetched as f64, Unit::Count);
        }
        if k.remote() {
            put(out, Metric::Requests, |r| r.requests as f64, Unit::Count);
            put(out, Metric::FetchedBytes, |r| r.fetched_bytes as f64, Unit::Bytes);
            put(out, Metric::PacksFetched, |r| r.packs_fetched as f64, Unit::Count);
            put(out, Metric::PackCacheHits, |r| r.cache_hits as f64, Unit::Count);
        }
    }
    Ok(())
}

/// Restores a VM from the snapshot `open` returns, with `opts`, runs it until its guest
/// has touched its working set, and stops it. Returns the timings and counters, and the
/// restore's first touches as a working set.
fn restore_vm(
    open: impl FnOnce() -> Result<Snapshot, BenchError>,
    opts: &RestoreOptions,
    contents: Contents,
) -> Result<(Run, snapshot::format::WorkingSet), BenchError> {
    let t0 = Instant::now();
    let snap = Arc::new(open()?);
    let opened = snap.remote_report().map_or(0, |r| r.requests);
    let state = snap.state()?;
    let (memory, stats) = snapshot::restore_memory(snap.clone(), opts)?;
    let memory = Arc::new(memory);
    let vm = crate::fork::vm_with_new_identity(memory, &state)?;
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
    let r = stats.report(None);
    let mut run = Run {
        restore_ns,
        ready_ns,
        faults: r.zero_faults + r.decoded_faults,
        prefetched: r.prefetched_chunks,
        ..Run::default()
    };
    if let Some(rr) = snap.remote_report() {
        run.requests = rr.requests;
        run.fetched_bytes = rr.bytes_fetched;
        run.packs_fetched = rr.requests.saturating_sub(opened);
        run.cache_hits = rr.pack_cache_hits;
    }
    vm.stop();
    ready?;
    Ok((run, stats.working_set()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store that is set but down: one skip, naming the store, the failed request once
    /// and what to do. The store is a loopback port nothing listens on.
    #[test]
    fn a_store_that_does_not_answer_says_so_once_with_the_fix() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let endpoint = format!("http://127.0.0.1:{port}");
        let mut cfg = S3Config::from_env(Some(endpoint.clone()));
        cfg.request_timeout = Duration::from_secs(2);
        cfg.retry_timeout = Duration::from_secs(1);
        let store = Store { delayed: cfg.clone(), cfg, run_prefix: "bench/test".into() };
        let e = probe(&store, &endpoint).expect_err("nothing listens there");
        assert!(matches!(e, Error::StoreDown { .. }), "{e:?}");
        let text = crate::error::tests::report_once(&e);
        assert!(text.starts_with(&format!("the object store at {endpoint} does not answer")), "{text}");
        assert!(text.contains("scripts/s3-server start") && text.contains("VMFORK_S3_ENDPOINT"), "{text}");
        let object = format!("s3://{BUCKET}/bench/test/probe/snapshot.json");
        assert_eq!(text.matches(&object).count(), 1, "the failed request once: {text}");
    }

    #[test]
    fn columns_are_named_and_classified() {
        assert_eq!(
            COLUMNS.map(RemoteColumn::name),
            [
                "local",
                "local-prefetch",
                "s3-cold",
                "s3-warm",
                "s3-cold-prefetch",
                "s3-rtt20-cold",
                "s3-rtt20-prefetch"
            ]
        );
        assert!(COLUMNS.iter().filter(|c| c.remote()).all(|c| c.name().starts_with("s3-")));
        assert_eq!(COLUMNS.iter().filter(|c| c.prefetch()).count(), 3);
        assert!(COLUMNS.iter().filter(|c| c.delayed()).all(|c| c.name().starts_with("s3-rtt20")));
    }
}
