//! Snapshots in a real S3-compatible object store (SeaweedFS, started by
//! `scripts/s3-server`, which `scripts/test` runs), restored lazily from it. The store is
//! found through `VMFORK_S3_ENDPOINT` and the `AWS_*` variables the script prints; where
//! it is absent each test says why it skips, and fails instead with `VMFORK_S3_REQUIRED=1`.

use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;
use vmfork::snapshot::remote::{Remote, S3Config, S3Url};

mod common;

use common::guest::{assert_progress, assert_same_guest, counter, genid};
use common::{Runtime, kvm_available, tail};

/// The bucket `scripts/s3-server` creates.
const BUCKET: &str = "vmfork-test";

/// The store's endpoint, or why the test cannot run.
fn store(test: &str) -> Option<String> {
    match std::env::var("VMFORK_S3_ENDPOINT") {
        Ok(e) if !e.is_empty() => Some(e),
        _ if std::env::var("VMFORK_S3_REQUIRED").as_deref() == Ok("1") => {
            panic!(
                "{test}: VMFORK_S3_REQUIRED is set but VMFORK_S3_ENDPOINT is not (run scripts/s3-server start)"
            )
        }
        _ => {
            common::skip(
                test,
                "no object store (VMFORK_S3_ENDPOINT unset; scripts/s3-server start prints it)",
            );
            None
        }
    }
}

/// A prefix no other test or run uses.
fn prefix(test: &str) -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("s3://{BUCKET}/tests/{test}-{}-{t}", std::process::id())
}

