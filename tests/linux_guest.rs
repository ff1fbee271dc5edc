//! A stock Linux guest booted, forked, snapshotted and restored by `vmfork`, end to end.
//!
//! The guest is the reference one of `qemu-testbed/linux-guest` (Debian's 6.1 kernel and
//! a busybox initramfs whose /init prints `VMFORK-LINUX-READY`, then every half second
//! `VMFORK-TICK <n> rand=<hash of 16 bytes of /dev/urandom> ged=<notifications taken>`). Its files come from
//! `$VMFORK_LINUX_KERNEL` / `$VMFORK_LINUX_INITRD`, else from the testbed cache.
//!
//! These tests need hardware-assisted KVM: on a PVM-based host every test prints `skipped: <reason>` and returns; the QEMU
//! testbed runs them under nested KVM with `VMFORK_LINUX_REQUIRED=1`, where a missing
//! prerequisite fails instead.
//!
//! A fork must give a child that continues the parent's guest (tick numbers go on, no
//! reboot), whose kernel was told of the new VM generation id (it logs "crng reseeded
//! due to virtual machine fork"), and whose /dev/urandom output differs from the
//! parent's at the same ticks; both keep running.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

mod common;

use common::{Runtime, kvm_available, tail};

const RESEED: &str = "crng reseeded due to virtual machine fork";
/// Boot to the ready marker; generous, for nested KVM under QEMU TCG.
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

/// Kernel and initrd, or why the test cannot run.
fn guest() -> Result<(PathBuf, PathBuf), vmfork::vmm::linux::Unavailable> {
    vmfork::vmm::linux::host_can_boot_linux()?;
    vmfork::vmm::linux::reference_guest_files()
}

/// The guest files, or `None` after printing why the test is skipped.
fn guest_or_skip(test: &str) -> Option<(PathBuf, PathBuf)> {
    match guest() {
        Ok(g) => Some(g),
        Err(why) if std::env::var_os("VMFORK_LINUX_REQUIRED").is_some() => {
            panic!("{test}: a Linux guest is required here but {why}")
        }
        Err(why) => {
            common::skip(test, &why.to_string());
            None
        }
    }
}

