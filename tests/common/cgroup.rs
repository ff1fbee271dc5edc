//! A cgroup of a test's own for one controller (`memory`, `pids`), below the cgroup the
//! test runs in, on whichever hierarchy the host can write: cgroup v2 where the
//! controller can be enabled for a child, else the controller's v1 hierarchy. Dropping it
//! (also while a failed test unwinds) moves whatever still runs in it back to where the
//! test runs and removes it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Which hierarchy a [`Cgroup`] lives in; some file names differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// A cgroup the test made (see the module).
#[derive(Debug)]
pub struct Cgroup {
    pub dir: PathBuf,
    /// Where the test runs: processes go back here.
    pub home: PathBuf,
    pub version: Version,
    /// `memory` or `pids`.
    pub controller: &'static str,
}

/// The mount point and root of the hierarchy that `pick` accepts (`fstype`, super
/// options), from /proc/self/mountinfo.
fn mount(pick: impl Fn(&str, &[&str]) -> bool) -> Option<(PathBuf, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        let pre: Vec<&str> = pre.split_whitespace().collect();
        let post: Vec<&str> = post.split_whitespace().collect();
        let opts: Vec<&str> = post.get(2)?.split(',').collect();
        let (mountpoint, root) = (pre.get(4)?, pre.get(3)?);
        pick(post.first()?, &opts).then(|| (PathBuf::from(mountpoint), root.to_string()))
    })
}

/// This process's cgroup in the hierarchy whose /proc/self/cgroup line `pick` accepts
/// (its controller list), as a directory under `mountpoint` with root `root`.
fn own_dir(mountpoint: &Path, root: &str, pick: impl Fn(&str) -> bool) -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = text.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
        pick(controllers).then(|| path.to_string())
    })?;
    let rel = path.strip_prefix(root.trim_end_matches('/')).unwrap_or(&path);
    Some(mountpoint.join(rel.trim_start_matches('/')))
}

impl Cgroup {
    /// A new cgroup `NAME-PID` of `controller` (`memory` or `pids`) below this process's
    /// own, without a limit; `Err` says why there is none (no writable hierarchy with the
    /// controller). Cgroups of the same `name` left by runs that were killed (whose pid is
    /// gone) are removed first.
    pub fn new(controller: &'static str, name: &str) -> Result<Cgroup, String> {
        let mut why = Vec::new();
        for version in [Version::V2, Version::V1] {
            match Self::make(controller, name, version) {
                Ok(cg) => return Ok(cg),
                Err(e) => why.push(format!("{version:?}: {e}")),
            }
        }
        Err(format!("no writable {controller} cgroup: {}", why.join("; ")))
    }

    fn make(controller: &'static str, name: &str, version: Version) -> Result<Cgroup, String> {
        let limit_file = match (controller, version) {
            ("memory", Version::V1) => "memory.limit_in_bytes",
            ("memory", Version::V2) => "memory.max",
            _ => "pids.max",
        };
        let home = match version {
            Version::V2 => {
                let (mnt, root) =
                    mount(|fs, _| fs == "cgroup2").ok_or("no cgroup2 mount in /proc/self/mountinfo")?;
                let home = own_dir(&mnt, &root, |c| c.is_empty()).ok_or("no v2 line in /proc/self/cgroup")?;
                let controllers =
                    std::fs::read_to_string(home.join("cgroup.controllers")).unwrap_or_default();
                if !controllers.split_whitespace().any(|c| c == controller) {
                    return Err(format!(
                        "the {controller} controller is not available in {} (controllers: {:?})",
                        home.display(),
                        controllers.trim()
                    ));
                }
                home
            }
            Version::V1 => {
                let (mnt, root) = mount(|fs, opts| fs == "cgroup" && opts.contains(&controller))
                    .ok_or(format!("no v1 {controller} hierarchy in /proc/self/mountinfo"))?;
                own_dir(&mnt, &root, |c| c.split(',').any(|c| c == controller))
                    .ok_or(format!("no {controller} line in /proc/self/cgroup"))?
            }
        };
        remove_stale(&home, name);
        let dir = home.join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        let cg = Cgroup { dir, home, version, controller };
        if version == Version::V2 && !cg.dir.join(limit_file).exists() {
            // A v2 parent must enable the controller for its children, which it can only
            // while it holds no processes itself (but for the root).
            let enable = std::fs::write(cg.home.join("cgroup.subtree_control"), format!("+{controller}"));
            if let Err(e) = enable.map_err(|e| e.to_string()).and_then(|()| {
                cg.dir.join(limit_file).exists().then_some(()).ok_or(format!("still no {limit_file}"))
            }) {
                return Err(format!(
                    "cannot enable the {controller} controller below {}: {e} (a v2 cgroup that holds \
                     processes cannot)",
                    cg.home.display()
                ));
            }
        }
        cg.set_limit(None).map_err(|e| format!("{}: {e}", cg.dir.join(limit_file).display()))?;
        Ok(cg)
    }

