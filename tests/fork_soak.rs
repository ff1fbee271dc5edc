//! A fork soak with faults injected from outside the fork protocol, against one running
//! parent per strategy (the real `vmfork` binary on this host's KVM): children killed at
//! random points of their handoff, the parent paused and resumed mid-fork, two forks in
//! flight at once, clients that hang up mid-request, lazily filled children killed
//! while they fault, children born into a memory cgroup that is then capped just above
//! its use. After every step the parent must answer and its guest run on; at
//! the end it must hold what it held before (fds, threads, mappings, page servers), have
//! no child process, and the host's shared memory must be back where it was.
//!
//! `VMFORK_SOAK_FORKS` forks per strategy (default 20, under 2 minutes here; the full run
//! is 250 per strategy, 1000 in all); `VMFORK_SOAK_SEED` replays an interleaving (the
//! seed is printed first). Skips with a printed reason only where /dev/kvm is absent.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::cgroup::Cgroup;
use common::control::{
    self, Rng, children, connect, count_entries, maps, request, shmem_kib, sockets, status, wait_counter_past,
};
use common::guest::WORKLOAD;
use common::{Runtime, kvm_available};

const TEST: &str = "forks_survive_injected_faults_and_leak_nothing";

/// The faults, one per soak step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    /// A fork and nothing else (the child is then stopped).
    None,
    /// SIGKILL of the child 0–50 ms after the fork request.
    KillChild,
    /// `pause` then `resume` of the parent from another connection, mid-fork.
    PauseResume,
    /// Two forks in flight, on two connections.
    TwoForks,
    /// The client hangs up 0–50 ms after sending the fork request.
    HangUp,
    /// A lazily filled child killed 0–20 ms after it started, while it faults.
    KillFaulting,
    /// The child is born into a memory cgroup of the test's own (the parent is moved in,
    /// unlimited, for the request, and back out as soon as the child exists), which is
    /// then capped 0–4 MiB above what it holds: the child's memory steps run out of
    /// memory. The parent is never in the cgroup while it has a limit.
    MemoryCap,
}

const FAULTS: [Fault; 7] = [
    Fault::None,
    Fault::KillChild,
    Fault::PauseResume,
    Fault::TwoForks,
    Fault::HangUp,
    Fault::KillFaulting,
    Fault::MemoryCap,
];

/// What the soak did, for the figures it prints.
#[derive(Default)]
struct Figures {
    forks: u64,
    faults: BTreeMap<String, u64>,
    /// Where a kill landed: the fork's answer (an error says which step failed).
    kills: BTreeMap<String, u64>,
    /// What a memory cap did: the fork's answer, and whether the OOM killer acted.
    capped: BTreeMap<String, u64>,
    /// The kernel's count of charges that hit the cap, and of its OOM kills, over the soak.
    cap_hits: u64,
    oom_kills: u64,
    stale_sockets: usize,
}

