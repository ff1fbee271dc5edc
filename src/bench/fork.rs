//! The `fork` suite: forking a running VM (the built-in guest) into new processes, per
//! strategy and guest size, as `vmfork fork` does it.
//!
//! * `fork_parent_pause_ns`: the parent's vCPUs stopped, from the pause to the resume
//!   (state capture and the memory clone happen in between); median of several forks
//!   ([`Plan`]) of one parent running the `count` workload, whose every page was
//!   written first;
//! * `fork_to_child_running_ns`: from the fork request to the child guest's first report;
//! * `fork_to_vcpus_running_ns`: from the fork request to the child's vCPUs resumed (its
//!   guest runs from there), and `fork_step_{spawn,exec,hello,memory,restore,resume}_ns`,
//!   where that time went after the parent resumed: starting the process, `exec` and
//!   vmfork's start-up, receiving the `Hello`, receiving (and for `uffd`, registering)
//!   the memory, restoring the VM (KVM VM, memory slots, state, new identity, control
//!   socket), resuming its vCPUs; medians over the same forks;
//! * `refork1pct`, `parent_pause_ns` and `parent_pause_max_ns`: a parent (idle guest,
//!   every page written) forked once, then [`REFORKS`] times more, each time after 1 %
//!   of its pages (one in every 100, a different one each time) were written: the
//!   parent's pause, median and worst. A fork of a parent that wrote `d` pages should
//!   pause it for O(d), not O(size): the target is at most 5 ms, and 1/20 of `copy`'s;
//! * `child_workload_ns` (scenarios `touch10pct`, `touch100pct`): a forked child's guest
//!   touches (increments a word of) every page of 10% / 100% of its memory; from the
//!   child's resume until it has touched each at least once. The parent runs the same
//!   `touch` workload before the fork and stays paused while the child is timed (two
//!   cores: it would compete). Strategy `native` is the parent's own pass over the same
//!   pages before the fork, all already populated: the cost of the work itself. The
//!   child starts at the parent's position in its pass, so its time includes at most
//!   one such native pass besides the first touches. The child runs in this process:
//!   the parent's half of the fork is `fork::freeze` (pause, capture, clone, resume;
//!   the parent is paused again right after), the child is restored by
//!   `fork::Frozen::restore_here`, through the same `fork::restore_child` a `vmfork
//!   __child` process runs, so the uffd page servers are threads here rather than the
//!   parent process;
//! * `fanout{N}/total_bytes`: memory held by an idle parent and `N` idle children forked
//!   from it (see [`fan_out`]); the parent's own pages count, so `size` is the floor;
//! * `chain{N}/first_fork_ns`, `last_fork_ns` (and `_pause_ns`): fork the VM, then fork
//!   that child, and so on `N` deep: fork request to the new child's first report for
//!   the first and the last link, and each parent's pause. The target is last ≤ 1.5×
//!   first: depth must not cost.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{BenchError, BenchOptions, Metric, Ratio, Record, Scenario, Subject, Suite, Unit, human_bytes};
use crate::api::{self, Request};
use crate::fork::{Child, ForkStep};
use crate::memory::{MemoryOptions, PAGE_SIZE, Strategy, reflink};
use crate::vmm::{Vm, VmConfig, Workload, guest};

const SUITE: Suite = Suite::Fork;
/// How much one run measures.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// Forks per pause/running measurement.
    pub forks: usize,
    /// The child workloads timed: the percent of memory each touches
    /// ([`Scenario::Touch`]).
    pub workloads: &'static [u32],
    /// Idle children of the fan-out.
    pub fanout: usize,
    /// Depth of the chain.
    pub chain: usize,
}

impl Plan {
    pub const FULL: Plan = Plan { forks: 5, workloads: &[10, 100], fanout: 16, chain: 32 };
    /// `--quick`: a smoke run, each scenario once, small (under TCG every VM process
    /// takes about a second to start).
    pub const QUICK: Plan = Plan { forks: 3, workloads: &[100], fanout: 2, chain: 3 };
}
/// Guest memory of the fan-out and chain VMs.
const SMALL: usize = 256 << 20;
/// `--quick`'s only size (fan-out and chain included): a smoke run.
const QUICK: usize = 64 << 20;

