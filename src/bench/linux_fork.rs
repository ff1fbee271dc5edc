//! The `linux` suite: forking a running stock Linux guest (the reference guest of
//! `qemu-testbed/linux-guest`, 256 MiB), per strategy, as `vmfork fork` does it.
//!
//! * `fork_parent_pause_ns`: the parent's vCPUs stopped, from the pause to the resume;
//! * `fork_to_child_console_ns`: from the fork request to the child guest's first
//!   console line (the guest prints one every half second, so this includes up to
//!   500 ms of waiting for the guest itself).
//!
//! Medians of [`FORKS`] forks of one booted parent. Runs only where a Linux guest can
//! boot (hardware-assisted KVM) and its files exist (`$VMFORK_LINUX_KERNEL`,
//! `$VMFORK_LINUX_INITRD`, else the testbed cache); otherwise every record says why not.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{BenchError, Record};
use crate::memory::{GuestMemory, MemoryOptions, Strategy, reflink};
use crate::vmm::linux::{
    DEFAULT_CMDLINE, LinuxBoot, LinuxMachine, host_can_boot_linux, reference_guest_files,
};
use crate::vmm::{Vm, VmConfig};

const SUITE: &str = "linux";
const SIZE: usize = 256 << 20;
/// Forks per measurement.
pub const FORKS: usize = 3;
const STRATEGIES: [Strategy; 5] =
    [Strategy::Copy, Strategy::Cow, Strategy::Reflink, Strategy::Uffd, Strategy::UffdMinor];

fn err(e: impl std::fmt::Display) -> BenchError {
    BenchError(format!("linux fork bench: {e}"))
}

pub(super) fn run(out: &mut Vec<Record>) -> Result<(), BenchError> {
    let skip_all = |out: &mut Vec<Record>, why: &str| {
        for s in STRATEGIES {
            out.push(Record::skipped(SUITE, "fork", s.name(), SIZE as u64, "fork_parent_pause_ns", why));
        }
    };
    let files = host_can_boot_linux().and_then(|()| reference_guest_files());
    let (kernel, initrd) = match files {
        Ok(f) => f,
        Err(why) => {
            eprintln!("linux suite skipped: {why}");
            skip_all(out, &why);
            return Ok(());
        }
    };
    eprintln!("linux suite: booting {} at 256 MiB", kernel.display());
    let memory = Arc::new(GuestMemory::with_size(SIZE, &MemoryOptions::default()).map_err(err)?);
    let config = VmConfig { linux: Some(LinuxMachine::default()), ..Default::default() };
    let boot = LinuxBoot { kernel, initrd: Some(initrd), cmdline: DEFAULT_CMDLINE.into() };
    let t0 = Instant::now();
    let vm = Vm::create_linux(memory, &config, &boot).map_err(err)?;
    let (_, lines) = vm.console().subscribe();
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let left = deadline
            .checked_duration_since(Instant::now())
            .ok_or_else(|| err("the guest did not tick within 240 s"))?;
        let line = lines.recv_timeout(left).map_err(|_| err("the guest did not tick within 240 s"))?;
        if line.starts_with("VMFORK-TICK") {
            break;
        }
    }
    let boot_ns = t0.elapsed().as_nanos() as f64;
    out.push(Record::value(
        SUITE,
        "boot_to_first_tick_ns",
        "native",
        SIZE as u64,
        "boot_to_first_tick_ns",
        boot_ns,
        "ns",
    ));
    let parent = format!("bench-linux-{}", std::process::id());
    for strategy in STRATEGIES {
        if strategy == Strategy::Reflink {
            if let Err(e) = reflink::probe() {
                out.push(Record::skipped(
                    SUITE,
                    "fork",
                    "reflink",
                    SIZE as u64,
                    "fork_parent_pause_ns",
                    &e.to_string(),
                ));
                continue;
            }
        }
        let (mut pauses, mut running) = (Vec::new(), Vec::new());
        let mut failed = None;
        for i in 0..FORKS {
            let child_name = format!("{parent}-{}-{i}", strategy.name());
            match crate::fork::fork(&vm, &parent, false, &child_name, strategy) {
                Ok(child) => {
                    let _ = crate::api::call(&child_name, &crate::api::Request::Stop);
                    pauses.push(child.timings.parent_resumed_ns);
                    match child.timings.child_first_report_ns {
                        Some(ns) => running.push(ns),
                        None => {
                            failed = Some("a child's guest printed nothing within the wait".to_string());
                            break;
                        }
                    }
                }
                Err(e) => {
                    failed = Some(e.to_string());
                    break;
                }
            }
        }
        let name = strategy.name();
        if let Some(why) = failed {
            eprintln!("  {name}: {why}");
            out.push(Record::skipped(SUITE, "fork", name, SIZE as u64, "fork_parent_pause_ns", &why));
            continue;
        }
        let median = |mut v: Vec<u64>| {
            v.sort_unstable();
            v[v.len() / 2] as f64
        };
        out.push(Record::value(
            SUITE,
            "fork_parent_pause_ns",
            name,
            SIZE as u64,
            "fork_parent_pause_ns",
            median(pauses),
            "ns",
        ));
        out.push(Record::value(
            SUITE,
            "fork_to_child_console_ns",
            name,
            SIZE as u64,
            "fork_to_child_console_ns",
            median(running),
            "ns",
        ));
    }
    vm.stop();
    Ok(())
}
