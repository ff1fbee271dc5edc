//! The `clone` suite: what a clone costs, and what touching the child costs afterwards.
//!
//! Per size and strategy, on a fully written source:
//! * `clone_ns`: the first clone of the source (for cow this includes turning the whole
//!   source into a base, the remap that zaps its page tables);
//! * `reclone_ns`: a second clone after the source dirtied 1% of its pages (scattered:
//!   every 100th page);
//! * `reclone_series_p50_ns`, `reclone_series_max_ns`: 100 more re-clones (20 with
//!   `--quick`), each after the source wrote another, shifted 1% of its pages;
//! * `first_read_ns_per_page`, `first_write_ns_per_page`: touching every page of a fresh
//!   child once (one byte per page);
//! * `child_private_bytes`: what an idle child owns alone;
//! * `fanout16_total_bytes`: source plus 16 idle clones, every file counted once;
//! * `uffd_fault_service_ns`: the page server's time per fault.
//!
//! `native` records plain faults without clones: a read fault on a populated shmem
//! mapping and a write fault on anonymous memory, the denominators of the ratios.

use std::hint::black_box;
use std::time::Instant;

use super::{BenchError, BenchOptions, Metric, Ratio, Record, Scenario, Subject, Suite, Unit, human_bytes};
use crate::memory::{GuestMemory, MemoryOptions, PAGE_SIZE, Strategy, accounting, reflink};

const SUITE: Suite = Suite::Clone;

/// Re-clones in the series after the first re-clone (fewer with `--quick`).
const RECLONES: usize = 100;

pub(super) fn run(opts: &BenchOptions, out: &mut Vec<Record>) -> Result<(), BenchError> {
    let sizes = if !opts.sizes.is_empty() {
        opts.sizes.clone()
    } else if opts.quick {
        vec![64 << 20]
    } else {
        vec![64 << 20, 256 << 20, 1 << 30]
    };
    let mem_opts = MemoryOptions { huge_pages: opts.huge_pages };
    for &size in &sizes {
        eprintln!("clone suite at {}", human_bytes(size as u64));
        native(size, opts.huge_pages, out);
        for strategy in Strategy::CONCRETE {
            let reclones = if opts.quick { 20 } else { RECLONES };
            if let Err(e) = one_strategy(strategy, size, &mem_opts, reclones, out) {
                eprintln!("  {strategy}: {e}");
                let why = e.to_string();
                out.push(Record::skipped(
                    SUITE,
                    Scenario::Clone,
                    strategy,
                    size as u64,
                    Metric::CloneNs,
                    &why,
                ));
            }
        }
    }
    Ok(())
}

fn populated(size: usize, opts: &MemoryOptions) -> crate::memory::Result<GuestMemory> {
    let mem = GuestMemory::with_size(size, opts)?;
    let page = vec![0x5Au8; PAGE_SIZE];
    for at in (0..size).step_by(PAGE_SIZE) {
        mem.write(at as u64, &page[..64])?;
    }
    Ok(mem)
}