pub(super) fn run(opts: &BenchOptions, out: &mut Vec<Record>) -> Result<(), BenchError> {
    let sizes = match (&opts.sizes[..], opts.quick) {
        ([], true) => vec![QUICK],
        ([], false) => vec![SMALL, 1 << 30, 4 << 30],
        (sizes, _) => sizes.to_vec(),
    };
    let plan = if opts.quick { Plan::QUICK } else { Plan::FULL };
    let skip_all = |out: &mut Vec<Record>, why: &str| {
        for &size in &sizes {
            let pause = Metric::ForkParentPauseNs;
            out.push(Record::skipped(SUITE, Scenario::Fork, Subject::All, size as u64, pause, why));
        }
    };
    if let Err(e) = kvm_ioctls::Kvm::new() {
        skip_all(out, &format!("no KVM: {e}"));
        return Ok(());
    }
    let huge = opts.huge_pages;
    for &size in &sizes {
        eprintln!("fork suite at {}", human_bytes(size as u64));
        let sz = size as u64;
        for strategy in Strategy::CONCRETE {
            let name = strategy.name();
            eprintln!("  {name}");
            let skip = |out: &mut Vec<Record>, scenario: Scenario, metric: Metric, why: &str| {
                eprintln!("  {strategy} {scenario}: {why}");
                out.push(Record::skipped(SUITE, scenario, strategy, sz, metric, why));
            };
            if strategy == Strategy::Reflink {
                if let Err(e) = reflink::probe() {
                    skip(out, Scenario::Fork, Metric::ForkParentPauseNs, &e.to_string());
                    continue;
                }
            }
            match forks(size, strategy, huge, plan.forks) {
                Ok(t) => {
                    let m = Metric::ForkParentPauseNs;
                    out.push(Record::value(SUITE, m, strategy, sz, m, t.pause, Unit::Ns));
                    let m = Metric::ForkToChildRunningNs;
                    out.push(Record::value(SUITE, m, strategy, sz, m, t.first_report, Unit::Ns));
                    let m = Metric::ForkToVcpusRunningNs;
                    out.push(Record::value(SUITE, m, strategy, sz, m, t.vcpus_running, Unit::Ns));
                    for (step, ns) in t.steps {
                        let m = Metric::ForkStep(step);
                        out.push(Record::value(SUITE, Scenario::Fork, strategy, sz, m, ns, Unit::Ns));
                    }
                }
                Err(e) => skip(out, Scenario::Fork, Metric::ForkParentPauseNs, &super::note(&e)),
            }
            match reforks(size, strategy, huge, REFORKS) {
                Ok((median, max)) => {
                    let s = Scenario::Refork1pct;
                    out.push(Record::value(SUITE, s, strategy, sz, Metric::ParentPauseNs, median, Unit::Ns));
                    out.push(Record::value(SUITE, s, strategy, sz, Metric::ParentPauseMaxNs, max, Unit::Ns));
                }
                Err(e) => skip(out, Scenario::Refork1pct, Metric::ParentPauseNs, &super::note(&e)),
            }
            for &percent in plan.workloads {
                let scenario = Scenario::Touch(percent);
                let m = Metric::ChildWorkloadNs;
                let record = |who: Subject, ns| Record::value(SUITE, scenario, who, sz, m, ns, Unit::Ns);
                match child_workload(size, strategy, huge, percent as usize) {
                    Ok((native, child)) => {
                        if strategy == Strategy::CONCRETE[0] {
                            out.push(record(Subject::Native, native));
                        }
                        out.push(record(strategy.into(), child));
                    }
                    Err(e) => skip(out, scenario, m, &super::note(&e)),
                }
            }
            if size != sizes[0] {
                continue; // fan-out and chains at the smallest size only
            }
            let scenario = Scenario::Fanout(plan.fanout as u32);
            let m = Metric::TotalBytes;
            match fan_out(size, strategy, huge, plan.fanout) {
                Ok(bytes) => out.push(Record::value(SUITE, scenario, strategy, sz, m, bytes, Unit::Bytes)),
                Err(e) => skip(out, scenario, m, &super::note(&e)),
            }
            let scenario = Scenario::Chain(plan.chain as u32);
            match chain(size, strategy, huge, plan.chain) {
                Ok(links) => {
                    let (first, last) = (&links[0], &links[links.len() - 1]);
                    let running = |c: &Child| c.timings.child_first_report_ns.unwrap_or_default() as f64;
                    let pause = |c: &Child| c.timings.parent_resumed_ns as f64;
                    for (metric, v) in [
                        (Metric::FirstForkNs, running(first)),
                        (Metric::LastForkNs, running(last)),
                        (Metric::FirstPauseNs, pause(first)),
                        (Metric::LastPauseNs, pause(last)),
                    ] {
                        out.push(Record::value(SUITE, scenario, strategy, sz, metric, v, Unit::Ns));
                    }
                }
                Err(e) => skip(out, scenario, Metric::FirstForkNs, &super::note(&e)),
            }
        }
    }
    Ok(())
}

