//! The `fork` suite: forking a running VM (the built-in guest, `count` workload) into a
//! new process, per strategy and guest size, as `vmfork fork` does it.
//!
//! * `fork_parent_pause_ns`: the parent's vCPUs stopped, from the pause to the resume
//!   (state capture and the memory clone happen in between);
//! * `fork_to_child_running_ns`: from the fork request to the child guest's first report.
//!
//! Each is the median of [`FORKS`] forks of one parent; the children are stopped between
//! forks. The guest's memory is written in full before the first fork, so every page is
//! populated and cloning has real work to do.

use std::sync::Arc;
use std::time::Duration;

use super::{BenchError, BenchOptions, Record, human_bytes};
use crate::memory::{MemoryOptions, PAGE_SIZE, Strategy, reflink};
use crate::vmm::{Vm, VmConfig, Workload, guest};

const SUITE: &str = "fork";
/// Forks per measurement.
pub const FORKS: usize = 5;

fn err(e: impl std::fmt::Display) -> BenchError {
    BenchError(format!("fork bench: {e}"))
}

pub(super) fn run(opts: &BenchOptions, out: &mut Vec<Record>) -> Result<(), BenchError> {
    let sizes = if opts.quick { vec![256 << 20] } else { vec![256 << 20, 1 << 30] };
    if let Err(e) = kvm_ioctls::Kvm::new() {
        for &size in &sizes {
            out.push(Record::skipped(
                SUITE,
                "fork",
                "all",
                size as u64,
                "fork_parent_pause_ns",
                &format!("no KVM: {e}"),
            ));
        }
        return Ok(());
    }
    for &size in &sizes {
        eprintln!("fork suite at {}", human_bytes(size as u64));
        for strategy in
            [Strategy::Copy, Strategy::Cow, Strategy::Reflink, Strategy::Uffd, Strategy::UffdMinor]
        {
            let sz = size as u64;
            if strategy == Strategy::Reflink {
                if let Err(e) = reflink::probe() {
                    out.push(Record::skipped(
                        SUITE,
                        "fork",
                        "reflink",
                        sz,
                        "fork_parent_pause_ns",
                        &e.to_string(),
                    ));
                    continue;
                }
            }
            match forks(size, strategy, opts.huge_pages) {
                Ok((pause, running)) => {
                    let name = strategy.name();
                    out.push(Record::value(
                        SUITE,
                        "fork_parent_pause_ns",
                        name,
                        sz,
                        "fork_parent_pause_ns",
                        pause,
                        "ns",
                    ));
                    out.push(Record::value(
                        SUITE,
                        "fork_to_child_running_ns",
                        name,
                        sz,
                        "fork_to_child_running_ns",
                        running,
                        "ns",
                    ));
                }
                Err(e) => {
                    eprintln!("  {strategy}: {e}");
                    out.push(Record::skipped(
                        SUITE,
                        "fork",
                        strategy.name(),
                        sz,
                        "fork_parent_pause_ns",
                        &e.0,
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Medians of (parent pause, fork to child running) over [`FORKS`] forks.
fn forks(size: usize, strategy: Strategy, huge_pages: bool) -> Result<(f64, f64), BenchError> {
    let memory = Arc::new(guest::memory(size, &MemoryOptions { huge_pages }).map_err(err)?);
    let vm = Vm::create(memory.clone(), &VmConfig { workload: Workload::default(), ..Default::default() })
        .map_err(err)?;
    vm.subscribe().recv_timeout(Duration::from_secs(20)).map_err(|_| err("the guest did not report"))?;
    // Populate every page past the guest's own (it lives in the first MiB).
    vm.pause().map_err(err)?;
    for at in ((1 << 20)..size).step_by(PAGE_SIZE) {
        memory.write(guest::ram_gpa(at as u64), &[0x5a]).map_err(err)?;
    }
    vm.resume().map_err(err)?;
    let parent = format!("bench-{}", std::process::id());
    let (mut pauses, mut running) = (Vec::new(), Vec::new());
    for i in 0..FORKS {
        let child_name = format!("{parent}-{}-{i}", strategy.name());
        let child = crate::fork::fork(&vm, &parent, false, &child_name, strategy).map_err(err)?;
        pauses.push(child.timings.parent_resumed_ns);
        running.push(
            child.timings.child_first_report_ns.ok_or_else(|| err("the child's guest did not report"))?,
        );
        crate::api::call(&child_name, &crate::api::Request::Stop).map_err(err)?;
    }
    vm.stop();
    let median = |mut v: Vec<u64>| {
        v.sort_unstable();
        v[v.len() / 2] as f64
    };
    Ok((median(pauses), median(running)))
}
