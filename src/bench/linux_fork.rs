//! The `linux` suite: forking a running stock Linux guest (the reference guest of
//! `qemu-testbed/linux-guest`), per strategy, as `vmfork fork` does it, at 256 MiB
//! (`--quick`) and 1 GiB.
//!
//! * `boot_to_first_tick_ns`: from creating the VM to the guest's first tick line;
//! * `fork_parent_pause_ns`: the parent's vCPUs stopped, from the pause to the resume;
//! * `fork_to_child_console_ns`: from the fork request to the child guest's first
//!   console line (the guest prints one every half second, so this includes up to
//!   500 ms of waiting for the guest itself);
//! * `idle/parent_bytes` and `idle{N}/total_bytes`: memory of the booted parent alone,
//!   and of the parent with N idle children, each running for [`IDLE_TIME`] (the growth
//!   of the system's shmem since before the parent existed, plus the copy-on-write
//!   anonymous pages in every VM's guest mappings).
//!
//! Pause and console times are medians of several forks of one booted parent; [`Plan`]
//! says how many, and how many idle children (fewer with `--quick`). Runs only
//! where a Linux guest can boot (hardware-assisted KVM) and its files exist
//! (`$VMFORK_LINUX_KERNEL`, `$VMFORK_LINUX_INITRD`, else the testbed cache); otherwise
//! every record says why not.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::clone::settled_meminfo;
use super::fork::{fork_timings, held_bytes, stop_all};
use super::{BenchError, BenchOptions, Error, Metric, Record, Scenario, Subject, Suite, Unit, note};
use crate::fork::Child;
use crate::memory::{MemoryOptions, Strategy, reflink};
use crate::vmm::linux::{
    DEFAULT_CMDLINE, LinuxBoot, LinuxMachine, MAX_MEM, host_can_boot_linux, reference_guest_files,
};
use crate::vmm::{RunState, Vm, VmConfig};

const SUITE: Suite = Suite::Linux;
/// How much one size measures.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// Forks per timing.
    pub forks: usize,
    /// Children held at once for the memory measurement.
    pub idle_forks: usize,
}

impl Plan {
    pub const FULL: Plan = Plan { forks: 3, idle_forks: 8 };
    /// `--quick`: one timing fork and two idle children per strategy (a smoke run).
    pub const QUICK: Plan = Plan { forks: 1, idle_forks: 2 };
}

/// How long the guest may take from boot to its first tick.
const BOOT_WAIT: Duration = Duration::from_secs(240);

/// How long the idle children run before their memory is measured.
pub const IDLE_TIME: Duration = Duration::from_secs(2);

pub(super) fn run(opts: &BenchOptions, out: &mut Vec<Record>) -> Result<(), BenchError> {
    let sizes = match (&opts.sizes[..], opts.quick) {
        ([], true) => vec![256 << 20],
        ([], false) => vec![256 << 20, 1 << 30],
        (sizes, _) => sizes.to_vec(),
    };
    let plan = if opts.quick { Plan::QUICK } else { Plan::FULL };
    let skip = |out: &mut Vec<Record>, size: usize, strategy: Subject, why: &str| {
        let pause = Metric::ForkParentPauseNs;
        out.push(Record::skipped(SUITE, Scenario::Fork, strategy, size as u64, pause, why));
    };
    let files = host_can_boot_linux().and_then(|()| reference_guest_files());
    let files = match files {
        Ok(f) => f,
        Err(why) => {
            eprintln!("linux suite skipped: {why}");
            for &size in &sizes {
                skip(out, size, Subject::All, &why.to_string());
            }
            return Ok(());
        }
    };
    for &size in &sizes {
        if size > MAX_MEM {
            let why = format!("a Linux guest has at most {} here", super::human_bytes(MAX_MEM as u64));
            eprintln!("linux suite at {}: {why}", super::human_bytes(size as u64));
            skip(out, size, Subject::All, &why);
            continue;
        }
        // A guest that does not boot fails this size, not the whole report.
        if let Err(e) = at_size(size, opts.huge_pages, plan, &files, out) {
            let why = note(&e);
            eprintln!("linux suite at {}: FAILED: {why}", super::human_bytes(size as u64));
            skip(out, size, Subject::All, &format!("FAILED: {why}"));
        }
    }
    Ok(())
}

