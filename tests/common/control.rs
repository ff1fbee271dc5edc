//! Talking to a VM's control socket directly (no `vmfork` process per request), and what
//! a VM process holds as the kernel counts it: for the load, malformed-input and soak
//! tests, which send many requests and look for leaks.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::Runtime;

/// How long any one answer may take before the test calls it a hang. A fork answers
/// once its child's guest runs; on two shared cores under load that takes seconds.
pub const ANSWER_WAIT: Duration = Duration::from_secs(60);

/// Connects to VM `name`, with read and write timeouts of [`ANSWER_WAIT`].
pub fn connect(rt: &Runtime, name: &str) -> UnixStream {
    let s = UnixStream::connect(rt.socket(name))
        .unwrap_or_else(|e| panic!("cannot connect to {name}'s control socket: {e}"));
    s.set_read_timeout(Some(ANSWER_WAIT)).unwrap();
    s.set_write_timeout(Some(ANSWER_WAIT)).unwrap();
    s
}

/// Sends one request line to VM `name` and returns the answer, which must be JSON.
pub fn request(rt: &Runtime, name: &str, json: &str) -> Value {
    let mut s = connect(rt, name);
    writeln!(s, "{json}").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap_or_else(|e| panic!("{json} to {name}: no answer: {e}"));
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{json} to {name}: {e}: {line:?}"))
}

/// `status` of VM `name` over its socket; it must succeed.
pub fn status(rt: &Runtime, name: &str) -> Value {
    let v = request(rt, name, r#"{"cmd":"status"}"#);
    assert_eq!(v["ok"], true, "status of {name}: {v}");
    v["status"].clone()
}

/// The guest counter of vCPU 0 in a status, if it has reported.
pub fn counter(status: &Value) -> Option<u64> {
    status["reports"][0]["counter"].as_u64()
}

/// Waits until VM `name`'s guest counter passes `after` (a running guest); returns it.
pub fn wait_counter_past(rt: &Runtime, name: &str, after: u64, why: &str) -> u64 {
    let t = Instant::now();
    loop {
        let s = status(rt, name);
        if let Some(c) = counter(&s).filter(|&c| c > after) {
            return c;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{why}: {name}'s guest counter stayed at {after} for 20 s (state {})",
            s["state"]
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The direct children of process `pid` (from every task's `children`).
pub fn children(pid: i32) -> Vec<i32> {
    let mut v: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| s.split_whitespace().filter_map(|p| p.parse().ok()).collect::<Vec<i32>>())
        .collect();
    v.sort();
    v.dedup();
    v
}

/// Entries of a `/proc/PID/` directory (`fd`, `task`).
pub fn count_entries(pid: i32, what: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/{what}")).map(|d| d.count()).unwrap_or(0)
}

/// The mappings of `pid` (`/proc/PID/maps`), sorted into what glibc keeps of its own
/// accord and the rest.
#[derive(Debug, Default)]
pub struct Maps {
    /// Every mapping that is neither of the two below, as its line.
    pub other: Vec<String>,
    /// Thread stacks: an anonymous read-write mapping just above a 4 KiB guard. glibc
    /// keeps the stacks of ended threads for reuse, up to 40 MiB of them, so these grow
    /// with the most threads seen at once, not with forks.
    pub stacks: usize,
    /// Bytes of those stacks.
    pub stack_bytes: u64,
    /// malloc arenas (mappings): anonymous mappings that together fill a whole
    /// 64 MiB-aligned 64 MiB block. glibc makes one when threads contend for malloc, up
    /// to 8 per core, and never unmaps it.
    pub arenas: usize,
}

/// Reads and sorts the mappings of `pid` (see [`Maps`]).
pub fn maps(pid: i32) -> Maps {
    const ARENA: u64 = 64 << 20;
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    // (start, end, perms, anonymous, line)
    let parsed: Vec<(u64, u64, String, bool, &str)> = text
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (a, b) = f.next()?.split_once('-')?;
            let perms = f.next()?.to_string();
            let anonymous = f.nth(3).is_none();
            Some((u64::from_str_radix(a, 16).ok()?, u64::from_str_radix(b, 16).ok()?, perms, anonymous, l))
        })
        .collect();
    let mut blocks: BTreeMap<u64, u64> = BTreeMap::new();
    for (a, b, _, anonymous, _) in &parsed {
        if *anonymous && a / ARENA == (b - 1) / ARENA {
            *blocks.entry(a / ARENA).or_default() += b - a;
        }
    }
    let mut m = Maps::default();
    let mut i = 0;
    while i < parsed.len() {
        let (a, b, perms, anonymous, line) = &parsed[i];
        if *anonymous && blocks.get(&(a / ARENA)) == Some(&ARENA) && a / ARENA == (b - 1) / ARENA {
            m.arenas += 1;
        } else if *anonymous
            && perms == "---p"
            && b - a == 4096
            && parsed.get(i + 1).is_some_and(|n| n.0 == *b && n.2 == "rw-p" && n.3)
        {
            m.stacks += 1;
            m.stack_bytes += parsed[i + 1].1 - parsed[i + 1].0;
            i += 1;
        } else {
            m.other.push(line.to_string());
        }
        i += 1;
    }
    m
}

/// The open fds of `pid`, with what each is, but for memfds: those are the layers of its
/// guest memory, which the clone engine folds on a schedule of its own.
pub fn fds(pid: i32) -> Vec<String> {
    let mut fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| std::fs::read_link(e.path()).map_or_else(|e| e.to_string(), |p| p.display().to_string()))
        .filter(|what| !what.starts_with("/memfd:"))
        .collect();
    fds.sort();
    fds
}

/// The host's `Shmem` (/proc/meminfo) in KiB: memfds and tmpfs, where guest memory lives.
pub fn shmem_kib() -> u64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("Shmem:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("Shmem in /proc/meminfo")
}

/// The socket files in the runtime directory.
pub fn sockets(rt: &Runtime) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(rt.dir.join("vmfork"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| vmfork::api::is_socket(&e.path()))
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    v.sort();
    v
}

/// Percentile `p` (0–100) of sorted `v`.
pub fn percentile(v: &[Duration], p: usize) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v[((v.len() - 1) * p).div_ceil(100)]
}

/// A small seeded generator (splitmix64): the soak's interleavings replay from the seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
