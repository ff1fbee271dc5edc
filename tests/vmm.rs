//! Integration tests of the VMM on this host's KVM. They start real VMs running the
//! built-in guest; each skips with a printed reason only where /dev/kvm is absent.

use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::Duration;

mod common;

use common::{Runtime, kvm_available};
use vmfork::memory::{GuestMemory, MemoryOptions, Strategy};
use vmfork::vmm::guest::{self, GENID_GPA};
use vmfork::vmm::{ExitReason, Report, RunState, Vm, VmConfig, VmState, Workload};

fn memory(mib: usize) -> Arc<GuestMemory> {
    Arc::new(guest::memory(mib << 20, &MemoryOptions::default()).unwrap())
}

fn next(rx: &Receiver<Report>) -> Report {
    rx.recv_timeout(Duration::from_secs(20)).expect("no guest report within 20 s")
}

fn next_of(rx: &Receiver<Report>, vcpu: u32) -> Report {
    loop {
        let r = next(rx);
        if r.vcpu == vcpu {
            return r;
        }
    }
}

/// An independent model of the guest's touch workload (guest.S) for one vCPU: the
/// checksum it must report after `counter` iterations.
struct TouchModel {
    pages: Vec<u64>,
    random: bool,
    rng: u64,
    counter: u64,
    checksum: u64,
}

impl TouchModel {
    fn new(pages: usize, random: bool, vcpu: u64) -> Self {
        TouchModel {
            pages: vec![0; pages],
            random,
            rng: 0x9e37_79b9_7f4a_7c15 ^ (vcpu + 1),
            counter: 0,
            checksum: 0,
        }
    }

    fn checksum_at(&mut self, counter: u64) -> u64 {
        assert!(counter >= self.counter, "model cannot go back");
        while self.counter < counter {
            let n = self.pages.len() as u64;
            let page = if self.random {
                self.rng ^= self.rng << 13;
                self.rng ^= self.rng >> 7;
                self.rng ^= self.rng << 17;
                self.rng % n
            } else {
                self.counter % n
            };
            self.pages[page as usize] += 1;
            self.checksum = (self.checksum ^ self.pages[page as usize]).wrapping_mul(0x100_0000_01b3);
            self.counter += 1;
        }
        self.checksum
    }
}

#[test]
fn guest_reports_increasing_counter() {
    let Some(_vm_lock) = kvm_available("guest_reports_increasing_counter") else {
        return;
    };
    let cfg = VmConfig { workload: Workload::Count { every: 1 << 20 }, ..Default::default() };
    let vm = Vm::create(memory(16), &cfg).unwrap();
    let rx = vm.subscribe();
    let mut last = next(&rx);
    for _ in 0..5 {
        let r = next(&rx);
        assert_eq!(r.counter, last.counter + (1 << 20), "{r} after {last}");
        assert_eq!(r.seq, last.seq + 1);
        last = r;
    }
    let (backlog, _) = vm.console().subscribe();
    assert!(backlog.iter().any(|l| l.contains("vmfork guest: running in ring 3")), "{backlog:?}");
    let err = vm.capture().unwrap_err().to_string();
    assert!(err.contains("capture needs it paused"), "{err}");
    assert_eq!(vm.stop(), ExitReason::Stopped);
}

#[test]
fn touch_workloads_match_an_independent_model() {
    let Some(_vm_lock) = kvm_available("touch_workloads_match_an_independent_model") else {
        return;
    };
    for random in [false, true] {
        let workload = Workload::Touch { mib: 4, random, every: 50_000 };
        let vm = Vm::create(memory(16), &VmConfig { workload, ..Default::default() }).unwrap();
        let rx = vm.subscribe();
        let mut model = TouchModel::new(1024, random, 0);
        for _ in 0..20 {
            let r = next(&rx);
            assert_eq!(r.checksum, model.checksum_at(r.counter), "{workload}: {r}");
        }
        vm.stop();
    }
}