    fn file(&self, v1: &str, v2: &str) -> PathBuf {
        self.dir.join(if self.version == Version::V1 { v1 } else { v2 })
    }

    /// What is charged to the cgroup now: bytes, or tasks (threads) for `pids`.
    pub fn usage(&self) -> u64 {
        let f = match self.controller {
            "memory" => self.file("memory.usage_in_bytes", "memory.current"),
            _ => self.dir.join("pids.current"),
        };
        std::fs::read_to_string(&f).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
    }

    /// Sets the cgroup's hard limit, in bytes or tasks (`None`: no limit).
    pub fn set_limit(&self, limit: Option<u64>) -> std::io::Result<()> {
        let (f, none) = match (self.controller, self.version) {
            ("memory", Version::V1) => (self.dir.join("memory.limit_in_bytes"), "-1"),
            ("memory", Version::V2) => (self.dir.join("memory.max"), "max"),
            _ => (self.dir.join("pids.max"), "max"),
        };
        std::fs::write(f, limit.map_or_else(|| none.to_string(), |l| l.to_string()))
    }

    /// Sets the limit to `above` over the current use (retrying while a memory cgroup's
    /// use grows past a limit just computed, which the kernel refuses with `EBUSY`);
    /// returns it.
    pub fn limit_above_usage(&self, above: u64) -> std::io::Result<u64> {
        let t = Instant::now();
        loop {
            let limit = self.usage() + above;
            match self.set_limit(Some(limit)) {
                Ok(()) => return Ok(limit),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && t.elapsed() < Duration::from_secs(5) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Moves process `pid` (all its threads) into the cgroup.
    pub fn add(&self, pid: i32) -> std::io::Result<()> {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string())
    }

    /// Moves process `pid` (all its threads) back to where the test runs.
    pub fn send_home(&self, pid: i32) -> std::io::Result<()> {
        std::fs::write(self.home.join("cgroup.procs"), pid.to_string())
    }

    /// The processes in the cgroup.
    pub fn procs(&self) -> Vec<i32> {
        std::fs::read_to_string(self.dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Processes the kernel's OOM killer killed in the (memory) cgroup so far.
    pub fn oom_kills(&self) -> u64 {
        let f = self.file("memory.oom_control", "memory.events");
        let text = std::fs::read_to_string(f).unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// How often a charge hit the limit so far (v1 `memory.failcnt`, v2 the `max` event).
    pub fn limit_hits(&self) -> u64 {
        if self.version == Version::V1 {
            let f = self.dir.join("memory.failcnt");
            return std::fs::read_to_string(f).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
        }
        let text = std::fs::read_to_string(self.dir.join("memory.events")).unwrap_or_default();
        text.lines().find_map(|l| l.strip_prefix("max ")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
    }
}

/// Removes the empty cgroups `NAME-PID` under `home` whose PID no longer runs.
fn remove_stale(home: &Path, name: &str) {
    let prefix = format!("{name}-");
    for e in std::fs::read_dir(home).into_iter().flatten().flatten() {
        let file = e.file_name();
        let Some(pid) =
            file.to_str().and_then(|f| f.strip_prefix(&prefix)).and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = self.set_limit(None);
        let t = Instant::now();
        loop {
            for p in self.procs() {
                let _ = self.send_home(p);
            }
            match std::fs::remove_dir(&self.dir) {
                Ok(()) => return,
                Err(e) if t.elapsed() > Duration::from_secs(5) => {
                    eprintln!("cannot remove the test's cgroup {}: {e}", self.dir.display());
                    return;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}