/// Boots one parent of `size` (with transparent huge pages if asked) and measures every
/// strategy on it.
fn at_size(
    size: usize,
    huge_pages: bool,
    plan: Plan,
    (kernel, initrd): &(PathBuf, PathBuf),
    out: &mut Vec<Record>,
) -> Result<(), BenchError> {
    let sz = size as u64;
    eprintln!("linux suite: booting {} with {}", kernel.display(), super::human_bytes(sz));
    let shmem_before = settled_meminfo("Shmem");
    let memory = Arc::new(crate::vmm::guest::memory(size, &MemoryOptions { huge_pages })?);
    let config = VmConfig { linux: Some(LinuxMachine::default()), ..Default::default() };
    let boot =
        LinuxBoot { kernel: kernel.clone(), initrd: Some(initrd.clone()), cmdline: DEFAULT_CMDLINE.into() };
    let t0 = Instant::now();
    let vm = Vm::create_linux(memory, &config, &boot)?;
    let (_, lines) = vm.console().subscribe();
    let deadline = Instant::now() + BOOT_WAIT;
    let silent = || Error::Silent { guest: "the Linux guest", event: "tick", secs: BOOT_WAIT.as_secs() };
    loop {
        let left = deadline.checked_duration_since(Instant::now()).ok_or_else(silent)?;
        let line = lines.recv_timeout(left).map_err(|_| silent())?;
        if line.starts_with("VMFORK-TICK") {
            break;
        }
    }
    let value = |scenario: Scenario, strategy: Subject, metric: Metric, v: f64, unit: Unit| {
        Record::value(SUITE, scenario, strategy, sz, metric, v, unit)
    };
    // A record named after its metric.
    let single =
        |metric: Metric, strategy: Subject, v: f64| value(metric.into(), strategy, metric, v, Unit::Ns);
    out.push(single(Metric::BootToFirstTickNs, Subject::Native, t0.elapsed().as_nanos() as f64));
    let parent = format!("bench-linux-{}-{}", std::process::id(), sz >> 20);
    let bytes_now = |children: &[Child]| held_bytes(shmem_before, children) as f64;
    out.push(value(Scenario::Idle, Subject::Native, Metric::ParentBytes, bytes_now(&[]), Unit::Bytes));
    for strategy in Strategy::CONCRETE {
        let (name, pause) = (strategy.name(), Metric::ForkParentPauseNs);
        // A parent that died leaves nothing to fork: say why once, with its last words.
        if let RunState::Stopped(why) = vm.state() {
            let (lines, _) = vm.console().subscribe();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            eprintln!("  the parent guest stopped ({why}); its console's last lines:\n{tail}");
            for s in Strategy::CONCRETE.iter().skip_while(|s| **s != strategy) {
                let note = format!("the parent guest stopped before this strategy: {why}");
                out.push(Record::skipped(SUITE, Scenario::Fork, *s, sz, pause, &note));
            }
            break;
        }
        if strategy == Strategy::Reflink {
            if let Err(e) = reflink::probe() {
                out.push(Record::skipped(SUITE, Scenario::Fork, strategy, sz, pause, &e.to_string()));
                continue;
            }
        }
        eprintln!("  {name}");
        match fork_timings(&vm, &parent, size, strategy, plan.forks) {
            Ok(t) => {
                let s = strategy.into();
                out.push(single(pause, s, t.pause));
                out.push(single(Metric::ForkToChildConsoleNs, s, t.first_report));
                out.push(single(Metric::ForkToVcpusRunningNs, s, t.vcpus_running));
            }
            Err(e) => {
                let why = note(&e);
                eprintln!("  {name}: {why}");
                out.push(Record::skipped(SUITE, Scenario::Fork, strategy, sz, pause, &why));
            }
        }
        let scenario = Scenario::IdleForks(plan.idle_forks as u32);
        let mut children = Vec::new();
        let mut failed = None;
        for i in 0..plan.idle_forks {
            match crate::fork::fork(&vm, &parent, false, &format!("{parent}-{name}-idle{i}"), strategy) {
                Ok(c) => children.push(c),
                Err(e) => {
                    failed = Some(crate::error::report(&e));
                    break;
                }
            }
        }
        if failed.is_none() {
            std::thread::sleep(IDLE_TIME);
            out.push(value(scenario, strategy.into(), Metric::TotalBytes, bytes_now(&children), Unit::Bytes));
        }
        stop_all(&children);
        if let Some(why) = failed {
            eprintln!("  {name} {scenario}: {why}");
            out.push(Record::skipped(SUITE, scenario, strategy, sz, Metric::TotalBytes, &why));
        }
    }
    vm.stop();
    Ok(())
}

