//! VM lifecycle benchmarks: `vm_start_ns` (process start to the guest's first report),
//! `pause_ns` and `resume_ns` (for 1 and 2 vCPUs). Goal: pause and resume ≤ 100 µs each.
//!
//! `pause_ns` is the time [`Vm::pause`] takes: kicking every vCPU out of `KVM_RUN` and
//! waiting until all are parked. `resume_ns` is the time [`Vm::resume`] takes to release
//! them (it does not wait for the guest to run again). Each is the median of
//! [`CYCLES`] cycles on a VM running the `count` workload.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{BenchError, Error, Metric, Record, Scenario, Subject, Suite, Unit};
use crate::memory::MemoryOptions;
use crate::vmm::{Vm, VmConfig, Workload, guest};

/// Pause/resume cycles per measurement.
pub const CYCLES: usize = 50;
/// `vmfork run` starts per measurement.
pub const STARTS: usize = 5;
/// Guest memory of the benchmark VMs.
pub const MEM: usize = 64 << 20;

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_nanos() as f64
}

/// Times `cycles` pause/resume cycles of a `vcpus`-vCPU VM: (pause times, resume times).
pub fn pause_resume(vcpus: u32, cycles: usize) -> Result<(Vec<Duration>, Vec<Duration>), BenchError> {
    let memory = Arc::new(guest::memory(MEM, &MemoryOptions::default())?);
    let config = VmConfig { vcpus, workload: Workload::default(), ..Default::default() };
    let vm = Vm::create(memory, &config)?;
    let rx = vm.subscribe();
    // Every vCPU is up before the clock starts.
    let mut up = vec![false; vcpus as usize];
    while up.iter().any(|u| !u) {
        let r = rx.recv_timeout(Duration::from_secs(20)).map_err(|_| Error::Silent {
            guest: "the guest",
            event: "report",
            secs: 20,
        })?;
        up[r.vcpu as usize] = true;
    }
    let (mut pauses, mut resumes) = (Vec::new(), Vec::new());
    for _ in 0..cycles {
        std::thread::sleep(Duration::from_millis(2)); // let the vCPUs get back into the guest
        let t = Instant::now();
        vm.pause()?;
        pauses.push(t.elapsed());
        let t = Instant::now();
        vm.resume()?;
        resumes.push(t.elapsed());
    }
    vm.stop();
    Ok((pauses, resumes))
}

/// Times `runs` starts of `exe run` (a vmfork binary) from spawn to its first guest
/// report on stdout; each VM is stopped afterwards (SIGTERM, which `vmfork run` turns
/// into a clean stop). `runtime_dir`, if given, becomes the child's `XDG_RUNTIME_DIR`.
pub fn vm_start(exe: &Path, runs: usize, runtime_dir: Option<&Path>) -> Result<Vec<Duration>, BenchError> {
    let mut times = Vec::new();
    for i in 0..runs {
        let name = format!("bench-{}-{i}", std::process::id());
        let t = Instant::now();
        let mut cmd = Command::new(exe);
        cmd.args(["run", "--name", &name, "--mem", &MEM.to_string(), "--workload", "idle"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if let Some(dir) = runtime_dir {
            cmd.env("XDG_RUNTIME_DIR", dir);
        }
        let mut child = cmd.spawn().map_err(Error::io(format!("cannot start {}", exe.display())))?;
        let stdout = child.stdout.take().expect("piped");
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.by_ref().map_while(Result::ok).find(|l| l.starts_with("report "));
        let elapsed = t.elapsed();
        // Keep reading, so the VM never writes into a closed pipe.
        let drain = std::thread::spawn(move || lines.for_each(drop));
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        if nix::sys::signal::kill(pid, nix::sys::signal::SIGTERM).is_err() {
            let _ = child.kill();
        }
        let status = child.wait().map_err(Error::io(format!("cannot wait for {}", exe.display())))?;
        let _ = drain.join();
        if first.is_none() {
            return Err(Error::StartNoReport { exe: exe.to_path_buf() });
        }
        if !status.success() {
            return Err(Error::StartUnclean { exe: exe.to_path_buf(), status });
        }
        times.push(elapsed);
    }
    Ok(times)
}

/// Adds the VM records to `records`. Without /dev/kvm the records are marked skipped.
pub fn run(records: &mut Vec<Record>) -> Result<(), BenchError> {
    let size = MEM as u64;
    if let Err(e) = kvm_ioctls::Kvm::new() {
        let why = format!("no usable /dev/kvm: {e}");
        for m in [Metric::VmStartNs, Metric::PauseNs, Metric::ResumeNs] {
            records.push(Record::skipped(Suite::Vm, m, Subject::Kvm, size, m, &why));
        }
        return Ok(());
    }
    let exe = std::env::current_exe().map_err(Error::io("cannot find this program's own path"))?;
    let is_vmfork = exe.file_name().is_some_and(|n| n == "vmfork");
    let (start, kvm, start_ns) = (Scenario::Start, Subject::Kvm, Metric::VmStartNs);
    if is_vmfork {
        let t = vm_start(&exe, STARTS, None)?;
        records.push(Record::value(Suite::Vm, start, kvm, size, start_ns, median(t), Unit::Ns));
    } else {
        let why = "needs the vmfork binary (run `vmfork bench`)";
        records.push(Record::skipped(Suite::Vm, start, kvm, size, start_ns, why));
    }
    for vcpus in [1, 2] {
        let (p, r) = pause_resume(vcpus, CYCLES)?;
        let scenario = Scenario::Vcpus(vcpus);
        for (m, times) in [(Metric::PauseNs, p), (Metric::ResumeNs, r)] {
            records.push(Record::value(Suite::Vm, scenario, kvm, size, m, median(times), Unit::Ns));
        }
    }
    Ok(())
}