/// Re-forks measured per strategy and size in `refork1pct`.
pub const REFORKS: usize = 10;

/// (median, max) parent pause of `n` forks of one parent, each after it wrote 1 % of its
/// pages, scattered (one in every 100), a different 1 % each time; every child is
/// stopped before the next fork. The writes are made from the host while the guest
/// (idle) is paused: to the page tables they are the guest's own.
fn reforks(size: usize, strategy: Strategy, huge: bool, n: usize) -> Result<(f64, f64), BenchError> {
    let vm = populated_vm(size, huge, Workload::Idle)?;
    let parent = vm_name("refork", strategy, 0);
    let mut pauses = Vec::new();
    let mut result = Ok(());
    for i in 0..=n {
        if let Err(e) = room_for_fork(size, strategy, 0) {
            result = Err(e);
            break;
        }
        if i > 0 {
            let written = vm.pause().map_err(BenchError::from).and_then(|()| {
                for at in ((1 << 20) + i * PAGE_SIZE..size).step_by(100 * PAGE_SIZE) {
                    vm.memory().write(guest::ram_gpa(at as u64), &[i as u8])?;
                }
                Ok(())
            });
            vm.resume()?;
            if let Err(e) = written {
                result = Err(e);
                break;
            }
        }
        match crate::fork::fork(&vm, &parent, false, &vm_name("refork", strategy, i + 1), strategy) {
            Ok(child) => {
                stop_all(std::slice::from_ref(&child));
                // The first fork is not a re-fork.
                if i > 0 {
                    pauses.push(child.timings.parent_resumed_ns);
                }
            }
            Err(e) => {
                result = Err(e.into());
                break;
            }
        }
    }
    vm.stop();
    result?;
    let max = pauses.iter().copied().max().unwrap_or(0) as f64;
    Ok((median(pauses), max))
}

/// A running VM of `size` bytes whose every page past the guest's own first MiB holds
/// data, so cloning has real work to do.
fn populated_vm(size: usize, huge: bool, workload: Workload) -> Result<Vm, BenchError> {
    let memory = Arc::new(guest::memory(size, &MemoryOptions { huge_pages: huge })?);
    let vm = Vm::create(memory.clone(), &VmConfig { workload, ..Default::default() })?;
    vm.subscribe().recv_timeout(Duration::from_secs(20)).map_err(|_| BenchError::Silent {
        guest: "the parent's guest",
        event: "report",
        secs: 20,
    })?;
    vm.pause()?;
    for at in ((1 << 20)..size).step_by(PAGE_SIZE) {
        memory.write(guest::ram_gpa(at as u64), &[0x5a])?;
    }
    vm.resume()?;
    Ok(vm)
}

fn median(mut v: Vec<u64>) -> f64 {
    v.sort_unstable();
    v[v.len() / 2] as f64
}

/// A unique VM name for this bench process.
fn vm_name(what: &str, strategy: Strategy, i: usize) -> String {
    format!("bench-{}-{what}-{}-{i}", std::process::id(), strategy.name())
}

