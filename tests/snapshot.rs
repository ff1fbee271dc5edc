//! `vmfork snapshot` and `vmfork restore` end to end on this host's KVM, with the
//! built-in guest's `touch` workload (see `common::guest`): a restored VM that really
//! continued from the snapshot's memory and registers reports, at every counter, the
//! checksum its source reported at that counter. Each test skips with a printed reason
//! only where /dev/kvm is absent.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use vmfork::snapshot::Snapshot;
use vmfork::snapshot::format::Kind;

mod common;

use common::guest::{assert_progress, assert_same_guest, counter, genid};
use common::{Runtime, kvm_available, tail};

impl Runtime {
    /// Snapshots `vm` into `dir` (under the runtime directory); returns the summary.
    fn snapshot(&self, vm: &str, dir: &str, extra: &[&str]) -> Value {
        let path = self.dir.join(dir);
        let mut args = vec!["snapshot", vm, path.to_str().unwrap(), "--json"];
        args.extend_from_slice(extra);
        serde_json::from_str(&self.ok(&args)).unwrap()
    }

    /// Restores `dir` as VM `name`, in the background.
    fn restore(&self, dir: &str, name: &str, extra: &[&str]) {
        let path = self.dir.join(dir);
        let mut args = vec!["restore", path.to_str().unwrap(), "--name", name, "--detach"];
        args.extend_from_slice(extra);
        self.ok(&args);
    }

    /// What `vmfork snapshot inspect DIR --vm NAME` says of a restore.
    fn restore_stats(&self, dir: &str, name: &str) -> Value {
        let path = self.dir.join(dir);
        let v: Value = serde_json::from_str(&self.ok(&[
            "snapshot",
            "inspect",
            path.to_str().unwrap(),
            "--vm",
            name,
            "--json",
        ]))
        .unwrap();
        v["restore"]["stats"].clone()
    }

    /// Waits until VM `name` has gone (its process exited); fails after `timeout`.
    fn wait_gone(&self, name: &str, timeout: Duration) {
        let t = Instant::now();
        while self.ls().iter().any(|s| s["name"] == name) {
            assert!(t.elapsed() < timeout, "{name} is still running after {timeout:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Every file of `dir` and its bytes, to show a restore wrote nothing there.
fn contents(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| (p.clone(), std::fs::read(p).unwrap()))
        .collect()
}

#[test]
fn a_snapshot_restored_twice_continues_the_guest_in_both_with_new_generation_ids() {
    let Some(_kvm) = kvm_available("snapshot_restored_twice") else { return };
    let rt = Runtime::new("snap-twice");
    rt.run("p", &[]);
    let before = counter(&rt.report("p"));
    let parent_genid = genid(&rt.report("p"));
    let summary = rt.snapshot("p", "s", &[]);
    assert_eq!(summary["guest_bytes"], 64 << 20, "{summary}");
    let pause_ms = summary["pause_ns"].as_f64().unwrap() / 1e6;
    assert!(pause_ms < 100.0, "the VM was paused {pause_ms} ms for a 64 MiB snapshot");
    assert!(summary["zero_chunks"].as_u64().unwrap() > 0, "an idle 64 MiB guest has zero chunks: {summary}");
    // The source runs on after a snapshot without --stop.
    assert_progress(&rt, "p");
    let before_restore = contents(&rt.dir.join("s"));

    let mut ids = vec![parent_genid];
    for name in ["r1", "r2"] {
        rt.restore("s", name, &[]);
        assert_same_guest(&rt, "p", name);
        let r = assert_progress(&rt, name);
        assert!(counter(&r) >= before, "{name} restarted instead of continuing from the snapshot: {r}");
        assert!(r["reseeds"].as_u64().unwrap() >= 1, "{name}'s guest saw no new generation: {r}");
        assert_eq!(rt.status(name)["restored_from"], rt.dir.join("s").to_str().unwrap());
        ids.push(genid(&r));
    }
    // Both restores ran the snapshot's guest, each as a VM of its own.
    assert_same_guest(&rt, "r1", "r2");
    assert_eq!(genid(&rt.report("p")), parent_genid, "the source's generation id changed");
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "generation ids are not all distinct: {ids:?}");
    let stats = rt.restore_stats("s", "r1");
    assert!(stats["decoded_faults"].as_u64().unwrap() > 0, "r1 decoded nothing: {stats}");
    assert_eq!(contents(&rt.dir.join("s")), before_restore, "a restore changed the snapshot directory");
}

#[test]
fn snapshot_stop_ends_the_source_and_an_eager_restore_continues_it() {
    let Some(_kvm) = kvm_available("snapshot_stop") else { return };
    let rt = Runtime::new("snap-stop");
    rt.run("p", &[]);
    let before = counter(&rt.report("p"));
    rt.snapshot("p", "s", &["--stop", "--chunk", "4K", "--level", "3"]);
    rt.wait_gone("p", Duration::from_secs(10));
    rt.restore("s", "lazy", &[]);
    rt.restore("s", "eager", &["--eager"]);
    for name in ["lazy", "eager"] {
        let r = assert_progress(&rt, name);
        assert!(counter(&r) >= before, "{name} restarted: {r}");
    }
    // The source's log ends a little after the snapshot point; both restores reproduce it.
    assert_same_guest(&rt, "lazy", "eager");
    let eager = rt.restore_stats("s", "eager");
    assert_eq!(eager["eager"], true);
    assert_eq!(eager["decoded_faults"], 0, "an eager restore took faults: {eager}");
}

#[test]
fn a_private_vm_is_never_snapshotted() {
    let Some(_kvm) = kvm_available("snapshot_private") else { return };
    let rt = Runtime::new("snap-private");
    rt.run("secret", &["--private"]);
    let path = rt.dir.join("s");
    let out = rt.vmfork(&["snapshot", "secret", path.to_str().unwrap()]);
    assert!(!out.status.success(), "a private VM was snapshotted");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("private"), "unclear refusal: {err}");
    assert!(!path.exists(), "a refused snapshot left {}", path.display());
    assert!(
        std::fs::read_dir(&rt.dir).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains("partial")),
        "a refused snapshot left a partial directory"
    );
    assert_progress(&rt, "secret");
}