impl Runtime {
    /// `vmfork ARGS` with this runtime's own pack cache and `env` on top of the store's.
    fn s3(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = self.command();
        cmd.env("VMFORK_PACK_CACHE", self.dir.join("pack-cache"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.args(args).output().unwrap()
    }

    fn s3_ok(&self, args: &[&str]) -> String {
        let out = self.s3(args, &[]);
        assert!(out.status.success(), "vmfork {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// What the store's client did for restored VM `name`.
    fn remote_stats(&self, at: &str, name: &str) -> Value {
        let v: Value =
            serde_json::from_str(&self.s3_ok(&["snapshot", "inspect", at, "--vm", name, "--json"])).unwrap();
        v["restore"]["stats"]["remote"].clone()
    }

    fn wait_gone(&self, name: &str, timeout: Duration) {
        let t = Instant::now();
        while self.ls().iter().any(|s| s["name"] == name) {
            assert!(t.elapsed() < timeout, "{name} is still running after {timeout:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn remote(at: &str) -> Remote {
    Remote::new(S3Url::parse(at).unwrap().unwrap(), &S3Config::from_env(None)).unwrap()
}

#[test]
fn a_snapshot_in_the_store_restores_lazily_twice_and_the_second_fetches_no_pack() {
    let test = "remote_restore_twice";
    let Some(_) = store(test) else { return };
    let Some(_kvm) = kvm_available(test) else { return };
    let rt = Runtime::new("remote-twice");
    rt.run("p", &[]);
    let before = counter(&rt.report("p"));
    let at = prefix(test);
    let summary: Value = serde_json::from_str(&rt.s3_ok(&["snapshot", "p", &at, "--json"])).unwrap();
    assert!(summary["uploaded_bytes"].as_u64().unwrap() > 0, "{summary}");
    assert_eq!(summary["dir"], at.as_str());
    let mut ids = vec![genid(&rt.report("p"))];
    for name in ["r1", "r2"] {
        rt.s3_ok(&["restore", &at, "--name", name, "--detach"]);
        assert_same_guest(&rt, "p", name);
        let r = assert_progress(&rt, name);
        assert!(counter(&r) >= before, "{name} restarted: {r}");
        ids.push(genid(&r));
        assert_eq!(rt.status(name)["restored_from"], at.as_str());
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "generation ids are not all distinct");
    let (first, second) = (rt.remote_stats(&at, "r1"), rt.remote_stats(&at, "r2"));
    eprintln!("{test}: first restore {first}; second {second}");
    assert_eq!(first["pack_cache_hits"], 0, "a fresh cache had a hit: {first}");
    assert!(first["bytes_fetched"].as_u64().unwrap() > 0);
    // The second fetched only the four small files; every pack came from the cache.
    assert!(second["pack_cache_hits"].as_u64().unwrap() >= 1, "{second}");
    assert_eq!(second["requests"], 4, "the second restore fetched a pack: {second}");
}

#[test]
fn a_local_snapshot_pushed_restores_from_the_store_and_a_second_push_is_refused() {
    let test = "remote_push";
    let Some(_) = store(test) else { return };
    let Some(_kvm) = kvm_available(test) else { return };
    let rt = Runtime::new("remote-push");
    rt.run("p", &[]);
    let dir = rt.dir.join("local");
    rt.ok(&["snapshot", "p", dir.to_str().unwrap()]);
    let at = prefix(test);
    rt.s3_ok(&["push", dir.to_str().unwrap(), &at]);
    let again = rt.s3(&["push", dir.to_str().unwrap(), &at], &[]);
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success() && err.contains("a snapshot is there already"), "{err}");
    rt.s3_ok(&["restore", &at, "--name", "r", "--detach"]);
    assert_same_guest(&rt, "p", "r");
}

/// `vmfork restore AT` fails within `limit`, saying each of `what`; no VM is left.
fn assert_refused(rt: &Runtime, at: &str, env: &[(&str, &str)], what: &[&str], limit: Duration) {
    let t = Instant::now();
    let out = rt.s3(&["restore", at, "--name", "bad", "--detach"], env);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a restore of {at} with {env:?} succeeded");
    for w in what {
        assert!(err.contains(w), "expected {w:?} in: {err}");
    }
    assert!(t.elapsed() < limit, "refusing took {:?}", t.elapsed());
    assert!(
        !err.contains("not-the-secret") && !err.contains("vmfork-test-secret"),
        "a secret was printed: {err}"
    );
    assert!(!rt.ls().iter().any(|s| s["name"] == "bad"));
}

#[test]
fn a_bad_store_key_object_or_endpoint_is_a_clear_error_in_bounded_time() {
    let test = "remote_refusals";
    let Some(_) = store(test) else { return };
    let Some(_kvm) = kvm_available(test) else { return };
    let rt = Runtime::new("remote-refusals");
    rt.run("p", &[]);
    let at = prefix(test);
    rt.s3_ok(&["snapshot", "p", &at]);
    let quick = [("VMFORK_S3_TIMEOUT_SECS", "1"), ("VMFORK_S3_RETRY_SECS", "2")];
    let ten = Duration::from_secs(10);
    let mut wrong_key = quick.to_vec();
    wrong_key.push(("AWS_SECRET_ACCESS_KEY", "not-the-secret"));
    assert_refused(&rt, &at, &wrong_key, &["access denied", "AWS_SECRET_ACCESS_KEY"], ten);
    assert_refused(&rt, &format!("{at}-never-written"), &quick, &["not a complete snapshot"], ten);
    assert_refused(&rt, "s3://no-such-bucket-here/x", &quick, &["no-such-bucket-here"], ten);
    // Nothing listens on port 9 of loopback.
    let mut dead = quick.to_vec();
    dead.push(("AWS_ENDPOINT_URL", "http://127.0.0.1:9"));
    assert_refused(&rt, &at, &dead, &["snapshot.json", "127.0.0.1:9"], ten);
    // A store that accepts connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    let mut hung = quick.to_vec();
    hung.push(("AWS_ENDPOINT_URL", &url));
    assert_refused(&rt, &at, &hung, &["snapshot.json"], Duration::from_secs(20));
    drop(silent);
    // And a store that is fine again serves the same snapshot.
    rt.s3_ok(&["restore", &at, "--name", "good", "--detach"]);
    assert_same_guest(&rt, "p", "good");
}

#[test]
fn a_pack_lost_or_damaged_in_the_store_stops_the_vm_naming_the_object_and_address() {
    let test = "remote_bad_pack";
    let Some(_) = store(test) else { return };
    let Some(_kvm) = kvm_available(test) else { return };
    let rt = Runtime::new("remote-bad-pack");
    rt.run("p", &[]);
    let dir = rt.dir.join("local");
    rt.ok(&["snapshot", "p", dir.to_str().unwrap(), "--stop"]);
    rt.wait_gone("p", Duration::from_secs(10));
    // One pushed as is and then losing its pack; one pushed with a flipped pack byte.
    let lost = prefix("lost");
    rt.s3_ok(&["push", dir.to_str().unwrap(), &lost]);
    remote(&lost).delete("pack-0000.bin").unwrap();
    let damaged = prefix("damaged");
    let pack = dir.join("pack-0000.bin");
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&pack, &bytes).unwrap();
    rt.s3_ok(&["push", dir.to_str().unwrap(), &damaged]);
    for (at, what) in [(&lost, "not found"), (&damaged, "fail their checksum")] {
        let name = if at == &lost { "lost" } else { "damaged" };
        let t = Instant::now();
        let _ = rt.s3(&["restore", at, "--name", name, "--detach"], &[("VMFORK_S3_RETRY_SECS", "2")]);
        rt.wait_gone(name, Duration::from_secs(15));
        let log = std::fs::read_to_string(rt.dir.join("vmfork").join(format!("{name}.log"))).unwrap();
        let object = format!("{}/pack-0000.bin", at.trim_start_matches("s3://"));
        for w in [object.as_str(), what, "guest address 0x"] {
            assert!(log.contains(w), "{name}: the log does not say {w:?}:\n{}", tail(&log, 10));
        }
        assert!(!log.contains("report vcpu=0"), "{name}: the guest ran without its memory");
        eprintln!("{test}: {name} stopped after {:?}: {}", t.elapsed(), tail(&log, 2));
    }
}

/// A network namespace with one end of a veth pair, the other end in this (the root)
/// namespace; removed on drop.
struct Netns {
    name: String,
    host_if: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Netns {
    /// Namespace `name` at `10.77.N.2/24`, reaching this namespace's `10.77.N.1`.
    fn new(name: &str, n: u8) -> Result<Netns, String> {
        let host_if = format!("vmfk{n}a");
        let _ = ip(&["netns", "del", name]);
        let _ = ip(&["link", "del", &host_if]);
        ip(&["netns", "add", name])?;
        let ns = Netns { name: name.into(), host_if: host_if.clone() };
        let peer = format!("vmfk{n}b");
        ip(&["link", "add", &host_if, "type", "veth", "peer", "name", &peer])?;
        ip(&["link", "set", &peer, "netns", name])?;
        ip(&["addr", "add", &format!("10.77.{n}.1/24"), "dev", &host_if])?;
        ip(&["link", "set", &host_if, "up"])?;
        for args in [
            vec!["addr", "add", &format!("10.77.{n}.2/24") as &str, "dev", &peer],
            vec!["link", "set", &peer, "up"],
            vec!["link", "set", "lo", "up"],
        ] {
            let mut full = vec!["netns", "exec", name, "ip"];
            full.extend(args);
            ip(&full)?;
        }
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &self.host_if]);
    }
}

/// Forwards connections to `listen` (an address of this namespace's veth end) to the
/// store on loopback, which listens there only.
fn forward(listen: std::net::TcpListener, to: std::net::SocketAddr) {
    std::thread::spawn(move || {
        for conn in listen.incoming().flatten() {
            let Ok(up) = std::net::TcpStream::connect(to) else { continue };
            for (mut a, mut b) in [(conn.try_clone().unwrap(), up.try_clone().unwrap()), (up, conn)] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut a, &mut b);
                    let _ = b.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
}

/// "Host B": a network namespace joined to this one by a veth pair (only these two
/// addresses are used), from which the store is reached through a forwarder on this
/// side's address; and that endpoint. `None` (the test skips, saying why) where
/// namespaces cannot be made, unless the store is required and this is root.
fn host_b(test: &str, endpoint: &str, n: u8) -> Option<(Netns, String)> {
    let ns_name = format!("vmfork-b-{}-{n}", std::process::id());
    let ns = match Netns::new(&ns_name, n) {
        Ok(ns) => ns,
        Err(why) if std::env::var("VMFORK_S3_REQUIRED").as_deref() == Ok("1") && nix_is_root() => {
            panic!("{test}: cannot make a network namespace: {why}")
        }
        Err(why) => {
            common::skip(test, &format!("cannot make a network namespace here: {why}"));
            return None;
        }
    };
    let listener = std::net::TcpListener::bind(format!("10.77.{n}.1:0")).unwrap();
    let port = listener.local_addr().unwrap().port();
    let upstream =
        endpoint.trim_start_matches("http://").parse().expect("the store's endpoint is http://IP:PORT");
    forward(listener, upstream);
    Some((ns, format!("http://10.77.{n}.1:{port}")))
}

/// `vmfork restore AT --name NAME --detach` run on host B (`ns`, reaching the store at
/// `endpoint`) with the pack cache `cache`.
fn restore_on_host_b(
    rt: &Runtime,
    ns: &Netns,
    endpoint: &str,
    cache: &std::path::Path,
    at: &str,
    name: &str,
) {
    let mut cmd = rt.command();
    cmd.env("VMFORK_PACK_CACHE", cache).env("AWS_ENDPOINT_URL", endpoint);
    let t = Instant::now();
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(std::env::var_os("VMFORK_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_vmfork").into()))
        .args(["restore", at, "--name", name, "--detach"])
        .envs(cmd.get_envs().filter_map(|(k, v)| Some((k, v?))))
        .output()
        .unwrap();
    assert!(out.status.success(), "restore on host B failed: {}", String::from_utf8_lossy(&out.stderr));
    eprintln!("restored {at} as {name} on host B in {:?}", t.elapsed());
}

#[test]
fn a_snapshot_taken_on_one_host_restores_on_another_across_a_network() {
    let test = "remote_across_namespaces";
    let Some(endpoint) = store(test) else { return };
    let Some(_kvm) = kvm_available(test) else { return };
    let Some((ns, remote_endpoint)) = host_b(test, &endpoint, 7) else { return };
    let rt = Runtime::new("remote-netns");
    rt.run("p", &[]);
    let at = prefix(test);
    rt.s3_ok(&["snapshot", "p", &at]);
    // On host B: its own pack cache, the store only through the veth.
    let cache = rt.dir.join("host-b-cache");
    restore_on_host_b(&rt, &ns, &remote_endpoint, &cache, &at, "b1");
    assert_same_guest(&rt, "p", "b1");
    let r = assert_progress(&rt, "b1");
    assert_ne!(genid(&r), genid(&rt.report("p")), "host B's VM kept the source's generation id");
    let stats = rt.remote_stats(&at, "b1");
    assert_eq!(stats["pack_cache_hits"], 0, "{stats}");
    assert!(stats["bytes_fetched"].as_u64().unwrap() > 0, "{stats}");
    assert!(std::fs::read_dir(&cache).unwrap().count() >= 1, "host B cached no pack");
    rt.ok(&["stop", "b1"]);
}

#[test]
fn a_snapshot_against_a_parent_in_the_store_uploads_its_changes_and_restores_on_another_host() {
    let test = "remote_parent";
    let Some(endpoint) = store(test) else { return };
    let Some(_kvm) = kvm_available(test) else { return };
    let Some((ns, remote_endpoint)) = host_b(test, &endpoint, 8) else { return };
    let rt = Runtime::new("remote-parent");
    rt.run("p", &[]);
    let (a, b) = (prefix("parent-a"), prefix("parent-b"));
    let first: Value = serde_json::from_str(&rt.s3_ok(&["snapshot", "p", &a, "--json"])).unwrap();
    let second: Value =
        serde_json::from_str(&rt.s3_ok(&["snapshot", "p", &b, "--parent", &a, "--json"])).unwrap();
    eprintln!("{test}: parent {first}\nchild {second}");
    assert_eq!(second["parent"], a.trim_end_matches('/'));
    assert!(second["parent_chunks"].as_u64().unwrap() >= 1, "{second}");
    assert!(second["new_bytes"].as_u64() < second["stored_bytes"].as_u64(), "{second}");
    // The guest code the child restores with is in the parent's packs, which host B
    // fetches from the parent's prefix: packs of both land in its cache.
    let cache = rt.dir.join("host-b-cache");
    restore_on_host_b(&rt, &ns, &remote_endpoint, &cache, &b, "b1");
    assert_same_guest(&rt, "p", "b1");
    assert_ne!(genid(&assert_progress(&rt, "b1")), genid(&rt.report("p")));
    let stats = rt.remote_stats(&b, "b1");
    eprintln!("{test}: host B fetched {stats}");
    assert!(std::fs::read_dir(&cache).unwrap().count() >= 2, "host B did not fetch packs of both snapshots");
    rt.ok(&["stop", "b1"]);

    // A parent other hosts could not read is refused, before anything is written.
    let local = rt.dir.join("local");
    rt.ok(&["snapshot", "p", local.to_str().unwrap()]);
    let out = rt.s3(&["snapshot", "p", &prefix("parent-c"), "--parent", local.to_str().unwrap()], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("cannot reference a local directory"), "{err}");
    let child = rt.dir.join("local-child");
    rt.ok(&["snapshot", "p", child.to_str().unwrap(), "--parent", local.to_str().unwrap()]);
    let pushed = prefix("parent-d");
    let out = rt.s3(&["push", child.to_str().unwrap(), &pushed], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("other hosts cannot read"), "{err}");
    assert!(remote(&pushed).get("snapshot.json").unwrap().is_none(), "a refused push left a manifest");
}

/// A forwarder on loopback to the store that "dies" at the first request for a pack:
/// from then on every connection it carried is cut and new ones are refused, as when a
/// store's server goes away in the middle of a restore. Returns its endpoint.
fn store_dying_at_first_pack(to: std::net::SocketAddr) -> String {
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dead = Arc::new(AtomicBool::new(false));
    let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    let die = {
        let (dead, open) = (dead.clone(), open.clone());
        move || {
            if !dead.swap(true, Ordering::SeqCst) {
                for s in open.lock().unwrap().drain(..) {
                    let _ = s.shutdown(Shutdown::Both);
                }
                // Wakes the accept loop, which then closes the listener.
                let _ = TcpStream::connect(addr);
            }
        }
    };
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            if dead.load(Ordering::SeqCst) {
                break;
            }
            let Ok(up) = TcpStream::connect(to) else { continue };
            open.lock().unwrap().extend([conn.try_clone().unwrap(), up.try_clone().unwrap()]);
            let (mut c, mut u) = (conn.try_clone().unwrap(), up.try_clone().unwrap());
            let die = die.clone();
            // Requests: passed on until one asks for a pack.
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                while let Ok(n @ 1..) = c.read(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..n]);
                    if text.lines().any(|l| l.starts_with("GET ") && l.contains("/pack-")) {
                        die();
                        return;
                    }
                    if u.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
            let (mut u, mut c) = (up, conn);
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut u, &mut c);
                let _ = c.shutdown(Shutdown::Write);
            });
        }
    });
    format!("http://{addr}")
}