#[test]
fn pause_stops_the_guest_and_resume_continues_it() {
    let Some(_vm_lock) = kvm_available("pause_stops_the_guest_and_resume_continues_it") else {
        return;
    };
    for vcpus in [1, 2] {
        let cfg = VmConfig { vcpus, workload: Workload::Count { every: 1 << 22 }, ..Default::default() };
        let vm = Vm::create(memory(16), &cfg).unwrap();
        let rx = vm.subscribe();
        for v in 0..vcpus {
            next_of(&rx, v);
        }
        vm.pause().unwrap();
        assert_eq!(vm.state(), RunState::Paused);
        let before = vm.capture().unwrap();
        while rx.try_recv().is_ok() {}
        std::thread::sleep(Duration::from_millis(200));
        assert!(rx.try_recv().is_err(), "{vcpus} vCPUs: a report arrived while paused");
        let after = vm.capture().unwrap();
        for v in 0..vcpus as usize {
            assert_eq!(before.vcpus[v].regs.rip, after.vcpus[v].regs.rip);
            assert_eq!(
                before.vcpus[v].regs.r13, after.vcpus[v].regs.r13,
                "counter register moved while paused"
            );
        }
        let latest = vm.latest_reports();
        vm.resume().unwrap();
        assert_eq!(vm.state(), RunState::Running);
        let mut first: Vec<Option<Report>> = vec![None; vcpus as usize];
        while first.iter().any(Option::is_none) {
            let r = next(&rx);
            first[r.vcpu as usize].get_or_insert(r);
        }
        for v in 0..vcpus as usize {
            let (r, last) = (first[v].unwrap(), latest[v].unwrap());
            assert_eq!(r.counter, last.counter + (1 << 22), "vCPU {v} continues where it stopped");
        }
        // Many quick pause/resume cycles do not lose or wedge a vCPU.
        for _ in 0..50 {
            vm.pause().unwrap();
            vm.resume().unwrap();
        }
        for v in 0..vcpus {
            next_of(&rx, v);
        }
        assert_eq!(vm.stop(), ExitReason::Stopped);
        assert!(matches!(vm.state(), RunState::Stopped(_)));
        assert!(vm.pause().is_err(), "pause after stop must fail");
        assert!(vm.resume().is_err(), "resume after stop must fail");
    }
}

#[test]
fn idle_guest_parks_and_reports_again_after_resume() {
    let Some(_vm_lock) = kvm_available("idle_guest_parks_and_reports_again_after_resume") else {
        return;
    };
    let vm = Vm::create(memory(8), &VmConfig { workload: Workload::Idle, ..Default::default() }).unwrap();
    let rx = vm.subscribe();
    // The first report at entry, then the idle loop's.
    let mut seq = 0;
    while seq < 2 {
        seq = next(&rx).seq;
    }
    std::thread::sleep(Duration::from_millis(100));
    while let Ok(r) = rx.try_recv() {
        seq = r.seq;
    }
    assert_eq!(seq, 2, "an idle guest reports twice, then parks");
    vm.pause().unwrap();
    vm.resume().unwrap();
    assert_eq!(next(&rx).seq, 3, "after resume it reports once more and parks again");
    assert_eq!(vm.stop(), ExitReason::Stopped);
}

/// A pause that lands between an idle guest's report and its idle port write (as a
/// fork right after a report does) must not swallow the report the next resume owes:
/// the guest then goes idle with a resume already behind it.
#[test]
fn idle_guest_reports_after_every_resume_even_when_paused_right_after_a_report() {
    let Some(_vm_lock) =
        kvm_available("idle_guest_reports_after_every_resume_even_when_paused_right_after_a_report")
    else {
        return;
    };
    let vm = Vm::create(memory(8), &VmConfig { workload: Workload::Idle, ..Default::default() }).unwrap();
    let rx = vm.subscribe();
    next(&rx);
    for round in 0..300 {
        // Pause the moment the report arrives: often before the guest reaches its idle.
        let r = rx.recv_timeout(Duration::from_secs(5));
        assert!(r.is_ok(), "round {round}: no report within 5 s of a resume");
        vm.pause().unwrap();
        vm.resume().unwrap();
    }
    vm.stop();
}

#[test]
fn guest_reset_through_i8042_ends_the_vm() {
    let Some(_vm_lock) = kvm_available("guest_reset_through_i8042_ends_the_vm") else {
        return;
    };
    let vm = Vm::create(memory(8), &VmConfig { workload: Workload::Exit, ..Default::default() }).unwrap();
    assert_eq!(vm.wait_exit(Duration::from_secs(20)), Some(ExitReason::Reset));
    assert_eq!(vm.state(), RunState::Stopped(ExitReason::Reset));
}

#[test]
fn guest_reads_the_generation_id_at_every_report() {
    let Some(_vm_lock) = kvm_available("guest_reads_the_generation_id_at_every_report") else {
        return;
    };
    let cfg = VmConfig { workload: Workload::Count { every: 1 << 22 }, ..Default::default() };
    let vm = Vm::create(memory(8), &cfg).unwrap();
    let rx = vm.subscribe();
    assert_eq!(next(&rx).genid, [0, 0]);
    vm.pause().unwrap();
    let id = [0x1122_3344_5566_7788u64, 0x99aa_bbcc_ddee_ff00];
    let bytes: Vec<u8> = id.iter().flat_map(|w| w.to_le_bytes()).collect();
    vm.memory().write(GENID_GPA, &bytes).unwrap();
    while rx.try_recv().is_ok() {}
    vm.resume().unwrap();
    assert_eq!(next(&rx).genid, id);
    vm.stop();
}