#[test]
fn a_recorded_working_set_is_prefetched_and_cuts_demand_faults() {
    let Some(_kvm) = kvm_available("snapshot_working_set") else { return };
    let rt = Runtime::new("snap-ws");
    rt.run("p", &[]);
    rt.snapshot("p", "s", &["--stop"]);
    rt.restore("s", "first", &[]);
    assert_progress(&rt, "first");
    // The guest touches its 4 MiB again and again: a second is plenty for all of it.
    std::thread::sleep(Duration::from_millis(500));
    let first = rt.restore_stats("s", "first");
    let demand = first["decoded_faults"].as_u64().unwrap() + first["zero_faults"].as_u64().unwrap();
    let path = rt.dir.join("s");
    rt.ok(&["snapshot", "record-ws", path.to_str().unwrap(), "--from", "first"]);
    let snap = Snapshot::open(&path).unwrap();
    let ws = snap.working_set.as_ref().expect("record-ws wrote no working set");
    assert!(snap.manifest.working_set_first);
    assert_eq!(ws.chunks.len() as u64, demand, "the working set is not the first restore's touches");
    // The working set's stored chunks come first in the packs, in its order.
    let offsets: Vec<u64> = ws
        .chunks
        .iter()
        .map(|c| snap.index.entries[c.0 as usize])
        .filter(|e| e.kind != Kind::Zero)
        .map(|e| e.offset)
        .collect();
    assert!(offsets.windows(2).all(|w| w[0] < w[1]) && offsets.first() == Some(&0), "not first in order");
    drop(snap);

    rt.restore("s", "second", &[]);
    assert_same_guest(&rt, "first", "second");
    assert_progress(&rt, "second");
    std::thread::sleep(Duration::from_millis(500));
    let second = rt.restore_stats("s", "second");
    let prefetched = second["prefetched_chunks"].as_u64().unwrap();
    let faults = second["decoded_faults"].as_u64().unwrap() + second["zero_faults"].as_u64().unwrap();
    eprintln!("working set {demand} chunks; second restore: {prefetched} prefetched, {faults} demand faults");
    assert!(prefetched > 0, "nothing was prefetched: {second}");
    assert!(faults < demand, "prefetch did not cut demand faults ({faults} vs {demand} without)");

    // --no-prefetch serves everything on demand again.
    rt.restore("s", "third", &["--no-prefetch"]);
    assert_progress(&rt, "third");
    let third = rt.restore_stats("s", "third");
    assert_eq!(third["prefetched_chunks"], 0, "--no-prefetch prefetched: {third}");
}

/// A snapshot taken here, for the tests that break it.
fn snapshot_to_break(rt: &Runtime) -> PathBuf {
    rt.run("p", &[]);
    rt.snapshot("p", "s", &["--stop"]);
    rt.wait_gone("p", Duration::from_secs(10));
    rt.dir.join("s")
}