/// Ratios of the linux suite, per size: each strategy's parent pause against copy's, and
/// the memory of a parent with N idle children against the parent alone.
/// The memory target is the bench's own: an idle forked Linux guest
/// should cost at most an eighth of its parent, so N of them stay within 1 + N/8 parents
/// (eight children: two parents' worth).
pub(super) fn ratios(records: &[Record]) -> Vec<super::Ratio> {
    let value = |scenario: Scenario, strategy: Subject, metric: Metric, size: u64| {
        super::find(records, SUITE, scenario, strategy, metric, size).and_then(|r| r.value)
    };
    let mut out = Vec::new();
    for size in super::sizes_of(records, SUITE) {
        let mut push = |name: String, value: Option<f64>, limit: f64, at_least: bool| {
            if let Some(value) = value {
                let (target, met) = if at_least {
                    (format!(">= {limit}"), value >= limit)
                } else {
                    (format!("<= {limit}"), value <= limit)
                };
                out.push(super::Ratio { name, size_bytes: size, value, target, met });
            }
        };
        let m = Metric::ForkParentPauseNs;
        let pause = |s: Strategy| value(m.into(), s.into(), m, size);
        let parent = value(Scenario::Idle, Subject::Native, Metric::ParentBytes, size);
        let idle_scenarios = records.iter().filter(|r| {
            r.suite == SUITE && r.size_bytes == size && r.metric == Metric::TotalBytes && r.value.is_some()
        });
        let mut idle: Vec<u32> = idle_scenarios
            .filter_map(|r| match r.scenario {
                Scenario::IdleForks(n) => Some(n),
                _ => None,
            })
            .collect();
        idle.sort_unstable();
        idle.dedup();
        for s in Strategy::CONCRETE {
            if s != Strategy::Copy {
                let v = pause(Strategy::Copy).zip(pause(s)).map(|(c, x)| c / x);
                push(format!("linux copy/{s} fork_parent_pause_ns"), v, 1.0, true);
            }
            for &n in &idle {
                let scenario = Scenario::IdleForks(n);
                let v = value(scenario, s.into(), Metric::TotalBytes, size).zip(parent).map(|(t, p)| t / p);
                push(format!("linux {s} {scenario}/parent memory"), v, 1.0 + n as f64 / 8.0, false);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The memory target scales with the number of idle children: a quick run's two
    /// children get 1.25 parents, a full run's eight get two.
    #[test]
    fn idle_memory_targets_follow_the_number_of_children() {
        let size = 256 << 20;
        let rec = |scenario: Scenario, strategy: Subject, metric: Metric, v: f64| {
            Record::value(SUITE, scenario, strategy, size, metric, v, Unit::Bytes)
        };
        let (copy, cow) = (Subject::Strategy(Strategy::Copy), Subject::Strategy(Strategy::Cow));
        let (pause, total) = (Metric::ForkParentPauseNs, Metric::TotalBytes);
        let records = vec![
            rec(Scenario::Idle, Subject::Native, Metric::ParentBytes, 100.0),
            rec(Scenario::IdleForks(2), cow, total, 120.0),
            rec(Scenario::IdleForks(8), cow, total, 210.0),
            rec(pause.into(), copy, pause, 300.0),
            rec(pause.into(), cow, pause, 10.0),
        ];
        let ratios = ratios(&records);
        let get = |name: &str| {
            ratios.iter().find(|r| r.name == name).unwrap_or_else(|| panic!("{name}: {ratios:?}"))
        };
        let two = get("linux cow idle2/parent memory");
        assert_eq!((two.value, two.target.as_str(), two.met), (1.2, "<= 1.25", true));
        let eight = get("linux cow idle8/parent memory");
        assert_eq!((eight.value, eight.target.as_str(), eight.met), (2.1, "<= 2", false));
        let pause = get("linux copy/cow fork_parent_pause_ns");
        assert_eq!((pause.value, pause.target.as_str(), pause.met), (30.0, ">= 1", true));
        assert!(ratios.iter().all(|r| !r.name.contains("copy idle")), "no copy memory records: {ratios:?}");
    }
}