fn fork_line(strategy: &str, child: &str) -> String {
    format!(r#"{{"cmd":"fork","strategy":"{strategy}","name":"{child}"}}"#)
}

/// Sends a fork request on its own connection in a thread; the thread returns the answer.
fn fork_async(rt: &Runtime, parent: &str, strategy: &str, child: &str) -> std::thread::JoinHandle<Value> {
    let mut s = connect(rt, parent);
    writeln!(s, "{}", fork_line(strategy, child)).unwrap();
    let what = format!("fork of {parent} into {child} with {strategy}");
    std::thread::spawn(move || {
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap_or_else(|e| panic!("{what}: no answer: {e}"));
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{what}: {e}: {line:?}"))
    })
}

/// Waits for a child of `pid` not in `known`, up to `wait`.
fn new_child(pid: i32, known: &[i32], wait: Duration) -> Option<i32> {
    let t = Instant::now();
    loop {
        if let Some(c) = children(pid).into_iter().find(|c| !known.contains(c)) {
            return Some(c);
        }
        if t.elapsed() > wait {
            return None;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn sigkill(pid: i32) {
    // SAFETY: kill(2) on a pid read from /proc as the parent's child (or its status);
    // the parent reaps it, so the pid is not reused while the parent has not.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

/// Stops VM `name` if it runs (it may have been killed, or never started).
fn stop_if_running(rt: &Runtime, name: &str) {
    if let Ok(mut s) = std::os::unix::net::UnixStream::connect(rt.socket(name)) {
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = writeln!(s, r#"{{"cmd":"stop"}}"#);
        let _ = BufReader::new(s).read_line(&mut String::new());
    }
}

/// The step a fork answer says a kill hit.
fn landed(answer: &Value) -> String {
    if answer["ok"] == true {
        return "after the child was ready".into();
    }
    let e = answer["error"].as_str().unwrap_or("?");
    // "the child process was killed by signal 9 (...) before it was ready (lost contact
    // with the child: Connection reset by peer (os error 104)); its log: ..." → how it
    // ended, and the part of how the parent noticed before the OS detail.
    let (ended, e) = match e.split_once(" before it was ready (") {
        Some((how, then)) => {
            let how = if how.contains("signal 9") {
                "SIGKILL"
            } else {
                how.trim_start_matches("the child process ")
            };
            (format!("{how}: "), then.rsplit_once("); its log").map_or(then, |(t, _)| t))
        }
        None => (String::new(), e),
    };
    let noticed: String = e.split(" (os error").next().unwrap_or(e).chars().take(90).collect();
    format!("{ended}{noticed}")
}

/// A fork that must succeed and leave a child that continues the parent's guest.
fn assert_forked(rt: &Runtime, parent: &str, child: &str, answer: &Value, what: &str) {
    assert_eq!(answer["ok"], true, "{what}: {answer}");
    assert_eq!(answer["children"][0]["name"], child, "{what}: {answer}");
    same_guest(rt, parent, child, what);
}

/// `child` continues `parent`'s guest exactly: their checksums agree at every counter
/// both reported, and there are three such counters within 30 s (the host may be busy).
fn same_guest(rt: &Runtime, parent: &str, child: &str, what: &str) {
    let t = Instant::now();
    loop {
        let (p, c) = (rt.reports(parent), rt.reports(child));
        let common: Vec<u64> = c.keys().filter(|k| p.contains_key(k)).copied().collect();
        for k in &common {
            assert_eq!(p[k], c[k], "{what}: {child} diverged from {parent} at counter {k}");
        }
        if common.len() >= 3 {
            return;
        }
        if t.elapsed() > Duration::from_secs(30) {
            let state = std::os::unix::net::UnixStream::connect(rt.socket(child)).map_or_else(
                |e| format!("unreachable: {e}"),
                |_| status(rt, child)["state_detail"].to_string(),
            );
            panic!(
                "{what}: {parent} and {child} reported no {} common counters in 30 s; the child is {state}; \
                 last counters: parent {:?}, child {:?}; the end of the child's log:\n{}",
                3 - common.len(),
                p.keys().rev().take(3).collect::<Vec<_>>(),
                c.keys().rev().take(3).collect::<Vec<_>>(),
                common::tail(&rt.log(child), 15)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A parent under soak: its name and pid, the strategy it forks with, and the memory
/// cgroup its children may be born into.
struct Parent<'a> {
    rt: &'a Runtime,
    name: &'a str,
    pid: i32,
    strategy: &'a str,
    cgroup: Option<&'a Cgroup>,
}

/// One soak step: `fault` injected into a fork of the parent.
fn step(p: &Parent, i: usize, fault: Fault, rng: &mut Rng, f: &mut Figures) {
    let (rt, parent, pid, strategy) = (p.rt, p.name, p.pid, p.strategy);
    let child = format!("{parent}-{i}");
    let what = format!("{strategy} step {i} ({fault:?})");
    let known = children(pid);
    match fault {
        Fault::None => {
            let v = request(rt, parent, &fork_line(strategy, &child));
            assert_forked(rt, parent, &child, &v, &what);
            f.forks += 1;
        }
        Fault::KillChild => {
            let delay = Duration::from_millis(rng.below(51));
            let t = Instant::now();
            let answer = fork_async(rt, parent, strategy, &child);
            std::thread::sleep(delay.saturating_sub(t.elapsed()));
            let victim = new_child(pid, &known, Duration::from_secs(20));
            if let Some(v) = victim {
                sigkill(v);
            }
            let v = answer.join().unwrap();
            assert!(victim.is_some() || v["ok"] == false, "{what}: no child appeared, yet: {v}");
            // However the parent noticed, the answer says that the child was killed.
            assert!(
                v["ok"] == true || v["error"].as_str().is_some_and(|e| e.contains("killed by signal 9")),
                "{what}: the answer does not say that the child was killed: {v}"
            );
            *f.kills.entry(landed(&v)).or_default() += 1;
            f.forks += 1;
        }
        Fault::PauseResume => {
            let answer = fork_async(rt, parent, strategy, &child);
            std::thread::sleep(Duration::from_millis(rng.below(51)));
            let p = request(rt, parent, r#"{"cmd":"pause"}"#);
            assert_eq!(p["ok"], true, "{what}: pause: {p}");
            std::thread::sleep(Duration::from_millis(rng.below(21)));
            let r = request(rt, parent, r#"{"cmd":"resume"}"#);
            assert_eq!(r["ok"], true, "{what}: resume: {r}");
            let v = answer.join().unwrap();
            assert_forked(rt, parent, &child, &v, &what);
            f.forks += 1;
        }
        Fault::TwoForks => {
            let second = format!("{child}b");
            let a = fork_async(rt, parent, strategy, &child);
            std::thread::sleep(Duration::from_millis(rng.below(11)));
            let b = fork_async(rt, parent, strategy, &second);
            let (a, b) = (a.join().unwrap(), b.join().unwrap());
            assert_forked(rt, parent, &child, &a, &what);
            assert_forked(rt, parent, &second, &b, &what);
            stop_if_running(rt, &second);
            f.forks += 2;
        }
        Fault::HangUp => {
            let mut s = connect(rt, parent);
            writeln!(s, "{}", fork_line(strategy, &child)).unwrap();
            std::thread::sleep(Duration::from_millis(rng.below(51)));
            drop(s);
            // Nobody hears the answer, but the fork goes on: the child comes up.
            let t = Instant::now();
            while !rt.socket(&child).exists() {
                assert!(t.elapsed() < Duration::from_secs(30), "{what}: the child never came up");
                std::thread::sleep(Duration::from_millis(10));
            }
            wait_counter_past(rt, &child, 0, &what);
            f.forks += 1;
        }
        Fault::KillFaulting => {
            let v = request(rt, parent, &fork_line(strategy, &child));
            assert_eq!(v["ok"], true, "{what}: {v}");
            std::thread::sleep(Duration::from_millis(rng.below(21)));
            sigkill(v["children"][0]["pid"].as_i64().unwrap() as i32);
            f.forks += 1;
        }
        Fault::MemoryCap => {
            let cg = p.cgroup.expect("a memory cap needs the cgroup");
            let above = rng.below((4 << 20) + 1);
            let (hits, kills) = (cg.limit_hits(), cg.oom_kills());
            cg.set_limit(None).unwrap();
            cg.add(pid).unwrap();
            let answer = fork_async(rt, parent, strategy, &child);
            let born = new_child(pid, &known, Duration::from_secs(20));
            // Out before any cap: the parent's own memory is never at stake.
            // A thread of the parent that was exiting as it moved (the freeze's short-lived
            // helpers: a spare patch file's allocator, a fold) is not migrated and keeps the
            // parent listed until it is gone: move again until none is left, briefly.
            let t = Instant::now();
            loop {
                cg.send_home(pid).unwrap();
                if !cg.procs().contains(&pid) {
                    break;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(1),
                    "{what}: the parent is still in the capped cgroup"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            let cap = cg.limit_above_usage(above).unwrap();
            let v = answer.join().unwrap();
            cg.set_limit(None).unwrap();
            let (hits, kills) = (cg.limit_hits() - hits, cg.oom_kills() - kills);
            f.cap_hits += hits;
            f.oom_kills += kills;
            assert!(born.is_some() || v["ok"] == false, "{what}: no child appeared, yet: {v}");
            // A child that got through runs on under the cap until it is stopped below
            // (or killed by the OOM killer first); one that did not, the answer says why.
            if v["ok"] == false {
                let e = v["error"].as_str().unwrap_or("");
                assert!(
                    e.contains("killed by signal 9") || e.contains("Cannot allocate memory"),
                    "{what}: capped {above} bytes above use ({cap} bytes), the fork failed without saying \
                     it ran out of memory: {v}"
                );
            }
            let oom = if kills > 0 { "; OOM kill" } else { "" };
            *f.capped.entry(format!("{}{oom}", landed(&v))).or_default() += 1;
            f.forks += 1;
        }
    }
    *f.faults.entry(format!("{fault:?}")).or_default() += 1;
    stop_if_running(rt, &child);
    // The parent answers and its guest runs on.
    let c = control::counter(&status(rt, parent)).unwrap_or(0);
    wait_counter_past(rt, parent, c, &what);
}

/// `vmfork` processes on the host while none of this test's runs (so: of others).
fn other_vm_processes() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "vmfork"))
        .collect()
}

/// What a parent holds that must not grow with forks.
#[derive(Debug)]
struct Held {
    fds: Vec<String>,
    threads: usize,
    /// Mappings, but for glibc's thread stacks and malloc arenas (see [`control::Maps`]).
    maps: usize,
    /// What they are, for a message (where each memory layer sits changes as layers fold).
    map_lines: Vec<String>,
    /// Thread stacks live or cached, their bytes, and malloc arenas: checked against
    /// glibc's bounds, not against the start.
    stacks: (usize, u64),
    arenas: usize,
    page_servers: u64,
    children: Vec<i32>,
}

impl PartialEq for Held {
    fn eq(&self, o: &Held) -> bool {
        (&self.fds, self.threads, self.maps, self.page_servers, &self.children)
            == (&o.fds, o.threads, o.maps, o.page_servers, &o.children)
    }
}

/// What the parent holds, read from /proc before its status is asked (a status request
/// has a thread and two fds of its own while it is answered).
fn held(rt: &Runtime, parent: &str, pid: i32) -> Held {
    let (fds, threads, m, children) =
        (control::fds(pid), count_entries(pid, "task"), maps(pid), children(pid));
    let page_servers = status(rt, parent)["page_servers"].as_u64().unwrap();
    Held {
        fds,
        threads,
        maps: m.other.len(),
        map_lines: m.other,
        stacks: (m.stacks, m.stack_bytes),
        arenas: m.arenas,
        page_servers,
        children,
    }
}

/// Waits (10 s at most) until the parent is idle and holds the same in two readings
/// 100 ms apart (the thread of the last status request has gone), and, with `want`,
/// what it held then; returns what it holds.
fn settle(rt: &Runtime, parent: &str, pid: i32, want: Option<&Held>) -> Held {
    let t = Instant::now();
    let mut last = held(rt, parent, pid);
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = held(rt, parent, pid);
        let idle = now.children.is_empty() && now.page_servers == 0;
        if (idle && now == last && want.is_none_or(|w| *w == now)) || t.elapsed() > Duration::from_secs(10) {
            return now;
        }
        last = now;
    }
}

/// Soaks one parent forking with `strategy`; returns the leaks found.
fn soak(
    rt: &Runtime,
    strategy: &str,
    forks: usize,
    (rng, cgroup): (&mut Rng, Option<&Cgroup>),
    f: &mut Figures,
    pids: &mut Vec<i32>,
) -> Vec<String> {
    let parent = format!("p-{}", strategy.replace('-', ""));
    rt.ok(&["run", "--detach", "--name", &parent, "--mem", "32M", "--workload", WORKLOAD]);
    rt.wait_report(&parent);
    let pid = status(rt, &parent)["pid"].as_i64().unwrap() as i32;
    pids.push(pid);
    // What a parent keeps after its first freezes (its memory's layers, the tracker of
    // its writes, set up at the second) is part of what it holds from then on.
    for k in 0..2 {
        let warm = format!("{parent}-warm{k}");
        let v = request(rt, &parent, &fork_line(strategy, &warm));
        assert_eq!(v["ok"], true, "warm-up fork: {v}");
        stop_if_running(rt, &warm);
    }
    let before = settle(rt, &parent, pid, None);
    let lazy = strategy.starts_with("uffd");
    let (mut i, mut done) = (0, 0);
    while done < forks {
        let fault = FAULTS[rng.below(FAULTS.len() as u64) as usize];
        let fault = match fault {
            Fault::KillFaulting if !lazy => Fault::KillChild,
            Fault::MemoryCap if cgroup.is_none() => Fault::None,
            fault => fault,
        };
        step(&Parent { rt, name: &parent, pid, strategy, cgroup }, i, fault, rng, f);
        done += if fault == Fault::TwoForks { 2 } else { 1 };
        i += 1;
    }
    let after = settle(rt, &parent, pid, Some(&before));
    let mut leaks = Vec::new();
    if after != before {
        let gone: Vec<&String> = before.map_lines.iter().filter(|l| !after.map_lines.contains(l)).collect();
        let new: Vec<&String> = after.map_lines.iter().filter(|l| !before.map_lines.contains(l)).collect();
        leaks.push(format!(
            "{strategy}: the parent held {before:?} before and {after:?} after; mappings gone {gone:#?}, \
             new {new:#?}"
        ));
    }
    // glibc's own: a stack per live thread plus at most 40 MiB cached (20 of the 2 MiB
    // Rust gives a thread), and at most 8 arenas (2 mappings each) per core.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if after.stacks.0 > after.threads + 20 || after.arenas > 2 * 8 * cores {
        leaks.push(format!(
            "{strategy}: {} thread stacks ({} bytes) for {} threads, {} arena mappings: past glibc's bounds",
            after.stacks.0, after.stacks.1, after.threads, after.arenas
        ));
    }
    // Killed children leave their sockets behind; `ls` removes those as stale.
    let left: Vec<String> = sockets(rt).into_iter().filter(|s| *s != format!("{parent}.sock")).collect();
    f.stale_sockets += left.len();
    let _ = rt.vmfork(&["ls"]);
    let left: Vec<String> = sockets(rt).into_iter().filter(|s| *s != format!("{parent}.sock")).collect();
    if !left.is_empty() {
        leaks.push(format!("{strategy}: live sockets of children left: {left:?}"));
    }
    eprintln!(
        "{strategy}: {done} forks in {i} steps; parent before/after: {}/{} fds, {}/{} threads, \
         {}/{} mappings (and thread stacks {}/{}, malloc arena mappings {}/{}), {}/{} page servers",
        before.fds.len(),
        after.fds.len(),
        before.threads,
        after.threads,
        before.maps,
        after.maps,
        before.stacks.0,
        after.stacks.0,
        before.arenas,
        after.arenas,
        before.page_servers,
        after.page_servers,
    );
    rt.ok(&["stop", &parent]);
    if rt.socket(&parent).exists() {
        leaks.push(format!("{strategy}: the stopped parent left its socket"));
    }
    leaks
}

#[test]
fn forks_survive_injected_faults_and_leak_nothing() {
    let Some(_lock) = kvm_available(TEST) else { return };
    let forks: usize =
        std::env::var("VMFORK_SOAK_FORKS").map_or(20, |v| v.parse().expect("VMFORK_SOAK_FORKS"));
    let seed: u64 = std::env::var("VMFORK_SOAK_SEED").map_or_else(
        |_| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64,
        |v| v.parse().expect("VMFORK_SOAK_SEED"),
    );
    eprintln!("soak seed {seed} (replay with VMFORK_SOAK_SEED={seed}), {forks} forks per strategy");
    let cgroup = Cgroup::new("memory", "vmfork-soak")
        .map_err(|why| {
            common::skip_part(TEST, "children out of memory", &format!("needs a memory cgroup: {why}"))
        })
        .ok();
    if let Some(cg) = &cgroup {
        eprintln!("memory caps in {} (cgroup {:?})", cg.dir.display(), cg.version);
    }
    let mut rng = Rng(seed);
    let rt = Runtime::new("soak");
    let shmem_before = shmem_kib();
    let started = Instant::now();
    let mut f = Figures::default();
    let mut leaks = Vec::new();
    let mut pids = Vec::new();
    // VM processes of others (other test runs on the host): their memory is in the
    // host's Shmem too. Looked for whenever none of the soak's own runs.
    let mut others = other_vm_processes();
    for strategy in ["copy", "cow", "uffd", "uffd-minor"] {
        leaks.extend(soak(&rt, strategy, forks, (&mut rng, cgroup.as_ref()), &mut f, &mut pids));
        // Every VM process of this parent has exited.
        let t = Instant::now();
        while let Some(p) = pids.iter().find(|p| std::path::Path::new(&format!("/proc/{p}")).exists()) {
            assert!(t.elapsed() < Duration::from_secs(10), "parent {p} still runs 10 s after its stop");
            std::thread::sleep(Duration::from_millis(20));
        }
        others.extend(other_vm_processes());
    }
    // The shared memory they held is free again (give the kernel a moment; what other
    // processes on the host do counts too).
    let slack = (shmem_before / 100).max(4 << 10);
    let t = Instant::now();
    let mut shmem_after = shmem_kib();
    while shmem_after.abs_diff(shmem_before) > slack && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
        shmem_after = shmem_kib();
    }
    others.extend(other_vm_processes());
    others.sort();
    others.dedup();
    if shmem_after > shmem_before + slack && others.is_empty() {
        leaks.push(format!("host Shmem {shmem_before} kB before, {shmem_after} kB after (slack {slack} kB)"));
    } else if shmem_after.abs_diff(shmem_before) > slack {
        common::skip_part(
            TEST,
            "host Shmem back to its start",
            &format!(
                "Shmem went from {shmem_before} to {shmem_after} kB while {} VM processes of others ran \
                 (pids {others:?}): not this test's to account for",
                others.len()
            ),
        );
    }
    // Every process of the soak has exited: what is still charged to the cgroup is page
    // cache (reclaimable), not guest memory.
    let cg_left = cgroup.as_ref().map(|cg| cg.usage() >> 10);
    eprintln!(
        "soak seed {seed}: {} forks in {:.1?}; faults {:?}; kills landed {:?}; memory caps {:?} \
         ({} charges hit a cap, {} OOM kills, {cg_left:?} KiB left charged); {} stale child sockets \
         removed by ls; Shmem {shmem_before} -> {shmem_after} kB; leaks found = {}",
        f.forks,
        started.elapsed(),
        f.faults,
        f.kills,
        f.capped,
        f.cap_hits,
        f.oom_kills,
        f.stale_sockets,
        leaks.len()
    );
    assert!(leaks.is_empty(), "leaks: {leaks:#?}");
}

/// The VM's pause is one flag, not a count: two forks in flight on one parent, or a
/// `resume` sent while a fork has the parent paused, once let the guest run while a fork
/// captured and cloned it (or made the second fork's pause fail). The control socket now
/// runs them one at a time: every child is exact.
#[test]
fn forks_in_flight_together_and_a_resume_mid_fork_leave_exact_children() {
    const TEST: &str = "forks_in_flight_together_and_a_resume_mid_fork_leave_exact_children";
    let Some(_lock) = kvm_available(TEST) else { return };
    let rt = Runtime::new("in-flight");
    rt.run("p", &[]);
    for round in 0..3 {
        // `copy` takes longest to clone: the widest window.
        let (a, b) = (format!("a{round}"), format!("b{round}"));
        let fa = fork_async(&rt, "p", "copy", &a);
        let fb = fork_async(&rt, "p", "copy", &b);
        let (va, vb) = (fa.join().unwrap(), fb.join().unwrap());
        assert_forked(&rt, "p", &a, &va, &format!("round {round}, first of two in flight"));
        assert_forked(&rt, "p", &b, &vb, &format!("round {round}, second of two in flight"));
        let c = format!("c{round}");
        let fc = fork_async(&rt, "p", "copy", &c);
        let mut resumes = 0;
        while !fc.is_finished() {
            assert_eq!(request(&rt, "p", r#"{"cmd":"resume"}"#)["ok"], true);
            resumes += 1;
        }
        assert_forked(
            &rt,
            "p",
            &c,
            &fc.join().unwrap(),
            &format!("round {round}, {resumes} resumes mid-fork"),
        );
        for name in [a, b, c] {
            stop_if_running(&rt, &name);
        }
    }
    assert_eq!(status(&rt, "p")["state"], "running");
}
