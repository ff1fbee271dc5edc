//! `vmfork fork` end to end on this host's KVM: real VM processes with the built-in
//! guest, forked with every strategy. Each test skips with a printed reason only where
//! /dev/kvm is absent.
//!
//! The guest runs the `touch` workload, whose reported checksum depends on every page it
//! wrote since boot and is deterministic: a child that really continued from the
//! parent's exact memory and registers reports, at every counter value, the checksum the
//! parent reports at that value. Both consoles (their logs) are compared.

use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::guest::{assert_progress, assert_same_guest, counter, genid};
use common::{Runtime, kvm_available};

/// What the fork tests ask of a runtime directory.
trait Fork {
    fn fork(&self, parent: &str, strategy: &str, extra: &[&str]) -> Vec<Value>;
}

impl Fork for Runtime {
    fn fork(&self, parent: &str, strategy: &str, extra: &[&str]) -> Vec<Value> {
        let mut args = vec!["fork", parent, "--strategy", strategy, "--json"];
        args.extend_from_slice(extra);
        serde_json::from_str(&self.ok(&args)).unwrap()
    }
}

fn strategies() -> Vec<&'static str> {
    let mut s = vec!["copy", "cow", "uffd", "uffd-minor", "auto"];
    match vmfork::memory::reflink::probe() {
        Ok(()) => s.push("reflink"),
        // The testbed's kernel has reflink: there, its absence is a failure, not a skip.
        Err(e) if std::env::var_os("VMFORK_REFLINK_REQUIRED").is_some() => {
            panic!("reflink is required here (VMFORK_REFLINK_REQUIRED) but {e}")
        }
        Err(e) => common::skip_part(
            "every_strategy_forks_a_running_vm_into_an_independent_one",
            "reflink",
            &format!("only checked to fail clearly here: {e}"),
        ),
    }
    s
}

#[test]
fn every_strategy_forks_a_running_vm_into_an_independent_one() {
    let Some(_lock) = kvm_available("every_strategy_forks_a_running_vm_into_an_independent_one") else {
        return;
    };
    let rt = Runtime::new("strategies");
    rt.run("p", &[]);
    let parent_genid = genid(&rt.report("p"));
    for strategy in strategies() {
        eprintln!("forking p with {strategy}");
        let before = counter(&rt.report("p"));
        let children = rt.fork("p", strategy, &[]);
        assert_eq!(children.len(), 1);
        let name = children[0]["name"].as_str().unwrap().to_string();
        let used = children[0]["strategy"].as_str().unwrap();
        if strategy != "auto" {
            assert_eq!(used, strategy);
        }
        // Every step of the fork is on one timeline, in order, and took time: the child's
        // steps (counted in its own process) come after the parent resumed.
        let t: vmfork::fork::Timings = serde_json::from_value(children[0]["timings"].clone()).unwrap();
        let phases = t.phases();
        for pair in phases.windows(2) {
            assert!(pair[0].1 <= pair[1].1, "{strategy}: {} after {}: {phases:?}", pair[0].0, pair[1].0);
        }
        assert!(t.child_started_ns > t.child_spawned_ns, "{strategy}: exec took no time: {phases:?}");
        assert!(t.child_first_report_ns.is_some_and(|f| f >= t.child_running_ns), "{strategy}: {t:?}");
        let status = rt.status(&name);
        assert_eq!(status["parent"], "p", "{strategy}");
        // The child continues the guest from the fork instant, with memory intact...
        assert_same_guest(&rt, "p", &name);
        let r = assert_progress(&rt, &name);
        assert!(counter(&r) >= before, "{strategy}: child restarted instead of continuing: {r}");
        // ...under a new identity, while the parent keeps its own and runs on.
        let child_genid = genid(&r);
        assert_ne!(child_genid, parent_genid, "{strategy}: child kept the parent's generation id");
        assert_ne!(child_genid, (0, 0), "{strategy}: child got no generation id");
        assert_eq!(genid(&rt.report("p")), parent_genid, "{strategy}: parent's generation id changed");
        assert_progress(&rt, "p");
        // Killing the child leaves the parent unharmed.
        let pid = status["pid"].as_i64().unwrap() as i32;
        // SAFETY: kill(2) on a pid we just read from the child's status.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        assert_progress(&rt, "p");
    }
    if vmfork::memory::reflink::probe().is_err() {
        let out = rt.vmfork(&["fork", "p", "--strategy", "reflink"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("cannot reflink"), "{err}");
        assert_progress(&rt, "p");
    }
}

#[test]
fn fan_out_of_eight_and_a_chain_of_four() {
    let Some(_lock) = kvm_available("fan_out_of_eight_and_a_chain_of_four") else {
        return;
    };
    let rt = Runtime::new("fanout");
    rt.run("p", &[]);
    let children = rt.fork("p", "cow", &["--count", "8"]);
    assert_eq!(children.len(), 8);
    let mut ids = vec![genid(&rt.report("p"))];
    for c in &children {
        let name = c["name"].as_str().unwrap();
        assert_same_guest(&rt, "p", name);
        ids.push(genid(&assert_progress(&rt, name)));
    }
    for c in &children {
        rt.ok(&["stop", c["name"].as_str().unwrap()]);
    }
    // A chain: each generation forks the next.
    let mut parent = "p".to_string();
    for generation in 1..=4 {
        let child = format!("gen{generation}");
        let made = rt.fork(&parent, "cow", &["--name", &child]);
        assert_eq!(made[0]["name"], child.as_str());
        assert_eq!(rt.status(&child)["parent"], parent.as_str());
        assert_same_guest(&rt, &parent, &child);
        ids.push(genid(&assert_progress(&rt, &child)));
        parent = child;
    }
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "every VM has its own generation id: {ids:?}");
}