/// Stops `children` (best effort: a child that already died is gone anyway) and waits,
/// a few seconds at most, until their processes are gone: the next fork must not find
/// their memory still held (a 12 GiB testbed ran out of memory in the 4 GiB fork suite)
/// nor the next measurement count it.
pub(super) fn stop_all(children: &[Child]) {
    for c in children {
        let _ = api::call(&c.name, &Request::Stop);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline
        && children.iter().any(|c| std::path::Path::new(&format!("/proc/{}", c.pid)).exists())
    {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Medians over `n` forks of one parent ([`fork_timings`]).
fn forks(size: usize, strategy: Strategy, huge: bool, n: usize) -> Result<ForkMedians, BenchError> {
    let vm = populated_vm(size, huge, Workload::default())?;
    let result = fork_timings(&vm, &vm_name("parent", strategy, 0), size, strategy, n);
    vm.stop();
    result
}

/// Medians, in nanoseconds, over several forks of one parent.
pub(super) struct ForkMedians {
    /// The parent's pause.
    pub pause: f64,
    /// Fork request to the child guest's first report (a Linux guest's first console
    /// line).
    pub first_report: f64,
    /// Fork request to the child's vCPUs resumed.
    pub vcpus_running: f64,
    /// The child's steps after the parent resumed, each from the end of the one before:
    /// spawn, exec, hello, memory, restore, resume.
    pub steps: Vec<(ForkStep, f64)>,
}

/// [`ForkMedians`] over `n` forks of the running `vm` of `size` bytes, each child stopped
/// and gone before the next fork.
pub(super) fn fork_timings(
    vm: &Vm,
    parent: &str,
    size: usize,
    strategy: Strategy,
    n: usize,
) -> Result<ForkMedians, BenchError> {
    let (mut pauses, mut running) = (Vec::new(), Vec::new());
    let mut timings = Vec::new();
    for i in 0..n {
        room_for_fork(size, strategy, i)?;
        let child =
            crate::fork::fork(vm, parent, false, &format!("{parent}-{}-fork{i}", strategy.name()), strategy)?;
        stop_all(std::slice::from_ref(&child));
        pauses.push(child.timings.parent_resumed_ns);
        timings.push(child.timings.clone());
        let first = child.timings.child_first_report_ns;
        running.push(first.ok_or(BenchError::Silent {
            guest: "a child's guest",
            event: "report",
            secs: crate::fork::FIRST_REPORT_WAIT.as_secs(),
        })?);
    }
    // Each child step from the end of the one before it (the parent's resume first).
    let steps =
        ForkStep::ALL.map(|step| (step, median(timings.iter().map(|t| t.took(step)).collect()))).to_vec();
    Ok(ForkMedians {
        pause: median(pauses),
        first_report: median(running),
        vcpus_running: median(timings.iter().map(|t| t.child_running_ns).collect()),
        steps,
    })
}

/// (native pass, child's first pass) in ns over `percent`% of the guest's memory.
fn child_workload(
    size: usize,
    strategy: Strategy,
    huge: bool,
    percent: usize,
) -> Result<(f64, f64), BenchError> {
    let mib = ((size - (1 << 20)) * percent / 100) >> 20;
    let pages = (mib as u64) << 8;
    let memory = Arc::new(guest::memory(size, &MemoryOptions { huge_pages: huge })?);
    let workload = Workload::Touch { mib: mib as u64, random: false, every: pages };
    let vm = Vm::create(memory, &VmConfig { workload, ..Default::default() })?;
    let parent_reports = vm.subscribe();
    let wait = Duration::from_secs(300);
    let next = |rx: &std::sync::mpsc::Receiver<_>| {
        rx.recv_timeout(wait).map(|_| Instant::now()).map_err(|_| BenchError::Silent {
            guest: "the guest",
            event: "report",
            secs: wait.as_secs(),
        })
    };
    // Start, end of the first pass (populates), end of the second: the native pass.
    next(&parent_reports)?;
    next(&parent_reports)?;
    let t = next(&parent_reports)?;
    let native = next(&parent_reports)?.duration_since(t);
    // The child will hold a private copy of every page it touches, whatever the strategy.
    ensure_room(pages * PAGE_SIZE as u64 + (256 << 20), "the child's pass")?;
    // The fork, in this process: the parent's half as `vmfork fork` does it, then the
    // parent paused again for the child's pass.
    let frozen = crate::fork::freeze(&vm, strategy)?;
    vm.pause()?;
    let child = frozen.restore_here()?;
    let reports = child.vm.subscribe();
    let t = Instant::now();
    child.vm.resume()?;
    let measured = next(&reports).and_then(|_| next(&reports)).map(|done| done.duration_since(t));
    drop(child);
    vm.stop();
    Ok((native.as_nanos() as f64, measured?.as_nanos() as f64))
}

/// Memory an idle parent and `n` children forked from it hold: the growth of the
/// system's shmem since before the parent existed (every guest memory file, layer and
/// reflink base is shmem, mapped or not) plus the anonymous copy-on-write pages in each
/// VM's guest mappings.
fn fan_out(size: usize, strategy: Strategy, huge: bool, n: usize) -> Result<f64, BenchError> {
    let shmem_before = super::clone::settled_meminfo("Shmem");
    let vm = populated_vm(size, huge, Workload::Idle)?;
    let parent = vm_name("fanout", strategy, 0);
    let mut children = Vec::new();
    let mut total = Ok(0.0);
    for i in 1..=n {
        if let Err(e) = room_for_fork(size, strategy, i - 1) {
            total = Err(e);
            break;
        }
        match crate::fork::fork(&vm, &parent, false, &vm_name("fanout", strategy, i), strategy) {
            Ok(c) => children.push(c),
            Err(e) => {
                total = Err(e.into());
                break;
            }
        }
    }
    if total.is_ok() {
        // Idle children report once and park; give the last one a moment to settle.
        std::thread::sleep(Duration::from_millis(200));
        total = Ok(held_bytes(shmem_before, &children) as f64);
    }
    stop_all(&children);
    vm.stop();
    total
}

/// Memory held by this process's VMs and `children` since the system's shmem was
/// `shmem_before`: the growth of shmem (every guest memory file, layer and reflink base)
/// plus the anonymous copy-on-write pages in every VM's guest mappings.
pub(super) fn held_bytes(shmem_before: u64, children: &[Child]) -> u64 {
    let anon: u64 = std::iter::once("self".to_string())
        .chain(children.iter().map(|c| c.pid.to_string()))
        .map(|pid| guest_anon_bytes(&pid))
        .sum();
    super::meminfo("Shmem").saturating_sub(shmem_before) + anon
}

/// Anonymous (copied-on-write) bytes in process `pid`'s mappings of vmfork memfds.
fn guest_anon_bytes(pid: &str) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut guest = false;
    let mut bytes = 0;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            guest = line.contains("/memfd:vmfork-");
        } else if let Some(kb) = line.strip_prefix("Anonymous:").filter(|_| guest) {
            bytes += kb.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap_or(0) * 1024;
        }
    }
    bytes
}