#[test]
fn a_store_that_dies_mid_restore_stops_the_vm_in_bounded_time_naming_the_object() {
    let test = "remote_store_dies";
    let Some(endpoint) = store(test) else { return };
    let Some(_kvm) = kvm_available(test) else { return };
    let rt = Runtime::new("remote-dies");
    rt.run("p", &[]);
    let at = prefix(test);
    rt.s3_ok(&["snapshot", "p", &at, "--stop"]);
    rt.wait_gone("p", Duration::from_secs(10));
    let upstream = endpoint.trim_start_matches("http://").parse().unwrap();
    let dying = store_dying_at_first_pack(upstream);
    let env = [
        ("AWS_ENDPOINT_URL", dying.as_str()),
        ("VMFORK_S3_TIMEOUT_SECS", "1"),
        ("VMFORK_S3_RETRY_SECS", "2"),
    ];
    let t = Instant::now();
    // The small objects come through; the guest's first fault needs a pack, and the
    // store is gone by then. The restore may or may not see the VM run before it stops.
    let _ = rt.s3(&["restore", &at, "--name", "r", "--detach"], &env);
    rt.wait_gone("r", Duration::from_secs(20));
    let log = rt.log("r");
    let object = format!("{}/pack-0000.bin", at.trim_start_matches("s3://"));
    for w in [object.as_str(), "guest address 0x"] {
        assert!(log.contains(w), "the log does not say {w:?}:\n{}", tail(&log, 10));
    }
    assert!(!log.contains("report vcpu=0"), "the guest ran without its memory:\n{}", tail(&log, 10));
    eprintln!("{test}: stopped after {:?}: {}", t.elapsed(), tail(&log, 2));
    // The snapshot in the store is whole: through the live store it restores.
    rt.s3_ok(&["restore", &at, "--name", "again", "--detach"]);
    assert_progress(&rt, "again");
    rt.ok(&["stop", "again"]);
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