impl Runtime {
    fn console(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join("vmfork").join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Tick number → urandom hash, from a VM's console.
    fn ticks(&self, name: &str) -> BTreeMap<u64, String> {
        self.console(name)
            .lines()
            .filter_map(|l| {
                let rest = l.trim_end_matches('\r').strip_prefix("VMFORK-TICK ")?;
                let (n, r) = rest.split_once(" rand=")?;
                Some((n.parse().ok()?, r.split_whitespace().next()?.to_string()))
            })
            .collect()
    }

    /// Waits until `name`'s console has `n` more ticks than `after` (its last tick
    /// number), or fails showing the console.
    fn wait_ticks(&self, name: &str, after: u64, n: u64, timeout: Duration) -> BTreeMap<u64, String> {
        let t = Instant::now();
        loop {
            let ticks = self.ticks(name);
            if ticks.keys().filter(|&&k| k > after).count() as u64 >= n {
                return ticks;
            }
            if t.elapsed() > timeout {
                panic!(
                    "{name}: fewer than {n} ticks after tick {after} within {timeout:?}; console tail:\n{}",
                    tail(&self.console(name), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Boots the reference guest as `name` and waits for its first ticks.
    fn boot(&self, name: &str, kernel: &std::path::Path, initrd: &std::path::Path, vcpus: u32) -> Duration {
        self.boot_with_mem(name, kernel, initrd, vcpus, "256M")
    }

    fn boot_with_mem(
        &self,
        name: &str,
        kernel: &std::path::Path,
        initrd: &std::path::Path,
        vcpus: u32,
        mem: &str,
    ) -> Duration {
        let t = Instant::now();
        let k = kernel.to_str().unwrap();
        let i = initrd.to_str().unwrap();
        let n = vcpus.to_string();
        self.ok(&[
            "run", "--name", name, "--mem", mem, "--vcpus", &n, "--kernel", k, "--initrd", i, "--detach",
        ]);
        self.wait_ticks(name, 0, 2, BOOT_TIMEOUT);
        let took = t.elapsed();
        let ready = format!("cpus={vcpus}");
        assert!(
            self.console(name).lines().any(|l| l.contains("VMFORK-LINUX-READY") && l.contains(&ready)),
            "{name}: no ready marker with {ready}"
        );
        eprintln!("{name}: booted to its second tick in {took:?}");
        took
    }
}

#[test]
fn linux_guest_boots_to_its_init_and_runs() {
    let test = "linux_guest_boots_to_its_init_and_runs";
    let Some((kernel, initrd)) = guest_or_skip(test) else { return };
    let Some(_lock) = kvm_available(test) else { return };
    let rt = Runtime::new("linux-boot");
    rt.boot("p", &kernel, &initrd, 1);
    let log = rt.console("p");
    assert!(log.contains("Linux version"), "no kernel banner");
    // The ACPI devices the fork relies on were found and bound.
    assert!(log.contains("ACPI: RSDP"), "no ACPI tables found");
    let last = *rt.ticks("p").keys().last().unwrap();
    rt.wait_ticks("p", last, 2, Duration::from_secs(60));
    let status = rt.ls().into_iter().find(|s| s["name"] == "p").unwrap();
    assert_eq!(status["state"], "running");
    assert_eq!(status["workload"], "linux");
    rt.ok(&["stop", "p"]);
}

#[test]
fn an_elf_vmlinux_boots_like_the_bzimage() {
    let test = "an_elf_vmlinux_boots_like_the_bzimage";
    let Some((_, initrd)) = guest_or_skip(test) else { return };
    let vmlinux = match vmfork::vmm::linux::reference_vmlinux() {
        Ok(p) => p,
        Err(why) if std::env::var_os("VMFORK_LINUX_REQUIRED").is_some() => panic!("{test}: {why}"),
        Err(why) => {
            common::skip(test, &why.to_string());
            return;
        }
    };
    let Some(_lock) = kvm_available(test) else { return };
    let rt = Runtime::new("linux-elf");
    rt.boot("p", &vmlinux, &initrd, 1);
    assert!(rt.console("p").contains("Linux version"), "no kernel banner");
    rt.ok(&["stop", "p"]);
}

#[test]
fn a_linux_guest_of_5_gib_gets_its_ram_above_the_hole_and_forks() {
    let test = "a_linux_guest_of_5_gib_gets_its_ram_above_the_hole_and_forks";
    let Some((kernel, initrd)) = guest_or_skip(test) else { return };
    let Some(_lock) = kvm_available(test) else { return };
    let rt = Runtime::new("linux-5g");
    rt.boot_with_mem("p", &kernel, &initrd, 1, "5G");
    // 3 GiB below the hole, the other 2 GiB from 4 GiB on, as the kernel read its e820 map.
    let above = "[mem 0x0000000100000000-0x000000017fffffff] usable";
    let log = rt.console("p");
    assert!(
        log.lines().any(|l| l.contains("BIOS-e820") && l.contains(above)),
        "the guest's e820 map lacks {above}:\n{}",
        log.lines().filter(|l| l.contains("e820")).collect::<Vec<_>>().join("\n")
    );
    let before = *rt.ticks("p").keys().last().unwrap();
    rt.ok(&["fork", "p", "--strategy", "cow", "--name", "c"]);
    let child = rt.wait_ticks("c", before, 2, Duration::from_secs(120));
    assert!(child.keys().next().is_some_and(|&k| k > before), "the child did not continue the guest");
    rt.ok(&["stop", "c"]);
    rt.ok(&["stop", "p"]);
}

#[test]
fn a_guest_reboot_with_reboot_k_ends_the_vm_cleanly() {
    let test = "a_guest_reboot_with_reboot_k_ends_the_vm_cleanly";
    let Some((kernel, initrd)) = guest_or_skip(test) else { return };
    let Some(_lock) = kvm_available(test) else { return };
    let rt = Runtime::new("linux-reboot");
    let console = rt.dir.join("reboot-console.log");
    // The reference /init runs `reboot -f` after this tick; `reboot=k` (in the default
    // command line) makes the kernel reset through the i8042, which ends the VM.
    let cmdline = format!("{} vmfork.reboot_after=2", vmfork::vmm::linux::DEFAULT_CMDLINE);
    let mut run = rt
        .command()
        .args(["run", "--name", "r", "--mem", "256M", "--kernel"])
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--cmdline", &cmdline, "--console"])
        .arg(&console)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(status) = run.try_wait().unwrap() {
            break status;
        }
        if t.elapsed() > BOOT_TIMEOUT {
            let _ = run.kill();
            let log = std::fs::read_to_string(&console).unwrap_or_default();
            panic!("{test}: the VM did not end within {BOOT_TIMEOUT:?}; console tail:\n{}", tail(&log, 30));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut run.stderr.take().unwrap(), &mut stderr).unwrap();
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(log.contains("VMFORK-REBOOTING"), "{test}: the guest never asked to reboot; stderr: {stderr}");
    assert!(status.success(), "{test}: vmfork run failed after the guest's reboot: {stderr}");
    assert!(stderr.contains("guest reset (i8042)"), "{test}: the VM did not end by an i8042 reset: {stderr}");
    eprintln!("{test}: the VM ended {:?} after start: {}", t.elapsed(), stderr.trim());
}

/// Boots a parent with `vcpus` vCPUs, forks it with `strategy`, and checks the child
/// continued the parent's guest with a reseeded RNG while both keep running.
fn fork_with(strategy: &str, vcpus: u32) {
    let test = format!("linux_guest_{vcpus}_vcpu_forks_with_{strategy}");
    let Some((kernel, initrd)) = guest_or_skip(&test) else { return };
    if strategy == "reflink" {
        if let Err(e) = vmfork::memory::reflink::probe() {
            if std::env::var_os("VMFORK_LINUX_REQUIRED").is_some()
                && std::env::var_os("VMFORK_REFLINK_REQUIRED").is_some()
            {
                panic!("{test}: reflink is required here but {e}");
            }
            common::skip(&test, &format!("this kernel has no memfd reflink ({e})"));
            return;
        }
    }
    let Some(_lock) = kvm_available(&test) else { return };
    let rt = Runtime::new(&format!("linux-fork-{strategy}-{vcpus}"));
    rt.boot("p", &kernel, &initrd, vcpus);
    let before = *rt.ticks("p").keys().last().unwrap();
    let t = Instant::now();
    let fork = rt.vmfork(&["fork", "p", "--strategy", strategy, "--name", "c", "--json"]);
    if !fork.status.success() {
        // The parent's and child's logs say what broke (a parent that died answers nothing).
        panic!(
            "{test}: vmfork fork failed: {}\nparent log tail:\n{}\nchild log tail:\n{}",
            String::from_utf8_lossy(&fork.stderr),
            tail(&rt.console("p"), 25),
            tail(&rt.console("c"), 25)
        );
    }
    let out: serde_json::Value = serde_json::from_slice(&fork.stdout).unwrap();
    eprintln!("{test}: fork took {:?}: {out}", t.elapsed());
    assert_eq!(out[0]["strategy"], strategy);

    let child = rt.wait_ticks("c", 0, 4, Duration::from_secs(120));
    let first = *child.keys().next().unwrap();
    assert!(
        first > before,
        "child's first tick {first} is not after the parent's tick {before} at the fork: it rebooted?"
    );
    let parent = rt.wait_ticks("p", first + 3, 1, Duration::from_secs(60));
    let child = rt.wait_ticks("c", first + 3, 1, Duration::from_secs(60));
    // The first complete child tick may have been computed before the fork; every later
    // one read /dev/urandom after it.
    let common: Vec<u64> = child.keys().copied().filter(|k| *k > first && parent.contains_key(k)).collect();
    assert!(common.len() >= 2, "too few common ticks after the fork: {common:?}");
    for k in &common {
        assert_ne!(
            parent[k], child[k],
            "tick {k}: parent and child read the same /dev/urandom bytes: no reseed"
        );
    }
    // The reseed runs from an ACPI notify work item; give it time, then show why not.
    let t = Instant::now();
    while !rt.console("c").contains(RESEED) {
        if t.elapsed() > Duration::from_secs(30) {
            panic!(
                "the child's kernel did not report a VM-fork reseed within 30 s; child console tail:\n{}",
                tail(&rt.console("c"), 30)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!rt.console("p").contains(RESEED), "the parent's kernel reseeded as if it were forked");
    let reseed = rt.console("c").lines().find(|l| l.contains(RESEED)).unwrap_or_default().to_string();
    eprintln!(
        "{test}: child continued at tick {first} (parent was at {before}), {} common ticks all differ; child: {reseed}",
        common.len()
    );
    rt.ok(&["stop", "c"]);
    // The parent runs on without its child.
    let last = *rt.ticks("p").keys().last().unwrap();
    rt.wait_ticks("p", last, 1, Duration::from_secs(60));
    rt.ok(&["stop", "p"]);
}

#[test]
fn linux_guest_forks_with_copy() {
    fork_with("copy", 1);
}

#[test]
fn linux_guest_forks_with_cow() {
    fork_with("cow", 1);
}

#[test]
fn linux_guest_forks_with_uffd() {
    fork_with("uffd", 1);
}

#[test]
fn linux_guest_forks_with_reflink() {
    fork_with("reflink", 1);
}

#[test]
fn linux_guest_with_two_vcpus_forks_with_cow() {
    fork_with("cow", 2);
}

/// A Linux guest snapshotted and stopped, then restored twice: each restore continues
/// from the snapshot point (no reboot), its kernel logs the VM-fork reseed, and the two
/// read different /dev/urandom bytes, so neither shares the other's or the source's RNG.
#[test]
fn linux_guest_snapshot_restores_twice_with_a_reseed_in_each() {
    let test = "linux_guest_snapshot_restores_twice_with_a_reseed_in_each";
    let Some((kernel, initrd)) = guest_or_skip(test) else { return };
    let Some(_lock) = kvm_available(test) else { return };
    let rt = Runtime::new("linux-snapshot");
    rt.boot("p", &kernel, &initrd, 1);
    let before = *rt.ticks("p").keys().last().unwrap();
    let dir = rt.dir.join("snap");
    let t = Instant::now();
    let out = rt.ok(&["snapshot", "p", dir.to_str().unwrap(), "--stop", "--json"]);
    eprintln!("{test}: snapshot in {:?}: {}", t.elapsed(), out.trim());
    let t = Instant::now();
    while rt.ls().iter().any(|s| s["name"] == "p") {
        assert!(t.elapsed() < Duration::from_secs(30), "the source did not stop after snapshot --stop");
        std::thread::sleep(Duration::from_millis(100));
    }
    let last_of_source = *rt.ticks("p").keys().last().unwrap();
    let mut firsts = Vec::new();
    for name in ["r1", "r2"] {
        rt.ok(&["restore", dir.to_str().unwrap(), "--name", name, "--detach"]);
        let ticks = rt.wait_ticks(name, 0, 3, Duration::from_secs(120));
        let first = *ticks.keys().next().unwrap();
        assert!(
            first > before,
            "{name}'s first tick {first} is not after the source's tick {before}: it rebooted?"
        );
        assert!(
            first <= last_of_source + 1,
            "{name} starts at tick {first}, past the source's last tick {last_of_source}"
        );
        let t = Instant::now();
        while !rt.console(name).contains(RESEED) {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "{name}'s kernel did not report a VM-fork reseed within 30 s; console tail:\n{}",
                tail(&rt.console(name), 30)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        firsts.push(first);
    }
    assert!(!rt.console("p").contains(RESEED), "the source's kernel reseeded as if it were forked");
    let start = firsts.iter().max().unwrap() + 1;
    let r1 = rt.wait_ticks("r1", start, 2, Duration::from_secs(60));
    let r2 = rt.wait_ticks("r2", start, 2, Duration::from_secs(60));
    let common: Vec<u64> = r1.keys().copied().filter(|k| *k >= start && r2.contains_key(k)).collect();
    assert!(common.len() >= 2, "too few common ticks after the restores: {common:?}");
    for k in &common {
        assert_ne!(r1[k], r2[k], "tick {k}: both restores read the same /dev/urandom bytes: no reseed");
    }
    eprintln!(
        "{test}: source stopped at tick {last_of_source}; restores continued at ticks {firsts:?}, {} common ticks all differ",
        common.len()
    );
    rt.ok(&["stop", "r2"]);

    // A snapshot of a restored VM against the snapshot it came from stores what its
    // kernel and processes changed since, not the kernel again; and restores.
    let first: serde_json::Value = serde_json::from_str(&out).unwrap();
    let child_dir = rt.dir.join("snap-child");
    let child: serde_json::Value = serde_json::from_str(&rt.ok(&[
        "snapshot",
        "r1",
        child_dir.to_str().unwrap(),
        "--parent",
        dir.to_str().unwrap(),
        "--stop",
        "--json",
    ]))
    .unwrap();
    let (new, parent_stored) =
        (child["new_bytes"].as_u64().unwrap(), first["stored_bytes"].as_u64().unwrap());
    eprintln!(
        "{test}: child snapshot of r1 referenced {} chunks and stored {new} new bytes; the parent stored {parent_stored}",
        child["parent_chunks"]
    );
    assert!(child["parent_chunks"].as_u64().unwrap() > 0, "{child}");
    assert!(new * 2 < parent_stored, "the child stored {new} bytes anew of the parent's {parent_stored}");
    let r1_last = *rt.ticks("r1").keys().last().unwrap();
    rt.ok(&["restore", child_dir.to_str().unwrap(), "--name", "r3", "--detach"]);
    let ticks = rt.wait_ticks("r3", 0, 2, Duration::from_secs(120));
    let first_r3 = *ticks.keys().next().unwrap();
    assert!(
        first_r3 > start && first_r3 <= r1_last + 1,
        "r3 starts at tick {first_r3}, not where r1 stopped ({r1_last})"
    );
    rt.ok(&["stop", "r3"]);
}