fn one_strategy(
    strategy: Strategy,
    size: usize,
    opts: &MemoryOptions,
    reclones: usize,
    out: &mut Vec<Record>,
) -> crate::memory::Result<()> {
    let name = strategy.name();
    let sz = size as u64;
    // Clone-suite records name their scenario after their metric.
    let put = |out: &mut Vec<Record>, metric: Metric, value: f64, unit: Unit| {
        out.push(Record::value(SUITE, metric, strategy, sz, metric, value, unit))
    };
    if strategy == Strategy::Reflink {
        if let Err(e) = reflink::probe() {
            for metric in [Metric::CloneNs, Metric::FirstReadNsPerPage, Metric::FirstWriteNsPerPage] {
                out.push(Record::skipped(SUITE, metric, strategy, sz, metric, &e.to_string()));
            }
            return Ok(());
        }
    }
    let pages = size / PAGE_SIZE;
    let baseline = settled_meminfo("Shmem") + meminfo("AnonPages");
    let source = populated(size, opts)?;
    // What the run really got, before any clone remaps the source: a table must not claim
    // huge pages the kernel did not give.
    put(out, Metric::SourceHugePct, accounting::page_sizes(&source)?.huge_percent(), Unit::Percent);

    // First clone, then read every page of that child.
    eprintln!("  {name}: clone and first touch");
    let t = Instant::now();
    let (reader, _) = source.clone_with(strategy)?;
    let clone_ns = t.elapsed().as_nanos() as f64;
    put(out, Metric::CloneNs, clone_ns, Unit::Ns);
    put(out, Metric::ChildPrivateBytes, accounting::usage(&reader)?.private_bytes as f64, Unit::Bytes);
    let read_ns = touch(&reader, false);
    put(out, Metric::FirstReadNsPerPage, read_ns, Unit::Ns);
    // The first child, after it read every page.
    put(out, Metric::ChildHugePct, accounting::page_sizes(&reader)?.huge_percent(), Unit::Percent);
    if strategy.is_lazy() {
        if let Some((faults, ns)) = reader.regions()[0].with_page_server(|s| s.service_time()).flatten() {
            if faults > 0 {
                put(out, Metric::UffdFaultServiceNs, ns as f64 / faults as f64, Unit::Ns);
            }
        }
    }
    drop(reader);

    // A second child, written once per page.
    let (writer, _) = source.clone_with(strategy)?;
    let write_ns = touch(&writer, true);
    put(out, Metric::FirstWriteNsPerPage, write_ns, Unit::Ns);
    drop(writer);

    // Sixteen idle clones: what do they cost together? Stop early rather than let the
    // OOM killer end the run when clones turn out to cost real memory (copy does).
    eprintln!("  {name}: 16 idle clones");
    let mut clones: Vec<GuestMemory> = Vec::with_capacity(16);
    let mut short = None;
    while clones.len() < 16 {
        let available = mem_available();
        if available < 2 * sz + (256 << 20) {
            short = Some(available);
            break;
        }
        clones.push(source.clone_with(strategy)?.0);
    }
    // Counted by the kernel (shmem + anonymous memory, from /proc/meminfo), not by our own
    // accounting: pages a patched kernel keeps in a hidden reflink base belong to no
    // file we can stat.
    let total = system_bytes().saturating_sub(baseline);
    let metric = Metric::Fanout16TotalBytes;
    match short {
        None => put(out, metric, total as f64, Unit::Bytes),
        Some(available) => out.push(Record::skipped(
            SUITE,
            metric,
            strategy,
            sz,
            metric,
            &format!(
                "stopped after {} clones using {} in all, with {} of memory left",
                clones.len(),
                human_bytes(total),
                human_bytes(available)
            ),
        )),
    }
    drop(clones);

    // Re-clone after the source dirtied 1% of its pages.
    for p in (0..pages).step_by(100) {
        source.write((p * PAGE_SIZE) as u64, &[1])?;
    }
    let t = Instant::now();
    let (again, _) = source.clone_with(strategy)?;
    put(out, Metric::RecloneNs, t.elapsed().as_nanos() as f64, Unit::Ns);
    drop(again);

    // Many more, each after another 1% of the pages were written (a different 1% each
    // time, so the pages written since the first clone keep growing): does a re-clone
    // keep costing what was written since the last one?
    eprintln!("  {name}: {reclones} re-clones of a source that keeps writing");
    let mut times = Vec::with_capacity(reclones);
    for round in 1..=reclones {
        let shift = (round * 37) % 100;
        for p in (shift..pages).step_by(100) {
            source.write((p * PAGE_SIZE) as u64, &[round as u8])?;
        }
        let t = Instant::now();
        let (again, _) = source.clone_with(strategy)?;
        times.push(t.elapsed().as_nanos() as f64);
        drop(again);
    }
    times.sort_by(f64::total_cmp);
    if let (Some(&max), false) = (times.last(), times.is_empty()) {
        put(out, Metric::RecloneSeriesP50Ns, times[times.len() / 2], Unit::Ns);
        put(out, Metric::RecloneSeriesMaxNs, max, Unit::Ns);
    }

    Ok(())
}

/// Touches one byte of every page; returns nanoseconds per page.
fn touch(mem: &GuestMemory, write: bool) -> f64 {
    let region = &mem.regions()[0];
    let base = region.host_addr();
    let pages = region.size() / PAGE_SIZE;
    let t = Instant::now();
    for p in 0..pages {
        // SAFETY: page `p` lies inside the region's mapping; the benchmark owns the memory
        // and nothing else accesses it meanwhile.
        unsafe {
            let ptr = base.add(p * PAGE_SIZE);
            if write {
                std::ptr::write_volatile(ptr, 1);
            } else {
                black_box(std::ptr::read_volatile(ptr));
            }
        }
    }
    t.elapsed().as_nanos() as f64 / pages as f64
}