/// Whether the machine has room for one more child of `size` after `made` of them: a
/// `copy` child holds all of its memory at once, and so does a `uffd` child once it is
/// forked again (which first fetches everything). Running out would have the kernel's
/// OOM killer end a VM halfway through the scenario (as it did in an 8 GiB testbed).
fn room_for_fork(size: usize, strategy: Strategy, made: usize) -> Result<(), BenchError> {
    let needs = match strategy {
        Strategy::Copy | Strategy::Uffd => size as u64,
        _ => 0,
    } + (256 << 20);
    ensure_room(needs, &format!("after {made} forks, the next"))
}

/// An error, instead of the OOM killer later, when `what` needs more than the memory
/// the kernel says is available.
fn ensure_room(needs: u64, what: &str) -> Result<(), BenchError> {
    let available = super::meminfo("MemAvailable");
    if available < needs {
        return Err(BenchError::NoRoom { available, what: what.to_string(), needs });
    }
    Ok(())
}

/// Forks a chain `depth` deep: this VM, its child, the child's child, ...
fn chain(size: usize, strategy: Strategy, huge: bool, depth: usize) -> Result<Vec<Child>, BenchError> {
    let vm = populated_vm(size, huge, Workload::Idle)?;
    let mut links: Vec<Child> = Vec::new();
    let mut result = Ok(());
    for i in 1..=depth {
        if let Err(e) = room_for_fork(size, strategy, i - 1) {
            result = Err(e);
            break;
        }
        let name = vm_name("chain", strategy, i);
        let link = match links.last() {
            None => crate::fork::fork(&vm, &vm_name("chain", strategy, 0), false, &name, strategy)
                .map_err(BenchError::from),
            Some(parent) => {
                let req = Request::Fork { strategy, name: Some(name), count: 1 };
                api::call(&parent.name, &req).map_err(BenchError::from).and_then(|(answer, _)| {
                    let no_child = |source| BenchError::NoChild { answer: answer.to_string(), source };
                    let mut c: Vec<Child> =
                        serde_json::from_value(answer["children"].clone()).map_err(|e| no_child(Some(e)))?;
                    c.pop().ok_or_else(|| no_child(None))
                })
            }
        };
        match link {
            Ok(c) if c.timings.child_first_report_ns.is_some() => links.push(c),
            Ok(c) => {
                links.push(c);
                let silent = BenchError::Silent {
                    guest: "the child's guest",
                    event: "report",
                    secs: crate::fork::FIRST_REPORT_WAIT.as_secs(),
                };
                result = Err(BenchError::ChainLink { link: i, source: Box::new(silent) });
                break;
            }
            Err(e) => {
                result = Err(BenchError::ChainLink { link: i, source: Box::new(e) });
                break;
            }
        }
    }
    // Children first: a uffd child's memory is served by its parent.
    links.reverse();
    stop_all(&links);
    links.reverse();
    vm.stop();
    result.map(|()| links)
}

