//! What the VM test suites (vmm.rs, fork.rs) share: one VM test at a time, and a private
//! runtime directory per test for the `vmfork` command.

#![allow(dead_code)] // Each suite uses its own part of this.

pub mod cgroup;
pub mod control;
pub mod guest;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};

/// Whether KVM is here; while it is, the caller holds the lock that runs VM tests one at
/// a time (each guest spins its vCPUs; the host has two cores). Where it is not, the test
/// skips saying why, or fails with `VMFORK_KVM_REQUIRED=1` (which `scripts/test` sets
/// wherever /dev/kvm is usable, so a VM test never passes by skipping there).
pub fn kvm_available(test: &str) -> Option<MutexGuard<'static, ()>> {
    static ONE_VM_TEST: Mutex<()> = Mutex::new(());
    if std::path::Path::new("/dev/kvm").exists() {
        Some(ONE_VM_TEST.lock().unwrap_or_else(|p| p.into_inner()))
    } else if std::env::var("VMFORK_KVM_REQUIRED").as_deref() == Ok("1") {
        panic!("{test}: VMFORK_KVM_REQUIRED=1 but /dev/kvm is absent on this host")
    } else {
        skip(test, "/dev/kvm is absent on this host");
        None
    }
}

/// Says that `test` skips, and why: on stderr, and as a line of the file
/// `$VMFORK_SKIP_LOG` where that is set, so that `scripts/test` counts the test as
/// skipped rather than passed (cargo cannot tell a test that returned early).
pub fn skip(test: &str, why: &str) {
    eprintln!("SKIP {test}: {why}");
    log_skip("skip", test, why);
}

/// Says that a part of `test` is left out, and why; the rest of it runs. `scripts/test`
/// lists these beside the skips, without counting the test as skipped.
pub fn skip_part(test: &str, part: &str, why: &str) {
    eprintln!("SKIP {test} ({part}): {why}");
    log_skip("part", &format!("{test} ({part})"), why);
}

fn log_skip(kind: &str, what: &str, why: &str) {
    use std::io::Write;
    let Some(path) = std::env::var_os("VMFORK_SKIP_LOG") else { return };
    let line = format!("{kind}\t{what}\t{}\n", why.replace(['\n', '\t'], " "));
    // One write of one short line to an O_APPEND file: lines of parallel tests do not mix.
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        panic!("cannot record a skip in VMFORK_SKIP_LOG={}: {e}", std::path::Path::new(&path).display());
    }
}

/// A private runtime directory, so tests never see each other's (or a user's) VMs.
/// Dropping it stops whatever VM a failed test left running.
pub struct Runtime {
    pub dir: PathBuf,
}

impl Runtime {
    pub fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("vmfork-test-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Runtime { dir }
    }

    /// Runs `vmfork ARGS` against this runtime directory (the binary is `$VMFORK_BIN`
    /// where set, as in the testbed, where the build's path does not exist).
    pub fn vmfork(&self, args: &[&str]) -> Output {
        self.command().args(args).output().unwrap()
    }

    /// A `vmfork` command against this runtime directory, for a test that runs it itself.
    pub fn command(&self) -> Command {
        let bin = std::env::var_os("VMFORK_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_vmfork").into());
        let mut cmd = Command::new(bin);
        cmd.env("XDG_RUNTIME_DIR", &self.dir);
        cmd
    }

    /// Runs `vmfork ARGS`, which must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.vmfork(args);
        assert!(out.status.success(), "vmfork {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// The control socket of VM `name`.
    pub fn socket(&self, name: &str) -> PathBuf {
        self.dir.join("vmfork").join(format!("{name}.sock"))
    }

    /// `vmfork ls --json`.
    pub fn ls(&self) -> Vec<serde_json::Value> {
        serde_json::from_str(&self.ok(&["ls", "--json"])).unwrap()
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        let names: Vec<String> = std::fs::read_dir(self.dir.join("vmfork"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".sock").map(str::to_string))
            .collect();
        for n in names {
            let _ = self.vmfork(&["stop", &n]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The last `n` lines of `log`, for a failure message.
pub fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