/// Plain faults, no clone: the denominators.
fn native(size: usize, huge: bool, out: &mut Vec<Record>) {
    let sz = size as u64;
    let run = || -> crate::memory::Result<(f64, f64)> {
        // Populated exactly like the clone sources, then mapped afresh: every read is a
        // minor fault on the same kind of folios (huge where the sources have them).
        let source = populated(size, &MemoryOptions { huge_pages: huge })?;
        let file = match &*source.regions()[0].layout() {
            crate::memory::Layout::File(f) => f.clone(),
            crate::memory::Layout::Layers(_) => unreachable!("fresh memory maps its own file"),
        };
        let shared = GuestMemory::from_regions(vec![crate::memory::Region::with_file(0, file)?], huge)?;
        let read_ns = touch(&shared, false);
        // Anonymous memory, first write.
        let anon = crate::memory::Mapping::reserve(size)?;
        anon.protect(0, size, libc::PROT_READ | libc::PROT_WRITE)?;
        if huge {
            anon.advise_huge()?;
        }
        let t = Instant::now();
        for p in 0..size / PAGE_SIZE {
            // SAFETY: inside our own read-write anonymous mapping.
            unsafe { std::ptr::write_volatile(anon.as_ptr().add(p * PAGE_SIZE), 1) };
        }
        Ok((read_ns, t.elapsed().as_nanos() as f64 / (size / PAGE_SIZE) as f64))
    };
    match run() {
        Ok((r, w)) => {
            let (read, write) = (Metric::FirstReadNsPerPage, Metric::FirstWriteNsPerPage);
            out.push(Record::value(SUITE, read, Subject::Native, sz, read, r, Unit::Ns));
            out.push(Record::value(SUITE, write, Subject::Native, sz, write, w, Unit::Ns));
        }
        Err(e) => {
            let (read, why) = (Metric::FirstReadNsPerPage, e.to_string());
            out.push(Record::skipped(SUITE, Scenario::Native, Subject::Native, sz, read, &why))
        }
    }
}

/// A `/proc/meminfo` field in bytes (0 when missing).
pub(super) fn meminfo(field: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// `meminfo(field)` once it has stopped falling: memory an earlier scenario freed may
/// still be on its way back (a reflink base is released after its last clone, a child
/// process's memfds after it exits), and a baseline taken meanwhile makes the next
/// measurement read too low. Waits at most 10 s.
pub(super) fn settled_meminfo(field: &str) -> u64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut last = meminfo(field);
    loop {
        std::thread::sleep(std::time::Duration::from_millis(200));
        let now = meminfo(field);
        // Settled: it fell by less than 1 MiB in 200 ms.
        if now + (1 << 20) > last || std::time::Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

fn mem_available() -> u64 {
    meminfo("MemAvailable")
}

/// Memory that guest memory can occupy: shmem (memfds, layers, reflink bases) plus
/// anonymous pages (copies on write).
fn system_bytes() -> u64 {
    meminfo("Shmem") + meminfo("AnonPages")
}

/// The clone suite's targets, per size, from one run's records.
pub(super) fn ratios(records: &[Record]) -> Vec<Ratio> {
    let value = |strategy: Subject, metric: Metric, size: u64| {
        records
            .iter()
            .find(|r| {
                r.suite == SUITE && r.strategy == strategy && r.metric == metric && r.size_bytes == size
            })
            .and_then(|r| r.value)
    };
    let mut out = Vec::new();
    for size in super::sizes_of(records, SUITE) {
        let mut push = |name: &str, v: Option<f64>, target: &str, met: fn(f64) -> bool| {
            if let Some(v) = v.filter(|v| v.is_finite()) {
                out.push(Ratio {
                    name: name.into(),
                    size_bytes: size,
                    value: v,
                    target: target.into(),
                    met: met(v),
                });
            }
        };
        let ratio = |a: Option<f64>, b: Option<f64>| Some(a? / b?);
        let (copy, cow) = (Subject::Strategy(Strategy::Copy), Subject::Strategy(Strategy::Cow));
        push(
            "copy/cow clone_ns",
            ratio(value(copy, Metric::CloneNs, size), value(cow, Metric::CloneNs, size)),
            ">= 1000",
            |v| v >= 1000.0,
        );
        // A re-clone should cost what was written since the last one, over a long series
        // too: at 1 % written, a twentieth of an eager copy or less.
        let series = Metric::RecloneSeriesP50Ns;
        for s in [Strategy::Cow, Strategy::Reflink, Strategy::Uffd, Strategy::UffdMinor] {
            push(
                &format!("copy/{s} {series}"),
                ratio(value(copy, series, size), value(s.into(), series, size)),
                ">= 20",
                |v| v >= 20.0,
            );
        }
        let read = Metric::FirstReadNsPerPage;
        push(
            "cow/native first_read_ns_per_page",
            ratio(value(cow, read, size), value(Subject::Native, read, size)),
            "<= 1.5",
            |v| v <= 1.5,
        );
        push(
            "cow fanout16_total_bytes/size",
            value(cow, Metric::Fanout16TotalBytes, size).map(|b| b / size as f64),
            "<= 1.1",
            |v| v <= 1.1,
        );
    }
    out
}