/// The fork suite's targets, from one run's records.
pub(super) fn ratios(records: &[Record]) -> Vec<Ratio> {
    let value = |scenario: Scenario, strategy: Strategy, metric: Metric, size: u64| {
        super::find(records, SUITE, scenario, strategy, metric, size).and_then(|r| r.value)
    };
    let sizes = super::sizes_of(records, SUITE);
    let mut chains: Vec<u32> = records
        .iter()
        .filter(|r| r.suite == SUITE)
        .filter_map(|r| match r.scenario {
            Scenario::Chain(n) => Some(n),
            _ => None,
        })
        .collect();
    chains.sort();
    chains.dedup();
    let mut out = Vec::new();
    let mut push = |name: String, size: u64, v: Option<f64>, target: &str, met: bool| {
        if let Some(value) = v.filter(|v| v.is_finite()) {
            out.push(Ratio { name, size_bytes: size, value, target: target.into(), met });
        }
    };
    for &size in &sizes {
        let m = Metric::ForkParentPauseNs;
        let pause = |s: Strategy| value(Scenario::Of(m), s, m, size);
        for s in [Strategy::Cow, Strategy::Reflink] {
            let ratio = pause(Strategy::Copy).zip(pause(s)).map(|(c, x)| c / x);
            push(format!("copy/{s} fork_parent_pause_ns"), size, ratio, ">= 1000", ratio >= Some(1000.0));
            let ms = pause(s).map(|ns| ns / 1e6);
            push(format!("{s} fork_parent_pause_ms"), size, ms, "<= 1", ms.is_some_and(|v| v <= 1.0));
        }
        let refork = |s: Strategy| value(Scenario::Refork1pct, s, Metric::ParentPauseNs, size);
        for s in [Strategy::Cow, Strategy::Reflink, Strategy::Uffd, Strategy::UffdMinor] {
            let ratio = refork(Strategy::Copy).zip(refork(s)).map(|(c, x)| c / x);
            push(format!("copy/{s} refork1pct parent_pause_ns"), size, ratio, ">= 20", ratio >= Some(20.0));
            let ms = refork(s).map(|ns| ns / 1e6);
            push(format!("{s} refork1pct parent_pause_ms"), size, ms, "<= 5", ms.is_some_and(|v| v <= 5.0));
        }
        for scenario in chains.iter().copied().map(Scenario::Chain) {
            for s in Strategy::CONCRETE {
                let ratio = value(scenario, s, Metric::LastForkNs, size)
                    .zip(value(scenario, s, Metric::FirstForkNs, size))
                    .map(|(l, f)| l / f);
                let name = format!("{s} {scenario} last/first fork_ns");
                push(name, size, ratio, "<= 1.5", ratio.is_some_and(|v| v <= 1.5));
            }
        }
    }
    out
}