/// Pause, capture, serialize to JSON and back, restore into a fresh VM over `memory_for`'s
/// memory, and check the restored guest continues exactly where it stopped.
fn round_trip(vcpus: u32, random: bool, clone: Option<Strategy>) {
    let every = 40_000;
    let workload = Workload::Touch { mib: 4, random, every };
    let pages_per_vcpu = 1024 / vcpus as usize;
    let mut models: Vec<TouchModel> =
        (0..vcpus).map(|v| TouchModel::new(pages_per_vcpu, random, v as u64)).collect();
    let vm = Vm::create(memory(16), &VmConfig { vcpus, workload, ..Default::default() }).unwrap();
    let rx = vm.subscribe();
    // Pause soon (after 3 reports per vCPU) and check the reports against the model only
    // then: the (debug-built) model is ~20x slower than the guest and must catch up with
    // wherever the pause lands.
    let mut seen = vec![0; vcpus as usize];
    let mut early = Vec::new();
    while seen.iter().any(|&n| n < 3) {
        let r = next(&rx);
        seen[r.vcpu as usize] += 1;
        early.push(r);
    }
    vm.pause().unwrap();
    for r in early {
        assert_eq!(r.checksum, models[r.vcpu as usize].checksum_at(r.counter), "before capture: {r}");
    }
    let latest = vm.latest_reports();
    let state = vm.capture().unwrap();
    let json = state.to_json().unwrap();
    let state = VmState::from_json(&json).unwrap();
    let (memory, parent) = match clone {
        // The parent keeps running on its memory while the child runs on a clone.
        Some(s) => (Arc::new(vm.memory().clone_with(s).unwrap().0), Some(vm)),
        None => {
            let m = vm.memory().clone();
            vm.stop();
            (m, None)
        }
    };
    let child = Vm::restore(memory, &state).unwrap();
    assert_eq!(child.state(), RunState::Paused);
    let crx = child.subscribe();
    child.resume().unwrap();
    let mut child_models: Vec<TouchModel> =
        (0..vcpus).map(|v| TouchModel::new(pages_per_vcpu, random, v as u64)).collect();
    let mut seen = vec![0; vcpus as usize];
    while seen.iter().any(|&n| n < 5) {
        let r = next(&crx);
        let last = latest[r.vcpu as usize].unwrap();
        if seen[r.vcpu as usize] == 0 {
            assert_eq!(
                r.counter,
                last.counter + every,
                "vCPU {} continues exactly: {r} after {last}",
                r.vcpu
            );
            assert_eq!(r.seq, last.seq + 1);
        }
        seen[r.vcpu as usize] += 1;
        let want = child_models[r.vcpu as usize].checksum_at(r.counter);
        assert_eq!(r.checksum, want, "after restore: {r}");
    }
    if let Some(parent) = parent {
        while rx.try_recv().is_ok() {}
        parent.resume().unwrap();
        for _ in 0..5 * vcpus {
            let r = next(&rx);
            assert_eq!(r.checksum, models[r.vcpu as usize].checksum_at(r.counter), "parent after clone: {r}");
        }
        parent.stop();
    }
    child.stop();
}

#[test]
fn capture_restore_round_trip_continues_exactly() {
    let Some(_vm_lock) = kvm_available("capture_restore_round_trip_continues_exactly") else {
        return;
    };
    round_trip(1, false, None);
    round_trip(2, true, None);
}

#[test]
fn restore_onto_cloned_memory_runs_parent_and_child_independently() {
    let Some(_vm_lock) = kvm_available("restore_onto_cloned_memory_runs_parent_and_child_independently")
    else {
        return;
    };
    round_trip(1, false, Some(Strategy::Copy));
    round_trip(2, true, Some(Strategy::Cow));
}

// ---- the vmfork command: one process per VM, control socket, CLI ----

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;