/// `vmfork restore DIR FLAGS` fails at once (before any VM runs), saying `what`, both
/// in the foreground and with `--detach`.
fn assert_refused_with(rt: &Runtime, dir: &Path, flags: &[&str], what: &str) {
    for extra in [&[][..], &["--detach"][..]] {
        let mut args = vec!["restore", dir.to_str().unwrap(), "--name", "bad"];
        args.extend_from_slice(flags);
        args.extend_from_slice(extra);
        let t = Instant::now();
        let out = rt.vmfork(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "restore {extra:?} of a broken snapshot succeeded");
        assert!(err.contains(what), "restore {extra:?}: expected an error saying {what:?}, got: {err}");
        assert!(t.elapsed() < Duration::from_secs(10), "refusing took {:?}", t.elapsed());
    }
    assert!(!rt.ls().iter().any(|s| s["name"] == "bad"), "a VM started from a broken snapshot");
}

/// [`assert_refused_with`] for a plain (lazy) restore: for what is wrong before any chunk.
fn assert_refused(rt: &Runtime, dir: &Path, what: &str) {
    assert_refused_with(rt, dir, &[], what);
}

#[test]
fn a_corrupt_chunk_stops_the_restored_vm_naming_the_chunk_and_address() {
    let Some(_kvm) = kvm_available("snapshot_corrupt_chunk") else { return };
    let rt = Runtime::new("snap-corrupt");
    let dir = snapshot_to_break(&rt);
    // A chunk the guest touches at once: the first stored one it faulted on.
    rt.restore("s", "good", &[]);
    assert_progress(&rt, "good");
    let trace: Vec<(u64, u64)> =
        serde_json::from_value(rt.restore_stats("s", "good")["trace"].clone()).unwrap();
    rt.ok(&["stop", "good"]);
    let snap = Snapshot::open(&dir).unwrap();
    let (chunk, e) = trace
        .iter()
        .map(|&(c, _)| (c, snap.index.entries[c as usize]))
        .find(|(_, e)| e.kind == Kind::Zstd)
        .expect("the guest touched no compressed chunk");
    let cs = snap.manifest.chunk_size as u64;
    drop(snap);
    // One flipped bit in the middle of its stored bytes.
    let pack = dir.join("pack-0000.bin");
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[(e.offset + e.len as u64 / 2) as usize] ^= 0x10;
    std::fs::write(&pack, &bytes).unwrap();
    let broken = contents(&dir);

    // The VM may die before `--detach` sees it answer, or just after: either way it ends.
    let t = Instant::now();
    let path = dir.to_str().unwrap();
    let out = rt.vmfork(&["restore", path, "--name", "victim", "--detach"]);
    rt.wait_gone("victim", Duration::from_secs(10));
    let log = rt.log("victim");
    for named in [format!("chunk {chunk} is corrupt"), format!("guest address {:#x}", chunk * cs)] {
        assert!(log.contains(&named), "the log does not name {named:?}:\n{}", tail(&log, 20));
    }
    eprintln!("the VM stopped {:?} after its restore ({}): {}", t.elapsed(), out.status, tail(&log, 3));
    assert!(!log.contains("report vcpu=0"), "the guest ran on past a corrupt chunk:\n{}", tail(&log, 10));
    // An eager restore refuses it before any VM runs. (A lazy one with --detach may see
    // the VM answer before it faults on the chunk: that is the case above.)
    assert_refused_with(&rt, &dir, &["--eager"], &format!("chunk {chunk} is corrupt"));
    assert_eq!(contents(&dir), broken, "a restore changed the snapshot directory");
}

