//! Helpers for tests of VMs that run the built-in guest's `touch` workload, whose
//! reported checksum depends on every page it wrote since boot and is deterministic: a
//! VM that really continued another's exact memory and registers reports, at every
//! counter value, the checksum the other reports at that value.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::{Runtime, tail};

pub const WORKLOAD: &str = "touch:4:seq:20000";

/// What the tests of VMs running the built-in guest ask of a runtime directory.
impl Runtime {
    pub fn run(&self, name: &str, extra: &[&str]) {
        let mut args = vec!["run", "--name", name, "--mem", "64M", "--workload", WORKLOAD, "--detach"];
        args.extend_from_slice(extra);
        self.ok(&args);
        self.wait_report(name);
    }

    /// `name`'s entry in `vmfork ls`; a VM that has gone fails the test with the end of
    /// its log, which says why it stopped.
    pub fn status(&self, name: &str) -> Value {
        self.ls()
            .into_iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("{name} not in ls; the end of its log:\n{}", tail(&self.log(name), 30)))
    }

    /// The latest report of vCPU 0, waiting for one.
    pub fn report(&self, name: &str) -> Value {
        self.wait_report(name);
        self.status(name)["reports"][0].clone()
    }

    pub fn wait_report(&self, name: &str) {
        let t = Instant::now();
        while self.status(name)["reports"][0].is_null() {
            assert!(t.elapsed() < Duration::from_secs(20), "{name} sent no report");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join("vmfork").join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Counter → checksum of every report of vCPU 0 in a VM's console log.
    pub fn reports(&self, name: &str) -> std::collections::BTreeMap<u64, String> {
        let field = |line: &str, key: &str| {
            line.split_whitespace().find_map(|w| w.strip_prefix(key)).map(str::to_string)
        };
        self.log(name)
            .lines()
            .filter(|l| l.starts_with("report vcpu=0 ") && l.contains(" genid="))
            .filter_map(|l| Some((field(l, "counter=")?.parse().ok()?, field(l, "checksum=")?)))
            .collect()
    }
}

pub fn genid(report: &Value) -> (u64, u64) {
    (report["genid"][0].as_u64().unwrap(), report["genid"][1].as_u64().unwrap())
}

pub fn counter(report: &Value) -> u64 {
    report["counter"].as_u64().unwrap()
}

/// The VM's counter moves on; returns its latest report.
pub fn assert_progress(rt: &Runtime, name: &str) -> Value {
    let first = counter(&rt.report(name));
    let t = Instant::now();
    loop {
        let r = rt.report(name);
        if counter(&r) > first {
            return r;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{name} stopped making progress");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `child` runs the very guest `parent` ran: at every counter both reported after the
/// fork, their checksums (over every page the guest wrote since boot) agree.
pub fn assert_same_guest(rt: &Runtime, parent: &str, child: &str) {
    let t = Instant::now();
    loop {
        let (p, c) = (rt.reports(parent), rt.reports(child));
        let common: Vec<u64> = c.keys().filter(|k| p.contains_key(k)).copied().collect();
        for k in &common {
            assert_eq!(
                p[k], c[k],
                "{child} diverged from {parent} at counter {k}: memory or state was not cloned exactly"
            );
        }
        if common.len() >= 3 {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{parent} and {child} reported no common counters");
        std::thread::sleep(Duration::from_millis(50));
    }
}