/// Sends raw bytes on VM `name`'s socket and returns the answer line as JSON.
fn raw(rt: &Runtime, name: &str, bytes: &[u8]) -> serde_json::Value {
    let mut s = UnixStream::connect(rt.socket(name)).unwrap();
    s.write_all(bytes).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

#[test]
fn cli_runs_lists_pauses_resumes_streams_and_stops_a_vm() {
    let Some(_vm_lock) = kvm_available("cli_runs_lists_pauses_resumes_streams_and_stops_a_vm") else {
        return;
    };
    let rt = Runtime::new("lifecycle");
    let out = rt.ok(&["run", "--detach", "--name", "t1", "--mem", "64M", "--vcpus", "2"]);
    assert!(out.contains("t1"), "{out}");
    let sock = std::fs::metadata(rt.socket("t1")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(sock.permissions().mode() & 0o777, 0o600, "socket must be private");

    let ls = rt.ls();
    assert_eq!(ls.len(), 1);
    assert_eq!(ls[0]["name"], "t1");
    assert_eq!(ls[0]["state"], "running");
    assert_eq!(ls[0]["memory_bytes"], 64 << 20);
    assert_eq!(ls[0]["vcpus"], 2);
    assert!(ls[0]["private_bytes"].as_u64().unwrap() > 0, "the guest wrote memory: {}", ls[0]);
    let table = rt.ok(&["ls"]);
    assert!(table.contains("NAME") && table.contains("t1") && table.contains("running"), "{table}");

    rt.ok(&["pause", "t1"]);
    let paused = rt.ls();
    assert_eq!(paused[0]["state"], "paused");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(rt.ls()[0]["reports"], paused[0]["reports"], "reports changed while paused");
    rt.ok(&["resume", "t1"]);
    assert_eq!(rt.ls()[0]["state"], "running");

    // The console streams the backlog (the banner, unless 256 lines came since), then
    // live reports.
    let mut console = Command::new(env!("CARGO_BIN_EXE_vmfork"))
        .args(["console", "t1"])
        .env("XDG_RUNTIME_DIR", &rt.dir)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(console.stdout.take().unwrap()).lines();
    let report = lines.find(|l| l.as_ref().unwrap().starts_with("report ")).unwrap().unwrap();
    assert!(report.contains("counter="), "{report}");

    assert!(rt.ok(&["stop", "t1"]).contains("stopped"));
    assert!(!rt.socket("t1").exists(), "socket removed on stop");
    assert!(rt.ls().is_empty());
    // The console ends when the VM stops.
    assert!(console.wait().unwrap().success());
}

#[test]
fn cli_foreground_run_prints_reports_and_ends_on_guest_reset() {
    let Some(_vm_lock) = kvm_available("cli_foreground_run_prints_reports_and_ends_on_guest_reset") else {
        return;
    };
    let rt = Runtime::new("foreground");
    let out = rt.vmfork(&["run", "--name", "fg", "--mem", "16M", "--workload", "exit"]);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("vmfork guest: running in ring 3"), "{stdout}");
    assert!(stdout.contains("report vcpu=0 seq=1 counter=0"), "{stdout}");
    assert!(stderr.contains("guest reset"), "{stderr}");
    assert!(!rt.socket("fg").exists());
}

#[test]
fn cli_malformed_requests_get_errors_and_the_vm_keeps_running() {
    let Some(_vm_lock) = kvm_available("cli_malformed_requests_get_errors_and_the_vm_keeps_running") else {
        return;
    };
    let rt = Runtime::new("malformed");
    rt.ok(&["run", "--detach", "--name", "m", "--mem", "16M", "--workload", "idle"]);
    let long = vec![b'x'; 100_000];
    for bad in [
        &b"garbage\n"[..],
        b"{\"cmd\":\"reboot\"}\n",
        b"{\"cmd\":\"stop\",\"force\":true}\n",
        b"\n",
        b"{\"cmd\":",
        &long,
    ] {
        let v = raw(&rt, "m", bad);
        assert_eq!(v["ok"], false, "{v}");
        assert!(v["error"].as_str().unwrap().contains("bad request"), "{v}");
    }
    let v = raw(&rt, "m", b"{\"cmd\":\"status\"}\n");
    assert_eq!(v["ok"], true);
    assert_eq!(v["status"]["state"], "running");
    // A client that connects and says nothing does not hurt either.
    drop(UnixStream::connect(rt.socket("m")).unwrap());
    let v = raw(&rt, "m", b"{\"cmd\":\"pause\"}\n");
    assert!(v["pause_ns"].as_u64().unwrap() > 0, "{v}");
    rt.ok(&["stop", "m"]);
}

#[test]
fn cli_errors_are_clear_and_stale_sockets_are_cleaned_up() {
    let Some(_vm_lock) = kvm_available("cli_errors_are_clear_and_stale_sockets_are_cleaned_up") else {
        return;
    };
    let rt = Runtime::new("errors");
    let out = rt.vmfork(&["pause", "nosuch"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no VM named \"nosuch\""));

    // A VM process that died leaves its socket behind.
    std::fs::create_dir_all(rt.dir.join("vmfork")).unwrap();
    drop(std::os::unix::net::UnixListener::bind(rt.socket("ghost")).unwrap());
    assert!(rt.socket("ghost").exists());
    let out = rt.vmfork(&["resume", "ghost"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stale") && err.contains("removed"), "{err}");
    assert!(!rt.socket("ghost").exists());
    // ls cleans up too, and says so.
    drop(std::os::unix::net::UnixListener::bind(rt.socket("ghost2")).unwrap());
    let out = rt.vmfork(&["ls", "--json"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("stale"));
    assert!(!rt.socket("ghost2").exists());
    // A VM process killed between binding its socket and linking it into place leaves
    // the socket under its binding name, which ls removes once that process is gone
    // (and keeps while it runs: it may be binding right now).
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let binding = |pid: u32| rt.dir.join("vmfork").join(format!("ghost3.sock.new-{pid}"));
    drop(std::os::unix::net::UnixListener::bind(binding(dead)).unwrap());
    drop(std::os::unix::net::UnixListener::bind(binding(std::process::id())).unwrap());
    let out = rt.vmfork(&["ls"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("stale socket"), "{out:?}");
    assert!(!binding(dead).exists(), "ls left the binding socket of dead pid {dead}");
    assert!(binding(std::process::id()).exists(), "ls removed the binding socket of a live process");
    std::fs::remove_file(binding(std::process::id())).unwrap();
    // A new VM may take a stale name.
    drop(std::os::unix::net::UnixListener::bind(rt.socket("reuse")).unwrap());
    rt.ok(&["run", "--detach", "--name", "reuse", "--mem", "16M", "--workload", "idle"]);
    // But not a live one.
    let out = rt.vmfork(&["run", "--detach", "--name", "reuse", "--mem", "16M"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already running"));
    rt.ok(&["stop", "reuse"]);

    let out = rt.vmfork(&["run", "--name", "bad/name"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad VM name"));
    let out = rt.vmfork(&["run", "--workload", "dance"]);
    assert_eq!(out.status.code(), Some(2), "usage errors exit with 2");
}

/// `vmfork report` of a file that is not a report: one line naming the file, the
/// parser's complaint once, and how to write a report.
#[test]
fn cli_report_of_a_file_that_is_no_report_says_how_to_get_one() {
    let rt = Runtime::new("bad-report");
    let file = rt.dir.join("not-a-report.json");
    std::fs::write(&file, r#"{"run": 1}"#).unwrap();
    let out = rt.vmfork(&["report", file.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with(&format!("vmfork: {} is not a vmfork bench report", file.display())), "{err}");
    assert!(err.contains("`vmfork bench --json FILE`"), "{err}");
    assert_eq!(err.matches("invalid type").count(), 1, "the parser's complaint once: {err}");
}

/// The remote suite against a store that is set but does not answer (a loopback port
/// nothing listens on): one skip per size, naming the store, the failed request once,
/// and what to do; the run itself succeeds.
#[test]
fn bench_remote_suite_with_a_store_that_does_not_answer_skips_saying_what_to_do() {
    let Some(_vm_lock) =
        kvm_available("bench_remote_suite_with_a_store_that_does_not_answer_skips_saying_what_to_do")
    else {
        return;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let rt = Runtime::new("bench-store-down");
    let out = rt
        .command()
        .args(["bench", "--quick", "--suite", "remote"])
        .env("VMFORK_S3_ENDPOINT", &endpoint)
        .env("VMFORK_S3_TIMEOUT_SECS", "2")
        .env("VMFORK_S3_RETRY_SECS", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let skips: Vec<&str> = stdout.lines().filter(|l| l.starts_with("skipped ")).collect();
    assert_eq!(skips.len(), 1, "{stdout}");
    let why =
        format!("the object store at {endpoint} does not answer (start one with scripts/s3-server start");
    assert!(skips[0].contains(&why) && skips[0].contains("unset VMFORK_S3_ENDPOINT"), "{stdout}");
    // The object is named once (the HTTP client's own message names its URL as well).
    assert_eq!(skips[0].matches("s3://").count(), 1, "the failed object once: {stdout}");
}

#[test]
fn cli_without_kvm_access_says_what_to_do() {
    let Some(_vm_lock) = kvm_available("cli_without_kvm_access_says_what_to_do") else {
        return;
    };
    // Needs a user without access to /dev/kvm: run as `nobody` when we are root.
    let as_root = Command::new("id").arg("-u").output().map(|o| o.stdout == b"0\n").unwrap_or(false);
    let runuser =
        std::path::Path::new("/usr/sbin/runuser").exists() || std::path::Path::new("/sbin/runuser").exists();
    if !as_root || !runuser {
        common::skip(
            "cli_without_kvm_access_says_what_to_do",
            "needs root and runuser to act as a user without /dev/kvm access",
        );
        return;
    }
    let rt = Runtime::new("nokvm");
    std::fs::set_permissions(&rt.dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let out = Command::new("runuser")
        .args(["-u", "nobody", "--", env!("CARGO_BIN_EXE_vmfork"), "run", "--detach", "--mem", "16M"])
        .env("XDG_RUNTIME_DIR", &rt.dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("Permission denied") && err.contains("target") {
        common::skip(
            "cli_without_kvm_access_says_what_to_do",
            &format!("nobody cannot execute the test binary: {err}"),
        );
        return;
    }
    assert!(!out.status.success());
    assert!(err.contains("/dev/kvm") && err.contains("kvm` group"), "{err}");
}

#[test]
fn bench_hooks_measure_start_pause_and_resume() {
    let Some(_vm_lock) = kvm_available("bench_hooks_measure_start_pause_and_resume") else {
        return;
    };
    for vcpus in [1, 2] {
        let (p, r) = vmfork::bench::vm::pause_resume(vcpus, 5).unwrap();
        assert_eq!((p.len(), r.len()), (5, 5));
        assert!(p.iter().all(|d| !d.is_zero()));
        eprintln!("{vcpus} vCPU(s): pause {p:?}, resume {r:?}");
    }
    let rt = Runtime::new("bench");
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_vmfork"));
    let starts = vmfork::bench::vm::vm_start(exe, 2, Some(&rt.dir)).unwrap();
    assert_eq!(starts.len(), 2);
    eprintln!("vm_start: {starts:?}");
    assert!(rt.ls().is_empty(), "bench VMs are stopped");
}

#[test]
fn ring0_entry_drops_to_ring3_and_runs_the_same_workload() {
    let Some(_vm_lock) = kvm_available("ring0_entry_drops_to_ring3_and_runs_the_same_workload") else {
        return;
    };
    let workload = Workload::Touch { mib: 4, random: false, every: 50_000 };
    let cfg = VmConfig { workload, ring0_entry: true, ..Default::default() };
    let vm = Vm::create(memory(16), &cfg).unwrap();
    let rx = vm.subscribe();
    let mut model = TouchModel::new(1024, false, 0);
    for _ in 0..5 {
        let r = next(&rx);
        assert_eq!(r.checksum, model.checksum_at(r.counter), "{r}");
    }
    vm.pause().unwrap();
    let state = vm.capture().unwrap();
    assert_eq!(state.vcpus[0].sregs.cs.dpl, 3, "the workload runs in ring 3");
    vm.stop();
}

#[test]
fn cli_vm_whose_stdout_closes_still_stops_on_sigterm() {
    let Some(_vm_lock) = kvm_available("cli_vm_whose_stdout_closes_still_stops_on_sigterm") else {
        return;
    };
    let rt = Runtime::new("epipe");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmfork"))
        .args(["run", "--name", "ep", "--mem", "16M", "--workload", "count:1000000"])
        .env("XDG_RUNTIME_DIR", &rt.dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert!(lines.any(|l| l.unwrap().starts_with("report ")));
    drop(lines); // the VM keeps printing into a closed pipe
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(rt.ls()[0]["state"], "running", "a closed stdout must not stop the VM");
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::SIGTERM).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "vmfork run ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    assert!(!rt.socket("ep").exists(), "socket removed");
}

#[test]
fn bench_vm_run_records_every_metric() {
    let Some(_vm_lock) = kvm_available("bench_vm_run_records_every_metric") else {
        return;
    };
    let mut records = Vec::new();
    vmfork::bench::vm::run(&mut records).unwrap();
    let find = |scenario: &str, metric: &str| {
        records
            .iter()
            .find(|r| {
                r.suite == vmfork::bench::Suite::Vm
                    && r.scenario.to_string() == scenario
                    && r.metric.to_string() == metric
            })
            .unwrap()
    };
    // This test binary is not vmfork, so the start measurement is skipped, with the reason.
    assert!(find("start", "vm_start_ns").note.as_deref().unwrap().contains("vmfork binary"));
    for scenario in ["1vcpu", "2vcpu"] {
        for metric in ["pause_ns", "resume_ns"] {
            let r = find(scenario, metric);
            assert!(r.value.unwrap() > 0.0 && r.unit == vmfork::bench::Unit::Ns, "{r:?}");
            eprintln!("{scenario} {metric}: {:.0} ns", r.value.unwrap());
        }
    }
}

/// Env var naming the socket the restore subprocess connects to.
const RESTORE_SOCK: &str = "VMFORK_TEST_RESTORE_SOCK";

#[test]
#[ignore = "runs only as the subprocess of capture_in_one_process_restore_in_another"]
fn restore_subprocess() {
    let Some(path) = std::env::var_os(RESTORE_SOCK) else {
        eprintln!("skipped: only meaningful as the subprocess of capture_in_one_process_restore_in_another");
        return;
    };
    let mut sock = UnixStream::connect(path).unwrap();
    let mut len = [0u8; 8];
    std::io::Read::read_exact(&mut sock, &mut len).unwrap();
    let mut json = vec![0u8; u64::from_le_bytes(len) as usize];
    std::io::Read::read_exact(&mut sock, &mut json).unwrap();
    let state = VmState::from_json(std::str::from_utf8(&json).unwrap()).unwrap();
    let memory = Arc::new(GuestMemory::receive(&sock).unwrap());
    let vm = Vm::restore(memory, &state).unwrap();
    let rx = vm.subscribe();
    vm.resume().unwrap();
    let mut seen = vec![0; state.config.vcpus as usize];
    while seen.iter().any(|&n| n < 5) {
        let r = next(&rx);
        seen[r.vcpu as usize] += 1;
        println!("REPORT {}", serde_json::to_string(&r).unwrap());
    }
    vm.stop();
}

#[test]
fn capture_in_one_process_restore_in_another() {
    let Some(_vm_lock) = kvm_available("capture_in_one_process_restore_in_another") else {
        return;
    };
    let (vcpus, every) = (2u32, 40_000);
    let workload = Workload::Touch { mib: 4, random: false, every };
    let vm = Vm::create(memory(16), &VmConfig { vcpus, workload, ..Default::default() }).unwrap();
    let rx = vm.subscribe();
    let mut seen = vec![0; vcpus as usize];
    while seen.iter().any(|&n| n < 2) {
        seen[next(&rx).vcpu as usize] += 1;
    }
    vm.pause().unwrap();
    let latest = vm.latest_reports();
    let json = vm.capture().unwrap().to_json().unwrap();
    let (child_memory, _) = vm.memory().clone_with(Strategy::Cow).unwrap();
    // The parent runs on while the child starts: their memories are independent.
    vm.resume().unwrap();

    let rt = Runtime::new("xproc");
    let path = rt.dir.join("restore.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "restore_subprocess", "--ignored", "--nocapture"])
        .env(RESTORE_SOCK, &path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (mut sock, _) = listener.accept().unwrap();
    sock.write_all(&(json.len() as u64).to_le_bytes()).unwrap();
    sock.write_all(json.as_bytes()).unwrap();
    child_memory.send(&sock).unwrap();
    drop(child_memory);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "restore subprocess failed");
    let reports: Vec<Report> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("REPORT "))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for v in 0..vcpus {
        assert!(reports.iter().filter(|r| r.vcpu == v).count() >= 5, "5 reports of vCPU {v}: {reports:?}");
    }
    let mut models: Vec<TouchModel> = (0..vcpus).map(|v| TouchModel::new(512, false, v as u64)).collect();
    let mut first = vec![true; vcpus as usize];
    for r in reports {
        let v = r.vcpu as usize;
        if std::mem::take(&mut first[v]) {
            let last = latest[v].unwrap();
            assert_eq!(r.counter, last.counter + every, "vCPU {v} continues exactly in the new process");
        }
        assert_eq!(r.checksum, models[v].checksum_at(r.counter), "restored in another process: {r}");
    }
    vm.stop();
}

/// A guest bigger than 3 GiB has RAM on both sides of the MMIO hole; the guest sees one
/// contiguous range, and its writes past 3 GiB land above 4 GiB guest-physical.
#[test]
fn guest_memory_spans_the_hole_above_3_gib() {
    let Some(_vm_lock) = kvm_available("guest_memory_spans_the_hole_above_3_gib") else {
        return;
    };
    let mib = 3 * 1024 + 8;
    let mem = memory(mib);
    assert_eq!(mem.regions().len(), 2, "RAM below and above the hole");
    // One report per pass over the whole area (everything past the first MiB).
    let pages = ((mib - 1) << 8) as u64;
    let cfg = VmConfig {
        workload: Workload::Touch { mib: mib as u64 - 1, random: false, every: pages },
        ..Default::default()
    };
    let vm = Vm::create(mem.clone(), &cfg).unwrap();
    let rx = vm.subscribe();
    next(&rx); // the first report, at start
    let pass = rx.recv_timeout(Duration::from_secs(120)).expect("no report after a full pass in 120 s");
    assert_eq!(pass.counter, pages);
    let mut model = TouchModel::new(pages as usize, false, 0);
    assert_eq!(pass.checksum, model.checksum_at(pass.counter), "the guest touched every page once");
    vm.stop();
    // The last page of the area is guest-virtual mib MiB - 4 KiB: past the hole.
    let last_va = (mib as u64) * (1 << 20) - 4096;
    let mut b = [0u8; 8];
    mem.read(guest::ram_gpa(last_va), &mut b).unwrap();
    // (The guest went on touching between its report and the stop: at least once.)
    assert!(u64::from_le_bytes(b) >= 1, "the last page, above 4 GiB guest-physical, was touched");
    mem.read(guest::HOLE_GPA - 4096, &mut b).unwrap();
    assert!(u64::from_le_bytes(b) >= 1, "the last page below the hole too");
}

/// `ShmemPmdMapped` and `Rss` of process `pid`, in KiB.
fn shmem_huge_and_rss_kb(pid: u64) -> (u64, u64) {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    let field = |name: &str| {
        rollup
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().strip_suffix("kB")?.trim().parse().ok())
            .unwrap_or(0)
    };
    (field("ShmemPmdMapped:"), field("Rss:"))
}

#[test]
fn guest_memory_gets_huge_pages_unless_told_and_says_when_the_host_gives_none() {
    let test = "guest_memory_gets_huge_pages_unless_told_and_says_when_the_host_gives_none";
    let Some(_vm_lock) = kvm_available(test) else {
        return;
    };
    let knob = std::fs::read_to_string(vmfork::memory::accounting::SHMEM_THP_KNOB).unwrap_or_default();
    let host_gives_huge = vmfork::memory::accounting::huge_pages_unavailable().is_none();
    let rt = Runtime::new("hugepages");
    for (name, extra) in [("huge", None), ("small", Some("--small-pages"))] {
        let mut args = vec!["run", "--detach", "--name", name, "--mem", "64M", "--workload", "touch:32"];
        args.extend(extra);
        let out = rt.vmfork(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        // The note is said exactly when huge pages were asked for and will not be given.
        let noted = stderr.contains("guest memory gets 4 KiB pages");
        assert_eq!(noted, extra.is_none() && !host_gives_huge, "{name}, shmem THP {knob:?}: {stderr}");
        // "NAME (pid N, log PATH)"
        let stdout = String::from_utf8_lossy(&out.stdout);
        let pid: u64 = stdout.split("(pid ").nth(1).and_then(|s| s.split(',').next()?.parse().ok()).unwrap();
        // Wait for the guest to have touched its 32 MiB.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let (huge, rss) = loop {
            let (huge, rss) = shmem_huge_and_rss_kb(pid);
            if rss >= 32 << 10 || std::time::Instant::now() > deadline {
                break (huge, rss);
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(rss >= 32 << 10, "{name}: the guest touched only {rss} KiB");
        if extra.is_some() || !host_gives_huge {
            assert_eq!(huge, 0, "{name}, shmem THP {knob:?}: {huge} KiB in huge pages");
        } else {
            // Huge pages were asked for and the kernel gave some: mapped by PMDs. (How
            // many depends on how fragmented the host's free memory is: a busy host gave
            // 20 of 32 MiB, an idle one all; a THP allocation falls back to 4 KiB pages.)
            assert!(huge >= 2 << 10, "{name}, shmem THP {knob:?}: none of {rss} KiB huge");
        }
        rt.ok(&["stop", name]);
    }
}

#[test]
fn a_triple_fault_leaves_the_vcpu_state_and_its_last_exits_in_the_console() {
    let Some(_vm_lock) =
        kvm_available("a_triple_fault_leaves_the_vcpu_state_and_its_last_exits_in_the_console")
    else {
        return;
    };
    let mem = memory(16);
    let cfg = VmConfig { workload: Workload::Count { every: 1 << 16 }, ..Default::default() };
    let vm = Vm::create(mem.clone(), &cfg).unwrap();
    let rx = vm.subscribe();
    next(&rx);
    // The guest has no IDT: an undefined opcode in its code is #UD, then #GP, then a
    // double fault it cannot deliver either: a triple fault.
    let ud2 = [0x0f, 0x0b].repeat(guest::GUEST_BIN.len() / 2);
    mem.write(guest::CODE_GPA, &ud2).unwrap();
    let reason = vm.wait_exit(Duration::from_secs(20)).expect("the guest did not die within 20 s");
    let ExitReason::Crash(why) = &reason else { panic!("the guest ended with {reason:?}") };
    assert!(why.contains("triple fault"), "{why}");
    let (console, _) = vm.console().subscribe();
    let crash: Vec<&String> = console.iter().filter(|l| l.starts_with("vmm: crash:")).collect();
    for l in &crash {
        eprintln!("{l}");
    }
    let has = |what: &str| crash.iter().any(|l| l.contains(what));
    for what in [
        "vCPU 0: rip=",
        "rax=",
        "cr3=",
        "cs=0x",
        "idt base=0x0 limit=0x0",
        "exception injected=",
        "exits, oldest first",
    ] {
        assert!(has(what), "no {what:?} in {crash:#?}");
    }
    // The trail ends with the shutdown itself, after the guest's reports (port writes).
    let trail: Vec<&&String> = crash.iter().filter(|l| l.contains(":   ")).collect();
    assert!(trail.last().is_some_and(|l| l.contains("shutdown")), "{crash:#?}");
    assert!(trail.iter().any(|l| l.contains("io-out") || l.contains("mmio-write")), "{crash:#?}");
}