#[test]
fn truncated_and_malformed_snapshots_are_refused_clearly() {
    let Some(_kvm) = kvm_available("snapshot_malformed") else { return };
    let rt = Runtime::new("snap-malformed");
    let dir = snapshot_to_break(&rt);
    let copy = |name: &str| {
        let to = rt.dir.join(name);
        std::fs::create_dir(&to).unwrap();
        for (p, b) in contents(&dir) {
            std::fs::write(to.join(p.file_name().unwrap()), b).unwrap();
        }
        to
    };
    // A pack cut short.
    let d = copy("short-pack");
    let pack = d.join("pack-0000.bin");
    let len = std::fs::metadata(&pack).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&pack).unwrap().set_len(len / 2).unwrap();
    assert_refused(&rt, &d, "truncated");
    // No manifest: a snapshot that was never finished.
    let d = copy("no-manifest");
    std::fs::remove_file(d.join("snapshot.json")).unwrap();
    assert_refused(&rt, &d, "not a complete snapshot");
    // A version this binary does not know.
    let d = copy("version-2");
    let m = std::fs::read_to_string(d.join("snapshot.json")).unwrap();
    std::fs::write(d.join("snapshot.json"), m.replace("\"version\": 1", "\"version\": 2")).unwrap();
    assert_refused(&rt, &d, "version 2 is not supported");
    // A flipped byte in the index.
    let d = copy("bad-index");
    let mut idx = std::fs::read(d.join("index.bin")).unwrap();
    let last = idx.len() - 1;
    idx[last] ^= 0xff;
    std::fs::write(d.join("index.bin"), idx).unwrap();
    assert_refused(&rt, &d, "bad snapshot (index.bin)");
    // A state of another size than the memory.
    let d = copy("bad-state");
    let s = std::fs::read_to_string(d.join("state.json")).unwrap();
    let v: Value = serde_json::from_str(&s).unwrap();
    let size = v["memory_size"].as_u64().expect("state.json has memory_size");
    std::fs::write(
        d.join("state.json"),
        s.replace(&format!("\"memory_size\":{size}"), &format!("\"memory_size\":{}", size * 2)),
    )
    .unwrap();
    assert_refused(&rt, &d, "bad VM state");
    // A directory that is not a snapshot at all.
    assert_refused(&rt, &rt.dir, "not a complete snapshot");
    // And into a directory that exists, a snapshot is refused before the VM pauses.
    rt.run("q", &[]);
    let out = rt.vmfork(&["snapshot", "q", dir.to_str().unwrap()]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("already exists"));
    assert_progress(&rt, "q");
}

#[test]
fn a_snapshot_against_its_parent_references_unchanged_chunks_and_restores_the_guest() {
    let Some(_kvm) = kvm_available("snapshot_parent") else { return };
    let rt = Runtime::new("snap-parent");
    // An idle guest changes nothing between two snapshots but its report mailbox (each
    // pause and resume makes it report again): the second stores next to nothing.
    rt.ok(&["run", "--name", "q", "--mem", "64M", "--workload", "idle", "--detach"]);
    rt.wait_report("q");
    let first = rt.snapshot("q", "q1", &[]);
    let q1 = rt.dir.join("q1");
    let second = rt.snapshot("q", "q2", &["--parent", q1.to_str().unwrap()]);
    let nonzero = second["chunks"].as_u64().unwrap() - second["zero_chunks"].as_u64().unwrap();
    let new = nonzero - second["parent_chunks"].as_u64().unwrap();
    eprintln!("snapshot_parent: idle: {first}\n{second}");
    assert!(new <= 2, "an idle guest's second snapshot stored {new} of {nonzero} chunks anew: {second}");
    assert_eq!(second["parent"], q1.to_str().unwrap());
    assert!(second["new_bytes"].as_u64().unwrap() * 20 < first["stored_bytes"].as_u64().unwrap(), "{second}");
    rt.ok(&["stop", "q"]);

    // A running guest: the chunks it rewrote are stored again, the rest referenced, and a
    // restore of the child continues the guest exactly, reading chunks from both.
    rt.run("p", &[]);
    let a = rt.dir.join("a");
    rt.snapshot("p", "a", &[]);
    let b = rt.snapshot("p", "b", &["--parent", a.to_str().unwrap()]);
    assert!(b["parent_chunks"].as_u64().unwrap() >= 1, "nothing referenced: {b}");
    let inspect = rt.ok(&["snapshot", "inspect", rt.dir.join("b").to_str().unwrap()]);
    assert!(inspect.contains(&format!("parent   {}", a.display())), "{inspect}");
    rt.restore("b", "r", &[]);
    assert_same_guest(&rt, "p", "r");
    let r = assert_progress(&rt, "r");
    assert_ne!(genid(&r), genid(&rt.report("p")));
    rt.ok(&["stop", "r"]);

    // The child needs its parent: without it, a restore says which and why, at once.
    std::fs::rename(&a, rt.dir.join("a-moved")).unwrap();
    assert_refused(&rt, &rt.dir.join("b"), &format!("parent snapshot {}", a.display()));
    let out =
        rt.vmfork(&["snapshot", "p", rt.dir.join("c").to_str().unwrap(), "--parent", a.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--parent") && err.contains(a.to_str().unwrap()), "{err}");
    assert!(!rt.dir.join("c").exists());
}