#[test]
fn a_paused_vm_stays_paused_when_it_is_forked() {
    let Some(_lock) = kvm_available("a_paused_vm_stays_paused_when_it_is_forked") else {
        return;
    };
    let rt = Runtime::new("pausedfork");
    rt.run("p", &[]);
    rt.ok(&["pause", "p"]);
    for strategy in ["cow", "uffd"] {
        let children = rt.fork("p", strategy, &[]);
        assert_eq!(rt.status("p")["state"], "paused", "{strategy}: the fork resumed its paused parent");
        // The child runs on its own.
        assert_progress(&rt, children[0]["name"].as_str().unwrap());
    }
    rt.ok(&["resume", "p"]);
    assert_progress(&rt, "p");
}

#[test]
fn a_private_vm_is_never_forked() {
    let Some(_lock) = kvm_available("a_private_vm_is_never_forked") else {
        return;
    };
    let rt = Runtime::new("private");
    rt.run("secret", &["--private"]);
    let out = rt.vmfork(&["fork", "secret"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "fork of a private VM succeeded");
    assert!(err.contains("private") && err.contains("never forked"), "{err}");
    assert_eq!(rt.status("secret")["private"], true);
    assert_progress(&rt, "secret");
}

#[test]
fn a_uffd_child_whose_parent_dies_stops_with_a_clear_error() {
    let Some(_lock) = kvm_available("a_uffd_child_whose_parent_dies_stops_with_a_clear_error") else {
        return;
    };
    let rt = Runtime::new("uffd-dies");
    rt.run("p", &[]);
    rt.fork("p", "uffd", &["--name", "lazy"]);
    assert_progress(&rt, "lazy");
    let parent_pid = rt.status("p")["pid"].as_i64().unwrap() as i32;
    // SAFETY: kill(2) on the parent VM's pid, read from its status.
    assert_eq!(unsafe { libc::kill(parent_pid, libc::SIGKILL) }, 0);
    let killed = Instant::now();
    // The child says why in its log and takes its control socket down on the way out.
    let socket = rt.socket("lazy");
    while !rt.log("lazy").contains("page server") || socket.exists() {
        assert!(
            killed.elapsed() < Duration::from_secs(3),
            "child still running 3 s after its page server died"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let took = killed.elapsed();
    let log = rt.log("lazy");
    assert!(log.contains("died before all guest memory was served"), "{log}");
    eprintln!("uffd child stopped {took:?} after its parent died");
    assert!(took < Duration::from_secs(1), "took {took:?}");
}

/// Sends one request line to VM `name`'s control socket and returns the answer.
fn request(rt: &Runtime, name: &str, json: &str) -> Value {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::os::unix::net::UnixStream::connect(rt.socket(name)).unwrap();
    writeln!(s, "{json}").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}

/// Forks back to back, each child the moment its parent has answered (as `vmfork bench`
/// does): a fork then catches a child right after its first report. Every link must
/// still run: its first report arrives, and its parent reports again after the pause.
#[test]
fn a_fast_chain_of_idle_forks_keeps_every_link_running() {
    let Some(_lock) = kvm_available("a_fast_chain_of_idle_forks_keeps_every_link_running") else {
        return;
    };
    let rt = Runtime::new("fastchain");
    rt.ok(&["run", "--detach", "--name", "c0", "--mem", "256M", "--huge-pages", "--workload", "idle"]);
    for i in 1..=32 {
        let json = format!(r#"{{"cmd":"fork","strategy":"cow","name":"c{i}"}}"#);
        let answer = request(&rt, &format!("c{}", i - 1), &json);
        assert_eq!(answer["ok"], true, "fork {i}: {answer}");
        let child = &answer["children"][0];
        assert!(child["timings"]["child_first_report_ns"].is_u64(), "link {i} never reported: {answer}");
    }
}

/// The reports of `name` (vCPU 0) in its log: counter → (checksum, reseeds).
fn reseed_reports(rt: &Runtime, name: &str) -> std::collections::BTreeMap<u64, (String, u64)> {
    let field =
        |line: &str, key: &str| line.split_whitespace().find_map(|w| w.strip_prefix(key)).map(str::to_string);
    rt.log(name)
        .lines()
        .filter(|l| l.starts_with("report vcpu=0 "))
        .filter_map(|l| {
            let counter = field(l, "counter=")?.parse().ok()?;
            Some((counter, (field(l, "checksum=")?, field(l, "reseeds=")?.parse().ok()?)))
        })
        .collect()
}

/// A fork gives the child fresh entropy with its new generation id, and the built-in
/// guest reseeds from it (as Linux's vmgenid driver does): a parent and child that would
/// otherwise draw the same random page sequence forever go different ways.
#[test]
fn a_forked_child_reseeds_its_random_stream_from_fresh_entropy() {
    let Some(_lock) = kvm_available("a_forked_child_reseeds_its_random_stream_from_fresh_entropy") else {
        return;
    };
    let rt = Runtime::new("reseed");
    rt.ok(&["run", "--detach", "--name", "r", "--mem", "64M", "--workload", "touch:8:rand:20000"]);
    rt.wait_report("r");
    rt.fork("r", "cow", &["--name", "r1"]);
    let t = Instant::now();
    let (parent, child) = loop {
        let (p, c) = (reseed_reports(&rt, "r"), reseed_reports(&rt, "r1"));
        let after: Vec<u64> =
            c.iter().filter(|(k, v)| v.1 == 1 && p.contains_key(k)).map(|(k, _)| *k).collect();
        if after.len() >= 3 {
            break (p, c);
        }
        assert!(t.elapsed() < Duration::from_secs(20), "no common counters after the fork");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(parent.values().all(|v| v.1 == 0), "the parent never reseeds: its generation id is unchanged");
    let (&first, (first_sum, first_reseeds)) = child.iter().next().unwrap();
    assert_eq!(*first_reseeds, 1, "the child's first report already saw the new generation");
    // The guest looks at the generation id when it reports: up to the child's first
    // report it drew from the parent's stream (same checksum), from there on its own.
    assert_eq!(parent.get(&first), Some(&(first_sum.clone(), 0)), "the same guest until the reseed");
    for (k, (sum, reseeds)) in child.iter().skip(1).filter(|(k, _)| parent.contains_key(k)) {
        assert_eq!(*reseeds, 1);
        assert_ne!(parent[k].0, *sum, "at counter {k} the child still touches the parent's random pages");
    }
}

use common::control::fds;

/// A lazily filled child's page servers belong to the VM that serves it and go when the
/// child does: after a hundred `uffd` and `uffd-minor` children have come and gone, the
/// parent runs no page server and holds the fds it held before them.
#[test]
fn page_servers_go_with_their_children() {
    let Some(_lock) = kvm_available("page_servers_go_with_their_children") else {
        return;
    };
    let rt = Runtime::new("servers-go");
    rt.ok(&["run", "--detach", "--name", "p", "--mem", "8M", "--workload", "idle"]);
    let pid = rt.status("p")["pid"].as_i64().unwrap() as i32;
    let fork = |name: &str, strategy: &str| {
        let json = format!(r#"{{"cmd":"fork","strategy":"{strategy}","name":"{name}"}}"#);
        let answer = request(&rt, "p", &json);
        assert_eq!(answer["ok"], true, "fork {name}: {answer}");
    };
    let settle = |want_fds: Vec<String>| {
        let t = Instant::now();
        loop {
            let (servers, fds) = (rt.status("p")["page_servers"].as_u64().unwrap(), fds(pid));
            if servers == 0 && fds == want_fds {
                return;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "10 s after its children stopped, the parent runs {servers} page servers and \
                 holds {} fds, not {}: {fds:?}, before: {want_fds:?}",
                fds.len(),
                want_fds.len()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // Lazy children first, gone again: what a parent keeps for itself after its first
    // freezes (its memory's layers, the tracker of its writes) stays.
    for (name, strategy) in [("w0", "uffd"), ("w1", "uffd-minor"), ("w2", "uffd")] {
        fork(name, strategy);
        assert!(rt.status("p")["page_servers"].as_u64().unwrap() > 0);
        rt.ok(&["stop", name]);
    }
    let t = Instant::now();
    while rt.status("p")["page_servers"].as_u64().unwrap() > 0 {
        assert!(t.elapsed() < Duration::from_secs(10), "the first children's page servers stayed");
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = fds(pid);
    let names: Vec<String> = (0..100).map(|i| format!("c{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        fork(name, if i % 2 == 0 { "uffd" } else { "uffd-minor" });
    }
    assert!(rt.status("p")["page_servers"].as_u64().unwrap() >= 100);
    for name in &names {
        rt.ok(&["stop", name]);
    }
    settle(before);
}

/// The fork's two halves within one process (`fork::freeze`, then
/// `Frozen::restore_here`: what the bench's child workloads use): the child continues the
/// parent's guest under a new generation id, a lazy child's pages come from page servers
/// in this process, and the parent keeps running.
#[test]
fn a_child_restored_in_process_continues_the_parent_under_a_new_identity() {
    use std::sync::Arc;
    use vmfork::memory::{MemoryOptions, Strategy};
    use vmfork::vmm::{Vm, VmConfig, guest};

    let Some(_lock) = kvm_available("a_child_restored_in_process_continues_the_parent_under_a_new_identity")
    else {
        return;
    };
    let wait = Duration::from_secs(20);
    for strategy in [Strategy::Copy, Strategy::Cow, Strategy::Uffd, Strategy::UffdMinor] {
        let memory = Arc::new(guest::memory(16 << 20, &MemoryOptions::default()).unwrap());
        let parent = Vm::create(memory, &VmConfig::default()).unwrap();
        let reports = parent.subscribe();
        let seen = reports.recv_timeout(wait).expect("the parent's guest reports");
        let frozen = vmfork::fork::freeze(&parent, strategy).unwrap();
        let t = &frozen.timings;
        assert_eq!(frozen.strategy, strategy);
        assert!(t.paused_ns <= t.captured_ns && t.captured_ns <= t.cloned_ns, "{strategy}: {t:?}");
        assert!(t.cloned_ns <= t.parent_resumed_ns, "{strategy}: {t:?}");
        let child = frozen.restore_here().unwrap();
        assert!(child.timings.child_restored_ns >= child.timings.parent_resumed_ns, "{strategy}");
        let child_reports = child.vm.subscribe();
        child.vm.resume().unwrap();
        let first = child_reports.recv_timeout(wait).unwrap_or_else(|_| panic!("{strategy}: child silent"));
        assert!(first.counter >= seen.counter, "{strategy}: the child restarted: {first:?} after {seen:?}");
        assert_ne!(first.genid, seen.genid, "{strategy}: the child kept the parent's generation id");
        assert_ne!(first.genid, [0, 0], "{strategy}: the child got no generation id");
        let later = child_reports.recv_timeout(wait).unwrap_or_else(|_| panic!("{strategy}: child stalled"));
        assert!(later.counter > first.counter, "{strategy}: the child does not progress");
        drop(child);
        // The parent runs on, under its own identity.
        while reports.try_recv().is_ok() {}
        let after = reports.recv_timeout(wait).unwrap_or_else(|_| panic!("{strategy}: parent stalled"));
        assert!(after.counter > seen.counter && after.genid == seen.genid, "{strategy}: {after:?}");
        parent.stop();
    }
}
